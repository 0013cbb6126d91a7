"""Training-step benchmark: TorchTitan's LLaMA-3 model, several arms in one process.

  baseline  TorchTitan's model, each block under torch.compile(fullgraph=True),
            bf16 logits + fp32 cross-entropy (TorchTitan's loss), compiled
  float8    the baseline with TorchTitan's float8 converter applied as
            configs/llama3_1b_baseline_fp8.toml applies it (torchao, tensorwise,
            every linear but ``output``)
  liger     the same model with Liger-Kernel's RMSNorm, SiLU-mul and fused
            linear cross-entropy swapped in, eager (Liger's RMSNorm does not
            trace under per-block compile), as a TorchTitan user would do today
  coda      the model converted by coda_titan (all fusions, cutedsl backend,
            ``[coda] attention`` from --coda-attention: ``auto`` takes flash4 on
            the packed QKV on an SM90 GPU with flash-attn-4 installed), each block
            under torch.compile(fullgraph=True)
  coda_refold, coda_keep
            coda with the folded weights built by every pass that reads them
            (forward, recompute, dgrad), or kept from the forward to the dgrad
            whatever the AC mode: what the converter's choice costs or saves
  coda_fp8  coda with ``[coda] fp8 = "coda"``: every GEMM of the fused block ops
            in FP8 (tensorwise; the LM head bf16), as configs/llama3_*_coda_fp8.toml
  coda_fp8_delayed
            coda_fp8 with ``fp8_recipe = "delayed"`` (amax histories, stepped after
            each optimizer step as the converter's hook does)
  coda@NAME=TM,TN,CM,CN,PP[/NAME=...]
            the coda arm with GEMM tile configs replaced for this arm only
            (``TILES[NAME]``: tile M/N, cluster M/N, pingpong 0/1), to choose
            tiles inside the training step rather than in isolation

Activation checkpointing (--ac) is TorchTitan's own ``apply_ac``: ``full``,
``selective`` (its default: every second block fully checkpointed) or
``selective-op`` (per op: TorchTitan's save list plus the ops CODA adds to it).

Each step is forward + backward + gradient clipping + fused AdamW, bf16
parameters, random tokens, with Python's garbage collector off as in
TorchTitan's training loop. Reports the median step time, tokens/s, peak memory
and a profiler breakdown of one step by kernel class (GEMM, attention, other);
the step time the kernels leave idle (``gpu_idle_ms``: the median step less the
kernels' sum) is what the host's launches cost a host-bound step, and
--host-profile N lists the N kernels the GPU waits longest before (idle gaps
in the profiled step) and, per thread, the N Python lines the host spends most
time in over one step and the N functions it spends most time within (sampled
stacks, the backward's thread included), and the N operators with the most host
time of their own (torch.profiler, ``host_ops``), to find it. --peak-sites N records
one more step's allocations and lists the N call sites whose memory is live
at its peak (``peak_sites`` in the record). Each step is timed from
an idle GPU (the host syncs after each), or with --back-to-back queued behind
the one before, as TorchTitan's loop runs them: there a step's first launches
are hidden behind the previous step's GPU work. --processes N runs the
arms in N fresh processes, one after the other, and adds each arm's medians over
them (``summary``; a ratio is taken inside each process, then its median): a
host-bound step's GPU idle time moves between processes of one machine (8B FP8
in session 17: 1.068-1.120x float8 over four processes), so one process is one
draw. Writes benchmarks/results/step_<gpu>.{json,md}.

  python scripts/bench_step.py --flavor 1B --seq 8192 --batch 2
  python scripts/bench_step.py --flavor 8B --seq 4096 --batch 1 --ac full
  python scripts/bench_step.py --flavor 8B --seq 4096 --batch 1 --ac full --back-to-back
  python scripts/bench_step.py --arms baseline coda --coda-attention sdpa
  python scripts/bench_step.py --arms coda coda@dswiglu=128,128,2,1,1
  python scripts/bench_step.py --flavor 8B --seq 4096 --batch 1 --ac full --processes 3
"""

