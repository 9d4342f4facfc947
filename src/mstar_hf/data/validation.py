"""One pass over a cohort before any training step: every case's files are opened and checked, and all
problems come back together (`mstar-hf validate`, and the start of every training entry point).

A run on 26k slides should not die hours in on the first NaN row or truncated h5, and it should not stop
at the first bad case either: the user gets one table of everything to fix, or (`--skip_bad_cases`) a
`failures.csv` of the cases left out.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass

FAILURE_COLUMNS = ("case_id", "slide_id", "file", "problem")


@dataclass
class CaseProblem:
    """One bad case: which case/slide, which file, what is wrong with it."""

    case_id: str
    slide_id: str
    file: str
    problem: str


def _check_features(path: str, case_id: str, feature_dim: int | None) -> str | None:
    from .features import read_slide_features

    try:
        read_slide_features(path, case_id=case_id, expected_dim=feature_dim)
    except FileNotFoundError:
        return "features file not found"
    except (OSError, KeyError, ValueError) as err:
        message = str(err)
        # the reader's messages end with "(case ..., file ...)": the table has its own columns for that
        return message.split(" (case ")[0] if " (case " in message else message
    return None


def _check_rna(example: dict, gene_vocab) -> tuple[str, str] | None:
    from .manifest import load_case_rna

    source = example.get("rna_path") or example.get("rna_matrix_path") or ""
    try:
        series = load_case_rna(example)
    except FileNotFoundError:
        return source, "RNA file not found"
    except Exception as err:  # noqa: BLE001 - any reader error is this case's problem, reported with its file
        return source, f"RNA not readable: {err}"
    if series is None:
        return None
    import numpy as np

    values = np.asarray(series.to_numpy(), dtype=np.float64) if len(series) else np.zeros(0)
    if len(values) == 0:
        return source, "RNA profile is empty"
    bad = int((~np.isfinite(values)).sum())
    if bad:
        return source, f"RNA has {bad} NaN/inf value(s)"
    if gene_vocab is not None:
        from .rna import vocabulary_matches  # GDC/RSEM files: (id, symbol) index, versioned ids

        known = vocabulary_matches(series, gene_vocab)
        if known == 0:
            return source, "RNA shares no gene with the gene vocabulary"
    return None


def validate_cohort(
    dataset,
    *,
    feature_dim: int | None = None,
    gene_vocab=None,
    need_features: bool = False,
    need_report: bool = False,
    label_column: str | None = None,
    progress: bool = True,
) -> list[CaseProblem]:
    """Checks every row of a cohort (`load_cohort(..., check_files=False)`); returns all problems found.

    Per row: the features h5 opens, has a 2-D `features` of width `feature_dim` with patches and no
    NaN/inf rows (the whole array is read); the RNA file (or matrix row) parses and is finite; a report
    that was given (a `report_path`, or report text) is not empty; `label_column` is present when asked.
    `need_features` / `need_report`: a row without that modality is a problem too (report generation
    needs both; Stage 1 masks missing modalities instead).
    """
    from tqdm.auto import tqdm

    vocab = set(gene_vocab) if gene_vocab is not None else None
    problems: list[CaseProblem] = []
    for example in tqdm(dataset, desc="checking cases", unit="case", disable=not progress, leave=False):
        case_id, slide_id = str(example["case_id"]), str(example["slide_id"])

        def bad(file, problem):
            problems.append(CaseProblem(case_id, slide_id, str(file or ""), problem))

        features = example.get("features_path")
        if features:
            problem = _check_features(features, case_id, feature_dim)
            if problem:
                bad(features, problem)
        elif need_features:
            bad("", "no features_path (no slide)")
        report, report_path = example.get("report"), example.get("report_path")
        if (report_path or report is not None) and (report is None or not str(report).strip()):
            bad(report_path, "empty report")
        elif need_report and report is None:
            bad("", "no report")
        rna = _check_rna(example, vocab)
        if rna:
            bad(*rna)
        if label_column:
            value = example.get(label_column)
            if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
                bad("", f"no value in the label column {label_column!r}")
    return problems


def problems_table(problems: list[CaseProblem], limit: int = 50) -> str:
    """A plain-text table of problems (case, slide, file, problem), at most `limit` rows shown."""
    rows = [("case", "slide", "file", "problem")] + [(p.case_id, p.slide_id, p.file, p.problem) for p in problems[:limit]]
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(3)]
    lines = ["  ".join(v[:60].ljust(w) for v, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    if len(problems) > limit:
        lines.append(f"... {len(problems) - limit} more (all of them in failures.csv)")
    return "\n".join(lines)


def write_failures(path: str | os.PathLike, problems: list[CaseProblem]) -> str:
    """`failures.csv` (case_id, slide_id, file, problem): the cases left out of a run and why."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, FAILURE_COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(p) for p in problems)
    return path


class CohortError(ValueError):
    """Bad cases found before training; the message holds the table of all of them."""


def check_cohort_or_skip(dataset, *, manifest: str, skip_bad_cases: bool, failures_csv: str | None, **checks):
    """Validates `dataset`; with problems, raises `CohortError` listing all of them, or (`skip_bad_cases`)
    writes `failures_csv` and returns the dataset without the bad rows. Returns (dataset, problems)."""
    problems = validate_cohort(dataset, **checks)
    if not problems:
        return dataset, problems
    if failures_csv:
        write_failures(failures_csv, problems)
    table = problems_table(problems)
    if all(p.problem.startswith("wrong feature width") for p in problems) and len(problems) == len(dataset):
        table += ("\nEvery case has the wrong width: the features come from another patch encoder than the "
                  "model's (wrong --patch_model_name_or_path or checkpoint?).")
    bad_slides = {p.slide_id for p in problems}
    if not skip_bad_cases:
        raise CohortError(
            f"{manifest}: {len(bad_slides)} bad case(s), nothing was trained (fix them, or pass --skip_bad_cases "
            f"true to leave them out{f'; listed in {failures_csv}' if failures_csv else ''}):\n{table}"
        )
    keep = [i for i, s in enumerate(dataset["slide_id"]) if s not in bad_slides]
    import logging

    logging.getLogger(__name__).warning("%s: leaving out %d bad case(s) (listed in %s):\n%s", manifest,
                                        len(bad_slides), failures_csv, table)
    return dataset.select(keep), problems


__all__ = ["CaseProblem", "CohortError", "check_cohort_or_skip", "problems_table", "validate_cohort",
           "write_failures"]
