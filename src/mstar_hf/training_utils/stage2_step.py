"""Stage 2 (self-taught training of the patch encoder): the student, the teacher targets from the memory,
the losses and one step's forward, shared by `training/stage2.py`, its bench and its tests.

One step on a batch of tiles of a few slides:

1. the EMA encoder embeds the tiles (no grad) -> those features overwrite the tiles' memory rows;
2. the frozen Stage 1 aggregator re-embeds each sampled slide from its memory (all rows, or at most
   `context_size` rows that always include the sampled ones, in the slide's order) -> the targets are
   its patch tokens at the sampled rows (no grad; `teacher_target` picks which: `TEACHER_TARGETS`);
3. the student (patch encoder + `patch_projection`) embeds the tiles; the loss is the distance of its
   projected feature to the target (`cosine` or `smooth_l1`; optionally both centred on the running mean
   target, see `Stage2Student`) plus `consistency_weight` x (1 - cosine of
   its encoder feature with the EMA feature of step 1): the one EMA forward serves both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .memory_bank import PatchMemoryBank

LOSSES = ("cosine", "smooth_l1")
# Which of the aggregator's patch tokens the student regresses onto, as an index into its `hidden_states`
# (None: `patch_embeds`). method.md leaves the target open; "final" is the paper's re-embedded feature.
TEACHER_TARGETS = {
    "final": None,  # the patch tokens after the final LayerNorm (`patch_embeds`)
    "pre_norm": -1,  # the second TransLayer's output, before the final LayerNorm
    "first_layer": 1,  # the first TransLayer's output: slide context from one attention layer only
}
EVAL_STEP = 2**31 - 1  # seeds the evaluation's context draws (training steps never reach it)


class Stage2Student(nn.Module):
    """Patch encoder + projection into the aggregator's token space: `forward(pixel_values)` ->
    (encoder features [B, D], projected features [B, H]).

    `center_targets`: the regression runs on centred vectors, `pred - m` onto `target - m`, with `m` a
    running mean of the teacher's targets (buffer `target_mean`, saved in checkpoints). The aggregator's
    patch tokens share one dominant direction (its final LayerNorm and the slide context), so a plain cosine
    is mostly met by the projection's bias and teaches the encoder little; centred, the loss is about what
    differs between patches.
    """

    def __init__(self, patch_model: nn.Module, patch_projection: nn.Linear, center_targets: bool = False,
                 center_momentum: float = 0.9):
        super().__init__()
        self.patch_model = patch_model
        self.patch_projection = patch_projection
        self.center_targets = bool(center_targets)
        self.center_momentum = float(center_momentum)
        width = patch_projection.out_features
        self.register_buffer("target_mean", torch.zeros(width))
        self.register_buffer("target_mean_steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update_target_mean(self, targets: torch.Tensor) -> torch.Tensor:
        """Folds the batch's mean target (over every process) into `target_mean`; returns the new mean."""
        import torch.distributed as dist

        batch_mean = targets.float().mean(dim=0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch_mean)
            batch_mean /= dist.get_world_size()
        m = self.center_momentum if int(self.target_mean_steps) > 0 else 0.0
        self.target_mean.mul_(m).add_(batch_mean.to(self.target_mean.dtype), alpha=1.0 - m)
        self.target_mean_steps += 1
        return self.target_mean.float()

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # DeepSpeed bf16 keeps bf16 weights and does not cast inputs
        dtype = next(self.patch_model.parameters()).dtype
        features = self.patch_model(pixel_values=pixel_values.to(dtype)).pooler_output
        return features, self.patch_projection(features)


