"""Slide access: resolution, level choice, reads at a target resolution, clear errors for bad files."""

import os

import numpy as np
import openslide
import pytest
import tifffile
from wsi_fixtures import cmu, copy_to, slide_40x, synthetic_slide  # noqa: F401

from mstar_hf.wsi.errors import MissingMppError, SlideError
from mstar_hf.wsi.slide import open_slide
from mstar_hf.wsi.synthetic import _ensure_jpeg_codec, make_tissue_image


def test_real_slide_metadata_and_reads(cmu):
    with open_slide(cmu) as wsi:
        assert wsi.dimensions == (2220, 2967)
        assert wsi.level_count == 1
        assert wsi.mpp == pytest.approx(0.499)
        assert wsi.mpp_source == "openslide.mpp-x"
        assert wsi.best_level_for_mpp(0.5) == 0
        plan = wsi.plan_read(256, 0.5)
        # 0.499 vs 0.5 um/px is within tolerance: read 256 px directly, no blurring 257 -> 256 resample.
        assert (plan.level, plan.read_size, plan.patch_size_level0) == (0, 256, 256)
        patch = wsi.read_region_at(1000, 1500, 256, 0.5)
        assert patch.mode == "RGB" and patch.size == (256, 256)
        direct = np.asarray(openslide.OpenSlide(str(cmu)).read_region((1000, 1500), 0, (256, 256)).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(patch), direct)
        # 10x from a 20x single-level slide: read level 0 (the only one) and shrink.
        low = wsi.read_region_at(0, 0, (300, 200), 1.0)
        assert low.size == (300, 200)
        assert wsi.read_counts[0] == 2
        thumb = wsi.thumbnail(512)
        assert max(thumb.size) == 512 and thumb.size[0] < thumb.size[1]


def test_pyramid_reads_the_coarsest_sufficient_level():
    path = slide_40x()
    with open_slide(path) as wsi:
        assert wsi.level_count == 4
        assert wsi.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        assert wsi.mpp == pytest.approx(0.25)
        assert [wsi.best_level_for_mpp(m) for m in (0.2, 0.25, 0.3, 0.5, 0.9, 1.0, 2.0, 50)] == [0, 0, 0, 1, 1, 2, 3, 3]
        plan = wsi.plan_read(256, 0.5)
        assert (plan.level, plan.read_size, plan.patch_size_level0) == (1, 256, 512)
        patch = np.asarray(wsi.read_region_at(1024, 512, 256, 0.5))
        direct = np.asarray(openslide.OpenSlide(str(path)).read_region((1024, 512), 1, (256, 256)).convert("RGB"))
        np.testing.assert_array_equal(patch, direct)
        # 0.75 um/px: level 1 (0.5) read at 384 px and shrunk, never level 0.
        region = wsi.read_region_at(0, 0, 256, 0.75)
        assert region.size == (256, 256)
        assert set(wsi.read_counts) == {1} and wsi.read_counts[1] == 2


def test_out_of_bounds_reads_are_white_not_black():
    with open_slide(slide_40x()) as wsi:
        w, h = wsi.dimensions
        arr = np.asarray(wsi.read_region_at(w - 256, h - 256, 256, 0.5))  # half the patch lies outside
        assert arr.shape == (256, 256, 3)
        assert (arr[-10:, -10:] == 255).all()


def test_mpp_from_objective_power(tmp_path):
    # An Aperio-style TIFF with AppMag but no MPP: OpenSlide reports objective-power 40 only.
    _ensure_jpeg_codec()
    path = tmp_path / "appmag.svs"
    with tifffile.TiffWriter(path) as tw:
        tw.write(make_tissue_image(512, 512, 0), tile=(256, 256), photometric="rgb", compression="jpeg",
                 description="Aperio Image Library v12.0.0\n512x512 [0,0 512x512] (256x256) JPEG/RGB Q=90|AppMag = 40",
                 metadata=None)
    with open_slide(path) as wsi:
        assert "openslide.mpp-x" not in wsi.properties
        assert wsi.mpp == pytest.approx(0.25) and wsi.mpp_source == "openslide.objective-power"
        assert wsi.magnification == pytest.approx(40)


def test_missing_mpp_needs_override():
    path = synthetic_slide("nompp", 1024, 1024, seed=3, mpp=None)
    with pytest.raises(MissingMppError) as err:
        open_slide(path)
    assert str(path) in str(err.value) and "--mpp" in str(err.value)
    with open_slide(path, mpp_override=0.5) as wsi:
        assert wsi.mpp == 0.5 and wsi.mpp_source == "override"
    with open_slide(path, default_mpp=0.5) as wsi:
        assert wsi.mpp == 0.5 and wsi.mpp_source == "--mpp"
    with pytest.raises(SlideError, match="positive"):
        open_slide(path, mpp_override=-1)


def test_override_wins_over_metadata_and_default_does_not(cmu):
    with open_slide(cmu, mpp_override=0.25) as wsi:
        assert wsi.mpp == 0.25 and wsi.plan_read(256, 0.5).read_size == 512
    with open_slide(cmu, default_mpp=0.25) as wsi:
        assert wsi.mpp == pytest.approx(0.499) and wsi.mpp_source == "openslide.mpp-x"


@pytest.mark.parametrize("kind", ["text", "missing", "directory", "png", "truncated", "empty"])
def test_bad_files_raise_slide_error_naming_the_file(tmp_path, cmu, kind):
    if kind == "text":
        path = tmp_path / "notes.svs"
        path.write_text("this is not a slide\n")
    elif kind == "missing":
        path = tmp_path / "missing.svs"
    elif kind == "empty":  # an interrupted download
        path = tmp_path / "empty.svs"
        path.touch()
    elif kind == "directory":
        path = tmp_path / "folder.svs"
        path.mkdir()
    elif kind == "png":
        from PIL import Image

        path = tmp_path / "picture.tif"
        Image.fromarray(make_tissue_image(64, 64, 0)).save(path.with_suffix(".png"))
        path = path.with_suffix(".png")
    else:
        path = copy_to(cmu, tmp_path / "truncated.svs")
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert str(path) in str(err.value)
    if kind == "truncated":
        assert "truncated" in str(err.value)
    if kind == "empty":
        assert "empty file (0 bytes)" in str(err.value)


def test_corrupt_tiles_fail_at_read_time_naming_the_file(tmp_path):
    path = copy_to(synthetic_slide("tocorrupt", 1024, 1024, seed=5, mpp=0.5, tissue_fraction=0.9), tmp_path / "c.tif")
    with tifffile.TiffFile(path) as tf:
        offset, count = tf.pages[0].dataoffsets[5], tf.pages[0].databytecounts[5]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00garbage" * (count // 8))
    with open_slide(path) as wsi:  # opening only checks the smallest level
        wsi.read_region_at(0, 0, 256, 0.5)  # tile 0 is intact
        with pytest.raises(SlideError) as err:
            wsi.read_region_at(256, 256, 256, 0.5)  # tile 5 (row 1, col 1) is not
    assert str(path) in str(err.value) and "corrupt" in str(err.value)
