"""One-shot device check (run through bench/device_check.sh): one line per figure, all from this run.

  1. bare ViT-L/16 forward (bf16 autocast on a GPU, fused attention, channels_last; --compile adds
     torch.compile): patches/s and its fraction of the dense bf16 FLOP bound of the device;
  2. the extraction pipeline (`extract_slide_features`: reader workers, pinned uint8 batches, device
     normalisation) on a synthetic pyramidal TIFF with >= 40k tissue patches: patches/s, ratio to (1);
  3. the slide aggregator (TransMIL, 1024 -> 512) at 100k and 200k patches: latency and peak memory
     (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS above its size before);
  4. Stage 2 steps/s with ViT-L (bench/stage2_step.py's full step: readers, EMA forward, teacher
     re-embedding, student forward/backward/optimizer step, EMA update).

`--smoke` runs every figure in tiny form on CPU (tiny ViT, a ~200-patch slide, 2k/4k-patch bags, a
one-step Stage 2) so CI proves the script works; its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by device name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "B200": 2250.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny, on CPU, for CI")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (adds ~1 min of compilation)")
    p.add_argument("--patches", type=int, default=None, help="tissue patches of the synthetic slide (default 40000)")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on a GPU, 16 in --smoke")
    p.add_argument("--agg-sizes", type=int, nargs="+", default=None, help="default 100000 200000")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: by name)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the synthetic slide here (default: temporary)")
    p.add_argument("--skip", nargs="*", default=[], choices=["forward", "extract", "aggregator", "stage2"])
    return p.parse_args(argv)


def say(name: str, text: str):
    print(f"{name}: {text}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vit_flops_per_patch(backbone, img: int = 224) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): patch embedding + per block 24 T D^2 + 4 T^2 D (MLP ratio 4)."""
    d = backbone.embed_dim
    patch = backbone.patch_embed.patch_size[0]
    n = (img // patch) ** 2
    t = n + backbone.num_prefix_tokens
    hidden = backbone.blocks[0].mlp.fc1.out_features
    per_block = 2 * t * (4 * d * d + 2 * d * hidden) + 4 * t * t * d
    return float(2 * n * 3 * patch * patch * d + len(backbone.blocks) * per_block)


def peak_tflops(device, override):
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def write_tiled_slide(path: Path, tissue_tiles: int, mpp: float = 0.5, tile: int = 256, seed: int = 0) -> Path:
    """A pyramidal TIFF with about `tissue_tiles` 256-px tissue tiles in a centred square, white around it.

    Tiles come from a pool painted once and are streamed to tifffile, so a 40k-patch slide (55k px a
    side) never exists in memory.
    """
    import tifffile

    from mstar_hf.wsi.synthetic import _ensure_jpeg_codec, make_tissue_image

    _ensure_jpeg_codec()
    # the tissue square and its margin are whole tiles of level 3 (8x), the level segmentation reads at
    # 0.5 um/px, so every level-0 tissue tile is tissue there too; border tiles may still fall under
    # the tissue threshold, hence the spare 20%
    q = 8
    side_t = q * math.ceil(math.sqrt(tissue_tiles * 1.2) / q)
    margin = q * max(1, math.ceil(side_t / 8 / q))
    grid = side_t + 2 * margin
    pool_img = make_tissue_image(8 * tile, 8 * tile, seed, tissue_fraction=1.0)
    pool = [np.ascontiguousarray(pool_img[y:y + tile, x:x + tile]) for y in range(0, 8 * tile, tile)
            for x in range(0, 8 * tile, tile)]
    white = np.full((tile, tile, 3), 242, np.uint8)
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        level, g = 0, grid
        while True:
            scale = 2 ** level
            lo, hi = margin / scale, (margin + side_t) / scale

            def tiles(g=g, lo=lo, hi=hi):
                for ty in range(g):
                    for tx in range(g):
                        inside = lo <= tx < hi and lo <= ty < hi
                        yield pool[rng.integers(len(pool))] if inside else white

            res = 1e4 / (mpp * scale)
            tw.write(tiles(), shape=(g * tile, g * tile, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 85}, subfiletype=0 if level == 0 else 1,
                     resolution=(res, res), resolutionunit="CENTIMETER", metadata=None,
                     maxworkers=os.cpu_count())
            if g <= 4:
                break
            level, g = level + 1, math.ceil(g / 2)
    return path


def bench_forward(model, device, batch, iters, precision, compile_):
    from mstar_hf.wsi.extraction import _autocast, prepare_encoder

    encoder = prepare_encoder(model, device, compile=compile_)
    x = torch.randn(batch, 3, 224, 224, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), _autocast(device, precision):
        for _ in range(3):  # warm-up (and compilation)
            encoder(pixel_values=x)
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            encoder(pixel_values=x)
        sync(device)
    return encoder, batch * iters / (time.perf_counter() - t)


def bench_aggregator(n: int, device, smoke: bool) -> tuple[float, float]:
    from mstar_hf import MStarSlideAggregator
    from mstar_hf.presets import aggregator_config

    torch.manual_seed(0)
    config = aggregator_config("tiny" if smoke else "base")
    model = MStarSlideAggregator(config).to(device).eval()
    x = torch.randn(1, n, config.input_dim, device=device)
    with torch.inference_mode():
        model(x[:, :512])
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t = time.perf_counter()
        model(x)
        sync(device)
        seconds = time.perf_counter() - t
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak, GiB (CPU: upper bound)
    return seconds, peak


def main(argv=None) -> int:
    args = parse_args(argv)
    from mstar_hf import MStarImageProcessor, MStarPatchModel
    from mstar_hf.presets import patch_config
    from mstar_hf.wsi.extraction import default_num_workers, extract_slide_features, resolve_precision
    from mstar_hf.wsi.slide import cucim_available, open_slide
    from mstar_hf.wsi.tiling import tile_slide

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    precision = resolve_precision("auto", device)
    batch = args.batch_size or (16 if args.smoke else 256)
    cores = os.cpu_count() or 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cores} cores)"
    say("device", f"{name}; torch {torch.__version__}; precision {precision}; compile {args.compile}; "
                  f"cuCIM {'yes' if cucim_available() else 'no'}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    t_all = time.perf_counter()

    torch.manual_seed(0)
    model = MStarPatchModel(patch_config("tiny" if args.smoke else "base")).eval()
    flops = vit_flops_per_patch(model.backbone)
    encoder, bare = None, None
    if "forward" not in args.skip or "extract" not in args.skip:
        encoder, bare = bench_forward(model, device, batch, 3 if args.smoke else 20, precision, args.compile)
        peak = peak_tflops(device, args.peak_tflops)
        bound = f"{bare * flops / (peak * 1e12):.1%} of the {peak:g} TFLOP/s bf16 bound ({peak * 1e12 / flops:.0f} patches/s)" \
            if peak else "no FLOP bound known for this device (--peak-tflops)"
        arch = "tiny ViT" if args.smoke else "ViT-L/16"
        say("forward", f"bare {arch} {precision} forward: {bare:.1f} patches/s at batch {batch} "
                       f"({flops / 1e9:.1f} GFLOP/patch); {bound}")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        if "extract" not in args.skip:
            n_target = args.patches or (200 if args.smoke else 40_000)
            slide = work / f"device_check_{n_target}.tif"
            t = time.perf_counter()
            if not slide.exists():
                write_tiled_slide(slide, n_target)
            t_write = time.perf_counter() - t
            workers = default_num_workers(device)
            with open_slide(slide, reader="auto") as wsi:
                t = time.perf_counter()
                grid = tile_slide(wsi, patch_size=256, target_mpp=0.5)
                t_tile = time.perf_counter() - t
                if len(grid) < n_target:
                    say("extract", f"WARNING: only {len(grid)} tissue patches (wanted {n_target})")
                t = time.perf_counter()
                _, feats = extract_slide_features(wsi, encoder, MStarImageProcessor(), coords=grid.coords,
                                                  batch_size=batch, num_workers=workers, precision=precision,
                                                  device=device, progress=False, pad_batches=args.compile)
                sync(device)
                t_ext = time.perf_counter() - t
            rate = len(feats) / t_ext
            say("extract", f"pipeline {rate:.1f} patches/s on {len(feats)} patches, {rate / bare:.2f} x bare "
                           f"({workers} reader workers, reader {wsi.reader}; slide written in {t_write:.0f} s, "
                           f"segmented + tiled in {t_tile:.1f} s, not counted)")

    if "aggregator" not in args.skip:
        for n in args.agg_sizes or ([2000, 4000] if args.smoke else [100_000, 200_000]):
            seconds, peak = bench_aggregator(n, device, args.smoke)
            what = "peak GPU memory" if device.type == "cuda" else "process peak RSS"
            say(f"aggregator_{n}", f"{n} patches: {seconds * 1e3:.1f} ms, {what} {peak:.2f} GiB (fp32)")

    if "stage2" not in args.skip:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import stage2_step

        with tempfile.TemporaryDirectory() as s2dir:
            argv2 = (["--size", "tiny", "--steps", "1", "--patches_per_slide", "4", "--slides_per_step", "1",
                      "--context_size", "64", "--num_workers", "0", "--no_augment"] if args.smoke else
                     ["--size", "base", "--steps", "4", "--patches_per_slide", "32", "--slides_per_step", "2",
                      "--context_size", "4096", "--num_workers", str(max(1, min(8, cores - 1)))])
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                stage2_step.main([*argv2, "--workdir", s2dir])
        text = buf.getvalue()
        full = re.search(r"full Stage 2 step \(--no_grad_precision auto[^)]*\): best ([\d.]+) ms", text)
        bare_s2 = re.search(r"bare student step \(fwd\+bwd\+opt\): best ([\d.]+) ms", text)
        images = re.search(r"= (\d+) images/step", text)
        if full and images:
            ms = float(full.group(1))
            say("stage2", f"{'tiny ViT' if args.smoke else 'ViT-L'} Stage 2 full step {1000 / ms:.2f} steps/s "
                          f"({int(images.group(1)) * 1000 / ms:.1f} images/s; bare student step "
                          f"{float(bare_s2.group(1)):.1f} ms)")
        else:
            say("stage2", "could not read bench/stage2_step.py's output:\n" + text)
            return 1
    say("total", f"{time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
