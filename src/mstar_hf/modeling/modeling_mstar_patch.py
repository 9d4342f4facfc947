"""mSTAR patch encoder: a timm ViT (ViT-L/16 with LayerScale, as UNI) behind the transformers API.

Only imports torch, timm, transformers and sibling files: copied next to checkpoints for
`trust_remote_code` loading.
"""

import hashlib

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_mstar import MStarPatchConfig


def build_timm_backbone(config: MStarPatchConfig) -> nn.Module:
    """Creates the timm model a config describes (random weights; no download ever)."""
    import timm

    if not timm.is_model(config.architecture):
        raise ValueError(
            f"MStarPatchConfig: unknown timm architecture {config.architecture!r} "
            f"(see timm.list_models(); e.g. 'vit_large_patch16_224')."
        )
    kwargs = dict(config.timm_kwargs or {})
    kwargs.pop("num_classes", None)
    return timm.create_model(config.architecture, pretrained=False, num_classes=0, img_size=config.img_size, **kwargs)


# bookkeeping fields that change on save/load but not the encoder's function
_UNHASHED = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "auto_map",
             "_commit_hash", "_attn_implementation_autoset", "return_dict", "output_hidden_states",
             "output_attentions", "id2label", "label2id"}


def config_hash(config) -> str:
    """A short, stable id of an encoder config (stored in feature files to tell encoders apart): the same
    for a freshly built model and for it saved and reloaded."""
    import json

    fields = {k: v for k, v in config.to_dict().items() if k not in _UNHASHED}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


class MStarPatchPreTrainedModel(PreTrainedModel):
    config_class = MStarPatchConfig
    base_model_prefix = "mstar_patch"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    # timm's ViT attention calls F.scaled_dot_product_attention when its `fused_attn` flag is set;
    # `attn_implementation` ("sdpa" by default, or "eager") sets that flag on every block.
    _supports_sdpa = True

    def _init_weights(self, module):
        # timm initialised the backbone when it was built (trunc-normal, LayerScale 1e-5, ...); the
        # transformers default would overwrite that with N(0, 0.02), so the backbone is left alone.
        return


class MStarPatchModel(MStarPatchPreTrainedModel):
    r"""
    The mSTAR patch encoder. Wraps `timm.create_model(config.architecture, num_classes=0, **config.timm_kwargs)`
    (the module is `self.backbone`, its state dict keys are timm's under `backbone.`).

    Forward:
        pixel_values (`torch.FloatTensor` of shape `[B, 3, H, W]`): patches normalised by
            [`MStarImageProcessor`] (224x224 for the released encoders); cast to the model's dtype.

    `attn_implementation="sdpa"` (default) or `"eager"` selects timm's fused or explicit attention.

    Returns:
        [`BaseModelOutputWithPooling`] with `pooler_output` `[B, hidden_size]` (the class token, the mSTAR
        patch feature; 1024-d for ViT-L) and `last_hidden_state` `[B, T, hidden_size]` (all tokens after
        the final norm, prefix tokens first).
    """

    def __init__(self, config: MStarPatchConfig):
        super().__init__(config)
        self.backbone = build_timm_backbone(config)
        width = int(self.backbone.num_features)
        if config.hidden_size is not None and config.hidden_size != width:
            raise ValueError(
                f"MStarPatchConfig says hidden_size={config.hidden_size} but timm {config.architecture!r} with "
                f"{config.timm_kwargs} gives {width}-d features."
            )
        config.hidden_size = width
        self._applied_attn_implementation = None
        self.post_init()

    def _sync_attn_implementation(self) -> None:
        """Point timm's attention blocks at the backend the config names (transformers may change it after
        construction, e.g. `set_attn_implementation`)."""
        wanted = self.config._attn_implementation or "sdpa"
        if wanted == self._applied_attn_implementation:
            return
        for module in self.backbone.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = wanted != "eager"
        self._applied_attn_implementation = wanted

    # transformers toggles checkpointing by setting `gradient_checkpointing` on modules that have it;
    # timm's ViT has its own switch, so the attribute forwards to it.
    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.backbone, "grad_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool):
        self.backbone.set_grad_checkpointing(bool(enable))

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.patch_embed

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"MStarPatchModel expects pixel_values of shape [B, 3, H, W], got {tuple(pixel_values.shape)}.")
        self._sync_attn_implementation()
        pixel_values = pixel_values.to(self.dtype)  # processors give float32; a bf16/fp16 model takes its own dtype
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden_states = None
        if output_hidden_states:
            tokens, intermediates = self.backbone.forward_intermediates(pixel_values, norm=False, output_fmt="NLC",
                                                                       return_prefix_tokens=True)
            hidden_states = tuple(torch.cat([prefix, x], dim=1) for x, prefix in intermediates)
        else:
            tokens = self.backbone.forward_features(pixel_values)
        pooled = self.backbone.forward_head(tokens, pre_logits=True)
        if not return_dict:
            return (tokens, pooled) + ((hidden_states,) if hidden_states is not None else ())
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=pooled, hidden_states=hidden_states)


__all__ = ["MStarPatchPreTrainedModel", "MStarPatchModel", "build_timm_backbone", "config_hash"]
