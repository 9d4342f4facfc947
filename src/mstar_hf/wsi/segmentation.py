"""Tissue segmentation on a low-resolution image of the slide (CLAM-style).

Saturation (HSV) separates stained tissue from the grey/white glass; a median blur removes grain,
Otsu picks the threshold (floored so a blank slide does not turn its noise into "tissue"),
morphological closing joins fragments, then small objects are dropped and small holes filled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .slide import WSI


def _cv2():
    # imported on first use, inside `try`: this file travels as remote code with the pipelines (see slide.py)
    try:
        import cv2
    except ImportError as exc:
        raise ImportError("tissue segmentation needs OpenCV: pip install opencv-python-headless") from exc
    return cv2


@dataclass
class TissueMask:
    """Binary tissue mask of a slide at `downsample` (level-0 pixels per mask pixel)."""

    mask: np.ndarray  # (h, w) bool
    downsample: tuple[float, float]  # level-0 pixels per mask pixel along x, y
    mpp: float  # microns per mask pixel
    threshold: float  # saturation threshold used (0..255)
    image: np.ndarray = field(repr=False)  # the RGB image that was segmented (h, w, 3) uint8

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def contours(self) -> list[np.ndarray]:
        """Outer and hole contours in mask pixels (OpenCV format), for drawing."""
        cv2 = _cv2()

        contours, _ = cv2.findContours(self.mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        return list(contours)

    def fraction_in_boxes(self, xy0: np.ndarray, size0: float) -> np.ndarray:
        """Tissue fraction inside each level-0 box [x, x + size0) x [y, y + size0), from an integral image."""
        cv2 = _cv2()

        integral = cv2.integral(self.mask.astype(np.uint8), sdepth=cv2.CV_64F)
        h, w = self.mask.shape
        sx, sy = self.downsample
        xy0 = np.asarray(xy0, np.float64).reshape(-1, 2)
        x0 = np.clip(np.round(xy0[:, 0] / sx), 0, w).astype(int)
        y0 = np.clip(np.round(xy0[:, 1] / sy), 0, h).astype(int)
        x1 = np.clip(np.round((xy0[:, 0] + size0) / sx), 0, w).astype(int)
        y1 = np.clip(np.round((xy0[:, 1] + size0) / sy), 0, h).astype(int)
        # Boxes smaller than one mask pixel still cover the pixel they fall in.
        x1 = np.maximum(x1, np.minimum(x0 + 1, w))
        y1 = np.maximum(y1, np.minimum(y0 + 1, h))
        x0, y0 = np.minimum(x0, x1 - 1).clip(0), np.minimum(y0, y1 - 1).clip(0)
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        return inside / area


def segment_tissue(
    wsi: WSI,
    seg_mpp: float = 4.0,
    median_kernel: int = 7,
    min_saturation: float = 15.0,
    threshold: float | None = None,
    close_kernel: int = 5,
    min_tissue_area_um2: float = 40_000.0,
    max_hole_area_um2: float = 10_000.0,
    max_seg_pixels: int = 1 << 25,
) -> TissueMask:
    """Segment tissue at about `seg_mpp` microns per pixel (4.0 = about 2.5x), never finer than level 0.

    median_kernel: odd blur size in mask pixels. min_saturation: floor for the Otsu threshold (0..255),
    so a blank slide has no tissue. threshold: fixed saturation threshold instead of Otsu.
    close_kernel: elliptical closing size in mask pixels (0 disables). min_tissue_area_um2: tissue
    pieces smaller than this are dropped. max_hole_area_um2: holes smaller than this are filled.
    max_seg_pixels: caps the mask size for very large slides by coarsening `seg_mpp`.
    """
    cv2 = _cv2()

    W, H = wsi.dimensions
    downsample = max(1.0, seg_mpp / wsi.mpp)
    if (W / downsample) * (H / downsample) > max_seg_pixels:
        downsample = float(np.sqrt(W * H / max_seg_pixels))
    rgb = wsi.read_downsampled(downsample)
    h, w = rgb.shape[:2]
    scale = (W / w, H / h)
    mask_mpp = wsi.mpp * (scale[0] + scale[1]) / 2

    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    if median_kernel and median_kernel > 1:
        sat = cv2.medianBlur(sat, int(median_kernel) | 1)
    if threshold is None:
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(float(otsu), float(min_saturation))
    mask = (sat > threshold).astype(np.uint8)
    if close_kernel and close_kernel > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(close_kernel), int(close_kernel)))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    px_area_um2 = mask_mpp**2
    mask = _remove_small_components(mask, min_tissue_area_um2 / px_area_um2)
    mask = _fill_small_holes(mask, max_hole_area_um2 / px_area_um2)
    return TissueMask(mask=mask.astype(bool), downsample=scale, mpp=mask_mpp, threshold=float(threshold), image=rgb)


def _remove_small_components(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    cv2 = _cv2()

    if min_area_px <= 1 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False  # background label
    return keep[labels].astype(np.uint8)


def _fill_small_holes(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill background components smaller than `max_area_px` that do not touch the image border."""
    cv2 = _cv2()

    if max_area_px <= 0 or mask.all():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask == 0).astype(np.uint8), connectivity=4)
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    h, w = mask.shape
    touches_border = (x == 0) | (y == 0) | (x + bw >= w) | (y + bh >= h)
    fill = (stats[:, cv2.CC_STAT_AREA] <= max_area_px) & ~touches_border
    fill[0] = False  # label 0 is the tissue itself
    out = mask.copy()
    out[fill[labels]] = 1
    return out


__all__ = ["TissueMask", "segment_tissue"]
