"""The benchmark library's arithmetic and formats on CPU (timings need a GPU and live in
benchmarks/, never in tests), and the transformers peer's weight copy."""
import pytest
import torch

from masep.config import PRESETS
from masep.model import build_model
from masep.perf import bench

CALIBRATION_KEYS = {"op", "preset", "plan", "batch", "context", "heads", "experts", "tokens", "bytes", "flops",
                    "measured_ms"}


def test_expected_experts_touched_matches_reference():
    cfg = PRESETS["paper"]
    got = [bench.expected_experts_touched(cfg, b) for b in (1, 8, 24, 64)]
    assert got == pytest.approx([2.0, 10.50, 15.35, 16.0], abs=0.01)


def test_paper_floor_at_batch_24_is_the_reference_6_75_ms():
    """REFERENCE.md: 6.75 ms at 3.0 TB/s without the lm_head; we also count the lm_head."""
    cfg = PRESETS["paper"]
    parts = bench.decode_bytes(cfg, 24, 2048, bench.expected_experts_touched(cfg, 24))
    without_head = parts["total"] - parts["lm_head_embedding"]
    assert without_head / 3.0e12 * 1e3 == pytest.approx(6.75, abs=0.01)
    assert parts["kv_cache"] == 4 * 24 * 2048 * 16 * 1024
    assert parts["attention_weights"] == pytest.approx(4 * 134.2e6, rel=0.01)


def test_attention_and_expert_bytes():
    cfg = PRESETS["paper"]
    b, f = bench.attention_bytes_flops(cfg, heads=32, kv_heads=32, batch=24, context=2048)
    assert b == pytest.approx(134.2e6 + 24 * 2048 * 16384, rel=0.01)
    assert f > 0
    b, f = bench.experts_bytes_flops(PRESETS["paper-swiglu"], touched=1, rows=0)
    assert b == pytest.approx(402.7e6, rel=0.01) and f == 0
    b, _ = bench.experts_bytes_flops(cfg, touched=16, rows=48, hidden_div=8)
    assert b == pytest.approx(16 * 268.4e6 / 8 + 2 * 48 * 4096 * 2, rel=0.01)


def test_percentile():
    assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert bench.percentile(list(map(float, range(101))), 99) == 99.0


def test_hardware_tag():
    assert bench.hardware_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.hardware_tag("NVIDIA H200") == "h200"


def test_standard_plan_shapes_cover_the_seeds_split_and_tp8pp2():
    shapes = bench.standard_plan_shapes(presets=("paper",), batches=(24,))
    ma = [s for s in shapes if s.plan == "sep 1x12+4 m1"]
    tp = [s for s in shapes if s.plan == "tp8pp2 m1"]
    assert {s.heads for s in ma if s.op == "attention"} == {3, 2}  # 32 heads over 12 ranks
    assert 8 * 3 + 4 * 2 == 32
    assert [s.experts for s in ma if s.op == "experts"] == [4]
    (tp_step,) = [s for s in tp if s.op == "step"]
    assert (tp_step.heads, tp_step.experts, tp_step.hidden_div, tp_step.layers) == (4, 16, 8, 2)


def test_rank_shape_validates():
    with pytest.raises(ValueError, match="op"):
        bench.RankShape("mlp", "paper", "x", 1, 16)
    with pytest.raises(ValueError, match="positive"):
        bench.RankShape("attention", "paper", "x", 1, 16, heads=0)


def test_rank_counts():
    cfg = PRESETS["paper"]
    tp = bench.RankShape("experts", "paper", "tp8pp2 m1", 24, 2048, experts=16, hidden_div=8)
    assert int(bench.rank_counts(tp, cfg, seed=0).sum()) == 48  # every token-expert pair
    ma = bench.RankShape("experts", "paper", "sep 1x12+4 m1", 24, 2048, experts=4)
    counts = bench.rank_counts(ma, cfg, seed=0)
    assert counts.shape == (4,) and 0 < int(counts.sum()) <= 24
    fixed = bench.RankShape("experts", "paper", "x", 24, 2048, experts=4, tokens=10)
    assert bench.rank_counts(fixed, cfg, seed=0).tolist() == [3, 3, 2, 2]


def _row(**kw):
    row = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "date": "2026-01-01", "system": "masep",
           "impl": "graph+triton", "preset": "paper", "expert_matrices": 2, "batch": 24, "context": 2048,
           "tpot_ms_median": 7.2, "tpot_ms_p99": 7.4, "tps": 3333.0, "floor_ms": 6.8, "mbu": 0.94,
           "bytes_read": 20_500_000_000, "copy_bw_measured": 3.0e12, "experts_touched_mean": 15.3}
    row.update(kw)
    return row


def test_step_measurements_use_exactly_the_calibration_keys():
    rows = [_row(), _row(system="transformers"), _row(error="OutOfMemoryError")]
    (m,) = bench.step_measurements(rows)
    assert set(m) == CALIBRATION_KEYS
    assert (m["op"], m["plan"], m["tokens"], m["measured_ms"]) == ("step", "single", 48, 7.2)


def test_decode_markdown_lists_rows_and_errors():
    text = bench.decode_markdown([_row(), {**_row(system="transformers", batch=256), "error": "OutOfMemoryError: x"}])
    assert "NVIDIA H100" in text and "| masep | graph+triton | paper | 2 | 24 | 7.200" in text
    assert "OutOfMemoryError" in text


