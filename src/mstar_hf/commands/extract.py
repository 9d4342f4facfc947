"""`mstar-hf extract`: whole slides -> one patch-feature h5 per slide (plus QC pictures).

Heavy imports (torch, OpenSlide, transformers) happen inside `run`, so `mstar-hf --help` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

DESCRIPTION = """\
Segment tissue, tile it into patches at a target magnification and write the patch encoder's
features to OUT/<slide>.h5 (datasets coords, features; TRIDENT/CLAM layout), a QC picture to
OUT/qc/<slide>.png, failed slides with their reason to OUT/failures.csv and totals to
OUT/summary.json. Finished slides are skipped on re-run unless the slide file changed. Several
processes (one per GPU, on one or many nodes) each claim the next unclaimed slide, so a slow slide
never idles the others:
  accelerate launch --num_processes 8 -m mstar_hf.cli extract ...
  torchrun --nproc_per_node 2 -m mstar_hf.cli extract ...
On a GPU: bf16 autocast, fused attention and channels_last by default; --compile for torch.compile;
cuCIM decodes tiles when installed (--reader). A slide whose resolution metadata are implausible
(e.g. a 72 dpi TIFF) fails with a message asking for --mpp.
"""


def register(subparsers):
    p = subparsers.add_parser("extract", help="extract patch features from whole-slide images to h5",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", required=True, nargs="+", metavar="DIR|CSV|FILE",
                   help="a folder of slides, a CSV with a 'slide' (or 'path') column and optional 'mpp' column "
                        "(relative paths are relative to the CSV's folder), or slide files")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--model", required=True, metavar="PATH",
                   help="patch encoder folder (save_pretrained of MStarPatchModel with its image processor) or hub id")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--magnification", type=float, default=20.0, help="target magnification (default 20 = 0.5 um/px)")
    g.add_argument("--target-mpp", type=float, default=None, help="target microns per pixel (instead of --magnification)")
    p.add_argument("--patch-size", type=int, default=256, help="patch side in pixels at the target resolution")
    p.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbouring patches")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a kept patch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=None,
                   help="reader processes per extraction process (default: its share of the cores - 1, at most 8 "
                        "on CPU and 32 on a GPU, which needs ~1 reader core per 500-1000 patches/s)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="CPU compute threads (default on CPU: cores minus reader workers)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast precision (default auto: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder (GPU: worth it for many slides; the first batch compiles)")
    p.add_argument("--reader", choices=["openslide", "cucim", "auto"], default="auto",
                   help="tile decoder: cuCIM (faster, TIFF/SVS, if installed) or OpenSlide (default auto: cuCIM "
                        "when installed and able to read the file)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--mpp", type=float, default=None,
                   help="level-0 microns per pixel of every slide, overriding the metadata (needed when they have "
                        "none or an implausible one, e.g. a plain TIFF's 72 dpi); a CSV 'mpp' column sets it per slide")
    p.add_argument("--seg-mpp", type=float, default=4.0, help="resolution of tissue segmentation (um/px)")
    p.add_argument("--seg-min-saturation", type=float, default=15.0, help="floor of the Otsu saturation threshold")
    p.add_argument("--recursive", action="store_true", help="look for slides in sub-folders too")
    p.add_argument("--no-qc", dest="qc", action="store_false", help="do not write QC pictures")
    p.add_argument("--overwrite", dest="resume", action="store_false", help="re-extract slides already done")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


class SlideListError(Exception):
    """The --slides argument cannot be read at all (the run stops before starting)."""


def collect_slides(inputs, recursive: bool = False):
    """Resolve --slides into (specs, problems): specs are SlideSpec, problems (path, reason, error type).

    A missing or unreadable top-level input raises SlideListError; an unreadable sub-folder found
    while scanning becomes a problem, recorded in failures.csv, and the scan continues.
    """
    from mstar_hf.wsi.extraction import SlideSpec
    from mstar_hf.wsi.slide import is_slide_file

    specs, problems = [], []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise SlideListError(f"{path}: no such file or directory")
        if path.is_dir():
            try:
                found = _scan_dir(path, recursive, problems)
            except PermissionError as e:
                raise SlideListError(f"{path}: cannot read slide directory ({e.strerror or e})") from None
            if not found and not problems:
                raise SlideListError(f"{path}: no slide files found (extensions: .svs .tif .tiff .ndpi .mrxs ...)")
            specs.extend(SlideSpec(p) for p in found if is_slide_file(p))
        elif path.suffix.lower() == ".csv":
            specs.extend(_read_csv(path))
        else:
            specs.append(SlideSpec(path))
    return specs, problems


def _scan_dir(folder: Path, recursive: bool, problems: list) -> list[Path]:
    from mstar_hf.wsi.slide import is_slide_file

    found = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        p = Path(entry.path)
        if entry.is_dir():
            if recursive:
                try:
                    found.extend(_scan_dir(p, True, problems))
                except PermissionError as e:
                    problems.append((p, f"{p}: cannot read directory ({e.strerror or e})", "PermissionError"))
        elif is_slide_file(p):
            found.append(p)
    return found


def _read_csv(path: Path):
    from mstar_hf.wsi.extraction import SlideSpec

    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SlideListError(f"{path}: cannot read slide list ({e})") from None
    if not rows:
        raise SlideListError(f"{path}: slide list is empty")
    column = next((c for c in ("slide", "slide_path", "path", "wsi") if c in rows[0]), None)
    if column is None:
        raise SlideListError(f"{path}: slide list needs a 'slide' (or 'slide_path', 'path') column, "
                             f"found {list(rows[0])}")
    specs = []
    for i, row in enumerate(rows, start=2):
        slide = Path(row[column])
        if not slide.is_absolute():
            slide = path.parent / slide
        mpp = (row.get("mpp") or "").strip()
        try:
            specs.append(SlideSpec(slide, float(mpp) if mpp else None))
        except ValueError:
            raise SlideListError(f"{path}: line {i}: mpp {mpp!r} is not a number") from None
    return specs


def load_patch_encoder(model_path):
    """(model, image_processor) from a save_pretrained folder or hub id."""
    try:
        from mstar_hf import MStarImageProcessor, MStarPatchModel
    except ImportError:  # package __init__ without the re-exports
        from mstar_hf.modeling.image_processing_mstar import MStarImageProcessor
        from mstar_hf.modeling.modeling_mstar_patch import MStarPatchModel

    model = MStarPatchModel.from_pretrained(model_path)
    if Path(model_path).is_dir() and not (Path(model_path) / "preprocessor_config.json").exists():
        print(f"extract: {model_path} has no preprocessor_config.json; using MStarImageProcessor defaults",
              file=sys.stderr)
        processor = MStarImageProcessor()
    else:
        processor = MStarImageProcessor.from_pretrained(model_path)
    return model, processor


def run(args) -> int:
    from mstar_hf.wsi.extraction import check_writable_dir, extract_features
    from mstar_hf.wsi.slide import magnification_to_mpp

    try:
        specs, problems = collect_slides(args.slides, args.recursive)
    except SlideListError as e:
        print(f"extract: error: {e}", file=sys.stderr)
        return 2
    try:
        check_writable_dir(args.out)
    except OSError as e:
        print(f"extract: error: {e}", file=sys.stderr)
        return 2
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        model, processor = load_patch_encoder(args.model)
    except (OSError, ValueError) as e:
        print(f"extract: error: cannot load the patch encoder from {args.model}: {e}", file=sys.stderr)
        return 2

    # None: each process of a launch takes its share of the cores (extraction.default_num_workers)
    num_workers = args.num_workers
    target_mpp = args.target_mpp if args.target_mpp else magnification_to_mpp(args.magnification)
    summary = extract_features(
        specs, args.out, model, processor,
        patch_size=args.patch_size, target_mpp=target_mpp, overlap=args.overlap, min_tissue=args.min_tissue,
        batch_size=args.batch_size, num_workers=num_workers, precision=args.precision, device=args.device,
        mpp=args.mpp, resume=args.resume, qc=args.qc, quiet=args.quiet,
        seg_params={"seg_mpp": args.seg_mpp, "min_saturation": args.seg_min_saturation},
        num_threads=args.num_threads, extra_failures=problems, compile=args.compile, reader=args.reader,
    )
    if summary.get("rank", 0) != 0:
        return 0
    print(f"extract: {summary['slides']} slides: {summary['done']} done, {summary['skipped']} skipped, "
          f"{summary['failed']} failed; {summary['patches']} patches in {summary['seconds']:.1f} s "
          f"({summary['patches_per_s']:.1f} patches/s) -> {args.out}")
    if summary["failed"]:
        for row in summary["failures"]:
            print(f"  failed: {row['reason']}", file=sys.stderr)
        print(f"extract: failures listed in {Path(args.out) / 'failures.csv'}", file=sys.stderr)
        return 1
    return 0
