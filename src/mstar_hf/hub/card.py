"""Model cards for mSTAR checkpoints, rendered from the Jinja templates in `mstar_hf/model_cards/`.

The template is chosen from the folder's `config.json` `model_type`; the metadata (license, library,
pipeline tag, tags, base model, datasets, model-index) is built as `huggingface_hub.ModelCardData`, and the
model-index comes from the `eval_results.json` that training/evaluation scripts write next to the weights.

`pipeline_tag` is set only where transformers' standard pipeline of that name runs the model (with or
without this package): the patch encoder's `image-feature-extraction`. The slide-level models run only in
the custom `wsi-*` pipelines, which travel with the model (`custom_pipelines`); those task names are tags,
and the card's snippets use them. Every snippet runs as pasted, with `trust_remote_code=True` (the repo
carries the code), so it needs no `mstar_hf` (tests/test_model_cards.py runs them both ways).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "model_cards"

MSTAR_MODEL_TYPES = (
    "mstar",
    "mstar_patch",
    "mstar_aggregator",
    "mstar_gene",
    "mstar_report_generation",
    "mstar_slide_classification",
    "mstar_survival",
)

# model_type -> (template file, pipeline tag, custom pipeline tasks, default class name when config.json has
# no "architectures"). A pipeline tag only where the standard transformers pipeline works: the Hub's widget
# and `pipeline(model=...)` without a task use it. `feature-extraction` needs a tokenizer,
# `zero-shot-image-classification` an Auto class the model cannot have, `image-to-text` a `ProcessorMixin`
# that turns images into the model's inputs: none of them can run a whole-slide model.
_CARD_KINDS: dict[str, tuple[str, str | None, tuple[str, ...], str]] = {
    "mstar_patch": ("patch_encoder.md", "image-feature-extraction", (), "MStarPatchModel"),
    "mstar_aggregator": ("slide_aggregator.md", None, (), "MStarSlideAggregator"),
    "mstar": ("multimodal.md", None, ("wsi-zero-shot", "wsi-feature-extraction"), "MStarModel"),
    "mstar_report_generation": ("report_generator.md", None, ("wsi-report-generation",), "MStarForReportGeneration"),
    "mstar_gene": ("component.md", None, (), "MStarGeneEncoder"),
    "mstar_slide_classification": ("component.md", None, (), "MStarForSlideClassification"),
    "mstar_survival": ("component.md", None, (), "MStarForSurvivalPrediction"),
}

# training_args.json keys naming the models a checkpoint was built from, most direct first: the model
# trained further, the Stage 1 model (Stage 2, report generator), the patch encoder, the text encoder.
_BASE_MODEL_KEYS = ("base_model", "model_name_or_path", "init_from", "stage1_model", "stage1_model_name_or_path",
                    "aggregator_name_or_path", "patch_model_name_or_path", "patch_model", "text_model_name_or_path")

_COMPONENTS = {
    "mstar_gene": (
        "mSTAR RNA-Seq gene encoder",
        "It is mSTAR's **RNA encoder** (scBERT-style): every gene of a fixed vocabulary is a token whose "
        "embedding is its gene embedding plus an embedding of its binned expression value; a Performer "
        "(linear-attention) encoder reads the profile and its class token is projected to 512-d, into the "
        "space it shares with slides and reports. Memory is linear in the number of genes.",
    ),
    "mstar_slide_classification": (
        "slide classification head on mSTAR features",
        "It is a **multiple-instance-learning slide classifier** (ABMIL or TransMIL head) trained on mSTAR "
        "patch features: it reads the features of all patches of a slide and predicts a slide-level label.",
    ),
    "mstar_survival": (
        "survival prediction head on mSTAR features",
        "It is a **survival model** on mSTAR features: a slide-level (optionally multimodal) network that "
        "predicts a discrete-time hazard over survival time bins, trained with the negative log-likelihood "
        "of censored survival and evaluated by the concordance index.",
    ),
}

BASE_TAGS = ["pathology", "histology", "whole-slide-image", "multimodal", "mstar"]

# Keys of training_args.json never shown on a public card.
_SECRET_KEY_RE = re.compile(r"token|secret|password|api_key|credential", re.IGNORECASE)
_CONFIG_SKIP = {"architectures", "auto_map", "custom_pipelines", "transformers_version", "torch_dtype", "dtype",
                "model_type", "id2label", "label2id", "_name_or_path"}

_TASKS = {  # normalised task -> (task_type, task_name)
    "retrieval": ("cross-modal-retrieval", "Cross-modal retrieval"),
    "cross-modal-retrieval": ("cross-modal-retrieval", "Cross-modal retrieval"),
    "zero-shot": ("zero-shot-image-classification", "Zero-shot slide classification"),
    "zero-shot-classification": ("zero-shot-image-classification", "Zero-shot slide classification"),
    "zero-shot-image-classification": ("zero-shot-image-classification", "Zero-shot slide classification"),
    "few-shot": ("few-shot-slide-classification", "Few-shot slide classification"),
    "few-shot-classification": ("few-shot-slide-classification", "Few-shot slide classification"),
    "report-generation": ("image-to-text", "Pathology report generation"),
    "image-to-text": ("image-to-text", "Pathology report generation"),
    "captioning": ("image-to-text", "Pathology report generation"),
    "classification": ("image-classification", "Slide classification"),
    "slide-classification": ("image-classification", "Slide classification"),
    "image-classification": ("image-classification", "Slide classification"),
    "survival": ("survival-prediction", "Survival prediction"),
    "survival-prediction": ("survival-prediction", "Survival prediction"),
}


class ModelCardError(ValueError):
    """The folder's metadata (config.json, eval_results.json, training_args.json) cannot make a card."""


