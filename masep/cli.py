"""Command line: `masep COMMAND ...` (also `python -m masep COMMAND ...`).

Thin by design: parse, check every argument before any work starts (a bad one exits 2 with
a message naming the value and the rule), build library objects, call library functions, print.

Extending it:
  - a strategy: a plan in masep/plan.py and a runtime that keeps the runtime contract
    (masep/runtime.py); add it to STRATEGIES, its flags to `add_distributed_args` and their
    checks to `check_run_args`;
  - a subcommand: write `add_<name>_args(parser)` and `cmd_<name>(args, parser) -> int`
    and add a `Subcommand` to SUBCOMMANDS.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .config import PRESET_HELP, PRESETS, ModelConfig, from_hf_config, preset
from .engine import Request, random_prompts
from .engine.executor import LocalExecutor
from .logs import add_log_arg, progress, setup_logging
from .model import BlockParts, CacheLayout, MoETransformer, build_model, kv_heads_for
from .options import HelpFormatter
from .parallel.schedule import COMM_KINDS
from .runtime import LocalRuntime

RUN_DTYPES = ("float32", "bfloat16")
DEFAULT_PRESET = "small"
log = logging.getLogger("masep.cli")


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a preset with random weights from `seed`, or an HF checkpoint
    directory. Distributed strategies pass it to each rank, which builds only its own part."""

    preset: str | None = None
    path: str | None = None
    seed: int = 0

    def build(self, cfg: ModelConfig, device: str) -> MoETransformer:
        if self.path is not None:
            from . import from_pretrained
            return from_pretrained(self.path, dtype=cfg.torch_dtype, device=device).eval()
        return build_model(cfg, seed=self.seed, device=device)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- pieces shared by strategies and subcommands --------------------------------------------
def load_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[ModelConfig, ModelSource]:
    """The model config (dtype resolved) and where its weights come from; errors exit 2.
    A checkpoint's config.json and safetensors headers (names, shapes, dtypes) are checked here,
    cheaply: a bad one used to surface only once every rank had started."""
    from .checkpoint import validate_checkpoint
    try:
        if args.model is not None:
            cfg, source = from_hf_config(args.model), ModelSource(path=args.model, seed=args.seed)
            validate_checkpoint(args.model)
        else:
            name = args.preset or DEFAULT_PRESET
            cfg, source = preset(name), ModelSource(preset=name, seed=args.seed)
    except ValueError as err:
        parser.error(str(err))
    return cfg.replace(dtype=args.dtype or cfg.dtype), source


def draw_prompts(args: argparse.Namespace, cfg: ModelConfig, tokenizer=None) -> list[list[int]]:
    """Token ids of the prompts: --prompt texts, --prompts-file lines, or random ids."""
    if args.prompt:
        return [tokenizer.encode(text) for text in args.prompt]
    if args.prompts_file:
        return [p for p, _ in read_prompt_file(args.prompts_file, tokenizer)]
    return random_prompts(args.batch, args.prompt_len, cfg.vocab_size, args.seed)


def read_prompt_file(path: str, tokenizer) -> list[tuple[list[int], int | None]]:
    """JSONL: one {"prompt": text} or {"prompt_token_ids": [ids]} per line, optionally with
    "max_tokens"; ValueError names the line and the rule."""
    out = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as err:
        raise ValueError(f"--prompts-file {path}: cannot read it ({err.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--prompts-file {path}, line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or ("prompt" in row) == ("prompt_token_ids" in row):
            raise ValueError(f"--prompts-file {path}, line {n}: needs exactly one of 'prompt' (text) or "
                             "'prompt_token_ids' (a list of ints)")
        ids = row.get("prompt_token_ids")
        if ids is None:
            if not isinstance(row["prompt"], str):
                raise ValueError(f"--prompts-file {path}, line {n}: 'prompt' must be a string")
            ids = tokenizer.encode(row["prompt"])
        elif not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"--prompts-file {path}, line {n}: 'prompt_token_ids' must be a list of ints")
        max_tokens = row.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"--prompts-file {path}, line {n}: max_tokens={max_tokens!r} must be an integer >= 1")
        out.append((ids, max_tokens))
    if not out:
        raise ValueError(f"--prompts-file {path}: no prompts in it")
    return out


def make_requests(args: argparse.Namespace, cfg: ModelConfig, tokenizer=None) -> list[Request]:
    """Request i samples with seed `seed + i`: the same tokens on any strategy, unit or batch."""
    per_line = [m for _, m in read_prompt_file(args.prompts_file, tokenizer)] if args.prompts_file else []
    prompts = draw_prompts(args, cfg, tokenizer)
    return [Request(prompt, (per_line[i] if i < len(per_line) and per_line[i] else args.max_new_tokens),
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed + i)
            for i, prompt in enumerate(prompts)]


def resolved_config(args: argparse.Namespace, cfg: ModelConfig, source: ModelSource) -> dict:
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    return dict(model=dataclasses.asdict(cfg), model_source=source.to_dict(), strategy=args.strategy,
                batch=args.batch, prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, dtype=cfg.dtype,
                device=args.device, device_name=device_name, seed=args.seed, warmup=args.warmup,
                torch_version=torch.__version__, masep_version=__version__)


def _row(label: str, value) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<40}{text:>12}"


