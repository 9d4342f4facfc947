"""Configurations of the mSTAR models.

`MStarPatchConfig` (patch encoder), `MStarSlideAggregatorConfig` (TransMIL slide aggregator),
`MStarGeneConfig` (scBERT-style RNA encoder) and `MStarConfig`, the multimodal config that nests
them with a text encoder config. This file must only import from transformers (and the
standard library): it is copied next to saved checkpoints for `trust_remote_code` loading.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The UNI / mSTAR patch encoder: timm ViT-L/16 with LayerScale, no head, any image size.
DEFAULT_TIMM_KWARGS = {"init_values": 1e-5, "dynamic_img_size": True}


@strict
class MStarPatchConfig(PreTrainedConfig):
    r"""
    Configuration of [`MStarPatchModel`], a timm vision transformer that embeds H&E patches.

    Args:
        architecture (`str`, *optional*, defaults to `"vit_large_patch16_224"`):
            Name of the timm architecture (`timm.create_model(architecture, ...)`).
        img_size (`int`, *optional*, defaults to 224):
            Input resolution the position embeddings are built for (other sizes work with
            `dynamic_img_size=True`).
        timm_kwargs (`dict`, *optional*):
            Extra keyword arguments of `timm.create_model` (depth, embed_dim, num_heads, init_values,
            dynamic_img_size, ...). Defaults to `{"init_values": 1e-5, "dynamic_img_size": True}`.
            `num_classes` is always 0: the model returns features, not logits.
        hidden_size (`int`, *optional*):
            Width of the returned class token. Filled in from the timm model when the model is built;
            a stored value is checked against it.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal init of layers that are not part of the timm backbone.

    Example:
    ```python
    >>> from mstar_hf import MStarPatchConfig, MStarPatchModel
    >>> config = MStarPatchConfig(architecture="vit_tiny_patch16_224", timm_kwargs={"depth": 2})
    >>> model = MStarPatchModel(config)
    ```"""

    model_type = "mstar_patch"

    architecture: str = "vit_large_patch16_224"
    img_size: int = 224
    timm_kwargs: dict | None = None
    hidden_size: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.timm_kwargs is None:
            self.timm_kwargs = dict(DEFAULT_TIMM_KWARGS)
        if "num_classes" in self.timm_kwargs and self.timm_kwargs["num_classes"] != 0:
            raise ValueError("MStarPatchConfig: timm_kwargs['num_classes'] must be 0 (the patch model has no head).")
        super().__post_init__(**kwargs)


@strict
class MStarSlideAggregatorConfig(PreTrainedConfig):
    r"""
    Configuration of [`MStarSlideAggregator`], the TransMIL slide aggregator of mSTAR.

    Args:
        input_dim (`int`, *optional*, defaults to 1024): width of the incoming patch features.
        hidden_size (`int`, *optional*, defaults to 512): width of the slide and patch embeddings.
        num_attention_heads (`int`, *optional*, defaults to 8): heads of the Nystrom attention.
        attention_head_dim (`int`, *optional*, defaults to 64): width of one head.
        num_landmarks (`int`, *optional*, defaults to 256): Nystrom landmarks.
        pinv_iterations (`int`, *optional*, defaults to 6): Moore-Penrose iterations.
        residual_conv_kernel (`int`, *optional*, defaults to 33): kernel of the depthwise conv on values.
        input_dropout (`float`, *optional*, defaults to 0.25): dropout after the input projection.
        attention_dropout (`float`, *optional*, defaults to 0.1): dropout after the attention output.
        ppeg_kernels (`list[int]`, *optional*, defaults to `[7, 5, 3]`): PPEG depthwise conv kernels.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of the LayerNorms.
        chunk_size (`int`, *optional*, defaults to 8192): tokens per chunk in the attention; bounds
            memory to O(N * num_landmarks / N * chunk) so 100k-patch slides fit in a few GB.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the normal init.
    """

    model_type = "mstar_aggregator"

    input_dim: int = 1024
    hidden_size: int = 512
    num_attention_heads: int = 8
    attention_head_dim: int = 64
    num_landmarks: int = 256
    pinv_iterations: int = 6
    residual_conv_kernel: int = 33
    input_dropout: float = 0.25
    attention_dropout: float = 0.1
    ppeg_kernels: list[int] | tuple[int, ...] = (7, 5, 3)
    layer_norm_eps: float = 1e-5
    chunk_size: int = 8192
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.ppeg_kernels = list(self.ppeg_kernels)
        if any(k % 2 == 0 for k in self.ppeg_kernels) or self.residual_conv_kernel % 2 == 0:
            raise ValueError("MStarSlideAggregatorConfig: conv kernels must be odd to keep the grid size.")
        super().__post_init__(**kwargs)


@strict
class MStarGeneConfig(PreTrainedConfig):
    r"""
    Configuration of [`MStarGeneEncoder`], the scBERT-style RNA-Seq encoder: every gene is a token whose
    embedding is a gene-identity embedding plus an embedding of its binned expression, encoded by a
    Performer (FAVOR+ linear attention), so cost grows linearly with the number of genes.

    Args:
        num_genes (`int`, *optional*, defaults to 17425): size of the gene vocabulary.
        num_bins (`int`, *optional*, defaults to 8): expression bins (bin 0 is zero expression).
        gene_embedding_dim (`int`, *optional*, defaults to 200): width of the gene-identity embedding
            (Gene2Vec is 200-d); projected to `hidden_size` when different.
        hidden_size (`int`, *optional*, defaults to 200): token width.
        num_hidden_layers (`int`, *optional*, defaults to 6): Performer layers.
        num_attention_heads (`int`, *optional*, defaults to 10): heads.
        intermediate_size (`int`, *optional*, defaults to 800): feed-forward width.
        num_random_features (`int`, *optional*, defaults to 256): FAVOR+ random features per head.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1): dropout.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): LayerNorm epsilon.
        chunk_size (`int`, *optional*, defaults to 4096): genes per chunk in the feed-forward blocks.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the normal init.
        projection_seed (`int`, *optional*, defaults to 0): seed of the random-feature matrices.
    """

    model_type = "mstar_gene"

    num_genes: int = 17425
    num_bins: int = 8
    gene_embedding_dim: int = 200
    hidden_size: int = 200
    num_hidden_layers: int = 6
    num_attention_heads: int = 10
    intermediate_size: int = 800
    num_random_features: int = 256
    hidden_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-5
    chunk_size: int = 4096
    initializer_range: float = 0.02
    projection_seed: int = 0

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"MStarGeneConfig: hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        super().__post_init__(**kwargs)


CONTRASTIVE_NEGATIVES = ("all", "other_cancer")


@strict
class MStarConfig(PreTrainedConfig):
    r"""
    The multimodal mSTAR configuration: patch encoder, slide aggregator, text (report) encoder and RNA
    encoder, projected into one `projection_dim` space and trained with the Stage 1 losses.

    Args:
        patch_config (`MStarPatchConfig` or `dict`, *optional*): the patch encoder.
        aggregator_config (`MStarSlideAggregatorConfig` or `dict`, *optional*): the slide aggregator.
        text_config (`PreTrainedConfig` or `dict`, *optional*): any transformers text encoder config;
            defaults to the BERT-base layout of BioBERT (cased v1.2, vocabulary 28996).
        gene_config (`MStarGeneConfig` or `dict`, *optional*): the RNA encoder.
        projection_dim (`int`, *optional*, defaults to 512): width of the shared embedding space.
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592): initial log logit scale
            (log(1/0.07), the CLIP recipe).
        triplet_margin (`float`, *optional*, defaults to 0.3): margin of the inter-cancer triplet loss.
        contrastive_loss_weight (`float`, *optional*, defaults to 1.0): weight of the InfoNCE terms.
        triplet_loss_weight (`float`, *optional*, defaults to 1.0): weight of the triplet term.
        contrastive_negatives (`str`, *optional*, defaults to `"all"`): which other cases are InfoNCE negatives.
            `"all"` (the CLIP recipe): every other case of the batch. `"other_cancer"`: only cases of another
            (known) cancer type; same-type pairs are masked like two slides of one case. Use it when the
            modalities of same-type cases hardly differ (e.g. templated reports): then a same-type negative
            is a false negative, and the loss is lowest when the slide encoder memorises each training slide
            (by its stain, say) instead of learning what its cancer type looks like.
        patch_alignment_loss_weight (`float`, *optional*, defaults to 0.0): weight of an InfoNCE term (ours, not
            the paper's) between each slide's mean L2-normalised projected patch token and its report. That mean's
            dot product with a class embedding is the MI-Zero score of the zero-shot patch route when top-k
            covers the slide, a score the paper's losses (on the class token only) never train; 0 (default):
            the paper's losses.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the projections' init.
    """

    model_type = "mstar"
    sub_configs_defaults = {
        "patch_config": SubConfigSpec(config_class=MStarPatchConfig),
        "aggregator_config": SubConfigSpec(config_class=MStarSlideAggregatorConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", init_kwargs={"vocab_size": 28996}),
        "gene_config": SubConfigSpec(config_class=MStarGeneConfig),
    }

    patch_config: PreTrainedConfig | dict | None = None
    aggregator_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    gene_config: PreTrainedConfig | dict | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    triplet_margin: float = 0.3
    contrastive_loss_weight: float = 1.0
    triplet_loss_weight: float = 1.0
    contrastive_negatives: str = "all"
    patch_alignment_loss_weight: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.contrastive_negatives not in CONTRASTIVE_NEGATIVES:
            raise ValueError(f"MStarConfig: contrastive_negatives must be one of {CONTRASTIVE_NEGATIVES}, "
                             f"got {self.contrastive_negatives!r}.")
        patch_width = self.patch_config.hidden_size
        if patch_width is not None and patch_width != self.aggregator_config.input_dim:
            raise ValueError(
                f"MStarConfig: the aggregator takes {self.aggregator_config.input_dim}-d features but the patch "
                f"encoder gives {patch_width}-d ones; set aggregator_config.input_dim={patch_width}."
            )


__all__ = ["MStarPatchConfig", "MStarSlideAggregatorConfig", "MStarGeneConfig", "MStarConfig"]
