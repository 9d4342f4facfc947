"""Registers every mSTAR class with the transformers Auto factories (run once on `import mstar_hf`).

Two routes to the same classes: the local registry (`AutoModel.from_pretrained` needs no
`trust_remote_code` while this package is installed), and `register_for_auto_class`, which makes
`save_pretrained` write `auto_map` and copy the modeling code, so the folder also loads with
`trust_remote_code=True` where the package is not installed. The top-level models' `save_pretrained`
(MStarModel, MStarForReportGeneration) also writes their pipelines' code and `custom_pipelines`
(`mstar_hf.pipelines.add_custom_pipelines`), so `pipeline(task, model=folder, trust_remote_code=True)`
works there too.
"""

import functools

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


def _carry_pipelines(model_class) -> None:
    """After `model_class.save_pretrained(folder)`, add the pipeline code and `custom_pipelines` to the folder.

    A wrapper here rather than an override in modeling/, which travels as remote code and must not import
    the pipelines; `push_to_hub` saves through `save_pretrained`, so pushed repositories carry them too."""
    original = model_class.__dict__.get("save_pretrained") or model_class.save_pretrained
    if getattr(original, "_adds_custom_pipelines", False):
        return

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        from .pipelines.remote import add_custom_pipelines

        push = kwargs.pop("push_to_hub", False)
        if push:  # upload after the pipeline files are written
            raise ValueError("save_pretrained(push_to_hub=True) is not supported for mSTAR models: call "
                             "model.push_to_hub(repo_id) (or `mstar-hf push`), which save the pipeline code too.")
        result = original(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            add_custom_pipelines(save_directory)
        return result

    save_pretrained._adds_custom_pipelines = True
    model_class.save_pretrained = save_pretrained


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
    for model_class in (MStarModel, MStarForReportGeneration):
        _carry_pipelines(model_class)
    _REGISTERED = True
