"""`masep serve` replaces a dead expert rank whose experts no other rank holds, without
restarting the others.

One server, one attention rank + two expert ranks (experts 0-3 on rank 1, 4-7 on rank 2), gloo,
and an injected SIGKILL of rank 2 while four greedy requests decode:
  1. the requests in flight end with an error naming rank 2 and its experts (HTTP 500); a
     request that had not started yet is served after the join;
  2. meanwhile /health answers 200 "degraded" naming the rank being replaced (never 503), and
     a request sent right after the failure is queued, not refused, and served after the join;
  3. after the join ranks 0 and 1 are the same processes (pids), rank 2 a new one; /health is
     "ok" with one join, /metrics counts it, and new requests get exactly the single-device
     model's tokens; SIGTERM leaves no process behind.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import pytest

from test_serve import _children, _reference, start_server
from test_serve_faults import _health

pytest.importorskip("openai")  # test_serve's helpers need it
SERVE = ["--preset", "tiny", "--strategy", "separated", "--attn-replicas", "1", "--expert-ranks", "2",
         "--max-num-seqs", "4", "--timeout", "3", "--log-level", "warning", "--inject-fault", "kill@2:10"]


def _complete(url: str, prompt: list[int], max_tokens: int) -> tuple[int, dict]:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "return_token_ids": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _ask_all(url: str, prompts: list[list[int]], max_tokens: int) -> list[tuple[int, dict]]:
    out: list = [None] * len(prompts)

    def ask(i: int) -> None:
        out[i] = _complete(url, prompts[i], max_tokens)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return out


def _tokens(result: tuple[int, dict]) -> list[int] | None:
    status, body = result
    return body["choices"][0]["token_ids"] if status == 200 else None


@pytest.mark.timeout(150)
def test_a_replacement_expert_rank_joins_and_the_others_keep_serving():
    url, proc = start_server(SERVE)
    seen: list[tuple[int, dict]] = []
    stop = threading.Event()

    def watch() -> None:  # /health all along the failure and the join
        while not stop.is_set():
            seen.append(_health(url))
            time.sleep(0.05)

    try:
        before = {r["rank"]: r["pid"] for r in _health(url)[1]["ranks"]}
        watcher = threading.Thread(target=watch)
        watcher.start()
        prompts = [[(11 * i + j) % 256 for j in range(4 + i)] for i in range(4)]
        first = _ask_all(url, prompts, 40)
        during = _complete(url, [5, 6, 7], 8)  # the replacement is loading: queued, then served
        failed = [r for r in first if r[0] != 200]
        assert failed, first
        for status, body in failed:  # in flight when rank 2 died
            assert status == 500 and "expert rank 2 (experts 4, 5, 6, 7)" in body["error"]["message"], body
            assert "SIGKILL" in body["error"]["message"]
        for p, r in zip(prompts, first):  # not started yet: served after the join
            assert r[0] != 200 or _tokens(r) == _reference(p, 40)
        assert _tokens(during) == _reference([5, 6, 7], 8)
        deadline = time.monotonic() + 60
        while (health := _health(url))[1]["status"] != "ok":
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        stop.set()
        watcher.join(10)
        assert all(code == 200 for code, _ in seen), [h for h in seen if h[0] != 200][:1]
        replacing = [h for _, h in seen if h.get("replacing_ranks")]
        assert replacing and all(h["status"] == "degraded" for h in replacing)
        assert list(replacing[0]["replacing_ranks"]) == ["2"] and "SIGKILL" in replacing[0]["replacing_ranks"]["2"]
        status, health = health
        after = {r["rank"]: r["pid"] for r in health["ranks"]}
        assert health["joins"] == 1 and health["restarts"] == 0 and not health.get("replacing_ranks")
        assert after[0] == before[0] and after[1] == before[1] and after[2] != before[2]
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            assert 'masep:rank_joins_total{model_name="tiny"} 1.0' in resp.read().decode()
        again = [[(3 * i + 1) % 256 for _ in range(3 + i)] for i in range(3)]
        assert [_tokens(r) for r in _ask_all(url, again, 12)] == [_reference(p, 12) for p in again]
        ranks = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        time.sleep(1)
        alive = [p for p in ranks if os.path.exists(f"/proc/{p}")
                 and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
        assert not alive, f"processes left behind: {alive}"
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
