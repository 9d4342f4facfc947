"""A multi-slide cohort: some cases (patients) have 2 or 3 slides, as in TCGA.

Every slide of a case shares the case's label, survival time and event; its patch features carry the
case's class direction and risk plus slide noise, so slides of one case are correlated (the reason a
patient must not be on both sides of a split). The manifest's `split` column is assigned per case, then
`leak` moves the second slide of some multi-slide cases to another side: the leaky manifest every
split path must refuse.
"""

import csv
from pathlib import Path

import h5py
import numpy as np

DIM = 16


def slides_per_case(k: int) -> int:
    # 1, 2 or 3 slides: cases 0, 3, 6, ... have 2; cases 0, 5, 10, ... one more
    return 1 + (k % 3 == 0) + (k % 5 == 0)


def write_multislide_cohort(root: Path, num_cases: int = 30, num_classes: int = 2, seed: int = 0,
                            leak: tuple[int, ...] = (0, 3, 6), signal: float = 3.0) -> Path:
    """Writes `root/features/<slide>.h5` and `root/manifest.csv`; returns the manifest path.

    Splits per case: every 5th case test, the one after it val, the rest train; `leak`: cases whose
    second slide is put on another side (test <-> train)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(num_classes, DIM))
    directions[:, 1:3] = 0  # features 1-2 carry the survival risk
    directions *= signal / np.linalg.norm(directions, axis=1, keepdims=True)
    (root / "features").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(num_cases):
        label = k % num_classes
        risk = rng.normal()
        time = 10 * np.exp(-risk + 0.2 * rng.normal())
        event = int(rng.random() < 0.75) if k % 7 else 1
        split = "test" if k % 5 == 0 else "val" if k % 5 == 1 else "train"
        for s in range(slides_per_case(k)):
            slide_id = f"c{k:02d}s{s}"
            n = int(rng.integers(12, 25))
            feats = rng.normal(size=(n, DIM))
            feats[rng.random(n) < 0.5] += directions[label]
            feats[:, 1:3] += 2 * risk
            with h5py.File(root / "features" / f"{slide_id}.h5", "w") as f:
                f["features"] = feats.astype(np.float32)
                f["coords"] = np.stack([np.arange(n) % 8, np.arange(n) // 8], 1) * 256
            slide_split = split
            if k in leak and s == 1:
                slide_split = "train" if split == "test" else "test"
            rows.append({"case_id": f"case{k:02d}", "slide_id": slide_id, "cancer_type": "BRCA",
                         "features_path": f"features/{slide_id}.h5", "label": f"type{label}",
                         "time": f"{time:.4f}", "event": event, "split": slide_split})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest
