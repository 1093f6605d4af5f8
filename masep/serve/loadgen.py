"""`masep bench serve`: load any OpenAI-compatible endpoint (masep, vLLM, SGLang) and report the
metrics of `vllm bench serve`, with its names and definitions.

Every request streams (stream=true, stream_options.include_usage). Times are time.perf_counter
on this machine from the moment a request is sent, so they include HTTP and the network:
  TTFT  the first SSE chunk that carries text or token ids. A chat stream's opening role-only
        chunk and the closing finish/usage chunks carry neither, so they are not timed.
  ITL   the gaps between later such chunks, pooled over requests. A chunk may hold several
        tokens (servers batch their flushes), so ITL is per chunk, as in vLLM.
  E2EL  the last such chunk (as vLLM; [DONE] and the usage chunk come after it).
  TPOT  (E2EL - TTFT) / (output tokens - 1); output tokens are the final usage chunk's
        completion_tokens, or the number of timed chunks when the server sends no usage.
The per-request definitions are masep.metrics.RequestOutput's; the aggregates are vLLM's
(mean, median, population std, numpy linear percentiles; an empty list reports 0).
A request fails on a non-200 answer, an error object in the stream, a stream that ends
without `data: [DONE]` or without any output chunk, or --request-timeout.
--save-detailed (vLLM's flag) also asks for the output token ids (`return_token_ids`, a vLLM
extension masep serves) and keeps them per request in the result's `generated_token_ids`.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from tqdm import tqdm

from masep.logs import add_log_arg, progress, setup_logging
from masep.metrics import RequestOutput, compute_metrics
from masep.options import HelpFormatter, add_config_arg, parse_args

log = logging.getLogger("masep.bench")

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_KEYS = ("ttft", "tpot", "e2el")  # ITL has no per-request value, so vLLM has no SLO for it
METRIC_TITLES = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
                 "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}
# Common English words, one token each in the usual BPE vocabularies: a random chat prompt of
# N words is about N tokens without a tokenizer.
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one "
         "had by word but not what all were we when your can said there use an each which she do how their "
         "if will up other about out many then them these so some her would make like him into time has look "
         "two more write go see number no way could people my than first water been call who its now find "
         "long down day did get come made may part").split()


@dataclass
class BenchServeConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first id of GET /v1/models
    num_prompts: int = 1000
    request_rate: float = math.inf  # requests/s; inf sends all at once
    burstiness: float = 1.0  # gamma shape of the gaps (poisson only): 1 = Poisson, < 1 burstier
    arrival: str = "poisson"  # "poisson" | "fixed" (every 1/rate s)
    max_concurrency: int | None = None  # requests in flight at most; None: unbounded
    dataset_name: str = "random"  # "random" | "jsonl"
    dataset_path: str | None = None
    random_input_len: int = 1024
    random_output_len: int = 128  # also max_tokens for JSONL lines that give none
    random_range_ratio: float = 0.0  # lengths uniform in [len * (1 - r), len * (1 + r)]
    random_vocab_size: int = 32000  # token ids drawn from [0, this); the smallest common vocab
    seed: int = 0
    ignore_eos: bool = False
    temperature: float = 0.0
    goodput: dict[str, float] = field(default_factory=dict)  # SLOs in ms: {"ttft": 500, ...}
    percentile_metrics: list[str] = field(default_factory=lambda: list(METRICS))
    metric_percentiles: list[float] = field(default_factory=lambda: [99.0])
    request_timeout: float = 3600.0  # seconds per request
    max_duration: float | None = None  # seconds: stop sending and cancel what still runs
    disable_tqdm: bool = False
    save_detailed: bool = False  # send return_token_ids; the result gets generated_token_ids per request

    @property
    def chat(self) -> bool:
        return self.endpoint.endswith("/chat/completions")


def check_config(cfg: BenchServeConfig) -> None:
    """Raise ValueError naming the flag, its value and the rule, for the first bad setting."""
    c = cfg
    rules = [
        ("--base-url", c.base_url, c.base_url.startswith(("http://", "https://")),
         "must start with http:// or https://"),
        ("--endpoint", c.endpoint, c.endpoint in ENDPOINTS, f"must be one of {', '.join(ENDPOINTS)}"),
        ("--num-prompts", c.num_prompts, c.num_prompts >= 1, "must be at least 1"),
        ("--request-rate", c.request_rate, c.request_rate > 0, "must be > 0 requests/s (inf: all at once)"),
        ("--burstiness", c.burstiness, 0 < c.burstiness < math.inf, "must be a finite number > 0"),
        ("--arrival", c.arrival, c.arrival in ("poisson", "fixed"), "must be poisson or fixed"),
        ("--burstiness", c.burstiness, c.arrival == "poisson" or c.burstiness == 1,
         "shapes Poisson gaps only; --arrival fixed sends exactly every 1/rate s"),
        ("--max-concurrency", c.max_concurrency, c.max_concurrency is None or c.max_concurrency >= 1,
         "must be at least 1"),
        ("--dataset-name", c.dataset_name, c.dataset_name in ("random", "jsonl"), "must be random or jsonl"),
        ("--dataset-path", c.dataset_path, (c.dataset_path is not None) == (c.dataset_name == "jsonl"),
         "is required with --dataset-name jsonl and read only then"),
        ("--random-input-len", c.random_input_len, c.random_input_len >= 1, "must be at least 1"),
        ("--random-output-len", c.random_output_len, c.random_output_len >= 1, "must be at least 1"),
        ("--random-range-ratio", c.random_range_ratio, 0 <= c.random_range_ratio < 1, "must be in [0, 1)"),
        ("--random-vocab-size", c.random_vocab_size, c.random_vocab_size >= 1, "must be at least 1"),
        ("--temperature", c.temperature, c.temperature >= 0, "must be >= 0"),
        ("--request-timeout", c.request_timeout, c.request_timeout > 0, "must be > 0 seconds"),
        ("--max-duration", c.max_duration, c.max_duration is None or c.max_duration > 0, "must be > 0 seconds"),
        ("--goodput", " ".join(f"{k}:{v:g}" for k, v in c.goodput.items()),
         all(k in GOODPUT_KEYS and v > 0 for k, v in c.goodput.items()),
         f"keys must be in {', '.join(GOODPUT_KEYS)} and values > 0 ms"),
        ("--percentile-metrics", ",".join(c.percentile_metrics),
         bool(c.percentile_metrics) and set(c.percentile_metrics) <= set(METRICS),
         f"must be a subset of {','.join(METRICS)}"),
        ("--metric-percentiles", c.metric_percentiles,
         bool(c.metric_percentiles) and all(0 < p <= 100 for p in c.metric_percentiles), "each must be in (0, 100]"),
    ]
    for flag, value, ok, rule in rules:
        if not ok:
            raise ValueError(f"{flag} {value}: {rule}")


# --- arrival schedule --------------------------------------------------------------------------
def arrival_times(num_requests: int, request_rate: float, burstiness: float = 1.0,
                  arrival: str = "poisson", seed: int = 0) -> list[float]:
    """Send times in seconds from the start; the first request goes at 0.

    poisson: gaps drawn from a gamma distribution of shape `burstiness` and mean 1/rate (as
    vLLM), so burstiness 1 gives exponential gaps (a Poisson process); the gaps' coefficient of
    variation is 1/sqrt(burstiness): < 1 burstier, > 1 more even. fixed: every gap is 1/rate.
    An infinite rate sends everything at 0.
    """
    num_gaps = max(num_requests - 1, 0)
    if math.isinf(request_rate):
        gaps = np.zeros(num_gaps)
    elif arrival == "fixed":
        gaps = np.full(num_gaps, 1.0 / request_rate)
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_gaps)
    return np.concatenate([[0.0], np.cumsum(gaps)])[:num_requests].tolist()


# --- datasets ----------------------------------------------------------------------------------
@dataclass
class Request:
    prompt: str | list[int]  # token ids go to /v1/completions as `prompt: [ids]`
    max_tokens: int
    prompt_len: int | None  # exact for token ids; None: the server's usage.prompt_tokens


def _lengths(rng: np.random.Generator, mean: int, ratio: float, n: int) -> np.ndarray:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.integers(lo, hi + 1, size=n)


def random_requests(cfg: BenchServeConfig) -> list[Request]:
    """Token-id prompts of exact lengths; for the chat endpoint (text only) random words instead."""
    rng = np.random.default_rng(cfg.seed)
    in_lens = _lengths(rng, cfg.random_input_len, cfg.random_range_ratio, cfg.num_prompts)
    out_lens = _lengths(rng, cfg.random_output_len, cfg.random_range_ratio, cfg.num_prompts)
    if cfg.chat:
        return [Request(" ".join(rng.choice(WORDS, size=n)), int(m), None) for n, m in zip(in_lens, out_lens)]
    return [Request(rng.integers(0, cfg.random_vocab_size, size=n).tolist(), int(m), int(n))
            for n, m in zip(in_lens, out_lens)]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_jsonl_line(where: str, line: str, chat: bool, default_max_tokens: int) -> Request:
    """One line {"prompt": str} or {"prompt_token_ids": [int]}, optional "max_tokens"/"output_len"."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(row).__name__}")
    max_tokens = row.get("max_tokens", row.get("output_len", default_max_tokens))
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f"{where}: max_tokens/output_len {max_tokens!r} must be an integer >= 1")
    if ("prompt" in row) == ("prompt_token_ids" in row):
        raise ValueError(f'{where}: needs exactly one of "prompt" (a string) and "prompt_token_ids" (a list of ints)')
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise ValueError(f'{where}: "prompt" {row["prompt"]!r:.60} must be a non-empty string')
        return Request(row["prompt"], max_tokens, None)
    ids = row["prompt_token_ids"]
    if not isinstance(ids, list) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
        raise ValueError(f'{where}: "prompt_token_ids" {ids!r:.60} must be a non-empty list of ints >= 0')
    if chat:
        raise ValueError(f'{where}: "prompt_token_ids" cannot go to /v1/chat/completions (messages are text)')
    return Request(ids, max_tokens, len(ids))


