"""ffn_norm + w1/w3 + SwiGLU + w2 + residual on quack's SM90 GEMM
(math: ``..rmsnorm_swiglu_mlp``).

Gate and up rows are interleaved, ``W13 = [W1[0]; W3[0]; W1[1]; W3[1]; ...]``,
and the norm weight is folded in (``W13 * g``, a weight-sized op), so each
accumulator pair is ``(gate, up)`` of one hidden unit. Four GEMMs, each with an epilogue:

forward
  1. ``GU = h @ W13.T``; epilogue stores GU (unscaled pre-activation, saved)
     and ``a = silu(r*gate) * (r*up)``.
  2. ``out = h + a @ W2.T`` (``linear_residual``, with quack's ``scaled_residual``
     epilogue: nothing reads this sum of squares).
backward
  3. ``da = dout @ W2``; epilogue reads GU, recomputes ``a`` (for dW2), and
     writes ``dGU = r * dz`` plus ``dL/dr = sum(dz * GU)`` partials (ZdZ:
     ``r * dL/dr = sum(dz * z)``).
  4. ``dh = dGU @ W13 + dout - (r**3 dL/dr / D) h``: the RMSNorm backward and
     the residual gradient in the dgrad epilogue.
Weight gradients ``dW2 = dout.T @ a`` and ``dW13 = dGU.T @ h`` are plain GEMMs.
Under the FP8 recipe (``fp8``) every GEMM takes FP8 operands (``.fp8_operands``):
the four above dequantize in their epilogues, the wgrads run in cuBLAS.

Steps 1 and 2 are two custom ops, both given ``r`` (finalized from the sum of
squares between them and the wo op, where Inductor fuses it into one kernel).
The second, ``out = h + a @ W2.T``, takes GU and ``a`` from the first and ``r``
as caches of functions of its other inputs (h, the norm weight, W1, W3), and
its registered backward (3 and 4) is the whole MLP's; the first is called on
detached inputs and has no backward.
Split so, activation checkpointing under torch.compile recomputes only the
first and ``r`` (the backward reads GU and ``r``, not ``out``), as it skips the
w2 GEMM of TorchTitan's own block.
"""

import torch
from quack.activation import dswiglu, swiglu
from quack.epilogue import gemm_epilogue
from quack.epilogue.math import pack, unpack
from quack.epilogue.ops import ColVecLoad, ColVecReduce, Scalar
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list

from ..fallback import fallback_recipe, report_fallback, unsupported_reason
from ..fp8 import history_index
from ..kernel_op import kernel_op
from ..rmsnorm_swiglu_mlp import rmsnorm_swiglu_mlp as reference
from ..deferred_rmsnorm import row_sumsq, rstd_from_sumsq
from . import fp8_operands
from .gemm import TILES, aligned, folded_weight, tile_partials
from .linear_residual_sumsq import linear_residual
from .rmsnorm_linear_grad import rmsnorm_dgrad_fp8, rmsnorm_linear_grad
from .unfold_grads import unfold, unfold_grads

CFG_UP = TILES["swiglu"]
CFG_DOWN_GRAD = TILES["dswiglu"]
H_ROW, A_ROW, DOUT_ROW, DZR_ROW = (history_index("rmsnorm_swiglu_mlp", row)
                                   for row in ("h", "a", "dout", "dzr"))


@gemm_epilogue(outputs=("act",), ops={"rstd": ColVecLoad("rstd"), "dq": Scalar("dq")},
               mode="acc_pair")
def rstd_swiglu_epi(acc, rstd, dq):
    """Store the unscaled (gate, up) pair dq*acc; act = silu(r*gate) * (r*up).
    dq: the FP8 dequantization (1 in bf16)."""
    gate, up = unpack(acc * dq)
    gate_n, up_n = unpack(acc * (rstd * dq))
    return {"D": pack(gate, up), "act": swiglu(gate_n, up_n)}


@gemm_epilogue(
    outputs=("act",),
    ops={"rstd": ColVecLoad("rstd"), "dq": Scalar("dq")},
    reduces={"drstd": ColVecReduce("drstd")},
    mode="packed_cd_b16x2",
)
def dswiglu_drstd_epi(acc, c, rstd, dq):
    """dq*acc = da; c = saved (gate, up). dGU = r*dz, act recomputed, dL/dr = sum dz*GU."""
    gate, up = unpack(c)
    dgate, dup, act = dswiglu(gate * rstd, up * rstd, acc * dq)
    return {"D": pack(dgate * rstd, dup * rstd), "act": act, "drstd": dgate * gate + dup * up}


