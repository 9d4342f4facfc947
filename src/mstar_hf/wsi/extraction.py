"""Batched patch-feature extraction: DataLoader workers read patches, the main process runs the model.

Workers each open their own OpenSlide (or cuCIM) handle (handles are not fork-safe) and return
ready-to-batch tensors, so reading and resizing overlap with the forward pass. Patches are read from
the coarsest pyramid level at least as fine as the target and resized with Pillow, as the official
preprocessing does. On a GPU the workers return pinned uint8 (4x less to copy), normalisation runs on
the device, the encoder runs under bf16 autocast with fused attention (see `prepare_encoder`) and
features stay on the device until the slide is done; on a CPU the workers also normalise, keeping the
main process, which owns the compute threads, free of per-patch work. Batch runs write each slide's
file in a background thread and hand slides to processes dynamically (claim files).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .errors import SlideError
from .features import TMP_SUFFIX, read_attrs, tmp_path_for, write_features
from .slide import WSI, ReadPlan, open_slide
from .tiling import TileGrid, tile_slide

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto", *PRECISIONS)


# -- preprocessing ----------------------------------------------------------------------------------
class PatchTransform:
    """The image processor's resize / crop / rescale / normalise, split into a uint8 part and a float part.

    Mirrors `MStarImageProcessor`: the resize is Pillow's on the uint8 patch (as the official
    `transforms.Resize` on a PIL image, so features equal the authors' pipeline), or, when the
    processor has `fast_resize=True`, torchvision's antialiased resize of the uint8 tensor; then
    normalisation with mean and std folded with the 1/255 rescale.
    """

    def __init__(self, image_processor=None):
        from torchvision.transforms import InterpolationMode
        from transformers.image_utils import PILImageResampling, pil_torch_interpolation_mapping

        p = image_processor

        def get(name, default=None):
            value = getattr(p, name, None) if p is not None else None
            return default if value is None else value

        size = get("size", {"height": 224, "width": 224})
        size_get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        self.size = (size_get("height"), size_get("width")) if size_get("height") else None
        self.shortest_edge = size_get("shortest_edge")
        self.do_resize = bool(get("do_resize", True))
        resample = get("resample", PILImageResampling.BILINEAR)
        self.interpolation = resample if isinstance(resample, InterpolationMode) else \
            pil_torch_interpolation_mapping[PILImageResampling(int(resample))]
        self.pil_resample = {v: k for k, v in pil_torch_interpolation_mapping.items()}[self.interpolation]
        self.fast_resize = bool(get("fast_resize", False))
        crop = get("crop_size")
        self.crop = None
        if get("do_center_crop", False) and crop is not None:
            cget = crop.get if isinstance(crop, dict) else (lambda k: getattr(crop, k, None))
            self.crop = (cget("height"), cget("width"))
        self.do_rescale = bool(get("do_rescale", True))
        self.rescale_factor = float(get("rescale_factor", 1 / 255))
        self.do_normalize = bool(get("do_normalize", True))
        mean = torch.tensor(get("image_mean", (0.485, 0.456, 0.406)), dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(get("image_std", (0.229, 0.224, 0.225)), dtype=torch.float32).view(1, 3, 1, 1)
        if self.do_rescale and self.do_normalize:  # (x / 255 - m) / s == (x - 255 m) / (255 s)
            mean, std = mean / self.rescale_factor, std / self.rescale_factor
        self.mean, self.std = mean, std
        self._on_device: dict = {}

    def _stats(self, device):
        # Cached per device: no host-to-device copy of mean/std for every batch.
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.mean.to(device), self.std.to(device))
        return self._on_device[key]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_on_device"] = {}
        return state

    def output_size(self, patch_size: int) -> tuple[int, int]:
        h = w = patch_size
        if self.do_resize:
            if self.size is not None:
                h, w = self.size
            elif self.shortest_edge:
                h = w = self.shortest_edge
        return self.crop or (h, w)

    def _target(self, h: int, w: int) -> tuple[int, int]:
        if self.size is not None:
            return tuple(self.size)
        # shortest edge, as torchvision's Resize(int): the long side is truncated, not rounded
        s = self.shortest_edge
        return (s, int(s * w / h)) if h <= w else (int(s * h / w), s)

    def resize_image(self, image) -> torch.Tensor:
        """RGB PIL image -> uint8 (3, h, w) tensor at the processor's size (and crop)."""
        if self.do_resize and not self.fast_resize:
            th, tw = self._target(image.height, image.width)
            if (th, tw) != (image.height, image.width):
                image = image.resize((tw, th), self.pil_resample)
            return self._crop(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        return self.resize(torch.from_numpy(np.array(image)).permute(2, 0, 1))

    def resize_array(self, arr: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) numpy -> uint8 (3, h, w) tensor at the processor's size (and crop)."""
        if self.do_resize and not self.fast_resize:
            from PIL import Image

            return self.resize_image(Image.fromarray(np.ascontiguousarray(arr)))
        return self.resize(torch.from_numpy(arr).permute(2, 0, 1))

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> uint8 at the processor's size (and crop)."""
        from torchvision.transforms.v2 import functional as tvF

        if self.do_resize:
            target = self._target(*x.shape[-2:])
            if tuple(x.shape[-2:]) != tuple(target):
                if self.fast_resize or x.dtype != torch.uint8:
                    x = tvF.resize(x, list(target), interpolation=self.interpolation, antialias=True)
                else:
                    x = _pil_resize(x, target, self.pil_resample)
        return self._crop(x)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as tvF

        return tvF.center_crop(x, list(self.crop)) if self.crop is not None else x

    def normalize(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (B, 3, H, W) on any device -> float32 model input, written into `out` when given
        (a reused buffer: a fresh 38 MB batch costs more in page faults than normalising it)."""
        x = out.copy_(x) if out is not None else x.to(torch.float32)
        if self.do_normalize:
            mean, std = self._stats(x.device)
            return x.sub_(mean).div_(std)
        if self.do_rescale:
            return x.mul_(self.rescale_factor)
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.ndim == 3
        out = self.normalize(self.resize(x[None] if squeeze else x))
        return out[0] if squeeze else out


def _pil_resize(x: torch.Tensor, size: tuple[int, int], resample) -> torch.Tensor:
    """uint8 (..., 3, H, W) resized image by image with Pillow (what `transforms.Resize` does to a PIL image)."""
    from PIL import Image

    flat = x.reshape(-1, *x.shape[-3:])
    out = torch.empty((flat.shape[0], flat.shape[1], *size), dtype=torch.uint8)
    for i, img in enumerate(flat):
        pil = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())
        out[i] = torch.from_numpy(np.array(pil.resize((size[1], size[0]), resample))).permute(2, 0, 1)
    return out.reshape(*x.shape[:-2], *size)


# -- dataset ----------------------------------------------------------------------------------------
class PatchDataset(Dataset):
    """Patches of one slide. Each worker process opens its own slide handle on first use.

    Items are (3, H, W) tensors: uint8 after the resize when `normalize=False`, float32 model input
    when `normalize=True`.
    """

    def __init__(self, slide_path, coords: np.ndarray, plan: ReadPlan, transform: PatchTransform | None = None,
                 mpp_override: float | None = None, normalize: bool = False, wsi: WSI | None = None,
                 reader: str = "openslide"):
        self.slide_path = Path(slide_path)
        self.reader = reader
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.plan = plan
        self.transform = transform
        self.mpp_override = mpp_override
        self.normalize = normalize
        # An open handle is reused only in the process that opened it (num_workers=0).
        self._wsi: WSI | None = wsi
        self._pid = os.getpid() if wsi is not None else None

    def _slide(self) -> WSI:
        # A handle inherited through fork is not safe to use: reopen in every new process.
        if self._wsi is None or self._pid != os.getpid():
            self._wsi = open_slide(self.slide_path, mpp_override=self.mpp_override, reader=self.reader)
            self._pid = os.getpid()
        return self._wsi

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_wsi"] = None
        state["_pid"] = None
        return state

    def __len__(self):
        return len(self.coords)

    def _resized(self, i) -> torch.Tensor:
        x0, y0 = self.coords[i]
        image = self._slide().read_patch_image(int(x0), int(y0), self.plan)
        if self.transform is not None:
            return self.transform.resize_image(image)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)

    def __getitem__(self, i):
        x = self._resized(i)
        if self.transform is not None and self.normalize:
            x = self.transform.normalize(x[None])[0]
        return x.contiguous()

    def __getitems__(self, indices) -> torch.Tensor:
        """A whole batch, written patch by patch into one tensor (the DataLoader calls this).

        In a worker the tensor is allocated in shared memory up front, so handing it to the main
        process copies nothing, and each patch is normalised while it is still in cache.
        """
        h, w = self.transform.output_size(self.plan.patch_size) if self.transform else (self.plan.patch_size,) * 2
        as_float = self.transform is not None and self.normalize
        batch = torch.empty((len(indices), 3, h, w), dtype=torch.float32 if as_float else torch.uint8)
        if get_worker_info() is not None:
            batch.share_memory_()
        if as_float:
            mean, std = self.transform.mean[0], self.transform.std[0]
        for j, i in enumerate(indices):
            batch[j].copy_(self._resized(i))
            if as_float:
                if self.transform.do_normalize:
                    batch[j].sub_(mean).div_(std)
                elif self.transform.do_rescale:
                    batch[j].mul_(self.transform.rescale_factor)
        return batch


def _worker_init(_):
    # One thread per reader: the compute threads belong to the main process.
    # (No cv2.setNumThreads here: touching OpenCV's pool inherited through fork can deadlock.)
    torch.set_num_threads(1)


def _batch_passthrough(batch):
    # `PatchDataset.__getitems__` already returns the stacked batch.
    return batch


def make_patch_loader(dataset: PatchDataset, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=_batch_passthrough,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )


# -- model helpers ----------------------------------------------------------------------------------
def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def resolve_device(device=None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 autocast on a GPU that has it (ViT-L features within ~1e-2 cosine of fp32, 2-3x the
    throughput), fp32 elsewhere (CPU autocast is slower than fp32 on most CPUs)."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {list(PRECISION_CHOICES)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def enable_fused_attention(model) -> int:
    """Turn on timm's fused scaled-dot-product attention in every attention block (timm leaves it off
    when TIMM_FUSED_ATTN=0 or on old torch); returns how many blocks use it."""
    n = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
            n += 1
    return n


def prepare_encoder(model, device: torch.device, compile: bool = False, channels_last: bool | None = None):
    """The patch encoder ready for extraction on `device`: eval, fused attention, channels_last on a GPU
    (the patch-embedding convolution reads NHWC faster), optionally `torch.compile`d.

    A compiled encoder sees only full batches (extraction pads the last one), so it compiles once.
    """
    model.to(device).eval()
    enable_fused_attention(model)
    if channels_last is None:
        channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, dynamic=False)
    return model


def _autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _pooled(output) -> torch.Tensor:
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        pooled = output[1] if isinstance(output, tuple) else output.last_hidden_state[:, 0]
    return pooled


def _worker_message(exc: Exception) -> str:
    """The original message of an exception re-raised from a DataLoader worker (drops the traceback)."""
    msg = str(exc)
    if "Original Traceback" not in msg:
        return msg
    last = [line for line in msg.strip().splitlines() if line.strip()][-1]
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def encoder_identity(model) -> dict:
    """Encoder name and config hash for feature-file attributes (what resume compares)."""
    config = getattr(model, "config", None)
    try:
        from mstar_hf.modeling.modeling_mstar_patch import config_hash
    except ImportError:  # pragma: no cover - the modeling package is part of mstar_hf
        import hashlib

        def config_hash(c):
            return hashlib.sha256(c.to_json_string(use_diff=False).encode()).hexdigest()[:16]

    name = getattr(config, "architecture", None) or getattr(model, "name_or_path", None) or type(model).__name__
    return {
        "encoder": str(name),
        "encoder_name_or_path": str(getattr(model, "name_or_path", "") or ""),
        "encoder_config_hash": config_hash(config) if config is not None else "",
        "feature_dim": int(getattr(config, "hidden_size", 0) or 0),
    }


def _run_model(model, loader, n: int, device: torch.device, transform: PatchTransform, precision: str, progress: bool,
               desc: str, pad_to: int | None = None, channels_last: bool = False) -> np.ndarray:
    """Features of every uint8 batch, normalised on `device` into a reused buffer and written into one device
    buffer: no per-batch device-to-host copy, so the GPU never waits on the host; one copy at the end."""
    from tqdm.auto import tqdm

    out = None
    done = 0
    non_blocking = device.type == "cuda"
    pixels = None  # float input buffer, reused while the batch shape holds
    with torch.inference_mode(), _autocast(device, precision), tqdm(
        total=n, desc=desc, unit="patch", disable=not progress, leave=False, dynamic_ncols=True
    ) as bar:
        for batch in loader:
            b = len(batch)
            x = batch.to(device, non_blocking=non_blocking)
            if pad_to and b < pad_to:  # a compiled encoder keeps one static shape
                x = torch.cat([x, x[-1:].expand(pad_to - b, *x.shape[1:])])
            if pixels is None or pixels.shape != x.shape:
                pixels = torch.empty(x.shape, dtype=torch.float32, device=device)
            x = transform.normalize(x, out=pixels)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = _pooled(model(pixel_values=x))[:b]
            if out is None:
                out = torch.empty((n, feats.shape[-1]), dtype=torch.float32, device=device)
            out[done : done + b] = feats
            done += b
            bar.update(b)
    if out is None:
        return np.zeros((0, 0), np.float32)
    return out[:done].cpu().numpy()


def extract_slide_features(
    wsi_or_path,
    model,
    image_processor,
    coords=None,
    batch_size: int = 64,
    num_workers: int = 2,
    precision: str = "auto",
    device=None,
    progress: bool = True,
    *,
    patch_size: int = 256,
    target_mpp: float = 0.5,
    overlap: int = 0,
    min_tissue: float = 0.5,
    mpp_override: float | None = None,
    seg_params: dict | None = None,
    return_grid: bool = False,
    reader: str = "openslide",
    pad_batches: bool = False,
    min_patches_for_workers: int | None = None,
):
    """Features of one slide's patches: returns (coords (N, 2) int64 level-0, features (N, D) float32).

    Without `coords`, the slide is segmented and tiled (`tile_slide` with patch_size, target_mpp,
    overlap, min_tissue, seg_params). `device=None` uses the model's device. `precision` "bf16" /
    "fp16" runs the forward pass under autocast ("auto": bf16 on a GPU, fp32 on CPU); features are
    returned as float32. `reader` "cucim"/"auto" decodes tiles with cuCIM (see `open_slide`);
    `pad_batches` pads the last batch to `batch_size` (for a `torch.compile`d encoder, see
    `prepare_encoder`). A slide of at most `min_patches_for_workers` patches (default: two batches) is
    read in this process: reader processes start anew per slide and would take longer to start. With `return_grid=True` the TileGrid (or None when coords were given) is
    returned third.
    """
    own = not isinstance(wsi_or_path, WSI)
    wsi = open_slide(wsi_or_path, mpp_override=mpp_override, reader=reader) if own else wsi_or_path
    try:
        grid = None
        if coords is None:
            grid = tile_slide(wsi, patch_size=patch_size, target_mpp=target_mpp, overlap=overlap,
                              min_tissue=min_tissue, **(seg_params or {}))
            coords, plan = grid.coords, grid.plan
        else:
            coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
            plan = wsi.plan_read(patch_size, target_mpp)
        dev = _model_device(model) if device is None else resolve_device(device)
        if _model_device(model) != dev:
            model.to(dev)
        model.eval()
        precision = resolve_precision(precision, dev)
        transform = PatchTransform(image_processor)
        # Readers hand over uint8 batches (4x less shared memory to fault in than float32, which cost
        # them ~0.5 ms per patch); `_run_model` normalises them on the device. Workers reopen the slide with
        # the resolution resolved here (metadata or override).
        dataset = PatchDataset(wsi.path, coords, plan, transform, mpp_override=wsi.mpp, normalize=False,
                               wsi=wsi, reader=getattr(wsi, "reader", reader))
        # reader processes start anew for every slide (fork, reopen: ~0.15 s on 2 cores): a slide of at most
        # two batches is read sooner in this process than they would start
        small = 2 * batch_size if min_patches_for_workers is None else int(min_patches_for_workers)
        workers = num_workers if len(coords) > small else 0
        loader = make_patch_loader(dataset, batch_size, workers, pin_memory=dev.type == "cuda")
        channels_last = dev.type == "cuda"
        try:
            feats = _run_model(model, loader, len(coords), dev, transform, precision, progress,
                               desc=wsi.path.name, pad_to=batch_size if pad_batches else None,
                               channels_last=channels_last)
        except SlideError as e:
            raise type(e)(_worker_message(e)) from None
        if feats.shape[0] != len(coords):
            raise SlideError(wsi.path, f"extracted {feats.shape[0]} features for {len(coords)} patches")
        return (coords, feats, grid) if return_grid else (coords, feats)
    finally:
        if own:
            wsi.close()


# -- batch extraction -------------------------------------------------------------------------------
@dataclass
class SlideSpec:
    """A slide to process, with an optional per-slide resolution override."""

    path: Path
    mpp: float | None = None


def _as_spec(item) -> SlideSpec:
    if isinstance(item, SlideSpec):
        return item
    if isinstance(item, dict):
        return SlideSpec(Path(item["path"]), item.get("mpp"))
    if isinstance(item, (tuple, list)):
        return SlideSpec(Path(item[0]), item[1] if len(item) > 1 else None)
    return SlideSpec(Path(item))


FAILURE_FIELDS = ["slide", "error", "reason"]


def check_writable_dir(out_dir) -> Path:
    """Create `out_dir` if needed and prove it writable; raises OSError naming it otherwise."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output directory {out_dir} is not writable ({e.strerror or e})") from None
    return out_dir


