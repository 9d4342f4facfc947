"""Per-process memory for what a training epoch reads again and again: feature files and RNA profiles.

A Stage 1 or report-generation step re-reads its cases' feature h5 files and re-parses their RNA
tables every epoch; on a small cohort that costs more than the model (the demo: ~12 s of Stage 1's
~45 s went to parsing the same 48 RNA tables). `BoundedCache` keeps items until a byte budget is
full and then keeps what it has (no eviction: with an epoch-shuffled order an LRU would thrash and
re-read whole files it could have sampled). `read_slide_features_cached` returns exactly what
`read_slide_features` returns for the same `rng`: the same sample of the same rows.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .features import read_slide_features, sample_indices

DEFAULT_CACHE_MB = 512


class BoundedCache:
    """A dict that stops taking items once `max_bytes` are held (0 disables it)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_MB * 2**20):
        self.max_bytes = max(0, int(max_bytes))
        self.nbytes = 0
        self._items: dict[Any, Any] = {}
        self._refused: set = set()  # nothing is evicted, so what did not fit never will: not asked again

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key):
        return self._items.get(key)

    def fits(self, nbytes: int) -> bool:
        return self.nbytes + int(nbytes) <= self.max_bytes

    def refused(self, key) -> bool:
        return key in self._refused

    def refuse(self, key) -> None:
        self._refused.add(key)

    def put(self, key, value, nbytes: int) -> bool:
        """Keeps `value` if it fits in what is left of the budget; returns whether it was kept."""
        if key in self._items:
            return True
        if not self.fits(nbytes):
            self.refuse(key)
            return False
        self._items[key] = value
        self.nbytes += int(nbytes)
        return True


def _file_bytes(path) -> int:
    """The in-memory size of a feature file's `features` and `coords` (float32 / int64), from its header."""
    import h5py

    try:
        with h5py.File(os.fspath(path), "r") as f:
            n, d = f["features"].shape
            return int(n) * (int(d) * 4 + 16)
    except (OSError, KeyError, ValueError):
        return -1  # unreadable: let read_slide_features raise its own error


def read_slide_features_cached(cache: BoundedCache | None, path, case_id=None, expected_dim=None,
                               max_patches=None, rng: np.random.Generator | None = None, read_coords: bool = False):
    """`read_slide_features`, served from `cache` when the whole file fits in it.

    A file is read whole once (every row checked, as the training entry points' pre-check does) and then
    sampled in memory with the same `sample_indices` draw, so the rows returned and the generator's state
    afterwards are those of an uncached read.
    """
    key = os.fspath(path)
    hit = cache.get(key) if cache is not None else None
    if hit is None and cache is not None and cache.max_bytes > 0 and not cache.refused(key):
        size = _file_bytes(path)
        if 0 <= size and cache.fits(size):
            features, coords = read_slide_features(path, case_id=case_id, expected_dim=expected_dim, read_coords=True)
            if cache.put(key, (features, coords), features.nbytes + (0 if coords is None else coords.nbytes)):
                hit = (features, coords)
        elif size >= 0:
            cache.refuse(key)  # its header is not read again every epoch
    if hit is None:
        return read_slide_features(path, case_id=case_id, expected_dim=expected_dim, max_patches=max_patches,
                                   rng=rng, read_coords=read_coords)
    features, coords = hit
    if expected_dim is not None and features.shape[1] != expected_dim:
        return read_slide_features(path, case_id=case_id, expected_dim=expected_dim)  # raises, naming the file
    index = sample_indices(len(features), max_patches, rng if rng is not None else np.random.default_rng())
    if index is not None:
        features = features[index]
        coords = None if coords is None else coords[index]
    else:
        features = features.copy()  # callers may modify what they get
    if not read_coords:
        coords = None
    elif coords is not None and index is None:
        coords = coords.copy()
    return features, coords


__all__ = ["BoundedCache", "DEFAULT_CACHE_MB", "read_slide_features_cached"]
