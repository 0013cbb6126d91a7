"""Measure candidate tile configs for each CODA GEMM epilogue against cuBLAS.

Offline, on the GPU, to choose the fixed configs in
coda_titan/kernels/cutedsl/gemm.py (the training path never autotunes).
Prints, per GEMM and shape, the median ms of each config and of the bare
cuBLAS GEMM of the same shape (torch.matmul), best config first.

  python scripts/tune_tiles.py [--sizes 1B 8B] [--gemms logits ...] [--chunk 4096] [--tokens 16384]
"""

import argparse
import itertools

import torch
from bench_ops import M, SIZES, median_ms
from bench_ops import randn as bf

from coda_titan.kernels.cutedsl.gemm import tile_partials
from coda_titan.kernels.cutedsl.linear_residual_sumsq import residual_sumsq_epi
from coda_titan.kernels.cutedsl.rmsnorm_linear_cross_entropy import (
    dgrad_zdz_epi, identity_epi, rstd_logits_lse_epi)
from quack.epilogue.rotary import make_interleaved_inv_freq, rstd_rope_posfreq_epi
from coda_titan.kernels.cutedsl.rmsnorm_linear_grad import rmsnorm_grad_residual_epi
from coda_titan.kernels.cutedsl.rmsnorm_swiglu_mlp import dswiglu_drstd_epi, rstd_swiglu_epi

CANDIDATES = [
    dict(tile_M=tm, tile_N=tn, cluster_M=cm, cluster_N=cn, pingpong=pp)
    for (tm, tn, pp), (cm, cn) in itertools.product(
        [(128, 256, False), (128, 192, True), (128, 128, True), (256, 128, False), (128, 128, False)],
        [(2, 1), (1, 2), (1, 1)],
    )
]


def cases(size, chunk, m):
    """name -> (cuBLAS equivalent, launcher(config))."""
    d, f, vocab = size["d"], size["f"], size["v"]
    h, x, o, wo = bf(m, d), bf(m, d), bf(m, d), bf(d, d)
    w13, w2, a, gu, dout = bf(2 * f, d), bf(d, f), bf(m, f), bf(m, 2 * f), bf(m, d)
    rstd = torch.rand(m, device="cuda")

    def residual(w, inp):
        def launch(cfg):
            part = tile_partials(m, w.shape[0], cfg, "cuda")
            residual_sumsq_epi.gemm(inp, w, torch.empty_like(x), x, epi_args=dict(sumsq=part), **cfg)
        return launch

    def swiglu(cfg):
        rstd_swiglu_epi.gemm(h, w13, torch.empty_like(gu), None,
                                epi_args=dict(rstd=rstd, act=torch.empty_like(a)), **cfg)

    def dswiglu(cfg):
        part = tile_partials(m, f, cfg, "cuda")
        dswiglu_drstd_epi.gemm(dout, w2.mT, torch.empty_like(gu), gu,
                               epi_args=dict(rstd=rstd, act=torch.empty_like(a), drstd=part), **cfg)

    def rmsgrad(cfg):
        rmsnorm_grad_residual_epi.gemm(gu, w13.mT, torch.empty_like(x), dout,
                                       epi_args=dict(x=h, corr=rstd), **cfg)

    wqkv, pos = bf(d + d // 2, d), torch.arange(m, device="cuda").float()
    freq = make_interleaved_inv_freq(torch.rand(64, device="cuda").double(), d + d // 4, d // 4, 128)

    def qkv_rope(cfg):
        rstd_rope_posfreq_epi.gemm(
            h, wqkv, torch.empty(m, wqkv.shape[0], device="cuda", dtype=torch.bfloat16), None,
            epi_args=dict(pos=pos, freq=freq, rstd=rstd), **cfg)

    hc, wout, logits = bf(chunk, d), bf(vocab, d), bf(chunk, vocab)
    rc, tgt = rstd[:chunk], torch.randint(0, vocab, (chunk,), device="cuda")
    dw = torch.zeros(vocab, d, device="cuda")

    def lse(cfg):
        rstd_logits_lse_epi.gemm(hc, wout, torch.empty_like(logits), None, epi_args=dict(
            rstd=rc, lse=tile_partials(chunk, vocab, cfg, "cuda"),
            target=tgt, target_logit=torch.zeros(chunk, device="cuda")), **cfg)

    def lm_dgrad(cfg):
        dgrad_zdz_epi.gemm(logits, wout.mT, torch.empty_like(hc), None, epi_args=dict(
            x=hc, zdz=tile_partials(chunk, d, cfg, "cuda")), **cfg)

    def lm_wgrad(cfg):
        identity_epi.gemm(logits.mT, hc.mT, dw, None, epi_args={}, add_to_output=True, **cfg)

    return {
        "qkv_rope": (lambda: h @ wqkv.t(), qkv_rope),
        "logits": (lambda: hc @ wout.t(), lse),
        "lm_head_dgrad": (lambda: logits @ wout, lm_dgrad),
        "lm_head_wgrad": (lambda: logits.t() @ hc, lm_wgrad),
        "residual_wo": (lambda: o @ wo.t(), residual(wo, o)),
        "residual_w2": (lambda: a @ w2.t(), residual(w2, a)),
        "swiglu": (lambda: h @ w13.t(), swiglu),
        "dswiglu": (lambda: dout @ w2, dswiglu),
        "rmsnorm_grad": (lambda: gu @ w13, rmsgrad),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--gemms", nargs="*", help="only these GEMMs")
    parser.add_argument("--chunk", type=int, default=4096, help="LM head tokens per chunk")
    parser.add_argument("--tokens", type=int, default=M, help="M of the per-block GEMMs")
    args = parser.parse_args()
    for size in args.sizes:
        for name, (cublas, launch) in cases(SIZES[size], args.chunk, args.tokens).items():
            if args.gemms and name not in args.gemms:
                continue
            base = median_ms(cublas)
            results = []
            for cfg in CANDIDATES:
                try:
                    results.append((median_ms(lambda: launch(cfg)), cfg))
                except Exception as e:  # invalid tile combination for this epilogue
                    results.append((float("inf"), {**cfg, "error": str(e)[:80]}))
            results.sort(key=lambda r: r[0])
            print(f"{size} {name}: cuBLAS {base:.3f} ms")
            for ms, cfg in results[:4]:
                print(f"   {ms:.3f} ms ({ms / base:.3f}x) {cfg}")


if __name__ == "__main__":
    main()
