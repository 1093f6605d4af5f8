"""Continuous batching over KV slots: admit, prefill in chunks, decode, retire.

The scheduler owns every accepted request (its prompt and every token generated so far) until
it is answered; an executor (executor.py) owns the model. Between steps the scheduler
  1. admits waiting requests into free slots, first come first served, each to the unit
     (attention replica, EP rank) with the fewest requests that has a free slot;
  2. runs one decode step over every request whose prompt is in the cache;
  3. runs one prefill step of at most `max_num_batched_tokens` prompt tokens, continuing
     partly prefilled prompts first, so a long prompt is cut into chunks and the decode
     steps of the others wait for at most one chunk;
  4. retires finished requests, which frees their slots for the next admission.
The scheduler never knows how the model is split: it sees units, slots and tokens.

Slots are fixed-size (one slot reserves `max_len` positions), not paged blocks: a request that
fits the length limit always finds room once a slot is free, and a decode step reads its KV in
place. The cost is memory: a short request holds a whole slot (see the README).
"""
from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..runtime import StepRows
from ..serve.engine_client import EngineOverloaded, RequestRejected, SamplingParams, UnitsLost
from .sampling import SampleSpec


@dataclass
class SchedulerConfig:
    max_len: int  # positions per slot: prompt + output of one request (vLLM's max_model_len)
    vocab_size: int
    max_num_batched_tokens: int = 2048  # prompt tokens per prefill step
    max_waiting: int = 1024  # accepted but not yet admitted; more -> EngineOverloaded
    eos_token_ids: frozenset[int] = frozenset()
    # what happens to the requests of a unit whose ranks died: "recompute" moves them to live
    # units, which prefill prompt + generated tokens again; "mirror" continues them on the unit
    # that kept a copy of their KV rows (parallel/mirror.py; recompute where it cannot);
    # "none" fails them with the reason
    protection: str = "recompute"

    def __post_init__(self):
        for name in ("max_len", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.protection not in PROTECTIONS:
            raise ValueError(f"protection={self.protection!r}: must be one of {', '.join(PROTECTIONS)}")


PROTECTIONS = ("recompute", "mirror", "none")


def check_request(prompt: list[int], params: SamplingParams, cfg: SchedulerConfig) -> None:
    """Raise RequestRejected (a ValueError naming the field and the rule) for a request that can never run."""
    if not prompt:
        raise RequestRejected("prompt is empty: a request needs at least one prompt token", "prompt")
    bad = next((i for i, t in enumerate(prompt) if not (isinstance(t, int) and 0 <= t < cfg.vocab_size)), None)
    if bad is not None:
        raise RequestRejected(f"prompt[{bad}]={prompt[bad]!r}: token ids must be integers in "
                              f"[0, vocab_size={cfg.vocab_size})", "prompt")
    if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
        raise RequestRejected(f"max_tokens={params.max_tokens!r}: must be an integer >= 1", "max_tokens")
    total = len(prompt) + params.max_tokens
    if total > cfg.max_len:
        raise RequestRejected(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} = {total} "
                              f"exceeds the maximum model length {cfg.max_len} (max_model_len); shorten "
                              "the prompt or lower max_tokens", "max_tokens")
    if not params.temperature >= 0:  # also rejects NaN
        raise RequestRejected(f"temperature={params.temperature!r}: must be >= 0 (0 = greedy)", "temperature")
    if not 0 < params.top_p <= 1:
        raise RequestRejected(f"top_p={params.top_p!r}: must be in (0, 1] (1 = off)", "top_p")
    if not isinstance(params.top_k, int) or params.top_k < -1:
        raise RequestRejected(f"top_k={params.top_k!r}: must be an integer >= -1 (0 or -1 = off)", "top_k")


@dataclass
class Sequence:
    """One request's state. `output` holds every token generated so far: enough to resume the
    request anywhere (prefill prompt + output again)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    arrival_s: float
    output: list[int] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)
    unit: int | None = None
    slot: int | None = None
    cached: int = 0  # tokens of prompt (+ output) already written to the slot's KV
    to_prefill: int = 0  # tokens of prompt + output to write before decoding (set at admission)
    moves: int = 0  # times the request was moved off a failed unit
    finish_reason: str | None = None
    error: str | None = None

    @property
    def prefilling(self) -> bool:
        return self.cached < self.to_prefill

    def context(self, start: int, count: int) -> list[int]:
        """Tokens [start, start + count) of prompt + output: what a (re)prefill writes."""
        n = len(self.prompt)
        return (self.prompt[start:start + count] if start + count <= n
                else (self.prompt + self.output)[start:start + count])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def spec(self) -> SampleSpec:
        p = self.params
        return SampleSpec(p.temperature, p.top_p, max(p.top_k, 0), self.seed, len(self.output))


@dataclass
class StepRecord:
    """What one scheduler iteration did (for metrics and tests)."""

    step_id: int
    kind: str  # "decode" | "prefill"
    rows: int
    tokens: int


@dataclass
class Failover:
    """A unit lost and what became of its requests (for metrics, logs and the fault benchmark)."""

    unit: int
    reason: str
    at_s: float  # scheduler clock when the loss was noticed
    moved: list[str]  # request ids resumed elsewhere (recompute)
    failed: list[str]  # request ids that ended with the error (protection none, or no unit left)
    step_started_s: float | None = None  # scheduler clock when the step before the fatal one ended
    tokens_at_move: list[int] = field(default_factory=list)  # per moved request: tokens it had then
    adopted: list[str] = field(default_factory=list)  # request ids continued on the mirror buddy (no recompute)
    tokens_at_adopt: list[int] = field(default_factory=list)


@dataclass
class StepTotals:
    """Cumulative work of one step kind since start (a long-running server keeps only these and
    the last `HISTORY` step records). `seconds` is host time around the executor's step."""

    steps: int = 0
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0


