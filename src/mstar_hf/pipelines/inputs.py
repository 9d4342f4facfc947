"""What the WSI pipelines accept, turned into one bag of patch features per slide.

An input is one of:

* a whole-slide image path (any OpenSlide format): tissue segmentation, tiling at `target_mpp`
  and patch encoding with the model's own patch encoder and image processor (`mstar_hf.wsi`);
* a features `.h5`/`.hdf5` path (`coords` (N, 2), `features` (N, D), as `mstar-hf extract` writes);
* a tensor or array `[N, D]` of patch features;
* a dict `{"features": [N, D], "coords": [N, 2] (optional), "patch_size_level0": int (optional),
  "slide_path": str (optional)}`.

Every error names the input and the problem (missing file, wrong feature width, empty bag, NaN).
A list of inputs is padded into one batch by `collate_wsi_inputs`.

This file travels with saved models as remote code (`pipelines/remote.py`): it imports the slide
reading of `mstar_hf.wsi` from the package when installed, else from the copies beside it, and h5py /
OpenSlide only when an input needs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import Pipeline
from transformers.pipelines.base import no_collate_fn
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

FEATURE_SUFFIXES = (".h5", ".hdf5")


def _package_missing(exc: ModuleNotFoundError) -> bool:
    """True when `exc` says mstar_hf itself is not installed (this file then runs as remote code)."""
    return exc.name is not None and (exc.name == "mstar_hf" or exc.name.startswith("mstar_hf."))


@dataclass
class WSIInput:
    """One slide as a bag of patch-encoder features.

    features (`torch.FloatTensor` `[N, D]`): patch-encoder features (D = the aggregator's input width).
    coords (`np.ndarray` `[N, 2]` int64 or None): level-0 (x, y) top-left corners of the patches.
    source (`str`): the path, or "<tensor>" / "<dict>", for messages and outputs.
    kind (`str`): "slide", "features" or "tensor".
    slide_path (`str` or None): the slide the patches come from, when known (for heatmaps).
    patch_size_level0 (`int` or None): extent of one patch in level-0 pixels, when known.
    """

    features: torch.Tensor
    coords: np.ndarray | None
    source: str
    kind: str
    slide_path: str | None = None
    patch_size_level0: int | None = None

    def meta(self) -> dict:
        return {"source": self.source, "kind": self.kind, "coords": self.coords, "slide_path": self.slide_path,
                "patch_size_level0": self.patch_size_level0, "num_patches": int(self.features.shape[0])}


def _check_features(features, feature_dim: int, where: str) -> torch.Tensor:
    features = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise ValueError(f"{where}: patch features must have shape [N, {feature_dim}], got {tuple(features.shape)}.")
    if features.shape[1] != feature_dim:
        raise ValueError(f"{where}: wrong feature width: expected {feature_dim}, got {features.shape[1]}.")
    if features.shape[0] == 0:
        raise ValueError(f"{where}: empty bag: 0 patches.")
    if not features.is_floating_point():
        features = features.float()
    if not bool(torch.isfinite(features).all()):
        rows = (~torch.isfinite(features)).any(dim=1).sum().item()
        raise ValueError(f"{where}: NaN or inf in {rows} patch row(s).")
    return features.to(torch.float32)


def _check_coords(coords, num: int, where: str) -> np.ndarray | None:
    if coords is None:
        return None
    coords = np.asarray(coords.cpu() if isinstance(coords, torch.Tensor) else coords).astype(np.int64).reshape(-1, 2)
    if len(coords) != num:
        raise ValueError(f"{where}: {len(coords)} coords for {num} patches.")
    return coords


def _h5py():
    try:
        import h5py
    except ImportError as exc:
        raise ImportError("reading a features .h5 needs h5py: pip install h5py") from exc
    return h5py


def recorded_slide_path(h5_path, attrs: dict) -> str | None:
    """The slide a features h5 was extracted from, if it still exists: the `slide_path` attribute (the
    full path `mstar-hf extract` records), else the `slide` file name next to the h5 or in the folder above."""
    h5_path = Path(h5_path)
    candidates = []
    for key in ("slide_path", "slide"):
        value = attrs.get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and value:
            value = Path(value)
            candidates += [value] if value.is_absolute() else [h5_path.parent / value, h5_path.parent.parent / value]
    return next((str(c) for c in candidates if c.is_file()), None)


def _read_h5(path: Path, feature_dim: int) -> WSIInput:
    h5py = _h5py()
    try:
        handle = h5py.File(path, "r")
    except OSError as e:
        raise OSError(f"{path}: cannot open as HDF5 ({e}).") from None
    with handle as f:
        if "features" not in f:
            raise KeyError(f"{path}: no 'features' dataset in the features file; found {sorted(f.keys())}.")
        features = np.asarray(f["features"][()])
        coords = np.asarray(f["coords"][()]) if "coords" in f else None
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    features = _check_features(features, feature_dim, str(path))
    coords = _check_coords(coords, len(features), str(path))
    size0 = attrs.get("patch_size_level0")
    return WSIInput(features, coords, str(path), "features", recorded_slide_path(path, attrs),
                    int(size0) if size0 is not None else None)


def _extract_slide(path: Path, feature_dim: int, patch_model, image_processor, device, options: dict) -> WSIInput:
    try:  # the installed package
        from mstar_hf.wsi.extraction import extract_slide_features
    except ModuleNotFoundError as exc:  # remote code: the slide-reading files travel beside this one
        if not _package_missing(exc):
            raise
        from .extraction import extract_slide_features

    if patch_model is None:
        raise ValueError(f"{path}: a slide path needs a model with a patch encoder; pass patch features instead.")
    # image_processor None: the documented mSTAR preprocessing (224 px, ImageNet mean/std)
    coords, features, grid = extract_slide_features(
        path, patch_model, image_processor,
        batch_size=options.get("extraction_batch_size", 64),
        num_workers=options.get("extraction_workers", 2),
        precision=options.get("precision", "fp32"),
        device=device,
        progress=options.get("progress", False),
        patch_size=options.get("patch_size", 256),
        target_mpp=options.get("target_mpp", 0.5),
        min_tissue=options.get("min_tissue", 0.5),
        mpp_override=options.get("mpp"),
        seg_params=options.get("seg_params"),
        return_grid=True,
    )
    features = _check_features(torch.from_numpy(features), feature_dim, str(path))
    return WSIInput(features, coords, str(path), "slide", str(path), int(grid.patch_size_level0))


def load_wsi_input(item, feature_dim: int, patch_model=None, image_processor=None, device=None, **options) -> WSIInput:
    """Turn one pipeline input into a `WSIInput` (see the module docstring for the accepted kinds).

    `options` for slide paths: patch_size (256), target_mpp (0.5 = 20x), min_tissue (0.5), mpp (override
    of the slide's resolution), seg_params, extraction_batch_size (64), extraction_workers (2 reader
    processes), precision ("fp32"), progress (False). A slide without tissue raises `NoTissueError`.
    """
    if isinstance(item, WSIInput):
        _check_features(item.features, feature_dim, item.source)
        return item
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file (expected a whole-slide image or a features .h5).")
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a directory, not a slide or a features .h5 file.")
        if path.suffix.lower() in FEATURE_SUFFIXES:
            return _read_h5(path, feature_dim)
        return _extract_slide(path, feature_dim, patch_model, image_processor, device, options)
    if isinstance(item, (torch.Tensor, np.ndarray)):
        return WSIInput(_check_features(item, feature_dim, "<tensor>"), None, "<tensor>", "tensor")
    if isinstance(item, dict):
        key = "features" if "features" in item else "patch_features" if "patch_features" in item else None
        if key is None:
            raise KeyError(f"a dict input needs a 'features' entry ([N, {feature_dim}]); got keys {sorted(item)}.")
        source = str(item.get("source", "<dict>"))
        features = _check_features(item[key], feature_dim, source)
        size0 = item.get("patch_size_level0")
        return WSIInput(features, _check_coords(item.get("coords"), len(features), source), source, "tensor",
                        item.get("slide_path"), int(size0) if size0 is not None else None)
    raise TypeError(
        f"unsupported WSI input of type {type(item).__name__}: pass a slide path, a features .h5 path, "
        f"a [N, {feature_dim}] tensor or a dict with 'features'."
    )


def to_model_inputs(bag: WSIInput) -> dict:
    """A batch of one: patch_features [1, N, D], patch_attention_mask [1, N], meta [dict]."""
    n = bag.features.shape[0]
    return {"patch_features": bag.features[None], "patch_attention_mask": torch.ones(1, n, dtype=torch.bool),
            "meta": [bag.meta()]}


def collate_wsi_inputs(items: list[dict]) -> dict:
    """Pads batches of one (`to_model_inputs`) into one batch: features with zeros, mask with False."""
    if len(items) == 1:
        return items[0]
    width = items[0]["patch_features"].shape[-1]
    longest = max(it["patch_features"].shape[1] for it in items)
    features = items[0]["patch_features"].new_zeros(len(items), longest, width)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, it in enumerate(items):
        n = it["patch_features"].shape[1]
        features[i, :n] = it["patch_features"][0]
        mask[i, :n] = it["patch_attention_mask"][0]
    return {"patch_features": features, "patch_attention_mask": mask, "meta": [it["meta"][0] for it in items]}


def unbatch_meta(meta):
    """`meta` of one item: the pipeline's batch unrolling hands over the dict itself, a batch of one a list."""
    return meta[0] if isinstance(meta, list) else meta




# -- the pipelines' shared base ---------------------------------------------------------------------

PREPROCESS_PARAMS = ("patch_size", "target_mpp", "min_tissue", "mpp", "seg_params", "extraction_batch_size",
                     "extraction_workers", "precision", "progress")


class WSIPipeline(Pipeline):
    """Base of the WSI pipelines: resolves the tokenizer / image processor from an `MStarProcessor`,
    turns every input into a bag of patch features (`load_wsi_input`) and pads lists into batches.

    Lists are batched `batch_size` slides at a time (default 1, as in transformers; slides of different
    lengths are each computed on their own patches, so a batch gives the same numbers as one slide at a
    time). The model is put in eval mode.
    """

    _load_processor = None
    _load_tokenizer = None
    _load_image_processor = None
    _load_feature_extractor = False

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        if not hasattr(self.model, "aggregator") or not hasattr(self.model, "patch_model"):
            raise TypeError(f"{type(self).__name__} needs an MStarModel (patch encoder + aggregator), "
                            f"got {type(self.model).__name__}.")
        if self.processor is not None:
            if self.tokenizer is None:
                self.tokenizer = getattr(self.processor, "tokenizer", None)
            if self.image_processor is None:
                self.image_processor = getattr(self.processor, "image_processor", None)
        self.model.eval()

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.aggregator_config.input_dim)

    def _split_preprocess(self, kwargs: dict) -> dict:
        return {k: kwargs.pop(k) for k in PREPROCESS_PARAMS if k in kwargs}

    def load_input(self, item, **options) -> WSIInput:
        """One input -> `WSIInput` (slides are encoded with the model's patch encoder on the pipeline's device)."""
        return load_wsi_input(item, self.feature_dim, self.model.patch_model, self.image_processor, self.device,
                              **options)

    def preprocess(self, inputs, **options) -> dict:
        return to_model_inputs(self.load_input(inputs, **options))

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        # As Pipeline.get_iterator, with a collate function that pads bags of patches.
        dataset = PipelineDataset(inputs, self.preprocess, preprocess_params) if hasattr(inputs, "__len__") else \
            PipelineIterator(inputs, self.preprocess, preprocess_params)
        collate = no_collate_fn if batch_size == 1 else collate_wsi_inputs
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=collate)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def save_pretrained(self, save_directory, **kwargs):
        """Saves the model, the full processor and the pipeline code (`custom_pipelines` in config.json),
        so that `pipeline(task, model=save_directory, trust_remote_code=True)` rebuilds this pipeline,
        with or without mstar_hf installed."""
        save_pipeline(self, save_directory, **kwargs)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)


