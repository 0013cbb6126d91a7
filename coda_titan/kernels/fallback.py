"""Saying so when a fused op runs the PyTorch reference instead of its kernel.

An op whose inputs its kernel cannot take (a dimension not a multiple of 8, a
float32 tensor, ...) runs the reference: the run's log says so once per op and
reason, and where the user insisted on the kernels (``backend = "cutedsl"``,
``attention = "flash4"``) the op fails with the reason instead. The choice is
made in the layer's forward, which torch.compile traces, and a compiled graph
keeps no Python side effects such as logging; Dynamo therefore runs
``report_fallback`` itself while it traces (as a function whose result is a
constant), so a compiled run reports, or fails, at its first call as an eager
one does. ``unsupported_reason`` is the SM90 kernels' check (the block also
asks it before it prepares their FP8 weights).
"""

import torch
from torchtitan.tools.logging import logger

_reported: set[tuple[str, str]] = set()


def fallback_recipe(fp8: str | None) -> tuple[str | None, None]:
    """``(fp8, history)`` for a reference fallback inside a kernel block: no amax
    history, ``delayed`` scaled as ``tensorwise``. The reference records amaxes by
    an in-place write, which bumps the history's version counter; the kernel ops
    of the same block save the history for their backward, which would then fail
    (and under compile the write-back would overwrite their records)."""
    return ("tensorwise" if fp8 == "delayed" else fp8), None


@torch._dynamo.assume_constant_result
def report_fallback(op: str, reason: str, strict: bool) -> None:
    """Log once that ``op`` ran the reference because of ``reason``; raise if ``strict``."""
    if strict:
        raise RuntimeError(f"CODA {op}: the kernel cannot run these inputs ({reason}), and the "
                           f"config insists on it ([coda] backend = 'cutedsl' or attention = "
                           f"'flash4'); fix the inputs, or set that key to 'auto' to fall back")
    if (op, reason) in _reported:
        return
    _reported.add((op, reason))
    logger.warning(f"CODA {op}: kernel skipped ({reason}); running the PyTorch reference")


def unsupported_reason(*activations: torch.Tensor, weights: tuple = (),
                       any_rows: bool = False, fp8: str | None = None) -> str | None:
    """Why these operands cannot go to the SM90 kernels, or None.

    Every dimension of a weight is a row stride or a column count of some
    GEMM operand or output, so each must be a multiple of 8 (16 bytes); of an
    activation only the last one is (M is free). ``any_rows``: the op pads
    the outputs whose width is a weight's row count (the LM head's vocab),
    so only the weights' last dimension must be a multiple of 8. Under an FP8
    recipe they must be multiples of 16 (16 bytes of FP8; cuBLAS FP8 asks it too).
    """
    for t in (*activations, *weights):
        if not t.is_cuda:
            return "tensor not on a CUDA device"
        if t.dtype != torch.bfloat16:
            return f"dtype {t.dtype} (the kernels take bfloat16)"
        if not t.is_contiguous():
            return "non-contiguous tensor"
        if t.numel() == 0:
            return "empty tensor"
    align = 8 if fp8 is None else 16
    for t in activations:
        if t.shape[-1] % align != 0:
            return f"dimension {t.shape[-1]} not a multiple of {align}"
    for w in weights:
        if any(n % align for n in (w.shape[-1:] if any_rows else w.shape)):
            return f"weight shape {tuple(w.shape)} not a multiple of {align}"
    return None
