"""ffn_norm + w1/w3 + SwiGLU + w2 + residual on quack's SM90 GEMM
(math: ``..rmsnorm_swiglu_mlp``).

Gate and up rows are interleaved, ``W13 = [W1[0]; W3[0]; W1[1]; W3[1]; ...]``,
and the norm weight is folded in (``W13 * g``, a weight-sized op), so each
accumulator pair is ``(gate, up)`` of one hidden unit. Four GEMMs, each with our epilogue:

forward
  1. ``GU = h @ W13.T``; epilogue stores GU (unscaled pre-activation, saved)
     and ``a = silu(r*gate) * (r*up)``.
  2. ``out = h + a @ W2.T`` (``linear_residual_sumsq``'s GEMM).
backward
  3. ``da = dout @ W2``; epilogue reads GU, recomputes ``a`` (for dW2), and
     writes ``dGU = r * dz`` plus ZdZ partials ``sum(dz * z)``.
  4. ``dh = dGU @ W13 + dout - (r**2 c / D) h``: the RMSNorm backward and the
     residual gradient in the dgrad epilogue.
Weight gradients ``dW2 = dout.T @ a`` and ``dW13 = dGU.T @ h`` are plain GEMMs.
"""

import torch
from quack.activation import dswiglu, swiglu
from quack.epilogue import gemm_epilogue
from quack.epilogue.math import pack, unpack
from quack.epilogue.ops import ColVecLoad, ColVecReduce

from ..rmsnorm_swiglu_mlp import rmsnorm_swiglu_mlp as reference
from ..deferred_rmsnorm import fold_norm_weight, row_sumsq, rstd_from_sumsq
from .gemm import TILES, cdiv, unfold_grads, unsupported_reason, warn_fallback
from .linear_residual_sumsq import linear_residual_sumsq_fwd
from .rmsnorm_linear_grad import rmsnorm_linear_grad

CFG_UP = TILES["swiglu"]
CFG_DOWN_GRAD = TILES["dswiglu"]


@gemm_epilogue(outputs=("act",), ops={"rstd": ColVecLoad("rstd")}, mode="acc_pair")
def rstd_swiglu_epi(acc, rstd):
    """Store the unscaled (gate, up) pair; act = silu(r*gate) * (r*up)."""
    gate, up = unpack(acc)
    gate_n, up_n = unpack(acc * rstd)
    return {"D": pack(gate, up), "act": swiglu(gate_n, up_n)}


@gemm_epilogue(
    outputs=("act",),
    ops={"rstd": ColVecLoad("rstd")},
    reduces={"zdz": ColVecReduce("zdz")},
    mode="packed_cd_b16x2",
)
def dswiglu_zdz_epi(acc, c, rstd):
    """acc = da; c = saved (gate, up). dGU = r*dz, act recomputed, zdz = sum dz*z."""
    gate, up = unpack(c)
    gate_n, up_n = gate * rstd, up * rstd
    dgate, dup, act = dswiglu(gate_n, up_n, acc)
    return {"D": pack(dgate * rstd, dup * rstd), "act": act, "zdz": dgate * gate_n + dup * up_n}


def interleave_rows(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return torch.stack((w1, w3), dim=1).reshape(-1, w1.shape[1])


@torch.compile(dynamic=False)
def interleave_fold(w1, w3, norm_weight):
    """(W13, W13 * g): gate/up rows interleaved, and norm weight folded, in one pass."""
    w13 = interleave_rows(w1, w3)
    return w13, fold_norm_weight(w13, norm_weight)


@torch.library.custom_op("coda::rmsnorm_swiglu_fwd", mutates_args=(), device_types="cuda")
def rmsnorm_swiglu_fwd(
    h: torch.Tensor, rstd: torch.Tensor, w13: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    gu = torch.empty(h.shape[0], w13.shape[0], dtype=h.dtype, device=h.device)
    act = torch.empty(h.shape[0], w13.shape[0] // 2, dtype=h.dtype, device=h.device)
    rstd_swiglu_epi.gemm(h, w13, gu, None, epi_args=dict(rstd=rstd, act=act), **CFG_UP)
    return gu, act


@rmsnorm_swiglu_fwd.register_fake
def _(h, rstd, w13):
    return h.new_empty(h.shape[0], w13.shape[0]), h.new_empty(h.shape[0], w13.shape[0] // 2)


@torch.library.custom_op("coda::dswiglu_zdz", mutates_args=(), device_types="cuda")
def dswiglu_zdz(
    dout: torch.Tensor, w2: torch.Tensor, gu: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, hidden = dout.shape[0], w2.shape[1]
    dgu = torch.empty_like(gu)
    act = torch.empty(m, hidden, dtype=dout.dtype, device=dout.device)
    partials = torch.empty(m, cdiv(hidden, CFG_DOWN_GRAD["tile_N"]), dtype=torch.float32,
                           device=dout.device)
    dswiglu_zdz_epi.gemm(dout, w2.mT, dgu, gu, epi_args=dict(rstd=rstd, act=act, zdz=partials),
                         **CFG_DOWN_GRAD)
    return dgu, act, partials.sum(-1)


@dswiglu_zdz.register_fake
def _(dout, w2, gu, rstd):
    m = dout.shape[0]
    return (torch.empty_like(gu), dout.new_empty(m, w2.shape[1]),
            dout.new_empty(m, dtype=torch.float32))


class RMSNormSwiGLUMLPKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, sumsq, norm_weight, w1, w3, w2, eps):
        ctx.shape = h.shape
        h2d = h.reshape(-1, h.shape[-1])
        rstd = rstd_from_sumsq(sumsq, h.shape[-1], eps)
        w13, w13_folded = interleave_fold(w1, w3, norm_weight)
        gu, act = rmsnorm_swiglu_fwd(h2d, rstd, w13_folded)
        out, _ = linear_residual_sumsq_fwd(h, act, w2)
        ctx.save_for_backward(h2d, rstd, norm_weight, w13, w13_folded, w2, gu)
        return out

    @staticmethod
    def backward(ctx, dout):
        h, rstd, norm_weight, w13, w13_folded, w2, gu = ctx.saved_tensors
        dout = dout.reshape(h.shape).contiguous()
        dgu, act, zdz = dswiglu_zdz(dout, w2, gu, rstd)
        dw2 = dout.t() @ act
        dh = rmsnorm_linear_grad(dgu, w13_folded, h, rstd.square() * zdz, dout)
        dw13, dnorm = unfold_grads(dgu.t() @ h, w13, norm_weight)
        return dh.view(ctx.shape), None, dnorm, dw13[0::2], dw13[1::2], dw2, None


def rmsnorm_swiglu_mlp(h, norm_weight, w1, w3, w2, eps, sumsq=None):
    reason = unsupported_reason(h, weights=(w1, w3, w2))
    if reason is not None:
        warn_fallback("rmsnorm_swiglu_mlp", reason)
        return reference(h, norm_weight, w1, w3, w2, eps, sumsq=sumsq)
    if sumsq is None:
        sumsq = row_sumsq(h.detach()).reshape(-1)
    return RMSNormSwiGLUMLPKernel.apply(h, sumsq, norm_weight, w1, w3, w2, eps)
