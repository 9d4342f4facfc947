"""The one bag collator: slides of different patch counts right-padded into one batch.

Every training entry point (Stage 1's `MStarDataCollator`, report generation, MIL fine-tuning) pads
through `pad_bags`, so masks and coordinates mean the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_bags(features: Sequence[torch.Tensor | None], coords: Sequence[torch.Tensor | None] | None = None,
             *, length: int | None = None, dim: int | None = None, mask_key: str = "patch_attention_mask") -> dict:
    """Right-pads bags `[n_i, D]` into `patch_features` `[B, N, D]` (zeros) and `mask_key` `[B, N]` (True on
    real patches); `patch_coords` `[B, N, 2]` when every bag has coords. A `None` bag (a case without a
    slide) stays all padding. `length`: pad to this many patches (default: the longest bag, at least 1);
    `dim`: the width when every bag is None."""
    widths = {int(f.shape[1]) for f in features if f is not None}
    if len(widths) > 1:
        raise ValueError(f"pad_bags: bags of different widths {sorted(widths)}.")
    width = next(iter(widths)) if widths else dim
    if width is None:
        raise ValueError("pad_bags: no bag has features; pass dim=.")
    longest = max([int(f.shape[0]) for f in features if f is not None], default=0)
    n = length if length is not None else max(longest, 1)
    if longest > n:
        raise ValueError(f"pad_bags: a bag has {longest} patches, more than length={n}.")
    batch = len(features)
    out = {"patch_features": torch.zeros(batch, n, width, dtype=torch.float32),
           mask_key: torch.zeros(batch, n, dtype=torch.bool)}
    with_coords = coords is not None and len(coords) == batch and all(
        c is not None for f, c in zip(features, coords) if f is not None)
    if with_coords:
        out["patch_coords"] = torch.zeros(batch, n, 2, dtype=torch.long)
    for i, f in enumerate(features):
        if f is None:
            continue
        rows = int(f.shape[0])
        out["patch_features"][i, :rows] = torch.as_tensor(f, dtype=torch.float32)
        out[mask_key][i, :rows] = True
        if with_coords:
            out["patch_coords"][i, :rows] = torch.as_tensor(coords[i], dtype=torch.long)
    return out


__all__ = ["pad_bags"]
