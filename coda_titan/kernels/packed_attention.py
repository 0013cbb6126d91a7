"""Causal attention read from the packed QKV, its gradient returned packed.

The norm+QKV+RoPE op writes one tensor ``qkv`` (B, S, Hq + 2 Hkv, D): heads
``[0, Hq)`` are q, ``[Hq, Hq + Hkv)`` k, the last Hkv v. With ``G = Hq / Hkv``
query heads per key/value head (GQA) and ``scale = D ** -0.5``::

    p[b, h, s, t] = softmax_t(scale * q[b, s, h] . k[b, t, h // G]),  t <= s
    out[b, s, h]  = sum_t p[b, h, s, t] * v[b, t, h // G]              (B, S, Hq, D)

Backward, with ``lse`` the forward's row log-sum-exp (flash attention's
recompute form)::

    p = exp(scale * q k^T - lse),  dp = dout v^T,  delta = rowsum(dout * out)
    ds = p * (dp - delta)
    dq = scale * ds k,  dk = scale * ds^T q,  dv = p^T dout    (dk, dv summed over the G heads)
    dqkv = [dq | dk | dv]                                        (the packing of qkv)

A kernel that writes dq, dk and dv into views of one buffer hands the QKV+RoPE
backward its input directly: no concatenation, no copy.

``qkv`` is a list: ``[packed]`` as above, or ``[q, k, v]``, three (B, S, H, D)
tensors from separate projections (without ``fuse_norm_qkv_rope``).

This reference is TorchTitan's own attention core (``Attention.inner_attention``:
SDPA, or flex / varlen with their masks) on views of the packed tensor, autograd
concatenating the three gradients; the kernel is ``flash4/packed_attention.py``.
"""

import torch
from torch.nn.attention.flex_attention import BlockMask
from torchtitan.models.attention import VarlenMetadata
from torchtitan.models.llama3.model.model import Attention


def split_heads(
    qkv: list[torch.Tensor], n_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v)``: views of ``[packed]`` along the head axis (``n_heads`` query
    heads, then equal halves of the rest), or the three tensors of ``[q, k, v]``."""
    if len(qkv) == 3:
        return tuple(qkv)
    (packed,) = qkv
    # // and %, not divmod: under torch.compile with dynamic shapes these are SymInts.
    n_kv_heads, odd = (packed.shape[2] - n_heads) // 2, (packed.shape[2] - n_heads) % 2
    if odd or n_kv_heads < 1:
        raise ValueError(
            f"a packed QKV of {packed.shape[2]} heads does not hold {n_heads} query heads "
            f"and two equal groups of key/value heads"
        )
    return packed.split((n_heads, n_kv_heads, n_kv_heads), dim=2)


def packed_attention(
    attention: Attention, qkv: list[torch.Tensor], attention_masks
) -> torch.Tensor:
    """TorchTitan's attention core on ``qkv`` (see the module docstring), returning
    (B, S, Hq * D): the middle of torchtitan 0.2.2's ``Attention.forward`` (between
    the projections and ``wo``), which offers no hook for it; revisit on a
    TorchTitan upgrade."""
    xq, xk, xv = split_heads(qkv, attention.n_heads)
    bs, seqlen = xq.shape[:2]
    xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))
    match attention.attn_type:
        case "flex":
            assert isinstance(attention_masks, BlockMask), attention_masks
            out = attention.inner_attention(
                xq, xk, xv, block_mask=attention_masks, enable_gqa=attention.enable_gqa
            ).transpose(1, 2)
        case "varlen":
            assert isinstance(attention_masks, VarlenMetadata), attention_masks
            out = attention.inner_attention(xq, xk, xv, attention_masks)
        case "sdpa":
            assert attention_masks is None
            out = attention.inner_attention(
                xq, xk, xv, enable_gqa=attention.enable_gqa
            ).transpose(1, 2)
        case _:
            raise ValueError(f"Unknown attention type: {attention.attn_type}")
    return out.contiguous().view(bs, seqlen, -1)
