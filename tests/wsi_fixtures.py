"""Helpers and fixtures shared by the tests/test_wsi_*.py files (import what you use from here).

Synthetic slides and the tiny model are built once per test session into one temporary folder.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"  # the real Aperio slide kept in the repository
_CACHE = Path(tempfile.mkdtemp(prefix="mstar-wsi-tests-"))
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

TINY_KWARGS = {"depth": 2, "embed_dim": 64, "num_heads": 2, "init_values": 1e-5, "dynamic_img_size": True}


def tiny_model(seed: int = 0):
    import torch

    from mstar_hf import MStarPatchConfig, MStarPatchModel

    torch.manual_seed(seed)
    config = MStarPatchConfig(architecture="vit_tiny_patch16_224", img_size=224, timm_kwargs=dict(TINY_KWARGS))
    return MStarPatchModel(config).eval()


@functools.lru_cache(maxsize=None)
def tiny_model_dir() -> Path:
    """A saved tiny patch encoder with its image processor (what `--model` points to)."""
    from mstar_hf import MStarImageProcessor

    path = _CACHE / "tiny_model"
    tiny_model().save_pretrained(path)
    MStarImageProcessor().save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def synthetic_slide(name: str, height: int, width: int, seed: int = 0, mpp: float | None = 0.25,
                    compression: str = "jpeg", **paint) -> Path:
    """A cached synthetic pyramidal TIFF (the painter's keyword arguments go in `paint`)."""
    from mstar_hf.wsi.synthetic import make_tissue_image, write_pyramidal_tiff

    image = make_tissue_image(height, width, seed, **paint)
    return write_pyramidal_tiff(_CACHE / "slides" / f"{name}.tif", image, mpp=mpp, compression=compression)


def slide_40x() -> Path:
    """40x (0.25 um/px) level 0, 4 levels: 20x patches must come from level 1."""
    return synthetic_slide("s40x", 3072, 4096, seed=1, mpp=0.25, tissue_fraction=0.5)


def white_slide() -> Path:
    from mstar_hf.wsi.synthetic import write_pyramidal_tiff

    path = _CACHE / "slides" / "white.tif"
    if not path.exists():
        write_pyramidal_tiff(path, np.full((1024, 1024, 3), 243, np.uint8), mpp=0.5)
    return path


def copy_to(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_cli(args, timeout=240, **kwargs) -> subprocess.CompletedProcess:
    """`python -m mstar_hf.cli ...` in a fresh process (as a user would run it)."""
    return subprocess.run([sys.executable, "-m", "mstar_hf.cli", *map(str, args)], env=cli_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def read_outputs(out_dir: Path) -> dict:
    """{h5 name: (coords, features, attrs)} of every complete feature file in a folder."""
    from mstar_hf.wsi.features import open_features

    result = {}
    for path in sorted(Path(out_dir).glob("*.h5")):
        with open_features(path) as ff:
            coords, feats = ff.load()
            result[path.name] = (coords, feats, ff.attrs)
    return result


def assert_same_outputs(a: dict, b: dict, atol: float = 1e-5):
    assert sorted(a) == sorted(b)
    for name in a:
        ca, fa, aa = a[name]
        cb, fb, ab = b[name]
        np.testing.assert_array_equal(ca, cb, err_msg=name)
        np.testing.assert_allclose(fa, fb, atol=atol, err_msg=name)
        assert aa == ab, name


@pytest.fixture(scope="session")
def cmu() -> Path:
    if not CMU.is_file():
        pytest.fail(f"the test slide is missing: {CMU} (it is part of the repository; see tests/data/README.md)")
    return CMU
