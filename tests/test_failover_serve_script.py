"""benchmarks/failover_serve.py on CPU (gloo ranks, the tiny preset): a fresh `masep serve`
per scenario (two attention replicas, two expert ranks each holding all 8 experts) under
`masep bench serve --save-detailed`; SIGKILL of an attention rank (recompute and mirror) and of
an expert rank mid-decode lose no request and change no token against the no-fault run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_failover_script_on_cpu_loses_no_request_and_changes_no_token(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "failover_serve.py"), "--out", str(tmp_path), "--device", "cpu",
           "--preset", "tiny", "--num-prompts", "8", "--output-len", "24", "--max-duration", "60",
           "--start-timeout", "60", "--tag", "test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=230, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    [path] = tmp_path.glob("failover_serve_cpu_test_*.json")
    assert path.with_suffix(".md").read_text() in proc.stdout
    doc = json.loads(path.read_text())
    assert doc["meta"]["hardware"]["device"] == "cpu" and doc["meta"]["plan"]["ranks"] == 4
    rows = {r["scenario"]: r for r in doc["rows"]}
    assert list(rows) == ["no-fault", "kill-attention", "kill-expert", "kill-attention-mirror"]
    for name, r in rows.items():
        assert (r["completed"], r["failed"], r["unsent"]) == (8, 0, 0), r
        assert r["identical"] == r["completed"] and not r["mismatched"], r
        assert r["ok"] and r["max_itl_ms"] > 0 and r["output_throughput"] > 0
        if name != "no-fault":  # killed while requests ran; /health named the loss, and how long that took
            assert r["killed"] and r["running_at_kill"] > 0 and 0 < r["kill_to_health_ms"] < 30_000, r
            assert r["health"]["status"] == "degraded" and "SIGKILL" in r["verdict"], r
            assert r["baseline_max_itl_ms"] == rows["no-fault"]["max_itl_ms"]
    assert rows["no-fault"]["health"]["status"] == "ok"
    for name in ("kill-attention", "kill-attention-mirror"):
        assert list(rows[name]["health"]["lost_units"]) == ["1"] and rows[name]["health"]["live_units"] == [0]
    expert = rows["kill-expert"]
    assert list(expert["health"]["lost_expert_ranks"]) == [str(expert["target"]["rank"])] == ["3"]
    assert expert["health"]["live_units"] == [0, 1] and not expert["health"]["lost_units"]
