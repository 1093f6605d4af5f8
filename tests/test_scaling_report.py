"""benchmarks/scaling_report.py and predict_scaling.py's 8-from-4 extrapolation on made-up rows:
the prediction joins the row of the same plan, the error sign, efficiency against one GPU, the
best-of-family duel, and f8 = f4^2 / f2."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import predict_scaling  # noqa: E402
import scaling_report as report  # noqa: E402


def _row(gpus, plan, family, tpot, floor=1.0, batch=24, context=2048):
    return dict(preset="paper", batch=batch, context=context, gpus=gpus, plan=plan, family=family, tpot_ms=tpot,
                tok_s=batch / tpot * 1e3, joules_per_token=0.1, floor_ms=floor, floor_ratio=tpot / floor,
                simulated_ms=None)


def test_predictions_errors_efficiency_and_the_duel():
    rows = [_row(1, "one GPU", "one", 5.0), _row(4, "tp4pp1 m1", "tp", 2.0, floor=1.5),
            _row(4, "sep 1x1+3 m2", "separated", 4.0, floor=2.5), _row(4, "sep 2x1+2 m2", "separated", 5.0)]
    predictions = {"rows": [dict(preset="paper", batch=24, context=2048, plan="tp4pp1 m1", calibrated_ms=1.8),
                            dict(preset="paper", batch=24, context=2048, plan="sep 1x1+3 m2", calibrated_ms=5.0)]}
    report.attach_predictions(rows, predictions)
    report.attach_efficiency(rows)
    assert rows[1]["calibrated_error"] == pytest.approx(-0.1) and rows[2]["calibrated_error"] == pytest.approx(0.25)
    assert "calibrated_ms" not in rows[3]  # no prediction for that plan: no error either
    assert rows[1]["efficiency"] == pytest.approx(5.0 / 2.0 / 4)  # tok/s per GPU over one GPU's
    summary = report.error_summary(rows, 4)["paper"]
    assert summary["rows"] == 2 and summary["within"] == 1 and summary["largest_abs"] == pytest.approx(0.25)
    [duel] = report.wins(rows)
    assert duel["best_separated"] == "sep 1x1+3 m2" and duel["best_baseline"] == "tp4pp1 m1"
    assert duel["speedup"] == pytest.approx(0.5) and duel["floor_speedup"] == pytest.approx(1.5 / 2.5)


def test_eight_gpu_factor_carries_the_growth_from_two_to_four_on():
    hw = predict_scaling.get_profile("h200")
    two = {("paper", "tp", 24, 2048): 1.5, ("paper", "pp", 24, 2048): 1.2}
    four = {("paper", "tp", 24, 2048): 2.0, ("paper", "tp_pp", 24, 2048): 1.4}
    rows = {r["plan"]: r for r in predict_scaling.extrapolate_eight(two, four, hw)
            if (r["batch"], r["context"]) == (24, 2048)}
    assert rows["tp8pp1 m1"]["factor"] == pytest.approx(2.0 ** 2 / 1.5, abs=1e-3)
    # TP x PP: measured on 4 GPUs directly; on 2 the geometric mean of TP and PP
    assert rows["tp4pp2 m2"]["factor"] == pytest.approx(1.4 ** 2 / (1.5 * 1.2) ** 0.5, abs=1e-3)
    assert not any(r["family"] in ("ep", "separated") for r in rows.values())  # no factor, no prediction


def test_with_microbatches_times_each_pipelined_plan_at_each_count():
    """`multi_gpu.py --microbatches 1 2`: separated, EP and PP plans at both counts, TP-only plans
    once, no plan twice (a planner's best plan may already be in the list)."""
    import multi_gpu
    from masep.plan import EpPlan, SeparatedPlan, TpPpPlan
    plans = [SeparatedPlan(1, 1, 1, 2), TpPpPlan(2, 1, 1), TpPpPlan(1, 2, 2), EpPlan(2, 2), SeparatedPlan(1, 1, 1, 1)]
    got = multi_gpu.with_microbatches(plans, [1, 2])
    assert got == [SeparatedPlan(1, 1, 1, 1), SeparatedPlan(1, 1, 1, 2), TpPpPlan(2, 1, 1), TpPpPlan(1, 2, 1),
                   TpPpPlan(1, 2, 2), EpPlan(2, 1), EpPlan(2, 2)]
