"""Train `MStarForReportGeneration` on (patch-feature h5, report) pairs of a cohort manifest.

    accelerate launch training/report_generation.py --manifest cohort/manifest.csv --output_dir runs/reports \
        --stage1_model_name_or_path runs/stage1 --max_train_steps 2000

    # DeepSpeed ZeRO-2 (one CPU process: --use_deepspeed --zero_stage 2 --num_processes 1):
    accelerate launch --config_file training/configs/accelerate_zero2.yaml training/report_generation.py ...
    # resume: ... --resume_from_checkpoint latest

Cases without a report (or without features) are skipped. The slide aggregator can start from a Stage 1
`MStarModel` (`--stage1_model_name_or_path`); the tokenizer is a pretrained one (`--tokenizer_name_or_path`)
or a byte-level BPE trained on the training reports (lossless decoding, so generated text is scored
against the reports as written). At the end the model is evaluated on the eval split with beam search
(BLEU-1..4 and ROUGE-L as the COCO caption evaluation computes them, METEOR-exact+stem), next to a baseline that
copies the report of the nearest training slide (cosine of the model's slide embeddings), and
`save_pretrained` writes the model and tokenizer (plus the image processor when a patch encoder is
carried, so the folder turns slides into reports). Outputs: eval_results.json, report_results.json,
eval_predictions.jsonl, loss_curve.png, training_args.json, checkpoint-N folders.

Arguments: `python training/report_generation.py --help` (or one JSON file with all of them).
"""

import contextlib
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from ..data.bags import pad_bags
from .common import (
    CommonTrainingArguments,
    EpochShuffleSampler,
    build_optimizer,
    cohort_splits,
    find_checkpoint,
    make_accelerator,
    no_zero3_init,
    push_to_hub,
    resumable_batches,
    write_eval_results,
    write_training_args,
)

logger = logging.getLogger(__name__)

TASK = "report-generation"


@dataclass
class ReportModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "An MStarForReportGeneration folder to continue training (its tokenizer too)."}
    )
    stage1_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A Stage 1 MStarModel (or MStarSlideAggregator) whose aggregator initialises ours."}
    )
    patch_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The MStarPatchModel that extracted the features; carried in the model so the folder "
                          "turns slide files into reports."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "A pretrained tokenizer; default: a byte-level BPE trained on the training reports."}
    )
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the trained tokenizer."})
    model_size: str = field(default="small", metadata={"help": "Aggregator preset (tiny, small, base) without Stage 1."})
    decoder_layers: int = field(default=3, metadata={"help": "Decoder (GPT-2 layout) layers; HistGen uses 3."})
    decoder_hidden_size: int = field(default=512)
    decoder_heads: int = field(default=8)
    region_size: int = field(default=96, metadata={"help": "Patches per region (HistGen: 96)."})
    region_pooling: str = field(default="attention", metadata={"help": "attention or mean."})
    num_region_layers: int = field(default=1)
    region_num_heads: int | None = field(default=None, metadata={"help": "Default: 8, or fewer to divide the width."})
    freeze_aggregator: bool = field(default=False, metadata={"help": "Keep the (Stage 1) aggregator fixed."})


@dataclass
class ReportDataArguments:
    manifest: str = field(default=None, metadata={"help": "Cohort manifest with features_path and report columns."})
    max_patches: int = field(default=4096, metadata={"help": "Patches sampled (or all, if fewer) per slide."})
    max_report_tokens: int = field(default=128, metadata={"help": "Report tokens per training target (incl. the end token)."})
    train_split: str = field(default="train", metadata={"help": "Training split(s), comma-separated."})
    eval_split: str = field(
        default="val", metadata={"help": "Held-out split(s) scored at the end, comma-separated (e.g. val,test); "
                                         "none in the manifest: no held-out evaluation."}
    )
    clean_reports: bool = field(default=True, metadata={
        "help": "Clean OCR'd reports before use (page headers, barcodes, UUIDs, redaction marks and OCR noise runs "
                "dropped; diagnosis sections first). See mstar_hf.data.report_cleaning."})
    max_eval_samples: int | None = field(default=None)