def distillation_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Student projected features vs teacher targets, both [B, H]."""
    pred, target = pred.float(), target.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    raise ValueError(f"--loss must be one of {LOSSES}, got {kind!r}.")


def consistency_loss(student_features: torch.Tensor, ema_features: torch.Tensor) -> torch.Tensor:
    """1 - cosine(student encoder feature, EMA encoder feature), mean over the batch."""
    return (1.0 - F.cosine_similarity(student_features.float(), ema_features.float(), dim=-1)).mean()


def context_rows(count: int, sampled: np.ndarray, context_size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted rows of a slide given to the aggregator: all of them when they fit in `context_size`, else
    the sampled rows plus a random draw of the others up to `context_size`."""
    if context_size <= 0 or count <= context_size:
        return np.arange(count)
    sampled = np.unique(sampled)
    if len(sampled) >= context_size:
        return sampled
    mask = np.ones(count, dtype=bool)
    mask[sampled] = False
    others = rng.choice(np.flatnonzero(mask), size=context_size - len(sampled), replace=False)
    return np.sort(np.concatenate([sampled, others]))


def check_teacher_target(target: str) -> str:
    if target not in TEACHER_TARGETS:
        raise ValueError(f"unknown teacher target {target!r}: choose one of {', '.join(TEACHER_TARGETS)}.")
    return target


def teacher_tokens(aggregator: nn.Module, features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   target: str = "final") -> torch.Tensor:
    """The aggregator's patch tokens [B, N, H] that Stage 2 regresses onto (`TEACHER_TARGETS`)."""
    index = TEACHER_TARGETS[check_teacher_target(target)]
    if index is None:
        return aggregator(features, attention_mask=attention_mask).patch_embeds
    return aggregator(features, attention_mask=attention_mask, output_hidden_states=True).hidden_states[index]


@torch.no_grad()
def fit_projection_to_teacher(projection: nn.Linear, aggregator: nn.Module, memory: PatchMemoryBank, slides,
                              context_size: int = 4096, ridge: float = 1e-3, max_slides: int = 256,
                              seed: int = 0, device=None, target: str = "final") -> dict:
    """Starts the student's projection where a linear map of the memory's features best predicts the teacher.

    The memory's rows are the initial encoder's features (the student's start), so the ridge solution
    `W = (Xc^T Xc + lam I)^-1 Xc^T Yc`, `b = mean(Y) - W mean(X)` over the patches of up to `max_slides`
    training slides (whole-slide context, as the teacher gives it) is the best projection for the encoder as
    it is. Started from a random projection, the first hundred steps go into fitting it and the encoder's
    gradients meanwhile carry the projection's error, not the teacher's context. `lam` is `ridge` times the
    mean feature variance. Deterministic and the same in every process (the first slides, in order).
    Returns the fit's R^2 on those patches."""
    device = device if device is not None else next(aggregator.parameters()).device
    aggregator = aggregator.eval()
    D, H = projection.in_features, projection.out_features
    xtx, xty = torch.zeros(D, D, dtype=torch.float64), torch.zeros(D, H, dtype=torch.float64)
    sx, sy, syy, n = torch.zeros(D, dtype=torch.float64), torch.zeros(H, dtype=torch.float64), 0.0, 0
    for s in list(slides)[:max_slides]:
        rows = context_rows(memory.slides[s].count, np.zeros(0, dtype=np.int64), context_size,
                            np.random.default_rng([int(seed), int(s), 13]))
        x = torch.from_numpy(memory.read(s, rows)).to(device)
        y = teacher_tokens(aggregator, x[None], target=target)[0].double().cpu()
        x = x.double().cpu()
        xtx += x.T @ x
        xty += x.T @ y
        sx += x.sum(0)
        sy += y.sum(0)
        syy += float((y ** 2).sum())
        n += len(x)
    if n < 2:
        raise ValueError("fit_projection_to_teacher: fewer than 2 training patches in the memory.")
    mx, my = sx / n, sy / n
    cxx = xtx - n * torch.outer(mx, mx)
    cxy = xty - n * torch.outer(mx, my)
    lam = ridge * float(torch.diagonal(cxx).mean().clamp_min(1e-12))
    weight = torch.linalg.solve(cxx + lam * torch.eye(D, dtype=torch.float64), cxy)  # [D, H]
    total = syy - n * float(my @ my)
    # residual sum of squares of the fit, from the same sufficient statistics
    explained = float((weight * cxy).sum()) * 2 - float((weight * (cxx @ weight)).sum())
    projection.weight.copy_(weight.T.to(projection.weight.dtype))
    projection.bias.copy_((my - weight.T @ mx).to(projection.bias.dtype))
    return {"patches": n, "slides": min(len(list(slides)), max_slides), "r2": explained / max(total, 1e-12),
            "ridge": lam}