def _dist_state():
    """(rank, world_size, barrier, device) from Accelerate when launched with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, (lambda: None), None
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone, state.device


def default_num_workers(device: torch.device, world: int = 1) -> int:
    """Reader processes per extraction process: its share of the cores minus one for the main process,
    at most 8 on CPU (compute needs the cores) and 32 on a GPU (~1 reader core per 500-1000 patches/s)."""
    cores = max(1, (os.cpu_count() or 2) // max(1, world))
    return min(32 if device.type == "cuda" else 8, max(1, cores - 1))


def _default_threads(num_workers: int, world: int = 1) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, world) - num_workers)


CLAIMS_DIR = ".claims"


def prepare_slide(spec: SlideSpec, patch_size: int, target_mpp: float, overlap: int, min_tissue: float,
                  seg_params: dict, mpp: float | None = None, reader: str = "openslide") -> TileGrid:
    """Open, segment and tile one slide of a batch (also run in the prefetch process).

    The resolution is the slide's own override, else the run-wide `mpp`, else its metadata.
    """
    with open_slide(spec.path, mpp_override=spec.mpp if spec.mpp is not None else mpp, reader=reader) as wsi:
        if spec.mpp is None and mpp is not None:
            wsi.mpp_source = "--mpp"  # the run-wide override, recorded as such in the h5
        return tile_slide(wsi, patch_size=patch_size, target_mpp=target_mpp, overlap=overlap,
                          min_tissue=min_tissue, **seg_params)


def slide_fingerprint(path, sample: int = 1 << 20) -> str:
    """A cheap content id of a slide file: its byte size and a hash of its first and last MiB.

    Stored in every feature file and compared on resume, so a slide replaced by another file of the
    same name is re-extracted; unlike an mtime it survives copying the slides and their features.
    """
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(sample))
        if size > sample:
            fh.seek(max(sample, size - sample))
            h.update(fh.read(sample))
    return h.hexdigest()[:16]


def _claim(claims: Path, index: int, rank: int) -> bool:
    """Claim slide `index` for this process (O_EXCL: exactly one process of the launch wins, also on NFS)."""
    try:
        fd = os.open(claims / f"{index:07d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(f"rank {rank} pid {os.getpid()} host {os.uname().nodename}\n")
    return True


def _remove_claims(claims: Path):
    if claims.is_dir():
        for name in os.listdir(claims):
            (claims / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            claims.rmdir()


def _clean_stale(out_dir: Path):
    """What a killed run leaves: claim files and partial `.h5.tmp` files (never read, but they pile up)."""
    _remove_claims(out_dir / CLAIMS_DIR)
    for tmp in out_dir.glob(f"*.h5{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def extract_features(
    slides: list,
    out_dir,
    model,
    image_processor,
    patch_size: int = 256,
    target_mpp: float = 0.5,
    overlap: int = 0,
    min_tissue: float = 0.5,
    batch_size: int = 64,
    num_workers: int | None = None,
    precision: str = "auto",
    device=None,
    mpp: float | None = None,
    resume: bool = True,
    qc: bool = True,
    quiet: bool = False,
    seg_params: dict | None = None,
    num_threads: int | None = None,
    extra_failures: list | None = None,
    compile: bool = False,
    reader: str = "openslide",
    prefetch: bool | None = None,
) -> dict:
    """Extract features for many slides into `out_dir/<slide stem>.h5` (+ `out_dir/qc/<stem>.png`).

    `slides`: paths, or `SlideSpec(path, mpp)` whose mpp overrides that slide's metadata; `mpp`
    overrides the metadata of the others (a slide's resolution is its CSV mpp, else `mpp`, else its
    plausible metadata). A slide whose feature file exists with the same settings and the same slide
    file (`slide_fingerprint`) is skipped (`resume`); a failing slide is recorded in
    `out_dir/failures.csv` and the others continue.

    Several processes (`accelerate launch`, `torchrun`): slides are handed out dynamically, each
    process claiming the next unclaimed one (a claim file under `out_dir/.claims`), so a slow slide
    never idles the other processes; rank 0 merges failures and the summary. One launch per output
    folder at a time: a new launch clears the claims and `.h5.tmp` files a killed one left.

    GPU: `precision="auto"` is bf16 autocast, the encoder runs with fused attention and channels_last
    (`prepare_encoder`), `compile=True` adds `torch.compile`, readers return pinned uint8 and the
    device normalises, and each slide's file is written by a background thread while the next slide
    runs. `reader="auto"` decodes TIFF/SVS tiles with cuCIM when installed;
    `num_workers=None` sizes the readers to the machine (`default_num_workers`). `prefetch` (default:
    on a GPU) segments and tiles the next slide in a helper process while the current one runs (a
    spawned process: a script calling this needs the usual `if __name__ == "__main__":` guard). On CPU, `num_threads`
    (default: cores minus reader workers) bounds the compute threads so the readers are not starved.
    Returns a summary dict (done / skipped / failed counts, patches, seconds, patches_per_s, failures).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from .qc import save_qc_image

    out_dir = check_writable_dir(out_dir)
    rank, world, barrier, dist_device = _dist_state()
    specs = [_as_spec(s) for s in slides]
    # Several processes on GPUs: each uses the GPU Accelerate gave it (one per local rank).
    dev = dist_device if device is None and dist_device is not None else resolve_device(device)
    precision = resolve_precision(precision, dev)
    if num_workers is None:
        num_workers = default_num_workers(dev, world)
    prev_threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(num_threads or _default_threads(num_workers, world))
    ident = encoder_identity(model)
    encoder = prepare_encoder(model, dev, compile=compile)
    # An existing feature file is reused on resume only if it was made with these settings.
    reusable_if = {"patch_size": int(patch_size), "target_mpp": float(target_mpp), "overlap": int(overlap),
                   "min_tissue": float(min_tissue), "encoder_config_hash": ident["encoder_config_hash"],
                   "precision": precision}

    # Output names must be unique across the whole list (same on every rank, so no rank collides).
    seen: set[str] = set()
    duplicate = []
    for s in specs:
        duplicate.append(s.path.stem in seen)
        seen.add(s.path.stem)

    rank_failures = out_dir / (f".failures.rank{rank}.csv" if world > 1 else ".failures.partial.csv")
    failures: list[dict] = []

    def record(path, exc_or_reason, error_type=None):
        row = {"slide": str(path), "error": error_type or type(exc_or_reason).__name__,
               "reason": str(exc_or_reason).replace("\n", " ")}
        failures.append(row)
        new = not rank_failures.exists()
        with open(rank_failures, "a", newline="") as fh:  # written as we go: survives a crash
            w = csv.DictWriter(fh, FAILURE_FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)

    rank_failures.unlink(missing_ok=True)
    if rank == 0:
        _clean_stale(out_dir)
        for item in extra_failures or []:
            record(item[0], item[1], item[2] if len(item) > 2 else "SlideError")
    barrier()  # no process claims before the stale claims are gone
    claims = out_dir / CLAIMS_DIR
    claims.mkdir(exist_ok=True)

    counts = {"done": 0, "skipped": 0, "patches": 0}
    t_start = time.perf_counter()
    compute_s = 0.0
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="h5-writer")
    pending = None  # (spec, out_h5, n_patches, future) of the slide being written

    def write(out_h5, coords, feats, attrs, grid, path):
        write_features(out_h5, coords, feats, attrs)
        if qc:
            save_qc_image(out_dir / "qc" / f"{path.stem}.png", grid.tissue, grid.coords, grid.patch_size_level0,
                          title=_qc_title(path, grid))

    def finish_pending():
        nonlocal pending
        if pending is None:
            return
        spec, out_h5, n, future = pending
        pending = None
        try:
            future.result()
            counts["done"] += 1
            counts["patches"] += n
        except Exception as e:  # noqa: BLE001 - batch mode: record the slide, keep going
            tmp_path_for(out_h5).unlink(missing_ok=True)
            record(spec.path, e)

    def candidates():
        """(spec, out_h5, fingerprint) of the slides this process extracts, claimed one at a time."""
        for i, spec in enumerate(specs):
            bar.update(1)
            if world > 1 and not _claim(claims, i, rank):
                continue  # another process has it
            out_h5 = out_dir / f"{spec.path.stem}.h5"
            if duplicate[i]:
                record(spec.path, f"{spec.path}: another slide in the list has the same name; its features would "
                                  f"overwrite {out_h5.name}", "SlideError")
                continue
            try:
                fingerprint = slide_fingerprint(spec.path) if spec.path.is_file() else ""
            except OSError:
                fingerprint = ""  # unreadable: open_slide below says why
            if resume and fingerprint:
                attrs = read_attrs(out_h5) if out_h5.exists() else None
                want = {**reusable_if, "slide_fingerprint": fingerprint}
                if attrs is not None and all(_same(attrs.get(k), v) for k, v in want.items()):
                    counts["skipped"] += 1
                    continue
            yield spec, out_h5, fingerprint

    tile_kwargs = dict(patch_size=patch_size, target_mpp=target_mpp, overlap=overlap, min_tissue=min_tissue,
                       seg_params=seg_params or {}, mpp=mpp, reader=reader)
    if prefetch is None:
        prefetch = dev.type == "cuda"
    prep_pool = None
    if prefetch:
        # Segmentation + tiling of the next slide run in a separate process while this one is on the
        # GPU, so the GPU does not wait for them between slides (a process, not a thread: the reader
        # workers are forked from this one, which must not hold OpenCV or OpenSlide locks then).
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        prep_pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))

    try:
        bar = tqdm(total=len(specs), desc=f"slides[{rank}/{world}]" if world > 1 else "slides", unit="slide",
                   disable=quiet or rank != 0, dynamic_ncols=True)
        todo = candidates()
        ahead: list = []  # (spec, out_h5, fingerprint, future of its grid or None)

        def look_ahead():
            item = next(todo, None)
            if item is not None:
                future = prep_pool.submit(prepare_slide, item[0], **tile_kwargs) if prep_pool else None
                ahead.append((*item, future))

        look_ahead()
        while ahead:
            spec, out_h5, fingerprint, future = ahead.pop(0)
            look_ahead()
            try:
                t0 = time.perf_counter()
                grid = future.result() if future is not None else prepare_slide(spec, **tile_kwargs)
                with open_slide(spec.path, mpp_override=grid.mpp, reader=reader) as wsi:
                    coords, feats = extract_slide_features(
                        wsi, encoder, image_processor, coords=grid.coords, batch_size=batch_size,
                        num_workers=num_workers, precision=precision, device=dev, progress=not quiet and rank == 0,
                        patch_size=patch_size, target_mpp=target_mpp, pad_batches=compile)
                attrs = {**grid.attrs(), **ident, "feature_dim": int(feats.shape[1]), "slide": spec.path.name,
                         "slide_path": str(spec.path.resolve()), "precision": precision, "slide_fingerprint": fingerprint,
                         "slide_bytes": int(spec.path.stat().st_size)}
                compute_s += time.perf_counter() - t0
                finish_pending()  # at most one slide's features wait in memory
                pending = (spec, out_h5, len(coords),
                           writer.submit(write, out_h5, coords, feats, attrs, grid, spec.path))
            except Exception as e:  # batch mode: record the slide, keep going with the others
                tmp_path_for(out_h5).unlink(missing_ok=True)
                record(spec.path, e)
            bar.set_postfix(done=counts["done"], skipped=counts["skipped"], failed=len(failures))
        finish_pending()
        bar.close()
    finally:
        writer.shutdown(wait=True)
        if prep_pool is not None:
            prep_pool.shutdown(wait=True, cancel_futures=True)
        if dev.type == "cpu":
            torch.set_num_threads(prev_threads)

    elapsed = time.perf_counter() - t_start
    done, skipped, patches = counts["done"], counts["skipped"], counts["patches"]
    summary = {"rank": rank, "world_size": world, "slides": len(specs), "done": done, "skipped": skipped,
               "failed": len(failures), "patches": patches, "seconds": round(elapsed, 3),
               "extract_seconds": round(compute_s, 3)}
    summary_part = out_dir / f".summary.rank{rank}.json"
    summary_part.write_text(json.dumps(summary))
    barrier()
    if rank != 0:
        return {**summary, "patches_per_s": patches / compute_s if compute_s else 0.0, "failures": failures}
    _remove_claims(claims)
    return _merge_rank_outputs(out_dir, world, len(specs))


