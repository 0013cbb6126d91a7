"""scripts/bench_step.py's host profile, on the CPU (the benchmark itself needs a GPU)."""

import importlib.util
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))  # bench_step imports its sibling bench_results
_spec = importlib.util.spec_from_file_location("bench_step", SCRIPTS / "bench_step.py")
bench_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_step)


def _slow_launch():
    time.sleep(0.02)


def _fast_launch():
    return sum(range(10))


def test_host_profile_ranks_the_functions_by_own_host_time():
    def step():
        for _ in range(3):
            _slow_launch()
            _fast_launch()

    rows = bench_step.host_profile(step, top=5)
    assert len(rows) == 5
    assert rows[0]["function"] == "<built-in method time.sleep>"
    assert rows[0]["calls"] == 3 and rows[0]["own_ms"] >= 55
    assert [r["own_ms"] for r in rows] == sorted((r["own_ms"] for r in rows), reverse=True)
    slow = next(r for r in rows if "_slow_launch" in r["function"])
    assert slow["function"].startswith("test_bench_step.py:")
    assert slow["cumulative_ms"] >= 55 and slow["own_ms"] < 5


def test_idle_gaps_sum_the_waits_by_the_kernel_that_ends_them():
    from types import SimpleNamespace

    import torch

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, start, end, device=cuda):
        return SimpleNamespace(name=name, device_type=device,
                               time_range=SimpleNamespace(start=start, end=end))

    # gemm 0-100, cast 100-110 (no gap), gemm 150-300 (40 us gap), overlapping
    # cast 200-250 (none), gemm 1300-1400 (1000 us gap: after the later end, 300).
    events = [event("gemm", 150, 300), event("cast", 100, 110), event("gemm", 0, 100),
              event("cast", 200, 250), event("gemm", 1300, 1400),
              event("launch on the host", 400, 1200, cpu)]
    rows = bench_step.idle_gaps(SimpleNamespace(events=lambda: events), top=5)
    assert len(rows) == 1 and rows[0]["kernel"] == "gemm" and rows[0]["gaps"] == 2
    assert abs(rows[0]["idle_ms"] - 1.04) < 1e-9
