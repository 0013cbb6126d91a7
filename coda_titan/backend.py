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


def resolve_backend(requested: str, blocker: str | None = None) -> str:
    """Map ``auto | cutedsl | reference`` to the backend that will run.

    ``blocker`` is a reason of the caller's why the kernels cannot serve this
    run even where they can run (e.g. float32 activations)."""
    if requested not in BACKENDS:
        raise ValueError(
            f"[coda] backend = {requested!r} is not valid; allowed values: {', '.join(BACKENDS)}"
        )
    if requested == "reference":
        logger.info("CODA backend: reference (PyTorch), as configured")
        return "reference"
    reason = cutedsl_unavailable_reason() or blocker
    if reason is None:
        logger.info("CODA backend: cutedsl (CuTe DSL GEMM-epilogue kernels)")
        return "cutedsl"
    if requested == "cutedsl":
        raise RuntimeError(f"[coda] backend = 'cutedsl' cannot run here: {reason}")
    logger.info("CODA backend: reference (PyTorch) because %s", reason)
    return "reference"


def flash4_unavailable_reason() -> str | None:
    """None when flash-attn-4's SM90 kernels can run here, else why not.
    Looks the package up without importing it."""
    reason = cutedsl_unavailable_reason()
    if reason is not None:
        return reason
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ModuleNotFoundError:  # no top-level flash_attn package at all
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
    if requested not in ATTENTIONS:
        raise ValueError(
            f"[coda] attention = {requested!r} is not valid; allowed values: {', '.join(ATTENTIONS)}"
        )
    if requested == "sdpa":
        logger.info("CODA attention: sdpa (TorchTitan's), as configured")
        return "sdpa"
    reason = flash4_unavailable_reason() or flash4_shape_reason(head_dim, attn_type) or blocker
    if reason is None:
        logger.info("CODA attention: flash4 (flash-attn-4 %s on SM90, head_dim %d: reads the "
                    "packed QKV, writes one dQKV)", FLASH4_VERSION, head_dim)
        return "flash4"
    if requested == "flash4":
        raise RuntimeError(f"[coda] attention = 'flash4' cannot run here: {reason}")
    logger.warning("CODA attention: sdpa because %s", reason)
    return "sdpa"
