"""`masep plan | simulate | sweep | replan`: argparse registration for masep/cli.py.

Each `add_*_parser(subparsers)` adds one subcommand whose `func` takes the parsed args and
returns an exit code (0 ok, 2 a bad argument or a plan that cannot run, with the reason on
stderr). Everything here is CPU-only and deterministic.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from pathlib import Path

from ..config import PRESET_HELP, PRESETS, ModelConfig, from_hf_config, preset
from ..logs import progress
from ..options import HelpFormatter
from ..plan import parse_plan as _parse_plan
from ..plotting import require_matplotlib
from ..report import document, profile_info
from .costmodel import DISPATCH_MODELS, Workload, describe, plan_to_dict
from .hardware import MixedHardware, load_hardware
from .kinds import add_kind_args

DEFAULT_HARDWARE = "a100-80g"
log = logging.getLogger("masep.perf")


# --- shared arguments ------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, batch: int = 24) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help=f"built-in model (default: paper); {PRESET_HELP}")
    which.add_argument("--model", metavar="DIR", default=None, help="HF checkpoint dir or config.json")
    p.add_argument("--gpus", type=int, default=16, help="number of GPUs")
    p.add_argument("--hardware", default=DEFAULT_HARDWARE,
                   help="a100-80g | h100 | h200 | gb200-nvl72 (datasheet values), or a TOML/JSON profile file")
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help="calibration JSON from `masep bench calibrate` (overrides the profile's rates)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="NVLink domain size (default: the profile's)")
    p.add_argument("--batch", type=int, default=batch, help="sequences decoding together")
    p.add_argument("--context", type=int, default=2048, help="keys each sequence attends to")
    p.add_argument("--no-lm-head", action="store_true",
                   help="leave the lm_head out (as the floors of docs/reference.md do)")
    p.add_argument("--serial", action="store_true",
                   help="one stream per GPU (the blocking CPU/gloo runtime) instead of compute + comm streams")
    p.add_argument("--max-microbatches", type=int, default=4, help="largest m tried for each plan")
    p.add_argument("--dispatch", choices=DISPATCH_MODELS, default="padded",
                   help="how routed tokens cross between GPUs: padded = masep's runtime (a fixed-capacity block to "
                        "every peer), routed = a what-if for a count-first dispatcher (DeepEP-like: only the routed "
                        "rows, all peers posted at once)")
    p.add_argument("--json", action="store_true", help="print one JSON document ({meta, rows}) instead of a table")


def _fail(message: str) -> int:
    print(f"masep: error: {message}", file=sys.stderr)
    return 2


def _setup(args) -> tuple[ModelConfig, object, Workload]:
    """Model, hardware, workload; ValueError on any bad value."""
    if args.model is not None:
        cfg = from_hf_config(args.model)
    else:
        cfg = preset(args.preset or "paper")
    if args.gpus < 1:
        raise ValueError(f"--gpus {args.gpus}: must be >= 1")
    if args.max_microbatches < 1:
        raise ValueError(f"--max-microbatches {args.max_microbatches}: must be >= 1")
    hw = load_hardware(args.hardware, args.calibration, args.gpus_per_node)
    return cfg, hw, Workload(args.batch, args.context, lm_head=not args.no_lm_head, dispatch=args.dispatch)


def _header(cfg: ModelConfig, hw, gpus: int, work: Workload, serial: bool) -> str:
    kv = f"MLA, {cfg.kv_lora_rank} + {cfg.qk_rope_head_dim} cached per token" if cfg.is_mla else f"kv {cfg.num_kv_heads}"
    dense = f", the first {cfg.first_dense_layers} dense" if cfg.first_dense_layers else ""
    return (f"model {cfg.name}: {cfg.num_layers} layers{dense}, hidden {cfg.hidden_size}, {cfg.num_heads} heads "
            f"({kv}), {cfg.num_experts} experts top-{cfg.top_k}, {cfg.expert_matrices}-matrix "
            f"experts ({cfg.expert_act}, hidden {cfg.expert_hidden}), {cfg.dtype}\n"
            f"{gpus} x {hw.summary()}\n"
            f"one decode step: batch {work.batch}, context {work.context}, lm_head "
            f"{'included' if work.lm_head else 'left out'}, {work.dispatch} dispatch, "
            f"{'one stream per GPU (serial)' if serial else 'compute and comm streams overlap'}")


FOOTNOTES = """\
floor   = the plan's own floor at its m (masep/perf/floor.py): each op at max(bytes / spec HBM bandwidth, FLOPs /
          spec matmul peak), experts re-read by every micro-batch that touches them; the slowest GPU's work plus
          the chains that must come before and after it (tp_pp: pipeline fill and drain), or one micro-batch's
          whole dependency chain, transfers at the cost model's times; the simulator never goes below it
