"""`mstar-hf demo --quick` from a wheel (a non-editable install) run outside the checkout: every training
entry point lives in the package, nothing is loaded from `training/*.py` by path."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_runs_from_a_wheel_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(wheels.glob("mstar_hf-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    assert not (target / "mstar_hf" / "training_scripts.py").exists()

    work = tmp_path / "elsewhere"  # no checkout around: nothing can be found by a relative path
    work.mkdir()
    # the wheel's copy comes first on the path; the dependencies come from this environment
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    where = subprocess.run([sys.executable, "-c", "import mstar_hf; print(mstar_hf.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(target)), where.stdout
    done = subprocess.run([sys.executable, "-m", "mstar_hf.cli", "demo", "--quick", "--quiet", "--out", str(work / "demo")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = json.loads((work / "demo" / "results.json").read_text())
    assert (work / "demo" / "summary.md").is_file() and results
    models = work / "demo" / "models"
    assert any(models.rglob("model.safetensors")), "the demo's trained models are saved"
