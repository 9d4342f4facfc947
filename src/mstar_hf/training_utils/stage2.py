"""mSTAR Stage 2: self-taught training of the patch encoder (in the style of transformers'
`examples/pytorch/*/run_*_no_trainer.py`).

The frozen Stage 1 aggregator teaches the patch encoder: every step samples a few slides and a few patches
of each, reads those tiles from the whole-slide images (DataLoader workers), embeds them with the EMA
encoder (the features overwrite the patches' rows of a per-slide memory that started as the Stage 1
feature files), re-embeds each sampled slide from its memory with the aggregator (whole-slide context) and
regresses the student's projected features onto the re-embedded ones, plus an EMA consistency term.
See `mstar_hf.training_utils.stage2` for the step and the mSTAR paper (arXiv 2407.15362, Methods) for the method.

    accelerate launch training/stage2.py \
        --stage1_model runs/stage1/final --manifest cohort/manifest.csv --output_dir runs/stage2 \
        --max_train_steps 2000 --slides_per_step 4 --per_device_train_batch_size 64 \
        --checkpointing_steps 200 --dataloader_num_workers 4

    # bf16 + DeepSpeed ZeRO-2 on 4 GPUs (ZeRO-3 with CPU offload: accelerate_zero3_offload.yaml)
    accelerate launch --config_file training/configs/accelerate_zero2.yaml training/stage2.py ... \
        --gradient_checkpointing

Outputs in `--output_dir`: checkpoint-N/ (save_state + the EMA weights and the memory bank under
stage2/), loss_log.jsonl, loss_curve.png, failures.csv (slides skipped and why), run_info.json,
stage2_results.json and eval_results.json (held-out student-teacher cosine before and after training),
patch_encoder/ (the new `MStarPatchModel` + image processor) and mstar_model/ (the Stage 1 `MStarModel`
with that patch encoder and the trained `patch_projection`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .common import (
    CommonTrainingArguments,
    build_optimizer,
    checkpoint_step,
    find_checkpoint,
    is_deepspeed,
    make_accelerator,
    no_zero3_init,
    push_to_hub,
    write_eval_results,
    write_training_args,
)
from .augment import HEAugment
from .loop import TrainingLoop, build_scheduler, resolve_max_train_steps
from .ema import EMAModel
from .memory_bank import DTYPES, PatchMemoryBank, bytes_per_patch
from .stage2_step import (
    LOSSES,
    TEACHER_TARGETS,
    MemoryTeacher,
    ReusableAutocast,
    Stage2Student,
    evaluate_student_teacher,
    fit_projection_to_teacher,
    resolve_no_grad_precision,
    stage2_forward,
)
from .stage2_data import (
    FAILURE_FIELDS,
    PatchListDataset,
    Stage2StepDataset,
    choose_eval_patches,
    make_loader,
    prepare_slides,
)

logger = logging.getLogger("mstar_stage2")

STATE_DIR = "stage2"  # inside a checkpoint: ema.safetensors and memory/
EMA_FILE = "ema.safetensors"


@dataclass
class Stage2Arguments:
    """Stage 2 inputs and method settings (the shared training flags are in `CommonTrainingArguments`)."""

    stage1_model: str = field(metadata={"help": "Stage 1 `MStarModel` folder (save_pretrained) or Hub id: its "
                                                "aggregator is the frozen teacher, its patch model the student's start."})
    manifest: str = field(metadata={"help": "Cohort manifest (slide_path and features_path per slide; the "
                                            "features h5 are the Stage 1 features, the memory's initial rows)."})
    image_processor: str | None = field(default=None, metadata={
        "help": "Image processor folder (default: the Stage 1 folder's, else MStarImageProcessor: 224, ImageNet)."})
    train_split: str = field(default="train", metadata={
        "aliases": ["--train_splits"],
        "help": "Comma-separated manifest splits to train on; 'all' = every slide not in --eval_split."})
    eval_split: str = field(default="val,test", metadata={
        "aliases": ["--eval_splits"],
        "help": "Splits whose slides give the held-out evaluation patches; without such slides, "
                "--eval_holdout_fraction of every training slide's patches is held out instead."})
    eval_holdout_fraction: float = field(default=0.1)
    max_eval_patches: int = field(default=512, metadata={"help": "Held-out patches evaluated (0: no evaluation)."})
    slides_per_step: int = field(default=4, metadata={"help": "Slides sampled per step and process."})
    patches_per_slide: int | None = field(default=None, metadata={
        "help": "Patches per sampled slide (default: per_device_train_batch_size // slides_per_step)."})
    context_size: int = field(default=4096, metadata={
        "help": "Most memory rows the aggregator sees per slide (always including the sampled ones); 0: all."})
    loss: str = field(default="cosine", metadata={"help": f"Student-teacher regression loss: {' | '.join(LOSSES)}."})
    center_targets: bool = field(default=False, metadata={
        "help": "Regress centred vectors: prediction and target minus a running mean of the targets (the "
                "aggregator's patch tokens share one direction that a plain cosine rewards a bias for). Changes "
                "only --loss cosine: smooth-L1 regresses the difference, which centring leaves as it is."})
    teacher_target: str = field(default="final", metadata={
        "help": f"The teacher's patch tokens the student regresses onto: {' | '.join(TEACHER_TARGETS)} ('final': after "
                "the aggregator's final LayerNorm, the paper's re-embedded feature; 'pre_norm': before it; "
                "'first_layer': after the first TransLayer, less slide context). On three demo cohorts (24 held-out "
                "cases each) few-shot k=1 gains +0.06 / +0.04 / +0.06 on average, within Stage 2's seed spread "
                "(bench/README.md)."})
    ema_consistency_weight: float = field(default=0.6, metadata={"help": "Weight of the EMA consistency term."})
    ema_momentum: float = field(default=0.996, metadata={"help": "EMA momentum (per optimizer step)."})
    no_grad_precision: str = field(default="auto", metadata={
        "help": "Precision of the no-grad branches (EMA forward, teacher re-embedding): fp32, bf16, fp16, or "
                "auto = the run's mixed precision if any, else bf16 where bf16 is fast (CUDA, CPUs with AMX), "
                "else fp32. The student always trains in the run's precision."})
    augment: bool = field(default=True, metadata={"help": "H&E augmentation: flips, 90-degree turns, colour jitter."})
    color_jitter: float = field(default=0.05, metadata={"help": "Max relative brightness/contrast/saturation change."})
    hue_jitter: float = field(default=0.02, metadata={"help": "Max hue shift (fraction of the hue circle)."})
    stain_jitter: float = field(default=0.0, metadata={
        "help": "H&E stain augmentation strength s: hematoxylin/eosin/DAB concentrations scaled by 1 + U(-s, s) "
                "(0: off; 0.05 light, 0.2 strong, as Tellez et al. 2018)."})
    init_projection: str = field(default="stage1", metadata={
        "help": "Start of the student's projection: 'stage1' (as the Stage 1 model holds it: a random init there, the "
                "paper's) or 'ridge' (the linear map of the initial features that best predicts the teacher's targets on "
                "the training slides, closed form). On the demo cohort (24 held-out cases) 'ridge' fits the teacher better "
                "(held-out patch retrieval@1 0.13 vs 0.05 after 80 steps); neither changes the encoder's few-shot "
                "prototypes by more than +0.01 (bench/README.md, Stage 2 variants)."})
    projection_fit_slides: int = field(default=256, metadata={"help": "Training slides used by --init_projection ridge."})
    projection_ridge: float = field(default=1e-3, metadata={
        "help": "Ridge strength for --init_projection ridge, relative to the mean feature variance."})
    memory_dir: str | None = field(default=None, metadata={"help": "Working memory bank (default output_dir/memory)."})
    memory_dtype: str = field(default="float32", metadata={"help": f"Memory storage: {' | '.join(DTYPES)}."})
    final_weights: str = field(default="student", metadata={"help": "Saved encoder: 'student' or its 'ema' copy."})
    hub_mstar_model_id: str | None = field(default=None, metadata={
        "help": "With --push_to_hub, also push mstar_model/ here (patch_encoder/ goes to --hub_model_id)."})


def parse_args(argv=None):
    from transformers import HfArgumentParser

    parser = HfArgumentParser((Stage2Arguments, CommonTrainingArguments))
    s2, args = parser.parse_args_into_dataclasses(args=argv)
    if s2.loss not in LOSSES:
        parser.error(f"--loss must be one of {LOSSES}, got {s2.loss!r}")
    if s2.teacher_target not in TEACHER_TARGETS:
        parser.error(f"--teacher_target must be one of {tuple(TEACHER_TARGETS)}, got {s2.teacher_target!r}")
    if s2.final_weights not in ("student", "ema"):
        parser.error(f"--final_weights must be 'student' or 'ema', got {s2.final_weights!r}")
    if s2.memory_dtype not in DTYPES:
        parser.error(f"--memory_dtype must be one of {DTYPES}, got {s2.memory_dtype!r}")
    if s2.no_grad_precision not in ("auto", "fp32", "bf16", "fp16"):
        parser.error(f"--no_grad_precision must be auto, fp32, bf16 or fp16, got {s2.no_grad_precision!r}")
    if s2.init_projection not in ("ridge", "stage1"):
        parser.error(f"--init_projection must be 'ridge' or 'stage1', got {s2.init_projection!r}")
    if s2.slides_per_step < 1:
        parser.error("--slides_per_step must be >= 1")
    if s2.patches_per_slide is None:
        s2.patches_per_slide = max(1, args.per_device_train_batch_size // s2.slides_per_step)
    return s2, args


# -- loading -----------------------------------------------------------------------------------------
def load_stage1(path: str):
    """The Stage 1 `MStarModel`, after checking that its aggregator reads what its patch encoder gives."""
    from ..modeling import MStarConfig, MStarModel

    where = Path(path) / "config.json" if Path(path).is_dir() else path
    try:
        config = MStarConfig.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"{where}: cannot load the Stage 1 model config ({e}).") from None
    patch_width = config.patch_config.hidden_size
    if patch_width is None:  # not stored: ask timm (a model with random weights, never downloaded)
        from ..modeling import MStarPatchModel

        patch_width = MStarPatchModel(config.patch_config).config.hidden_size
    if patch_width != config.aggregator_config.input_dim:
        raise ValueError(
            f"{where}: the Stage 1 aggregator takes {config.aggregator_config.input_dim}-d patch features but the "
            f"patch encoder gives {patch_width}-d ones; Stage 2 needs a patch encoder whose features the "
            f"aggregator reads (the encoder the Stage 1 features were extracted with)."
        )
    try:
        return MStarModel.from_pretrained(path, dtype=torch.float32)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_image_processor(path: str | None):
    from transformers import AutoImageProcessor

    from ..modeling import MStarImageProcessor

    if path is not None:
        try:
            return AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError):
            pass
    return MStarImageProcessor()


def cohort_records(manifest: str) -> list[dict]:
    from ..data import load_cohort

    ds = load_cohort(manifest, check_files=False)
    from ..data.cases import check_case_splits

    records = [{"case_id": r["case_id"], "slide_id": r["slide_id"], "slide_path": r.get("slide_path"),
                "features_path": r["features_path"], "split": r.get("split")} for r in ds]
    # one patient never on both sides (held-out patches come from the held-out splits' slides)
    splits = check_case_splits([r["case_id"] for r in records], [r["split"] for r in records],
                               source=f"manifest {manifest!r}")
    for record, split in zip(records, splits):
        record["split"] = split
    return records


def _split_set(value: str) -> set[str]:
    return {s.strip() for s in (value or "").split(",") if s.strip()}


def append_failures(path: Path, rows: list[dict]):
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, FAILURE_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def no_grad_autocast(accelerator, requested: str):
    """(autocast context or None, precision) for the no-grad branches (EMA forward, teacher); the
    student's own forward gets its precision from Accelerate / DeepSpeed."""
    precision = resolve_no_grad_precision(requested, str(accelerator.mixed_precision), accelerator.device)
    if precision == "fp32":
        return None, precision
    return ReusableAutocast(accelerator.device.type, precision), precision


