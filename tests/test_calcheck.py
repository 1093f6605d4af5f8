"""The cost model against a calibration file: predicted vs measured per op."""
import json
import subprocess
import sys

import pytest

from masep.perf.calcheck import compare, summary
from masep.perf.costmodel import roofline_s
from masep.perf.hardware import get_profile


def _doc(hw):
    """Measurements that follow latency + roofline / efficiency exactly: a refit must recover them."""
    rows = []
    for i, (nbytes, flops) in enumerate([(1e7, 1e9), (4e7, 4e9), (1.6e8, 1.6e10)]):
        for op, lat, eff in (("attention", 80e-6, 0.5), ("experts", 10e-6, 0.9)):
            t = lat + max(nbytes / (hw.hbm_bytes_per_s * 0.9), flops / (hw.matmul_flops_per_s * 0.8)) / eff
            rows.append(dict(op=op, preset="paper", plan="p", batch=8 * (i + 1), context=2048, heads=3, experts=4,
                             tokens=16, bytes=nbytes, flops=flops, measured_ms=t * 1e3))
    rows.append(dict(op="step", preset="paper", plan="single", batch=8, context=2048, heads=32, experts=16,
                     tokens=16, bytes=1e10, flops=1e12, measured_ms=5.0))
    return dict(device="test", date="2026-11-27", hbm_copy_bytes_per_s=hw.hbm_bytes_per_s * 0.9,
                matmul_flops_per_s=hw.matmul_flops_per_s * 0.8, measurements=rows)


def r_bytes(r):
    return {8: 1e7, 16: 4e7, 24: 1.6e8}[r["batch"]]


def r_flops(r):
    return r_bytes(r) * 100


def test_refit_recovers_measurements_that_follow_the_model():
    hw = get_profile("h100")
    rows = compare(_doc(hw), "h100")
    assert len(rows) == 6  # the `step` row mixes op kinds and is not scored
    for r in rows:
        assert r["calibrated_error"] == pytest.approx(0.0, abs=1e-6)
        assert r["predicted_ms"] == pytest.approx(roofline_s(hw, r["op"], r_bytes(r), r_flops(r)) * 1e3)
    s = summary(rows)
    assert s["attention"]["within_10pct_calibrated"] == 3 and s["experts"]["points"] == 3


@pytest.mark.timeout(60)
def test_calcheck_cli_reads_the_committed_h200_calibration():
    out = subprocess.run([sys.executable, "-m", "masep", "calcheck", "benchmarks/results/calibration_h200_20261127.json",
                          "--hardware", "h200", "--json"], capture_output=True, text=True, check=True, timeout=60)
    data = json.loads(out.stdout)
    assert {"attention", "experts"} <= set(data["meta"]["summary"]) and data["rows"][0]["measured_ms"] > 0
    bad = subprocess.run([sys.executable, "-m", "masep", "calcheck", "no-such.json"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no such file" in bad.stderr


def test_holdout_scores_only_unseen_batches_and_still_recovers_an_exact_model():
    hw = get_profile("h100")
    rows = compare(_doc(hw), "h100", holdout_batches={24})
    assert {r["batch"] for r in rows} == {24} and len(rows) == 2
    for r in rows:  # two fitted batches pin latency and efficiency; the third is predicted
        assert r["calibrated_error"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"--holdout-batches \[8, 16, 24\].*keep some to fit"):
        compare(_doc(hw), "h100", holdout_batches={8, 16, 24})
