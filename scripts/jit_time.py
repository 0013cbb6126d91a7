"""First-call (JIT) time of each CODA kernel op, forward + backward.

quack compiles each epilogue on its first call and keeps the object code in
its on-disk cache (``QUACK_CACHE_DIR``, default /tmp/$USER/quack_cache);
Inductor does the same for the small compiled helpers. Run once with empty
caches (cold) and once more in a new process (warm: disk hits):

  QUACK_CACHE_DIR=/tmp/qc TORCHINDUCTOR_CACHE_DIR=/tmp/ic python scripts/jit_time.py
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_ops  # noqa: E402

bench_ops.M = 4096  # compiled kernels are shape-generic in M; keep the calls short


def main():
    for op in ("qkv_rope", "residual", "mlp", "lm_head"):
        _, coda, inputs, grad_outs, _ = bench_ops.CASES[op](bench_ops.SIZES["1B"])
        inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = coda(*inputs)
            torch.autograd.backward((out if isinstance(out, tuple) else (out,))[: len(grad_outs)],
                                    grad_outs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(f"{op:9s} first call {times[0]:7.2f} s, second call {times[1] * 1e3:7.1f} ms", flush=True)


if __name__ == "__main__":
    main()
