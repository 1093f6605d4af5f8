"""Start N ranks on this machine with torchrun's environment, or join the one torchrun made.

`spawn(n, fn, arg)` runs `fn(arg)` in n fresh processes with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set exactly as torchrun sets them, so the same entry point works
both ways. Rank 0's return value comes back to the caller. A rank that fails (or a run that
outlives an optional `timeout_s`) ends every rank and raises, naming the rank and how it ended.
"""
from __future__ import annotations

import os
import queue
import socket
import threading
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, fn: Callable, arg: Any, results) -> None:
    _die_with_parent()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Each rank gets one thread: N ranks share the machine's cores, and oversubscription makes
    # gloo collectives crawl.
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        out = fn(arg)
        results.put((rank, "ok", out if rank == 0 else None))
    except BaseException as err:  # report every failure to the parent, then exit non-zero
        results.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        raise SystemExit(1)


def spawn(world: int, fn: Callable[[Any], Any], arg: Any, timeout_s: float | None = None) -> Any:
    """timeout_s: a deadline for the whole run (None: none; a rank that dies still ends it at
    once, and the ranks' own waits for peers have their timeouts)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, arg, results), daemon=False)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        return _collect(procs, results, world, timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():  # a stopped (SIGSTOP) or stuck rank ignores SIGTERM
                p.kill()
                p.join(timeout=5)


def _collect(procs, results, world: int, timeout_s: float) -> Any:
    import time
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    reported, rank0 = {}, None
    while len(reported) < world:
        try:
            rank, status, payload = results.get(timeout=1.0)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in reported]
            if dead:
                p = procs[dead[0]]
                raise RuntimeError(f"rank {dead[0]} {exit_reason(p.pid, p.exitcode)} without a report "
                                   "(killed, or crashed in native code)")
            if deadline is not None and time.monotonic() > deadline:
                waiting = [r for r in range(world) if r not in reported]
                raise TimeoutError(f"ranks {waiting} did not finish within {timeout_s:.0f} s")
            continue
        reported[rank] = status
        if status == "error":
            raise RuntimeError(f"rank {rank} failed: {payload}")
        if rank == 0:
            rank0 = payload
    return rank0


def exit_reason(pid: int, exitcode: int | None) -> str:
    """How a rank process ended, in words (a negative exit code is the signal that killed it)."""
    if exitcode is None:
        return f"(pid {pid}) is still running"
    if exitcode < 0:
        import signal
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if exitcode == -9 else ""
        return f"(pid {pid}) was killed by {name} (signal {-exitcode}){hint}"
    return f"(pid {pid}) exited with code {exitcode}"


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that started it dies (even by SIGKILL),
    so no rank outlives its front end; SIGKILL, not SIGTERM, because a stopped (SIGSTOP) or stuck
    rank never handles SIGTERM. Elsewhere the closed control channel does the same, later."""
    import ctypes
    import signal
    import sys
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _rank_child(rank: int, world: int, port: int, fn: Callable, arg: Any) -> None:
    _die_with_parent()
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is a stuck rank?
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        fn(arg)
    except BaseException as err:  # the front end got the traceback over its channel; one line here
        import sys
        from ..errors import error_line
        print(f"masep rank {rank}: {error_line(err)[:300]}", file=sys.stderr, flush=True)
        os._exit(1)


_starter: "queue.Queue | None" = None
_starter_lock = threading.Lock()


def _start(proc) -> None:
    """proc.start() from a thread that lives as long as this process. On Linux a rank's
    PR_SET_PDEATHSIG fires when the *thread* that started it ends, and the engine thread that
    starts a replacement or a restart ends before the ranks are told to stop."""
    global _starter
    if threading.current_thread() is threading.main_thread():
        proc.start()
        return
    with _starter_lock:
        if _starter is None:
            _starter = queue.Queue()
            threading.Thread(target=_start_forever, args=(_starter,), name="masep-rank-starter", daemon=True).start()
    done: queue.Queue = queue.Queue()
    _starter.put((proc, done))
    err = done.get()
    if err is not None:
        raise err


def _start_forever(jobs: queue.Queue) -> None:
    while True:
        proc, done = jobs.get()
        try:
            proc.start()
            done.put(None)
        except BaseException as err:  # handed to the thread that asked
            done.put(err)


class RankProcesses:
    """`world` local rank processes running fn(arg) with torchrun's environment, for a front end
    that stays in this process and talks to them over its own channel (unlike `spawn`, which
    waits for them to finish)."""

    def __init__(self, world: int, fn: Callable[[Any], Any], arg: Any):
        self.world, self.port = world, free_port()
        self.procs = [self._process(r, fn, arg) for r in range(world)]
        for p in self.procs:
            _start(p)

    def _process(self, rank: int, fn: Callable[[Any], Any], arg: Any):
        return mp.get_context("spawn").Process(target=_rank_child, args=(rank, self.world, self.port, fn, arg),
                                               daemon=True, name=f"masep-rank{rank}")

    def replace(self, rank: int, fn: Callable[[Any], Any], arg: Any) -> int:
        """Start a new process for `rank` (whose process has ended) running fn(arg) with the
        same environment; `arg` tells it where the survivors meet. Returns its pid. On Linux it
        dies with this process (PR_SET_PDEATHSIG), like the others."""
        old = self.procs[rank]
        assert not old.is_alive(), f"rank {rank} is still running"
        self.procs[rank] = self._process(rank, fn, arg)
        _start(self.procs[rank])
        return self.procs[rank].pid

    def check_alive(self) -> None:
        """Raise naming the first rank that exited with an error (or was killed)."""
        from ..serve.engine_client import EngineDead
        for r, how in self.dead_ranks().items():
            raise EngineDead(f"rank {r} {how}")

    def dead_ranks(self) -> dict[int, str]:
        """{rank: how it ended} of every rank that exited with an error or was killed."""
        return {r: exit_reason(p.pid, p.exitcode) for r, p in enumerate(self.procs) if p.exitcode not in (None, 0)}

    def is_stopped(self, rank: int) -> bool:
        """Whether the rank's process is stopped (SIGSTOP, a debugger): alive but silent."""
        try:
            with open(f"/proc/{self.procs[rank].pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
        except (OSError, IndexError):
            return False

    def kill(self, rank: int) -> None:
        """SIGKILL one rank (also when it is stopped) and reap it."""
        p = self.procs[rank]
        if p.is_alive():
            p.kill()
        p.join(timeout=5)

    def terminate(self) -> None:
        self.join_or_terminate(0.0)

    def join_or_terminate(self, timeout_s: float) -> None:
        import time
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
