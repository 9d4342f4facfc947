"""Stage 1 of mSTAR: multimodal pretraining of the slide aggregator (method.md, "Stage 1").

The slide aggregator, report encoder and RNA encoder are trained on precomputed patch features with
inter-modality InfoNCE and the inter-cancer triplet loss. `training/stage1.py` is the
`accelerate launch` entry point; `mstar-hf demo` calls `run_stage1` directly, the same code path.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .common import (
    CommonTrainingArguments,
    EpochShuffleSampler,
    LossLog,
    build_optimizer,
    checkpoint_step,
    find_checkpoint,
    is_deepspeed,
    make_accelerator,
    push_to_hub,
    resumable_batches,
    save_checkpoint,
    write_eval_results,
    write_training_args,
)

logger = logging.getLogger(__name__)

RETRIEVAL_DIRECTIONS = (("slide", "report"), ("slide", "rna"), ("report", "rna"))


@dataclass
class Stage1ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "An MStarModel folder to continue training (its processor is reused)."}
    )
    patch_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The patch encoder that extracted the features (MStarPatchModel folder); carried in the model."},
    )
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Report encoder: a local BERT folder or Hub id (dmis-lab/biobert-base-cased-v1.2 in the paper). "
                          "None: a small BERT with a tokenizer trained on the training reports."},
    )
    model_size: str = field(default="small", metadata={"help": "Preset for new parts: tiny, small or base."})
    projection_dim: int | None = field(default=None, metadata={"help": "Shared space width (preset default)."})
    triplet_margin: float = field(default=0.3)
    triplet_loss_weight: float = field(default=1.0)
    contrastive_loss_weight: float = field(default=1.0)
    freeze_text_encoder: bool = field(default=False, metadata={"help": "Keep the report encoder's weights fixed."})
    text_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the report encoder (default: --learning_rate)."}
    )


@dataclass
class Stage1DataArguments:
    manifest: str = field(default=None, metadata={"help": "Cohort manifest (CSV/Parquet) with features_path etc."})
    gene_vocab: str | None = field(
        default=None, metadata={"help": "Gene vocabulary (JSON list / text); default gene_vocab.json beside the manifest."}
    )
    max_patches: int = field(default=4096, metadata={"help": "Patches sampled (or all, if fewer) per slide."})
    max_report_length: int = field(default=512)
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "When a tokenizer is trained on the reports."})
    train_split: str = field(default="train")
    eval_split: str = field(default="val", metadata={"help": "Held-out split(s) for retrieval, comma-separated (e.g. val,test)."})


@dataclass
class Stage1TrainingArguments(CommonTrainingArguments):
    learning_rate: float = field(default=2e-4)
    per_device_train_batch_size: int = field(default=16)


def _gene_vocab(data_args: Stage1DataArguments) -> list[str]:
    from ..data import read_gene_vocab

    path = Path(data_args.gene_vocab) if data_args.gene_vocab else Path(data_args.manifest).parent / "gene_vocab.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no gene vocabulary (pass --gene_vocab).")
    return read_gene_vocab(path)


def _feature_width(dataset) -> int:
    import h5py

    for path in dataset["features_path"]:
        if path:
            try:
                with h5py.File(path, "r") as handle:
                    return int(handle["features"].shape[1])
            except (OSError, KeyError) as err:
                raise ValueError(f"{path}: not a readable features file ({err}).") from err
    raise ValueError("no case of the cohort has a features file.")


def build_processor_and_model(model_args: Stage1ModelArguments, data_args: Stage1DataArguments, train_reports: list[str]):
    """Loads or assembles the `MStarModel` and its `MStarProcessor`."""
    from transformers import AutoConfig, AutoTokenizer

    from ..data import MStarProcessor, train_report_tokenizer
    from ..modeling import MStarImageProcessor, MStarModel, MStarPatchModel
    from ..presets import aggregator_config, gene_config, mstar_config, patch_config

    if model_args.model_name_or_path:
        model = MStarModel.from_pretrained(model_args.model_name_or_path, dtype=torch.float32)
        processor = MStarProcessor.from_pretrained(model_args.model_name_or_path)
        return model, processor

    genes = _gene_vocab(data_args)
    size = model_args.model_size
    patch = (
        MStarPatchModel.from_pretrained(model_args.patch_model_name_or_path, dtype=torch.float32)
        if model_args.patch_model_name_or_path
        else MStarPatchModel(patch_config(size))
    )
    width = patch.config.hidden_size
    if model_args.text_model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.text_model_name_or_path)
        text = model_args.text_model_name_or_path
    else:
        # no pretrained BERT offline: a word-level tokenizer on the training reports + a small BERT
        tokenizer = train_report_tokenizer([r for r in train_reports if r], vocab_size=data_args.tokenizer_vocab_size)
        text = mstar_config(size, num_genes=len(genes), vocab_size=len(tokenizer)).text_config
        text.pad_token_id = tokenizer.pad_token_id
    kwargs = dict(
        triplet_margin=model_args.triplet_margin,
        triplet_loss_weight=model_args.triplet_loss_weight,
        contrastive_loss_weight=model_args.contrastive_loss_weight,
        projection_dim=model_args.projection_dim or mstar_config(size, num_genes=2).projection_dim,
    )
    model = MStarModel.from_submodels(
        patch=patch,
        aggregator=aggregator_config(size, input_dim=width),
        text=text if isinstance(text, str) else text,
        rna=gene_config(size, num_genes=len(genes)),
        **kwargs,
    )
    processor = MStarProcessor(
        image_processor=MStarImageProcessor(), tokenizer=tokenizer, gene_vocab=genes, max_length=data_args.max_report_length
    )
    _ = AutoConfig  # the text config type is resolved by MStarConfig
    return model, processor


def make_loader(dataset, processor, data_args, batch_size: int, seed: int, shuffle: bool, feature_dim: int, workers: int):
    from ..data import CohortTorchDataset, MStarDataCollator

    torch_dataset = CohortTorchDataset(dataset, processor, max_patches=data_args.max_patches, feature_dim=feature_dim, seed=seed)
    collator = MStarDataCollator(processor, max_patches=data_args.max_patches, feature_dim=feature_dim, seed=seed)
    sampler = EpochShuffleSampler(len(torch_dataset), seed) if shuffle else None
    return torch.utils.data.DataLoader(
        torch_dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator, num_workers=workers
    ), torch_dataset


@torch.no_grad()
def embed_cohort(model, loader, device) -> dict:
    """Normalised embeddings of every case of a loader, with presence masks and cancer types."""
    chunks = {k: [] for k in ("slide", "report", "rna", "slide_present", "report_present", "rna_present", "cancer_type")}
    was_training = model.training
    model.eval()
    for batch in loader:
        batch.pop("case_id", None)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = model(**batch, return_loss=False)
        for key, value in (("slide", out.slide_embeds), ("report", out.text_embeds), ("rna", out.rna_embeds),
                           ("slide_present", out.slide_present), ("report_present", out.report_present),
                           ("rna_present", out.rna_present), ("cancer_type", batch["cancer_type"])):
            chunks[key].append(value.float().cpu() if value.is_floating_point() else value.cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in chunks.items()}


def retrieval_metrics(embeds: dict) -> dict:
    """Recall@1/5/10 for slide->report, slide->RNA and report->RNA over cases having both modalities."""
    from ..evaluation.retrieval import recall_at_k

    results = {}
    for a, b in RETRIEVAL_DIRECTIONS:
        rows = embeds[f"{a}_present"] & embeds[f"{b}_present"]
        if int(rows.sum()) < 2:
            continue
        results[f"{a}->{b}"] = recall_at_k(embeds[a][rows], embeds[b][rows], labels=embeds["cancer_type"][rows])
    return results


def run_stage1(model_args: Stage1ModelArguments, data_args: Stage1DataArguments, args: Stage1TrainingArguments) -> dict:
    """Trains Stage 1; returns the final metrics. Writes the model, processor, loss curve, retrieval table."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from ..data import load_cohort
    from ..evaluation.retrieval import retrieval_table

    accelerator = make_accelerator(args, "mstar_stage1")
    output_dir = Path(args.output_dir)
    cohort = load_cohort(data_args.manifest)
    if "split" in cohort.column_names and data_args.train_split in set(cohort["split"]):
        train_set = cohort.filter(lambda s: s == data_args.train_split, input_columns="split")
        eval_splits = {name.strip() for name in data_args.eval_split.split(",")}
        eval_set = cohort.filter(lambda s: s in eval_splits, input_columns="split")
    else:
        split = cohort.train_test_split(test_size=0.15, seed=args.seed)
        train_set, eval_set = split["train"], split["test"]
    if len(train_set) == 0:
        raise ValueError(f"{data_args.manifest}: the '{data_args.train_split}' split has no case.")
    model, processor = build_processor_and_model(model_args, data_args, list(train_set["report"]))
    width = _feature_width(train_set)
    if width != model.config.aggregator_config.input_dim:
        raise ValueError(
            f"{data_args.manifest}: the features are {width}-d but the aggregator takes "
            f"{model.config.aggregator_config.input_dim}-d features (wrong encoder or checkpoint?)."
        )

    # Stage 1 trains on precomputed features: the patch encoder and the Stage 2 head stay fixed.
    for module in (model.patch_model, model.patch_projection):
        module.requires_grad_(False)
    if model_args.freeze_text_encoder:
        model.text_model.requires_grad_(False)
    if args.gradient_checkpointing:
        model.text_model.activation_checkpointing_enable()
        model.aggregator.activation_checkpointing_enable()

    train_loader, train_dataset = make_loader(train_set, processor, data_args, args.per_device_train_batch_size,
                                              args.seed, True, width, args.dataloader_num_workers)
    eval_loader, _ = make_loader(eval_set if len(eval_set) else train_set, processor, data_args,
                                 args.per_device_eval_batch_size, args.seed, False, width, 0)
    text_params = {id(p) for p in model.text_model.parameters()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(model, args, [(n, p) for n, p in named if id(p) not in text_params])
    if model_args.text_learning_rate and not model_args.freeze_text_encoder:
        optimizer.add_param_group({"params": [p for n, p in named if id(p) in text_params],
                                   "lr": model_args.text_learning_rate, "weight_decay": args.weight_decay})
    elif not model_args.freeze_text_encoder:
        optimizer.add_param_group({"params": [p for n, p in named if id(p) in text_params],
                                   "weight_decay": args.weight_decay})
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=args.max_train_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    engine = type(model).__name__

    completed = 0
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is not None:
        accelerator.print(f"resuming from {checkpoint}")
        accelerator.load_state(str(checkpoint))
        completed = checkpoint_step(checkpoint)
    loss_log = LossLog(args.output_dir, enabled=accelerator.is_main_process,
                       resume_step=completed if checkpoint is not None else None)

    unwrapped = accelerator.unwrap_model(model)
    before = retrieval_metrics(embed_cohort(unwrapped, eval_loader, accelerator.device)) if completed == 0 else None

    progress = tqdm(total=args.max_train_steps, initial=completed, disable=args.quiet or not accelerator.is_local_main_process,
                    desc="stage 1")
    model.train()
    history = []
    batches = resumable_batches(accelerator, train_loader, train_dataset, completed, args.max_train_steps,
                                args.gradient_accumulation_steps)
    for batch in batches:
        batch.pop("case_id", None)
        # dropout draws depend only on (seed, step, rank): a resumed run repeats them exactly
        torch.manual_seed(args.seed * 1_000_003 + completed * 101 + accelerator.process_index)
        with accelerator.accumulate(model):
            out = model(**batch, return_loss=True)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        completed += 1
        progress.update(1)
        losses = {
            "loss": accelerator.reduce(out.loss.detach(), "mean").item(),
            "contrastive": accelerator.reduce(out.contrastive_loss.detach(), "mean").item(),
            "triplet": accelerator.reduce(out.triplet_loss.detach(), "mean").item(),
        }
        history.append(losses["loss"])
        if completed % args.logging_steps == 0:
            loss_log.log(completed, **losses)
            progress.set_postfix(loss=f"{losses['loss']:.3f}")
            if args.with_tracking:
                accelerator.log({f"train/{k}": v for k, v in losses.items()}
                                | {"train/lr": scheduler.get_last_lr()[0]}, step=completed)
        if args.checkpointing_steps and completed % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, completed, {"loss": losses["loss"]})
        if args.eval_steps and completed % args.eval_steps == 0 and completed < args.max_train_steps:
            metrics = retrieval_metrics(embed_cohort(accelerator.unwrap_model(model), eval_loader, accelerator.device))
            if args.with_tracking:
                accelerator.log({f"eval/{d}/{k}": v for d, r in metrics.items() for k, v in r.items()}, step=completed)
        if completed >= args.max_train_steps:
            break
    progress.close()

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    after = retrieval_metrics(embed_cohort(unwrapped, eval_loader, accelerator.device))
    checksum = sum(float(p.detach().double().sum()) for p in unwrapped.parameters())
    state_dict = accelerator.get_state_dict(model)
    results = {
        "engine": engine,
        "num_processes": accelerator.num_processes,
        "steps": completed,
        "retrieval_before": before,
        "retrieval": after,
        "first_losses": history[:5],
        "last_losses": history[-5:],
    }
    # every rank writes its weight checksum: DDP/ZeRO replicas must agree
    (output_dir / f"weights_checksum_rank{accelerator.process_index}.json").write_text(json.dumps({"checksum": checksum}))
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        processor.save_pretrained(output_dir)
        loss_log.plot(output_dir / "loss_curve.png", "mSTAR Stage 1")
        table = retrieval_table(after)
        (output_dir / "retrieval.md").write_text("# Held-out cross-modal retrieval\n\n" + table + "\n")
        (output_dir / "stage1_results.json").write_text(json.dumps(results, indent=2))
        write_training_args(output_dir, model_args, data_args, args, extra={"stage": "stage1"})
        write_eval_results(output_dir, [
            {"task": "retrieval", "metric": "recall@1", "name": f"{d} R@1", "value": r["R@1"],
             "dataset": Path(data_args.manifest).parent.name}
            for d, r in after.items()
        ])
        accelerator.print(table)
        if args.push_to_hub:
            push_to_hub(output_dir, args, "mSTAR Stage 1: multimodal slide aggregator")
    accelerator.end_training()
    return results


__all__ = [
    "Stage1DataArguments",
    "Stage1ModelArguments",
    "Stage1TrainingArguments",
    "embed_cohort",
    "retrieval_metrics",
    "run_stage1",
]
