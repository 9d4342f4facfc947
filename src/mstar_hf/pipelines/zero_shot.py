"""`pipeline("wsi-zero-shot")`: MI-Zero-style zero-shot (and few-shot) slide classification with mSTAR.

>>> from transformers import pipeline
>>> import mstar_hf  # registers the task
>>> pipe = pipeline("wsi-zero-shot", model="path/to/mstar")
>>> pipe("slide.svs", candidate_labels={"adenocarcinoma": ["lung adenocarcinoma", "adenocarcinoma"],
...                                      "squamous cell carcinoma": ["lung squamous cell carcinoma"]})
[{'label': 'adenocarcinoma', 'score': 0.93}, {'label': 'squamous cell carcinoma', 'score': 0.07}]

Class embeddings (as the authors' `zero_shot_classifier`): per class, every (template x synonym)
prompt is embedded with `model.get_text_features(normalize=True)`; the prompts are averaged and the
mean re-normalised. They are cached per (labels, synonyms, templates) on the pipeline, so a second
call with the same labels runs no text encoder (`clear_cache()` after changing the weights).

Scoring:

* `mode="patch_topk"` (default, MI-Zero): every patch is embedded in the shared space and compared
  (cosine) with every class; a class's slide score is the mean of its `top_k` best patch scores.
  `patch_source` says which patch embedding: `"aggregator"` (default): the aggregator's context-aware
  patch tokens through `slide_projection`, the space Stage 1 aligns with text, so it works on any
  Stage-1 model; `"encoder"`: `model.get_patch_features(space="shared")` (patch encoder ->
  `patch_projection` -> `slide_projection`), the paper's route, meaningful once Stage 2 has trained
  `patch_projection`. `top_k` defaults to 50: the authors' code has no single default, it evaluates
  k in (1, 5, 10, 50, 100) side by side; 50 is the middle of that range (robust to a few off-target
  patches, still a small share of a slide's thousands). A slide with fewer than `top_k` patches uses
  all of them (as the authors' `min(j, N)`), never an error.
* `mode="slide"`: the aggregator's slide embedding (projected, normalised) against the classes.

Scores are `softmax(cosine / 0.07)` (the authors' temperature), sorted, like transformers'
`zero-shot-image-classification`. A single candidate label is allowed (a warning; its score is 1.0,
but its patch scores still make a heatmap); no labels, duplicate labels, or a template without
`CLASSNAME` are errors.

Few-shot: `pipe(x, support={label: [support slides]})` builds prototypes (`few_shot_prototypes`:
mean of the top-100 support patches ranked by the class's text similarity) and scores the query with
the same top-k pooling against them; or pass `support=pipe.build_prototypes(...)` to reuse them.
"""

from __future__ import annotations

import numbers
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .few_shot import FEW_SHOT_TOP_N, PATCH_SOURCES, FewShotPrototypes, few_shot_prototypes, project_patches, topk_pool
from .inputs import WSIPipeline, unbatch_meta

logger = logging.get_logger(__name__)

TEMPERATURE = 0.07
DEFAULT_TOP_K = 50
MODES = ("patch_topk", "slide")
CLASSNAME = "CLASSNAME"
_CACHE_SIZE = 32


def default_templates() -> list[str]:
    from mstar_hf.data.text import ZERO_SHOT_TEMPLATES

    return list(ZERO_SHOT_TEMPLATES)


