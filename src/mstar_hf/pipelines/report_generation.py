"""`wsi-report-generation`: a whole-slide image (or its patch features) -> a pathology report.

    import mstar_hf
    from transformers import pipeline

    reporter = pipeline("wsi-report-generation", model="runs/reports")
    reporter("slide.svs")                     # [{"generated_text": "..."}]
    reporter("features/slide.h5", num_beams=1, max_new_tokens=60)
    reporter([{"features": feats, "coords": coords}, "other.h5"], batch_size=8)   # one list per input

Inputs: a slide file (tissue segmentation, tiling and patch encoding with `mstar_hf.wsi`; the patch encoder
is the one the model carries, `model.patch_model`, or `patch_model=` given to the pipeline), a features h5
(`coords`, `features`), a features tensor / array `[N, D]`, or a dict `{"features": [N, D], "coords": [N, 2]}`.
A list (or a dataset / generator, streamed) is read item by item and generated in batches of `batch_size`
(default 1, as in transformers); a slide gets the same report alone or in a batch. Generation
kwargs (`num_beams`, `max_new_tokens`, `do_sample`, `top_k`, `num_return_sequences`, `generation_config`,
...) pass through to `model.generate`; the defaults come from the model's generation config (beam 3,
at most 100 new tokens).

Without mstar_hf: `pipeline("wsi-report-generation", model=repo_or_folder, trust_remote_code=True)` (this file
travels with the model, see `pipelines/remote.py`).
"""

import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, Pipeline

from .inputs import FEATURE_SUFFIXES, PREPROCESS_PARAMS, load_wsi_input, save_pipeline


