"""The front end's executor for a distributed plan: ranks in other processes, driven by steps.

`ClusterExecutor` starts `plan.world_size` rank processes (torchrun's environment, gloo or
NCCL between them), waits for each to connect to its control channel, sizes the KV cache
(the smallest budget of any rank of a unit), and then runs scheduler steps: each rank of a
unit that has rows gets them, each expert rank learns which replicas step, and each unit's
leader answers with the sampled tokens. EP ranks step together every time (their all-to-all
needs every rank), with no rows when their unit has none.

Failures. A rank is dead when its process exits, its control connection closes, it reports
an error, or it stays silent (no heartbeat, rank_loop.py) for `timeout` seconds in the middle
of a step; a silent rank is killed (SIGKILL) so it cannot come back half-way. The dead rank is
named with how it ended (exit code, signal). What follows depends on where it was:
  - an attention rank of a separated plan: its whole replica (unit) is stopped and the step
    raises `UnitsLost` with the tokens of the replicas that finished it; the scheduler moves or
    fails the lost unit's requests and carries on with the others (their bridges to the
    expert ranks are their own groups; the expert ranks drop the dead replica's bridge);
  - an expert rank of a separated plan whose experts another rank holds: every replica is
    switched to its bridges without it and the step runs again;
  - an expert rank whose experts nobody else holds: `ReplaceableRankLost` names the rank and its
    experts (the step's requests fail); the others stay up, and `replace_lost_ranks` starts a
    new process for that rank id, which loads only its part of the model, while the survivors
    leave their world and form a new one with it (a fresh prefix on this process's TCPStore, so
    nobody dials the dead rank's address), keeping their weights and KV caches;
  - any rank of EP or TP x PP (or an expert rank when no replacement can join): the model is
    broken; `EngineDead` names the rank (and an expert rank's experts) and every rank is stopped.
The scheduler in this process holds every request; nothing is lost with the ranks.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections import Counter
from datetime import timedelta
from multiprocessing.connection import wait

from ..runtime import StepRows
from ..serve.engine_client import EngineDead, ReplaceableRankLost, UnitsLost
from . import control, mirror
from .groups import JoinPoint
from .launch import RankProcesses
from .rank_loop import KvBudget, RankSpec, rank_main, rank_wait_s

log = logging.getLogger(__name__)


class ClusterExecutor:
    def __init__(self, run, max_len: int, max_num_seqs: int | None, gpu_memory_utilization: float = 0.9,
                 start_timeout_s: float | None = None, attach=None, faults: tuple = (), mirror: bool = False,
                 join_timeout_s: float = 0.0):
        """attach: (listener, processes) when the ranks were started elsewhere (torchrun): the
        executor then only waits for their connections. faults: faults.FaultSpec to inject.
        mirror: separated plans of two or more replicas keep each replica's KV rows on the next
        one (mirror.py), so a dead replica's requests go on there without recompute.
        join_timeout_s: how long a replacement expert rank may take to load its part and join
        the survivors (0: never replace a rank; the caller starts every rank again)."""
        self.run, self.plan, self.timeout_s, self.max_len = run, run.plan, run.timeout_s, max_len
        self.lockstep = run.plan.strategy == "ep"
        self.reports: dict[int, dict] = {}
        self.gone: dict[int, str] = {}  # rank -> how it ended (dead, or stopped with its unit)
        self.lost_units: dict[int, str] = {}
        self.lost_experts: dict[int, str] = {}  # expert ranks routed around -> how they ended
        self.reroutes: list[dict] = []  # each: the rank, how it ended, seconds from its step's start to rerouted
        self.replacing: dict[int, str] = {}  # dead expert ranks a replacement may take over -> how they ended
        self.joins: list[dict] = []  # each: the ranks replaced, how they ended, seconds from death noticed to joined
        self.join_timeout_s, self._kv, self._mirror, self._store = join_timeout_s, KvBudget(
            max_len, gpu_memory_utilization), mirror, None
        if attach is not None:
            listener, self.procs = attach
        else:
            listener, addr = control.listen()
            self.procs = RankProcesses(run.plan.world_size, rank_main, RankSpec(run, addr, self._kv, tuple(faults),
                                                                                mirror))
        try:
            self._accept_all(listener, start_timeout_s or max(self.timeout_s, 600.0))
            self.slots_per_unit = self._size_slots(max_num_seqs)
            self._broadcast(("start", self.slots_per_unit, max_len))
            for r in self.conns:
                self._expect(r, "ready", self.timeout_s)
        except BaseException:
            self.procs.terminate()
            raise
        finally:
            listener.close()
        self.dead: str | None = None
        self.epoch = 0  # the ranks' world: n after the n-th re-formation (abort messages name it)
        # mirror: unit u's rows are kept by unit (u + 1) mod n, until the first unit is lost
        self.mirroring = mirror and self.num_units >= 2
        self.buddies: dict[int, int] = {}  # lost unit -> the unit holding its KV rows (when mirrored)

    # --- start-up ------------------------------------------------------------------------
    def _accept_all(self, listener, timeout_s: float) -> None:
        """Every rank's connection and hello; a rank that dies while loading fails the start."""
        self.conns, self.infos = {}, {}
        self._accept(listener, self.plan.world_size, timeout_s)
        units = sorted({i.unit for i in self.infos.values() if i.unit is not None})
        self.num_units = len(units)
        self.members = {u: [r for r, i in self.infos.items() if i.unit == u] for u in units}
        self.leaders = {i.unit: r for r, i in self.infos.items() if i.leader}
        self.experts = sorted(r for r, i in self.infos.items() if i.role == "expert")

    def _accept(self, listener, count: int, timeout_s: float) -> None:
        """`count` ranks' connections and hellos into conns and infos, within timeout_s."""
        arrived: queue.Queue = queue.Queue()

        def accept():
            try:
                for _ in range(count):
                    arrived.put(listener.accept())
            except OSError:  # the listener was closed: start-up failed elsewhere
                pass

        threading.Thread(target=accept, daemon=True).start()
        got, deadline = 0, time.monotonic() + timeout_s
        while got < count:
            try:
                conn = arrived.get(timeout=0.5)
            except queue.Empty:
                self.procs.check_alive()
                if time.monotonic() > deadline:
                    raise EngineDead(f"only {got} of {count} ranks connected within {timeout_s:.0f} s")
                continue
            msg = control.recv(conn, self.timeout_s, "front end: rank hello", self.procs.check_alive)
            if msg[0] == "error":
                raise EngineDead(msg[1])
            info: control.RankInfo = msg[1]
            self.conns[info.rank], self.infos[info.rank] = conn, info
            got += 1

    def _size_slots(self, max_num_seqs: int | None) -> int:
        budgets = [i.max_slots for i in self.infos.values() if i.max_slots is not None]
        if budgets and min(budgets) < 1:
            worst = min(self.infos.values(), key=lambda i: i.max_slots if i.max_slots is not None else 1 << 30)
            raise EngineDead(f"rank {worst.rank}: not even one KV slot of max_model_len={self.max_len} fits its "
                             "memory budget; lower --max-model-len or raise --gpu-memory-utilization")
        slots = min(budgets, default=max_num_seqs or 16)
        return min(slots, max_num_seqs) if max_num_seqs else slots

    # --- steps ---------------------------------------------------------------------------
    def step(self, step_id: int, rows: dict[int, StepRows]) -> dict[int, list[int | None]]:
        """Sampled tokens per unit; raises UnitsLost when some units died in the step (with the
        others' tokens), ReplaceableRankLost when an expert rank died that replace_lost_ranks can
        bring back, and EngineDead when the model cannot go on."""
        if self.dead:
            raise EngineDead(self.dead)
        if self.replacing:
            raise EngineDead(f"expert ranks {sorted(self.replacing)} are dead and not replaced yet")
        if self.lockstep:
            rows = agree_decode({u: rows.get(u, StepRows.empty()) for u in range(self.num_units)})
        elif self.experts:
            rows = tell_replica_rows(rows)
        lost: dict[int, str] = {}
        try:
            while True:
                units = sorted(u for u in rows if u not in self.lost_units)
                try:
                    self._send_step(step_id, rows, units, lost)
                    got = self._collect_tokens(step_id, [u for u in units if u not in lost], lost)
                    break
                except _ExpertLost as gone:  # every replica switches to its bridge without it; run the step again
                    self._route_around(gone.rank, gone.how, step_id, lost)
        except ReplaceableRankLost:  # the survivors stay up for replace_lost_ranks
            self._failed_step = step_id
            raise
        except (control.ChannelTimeout, EngineDead) as err:
            self._fail(str(err))
        if lost:
            raise UnitsLost(lost, {u: t for u, t in got.items() if u not in lost})
        return got

    def _send_step(self, step_id: int, rows, units: list[int], lost: dict[int, str]) -> None:
        self._in_step, self._done = time.monotonic(), set()
        self.last_seen = {r: self._in_step for r in self.conns}
        sends = [(r, ("step", step_id, rows[u], units)) for u in units for r in self.members[u]]
        if self.mirroring:  # each replica also learns what the one before it wrote (it keeps a copy)
            n = self.num_units
            before = {u: rows[(u - 1) % n] if (u - 1) % n in units else None for u in range(n)}
            sends = [(r, msg + (mirror.MirrorRows.of(before[self.infos[r].unit]) if before[self.infos[r].unit]
                                else None,)) for r, msg in sends]
            sends += [(r, ("step", step_id, StepRows.empty(), units, mirror.MirrorRows.of(before[u])))
                      for u in range(n) if u not in units and before[u] is not None and u not in self.lost_units
                      for r in self.members[u]]
        told = {u: rows[u].peer_rows for u in units}  # the decode replicas' rows (tell_replica_rows)
        sends += [(r, ("step", step_id, told, units)) for r in self.experts]
        self._sent = {r for r, _ in sends}  # the ranks in this step
        for r, msg in sends:
            if r in self.gone:
                continue
            try:
                control.send(self.conns[r], msg, f"front end -> rank {r}")
            except control.ChannelClosed:
                self._rank_gone(r, self._how(r, "closed its control connection"), lost)

    def _collect_tokens(self, step_id: int, units: list[int], lost: dict[int, str]) -> dict[int, list[int | None]]:
        want = {self.leaders[u]: u for u in units}
        got: dict[int, list] = {}
        deadline = time.monotonic() + rank_wait_s(self.timeout_s) + self.timeout_s  # a last resort
        while any(u not in got and u not in lost for u in units):
            for r, msg in self._messages([r for r in self.conns if r not in self.gone], lost):
                self._on_message(r, msg, step_id, want, got, lost)
            for r, how in self.procs.dead_ranks().items():
                if r not in self.gone:
                    self._rank_gone(r, how, lost)
            self._stop_silent_ranks(units, got, lost)
            if time.monotonic() > deadline:
                late = [u for u in units if u not in got and u not in lost]
                raise EngineDead(f"step {step_id}: units {late} did not answer within "
                                 f"{deadline - self._in_step:.0f} s although every rank was alive")
        return got

    def _messages(self, ranks: list[int], lost: dict[int, str]):
        """(rank, message) of what `ranks` sent within 0.1 s; a rank whose connection closed is
        handled as dead on the way."""
        by_conn = {id(self.conns[r]): r for r in ranks}
        for conn in wait([self.conns[r] for r in ranks], timeout=0.1):
            r = by_conn[id(conn)]
            if r in self.gone:  # stopped while this batch was read
                continue
            try:
                msg = control.recv(conn, 0, f"front end <- rank {r}")
            except control.ChannelClosed:
                self._rank_gone(r, self._how(r, "closed its control connection"), lost)
                continue
            self.last_seen[r] = time.monotonic()
            yield r, msg

    def _on_message(self, r: int, msg: tuple, step_id: int, want: dict, got: dict, lost: dict) -> None:
        kind = msg[0]
        if kind == "beat":
            return
        if kind == "done":
            if msg[1] == step_id:
                self._done.add(r)
        elif kind == "error":
            # a rank's transfer fails when a peer is killed, and its report can arrive before the
            # killed process is reaped: name that peer first (the signal is the cause). A peer that
            # exited with a code may have failed because of r, so it does not take r's place.
            killed = self._ended_ranks(1.0, lambda x, exitcode: x != r and exitcode < 0)
            if killed:
                dead = min(killed)
                self._rank_gone(dead, self.procs.dead_ranks()[dead], lost)
            text = msg[1].strip().splitlines()
            self._rank_gone(r, f"failed: {text[-1] if text else 'an error'}", lost)
        elif kind in ("lost", "failed"):
            # an expert rank's transfers with a replica failed, or an attention rank's with the
            # expert ranks: a dead expert rank explains both (and is routed around); else the
            # replica is lost
            if kind == "failed":
                self._done.add(r)
            elif msg[2] in self.lost_units:  # the expert ranks' word on a replica already handled
                return
            # a separated plan routes around or replaces a dead expert rank: wait for an exit to show
            dead = self._dead_expert_rank(grace_s=1.0 if self.plan.strategy == "separated" else 0.0)
            if dead is not None:
                self._rank_gone(dead, self.procs.dead_ranks()[dead], lost)
            if kind == "failed":
                self._rank_gone(r, f"could not finish step {msg[1]}: {msg[2]}", lost)
            else:
                self._lose_unit(msg[2], msg[3], lost)
        elif kind == "tokens" and msg[1] == step_id and r in want:
            got[want[r]] = msg[2]
            self._done.add(r)
        elif kind != "tokens" or msg[1] > step_id:  # tokens of an earlier step: a unit lost then
            raise EngineDead(f"rank {r} sent {msg[:2]} during step {step_id}: the ranks diverged")

    def _stop_silent_ranks(self, units: list[int], got: dict, lost: dict) -> None:
        """A rank still in the step that has sent nothing (not even a heartbeat) for `timeout`
        seconds is stuck; kill it, so it cannot come back half-way, and treat it as dead."""
        now = time.monotonic()
        in_step = set(self.experts) | {r for u in units if u not in got and u not in lost for r in self.members[u]}
        for r in sorted(in_step - self._done - set(self.gone)):
            if now - self.last_seen[r] > self.timeout_s:
                stopped = " (its process was stopped: SIGSTOP?)" if self.procs.is_stopped(r) else ""
                self._rank_gone(r, f"(pid {self.infos[r].pid}) sent nothing for {self.timeout_s:g} s (--timeout) "
                                   f"in the middle of a step{stopped}; it was killed", lost)

    def _how(self, r: int, fallback: str) -> str:
        """How rank r ended, from its exit code when this process started it."""
        for _ in range(20):  # the exit code lags the closed socket by a moment
            how = self.procs.dead_ranks().get(r)
            if how or not hasattr(self.procs, "procs"):
                return how or fallback
            time.sleep(0.05)
        return fallback

    def _rank_gone(self, r: int, how: str, lost: dict[int, str]) -> None:
        """Rank r is dead: stop it for good; lose its unit, or fail the whole engine."""
        if r in self.gone:
            return
        self.gone[r] = how
        self._kill(r)
        info = self.infos[r]
        if info.role == "attention":
            self._lose_unit(info.unit, f"rank {r} of attention replica {info.unit} {how}", lost)
            return
        if info.role == "expert" and self._can_route_around():
            raise _ExpertLost(r, how)
        if info.role == "expert":
            why = (f"expert rank {r} (experts {', '.join(map(str, info.experts))}) {how}; no other rank holds "
                   "these experts, so no request in flight can go on")
            if self._can_replace():
                self.replacing = {x: self.gone[x] for x in self.experts if x in self.gone}
                raise ReplaceableRankLost(why + "; a replacement rank is starting")
            raise EngineDead(why)
        raise EngineDead(f"rank {r} ({info.role}) {how}; {self.plan.strategy} cannot go on without it")

    # --- a dead expert rank, routed around ----------------------------------------------
    def _can_route_around(self) -> bool:
        """The plan built bridges without each expert rank (plan.survives_expert_loss), and
        this is the first expert rank lost (one level of fallback bridges)."""
        if self.plan.strategy != "separated" or self.lost_experts or self.plan.attn_tp != 1:
            return False
        held = Counter(e for x in self.experts for e in self.infos[x].experts)
        return len(self.experts) >= 2 and min(held.values()) >= 2

    def _ended_ranks(self, grace_s: float, wanted=lambda rank, exitcode: True) -> dict[int, int]:
        """{rank: exit code} of the ranks not handled yet whose process ended with an error or a
        signal and that `wanted` accepts, waiting up to grace_s for one to show (a survivor's
        failed transfer can be reported before the dead process is reaped); {} where this process
        did not start the ranks (it sees no exit codes)."""
        procs = getattr(self.procs, "procs", None)
        if procs is None:
            return {}
        deadline = time.monotonic() + grace_s
        while True:
            ended = {r: p.exitcode for r, p in enumerate(procs)
                     if r not in self.gone and p.exitcode not in (None, 0) and wanted(r, p.exitcode)}
            if ended or time.monotonic() > deadline:
                return ended
            time.sleep(0.02)

    def _dead_expert_rank(self, grace_s: float) -> int | None:
        """An expert rank whose process has ended, once some rank's exit shows (grace_s at most)."""
        dead = [r for r in self._ended_ranks(grace_s) if r in self.experts and r not in self.lost_experts]
        return dead[0] if dead else None

    def _can_replace(self) -> bool:
        """A separated plan whose ranks this process started, replacements allowed, and every
        attention replica alive (a new world needs every rank; lost replicas are not restarted)."""
        return (self.plan.strategy == "separated" and self.join_timeout_s > 0 and hasattr(self.procs, "replace")
                and not self.lost_units and not self.dead)

    # --- a dead expert rank, replaced -------------------------------------------------------
    def replace_lost_ranks(self) -> dict:
        """After ReplaceableRankLost: start one process for each dead expert rank (same rank id;
        it loads only its part of the model) and have it and the survivors, once each has ended
        the failed step, form a new world of the same ranks, with every group built again as at
        start-up. The survivors keep their weights and KV caches. Returns {"ranks", "how",
        "seconds"} (seconds from the death noticed to joined). Raises EngineDead, with every rank
        stopped, when that fails or takes more than join_timeout_s."""
        dead, noticed = dict(self.replacing), time.monotonic()
        deadline = noticed + self.join_timeout_s
        try:
            self._join(dead, deadline)
        except Exception as err:  # the caller starts every rank again
            self.replacing = {}
            why = err if isinstance(err, EngineDead) else f"{type(err).__name__}: {err}"
            self._fail(f"the replacement of expert rank(s) {sorted(dead)} did not join within "
                       f"{self.join_timeout_s:g} s: {why}")
        self.replacing, self.lost_experts = {}, {}
        for r in dead:
            del self.gone[r]
        self.joins.append({"ranks": sorted(dead), "how": dead, "seconds": time.monotonic() - noticed})
        log.warning("expert rank(s) %s replaced; the new world formed in %.2f s", sorted(dead),
                    self.joins[-1]["seconds"])
        return self.joins[-1]

    def _join(self, dead: dict[int, str], deadline: float) -> None:
        survivors = [r for r in self.conns if r not in dead]
        self._settle(self._failed_step, {}, deadline)
        if self.lost_units or set(self.gone) - set(dead):
            raise EngineDead(f"other ranks failed meanwhile: {self.gone}")
        if self._store is None:  # this process hosts the new worlds' rendezvous, one prefix each
            self._store = dist_store()
        join = JoinPoint("127.0.0.1", self._store.port, f"masep/join{len(self.joins)}/", self.epoch + 1)
        listener, addr = control.listen()
        try:
            spec = RankSpec(self.run, addr, self._kv, (), self._mirror, join)  # no fault is injected twice
            for r in sorted(dead):
                self.conns.pop(r).close()
                self.procs.replace(r, rank_main, spec)
            for r in survivors:  # they leave the old world and wait in the new one for the replacements
                control.send(self.conns[r], ("rejoin", join), f"front end -> rank {r}")
            self._accept(listener, len(dead), max(0.0, deadline - time.monotonic()))
        finally:
            listener.close()
        for r in sorted(dead):
            control.send(self.conns[r], ("start", self.slots_per_unit, self.max_len), f"front end -> rank {r}")
        for r in survivors + sorted(dead):
            self._expect(r, "ready", max(0.1, deadline - time.monotonic()))
        self.epoch = join.epoch

    def _route_around(self, r: int, how: str, step_id: int, lost: dict[int, str]) -> None:
        """Expert rank r is dead and every expert it held has another holder: let the step's
        survivors finish failing, tell each to use its bridges without r, then (the caller) run
        the step again."""
        self.lost_experts[r] = how
        log.warning("expert rank %d %s; routing around it (its experts have other holders)", r, how)
        self._settle(step_id, lost)
        x = self.experts.index(r)  # its expert-group index (expert ranks follow the attention ranks)
        for m in self.conns:
            if m not in self.gone:
                control.send(self.conns[m], ("drop_expert", x), f"front end -> rank {m}")
        for m in self.conns:
            if m not in self.gone:
                self._expect(m, "ready", self.timeout_s)
        self.reroutes.append({"rank": r, "how": how, "seconds": time.monotonic() - self._in_step})

    def _settle(self, step_id: int, lost: dict[int, str], deadline: float | None = None) -> None:
        """Read until every live rank has ended the failed step (tokens, done or failed)."""
        deadline = deadline or time.monotonic() + rank_wait_s(self.timeout_s)
        while True:
            waiting = [m for m in self._sent if m not in self.gone and m not in self._done]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise EngineDead(f"ranks {waiting} did not end step {step_id} after expert rank failed")
            for m, msg in self._messages(waiting, lost):
                if msg[0] in ("tokens", "done", "failed"):
                    self._done.add(m)
                elif msg[0] == "error":
                    self._rank_gone(m, f"failed: {msg[1].strip().splitlines()[-1]}", lost)
            for m, how in self.procs.dead_ranks().items():
                if m not in self.gone:
                    self._rank_gone(m, how, lost)

    # --- mirror -----------------------------------------------------------------------------
    def mirror_buddy(self, unit: int) -> tuple[int, int] | None:
        """(live unit holding a lost unit's KV rows, the slot offset of that copy there), or None."""
        buddy = self.buddies.get(unit)
        return (buddy, self.slots_per_unit) if buddy is not None and buddy not in self.lost_units else None

    def _lose_unit(self, unit: int, why: str, lost: dict[int, str]) -> None:
        if unit in self.lost_units:
            return
        if self.mirroring:  # its rows up to the last finished step are on the next unit; the ring ends here
            self.buddies[unit] = (unit + 1) % self.num_units
            self.mirroring = False
        self.lost_units[unit] = lost[unit] = why
        if len(self.lost_units) == self.num_units:
            raise EngineDead(f"every attention replica has failed; the last: {why}")
        for m in self.members[unit]:  # its other ranks may be waiting on the dead one: stop them too
            if m not in self.gone:
                self.gone[m] = f"stopped with attention replica {unit}"
                self._kill(m)

    def _kill(self, r: int) -> None:
        if hasattr(self.procs, "kill"):
            self.procs.kill(r)
        self._tell_survivors(r)

    def _tell_survivors(self, r: int) -> None:
        """Every live rank gives up its groups that include rank r (rank_loop.RankChannel reads
        this on its own thread). With NCCL that is what ends a survivor's transfer with r: a
        kernel waiting on a dead peer never finishes by itself, and NCCL's watchdog would take
        the survivor down with it."""
        msg = ("abort", self.epoch, [r], f"rank {r} {self.gone.get(r, 'is gone')}")
        for m, conn in self.conns.items():
            if m != r and m not in self.gone:
                try:
                    control.send(conn, msg, f"front end -> rank {m}")
                except control.ChannelClosed:
                    pass  # found dead in its turn

    def _fail(self, why: str):
        self.dead = why
        self.procs.terminate()
        raise EngineDead(why)

    def rank_states(self) -> list[dict]:
        """Each rank's role, unit, pid and state ("alive", or how it ended) for /health."""
        return [{"rank": r, "role": i.role, "unit": i.unit, "pid": i.pid,
                 "state": (f"being replaced ({self.gone[r]})" if r in self.replacing else self.gone.get(r, "alive"))}
                for r, i in sorted(self.infos.items())]

    # --- shutdown ------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 30.0) -> dict[int, dict]:
        """Stop every rank and collect its report; ranks that do not leave are terminated."""
        if not self.dead:  # each rank on its own: one that is gone does not keep the others waiting
            live = [r for r in self.conns if r not in self.gone]
            for r in live:
                try:
                    control.send(self.conns[r], ("stop",), f"front end -> rank {r}")
                except control.ChannelClosed:
                    pass
            deadline = time.monotonic() + timeout_s
            for r in live:
                try:
                    self.reports[r] = self._expect(r, "report", max(0.1, deadline - time.monotonic()))[1]
                except (control.ChannelClosed, control.ChannelTimeout, EngineDead):
                    pass
        self.procs.join_or_terminate(timeout_s)
        for conn in self.conns.values():
            conn.close()
        self.dead = self.dead or "the executor was shut down"
        return self.reports

    def _broadcast(self, msg: tuple) -> None:
        for r, conn in self.conns.items():
            if r not in self.gone:
                control.send(conn, msg, f"front end -> rank {r}")

    def _expect(self, rank: int, kind: str, timeout_s: float) -> tuple:
        msg = ("beat",)
        while msg[0] in ("beat", "done", "lost"):  # step chatter still in flight
            msg = control.recv(self.conns[rank], timeout_s, f"front end <- rank {rank}", self.procs.check_alive)
        if msg[0] == "error":
            raise EngineDead(msg[1])
        if msg[0] != kind:
            raise EngineDead(f"rank {rank} sent {msg[0]!r}, expected {kind!r}")
        return msg


