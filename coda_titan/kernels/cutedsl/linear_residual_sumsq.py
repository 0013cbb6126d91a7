"""wo + residual + sum of squares on quack's SM90 GEMM (math: ``..linear_residual_sumsq``).

One GEMM ``o @ Wo.T`` whose epilogue adds the residual (the C operand),
stores ``h`` and reduces ``h**2`` per (row, N-tile) into fp32 partials; a
tiny sum finalizes them. Backward is plain (cuBLAS): ``dx = dh``,
``do = dh @ Wo``, ``dWo = dh.T @ o``. Also used for ``w2`` + residual, whose
sum of squares the caller may ignore.
"""

import torch
from quack.epilogue import gemm_epilogue
from quack.epilogue.ops import ColVecReduce

from ..fallback import report_fallback
from ..linear_residual_sumsq import linear_residual_sumsq as reference
from .gemm import TILES, aligned, tile_partials, unsupported_reason


@gemm_epilogue(reduces={"sumsq": ColVecReduce("sumsq", scaled=True)})
def residual_sumsq_epi(acc, c):
    """h = acc + x; sumsq partial = sum over the tile's columns of h**2."""
    h = acc + c
    return {"D": h, "sumsq": (h, h)}


@torch.library.custom_op("coda::linear_residual_sumsq_fwd", mutates_args=(), device_types="cuda")
def linear_residual_sumsq_fwd(
    x: torch.Tensor, o: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + o @ W.T and sum(h**2) per row; x and h may have leading dims
    (a block's output is no view then), o is (M, K)."""
    x, o, weight = aligned(x, o, weight)
    n, k = weight.shape
    cfg = TILES["residual_deep" if k > 2 * n else "residual_square"]
    h = torch.empty_like(x)
    partials = tile_partials(o.shape[0], n, cfg, x.device)
    residual_sumsq_epi.gemm(o, weight, h.view(-1, n), x.view(-1, n),
                            epi_args=dict(sumsq=partials), **cfg)
    return h, partials.sum(-1)


@linear_residual_sumsq_fwd.register_fake
def _(x, o, weight):
    return torch.empty_like(x), x.new_empty(o.shape[0], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _, o, weight = inputs
    ctx.save_for_backward(o, weight)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dh, _dsumsq):
    """The plain linear + residual backward (cuBLAS)."""
    o, weight = ctx.saved_tensors
    dh2d = dh.reshape(-1, weight.shape[0])
    return dh, dh2d @ weight, dh2d.t() @ o


# A custom op with its backward registered (not an autograd.Function): under
# torch.compile, activation checkpointing can then recompute it.
linear_residual_sumsq_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_residual_sumsq(x, o, weight, *, strict=False):
    reason = unsupported_reason(x, o, weights=(weight,))
    if reason is not None:
        report_fallback("linear_residual_sumsq", reason, strict)
        return reference(x, o, weight)
    return linear_residual_sumsq_fwd(x, o, weight)
