"""FP8 operands for the kernels: the ``tensorwise`` and ``delayed`` recipes of
``..fp8`` (one scale per tensor, from its current amax or from its amax
history, saturating), on SM90.

quack's SM90 GEMM and cuBLAS FP8 both take K-major operands only, so an operand
is cast in the orientations its GEMMs contract it along:

- an activation ``x`` (M, K) feeds the forward as ``x`` and the wgrad as
  ``x.T``; a gradient ``dy`` (M, N) feeds the dgrad as ``dy`` and the wgrad as
  ``dy.T``: one Triton pass writing both (a tile transposed through shared
  memory; Inductor's and ATen's transposes ran 5-10x slower on the H200),
  after an amax pass under ``tensorwise``; under ``delayed`` the pass
  records the amax itself (an atomic max per tile into the history);
- a weight ``W`` (N, K), norm weight folded in where the op folds it, feeds the
  forward as ``W`` and the dgrad as ``W.T``. It is cast once per parameter
  update (``..prepared_weights``, tagged apart from the bf16 fold) when the
  converter keeps prepared weights, else once per pass; the dgrad transposes
  the kept FP8 copy (``weight``). The amax pass and the cast read the stacked
  projections and fold the norm weight in as they load (``quantize_stacked``):
  the bf16 ``W'`` a separate fold wrote and both passes read is never stored,
  and a compiled fold's host call (~150 us) no longer stalls the forward.
  Where the weights are kept, the model casts every block's before the first
  block runs (``prepare_weights``, from ``layers.block.prepare_fp8_weights``):
  each layout's weights of all layers in one amax and one cast launch, through
  a table of their addresses (``quantize_stacked_group``), so the forward,
  where the host is the limit, no longer launches four weights' casts per block.

The epilogue GEMMs (forward, and the dgrads of the three fused ops: K = D, F
or 2F) run quack's fast accumulation; torchao keeps its dgrads accurate, but
on the GPU tests (up to K = 28672) the kernels' errors equal those of the FP8
reference, whose sums are exact fp32 (``tests/test_gpu_fp8.py``). The wgrads
(K = tokens, the longest sums) and wo's plain dgrad run cuBLAS
``torch._scaled_mm`` with its accurate accumulation.

All of this runs inside custom ops (the backward formulas of the ops call an
FP8 backward custom op), where the casts and the prepared-weight lookups are
opaque to the graph. Each GEMM's dequantization factor ``1 / (s_a s_b)`` is a
1-element fp32 tensor (no host sync), which the epilogues multiply into the
accumulator; the cast of ``a`` writes it (``quantize(..., times=b.inv_scale)``),
as a separate multiply was one more launch per GEMM, where the host is the limit.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..fp8 import AMAX_FLOOR, FORMATS, HISTORY
from ..prepared_weights import held, hold, prepared, taken
from .triton_launch import Launched

CAST_BLOCK = 128

# quack's SM90 FP8 main loop promotes its accumulator every K tile by default
# (about 180 TFLOP/s); this turns that off (1300-1470 TFLOP/s on the H200).
FAST_ACCUM = (("fp8_slow_accum", False),)


def accumulation(a: torch.Tensor) -> tuple:
    """quack's ``post_init_attrs`` for a GEMM whose A operand is ``a``: fast
    accumulation for FP8 operands, nothing for bf16."""
    return FAST_ACCUM if a.dtype.itemsize == 1 else ()


class Fp8Operand(NamedTuple):
    """An operand cast to FP8: ``rows`` as given, ``cols`` its transpose (an
    activation's or gradient's with its rows zero-padded to a multiple of 16; a
    weight's dimensions are multiples of 16 already), each contiguous or None
    where not asked for, ``1 / scale`` (fp32, 1 element) and, where the cast was
    given the other operand's ``1 / scale``, the GEMM's ``dq = 1 / (s_a s_b)``."""

    rows: torch.Tensor | None
    cols: torch.Tensor | None
    inv_scale: torch.Tensor
    dq: torch.Tensor | None = None


@triton.jit
def stacked_source(rm, n0, n1, SOURCES: tl.constexpr, INTERLEAVE: tl.constexpr):
    """For rows ``rm`` of ``stack_rows(sources, INTERLEAVE)`` (of 2 or 3 sources,
    ``n0``, ``n1`` rows in the first two), the source each comes from and its row there."""
    if INTERLEAVE:
        source, row = rm % SOURCES, rm // SOURCES
    else:
        source = (rm >= n0).to(tl.int32) + (rm >= n0 + n1).to(tl.int32)
        row = rm - tl.where(source == 0, 0, tl.where(source == 1, n0, n0 + n1))
    return source, row


@triton.jit
def stacked_load(x_ptr, x1_ptr, x2_ptr, rm, rn, m, n, n0, n1, SOURCES: tl.constexpr,
                 INTERLEAVE: tl.constexpr):
    """Rows ``rm``, columns ``rn`` of ``X = stack_rows([x, x1, x2][:SOURCES],
    INTERLEAVE)`` (each source ``n`` columns wide), in x's dtype, zeros outside."""
    inside = (rm[:, None] < m) & (rn[None, :] < n)
    if SOURCES == 1:
        x = tl.load(x_ptr + rm[:, None] * n + rn[None, :], mask=inside, other=0.0)
    else:
        source, row = stacked_source(rm, n0, n1, SOURCES, INTERLEAVE)
        offsets, source = row[:, None] * n + rn[None, :], source[:, None]
        # Each element is loaded from its one source (the others masked off).
        x = tl.load(x_ptr + offsets, mask=inside & (source == 0), other=0.0)
        x += tl.load(x1_ptr + offsets, mask=inside & (source == 1), other=0.0)
        if SOURCES == 3:
            x += tl.load(x2_ptr + offsets, mask=inside & (source == 2), other=0.0)
    return x


@triton.jit
def stacked_tile(x_ptr, x1_ptr, x2_ptr, g_ptr, m, n, n0, n1, SOURCES: tl.constexpr,
                 INTERLEAVE: tl.constexpr, FOLD: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK x BLOCK tile (rows rm, columns rn) of
    ``X = stack_rows([x, x1, x2][:SOURCES], INTERLEAVE)``, or with FOLD of
    ``fold_norm_weight(X, g)`` (rounded to x's dtype, as the reference folds), in
    fp32 with zeros outside; ``n0``, ``n1``: the rows of x and x1 when stacked."""
    rm = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = stacked_load(x_ptr, x1_ptr, x2_ptr, rm, rn, m, n, n0, n1, SOURCES, INTERLEAVE)
    if FOLD:
        g = tl.load(g_ptr + rn, mask=rn < n, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * g[None, :]).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32), rm, rn


@Launched
@triton.jit
def _amax_kernel(x_ptr, x1_ptr, x2_ptr, g_ptr, amax_ptr, m, n, n0, n1, SOURCES: tl.constexpr,
                 INTERLEAVE: tl.constexpr, FOLD: tl.constexpr, BLOCK: tl.constexpr):
    """The amax of one tile of ``stacked_tile``'s X, an atomic max into ``amax`` (zeroed)."""
    x, _, _ = stacked_tile(x_ptr, x1_ptr, x2_ptr, g_ptr, m, n, n0, n1, SOURCES, INTERLEAVE,
                           FOLD, BLOCK)
    tl.atomic_max(amax_ptr, tl.max(tl.max(tl.abs(x), 1), 0))


@Launched
@triton.jit
def _cast_kernel(x_ptr, x1_ptr, x2_ptr, g_ptr, amax_ptr, history_ptr, q_ptr, qt_ptr, inv_scale_ptr,
                 times_ptr, dq_ptr, m, n, n0, n1, qt_cols, fmax, floor, SOURCES: tl.constexpr,
                 INTERLEAVE: tl.constexpr, FOLD: tl.constexpr, ROWS: tl.constexpr,
                 COLS: tl.constexpr, DELAYED: tl.constexpr, RECORD: tl.constexpr,
                 TIMES: tl.constexpr, HISTORY: tl.constexpr, BLOCK: tl.constexpr):
    """One tile of ``stacked_tile``'s X scaled by ``fmax / amax``, saturated and rounded
    to FP8: stored as is (ROWS) and transposed (COLS; its padding columns get zeros).
    ``amax``: the largest past amax of the history (DELAYED) or the given one; RECORD:
    the tile's amax goes into the history's current entry (an atomic max); TIMES:
    ``dq = times / scale`` is stored too."""
    if DELAYED:
        amax = tl.max(tl.load(history_ptr + 1 + tl.arange(0, HISTORY)))
    else:
        amax = tl.load(amax_ptr)
    x, scale = _scaled_tile(x_ptr, x1_ptr, x2_ptr, g_ptr, amax, q_ptr, qt_ptr, m, n, n0, n1,
                            qt_cols, fmax, floor, SOURCES, INTERLEAVE, FOLD, ROWS, COLS, BLOCK)
    if RECORD:
        tl.atomic_max(history_ptr, tl.max(tl.max(tl.abs(x), 1), 0))
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(inv_scale_ptr, 1.0 / scale)
        if TIMES:
            tl.store(dq_ptr, tl.load(times_ptr) / scale)


@triton.jit
def _scaled_tile(x_ptr, x1_ptr, x2_ptr, g_ptr, amax, q_ptr, qt_ptr, m, n, n0, n1, qt_cols, fmax,
                 floor, SOURCES: tl.constexpr, INTERLEAVE: tl.constexpr, FOLD: tl.constexpr,
                 ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK: tl.constexpr):
    """``_cast_kernel``'s tile from the given ``amax``; returns the tile (fp32) and the scale."""
    scale = tl.where(amax > 0, fmax / tl.maximum(amax, floor), 1.0)
    x, rm, rn = stacked_tile(x_ptr, x1_ptr, x2_ptr, g_ptr, m, n, n0, n1, SOURCES, INTERLEAVE,
                             FOLD, BLOCK)
    y = tl.clamp(x * scale, -fmax, fmax)
    if ROWS:
        tl.store(q_ptr + rm[:, None] * n + rn[None, :], y.to(q_ptr.dtype.element_ty),
                 mask=(rm[:, None] < m) & (rn[None, :] < n))
    if COLS:
        tl.store(qt_ptr + rn[:, None] * qt_cols + rm[None, :],
                 tl.trans(y).to(qt_ptr.dtype.element_ty),
                 mask=(rn[:, None] < n) & (rm[None, :] < qt_cols))
    return x, scale


# The grouped weight casts' pointer table: per weight, its (up to three) stacked
# sources, its norm weight and its FP8 output, as int64 addresses.
_GROUP_POINTERS = tl.constexpr(5)
# Their scales 16 bytes apart: cuBLAS (``scaled_mm``) takes no less aligned a scale.
_SCALE_STRIDE = tl.constexpr(4)


@triton.jit
def _group_pointers(table_ptr):
    """This program's weight's pointers (``tl.program_id(2)``: its row of the table),
    declared 16-byte aligned as the allocator's are (``quantize_stacked_group``
    checks): without it, Triton cannot vectorize the loads and stores of
    pointers it did not specialize on, and the casts ran three times slower."""
    row = table_ptr + tl.program_id(2) * _GROUP_POINTERS
    bf16 = tl.pointer_type(tl.bfloat16)
    return (tl.multiple_of(tl.load(row).to(bf16, bitcast=True), 16),
            tl.multiple_of(tl.load(row + 1).to(bf16, bitcast=True), 16),
            tl.multiple_of(tl.load(row + 2).to(bf16, bitcast=True), 16),
            tl.multiple_of(tl.load(row + 3).to(bf16, bitcast=True), 16),
            tl.multiple_of(tl.load(row + 4).to(tl.pointer_type(tl.float8e4nv), bitcast=True), 16))


@Launched
@triton.jit
def _amax_group_kernel(table_ptr, amax_ptr, m, n, n0, n1, SOURCES: tl.constexpr,
                       INTERLEAVE: tl.constexpr, FOLD: tl.constexpr, BLOCK: tl.constexpr):
    """``_amax_kernel`` for a group of equally shaped weights, ``amax[program_id(2)]``."""
    x_ptr, x1_ptr, x2_ptr, g_ptr, _ = _group_pointers(table_ptr)
    x, _, _ = stacked_tile(x_ptr, x1_ptr, x2_ptr, g_ptr, m, n, n0, n1, SOURCES, INTERLEAVE,
                           FOLD, BLOCK)
    tl.atomic_max(amax_ptr + tl.program_id(2), tl.max(tl.max(tl.abs(x), 1), 0))


@Launched
@triton.jit
def _cast_group_kernel(table_ptr, amax_ptr, inv_scale_ptr, m, n, n0, n1, fmax, floor,
                       SOURCES: tl.constexpr, INTERLEAVE: tl.constexpr, FOLD: tl.constexpr,
                       BLOCK: tl.constexpr):
    """``_cast_kernel`` (rows only, tensorwise) for a group of equally shaped weights."""
    x_ptr, x1_ptr, x2_ptr, g_ptr, q_ptr = _group_pointers(table_ptr)
    weight = tl.program_id(2)
    _, scale = _scaled_tile(x_ptr, x1_ptr, x2_ptr, g_ptr, tl.load(amax_ptr + weight), q_ptr,
                            q_ptr, m, n, n0, n1, 0, fmax, floor, SOURCES, INTERLEAVE, FOLD, True,
                            False, BLOCK)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(inv_scale_ptr + weight * _SCALE_STRIDE, 1.0 / scale)


def quantize(x: torch.Tensor, kind: str, recipe: str = "tensorwise",
             history: torch.Tensor | None = None, rows: bool = True,
             cols: bool = False, times: torch.Tensor | None = None) -> Fp8Operand:
    """``x`` (M, K) in the FP8 format of ``kind`` (act, weight, grad; ``..fp8.FORMATS``),
    scaled as ``recipe`` says: ``tensorwise`` from an amax pass over ``x`` (recorded
    in ``history``, a row of an amax history, when given), ``delayed`` from
    ``history``'s past amaxes, recording the current one as it casts (no amax pass).
    ``times``: the other GEMM operand's ``1 / scale``, for ``dq``."""
    if recipe == "delayed" and history is None:
        raise ValueError(f"the delayed FP8 recipe needs an amax history for {kind} operands")
    if history is not None and history.dtype != torch.float32:
        raise ValueError(f"an FP8 amax history must be float32 (the cast's atomic max), got "
                         f"{history.dtype}: was the model cast with .to(dtype)?")
    return _cast([x.contiguous()], None, False, kind, recipe == "delayed", history, rows, cols,
                  times)


def quantize_stacked(weights: list[torch.Tensor], norm_weight: torch.Tensor | None,
                     interleave: bool, rows: bool = True, cols: bool = False) -> Fp8Operand:
    """``stack_rows(weights, interleave) [* norm_weight]`` (folded as
    ``fold_norm_weight`` folds) cast to e4m3, tensorwise, without writing the
    stacked bf16 weight: the amax pass and the cast read the sources."""
    check_stacked(weights, norm_weight, interleave)
    return _cast([w.contiguous() for w in weights],
                 None if norm_weight is None else norm_weight.contiguous(), interleave, "weight",
                 False, None, rows, cols, None)


def quantize_stacked_group(stacks: list[tuple[list[torch.Tensor], torch.Tensor | None]],
                           interleave: bool) -> list[Fp8Operand]:
    """``quantize_stacked(weights, norm_weight, interleave)`` (rows) of each
    ``(weights, norm_weight)`` of ``stacks``, all of one shape and folded or all
    not, in three launches for all of them (zeroed amaxes, the amax pass, the
    cast) and the copy of their address table: built together, the weights of
    every layer cost the host what one layer's did."""
    for weights, norm_weight in stacks:
        check_stacked(weights, norm_weight, interleave)
    layouts = {(tuple(tuple(w.shape) for w in weights), norm_weight is None)
               for weights, norm_weight in stacks}
    sources = [t for weights, norm_weight in stacks
               for t in [*weights, *([] if norm_weight is None else [norm_weight])]]
    if len(layouts) > 1 or not _group_readable(sources):
        raise ValueError(f"grouped FP8 weight cast of layouts {sorted(layouts, key=str)}: the "
                         f"weights of a group must be one layout, contiguous bfloat16, "
                         f"16-byte aligned")
    (shapes, unfolded), = layouts
    device, (m, n) = sources[0].device, (sum(s[0] for s in shapes), shapes[0][1])
    check_indexable(m, n)
    dtype = FORMATS["weight"]
    outputs = [torch.empty(m, n, dtype=dtype, device=device) for _ in stacks]
    table = torch.tensor(
        [[t.data_ptr() for t in (weights + weights[:1] * 2)[:3]]
         + [(weights[0] if norm_weight is None else norm_weight).data_ptr(), q.data_ptr()]
         for (weights, norm_weight), q in zip(stacks, outputs)], dtype=torch.int64)
    # From pinned memory, so the copy does not wait for the queued kernels.
    table = (table.pin_memory() if device.type == "cuda" else table).to(device, non_blocking=True)
    amax = torch.zeros(len(stacks), dtype=torch.float32, device=device)
    inv_scale = torch.empty(len(stacks), _SCALE_STRIDE.value, dtype=torch.float32, device=device)
    n0, n1 = stacked_rows(shapes)
    layout = _layout(len(shapes), interleave, not unfolded)
    grid = (triton.cdiv(m, CAST_BLOCK), triton.cdiv(n, CAST_BLOCK), len(stacks))
    _amax_group_kernel[grid](table, amax, m, n, n0, n1, **layout)
    _cast_group_kernel[grid](table, amax, inv_scale, m, n, n0, n1, torch.finfo(dtype).max,
                             AMAX_FLOOR, **layout)
    return [Fp8Operand(q, None, inv_scale[i, :1]) for i, q in enumerate(outputs)]


def _group_readable(sources: list[torch.Tensor]) -> bool:
    """Whether the group cast can read these tensors through bare addresses."""
    return all(t.dtype == torch.bfloat16 and t.is_contiguous() and t.data_ptr() % 16 == 0
               for t in sources)


def check_indexable(m: int, n: int, what: str = "FP8 cast",
                    remedy: str = "; for an activation or gradient, use fewer tokens per "
                                  "micro-batch") -> None:
    """``what``'s kernel indexes a (m, n) tensor (with 16 rows of padding) in int32."""
    if (m + 16) * n >= 2**31:
        raise ValueError(f"{what} of a {m} x {n} tensor: the kernel indexes in int32, so the "
                         f"tensor must have under 2**31 elements{remedy}")


def stacked_rows(shapes) -> tuple[int, int]:
    """``n0``, ``n1`` of the cast kernels: the rows of the first two stacked sources."""
    return tuple(([s[0] for s in shapes] + [0])[:2])


def _layout(sources: int, interleave: bool, fold: bool) -> dict:
    """The cast kernels' layout constants and launch width."""
    return dict(SOURCES=sources, INTERLEAVE=interleave, FOLD=fold, BLOCK=CAST_BLOCK, num_warps=8)


def check_stacked(weights: list[torch.Tensor], norm_weight: torch.Tensor | None,
                  interleave: bool, what: str = "stacked FP8 cast of") -> None:
    """That ``stack_rows(weights, interleave) [* norm_weight]`` is defined, for ``what``."""
    shapes = [tuple(w.shape) for w in weights]
    if not 1 <= len(weights) <= 3 or (interleave and len({s[0] for s in shapes}) > 1):
        raise ValueError(f"{what} weights {shapes}: it takes one to three, "
                         f"equal in rows when interleaved")
    n = shapes[0][-1]
    if (any(len(s) != 2 or s[1] != n for s in shapes) or len({w.dtype for w in weights}) > 1
            or (norm_weight is not None and tuple(norm_weight.shape) != (n,))):
        raise ValueError(f"{what} weights {shapes} "
                         f"({', '.join(str(w.dtype) for w in weights)}) with a norm weight of "
                         f"shape {None if norm_weight is None else tuple(norm_weight.shape)}: "
                         f"the weights must be 2-D with the same columns and dtype, the norm "
                         f"weight one entry per column")


def _cast(sources: list[torch.Tensor], norm_weight: torch.Tensor | None, interleave: bool,
          kind: str, delayed: bool, history: torch.Tensor | None, rows: bool, cols: bool,
          times: torch.Tensor | None) -> Fp8Operand:
    dtype, device = FORMATS[kind], sources[0].device
    m, n = sum(s.shape[0] for s in sources), sources[0].shape[1]
    check_indexable(m, n)
    # cuBLAS FP8 wants K (for ``cols``: the wgrads' tokens) a multiple of 16; the
    # zero columns of the padding add nothing to the sums.
    padded = m + -m % 16
    q = torch.empty(m, n, dtype=dtype, device=device) if rows else None
    qt = torch.empty(n, padded, dtype=dtype, device=device) if cols else None
    inv_scale = torch.empty(1, dtype=torch.float32, device=device)
    dq = None if times is None else torch.empty(1, dtype=torch.float32, device=device)
    unused = inv_scale  # a pointer for the arguments a variant does not read
    x, x1, x2 = (sources + [unused] * 2)[:3]
    layout = _layout(len(sources), interleave, norm_weight is not None)
    stacked = (x, x1, x2, unused if norm_weight is None else norm_weight)
    n0, n1 = stacked_rows([s.shape for s in sources])
    amax = None
    if not delayed:
        amax = torch.zeros(1, dtype=torch.float32, device=device)
        _amax_kernel[(triton.cdiv(m, CAST_BLOCK), triton.cdiv(n, CAST_BLOCK))](
            *stacked, amax, m, n, n0, n1, **layout)
    grid = (triton.cdiv(padded if cols else m, CAST_BLOCK), triton.cdiv(n, CAST_BLOCK))
    _cast_kernel[grid](*stacked, unused if amax is None else amax,
                       unused if history is None else history,
                       unused if q is None else q, unused if qt is None else qt, inv_scale,
                       unused if times is None else times, unused if dq is None else dq,
                       m, n, n0, n1, padded, torch.finfo(dtype).max, AMAX_FLOOR,
                       ROWS=rows, COLS=cols, DELAYED=delayed, RECORD=history is not None,
                       TIMES=times is not None, HISTORY=HISTORY, **layout)
    return Fp8Operand(q, qt, inv_scale, dq)


def row(history: torch.Tensor | None, index: int) -> torch.Tensor | None:
    """Row ``index`` of a block's amax history (taken inside the op that writes it,
    so it is the block's own memory), or None without one."""
    return None if history is None else history[index]


@Launched
@triton.jit
def _transpose_kernel(x_ptr, y_ptr, m, n, BLOCK: tl.constexpr):
    """One BLOCK x BLOCK tile of the bytes of ``x`` (m, n) stored transposed in ``y`` (n, m)."""
    rm = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.load(x_ptr + rm[:, None] * n + rn[None, :], mask=(rm[:, None] < m) & (rn[None, :] < n))
    tl.store(y_ptr + rn[:, None] * m + rm[None, :], tl.trans(tile),
             mask=(rn[:, None] < n) & (rm[None, :] < m))


def transposed(q: torch.Tensor) -> torch.Tensor:
    """``q.T`` contiguous, for an FP8 (or any 1-byte) ``q``: exact, no rescaling."""
    m, n = q.shape
    out = torch.empty(n, m, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(m, CAST_BLOCK), triton.cdiv(n, CAST_BLOCK))
    _transpose_kernel[grid](q.view(torch.uint8), out.view(torch.uint8), m, n, BLOCK=CAST_BLOCK,
                            num_warps=8)
    return out


def weight(weights: list[torch.Tensor], norm_weight: torch.Tensor | None, interleave: bool,
           keep: bool = False, last: bool = False) -> Fp8Operand:
    """``stack_rows(weights) [* g]`` cast to e4m3: ``rows`` for the forward, or
    for the dgrad (``last``) ``cols``. ``keep``/``last`` as in ``gemm.folded_weight``.
    Only the forward's orientation is kept (the weights' memory halves: 8B under
    full AC keeps every layer's from its forward to its dgrad); the dgrad
    transposes it, a weight-sized FP8 copy, where it finds it kept, else casts
    its own from the bf16 weights."""
    def build(rows=True):
        return quantize_stacked(weights, norm_weight, interleave, rows=rows, cols=not rows)

    tag, sources = _weight_key(weights, norm_weight, interleave)
    if not last:
        return prepared(tag, sources, build, keep)
    w = taken(tag, sources, lambda: build(rows=False))
    return w if w.cols is not None else Fp8Operand(None, transposed(w.rows), w.inv_scale)


def _weight_key(weights: list[torch.Tensor], norm_weight: torch.Tensor | None,
                interleave: bool) -> tuple[str, list[torch.Tensor]]:
    """The prepared-weight tag and sources of ``weight``'s FP8 weight (the bf16
    fold's tag differs)."""
    tag = f"fp8:{interleave}:{norm_weight is not None}"
    return tag, weights if norm_weight is None else [*weights, norm_weight]


def prepare_weights(stacks: list[tuple[list[torch.Tensor], torch.Tensor | None, bool]]) -> None:
    """Prepare (``keep``) the FP8 forward weights ``weight`` will be asked for, of
    each ``(weights, norm_weight, interleave)`` of ``stacks`` not held already,
    cast in groups of one layout (``quantize_stacked_group``): a model's layers
    all at once, at each forward that finds them not held (the first after an
    optimizer step; under gradient accumulation every micro-batch's, as the
    dgrads release them), where the host would otherwise spend four weight
    builds' launches in every block's forward. A stack the group cast cannot
    read (not contiguous bfloat16 at 16-byte aligned addresses) is left to its
    op, which casts it as it always could."""
    groups = {}  # by layout: the tag (which holds interleave and fold) and the shapes
    for weights, norm_weight, interleave in stacks:
        tag, sources = _weight_key(weights, norm_weight, interleave)
        if _group_readable(sources) and held(tag, sources) is None:
            layout = (tag, interleave, tuple(tuple(w.shape) for w in weights))
            groups.setdefault(layout, []).append((weights, norm_weight, sources))
    for (tag, interleave, _), group in groups.items():
        built = quantize_stacked_group([(w, g) for w, g, _ in group], interleave)
        for (_, _, sources), w in zip(group, built):
            hold(tag, sources, w)


def wgrad(grad: Fp8Operand, x: torch.Tensor, recipe: str,
          history: torch.Tensor | None) -> torch.Tensor:
    """``dW = dy.T @ x`` from the gradient's transposed cast (``grad.cols``) and
    the activation ``x`` (M, K), cast here to its transposed e4m3 copy (with the
    ``recipe`` and the ``history`` row ``x`` had in the forward)."""
    a = quantize(x, "act", recipe, history, rows=False, cols=True)
    return scaled_mm(grad.cols, grad.inv_scale, a.cols, a.inv_scale, x.dtype)


def scaled_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b.T`` for FP8 ``a`` (M, K) and ``b`` (N, K), both K-major, with their
    ``1 / scale``: cuBLAS with accurate accumulation (the wgrads, and the one
    dgrad without an epilogue, wo's)."""
    return torch._scaled_mm(a, b.t(), scale_a=a_inv.reshape(()), scale_b=b_inv.reshape(()),
                            out_dtype=out_dtype, use_fast_accum=False)
