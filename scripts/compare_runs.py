"""Compare two training runs: speed and loss parity, as a table and a plot.

  python scripts/compare_runs.py RUN_A RUN_B [--out DIR] [--warmup 20]
         [--step-bench benchmarks/results/step_1b_h200.json]

A run is a wandb run (a ``run-*.wandb`` file, its ``offline-run-*`` directory,
or a folder holding either, such as a TorchTitan dump folder), a TorchTitan
TensorBoard log folder (``[metrics] enable_tensorboard``), or the trainer's
console log saved to a file (step times then come from the log timestamps, so
log every step, and peak memory is TorchTitan's max reserved). RUN_A is the
reference arm (the baseline), RUN_B the candidate. Writes to DIR:

  comparison.md    median step time, tokens/s, MFU, peak memory, speedup,
                   and loss parity (mean / max |loss_B - loss_A| over the
                   aligned steps after the warm-up)
  comparison.png   loss curves and step times of both arms
  comparison.json  the same numbers; with --step-bench (scripts/bench_step.py
                   output) also the Liger peer arm's tokens/s and peak memory
"""

import argparse
import json
import re
import statistics
from datetime import datetime
from pathlib import Path

LOSS = "loss_metrics/global_avg_loss"
STEP_TIME = "time_metrics/end_to_end(s)"
TPS = "throughput(tps)"
MFU = "mfu(%)"
PEAK = "memory/max_active(GiB)"
PEAK_RESERVED = "memory/max_reserved(GiB)"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOG_LINE = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*step:\s*(?P<step>\d+)\s+"
    r"loss:\s*(?P<loss>[-\d.]+).*memory:\s*(?P<mem>[\d.]+)GiB.*tps:\s*(?P<tps>[\d,]+)"
    r".*mfu:\s*(?P<mfu>[\d.]+)%")


def _find(path: Path, pattern: str) -> list[Path]:
    return sorted(path.rglob(pattern)) if path.is_dir() else []


def load_log(path: Path) -> dict[int, dict]:
    """{step: {metric: value}} from TorchTitan's console log lines."""
    steps: dict[int, dict] = {}
    last = None
    for line in path.read_text(errors="replace").splitlines():
        match = _LOG_LINE.search(_ANSI.sub("", line))
        if not match:
            continue
        step = int(match["step"])
        time = datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S,%f")
        row = {LOSS: float(match["loss"]), TPS: float(match["tps"].replace(",", "")),
               MFU: float(match["mfu"]), PEAK_RESERVED: float(match["mem"])}
        if last is not None and step > last[0]:
            row[STEP_TIME] = (time - last[1]).total_seconds() / (step - last[0])
        steps[step] = row
        last = (step, time)
    return steps


def load_run(path: str) -> tuple[str, dict[int, dict]]:
    """(run name, {step: {metric: value}}) of a wandb, TensorBoard or console-log run."""
    p = Path(path)
    if p.is_file() and p.suffix != ".wandb":
        steps = load_log(p)
        if not steps:
            raise ValueError(f"{path}: no TorchTitan step lines (step: N  loss: ... mfu: ...%)")
        return p.stem, steps
    wandb_files = [p] if p.suffix == ".wandb" else _find(p, "run-*.wandb")
    if wandb_files:
        from coda_titan.wandb_run import read_wandb_history

        if len(wandb_files) > 1:
            raise ValueError(f"{path} holds {len(wandb_files)} wandb runs; pass one of them")
        info, rows = read_wandb_history(str(wandb_files[0]))
        return info.get("name") or p.name, {int(row["_step"]): row for row in rows if "_step" in row}
    event_files = _find(p, "events.out.tfevents.*")
    if event_files:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        steps: dict[int, dict] = {}
        for event_file in event_files:
            acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                for event in acc.Scalars(tag):
                    steps.setdefault(event.step, {})[tag] = event.value
        return p.name, steps
    raise FileNotFoundError(f"no wandb run file or TensorBoard events under {path}")