def _norm(text: str) -> str:
    return re.sub(r"[\s_]+", "-", str(text).strip().lower())


def _metric(name: str) -> tuple[str, dict | None, str]:
    """Map a results-file metric name to (metric id, metric args, display name)."""
    key = _norm(name).replace("recall@", "r@")
    if m := re.fullmatch(r"r@(\d+)", key):
        return "recall", {"k": int(m.group(1))}, f"R@{m.group(1)}"
    if m := re.fullmatch(r"bleu-?(\d)", key):
        return "bleu", {"max_order": int(m.group(1))}, f"BLEU-{m.group(1)}"
    if key == "bleu":
        return "bleu", {"max_order": 4}, "BLEU-4"
    if key in ("rouge-l", "rougel", "rouge"):
        return "rouge", {"rouge_type": "rougeL"}, "ROUGE-L"
    if key == "meteor":
        return "meteor", None, "METEOR"
    if key in ("accuracy", "acc", "top-1-accuracy"):
        return "accuracy", None, "Accuracy"
    if key in ("balanced-accuracy", "bacc", "balanced-acc"):
        return "balanced_accuracy", None, "Balanced accuracy"
    if key in ("auc", "roc-auc", "macro-auc", "auroc"):
        return "roc_auc", {"average": "macro"}, "Macro AUC"
    if key in ("c-index", "cindex", "concordance-index"):
        return "c_index", None, "C-index"
    if key in ("f1", "macro-f1", "weighted-f1"):
        return "f1", None, name
    return key, None, name


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", str(text).strip().lower()).strip("-")
    return slug or "unknown"


