"""The front end's engine: the scheduler on its own thread, requests in and deltas out for asyncio.

The HTTP server (masep/serve/api.py) calls `generate` from its event loop; the engine thread
owns the scheduler and the executor and runs steps back to back while there is work. They
meet in two places only: an inbox (new requests, aborts) the thread drains between steps, and
one asyncio queue per request the thread posts deltas to. So a long step never blocks the
event loop, and the scheduler is never touched by two threads.

Text: each request has a Detokenizer; a stop string ends the request (its slot is freed at
once) and is never sent to the client.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator

from ..serve.engine_client import (EngineDead, EngineOverloaded, EngineStats, GenerateRequest, ReplaceableRankLost,
                                   SamplingParams, TokenDelta)
from ..tokenizer import Detokenizer, Tokenizer
from .scheduler import Scheduler, SchedulerConfig, Sequence, check_request

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue
    detok: Detokenizer
    num_prompt: int
    sent: int = 0  # output tokens already posted
    done: bool = False


class AsyncEngine:
    """Implements serve.engine_client.EngineClient over any executor."""

    def __init__(self, executor, config: SchedulerConfig, tokenizer: Tokenizer, model_name: str,
                 restart=None, max_restarts: int = 0):
        """restart: a function that starts a fresh executor (every rank loads its part again);
        after a failure the engine cannot survive, it is called up to `max_restarts` times
        (the requests in flight fail first, naming the failure) and serving resumes. A dead rank
        the executor can replace (ReplaceableRankLost) is replaced instead: the requests in flight
        fail, the queued ones wait, new ones are queued, and the restart is the fallback."""
        self.executor, self.tokenizer, self.model_name = executor, tokenizer, model_name
        self._restart, self.restarts_left, self.restarts = restart, max_restarts, 0
        self.restarting: str | None = None  # why the ranks are being started again
        self.joins = 0  # replacement ranks that joined
        self.config = config
        self.max_model_len = config.max_len
        self.scheduler = Scheduler(executor, config)
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}  # deltas of this step, per event loop
        self._wake = threading.Event()
        self._stopping = False
        self.dead: str | None = None
        self._thread = threading.Thread(target=self._run, name="masep-engine", daemon=True)
        self._thread.start()

    # --- EngineClient ----------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        self._admit_check(request.prompt_token_ids, request.params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(),
                         Detokenizer(self.tokenizer, request.params.stop, prompt_ids=request.prompt_token_ids),
                         len(request.prompt_token_ids))
        self._streams[request.request_id] = stream
        self._inbox.put(("add", request))
        self._wake.set()
        try:
            while True:
                delta = await stream.deltas.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if not stream.done:  # the consumer went away (client disconnect): free the slot
                self._inbox.put(("abort", request.request_id))
                self._wake.set()

    def _admit_check(self, prompt: list[int], params: SamplingParams) -> None:
        """Everything that can be refused is refused here, before the request is queued."""
        if self.dead:
            raise EngineDead(f"the engine has stopped: {self.dead}")
        if self.restarting:
            raise EngineDead(f"the engine is starting its ranks again after a failure ({self.restarting}); "
                             "retry in a moment")
        check_request(prompt, params, self.config)
        if self.scheduler_waiting() + self._inbox.qsize() >= self.config.max_waiting:
            raise EngineOverloaded(f"{self.config.max_waiting} requests are already waiting for a KV slot; "
                                   "try again later")

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def is_healthy(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    def health(self) -> dict:
        """ok, degraded (some attention units lost, the others serving) or dead, with the lost
        units' reasons and each rank's state (the executor's view)."""
        s = self.scheduler
        lost = {u: f.reason for f in s.failovers for u in [f.unit]}
        lost |= {u: why for u, why in getattr(self.executor, "lost_units", {}).items()}
        experts = getattr(self.executor, "lost_experts", {})
        replacing = getattr(self.executor, "replacing", {})
        status = "dead" if not self.is_healthy() else ("degraded" if lost or experts or replacing else "ok")
        if self.restarting and self.is_healthy():
            status = "restarting"
        out = {"status": status, "live_units": sorted(s.live_units), "lost_units": {str(u): w for u, w in lost.items()},
               "lost_expert_ranks": {str(r): w for r, w in experts.items()}}
        if replacing:  # a replacement is loading its experts and joining; requests are queued meanwhile
            out["replacing_ranks"] = {str(r): w for r, w in replacing.items()}
        if self.dead or self.restarting:
            out["error"] = self.dead or self.restarting
        out["restarts"], out["joins"] = self.restarts, self.joins
        if hasattr(self.executor, "rank_states"):
            out["ranks"] = self.executor.rank_states()
        return out

    def scheduler_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def stats(self) -> EngineStats:
        s = self.scheduler
        steps = {kind: dict(vars(t)) for kind, t in s.totals.items()}
        return EngineStats(len(s.running), len(s.waiting) + self._inbox.qsize(), s.slots_total, len(s.running),
                           steps, len(s.live_units), len(s.failovers), self.joins)

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop after the current step; every unfinished request ends with "abort"; ranks stop."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        self._drain_inbox()
        self._post_failed(self.scheduler.fail_all("server shutting down"))
        self.dead = self.dead or "server shutting down"
        self.executor.shutdown()

    # --- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.scheduler.has_work:
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                touched = self.scheduler.iterate()
            except Exception as err:  # a dead rank, a timeout: fail what is in flight, refuse new work
                why = f"{type(err).__name__}: {err}"
                if isinstance(err, ReplaceableRankLost) and not self._stopping:  # queued requests wait
                    self._post_failed(self.scheduler.fail_running(f"the engine failed: {why}"), "error")
                    why = self._replace_ranks(why)
                    if why is None:
                        continue
                else:
                    self._post_failed(self.scheduler.fail_all(f"the engine failed: {why}"), "error")
                if not self._start_again(why):
                    self._post_failed(self.scheduler.fail_all(f"the engine failed: {why}"), "error")
                    self.dead = why
                    return
                continue
            for seq in touched:
                self._post(seq)
            self._flush()

    def _replace_ranks(self, why: str) -> str | None:
        """A replacement for the dead rank joins the others (new requests are queued meanwhile,
        /health says degraded). None when it joined, else why not (the caller restarts)."""
        log.warning("%s; the other ranks stay up and a replacement joins them", why)
        try:
            joined = self.executor.replace_lost_ranks()
        except Exception as err:  # noqa: BLE001 - the restart is the fallback
            log.warning("%s; starting every rank again instead", err)
            return f"{why}; {err}"
        self.joins += len(joined["ranks"])
        log.warning("rank(s) %s replaced %.2f s after the failure was noticed; serving again", joined["ranks"],
                    joined["seconds"])
        return None

    def _start_again(self, why: str) -> bool:
        """Start the ranks again (new requests get 503 meanwhile). False: no restart left, or
        the restart itself failed."""
        if self._restart is None or self.restarts_left < 1 or self._stopping:
            return False
        self.restarts_left -= 1
        self.restarting = why
        log.warning("the engine failed (%s); starting its ranks again (%d restart(s) left)", why, self.restarts_left)
        try:
            self.executor.shutdown()
            self.executor = self._restart()
        except Exception as err:  # noqa: BLE001 - reported as the engine's death
            self.restarting = None
            self.dead = f"{why}; the restart failed too: {type(err).__name__}: {err}"
            return False
        waiting = [s for s in self.scheduler.waiting if not s.finished]  # queued while a replacement failed
        self.scheduler = Scheduler(self.executor, self.config)
        self.scheduler.waiting = waiting
        self.restarts += 1
        self.restarting = None
        log.warning("the engine's ranks are back; serving again")
        return True

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.scheduler.add(item.request_id, item.prompt_token_ids, item.params)
            else:
                seq = self.scheduler.finish(item, "abort", "aborted by the client")
                if seq is not None:
                    self._post(seq)
        self._flush()

    def _post(self, seq: Sequence) -> None:
        """The tokens `seq` got since the last post, with their text; ends the request on a stop string."""
        stream = self._streams.get(seq.request_id)
        if stream is None or stream.done:
            return
        new = seq.output[stream.sent:]
        text, stopped = "", False
        for token in new:
            piece, stopped = stream.detok.push(token)
            text += piece
            if stopped:
                break
        if stopped and not seq.finished:
            self.scheduler.finish(seq.request_id, "stop")
        reason = "stop" if stopped else seq.finish_reason
        if reason is not None and not stopped and reason in ("stop", "length"):
            text += stream.detok.flush()
        stream.sent = len(seq.output)
        self._send(seq.request_id, TokenDelta(new, text, stream.num_prompt, len(seq.output), reason, seq.error))

    def _post_failed(self, seqs: list[Sequence], reason: str = "abort") -> None:
        for seq in seqs:
            stream = self._streams.get(seq.request_id)
            if stream is not None and not stream.done:
                self._send(seq.request_id, TokenDelta([], "", stream.num_prompt, len(seq.output), reason, seq.error))
        self._flush()

    def _send(self, request_id: str, delta: TokenDelta) -> None:
        stream = self._streams[request_id]
        if delta.finish_reason is not None:
            stream.done = True
            del self._streams[request_id]
        self._outbox.setdefault(stream.loop, []).append((stream.deltas, delta))

    def _flush(self) -> None:
        """Hand a step's deltas to each event loop in one call: one wake-up of the loop per step,
        not one per request (each wake-up is a syscall and a turn of the loop under the GIL)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _deliver(items: list[tuple[asyncio.Queue, TokenDelta]]) -> None:
    for deltas, delta in items:
        deltas.put_nowait(delta)
