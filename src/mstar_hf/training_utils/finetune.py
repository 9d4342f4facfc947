"""Fine-tune slide-level heads (ABMIL / TransMIL, classification or survival) on mSTAR patch features,
with k-fold cross-validation or the manifest's fixed splits.

    accelerate launch training/finetune.py --manifest cohort/manifest.csv --features_dir features/mstar \
        --task classification --label_column label --head abmil --folds 5 --output_dir runs/abmil

    # mSTAR+: TransMIL initialised from the pretrained slide aggregator
    ... --head transmil --init mstar+ --aggregator_name_or_path converted/mstar-aggregator
    # survival (NLL over 4 quartile time bins, C-index)
    ... --task survival --time_column time --event_column event
    # resume an interrupted run: finished folds are read back, the unfinished one continues
    ... --resume_from_checkpoint latest

The recipe of the paper (method.md): Adam, weight decay 1e-5, cosine schedule, batch 1, 50 epochs,
early stopping after 10 epochs without a better validation metric (macro-AUC / C-index). Each fold's
best model is saved with `save_pretrained` in `output_dir/fold_K` (loadable with
`AutoModelForSequenceClassification` / `AutoModel`), next to its `fold_result.json`, `loss_log.jsonl`
and `loss.png`. `output_dir/results.json` has the per-fold test metrics and the pooled out-of-fold
metrics with 1,000-sample bootstrap 95% CIs; `predictions.csv` and ROC / Kaplan-Meier plots sit beside it.

Arguments: `python training/finetune.py --help` (or one JSON file with all of them).
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from .common import CommonTrainingArguments

logger = logging.getLogger("finetune")


@dataclass
class FinetuneArguments:
    """The task, the head and the evaluation protocol."""

    manifest: str = field(default=None, metadata={"help": "Cohort manifest (CSV/TSV/Parquet)."})
    task: str = field(default="classification", metadata={"help": "classification or survival."})
    features_dir: str | None = field(
        default=None, metadata={"help": "Feature folder replacing the folder of the manifest's features_path."})
    label_column: str = field(default="label", metadata={"help": "Class label column (classification)."})
    time_column: str = field(default="time", metadata={"help": "Survival time column (> 0)."})
    event_column: str = field(default="event", metadata={"help": "Event column (1 = event, 0 = censored)."})
    head: str = field(default="abmil", metadata={"help": "abmil or transmil."})
    attention: str = field(default="gated", metadata={"help": "ABMIL attention: gated or plain."})
    init: str = field(default="scratch", metadata={"help": "scratch, or mstar+ (TransMIL from the pretrained aggregator)."})
    aggregator_name_or_path: str | None = field(
        default=None, metadata={"help": "mSTAR or aggregator checkpoint for --init mstar+."})
    transmil_size: str = field(default="base", metadata={"help": "From-scratch TransMIL preset: base, small, tiny."})
    hidden_size: int = field(default=512, metadata={"help": "ABMIL width."})
    attention_dim: int = field(default=128, metadata={"help": "ABMIL attention width."})
    dropout: float = field(default=0.25)
    patience: int = field(default=10, metadata={"help": "Early stopping patience (epochs)."})
    min_epochs: int = field(default=0, metadata={"help": "Never stop before this many epochs."})
    early_stopping: str = field(default="auto", metadata={"help": "auto, metric or loss."})
    folds: int = field(default=5, metadata={"help": "Cross-validation folds."})
    splits: str = field(default="auto", metadata={"help": "auto (manifest split column if complete), manifest, kfold."})
    val_fraction: float = field(default=0.2, metadata={"help": "Share of each training part held out for early stopping."})
    max_patches: int | None = field(default=None, metadata={"help": "Patches sampled per slide and epoch in training."})
    num_time_bins: int = field(default=4)
    survival_loss_alpha: float = field(default=0.0)
    num_bootstrap: int = field(default=1000)
    skip_missing: bool = field(default=False, metadata={"help": "Leave out slides whose features are missing."})
    split_from_first_slide: bool = field(default=False, metadata={
        "help": "When a case's slides carry different manifest splits, give every slide the split of the case's first "
                "slide (with a warning) instead of refusing the manifest."})


@dataclass
class FinetuneTrainingArguments(CommonTrainingArguments):
    learning_rate: float = field(default=2e-4, metadata={"help": "Adam learning rate."})
    weight_decay: float = field(default=1e-5, metadata={"help": "Adam (L2) weight decay."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Slides per step (bags are padded)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping (0: none, as the authors)."})
    num_train_epochs: float = field(default=50, metadata={
        "aliases": ["--num_epochs"], "help": "Epochs per fold (the paper: 50, with early stopping)."})
    max_train_steps: int = field(default=0, metadata={"help": "Cap on optimizer steps per fold (0: the epochs decide)."})


def run_finetune(args: FinetuneArguments, train_args: FinetuneTrainingArguments) -> dict:
    from ..evaluation import plots
    from ..evaluation.cohort import load_task
    from .mil import MILSettings, primary_metric, run_cross_validation
    from ..evaluation.report import (eval_results, format_table, split_notice, summarize, write_json,
                                     write_predictions_csv)
    from ..evaluation.splits import make_folds
    from .common import make_accelerator, push_to_hub, write_eval_results, write_training_args

    if args.task not in ("classification", "survival"):
        raise ValueError(f"--task must be classification or survival, got {args.task!r}.")
    accelerator = make_accelerator(train_args, "mstar_finetune")
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one save_state line per epoch and fold is noise
    data = load_task(args.manifest, args.task, label_column=args.label_column, features_dir=args.features_dir,
                     time_column=args.time_column, event_column=args.event_column, skip_missing=args.skip_missing)
    folds = make_folds(data, folds=args.folds, seed=train_args.seed, val_fraction=args.val_fraction,
                       use_manifest_splits={"auto": None, "manifest": True, "kfold": False}[args.splits],
                       split_from_first_slide=args.split_from_first_slide)
    notice = split_notice(data, folds)
    if accelerator.is_main_process and notice["text"]:
        print(notice["text"])
    settings = MILSettings(
        head=args.head, gated_attention=args.attention == "gated", hidden_size=args.hidden_size,
        attention_dim=args.attention_dim, dropout=args.dropout, transmil_size=args.transmil_size, init=args.init,
        aggregator=args.aggregator_name_or_path, learning_rate=train_args.learning_rate,
        weight_decay=train_args.weight_decay, lr_scheduler_type=train_args.lr_scheduler_type, epochs=int(train_args.num_train_epochs),
        patience=args.patience, min_epochs=args.min_epochs, batch_size=train_args.per_device_train_batch_size,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps, max_grad_norm=train_args.max_grad_norm,
        max_train_steps=train_args.max_train_steps, max_patches=args.max_patches, early_stopping=args.early_stopping,
        num_time_bins=args.num_time_bins, survival_loss_alpha=args.survival_loss_alpha, seed=train_args.seed,
    )
    out = Path(train_args.output_dir)
    logger.info("%s on %d slides (%d cases), %d fold(s), %s head, init %s", args.task, len(data),
                len(set(data.case_ids)), len(folds), args.head, args.init)
    cv = run_cross_validation(data, folds, settings, accelerator, output_dir=out,
                              resume=train_args.resume_from_checkpoint is not None, progress=not train_args.quiet)
    summary = summarize(data, cv.rows, cv.preds, cv.folds, num_bootstrap=args.num_bootstrap, seed=train_args.seed,
                        fold=cv.fold)
    primary = primary_metric(args.task)
    metrics = list(summary["metrics"])
    table = format_table([{"name": os.path.basename(os.path.normpath(args.features_dir or "features")), **summary}],
                         metrics, primary=primary)
    results = {"task": args.task, "manifest": data.manifest, "features_dir": data.features_dir,
               "label": args.label_column if args.task == "classification" else None, "classes": data.class_names,
               "n_slides": len(data), "n_cases": len(set(data.case_ids)), "excluded": data.excluded,
               "primary_metric": primary, "split_notice": notice, **summary, "table": table}
    if accelerator.is_main_process:
        write_predictions_csv(out / "predictions.csv", data, cv.rows, cv.preds, cv.fold)
        if args.task == "classification":
            plots.plot_roc(data.labels[cv.rows], {"out-of-fold": cv.preds["probs"]}, data.class_names, out / "roc.png")
        else:
            plots.plot_kaplan_meier(data.times[cv.rows], data.events[cv.rows], {"out-of-fold": cv.preds["risk"]},
                                    out / "kaplan_meier.png", groups=cv.fold)
        write_json(out / "results.json", results)
        write_training_args(out, args, train_args)
        task_name = "slide-classification" if args.task == "classification" else "survival-prediction"
        dataset = Path(data.manifest).parent.name
        for record in cv.folds:
            fold_dir = out / f"fold_{record['fold']}"
            write_training_args(fold_dir, args, train_args, extra={"fold": record["fold"]})
            write_eval_results(fold_dir, [{"task": task_name, "metric": k, "name": f"test {k} (fold {record['fold']})",
                                           "value": v, "dataset": dataset}
                                          for k, v in record["test_metrics"].items() if v == v])
        # the model-index carries results.json's figures: the primary one per metric, the pooled one labelled
        write_eval_results(out, eval_results(summary, task_name, dataset))
        print(table)
    accelerator.wait_for_everyone()
    if train_args.push_to_hub and accelerator.is_main_process:
        # the fold with the best validation metric (never chosen on its test metric)
        best = max(cv.folds, key=lambda r: (r.get("best_val_metric") is not None, r.get("best_val_metric") or 0.0))
        push_to_hub(out / f"fold_{best['fold']}", train_args, commit_message=f"fine-tuned {args.head} ({args.task})")
    accelerator.end_training()
    return results


def main(argv=None):
    parser = HfArgumentParser((FinetuneArguments, FinetuneTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        args, train_args = parser.parse_json_file(argv[0])
    else:
        args, train_args = parser.parse_args_into_dataclasses(argv)
    if not args.manifest:
        parser.error("--manifest is required")
    try:
        run_finetune(args, train_args)
    except (ValueError, FileNotFoundError) as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 1
    return 0

