"""The RMSNorm backward finished in a dgrad GEMM's epilogue (ZdZ).

With ``dzr = r * dz`` (the incoming gradient already scaled by the deferred
rstd), ``c_r = r**2 * sum(dz * z)`` per row and the folded weight ``W'``::

    dx = dzr @ W' - (c_r / D) * x

one GEMM ``dzr @ W'`` whose epilogue reads ``x`` (a tile load) and the
per-row correction.
"""

import torch
from quack.epilogue import gemm_epilogue
from quack.epilogue.ops import ColVecLoad

from .gemm import TILES, aligned

CFG = TILES["rmsnorm_grad"]


@gemm_epilogue(ops={"corr": ColVecLoad("corr")})
def rmsnorm_grad_epi(acc, x, corr):
    """dx = acc + x * corr, corr = -r**2 * sum(dz*z) / D."""
    return {"D": acc + x * corr}


@torch.library.custom_op("coda::rmsnorm_linear_grad", mutates_args=(), device_types="cuda")
def rmsnorm_linear_grad(
    dzr: torch.Tensor, folded_weight: torch.Tensor, x: torch.Tensor, zdz_r2: torch.Tensor
) -> torch.Tensor:
    dzr, folded_weight, x = aligned(dzr, folded_weight, x)
    dx = torch.empty_like(x)
    rmsnorm_grad_epi.gemm(dzr, folded_weight.mT, dx, None,
                          epi_args=dict(x=x, corr=zdz_r2 * (-1.0 / x.shape[-1])), **CFG)
    return dx


@rmsnorm_linear_grad.register_fake
def _(dzr, folded_weight, x, zdz_r2):
    return torch.empty_like(x)
