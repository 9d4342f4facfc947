"""Stage 1 of mSTAR: multimodal pretraining of the slide aggregator (method.md, "Stage 1").

The slide aggregator, report encoder and RNA encoder are trained on precomputed patch features with
inter-modality InfoNCE and the inter-cancer triplet loss. `training/stage1.py` is the
`accelerate launch` entry point; `mstar-hf demo` calls `run_stage1` directly, the same code path.
"""

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .common import (
    CommonTrainingArguments,
    EpochShuffleSampler,
    build_optimizer,
    make_accelerator,
    no_zero3_init,
    push_to_hub,
    resumable_batches,
    write_eval_results,
    write_training_args,
)

logger = logging.getLogger(__name__)

RETRIEVAL_DIRECTIONS = (("slide", "report"), ("slide", "rna"), ("report", "rna"))
# Frozen report encodings of the latest text encoder this process ran, by exact input batch: the demo trains its
# Stage 1 and the shuffled-pairing controls in one process on the same reports (~5 s of BERT per run otherwise).
# A text encoder with other weights replaces them all, so the memo holds one cohort's worth at most.
_REPORT_MEMO: dict = {"encoder": None, "batches": {}}


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
    contrastive_negatives: str = field(default="all", metadata={
        "help": "InfoNCE negatives: 'all' other cases of the batch (CLIP), or 'other_cancer' (same-type cases are "
                "not negatives; for cohorts whose reports/RNA hardly differ within a type)."})
    patch_alignment_loss_weight: float = field(default=0.0, metadata={
        "help": "Weight of an InfoNCE term (ours) between each slide's mean normalised projected patch token and its "
                "report: trains the score the zero-shot patch route (MI-Zero top-k) uses; 0: the paper's losses."})
    freeze_text_encoder: bool = field(default=False, metadata={"help": "Keep the report encoder's weights fixed."})
    text_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the report encoder (default: --learning_rate)."}
    )
    standardize_aggregator_input: bool = field(default=True, metadata={
        "help": "A new aggregator's input layer starts on standardised features: its weights are divided by the "
                "training patches' per-dimension std and its bias takes out their mean (same architecture, a "
                "data-dependent initialisation). Patch features share a large common component; without this the "
                "aggregator's held-out zero-shot was 0.25-0.50 over 3 seeds on the demo cohort, with it 0.50-0.67."})
    standardize_patches_per_slide: int = field(default=256, metadata={
        "help": "Patches sampled per training slide (seeded) for those statistics."})


@dataclass
class Stage1DataArguments:
    manifest: str = field(default=None, metadata={"help": "Cohort manifest (CSV/Parquet) with features_path etc."})
    gene_vocab: str | None = field(
        default=None, metadata={"help": "Gene vocabulary (JSON list / text); default gene_vocab.json beside the manifest."}
    )
    max_patches: int = field(default=4096, metadata={"help": "Patches sampled (or all, if fewer) per slide."})
    patch_keep_fraction: float = field(default=1.0, metadata={
        "help": "Patch dropout for training slides: each epoch a slide keeps a random ceil(fraction * n) of its n "
                "patches (ours, not the paper's; 1: all). Held-out evaluation always sees every patch."})
    max_report_length: int = field(default=512)
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "When a tokenizer is trained on the reports."})
    train_split: str = field(default="train", metadata={"help": "Training split(s), comma-separated."})
    eval_split: str = field(default="val", metadata={
        "help": "Held-out split(s) for retrieval, comma-separated (e.g. val,test); none in the manifest: no held-out "
                "evaluation (never the training data)."})
    clean_reports: bool = field(default=True, metadata={
        "help": "Clean OCR'd reports before tokenising (page headers, barcodes, UUIDs, redaction marks and OCR noise "
                "runs dropped; diagnosis sections first), so the 512-token window holds the diagnosis."})


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


