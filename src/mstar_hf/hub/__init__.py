"""Publishing mSTAR checkpoints to the Hugging Face Hub: model cards and one-commit pushes."""

from .card import MSTAR_MODEL_TYPES, ModelCardError, extract_python_snippet, load_eval_results, render_model_card
from .push import DEFAULT_IGNORE_PATTERNS, PushError, PushInputError, collect_folder, push_folder

__all__ = [
    "MSTAR_MODEL_TYPES",
    "DEFAULT_IGNORE_PATTERNS",
    "ModelCardError",
    "PushError",
    "PushInputError",
    "collect_folder",
    "extract_python_snippet",
    "load_eval_results",
    "push_folder",
    "render_model_card",
]
