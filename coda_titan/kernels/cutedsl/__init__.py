"""CuTe DSL implementations of the fused ops: quack's SM90 GEMM main loop with
our epilogues (``@gemm_epilogue``), bf16, or FP8 under the ``tensorwise`` or
``delayed`` recipe (``.fp8_operands``). Imported only when the ``cutedsl`` backend runs.
"""

from functools import partial
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import quack.cache

# quack's disk cache of compiled kernels (``jit_cache``) keys one by its compile
# function's name and arguments under a fingerprint of quack's own sources, so
# a kernel changed here kept its key and loaded the old build (a changed
# kernel's argument dtype met on the H200). Our sources join the fingerprint
# here, at import: quack computes it once per process, at its first compile,
# and the ops compile nothing before this package is imported.
KERNEL_SOURCES = Path(__file__).resolve().parent
if KERNEL_SOURCES not in quack.cache.EXTRA_SOURCE_DIRS:
    quack.cache.EXTRA_SOURCE_DIRS.append(KERNEL_SOURCES)

from .linear_residual_sumsq import linear_residual_sumsq
from .rmsnorm_linear_cross_entropy import rmsnorm_linear_cross_entropy
from .rmsnorm_qkv_rope import rmsnorm_qkv_rope
from .rmsnorm_swiglu_mlp import rmsnorm_swiglu_mlp

from ...backend import FP8_KERNEL_RECIPES


def _bound(strict: bool, keep_weights: bool, fp8: str | None) -> SimpleNamespace:
    block = dict(strict=strict, keep_weights=keep_weights, fp8=fp8)
    return SimpleNamespace(
        rmsnorm_qkv_rope=partial(rmsnorm_qkv_rope, **block),
        linear_residual_sumsq=partial(linear_residual_sumsq, **block),
        rmsnorm_swiglu_mlp=partial(rmsnorm_swiglu_mlp, **block),
        # The LM head stays bf16, as TorchTitan's float8 configs keep ``output``.
        rmsnorm_linear_cross_entropy=partial(rmsnorm_linear_cross_entropy, strict=strict),
    )


# By (strict, keep_weights, fp8). strict: raise where the reference would run
# (``backend = "cutedsl"``). keep_weights: the prepared (folded, FP8) weights
# stay from the forward to the dgrad (``..prepared_weights``; the converter's
# choice, ``converter.keeps_folded_weights``). fp8: None or a recipe.
BOUND_OPS = {flags: _bound(*flags)
             for flags in product((False, True), (False, True), (None, *FP8_KERNEL_RECIPES))}
OPS = BOUND_OPS[False, False, None]
