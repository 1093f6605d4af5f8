"""`masep serve` survives dead and stuck attention replicas while clients keep sending.

One server (three attention replicas of two slots + one expert rank, gloo ranks, --timeout 3):
  1. an injected SIGKILL of replica 1's rank at step 20, while six greedy requests from the
     `openai` client are in flight: every request completes with the single-device model's
     tokens (recompute failover; exact equality as in test_continuous_batching);
  2. `masep bench serve` drives the server and the test SIGSTOPs replica 2's rank in the middle
     of decode: the server declares it dead after the 3 s timeout, kills it, and no request
     fails;
  3. /health says degraded (naming both lost replicas and how each ended) and still answers,
     a last request is served by replica 0, and SIGTERM leaves no rank behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from test_serve import _children, _client, _reference, start_server

openai = pytest.importorskip("openai")
SERVE = ["--preset", "tiny", "--strategy", "separated", "--attn-replicas", "3", "--expert-ranks", "1",
         "--max-num-seqs", "2", "--max-num-batched-tokens", "8", "--timeout", "3", "--log-level", "warning",
         "--inject-fault", "kill@1:20"]


def _health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server():
    url, proc = start_server(SERVE)
    yield url, proc
    if proc.poll() is None:
        proc.kill()


@pytest.mark.timeout(120)
def test_killed_replica_mid_decode_changes_no_token(server):
    url, _ = server
    prompts = [[(7 * i + j) % 256 for j in range(5 + i)] for i in range(6)]
    got: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        out = _client(url).completions.create(model="tiny", prompt=prompts[i], max_tokens=30, temperature=0,
                                              extra_body={"return_token_ids": True, "ignore_eos": True})
        got[i] = out.choices[0].model_extra["token_ids"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    status, health = _health(url)
    assert status == 200 and health["status"] == "degraded", health
    assert "1" in health["lost_units"] and "SIGKILL" in health["lost_units"]["1"]
    assert [got.get(i) for i in range(6)] == [_reference(p, 30) for p in prompts]


@pytest.mark.timeout(120)
def test_stuck_replica_while_bench_serve_drives_the_server_loses_no_request(server):
    url, _ = server
    rank2 = next(r for r in _health(url)[1]["ranks"] if r["unit"] == 2)
    bench = subprocess.Popen([sys.executable, "-m", "masep", "bench", "serve", "--base-url", url, "--num-prompts", "24",
                              "--request-rate", "12", "--random-input-len", "10", "--random-output-len", "20",
                              "--random-vocab-size", "256", "--ignore-eos", "--max-duration", "90",
                              "--disable-tqdm", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # requests are decoding on every live replica
    os.kill(rank2["pid"], signal.SIGSTOP)
    out, err = bench.communicate(timeout=110)
    assert bench.returncode == 0, err
    row = json.loads(out)["rows"][0]
    assert row["completed"] == 24 and row["failed"] == 0 and row["total_output_tokens"] == 24 * 20
    status, health = _health(url)
    assert status == 200 and set(health["lost_units"]) == {"1", "2"}
    assert "SIGSTOP" in health["lost_units"]["2"] and "3 s" in health["lost_units"]["2"], health
    assert health["live_units"] == [0]


@pytest.mark.timeout(60)
def test_the_last_replica_serves_and_sigterm_leaves_no_rank(server):
    url, proc = server
    ranks = _children(proc.pid)
    out = _client(url).completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=5, temperature=0,
                                          extra_body={"return_token_ids": True, "ignore_eos": True})
    assert out.choices[0].model_extra["token_ids"] == _reference([1, 2, 3], 5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    _assert_gone(ranks)


def _assert_gone(pids: list[int]) -> None:
    time.sleep(1)
    alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
    assert not alive, f"processes left behind: {alive}"


@pytest.fixture(scope="module")
def redundant_server():
    """Two replicas and two expert ranks that each hold all 8 experts of the tiny preset; a
    replacement expert rank gets 0.01 s to join (it cannot: the fallback, a restart, is tested)."""
    url, proc = start_server(["--preset", "tiny", "--strategy", "separated", "--attn-replicas", "2",
                              "--expert-ranks", "2", "--placement", "0,1,2,3,4,5,6,7;0,1,2,3,4,5,6,7",
                              "--max-num-seqs", "2", "--timeout", "3", "--log-level", "warning",
                              "--join-timeout", "0.01"])
    yield url, proc
    if proc.poll() is None:
        proc.kill()


def _bench(url: str, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "masep", "bench", "serve", "--base-url", url, "--num-prompts",
                             str(n), "--request-rate", "12", "--random-input-len", "10", "--random-output-len", "20",
                             "--random-vocab-size", "256", "--ignore-eos", "--max-duration", "90", "--disable-tqdm",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(180)
def test_expert_ranks_with_and_without_redundancy_under_bench_serve_then_a_restart(redundant_server):
    url, proc = redundant_server
    experts = [r for r in _health(url)[1]["ranks"] if r["role"] == "expert"]
    # 1. one of two expert ranks holding every expert: routed around, no request fails
    bench = _bench(url, 24)
    time.sleep(1.0)
    os.kill(experts[1]["pid"], signal.SIGKILL)
    out, err = bench.communicate(timeout=110)
    row = json.loads(out)["rows"][0]
    assert row["completed"] == 24 and row["failed"] == 0, err
    status, health = _health(url)
    assert status == 200 and health["status"] == "degraded" and list(health["lost_expert_ranks"]) == [
        str(experts[1]["rank"])] and health["live_units"] == [0, 1]
    # 2. the last expert rank: its experts exist nowhere else; in-flight requests fail fast
    # naming it and its experts; replacements for both dead expert ranks do not join within
    # --join-timeout, so the server starts its ranks again (/health: 200 degraded while the
    # replacement is tried, 503 restarting naming why it failed, then 200 ok) and serves again
    bench = _bench(url, 24)
    time.sleep(1.0)
    killed = time.monotonic()
    os.kill(experts[0]["pid"], signal.SIGKILL)
    out, err = bench.communicate(timeout=110)
    row = json.loads(out)["rows"][0]
    assert row["failed"] > 0 and time.monotonic() - killed < 30
    errors = [e for e in row["errors"] if e]
    assert any(f"expert rank {experts[0]['rank']} (experts 0, 1, 2, 3, 4, 5, 6, 7)" in e for e in errors), errors[:3]
    deadline, restarting = time.monotonic() + 90, []
    while (health := _health(url)[1])["status"] != "ok":
        assert health["status"] in ("restarting", "degraded") and time.monotonic() < deadline, health
        restarting += [health["error"]] if health["status"] == "restarting" else []
        time.sleep(0.5)
    assert health["restarts"] == 1 and health["joins"] == 0 and not health["lost_expert_ranks"]
    assert not restarting or "did not join within 0.01 s" in restarting[0], restarting
    out = _client(url).completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=5, temperature=0,
                                          extra_body={"return_token_ids": True, "ignore_eos": True})
    assert out.choices[0].model_extra["token_ids"] == _reference([1, 2, 3], 5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


@pytest.mark.timeout(150)
def test_one_rank_of_a_head_parallel_replica_killed_under_bench_serve_loses_the_replica_not_a_request():
    """Two replicas of two head-parallel ranks each: SIGKILL one rank of replica 1 while `masep
    bench serve` drives the server. The front end stops the replica's other rank (it may be
    waiting on the dead one), the whole replica is lost, its requests go on at replica 0 and
    none fails; SIGTERM then leaves no rank."""
    url, proc = start_server(["--preset", "tiny", "--strategy", "separated", "--attn-replicas", "2", "--attn-tp", "2",
                              "--expert-ranks", "1", "--max-num-seqs", "2", "--timeout", "3",
                              "--log-level", "warning"])
    try:
        ranks = _children(proc.pid)
        replica1 = [r for r in _health(url)[1]["ranks"] if r["unit"] == 1]
        assert len(replica1) == 2
        bench = _bench(url, 16)
        time.sleep(1.0)
        os.kill(replica1[1]["pid"], signal.SIGKILL)
        out, err = bench.communicate(timeout=110)
        row = json.loads(out)["rows"][0]
        assert row["completed"] == 16 and row["failed"] == 0 and row["total_output_tokens"] == 16 * 20, err
        status, health = _health(url)
        assert status == 200 and list(health["lost_units"]) == ["1"] and health["live_units"] == [0], health
        assert "SIGKILL" in health["lost_units"]["1"]
        states = {r["rank"]: r["state"] for r in health["ranks"]}
        assert "SIGKILL" in states[replica1[1]["rank"]] and "stopped with attention replica 1" in states[
            replica1[0]["rank"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _assert_gone(ranks)
    finally:
        if proc.poll() is None:
            proc.kill()
