"""Turning out-of-fold predictions into results, as papers report them: per-case scores, the primary
figure per metric, bootstrap CIs over cases, paired comparisons of feature sets, a printed table with a
split notice, `results.json` and a predictions CSV.

Cases, not slides, are the unit (`mstar_hf.data.cases`):
- per-case predictions are the mean of the case's slides' predictions (class probabilities, or risk); the
  truth of a case is its slides' label (or time and event), which must agree across its slides;
- bootstrap CIs and paired tests resample cases (`level="slide"` scores slides but still resamples cases);
- the primary figure of a metric is its mean +- std over folds (k-fold), or with a single (fixed) test
  split the split's value with its case-bootstrap 95% CI; the metric of all out-of-fold predictions
  pooled across fold models is a different quantity and is reported beside it, labelled "pooled".
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

from ..data.cases import aggregate_by_case, case_groups, first_row_per_case
from .bootstrap import DEFAULT_BOOTSTRAP, bootstrap_ci, paired_bootstrap
from .cohort import TaskData

# a test side smaller than this gets a warning: its metrics are too uncertain to rank models on
MIN_TEST_CASES = 20
LEVELS = ("case", "slide")


def metric_fn(task: str):
    if task == "classification":
        from .classification import classification_metrics

        return classification_metrics
    from .survival import survival_metrics

    return survival_metrics


def batched_metric_fn(task: str):
    """The vectorised bootstrap twin of `metric_fn` (None: resample with `metric_fn` itself)."""
    if task == "classification":
        from .classification import classification_metrics_weighted

        return classification_metrics_weighted
    return None


def truth_of(data: TaskData, rows) -> tuple:
    rows = np.asarray(rows)
    if data.task == "classification":
        return (data.labels[rows],)
    return (data.times[rows], data.events[rows])


def prediction_of(task: str, preds: dict) -> np.ndarray:
    return preds["probs"] if task == "classification" else preds["risk"]


def case_level(data: TaskData, rows, preds: dict, fold=None) -> dict:
    """One row per case of the slides `rows`: `{"case_ids", "truth" (tuple), "prediction", "fold",
    "n_slides"}`; the prediction is the mean over the case's slides. Raises ValueError naming the cases
    whose slides disagree on the truth (a case-level score needs one label / time and event per case)."""
    rows = np.asarray(rows)
    case_ids = [data.case_ids[i] for i in rows]
    cases, inverse = case_groups(case_ids)
    truth = truth_of(data, rows)
    firsts = first_row_per_case(case_ids)
    bad = sorted({case_ids[j] for t in truth for j in np.flatnonzero(t != t[firsts][inverse])})
    if bad:
        what = "label" if data.task == "classification" else "time / event"
        raise ValueError(f"manifest {data.manifest!r}: case-level scoring needs one {what} per case, but the slides of "
                         f"case(s) {bad[:10]} disagree; fix the manifest or score slides (--score-level slide).")
    _, prediction = aggregate_by_case(case_ids, prediction_of(data.task, preds))
    out = {"case_ids": cases, "truth": tuple(aggregate_by_case(case_ids, t, how="first")[1] for t in truth),
           "prediction": prediction, "n_slides": np.bincount(inverse)}
    if fold is not None:
        out["fold"] = aggregate_by_case(case_ids, np.asarray(fold), how="first")[1]
    return out


def scored(data: TaskData, rows, preds: dict, fold, level: str
           ) -> tuple[tuple, np.ndarray, np.ndarray | None, list | None]:
    """(truth, prediction, fold, bootstrap groups) at `level`: per case (groups None, every row is a case) or
    per slide (groups: the case of each slide)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}.")
    if level == "case":
        c = case_level(data, rows, preds, fold)
        return c["truth"], c["prediction"], c.get("fold"), None
    rows = np.asarray(rows)
    return (truth_of(data, rows), prediction_of(data.task, preds), None if fold is None else np.asarray(fold),
            [data.case_ids[i] for i in rows])


def score_cases(data: TaskData, rows, preds: dict, level: str = "case") -> dict[str, float]:
    """The metrics of predictions for `rows`, per case (mean prediction of a case's slides) or per slide."""
    truth, prediction, _, _ = scored(data, rows, preds, None, level)
    return metric_fn(data.task)(*truth, prediction)


def summarize(data: TaskData, rows, preds: dict, fold_records: list[dict] | None = None,
              num_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, fold=None, level: str = "case") -> dict:
    """Metrics of out-of-fold predictions (`fold`: the fold of each row) at `level` ("case": one score per
    patient, the default; "slide"), with case-bootstrap 95% CIs.

    Returns `{"level", "n", "n_cases", "n_slides", "n_folds", "metrics" (pooled, with CIs), "pooled_label",
    "primary": {metric: {"value", "std" | None, "ci_low", "ci_high", "kind"}}, "fold_mean", "fold_std",
    "folds"}`. Per-fold test metrics are computed here at the same level (from `fold`), else taken from
    `fold_records[i]["test_metrics"]`.
    """
    fn = metric_fn(data.task)
    truth, prediction, fold_of, groups = scored(data, rows, preds, fold, level)
    metrics = bootstrap_ci(fn, *truth, prediction, num_samples=num_bootstrap, seed=seed,
                           batched_fn=batched_metric_fn(data.task), groups=groups)
    rows = np.asarray(rows)
    out = {"level": level, "n": int(len(prediction)), "n_cases": len({data.case_ids[i] for i in rows}),
           "n_slides": int(len(rows)), "metrics": metrics}
    per_fold = []
    if fold_of is not None:
        for k in np.unique(fold_of):
            sel = fold_of == k
            per_fold.append(fn(*(t[sel] for t in truth), prediction[sel]))
            if fold_records:
                for r in fold_records:
                    if r.get("fold") == int(k):
                        r["test_metrics"] = per_fold[-1]
                        r["test_level"] = level
    elif fold_records:
        per_fold = [r["test_metrics"] for r in fold_records if "test_metrics" in r]
    out["n_folds"] = max(1, len(per_fold))
    if per_fold:
        keys = per_fold[0].keys()
        out["fold_mean"] = {k: float(np.nanmean([f[k] for f in per_fold])) for k in keys}
        out["fold_std"] = {k: float(np.nanstd([f[k] for f in per_fold])) for k in keys}
    if fold_records:
        out["folds"] = fold_records
    if out["n_folds"] > 1:
        out["pooled_label"] = f"pooled out-of-fold ({level} level, {out['n_folds']} fold models)"
        out["primary"] = {k: {"value": out["fold_mean"][k], "std": out["fold_std"][k], "ci_low": None, "ci_high": None,
                              "kind": f"mean +- std over {out['n_folds']} folds ({level} level)"} for k in metrics}
    else:
        out["pooled_label"] = f"test split ({level} level)"
        out["primary"] = {k: {"value": v["value"], "std": None, "ci_low": v["ci_low"], "ci_high": v["ci_high"],
                              "kind": f"test split, case-bootstrap 95% CI ({level} level)"} for k, v in metrics.items()}
    return out


def compare(data: TaskData, rows, preds_a: dict, preds_b: dict, num_bootstrap: int = DEFAULT_BOOTSTRAP,
            seed: int = 0, level: str = "case") -> dict:
    """Paired case bootstrap of B against A on the same cases (per metric: delta b - a, CI, p-value), on the
    pooled out-of-fold predictions at `level`."""
    truth, a, _, groups = scored(data, rows, preds_a, None, level)
    _, b, _, _ = scored(data, rows, preds_b, None, level)
    return paired_bootstrap(metric_fn(data.task), truth, a, b, num_samples=num_bootstrap, seed=seed,
                            batched_fn=batched_metric_fn(data.task), groups=groups)


def split_notice(data: TaskData, folds, min_test_cases: int = MIN_TEST_CASES) -> dict:
    """What the figures rest on: `{"source", "sizes" (per fold: cases / slides per part), "warnings", "text"}`.
    Warns when a test side has fewer than `min_test_cases` cases or lacks a class."""
    if not folds:
        return {"source": "", "sizes": [], "warnings": [], "text": ""}
    source = folds[0].source or "folds"
    sizes = []
    for f in folds:
        size = {"fold": f.index}
        for name, idx in (("train", f.train), ("val", f.val), ("test", f.test)):
            size[f"{name}_cases"] = len({data.case_ids[i] for i in idx})
            size[f"{name}_slides"] = int(len(idx))
        sizes.append(size)
    single = len(folds) == 1
    warnings = []
    small = [s for s in sizes if s["test_cases"] < min_test_cases]
    if small:
        where = ("the test split has" if single else
                 f"the test side of fold(s) {[s['fold'] for s in small]} has")
        low, high = min(s["test_cases"] for s in small), max(s["test_cases"] for s in small)
        count = str(low) if low == high else f"{low}-{high}"
        warnings.append(f"{where} only {count} cases (< {min_test_cases}): its metrics are very uncertain")
    for f in folds:
        if f.absent_test_classes:
            where = "the test split" if single else f"fold {f.index}'s test side"
            warnings.append(f"{where} has no case of class(es) {f.absent_test_classes}")

    def part(name):
        def span(values):
            return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"
        cases, slides = span([s[f"{name}_cases"] for s in sizes]), span([s[f"{name}_slides"] for s in sizes])
        return f"{name} {cases} cases / {slides} slides" + ("" if single else " per fold")

    text = f"splits: {source}; {len(folds)} fold(s): " + ", ".join(part(n) for n in ("train", "val", "test"))
    text += "".join(f"\nwarning: {w}" for w in warnings)
    return {"source": source, "sizes": sizes, "warnings": warnings, "text": text}


