"""Per-op benchmark of the CODA kernels (forward and backward separately).

For each op at LLaMA-3 1B and 8B dims with M = 16384 tokens, in one process:
  coda     the CuTe DSL kernel (cutedsl backend)
  eager    the unfused TorchTitan-style PyTorch code (cuBLAS GEMMs + eager ops)
  compile  the same code under torch.compile
  floor    the bare GEMM(s) alone (torch.matmul), the lower bound
and arms of a single op (the last column). Medians of triton.testing.do_bench.
Writes benchmarks/results/ops_<gpu>.{json,md}.

FP8 (qkv_rope, residual, mlp):
  coda_fp8   the kernel with ``[coda] fp8 = "coda"``, the delayed recipe (its amax
             history filled by one tensorwise call first); the FP8 weights are cast
             in every call here, once per optimizer step in training
  floor_fp8  the same GEMMs as bare ``torch._scaled_mm`` on operands cast
             beforehand (e4m3, one scale each), fast accumulation

attention (B 2, S 8192, causal; 1B 32/8 heads d 64, 8B 32/8 heads d 128):
  coda     flash4 on the packed QKV (our op: dQKV written as one buffer)
  eager    TorchTitan's SDPA (cuDNN) on views of the packed QKV, the
           ``attention = "sdpa"`` path; autograd concatenates dq/dk/dv
  compile  the same under torch.compile
  floor    flash-attn-4's forward / backward kernels alone on separate contiguous q/k/v
  titan    TorchTitan's SDPA (cuDNN) on separate contiguous q/k/v, as its block calls it
  flash4_separate  our op on separate contiguous q/k/v (the unfused-projections path)

  python scripts/bench_ops.py [--sizes 1B 8B]
                              [--ops qkv_rope attention residual mlp lm_head block]
                              [--lm-chunk 8192]

"fwd+bwd" adds the two; peak MiB is the allocation above the inputs during
one forward+backward.
"""

import argparse
import functools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from bench_results import write_results

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


def fwd_bwd_times(fn, inputs, grad_outs):
    """(forward ms, backward ms, peak MiB of one forward+backward) of fn(*inputs);
    the backward is timed alone. grad_outs pair with fn's first outputs."""
    params = [t.requires_grad_() for t in inputs if t.is_floating_point()]

    def outputs():
        out = fn(*inputs)
        return (out if isinstance(out, tuple) else (out,))[: len(grad_outs)]

    fwd = median_ms(outputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.backward(outputs(), grad_outs)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    outs = outputs()
    bwd = median_ms(lambda: torch.autograd.backward(outs, grad_outs, retain_graph=True),
                    grad_to_none=params)
    return fwd, bwd, peak


def to_fp8(x):
    """``x`` in e4m3 with one scale, and its ``1 / scale``."""
    inv = x.abs().max().float() / torch.finfo(torch.float8_e4m3fn).max
    return (x.float() / inv).to(torch.float8_e4m3fn), inv


def fp8_floor(*pairs):
    """The bare FP8 GEMMs ``a @ b.T`` for pairs of bf16 ``a`` (M, K), ``b`` (N, K),
    cast beforehand: cuBLAS, fast accumulation."""
    cast = [(*to_fp8(a.contiguous()), *to_fp8(b.contiguous())) for a, b in pairs]
    return lambda: [torch._scaled_mm(qa, qb.t(), scale_a=ia, scale_b=ib, out_dtype=BF,
                                     use_fast_accum=True) for qa, ia, qb, ib in cast]


def fp8_arm(op, inputs, *args):
    """``(fn, inputs)`` of the op's delayed FP8 kernel, with a block's amax history
    filled by one tensorwise forward and backward."""
    from coda_titan.kernels.fp8 import HISTORY, HISTORY_SITES, roll_history

    history = torch.zeros(HISTORY_SITES, 1 + HISTORY, device=DEV)
    filling = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = getattr(cutedsl.BOUND_OPS[False, False, "tensorwise"], op)(
        *filling, *args, history=history)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.randn_like(out))
    roll_history(history)
    delayed = getattr(cutedsl.BOUND_OPS[False, False, "delayed"], op)
    return (lambda *xs: delayed(*xs, *args, history=history)), inputs


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
    fp8_floors = {
        "fwd": fp8_floor((h, w13), (a, w2)),
        "bwd": fp8_floor((dout, w2.t()), (dout.t(), a.t()), (gu, w13.t()), (gu.t(), h.t())),
    }
    return (eager, coda, [h, g, w1, w3, w2], [dout], floors,
            {"coda_fp8": fp8_arm("rmsnorm_swiglu_mlp", [h, g, w1, w3, w2], 1e-5)}, fp8_floors)


