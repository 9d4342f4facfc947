"""Slides that lie about their resolution, replaced slides on resume, stale temporary files, dynamic claims."""

import time

import numpy as np
import pytest
import tifffile
import torch
from wsi_fixtures import cmu, copy_to, synthetic_slide, tiny_model, tiny_model_dir  # noqa: F401

from mstar_hf import MStarImageProcessor
from mstar_hf.cli import main
from mstar_hf.wsi.errors import MissingMppError, SlideError
from mstar_hf.wsi.extraction import (CLAIMS_DIR, _claim, extract_features, extract_slide_features,
                                     resolve_precision, slide_fingerprint)
from mstar_hf.wsi.features import open_features
from mstar_hf.wsi.slide import open_slide
from mstar_hf.wsi.synthetic import make_tissue_image

FAST = ["--num-workers", "0", "--no-qc", "--quiet", "--batch-size", "32"]


def _tiff_72dpi(path, side=1024):
    """A generic tiled TIFF as an image editor writes it: 72 dpi, which OpenSlide turns into 352.8 um/px."""
    with tifffile.TiffWriter(path) as tw:
        tw.write(make_tissue_image(side, side, 4), tile=(256, 256), photometric="rgb", resolution=(72, 72),
                 resolutionunit="INCH", metadata=None)
    return path


def test_72_dpi_tiff_is_a_fast_clear_error_and_mpp_overrides_it(tmp_path, capsys):
    path = _tiff_72dpi(tmp_path / "photo.tif")
    with pytest.raises(MissingMppError) as err:
        open_slide(path)
    msg = str(err.value)
    assert str(path) in msg and "352.8" in msg and "--mpp" in msg and "implausible" in msg

    out = tmp_path / "out"
    t0 = time.perf_counter()
    code = main(["extract", "--slides", str(path), "--out", str(out), "--model", str(tiny_model_dir()), *FAST])
    # the CLI's own time: the error comes from the slide's metadata, before any tiling
    assert code == 1 and "352.8" in (out / "failures.csv").read_text()
    assert not list(out.glob("*.h5"))
    assert time.perf_counter() - t0 < 20  # includes loading the model; the slide itself fails in ms
    t0 = time.perf_counter()
    with pytest.raises(MissingMppError):
        open_slide(path)
    assert time.perf_counter() - t0 < 1.0
    capsys.readouterr()

    # an explicit --mpp overrides the metadata (and a plausible one is used as is)
    assert main(["extract", "--slides", str(path), "--out", str(out), "--model", str(tiny_model_dir()), "--mpp",
                 "0.5", *FAST]) == 0
    with open_features(out / "photo.h5") as ff:
        assert ff.attrs["mpp"] == 0.5 and ff.attrs["mpp_source"] == "--mpp" and ff.attrs["patch_size_level0"] == 256
        assert 1 <= len(ff) <= 16  # a 1024 px square at 20x: at most 16 patches, not 36k one-pixel ones


def test_plausible_metadata_source_wins_over_an_implausible_one(tmp_path):
    # mpp-x implausible (72 dpi) but the Aperio description carries AppMag 20: the objective power is used
    path = tmp_path / "mixed.svs"
    with tifffile.TiffWriter(path) as tw:
        tw.write(make_tissue_image(512, 512, 0), tile=(256, 256), photometric="rgb", resolution=(72, 72),
                 resolutionunit="INCH", metadata=None,
                 description="Aperio Image Library v12.0.0\n512x512 [0,0 512x512] (256x256) RAW|AppMag = 20")
    with open_slide(path) as wsi:
        assert wsi.mpp == pytest.approx(0.5) and wsi.mpp_source == "openslide.objective-power"


def test_reads_that_upsample_more_than_twice_are_refused(tmp_path):
    path = synthetic_slide("coarse", 1024, 1024, seed=1, mpp=2.0)  # 5x scan
    with open_slide(path) as wsi:
        assert wsi.plan_read(256, 1.0).read_size == 128  # 2x upsampling: allowed
        with pytest.raises(SlideError) as err:
            wsi.plan_read(256, 0.5)  # 4x: refused
    assert str(path) in str(err.value) and "upsampled 4.0x" in str(err.value) and "--mpp" in str(err.value)


