"""perf/floor.py: a plan's floor is a lower bound the simulator never goes below, at the plan's m.

The property that failed before (the simulator predicted TP8xPP8 of a Qwen3-MoE-like model on 64
H200s at 0.88x its floor, because that floor summed the stages of one micro-batch while m > 1
pipelines overlap them) is checked over many plans and workloads; a floor with the old, wrong
definition must fail the same check (so the check can fail).
"""
from __future__ import annotations

import dataclasses

import pytest

from masep.config import from_hf_dict, preset
from masep.parallel.schedule import ATTENTION, EXPERTS, HEAD
from masep.perf.costmodel import Workload, op_cost
from masep.perf.floor import Rates, plan_floor
from masep.perf.hardware import get_profile
from masep.perf.simulator import rank_ops, simulate
from masep.plan import EpPlan, SeparatedPlan, SinglePlan, TpPpPlan

# Qwen3-235B-A22B's shape (config.json fields; the weights are never built)
QWEN3 = from_hf_dict(dict(
    model_type="qwen3_moe", hidden_size=4096, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
    num_hidden_layers=94, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536, vocab_size=151936,
    rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960, torch_dtype="bfloat16", hidden_act="silu",
    norm_topk_prob=True))
PAPER = preset("paper")
NO_TRANSFERS = {}  # Rates.transfer_s: every transfer counts 0

CASES = [  # (model, hardware, plan, workload)
    (QWEN3, "h200", TpPpPlan(8, 8, 4), Workload(512, 8192)),  # was 0.88x the old floor
    (QWEN3, "h200", TpPpPlan(8, 8, 8), Workload(128, 32768, lm_head=False)),
    (QWEN3, "h200", TpPpPlan(8, 8, 2), Workload(256, 2048)),
    (PAPER, "a100-80g", TpPpPlan(8, 2, 1), Workload(24, 2048)),
    (PAPER, "a100-80g", TpPpPlan(8, 2, 3), Workload(24, 2048)),
    (PAPER, "a100-80g", TpPpPlan(2, 4, 4), Workload(256, 8192, lm_head=False)),
    (PAPER, "h200", TpPpPlan(1, 4, 4), Workload(64, 16384)),
    (PAPER, "a100-80g", SeparatedPlan(12, 1, 4, 2), Workload(24, 2048)),
    (PAPER, "a100-80g", SeparatedPlan(3, 4, 4, 3), Workload(96, 2048)),
    (PAPER, "h200", SeparatedPlan(2, 1, 2, 4), Workload(512, 4096)),
    (PAPER, "h200", SeparatedPlan(1, 1, 1, 2), Workload(24, 2048)),
    (PAPER, "a100-80g", EpPlan(16, 2), Workload(24, 2048)),
    (PAPER, "h200", EpPlan(4, 3), Workload(256, 8192)),
    (PAPER, "h200", SinglePlan(), Workload(24, 2048)),
    (PAPER, "h200", SinglePlan(2), Workload(128, 2048)),
]


def _violations(floor_fn, overlap=True) -> list[str]:
    out = []
    for cfg, hw_name, plan, work in CASES:
        hw = get_profile(hw_name)
        tpot = simulate(plan, cfg, work, hw, overlap=overlap, check_fit=False).tpot_s
        floor = floor_fn(plan, cfg, work, hw)
        if tpot < floor * (1 - 1e-9):
            out.append(f"{plan} {work}: simulated {tpot * 1e3:.3f} ms < floor {floor * 1e3:.3f} ms")
    return out


@pytest.mark.timeout(60)
def test_simulated_step_is_never_below_the_floor():
    assert _violations(lambda *a: plan_floor(*a).seconds) == []
    assert _violations(lambda *a: plan_floor(*a).seconds, overlap=False) == []


@pytest.mark.timeout(60)
def test_a_floor_with_experts_read_once_per_step_fails_the_check():
    """The old definition (one micro-batch's bytes, stages summed) is not a bound once m > 1."""
    def one_microbatch(plan, cfg, work, hw):
        return plan_floor(dataclasses.replace(plan, microbatches=1), cfg, work, hw,
                          Rates(hw.hbm_bytes_per_s, transfer_s=NO_TRANSFERS)).seconds
    bad = _violations(one_microbatch)
    assert any("TpPpPlan(tp=8, pp=8, microbatches=4" in v for v in bad), bad


def _stage_sum(plan, cfg, work, hw, rates) -> float:
    """Sum over stages of the slowest rank's compute ops, each at max(bytes / bw, FLOPs / peak)."""
    def rank_s(r):
        return sum(rates.op_s(c.hbm_bytes, c.flops) for c in
                   (op_cost(o.kind, o.layer, o.mb, plan, r, cfg, work, hw) for o in rank_ops(plan, cfg, r)
                    if o.kind in (ATTENTION, EXPERTS, HEAD)))
    return sum(max(rank_s(s * plan.tp + t) for t in range(plan.tp)) for s in range(plan.pp))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cfg, plan, work", [
    (PAPER, TpPpPlan(8, 2, 1), Workload(24, 2048, lm_head=False)),
    (PAPER, TpPpPlan(2, 4, 1), Workload(64, 4096)),
    (QWEN3, TpPpPlan(8, 8, 1), Workload(512, 8192)),
])
def test_pipeline_floor_at_one_microbatch_is_the_sum_of_its_stages(cfg, plan, work):
    hw = get_profile("h200")
    bare = Rates(hw.hbm_bytes_per_s, hw.matmul_flops_per_s, transfer_s=NO_TRANSFERS)
    assert plan_floor(plan, cfg, work, hw, bare).seconds == pytest.approx(_stage_sum(plan, cfg, work, hw, bare),
                                                                         rel=1e-9)
    # with the transfers in line (all-reduces, stage boundaries, the logits broadcast) it can only grow
    assert plan_floor(plan, cfg, work, hw).seconds > _stage_sum(plan, cfg, work, hw, Rates.spec(hw))