def load_jsonl(path: str, num_prompts: int, chat: bool, default_max_tokens: int) -> list[Request]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"--dataset-path {path}: cannot read it ({e.strerror})") from None
    reqs = [parse_jsonl_line(f"--dataset-path {path}, line {n}", line, chat, default_max_tokens)
            for n, line in enumerate(lines, 1) if line.strip()]
    if not reqs:
        raise ValueError(f"--dataset-path {path}: holds no prompts")
    # Fewer lines than --num-prompts: reuse them in order, as vLLM oversamples a short dataset.
    return [reqs[i % len(reqs)] for i in range(num_prompts)]


def build_requests(cfg: BenchServeConfig) -> list[Request]:
    if cfg.dataset_name == "jsonl":
        return load_jsonl(cfg.dataset_path, cfg.num_prompts, cfg.chat, cfg.random_output_len)
    return random_requests(cfg)


# --- one request -------------------------------------------------------------------------------
def request_body(cfg: BenchServeConfig, model: str, req: Request) -> dict:
    # max_tokens rather than chat's newer max_completion_tokens: vLLM, SGLang and masep take both.
    body = dict(model=model, max_tokens=req.max_tokens, temperature=cfg.temperature, stream=True,
                stream_options={"include_usage": True})
    if cfg.chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # not OpenAI's; vLLM, SGLang and masep honour it
    if cfg.save_detailed:
        body["return_token_ids"] = True  # vLLM's extension; masep honours it
    return body