# -- main --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    # the run sizes torch's compute threads to leave its readers their cores; a caller in the same process
    # (the demo, a notebook) gets its own thread count back
    threads = torch.get_num_threads()
    try:
        return _run(argv)
    finally:
        torch.set_num_threads(threads)


def _run(argv=None) -> int:
    s2, args = parse_args(argv)
    accelerator = make_accelerator(args, "mstar_stage2")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    from ..wsi.extraction import PatchTransform

    out = Path(args.output_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    resume = find_checkpoint(args.resume_from_checkpoint, args.output_dir)
    starting_step = checkpoint_step(resume) if resume is not None else 0

    # Models: the frozen teacher and the student's start. Built whole even under ZeRO-3: the teacher and
    # the EMA copy stay outside the engine, which partitions the student itself.
    with no_zero3_init():
        stage1 = load_stage1(s2.stage1_model)
    image_processor = load_image_processor(s2.image_processor or s2.stage1_model)
    width = stage1.aggregator.config.input_dim
    student = Stage2Student(stage1.patch_model, stage1.patch_projection, center_targets=s2.center_targets)
    if s2.center_targets and s2.loss == "smooth_l1":
        logger.warning("--center_targets true does not change --loss smooth_l1 (it regresses the difference, "
                       "which centring leaves as it is); it only changes a cosine")
    aggregator = stage1.aggregator
    del stage1  # the text and RNA encoders are not needed

    # The memory bank: seeded from the feature files, or the checkpoint's copy when resuming.
    memory_dir = Path(s2.memory_dir) if s2.memory_dir else out / "memory"
    failures_csv = out / "failures.csv"
    if accelerator.is_main_process:
        if resume is not None:
            PatchMemoryBank.restore(resume / STATE_DIR / "memory", memory_dir)
            logger.info("resuming from %s (step %d): memory bank restored into %s", resume, starting_step, memory_dir)
        else:
            usable, failures = prepare_slides(cohort_records(s2.manifest), width, progress=not args.quiet)
            failures_csv.unlink(missing_ok=True)
            append_failures(failures_csv, failures)
            if failures and not args.skip_bad_cases:
                listed = "\n".join(f"  {row['reason']}" for row in failures[:50])  # reasons name their files
                raise SystemExit(f"{s2.manifest}: {len(failures)} bad slide(s), nothing was trained (fix them, or pass "
                                 f"--skip_bad_cases true to leave them out; all are listed in {failures_csv}):\n{listed}")
            for row in failures:
                logger.warning("skipping slide: %s", row["reason"])
            if not usable:
                raise SystemExit(f"{s2.manifest}: no usable slide for Stage 2 (see {failures_csv}).")
            PatchMemoryBank.build(memory_dir, usable, dtype=s2.memory_dtype,
                                  progress=not args.quiet)
    accelerator.wait_for_everyone()
    memory = PatchMemoryBank(memory_dir)
    per_10k = bytes_per_patch(memory.dim, memory.dtype) * 10_000 / 2**20
    logger.info("memory bank: %d slides, %d patches, %.1f MiB on disk (%.2f MiB per 10k patches)",
                len(memory), memory.num_rows, memory.nbytes / 2**20, per_10k)

    # Which slides train, which give held-out patches; each process owns a disjoint set of training slides.
    eval_split_names = _split_set(s2.eval_split)
    train_split_names = _split_set(s2.train_split)
    eval_slides = [i for i, s in enumerate(memory.slides) if s.split in eval_split_names]
    if not train_split_names or train_split_names == {"all"}:
        train_slides = [i for i, s in enumerate(memory.slides) if s.split not in eval_split_names]
    else:
        train_slides = [i for i, s in enumerate(memory.slides) if s.split in train_split_names]
    if not train_slides:
        raise SystemExit(f"{s2.manifest}: no usable slide in the training splits {sorted(train_split_names)}.")
    my_slides = train_slides[rank::world]
    if not my_slides:
        raise SystemExit(f"{world} processes but only {len(train_slides)} training slides: each process needs one.")
    held = choose_eval_patches(memory.slides, eval_slides, train_slides, s2.max_eval_patches, s2.eval_holdout_fraction,
                               args.seed, max_per_slide=s2.context_size // 2 if s2.context_size > 0 else None)
    eval_source = (f"slides of splits {sorted(eval_split_names)}" if eval_slides
                   else f"{s2.eval_holdout_fraction:g} of the training slides' patches (never trained on)")

    # The projection starts fitted to the teacher (a resumed run gets its trained one from the checkpoint).
    aggregator.to(device)
    projection_fit = None
    if resume is None and s2.init_projection == "ridge":
        projection_fit = fit_projection_to_teacher(student.patch_projection, aggregator, memory, train_slides,
                                                   s2.context_size, s2.projection_ridge, s2.projection_fit_slides,
                                                   args.seed, device, target=s2.teacher_target)
        logger.info("projection fitted to the teacher on %d patches of %d training slides: R^2 %.3f",
                    projection_fit["patches"], projection_fit["slides"], projection_fit["r2"])
    # Student, EMA (copied before checkpointing is switched on: it never runs backward), optimizer.
    ema = EMAModel(student.patch_model, s2.ema_momentum)
    if args.gradient_checkpointing:
        enable = getattr(student.patch_model, "activation_checkpointing_enable", None) or \
            student.patch_model.gradient_checkpointing_enable
        enable()
    optimizer = build_optimizer(student, args)
    # an epoch: every training slide sampled once (per process: its own slides, slides_per_step at a time)
    updates_per_epoch = max(1, math.ceil(len(my_slides) / s2.slides_per_step) // args.gradient_accumulation_steps)
    max_steps = resolve_max_train_steps(args.max_train_steps, args.num_train_epochs, updates_per_epoch)
    scheduler = build_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, max_steps, world)
    images_per_step = s2.slides_per_step * s2.patches_per_slide
    if is_deepspeed(accelerator):
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = images_per_step  # no prepared DataLoader tells it
    model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    ema.to(device)
    aggregator.to(device)
    teacher = MemoryTeacher(aggregator, memory, s2.context_size, args.seed, target=s2.teacher_target)
    autocast, no_grad_precision = no_grad_autocast(accelerator, s2.no_grad_precision)

    engine = f"{type(model).__module__}.{type(model).__name__}"
    is_ds_engine = False
    if is_deepspeed(accelerator):
        import deepspeed

        is_ds_engine = isinstance(model, deepspeed.DeepSpeedEngine)
        logger.info("student wrapped by %s (DeepSpeedEngine: %s, ZeRO stage %s)", engine, is_ds_engine,
                    model.zero_optimization_stage() if is_ds_engine else None)
    if accelerator.is_main_process:
        (out / "run_info.json").write_text(json.dumps({
            "engine": engine, "is_deepspeed_engine": is_ds_engine,
            "zero_stage": model.zero_optimization_stage() if is_ds_engine else None,
            "num_processes": world, "mixed_precision": str(accelerator.mixed_precision), "device": str(device),
            "memory_slides": len(memory), "memory_patches": memory.num_rows, "memory_mib_per_10k_patches": per_10k,
            "train_slides": len(train_slides), "eval_patches": held.num_patches, "eval_source": eval_source,
            "images_per_step": images_per_step, "no_grad_precision": no_grad_precision,
            "projection_init": s2.init_projection if resume is None else "checkpoint",
            "projection_fit": projection_fit,
        }, indent=2))
        write_training_args(out, s2, args)

    # The EMA weights and the memory travel inside every checkpoint (written before it is renamed final).
    def save_stage2_state(_models, _weights, output_dir):
        if accelerator.is_main_process:
            state = Path(output_dir) / STATE_DIR
            state.mkdir(parents=True, exist_ok=True)
            ema.save(state / EMA_FILE)
            memory.save_to(state / "memory")

    accelerator.register_save_state_pre_hook(save_stage2_state)
    loop = TrainingLoop(accelerator, args, "stage 2", max_steps, updates_per_epoch)
    loop.resume(str(resume) if resume is not None else "")
    if resume is not None:
        ema.load(resume / STATE_DIR / EMA_FILE)

    # Tiles: workers read, resize (and augment); on CPU they also normalise, on a GPU the device does.
    transform = PatchTransform(image_processor)
    normalize_in_workers = device.type == "cpu"
    if device.type == "cpu" and args.dataloader_num_workers > 0:
        # as in feature extraction: leave the readers their cores, or they stall the compute threads
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world - args.dataloader_num_workers))
    augment = HEAugment(color_jitter=s2.color_jitter, hue_jitter=s2.hue_jitter, stain_jitter=s2.stain_jitter) if s2.augment else None
    ga = args.gradient_accumulation_steps

    def to_device(batch):
        x = batch["pixel_values"].to(device, non_blocking=True)
        if not normalize_in_workers:
            x = transform.normalize(x)
        return {**batch, "pixel_values": x}

    def evaluate() -> float:
        # Every process evaluates all held-out patches (a few hundred): under ZeRO-3 each forward is a
        # collective, so all processes must run the same batches; the result is the same everywhere.
        dataset = PatchListDataset(memory_dir, memory.slides, held.items, transform, normalize_in_workers)
        loader = make_loader(dataset, min(args.dataloader_num_workers, len(dataset)), device.type == "cuda")
        model.eval()
        sums = evaluate_student_teacher(model, teacher, loader, device, prepare=lambda b: to_device(b)["pixel_values"],
                                        autocast=autocast)
        model.train()
        return sums["cosine_sum"] / sums["count"] if sums["count"] else float("nan")

    before_path = out / "eval_before.json"
    cos_before = None
    if held.num_patches:
        if resume is not None:  # measured at the start of the first run; unknown if it was not
            if before_path.is_file():
                cos_before = json.loads(before_path.read_text())["heldout_cosine"]
            else:
                logger.warning("%s missing: the held-out cosine before training is unknown", before_path)
        else:
            cos_before = evaluate()
            if accelerator.is_main_process:
                before_path.write_text(json.dumps({"heldout_cosine": cos_before, "patches": held.num_patches}))
        if cos_before is not None:
            logger.info("held-out student-teacher cosine before training: %.4f (%d patches, %s)", cos_before,
                        held.num_patches, eval_source)

    dataset = Stage2StepDataset(memory_dir, memory.slides, my_slides, s2.slides_per_step, s2.patches_per_slide,
                                num_items=max_steps * ga, transform=transform,
                                normalize=normalize_in_workers, augment=augment, seed=args.seed, rank=rank,
                                heldout=held.heldout)
    loader = make_loader(dataset, args.dataloader_num_workers, device.type == "cuda",
                         sampler=range(starting_step * ga, max_steps * ga))

    logger.info("training: steps %d -> %d, %d slides x %d patches per step and process, %d processes, "
                "%d training slides", starting_step, max_steps, s2.slides_per_step, s2.patches_per_slide,
                world, len(train_slides))
    seen_failures: set[str] = set()
    sums = {"loss": 0.0, "distill_loss": 0.0, "consistency_loss": 0.0}
    model.train()
    for batch in loader:
        new = [(p, r) for p, r in batch["failed"] if p not in seen_failures]
        if new:
            seen_failures.update(p for p, _ in new)
            append_failures(failures_csv, [{"slide": p, "features": "", "error": "SlideError", "reason": r}
                                           for p, r in new])
            for _, r in new:
                logger.warning("slide failed during training, skipped from now on: %s", r)
        batch = to_device(batch)
        with accelerator.accumulate(model):
            outputs = stage2_forward(model, ema, teacher, batch, s2.loss, s2.ema_consistency_weight, autocast, device)
            loop.backward_and_step(model, optimizer, scheduler, outputs.loss)
        for key in sums:
            sums[key] += float(getattr(outputs, key).detach()) / ga
        if accelerator.sync_gradients:
            # the EMA follows the student's new weights before the step's checkpoint is written
            ema.update(accelerator.unwrap_model(model).patch_model)
        if not loop.end_step(**sums):
            continue
        sums = dict.fromkeys(sums, 0.0)
        step = loop.completed
        if args.eval_steps and step % args.eval_steps == 0 and not loop.done and held.num_patches:
            cos = evaluate()
            logger.info("step %d: held-out student-teacher cosine %.4f", step, cos)
            if args.with_tracking:
                accelerator.log({"eval/heldout_cosine": cos}, step=step)
        if loop.done:
            break
    step = loop.completed
    png = loop.finish("mSTAR Stage 2 training loss")

    # Final models first (the new patch encoder, and the Stage 1 model carrying it), so that a failure in
    # the evaluation below never loses them.
    results = {"steps": step, "max_train_steps": max_steps, "loss": s2.loss, "teacher_target": s2.teacher_target,
               "heldout_patches": held.num_patches, "heldout_source": eval_source}
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 partitions; every process takes part
    if accelerator.is_main_process:
        with no_zero3_init():
            save_final(s2, args, state, ema, image_processor, out)
        if png:
            logger.info("loss curve: %s", png)

    # Evaluation after training, before vs after.
    if held.num_patches:
        try:
            cos_after = evaluate()
            results.update(heldout_cosine_before=cos_before, heldout_cosine_after=cos_after)
            before_text = "unknown" if cos_before is None else f"{cos_before:.4f}"
            accelerator.print(f"held-out student-teacher cosine: before {before_text} -> after {cos_after:.4f} "
                              f"({held.num_patches} patches, {eval_source})")
            if args.with_tracking:
                accelerator.log({"eval/heldout_cosine": cos_after}, step=step)
        except Exception as err:  # noqa: BLE001 - the models are saved; record the failed evaluation
            logger.exception("held-out evaluation failed (the trained models are saved in %s)", out)
            results["evaluation_error"] = f"{type(err).__name__}: {err}"
    if accelerator.is_main_process:
        write_stage2_evals(s2, results, out)
        (out / "stage2_results.json").write_text(json.dumps(results, indent=2))
        if args.push_to_hub:
            push_to_hub(out / "patch_encoder", args, commit_message=f"mSTAR Stage 2 patch encoder, step {step}")
            if s2.hub_mstar_model_id:
                from ..hub import push_folder

                push_folder(out / "mstar_model", s2.hub_mstar_model_id, private=args.hub_private_repo,
                            commit_message=f"mSTAR with the Stage 2 patch encoder, step {step}",
                            token=args.hub_token)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def write_stage2_evals(s2: Stage2Arguments, results: dict, out: Path):
    """eval_results.json (the cards' model-index) in the run folder and both model folders."""
    evals = []
    for when in [w for w in ("before", "after") if results.get(f"heldout_cosine_{w}") is not None]:
        evals.append({"task": "stage2-self-taught-distillation", "metric": "cosine",
                      "name": f"held-out student-teacher cosine ({when} Stage 2)",
                      "value": float(results[f"heldout_cosine_{when}"]), "dataset": Path(s2.manifest).parent.name,
                      "split": s2.eval_split if results.get("heldout_source", "").startswith("slides") else "held-out patches"})
    for folder in (out, out / "patch_encoder", out / "mstar_model"):
        if folder.is_dir():
            write_eval_results(folder, evals)