def save_pipeline(pipe: Pipeline, save_directory, **kwargs) -> None:
    """`Pipeline.save_pretrained` with the whole pipeline code: `mstar_hf.pipelines.remote.add_custom_pipelines`
    where the package is installed; as remote code, the flat files beside this one."""
    try:
        from mstar_hf.pipelines.remote import add_custom_pipelines
    except ModuleNotFoundError as exc:
        if not _package_missing(exc):
            raise
        add_custom_pipelines = None
    os.makedirs(save_directory, exist_ok=True)
    pipe.model.save_pretrained(save_directory, **kwargs)
    for part in (pipe.tokenizer, pipe.image_processor):
        if part is not None:
            part.save_pretrained(save_directory)
    if add_custom_pipelines is not None:
        add_custom_pipelines(save_directory)
        return
    import json
    import shutil
    import sys

    from transformers.dynamic_module_utils import get_relative_import_files

    # remote code: config.json keeps the custom_pipelines it was loaded with; copy the modules they name
    here = Path(sys.modules[type(pipe).__module__].__file__).parent
    config = json.loads((Path(save_directory) / "config.json").read_text(encoding="utf-8"))
    for info in (config.get("custom_pipelines") or {}).values():
        module = here / (info["impl"].split(".")[0] + ".py")
        for source in [module, *map(Path, get_relative_import_files(module))]:
            shutil.copyfile(source, Path(save_directory) / source.name)


__all__ = ["WSIInput", "WSIPipeline", "load_wsi_input", "to_model_inputs", "collate_wsi_inputs", "unbatch_meta",
           "recorded_slide_path", "save_pipeline", "FEATURE_SUFFIXES", "PREPROCESS_PARAMS"]
