"""Quality-control picture of a slide: thumbnail, tissue contours and the patch grid (like CLAM's stitch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .segmentation import TissueMask, _cv2

CONTOUR_RGB = (0, 170, 0)
PATCH_RGB = (30, 60, 230)


def render_qc_image(tissue: TissueMask, coords=None, patch_size_level0: int | None = None, title: str | None = None,
                    max_size: int = 2048) -> np.ndarray:
    """RGB uint8 picture: the segmented thumbnail with tissue contours (green) and patches (blue boxes)."""
    cv2 = _cv2()

    img = np.ascontiguousarray(tissue.image.copy())
    sx, sy = tissue.downsample
    contours = tissue.contours()
    h, w = img.shape[:2]
    f = min(1.0, max_size / max(h, w))
    # Small thumbnails are enlarged so a 256 px patch spans enough pixels to see its box.
    if max(h, w) < 1024:
        f = 1024 / max(h, w)
    if f != 1.0:
        img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))),
                         interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
        contours = [np.round(c * f).astype(np.int32) for c in contours]
    line = max(1, round(max(img.shape[:2]) / 800))
    cv2.drawContours(img, contours, -1, CONTOUR_RGB, line + 1, lineType=cv2.LINE_AA)
    if coords is not None and len(coords) and patch_size_level0:
        kx, ky = f / sx, f / sy
        for x, y in np.asarray(coords):
            p0 = (int(round(x * kx)), int(round(y * ky)))
            p1 = (int(round((x + patch_size_level0) * kx)) - 1, int(round((y + patch_size_level0) * ky)) - 1)
            cv2.rectangle(img, p0, p1, PATCH_RGB, line)
    if title:
        scale = max(0.4, img.shape[1] / 1800)
        (tw, th), base = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(img, (0, 0), (min(img.shape[1], tw + 10), th + base + 10), (255, 255, 255), -1)
        cv2.putText(img, title, (5, th + 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def save_qc_image(path, tissue: TissueMask, coords=None, patch_size_level0: int | None = None,
                  title: str | None = None, max_size: int = 2048) -> Path:
    """Write the QC PNG (temporary name, then rename). Returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = render_qc_image(tissue, coords, patch_size_level0, title, max_size)
    tmp = path.with_name(path.name + ".tmp")
    # zlib level 1: lossless still, ~4x faster than the default 6 (a QC image per slide, beside the GPU)
    Image.fromarray(img).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)
    return path


__all__ = ["render_qc_image", "save_qc_image"]
