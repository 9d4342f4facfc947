"""Named model sizes: the paper's (`base`) and small ones that train on a laptop CPU (`tiny`, `small`).

The small presets keep the paper's architecture (timm ViT with LayerScale, TransMIL with Nystrom
attention and PPEG, Performer gene encoder) and shrink only widths and depths; tests, benchmarks
and the demo use them because no pretrained weights can be downloaded there.
"""

from transformers import BertConfig, PreTrainedConfig

from .modeling import MStarConfig, MStarGeneConfig, MStarPatchConfig, MStarSlideAggregatorConfig

# The small presets start LayerScale at 1.0 instead of 1e-5: with random weights (no UNI checkpoint can
# be downloaded) a 1e-5 LayerScale makes every block a no-op, so the class token would not depend on
# the image at all; at 1.0 a random ViT is a random-feature encoder whose output carries colour and
# texture, which is what the synthetic cohorts need. The `base` preset keeps the paper's 1e-5.
PATCH = {
    "base": dict(architecture="vit_large_patch16_224", timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True}),
    "small": dict(
        architecture="vit_small_patch16_224",
        timm_kwargs={"depth": 4, "embed_dim": 192, "num_heads": 3, "init_values": 1.0, "dynamic_img_size": True},
    ),
    "tiny": dict(
        architecture="vit_tiny_patch16_224",
        timm_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2, "init_values": 1.0, "dynamic_img_size": True},
    ),
}
WIDTH = {"base": 1024, "small": 192, "tiny": 64}
AGGREGATOR = {
    "base": dict(),
    "small": dict(hidden_size=128, num_attention_heads=4, attention_head_dim=32, num_landmarks=64),
    "tiny": dict(hidden_size=32, num_attention_heads=2, attention_head_dim=16, num_landmarks=16),
}
GENE = {
    "base": dict(),
    "small": dict(gene_embedding_dim=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, num_random_features=64),
    "tiny": dict(gene_embedding_dim=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, num_random_features=16),
}
TEXT = {
    "base": None,  # BioBERT-base layout
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
}
PROJECTION = {"base": 512, "small": 128, "tiny": 32}


def patch_config(size: str = "tiny") -> MStarPatchConfig:
    return MStarPatchConfig(**PATCH[size])


def aggregator_config(size: str = "tiny", input_dim: int | None = None) -> MStarSlideAggregatorConfig:
    return MStarSlideAggregatorConfig(input_dim=input_dim or WIDTH[size], **AGGREGATOR[size])


def gene_config(size: str = "tiny", num_genes: int = 17425) -> MStarGeneConfig:
    return MStarGeneConfig(num_genes=num_genes, **GENE[size])


def mstar_config(
    size: str = "tiny",
    num_genes: int = 17425,
    text_config: PreTrainedConfig | dict | None = None,
    vocab_size: int = 1000,
    **kwargs,
) -> MStarConfig:
    """An `MStarConfig` of a preset size. `text_config` (e.g. a pretrained BERT's config) replaces the
    preset's randomly initialised BERT of `vocab_size` tokens."""
    if text_config is None and TEXT[size] is not None:
        text_config = BertConfig(vocab_size=vocab_size, **TEXT[size])
    return MStarConfig(
        patch_config=patch_config(size),
        aggregator_config=aggregator_config(size),
        text_config=text_config,
        gene_config=gene_config(size, num_genes),
        projection_dim=kwargs.pop("projection_dim", PROJECTION[size]),
        **kwargs,
    )


__all__ = ["patch_config", "aggregator_config", "gene_config", "mstar_config"]
