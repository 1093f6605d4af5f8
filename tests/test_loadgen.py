"""`masep bench serve` (masep/serve/loadgen.py) against a fake OpenAI-compatible server.

The fake streams `max_tokens` tokens after a known first delay and known gaps, sends usage and
[DONE], and records the peak number of streams in flight. A text prompt steers one request:
words "ttft=0.5", "itl=0.01", "status=429" or "mode=nodone|error". Asked for token ids
(return_token_ids), it sends output token k of a token-id prompt P as id P[0] + k. Timing assertions only check
ordering and rough magnitudes with wide margins (CI machines stall); the exact checks are the
definitions (E2EL = TTFT + sum of ITLs, TPOT = (E2EL - TTFT) / (n - 1)), which hold on any machine.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from masep.serve.loadgen import (BenchServeConfig, arrival_times, bench_serve_main, load_jsonl, meets_slo,
                                 run_benchmark)
from masep.metrics import RequestOutput


class Fake:
    """What the fake server does; tests change it before a run (the fixture resets it)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.ttft, self.itl = 0.02, 0.01  # seconds before the first chunk, between chunks
        self.tokens_per_chunk = 1
        self.usage = True
        self.in_flight = self.peak = 0
        self.bodies: list[dict] = []


def _controls(fake: Fake, prompt) -> dict:
    opts = dict(ttft=fake.ttft, itl=fake.itl, status=200, mode="ok")
    for word in prompt.split() if isinstance(prompt, str) else []:
        key, _, value = word.partition("=")
        if key in opts:
            opts[key] = type(opts[key])(value)
    return opts


def _sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _stream(fake: Fake, body: dict, chat: bool, prompt, opts: dict):
    fake.in_flight += 1
    fake.peak = max(fake.peak, fake.in_flight)
    choice = (lambda text: {"index": 0, "delta": {"content": text}}) if chat else (lambda text: {"index": 0, "text": text})
    first = prompt[0] if isinstance(prompt, list) else 1000
    try:
        if chat:  # the opening role-only chunk comes at once; it must not count as the first token
            yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(opts["ttft"])
        n, k = body["max_tokens"], fake.tokens_per_chunk
        for i in range(0, n, k):
            if i:
                await asyncio.sleep(opts["itl"])
            out = choice(" tok" * min(k, n - i))
            if body.get("return_token_ids"):  # as masep: in the chat delta, else in the choice
                (out["delta"] if chat else out)["token_ids"] = [first + j for j in range(i, min(i + k, n))]
            yield _sse({"choices": [out]})
            if opts["mode"] == "error":
                yield _sse({"error": {"message": "fake broke mid-stream", "code": 500}})
                return
        yield _sse({"choices": [{**choice(""), "finish_reason": "length"}]})
        num_in = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        if fake.usage:
            yield _sse({"choices": [], "usage": {"prompt_tokens": num_in, "completion_tokens": n}})
        if opts["mode"] != "nodone":
            yield "data: [DONE]\n\n"
    finally:
        fake.in_flight -= 1


def make_app(fake: Fake) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def answer(request: Request, chat: bool):
        body = await request.json()
        fake.bodies.append(body)
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        opts = _controls(fake, prompt)
        if opts["status"] != 200:
            error = {"message": f"fake refuses with {opts['status']}", "type": "fake", "code": opts["status"]}
            return JSONResponse({"error": error}, status_code=opts["status"])
        return StreamingResponse(_stream(fake, body, chat, prompt, opts), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    return app


@pytest.fixture(scope="module")
def server():
    fake = Fake()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the server gets the bound socket: no race for a free port
    srv = uvicorn.Server(uvicorn.Config(make_app(fake), log_level="warning", lifespan="off",
                                        timeout_graceful_shutdown=1))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the fake server did not start"
        time.sleep(0.01)
    yield fake, f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def fake(server):
    fake, url = server
    fake.reset()
    fake.url = url
    return fake


def run(fake: Fake, **changes) -> dict:
    cfg = dict(base_url=fake.url, disable_tqdm=True, num_prompts=4, random_input_len=8, random_output_len=5)
    return asyncio.run(run_benchmark(BenchServeConfig(**{**cfg, **changes})))


def jsonl(tmp_path, prompts: list[str], max_tokens: int = 4) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "max_tokens": max_tokens}) + "\n" for p in prompts))
    return str(path)


