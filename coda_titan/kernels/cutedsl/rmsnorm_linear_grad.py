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
from quack.epilogue.ops import ColVecLoad

from .gemm import TILES, aligned, folded_weight

CFG = TILES["rmsnorm_grad"]


@gemm_epilogue(ops={"corr": ColVecLoad("corr")})
def rmsnorm_grad_residual_epi(acc, c, x, corr):
    """dx = acc + residual_grad + x * corr, corr = -r**2 * sum(dz*z) / D."""
    return {"D": acc + c + x * corr}


@gemm_epilogue(ops={"corr": ColVecLoad("corr")})
def rmsnorm_grad_epi(acc, x, corr):
    """dx = acc + x * corr (no residual gradient joins here)."""
    return {"D": acc + x * corr}


@torch.library.custom_op("coda::rmsnorm_linear_grad", mutates_args=(), device_types="cuda")
def rmsnorm_linear_grad(
    dzr: torch.Tensor, weights: list[torch.Tensor], norm_weight: torch.Tensor, interleave: bool,
    x: torch.Tensor, zdz_r2: torch.Tensor, residual_grad: torch.Tensor | None,
) -> torch.Tensor:
    """dx for ``W' = stack_rows(weights, interleave) * norm_weight``."""
    folded = folded_weight(weights, norm_weight, interleave, last=True)
    dzr, folded, x, residual_grad = aligned(dzr, folded, x, residual_grad)
    dx = torch.empty_like(x)
    epi_args = dict(x=x, corr=zdz_r2 * (-1.0 / x.shape[-1]))
    if residual_grad is None:
        rmsnorm_grad_epi.gemm(dzr, folded.mT, dx, None, epi_args=epi_args, **CFG)
    else:
        rmsnorm_grad_residual_epi.gemm(dzr, folded.mT, dx, residual_grad,
                                       epi_args=epi_args, **CFG)
    return dx


@rmsnorm_linear_grad.register_fake
def _(dzr, weights, norm_weight, interleave, x, zdz_r2, residual_grad):
    return torch.empty_like(x)
