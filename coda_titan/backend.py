"""Which implementation the fused layers run: CuTe DSL kernels or the reference.

``auto`` picks the CuTe DSL kernels on an SM90 GPU with CuTe DSL and quack
installed, when the run's activations are bf16, else the PyTorch reference, and
logs one line saying which and why. ``cutedsl`` insists (and fails at start-up
with the reason if it cannot run); ``reference`` always runs the PyTorch path.
"""

import importlib.util

import torch
from torchtitan.tools.logging import logger

BACKENDS = ("auto", "cutedsl", "reference")


def cutedsl_unavailable_reason() -> str | None:
    """None when the CuTe DSL kernels can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"GPU is SM{major}{minor}, the kernels target SM90 (H100/H200)"
    for module in ("cutlass", "quack"):
        if importlib.util.find_spec(module) is None:
            return f"python package {module!r} is not installed"
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
