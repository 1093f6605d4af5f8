"""Separated vs TP×PP vs colocated EP on one N-GPU host, through torchrun and NCCL.

    torchrun --nproc-per-node N benchmarks/multi_gpu.py --out DIR [--quick]

One launch runs every configuration in turn (the model is rebuilt from its seed on each GPU
and parallelized for each plan), so process start-up is paid once:

1. correctness: for each strategy, a small fp32 batch of the `paper` model generates greedy
   tokens that must equal the single-device model's (rank 0 computes the reference on its GPU);
2. decode timing: `paper` (2-matrix) and `paper-swiglu`, batch {24, 128, 512}, context 2048
   and 8192: `separated` at the planner's best split and the other legal attention:expert
   ratios (up to 3), `tp_pp` with TP=N and with TP=N/2 x PP=2, and `ep` with EP=N. Each row
   holds the measurement, the simulator's prediction for the same plan and workload, and the
   hardware it ran on. A point that runs out of memory becomes a row with an `error`.
3. per-rank Chrome traces of one decode step set per strategy and implementation (batch 24,
   context 2048), packed into traces.tar.gz.

Every point runs twice (--impls): `fast` (the CUDA fast path: compute between transfers
replayed from CUDA graphs, Triton grouped matmul experts, the fused small-op kernels, padded
transfers) and `eager` (plain PyTorch ops, same transfers), so the rows show what the fast path
buys per strategy. `fast-unfused` is `fast` without the fused small-op kernels; `fast-stepgraphs`
is `fast` with separated plans' decode steps replayed whole (RunSpec.separated_step_graphs).

Rows are appended to DIR/multi_gpu.jsonl as they finish, so a cut-off run keeps what it did.
Keep NVLink multicast off on shared hosts: NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
NVSHMEM_DISABLE_NVLS=1 (set below too, before NCCL starts).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

for _var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_var, "0" if _var == "NCCL_NVLS_ENABLE" else "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from masep.config import preset  # noqa: E402
from masep.engine import Request, generate, random_prompts  # noqa: E402
from masep.model import build_model  # noqa: E402
from masep.parallel.bench_dist import DistBenchSpec, bench_points_on  # noqa: E402
from masep.perf.bench import decode_point  # noqa: E402
from masep.parallel.groups import init_distributed  # noqa: E402
from masep.parallel.worker import RunSpec, run_on  # noqa: E402
from masep.plan import EpPlan, SeparatedPlan, TpPpPlan  # noqa: E402
from masep.runtime import LocalRuntime  # noqa: E402


def separated_splits(gpus: int, limit: int = 4) -> list[SeparatedPlan]:
    """Attention:expert splits of `gpus` (one replica, head-parallel attention), most attention first."""
    return [SeparatedPlan(1, a, gpus - a, 2) for a in range(gpus - 1, 0, -1)][:limit]


def baseline_plans(gpus: int) -> list:
    plans = [TpPpPlan(gpus, 1, 1), EpPlan(gpus, 2)]
    if gpus >= 2 and gpus % 2 == 0:
        plans.insert(1, TpPpPlan(gpus // 2, 2, 2))
    return plans


def predicted(plan, cfg, batch: int, context: int, hardware: str) -> dict:
    """The simulator's prediction for the same plan and workload (empty if unavailable)."""
    try:
        from masep.perf.hardware import get_profile
        from masep.perf.costmodel import Workload
        from masep.perf.simulator import simulate
        sim = simulate(plan, cfg, Workload(batch=batch, context=context), get_profile(hardware))
        return dict(predicted_tpot_ms=sim.tpot_s * 1e3, predicted_tps=sim.tps, predicted_hardware=hardware)
    except Exception as err:  # the row keeps the measurement either way
        return dict(predicted_error=f"{type(err).__name__}: {err}")


def best_separated(cfg, gpus: int, batch: int, context: int, hardware: str):
    try:
        from masep.perf.planner import best_of
        from masep.perf.costmodel import Workload
        from masep.perf.hardware import get_profile
        sim = best_of(separated_splits(gpus, limit=gpus), cfg, get_profile(hardware),
                      Workload(batch=batch, context=context))
        return sim.plan if sim is not None else None
    except Exception:
        return None


def write_row(out: Path, row: dict) -> None:
    with open(out / "multi_gpu.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    print(json.dumps({k: row.get(k) for k in ("kind", "impl", "strategy", "plan_text", "preset", "batch", "context",
                                              "median_tpot_ms", "floor_ms", "floor_ratio", "predicted_tpot_ms",
                                              "joules_per_token", "match", "error", "wall_s", "model_build_s")},
                     default=str), flush=True)


