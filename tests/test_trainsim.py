"""The training step's cost model and simulator (perf/traincost.py, perf/trainsim.py) and `masep plan --train`."""
import dataclasses
import json

import pytest

from masep.cli import main
from masep.config import preset
from masep.parallel import schedule as S
from masep.perf.hardware import load_hardware
from masep.perf.traincost import TrainWorkload, rank_params, train_op_cost
from masep.perf.trainsim import search_train, simulate_train, train_rank_ops
from masep.plan import EpPlan, SeparatedPlan, SinglePlan, TpPpPlan

CFG = dataclasses.replace(preset("paper"), num_layers=4, dtype="bfloat16")
HW = load_hardware("h200")
PLANS = [SinglePlan(2), SeparatedPlan(2, 2, 2, 2), SeparatedPlan(3, 1, 1, 1), SeparatedPlan(1, 3, 2, 2),
         TpPpPlan(2, 2, 2), TpPpPlan(4, 1, 1), EpPlan(4, 2), EpPlan(3, 1)]


def test_expert_ranks_follow_the_attention_bridge_order_in_training():
    """Each group of the bridge sees one order on both sides: rows and output gradients go on
    the first group, outputs and input gradients come back on the second."""
    attention = S.train_separated_schedule("attention", 3, 2)
    expert = S.train_separated_schedule("expert", 3, 2)
    for kinds in (("a2e", "a2e_grad"), ("e2a", "e2a_grad")):
        sides = [[c for c in S.comm_sequence(ops) if c[0] in kinds] for ops in (attention, expert)]
        assert sides[0] == sides[1] and sides[0]
    # the micro-batches interleave at every transfer, forward and backward (last one first)
    seq = S.comm_sequence(attention)
    assert seq[:4] == [("a2e", 0, 0), ("a2e", 0, 1), ("e2a", 0, 0), ("a2e", 1, 0)]
    first_grad = [k for k, _, _ in seq].index("a2e_grad")
    assert first_grad == 2 * 3 * 2 and seq[first_grad:first_grad + 2] == [("a2e_grad", 2, 1), ("a2e_grad", 2, 0)]
    assert expert[:3] == [S.Op(S.RECV, 0, 0), S.Op(S.EXPERTS, 0, 0), S.Op(S.SEND, 0, 0)]
    assert expert[-2:] == [S.Op(S.GRAD_SYNC), S.Op(S.OPTIMIZER)]


def test_interleaved_micro_batches_overlap_attention_and_experts():
    """Separated with m = 2 hides part of one side's work under the other's: the step is shorter
    than the same plan with m = 1 at the same batch (where each side waits for the other)."""
    work = TrainWorkload(8, 512)
    one, two = (simulate_train(SeparatedPlan(1, 1, 1, m), CFG, work, HW, check_fit=False) for m in (1, 2))
    assert two.step_s < one.step_s


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: str(p))
def test_every_plan_simulates_at_or_above_its_floor(plan):
    sim = simulate_train(plan, CFG, TrainWorkload(12, 512), HW, check_fit=False)
    assert sim.step_s >= sim.floor_s > 0
    # each rank runs every op of its schedule exactly once
    assert len(sim.records) == sum(len(train_rank_ops(plan, CFG, r)) for r in range(plan.world_size))


def _forward_flops(cfg, tokens: int, seq_len: int) -> float:
    """2 x tokens x active parameters (attention projections, router, k experts, lm_head) plus
    causal attention (QK^T and PV over seq_len / 2 keys on average)."""
    h, d = cfg.hidden_size, cfg.head_dim
    per_layer = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_experts * h \
        + cfg.top_k * cfg.expert_params()
    matmuls = 2 * tokens * (cfg.num_layers * per_layer + cfg.vocab_size * h)
    return matmuls + cfg.num_layers * 2 * tokens * seq_len * d * cfg.num_heads


@pytest.mark.parametrize("plan", [SinglePlan(), SeparatedPlan(2, 2, 2, 2), EpPlan(4, 2), TpPpPlan(2, 2, 2)],
                         ids=lambda p: str(p))
