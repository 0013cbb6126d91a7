"""Per-op benchmark of the CODA kernels (forward and backward separately).

For each op at LLaMA-3 1B and 8B dims with M = 16384 tokens, in one process:
  coda     the CuTe DSL kernel (cutedsl backend)
  eager    the unfused TorchTitan-style PyTorch code (cuBLAS GEMMs + eager ops)
  compile  the same code under torch.compile
  floor    the bare GEMM(s) alone (torch.matmul), the lower bound
Medians of triton.testing.do_bench. Writes benchmarks/results/ops_<gpu>.{json,md}.

  python scripts/bench_ops.py [--sizes 1B 8B] [--ops mlp residual]
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from coda_titan.kernels import cutedsl

SIZES = {"1B": dict(d=2048, f=8192, hq=32, hkv=8, v=128256),
         "8B": dict(d=4096, f=14336, hq=32, hkv=8, v=128256)}
M = 16384
DEV, BF = "cuda", torch.bfloat16
# The backward is timed by replaying it (retain_graph), which donated buffers forbid.
torch._functorch.config.donated_buffer = False


def randn(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(BF)


def median_ms(fn, grad_to_none=None):
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def fwd_bwd_times(fn, inputs, grad_out):
    """(forward ms, backward ms) of fn(*inputs); backward timed alone."""
    params = [t.requires_grad_() for t in inputs if t.is_floating_point()]
    fwd = median_ms(lambda: fn(*inputs))
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    bwd = median_ms(lambda: out.backward(grad_out, retain_graph=True), grad_to_none=params)
    return fwd, bwd


def mlp_case(s):
    d, f = s["d"], s["f"]
    h, g = randn(M, d), (torch.rand(d, device=DEV) + 0.5).to(BF)
    w1, w3, w2 = randn(f, d, scale=d**-0.5), randn(f, d, scale=d**-0.5), randn(d, f, scale=f**-0.5)

    def eager(h, g, w1, w3, w2):
        n = F.rms_norm(h, (d,), g, 1e-5)
        return h + F.linear(F.silu(F.linear(n, w1)) * F.linear(n, w3), w2)

    def coda(h, g, w1, w3, w2):
        return cutedsl.OPS.rmsnorm_swiglu_mlp(h, g, w1, w3, w2, 1e-5)

    a, w13, gu, dout = randn(M, f), torch.cat((w1, w3)), randn(M, 2 * f), randn(M, d)
    floors = {
        "fwd": lambda: (h @ w13.t(), a @ w2.t()),
        "bwd": lambda: (dout @ w2, dout.t() @ a, gu @ w13, gu.t() @ h),
    }
    return eager, coda, [h, g, w1, w3, w2], dout, floors


def residual_case(s):
    d = s["d"]
    x, o, w = randn(M, d), randn(M, d), randn(d, d, scale=d**-0.5)

    def eager(x, o, w):
        h = x + F.linear(o, w)
        return h, h.float().square().sum(-1)

    dh = randn(M, d)
    floors = {"fwd": lambda: o @ w.t(), "bwd": lambda: (dh @ w, dh.t() @ o)}
    return eager, cutedsl.OPS.linear_residual_sumsq, [x, o, w], dh, floors


CASES = {"mlp": mlp_case, "residual": residual_case}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--ops", nargs="+", default=list(CASES))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name()
    records = []
    for size in args.sizes:
        for op in args.ops:
            eager, coda, inputs, grad_out, floors = CASES[op](SIZES[size])
            compiled = torch.compile(eager)
            times = {}
            for arm, fn in (("coda", coda), ("eager", eager), ("compile", compiled)):
                fresh = [t.detach().clone() for t in inputs]
                times[arm] = fwd_bwd_times(fn, fresh, grad_out)
            floor = {p: median_ms(floors[p]) for p in ("fwd", "bwd")}
            for i, pas in enumerate(("fwd", "bwd")):
                rec = dict(op=op, size=size, **{"pass": pas}, shape=dict(M=M, **SIZES[size]),
                           coda_ms=times["coda"][i], eager_ms=times["eager"][i],
                           compile_ms=times["compile"][i], floor_ms=floor[pas])
                rec["coda_vs_floor"] = rec["coda_ms"] / rec["floor_ms"]
                rec["compile_over_coda"] = rec["compile_ms"] / rec["coda_ms"]
                records.append(rec)
                print(f"{op:10s} {size} {pas}: coda {rec['coda_ms']:.3f} eager {rec['eager_ms']:.3f} "
                      f"compile {rec['compile_ms']:.3f} floor {rec['floor_ms']:.3f} ms | "
                      f"coda/floor {rec['coda_vs_floor']:.3f} compile/coda {rec['compile_over_coda']:.3f}",
                      flush=True)
    import quack
    meta = dict(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda, quack=quack.__version__,
                python=platform.python_version(), command="python " + " ".join(sys.argv))
    tag = gpu.split()[1].lower() if gpu.startswith("NVIDIA") else gpu.replace(" ", "_").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ops_{tag}.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    lines = [f"# CODA op benchmark on {gpu}", "", "```", json.dumps(meta, indent=1), "```", "",
             "| op | size | pass | coda ms | eager ms | compile ms | floor ms | coda/floor | compile/coda |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['size']} | {r['pass']} | {r['coda_ms']:.3f} | {r['eager_ms']:.3f} | "
              f"{r['compile_ms']:.3f} | {r['floor_ms']:.3f} | {r['coda_vs_floor']:.3f} | "
              f"{r['compile_over_coda']:.3f} |" for r in records]
    (out / f"ops_{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
