"""benchmarks/trace_summary.py on a made-up trace whose answer is known by hand."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from trace_summary import summarize  # noqa: E402


def _kernel(name: str, ts: float, dur: float) -> dict:
    return {"cat": "kernel", "ph": "X", "name": name, "ts": ts, "dur": dur}


def test_compute_exposed_transfer_and_idle_time_are_told_apart(tmp_path):
    # 0-1000 us: a GEMM; 500-1500: an all-to-all (500 of it hidden under the GEMM);
    # 1500-2000: nothing; 2000-3000: another GEMM. Span 3 ms.
    events = [_kernel("sm90_gemm_bf16", 0, 1000), _kernel("ncclDevKernel_SendRecv", 500, 1000),
              _kernel("sm90_gemm_bf16", 2000, 1000), {"cat": "cpu_op", "ph": "X", "name": "aten::mm", "ts": 0, "dur": 9}]
    path = tmp_path / "rank0.json"
    path.write_text(json.dumps({"traceEvents": events}))
    row = summarize(path, None)
    assert (row["span_ms"], row["compute_ms"], row["nccl_only_ms"], row["idle_ms"]) == (3.0, 2.0, 0.5, 0.5)
    assert row["top_kernels_ms"] == {"sm90_gemm_bf16": 2.0, "ncclDevKernel_SendRecv": 1.0}
    last = summarize(path, 1.5)  # from 1500 us on: idle 500, GEMM 1000
    assert (last["span_ms"], last["compute_ms"], last["idle_ms"]) == (1.5, 1.0, 0.5)