def _json_object(text: str) -> dict | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def error_text(body: str | dict) -> str:
    """The message of an error body: OpenAI's {"error": {"message"}}, vLLM's {"message"},
    FastAPI's {"detail"}, or the raw text."""
    data = _json_object(body) if isinstance(body, str) else body
    if data is None:
        return body.strip()[:300] or "(empty body)"
    err = data.get("error", data)
    if isinstance(err, str):
        return err
    if isinstance(err, dict) and ("message" in err or "detail" in err):
        return str(err.get("message", err.get("detail")))
    return json.dumps(data)[:300]


def _carries_output(data: dict, counted: int) -> bool:
    """Whether a chunk is a token arrival. A step's text may be empty while its tokens wait for
    the rest of a UTF-8 character, so a chunk counts even without text (as in vLLM's bench);
    only the chat opening chunk (role, no content) and a closing chunk with nothing but the
    finish reason do not (the latter counts if it is the only one: a one-token answer)."""
    choices = data.get("choices")
    if not choices:
        return False
    choice = choices[0]
    delta = choice.get("delta") or {}
    text = choice.get("text") or delta.get("content") or delta.get("reasoning_content") or choice.get("token_ids")
    if text:
        return True
    if "role" in delta:
        return False
    return not (choice.get("finish_reason") and counted)