def print_report(report: dict, file=None) -> None:
    """The resolved config, then the metrics in vLLM `bench serve`'s layout."""
    file = file or sys.stdout
    c, m = report["config"], report["config"]["model"]
    print(f"masep {c['masep_version']}  torch {c['torch_version']}  device {c['device']} ({c['device_name']})"
          f"  dtype {c['dtype']}  strategy {c['strategy']}  seed {c['seed']}", file=file)
    kv = (f"MLA, {m['kv_lora_rank']} + {m['qk_rope_head_dim']} cached per token" if m.get("kv_lora_rank")
          else f"kv {m['num_kv_heads']}")
    print(f"model {m['name']}: {m['num_layers']} layers, hidden {m['hidden_size']}, heads {m['num_heads']}"
          f" ({kv}, dim {m['head_dim']}), {m['num_experts']} experts top-{m['top_k']}"
          f" ({m['expert_act']}, hidden {m['expert_hidden']}), vocab {m['vocab_size']}", file=file)
    print(f"workload: batch {c['batch']}, prompt {c['prompt_len']}, max new tokens {c['max_new_tokens']},"
          f" temperature {c['temperature']}, top-p {c['top_p']}, top-k {c['top_k']},"
          f" warm-up runs {c['warmup']}", file=file)
    r = report
    lines = ["{s:=^52}".format(s=" masep run result "), _row("Successful requests:", r["completed"]),
             _row("Failed requests:", r["failed"]), _row("Duration (s):", r["duration"]),
             _row("Total input tokens:", r["total_input_tokens"]),
             _row("Total generated tokens:", r["total_output_tokens"]),
             _row("Request throughput (req/s):", r["request_throughput"]),
             _row("Output token throughput (tok/s):", r["output_throughput"]),
             _row("Total token throughput (tok/s):", r["total_token_throughput"])]
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:-^52}".format(s=title))
        for stat in ("mean", "median", "p99"):
            lines.append(_row(f"{stat.capitalize() if stat != 'p99' else 'P99'} {key.upper()} (ms):",
                              r[f"{stat}_{key}_ms"]))
    lines.append("=" * 52)
    print("\n".join(lines), file=file)
    for i, err in enumerate(r["errors"]):
        if err is not None:
            print(f"request {i} failed: {err}", file=file)
    if r.get("restored_from_journal"):
        print(f"journal: {len(r['restored_from_journal'])} request(s) finished by an earlier attempt were taken "
              "from the journal (not timed here)", file=file)
    for f in r.get("failovers", []):
        fate = (f"{len(f['moved'])} request(s) moved to live replicas (recompute)" if f["moved"] else
                f"{len(f['failed'])} request(s) failed")
        print(f"failover: attention replica {f['unit']} lost ({f['reason']}); {fate}", file=file)
    if "plan_text" in r:
        print_distributed(r, file)
    if "check" in r:
        c = r["check"]
        if c.get("non_finite_logits"):
            verdict = (f"FAILED: the single-device model produced {c['non_finite_logits']} non-finite logits "
                       "(NaN or inf), so its tokens mean nothing (weights that overflow the dtype?)")
        elif c["match"]:
            verdict = f"generated tokens of all {len(r['tokens'])} requests are identical to the single-device model"
        else:
            verdict = f"generated tokens DIFFER from the single-device model in requests {c['mismatched_requests']}"
        print(f"check: {verdict}", file=file)


def print_distributed(r: dict, file) -> None:
    """The plan, each rank's busy time by op kind, and the expert-load histogram."""
    print(f"plan {r['plan_notation']}: {r['plan_text']}", file=file)
    print("wall time per rank over all rounds (warm-up included), by op kind (ms); communication ops include waiting "
          "for peers:", file=file)
    for row in r["busy"]:
        ms = row["busy_ms"]
        compute = sum(v for k, v in ms.items() if k not in COMM_KINDS)
        ops = "  ".join(f"{k} {v:.1f}" for k, v in sorted(ms.items()))
        print(f"  rank {row['rank']:>3} {row['role']:<9} compute {compute:8.1f}  "
              f"communication {sum(ms.values()) - compute:8.1f}  | {ops}", file=file)
    if r.get("expert_load"):
        load = torch.tensor(r["expert_load"]).sum(0)
        share = load.float() / max(1, int(load.sum()))
        print("expert load (token-expert assignments, all layers): " + " ".join(
            f"e{e}:{int(n)}" for e, n in enumerate(load)), file=file)
        print(f"  max/mean = {float(share.max() * len(share)):.2f} (1.00 = perfectly even)", file=file)


# --- strategies ----------------------------------------------------------------------------
def build_plan(args: argparse.Namespace, cfg: ModelConfig):
    """The validated plan of the strategy and its flags (ValueError names the field and the rule)."""
    from .plan import EpPlan, SeparatedPlan, SinglePlan, TpPpPlan
    m = args.microbatches
    if args.strategy == "single":
        plan = SinglePlan(m if m is not None else 1)
    elif args.strategy == "separated":
        plan = SeparatedPlan(args.attn_replicas, args.attn_tp, args.expert_ranks, m if m is not None else 2,
                             placement=parse_placement(args.placement), seq_split=getattr(args, "seq_split", False))
    elif args.strategy == "tp_pp":
        plan = TpPpPlan(args.tp, args.pp, m if m is not None else args.pp)
    else:
        plan = EpPlan(args.ep, m if m is not None else 2, placement=parse_placement(args.placement))
    return plan.validate(cfg)


def parse_placement(text: str | None):
    """'0,1,2;3-7' -> ((0, 1, 2), (3, 4, 5, 6, 7)): expert ids per expert rank (plan.parse_placement,
    the syntax of the plan notation's placement=)."""
    from .plan import parse_placement as parse
    return parse(text, "--placement")


def run_spec(args: argparse.Namespace, cfg: ModelConfig, source: ModelSource):
    """What every rank needs (the plan; None for strategy single)."""
    from .parallel.worker import RunSpec
    plan = build_plan(args, cfg) if args.strategy != "single" else None
    return RunSpec(plan=plan, requests=[], preset=source.preset, config=cfg if source.preset else None,
                   model_dir=source.path, seed=args.seed, dtype=cfg.dtype, device=args.device, backend=args.backend,
                   timeout_s=args.timeout, trace_dir=args.trace, quiet=True, eager=args.eager)


def kv_settings(args: argparse.Namespace, cfg: ModelConfig, requests: list[Request] | None = None):
    from .launcher import KvSettings
    longest = max((len(r.prompt) + r.max_new_tokens for r in requests), default=1) if requests else None
    return KvSettings(args.max_model_len or longest or cfg.max_seq_len, args.max_num_seqs,
                      args.gpu_memory_utilization, args.max_num_batched_tokens).validate(cfg)