@dataclass
class ReportTrainingArguments(CommonTrainingArguments):
    learning_rate: float = field(default=1e-4)
    per_device_train_batch_size: int = field(default=4)
    per_device_eval_batch_size: int = field(default=4)
    num_beams: int = field(default=3, metadata={"help": "Beam size of the final evaluation (paper: 3)."})
    max_new_tokens: int = field(default=100, metadata={"help": "Longest generated report (paper: 100)."})


# ----- tokenizer -------------------------------------------------------------------------------------
def train_bpe_tokenizer(reports, vocab_size: int = 2048, min_frequency: int = 2, model_max_length: int = 1024):
    """A byte-level BPE tokenizer trained on reports (<pad>=0, <s>=1, </s>=2, <unk>=3). Byte-level BPE
    covers any text and decodes back to it exactly, which matters when outputs are scored as text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    reports = [r for r in reports if isinstance(r, str) and r.strip()]
    if not reports:
        raise ValueError("train_bpe_tokenizer: empty report list (no non-empty report to train on).")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(reports, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )


def special_token_ids(tokenizer) -> dict:
    """Start / end / pad ids of a tokenizer (BERT-style tokenizers: [CLS] starts, [SEP] ends)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if bos is None or eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no start (bos/cls) or end (eos/sep) token.")
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "decoder_start_token_id": bos}


# ----- data ------------------------------------------------------------------------------------------
def report_cases(dataset):
    """Rows with both a report and a features file (the others cannot be trained on)."""
    keep = [i for i, (r, f) in enumerate(zip(dataset["report"], dataset["features_path"])) if r and r.strip() and f]
    return dataset.select(keep)


def feature_width(dataset) -> int:
    import h5py

    for path in dataset["features_path"]:
        try:
            with h5py.File(path, "r") as handle:
                return int(handle["features"].shape[1])
        except (OSError, KeyError) as err:
            raise ValueError(f"{path}: not a readable features file ({err}).") from err
    raise ValueError("no case has a features file.")


class ReportFeatureDataset(torch.utils.data.Dataset):
    """(patch features, coords, report) of cohort rows; a slide's patch sample depends on (seed, epoch, index)."""

    def __init__(self, rows, feature_dim: int, max_patches: int | None, seed: int, cache_mb: int | None = None):
        from ..data.cache import DEFAULT_CACHE_MB, BoundedCache

        self.rows, self.feature_dim, self.max_patches, self.seed, self.epoch = rows, feature_dim, max_patches, seed, 0
        # feature files read again every epoch stay in memory up to the budget (same samples as uncached)
        self.cache = BoundedCache((DEFAULT_CACHE_MB if cache_mb is None else int(cache_mb)) * 2**20)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        from ..data.cache import read_slide_features_cached

        row = self.rows[int(index)]
        # only the process that holds the dataset fills the cache (workers restart every epoch)
        cache = self.cache if torch.utils.data.get_worker_info() is None else None
        features, coords = read_slide_features_cached(
            cache, row["features_path"], case_id=row["case_id"], expected_dim=self.feature_dim, max_patches=self.max_patches,
            rng=np.random.default_rng([self.seed, self.epoch, int(index)]), read_coords=True,
        )
        return {"case_id": row["case_id"], "patch_features": torch.from_numpy(features),
                "patch_coords": None if coords is None else torch.from_numpy(coords), "report": row["report"]}


class ReportCollator:
    """Pads a batch of slides (features, mask, coords) and tokenises the reports into labels."""

    def __init__(self, tokenizer, max_report_tokens: int, eos_token_id: int):
        self.tokenizer, self.max_report_tokens, self.eos_token_id = tokenizer, max_report_tokens, eos_token_id

    def __call__(self, items):
        from ..modeling.modeling_mstar_report import build_report_labels

        batch = pad_bags([it["patch_features"] for it in items], [it["patch_coords"] for it in items])
        batch["labels"] = build_report_labels(self.tokenizer, [it["report"] for it in items], self.max_report_tokens,
                                              self.eos_token_id)
        batch["case_id"] = [it["case_id"] for it in items]
        return batch


