"""ffn_norm + w1/w3 + SwiGLU + w2 + residual as one op.

Forward, with ``W13 = [W1; W3]`` and norm weight ``g`` folded in::

    r   = rsqrt(ss / D + eps)             # ss = sum(h**2), from the producer
    z   = r * (h @ (W13 * g).T)           # z = [z1, z3], saved (pre-activation)
    a   = silu(z1) * z3
    out = h + a @ W2.T

Backward, all of it in the epilogue of the w2 dgrad ``dout @ W2``::

    da  = dout @ W2
    dz1 = da * z3 * silu'(z1),   dz3 = da * silu(z1)
    c   = sum(dz1 * z1 + dz3 * z3)        # ZdZ, per row
    a   = silu(z1) * z3                   # recomputed for dW2 = dout.T @ a

then ``dh = dout + r * (dz @ W13') - (r**2 c / D) h`` in the w1/w3 dgrad epilogue.
"""

import torch

from .deferred_rmsnorm import (
    deferred_norm_linear,
    fold_norm_weight,
    folded_weight_grad,
    rmsnorm_input_grad,
    row_sumsq,
    rstd_from_sumsq,
    rstd_scaled,
    unfold_weight_grads,
)
from .fp8 import gemm, history_rows


class RMSNormSwiGLUMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, sumsq, norm_weight, w1, w3, w2, eps, fp8, history):
        h2d = h.reshape(-1, h.shape[-1])
        rstd = rstd_from_sumsq(sumsq, h.shape[-1], eps)
        w13 = torch.cat((w1, w3))
        rows = history_rows(history, "rmsnorm_swiglu_mlp")
        z = deferred_norm_linear(h2d, rstd, fold_norm_weight(w13, norm_weight), fp8, rows[0])
        z1, z3 = z.chunk(2, dim=-1)
        a = (torch.nn.functional.silu(z1) * z3).to(w2.dtype)
        down = gemm(a, w2.t(), fp8, history=(rows[1], None)).view(h.shape)
        out = (h.to(rstd.dtype) + down.to(rstd.dtype)).to(h.dtype)
        ctx.save_for_backward(h2d, rstd, norm_weight, w13, w2, z.to(w2.dtype))
        # The history is not saved for backward: every cast writes it in place.
        ctx.fp8, ctx.rows = fp8, rows
        return out

    @staticmethod
    def backward(ctx, dout):
        h, rstd, norm_weight, w13, w2, z = ctx.saved_tensors
        (h_row, a_row, dout_row, dgu_row), fp8 = ctx.rows, ctx.fp8
        acc, dtype = rstd.dtype, w2.dtype
        shape, dout = dout.shape, dout.reshape(h.shape)
        dout_c = dout.to(dtype)
        da = gemm(dout_c, w2, fp8, ("grad", "weight"), (dout_row, None)).to(acc)
        z1, z3 = z.to(acc).chunk(2, dim=-1)
        sig = torch.sigmoid(z1)
        silu = z1 * sig
        dz1 = da * z3 * sig * (1 + z1 * (1 - sig))
        dz3 = da * silu
        zdz = (dz1 * z1 + dz3 * z3).sum(-1)
        dw2 = gemm(dout_c.t(), (silu * z3).to(dtype), fp8, ("grad", "act"), (dout_row, a_row))
        dzr = rstd_scaled(torch.cat((dz1, dz3), dim=-1), rstd, dtype)
        dh = rmsnorm_input_grad(dzr, h, rstd, fold_norm_weight(w13, norm_weight), zdz,
                                residual_grad=dout, fp8=fp8, history=dgu_row)
        dw13, dnorm = unfold_weight_grads(folded_weight_grad(dzr, h, fp8, (dgu_row, h_row)), w13,
                                          norm_weight)
        dw1, dw3 = dw13.chunk(2)
        return dh.view(shape), None, dnorm, dw1, dw3, dw2, None, None, None


def rmsnorm_swiglu_mlp(
    h: torch.Tensor,
    norm_weight: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    eps: float,
    sumsq: torch.Tensor | None = None,
    fp8: str | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """``h + w2(silu(w1(n)) * w3(n))``, ``n = RMSNorm(h)``; ``h`` is (..., D).

    ``sumsq`` is ``sum(h**2)`` per row (flattened to (M,)) when a producer
    already reduced it (``linear_residual_sumsq``); otherwise one row-reduction
    pass computes it. The output has ``h``'s shape and is no view (it is a
    block's output, which FSDP hooks). ``fp8``: the GEMMs' FP8 recipe
    (``fp8.gemm``), None for bf16; ``history``: the block's amax history (rows
    ``h``, ``a``, ``dout``, ``dzr``: ``fp8.HISTORY_ROWS``), where it keeps one.
    """
    if sumsq is None:
        sumsq = row_sumsq(h.detach()).reshape(-1)
    return RMSNormSwiGLUMLP.apply(h, sumsq, norm_weight, w1, w3, w2, eps, fp8, history)