class ReusableAutocast:
    """`torch.autocast` that can be entered again and again (a fresh autocast per `with`), for the
    no-grad branches: `with ctx: ...` several times per step."""

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, device_type: str, precision: str):
        if precision not in self.DTYPES:
            raise ValueError(f"precision must be one of {sorted(self.DTYPES)}, got {precision!r}.")
        self.device_type, self.dtype = device_type, self.DTYPES[precision]
        self._stack = []

    def __enter__(self):
        ctx = torch.autocast(device_type=self.device_type, dtype=self.dtype)
        self._stack.append(ctx)
        return ctx.__enter__()

    def __exit__(self, *exc):
        return self._stack.pop().__exit__(*exc)


def bf16_is_fast(device) -> bool:
    """bf16 matmuls run faster than fp32 here: a CUDA GPU with bf16, or a CPU with AMX tiles."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(amx is not None and amx())
    return False


def resolve_no_grad_precision(requested: str, mixed_precision: str, device) -> str:
    """Precision of the no-grad branches (EMA forward, teacher): 'fp32', 'bf16' or 'fp16'.

    'auto': the run's mixed precision when it has one, else bf16 where bf16 is fast, else fp32. These
    branches only produce memory features and regression targets, and bf16 rounding (about 0.4% per
    value) is far below what the losses resolve; in fp32 their forward passes would cost more than a
    third of the student's forward+backward.
    """
    if requested != "auto":
        return requested
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    return "bf16" if bf16_is_fast(device) else "fp32"


class MemoryTeacher:
    """The frozen Stage 1 aggregator reading slides from the memory bank; `target` picks its tokens
    (`TEACHER_TARGETS`)."""

    def __init__(self, aggregator: nn.Module, memory: PatchMemoryBank, context_size: int = 4096, seed: int = 0,
                 target: str = "final"):
        if aggregator.config.input_dim != memory.dim:
            raise ValueError(f"the memory bank {memory.folder} holds {memory.dim}-d features but the aggregator takes "
                             f"{aggregator.config.input_dim}-d ones.")
        self.aggregator = aggregator.eval().requires_grad_(False)
        self.memory = memory
        self.context_size = int(context_size)
        self.seed = int(seed)
        self.target = check_teacher_target(target)

    def targets(self, slide: torch.Tensor, row: torch.Tensor, step: int, device, autocast=None) -> torch.Tensor:
        """Re-embedded features [n, H] (float32) of the patches (slide[i], row[i]) from the slides' current
        memory, in the same order. All slides of the batch run in one aggregator call (a mask marks each
        slide's real rows; the aggregator computes every slide on its own rows). Runs in inference mode;
        the result is a normal tensor, usable as a loss target."""
        return self._targets(slide, row, step, device, autocast).clone()

    @torch.inference_mode()
    def _targets(self, slide, row, step, device, autocast):
        slide_np, row_np = slide.cpu().numpy(), row.cpu().numpy()
        uniq = list(dict.fromkeys(slide_np.tolist()))
        blocks, where = [], np.zeros(len(row_np), dtype=np.int64)
        for b, s in enumerate(uniq):
            sel = np.flatnonzero(slide_np == s)
            rng = np.random.default_rng([self.seed, step, s, 7])
            ctx = context_rows(self.memory.slides[s].count, row_np[sel], self.context_size, rng)
            blocks.append(self.memory.read(s, ctx))
            where[sel] = np.searchsorted(ctx, row_np[sel])
        width = max(len(x) for x in blocks)
        feats = np.zeros((len(blocks), width, self.memory.dim), dtype=np.float32)
        mask = np.zeros((len(blocks), width), dtype=bool)
        for b, x in enumerate(blocks):
            feats[b, :len(x)], mask[b, :len(x)] = x, True
        feats_t = torch.from_numpy(feats).to(device, non_blocking=True)
        mask_t = torch.from_numpy(mask).to(device, non_blocking=True)
        with autocast if autocast is not None else contextlib.nullcontext():
            patch_embeds = teacher_tokens(self.aggregator, feats_t, None if mask.all() else mask_t, self.target)
        batch_index = torch.as_tensor([uniq.index(s) for s in slide_np.tolist()], device=device)
        return patch_embeds[batch_index, torch.as_tensor(where, device=device)].float()


@dataclass
class Stage2StepOutput:
    loss: torch.Tensor
    distill_loss: torch.Tensor
    consistency_loss: torch.Tensor
    student_features: torch.Tensor
    ema_features: torch.Tensor
    targets: torch.Tensor


def ema_features_to_memory(ema, memory: PatchMemoryBank, pixel_values: torch.Tensor, slide: torch.Tensor,
                           row: torch.Tensor, autocast=None) -> torch.Tensor:
    """EMA encoder features of the batch [n, D] (float32, no grad), written into their memory rows."""
    with torch.inference_mode(), autocast if autocast is not None else contextlib.nullcontext():
        ema_features = ema(pixel_values=pixel_values).pooler_output.float()
    ema_features = ema_features.clone()  # out of inference mode: the consistency loss keeps it for backward
    values = ema_features.cpu().numpy()
    slide_np, row_np = slide.cpu().numpy(), row.cpu().numpy()
    for s in np.unique(slide_np):
        sel = slide_np == s
        memory.write(int(s), row_np[sel], values[sel])
    return ema_features


def stage2_forward(student, ema, teacher: MemoryTeacher, batch: dict, loss_kind: str = "cosine",
                   consistency_weight: float = 0.6, autocast=None, device=None) -> Stage2StepOutput:
    """The losses of one Stage 2 micro-batch (backward is the caller's; the memory is updated here)."""
    pixel_values = batch["pixel_values"]
    device = device if device is not None else pixel_values.device
    ema_features = ema_features_to_memory(ema, teacher.memory, pixel_values, batch["slide"], batch["row"], autocast)
    targets = teacher.targets(batch["slide"], batch["row"], int(batch["step"]), device, autocast)
    student_features, projected = student(pixel_values)
    core = getattr(student, "module", student)  # DDP / DeepSpeed wrap the student
    if getattr(core, "center_targets", False):
        mean = core.update_target_mean(targets).to(targets.device)
        distill = distillation_loss(projected.float() - mean, targets - mean, loss_kind)
    else:
        distill = distillation_loss(projected, targets, loss_kind)
    consistency = consistency_loss(student_features, ema_features)
    loss = distill + consistency_weight * consistency
    return Stage2StepOutput(loss, distill, consistency, student_features, ema_features, targets)


@torch.no_grad()
def evaluate_student_teacher(student, teacher: MemoryTeacher, loader, device, prepare=None, autocast=None) -> dict:
    """Mean cosine between the student's projected feature and the teacher's re-embedded feature over the
    loader's patches (held-out). `prepare(batch)` moves/normalises pixel values. Returns sum, count."""
    total, count = 0.0, 0
    for batch in loader:
        pixel_values = prepare(batch) if prepare is not None else batch["pixel_values"].to(device)
        targets = teacher.targets(batch["slide"], batch["row"], EVAL_STEP, device, autocast)
        with autocast if autocast is not None else contextlib.nullcontext():
            _, projected = student(pixel_values)
        cos = F.cosine_similarity(projected.float(), targets.float(), dim=-1)
        total += float(cos.sum())
        count += int(cos.numel())
    return {"cosine_sum": total, "count": count}


__all__ = [
    "fit_projection_to_teacher",
    "LOSSES",
    "MemoryTeacher",
    "ReusableAutocast",
    "bf16_is_fast",
    "resolve_no_grad_precision",
    "Stage2Student",
    "Stage2StepOutput",
    "consistency_loss",
    "context_rows",
    "distillation_loss",
    "ema_features_to_memory",
    "evaluate_student_teacher",
    "stage2_forward",
]