# ----- model -----------------------------------------------------------------------------------------
def build_tokenizer_and_model(model_args: ReportModelArguments, data_args: ReportDataArguments, train_reports, width: int,
                              checkpoint: Path | None = None):
    from transformers import AutoTokenizer, GPT2Config

    from ..modeling import MStarForReportGeneration, MStarPatchModel, MStarReportGenerationConfig
    from ..presets import aggregator_config

    if model_args.model_name_or_path:
        model = MStarForReportGeneration.from_pretrained(model_args.model_name_or_path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
        return tokenizer, model
    if checkpoint is not None and (checkpoint / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)  # resuming: the very tokenizer the weights were trained with
    elif model_args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
    else:
        tokenizer = train_bpe_tokenizer(train_reports, vocab_size=model_args.tokenizer_vocab_size)
    specials = special_token_ids(tokenizer)
    stage1 = None
    if model_args.stage1_model_name_or_path:
        from transformers import AutoModel

        stage1 = AutoModel.from_pretrained(model_args.stage1_model_name_or_path, dtype=torch.float32)
        agg_config = getattr(stage1, "aggregator", stage1).config
    else:
        agg_config = aggregator_config(model_args.model_size, input_dim=width)
    if agg_config.input_dim != width:
        raise ValueError(f"{data_args.manifest}: wrong feature width: the aggregator expects {agg_config.input_dim}-d "
                         f"patch features, the features files hold {width}-d ones.")
    heads = model_args.region_num_heads or math.gcd(8, agg_config.hidden_size)
    decoder = GPT2Config(
        n_layer=model_args.decoder_layers, n_embd=model_args.decoder_hidden_size, n_head=model_args.decoder_heads,
        vocab_size=len(tokenizer), n_positions=max(512, data_args.max_report_tokens + 1),
        bos_token_id=specials["bos_token_id"], eos_token_id=specials["eos_token_id"], pad_token_id=specials["pad_token_id"],
        add_cross_attention=True,
    )
    config = MStarReportGenerationConfig(
        aggregator_config=agg_config, text_config=decoder, region_size=model_args.region_size,
        region_pooling=model_args.region_pooling, num_region_layers=model_args.num_region_layers,
        region_num_heads=heads, **specials,
    )
    model = MStarForReportGeneration(config)
    if stage1 is not None:
        model.init_aggregator_from(stage1)
    if model_args.patch_model_name_or_path:
        model.attach_patch_model(MStarPatchModel.from_pretrained(model_args.patch_model_name_or_path, dtype=torch.float32))
    return tokenizer, model


# ----- evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def encode_slides(model, dataset, batch_size: int, device) -> torch.Tensor:
    """L2-normalised slide embeddings [n, H] of every row (the model's aggregator)."""
    embeds = []
    model.eval()
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = pad_bags([it["patch_features"] for it in items], [it["patch_coords"] for it in items])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.encoder(batch["patch_features"], batch["patch_attention_mask"], batch.get("patch_coords"))
        embeds.append(torch.nn.functional.normalize(out.slide_embeds.float(), dim=-1).cpu())
    return torch.cat(embeds)


@torch.no_grad()
def generate_reports(model, tokenizer, dataset, batch_size: int, device, quiet: bool = True, **generate_kwargs) -> list[str]:
    from tqdm.auto import tqdm

    texts = []
    model.eval()
    for start in tqdm(range(0, len(dataset), batch_size), desc="generating", disable=quiet):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = pad_bags([it["patch_features"] for it in items], [it["patch_coords"] for it in items])
        batch = {k: v.to(device) for k, v in batch.items()}
        sequences = model.generate(**batch, **generate_kwargs)
        texts.extend(t.strip() for t in tokenizer.batch_decode(sequences, skip_special_tokens=True))
    return texts


def token_mean_step(accelerator, model, optimizer, scheduler, loop, micro_batches: list[dict]) -> torch.Tensor:
    """One optimizer step over `micro_batches`, those of one accumulation cycle: the loss is the mean
    cross-entropy over every label token of the cycle on every process, as one process with the whole global
    batch computes it (a per-micro-batch mean would weigh a short report's tokens more in a batch of short
    reports, and a process with fewer tokens as much as one with many). Returns this process's share of the
    step's loss, whose mean over the processes is that token mean (`TrainingLoop.end_step` takes the mean).

    Like transformers' Trainer: the cycle is read before its first backward (the token count must be known),
    so the accumulation boundary is set here rather than by `accelerator.accumulate`, which would see the
    loader's end one micro-batch early."""
    from accelerate.utils import DistributedType

    world, cycle = accelerator.num_processes, accelerator.gradient_accumulation_steps
    local = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
    if world == 1 and len(micro_batches) == 1:
        total = None  # the batch's own token mean is exactly that; the plain mean keeps the numerics
    else:
        total = accelerator.reduce(torch.tensor(float(local), device=accelerator.device), reduction="sum")
    share = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        batch = {k: v for k, v in batch.items() if k != "case_id"}
        last = i == len(micro_batches) - 1
        accelerator.gradient_state._set_sync_gradients(last)
        no_sync = not last and accelerator.distributed_type != DistributedType.DEEPSPEED
        with accelerator.no_sync(model) if no_sync else contextlib.nullcontext():
            loss = model(**batch, num_items_in_batch=total).loss
            # accelerate divides by the accumulation steps and DDP / DeepSpeed average over the processes:
            # undone, the gradient is the global token sum's over `total`
            loop.backward_and_step(model, optimizer, scheduler, loss if total is None else loss * world * cycle)
        share = share + loss.detach() * (1 if total is None else world)
    return share


@torch.no_grad()
def eval_loss(model, loader, accelerator) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch.pop("case_id", None)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        out = model(**batch)
        tokens = int((batch["labels"] != -100).sum())
        total += float(out.loss) * tokens
        count += tokens
    model.train()
    return total / max(count, 1)


def evaluate(model, tokenizer, train_set, eval_set, args, device, window: int | None = None) -> dict:
    """Beam-search reports for the eval set, scored against the references, and the nearest-training-report
    baseline (nearest by cosine of the slide embeddings). With `window`, references and baseline reports
    are cut to their first `window` tokens, the span the model was trained to write. Returns both metric
    dicts and the predictions."""
    from ..evaluation.caption_metrics import compute_caption_metrics

    references = [row["report"] for row in eval_set.rows]
    generated = generate_reports(model, tokenizer, eval_set, args.per_device_eval_batch_size, device, quiet=args.quiet,
                                 num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    train_embeds = encode_slides(model, train_set, args.per_device_eval_batch_size, device)
    eval_embeds = encode_slides(model, eval_set, args.per_device_eval_batch_size, device)
    nearest = (eval_embeds @ train_embeds.T).argmax(dim=1).tolist()
    train_reports = [row["report"] for row in train_set.rows]
    train_ids = [row["case_id"] for row in train_set.rows]
    baseline = [train_reports[j] for j in nearest]
    if window is not None:
        references = token_window(tokenizer, references, window)
        baseline = token_window(tokenizer, baseline, window)
    predictions = [
        {"case_id": row["case_id"], "reference": ref, "generated": gen, "nearest_train_case": train_ids[j],
         "nearest_train_report": base}
        for row, ref, gen, j, base in zip(eval_set.rows, references, generated, nearest, baseline)
    ]
    return {
        "model": compute_caption_metrics(generated, references),
        "nearest_report_baseline": compute_caption_metrics(baseline, references),
        "predictions": predictions,
    }


def metrics_table(results: dict, num_beams: int = 3) -> str:
    from ..evaluation.caption_metrics import METRIC_NAMES

    decoding = "greedy" if num_beams == 1 else f"beam {num_beams}"
    lines = ["| | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
    for name, label in (("model", f"MStarForReportGeneration ({decoding})"),
                        ("nearest_report_baseline", "copy nearest training report")):
        lines.append(f"| {label} | " + " | ".join(f"{results[name][m]:.4f}" for m in METRIC_NAMES) + " |")
    return "\n".join(lines)


# ----- training --------------------------------------------------------------------------------------
def split_cases(cohort, data_args: ReportDataArguments, seed: int):
    """(train rows, eval rows, description), at case level (`common.cohort_splits`): no patient on both
    sides, and an empty eval split stays empty (no held-out evaluation) rather than borrowing training data."""
    train, evaluation, source = cohort_splits(cohort, data_args.train_split, data_args.eval_split, seed,
                                              data_args.manifest)
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(len(evaluation), data_args.max_eval_samples)))
    return train, evaluation, source


def token_window(tokenizer, texts, max_tokens: int) -> list[str]:
    """Each text cut to its first `max_tokens` tokens and decoded: the part of a report the model is
    trained to write. References and the copy-nearest baseline are scored on this same window (as
    HistGen-style evaluation does), not on full OCR'd reports the model never sees."""
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]