async def _lines(content: aiohttp.StreamReader):
    # Split ourselves: aiohttp's line iterator refuses lines over its buffer size.
    buf = b""
    async for piece in content.iter_any():
        *lines, buf = (buf + piece).split(b"\n")
        for line in lines:
            yield line.decode(errors="replace").strip()
    if buf.strip():
        yield buf.decode(errors="replace").strip()


def _chunk_token_ids(data: dict) -> list[int]:
    """The output token ids a chunk carries (return_token_ids): in the choice (completions, vLLM's
    chat) or in the chat delta (masep's chat)."""
    choices = data.get("choices") or [{}]
    choice = choices[0]
    return choice.get("token_ids") or (choice.get("delta") or {}).get("token_ids") or []


async def read_stream(content: aiohttp.StreamReader, start: float,
                      token_ids: list[int] | None = None) -> tuple[list[float], dict | None, str | None]:
    """Read an SSE stream: (seconds from `start` of each chunk that carries output, the last usage, error).
    A `token_ids` list gets the output token ids of the chunks appended."""
    times, usage = [], None
    async for line in _lines(content):
        now = time.perf_counter()
        if not line.startswith("data:"):
            continue  # blank event separators, ": keep-alive" comments, "event:" fields
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            return times, usage, None if times else "the stream ended without any text or token chunk"
        data = _json_object(payload)
        if data is None:
            return times, usage, f"the stream sent {payload[:80]!r}, not a JSON object"
        if data.get("error") or data.get("object") == "error":
            return times, usage, f"error in the stream: {error_text(data)}"
        if _carries_output(data, len(times)):
            times.append(now - start)
        if token_ids is not None:
            token_ids += _chunk_token_ids(data)
        usage = data.get("usage") or usage
    return times, usage, "the stream ended without data: [DONE]"


def _request_output(times: list[float], usage: dict | None, error: str | None, prompt_len: int | None):
    usage = usage or {}
    num_in = prompt_len if prompt_len is not None else int(usage.get("prompt_tokens") or 0)
    if error:
        return RequestOutput(num_in, error=error)
    num_out = int(usage.get("completion_tokens") or len(times))
    # RequestOutput counts tokens as len(tokens); the stream gives text, so hold placeholders.
    return RequestOutput(num_in, tokens=[-1] * num_out, token_times_s=times)


async def send_request(session: aiohttp.ClientSession, url: str, body: dict, prompt_len: int | None,
                       timeout_s: float, token_ids: list[int] | None = None) -> RequestOutput:
    """POST one streaming request; a failure comes back as RequestOutput.error, never raised.
    A `token_ids` list gets the output token ids the stream carried (read_stream)."""
    start = time.perf_counter()
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return RequestOutput(prompt_len or 0, error=f"HTTP {resp.status}: {error_text(await resp.text())}")
            times, usage, error = await read_stream(resp.content, start, token_ids)
    except TimeoutError:
        return RequestOutput(prompt_len or 0, error=f"no complete answer within --request-timeout {timeout_s:g} s")
    except aiohttp.ClientError as e:
        return RequestOutput(prompt_len or 0, error=f"{type(e).__name__}: {e}")
    return _request_output(times, usage, error, prompt_len)