def run_strategy(args, cfg: ModelConfig, source: ModelSource, tokenizer, requests: list[Request]) -> dict | None:
    """Warm-up rounds, then the timed round, of `requests` through the scheduler on the
    strategy's executor (this process for single; rank processes otherwise). None on torchrun
    ranks other than 0."""
    from .engine.generate import run_requests
    from .launcher import make_executor, scheduler_config
    from .parallel.launch import launched_by_torchrun
    kv = kv_settings(args, cfg, requests)
    if args.max_num_seqs is None:
        kv.max_num_seqs = max(1, len(requests))  # a static batch: one slot per request by default
    sched = scheduler_config(kv, cfg, None if args.ignore_eos else tokenizer, args.protection)
    run = run_spec(args, cfg, source)
    check_protection(args, run.plan, args.subparser)
    faults = fault_specs(args, run.plan, args.subparser)

    def rounds(executor) -> dict:
        failovers = []  # of every round: a replica lost in the warm-up stays lost
        journal, done = None, {}
        try:
            if args.journal:
                from .engine.journal import Journal
                journal = Journal(args.journal, requests)
                done = journal.load()
            todo = [i for i in range(len(requests)) if i not in done]
            batch = [requests[i] for i in todo]
            tokens = sum(r.max_new_tokens for r in batch)  # at most: EOS may end requests sooner
            for n in range(args.warmup if batch else 0):  # first calls pay for lazy init, allocator growth, ...
                with progress(tokens, f"warm-up {n + 1}/{args.warmup}", "tok") as bar:
                    failovers += run_requests(ProgressExecutor(executor, bar), batch, sched, cfg).failovers
            record = None if journal is None else (
                lambda j, seq: journal.record(todo[j], seq.output, seq.finish_reason, seq.error))
            with progress(tokens, "timed round", "tok") as bar:
                timed = run_requests(ProgressExecutor(executor, bar), batch, sched, cfg, on_finish=record)
        except BaseException:
            executor.shutdown()
            raise
        result = timed.to_dict()
        if done:  # requests an earlier attempt finished: their tokens from the journal, no timings
            result.update(merge_journal(result, todo, done, len(requests)))
        result["failovers"] = [dataclasses.asdict(f) for f in failovers + timed.failovers]
        result["reports"] = executor.shutdown() if run.plan is not None else None
        return result

    if run.plan is None:
        from .parallel.worker import _maybe_profile
        model = source.build(cfg, args.device)
        with _maybe_profile(args.trace, 0):  # --trace: this process is the one rank, DIR/rank0.json
            return rounds(make_executor(run, kv, single_model=model, fused=args.fused))
    if launched_by_torchrun():
        from .parallel.cluster import run_under_torchrun
        from .parallel.rank_loop import KvBudget
        return run_under_torchrun(run, KvBudget(kv.max_model_len, kv.gpu_memory_utilization), kv.max_num_seqs,
                                  rounds, faults)
    return rounds(make_executor(run, kv, faults=faults, mirror=args.protection == "mirror"))


class ProgressExecutor:
    """An executor that advances a progress bar by the tokens each step samples; everything else
    is the wrapped executor's."""

    def __init__(self, inner, bar):
        self._inner, self._bar = inner, bar

    def step(self, step_id: int, rows: dict) -> dict:
        sampled = self._inner.step(step_id, rows)
        self._bar.update(sum(t is not None for tokens in sampled.values() for t in tokens))
        return sampled

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def merge_journal(result: dict, todo: list[int], done: dict[int, dict], total: int) -> dict:
    """Tokens and errors of every request, in request order: this attempt's for `todo`, the
    journal's for the others. Timing metrics stay this attempt's own."""
    mine = dict(zip(todo, zip(result["tokens"], result["errors"])))
    tokens = [mine[i][0] if i in mine else done[i]["tokens"] for i in range(total)]
    errors = [mine[i][1] if i in mine else done[i]["error"] for i in range(total)]
    return dict(tokens=tokens, errors=errors, restored_from_journal=sorted(done))


def describe_ranks(report: dict, plan, cfg: ModelConfig) -> dict:
    """Busy time per rank and the expert-load histogram from the ranks' reports."""
    reports = report.pop("reports") or {}
    load = None
    for rep in reports.values():
        if "load" in rep:
            lay = torch.tensor(rep["load"])
            load = lay if load is None else load + lay
    from .plan import format_plan
    return dict(plan=dict(dataclasses.asdict(plan), strategy=plan.strategy), plan_notation=format_plan(plan),
                plan_text=plan.describe(cfg),
                busy=[dict(rank=r, role=rep["role"], busy_ms={k: v * 1e3 for k, v in rep["busy_s"].items()})
                      for r, rep in sorted(reports.items())],
                expert_load=load.tolist() if load is not None else None)


STRATEGIES = ("single", "separated", "tp_pp", "ep")
STRATEGY_HELP = ("single: one device; separated: attention and experts on separate ranks; tp_pp: tensor x "
                 "pipeline parallel; ep: expert parallel (every rank holds attention and a share of the experts)")


# --- subcommand: run -----------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help=f"built-in model with random weights from --seed (default: {DEFAULT_PRESET}); "
                            f"{PRESET_HELP}")
    which.add_argument("--model", metavar="DIR", default=None,
                       help="HF checkpoint directory (Mixtral, Qwen2-MoE, Qwen3-MoE: config.json + safetensors)")
    p.add_argument("--dtype", choices=RUN_DTYPES, default=None, help="default: the model config's dtype")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: ranks talk over gloo; cuda: one GPU per rank, NCCL")
    p.add_argument("--seed", type=int, default=0, help="weights (presets), prompts and per-request sampling")
    p.add_argument("--eager", action="store_true",
                   help="CUDA: plain PyTorch, no CUDA graphs or Triton kernels (any strategy)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    from .options import add_config_arg
    add_config_arg(p)
    add_model_args(p)
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default="single", help=STRATEGY_HELP)
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a text prompt (repeat for several); default: --batch random prompts")
    p.add_argument("--prompts-file", metavar="JSONL", help='one {"prompt": text} or {"prompt_token_ids": [...]} '
                   'per line (optionally with "max_tokens")')
    p.add_argument("--batch", type=int, default=8, help="number of random prompts")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per random prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="output tokens per request at most")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens even past EOS")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of the same batch before the timed one")
    p.add_argument("--json", action="store_true", help="print one JSON document ({meta, rows}) instead of the tables")
    p.add_argument("--fused", action="store_true",
                   help="CUDA, --strategy single: also the fused Triton norm/RoPE/router kernels")
    p.add_argument("--check", action="store_true",
                   help="also run the single-device model on the same requests and compare the tokens")
    p.add_argument("--journal", metavar="FILE", default=None,
                   help="record each finished request in FILE (JSON lines); a restarted run (torchrun "
                        "--max-restarts) runs only the requests it does not list")
    add_distributed_args(p)
    add_kv_args(p, default_seqs="one per request")


def add_kv_args(p: argparse.ArgumentParser, default_seqs: str) -> None:
    k = p.add_argument_group("KV cache and scheduling (vLLM's flags)")
    k.add_argument("--max-model-len", type=int, default=None,
                   help="positions per KV slot: prompt + output of one request (default: the model's max_seq_len; "
                        "for run, the longest request)")
    k.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"KV slots per attention unit (replica / EP rank); default: {default_seqs} on CPU, what "
                        "--gpu-memory-utilization allows on CUDA")
    k.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA: share of each GPU's memory for weights + KV cache")
    k.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="prompt tokens per prefill step (longer prompts are prefilled in chunks)")


