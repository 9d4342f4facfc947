"""`mstar-hf demo`: trains and serves mSTAR end to end on a synthetic cohort (the README's main job)."""


def register(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="build a synthetic multimodal cohort, run Stage 1 + Stage 2, the report generator and the pipelines",
        description="The whole mSTAR paradigm in minutes on 2 CPU cores, on data it makes itself.",
    )
    parser.add_argument("--out", default="demo_out",
                        help="output folder (models, results.json, summary.md, plots); an interrupted demo in it resumes")
    parser.add_argument("--overwrite", action="store_true",
                        help="empty --out first when it holds something else (or a demo with other settings)")
    parser.add_argument("--types", type=int, default=3, help="cancer types")
    parser.add_argument("--cases", type=int, default=None, help="cases per type (default 24; --quick: 10; minimum 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the <= 3 minute variant")
    parser.add_argument("--control-shuffles", type=int, default=None, metavar="N",
                        help="shuffled-pairing control: Stage 1 retrained on N shuffles, the figure is their mean "
                             "(default 3; --quick: none; 0: no control). With 3 types one shuffle's zero-shot is "
                             "near 1, 1/3 or 0 by an arbitrary match of clusters to prompts: more shuffles, "
                             "a tighter control (~15 s each)")
    parser.add_argument("--slide", default=None, help="also run the pipelines on this real slide (e.g. CMU-1-Small-Region.svs)")
    parser.add_argument("--no-encoder-cache", action="store_true",
                        help="train the stand-in patch encoder even when this machine has it cached from an earlier "
                             "demo (default: copy it, the same weights; cache: $MSTAR_HF_CACHE, else "
                             "$HF_HOME/mstar_hf)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    from ..demo import DemoSettings, run_demo
    from ..demo_state import DemoFolderError

    if args.slide and not Path(args.slide).is_file():
        print(f"mstar-hf demo: error: --slide {args.slide}: no such file.", file=sys.stderr)
        return 2
    overrides = {"num_types": args.types, "seed": args.seed}
    if args.cases is not None:
        overrides["cases_per_type"] = args.cases
    if args.control_shuffles is not None:
        if args.control_shuffles < 0:
            print(f"mstar-hf demo: error: --control-shuffles {args.control_shuffles}: must be 0 or more.", file=sys.stderr)
            return 2
        overrides["shuffled_control"] = args.control_shuffles > 0
        if args.control_shuffles > 0:
            overrides["shuffled_control_repeats"] = args.control_shuffles
    try:
        settings = DemoSettings.quick(**overrides) if args.quick else DemoSettings(**overrides)
    except ValueError as error:  # e.g. too few cases per type for the splits
        print(f"mstar-hf demo: error: {error}", file=sys.stderr)
        return 2
    try:
        run_demo(args.out, settings, slide=args.slide, quiet=args.quiet, overwrite=args.overwrite,
                 encoder_cache=not args.no_encoder_cache)
    except DemoFolderError as error:
        print(f"mstar-hf demo: error: {error}", file=sys.stderr)
        return 2
    return 0
