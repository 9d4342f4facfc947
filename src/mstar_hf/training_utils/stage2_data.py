"""Stage 2 data: checking the cohort's slides against their Stage 1 feature files, and the Datasets
that read the sampled tiles from the whole-slide images in DataLoader workers.

A training item is a whole step (micro-batch): `slides_per_step` slides and up to `patches_per_slide`
patches of each, drawn from a generator seeded by (seed, micro-step, rank), so a resumed run reads the
same tiles, with the same augmentation, as an uninterrupted one. Workers open their own slide handles
(OpenSlide handles are not fork-safe) with the resolution and read plan the features were extracted
with, so a tile is the exact image its memory row came from.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .augment import HEAugment
from .memory_bank import FeatureFileInfo, MemoryBankError, MemorySlide, inspect_feature_file

FAILURE_FIELDS = ["slide", "features", "error", "reason"]


class Stage2InputError(ValueError):
    """A slide and its feature file do not belong together (coords outside the slide, other slide size)."""


def check_slide_coords(slide_path, info: FeatureFileInfo, dimensions: tuple[int, int]) -> None:
    """Raise `Stage2InputError` naming both files when the feature file's coords do not fit the slide."""
    width, height = dimensions
    coords = info.coords
    outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= width) | (coords[:, 1] >= height)
    if outside.any():
        first = coords[np.argmax(outside)]
        raise Stage2InputError(
            f"{info.path}: {int(outside.sum())} of {len(coords)} patch coords lie outside the slide {slide_path} "
            f"({width}x{height} level-0 pixels), e.g. ({int(first[0])}, {int(first[1])}); the feature file "
            f"belongs to another slide or its coords are corrupt."
        )
    if info.level0_size is not None and tuple(info.level0_size) != (width, height):
        raise Stage2InputError(
            f"{info.path}: extracted from a {info.level0_size[0]}x{info.level0_size[1]} slide, but {slide_path} is "
            f"{width}x{height}: the feature file belongs to another slide."
        )


def prepare_slides(records: list[dict], expected_dim: int, progress: bool = False):
    """Check every cohort slide for Stage 2; return (usable [(record, FeatureFileInfo)], failures [dict]).

    A record needs slide_id, slide_path and features_path. Bad items are skipped and reported with a
    message that names the file: features missing / unreadable / rows not matching coords / wrong width
    (`inspect_feature_file`); slide missing or unreadable (`mstar_hf.wsi.open_slide`); coords outside the
    slide or a feature file made from a slide of another size (`check_slide_coords`).
    """
    from tqdm.auto import tqdm

    from mstar_hf.wsi.errors import SlideError
    from mstar_hf.wsi.slide import open_slide

    usable, failures = [], []
    for record in tqdm(records, desc="checking slides", unit="slide", disable=not progress):
        slide_path, features_path = record.get("slide_path") or "", record.get("features_path") or ""
        try:
            if not features_path:
                raise MemoryBankError(f"slide {record.get('slide_id')!r}: the manifest gives no features_path.")
            if not slide_path:
                raise SlideError(f"slide {record.get('slide_id')!r}: the manifest gives no slide_path "
                                 f"(Stage 2 reads the tiles from the slide).")
            info = inspect_feature_file(features_path, expected_dim)
            with open_slide(slide_path, mpp_override=info.mpp) as wsi:
                check_slide_coords(slide_path, info, wsi.dimensions)
        except (MemoryBankError, SlideError, Stage2InputError) as e:
            failures.append({"slide": str(slide_path), "features": str(features_path), "error": type(e).__name__,
                             "reason": str(e).replace("\n", " ")})
            continue
        usable.append((record, info))
    return usable, failures


