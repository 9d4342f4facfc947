"""Exponential moving average of a model's weights (the Stage 2 EMA branch).

`ema = momentum * ema + (1 - momentum) * student` after every optimizer step, with one fused
`torch._foreach_lerp_` over all tensors. The EMA copy is kept in float32 even when the student runs in
bf16 (DeepSpeed bf16 keeps bf16 module weights); under ZeRO-3 the update reads the optimizer's full
fp32 master weights. Saved as safetensors.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn


def _gathered(params: list[nn.Parameter]):
    """ZeRO-3 partitions parameters (they carry `ds_id`): gather them for reading; a no-op otherwise."""
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _full_fp32(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """ZeRO-3: every parameter's full fp32 master copy, read from the optimizer (collective, no module
    state touched: gathering the module's own partitions between steps would change which of them stay
    resident and break DeepSpeed's recorded fetch order on the next step)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p) for p in params]


class EMAModel:
    """An EMA copy of `model` (deep-copied now, frozen, in eval mode, float32)."""

    def __init__(self, model: nn.Module, momentum: float = 0.996):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}.")
        self.momentum = float(momentum)
        params = list(model.parameters())
        with _gathered(params):
            self.module = copy.deepcopy(model)
        self.module.float().eval().requires_grad_(False)
        self.num_updates = 0

    def to(self, device) -> "EMAModel":
        self.module.to(device)
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards `model`'s current weights (same architecture as the EMA copy)."""
        src_params = list(model.parameters())
        ema_params = list(self.module.parameters())
        if len(ema_params) != len(src_params):
            raise ValueError(f"EMA update: the model has {len(src_params)} parameter tensors, the EMA copy "
                             f"{len(ema_params)}.")
        if src_params and hasattr(src_params[0], "ds_id"):
            src = [t.to(e) for t, e in zip(_full_fp32(src_params), ema_params)]
        else:
            src = [p.detach() if p.dtype == e.dtype and p.device == e.device else p.detach().to(e)
                   for p, e in zip(src_params, ema_params)]
        torch._foreach_lerp_(ema_params, src, 1.0 - self.momentum)
        for ema_buf, buf in zip(self.module.buffers(), model.buffers()):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def state_dict(self) -> dict:
        return {k: v.detach().contiguous() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state, strict=True)

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        state = {k: v.cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"momentum": str(self.momentum), "num_updates": str(self.num_updates)})
        return path

    def load(self, path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: EMA weights not found (the checkpoint is incomplete).")
        device = next(self.module.parameters()).device
        self.load_state_dict(load_file(str(path), device=str(device)))
        with safe_open(str(path), framework="pt") as f:
            self.num_updates = int((f.metadata() or {}).get("num_updates", 0))


__all__ = ["EMAModel"]