def test_replaced_slide_is_re_extracted_and_stale_tmp_removed(tmp_path):
    model, processor = tiny_model(), MStarImageProcessor()
    slides = tmp_path / "slides"
    a = copy_to(synthetic_slide("resume_a", 1024, 1024, seed=31, mpp=0.5, tissue_fraction=0.7), slides / "s.tif")
    out = tmp_path / "out"
    kw = dict(num_workers=0, quiet=True, qc=False, batch_size=32)
    first = extract_features([a], out, model, processor, **kw)
    assert first["done"] == 1
    fp_a = slide_fingerprint(a)
    assert open_features(out / "s.h5").attrs["slide_fingerprint"] == fp_a

    # stale leftovers of a killed run: a partial h5 and a claim
    (out / "other.h5.tmp").write_bytes(b"partial")
    (out / CLAIMS_DIR).mkdir()
    (out / CLAIMS_DIR / "0000000").write_text("rank 1 pid 1")
    again = extract_features([a], out, model, processor, **kw)
    assert again["skipped"] == 1 and again["done"] == 0
    assert not (out / "other.h5.tmp").exists() and not (out / CLAIMS_DIR).exists()

    # the same name, another slide: re-extracted, not reused
    copy_to(synthetic_slide("resume_b", 1024, 1536, seed=32, mpp=0.5, tissue_fraction=0.7), a)
    assert slide_fingerprint(a) != fp_a
    third = extract_features([a], out, model, processor, **kw)
    assert third["done"] == 1 and third["skipped"] == 0
    with open_features(out / "s.h5") as ff:
        assert ff.attrs["level0_width"] == 1536 and ff.attrs["slide_fingerprint"] == slide_fingerprint(a)


def test_claims_are_exclusive(tmp_path):
    assert _claim(tmp_path, 3, rank=0)
    assert not _claim(tmp_path, 3, rank=1)
    assert _claim(tmp_path, 4, rank=1)
    assert "rank 0" in (tmp_path / "0000003").read_text()


def test_padded_last_batch_and_precision_auto(cmu):
    model, processor = tiny_model(), MStarImageProcessor()
    coords = np.array([[0, 0], [256, 0], [512, 0], [0, 256], [256, 256]])
    _, plain = extract_slide_features(cmu, model, processor, coords=coords, batch_size=2, num_workers=0,
                                      progress=False)
    _, padded = extract_slide_features(cmu, model, processor, coords=coords, batch_size=2, num_workers=0,
                                       progress=False, pad_batches=True)
    np.testing.assert_allclose(padded, plain, rtol=0, atol=1e-6)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", torch.device("cpu"))


def test_a_rank_takes_every_slide_not_claimed_by_a_busy_one(tmp_path, monkeypatch):
    """Rank 1 of 2 while rank 0 is still on slide 0: rank 1 extracts slides 1 and 2 (a static split
    slides[r::2] would have given it slide 1 only and left slide 2 waiting for the busy rank)."""
    import mstar_hf.wsi.extraction as extraction

    monkeypatch.setattr(extraction, "_dist_state", lambda: (1, 2, lambda: None, None))
    slides = [copy_to(synthetic_slide(f"claim{i}", 768, 768, seed=40 + i, mpp=0.5, tissue_fraction=0.7),
                      tmp_path / "in" / f"s{i}.tif") for i in range(3)]
    out = tmp_path / "out"
    (out / CLAIMS_DIR).mkdir(parents=True)
    assert _claim(out / CLAIMS_DIR, 0, rank=0)  # rank 0 is busy with slide 0
    summary = extract_features(slides, out, tiny_model(), MStarImageProcessor(), num_workers=0, quiet=True,
                               qc=False, batch_size=32)
    assert summary["rank"] == 1 and summary["done"] == 2
    assert sorted(p.name for p in out.glob("*.h5")) == ["s1.h5", "s2.h5"]
    assert sorted(p.name for p in (out / CLAIMS_DIR).iterdir()) == ["0000000", "0000001", "0000002"]


def test_prefetching_the_next_slide_gives_the_same_files(tmp_path):
    """Segmentation + tiling in the helper process (the GPU default) = inline: same features, same
    attributes, same failures (an error raised in the helper keeps its type and message)."""
    slides = [copy_to(synthetic_slide(f"pre{i}", 768, 1024, seed=50 + i, mpp=0.5, tissue_fraction=0.7),
                      tmp_path / "in" / f"p{i}.tif") for i in range(2)]
    slides.append(copy_to(synthetic_slide("pre_nompp", 768, 768, seed=52, mpp=None), tmp_path / "in" / "nompp.tif"))
    model, processor = tiny_model(), MStarImageProcessor()
    kw = dict(num_workers=0, quiet=True, qc=False, batch_size=32)
    inline = extract_features(slides, tmp_path / "a", model, processor, prefetch=False, **kw)
    ahead = extract_features(slides, tmp_path / "b", model, processor, prefetch=True, **kw)
    assert inline["done"] == ahead["done"] == 2 and inline["failed"] == ahead["failed"] == 1
    assert ahead["failures"][0]["error"] == "MissingMppError" and "nompp.tif" in ahead["failures"][0]["reason"]
    for name in ("p0.h5", "p1.h5"):
        with open_features(tmp_path / "a" / name) as fa, open_features(tmp_path / "b" / name) as fb:
            np.testing.assert_array_equal(fa.coords, fb.coords)
            np.testing.assert_array_equal(fa.load()[1], fb.load()[1])
            assert fa.attrs == fb.attrs