def normalize_candidate_labels(candidate_labels) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`["a", "b"]` or `{"a": ["a", "syn"], ...}` -> `(("a", ("a",)), ...)`; errors name the problem."""
    if candidate_labels is None:
        raise ValueError("candidate_labels is required: a list of class names or {label: [synonyms]}.")
    if isinstance(candidate_labels, str):
        candidate_labels = [candidate_labels]
    if isinstance(candidate_labels, Mapping):
        items = list(candidate_labels.items())
    elif isinstance(candidate_labels, Sequence):
        items = [(label, [label]) for label in candidate_labels]
    else:
        raise TypeError(f"candidate_labels must be a list of names or a dict {{label: [synonyms]}}, "
                        f"got {type(candidate_labels).__name__}.")
    if not items:
        raise ValueError("candidate_labels is empty: give at least one class name.")
    out, seen = [], set()
    for label, synonyms in items:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"candidate label {label!r} must be a non-empty string.")
        if label in seen:
            raise ValueError(f"candidate label {label!r} is given twice.")
        seen.add(label)
        if isinstance(synonyms, str):
            synonyms = [synonyms]
        synonyms = list(synonyms) if synonyms is not None else []
        if not synonyms or not all(isinstance(s, str) and s.strip() for s in synonyms):
            raise ValueError(f"candidate label {label!r} needs a non-empty list of non-empty synonyms, got {synonyms!r}.")
        out.append((label, tuple(synonyms)))
    return tuple(out)


def _is_spec(value) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], tuple)
        for item in value) and len(value) > 0


def as_label_spec(candidate_labels) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`normalize_candidate_labels`, passing an already normalised spec through."""
    return candidate_labels if _is_spec(candidate_labels) else normalize_candidate_labels(candidate_labels)


def check_templates(templates) -> tuple[str, ...]:
    """Prompt templates, each with a `CLASSNAME` slot (default: `mstar_hf.data.ZERO_SHOT_TEMPLATES`)."""
    if templates is None:
        return tuple(default_templates())
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise ValueError("templates is empty: give at least one template with a CLASSNAME slot.")
    bad = [t for t in templates if not isinstance(t, str) or CLASSNAME not in t]
    if bad:
        raise ValueError(f"every template needs a {CLASSNAME} slot (replaced by each class synonym); "
                         f"these have none: {bad}.")
    return tuple(templates)


