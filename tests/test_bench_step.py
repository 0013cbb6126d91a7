"""scripts/bench_step.py's host profile, on the CPU (the benchmark itself needs a GPU)."""

import _thread
import importlib.util
import sys
import threading
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))  # bench_step imports its sibling bench_results
_spec = importlib.util.spec_from_file_location("bench_step", SCRIPTS / "bench_step.py")
bench_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_step)


def _slow_launch():
    time.sleep(0.02)


def _fast_launch():
    return sum(range(10))


def _backward_on_a_native_thread():
    time.sleep(0.03)


def test_host_profile_ranks_each_threads_lines_by_their_share():
    """The caller's thread and one not started by ``threading`` (as the autograd
    engine's device thread is) are sampled; ``threading``'s own are left out."""
    def step():
        done = threading.Event()
        _thread.start_new_thread(lambda: (_backward_on_a_native_thread(), done.set()), ())
        helper = threading.Thread(target=time.sleep, args=(0.05,))
        helper.start()
        for _ in range(3):
            _slow_launch()
            _fast_launch()
        done.wait()
        helper.join()

    rows = bench_step.host_profile(step, top=3)
    main = [r for r in rows if (r["thread"], r["kind"]) == ("main", "own")]
    native = [r for r in rows if (r["thread"], r["kind"]) == ("native", "own")]
    assert {r["thread"] for r in rows} == {"main", "native"} and len(main) <= 3
    assert main[0]["function"].startswith("test_bench_step.py:")
    assert main[0]["function"].endswith("(_slow_launch)") and main[0]["share"] > 0.5
    assert 40 <= main[0]["ms"] <= 1.5 * 60 + 20
    # within: the step on every main sample (its callers, above the profiler, are
    # not ranked), _slow_launch on its own samples
    within = {r["function"].rsplit("(", 1)[1]: r for r in rows
              if (r["thread"], r["kind"]) == ("main", "within")}
    assert "test_host_profile_ranks_each_threads_lines_by_their_share)" not in within
    assert within["step)"]["share"] > 0.8
    assert within["step)"]["share"] >= within["_slow_launch)"]["share"]
    assert abs(within["_slow_launch)"]["ms"] - main[0]["ms"]) < 0.1 * main[0]["ms"] + 5
    assert [r["share"] for r in main] == sorted((r["share"] for r in main), reverse=True)
    assert native[0]["function"].endswith("(_backward_on_a_native_thread)")
    # its 30 ms, though it has a stack for only part of the call
    assert 20 <= native[0]["ms"] <= 30 * 1.5 + 20 and native[0]["ms"] < 0.8 * main[0]["ms"]
    # the helper thread, sleeping in threading.py's run, would be a native row
    assert not any("threading.py" in r["function"] for r in native)


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


class _Clock:
    """Stand-in for CUDA events on a GPU clock that a fake step advances."""

    def __init__(self):
        self.now, self.syncs, self.steps = 0.0, [], 0

    def event(self):
        clock = self

        class Event:
            def record(self):
                self.at = clock.now

            def synchronize(self):
                clock.syncs.append(clock.steps)

            def elapsed_time(self, end):
                return end.at - self.at
        return Event()

    def step(self):
        self.steps += 1
        self.now += 10.0 * self.steps


def test_synced_steps_wait_for_the_gpu_after_each_step():
    clock = _Clock()
    assert bench_step.step_times(clock.step, 3, False, clock.event) == [10.0, 20.0, 30.0]
    assert clock.syncs == [1, 2, 3]


def test_back_to_back_steps_wait_for_the_gpu_once_and_time_each_step_between_events():
    clock = _Clock()
    assert bench_step.step_times(clock.step, 3, True, clock.event) == [10.0, 20.0, 30.0]
    assert clock.syncs == [3]


def _event(action, addr, size, *files):
    return dict(action=action, addr=addr, size=size,
                frames=[dict(filename=f, line=i + 1, name=f"f{i}") for i, f in enumerate(files)])


