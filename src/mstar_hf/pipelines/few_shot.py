"""Patch projection, top-k pooling and few-shot prototypes (the shared math of the zero-/few-shot pipeline).

Few-shot as in the mSTAR authors' code: per class, all patches of its support slides are projected
into the shared space and ranked by their cosine with that class's text embedding; the prototype is
the mean of the top `top_n` (100) of them, re-normalised. Query slides are then scored exactly like
zero-shot, with the prototypes in place of the text class embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PATCH_SOURCES = ("aggregator", "encoder")
FEW_SHOT_TOP_N = 100  # the authors' few-shot code keeps max(topj) = 100 patches per class


def project_patches(model, patch_features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    patch_source: str = "aggregator", aggregator_output=None) -> torch.Tensor:
    """L2-normalised per-patch embeddings in the shared (text) space, `[B, N, projection_dim]`.

    patch_source="aggregator": the aggregator's context-aware patch tokens through `slide_projection`
        (the space Stage 1 aligns with text; meaningful after Stage 1).
    patch_source="encoder": the encoder features through `patch_projection` + `slide_projection`
        (`model.get_patch_features(space="shared")`, the Stage 2 student path; meaningful after Stage 2).
    Padded rows (mask False) are whatever the projection gives; callers mask them.
    """
    if patch_source == "aggregator":
        out = aggregator_output if aggregator_output is not None else model.aggregator(patch_features, attention_mask)
        embeds = model.slide_projection(out.patch_embeds)
    elif patch_source == "encoder":
        embeds = model.get_patch_features(patch_features=patch_features, space="shared").pooler_output
    else:
        raise ValueError(f"patch_source must be one of {PATCH_SOURCES}, got {patch_source!r}.")
    return F.normalize(embeds, dim=-1)


def topk_pool(scores: torch.Tensor, top_k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the `top_k` highest patch scores per class: `[B, N, C]` -> `[B, C]`.

    A slide with fewer than `top_k` (real) patches uses all of them, as the authors' `topj_pooling`
    (k = min(top_k, N)); padded patches never count.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    batch, num, _ = scores.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, num, dtype=torch.bool, device=scores.device)
    ranked = scores.masked_fill(~attention_mask[..., None], float("-inf")).sort(dim=1, descending=True).values
    k = attention_mask.sum(dim=1).clamp(max=top_k).clamp(min=1)  # [B]
    keep = torch.arange(num, device=scores.device)[None, :] < k[:, None]  # [B, N]
    return (ranked.masked_fill(~keep[..., None], 0.0).sum(dim=1)) / k[:, None].to(scores.dtype)


@dataclass
class FewShotPrototypes:
    """Class prototypes in the shared space, usable as `pipe(..., support=prototypes)`.

    labels (`list[str]`): class order. prototypes (`torch.FloatTensor` `[C, projection_dim]`), L2-normalised.
    num_support (`dict[str, int]`): support slides per class. num_patches (`dict[str, int]`): patches
    averaged into each prototype (min(top_n, patches of the class)). patch_source, top_n: how they were built.
    """

    labels: list[str]
    prototypes: torch.Tensor
    num_support: dict = field(default_factory=dict)
    num_patches: dict = field(default_factory=dict)
    patch_source: str = "aggregator"
    top_n: int = FEW_SHOT_TOP_N


@torch.no_grad()
def few_shot_prototypes(
    model,
    support: Mapping[str, Sequence],
    class_embeddings: torch.Tensor | Mapping[str, torch.Tensor],
    top_n: int = FEW_SHOT_TOP_N,
    patch_source: str = "aggregator",
    load_input: Callable | None = None,
) -> FewShotPrototypes:
    """Prototypes from support slides: `{label: [inputs]}` -> `FewShotPrototypes`.

    class_embeddings: the text class embeddings that rank each class's patches, `[C, P]` in the order
        of `support`'s labels, or `{label: [P]}`.
    inputs: anything `mstar_hf.pipelines.inputs.load_wsi_input` takes (slide / h5 path, `[N, D]` tensor,
        dict); `load_input(item) -> WSIInput` overrides how they are read (the pipeline passes its own,
        which encodes slides with the model's patch encoder).
    """
    from .inputs import load_wsi_input

    labels = list(support)
    if not labels:
        raise ValueError("few-shot support is empty: give {label: [support slides]} with at least one label.")
    if isinstance(class_embeddings, Mapping):
        missing = [lab for lab in labels if lab not in class_embeddings]
        if missing:
            raise KeyError(f"no text class embedding for support label(s) {missing}.")
        class_embeddings = torch.stack([torch.as_tensor(class_embeddings[lab]) for lab in labels])
    if class_embeddings.shape[0] != len(labels):
        raise ValueError(f"got {class_embeddings.shape[0]} class embeddings for {len(labels)} support labels.")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}.")
    feature_dim = int(model.config.aggregator_config.input_dim)
    if load_input is None:
        def load_input(item):
            return load_wsi_input(item, feature_dim, model.patch_model)

    device = model.slide_projection.weight.device
    dtype = model.slide_projection.weight.dtype
    class_embeddings = F.normalize(class_embeddings.to(device=device, dtype=dtype), dim=-1)
    prototypes, num_support, num_patches = [], {}, {}
    for c, label in enumerate(labels):
        items = support[label]
        if isinstance(items, (str, torch.Tensor)) or not isinstance(items, Sequence) or len(items) == 0:
            raise ValueError(f"few-shot support for {label!r} must be a non-empty list of slides, got {type(items).__name__}.")
        patches = []
        for item in items:
            bag = load_input(item)
            feats = bag.features.to(device=device, dtype=dtype)[None]
            patches.append(project_patches(model, feats, None, patch_source)[0])
        patches = torch.cat(patches)
        n = min(top_n, len(patches))
        best = (patches @ class_embeddings[c]).topk(n).indices
        prototypes.append(F.normalize(patches[best].mean(dim=0), dim=-1))
        num_support[label], num_patches[label] = len(items), n
    return FewShotPrototypes(labels, torch.stack(prototypes), num_support, num_patches, patch_source, top_n)


__all__ = ["FewShotPrototypes", "few_shot_prototypes", "project_patches", "topk_pool", "PATCH_SOURCES",
           "FEW_SHOT_TOP_N"]
