"""wo + residual + sum of squares on quack's SM90 GEMM (math: ``..linear_residual_sumsq``).

One GEMM ``o @ Wo.T`` whose epilogue adds the residual (the C operand),
stores ``h`` and reduces ``h**2`` per (row, N-tile) into fp32 partials; a
tiny sum finalizes them. Backward is plain: ``dx = dh``, ``do = dh @ Wo``,
``dWo = dh.T @ o`` (cuBLAS). Also used for ``w2`` + residual, whose sum of
squares nothing reads: there quack's ``scaled_residual`` epilogue stores ``h``
alone. Under the FP8 recipe (``fp8``) the GEMMs take FP8 operands
(``.fp8_operands``) and the epilogue dequantizes the accumulator.
"""

import torch
from quack.epilogue import gemm_epilogue
from quack.epilogue.library import scaled_residual
from quack.epilogue.ops import ColVecReduce, Scalar

from ..fallback import fallback_recipe, report_fallback, unsupported_reason
from ..fp8 import history_index
from ..kernel_op import kernel_op
from ..linear_residual_sumsq import linear_residual_sumsq as reference
from . import fp8_operands
from .gemm import TILES, aligned, tile_partials

O_ROW, DH_ROW = (history_index("linear_residual_sumsq", row) for row in ("o", "dh"))


@gemm_epilogue(ops={"dq": Scalar("dq")}, reduces={"sumsq": ColVecReduce("sumsq", scaled=True)})
def residual_sumsq_epi(acc, c, dq):
    """h = dq * acc + x (dq: the FP8 dequantization, 1 in bf16); sumsq partial =
    sum over the tile's columns of h**2."""
    h = acc * dq + c
    return {"D": h, "sumsq": (h, h)}


def residual_gemm(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                  dq: torch.Tensor | float = 1.0,
                  sumsq: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x + dq * (a @ W.T), sum of squares per row or None)``; ``a`` and ``W`` bf16,
    or FP8 with ``dq = 1 / (s_a s_w)``. x and h may have leading dims, a is (M, K)."""
    x, a, weight = aligned(x, a, weight)
    n, k = weight.shape
    cfg = TILES["residual_deep" if k > 2 * n else "residual_square"]
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gemm = dict(post_init_attrs=fp8_operands.accumulation(a), **cfg)
    if not sumsq:
        scaled_residual.gemm(a, weight, h.view(-1, n), x.view(-1, n), epi_args=dict(alpha=dq),
                             **gemm)
        return h, None
    partials = tile_partials(a.shape[0], n, cfg, x.device)
    residual_sumsq_epi.gemm(a, weight, h.view(-1, n), x.view(-1, n),
                            epi_args=dict(sumsq=partials, dq=dq), **gemm)
    return h, partials.sum(-1)


def linear_residual(x: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, fp8: str | None,
                    keep: bool, history: torch.Tensor | None, row: int,
                    sumsq: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``residual_gemm`` of ``o``, in bf16 or cast to FP8 under ``fp8`` with the FP8
    weight (kept prepared with ``keep``) and ``history[row]``. A plain function, for
    the custom ops to call (a nested custom op costs the host a second dispatch)."""
    if fp8 is None:
        return residual_gemm(x, o, weight, sumsq=sumsq)
    w = fp8_operands.weight([weight], None, False, keep)
    a = fp8_operands.quantize(o, "act", fp8, fp8_operands.row(history, row), times=w.inv_scale)
    return residual_gemm(x, a.rows, w.rows, a.dq, sumsq=sumsq)


# The amax history is written by the casts (an atomic max into the current
# entry) but not declared mutated here or in the other FP8 ops: nothing in a
# traced graph reads or writes it otherwise (a reference fallback in a kernel
# block takes none: ``fallback_recipe``), the casts read only the past
# entries, and a max does not depend on the order of the writes. Declared,
# functionalization would thread a copy of it through every graph, the
# backward's included.
@kernel_op("coda::linear_residual_sumsq_fwd")
def linear_residual_sumsq_fwd(
    x: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, fp8: str | None, keep: bool,
    history: torch.Tensor | None, row: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + o @ W.T and sum(h**2) per row; x and h may have leading dims
    (a block's output is no view then), o is (M, K). ``fp8``: the recipe or None;
    ``keep``: its FP8 weight stays prepared; ``history[row]``: ``o``'s amax history.
    Its registered backward is wo's (rows ``o``, ``dh``)."""
    return linear_residual(x, o, weight, fp8, keep, history, row)


@linear_residual_sumsq_fwd.register_fake
def _(x, o, weight, fp8, keep, history, row):
    return torch.empty_like(x), x.new_empty(o.shape[0], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _, o, weight, fp8, _, history, _ = inputs
    ctx.save_for_backward(o, weight, history)
    ctx.fp8 = fp8
    ctx.mark_non_differentiable(output[1])


@kernel_op("coda::linear_grads_fp8")
def linear_grads_fp8(dh: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, fp8: str,
                     history: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh @ W, dh.T @ o)`` in FP8 (``dh`` (M, N) 2-D): both in cuBLAS, the
    forward's FP8 weight taken (its last reader). ``history``: the block's, with
    wo's rows ``o`` and ``dh``."""
    g = fp8_operands.quantize(dh, "grad", fp8, fp8_operands.row(history, DH_ROW), cols=True)
    w = fp8_operands.weight([weight], None, False, last=True)
    do = fp8_operands.scaled_mm(g.rows, g.inv_scale, w.cols, w.inv_scale, o.dtype)
    # The dgrad's operands freed before the wgrad allocates (as ``rmsnorm_dgrad_fp8``).
    del w
    g = g._replace(rows=None)
    return do, fp8_operands.wgrad(g, o, fp8, fp8_operands.row(history, O_ROW))


@linear_grads_fp8.register_fake
def _(dh, o, weight, fp8, history):
    return torch.empty_like(o), torch.empty_like(weight)


def _backward(ctx, dh, _dsumsq):
    """The plain linear + residual backward."""
    o, weight, history = ctx.saved_tensors
    dh2d = dh.reshape(-1, weight.shape[0])
    if ctx.fp8 is None:
        return dh, dh2d @ weight, dh2d.t() @ o, None, None, None, None
    grads = linear_grads_fp8(dh2d.contiguous(), o, weight, ctx.fp8, history)
    return dh, *grads, None, None, None, None


# A custom op with its backward registered (not an autograd.Function): under
# torch.compile, activation checkpointing can then recompute it.
linear_residual_sumsq_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_residual_sumsq(x, o, weight, *, strict=False, keep_weights=False, fp8=None,
                          history=None):
    reason = unsupported_reason(x, o, weights=(weight,), fp8=fp8)
    if reason is not None:
        report_fallback("linear_residual_sumsq", reason, strict)
        fp8, history = fallback_recipe(fp8)
        return reference(x, o, weight, fp8=fp8, history=history)
    return linear_residual_sumsq_fwd(x, o, weight, fp8, keep_weights, history, O_ROW)