def add_distributed_args(p: argparse.ArgumentParser, inference: bool = True) -> None:
    """The plan's flags; `inference`: also prefill splitting, traces and failure handling."""
    d = p.add_argument_group("distributed strategies (separated, tp_pp, ep)")
    d.add_argument("--plan", metavar="FILE|PLAN", default=None,
                   help="a plan file written by `masep plan --out FILE`, or a plan in its notation ('sep 1x3+1 m2', "
                        "'tp2pp2 m2', 'ep4 m2', 'single'): sets --strategy and the plan's flags (and the model it "
                        "was planned for, unless --preset/--model is given); flags that disagree are an error")
    d.add_argument("--attn-replicas", type=int, default=1, help="separated: data-parallel attention replicas R")
    d.add_argument("--attn-tp", type=int, default=1, help="separated: head-parallel ranks per replica T")
    d.add_argument("--expert-ranks", type=int, default=1, help="separated: expert ranks E")
    d.add_argument("--microbatches", type=int, default=None,
                   help="micro-batches per step (default: 2 for separated/ep, pp for tp_pp)")
    d.add_argument("--placement", default=None,
                   help="separated, ep: expert ids per expert rank, e.g. '0,1,2,3;4,5,6,7' or '0-3;4-7'")
    if inference:
        d.add_argument("--seq-split", action="store_true", help="separated: cut prefill prompts into sequence chunks")
    d.add_argument("--tp", type=int, default=1, help="tp_pp: tensor-parallel ranks per stage")
    d.add_argument("--pp", type=int, default=1, help="tp_pp: pipeline stages")
    d.add_argument("--ep", type=int, default=1, help="ep: expert-parallel ranks (each with its own attention)")
    d.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="auto: gloo on CPU, NCCL on CUDA; gloo with --device cuda lets ranks share one GPU")
    d.add_argument("--timeout", type=timeout_seconds, default=120.0,
                   help="seconds any rank waits for a peer before failing")
    if not inference:
        return
    d.add_argument("--trace", metavar="DIR", default=None, help="write a Chrome trace per rank to DIR/rank<r>.json")
    f = p.add_argument_group("failures (separated: an attention replica can die without stopping the others)")
    f.add_argument("--protection", choices=("recompute", "mirror", "none"), default="recompute",
                   help="requests of a dead attention replica: recompute = move them to live replicas, which "
                        "prefill prompt + generated tokens and go on; mirror = every replica also keeps the next "
                        "one's KV rows (twice the KV memory) and continues its requests without recompute; "
                        "none = fail them with the reason")
    f.add_argument("--inject-fault", metavar="KIND@RANK:STEP", action="append", default=[],
                   help="tests and demos: rank RANK kills itself (kill), stops itself (hang: SIGSTOP) or raises "
                        "(raise) at step STEP; repeatable")


def check_protection(args: argparse.Namespace, plan, parser: argparse.ArgumentParser) -> None:
    if args.protection == "mirror" and (plan is None or plan.strategy != "separated" or plan.attn_replicas < 2):
        parser.error("--protection mirror: keeps each attention replica's KV rows on another replica; it needs "
                     "--strategy separated with --attn-replicas >= 2")


def fault_specs(args: argparse.Namespace, plan, parser: argparse.ArgumentParser) -> tuple:
    """--inject-fault values, parsed and checked against the plan (refused where no rank can die)."""
    from .parallel.faults import FaultSpec, check_faults
    from .parallel.launch import launched_by_torchrun
    if not args.inject_fault:
        return ()
    if plan is None:
        parser.error("--inject-fault: strategy single has no rank processes to fail; use a distributed strategy")
    if launched_by_torchrun() and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return ()  # under torchrun a fault fires in the first attempt only: the restart is what is tested
    try:
        faults = tuple(FaultSpec.parse(text) for text in args.inject_fault)
        check_faults(list(faults), plan.world_size)
    except ValueError as err:
        parser.error(str(err))
    return faults


def check_run_args(args: argparse.Namespace, cfg: ModelConfig, parser: argparse.ArgumentParser) -> None:
    """Every rule `run` needs, checked before any weight is built."""
    for flag, value, low in (("--batch", args.batch, 1), ("--prompt-len", args.prompt_len, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1), ("--warmup", args.warmup, 0),
                             ("--top-k", args.top_k, 0)):
        if value < low:
            parser.error(f"{flag}={value}: must be >= {low}")
    total = args.prompt_len + args.max_new_tokens
    if total > cfg.max_seq_len and not (args.prompt or args.prompts_file):
        parser.error(f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} = {total} "
                     f"exceeds the model's max_seq_len={cfg.max_seq_len}")
    if args.prompt and args.prompts_file:
        parser.error("--prompt and --prompts-file: give one or the other")
    if not args.temperature >= 0:
        parser.error(f"--temperature={args.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p={args.top_p}: must be in (0, 1]")
    try:
        kv_settings(args, cfg)
    except ValueError as err:
        parser.error(str(err))
    if args.strategy != "single":
        from .parallel.launch import launched_by_torchrun
        try:
            plan = build_plan(args, cfg)
            warning = check_torchrun_env(plan, cfg)
        except ValueError as err:
            parser.error(str(err))
        if warning:
            log.warning(warning)
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (args.device == "cuda" and args.backend != "gloo" and not launched_by_torchrun()
                and plan.world_size > gpus):
            parser.error(f"--device cuda: the plan needs {plan.world_size} ranks, one GPU each for NCCL, but "
                         f"{gpus} GPU(s) are visible; use a smaller plan, or --backend gloo to share GPUs")
    if args.trace is not None:
        try:
            check_trace_dir(args.trace)
        except ValueError as err:
            parser.error(str(err))
    if args.fused and (args.device != "cuda" or args.strategy != "single" or args.eager):
        parser.error("--fused: the fused Triton kernels run with --strategy single --device cuda (without --eager); "
                     "the distributed strategies use CUDA graphs and the Triton experts without them")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine "
                     f"(torch {torch.__version__}); use --device cpu")


# --- checks before any work: launch environment, output paths, weights, memory --------------
MAX_TIMEOUT_S = 1e6  # ~11.6 days: past this a wait is a typo, and far past it timedelta / lock waits overflow


