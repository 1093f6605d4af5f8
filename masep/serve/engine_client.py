"""What the HTTP layer needs from the engine, and nothing more.

The API (api.py) turns HTTP bodies into `GenerateRequest`s, streams `TokenDelta`s back and
never sees ranks, plans or KV slots. The front end's `AsyncEngine` (masep/engine/) implements
`EngineClient`; tests can implement it with a fake.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol


@dataclass
class SamplingParams:
    """Per-request generation settings (OpenAI / vLLM semantics)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]; 1 = off
    top_k: int = 0  # 0 = off (vLLM uses -1; both mean off here)
    seed: int | None = None  # None: the engine draws one at admission (so a resumed request repeats itself)
    stop: list[str] = dataclasses.field(default_factory=list)  # stop strings, not included in the text
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)  # included in the token ids
    ignore_eos: bool = False


@dataclass
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class TokenDelta:
    """New output of one request since the previous delta. The last delta of a request has
    `finish_reason` set: "stop" (EOS, stop token or stop string), "length" (max_tokens or the
    model's length limit), "abort" (client gone or server shutting down) or "error"."""

    token_ids: list[int]
    text: str
    num_prompt_tokens: int
    num_output_tokens: int  # output tokens so far, including these
    finish_reason: str | None = None
    error: str | None = None  # set when finish_reason is "error" or "abort"


class RequestRejected(ValueError):
    """The request can never run (too long, bad token id, ...): HTTP 400. `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: HTTP 429 (try again later)."""


class EngineDead(RuntimeError):
    """The engine stopped (a rank failed, or shutdown): HTTP 503."""


class ReplaceableRankLost(EngineDead):
    """A rank died and the step's requests with it, but the executor's other ranks are alive and
    waiting: `executor.replace_lost_ranks()` starts a replacement that joins them (raising
    EngineDead, every rank stopped, when it cannot), and serving goes on without a restart."""


class UnitsLost(RuntimeError):
    """Raised by an executor's step when some units' ranks died but others answered:
    `tokens` {unit: sampled tokens} of the units that finished the step, `units` {unit:
    reason} of those that did not and never will (their ranks were stopped)."""

    def __init__(self, units: dict[int, str], tokens: dict[int, list]):
        super().__init__("; ".join(f"unit {u}: {why}" for u, why in sorted(units.items())))
        self.units, self.tokens = units, tokens


@dataclass
class EngineStats:
    num_running: int  # requests holding a KV slot
    num_waiting: int  # accepted, waiting for a slot
    kv_slots_total: int
    kv_slots_used: int
    # cumulative since start, per step kind ("decode", "prefill"): steps, rows (requests),
    # tokens, seconds (host time around the step); decode rows / steps = mean decode batch
    steps: dict[str, dict[str, float]] = field(default_factory=dict)
    live_units: int = 1  # attention units (replicas, EP ranks) still serving
    failovers: int = 0  # units lost since start
    joins: int = 0  # replacement ranks that joined the running engine since start


class EngineClient(Protocol):
    model_name: str
    max_model_len: int  # prompt + output tokens of one request
    tokenizer: object  # masep.tokenizer.Tokenizer

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Validate (raise RequestRejected / EngineOverloaded / EngineDead at once, before any
        delta), queue, and yield deltas until one has finish_reason set. Closing the iterator
        early (client disconnect) aborts the request and frees its slot."""

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort". Unknown ids are ignored."""

    def is_healthy(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None:
        """Fail every unfinished request (finish_reason "abort", error "server shutting down")
        and stop the ranks; idempotent."""

