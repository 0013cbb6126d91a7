"""Shared pieces of the CuTe DSL ops: tile configs, weight folds, operand alignment.

Every kernel is a quack SM90 GEMM (WGMMA + TMA, persistent) with one of our
epilogues, called with a fixed tile configuration (no autotuning on the
training path). Inputs a kernel cannot take (not CUDA, not bf16, not
contiguous, a dimension not a multiple of 8, or 16 under FP8:
``..fallback.unsupported_reason``) fall back to the PyTorch reference, reported
once with the reason, never a CUTLASS error; operands at an unaligned offset
are copied inside the op.
"""

import torch

from ..deferred_rmsnorm import fold_norm_weight
from ..kernel_op import kernel_op
from ..prepared_weights import prepared, taken


def _cfg(tile_m, tile_n, cluster_m, cluster_n, pingpong):
    return dict(tile_M=tile_m, tile_N=tile_n, cluster_M=cluster_m, cluster_N=cluster_n,
                pingpong=pingpong)


# Fixed tile configurations per GEMM epilogue and shape class, chosen with
# scripts/tune_tiles.py at M = 16384 on the LLaMA-3 1B and 8B dims (2026-11-21,
# H200 unless marked H100; the best config of each, or the best common to both
# sizes).
TILES = {
    # wo: K = N = D.  1B 0.203 ms (cuBLAS 0.180), 8B 0.825 (0.807).
    "residual_square": _cfg(128, 128, 1, 2, True),
    # w2: K = F >> N = D.  1B 0.785 ms (cuBLAS 0.760), 8B 2.794 (2.806).
    "residual_deep": _cfg(128, 256, 2, 1, False),
    # w1/w3 + SwiGLU.  1B 1.542 ms (cuBLAS 1.613), 8B 5.704 (5.765). On the H100,
    # tune_tiles.py (L2 flushed) prefers 128x192 1x2 at 1B and 128x256 2x1 at 8B,
    # but both ran slower inside the training step (1B 1.454 vs 1.425 ms, 8B at
    # 4096 tokens 1.409 vs 1.307, from bench_step.py --top-kernels).
    "swiglu": _cfg(128, 192, 2, 1, True),
    # w2 dgrad + dSwiGLU (H100).  1B 1.006 ms (cuBLAS 0.847), 8B 3.587 (2.878), the
    # best at M = 16384; 8B at 4096 tokens 0.856 (0.702; 2x1 gives 0.776).
    "dswiglu": _cfg(128, 128, 1, 2, True),
    # attention_norm + wq/wk/wv + RoPE.  1B 0.296 ms (cuBLAS 0.289; 128x192 1x2 gives
    # 0.285), 8B 1.208 (1.179; the best measured).
    "qkv_rope": _cfg(128, 192, 2, 1, True),
    # The LM head's three GEMMs, per chunk of tokens (H100, 2026-11-21, 1B at
    # 4096 / 8192 / 16384-token chunks; the configs use 8192).
    # Logits + log-sum-exp + target.  2.956 / 6.394 / 12.230 ms (cuBLAS 3.106 /
    # 6.066 / 11.638), the best at each chunk size.
    "logits": _cfg(128, 192, 2, 1, True),
    # Dgrad + ZdZ reduce (fp32 D).  2.791 / 6.113 / 12.130 ms (cuBLAS 2.824 / 5.972 /
    # 12.008); the best but at 8192 (128x256 1x2: 6.047).
    "lm_head_dgrad": _cfg(128, 256, 2, 1, False),
    # Wgrad, fp32 reduce-add.  3.051 / 6.176 / 12.102 ms (cuBLAS 3.043 / 6.856 /
    # 12.095), the best at each chunk size.
    "lm_head_wgrad": _cfg(128, 256, 2, 1, False),
    # dgrad + RMSNorm backward (+ residual grad; H100).  1B 1.529 ms (cuBLAS 1.498; 128x256 1x1 gives
    # 1.467 but is 5% slower at 8B); 8B at 4096 tokens 1.279 (1.348), the best.
    "rmsnorm_grad": _cfg(128, 256, 2, 1, False),
}


# Weight-sized steps around the GEMMs: the projections of one fused GEMM
# (wq/wk/wv concatenated, w1/w3 with rows interleaved) stacked and the norm
# weight folded in, one pass fused by Inductor (eager PyTorch would make
# several passes over V x D fp32 temporaries; the reverse, for the gradients,
# is ``.unfold_grads``). The block ops fold through ``folded_weight`` (kept
# across passes where the converter chooses so); the custom ops keep it opaque
# to whatever traces the backward formulas.
def stack_rows(weights: list[torch.Tensor], interleave: bool) -> torch.Tensor:
    """[W1; W2; ...] or, interleaved, [W1[0]; W2[0]; W1[1]; W2[1]; ...]."""
    return torch.stack(weights, dim=1).flatten(0, 1) if interleave else torch.cat(weights)


@torch.compile(dynamic=False)
def _fold_weight(weights, norm_weight, interleave: bool):
    return fold_norm_weight(stack_rows(weights, interleave), norm_weight)


def folded_weight(weights: list[torch.Tensor], norm_weight: torch.Tensor, interleave: bool,
                  keep: bool = False, last: bool = False) -> torch.Tensor:
    """``stack_rows(weights) * g``; with ``keep``, built once per parameter update and
    shared by the forward, the AC recompute and the dgrad (``..prepared_weights``).
    ``last``: the dgrad, which releases it. Called only inside custom ops: the tensor
    it returns must not become a graph value, which Inductor could reuse as scratch."""
    def build():
        return _fold_weight(weights, norm_weight, interleave)

    tag, sources = f"fold:{interleave}", [*weights, norm_weight]
    return taken(tag, sources, build) if last else prepared(tag, sources, build, keep)


@kernel_op("coda::fold_weight")
def fold_weight(weights: list[torch.Tensor], norm_weight: torch.Tensor, interleave: bool) -> torch.Tensor:
    """``stack_rows(weights) * g`` (W' = W * g) in one pass, unshared: for the LM head,
    which folds once per step anyway (its forward computes its gradients)."""
    return _fold_weight(weights, norm_weight, interleave)


@fold_weight.register_fake
def _(weights, norm_weight, interleave):
    return weights[0].new_empty(sum(w.shape[0] for w in weights), weights[0].shape[1])


def tile_partials(rows: int, cols: int, cfg: dict, device: torch.device) -> torch.Tensor:
    """The fp32 (rows, N-tiles) buffer an epilogue reduces into, one partial per
    row and N-tile of a GEMM with ``cols`` output columns and tile config ``cfg``."""
    return torch.empty(rows, -(-cols // cfg["tile_N"]), dtype=torch.float32, device=device)


def aligned(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The operands with their data 32-byte aligned, as the TMA and vector loads
    require: a copy only for a view at an odd offset (``tokens[:, 1:]``).
    Called inside the custom ops, where data pointers exist (not while tracing)."""
    return [t if t is None or t.data_ptr() % 32 == 0 else t.clone() for t in tensors]