def free(env) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    dist.barrier()


def check_tokens(env, out: Path, plans, args) -> None:
    cfg = preset(args.check_preset).replace(dtype="float32", max_seq_len=64)
    reqs = [Request(p, 4, seed=i) for i, p in enumerate(random_prompts(4, 12, cfg.vocab_size, seed=1))]
    for plan, impl in [(p, i) for p in plans for i in args.impls]:
        model = build_model(cfg, seed=0, device=env.device)
        reference = generate(LocalRuntime(model), reqs).tokens if env.rank == 0 else None
        spec = RunSpec(plan=plan, requests=reqs, dtype="float32", device=args.device, timeout_s=args.timeout,
                       quiet=True, eager=impl == "eager", separated_step_graphs=impl == "fast-stepgraphs")
        try:
            result = run_on(env, spec, model)
            error = None
        except Exception as err:
            result, error = None, f"{type(err).__name__}: {err}"
        if env.rank == 0:
            tokens = [o.tokens for o in result["outputs"]] if result else None
            write_row(out, dict(kind="check", impl=impl, strategy=plan.strategy, plan_text=plan.describe(),
                                preset=cfg.name,
                                dtype="float32", batch=len(reqs), match=tokens == reference, tokens=tokens,
                                reference=reference, error=error))
        del model
        free(env)