def save_final(s2: Stage2Arguments, args: CommonTrainingArguments, state: dict, ema: EMAModel, image_processor,
               out: Path):
    from ..modeling import MStarPatchModel

    patch_state = {k[len("patch_model."):]: v.float() for k, v in state.items() if k.startswith("patch_model.")}
    proj_state = {k[len("patch_projection."):]: v.float() for k, v in state.items() if k.startswith("patch_projection.")}
    if s2.final_weights == "ema":
        patch_state = {k: v.cpu() for k, v in ema.state_dict().items()}

    mstar = load_stage1(s2.stage1_model)
    mstar.patch_model.load_state_dict(patch_state, strict=True)
    mstar.patch_projection.load_state_dict(proj_state, strict=True)
    patch_model: MStarPatchModel = mstar.patch_model

    for folder, model in (("patch_encoder", patch_model), ("mstar_model", mstar)):
        target = out / folder
        model.save_pretrained(target)
        image_processor.save_pretrained(target)
        write_training_args(target, s2, args, extra={"stage": 2})
    try:  # the Stage 1 folder's full processor (tokenizer, gene vocabulary), when it has one
        from transformers import AutoProcessor

        AutoProcessor.from_pretrained(s2.stage1_model).save_pretrained(out / "mstar_model")
    except Exception:  # noqa: BLE001 - a Stage 1 folder without a processor keeps just the image processor
        pass
    logger.info("saved %s and %s", out / "patch_encoder", out / "mstar_model")

