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
