"""Per-slide patch-feature files (HDF5), in the TRIDENT/CLAM layout.

Layout: dataset `coords` (N, 2) int64 level-0 (x, y) top-left corners; dataset `features` (N, D)
float32; attributes (on the file and, as TRIDENT/CLAM readers expect, on `coords`): patch_size,
patch_size_level0, target_magnification, mpp, level0_width, level0_height, encoder,
encoder_config_hash, slide_fingerprint (what resume compares with the slide file), and more tiling
metadata. Files are written under a temporary name and renamed only when complete, so a file under
its final name is never partial; a batch run removes the temporary files a killed run left.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

TMP_SUFFIX = ".tmp"  # "slide.h5.tmp": what a killed run leaves behind, never read as features


def tmp_path_for(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def _attr_value(value):
    if isinstance(value, (dict, list, tuple)) and not (
        isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
    ):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fsync_dir(directory: Path):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_features(path, coords, features, attrs: dict | None = None) -> Path:
    """Write one slide's coords and features atomically (temporary name, fsync, rename). Returns the path."""
    import h5py

    path = Path(path)
    coords = np.ascontiguousarray(coords, dtype=np.int64).reshape(-1, 2)
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) != len(coords):
        raise ValueError(f"{path}: features {features.shape} do not match coords {coords.shape}")
    tmp = tmp_path_for(path)
    try:
        # No HDF5 file lock: the file is private under its temporary name, and the writer thread runs while
        # reader workers are forked; a forked child would inherit the lock and keep it on the finished file.
        with h5py.File(tmp, "w", locking=False) as f:
            f.create_dataset("coords", data=coords)
            # Row-chunked so later stages can read a few patches without the whole matrix.
            chunk_rows = max(1, min(len(features), max(1, (1 << 20) // max(1, features.shape[1] * 4))))
            f.create_dataset("features", data=features, chunks=(chunk_rows, features.shape[1]) if len(features) else None)
            for key, value in (attrs or {}).items():
                if value is None:
                    continue
                value = _attr_value(value)
                f.attrs[key] = value
                f["coords"].attrs[key] = value
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class FeatureFile:
    """Lazy reader: `coords` is loaded (small), `features` stays on disk as an h5py dataset until sliced.

    >>> with open_features("slide.h5") as ff:
    ...     x = ff.features[:128]          # reads 128 rows
    ...     coords, feats = ff.load()      # everything as numpy
    """

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        try:
            self._h5 = h5py.File(self.path, "r")
        except (OSError, FileNotFoundError) as e:
            raise ValueError(f"{self.path}: cannot open feature file ({e})") from None
        missing = [k for k in ("coords", "features") if k not in self._h5]
        if missing:
            self._h5.close()
            raise ValueError(f"{self.path}: not a feature file (missing dataset(s) {', '.join(missing)})")
        self._coords = None

    @property
    def coords(self) -> np.ndarray:
        if self._coords is None:
            self._coords = np.asarray(self._h5["coords"][:], dtype=np.int64)
        return self._coords

    @property
    def features(self):
        """The h5py dataset (N, D): slice it to read rows; `load()` for a numpy array."""
        return self._h5["features"]

    @property
    def attrs(self) -> dict:
        # TRIDENT/CLAM keep attributes on `coords`; ours are on both. File-level values win.
        out = {k: _decode(v) for k, v in self._h5["coords"].attrs.items()}
        out.update({k: _decode(v) for k, v in self._h5.attrs.items()})
        return out

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self):
        return int(self.features.shape[0])

    def __getitem__(self, idx):
        return self.features[idx]

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        return self.coords, np.asarray(self.features[:], dtype=np.float32)

    def close(self):
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"FeatureFile({str(self.path)!r}, n={len(self) if self._h5 else '?'})"


def _decode(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def open_features(path) -> FeatureFile:
    return FeatureFile(path)


def read_attrs(path) -> dict | None:
    """Attributes of a complete feature file, or None if it is missing or unreadable."""
    try:
        with FeatureFile(path) as ff:
            return ff.attrs
    except ValueError:
        return None


__all__ = ["write_features", "open_features", "FeatureFile", "read_attrs", "tmp_path_for"]
