"""Faults on real gloo ranks (CPU): what each failure costs in requests, tokens and time.

    python benchmarks/faults_cpu.py --out benchmarks/results [--preset tiny] [--requests 16]

Every scenario runs the same workload (all requests at once, greedy, fixed output length)
through the scheduler on a separated plan, once without a fault (the reference tokens and the
steady-state throughput) and once with faults injected at a decode step. A row reports:
  lost          requests that ended with an error
  identical     requests whose tokens equal the no-fault run's (of those that finished)
  detect_ms     from the start of the step the rank died in to the loss being noticed
  failover_ms   from the start of that step to the next token of every moved request (max, mean)
  tok_s         output tokens/s of the whole run (the no-fault run beside it)
Writes faults_cpu_<yyyymmdd>.json (meta + rows) and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from masep.config import preset as get_preset
from masep.engine import random_prompts
from masep.engine.scheduler import Scheduler, SchedulerConfig
from masep.parallel.cluster import ClusterExecutor
from masep.parallel.faults import FaultSpec
from masep.parallel.worker import RunSpec
from masep.plan import SeparatedPlan
from masep.serve.engine_client import EngineDead, SamplingParams

FULL = ((0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3, 4, 5, 6, 7))  # tiny's 8 experts on each of 2 expert ranks
# (name, plan (R, T, E, m[, placement]), faults, timeout_s): ranks are replicas' attention ranks first, then experts
SCENARIOS = [
    ("attention rank killed", (2, 1, 1, 2), ["kill@1:{s}"], 60.0),
    ("attention rank raises", (2, 1, 1, 2), ["raise@1:{s}"], 60.0),
    ("attention rank stuck (SIGSTOP), --timeout 3", (2, 1, 1, 2), ["hang@1:{s}"], 3.0),
    ("one rank of a TP2 replica killed (whole replica stops)", (2, 2, 1, 2), ["kill@3:{s}"], 60.0),
    ("whole TP2 replica killed", (2, 2, 1, 2), ["kill@2:{s}", "kill@3:{s}"], 60.0),
    ("two replicas in a row", (3, 1, 1, 2), ["kill@1:{s}", "kill@2:{s2}"], 60.0),
    ("expert rank killed, no redundancy", (2, 1, 2, 2), ["kill@3:{s}"], 60.0),
    ("expert rank killed, every expert on both expert ranks", (2, 1, 2, 2, FULL), ["kill@3:{s}"], 60.0),
]


def log(msg: str) -> None:
    print(msg, flush=True)


def workload(cfg, n: int, out_len: int) -> list[tuple[list[int], SamplingParams]]:
    lens = [8 + (5 * i) % 17 for i in range(n)]
    return [(random_prompts(1, k, cfg.vocab_size, seed=i)[0], SamplingParams(out_len, 0.0, ignore_eos=True))
            for i, k in enumerate(lens)]


def run_once(preset: str, plan_args, faults: list[str], timeout_s: float, work, protection: str, slots: int):
    cfg = get_preset(preset)
    plan = SeparatedPlan(*plan_args[:4], placement=plan_args[4] if len(plan_args) > 4 else None).validate(cfg)
    max_len = max(len(p) + q.max_tokens for p, q in work) + 1
    executor = ClusterExecutor(RunSpec(plan=plan, requests=[], preset=preset, timeout_s=timeout_s), max_len=max_len,
                               max_num_seqs=slots, faults=tuple(FaultSpec.parse(f) for f in faults),
                               mirror=protection == "mirror")
    sched = Scheduler(executor, SchedulerConfig(max_len, cfg.vocab_size, max_num_batched_tokens=64,
                                                protection=protection))
    t0 = sched.clock()
    seqs = [sched.add(str(i), p, q, arrival_s=t0) for i, (p, q) in enumerate(work)]
    engine_error = None
    try:
        while sched.has_work:
            sched.iterate()
    except EngineDead as err:  # the plan cannot go on: every unfinished request fails
        engine_error = str(err)
        sched.fail_all(f"the engine failed: {err}")
    duration = sched.clock() - t0
    executor.shutdown()
    return sched, seqs, duration, engine_error, t0


def failover_times(sched, seqs, t0: float) -> tuple[list[float], list[float]]:
    """(detect seconds per failover, failover seconds per moved or adopted request)."""
    by_id = {s.request_id: s for s in seqs}
    detect, moves = [], []
    for f in sched.failovers:
        detect.append(f.at_s - f.step_started_s)
        for rid, n in list(zip(f.moved, f.tokens_at_move)) + list(zip(f.adopted, f.tokens_at_adopt)):
            s = by_id[rid]
            if len(s.token_times_s) > n:
                moves.append(s.arrival_s + s.token_times_s[n] - f.step_started_s)
    return detect, moves


def kv_mb(preset: str, plan_args, work, slots: int, protection: str) -> float:
    """KV cache of one attention rank (its heads, every slot), twice with mirror (the shadow)."""
    cfg = get_preset(preset)
    max_len = max(len(p) + q.max_tokens for p, q in work) + 1
    kv_heads = -(-cfg.num_kv_heads // plan_args[1])
    per_slot = 2 * cfg.num_layers * kv_heads * (max_len + 1) * cfg.head_dim * 4  # fp32
    return round(per_slot * slots * (2 if protection == "mirror" else 1) / 2**20, 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--slots", type=int, default=4, help="KV slots per replica (fewer than requests: some wait)")
    p.add_argument("--fault-step", type=int, default=12)
    p.add_argument("--tag", default="", help="appended to the file names (several loads on one day)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    cfg = get_preset(args.preset)
    work = workload(cfg, args.requests, args.output_len)
    meta = dict(date=datetime.date.today().isoformat(), host=platform.node(), cpus=__import__("os").cpu_count(),
                python=sys.version.split()[0], torch=torch.__version__, preset=args.preset, requests=args.requests,
                output_len=args.output_len, slots_per_replica=args.slots, fault_step=args.fault_step,
                backend="gloo", device="cpu")
    meta["command"] = "python benchmarks/faults_cpu.py " + " ".join(sys.argv[1:])
    log(json.dumps(meta))
    rows, baselines = [], {}
    for name, plan_args, faults, timeout_s in SCENARIOS:
        specs = [f.format(s=args.fault_step, s2=args.fault_step + 20) for f in faults]
        # mirror protects attention replicas only; the expert scenarios compare recompute and none
        protections = ("recompute", "none") if "expert" in name else ("recompute", "mirror", "none")
        for protection in protections:
            key = (plan_args, protection == "mirror")  # the run without a fault: tokens and steady-state cost
            if key not in baselines:
                sched, seqs, dur, _, _ = run_once(args.preset, plan_args, [], 60.0, work, protection, args.slots)
                baselines[key] = ([s.output for s in seqs], sum(len(s.output) for s in seqs) / dur)
            ref, ref_tok_s = baselines[key]
            started = time.perf_counter()
            sched, seqs, dur, engine_error, t0 = run_once(args.preset, plan_args, specs, timeout_s, work, protection,
                                                          args.slots)
            done = [s for s in seqs if s.error is None]
            detect, moves = failover_times(sched, seqs, t0)
            row = dict(scenario=name, plan=list(plan_args), faults=specs, protection=protection, timeout_s=timeout_s,
                       requests=len(seqs), lost=len(seqs) - len(done),
                       identical=sum(s.output == ref[int(s.request_id)] for s in done), finished=len(done),
                       failovers=len(sched.failovers), moved=sum(len(f.moved) for f in sched.failovers),
                       adopted=sum(len(f.adopted) for f in sched.failovers),
                       kv_mb_per_attention_rank=kv_mb(args.preset, plan_args, work, args.slots, protection),
                       detect_ms=[round(1e3 * d, 1) for d in detect],
                       failover_ms_max=round(1e3 * max(moves), 1) if moves else None,
                       failover_ms_mean=round(1e3 * sum(moves) / len(moves), 1) if moves else None,
                       tok_s=sum(len(s.output) for s in seqs) / dur, tok_s_no_fault=ref_tok_s,
                       engine_error=engine_error, reasons=[f.reason for f in sched.failovers],
                       experts_routed_around=getattr(sched.executor, "lost_experts", {}),
                       reroute_ms=[round(1e3 * r["seconds"], 1) for r in getattr(sched.executor, "reroutes", [])],
                       wall_s=round(time.perf_counter() - started, 1))
            rows.append(row)
            log(json.dumps({k: row[k] for k in ("scenario", "protection", "lost", "identical", "finished",
                                                "moved", "detect_ms", "failover_ms_max", "engine_error")}))
    day = meta["date"].replace("-", "") + (f"_{args.tag}" if args.tag else "")
    (args.out / f"faults_cpu_{day}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"faults_cpu_{day}.md").write_text(markdown(meta, rows))
    log(markdown(meta, rows))
    return 0


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Faults on gloo ranks, CPU ({meta['date']})", "",
             f"`{meta['command']}` on {meta['cpus']} CPU cores, torch {meta['torch']}, "
             f"Python {meta['python']}. Preset `{meta['preset']}` (fp32), separated plans, {meta['requests']} greedy "
             f"requests at once ({meta['output_len']} output tokens each, {meta['slots_per_replica']} KV slots per "
             f"replica{', so some wait' if meta['requests'] > meta['slots_per_replica'] else ''}), faults injected at step {meta['fault_step']} (a decode step). Identical = "
             "tokens equal to the same plan's run without a fault. detect = from the start of the step the rank "
             "died in to the front end noticing; failover = from that step's start to the next token of every "
             "moved request (max / mean); it includes waiting for a free KV slot on the surviving replicas when they are "
             "full (the plan has lost a replica's capacity). tok/s (no fault): the same plan and protection without a "
             "fault, the steady-state cost of the protection. For a routed-around expert rank, detect = from the "
             "start of the step to every rank using its new bridges (the step then runs again). tok/s: the whole run (the run without a fault beside "
             "it).", "",
             "| scenario | protection | lost | identical / finished | moved (recompute) / adopted (mirror) | detect ms "
             "| failover ms max / mean | tok/s (no fault) | KV MB per attention rank | expert ranks routed around |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fo = f"{r['failover_ms_max']} / {r['failover_ms_mean']}" if r["failover_ms_max"] is not None else "-"
        detect = ", ".join(map(str, r["detect_ms"] + r["reroute_ms"])) or "-"
        lines.append(f"| {r['scenario']} | {r['protection']} | {r['lost']} of {r['requests']} | {r['identical']} / "
                     f"{r['finished']} | {r['moved']} / {r['adopted']} | {detect} | {fo} | {r['tok_s']:.0f} ({r['tok_s_no_fault']:.0f}) "
                     f"| {r['kv_mb_per_attention_rank']} | "
                     f"{', '.join(map(str, r['experts_routed_around'])) or '-'} |")
    errors = {r["engine_error"] for r in rows if r["engine_error"]}
    if errors:
        lines += ["", "Engine errors (the plan could not go on):"] + [f"- {e}" for e in sorted(errors)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
