"""Where a rank's GPU time goes, from a torch.profiler Chrome trace (what `--trace` and
benchmarks/multi_gpu.py write): per rank, the span from the first to the last kernel, the time
some compute kernel runs, the time only NCCL kernels run (a transfer not hidden behind compute;
an NCCL kernel also spins while it waits for its peer), and the time no kernel runs (the GPU
waits for the host).

    python benchmarks/trace_summary.py TRACE.json [...] [--last-ms 200]

--last-ms: only the last MS milliseconds of each trace (the timed steps, not the warm-up).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _minus(outer: list[tuple[float, float]], inner: list[tuple[float, float]]) -> float:
    """Length of `outer` not covered by `inner` (both merged and sorted)."""
    total, j = 0.0, 0
    for a, b in outer:
        covered = 0.0
        while j < len(inner) and inner[j][1] <= a:
            j += 1
        k = j
        while k < len(inner) and inner[k][0] < b:
            covered += min(b, inner[k][1]) - max(a, inner[k][0])
            k += 1
        total += (b - a) - covered
    return total


def summarize(path: Path, last_ms: float | None) -> dict:
    events = json.loads(path.read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    kernels = [(e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "")) for e in events
               if e.get("cat") == "kernel" and e.get("ph") == "X"]
    if not kernels:
        return {"trace": str(path), "kernels": 0}
    end = max(k[1] for k in kernels)
    start = end - last_ms * 1e3 if last_ms else min(k[0] for k in kernels)
    kernels = [(max(a, start), b, n) for a, b, n in kernels if b > start]
    nccl = _union([(a, b) for a, b, n in kernels if "nccl" in n.lower()])
    compute = _union([(a, b) for a, b, n in kernels if "nccl" not in n.lower()])
    busy = _union(nccl + compute)
    span = end - start
    top: dict[str, float] = {}
    for a, b, n in kernels:
        key = n.split("(")[0].split("<")[0][:60]
        top[key] = top.get(key, 0.0) + (b - a)
    return {"trace": str(path), "kernels": len(kernels), "span_ms": span / 1e3,
            "compute_ms": _length(compute) / 1e3, "nccl_only_ms": _minus(nccl, compute) / 1e3,
            "idle_ms": (span - _length(busy)) / 1e3,
            "top_kernels_ms": {k: round(v / 1e3, 3) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:14]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--last-ms", type=float, default=None)
    args = parser.parse_args()
    for path in args.traces:
        row = summarize(path, args.last_ms)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
