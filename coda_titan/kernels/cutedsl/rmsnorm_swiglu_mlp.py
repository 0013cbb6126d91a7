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
     writes ``dGU = r * dz`` plus ``dL/dr = sum(dz * GU)`` partials (ZdZ:
     ``r * dL/dr = sum(dz * z)``).
  4. ``dh = dGU @ W13 + dout - (r**3 dL/dr / D) h``: the RMSNorm backward and
     the residual gradient in the dgrad epilogue.
Weight gradients ``dW2 = dout.T @ a`` and ``dW13 = dGU.T @ h`` are plain GEMMs.

Steps 1 and 2 are two custom ops. The second, ``out = h + a @ W2.T``, takes
GU, ``a`` and ``r`` from the first as caches of functions of its other inputs
(h, the norm weight, W1, W3), and its registered backward (3 and 4) is the
whole MLP's; the first is called on detached inputs and has no backward.
Split so, activation checkpointing under torch.compile recomputes only the
first (the backward reads GU and ``r``, not ``out``), as it skips the w2 GEMM
of TorchTitan's own block.
"""

import torch
from quack.activation import dswiglu, swiglu
from quack.epilogue import gemm_epilogue
from quack.epilogue.math import pack, unpack
from quack.epilogue.ops import ColVecLoad, ColVecReduce
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list

from ..fallback import report_fallback
from ..rmsnorm_swiglu_mlp import rmsnorm_swiglu_mlp as reference
from ..deferred_rmsnorm import row_sumsq, rstd_from_sumsq
from .gemm import (
    TILES, aligned, folded_weight, tile_partials, unfold_grads, unsupported_reason)
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
    reduces={"drstd": ColVecReduce("drstd")},
    mode="packed_cd_b16x2",
)
def dswiglu_drstd_epi(acc, c, rstd):
    """acc = da; c = saved (gate, up). dGU = r*dz, act recomputed, dL/dr = sum dz*GU."""
    gate, up = unpack(c)
    dgate, dup, act = dswiglu(gate * rstd, up * rstd, acc)
    return {"D": pack(dgate * rstd, dup * rstd), "act": act, "drstd": dgate * gate + dup * up}


@torch.library.custom_op("coda::rmsnorm_swiglu_fwd", mutates_args=(), device_types="cuda")
def rmsnorm_swiglu_fwd(
    h: torch.Tensor, rstd: torch.Tensor, w13: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    h, rstd, w13 = aligned(h, rstd, w13)
    gu = torch.empty(h.shape[0], w13.shape[0], dtype=h.dtype, device=h.device)
    act = torch.empty(h.shape[0], w13.shape[0] // 2, dtype=h.dtype, device=h.device)
    rstd_swiglu_epi.gemm(h, w13, gu, None, epi_args=dict(rstd=rstd, act=act), **CFG_UP)
    return gu, act


@rmsnorm_swiglu_fwd.register_fake
def _(h, rstd, w13):
    return h.new_empty(h.shape[0], w13.shape[0]), h.new_empty(h.shape[0], w13.shape[0] // 2)


@torch.library.custom_op("coda::dswiglu_drstd", mutates_args=(), device_types="cuda")
def dswiglu_drstd(
    dout: torch.Tensor, w2: torch.Tensor, gu: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dGU, act, dL/dr) from the w2 dgrad ``dout @ W2``."""
    dout, w2, gu, rstd = aligned(dout, w2, gu, rstd)
    m, hidden = dout.shape[0], w2.shape[1]
    dgu = torch.empty_like(gu)
    act = torch.empty(m, hidden, dtype=dout.dtype, device=dout.device)
    partials = tile_partials(m, hidden, CFG_DOWN_GRAD, dout.device)
    dswiglu_drstd_epi.gemm(dout, w2.mT, dgu, gu, epi_args=dict(rstd=rstd, act=act, drstd=partials),
                           **CFG_DOWN_GRAD)
    return dgu, act, partials.sum(-1)


