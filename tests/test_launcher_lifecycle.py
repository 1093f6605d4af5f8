"""The launcher strands nothing and hides nothing (what a user hit before these fixes):
  - SIGKILL of the `masep` parent left every rank running: ranks die with it (the kernel
    kills them when their parent dies, also a stopped one);
  - a SIGSTOPped rank made `masep run` print its timeout error and never exit;
  - the error named a survivor ("rank 0 failed: Connection reset by peer"), never the rank
    that died with -9: it now names the dead rank and the signal;
  - `spawn`'s overall deadline (10 x --timeout) killed healthy runs that were just long.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from masep.parallel.launch import spawn

from test_serve import _children, start_server

RUN = [sys.executable, "-m", "masep", "run", "--preset", "tiny", "--batch", "4", "--max-new-tokens", "24",
       "--warmup", "0"]


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]


@pytest.mark.timeout(120)
def test_sigkill_of_the_server_kills_every_rank():
    url, proc = start_server(["--preset", "tiny", "--strategy", "separated", "--attn-replicas", "2",
                              "--expert-ranks", "1", "--log-level", "warning"])
    with urllib.request.urlopen(url + "/health", timeout=5) as resp:
        ranks = [r["pid"] for r in json.loads(resp.read())["ranks"]]
    assert len(ranks) == 3 and set(ranks) <= set(_children(proc.pid))
    os.kill(ranks[0], signal.SIGSTOP)  # a stopped rank too
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 10
    while _alive(ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(ranks), f"ranks outlived their killed parent: {_alive(ranks)}"


@pytest.mark.timeout(120)
def test_a_stopped_rank_ends_masep_run_with_its_name_and_nothing_left():
    """EP cannot go on without a rank: the run ends with exit 1, naming the stopped rank, soon
    after --timeout, and no rank is left."""
    start = time.monotonic()
    out = subprocess.run([*RUN, "--strategy", "ep", "--ep", "2", "--timeout", "2", "--inject-fault", "hang@1:3"],
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "rank 1 (ep)" in out.stderr and "sent nothing for 2 s" in out.stderr and "SIGSTOP" in out.stderr
    assert time.monotonic() - start < 60


@pytest.mark.timeout(120)
def test_the_error_names_the_dead_rank_and_its_signal():
    out = subprocess.run([*RUN, "--strategy", "tp_pp", "--pp", "2", "--inject-fault", "kill@1:3"],
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 1
    assert "rank 1 (tp_pp)" in out.stderr and "SIGKILL" in out.stderr, out.stderr[-2000:]


def _sleep_then_answer(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


@pytest.mark.timeout(60)
def test_spawn_has_no_deadline_unless_asked():
    assert spawn(2, _sleep_then_answer, 2.0) == "done"
    with pytest.raises(TimeoutError):
        spawn(2, _sleep_then_answer, 30.0, timeout_s=1.0)


class _Proc:
    def __init__(self, exitcode):
        self.exitcode, self.pid = exitcode, 1000


class _Procs:
    """Rank processes as the front end sees them: rank 1's exit (a signal) shows only after
    `lag` dead_ranks() reads, as when a survivor's report beats the reaping of the dead."""

    def __init__(self, exitcodes, lag):
        self.procs, self.lag, self.killed = [_Proc(None) for _ in exitcodes], lag, []
        self.exitcodes = exitcodes

    def poll(self):
        self.lag -= 1
        if self.lag <= 0:
            for proc, code in zip(self.procs, self.exitcodes):
                proc.exitcode = code

    def dead_ranks(self):
        from masep.parallel.launch import exit_reason
        return {r: exit_reason(p.pid, p.exitcode) for r, p in enumerate(self.procs) if p.exitcode not in (None, 0)}

    def kill(self, r):
        self.killed.append(r)


def _front_end(procs):
    from masep.parallel.cluster import ClusterExecutor
    from masep.parallel.control import RankInfo
    from masep.plan import TpPpPlan
    front = object.__new__(ClusterExecutor)
    front.plan, front.procs, front.gone, front.conns, front.epoch = TpPpPlan(1, 2, 2), procs, {}, {}, 0
    front.infos = {r: RankInfo(r, "tp_pp", 0, r == 1, 4, 1000) for r in range(2)}
    return front


@pytest.mark.parametrize("exitcodes,named", [((None, -9), "rank 1 (tp_pp) (pid 1000) was killed by SIGKILL"),
                                             ((None, 1), "rank 0 (tp_pp) failed: RuntimeError: peer reset")])
def test_a_survivors_error_names_the_killed_peer_first(monkeypatch, exitcodes, named):
    """Rank 0's send fails because rank 1 was SIGKILLed, and rank 0's error reaches the front end
    before rank 1's exit shows: the engine names rank 1 and the signal, not rank 0's failed send.
    A peer that exited with a code (it may have failed because of rank 0) does not take the blame."""
    from masep.parallel import cluster
    from masep.parallel.cluster import EngineDead
    procs = _Procs(exitcodes, lag=5)
    monkeypatch.setattr(cluster.time, "sleep", lambda s: procs.poll())
    with pytest.raises(EngineDead, match=named.replace("(", "\\(").replace(")", "\\)")):
        _front_end(procs)._on_message(0, ("error", "Traceback ...\nRuntimeError: peer reset"), 3, {}, {}, {})
