"""benchmarks/fit_comm.py recovers ring all-reduce constants from TP rows and refuses nonsense."""
import importlib.util
import json
from pathlib import Path

import pytest

from masep.config import preset

_spec = importlib.util.spec_from_file_location("fit_comm", Path(__file__).parents[1] / "benchmarks" / "fit_comm.py")
fit_comm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fit_comm)


def _row(batch: int, latency: float, bandwidth: float, tp: int = 4) -> dict:
    cfg = preset("paper-swiglu")
    nbytes = batch * cfg.hidden_size * 2
    per_call = 2 * (tp - 1) * latency + 2 * (tp - 1) / tp * nbytes / bandwidth
    busy = per_call * 2 * cfg.num_layers * 1e3  # ms per step, one micro-batch
    return dict(kind="decode", strategy="tp_pp", preset="paper-swiglu", batch=batch, tpot_ms_median=1.0,
                plan=dict(tp=tp, pp=1, microbatches=1), busy_ms_per_step={str(r): {"allreduce": busy} for r in range(tp)})


def test_fit_recovers_latency_and_bandwidth(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(_row(b, 3e-6, 200e9)) for b in (24, 128, 512)) + "\n")
    latency, bandwidth = fit_comm.fit(fit_comm.points([str(rows)], {"paper-swiglu"}))
    assert latency == pytest.approx(3e-6, rel=1e-6) and bandwidth == pytest.approx(200e9, rel=1e-6)


def test_fit_refuses_times_that_shrink_with_size(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(_row(b, 3e-6, bw)) for b, bw in ((24, 1e9), (512, 1e12))) + "\n")
    with pytest.raises(ValueError, match="not physical"):
        fit_comm.fit(fit_comm.points([str(rows)], {"paper-swiglu"}))
