"""Synthetic pyramidal TIFFs: OpenSlide must see every level and the right resolution."""

import numpy as np
import openslide
import pytest

from mstar_hf.wsi.synthetic import make_synthetic_slide, make_tissue_image, write_pyramidal_tiff


def _saturation(img):
    import cv2

    return cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1]


def test_painter_is_deterministic_and_tissue_like():
    a = make_tissue_image(600, 800, seed=4)
    assert a.shape == (600, 800, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, make_tissue_image(600, 800, seed=4))
    assert not np.array_equal(a, make_tissue_image(600, 800, seed=5))
    tissue = _saturation(a) > 40
    assert 0.25 < tissue.mean() < 0.45  # default tissue_fraction 0.35
    background = a[~tissue]
    assert background.mean() > 230  # near-white glass


def test_painter_parameters():
    blank = make_tissue_image(256, 256, 0, tissue_fraction=0.0)
    assert (_saturation(blank) < 10).all()
    full = make_tissue_image(256, 256, 0, tissue_fraction=1.0, noise=0, nuclear_density=0,
                             base_color=(200, 100, 100), stroma_color=(200, 100, 100))
    assert np.abs(full.astype(int) - (200, 100, 100)).max() <= 1
    sparse = make_tissue_image(512, 512, 1, tissue_fraction=1.0, nuclear_density=1, noise=0)
    dense = make_tissue_image(512, 512, 1, tissue_fraction=1.0, nuclear_density=30, noise=0,
                              nucleus_color=(20, 20, 90))
    dark = lambda im: (im.mean(axis=2) < 110).mean()  # noqa: E731
    assert dark(dense) > 5 * dark(sparse)


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_openslide_sees_the_pyramid(tmp_path, compression):
    image = make_tissue_image(1500, 2600, seed=1)
    path = write_pyramidal_tiff(tmp_path / "s.tif", image, mpp=0.25, tile_size=256, min_level_size=300,
                                compression=compression)
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    s = openslide.OpenSlide(str(path))
    assert s.level_dimensions == ((2600, 1500), (1300, 750), (650, 375), (325, 187))
    assert s.level_downsamples[:3] == (1.0, 2.0, 4.0)
    assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
    assert float(s.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25)
    level0 = np.asarray(s.read_region((0, 0), 0, (2600, 1500)).convert("RGB")).astype(int)
    if compression == "zlib":
        np.testing.assert_array_equal(level0, image)
    else:
        assert np.abs(level0 - image).mean() < 3
    level1 = np.asarray(s.read_region((0, 0), 1, (1300, 750)).convert("RGB")).astype(int)
    assert np.abs(level1 - image[::2, ::2].astype(int)).mean() < 12  # a 2x reduction of level 0
    s.close()


def test_writer_validates_input(tmp_path):
    with pytest.raises(ValueError):
        write_pyramidal_tiff(tmp_path / "x.tif", np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError):
        write_pyramidal_tiff(tmp_path / "x.tif", np.zeros((64, 64, 3), np.uint8), tile_size=100)
    with pytest.raises(ValueError):
        write_pyramidal_tiff(tmp_path / "x.tif", np.zeros((64, 64, 3), np.uint8), compression="lzw")


def test_make_synthetic_slide_forwards_painter_arguments(tmp_path):
    path = make_synthetic_slide(tmp_path / "p.tif", 512, 512, seed=2, mpp=0.5, tissue_fraction=1.0, noise=0,
                                nuclear_density=0, base_color=(180, 60, 160), stroma_color=(180, 60, 160))
    s = openslide.OpenSlide(str(path))
    pixel = np.asarray(s.read_region((200, 200), 0, (1, 1)).convert("RGB"))[0, 0]
    assert np.abs(pixel.astype(int) - (180, 60, 160)).max() <= 4
    assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
