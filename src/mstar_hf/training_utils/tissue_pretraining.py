"""A stand-in for UNI where no pretrained weights can be had: a small ViT pretrained to tell tissue patterns.

The paper's patch encoder starts from UNI, a ViT pretrained on other people's slides: it knows what
tissue looks like, not the cancer types of the cohort at hand, and it was trained on the stains of a few
labs. A randomly initialised ViT is a poor substitute: its class token hardly depends on the image (on
the demo's cohort its patch features have a mean pairwise cosine of about 0.97), so Stage 1's slide
embeddings collapse and nothing downstream can learn. This module makes a substitute with UNI's
relevant properties, on data the cohort does not contain:

* slides painted by `data.synthetic_tissue` for *other* cancer types (type indices from `first_type`
  on, which the cohorts never use), so the encoder learns the tissue patterns every type shares and
  nothing about which mix makes which of the cohort's types;
* stains from a narrow pool (`stain_spread` of the cohort's variation: "one lab"), so on the cohort's
  many stains its features still move with the stain, as a real encoder's do on another site's slides;
* target: each 256-px tile's share of every tissue pattern (soft cross-entropy).

Like UNI it is one fixed model whatever the cohort, so `cached_tissue_encoder` keeps it in a per-machine
cache (as the Hub client keeps a download): trained once, then copied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FIRST_TYPE = 10  # pretraining types: indices the demo cohorts (at most 10 types) never use
# where `cached_tissue_encoder` keeps encoders: this variable's folder ("off" disables the cache), else
# $HF_HOME/mstar_hf (~/.cache/huggingface/mstar_hf)
CACHE_ENV = "MSTAR_HF_CACHE"
_NEEDED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "pretraining.json")


def _paint_one(job: tuple) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from ..data.synthetic_tissue import PATTERNS, draw_stain, paint_tissue

    index, seed, slide_size, tile, stain_spread, type_index, min_tissue = job
    rng = np.random.default_rng([int(seed), 4201, int(index)])  # one stream per slide: any worker count
    image, _, pattern = paint_tissue(slide_size, slide_size, type_index, rng,
                                     stain=draw_stain(rng, spread=stain_spread), return_patterns=True)
    tiles, shares = [], []
    for y in range(0, slide_size - tile + 1, tile):
        for x in range(0, slide_size - tile + 1, tile):
            p = pattern[y:y + tile, x:x + tile]
            on = p >= 0
            if on.mean() < min_tissue:
                continue
            tiles.append(image[y:y + tile, x:x + tile].copy())
            shares.append(np.bincount(p[on], minlength=len(PATTERNS)) / on.sum())
    return tiles, shares


def painted_tiles(num_slides: int, seed: int = 0, slide_size: int = 1024, tile: int = 256,
                  stain_spread: float = 0.3, first_type: int = FIRST_TYPE, num_types: int = 20,
                  min_tissue: float = 0.5, num_workers: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Tiles (tile x tile x 3 uint8) of `num_slides` painted slides with at least `min_tissue` tissue, and
    their pattern shares `[n, len(PATTERNS)]` (rows sum to 1). Slides are painted by `num_workers` threads
    (default: up to 2; OpenCV and numpy release the GIL), each from its own random stream, so the tiles
    do not depend on the worker count."""
    jobs = [(i, seed, slide_size, tile, stain_spread, first_type + i % num_types, min_tissue)
            for i in range(int(num_slides))]
    workers = num_workers if num_workers is not None else min(2, os.cpu_count() or 1)
    tiles, shares = [], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for slide_tiles, slide_shares in pool.map(_paint_one, jobs):
            tiles += slide_tiles
            shares += slide_shares
    if not tiles:
        raise ValueError(f"no tile of {num_slides} painted slides has {min_tissue:.0%} tissue.")
    return tiles, np.stack(shares).astype(np.float32)


