"""A slide painter where the cancer type has to be learned, not read off the colours.

Real cohorts vary far more in stain between slides (lab, scanner, protocol) than in colour between
cancer types. This painter reproduces that nuisance and hides the type in morphology:

* Stain: every slide draws its own hematoxylin and eosin optical-density vectors, concentrations and
  a scanner tint from ONE pool shared by all types; pixels follow Beer-Lambert,
  `rgb = 255 * exp(-(c_H * od_H + c_E * od_E))`, white-balanced per slide to a fixed tissue mix under
  the slide's own stain (so the mean colour says nothing of the pattern mix).
* Tissue: five patterns that every type has (stroma, glands, solid sheets, lymphoid infiltrate,
  adipose), laid out as irregular regions. Types differ only in the *mix* of patterns, the size of the
  regions (arrangement) and, slightly, nuclear size and shape. A single 256-px patch shows one or two
  patterns, which all types share: weak evidence; a slide shows dozens of regions: strong evidence.

Everything is a deterministic function of the generator passed in.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PATTERNS = ("stroma", "glands", "solid", "lymphoid", "adipose")
# Pattern mix of the first types (rows sum to 1); further types take a generated mix (`type_morphology`).
_MIXES = np.array([
    [0.50, 0.26, 0.08, 0.08, 0.08],
    [0.08, 0.08, 0.56, 0.20, 0.08],
    [0.18, 0.08, 0.08, 0.10, 0.56],
])
# Mean region diameter in pixels at 0.5 um/px and nuclear size / elongation per type (first types).
_REGION_SIZE = [220.0, 170.0, 280.0]
_NUCLEUS_SCALE = [1.0, 1.12, 0.9]
_ELONGATION = [0.75, 0.85, 0.7]
BACKGROUND = (242, 241, 239)
# Mean hematoxylin / eosin concentration of every pattern (see `paint_tissue`).
_MEAN_H, _MEAN_E = 0.22, 0.5
# per-pattern correction for Beer-Lambert's non-linearity: sparse dark structures on a pale ground
# (adipose) transmit more light than the same mean uptake spread evenly (solid sheets); what is left,
# slide by slide, the white balance of `_colour_gain` takes out
_UPTAKE = (1.0, 1.0, 0.8, 1.05, 1.6)


def type_morphology(type_index: int) -> dict:
    """Pattern mix, region size, nuclear scale and elongation of a type (the latent truth of its slides)."""
    if type_index < len(_MIXES):
        return dict(mix=_MIXES[type_index].copy(), region_size=_REGION_SIZE[type_index],
                    nucleus_scale=_NUCLEUS_SCALE[type_index], elongation=_ELONGATION[type_index])
    # further types: a dominant and a secondary pattern over a shared floor, fixed per type index
    rng = np.random.default_rng([7919, type_index])
    mix = np.full(len(PATTERNS), 0.08)
    first, second = rng.choice(len(PATTERNS), 2, replace=False)
    mix[first] += 0.4
    mix[second] += 0.2
    return dict(mix=mix / mix.sum(), region_size=float(rng.uniform(200, 400)),
                nucleus_scale=float(rng.uniform(0.88, 1.14)), elongation=float(rng.uniform(0.65, 0.9)))


def draw_stain(rng: np.random.Generator, spread: float = 1.0) -> dict:
    """One slide's stain, from the pool shared by every type: OD vectors (per unit concentration),
    concentration scales and a multiplicative scanner tint. `spread` scales every variation (1: the many
    labs of a cohort; a fraction: one lab's narrow range)."""
    def od(base, sd):
        v = np.clip(np.asarray(base) + rng.normal(0, sd * spread, 3), 0.05, None)
        return v / np.linalg.norm(v)

    return dict(
        od_h=od((0.65, 0.70, 0.29), 0.12),  # hematoxylin: absorbs red and green -> blue-purple
        od_e=od((0.07, 0.99, 0.11), 0.12),  # eosin: absorbs green -> pink
        scale_h=float(rng.uniform(1 - 0.4 * spread, 1 + 0.4 * spread)),
        scale_e=float(rng.uniform(1 - 0.5 * spread, 1 + 0.5 * spread)),
        tint=np.clip(1 + rng.normal(0, 0.05 * spread, 3), 0.85, 1.1),
    )


def _smooth(rng, shape, sigma) -> np.ndarray:
    import cv2

    field = rng.standard_normal(shape).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigmaX=max(sigma, 0.5), borderType=cv2.BORDER_REFLECT)
    return (field - field.mean()) / (field.std() + 1e-8)


