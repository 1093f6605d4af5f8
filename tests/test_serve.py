"""`masep serve` end to end: a separated plan on gloo ranks behind the HTTP server, driven by the
official `openai` client and by `masep bench serve`; tokens equal the single-device model's.

The server is a real subprocess on 127.0.0.1 (two attention replicas of two slots each + one
expert rank, prefill chunks of 8 tokens), so the requests below queue, join busy batches and
get chunked, exactly as in production. Exact token equality: see test_continuous_batching.
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

from masep.config import preset
from masep.engine import Request, generate, random_prompts
from masep.model import build_model
from masep.parallel.launch import free_port
from masep.runtime import LocalRuntime

openai = pytest.importorskip("openai")
CFG = preset("tiny")
SERVE = ["--preset", "tiny", "--strategy", "separated", "--attn-replicas", "2", "--expert-ranks", "1",
         "--max-num-seqs", "2", "--max-num-batched-tokens", "8", "--timeout", "60", "--log-level", "warning"]


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def start_server(args: list[str], timeout_s: float = 120) -> tuple[str, subprocess.Popen]:
    """`masep serve ARGS` on a free loopback port, once /health answers: (url, process)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "masep", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return url, proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"masep serve did not start: {proc.stdout.read()}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server():
    url, proc = start_server(SERVE)
    ranks = _children(proc.pid)
    yield url, proc, ranks
    if proc.poll() is None:
        proc.kill()


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)


def _reference(prompt: list[int], max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> list[int]:
    runtime = LocalRuntime(build_model(CFG, seed=0))
    return generate(runtime, [Request(prompt, max_tokens, temperature, seed=seed)]).tokens[0]


@pytest.mark.timeout(120)
def test_openai_client_tokens_equal_the_single_device_model(server):
    url, _, _ = server
    client = _client(url)
    prompts = [random_prompts(1, n, CFG.vocab_size, seed=n)[0] for n in (5, 19, 7, 12, 3)]
    import concurrent.futures as cf

    def ask(i: int):
        seeded = i % 2 == 1
        out = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6 + i,
                                        temperature=0.7 if seeded else 0.0, seed=100 + i,
                                        extra_body={"return_token_ids": True})
        return out.choices[0].model_extra["token_ids"], out.choices[0].finish_reason, out.usage

    with cf.ThreadPoolExecutor(5) as pool:  # 5 at once on 4 slots: one waits, the rest share batches
        results = list(pool.map(ask, range(5)))
    for i, (tokens, finish, usage) in enumerate(results):
        seeded = i % 2 == 1
        assert tokens == _reference(prompts[i], 6 + i, 0.7 if seeded else 0.0, 100 + i if seeded else None)
        assert finish == "length" and usage.completion_tokens == 6 + i and usage.prompt_tokens == len(prompts[i])


@pytest.mark.timeout(120)
def test_streaming_and_chat(server):
    url, _, _ = server
    client = _client(url)
    prompt = random_prompts(1, 9, CFG.vocab_size, seed=3)[0]
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0.0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
    tokens, usage = [], None
    for chunk in stream:
        if chunk.choices:
            tokens += chunk.choices[0].model_extra.get("token_ids") or []
        usage = chunk.usage or usage
    assert tokens == _reference(prompt, 8) and usage.completion_tokens == 8
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0.0)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 4


@pytest.mark.timeout(60)
def test_bad_requests_get_400_and_the_server_keeps_serving(server):
    url, _, _ = server
    client = _client(url)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=1000)
    assert err.value.body["param"] == "max_tokens" and "maximum model length 256" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=[1, 2, 999], max_tokens=2)
    assert "vocab" in err.value.body["message"]
    assert client.completions.create(model="tiny", prompt=[1, 2], max_tokens=2).usage.completion_tokens == 2


@pytest.mark.timeout(120)
def test_bench_serve_against_it(server):
    url, _, _ = server
    out = subprocess.run([sys.executable, "-m", "masep", "bench", "serve", "--base-url", url, "--num-prompts", "8",
                          "--request-rate", "20", "--random-input-len", "12", "--random-output-len", "5",
                          "--random-vocab-size", "256", "--max-duration", "90", "--disable-tqdm", "--json"],
                         capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)["rows"][0]
    assert row["completed"] == 8 and row["failed"] == 0 and row["total_output_tokens"] == 40
    assert row["mean_ttft_ms"] > 0 and row["mean_tpot_ms"] > 0
    # one chunk per token, also for tokens whose text is held back (random bytes are mostly
    # incomplete UTF-8): 5 tokens -> 4 gaps
    assert [len(gaps) for gaps in row["itls"]] == [4] * 8
    # the server's step counters, read from /metrics before and after: every prompt token was
    # prefilled and each request's 4 tokens after the first came from decode steps (>= as a
    # request of an earlier test may still be finishing on the module's server)
    srv = row["server"]
    assert srv["prefill_tokens"] >= 8 * 12 and srv["decode_steps"] >= 4
    assert srv["decode_steps"] * srv["mean_decode_rows"] >= 8 * 4 - 1e-9


@pytest.mark.timeout(120)
def test_sigterm_stops_the_server_and_every_rank(server):
    """Last in this file: SIGTERM ends the server with exit 0 and leaves no rank process."""
    url, proc, ranks = server
    assert len(ranks) >= 3  # two attention replicas and an expert rank (plus helpers of multiprocessing)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    time.sleep(1)
    alive = [p for p in ranks if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
    assert not alive, f"processes left behind: {alive}"