MBU     = bytes all GPUs read in the step / TPOT / (GPUs x spec HBM bandwidth); 'useful' counts only the bytes a
          step must read (weights touched by the batch once + KV + lm_head)
busy    = compute time / TPOT, mean over GPUs
kernel* = nvidia-smi-style 'GPU utilization': fraction of the step any kernel runs, NCCL kernels waiting for
          peers included (secondary)"""


def _fmt(v, spec: str, width: int) -> str:
    return f"{v:{width}{spec}}" if isinstance(v, (int, float)) else f"{'-':>{width}}"


def table(rows: list[dict]) -> str:
    head = (f"{'':52} {'plan':>15} {'TPOT ms':>8} {'tok/s':>8} {'floor ms':>8} {'xfloor':>6} {'MBU %':>5} "
            f"{'useful %':>8} {'busy %':>6} {'kernel* %':>9} {'GB/GPU':>6}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['label']:52.52} {r['plan']:>15} {_fmt(r.get('tpot_ms'), '.3f', 8)} "
                     f"{_fmt(r.get('tps'), ',.0f', 8)} {_fmt(r.get('floor_ms'), '.3f', 8)} "
                     f"{_fmt(r.get('tpot_over_floor'), '.2f', 6)} {_fmt(r.get('mbu'), '.0%', 5)} "
                     f"{_fmt(r.get('mbu_useful'), '.0%', 8)} {_fmt(r.get('busy_fraction_mean'), '.0%', 6)} "
                     f"{_fmt(r.get('kernel_active_mean_nvidia_smi_style'), '.0%', 9)} "
                     f"{_fmt(r.get('memory_max_gb'), '.1f', 6)}" + (f"  <- {r['note']}" if r.get("note") else ""))
    return "\n".join(lines)


def parse_plan(text: str):
    """--plan of simulate: the one notation (masep.plan.parse_plan), the flag named in errors."""
    try:
        return _parse_plan(text)
    except ValueError as err:
        raise ValueError(f"--plan: {err}") from None


# --- plan ----------------------------------------------------------------------------------------------------
def _strategies(args) -> tuple[str, ...]:
    """--strategies as a tuple (default: all); ValueError naming an unknown one."""
    from .planner import STRATEGY_NAMES
    strategies = tuple(s.strip() for s in args.strategies.split(",")) if args.strategies else STRATEGY_NAMES
    bad = sorted(set(strategies) - set(STRATEGY_NAMES))
    if bad:
        raise ValueError(f"--strategies {args.strategies}: unknown {bad}; choose from {list(STRATEGY_NAMES)}")
    return strategies


def cmd_plan_train(args) -> int:
    """`masep plan --train`: rank plans by simulated training tokens/s (perf/trainsim.py)."""
    from .traincost import TrainWorkload
    from .trainsim import explain_train, search_train
    try:
        cfg, hw, _ = _setup(args)
        strategies = _strategies(args)
        if args.tpot_limit_ms is not None:
            raise ValueError("--tpot-limit-ms is a decode limit; with --train plans are ranked by tokens/s")
        work = TrainWorkload(args.batch, args.seq_len, args.grad_compression)
        log.info("masep plan --train: %s on %d x %s, %d sequences of %d tokens per step", cfg.name, args.gpus, hw.name,
                 work.batch, work.seq_len)
        ranked, rejected, candidates = search_train(cfg, hw, args.gpus, work, strategies=strategies, top=args.top,
                                                    max_microbatches=args.max_microbatches)
        if not ranked:
            why = rejected[0][1] if rejected else "no candidate plans"
            raise ValueError(f"no training plan for {args.gpus} GPU(s), {work.batch} sequences of {work.seq_len}: "
                             f"{len(rejected)} of {candidates} candidates rejected; e.g. {why}")
        planned = dict(train=True, sequences=work.batch, seq_len=work.seq_len, grad_compression=work.compression,
                       goal="highest training tok/s")
        written = write_plan_file(args, cfg, hw, ranked, planned, explain_train(ranked[0]))
    except ValueError as err:
        return _fail(str(err))
    if args.json:
        print(json.dumps(_doc("plan --train", [s.summary() for s in ranked], args, cfg, hw, plan_file=written,
                              sequences=work.batch, seq_len=work.seq_len, compression=work.compression,
                              candidates=candidates, rejected=len(rejected),
                              rejected_examples=[dict(plan=p, reason=r) for p, r in rejected[:5]])))
        return 0
    print(f"training {cfg.name} on {args.gpus} x {hw.name} ({hw.source}): {work.batch} sequences of {work.seq_len} "
          f"tokens per step, gradient compression {work.compression}")
    print(f"goal: highest training tok/s; {candidates} candidate plans, {len(rejected)} rejected (memory or rules), "
          "all others simulated")
    print(f"{'#':>2} {'plan':>15} {'step ms':>9} {'tok/s':>11} {'MFU %':>5} {'floor ms':>9} {'GB/GPU':>7}")
    for i, s in enumerate(ranked, 1):
        d = s.summary()
        print(f"{i:>2} {d['plan']:>15} {d['step_ms']:9.1f} {d['tokens_per_s']:11,.0f} {d['mfu']:5.0%} "
              f"{d['floor_ms']:9.1f} {d['memory_max_gb']:7.1f}")
    print(explain_train(ranked[0]))
    if written:
        print(f"wrote {written}: `masep train --plan {written}` runs {describe(ranked[0].plan)}")
    return 0


def cmd_plan(args) -> int:
    from .kinds import cost_fields, hardware_choice, split_words
    from .planner import explain, explain_text, ms, plan_label, search
    from .throughput import search_throughput
    if getattr(args, "train", False) and not (args.kinds or args.attn_hardware or args.expert_hardware):
        return cmd_plan_train(args)
    try:
        cfg, hw, work = _setup(args)
        choice = hardware_choice(args, hw, _strategies(args))
        hw, strategies, prices = choice.hw, choice.strategies, choice.prices
        if args.top < 1:
            raise ValueError(f"--top {args.top}: must be >= 1")
        overlap = not args.serial
        log.info("masep plan: %s on %d x %s, batch %s, context %d, %s", cfg.name, args.gpus, hw.name,
                 f"1..{args.max_batch}" if args.tpot_limit_ms else work.batch, work.context,
                 f"highest tok/s under TPOT {args.tpot_limit_ms} ms" if args.tpot_limit_ms else "lowest TPOT")
        if args.tpot_limit_ms is not None and args.tpot_limit_ms <= 0:
            raise ValueError(f"--tpot-limit-ms {args.tpot_limit_ms}: must be > 0")
        if choice.options:
            return _plan_kinds(args, cfg, choice, work, overlap)
        if args.by_family:
            return _plan_by_family(args, cfg, hw, work, strategies)
        if args.tpot_limit_ms is not None:
            res = search_throughput(cfg, hw, args.gpus, work.context, args.tpot_limit_ms * 1e-3,
                                    max_batch=args.max_batch, strategies=strategies, top=args.top,
                                    max_microbatches=args.max_microbatches, lm_head=work.lm_head, overlap=overlap,
                                    prices=prices, dispatch=work.dispatch)
        else:
            res = search(cfg, hw, args.gpus, work, strategies=strategies, top=args.top,
                         max_microbatches=args.max_microbatches, overlap=overlap)
        if not res.ranked:
            raise ValueError(res.no_plan_message())
        goal = (("lowest USD per million output tokens" if prices else "highest tok/s") +
                f" with TPOT <= {args.tpot_limit_ms} ms (batch 1..{args.max_batch})" if args.tpot_limit_ms
                else "lowest TPOT")
        planned = dict(batch=res.work.batch, context=work.context, lm_head=work.lm_head, overlap=overlap, goal=goal,
                       dispatch=work.dispatch)
        written = write_plan_file(args, cfg, res.best.hw, res.ranked, planned, explain_text(res.best))
        costs = [cost_fields(s, prices) for s in res.ranked]
    except ValueError as err:
        return _fail(str(err))
    if args.json:
        rows = [{**s.summary(), **c, "plan_fields": plan_to_dict(s.plan), "explain": explain(s)}
                for s, c in zip(res.ranked, costs)]
        print(json.dumps(_doc(
            "plan", rows, args, cfg, hw, plan_file=written, context=work.context,
            batch=res.work.batch if args.tpot_limit_ms else work.batch, tpot_limit_ms=args.tpot_limit_ms, goal=goal,
            candidates=res.candidates, simulated=res.simulated, rejected=len(res.rejected), prices=prices,
            rejected_examples=[dict(plan=p, reason=r) for p, r in res.rejected[:5]])))
        return 0
    print(_header(cfg, hw, args.gpus, res.work if args.tpot_limit_ms else work, args.serial))
    print(f"goal: {goal}; {res.candidates} candidate plans, {len(res.rejected)} rejected (memory or rules), "
          f"{res.simulated} simulated (branch and bound)")
    print(f"{'#':>2} {'plan':>15} {'batch':>6} {'TPOT ms':>8} {'tok/s':>9} {'floor ms':>8} {'MBU %':>5} {'busy %':>6} "
          f"{'kernel* %':>9} {'GB/GPU':>6}" + (f" {'$/M tok':>8}" if prices else ""))
    for i, (s, c) in enumerate(zip(res.ranked, costs), 1):
        d = s.summary()
        print(f"{i:>2} {plan_label(s.plan, cfg):>15} {d['batch']:>6} {d['tpot_ms']:8.3f} {d['tps']:9,.0f} {ms(d['floor_ms']):>8} "
              f"{d['mbu']:5.0%} {d['busy_fraction_mean']:6.0%} {d['kernel_active_mean_nvidia_smi_style']:9.0%} "
              f"{d['memory_max_gb']:6.1f}" + (f" {c['usd_per_m_output_tokens']:8.3f}" if c else ""))
    if any(plan_label(s.plan, cfg).endswith(" rr") for s in res.ranked):
        print(RR_NOTE)
    print(explain_text(res.best))
    if prices:
        c = costs[0]
        print(f"  cost: {split_words(res.best)} at ${c['usd_per_hour']:,.2f}/h -> ${c['usd_per_m_output_tokens']:.3f} per "
              f"million output tokens ({res.best.tps:,.0f} tok/s)")
    print("kernel* = nvidia-smi-style 'GPU utilization' (any kernel running, NCCL waits included)")
    if written:
        print(f"wrote {written}: `masep run --plan {written}` (or serve, train, bench dist) runs {describe(res.best.plan)}")
    return 0


def _plan_by_family(args, cfg, hw, work, strategies) -> int:
    """--by-family: the best plan of each strategy family under --tpot-limit-ms (perf/scale.py's rows)."""
    from .scale import FAMILIES, Setting, family_row
    if args.tpot_limit_ms is None:
        raise ValueError("--by-family ranks each family by tok/s under a latency target: give --tpot-limit-ms")
    if isinstance(hw, MixedHardware):
        raise ValueError("--by-family compares families on one kind of GPU; leave out --attn-hardware / "
                         "--expert-hardware")
    setting = Setting(work.context, args.tpot_limit_ms, args.max_microbatches, max(1, args.max_batch // args.gpus),
                      work.lm_head)
    rows = [family_row(cfg, hw, args.gpus, f, setting, work.dispatch) for f in FAMILIES if f in strategies]
    if args.json:
        print(json.dumps(_doc("plan", rows, args, cfg, hw, context=work.context, tpot_limit_ms=args.tpot_limit_ms,
                              goal="highest tok/s of each family under the TPOT limit")))
        return 0
    print(_header(cfg, hw, args.gpus, work, args.serial).replace(f"batch {work.batch}, ", "each family's batch, "))
    print(f"goal: highest tok/s of each family with TPOT <= {args.tpot_limit_ms} ms (batch up to "
          f"{setting.batch_per_gpu * args.gpus})")
    print(f"{'family':>9} {'plan':>18} {'batch':>6} {'TPOT ms':>8} {'tok/s':>9} {'tok/s/GPU':>9} "
          f"{'tok/s/node':>10} {'headroom':>13}")
    for r in rows:
        if r.get("plan"):
            print(f"{r['family']:>9} {r['plan']:>18} {r['batch']:>6} {r['tpot_ms']:8.2f} {r['tokens_per_s']:9,.0f} "
                  f"{r['tokens_per_s_per_gpu']:9,.0f} {r['tokens_per_s_per_node']:10,.0f} "
                  f"{r['headroom_gb']:7.0f} GB {r['headroom_fraction']:3.0%}")
        else:
            print(f"{r['family']:>9} {'none meets the limit':>18}")
    print("headroom = memory left on the fullest GPU; tok/s/node = per GPU x "
          f"{hw.gpus_per_node} ({hw.gpus_per_node}-GPU nodes)")
    return 0


def _plan_kinds(args, cfg, choice, work, overlap) -> int:
    """--kinds: the cheapest plan of each hardware option under the TPOT limit, cheapest first."""
    from .kinds import cost_fields, search_options, split_words
    from .planner import explain, explain_text, plan_label
    rows = search_options(cfg, choice, args.gpus, work, args.tpot_limit_ms * 1e-3, max_batch=args.max_batch,
                          max_microbatches=args.max_microbatches, overlap=overlap)
    found = [(label, sim) for label, sim in rows if sim is not None]
    if not found:
        raise ValueError(f"no plan on any of {', '.join(label for label, _ in rows)} meets TPOT <= "
                         f"{args.tpot_limit_ms} ms on {args.gpus} GPUs")
    best = found[0][1]
    goal = f"lowest USD per million output tokens with TPOT <= {args.tpot_limit_ms} ms (batch 1..{args.max_batch})"
    planned = dict(batch=best.work.batch, context=work.context, lm_head=work.lm_head, overlap=overlap, goal=goal,
                   dispatch=work.dispatch, split=split_words(best))
    written = write_plan_file(args, cfg, best.hw, [best], planned, explain_text(best))
    if args.json:
        out = [{"hardware_option": label, "split": split_words(sim) if sim else None,
                **({**sim.summary(), **cost_fields(sim, choice.prices), "plan_fields": plan_to_dict(sim.plan),
                    "explain": explain(sim)} if sim else {"plan": "none meets the TPOT limit"})} for label, sim in rows]
        print(json.dumps(_doc("plan", out, args, cfg, choice.hw, plan_file=written, context=work.context, goal=goal,
                              tpot_limit_ms=args.tpot_limit_ms, prices=choice.prices,
                              hardware_options={label: hw.link_info() for label, hw in choice.options})))
        return 0
    print(f"model {cfg.name}, {args.gpus} GPUs in all, context {work.context}, {work.dispatch} dispatch; goal: {goal}")
    for label, hw in choice.options:
        if not hasattr(hw, "attention"):
            print(f"  {hw.summary()}")
    print("prices (USD per GPU-hour): " + ", ".join(f"{k} {v:g}" for k, v in sorted(choice.prices.items())))
    print(f"{'hardware':<34} {'plan':>16} {'batch':>6} {'TPOT ms':>8} {'tok/s':>9} {'$/h':>8} {'$/M tok':>8}")
    for label, sim in rows:
        if sim is None:
            print(f"{label:<34} {'none meets the TPOT limit':>16}")
            continue
        c = cost_fields(sim, choice.prices)
        print(f"{label:<34} {plan_label(sim.plan, cfg):>16} {sim.work.batch:>6} {sim.tpot_s * 1e3:8.3f} {sim.tps:9,.0f} "
              f"{c['usd_per_hour']:8.2f} {c['usd_per_m_output_tokens']:8.3f}")
    print(f"cheapest: {split_words(best)}, {plan_label(best.plan, cfg)}")
    if any(sim is not None and plan_label(sim.plan, cfg).endswith(" rr") for _, sim in rows):
        print(RR_NOTE)
    print(explain_text(best))
    if written:
        print(f"wrote {written}: `masep run --plan {written}` runs {describe(best.plan)}")
    return 0


RR_NOTE = ("rr = the experts placed round-robin, expert j % E on expert rank j (each held by several ranks); "
           "--json and --out carry the full placement")


PLAN_FILE_NUMBERS = ("tpot_ms", "tps", "step_ms", "tokens_per_s", "floor_ms", "tpot_over_floor", "mbu", "mfu",
                     "memory_max_gb")


def write_plan_file(args, cfg: ModelConfig, hw, ranked: list, planned_for: dict, reasons: str) -> str | None:
    """--out FILE: the winner (ranked[0]) as a plan file that `masep run|serve|train|bench dist
    --plan FILE` take, with the model, GPUs and hardware it was planned for, the prediction, the
    planner's reasons and the runners-up. None without --out; ValueError when it cannot be written."""
    if not getattr(args, "out", None):
        return None
    from ..plan import plan_file_text

    def numbers(sim, keys=PLAN_FILE_NUMBERS) -> dict:
        d = sim.summary()
        return {k: float(f"{d[k]:.6g}") if isinstance(d[k], float) else d[k] for k in keys if k in d}

    model = dict(model=args.model) if args.model else dict(preset=args.preset or "paper")
    where = dict(**model, model_name=cfg.name, gpus=args.gpus, hardware=args.hardware, hardware_name=hw.name,
                 calibration=args.calibration, **planned_for)
    text = plan_file_text(ranked[0].plan, where, numbers(ranked[0]), reasons.splitlines(),
                          [dict(plan=describe(s.plan), **numbers(s, PLAN_FILE_NUMBERS[:4])) for s in ranked[1:]])
    try:
        Path(args.out).write_text(text)
    except OSError as err:
        raise ValueError(f"--out {args.out}: cannot write it ({err.strerror or err})") from None
    return args.out


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="choose the parallel plan for N GPUs from simulated step times",
                              description="Enumerate legal plans (separated, tp_pp, ep), simulate them and rank "
                              "them by TPOT, or by tok/s under --tpot-limit-ms; explain the winner.",
                              formatter_class=HelpFormatter)
    _common(p)
    p.add_argument("--tpot-limit-ms", type=float, default=None,
                   help="rank by tok/s among plans (and batches up to --max-batch) under this TPOT")
    p.add_argument("--max-batch", type=int, default=1024, help="largest batch tried with --tpot-limit-ms")
    p.add_argument("--top", type=int, default=5, help="plans to list")
    p.add_argument("--strategies", default=None, help="comma list (default: all): separated,tp_pp,ep,single")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="write the winner as a plan file (TOML) that `masep run|serve|train|bench dist --plan FILE` "
                        "take")
    p.add_argument("--train", action="store_true",
                   help="plan a training step (forward + backward + gradient sync + optimizer) instead of decode: "
                   "--batch is sequences per step, --seq-len their length")
    p.add_argument("--seq-len", type=int, default=2048, help="with --train: tokens per sequence")
    p.add_argument("--grad-compression", choices=("none", "int8"), default="none",
                   help="with --train: gradient compression of the sync")
    add_kind_args(p)
    p.add_argument("--by-family", action="store_true",
                   help="with --tpot-limit-ms: the best plan of each strategy family (separated, ep, tp_pp), with "
                        "tok/s per GPU and per node and memory headroom")
    p.set_defaults(func=cmd_plan)
    return p


