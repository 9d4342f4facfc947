"""The GPU-side options of extraction, checked on CPU: the cuCIM reader path (with a stand-in cuCIM
built on OpenSlide), fused attention, channels_last and pre-padded batches give the same features."""

import sys
import textwrap

import numpy as np
import pytest
import torch
from wsi_fixtures import cmu, tiny_model  # noqa: F401

from mstar_hf import MStarImageProcessor
from mstar_hf.wsi.errors import SlideError
from mstar_hf.wsi.extraction import enable_fused_attention, extract_slide_features, prepare_encoder
from mstar_hf.wsi.slide import open_slide

FAKE_CUCIM = '''
"""Stand-in for cuCIM's CuImage API (read_region(location, size, level) -> RGB array), via OpenSlide."""
import numpy as np
import openslide

CALLS = []


class CuImage:
    def __init__(self, path):
        self._osr = openslide.OpenSlide(path)

    def read_region(self, location, size, level):
        CALLS.append((tuple(location), tuple(size), level))
        return np.asarray(self._osr.read_region(tuple(location), level, tuple(size)))[..., :3]
'''


@pytest.fixture
def fake_cucim(tmp_path, monkeypatch):
    (tmp_path / "cucim").mkdir()
    (tmp_path / "cucim" / "__init__.py").write_text(textwrap.dedent(FAKE_CUCIM))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cucim", raising=False)
    import cucim

    cucim.CALLS.clear()
    yield cucim
    sys.modules.pop("cucim", None)


def test_cucim_reader_reads_what_openslide_reads(cmu, fake_cucim):
    coords = np.array([[0, 0], [512, 256], [1024, 1024]])
    model, processor = tiny_model(), MStarImageProcessor()
    with open_slide(cmu) as wsi:
        plan = wsi.plan_read(256, 0.5)
        expected = [wsi.read_patch_array(int(x), int(y), plan) for x, y in coords]
    _, reference = extract_slide_features(cmu, model, processor, coords=coords, num_workers=0, progress=False)
    with open_slide(cmu, reader="auto") as wsi:
        assert wsi._cu is not None
        for (x, y), want in zip(coords, expected):
            np.testing.assert_array_equal(wsi.read_patch_array(int(x), int(y), plan), want)
        # outside the slide cuCIM is not asked: OpenSlide's transparent pixels become white
        edge = wsi.read_level_array(wsi.dimensions[0] - 100, 0, 0, (256, 256))
        assert (edge[:, -50:] == 255).all()
    n_calls = len(fake_cucim.CALLS)
    assert n_calls == len(coords)
    _, feats = extract_slide_features(cmu, model, processor, coords=coords, num_workers=0, progress=False,
                                      reader="cucim")
    assert len(fake_cucim.CALLS) == n_calls + len(coords)
    np.testing.assert_array_equal(feats, reference)


def test_cucim_reader_requested_but_missing_is_a_clear_error(cmu, monkeypatch):
    monkeypatch.setattr("mstar_hf.wsi.slide.cucim_available", lambda: False)
    with pytest.raises(SlideError, match="cuCIM is not installed"):
        open_slide(cmu, reader="cucim")
    with open_slide(cmu, reader="auto") as wsi:  # auto falls back to OpenSlide
        assert wsi._cu is None
    with pytest.raises(ValueError, match="reader must be one of"):
        open_slide(cmu, reader="pyvips")


def test_prepared_encoder_gives_the_same_features(cmu, monkeypatch):
    model, processor = tiny_model(), MStarImageProcessor()
    for block in model.backbone.blocks:
        block.attn.fused_attn = False  # as with TIMM_FUSED_ATTN=0
    coords = np.array([[x, y] for x in (0, 256, 512) for y in (0, 256, 512)])
    _, plain = extract_slide_features(cmu, model, processor, coords=coords, num_workers=0, progress=False)
    encoder = prepare_encoder(model, torch.device("cpu"), channels_last=True)
    assert all(block.attn.fused_attn for block in model.backbone.blocks)
    assert enable_fused_attention(model) == len(model.backbone.blocks)
    assert model.backbone.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    _, prepared = extract_slide_features(cmu, encoder, processor, coords=coords, batch_size=4, num_workers=0,
                                         progress=False, pad_batches=True)
    np.testing.assert_allclose(prepared, plain, rtol=0, atol=2e-5)