def test_step_flops_are_three_forwards_of_the_model(plan):
    """Backward = 2 x forward, whatever the split (separated duplicates the head on each head rank)."""
    work = TrainWorkload(8, 256)
    sim = simulate_train(plan, CFG, work, HW, check_fit=False)
    expected = 3 * _forward_flops(CFG, work.tokens, work.seq_len)
    if plan.strategy == "separated":  # every head-parallel rank computes its replica's full lm_head
        expected += 3 * (plan.attn_tp - 1) * 2 * work.tokens * CFG.vocab_size * CFG.hidden_size
    if plan.strategy == "tp_pp":  # every TP rank routes all of the stage's tokens and the last stage's run the head
        expected += 3 * (plan.tp - 1) * 2 * work.tokens * CFG.hidden_size * (CFG.num_experts * CFG.num_layers
                                                                            + CFG.vocab_size)
    assert sim.flops == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: str(p))
def test_each_parameter_is_held_once_per_member_of_its_sync_set(plan):
    """Summed over ranks, parameters / size of their sync set = the model's parameters (a
    head-parallel or EP split neither loses nor double-counts a tensor)."""
    total = 0.0
    for r in range(plan.world_size):
        for ranks, n in rank_params(plan, CFG, r).items():
            assert r in ranks
            total += n / len(ranks)
    h, d = CFG.hidden_size, CFG.head_dim
    model = CFG.num_layers * (h * d * (2 * CFG.num_heads + 2 * CFG.num_kv_heads) + 2 * h + CFG.num_experts * h
                              + CFG.num_experts * CFG.expert_params()) + 2 * CFG.vocab_size * h
    t = plan.attn_tp if plan.strategy == "separated" else plan.tp if plan.strategy == "tp_pp" else 1
    if t > 1:
        # copies the runtime keeps on purpose: every head-parallel rank holds the embedding,
        # lm_head and norms in full, and a KV head read by two slices is on both
        from masep.perf.costmodel import kv_heads_for
        straddled = sum(kv_heads_for(CFG, heads) for heads in plan.head_split(CFG)) - CFG.num_kv_heads
        model += (t - 1) * (2 * CFG.vocab_size * h + CFG.num_layers * 2 * h) + CFG.num_layers * straddled * 2 * h * d
    assert total == pytest.approx(model, rel=1e-9)


def test_gradient_sync_uses_the_node_hierarchy_and_int8_cuts_cross_node_time():
    plan = EpPlan(4, 1)
    two_nodes = HW.replace(gpus_per_node=2)
    flat = train_op_cost(S.GRAD_SYNC, -1, plan, 0, CFG, TrainWorkload(8, 256), HW.replace(gpus_per_node=1))
    hier = train_op_cost(S.GRAD_SYNC, -1, plan, 0, CFG, TrainWorkload(8, 256), two_nodes)
    int8 = train_op_cost(S.GRAD_SYNC, -1, plan, 0, CFG, TrainWorkload(8, 256, "int8"), two_nodes)
    one_node = train_op_cost(S.GRAD_SYNC, -1, plan, 0, CFG, TrainWorkload(8, 256), HW)
    assert one_node.transfer_s < hier.transfer_s < flat.transfer_s
    assert int8.transfer_s < hier.transfer_s


def test_planner_rejects_what_does_not_fit_and_ranks_by_tokens_per_s():
    ranked, rejected, candidates = search_train(preset("paper"), HW, 4, TrainWorkload(64, 2048), top=1000)
    assert rejected and all("does not fit for training" in why for _, why in rejected)
    assert len(ranked) + len(rejected) == candidates
    tps = [s.tokens_per_s for s in ranked]
    assert tps == sorted(tps, reverse=True)


def test_plan_train_cli(capsys):
    assert main(["plan", "--train", "--preset", "tiny", "--gpus", "2", "--batch", "4", "--seq-len", "64",
                 "--hardware", "h200", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows"] and doc["rows"][0]["tokens_per_step"] == 256
    assert main(["plan", "--train", "--preset", "tiny", "--gpus", "2", "--tpot-limit-ms", "5"]) == 2
    assert "--tpot-limit-ms is a decode limit" in capsys.readouterr().err