def timeout_seconds(text: str) -> float:
    """argparse type of --timeout. NaN and inf used to pass a `<= 0` check and crash every rank
    when it built its timeouts, so the rule is stated positively: finite, > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of seconds > 0 "
                                         f"(at most {MAX_TIMEOUT_S:g})")
    return value


# What launch.launched_by_torchrun tests (all four set: join that world), and what torchrun also sets.
TORCHRUN_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_VARS = (*TORCHRUN_REQUIRED, "LOCAL_RANK")
UNSET_TORCHRUN = "unset " + " ".join(TORCHRUN_VARS)


def check_torchrun_env(plan, cfg: ModelConfig, environ=os.environ) -> str | None:
    """A distributed run joins the world that torchrun's variables describe when all of
    TORCHRUN_REQUIRED are set, and starts its own plan.world_size ranks otherwise. Variables left
    over in a shell used to make it wait out --timeout silently. ValueError (naming the variables
    and values, and the fix) when they cannot describe a launch of this plan: some set but not
    all, not numbers, or a world size that is not the plan's. Returns a warning when they can
    but torchrun did not set them (no TORCHELASTIC_RUN_ID): a hand-made launch is legitimate, so
    it is joined, but the user learns at once why masep waits for other ranks."""
    found = {k: environ[k] for k in TORCHRUN_VARS if k in environ}
    if not found:
        return None
    shown = " ".join(f"{k}={v}" for k, v in found.items())
    fix = (f"if they are left over from another launch, `{UNSET_TORCHRUN}` and masep starts its own "
           f"{plan.world_size} ranks; or launch every rank with `torchrun --nproc-per-node {plan.world_size} "
           "-m masep ...`")
    missing = [k for k in TORCHRUN_REQUIRED if k not in found]
    if missing:
        raise ValueError(f"environment: {shown} set but {' '.join(missing)} not: masep joins an outside launch "
                         f"only when all of {' '.join(TORCHRUN_REQUIRED)} are set; {fix}")
    rank, world = _env_int(found, "RANK", 0, fix), _env_int(found, "WORLD_SIZE", 1, fix)
    port = _env_int(found, "MASTER_PORT", 1, fix)
    if "LOCAL_RANK" in found:
        _env_int(found, "LOCAL_RANK", 0, fix)
    if rank >= world:
        raise ValueError(f"environment: RANK={rank}: must be in [0, WORLD_SIZE={world}); {fix}")
    if port > 65535:
        raise ValueError(f"environment: MASTER_PORT={found['MASTER_PORT']!r}: must be an integer in [1, 65535]; {fix}")
    try:
        plan.validate(cfg, world)  # the launch fixed the world size: the plan must match it
    except ValueError as err:
        raise ValueError(f"{err} (WORLD_SIZE={world} comes from the environment: {shown}; {fix})") from None
    if "TORCHELASTIC_RUN_ID" in environ:  # torchrun's own launch
        return None
    return (f"{shown} are set, but not by torchrun (no TORCHELASTIC_RUN_ID): this process joins that world as "
            f"rank {rank} of {world} and waits up to --timeout for the others; {fix}")


def _env_int(found: dict[str, str], name: str, low: int, fix: str) -> int:
    try:
        value = int(found[name])
    except ValueError:
        value = None
    if value is None or value < low:
        raise ValueError(f"environment: {name}={found[name]!r}: must be an integer >= {low}; {fix}")
    return value


def check_trace_dir(path: str) -> None:
    """--trace DIR must be a directory this process can create and write files in. The ranks
    write their traces only after generating, and a bad path then cost the whole run's results.
    Creating it (and a probe file) is the one test that also catches read-only file systems and
    permissions that os.access misjudges (root, ACLs)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"--trace {path}: exists and is not a directory (each rank writes DIR/rank<r>.json); "
                         "name a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as err:
        raise ValueError(f"--trace {path}: cannot create or write files in it ({err.strerror or err}); "
                         "name a writable directory") from None


