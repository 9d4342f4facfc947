"""Synthetic whole-slide images for tests, benches and the demo.

`write_pyramidal_tiff` stores any RGB array as a tiled pyramidal TIFF that OpenSlide opens as
"generic-tiff" with every level and the right mpp: each level is a successive top-level tiled IFD
(OpenSlide ignores SubIFD pyramids) carrying X/YResolution in pixels per centimetre.
`make_tissue_image` paints tissue-like blobs with nuclei on a white background. The two are
independent so other painters (e.g. per cancer type) can reuse the writer.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

_COMPRESSIONS = {"jpeg": "jpeg", "zlib": "zlib", "deflate": "zlib", "none": None, None: None}


def _pil_jpeg_encode(data, level=None, colorspace=None, outcolorspace=None, subsampling=None, **_):
    """JPEG tile encoder with tifffile's codec signature, used when `imagecodecs` is not installed.

    tifffile writes JPEG tiles as YCbCr with (2, 2) chroma subsampling by default; Pillow's RGB JPEG
    encoder stores exactly that (4:2:0 YCbCr), so the TIFF tags tifffile writes stay truthful.
    """
    from PIL import Image

    arr = np.ascontiguousarray(np.asarray(data).reshape(np.asarray(data).shape[-3:]))
    pil_subsampling = {(1, 1): 0, (2, 1): 1, (2, 2): 2}.get(tuple(subsampling or (2, 2)), 2)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(level or 90), subsampling=pil_subsampling)
    return buf.getvalue()


def _ensure_jpeg_codec():
    # tifffile gets its JPEG encoder from the optional `imagecodecs` package; without it, register
    # Pillow's encoder in tifffile's codec table (the only hook tifffile offers for a missing codec).
    from tifffile import TIFF

    try:
        TIFF.COMPRESSORS[7]
    except KeyError:
        TIFF.COMPRESSORS._codecs[7] = _pil_jpeg_encode


def _pyramid(image: np.ndarray, min_level_size: int):
    """Yield level 0, then successive 2x area-averaged reductions while the longer side stays >= min_level_size."""
    import cv2

    level = image
    yield level
    while True:
        h, w = level.shape[:2]
        nh, nw = h // 2, w // 2
        if max(nh, nw) < min_level_size or min(nh, nw) < 1:
            return
        level = cv2.resize(level, (nw, nh), interpolation=cv2.INTER_AREA)
        yield level


def write_pyramidal_tiff(
    path,
    image: np.ndarray,
    mpp: float | None = 0.25,
    tile_size: int = 256,
    min_level_size: int = 512,
    compression: str | None = "jpeg",
    quality: int = 90,
    description: str = "mstar-hf synthetic slide",
) -> Path:
    """Write `image` (H, W, 3) uint8 as a tiled pyramidal TIFF; returns the path.

    Level k has downsample 2**k; levels are added while the longer side is >= `min_level_size`.
    `mpp=None` writes no resolution, giving a slide whose resolution OpenSlide cannot tell
    (for testing `--mpp`). `compression`: "jpeg" (as scanners do), "zlib"/"deflate" (lossless) or "none".
    BigTIFF is used when the raw pixels exceed 2 GiB.
    """
    import tifffile

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if tile_size % 16:
        raise ValueError(f"tile_size must be a multiple of 16 (TIFF tiles, JPEG blocks), got {tile_size}")
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be one of {sorted(k for k in _COMPRESSIONS if k)} or None")
    comp = _COMPRESSIONS[compression]
    kwargs = {}
    if comp == "jpeg":
        _ensure_jpeg_codec()
        kwargs["compressionargs"] = {"level": int(quality)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bigtiff = image.nbytes * 4 // 3 > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for k, level in enumerate(_pyramid(image, min_level_size)):
            res = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2**k)
                res = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(
                level,
                tile=(tile_size, tile_size),
                photometric="rgb",
                compression=comp,
                subfiletype=0 if k == 0 else 1,  # 1 = reduced-resolution version of level 0
                description=description if k == 0 else None,
                metadata=None,  # no tifffile JSON description: the slide must look like a generic TIFF
                maxworkers=2,
                **res,
                **kwargs,
            )
    return path


def _smooth_noise(rng, shape, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise normalised to zero mean, unit std (float32)."""
    import cv2

    field = rng.standard_normal(shape).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigmaX=max(sigma, 0.5), borderType=cv2.BORDER_REFLECT)
    return (field - field.mean()) / (field.std() + 1e-8)