@pytest.mark.timeout(60)
def test_counts_and_definitions(fake):
    fake.ttft, fake.itl = 0.2, 0.05
    r = run(fake, ignore_eos=True)
    assert (r["completed"], r["failed"]) == (4, 0)
    assert r["total_input_tokens"] == 4 * 8 and r["total_output_tokens"] == 4 * 5
    assert r["output_lens"] == [5] * 4 and [len(gaps) for gaps in r["itls"]] == [4] * 4
    # The definitions, exact on any machine: E2EL = TTFT + 4 gaps; one token per chunk, so TPOT = ITL.
    assert r["mean_e2el_ms"] == pytest.approx(r["mean_ttft_ms"] + 4 * r["mean_tpot_ms"], rel=1e-9)
    assert r["mean_tpot_ms"] == pytest.approx(r["mean_itl_ms"], rel=1e-9)
    # Magnitudes: sleeps never end early; the upper bounds only catch unit mistakes.
    assert 195 <= min(r["ttfts"]) * 1e3 and r["p99_ttft_ms"] < 5000
    assert 45 <= r["mean_itl_ms"] < 2000 and r["median_itl_ms"] < r["median_ttft_ms"]
    assert r["output_throughput"] == pytest.approx(20 / r["duration"])
    assert r["meta"]["model"] == "fake-model" and r["request_rate"] == "inf"
    body = fake.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert len(body["prompt"]) == 8 and all(isinstance(t, int) for t in body["prompt"])
    assert (body["model"], body["max_tokens"], body["ignore_eos"], body["temperature"]) == ("fake-model", 5, True, 0)


@pytest.mark.timeout(60)
def test_output_tokens_from_usage_else_chunks(fake):
    fake.tokens_per_chunk = 3  # 6 tokens in 2 chunks
    r = run(fake, random_output_len=6)
    assert r["total_output_tokens"] == 4 * 6 and [len(g) for g in r["itls"]] == [1] * 4
    tpots = [(sum(g) / 5) * 1e3 for g in r["itls"]]  # (E2EL - TTFT) / (6 - 1), with one gap
    assert r["mean_tpot_ms"] == pytest.approx(np.mean(tpots), rel=1e-9)
    fake.usage = False  # no usage chunk: count the chunks that carried text
    assert run(fake, random_output_len=6)["total_output_tokens"] == 4 * 2


@pytest.mark.timeout(60)
def test_chat_sends_words_and_skips_the_role_chunk(fake):
    fake.ttft = 0.2
    r = run(fake, endpoint="/v1/chat/completions", model="m")
    assert r["completed"] == 4 and min(r["ttfts"]) >= 0.195  # the immediate role chunk was not timed
    content = fake.bodies[0]["messages"][0]["content"]
    assert fake.bodies[0]["model"] == "m" and len(content.split()) == 8
    assert r["input_lens"] == [8] * 4  # text prompts: the server's usage.prompt_tokens


@pytest.mark.timeout(60)
def test_failures_are_counted_and_listed(fake, tmp_path, capsys):
    path = jsonl(tmp_path, ["status=429", "status=400", "mode=nodone", "mode=error", "hello", "hello"])
    r = run(fake, dataset_name="jsonl", dataset_path=path, num_prompts=6)
    assert (r["completed"], r["failed"]) == (2, 4) and r["total_output_tokens"] == 2 * 4
    e = r["errors"]
    assert e[0] == "HTTP 429: fake refuses with 429" and e[1] == "HTTP 400: fake refuses with 400"
    assert "[DONE]" in e[2] and "fake broke mid-stream" in e[3] and e[4:] == ["", ""]
    args = ["--base-url", fake.url, "--dataset-name", "jsonl", "--dataset-path", path, "--disable-tqdm"]
    assert bench_serve_main([*args, "--num-prompts", "6"]) == 0
    assert "request 0 failed: HTTP 429" in capsys.readouterr().err
    assert bench_serve_main([*args, "--num-prompts", "2"]) == 1  # nothing succeeded


@pytest.mark.timeout(60)
def test_goodput_counts_requests_meeting_the_slo(fake, tmp_path):
    path = jsonl(tmp_path, ["ttft=0.01"] * 3 + ["ttft=0.6"] * 2)
    r = run(fake, dataset_name="jsonl", dataset_path=path, num_prompts=5, goodput={"ttft": 400.0})
    assert r["completed"] == 5 and round(r["request_goodput"] * r["duration"]) == 3
    one_token = RequestOutput(3, tokens=[1], token_times_s=[0.1])  # no TPOT: meets any TPOT SLO (vLLM)
    assert meets_slo(one_token, {"tpot": 1.0, "ttft": 200.0}) and not meets_slo(one_token, {"e2el": 50.0})


@pytest.mark.timeout(60)
def test_max_concurrency_is_respected(fake):
    fake.ttft = 0.1
    r = run(fake, num_prompts=9, max_concurrency=3)
    assert r["completed"] == 9 and fake.peak == 3 and r["max_concurrency"] == 3