def check_weights_finite(source: ModelSource, parser: argparse.ArgumentParser) -> None:
    """A checkpoint whose weights hold NaN or inf serves garbage; each load refuses it, but a
    rank finds it only after every rank has started, so the front end reads the weights once
    first. Not under torchrun: every process there is a rank, and a long scan on one would make
    the others time out at the rendezvous; each rank checks the slices it loads."""
    from .checkpoint import validate_checkpoint
    from .parallel.launch import launched_by_torchrun
    if source.path is None or launched_by_torchrun():
        return
    try:
        validate_checkpoint(source.path, check_values=True)
    except ValueError as err:
        parser.error(str(err))


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes one rank (or the single-device model) allocates."""

    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def rank_memory_needs(cfg: ModelConfig, plan, slots: int, max_len: int) -> list[MemoryNeed]:
    """Per rank of `plan` (None: the single-device model): the parameters of its part, counted on
    the meta device (so exactly what it builds, embeddings and norms included), and its KV cache:
    `slots` slots of max_len + 1 positions (one scratch) for the layers and KV heads its attention
    holds (expert ranks hold none; an MLA layer's cache is one latent per token, on every
    head-parallel rank)."""
    from .parallel.parts import rank_parts
    elt = torch.finfo(cfg.torch_dtype).bits // 8
    needs = []
    for rank in range(plan.world_size if plan is not None else 1):
        parts = rank_parts(plan, cfg, rank) if plan is not None else [BlockParts.everything(cfg)] * cfg.num_layers
        weights = sum(p.numel() for p in MoETransformer(cfg, device="meta", parts=parts).parameters()) * elt
        kv = sum(slots * (max_len + 1) * CacheLayout.of(cfg, len(kv_heads_for(cfg, p.heads))).bytes_per_position(
            cfg.torch_dtype) for p in parts if p.active and p.heads is not None)
        needs.append(MemoryNeed(weights, kv))
    return needs


def draw_scratch_bytes(cfg: ModelConfig, plan, drawn: bool) -> list[int]:
    """Per rank of `plan` (None: the single-device model): the float32 unit init_random_ holds
    beside the weights while it draws them (`drawn`: a preset; 0 for a checkpoint). Each rank
    draws only its own part (worker.load_model); the KV cache comes after, when it is freed."""
    from .model import init_scratch_numel
    from .parallel.parts import rank_parts
    if not drawn:
        return [0] * (plan.world_size if plan is not None else 1)
    if plan is None:
        return [4 * init_scratch_numel(cfg)]
    return [4 * init_scratch_numel(cfg, rank_parts(plan, cfg, r)) for r in range(plan.world_size)]


def peak_bytes(cfg: ModelConfig, plan, slots: int, max_len: int, drawn: bool) -> tuple[int, list[MemoryNeed]]:
    """Peak bytes of all of a run's ranks together, and the per-rank needs. `drawn`: the weights
    are drawn from the seed (presets), so at start-up a rank holds its weights and one draw unit
    (draw_scratch_bytes), before its KV cache exists."""
    needs = rank_memory_needs(cfg, plan, slots, max_len)
    scratch = draw_scratch_bytes(cfg, plan, drawn)
    peak = sum(n.weights + max(n.kv_cache, s) for n, s in zip(needs, scratch))
    return peak, needs


def cpu_memory_problem(cfg: ModelConfig, plan, slots: int, max_len: int, drawn: bool,
                       oracle_slots: int | None = None, slots_flag: str = "--max-num-seqs") -> str | None:
    """On CPU every rank is a process of this machine and nothing caps the KV cache: the ranks
    (and then --check's single-device model) must fit the machine's RAM together. `slots_flag`:
    the flag that set `slots`, which the message tells the user to lower."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need, needs = peak_bytes(cfg, plan, slots, max_len, drawn)
    what = (f"weights {sum(n.weights for n in needs)} + KV cache {sum(n.kv_cache for n in needs)} bytes over "
            f"{len(needs)} process(es)")
    if oracle_slots is not None:
        oracle = rank_memory_needs(cfg, None, oracle_slots, max_len)[0]
        if oracle.total > need:
            need, what = oracle.total, (f"--check's single-device model: weights {oracle.weights} + KV cache "
                                        f"{oracle.kv_cache} bytes ({oracle_slots} KV slots)")
    if need <= ram:
        return None
    return (f"{slots} KV slots ({slots_flag}) x {max_len} positions (--max-model-len): the run needs {need} bytes "
            f"({need / 2**30:.1f} GiB) of RAM = {what}, more than the {ram} bytes ({ram / 2**30:.1f} GiB) of RAM "
            f"this machine has; lower {slots_flag.split(',')[0]} or --max-model-len, or use a smaller model"
            + (" or --dtype bfloat16" if cfg.dtype == "float32" else ""))


def cuda_memory_problem(cfg: ModelConfig, plan, max_len: int, drawn: bool, gpu_memory_utilization: float
                        ) -> str | None:
    """On CUDA the runtimes size the KV cache to what --gpu-memory-utilization leaves after the
    weights (rank_loop.KvBudget), so only the weights plus one KV slot must fit. Ranks sit on GPU
    rank % gpus. The single-device model's process reads the GPU's free memory
    (torch.cuda.mem_get_info, as KvBudget does); for spawned ranks this process reads only each
    GPU's size: mem_get_info would create a CUDA context on every GPU here, taking memory from
    the ranks for the whole run."""
    gpus = torch.cuda.device_count()
    peak_per_gpu: dict[int, int] = {}
    if plan is None:
        free, total = torch.cuda.mem_get_info()
        budgets = {torch.cuda.current_device(): gpu_memory_utilization * total - (total - free)}
        peak_per_gpu[torch.cuda.current_device()] = rank_memory_needs(cfg, None, 1, max_len)[0].total
    else:
        needs = rank_memory_needs(cfg, plan, 1, max_len)
        scratch = draw_scratch_bytes(cfg, plan, drawn)
        steady: dict[int, int] = {}
        for rank, need in enumerate(needs):
            steady[rank % gpus] = steady.get(rank % gpus, 0) + need.total
            peak_per_gpu[rank % gpus] = peak_per_gpu.get(rank % gpus, 0) + need.weights + scratch[rank]
        peak_per_gpu = {g: max(steady[g], peak_per_gpu[g]) for g in steady}
        budgets = {g: gpu_memory_utilization * torch.cuda.get_device_properties(g).total_memory for g in steady}
    for gpu, need in sorted(peak_per_gpu.items()):
        if need > budgets[gpu]:
            avail = int(budgets[gpu])
            return (f"GPU {gpu} needs {need} bytes ({need / 2**30:.1f} GiB: the weights of the ranks on it plus one "
                    f"KV slot of --max-model-len={max_len}), more than the {avail} bytes ({avail / 2**30:.1f} GiB) "
                    f"--gpu-memory-utilization={gpu_memory_utilization} allows there; lower --max-model-len, use "
                    "more GPUs (a plan that spreads the weights; --backend nccl puts one rank per GPU) or a "
                    "smaller model" + (", or --dtype bfloat16" if cfg.dtype == "float32" else ""))
    return None


def check_run_memory(args: argparse.Namespace, cfg: ModelConfig, source: ModelSource, requests: list[Request],
                     parser: argparse.ArgumentParser) -> None:
    """`masep run`: refuse a KV cache or model that cannot fit before anything is built (it used
    to die a minute later in the allocator). Not under torchrun: the ranks there may span
    machines, and each one sizes its own KV cache."""
    from .parallel.launch import launched_by_torchrun
    if launched_by_torchrun():
        return
    kv = kv_settings(args, cfg, requests)
    plan = build_plan(args, cfg) if args.strategy != "single" else None
    slots = args.max_num_seqs or max(1, len(requests))  # run_strategy's default: one slot per request
    flag = "--max-num-seqs" if args.max_num_seqs else "--max-num-seqs, default: one per request (--batch)"
    if args.device == "cuda":
        problem = cuda_memory_problem(cfg, plan, kv.max_model_len, source.preset is not None,
                                      kv.gpu_memory_utilization)
    else:
        problem = cpu_memory_problem(cfg, plan, slots, kv.max_model_len, source.preset is not None,
                                     max(1, len(requests)) if args.check else None, flag)
    if problem:
        parser.error(problem)


def check_serve_memory(args: argparse.Namespace, cfg: ModelConfig, source: ModelSource,
                       parser: argparse.ArgumentParser) -> None:
    """`masep serve`: the same check with the server's defaults (the model's max_seq_len per slot,
    16 slots per attention unit on CPU)."""
    from .launcher import KvSettings
    try:
        kv = KvSettings(args.max_model_len or cfg.max_seq_len, args.max_num_seqs, args.gpu_memory_utilization,
                        args.max_num_batched_tokens, args.max_waiting).validate(cfg)
        plan = build_plan(args, cfg) if args.strategy != "single" else None
    except ValueError as err:
        parser.error(str(err))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            return  # the server's own start-up says so
        problem = cuda_memory_problem(cfg, plan, kv.max_model_len, source.preset is not None,
                                      kv.gpu_memory_utilization)
    else:
        flag = "--max-num-seqs" if args.max_num_seqs else "--max-num-seqs, default 16"
        problem = cpu_memory_problem(cfg, plan, kv.max_num_seqs or 16, kv.max_model_len, source.preset is not None,
                                     slots_flag=flag)
    if problem:
        parser.error(problem)


def cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .options import resolve_args
    resolve_args(args, parser, "run")
    cfg, source = load_config(args, parser)
    check_run_args(args, cfg, parser)
    tokenizer = _tokenizer_or_exit(source, cfg, parser)
    try:
        requests = make_requests(args, cfg, tokenizer)
    except ValueError as err:
        parser.error(str(err))
    log.info("masep run: %s on %s (%s, %s), %d request(s) of up to %d new tokens, %d warm-up round(s)%s",
             _plan_words(args, cfg), cfg.name, args.device, cfg.dtype, len(requests), args.max_new_tokens,
             args.warmup, ", then --check on the single-device model" if args.check else "")
    check_run_memory(args, cfg, source, requests, parser)
    check_weights_finite(source, parser)
    from .serve.engine_client import EngineDead
    try:
        report = run_strategy(args, cfg, source, tokenizer, requests)
    except EngineDead as err:  # a rank died and the plan cannot go on without it
        log.error("masep run: the engine stopped: %s", err)
        return 1
    if report is None:  # a torchrun rank other than 0: rank 0 prints
        return 0
    if args.strategy != "single":
        report.update(describe_ranks(report, build_plan(args, cfg), cfg))
    else:
        report.pop("reports")
        report["plan_notation"] = "single"  # --json: meta.plan_notation for every strategy
    if args.check:
        log.info("--check: the same requests through the single-device model")
        report["check"] = check_against_single(args, cfg, source, tokenizer, requests, report["tokens"])
    report.update(prompts=[r.prompt for r in requests], config=resolved_config(args, cfg, source),
                  texts=[tokenizer.decode(t) for t in report["tokens"]])
    if args.json:
        print(json.dumps(run_document(args, report)))
    else:
        print_report(report)
        print_texts(report, tokenizer)
    ok = report["failed"] == 0 and report.get("check", {}).get("match", True)
    return 0 if ok else 1


def _plan_words(args: argparse.Namespace, cfg: ModelConfig) -> str:
    """'plan sep 1x3+1 m2 (4 ranks)' or 'strategy single' for the first log line."""
    if args.strategy == "single":
        return "strategy single"
    from .plan import format_plan
    plan = build_plan(args, cfg)
    return f"plan {format_plan(plan)} ({plan.world_size} ranks)"


def run_document(args: argparse.Namespace, report: dict) -> dict:
    """`masep run --json`: meta = the model, device, plan and workload; one row = the timed round
    (vLLM's metric names, then tokens, texts, errors and per-request times)."""
    from .report import device_info, document
    row = dict(report)
    config = row.pop("config")
    model = config.pop("model")
    plan = {k: row.pop(k) for k in ("plan", "plan_notation", "plan_text") if k in row}
    return document("run", [row], args, model=model, hardware=device_info(args.device, getattr(args, "backend", None)),
                    config=config, **plan)


def _tokenizer_or_exit(source: ModelSource, cfg: ModelConfig, parser):
    from .tokenizer import load_tokenizer
    try:
        return load_tokenizer(source.path, cfg)
    except ValueError as err:
        parser.error(str(err))


def print_texts(report: dict, tokenizer, limit: int = 4, width: int = 120) -> None:
    """Prompt and output text of the first requests, one line each (Python string literals: control
    characters escaped once, printable text as it is)."""
    def show(text: str) -> str:
        return repr(text[:width]) + ("..." if len(text) > width else "")

    if getattr(tokenizer, "builtin", False) and tokenizer.vocab_size > 256:
        print(f"text: the built-in byte tokenizer gives ids 0-255 a byte each and ids 256-{tokenizer.vocab_size - 1} "
              "no text, so a random-weight model's text is short noise")
    for i, (prompt, text) in enumerate(zip(report["prompts"][:limit], report["texts"])):
        sizes = f"{len(prompt)} -> {len(report['tokens'][i])} tokens"
        print(f"request {i} ({sizes}): {show(tokenizer.decode(prompt))} -> {show(text)}")


def check_against_single(args: argparse.Namespace, cfg: ModelConfig, source: ModelSource, tokenizer,
                         requests: list[Request], tokens: list[list[int]]) -> dict:
    """The same requests through the single-device model (the oracle), with the same scheduler
    settings; greedy and seeded tokens must be identical (a mismatch makes `masep run` exit 1)."""
    from .engine.generate import run_requests
    from .launcher import scheduler_config
    kv = kv_settings(args, cfg, requests)
    oracle = FiniteLogitsRuntime(source.build(cfg, args.device))
    executor = LocalExecutor(oracle, max(1, len(requests)), kv.max_model_len)
    sched = scheduler_config(kv, cfg, None if args.ignore_eos else tokenizer)
    reference = run_requests(executor, requests, sched, cfg).tokens
    mismatched = [i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b]
    return dict(match=not mismatched and not oracle.non_finite, mismatched_requests=mismatched,
                non_finite_logits=oracle.non_finite, reference_tokens=reference)


class FiniteLogitsRuntime(LocalRuntime):
    """The oracle's runtime, counting NaN / inf logits: tokens drawn from them are garbage that
    the strategy under test reproduces exactly (argmax of NaN is a fixed index), so equal tokens
    prove nothing then."""

    non_finite = 0

    def forward(self, rows, step_id=None):
        logits = super().forward(rows, step_id)
        self.non_finite += int(logits.numel() - torch.isfinite(logits).sum())
        return logits


# --- entry point ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Subcommand:
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace, argparse.ArgumentParser], int]


