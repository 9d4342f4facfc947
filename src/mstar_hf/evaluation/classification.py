"""Slide classification metrics (scikit-learn): macro-AUC (one-vs-rest), balanced accuracy, weighted F1.

Classes absent from `y_true` (e.g. a rare class missing from a test fold) are left out of the
macro-AUC average, which is then taken over the classes that have both positives and negatives; the
result says which classes were used. With all classes present this equals scikit-learn's
`roc_auc_score(y, probs, multi_class="ovr", average="macro")`.
"""

from __future__ import annotations

import math

import numpy as np

PRIMARY_METRIC = "macro_auc"
METRICS = ("macro_auc", "balanced_accuracy", "weighted_f1", "accuracy")


def _as_arrays(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be [n, num_classes] with n = len(y_true) = {y.shape[0]}, got {p.shape}.")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must be in [0, {p.shape[1]}), got values {sorted(set(y.tolist()))}.")
    return y, p


def auc_classes(y_true) -> list[int]:
    """Classes that enter the macro-AUC: those with both positives and negatives in `y_true`."""
    y = np.asarray(y_true).reshape(-1)
    present = np.unique(y)
    return [int(c) for c in present] if len(present) >= 2 else []


def macro_auc(y_true, probs) -> float:
    """One-vs-rest macro-AUC over the classes present in `y_true`; binary: the AUC of class 1.
    NaN when `y_true` holds a single class (no AUC is defined)."""
    from sklearn.metrics import roc_auc_score

    y, p = _as_arrays(y_true, probs)
    classes = auc_classes(y)
    if not classes:
        return math.nan
    if p.shape[1] == 2:
        return float(roc_auc_score(y == 1, p[:, 1]))
    return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in classes]))


def classification_metrics(y_true, probs) -> dict[str, float]:
    """`{"macro_auc", "balanced_accuracy", "weighted_f1", "accuracy"}` of predicted class probabilities
    `probs` [n, C] against integer labels `y_true` [n]; the prediction is the argmax."""
    import warnings

    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    y, p = _as_arrays(y_true, probs)
    pred = p.argmax(axis=1)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected on folds that lack a class
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y, pred))
    return {
        "macro_auc": macro_auc(y, p),
        "balanced_accuracy": balanced,
        "weighted_f1": float(f1_score(y, pred, average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(y, pred)),
    }


def classification_metrics_weighted(y_true, probs, weights) -> dict[str, np.ndarray]:
    """The metrics of `classification_metrics` for many case weightings at once: `weights` [B, n] (e.g. the
    multiplicities of B bootstrap resamples) -> `{metric: [B]}`.

    A resample is the weighted data set, so this equals `classification_metrics(y[idx], probs[idx])` for
    `weights[b] = bincount(idx, minlength=n)` (tests check it against scikit-learn); it only makes 1,000
    bootstrap resamples take milliseconds instead of a minute of scikit-learn's per-call input checks.
    """
    y, p = _as_arrays(y_true, probs)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    num_classes = p.shape[1]
    # macro-AUC: Mann-Whitney statistic per class, ties counted 1/2, over the sorted scores
    aucs = []
    for c in ([1] if num_classes == 2 else range(num_classes)):
        order = np.argsort(p[:, c], kind="mergesort")
        scores, positive = p[order, c], y[order] == c
        starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
        wo = w[:, order]
        pos = np.add.reduceat(wo * positive, starts, axis=1)
        neg = np.add.reduceat(wo * ~positive, starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        total_pos, total_neg = pos.sum(1), neg.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (pos * (below + 0.5 * neg)).sum(1) / (total_pos * total_neg)
        auc[(total_pos == 0) | (total_neg == 0)] = np.nan
        aucs.append(auc)
    aucs = np.stack(aucs, axis=1)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(aucs)
        macro = np.where(valid.any(1), np.nansum(np.where(valid, aucs, 0), 1) / valid.sum(1).clip(min=1), np.nan)
    # confusion matrix per weighting: [B, true, pred]
    pairs = y * num_classes + p.argmax(axis=1)
    onehot = np.zeros((len(y), num_classes * num_classes))
    onehot[np.arange(len(y)), pairs] = 1.0
    conf = (w @ onehot).reshape(-1, num_classes, num_classes)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    support, predicted = conf.sum(2), conf.sum(1)
    total = support.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        present = support > 0
        balanced = np.nansum(np.where(present, recall, 0), 1) / present.sum(1).clip(min=1)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
        weighted_f1 = (f1 * support).sum(1) / total
        accuracy = tp.sum(1) / total
    return {"macro_auc": macro, "balanced_accuracy": balanced, "weighted_f1": weighted_f1, "accuracy": accuracy}


def roc_curves(y_true, probs, class_names=None) -> dict[str, dict]:
    """One-vs-rest ROC curves `{class_name: {"fpr", "tpr", "auc"}}` (binary: one curve for class 1)."""
    from sklearn.metrics import auc, roc_curve

    y, p = _as_arrays(y_true, probs)
    names = list(class_names) if class_names is not None else [str(c) for c in range(p.shape[1])]
    classes = [1] if p.shape[1] == 2 else auc_classes(y)
    curves = {}
    for c in classes:
        if (y == c).all() or not (y == c).any():
            continue
        fpr, tpr, _ = roc_curve(y == c, p[:, c])
        curves[names[c]] = {"fpr": fpr, "tpr": tpr, "auc": float(auc(fpr, tpr))}
    return curves


__all__ = ["METRICS", "PRIMARY_METRIC", "auc_classes", "classification_metrics", "classification_metrics_weighted",
           "macro_auc", "roc_curves"]
