"""Planner: finds what exhaustive simulation finds, rejects plans that do not fit with the numbers,
explains the winner; the plan / simulate / sweep / replan commands."""
import argparse
import json

import pytest

from masep.config import preset
from masep.plan import SeparatedPlan
from masep.perf import cli as perf_cli
from masep.perf.costmodel import Workload, describe, plan_to_dict
from masep.perf.hardware import get_profile
from masep.perf.planner import (batch_candidates, candidate_plans, explain, search, search_throughput)
from masep.perf.simulator import rank_ops, simulate

PAPER = preset("paper")


def _exhaustive(cfg, hw, gpus, work, max_m):
    sims = []
    for plan in candidate_plans(cfg, gpus, work.batch, max_microbatches=max_m):
        try:
            sims.append(simulate(plan, cfg, work, hw))
        except ValueError:
            pass
    return sims


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hw_name,gpus,batch,context", [("a100-80g", 16, 24, 2048), ("h100", 8, 256, 4096),
                                                        ("h200", 6, 3, 512)])
def test_planner_finds_what_exhaustive_simulation_finds(hw_name, gpus, batch, context):
    hw, work = get_profile(hw_name), Workload(batch, context)
    res = search(PAPER, hw, gpus, work, top=3, max_microbatches=3)
    sims = sorted(_exhaustive(PAPER, hw, gpus, work, 3), key=lambda s: s.tpot_s)
    assert res.simulated <= res.candidates == len(candidate_plans(PAPER, gpus, batch, max_microbatches=3))
    assert [s.tpot_s for s in res.ranked] == pytest.approx([s.tpot_s for s in sims[:3]], rel=1e-12)
    assert describe(res.best.plan) in {describe(s.plan) for s in sims if s.tpot_s == pytest.approx(sims[0].tpot_s)}


@pytest.mark.timeout(60)
def test_throughput_under_a_tpot_limit_matches_exhaustive():
    hw, gpus, limit = get_profile("a100-80g"), 4, 3e-3
    res = search_throughput(PAPER, hw, gpus, 2048, limit, max_batch=64, top=1, max_microbatches=2)
    best = max((s for b in batch_candidates(64) for s in _exhaustive(PAPER, hw, gpus, Workload(b, 2048), 2)
                if s.tpot_s <= limit), key=lambda s: s.tps)
    assert res.best.tps == pytest.approx(best.tps) and res.best.tpot_s <= limit


@pytest.mark.timeout(30)
def test_plans_that_do_not_fit_are_rejected_with_the_numbers():
    a100 = get_profile("a100-80g")
    # 137 GB of KV cache: fits spread over 4 GPUs (TP4, EP4), not on 1 attention GPU (sep 1x1+3)
    res = search(PAPER, a100, 4, Workload(256, 8192), max_microbatches=1, top=50)
    rejected = dict(res.rejected)
    assert "rank 0 (attention) needs 140.7 GB" in rejected["sep 1x1+3 m1"]
    assert {describe(s.plan) for s in res.ranked} >= {"tp4pp1 m1", "ep4 m1"}
    assert not set(rejected) & {describe(s.plan) for s in res.ranked}
    # 550 GB of KV cache: nothing fits on 4 x 80 GiB
    res = search(PAPER, a100, 4, Workload(512, 16384), max_microbatches=1)
    assert len(res.rejected) == res.candidates and not res.ranked
    plan, reason = res.rejected[0]
    assert "does not fit" in reason and "KV cache" in reason and "GiB" in reason
    with pytest.raises(ValueError, match="no plan for 4 GPU"):
        res.best
    with pytest.raises(ValueError, match=r"needs \d+\.\d GB = weights"):
        simulate(SeparatedPlan(3, 1, 1, 1), PAPER, Workload(512, 16384), a100)


@pytest.mark.timeout(30)
def test_explain_separated():
    sim = simulate(SeparatedPlan(4, 1, 12, 2), PAPER, Workload(96, 2048), get_profile("a100-80g"))
    x = explain(sim)
    t_f = max(x["t_attention_ms"], x["t_experts_ms"])
    assert x["m_min"] == pytest.approx(2 * (1 + x["t_transfer_ms"] / t_f))
    assert x["balance_ta_over_te"] == pytest.approx(x["t_attention_ms"] / x["t_experts_ms"])
    assert x["tc_below_tf"] == (x["t_transfer_ms"] < t_f) and x["m"] == 2
    assert len(rank_ops(sim.plan, PAPER, 0)) == 4 * 3 * 2 + 2  # (attention, dispatch, combine) x layers x m + heads