def _doc(command: str, rows: list[dict], args, cfg: ModelConfig, hw, **meta) -> dict:
    """The --json document (masep/report.py) of a simulated command: the model and the profile in meta."""
    return document(command, rows, args, model=dataclasses.asdict(cfg),
                    hardware={**profile_info(hw, getattr(args, "gpus", None)), "links": hw.link_info()}, **meta)


def _emit(args, doc: dict, lines: list[str], files=()) -> int:
    """--json: the document; else the text lines, then the files written."""
    print(json.dumps(doc) if args.json else "\n".join([*lines, *(f"wrote {f}" for f in files)]))
    return 0


# --- simulate ------------------------------------------------------------------------------------------------
def cmd_simulate(args) -> int:
    from .planner import explain_text, seeds_table
    from .trace import gantt_png, write_trace
    try:
        if args.trace:  # the Gantt PNGs come last: fail before simulating, not after
            require_matplotlib("masep simulate --trace")
        cfg, hw, work = _setup(args)
        extra = [parse_plan(p) for p in args.plan or []]
        for plan in extra:
            plan.validate(cfg, args.gpus)
        log.info("masep simulate: %s on %d x %s, batch %d, context %d", cfg.name, args.gpus, hw.name, work.batch,
                 work.context)
        rows, sims = seeds_table(cfg, hw, args.gpus, work, max_microbatches=args.max_microbatches,
                                 overlap=not args.serial, extra_plans=extra)
    except ValueError as err:
        return _fail(str(err))
    files = []
    if args.trace:
        out = Path(args.trace)
        for i, sim in enumerate(sims):
            slug = f"{i:02d}_" + re.sub(r"[^a-z0-9]+", "_", describe(sim.plan).lower()).strip("_")
            files += [str(write_trace(sim, out / f"{slug}.trace.json")), str(gantt_png(sim, out / f"{slug}.gantt.png"))]
    best = [explain_text(sims[-1])] if sims else []
    doc = _doc("simulate", rows, args, cfg, hw, batch=work.batch, context=work.context, lm_head=work.lm_head,
               overlap=not args.serial, files=files)
    return _emit(args, doc, [_header(cfg, hw, args.gpus, work, args.serial), table(rows), FOOTNOTES, *best], files)


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("simulate", help="simulate the MA Separation paper's table: its claims vs TPxPP, "
                              "separated, EP and the best plan",
                              description="Simulate one decode step of the MA Separation paper's splits and the "
                              "planner's best plan; print each beside its physical floor and MBU (the floors: "
                              "docs/reference.md).",
                              formatter_class=HelpFormatter)
    _common(p)
    p.add_argument("--trace", metavar="DIR", default=None, help="write a Chrome trace + Gantt PNG per simulated row")
    p.add_argument("--plan", action="append", default=None,
                   help="also simulate this plan, e.g. 'sep 4x1+12 m2', 'tp8pp2 m2', 'ep16 m1' (repeatable; the "
                        "notation of `masep plan`)")
    p.set_defaults(func=cmd_simulate)
    return p


