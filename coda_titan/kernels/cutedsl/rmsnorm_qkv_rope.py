"""attention_norm + wq/wk/wv + RoPE on quack's SM90 GEMM (math: ``..rmsnorm_qkv_rope``).

forward
  ``r`` from one row reduction over ``x`` (no producer GEMM precedes the block
  input), then one GEMM ``x @ [Wq; Wk; Wv]'.T`` (norm weight folded) whose
  epilogue scales by ``r`` and rotates each (even, odd) column pair by
  ``position * inv_freq``; V columns carry frequency 0, an exact identity.
  ``inv_freq`` is read back from TorchTitan's float32 table (its llama3
  scaling included); the product with the position is formed in float-float
  turns and range-reduced exactly (quack's rotary helpers), so the angle is
  at least as accurate as TorchTitan's float32 ``t * freq``.
backward
  ``dzr = r * [R^T dq, R^T dk, dv]`` and ``sum(dz * z) = sum(dqkv * qkv)`` in
  one elementwise pass (torch.compile-generated: no GEMM is adjacent), then
  ``dx`` from the dgrad GEMM with the RMSNorm backward in its epilogue, and the
  plain wgrad ``dW' = dzr.T @ x``.
"""

import torch
from quack.epilogue import gemm_epilogue
from quack.epilogue.math import pack, unpack
from quack.epilogue.ops import ColVecLoad, RowVecLoad
from quack.epilogue.rotary import _angle_turns, _sincos_turns, make_interleaved_inv_freq
from torch.utils.weak import WeakTensorKeyDictionary

from ..deferred_rmsnorm import row_sumsq, rstd_from_sumsq
from ..rmsnorm_qkv_rope import rmsnorm_qkv_rope as reference
from ..rmsnorm_qkv_rope import rotate
from .gemm import TILES, aligned, fold_weight, unfold_grads, unsupported_reason, warn_fallback
from .rmsnorm_linear_grad import rmsnorm_linear_grad

CFG = TILES["qkv_rope"]


@gemm_epilogue(
    ops={"pos": ColVecLoad("pos"), "freq": RowVecLoad("freq"), "rstd": ColVecLoad("rstd")},
    mode="acc_pair",
)
def rstd_rope_epi(acc, pos, freq, rstd):
    """z = r * acc, then (a, b) -> (a cos - b sin, a sin + b cos), angle = pos * freq."""
    a, b = unpack(acc * rstd)
    sin, cos = _sincos_turns(*_angle_turns(pos, freq))
    return {"D": pack(a * cos - b * sin, a * sin + b * cos)}


@torch.library.custom_op("coda::rmsnorm_qkv_rope_fwd", mutates_args=(), device_types="cuda")
def rmsnorm_qkv_rope_fwd(
    x: torch.Tensor, rstd: torch.Tensor, folded_weight: torch.Tensor, positions: torch.Tensor,
    freq: torch.Tensor,
) -> torch.Tensor:
    x, rstd, folded_weight, positions, freq = aligned(x, rstd, folded_weight, positions, freq)
    qkv = torch.empty(x.shape[0], folded_weight.shape[0], dtype=x.dtype, device=x.device)
    rstd_rope_epi.gemm(x, folded_weight, qkv, None,
                       epi_args=dict(pos=positions, freq=freq, rstd=rstd), **CFG)
    return qkv


@rmsnorm_qkv_rope_fwd.register_fake
def _(x, rstd, folded_weight, positions, freq):
    return x.new_empty(x.shape[0], folded_weight.shape[0])


# Per RoPE table tensor (weakly held: an entry dies with its tensor).
_freq_tables = WeakTensorKeyDictionary()


def rope_freq_table(freqs_cis: torch.Tensor, nq: int, nk: int, nv: int) -> torch.Tensor:
    """The (nq + nk + nv,) float-float inverse-frequency row the epilogue reads:
    TorchTitan's (scaled) frequencies, repeated per q/k head, 0 on v columns.
    Built once per RoPE table (a model buffer) and cached: it is ~10 small launches."""
    key = (freqs_cis._version, nq, nk, nv)
    cached = None if torch.compiler.is_compiling() else _freq_tables.get(freqs_cis)
    if cached is not None and key in cached:
        return cached[key]
    inv_freq = freqs_cis[1].angle().double()
    table = make_interleaved_inv_freq(inv_freq, nq + nk, nv, 2 * freqs_cis.shape[-1])
    if not torch.compiler.is_compiling():
        _freq_tables.setdefault(freqs_cis, {})[key] = table
    return table


