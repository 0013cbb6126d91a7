"""CuTe DSL implementations of the fused ops: quack's SM90 GEMM main loop with
our epilogues (``@gemm_epilogue``), bf16. Imported only when the ``cutedsl``
backend runs.
"""

from functools import partial
from types import SimpleNamespace

from .linear_residual_sumsq import linear_residual_sumsq
from .rmsnorm_linear_cross_entropy import rmsnorm_linear_cross_entropy
from .rmsnorm_qkv_rope import rmsnorm_qkv_rope
from .rmsnorm_swiglu_mlp import rmsnorm_swiglu_mlp

OPS = SimpleNamespace(
    rmsnorm_qkv_rope=rmsnorm_qkv_rope,
    linear_residual_sumsq=linear_residual_sumsq,
    rmsnorm_swiglu_mlp=rmsnorm_swiglu_mlp,
    rmsnorm_linear_cross_entropy=rmsnorm_linear_cross_entropy,
)

# The same ops raising where they would run the reference (``backend = "cutedsl"``).
STRICT_OPS = SimpleNamespace(**{name: partial(op, strict=True) for name, op in vars(OPS).items()})
