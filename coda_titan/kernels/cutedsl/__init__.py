"""CuTe DSL implementations of the fused ops: quack's SM90 GEMM main loop with
our epilogues (``@gemm_epilogue``), bf16. Imported only when the ``cutedsl``
backend runs.
"""

from functools import partial
from itertools import product
from types import SimpleNamespace

from .linear_residual_sumsq import linear_residual_sumsq
from .rmsnorm_linear_cross_entropy import rmsnorm_linear_cross_entropy
from .rmsnorm_qkv_rope import rmsnorm_qkv_rope
from .rmsnorm_swiglu_mlp import rmsnorm_swiglu_mlp


def _bound(strict: bool, keep_weights: bool) -> SimpleNamespace:
    folding = dict(strict=strict, keep_weights=keep_weights)
    return SimpleNamespace(
        rmsnorm_qkv_rope=partial(rmsnorm_qkv_rope, **folding),
        linear_residual_sumsq=partial(linear_residual_sumsq, strict=strict),
        rmsnorm_swiglu_mlp=partial(rmsnorm_swiglu_mlp, **folding),
        rmsnorm_linear_cross_entropy=partial(rmsnorm_linear_cross_entropy, strict=strict),
    )


# By (strict, keep_weights). strict: raise where the reference would run
# (``backend = "cutedsl"``). keep_weights: the folded weights stay prepared from
# the forward to the dgrad (``..prepared_weights``; the converter's choice,
# ``converter.keeps_folded_weights``).
BOUND_OPS = {flags: _bound(*flags) for flags in product((False, True), repeat=2)}
OPS = BOUND_OPS[False, False]