def agree_decode(rows: dict[int, StepRows]) -> dict[int, StepRows]:
    """EP ranks in a decode step are each told the largest rank's rows and the longest
    attention of the step (StepRows.peer_rows, attend_at_least): they then run the same shapes
    and size their blocks alike without a handshake. Other steps are left as they are."""
    busy = [r for r in rows.values() if len(r)]
    if not busy or not all(r.is_decode for r in busy):
        return rows
    top = max(max(r.slots) + 1 for r in busy)
    attend = max(r.attend_len for r in busy)
    return {u: dataclasses.replace(r, peer_rows=top, attend_at_least=max(r.attend_at_least, attend))
            for u, r in rows.items()}


def tell_replica_rows(rows: dict[int, StepRows]) -> dict[int, StepRows]:
    """A separated replica's decode step says its own rows (StepRows.peer_rows = highest slot
    + 1), and its expert ranks are told the same number (cluster._send_step): both sides then
    lay the step out and size its blocks alike, without a handshake. Prefill steps are left as
    they are (the replica announces those)."""
    return {u: dataclasses.replace(r, peer_rows=max(r.slots) + 1) if len(r) and r.is_decode else r
            for u, r in rows.items()}


class _ExpertLost(Exception):
    """An expert rank died and can be routed around (raised inside a step, handled by step)."""

    def __init__(self, rank: int, how: str):
        super().__init__(f"expert rank {rank} {how}")
        self.rank, self.how = rank, how


