"""Shared pieces of the training scripts (arguments, Accelerator, checkpoints, loss curves)."""

from .common import *  # noqa: F401,F403
from .common import __all__