async def first_model(session: aiohttp.ClientSession, base_url: str) -> str:
    url = base_url.rstrip("/") + "/v1/models"
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
        body = await resp.text()
    data = _json_object(body) or {}
    if resp.status != 200 or not data.get("data"):
        raise RuntimeError(f"GET {url} answered HTTP {resp.status} {body[:200]!r}, not a model list; pass --model")
    return data["data"][0]["id"]


# --- the run -----------------------------------------------------------------------------------
async def _dispatch(cfg: BenchServeConfig, session, url: str, bodies: list[dict], requests: list[Request],
                    bar: tqdm, token_ids: list[list[int]] | None = None) -> tuple[list[RequestOutput], float]:
    """Send on the arrival schedule until done or --max-duration; (outputs of the requests sent, duration).
    `token_ids` (one list per request) gets each request's output token ids."""
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    tasks: list[asyncio.Task] = []

    async def one(i: int) -> RequestOutput:
        try:
            return await send_request(session, url, bodies[i], requests[i].prompt_len, cfg.request_timeout,
                                      None if token_ids is None else token_ids[i])
        finally:
            if slots:
                slots.release()
            bar.update()

    async def send_all(start: float) -> None:
        times = arrival_times(len(requests), cfg.request_rate, cfg.burstiness, cfg.arrival, cfg.seed)
        for i, t in enumerate(times):
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            if slots:  # taken here, not in the task: a request waiting for a slot is not sent yet
                await slots.acquire()
            tasks.append(asyncio.create_task(one(i)))

    start = time.perf_counter()
    sender = asyncio.create_task(send_all(start))
    await asyncio.wait([sender], timeout=cfg.max_duration)
    if sender.done() and not sender.cancelled() and sender.exception():
        raise sender.exception()
    sender.cancel()
    left = None if cfg.max_duration is None else max(0.0, start + cfg.max_duration - time.perf_counter())
    if tasks:
        await asyncio.wait(tasks, timeout=left)
    for task in tasks:
        task.cancel()  # a no-op for the finished ones
    await asyncio.gather(sender, *tasks, return_exceptions=True)
    duration = time.perf_counter() - start
    cancelled = f"cancelled: still running when --max-duration {cfg.max_duration} s ran out"
    return [RequestOutput(requests[i].prompt_len or 0, error=cancelled) if t.cancelled() else t.result()
            for i, t in enumerate(tasks)], duration


async def run_benchmark(cfg: BenchServeConfig, requests: list[Request] | None = None) -> dict:
    """Run the benchmark; returns the result document. `requests` default to build_requests(cfg)."""
    check_config(cfg)
    requests = build_requests(cfg) if requests is None else requests
    url = cfg.base_url.rstrip("/") + cfg.endpoint
    # limit=0: no connection pool cap, so --max-concurrency alone bounds what is in flight.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        model = cfg.model or await first_model(session, cfg.base_url)
        bodies = [request_body(cfg, model, r) for r in requests]
        token_ids = [[] for _ in requests] if cfg.save_detailed else None
        before = await engine_step_counters(session, cfg.base_url)
        with progress(len(requests), "requests", "req", enabled=not cfg.disable_tqdm, delay=0) as bar:
            outputs, duration = await _dispatch(cfg, session, url, bodies, requests, bar, token_ids)
        after = await engine_step_counters(session, cfg.base_url)
    result = summarize(cfg, model, outputs, duration, num_unsent=len(requests) - len(outputs),
                       token_ids=None if token_ids is None else token_ids[:len(outputs)])
    if before is not None and after is not None:
        result["server"] = server_step_stats(before, after)
    return result


