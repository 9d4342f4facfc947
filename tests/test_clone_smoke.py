"""The repository stands alone: its test slide is in tests/data (checksum as recorded) and nothing the
tests, the package or the scripts use points outside the checkout."""

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_test_slide_is_in_the_repository_with_its_recorded_checksum(real_slide):
    assert real_slide.resolve().is_relative_to(ROOT)
    recorded = {}
    for line in (ROOT / "tests" / "data" / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        recorded[Path(name).name] = digest
    assert hashlib.sha256(real_slide.read_bytes()).hexdigest() == recorded[real_slide.name]
    assert "CC0" in (ROOT / "tests" / "data" / "README.md").read_text()


def test_nothing_points_outside_the_checkout():
    outside = re.compile(r"\.\./" + "shared|/work/" + "shared")  # split: this line must not match itself
    offenders = []
    for folder in ("src", "tests", "training", "bench", ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".md", ".cfg", ".toml", ".yaml", ".yml", ""} \
                    and "__pycache__" not in path.parts and ".egg-info" not in str(path):
                text = path.read_text(errors="ignore")
                offenders += [f"{path.relative_to(ROOT)}:{i + 1}" for i, line in enumerate(text.splitlines())
                              if outside.search(line)]
    for name in ("README.md", "Makefile", "setup.py"):
        offenders += [f"{name}:{i + 1}" for i, line in enumerate((ROOT / name).read_text().splitlines())
                      if outside.search(line)]
    assert not offenders, f"references outside the repository: {offenders}"
