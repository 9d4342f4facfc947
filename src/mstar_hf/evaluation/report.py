"""Turning out-of-fold predictions into results: metrics with bootstrap CIs, per-fold summaries, paired
comparisons of feature sets, a printed table, `results.json` and a predictions CSV.

CIs and p-values are computed on the pooled out-of-fold test predictions (every case is scored by the
model of the fold that held it out); the per-fold test metrics are reported beside them as mean and std.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

from .bootstrap import DEFAULT_BOOTSTRAP, bootstrap_ci, paired_bootstrap
from .cohort import TaskData


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


def summarize(data: TaskData, rows, preds: dict, fold_records: list[dict] | None = None,
              num_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """Metrics of pooled predictions with bootstrap 95% CIs, plus per-fold mean / std of the test metrics."""
    fn = metric_fn(data.task)
    metrics = bootstrap_ci(fn, *truth_of(data, rows), prediction_of(data.task, preds), num_samples=num_bootstrap,
                           seed=seed, batched_fn=batched_metric_fn(data.task))
    out = {"n": int(len(rows)), "metrics": metrics}
    if fold_records:
        per_fold = [r["test_metrics"] for r in fold_records if "test_metrics" in r]
        keys = per_fold[0].keys() if per_fold else []
        out["fold_mean"] = {k: float(np.nanmean([f[k] for f in per_fold])) for k in keys}
        out["fold_std"] = {k: float(np.nanstd([f[k] for f in per_fold])) for k in keys}
        out["folds"] = fold_records
    return out


def compare(data: TaskData, rows, preds_a: dict, preds_b: dict, num_bootstrap: int = DEFAULT_BOOTSTRAP,
            seed: int = 0) -> dict:
    """Paired bootstrap of B against A on the same cases (per metric: delta b - a, CI, p-value)."""
    return paired_bootstrap(metric_fn(data.task), truth_of(data, rows), prediction_of(data.task, preds_a),
                            prediction_of(data.task, preds_b), num_samples=num_bootstrap, seed=seed,
                            batched_fn=batched_metric_fn(data.task))


def _cell(entry: dict) -> str:
    if entry is None or not math.isfinite(entry.get("value", math.nan)):
        return "n/a"
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def format_table(rows: list[dict], metrics: list[str], reference: str | None = None, primary: str | None = None,
                 spread: str = "folds") -> str:
    """A plain-text table: one row per feature set (and setting), `metric value [95% CI]`, mean +- std over
    folds (or few-shot draws) and the paired p-value of the primary metric against the reference row."""
    header = ["features"] + [f"{m} [95% CI]" for m in metrics]
    has_folds = any(r.get("fold_mean") for r in rows)
    if has_folds and primary:
        header.append(f"{primary} {spread} mean+-std")
    has_p = any(r.get("comparison") for r in rows)
    if has_p:
        header.append(f"p vs {reference} ({primary})")
    table = [header]
    for r in rows:
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


__all__ = ["compare", "format_table", "metric_fn", "prediction_of", "summarize", "truth_of", "write_json",
           "write_predictions_csv"]
