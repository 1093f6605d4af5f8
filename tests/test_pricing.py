"""Cost per million output tokens (perf/pricing.py) and plans over two GPU kinds (MixedHardware,
perf/kinds.py, `masep plan --price/--kinds/--attn-hardware/--expert-hardware`)."""
import json

import pytest

from masep.config import ModelConfig, preset
from masep.perf.costmodel import Workload
from masep.perf.hardware import GiB, Hardware, MixedHardware, get_profile
from masep.perf.kinds import Choice, option_label, search_options
from masep.perf.pricing import parse_prices, plan_cost, usd_per_hour, usd_per_million_tokens
from masep.perf.simulator import simulate
from test_planner import _run  # the `masep plan` / `simulate` CLI in-process
from masep.plan import EpPlan, SeparatedPlan

# Two made-up kinds, each better at one group's work: `bw` streams HBM 8x faster (attention reads the KV
# cache), `fl` multiplies 67x faster (at 1024 sequences, top-2 of 4 experts, the experts are compute-bound).
BW = Hardware("bw", hbm_bytes_per_s=8e12, hbm_efficiency=0.9, matmul_flops_per_s=30e12, matmul_efficiency=0.8,
              memory_bytes=80 * GiB)
FL = Hardware("fl", hbm_bytes_per_s=1e12, hbm_efficiency=0.9, matmul_flops_per_s=2000e12, matmul_efficiency=0.8,
              memory_bytes=80 * GiB)
MODEL = ModelConfig(name="two-kinds", vocab_size=1024, hidden_size=2048, num_layers=2, num_heads=16, num_kv_heads=2,
                    head_dim=128, num_experts=4, top_k=2, expert_hidden=8192, dtype="bfloat16", max_seq_len=8192)


def _options(a, b):
    return [(option_label(p), p) for p in (a, b)] + [(option_label(m), m) for m in (MixedHardware(a, b),
                                                                                      MixedHardware(b, a))]


def _cheapest(a, b, prices, gpus=8):
    rows = search_options(MODEL, Choice(a, _options(a, b), ("separated", "ep", "tp_pp"), prices), gpus,
                          Workload(1, 4096), 1.0, max_batch=1024, max_microbatches=2, overlap=True)
    return [(label, plan_cost(sim, prices)["usd_per_m_output_tokens"]) for label, sim in rows]


def test_cost_per_million_tokens_is_price_times_gpus_over_tokens_per_hour():
    # 8 GPUs at $2.50 an hour making 1,000 tokens/s: $20 for 3.6 M tokens = $5.5556 per million
    assert usd_per_million_tokens(8 * 2.5, 1000.0) == pytest.approx(20 / 3.6)
    # a split pays each group's kind: 3 attention GPUs at $3.40 + 1 expert GPU at $2.10 = $12.30 an hour
    hw = MixedHardware(get_profile("h200"), get_profile("h100")).bind(SeparatedPlan(3, 1, 1, 2))
    prices = {"h100": 2.1, "h200": 3.4}
    assert usd_per_hour(hw, 4, prices) == pytest.approx(12.3)
    sim = simulate(SeparatedPlan(3, 1, 1, 2), preset("paper"), Workload(24, 2048), hw)
    assert plan_cost(sim, prices) == pytest.approx(dict(usd_per_hour=12.3,
                                                       usd_per_m_output_tokens=12.3 / (sim.tps * 3600) * 1e6))


@pytest.mark.timeout(60)
def test_a_split_wins_when_each_kind_suits_one_group():
    """Attention on the cheap high-bandwidth kind, experts on the compute kind: cheaper per token than either
    kind alone (or the split the other way round)."""
    rows = _cheapest(BW, FL, {"bw": 1.0, "fl": 2.0})
    assert rows[0][0] == "attention bw + experts fl"
    assert rows[0][1] < 0.9 * min(cost for label, cost in rows if "only" in label)
    assert rows[-1][0] == "attention fl + experts bw"


@pytest.mark.timeout(60)
def test_a_split_does_not_win_when_one_kind_is_only_cheaper():
    """Same hardware at two prices: the cheaper kind alone beats any split (same plans, same speed, less paid)."""
    cheap, dear = BW.replace(name="cheap"), BW.replace(name="dear")
    rows = _cheapest(cheap, dear, {"cheap": 1.0, "dear": 1.5}, gpus=4)
    assert rows[0][0] == "cheap only"
    assert all(cost > rows[0][1] for label, cost in rows[1:] if label.startswith("attention"))