# -- tile reading ------------------------------------------------------------------------------------
class TileReader:
    """Reads tiles of bank slides as uint8 [n, 3, H, W] at the processor's size; one per process.

    Keeps up to `max_open` slides open (least recently used closed first) and re-opens them after a fork.
    """

    def __init__(self, slides: list[MemorySlide], transform=None, max_open: int = 32):
        self.slides = slides
        self.transform = transform
        self.max_open = max_open
        self._open: OrderedDict = OrderedDict()
        self._pid = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_pid"] = None
        return state

    def _handle(self, slide: int):
        if self._pid != os.getpid():  # inherited through fork: never reuse
            self._open, self._pid = OrderedDict(), os.getpid()
        if slide in self._open:
            self._open.move_to_end(slide)
            return self._open[slide]
        from mstar_hf.wsi.slide import open_slide

        entry = self.slides[slide]
        wsi = open_slide(entry.slide_path, mpp_override=entry.mpp)
        plan = wsi.plan_read(entry.patch_size, entry.target_mpp)
        self._open[slide] = (wsi, plan)
        while len(self._open) > self.max_open:
            old, _ = self._open.popitem(last=False)[1]
            old.close()
        return self._open[slide]

    def read(self, slide: int, coords: np.ndarray) -> torch.Tensor:
        wsi, plan = self._handle(slide)
        tiles = []
        for x0, y0 in np.asarray(coords, dtype=np.int64).reshape(-1, 2):
            x = torch.from_numpy(wsi.read_patch_array(int(x0), int(y0), plan)).permute(2, 0, 1)
            tiles.append(self.transform.resize(x) if self.transform is not None else x)
        return torch.stack(tiles)


