"""Shared fixtures: tiny model configs and the real test slide (never copied into the repo)."""

import os
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REAL_SLIDE = (ROOT / "../shared/data/slides/CMU-1-Small-Region.svs").resolve()

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub (the hub tests run their own server)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture
def real_slide() -> Path:
    if not REAL_SLIDE.is_file():
        pytest.fail(f"the shared test slide is missing: {REAL_SLIDE}")
    return REAL_SLIDE


@pytest.fixture
def tiny_config():
    from mstar_hf.presets import mstar_config

    return mstar_config("tiny", num_genes=40, vocab_size=100)
