"""A fixed set of requests through the continuous-batching scheduler: `masep run` and the tests.

Every request arrives at time 0; the scheduler admits as many as there are slots (by default
one slot per request, so all of them), prefills them and decodes until each is done, retiring
rows as they finish. Metrics follow vLLM `bench serve`'s definitions (masep/metrics.py), with
times measured from the moment the requests were submitted.
"""
from __future__ import annotations

import dataclasses

import numbers
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..config import ModelConfig
from ..metrics import Metrics, RequestOutput, compute_metrics
from ..runtime import Runtime
from ..serve.engine_client import RequestRejected, SamplingParams
from .executor import LocalExecutor
from .scheduler import Scheduler, SchedulerConfig, check_request


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: drawn from torch's global RNG (reproducible under torch.manual_seed)
    stop_token_ids: tuple[int, ...] = ()

    def params(self, stop_on_eos: bool) -> SamplingParams:
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.top_k, seed,
                              stop_token_ids=list(self.stop_token_ids), ignore_eos=not stop_on_eos)


@dataclass
class GenerationResult:
    outputs: list[RequestOutput]  # one per request, in request order
    metrics: Metrics
    failovers: list = dataclasses.field(default_factory=list)  # scheduler.Failover of units lost on the way

    @property
    def tokens(self) -> list[list[int]]:
        return [o.tokens for o in self.outputs]

    def to_dict(self) -> dict:
        return dict(**self.metrics.to_dict(), tokens=self.tokens, errors=[o.error for o in self.outputs],
                    per_request=[o.to_dict() for o in self.outputs],
                    failovers=[dataclasses.asdict(f) for f in self.failovers])


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """`batch` prompts of `prompt_len` uniform token ids, a pure function of the arguments."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=gen).tolist()


def validate_request(req: Request, cfg: ModelConfig, max_len: int | None = None) -> None:
    """Raise ValueError naming the value and the rule it breaks; None for a good request."""
    if any(not isinstance(t, numbers.Integral) for t in req.prompt):
        raise RequestRejected("prompt: token ids must be integers", "prompt")
    check_request([int(t) for t in req.prompt], req.params(False),
                  SchedulerConfig(max_len or cfg.max_seq_len, cfg.vocab_size))


def generate(runtime: Runtime, requests: Sequence[Request], *, stop_on_eos: bool = False,
             clock: Callable[[], float] | None = None, max_num_batched_tokens: int | None = None,
             num_slots: int | None = None) -> GenerationResult:
    """Run every valid request to completion on one runtime driven in this process. Default:
    one slot per request and one prefill step for all prompts (so ranks that each drive their
    own runtime, as the strategy tests do, stay in lockstep)."""
    cfg = runtime.cfg
    if stop_on_eos and cfg.eos_token_id is None:
        raise ValueError("stop_on_eos=True but the model config has eos_token_id=None")
    good = [r for r in requests if _error_of(r, cfg) is None]
    max_len = max((len(r.prompt) + r.max_new_tokens for r in good), default=1)
    budget = max_num_batched_tokens or max(1, sum(len(r.prompt) for r in good))
    eos = frozenset([cfg.eos_token_id]) if stop_on_eos else frozenset()
    config = SchedulerConfig(max_len, cfg.vocab_size, budget, len(requests) + 1, eos)
    if not good:
        return run_requests(None, requests, config, cfg, clock, cfg.max_seq_len)
    executor = LocalExecutor(runtime, num_slots or len(good), max_len, own_step_ids=True)
    try:
        return run_requests(executor, requests, config, cfg, clock, cfg.max_seq_len)
    finally:
        executor.shutdown()


def run_requests(executor, requests: Sequence[Request], config: SchedulerConfig, cfg: ModelConfig,
                 clock: Callable[[], float] | None = None, length_limit: int | None = None,
                 on_finish: Callable[[int, object], None] | None = None) -> GenerationResult:
    """All `requests` arrive at once on any executor (in-process or ranks); a rejected request
    gets its error in its output and the others still run. Times are from the submission.
    on_finish(i, seq): called as soon as request i finishes (a journal records it)."""
    outputs = [RequestOutput(prompt_len=len(r.prompt), error=_error_of(r, cfg, length_limit or config.max_len))
               for r in requests]
    valid = [i for i, o in enumerate(outputs) if o.error is None]
    if not valid:
        return GenerationResult(outputs, compute_metrics(outputs, 0.0))
    sched = Scheduler(executor, config, clock=clock or time.perf_counter)
    t0 = sched.clock()
    seqs = [sched.add(str(i), [int(t) for t in requests[i].prompt], requests[i].params(bool(config.eos_token_ids)),
                      arrival_s=t0) for i in valid]
    pending = dict(zip(valid, seqs))
    while sched.has_work:
        sched.iterate()
        if on_finish is not None:
            for i in [i for i, seq in pending.items() if seq.finished]:
                on_finish(i, pending.pop(i))
    duration = sched.clock() - t0
    for i, seq in zip(valid, seqs):
        o = outputs[i]
        o.tokens, o.token_times_s, o.finish_reason = seq.output, seq.token_times_s, seq.finish_reason
        o.error = o.error or seq.error
    return GenerationResult(outputs, compute_metrics(outputs, duration), list(sched.failovers))


def _error_of(req: Request, cfg: ModelConfig, max_len: int | None = None) -> str | None:
    try:
        validate_request(req, cfg, max_len)
        return None
    except ValueError as err:
        return str(err)