def test_bad_prices_are_refused_with_the_rule():
    assert parse_prices("h100=2.1, a100=1.5") == {"h100": 2.1, "a100-80g": 1.5}  # an alias names its profile
    for text, rule in (("h100", "not KIND=USD"), ("h100=x", "not a number"), ("h100=0", "positive"),
                       ("h100=inf", "positive"), ("h100=1,h100=2", "priced twice"), ("=3", "not KIND=USD")):
        with pytest.raises(ValueError, match=rule):
            parse_prices(text)
    with pytest.raises(ValueError, match="no price for h200"):
        usd_per_hour(get_profile("h200"), 2, {"h100": 2.0})
    with pytest.raises(ValueError, match="needs a separated plan"):
        MixedHardware(BW, FL).bind(EpPlan(2, 1))
    with pytest.raises(ValueError, match="not bound to a plan"):
        MixedHardware(BW, FL).for_rank(0)


@pytest.mark.timeout(60)
def test_plan_kinds_lists_each_option_cheapest_first(capsys):
    argv = ["plan", "--preset", "small", "--gpus", "4", "--kinds", "h100,h200", "--price", "h100=2.1,h200=3.4",
            "--tpot-limit-ms", "5", "--max-batch", "64", "--max-microbatches", "2", "--json"]
    assert _run(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {r["hardware_option"] for r in rows} == {"h100 only", "h200 only", "attention h100 + experts h200",
                                                    "attention h200 + experts h100"}
    costs = [r["usd_per_m_output_tokens"] for r in rows]
    assert costs == sorted(costs)
    for r in rows:  # each row's cost is its GPUs' prices over its tokens per hour
        assert r["usd_per_m_output_tokens"] == pytest.approx(r["usd_per_hour"] / (r["tps"] * 3600) * 1e6)
        assert r["tpot_ms"] <= 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flags, message", [
    (["--kinds", "h100,h200", "--tpot-limit-ms", "5"], "give --price and --tpot-limit-ms"),
    (["--kinds", "h100", "--price", "h100=2", "--tpot-limit-ms", "5"], "two or more different profiles"),
    (["--kinds", "h100,h200", "--price", "h100=2", "--tpot-limit-ms", "5"], "no price for h200"),
    (["--kinds", "h100,h200", "--attn-hardware", "h100", "--price", "h100=2,h200=3", "--tpot-limit-ms", "5"],
     "leave out --attn-hardware"),
    (["--attn-hardware", "h200", "--hardware", "h100", "--strategies", "ep"], "is a separated plan"),
    (["--attn-hardware", "h100", "--hardware", "h100"], "both groups on h100"),
    (["--attn-hardware", "h200", "--calibration", "{cal}"], "--calibration fits one profile"),
    (["--price", "h100=-2", "--hardware", "h100"], "positive number"),
    (["--attn-hardware", "nosuch"], "not a built-in profile"),
])
def test_plan_hardware_flags_refuse_bad_input(capsys, tmp_path, flags, message):
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"hbm_copy_bytes_per_s": 3e12, "matmul_flops_per_s": 7e14}))
    assert _run(["plan", "--preset", "small", "--gpus", "4", *(f.format(cal=cal) for f in flags)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_plan_on_a_fixed_split_reports_its_cost(capsys):
    argv = ["plan", "--preset", "small", "--gpus", "4", "--hardware", "h100", "--attn-hardware", "h200",
            "--price", "h100=2,h200=3", "--batch", "32", "--top", "2", "--json"]
    assert _run(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    links = doc["meta"]["hardware"]["links"]  # every output states the links it assumed
    assert links["between_groups_gb_s_per_gpu"] == 50 and "NDR InfiniBand" in links["attention"]["links"]
    rows = doc["rows"]
    for r in rows:
        assert r["strategy"] == "separated" and r["hardware"] == "h200 (attention) + h100 (experts)"
        attention = r["plan_fields"]["attn_replicas"] * r["plan_fields"]["attn_tp"]
        assert r["usd_per_hour"] == pytest.approx(3 * attention + 2 * (4 - attention))
