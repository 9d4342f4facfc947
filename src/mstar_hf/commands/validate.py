"""`mstar-hf validate`: every case of a cohort checked once, all problems in one table (the same check every
training entry point runs before step 1)."""

import sys


def register(subparsers):
    parser = subparsers.add_parser(
        "validate",
        help="check every case of a cohort manifest (features, width, NaN rows, RNA, reports, labels)",
        description="Opens every file a manifest names and lists all bad cases at once: features missing or "
        "unreadable, wrong width, no patches or NaN/inf rows (the whole array is read), RNA unreadable or "
        "non-finite, empty reports, missing labels. Exit 1 when any case is bad. Training scripts run the same "
        "check before step 1 (and --skip_bad_cases leaves the bad cases out).",
    )
    parser.add_argument("--manifest", required=True, help="cohort manifest (CSV/TSV/Parquet)")
    parser.add_argument("--feature-dim", type=int, default=None,
                        help="expected feature width (default: the width most files have)")
    parser.add_argument("--gene-vocab", default=None,
                        help="gene vocabulary (default: gene_vocab.json beside the manifest, when present)")
    parser.add_argument("--label", default=None, help="a label column every case must have (fine-tuning)")
    parser.add_argument("--need-report", action="store_true", help="a case without a report is bad too")
    parser.add_argument("--need-features", action="store_true", help="a case without features is bad too")
    parser.add_argument("--failures", default=None, help="write the bad cases to this CSV (e.g. failures.csv)")
    parser.add_argument("--no-clean-reports", action="store_true", help="check the reports as written")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _common_width(dataset) -> int | None:
    """The feature width most readable files have (a few wrong ones then show up as problems)."""
    from collections import Counter

    import h5py

    widths = Counter()
    for path in dataset["features_path"]:
        try:
            with h5py.File(path, "r") as handle:
                widths[int(handle["features"].shape[1])] += 1
        except Exception:  # noqa: BLE001 - unreadable files are reported by the validation itself
            continue
    return widths.most_common(1)[0][0] if widths else None


def run(args) -> int:
    from pathlib import Path

    from mstar_hf.data import load_cohort, read_gene_vocab
    from mstar_hf.data.validation import problems_table, validate_cohort, write_failures

    try:
        dataset = load_cohort(args.manifest, check_files=False, clean_reports=not args.no_clean_reports)
    except (ValueError, FileNotFoundError) as err:
        print(f"mstar-hf validate: {err}", file=sys.stderr)
        return 1
    vocab_path = Path(args.gene_vocab) if args.gene_vocab else Path(args.manifest).parent / "gene_vocab.json"
    vocab = read_gene_vocab(vocab_path) if vocab_path.is_file() else None
    width = args.feature_dim or _common_width(dataset)
    problems = validate_cohort(dataset, feature_dim=width, gene_vocab=vocab, need_features=args.need_features,
                               need_report=args.need_report, label_column=args.label, progress=not args.quiet)
    cases = len(set(dataset["case_id"]))
    if args.failures:
        write_failures(args.failures, problems)
    if not problems:
        print(f"{args.manifest}: all {len(dataset)} slide(s) of {cases} case(s) are usable"
              + (f" ({width}-d features)" if width else "") + ".")
        return 0
    bad = len({p.slide_id for p in problems})
    print(f"{args.manifest}: {bad} of {len(dataset)} slide(s) have problems"
          + (f" (expected {width}-d features)" if width else "") + ":\n" + problems_table(problems))
    return 1