import argparse
import collections
import contextlib
import functools
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torchtitan.components.loss import cross_entropy_loss
from torchtitan.config.job_config import ActivationCheckpoint
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list
from torchtitan.models.llama3.model.model import Transformer
from torchtitan.tools.utils import set_default_dtype

from bench_results import write_results

from coda_titan.backend import ATTENTIONS
from coda_titan.config import Coda
from coda_titan.converter import convert_model, keeps_folded_weights
from coda_titan.layers import CodaTransformerBlock
from coda_titan.layers.delayed_scaling import DelayedScaling
from coda_titan.train_spec import build_coda_loss, coda_llama3_args

GEMM_MARKERS = ("gemm", "nvjet", "GemmMod", "xmma", "cublas", "cutlass_kernel_quackepilogue")
ATTENTION_MARKERS = ("flash", "fmha", "attention", "sdpa")


def build_model(flavor: str, seq: int) -> Transformer:
    with torch.device("meta"), set_default_dtype(torch.bfloat16):
        return Transformer(replace(coda_llama3_args[flavor], max_seq_len=seq))


def materialize(model: Transformer) -> Transformer:
    model.to_empty(device="cuda")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cuda"))
    return model


def wrap_blocks(model: Transformer, ac: str, compile: bool) -> None:
    """TorchTitan's activation checkpointing (``ac``: none, full, selective), then
    its per-block compile if asked (TorchTitan applies AC before compile too)."""
    if ac != "none":
        mode, _, option = ac.partition("-")
        apply_ac(model, ActivationCheckpoint(mode=mode, selective_ac_option=option or "2"),
                 model_compile_enabled=compile, op_sac_save_list=_op_sac_save_list)
    for name, block in list(model.layers.named_children()):
        if compile:
            block = torch.compile(block, fullgraph=True)
        model.layers.register_module(name, block)


def baseline_arm(flavor, seq, ac):
    model = materialize(build_model(flavor, seq))
    wrap_blocks(model, ac, compile=True)
    return model, torch.compile(cross_entropy_loss)


def float8_arm(flavor, seq, ac):
    """TorchTitan's own float8 converter, configured from the float8 baseline TOML."""
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims
    from torchtitan.protocols.model_converter import build_model_converters

    config = ConfigManager().parse_args(
        ["--job.config_file", "configs/llama3_1b_baseline_fp8.toml"])
    dims = ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    model = build_model(flavor, seq)
    build_model_converters(config, dims).convert(model)
    model = materialize(model)
    wrap_blocks(model, ac, compile=True)
    return model, torch.compile(cross_entropy_loss)


def liger_arm(flavor, seq, ac):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerRMSNorm
    from torchtitan.models.llama3.model.model import FeedForward

    model = materialize(build_model(flavor, seq))

    def to_liger_norm(norm):
        liger = LigerRMSNorm(norm.weight.shape[0], eps=norm.eps).to("cuda", torch.bfloat16)
        liger.weight = norm.weight
        return liger

    for block in model.layers.values():
        block.attention_norm = to_liger_norm(block.attention_norm)
        block.ffn_norm = to_liger_norm(block.ffn_norm)
        block.feed_forward.forward = (
            lambda x, ff=block.feed_forward: ff.w2(LigerSiLUMulFunction.apply(ff.w1(x), ff.w3(x)))
        )
        assert isinstance(block.feed_forward, FeedForward)
    wrap_blocks(model, ac, compile=False)
    model.norm = to_liger_norm(model.norm)
    output = model.output
    model.output = torch.nn.Identity()
    flce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def loss_fn(hidden, labels):
        return flce(output.weight, hidden.flatten(0, 1), labels.flatten())

    model.register_module("lm_head", output)  # keep its weight trained
    return model, loss_fn


