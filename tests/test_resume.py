"""Resuming TorchTitan checkpoints, launched the way users launch training
(scripts/train.sh), on CPU in float32.

Each arm (baseline, CODA, and CODA with ``fp8 = "coda"`` under its two
kernel recipes: ``tensorwise`` scales from each tensor's current amax and has
no state of its own; ``delayed`` scales from amax histories, buffers of the
blocks that the checkpoint must carry) trains 6 steps with a full checkpoint
every 3 steps.
Fresh processes then resume from a run's step-3 checkpoint with the whole
training state (``--checkpoint.initial_load_path`` without
``initial_load_model_only``: model, optimizer, LR schedule, dataloader
position and step) and train steps 4-6. Loss and gradient norm are read from
TensorBoard, which keeps the float32 values exactly (the console rounds the
loss to 5 decimals).

* Same arm: losses and gradient norms of steps 4-6 are bit-identical to the
  uninterrupted run's.
* Across arms: a baseline checkpoint resumed by the converted model (and the
  reverse) starts step 4 from exactly the state the writing run had, so its
  losses differ from that run's only by the two arms' rounding (the fused ops
  sum in another order). Seen: within 4.8e-7 of the writing run (1 float32
  ulp at loss ~7.7), as close as the two arms trained from the same
  initialization stay over steps 1-6 (<= 9.5e-7, 1 ulp at loss ~8).
  CROSS_TOLERANCE = 1e-5 leaves a 10x margin over that, and is far below
  what a lost piece of state does: resuming without the optimizer state
  moves step 6 by 1.6e-2, without the LR schedule by 5.8e-2, without the
  dataloader position step 4 by 1.1.
* A delayed FP8 run resuming a bf16 run's checkpoint (no amax histories in
  it) starts them empty: its step 4 is a tensorwise run's from the same
  checkpoint, bit for bit.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util.tensor_util import make_ndarray

REPO = Path(__file__).parent.parent
STEPS = 6
INTERVAL = 3
ARMS = ("baseline", "coda")
FP8_ARMS = ("coda_fp8", "coda_fp8_delayed")
# Arms run from another arm's debug config: (config, extra arguments).
VARIANTS = {"coda_fp8": ("coda", ["--coda.fp8=coda"]),
            "coda_fp8_delayed": ("coda", ["--coda.fp8=coda", "--coda.fp8_recipe=delayed"])}
LOSS = "loss_metrics/global_avg_loss"
GRAD_NORM = "grad_norm"
CONSOLE = "console"
CROSS_TOLERANCE = 1e-5


def launch(arm: str, dump: Path, resume_from: Path | None) -> subprocess.Popen:
    config, extra = VARIANTS.get(arm, (arm, []))
    args = [
        "bash", str(REPO / "scripts/train.sh"), str(REPO / f"configs/llama3_debug_{config}.toml"),
        *extra,
        f"--job.dump_folder={dump}",
        f"--training.steps={STEPS}",
        "--training.seq_len=64",
        "--training.mixed_precision_param=float32",
        "--metrics.enable_tensorboard",
        "--checkpoint.enable",
        f"--checkpoint.interval={INTERVAL}",
        "--checkpoint.async_mode=disabled",
    ]
    if resume_from is not None:
        args += [f"--checkpoint.initial_load_path={resume_from / 'checkpoint' / f'step-{INTERVAL}'}",
                 "--checkpoint.no_initial_load_model_only"]
    # A CPU test on any machine: one process, the reference ops. One thread per
    # run, since the runs share the cores side by side.
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd="/")


def finish(process: subprocess.Popen, dump: Path) -> dict:
    """``{tag: {step: value}}`` for the loss and the gradient norm, from TensorBoard,
    and the console log under ``CONSOLE``."""
    log, _ = process.communicate(timeout=900)
    assert process.returncode == 0, log[-5000:]
    (event_file,) = (dump / "tb").glob("*/events.out.tfevents.*")
    run = {LOSS: {}, GRAD_NORM: {}, CONSOLE: log}
    for event in EventFileLoader(str(event_file)).Load():
        for value in event.summary.value:
            if value.tag in run:
                run[value.tag][event.step] = make_ndarray(value.tensor).item()
    return run


def run_side_by_side(jobs: dict) -> dict:
    """``{name: (arm, dump, resume_from)}`` -> ``{name: run}``. A run is mostly
    single-threaded start-up (imports, corpus), so runs side by side share the cores."""
    processes = {name: launch(*job) for name, job in jobs.items()}
    return {name: finish(processes[name], jobs[name][1]) for name in jobs}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def runs(root):
    """``runs["coda"]``: uninterrupted; ``runs["coda", "baseline"]``: coda resuming
    the baseline run's step-3 checkpoint."""
    runs = run_side_by_side({arm: (arm, root / arm, None) for arm in (*ARMS, *FP8_ARMS)})
    resumes = ([(arm, source) for arm in ARMS for source in ARMS]
               + [(a, a) for a in FP8_ARMS] + [(a, "coda") for a in FP8_ARMS])
    runs |= run_side_by_side({
        (arm, source): (arm, root / f"{arm}-from-{source}", root / source)
        for arm, source in resumes
    })
    return runs


@pytest.mark.parametrize("arm", (*ARMS, *FP8_ARMS))
def test_resumed_run_is_bit_identical_to_uninterrupted(runs, arm):
    full, resumed = runs[arm], runs[arm, arm]
    assert sorted(full[LOSS]) == list(range(1, STEPS + 1))
    assert sorted(resumed[LOSS]) == list(range(INTERVAL + 1, STEPS + 1))
    for tag in (LOSS, GRAD_NORM):
        assert resumed[tag] == {s: v for s, v in full[tag].items() if s > INTERVAL}, tag
    if arm in FP8_ARMS:  # the FP8 recipe ran: its losses are not the bf16 run's
        assert full[LOSS] != runs["coda"][LOSS]
    if arm == "coda_fp8_delayed":  # step 1 scales as tensorwise, then from the history
        assert full[LOSS][1] == runs["coda_fp8"][LOSS][1]
        assert full[LOSS][STEPS] != runs["coda_fp8"][LOSS][STEPS]


@pytest.mark.parametrize("arm, source", [("coda", "baseline"), ("baseline", "coda")])
def test_checkpoint_resumes_across_arms(runs, arm, source):
    resumed, writer = runs[arm, source][LOSS], runs[source][LOSS]
    assert sorted(resumed) == list(range(INTERVAL + 1, STEPS + 1))
    diffs = {step: abs(loss - writer[step]) for step, loss in resumed.items()}
    assert max(diffs.values()) < CROSS_TOLERANCE, diffs


def test_a_delayed_run_resumes_a_checkpoint_without_histories_with_empty_ones(runs):
    """A bf16 run's checkpoint holds no amax histories. A delayed run resumes it
    with empty ones, saying so once: its first resumed step scales tensorwise,
    bit-identical to a tensorwise run resuming the same checkpoint, and the next
    from the history that step recorded."""
    delayed, tensorwise = runs["coda_fp8_delayed", "coda"], runs["coda_fp8", "coda"]
    warning = "holds no FP8 amax histories"
    assert delayed[CONSOLE].count(warning) == 1 and warning not in tensorwise[CONSOLE]
    assert sorted(delayed[LOSS]) == list(range(INTERVAL + 1, STEPS + 1))
    assert delayed[LOSS][INTERVAL + 1] == tensorwise[LOSS][INTERVAL + 1]
    assert delayed[LOSS][STEPS] != tensorwise[LOSS][STEPS]
