"""CuTe DSL implementations of the fused ops: quack's SM90 GEMM main loop with
our epilogues (``@gemm_epilogue``), bf16. Imported only when the ``cutedsl``
backend runs. Ops without a kernel yet run the PyTorch reference.
"""

from types import SimpleNamespace

from .. import REFERENCE
from .linear_residual_sumsq import linear_residual_sumsq
from .rmsnorm_swiglu_mlp import rmsnorm_swiglu_mlp

OPS = SimpleNamespace(
    rmsnorm_qkv_rope=REFERENCE.rmsnorm_qkv_rope,
    linear_residual_sumsq=linear_residual_sumsq,
    rmsnorm_swiglu_mlp=rmsnorm_swiglu_mlp,
    rmsnorm_linear_cross_entropy=REFERENCE.rmsnorm_linear_cross_entropy,
)