# --- subcommand: bench ---------------------------------------------------------------------
def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=("decode", "calibrate", "dist", "serve"),
                   help="decode: one-GPU decode sweep (+ transformers peer); calibrate: per-rank calibration "
                        "file for the cost model; dist: decode steps of a distributed plan at a context; serve: "
                        "load generator against an OpenAI-compatible server (vLLM bench serve's metrics)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the options of that benchmark (see `masep bench X -h`)")


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.what == "serve":
        from .serve.loadgen import bench_serve_main
        return bench_serve_main(args.rest)
    if args.what in ("decode", "calibrate"):
        from .perf.bench import main as bench_main
        return bench_main([args.what, *args.rest])
    return bench_dist(args.rest)


def bench_dist(argv: list[str]) -> int:
    """`masep bench dist`: decode TPOT of a distributed plan with the KV cache at --context."""
    from .options import DISTRIBUTED, add_config_arg, parse_args, resolve_args
    p = argparse.ArgumentParser(prog="masep bench dist", formatter_class=HelpFormatter,
                                description="Decode steps of a distributed plan with the KV cache at --context: "
                                "TPOT and output tokens/s under vLLM bench serve's names.")
    add_config_arg(p)
    add_model_args(p)
    p.add_argument("--strategy", choices=DISTRIBUTED, default=None, help="required, or --plan")
    p.add_argument("--batch", type=int, default=24, help="sequences decoding together")
    p.add_argument("--context", type=int, default=2048, help="KV cache length every sequence attends to")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps")
    p.add_argument("--json", action="store_true", help="print one JSON document ({meta, rows}) instead of the table")
    add_distributed_args(p)
    add_log_arg(p)
    args = parse_args(p, argv)
    setup_logging(args.log_level)
    resolve_args(args, p, "bench dist")
    if args.strategy not in DISTRIBUTED:
        p.error(f"--strategy: bench dist times a distributed plan: give --strategy ({', '.join(DISTRIBUTED)}) or a "
                f"--plan of one" + (f" (--plan {args.plan} is {args.strategy})" if args.plan else ""))
    if args.inject_fault or args.protection != "recompute":
        p.error("--inject-fault / --protection: bench dist times fixed steps without a scheduler; use "
                "`masep run` or `masep serve`")
    cfg, source = load_config(args, p)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, args.context + args.warmup_steps + args.steps + 1))
    try:
        plan = build_plan(args, cfg)
        warning = check_torchrun_env(plan, cfg)
    except ValueError as err:
        p.error(str(err))
    if warning:
        log.warning(warning)
    for flag, value in (("--batch", args.batch), ("--context", args.context), ("--steps", args.steps)):
        if value < 1:
            p.error(f"{flag}={value}: must be >= 1")
    check_weights_finite(source, p)
    from .parallel.bench_dist import DistBenchSpec, launch_bench
    from .parallel.worker import RunSpec
    run = RunSpec(plan=plan, requests=[], preset=source.preset, config=cfg if source.preset else None,
                  model_dir=source.path, seed=args.seed, dtype=cfg.dtype, device=args.device, backend=args.backend,
                  timeout_s=args.timeout, eager=args.eager)
    from .plan import format_plan
    log.info("masep bench dist: plan %s (%d ranks) on %s (%s, %s): batch %d, context %d, %d warm-up + %d timed "
             "decode steps", format_plan(plan), plan.world_size, cfg.name, args.device, cfg.dtype, args.batch,
             args.context, args.warmup_steps, args.steps)
    row = launch_bench(DistBenchSpec(run, args.batch, args.context, args.warmup_steps, args.steps))
    if row is not None:
        print(json.dumps(bench_dist_document(args, cfg, row)) if args.json else bench_dist_table(row))
    return 0


