"""`wsi-report-generation`: slide / h5 / tensor inputs, batching, generation kwargs, bad input."""

import numpy as np
import pytest
import torch
from report_generation_fixtures import (
    grid_coords,
    load_training_script,
    one_thread,
    overfit,
    tiny_report_config,
    type_features,
)
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY

import mstar_hf  # noqa: F401
from mstar_hf import MStarForReportGeneration, MStarPatchModel, build_report_labels
from mstar_hf.pipelines.report_generation import PIPELINE_TASK, WSIReportGenerationPipeline
from mstar_hf.presets import patch_config
from mstar_hf.wsi.features import write_features

DIM = 64  # the tiny patch encoder's width
REPORTS = ["Adenocarcinoma of the lung, grade 2. Tumor cells are TTF-1 positive.",
           "Squamous cell carcinoma, keratinizing. Tumor cells are p40 positive.",
           "Clear cell renal cell carcinoma. Margins are negative for tumor."]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny report generator (carrying a tiny patch encoder) briefly trained so its text depends on the slide."""
    if "wsi-report-generation" not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(**PIPELINE_TASK)
    folder = tmp_path_factory.mktemp("report_pipeline_model")
    tokenizer = load_training_script().train_bpe_tokenizer(REPORTS * 2, vocab_size=500, min_frequency=1)
    torch.manual_seed(0)
    model = MStarForReportGeneration(tiny_report_config(input_dim=DIM, vocab_size=len(tokenizer),
                                                        bos_token_id=tokenizer.bos_token_id,
                                                        eos_token_id=tokenizer.eos_token_id,
                                                        pad_token_id=tokenizer.pad_token_id))
    rng = np.random.default_rng(0)
    feats = torch.zeros(3, 20, DIM)
    for t in range(3):
        feats[t] = torch.from_numpy(type_features(t, 20, rng, dim=DIM))
    batch = {"patch_features": feats, "patch_coords": torch.from_numpy(grid_coords(20))[None].repeat(3, 1, 1),
             "labels": build_report_labels(tokenizer, REPORTS, max_length=64)}
    overfit(model, batch, steps=60, lr=3e-3)
    model.attach_patch_model(MStarPatchModel(patch_config("tiny")).eval())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reporter(model_dir):
    # the folder carries the pipeline code (custom_pipelines); load_pipeline serves it with the installed code
    from mstar_hf.pipelines import load_pipeline

    return load_pipeline("wsi-report-generation", str(model_dir), device="cpu")


def _slide_features(type_index: int, num: int = 20, seed: int = 1):
    rng = np.random.default_rng(seed + type_index)
    return torch.from_numpy(type_features(type_index, num, rng, dim=DIM)), torch.from_numpy(grid_coords(num))


def test_pipeline_is_built_from_the_folder(reporter):
    assert isinstance(reporter, WSIReportGenerationPipeline)
    assert reporter.patch_model is reporter.model.patch_model and reporter.tokenizer is not None


def test_real_slide_end_to_end(reporter, real_slide):
    out = reporter(str(real_slide), extraction_workers=0, max_new_tokens=12)
    assert isinstance(out, list) and len(out) == 1 and set(out[0]) == {"generated_text"}
    assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"]
    print("report for", real_slide.name, "->", repr(out[0]["generated_text"]))


def test_h5_tensor_and_dict_inputs_agree(reporter, tmp_path):
    feats, coords = _slide_features(0)
    h5 = write_features(tmp_path / "slide.h5", coords.numpy(), feats.numpy())
    from_h5 = reporter(str(h5), max_new_tokens=30)
    from_dict = reporter({"features": feats, "coords": coords}, max_new_tokens=30)
    from_numpy = reporter({"features": feats.numpy(), "coords": coords.numpy()}, max_new_tokens=30)
    assert from_h5 == from_dict == from_numpy
    assert from_dict[0]["generated_text"] == REPORTS[0], "the briefly trained model writes its type's report"
    from_tensor = reporter(feats, max_new_tokens=30)  # no coords: regions follow the patch order
    assert len(from_tensor) == 1 and isinstance(from_tensor[0]["generated_text"], str)


def test_batched_equals_one_by_one(reporter, tmp_path):
    inputs = []
    for t, n in ((0, 20), (1, 13), (2, 27)):
        feats, coords = _slide_features(t, num=n)
        inputs.append({"features": feats, "coords": coords})
    feats, coords = _slide_features(1, num=17)
    inputs.append(str(write_features(tmp_path / "other.h5", coords.numpy(), feats.numpy())))
    inputs.append(_slide_features(2, num=9)[0])  # a tensor without coords, batched apart
    single = [reporter(x, max_new_tokens=30) for x in inputs]
    for size in (2, 5):
        assert reporter(inputs, batch_size=size, max_new_tokens=30) == single
    streamed = reporter((x for x in inputs), batch_size=2, max_new_tokens=30)  # a generator is streamed
    assert list(streamed) == single
    texts = [s[0]["generated_text"] for s in single[:3]]
    assert len(set(texts)) >= 2, f"the text should depend on the slide: {texts}"


def test_generation_kwargs_pass_through(reporter):
    feats, coords = _slide_features(1)
    item = {"features": feats, "coords": coords}
    two = reporter(item, num_beams=3, num_return_sequences=2, max_new_tokens=10)
    assert len(two) == 2 and all(isinstance(d["generated_text"], str) for d in two)
    short = reporter(item, num_beams=1, max_new_tokens=3)[0]["generated_text"]
    assert len(reporter.tokenizer(short, add_special_tokens=False)["input_ids"]) <= 3
    torch.manual_seed(0)
    sampled = reporter(item, do_sample=True, top_k=5, max_new_tokens=10)
    assert len(sampled) == 1
    kept = reporter(item, num_beams=1, max_new_tokens=40, skip_special_tokens=False)[0]["generated_text"]
    assert kept.startswith("<s>")


def test_patch_model_argument(model_dir, real_slide):
    model = MStarForReportGeneration.from_pretrained(model_dir)
    patch_model = model.patch_model
    model.patch_model = None
    model.config.patch_config = None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bare = WSIReportGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")
    with pytest.raises(ValueError, match="needs a patch encoder"):
        bare(str(real_slide), extraction_workers=0)
    given = WSIReportGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu", patch_model=patch_model)
    out = given(str(real_slide), extraction_workers=0, target_mpp=1.0, max_new_tokens=5)
    assert isinstance(out[0]["generated_text"], str)


def test_bad_input(reporter, tmp_path):
    missing = tmp_path / "nowhere" / "slide.svs"
    with pytest.raises(FileNotFoundError, match="nowhere/slide.svs: no such file"):
        reporter(str(missing))
    narrow = write_features(tmp_path / "narrow.h5", grid_coords(5), np.zeros((5, 8), np.float32))
    with pytest.raises(ValueError, match="narrow.h5: wrong feature width: expected 64, got 8"):
        reporter(str(narrow))
    with pytest.raises(ValueError, match="wrong feature width: expected 64, got 8"):
        reporter(torch.zeros(5, 8))
    with pytest.raises(ValueError, match="empty list"):
        reporter([])
    with pytest.raises(ValueError, match="empty bag"):
        reporter(torch.zeros(0, DIM))
    with pytest.raises(TypeError, match="unsupported WSI input"):
        reporter(42)
    with pytest.raises(ValueError, match="3 coords for 5 patches"):
        reporter({"features": torch.zeros(5, DIM), "coords": torch.zeros(3, 2)})


def test_save_pretrained_and_reload(reporter, tmp_path):
    import json

    feats, coords = _slide_features(2)
    expected = reporter({"features": feats, "coords": coords}, max_new_tokens=20)
    reporter.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["custom_pipelines"]["wsi-report-generation"]["impl"] == "report_generation.WSIReportGenerationPipeline"
    assert (tmp_path / "saved" / "report_generation.py").is_file()
    reloaded = pipeline("wsi-report-generation", model=str(tmp_path / "saved"), device="cpu", trust_remote_code=True)
    assert reloaded({"features": feats, "coords": coords}, max_new_tokens=20) == expected
