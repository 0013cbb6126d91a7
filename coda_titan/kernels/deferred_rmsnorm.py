"""Deferred RMSNorm: the algebra every CODA norm fusion shares.

With ``r = rsqrt(mean(x**2) + eps)`` per row, norm weight ``g`` and a consumer
weight ``W`` stored ``(out, in)``::

    RMSNorm(x; g) @ W.T = r * (x @ W'.T),          W' = W * g[None, :]

so ``r`` is a per-row scale applied after the GEMM and ``g`` folds into the
weight. Backward (ZdZ): with ``z`` the consumer output and ``dz`` its gradient,
``c = sum_n dz_n z_n`` per row and ``dzr = r * dz`` (the GEMM operand, as the
kernels form it, so an FP8 recipe quantizes the same tensors), then::

    dx  = dzr @ W' - (r**2 * c / D) * x
    dW' = dzr.T @ x               dW = dW' * g          dg = sum_n dW' * W

These helpers are the PyTorch reference of the epilogues that implement them;
every fused op (``rmsnorm_qkv_rope``, ``rmsnorm_swiglu_mlp``,
``rmsnorm_linear_cross_entropy``) composes them. Intermediates are kept in
float32 for 16-bit inputs (the kernels' accumulator type) and in the input
dtype otherwise, so a float64 run is exact up to rounding. GEMM operands take
the weight's dtype (the compute dtype); activations on the residual stream
may be wider (float32 under autocast) and keep their dtype. ``fp8`` is the
op's precision recipe for its GEMMs (``fp8.gemm``; None: bf16), ``history``
the amax history rows of the activation and gradient operands, where the
recipe keeps one.
"""

import torch

from .fp8 import gemm


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype: float32 for 16-bit floats, else the dtype itself."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def resolve_eps(eps: float | None, dtype: torch.dtype) -> float:
    """``nn.RMSNorm`` semantics: ``eps=None`` means the dtype's machine epsilon."""
    return torch.finfo(dtype).eps if eps is None else eps


def row_sumsq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each row of ``x`` (M, D), in the accumulator dtype,
    without materializing an upcast copy of ``x``."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=acc_dtype(x.dtype)).square()


def rstd_from_sumsq(sumsq: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """The finalize step: ``rsqrt(sum(x**2) / D + eps)``."""
    return torch.rsqrt(sumsq / dim + eps)


def fold_norm_weight(weight: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """``W' = W * g[None, :]``, rounded once to W's dtype: a weight-sized op
    instead of an activation-sized one."""
    acc = acc_dtype(weight.dtype)
    return (weight.to(acc) * norm_weight.to(acc)).to(weight.dtype)


def deferred_norm_linear(
    x: torch.Tensor, rstd: torch.Tensor, folded_weight: torch.Tensor, fp8: str | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """``r * (x @ W'.T)`` in the accumulator dtype: the forward epilogue's input."""
    z = gemm(x.to(folded_weight.dtype), folded_weight.t(), fp8, history=(history, None))
    return z.to(rstd.dtype) * rstd[:, None]


def rstd_scaled(dz: torch.Tensor, rstd: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dzr = r * dz`` in ``dtype``: the gradient operand of the dgrad and wgrad GEMMs."""
    return (dz.to(rstd.dtype) * rstd[:, None]).to(dtype)


def rmsnorm_input_grad(
    dzr: torch.Tensor,
    x: torch.Tensor,
    rstd: torch.Tensor,
    folded_weight: torch.Tensor,
    zdz: torch.Tensor,
    residual_grad: torch.Tensor | None = None,
    fp8: str | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dx = dzr @ W' - (r**2 * c / D) * x [+ residual_grad]``, ``c = zdz``.

    The dgrad GEMM ``dzr @ W'`` (``dzr = rstd_scaled(dz)``) with the RMSNorm
    backward in its epilogue; the optional residual gradient is added before the
    single rounding to x's dtype.
    """
    d = x.shape[-1]
    acc = rstd.dtype
    dx = gemm(dzr, folded_weight, fp8, ("grad", "weight"), (history, None)).to(acc) - (
        rstd.square() * zdz / d
    )[:, None] * x.to(acc)
    if residual_grad is not None:
        dx = dx + residual_grad.to(acc)
    return dx.to(x.dtype)


def folded_weight_grad(dzr: torch.Tensor, x: torch.Tensor, fp8: str | None = None,
                       history: tuple = (None, None)) -> torch.Tensor:
    """``dW' = dzr.T @ x``, x in the GEMM dtype (``dzr``'s): the wgrad GEMM;
    ``history``: the rows of ``dzr`` and ``x``."""
    return gemm(dzr.t(), x.to(dzr.dtype), fp8, ("grad", "act"), history)


def unfold_weight_grads(
    folded_grad: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``dW'`` to ``(dW, dg)``: ``dW = dW' * g``, ``dg = sum_n dW' * W``."""
    dg = norm_weight_grad_acc(folded_grad, weight).to(norm_weight.dtype)
    return weight_grad(folded_grad, norm_weight, weight.dtype), dg


def weight_grad(folded_grad: torch.Tensor, norm_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dW = dW' * g`` in ``dtype``."""
    acc = acc_dtype(dtype)
    return (folded_grad.to(acc) * norm_weight.to(acc)).to(dtype)


def norm_weight_grad_acc(folded_grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dg = sum_n dW' * W`` in the accumulator dtype (rows of W may come in parts)."""
    acc = acc_dtype(weight.dtype)
    return (folded_grad.to(acc) * weight.to(acc)).sum(0)
