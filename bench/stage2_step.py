#!/usr/bin/env python
"""Bench: the cost of a full Stage 2 optimizer step relative to the bare student step.

In one run, on the same batch size of the same tiles, times

* bare: the student (patch encoder + projection) forward, a regression loss, backward, clipping and the
  optimizer step, on a batch already in memory;
* full: what `training/stage2.py` does per step: the next batch from the DataLoader (tiles read from
  real pyramidal TIFF slides by worker processes, resized, augmented, normalised), the EMA forward,
  the memory update, the frozen aggregator re-embedding each sampled slide from its memory (up to
  `--context_size` rows), the student forward / losses / backward / optimizer step, the EMA update.

Steps are interleaved (bare, full, bare, full, ...) and the medians compared, so load from other
processes hits both alike. Goal: full / bare <= 1.45 (the EMA forward alone is about a third of a
forward+backward). Also prints the memory bank's size per 10k patches.

    python bench/stage2_step.py                # small ViT, 2 slides x 32 patches per step
    python bench/stage2_step.py --size tiny --steps 6 --workdir /tmp/stage2_bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GOAL = 1.45


def build_data(workdir: Path, width: int, stride: int, seed: int) -> Path:
    """Synthetic cohort slides + feature files with many (overlapping) patches per slide."""
    import pandas as pd

    from mstar_hf.data import make_synthetic_cohort
    from mstar_hf.wsi.features import write_features
    from mstar_hf.wsi.slide import open_slide

    manifest = workdir / "cohort" / "manifest.csv"
    if not manifest.is_file():
        make_synthetic_cohort(workdir / "cohort", num_types=2, cases_per_type=2, slide_size=(2048, 2048), num_genes=16,
                              seed=seed)
    frame = pd.read_csv(manifest)
    rng = np.random.default_rng(seed)
    feats_dir = workdir / f"features_{width}"
    feats_dir.mkdir(exist_ok=True)
    frame["features_path"] = [str(feats_dir / f"{s}.h5") for s in frame.slide_id]
    frame["split"] = "train"
    for slide, out in zip(frame.slide_path, frame.features_path):
        if Path(out).is_file():
            continue
        with open_slide(manifest.parent / slide) as wsi:
            w, h = wsi.dimensions
            xs, ys = np.meshgrid(np.arange(0, w - 256, stride), np.arange(0, h - 256, stride))
            coords = np.stack([xs.ravel(), ys.ravel()], 1)
            attrs = {"patch_size": 256, "patch_size_level0": 256, "target_mpp": 0.5, "target_magnification": 20.0,
                     "mpp": wsi.mpp, "level0_width": w, "level0_height": h}
        write_features(out, coords, rng.standard_normal((len(coords), width)).astype(np.float32), attrs)
    frame["slide_path"] = [str(manifest.parent / s) for s in frame.slide_path]
    bench_manifest = workdir / f"manifest_{width}.csv"
    frame.to_csv(bench_manifest, index=False)
    return bench_manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"], help="preset of the ViT/aggregator")
    parser.add_argument("--slides_per_step", type=int, default=2)
    parser.add_argument("--patches_per_slide", type=int, default=32)
    parser.add_argument("--context_size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each kind (after 2 warm-up steps)")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--stride", type=int, default=24, help="level-0 px between patch coords (more = fewer rows)")
    parser.add_argument("--no_augment", action="store_true")
    parser.add_argument("--workdir", default=None, help="keep the synthetic data here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from mstar_hf.modeling import MStarImageProcessor, MStarPatchModel, MStarSlideAggregator
    from mstar_hf.presets import WIDTH, aggregator_config, patch_config
    from mstar_hf.training_utils.augment import HEAugment
    from mstar_hf.training_utils.ema import EMAModel
    from mstar_hf.training_utils.memory_bank import PatchMemoryBank, bytes_per_patch
    from mstar_hf.training_utils.stage2 import MemoryTeacher, Stage2Student, distillation_loss, stage2_forward
    from mstar_hf.training_utils.stage2_data import Stage2StepDataset, make_loader, prepare_slides
    from mstar_hf.wsi.extraction import PatchTransform

    torch.manual_seed(args.seed)
    width = WIDTH[args.size]
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="stage2_bench_")
        workdir = Path(tmp.name)
    t0 = time.perf_counter()
    manifest = build_data(workdir, width, args.stride, args.seed)
    import pandas as pd

    records = pd.read_csv(manifest).to_dict("records")
    usable, failures = prepare_slides(records, width)
    if failures:
        raise SystemExit(f"bench data broken: {failures}")
    bank = PatchMemoryBank.build(workdir / f"memory_{width}", usable)
    print(f"data: {len(bank)} slides, {bank.num_rows} patches in the memory bank ({time.perf_counter() - t0:.1f}s)")

    patch_model = MStarPatchModel(patch_config(args.size))
    aggregator = MStarSlideAggregator(aggregator_config(args.size))
    student = Stage2Student(patch_model, torch.nn.Linear(width, aggregator.config.hidden_size)).train()
    ema = EMAModel(patch_model, 0.996)
    teacher = MemoryTeacher(aggregator, bank, args.context_size, args.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    transform = PatchTransform(MStarImageProcessor())
    steps = 2 + args.steps
    dataset = Stage2StepDataset(bank.folder, bank.slides, list(range(len(bank))), args.slides_per_step,
                                args.patches_per_slide, num_items=2 * steps + 8, transform=transform, normalize=True,
                                augment=None if args.no_augment else HEAugment(), seed=args.seed)
    loader = iter(make_loader(dataset, args.num_workers, pin_memory=False))
    fixed = next(loader)
    n_images = len(fixed["pixel_values"])
    fixed_target = torch.randn(n_images, aggregator.config.hidden_size)

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def bare_step():
        _, projected = student(fixed["pixel_values"])
        distillation_loss(projected, fixed_target).backward()
        optimizer_step()

    def full_step():
        batch = next(loader)
        out = stage2_forward(student, ema, teacher, batch, "cosine", 0.6)
        out.loss.backward()
        optimizer_step()
        ema.update(student.patch_model)

    bare_times, full_times = [], []
    for i in range(steps):
        for fn, times in ((bare_step, bare_times), (full_step, full_times)):
            start = time.perf_counter()
            fn()
            if i >= 2:
                times.append(time.perf_counter() - start)
    bare, full = statistics.median(bare_times), statistics.median(full_times)

    # Where the extra time goes (the same calls as `stage2_forward`, timed one by one; indicative only).
    from mstar_hf.training_utils.stage2 import consistency_loss, ema_features_to_memory

    parts = {"batch wait": [], "EMA fwd + memory write": [], "teacher re-embed": [], "student fwd+bwd+opt": [],
             "EMA update": []}
    for _ in range(min(3, args.steps)):
        marks = [time.perf_counter()]
        batch = next(loader)
        marks.append(time.perf_counter())
        ema_features = ema_features_to_memory(ema, bank, batch["pixel_values"], batch["slide"], batch["row"])
        marks.append(time.perf_counter())
        targets = teacher.targets(batch["slide"], batch["row"], int(batch["step"]), "cpu")
        marks.append(time.perf_counter())
        features, projected = student(batch["pixel_values"])
        (distillation_loss(projected, targets) + 0.6 * consistency_loss(features, ema_features)).backward()
        optimizer_step()
        marks.append(time.perf_counter())
        ema.update(student.patch_model)
        marks.append(time.perf_counter())
        for key, a, b in zip(parts, marks, marks[1:]):
            parts[key].append(b - a)
    ratio = full / bare
    per10k = bytes_per_patch(bank.dim, bank.dtype) * 10_000 / 2**20
    measured = bank.nbytes / bank.num_rows * 10_000 / 2**20
    print(f"config: {args.size} ViT ({sum(p.numel() for p in patch_model.parameters()) / 1e6:.1f}M params, "
          f"{width}-d), {args.slides_per_step} slides x {args.patches_per_slide} patches = {n_images} images/step, "
          f"context {args.context_size} rows, {args.num_workers} reader workers, torch threads {torch.get_num_threads()}")
    print(f"bare student step (fwd+bwd+opt): median {bare * 1e3:.1f} ms over {len(bare_times)} steps")
    print(f"full Stage 2 step:               median {full * 1e3:.1f} ms over {len(full_times)} steps")
    print("breakdown of a full step (medians): " + ", ".join(
        f"{k} {statistics.median(v) * 1e3:.0f} ms ({statistics.median(v) / bare:.2f} x bare)" for k, v in parts.items()))
    print(f"ratio full / bare: {ratio:.3f}  (goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'})")
    print(f"memory bank: {per10k:.2f} MiB per 10k patches at {bank.dim}-d {bank.dtype} (measured {measured:.2f}); "
          f"ViT-L 1024-d: {bytes_per_patch(1024, 'float32') * 10_000 / 2**20:.1f} MiB float32, "
          f"{bytes_per_patch(1024, 'float16') * 10_000 / 2**20:.1f} MiB float16 per 10k patches (on disk, memory-mapped)")
    if tmp is not None:
        del loader
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
