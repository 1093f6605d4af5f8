"""Planning at scale: the lower bound and the floor hold for the large presets, routed dispatch and two
GPU kinds; a 512-GPU plan simulates a handful of ranks; the throughput search finds what exhaustive
simulation finds; the routed what-if moves the routed rows; perf/scale.py's rows and copies."""
import pytest

from masep.config import preset
from masep.perf.classes import rank_classes
from masep.perf.costmodel import Workload, op_cost
from masep.perf.floor import plan_floor
from masep.perf.hardware import MixedHardware, get_profile
from masep.perf.planner import candidate_plans, hardware_for, lower_bound_s
from masep.perf.throughput import batch_candidates, search_throughput
from masep.perf.pricing import plan_cost
from masep.perf.scale import Setting, family_row, replicated
from masep.perf.simulator import simulate
from masep.plan import EpPlan, SeparatedPlan, TpPpPlan

QWEN, MIXTRAL, PAPER = preset("qwen3-235b-a22b"), preset("mixtral-8x22b"), preset("paper")
H100, H200 = get_profile("h100"), get_profile("h200")
SPLIT = MixedHardware(H200, H100)

CASES = [  # (model, plan, workload, hardware): large presets at scale, both dispatch models, two kinds
    (QWEN, SeparatedPlan(16, 2, 32, 2), Workload(1024, 2048), H200),
    (QWEN, SeparatedPlan(24, 1, 40, 3), Workload(2048, 2048, dispatch="routed"), H100),
    (QWEN, EpPlan(64, 2), Workload(1024, 2048, dispatch="routed"), H200),
    (QWEN, TpPpPlan(8, 8, 3), Workload(512, 4096), H200),
    (MIXTRAL, SeparatedPlan(8, 2, 16, 3, placement=tuple((j % 8,) for j in range(16))), Workload(2048, 2048), SPLIT),
    (MIXTRAL, SeparatedPlan(6, 2, 4, 2), Workload(300, 1024, dispatch="routed"), SPLIT),
    (MIXTRAL, EpPlan(32, 2, placement=tuple((j % 8,) for j in range(32))), Workload(1024, 2048), H100),
    (PAPER, SeparatedPlan(3, 1, 2, 2), Workload(96, 2048), MixedHardware(get_profile("a100-80g"), H200)),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlap", [True, False])
def test_bound_and_floor_never_exceed_the_simulation(overlap):
    for cfg, plan, work, hw in CASES:
        hw = hardware_for(hw, plan)
        sim = simulate(plan, cfg, work, hw, overlap=overlap, check_fit=False, grouped=True)
        assert lower_bound_s(plan, cfg, work, hw, overlap) <= sim.tpot_s * (1 + 1e-9), (plan, work)
        assert plan_floor(plan, cfg, work, hw).seconds <= sim.tpot_s * (1 + 1e-9), (plan, work)


def test_a_512_gpu_plan_simulates_a_handful_of_ranks():
    work = Workload(8192, 2048)
    for plan in (SeparatedPlan(112, 4, 64, 2), EpPlan(512, 2, placement=tuple((j % 128,) for j in range(512)))):
        classes = rank_classes(plan, QWEN, work, H200)
        assert len(classes.reps) <= 12 and sum(classes.counts) == 512


@pytest.mark.timeout(120)
def test_throughput_search_finds_what_exhaustive_simulation_finds_with_prices_and_two_kinds():
    """The search tries each plan shape at its largest batch that fits and whose bound meets the limit (and
    smaller ones only when the simulation misses the limit); on these cases that is what simulating every
    (batch, plan) pair finds, both ranked by tokens/s and by cost per token over two kinds."""
    cfg, limit, gpus, prices = PAPER, 6e-3, 4, {"h100": 2.0, "h200": 3.0}
    options = [H100, H200, MixedHardware(H200, H100)]
    every = []
    for hw in options:
        strategies = ("separated",) if isinstance(hw, MixedHardware) else ("separated", "ep", "tp_pp")
        for batch in batch_candidates(64):
            for plan in candidate_plans(cfg, gpus, batch, strategies, max_microbatches=2):
                try:
                    sim = simulate(plan, cfg, Workload(batch, 2048), hardware_for(hw, plan))
                except ValueError:
                    continue
                if sim.tpot_s <= limit:
                    every.append(sim)
    cheapest = min(every, key=lambda s: plan_cost(s, prices)["usd_per_m_output_tokens"])
    res = search_throughput(cfg, options, gpus, 2048, limit, max_batch=64, top=1, max_microbatches=2, prices=prices)
    assert plan_cost(res.best, prices)["usd_per_m_output_tokens"] == pytest.approx(
        plan_cost(cheapest, prices)["usd_per_m_output_tokens"])
    fastest = max((s for s in every if s.hw is H100), key=lambda s: s.tps)
    assert search_throughput(cfg, H100, gpus, 2048, limit, max_batch=64, top=1, max_microbatches=2).best.tps == \
        pytest.approx(fastest.tps)


def test_routed_dispatch_moves_the_routed_rows():
    """sep 4x1+4, 64 sequences in 2 micro-batches: an attention rank sends its 8 tokens x top-2 rows of 4096
    bf16 values (131 KB) in one latency, where the runtime's blocks go to each of the 4 expert ranks:
    capacity sized from the routing (8 tokens x 2 of 16 experts x 4 held = 4 rows expected, x 1.5
    margin = 6, parallel/capacity.py) + a header row; the worst case, 8 x min(2, 4) = 16 rows, is
    what the capacity saves."""
    plan, hw = SeparatedPlan(4, 1, 4, 2), H100
    routed = op_cost("dispatch", 0, 0, plan, 0, PAPER, Workload(64, 2048, dispatch="routed"), hw)
    assert routed.link_bytes == 8 * 2 * 4096 * 2
    assert routed.transfer_s == pytest.approx(hw.nvlink_latency_s + routed.link_bytes / hw.nvlink_bytes_per_s)
    padded = op_cost("dispatch", 0, 0, plan, 0, PAPER, Workload(64, 2048), hw)
    assert padded.link_bytes == 4 * (6 + 1) * 4096 * 2
    assert padded.link_bytes_saved == 4 * (16 - 6) * 4096 * 2
    with pytest.raises(ValueError, match="Workload.dispatch='exact'"):
        Workload(1, 1, dispatch="exact")


@pytest.mark.timeout(60)
def test_family_rows_and_copies_of_a_smaller_instance():
    setting = Setting(context=1024, tpot_limit_ms=5.0, max_microbatches=2, batch_per_gpu=8)
    rows = [family_row(PAPER, H100, n, "ep", setting) for n in (2, 4)]
    for r in rows:
        assert r["tpot_ms"] <= 5.0 and r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / r["gpus"])
        assert r["tokens_per_s_per_node"] == pytest.approx(8 * r["tokens_per_s_per_gpu"])
        assert 0 < r["headroom_fraction"] < 1 and r["headroom_gb"] == pytest.approx(
            r["headroom_fraction"] * H100.memory_bytes / 1e9)
    best = replicated(rows, 8)
    assert best["replicas"] == 8 // best["gpus"]
    assert best["tokens_per_s_per_gpu"] == max(r["tokens_per_s_per_gpu"] for r in rows)
    assert replicated(rows, 3) is None  # neither instance divides 3 GPUs
    none = family_row(PAPER, H100, 2, "tp_pp", Setting(context=1024, tpot_limit_ms=0.01, max_microbatches=1))
    assert none["plan"] is None and "no plan" in none["why"]
    with pytest.raises(ValueError, match="family='dp'"):
        family_row(PAPER, H100, 2, "dp", setting)
    with pytest.raises(ValueError, match="Setting.tpot_limit_ms"):
        Setting(tpot_limit_ms=0)


@pytest.mark.timeout(60)
def test_plan_by_family_lists_the_best_of_each(capsys):
    import argparse
    import json

    from masep.perf import cli as perf_cli
    parser = argparse.ArgumentParser()
    perf_cli.add_perf_parsers(parser.add_subparsers(dest="command"))

    def run(*argv):
        args = parser.parse_args(["plan", "--preset", "paper", "--gpus", "4", "--hardware", "h100", *argv])
        return args.func(args)
    assert run("--tpot-limit-ms", "8", "--max-batch", "64", "--by-family", "--json") == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["family"] for r in rows] == ["separated", "ep", "tp_pp"]
    assert all(r["tpot_ms"] <= 8 and r["batch"] <= 64 for r in rows if r["plan"])
    assert run("--by-family") == 2 and "give --tpot-limit-ms" in capsys.readouterr().err