# --- sweep ---------------------------------------------------------------------------------------------------
def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: must be a comma list of integers") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: needs positive integers")
    return values


def cmd_sweep(args) -> int:
    from .sweep import DEFAULT_BATCHES, DEFAULT_CONTEXTS, SWEEP_STRATEGIES, run_sweep, summary_lines, write_sweep
    try:
        require_matplotlib("masep sweep")  # before the minute of planning, not after it
        cfg, hw, work = _setup(args)
        batches = _int_list(args.batches, "--batches") if args.batches else DEFAULT_BATCHES
        contexts = _int_list(args.contexts, "--contexts") if args.contexts else DEFAULT_CONTEXTS
        strategies = tuple(s.strip() for s in args.strategies.split(",")) if args.strategies else SWEEP_STRATEGIES
        bad = sorted(set(strategies) - set(SWEEP_STRATEGIES))
        if bad:
            raise ValueError(f"--strategies {args.strategies}: unknown {bad}; choose from {list(SWEEP_STRATEGIES)}")
        log.info("masep sweep: %s on %d x %s, %d batches (context %d) and %d contexts (batch %d), strategies %s; "
                 "writing %s", cfg.name, args.gpus, hw.name, len(batches), work.context, len(contexts), work.batch,
                 ", ".join(strategies), args.out)
        with progress(len(batches) + len(contexts), "sweep points", "point", delay=0.5) as bar:
            doc = run_sweep(cfg, hw, args.gpus, batch=work.batch, context=work.context, batches=batches,
                            contexts=contexts, lm_head=work.lm_head, strategies=strategies,
                            max_microbatches=args.max_microbatches, overlap=not args.serial,
                            progress=lambda axis, value: bar.update(1))
    except ValueError as err:
        return _fail(str(err))
    files = write_sweep(doc, args.out)
    rows = [dict(axis=axis[len("over_"):], **point) for axis in ("over_batch", "over_context") for point in doc[axis]]
    meta = {k: v for k, v in doc.items() if k not in ("over_batch", "over_context", "model", "hardware",
                                                      "hardware_source", "gpus")}
    lines = [_header(cfg, hw, args.gpus, work, args.serial), *summary_lines(doc),
             "speedup = best baseline (tp_pp, ep) TPOT / best separated TPOT: > 1 where separation "
             "wins; split = its attention:expert GPUs"]
    return _emit(args, _doc("sweep", rows, args, cfg, hw, files=[str(f) for f in files], **meta), lines, files)


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sweep", help="plot TPOT and tok/s over batch and context for each strategy",
                              description="Best plan of each strategy over batch (at --context) and over context "
                              "(at --batch); writes sweep.json, sweep_batch.png and sweep_context.png.",
                              formatter_class=HelpFormatter)
    _common(p)
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    p.add_argument("--batches", default=None, help="comma list (default 1,2,4,...,1024)")
    p.add_argument("--contexts", default=None, help="comma list (default 512,1024,...,32768)")
    p.add_argument("--strategies", default=None, help="comma list (default tp_pp,ep,separated)")
    p.set_defaults(func=cmd_sweep)
    return p


