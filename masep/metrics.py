"""Latency and throughput metrics with vLLM `bench serve` definitions and names.

Per request (times in seconds from the moment the batch was submitted):
  TTFT  = time of the first output token
  E2EL  = time of the last output token (end-to-end latency)
  TPOT  = (E2EL - TTFT) / (output tokens - 1), only for requests with more than one token
  ITL   = gaps between consecutive output tokens of one request, pooled over all requests
Aggregates are reported in milliseconds as mean / median / std / p99 (numpy's linear
percentile), and an empty list reports 0, as vLLM does. Throughputs divide by the
duration of the whole batch (first submission to last token).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class RequestOutput:
    """What one request produced. `error` is set (and `tokens` empty) when it was rejected."""

    prompt_len: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    error: str | None = None
    # Seconds from submission at which each output token became available.
    token_times_s: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop" (eos) | None when failed

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] if self.token_times_s else None

    @property
    def e2e_s(self) -> float | None:
        return self.token_times_s[-1] if self.token_times_s else None

    @property
    def tpot_s(self) -> float | None:
        """(E2EL - TTFT) / (n - 1); None for fewer than two tokens (vLLM leaves those out)."""
        n = len(self.tokens)
        return (self.e2e_s - self.ttft_s) / (n - 1) if self.ok and n > 1 else None

    @property
    def itl_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    def to_dict(self) -> dict:
        ms = lambda s: None if s is None else s * 1e3  # noqa: E731
        return dict(prompt_len=self.prompt_len, output_len=len(self.tokens), error=self.error,
                    finish_reason=self.finish_reason, ttft_ms=ms(self.ttft_s), tpot_ms=ms(self.tpot_s),
                    e2el_ms=ms(self.e2e_s))


@dataclass
class Metrics:
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    duration: float  # seconds (vLLM's name)
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output tokens) / s
    mean_ttft_ms: float
    median_ttft_ms: float
    std_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    std_tpot_ms: float
    p99_tpot_ms: float
    mean_itl_ms: float
    median_itl_ms: float
    std_itl_ms: float
    p99_itl_ms: float
    mean_e2el_ms: float
    median_e2el_ms: float
    std_e2el_ms: float
    p99_e2el_ms: float

    @property
    def duration_s(self) -> float:
        return self.duration

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _stats(name: str, values_s: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=np.float64) * 1e3 if len(values_s) else np.zeros(1)
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"std_{name}_ms": float(ms.std()), f"p99_{name}_ms": float(np.percentile(ms, 99))}


def compute_metrics(outputs: Sequence[RequestOutput], duration_s: float) -> Metrics:
    """Aggregate per-request outputs (possibly gathered from several ranks) into Metrics."""
    done = [o for o in outputs if o.ok]
    out_tokens = sum(len(o.tokens) for o in done)
    in_tokens = sum(o.prompt_len for o in done)
    rate = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return Metrics(
        completed=len(done), failed=len(outputs) - len(done), total_input_tokens=in_tokens,
        total_output_tokens=out_tokens, duration=duration_s, request_throughput=rate(len(done)),
        output_throughput=rate(out_tokens), total_token_throughput=rate(in_tokens + out_tokens),
        **_stats("ttft", [o.ttft_s for o in done]),
        **_stats("tpot", [o.tpot_s for o in done if o.tpot_s is not None]),
        **_stats("itl", [gap for o in done for gap in o.itl_s]),
        **_stats("e2el", [o.e2e_s for o in done]),
    )
