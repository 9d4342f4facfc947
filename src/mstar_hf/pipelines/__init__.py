"""The mSTAR pipelines, registered with `transformers.pipeline` on `import mstar_hf`.

* `"wsi-zero-shot"` ([`WSIZeroShotPipeline`]): zero-/few-shot slide classification;
* `"wsi-feature-extraction"` ([`WSIFeatureExtractionPipeline`]): slide and patch embeddings;
* `"wsi-report-generation"`: registered from `report_generation.PIPELINE_TASK` when that module is
  part of the package (its import errors are not swallowed).

Saved folders carry the pipeline code (`add_custom_pipelines`, see `remote.py`), so the same tasks load
with `pipeline(task, model=folder_or_repo, trust_remote_code=True)` where mstar_hf is not installed.
Zero-shot class prompts (lists, synonyms, CONCH / mSTAR prompt files) are read by `prompts.py`.
"""

from pathlib import Path

from transformers import AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .feature_extraction import WSIFeatureExtractionPipeline
from .few_shot import FewShotPrototypes, few_shot_prototypes
from .heatmap import save_heatmap, save_zero_shot_heatmap
from .inputs import WSIInput, load_wsi_input
from .prompts import ClassPrompts, parse_candidate_labels, read_prompt_file
from .remote import add_custom_pipelines, custom_pipeline_files
from .zero_shot import WSIZeroShotPipeline

TASKS = {
    "wsi-zero-shot": dict(pipeline_class=WSIZeroShotPipeline, pt_model=AutoModel, type="multimodal"),
    "wsi-feature-extraction": dict(pipeline_class=WSIFeatureExtractionPipeline, pt_model=AutoModel, type="multimodal"),
}
_REGISTERED = False


def load_pipeline(task: str, model, **kwargs):
    """`transformers.pipeline(task, model=model, **kwargs)` served by this package's pipeline class and models.

    A folder or repo whose config.json carries `custom_pipelines` (every saved mSTAR model does, so it works
    without the package) makes `pipeline(task, model=path)` ask for `trust_remote_code=True`; with the
    package installed this loads the installed code instead, running nothing from the folder."""
    tasks = {**TASKS}
    if (Path(__file__).parent / "report_generation.py").is_file():
        from .report_generation import PIPELINE_TASK

        tasks[PIPELINE_TASK["task"]] = PIPELINE_TASK
    if task not in tasks:
        raise KeyError(f"unknown mSTAR pipeline task {task!r}; known: {sorted(tasks)}.")
    from transformers import pipeline

    kwargs.setdefault("trust_remote_code", False)
    return pipeline(task, model=model, pipeline_class=tasks[task]["pipeline_class"], **kwargs)


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


__all__ = ["register_pipelines", "load_pipeline", "WSIZeroShotPipeline", "WSIFeatureExtractionPipeline",
           "FewShotPrototypes", "few_shot_prototypes", "save_heatmap", "save_zero_shot_heatmap", "WSIInput", "load_wsi_input", "TASKS",
           "add_custom_pipelines", "custom_pipeline_files", "ClassPrompts", "parse_candidate_labels",
           "read_prompt_file"]
