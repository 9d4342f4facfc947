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
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FIRST_TYPE = 10  # pretraining types: indices the demo cohorts (at most 10 types) never use


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


__all__ = ["FIRST_TYPE", "painted_tiles", "pretrain_tissue_encoder"]
