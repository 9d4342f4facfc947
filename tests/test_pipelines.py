"""WSI pipelines with a model trained in the test (see pipeline_fixtures.py): zero-shot in both modes
and few-shot classify held-out synthetic slides well above chance; every pipeline runs end to end on
the real CMU-1-Small-Region slide; batched lists give the one-by-one results; a slide path gives
what its extracted features give; loading by folder gives what the instance gives."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_fixtures import NUM_TYPES, SUPPORT_PER_TYPE, accuracy, build_trained_fixture
from transformers import pipeline

import mstar_hf  # noqa: F401  (registers the tasks)
from mstar_hf.pipelines import save_heatmap, save_zero_shot_heatmap

CHANCE = 1 / NUM_TYPES


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return build_trained_fixture(tmp_path_factory.mktemp("pipelines"))


@pytest.fixture(scope="session")
def zs(trained):
    return pipeline("wsi-zero-shot", model=trained.model, processor=trained.processor, device="cpu")


@pytest.fixture(scope="session")
def fe(trained):
    return pipeline("wsi-feature-extraction", model=trained.model, processor=trained.processor, device="cpu")


def _held_out(trained):
    return [p for p, _, _ in trained.test], [t for _, t, _ in trained.test]


def test_stage1_fixture_learned(trained):
    assert np.mean(trained.losses[-5:]) < 0.7 * np.mean(trained.losses[:5]), trained.losses


def test_zero_shot_slide_mode_above_chance(trained, zs):
    x, y = _held_out(trained)
    acc = accuracy(zs(x, candidate_labels=trained.labels, mode="slide"), y)
    print(f"\nzero-shot, slide mode: held-out accuracy {acc:.3f} on {len(y)} slides (chance {CHANCE:.3f})")
    assert acc >= CHANCE + 0.4


def test_zero_shot_patch_topk_above_chance(trained, zs):
    x, y = _held_out(trained)
    accs = {}
    for source in ("aggregator", "encoder"):
        accs[source] = accuracy(zs(x, candidate_labels=trained.labels, mode="patch_topk", patch_source=source), y)
    print(f"\nzero-shot, patch_topk (patch_top_k=50): held-out accuracy {accs} on {len(y)} slides (chance {CHANCE:.3f})")
    assert accs["aggregator"] >= CHANCE + 0.4
    assert accs["encoder"] >= CHANCE + 0.3


def test_few_shot_above_chance(trained, zs):
    x, y = _held_out(trained)
    assert all(len(v) == SUPPORT_PER_TYPE for v in trained.support.values())
    out = zs(x, support=trained.support, candidate_labels=trained.labels)
    acc = accuracy(out, y)
    print(f"\nfew-shot, {SUPPORT_PER_TYPE} support slides per class: held-out accuracy {acc:.3f} (chance {CHANCE:.3f})")
    assert acc >= CHANCE + 0.4


def test_batched_equals_one_by_one(trained, zs, fe):
    x, _ = _held_out(trained)
    x = x[:7]  # a batch of 4 and one of 3, of slides with different numbers of patches
    for kwargs in ({"mode": "slide"}, {"mode": "patch_topk", "return_patch_scores": True}):
        batched = zs(x, candidate_labels=trained.labels, batch_size=4, **kwargs)
        single = [zs(item, candidate_labels=trained.labels, **kwargs) for item in x]
        for b, s in zip(batched, single):
            assert [d["label"] for d in b] == [d["label"] for d in s]
            np.testing.assert_allclose([d["score"] for d in b], [d["score"] for d in s], rtol=1e-4, atol=1e-5)
            for db, ds in zip(b, s):
                if "patch_scores" in ds:
                    np.testing.assert_allclose(db["patch_scores"], ds["patch_scores"], rtol=1e-4, atol=1e-5)
    batched = fe(x, batch_size=4)
    assert len({b["num_patches"] for b in batched}) > 1
    for item, b in zip(x, batched):
        s = fe(item)
        assert b["patch_embeddings"].shape == s["patch_embeddings"].shape
        np.testing.assert_allclose(b["slide_embedding"], s["slide_embedding"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b["patch_embeddings"], s["patch_embeddings"], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(b["coords"], s["coords"])


def test_slide_path_gives_what_its_features_give(trained, zs):
    h5, _, slide = trained.test[0]
    from_slide = zs(slide, candidate_labels=trained.labels, return_patch_scores=True, extraction_workers=0)
    from_h5 = zs(h5, candidate_labels=trained.labels, return_patch_scores=True)
    assert [d["label"] for d in from_slide] == [d["label"] for d in from_h5]
    for a, b in zip(from_slide, from_h5):
        np.testing.assert_array_equal(a["coords"], b["coords"])
        np.testing.assert_allclose(a["patch_scores"], b["patch_scores"], rtol=1e-4, atol=1e-5)
    assert from_slide[0]["slide_path"] == slide and from_slide[0]["patch_size_level0"] == 256
    # the slide the h5 records (mstar-hf extract writes its path), so the h5's patch scores can be drawn
    assert Path(from_h5[0]["slide_path"]) == Path(slide).resolve()


def test_loading_by_folder(trained, zs):
    # the folder carries the pipeline code (custom_pipelines), which transformers runs only when trusted
    by_path = pipeline("wsi-zero-shot", model=str(trained.model_dir), device="cpu", trust_remote_code=True)
    x, _ = _held_out(trained)
    want = zs(x[0], candidate_labels=trained.labels, mode="slide")
    got = by_path(x[0], candidate_labels=trained.labels, mode="slide")
    assert [d["label"] for d in got] == [d["label"] for d in want]
    np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in want], rtol=1e-5, atol=1e-6)


def test_zero_shot_on_the_real_slide_with_heatmap(trained, zs, real_slide, tmp_path):
    out = zs(str(real_slide), candidate_labels=trained.labels, return_patch_scores=True, extraction_workers=0)
    n = len(out[0]["coords"])
    assert n > 10 and all(d["patch_scores"].shape == (n,) for d in out)
    assert out[0]["coords"].dtype == np.int64 and out[0]["slide_path"] == str(real_slide)
    assert sorted(d["label"] for d in out) == sorted(trained.labels)
    assert abs(sum(d["score"] for d in out) - 1) < 1e-5
    assert all(np.all(np.abs(d["patch_scores"]) <= 1 + 1e-5) for d in out)
    png = save_zero_shot_heatmap(out, tmp_path / "heatmap.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and min(im.size) > 200
    label = out[1]["label"]
    png2 = save_heatmap(real_slide, out[1]["coords"], out[1]["patch_scores"], out[1]["patch_size_level0"],
                        tmp_path / "class1.png", title=f"cosine with {label}")
    assert png2.stat().st_size > 10_000


def test_feature_extraction_on_the_real_slide(trained, fe, real_slide):
    out = fe(str(real_slide), project=True)  # default: 2 reader processes
    config = trained.model.config
    n = out["num_patches"]
    hidden, width = config.aggregator_config.hidden_size, config.patch_config.hidden_size
    assert out["slide_embedding"].shape == (hidden,)
    assert out["patch_embeddings"].shape == (n, hidden) and out["patch_features"].shape == (n, width)
    assert out["coords"].shape == (n, 2) and out["patch_size_level0"] > 0
    assert out["slide_embedding_shared"].shape == (config.projection_dim,)
    assert np.isfinite(out["patch_embeddings"]).all()
    # the patch features are the model's own patch encoder's
    from mstar_hf.wsi.extraction import extract_slide_features

    coords, feats = extract_slide_features(real_slide, trained.model.patch_model, trained.processor.image_processor,
                                           num_workers=0, progress=False)
    np.testing.assert_array_equal(out["coords"], coords)
    np.testing.assert_allclose(out["patch_features"], feats, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        ref = trained.model.aggregator(torch.from_numpy(feats)[None])
    np.testing.assert_allclose(out["slide_embedding"], ref.slide_embeds[0].numpy(), rtol=1e-4, atol=1e-5)