def pretrain_tissue_encoder(output_dir, size: str = "tiny", num_slides: int = 80, steps: int = 300,
                            batch_size: int = 32, learning_rate: float = 1e-3, stain_spread: float = 0.3,
                            seed: int = 0, quiet: bool = False, warmup_fraction: float = 0.1) -> dict:
    """Pretrains an `MStarPatchModel` of preset `size` on painted tiles (see the module docstring) and saves
    it with its image processor into `output_dir`. Returns (and writes `pretraining.json`) the figures."""
    from tqdm.auto import tqdm

    from ..data.synthetic_tissue import PATTERNS
    from ..modeling import MStarImageProcessor, MStarPatchModel
    from ..presets import patch_config

    t0 = time.perf_counter()
    tiles, shares = painted_tiles(num_slides, seed=seed, stain_spread=stain_spread)
    processor = MStarImageProcessor()
    pixels = torch.cat([processor(images=tiles[i:i + 64], return_tensors="pt")["pixel_values"]
                        for i in range(0, len(tiles), 64)])
    targets = torch.from_numpy(shares)
    torch.manual_seed(seed)
    model = MStarPatchModel(patch_config(size)).train()
    head = torch.nn.Linear(model.config.hidden_size, len(PATTERNS))
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.05)
    # linear warm-up, then cosine: without the warm-up a ViT at this rate converged on some seeds and not
    # others (the demo's seed 1 ended at loss 1.08 where seed 0 reached 0.88)
    warmup = int(round(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(int(steps)), desc="tissue-pattern pretraining", unit="step", disable=quiet):
        idx = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        flip, turns = torch.randint(0, 4, (2,), generator=generator).tolist()
        x = pixels[idx].flip(-1) if flip % 2 else pixels[idx]
        x = torch.rot90(x, turns, dims=(-2, -1))  # tissue has no orientation
        logits = head(model(pixel_values=x).pooler_output)
        loss = -(targets[idx] * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    # the entropy of the soft targets is the lowest reachable loss: print both
    entropy = float(-(targets * targets.clamp(min=1e-12).log()).sum(-1).mean())
    k = max(1, min(20, len(losses) // 5))
    record = {"tiles": len(tiles), "slides": int(num_slides), "steps": int(steps), "warmup_steps": warmup,
              "stain_spread": stain_spread,
              "first_loss": float(np.mean(losses[:k])) if losses else None,
              "last_loss": float(np.mean(losses[-k:])) if losses else None,
              "target_entropy": entropy, "seconds": round(time.perf_counter() - t0, 1)}
    (output_dir / "pretraining.json").write_text(json.dumps(record, indent=2))
    return record


def default_cache_dir() -> Path | None:
    """`$MSTAR_HF_CACHE` (None when it says off / 0 / none / false / nothing), else `$HF_HOME/mstar_hf`."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none", "false") else Path(value).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "mstar_hf"


def pretraining_key(**settings) -> str:
    """What the trained weights depend on: the settings, the code that paints the tiles and builds and
    trains the model, the library versions and the thread count (CPU kernels reduce in a thread-dependent
    order). A change to any of them is a new key, so a stale encoder is never reused."""
    import timm

    package = Path(__file__).resolve().parents[1]
    sources = [Path(__file__).resolve(), package / "data" / "synthetic_tissue.py", package / "presets.py",
               *sorted((package / "modeling").glob("*.py"))]
    digest = hashlib.sha256(json.dumps({**settings, "torch": torch.__version__, "timm": timm.__version__,
                                        "numpy": np.__version__, "threads": torch.get_num_threads()},
                                       sort_keys=True).encode())
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:20]


def cached_tissue_encoder(output_dir, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                          quiet: bool = False, **settings) -> dict:
    """`pretrain_tissue_encoder(output_dir, **settings)` through a per-machine cache (`cache_dir`, default
    `default_cache_dir()`): the first call trains and stores the encoder under its `pretraining_key`, later
    ones copy it, the same weights to the bit. The returned record (and `pretraining.json`) says which
    happened (`cache`: "hit", "stored" or "off"). A damaged cache entry is trained again."""
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(pretrain_tissue_encoder).parameters.items()
                if p.default is not inspect.Parameter.empty and name != "quiet"}
    unknown = set(settings) - set(defaults)
    if unknown:
        raise TypeError(f"cached_tissue_encoder: unknown pretraining settings {sorted(unknown)}")
    settings = {**defaults, **settings}
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) if use_cache else None
    output_dir = Path(output_dir)
    if root is None:
        return _with_cache_note(output_dir, pretrain_tissue_encoder(output_dir, quiet=quiet, **settings), "off", None)
    key = pretraining_key(**settings)
    entry = root / "tissue_encoder" / key
    if entry.is_dir():
        try:
            record = json.loads((entry / "pretraining.json").read_text())
            missing = [name for name in _NEEDED_FILES if not (entry / name).is_file()]
            if missing:
                raise OSError(f"missing {', '.join(missing)}")
            shutil.copytree(entry, output_dir, dirs_exist_ok=True)
            return _with_cache_note(output_dir, record, "hit", entry)
        except (OSError, ValueError) as err:
            logger.warning("the cached tissue encoder %s is damaged (%s): training it again", entry, err)
            shutil.rmtree(entry, ignore_errors=True)
    record = pretrain_tissue_encoder(output_dir, quiet=quiet, **settings)
    # stored under a private name, then renamed: a concurrent run never reads a half-written entry
    staging = root / "tissue_encoder" / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(output_dir, staging)
        os.rename(staging, entry)
        note = "stored"
    except OSError as err:  # another run stored it first, or the cache is not writable: the model is trained
        shutil.rmtree(staging, ignore_errors=True)
        note = "stored" if entry.is_dir() else "off"
        if note == "off":
            logger.warning("the tissue encoder could not be cached in %s (%s): later runs train it again (set %s "
                           "to a writable folder)", entry, err, CACHE_ENV)
    return _with_cache_note(output_dir, record, note, entry if note == "stored" else None)


def _with_cache_note(output_dir: Path, record: dict, note: str, entry: Path | None) -> dict:
    record = {**record, "cache": note, "cache_entry": None if entry is None else str(entry)}
    (output_dir / "pretraining.json").write_text(json.dumps(record, indent=2))
    return record


__all__ = ["CACHE_ENV", "FIRST_TYPE", "cached_tissue_encoder", "default_cache_dir", "painted_tiles",
           "pretrain_tissue_encoder", "pretraining_key"]