@torch.compile(dynamic=False)
def _rope_backward_zdz(dqkv, qkv, freqs_real, positions, rstd, nq: int, nk: int):
    acc = rstd.dtype
    table = freqs_real[positions]
    cos, sin = table[..., 0], table[..., 1]
    zdz = (dqkv.to(acc) * qkv.to(acc)).sum(-1)
    dq, dk, dv = dqkv.to(acc).split((nq, nk, dqkv.shape[-1] - nq - nk), dim=-1)
    dz = torch.cat((rotate(dq, cos, sin, inverse=True), rotate(dk, cos, sin, inverse=True), dv), -1)
    return (dz * rstd[:, None]).to(qkv.dtype), zdz


@torch.library.custom_op("coda::rope_backward_zdz", mutates_args=(), device_types="cuda")
def rope_backward_zdz(
    dqkv: torch.Tensor, qkv: torch.Tensor, freqs_cis: torch.Tensor, positions: torch.Tensor,
    rstd: torch.Tensor, nq: int, nk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r * [R^T dq, R^T dk, dv], sum(dz * z) = sum(dqkv * qkv))`` in one pass."""
    return _rope_backward_zdz(dqkv, qkv, torch.view_as_real(freqs_cis), positions, rstd, nq, nk)


@rope_backward_zdz.register_fake
def _(dqkv, qkv, freqs_cis, positions, rstd, nq, nk):
    return torch.empty_like(qkv), rstd.new_empty(rstd.shape)


@torch.library.custom_op("coda::rmsnorm_qkv_rope", mutates_args=(), device_types="cuda")
def rmsnorm_qkv_rope_op(
    x: torch.Tensor, norm_weight: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
    wv: torch.Tensor, freqs_cis: torch.Tensor, positions: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(qkv, r): post-RoPE ``[q | k | v]`` (M, Nq + Nk + Nv) and the row rstd.

    One custom op with its backward registered (not an autograd.Function), so
    that under torch.compile activation checkpointing can recompute it."""
    rstd = rstd_from_sumsq(row_sumsq(x), x.shape[-1], eps)
    folded = fold_weight(torch.cat((wq, wk, wv)), norm_weight)
    freq = rope_freq_table(freqs_cis, wq.shape[0], wk.shape[0], wv.shape[0])
    return rmsnorm_qkv_rope_fwd(x, rstd, folded, positions.float(), freq), rstd


@rmsnorm_qkv_rope_op.register_fake
def _(x, norm_weight, wq, wk, wv, freqs_cis, positions, eps):
    n = wq.shape[0] + wk.shape[0] + wv.shape[0]
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, norm_weight, wq, wk, wv, freqs_cis, positions, _ = inputs
    qkv, rstd = output
    ctx.save_for_backward(x, rstd, norm_weight, wq, wk, wv, freqs_cis, positions, qkv)
    ctx.mark_non_differentiable(rstd)


def _backward(ctx, dqkv, _drstd):
    x, rstd, norm_weight, wq, wk, wv, freqs_cis, positions, qkv = ctx.saved_tensors
    nq, nk = wq.shape[0], wk.shape[0]
    dzr, zdz = rope_backward_zdz(dqkv.contiguous(), qkv, freqs_cis, positions, rstd, nq, nk)
    weight = torch.cat((wq, wk, wv))
    dx = rmsnorm_linear_grad(dzr, fold_weight(weight, norm_weight), x, rstd.square() * zdz, None)
    dweight, dnorm = unfold_grads(dzr.t() @ x, weight, norm_weight)
    dwq, dwk, dwv = dweight.split((nq, nk, wv.shape[0]))
    return dx, dnorm, dwq, dwk, dwv, None, None, None


rmsnorm_qkv_rope_op.register_autograd(_backward, setup_context=_setup_context)


def rmsnorm_qkv_rope(x, norm_weight, wq, wk, wv, freqs_cis, positions, eps):
    reason = unsupported_reason(x, weights=(wq, wk, wv))
    if reason is not None:
        warn_fallback("rmsnorm_qkv_rope", reason)
        return reference(x, norm_weight, wq, wk, wv, freqs_cis, positions, eps)
    qkv, _ = rmsnorm_qkv_rope_op(x, norm_weight, wq, wk, wv, freqs_cis, positions, eps)
    return qkv.split((wq.shape[0], wk.shape[0], wv.shape[0]), dim=-1)
