"""The parameters' gradients from a folded weight's (math: ``..deferred_rmsnorm``).

A fused GEMM's wgrad gives ``dW'``, the gradient of its stacked weight with the
norm weight folded in, ``W' = stack_rows([W_1, ...], interleave) * g``. The
parameters' gradients are::

    dW_i = dW'_i * g                 (rounded to W_i's dtype)
    dg   = sum over i and the rows of dW'_i * W_i       (fp32, rounded to g's dtype)

Two Triton launches: one pass reads ``dW'`` and the stacked ``W_i`` (loaded as
the FP8 casts load them, ``stacked_load``), writes each ``dW_i`` and sums
``dW' * W`` down each program's rows (fp32 partials, one row per program); a
second sums the partials into ``dg``, in a fixed order (no atomics: the same
inputs give the same bits). This replaced a torch.compile'd function, whose
guards and wrappers cost the host about 450 us a call (twice per block and
step), in a backward where the host is the limit.
"""

import torch
import triton
import triton.language as tl

from ..kernel_op import kernel_op
from .fp8_operands import (CAST_BLOCK, check_indexable, check_stacked, stacked_load, stacked_rows,
                           stacked_source)
from .triton_launch import Launched

# Rows per program (one partial row each), rows per step, warps: the unfold
# pass's tiling, and the partial rows the second pass sums per step.
UNFOLD_ROWS, UNFOLD_CHUNK, UNFOLD_WARPS = 256, 32, 4
PARTIAL_ROWS = 64


@Launched
@triton.jit
def _unfold_kernel(grad_ptr, w_ptr, w1_ptr, w2_ptr, g_ptr, dw_ptr, dw1_ptr, dw2_ptr, partial_ptr,
                   m, n, n0, n1, SOURCES: tl.constexpr, INTERLEAVE: tl.constexpr,
                   ROWS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS rows by BLOCK columns, CHUNK rows at a time: ``dW' * g`` stored into
    the source each row came from, and the columns' sums of ``dW' * W`` into row
    ``program_id(0)`` of the partials."""
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(g_ptr + rn, mask=rn < n, other=0.0).to(tl.float32)
    # Summed down the rows at the end: a sum per chunk synchronized the warps.
    acc = tl.zeros([CHUNK, BLOCK], dtype=tl.float32)
    for start in range(tl.program_id(0) * ROWS, (tl.program_id(0) + 1) * ROWS, CHUNK):
        rm = start + tl.arange(0, CHUNK)
        inside = (rm[:, None] < m) & (rn[None, :] < n)
        w = stacked_load(w_ptr, w1_ptr, w2_ptr, rm, rn, m, n, n0, n1, SOURCES, INTERLEAVE)
        grad = tl.load(grad_ptr + rm[:, None] * n + rn[None, :], mask=inside, other=0.0)
        grad = grad.to(tl.float32)
        acc += grad * w.to(tl.float32)
        dw = grad * g[None, :]
        if SOURCES == 1:
            tl.store(dw_ptr + rm[:, None] * n + rn[None, :], dw.to(dw_ptr.dtype.element_ty),
                     mask=inside)
        else:
            source, row = stacked_source(rm, n0, n1, SOURCES, INTERLEAVE)
            offsets, source = row[:, None] * n + rn[None, :], source[:, None]
            tl.store(dw_ptr + offsets, dw.to(dw_ptr.dtype.element_ty),
                     mask=inside & (source == 0))
            tl.store(dw1_ptr + offsets, dw.to(dw1_ptr.dtype.element_ty),
                     mask=inside & (source == 1))
            if SOURCES == 3:
                tl.store(dw2_ptr + offsets, dw.to(dw2_ptr.dtype.element_ty),
                         mask=inside & (source == 2))
    tl.store(partial_ptr + tl.program_id(0) * n + rn, tl.sum(acc, 0), mask=rn < n)


@Launched
@triton.jit
def _column_sum_kernel(partial_ptr, out_ptr, rows, n, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``out[c] = sum_r partial[r, c]`` for this program's BLOCK columns."""
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, rows, ROWS):
        rr = start + tl.arange(0, ROWS)
        part = tl.load(partial_ptr + rr[:, None] * n + rn[None, :],
                       mask=(rr[:, None] < rows) & (rn[None, :] < n), other=0.0)
        total += tl.sum(part, 0)
    tl.store(out_ptr + rn, total.to(out_ptr.dtype.element_ty), mask=rn < n)


def unfold(folded_grad: torch.Tensor, weights: list[torch.Tensor], norm_weight: torch.Tensor,
           interleave: bool) -> list[torch.Tensor]:
    """``[dW_1, ..., dg]`` from ``dW'`` (``folded_grad``, the stacked rows of
    ``weights``, 1 to 3 of them, equal in rows when interleaved). A plain
    function, for the custom ops to call (a nested custom op costs the host a
    second dispatch)."""
    what = f"unfold of a {tuple(folded_grad.shape)} folded gradient into"
    check_stacked(weights, norm_weight, interleave, what)
    shapes = [tuple(w.shape) for w in weights]
    m, n = sum(s[0] for s in shapes), shapes[0][1]
    if tuple(folded_grad.shape) != (m, n):
        raise ValueError(f"{what} weights {shapes}: the gradient must be their stacked "
                         f"{m} x {n}")
    check_indexable(m, n, "weight-gradient unfold", "")
    folded_grad, norm_weight = folded_grad.contiguous(), norm_weight.contiguous()
    weights = [w.contiguous() for w in weights]
    grads = [torch.empty_like(w) for w in weights]
    grid = (triton.cdiv(m, UNFOLD_ROWS), triton.cdiv(n, CAST_BLOCK))
    partials = torch.empty(grid[0], n, dtype=torch.float32, device=folded_grad.device)
    dg = torch.empty_like(norm_weight)
    sources, outputs = (weights + weights[:1] * 2)[:3], (grads + grads[:1] * 2)[:3]
    n0, n1 = stacked_rows(shapes)
    _unfold_kernel[grid](folded_grad, *sources, norm_weight, *outputs, partials, m, n, n0, n1,
                         SOURCES=len(weights), INTERLEAVE=interleave, ROWS=UNFOLD_ROWS,
                         CHUNK=UNFOLD_CHUNK, BLOCK=CAST_BLOCK, num_warps=UNFOLD_WARPS)
    _column_sum_kernel[(triton.cdiv(n, CAST_BLOCK),)](partials, dg, grid[0], n,
                                                      ROWS=PARTIAL_ROWS, BLOCK=CAST_BLOCK)
    return grads + [dg]


@kernel_op("coda::unfold_grads")
def unfold_grads(
    folded_grad: torch.Tensor, weights: list[torch.Tensor], norm_weight: torch.Tensor,
    interleave: bool,
) -> list[torch.Tensor]:
    """``[dW1, dW2, ..., dg]`` from the stacked ``dW'`` (``unfold``), for the
    backward formulas that have no custom op of their own around it."""
    return unfold(folded_grad, weights, norm_weight, interleave)


@unfold_grads.register_fake
def _(folded_grad, weights, norm_weight, interleave):
    return [torch.empty_like(w) for w in weights] + [torch.empty_like(norm_weight)]
