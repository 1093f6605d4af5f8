"""The front end's executor for a distributed plan: ranks in other processes, driven by steps.

`ClusterExecutor` starts `plan.world_size` rank processes (torchrun's environment, gloo or
NCCL between them), waits for each to connect to its control channel, sizes the KV cache
(the smallest budget of any rank of a unit), and then runs scheduler steps: each rank of a
unit that has rows gets them, each expert rank learns which replicas step, and each unit's
leader answers with the sampled tokens. EP ranks step together every time (their all-to-all
needs every rank), with no rows when their unit has none.

Failures: a rank that reports an error, exits, or does not answer within the timeout ends
the executor with `EngineDead` naming the rank; the ranks are then terminated. The
scheduler in this process still holds every request (fault tolerance builds on that).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from multiprocessing.connection import wait

from ..runtime import StepRows
from ..serve.engine_client import EngineDead
from . import control
from .launch import RankProcesses
from .rank_loop import KvBudget, RankSpec, rank_main


class ClusterExecutor:
    def __init__(self, run, max_len: int, max_num_seqs: int | None, gpu_memory_utilization: float = 0.9,
                 start_timeout_s: float | None = None, attach=None):
        """attach: (listener, processes) when the ranks were started elsewhere (torchrun): the
        executor then only waits for their connections."""
        self.plan, self.timeout_s, self.max_len = run.plan, run.timeout_s, max_len
        self.lockstep = run.plan.strategy == "ep"
        self.reports: dict[int, dict] = {}
        if attach is not None:
            listener, self.procs = attach
        else:
            listener, addr = control.listen()
            self.procs = RankProcesses(run.plan.world_size, rank_main,
                                       RankSpec(run, addr, KvBudget(max_len, gpu_memory_utilization)))
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

    # --- start-up ------------------------------------------------------------------------
    def _accept_all(self, listener, timeout_s: float) -> None:
        """Every rank's connection and hello; a rank that dies while loading fails the start."""
        arrived: queue.Queue = queue.Queue()

        def accept():
            try:
                for _ in range(self.plan.world_size):
                    arrived.put(listener.accept())
            except OSError:  # the listener was closed: start-up failed elsewhere
                pass

        threading.Thread(target=accept, daemon=True).start()
        self.conns, self.infos = {}, {}
        deadline = time.monotonic() + timeout_s
        while len(self.infos) < self.plan.world_size:
            try:
                conn = arrived.get(timeout=0.5)
            except queue.Empty:
                self.procs.check_alive()
                if time.monotonic() > deadline:
                    raise EngineDead(f"only {len(self.infos)} of {self.plan.world_size} ranks connected within "
                                     f"{timeout_s:.0f} s")
                continue
            msg = control.recv(conn, self.timeout_s, "front end: rank hello", self.procs.check_alive)
            if msg[0] == "error":
                raise EngineDead(msg[1])
            info: control.RankInfo = msg[1]
            self.conns[info.rank], self.infos[info.rank] = conn, info
        units = sorted({i.unit for i in self.infos.values() if i.unit is not None})
        self.num_units = len(units)
        self.members = {u: [r for r, i in self.infos.items() if i.unit == u] for u in units}
        self.leaders = {i.unit: r for r, i in self.infos.items() if i.leader}
        self.experts = [r for r, i in self.infos.items() if i.role == "expert"]

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
        if self.dead:
            raise EngineDead(self.dead)
        if self.lockstep:
            rows = {u: rows.get(u, StepRows.empty()) for u in range(self.num_units)}
        units = sorted(rows)
        try:
            for u in units:
                for r in self.members[u]:
                    control.send(self.conns[r], ("step", step_id, rows[u], units), f"front end -> rank {r}")
            for r in self.experts:
                control.send(self.conns[r], ("step", step_id, None, units), f"front end -> rank {r}")
            return self._collect_tokens(step_id, units)
        except (control.ChannelClosed, control.ChannelTimeout, EngineDead) as err:
            self._fail(str(err))

    def _collect_tokens(self, step_id: int, units: list[int]) -> dict[int, list[int | None]]:
        want = {self.leaders[u]: u for u in units}
        got: dict[int, list] = {}
        deadline = time.monotonic() + self.timeout_s
        by_conn = {id(c): r for r, c in self.conns.items()}
        while len(got) < len(want):
            for conn in wait(list(self.conns.values()), timeout=0.5):
                r = by_conn[id(conn)]
                msg = control.recv(conn, 0, f"front end <- rank {r}")
                if msg[0] == "error":
                    raise EngineDead(msg[1])
                if msg[0] != "tokens" or msg[1] != step_id or r not in want:
                    raise EngineDead(f"rank {r} sent {msg[:2]} during step {step_id}: the ranks diverged")
                got[want[r]] = msg[2]
            self.procs.check_alive()
            if time.monotonic() > deadline:
                late = sorted(r for r in want if want[r] not in got)
                raise EngineDead(f"step {step_id}: ranks {late} did not answer within {self.timeout_s:.0f} s")
        return got

    def _fail(self, why: str):
        self.dead = why
        self.procs.terminate()
        raise EngineDead(why)

    # --- shutdown ------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 30.0) -> dict[int, dict]:
        """Stop every rank and collect its report; ranks that do not leave are terminated."""
        if not self.dead:
            try:
                self._broadcast(("stop",))
                for r in self.conns:
                    self.reports[r] = self._expect(r, "report", timeout_s)[1]
            except (control.ChannelClosed, control.ChannelTimeout, EngineDead):
                pass
        self.procs.join_or_terminate(timeout_s)
        for conn in self.conns.values():
            conn.close()
        self.dead = self.dead or "the executor was shut down"
        return self.reports

    def _broadcast(self, msg: tuple) -> None:
        for r, conn in self.conns.items():
            control.send(conn, msg, f"front end -> rank {r}")

    def _expect(self, rank: int, kind: str, timeout_s: float) -> tuple:
        msg = control.recv(self.conns[rank], timeout_s, f"front end <- rank {rank}", self.procs.check_alive)
        if msg[0] == "error":
            raise EngineDead(msg[1])
        if msg[0] != kind:
            raise EngineDead(f"rank {rank} sent {msg[0]!r}, expected {kind!r}")
        return msg


class ForeignRanks:
    """Ranks this process did not start (torchrun's): their liveness shows only through the
    control channel and its timeouts."""

    def check_alive(self) -> None:
        pass

    def terminate(self) -> None:
        pass

    def join_or_terminate(self, timeout_s: float) -> None:
        pass


def run_under_torchrun(run, kv: KvBudget, max_num_seqs: int | None, body):
    """Every torchrun process calls this. Rank 0 hosts the front end: `body(executor)` runs on
    its main thread while its own rank loop runs on a second one; the others run their rank
    loop. Returns body's result on rank 0, None elsewhere."""
    import torch.distributed as dist

    from .groups import init_distributed
    from .rank_loop import serve_front_end
    env = init_distributed(run.device, run.timeout_s, run.backend)
    try:
        listener, addr = control.listen("0.0.0.0") if env.rank == 0 else (None, None)
        box = [control.Address(os.environ["MASTER_ADDR"], addr.port, addr.authkey) if addr else None]
        dist.broadcast_object_list(box, src=0)
        spec = RankSpec(run, box[0], kv)
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
        dist.destroy_process_group()


def _catching(errors: list, fn):
    def run(*args):
        try:
            fn(*args)
        except BaseException as err:  # re-raised on the main thread
            errors.append(err)
    return run
