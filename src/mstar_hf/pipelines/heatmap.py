"""Heatmaps of per-patch scores over the slide thumbnail (matplotlib, PNG).

>>> res = pipe("features/slide.h5", candidate_labels=[...], return_patch_scores=True)
>>> save_zero_shot_heatmap(res, "heatmap.png")          # the top-scoring class, on the slide the h5 records
>>> save_zero_shot_heatmap(res, "b.png", label="b", slide="elsewhere/slide.svs")
>>> save_heatmap("slide.svs", res[0]["coords"], res[0]["patch_scores"], res[0]["patch_size_level0"], "c0.png")

From the command line: `mstar-hf heatmap` (mstar_hf.commands.heatmap).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def score_grid(coords: np.ndarray, scores: np.ndarray, patch_size_level0: int, downsample: float,
               shape: tuple[int, int]) -> np.ndarray:
    """Float image of `shape` (h, w) at `downsample`, each patch's box filled with its score, NaN elsewhere.
    Overlapping patches average."""
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.float64)
    h, w = shape
    for (x, y), s in zip(np.asarray(coords), np.asarray(scores, dtype=np.float64)):
        x0, y0 = int(np.floor(x / downsample)), int(np.floor(y / downsample))
        x1 = max(x0 + 1, int(np.ceil((x + patch_size_level0) / downsample)))
        y1 = max(y0 + 1, int(np.ceil((y + patch_size_level0) / downsample)))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 > x0 and y1 > y0:
            total[y0:y1, x0:x1] += s
            count[y0:y1, x0:x1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def save_heatmap(slide_path, coords, scores, patch_size_level0: int, out_png, *, title: str | None = None,
                 max_size: int = 1024, cmap: str = "RdYlBu_r", alpha: float = 0.5, vmin: float | None = None,
                 vmax: float | None = None, mpp: float | None = None, label: str = "patch score") -> Path:
    """Draw `scores` (one per patch, `[N]`) over the slide thumbnail and write a PNG; returns its path.

    coords: `[N, 2]` level-0 (x, y) top-left corners; patch_size_level0: a patch's extent in level-0
    pixels (both as the pipelines return them). `mpp` overrides the slide's resolution when its
    metadata has none. Raises `ValueError` when coords and scores disagree.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from mstar_hf.wsi.slide import open_slide

    coords = np.asarray(coords)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"save_heatmap: scores must be one value per patch [N], got shape {scores.shape} "
                         f"(take one column of the [N, C] patch scores).")
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(scores):
        raise ValueError(f"save_heatmap: coords {coords.shape} do not match scores {scores.shape}: expected [N, 2] and [N].")
    if not patch_size_level0 or patch_size_level0 <= 0:
        raise ValueError(f"save_heatmap: patch_size_level0 must be a positive number of level-0 pixels, got {patch_size_level0!r}.")
    with open_slide(slide_path, mpp_override=mpp) as wsi:
        width, height = wsi.dimensions
        thumb = np.asarray(wsi.thumbnail(max_size))
    downsample = max(width / thumb.shape[1], height / thumb.shape[0])
    grid = score_grid(coords, scores, int(patch_size_level0), downsample, thumb.shape[:2])

    fig, ax = plt.subplots(figsize=(8, 8 * thumb.shape[0] / max(1, thumb.shape[1]) + 0.6), dpi=120)
    ax.imshow(thumb)
    finite = scores[np.isfinite(scores)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, alpha=alpha, vmin=lo, vmax=hi, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label=label)
    ax.set_title(title or f"{Path(os.fspath(slide_path)).name}: {len(scores)} patches", fontsize=10)
    ax.set_axis_off()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def save_zero_shot_heatmap(result, out_png, label: str | None = None, slide=None, **kwargs) -> Path:
    """Heatmap of one class from a `wsi-zero-shot` result computed with `return_patch_scores=True`.

    result: the list the pipeline returns for one input. label: the class to draw (default: the top
    prediction; it must be among the returned labels). slide: the slide file to draw on; by default the
    one the result came from: the slide path given to the pipeline, or the slide a features h5 records
    (its `slide_path` attribute, or its `slide` name next to the h5) when that file still exists.
    Other keyword arguments go to `save_heatmap`.
    """
    if isinstance(result, dict) and "predictions" in result:
        raise ValueError("save_zero_shot_heatmap takes the list wsi-zero-shot returns (its entries carry the "
                         "patch scores), not a dict.")
    if not isinstance(result, list) or not result or not isinstance(result[0], dict) or "patch_scores" not in result[0]:
        raise ValueError("save_zero_shot_heatmap needs the list a wsi-zero-shot call returns for one input, computed "
                         "with return_patch_scores=True.")
    if label is None:
        entry = result[0]
    else:
        entry = next((e for e in result if e["label"] == label), None)
        if entry is None:
            raise KeyError(f"label {label!r} is not among the returned labels {[e['label'] for e in result]} "
                           f"(a top_k smaller than the number of classes drops the others).")
    source = entry.get("source")
    slide_path = slide if slide is not None else entry.get("slide_path")
    if slide_path is None:
        raise ValueError(f"{source}: the slide these patches come from is unknown (a features h5 records it when "
                         f"`mstar-hf extract` wrote it and the slide is still there): pass slide= "
                         f"(mstar-hf heatmap --slide).")
    if entry.get("coords") is None:
        raise ValueError(f"{source}: no patch coordinates to place the scores on the slide (give features with "
                         f"coords, e.g. a features h5).")
    label = entry["label"]
    kwargs.setdefault("title", f"{Path(os.fspath(slide_path)).name}: cosine with {label!r}")
    kwargs.setdefault("label", f"cosine similarity to {label!r}")
    return save_heatmap(slide_path, entry["coords"], entry["patch_scores"], entry["patch_size_level0"], out_png,
                        **kwargs)


__all__ = ["save_heatmap", "save_zero_shot_heatmap", "score_grid"]
