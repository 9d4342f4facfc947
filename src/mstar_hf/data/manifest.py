"""Cohort manifests: one row per slide-level modality pair, loaded as a `datasets.Dataset`.

Columns (CSV, TSV or Parquet):

=================  ========  =================================================================
column             required  meaning
=================  ========  =================================================================
case_id            yes       patient/case id (a case may have several slides, one row each)
slide_id           yes       unique per row
cancer_type        yes       cancer type name; empty = unknown (`cancer_type_id` -1)
features_path      yes       h5 with `coords` (N,2) and `features` (N,D) from `mstar-hf extract`;
                             empty = the case has no slide
slide_path         no        the WSI itself (not read here)
report             no        report text; empty = no report
report_path        no        a text file holding the report (read when `report` is empty)
rna_path           no        per-case expression file (CSV/TSV gene,value, GDC STAR counts, legacy
                             RSEM `genes.normalized_results`); empty = no RNA
rna_value_column   no        the value column of `rna_path` (e.g. `tpm_unstranded` of a GDC
                             STAR-counts file; empty = the reader's default)
rna_matrix_path    no        expression matrix (rows = samples) ...
rna_row_id         no        ... and the row of this case
label              no        any label (int if all values are integers, else str)
time, event        no        survival: time >= 0, event 0/1
split              no        train / val / test ("valid", "validation" -> "val")
=================  ========  =================================================================

Any other column (e.g. `sample_id`, `project_id` written by `mstar-hf build-cohort`) is kept as a
string column. Reports are cleaned (`clean_reports=True`, see `report_cleaning.clean_report`): OCR
noise, barcodes and page headers dropped, diagnosis sections first.

Relative paths are resolved against the manifest's folder. Patch features are *not* stored in the
dataset: `CohortTorchDataset` / `MStarDataCollator` read them from the h5 when an item is used.
`cancer_type_id` is a `ClassLabel` over the sorted cancer types, so the names travel with
`save_to_disk` / `load_from_disk`.

A cancer type seen in only one case is allowed (a warning says so): the inter-cancer triplet loss then
has no positive for that case, which only serves as a negative for the others.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

from .report_cleaning import clean_report

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("case_id", "slide_id", "cancer_type", "features_path")
PATH_COLUMNS = ("features_path", "slide_path", "report_path", "rna_path", "rna_matrix_path")
STRING_COLUMNS = REQUIRED_COLUMNS + ("slide_path", "report", "report_path", "rna_path", "rna_matrix_path",
                                     "rna_row_id", "rna_value_column", "split")
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}
_MAX_LISTED = 10


class ManifestError(ValueError):
    """A problem with a cohort manifest; the message names the manifest and the case(s)."""


def _listed(cases: Sequence[str]) -> str:
    shown = ", ".join(repr(c) for c in cases[:_MAX_LISTED])
    return shown + (f", ... ({len(cases)} in all)" if len(cases) > _MAX_LISTED else "")


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def read_manifest_table(manifest_path: str | os.PathLike):
    """Read the raw manifest as a pandas DataFrame of strings ("" for empty cells)."""
    import pandas as pd

    path = os.fspath(manifest_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path!r}.")
    lower = path.lower()
    if lower.endswith(".parquet"):
        frame = pd.read_parquet(path)
        frame = frame.astype(object).where(frame.notna(), "")
        frame = frame.map(lambda v: v if isinstance(v, str) else ("" if _blank(v) else str(v)))
    else:
        sep = "\t" if lower.endswith((".tsv", ".tab")) else ","
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _resolve(base: str, value: str) -> str | None:
    if _blank(value):
        return None
    value = os.path.expanduser(str(value).strip())
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _number(value, column: str, case_id: str, manifest: str) -> float | None:
    if _blank(value):
        return None
    try:
        return float(value)
    except ValueError:
        raise ManifestError(f"manifest {manifest!r}: case {case_id!r} has a non-numeric {column} {value!r}.") from None


def read_report_file(path: str, case_id: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"report file not found (case {case_id!r}, file {path!r}).")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def load_cohort(
    manifest_path: str | os.PathLike,
    *,
    check_files: bool = True,
    strict_reports: bool = False,
    cancer_types: Sequence[str] | None = None,
    clean_reports: bool = True,
):
    """Load a cohort manifest as a `datasets.Dataset` (one row per slide).

    Args:
        manifest_path: CSV / TSV / Parquet manifest (see the module docstring for the columns).
        check_files: check now that every referenced features / RNA file exists (errors list the
            cases). Pass False to load a cohort whose features are not extracted yet.
        strict_reports: raise on whitespace-only reports (default: they count as missing).
        cancer_types: fix the list (and so the ids) of cancer types, e.g. those a model was
            trained on; types not in it get id -1 with a warning. Default: sorted types of the manifest.
        clean_reports: clean OCR'd reports (`clean_report`: headers, barcodes, UUIDs, redaction marks
            and OCR noise dropped, diagnosis sections first); a clean report is left as it is, a
            report that is all noise counts as missing (with a warning).

    Returns:
        A `datasets.Dataset` with columns case_id, slide_id, cancer_type, cancer_type_id (ClassLabel,
        -1 = unknown), features_path, slide_path, report, report_path, rna_path, rna_matrix_path,
        rna_row_id, label, time, event, split (absent optional columns are all None), then any extra
        manifest columns as strings. Paths are absolute.
    """
    import datasets

    manifest = os.path.abspath(os.fspath(manifest_path))
    base = os.path.dirname(manifest)
    frame = read_manifest_table(manifest)

    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(
            f"manifest {manifest!r} is missing required column(s) {missing}; found {list(frame.columns)}."
        )
    if "rna_matrix_path" in frame.columns and "rna_row_id" not in frame.columns:
        raise ManifestError(f"manifest {manifest!r} has 'rna_matrix_path' but no 'rna_row_id' column.")
    if not any(c in frame.columns for c in ("report", "report_path", "rna_path", "rna_matrix_path")):
        logger.warning("Manifest %s has no report or RNA column: every case has the slide only.", manifest)
    if len(frame) == 0:
        raise ManifestError(f"manifest {manifest!r} has no rows.")

    def col(name):
        return frame[name].tolist() if name in frame.columns else [""] * len(frame)

    case_ids = [str(c).strip() for c in col("case_id")]
    slide_ids = [str(s).strip() for s in col("slide_id")]
    for i, (case_id, slide_id) in enumerate(zip(case_ids, slide_ids)):
        if not case_id:
            raise ManifestError(f"manifest {manifest!r}: row {i} (slide {slide_id!r}) has an empty case_id.")
        if not slide_id:
            raise ManifestError(f"manifest {manifest!r}: row {i} (case {case_id!r}) has an empty slide_id.")
    seen, dup = {}, []
    for case_id, slide_id in zip(case_ids, slide_ids):
        if slide_id in seen:
            dup.append(f"{slide_id} (cases {seen[slide_id]!r} and {case_id!r})")
        seen[slide_id] = case_id
    if dup:
        raise ManifestError(f"manifest {manifest!r}: duplicated slide_id {_listed(dup)}.")

    # Cancer types and their ids.
    types = [None if _blank(t) else str(t).strip() for t in col("cancer_type")]
    if cancer_types is None:
        names = sorted({t for t in types if t is not None})
    else:
        names = [str(t) for t in cancer_types]
        unknown = sorted({t for t in types if t is not None and t not in names})
        if unknown:
            logger.warning("Manifest %s: cancer types %s are not in the given cancer_types: their cases get id -1.",
                           manifest, unknown)
    index = {t: i for i, t in enumerate(names)}
    type_ids = [index.get(t, -1) if t is not None else -1 for t in types]
    counts = {}
    for case_id, t in zip(case_ids, types):
        if t is not None:
            counts.setdefault(t, set()).add(case_id)
    singles = sorted(t for t, cases in counts.items() if len(cases) == 1)
    if singles:
        logger.warning(
            "Manifest %s: cancer type(s) %s have a single case: the triplet loss has no positive for them "
            "(their cases only serve as negatives).", manifest, singles)

    # Paths, reports, RNA.
    features_paths = [_resolve(base, v) for v in col("features_path")]
    slide_paths = [_resolve(base, v) for v in col("slide_path")]
    report_paths = [_resolve(base, v) for v in col("report_path")]
    rna_paths = [_resolve(base, v) for v in col("rna_path")]
    matrix_paths = [_resolve(base, v) for v in col("rna_matrix_path")]
    row_ids = [None if _blank(v) else str(v).strip() for v in col("rna_row_id")]
    reports, noise_only, cleaned = [], [], {}
    for case_id, text, rpath in zip(case_ids, col("report"), report_paths):
        if _blank(text) and rpath is not None:
            text = read_report_file(rpath, case_id)
        if isinstance(text, str) and text and not text.strip():
            if strict_reports:
                raise ManifestError(f"manifest {manifest!r}: report of case {case_id!r} is empty (whitespace only).")
        elif clean_reports and isinstance(text, str) and text:
            # the slides of a case share its report: clean each text once (~10 ms per OCR'd report)
            if text not in cleaned:
                cleaned[text] = clean_report(text)
            text = cleaned[text]
            if not text:
                noise_only.append(case_id)
        reports.append(None if (text is None or text == "") else str(text))
    if noise_only:
        logger.warning("Manifest %s: the report(s) of case(s) %s hold nothing but OCR noise / headers: treated as "
                       "missing.", manifest, _listed(noise_only))
    for case_id, rpath, mpath, rid in zip(case_ids, rna_paths, matrix_paths, row_ids):
        if rpath is not None and mpath is not None:
            raise ManifestError(f"manifest {manifest!r}: case {case_id!r} has both rna_path and rna_matrix_path.")
        if mpath is not None and rid is None:
            raise ManifestError(f"manifest {manifest!r}: case {case_id!r} has rna_matrix_path but no rna_row_id.")

    no_modality = [c for c, fp, rep, rp, mp in zip(case_ids, features_paths, reports, rna_paths, matrix_paths)
                   if fp is None and (rep is None or not rep.strip()) and rp is None and mp is None]
    if no_modality:
        raise ManifestError(f"manifest {manifest!r}: case(s) {_listed(no_modality)} have no slide features, "
                            f"report or RNA.")

    if check_files:
        for what, paths in (("features file", features_paths), ("RNA file", rna_paths),
                            ("RNA matrix", matrix_paths)):
            absent = [f"{c} ({p})" for c, p in zip(case_ids, paths) if p is not None and not os.path.isfile(p)]
            if absent:
                raise FileNotFoundError(
                    f"manifest {manifest!r}: {what} missing for case(s) {_listed(absent)}"
                    + (" (run `mstar-hf extract` first, or load with check_files=False)."
                       if what == "features file" else ".")
                )

    # Survival, split, label.
    times = [_number(v, "time", c, manifest) for v, c in zip(col("time"), case_ids)]
    events = [_number(v, "event", c, manifest) for v, c in zip(col("event"), case_ids)]
    for case_id, t, e in zip(case_ids, times, events):
        if t is not None and (not math.isfinite(t) or t < 0):
            raise ManifestError(f"manifest {manifest!r}: case {case_id!r} has time {t} (must be finite and >= 0).")
        if e is not None and e not in (0.0, 1.0):
            raise ManifestError(f"manifest {manifest!r}: case {case_id!r} has event {e} (must be 0 or 1).")
    splits = []
    for case_id, s in zip(case_ids, col("split")):
        if _blank(s):
            splits.append(None)
            continue
        key = _SPLIT_ALIASES.get(str(s).strip().lower())
        if key is None:
            raise ManifestError(f"manifest {manifest!r}: case {case_id!r} has split {s!r} (use one of {SPLITS}).")
        splits.append(key)
    labels = [None if _blank(v) else str(v).strip() for v in col("label")]
    int_labels = all(v is None or _is_int(v) for v in labels) and any(v is not None for v in labels)
    if int_labels:
        labels = [None if v is None else int(v) for v in labels]

    data = {
        "case_id": case_ids,
        "slide_id": slide_ids,
        "cancer_type": types,
        "cancer_type_id": type_ids,
        "features_path": features_paths,
        "slide_path": slide_paths,
        "report": reports,
        "report_path": report_paths,
        "rna_path": rna_paths,
        "rna_matrix_path": matrix_paths,
        "rna_row_id": row_ids,
        "rna_value_column": [None if _blank(v) else str(v).strip() for v in col("rna_value_column")],
        "label": labels,
        "time": times,
        "event": [None if e is None else int(e) for e in events],
        "split": splits,
    }
    string = datasets.Value("string")
    features = {k: string for k in data}
    features.update({
        "cancer_type_id": datasets.ClassLabel(names=names) if names else datasets.Value("int64"),
        "label": datasets.Value("int64") if int_labels else string,
        "time": datasets.Value("float64"),
        "event": datasets.Value("int64"),
    })
    for extra in frame.columns:
        if extra not in data:
            data[extra] = [str(v) for v in frame[extra].tolist()]
            features[extra] = string
    dataset = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    dataset.info.description = f"mSTAR cohort from {manifest}"
    return dataset


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def cohort_cancer_types(dataset) -> list[str]:
    """The sorted cancer type names behind `cancer_type_id` (index = id)."""
    feature = dataset.features["cancer_type_id"]
    return list(getattr(feature, "names", []))


def split_cohort(dataset):
    """A `datasets.DatasetDict` with one dataset per value of the `split` column (rows without a
    split are left out)."""
    import datasets

    splits = dataset["split"]
    if all(s is None for s in splits):
        raise ManifestError("the cohort has no split column / values.")
    out = {}
    for name in SPLITS:
        rows = [i for i, s in enumerate(splits) if s == name]
        if rows:
            out[name] = dataset.select(rows)
    return datasets.DatasetDict(out)


def load_case_rna(example: dict):
    """The RNA profile of a dataset row as a pandas Series, or None when the case has none."""
    from .rna import read_expression_file, read_expression_row

    if example.get("rna_path"):
        return read_expression_file(example["rna_path"], case_id=example.get("case_id"),
                                    value_column=example.get("rna_value_column") or None)
    if example.get("rna_matrix_path"):
        return read_expression_row(example["rna_matrix_path"], example["rna_row_id"], case_id=example.get("case_id"))
    return None


__all__ = [
    "ManifestError",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "cohort_cancer_types",
    "load_case_rna",
    "load_cohort",
    "read_manifest_table",
    "split_cohort",
]
