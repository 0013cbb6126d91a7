"""A TorchTitan LLaMA-3 ``TransformerBlock`` whose forward runs the CODA ops.

The block keeps TorchTitan's submodules and names (``attention.wq``,
``attention_norm``, ``feed_forward.w1`` ...), so parameters, checkpoints and
``init_weights`` are unchanged; only ``forward`` differs::

    q, k, v = rmsnorm_qkv_rope(x)              # attention_norm + wq/wk/wv + RoPE
    h, ss   = linear_residual_sumsq(x, attn)   # x + wo(attn), sum(h**2)
    out     = rmsnorm_swiglu_mlp(h, ss)        # h + w2(silu(w1 n) * w3 n)

Each fusion can be switched off on its own (``Coda`` flags); that part then
runs TorchTitan's own modules.
"""

from torch.nn.attention.flex_attention import BlockMask
from torchtitan.models.attention import VarlenMetadata
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.model import TransformerBlock, apply_rotary_emb

from ..backend import resolve_backend
from ..config import Coda
from ..kernels import ops_for, token_positions
from ..kernels.deferred_rmsnorm import resolve_eps
from .autocast import compute_weights, outside_autocast


def _attend(attention, xq, xk, xv, attention_masks):
    """TorchTitan's attention core on (bs, seqlen, heads, head_dim) q/k/v: the
    middle of torchtitan 0.2.2's ``Attention.forward`` (between the projections
    and ``wo``), which offers no hook for it; revisit on a TorchTitan upgrade."""
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


class CodaTransformerBlock(TransformerBlock):
    """Drop-in for TorchTitan's llama3 ``TransformerBlock`` running CODA ops."""

    def __init__(self, layer_id: int, model_args: TransformerModelArgs, coda: Coda | None = None):
        super().__init__(layer_id, model_args)
        self.configure_coda(coda or Coda())

    @classmethod
    def convert(cls, block: TransformerBlock, coda: Coda, backend: str) -> "CodaTransformerBlock":
        """Turn an existing block into this class in place (no new parameters)."""
        block.__class__ = cls
        block.configure_coda(coda, backend)
        return block

    def configure_coda(self, coda: Coda, backend: str | None = None) -> None:
        self.coda = coda
        self.backend = backend or resolve_backend(coda.backend)

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        ops = ops_for(self.backend)
        coda, attention = self.coda, self.attention
        bs, seqlen, dim = x.shape
        x2d = x.reshape(-1, dim)
        head_dim = attention.head_dim

        if coda.fuse_norm_qkv_rope:
            tokens = token_positions(bs, seqlen, positions, x.device)
            norm = self.attention_norm
            wq, wk, wv = compute_weights(
                x, attention.wq.weight, attention.wk.weight, attention.wv.weight
            )
            with outside_autocast(x):
                xq, xk, xv = ops.rmsnorm_qkv_rope(
                    x2d, norm.weight, wq, wk, wv, freqs_cis, tokens, resolve_eps(norm.eps, x.dtype)
                )
            xq, xk, xv = (t.view(bs, seqlen, -1, head_dim) for t in (xq, xk, xv))
        else:
            xn = self.attention_norm(x)
            xq, xk, xv = (
                w(xn).view(bs, seqlen, -1, head_dim)
                for w in (attention.wq, attention.wk, attention.wv)
            )
            xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis, positions=positions)
        attn = _attend(attention, xq, xk, xv, attention_masks)

        if coda.fuse_wo_residual:
            (wo,) = compute_weights(x, attention.wo.weight)
            with outside_autocast(x):
                h2d, sumsq = ops.linear_residual_sumsq(
                    x2d, attn.view(bs * seqlen, -1).to(wo.dtype), wo
                )
            h = h2d.view(bs, seqlen, dim)
        else:
            h, sumsq = x + attention.wo(attn), None

        if not coda.fuse_norm_swiglu_mlp:
            return h + self.feed_forward(self.ffn_norm(h))
        ffn, norm = self.feed_forward, self.ffn_norm
        w1, w3, w2 = compute_weights(x, ffn.w1.weight, ffn.w3.weight, ffn.w2.weight)
        with outside_autocast(x):
            return ops.rmsnorm_swiglu_mlp(
                h, norm.weight, w1, w3, w2, resolve_eps(norm.eps, x.dtype), sumsq=sumsq
            )
