"""From downloaded TCGA / GDC (or any) files to a cohort manifest (`mstar-hf build-cohort`).

Inputs, all optional but the slides:

* slide folders (searched recursively): TCGA slides are named `<slide barcode>.<uuid>.svs`;
* RNA folders (a `gdc-client` download: `<file id>/<uuid>.rna_seq.augmented_star_gene_counts.tsv`,
  or legacy `*.rsem.genes.normalized_results`) and/or a gene x sample matrix (cBioPortal / Xena)
  whose sample columns are barcodes (or case ids);
* sample sheets: the GDC sample sheet of the download (ties a file name to its case and sample),
  or a plain CSV `file_name, case_id[, sample_id, project_id]` for a non-TCGA cohort;
* reports: a TCGA-Reports-style CSV (`patient_filename,text`) or a plain `case_id,text` CSV;
* clinical tables: GDC clinical.tsv, cBioPortal `data_clinical_patient.txt` or `case_id,time,event`.

A file is tied to a case by the sample sheet or else by the TCGA barcode in its name. Each slide
becomes a manifest row (case = patient); its RNA is the patient's sample of the same sample type
(01 tumour ...) or, failing that, another tumour sample of the patient; report, survival and labels
are the patient's. Splits are drawn per case, stratified by cancer type. Everything that did not
match is listed with its reason in `unmatched.tsv` and in the printed summary.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .tcga import is_missing, normalise_column, parse_barcode, read_clinical, read_reports_csv, read_sample_sheet

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
RNA_SUFFIXES = (".tsv", ".txt", ".csv", ".tab", ".parquet", ".gz", ".normalized_results", ".results")
STAR_COUNTS_SUFFIX = ".rna_seq.augmented_star_gene_counts.tsv"
# what a gdc-client download holds beside the data files
_IGNORED_NAMES = {"annotations.txt", "manifest.txt", "md5sum.txt", "gdc_manifest.txt"}
_IGNORED_SUFFIXES = (".parcel", ".partial", ".md5", ".log", ".json", ".xml", ".pdf")
MANIFEST_COLUMNS = ("case_id", "slide_id", "cancer_type", "features_path", "slide_path", "sample_id", "project_id",
                    "report", "rna_path", "rna_value_column", "rna_matrix_path", "rna_row_id", "rna_sample_id",
                    "label", "time", "event", "split")
_REQUIRED = ("case_id", "slide_id", "cancer_type", "features_path")


@dataclass
class Unmatched:
    kind: str  # slide, rna, report, clinical, sample_sheet
    item: str
    reason: str


@dataclass
class CohortBuild:
    manifest: Path
    rows: list[dict]
    unmatched: list[Unmatched] = field(default_factory=list)
    gene_vocab: Path | None = None

    def summary(self, examples: int = 3) -> str:
        """What was matched, then each kind of mismatch with a count and a few examples."""
        cases = {r["case_id"] for r in self.rows}
        with_rna = sum(bool(r.get("rna_path") or r.get("rna_row_id")) for r in self.rows)
        with_report = sum(bool(r.get("report")) for r in self.rows)
        with_surv = sum(r.get("time", "") != "" for r in self.rows)
        types = Counter(r["cancer_type"] or "(none)" for r in self.rows)
        lines = [f"manifest: {self.manifest} ({len(self.rows)} slides, {len(cases)} cases; "
                 f"{with_rna} with RNA, {with_report} with a report, {with_surv} with survival)",
                 "cancer types: " + ", ".join(f"{t} {n}" for t, n in sorted(types.items()))]
        if self.gene_vocab is not None:
            lines.append(f"gene vocabulary: {self.gene_vocab}")
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for u in self.unmatched:
            groups[(u.kind, u.reason)].append(u.item)
        if groups:
            lines.append(f"not matched ({len(self.unmatched)}; all in {self.manifest.parent / 'unmatched.tsv'}):")
            for (kind, reason), items in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
                shown = ", ".join(items[:examples]) + (", ..." if len(items) > examples else "")
                lines.append(f"  {kind}: {len(items)} x {reason}: {shown}")
        else:
            lines.append("everything matched.")
        return "\n".join(lines)


def _walk(folders: Sequence, want) -> list[Path]:
    out = []
    for folder in folders:
        folder = Path(folder)
        if folder.is_file():
            out.append(folder)
            continue
        if not folder.is_dir():
            raise FileNotFoundError(f"folder not found: {str(folder)!r}.")
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "logs")
            out.extend(Path(root) / f for f in sorted(files) if want(f))
    return out


def _is_slide(name: str) -> bool:
    return name.lower().endswith(SLIDE_SUFFIXES) and not name.startswith(".")


def _is_rna_candidate(name: str) -> bool:
    low = name.lower()
    return (not name.startswith(".") and low not in _IGNORED_NAMES and not low.endswith(_IGNORED_SUFFIXES)
            and low.endswith(RNA_SUFFIXES))


def _stem(path: Path) -> str:
    """`TCGA-...-DX1.<uuid>.svs` -> `TCGA-...-DX1.<uuid>` (the name `mstar-hf extract` gives its h5)."""
    return path.stem


@dataclass
class _Item:
    path: Path | None
    case_id: str
    sample_id: str | None
    sample_type: int | None
    tissue: str | None
    project_id: str | None
    row_id: str | None = None  # a sample column of the RNA matrix


def _identify(path: Path, sheet: dict, kind: str, unmatched: list, include_normal: bool) -> _Item | None:
    record = sheet.get(path.name)
    if record is not None:
        if record.problem:
            unmatched.append(Unmatched(kind, str(path), record.problem))
            return None
        barcode = parse_barcode(record.sample_id or "") or parse_barcode(path.name)
        case_id, sample_id, project = record.case_id, record.sample_id, record.project_id
    else:
        barcode = parse_barcode(path.name)
        if barcode is None:
            where = "a sample sheet" if sheet else "a sample sheet (none given)"
            unmatched.append(Unmatched(kind, str(path), f"no TCGA barcode in its name and not in {where}"))
            return None
        case_id, sample_id, project = barcode.patient, barcode.sample, None
    item = _Item(path, case_id, sample_id or (barcode.sample if barcode else None),
                 barcode.sample_type if barcode else None, barcode.tissue if barcode else None, project)
    if item.tissue in ("normal", "control") and not include_normal:
        unmatched.append(Unmatched(kind, str(path), f"{item.tissue} tissue (sample type {item.sample_type:02d}); "
                                                    f"pass --include-normal to keep it"))
        return None
    return item


def _pick_rna(slide: _Item, candidates: list[_Item]) -> tuple[_Item | None, str]:
    """The slide's RNA: same sample type first, then any tumour sample of the patient (or, without
    barcodes, the case's only profile)."""
    if not candidates:
        return None, ""
    ordered = sorted(candidates, key=lambda c: (c.sample_id or "", str(c.path or ""), c.row_id or ""))
    if slide.sample_type is not None:
        same = [c for c in ordered if c.sample_type == slide.sample_type]
        if same:
            return same[0], "sample type"
        tumour = [c for c in ordered if c.tissue in ("tumor", None)]
        if slide.tissue == "tumor" and tumour:
            return tumour[0], "patient"
        return None, ""
    return ordered[0], "case"