def _upsample_band(low: np.ndarray, scale: float, r0: int, r1: int, width: int) -> np.ndarray:
    """Rows [r0, r1) of `low` bilinearly upsampled by `scale`, consistent across bands (no seams)."""
    import cv2

    # Affine map from output (x, y) to low-res coordinates, pixel centres aligned.
    m = np.array([[1 / scale, 0, 0.5 / scale - 0.5], [0, 1 / scale, (r0 + 0.5) / scale - 0.5]], np.float32)
    return cv2.warpAffine(low, m, (width, r1 - r0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _bilinear_at(low: np.ndarray, scale: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Values of the upsampled field at full-resolution points (same mapping as `_upsample_band`)."""
    h, w = low.shape
    lx = np.clip((xs + 0.5) / scale - 0.5, 0, w - 1)
    ly = np.clip((ys + 0.5) / scale - 0.5, 0, h - 1)
    x0, y0 = np.floor(lx).astype(int), np.floor(ly).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = lx - x0, ly - y0
    top = low[y0, x0] * (1 - fx) + low[y0, x1] * fx
    bottom = low[y1, x0] * (1 - fx) + low[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def make_tissue_image(
    height: int,
    width: int,
    seed: int = 0,
    *,
    tissue_fraction: float = 0.35,
    blob_scale: float = 0.08,
    base_color=(214, 140, 178),
    stroma_color=(236, 176, 200),
    background_color=(242, 241, 239),
    texture_scale: float = 24.0,
    nuclear_density: float = 4.0,
    nucleus_color=(82, 44, 122),
    nucleus_radius=(3.0, 7.0),
    noise: float = 6.0,
) -> np.ndarray:
    """Paint an H&E-like image: pink/purple tissue blobs with dark nuclei on a near-white background.

    tissue_fraction: share of the area covered by tissue. blob_scale: blob size as a fraction of the
    shorter side. base_color / stroma_color: the two tissue tones mixed by a smooth texture field of
    `texture_scale` pixels. nuclear_density: nuclei per 100x100 tissue pixels, drawn in `nucleus_color`
    with radii uniform in `nucleus_radius` (pixels). noise: per-pixel grain (std, grey levels).
    Returns (height, width, 3) uint8. Deterministic for a given seed.
    """
    import cv2

    if not 0 <= tissue_fraction <= 1:
        raise ValueError(f"tissue_fraction must be in [0, 1], got {tissue_fraction}")
    rng = np.random.default_rng(seed)
    H, W = int(height), int(width)
    img = np.empty((H, W, 3), np.uint8)
    img[:] = np.asarray(background_color, np.uint8)

    # Low-resolution fields, upsampled band by band so huge images never need full-size floats.
    tissue_step = max(1, int(min(H, W) * blob_scale / 4))
    tissue_low = _smooth_noise(rng, (max(2, -(-H // tissue_step)), max(2, -(-W // tissue_step))), 4.0)
    threshold = np.quantile(tissue_low, 1 - tissue_fraction) if tissue_fraction > 0 else np.inf
    tex_step = max(1, int(texture_scale / 2))
    tex_low = _smooth_noise(rng, (max(2, -(-H // tex_step)), max(2, -(-W // tex_step))), 2.0)
    base = np.asarray(base_color, np.float32)
    diff = np.asarray(stroma_color, np.float32) - base
    band = 1024
    grain = None
    if noise > 0:  # one band of grain, tiled from a 509 px pattern (prime: no visible alignment with tiles)
        tile = rng.normal(0, noise, (509, 509, 3)).astype(np.float32)
        grain = np.tile(tile, (-(-min(band, H) // 509), -(-W // 509), 1))[: min(band, H), :W]
    for r0 in range(0, H, band):
        r1 = min(H, r0 + band)
        mask = _upsample_band(tissue_low, tissue_step, r0, r1, W) >= threshold
        if not mask.any():
            continue
        mix = np.clip(_upsample_band(tex_low, tex_step, r0, r1, W) * 0.35 + 0.5, 0, 1)
        colour = mix[..., None] * diff
        colour += base
        if grain is not None:
            colour += grain[: r1 - r0]
        np.clip(colour, 0, 255, out=colour)
        np.copyto(img[r0:r1], colour.astype(np.uint8), where=mask[..., None])

    # Nuclei: Poisson count over the tissue area, kept where the tissue field says "inside".
    area = tissue_fraction * H * W
    n = rng.poisson(nuclear_density * area / 1e4) if nuclear_density > 0 and tissue_fraction > 0 else 0
    if n:
        n_try = int(n / max(tissue_fraction, 1e-3))
        xs = rng.uniform(0, W, n_try)
        ys = rng.uniform(0, H, n_try)
        keep = _bilinear_at(tissue_low, tissue_step, xs, ys) >= threshold
        xs, ys = xs[keep][:n], ys[keep][:n]
        radii = rng.uniform(nucleus_radius[0], nucleus_radius[1], len(xs))
        axes_ratio = rng.uniform(0.6, 1.0, len(xs))
        angles = rng.uniform(0, 180, len(xs))
        shade = rng.uniform(-18, 18, len(xs))
        colours = np.clip(np.asarray(nucleus_color, np.float32) + shade[:, None], 0, 255).astype(int).tolist()
        for x, y, r, q, a, c in zip(xs.astype(int).tolist(), ys.astype(int).tolist(), radii.tolist(),
                                    axes_ratio.tolist(), angles.tolist(), colours):
            cv2.ellipse(img, (x, y), (max(1, int(r)), max(1, int(r * q))), a, 0, 360, c, -1, lineType=cv2.LINE_AA)
    return img


def make_synthetic_slide(
    path,
    height: int,
    width: int,
    seed: int = 0,
    mpp: float | None = 0.25,
    tile_size: int = 256,
    compression: str = "jpeg",
    **paint_kwargs,
) -> Path:
    """Convenience: paint with `make_tissue_image` and write with `write_pyramidal_tiff`."""
    image = make_tissue_image(height, width, seed, **paint_kwargs)
    return write_pyramidal_tiff(path, image, mpp=mpp, tile_size=tile_size, compression=compression)


__all__ = ["write_pyramidal_tiff", "make_tissue_image", "make_synthetic_slide"]
