"""Shared fixtures: tiny model configs and the real test slide (tests/data, see its README)."""

import atexit
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REAL_SLIDE = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"  # in the repository: tests need nothing beside it

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub (the hub tests run their own server)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the stand-in encoder's per-machine cache: the tests' own (one per pytest process, removed at exit), never the user's
os.environ["MSTAR_HF_CACHE"] = _TEST_CACHE = tempfile.mkdtemp(prefix="mstar-hf-test-cache-")
atexit.register(shutil.rmtree, _TEST_CACHE, ignore_errors=True)
# `make test` runs the files on several pytest-xdist workers: the cores are shared among them (two 2-thread
# torch processes on 2 cores slow each other down many times over), and each worker's distributed runs
# (torchrun, accelerate, DeepSpeed) rendezvous on a port of its own instead of everyone's default 29500.
_WORKERS = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    import socket

    with socket.socket() as _s:
        _s.bind(("127.0.0.1", 0))
        _port = str(_s.getsockname()[1])
    os.environ["MASTER_PORT"] = os.environ["PET_MASTER_PORT"] = _port  # PET_*: torchrun's --master_port
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def real_slide() -> Path:
    if not REAL_SLIDE.is_file():
        pytest.fail(f"the test slide is missing: {REAL_SLIDE} (it is part of the repository; see tests/data/README.md)")
    return REAL_SLIDE


@pytest.fixture
def tiny_config():
    from mstar_hf.presets import mstar_config

    return mstar_config("tiny", num_genes=40, vocab_size=100)


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory):
    """A small synthetic multimodal cohort (3 types x 10 cases) with patch features extracted by a
    tiny patch encoder saved beside it. Shared by the Stage 1 / Stage 2 / pipeline tests."""
    from mstar_hf import MStarImageProcessor, MStarPatchModel
    from mstar_hf.data import make_synthetic_cohort
    from mstar_hf.presets import patch_config
    from mstar_hf.wsi.extraction import extract_features

    root = tmp_path_factory.mktemp("cohort")
    manifest = make_synthetic_cohort(root, num_types=3, cases_per_type=10, seed=0, slide_size=(1280, 1280),
                                     num_genes=64, quiet=True, painter="type_colour")
    torch.manual_seed(0)
    patch_model = MStarPatchModel(patch_config("tiny")).eval()
    patch_dir = root / "patch_model"
    patch_model.save_pretrained(patch_dir)
    MStarImageProcessor().save_pretrained(patch_dir)
    slides = sorted((root / "slides").glob("*.tiff"))
    summary = extract_features(slides, root / "features", patch_model, MStarImageProcessor(), batch_size=64,
                               num_workers=1, quiet=True, qc=False)
    assert summary["failed"] == 0, summary
    return {"root": root, "manifest": Path(manifest), "patch_model": patch_dir}
