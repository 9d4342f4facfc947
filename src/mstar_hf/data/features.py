"""Lazy reading of a slide's patch-feature h5 (datasets `coords` (N,2), `features` (N,D)).

Only the rows that are used are read: when a slide has more than `max_patches` patches, a seeded
sample without replacement is drawn first and only those rows are read from disk.
"""

from __future__ import annotations

import os

import numpy as np


def _where(case_id, path) -> str:
    return f"case {case_id!r}, file {os.fspath(path)!r}" if case_id is not None else f"file {os.fspath(path)!r}"


def sample_indices(num_patches: int, max_patches: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted indices of a sample without replacement, or None when every patch is kept."""
    if max_patches is None or num_patches <= max_patches:
        return None
    return np.sort(rng.choice(num_patches, size=max_patches, replace=False))


def read_slide_features(
    path: str | os.PathLike,
    case_id: str | None = None,
    expected_dim: int | None = None,
    max_patches: int | None = None,
    rng: np.random.Generator | None = None,
    read_coords: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read (float32 features [n, D], int64 coords [n, 2] or None) from a feature h5.

    With `max_patches`, a slide with more patches is sampled without replacement by `rng` (kept in
    the file's order); a smaller one keeps all its patches. Errors name the case and the file: missing
    file, missing `features` dataset, a width other than `expected_dim`, no patches, `coords` rows
    that do not match, NaN/inf in the rows read.
    """
    import h5py

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"features file not found ({_where(case_id, path)}).")
    try:
        handle = h5py.File(path, "r")
    except OSError as e:
        raise OSError(f"cannot open features file as HDF5 ({_where(case_id, path)}): {e}") from None
    with handle as f:
        if "features" not in f:
            raise KeyError(f"features file has no 'features' dataset ({_where(case_id, path)}); "
                           f"found {sorted(f.keys())}.")
        dset = f["features"]
        if dset.ndim != 2:
            raise ValueError(f"'features' must be 2-D (N, D), got shape {dset.shape} ({_where(case_id, path)}).")
        num, dim = dset.shape
        if expected_dim is not None and dim != expected_dim:
            raise ValueError(f"wrong feature width: expected {expected_dim}, got {dim} ({_where(case_id, path)}).")
        if num == 0:
            raise ValueError(f"features file holds no patches ({_where(case_id, path)}).")
        if "coords" in f and f["coords"].shape[0] != num:
            raise ValueError(f"'coords' has {f['coords'].shape[0]} rows but 'features' has {num} "
                             f"({_where(case_id, path)}).")
        index = sample_indices(num, max_patches, rng if rng is not None else np.random.default_rng())
        # h5py fancy indexing is slow for dense selections: read everything when most rows are used.
        if index is None:
            features = dset[()]
        elif len(index) * 4 >= num:
            features = dset[()][index]
        else:
            features = dset[index]
        coords = None
        if read_coords and "coords" in f:
            coords = f["coords"][()] if index is None else f["coords"][()][index]
            coords = np.asarray(coords, dtype=np.int64)
    features = np.asarray(features, dtype=np.float32)
    if not np.isfinite(features).all():
        rows = np.unique(np.nonzero(~np.isfinite(features))[0])
        raise ValueError(f"features contain NaN/inf in {len(rows)} patch row(s) ({_where(case_id, path)}).")
    return features, coords


def write_slide_features(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray | None = None,
                         **attrs) -> str:
    """Write a minimal feature h5 (`features`, `coords`, attributes): for tests and small tools."""
    import h5py

    features = np.asarray(features)
    if coords is None:
        side = int(np.ceil(np.sqrt(max(len(features), 1))))
        coords = np.stack(np.divmod(np.arange(len(features)), side)[::-1], axis=1) * 256
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


__all__ = ["read_slide_features", "sample_indices", "write_slide_features"]
