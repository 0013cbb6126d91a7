"""attention_norm + wq/wk/wv + RoPE as one op.

Forward, with ``W = [Wq; Wk; Wv]`` and norm weight ``g`` folded in::

    r = rsqrt(mean(x**2) + eps)
    z = r * (x @ (W * g).T)                      # deferred rstd
    qkv = [R(z_q) | R(z_k) | z_v]                # RoPE on (even, odd) pairs, packed

``R`` rotates each interleaved pair ``(a, b)`` of a head by the position's
angle: ``(a cos - b sin, a sin + b cos)``, as TorchTitan's complex
``freqs_cis`` does. Backward, from the packed ``dqkv = [dq | dk | dv]``:
``dz_q = R^T(dq)``, ``dz_k = R^T(dk)``, and since ``R`` is orthogonal
``c = sum z*dz = sum(qkv * dqkv)``: the pre-RoPE projections are never saved.
The RMSNorm backward then finishes in the dgrad GEMM (see ``deferred_rmsnorm``).
"""

import torch

from .deferred_rmsnorm import (
    acc_dtype,
    deferred_norm_linear,
    fold_norm_weight,
    folded_weight_grad,
    rmsnorm_input_grad,
    row_sumsq,
    rstd_from_sumsq,
    rstd_scaled,
    unfold_weight_grads,
)
from .fp8 import history_rows


def token_positions(
    batch: int, seqlen: int, positions: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Position of each of the ``batch * seqlen`` tokens, as TorchTitan reads
    ``positions``: None (0..seqlen-1), (1, seqlen) shared by the batch, or
    (batch, seqlen)."""
    if positions is None:
        positions = torch.arange(seqlen, device=device)
    return positions.expand(batch, seqlen).reshape(-1)


def rope_tables(
    freqs_cis: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(cos, sin)``, each ``(M, head_dim // 2)``, from TorchTitan's table."""
    table = freqs_cis[positions]
    acc = acc_dtype(dtype)
    return table.real.to(acc), table.imag.to(acc)


def rotate(z: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """Apply ``R`` (or ``R^T``) to ``z`` (M, heads * head_dim) in place of pairs."""
    m = z.shape[0]
    pairs = z.reshape(m, -1, cos.shape[-1], 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    if inverse:
        s = -s
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).reshape(m, -1)


class RMSNormQKVRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, wq, wk, wv, freqs_cis, positions, eps, fp8, history):
        cos, sin = rope_tables(freqs_cis, positions, x.dtype)
        rstd = rstd_from_sumsq(row_sumsq(x), x.shape[-1], eps)
        weight = torch.cat((wq, wk, wv))
        rows = history_rows(history, "rmsnorm_qkv_rope")
        z = deferred_norm_linear(x, rstd, fold_norm_weight(weight, norm_weight), fp8, rows[0])
        nq, nk = wq.shape[0], wk.shape[0]
        qkv = torch.cat(
            (rotate(z[:, :nq], cos, sin), rotate(z[:, nq : nq + nk], cos, sin), z[:, nq + nk :]),
            dim=-1,
        ).to(weight.dtype)
        ctx.save_for_backward(x, rstd, norm_weight, weight, cos, sin, qkv)
        # The history is not saved for backward: every cast writes it in place.
        ctx.splits, ctx.fp8, ctx.rows = (nq, nk, wv.shape[0]), fp8, rows
        return qkv

    @staticmethod
    def backward(ctx, dqkv):
        x, rstd, norm_weight, weight, cos, sin, qkv = ctx.saved_tensors
        dqkv = dqkv.to(rstd.dtype)
        zdz = (dqkv * qkv.to(rstd.dtype)).sum(-1)
        dq, dk, dv = dqkv.split(ctx.splits, dim=-1)
        dz = torch.cat(
            (rotate(dq, cos, sin, inverse=True), rotate(dk, cos, sin, inverse=True), dv),
            dim=-1,
        )
        dzr = rstd_scaled(dz, rstd, weight.dtype)
        folded = fold_norm_weight(weight, norm_weight)
        x_row, dzr_row = ctx.rows
        dx = rmsnorm_input_grad(dzr, x, rstd, folded, zdz, fp8=ctx.fp8, history=dzr_row)
        dweight, dnorm = unfold_weight_grads(
            folded_weight_grad(dzr, x, ctx.fp8, (dzr_row, x_row)), weight, norm_weight)
        dwq, dwk, dwv = dweight.split(ctx.splits)
        return dx, dnorm, dwq, dwk, dwv, None, None, None, None, None


def rmsnorm_qkv_rope(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    freqs_cis: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
    fp8: str | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` (M, D) -> ``qkv`` (M, Nq + Nk + Nv): post-RoPE ``[q | k | v]`` packed in
    one tensor (Nq = Hq*hd, Nk = Nv = Hkv*hd), which views as (B, S, Hq + 2 Hkv, hd),
    the layout the attention core reads (``packed_attention``).

    ``freqs_cis`` is TorchTitan's complex RoPE table (max_seq_len, hd/2),
    ``positions`` the (M,) int position of each token (``token_positions``),
    ``fp8`` the GEMMs' FP8 recipe (``fp8.gemm``), None for bf16, ``history`` the
    block's amax history (rows ``x``, ``dzr``: ``fp8.HISTORY_ROWS``), where it keeps one.
    """
    return RMSNormQKVRoPE.apply(x, norm_weight, wq, wk, wv, freqs_cis, positions, eps, fp8,
                                history)
