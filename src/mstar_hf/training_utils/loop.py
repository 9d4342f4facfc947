"""The one optimizer-step loop every training entry point uses (Stage 1, Stage 2, report generation, MIL
fine-tuning): schedule sizing, gradient accumulation, clipping, loss logging and tracking, checkpoints
every N steps / every epoch / at the end, resume, and the progress bar.

Why one helper: a prepared scheduler steps once per process (Accelerate), so it must be built for
`max_train_steps * num_processes` steps, or a cosine schedule on 4 GPUs reaches 0 after a quarter of
training; four hand-written loops had drifted apart on exactly that.
"""

from __future__ import annotations

import math
from pathlib import Path

from .common import LossLog, checkpoint_step, find_checkpoint, save_checkpoint


def parse_checkpointing_steps(value) -> int | str | None:
    """`--checkpointing_steps`: N (every N optimizer steps), 'epoch', or 0 / '' / 'none' (only the final
    checkpoint at the end of training)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("", "0", "none", "no", "end"):
        return None
    if text == "epoch":
        return "epoch"
    if text.isdigit():
        return int(text)
    raise ValueError(f"--checkpointing_steps must be a number of steps, 'epoch' or 0, got {value!r}.")


def resolve_max_train_steps(max_train_steps: int | None, num_train_epochs: float | None,
                            updates_per_epoch: int | None) -> int:
    """Optimizer steps to run: `--max_train_steps` when given, else `--num_train_epochs` epochs of
    `updates_per_epoch` optimizer steps (per process, after `accelerator.prepare`), as the transformers
    examples compute it."""
    if max_train_steps:
        return int(max_train_steps)
    if not num_train_epochs or not updates_per_epoch:
        raise ValueError("give --max_train_steps, or --num_train_epochs with a training set that has batches.")
    return max(1, math.ceil(num_train_epochs * updates_per_epoch))


def build_scheduler(name: str, optimizer, num_warmup_steps: int, max_train_steps: int, num_processes: int):
    """A transformers scheduler sized for the prepared (per-process) stepping: Accelerate steps it
    `num_processes` times per optimizer step, so every length is multiplied by the process count and the
    learning rate after k steps is the same on 1 or N processes."""
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes)


def optimizer_step(accelerator, model, optimizer, scheduler, loss, max_grad_norm: float | None = None):
    """Backward; at the end of an accumulation cycle clip the gradients; optimizer and scheduler step (the
    prepared ones skip while gradients accumulate). Call inside `accelerator.accumulate(model)`."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm and max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