class WSIReportGenerationPipeline(Pipeline):
    """Generates a report for each slide; returns `[{"generated_text": str}]` per input (one dict per
    returned sequence). See the module docstring for inputs and parameters.

    Slide parameters (for slide files, as in the other WSI pipelines): `patch_size` (256), `target_mpp` (0.5,
    i.e. 20x), `min_tissue` (0.5), `mpp` (override of the slide's resolution), `seg_params`,
    `extraction_batch_size` (64), `extraction_workers` (2), `precision` ("fp32"), `progress` (False).
    `skip_special_tokens` (True) goes to decoding.
    """

    _load_tokenizer = True
    _load_image_processor = None
    _load_processor = False
    _load_feature_extractor = False
    _pipeline_calls_generate = True

    def __init__(self, *args, patch_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model.eval()  # no dropout: a slide gets the same report alone or in a batch
        self.patch_model = patch_model if patch_model is not None else getattr(self.model, "patch_model", None)
        if self.patch_model is not None:
            self._check_width(self.patch_model.config.hidden_size, "the patch model")

    def save_pretrained(self, save_directory, **kwargs):
        """Saves the model, tokenizer and the pipeline code (`custom_pipelines` in config.json), so that
        `pipeline("wsi-report-generation", model=save_directory, trust_remote_code=True)` rebuilds it."""
        save_pipeline(self, save_directory, **kwargs)

    # ----- parameters -----
    def _sanitize_parameters(self, generate_kwargs=None, skip_special_tokens=None, **kwargs):
        preprocess = {k: kwargs.pop(k) for k in PREPROCESS_PARAMS if k in kwargs}
        forward = dict(generate_kwargs or {})
        forward.update(kwargs)  # everything else is a generation parameter
        postprocess = {} if skip_special_tokens is None else {"skip_special_tokens": skip_special_tokens}
        return preprocess, forward, postprocess

    @property
    def input_dim(self) -> int:
        return self.model.config.aggregator_config.input_dim

    def _check_width(self, width: int, what: str):
        if width != self.input_dim:
            raise ValueError(f"wsi-report-generation: wrong feature width for {what}: expected {self.input_dim}-d "
                             f"patch features, got {width}-d.")

    # ----- calls -----
    def __call__(self, inputs, **kwargs):
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(inputs, list) and not inputs:
            raise ValueError("wsi-report-generation: got an empty list of inputs.")
        return super().__call__(inputs, **kwargs)

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """Lists, datasets and generators: slides are read one by one and generated `batch_size` at a time
        (results in input order, one list of dicts per input)."""

        def results():
            chunk = []
            for item in inputs:
                chunk.append(item)
                if len(chunk) == batch_size:
                    yield from self._run_chunk(chunk, preprocess_params, forward_params, postprocess_params)
                    chunk = []
            if chunk:
                yield from self._run_chunk(chunk, preprocess_params, forward_params, postprocess_params)

        return results()

    def _run_chunk(self, inputs: list, preprocess_params, forward_params, postprocess_params) -> list:
        items = [self.preprocess(x, **preprocess_params) for x in inputs]
        results = [None] * len(items)
        # slides with and without coords are generated apart: a batch shares one region rule
        for with_coords in (True, False):
            rows = [i for i, it in enumerate(items) if ("patch_coords" in it) == with_coords]
            if rows:
                outputs = self.forward(collate_slides([items[i] for i in rows]), **forward_params)
                for i, out in zip(rows, self.postprocess(outputs, **postprocess_params)):
                    results[i] = out
        return results

    def run_single(self, inputs, preprocess_params, forward_params, postprocess_params):
        outputs = self.forward(self.preprocess(inputs, **preprocess_params), **forward_params)
        return self.postprocess(outputs, **postprocess_params)[0]

    # ----- steps -----
    def preprocess(self, inputs, **options) -> dict:
        """One input -> a batch of one; inputs are read by the WSI pipelines' shared `load_wsi_input`."""
        if self.patch_model is None and isinstance(inputs, (str, os.PathLike)):
            path = Path(inputs)
            if path.is_file() and path.suffix.lower() not in FEATURE_SUFFIXES:
                raise ValueError(
                    f"wsi-report-generation: {path} is a slide, which needs a patch encoder: pass patch_model= to the "
                    "pipeline, or use a model that carries one (MStarForReportGeneration.attach_patch_model)."
                )
        bag = load_wsi_input(inputs, self.input_dim, self.patch_model, self.image_processor, self.device, **options)
        item = {"patch_features": bag.features[None],
                "patch_attention_mask": torch.ones(1, bag.features.shape[0], dtype=torch.bool)}
        if bag.coords is not None:
            item["patch_coords"] = torch.from_numpy(np.asarray(bag.coords, dtype=np.int64))[None]
        return item

    def _forward(self, model_inputs: dict, **generate_kwargs) -> dict:
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        inputs = dict(model_inputs)
        inputs["patch_features"] = inputs["patch_features"].to(self.model.dtype)
        sequences = self.model.generate(**inputs, **generate_kwargs)
        return {"sequences": sequences, "num_inputs": model_inputs["patch_features"].shape[0]}

    def postprocess(self, model_outputs: dict, skip_special_tokens: bool = True) -> list:
        texts = self.tokenizer.batch_decode(model_outputs["sequences"], skip_special_tokens=skip_special_tokens)
        per_input = len(texts) // model_outputs["num_inputs"]
        return [[{"generated_text": t.strip()} for t in texts[i * per_input:(i + 1) * per_input]]
                for i in range(model_outputs["num_inputs"])]


def collate_slides(items: list[dict]) -> dict:
    """Right-pads preprocessed slides into one batch; coords are kept when every slide has them."""
    longest = max(it["patch_features"].shape[1] for it in items)
    width = items[0]["patch_features"].shape[2]
    batch = {"patch_features": torch.zeros(len(items), longest, width),
             "patch_attention_mask": torch.zeros(len(items), longest, dtype=torch.bool)}
    with_coords = all("patch_coords" in it for it in items)
    if with_coords:
        batch["patch_coords"] = torch.zeros(len(items), longest, 2, dtype=torch.long)
    for i, it in enumerate(items):
        n = it["patch_features"].shape[1]
        batch["patch_features"][i, :n] = it["patch_features"][0]
        batch["patch_attention_mask"][i, :n] = True
        if with_coords:
            batch["patch_coords"][i, :n] = it["patch_coords"][0]
    return batch


PIPELINE_TASK = {
    "task": "wsi-report-generation",
    "pipeline_class": WSIReportGenerationPipeline,
    "pt_model": AutoModelForImageTextToText,
    "type": "multimodal",
}

__all__ = ["PIPELINE_TASK", "WSIReportGenerationPipeline", "collate_slides"]