def _upsample(low: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
    import cv2

    return cv2.resize(low, (width, height), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


def _region_map(rng, height, width, region_size) -> np.ndarray:
    """Irregular regions (Voronoi cells of jittered seeds with warped borders), int32 ids at full size."""
    step = 8
    h, w = -(-height // step), -(-width // step)
    n = max(2, int(round(height * width / region_size ** 2)))
    seeds = rng.uniform([0, 0], [h, w], size=(n, 2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = region_size / step * 0.35
    yy = yy + _smooth(rng, (h, w), 6) * warp
    xx = xx + _smooth(rng, (h, w), 6) * warp
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    return _upsample(d.argmin(axis=-1).astype(np.float32), height, width, nearest=True).astype(np.int32)


def _nuclei(rng, conc, where, density, radius, elongation, strength, jitter=0.25):
    """Ellipses of hematoxylin into `conc` at random points where `where` holds (density per 100x100 px)."""
    height, width = where.shape
    n = rng.poisson(density * where.mean() * height * width / 1e4)
    if n == 0:
        return
    n_try = int(n / max(where.mean(), 1e-3)) + 1
    ys, xs = rng.uniform(0, height, n_try), rng.uniform(0, width, n_try)
    keep = where[ys.astype(int), xs.astype(int)]
    ys, xs = ys[keep][:n], xs[keep][:n]
    _ellipses(rng, conc, xs, ys, radius, elongation, strength, jitter)


def _ellipses(rng, conc, xs, ys, radius, elongation, strength, jitter=0.25, angles=None):
    import cv2

    k = len(xs)
    radii = radius * rng.uniform(1 - jitter, 1 + jitter, k)
    ratio = np.clip(elongation * rng.uniform(0.85, 1.15, k), 0.3, 1.0)
    angles = rng.uniform(0, 180, k) if angles is None else angles
    values = strength * rng.uniform(0.8, 1.2, k)
    for x, y, r, q, a, v in zip(xs.astype(int).tolist(), ys.astype(int).tolist(), radii.tolist(), ratio.tolist(),
                                np.asarray(angles).tolist(), values.tolist()):
        cv2.ellipse(conc, (x, y), (max(1, int(round(r))), max(1, int(round(r * q)))), a, 0, 360, float(v), -1,
                    lineType=cv2.LINE_AA)


def _paint_concentrations(H: int, W: int, type_index: int, rng: np.random.Generator,
                          tissue_fraction: float | None):
    """Hematoxylin and eosin concentration maps (H, W) of one slide, its tissue mask, pattern map,
    region size and tissue fraction: everything about a slide but its stain."""
    import cv2

    morph = type_morphology(type_index)
    tissue_fraction = float(rng.uniform(0.55, 0.75)) if tissue_fraction is None else tissue_fraction
    blob = _upsample(_smooth(rng, (max(2, H // 32), max(2, W // 32)), 4.0), H, W)
    tissue = blob >= np.quantile(blob, 1 - tissue_fraction)

    region_size = morph["region_size"] * float(rng.uniform(0.85, 1.15))
    regions = _region_map(rng, H, W, region_size)
    pattern_of_region = rng.choice(len(PATTERNS), size=int(regions.max()) + 1, p=morph["mix"])
    pattern = pattern_of_region[regions]
    nuc_r = 4.5 * morph["nucleus_scale"] * float(rng.uniform(0.93, 1.07))
    elong = morph["elongation"]

    c_h = np.zeros((H, W), np.float32)
    c_e = np.zeros((H, W), np.float32)
    texture = _smooth(rng, (H // 4, W // 4), 3.0)
    texture = _upsample(texture, H, W)

    # stroma: eosin-rich wavy fibres, sparse spindle nuclei
    m = tissue & (pattern == 0)
    fibres = np.sin((np.arange(W, dtype=np.float32)[None, :] * 0.9 + _upsample(_smooth(rng, (H // 16, W // 16), 3), H, W) * 40) / 6.0)
    c_e[m] = (0.75 + 0.2 * fibres + 0.1 * texture)[m]
    _nuclei(rng, c_h, m, 1.5, nuc_r * 1.1, elong * 0.45, 0.9)
    # glands: pale epithelium, white lumens ringed by nuclei
    m = tissue & (pattern == 1)
    c_e[m] = (0.45 + 0.08 * texture)[m]
    if m.any():
        n = int(m.sum() / (70 * 70))
        ys, xs = rng.uniform(0, H, n * 2), rng.uniform(0, W, n * 2)
        keep = m[ys.astype(int), xs.astype(int)]
        ys, xs = ys[keep][:n], xs[keep][:n]
        lumen = np.zeros((H, W), np.float32)
        radii = rng.uniform(10, 22, len(xs))
        for x, y, r in zip(xs.astype(int).tolist(), ys.astype(int).tolist(), radii.tolist()):
            cv2.circle(lumen, (x, y), int(r), 1.0, -1, lineType=cv2.LINE_AA)
        ring_x, ring_y, ring_a = [], [], []
        for x, y, r in zip(xs.tolist(), ys.tolist(), radii.tolist()):
            k = max(6, int(2 * np.pi * (r + nuc_r) / (2.4 * nuc_r)))
            t = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 1)
            ring_x.append(x + (r + nuc_r) * np.cos(t))
            ring_y.append(y + (r + nuc_r) * np.sin(t))
            ring_a.append(np.degrees(t))
        if ring_x:
            rx, ry, ra = np.concatenate(ring_x), np.concatenate(ring_y), np.concatenate(ring_a)
            inside = (rx >= 0) & (rx < W) & (ry >= 0) & (ry < H)
            _ellipses(rng, c_h, rx[inside], ry[inside], nuc_r, elong, 1.0, angles=ra[inside])
        cut = m & (lumen > 0.5)
        c_e[cut] *= 0.1
        c_h[cut] = 0
    # solid sheets: dense large nuclei on a pinkish-purple cytoplasm
    m = tissue & (pattern == 2)
    c_e[m] = (0.55 + 0.1 * texture)[m]
    c_h[m] += 0.12
    _nuclei(rng, c_h, m, 9.0, nuc_r * 1.15, elong, 1.0)
    # lymphoid: crowded small round dark nuclei
    m = tissue & (pattern == 3)
    c_e[m] = (0.35 + 0.08 * texture)[m]
    _nuclei(rng, c_h, m, 22.0, nuc_r * 0.6, 0.95, 1.25, jitter=0.15)
    # adipose: empty vacuoles with thin eosin membranes
    m = tissue & (pattern == 4)
    if m.any():
        cells = np.zeros((H, W), np.float32)
        n = int(m.sum() / (45 * 45))
        ys, xs = rng.uniform(0, H, n * 2), rng.uniform(0, W, n * 2)
        keep = m[ys.astype(int), xs.astype(int)]
        for x, y, r in zip(xs[keep].astype(int).tolist(), ys[keep].astype(int).tolist(),
                           rng.uniform(20, 34, int(keep.sum())).tolist()):
            cv2.circle(cells, (x, y), int(r), 1.0, 2, lineType=cv2.LINE_AA)
        c_e[m] = (0.08 + 0.7 * np.clip(cells, 0, 1))[m]
        _nuclei(rng, c_h, m, 0.6, nuc_r * 0.9, elong * 0.5, 0.8)

    # Every pattern gets the same mean stain uptake: otherwise a slide's mean colour would tell its
    # pattern mix, hence its type, and so would a patch's. Patterns differ in texture and layout only.
    for p in range(len(PATTERNS)):
        m = tissue & (pattern == p)
        if m.any():
            c_h[m] *= _UPTAKE[p] * _MEAN_H / max(float(c_h[m].mean()), 1e-6)
            c_e[m] *= _UPTAKE[p] * _MEAN_E / max(float(c_e[m].mean()), 1e-6)
    c_h *= tissue
    c_h = cv2.GaussianBlur(c_h, (0, 0), 0.8)
    return c_h, c_e, tissue, pattern, region_size, tissue_fraction


def _optical_density(c_h: np.ndarray, c_e: np.ndarray, stain: dict) -> np.ndarray:
    # concentration 1 ~ optical density 1.6 along the stain vector
    od = c_h[..., None] * np.asarray(1.6 * stain["scale_h"] * np.asarray(stain["od_h"]), np.float32)
    od += c_e[..., None] * np.asarray(1.6 * stain["scale_e"] * np.asarray(stain["od_e"]), np.float32)
    return od


@lru_cache(maxsize=1)
def _reference_sample() -> tuple[np.ndarray, np.ndarray]:
    """Concentrations of a fixed mix of tissue (one 512-px slide of each of the first three types):
    the colour every slide is white-balanced to (`_colour_gain`)."""
    hs, es = [], []
    for k in range(len(_MIXES)):
        c_h, c_e, tissue, *_ = _paint_concentrations(512, 512, k, np.random.default_rng([4099, k]), None)
        hs.append(c_h[tissue][::5])
        es.append(c_e[tissue][::5])
    return np.concatenate(hs), np.concatenate(es)


def _colour_gain(od: np.ndarray, tissue: np.ndarray, stain: dict) -> np.ndarray:
    """Per-channel gain (3,) that brings the slide's mean tissue transmission (from its optical density
    `od`, (H, W, 3), sampled every third pixel) to that of the reference mix under the same stain.
    Beer-Lambert is non-linear: at equal mean uptake, dense patterns (solid sheets) transmit less light
    than sparse ones, so without this a slide's mean colour would still tell its pattern mix, hence its
    type. Scanners' white balance and stain normalisation do much the same to real slides."""
    ref_h, ref_e = _reference_sample()
    reference = np.exp(-_optical_density(ref_h, ref_e, stain)).mean(axis=0)
    sub = od[::3, ::3][tissue[::3, ::3]]
    if len(sub) == 0:
        return np.ones(3, np.float32)
    return (reference / np.maximum(np.exp(-sub).mean(axis=0), 1e-6)).astype(np.float32)


def paint_tissue(height: int, width: int, type_index: int, rng: np.random.Generator,
                 tissue_fraction: float | None = None, stain: dict | None = None, return_patterns: bool = False):
    """Paint one slide of type `type_index`: (H, W, 3) uint8 and a record of what was drawn
    (stain, pattern share of the tissue, region size); with `return_patterns`, also the (H, W) int map of
    the pattern index (`PATTERNS`) of every pixel, -1 off tissue."""
    stain = stain or draw_stain(rng)
    H, W = int(height), int(width)
    c_h, c_e, tissue, pattern, region_size, tissue_fraction = _paint_concentrations(H, W, type_index, rng,
                                                                                    tissue_fraction)
    # float32 and in place: composing the (H, W, 3) optical density is most of a slide's painting time
    od = _optical_density(c_h, c_e, stain)
    gain = _colour_gain(od, tissue, stain)
    rgb = np.exp(np.negative(od, out=od), out=od)
    rgb *= np.asarray(255.0 * gain * np.asarray(stain["tint"]), np.float32)
    rgb += rng.normal(0, 4.0, (1, 1, 3)).astype(np.float32) + _grain(rng, H, W)
    bg = np.asarray(BACKGROUND, np.float32) * np.asarray(stain["tint"], np.float32)
    off = ~tissue
    rgb[off] = bg + _grain(rng, H, W)[off] * 0.5
    image = np.clip(rgb, 0, 255).astype(np.uint8)
    shares = np.bincount(pattern[tissue], minlength=len(PATTERNS)) / max(1, tissue.sum())
    record = {"stain": {k: np.round(np.asarray(v), 4).tolist() for k, v in stain.items()},
              "pattern_share": dict(zip(PATTERNS, np.round(shares, 3).tolist())),
              "region_size": round(region_size, 1), "tissue_fraction": round(tissue_fraction, 3)}
    if return_patterns:
        return image, record, np.where(tissue, pattern, -1).astype(np.int8)
    return image, record


def _grain(rng, height, width) -> np.ndarray:
    # one 257-px grain tile repeated (prime: no alignment with 256-px patches), cheap for big slides
    tile = rng.normal(0, 3.0, (257, 257, 3)).astype(np.float32)
    return np.tile(tile, (-(-height // 257), -(-width // 257), 1))[:height, :width]


__all__ = ["BACKGROUND", "PATTERNS", "draw_stain", "paint_tissue", "type_morphology"]
