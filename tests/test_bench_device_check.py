"""bench/device_check.sh --smoke: every figure of the device check runs (tiny, CPU) and prints its line."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_smoke(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--smoke", "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=240,  # ~20 s CPU; wall on a shared box
                            env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                 "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    for key in ("device", "forward", "extract", "aggregator_2000", "aggregator_4000", "stage2", "total"):
        assert key in lines, (key, result.stdout)
    assert "patches/s" in lines["forward"] and "x bare" in lines["extract"] and "steps/s" in lines["stage2"]
    assert "WARNING" not in result.stdout
