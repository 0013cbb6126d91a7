"""The RMSNorm backward finished in a dgrad GEMM's epilogue (ZdZ).

With ``dzr = r * dz`` (the incoming gradient already scaled by the deferred
rstd), ``c_r = r**2 * sum(dz * z)`` per row and the folded weight ``W'``
(the forward's where it was kept; this dgrad is its last reader)::

    dx = dzr @ W' - (c_r / D) * x [+ residual_grad]

one GEMM ``dzr @ W'`` whose epilogue reads ``x`` (a tile load), the per-row
correction and, where the op has one, the residual gradient (the C operand).
"""

import torch
from quack.epilogue import gemm_epilogue
from quack.epilogue.ops import ColVecLoad, Scalar

from ..kernel_op import kernel_op
from . import fp8_operands
from .gemm import TILES, aligned, folded_weight
from .unfold_grads import unfold

CFG = TILES["rmsnorm_grad"]
OPS = {"corr": ColVecLoad("corr"), "dq": Scalar("dq")}


@gemm_epilogue(ops=OPS)
def rmsnorm_grad_residual_epi(acc, c, x, corr, dq):
    """dx = dq*acc + residual_grad + x * corr, corr = -r**2 * sum(dz*z) / D
    (dq: the FP8 dequantization, 1 in bf16)."""
    return {"D": acc * dq + c + x * corr}


@gemm_epilogue(ops=OPS)
def rmsnorm_grad_epi(acc, x, corr, dq):
    """dx = dq*acc + x * corr (no residual gradient joins here)."""
    return {"D": acc * dq + x * corr}


def rmsnorm_grad_gemm(dzr: torch.Tensor, folded_t: torch.Tensor, dq: torch.Tensor | float,
                      x: torch.Tensor, zdz_r2: torch.Tensor,
                      residual_grad: torch.Tensor | None) -> torch.Tensor:
    """dx from ``dzr @ W'`` (``folded_t``: W'.T); bf16 operands, or FP8 with
    ``dq = 1 / (s_dzr s_w)``."""
    fast = fp8_operands.accumulation(dzr)
    dzr, folded_t, x, residual_grad = aligned(dzr, folded_t, x, residual_grad)
    dx = torch.empty_like(x)
    epi_args = dict(x=x, corr=zdz_r2 * (-1.0 / x.shape[-1]), dq=dq)
    if residual_grad is None:
        rmsnorm_grad_epi.gemm(dzr, folded_t, dx, None, epi_args=epi_args, post_init_attrs=fast,
                              **CFG)
    else:
        rmsnorm_grad_residual_epi.gemm(dzr, folded_t, dx, residual_grad, epi_args=epi_args,
                                       post_init_attrs=fast, **CFG)
    return dx


@kernel_op("coda::rmsnorm_linear_grad")
def rmsnorm_linear_grad(
    dzr: torch.Tensor, weights: list[torch.Tensor], norm_weight: torch.Tensor, interleave: bool,
    x: torch.Tensor, zdz_r2: torch.Tensor, residual_grad: torch.Tensor | None,
) -> torch.Tensor:
    """dx for ``W' = stack_rows(weights, interleave) * norm_weight``, in bf16."""
    folded = folded_weight(weights, norm_weight, interleave, last=True)
    return rmsnorm_grad_gemm(dzr, folded.mT, 1.0, x, zdz_r2, residual_grad)


@rmsnorm_linear_grad.register_fake
def _(dzr, weights, norm_weight, interleave, x, zdz_r2, residual_grad):
    return torch.empty_like(x)


def rmsnorm_dgrad_fp8(
    dzr: torch.Tensor, weights: list[torch.Tensor], norm_weight: torch.Tensor, interleave: bool,
    x: torch.Tensor, zdz_r2: torch.Tensor, residual_grad: torch.Tensor | None, fp8: str,
    history: torch.Tensor | None, dzr_row: int,
) -> tuple[torch.Tensor, fp8_operands.Fp8Operand]:
    """dx as ``rmsnorm_linear_grads_fp8`` gives it, and ``dzr``'s FP8 cast with only
    the transposed copy the wgrad reads: the dgrad's operands (the weight's and
    ``dzr``'s row-major FP8 copies) are freed on return, before the wgrad
    allocates its output (for W13, the largest of a block's backward)."""
    w = fp8_operands.weight(weights, norm_weight, interleave, last=True)
    dz = fp8_operands.quantize(dzr, "grad", fp8, fp8_operands.row(history, dzr_row), cols=True,
                               times=w.inv_scale)
    dx = rmsnorm_grad_gemm(dz.rows, w.cols, dz.dq, x, zdz_r2, residual_grad)
    return dx, dz._replace(rows=None)


@kernel_op("coda::rmsnorm_linear_grads_fp8")
def rmsnorm_linear_grads_fp8(
    dzr: torch.Tensor, weights: list[torch.Tensor], norm_weight: torch.Tensor, interleave: bool,
    x: torch.Tensor, zdz_r2: torch.Tensor, residual_grad: torch.Tensor | None, fp8: str,
    history: torch.Tensor | None, dzr_row: int, x_row: int,
) -> list[torch.Tensor]:
    """``[dx, dW_1, ..., dg]`` in FP8 from the bf16 ``dzr``, cast once for both
    GEMMs: the dgrad with the RMSNorm backward in its epilogue, the wgrad
    ``dW' = dzr.T @ x`` in cuBLAS, unfolded (``unfold``). ``history``: the block's
    amax history (rows ``dzr_row``, ``x_row``; writes not declared, as in
    ``.linear_residual_sumsq``)."""
    dx, dz = rmsnorm_dgrad_fp8(dzr, weights, norm_weight, interleave, x, zdz_r2, residual_grad,
                               fp8, history, dzr_row)
    folded_grad = fp8_operands.wgrad(dz, x, fp8, fp8_operands.row(history, x_row))
    del dz
    return [dx, *unfold(folded_grad, weights, norm_weight, interleave)]


@rmsnorm_linear_grads_fp8.register_fake
def _(dzr, weights, norm_weight, interleave, x, zdz_r2, residual_grad, fp8, history, dzr_row,
      x_row):
    return ([torch.empty_like(x)] + [torch.empty_like(w) for w in weights]
            + [torch.empty_like(norm_weight)])
