"""Figures of downstream evaluation: ROC curves, Kaplan-Meier curves by predicted risk group, few-shot
curves, and a slide's attention heatmap over its thumbnail. All write PNG files with the Agg backend."""

from __future__ import annotations

import math
import os

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(y_true, probs_by_name: dict[str, np.ndarray], class_names: list[str], path: str | os.PathLike,
             title: str = "ROC") -> str:
    """One panel per feature set with one-vs-rest ROC curves per class (binary: the positive class)."""
    from .classification import macro_auc, roc_curves

    plt = _pyplot()
    names = list(probs_by_name)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], names):
        probs = probs_by_name[name]
        for cls, curve in roc_curves(y_true, probs, class_names).items():
            ax.plot(curve["fpr"], curve["tpr"], linewidth=1.4, label=f"{cls} (AUC {curve['auc']:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{name}: macro-AUC {macro_auc(y_true, probs):.3f}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return os.fspath(path)


def plot_kaplan_meier(times, events, risk_by_name: dict[str, np.ndarray], path: str | os.PathLike,
                      groups=None, title: str = "Kaplan-Meier by predicted risk") -> str:
    """One panel per feature set: Kaplan-Meier curves (lifelines) of the high- and low-risk halves (split at
    the median risk, within each of `groups`, e.g. folds), with the log-rank p-value and the C-index."""
    from lifelines import KaplanMeierFitter

    from .survival import concordance_index, logrank_p_value, risk_groups

    plt = _pyplot()
    times = np.asarray(times, dtype=np.float64)
    events = np.asarray(events).astype(int)
    names = list(risk_by_name)
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 4.2), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], names):
        risk = np.asarray(risk_by_name[name])
        high = risk_groups(risk, groups).astype(bool)
        for label, rows, color in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
            if rows.any():
                kmf = KaplanMeierFitter(label=f"{label} (n={int(rows.sum())})")
                kmf.fit(times[rows], event_observed=events[rows])
                kmf.plot_survival_function(ax=ax, ci_show=True, color=color)
        p = logrank_p_value(times, events, high)
        c = concordance_index(times, events, risk)
        ax.set_title(f"{name}: C-index {c:.3f}, log-rank p={p:.2g}" if math.isfinite(p) else name, fontsize=10)
        ax.set_xlabel("time")
        ax.set_ylabel("survival probability")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return os.fspath(path)


def plot_few_shot(curves: dict[str, dict[int, dict]], metric: str, path: str | os.PathLike,
                  title: str = "few-shot") -> str:
    """`metric` against the number of shots, one line per feature set, with its 95% CI band.
    `curves[name][shots] = {"value", "ci_low", "ci_high"}`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for name, by_k in curves.items():
        ks = sorted(by_k)
        ax.plot(ks, [by_k[k]["value"] for k in ks], marker="o", label=name)
        ax.fill_between(ks, [by_k[k]["ci_low"] for k in ks], [by_k[k]["ci_high"] for k in ks], alpha=0.2)
    ax.set_xscale("log", base=2)
    all_k = sorted({k for by_k in curves.values() for k in by_k})
    ax.set_xticks(all_k, [str(k) for k in all_k])
    ax.set_xlabel("shots per class")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return os.fspath(path)


def attention_percentiles(scores) -> np.ndarray:
    """Scores as percentiles in [0, 1] (rank-based, as CLAM heatmaps), so slides are comparable."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(np.argsort(scores, kind="stable"), kind="stable")
    return order / max(len(scores) - 1, 1)


def patch_size_from_coords(coords) -> float:
    """The smallest positive spacing of the coordinates (the patch side of a non-overlapping grid)."""
    coords = np.asarray(coords, dtype=np.float64)
    steps = np.concatenate([np.diff(np.unique(coords[:, k])) for k in (0, 1)])
    steps = steps[steps > 0]
    return float(steps.min()) if len(steps) else 256.0


def plot_attention_heatmap(slide_path, coords, scores, path: str | os.PathLike, patch_size_level0: float | None = None,
                           title: str | None = None, thumbnail_size: int = 1024) -> str:
    """A MIL head's attention over the slide thumbnail: each patch coloured by the percentile of its score.

    Drawn by `mstar_hf.pipelines.heatmap.save_heatmap` (OpenSlide thumbnail + matplotlib). `coords` are
    level-0 top-left corners [N, 2]; the patch side at level 0 defaults to the coordinate spacing.
    """
    from ..pipelines.heatmap import save_heatmap

    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != np.asarray(scores).size:
        raise ValueError(f"coords must be [N, 2] with N = number of scores ({np.asarray(scores).size}), got {coords.shape}.")
    size = patch_size_level0 or patch_size_from_coords(coords)
    out = save_heatmap(slide_path, coords, attention_percentiles(scores), size, path, title=title, vmin=0.0, vmax=1.0,
                       max_size=thumbnail_size, cmap="jet", alpha=0.45, label="attention (percentile)")
    return os.fspath(out)


__all__ = ["attention_percentiles", "patch_size_from_coords", "plot_attention_heatmap", "plot_few_shot",
           "plot_kaplan_meier", "plot_roc"]
