"""The demo's stand-in for UNI: a small ViT pretrained on painted tiles of other types to tell tissue patterns."""

import json

import numpy as np
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
