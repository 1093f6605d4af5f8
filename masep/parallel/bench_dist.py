"""Decode-step timing of a distributed plan at a given context, on every rank of the launch.

Like the one-GPU benchmark (masep/perf/bench.py), the KV cache is filled with random values
up to `context` instead of running a long prefill (the values do not change what a decode
step reads or moves), then `warmup + steps` decode steps run with each row's position
advancing. Each attention-side rank times its steps; rank 0 reports, per step, the slowest
rank's time, and over the timed steps vLLM `bench serve`'s names for what they measure: one
decode step gives every sequence one output token, so its time is the TPOT (mean_tpot_ms,
median_tpot_ms, std_tpot_ms, p99_tpot_ms), `duration` is the timed steps' seconds and
`output_throughput` batch x steps / duration.

Clocks. On CUDA, step times and per-op busy times come from CUDA events on the rank's stream
(`timing: "cuda_events"`, which `masep replan` accepts); the host only synchronises between
steps, never inside one. On CPU the host clock is all there is (`timing: "host_clock"`). A step
starts on an idle GPU, so its time includes the runtime's host preparation (rows checked, laid
out and copied), as a serving step's does; the one-GPU benchmark replays its graphs back to back
and leaves that out. Where the runtime replays a whole-step graph, `median_from_launch_ms` (and
`from_launch_floor_ratio`) time the step from the graph's launch instead, for comparing with it.

Beside the times, on CUDA, every row carries
- `energy`: joules every GPU of the plan used over the timed steps (NVML's energy counter, read
  before and after; perf/energy.py) and `joules_per_token` = their sum / tokens generated;
- `floor_ms`: perf/floor.py's `plan_floor` of this plan and workload with the HBM rate and the
  bf16 matmul rate measured in the same run (a large device copy and an 8192^3 matmul on rank 0;
  each op is bound by the larger of bytes/bandwidth and FLOPs/peak) and transfers at the
  hardware profile's collective times, and `floor_ms_no_transfers` (transfers free);
  `floor_ratio` = median TPOT / floor_ms;
- `predicted_tpot_ms`: the simulator's step time for the same plan, workload and profile.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..logs import progress
from ..perf.bench import free_cuda, measure_copy_bandwidth, measure_matmul_flops
from ..perf.energy import EnergyMeter
from ..perf.costmodel import plan_to_dict
from ..plan import format_plan, split_evenly
from .ep import EpRuntime
from .groups import build_ep_groups, build_separated_groups, build_tp_pp_groups
from .separated import SeparatedAttentionRuntime, serve_experts
from .stepper import OpTimer, dense_decode_rows
from .tp_pp import TpPpRuntime
from .worker import RunSpec, apply_plan, gather_reports, in_world, use_fast_path


@dataclass
class DistBenchSpec:
    run: RunSpec  # plan, model source, dtype, device, backend, timeout (requests unused)
    batch: int = 24
    context: int = 2048
    warmup: int = 3
    steps: int = 20
    hardware: str | None = None  # profile for the floor and the prediction; None: from the GPU's name


def _plan_groups(plan, cfg, env):
    """The plan's process groups, built once and shared by every point of a benchmark (NCCL
    creates a communicator per group on first use, which costs seconds per group)."""
    if plan.strategy == "separated":
        return build_separated_groups(plan, cfg, env)
    if plan.strategy == "ep":
        return build_ep_groups(plan, cfg, env)
    return build_tp_pp_groups(plan, env)


def _attention_runtime(spec: DistBenchSpec, model, plan, groups, env, timer, graphs: bool):
    """(runtime, rows this rank decodes), or (groups, 0) on an expert rank (it serves instead)."""
    if plan.strategy == "separated":
        if groups.role.kind == "expert":
            return groups, 0
        rows = len(split_evenly(spec.batch, plan.attn_replicas)[groups.role.replica])
        return SeparatedAttentionRuntime(model, plan, groups, env, timer, graphs,
                                         spec.run.separated_step_graphs), rows
    if plan.strategy == "ep":
        rows = len(split_evenly(spec.batch, plan.ep)[env.rank])
        return EpRuntime(model, plan, groups, env, timer, graphs), rows
    return TpPpRuntime(model, plan, groups, env, timer, graphs), spec.batch


class CacheDoesNotFit(RuntimeError):
    """Raised on every rank when any rank's KV cache would not fit: no rank starts the point."""


