"""Access to the repository's `training/*.py` scripts (the `accelerate launch` entry points) as modules,
so that `mstar-hf demo` runs exactly their `main(argv)` rather than a copy of their loops.

`from mstar_hf.training_scripts import stage2` loads `training/stage2.py` of the checkout this package
is installed from (editable installs and the repository itself; a wheel does not ship `training/`).
"""

import importlib.util
import sys
from pathlib import Path

TRAINING_DIR = Path(__file__).resolve().parents[2] / "training"


def load_script(name: str):
    """Imports `training/<name>.py` as module `mstar_hf.training_scripts.<name>`."""
    qualified = f"{__name__}.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    path = TRAINING_DIR / f"{name}.py"
    if not path.is_file():
        raise ImportError(f"{path}: training script not found; run from a checkout of mstar-hf (pip install -e .).")
    spec = importlib.util.spec_from_file_location(qualified, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
    return module


def __getattr__(name: str):
    if name.startswith("_"):
        raise AttributeError(name)
    return load_script(name)
