"""A TorchTitan LLaMA-3 ``TransformerBlock`` whose forward runs the CODA ops.

The block keeps TorchTitan's submodules and names (``attention.wq``,
``attention_norm``, ``feed_forward.w1`` ...), so parameters, checkpoints and
``init_weights`` are TorchTitan's (the ``delayed`` FP8 recipe adds one buffer,
below); only ``forward`` differs::

    qkv     = rmsnorm_qkv_rope(x)              # attention_norm + wq/wk/wv + RoPE, packed
    attn    = packed_attention(qkv)            # causal attention on the packed heads
    h, ss   = linear_residual_sumsq(x, attn)   # x + wo(attn), sum(h**2)
    out     = rmsnorm_swiglu_mlp(h, ss)        # h + w2(silu(w1 n) * w3 n)

Each fusion can be switched off on its own (``Coda`` flags); that part then
runs TorchTitan's own modules. The attention core (``[coda] attention``) is
TorchTitan's SDPA path or FlashAttention-4, which reads the packed QKV (or the
three separate projections) and returns the packed gradient.

Under the ``delayed`` FP8 recipe the block also holds the amax history of its
operands, a buffer (``fp8_amax_history``) so that it goes into checkpoints;
``DelayedScaling`` moves it on after each optimizer step. Until it has a step
of history (a new or re-initialized block) the casts scale from the current
amax (``tensorwise``) while they fill it.
"""

import torch
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.model import TransformerBlock, apply_rotary_emb

from ..backend import resolve_attention, resolve_backend
from ..config import Coda
from ..kernels import attention_for, ops_for, token_positions
from ..kernels.deferred_rmsnorm import resolve_eps
from ..kernels.fallback import unsupported_reason
from ..kernels.fp8 import HISTORY, HISTORY_SITES
from .autocast import compute_weights, outside_autocast


# The name of the delayed FP8 recipe's state, a buffer of each block: its
# state-dict keys end in it.
HISTORY_BUFFER = "fp8_amax_history"