def coda_arm(flavor, seq, ac, attention="auto", keep_weights=None, fp8="none",
             fp8_recipe="tensorwise"):
    """``keep_weights`` None: as the converter chooses. ``fp8 = "coda"``: the FP8
    kernels (``configs/llama3_*_coda_fp8.toml``) with ``fp8_recipe``."""
    model = build_model(flavor, seq)
    keep = keeps_folded_weights(ac.partition("-")[0], False) if keep_weights is None else keep_weights
    convert_model(model, Coda(backend="cutedsl", attention=attention, loss_chunk_tokens=8192,
                              fp8=fp8, fp8_recipe=fp8_recipe),
                  "cutedsl", keep_weights=keep)
    model = materialize(model)
    wrap_blocks(model, ac, compile=True)
    loss_config = SimpleNamespace(
        compile=SimpleNamespace(enable=True, components=["loss"], backend="inductor"))
    return model, build_coda_loss(loss_config)


ARMS = {"baseline": baseline_arm, "float8": float8_arm, "liger": liger_arm, "coda": coda_arm,
        "coda_refold": functools.partial(coda_arm, keep_weights=False),
        "coda_keep": functools.partial(coda_arm, keep_weights=True),
        "coda_fp8": functools.partial(coda_arm, fp8="coda"),
        "coda_fp8_delayed": functools.partial(coda_arm, fp8="coda", fp8_recipe="delayed")}


def classify(name: str) -> str:
    lowered = name.lower()
    if any(m.lower() in lowered for m in ATTENTION_MARKERS):
        return "attention"
    if any(m.lower() in lowered for m in GEMM_MARKERS):
        return "gemm"
    return "other"


@contextlib.contextmanager
def tiles_replaced(arm: str):
    """``coda@dswiglu=128,128,2,1,1/...``: those TILES entries replaced while the arm runs."""
    from coda_titan.kernels.cutedsl.gemm import TILES, _cfg

    overrides = {}
    for item in arm.partition("@")[2].split("/") if "@" in arm else []:
        name, _, values = item.partition("=")
        tile_m, tile_n, cluster_m, cluster_n, pingpong = (int(v) for v in values.split(","))
        overrides[name] = _cfg(tile_m, tile_n, cluster_m, cluster_n, bool(pingpong))
    saved = {name: dict(TILES[name]) for name in overrides}
    for name, cfg in overrides.items():
        TILES[name].update(cfg)  # in place: the ops hold these dicts
    try:
        yield
    finally:
        for name, cfg in saved.items():
            TILES[name].update(cfg)


def run_arm(arm, flavor, seq, batch, steps, warmup, ac="none", top_kernels=0,
            coda_attention="auto", host_top=0, back_to_back=False, peak_top=0):
    kind = arm.partition("@")[0]
    build = (functools.partial(ARMS[kind], attention=coda_attention) if kind.startswith("coda")
             else ARMS[kind])
    with tiles_replaced(arm):
        return measure(arm, build, flavor, seq, batch, steps, warmup, ac, top_kernels, host_top,
                       back_to_back, peak_top)


