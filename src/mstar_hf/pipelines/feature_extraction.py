"""`pipeline("wsi-feature-extraction")`: slide / features h5 / tensor -> mSTAR slide and patch embeddings.

>>> pipe = pipeline("wsi-feature-extraction", model="path/to/mstar")
>>> out = pipe("slide.svs")
>>> out["slide_embedding"].shape, out["patch_embeddings"].shape, out["patch_features"].shape, out["coords"].shape
((512,), (N, 512), (N, 1024), (N, 2))

* `slide_embedding`: the aggregator's class token ("mSTAR+" slide embedding, aggregator width);
* `patch_embeddings`: the aggregator's context-aware patch tokens (each patch re-embedded in the
  context of the whole slide, the Stage 2 teacher targets);
* `patch_features`: the patch encoder's features (computed here for a slide path, read from the
  file for an h5, as given for a tensor);
* `coords`: level-0 (x, y) of each patch (None for a tensor without coords).

With `project=True` the output also has `slide_embedding_shared`, the L2-normalised slide embedding
in the multimodal (text) space. Arrays are numpy (a slide has thousands of patches, so not nested
lists as transformers' `feature-extraction`); `return_tensors=True` gives torch tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .inputs import WSIPipeline, unbatch_meta


class WSIFeatureExtractionPipeline(WSIPipeline):
    r"""
    Slide and patch embeddings from an [`MStarModel`]; see the module docstring.

    Call arguments: inputs (slide path, features h5, `[N, D]` tensor, dict, or a list of them),
    `project` (`bool`, defaults to False), `return_tensors` (`bool`, defaults to False), and the
    slide-reading options of `load_wsi_input` (patch_size, target_mpp, min_tissue, mpp, seg_params,
    extraction_batch_size, extraction_workers, precision, progress).
    """

    def _sanitize_parameters(self, project=None, return_tensors=None, **kwargs):
        preprocess = self._split_preprocess(kwargs)
        if kwargs:
            raise TypeError(f"wsi-feature-extraction got unknown argument(s) {sorted(kwargs)}.")
        forward = {"project": bool(project)} if project is not None else {}
        postprocess = {"return_tensors": bool(return_tensors)} if return_tensors is not None else {}
        return preprocess, forward, postprocess

    def _forward(self, model_inputs, project=False):
        dtype = self.model.slide_projection.weight.dtype
        features = model_inputs["patch_features"].to(dtype)
        out = self.model.aggregator(features, model_inputs["patch_attention_mask"])
        result = {"slide_embedding": out.slide_embeds.float(), "patch_embeddings": out.patch_embeds.float(),
                  "patch_features": model_inputs["patch_features"].float(), "meta": model_inputs["meta"]}
        if project:
            result["slide_embedding_shared"] = F.normalize(self.model.slide_projection(out.slide_embeds), dim=-1).float()
        return result

    def postprocess(self, model_outputs, return_tensors=False):
        meta = unbatch_meta(model_outputs["meta"])
        n = meta["num_patches"]
        out = {
            "slide_embedding": model_outputs["slide_embedding"][0],
            "patch_embeddings": model_outputs["patch_embeddings"][0, :n],
            "patch_features": model_outputs["patch_features"][0, :n],
        }
        if "slide_embedding_shared" in model_outputs:
            out["slide_embedding_shared"] = model_outputs["slide_embedding_shared"][0]
        if not return_tensors:
            out = {k: v.numpy() for k, v in out.items()}
        coords = meta["coords"]
        out["coords"] = torch.from_numpy(coords) if return_tensors and coords is not None else coords
        out.update(num_patches=n, patch_size_level0=meta["patch_size_level0"], slide_path=meta["slide_path"],
                   source=meta["source"])
        return out


__all__ = ["WSIFeatureExtractionPipeline"]
