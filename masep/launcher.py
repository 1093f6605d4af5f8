"""From command-line choices to a running engine: the executor for a strategy, the scheduler's
settings and the tokenizer. `masep run` and `masep serve` share it, so both run every strategy
through the same front end."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .config import ModelConfig
from .engine.executor import LocalExecutor
from .engine.scheduler import SchedulerConfig
from .model import CacheLayout
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class KvSettings:
    """How big the KV cache is (vLLM's flags): slots of `max_model_len` positions; their number is
    `max_num_seqs` per unit, or on CUDA what `gpu_memory_utilization` of the GPU leaves after the
    weights (the smaller of the two when both apply)."""

    max_model_len: int
    max_num_seqs: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024

    def validate(self, cfg: ModelConfig) -> "KvSettings":
        if not 1 <= self.max_model_len <= cfg.max_seq_len:
            raise ValueError(f"--max-model-len={self.max_model_len}: must be in [1, {cfg.max_seq_len}] (the model's "
                             "max_seq_len)")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs={self.max_num_seqs}: must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization={self.gpu_memory_utilization}: must be in (0, 1]")
        for name in ("max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 1")
        return self


def eos_ids(tokenizer: Tokenizer, cfg: ModelConfig) -> frozenset[int]:
    """A checkpoint's own tokenizer and its config both name EOS ids; with the built-in byte
    tokenizer (no tokenizer files) the config's EOS wins when it has one."""
    if getattr(tokenizer, "builtin", False) and cfg.eos_token_id is not None:
        return frozenset([cfg.eos_token_id])
    ids = set(tokenizer.eos_token_ids) | ({cfg.eos_token_id} if cfg.eos_token_id is not None else set())
    return frozenset(i for i in ids if i < cfg.vocab_size)


def scheduler_config(kv: KvSettings, cfg: ModelConfig, tokenizer: Tokenizer | None,
                     protection: str = "recompute") -> SchedulerConfig:
    eos = eos_ids(tokenizer, cfg) if tokenizer is not None else (
        frozenset([cfg.eos_token_id]) if cfg.eos_token_id is not None else frozenset())
    return SchedulerConfig(kv.max_model_len, cfg.vocab_size, kv.max_num_batched_tokens, kv.max_waiting, eos,
                           protection)


def single_slots(kv: KvSettings, model) -> int:
    """KV slots for the single-device model: max_num_seqs, capped on CUDA by the memory budget."""
    from .parallel.rank_loop import KvBudget
    cfg = model.cfg
    fit = KvBudget(kv.max_model_len, kv.gpu_memory_utilization).slots_that_fit(
        cfg.num_layers, CacheLayout.of(cfg, cfg.num_kv_heads), model.dtype, model.device)
    if fit is not None and fit < 1:
        raise ValueError(f"not even one KV slot of --max-model-len={kv.max_model_len} fits in "
                         f"--gpu-memory-utilization={kv.gpu_memory_utilization}")
    want = kv.max_num_seqs or (fit if fit is not None else 16)
    return min(want, fit) if fit is not None else want


def make_executor(run, kv: KvSettings, single_model=None, fused: bool = False, faults: tuple = (),
                  mirror: bool = False, join_timeout_s: float = 0.0):
    """A LocalExecutor for strategy single (`single_model` given), else a ClusterExecutor that
    starts the plan's ranks (with `faults` to inject). `run` is a parallel.worker.RunSpec.
    join_timeout_s > 0: a dead expert rank whose experts nobody else holds may be replaced by a
    new process that joins the others (masep serve; 0: the failure ends the executor)."""
    if single_model is not None:
        runtime = local_runtime(single_model, run.device, run.eager, fused)
        executor = LocalExecutor(runtime, single_slots(kv, single_model), kv.max_model_len)
        if hasattr(runtime, "capture_all"):
            started = time.perf_counter()
            count = runtime.capture_all()
            if count:
                log.info("captured %d CUDA graphs in %.1f s", count, time.perf_counter() - started)
        return executor
    from .parallel.cluster import ClusterExecutor
    return ClusterExecutor(run, kv.max_model_len, kv.max_num_seqs, kv.gpu_memory_utilization, faults=faults,
                           mirror=mirror, join_timeout_s=join_timeout_s)


def local_runtime(model, device: str, eager: bool, fused: bool):
    """On CUDA each decode step replays a CUDA graph per batch bucket and the experts use the
    Triton grouped matmul (masep/fastpath.py) unless eager; on CPU the plain model."""
    from .runtime import LocalRuntime
    if device == "cuda" and not eager:
        from .fastpath import GraphedLocalRuntime
        return GraphedLocalRuntime(model, fused=fused)
    return LocalRuntime(model)
