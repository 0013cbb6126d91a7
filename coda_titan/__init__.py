"""coda-titan: CODA-fused LLaMA-3 training for TorchTitan 0.2.2.

Importing the package (``[experimental] custom_import = "coda_titan"``)
registers the ``coda`` model converter, the ``coda_llama3`` train spec and the
offline ``coda_offline`` dataset. Nothing here needs a GPU or CuTe DSL: the
kernels are imported only when the ``cutedsl`` backend runs.
"""

from . import converter
from .config import Coda
from .data import register_offline_dataset
from .train_spec import register_coda_train_spec

__all__ = ["Coda", "converter"]

register_coda_train_spec()
register_offline_dataset()