def host_profile(fn, top: int, interval_s: float = 2e-4) -> list[dict]:
    """Where the host spends one call of ``fn``: every thread's Python stack is
    sampled each ``interval_s``; for each thread that matters, the ``top`` lines
    that are innermost most often (``own``) and the ``top`` functions on the stack
    most often (``within``: a function's time including its callees') are
    returned, with their share of that thread's samples and the time of the
    call they stand for. The threads: ``main`` (the caller) and
    ``native``, those not started by ``threading``, where the autograd engine
    runs the backward's Python (a profiler of the calling thread, cProfile,
    misses all of it); ``threading``'s own (compile workers) are left out. The
    GPU work is asynchronous, so it is not in these times."""
    caller, done = threading.get_ident(), threading.Event()
    own, within, samples = collections.Counter(), collections.Counter(), collections.Counter()
    # The caller's frames from here up are on every sample: not ranked.
    here, names = sys._getframe(), {}

    def name(code):
        if code not in names:  # formatted once per function: the sampler holds the GIL
            names[code] = (f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno}"
                           f"({code.co_name})")
        return names[code]

    def sample():
        me = threading.get_ident()
        while not done.is_set():
            samples["rounds"] += 1
            started = {t.ident for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me or (ident != caller and ident in started):
                    continue
                thread = "main" if ident == caller else "native"
                samples[thread] += 1
                code = frame.f_code
                own[thread, f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"
                            f"({code.co_name})"] += 1
                for function in {name(f.f_code) for f in _stack(frame, here)}:
                    within[thread, function] += 1
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(interval_s / 2)  # let the sampler in between bytecodes
    start = time.perf_counter()
    sampler.start()
    try:
        fn()
    finally:
        wall_ms = (time.perf_counter() - start) * 1e3
        done.set()
        sampler.join()
        sys.setswitchinterval(switch)
    # A thread's share is of its own samples; its time, of the whole call's (the
    # native thread has a Python stack only while the backward runs).
    rows = [dict(thread=thread, kind=kind, function=function, share=n / samples[thread],
                 ms=n / samples["rounds"] * wall_ms)
            for kind, counts in (("own", own), ("within", within))
            for (thread, function), n in counts.items()]
    return [row for thread in ("main", "native") for kind in ("own", "within")
            for row in sorted((r for r in rows if (r["thread"], r["kind"]) == (thread, kind)),
                              key=lambda r: -r["share"])[:top]]


def host_ops(step, top: int) -> list[dict]:
    """The ``top`` operators (ATen ops, custom ops, CUDA API calls) with the most
    host time of their own over one call of ``step`` (torch.profiler's CPU events:
    a custom op's own time is its implementation's Python, the launch API calls
    in it being rows of their own), with their count and time including callees."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [dict(op=e.key, count=e.count, self_ms=e.self_cpu_time_total / 1e3,
                 total_ms=e.cpu_time_total / 1e3) for e in events]


def _stack(frame, stop):
    """``frame`` and its callers, up to (not including) ``stop``."""
    while frame is not None and frame is not stop:
        yield frame
        frame = frame.f_back


def peak_sites(step, top: int) -> dict:
    """Where one call of ``step`` peaks in allocated memory: its allocations are
    recorded with their Python stacks (``torch.cuda.memory``'s history) and
    replayed by ``live_at_peak``."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1 << 22, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return live_at_peak(trace, base, top)


def live_at_peak(trace: list[dict], base: int, top: int) -> dict:
    """Replays an allocator ``trace`` (``alloc``/``free_requested`` events with
    ``addr``, ``size`` and ``frames``) from ``base`` bytes allocated: the peak,
    the allocation that reached it, and the ``top`` call sites (``site``) whose
    allocations are live there, largest first, with their MiB and count."""
    allocated, peak, peak_event, at_peak = base, base, None, {}
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            allocated += event["size"]
            if allocated > peak:
                peak, peak_event = allocated, index
        elif event["action"] == "free_requested":
            allocated -= event["size"]
    # The live set is rebuilt up to the peak (a copy at every new peak would
    # cost a step's allocations squared).
    if peak_event is not None:
        for event in trace[:peak_event + 1]:
            if event["action"] == "alloc":
                at_peak[event["addr"]] = event
            elif event["action"] == "free_requested":
                at_peak.pop(event["addr"], None)
    sizes, counts = collections.Counter(), collections.Counter()
    for event in at_peak.values():
        name = site(event["frames"])
        sizes[name] += event["size"]
        counts[name] += 1
    return dict(peak_gib=peak / 2**30, base_gib=base / 2**30,
                event=peak_event, events=len(trace),
                at=None if peak_event is None else site(trace[peak_event]["frames"]),
                sites=[dict(site=name, mib=size / 2**20, count=counts[name])
                       for name, size in sizes.most_common(top)])


def site(frames: list[dict], depth: int = 3) -> str:
    """The innermost ``depth`` frames of an allocation's stack outside torch
    (Inductor's generated code counts as outside), innermost first; "native"
    for an allocation with none (made in C++ with no Python caller: cuBLAS's
    workspace, autograd's gradient buffers)."""
    kept = [f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']}({f['name']})" for f in frames
            if "/torch/" not in f["filename"]][:depth]
    return " <- ".join(kept) or "native"


def idle_gaps(prof, top: int) -> list[dict]:
    """Where the GPU waits: the gaps between consecutive kernels of the profiled
    step, summed by the kernel that ends each gap (the one the host was late to
    launch), the ``top`` largest sums."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    waits, busy_until = {}, None
    for start, end, name in kernels:
        if busy_until is not None and start > busy_until:
            total, count = waits.get(name, (0.0, 0))
            waits[name] = (total + (start - busy_until) / 1e3, count + 1)
        busy_until = end if busy_until is None else max(busy_until, end)
    rows = sorted(waits.items(), key=lambda item: -item[1][0])[:top]
    return [dict(kernel=name, idle_ms=total, gaps=count) for name, (total, count) in rows]


def measure(arm, build, flavor, seq, batch, steps, warmup, ac, top_kernels, host_top=0,
            back_to_back=False, peak_top=0):
    model, loss_fn = build(flavor, seq, ac)
    params = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    vocab = coda_llama3_args[flavor].vocab_size
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device="cuda", generator=gen)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    scaling = DelayedScaling()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), labels) / labels.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        scaling.step(model)  # what the converter's post_optimizer_hook runs
        return loss

    # TorchTitan's training loop turns Python's garbage collector off and collects
    # every ``training.gc_freq`` steps; left on, its collections land in random
    # steps, longest in the arms that make the most Python objects.
    gc.collect()
    gc.disable()
    try:
        return _timed(arm, model, step, flavor, seq, batch, steps, warmup, ac, top_kernels,
                      host_top, back_to_back, peak_top)
    finally:
        gc.enable()
        del model, optimizer, params
        gc.collect()
        torch.cuda.empty_cache()


def step_times(step, steps: int, back_to_back: bool, event=None) -> list[float]:
    """Milliseconds of ``steps`` calls of ``step`` on the GPU's clock. Synced (the
    default): each step starts on an idle GPU, which waits for the host's first
    launches. ``back_to_back``: the steps are queued one after another, as
    TorchTitan's training loop runs them (it waits for the GPU only at its log
    steps), each timed from the event that ends the step before to its own."""
    event = event or functools.partial(torch.cuda.Event, enable_timing=True)
    if not back_to_back:
        times = []
        for _ in range(steps):
            start, end = event(), event()
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    events = [event() for _ in range(steps + 1)]
    events[0].record()
    for end in events[1:]:
        step()
        end.record()
    events[-1].synchronize()
    return [start.elapsed_time(end) for start, end in zip(events, events[1:])]


def _timed(arm, model, step, flavor, seq, batch, steps, warmup, ac, top_kernels, host_top,
           back_to_back, peak_top):
    first_loss = step().item()
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = step_times(step, steps, back_to_back)
    peak = torch.cuda.max_memory_allocated() / 2**30

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    breakdown = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    for event in events:
        breakdown[classify(event.key)] += event.device_time_total / 1e3
    if top_kernels:
        for event in events[:top_kernels]:
            print(f"   {event.device_time_total / 1e3:8.2f} ms x{event.count:4d} "
                  f"[{classify(event.key)}] {event.key[:100]}")
    step_ms = statistics.median(times)
    host, ops, gaps = [], [], []
    if host_top:
        gaps = idle_gaps(prof, host_top)
        for row in gaps:
            print(f"   {row['idle_ms']:8.2f} ms idle in {row['gaps']:4d} gaps before "
                  f"{row['kernel'][:90]}")
        torch.cuda.synchronize()
        host = host_profile(step, host_top)
        torch.cuda.synchronize()
        for row in host:
            print(f"   {row['ms']:8.2f} ms {100 * row['share']:5.1f}% of {row['thread']:6s} "
                  f"{row['kind']:6s} {row['function'][:90]}")
        ops = host_ops(step, host_top)
        for row in ops:
            print(f"   {row['self_ms']:8.2f} ms own, {row['total_ms']:8.2f} with callees, "
                  f"x{row['count']:5d} {row['op'][:90]}")
    peak_at = peak_sites(step, peak_top) if peak_top else None
    if peak_at:
        print(f"   peak {peak_at['peak_gib']:.4f} GiB at allocation {peak_at['event']} of "
              f"{peak_at['events']} ({peak_at['at']}), {peak_at['base_gib']:.4f} GiB before the "
              f"step; allocated in the step and live there:")
        for row in peak_at["sites"]:
            print(f"   {row['mib']:10.1f} MiB x{row['count']:4d} {row['site'][:150]}")
    attention = sorted({b.attention_kernel for b in model.modules()
                        if isinstance(b, CodaTransformerBlock)}) or ["titan"]
    record = dict(arm=arm, flavor=flavor, seq=seq, batch=batch, ac=ac,
                  attention="/".join(attention),
                  timing="back-to-back" if back_to_back else "synced", step_ms=step_ms,
                  tok_s=batch * seq / step_ms * 1e3, peak_gib=peak, first_loss=first_loss,
                  profile_ms=breakdown, gpu_idle_ms=step_ms - sum(breakdown.values()),
                  **({"host_profile": host, "host_ops": ops, "idle_before": gaps}
                     if host_top else {}),
                  **({"peak_sites": peak_at} if peak_top else {}))
    return record


def child_argv(argv: list[str]) -> list[str]:
    """``argv`` without ``--processes`` and ``--out`` (either spelling), for one process."""
    child, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--processes", "--out"):
            skip = True
        elif not arg.startswith(("--processes=", "--out=")):
            child.append(arg)
    return child


def run_in_processes(argv: list[str], processes: int, work: Path) -> list[dict]:
    """The records of ``processes`` runs of this script with ``argv`` (see
    ``child_argv``), each in a fresh process, with its index as ``process``."""
    records = []
    for k in range(processes):
        out = work / f"process{k}"
        subprocess.run([sys.executable, __file__, *argv, "--out", str(out)], check=True)
        (path,) = out.glob("*.json")
        records += [dict(r, process=k) for r in json.loads(path.read_text())["records"]]
    return records


def process_summary(records: list[dict]) -> list[dict]:
    """Per arm over its processes: the step time's median, min and max, and the
    median, min and max of each speedup (each taken inside its own process)."""
    summary = []
    for arm in dict.fromkeys(r["arm"] for r in records):
        runs = [r for r in records if r["arm"] == arm]
        row = dict(arm=arm, processes=len(runs))
        for key in ("step_ms", "gpu_idle_ms", "speedup_vs_baseline", "speedup_vs_float8"):
            values = [r[key] for r in runs if key in r]
            if values:
                row.update({f"{key}_median": statistics.median(values),
                            f"{key}_min": min(values), f"{key}_max": max(values)})
        summary.append(row)
    return summary


def summary_table(summary: list[dict]) -> list[str]:
    def span(row, key, digits):
        if f"{key}_median" not in row:
            return "| "
        return (f"| {row[f'{key}_median']:.{digits}f} ({row[f'{key}_min']:.{digits}f}-"
                f"{row[f'{key}_max']:.{digits}f}) ")

    return ["| arm | processes | step ms, median (min-max) | GPU idle ms | vs baseline | "
            "vs float8 |", "|---|---|---|---|---|---|"] + [
        f"| {row['arm']} | {row['processes']} " + span(row, "step_ms", 1)
        + span(row, "gpu_idle_ms", 1) + span(row, "speedup_vs_baseline", 3)
        + span(row, "speedup_vs_float8", 3) + "|" for row in summary]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--flavor", default="1B")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--top-kernels", type=int, default=0, help="print the N costliest kernels")
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="print (and record) the N kernels the GPU waits longest before and, "
                             "per thread, the N Python lines and the N functions with the most "
                             "host time over one step, and the N operators with the most "
                             "host time of their own")
    parser.add_argument("--ac", default="none",
                        choices=("none", "full", "selective", "selective-op"),
                        help="TorchTitan activation checkpointing (8B takes full on 80 GB)")
    parser.add_argument("--coda-attention", default="auto", choices=ATTENTIONS,
                        help="[coda] attention of the coda arm")
    parser.add_argument("--peak-sites", type=int, default=0, metavar="N",
                        help="record one more step's allocations and list the N call sites "
                             "whose memory is live at its peak")
    parser.add_argument("--back-to-back", action="store_true",
                        help="time the steps queued back to back, as TorchTitan's loop runs "
                             "them, instead of each from an idle GPU")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="run the arms in N fresh processes and add each arm's medians")
    args = parser.parse_args()
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    title = (f"Training-step benchmark, LLaMA-3 {args.flavor}, seq {args.seq} x {args.batch}"
             f"{'' if args.ac == 'none' else f', {args.ac} AC'}"
             f"{', steps back to back' if args.back_to_back else ''}")
    if args.processes > 1:
        with tempfile.TemporaryDirectory() as work:
            records = run_in_processes(child_argv(sys.argv[1:]), args.processes, Path(work))
        summary = process_summary(records)
        table = summary_table(summary)
        print("\n".join(table))
        write_results(args.out, f"step_{args.flavor.lower()}",
                      f"{title}, {args.processes} processes", records,
                      table + ["", "Each process:", "", *step_table(records, per_process=True)],
                      summary=summary)
        return
    records = []
    for arm in args.arms:
        rec = run_arm(arm, args.flavor, args.seq, args.batch, args.steps, args.warmup,
                      args.ac, args.top_kernels, args.coda_attention, args.host_profile,
                      args.back_to_back, args.peak_sites)
        records.append(rec)
        prof = rec["profile_ms"]
        print(f"{arm:9s} {args.flavor} seq {args.seq} x {args.batch} (attention "
              f"{rec['attention']}): {rec['step_ms']:.1f} ms/step, "
              f"{rec['tok_s'] / 1e3:.1f}k tok/s, peak {rec['peak_gib']:.3f} GiB, first loss "
              f"{rec['first_loss']:.4f} | profile gemm {prof['gemm']:.1f} attention "
              f"{prof['attention']:.1f} other {prof['other']:.1f} ms, GPU idle "
              f"{rec['gpu_idle_ms']:.1f} ms", flush=True)
    for ref in ("baseline", "float8"):
        base = next((r for r in records if r["arm"] == ref), None)
        for r in records if base else ():
            r[f"speedup_vs_{ref}"] = base["step_ms"] / r["step_ms"]
    write_results(args.out, f"step_{args.flavor.lower()}", title, records, step_table(records))


def step_table(records: list[dict], per_process: bool = False) -> list[str]:
    """One Markdown row per record (``per_process``: led by its process)."""
    lead = "| process " if per_process else ""
    table = [lead + "| arm | attention | step ms | tok/s | vs baseline | vs float8 | peak GiB | "
             "GEMM ms | attention ms | other ms | GPU idle ms |",
             "|---" * (11 + per_process) + "|"]
    return table + [(f"| {r['process']} " if per_process else "")
                    + f"| {r['arm']} | {r['attention']} | {r['step_ms']:.1f} | {r['tok_s']:.0f} | "
                    f"{r.get('speedup_vs_baseline', float('nan')):.3f} | "
                    f"{r.get('speedup_vs_float8', float('nan')):.3f} | {r['peak_gib']:.3f} | "
                    f"{r['profile_ms']['gemm']:.1f} | {r['profile_ms']['attention']:.1f} | "
                    f"{r['profile_ms']['other']:.1f} | {r['gpu_idle_ms']:.1f} |"
                    for r in records]


if __name__ == "__main__":
    main()
