"""From cohort rows to model batches.

`CohortTorchDataset` wraps a cohort `datasets.Dataset`: an item reads its slide's patch features
from h5 (sampled to `max_patches`), processes its RNA profile and keeps its report text.
`MStarDataCollator` tokenises the reports of a batch, pads the patch features and stacks the rest
into the model inputs:

    patch_features float [B,N,D], patch_attention_mask bool [B,N] (True = real patch),
    input_ids long [B,T], attention_mask long [B,T], rna_bins long [B,G], rna_mask bool [B,G],
    slide_present / report_present / rna_present bool [B], cancer_type long [B] (-1 = unknown),
    case_id list[str]  (not a tensor: pop it before calling the model), case_index long [B] (a stable id
    per case, the same in every process, so that the Stage 1 loss never contrasts a patient with itself).

N is the longest slide of the batch (at least 1), or `max_patches` with `pad_to_max=True`; padded
rows are zeros with mask False, and a case without a slide has an all-False row.

Reproducible, resumable sampling: a slide's patch sample depends only on (seed, epoch, item index),
not on worker count, process or iteration order. Call `dataset.set_epoch(epoch)` to draw new samples
each epoch (with `persistent_workers=True` the workers keep their own copy: recreate the loader).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .bags import pad_bags
from .cache import DEFAULT_CACHE_MB, BoundedCache, read_slide_features_cached
from .manifest import load_case_rna
from .processing_mstar import MStarProcessor


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(index)])


class CohortTorchDataset(torch.utils.data.Dataset):
    """A map-style torch dataset over a cohort `datasets.Dataset` (from `load_cohort`).

    Args:
        dataset: the cohort (`load_cohort(...)`, or a split/selection of it).
        processor: an `MStarProcessor`; its gene vocabulary processes the RNA profiles.
        max_patches: slides with more patches are sampled without replacement to this many.
        feature_dim: expected feature width; a file of another width raises (naming the case).
        seed: seed of the patch sampling.
        return_coords: also return the sampled patches' level-0 coordinates (`patch_coords`).
        patch_keep_fraction: below 1, each read keeps a random `ceil(fraction * n)` of the slide's (sampled) n
            patches, drawn anew every epoch: patch dropout, an augmentation for training bags (1: all).
        cache_mb: memory for feature files and processed RNA profiles read again in later epochs (0: read
            every time). Only the process that holds the dataset fills it: DataLoader workers start anew each
            epoch and would read whole files for a cache they lose. Cached and uncached reads return the same
            items.

    An item is a dict: case_id, slide_id, patch_features (float tensor [n, D] or None),
    [patch_coords], report (str or None), rna_bins, rna_mask, rna_present, cancer_type (int).
    """

    def __init__(self, dataset, processor: MStarProcessor, max_patches: int | None = 4096,
                 feature_dim: int | None = None, seed: int = 0, return_coords: bool = False,
                 cache_mb: int = DEFAULT_CACHE_MB, patch_keep_fraction: float = 1.0):
        if max_patches is not None and max_patches < 1:
            raise ValueError(f"max_patches must be >= 1, got {max_patches}.")
        if not 0.0 < patch_keep_fraction <= 1.0:
            raise ValueError(f"patch_keep_fraction must be in (0, 1], got {patch_keep_fraction}.")
        self.patch_keep_fraction = float(patch_keep_fraction)
        self.dataset = dataset
        self.processor = processor
        self.max_patches = max_patches
        self.feature_dim = feature_dim
        self.seed = int(seed)
        self.epoch = 0
        self.return_coords = return_coords
        self.cache = BoundedCache(int(cache_mb) * 2**20)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _cache(self) -> BoundedCache | None:
        return self.cache if torch.utils.data.get_worker_info() is None else None

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[int(index)]
        case_id = row["case_id"]
        item = {"case_id": case_id, "slide_id": row.get("slide_id"), "report": row.get("report"),
                "cancer_type": -1 if row.get("cancer_type_id") is None else int(row["cancer_type_id"])}
        if row.get("features_path"):
            features, coords = read_slide_features_cached(
                self._cache(), row["features_path"], case_id=case_id, expected_dim=self.feature_dim,
                max_patches=self.max_patches, rng=_rng(self.seed, self.epoch, index),
                read_coords=self.return_coords)
            if self.patch_keep_fraction < 1.0 and len(features) > 1:
                keep = max(1, math.ceil(self.patch_keep_fraction * len(features)))
                rows = np.sort(np.random.default_rng([self.seed, self.epoch, int(index), 31]).choice(
                    len(features), keep, replace=False))
                features = features[rows]
                coords = None if coords is None else coords[rows]
            item["patch_features"] = torch.from_numpy(features)
            if self.return_coords:
                item["patch_coords"] = None if coords is None else torch.from_numpy(coords)
        else:
            item["patch_features"] = None
            if self.return_coords:
                item["patch_coords"] = None
        item.update(self._rna(index, row))
        return item

    def _rna(self, index: int, row: dict) -> dict:
        # parsing an expression table costs more than a Stage 1 step on small models: once per case
        key = ("rna", int(index))
        cache = self._cache()
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            return {k: v.clone() if torch.is_tensor(v) else v for k, v in cached.items()}
        case_id = row["case_id"]
        expression = load_case_rna(row)
        gene_processor = self.processor.gene_processor
        if gene_processor is None:
            if expression is not None:
                raise ValueError(f"case {case_id!r} has RNA but the processor has no gene vocabulary.")
            rna = dict(rna_bins=torch.zeros(0, dtype=torch.long), rna_mask=torch.zeros(0, dtype=torch.bool))
        else:
            processed = gene_processor(expression, case_id=case_id)
            rna = dict(rna_bins=torch.from_numpy(processed["rna_bins"]), rna_mask=torch.from_numpy(processed["rna_mask"]))
        rna["rna_present"] = expression is not None
        if cache is not None and cache.put(key, rna, rna["rna_bins"].nbytes + rna["rna_mask"].nbytes):
            rna = {k: v.clone() if torch.is_tensor(v) else v for k, v in rna.items()}
        return rna


class MStarDataCollator:
    """Collates `CohortTorchDataset` items (or equivalent dicts) into model inputs.

    Args:
        processor: the `MStarProcessor` (tokenizer, gene vocabulary).
        max_patches: cap on patches per slide. Items from `CohortTorchDataset` are already sampled;
            larger items (e.g. built by hand) are sampled here with the collator's seeded generator.
        pad_to_max: pad every slide to `max_patches` instead of the batch's longest slide.
        feature_dim: expected feature width (needed to shape a batch in which no case has a slide).
        seed: seed of the collator's own sampling generator.
        cancer_types: names for items whose `cancer_type` is a string (index = id).
        strict_reports: raise on whitespace-only reports (default: the processor's setting).

    Items may carry `rna` (a profile: Series / dict / path / None) instead of `rna_bins`/`rna_mask`.
    """

    def __init__(self, processor: MStarProcessor, max_patches: int | None = 4096, pad_to_max: bool = False,
                 feature_dim: int | None = None, seed: int = 0, cancer_types: Sequence[str] | None = None,
                 strict_reports: bool | None = None, return_coords: bool = False):
        if pad_to_max and max_patches is None:
            raise ValueError("pad_to_max=True needs max_patches.")
        self.processor = processor
        self.max_patches = max_patches
        self.pad_to_max = pad_to_max
        self.feature_dim = feature_dim
        self.cancer_types = list(cancer_types) if cancer_types is not None else None
        self.strict_reports = strict_reports
        self.return_coords = return_coords
        self.generator = torch.Generator().manual_seed(int(seed))

    def _cancer_type(self, value, case_id) -> int:
        if value is None:
            return -1
        if isinstance(value, str):
            if self.cancer_types is None:
                raise ValueError(f"case {case_id!r}: cancer_type {value!r} is a name; pass cancer_types= to the "
                                 "collator to map names to ids.")
            return self.cancer_types.index(value) if value in self.cancer_types else -1
        return int(value)

    def __call__(self, items: Sequence[dict]) -> dict:
        if len(items) == 0:
            raise ValueError("cannot collate an empty batch.")
        case_ids = [str(it.get("case_id", f"#{i}")) for i, it in enumerate(items)]

        # Patch features.
        feats, coords = [], []
        for case_id, it in zip(case_ids, items):
            x = it.get("patch_features")
            c = it.get("patch_coords")
            if x is None:
                feats.append(None)
                coords.append(None)
                continue
            x = torch.as_tensor(x, dtype=torch.float32)
            if x.ndim != 2:
                raise ValueError(f"case {case_id!r}: patch_features must be [N, D], got shape {tuple(x.shape)}.")
            if x.shape[0] == 0:
                raise ValueError(f"case {case_id!r}: patch_features has no patches.")
            if not torch.isfinite(x).all():
                raise ValueError(f"case {case_id!r}: patch_features contain NaN/inf.")
            if self.max_patches is not None and x.shape[0] > self.max_patches:
                keep = torch.randperm(x.shape[0], generator=self.generator)[: self.max_patches].sort().values
                x = x[keep]
                c = None if c is None else torch.as_tensor(c)[keep]
            feats.append(x)
            coords.append(None if c is None else torch.as_tensor(c, dtype=torch.long))
        widths = {case_id: x.shape[1] for case_id, x in zip(case_ids, feats) if x is not None}
        dim = self.feature_dim
        if dim is None and widths:
            dim = next(iter(widths.values()))
        wrong = [f"{c} ({w})" for c, w in widths.items() if w != dim]
        if wrong:
            raise ValueError(f"wrong feature width: expected {dim}, got case(s) {', '.join(wrong)}.")
        if dim is None:
            raise ValueError("no case of this batch has a slide, so the feature width is unknown: "
                             "pass feature_dim= to the collator.")
        batch_size = len(items)
        bags = pad_bags(feats, coords if self.return_coords else None, dim=dim,
                        length=self.max_patches if self.pad_to_max else None)
        patch_features, patch_mask = bags["patch_features"], bags["patch_attention_mask"]
        patch_coords = None
        if self.return_coords:  # zeros for bags without coords
            patch_coords = bags.get("patch_coords", torch.zeros(batch_size, patch_features.shape[1], 2, dtype=torch.long))

        # Reports.
        text = self.processor.tokenize_reports([it.get("report") for it in items], case_ids,
                                               strict=self.strict_reports)

        # RNA.
        num_genes = self.processor.num_genes
        rna_bins = torch.zeros(batch_size, num_genes, dtype=torch.long)
        rna_mask = torch.zeros(batch_size, num_genes, dtype=torch.bool)
        rna_present = torch.zeros(batch_size, dtype=torch.bool)
        for b, (case_id, it) in enumerate(zip(case_ids, items)):
            if "rna_bins" in it:
                bins, mask = torch.as_tensor(it["rna_bins"]), torch.as_tensor(it["rna_mask"])
                present = bool(it.get("rna_present", bool(mask.any())))
            elif it.get("rna") is not None:
                if self.processor.gene_processor is None:
                    raise ValueError(f"case {case_id!r} has RNA but the processor has no gene vocabulary.")
                out = self.processor.gene_processor(it["rna"], case_id=case_id)
                bins, mask, present = torch.from_numpy(out["rna_bins"]), torch.from_numpy(out["rna_mask"]), True
            else:
                continue
            if bins.shape != (num_genes,) or mask.shape != (num_genes,):
                raise ValueError(f"case {case_id!r}: rna_bins/rna_mask have shape {tuple(bins.shape)}/"
                                 f"{tuple(mask.shape)}, expected ({num_genes},) for the processor's gene vocabulary.")
            if present:
                if bins.numel() and (int(bins.min()) < 0 or int(bins.max()) >= self.processor.num_bins):
                    raise ValueError(f"case {case_id!r}: rna_bins outside 0..{self.processor.num_bins - 1}.")
                rna_bins[b], rna_mask[b], rna_present[b] = bins.long(), mask.bool(), True

        batch = {
            "patch_features": patch_features,
            "patch_attention_mask": patch_mask,
            "input_ids": text["input_ids"].long(),
            "attention_mask": text["attention_mask"].long(),
            "rna_bins": rna_bins,
            "rna_mask": rna_mask,
            "slide_present": torch.tensor([x is not None for x in feats], dtype=torch.bool),
            "report_present": text["report_present"],
            "rna_present": rna_present,
            "cancer_type": torch.tensor([self._cancer_type(it.get("cancer_type"), c)
                                         for c, it in zip(case_ids, items)], dtype=torch.long),
            "case_id": case_ids,
            "case_index": torch.tensor([case_index(c) for c in case_ids], dtype=torch.long),
        }
        if patch_coords is not None:
            batch["patch_coords"] = patch_coords
        return batch


def case_index(case_id: str) -> int:
    """A stable 62-bit integer id of a case name (the same in every process and run; Python's `hash` is
    salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(str(case_id).encode(), digest_size=8).digest(), "little") >> 2


def build_cohort_dataloader(dataset, processor: MStarProcessor, batch_size: int = 8, shuffle: bool = True,
                            max_patches: int | None = 4096, pad_to_max: bool = False,
                            feature_dim: int | None = None, seed: int = 0, num_workers: int = 0,
                            drop_last: bool = False, **loader_kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader over a cohort with a seeded shuffle (same order for the same seed)."""
    torch_dataset = dataset if isinstance(dataset, CohortTorchDataset) else CohortTorchDataset(
        dataset, processor, max_patches=max_patches, feature_dim=feature_dim, seed=seed)
    collator = MStarDataCollator(processor, max_patches=max_patches, pad_to_max=pad_to_max,
                                 feature_dim=feature_dim, seed=seed)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.utils.data.DataLoader(torch_dataset, batch_size=batch_size, shuffle=shuffle,
                                       collate_fn=collator, num_workers=num_workers, drop_last=drop_last,
                                       generator=generator, **loader_kwargs)


__all__ = ["CohortTorchDataset", "MStarDataCollator", "build_cohort_dataloader"]