def test_live_at_peak_replays_the_trace_to_its_highest_point():
    """The peak is found in a trace whose live set at the peak differs from the
    live set at its end; frees before the peak count, frees after it do not."""
    trace = [
        _event("alloc", 1, 100, "/x/torch/autograd.py", "/w/coda_titan/ops.py"),
        _event("alloc", 2, 300, "/w/coda_titan/ops.py"),
        _event("free_requested", 1, 100),
        _event("alloc", 3, 50, "/w/coda_titan/ops.py"),
        _event("alloc", 4, 200, "/w/loss.py", "/w/model.py", "/w/train.py", "/w/main.py"),
        _event("free_completed", 1, 100),  # the allocator's later half of a free: not counted
        _event("free_requested", 2, 300),
        _event("alloc", 5, 250),  # 1250 + 250: under the 1550 of event 4
        _event("free_requested", 5, 250),
    ]
    result = bench_step.live_at_peak(trace, base=1000, top=2)
    assert result["event"] == 4 and result["events"] == len(trace)
    assert abs(result["peak_gib"] * 2**30 - 1550) < 1e-6
    assert abs(result["base_gib"] * 2**30 - 1000) < 1e-6
    assert result["at"] == "loss.py:1(f0) <- model.py:2(f1) <- train.py:3(f2)"
    # live at the peak: 2 (300) and 3 (50) from ops.py's line 1, 4 (200); the torch
    # frame of allocation 1 was skipped, but 1 was freed before the peak anyway
    assert [(r["site"], r["count"]) for r in result["sites"]] == [
        ("ops.py:1(f0)", 2), ("loss.py:1(f0) <- model.py:2(f1) <- train.py:3(f2)", 1)]
    assert abs(result["sites"][0]["mib"] * 2**20 - 350) < 1e-6


def test_live_at_peak_of_a_step_that_frees_more_than_it_allocates():
    """No allocation raises the total above the base: no peak event, no sites."""
    trace = [_event("free_requested", 9, 500), _event("alloc", 1, 100, "/w/a.py")]
    result = bench_step.live_at_peak(trace, base=1000, top=3)
    assert result["event"] is None and result["at"] is None and result["sites"] == []
    assert bench_step.site([]) == "native"


def test_a_process_gets_the_arguments_but_processes_and_out():
    argv = ["--flavor", "8B", "--processes", "3", "--out", "x", "--arms", "coda", "float8",
            "--processes=2", "--out=y", "--ac", "full"]
    assert bench_step.child_argv(argv) == ["--flavor", "8B", "--arms", "coda", "float8",
                                           "--ac", "full"]


def _record(arm, step_ms, process, **ratios):
    return dict(arm=arm, attention="flash4", step_ms=step_ms, tok_s=4096 / step_ms * 1e3,
                peak_gib=60.0, profile_ms=dict(gemm=1.0, attention=2.0, other=3.0),
                gpu_idle_ms=step_ms / 10, process=process, **ratios)


def test_the_summary_takes_each_arms_medians_of_the_ratios_each_process_measured():
    records = [_record("coda", 340.0, 0, speedup_vs_float8=1.12),
               _record("float8", 380.8, 0, speedup_vs_float8=1.0),
               _record("coda", 360.0, 1, speedup_vs_float8=1.07),
               _record("float8", 385.2, 1, speedup_vs_float8=1.0),
               _record("coda", 345.0, 2, speedup_vs_float8=1.11),
               _record("float8", 383.0, 2, speedup_vs_float8=1.0)]
    coda, float8 = bench_step.process_summary(records)
    assert coda["arm"] == "coda" and coda["processes"] == 3
    assert (coda["step_ms_median"], coda["step_ms_min"], coda["step_ms_max"]) == (345.0, 340.0,
                                                                                  360.0)
    assert (coda["speedup_vs_float8_median"], coda["speedup_vs_float8_min"]) == (1.11, 1.07)
    assert "speedup_vs_baseline_median" not in coda and float8["step_ms_median"] == 383.0
    table = bench_step.summary_table([coda, float8])
    assert table[2] == "| coda | 3 | 345.0 (340.0-360.0) | 34.5 (34.0-36.0) | | 1.110 (1.070-1.120) |"
    per_process = bench_step.step_table(records, per_process=True)
    assert per_process[1] == "|---" * 12 + "|" and per_process[2].startswith("| 0 | coda |")


def test_each_process_runs_the_script_and_its_records_are_kept(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        k = len(calls) - 1
        (out / "step_8b_h200.json").write_text(bench_step.json.dumps(
            dict(meta={}, records=[dict(arm="coda", step_ms=340.0 + k)])))

    monkeypatch.setattr(bench_step.subprocess, "run", fake_run)
    records = bench_step.run_in_processes(["--flavor", "8B"], 2, tmp_path)
    assert [c[1:4] for c in calls] == [[bench_step.__file__, "--flavor", "8B"]] * 2
    assert records == [dict(arm="coda", step_ms=340.0, process=0),
                       dict(arm="coda", step_ms=341.0, process=1)]


def test_fewer_than_one_process_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(bench_step.sys, "argv", ["bench_step.py", "--processes", "0"])
    with pytest.raises(SystemExit):
        bench_step.main()
    assert "--processes must be at least 1, got 0" in capsys.readouterr().err
