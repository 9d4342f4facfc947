"""The mSTAR pipelines, registered with `transformers.pipeline` on `import mstar_hf`.

* `"wsi-zero-shot"` ([`WSIZeroShotPipeline`]): zero-/few-shot slide classification;
* `"wsi-feature-extraction"` ([`WSIFeatureExtractionPipeline`]): slide and patch embeddings;
* `"wsi-report-generation"`: registered from `report_generation.PIPELINE_TASK` when that module is
  part of the package (its import errors are not swallowed).
"""

from pathlib import Path

from transformers import AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .feature_extraction import WSIFeatureExtractionPipeline
from .few_shot import FewShotPrototypes, few_shot_prototypes
from .heatmap import save_heatmap, save_zero_shot_heatmap
from .inputs import WSIInput, load_wsi_input
from .zero_shot import WSIZeroShotPipeline

TASKS = {
    "wsi-zero-shot": dict(pipeline_class=WSIZeroShotPipeline, pt_model=AutoModel, type="multimodal"),
    "wsi-feature-extraction": dict(pipeline_class=WSIFeatureExtractionPipeline, pt_model=AutoModel, type="multimodal"),
}
_REGISTERED = False


def register_pipelines() -> list[str]:
    """Registers the WSI tasks with `PIPELINE_REGISTRY` (once); returns the task names."""
    global _REGISTERED
    tasks = dict(TASKS)
    if (Path(__file__).parent / "report_generation.py").is_file():
        from .report_generation import PIPELINE_TASK

        spec = dict(PIPELINE_TASK)
        tasks[spec.pop("task")] = spec
    if not _REGISTERED:
        for task, spec in tasks.items():
            PIPELINE_REGISTRY.register_pipeline(task, **spec)
        _REGISTERED = True
    return list(tasks)


__all__ = ["register_pipelines", "WSIZeroShotPipeline", "WSIFeatureExtractionPipeline", "FewShotPrototypes",
           "few_shot_prototypes", "save_heatmap", "save_zero_shot_heatmap", "WSIInput", "load_wsi_input", "TASKS"]
