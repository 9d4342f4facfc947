"""Small, fast material for the report-generation tests: a cohort of feature h5 files whose features
carry the cancer type (so a report generator can learn something), and tiny model configs."""

from __future__ import annotations

import contextlib
import csv
import sys
from pathlib import Path

import numpy as np
import torch

FEATURE_DIM = 16


@contextlib.contextmanager
def one_thread():
    """Tiny models run thousands of small ops per step: with two OpenMP threads on a busy 2-core machine
    each op can wait a scheduler slice for the other thread (measured: 30 steps 1.5 s on one thread,
    11-106 s on two), so these tests run on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_report_config(input_dim: int = FEATURE_DIM, vocab_size: int = 64, region_size: int = 8, **kwargs):
    from mstar_hf import MStarReportGenerationConfig
    from mstar_hf.presets import aggregator_config

    text = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 160,
            "vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    text.update(kwargs.pop("text", {}))
    return MStarReportGenerationConfig(
        aggregator_config=aggregator_config("tiny", input_dim=input_dim), text_config=text, region_size=region_size,
        region_num_heads=2, **kwargs,
    )


def grid_coords(num: int, columns: int = 8, step: int = 512) -> np.ndarray:
    """Level-0 corners of `num` patches on a grid, row-major."""
    idx = np.arange(num)
    return np.stack([idx % columns, idx // columns], axis=1).astype(np.int64) * step


def type_features(type_index: int, num: int, rng: np.random.Generator, dim: int = FEATURE_DIM) -> np.ndarray:
    """Patch features of a slide of a cancer type: a type-specific direction plus noise."""
    centre = np.zeros(dim, np.float32)
    centre[type_index * 3: type_index * 3 + 3] = 3.0
    return (centre + rng.normal(0, 0.5, size=(num, dim))).astype(np.float32)


def make_feature_cohort(out_dir, num_types: int = 3, cases_per_type: int = 6, dim: int = FEATURE_DIM,
                        patches: tuple[int, int] = (12, 40), seed: int = 0, missing_reports: int = 1) -> Path:
    """A manifest with one feature h5 per case (written with the real `write_features`) and a report drawn
    for its type; the first `missing_reports` cases have no report. Splits: 4 of 6 train, then val, test."""
    from mstar_hf.data import cancer_type_keys, write_report
    from mstar_hf.wsi.features import write_features

    out_dir = Path(out_dir)
    (out_dir / "features").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for t, key in enumerate(cancer_type_keys(num_types)):
        for c in range(cases_per_type):
            case = f"{key[:4]}-{c:02d}"
            n = int(rng.integers(*patches))
            path = write_features(out_dir / "features" / f"{case}.h5", grid_coords(n), type_features(t, n, rng, dim),
                                  {"encoder": "synthetic"})
            split = "train" if c < cases_per_type - 2 else ("val" if c == cases_per_type - 2 else "test")
            report = "" if len(rows) < missing_reports else write_report(key, rng)
            rows.append({"case_id": case, "slide_id": case, "cancer_type": key, "features_path": f"features/{path.name}",
                         "report": report, "split": split})
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def load_training_script():
    """The body of `training/report_generation.py` (the package module its thin wrapper calls)."""
    from mstar_hf.training_utils import report_generation

    return report_generation


def overfit(model, batch: dict, steps: int = 150, lr: float = 3e-3) -> list[float]:
    """Trains `model` on one fixed batch; returns the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses
