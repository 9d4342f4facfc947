"""mstar-hf: the mSTAR multimodal whole-slide pathology foundation model, Hugging Face native.

`import mstar_hf` registers the models with transformers' Auto classes and the WSI pipelines
with `transformers.pipeline`.
"""

__version__ = "0.1.0"

from .auto import register_auto_classes
from .modeling import *  # noqa: F401,F403
from .modeling import __all__ as _modeling_all

register_auto_classes()
from .pipelines import register_pipelines  # noqa: E402
register_pipelines()

__all__ = ["register_auto_classes", "__version__", *_modeling_all]
