"""One notion of a case (patient) for every split and every score.

In TCGA a patient often has several diagnostic slides. Slides of one case share a patient's report,
RNA, label and survival, so a case on both sides of a split leaks, and metrics that count slides
weigh patients by their number of slides. Everything here keys on the manifest's `case_id`:

- `check_case_splits`: a per-slide split column (train / val / test ...) validated at case level;
- `check_case_disjoint`: index-based parts (k-fold, validation carving) validated at case level;
- `case_groups` / `aggregate_by_case`: one row per case (mean of the slides' predictions).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def _listed(items, limit: int = 10) -> str:
    items = list(items)
    more = f"; ... ({len(items)} cases in all)" if len(items) > limit else ""
    return "; ".join(str(i) for i in items[:limit]) + more


def check_case_splits(case_ids: Sequence[str], splits: Sequence[str | None], *, source: str,
                      take_first: bool = False) -> list[str | None]:
    """The per-slide `splits`, checked so that no case has slides on two sides.

    A case whose slides carry different (non-empty) splits is an error naming the cases and their slides'
    splits (`source` says where the splits come from, e.g. "manifest '/x/manifest.csv'"). With
    `take_first=True` every slide of such a case gets the split of the case's first slide instead, with a
    warning naming them. Empty splits (None) are no side and left as they are. Returns a new list.
    """
    case_ids = [str(c) for c in case_ids]
    splits = list(splits)
    if len(case_ids) != len(splits):
        raise ValueError(f"{source}: {len(case_ids)} case ids but {len(splits)} splits.")
    first: dict[str, str] = {}
    seen: dict[str, list[str]] = {}
    for case, split in zip(case_ids, splits):
        if split is None:
            continue
        first.setdefault(case, split)
        if split not in seen.setdefault(case, []):
            seen[case].append(split)
    leaking = {case: sides for case, sides in seen.items() if len(sides) > 1}
    if not leaking:
        return splits
    described = [f"{case!r} ({' / '.join(sides)})" for case, sides in leaking.items()]
    if not take_first:
        raise ValueError(
            f"{source}: {len(leaking)} case(s) have slides on more than one side of the split, so the same "
            f"patient would be trained and tested on: {_listed(described)}. Give every slide of a case the same "
            "split, or take each case's split from its first slide (--split-from-first-slide)."
        )
    logger.warning("%s: %d case(s) had slides on several sides; each now takes its first slide's split: %s",
                   source, len(leaking), _listed(f"{c!r} -> {first[c]}" for c in leaking))
    return [first[c] if c in leaking else s for c, s in zip(case_ids, splits)]


def check_case_disjoint(case_ids: Sequence[str], parts: Mapping[str, Sequence[int]], *, source: str) -> None:
    """Raises ValueError naming the cases when rows of one case fall into two of `parts`
    (`{"train": rows, "val": rows, "test": rows}`, rows indexing `case_ids`)."""
    where: dict[str, list[str]] = {}
    for name, rows in parts.items():
        for case in {str(case_ids[int(i)]) for i in rows}:
            where.setdefault(case, []).append(name)
    leaking = {c: names for c, names in where.items() if len(names) > 1}
    if leaking:
        raise ValueError(f"{source}: {len(leaking)} case(s) are on more than one side: "
                         + _listed(f"{c!r} ({' / '.join(n)})" for c, n in leaking.items()))


def case_groups(case_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(cases in order of first appearance, index of each row's case)."""
    index: dict[str, int] = {}
    inverse = np.array([index.setdefault(str(c), len(index)) for c in case_ids], dtype=np.int64)
    return list(index), inverse


def first_row_per_case(case_ids: Sequence[str], rows=None) -> np.ndarray:
    """Of `rows` (default: all), the first row of each case: case-level counts (e.g. survival time bins)."""
    rows = np.arange(len(case_ids)) if rows is None else np.asarray(rows, dtype=np.int64)
    seen: set[str] = set()
    keep = []
    for i in rows:
        case = str(case_ids[int(i)])
        if case not in seen:
            seen.add(case)
            keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


def aggregate_by_case(case_ids: Sequence[str], values, how: str = "mean") -> tuple[list[str], np.ndarray]:
    """One value per case: the mean (`how="mean"`) of its rows' `values` ([n] or [n, C], e.g. class
    probabilities or risks), or the first row's (`how="first"`, for case-level truths). Cases come in
    order of first appearance."""
    cases, inverse = case_groups(case_ids)
    values = np.asarray(values)
    if len(values) != len(inverse):
        raise ValueError(f"{len(values)} values for {len(inverse)} case ids.")
    if how == "first":
        return cases, values[first_row_per_case(case_ids)]
    if how != "mean":
        raise ValueError(f"how must be 'mean' or 'first', got {how!r}.")
    counts = np.bincount(inverse, minlength=len(cases)).astype(np.float64)
    flat = values.reshape(len(values), -1).astype(np.float64)
    sums = np.zeros((len(cases), flat.shape[1]))
    np.add.at(sums, inverse, flat)
    out = sums / counts[:, None]
    return cases, out.reshape((len(cases),) + values.shape[1:])


__all__ = ["aggregate_by_case", "case_groups", "check_case_disjoint", "check_case_splits", "first_row_per_case"]