def scaling_plans(gpus: int) -> list:
    """The plans a scaling run times on `gpus` GPUs: separated at every attention:expert ratio of
    one replica, two replicas where they fit, then TP, TP/2 x PP2 and EP (baseline_plans)."""
    plans = separated_splits(gpus, limit=gpus)
    if gpus >= 4:
        plans += [SeparatedPlan(2, a, gpus - 2 * a, 2) for a in range(1, gpus // 2) if gpus - 2 * a >= 1]
    return plans + baseline_plans(gpus)


def with_microbatches(plans: list, counts: list[int]) -> list:
    """Each plan that pipelines micro-batches (separated, EP, PP > 1) once per count in `counts`,
    in order, without repeats; TP-only plans as they are. The simulator often prefers m = 1 on
    few GPUs (EP2 at batch 24: 2.5 ms predicted at m = 1, 3.9 at m = 2: each micro-batch re-reads
    the experts it touches), so a strategy's best m is measured, not assumed."""
    out = []
    for plan in plans:
        pipelined = plan.strategy in ("separated", "ep") or getattr(plan, "pp", 1) > 1
        for m in counts if pipelined else [plan.microbatches]:
            variant = dataclasses.replace(plan, microbatches=m)
            if variant not in out:
                out.append(variant)
    return out


def bench_points(env, out: Path, args) -> None:
    """Plan by plan (the model is built, sliced and its groups made once per plan), every point."""
    gpus = env.world_size
    batches = args.batches or ((24,) if args.quick else (24, 128, 512))
    contexts = (2048,) if args.quick else (2048, 8192)
    points = args.points or [(b, c) for c in contexts for b in batches]
    traced = set()
    for name in args.presets:
        longest = max(c for _, c in points)
        cfg = preset(name).replace(max_seq_len=longest + 64)
        plans = scaling_plans(gpus) if args.all_ratios else separated_splits(gpus, limit=3) + baseline_plans(gpus)
        best = {pt: best_separated(cfg, gpus, *pt, args.hardware) for pt in points}
        plans += [b for b in dict.fromkeys(best.values()) if b is not None and b not in plans]
        plans = with_microbatches(plans, args.microbatches) if args.microbatches else plans
        plans.sort(key=lambda p: p.strategy == "separated")  # baselines first: a run cut short keeps them
        for plan in [p for p in plans if args.plan_filter in p.describe()]:
            for impl in args.impls:
                bench_plan(env, out, args, cfg, plan, impl, points, best, traced)


def bench_plan(env, out: Path, args, cfg, plan, impl: str, points, best: dict, traced: set) -> None:
    run = RunSpec(plan=plan, requests=[], dtype=cfg.dtype, device=args.device, timeout_s=args.timeout,
                  eager=impl == "eager", fused=impl != "fast-unfused",
                  separated_step_graphs=impl == "fast-stepgraphs")
    specs = [DistBenchSpec(run, batch=b, context=c, warmup=3, steps=args.steps) for b, c in points]
    trace = args.trace and (plan.strategy, impl) not in traced and specs[0].batch == 24
    start = time.perf_counter()
    model = build_model(cfg, seed=0, device=env.device)
    built_s = time.perf_counter() - start
    try:
        with _profile(out / "traces" / f"{plan.strategy}_{impl}", env.rank, trace):
            rows = bench_points_on(env, specs, model)
        error = None
    except Exception as err:  # e.g. out of memory: every rank fails the plan's remaining points
        rows, error = [None] * len(specs), f"{type(err).__name__}: {str(err)[:300]}"
    if trace:
        traced.add((plan.strategy, impl))
    if env.rank == 0:
        for spec, row in zip(specs, rows):
            row = row or dict(error=error)
            row.setdefault("strategy", plan.strategy)
            row.setdefault("plan_text", plan.describe())
            row.update(kind="decode", impl=impl, preset=cfg.name, batch=spec.batch, context=spec.context,
                       planner_best=best.get((spec.batch, spec.context)) == plan, gpus=env.world_size,
                       model_build_s=round(built_s, 2),
                       nccl=".".join(map(str, torch.cuda.nccl.version())) if env.backend == "nccl" else None,
                       **predicted(plan, cfg, spec.batch, spec.context, args.hardware))
            write_row(out, row)
    del model
    free(env)


class _profile:
    """CUDA kernels only: with CPU activity too the profiler doubled EP's step time (16.2 against
    8.3 ms); kernels inside graph replays are traced either way. Writes the Chrome trace and a
    table of kernel time by kernel name (rank{r}_kernels.txt)."""

    def __init__(self, folder: Path, rank: int, on: bool):
        self.folder, self.rank, self.on, self.prof = folder, rank, on, None

    def __enter__(self):
        if self.on:
            from torch.profiler import ProfilerActivity, profile
            self.prof = profile(activities=[ProfilerActivity.CUDA])
            self.prof.__enter__()

    def __exit__(self, *exc):
        if self.prof is not None:
            self.prof.__exit__(*exc)
            self.folder.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.folder / f"rank{self.rank}.json"))
            table = self.prof.key_averages().table(sort_by="device_time_total", row_limit=30, max_name_column_width=70)
            (self.folder / f"rank{self.rank}_kernels.txt").write_text(table)
        return False


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a micro-batch count is a positive integer")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--hardware", default="h100", help="simulator profile for the predictions")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="batch 24, context 2048 only")
    parser.add_argument("--presets", nargs="+", default=["paper", "paper-swiglu"])
    parser.add_argument("--check-preset", default="paper", help="model of the fp32 token check")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a gloo dry run")
    parser.add_argument("--impls", nargs="+", choices=("fast", "fast-unfused", "fast-stepgraphs", "eager"),
                        default=["fast", "eager"],
                        help="fast: CUDA graphs + Triton experts + fused small-op kernels; fast-unfused: "
                             "without the fused kernels; fast-stepgraphs: fast with one CUDA graph per decode "
                             "step on separated plans' ranks too; eager: plain PyTorch")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="override the batch sizes")
    parser.add_argument("--points", type=decode_point, nargs="+", default=None,
                        help="BATCHxCONTEXT points (e.g. 24x2048 2048x512) instead of --batches x the contexts")
    parser.add_argument("--plan-filter", default="", help="time only plans whose description contains this")
    parser.add_argument("--all-ratios", action="store_true",
                        help="every attention:expert ratio and two replicas where they fit (scaling_plans), "
                             "not the 3 most attention-heavy splits")
    parser.add_argument("--microbatches", type=_positive, nargs="+", default=None,
                        help="time every separated, EP and PP plan at each of these micro-batch counts "
                             "(default: the plans' own, 2)")
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument("--no-trace", dest="trace", action="store_false")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = init_distributed(args.device, args.timeout)
    start = time.time()
    try:
        if args.check:
            check_tokens(env, out, separated_splits(env.world_size, limit=1) + baseline_plans(env.world_size), args)
        bench_points(env, out, args)
    finally:
        dist.destroy_process_group()
    if env.rank == 0:
        traces = out / "traces"
        if traces.exists():
            with tarfile.open(out / "traces.tar.gz", "w:gz") as tar:
                tar.add(traces, arcname="traces")
            shutil.rmtree(traces)  # one archive instead of one file per rank and strategy
        print(f"done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
