"""Registers every mSTAR class with the transformers Auto factories (run once on `import mstar_hf`).

Two routes to the same classes: the local registry (`AutoModel.from_pretrained` needs no
`trust_remote_code` while this package is installed), and `register_for_auto_class`, which makes
`save_pretrained` write `auto_map` and copy the modeling code, so the folder also loads with
`trust_remote_code=True` where the package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    AutoProcessor,
)

from .data.processing_mstar import MStarProcessor

from .modeling import (
    MStarConfig,
    MStarForReportGeneration,
    MStarForSlideClassification,
    MStarForSurvivalPrediction,
    MStarGeneConfig,
    MStarGeneEncoder,
    MStarImageProcessor,
    MStarModel,
    MStarPatchConfig,
    MStarPatchModel,
    MStarReportGenerationConfig,
    MStarSlideAggregator,
    MStarSlideAggregatorConfig,
    MStarSlideClassificationConfig,
    MStarSurvivalConfig,
)

_REGISTERED = False


def register_auto_classes() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    for config_class, model_class in (
        (MStarPatchConfig, MStarPatchModel),
        (MStarSlideAggregatorConfig, MStarSlideAggregator),
        (MStarGeneConfig, MStarGeneEncoder),
        (MStarConfig, MStarModel),
        (MStarSurvivalConfig, MStarForSurvivalPrediction),
        (MStarReportGenerationConfig, MStarForReportGeneration),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModel")
    # a slide is a sequence of patch features: the classifier is a sequence classifier
    AutoConfig.register(MStarSlideClassificationConfig.model_type, MStarSlideClassificationConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(MStarSlideClassificationConfig, MStarForSlideClassification, exist_ok=True)
    MStarSlideClassificationConfig.register_for_auto_class()
    MStarForSlideClassification.register_for_auto_class("AutoModelForSequenceClassification")
    AutoImageProcessor.register(MStarPatchConfig, image_processor_classes={"torchvision": MStarImageProcessor}, exist_ok=True)
    AutoImageProcessor.register(MStarConfig, image_processor_classes={"torchvision": MStarImageProcessor}, exist_ok=True)
    # the report generator: a slide (image) to text model; its image processor serves the patch encoder it may carry
    AutoModelForImageTextToText.register(MStarReportGenerationConfig, MStarForReportGeneration, exist_ok=True)
    AutoImageProcessor.register(
        MStarReportGenerationConfig, image_processor_classes={"torchvision": MStarImageProcessor}, exist_ok=True
    )
    MStarImageProcessor.register_for_auto_class("AutoImageProcessor")
    AutoProcessor.register(MStarConfig, MStarProcessor, exist_ok=True)
    MStarProcessor.register_for_auto_class("AutoProcessor")
    _REGISTERED = True