class _BankTiles(Dataset):
    """Shared part: the bank's coords (memory-mapped, opened per process) and the tile reader."""

    def __init__(self, bank_folder, slides: list[MemorySlide], transform, normalize: bool,
                 augment: HEAugment | None = None):
        self.bank_folder = Path(bank_folder)
        self.slides = slides
        self.transform = transform
        self.normalize = normalize
        self.augment = augment
        self.reader = TileReader(slides, transform)
        self._coords = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_coords"] = None
        return state

    def slide_coords(self, slide: int, rows: np.ndarray) -> np.ndarray:
        if self._coords is None:
            from .memory_bank import COORDS_FILE

            self._coords = np.load(self.bank_folder / COORDS_FILE, mmap_mode="r")
        return np.asarray(self._coords[self.slides[slide].offset + rows], dtype=np.int64)

    def finish(self, tiles: list[torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        x = torch.cat(tiles)
        if self.augment is not None and generator is not None:
            x = torch.stack([self.augment(img, generator) for img in x])
        if self.normalize:
            x = self.transform.normalize(x)
        return x


class Stage2StepDataset(_BankTiles):
    """Item `i` is micro-step i's batch: a dict with `pixel_values` ([n, 3, H, W]: float model input when
    `normalize`, else uint8 for normalising on the device), `slide` / `row` ([n] int64: bank slide index
    and row within the slide), `step` (int) and `failed` ([(slide path, reason)] slides that could not be
    read; they are skipped in this and later items and others drawn instead).

    `train_slides`: bank indices this process samples from (each process owns its own slides, so no two
    processes write the same memory rows). `heldout`: {slide: rows} never sampled (evaluation patches).
    """

    def __init__(self, bank_folder, slides: list[MemorySlide], train_slides: list[int], slides_per_step: int,
                 patches_per_slide: int, num_items: int, transform, normalize: bool = True,
                 augment: HEAugment | None = None, seed: int = 0, rank: int = 0,
                 heldout: dict[int, np.ndarray] | None = None):
        super().__init__(bank_folder, slides, transform, normalize, augment)
        if not train_slides:
            raise ValueError("Stage2StepDataset: no training slide.")
        self.train_slides = list(train_slides)
        self.slides_per_step = min(int(slides_per_step), len(self.train_slides))
        self.patches_per_slide = int(patches_per_slide)
        self.num_items = int(num_items)
        self.seed, self.rank = int(seed), int(rank)
        self.heldout = {int(k): np.asarray(v, dtype=np.int64) for k, v in (heldout or {}).items()}
        self._bad: dict[int, str] = {}

    def __len__(self):
        return self.num_items

    def sample_rows(self, micro_step: int, slide: int) -> np.ndarray:
        """Sorted rows of `slide` drawn for `micro_step` (held-out rows excluded)."""
        count = self.slides[slide].count
        held = self.heldout.get(slide)
        rng = np.random.default_rng([self.seed, micro_step, self.rank, slide])
        want = self.patches_per_slide
        if held is None or not len(held):
            return np.sort(rng.choice(count, size=min(want, count), replace=False))
        pool = np.setdiff1d(np.arange(count), held, assume_unique=True)
        return np.sort(rng.choice(pool, size=min(want, len(pool)), replace=False)) if len(pool) else pool

    def __getitem__(self, micro_step: int) -> dict:
        from mstar_hf.wsi.errors import SlideError

        rng = np.random.default_rng([self.seed, micro_step, self.rank])
        order = rng.permutation(len(self.train_slides))
        tiles, slide_ids, rows, failed = [], [], [], []
        for j in order:
            if len(slide_ids) == self.slides_per_step:
                break
            slide = self.train_slides[j]
            if slide in self._bad:
                continue
            picked = self.sample_rows(micro_step, slide)
            if not len(picked):
                continue
            try:
                tiles.append(self.reader.read(slide, self.slide_coords(slide, picked)))
            except SlideError as e:  # a slide that broke after the start-up check: skip it from now on
                self._bad[slide] = str(e)
                failed.append((self.slides[slide].slide_path, str(e)))
                continue
            slide_ids.append(slide)
            rows.append(picked)
        if not tiles:
            raise RuntimeError(f"micro-step {micro_step}: no training slide could be read: "
                               + "; ".join(self._bad.values()))
        generator = torch.Generator().manual_seed(
            int(np.random.default_rng([self.seed, micro_step, self.rank, 1 << 20]).integers(2**62)))
        return {
            "pixel_values": self.finish(tiles, generator if self.augment is not None else None),
            "slide": torch.from_numpy(np.concatenate([np.full(len(r), s) for s, r in zip(slide_ids, rows)])),
            "row": torch.from_numpy(np.concatenate(rows)),
            "step": int(micro_step),
            "failed": failed,
        }


class PatchListDataset(_BankTiles):
    """Fixed (slide, rows) chunks, e.g. the held-out evaluation patches; no augmentation."""

    def __init__(self, bank_folder, slides: list[MemorySlide], items: list[tuple[int, np.ndarray]], transform,
                 normalize: bool = True):
        super().__init__(bank_folder, slides, transform, normalize, None)
        self.items = [(int(s), np.asarray(r, dtype=np.int64)) for s, r in items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        slide, rows = self.items[i]
        x = self.finish([self.reader.read(slide, self.slide_coords(slide, rows))], None)
        return {"pixel_values": x, "slide": torch.full((len(rows),), slide, dtype=torch.long),
                "row": torch.from_numpy(rows), "step": -1, "failed": []}


def _worker_init(_):
    # One compute thread per reader: the cores belong to the training process.
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, num_workers: int, pin_memory: bool, sampler=None, prefetch_factor: int = 2) -> DataLoader:
    """A loader of whole items (`batch_size=None`): workers build the next steps while the model trains."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=False,
    )


@dataclass
class EvalPatches:
    """Held-out patches: (slide, rows) chunks to evaluate and rows to keep out of training per slide."""

    items: list[tuple[int, np.ndarray]]
    heldout: dict[int, np.ndarray]

    @property
    def num_patches(self) -> int:
        return int(sum(len(r) for _, r in self.items))


def choose_eval_patches(slides: list[MemorySlide], eval_slides: list[int], train_slides: list[int],
                        max_patches: int, holdout_fraction: float, seed: int, chunk: int = 64,
                        max_per_slide: int | None = None) -> EvalPatches:
    """Evaluation patches: rows of the held-out slides (`eval_slides`, e.g. the val/test split); when
    there are none, `holdout_fraction` of every training slide's rows, which training then never samples.
    At most `max_patches` in all, spread evenly over the slides; deterministic in `seed`."""
    rng = np.random.default_rng([seed, 424242])
    source = eval_slides if eval_slides else train_slides
    heldout: dict[int, np.ndarray] = {}
    if not source or max_patches <= 0:
        return EvalPatches([], heldout)
    per_slide = max(1, max_patches // len(source))
    if max_per_slide is not None:
        per_slide = min(per_slide, max_per_slide)
    items = []
    for slide in source:
        count = slides[slide].count
        if eval_slides:
            take = min(per_slide, count)
        else:
            take = min(per_slide, int(count * holdout_fraction))
            if take == 0 or take >= count:
                continue
        rows = np.sort(rng.choice(count, size=take, replace=False))
        if not eval_slides:
            heldout[slide] = rows
        items.extend((slide, rows[i:i + chunk]) for i in range(0, len(rows), chunk))
    return EvalPatches(items, heldout)


__all__ = [
    "EvalPatches",
    "FAILURE_FIELDS",
    "PatchListDataset",
    "Stage2InputError",
    "Stage2StepDataset",
    "TileReader",
    "check_slide_coords",
    "choose_eval_patches",
    "make_loader",
    "prepare_slides",
]
