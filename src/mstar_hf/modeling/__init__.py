"""mSTAR models in the transformers layout: configs, models, image processor, checkpoint conversion."""

from .configuration_mstar import MStarConfig, MStarGeneConfig, MStarPatchConfig, MStarSlideAggregatorConfig
from .image_processing_mstar import MStarImageProcessor
from .modeling_mstar import MStarModel, MStarOutput, batch_hard_triplet_loss, symmetric_info_nce
from .modeling_mstar_aggregator import MStarSlideAggregator, MStarSlideAggregatorOutput
from .modeling_mstar_gene import MStarGeneEncoder
from .modeling_mstar_patch import MStarPatchModel, config_hash

__all__ = [
    "MStarConfig",
    "MStarGeneConfig",
    "MStarPatchConfig",
    "MStarSlideAggregatorConfig",
    "MStarImageProcessor",
    "MStarModel",
    "MStarOutput",
    "MStarSlideAggregator",
    "MStarSlideAggregatorOutput",
    "MStarGeneEncoder",
    "MStarPatchModel",
    "batch_hard_triplet_loss",
    "symmetric_info_nce",
    "config_hash",
]
