"""Survival metrics and checks: Harrell's concordance index (lifelines) and risk-group splits.

Convention throughout: `risk` is higher for shorter expected survival (the models' `risk = -sum S(k)`);
`events` is 1 when the event (death) was observed and 0 when the case is censored.
"""

from __future__ import annotations

import math

import numpy as np

PRIMARY_METRIC = "c_index"
METRICS = ("c_index",)


def check_survival_data(times, events, case_ids=None, where: str = "survival data") -> tuple[np.ndarray, np.ndarray]:
    """Validated float times and int events; raises ValueError naming the cases when a time is missing,
    not finite or <= 0, an event is not 0/1, or no case has an event (then nothing can be ranked)."""
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    events_f = np.asarray(events, dtype=np.float64).reshape(-1)
    ids = list(case_ids) if case_ids is not None else [str(i) for i in range(len(times))]
    if len(times) != len(events_f) or len(ids) != len(times):
        raise ValueError(f"{where}: {len(times)} times, {len(events_f)} events and {len(ids)} case ids must match.")

    def listed(mask):
        bad = [ids[i] for i in np.flatnonzero(mask)]
        return ", ".join(repr(b) for b in bad[:10]) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")

    bad_time = ~np.isfinite(times) | (times <= 0)
    if bad_time.any():
        raise ValueError(f"{where}: survival times must be finite and > 0; cases {listed(bad_time)} have "
                         f"{sorted(set(times[bad_time].tolist()))[:5]}.")
    bad_event = ~np.isin(events_f, (0.0, 1.0))
    if bad_event.any():
        raise ValueError(f"{where}: events must be 0 (censored) or 1 (event observed); cases {listed(bad_event)}.")
    if not (events_f == 1).any():
        raise ValueError(f"{where}: no case has an observed event (all {len(times)} are censored): the C-index "
                         "and the time bins need uncensored cases.")
    return times, events_f.astype(np.int64)


def concordance_index(times, events, risk) -> float:
    """Harrell's C-index of `risk` (higher = shorter survival) with censoring; NaN when no pair is
    comparable (e.g. no event in a bootstrap resample)."""
    from lifelines.utils import concordance_index as lifelines_cindex

    times = np.asarray(times, dtype=np.float64).reshape(-1)
    events = np.asarray(events).reshape(-1).astype(bool)
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    if not events.any():
        return math.nan
    try:
        # lifelines expects scores that grow with survival time
        return float(lifelines_cindex(times, -risk, events))
    except ZeroDivisionError:  # "No admissable pairs in the dataset."
        return math.nan


def survival_metrics(times, events, risk) -> dict[str, float]:
    return {"c_index": concordance_index(times, events, risk)}


def risk_groups(risk, groups=None) -> np.ndarray:
    """1 for high risk (above the median risk), 0 for low. With `groups` (e.g. the fold of each case),
    the median is taken within each group, so risks of differently trained models are never compared."""
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    out = np.zeros(len(risk), dtype=np.int64)
    keys = np.zeros(len(risk)) if groups is None else np.asarray(groups)
    for key in np.unique(keys):
        rows = keys == key
        out[rows] = risk[rows] > np.median(risk[rows])
    return out


def logrank_p_value(times, events, high) -> float:
    """Log-rank test p-value between the high- and low-risk groups (lifelines)."""
    from lifelines.statistics import logrank_test

    times = np.asarray(times, dtype=np.float64)
    events = np.asarray(events).astype(bool)
    high = np.asarray(high).astype(bool)
    if high.all() or not high.any():
        return math.nan
    result = logrank_test(times[high], times[~high], event_observed_A=events[high], event_observed_B=events[~high])
    return float(result.p_value)


__all__ = ["METRICS", "PRIMARY_METRIC", "check_survival_data", "concordance_index", "logrank_p_value", "risk_groups",
           "survival_metrics"]
