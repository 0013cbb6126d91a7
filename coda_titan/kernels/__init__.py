"""Fused CODA ops: the PyTorch reference of each GEMM-epilogue program.

One op per module, forward and backward together, the math in its docstring.
``ops_for(backend)`` returns the implementation a layer should call; the
reference is also the CPU fallback. The attention core is chosen on its own
(``[coda] attention``): ``attention_for(kernel)``.
"""

import hashlib
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

from ..backend import FP8_KERNEL_RECIPES
from .fp8 import RECIPES
from .linear_residual_sumsq import linear_residual_sumsq
from .packed_attention import packed_attention
from .rmsnorm_linear_cross_entropy import rmsnorm_linear_cross_entropy
from .rmsnorm_qkv_rope import rmsnorm_qkv_rope, token_positions
from .rmsnorm_swiglu_mlp import rmsnorm_swiglu_mlp

__all__ = [
    "attention_for",
    "linear_residual_sumsq",
    "ops_for",
    "packed_attention",
    "rmsnorm_linear_cross_entropy",
    "rmsnorm_qkv_rope",
    "rmsnorm_swiglu_mlp",
    "token_positions",
]



def compile_cache_tag(root: Path) -> str:
    """A tag naming the Python sources under ``root`` (a digest of their paths and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"coda_titan-kernels-{digest.hexdigest()[:16]}"


# torch.compile's disk caches (Inductor's FX graph cache, AOTAutograd's) key a
# compiled graph by its nodes, where each of our custom ops is only a name: the
# backward formula and fake implementation registered for it are not in the
# key. An op whose outputs changed loaded the old compiled backward, which
# failed its size checks (on the H200, a cache kept from the previous version).
# So the sources of the ops join every cache key, beside any tag of the user's.
COMPILE_CACHE_TAG = compile_cache_tag(Path(__file__).resolve().parent)
if COMPILE_CACHE_TAG not in torch.compiler.config.cache_key_tag:
    torch.compiler.config.cache_key_tag = "+".join(
        t for t in (torch.compiler.config.cache_key_tag, COMPILE_CACHE_TAG) if t)

REFERENCE = SimpleNamespace(
    rmsnorm_qkv_rope=rmsnorm_qkv_rope,
    linear_residual_sumsq=linear_residual_sumsq,
    rmsnorm_swiglu_mlp=rmsnorm_swiglu_mlp,
    rmsnorm_linear_cross_entropy=rmsnorm_linear_cross_entropy,
)

# The reference with the block ops' GEMMs under an FP8 recipe; the LM head
# stays bf16, as TorchTitan's float8 configs keep ``output``.
FP8_REFERENCE = {
    recipe: SimpleNamespace(
        rmsnorm_qkv_rope=partial(rmsnorm_qkv_rope, fp8=recipe),
        linear_residual_sumsq=partial(linear_residual_sumsq, fp8=recipe),
        rmsnorm_swiglu_mlp=partial(rmsnorm_swiglu_mlp, fp8=recipe),
        rmsnorm_linear_cross_entropy=rmsnorm_linear_cross_entropy,
    )
    for recipe in RECIPES
}


def ops_for(backend: str, strict: bool = False, keep_weights: bool = False,
            fp8: str | None = None) -> SimpleNamespace:
    """The op implementations for a resolved backend (``reference`` or ``cutedsl``).
    ``strict``: a kernel op that cannot take its inputs raises instead of running
    the reference (``backend = "cutedsl"`` was asked for). ``keep_weights``: the
    kernels fold the norm weights once per parameter update and keep them from
    the forward to the backward (``prepared_weights``), not once per call.
    ``fp8``: an FP8 recipe for the block ops' GEMMs (``fp8.RECIPES``; the kernels
    implement ``backend.FP8_KERNEL_RECIPES``)."""
    if backend == "reference":
        return REFERENCE if fp8 is None else FP8_REFERENCE[fp8]
    if backend == "cutedsl":
        from . import cutedsl

        if fp8 is not None and fp8 not in FP8_KERNEL_RECIPES:
            raise ValueError(f"FP8 recipe {fp8!r} has no SM90 kernels (they implement "
                             f"{', '.join(FP8_KERNEL_RECIPES)}); it runs on the reference backend")
        return cutedsl.BOUND_OPS[strict, keep_weights, fp8]
    raise ValueError(f"unknown CODA backend {backend!r}; expected 'reference' or 'cutedsl'")


def attention_for(kernel: str, strict: bool = False):
    """The attention core for a resolved ``[coda] attention`` (``sdpa`` or ``flash4``):
    ``f(attention, qkv, attention_masks) -> (B, S, Hq * D)`` (``packed_attention``).
    ``strict``: flash4 raises on inputs it cannot take (``attention = "flash4"``)."""
    if kernel == "sdpa":
        return packed_attention
    if kernel == "flash4":
        from .flash4 import packed_attention as flash4

        return partial(flash4.packed_attention, strict=strict)
    raise ValueError(f"unknown CODA attention {kernel!r}; expected 'sdpa' or 'flash4'")