async def engine_step_counters(session: aiohttp.ClientSession, base_url: str) -> dict | None:
    """masep's `masep:engine_step*` counters from GET /metrics, as {(name, kind): value}; None
    when the server does not export them (another engine) or /metrics does not answer."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        async with session.get(base_url.rstrip("/") + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("masep:engine_step") and sample.name.endswith("_total"):
                values[(sample.name, sample.labels.get("kind", ""))] = sample.value
    return values or None


def server_step_stats(before: dict, after: dict) -> dict:
    """What the server's engine did during the run: steps, mean decode batch and mean step
    time per kind (host time around each step, so a decode step includes its host overhead)."""
    diff = lambda name, kind: after.get((name, kind), 0.0) - before.get((name, kind), 0.0)  # noqa: E731
    out = {}
    for kind in ("decode", "prefill"):
        steps = diff("masep:engine_steps_total", kind)
        out[f"{kind}_steps"] = int(steps)
        out[f"mean_{kind}_rows"] = diff("masep:engine_step_rows_total", kind) / steps if steps else 0.0
        out[f"mean_{kind}_step_ms"] = 1e3 * diff("masep:engine_step_seconds_total", kind) / steps if steps else 0.0
    out["prefill_tokens"] = int(diff("masep:engine_step_tokens_total", "prefill"))
    return out


# --- the result --------------------------------------------------------------------------------
def _pword(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def _metric_values_s(name: str, done: list[RequestOutput]) -> list[float]:
    if name == "ttft":
        return [o.ttft_s for o in done]
    if name == "tpot":
        return [o.tpot_s for o in done if o.tpot_s is not None]
    if name == "itl":
        return [gap for o in done for gap in o.itl_s]
    return [o.e2e_s for o in done]


def metric_stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=np.float64) * 1e3 if len(values_s) else np.zeros(1)
    stats = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
             f"std_{name}_ms": float(ms.std())}
    return stats | {f"p{_pword(p)}_{name}_ms": float(np.percentile(ms, p)) for p in percentiles}


def meets_slo(o: RequestOutput, slo_ms: dict[str, float]) -> bool:
    # A one-token request has no TPOT; vLLM counts it as 0, so it meets any TPOT SLO.
    value_s = {"ttft": o.ttft_s, "tpot": o.tpot_s or 0.0, "e2el": o.e2e_s}
    return all(value_s[k] * 1e3 <= limit for k, limit in slo_ms.items())


def _jsonable(x):
    return "inf" if isinstance(x, float) and math.isinf(x) else x  # as vLLM: strict JSON has no inf


def summarize(cfg: BenchServeConfig, model: str, outputs: list[RequestOutput], duration: float,
              num_unsent: int = 0, token_ids: list[list[int]] | None = None) -> dict:
    """vLLM's result; `token_ids` (--save-detailed: one list per output) adds generated_token_ids,
    [] for a failed request."""
    base = compute_metrics(outputs, duration).to_dict()
    done = [o for o in outputs if o.ok]
    result = {k: base[k] for k in ("completed", "failed", "total_input_tokens", "total_output_tokens",
                                   "request_throughput")}
    result = {"duration": duration, **result, "unsent": num_unsent}
    if cfg.goodput:
        result["request_goodput"] = sum(meets_slo(o, cfg.goodput) for o in done) / duration if duration > 0 else 0.0
    result |= {k: base[k] for k in ("output_throughput", "total_token_throughput")}
    result |= dict(max_concurrency=cfg.max_concurrency, request_rate=_jsonable(cfg.request_rate),
                   burstiness=cfg.burstiness)
    for name in cfg.percentile_metrics:
        result |= metric_stats(name, _metric_values_s(name, done), cfg.metric_percentiles)
    result |= dict(input_lens=[o.prompt_len for o in outputs], output_lens=[len(o.tokens) for o in outputs],
                   ttfts=[o.ttft_s or 0.0 for o in outputs], itls=[o.itl_s for o in outputs],
                   errors=[o.error or "" for o in outputs])
    if token_ids is not None:
        result["generated_token_ids"] = [list(ids) if o.ok else [] for o, ids in zip(outputs, token_ids)]
    args = {k: _jsonable(v) for k, v in dataclasses.asdict(cfg).items()}
    result["meta"] = dict(date=datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), base_url=cfg.base_url,
                          endpoint=cfg.endpoint, model=model, args=args)
    return result


def format_table(result: dict) -> str:
    """The result in `vllm bench serve`'s layout."""
    args = result["meta"]["args"]
    row = lambda label, v: f"{label:<40} {v:<10.2f}" if isinstance(v, float) else f"{label:<40} {v:<10}"  # noqa: E731
    lines = ["{:=^50}".format(" Serving Benchmark Result "), row("Successful requests:", result["completed"]),
             row("Failed requests:", result["failed"])]
    if result["unsent"]:
        lines.append(row("Requests not sent (--max-duration):", result["unsent"]))
    if result["max_concurrency"] is not None:
        lines.append(row("Maximum request concurrency:", result["max_concurrency"]))
    if result["request_rate"] != "inf":
        lines.append(row("Request rate configured (RPS):", float(result["request_rate"])))
    lines += [row("Benchmark duration (s):", result["duration"]),
              row("Total input tokens:", result["total_input_tokens"]),
              row("Total generated tokens:", result["total_output_tokens"]),
              row("Request throughput (req/s):", result["request_throughput"])]
    if "request_goodput" in result:
        lines.append(row("Request goodput (req/s):", result["request_goodput"]))
    lines += [row("Output token throughput (tok/s):", result["output_throughput"]),
              row("Total Token throughput (tok/s):", result["total_token_throughput"])]
    if "server" in result:
        srv = result["server"]
        lines += ["{:-^50}".format("Server engine steps (masep /metrics)"),
                  row("Decode steps:", srv["decode_steps"]), row("Mean decode batch (requests):", srv["mean_decode_rows"]),
                  row("Mean decode step (ms):", srv["mean_decode_step_ms"]), row("Prefill steps:", srv["prefill_steps"]),
                  row("Mean prefill step (ms):", srv["mean_prefill_step_ms"])]
    for name in args["percentile_metrics"]:
        short, title = METRIC_TITLES[name]
        lines += ["{:-^50}".format(title), row(f"Mean {short} (ms):", result[f"mean_{name}_ms"]),
                  row(f"Median {short} (ms):", result[f"median_{name}_ms"])]
        lines += [row(f"P{_pword(p)} {short} (ms):", result[f"p{_pword(p)}_{name}_ms"])
                  for p in args["metric_percentiles"]]
    return "\n".join(lines + ["=" * 50])


