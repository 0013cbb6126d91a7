"""Noise-aware A/B of training runs: speed and loss parity as a table, JSON and a plot.

  python scripts/compare_runs.py REF CAND [CAND ...] [--noise REF_REPEAT]
         [--out outputs/compare] [--warmup N] [--window 100]
         [--noise-ratio 1.5] [--max-window-diff 0.03]
         [--step-bench benchmarks/results/step_1b_h100.json]

REF is the reference arm (the baseline), each CAND a candidate arm, and
REF_REPEAT a second run of the reference config with the same seed: how far it
drifts from REF is the noise floor the candidates are judged against.

A run is a file or a folder. A file is a wandb run (``run-*.wandb``),
TensorBoard events (``events.out.tfevents.*``) or TorchTitan's console log (any
other file; step times then come from the log timestamps, so log every step,
and peak memory is TorchTitan's max reserved). A folder, such as a TorchTitan
dump folder or a wandb ``offline-run-*`` directory, is searched for wandb run
files, then TensorBoard events, then ``*.log`` console logs; the newest file of
the first kind found is used, and the script prints which.

Loss parity: Δloss = loss(arm) - loss(REF) at every step both runs logged
after the warm-up. A candidate is "within noise" when
  - its mean |Δloss| is at most --noise-ratio (1.5) times the noise floor's
    (the repeat's mean |Δloss|; skipped without --noise),
  - every --window (100)-step window mean of Δloss, the windows sliding over
    the logged steps, is within ± --max-window-diff (0.03) nats: a sustained
    bias that per-step noise would hide,
  - none of its logged losses is NaN or inf;
otherwise its verdict is "FLAGGED: " and what failed. Max |Δloss| is reported
but not judged: single steps spike.

The warm-up (left out of parity and speed medians) defaults to 20 steps, or a
fifth of the shortest run if that is less; the window shrinks to the compared
span when the runs are shorter than it. Both adaptations are printed.

Writes to --out (default: outputs/compare under the repository, git-ignored):
  comparison.md    runs read, medians of step time, tokens/s and MFU (where logged), peak
                   memory, speedup over REF, and the parity table with verdicts
  comparison.png   loss curves; Δloss against REF with the noise band and the
                   window limits; step times
  comparison.json  reference, warmup, window, criteria, notes; `noise` and
                   `records` (one per candidate) with exactly the keys arm,
                   steps (compared steps), mean_abs_diff, max_abs_diff,
                   max_window_mean_diff; `verdicts`; `speed` (one per run);
                   with --step-bench (scripts/bench_step.py output) `liger`,
                   the Liger peer arm's tokens/s and peak memory
  losses.json      every run's logged losses, warm-up included: one record per
                   run (reference, repeat, candidates) with arm, steps, loss
"""

import argparse
import itertools
import json
import math
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOSS = "loss_metrics/global_avg_loss"
STEP_TIME = "time_metrics/end_to_end(s)"
TPS = "throughput(tps)"
MFU = "mfu(%)"
PEAK = "memory/max_active(GiB)"
PEAK_RESERVED = "memory/max_reserved(GiB)"
DEFAULT_WARMUP = 20
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOG_LINE = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*step:\s*(?P<step>\d+)\s+"
    r"loss:\s*(?P<loss>-?(?:[\d.]+|nan|inf))\s.*memory:\s*(?P<mem>[\d.]+)GiB"
    # CPU runs print no MFU (coda_titan leaves it out there).
    r".*tps:\s*(?P<tps>[\d,]+)(?:.*mfu:\s*(?P<mfu>[\d.]+)%)?")


class RunError(Exception):
    """A problem with the arguments or the runs, reported in one line (exit code 2)."""


@dataclass
class Run:
    name: str
    source: Path
    steps: dict[int, dict]
    choice: str = ""  # how `source` was picked from a folder

    @cached_property
    def losses(self) -> dict[int, float]:
        return {step: row[LOSS] for step, row in self.steps.items() if LOSS in row}


def read_console_log(path: Path) -> tuple[None, dict[int, dict]]:
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
               PEAK_RESERVED: float(match["mem"])}
        if match["mfu"] is not None:
            row[MFU] = float(match["mfu"])
        if last is not None and step > last[0]:
            row[STEP_TIME] = (time - last[1]).total_seconds() / (step - last[0])
        steps[step] = row
        last = (step, time)
    return None, steps


def read_wandb(path: Path) -> tuple[str | None, dict[int, dict]]:
    from coda_titan.wandb_run import read_wandb_history

    info, rows = read_wandb_history(str(path))
    return info.get("name"), {int(row["_step"]): row for row in rows if "_step" in row}


