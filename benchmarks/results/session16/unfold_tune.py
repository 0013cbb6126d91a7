"""GPU ms of the unfold pass at 8B/1B shapes for a few tilings (same process)."""
import importlib
import torch
import triton

U = importlib.import_module("coda_titan.kernels.cutedsl.unfold_grads")
from coda_titan.kernels.cutedsl.fp8_operands import CAST_BLOCK, stacked_rows


def gpu_ms(fn, n=20):
    fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / n


dev, bf = "cuda", torch.bfloat16
cases = {"8B W13": ([14336, 14336], 4096, True), "8B QKV": ([4096, 1024, 1024], 4096, False),
         "1B W13": ([8192, 8192], 2048, True)}
for name, (rows, d, inter) in cases.items():
    ws = [torch.randn(r, d, device=dev, dtype=bf) for r in rows]
    g = torch.rand(d, device=dev, dtype=bf) + 0.5
    G = torch.randn(sum(rows), d, device=dev, dtype=bf)
    m = sum(rows)
    gbytes = 3 * m * d * 2 / 1e9
    ref = U.unfold(G, ws, g, inter)
    out = [torch.empty_like(w) for w in ws]
    n0, n1 = stacked_rows([w.shape for w in ws])
    srcs, outs = (ws + ws[:1] * 2)[:3], (out + out[:1] * 2)[:3]
    for rows_pp, chunk, warps in [(256, 32, 4), (512, 32, 4), (128, 32, 4), (256, 16, 4),
                                  (256, 64, 8), (512, 16, 4)]:
        grid = (triton.cdiv(m, rows_pp), triton.cdiv(d, CAST_BLOCK))
        partials = torch.empty(grid[0], d, device=dev)

        def run():
            U._unfold_kernel[grid](G, *srcs, g, *outs, partials, m, d, n0, n1,
                                   SOURCES=len(ws), INTERLEAVE=inter, ROWS=rows_pp, CHUNK=chunk,
                                   BLOCK=CAST_BLOCK, num_warps=warps)
        ms = gpu_ms(run)
        ok = all(torch.equal(a, b) for a, b in zip(out, ref[:-1]))
        print(f"{name} rows {rows_pp:4d} chunk {chunk:3d} warps {warps}: {ms:.3f} ms "
              f"{gbytes / ms:.2f} TB/s equal {ok}", flush=True)
    print(f"{name} unfold() total {gpu_ms(lambda: U.unfold(G, ws, g, inter)):.3f} ms", flush=True)