# --- replan --------------------------------------------------------------------------------------------------
def cmd_replan(args) -> int:
    from .replan import load_measured, replan
    try:
        measured = load_measured(args.measured)
        hw = load_hardware(args.hardware or measured.hardware or DEFAULT_HARDWARE, args.calibration, args.gpus_per_node)
        result = replan(measured, hw, args.threshold, gpus=args.gpus, max_microbatches=args.max_microbatches)
    except ValueError as err:
        return _fail(str(err))
    if args.json:
        print(json.dumps(document("replan", [result], args, model=dataclasses.asdict(measured.cfg),
                                  hardware=profile_info(hw, result["gpus"]))))
        return 0
    r = result
    print(f"running plan {r['plan']} on {r['gpus']} x {r['hardware']}, batch {r['batch']}, context {r['context']}")
    if r["measured_tpot_ms"] is not None:
        print(f"measured TPOT {r['measured_tpot_ms']:.3f} ms")
    print(f"predicted TPOT {r['predicted_tpot_ms_before_refit']:.3f} ms before refit, "
          f"{r['predicted_tpot_ms']:.3f} ms after")
    print("refit (measured / predicted per op kind): " +
          (", ".join(f"{k} x{v:.2f}" for k, v in r["refit_factors"].items()) or "nothing to refit"))
    if r["note"]:
        print(f"note: {r['note']}")
    print(f"best plan under the refit model: {r['best_plan']} at {r['best_tpot_ms']:.3f} ms (gain {r['gain']:.1%})")
    print(r["advice"])
    return 0


