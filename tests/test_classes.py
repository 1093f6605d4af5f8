"""perf/classes.py: ranks of one class have equal costs, and simulating one rank per class gives the
full simulation's TPOT, floor and per-GPU numbers (uneven batches, head-parallel replicas, partly
filled nodes, replicated experts, two kinds of GPU, pipelines of uneven TP columns)."""
from __future__ import annotations

import pytest

from masep.config import preset
from masep.perf.classes import rank_classes
from masep.perf.costmodel import Workload, expert_tokens, part_size, rank_memory
from masep.perf.hardware import MixedHardware, get_profile
from masep.perf.simulator import all_costs, rank_ops, simulate
from masep.plan import EpPlan, SeparatedPlan, TpPpPlan

SMALL = preset("small")  # 16 heads, 16 experts, 4 layers
H100_4 = get_profile("h100").replace(gpus_per_node=4)
MIXED = MixedHardware(get_profile("h200").replace(gpus_per_node=4), get_profile("h100").replace(gpus_per_node=8))


def _replicated(ranks, experts=16):
    return tuple((j % experts,) for j in range(ranks))


CASES = [  # (plan, workload, hardware)
    (SeparatedPlan(6, 2, 5, 2), Workload(37, 300), H100_4),  # uneven batch, replicas across a shared node
    (SeparatedPlan(13, 1, 4, 3), Workload(50, 128), H100_4),
    (SeparatedPlan(3, 4, 21, 2, placement=_replicated(21)), Workload(29, 64), H100_4),  # experts held 1-2 times
    (SeparatedPlan(10, 1, 7, 2), Workload(64, 256), MIXED),
    (EpPlan(14, 2), Workload(45, 256, lm_head=False), H100_4),  # 2 ranks hold 2 experts; a 2-GPU node
    (EpPlan(36, 3, placement=_replicated(36)), Workload(100, 64), H100_4),  # local copies first, then s % c
    (TpPpPlan(2, 4, 2), Workload(16, 128), H100_4),
    (TpPpPlan(3, 4, 2), Workload(20, 128), H100_4),  # 6/5/5 heads; TP groups and neighbours across nodes
    (TpPpPlan(8, 4, 3), Workload(48, 256), get_profile("h100")),  # columns 1-7 alike: 8 ranks stand for 32
]


def _hw(plan, hw):
    return hw.bind(plan) if isinstance(hw, MixedHardware) else hw


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plan, work, hw", CASES)
def test_ranks_of_a_class_have_equal_costs_and_memory(plan, work, hw):
    hw = _hw(plan, hw)
    classes = rank_classes(plan, SMALL, work, hw)
    costs = all_costs(plan, SMALL, work, hw)
    for r in range(plan.world_size):
        rep = classes.reps[classes.class_of[r]]
        assert rank_ops(plan, SMALL, r) == rank_ops(plan, SMALL, rep)
        assert costs[r] == costs[rep], (r, rep)
        assert rank_memory(plan, SMALL, r, work, hw) == rank_memory(plan, SMALL, rep, work, hw)
    if plan.strategy != "tp_pp" or plan.tp == 8:
        assert len(classes.reps) <= plan.world_size / 2  # grouping happened


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plan, work, hw", CASES)
def test_one_rank_per_class_simulates_like_every_rank(plan, work, hw):
    hw = _hw(plan, hw)
    full = simulate(plan, SMALL, work, hw, grouped=False, check_fit=False)
    some = simulate(plan, SMALL, work, hw, grouped=True, check_fit=False)
    assert some.tpot_s == pytest.approx(full.tpot_s, rel=1e-12)
    assert some.floor_s == pytest.approx(full.floor_s, rel=1e-12)
    assert some.busy_fraction == pytest.approx(full.busy_fraction, rel=1e-12)
    assert some.kernel_active == pytest.approx(full.kernel_active, rel=1e-12)
    assert (some.hbm_bytes, some.flops) == pytest.approx((full.hbm_bytes, full.flops), rel=1e-12)
    assert some.op_times() == pytest.approx(full.op_times(), rel=1e-12)
    assert [m.total for m in some.memory] == [m.total for m in full.memory]


def _tokens_one_rank_at_a_time(plan, batch, rank, mb):
    """The reference: visit every source and ask which holder serves it (the plans' `holder` rule)."""
    placement = plan.expert_placement(SMALL)
    if plan.strategy == "ep":
        sources = [(s, part_size(part_size(batch, plan.ep, s), plan.microbatches, mb)) for s in range(plan.ep)]
        return tuple(float(sum(n for s, n in sources if plan.holder(SMALL, e, s) == rank)) for e in placement[rank])
    j = rank - plan.num_attention_ranks
    sources = [(r, part_size(part_size(batch, plan.attn_replicas, r), plan.microbatches, mb))
               for r in range(plan.attn_replicas)]
    return tuple(float(sum(n for r, n in sources if plan.holder(SMALL, e, r) == j)) for e in placement[j])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("plan, batch", [(EpPlan(36, 3, placement=_replicated(36)), 100), (EpPlan(5, 2), 17),
                                         (EpPlan(20, 1, placement=_replicated(20)), 7),
                                         (SeparatedPlan(7, 1, 21, 2, placement=_replicated(21)), 45),
                                         (SeparatedPlan(3, 2, 5, 3), 31)])
def test_routed_tokens_of_every_rank_at_once_match_one_rank_at_a_time(plan, batch):
    first = plan.num_attention_ranks if plan.strategy == "separated" else 0
    for mb in range(plan.microbatches):
        for rank in range(first, plan.world_size):
            assert expert_tokens(plan, SMALL, batch, rank, mb) == _tokens_one_rank_at_a_time(plan, batch, rank, mb)