@pytest.mark.timeout(20)
def test_hand_checked_floors_of_the_paper_model():
    """docs/reference.md, batch 24, context 2048, no lm_head, A100 at 2.039 TB/s: TP8xPP2 (m = 1) streams
    one stage of 8 GPUs at a time: 1.24 ms. 12+4 (m = 1): each expert GPU reads 15.35/16 of its 4
    experts x 4 layers = 4 x 15.35/16 x 4 x 268.4 MB = 4.12 GB: 2.02 ms of work, and one layer's
    attention must come before it; with one micro-batch attention and experts alternate, so the
    micro-batch's chain (all attention + all experts) binds."""
    a100, work = get_profile("a100-80g"), Workload(24, 2048, lm_head=False)
    bare = Rates(a100.hbm_bytes_per_s, a100.matmul_flops_per_s, transfer_s=NO_TRANSFERS)
    assert plan_floor(TpPpPlan(8, 2, 1), PAPER, work, a100, bare).seconds * 1e3 == pytest.approx(1.24, abs=0.005)
    f = plan_floor(SeparatedPlan(12, 1, 4, 1), PAPER, work, a100, bare)
    assert f.rank >= 12  # an expert GPU has the most work; at m = 1 nothing overlaps, so the chain binds
    assert f.binds == "chain" and f.seconds > f.pre_s + f.work_s + f.post_s
    expert_bytes = 4 * 4 * (1 - (14 / 16) ** 24) * PAPER.expert_params() * 2  # layers x experts x P(touched)
    assert f.bytes == pytest.approx(expert_bytes + 4 * 2 * (24 * 2 / 16) * 4 * PAPER.hidden_size * 2, rel=1e-9)
    assert f.work_s * 1e3 == pytest.approx(2.02, abs=0.005)
    assert f.pre_s > 0
    # two micro-batches of 12 re-read what each touches (12.1 of 16): more than 2.02 ms of bytes
    f2 = plan_floor(SeparatedPlan(12, 1, 4, 2), PAPER, work, a100, bare)
    assert f2.work_s * 1e3 == pytest.approx(2 * 4 * 16 * (1 - (14 / 16) ** 12) / 16 * 4 * 268.4e6
                                            / a100.hbm_bytes_per_s * 1e3, rel=0.01)


@pytest.mark.timeout(20)
def test_a_tiny_pipeline_by_hand():
    """tp1pp2, m = 2, batch 2, no transfers: stage s's work per micro-batch a (stage 0), b (stage 1,
    without the lm_head), h (the lm_head, once, after both micro-batches): the floor is
    max(fill a + stage 1's 2b + h, stage 0's 2a + drain b + h)."""
    cfg, hw, work = preset("tiny"), get_profile("h200"), Workload(2, 16)
    plan = TpPpPlan(1, 2, 2)
    rates = Rates(hw.hbm_bytes_per_s, transfer_s=NO_TRANSFERS)

    def s(kind, mb, rank, lm_head=True):
        c = op_cost(kind, 0, mb, plan, rank, cfg, dataclasses.replace(work, lm_head=lm_head), hw)
        return c.hbm_bytes / hw.hbm_bytes_per_s
    layers = cfg.num_layers // 2
    a = layers * (s(ATTENTION, 0, 0) + s(EXPERTS, 0, 0))
    b = layers * (s(ATTENTION, 0, 1) + s(EXPERTS, 0, 1)) + s(HEAD, 0, 1)  # final norm of one micro-batch
    h = s(HEAD, 1, 1) - s(HEAD, 0, 1)  # the lm_head rides on the last micro-batch's head op
    got = plan_floor(plan, cfg, work, hw, rates)
    assert got.seconds == pytest.approx(max(a + 2 * b + h, 2 * a + b + h), rel=1e-9)


@pytest.mark.timeout(20)
def test_measured_rates_and_routing():
    """Benchmarks pass their measured copy bandwidth, matmul rate, collective times and touched experts."""
    cfg, hw, work = PAPER, get_profile("h200"), Workload(24, 2048)
    spec = plan_floor(SinglePlan(), cfg, work, hw)
    slower = plan_floor(SinglePlan(), cfg, work, hw, Rates(hw.hbm_bytes_per_s / 2, transfer_s=NO_TRANSFERS))
    assert slower.seconds == pytest.approx(2 * spec.seconds, rel=1e-6)  # one GPU: bytes-bound, no transfers
    fewer = plan_floor(SinglePlan(), cfg, work, hw, experts_touched_per_layer=8.0)
    assert fewer.bytes == pytest.approx(spec.bytes - 4 * (15.35 - 8.0) * cfg.expert_params() * 2, rel=1e-3)
    tp = TpPpPlan(2, 1, 1)
    assert plan_floor(tp, cfg, work, hw, Rates(4.3e12, 700e12, {"allreduce": 1e-4})).transfer_s == \
        pytest.approx(2 * cfg.num_layers * 1e-4)
    with pytest.raises(ValueError, match="hbm_bytes_per_s"):
        Rates(0.0)
