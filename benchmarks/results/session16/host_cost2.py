"""Host us per call after the changes (GPU held busy), 8B shapes; Launched vs Triton outputs."""
import importlib
import statistics
import time

import torch
import triton

F = importlib.import_module("coda_titan.kernels.cutedsl.fp8_operands")
U = importlib.import_module("coda_titan.kernels.cutedsl.unfold_grads")
from coda_titan.kernels.fp8 import HISTORY, HISTORY_SITES

M, D, Fd = 4096, 4096, 14336
dev = "cuda"
x = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
hist = torch.zeros(HISTORY_SITES, 1 + HISTORY, device=dev)
hist[:, 1:] = 4.0
row = hist[3]


def timed(name, fn, n=200):
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e6)
    torch.cuda.synchronize()
    print(f"{name:55s} median {statistics.median(ts):7.1f} us  p10 {sorted(ts)[n // 10]:7.1f}",
          flush=True)


# Outputs of the Launched path (2nd+ launch) against Triton's own (1st launch).
first = F.quantize(x, "grad", "delayed", row, cols=True)
for _ in range(3):
    again = F.quantize(x, "grad", "delayed", row, cols=True)
    assert torch.equal(first.rows.view(torch.uint8), again.rows.view(torch.uint8))
    assert torch.equal(first.cols.view(torch.uint8), again.cols.view(torch.uint8))
    assert torch.equal(first.inv_scale, again.inv_scale)
print("Launched casts equal Triton's launch:", True)
timed("quantize act delayed rows", lambda: F.quantize(x, "act", "delayed", row))
timed("quantize grad delayed rows+cols", lambda: F.quantize(x, "grad", "delayed", row, cols=True))
timed("quantize act delayed cols (wgrad)",
      lambda: F.quantize(x, "act", "delayed", row, rows=False, cols=True))
timed("quantize act tensorwise rows", lambda: F.quantize(x, "act", "tensorwise"))
w1, w3 = (torch.randn(Fd, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
g = torch.rand(D, device=dev, dtype=torch.bfloat16) + 0.5
dw13 = torch.randn(2 * Fd, D, device=dev, dtype=torch.bfloat16)
timed("unfold W13 8B", lambda: U.unfold(dw13, [w1, w3], g, True))
timed("coda::unfold_grads W13 8B", lambda: U.unfold_grads(dw13, [w1, w3], g, True))
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(20):
    U.unfold(dw13, [w1, w3], g, True)
e.record()
e.synchronize()
print(f"unfold W13 8B GPU {s.elapsed_time(e) / 20:.3f} ms")
# Same process: the cast launched by Triton's run against Launched, outputs preallocated.
q = torch.empty(M, D, dtype=torch.float8_e4m3fn, device=dev)
inv = torch.empty(1, device=dev)
grid = (triton.cdiv(M, 128), triton.cdiv(D, 128))
args = (x, inv, inv, inv, inv, row, q, inv, inv, inv, inv, M, D, M, 0, M, 448.0, 1e-12)
kw = dict(ROWS=True, COLS=False, DELAYED=True, RECORD=True, TIMES=False, HISTORY=HISTORY,
          **F._layout(1, False, False))
timed("cast: Triton's JITFunction.run", lambda: F._cast_kernel.fn[grid](*args, **kw))
timed("cast: Launched", lambda: F._cast_kernel[grid](*args, **kw))
timed("torch.cuda.current_stream().cuda_stream", lambda: torch.cuda.current_stream(0).cuda_stream)
*_, binder = F._cast_kernel.fn.device_caches[0]
timed("binder", lambda: binder(*args, **kw))
