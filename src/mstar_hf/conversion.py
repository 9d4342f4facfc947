"""Checkpoint conversion: released state dicts -> `save_pretrained` folders (safetensors).

- Patch encoders in timm layout (the official `mSTAR.pth`, UNI's `pytorch_model.bin`, a
  `.safetensors` file, or a timm Hub name `hf-hub:org/name` when online) become an
  `MStarPatchModel` + `MStarImageProcessor` folder.
- Slide aggregators in the TransMIL reference layout (`_fc1.0.*`, `cls_token`, `layer1.*`, `pos_layer.*`,
  `layer2.*`, `norm.*`, optionally under `vision_encoder.` and/or `module.`, key by key as the
  authors' loader strips them) become an `MStarSlideAggregator` folder. A downstream checkpoint's
  classification head (`classifier.*` of TransMIL_Pre, `_fc2.*` of TransMIL) is dropped with a log
  line, or kept: the folder is then an `MStarForSlideClassification` with that head.

Pickled checkpoints are only ever read with `torch.load(weights_only=True)`.
"""

import logging
import re
from pathlib import Path

import torch

from .modeling import (
    MStarForSlideClassification,
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
    return _strip_module_prefix(state, path)


def _strip_module_prefix(state: dict, source) -> dict:
    """Drops DDP's `module.` key by key (the authors' loaders do `k.replace("module.", "")`), so a
    state dict that mixes prefixed and unprefixed keys loads too."""
    out = {}
    for key, value in state.items():
        name = key
        while name.startswith("module."):
            name = name[len("module.") :]
        if name in out:
            raise ConversionError(f"{source}: keys {key!r} and {name!r} both name {name!r} once 'module.' is removed.")
        out[name] = value
    return out


def load_timm_hub_state_dict(name: str):
    """(state dict, timm data config) of a timm Hub model (`hf-hub:org/name`): needs network or the Hub cache."""
    import timm

    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:  # offline, gated, or not a timm repository
        raise ConversionError(
            f"{name}: cannot download the timm Hub model ({type(err).__name__}: {err}). Converting a Hub name "
            "needs network access to the Hugging Face Hub (and `hf auth login` for gated models such as "
            "mSTAR); offline, download mSTAR.pth once and pass the local file instead."
        ) from err
    data_config = timm.data.resolve_data_config({}, model=model)
    return model.state_dict(), data_config


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

    `checkpoint` is a file or a timm Hub name (`hf-hub:org/name`, downloaded by timm; the image
    processor then takes the model's mean, std and input size). `config` defaults to the mSTAR/UNI
    architecture (ViT-L/16, LayerScale 1e-5, dynamic image size). Every key must match: missing or
    unexpected ones are listed in the error.
    """
    processor = MStarImageProcessor()
    if str(checkpoint).startswith("hf-hub:"):
        state, data_config = load_timm_hub_state_dict(str(checkpoint))
        side = int(data_config["input_size"][-1])
        processor = MStarImageProcessor(image_mean=list(data_config["mean"]), image_std=list(data_config["std"]),
                                        size={"height": side, "width": side})
    else:
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
    processor.save_pretrained(output_dir)
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


# downstream classification heads: TransMIL's `_fc2`, the authors' TransMIL_Pre `classifier`
_HEAD_PREFIXES = ("_fc2.", "classifier.")


def split_transmil_head(state: dict[str, torch.Tensor], source: str = "checkpoint") -> tuple[dict, dict]:
    """(aggregator part, classification head) of a TransMIL state dict, prefixes removed key by key.

    With `vision_encoder.` keys (a multimodal or TransMIL_Pre checkpoint), only those form the
    aggregator; other towers are ignored; a head is found at the top level or under `vision_encoder.`.
    """
    state = _strip_module_prefix(state, source)
    head = {k: v for k, v in state.items() if k.startswith(_HEAD_PREFIXES)}
    if any(k.startswith("vision_encoder.") for k in state):
        body = {k[len("vision_encoder.") :]: v for k, v in state.items() if k.startswith("vision_encoder.")}
        head.update({k: v for k, v in body.items() if k.startswith(_HEAD_PREFIXES)})
    else:
        body = state
    body = {k: v for k, v in body.items() if not k.startswith(_HEAD_PREFIXES)}
    return body, head


def _linear_head(head: dict, source) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [C, D], bias [C]) of a single-linear head (`classifier.weight` or `classifier.1.weight`)."""
    weights = [k for k, v in head.items() if k.endswith("weight") and v.ndim == 2]
    if len(weights) != 1:
        raise ConversionError(f"{source}: the classification head {sorted(head)} is not one linear layer; it cannot "
                              "be kept (use --head drop).")
    bias = weights[0][: -len("weight")] + "bias"
    return head[weights[0]], head.get(bias)


def transmil_to_aggregator_state_dict(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """Renames a TransMIL reference state dict to `MStarSlideAggregator` keys; lists keys it cannot place.
    A classification head is left out (see `split_transmil_head`)."""
    state, _ = split_transmil_head(state, source)
    renamed, unknown = {}, []
    for key, value in state.items():
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
    head: str = "drop",
    id2label: dict | None = None,
    num_landmarks: int | None = None,
):
    """Converts a TransMIL-layout aggregator state dict into an `MStarSlideAggregator` folder.

    Without `config`, the input width, hidden width, heads, head width and conv kernel are read from the
    weights, `num_landmarks` (not stored in them) defaults to method.md's 256, the rest is the default.
    `head`: what to do with a downstream classification head (`classifier.*`, `_fc2.*`): "drop" it
    (logged) or "keep" it, saving an `MStarForSlideClassification` (aggregator + that linear head,
    same logits as the reference model) instead. Returns the saved model.
    """
    if head not in ("drop", "keep"):
        raise ValueError(f"head must be 'drop' or 'keep', got {head!r}")
    raw = load_state_dict(checkpoint)
    _, head_state = split_transmil_head(raw, str(checkpoint))
    state = transmil_to_aggregator_state_dict(raw, str(checkpoint))
    if config is None:
        if "input_proj.0.weight" not in state:
            raise ConversionError(f"{checkpoint}: missing keys ['_fc1.0.weight'] (the input projection).")
        hidden, input_dim = state["input_proj.0.weight"].shape
        shape = dict(input_dim=int(input_dim), hidden_size=int(hidden))
        # heads and head width from the attention weights (to_qkv: [3 * heads * head_dim, hidden];
        # res_conv: [heads, 1, kernel, 1]); the landmark count has no weights: method.md's 256 unless given
        conv, qkv = state.get("layers.0.attn.res_conv.weight"), state.get("layers.0.attn.to_qkv.weight")
        if conv is not None and qkv is not None:
            heads = int(conv.shape[0])
            shape.update(num_attention_heads=heads, attention_head_dim=int(qkv.shape[0]) // (3 * heads),
                         residual_conv_kernel=int(conv.shape[2]))
        if num_landmarks is not None:
            shape["num_landmarks"] = int(num_landmarks)
        config = MStarSlideAggregatorConfig(**shape)
    model = MStarSlideAggregator(config)
    expected = set(model.state_dict())
    _report_mismatch(checkpoint, expected - set(state), set(state) - expected, "TransMIL aggregator")
    if state["cls_token"].ndim == 2:  # some exports flatten the [1, 1, D] token
        state["cls_token"] = state["cls_token"].view(1, 1, -1)
    model.load_state_dict(state, strict=True)
    if head_state and head == "keep":
        weight, bias = _linear_head(head_state, checkpoint)
        if weight.shape[1] != config.hidden_size:
            raise ConversionError(f"{checkpoint}: classification head takes {weight.shape[1]}-d input, the aggregator "
                                  f"gives {config.hidden_size}-d.")
        num_labels = int(weight.shape[0])
        labels = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
        model = MStarForSlideClassification.from_aggregator(model, num_labels=num_labels, id2label=labels)
        with torch.no_grad():
            model.classifier[1].weight.copy_(weight)
            if bias is not None:
                model.classifier[1].bias.copy_(bias)
            else:
                model.classifier[1].bias.zero_()
        logger.info("%s: kept the classification head %s (%d classes)", checkpoint, sorted(head_state), num_labels)
    elif head_state:
        logger.warning("%s: dropped the classification head %s (not part of the slide aggregator; convert with "
                       "--head keep to keep it)", checkpoint, sorted(head_state))
    model.save_pretrained(Path(output_dir), safe_serialization=safe_serialization)
    return model


__all__ = [
    "ConversionError",
    "convert_aggregator_checkpoint",
    "convert_patch_checkpoint",
    "load_state_dict",
    "load_timm_hub_state_dict",
    "split_transmil_head",
    "transmil_to_aggregator_state_dict",
]