def feature_statistics(cohort, feature_dim: int, patches_per_slide: int = 256, seed: int = 0,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std `[D]` (float64) of the patch features of a cohort's slides, from a seeded
    sample of at most `patches_per_slide` per slide, in manifest order: the same in every process."""
    from tqdm.auto import tqdm

    from ..data import read_slide_features

    total, total_sq, count = np.zeros(feature_dim), np.zeros(feature_dim), 0
    for index, row in enumerate(tqdm(cohort, desc="aggregator input statistics", unit="slide", disable=not progress)):
        if not row.get("features_path"):
            continue
        feats, _ = read_slide_features(row["features_path"], case_id=row.get("case_id"), expected_dim=feature_dim,
                                       max_patches=patches_per_slide, rng=np.random.default_rng([int(seed), 7411, index]))
        feats = feats.astype(np.float64)
        total += feats.sum(0)
        total_sq += (feats ** 2).sum(0)
        count += len(feats)
    if count == 0:
        raise ValueError("no training slide has a features file: no statistics for the aggregator's input.")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    return mean, std


@torch.no_grad()
def standardize_input_layer(linear: torch.nn.Linear, mean: np.ndarray, std: np.ndarray, eps: float = 1e-6) -> None:
    """Rewrites `linear` so that `linear(x)` afterwards equals `linear((x - mean) / std)` before: weights / std,
    bias - (weights / std) @ mean. A dimension with no spread keeps its weights (nothing to scale)."""
    std_t = torch.as_tensor(np.where(std > eps, std, 1.0), dtype=linear.weight.dtype)
    weight = linear.weight / std_t
    linear.bias -= weight @ torch.as_tensor(mean, dtype=weight.dtype)
    linear.weight.copy_(weight)


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
        contrastive_negatives=model_args.contrastive_negatives,
        patch_alignment_loss_weight=model_args.patch_alignment_loss_weight,
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


def make_loader(dataset, processor, data_args, batch_size: int, seed: int, shuffle: bool, feature_dim: int, workers: int,
                drop_last: bool = False):
    from ..data import CohortTorchDataset, MStarDataCollator

    # the shuffled loader is the training one: only its bags get patch dropout
    torch_dataset = CohortTorchDataset(dataset, processor, max_patches=data_args.max_patches, feature_dim=feature_dim, seed=seed,
                                       patch_keep_fraction=data_args.patch_keep_fraction if shuffle else 1.0)
    collator = MStarDataCollator(processor, max_patches=data_args.max_patches, feature_dim=feature_dim, seed=seed)
    sampler = EpochShuffleSampler(len(torch_dataset), seed) if shuffle else None
    return torch.utils.data.DataLoader(
        torch_dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator, num_workers=workers,
        drop_last=drop_last,
    ), torch_dataset


def _tensor_digest(tensors) -> str:
    """sha256 of named tensors' names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def encode_reports_once(model, processor, datasets, batch_size: int = 32, progress: bool = False):
    """{case_id: [CLS] of its report} from the frozen text encoder (eval mode, no dropout), or None when a
    case's slides carry different reports (then the encoder runs every step as usual). A frozen BioBERT
    is most of a Stage 1 step's cost; each report is encoded once instead of once per step.

    Distinct reports are encoded in text order, so a run on the same reports paired with other cases (a
    shuffled-pairing control) meets the same batches, and a batch this process already encoded with the same
    encoder weights (`_REPORT_MEMO`) is not encoded again: the result is the same to the bit."""
    from tqdm.auto import tqdm

    by_case = {}
    for dataset in datasets:
        for case, report in zip(dataset["case_id"], dataset["report"]):
            if report is None or not str(report).strip():
                continue
            if by_case.setdefault(case, report) != report:
                logger.warning("case %s has several different reports: the frozen report encoder is not cached", case)
                return None
    owner = {}  # a case holding each distinct report, named in the processor's errors
    for case in sorted(by_case):
        owner.setdefault(by_case[case], case)
    texts = sorted(owner)
    text_model = model.text_model
    encoder = _tensor_digest(text_model.state_dict().items()) + str(next(text_model.parameters()).device)
    if _REPORT_MEMO["encoder"] != encoder:
        _REPORT_MEMO.update(encoder=encoder, batches={})
    memo = _REPORT_MEMO["batches"]
    was_training = text_model.training
    text_model.eval()
    by_text = {}
    for start in tqdm(range(0, len(texts), batch_size), desc="encoding reports once", disable=not progress,
                      leave=False):
        chunk = texts[start:start + batch_size]
        tokens = processor.tokenize_reports(chunk, [owner[t] for t in chunk])
        tokens = {k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        key = _tensor_digest(sorted(tokens.items()))
        if key not in memo:
            memo[key] = text_model(**tokens, return_dict=True).last_hidden_state[:, 0].float().cpu()
        by_text.update(zip(chunk, memo[key]))
    text_model.train(was_training)
    return {case: by_text[report] for case, report in by_case.items()}


def report_hidden_for(cache: dict | None, case_ids, width: int):
    """[B, width] cached [CLS] rows for a batch's cases (zeros for cases without a report), or None."""
    if cache is None:
        return None
    zero = torch.zeros(width)
    return torch.stack([cache.get(c, zero) for c in case_ids])


@torch.no_grad()
def embed_cohort(model, loader, device, report_cache: dict | None = None) -> dict:
    """Normalised embeddings of every case of a loader, with presence masks and cancer types."""
    chunks = {k: [] for k in ("slide", "report", "rna", "slide_present", "report_present", "rna_present", "cancer_type",
                              "case_index")}
    was_training = model.training
    model.eval()
    for batch in loader:
        hidden = report_hidden_for(report_cache, batch.pop("case_id"), model.config.text_config.hidden_size)
        if hidden is not None:
            batch["report_hidden"] = hidden
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = model(**batch, return_loss=False)
        for key, value in (("slide", out.slide_embeds), ("report", out.text_embeds), ("rna", out.rna_embeds),
                           ("slide_present", out.slide_present), ("report_present", out.report_present),
                           ("rna_present", out.rna_present), ("cancer_type", batch["cancer_type"]),
                           ("case_index", batch["case_index"])):
            chunks[key].append(value.float().cpu() if value.is_floating_point() else value.cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in chunks.items()}


def retrieval_metrics(embeds: dict, by_case: bool = False) -> dict:
    """Recall@1/5/10 for slide->report, slide->RNA and report->RNA over rows having both modalities. Another
    slide of the query's own patient never competes with its pair (`case_index`). `by_case`: one row per
    patient case (its slides' embeddings averaged), so patients with several slides count once."""
    from ..evaluation.retrieval import case_recall_at_k, recall_at_k

    results = {}
    for a, b in RETRIEVAL_DIRECTIONS:
        rows = embeds[f"{a}_present"] & embeds[f"{b}_present"]
        if int(rows.sum()) < 2:
            continue
        cases = embeds["case_index"][rows] if "case_index" in embeds else None
        if by_case:
            if cases is None or len(torch.unique(cases)) == int(rows.sum()):
                continue  # one slide per case: the slide-level figures are the case-level ones
            results[f"{a}->{b}"] = case_recall_at_k(embeds[a][rows], embeds[b][rows], cases,
                                                    labels=embeds["cancer_type"][rows])
        else:
            results[f"{a}->{b}"] = recall_at_k(embeds[a][rows], embeds[b][rows], labels=embeds["cancer_type"][rows],
                                               case_ids=cases)
    return results


def run_stage1(model_args: Stage1ModelArguments, data_args: Stage1DataArguments, args: Stage1TrainingArguments) -> dict:
    """Trains Stage 1; returns the final metrics. Writes the model, processor, loss curve, retrieval table.

    Order of the end matters: the trained model is saved before the held-out evaluation, so a failure
    there never loses it."""
    from ..data import load_cohort
    from ..evaluation.retrieval import retrieval_table
    from .common import cohort_splits
    from .loop import TrainingLoop, build_scheduler, checked_cohort, resolve_max_train_steps

    accelerator = make_accelerator(args, "mstar_stage1")
    output_dir = Path(args.output_dir)
    cohort = load_cohort(data_args.manifest, check_files=False, clean_reports=data_args.clean_reports)
    train_set, eval_set, split_source = cohort_splits(cohort, data_args.train_split, data_args.eval_split, args.seed,
                                                      data_args.manifest)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes
    if global_batch < 2:
        raise ValueError(
            f"--per_device_train_batch_size {args.per_device_train_batch_size} on {accelerator.num_processes} "
            "process(es) gives a global batch of 1: InfoNCE and the triplet loss need at least 2 cases per step "
            "(every step would have loss 0).")
    with no_zero3_init():
        model, processor = build_processor_and_model(model_args, data_args, list(train_set["report"]))
    width = model.config.aggregator_config.input_dim
    checks = dict(feature_dim=width, gene_vocab=processor.gene_vocab, progress=not args.quiet)
    train_set = checked_cohort(accelerator, train_set, manifest=data_args.manifest, skip_bad_cases=args.skip_bad_cases,
                               output_dir=args.output_dir, **checks)
    if len(eval_set):
        eval_set = checked_cohort(accelerator, eval_set, manifest=data_args.manifest,
                                  skip_bad_cases=args.skip_bad_cases, output_dir=str(output_dir / "eval_check"), **checks)
    if len(train_set) < global_batch:
        raise ValueError(f"{data_args.manifest}: {len(train_set)} training case(s), fewer than one global batch "
                         f"({global_batch}); lower --per_device_train_batch_size.")
    if processor.tokenizer is not None:
        from ..data.report_cleaning import warn_report_truncation

        warn_report_truncation([r for r in train_set["report"] if r], processor.tokenizer, data_args.max_report_length,
                               source=f"{data_args.manifest} (training reports)", cleaned=data_args.clean_reports)
    accelerator.print(f"Stage 1 data: {len(train_set)} training slide(s), {len(eval_set)} held-out ({split_source})")

    if model_args.standardize_aggregator_input and not model_args.model_name_or_path:
        # before `prepare` (DeepSpeed ZeRO-3 partitions the weights there); every process computes the same
        # statistics from the same files, and a resumed run's checkpoint replaces the weights anyway
        mean, std = feature_statistics(train_set, width, model_args.standardize_patches_per_slide, args.seed,
                                       progress=not args.quiet and accelerator.is_main_process)
        standardize_input_layer(model.aggregator.input_proj[0], mean, std)

    # Stage 1 trains on precomputed features: the patch encoder and the Stage 2 head stay fixed.
    for module in (model.patch_model, model.patch_projection):
        module.requires_grad_(False)
    if model_args.freeze_text_encoder:
        model.text_model.requires_grad_(False)
    if args.gradient_checkpointing:
        model.text_model.activation_checkpointing_enable()
        model.aggregator.activation_checkpointing_enable()

    # drop_last: a short last batch (one case) would make steps whose contrastive/triplet loss is 0
    train_loader, train_dataset = make_loader(train_set, processor, data_args, args.per_device_train_batch_size,
                                              args.seed, True, width, args.dataloader_num_workers, drop_last=True)
    eval_loader = None
    if len(eval_set):
        eval_loader, _ = make_loader(eval_set, processor, data_args, args.per_device_eval_batch_size, args.seed, False,
                                     width, 0)
    report_cache = None
    if model_args.freeze_text_encoder:
        report_cache = encode_reports_once(model, processor, [train_set, eval_set], args.per_device_eval_batch_size,
                                           progress=not args.quiet)
    text_width = model.config.text_config.hidden_size
    text_params = {id(p) for p in model.text_model.parameters()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(model, args, [(n, p) for n, p in named if id(p) not in text_params])
    if model_args.text_learning_rate and not model_args.freeze_text_encoder:
        optimizer.add_param_group({"params": [p for n, p in named if id(p) in text_params],
                                   "lr": model_args.text_learning_rate, "weight_decay": args.weight_decay})
    elif not model_args.freeze_text_encoder:
        optimizer.add_param_group({"params": [p for n, p in named if id(p) in text_params],
                                   "weight_decay": args.weight_decay})
    # optimizer steps per epoch and process, as the prepared loader will give them
    # (drop_last batches, handed out round-robin; Accelerate evens the processes' counts up)
    batches = len(train_set) // args.per_device_train_batch_size
    updates_per_epoch = max(1, math.ceil(batches / accelerator.num_processes) // args.gradient_accumulation_steps)
    max_steps = resolve_max_train_steps(args.max_train_steps, args.num_train_epochs, updates_per_epoch)
    scheduler = build_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, max_steps,
                                accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    engine = type(model).__name__

    loop = TrainingLoop(accelerator, args, "stage 1", max_steps, updates_per_epoch)
    completed = loop.resume()

    def evaluate():
        if eval_loader is None:
            return None, None
        embeds = embed_cohort(accelerator.unwrap_model(model), eval_loader, accelerator.device, report_cache)
        return retrieval_metrics(embeds), retrieval_metrics(embeds, by_case=True)

    before = evaluate()[0] if completed == 0 else None

    model.train()
    history = []
    batches = resumable_batches(accelerator, train_loader, train_dataset, completed, max_steps,
                                args.gradient_accumulation_steps)
    for batch in batches:
        hidden = report_hidden_for(report_cache, batch.pop("case_id"), text_width)
        if hidden is not None:
            batch["report_hidden"] = hidden.to(accelerator.device)
        # dropout draws depend only on (seed, step, rank): a resumed run repeats them exactly
        torch.manual_seed(args.seed * 1_000_003 + loop.completed * 101 + accelerator.process_index)
        with accelerator.accumulate(model):
            out = model(**batch, return_loss=True)
            loop.backward_and_step(model, optimizer, scheduler, out.loss)
        if not loop.end_step(loss=out.loss, contrastive=out.contrastive_loss, triplet=out.triplet_loss):
            continue
        history.append(loop.last["loss"])
        if args.eval_steps and loop.completed % args.eval_steps == 0 and not loop.done and eval_loader is not None:
            metrics = evaluate()[0]
            if args.with_tracking:
                accelerator.log({f"eval/{d}/{k}": v for d, r in metrics.items() for k, v in r.items()},
                                step=loop.completed)
        if loop.done:
            break
    loop.finish("mSTAR Stage 1")

    # Save first: the trained model must survive any failure of the evaluation below.
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    checksum = sum(float(p.detach().double().sum()) for p in unwrapped.parameters())
    state_dict = accelerator.get_state_dict(model)
    # every rank writes its weight checksum: DDP/ZeRO replicas must agree
    (output_dir / f"weights_checksum_rank{accelerator.process_index}.json").write_text(json.dumps({"checksum": checksum}))
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        processor.save_pretrained(output_dir)
        write_training_args(output_dir, model_args, data_args, args, extra={"stage": "stage1"})

    results = {
        "engine": engine,
        "num_processes": accelerator.num_processes,
        "steps": loop.completed,
        "max_train_steps": max_steps,
        "train_cases": len(set(train_set["case_id"])),
        "train_slides": len(train_set),
        "eval_cases": len(set(eval_set["case_id"])),
        "eval_slides": len(eval_set),
        "split_source": split_source,
        "retrieval_before": before,
        "retrieval": None,
        "retrieval_by_case": None,
        "first_losses": history[:5],
        "last_losses": history[-5:],
    }
    try:
        after, by_case = evaluate()
        results.update(retrieval=after, retrieval_by_case=by_case)
    except Exception as err:  # noqa: BLE001 - the model is saved; report the failed evaluation and go on
        logger.exception("held-out evaluation failed (the trained model is saved in %s)", output_dir)
        results["evaluation_error"] = f"{type(err).__name__}: {err}"
    if accelerator.is_main_process:
        dataset_name = Path(data_args.manifest).parent.name
        if results["retrieval"] is None:
            reason = results.get("evaluation_error") or f"no held-out set ({split_source})"
            table = f"No held-out evaluation: {reason}."
            evals = []
        else:
            table = retrieval_table(results["retrieval"])
            if results["retrieval_by_case"]:
                table += "\n\nPer patient case (slides of a case averaged):\n\n" + retrieval_table(results["retrieval_by_case"])
            evals = [{"task": "retrieval", "metric": "recall@1", "name": f"{d} R@1", "value": r["R@1"],
                      "dataset": dataset_name, "split": data_args.eval_split}
                     for d, r in results["retrieval"].items()]
        (output_dir / "retrieval.md").write_text(
            f"# Held-out cross-modal retrieval\n\n{len(eval_set)} held-out slide(s); {split_source}.\n\n{table}\n")
        (output_dir / "stage1_results.json").write_text(json.dumps(results, indent=2))
        write_eval_results(output_dir, evals)
        accelerator.print(table)
        if args.push_to_hub:
            push_to_hub(output_dir, args, "mSTAR Stage 1: multimodal slide aggregator")
    accelerator.end_training()
    return results


def main(argv=None) -> int:
    """`training/stage1.py`: parses the flags (or one JSON file) and runs Stage 1."""
    import sys

    from transformers import HfArgumentParser

    parser = HfArgumentParser((Stage1ModelArguments, Stage1DataArguments, Stage1TrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    if not data_args.manifest:
        parser.error("--manifest is required")
    run_stage1(model_args, data_args, training_args)
    return 0


__all__ = [
    "Stage1DataArguments",
    "Stage1ModelArguments",
    "Stage1TrainingArguments",
    "embed_cohort",
    "main",
    "retrieval_metrics",
    "run_stage1",
]
