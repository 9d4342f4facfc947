"""`pipeline("wsi-zero-shot")`: MI-Zero-style zero-shot (and few-shot) slide classification with mSTAR.

>>> from transformers import pipeline
>>> pipe = pipeline("wsi-zero-shot", model="org/mstar", trust_remote_code=True)   # or `import mstar_hf` first
>>> pipe("slide.svs", candidate_labels={"adenocarcinoma": ["lung adenocarcinoma", "adenocarcinoma"],
...                                      "squamous cell carcinoma": ["lung squamous cell carcinoma"]})
[{'label': 'adenocarcinoma', 'score': 0.93}, {'label': 'squamous cell carcinoma', 'score': 0.07}]
>>> pipe("slide.svs", candidate_labels="prompts/nsclc_prompts.json")   # a CONCH / mSTAR prompt file

Arguments and outputs follow transformers' `zero-shot-image-classification`: `candidate_labels`,
`hypothesis_template` (`{}` or `CLASSNAME` slot), `top_k` = how many labels are returned, a list of
`{"label", "score"}` sorted by score for every input (also with `return_patch_scores=True`, which adds
per-patch scores to each entry), `batch_size` 1 unless given. `candidate_labels` also takes synonyms
and the CONCH / mSTAR prompt layouts (`prompts.py`).

Class embeddings (as the authors' `zero_shot_classifier`): per class, every (template x synonym)
prompt is embedded with `model.get_text_features(normalize=True)`; the prompts are averaged and the
mean re-normalised (and averaged again over numbered prompt sets). They are cached per (labels,
synonyms, templates) on the pipeline, so a second call with the same labels runs no text encoder
(`clear_cache()` after changing the weights).

Scoring:

* `mode="patch_topk"` (default, MI-Zero): every patch is embedded in the shared space and compared
  (cosine) with every class; a class's slide score is the mean of its `patch_top_k` best patch scores.
  `patch_source` says which patch embedding: `"aggregator"` (default): the aggregator's context-aware
  patch tokens through `slide_projection`, the space Stage 1 aligns with text, so it works on any
  Stage-1 model; `"encoder"`: `model.get_patch_features(space="shared")` (patch encoder ->
  `patch_projection` -> `slide_projection`), the paper's route, meaningful once Stage 2 has trained
  `patch_projection`. `patch_top_k` defaults to 50: the authors' code has no single default, it
  evaluates k in (1, 5, 10, 50, 100) side by side; 50 is the middle of that range (robust to a few
  off-target patches, still a small share of a slide's thousands). A slide with fewer than
  `patch_top_k` patches uses all of them (as the authors' `min(j, N)`), never an error.
* `mode="slide"`: the aggregator's slide embedding (projected, normalised) against the classes.

Scores are `softmax(cosine / 0.07)` (the authors' temperature), sorted. A single candidate label is
allowed (a warning; its score is 1.0, but its patch scores still make a heatmap); no labels, duplicate
labels, labels that cannot be read as classes, or a template without a slot are errors.

Few-shot: `pipe(x, support={label: [support slides]})` builds prototypes (`few_shot_prototypes`:
mean of the top-100 support patches ranked by the class's text similarity) and scores the query with
the same top-k pooling against them; or pass `support=pipe.build_prototypes(...)` to reuse them.

This file travels with saved models as remote code (see `pipelines/remote.py`).
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
from .prompts import CLASSNAME, DEFAULT_TEMPLATES, ClassPrompts, check_templates, parse_candidate_labels

logger = logging.get_logger(__name__)

TEMPERATURE = 0.07
DEFAULT_PATCH_TOP_K = 50
MODES = ("patch_topk", "slide")
_CACHE_SIZE = 32


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


class WSIZeroShotPipeline(WSIPipeline):
    r"""
    Zero-shot (and few-shot) whole-slide classification with an [`MStarModel`]; see the module docstring.

    Arguments follow transformers' `zero-shot-image-classification` where they overlap.

    Call arguments:
        inputs: a slide path, a features .h5 path, a `[N, D]` tensor, a dict with `features` (and
            `coords`), or a list of them (batched, `batch_size` slides at a time; default 1).
        candidate_labels: class names, `{label: [synonyms]}`, a CONCH/mSTAR prompt dict (one or several
            numbered sets) or the path of a `.json` prompt file (`prompts.parse_candidate_labels`).
        hypothesis_template (`str` or `list[str]`, *optional*): prompt template(s) with a `{}` or `CLASSNAME`
            slot (default: the MI-Zero-style `prompts.DEFAULT_TEMPLATES`); `templates=` is the same argument.
        top_k (`int`, *optional*): return only the `top_k` best labels (default: all).
        mode (`str`, defaults to `"patch_topk"`): `"patch_topk"` or `"slide"`.
        patch_source (`str`, defaults to `"aggregator"`): `"aggregator"` or `"encoder"` patch embeddings.
        patch_top_k (`int`, defaults to 50): patches averaged per class in `"patch_topk"` mode.
        temperature (`float`, defaults to 0.07): softmax temperature.
        support (`dict[str, list]` or [`FewShotPrototypes`], *optional*): few-shot support slides.
        few_shot_top_n (`int`, defaults to 100): patches per few-shot prototype.
        return_patch_scores (`bool`, defaults to False): add per-patch cosines to each returned label.
        patch_size, target_mpp, min_tissue, mpp, seg_params, extraction_batch_size, extraction_workers,
        precision, progress: how a slide path is tiled and encoded (see `load_wsi_input`).

    Returns:
        Per input, a list of `{"label", "score"}` sorted by score (always a list). With
        `return_patch_scores=True` each entry also has `similarity` (the pooled or slide cosine),
        `patch_scores` (`np.ndarray` `[N]`, the cosine of every patch with that class) and, shared by the
        entries, `coords` (`[N, 2]` or None), `patch_size_level0`, `slide_path` and `source`: what
        `heatmap.save_zero_shot_heatmap` draws.
    """

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        if self.tokenizer is None:
            raise ValueError("wsi-zero-shot needs the text encoder's tokenizer: pass processor= (an MStarProcessor) "
                             "or tokenizer=, or a model folder saved with its processor.")
        self._text_cache: OrderedDict = OrderedDict()
        self._prototype_cache: OrderedDict = OrderedDict()

    # -- parameters -------------------------------------------------------------------------------
    def _sanitize_parameters(self, candidate_labels=None, hypothesis_template=None, templates=None, top_k=None,
                             mode=None, patch_source=None, patch_top_k=None, temperature=None, support=None,
                             few_shot_top_n=None, return_patch_scores=None, **kwargs):
        preprocess = self._split_preprocess(kwargs)
        if kwargs:
            raise TypeError(f"wsi-zero-shot got unknown argument(s) {sorted(kwargs)}.")
        forward, postprocess = {}, {}
        if hypothesis_template is not None and templates is not None:
            raise ValueError("give hypothesis_template or templates (the same argument), not both.")
        template_arg = "templates" if templates is not None else "hypothesis_template"
        templates = check_templates(templates if templates is not None else hypothesis_template, template_arg)
        if candidate_labels is not None:
            prompts = parse_candidate_labels(candidate_labels)
            if templates is not None and any(t is not None for _, t in prompts.sets):
                raise ValueError(f"candidate_labels is a prompt set with its own templates; {template_arg} would "
                                 "replace them: give one or the other.")
            forward["prompts"] = prompts
        if templates is not None:
            forward["templates"] = templates
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
            forward["mode"] = mode
        if patch_source is not None:
            if patch_source not in PATCH_SOURCES:
                raise ValueError(f"patch_source must be one of {PATCH_SOURCES}, got {patch_source!r}.")
            forward["patch_source"] = patch_source
        if patch_top_k is not None:
            forward["patch_top_k"] = _positive_int(patch_top_k, "patch_top_k")
        if top_k is not None:
            postprocess["top_k"] = _positive_int(top_k, "top_k")
        if temperature is not None:
            if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
                raise ValueError(f"temperature must be a positive number, got {temperature!r}.")
            forward["temperature"] = float(temperature)
        if support is not None:
            forward["support"] = support
        if few_shot_top_n is not None:
            forward["few_shot_top_n"] = _positive_int(few_shot_top_n, "few_shot_top_n")
        if return_patch_scores is not None:
            forward["return_patch_scores"] = postprocess["return_patch_scores"] = bool(return_patch_scores)
        return preprocess, forward, postprocess

    # -- text side --------------------------------------------------------------------------------
    @torch.no_grad()
    def get_class_embeddings(self, candidate_labels, templates=None) -> torch.Tensor:
        """L2-normalised class embeddings `[C, projection_dim]`, in the order of the labels.

        Per prompt set and class: every (template x synonym) prompt is embedded, the prompts averaged and
        re-normalised; with several sets the per-set embeddings are averaged and re-normalised. Cached
        per (labels, synonyms, templates)."""
        prompts = parse_candidate_labels(candidate_labels).with_templates(
            check_templates(templates) or DEFAULT_TEMPLATES)
        if prompts in self._text_cache:
            self._text_cache.move_to_end(prompts)
            return self._text_cache[prompts]
        per_set = [torch.stack([self._embed_prompts(texts) for texts in classes])
                   for classes in prompts.prompts(DEFAULT_TEMPLATES)]
        embeds = per_set[0] if len(per_set) == 1 else F.normalize(torch.stack(per_set).mean(dim=0), dim=-1)
        self._text_cache[prompts] = embeds
        if len(self._text_cache) > _CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return embeds

    def _embed_prompts(self, prompts: list[str], chunk: int = 128) -> torch.Tensor:
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
        support patches come from `candidate_labels` (any accepted form) or, if None, the labels."""
        prompts = self._support_prompts(support, candidate_labels)
        class_embeddings = self.get_class_embeddings(prompts, templates)
        with torch.no_grad():
            return few_shot_prototypes(self.model, {label: support[label] for label in prompts.labels},
                                       class_embeddings, top_n=top_n, patch_source=patch_source,
                                       load_input=lambda item: self.load_input(item, **load_options))

    @staticmethod
    def _support_prompts(support, candidate_labels) -> ClassPrompts:
        if not isinstance(support, Mapping) or not support:
            raise ValueError("support must be a non-empty dict {label: [support slides]} or FewShotPrototypes.")
        if candidate_labels is None:
            return parse_candidate_labels(list(support))
        prompts = parse_candidate_labels(candidate_labels)
        if set(prompts.labels) != set(support):
            raise ValueError(f"candidate_labels {list(prompts.labels)} and the support labels {list(support)} differ.")
        return prompts

    def _prototypes_for(self, support, prompts, templates, patch_source, top_n) -> FewShotPrototypes:
        if isinstance(support, FewShotPrototypes):
            if prompts is not None and set(prompts.labels) != set(support.labels):
                raise ValueError(f"candidate_labels {list(prompts.labels)} and the prototypes' labels "
                                 f"{support.labels} differ.")
            return support
        prompts = self._support_prompts(support, prompts)
        key = (prompts, templates, patch_source, top_n,
               tuple((label, tuple(_item_key(x) for x in support[label])) for label in prompts.labels))
        hit = self._prototype_cache.get(key)
        if hit is not None and hit[0] is support:
            return hit[1]
        prototypes = self.build_prototypes(support, prompts, templates, patch_source, top_n)
        self._prototype_cache[key] = (support, prototypes)  # keeps `support` alive so its ids stay unique
        if len(self._prototype_cache) > 4:
            self._prototype_cache.popitem(last=False)
        return prototypes

    # -- slide side -------------------------------------------------------------------------------
    def _forward(self, model_inputs, prompts=None, templates=None, mode="patch_topk", patch_source="aggregator",
                 patch_top_k=DEFAULT_PATCH_TOP_K, temperature=TEMPERATURE, support=None, few_shot_top_n=FEW_SHOT_TOP_N,
                 return_patch_scores=False):
        if support is not None:
            if mode != "patch_topk":
                raise ValueError("few-shot scoring (support=) is patch-level: use mode='patch_topk'.")
            prototypes = self._prototypes_for(support, prompts, templates, patch_source, few_shot_top_n)
            labels, targets, patch_source = prototypes.labels, prototypes.prototypes, prototypes.patch_source
        else:
            if prompts is None:
                raise ValueError("candidate_labels is required: a list of class names, {label: [synonyms]}, a "
                                 "CONCH/mSTAR prompt dict or the path of a .json prompt file.")
            labels = list(prompts.labels)
            targets = self.get_class_embeddings(prompts, templates)
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
            similarities = topk_pool(patch_scores, patch_top_k, mask)
        return {
            "logits": similarities / temperature,
            "similarities": similarities,
            "patch_scores": patch_scores if return_patch_scores else None,
            "meta": model_inputs["meta"],
            "labels": [labels] * features.shape[0],
        }

    def postprocess(self, model_outputs, top_k=None, return_patch_scores=False):
        labels = model_outputs["labels"]
        labels = labels[0] if isinstance(labels[0], list) else labels
        probs = model_outputs["logits"][0].softmax(dim=-1).tolist()
        order = sorted(range(len(labels)), key=lambda c: -probs[c])[:top_k]
        predictions = [{"label": labels[c], "score": probs[c]} for c in order]
        if return_patch_scores:
            meta = unbatch_meta(model_outputs["meta"])
            n = meta["num_patches"]
            similarities = model_outputs["similarities"][0].tolist()
            patch_scores = model_outputs["patch_scores"][0, :n].numpy()
            shared = {key: meta[key] for key in ("coords", "patch_size_level0", "slide_path", "source")}
            for c, entry in zip(order, predictions):
                entry.update(similarity=similarities[c], patch_scores=patch_scores[:, c], **shared)
        return predictions


def _item_key(item):
    if isinstance(item, (str, os.PathLike)):
        try:
            return ("path", os.fspath(item), os.stat(item).st_mtime_ns)
        except OSError:
            return ("path", os.fspath(item), None)
    return ("object", id(item))


__all__ = ["WSIZeroShotPipeline", "parse_candidate_labels", "check_templates", "TEMPERATURE", "DEFAULT_PATCH_TOP_K",
           "MODES", "CLASSNAME"]
