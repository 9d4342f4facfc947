"""Bootstrap confidence intervals and paired bootstrap tests over cases.

The unit resampled is the case (patient). Arrays with one row per case (case-level scores, the
default of `evaluation.report`) are resampled row by row. Arrays with one row per slide take
`groups` (the case id of each row): a resample then draws cases with replacement and takes all
their slides (a cluster bootstrap), so a patient with three slides never counts as three independent
draws, which would make intervals too narrow and paired p-values too small.

`metric_fn(*arrays)` returns a dict of named metrics (or one float, named "value"); each array is
resampled along its first axis with the same indices. Resamples where a metric is undefined (NaN, e.g.
a resample with a single class) are left out of that metric's distribution; how many were kept is
reported. Intervals are percentile intervals.

`batched_fn(*arrays, weights)` (optional) computes the same metrics for a [B, n] matrix of resample
multiplicities at once (`{metric: [B]}`); it must equal `metric_fn` on the resampled arrays (e.g.
`classification_metrics_weighted`). The resamples drawn are the same with or without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

DEFAULT_BOOTSTRAP = 1000


def _as_dict(value) -> dict[str, float]:
    if isinstance(value, dict):
        return {k: float(v) for k, v in value.items()}
    return {"value": float(value)}


def _members(groups, n: int) -> list[np.ndarray] | None:
    """Rows of each case (None: every row is its own case)."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"groups must give the case of each of the {n} rows, got {len(groups)}.")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def _resamples(n: int, num_samples: int, seed: int, members=None):
    """Row indices of `num_samples` resamples: n rows with replacement, or with `members` (rows per case)
    as many cases with replacement, each bringing all its rows."""
    rng = np.random.default_rng(seed)
    for _ in range(num_samples):
        if members is None:
            yield rng.integers(0, n, size=n)
        else:
            yield np.concatenate([members[g] for g in rng.integers(0, len(members), size=len(members))])


def _batched(batched_fn, arrays, n, num_samples, seed, members=None, chunk=256) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    indices = list(_resamples(n, num_samples, seed, members))
    for start in range(0, num_samples, chunk):
        weights = np.stack([np.bincount(i, minlength=n) for i in indices[start:start + chunk]])
        for k, v in batched_fn(*arrays, weights).items():
            out.setdefault(k, []).append(np.asarray(v, dtype=np.float64))
    return {k: np.concatenate(v) for k, v in out.items()}


def _check(arrays, who, groups=None):
    if not arrays:
        raise ValueError(f"{who}: give at least one array.")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"{who}: arrays must have the same length, got {[len(a) for a in arrays]}.")
    num_cases = n if groups is None else len(set(np.asarray(groups).tolist()))
    if num_cases < 2:
        raise ValueError(f"{who}: need at least 2 cases to bootstrap, got {num_cases}.")
    return n


def bootstrap_ci(
    metric_fn: Callable,
    *arrays,
    num_samples: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
    batched_fn: Callable | None = None,
    groups=None,
) -> dict[str, dict]:
    """`{metric: {"value", "ci_low", "ci_high", "num_valid"}}`: the metric on all rows and the percentile
    interval of `num_samples` case resamples (`groups`: the case of each row when rows are slides)."""
    arrays = [np.asarray(a) for a in arrays]
    n = _check(arrays, "bootstrap_ci", groups)
    members = _members(groups, n)
    point = _as_dict(metric_fn(*arrays))
    if batched_fn is not None:
        values = _batched(batched_fn, arrays, n, num_samples, seed, members)
        samples = {k: values[k][np.isfinite(values[k])].tolist() for k in point}
    else:
        samples = {k: [] for k in point}
        for idx in _resamples(n, num_samples, seed, members):
            for k, v in _as_dict(metric_fn(*(a[idx] for a in arrays))).items():
                if k in samples and math.isfinite(v):
                    samples[k].append(v)
    tail = (1 - confidence) / 2 * 100
    out = {}
    for k, v in point.items():
        values = np.asarray(samples[k])
        low, high = (np.percentile(values, [tail, 100 - tail]) if len(values) else (math.nan, math.nan))
        out[k] = {"value": v, "ci_low": float(low), "ci_high": float(high), "num_valid": int(len(values))}
    return out


def paired_bootstrap(
    metric_fn: Callable,
    shared: tuple,
    pred_a,
    pred_b,
    num_samples: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
    batched_fn: Callable | None = None,
    groups=None,
) -> dict[str, dict]:
    """Paired bootstrap comparison of two predictions on the same cases (`groups`: the case of each row
    when rows are slides; resamples then draw cases).

    `metric_fn(*shared, pred)` scores one prediction (`shared` holds the truth, e.g. `(labels,)` or
    `(times, events)`). Every resample draws the same cases for both predictions. Returns
    `{metric: {"a", "b", "delta" (b - a), "ci_low", "ci_high", "p_value", "num_valid"}}`; the two-sided
    p-value is `2 * min(P(delta* <= 0), P(delta* >= 0))` over resamples, with the +1 correction so it is
    never 0 (its floor is about 2 / num_samples).
    """
    shared = [np.asarray(a) for a in shared]
    pred_a, pred_b = np.asarray(pred_a), np.asarray(pred_b)
    n = _check([*shared, pred_a, pred_b], "paired_bootstrap", groups)
    members = _members(groups, n)
    a0, b0 = _as_dict(metric_fn(*shared, pred_a)), _as_dict(metric_fn(*shared, pred_b))
    if batched_fn is not None:
        a = _batched(batched_fn, [*shared, pred_a], n, num_samples, seed, members)
        b = _batched(batched_fn, [*shared, pred_b], n, num_samples, seed, members)
        deltas = {k: (b[k] - a[k])[np.isfinite(b[k] - a[k])].tolist() for k in a0}
    else:
        deltas = {k: [] for k in a0}
        for idx in _resamples(n, num_samples, seed, members):
            truth = [s[idx] for s in shared]
            a, b = _as_dict(metric_fn(*truth, pred_a[idx])), _as_dict(metric_fn(*truth, pred_b[idx]))
            for k in deltas:
                d = b.get(k, math.nan) - a.get(k, math.nan)
                if math.isfinite(d):
                    deltas[k].append(d)
    tail = (1 - confidence) / 2 * 100
    out = {}
    for k in a0:
        d = np.asarray(deltas[k])
        if len(d):
            low, high = np.percentile(d, [tail, 100 - tail])
            p = min(1.0, 2 * min((1 + (d <= 0).sum()) / (1 + len(d)), (1 + (d >= 0).sum()) / (1 + len(d))))
        else:
            low = high = p = math.nan
        out[k] = {"a": a0[k], "b": b0[k], "delta": b0[k] - a0[k], "ci_low": float(low), "ci_high": float(high),
                  "p_value": float(p), "num_valid": int(len(d))}
    return out


__all__ = ["DEFAULT_BOOTSTRAP", "bootstrap_ci", "paired_bootstrap"]
