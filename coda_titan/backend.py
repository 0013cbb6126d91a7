"""Which implementations the fused layers run, resolved once at start-up.

``backend``: CuTe DSL kernels or the reference. ``auto`` picks the CuTe DSL
kernels on an SM90 GPU with CuTe DSL and quack installed, when the run's
activations are bf16, else the PyTorch reference, and logs one line saying
which and why. ``cutedsl`` insists (and fails at start-up with the reason if it
cannot run); ``reference`` always runs the PyTorch path.

``attention``: the attention core between the QKV projections and ``wo``.
``auto`` picks ``flash4`` (FlashAttention-4, CuTe DSL, reading the packed QKV
and writing one packed dQKV) on an SM90 GPU with ``flash-attn-4`` installed,
for TorchTitan's causal ``sdpa`` attention at a head dim the kernel takes and
bf16 activations, else TorchTitan's own attention (``sdpa``), and logs one line
saying which and why; ``flash4`` insists, ``sdpa`` never tries.
"""

import importlib.metadata
import importlib.util
import logging

import torch
from torchtitan.tools.logging import logger

BACKENDS = ("auto", "cutedsl", "reference")
ATTENTIONS = ("auto", "sdpa", "flash4")

# The flash4 path calls private functions of this release (the only way to hand
# its backward preallocated gradients); pyproject's extra pins the same version.
FLASH4_VERSION = "4.0.0b36"

# CPU installs leave quack, CuTe DSL and flash-attn-4 out; this pyproject extra
# brings them.
GPU_EXTRA_HINT = 'pip install -e ".[gpu]", or ".[cu13]" on CUDA 13'


def cutedsl_unavailable_reason() -> str | None:
    """None when the CuTe DSL kernels can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"GPU is SM{major}{minor}, the kernels target SM90 (H100/H200)"
    for module in ("cutlass", "quack"):
        if importlib.util.find_spec(module) is None:
            return f"python package {module!r} is not installed ({GPU_EXTRA_HINT})"
    return None


def fallback_level() -> int:
    """How ``auto`` reports taking the plain path: a warning where a GPU is there to
    lose speed on; information on a machine without one, where it is the only path."""
    return logging.WARNING if torch.cuda.is_available() else logging.INFO


def _resolve(key: str, requested: str, allowed: tuple[str, ...], kernel: str, plain: str,
             why_not, kernel_note: str, plain_note: str) -> str:
    """``requested`` (``auto``, ``kernel`` or ``plain``) to what will run, logged in one
    line: ``plain`` as configured; ``kernel`` when ``why_not()`` gives no reason;
    else ``auto`` falls back with the reason (``fallback_level``) and ``kernel`` raises it."""
    if requested not in allowed:
        raise ValueError(
            f"[coda] {key} = {requested!r} is not valid; allowed values: {', '.join(allowed)}"
        )
    if requested == plain:
        logger.info(f"CODA {key}: {plain} ({plain_note}), as configured")
        return plain
    reason = why_not()
    if reason is None:
        logger.info(f"CODA {key}: {kernel} ({kernel_note})")
        return kernel
    if requested == kernel:
        raise RuntimeError(f"[coda] {key} = '{kernel}' cannot run here: {reason}")
    logger.log(fallback_level(), f"CODA {key}: {plain} ({plain_note}) because {reason}")
    return plain


def resolve_backend(requested: str, blocker: str | None = None) -> str:
    """Map ``auto | cutedsl | reference`` to the backend that will run.

    ``blocker`` is a reason of the caller's why the kernels cannot serve this
    run even where they can run (e.g. float32 activations)."""
    return _resolve("backend", requested, BACKENDS, "cutedsl", "reference",
                    lambda: cutedsl_unavailable_reason() or blocker,
                    "CuTe DSL GEMM-epilogue kernels", "PyTorch")


# The FP8 recipes (``kernels.fp8.RECIPES``) the CuTe DSL kernels implement.
FP8_KERNEL_RECIPES = ("tensorwise", "delayed")


def resolve_fp8_backend(requested: str, recipe: str, blocker: str | None = None) -> str:
    """The backend for ``fp8 = "coda"``, logged in one line. A recipe with kernels
    resolves as ``resolve_backend``; one without runs the PyTorch reference, and
    where the kernels would run (``cutedsl``, or ``auto`` on an SM90 GPU) it
    raises: the reference there would be silently slow."""
    if recipe in FP8_KERNEL_RECIPES:
        return resolve_backend(requested, blocker)
    if requested not in BACKENDS:
        raise ValueError(
            f"[coda] backend = {requested!r} is not valid; allowed values: {', '.join(BACKENDS)}"
        )
    reason = cutedsl_unavailable_reason()
    if requested == "cutedsl" or (requested == "auto" and reason is None):
        raise RuntimeError(
            f'[coda] backend = {requested!r} with fp8_recipe = {recipe!r}: that recipe has no '
            f'SM90 kernels (they implement {", ".join(FP8_KERNEL_RECIPES)}). Use one of those, '
            f'or backend = "reference" to run its PyTorch reference (slow)')
    note = f"CODA backend: reference (PyTorch, FP8 {recipe} GEMMs, fake-quantized)"
    if requested == "reference":
        logger.info(f"{note}, as configured")
    else:
        logger.log(fallback_level(), f"{note} because {reason}")
    return "reference"


def flash4_unavailable_reason() -> str | None:
    """None when flash-attn-4's SM90 kernels can run here, else why not.
    Looks ``flash_attn.cute`` up without importing it (``flash_attn`` itself is imported)."""
    reason = cutedsl_unavailable_reason()
    if reason is not None:
        return reason
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # no flash_attn package, or one that fails to import (e.g. FA2's)
        found = False
    if not found:
        return (f"python package 'flash-attn-4' is not installed "
                f"(flash-attn-4=={FLASH4_VERSION}: {GPU_EXTRA_HINT})")
    try:
        version = importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        version = "of unknown version"
    if version != FLASH4_VERSION:
        return (f"flash-attn-4 {version} is installed; coda_titan calls private functions of "
                f"flash-attn-4=={FLASH4_VERSION}")
    return None


def flash4_shape_reason(head_dim: int, attn_type: str) -> str | None:
    """Why flash4 cannot compute this model's attention, or None: TorchTitan's
    causal ``sdpa`` only (flex and varlen carry their own masks), at a head dim
    its SM90 kernels take (flash-attn-4's ``_validate_head_dims``: 8..256, a
    multiple of 8 for 16-bit inputs)."""
    if attn_type != "sdpa":
        return f"TorchTitan attn_type = {attn_type!r} (flash4 computes the causal 'sdpa' mask only)"
    if not (8 <= head_dim <= 256 and head_dim % 8 == 0):
        return f"head_dim {head_dim} is outside flash4's SM90 range (8..256, a multiple of 8)"
    return None


def resolve_attention(
    requested: str, head_dim: int, attn_type: str, blocker: str | None = None
) -> str:
    """Map ``auto | sdpa | flash4`` to the attention core that will run.

    ``blocker`` is the caller's reason why the kernel cannot serve this run
    even where it can run (e.g. float32 activations)."""
    return _resolve(
        "attention", requested, ATTENTIONS, "flash4", "sdpa",
        lambda: flash4_unavailable_reason() or flash4_shape_reason(head_dim, attn_type) or blocker,
        f"flash-attn-4 {FLASH4_VERSION} on SM90, head_dim {head_dim}: reads the packed QKV, "
        f"writes one dQKV", "TorchTitan's")
