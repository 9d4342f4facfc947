"""A downstream task read from a cohort manifest: which slides, their labels or survival, their features.

Handling of bad input (errors name the manifest, the column and the cases):
- a slide with an empty label (classification) or empty time / event (survival) is left out, with a
  warning; `TaskData.excluded` lists it with the reason (results.json records it);
- a label column with a single class, survival times <= 0, events other than 0/1, or no event at all:
  ValueError;
- features: `features_dir` replaces the folder of each `features_path` (same file names), so two encoders'
  feature folders can be compared; a missing file is an error, or with `skip_missing=True` the slide is
  left out and recorded; feature widths must agree across slides.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

TASKS = ("classification", "survival")


@dataclass
class TaskData:
    """The slides of one task with one feature folder (rows aligned across all fields)."""

    task: str
    manifest: str
    slide_ids: list[str]
    case_ids: list[str]
    feature_paths: list[str]
    slide_paths: list[str | None]
    splits: list[str | None]
    num_patches: np.ndarray
    feature_dim: int
    labels: np.ndarray | None = None  # [n] int class index (classification)
    class_names: list[str] | None = None
    times: np.ndarray | None = None  # [n] float (survival)
    events: np.ndarray | None = None  # [n] int 1 = event, 0 = censored
    label_column: str | None = None
    excluded: list[dict] = field(default_factory=list)
    features_dir: str | None = None

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names or [])

    @property
    def strata(self) -> np.ndarray:
        """What folds are stratified on: the class (classification) or the event indicator (survival)."""
        return self.labels if self.task == "classification" else self.events

    def subset(self, rows) -> TaskData:
        rows = np.asarray(rows, dtype=np.int64)
        pick = lambda seq: [seq[i] for i in rows]  # noqa: E731
        return TaskData(
            task=self.task, manifest=self.manifest, slide_ids=pick(self.slide_ids), case_ids=pick(self.case_ids),
            feature_paths=pick(self.feature_paths), slide_paths=pick(self.slide_paths), splits=pick(self.splits),
            num_patches=self.num_patches[rows], feature_dim=self.feature_dim,
            labels=None if self.labels is None else self.labels[rows], class_names=self.class_names,
            times=None if self.times is None else self.times[rows],
            events=None if self.events is None else self.events[rows],
            label_column=self.label_column, excluded=list(self.excluded), features_dir=self.features_dir,
        )


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def _listed(items) -> str:
    items = list(items)
    return ", ".join(repr(i) for i in items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")


def _sort_key(name: str):
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def _feature_shape(path: str) -> tuple[int, int]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ValueError(f"features file {path!r} has no 'features' dataset (found {sorted(f.keys())}).")
            shape = f["features"].shape
    except OSError as e:
        raise OSError(f"cannot open features file {path!r} as HDF5: {e}") from None
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"features file {path!r}: 'features' must be a non-empty (N, D) array, got shape {shape}.")
    return int(shape[0]), int(shape[1])


def load_task(
    manifest: str | os.PathLike,
    task: str = "classification",
    label_column: str = "label",
    features_dir: str | os.PathLike | None = None,
    time_column: str = "time",
    event_column: str = "event",
    skip_missing: bool = False,
    class_names: list[str] | None = None,
) -> TaskData:
    """Read a classification or survival task from a cohort manifest (`mstar_hf.data.load_cohort`).

    `class_names` fixes the classes and their order (e.g. those of a trained model); by default they are
    the sorted label values (numerically when they are numbers).
    """
    from ..data.manifest import load_cohort

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    manifest = os.path.abspath(os.fspath(manifest))
    cohort = load_cohort(manifest, check_files=False)
    columns = cohort.column_names
    needed = [label_column] if task == "classification" else [time_column, event_column]
    missing = [c for c in needed if c not in columns]
    # load_cohort fills absent optional columns (label, time, event) with None
    absent = [c for c in needed if c not in missing and all(_blank(v) for v in cohort[c])]
    if missing or absent:
        raise ValueError(f"manifest {manifest!r} has no values in column(s) {missing + absent} needed for the "
                         f"{task} task; columns: {columns}.")

    excluded: list[dict] = []
    keep: list[int] = []
    rows = cohort.to_dict()
    for i, slide_id in enumerate(rows["slide_id"]):
        reason = None
        if task == "classification" and _blank(rows[label_column][i]):
            reason = f"empty {label_column!r}"
        elif task == "survival":
            empty = [c for c in (time_column, event_column) if _blank(rows[c][i])]
            reason = f"empty {' and '.join(repr(c) for c in empty)}" if empty else None
        if reason is None and rows["features_path"][i] is None:
            reason = "empty features_path"
        if reason:
            excluded.append({"slide_id": slide_id, "case_id": rows["case_id"][i], "reason": reason})
        else:
            keep.append(i)
    if excluded:
        logger.warning("manifest %s: %d slide(s) left out of the %s task (%s).", manifest, len(excluded), task,
                       "; ".join(f"{e['slide_id']}: {e['reason']}" for e in excluded[:5]))

    paths = []
    for i in keep:
        path = rows["features_path"][i]
        if features_dir is not None:
            path = os.path.join(os.path.abspath(os.fspath(features_dir)), os.path.basename(path))
        paths.append(path)
    where = f"features folder {os.fspath(features_dir)!r}" if features_dir is not None else f"manifest {manifest!r}"
    absent_files = [(i, p) for i, p in zip(keep, paths) if not os.path.isfile(p)]
    if absent_files and not skip_missing:
        described = [f"{rows['slide_id'][i]} ({p})" for i, p in absent_files]
        raise FileNotFoundError(
            f"{where}: features file missing for slide(s) {_listed(described)}; extract them "
            "(`mstar-hf extract`) or pass skip_missing / --skip-missing to leave those slides out."
        )
    for i, p in absent_files:
        excluded.append({"slide_id": rows["slide_id"][i], "case_id": rows["case_id"][i],
                         "reason": f"features file missing ({p})"})
    missing_rows = {i for i, _ in absent_files}
    paths = [p for i, p in zip(keep, paths) if i not in missing_rows]
    keep = [i for i in keep if i not in missing_rows]
    if not keep:
        raise ValueError(f"manifest {manifest!r}: no slide is left for the {task} task "
                         f"({len(excluded)} left out: {_listed(e['reason'] for e in excluded)}).")

    shapes = [_feature_shape(p) for p in paths]
    dims = {d for _, d in shapes}
    if len(dims) > 1:
        by_dim = {}
        for p, (_, d) in zip(paths, shapes):
            by_dim.setdefault(d, []).append(os.path.basename(p))
        raise ValueError(f"{where}: feature widths differ between slides: "
                         + "; ".join(f"{d}-d: {_listed(v)}" for d, v in sorted(by_dim.items())))

    data = TaskData(
        task=task,
        manifest=manifest,
        slide_ids=[rows["slide_id"][i] for i in keep],
        case_ids=[rows["case_id"][i] for i in keep],
        feature_paths=paths,
        slide_paths=[rows["slide_path"][i] for i in keep],
        splits=[rows["split"][i] for i in keep],
        num_patches=np.array([n for n, _ in shapes], dtype=np.int64),
        feature_dim=dims.pop(),
        label_column=label_column if task == "classification" else None,
        excluded=excluded,
        features_dir=None if features_dir is None else os.path.abspath(os.fspath(features_dir)),
    )
    if task == "classification":
        values = [str(rows[label_column][i]).strip() for i in keep]
        names = list(class_names) if class_names is not None else sorted(set(values), key=_sort_key)
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"manifest {manifest!r}: labels {unknown} in column {label_column!r} are not among the "
                             f"given classes {names}.")
        if len(set(values)) < 2:
            raise ValueError(
                f"manifest {manifest!r}: column {label_column!r} has a single class {values[0]!r} over "
                f"{len(values)} slides; classification needs at least 2 classes."
            )
        index = {n: k for k, n in enumerate(names)}
        data.labels = np.array([index[v] for v in values], dtype=np.int64)
        data.class_names = names
    else:
        from .survival import check_survival_data

        times = []
        events = []
        for i in keep:
            try:
                times.append(float(rows[time_column][i]))
                events.append(float(rows[event_column][i]))
            except ValueError:
                raise ValueError(f"manifest {manifest!r}: slide {rows['slide_id'][i]!r} has a non-numeric "
                                 f"{time_column!r} / {event_column!r}: {rows[time_column][i]!r}, "
                                 f"{rows[event_column][i]!r}.") from None
        data.times, data.events = check_survival_data(times, events, data.case_ids, where=f"manifest {manifest!r}")
    return data


def align_tasks(tasks: list[TaskData]) -> list[TaskData]:
    """Restrict several feature folders' tasks to the slides all of them have (same order), so their
    predictions can be compared case by case; slides dropped here are recorded in `excluded`."""
    common = set(tasks[0].slide_ids)
    for t in tasks[1:]:
        common &= set(t.slide_ids)
    if not common:
        raise ValueError("the feature folders share no slide with features.")
    order = [s for s in tasks[0].slide_ids if s in common]
    out = []
    for t in tasks:
        position = {s: i for i, s in enumerate(t.slide_ids)}
        sub = t.subset([position[s] for s in order])
        for s in t.slide_ids:
            if s not in common:
                sub.excluded.append({"slide_id": s, "case_id": t.case_ids[position[s]],
                                     "reason": "features missing in another feature folder"})
        out.append(sub)
    if out[0].task == "classification" and any(t.class_names != out[0].class_names for t in out):
        raise ValueError("the feature folders give different class sets; compare them on the same slides.")
    return out


__all__ = ["TASKS", "TaskData", "align_tasks", "load_task"]
