"""Small CuTe DSL kernels over whole rows, where no GEMM is adjacent.

``RowKernel`` is their common frame (quack's ``ReductionBase``): each row of
``n`` bf16 columns is read once with 16-byte vectors by a group of threads
(at least 6 vectors each), and per-row sums are warp/CTA reductions.
``rstd_rows`` is the deferred RMSNorm's statistic where no producer GEMM
reduced it: the block input of norm+QKV (with its FP8-scaled copy) and, as the
``row_rstd`` custom op, each chunk of the LM head.
"""

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32
from quack import copy_utils
from quack.cache import jit_cache
from quack.compile_utils import make_fake_tensor
from quack.cute_dsl_utils import torch2cute_dtype_map
from quack.reduce import row_reduce
from quack.reduction_base import ReductionBase

from ..kernel_op import kernel_op
from .gemm import aligned

VECTOR = 8  # bf16 elements per 16-byte load


class RowKernel(ReductionBase):
    def __init__(self, dtype, n: int):
        super().__init__(dtype, n, stage=1)
        vectors = n // VECTOR
        self.threads = next(t for t in (128, 64, 32, 16, 8, 4, 2, 1)
                            if vectors % t == 0 and vectors // t >= min(6, vectors))

    def _threads_per_row(self):
        return self.threads

    def launch(self, m, stream, *args):
        """Launch ``self.kernel(*args, tiler_mn, tiled_copy, threads_per_row)`` over m rows."""
        self._set_cluster_n()
        tiled_copy, tiler_mn, threads_per_row = self._get_tiled_copy(vecsize=VECTOR)
        self.kernel(*args, tiler_mn, tiled_copy, threads_per_row).launch(
            grid=[cute.ceil_div(m, tiler_mn[0]), 1, 1], block=[tiled_copy.size, 1, 1],
            stream=stream)

    def setup(self, tiled_copy, tiler_mn, row_tensors, shape):
        """The smem reduction buffer and barrier, this thread's partitions of
        ``row_tensors`` and of the coordinates, and the row it works on."""
        smem = cutlass.utils.SmemAllocator()
        buffer, mbar = self._allocate_reduction_buffer_and_mbar(smem, tiled_copy.layout_tv_tiled)
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        thr = tiled_copy.get_slice(tidx)
        parts = [thr.partition_S(cute.local_tile(t, tiler_mn, (bidx, 0)))
                 for t in (*row_tensors, cute.make_identity_tensor(shape))]
        return buffer[None, None, 0], mbar, parts[:-1], parts[-1], parts[-1][0][0]


@cute.jit
def load_row(tXg: cute.Tensor, row, m):
    """This thread's part of its row in fp32 (zeros past the last row)."""
    tXr = cute.make_rmem_tensor_like(tXg)
    tXr.fill(0)
    if row < m:
        copy_utils.copy(tXg, tXr)
    return tXr.load().to(Float32)


def row_major(dtype, m, n):
    return make_fake_tensor(dtype, (m, n), VECTOR)


def vector(size, dtype=Float32):
    return make_fake_tensor(dtype, (size,))


def compile_row_kernel(kernel, *fake_args):
    return cute.compile(kernel, *fake_args, cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
                        options="--enable-tvm-ffi")


class RowRstd(RowKernel):
    """``rstd = 1 / sqrt(mean(x**2) + eps)`` per row, fp32; ``scaled``: also
    ``rstd * scale[0]`` (a GEMM's FP8 dequantization folded in), one launch less."""

    def __init__(self, dtype, n: int, scaled: bool):
        super().__init__(dtype, n)
        self.scaled = scaled

    @cute.jit
    def __call__(self, mX, mRstd, mScale, mScaled, eps: Float32, stream: cuda.CUstream):
        self.launch(mX.shape[0], stream, mX, mRstd, mScale, mScaled, eps)

    @cute.kernel
    def kernel(self, mX, mRstd, mScale, mScaled, eps: Float32, tiler_mn: cute.Shape,
               tiled_copy: cute.TiledCopy, threads_per_row: cutlass.Constexpr[int]):
        buffer, mbar, (tXgX,), tXcX, row = self.setup(tiled_copy, tiler_mn, (mX,), mX.shape)
        x = load_row(tXgX, row, mX.shape[0])
        sumsq = row_reduce(x * x, cute.ReductionOp.ADD, threads_per_row, buffer, mbar, init_val=0.0)
        if row < mX.shape[0] and tXcX[0][1] == 0:
            rstd = cute.math.rsqrt(sumsq * (1.0 / self.N) + eps, fastmath=True)
            mRstd[row] = rstd
            if cutlass.const_expr(self.scaled):
                mScaled[row] = rstd * mScale[0]


@jit_cache
def _compile_row_rstd(dtype, n, scaled):
    m = cute.sym_int()
    return compile_row_kernel(RowRstd(dtype, n, scaled), row_major(dtype, m, n), vector(m),
                              vector(1) if scaled else None, vector(m) if scaled else None,
                              Float32(0))


def rstd_rows(x: torch.Tensor, eps: float,
              scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rstd, rstd * scale)`` of a (M, D) bf16 x in one pass (``scale``: 1 element,
    fp32; without it the second is None). A plain function for the custom ops to
    call (a nested custom op costs the host a second dispatch)."""
    (x,) = aligned(x)
    rstd = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    scaled = None if scale is None else torch.empty_like(rstd)
    _compile_row_rstd(torch2cute_dtype_map[x.dtype], x.shape[1], scale is not None)(
        x, rstd, scale, scaled, eps)
    return rstd, scaled


@kernel_op("coda::row_rstd")
def row_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``rstd_from_sumsq(row_sumsq(x), D, eps)`` of a (M, D) bf16 x in one pass."""
    return rstd_rows(x, eps)[0]


@row_rstd.register_fake
def _(x, eps):
    return x.new_empty(x.shape[0], dtype=torch.float32)
