"""Prometheus metrics of the HTTP server, under vLLM's names so vLLM dashboards work unchanged.

Each `ServerMetrics` has its own `CollectorRegistry`: several apps can live in one process
(tests), and the global registry would refuse the second app's metrics as duplicates.
Every series carries `model_name`, as vLLM's do. kv_cache_usage_perc is a fraction in [0, 1]
despite its name, again as in vLLM.
"""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from masep.serve.engine_client import EngineClient, TokenDelta

# Seconds. TTFT spans queueing, so it reaches minutes; a token gap rarely exceeds a few seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                     0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_len: even resolution on a log scale of lengths."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_len:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class _StepCounters:
    """masep's own engine-step counters (vLLM has no equivalent names), read at scrape time:
    `masep:engine_steps_total`, `masep:engine_step_rows_total`, `masep:engine_step_tokens_total`
    and `masep:engine_step_seconds_total`, each labelled with the step kind (decode, prefill).
    Mean decode batch = rows / steps; mean decode step time = seconds / steps."""

    FIELDS = (("steps", "Engine steps run."), ("rows", "Requests in the steps (decode: the batch size)."),
              ("tokens", "Tokens through the model in the steps."),
              ("seconds", "Host time spent in the steps."))

    def __init__(self, engine: EngineClient, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        stats = self.engine.stats()
        live = GaugeMetricFamily("masep:live_units", "Attention units (replicas, EP ranks) still serving.",
                                 labels=["model_name"])
        live.add_metric([self.model_name], stats.live_units)
        lost = CounterMetricFamily("masep:failovers", "Attention units lost since start (their requests were "
                                   "moved or failed).", labels=["model_name"])
        lost.add_metric([self.model_name], stats.failovers)
        joins = CounterMetricFamily("masep:rank_joins", "Replacement ranks that joined the running engine (a dead "
                                    "expert rank whose experts nobody else held).", labels=["model_name"])
        joins.add_metric([self.model_name], getattr(stats, "joins", 0))
        yield from (live, lost, joins)
        steps = stats.steps
        for field, doc in self.FIELDS:
            name = "masep:engine_steps" if field == "steps" else f"masep:engine_step_{field}"
            family = CounterMetricFamily(name, doc, labels=["model_name", "kind"])
            for kind, totals in steps.items():
                family.add_metric([self.model_name, kind], totals[field])
            yield family


class ServerMetrics:
    def __init__(self, engine: EngineClient, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        label, r = ["model_name"], self.registry
        gauges = {
            "vllm:num_requests_running": ("Requests holding a KV slot.", lambda: engine.stats().num_running),
            "vllm:num_requests_waiting": ("Requests waiting for a KV slot.", lambda: engine.stats().num_waiting),
            "vllm:kv_cache_usage_perc": ("Fraction of KV slots in use (1 = full).", lambda: _kv_usage(engine)),
        }
        for name, (doc, read) in gauges.items():  # read at scrape time, so never stale
            Gauge(name, doc, label, registry=r).labels(model_name).set_function(read)
        r.register(_StepCounters(engine, model_name))
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", label, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", label, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               label + ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Request arrival to first output token.",
                              label, registry=r, buckets=TTFT_BUCKETS)
        # vLLM renamed time_per_output_token to inter_token_latency; dashboards use either, so both.
        self.token_gaps = [Histogram(name, "Time between consecutive output tokens.", label, registry=r,
                                     buckets=TOKEN_GAP_BUCKETS)
                           for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")]
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request arrival to its last output.",
                             label, registry=r, buckets=E2E_BUCKETS)
        lengths = token_buckets(engine.max_model_len)
        self.request_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", label,
                                        registry=r, buckets=lengths)
        self.request_generation = Histogram("vllm:request_generation_tokens", "Output tokens per request.",
                                            label, registry=r, buckets=lengths)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def track(self, arrival: float) -> RequestTracker:
        return RequestTracker(self, arrival)


def _kv_usage(engine: EngineClient) -> float:
    stats = engine.stats()
    return stats.kv_slots_used / stats.kv_slots_total if stats.kv_slots_total else 0.0


class RequestTracker:
    """One request's timings. `arrival` is `time.perf_counter()` when the API got the request."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self.m, self.arrival, self.last = metrics, arrival, None
        self.num_prompt = self.num_output = 0
        self.done = False

    def on_delta(self, delta: TokenDelta) -> None:
        now, m, name = time.perf_counter(), self.m, self.m.model_name
        new_tokens = delta.num_output_tokens - self.num_output
        if new_tokens > 0 and self.last is None:
            m.ttft.labels(name).observe(now - self.arrival)
        elif new_tokens > 0:
            for hist in m.token_gaps:  # a delta may carry several tokens: spread its gap over them
                for _ in range(new_tokens):
                    hist.labels(name).observe((now - self.last) / new_tokens)
        if new_tokens > 0:
            self.last = now
            m.generation_tokens.labels(name).inc(new_tokens)
        if delta.num_prompt_tokens and not self.num_prompt:
            m.prompt_tokens.labels(name).inc(delta.num_prompt_tokens)
        self.num_prompt = max(self.num_prompt, delta.num_prompt_tokens)
        self.num_output = max(self.num_output, delta.num_output_tokens)
        if delta.finish_reason is not None:
            self.finish(delta.finish_reason)

    def discard(self) -> None:
        """The engine refused the request: it never ran, so it is not counted as finished."""
        self.done = True

    def finish(self, reason: str) -> None:
        """Record the end once; a stream closed before its last delta (client gone) is an abort."""
        if self.done:
            return
        self.done, m, name = True, self.m, self.m.model_name
        m.success.labels(name, reason).inc()
        m.e2e.labels(name).observe(time.perf_counter() - self.arrival)
        m.request_prompt.labels(name).observe(self.num_prompt)
        m.request_generation.labels(name).observe(self.num_output)
