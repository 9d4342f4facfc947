"""The demo's stand-in for UNI: a small ViT pretrained on painted tiles of other types to tell tissue patterns."""

import json

import numpy as np
import pytest
import torch

from mstar_hf.data.synthetic_tissue import PATTERNS, draw_stain
from mstar_hf.training_utils.tissue_pretraining import FIRST_TYPE, painted_tiles, pretrain_tissue_encoder


def test_tiles_carry_pattern_shares_of_types_the_cohorts_never_use():
    from mstar_hf.demo import MAX_TYPES

    assert FIRST_TYPE >= MAX_TYPES  # nothing about the demo cohorts' types is learned
    tiles, shares = painted_tiles(2, seed=1, slide_size=512)
    assert len(tiles) == len(shares) >= 1 and tiles[0].shape == (256, 256, 3) and tiles[0].dtype == np.uint8
    assert shares.shape[1] == len(PATTERNS) and np.allclose(shares.sum(1), 1.0)
    again, again_shares = painted_tiles(2, seed=1, slide_size=512, num_workers=1)
    # seeded, one stream per slide: the same tiles with one painting thread as with two
    assert len(again) == len(tiles) and all(np.array_equal(a, b) for a, b in zip(tiles, again))
    assert np.array_equal(shares, again_shares)


def test_narrow_stain_pool_varies_less():
    wide = [draw_stain(np.random.default_rng(i))["scale_h"] for i in range(200)]
    narrow = [draw_stain(np.random.default_rng(i), spread=0.3)["scale_h"] for i in range(200)]
    assert np.std(narrow) < 0.4 * np.std(wide)
    # spread 1 is the cohort's pool, draw for draw
    assert draw_stain(np.random.default_rng(5))["scale_e"] == draw_stain(np.random.default_rng(5), spread=1.0)["scale_e"]


def test_pretraining_lowers_the_loss_and_saves_a_loadable_encoder(tmp_path):
    from mstar_hf.modeling import MStarImageProcessor, MStarPatchModel

    record = pretrain_tissue_encoder(tmp_path / "enc", num_slides=3, steps=30, batch_size=16, seed=0, quiet=True)
    assert record["last_loss"] < record["first_loss"]
    assert record["target_entropy"] <= record["last_loss"] + 1e-6  # the soft-label floor
    assert json.loads((tmp_path / "enc" / "pretraining.json").read_text())["steps"] == 30
    model = MStarPatchModel.from_pretrained(tmp_path / "enc")
    MStarImageProcessor.from_pretrained(tmp_path / "enc")
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(2, 3, 224, 224)).pooler_output
    assert out.shape == (2, model.config.hidden_size)


def test_the_cache_trains_once_and_gives_the_same_weights(tmp_path, caplog):
    from safetensors.torch import load_file

    from mstar_hf.training_utils.tissue_pretraining import cached_tissue_encoder, pretraining_key

    cache, settings = tmp_path / "cache", dict(num_slides=2, steps=4, batch_size=8, seed=3)
    first = cached_tissue_encoder(tmp_path / "a", cache_dir=cache, quiet=True, **settings)
    second = cached_tissue_encoder(tmp_path / "b", cache_dir=cache, quiet=True, **settings)
    fresh = cached_tissue_encoder(tmp_path / "c", use_cache=False, quiet=True, **settings)
    assert (first["cache"], second["cache"], fresh["cache"]) == ("stored", "hit", "off")
    entry = cache / "tissue_encoder" / pretraining_key(**{**settings, "size": "tiny", "learning_rate": 1e-3,
                                                          "stain_spread": 0.3, "warmup_fraction": 0.1})
    assert second["cache_entry"] == str(entry) and not list(entry.parent.glob(".*"))  # no staging left behind
    weights = [load_file(tmp_path / name / "model.safetensors") for name in "abc"]
    for name in weights[0]:  # a hit is the trained model to the bit, and so is training it again
        assert torch.equal(weights[0][name], weights[1][name]) and torch.equal(weights[0][name], weights[2][name])
    assert json.loads((tmp_path / "b" / "pretraining.json").read_text())["cache"] == "hit"
    # other settings are another entry; a damaged entry is trained again, with a warning naming it
    assert cached_tissue_encoder(tmp_path / "d", cache_dir=cache, quiet=True, **{**settings, "seed": 4})["cache"] == "stored"
    (entry / "model.safetensors").unlink()
    again = cached_tissue_encoder(tmp_path / "e", cache_dir=cache, quiet=True, **settings)
    assert again["cache"] == "stored" and str(entry) in caplog.text and "model.safetensors" in caplog.text
    with pytest.raises(TypeError, match="stepz"):
        cached_tissue_encoder(tmp_path / "f", cache_dir=cache, stepz=3)


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from mstar_hf.training_utils.tissue_pretraining import CACHE_ENV, default_cache_dir

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.setenv(CACHE_ENV, "off")
    assert default_cache_dir() is None
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir().name == "mstar_hf"


def test_an_unwritable_cache_still_trains_and_says_why(tmp_path, caplog):
    from mstar_hf.training_utils.tissue_pretraining import cached_tissue_encoder

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache should be")
    record = cached_tissue_encoder(tmp_path / "enc", cache_dir=blocker, quiet=True, num_slides=2, steps=2, batch_size=8)
    assert record["cache"] == "off" and record["cache_entry"] is None
    assert (tmp_path / "enc" / "model.safetensors").is_file()
    assert str(blocker) in caplog.text and "MSTAR_HF_CACHE" in caplog.text