def summarize(steps: dict[int, dict], warmup: int) -> dict:
    after = [row for step, row in sorted(steps.items()) if step > warmup]

    def median(key):
        values = [row[key] for row in after if key in row]
        return statistics.median(values) if values else float("nan")

    peak_key = PEAK if any(PEAK in row for row in steps.values()) else PEAK_RESERVED
    peaks = [row[peak_key] for row in steps.values() if peak_key in row]
    return dict(steps=max(steps), step_ms=median(STEP_TIME) * 1e3, tok_s=median(TPS),
                mfu=median(MFU), peak_gib=max(peaks) if peaks else float("nan"),
                peak_kind="max active" if peak_key == PEAK else "max reserved")


def loss_parity(a: dict[int, dict], b: dict[int, dict], warmup: int) -> dict:
    aligned = sorted(s for s in a.keys() & b.keys() if s > warmup and LOSS in a[s] and LOSS in b[s])
    if not aligned:
        raise ValueError(f"the runs share no logged loss after step {warmup}")
    diffs = [abs(b[s][LOSS] - a[s][LOSS]) for s in aligned]
    return dict(aligned_steps=len(aligned), loss_mean_abs_diff=statistics.fmean(diffs),
                loss_max_abs_diff=max(diffs), final_loss_a=a[aligned[-1]][LOSS],
                final_loss_b=b[aligned[-1]][LOSS])


def plot(name_a, a, name_b, b, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, steps in ((name_a, a), (name_b, b)):
        xs = sorted(s for s in steps if LOSS in steps[s])
        ax_loss.plot(xs, [steps[s][LOSS] for s in xs], label=name, linewidth=1)
        xs = sorted(s for s in steps if STEP_TIME in steps[s])
        ax_time.plot(xs, [steps[s][STEP_TIME] * 1e3 for s in xs], label=name, linewidth=1)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_time.set(xlabel="step", ylabel="ms / step", title="step time")
    ax_time.set_yscale("log")
    for ax in (ax_loss, ax_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--out", default=".")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of medians and parity")
    parser.add_argument("--step-bench", help="scripts/bench_step.py JSON with a liger arm")
    args = parser.parse_args(argv)
    name_a, a = load_run(args.run_a)
    name_b, b = load_run(args.run_b)
    sa, sb = summarize(a, args.warmup), summarize(b, args.warmup)
    parity = loss_parity(a, b, args.warmup)
    result = dict(
        run_a=name_a, run_b=name_b, steps=min(sa["steps"], sb["steps"]), warmup=args.warmup,
        baseline_tok_s=sa["tok_s"], coda_tok_s=sb["tok_s"], speedup=sb["tok_s"] / sa["tok_s"],
        baseline_step_ms=sa["step_ms"], coda_step_ms=sb["step_ms"],
        baseline_mfu=sa["mfu"], coda_mfu=sb["mfu"],
        baseline_peak_gib=sa["peak_gib"], coda_peak_gib=sb["peak_gib"], **parity,
    )
    if args.step_bench:
        bench = json.loads(Path(args.step_bench).read_text())
        liger = next(r for r in bench["records"] if r["arm"] == "liger")
        result.update(liger_tok_s=liger["tok_s"], liger_peak_gib=liger["peak_gib"],
                      liger_source=args.step_bench)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result, indent=1))
    plot(name_a, a, name_b, b, out / "comparison.png")
    rows = [("median step time (ms)", sa["step_ms"], sb["step_ms"]),
            ("median tokens/s", sa["tok_s"], sb["tok_s"]),
            ("median MFU (%)", sa["mfu"], sb["mfu"]),
            (f"peak memory, {sa['peak_kind']} / {sb['peak_kind']} (GiB)", sa["peak_gib"],
             sb["peak_gib"])]
    lines = [f"| | {name_a} | {name_b} |", "|---|---|---|"]
    lines += [f"| {label} | {va:.2f} | {vb:.2f} |" for label, va, vb in rows]
    lines += ["", f"Speedup ({name_b} over {name_a}, tokens/s): **{result['speedup']:.3f}x**", "",
              f"Loss parity over {parity['aligned_steps']} aligned steps after step {args.warmup}: "
              f"mean |Δloss| {parity['loss_mean_abs_diff']:.4f}, max {parity['loss_max_abs_diff']:.4f} "
              f"(final {parity['final_loss_a']:.4f} vs {parity['final_loss_b']:.4f})"]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