class TrainingLoop:
    """Bookkeeping around optimizer steps, shared by the training entry points.

        loop = TrainingLoop(accelerator, args, "stage 1", max_train_steps, updates_per_epoch)
        model, optimizer, loader, scheduler = accelerator.prepare(...)
        loop.resume()                                   # --resume_from_checkpoint
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                loop.backward_and_step(model, optimizer, scheduler, loss)
            if loop.end_step(loss=loss):                # True once an optimizer step completed
                ...                                     # evaluation
            if loop.done:
                break
        loop.finish()                                   # final checkpoint, loss curve

    `end_step` reduces the logged values over processes (mean), writes `loss_log.jsonl` (with the
    learning rate), logs to the trackers, updates the progress bar and writes `checkpoint-N` every
    `--checkpointing_steps` N or at each epoch end ('epoch'). `finish` always writes the final checkpoint.
    """

    def __init__(self, accelerator, args, name: str, max_train_steps: int, updates_per_epoch: int | None = None,
                 output_dir: str | None = None, log_file: bool = True):
        self.accelerator = accelerator
        self.args = args
        self.name = name
        self.max_train_steps = int(max_train_steps)
        self.updates_per_epoch = updates_per_epoch
        self.output_dir = str(output_dir or args.output_dir)
        self.every = parse_checkpointing_steps(getattr(args, "checkpointing_steps", None))
        self.completed = 0
        self.resumed_from: Path | None = None
        self.scheduler = None
        self._log_file = log_file
        self.loss_log: LossLog | None = None
        self.progress = None
        self._last_checkpoint = -1

    # -- start -------------------------------------------------------------------------------------
    def resume(self, path: str | None = None) -> int:
        """Loads `--resume_from_checkpoint` ('latest' or a folder) into the prepared objects; returns the
        optimizer step to continue from (0 for a fresh run). Opens the loss log and the progress bar."""
        checkpoint = find_checkpoint(path if path is not None else self.args.resume_from_checkpoint, self.output_dir)
        if checkpoint is not None:
            self.accelerator.print(f"resuming from {checkpoint}")
            self.accelerator.load_state(str(checkpoint))
            self.completed = checkpoint_step(checkpoint)
            self.resumed_from = checkpoint
            self._last_checkpoint = self.completed
        self.loss_log = LossLog(self.output_dir, enabled=self._log_file and self.accelerator.is_main_process,
                                resume_step=self.completed if checkpoint is not None else None)
        from tqdm.auto import tqdm

        self.progress = tqdm(total=self.max_train_steps, initial=self.completed, desc=self.name, unit="step",
                             disable=getattr(self.args, "quiet", False) or not self.accelerator.is_local_main_process,
                             dynamic_ncols=True)
        return self.completed

    # -- each step ---------------------------------------------------------------------------------
    def backward_and_step(self, model, optimizer, scheduler, loss, max_grad_norm: float | None = None):
        """Backward, clipping at the end of an accumulation cycle, optimizer and scheduler step (the
        prepared optimizer/scheduler skip while gradients accumulate). Call inside `accelerator.accumulate`, or
        with the gradient state set by hand (`report_generation.token_mean_step`)."""
        self.scheduler = scheduler
        optimizer_step(self.accelerator, model, optimizer, scheduler, loss,
                       self.args.max_grad_norm if max_grad_norm is None else max_grad_norm)

    @property
    def done(self) -> bool:
        return self.completed >= self.max_train_steps

    @property
    def epoch(self) -> int:
        return self.completed // self.updates_per_epoch if self.updates_per_epoch else 0

    def end_step(self, **values) -> bool:
        """After an accumulate block: False while accumulating; else counts the step, logs the values
        (tensors or floats, averaged over processes), checkpoints when due, and returns True."""
        if not self.accelerator.sync_gradients:
            return False
        import torch

        self.completed += 1
        logged = {}
        if values:
            device = self.accelerator.device
            stacked = torch.stack([v.detach().float().reshape(()).to(device) if torch.is_tensor(v)
                                   else torch.tensor(float(v), device=device) for v in values.values()])
            logged = dict(zip(values, self.accelerator.reduce(stacked, reduction="mean").tolist()))
            if not all(math.isfinite(v) for v in logged.values()):
                raise FloatingPointError(f"{self.name}, step {self.completed}: non-finite loss {logged}; "
                                         "lower --learning_rate or train in fp32.")
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else None
        self.last = logged
        if self.completed % max(1, getattr(self.args, "logging_steps", 1)) == 0:
            if self.loss_log is not None:
                self.loss_log.log(self.completed, **logged, **({"lr": lr} if lr is not None else {}))
            if getattr(self.args, "with_tracking", False):
                self.accelerator.log({**{f"train/{k}": v for k, v in logged.items()},
                                      **({"train/lr": lr} if lr is not None else {})}, step=self.completed)
        if self.progress is not None:
            self.progress.update(1)
            if "loss" in logged:
                self.progress.set_postfix(loss=f"{logged['loss']:.4f}")
        due = (isinstance(self.every, int) and self.completed % self.every == 0) or (
            self.every == "epoch" and self.updates_per_epoch and self.completed % self.updates_per_epoch == 0)
        if due and not self.done:
            self.checkpoint()
        return True

    def checkpoint(self, extra: dict | None = None) -> Path:
        """`save_state` into checkpoint-{step} (atomic), with the last logged values."""
        self._last_checkpoint = self.completed
        return save_checkpoint(self.accelerator, self.output_dir, self.completed,
                               {**getattr(self, "last", {}), **(extra or {})})

    # -- end ---------------------------------------------------------------------------------------
    def finish(self, title: str | None = None, checkpoint: bool = True) -> Path | None:
        """Closes the bar, writes the final checkpoint (unless this step already has one) and the loss
        curve PNG; returns the PNG path on the main process."""
        if self.progress is not None:
            self.progress.close()
        if checkpoint and self.completed > 0 and self._last_checkpoint != self.completed:
            self.checkpoint()
        if self.loss_log is not None and self.accelerator.is_main_process:
            return self.loss_log.plot(Path(self.output_dir) / "loss_curve.png", title or self.name)
        return None


def checked_cohort(accelerator, dataset, *, manifest: str, skip_bad_cases: bool, output_dir: str, **checks):
    """Every case of `dataset` checked once before step 1 (`mstar_hf.data.validation`), on the main process
    only (a 26k-slide cohort is read once, not once per GPU); the verdict is broadcast. Returns the dataset
    without bad cases (`--skip_bad_cases`, listed in output_dir/failures.csv), or raises `CohortError`
    with the table of all of them on every process."""
    from accelerate.utils import broadcast_object_list

    from ..data.validation import CohortError, check_cohort_or_skip

    verdict = [None]
    if accelerator.is_main_process:
        try:
            kept, problems = check_cohort_or_skip(
                dataset, manifest=manifest, skip_bad_cases=skip_bad_cases,
                failures_csv=str(Path(output_dir) / "failures.csv"), **checks)
            verdict[0] = {"slides": list(kept["slide_id"]), "problems": len(problems)}
        except CohortError as err:
            verdict[0] = {"error": str(err)}
    if accelerator.num_processes > 1:
        broadcast_object_list(verdict)
    if "error" in verdict[0]:
        raise CohortError(verdict[0]["error"])
    if verdict[0]["problems"]:
        keep = set(verdict[0]["slides"])
        dataset = dataset.select([i for i, s in enumerate(dataset["slide_id"]) if s in keep])
    return dataset


__all__ = ["TrainingLoop", "checked_cohort", "optimizer_step", "build_scheduler", "parse_checkpointing_steps", "resolve_max_train_steps"]