@pytest.mark.timeout(60)
def test_max_duration_bounds_the_run(fake):
    fake.ttft = 0.4  # each request ~0.45 s; at 2 at a time 50 would take ~11 s
    t0 = time.perf_counter()
    r = run(fake, num_prompts=50, max_concurrency=2, max_duration=1.0)
    assert time.perf_counter() - t0 < 4 and r["duration"] < 3
    assert r["completed"] >= 1 and r["failed"] >= 1 and r["unsent"] > 0
    assert r["completed"] + r["failed"] + r["unsent"] == 50
    assert all("--max-duration" in e for e in r["errors"] if e)


@pytest.mark.timeout(60)
def test_request_timeout_fails_the_request(fake, tmp_path):
    path = jsonl(tmp_path, ["ttft=5", "hello"])
    r = run(fake, dataset_name="jsonl", dataset_path=path, num_prompts=2, request_timeout=0.5)
    assert (r["completed"], r["failed"]) == (1, 1) and "--request-timeout 0.5 s" in r["errors"][0]


@pytest.mark.timeout(60)
def test_arrival_times():
    assert arrival_times(4, float("inf")) == [0.0] * 4
    fixed = np.diff(arrival_times(5, 4.0, arrival="fixed"))
    assert np.allclose(fixed, 0.25)
    t = arrival_times(4000, 10.0, seed=1)
    assert t[0] == 0.0 and t == arrival_times(4000, 10.0, seed=1) and t != arrival_times(4000, 10.0, seed=2)
    for burstiness, cv in ((1.0, 1.0), (4.0, 0.5), (0.25, 2.0)):  # gamma gaps: CV = 1/sqrt(shape)
        gaps = np.diff(arrival_times(4000, 10.0, burstiness, seed=0))
        assert gaps.mean() == pytest.approx(0.1, rel=0.1) and gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)


@pytest.mark.timeout(60)
def test_jsonl_parsing(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hi there"}\n\n{"prompt_token_ids": [1, 2, 3], "max_tokens": 7}\n'
                    '{"prompt": "x", "output_len": 2}\n')
    reqs = load_jsonl(str(path), 5, chat=False, default_max_tokens=9)
    assert [(r.prompt, r.max_tokens, r.prompt_len) for r in reqs[:3]] == [
        ("hi there", 9, None), ([1, 2, 3], 7, 3), ("x", 2, None)]
    assert reqs[3] is reqs[0]  # more prompts than lines: reused in order


