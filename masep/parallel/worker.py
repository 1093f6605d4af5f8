"""What every rank of a distributed `masep run` does: join, build its part, generate, report.

Rank 0 gathers every rank's report (over the world group, once, after the hot path) and
returns one result: tokens per request in request order, merged metrics, busy time per rank
and the expert-load histogram.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..engine import Request, generate
from ..metrics import compute_metrics
from ..plan import split_evenly
from .ep import EpRuntime
from .launch import launched_by_torchrun, spawn
from .groups import build_ep_groups, build_separated_groups, build_tp_pp_groups, init_distributed
from .parts import apply_parts, rank_parts
from .separated import SeparatedAttentionRuntime, serve_experts
from .stepper import OpTimer
from .tp_pp import TpPpRuntime


@dataclass
class RunSpec:
    """Everything a rank needs, picklable: sent to spawned ranks or rebuilt under torchrun."""

    plan: object
    requests: list[Request]
    preset: str | None = None
    config: object | None = None  # a ModelConfig to build with random weights instead of a preset
    model_dir: str | None = None
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"
    timeout_s: float = 120.0
    trace_dir: str | None = None
    quiet: bool = False
    warmup: int = 0  # untimed rounds of the same requests before the timed one
    eager: bool = False  # CUDA: plain PyTorch (no CUDA graphs, no Triton kernels)
    # CUDA: the fused Triton small-op kernels too (RMSNorm, router softmax/top-k, routing sort,
    # RoPE + KV write: fastpath.set_fused); off only to measure what they save
    fused: bool = True
    # CUDA graphs, separated plans: one graph per decode step on the attention and the expert
    # ranks instead of one per compute segment with the transfers launched between them (NCCL;
    # decode steps, which both sides lay out from the rows they are told). Off until measured
    # on GPUs (benchmarks/multi_gpu.py --impls fast-stepgraphs)
    separated_step_graphs: bool = False


def load_model(spec: RunSpec, device: torch.device, rank: int | None = None):
    """This rank's weights: only the slices it holds under the plan (when `rank` is given; the
    whole model otherwise), read from the checkpoint or drawn from the seed with the values the
    whole model has there (model.init_random_), so no rank ever holds the whole model."""
    from ..config import DTYPES, from_hf_config, preset
    from ..model import build_model
    dtype = DTYPES[spec.dtype]
    if spec.model_dir:
        from ..checkpoint import from_pretrained
        parts = None
        if rank is not None:
            cfg = from_hf_config(spec.model_dir)
            parts = rank_parts(spec.plan.validate(cfg, None), cfg, rank)
        return from_pretrained(spec.model_dir, dtype=dtype, device=device, parts=parts)
    cfg = spec.config if spec.config is not None else preset(spec.preset)
    parts = rank_parts(spec.plan.validate(cfg, None), cfg, rank) if rank is not None else None
    # Drawn on the rank's own device, as ModelSource.build does: CPU and CUDA generators give
    # different streams for one seed, so the oracle and the ranks must draw on the same kind.
    return build_model(cfg, seed=spec.seed, dtype=dtype, device=device, parts=parts)


def in_world(run: RunSpec, body):
    """Join the launch's world, load this rank's weights, run `body(env, model)`, leave."""
    env = init_distributed(run.device, run.timeout_s, run.backend)
    try:
        return body(env, load_model(run, env.device, env.rank))
    finally:
        dist.destroy_process_group()


def run_rank(spec: RunSpec) -> dict | None:
    return in_world(spec, lambda env, model: run_on(env, spec, model))


def run_on(env, spec: RunSpec, model) -> dict | None:
    """This rank's part of a run in an initialised world; `model` (this rank's part, or the whole
    model, on this rank's device) is parallelized in place. Rank 0 returns the assembled result."""
    cfg = model.cfg
    plan = apply_plan(env, spec.plan, model)
    graphs = use_fast_path(spec, model, env.device)
    if env.rank == 0 and not spec.quiet:
        print(plan.describe(cfg), flush=True)
    timer = OpTimer(label_ops=spec.trace_dir is not None)
    run = {"separated": _run_separated, "ep": _run_ep, "tp_pp": _run_tp_pp}[plan.strategy]
    with _maybe_profile(spec.trace_dir, env.rank):
        report = run(spec, model, plan, env, timer, graphs)
    report.update(rank=env.rank, busy_s=dict(timer.busy_s))
    gathered = gather_reports(env, report)
    return assemble(spec, plan, cfg, gathered) if env.rank == 0 else None


def apply_plan(env, plan, model):
    """Validate against the launch, then keep on this rank only the weights it serves (a no-op
    for a model load_model built as this rank's part)."""
    plan = plan.validate(model.cfg, env.world_size)
    apply_parts(model, rank_parts(plan, model.cfg, env.rank))
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    return plan