def _run(argv):
    parser = argparse.ArgumentParser()
    perf_cli.add_perf_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.timeout(60)
def test_simulate_json_rows(capsys):
    assert _run(["simulate", "--preset", "paper", "--gpus", "16", "--hardware", "a100-80g", "--batch", "24",
                 "--context", "2048", "--json", "--max-microbatches", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = doc["rows"]
    assert doc["meta"]["model"]["name"] == "paper" and doc["meta"]["hardware"]["gpus"] == 16
    assert all({"strategy", "plan", "tpot_ms", "tps", "floor_ms"} <= set(r) for r in rows)
    claims = [r for r in rows if r["source"] == "claimed"]
    assert [(r["tpot_ms"], r["tps"]) for r in claims] == [(2.76, 8696), (1.82, 13289)]
    assert claims[1]["tpot_ms"] < claims[1]["floor_ms"]  # the 12+4 claim is below its own floor
    labels = [r["label"] for r in rows]
    assert any("tp8pp2" in x for x in labels) and any("RxT+4, RxT = 12" in x for x in labels)
    assert "planner's best" in labels
    best = rows[-1]
    assert best["tpot_ms"] == min(r["tpot_ms"] for r in rows if r["source"] == "simulated")


@pytest.mark.timeout(60)
def test_plan_sweep_and_bad_arguments(capsys, tmp_path):
    assert _run(["plan", "--preset", "paper", "--gpus", "8", "--batch", "16", "--json", "--top", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["rows"]) == 2 and doc["rows"][0]["tpot_ms"] <= doc["rows"][1]["tpot_ms"]
    assert _run(["plan", "--gpus", "0"]) == 2 and "--gpus 0" in capsys.readouterr().err
    assert _run(["simulate", "--plan", "sep twelve"]) == 2
    assert _run(["sweep", "--preset", "paper", "--gpus", "4", "--out", str(tmp_path), "--batches", "1,64",
                 "--contexts", "512", "--max-microbatches", "1"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"sweep.json", "sweep_batch.png", "sweep_context.png"}
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["batch"] for r in data["over_batch"]] == [1, 64] and "tpot_ms" in data["over_batch"][0]["separated"]



def test_sweep_table_columns_line_up():
    from masep.perf.sweep import summary_lines
    cell = lambda plan, ms: {"plan": plan, "tpot_ms": ms}  # noqa: E731
    doc = {"strategies": ["tp_pp", "separated"], "fixed_context": 2048, "fixed_batch": 24,
           "over_batch": [{"batch": 1, "tp_pp": cell("tp8pp2 m1", 0.7), "separated": cell("sep 12x1+4 m2", 1.0),
                           "speedup": 0.7}, {"batch": 512, "tp_pp": cell("tp16pp1 m1", 9.9)}],
           "over_context": [{"context": 32768, "tp_pp": cell("tp8pp2 m1", 4.3), "separated": cell("sep 5x2+6 m3", 4.4),
                             "speedup": 0.98}]}
    lines = summary_lines(doc)
    for table in (lines[:3], lines[3:]):
        header, rows = table[0], table[1:]
        ends = [header.index("TPOT ms") + len("TPOT ms"), header.index("speedup x") + len("speedup x")]
        for row in rows:  # each value ends where its column's header ends
            assert row[ends[1] - 1] in "x-", (header, row)
            assert row[ends[0] - 1].isdigit(), (header, row)
    assert "does not fit" in lines[2]


@pytest.mark.timeout(60)
def test_replan_refits_and_proposes(tmp_path, capsys):
    a100 = get_profile("a100-80g")
    plan, work = SeparatedPlan(12, 1, 4, 2), Workload(24, 2048)
    sim = simulate(plan, PAPER, work, a100)
    # a run where attention took twice the predicted time on every attention rank (over 10 steps)
    busy = {}
    for r in sim.records:
        if r.op.kind == "attention":
            busy.setdefault(str(r.rank), {"attention": 0.0})["attention"] += 2 * r.cost.compute_s * 10
    measured = dict(plan={"strategy": "separated", **plan_to_dict(plan)}, preset="paper", hardware="a100-80g",
                    batch=24, context=2048, steps=10, busy_s=busy, tpot_ms=4.0, timing="cuda_events")
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(measured))
    assert _run(["replan", "--measured", str(path), "--threshold", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["rows"][0]
    assert out["refit_factors"] == {"attention": pytest.approx(2.0)}
    assert out["predicted_tpot_ms"] > out["predicted_tpot_ms_before_refit"]
    assert out["switch"] == (out["gain"] > 0.1) and out["best_tpot_ms"] <= out["predicted_tpot_ms"]
    assert _run(["replan", "--measured", str(path), "--threshold", "0.99"]) == 0
    assert "keep sep 12x1+4 m2" in capsys.readouterr().out


@pytest.mark.timeout(30)
def test_replan_reads_bench_dist_rows():
    from masep.perf.replan import parse_measured, refit_factors
    h100 = get_profile("h100")
    plan, work = SeparatedPlan(1, 2, 2, 2), Workload(8, 1024)
    sim = simulate(plan, PAPER, work, h100)
    per_step = {}
    for r in sim.records:  # experts measured 1.5x slower than predicted, the rest as predicted
        scale = 1.5 if r.op.kind == "experts" else 1.0
        kinds = per_step.setdefault(r.rank, {})
        kinds[r.op.kind] = kinds.get(r.op.kind, 0.0) + r.cost.compute_s * scale * 1e3
    row = dict(device="NVIDIA H100 80GB HBM3", strategy="separated", plan={"strategy": "separated",
               **plan_to_dict(plan)}, preset="paper", dtype="bfloat16", batch=8, context=1024, steps=20,
               median_tpot_ms=9.9, busy_ms_per_step=json.loads(json.dumps(per_step)), timing="cuda_events")
    m = parse_measured(row)
    assert (m.hardware, m.tpot_ms, m.steps, m.work) == ("h100", 9.9, 1, work)
    assert parse_measured({**row, "plan": "sep 1x2+2 m2"}).plan == plan  # the plan notation works too
    factors = refit_factors(m, h100)
    assert factors["experts"] == pytest.approx(1.5) and factors["attention"] == pytest.approx(1.0)
    # host-clock times (what `masep bench dist` writes on CPU) and files that do not say are refused
    with pytest.raises(ValueError, match="says `timing: 'host_clock'`.*CUDA events"):
        parse_measured({**row, "timing": "host_clock"}, "bench.json")
    with pytest.raises(ValueError, match="has no `timing` field"):
        parse_measured({k: v for k, v in row.items() if k != "timing"}, "bench.json")


def test_small_times_keep_their_digits():
    from masep.perf.planner import ms
    assert [ms(1.6884), ms(0.033), ms(0.000160886), ms(0.0)] == ["1.688", "0.033", "0.00016", "0.000"]


def test_head_parallel_groups_stay_inside_a_node():
    """On 2 nodes of 4 GPUs, no candidate the planner keeps has a replica or a TP group across
    the node boundary (sep 2x3+2 would put ranks 3-5 in one replica; tp8 spans both nodes)."""
    from masep.perf.planner import check_head_groups_in_nodes, search
    from masep.plan import SeparatedPlan, TpPpPlan
    with pytest.raises(ValueError, match="ranks 3-5 spans two nodes of 4 GPUs"):
        check_head_groups_in_nodes(SeparatedPlan(2, 3, 2, 1), 4)
    with pytest.raises(ValueError, match="spans two nodes"):
        check_head_groups_in_nodes(TpPpPlan(8, 1, 1), 4)
    check_head_groups_in_nodes(SeparatedPlan(2, 4, 8, 1), 4)  # replicas of 4 on node boundaries
    hw = get_profile("h100").replace(gpus_per_node=4)
    res = search(preset("paper"), hw, 8, Workload(24, 2048), top=50)
    assert any("spans two nodes" in why for _, why in res.rejected)
    for sim in res.ranked:
        check_head_groups_in_nodes(sim.plan, 4)
