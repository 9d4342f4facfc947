"""`mstar-hf make-cohort`: write a synthetic multimodal cohort (slides, reports, RNA, manifest)."""

from __future__ import annotations

import argparse
import sys


def _slide_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"slide size must look like 2048 or 2048x1536, got {text!r}") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 256:
        raise argparse.ArgumentTypeError(f"slide size must be HxW with both sides >= 256, got {text!r}")
    return size


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-cohort",
        help="write a synthetic multimodal cohort (slides, reports, RNA, manifest)",
        description="Write K cancer types x M cases: a pyramidal TIFF slide, a pathology report and an RNA "
                    "profile per case whose content depends only on the case's type, plus manifest.csv, "
                    "gene_vocab.json and cohort.json. Extract features afterwards with "
                    "`mstar-hf extract --slides OUT/slides --out OUT/features`.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--types", type=int, default=3, help="number of cancer types (1-10, default 3)")
    parser.add_argument("--cases", type=int, default=16, help="cases per type (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slide-size", type=_slide_size, default=None,
                        help="level-0 size HxW in pixels at --mpp (default 2048x2048)")
    parser.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of level 0 (default 0.5 = 20x)")
    parser.add_argument("--genes", type=int, default=256, help="gene vocabulary size (default 256)")
    parser.add_argument("--missing-report-frac", type=float, default=0.1)
    parser.add_argument("--missing-rna-frac", type=float, default=0.1)
    parser.add_argument("--painter", choices=("stain_pool", "type_colour"), default="stain_pool",
                        help="stain_pool (default): per-slide stain from one pool shared by all types, the type "
                             "only in the mix and layout of shared tissue patterns (must be learned); "
                             "type_colour: per-type colours that give the type away (easy fixtures)")
    parser.add_argument("--workers", type=int, default=None, help="slide-painting threads (default up to 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def run(args) -> int:
    from mstar_hf.data.synthetic_cohort import DEFAULT_SLIDE_SIZE, make_synthetic_cohort

    try:
        manifest = make_synthetic_cohort(
            args.out,
            num_types=args.types,
            cases_per_type=args.cases,
            seed=args.seed,
            slide_size=args.slide_size or DEFAULT_SLIDE_SIZE,
            mpp=args.mpp,
            num_genes=args.genes,
            missing_report_frac=args.missing_report_frac,
            missing_rna_frac=args.missing_rna_frac,
            num_workers=args.workers,
            painter=args.painter,
            quiet=args.quiet,
        )
    except (ValueError, OSError) as e:
        print(f"mstar-hf make-cohort: error: {e}", file=sys.stderr)
        return 1
    print(manifest)
    return 0
