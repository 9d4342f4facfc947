"""Checkpoint conversion: released state dicts -> `save_pretrained` folders (safetensors).

- Patch encoders in timm layout (the official `mSTAR.pth`, UNI's `pytorch_model.bin`, or a
  `.safetensors` file) become an `MStarPatchModel` + `MStarImageProcessor` folder.
- Slide aggregators in the TransMIL reference layout (`_fc1.0.*`, `cls_token`, `layer1.*`, `pos_layer.*`,
  `layer2.*`, `norm.*`, optionally under `vision_encoder.`) become an `MStarSlideAggregator` folder.

Pickled checkpoints are only ever read with `torch.load(weights_only=True)`.
"""

import logging
import re
from pathlib import Path

import torch

from .modeling import (
    MStarImageProcessor,
    MStarPatchConfig,
    MStarPatchModel,
    MStarSlideAggregator,
    MStarSlideAggregatorConfig,
)

logger = logging.getLogger(__name__)

# wrappers that training frameworks put around a state dict
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the keys at fault."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a `.safetensors`, `.pth`, `.pt` or `.bin` state dict, safely (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such checkpoint file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, or a pickle that is not plain tensors
        raise ConversionError(f"{path}: cannot read a state dict ({type(err).__name__}: {err}).") from err
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: not a state dict of tensors.")
    if state and all(k.startswith("module.") for k in state):  # DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _report_mismatch(path, missing, unexpected, what):
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {sorted(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {sorted(unexpected)}")
        raise ConversionError(f"{path}: does not match the {what}: " + "; ".join(parts) + ".")


def convert_patch_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    config: MStarPatchConfig | None = None,
    safe_serialization: bool = True,
) -> MStarPatchModel:
    """Converts a timm-layout ViT state dict into an `MStarPatchModel` folder (+ image processor).

    `config` defaults to the mSTAR/UNI architecture (ViT-L/16, LayerScale 1e-5, dynamic image size).
    Every key must match: missing or unexpected ones are listed in the error.
    """
    state = load_state_dict(checkpoint)
    config = config or MStarPatchConfig()
    model = MStarPatchModel(config)
    expected = set(model.backbone.state_dict())
    # a classification head is not part of the encoder (UNI ships none; fine-tuned copies may)
    dropped = [k for k in state if k.startswith("head.") and k not in expected]
    for key in dropped:
        state.pop(key)
    if dropped:
        logger.info("%s: dropped classifier keys %s", checkpoint, dropped)
    _report_mismatch(checkpoint, expected - set(state), set(state) - expected, f"timm {config.architecture} encoder")
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in model.backbone.state_dict().items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise ConversionError(f"{checkpoint}: shape mismatch: {shapes}.")
    model.backbone.load_state_dict(state, strict=True)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, safe_serialization=safe_serialization)
    MStarImageProcessor().save_pretrained(output_dir)
    return model


# TransMIL reference name -> MStarSlideAggregator name
_TRANSMIL_RULES = [
    (r"^_fc1\.0\.", "input_proj.0."),
    (r"^cls_token$", "cls_token"),
    (r"^layer1\.", "layers.0."),
    (r"^layer2\.", "layers.1."),
    (r"^pos_layer\.", "ppeg."),
    (r"^norm\.", "final_norm."),
]


def transmil_to_aggregator_state_dict(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """Renames a TransMIL reference state dict to `MStarSlideAggregator` keys; lists keys it cannot place."""
    if any(k.startswith("vision_encoder.") for k in state):
        state = {k[len("vision_encoder.") :]: v for k, v in state.items() if k.startswith("vision_encoder.")}
    renamed, unknown = {}, []
    for key, value in state.items():
        if key.startswith("_fc2."):  # a downstream classifier head, not part of the aggregator
            continue
        for pattern, replacement in _TRANSMIL_RULES:
            if re.match(pattern, key):
                renamed[re.sub(pattern, replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{source}: unexpected keys for a TransMIL aggregator {sorted(unknown)}.")
    return renamed


def convert_aggregator_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    config: MStarSlideAggregatorConfig | None = None,
    safe_serialization: bool = True,
) -> MStarSlideAggregator:
    """Converts a TransMIL-layout aggregator state dict into an `MStarSlideAggregator` folder.

    Without `config`, the input width is read from `_fc1.0.weight` and the rest is method.md's default.
    """
    state = transmil_to_aggregator_state_dict(load_state_dict(checkpoint), str(checkpoint))
    if config is None:
        if "input_proj.0.weight" not in state:
            raise ConversionError(f"{checkpoint}: missing keys ['_fc1.0.weight'] (the input projection).")
        hidden, input_dim = state["input_proj.0.weight"].shape
        config = MStarSlideAggregatorConfig(input_dim=int(input_dim), hidden_size=int(hidden))
    model = MStarSlideAggregator(config)
    expected = set(model.state_dict())
    _report_mismatch(checkpoint, expected - set(state), set(state) - expected, "TransMIL aggregator")
    if state["cls_token"].ndim == 2:  # some exports flatten the [1, 1, D] token
        state["cls_token"] = state["cls_token"].view(1, 1, -1)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(Path(output_dir), safe_serialization=safe_serialization)
    return model


__all__ = [
    "ConversionError",
    "convert_aggregator_checkpoint",
    "convert_patch_checkpoint",
    "load_state_dict",
    "transmil_to_aggregator_state_dict",
]
