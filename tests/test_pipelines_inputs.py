"""WSI pipelines with a small untrained model: registration, input kinds, bad inputs, top-k pooling,
the class-embedding cache, few-shot prototypes, heatmap checks and save/reload with the pipeline code."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

import mstar_hf  # noqa: F401  (registers the tasks)
from mstar_hf.data import ZERO_SHOT_TEMPLATES, MStarProcessor, train_report_tokenizer, write_slide_features
from mstar_hf.pipelines import FewShotPrototypes, few_shot_prototypes
from mstar_hf.pipelines.few_shot import project_patches, topk_pool
from mstar_hf.pipelines.heatmap import save_heatmap, score_grid
from mstar_hf.presets import mstar_config

WIDTH = 64  # tiny patch encoder width
LABELS = ["adenocarcinoma", "squamous cell carcinoma", "clear cell carcinoma"]


@pytest.fixture(scope="module")
def parts():
    from mstar_hf import MStarModel

    reports = ["adenocarcinoma of the lung with glands", "squamous cell carcinoma with keratin pearls",
               "clear cell renal cell carcinoma"]
    tokenizer = train_report_tokenizer(reports, vocab_size=64)
    torch.manual_seed(0)
    model = MStarModel(mstar_config("tiny", num_genes=8, vocab_size=len(tokenizer))).eval()
    return model, MStarProcessor(tokenizer=tokenizer, max_length=64)


@pytest.fixture(scope="module")
def zs(parts):
    model, processor = parts
    return pipeline("wsi-zero-shot", model=model, processor=processor, device="cpu")


@pytest.fixture(scope="module")
def bags():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, WIDTH, generator=gen) for n in (7, 12, 3, 20, 9)]


def test_tasks_registered():
    tasks = PIPELINE_REGISTRY.get_supported_tasks()
    assert {"wsi-zero-shot", "wsi-feature-extraction"} <= set(tasks)
    assert "wsi-report-generation" in tasks  # report_generation.py is part of the package


def test_output_format_and_input_kinds(zs, bags, tmp_path):
    x = bags[0]
    out = zs(x, candidate_labels=LABELS)
    assert [set(d) for d in out] == [{"label", "score"}] * 3
    assert sorted(d["label"] for d in out) == sorted(LABELS)
    scores = [d["score"] for d in out]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    coords = np.arange(14).reshape(7, 2) * 256
    h5 = write_slide_features(tmp_path / "s.h5", x.numpy(), coords, patch_size_level0=256)
    for same in (x.numpy(), {"features": x, "coords": coords}, str(h5), h5):
        other = zs(same, candidate_labels=LABELS)
        assert [d["label"] for d in other] == [d["label"] for d in out]
        np.testing.assert_allclose([d["score"] for d in other], scores, rtol=1e-5, atol=1e-6)
    rich = zs(str(h5), candidate_labels=LABELS, return_patch_scores=True, mode="slide")
    plain = zs(str(h5), candidate_labels=LABELS, mode="slide")
    assert isinstance(rich, list) and [{k: d[k] for k in ("label", "score")} for d in rich] == plain  # same type
    for entry in rich:
        assert entry["patch_scores"].shape == (7,)
        np.testing.assert_array_equal(entry["coords"], coords)
        assert entry["patch_size_level0"] == 256 and entry["source"] == str(h5)
    # the per-label patch scores are the cosines of the aggregator's patch tokens with the class embedding
    classes = zs.get_class_embeddings(LABELS)
    with torch.no_grad():
        patches = project_patches(zs.model, x[None])[0]
    for entry in rich:
        want = patches @ classes[LABELS.index(entry["label"])]
        np.testing.assert_allclose(entry["patch_scores"], want.numpy(), rtol=1e-5, atol=1e-6)
    # top_k is the number of labels returned, as in zero-shot-image-classification
    assert zs(x, candidate_labels=LABELS, top_k=2) == out[:2]


def test_bad_labels_and_templates(zs, bags):
    x = bags[0]
    for empty in ([], {}, ()):
        with pytest.raises(ValueError, match="candidate_labels is empty"):
            zs(x, candidate_labels=empty)
    with pytest.raises(ValueError, match="candidate_labels is required"):
        zs(x)
    with pytest.raises(ValueError, match="given twice"):
        zs(x, candidate_labels=["a", "a"])
    with pytest.raises(ValueError, match="non-empty list of non-empty synonyms"):
        zs(x, candidate_labels={"a": [], "b": ["b"]})
    with pytest.raises(ValueError, match=r"CLASSNAME \(or \{\}\) slot.*'an image of a tumour.'"):
        zs(x, candidate_labels=LABELS, templates=["CLASSNAME.", "an image of a tumour."])
    with pytest.raises(ValueError, match="templates is empty"):
        zs(x, candidate_labels=LABELS, templates=[])
    with pytest.raises(ValueError, match="mode must be one of"):
        zs(x, candidate_labels=LABELS, mode="mean")
    with pytest.raises(ValueError, match="patch_source must be one of"):
        zs(x, candidate_labels=LABELS, patch_source="pixels")
    for bad in (0, -3, 2.5, "5", True):
        with pytest.raises(ValueError, match="top_k must be a positive integer"):
            zs(x, candidate_labels=LABELS, top_k=bad)
        with pytest.raises(ValueError, match="patch_top_k must be a positive integer"):
            zs(x, candidate_labels=LABELS, patch_top_k=bad)
    with pytest.raises(ValueError, match="not both"):
        zs(x, candidate_labels=LABELS, templates=["CLASSNAME."], hypothesis_template="a {}.")
    with pytest.raises(TypeError, match="unknown argument"):
        zs(x, candidate_labels=LABELS, topk=5)


def test_single_label_warns_and_scores_one(zs, bags):
    logger = hf_logging.get_logger("mstar_hf.pipelines.zero_shot")
    with CaptureLogger(logger) as captured:
        out = zs(bags[0], candidate_labels=["adenocarcinoma"], return_patch_scores=True)
    assert "single candidate label" in captured.out
    assert [(d["label"], d["score"]) for d in out] == [("adenocarcinoma", 1.0)]
    assert out[0]["patch_scores"].shape == (7,)


def test_bad_inputs_name_the_problem(zs, tmp_path):
    missing = tmp_path / "nope.svs"
    with pytest.raises(FileNotFoundError, match="nope.svs: no such file"):
        zs(str(missing), candidate_labels=LABELS)
    narrow = write_slide_features(tmp_path / "narrow.h5", np.zeros((5, 32), np.float32))
    with pytest.raises(ValueError, match=r"narrow\.h5: wrong feature width: expected 64, got 32"):
        zs(str(narrow), candidate_labels=LABELS)
    with pytest.raises(ValueError, match=r"<tensor>: wrong feature width: expected 64, got 10"):
        zs(torch.zeros(4, 10), candidate_labels=LABELS)
    with pytest.raises(ValueError, match="empty bag"):
        zs(torch.zeros(0, WIDTH), candidate_labels=LABELS)
    bad = torch.zeros(3, WIDTH)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf in 1 patch row"):
        zs(bad, candidate_labels=LABELS)
    with pytest.raises(TypeError, match="unsupported WSI input of type int"):
        zs(3, candidate_labels=LABELS)
    with pytest.raises(KeyError, match="needs a 'features' entry"):
        zs({"coords": np.zeros((3, 2))}, candidate_labels=LABELS)


def test_slide_without_tissue_is_a_clear_error(zs, tmp_path):
    from mstar_hf.wsi.errors import NoTissueError
    from mstar_hf.wsi.synthetic import write_pyramidal_tiff

    blank = write_pyramidal_tiff(tmp_path / "blank.tiff", np.full((768, 768, 3), 245, np.uint8), mpp=0.5)
    with pytest.raises(NoTissueError, match=r"blank\.tiff: no tissue"):
        zs(str(blank), candidate_labels=LABELS, extraction_workers=0)
    fe = pipeline("wsi-feature-extraction", model=zs.model, image_processor=zs.image_processor, device="cpu")
    with pytest.raises(NoTissueError, match=r"blank\.tiff"):
        fe(str(blank), extraction_workers=0)


def test_patch_top_k_larger_than_the_slide_uses_every_patch(zs, bags):
    x = bags[2]  # 3 patches
    big = zs(x, candidate_labels=LABELS, patch_top_k=1000, return_patch_scores=True)
    exact = zs(x, candidate_labels=LABELS, patch_top_k=3, return_patch_scores=True)
    assert [d["similarity"] for d in big] == [d["similarity"] for d in exact]
    for entry in big:
        np.testing.assert_allclose(entry["similarity"], entry["patch_scores"].mean(), rtol=1e-5, atol=1e-6)


def test_topk_pool_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 6, 4, generator=gen)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5], dtype=torch.bool)
    for k in (1, 2, 5, 50):
        pooled = topk_pool(scores, k, mask)
        for b in range(3):
            real = scores[b, mask[b]]
            want = real.topk(min(k, len(real)), dim=0).values.mean(0)
            torch.testing.assert_close(pooled[b], want)
    with pytest.raises(ValueError):
        topk_pool(scores, 0)


def test_class_embeddings_follow_the_recipe_and_are_cached(zs):
    model, tokenizer = zs.model, zs.tokenizer
    labels = {"adenocarcinoma": ["adenocarcinoma", "lung adenocarcinoma"], "squamous": ["squamous cell carcinoma"]}
    templates = ["CLASSNAME.", "an H&E image of CLASSNAME."]
    zs.clear_cache()
    calls = []
    hook = model.text_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = zs.get_class_embeddings(labels, templates)
        n_first = len(calls)
        again = zs.get_class_embeddings(labels, templates)
        assert len(calls) == n_first and again is first  # served from the cache
        zs(torch.randn(5, WIDTH), candidate_labels=labels, templates=templates)
        assert len(calls) == n_first  # the pipeline call reuses it too
        zs.get_class_embeddings(labels, templates[:1])
        assert len(calls) > n_first  # other templates: recomputed
    finally:
        hook.remove()
    with torch.no_grad():
        for row, synonyms in zip(first, labels.values()):
            prompts = [t.replace("CLASSNAME", s) for s in synonyms for t in templates]
            enc = tokenizer(prompts, padding=True, return_token_type_ids=False, return_tensors="pt")
            emb = F.normalize(model.get_text_features(enc["input_ids"], enc["attention_mask"], normalize=True).mean(0), dim=-1)
            torch.testing.assert_close(row, emb, rtol=1e-5, atol=1e-6)
    assert torch.allclose(first.norm(dim=-1), torch.ones(2))
    default = zs.get_class_embeddings(LABELS)
    assert zs.get_class_embeddings(LABELS, list(ZERO_SHOT_TEMPLATES)) is default
    assert zs.get_class_embeddings(tuple(LABELS)) is default


def test_few_shot_prototypes_are_top_n_means(zs, bags):
    model = zs.model
    gen = torch.Generator().manual_seed(3)
    class_embeddings = F.normalize(torch.randn(2, model.config.projection_dim, generator=gen), dim=-1)
    support = {"a": bags[:2], "b": bags[2:4]}
    protos = few_shot_prototypes(model, support, class_embeddings, top_n=5)
    assert isinstance(protos, FewShotPrototypes) and protos.labels == ["a", "b"]
    assert protos.num_support == {"a": 2, "b": 2} and protos.num_patches == {"a": 5, "b": 5}
    with torch.no_grad():
        for c, label in enumerate(protos.labels):
            patches = torch.cat([project_patches(model, x[None])[0] for x in support[label]])
            best = (patches @ class_embeddings[c]).topk(5).indices
            torch.testing.assert_close(protos.prototypes[c], F.normalize(patches[best].mean(0), dim=-1))
    # fewer patches than top_n: all of them
    assert few_shot_prototypes(model, {"a": [bags[2]]}, class_embeddings[:1], top_n=100).num_patches == {"a": 3}
    with pytest.raises(ValueError, match="support is empty"):
        few_shot_prototypes(model, {}, class_embeddings)
    with pytest.raises(ValueError, match="non-empty list of slides"):
        few_shot_prototypes(model, {"a": []}, class_embeddings[:1])


def test_few_shot_through_the_pipeline(zs, bags):
    support = {"a": bags[:2], "b": bags[2:4]}
    out = zs(bags[4], support=support)
    assert sorted(d["label"] for d in out) == ["a", "b"]
    protos = zs.build_prototypes(support)
    again = zs(bags[4], support=protos)
    assert [d["label"] for d in again] == [d["label"] for d in out]
    np.testing.assert_allclose([d["score"] for d in again], [d["score"] for d in out], rtol=1e-5)
    with pytest.raises(ValueError, match="differ"):
        zs(bags[4], support=support, candidate_labels=["a", "c"])
    with pytest.raises(ValueError, match="patch-level"):
        zs(bags[4], support=support, mode="slide")


def test_zero_shot_needs_a_tokenizer(parts, bags):
    model, processor = parts
    with_tokenizer = pipeline("wsi-zero-shot", model=model, tokenizer=processor.tokenizer, device="cpu")
    assert len(with_tokenizer(bags[0], candidate_labels=LABELS)) == 3
    with pytest.raises(ValueError, match="needs the text encoder's tokenizer"):
        pipeline("wsi-zero-shot", model=model, device="cpu")
    with pytest.raises(TypeError, match="needs an MStarModel"):
        pipeline("wsi-feature-extraction", model=model.aggregator, device="cpu")


def test_feature_extraction_on_tensors(parts, bags):
    model, processor = parts
    fe = pipeline("wsi-feature-extraction", model=model, processor=processor, device="cpu")
    out = fe(bags[1], project=True)
    hidden = model.config.aggregator_config.hidden_size
    assert out["slide_embedding"].shape == (hidden,) and out["patch_embeddings"].shape == (12, hidden)
    np.testing.assert_array_equal(out["patch_features"], bags[1].numpy())
    assert out["coords"] is None and out["num_patches"] == 12
    assert abs(np.linalg.norm(out["slide_embedding_shared"]) - 1) < 1e-5
    with torch.no_grad():
        ref = model.aggregator(bags[1][None])
    np.testing.assert_allclose(out["slide_embedding"], ref.slide_embeds[0].numpy(), rtol=1e-5, atol=1e-6)
    as_tensors = fe(bags[1], return_tensors=True)
    assert isinstance(as_tensors["patch_embeddings"], torch.Tensor)


def test_heatmap_checks_its_inputs(real_slide, tmp_path):
    with pytest.raises(ValueError, match="do not match"):
        save_heatmap(real_slide, np.zeros((3, 2)), np.zeros(4), 256, tmp_path / "h.png")
    with pytest.raises(ValueError, match="one value per patch"):
        save_heatmap(real_slide, np.zeros((3, 2)), np.zeros((3, 2)), 256, tmp_path / "h.png")
    grid = score_grid(np.array([[0, 0], [512, 0]]), np.array([1.0, 3.0]), 512, 256.0, (2, 4))
    np.testing.assert_array_equal(grid[0], [1.0, 1.0, 3.0, 3.0])


def test_save_pretrained_carries_the_pipeline_code(zs, parts, bags, tmp_path):
    model, processor = parts
    folder = tmp_path / "zs"
    zs.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"]["wsi-zero-shot"]["impl"] == "zero_shot.WSIZeroShotPipeline"
    assert config["custom_pipelines"]["wsi-zero-shot"]["pt"] == ["AutoModel"]
    for code in ("zero_shot.py", "inputs.py", "few_shot.py"):
        assert (folder / code).is_file()
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("wsi-zero-shot", model=str(folder), device="cpu")
    again = pipeline("wsi-zero-shot", model=str(folder), trust_remote_code=True, device="cpu")
    want = zs(bags[0], candidate_labels=LABELS)
    got = again(bags[0], candidate_labels=LABELS)
    assert [d["label"] for d in got] == [d["label"] for d in want]
    np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in want], rtol=1e-5, atol=1e-6)

    fe = pipeline("wsi-feature-extraction", model=model, processor=processor, device="cpu")
    fe.save_pretrained(tmp_path / "fe")
    fe2 = pipeline("wsi-feature-extraction", model=str(tmp_path / "fe"), trust_remote_code=True, device="cpu")
    np.testing.assert_allclose(fe2(bags[0])["slide_embedding"], fe(bags[0])["slide_embedding"], rtol=1e-5, atol=1e-6)