def bench_dist_document(args: argparse.Namespace, cfg: ModelConfig, row: dict) -> dict:
    from .report import document
    hardware = dict(device=args.device, device_name=row["device"], backend=row["backend"],
                    world_size=row["world_size"])
    return document("bench dist", [row], args, model=dataclasses.asdict(cfg), hardware=hardware,
                    plan=row["plan"], plan_notation=row["plan_notation"], plan_text=row["plan_text"])


def bench_dist_table(row: dict) -> str:
    """The row in `vllm bench serve`'s layout (one decode step = one output token per sequence)."""
    lines = [f"plan {row['plan_notation']}: {row['plan_text']}",
             f"{row['preset']}, batch {row['batch']}, context {row['context']}, {row['dtype']} on {row['device']} "
             f"({row['backend']}, {row['world_size']} ranks)",
             "{s:=^52}".format(s=" masep bench dist result "), _row("Timed decode steps:", row["steps"]),
             _row("Benchmark duration (s):", row["duration"]),
             _row("Total generated tokens:", row["total_output_tokens"]),
             _row("Output token throughput (tok/s):", row["output_throughput"]),
             "{s:-^52}".format(s="Time per Output Token (one decode step)"),
             _row("Mean TPOT (ms):", row["mean_tpot_ms"]), _row("Median TPOT (ms):", row["median_tpot_ms"]),
             _row("P99 TPOT (ms):", row["p99_tpot_ms"]), "=" * 52]
    return "\n".join(lines)


SUBCOMMANDS: dict[str, Subcommand] = {
    "run": Subcommand("generate for text or random prompts and print the text, TTFT / TPOT / throughput",
                      add_run_args, cmd_run),
    "bench": Subcommand("benchmarks: one-GPU decode sweep, per-rank calibration, distributed decode steps, load "
                        "generator for OpenAI-compatible servers",
                        add_bench_args, cmd_bench),
}


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    from .serve.server import add_serve_args
    add_serve_args(p)


def _cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The checks `masep run` makes before any work, then the server (which loads the config again:
    that part is cheap; the weight scan here is done once)."""
    from .options import resolve_args
    from .serve.server import cmd_serve
    resolve_args(args, parser, "serve")
    cfg, source = load_config(args, parser)
    try:
        plan_words = _plan_words(args, cfg)
    except ValueError as err:
        parser.error(str(err))
    log.info("masep serve: %s on %s (%s, %s), http://%s:%d", plan_words, cfg.name, args.device, cfg.dtype,
             args.host, args.port)
    if args.trace is not None:
        try:
            check_trace_dir(args.trace)
        except ValueError as err:
            parser.error(str(err))
    check_serve_memory(args, cfg, source, parser)
    check_weights_finite(source, parser)
    return cmd_serve(args, parser)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .train.cli import add_train_args
    add_train_args(p)


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .options import resolve_args
    from .train.cli import cmd_train
    resolve_args(args, parser, "train")
    return cmd_train(args, parser)


SUBCOMMANDS["train"] = Subcommand("train through any plan (forward and backward across the split) on text files "
                                  "or the built-in Shakespeare corpus", _add_train_args, _cmd_train)
SUBCOMMANDS["serve"] = Subcommand("an OpenAI-compatible HTTP server (continuous batching) over any strategy",
                                  _add_serve_args, _cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="masep", description="MoE-Attention separation: run, plan and "
                                     "measure MoE inference with attention and experts on separate GPUs.")
    parser.add_argument("--version", action="version", version=f"masep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help,
                           formatter_class=HelpFormatter)
        spec.add_args(p)
        p.set_defaults(handler=spec.handler, subparser=p)
    from .perf.cli import add_perf_parsers  # plan, simulate, sweep, replan
    add_perf_parsers(sub)
    for name, p in sub.choices.items():
        if name != "bench":  # each benchmark parses its own flags, --log-level among them
            add_log_arg(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .options import parse_args
    args = parse_args(build_parser(), sys.argv[1:] if argv is None else list(argv))
    setup_logging(getattr(args, "log_level", None) or "info")
    if hasattr(args, "func"):  # the perf subcommands take args only
        return args.func(args)
    return args.handler(args, args.subparser)


if __name__ == "__main__":
    sys.exit(main())
