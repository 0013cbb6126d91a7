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