def load_eval_results(path: str | os.PathLike, default_split: str | None = None,
                      hub_datasets: dict[str, str] | None = None):
    """Read an `eval_results.json` into a list of `huggingface_hub.EvalResult`.

    The file holds a list (or `{"results": [...]}`) of entries such as
    `{"task": "retrieval", "metric": "recall@1", "name": "slide->report R@1", "value": 0.8, "dataset": "TCGA"}`
    with optional `split`, `dataset_type` (a Hub dataset id), `dataset_config`, `task_type`, `metric_type`.
    `default_split`: the split of entries that name none (the run's `eval_split`). `hub_datasets`: local
    dataset name (e.g. the manifest's folder) -> the Hub dataset id it is, used as the entry's dataset.
    """
    from huggingface_hub import EvalResult

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelCardError(f"{path} is not valid JSON: {exc}") from exc
    entries = raw.get("results") if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise ModelCardError(f"{path} must hold a list of result entries (or {{\"results\": [...]}}), got {type(raw).__name__}")
    results = []
    for i, entry in enumerate(entries):
        where = f"{path} entry {i}"
        if not isinstance(entry, dict):
            raise ModelCardError(f"{where} must be an object, got {entry!r}")
        missing = [k for k in ("task", "metric", "value", "dataset") if entry.get(k) in (None, "")]
        if missing:
            raise ModelCardError(f"{where} is missing {', '.join(missing)}: {entry!r}")
        value = entry["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelCardError(f"{where} has a non-numeric or non-finite value {value!r}")
        task_type, task_name = _TASKS.get(_norm(entry["task"]), (_norm(entry["task"]), str(entry["task"])))
        metric_type, metric_args, metric_display = _metric(entry["metric"])
        hub_dataset = (hub_datasets or {}).get(str(entry["dataset"]))
        results.append(
            EvalResult(
                task_type=entry.get("task_type") or task_type,
                task_name=task_name,
                dataset_type=entry.get("dataset_type") or hub_dataset or _slug(entry["dataset"]),
                dataset_name=hub_dataset or str(entry["dataset"]),
                dataset_config=entry.get("dataset_config"),
                dataset_split=entry.get("split") or default_split,
                metric_type=entry.get("metric_type") or metric_type,
                metric_value=float(value),
                metric_name=str(entry.get("name") or metric_display),
                metric_args=metric_args,
            )
        )
    return results


def _scalar(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    text = text.replace("|", "\\|").replace("`", "'").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _training_rows(args: dict) -> list[tuple[str, str]]:
    return [(k, _scalar(v)) for k, v in args.items() if v is not None and not _SECRET_KEY_RE.search(k)]


def _config_rows(config: dict) -> list[tuple[str, str]]:
    rows = []
    for key, value in config.items():
        if key in _CONFIG_SKIP or key.startswith("_") or isinstance(value, dict) or value is None:
            continue
        if isinstance(value, list) and len(value) > 8:
            continue
        rows.append((key, _scalar(value)))
    return rows[:30]


def _looks_like_hub_id(value: Any) -> bool:
    # base_model must name a Hub repo: a local path from a training run would make invalid metadata.
    return (
        isinstance(value, str)
        and re.fullmatch(r"[\w.-]+/[\w.-]+", value) is not None
        and not os.path.exists(value)
        and not value.startswith((".", "/"))
    )


def _evaluation_section(results) -> str:
    if not results:
        return ("No evaluation results were shipped with this checkpoint (`eval_results.json`); see the paper "
                "for the results of the released mSTAR model.")
    lines = ["| task | dataset | split | metric | value |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.task_name} | {r.dataset_name} | {r.dataset_split or '-'} | {r.metric_name} | {r.metric_value:.4g} |")
    return "Results of the run that produced this checkpoint (`eval_results.json`), also in the card's `model-index`:\n\n" + "\n".join(lines)


def _render_partial(name: str, **kwargs) -> str:
    import jinja2

    return jinja2.Template((TEMPLATES_DIR / name).read_text(encoding="utf-8")).render(**kwargs).strip()


def read_model_type(folder: str | os.PathLike) -> tuple[str, dict]:
    """Return (model_type, config dict) of `folder/config.json`, raising ModelCardError when unusable."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelCardError(f"{folder} has no config.json: save the model with `save_pretrained` first.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelCardError(f"{path} is not valid JSON: {exc}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MSTAR_MODEL_TYPES:
        raise ModelCardError(
            f"{path} has model_type {model_type!r}, which is not an mSTAR model; expected one of "
            f"{', '.join(MSTAR_MODEL_TYPES)}."
        )
    return model_type, config


def render_model_card(
    folder: str | os.PathLike,
    repo_id: str | None = None,
    base_model: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    patch_model: str | None = None,
):
    """Render the model card (README.md) of a saved mSTAR folder as a `huggingface_hub.ModelCard`.

    Args:
        folder: a `save_pretrained` folder with `config.json` (its `model_type` picks the template) and,
            optionally, `training_args.json` (shown as the run's arguments; `base_model`/`datasets` are also
            taken from it when not given) and `eval_results.json` (becomes the `model-index`).
        repo_id: the Hub id the card's usage snippets load; defaults to the folder's name.
        base_model, datasets: Hub ids for the metadata.
        license: a Hub license id (default apache-2.0).
        tags: extra tags, added to the mSTAR ones.
        patch_model: id or path of the patch encoder that produces input features (snippets of the
            slide-level cards); defaults to `repo_id` for the multimodal model, which contains it.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    model_type, config = read_model_type(folder)
    template, pipeline_tag, custom_tasks, default_class = _CARD_KINDS[model_type]
    repo_id = repo_id or folder.resolve().name
    model_name = repo_id.split("/")[-1]

    training_args: dict = {}
    args_path = folder / "training_args.json"
    if args_path.is_file():
        try:
            training_args = json.loads(args_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelCardError(f"{args_path} is not valid JSON: {exc}") from exc
        if not isinstance(training_args, dict):
            raise ModelCardError(f"{args_path} must hold a JSON object of argument names to values")
    if base_model is None:
        # every Hub model this one was built from (local folders of a training run are not valid metadata)
        found = [training_args.get(k) for k in _BASE_MODEL_KEYS]
        found = list(dict.fromkeys(c for c in found if _looks_like_hub_id(c)))
        base_model = found[0] if len(found) == 1 else (found or None)
    if datasets is None:
        candidate = training_args.get("dataset_name") or training_args.get("datasets")
        datasets = candidate if _looks_like_hub_id(candidate) or (
            isinstance(candidate, list) and candidate and all(_looks_like_hub_id(c) for c in candidate)) else None

    results_path = folder / "eval_results.json"
    eval_results = None
    if results_path.is_file():
        # The scripts name the evaluated data after the manifest's folder; when the card names exactly one Hub
        # dataset and the run's manifest is that folder, the model-index points at the Hub dataset.
        hub_ids = [datasets] if isinstance(datasets, str) else list(datasets or [])
        manifest = training_args.get("manifest")
        hub_datasets = ({Path(str(manifest)).parent.name: hub_ids[0]}
                        if manifest and len(hub_ids) == 1 and _looks_like_hub_id(hub_ids[0]) else None)
        eval_results = load_eval_results(results_path, default_split=training_args.get("eval_split") or None,
                                         hub_datasets=hub_datasets)

    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=BASE_TAGS + list(custom_tasks) + [t for t in (tags or []) if t not in BASE_TAGS + list(custom_tasks)],
        base_model=base_model,
        datasets=datasets,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    architectures = config.get("architectures") or []
    if patch_model is None:
        recorded = next((training_args[k] for k in ("patch_model", "patch_model_name_or_path") if training_args.get(k)), None)
        patch_model = recorded if isinstance(recorded, str) and _looks_like_hub_id(recorded) else None
    if patch_model is None:
        patch_model = repo_id if model_type in ("mstar", "mstar_patch") else "PATCH_ENCODER_REPO_OR_FOLDER"
    shared = {"model_type": model_type, "has_training_args": bool(training_args)}
    auto_map = config.get("auto_map") or {}
    # the Auto class the repo's `auto_map` serves (a head registered as a sequence classifier has no AutoModel)
    auto_class = "AutoModel" if "AutoModel" in auto_map or not auto_map else next(
        (k for k in auto_map if k.startswith("AutoModel")), "AutoModel")
    component_title, component_description = _COMPONENTS.get(model_type, ("", ""))
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES_DIR / template),
        repo_id=repo_id,
        model_name=model_name,
        model_type=model_type,
        model_class=architectures[0] if architectures else default_class,
        license=license,
        base_model=", ".join(base_model) if isinstance(base_model, list) else base_model,
        pipeline_tag=pipeline_tag,
        custom_tasks=list(custom_tasks),
        patch_model=patch_model,
        component_title=component_title,
        component_description=component_description,
        how_to_load=_render_partial("_how_to_load.md", custom_tasks=list(custom_tasks), **shared),
        auto_class=auto_class,
        carries_patch_model=config.get("patch_config") is not None,
        input_contract=_render_partial("_input_contract.md", **shared),
        training_summary=_render_partial("_training.md", **shared),
        intended_use=_render_partial("_intended_use.md", **shared),
        citation_bibtex=(TEMPLATES_DIR / "_citation.bib").read_text(encoding="utf-8").strip(),
        training_rows=_training_rows(training_args),
        config_rows=_config_rows(config),
        evaluation_section=_evaluation_section(eval_results),
    )


def extract_python_snippet(card_text: str, index: int = 0) -> str:
    """The `index`-th fenced ```python block of a card (the first one is the runnable load snippet)."""
    blocks = re.findall(r"```python\n(.*?)```", card_text, flags=re.DOTALL)
    if len(blocks) <= index:
        raise ValueError(f"the card has {len(blocks)} python block(s); asked for #{index}")
    return blocks[index]
