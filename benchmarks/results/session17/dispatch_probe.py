"""Host us per call of one op signature registered three ways, CUDA tensors, GPU held busy."""
import statistics, time, torch
from torch.library import custom_op, Library

SIG = "(Tensor x, Tensor w, Tensor? h, str? fp8, bool keep, int row) -> (Tensor, Tensor)"
def body(x, w, h, fp8, keep, row):
    return x, w
def fake(x, w, h, fp8, keep, row):
    return torch.empty_like(x), torch.empty_like(w)
def bwd(ctx, a, b): return a, b, None, None, None, None
def setup(ctx, inputs, output): pass

@custom_op("probe::full", mutates_args=(), device_types="cuda")
def full(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor | None, fp8: str | None, keep: bool, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(w)
full.register_fake(fake)
full.register_autograd(bwd, setup_context=setup)
ops = {"custom_op+autograd": torch.ops.probe.full.default}
for name, autograd in (("lib", False), ("lib_ag", True)):
    lib = Library("probe_" + name, "DEF")
    lib.define("op" + SIG)
    lib.impl("op", lambda x, w, h, fp8, keep, row: (torch.empty_like(x), torch.empty_like(w)), "CUDA")
    torch.library.register_fake(f"probe_{name}::op", fake, lib=lib)
    if autograd:
        torch.library.register_autograd(f"probe_{name}::op", bwd, setup_context=setup, lib=lib)
    globals()["keep_" + name] = lib
    ops["Library+fake" + ("+autograd" if autograd else "")] = getattr(torch.ops, "probe_" + name).op.default
ops["plain fn"] = lambda *a: (torch.empty_like(a[0]), torch.empty_like(a[1]))
x = torch.randn(64, 64, device="cuda", requires_grad=True)
w = torch.randn(64, 64, device="cuda", requires_grad=True)
h = torch.zeros(4, device="cuda")
def timed(fn, n=2000):
    for _ in range(50): fn()
    torch.cuda.synchronize(); torch.cuda._sleep(int(2e9))
    t = time.perf_counter()
    for _ in range(n): fn()
    dt = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return dt
for grad in (False, True):
    with torch.set_grad_enabled(grad):
        for name, op in ops.items():
            if grad and name == "Library+fake":
                continue
            r = [timed(lambda: op(x, w, h, "delayed", True, 3)) for _ in range(3)]
            print(f"grad={grad!s:5} {name:28} {statistics.median(r):7.2f} us  {['%.2f' % v for v in r]}")