def residual_case(s):
    d = s["d"]
    x, o, w = randn(M, d), randn(M, d), randn(d, d, scale=d**-0.5)

    def eager(x, o, w):
        h = x + F.linear(o, w)
        return h, h.float().square().sum(-1)

    dh = randn(M, d)
    floors = {"fwd": lambda: o @ w.t(), "bwd": lambda: (dh @ w, dh.t() @ o)}
    fp8_floors = {"fwd": fp8_floor((o, w)), "bwd": fp8_floor((dh, w.t()), (dh.t(), o.t()))}
    return (eager, cutedsl.OPS.linear_residual_sumsq, [x, o, w], [dh], floors,
            {"coda_fp8": fp8_arm("linear_residual_sumsq", [x, o, w])}, fp8_floors)


def qkv_rope_case(s):
    from torchtitan.models.llama3.model.model import apply_rotary_emb, precompute_freqs_cis

    from coda_titan.kernels import token_positions

    d, hq, hkv = s["d"], s["hq"], s["hkv"]
    hd, batch, seqlen = d // hq, 2, M // 2
    x, g = randn(M, d), (torch.rand(d, device=DEV) + 0.5).to(BF)
    wq, wk, wv = randn(hq * hd, d, scale=d**-0.5), randn(hkv * hd, d, scale=d**-0.5), randn(
        hkv * hd, d, scale=d**-0.5)
    freqs = precompute_freqs_cis(hd, seqlen, 500000.0).to(DEV)
    positions = token_positions(batch, seqlen, None, DEV)

    def eager(x, g, wq, wk, wv):
        # Packed as the op packs them, to take the same gradient (eager: one more copy).
        n = F.rms_norm(x, (d,), g, 1e-5)
        q, k, v = (F.linear(n, w).view(batch, seqlen, -1, hd) for w in (wq, wk, wv))
        q, k = apply_rotary_emb(q, k, freqs)
        return torch.cat((q, k, v), dim=2).view(M, -1)

    def coda(x, g, wq, wk, wv):
        return cutedsl.OPS.rmsnorm_qkv_rope(x, g, wq, wk, wv, freqs, positions, 1e-5)

    w = torch.cat((wq, wk, wv))
    dz = randn(M, w.shape[0])
    floors = {"fwd": lambda: x @ w.t(), "bwd": lambda: (dz @ w, dz.t() @ x)}
    fp8_floors = {"fwd": fp8_floor((x, w)), "bwd": fp8_floor((dz, w.t()), (dz.t(), x.t()))}
    return (eager, coda, [x, g, wq, wk, wv], [randn(M, w.shape[0])], floors,
            {"coda_fp8": fp8_arm("rmsnorm_qkv_rope", [x, g, wq, wk, wv], freqs, positions, 1e-5)},
            fp8_floors)


def attention_case(s):
    """Arms of the attention core (see the module docstring); the sixth element maps
    each arm that takes other inputs than the packed QKV to (function, inputs)."""
    from torchtitan.models.llama3.model.args import TransformerModelArgs
    from torchtitan.models.llama3.model.model import Attention

    from coda_titan.kernels import attention_for, packed_attention
    from coda_titan.kernels.flash4.packed_attention import flash4_interface

    hq, hkv = s["hq"], s["hkv"]
    hd, batch, seqlen = s["d"] // hq, 2, M // 2
    with torch.device("meta"):  # only its attention core runs, which holds no weights
        attention = Attention(TransformerModelArgs(dim=s["d"], n_heads=hq, n_kv_heads=hkv))
    qkv = randn(batch, seqlen, hq + 2 * hkv, hd)
    separate = [t.contiguous() for t in qkv.split((hq, hkv, hkv), dim=2)]
    flash4 = attention_for("flash4")

    def coda(qkv):
        return flash4(attention, [qkv], None)

    def eager(qkv):
        return packed_attention(attention, [qkv], None)

    interface = flash4_interface()
    forward = functools.partial(interface._flash_attn_fwd, *separate, causal=True, return_lse=True)
    saved = functools.cache(forward)  # no kernel runs (or compiles) before the arms do
    dout = randn(batch, seqlen, hq, hd)

    def backward():
        out, lse, *_ = saved()
        return interface._flash_attn_bwd(*separate, out, dout, lse, causal=True)

    floors = {"fwd": forward, "bwd": backward}
    extra = {
        "titan": (lambda q, k, v: packed_attention(attention, [q, k, v], None), separate),
        "flash4_separate": (lambda q, k, v: flash4(attention, [q, k, v], None), separate),
    }
    return eager, coda, [qkv], [dout.flatten(2)], floors, extra