HISTORY = 4096


class Scheduler:
    def __init__(self, executor, config: SchedulerConfig, clock: Callable[[], float] = time.perf_counter):
        self.executor, self.config, self.clock = executor, config, clock
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.free = [list(range(executor.slots_per_unit)) for _ in range(executor.num_units)]
        self.capacity = [executor.slots_per_unit] * executor.num_units  # grows when a unit adopts a mirror
        # units an executor lost before this scheduler (a second round on the same ranks)
        self.live_units = set(range(executor.num_units)) - set(getattr(executor, "lost_units", {}))
        self._last_step_end: float | None = None
        for unit in set(range(executor.num_units)) - self.live_units:
            self.free[unit] = []
        self.failovers: list[Failover] = []
        self.step_id = 0
        self.history: deque[StepRecord] = deque(maxlen=HISTORY)
        self.totals = {"decode": StepTotals(), "prefill": StepTotals()}
        self._rng = random.Random()

    # --- requests in and out -------------------------------------------------------------
    def add(self, request_id: str, prompt: list[int], params: SamplingParams,
            arrival_s: float | None = None) -> Sequence:
        """Accept a request or raise (RequestRejected: it can never run; EngineOverloaded: the
        queue is full) before anything is queued."""
        check_request(prompt, params, self.config)
        if len(self.waiting) >= self.config.max_waiting:
            raise EngineOverloaded(f"{len(self.waiting)} requests are waiting (max_waiting="
                                   f"{self.config.max_waiting}); try again later")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        seq = Sequence(request_id, list(prompt), params, seed, self.clock() if arrival_s is None else arrival_s)
        self.waiting.append(seq)
        return seq

    def finish(self, request_id: str, reason: str, error: str | None = None) -> Sequence | None:
        """End a request early (abort, stop string); its slot is free for the next admission."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id and not seq.finished:
                    self._retire(seq, reason, error)
                    return seq
        return None

    def fail_all(self, error: str) -> list[Sequence]:
        """Every unfinished request ends with `error` (the executor died, or shutdown)."""
        failed = [s for s in self.waiting + self.running if not s.finished]
        for seq in failed:
            self._retire(seq, "abort", error)
        return failed

    def fail_running(self, error: str) -> list[Sequence]:
        """Every request holding a KV slot ends with `error` (their state on the ranks is gone);
        the waiting ones stay queued."""
        failed = [s for s in self.running if not s.finished]
        for seq in failed:
            self._retire(seq, "abort", error)
        return failed

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def slots_total(self) -> int:
        return sum(self.capacity[u] for u in self.live_units)

    def lose_units(self, lost: dict[int, str], step_started_s: float | None = None) -> list[Sequence]:
        """Units whose ranks died: nothing is admitted to them again. Their unfinished requests
        continue on the unit that mirrored their KV rows (protection "mirror"), or go back to the front of the queue to be prefilled again (prompt +
        every token generated so far) on a live unit, or, with protection "none" or no unit
        left, end with the reason. Returns the requests that ended."""
        ended = []
        for unit, reason in sorted(lost.items()):
            if unit not in self.live_units:
                continue
            self.live_units.discard(unit)
            self.free[unit] = []
            victims = sorted((s for s in self.running if s.unit == unit and not s.finished), key=lambda s: s.arrival_s)
            adopted = self._adopt(unit, victims) if self.config.protection == "mirror" else []
            victims = victims[len(adopted):]
            resume = self.config.protection in ("recompute", "mirror") and bool(self.live_units)
            for seq in victims:
                self.running.remove(seq)
                if resume:
                    seq.unit, seq.slot, seq.cached = None, None, 0
                    seq.moves += 1
                else:
                    why = (f"attention unit {unit} failed ({reason}) and no unit is left" if self.config.protection
                           != "none" else f"attention unit {unit} failed ({reason}); --protection none does "
                           "not resume its requests")
                    seq.finish_reason, seq.error = "abort", why
                    ended.append(seq)
            if resume:  # oldest first, ahead of requests that never ran
                self.waiting[:0] = victims
            ids = [s.request_id for s in victims]
            self.failovers.append(Failover(unit, reason, self.clock(), ids if resume else [], [] if resume else ids,
                                           step_started_s, [len(s.output) for s in victims] if resume else [],
                                           [s.request_id for s in adopted], [len(s.output) for s in adopted]))
        if not self.live_units:
            ended += self.fail_all("every attention unit has failed: " + "; ".join(lost.values()))
        return ended

    # --- one iteration -------------------------------------------------------------------
    def iterate(self) -> list[Sequence]:
        """Admit, one decode step, one prefill step; returns the requests that got tokens or
        finished in this iteration (each at most once)."""
        self._admit()
        touched: dict[str, Sequence] = {}
        for make, prefill in ((self._decode_rows, False), (self._prefill_rows, True)):
            work = make()
            if work:
                for seq in self._run(work, prefill):
                    touched[seq.request_id] = seq
        return list(touched.values())

    def _adopt(self, unit: int, victims: list[Sequence]) -> list[Sequence]:
        """Mirror: the unit that kept the lost unit's KV rows (slot s there at offset + s) takes
        its requests where they are, with their cached tokens, and from now on also serves the
        slots of that copy no request holds. Returns the requests taken (all of them)."""
        found = getattr(self.executor, "mirror_buddy", lambda u: None)(unit)
        if found is None or found[0] not in self.live_units:
            return []
        buddy, offset = found
        held = {seq.slot for seq in victims}
        for seq in victims:
            seq.unit, seq.slot = buddy, offset + seq.slot
        self.free[buddy] += [offset + s for s in range(offset) if s not in held]
        self.capacity[buddy] += offset
        return victims

    def _admit(self) -> None:
        while self.waiting:
            seq = self.waiting[0]
            units = [u for u in range(len(self.free)) if self.free[u]]
            if not units:
                return
            load = [0] * len(self.free)
            for s in self.running:
                load[s.unit] += 1
            unit = min(units, key=lambda u: (load[u], u))
            self.free[unit].sort()
            seq.unit, seq.slot, seq.cached = unit, self.free[unit].pop(0), 0
            # a moved request rebuilds its KV from prompt + output and samples its next token
            # from the last position, exactly the token its next decode step would have given
            seq.to_prefill = len(seq.prompt) + len(seq.output)
            self.running.append(self.waiting.pop(0))

    def _decode_rows(self) -> dict[int, list[tuple[Sequence, list[int], int]]]:
        work: dict[int, list] = {}
        for seq in self.running:
            if not seq.prefilling and not seq.finished:
                pos = len(seq.prompt) + len(seq.output) - 1
                work.setdefault(seq.unit, []).append((seq, [seq.output[-1]], pos))
        return work

    def _prefill_rows(self) -> dict[int, list[tuple[Sequence, list[int], int]]]:
        """Chunks of the prompts still to prefill, oldest first, within the token budget."""
        budget, work = self.config.max_num_batched_tokens, {}
        for seq in sorted((s for s in self.running if s.prefilling), key=lambda s: s.arrival_s):
            if budget == 0:
                break
            n = min(budget, seq.to_prefill - seq.cached)
            work.setdefault(seq.unit, []).append((seq, seq.context(seq.cached, n), seq.cached))
            budget -= n
        return work

    def _run(self, work: dict[int, list[tuple[Sequence, list[int], int]]], prefill: bool) -> list[Sequence]:
        rows = {}
        for unit, items in work.items():
            specs = [s.spec() if start + len(toks) >= s.to_prefill else None for s, toks, start in items]
            rows[unit] = StepRows([s.slot for s, _, _ in items], [t for _, t, _ in items],
                                  [st for _, _, st in items], specs, prefill)
        kind = "prefill" if prefill else "decode"
        # host seconds of the step (time.perf_counter: `clock` may be a test's fake clock, read
        # exactly once per step); a lost unit's step began when the previous step ended
        started, ended = time.perf_counter(), []
        try:
            sampled = self.executor.step(self.step_id, rows)
        except UnitsLost as lost:  # the survivors' tokens count; the lost units' requests move
            sampled = lost.tokens
            work = {u: items for u, items in work.items() if u in sampled}
            ended = self.lose_units(lost.units, self._last_step_end)
        seconds = time.perf_counter() - started
        now = self._last_step_end = self.clock()
        record = StepRecord(self.step_id, kind, sum(len(r) for r in rows.values()),
                            sum(r.num_tokens for r in rows.values()))
        self.history.append(record)
        total = self.totals[kind]
        total.steps, total.rows, total.tokens = total.steps + 1, total.rows + record.rows, total.tokens + record.tokens
        total.seconds += seconds
        self.step_id += 1
        out = ended
        for unit, items in work.items():
            for (seq, toks, _), token in zip(items, sampled[unit]):
                seq.cached += len(toks)
                if token is not None and not seq.finished:
                    self._append(seq, token, now)
                    out.append(seq)
        return out

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        seq.output.append(token)
        seq.token_times_s.append(now - seq.arrival_s)
        p = seq.params
        if (token in self.config.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self._retire(seq, "stop")
        elif len(seq.output) >= p.max_tokens or len(seq.prompt) + len(seq.output) >= self.config.max_len:
            self._retire(seq, "length")

    def _retire(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.finish_reason, seq.error = reason, error
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.free[seq.unit].append(seq.slot)