def result_document(args: argparse.Namespace | None, result: dict) -> dict:
    """--json and --save-result: the result as masep's one document shape (masep/report.py); the
    row is vLLM's result (its names, with the per-request lists), meta says what was loaded."""
    from masep.report import document
    meta = result["meta"]
    row = {k: v for k, v in result.items() if k != "meta"}
    return document("bench serve", [row], args, model=meta["model"],
                    server=dict(base_url=meta["base_url"], endpoint=meta["endpoint"]))


def print_errors(result: dict, file=None, limit: int = 5) -> None:
    file = file or sys.stderr
    failed = [(i, e) for i, e in enumerate(result["errors"]) if e]
    for i, e in failed[:limit]:
        print(f"request {i} failed: {e}", file=file)
    if len(failed) > limit:
        print(f"... and {len(failed) - limit} more failed requests (all in the result's errors)", file=file)


# --- the command line --------------------------------------------------------------------------
def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    d = BenchServeConfig()
    a = p.add_argument
    a("--base-url", default=d.base_url, help="server root; requests go to BASE_URL + ENDPOINT")
    a("--endpoint", default=d.endpoint, choices=ENDPOINTS)
    a("--model", default=None, help="model name to send (default: the first id of GET /v1/models)")
    a("--num-prompts", type=int, default=d.num_prompts)
    a("--request-rate", type=float, default=d.request_rate, help="requests/s; inf sends all at once")
    a("--arrival", choices=("poisson", "fixed"), default=d.arrival,
      help="poisson: random gaps of mean 1/rate (see --burstiness); fixed: exactly every 1/rate s")
    a("--burstiness", type=float, default=d.burstiness,
      help="gamma shape of the Poisson gaps (mean stays 1/rate): 1 = Poisson process, <1 burstier, >1 more even")
    a("--max-concurrency", type=int, default=None, help="requests in flight at most (default: unbounded)")
    a("--dataset-name", choices=("random", "jsonl"), default=d.dataset_name)
    a("--dataset-path", default=None, help='JSONL lines {"prompt": str} or {"prompt_token_ids": [int]}, '
      'optional "max_tokens"/"output_len" (default --random-output-len); reused in order if too few')
    a("--random-input-len", type=int, default=d.random_input_len,
      help="prompt tokens; sent as token ids to /v1/completions (exact), as random words to chat (~1 token each)")
    a("--random-output-len", type=int, default=d.random_output_len, help="max_tokens per request")
    a("--random-range-ratio", type=float, default=d.random_range_ratio,
      help="lengths uniform in [len*(1-r), len*(1+r)]")
    a("--random-vocab-size", type=int, default=d.random_vocab_size, help="token ids drawn from [0, this)")
    a("--seed", type=int, default=d.seed, help="random prompts and arrival times")
    a("--ignore-eos", action="store_true", help="send ignore_eos: generate max_tokens every time")
    a("--temperature", type=float, default=d.temperature, help="sent with every request (0: greedy)")
    a("--goodput", nargs="+", default=[], metavar="KEY:VALUE",
      help="SLOs in ms, keys ttft, tpot, e2el; request_goodput counts the requests meeting all of them")
    a("--percentile-metrics", default=",".join(METRICS), help="comma-separated subset of ttft,tpot,itl,e2el")
    a("--metric-percentiles", default="99", help="comma-separated percentiles, e.g. 50,90,99")
    a("--request-timeout", type=float, default=d.request_timeout, help="seconds per request")
    a("--max-duration", type=float, default=None, help="seconds: stop sending then and cancel what still runs")
    a("--json", action="store_true", help="print the result as one JSON document ({meta, rows}) instead of the table")
    a("--save-result", metavar="FILE", default=None, help="write the result document (JSON, as --json prints it) to FILE")
    a("--save-detailed", action="store_true",
      help="ask for the output token ids (return_token_ids) and keep them per request in the result "
           "(generated_token_ids, in request order; [] for a failed request)")
    a("--disable-tqdm", action="store_true", help="no progress bar")