def _cell(entry: dict) -> str:
    if entry is None or entry.get("value") is None or not math.isfinite(entry["value"]):
        return "n/a"
    if entry.get("std") is not None:
        return f"{entry['value']:.3f} +- {entry['std']:.3f}"
    if entry.get("ci_low") is None or not math.isfinite(entry["ci_low"]):
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def format_table(rows: list[dict], metrics: list[str], reference: str | None = None, primary: str | None = None,
                 spread: str = "folds") -> str:
    """A plain-text table: one row per feature set (and setting) and the paired p-value of the primary
    metric against the reference row.

    Rows from `summarize` show each metric's primary figure (mean +- std over k folds, or one test split's
    value [95% CI]) and, with several folds, the pooled out-of-fold figure of the primary metric labelled
    as such. Other rows (few-shot) show `value [95% CI]` and mean +- std over `spread` (draws).
    """
    by_primary = all("primary" in r for r in rows)
    num_folds = max((r.get("n_folds", 1) for r in rows), default=1) if by_primary else 0
    if by_primary:
        unit = f"mean+-std, {num_folds} folds" if num_folds > 1 else "95% CI"
        header = ["features"] + [f"{m} ({unit})" if num_folds > 1 else f"{m} [{unit}]" for m in metrics]
        if num_folds > 1 and primary:
            header.append(f"pooled out-of-fold {primary} [95% CI]")
    else:
        header = ["features"] + [f"{m} [95% CI]" for m in metrics]
    has_folds = not by_primary and any(r.get("fold_mean") for r in rows)
    if has_folds and primary:
        header.append(f"{primary} {spread} mean+-std")
    has_p = any(r.get("comparison") for r in rows)
    if has_p:
        header.append(f"p vs {reference} ({primary}{', pooled, case bootstrap' if by_primary else ''})")
    table = [header]
    for r in rows:
        if by_primary:
            line = [r["name"]] + [_cell(r["primary"].get(m)) for m in metrics]
            if num_folds > 1 and primary:
                line.append(_cell(r["metrics"].get(primary)))
        else:
            line = [r["name"]] + [_cell(r["metrics"].get(m)) for m in metrics]
        if has_folds and primary:
            fm, fs = r.get("fold_mean", {}).get(primary), r.get("fold_std", {}).get(primary)
            line.append(f"{fm:.3f} +- {fs:.3f}" if fm is not None and math.isfinite(fm) else "")
        if has_p:
            comp = (r.get("comparison") or {}).get(primary)
            line.append(f"{comp['p_value']:.4f} (delta {comp['delta']:+.3f})" if comp and math.isfinite(comp["p_value"])
                        else ("reference" if r.get("is_reference", r["name"] == reference) else ""))
        table.append(line)
    widths = [max(len(str(row[c])) for row in table) for c in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def eval_results(summary: dict, task_name: str, dataset: str) -> list[dict]:
    """The model-index entries of a summary (the figures of `results.json`): the primary figure of each
    metric (fold mean, with its std in the name, or the test split's value) and the pooled one, labelled."""
    entries = []
    for k, v in summary["primary"].items():
        if v["value"] is None or not math.isfinite(v["value"]):
            continue
        name = (f"test {k}, {v['kind']}: {v['value']:.3f} +- {v['std']:.3f}" if v.get("std") is not None
                else f"test {k}, {v['kind']}")
        entries.append({"task": task_name, "metric": k, "name": name, "value": v["value"], "dataset": dataset})
    if summary.get("n_folds", 1) > 1:
        for k, v in summary["metrics"].items():
            if v["value"] is not None and math.isfinite(v["value"]):
                entries.append({"task": task_name, "metric": f"{k}_pooled", "name": f"{k}, {summary['pooled_label']}",
                                "value": v["value"], "dataset": dataset})
    return entries


def write_predictions_csv(path: str | os.PathLike, data: TaskData, rows, preds: dict, fold=None) -> str:
    """Per slide: id, fold, truth and the prediction (class probabilities or risk)."""
    rows = np.asarray(rows)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        if data.task == "classification":
            writer.writerow(["slide_id", "case_id", "fold", "label", "predicted"] + [f"prob_{n}" for n in data.class_names])
            for j, i in enumerate(rows):
                p = preds["probs"][j]
                writer.writerow([data.slide_ids[i], data.case_ids[i], "" if fold is None else int(fold[j]),
                                 data.class_names[data.labels[i]], data.class_names[int(np.argmax(p))],
                                 *[f"{v:.6f}" for v in p]])
        else:
            writer.writerow(["slide_id", "case_id", "fold", "time", "event", "risk"])
            for j, i in enumerate(rows):
                writer.writerow([data.slide_ids[i], data.case_ids[i], "" if fold is None else int(fold[j]),
                                 data.times[i], int(data.events[i]), f"{preds['risk'][j]:.6f}"])
    return os.fspath(path)


def write_json(path: str | os.PathLike, payload: dict) -> str:
    """Atomic JSON write (NaN becomes null)."""

    def clean(value):
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, np.ndarray):
            return clean(value.tolist())
        if isinstance(value, (np.integer,)):
            return int(value)
        if isinstance(value, (float, np.floating)):
            return float(value) if math.isfinite(value) else None
        return value

    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as handle:
        json.dump(clean(payload), handle, indent=2)
    os.replace(tmp, path)
    return os.fspath(path)


__all__ = ["LEVELS", "MIN_TEST_CASES", "case_level", "compare", "eval_results", "format_table", "metric_fn",
           "prediction_of", "score_cases", "scored", "split_notice", "summarize", "truth_of", "write_json",
           "write_predictions_csv"]