class CodaTransformerBlock(TransformerBlock):
    """Drop-in for TorchTitan's llama3 ``TransformerBlock`` running CODA ops."""

    def __init__(self, layer_id: int, model_args: TransformerModelArgs, coda: Coda | None = None):
        super().__init__(layer_id, model_args)
        self.configure_coda(coda or Coda())

    @classmethod
    def convert(
        cls, block: TransformerBlock, coda: Coda, backend: str, attention: str | None = None,
        keep_weights: bool = False,
    ) -> "CodaTransformerBlock":
        """Turn an existing block into this class in place (no new parameters).
        ``backend`` and ``attention`` are resolved choices (``attention`` resolved
        from ``coda.attention`` when not given); ``keep_weights`` as in ``ops_for``."""
        block.__class__ = cls
        block.configure_coda(coda, backend, attention, keep_weights)
        return block

    def configure_coda(
        self, coda: Coda, backend: str | None = None, attention: str | None = None,
        keep_weights: bool = False,
    ) -> None:
        self.coda = coda
        self.keep_weights = keep_weights
        self.fp8 = coda.fp8_recipe if coda.fp8 == "coda" else None
        if self.fp8 == "delayed" and HISTORY_BUFFER not in self._buffers:
            device = self.attention.wq.weight.device
            self.register_buffer(HISTORY_BUFFER,
                                 torch.zeros(HISTORY_SITES, 1 + HISTORY, device=device,
                                             dtype=torch.float32))
            self.register_load_state_dict_post_hook(_history_loaded)
        self.fp8_history_ready = False
        self.backend = backend or resolve_backend(coda.backend)
        self.attention_kernel = attention or resolve_attention(
            coda.attention, self.attention.head_dim, self.attention.attn_type
        )

    def init_weights(self):
        super().init_weights()
        if self.fp8 == "delayed":
            with torch.no_grad():
                self.fp8_amax_history.zero_()
            self.fp8_history_ready = False

    def fp8_recipe(self) -> tuple[str | None, torch.Tensor | None]:
        """The FP8 recipe this step's casts use, and the amax history they record
        in. Without gradients (evaluation) nothing is recorded: the casts scale
        from their current amaxes, and validation data leaves training's scales alone."""
        if self.fp8 != "delayed":
            return self.fp8, None
        if not torch.is_grad_enabled():
            return "tensorwise", None
        return ("delayed" if self.fp8_history_ready else "tensorwise"), self.fp8_amax_history

    def fp8_weight_stacks(self) -> list[tuple[list[torch.Tensor], torch.Tensor | None, bool]]:
        """The FP8 weights this block's fused GEMMs read, as ``(weights, norm weight,
        interleaved)``, where the kernels keep them (``prepare_fp8_weights``): those of
        each fused op whose weights the kernels take, checked as the op checks them
        (an op that falls back to the reference for its activations leaves its
        prepared weights unread until the optimizer step drops them)."""
        if self.fp8 is None or self.backend != "cutedsl" or not self.keep_weights:
            return []
        attention, ffn, ops = self.attention, self.feed_forward, []
        if self.coda.fuse_norm_qkv_rope:
            ops.append([([attention.wq.weight, attention.wk.weight, attention.wv.weight],
                         self.attention_norm.weight, False)])
        if self.coda.fuse_wo_residual:
            ops.append([([attention.wo.weight], None, False)])
        if self.coda.fuse_norm_swiglu_mlp:
            ops.append([([ffn.w1.weight, ffn.w3.weight], self.ffn_norm.weight, True),
                        ([ffn.w2.weight], None, False)])
        return [stack for stacks in ops
                if unsupported_reason(weights=tuple(w for ws, _, _ in stacks for w in ws),
                                      fp8=self.fp8) is None
                for stack in stacks]

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        coda, attention = self.coda, self.attention
        fp8, history = self.fp8_recipe()
        # Without a backward to come (evaluation), nothing is worth keeping.
        ops = ops_for(self.backend, strict=coda.backend == "cutedsl",
                      keep_weights=self.keep_weights and torch.is_grad_enabled(), fp8=fp8)
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
                qkv = ops.rmsnorm_qkv_rope(
                    x2d, norm.weight, wq, wk, wv, freqs_cis, tokens, resolve_eps(norm.eps, x.dtype),
                    history=history,
                )
            heads = [qkv.view(bs, seqlen, -1, head_dim)]
        else:
            xn = self.attention_norm(x)
            xq, xk, xv = (
                w(xn).view(bs, seqlen, -1, head_dim)
                for w in (attention.wq, attention.wk, attention.wv)
            )
            heads = [*apply_rotary_emb(xq, xk, freqs_cis=freqs_cis, positions=positions), xv]
        attend = attention_for(self.attention_kernel, strict=coda.attention == "flash4")
        attn = attend(attention, heads, attention_masks)

        if coda.fuse_wo_residual:
            (wo,) = compute_weights(x, attention.wo.weight)
            with outside_autocast(x):
                h2d, sumsq = ops.linear_residual_sumsq(
                    x2d, attn.view(bs * seqlen, -1).to(wo.dtype), wo, history=history
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
                h, norm.weight, w1, w3, w2, resolve_eps(norm.eps, x.dtype), sumsq=sumsq,
                history=history,
            )


def prepare_fp8_weights(model: torch.nn.Module, _args) -> None:
    """Forward pre-hook of a model whose blocks run the FP8 kernels and keep their
    weights (``converter.convert_model``): every block's FP8 weights are cast
    together before the first block runs, instead of four weights' launches in
    each block's forward, where the host is the limit (``fp8_operands.prepare_weights``).
    Without gradients (evaluation) the blocks keep nothing, so nothing is prepared."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    stacks = [stack for block in model.modules() if isinstance(block, CodaTransformerBlock)
              for stack in block.fp8_weight_stacks()]
    if stacks:
        from ..kernels.cutedsl.fp8_operands import prepare_weights

        prepare_weights(stacks)


def _history_loaded(block: CodaTransformerBlock, _incompatible_keys) -> None:
    """A loaded amax history (a checkpoint) is used as it is: a resumed run
    scales as the uninterrupted one would (one host sync, at load)."""
    block.fp8_history_ready = bool(block.fp8_amax_history[:, 1:].amax() > 0)