@pytest.mark.timeout(60)
@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"), ('{"text": "a"}', "exactly one of"),
    ('{"prompt": "a", "prompt_token_ids": [1]}', "exactly one of"), ('{"prompt": ""}', "non-empty string"),
    ('{"prompt_token_ids": [1, -2]}', "list of ints >= 0"), ('{"prompt": "a", "max_tokens": 0}', "integer >= 1")])
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"line 2: .*{message}"):
        load_jsonl(str(path), 2, chat=False, default_max_tokens=4)
    path.write_text('{"prompt_token_ids": [1]}\n')
    with pytest.raises(ValueError, match="line 1: .*cannot go to /v1/chat/completions"):
        load_jsonl(str(path), 1, chat=True, default_max_tokens=4)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv, words", [
    (["--num-prompts", "0"], ["--num-prompts 0", "at least 1"]),
    (["--request-rate", "0"], ["--request-rate 0", "> 0"]),
    (["--request-rate", "fast"], ["--request-rate", "fast"]),
    (["--arrival", "fixed", "--burstiness", "2"], ["--burstiness 2", "Poisson"]),
    (["--max-concurrency", "0"], ["--max-concurrency 0"]),
    (["--random-range-ratio", "1.5"], ["--random-range-ratio 1.5", "[0, 1)"]),
    (["--goodput", "itl:5"], ["--goodput itl:5", "ttft, tpot, e2el"]),
    (["--goodput", "ttft:fast"], ["--goodput ttft:fast", "number"]),
    (["--percentile-metrics", "ttft,speed"], ["--percentile-metrics ttft,speed", "subset"]),
    (["--metric-percentiles", "101"], ["--metric-percentiles", "(0, 100]"]),
    (["--dataset-name", "jsonl"], ["--dataset-path None", "required"]),
    (["--dataset-name", "jsonl", "--dataset-path", "/no/such.jsonl"], ["/no/such.jsonl", "cannot read"]),
    (["--endpoint", "/v1/embeddings"], ["--endpoint", "/v1/embeddings"]),
    (["--base-url", "localhost:8000"], ["--base-url localhost:8000", "http://"]),
])
def test_bad_flags_exit_2_before_any_request(argv, words, capsys):
    # No server listens on port 9 (discard): reaching it would fail differently, not with exit 2.
    with pytest.raises(SystemExit) as exit_:
        bench_serve_main(["--base-url", "http://127.0.0.1:9", "--disable-tqdm", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and all(w in err for w in words), err


@pytest.mark.timeout(60)
def test_cli_table_json_and_save(fake, tmp_path, capsys):
    save = tmp_path / "result.json"
    args = ["--base-url", fake.url, "--num-prompts", "3", "--random-input-len", "4", "--random-output-len", "3",
            "--disable-tqdm", "--metric-percentiles", "50,99.9", "--request-rate", "20", "--arrival", "fixed"]
    assert bench_serve_main([*args, "--save-result", str(save)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("=" * 12 + " Serving Benchmark Result " + "=" * 12)
    for label in ("Successful requests:", "Request rate configured (RPS):", "P99.9 TTFT (ms):",
                  "Median E2EL (ms):", "Time per Output Token (excl. 1st token)"):
        assert label in out
    saved = json.loads(save.read_text())
    assert saved["meta"]["command"] == "bench serve" and saved["meta"]["server"]["base_url"] == fake.url
    saved = saved["rows"][0]
    assert saved["completed"] == 3 and "p50_ttft_ms" in saved and "p99.9_itl_ms" in saved
    assert saved["duration"] >= 0.1  # fixed arrivals at 20/s: the third goes at 0.1 s
    assert bench_serve_main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["request_rate"] == 20.0


@pytest.mark.timeout(60)
def test_unreachable_server_exits_1(capsys):
    args = ["--base-url", "http://127.0.0.1:9", "--num-prompts", "2", "--disable-tqdm"]
    assert bench_serve_main(args) == 1 and "masep bench serve:" in capsys.readouterr().err  # no model list
    assert bench_serve_main([*args, "--model", "m"]) == 1
    assert "request 0 failed: Client" in capsys.readouterr().err


def test_which_chunks_are_token_arrivals():
    from masep.serve.loadgen import _carries_output
    assert _carries_output({"choices": [{"index": 0, "text": "hi"}]}, 0)
    assert _carries_output({"choices": [{"index": 0, "text": ""}]}, 2)  # text held back: still a token
    assert not _carries_output({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, 0)
    assert not _carries_output({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}, 3)
    assert _carries_output({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}, 0)  # one-token answer
    assert not _carries_output({"choices": [], "usage": {"completion_tokens": 3}}, 3)


@pytest.mark.timeout(60)
def test_save_detailed_keeps_each_requests_token_ids(fake, tmp_path, capsys):
    fake.tokens_per_chunk = 2  # 5 tokens in chunks of 2, 2, 1: every chunk's ids are kept, in order
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt_token_ids": [10 * i, 1]}) + "\n" for i in range(1, 4))
                    + json.dumps({"prompt": "status=429"}) + "\n" + json.dumps({"prompt": "mode=error"}) + "\n")
    changes = dict(dataset_name="jsonl", dataset_path=str(path), num_prompts=5, random_output_len=5)
    r = run(fake, save_detailed=True, **changes)
    assert all(b["return_token_ids"] is True for b in fake.bodies)
    assert (r["completed"], r["failed"]) == (3, 2)
    assert r["generated_token_ids"] == [list(range(p, p + 5)) for p in (10, 20, 30)] + [[], []]  # failed: []
    fake.bodies.clear()
    r = run(fake, **changes)  # without the flag: nothing asked, nothing kept
    assert "generated_token_ids" not in r and not any("return_token_ids" in b for b in fake.bodies)
    # the chat delta's ids; the command line's --json and --save-result
    chat = run(fake, save_detailed=True, endpoint="/v1/chat/completions", model="m", num_prompts=2)
    assert chat["generated_token_ids"] == [list(range(1000, 1005))] * 2
    save = tmp_path / "result.json"
    args = ["--base-url", fake.url, "--dataset-name", "jsonl", "--dataset-path", str(path), "--num-prompts", "3",
            "--random-output-len", "4", "--disable-tqdm", "--json", "--save-result", str(save)]
    assert bench_serve_main([*args, "--save-detailed"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["generated_token_ids"] == [list(range(p, p + 4)) for p in (10, 20, 30)]
    assert json.loads(save.read_text())["rows"][0] == row
    assert bench_serve_main(args) == 0
    assert "generated_token_ids" not in json.loads(capsys.readouterr().out)["rows"][0]
