"""Measure candidate tile configs for each CODA GEMM epilogue against cuBLAS.

Offline, on the GPU, to choose the fixed configs in
coda_titan/kernels/cutedsl/gemm.py (the training path never autotunes).
Prints, per GEMM and shape, the median ms of each config and of the bare
cuBLAS GEMM of the same shape (torch.matmul), best config first.

  python scripts/tune_tiles.py [--sizes 1B 8B]
"""

import argparse
import itertools

import torch
from triton.testing import do_bench

from coda_titan.kernels.cutedsl.gemm import cdiv
from coda_titan.kernels.cutedsl.linear_residual_sumsq import residual_sumsq_epi
from coda_titan.kernels.cutedsl.rmsnorm_linear_grad import rmsnorm_grad_epi
from coda_titan.kernels.cutedsl.rmsnorm_swiglu_mlp import dswiglu_zdz_epi, rstd_swiglu_epi

SIZES = {"1B": (2048, 8192), "8B": (4096, 14336)}
M = 16384
CANDIDATES = [
    dict(tile_M=tm, tile_N=tn, cluster_M=cm, cluster_N=cn, pingpong=pp)
    for (tm, tn, pp), (cm, cn) in itertools.product(
        [(128, 256, False), (128, 192, True), (128, 128, True), (256, 128, False), (128, 128, False)],
        [(2, 1), (1, 2), (1, 1)],
    )
]


def bf(*shape):
    return torch.randn(*shape, device="cuda").to(torch.bfloat16)


def cases(d, f):
    """name -> (cuBLAS equivalent, launcher(config))."""
    h, x, o, wo = bf(M, d), bf(M, d), bf(M, d), bf(d, d)
    w13, w2, a, gu, dout = bf(2 * f, d), bf(d, f), bf(M, f), bf(M, 2 * f), bf(M, d)
    rstd = torch.rand(M, device="cuda")

    def residual(w, inp):
        def launch(cfg):
            part = torch.empty(M, cdiv(w.shape[0], cfg["tile_N"]), device="cuda")
            residual_sumsq_epi.gemm(inp, w, torch.empty_like(x), x, epi_args=dict(sumsq=part), **cfg)
        return launch

    def swiglu(cfg):
        rstd_swiglu_epi.gemm(h, w13, torch.empty_like(gu), None,
                                epi_args=dict(rstd=rstd, act=torch.empty_like(a)), **cfg)

    def dswiglu(cfg):
        part = torch.empty(M, cdiv(f, cfg["tile_N"]), device="cuda")
        dswiglu_zdz_epi.gemm(dout, w2.mT, torch.empty_like(gu), gu,
                                epi_args=dict(rstd=rstd, act=torch.empty_like(a), zdz=part), **cfg)

    def rmsgrad(cfg):
        rmsnorm_grad_epi.gemm(gu, w13.mT, torch.empty_like(x), dout,
                                 epi_args=dict(x=h, corr=rstd), **cfg)

    return {
        "residual_wo": (lambda: o @ wo.t(), residual(wo, o)),
        "residual_w2": (lambda: a @ w2.t(), residual(w2, a)),
        "swiglu": (lambda: h @ w13.t(), swiglu),
        "dswiglu": (lambda: dout @ w2, dswiglu),
        "rmsnorm_grad": (lambda: gu @ w13, rmsgrad),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    args = parser.parse_args()
    for size in args.sizes:
        for name, (cublas, launch) in cases(*SIZES[size]).items():
            base = do_bench(cublas, return_mode="median")
            results = []
            for cfg in CANDIDATES:
                try:
                    results.append((do_bench(lambda: launch(cfg), return_mode="median"), cfg))
                except Exception as e:  # invalid tile combination for this epilogue
                    results.append((float("inf"), {**cfg, "error": str(e)[:80]}))
            results.sort(key=lambda r: r[0])
            print(f"{size} {name}: cuBLAS {base:.3f} ms")
            for ms, cfg in results[:4]:
                print(f"   {ms:.3f} ms ({ms / base:.3f}x) {cfg}")


if __name__ == "__main__":
    main()
