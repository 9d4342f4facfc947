"""The Stage 2 per-slide memory of patch features, on disk.

One memory-mapped `.npy` matrix holds every slide's patch features back to back (`memory.npy`, rows
`offset : offset + count` belong to one slide), a second one its level-0 coords (`coords.npy`), and
`memory_index.json` says which rows are which slide. Nothing is loaded into RAM beyond the pages a step
touches, so the bank scales to the paper's 116M patches (about 4 KiB per ViT-L patch in float32; see
`bytes_per_patch`). It starts as the Stage 1 feature files' rows and is overwritten row by row with the
EMA encoder's features; a checkpoint holds a copy of the three files.

Processes of one job share the files; each process writes only the rows of the slides it owns (see
`training/stage2.py`), so no two processes ever write the same row.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MEMORY_FILE = "memory.npy"
COORDS_FILE = "coords.npy"
INDEX_FILE = "memory_index.json"
BANK_FILES = (MEMORY_FILE, COORDS_FILE, INDEX_FILE)
DTYPES = ("float32", "float16")


class MemoryBankError(ValueError):
    """A feature file cannot seed the memory, or a bank folder is incomplete. The message names the file."""


@dataclass
class MemorySlide:
    """One slide's block of rows and what is needed to read its tiles again."""

    slide_id: str
    slide_path: str
    features_path: str
    offset: int
    count: int
    patch_size: int  # pixels at the target resolution (the feature file's `patch_size`)
    target_mpp: float  # microns per pixel the patches were read at
    mpp: float | None  # the slide's level-0 resolution when extracted (reused so reads match extraction)
    split: str | None = None


@dataclass
class FeatureFileInfo:
    """What `inspect_feature_file` found: sizes and tiling attributes, coords loaded (small)."""

    path: str
    count: int
    dim: int
    coords: np.ndarray
    patch_size: int
    patch_size_level0: int | None
    target_mpp: float
    mpp: float | None
    level0_size: tuple[int, int] | None


def inspect_feature_file(path, expected_dim: int | None = None) -> FeatureFileInfo:
    """Validate a Stage 1 feature h5 without reading its feature matrix.

    Raises `MemoryBankError` naming the file for: missing / not HDF5, no `coords` or `features`, coords
    not (N, 2), rows of `features` and `coords` that differ, no patches, a width other than
    `expected_dim`, no `patch_size` / target resolution attributes.
    """
    import h5py

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MemoryBankError(f"{path}: features file not found.")
    try:
        handle = h5py.File(path, "r")
    except OSError as e:
        raise MemoryBankError(f"{path}: cannot open features file as HDF5 ({e}).") from None
    with handle as f:
        missing = [k for k in ("coords", "features") if k not in f]
        if missing:
            raise MemoryBankError(f"{path}: not a feature file: missing dataset(s) {missing}; found {sorted(f.keys())}.")
        coords, feats = f["coords"], f["features"]
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise MemoryBankError(f"{path}: 'coords' must have shape (N, 2), got {coords.shape}.")
        if feats.ndim != 2:
            raise MemoryBankError(f"{path}: 'features' must have shape (N, D), got {feats.shape}.")
        if feats.shape[0] != coords.shape[0]:
            raise MemoryBankError(
                f"{path}: the rows of 'features' ({feats.shape[0]}) do not match the rows of 'coords' "
                f"({coords.shape[0]}); the file is inconsistent (re-extract it)."
            )
        if feats.shape[0] == 0:
            raise MemoryBankError(f"{path}: the feature file holds no patches.")
        if expected_dim is not None and feats.shape[1] != expected_dim:
            raise MemoryBankError(
                f"{path}: {feats.shape[1]}-d features, but the Stage 1 aggregator (and the patch encoder) take "
                f"{expected_dim}-d ones; these features come from another encoder."
            )
        attrs = {k: _scalar(v) for k, v in coords.attrs.items()}
        attrs.update({k: _scalar(v) for k, v in f.attrs.items()})
        coords_arr = np.asarray(coords[()], dtype=np.int64)
        shape = (int(feats.shape[0]), int(feats.shape[1]))
    if "patch_size" not in attrs:
        raise MemoryBankError(f"{path}: no 'patch_size' attribute: cannot tell which tiles the rows are.")
    if "target_mpp" in attrs:
        target_mpp = float(attrs["target_mpp"])
    elif "target_magnification" in attrs:
        target_mpp = 10.0 / float(attrs["target_magnification"])
    else:
        raise MemoryBankError(f"{path}: no 'target_mpp' or 'target_magnification' attribute: cannot tell the "
                              f"resolution the patches were read at.")
    level0 = None
    if "level0_width" in attrs and "level0_height" in attrs:
        level0 = (int(attrs["level0_width"]), int(attrs["level0_height"]))
    return FeatureFileInfo(
        path=path, count=shape[0], dim=shape[1], coords=coords_arr, patch_size=int(attrs["patch_size"]),
        patch_size_level0=int(attrs["patch_size_level0"]) if "patch_size_level0" in attrs else None,
        target_mpp=target_mpp, mpp=float(attrs["mpp"]) if attrs.get("mpp") is not None else None,
        level0_size=level0,
    )


