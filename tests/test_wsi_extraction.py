"""Batched feature extraction: worker reads equal direct reads, features equal the model on the processor's output."""

import csv

import numpy as np
import openslide
import pytest
import tifffile
import torch
from PIL import Image
from wsi_fixtures import cmu, copy_to, slide_40x, synthetic_slide, tiny_model, white_slide  # noqa: F401

from mstar_hf import MStarImageProcessor
from mstar_hf.wsi.errors import SlideError
from mstar_hf.wsi.extraction import (PatchDataset, PatchTransform, extract_features, extract_slide_features,
                                     make_patch_loader)
from mstar_hf.wsi.features import open_features
from mstar_hf.wsi.slide import open_slide
from mstar_hf.wsi.tiling import tile_slide


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def processor():
    return MStarImageProcessor()


def _reference_features(model, processor, path, coords, target_mpp=0.5):
    with open_slide(path) as wsi:
        images = [wsi.read_region_at(int(x), int(y), 256, target_mpp) for x, y in coords]
    with torch.inference_mode():
        return model(pixel_values=processor(images, return_tensors="pt")["pixel_values"]).pooler_output.numpy()


@pytest.mark.parametrize("kwargs", [{}, {"size": {"height": 160, "width": 160}, "resample": 3,
                                         "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}])
def test_transform_matches_the_image_processor(kwargs):
    processor = MStarImageProcessor(**kwargs)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(3)]
    expected = processor([Image.fromarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
    got = PatchTransform(processor)(torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]))
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_worker_patches_equal_direct_reads_from_level_1():
    path = slide_40x()
    with open_slide(path) as wsi:
        grid = tile_slide(wsi)
    coords = grid.coords[:20]
    direct = openslide.OpenSlide(str(path))
    expected = [np.asarray(direct.read_region((int(x), int(y)), 1, (256, 256)).convert("RGB")) for x, y in coords]
    # In-process: count which level each read used.
    ds = PatchDataset(path, coords, grid.plan)
    for i, exp in enumerate(expected):
        np.testing.assert_array_equal(ds[i].permute(1, 2, 0).numpy(), exp)
    assert dict(ds._wsi.read_counts) == {1: len(coords)}
    # Through two worker processes with their own handles: same pixels, same order.
    batches = list(make_patch_loader(PatchDataset(path, coords, grid.plan), 8, 2, pin_memory=False))
    got = torch.cat(batches).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(got, np.stack(expected))


def test_slide_features_equal_the_model_on_processor_output(model, processor):
    path = slide_40x()
    coords, feats = extract_slide_features(path, model, processor, batch_size=16, num_workers=2, progress=False,
                                           min_patches_for_workers=0)  # through the reader processes
    with open_slide(path) as wsi:
        grid = tile_slide(wsi)
    np.testing.assert_array_equal(coords, grid.coords)
    assert feats.shape == (len(coords), model.config.hidden_size) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, _reference_features(model, processor, path, coords), atol=1e-5)
    # Same features without workers; the caller's handle then shows which levels were read.
    with open_slide(path) as wsi:
        _, feats0 = extract_slide_features(wsi, model, processor, batch_size=7, num_workers=0, progress=False)
        assert wsi.read_counts[1] == len(coords) and 0 not in wsi.read_counts
    np.testing.assert_allclose(feats0, feats, atol=1e-5)


def test_given_coords_and_real_slide(model, processor, cmu):
    coords = np.array([[0, 0], [1024, 1536], [1900, 2700]])
    got_coords, feats = extract_slide_features(cmu, model, processor, coords=coords, num_workers=1, progress=False,
                                               min_patches_for_workers=0)
    np.testing.assert_array_equal(got_coords, coords)
    np.testing.assert_allclose(feats, _reference_features(model, processor, cmu, coords), atol=1e-5)


def test_bf16_autocast_is_close_to_fp32(model, processor, cmu):
    coords = np.array([[512, 512], [1024, 1536], [768, 2048]])
    _, fp32 = extract_slide_features(cmu, model, processor, coords=coords, num_workers=0, progress=False)
    _, bf16 = extract_slide_features(cmu, model, processor, coords=coords, num_workers=0, progress=False,
                                     precision="bf16")
    assert bf16.dtype == np.float32
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert (cos > 0.98).all()
    with pytest.raises(ValueError, match="precision"):
        extract_slide_features(cmu, model, processor, coords=coords, num_workers=0, progress=False, precision="int8")


def test_read_error_in_a_worker_names_the_file(model, processor, tmp_path):
    path = copy_to(synthetic_slide("wcorrupt", 1024, 1024, seed=5, mpp=0.5, tissue_fraction=0.9), tmp_path / "c.tif")
    with tifffile.TiffFile(path) as tf:
        offset, count = tf.pages[0].dataoffsets[5], tf.pages[0].databytecounts[5]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00garbage" * (count // 8))
    with pytest.raises(SlideError) as err:
        extract_slide_features(path, model, processor, coords=[[0, 0], [256, 256]], num_workers=1, progress=False,
                               min_patches_for_workers=0)
    message = str(err.value)
    assert message.startswith(f"{path}: read failed at level 0, (256, 256)") and "Traceback" not in message


def _failures(out):
    with open(out / "failures.csv", newline="") as fh:
        return {row["slide"]: row for row in csv.DictReader(fh)}


def test_batch_extraction_records_failures_and_resumes(model, processor, cmu, tmp_path):
    from mstar_hf.wsi.synthetic import write_pyramidal_tiff

    good = copy_to(slide_40x(), tmp_path / "in" / "good.tif")
    nompp = copy_to(synthetic_slide("nompp2", 1024, 1024, seed=6, mpp=None, tissue_fraction=0.6), tmp_path / "in" / "nompp.tif")
    white = copy_to(white_slide(), tmp_path / "in" / "white.tif")
    small = write_pyramidal_tiff(tmp_path / "in" / "small.tif", np.full((300, 300, 3), 180, np.uint8), mpp=0.25)
    text = tmp_path / "in" / "notes.svs"
    text.write_text("not a slide")
    dup = copy_to(cmu, tmp_path / "in" / "other" / "good.svs")
    slides = [good, cmu, nompp, white, small, text, dup]
    out = tmp_path / "out"

    summary = extract_features(slides, out, model, processor, batch_size=16, num_workers=1, quiet=True)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (2, 0, 5)
    failures = _failures(out)
    expected = {nompp: "MissingMppError", white: "NoTissueError", small: "SlideTooSmallError", text: "SlideError",
                dup: "SlideError"}
    assert set(failures) == {str(p) for p in expected}
    for path, error in expected.items():
        row = failures[str(path)]
        assert row["error"] == error and str(path) in row["reason"], row
    assert sorted(p.name for p in out.glob("*.h5")) == ["CMU-1-Small-Region.h5", "good.h5"]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))

    with open_features(out / "good.h5") as ff:
        attrs = ff.attrs
        assert len(ff) > 10 and ff.dim == 64
        with open_slide(good) as wsi:
            np.testing.assert_array_equal(ff.coords, tile_slide(wsi).coords)
    assert attrs["patch_size"] == 256 and attrs["patch_size_level0"] == 512 and attrs["target_magnification"] == 20
    assert attrs["mpp"] == 0.25 and (attrs["level0_width"], attrs["level0_height"]) == (4096, 3072)
    assert attrs["encoder"] == "vit_tiny_patch16_224" and len(attrs["encoder_config_hash"]) == 16
    assert attrs["patch_level"] == 1
    qc = Image.open(out / "qc" / "good.png")
    assert qc.mode == "RGB" and max(qc.size) >= 1024

    # Re-run: finished slides are skipped, failed ones retried (and fail again).
    again = extract_features(slides, out, model, processor, num_workers=1, quiet=True)
    assert (again["done"], again["skipped"], again["failed"]) == (0, 2, 5)
    # A resolution for the slide without one fixes it; other settings force re-extraction.
    fixed = extract_features([nompp], out, model, processor, num_workers=1, quiet=True, mpp=0.5)
    assert (fixed["done"], fixed["failed"]) == (1, 0)
    assert open_features(out / "nompp.h5").attrs["mpp_source"] == "--mpp"
    changed = extract_features([good], out, model, processor, num_workers=1, quiet=True, patch_size=224,
                               qc=False)
    assert changed["done"] == 1
    assert open_features(out / "good.h5").attrs["patch_size"] == 224


def test_unwritable_output_directory(model, processor, cmu, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=str(blocker / "out")):
        extract_features([cmu], blocker / "out", model, processor, quiet=True)


def test_small_slides_are_read_in_process_with_the_same_features(model, processor, cmu, monkeypatch):
    """A slide of a couple of batches skips the reader processes (they start per slide); the features are
    those read through the workers."""
    import mstar_hf.wsi.extraction as extraction

    workers = []
    real = extraction.make_patch_loader
    monkeypatch.setattr(extraction, "make_patch_loader",
                        lambda ds, bs, nw, **kw: workers.append(nw) or real(ds, bs, nw, **kw))
    coords = np.array([[0, 0], [1024, 1536], [1900, 2700], [512, 512]])
    _, direct = extract_slide_features(cmu, model, processor, coords=coords, batch_size=2, num_workers=1,
                                       progress=False)
    _, through = extract_slide_features(cmu, model, processor, coords=coords, batch_size=2, num_workers=1,
                                        progress=False, min_patches_for_workers=0)
    np.testing.assert_allclose(direct, through, atol=1e-6)
    assert workers == [0, 1]