def add_replan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("replan", help="refit the cost model to measured op times and propose a new plan",
                              description="Read a run's measured per-op times, refit the cost model's efficiencies "
                              "and propose a new plan when its predicted gain passes --threshold.",
                              formatter_class=HelpFormatter)
    p.add_argument("--measured", metavar="FILE", required=True, help="JSON with the plan and busy_s or measurements")
    p.add_argument("--threshold", type=float, default=0.1, help="minimum predicted gain (fraction of TPOT)")
    p.add_argument("--hardware", default=None, help="profile (default: the file's, else a100-80g)")
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help="calibration JSON from `masep bench calibrate` (overrides the profile's rates)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="NVLink domain size (default: the profile's)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default: the running plan's)")
    p.add_argument("--max-microbatches", type=int, default=4, help="largest m tried for each plan")
    p.add_argument("--json", action="store_true", help="print one JSON document ({meta, rows}) instead of a table")
    p.set_defaults(func=cmd_replan)
    return p


def add_perf_parsers(subparsers) -> None:
    """All perf subcommands at once."""
    from .calcheck import add_calcheck_parser
    for add in (add_plan_parser, add_simulate_parser, add_sweep_parser, add_replan_parser, add_calcheck_parser):
        add(subparsers)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m masep.perf.cli plan ...`) until masep/cli.py hooks these in."""
    parser = argparse.ArgumentParser(prog="masep")
    sub = parser.add_subparsers(dest="command", required=True)
    add_perf_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