def rmsnorm_swiglu_gemm(h: torch.Tensor, rstd: torch.Tensor, w13: torch.Tensor,
                        dq: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(GU, act) from ``h @ W13'.T``: bf16 operands, or FP8 with ``dq = 1 / (s_h s_w)``."""
    h, rstd, w13 = aligned(h, rstd, w13)
    gu = torch.empty(h.shape[0], w13.shape[0], dtype=torch.bfloat16, device=h.device)
    act = torch.empty(h.shape[0], w13.shape[0] // 2, dtype=torch.bfloat16, device=h.device)
    rstd_swiglu_epi.gemm(h, w13, gu, None, epi_args=dict(rstd=rstd, act=act, dq=dq),
                         post_init_attrs=fp8_operands.accumulation(h), **CFG_UP)
    return gu, act


def dswiglu_drstd_gemm(dout: torch.Tensor, w2t: torch.Tensor, gu: torch.Tensor, rstd: torch.Tensor,
                       dq: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dGU, act, dL/dr) from the w2 dgrad ``dout @ W2`` (``w2t``: W2.T, (F, D), any
    layout in bf16, contiguous in FP8 with ``dq = 1 / (s_dout s_w)``)."""
    dout, w2t, gu, rstd = aligned(dout, w2t, gu, rstd)
    m, hidden = dout.shape[0], w2t.shape[0]
    dgu = torch.empty_like(gu)
    act = torch.empty(m, hidden, dtype=gu.dtype, device=dout.device)
    partials = tile_partials(m, hidden, CFG_DOWN_GRAD, dout.device)
    dswiglu_drstd_epi.gemm(dout, w2t, dgu, gu,
                           epi_args=dict(rstd=rstd, act=act, drstd=partials, dq=dq),
                           post_init_attrs=fp8_operands.accumulation(dout), **CFG_DOWN_GRAD)
    return dgu, act, partials.sum(-1)


@kernel_op("coda::dswiglu_drstd")
def dswiglu_drstd(
    dout: torch.Tensor, w2: torch.Tensor, gu: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dswiglu_drstd_gemm`` in bf16, opaque to the traced backward formula."""
    return dswiglu_drstd_gemm(dout, w2.mT, gu, rstd)


@dswiglu_drstd.register_fake
def _(dout, w2, gu, rstd):
    m = dout.shape[0]
    return (torch.empty_like(gu), dout.new_empty(m, w2.shape[1]),
            dout.new_empty(m, dtype=torch.float32))


@kernel_op("coda::rmsnorm_swiglu")
def rmsnorm_swiglu(
    h: torch.Tensor, rstd: torch.Tensor, norm_weight: torch.Tensor, w1: torch.Tensor,
    w3: torch.Tensor, keep: bool, fp8: str | None, history: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(GU, act) for h (M, D) and its row rstd r: the pre-activation and
    silu(r*gate) * (r*up). No backward: ``swiglu_down_residual``'s covers it.
    ``keep``: the folded W13 (FP8 under ``fp8``) stays prepared for the recompute
    and the dgrad. ``history``: the block's amax history (writes not declared, as
    in ``.linear_residual_sumsq``)."""
    if fp8 is None:
        gu, act = rmsnorm_swiglu_gemm(h, rstd, folded_weight([w1, w3], norm_weight, True, keep))
    else:
        w = fp8_operands.weight([w1, w3], norm_weight, True, keep)
        a = fp8_operands.quantize(h, "act", fp8, fp8_operands.row(history, H_ROW),
                                  times=w.inv_scale)
        gu, act = rmsnorm_swiglu_gemm(a.rows, rstd, w.rows, a.dq)
    return gu, act


@rmsnorm_swiglu.register_fake
def _(h, rstd, norm_weight, w1, w3, keep, fp8, history):
    m, f = h.shape[0], w1.shape[0]
    return h.new_empty(m, 2 * f), h.new_empty(m, f)


@kernel_op("coda::swiglu_down_residual")
def swiglu_down_residual(
    h: torch.Tensor, act: torch.Tensor, gu: torch.Tensor, rstd: torch.Tensor,
    norm_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
    keep: bool, fp8: str | None, history: torch.Tensor | None,
) -> torch.Tensor:
    """out = h + act @ W2.T (h's shape); act and GU as ``rmsnorm_swiglu`` returned them
    for these h, norm weight, W1, W3 and r (and ``keep``, ``fp8``, ``history``)."""
    return linear_residual(h, act, w2, fp8, keep, history, A_ROW, sumsq=False)[0]


@swiglu_down_residual.register_fake
def _(h, act, gu, rstd, norm_weight, w1, w3, w2, keep, fp8, history):
    return torch.empty_like(h)


def _setup_context(ctx, inputs, output):
    h, _, gu, rstd, norm_weight, w1, w3, w2, _, fp8, history = inputs
    ctx.save_for_backward(h, gu, rstd, norm_weight, w1, w3, w2, history)
    ctx.fp8 = fp8


def _backward_bf16(dout, h2d, gu, rstd, norm_weight, w1, w3, w2):
    dgu, act, drstd = dswiglu_drstd(dout, w2, gu, rstd)
    dw2 = dout.t() @ act
    dh = rmsnorm_linear_grad(dgu, [w1, w3], norm_weight, True, h2d, rstd.pow(3) * drstd, dout)
    return dh, dw2, dgu.t() @ h2d


@kernel_op("coda::swiglu_mlp_grads_fp8")
def swiglu_mlp_grads_fp8(
    dout: torch.Tensor, h2d: torch.Tensor, gu: torch.Tensor, rstd: torch.Tensor,
    norm_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, fp8: str,
    history: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW2, dW1, dW3, dg) as ``_backward_bf16`` and ``unfold`` give them, with
    every GEMM in FP8: the dgrads in the epilogue GEMMs, the wgrads in cuBLAS from
    the transposed casts."""
    w = fp8_operands.weight([w2], None, False, last=True)
    g = fp8_operands.quantize(dout, "grad", fp8, fp8_operands.row(history, DOUT_ROW), cols=True,
                              times=w.inv_scale)
    dgu, act, drstd = dswiglu_drstd_gemm(g.rows, w.cols, gu, rstd, g.dq)
    # Each operand goes as soon as its last GEMM is queued: held to the end,
    # they put the W13 wgrad's output at the 8B step's memory peak, over float8's.
    del w
    dw2 = fp8_operands.wgrad(g, act, fp8, fp8_operands.row(history, A_ROW))
    del g, act
    dh, dgu_t = rmsnorm_dgrad_fp8(dgu, [w1, w3], norm_weight, True, h2d, rstd.pow(3) * drstd,
                                  dout, fp8, history, DZR_ROW)
    del dgu
    dw13 = fp8_operands.wgrad(dgu_t, h2d, fp8, fp8_operands.row(history, H_ROW))
    del dgu_t
    return dh, dw2, *unfold(dw13, [w1, w3], norm_weight, True)


@swiglu_mlp_grads_fp8.register_fake
def _(dout, h2d, gu, rstd, norm_weight, w1, w3, w2, fp8, history):
    return (torch.empty_like(h2d), torch.empty_like(w2), torch.empty_like(w1),
            torch.empty_like(w3), torch.empty_like(norm_weight))


def _backward(ctx, dout):
    """The MLP's backward; d r / d h = -r**3 h / D gives the RMSNorm correction."""
    h, gu, rstd, norm_weight, w1, w3, w2, history = ctx.saved_tensors
    h2d = h.reshape(-1, h.shape[-1])
    dout = dout.reshape(h2d.shape).contiguous()
    if ctx.fp8 is None:
        dh, dw2, dw13 = _backward_bf16(dout, h2d, gu, rstd, norm_weight, w1, w3, w2)
        dw1, dw3, dnorm = unfold_grads(dw13, [w1, w3], norm_weight, True)
    else:
        dh, dw2, dw1, dw3, dnorm = swiglu_mlp_grads_fp8(dout, h2d, gu, rstd, norm_weight, w1,
                                                        w3, w2, ctx.fp8, history)
    return dh.view(h.shape), None, None, None, dnorm, dw1, dw3, dw2, None, None, None


swiglu_down_residual.register_autograd(_backward, setup_context=_setup_context)

# TorchTitan's selective op AC saves the outputs of the ops in this set (its
# mm and attention ops): GU and act are saved the same way, not recomputed with
# their GEMM.
_op_sac_save_list.add(torch.ops.coda.rmsnorm_swiglu.default)


def rmsnorm_swiglu_mlp(h, norm_weight, w1, w3, w2, eps, sumsq=None, *, strict=False,
                       keep_weights=False, fp8=None, history=None):
    reason = unsupported_reason(h, weights=(w1, w3, w2), fp8=fp8)
    if reason is not None:
        report_fallback("rmsnorm_swiglu_mlp", reason, strict)
        fp8, history = fallback_recipe(fp8)
        return reference(h, norm_weight, w1, w3, w2, eps, sumsq=sumsq, fp8=fp8, history=history)
    if sumsq is None:
        sumsq = row_sumsq(h.detach()).reshape(-1)
    # The rstd here, not in the op: under torch.compile Inductor makes one kernel
    # of it (three launches in the op, where the FP8 forward is host-bound).
    rstd = rstd_from_sumsq(sumsq, h.shape[-1], eps)
    gu, act = rmsnorm_swiglu(h.detach().reshape(-1, h.shape[-1]), rstd, norm_weight.detach(),
                             w1.detach(), w3.detach(), keep_weights, fp8, history)
    return swiglu_down_residual(h, act, gu, rstd, norm_weight, w1, w3, w2, keep_weights, fp8,
                                history)