def _relative(path: Path | None, base: Path) -> str:
    if path is None:
        return ""
    try:
        return os.path.relpath(Path(path).resolve(), base.resolve())
    except ValueError:  # another drive (Windows)
        return str(Path(path).resolve())


def assign_splits(case_types: dict[str, str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Case-level train / val / test, stratified by cancer type: per type, round(fraction x cases)
    cases (at least one when the fraction is > 0 and the type has 3+ cases) go to val and test."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) "
                         f"and sum to less than 1.")
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[str]] = defaultdict(list)
    for case, ctype in sorted(case_types.items()):
        by_type[ctype].append(case)
    out = {}
    for ctype in sorted(by_type):
        cases = by_type[ctype]
        order = [cases[i] for i in rng.permutation(len(cases))]

        def count(fraction):
            n = int(round(fraction * len(cases)))
            return max(n, 1) if fraction > 0 and len(cases) >= 3 else n

        n_val, n_test = count(val_fraction), count(test_fraction)
        for i, case in enumerate(order):
            out[case] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return out


def vocabulary_from_profiles(profiles: Sequence, max_genes: int | None = None) -> list[str]:
    """Genes measured in every profile (pandas Series; a (gene_id, gene_name) or (gene_name, entrez)
    MultiIndex is reduced to its gene names, as the mSTAR vocabulary is gene symbols), ranked by the
    variance of their log1p values across the profiles; the `max_genes` most variable, sorted by name."""
    import pandas as pd

    frames = []
    for series in profiles:
        if isinstance(series.index, pd.MultiIndex):
            names = series.index.names
            level = "gene_name" if "gene_name" in names else ("hugo_symbol" if "hugo_symbol" in names else 0)
            series = pd.Series(series.to_numpy(), index=series.index.get_level_values(level))
        series = series[series.index.astype(str).str.strip() != ""]
        frames.append(series.groupby(level=0).sum())
    if not frames:
        raise ValueError("no RNA profile to build a gene vocabulary from.")
    table = pd.concat(frames, axis=1, join="inner")
    if table.shape[0] == 0:
        raise ValueError("the RNA profiles share no gene: cannot build a gene vocabulary.")
    variance = np.log1p(table.clip(lower=0).to_numpy(dtype=np.float64)).var(axis=1)
    order = np.lexsort((table.index.astype(str), -variance))
    keep = order[: max_genes] if max_genes else order
    return sorted(str(g) for g in table.index[keep])


