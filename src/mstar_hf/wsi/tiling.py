"""Patch grid over the tissue: square patches at a target resolution, coordinates in level-0 pixels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import NoTissueError, SlideTooSmallError
from .segmentation import TissueMask, segment_tissue
from .slide import WSI, ReadPlan, mpp_to_magnification


@dataclass
class TileGrid:
    """Patches kept on a slide. `coords` are level-0 top-left corners, row-major order."""

    coords: np.ndarray  # (N, 2) int64, (x, y)
    tissue_fraction: np.ndarray  # (N,) float32, tissue share of each kept patch
    plan: ReadPlan  # level and size read per patch
    patch_size: int  # pixels at the target resolution
    target_mpp: float
    overlap: int  # pixels at the target resolution
    min_tissue: float
    stride_level0: int
    mpp: float  # level-0 microns per pixel of the slide
    mpp_source: str
    level0_width: int
    level0_height: int
    n_candidates: int  # grid positions before the tissue filter
    tissue: TissueMask | None = field(default=None, repr=False)

    @property
    def patch_size_level0(self) -> int:
        return self.plan.patch_size_level0

    @property
    def target_magnification(self) -> float:
        return mpp_to_magnification(self.target_mpp)

    def __len__(self):
        return len(self.coords)

    def attrs(self) -> dict:
        """Tiling metadata for the feature file (TRIDENT/CLAM attribute names where they exist)."""
        return {
            "patch_size": int(self.patch_size),
            "patch_size_level0": int(self.patch_size_level0),
            "target_magnification": float(self.target_magnification),
            "target_mpp": float(self.target_mpp),
            "mpp": float(self.mpp),
            "mpp_source": self.mpp_source,
            "level0_magnification": float(mpp_to_magnification(self.mpp)),
            "level0_width": int(self.level0_width),
            "level0_height": int(self.level0_height),
            "overlap": int(self.overlap),
            "min_tissue": float(self.min_tissue),
            "patch_level": int(self.plan.level),
            "patch_level_downsample": float(self.plan.level_downsample),
            "read_size": int(self.plan.read_size),
        }


def tile_slide(
    wsi: WSI,
    patch_size: int = 256,
    target_mpp: float = 0.5,
    overlap: int = 0,
    min_tissue: float = 0.5,
    tissue: TissueMask | None = None,
    **seg_params,
) -> TileGrid:
    """Grid of `patch_size` patches at `target_mpp` (0.5 = 20x) whose tissue share is >= `min_tissue`.

    overlap: pixels shared by neighbouring patches at the target resolution. Only patches wholly
    inside the slide are kept. `tissue` reuses a mask; otherwise `segment_tissue(wsi, **seg_params)`.
    Raises `SlideTooSmallError` when not one patch fits and `NoTissueError` when none has tissue
    enough, both naming the file.
    """
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if not 0 <= overlap < patch_size:
        raise ValueError(f"overlap must be in [0, patch_size), got {overlap}")
    if not 0 <= min_tissue <= 1:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
    plan = wsi.plan_read(patch_size, target_mpp)
    W, H = wsi.dimensions
    ps0 = plan.patch_size_level0
    stride0 = max(1, round(ps0 * (patch_size - overlap) / patch_size))
    if W < ps0 or H < ps0:
        raise SlideTooSmallError(
            wsi.path,
            f"slide is {W}x{H} level-0 pixels, smaller than one {patch_size} px patch at {target_mpp:g} um/px "
            f"({ps0}x{ps0} level-0 pixels)",
        )
    xs = np.arange(0, W - ps0 + 1, stride0, dtype=np.int64)
    ys = np.arange(0, H - ps0 + 1, stride0, dtype=np.int64)
    grid = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(-1, 2)  # row-major: y outer, x inner
    if tissue is None:
        tissue = segment_tissue(wsi, **seg_params)
    frac = tissue.fraction_in_boxes(grid, ps0)
    keep = frac >= min_tissue if min_tissue > 0 else np.ones(len(grid), bool)
    if not keep.any():
        raise NoTissueError(
            wsi.path,
            f"no tissue: 0 of {len(grid)} patches have >= {min_tissue:.0%} tissue "
            f"(tissue mask covers {tissue.tissue_fraction:.1%} of the slide, saturation threshold "
            f"{tissue.threshold:.0f})",
        )
    return TileGrid(
        coords=np.ascontiguousarray(grid[keep], dtype=np.int64),
        tissue_fraction=frac[keep].astype(np.float32),
        plan=plan,
        patch_size=int(patch_size),
        target_mpp=float(target_mpp),
        overlap=int(overlap),
        min_tissue=float(min_tissue),
        stride_level0=int(stride0),
        mpp=float(wsi.mpp),
        mpp_source=wsi.mpp_source,
        level0_width=int(W),
        level0_height=int(H),
        n_candidates=int(len(grid)),
        tissue=tissue,
    )


__all__ = ["TileGrid", "tile_slide"]
