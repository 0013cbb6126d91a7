"""attention_norm + wq/wk/wv + RoPE on quack's SM90 GEMM (math: ``..rmsnorm_qkv_rope``).

forward
  ``r`` from one row reduction over ``x`` (no producer GEMM precedes the block
  input), then one GEMM ``x @ [Wq; Wk; Wv]'.T`` (norm weight folded) whose
  epilogue, quack's ``rstd_rope_posfreq_epi``, scales by ``r`` and rotates each
  (even, odd) column pair by ``position * inv_freq``; V columns carry frequency
  0, an exact identity. ``inv_freq`` is read back from TorchTitan's float32
  table (its llama3 scaling included); quack forms the angle in float-float
  turns and range-reduces it exactly, so it is at least as accurate as
  TorchTitan's float32 ``t * freq``.
backward
  ``dzr = r * [R^T dq, R^T dk, dv]`` and ``sum(dz * z) = sum(dqkv * qkv)`` in
  one CuTe DSL row pass (no GEMM is adjacent: the dgrad and wgrad GEMMs both
  read ``dzr`` as an operand), its cos and sin read from a table of the
  forward's angles, then
  ``dx`` from the dgrad GEMM with the RMSNorm backward in its epilogue, and the
  plain wgrad ``dW' = dzr.T @ x``.
Under the FP8 recipe (``fp8``) the GEMMs take FP8 operands (``.fp8_operands``):
the forward's dequantization folds into ``r``, the dgrad's into its epilogue,
the wgrad runs in cuBLAS.
"""

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, Int32
from quack import copy_utils
from quack.cache import jit_cache
from quack.cute_dsl_utils import torch2cute_dtype_map
from quack.epilogue.rotary import make_interleaved_inv_freq, rstd_rope_posfreq_epi
from quack.reduce import row_reduce
from torch.utils.weak import WeakTensorKeyDictionary
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list

from ..fallback import fallback_recipe, report_fallback, unsupported_reason
from ..fp8 import history_index
from ..kernel_op import kernel_op
from ..rmsnorm_qkv_rope import rmsnorm_qkv_rope as reference
from . import fp8_operands
from .gemm import TILES, aligned, folded_weight
from .rmsnorm_linear_grad import rmsnorm_linear_grad, rmsnorm_linear_grads_fp8
from .row_kernels import RowKernel, compile_row_kernel, load_row, row_major, rstd_rows, vector
from .unfold_grads import unfold_grads

CFG = TILES["qkv_rope"]
X_ROW, DZR_ROW = (history_index("rmsnorm_qkv_rope", row) for row in ("x", "dzr"))


def rmsnorm_qkv_rope_gemm(
    x: torch.Tensor, rstd: torch.Tensor, folded_weight: torch.Tensor, positions: torch.Tensor,
    freq: torch.Tensor,
) -> torch.Tensor:
    """RoPE(r * (x @ W'.T)) in bf16: bf16 operands, or FP8 ones with their
    dequantization folded into ``rstd``."""
    x, rstd, folded_weight, positions, freq = aligned(x, rstd, folded_weight, positions, freq)
    qkv = torch.empty(x.shape[0], folded_weight.shape[0], dtype=torch.bfloat16, device=x.device)
    rstd_rope_posfreq_epi.gemm(x, folded_weight, qkv, None,
                               post_init_attrs=fp8_operands.accumulation(x),
                               epi_args=dict(pos=positions, freq=freq, rstd=rstd), **CFG)
    return qkv


# Per RoPE table tensor (weakly held: an entry dies with its tensor).
_freq_tables = WeakTensorKeyDictionary()


def _per_table(freqs_cis: torch.Tensor, key: tuple, build):
    """``build()``, cached per RoPE table (a model buffer) and ``key``: tables
    derived from it take ~10 small launches."""
    key = (freqs_cis._version, *key)
    cached = None if torch.compiler.is_compiling() else _freq_tables.get(freqs_cis)
    if cached is not None and key in cached:
        return cached[key]
    table = build()
    if not torch.compiler.is_compiling():
        _freq_tables.setdefault(freqs_cis, {})[key] = table
    return table


def rope_freq_table(freqs_cis: torch.Tensor, nq: int, nk: int, nv: int) -> torch.Tensor:
    """The (nq + nk + nv,) float-float inverse-frequency row the forward epilogue
    reads: TorchTitan's (scaled) frequencies, repeated per q/k head, 0 on v columns."""
    def build():
        inv_freq = freqs_cis[1].angle().double()
        return make_interleaved_inv_freq(inv_freq, nq + nk, nv, 2 * freqs_cis.shape[-1])

    return _per_table(freqs_cis, ("freq", nq, nk, nv), build)