def build_cohort(
    out: str | os.PathLike,
    *,
    slides: Sequence = (),
    rna: Sequence = (),
    rna_matrix: str | os.PathLike | None = None,
    sample_sheets: Sequence = (),
    reports: Sequence = (),
    clinical: Sequence = (),
    features_dir: str | os.PathLike | None = None,
    cancer_type: str = "project",
    label: str | None = None,
    rna_value_column: str | None = None,
    include_normal: bool = False,
    keep_cases_without_slide: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    gene_vocab: str | os.PathLike | None = None,
    max_genes: int | None = None,
    vocab_profiles: int = 200,
) -> CohortBuild:
    """Match slides, RNA, reports and clinical data by case and write `out/manifest.csv`,
    `out/unmatched.tsv` and (with RNA) `out/gene_vocab.json`. See the module docstring.

    Args:
        cancer_type: "project" (the GDC project without its `TCGA-` prefix: BRCA, KIRC, ...) or a
            column of the clinical table.
        label: "project" or a column of the clinical table (e.g. `ajcc_pathologic_stage`); None = no label.
        rna_value_column: the value column of the RNA files (GDC STAR counts default `tpm_unstranded`).
        gene_vocab: a vocabulary file to copy; without it, one is built from up to `vocab_profiles`
            RNA profiles (`vocabulary_from_profiles`, `max_genes`) unless `out/gene_vocab.json` exists.
    """
    from .rna import DEFAULT_STAR_VALUE_COLUMN, read_expression_file, read_expression_matrix, read_gene_vocab

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    features_dir = Path(features_dir) if features_dir is not None else out / "features"
    if not slides and not keep_cases_without_slide:
        raise ValueError("build_cohort needs slide folders (or keep_cases_without_slide=True).")
    unmatched: list[Unmatched] = []

    sheet: dict = {}
    for path in sample_sheets:
        sheet.update(read_sample_sheet(path))
    clinical_records: dict = {}
    for path in clinical:
        clinical_records.update(read_clinical(path))
    report_texts: dict[str, str] = {}
    for path in reports:
        texts, problems = read_reports_csv(path)
        report_texts.update(texts)
        unmatched.extend(Unmatched("report", item, reason) for item, reason in problems)
    project_of_case = {r.case_id: r.project_id for r in sheet.values() if r.project_id and not r.problem}
    for case, record in clinical_records.items():
        if record.project_id:
            project_of_case.setdefault(case, record.project_id)

    # Slides.
    slide_items: list[_Item] = []
    seen_stems: dict[str, Path] = {}
    found_names = set()
    for path in _walk(slides, _is_slide):
        found_names.add(path.name)
        if _stem(path) in seen_stems:
            unmatched.append(Unmatched("slide", str(path), f"same file name as {seen_stems[_stem(path)]} "
                                                           f"(slide ids and feature files would collide)"))
            continue
        item = _identify(path, sheet, "slide", unmatched, include_normal)
        if item is not None:
            seen_stems[_stem(path)] = path
            slide_items.append(item)

    # RNA files and matrix samples.
    rna_by_case: dict[str, list[_Item]] = defaultdict(list)
    for path in _walk(rna, lambda name: _is_rna_candidate(name) or name in sheet):
        found_names.add(path.name)
        item = _identify(path, sheet, "rna", unmatched, include_normal)
        if item is not None:
            rna_by_case[item.case_id].append(item)
    matrix_path = Path(rna_matrix) if rna_matrix is not None else None
    if matrix_path is not None:
        frame = read_expression_matrix(matrix_path)
        for row_id in frame.index:
            barcode = parse_barcode(row_id)
            item = _Item(None, barcode.patient if barcode else str(row_id), barcode.sample if barcode else None,
                         barcode.sample_type if barcode else None, barcode.tissue if barcode else None, None,
                         row_id=str(row_id))
            if item.tissue in ("normal", "control") and not include_normal:
                unmatched.append(Unmatched("rna", f"{matrix_path}[{row_id}]",
                                           f"{item.tissue} tissue (sample type {item.sample_type:02d}); pass "
                                           f"--include-normal to keep it"))
                continue
            rna_by_case[item.case_id].append(item)
    for name, record in sorted(sheet.items()):
        if name not in found_names and not record.problem:
            kind = "slide" if name.lower().endswith(SLIDE_SUFFIXES) else "rna"
            folders = slides if kind == "slide" else rna
            if folders:
                unmatched.append(Unmatched("sample_sheet", name, f"listed in the sample sheet but not found under "
                                                                 f"the {kind} folder(s)"))

    # Rows.
    def cancer_type_of(case, project):
        if cancer_type == "project":
            return (project or "").removeprefix("TCGA-")
        record = clinical_records.get(case)
        return "" if record is None else str((record.values or {}).get(normalise_column(cancer_type), "")).strip()

    def label_of(case, project):
        if label is None:
            return ""
        if label == "project":
            return project or ""
        record = clinical_records.get(case)
        value = "" if record is None else str((record.values or {}).get(normalise_column(label), "")).strip()
        return "" if is_missing(value) else value

    rows = []
    slide_cases = set()
    used_rna: set[int] = set()
    for item in sorted(slide_items, key=lambda i: (i.case_id, i.path.name)):
        slide_cases.add(item.case_id)
        project = item.project_id or project_of_case.get(item.case_id)
        rna_item, _ = _pick_rna(item, rna_by_case.get(item.case_id, []))
        if rna_item is not None:
            used_rna.add(id(rna_item))
        row = {"case_id": item.case_id, "slide_id": _stem(item.path),
               "cancer_type": cancer_type_of(item.case_id, project),
               "features_path": _relative(features_dir / f"{_stem(item.path)}.h5", out),
               "slide_path": _relative(item.path, out), "sample_id": item.sample_id or "", "project_id": project or ""}
        rows.append((row, rna_item))
    if keep_cases_without_slide:
        for case in sorted(set(rna_by_case) | set(report_texts)):
            if case in slide_cases:
                continue
            project = project_of_case.get(case)
            candidates = [c for c in rna_by_case.get(case, []) if c.tissue in ("tumor", None)]
            candidates.sort(key=lambda c: (c.sample_id or "", str(c.path or "")))
            rna_item = candidates[0] if candidates else None
            if rna_item is not None:
                used_rna.add(id(rna_item))
            rows.append(({"case_id": case, "slide_id": case, "cancer_type": cancer_type_of(case, project),
                          "features_path": "", "slide_path": "", "sample_id": "", "project_id": project or ""},
                         rna_item))
    manifest_cases = {row["case_id"] for row, _ in rows}
    for case, items in sorted(rna_by_case.items()):
        for item in items:
            if id(item) in used_rna:
                continue
            what = str(item.path) if item.path is not None else f"{matrix_path}[{item.row_id}]"
            reason = ("the patient has no slide" if case not in manifest_cases
                      else "another RNA sample of the patient was used (same sample type first)")
            unmatched.append(Unmatched("rna", what, reason))
    for case in sorted(set(report_texts) - manifest_cases):
        unmatched.append(Unmatched("report", case, "the patient has no slide"))

    finished = []
    for row, rna_item in rows:
        case = row["case_id"]
        if rna_item is not None and rna_item.path is not None:
            row["rna_path"] = _relative(rna_item.path, out)
            star = rna_item.path.name.endswith(STAR_COUNTS_SUFFIX)
            row["rna_value_column"] = rna_value_column or (DEFAULT_STAR_VALUE_COLUMN if star else "")
        elif rna_item is not None:
            row["rna_matrix_path"] = _relative(matrix_path, out)
            row["rna_row_id"] = rna_item.row_id
        row["rna_sample_id"] = (rna_item.sample_id or "") if rna_item is not None else ""
        row["report"] = report_texts.get(case, "")
        record = clinical_records.get(case)
        if clinical:
            if record is None:
                unmatched.append(Unmatched("clinical", case, "no row in the clinical table(s): no survival"))
            elif record.problem:
                unmatched.append(Unmatched("clinical", case, record.problem))
        row["time"] = "" if record is None or record.time is None else f"{record.time:g}"
        row["event"] = "" if record is None or record.event is None else str(record.event)
        row["label"] = label_of(case, row["project_id"])
        if not row["cancer_type"]:
            unmatched.append(Unmatched("slide", row["slide_id"], f"no cancer type ({cancer_type})"))
        finished.append(row)
    # one entry per case, not one per slide of the case
    unmatched = list({(u.kind, u.item, u.reason): u for u in unmatched}.values())

    case_types = {row["case_id"]: row["cancer_type"] for row in finished}
    splits = assign_splits(case_types, val_fraction, test_fraction, seed) if (val_fraction or test_fraction) else {}
    for row in finished:
        row["split"] = splits.get(row["case_id"], "")

    columns = [c for c in MANIFEST_COLUMNS if c in _REQUIRED or any(row.get(c, "") != "" for row in finished)]
    if "rna_matrix_path" in columns and "rna_row_id" not in columns:
        columns.append("rna_row_id")
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in columns} for row in finished)
    with open(out / "unmatched.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["kind", "item", "reason"])
        writer.writerows((u.kind, u.item, u.reason) for u in unmatched)

    vocab_path = None
    if gene_vocab is not None:
        vocab_path = out / "gene_vocab.json"
        genes = read_gene_vocab(gene_vocab)
        if Path(gene_vocab).resolve() != vocab_path.resolve():
            vocab_path.write_text(json.dumps(genes))
    elif any(r.get("rna_path") or r.get("rna_row_id") for r in finished):
        vocab_path = out / "gene_vocab.json"
        if not vocab_path.is_file():
            with_rna = [r for r in finished if r.get("rna_path") or r.get("rna_row_id")]
            picks = np.unique(np.linspace(0, len(with_rna) - 1, min(vocab_profiles, len(with_rna))).round().astype(int))
            profiles = []
            for i in picks:
                r = with_rna[i]
                if r.get("rna_path"):
                    profiles.append(read_expression_file(out / r["rna_path"], case_id=r["case_id"],
                                                         value_column=r.get("rna_value_column") or None))
                else:
                    from .rna import read_expression_row

                    profiles.append(read_expression_row(out / r["rna_matrix_path"], r["rna_row_id"], r["case_id"]))
            vocab_path.write_text(json.dumps(vocabulary_from_profiles(profiles, max_genes)))
    return CohortBuild(manifest=manifest, rows=finished, unmatched=unmatched, gene_vocab=vocab_path)


__all__ = ["CohortBuild", "Unmatched", "assign_splits", "build_cohort", "vocabulary_from_profiles"]
