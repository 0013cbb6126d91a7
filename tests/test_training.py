"""A real training run on CPU through TorchTitan's trainer, launched the way a
user launches it (scripts/train.sh), baseline and CODA from the same seed.

Both runs use bf16 autocast (TorchTitan's single-device AMP), so per-step
losses agree to bf16 rounding, not bit-for-bit: seen <= 1.1e-3 apart over
10 steps; the test allows 1e-2.
"""

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coda_titan.wandb_run import read_wandb_history

REPO = Path(__file__).parent.parent
STEPS = 8
LOSS = "loss_metrics/global_avg_loss"


def train(config: str, dump: Path) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for key in ("WANDB_RUN_NAME", "WANDB_RUN_GROUP", "WANDB_PROJECT"):
        env.pop(key, None)
    result = subprocess.run(
        ["bash", str(REPO / "scripts/train.sh"), str(REPO / "configs" / config),
         f"--training.steps={STEPS}", "--metrics.enable_wandb",
         f"--job.dump_folder={dump}"],
        env=env, capture_output=True, text=True, timeout=900, cwd="/",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_file,) = glob.glob(str(dump / "tb/*/wandb/offline-run-*/run-*.wandb"))
    info, rows = read_wandb_history(run_file)
    info["history"] = rows
    info["log"] = result.stdout + result.stderr
    info["run_file"] = run_file
    return info


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        arm: train(f"llama3_debug_{arm}.toml", root / arm) for arm in ("baseline", "coda")
    }


def test_both_arms_train_with_matching_losses(runs):
    losses = {arm: [row[LOSS] for row in run["history"]] for arm, run in runs.items()}
    assert len(losses["baseline"]) == len(losses["coda"]) == STEPS
    diffs = [abs(a - b) for a, b in zip(losses["baseline"], losses["coda"])]
    assert max(diffs) < 1e-2, diffs
    assert losses["coda"][-1] < losses["coda"][0] - 0.2  # it learns
    assert "CODA backend: reference (PyTorch) because no CUDA device" in runs["coda"]["log"]


def test_wandb_offline_run_has_step_time_throughput_and_loss(runs):
    for run in runs.values():
        for row in run["history"]:
            assert row["time_metrics/end_to_end(s)"] > 0
            assert row["throughput(tps)"] > 0
            assert row[LOSS] > 0


def test_wandb_runs_named_by_arm_and_grouped_for_comparison(runs):
    assert runs["baseline"]["name"] == "baseline-debugmodel"
    assert runs["coda"]["name"] == "coda-bf16-debugmodel"
    assert runs["baseline"]["group"] == runs["coda"]["group"]
    assert runs["coda"]["config"]["coda"]["backend"] == "auto"
    assert runs["coda"]["config"]["model"]["converters"] == ["coda"]


def test_compare_runs_reports_speed_and_loss_parity(runs, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/compare_runs.py"), runs["baseline"]["run_file"],
         str(Path(runs["coda"]["run_file"]).parent), "--out", str(tmp_path), "--warmup", "2"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "comparison.json").read_text())
    (record,) = summary["records"]
    assert record["steps"] == STEPS - 2
    assert record["max_abs_diff"] < 1e-2
    assert all(arm["tok_s"] > 0 for arm in summary["speed"])
    assert summary["reference"] == "baseline-debugmodel"
    assert (tmp_path / "comparison.png").stat().st_size > 10_000
    assert "Loss parity over 6 aligned steps" in (tmp_path / "comparison.md").read_text()


def test_compare_runs_reads_the_trainers_console_logs(runs, tmp_path):
    spec = importlib.util.spec_from_file_location("compare_runs", REPO / "scripts/compare_runs.py")
    compare_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_runs)
    logs = []
    for arm in ("baseline", "coda"):
        logs.append(tmp_path / f"{arm}.log")
        logs[-1].write_text(runs[arm]["log"])
    from_wandb = compare_runs.main([runs["baseline"]["run_file"], runs["coda"]["run_file"],
                                    "--out", str(tmp_path / "wandb"), "--warmup", "2"])
    from_logs = compare_runs.main([str(logs[0]), str(logs[1]), "--out", str(tmp_path / "logs"),
                                   "--warmup", "2"])
    (record,) = from_logs["records"]
    assert record["steps"] == STEPS - 2
    # The console prints losses to 5 decimals.
    assert record["mean_abs_diff"] == pytest.approx(from_wandb["records"][0]["mean_abs_diff"], abs=1e-5)
    baseline, coda = from_logs["speed"]
    assert baseline["step_ms"] > 0 and coda["tok_s"] > 0
    assert coda["peak_gib"] >= 0