class WSIZeroShotPipeline(WSIPipeline):
    r"""
    Zero-shot (and few-shot) whole-slide classification with an [`MStarModel`]; see the module docstring.

    Call arguments:
        inputs: a slide path, a features .h5 path, a `[N, D]` tensor, a dict with `features` (and
            `coords`), or a list of them (batched, `batch_size` slides at a time).
        candidate_labels (`list[str]` or `dict[str, list[str]]`): class names, optionally with synonyms.
        templates (`list[str]`, *optional*): prompt templates with a `CLASSNAME` slot.
        mode (`str`, defaults to `"patch_topk"`): `"patch_topk"` or `"slide"`.
        patch_source (`str`, defaults to `"aggregator"`): `"aggregator"` or `"encoder"` patch embeddings.
        top_k (`int`, defaults to 50): patches averaged per class in `"patch_topk"` mode.
        temperature (`float`, defaults to 0.07): softmax temperature.
        support (`dict[str, list]` or [`FewShotPrototypes`], *optional*): few-shot support slides.
        few_shot_top_n (`int`, defaults to 100): patches per few-shot prototype.
        return_patch_scores (`bool`, defaults to False): also return per-patch cosines and coords.
        patch_size, target_mpp, min_tissue, mpp, seg_params, extraction_batch_size, extraction_workers,
        precision, progress: how a slide path is tiled and encoded (see `load_wsi_input`).

    Returns:
        A list of `{"label", "score"}` sorted by score; with `return_patch_scores=True` a dict with
        `predictions` (that list), `labels` (class order), `similarities` (`{label: pooled cosine}`),
        `patch_scores` (`np.ndarray` `[N, C]` cosines), `coords` (`[N, 2]` or None),
        `patch_size_level0`, `slide_path` and `source` (ready for `heatmap.save_heatmap`).
    """

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        if self.tokenizer is None:
            raise ValueError("wsi-zero-shot needs the text encoder's tokenizer: pass processor= (an MStarProcessor) "
                             "or tokenizer=, or a model folder saved with its processor.")
        self._text_cache: OrderedDict = OrderedDict()
        self._prototype_cache: OrderedDict = OrderedDict()

    # -- parameters -------------------------------------------------------------------------------
    def _sanitize_parameters(self, candidate_labels=None, templates=None, mode=None, patch_source=None, top_k=None,
                             temperature=None, support=None, few_shot_top_n=None, return_patch_scores=None,
                             **kwargs):
        preprocess = self._split_preprocess(kwargs)
        if kwargs:
            raise TypeError(f"wsi-zero-shot got unknown argument(s) {sorted(kwargs)}.")
        forward, postprocess = {}, {}
        if candidate_labels is not None:
            forward["label_spec"] = normalize_candidate_labels(candidate_labels)
        if templates is not None:
            forward["templates"] = check_templates(templates)
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
            forward["mode"] = mode
        if patch_source is not None:
            if patch_source not in PATCH_SOURCES:
                raise ValueError(f"patch_source must be one of {PATCH_SOURCES}, got {patch_source!r}.")
            forward["patch_source"] = patch_source
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
            forward["top_k"] = int(top_k)
        if temperature is not None:
            if not temperature > 0:
                raise ValueError(f"temperature must be positive, got {temperature!r}.")
            forward["temperature"] = float(temperature)
        if support is not None:
            forward["support"] = support
        if few_shot_top_n is not None:
            forward["few_shot_top_n"] = int(few_shot_top_n)
        if return_patch_scores is not None:
            forward["return_patch_scores"] = postprocess["return_patch_scores"] = bool(return_patch_scores)
        return preprocess, forward, postprocess

    # -- text side --------------------------------------------------------------------------------
    @torch.no_grad()
    def get_class_embeddings(self, candidate_labels, templates=None) -> torch.Tensor:
        """L2-normalised class embeddings `[C, projection_dim]` (cached per labels + synonyms + templates)."""
        spec = as_label_spec(candidate_labels)
        templates = check_templates(templates)
        key = (spec, templates)
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        embeds = torch.stack([self._embed_class(synonyms, templates) for _, synonyms in spec])
        self._text_cache[key] = embeds
        if len(self._text_cache) > _CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return embeds

    def _embed_class(self, synonyms, templates, chunk: int = 128) -> torch.Tensor:
        prompts = [t.replace(CLASSNAME, s) for s in synonyms for t in templates]
        limit = min(getattr(self.processor, "max_length", None) or 512, self.tokenizer.model_max_length or 512)
        chunks = []
        for i in range(0, len(prompts), chunk):
            enc = self.tokenizer(prompts[i:i + chunk], padding=True, truncation=True, max_length=limit,
                                 return_token_type_ids=False, return_tensors="pt").to(self.device)
            chunks.append(self.model.get_text_features(enc["input_ids"], enc["attention_mask"], normalize=True))
        return F.normalize(torch.cat(chunks).float().mean(dim=0), dim=-1)

    def clear_cache(self) -> None:
        """Forget cached class embeddings and prototypes (after the model's weights changed)."""
        self._text_cache.clear()
        self._prototype_cache.clear()

    # -- few-shot ---------------------------------------------------------------------------------
    def build_prototypes(self, support: Mapping[str, Sequence], candidate_labels=None, templates=None,
                         patch_source: str = "aggregator", top_n: int = FEW_SHOT_TOP_N, **load_options
                         ) -> FewShotPrototypes:
        """Few-shot prototypes from `{label: [support inputs]}`; the text class embeddings that rank the
        support patches come from `candidate_labels` (a dict gives synonyms) or, if None, the labels."""
        spec = self._support_spec(support, candidate_labels)
        class_embeddings = self.get_class_embeddings(spec, templates)
        with torch.no_grad():
            return few_shot_prototypes(self.model, {label: support[label] for label, _ in spec}, class_embeddings,
                                       top_n=top_n, patch_source=patch_source,
                                       load_input=lambda item: self.load_input(item, **load_options))

    @staticmethod
    def _support_spec(support, candidate_labels):
        if not isinstance(support, Mapping) or not support:
            raise ValueError("support must be a non-empty dict {label: [support slides]} or FewShotPrototypes.")
        if candidate_labels is None:
            return normalize_candidate_labels(list(support))
        spec = as_label_spec(candidate_labels)
        if {label for label, _ in spec} != set(support):
            raise ValueError(f"candidate_labels {[label for label, _ in spec]} and the support labels "
                             f"{list(support)} differ.")
        return spec

    def _prototypes_for(self, support, spec, templates, patch_source, top_n) -> FewShotPrototypes:
        if isinstance(support, FewShotPrototypes):
            if spec is not None and {label for label, _ in spec} != set(support.labels):
                raise ValueError(f"candidate_labels {[label for label, _ in spec]} and the prototypes' labels "
                                 f"{support.labels} differ.")
            return support
        spec = self._support_spec(support, spec)
        key = (spec, templates, patch_source, top_n,
               tuple((label, tuple(_item_key(x) for x in support[label])) for label, _ in spec))
        hit = self._prototype_cache.get(key)
        if hit is not None and hit[0] is support:
            return hit[1]
        prototypes = self.build_prototypes(support, spec, templates, patch_source, top_n)
        self._prototype_cache[key] = (support, prototypes)  # keeps `support` alive so its ids stay unique
        if len(self._prototype_cache) > 4:
            self._prototype_cache.popitem(last=False)
        return prototypes

    # -- slide side -------------------------------------------------------------------------------
    def _forward(self, model_inputs, label_spec=None, templates=None, mode="patch_topk", patch_source="aggregator",
                 top_k=DEFAULT_TOP_K, temperature=TEMPERATURE, support=None, few_shot_top_n=FEW_SHOT_TOP_N,
                 return_patch_scores=False):
        templates = templates or check_templates(None)
        if support is not None:
            if mode != "patch_topk":
                raise ValueError("few-shot scoring (support=) is patch-level: use mode='patch_topk'.")
            prototypes = self._prototypes_for(support, label_spec, templates, patch_source, few_shot_top_n)
            labels, targets, patch_source = prototypes.labels, prototypes.prototypes, prototypes.patch_source
        else:
            if label_spec is None:
                raise ValueError("candidate_labels is required: a list of class names or {label: [synonyms]}.")
            labels = [label for label, _ in label_spec]
            targets = self.get_class_embeddings(label_spec, templates)
        if len(labels) == 1:
            logger.warning("wsi-zero-shot got a single candidate label %r: its score is always 1.0 (the patch "
                           "scores still rank the patches).", labels[0])
        model = self.model
        dtype = model.slide_projection.weight.dtype
        features = model_inputs["patch_features"].to(dtype)
        mask = model_inputs["patch_attention_mask"]
        targets = targets.to(device=features.device, dtype=dtype)
        needs_aggregator = mode == "slide" or patch_source == "aggregator"
        agg = model.aggregator(features, mask) if needs_aggregator else None
        patch_scores = None
        if mode == "patch_topk" or return_patch_scores:
            patch_scores = (project_patches(model, features, mask, patch_source, agg) @ targets.T).float()
        if mode == "slide":
            slide = F.normalize(model.slide_projection(agg.slide_embeds), dim=-1)
            similarities = (slide @ targets.T).float()
        else:
            similarities = topk_pool(patch_scores, top_k, mask)
        return {
            "logits": similarities / temperature,
            "similarities": similarities,
            "patch_scores": patch_scores if return_patch_scores else None,
            "meta": model_inputs["meta"],
            "labels": [labels] * features.shape[0],
        }

    def postprocess(self, model_outputs, return_patch_scores=False):
        labels = model_outputs["labels"]
        labels = labels[0] if isinstance(labels[0], list) else labels
        probs = model_outputs["logits"][0].softmax(dim=-1).tolist()
        predictions = [{"label": label, "score": score}
                       for score, label in sorted(zip(probs, labels), key=lambda x: -x[0])]
        if not return_patch_scores:
            return predictions
        meta = unbatch_meta(model_outputs["meta"])
        n = meta["num_patches"]
        return {
            "predictions": predictions,
            "labels": list(labels),
            "similarities": dict(zip(labels, model_outputs["similarities"][0].tolist())),
            "patch_scores": model_outputs["patch_scores"][0, :n].numpy(),
            "coords": meta["coords"],
            "patch_size_level0": meta["patch_size_level0"],
            "slide_path": meta["slide_path"],
            "source": meta["source"],
        }


def _item_key(item):
    if isinstance(item, (str, os.PathLike)):
        try:
            return ("path", os.fspath(item), os.stat(item).st_mtime_ns)
        except OSError:
            return ("path", os.fspath(item), None)
    return ("object", id(item))


__all__ = ["WSIZeroShotPipeline", "normalize_candidate_labels", "check_templates", "default_templates",
           "TEMPERATURE", "DEFAULT_TOP_K", "MODES"]
