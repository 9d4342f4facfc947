"""Configuration of the mSTAR report generator (`MStarForReportGeneration`).

Only imports transformers and sibling files: copied next to checkpoints for `trust_remote_code` loading.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_mstar import MStarPatchConfig, MStarSlideAggregatorConfig

REGION_POOLINGS = ("attention", "mean")

# A GPT-2 layout decoder sized like HistGen's (3 layers, 512 wide), with cross-attention.
DEFAULT_DECODER = {
    "n_layer": 3,
    "n_head": 8,
    "n_embd": 512,
    "n_positions": 512,
    "vocab_size": 4096,
    "add_cross_attention": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@strict
class MStarReportGenerationConfig(PreTrainedConfig):
    r"""
    Configuration of [`MStarForReportGeneration`]: mSTAR slide features -> pathology report.

    The slide side is the TransMIL aggregator (its context-aware patch tokens and slide token). Patch
    tokens are grouped into spatial regions of `region_size` patches (consecutive patches along a
    Hilbert curve over the patch grid, so a region is a compact block of tissue), pooled within each
    region, and `num_region_layers` transformer layers mix [slide token; region tokens] (the
    local-global hierarchy of HistGen). A causal language model with cross-attention over these tokens
    writes the report.

    Args:
        aggregator_config (`MStarSlideAggregatorConfig` or `dict`, *optional*):
            The slide aggregator (can be initialised from a Stage 1 `MStarModel`).
        text_config (`PreTrainedConfig` or `dict`, *optional*):
            Any transformers causal-LM config whose model supports cross-attention (`add_cross_attention`),
            e.g. GPT-2 or a BERT decoder. Defaults to a 3-layer, 512-wide GPT-2 with a 4096-token
            vocabulary; `add_cross_attention` (and `is_decoder` where the config has it) are forced on.
        patch_config (`MStarPatchConfig` or `dict`, *optional*):
            A patch encoder carried by the model (`model.patch_model`), so that one folder turns a slide
            into a report. None (default): the model takes patch features only.
        region_size (`int`, *optional*, defaults to 96):
            Patches per region (HistGen's region size).
        region_pooling (`str`, *optional*, defaults to `"attention"`):
            How a region's patch tokens become one token: `"attention"` (gated attention pooling, learned)
            or `"mean"`.
        num_region_layers (`int`, *optional*, defaults to 1):
            Pre-LayerNorm transformer layers over [slide token; region tokens] (0 disables).
        region_num_heads (`int`, *optional*, defaults to 8): heads of those layers.
        region_intermediate_size (`int`, *optional*): feed-forward width (default 4x the aggregator width).
        region_dropout (`float`, *optional*, defaults to 0.1): dropout in the region layers.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the normal init.
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special tokens (default: the decoder's).
        decoder_start_token_id (`int`, *optional*): first decoder token (default: `bos_token_id`).

    Example:
    ```python
    >>> from mstar_hf import MStarReportGenerationConfig, MStarForReportGeneration
    >>> config = MStarReportGenerationConfig(text_config={"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2})
    >>> model = MStarForReportGeneration(config)
    ```"""

    model_type = "mstar_report_generation"
    sub_configs_defaults = {
        "aggregator_config": SubConfigSpec(config_class=MStarSlideAggregatorConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2", init_kwargs=DEFAULT_DECODER),
        "patch_config": SubConfigSpec(config_class=MStarPatchConfig, optional=True),
    }

    aggregator_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    patch_config: PreTrainedConfig | dict | None = None
    region_size: int = 96
    region_pooling: str = "attention"
    num_region_layers: int = 1
    region_num_heads: int = 8
    region_intermediate_size: int | None = None
    region_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.region_size < 1:
            raise ValueError(f"MStarReportGenerationConfig: region_size must be >= 1, got {self.region_size}.")
        if self.region_pooling not in REGION_POOLINGS:
            raise ValueError(
                f"MStarReportGenerationConfig: region_pooling must be one of {REGION_POOLINGS}, got {self.region_pooling!r}."
            )
        width = self.aggregator_config.hidden_size
        if self.num_region_layers > 0 and width % self.region_num_heads:
            raise ValueError(
                f"MStarReportGenerationConfig: the aggregator width ({width}) must be divisible by "
                f"region_num_heads ({self.region_num_heads})."
            )
        text = self.text_config
        if not hasattr(text, "add_cross_attention"):
            raise ValueError(
                f"MStarReportGenerationConfig: the decoder config ({type(text).__name__}) has no `add_cross_attention`: "
                "use a causal LM with cross-attention (e.g. GPT-2 or a BERT decoder)."
            )
        # The decoder always cross-attends to the slide; BERT-style configs also need the causal mask.
        text.add_cross_attention = True
        if hasattr(text, "is_decoder"):
            text.is_decoder = True
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(text, name, None))
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.bos_token_id
        patch_width = None if self.patch_config is None else self.patch_config.hidden_size
        if patch_width is not None and patch_width != self.aggregator_config.input_dim:
            raise ValueError(
                f"MStarReportGenerationConfig: the patch encoder gives {patch_width}-d features but the aggregator "
                f"takes {self.aggregator_config.input_dim}-d ones."
            )


__all__ = ["MStarReportGenerationConfig", "REGION_POOLINGS"]