def _check_cache_fits(spec: DistBenchSpec, runtime, rows: int, env, headroom: int = 4 << 30) -> None:
    """Agree across ranks, before allocating, that every rank's KV cache fits its free memory
    (with headroom for activations), so an out-of-memory point fails fast on all ranks instead
    of leaving its peers waiting in a collective."""
    need = 0
    if runtime is not None:
        layers, _, dtype = runtime._cache_shape
        positions = spec.context + spec.warmup + spec.steps + 1
        need = layers * rows * positions * runtime._cache_layout.bytes_per_position(dtype)
    free = torch.cuda.mem_get_info(env.device)[0] - headroom if env.device.type == "cuda" else need
    verdict = torch.tensor([1 if need <= free else 0], device=env.device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
    if not int(verdict.item()):
        raise CacheDoesNotFit(f"rank {env.rank}: KV cache needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free "
                              "after headroom (some rank does not fit this point)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_steps(runtime, rows: int, spec: DistBenchSpec, device, timer: OpTimer,
                  energy) -> tuple[list[float], list[float] | None]:
    """Seconds of each timed decode step (CUDA events on CUDA, else the host clock), and on CUDA
    for whole-step-graph runtimes the seconds from the graph's launch to the step's end: the step
    without the host preparation it starts with (None where the runtime has no such launch)."""
    cfg = runtime.cfg
    # EP: every rank is told the largest rank's rows (StepRows.peer_rows), and keeps as many
    # slots; a separated replica is told its own, as its expert ranks are (serve_experts)
    peer = (len(split_evenly(spec.batch, runtime.plan.ep)[0]) if isinstance(runtime, EpRuntime)
            else rows if isinstance(runtime, SeparatedAttentionRuntime) else None)
    runtime.start(peer or rows, spec.context + spec.warmup + spec.steps + 1)
    gen = torch.Generator(device=device).manual_seed(runtime.env.rank)
    for k, v in zip(runtime.cache.k, runtime.cache.v):
        k.normal_(generator=gen)
        v.normal_(generator=gen)
    tokens = torch.randint(0, cfg.vocab_size, (rows,), generator=gen, device=device)
    positions = torch.full((rows,), spec.context - 1, device=device)
    times, launched = [], []
    bar = progress(spec.warmup + spec.steps, "decode steps", "step")  # shown by rank 0 only
    for i in range(spec.warmup + spec.steps):
        bar.update(1)
        if i == spec.warmup:  # busy times of the timed steps only (warm-up builds NCCL communicators)
            _sync(device)
            timer.busy_s.clear()
            energy.start()
        with _StepClock(device) as clock:
            runtime.on_launch = clock.launch if clock.cuda else None
            logits = runtime.decode(tokens, positions, spec.context + i, peer_rows=peer)
        times.append(clock.seconds)
        launched.append(clock.from_launch_s)
        tokens, positions = logits.argmax(-1), positions + 1
    runtime.on_launch = None
    bar.close()
    runtime.finish()
    timed = launched[spec.warmup:]
    return times[spec.warmup:], (timed if all(t is not None for t in timed) else None)


class _StepClock:
    """One step's time: CUDA events around it on CUDA (read after a synchronisation at its end,
    so the next step starts from an idle GPU), the host clock on CPU. `launch()` records one more
    event where the step's GPU work is launched (runtime.on_launch): `from_launch_s`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.launched = None
        self.from_launch_s = None

    def launch(self) -> None:
        self.launched = torch.cuda.Event(enable_timing=True)
        self.launched.record()

    def __enter__(self):
        _sync(self.device)
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
        _sync(self.device)
        self.seconds = self.start.elapsed_time(self.end) * 1e-3 if self.cuda else time.perf_counter() - self.t0
        if self.launched is not None:
            self.from_launch_s = self.launched.elapsed_time(self.end) * 1e-3


def bench_rank(spec: DistBenchSpec) -> dict | None:
    return in_world(spec.run, lambda env, model: bench_on(env, spec, model))


def bench_on(env, spec: DistBenchSpec, model) -> dict | None:
    """This rank's part of the benchmark in an initialised world (`model` is parallelized in
    place). Rank 0 returns the summary row."""
    return bench_points_on(env, [spec], model)[0]


def bench_points_on(env, specs: list[DistBenchSpec], model) -> list[dict | None]:
    """Several points (batch, context) of one plan: the model is parallelized and the groups are
    built once, then each point gets its own runtime, KV cache and graphs. Rank 0 returns one
    row per point (an error row where a point's KV cache does not fit some rank); other ranks
    a list of None. Every spec must carry the same plan, dtype and implementation."""
    first = specs[0]
    if any(s.run.plan != first.run.plan or s.run.eager != first.run.eager for s in specs):
        raise ValueError("bench_points_on: every point must share one plan and implementation")
    plan = apply_plan(env, first.run.plan, model)
    cuda = env.device.type == "cuda"
    # rank 0 measures what the floor divides by, before the points' caches grow the pool
    copy_bw = measure_copy_bandwidth() if cuda and env.rank == 0 else None
    matmul = measure_matmul_flops() if cuda and env.rank == 0 else None
    graphs = use_fast_path(first.run, model, env.device)
    groups = _plan_groups(plan, model.cfg, env)
    rows = []
    for spec in specs:
        start = time.perf_counter()
        try:
            row = _bench_point(env, spec, model, plan, groups, graphs, copy_bw, matmul)
        except CacheDoesNotFit as err:  # raised on every rank alike: the next point can still run
            row = dict(error=f"{type(err).__name__}: {err}") if env.rank == 0 else None
        if row is not None:
            row |= dict(batch=spec.batch, context=spec.context, wall_s=round(time.perf_counter() - start, 2))
        rows.append(row)
        if cuda:
            free_cuda()
    return rows


def _bench_point(env, spec: DistBenchSpec, model, plan, groups, graphs: bool, copy_bw: float | None,
                 matmul: float | None = None) -> dict | None:
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    timer = OpTimer(cuda_events=cuda)
    energy = EnergyMeter(env.device)
    part, rows = _attention_runtime(spec, model, plan, groups, env, timer, graphs)
    _check_cache_fits(spec, part if rows else None, rows, env)
    if rows == 0:  # an expert rank of `separated`: `part` is its groups
        # every replica decodes its rows for warmup + steps steps (_decode_steps), then stops
        replica_rows = [dense_decode_rows(len(r), len(r), graphs) for r in split_evenly(spec.batch, plan.attn_replicas)]
        serve_experts(model, plan, part, env, timer, untimed_steps=spec.warmup, graphs=graphs, on_timed=energy.start,
                      agreed=lambda step: replica_rows if step < spec.warmup + spec.steps else None,
                      step_graphs=spec.run.separated_step_graphs)
        times = launched = None
    else:
        times, launched = _decode_steps(part, rows, spec, env.device, timer, energy)
        del part  # its KV cache and graphs go before the next point allocates its own
    _sync(env.device)
    used = energy.stop()
    mem = torch.cuda.max_memory_allocated(env.device) if cuda else None
    report = dict(rank=env.rank, times_s=times, from_launch_s=launched, busy_s=dict(timer.busy_s),
                  max_memory_bytes=mem, energy=used, timing=timer.timing)
    gathered = gather_reports(env, dict(report))
    if env.rank != 0:
        return None
    row = summarize(spec, plan, model.cfg, env, gathered) | floor_and_prediction(spec, plan, model.cfg, env, copy_bw, matmul)
    if "floor_ms" in row:
        row["floor_ratio"] = row["median_tpot_ms"] / row["floor_ms"]
        if row.get("median_from_launch_ms"):
            row["from_launch_floor_ratio"] = row["median_from_launch_ms"] / row["floor_ms"]
    return row


def _from_launch_ms(reports: list[dict]) -> dict:
    """Median over the timed steps of the slowest rank's launch-to-end time (ms), where every
    timed rank has one (whole-step graphs on CUDA)."""
    timed = [r for r in reports if r["times_s"]]
    if not timed or any(r.get("from_launch_s") is None for r in timed):
        return {}
    return dict(median_from_launch_ms=float(np.median(_slowest_per_step([r["from_launch_s"] for r in timed]))) * 1e3)


def _slowest_per_step(series: list[list[float]]) -> list[float]:
    """Per step, the slowest rank's seconds: a step ends when every rank's does."""
    return [max(step) for step in zip(*series)]


def summarize(spec: DistBenchSpec, plan, cfg, env, reports: list[dict]) -> dict:
    per_step = _slowest_per_step([r["times_s"] for r in reports if r["times_s"]])
    ms = np.asarray(per_step, dtype=np.float64) * 1e3
    duration = float(sum(per_step))
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    return dict(date=datetime.date.today().isoformat(), device=device_name, torch=torch.__version__,
                backend=env.backend, world_size=env.world_size, strategy=plan.strategy,
                plan=plan_to_dict(plan), plan_notation=format_plan(plan),
                plan_text=plan.describe(),
                preset=cfg.name, expert_matrices=cfg.expert_matrices, dtype=spec.run.dtype, batch=spec.batch,
                context=spec.context, steps=spec.steps, timing=reports[0]["timing"], duration=duration,
                total_output_tokens=spec.batch * spec.steps, output_throughput=spec.batch * spec.steps / duration,
                mean_tpot_ms=float(ms.mean()), median_tpot_ms=float(np.median(ms)), std_tpot_ms=float(ms.std()),
                p99_tpot_ms=float(np.percentile(ms, 99)), **_from_launch_ms(reports),
                busy_ms_per_step={r["rank"]: {k: v * 1e3 / spec.steps for k, v in r["busy_s"].items()}
                                  for r in reports},
                max_memory_gib={r["rank"]: (r["max_memory_bytes"] or 0) / 2**30 for r in reports},
                **_energy(reports, spec.batch * spec.steps))


def _energy(reports: list[dict], tokens: int) -> dict:
    """Joules of every GPU over the timed steps and their sum per generated token."""
    per_rank = {r["rank"]: r["energy"] for r in reports}
    if any("joules" not in e for e in per_rank.values()):
        why = next(e["unavailable"] for e in per_rank.values() if "joules" not in e)
        return dict(energy=per_rank, joules_per_token=None, energy_unavailable=why)
    total = sum(e["joules"] for e in per_rank.values())
    return dict(energy=per_rank, energy_joules=total, joules_per_token=total / tokens,
                energy_window_s=max(e["seconds"] for e in per_rank.values()))


def profile_for(spec: DistBenchSpec, device_name: str) -> str:
    """The hardware profile of the floor and the prediction: the spec's, else the GPU's own."""
    from ..perf.bench import hardware_tag
    from ..perf.hardware import PROFILES
    if spec.hardware:
        return spec.hardware
    tag = hardware_tag(device_name)
    return tag if tag in PROFILES else "h100"


def floor_and_prediction(spec: DistBenchSpec, plan, cfg, env, copy_bw: float | None,
                         matmul: float | None = None) -> dict:
    """The plan's floor at the run's measured HBM rate (and bf16 matmul rate: an op is bound by
    the larger of bytes/bandwidth and FLOPs/peak) and the simulator's step time (CUDA only: a
    CPU run has no meaningful floor)."""
    if copy_bw is None:
        return {}
    from ..perf.costmodel import Workload
    from ..perf.floor import Rates, plan_floor
    from ..perf.hardware import get_profile
    from ..perf.simulator import simulate
    name = profile_for(spec, torch.cuda.get_device_name(env.device))
    hw, work = get_profile(name), Workload(spec.batch, spec.context)
    measured = "copy" + (" and matmul" if matmul else "") + " measured in the run"
    with_tr = plan_floor(plan, cfg, work, hw, Rates(copy_bw, matmul, None, f"{measured}; {name} profile's "
                                                                          "collective times"))
    bare = plan_floor(plan, cfg, work, hw, Rates(copy_bw, matmul, {}, f"{measured}; transfers free"))
    sim = simulate(plan, cfg, work, hw)
    return dict(copy_bw_measured=copy_bw, matmul_flops_measured=matmul, floor_profile=name,
                floor_ms=with_tr.seconds * 1e3, floor_ms_no_transfers=bare.seconds * 1e3,
                floor_binds=with_tr.label or with_tr.binds, predicted_tpot_ms=sim.tpot_s * 1e3)


def launch_bench(spec: DistBenchSpec) -> dict | None:
    from .launch import launched_by_torchrun, spawn
    if launched_by_torchrun():
        return bench_rank(spec)
    return spawn(spec.run.plan.world_size, bench_rank, spec)