@dswiglu_drstd.register_fake
def _(dout, w2, gu, rstd):
    m = dout.shape[0]
    return (torch.empty_like(gu), dout.new_empty(m, w2.shape[1]),
            dout.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("coda::rmsnorm_swiglu", mutates_args=(), device_types="cuda")
def rmsnorm_swiglu(
    h: torch.Tensor, sumsq: torch.Tensor, norm_weight: torch.Tensor, w1: torch.Tensor,
    w3: torch.Tensor, eps: float, keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(GU, act, r) for h (M, D): the pre-activation, silu(r*gate) * (r*up), the row rstd.
    No backward: ``swiglu_down_residual``'s covers it. ``keep``: the folded W13
    stays prepared for the recompute and the dgrad."""
    rstd = rstd_from_sumsq(sumsq, h.shape[-1], eps)
    gu, act = rmsnorm_swiglu_fwd(h, rstd, folded_weight([w1, w3], norm_weight, True, keep))
    return gu, act, rstd


@rmsnorm_swiglu.register_fake
def _(h, sumsq, norm_weight, w1, w3, eps, keep):
    m, f = h.shape[0], w1.shape[0]
    return h.new_empty(m, 2 * f), h.new_empty(m, f), h.new_empty(m, dtype=torch.float32)


@torch.library.custom_op("coda::swiglu_down_residual", mutates_args=(), device_types="cuda")
def swiglu_down_residual(
    h: torch.Tensor, act: torch.Tensor, gu: torch.Tensor, rstd: torch.Tensor,
    norm_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
) -> torch.Tensor:
    """out = h + act @ W2.T (h's shape); act, GU and r as ``rmsnorm_swiglu`` returned them
    for these h, norm weight, W1 and W3."""
    return linear_residual_sumsq_fwd(h, act, w2)[0]


@swiglu_down_residual.register_fake
def _(h, act, gu, rstd, norm_weight, w1, w3, w2):
    return torch.empty_like(h)


def _setup_context(ctx, inputs, output):
    h, _, gu, rstd, norm_weight, w1, w3, w2 = inputs
    ctx.save_for_backward(h, gu, rstd, norm_weight, w1, w3, w2)


def _backward(ctx, dout):
    """The MLP's backward; d r / d h = -r**3 h / D gives the RMSNorm correction."""
    h, gu, rstd, norm_weight, w1, w3, w2 = ctx.saved_tensors
    h2d = h.reshape(-1, h.shape[-1])
    dout = dout.reshape(h2d.shape).contiguous()
    dgu, act, drstd = dswiglu_drstd(dout, w2, gu, rstd)
    dw2 = dout.t() @ act
    dh = rmsnorm_linear_grad(dgu, [w1, w3], norm_weight, True, h2d, rstd.pow(3) * drstd, dout)
    dw1, dw3, dnorm = unfold_grads(dgu.t() @ h2d, [w1, w3], norm_weight, True)
    return dh.view(h.shape), None, None, None, dnorm, dw1, dw3, dw2


swiglu_down_residual.register_autograd(_backward, setup_context=_setup_context)

# TorchTitan's selective op AC saves the outputs of the ops in this set (its
# mm and attention ops): GU and r are saved the same way, not recomputed with
# their GEMM.
_op_sac_save_list.add(torch.ops.coda.rmsnorm_swiglu.default)


def rmsnorm_swiglu_mlp(h, norm_weight, w1, w3, w2, eps, sumsq=None, *, strict=False,
                       keep_weights=False):
    reason = unsupported_reason(h, weights=(w1, w3, w2))
    if reason is not None:
        report_fallback("rmsnorm_swiglu_mlp", reason, strict)
        return reference(h, norm_weight, w1, w3, w2, eps, sumsq=sumsq)
    if sumsq is None:
        sumsq = row_sumsq(h.detach()).reshape(-1)
    gu, act, rstd = rmsnorm_swiglu(h.detach().reshape(-1, h.shape[-1]), sumsq, norm_weight.detach(),
                                   w1.detach(), w3.detach(), eps, keep_weights)
    return swiglu_down_residual(h, act, gu, rstd, norm_weight, w1, w3, w2)
