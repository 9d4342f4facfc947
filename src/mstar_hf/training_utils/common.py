"""Pieces every `training/*.py` script shares, in the style of transformers' `run_*_no_trainer.py`:
common arguments, the `Accelerator`, checkpoints with `save_state` + resume, the loss log and its
PNG, `training_args.json`, and `--push_to_hub`.
"""

import contextlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class CommonTrainingArguments:
    """Arguments shared by the training scripts (HfArgumentParser turns each field into a flag)."""

    output_dir: str = field(metadata={"help": "Where checkpoints, logs and the final model go."})
    seed: int = field(default=0, metadata={"help": "Seed of every random choice (data order, sampling, init)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.999)
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 disables)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs to train for (--max_train_steps overrides)."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps to train for; overrides --num_train_epochs when given."})
    per_device_train_batch_size: int = field(default=8)
    per_device_eval_batch_size: int = field(default=16)
    gradient_accumulation_steps: int = field(default=1)
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    num_warmup_steps: int = field(default=0)
    checkpointing_steps: str | None = field(default=None, metadata={
        "help": "save_state every N optimizer steps, or 'epoch' at every epoch end; a checkpoint is always written "
                "at the end of training (0 / unset: only that one)."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint-N folder, or 'latest' for the newest under output_dir."}
    )
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: only at the end)."})
    logging_steps: int = field(default=1)
    with_tracking: bool = field(default=True, metadata={"help": "Log to the trackers in report_to."})
    report_to: str = field(default="tensorboard", metadata={"help": "Accelerate tracker(s): tensorboard, wandb, all."})
    gradient_checkpointing: bool = field(default=False)
    dataloader_num_workers: int = field(default=0)
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final model folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id for --push_to_hub."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token for --push_to_hub (default: HF_TOKEN / login)."})
    hub_private_repo: bool = field(default=False)
    skip_bad_cases: bool = field(default=False, metadata={
        "help": "Cases that fail the check before training (unreadable/NaN features, wrong width, bad RNA, empty "
                "report) are left out and listed in output_dir/failures.csv, instead of stopping the run."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars."})


def make_accelerator(args: CommonTrainingArguments, project_name: str):
    """An `Accelerator` with trackers under `output_dir/runs`; DeepSpeed/mixed precision come from
    `accelerate launch` (or its config file), as in the transformers examples."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "runs"))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_config=project,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        # each process would train alone and all would write the same files as "main"
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE) but Accelerate set up no process group, so each would "
            "train alone. On machines without GPUs use `accelerate launch --cpu ...` or set ACCELERATE_USE_CPU=1 "
            "(torchrun), which selects the gloo backend.")
    set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if args.with_tracking:
        config = {k: v for k, v in asdict(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(project_name, config)
    return accelerator


@contextlib.contextmanager
def no_zero3_init():
    """Models built inside are whole, not partitioned by `deepspeed.zero.Init`: under ZeRO-3 transformers
    partitions every `from_pretrained` while the run's DeepSpeed config is registered, which breaks loading
    sub-models into a composite one; the engine partitions the trained model itself at `prepare`."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def is_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def find_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> Path | None:
    """Resolves `--resume_from_checkpoint` ('latest' picks the highest checkpoint-N in output_dir)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = sorted(
            (int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*") if (m := CHECKPOINT_PATTERN.match(p.name))
        )
        if not found:
            logger.warning("no checkpoint under %s: starting from scratch", output_dir)
            return None
        return found[-1][1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such checkpoint folder.")
    return path


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at (its trainer_state.json, else its name)."""
    state = path / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text())["step"])
    match = CHECKPOINT_PATTERN.match(path.name)
    if not match:
        raise ValueError(f"{path}: not a checkpoint-N folder and no trainer_state.json.")
    return int(match.group(1))


def save_checkpoint(accelerator, output_dir: str, step: int, extra: dict | None = None) -> Path:
    """`accelerator.save_state` into checkpoint-{step}, written under a temporary name and renamed when
    complete, so a kill mid-save never leaves a checkpoint that looks whole."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # before the other ranks write their RNG states into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # every rank writes its own RNG state into tmp: none may still be writing when the main process renames it
    # (a late rank would recreate tmp and lose its state, or crash on the vanished folder)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


class LossLog:
    """Per-step losses in `output_dir/loss_log.jsonl` (append-only, so resumed runs continue it) and a
    PNG of the curves."""

    def __init__(self, output_dir: str, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(output_dir) / "loss_log.jsonl"
        self.enabled = enabled
        if enabled and resume_step is not None and self.path.is_file():
            # drop records past the checkpoint: they are about to be recomputed
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif enabled and resume_step is None and self.path.is_file():
            self.path.unlink()

    def log(self, step: int, **values):
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def plot(self, png_path: str | Path, title: str = "training loss") -> Path | None:
        records = self.records()
        if not self.enabled or not records:
            return None
        return plot_curves(records, png_path, title)


def plot_curves(records: list[dict], png_path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k in r if k not in ("step", "lr")})  # the learning rate has its own scale
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points), label=key, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def write_training_args(output_dir: str | Path, *arg_objects, extra: dict | None = None) -> Path:
    """`training_args.json` (read by the model card renderer)."""
    merged = {}
    for obj in arg_objects:
        merged.update({k: v for k, v in asdict(obj).items() if "token" not in k.lower()})
    merged.update(extra or {})
    path = Path(output_dir) / "training_args.json"
    path.write_text(json.dumps(merged, indent=2, default=str))
    return path


def write_eval_results(output_dir: str | Path, results: list[dict]) -> Path:
    """`eval_results.json`: [{"task", "metric", "name", "value", "dataset"}], for the card's model-index."""
    path = Path(output_dir) / "eval_results.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def push_to_hub(folder: str | Path, args: CommonTrainingArguments, commit_message: str):
    from ..hub import push_folder

    if not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/mstar-stage1).")
    return push_folder(folder, args.hub_model_id, private=args.hub_private_repo, commit_message=commit_message,
                       token=getattr(args, "hub_token", None))