def _parse_goodput(items: list[str]) -> dict[str, float]:
    slo = {}
    for item in items:
        key, _, value = item.partition(":")
        try:
            slo[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item}: must be KEY:VALUE with VALUE a number of ms") from None
    return slo


def _parse_percentiles(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"--metric-percentiles {text}: must be comma-separated numbers, e.g. 50,99") from None


def config_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[BenchServeConfig, list[Request]]:
    """The checked config and its requests; a bad value ends in p.error (exit 2) before any request."""
    parsed = {"goodput", "percentile_metrics", "metric_percentiles"}  # strings on the command line
    names = {f.name for f in dataclasses.fields(BenchServeConfig)} - parsed
    try:
        cfg = BenchServeConfig(**{k: getattr(args, k) for k in names}, goodput=_parse_goodput(args.goodput),
                               percentile_metrics=[m.strip() for m in args.percentile_metrics.split(",")],
                               metric_percentiles=_parse_percentiles(args.metric_percentiles))
        check_config(cfg)
        return cfg, build_requests(cfg)
    except ValueError as e:
        p.error(str(e))


def bench_serve_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="masep bench serve", formatter_class=HelpFormatter,
                                description="Load an OpenAI-compatible endpoint; report vLLM bench serve's metrics.")
    add_config_arg(p)
    add_bench_serve_args(p)
    add_log_arg(p)
    args = parse_args(p, argv)
    setup_logging(args.log_level)
    cfg, requests = config_from_args(p, args)
    log.info("masep bench serve: %d requests to %s%s, %s", len(requests), cfg.base_url.rstrip("/"), cfg.endpoint,
             "all at once" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g} req/s ({cfg.arrival})")
    try:
        result = asyncio.run(run_benchmark(cfg, requests))
    except (OSError, aiohttp.ClientError, RuntimeError) as e:  # no model list, server unreachable
        log.error("masep bench serve: %s", e)
        return 1
    doc = result_document(args, result)
    if args.save_result:
        Path(args.save_result).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc) if args.json else format_table(result))
    print_errors(result)
    return 0 if result["completed"] else 1


if __name__ == "__main__":
    sys.exit(bench_serve_main(sys.argv[1:]))
