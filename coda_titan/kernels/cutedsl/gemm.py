"""Shared pieces of the CuTe DSL ops: tile configs, input checks, fallback.

Every kernel is a quack SM90 GEMM (WGMMA + TMA, persistent) with one of our
epilogues, called with a fixed tile configuration (no autotuning on the
training path). Inputs a kernel cannot take (not CUDA, not bf16, not
contiguous, a dimension not a multiple of 8) fall back to the PyTorch
reference with a one-time warning naming the reason, never a CUTLASS error;
operands at an unaligned offset are copied inside the op.
"""

import warnings

import torch

from ..deferred_rmsnorm import fold_norm_weight, unfold_weight_grads


def _cfg(tile_m, tile_n, cluster_m, cluster_n, pingpong):
    return dict(tile_M=tile_m, tile_N=tile_n, cluster_M=cluster_m, cluster_N=cluster_n,
                pingpong=pingpong)


# Fixed tile configurations per GEMM epilogue and shape class, chosen with
# scripts/tune_tiles.py at M = 16384 on the LLaMA-3 1B and 8B dims (H200,
# 2026-11-21; the best config of each, or the best common to both sizes).
TILES = {
    # wo: K = N = D.  1B 0.203 ms (cuBLAS 0.180), 8B 0.825 (0.807).
    "residual_square": _cfg(128, 128, 1, 2, True),
    # w2: K = F >> N = D.  1B 0.785 ms (cuBLAS 0.760), 8B 2.794 (2.806).
    "residual_deep": _cfg(128, 256, 2, 1, False),
    # w1/w3 + SwiGLU.  1B 1.542 ms (cuBLAS 1.613), 8B 5.704 (5.765).
    "swiglu": _cfg(128, 192, 2, 1, True),
    # w2 dgrad + dSwiGLU.  1B 0.908 ms (cuBLAS 0.838), 8B 3.279 (2.796).
    "dswiglu": _cfg(128, 128, 1, 2, True),
    # attention_norm + wq/wk/wv + RoPE.  1B 0.296 ms (cuBLAS 0.289; 128x192 1x2 gives
    # 0.285), 8B 1.208 (1.179; the best measured).
    "qkv_rope": _cfg(128, 192, 2, 1, True),
    # The LM head's three GEMMs were measured per 2048-token chunk after these
    # were set, and the picks below were not re-validated since; the measured
    # best is noted where it differs.
    # Logits + log-sum-exp + target.  8B 3.204 ms (cuBLAS 3.108; the best);
    # 1B slower than 1.601 (1.594; 128x192 2x1 pingpong gives 1.557).
    "logits": _cfg(128, 256, 2, 1, False),
    # Dgrad + ZdZ reduce (measured with a bf16 D; it now stores fp32).  1B 1.484 ms
    # (cuBLAS 1.438; 128x128 1x2 gives 1.382), 8B 3.085 (3.033; 128x256 2x1: 3.002).
    "lm_head_dgrad": _cfg(256, 128, 1, 2, False),
    # Wgrad, fp32 reduce-add.  Slower than 1.672 / 3.540 ms at 1B / 8B (cuBLAS
    # 1.556 / 3.208); 128x128 1x2 pingpong gives 1.629 / 3.422.
    "lm_head_wgrad": _cfg(128, 256, 2, 1, False),
    # dgrad + RMSNorm backward (+ residual grad).  1B 1.575 ms (cuBLAS 1.498),
    # 8B 5.785 (5.500; its best, 128x256 1x2, gives 5.572).
    "rmsnorm_grad": _cfg(256, 128, 1, 2, False),
}


# Weight-sized steps around the GEMMs, each fused into one pass by Inductor
# (eager PyTorch would make several passes over V x D fp32 temporaries), and
# wrapped as custom ops: opaque to whatever traces the backward formulas.
_fold_weight = torch.compile(fold_norm_weight, dynamic=False)
_unfold_grads = torch.compile(unfold_weight_grads, dynamic=False)


@torch.library.custom_op("coda::fold_weight", mutates_args=(), device_types="cuda")
def fold_weight(weight: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """``fold_norm_weight`` (W * g) in one fused pass."""
    return _fold_weight(weight, norm_weight)


@fold_weight.register_fake
def _(weight, norm_weight):
    return torch.empty_like(weight)


@torch.library.custom_op("coda::unfold_grads", mutates_args=(), device_types="cuda")
def unfold_grads(
    folded_grad: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``unfold_weight_grads`` (dW, dg from dW') in one fused pass."""
    return _unfold_grads(folded_grad, weight, norm_weight)


@unfold_grads.register_fake
def _(folded_grad, weight, norm_weight):
    return torch.empty_like(weight), torch.empty_like(norm_weight)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def unsupported_reason(*activations: torch.Tensor, weights: tuple = ()) -> str | None:
    """Why these operands cannot go to the SM90 bf16 kernels, or None.

    Every dimension of a weight is a row stride or a column count of some
    GEMM operand or output, so each must be a multiple of 8 (16 bytes); of an
    activation only the last one is (M is free).
    """
    for t in (*activations, *weights):
        if not t.is_cuda:
            return "tensor not on a CUDA device"
        if t.dtype != torch.bfloat16:
            return f"dtype {t.dtype} (the kernels take bfloat16)"
        if not t.is_contiguous():
            return "non-contiguous tensor"
        if t.numel() == 0:
            return "empty tensor"
    for t in activations:
        if t.shape[-1] % 8 != 0:
            return f"dimension {t.shape[-1]} not a multiple of 8"
    for w in weights:
        if any(n % 8 for n in w.shape):
            return f"weight shape {tuple(w.shape)} not a multiple of 8"
    return None


def aligned(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The operands with their data 32-byte aligned, as the TMA and vector loads
    require: a copy only for a view at an odd offset (``tokens[:, 1:]``).
    Called inside the custom ops, where data pointers exist (not while tracing)."""
    return [t if t is None or t.data_ptr() % 32 == 0 else t.clone() for t in tensors]


_warned: set[tuple[str, str]] = set()


def warn_fallback(op: str, reason: str) -> None:
    """Warn once per (op, reason). Silent while torch.compile traces: the same
    call warns on its first eager run, and a warning would break fullgraph."""
    if torch.compiler.is_compiling() or (op, reason) in _warned:
        return
    _warned.add((op, reason))
    warnings.warn(f"coda_titan {op}: CuTe DSL kernel skipped ({reason}); using the PyTorch reference",
                  stacklevel=3)