def build_optimizer(model, args: CommonTrainingArguments, params=None):
    """AdamW without decay on biases and norms (the usual transformers grouping)."""
    import torch

    named = [(n, p) for n, p in (params if params is not None else model.named_parameters()) if p.requires_grad]
    no_decay = [p for n, p in named if p.ndim < 2 or "norm" in n.lower() or n.endswith("logit_scale")]
    decay = [p for n, p in named if not (p.ndim < 2 or "norm" in n.lower() or n.endswith("logit_scale"))]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: the same update to the bit as the per-tensor loop (CPU's default), 30% faster for many small tensors
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), foreach=True)


def split_names(value: str | None) -> list[str]:
    """'val,test' -> ['val', 'test'] (one spelling for every --train_split / --eval_split flag)."""
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def cohort_splits(cohort, train_split: str, eval_split: str | None, seed: int, manifest: str,
                  holdout_fraction: float = 0.15):
    """(train, held-out, description) of a cohort, always at case level: with a `split` column, its values
    (checked so that no patient has slides on two sides); without one, `holdout_fraction` of the cases
    (never of the slides) are held out. The held-out part may be empty ("no held-out set"): it never
    falls back to training data."""
    import numpy as np

    from ..data.cases import check_case_splits

    case_ids = [str(c) for c in cohort["case_id"]]
    splits = list(cohort["split"]) if "split" in cohort.column_names else [None] * len(case_ids)
    train_names, eval_names = set(split_names(train_split)), set(split_names(eval_split))
    if train_names & eval_names:
        raise ValueError(f"--train_split and --eval_split share {sorted(train_names & eval_names)}.")
    if any(s is not None for s in splits):
        splits = check_case_splits(case_ids, splits, source=f"manifest {manifest!r}")
        train_rows = [i for i, s in enumerate(splits) if s in train_names]
        eval_rows = [i for i, s in enumerate(splits) if s in eval_names]
        source = f"manifest splits: train = {sorted(train_names)}, held out = {sorted(eval_names) or 'none'}"
    else:
        cases = sorted(set(case_ids))
        rng = np.random.default_rng(seed)
        held = set(rng.permutation(cases)[: int(round(holdout_fraction * len(cases)))].tolist()) if eval_names else set()
        train_rows = [i for i, c in enumerate(case_ids) if c not in held]
        eval_rows = [i for i, c in enumerate(case_ids) if c in held]
        source = f"no split column: {len(held)} of {len(cases)} cases held out at random (seed {seed})"
    if not train_rows:
        raise ValueError(f"{manifest}: the training split {sorted(train_names)} has no case.")
    return cohort.select(train_rows), cohort.select(eval_rows), source


class EpochShuffleSampler:
    """A permutation that depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self):
        return self.length


def resumable_batches(accelerator, train_loader, dataset, completed: int, max_train_steps: int,
                      gradient_accumulation_steps: int = 1, windows: bool = False):
    """Training batches from optimizer step `completed` on, epoch after epoch, until an epoch ends at or past
    `max_train_steps` (the caller counts steps and stops mid-epoch). Each epoch re-seeds the sampler and the
    dataset's draws (`set_epoch`); a resumed run skips the batches its interrupted epoch already used, so it
    sees exactly what an uninterrupted run would. `windows`: lists of the micro-batches of one optimizer step
    instead (`gradient_accumulation_steps` of them, fewer at an epoch's end, where accelerate also steps)."""
    steps_per_epoch = math.ceil(len(train_loader) / gradient_accumulation_steps)
    while completed < max_train_steps:
        epoch = completed // steps_per_epoch
        train_loader.set_epoch(epoch)
        dataset.set_epoch(epoch)
        skip = (completed % steps_per_epoch) * gradient_accumulation_steps
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        if not windows:
            yield from batches
        else:
            window = []
            for batch in batches:
                window.append(batch)
                if len(window) == gradient_accumulation_steps:
                    yield window
                    window = []
            if window:
                yield window
        completed = (epoch + 1) * steps_per_epoch


__all__ = [
    "CommonTrainingArguments",
    "EpochShuffleSampler",
    "LossLog",
    "build_optimizer",
    "checkpoint_step",
    "cohort_splits",
    "find_checkpoint",
    "is_deepspeed",
    "make_accelerator",
    "no_zero3_init",
    "plot_curves",
    "push_to_hub",
    "resumable_batches",
    "save_checkpoint",
    "split_names",
    "write_eval_results",
    "write_training_args",
]
