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


class LinearResidualSumSq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, o, weight):
        acc = acc_dtype(x.dtype)
        h = (x.to(acc) + (o @ weight.t()).to(acc)).to(x.dtype)
        sumsq = row_sumsq(h)
        ctx.save_for_backward(o, weight)
        ctx.mark_non_differentiable(sumsq)
        return h, sumsq

    @staticmethod
    def backward(ctx, dh, _dsumsq):
        o, weight = ctx.saved_tensors
        dh_c = dh.to(weight.dtype)
        return dh, dh_c @ weight, dh_c.t() @ o


def linear_residual_sumsq(
    x: torch.Tensor, o: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (M, D), ``o`` (M, K), ``weight`` (D, K) -> ``h`` (M, D), ``sum(h**2)`` (M,)."""
    return LinearResidualSumSq.apply(x, o, weight)
