"""Tissue segmentation and the patch grid at a target magnification."""

import numpy as np
import pytest
from wsi_fixtures import cmu, slide_40x, synthetic_slide, white_slide  # noqa: F401

from mstar_hf.wsi.errors import NoTissueError, SlideTooSmallError
from mstar_hf.wsi.segmentation import segment_tissue
from mstar_hf.wsi.slide import open_slide
from mstar_hf.wsi.synthetic import write_pyramidal_tiff
from mstar_hf.wsi.tiling import tile_slide


def test_real_slide_tissue_and_grid(cmu):
    with open_slide(cmu) as wsi:
        tissue = segment_tissue(wsi)
        assert 0.25 < tissue.tissue_fraction < 0.42  # "roughly a third"
        assert tissue.mask.dtype == bool and tissue.image.shape[:2] == tissue.mask.shape
        assert tissue.downsample[0] == pytest.approx(2220 / tissue.mask.shape[1])
        grid = tile_slide(wsi, patch_size=256, target_mpp=0.5, min_tissue=0.5, tissue=tissue)
    assert 12 <= len(grid) <= 60  # "a few dozen"
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (len(grid), 2)
    assert grid.patch_size_level0 == 256 and grid.plan.level == 0
    x, y = grid.coords.T
    assert (x >= 0).all() and (y >= 0).all() and (x + 256 <= 2220).all() and (y + 256 <= 2967).all()
    assert (x % 256 == 0).all() and (y % 256 == 0).all()  # non-overlapping grid from the origin
    assert (grid.tissue_fraction >= 0.5).all()
    assert len(np.unique(grid.coords, axis=0)) == len(grid)
    # row-major order
    assert np.all(np.diff(y * 10_000 + x) > 0)
    attrs = grid.attrs()
    assert attrs["target_magnification"] == 20 and attrs["patch_size"] == 256 and attrs["level0_width"] == 2220


def test_tissue_threshold_parameters(cmu):
    with open_slide(cmu) as wsi:
        loose = tile_slide(wsi, min_tissue=0.1)
        strict = tile_slide(wsi, min_tissue=0.9)
        everything = tile_slide(wsi, min_tissue=0.0)
        assert len(strict) < len(tile_slide(wsi)) < len(loose) < len(everything)
        assert len(everything) == everything.n_candidates == (2220 // 256) * (2967 // 256)
        with pytest.raises(NoTissueError):
            tile_slide(wsi, threshold=254)  # a fixed saturation threshold nothing reaches


def test_40x_slide_tiles_at_20x_from_level_1():
    with open_slide(slide_40x()) as wsi:
        grid = tile_slide(wsi, patch_size=256, target_mpp=0.5)
        assert grid.plan.level == 1 and grid.plan.read_size == 256 and grid.patch_size_level0 == 512
        assert grid.attrs()["patch_level"] == 1
        # segmentation used a coarse level, never level 0
        assert 0 not in wsi.read_counts
        W, H = wsi.dimensions
        assert len(grid) > 10
        assert (grid.coords[:, 0] + 512 <= W).all() and (grid.coords[:, 1] + 512 <= H).all()
        assert (grid.coords % 512 == 0).all()
        # 10x patches come from level 2
        assert tile_slide(wsi, target_mpp=1.0).plan.level == 2


def test_overlap_changes_the_stride(cmu):
    with open_slide(cmu) as wsi:
        grid = tile_slide(wsi, patch_size=256, overlap=64, min_tissue=0.0)
    assert grid.stride_level0 == 192
    assert (grid.coords % 192 == 0).all()
    assert len(grid) == ((2220 - 256) // 192 + 1) * ((2967 - 256) // 192 + 1)


def test_white_slide_has_no_tissue():
    path = white_slide()
    with open_slide(path) as wsi:
        assert segment_tissue(wsi).tissue_fraction == 0.0
        with pytest.raises(NoTissueError) as err:
            tile_slide(wsi)
    assert str(path) in str(err.value) and "no tissue" in str(err.value)


def test_slide_smaller_than_one_patch(tmp_path):
    path = write_pyramidal_tiff(tmp_path / "tiny.tif", np.full((400, 400, 3), 200, np.uint8), mpp=0.25)
    with open_slide(path) as wsi:
        with pytest.raises(SlideTooSmallError) as err:
            tile_slide(wsi)  # 20x patch needs 512 px at 0.25 um/px
        assert str(path) in str(err.value)
        assert len(tile_slide(wsi, patch_size=128, min_tissue=0.0)) == 1


def test_bad_parameters(cmu):
    with open_slide(cmu) as wsi:
        with pytest.raises(ValueError):
            tile_slide(wsi, overlap=256)
        with pytest.raises(ValueError):
            tile_slide(wsi, min_tissue=1.5)


def test_small_holes_filled_and_specks_removed(tmp_path):
    image = np.full((2048, 2048, 3), 242, np.uint8)
    image[256:1792, 256:1792] = (200, 120, 170)  # a tissue square...
    image[1000:1016, 1000:1016] = 242  # ...with a small hole (16 px at 0.5 um/px = 64 um^2... small)
    image[100:104, 100:104] = (200, 120, 170)  # and a speck far from it
    path = write_pyramidal_tiff(tmp_path / "square.tif", image, mpp=0.5, compression="zlib")
    with open_slide(path) as wsi:
        tissue = segment_tissue(wsi)
    sx, sy = tissue.downsample
    assert tissue.mask[int(1008 / sy), int(1008 / sx)]  # hole filled
    assert not tissue.mask[: int(200 / sy), : int(200 / sx)].any()  # speck dropped
    assert tissue.tissue_fraction == pytest.approx((1536 / 2048) ** 2, abs=0.03)
    assert len(tissue.contours()) == 1


def test_segmentation_on_painted_tissue():
    path = synthetic_slide("frac", 2048, 2048, seed=9, mpp=0.5, tissue_fraction=0.4)
    with open_slide(path) as wsi:
        assert segment_tissue(wsi).tissue_fraction == pytest.approx(0.4, abs=0.08)
