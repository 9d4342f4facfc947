"""Train / validation / test folds for a downstream task: stratified group k-fold, or the manifest's splits.

Folds never split a case: slides of one patient stay together (`StratifiedGroupKFold` on `case_id`), and
every fold is checked at case level (`mstar_hf.data.cases`): a manifest split column that puts one case's
slides on two sides is refused with the cases named (or, with `split_from_first_slide`, each case takes
its first slide's split, with a warning). Stratification is on the class (classification) or the event
indicator (survival). The validation set of each fold (early stopping) is carved out of its training
part the same way.

Documented handling of small data:
- fewer than 2 folds, or more folds than cases: ValueError;
- a class with fewer cases than folds: a warning; the test folds that lack it are scored on the
  classes they have (`Fold.absent_test_classes` records which were missing);
- a class absent from a fold's training part (e.g. a class with a single case): ValueError naming the
  class and the fold, since a model cannot learn a class it never sees; a class whose training cases
  would all go to the validation set stays in training (the validation set then lacks it).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..data.cases import check_case_disjoint, check_case_splits
from .cohort import TaskData

logger = logging.getLogger(__name__)


@dataclass
class Fold:
    index: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    absent_test_classes: list[str] = field(default_factory=list)
    absent_val_classes: list[str] = field(default_factory=list)
    source: str = ""  # where the split comes from (the manifest's split column or k-fold)
    n_cases: dict[str, int] = field(default_factory=dict)  # cases per part

    def summary(self) -> dict:
        return {"fold": self.index, "n_train": int(len(self.train)), "n_val": int(len(self.val)),
                "n_test": int(len(self.test)), "absent_test_classes": self.absent_test_classes,
                "absent_val_classes": self.absent_val_classes, "source": self.source,
                "n_train_cases": self.n_cases.get("train", 0), "n_val_cases": self.n_cases.get("val", 0),
                "n_test_cases": self.n_cases.get("test", 0)}


def _group_kfold(strata: np.ndarray, groups: list[str], n_splits: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class in y has only k members": handled and reported by the caller
        warnings.simplefilter("ignore", UserWarning)
        return list(splitter.split(np.zeros(len(strata)), strata, groups))


def _carve_val(train: np.ndarray, data: TaskData, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if val_fraction <= 0:
        return train, np.zeros(0, dtype=np.int64)
    groups = [data.case_ids[i] for i in train]
    n_splits = max(2, int(round(1 / val_fraction)))
    if len(set(groups)) < n_splits:
        raise ValueError(f"the training part has {len(set(groups))} cases, too few to hold out a validation "
                         f"fraction of {val_fraction}; use --val-fraction 0 (no early stopping) or more data.")
    if np.bincount(data.strata[train]).max() >= n_splits:
        fit, val = _group_kfold(data.strata[train], groups, n_splits, seed)[0]
    else:  # every class is too small to stratify: a plain grouped random split
        from sklearn.model_selection import GroupShuffleSplit

        fit, val = next(GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
                        .split(train, groups=groups))
    fit, val = train[fit], train[val]
    if data.task == "classification":
        # a class whose every training case fell into validation goes back to training (a rare class
        # is better learnt than used for early stopping)
        lost = set(data.labels[train].tolist()) - set(data.labels[fit].tolist())
        if lost:
            back = np.isin(data.labels[val], list(lost))
            fit, val = np.concatenate([fit, val[back]]), val[~back]
    return fit, val


def _class_names(data: TaskData, classes) -> list[str]:
    return [data.class_names[c] for c in sorted(classes)]


def _check_fold(fold: Fold, data: TaskData, source: str) -> Fold:
    parts = {"train": fold.train, "val": fold.val, "test": fold.test}
    # every path (manifest column, k-fold, validation carving) ends here: 0 cases on two sides
    check_case_disjoint(data.case_ids, parts, source=f"{source}, fold {fold.index}")
    fold.source = source
    fold.n_cases = {k: len({data.case_ids[i] for i in v}) for k, v in parts.items()}
    if data.task != "classification":
        if not data.events[fold.train].any():
            raise ValueError(f"fold {fold.index}: no uncensored case in the training part; use fewer folds.")
        return fold
    everything = set(data.labels.tolist())
    no_train = everything - set(data.labels[fold.train].tolist())
    if no_train:
        raise ValueError(
            f"fold {fold.index}: class(es) {_class_names(data, no_train)} have no training case "
            f"(class counts: {dict(zip(data.class_names, np.bincount(data.labels, minlength=data.num_classes).tolist()))}); "
            "use fewer folds, add cases, or drop the class from the manifest."
        )
    fold.absent_test_classes = _class_names(data, everything - set(data.labels[fold.test].tolist()))
    if len(fold.val):
        fold.absent_val_classes = _class_names(data, everything - set(data.labels[fold.val].tolist()))
    if fold.absent_test_classes:
        logger.warning("fold %d: the test part has no case of %s; its metrics use the classes present.",
                       fold.index, fold.absent_test_classes)
    return fold


def make_folds(
    data: TaskData,
    folds: int = 5,
    seed: int = 0,
    val_fraction: float = 0.2,
    use_manifest_splits: bool | None = None,
    split_from_first_slide: bool = False,
) -> list[Fold]:
    """The folds of a task.

    `use_manifest_splits`: True uses the manifest's `split` column (train / val / test; without val rows
    the validation set is carved out of train); False runs `folds`-fold cross-validation; None (default)
    uses the manifest splits when every slide has one. The split column is checked at case level: a case
    with slides on two sides is a ValueError naming the cases, unless `split_from_first_slide` (then each
    such case takes its first slide's split, with a warning).
    """
    have_splits = all(s is not None for s in data.splits)
    if use_manifest_splits is None:
        use_manifest_splits = have_splits
    if use_manifest_splits:
        if not have_splits:
            missing = [s for s, sp in zip(data.slide_ids, data.splits) if sp is None]
            raise ValueError(f"manifest {data.manifest!r}: slides {missing[:10]} have no split; fill the 'split' "
                             "column or use k-fold cross-validation (--folds).")
        source = f"manifest {data.manifest!r} (split column)"
        splits = np.asarray(check_case_splits(data.case_ids, data.splits, source=source,
                                              take_first=split_from_first_slide), dtype=object)
        train, val, test = (np.flatnonzero(splits == s) for s in ("train", "val", "test"))
        if not len(train) or not len(test):
            raise ValueError(f"manifest {data.manifest!r}: the split column needs train and test slides "
                             f"(found {len(train)} train, {len(val)} val, {len(test)} test).")
        if not len(val):
            train, val = _carve_val(train, data, val_fraction, seed)
        return [_check_fold(Fold(0, train, val, test), data, source)]

    num_cases = len(set(data.case_ids))
    if folds < 2:
        raise ValueError(f"folds must be >= 2 for cross-validation, got {folds}.")
    if folds > num_cases:
        raise ValueError(f"folds ({folds}) larger than the data: the task has {num_cases} cases "
                         f"({len(data)} slides); use --folds {max(2, min(5, num_cases // 2))} or fewer.")
    if data.task == "classification":
        counts = np.bincount(data.labels, minlength=data.num_classes)
        rare = [f"{n} ({c} cases)" for n, c in zip(data.class_names, counts.tolist()) if c < folds]
        if rare:
            logger.warning("classes %s have fewer cases than folds (%d): some test folds will lack them.", rare, folds)
    if np.bincount(data.strata).max() < folds:
        raise ValueError(f"cannot make {folds} stratified folds: every class has fewer than {folds} cases "
                         f"(counts {np.bincount(data.strata).tolist()}); use fewer folds.")
    out = []
    source = f"{folds}-fold stratified group k-fold on case_id (seed {seed})"
    for k, (train, test) in enumerate(_group_kfold(data.strata, data.case_ids, folds, seed)):
        train, val = _carve_val(train, data, val_fraction, seed + 1 + k)
        out.append(_check_fold(Fold(k, np.sort(train), np.sort(val), np.sort(test)), data, source))
    check_case_disjoint(data.case_ids, {f"test of fold {f.index}": f.test for f in out}, source=source)
    return out


__all__ = ["Fold", "make_folds"]
