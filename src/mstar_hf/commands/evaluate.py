"""`mstar-hf evaluate`: downstream evaluation of patch features on a labelled cohort, several feature
folders side by side (MIL classification / survival, linear probe, few-shot)."""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate patch features on a labelled cohort (MIL heads, survival, linear probe, few-shot)",
        description="Train and test slide-level heads on the patch features of a cohort manifest with k-fold "
                    "cross-validation (or the manifest's train/val/test split, checked so that no case (patient) is on "
                    "two sides), and report per-case metrics: the mean +- std over folds, or a fixed test split's "
                    "value with its 1,000-sample case-bootstrap 95% CI, beside the pooled out-of-fold figure. Give "
                    "several --features folders (same file names, e.g. two encoders) to compare them on the same "
                    "slides and folds, with paired case-bootstrap p-values against the first. "
                    "Writes OUT/results.json, OUT/predictions_<name>.csv and plots (ROC, Kaplan-Meier, few-shot "
                    "curve, attention heatmaps).",
    )
    parser.add_argument("--manifest", required=True, help="cohort manifest (CSV/TSV/Parquet, see mstar_hf.data)")
    parser.add_argument("--features", nargs="+", metavar="DIR",
                        help="feature folder(s); each replaces the folder of the manifest's features_path (same file "
                             "names). Default: features_path as written in the manifest")
    parser.add_argument("--names", nargs="+", help="display names of the feature folders (default: folder names)")
    parser.add_argument("--task", required=True, choices=["classification", "survival", "linear-probe", "few-shot"])
    parser.add_argument("--label", default="label", help="label column (classification, probes; default: label)")
    parser.add_argument("--time-column", default="time", help="survival time column (default: time; must be > 0)")
    parser.add_argument("--event-column", default="event", help="event column, 1 = event, 0 = censored (default: event)")
    parser.add_argument("--out", required=True, help="output folder")
    head = parser.add_argument_group("MIL head (classification, survival)")
    head.add_argument("--head", choices=["abmil", "transmil"], default="abmil")
    head.add_argument("--attention", choices=["gated", "plain"], default="gated", help="ABMIL attention (default gated)")
    head.add_argument("--init", nargs="+", default=["scratch"], metavar="MODE",
                      help="'scratch' (default) or 'mstar+ PATH': the TransMIL head (and the probes' slide "
                           "embeddings) from the pretrained aggregator of an mSTAR or aggregator checkpoint")
    head.add_argument("--transmil-size", choices=["base", "small", "tiny"], default="base",
                      help="size of a from-scratch TransMIL head (base = the paper's)")
    head.add_argument("--hidden-size", type=int, default=512, help="ABMIL width (default 512)")
    head.add_argument("--attention-dim", type=int, default=128, help="ABMIL attention width (default 128)")
    head.add_argument("--dropout", type=float, default=0.25)
    head.add_argument("--epochs", type=_positive_int, default=50)
    head.add_argument("--patience", type=_positive_int, default=10, help="early stopping patience in epochs")
    head.add_argument("--early-stopping", choices=["auto", "metric", "loss"], default="auto")
    head.add_argument("--lr", type=float, default=2e-4)
    head.add_argument("--weight-decay", type=float, default=1e-5)
    head.add_argument("--max-patches", type=_positive_int, default=None,
                      help="patches sampled per slide and epoch in training (default: all)")
    head.add_argument("--num-time-bins", type=_positive_int, default=4, help="survival time bins (default 4, "
                      "quantiles of the training cases' uncensored times)")
    head.add_argument("--bag-level", choices=["slide", "case"], default="slide",
                      help="slide: one bag per slide, a case's prediction is the mean over its slides (default); "
                           "case: one bag holding all the patches of a case's slides")
    head.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    split = parser.add_argument_group("folds and statistics")
    split.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    split.add_argument("--splits", choices=["auto", "manifest", "kfold"], default="auto",
                       help="auto: the manifest's split column when every slide has one, else k-fold. A case whose "
                            "slides are on two sides of the split column is an error")
    split.add_argument("--split-from-first-slide", action="store_true",
                       help="instead of that error, give every slide of such a case its first slide's split (warned)")
    split.add_argument("--score-level", choices=["case", "slide"], default="case",
                       help="case: one score per patient (mean of its slides' predictions; default); slide: one per "
                            "slide. Bootstrap CIs and paired tests resample cases either way")
    split.add_argument("--val-fraction", type=float, default=0.2,
                       help="share of each training part held out for early stopping (0: none, fixed epochs)")
    split.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples (default 1000)")
    split.add_argument("--seed", type=int, default=0)
    probes = parser.add_argument_group("probes")
    probes.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the linear probe")
    probes.add_argument("--shots", type=_positive_int, nargs="+", default=[1, 2, 4, 8, 16])
    probes.add_argument("--draws", type=_positive_int, default=10, help="few-shot support draws per shot count")
    parser.add_argument("--heatmaps", type=int, default=0,
                        help="attention heatmaps of the first N test slides per feature folder (needs slide_path)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out slides whose features file is missing (recorded) instead of failing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _parse_init(values: list[str]) -> tuple[str, str | None]:
    mode = values[0].lower()
    if mode == "scratch" and len(values) == 1:
        return "scratch", None
    if mode in ("mstar+", "mstar") and len(values) == 2:
        return "mstar+", values[1]
    raise ValueError(f"--init takes 'scratch' or 'mstar+ PATH', got {' '.join(values)!r}.")


def run(args) -> int:
    import logging

    from mstar_hf.training_utils.mil import MILSettings
    from mstar_hf.training_utils.downstream import EvaluationConfig, run_evaluation

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        init, aggregator = _parse_init(args.init)
        if init == "mstar+" and args.task in ("classification", "survival") and args.head != "transmil":
            raise ValueError("--init mstar+ initialises a TransMIL head from the pretrained aggregator: add --head transmil.")
        settings = MILSettings(
            head=args.head, gated_attention=args.attention == "gated", hidden_size=args.hidden_size,
            attention_dim=args.attention_dim, dropout=args.dropout, transmil_size=args.transmil_size, init=init,
            aggregator=aggregator, learning_rate=args.lr, weight_decay=args.weight_decay, epochs=args.epochs,
            patience=args.patience, max_patches=args.max_patches, early_stopping=args.early_stopping,
            num_time_bins=args.num_time_bins, bag_level=args.bag_level, seed=args.seed,
        )
        config = EvaluationConfig(
            manifest=args.manifest, out_dir=args.out, task=args.task, features=args.features, names=args.names,
            label=args.label, time_column=args.time_column, event_column=args.event_column, folds=args.folds,
            splits=args.splits, split_from_first_slide=args.split_from_first_slide, score_level=args.score_level,
            val_fraction=args.val_fraction, num_bootstrap=args.bootstrap, shots=args.shots,
            draws=args.draws, C=args.C, heatmaps=args.heatmaps, skip_missing=args.skip_missing, cpu=args.cpu,
            progress=not args.quiet, mil=settings,
        )
        results = run_evaluation(config)
    except (ValueError, OSError, KeyError) as e:
        print(f"mstar-hf evaluate: error: {e}", file=sys.stderr)
        return 1
    if results.get("notice"):
        print(results["notice"] + "\n")
    print(results["table"])
    if results["excluded"]:
        print(f"\n{len(results['excluded'])} slide(s) left out (see results.json 'excluded').")
    print(f"\nresults: {args.out}/results.json  ({results['seconds']:.1f} s)")
    return 0