def read_tensorboard(path: Path) -> tuple[None, dict[int, dict]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    steps: dict[int, dict] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            steps.setdefault(event.step, {})[tag] = event.value
    return None, steps


# In order of preference when a folder holds several kinds.
KINDS = (("wandb run", "run-*.wandb", read_wandb),
         ("TensorBoard events file", "events.out.tfevents.*", read_tensorboard),
         ("console log", "*.log", read_console_log))


def locate(path: Path):
    """(file, reader, how it was picked) of the run at `path`, a file or a folder."""
    if path.is_file():
        reader = next((read for _, pattern, read in KINDS if path.match(pattern)), read_console_log)
        return path, reader, ""
    if not path.is_dir():
        raise RunError(f"{path}: no such file or folder")
    for kind, pattern, reader in KINDS:
        files = sorted((f for f in path.rglob(pattern) if f.is_file()),
                       key=lambda f: (f.stat().st_mtime, str(f)))
        if len(files) == 1:
            return files[0], reader, f"the {kind} in {path}"
        if files:
            return files[-1], reader, f"the latest of {len(files)} {kind}s in {path}"
    raise RunError(f"{path}: no wandb run file (run-*.wandb), TensorBoard events or *.log "
                   "console log in this folder")


def load_run(path: str) -> Run:
    given = Path(path)
    file, reader, choice = locate(given)
    try:
        name, steps = reader(file)
    except (OSError, ValueError) as error:
        raise RunError(f"{file}: {error}") from error
    if not any(LOSS in row for row in steps.values()):
        raise RunError(f"{file}: no logged loss (neither {LOSS} nor TorchTitan's "
                       "'step: N  loss: ...  memory: ...  tps: ...' console lines)")
    return Run(name or (given.name if given.is_dir() else given.stem), file, steps, choice)


def name_uniquely(runs: list[Run]) -> None:
    """A repeat of the reference usually carries its name; tables need distinct ones."""
    seen = Counter()
    for run in runs:
        seen[run.name] += 1
        if seen[run.name] > 1:
            run.name = f"{run.name} #{seen[run.name]}"


def choose_warmup(requested: int | None, runs: list[Run]) -> tuple[int, str]:
    if requested is not None:
        return requested, ""
    shortest = min(max(run.steps) for run in runs)
    warmup = min(DEFAULT_WARMUP, shortest // 5)
    if warmup == DEFAULT_WARMUP:
        return warmup, ""
    return warmup, (f"Warm-up {warmup} steps: the default {DEFAULT_WARMUP} is cut to a fifth of "
                    f"the shortest run ({shortest} steps); --warmup sets it.")


def loss_diffs(reference: Run, other: Run, warmup: int) -> dict[int, float]:
    """{step: loss(other) - loss(reference)} over the steps both logged after the warm-up."""
    shared = sorted(s for s in reference.losses.keys() & other.losses.keys() if s > warmup)
    if not shared:
        raise RunError(
            f"{other.name} (steps {min(other.losses)}-{max(other.losses)}) and {reference.name} "
            f"(steps {min(reference.losses)}-{max(reference.losses)}) share no logged loss after "
            f"step {warmup}; lower --warmup")
    return {s: other.losses[s] - reference.losses[s] for s in shared}


def choose_window(requested: int, all_diffs: list[dict[int, float]]) -> tuple[int, str]:
    span = min(max(diffs) - min(diffs) + 1 for diffs in all_diffs)
    if span >= requested:
        return requested, ""
    return span, (f"Window {span} steps: the compared steps span only {span}, fewer than "
                  f"--window {requested}.")


def window_means(diffs: dict[int, float], width: int) -> list[tuple[int, float]]:
    """(first step, mean) of every window of `width` steps that starts at a logged
    step and ends inside the logged span; the mean is over the steps logged in it."""
    steps = sorted(diffs)
    prefix = list(itertools.accumulate((diffs[s] for s in steps), initial=0.0))
    means, end = [], 0
    for begin, start in enumerate(steps):
        if start + width - 1 > steps[-1]:
            break
        while end < len(steps) and steps[end] < start + width:
            end += 1
        means.append((start, (prefix[end] - prefix[begin]) / (end - begin)))
    return means


def largest(values):
    """max(), except that NaN wins (plain max() keeps or drops NaN depending on order)."""
    return max(values, key=lambda v: (math.isnan(v), v))


@dataclass
class Arm:
    """A run compared with the reference over the steps in `diffs`."""
    run: Run
    diffs: dict[int, float]
    width: int
    windows: list[tuple[int, float]] = field(init=False)

    def __post_init__(self):
        self.windows = window_means(self.diffs, self.width)

    @property
    def name(self) -> str:
        return self.run.name

    def worst_window(self) -> tuple[int, float]:
        return max(self.windows, key=lambda w: (math.isnan(w[1]), abs(w[1])))

    def record(self) -> dict:
        abs_diffs = [abs(d) for d in self.diffs.values()]
        return dict(arm=self.name, steps=len(self.diffs), mean_abs_diff=statistics.fmean(abs_diffs),
                    max_abs_diff=largest(abs_diffs),
                    max_window_mean_diff=abs(self.worst_window()[1]))


def verdict(arm: Arm, noise: Arm | None, noise_ratio: float, max_window_diff: float) -> dict:
    problems = []
    bad = sorted(s for s, loss in arm.run.losses.items() if not math.isfinite(loss))
    if bad:
        problems.append(f"NaN/inf loss at {len(bad)} steps from step {bad[0]}")
    mean_abs = arm.record()["mean_abs_diff"]
    if noise is not None:
        floor = noise.record()["mean_abs_diff"]
        # Written as "not within" so that a NaN fails.
        if not mean_abs <= noise_ratio * floor:
            problems.append(f"mean |Δloss| {mean_abs:.4f} > {noise_ratio:g} x the noise floor's "
                            f"{floor:.4f}")
    start, mean = arm.worst_window()
    if not abs(mean) <= max_window_diff:
        problems.append(f"{arm.width}-step window mean Δloss {mean:+.4f} at steps "
                        f"{start}-{start + arm.width - 1} beyond ±{max_window_diff:g}")
    if problems:
        return dict(arm=arm.name, flagged=True, verdict="FLAGGED: " + "; ".join(problems))
    passed = ("within noise" if noise
              else "within the window limit (no --noise repeat: mean |Δloss| not judged)")
    return dict(arm=arm.name, flagged=False, verdict=passed)


def speed(run: Run, warmup: int) -> dict:
    after = [row for step, row in sorted(run.steps.items()) if step > warmup]

    def median(key):
        values = [row[key] for row in after if key in row]
        return statistics.median(values) if values else math.nan

    peak_key = PEAK if any(PEAK in row for row in run.steps.values()) else PEAK_RESERVED
    peaks = [row[peak_key] for row in run.steps.values() if peak_key in row]
    return dict(arm=run.name, last_step=max(run.steps), step_ms=median(STEP_TIME) * 1e3,
                tok_s=median(TPS), mfu=median(MFU), peak_gib=max(peaks) if peaks else math.nan,
                peak_kind="max active" if peak_key == PEAK else "max reserved")


def liger_record(path: str) -> dict:
    try:
        bench = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise RunError(f"--step-bench {path}: {error}") from error
    liger = next((r for r in bench.get("records", []) if r.get("arm") == "liger"), None)
    if liger is None:
        raise RunError(f"--step-bench {path}: no record with arm 'liger' "
                       "(scripts/bench_step.py output)")
    return dict(tok_s=liger["tok_s"], peak_gib=liger["peak_gib"], source=path)


def figure(reference: Run, noise: Arm | None, candidates: list[Arm], max_window_diff: float):
    """Loss curves; Δloss against the reference with the noise band; step times."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 4.5), layout="tight")
    ax_loss, ax_diff, ax_time = fig.subplots(1, 3)
    curves = [(reference, dict(color="black", label=f"{reference.name} (reference)"))]
    if noise:
        curves.append((noise.run, dict(color="grey", linestyle="--",
                                       label=f"{noise.name} (repeat)")))
    curves += [(arm.run, dict(label=arm.name)) for arm in candidates]
    for run, style in curves:
        xs = sorted(run.losses)
        ax_loss.plot(xs, [run.losses[s] for s in xs], linewidth=1, **style)
        xs = sorted(s for s in run.steps if STEP_TIME in run.steps[s])
        ax_time.plot(xs, [run.steps[s][STEP_TIME] * 1e3 for s in xs], linewidth=1, **style)

    def centred(windows, width):
        return [start + (width - 1) / 2 for start, _ in windows], [mean for _, mean in windows]

    if noise:
        xs, band = centred(window_means({s: abs(d) for s, d in noise.diffs.items()}, noise.width),
                           noise.width)
        ax_diff.fill_between(xs, [-b for b in band], band, color="grey", alpha=0.35,
                             label=f"noise band: {noise.name}'s {noise.width}-step mean |Δloss|")
        ax_diff.plot(*centred(noise.windows, noise.width), color="grey", linewidth=1.5,
                     label=f"{noise.name} (repeat), {noise.width}-step mean")
    for arm in candidates:
        xs = sorted(arm.diffs)
        (per_step,) = ax_diff.plot(xs, [arm.diffs[s] for s in xs], linewidth=0.5, alpha=0.3)
        ax_diff.plot(*centred(arm.windows, arm.width), color=per_step.get_color(), linewidth=2,
                     label=f"{arm.name}, {arm.width}-step mean")
    ax_diff.axhline(0, color="black", linewidth=0.5)
    for sign in (1, -1):
        ax_diff.axhline(sign * max_window_diff, color="red", linestyle=":", linewidth=1,
                        label=f"window limit ±{max_window_diff:g}" if sign > 0 else None)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_diff.set(xlabel="step", ylabel="loss - reference loss (nats)",
                title="loss difference to the reference")
    ax_time.set(xlabel="step", ylabel="ms / step", title="step time")
    ax_time.set_yscale("log")
    for ax in (ax_loss, ax_diff, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def speed_table(records: list[dict], reference: str) -> list[str]:
    rows = [("median step time (ms)", lambda r: f"{r['step_ms']:.2f}"),
            ("median tokens/s", lambda r: f"{r['tok_s']:.2f}"),
            ("median MFU (%)", lambda r: f"{r['mfu']:.2f}"),
            ("peak memory (GiB)", lambda r: f"{r['peak_gib']:.2f} ({r['peak_kind']})"),
            (f"speedup over {reference} (tokens/s)", lambda r: f"**{r['speedup']:.3f}x**")]
    if all(math.isnan(r["mfu"]) for r in records):  # CPU runs log no MFU
        del rows[2]
    lines = ["| | " + " | ".join(r["arm"] for r in records) + " |",
             "|---" * (len(records) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cell(r) for r in records) + " |" for label, cell in rows]
    return lines


def parity_table(result: dict) -> list[str]:
    def row(record, label, text):
        cells = [label, record["steps"], f"{record['mean_abs_diff']:.4f}",
                 f"{record['max_abs_diff']:.4f}", f"{record['max_window_mean_diff']:.4f}", text]
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    noise = result["noise"]
    lines = [f"| arm | steps | mean abs Δloss | max abs Δloss | largest {result['window']}-step "
             "window mean Δloss | verdict |", "|---|---|---|---|---|---|"]
    if noise:
        lines.append(row(noise, f"{noise['arm']} (repeat)", "noise floor"))
    lines += [row(record, record["arm"], v["verdict"])
              for record, v in zip(result["records"], result["verdicts"])]
    return lines


def how_to_read(result: dict) -> list[str]:
    noise, ratio = result["noise"], result["criteria"]["noise_ratio"]
    limit = result["criteria"]["max_window_diff"]
    mean_rule = (f"its mean |Δloss| is at most {ratio:g} x the noise floor's ({ratio:g} x "
                 f"{noise['mean_abs_diff']:.4f} = {ratio * noise['mean_abs_diff']:.4f}; "
                 "--noise-ratio)" if noise else
                 f"its mean |Δloss| is at most {ratio:g} x the noise floor's; not judged here: "
                 "no --noise repeat of the reference was given")
    return [f"Δloss = loss(arm) - loss({result['reference']}) at each step both logged after the "
            "warm-up. The noise floor is how far a repeat of the reference (same config and seed) "
            "drifts from it. A candidate is within noise when", "",
            f"- {mean_rule},",
            f"- every {result['window']}-step window mean of Δloss (sliding) is within "
            f"±{limit:g} nats (--max-window-diff), which catches a sustained bias that per-step "
            "noise hides,",
            "- and none of its losses is NaN or inf.", "",
            "Max |Δloss| is reported but not judged: single steps spike."]


def run_lines(entries: list[dict]) -> list[str]:
    return [f"- {run['role']} `{run['arm']}`: {run['source']}"
            + (f" ({run['picked']})" if run["picked"] else "") for run in entries]


def report(result: dict) -> list[str]:
    """comparison.md, after its list of runs."""
    compared = sorted({r["steps"] for r in [*result["records"], *filter(None, [result["noise"]])]})
    count = str(compared[0]) if len(compared) == 1 else f"{compared[0]}-{compared[-1]}"
    notes = result["notes"]
    return [*notes, *([""] if notes else []), "## Speed (medians after the warm-up)", "",
            *speed_table(result["speed"], result["reference"]), "",
            f"## Loss parity over {count} aligned steps after step {result['warmup']}", "",
            *parity_table(result), "", *how_to_read(result)]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", metavar="REF", help="the reference run (the baseline)")
    parser.add_argument("candidates", metavar="CAND", nargs="+", help="candidate runs")
    parser.add_argument("--noise", metavar="REF_REPEAT",
                        help="a repeat run of the reference config and seed: the noise floor")
    parser.add_argument("--out", metavar="DIR", default=str(REPO / "outputs" / "compare"),
                        help="where the results go (default: outputs/compare in the repository)")
    parser.add_argument("--warmup", metavar="N", type=int,
                        help=f"steps left out of medians and parity (default {DEFAULT_WARMUP}, "
                             "or a fifth of the shortest run)")
    parser.add_argument("--window", metavar="N", type=int, default=100,
                        help="steps per window of the window-mean criterion (default 100, or "
                             "the compared span if shorter)")
    parser.add_argument("--noise-ratio", metavar="X", type=float, default=1.5,
                        help="largest candidate mean |Δloss| as a multiple of the noise floor's "
                             "(default 1.5)")
    parser.add_argument("--max-window-diff", metavar="NATS", type=float, default=0.03,
                        help="largest |window mean Δloss| (default 0.03)")
    parser.add_argument("--step-bench", metavar="JSON",
                        help="scripts/bench_step.py output with a liger arm")
    args = parser.parse_intermixed_args(argv)
    if args.window < 1:
        parser.error("--window must be at least 1")
    return args


def load_runs(args) -> tuple[list[Run], list[dict]]:
    """The reference, the noise repeat if any and the candidates, and for each
    its role, name, the file read and how that file was picked."""
    paths = [("reference", args.reference), *([("noise repeat", args.noise)] if args.noise else []),
             *(("candidate", path) for path in args.candidates)]
    runs = [load_run(path) for _, path in paths]
    name_uniquely(runs)
    entries = [dict(role=role, arm=run.name, source=str(run.source), picked=run.choice)
               for (role, _), run in zip(paths, runs)]
    return runs, entries


def compare(args, runs: list[Run], entries: list[dict]) -> tuple[dict, Arm | None, list[Arm]]:
    """The result record, and the noise and candidate arms for the plot."""
    reference, others = runs[0], runs[1:]
    warmup, warmup_note = choose_warmup(args.warmup, runs)
    all_diffs = [loss_diffs(reference, run, warmup) for run in others]
    width, window_note = choose_window(args.window, all_diffs)
    arms = [Arm(run, diffs, width) for run, diffs in zip(others, all_diffs)]
    noise, candidates = (arms[0], arms[1:]) if args.noise else (None, arms)
    speeds = [speed(run, warmup) for run in runs]
    for record in speeds:
        record["speedup"] = record["tok_s"] / speeds[0]["tok_s"]
    result = dict(
        reference=reference.name,
        runs=entries,
        warmup=warmup, window=width,
        criteria=dict(noise_ratio=args.noise_ratio, max_window_diff=args.max_window_diff),
        notes=[note for note in (warmup_note, window_note) if note],
        noise=noise.record() if noise else None,
        records=[arm.record() for arm in candidates],
        verdicts=[verdict(arm, noise, args.noise_ratio, args.max_window_diff)
                  for arm in candidates],
        speed=speeds)
    if args.step_bench:
        result["liger"] = liger_record(args.step_bench)
    return result, noise, candidates


def loss_records(runs: list[Run]) -> list[dict]:
    """Each run's per-step losses, for the record beside the summary."""
    return [dict(arm=run.name, steps=sorted(run.losses),
                 loss=[loss for _, loss in sorted(run.losses.items())]) for run in runs]


def json_safe(value):
    """``value`` with NaN and infinities as null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def main(argv=None) -> dict:
    args = parse_args(argv)
    runs, entries = load_runs(args)
    print("\n".join(run_lines(entries)))
    result, noise, candidates = compare(args, runs, entries)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = report(result)
    (out / "comparison.json").write_text(json.dumps(json_safe(result), indent=1))
    (out / "comparison.md").write_text(
        "\n".join(["## Runs", "", *run_lines(entries), "", *lines]) + "\n")
    (out / "losses.json").write_text(json.dumps(json_safe(loss_records(runs))))
    fig = figure(runs[0], noise, candidates, args.max_window_diff)
    fig.savefig(out / "comparison.png", dpi=120)
    print("\n" + "\n".join(lines))
    print(f"\nwrote comparison.md, comparison.json, comparison.png, losses.json to {out}")
    return result


def cli() -> int:
    try:
        main()
    except RunError as error:
        print(f"compare_runs.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
