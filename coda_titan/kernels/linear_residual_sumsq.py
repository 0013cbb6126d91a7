"""wo + residual add + sum of squares as one op.

Forward::

    h  = x + o @ Wo.T
    ss = sum(h**2)                 # per row; here of h as stored, in the kernel
                                   # of the fp32 h before its rounding

``ss`` is what the next RMSNorm needs (``r = rsqrt(ss / D + eps)``); in the
kernel each N-tile of the GEMM epilogue writes a partial sum and a tiny
finalize adds them, so ``h`` is never re-read. ``ss`` is a cached function of
``h``, not an independent output: it is non-differentiable, and the consumer's
backward accounts for ``r``'s dependence on ``h``. Backward is the plain
linear + residual one: ``dx = dh``, ``do = dh @ Wo``, ``dWo = dh.T @ o``.
"""

import torch

from .deferred_rmsnorm import acc_dtype, row_sumsq
from .fp8 import gemm, history_rows


class LinearResidualSumSq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, o, weight, fp8, history):
        acc = acc_dtype(x.dtype)
        rows = history_rows(history, "linear_residual_sumsq")
        h = (x.to(acc) + gemm(o, weight.t(), fp8, history=(rows[0], None)).to(acc)).to(x.dtype)
        sumsq = row_sumsq(h)
        ctx.save_for_backward(o, weight)
        ctx.mark_non_differentiable(sumsq)
        # Not saved for backward: the history is written in place by every cast.
        ctx.fp8, ctx.rows = fp8, rows
        return h, sumsq

    @staticmethod
    def backward(ctx, dh, _dsumsq):
        o, weight = ctx.saved_tensors
        (o_row, dh_row), dh_c = ctx.rows, dh.to(weight.dtype)
        return (dh, gemm(dh_c, weight, ctx.fp8, ("grad", "weight"), (dh_row, None)),
                gemm(dh_c.t(), o, ctx.fp8, ("grad", "act"), (dh_row, o_row)), None, None)


def linear_residual_sumsq(
    x: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, fp8: str | None = None,
    history: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (M, D), ``o`` (M, K), ``weight`` (D, K) -> ``h`` (M, D), ``sum(h**2)`` (M,).
    ``fp8``: the GEMMs' FP8 recipe (``fp8.gemm``), None for bf16; ``history``: the
    block's amax history (rows ``o``, ``dh``: ``fp8.HISTORY_ROWS``), where it keeps one."""
    return LinearResidualSumSq.apply(x, o, weight, fp8, history)