def _scalar(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def bytes_per_patch(dim: int, dtype: str = "float32") -> int:
    """Disk (and page-cache) bytes one patch takes in the bank: its feature row plus its int64 coords."""
    return dim * np.dtype(dtype).itemsize + 2 * 8


class PatchMemoryBank:
    """Memory-mapped per-slide patch features. Open an existing bank with `PatchMemoryBank(folder)`;
    create one with `PatchMemoryBank.build(...)` or copy a checkpoint's with `PatchMemoryBank.restore(...)`.

    Row indices in `read` / `write` are local to the slide (0 .. count-1, the feature file's order).
    """

    def __init__(self, folder, writable: bool = True):
        self.folder = Path(folder)
        missing = [name for name in BANK_FILES if not (self.folder / name).is_file()]
        if missing:
            raise MemoryBankError(f"{self.folder}: not a memory bank (missing {missing}).")
        index = json.loads((self.folder / INDEX_FILE).read_text())
        self.dim = int(index["dim"])
        self.dtype = str(index["dtype"])
        self.slides = [MemorySlide(**s) for s in index["slides"]]
        self.by_id = {s.slide_id: i for i, s in enumerate(self.slides)}
        self.writable = writable
        self._memory = np.load(self.folder / MEMORY_FILE, mmap_mode="r+" if writable else "r")
        self._coords = np.load(self.folder / COORDS_FILE, mmap_mode="r")
        if self._memory.shape[1] != self.dim or self._memory.shape[0] != self._coords.shape[0]:
            raise MemoryBankError(f"{self.folder}: {MEMORY_FILE} {self._memory.shape} does not match "
                                  f"{COORDS_FILE} {self._coords.shape} / dim {self.dim}.")

    # -- creation ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, folder, slides: list[tuple[dict, FeatureFileInfo]], dtype: str = "float32",
              progress: bool = False, chunk_rows: int = 65536) -> "PatchMemoryBank":
        """Write a bank seeded from validated feature files.

        `slides`: (record, info) pairs; record has slide_id, slide_path and optionally split, info is what
        `inspect_feature_file` returned for its features file. Features are copied in chunks (never a
        whole file in RAM); a file with NaN/inf raises `MemoryBankError` naming it. The files are written
        under temporary names and renamed at the end, so a folder never holds a half-built bank.
        """
        import h5py
        from tqdm.auto import tqdm

        if dtype not in DTYPES:
            raise ValueError(f"memory dtype must be one of {DTYPES}, got {dtype!r}.")
        if not slides:
            raise MemoryBankError(f"{folder}: no slide to put in the memory bank.")
        dims = {info.dim for _, info in slides}
        if len(dims) != 1:
            raise MemoryBankError(f"{folder}: the feature files have different widths {sorted(dims)}.")
        dim = dims.pop()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        total = sum(info.count for _, info in slides)
        tmp = {name: folder / f".{name}.tmp" for name in BANK_FILES}
        try:
            memory = np.lib.format.open_memmap(tmp[MEMORY_FILE], mode="w+", dtype=dtype, shape=(total, dim))
            coords = np.lib.format.open_memmap(tmp[COORDS_FILE], mode="w+", dtype=np.int64, shape=(total, 2))
            entries, offset = [], 0
            for record, info in tqdm(slides, desc="memory bank", unit="slide", disable=not progress):
                with h5py.File(info.path, "r") as f:
                    feats = f["features"]
                    for start in range(0, info.count, chunk_rows):
                        block = np.asarray(feats[start:start + chunk_rows], dtype=np.float32)
                        if not np.isfinite(block).all():
                            raise MemoryBankError(f"{info.path}: NaN or inf in the features (rows from {start}).")
                        memory[offset + start:offset + start + len(block)] = block
                coords[offset:offset + info.count] = info.coords
                entries.append(MemorySlide(
                    slide_id=str(record["slide_id"]), slide_path=str(record["slide_path"]), features_path=info.path,
                    offset=offset, count=info.count, patch_size=info.patch_size, target_mpp=info.target_mpp,
                    mpp=info.mpp, split=record.get("split"),
                ))
                offset += info.count
            memory.flush()
            coords.flush()
            del memory, coords
            tmp[INDEX_FILE].write_text(json.dumps(
                {"dim": dim, "dtype": dtype, "num_rows": total, "slides": [asdict(e) for e in entries]}, indent=1))
            for name in BANK_FILES:
                os.replace(tmp[name], folder / name)
        finally:
            for path in tmp.values():
                path.unlink(missing_ok=True)
        return cls(folder)

    @classmethod
    def restore(cls, checkpoint_bank, folder) -> "PatchMemoryBank":
        """Copy a bank saved in a checkpoint into the working `folder` (replacing what is there)."""
        src, dst = Path(checkpoint_bank), Path(folder)
        missing = [name for name in BANK_FILES if not (src / name).is_file()]
        if missing:
            raise MemoryBankError(f"{src}: the checkpoint's memory bank is incomplete (missing {missing}).")
        dst.mkdir(parents=True, exist_ok=True)
        for name in BANK_FILES:
            tmp = dst / f".{name}.tmp"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dst / name)
        return cls(dst)

    # -- access -----------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self._memory.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self._memory.nbytes + self._coords.nbytes)

    def __len__(self):
        return len(self.slides)

    def _span(self, slide: int) -> tuple[int, int]:
        entry = self.slides[slide]
        return entry.offset, entry.count

    def _global(self, slide: int, rows) -> np.ndarray | slice:
        offset, count = self._span(slide)
        if rows is None:
            return slice(offset, offset + count)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= count):
            raise IndexError(f"slide {self.slides[slide].slide_id} has {count} rows; got rows {rows.min()}..{rows.max()}.")
        return offset + rows

    def read(self, slide: int, rows=None) -> np.ndarray:
        """float32 [n, dim] copy of a slide's rows (all when `rows` is None)."""
        return np.array(self._memory[self._global(slide, rows)], dtype=np.float32)  # a copy, never a view

    def write(self, slide: int, rows, values) -> None:
        """Overwrite rows of a slide with `values` [len(rows), dim] (cast to the bank's dtype)."""
        if not self.writable:
            raise MemoryBankError(f"{self.folder}: the memory bank was opened read-only.")
        values = np.asarray(values)
        rows = np.asarray(rows, dtype=np.int64)
        if values.shape != (len(rows), self.dim):
            raise ValueError(f"write: values {values.shape} do not match {len(rows)} rows of width {self.dim}.")
        self._memory[self._global(slide, rows)] = values

    def coords(self, slide: int) -> np.ndarray:
        return np.array(self._coords[self._global(slide, None)], dtype=np.int64)

    def flush(self) -> None:
        if self.writable:
            self._memory.flush()

    def save_to(self, folder) -> Path:
        """Copy the bank's files into `folder` (a checkpoint): flushes first; the copy is plain file I/O."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.flush()
        for name in BANK_FILES:
            shutil.copyfile(self.folder / name, folder / name)
        return folder

    def close(self):
        self.flush()
        self._memory = self._coords = None


__all__ = [
    "BANK_FILES",
    "FeatureFileInfo",
    "MemoryBankError",
    "MemorySlide",
    "PatchMemoryBank",
    "bytes_per_patch",
    "inspect_feature_file",
]