def lm_head_case(s, chunk_tokens=8192):
    d, vocab = s["d"], s["v"]
    h, g = randn(M, d), (torch.rand(d, device=DEV) + 0.5).to(BF)
    w = randn(vocab, d, scale=d**-0.5)
    labels = torch.randint(0, vocab, (M,), device=DEV)

    def eager(h, g, w):
        logits = F.linear(F.rms_norm(h, (d,), g, 1e-5), w)
        return F.cross_entropy(logits.float(), labels, reduction="sum")

    def coda(h, g, w):
        return cutedsl.OPS.rmsnorm_linear_cross_entropy(h, g, w, labels, 1e-5, chunk_tokens)

    dz = randn(M, vocab)
    floors = {"fwd": lambda: h @ w.t(), "bwd": lambda: (dz @ w, dz.t() @ h)}
    return eager, coda, [h, g, w], [torch.tensor(1.0 / M, device=DEV)], floors


def profile(fn, inputs, grad_outs, rows=12):
    """Kernel time breakdown of one CODA forward+backward (after a warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]

    def step():
        out = fn(*inputs)
        torch.autograd.backward((out if isinstance(out, tuple) else (out,))[: len(grad_outs)],
                                grad_outs)

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def block_case(s):
    """A whole LLaMA-3 block: TorchTitan's (eager / per-block compiled) vs converted."""
    import copy

    from torchtitan.models.llama3.model.model import TransformerBlock, precompute_freqs_cis

    from coda_titan.config import Coda
    from coda_titan.layers import CodaTransformerBlock
    from coda_titan.train_spec import coda_llama3_args

    args = coda_llama3_args["1B" if s["d"] == 2048 else "8B"]
    titan = TransformerBlock(1, args).to(DEV, BF)
    with torch.no_grad():
        titan.init_weights()
    fused = CodaTransformerBlock.convert(copy.deepcopy(titan), Coda(), "cutedsl")
    hd, batch, seqlen = args.dim // args.n_heads, 2, M // 2
    freqs = precompute_freqs_cis(hd, seqlen, args.rope_theta).to(DEV)
    x = randn(batch, seqlen, args.dim)

    def wrap(block):
        return lambda x: block(x, freqs, None)

    d, f = s["d"], s["f"]
    wqkv, wo, w13, w2 = randn(d + d // 2, d), randn(d, d), randn(2 * f, d), randn(d, f)
    x2, qkv, o, gu, a = randn(M, d), randn(M, d + d // 2), randn(M, d), randn(M, 2 * f), randn(M, f)
    q, k, v = (randn(batch, args.n_heads, seqlen, hd) for _ in range(3))
    attn_fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    attn_out = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
    attn_bwd = lambda: torch.autograd.grad(attn_out, (qr, kr, vr), o.view_as(attn_out),  # noqa: E731
                                           retain_graph=True)
    floors = {
        "fwd": lambda: (x2 @ wqkv.t(), attn_fwd(), o @ wo.t(), x2 @ w13.t(), a @ w2.t()),
        "bwd": lambda: (qkv @ wqkv, qkv.t() @ x2, attn_bwd(), x2 @ wo, x2.t() @ o, x2 @ w2,
                        x2.t() @ a, gu @ w13, gu.t() @ x2),
    }
    # TorchTitan compiles each block, converted ones too.
    extra = {"coda_compile": (torch.compile(wrap(fused)), [x])}
    return wrap(titan), wrap(fused), [x], [randn(batch, seqlen, args.dim)], floors, extra


CASES = {"qkv_rope": qkv_rope_case, "attention": attention_case, "residual": residual_case,
         "mlp": mlp_case, "lm_head": lm_head_case, "block": block_case}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--ops", nargs="+", default=list(CASES))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--profile", action="store_true", help="only print kernel breakdowns")
    parser.add_argument("--lm-chunk", type=int, default=8192,
                        help="LM head tokens per chunk ([coda] loss_chunk_tokens)")
    args = parser.parse_args()
    CASES["lm_head"] = functools.partial(lm_head_case, chunk_tokens=args.lm_chunk)
    if args.profile:
        for size in args.sizes:
            for op in args.ops:
                _, coda, inputs, grad_outs, *_ = CASES[op](SIZES[size])
                print(f"== {op} {size}")
                profile(coda, inputs, grad_outs)
        return
    records = []
    for size in args.sizes:
        for op in args.ops:
            eager, coda, inputs, grad_outs, floors, *rest = CASES[op](SIZES[size])
            extra = rest[0] if rest else {}
            fp8_floors = rest[1] if len(rest) > 1 else None
            arms = {"coda": (coda, inputs), "eager": (eager, inputs),
                    "compile": (torch.compile(eager), inputs), **extra}
            times = {}
            for arm, (fn, arm_inputs) in arms.items():
                fresh = [t.detach().clone() for t in arm_inputs]
                times[arm] = fwd_bwd_times(fn, fresh, grad_outs)
            floor = {p: median_ms(floors[p]) for p in ("fwd", "bwd")}
            floor["fwd+bwd"] = floor["fwd"] + floor["bwd"]
            floor_fp8 = fp8_floors and {p: median_ms(fp8_floors[p]) for p in ("fwd", "bwd")}
            if floor_fp8:
                floor_fp8["fwd+bwd"] = floor_fp8["fwd"] + floor_fp8["bwd"]
            for arm in times:
                fwd, bwd, peak = times[arm]
                times[arm] = (fwd, bwd, fwd + bwd, peak)
            for i, pas in enumerate(("fwd", "bwd", "fwd+bwd")):
                shape = dict(M=M, **SIZES[size], **({"chunk": args.lm_chunk} if op == "lm_head" else {}))
                rec = dict(op=op, size=size, **{"pass": pas}, shape=shape,
                           coda_ms=times["coda"][i], eager_ms=times["eager"][i],
                           compile_ms=times["compile"][i], floor_ms=floor[pas],
                           coda_peak_mib=times["coda"][3], eager_peak_mib=times["eager"][3],
                           compile_peak_mib=times["compile"][3])
                rec["other_arms_ms"] = {arm: times[arm][i] for arm in extra}
                rec["other_arms_peak_mib"] = {arm: times[arm][3] for arm in extra}
                if floor_fp8:
                    rec["floor_fp8_ms"] = floor_fp8[pas]
                    rec["coda_fp8_vs_floor_fp8"] = rec["other_arms_ms"]["coda_fp8"] / floor_fp8[pas]
                rec["coda_vs_floor"] = rec["coda_ms"] / rec["floor_ms"]
                rec["compile_over_coda"] = rec["compile_ms"] / rec["coda_ms"]
                rec["eager_over_coda"] = rec["eager_ms"] / rec["coda_ms"]
                records.append(rec)
                print(f"{op:9s} {size} {pas:7s}: coda {rec['coda_ms']:.3f} eager {rec['eager_ms']:.3f} "
                      f"compile {rec['compile_ms']:.3f} floor {rec['floor_ms']:.3f} ms | "
                      f"coda/floor {rec['coda_vs_floor']:.3f} compile/coda "
                      f"{rec['compile_over_coda']:.3f} eager/coda {rec['eager_over_coda']:.3f} | "
                      f"peak MiB coda {rec['coda_peak_mib']:.0f} eager {rec['eager_peak_mib']:.0f} "
                      f"compile {rec['compile_peak_mib']:.0f}"
                      + "".join(f" | {arm} {ms:.3f}" for arm, ms in rec["other_arms_ms"].items())
                      + (f" | floor_fp8 {rec['floor_fp8_ms']:.3f} coda_fp8/floor_fp8 "
                         f"{rec['coda_fp8_vs_floor_fp8']:.3f}" if floor_fp8 else ""),
                      flush=True)
    table = ["| op | size | pass | coda ms | eager ms | compile ms | floor ms | coda/floor | "
             "compile/coda | eager/coda | peak MiB coda / eager / compile | other arms ms | "
             "FP8 floor ms | coda_fp8/FP8 floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['op']} | {r['size']} | {r['pass']} | {r['coda_ms']:.3f} | {r['eager_ms']:.3f} | "
              f"{r['compile_ms']:.3f} | {r['floor_ms']:.3f} | {r['coda_vs_floor']:.3f} | "
              f"{r['compile_over_coda']:.3f} | {r['eager_over_coda']:.3f} | "
              f"{r['coda_peak_mib']:.0f} / {r['eager_peak_mib']:.0f} / {r['compile_peak_mib']:.0f} | "
              + ", ".join(f"{arm} {ms:.3f}" for arm, ms in r["other_arms_ms"].items()) + " | "
              + (f"{r['floor_fp8_ms']:.3f} | {r['coda_fp8_vs_floor_fp8']:.3f} |"
                 if "floor_fp8_ms" in r else "| |")
              for r in records]
    write_results(args.out, "ops", "CODA op benchmark", records, table)

if __name__ == "__main__":
    main()