def use_fast_path(spec: RunSpec, model, device: torch.device) -> bool:
    """The CUDA fast path on this rank's part of the model (after apply_plan): the Triton
    grouped matmul for the experts and, unless `spec.fused` is off, the fused small-op kernels
    (masep/fastpath.py) where triton is installed. Returns whether the runtimes should replay
    their decode segments from CUDA graphs (every strategy does, unless --eager). Each fused
    kernel falls back to the model's own code on inputs it does not cover. CPU: nothing
    changes, the model stays the oracle."""
    if device.type != "cuda" or spec.eager:
        return False
    from ..fastpath import auto_expert_impl, set_expert_impl, set_fused
    impl = auto_expert_impl(model)
    if impl is not None:
        set_expert_impl(model, impl)
        set_fused(model, spec.fused)
    return True


def gather_reports(env, report: dict) -> list[dict] | None:
    """Every rank's report on rank 0 (over the world group: once, after the hot path)."""
    gathered = [None] * env.world_size if env.rank == 0 else None
    dist.gather_object(report, gathered, dst=0)
    return gathered


def _generate_share(make_runtime, spec: RunSpec, indices, keep: bool, **extra) -> dict:
    """Run the engine over requests `indices` (warm-up rounds first); `keep` marks the rank that
    reports them (ranks that hold identical outputs report once)."""
    for _ in range(spec.warmup + 1):
        runtime = make_runtime()
        result = generate(runtime, [spec.requests[i] for i in indices])
        # generate() skips finish() when no request was valid; a second call is a no-op. On an
        # exception no stop is sent: the peers are mid-step and see this process exit.
        runtime.finish()
    return dict(role="attention", indices=list(indices), outputs=result.outputs if keep else None,
                duration_s=result.metrics.duration_s, **extra)


def _run_separated(spec, model, plan, env, timer, graphs: bool) -> dict:
    groups = build_separated_groups(plan, model.cfg, env)
    role = groups.role
    if role.kind == "expert":
        for _ in range(spec.warmup + 1):
            timer.busy_s.clear()  # report the timed round only
            stats = serve_experts(model, plan, groups, env, timer, graphs=graphs)
        return dict(role="expert", steps=stats.steps, load=stats.load_LE.tolist())
    shares = split_evenly(len(spec.requests), plan.attn_replicas)[role.replica]
    return _generate_share(lambda: _fresh(timer, SeparatedAttentionRuntime(model, plan, groups, env, timer, graphs)),
                           spec, shares, keep=role.index == 0)


def _run_ep(spec, model, plan, env, timer, graphs: bool) -> dict:
    groups = build_ep_groups(plan, model.cfg, env)
    shares = split_evenly(len(spec.requests), plan.ep)[env.rank]
    made: list[EpRuntime] = []

    def make() -> EpRuntime:
        made.append(_fresh(timer, EpRuntime(model, plan, groups, env, timer, graphs)))
        return made[-1]

    report = _generate_share(make, spec, shares, keep=True)
    report["load"] = made[-1].load_LE.tolist()
    return report


def _run_tp_pp(spec, model, plan, env, timer, graphs: bool) -> dict:
    groups = build_tp_pp_groups(plan, env)
    return _generate_share(lambda: _fresh(timer, TpPpRuntime(model, plan, groups, env, timer, graphs)),
                           spec, range(len(spec.requests)), keep=env.rank == 0)


def _fresh(timer: OpTimer, runtime):
    timer.busy_s.clear()  # busy time of the timed (last) round only
    return runtime


def launch(spec: RunSpec) -> dict | None:
    """Under torchrun: run this rank (rank 0 returns the result, others None). Otherwise
    start plan.world_size local ranks with torchrun's environment and return rank 0's result."""
    if launched_by_torchrun():
        return run_rank(spec)
    return spawn(spec.plan.world_size, run_rank, spec)


def assemble(spec: RunSpec, plan, cfg, reports: list[dict]) -> dict:
    outputs = [None] * len(spec.requests)
    durations = []
    load = None
    for rep in reports:
        if rep["role"] == "attention" and rep["outputs"] is not None:
            for i, out in zip(rep["indices"], rep["outputs"]):
                outputs[i] = out
            durations.append(rep["duration_s"])
        if "load" in rep:
            lay = torch.tensor(rep["load"])
            load = lay if load is None else load + lay
    metrics = compute_metrics(outputs, max(durations, default=0.0))
    return dict(metrics=metrics, outputs=outputs, busy=[(r["rank"], r["role"], r["busy_s"]) for r in reports],
                expert_load=load.tolist() if load is not None else None, plan=plan, cfg=cfg)


class _maybe_profile:
    """torch.profiler around the rank's work, writing <dir>/rank<r>.json (Chrome trace)."""

    def __init__(self, trace_dir: str | None, rank: int):
        self.trace_dir, self.rank, self.prof = trace_dir, rank, None

    def __enter__(self):
        if self.trace_dir:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.prof is not None:
            self.prof.__exit__(*exc)
            os.makedirs(self.trace_dir, exist_ok=True)
            self.prof.export_chrome_trace(os.path.join(self.trace_dir, f"rank{self.rank}.json"))
        return False
