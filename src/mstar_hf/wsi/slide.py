"""Whole-slide access through OpenSlide: resolution, pyramid level choice, reads at a target resolution.

Every failure is a `SlideError` whose message names the file. Reads always use the coarsest pyramid
level that is still at least as fine as the target resolution, then resize, so level 0 of a 40x
slide is never decoded for 20x patches.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import MissingMppError, SlideError

# Extensions OpenSlide reads (a folder scan uses these; a file given explicitly is tried whatever its name).
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi",
)

# Mpp from TIFF resolution tags is only trusted in this range: many plain TIFFs carry a 72 dpi default.
_PLAUSIBLE_MPP = (0.05, 20.0)
# Patches are never read by enlarging the slide more than this: beyond it they hold no real detail.
MAX_UPSAMPLE = 2.0
READERS = ("openslide", "cucim", "auto")


def mpp_to_magnification(mpp: float) -> float:
    """Nominal objective magnification for a resolution (convention: 10x <-> 1.0 um/px, 20x <-> 0.5, 40x <-> 0.25)."""
    return 10.0 / mpp


def magnification_to_mpp(magnification: float) -> float:
    return 10.0 / magnification


@dataclass(frozen=True)
class ReadPlan:
    """How a patch of `patch_size` target pixels is read: `read_size` pixels at pyramid `level`."""

    level: int
    level_downsample: float
    read_size: int  # pixels read at `level`, resized to patch_size when different
    patch_size: int
    patch_size_level0: int  # extent of one patch in level-0 pixels


def _openslide():
    # imported on first use, inside `try`: this file travels as remote code with the pipelines, and
    # transformers then requires every import outside a `try` to be installed before anything runs
    try:
        import openslide
    except ImportError as exc:
        raise ImportError("reading whole-slide images needs OpenSlide: pip install openslide-python openslide-bin"
                          ) from exc
    return openslide


def _open_openslide(path: Path):
    openslide = _openslide()

    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            raise SlideError(path, "a TIFF file OpenSlide cannot read: truncated, corrupt, or not a tiled "
                                   "(pyramidal) slide") from None
        raise SlideError(path, "not a whole-slide image in a format OpenSlide can read") from None
    except openslide.OpenSlideError as e:
        raise SlideError(path, f"corrupt or truncated slide file (OpenSlide: {e})") from None


class WSI:
    """An open whole-slide image. Use `open_slide(path, mpp_override)`; close it (or use `with`)."""

    def __init__(self, path, mpp_override: float | None = None, default_mpp: float | None = None,
                 reader: str = "openslide"):
        self.path = Path(path)
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
        if not self.path.exists():
            raise SlideError(self.path, "file not found")
        if self.path.is_dir():
            raise SlideError(self.path, "is a directory, not a slide file")
        if not os.access(self.path, os.R_OK):
            raise SlideError(self.path, "file is not readable (permission denied)")
        if self.path.stat().st_size == 0:  # e.g. an interrupted download: say so, not "not a slide"
            raise SlideError(self.path, "empty file (0 bytes): an interrupted download or copy?")
        self._osr = _open_openslide(self.path)
        self.mpp, self.mpp_source = self._resolve_mpp(mpp_override, default_mpp)
        self.level_count: int = self._osr.level_count
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(self._osr.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in self._osr.level_downsamples)
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        # Reads per pyramid level, so callers (and tests) can check that level 0 was avoided.
        self.read_counts: Counter = Counter()
        self.reader = reader
        self._cu = _open_cucim(self.path) if reader in ("cucim", "auto") else None
        if reader == "cucim" and self._cu is None:
            raise SlideError(self.path, "reader 'cucim' requested but cuCIM is not installed or cannot read this "
                                        "file (pip install cucim-cu12; it reads TIFF/SVS only)")

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def properties(self):
        return self._osr.properties

    @property
    def magnification(self) -> float:
        return mpp_to_magnification(self.mpp)

    def _resolve_mpp(self, override, default):
        """Resolution: an explicit override (a CSV's per-slide mpp or the CLI's --mpp), else the first
        plausible metadata value, else `default`.

        Metadata outside `_PLAUSIBLE_MPP` (e.g. a generic TIFF's 72 dpi default, 352.8 um/px) is never
        used: tiling at it would turn the slide into thousands of one-pixel "patches". When no source
        is plausible and no override or default is given, the error names what was found and asks for --mpp.
        """
        openslide = _openslide()

        for value, name in ((override, "mpp override"), (default, "--mpp")):
            if value is not None and not float(value) > 0:
                raise SlideError(self.path, f"{name} must be positive, got {value}")
        if override is not None:
            return float(override), "override"
        props = self._osr.properties
        candidates = []  # (mpp, source) from the metadata, most trusted first
        try:
            candidates.append((float(props[openslide.PROPERTY_NAME_MPP_X]), "openslide.mpp-x"))
        except (KeyError, ValueError):
            pass
        um_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(props.get("tiff.ResolutionUnit"))
        try:
            xres = float(props["tiff.XResolution"])
            if um_per_unit and xres > 0:
                candidates.append((um_per_unit / xres, "tiff.XResolution"))
        except (KeyError, ValueError):
            pass
        try:
            power = float(props[openslide.PROPERTY_NAME_OBJECTIVE_POWER])
            if power > 0:
                candidates.append((magnification_to_mpp(power), "openslide.objective-power"))
        except (KeyError, ValueError):
            pass
        for mpp, source in candidates:
            if _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1]:
                return mpp, source
        if default is not None:
            return float(default), "--mpp"
        lo, hi = _PLAUSIBLE_MPP
        bad = [(mpp, source) for mpp, source in candidates if mpp > 0]
        if bad:
            found = ", ".join(f"{source} = {mpp:.4g} um/px" for mpp, source in bad)
            raise MissingMppError(
                self.path,
                f"implausible resolution in the slide metadata ({found}; a whole-slide image is "
                f"{lo:g}-{hi:g} um/px, a plain TIFF often carries a 72 dpi default); pass --mpp with the "
                f"true level-0 microns per pixel (0.25 for 40x, 0.5 for 20x)",
            )
        raise MissingMppError(
            self.path,
            "resolution unknown: no microns-per-pixel (openslide.mpp-x), TIFF resolution or objective power "
            "(openslide.objective-power) in the slide metadata; pass --mpp (0.25 for 40x, 0.5 for 20x)",
        )

    def __repr__(self):
        return (f"WSI({str(self.path)!r}, dims={self.dimensions}, levels={self.level_count}, "
                f"mpp={self.mpp:.4g} from {self.mpp_source})")

    # -- level choice -----------------------------------------------------------------------------
    def best_level_for_downsample(self, downsample: float, tol: float = 0.01) -> int:
        """Coarsest level whose downsample does not exceed `downsample` (so reads shrink, never enlarge)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + tol) and ds >= self.level_downsamples[best]:
                best = level
        return best

    def best_level_for_mpp(self, target_mpp: float, tol: float = 0.01) -> int:
        return self.best_level_for_downsample(target_mpp / self.mpp, tol)

    def plan_read(self, patch_size: int, target_mpp: float, snap_tol: float = 0.02) -> ReadPlan:
        """Which level and how many pixels to read for one `patch_size` patch at `target_mpp`.

        A scale off by less than `snap_tol` (e.g. 0.499 vs 0.5 um/px) is read at `patch_size`
        directly: a 0.2% size error is harmless, a 257 -> 256 resample only blurs.
        """
        self._check_upsample(target_mpp)
        level = self.best_level_for_mpp(target_mpp)
        ds = self.level_downsamples[level]
        exact = patch_size * target_mpp / (self.mpp * ds)
        read_size = patch_size if abs(exact / patch_size - 1) <= snap_tol else max(1, round(exact))
        return ReadPlan(level, ds, read_size, patch_size, max(1, round(read_size * ds)))

    def _check_upsample(self, target_mpp: float):
        if self.mpp > target_mpp * MAX_UPSAMPLE:
            raise SlideError(
                self.path,
                f"slide resolution {self.mpp:.4g} um/px (from {self.mpp_source}) is coarser than the target "
                f"{target_mpp:g} um/px: each patch would be upsampled {self.mpp / target_mpp:.1f}x (at most "
                f"{MAX_UPSAMPLE:g}x is allowed); if the metadata are wrong pass --mpp, else use a lower magnification",
            )

    # -- reads ------------------------------------------------------------------------------------
    def read_level_image(self, x0: int, y0: int, level: int, size: tuple[int, int]) -> Image.Image:
        """RGB PIL image of `size`=(w, h) pixels at `level`, top-left at level-0 (x0, y0).

        Transparent pixels (outside the scanned area or the slide) become white, not black. Kept as a
        PIL image so a patch goes from the decoder to the resize without numpy round trips (the reader
        processes are what bounds extraction once the model runs on a GPU).
        """
        openslide = _openslide()

        if self._cu is not None and self._inside(x0, y0, level, size):
            # cuCIM decodes tiles in parallel without OpenSlide's cache lock; used only inside the
            # slide, where it needs no transparency handling.
            try:
                arr = np.asarray(self._cu.read_region(location=(int(x0), int(y0)), size=(int(size[0]), int(size[1])),
                                                      level=int(level)))
            except Exception as e:  # noqa: BLE001 - cuCIM raises plain RuntimeErrors
                raise SlideError(self.path, f"read failed at level {level}, ({x0}, {y0}) size {size}: "
                                            f"corrupt or truncated slide (cuCIM: {e})") from None
            self.read_counts[int(level)] += 1
            return Image.fromarray(np.ascontiguousarray(arr[..., :3]))
        try:
            rgba = self._osr.read_region((int(x0), int(y0)), int(level), (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as e:
            raise SlideError(self.path, f"read failed at level {level}, ({x0}, {y0}) size {size}: "
                                        f"corrupt or truncated slide (OpenSlide: {e})") from None
        self.read_counts[int(level)] += 1
        if rgba.getchannel("A").getextrema()[0] == 255:
            return rgba.convert("RGB")  # opaque: dropping alpha in C is exact
        arr = np.asarray(rgba)
        a = arr[..., 3:].astype(np.uint16)
        rgb = ((arr[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        return Image.fromarray(rgb)

    def read_level_array(self, x0: int, y0: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """`read_level_image` as a writable RGB uint8 (h, w, 3) array."""
        return np.array(self.read_level_image(x0, y0, level, size))

    def _inside(self, x0, y0, level, size) -> bool:
        ds = self.level_downsamples[level]
        W, H = self.dimensions
        return x0 >= 0 and y0 >= 0 and x0 + size[0] * ds <= W and y0 + size[1] * ds <= H

    def read_patch_image(self, x0: int, y0: int, plan: ReadPlan) -> Image.Image:
        """One patch as planned by `plan_read`: RGB PIL image of patch_size x patch_size."""
        image = self.read_level_image(x0, y0, plan.level, (plan.read_size, plan.read_size))
        if plan.read_size != plan.patch_size:
            image = _resize_image(image, (plan.patch_size, plan.patch_size))
        return image

    def read_patch_array(self, x0: int, y0: int, plan: ReadPlan) -> np.ndarray:
        """One patch as planned by `plan_read`: RGB uint8 (patch_size, patch_size, 3)."""
        return np.array(self.read_patch_image(x0, y0, plan))

    def read_region_at(self, x0: int, y0: int, size_target_px, target_mpp: float) -> Image.Image:
        """Region at level-0 (x0, y0) covering `size_target_px` pixels at `target_mpp`, as a PIL RGB image.

        Reads the best level for `target_mpp` and resizes; square sizes follow `plan_read` exactly, so
        the result equals what extraction feeds the model for a patch at the same coordinates.
        """
        if isinstance(size_target_px, (int, np.integer)):
            return self.read_patch_image(x0, y0, self.plan_read(int(size_target_px), target_mpp))
        w, h = (int(v) for v in size_target_px)
        self._check_upsample(target_mpp)
        level = self.best_level_for_mpp(target_mpp)
        scale = target_mpp / (self.mpp * self.level_downsamples[level])
        rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
        arr = self.read_level_array(x0, y0, level, (rw, rh))
        if (rw, rh) != (w, h):
            arr = _resize(arr, (w, h))
        return Image.fromarray(arr)

    def read_downsampled(self, downsample: float, max_pixels_per_read: int = 1 << 24) -> np.ndarray:
        """The whole slide at `downsample` (level-0 px per output px) as RGB uint8.

        Reads the best level in horizontal strips, so a huge single-level slide never needs its
        full level in memory (OpenSlide's get_thumbnail reads the whole level at once).
        """
        W, H = self.dimensions
        out_w, out_h = max(1, round(W / downsample)), max(1, round(H / downsample))
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        if lw * lh <= max_pixels_per_read:
            arr = self.read_level_array(0, 0, level, (lw, lh))
            return _resize(arr, (out_w, out_h)) if (lw, lh) != (out_w, out_h) else arr
        out = np.empty((out_h, out_w, 3), np.uint8)
        rows_per_strip = max(1, (max_pixels_per_read // lw) * out_h // lh)
        for r0 in range(0, out_h, rows_per_strip):
            r1 = min(out_h, r0 + rows_per_strip)
            s0, s1 = round(r0 * lh / out_h), max(round(r1 * lh / out_h), round(r0 * lh / out_h) + 1)
            strip = self.read_level_array(0, int(round(s0 * ds)), level, (lw, s1 - s0))
            out[r0:r1] = _resize(strip, (out_w, r1 - r0))
        return out

    def thumbnail(self, max_size: int = 1024) -> Image.Image:
        W, H = self.dimensions
        return Image.fromarray(self.read_downsampled(max(1.0, max(W, H) / max_size)))

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self):
        if getattr(self, "_osr", None) is not None:
            self._osr.close()
            self._osr = None
        self._cu = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        # OpenSlide handles are not picklable or fork-safe: copies reopen the file themselves.
        state = self.__dict__.copy()
        state["_osr"] = None
        state["_cu"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._osr = _open_openslide(self.path)
        self._cu = _open_cucim(self.path) if self.reader in ("cucim", "auto") else None


def cucim_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("cucim") is not None


def _open_cucim(path: Path):
    """A cuCIM CuImage for TIFF-family files when cuCIM is installed, else None (OpenSlide reads)."""
    if path.suffix.lower() not in (".svs", ".tif", ".tiff") or not cucim_available():
        return None
    try:
        from cucim import CuImage

        return CuImage(str(path))
    except Exception:  # noqa: BLE001 - a file cuCIM cannot parse is still read by OpenSlide
        return None


def _resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to (w, h) with Pillow: antialiased bilinear when shrinking, bicubic when enlarging.

    Pillow, not OpenCV: this runs in forked DataLoader workers, where OpenCV's thread pool,
    inherited from a parent that already used it, can deadlock.
    """
    w, h = size
    shrink = w * h < image.width * image.height
    resample = Image.Resampling.BILINEAR if shrink else Image.Resampling.BICUBIC
    return image.resize((w, h), resample, reducing_gap=3.0 if shrink else None)


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`_resize_image` on an RGB uint8 array."""
    return np.asarray(_resize_image(Image.fromarray(arr), size))


def open_slide(path, mpp_override: float | None = None, default_mpp: float | None = None,
               reader: str = "openslide") -> WSI:
    """Open a slide with OpenSlide. Raises `SlideError` (naming the file) for anything unusable.

    Resolution (level-0 microns per pixel): `mpp_override` if given, else the first of openslide.mpp-x,
    TIFF resolution or objective power from the metadata that is plausible (0.05-20 um/px), else
    `default_mpp`, else `MissingMppError` (which names any implausible value found).
    `reader`: "openslide", "cucim" (faster tile decoding, TIFF/SVS, needs cuCIM) or "auto" (cuCIM when
    installed and able to read the file, else OpenSlide); metadata always come from OpenSlide.
    """
    return WSI(path, mpp_override=mpp_override, default_mpp=default_mpp, reader=reader)


def is_slide_file(path) -> bool:
    return Path(path).suffix.lower() in SLIDE_EXTENSIONS


__all__ = ["WSI", "ReadPlan", "open_slide", "is_slide_file", "SLIDE_EXTENSIONS", "mpp_to_magnification",
           "magnification_to_mpp", "cucim_available", "READERS", "MAX_UPSAMPLE"]