def test_cli_needs_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(SystemExit):
        bench.main(["decode", "--batch", "1"])


@pytest.mark.parametrize("experts_impl", ["grouped_mm", "eager"])
def test_hf_peer_gets_our_weights(experts_impl):
    """Same weights and the same cache give the same next-token logits in transformers
    (float32 on CPU: agreement to ~1e-5), with either of its experts implementations."""
    pytest.importorskip("transformers")
    cfg = PRESETS["tiny"].replace(num_layers=2, max_seq_len=64)
    model = build_model(cfg, seed=5)
    hf = bench.build_hf_mixtral(model)
    bench.set_hf_experts_impl(hf, experts_impl)
    assert hf.config._experts_implementation == experts_impl
    assert hf.dtype == torch.float32
    assert bench.hf_check(model, hf, context=20) < 1e-4


def test_routing_check_ignores_rows_whose_routing_flipped():
    ref = torch.randn(4, 10)
    got = ref.clone()
    got[2] += 5.0  # row 2 took another expert in one layer
    ids = [torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])]
    flipped = [torch.tensor([[1, 0], [2, 3], [4, 9], [6, 7]])]  # row 0: same set, other order
    out = bench.routing_check(ref, got, ids, flipped)
    assert out["routing_agreement"] == 0.75
    assert out["check_rel_err"] == 0.0 and out["check_rel_err_all_rows"] > 0.1


def test_energy_rows_sum_every_gpu_per_token_and_say_why_when_missing():
    from masep.parallel.bench_dist import _energy
    from masep.perf.energy import EnergyMeter
    ranks = [dict(rank=0, energy=dict(joules=30.0, seconds=1.0, mean_watts=30.0)),
             dict(rank=1, energy=dict(joules=10.0, seconds=1.2, mean_watts=8.3))]
    row = _energy(ranks, tokens=400)
    assert row["energy_joules"] == 40.0 and row["joules_per_token"] == 0.1 and row["energy_window_s"] == 1.2
    cpu = EnergyMeter(torch.device("cpu"))
    cpu.start()
    missing = cpu.stop()
    assert "cpu" in missing["unavailable"]
    row = _energy([ranks[0], dict(rank=1, energy=missing)], tokens=400)
    assert row["joules_per_token"] is None and "cpu" in row["energy_unavailable"]


def test_from_launch_time_is_the_slowest_ranks_per_step_median():
    """median_from_launch_ms: per step the slowest rank (a step ends when every rank's does),
    then the median over steps; absent when a timed rank has no launch time (no whole-step
    graph) or on an expert rank's empty report alone."""
    from masep.parallel.bench_dist import _from_launch_ms
    ranks = [dict(times_s=[5e-3] * 3, from_launch_s=[1e-3, 4e-3, 2e-3]),
             dict(times_s=[5e-3] * 3, from_launch_s=[3e-3, 1e-3, 2e-3]),
             dict(times_s=None, from_launch_s=None)]  # an expert rank: not timed
    assert _from_launch_ms(ranks) == {"median_from_launch_ms": 3.0}
    ranks[1]["from_launch_s"] = None
    assert _from_launch_ms(ranks) == {}


def _points_of_one_plan(plan):
    """Every rank of a gloo world runs three points of one plan on one sliced model and one set
    of groups; the middle point's KV cache is made not to fit (every rank agrees it does not)."""
    import torch.distributed as dist

    from masep.config import preset
    from masep.parallel import bench_dist
    from masep.parallel.groups import init_distributed
    from masep.parallel.worker import RunSpec
    env = init_distributed("cpu", 30.0)
    model = build_model(preset("tiny"), seed=0)
    run = RunSpec(plan=plan, requests=[], dtype="float32", device="cpu", timeout_s=30.0)
    specs = [bench_dist.DistBenchSpec(run, batch=b, context=c, warmup=1, steps=2) for b, c in ((4, 16), (6, 8), (3, 24))]
    real = bench_dist._check_cache_fits

    def second_does_not_fit(spec, runtime, rows, env):
        if spec.batch == 6:
            raise bench_dist.CacheDoesNotFit("planted: point 2 does not fit")
        real(spec, runtime, rows, env)

    bench_dist._check_cache_fits = second_does_not_fit
    rows = bench_dist.bench_points_on(env, specs, model)
    dist.destroy_process_group()
    return rows if env.rank == 0 else None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("plan_args", [("separated", (1, 1, 1, 2)), ("ep", (2, 2))], ids=["separated", "ep"])
def test_one_plans_points_share_its_groups_and_a_point_that_does_not_fit_is_a_row(plan_args):
    from masep.parallel.launch import spawn
    from masep.perf.costmodel import plan_from_dict
    from masep.plan import EpPlan, SeparatedPlan
    kind, args = plan_args
    plan = SeparatedPlan(*args) if kind == "separated" else EpPlan(*args)
    rows = spawn(2, _points_of_one_plan, plan, timeout_s=100)
    assert [(r["batch"], r["context"]) for r in rows] == [(4, 16), (6, 8), (3, 24)]
    assert "planted: point 2 does not fit" in rows[1]["error"]
    for r in (rows[0], rows[2]):
        assert r["strategy"] == kind and r["steps"] == 2 and r["median_tpot_ms"] > 0 and r["wall_s"] > 0
        assert plan_from_dict(r["plan"]).strategy == kind  # fields only (no cached hash): it reads back