def run_report_generation(model_args: ReportModelArguments, data_args: ReportDataArguments,
                          args: ReportTrainingArguments) -> dict:
    """Trains and evaluates the report generator; returns the results dict (also written to disk)."""
    from ..data import load_cohort
    from ..data.report_cleaning import warn_report_truncation
    from ..modeling import MStarForReportGeneration
    from .loop import TrainingLoop, build_scheduler, checked_cohort, resolve_max_train_steps

    accelerator = make_accelerator(args, "mstar_report_generation")
    output_dir = Path(args.output_dir)
    cohort = report_cases(load_cohort(data_args.manifest, check_files=False, clean_reports=data_args.clean_reports))
    if len(cohort) == 0:
        raise ValueError(f"{data_args.manifest}: no case has both a report and a features file: nothing to train on.")
    train_rows, eval_rows, split_source = split_cases(cohort, data_args, args.seed)
    if len(train_rows) == 0:
        raise ValueError(f"{data_args.manifest}: the '{data_args.train_split}' split has no case with a report.")
    width = feature_width(train_rows)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)
    with no_zero3_init():
        tokenizer, model = build_tokenizer_and_model(model_args, data_args, list(train_rows["report"]), width, checkpoint)
    expected = model.config.aggregator_config.input_dim
    if expected != width:
        raise ValueError(f"{data_args.manifest}: wrong feature width: the aggregator expects {expected}-d features, "
                         f"the cohort's are {width}-d (features from another encoder?).")
    checks = dict(feature_dim=expected, need_features=True, need_report=True, progress=not args.quiet)
    train_rows = checked_cohort(accelerator, train_rows, manifest=data_args.manifest,
                                skip_bad_cases=args.skip_bad_cases, output_dir=args.output_dir, **checks)
    if len(eval_rows):
        eval_rows = checked_cohort(accelerator, eval_rows, manifest=data_args.manifest, skip_bad_cases=args.skip_bad_cases,
                                   output_dir=str(output_dir / "eval_check"), **checks)
    window = data_args.max_report_tokens - 1  # report tokens per target; the end token takes the last place
    warn_report_truncation(train_rows["report"], tokenizer, window, source=f"{data_args.manifest} (training reports)",
                           cleaned=data_args.clean_reports)
    if model.patch_model is not None:
        model.patch_model.requires_grad_(False)  # trained on precomputed features: the encoder is carried, not tuned
    if model_args.freeze_aggregator:
        model.encoder.aggregator.requires_grad_(False)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    eos = model.config.eos_token_id

    train_set = ReportFeatureDataset(train_rows, width, data_args.max_patches, args.seed)
    eval_set = ReportFeatureDataset(eval_rows, width, data_args.max_patches, args.seed)
    collate = ReportCollator(tokenizer, data_args.max_report_tokens, eos)
    sampler = EpochShuffleSampler(len(train_set), args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.per_device_train_batch_size, sampler=sampler,
                                               collate_fn=collate, num_workers=args.dataloader_num_workers)
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=args.per_device_eval_batch_size, collate_fn=collate)
    optimizer = build_optimizer(model, args)
    batches_per_process = math.ceil(math.ceil(len(train_set) / args.per_device_train_batch_size) / accelerator.num_processes)
    updates_per_epoch = max(1, batches_per_process // args.gradient_accumulation_steps)
    max_steps = resolve_max_train_steps(args.max_train_steps, args.num_train_epochs, updates_per_epoch)
    scheduler = build_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, max_steps,
                                accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    engine = type(model).__name__  # DeepSpeedEngine under `accelerate launch --use_deepspeed`

    def save_tokenizer(_models, _weights, folder):  # a resumed run reuses the checkpoint's tokenizer
        if accelerator.is_main_process:
            tokenizer.save_pretrained(folder)

    accelerator.register_save_state_pre_hook(save_tokenizer)
    loop = TrainingLoop(accelerator, args, "report generation", max_steps, updates_per_epoch)
    completed = loop.resume(str(checkpoint) if checkpoint is not None else "")

    model.train()
    history = []
    cycles = resumable_batches(accelerator, train_loader, train_set, completed, max_steps,
                               args.gradient_accumulation_steps, windows=True)
    for micro_batches in cycles:
        loss = token_mean_step(accelerator, model, optimizer, scheduler, loop, micro_batches)
        if not loop.end_step(loss=loss):
            continue
        history.append(loop.last["loss"])
        if args.eval_steps and loop.completed % args.eval_steps == 0 and len(eval_set):
            # teacher-forced loss on the eval split (cheap); the text metrics run once, at the end
            held_out = eval_loss(accelerator.unwrap_model(model), eval_loader, accelerator)
            if loop.loss_log is not None:
                loop.loss_log.log(loop.completed, eval_loss=held_out)
            if args.with_tracking:
                accelerator.log({"eval/loss": held_out}, step=loop.completed)
        if loop.done:
            break
    loop.finish("mSTAR report generation")

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    results = {"engine": engine, "steps": loop.completed, "max_train_steps": max_steps,
               "num_processes": accelerator.num_processes, "train_cases": len(train_set), "eval_cases": len(eval_set),
               "split_source": split_source, "scored_window_tokens": window,
               "first_losses": history[:5], "last_losses": history[-5:]}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        # the folder generates as it was evaluated (pipelines read generation_config.json)
        unwrapped.generation_config.num_beams = args.num_beams
        unwrapped.generation_config.max_new_tokens = args.max_new_tokens
        unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
        # always: AutoImageProcessor is registered for the model type, and a folder that carries no patch
        # encoder still documents the tiles its features were extracted from
        save_image_processor(model_args, output_dir)
        write_training_args(output_dir, model_args, data_args, args, extra={"task": TASK})
        evaluation = None
        if len(eval_set):
            # evaluate the saved folder: what users load is what gets scored (the model is already saved, so
            # a failure here never loses it)
            try:
                saved = MStarForReportGeneration.from_pretrained(output_dir, dtype=torch.float32).to(accelerator.device)
                evaluation = evaluate(saved, tokenizer, train_set, eval_set, args, accelerator.device, window)
            except Exception as err:  # noqa: BLE001
                logger.exception("held-out evaluation failed (the trained model is saved in %s)", output_dir)
                results["evaluation_error"] = f"{type(err).__name__}: {err}"
        if evaluation is not None:
            results.update({k: evaluation[k] for k in ("model", "nearest_report_baseline")})
            with open(output_dir / "eval_predictions.jsonl", "w") as handle:
                for row in evaluation["predictions"]:
                    handle.write(json.dumps(row) + "\n")
            dataset_name = Path(data_args.manifest).parent.name
            write_eval_results(output_dir, [
                {"task": TASK, "metric": metric.lower(), "name": f"{metric} ({who})", "value": values[metric],
                 "dataset": dataset_name, "split": data_args.eval_split}
                for who, values in (("model", results["model"]),
                                    ("nearest training report", results["nearest_report_baseline"]))
                for metric in values
            ])
            table = metrics_table(results, args.num_beams)
            (output_dir / "report_results.md").write_text(
                f"# Report generation on the '{data_args.eval_split}' split ({len(eval_set)} cases)\n\n"
                f"References and the baseline are scored on the training window (the first {window} tokens of each "
                f"cleaned report), the text the model is trained to write.\n\n{table}\n")
            accelerator.print(table)
        elif not len(eval_set):
            accelerator.print(f"no held-out set ({split_source}): metrics skipped")
        (output_dir / "report_results.json").write_text(json.dumps(results, indent=2))
        if args.push_to_hub:
            push_to_hub(output_dir, args, "mSTAR report generator")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def save_image_processor(model_args: ReportModelArguments, output_dir: Path):
    """The patch encoder's image processor, saved beside the model (ImageNet defaults when it has none)."""
    from transformers import AutoImageProcessor

    from ..modeling import MStarImageProcessor

    source = model_args.patch_model_name_or_path or model_args.model_name_or_path
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        processor = MStarImageProcessor()
    processor.save_pretrained(output_dir)


def main(argv=None) -> int:
    """`training/report_generation.py`: parses the flags (or one JSON file) and trains; results go to
    `report_results.json` (and are returned by `run_report_generation`)."""
    parser = HfArgumentParser((ReportModelArguments, ReportDataArguments, ReportTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    if not data_args.manifest:
        parser.error("--manifest is required")
    run_report_generation(model_args, data_args, training_args)
    return 0

