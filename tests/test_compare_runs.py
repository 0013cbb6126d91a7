"""scripts/compare_runs.py on synthetic runs: TorchTitan console logs and
TensorBoard events of a known loss curve with planted noise and bias."""

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
SCRIPT = REPO / "scripts/compare_runs.py"
_spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
compare_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_runs)

STEPS = 1000
# Every run is the same curve plus its own N(0, SIGMA) noise per step, so two
# runs differ by N(0, SIGMA * sqrt(2)): mean |Δloss| = 2 SIGMA / sqrt(pi) =
# 0.025, the noise floor measured between two same-seed LLaMA-3 1B runs.
SIGMA = 0.025 * math.sqrt(math.pi) / 2
PARITY_KEYS = {"arm", "steps", "mean_abs_diff", "max_abs_diff", "max_window_mean_diff"}


def synthetic_losses(seed, steps=STEPS, sigma=SIGMA, bias_from=None, bias=0.05):
    rng = random.Random(seed)
    return {
        step: 3.0 + 7.0 * math.exp(-step / 150) + rng.gauss(0, sigma)
        + (bias if bias_from is not None and step >= bias_from else 0.0)
        for step in range(1, steps + 1)
    }


def write_log(path: Path, losses: dict, tps=50_000, step_s=0.3, mfu=True) -> Path:
    """TorchTitan's console lines, colour codes and all, one per step (CPU runs
    print no MFU: ``mfu=False``)."""
    start = datetime(2026, 1, 1)
    lines = ["[titan] 2026-01-01 00:00:00,000 - root - INFO - Training starts at step 1."]
    for step, loss in sorted(losses.items()):
        time = (start + timedelta(seconds=step * step_s)).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        lines.append(
            f"[titan] {time} - root - INFO - \x1b[31mstep: {step:2}  \x1b[32mloss: {loss:8.5f}  "
            f"\x1b[33mgrad_norm:  1.0000  \x1b[36mmemory: 30.00GiB(37.50%)  "
            f"\x1b[34mtps: {round(tps):,}  \x1b[36mtflops: 400.00"
            + ("  \x1b[35mmfu: 50.00%\x1b[39m" if mfu else "\x1b[39m"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tensorboard(folder: Path, losses: dict) -> Path:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(folder))
    for step, loss in sorted(losses.items()):
        value = Summary.Value(tag=compare_runs.LOSS, simple_value=loss)
        writer.add_event(Event(step=step, summary=Summary(value=[value])))
    writer.close()
    (events,) = folder.glob("events.out.tfevents.*")
    return events


def age(path: Path, seconds: float) -> None:
    stamp = path.stat().st_mtime - seconds
    os.utime(path, (stamp, stamp))


@pytest.fixture(scope="module")
def ab(tmp_path_factory):
    """One comparison of three candidates against a reference and its repeat."""
    root = tmp_path_factory.mktemp("ab")
    reference = write_log(root / "baseline.log", synthetic_losses(seed=0))
    # The repeat carries the reference's name, as a second wandb run of one config does.
    repeat = write_log(root / "repeat/baseline.log", synthetic_losses(seed=1))
    candidates = [
        write_log(root / "noise_only.log", synthetic_losses(seed=2)),
        write_log(root / "biased.log", synthetic_losses(seed=3, bias_from=500), tps=55_000),
        write_log(root / "noisier.log", synthetic_losses(seed=4, sigma=3 * SIGMA)),
    ]
    out = root / "out"
    result = compare_runs.main([str(reference), *map(str, candidates), "--noise", str(repeat),
                                "--out", str(out)])
    verdicts = {v["arm"]: v for v in result["verdicts"]}
    records = {r["arm"]: r for r in result["records"]}
    return dict(result=result, out=out, verdicts=verdicts, records=records, root=root)


def test_parity_records_have_exactly_the_committed_keys(ab):
    result = ab["result"]
    assert set(result["noise"]) == PARITY_KEYS
    assert [set(r) for r in result["records"]] == [PARITY_KEYS] * 3
    assert result["noise"]["arm"] == "baseline #2"
    assert result["warmup"] == 20 and result["window"] == 100 and result["notes"] == []
    assert all(r["steps"] == STEPS - 20 for r in result["records"])


def test_losses_json_holds_every_runs_logged_losses_warmup_included(ab):
    records = json.loads((ab["out"] / "losses.json").read_text())
    assert [r["arm"] for r in records] == ["baseline", "baseline #2", "noise_only", "biased",
                                           "noisier"]
    planted = synthetic_losses(seed=3, bias_from=500)
    biased = records[3]
    assert biased["steps"] == list(range(1, STEPS + 1))
    assert biased["loss"] == pytest.approx([planted[s] for s in biased["steps"]], abs=1e-5)


def test_the_repeat_measures_the_planted_noise_floor(ab):
    noise = ab["result"]["noise"]
    assert noise["mean_abs_diff"] == pytest.approx(0.025, abs=0.003)
    assert 0.07 < noise["max_abs_diff"] < 0.2
    assert noise["max_window_mean_diff"] < 0.015


def test_a_candidate_that_differs_only_by_noise_is_within_noise(ab):
    verdict = ab["verdicts"]["noise_only"]
    assert not verdict["flagged"]
    assert verdict["verdict"] == "within noise"


def test_a_bias_of_005_from_step_500_is_flagged_by_the_window_criterion(ab):
    verdict, record = ab["verdicts"]["biased"], ab["records"]["biased"]
    assert verdict["flagged"]
    window = verdict["verdict"].split("100-step window mean Δloss ")[1]
    mean, steps = window.split(" at steps ")
    assert float(mean) == pytest.approx(0.05, abs=0.01)
    assert int(steps.split("-")[0]) >= 500 - 100
    assert record["max_window_mean_diff"] == pytest.approx(0.05, abs=0.01)


def test_a_noisier_candidate_is_flagged_by_the_mean_criterion_alone(ab):
    verdict = ab["verdicts"]["noisier"]
    assert verdict["flagged"]
    assert "mean |Δloss|" in verdict["verdict"] and "window" not in verdict["verdict"]
    assert ab["records"]["noisier"]["mean_abs_diff"] > 1.5 * ab["result"]["noise"]["mean_abs_diff"]


def test_speed_per_candidate_against_the_reference(ab):
    speed = {s["arm"]: s for s in ab["result"]["speed"]}
    assert speed["baseline"]["step_ms"] == pytest.approx(300)
    assert speed["baseline"]["speedup"] == 1
    assert speed["biased"]["speedup"] == pytest.approx(1.1)
    peak = speed["noise_only"]
    assert (peak["peak_gib"], peak["peak_kind"]) == (30, "max reserved")


def test_report_explains_the_verdicts(ab):
    report = (ab["out"] / "comparison.md").read_text()
    assert f"Loss parity over {STEPS - 20} aligned steps after step 20" in report
    assert "| baseline #2 (repeat) | 980 |" in report
    assert "1.5 x the noise floor's" in report and "within ±0.03 nats" in report
    assert report.count("FLAGGED: ") == 2
    assert (ab["out"] / "comparison.png").stat().st_size > 10_000


def band_labels_and_height(fig):
    ax_diff = fig.axes[1]
    labels = [text.get_text() for text in ax_diff.get_legend().get_texts()]
    bands = [c for c in ax_diff.collections if c.get_label().startswith("noise band")]
    return labels, max((b.get_paths()[0].vertices[:, 1].max() for b in bands), default=None)


def test_the_plot_shows_the_noise_band(ab):
    root = ab["root"]
    reference, repeat, candidate = (compare_runs.load_run(str(root / name)) for name in
                                    ("baseline.log", "repeat/baseline.log", "biased.log"))

    def arm(run):
        return compare_runs.Arm(run, compare_runs.loss_diffs(reference, run, 20), 100)

    labels, height = band_labels_and_height(
        compare_runs.figure(reference, arm(repeat), [arm(candidate)], 0.03))
    assert any(label.startswith("noise band") for label in labels)
    assert height == pytest.approx(0.025, abs=0.01)  # the repeat's windowed mean |Δloss|
    without_repeat = compare_runs.figure(reference, None, [arm(candidate)], 0.03)
    labels, height = band_labels_and_height(without_repeat)
    assert height is None and not any(label.startswith("noise band") for label in labels)


def test_a_nan_loss_is_flagged(tmp_path):
    losses = synthetic_losses(seed=5, steps=100)
    reference = compare_runs.load_run(str(write_log(tmp_path / "baseline.log", losses)))
    nan_at_70 = write_log(tmp_path / "diverged.log", {**losses, 70: math.nan})
    diverged = compare_runs.load_run(str(nan_at_70))
    arm = compare_runs.Arm(diverged, compare_runs.loss_diffs(reference, diverged, 20), 50)
    verdict = compare_runs.verdict(arm, None, noise_ratio=1.5, max_window_diff=0.03)
    assert verdict["verdict"].startswith("FLAGGED: NaN/inf loss at 1 steps from step 70")
    assert math.isnan(arm.record()["max_abs_diff"])


def test_cpu_logs_without_mfu_compare_without_an_mfu_row_and_write_valid_json(tmp_path):
    runs = [write_log(tmp_path / f"{arm}.log", synthetic_losses(seed), mfu=False)
            for seed, arm in enumerate(("baseline", "coda"))]
    compare_runs.main([str(runs[0]), str(runs[1]), "--out", str(tmp_path / "out")])
    assert "MFU" not in (tmp_path / "out/comparison.md").read_text()
    result = json.loads((tmp_path / "out/comparison.json").read_text(),
                        parse_constant=lambda name: pytest.fail(f"{name} in comparison.json"))
    assert [r["mfu"] for r in result["speed"]] == [None, None]


def test_a_dump_folder_is_read_from_its_latest_tensorboard_events_first(tmp_path, capsys):
    losses = synthetic_losses(seed=6, steps=10)
    reference = write_log(tmp_path / "baseline.log", losses)
    dump = tmp_path / "llama3_debug_coda"
    old = write_tensorboard(dump / "tb/20260101-0000", {s: v + 1 for s, v in losses.items()})
    age(old, 100)
    new = write_tensorboard(dump / "tb/20260101-0100", losses)
    write_log(dump / "train.log", {s: v + 2 for s, v in losses.items()})
    result = compare_runs.main([str(reference), str(dump), "--out", str(tmp_path / "out")])
    assert result["runs"][1] == dict(role="candidate", arm="llama3_debug_coda", source=str(new),
                                     picked=f"the latest of 2 TensorBoard events files in {dump}")
    assert result["records"][0]["mean_abs_diff"] < 1e-4
    assert f"{new} (the latest of 2 TensorBoard events files in {dump})" in capsys.readouterr().out


def test_a_dump_folder_with_console_logs_is_read_from_the_latest(tmp_path):
    losses = synthetic_losses(seed=7, steps=10)
    dump = tmp_path / "llama3_debug_baseline"
    age(write_log(dump / "train.log", {s: v + 1 for s, v in losses.items()}), 100)
    latest = write_log(dump / "rerun/train.log", losses)
    run = compare_runs.load_run(str(dump))
    assert (run.name, run.source, run.choice) == (
        "llama3_debug_baseline", latest, f"the latest of 2 console logs in {dump}")
    assert run.losses == pytest.approx(losses, abs=1e-5)


def test_a_ten_step_run_adapts_the_warmup_and_window(tmp_path):
    runs = [str(write_log(tmp_path / f"{arm}.log", synthetic_losses(seed, steps=10)))
            for seed, arm in enumerate(("baseline", "coda"))]
    result = compare_runs.main([*runs, "--out", str(tmp_path / "auto")])
    assert (result["warmup"], result["window"], result["records"][0]["steps"]) == (2, 8, 8)
    assert result["notes"][0].startswith("Warm-up 2 steps: the default 20 is cut to a fifth")
    assert result["notes"][1].startswith("Window 8 steps")
    assert "Warm-up 2 steps" in (tmp_path / "auto/comparison.md").read_text()
    assert compare_runs.choose_warmup(5, list(map(compare_runs.load_run, runs))) == (5, "")


def test_default_output_folder_is_ignored_by_git():
    out = Path(compare_runs.parse_args(["a", "b"]).out)
    assert out == REPO / "outputs/compare"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "comparison.json")], cwd=REPO)
    assert ignored.returncode == 0


def run_script(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.parametrize("case, message", [
    ("missing", "missing.log: no such file or folder"),
    ("empty folder", "empty: no wandb run file (run-*.wandb), TensorBoard events or *.log"),
    ("no step lines", "notes.log: no logged loss"),
    ("no shared steps", "share no logged loss after step 50; lower --warmup"),
])
def test_user_errors_are_one_line(tmp_path, case, message):
    reference = write_log(tmp_path / "baseline.log", synthetic_losses(seed=8, steps=10))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.log").write_text("no training here\n")
    candidate = {"missing": ["missing.log"], "empty folder": ["empty"],
                 "no step lines": ["notes.log"],
                 "no shared steps": [str(reference), "--warmup", "50"]}[case]
    result = run_script(str(reference), *candidate, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("compare_runs.py: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