class ForeignRanks:
    """Ranks this process did not start (torchrun's): their liveness shows only through the
    control channel and its timeouts."""

    def check_alive(self) -> None:
        pass

    def dead_ranks(self) -> dict[int, str]:
        return {}

    def is_stopped(self, rank: int) -> bool:
        return False

    def terminate(self) -> None:
        pass

    def join_or_terminate(self, timeout_s: float) -> None:
        pass


def run_under_torchrun(run, kv: KvBudget, max_num_seqs: int | None, body, faults: tuple = ()):
    """Every torchrun process calls this. Rank 0 hosts the front end: `body(executor)` runs on
    its main thread while its own rank loop runs on a second one; the others run their rank
    loop. Returns body's result on rank 0, None elsewhere."""
    import torch.distributed as dist

    from .groups import init_distributed
    from .rank_loop import let_the_front_end_abort, serve_front_end
    let_the_front_end_abort()
    env = init_distributed(run.device, run.timeout_s, run.backend)
    try:
        listener, addr = control.listen("0.0.0.0") if env.rank == 0 else (None, None)
        box = [control.Address(os.environ["MASTER_ADDR"], addr.port, addr.authkey) if addr else None]
        dist.broadcast_object_list(box, src=0)
        spec = RankSpec(run, box[0], kv, tuple(faults))
        if env.rank != 0:
            serve_front_end(spec, env, box[0])
            return None
        errors: list = []
        loop = threading.Thread(target=_catching(errors, serve_front_end), args=(spec, env, box[0]), daemon=True)
        loop.start()
        executor = ClusterExecutor(run, kv.max_len, max_num_seqs, kv.gpu_memory_utilization,
                                   attach=(listener, ForeignRanks()))
        try:
            return body(executor)
        finally:
            executor.shutdown()
            loop.join(timeout=run.timeout_s)
            if errors:
                raise errors[0]
    finally:
        if dist.is_initialized():  # a rank gives its world up itself when an expert rank dies
            dist.destroy_process_group()


def dist_store():
    """A TCPStore server in this process on a free loopback port (the ranks are local)."""
    import torch.distributed as dist
    return dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=60), wait_for_workers=False)


def _catching(errors: list, fn):
    def run(*args):
        try:
            fn(*args)
        except BaseException as err:  # re-raised on the main thread
            errors.append(err)
    return run