def rope_backward_tables(freqs_cis: torch.Tensor, nq: int, nk: int, nv: int):
    """``(cos, sin, pair)`` for the backward row pass: the cos and sin of every
    position's angles (positions, hd/2), from the forward epilogue's frequencies
    in float64 (so the backward inverts the forward's rotation, whose angles are
    exact, at any position TorchTitan's table has), with a column of angle 0
    appended, flattened; and for each column pair of ``[q | k | v]`` its column
    in that table (the appended one for v: cos 1, sin 0, an exact identity)."""
    def build():
        positions, half = freqs_cis.shape
        inv_freq = freqs_cis[1].angle().double()
        angle = torch.arange(positions, device=freqs_cis.device, dtype=torch.float64)[:, None]
        angle = torch.nn.functional.pad(angle * inv_freq, (0, 1))
        pairs = torch.arange((nq + nk + nv) // 2, device=freqs_cis.device)
        pair = torch.where(pairs < (nq + nk) // 2, pairs % half, half).int()
        return angle.cos().float().reshape(-1), angle.sin().float().reshape(-1), pair

    return _per_table(freqs_cis, ("backward", nq, nk, nv), build)


class RopeBackwardZdZ(RowKernel):
    """The RoPE backward of one row of ``n`` columns, with its ZdZ reduction::

        out = r * [R^T dq, R^T dk, dv]     (bf16)
        zdz = sum(dqkv * qkv)              (fp32; = sum(dz * z), R is orthogonal)

    ``R^T`` rotates each (even, odd) pair by minus the forward's angle, its cos
    and sin read from the flattened table (``width`` columns per position) at
    the pair's column (``rope_backward_tables``).
    """

    def __init__(self, dtype, n: int, width: int):
        super().__init__(dtype, n)
        self.width = width

    @cute.jit
    def __call__(self, mD, mZ, mCos, mSin, mPair, mPos, mRstd, mO, mZdZ,
                 stream: cuda.CUstream):
        self.launch(mD.shape[0], stream, mD, mZ, mCos, mSin, mPair, mPos, mRstd, mO, mZdZ)

    @cute.kernel
    def kernel(self, mD, mZ, mCos, mSin, mPair, mPos, mRstd, mO, mZdZ, tiler_mn: cute.Shape,
               tiled_copy: cute.TiledCopy, threads_per_row: cutlass.Constexpr[int]):
        buffer, mbar, (tXgD, tXgZ, tXgO), tXcX, row = self.setup(
            tiled_copy, tiler_mn, (mD, mZ, mO), mD.shape)
        in_rows = row < mD.shape[0]
        d = load_row(tXgD, row, mD.shape[0])
        zdz = row_reduce(d * load_row(tXgZ, row, mD.shape[0]), cute.ReductionOp.ADD, threads_per_row,
                         buffer, mbar, init_val=0.0)
        pos = Int32(0)
        rstd = Float32(0.0)
        if in_rows:
            pos = Int32(mPos[row])
            rstd = mRstd[row]
        base = pos * self.width
        dz = cute.make_rmem_tensor(tXgD.shape, Float32)
        dz.store(d)
        for i in cutlass.range_constexpr(cute.size(dz) // 2):
            at = base + mPair[tXcX[2 * i][1] // 2]
            cos, sin = mCos[at], mSin[at]
            a, b = dz[2 * i], dz[2 * i + 1]
            dz[2 * i] = (a * cos + b * sin) * rstd
            dz[2 * i + 1] = (b * cos - a * sin) * rstd
        tXrO = cute.make_rmem_tensor_like(tXgO)
        tXrO.store(dz.load().to(tXrO.element_type))
        if in_rows:
            copy_utils.copy(tXrO, tXgO)
            if tXcX[0][1] == 0:
                mZdZ[row] = zdz


@jit_cache
def _compile_rope_backward_zdz(dtype, n, width):
    m, cells = cute.sym_int(), cute.sym_int()
    rows = row_major(dtype, m, n)
    return compile_row_kernel(RopeBackwardZdZ(dtype, n, width), rows, rows, vector(cells),
                              vector(cells), vector(n // 2, Int32), vector(m), vector(m),
                              rows, vector(m))


@kernel_op("coda::rope_backward_zdz")
def rope_backward_zdz(
    dqkv: torch.Tensor, qkv: torch.Tensor, freqs_cis: torch.Tensor, positions: torch.Tensor,
    rstd: torch.Tensor, nq: int, nk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r * [R^T dq, R^T dk, dv], sum(dz * z) = sum(dqkv * qkv))`` in one pass."""
    cos, sin, pair = rope_backward_tables(freqs_cis, nq, nk, qkv.shape[1] - nq - nk)
    dqkv, qkv, cos, sin, pair, pos, rstd = aligned(dqkv.contiguous(), qkv, cos, sin, pair,
                                                   positions.float(), rstd)
    dzr, zdz = torch.empty_like(qkv), torch.empty_like(rstd)
    kernel = _compile_rope_backward_zdz(torch2cute_dtype_map[qkv.dtype], qkv.shape[1],
                                        freqs_cis.shape[-1] + 1)
    kernel(dqkv, qkv, cos, sin, pair, pos, rstd, dzr, zdz)
    return dzr, zdz


@rope_backward_zdz.register_fake
def _(dqkv, qkv, freqs_cis, positions, rstd, nq, nk):
    return torch.empty_like(qkv), rstd.new_empty(rstd.shape)


@kernel_op("coda::rmsnorm_qkv_rope")
def rmsnorm_qkv_rope_op(
    x: torch.Tensor, norm_weight: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
    wv: torch.Tensor, freqs_cis: torch.Tensor, positions: torch.Tensor, eps: float, keep: bool,
    fp8: str | None, history: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(qkv, r): post-RoPE ``[q | k | v]`` (M, Nq + Nk + Nv) and the row rstd, for the
    (M,) token ``positions``, best given as float32 (exact below 2**24; the
    kernels read them so).

    One custom op with its backward registered (not an autograd.Function), so
    that under torch.compile activation checkpointing can recompute it.
    ``keep``: the folded weight (FP8 under ``fp8``) stays prepared for the
    recompute and the dgrad. ``history``: the block's amax history (``x``'s and
    ``dzr``'s rows; writes not declared, as in ``.linear_residual_sumsq``)."""
    freq = rope_freq_table(freqs_cis, wq.shape[0], wk.shape[0], wv.shape[0])
    weights, positions = [wq, wk, wv], positions.float()  # no launch when float32 already
    if fp8 is None:
        rstd, _ = rstd_rows(x, eps)
        folded = folded_weight(weights, norm_weight, False, keep)
        return rmsnorm_qkv_rope_gemm(x, rstd, folded, positions, freq), rstd
    w = fp8_operands.weight(weights, norm_weight, False, keep)
    a = fp8_operands.quantize(x, "act", fp8, fp8_operands.row(history, X_ROW), times=w.inv_scale)
    rstd, rstd_dq = rstd_rows(x, eps, scale=a.dq)
    return rmsnorm_qkv_rope_gemm(a.rows, rstd_dq, w.rows, positions, freq), rstd


@rmsnorm_qkv_rope_op.register_fake
def _(x, norm_weight, wq, wk, wv, freqs_cis, positions, eps, keep, fp8, history):
    n = wq.shape[0] + wk.shape[0] + wv.shape[0]
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, norm_weight, wq, wk, wv, freqs_cis, positions, _, _, fp8, history = inputs
    qkv, rstd = output
    ctx.save_for_backward(x, rstd, norm_weight, wq, wk, wv, freqs_cis, positions, qkv, history)
    ctx.mark_non_differentiable(rstd)
    ctx.fp8 = fp8


def _backward(ctx, dqkv, _drstd):
    x, rstd, norm_weight, wq, wk, wv, freqs_cis, positions, qkv, history = ctx.saved_tensors
    nq, nk = wq.shape[0], wk.shape[0]
    dzr, zdz = rope_backward_zdz(dqkv, qkv, freqs_cis, positions, rstd, nq, nk)
    weights, zdz_r2 = [wq, wk, wv], rstd.square() * zdz
    if ctx.fp8 is None:
        dx = rmsnorm_linear_grad(dzr, weights, norm_weight, False, x, zdz_r2, None)
        dwq, dwk, dwv, dnorm = unfold_grads(dzr.t() @ x, weights, norm_weight, False)
    else:
        dx, dwq, dwk, dwv, dnorm = rmsnorm_linear_grads_fp8(
            dzr, weights, norm_weight, False, x, zdz_r2, None, ctx.fp8, history, DZR_ROW, X_ROW)
    return dx, dnorm, dwq, dwk, dwv, None, None, None, None, None, None


rmsnorm_qkv_rope_op.register_autograd(_backward, setup_context=_setup_context)

# TorchTitan's selective op AC saves the outputs of the ops in this set (its
# mm and attention ops): the packed QKV are saved the same way, not recomputed with
# their GEMM.
_op_sac_save_list.add(torch.ops.coda.rmsnorm_qkv_rope.default)


def rmsnorm_qkv_rope(x, norm_weight, wq, wk, wv, freqs_cis, positions, eps, *, strict=False,
                     keep_weights=False, fp8=None, history=None):
    reason = unsupported_reason(x, weights=(wq, wk, wv), fp8=fp8)
    if reason is not None:
        report_fallback("rmsnorm_qkv_rope", reason, strict)
        fp8, history = fallback_recipe(fp8)
        return reference(x, norm_weight, wq, wk, wv, freqs_cis, positions, eps, fp8=fp8,
                         history=history)
    # As float32 here, where under torch.compile Inductor fuses the conversion
    # into the kernel making the positions, not in the op (a launch there).
    qkv, _ = rmsnorm_qkv_rope_op(x, norm_weight, wq, wk, wv, freqs_cis, positions.float(), eps,
                                 keep_weights, fp8, history)
    return qkv