def _same(a, b) -> bool:
    if isinstance(b, float):
        try:
            return a is not None and abs(float(a) - b) <= 1e-9 * max(1.0, abs(b))
        except (TypeError, ValueError):
            return False
    return a == b


def _qc_title(path: Path, grid: TileGrid) -> str:
    return (f"{path.name}: {len(grid)} patches of {grid.patch_size}px at {grid.target_magnification:g}x "
            f"({grid.target_mpp:g} um/px), read at level {grid.plan.level}; tissue {grid.tissue.tissue_fraction:.0%}")


def _merge_rank_outputs(out_dir: Path, world: int, n_slides: int) -> dict:
    """Rank 0: one failures.csv (sorted by slide, so any process count gives the same file) and summary.json."""
    parts = [out_dir / (f".failures.rank{r}.csv" if world > 1 else ".failures.partial.csv") for r in range(world)]
    rows = []
    for p in parts:
        if p.exists():
            with open(p, newline="") as fh:
                rows.extend(csv.DictReader(fh))
    rows.sort(key=lambda r: r["slide"])
    tmp = out_dir / "failures.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, FAILURE_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out_dir / "failures.csv")
    for p in parts:
        p.unlink(missing_ok=True)
    totals = {"slides": n_slides, "done": 0, "skipped": 0, "patches": 0, "seconds": 0.0, "extract_seconds": 0.0}
    for r in range(world):
        p = out_dir / f".summary.rank{r}.json"
        if p.exists():
            s = json.loads(p.read_text())
            for k in ("done", "skipped", "patches"):
                totals[k] += s[k]
            totals["seconds"] = max(totals["seconds"], s["seconds"])
            totals["extract_seconds"] = max(totals["extract_seconds"], s["extract_seconds"])
            p.unlink()
    totals["failed"] = len(rows)
    totals["world_size"] = world
    totals["patches_per_s"] = round(totals["patches"] / totals["seconds"], 2) if totals["seconds"] else 0.0
    (out_dir / "summary.json").write_text(json.dumps(totals, indent=2) + "\n")
    totals["failures"] = rows
    return totals


__all__ = ["PatchTransform", "PatchDataset", "SlideSpec", "extract_slide_features", "extract_features",
           "encoder_identity", "check_writable_dir", "make_patch_loader", "resolve_device", "resolve_precision",
           "prepare_encoder", "enable_fused_attention", "slide_fingerprint", "default_num_workers",
           "PRECISIONS", "PRECISION_CHOICES"]
