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

from .configuration_mstar_downstream import MStarSlideClassificationConfig, MStarSurvivalConfig
from .modeling_mstar_downstream import (
    MStarForSlideClassification,
    MStarForSurvivalPrediction,
    SlideClassifierOutput,
    SurvivalOutput,
)

__all__ += [
    "MStarSlideClassificationConfig",
    "MStarSurvivalConfig",
    "MStarForSlideClassification",
    "MStarForSurvivalPrediction",
    "SlideClassifierOutput",
    "SurvivalOutput",
]

from .configuration_mstar_report import MStarReportGenerationConfig
from .modeling_mstar_report import MStarForReportGeneration, MStarReportGenerationOutput, build_report_labels

__all__ += ["MStarReportGenerationConfig", "MStarForReportGeneration", "MStarReportGenerationOutput", "build_report_labels"]
