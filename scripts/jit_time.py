"""First-call (JIT) time of each CODA kernel op, forward + backward.

quack compiles each epilogue on its first call and keeps the object code in
its on-disk cache (``QUACK_CACHE_DIR``, default /tmp/$USER/quack_cache);
flash-attn-4 (the ``attention`` op: flash4 on the packed QKV) does the same in
``FLASH_ATTENTION_CUTE_DSL_CACHE_DIR`` (default
/tmp/$USER/flash_attention_cute_dsl_cache; coda_titan turns that cache on with
``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``); Inductor does the same for the
small compiled helpers. Run once with empty caches (cold) and once more in a
new process (warm: disk hits):

  QUACK_CACHE_DIR=/tmp/qc FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fc \\
      TORCHINDUCTOR_CACHE_DIR=/tmp/ic python scripts/jit_time.py [--ops attention ...]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_ops  # noqa: E402

bench_ops.M = 4096  # compiled kernels are shape-generic in M; keep the calls short
OPS = ("qkv_rope", "attention", "residual", "mlp", "lm_head")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    for op in parser.parse_args().ops:
        _, coda, inputs, grad_outs, *_ = bench_ops.CASES[op](bench_ops.SIZES["1B"])
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
