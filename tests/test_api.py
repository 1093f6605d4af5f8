"""The OpenAI-compatible API (masep/serve/api.py) over a fake engine.

The fake's output is deterministic ("abcde..." one letter per token, token id = byte + 3), so
every body, usage count and SSE chunk can be checked exactly. Most tests drive the ASGI app
in-process through httpx; the disconnect tests and the `openai` client test need a real socket,
so they run uvicorn in a background thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from masep.serve.api import build_app
from masep.serve.engine_client import (EngineDead, EngineOverloaded, EngineStats, GenerateRequest, RequestRejected,
                                       TokenDelta)

pytestmark = pytest.mark.timeout(60)
C, CHAT = "/v1/completions", "/v1/chat/completions"


class ByteTokenizer:
    """Token id = UTF-8 byte + 3; 1 = BOS, 2 = EOS. Its chat template starts with the text "<s>",
    so a prompt encoded with special tokens would show a BOS id 1 as well."""

    vocab_size = 259
    eos_token_ids = [2]

    def __init__(self, chat_template: str | None = "simple"):
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [b + 3 for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("no chat template")
        if messages[-1]["role"] == "tool":
            raise ValueError("tool messages need a tool call before them")
        turns = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return "<s>" + turns + ("assistant: " if add_generation_prompt else "")


class FakeEngine:
    """Yields letters a, b, c, ... one token per delta. A single-letter stop string ends the
    request with "stop" (its letter is left out of the text); `fail_at` ends it with "error"."""

    model_name = "fake-moe"
    max_model_len = 128

    def __init__(self, chat_template: str | None = "simple"):
        self.tokenizer = ByteTokenizer(chat_template)
        self.requests: dict[str, GenerateRequest] = {}
        self.running: set[str] = set()
        self.closed_early: list[str] = []  # streams closed before their last delta: aborted requests
        self.abort_calls: list[str] = []
        self.refuse: Exception | None = None  # raised by generate before any delta
        self.delay_s = 0.0
        self.fail_at: int | None = None
        self.healthy = True

    async def generate(self, request: GenerateRequest):
        if self.refuse is not None:
            raise self.refuse
        p, num_prompt = request.params, len(request.prompt_token_ids)
        if num_prompt + p.max_tokens > self.max_model_len:
            raise RequestRejected(f"max_tokens: {num_prompt} prompt + {p.max_tokens} tokens exceed 128", "max_tokens")
        self.requests[request.request_id] = request
        self.running.add(request.request_id)
        finished = False
        try:
            for i in range(p.max_tokens):
                await asyncio.sleep(self.delay_s)
                if i == self.fail_at:
                    finished = True
                    yield TokenDelta([], "", num_prompt, i, "error", "rank 3 died")
                    return
                letter = chr(ord("a") + i % 26)
                stop = letter in p.stop
                finish = "stop" if stop else "length" if i + 1 == p.max_tokens else None
                finished = finish is not None
                yield TokenDelta([ord(letter) + 3], "" if stop else letter, num_prompt, i + 1, finish)
                if stop:
                    return
        finally:
            self.running.discard(request.request_id)
            if not finished:
                self.closed_early.append(request.request_id)

    async def abort(self, request_id: str) -> None:
        self.abort_calls.append(request_id)  # closing the stream already stopped it (see generate)

    def is_healthy(self) -> bool:
        return self.healthy

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_waiting=0, kv_slots_total=8,
                           kv_slots_used=len(self.running))

    async def shutdown(self) -> None:
        pass


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


def sse_events(raw: str) -> list:
    """The payloads of an SSE body, checking its framing: `data: <payload>\\n\\n`, ending in [DONE]."""
    frames = raw.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]", raw[-80:]
    assert all(f.startswith("data: ") for f in frames[:-1]), raw
    return [json.loads(f[6:]) for f in frames[:-2]]


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def app(engine):
    return build_app(engine)


def test_completion_text_prompt(app, engine):
    r = call(app, "POST", "/v1/completions", json={
        "model": "fake-moe", "prompt": "hi", "max_tokens": 5, "temperature": 0, "top_k": -1, "top_p": 0.5,
        "seed": 7, "stop_token_ids": [9], "ignore_eos": True, "user": "x"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "fake-moe"
    assert body["choices"] == [{"index": 0, "text": "abcde", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    req = engine.requests[body["id"]]  # the response id is the engine's request id
    assert req.prompt_token_ids == [1, ord("h") + 3, ord("i") + 3]  # text gets BOS
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop_token_ids, p.ignore_eos) == \
        (5, 0.0, 0.5, 0, 7, [9], True)
    assert engine.abort_calls == [] and engine.closed_early == []


def test_completion_defaults_stop_and_token_prompt(app, engine):
    body = call(app, "POST", "/v1/completions", json={"prompt": [5, 6, 7], "stop": "c"}).json()
    assert body["choices"][0]["text"] == "ab" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    req = engine.requests[body["id"]]
    assert req.prompt_token_ids == [5, 6, 7] and req.params.max_tokens == 16 and req.params.temperature == 1.0


def test_completion_batch(app, engine):
    body = call(app, "POST", "/v1/completions", json={"prompt": ["a", "bcd"], "max_tokens": 2}).json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "ab"), (1, "ab")]
    assert body["usage"] == {"prompt_tokens": 2 + 4, "completion_tokens": 4, "total_tokens": 10}
    body = call(app, "POST", "/v1/completions", json={"prompt": [[3, 4], [5]], "max_tokens": 1}).json()
    assert len(body["choices"]) == 2 and body["usage"]["prompt_tokens"] == 3
    assert engine.requests[body["id"] + "-1"].prompt_token_ids == [5]  # one engine request per prompt


def test_completion_stream(app):
    r = call(app, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r.text)
    assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", "c"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] and "usage" not in c for c in chunks)

    chunks = sse_events(call(app, "POST", C, json={"prompt": "hi", "stop": ["b"], "stream": True}).text)
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [("a", None), ("", "stop")]

    r = call(app, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    chunks = sse_events(r.text)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_chat(app, engine):
    messages = [{"role": "system", "content": "be brief", "tool_calls": None},  # null extras are harmless
                {"role": "user", "content": [{"type": "text", "text": "yo"}]}]
    body = call(app, "POST", "/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 2}).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "ab"}, "logprobs": None,
                                "finish_reason": "length"}]
    prompt = "<s>system: be brief\nuser: yo\nassistant: "
    assert engine.requests[body["id"]].prompt_token_ids == [b + 3 for b in prompt.encode()]  # no second BOS
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 2, "total_tokens": len(prompt) + 2}
    # Without max_tokens a chat request may use the rest of the context, as OpenAI's does.
    body = call(app, "POST", "/v1/chat/completions", json={"messages": messages, "stop": ["e"]}).json()
    assert engine.requests[body["id"]].params.max_tokens == 128 - len(prompt)
    assert body["choices"][0]["message"]["content"] == "abcd"


def test_chat_stream(app):
    r = call(app, "POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True,
        "stream_options": {"include_usage": True}})
    chunks = sse_events(r.text)
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [{"role": "assistant", "content": ""},
                                                               {"content": "a"}, {"content": "b"}]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "length"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_chat_without_template_is_400():
    app = build_app(FakeEngine(chat_template=None))
    r = call(app, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages"


MSGS = [{"role": "user", "content": "hi"}]
BAD_BODIES = [  # (path, body, the param the 400 must name)
    (C, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (C, {"prompt": "x", "temperature": -0.5}, "temperature"),
    (C, {"prompt": "x", "top_p": 0}, "top_p"),
    (C, {"prompt": "x", "top_p": 1.5}, "top_p"),
    (C, {"prompt": "x", "top_k": -2}, "top_k"),
    (C, {"prompt": ""}, "prompt"),
    (C, {"prompt": []}, "prompt"),
    (C, {"prompt": [3, -1]}, "prompt"),
    (C, {"prompt": [3, 259]}, "prompt"),  # >= vocab_size
    (C, {"prompt": [True]}, "prompt"),
    (C, {"prompt": [{"a": 1}]}, "prompt"),
    (C, {"max_tokens": 3}, "prompt"),
    (C, {"prompt": ["a", "b"], "stream": True}, "prompt"),
    (C, {"prompt": "x", "stop": [""]}, "stop"),
    (C, {"prompt": "x", "stop": [str(i) for i in range(17)]}, "stop"),
    (C, {"prompt": "x", "stop_token_ids": [300]}, "stop_token_ids"),
    (C, {"prompt": "x", "n": 2}, "n"),
    (C, {"prompt": "x", "echo": True}, "echo"),
    (C, {"prompt": "x", "logprobs": 1}, "logprobs"),
    (C, {"prompt": "x", "best_of": 2}, "best_of"),
    (C, {"prompt": "x", "suffix": "!"}, "suffix"),
    (C, {"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    (C, {"prompt": "x", "bogus": 1}, "bogus"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (C, {"prompt": "x", "max_tokens": 200}, "max_tokens"),  # refused by the engine: too long
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
     "messages[0].content"),
    (CHAT, {"messages": [{"role": "tool", "content": "1"}]}, "messages"),  # the template refuses
    (CHAT, {"messages": MSGS, "logprobs": True}, "logprobs"),
    (CHAT, {"messages": MSGS, "tools": [{"type": "function"}]}, "tools"),
    (CHAT, {"messages": MSGS, "max_completion_tokens": 0}, "max_completion_tokens"),
]


@pytest.mark.parametrize("path,body,param", BAD_BODIES, ids=[f"{p[4:]}-{q}" for p, _, q in BAD_BODIES])
def test_bad_body_is_400_naming_the_field(app, path, body, param):
    r = call(app, "POST", path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] is None
    assert param.split("[")[0] in err["message"], err


def test_malformed_json_unknown_model_and_recovery(app):
    r = call(app, "POST", C, content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = call(app, "POST", C, json={"prompt": "x", "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert call(app, "GET", "/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert call(app, "POST", C, json={"prompt": "x", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("exc,status", [(EngineOverloaded("queue full"), 429), (EngineDead("rank 2 gone"), 503),
                                        (RequestRejected("prompt too long", "prompt"), 400)])
@pytest.mark.parametrize("stream", [False, True])
def test_engine_refusals(app, engine, exc, status, stream):
    engine.refuse = exc
    r = call(app, "POST", C, json={"prompt": "x", "stream": stream})
    assert r.status_code == status and str(exc) in r.json()["error"]["message"]
    engine.refuse = None
    assert call(app, "POST", C, json={"prompt": "x", "stream": stream}).status_code == 200


def test_engine_error_mid_request(app, engine):
    engine.fail_at = 2
    r = call(app, "POST", C, json={"prompt": "x", "max_tokens": 5})
    assert r.status_code == 500 and "rank 3 died" in r.json()["error"]["message"]
    events = sse_events(call(app, "POST", C, json={"prompt": "x", "max_tokens": 5, "stream": True}).text)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["a", "b"]
    assert "rank 3 died" in events[-1]["error"]["message"]


def test_health_models_and_metrics(app, engine):
    assert call(app, "GET", "/health").status_code == 200
    engine.healthy = False
    assert call(app, "GET", "/health").status_code == 503
    models = call(app, "GET", "/v1/models").json()
    assert models["data"][0]["id"] == "fake-moe" and models["data"][0]["max_model_len"] == 128
    call(app, "POST", C, json={"prompt": "hi", "max_tokens": 4})
    call(app, "POST", C, json={"prompt": "hi", "max_tokens": 2, "stream": True})
    call(app, "POST", C, json={"prompt": "hi", "stop": "a"})
    call(app, "POST", C, json={"prompt": "hi", "top_p": 7})  # a 400 is not a request
    engine.running.update({"r1", "r2"})  # the gauges read engine.stats() when scraped
    text = call(app, "GET", "/metrics").text
    sample = lambda line: float(next(l for l in text.splitlines() if l.startswith(line)).split()[-1])  # noqa: E731
    m = '{model_name="fake-moe"}'
    assert sample(f"vllm:num_requests_running{m}") == 2 and sample(f"vllm:kv_cache_usage_perc{m}") == 2 / 8
    assert sample(f"vllm:num_requests_waiting{m}") == 0
    assert sample('vllm:request_success_total{finished_reason="length",model_name="fake-moe"}') == 2
    assert sample('vllm:request_success_total{finished_reason="stop",model_name="fake-moe"}') == 1
    assert sample(f"vllm:prompt_tokens_total{m}") == 9 and sample(f"vllm:generation_tokens_total{m}") == 7
    assert sample(f"vllm:time_to_first_token_seconds_count{m}") == 3
    assert sample(f"vllm:inter_token_latency_seconds_count{m}") == 3 + 1  # 7 tokens - 3 first tokens
    assert sample(f"vllm:time_per_output_token_seconds_count{m}") == 4
    assert sample(f"vllm:e2e_request_latency_seconds_count{m}") == 3
    assert sample(f"vllm:request_prompt_tokens_sum{m}") == 9 and sample(f"vllm:request_generation_tokens_sum{m}") == 7
    assert 0 < sample(f"vllm:e2e_request_latency_seconds_sum{m}") < 10


@contextlib.contextmanager
def uvicorn_server(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_openai_client(app):
    with uvicorn_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        out = client.completions.create(model="fake-moe", prompt="hello", max_tokens=4)
        assert out.choices[0].text == "abcd" and out.usage.total_tokens == 6 + 4
        chunks = list(client.completions.create(model="fake-moe", prompt="hello", max_tokens=3, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == "abc"
        assert chunks[-1].usage.completion_tokens == 3
        chat = client.chat.completions.create(model="fake-moe", messages=MSGS, max_tokens=2, top_p=0.9)
        assert chat.choices[0].message.content == "ab" and chat.choices[0].finish_reason == "length"
        stream = client.chat.completions.create(model="fake-moe", messages=MSGS, max_tokens=3, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "abc"
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="fake-moe", prompt="x", temperature=-1)
        assert err.value.body["param"] == "temperature"
        assert [m.id for m in client.models.list()] == ["fake-moe"]


def test_client_disconnect_aborts(app, engine):
    engine.delay_s = 0.05
    with uvicorn_server(app) as url, httpx.Client(base_url=url) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 100, "stream": True}) as r:
            lines = r.iter_lines()
            first = json.loads(next(line for line in lines if line)[6:])
        # Leaving the `with` closes the connection after two tokens of a hundred.
        assert wait_for(lambda: first["id"] in engine.closed_early), engine.closed_early
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            client.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 100}, timeout=0.3)
        assert wait_for(lambda: len(engine.closed_early) == 2 and not engine.running), engine.closed_early
        assert engine.closed_early[1].startswith("chatcmpl-")
        engine.delay_s = 2.0  # a streaming client that leaves before the first token (headers wait for it)
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json={"prompt": "x", "stream": True}, timeout=0.3)
        assert wait_for(lambda: len(engine.closed_early) == 3 and not engine.running), engine.closed_early
    assert engine.abort_calls == engine.closed_early  # and each was aborted by id as well
