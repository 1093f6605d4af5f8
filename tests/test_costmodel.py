"""Cost model and hardware profiles: hand-computed bytes, FLOPs and times for a one-layer toy,
the reference numbers of the paper model, memory rejection, calibration fits."""
import json

import pytest

from masep.config import ModelConfig, preset
from masep.plan import SeparatedPlan, TpPpPlan
from masep.perf import costmodel as cm
from masep.perf.costmodel import Workload
from masep.perf.hardware import Hardware, apply_calibration, get_profile, load_hardware, profile_from_dict

# One layer, bf16 (2 bytes), 4 heads of 16 (no GQA), 4 experts top-2, 2-matrix experts.
TOY = ModelConfig(name="toy", vocab_size=100, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                  head_dim=16, num_experts=4, top_k=2, expert_hidden=128, expert_act="gelu", dtype="bfloat16")
# Round numbers so every time below is checkable by hand: 1 TB/s, 1 TFLOP/s, 1 us per op,
# 100 GB/s and 1 us per NVLink step, 10 GB/s and 10 us between nodes of 2 GPUs.
HW = Hardware("toy", hbm_bytes_per_s=1e12, hbm_efficiency=1.0, matmul_flops_per_s=1e12, matmul_efficiency=1.0,
              memory_bytes=1 << 30, reserved_bytes=0, gpus_per_node=2, nvlink_bytes_per_s=1e11,
              nvlink_latency_s=1e-6, internode_bytes_per_s=1e10, internode_latency_s=1e-5,
              op_latency_s={"attention": 1e-6, "experts": 1e-6, "head": 1e-6})


@pytest.mark.timeout(10)
def test_attention_cost_by_hand():
    c = cm.attention_cost(TOY, HW, tokens=2, context=10, heads=4, kv_heads=4)
    weights = (64 * 16 * (2 * 4 + 2 * 4) + 4 * 64 + 2 * 64) * 2  # q,k,v,o + router + 2 norms = 33,536 B
    kv = 2 * 10 * 2 * 4 * 16 * 2  # tokens x keys x (k, v) x kv heads x head dim x 2 B = 5,120 B
    act = 2 * 2 * 64 * 2  # read and write one row per token = 512 B
    flops = 2 * 2 * 64 * 16 * 16 + 4 * 2 * 4 * 10 * 16 + 2 * 2 * 64 * 4  # proj + QK^T/PV + router = 71,680
    assert (c.weight_bytes, c.kv_bytes, c.hbm_bytes, c.flops) == (weights, kv, weights + kv + act, flops)
    # 39,168 B at 1 TB/s = 39.2 ns < 71,680 FLOP at 1 TFLOP/s = 71.7 ns: compute-bound, + 1 us latency
    assert c.compute_s == pytest.approx(71_680e-12 + 1e-6, rel=1e-12)
    assert cm.attention_cost(TOY, HW, 0, 10, 4, 4).time_s == 0.0  # an empty micro-batch costs nothing


@pytest.mark.timeout(10)
def test_experts_cost_by_hand():
    # 2 held experts, each reachable by 3 tokens; each token picks an expert with p = k/E = 1/2
    c = cm.experts_cost(TOY, HW, (3.0, 3.0))
    touched = 2 * (1 - 0.5 ** 3)  # 1.75 experts expected
    weights = touched * 2 * 64 * 128 * 2  # 2 matrices of 64 x 128 in bf16 per expert = 57,344 B
    rows = 2 * 3 * 0.5  # 3 token-expert rows
    assert c.weight_bytes == pytest.approx(weights)
    assert c.hbm_bytes == pytest.approx(weights + 2 * rows * 64 * 2)
    assert c.flops == pytest.approx(2 * rows * 2 * 64 * 128)
    assert c.compute_s == pytest.approx(max(c.hbm_bytes, c.flops) * 1e-12 + 1e-6)
    # hidden split 2 ways (tp): half the bytes of weights and half the FLOPs
    half = cm.experts_cost(TOY, HW, (3.0, 3.0), hidden_div=2)
    assert half.weight_bytes == pytest.approx(weights / 2) and half.flops == pytest.approx(c.flops / 2)


@pytest.mark.timeout(10)
def test_experts_touched_matches_reference():
    paper = preset("paper")
    # REFERENCE.md: 16 (1 - (14/16)^B) = 2.0 (B=1), 10.5 (B=8), 15.35 (B=24), 16 (B >= 64)
    assert [round(cm.experts_touched(paper, b), 2) for b in (1, 8, 24)] == [2.0, 10.5, 15.35]
    assert cm.experts_touched(paper, 64) == pytest.approx(16, abs=0.01)


@pytest.mark.timeout(10)
def test_links_by_hand():
    # ring all-reduce of 1,000 B over 2 GPUs of one node: 2(n-1) latencies + 2(n-1)/n bytes / bandwidth
    assert cm.allreduce_s(HW, (0, 1), 1000) == pytest.approx(2 * 1e-6 + 1000 / 1e11)
    # over 4 GPUs on 2 nodes: the NIC's bandwidth and latency
    assert cm.allreduce_s(HW, (0, 1, 2, 3), 1000) == pytest.approx(6 * 1e-5 + 1.5 * 1000 / 1e10)
    # rank 0 sends 3,000 B split evenly to ranks 1 (same node), 2 and 3 (other node), counts + payload:
    # 2 round trips x max(1 near peer x 1 us, 2 far peers x 10 us) + max(1000 B / 100 GB/s, 2000 B / 10 GB/s)
    t = cm.link_time(HW, 0, {1: 1.0, 2: 1.0, 3: 1.0}, 3000, round_trips=2)
    assert t == pytest.approx(2 * 2e-5 + 2000 / 1e10)
    assert cm.link_time(HW, 0, {0: 1.0}, 3000) == 0.0  # bytes to itself stay in HBM


@pytest.mark.timeout(10)
def test_op_cost_of_a_separated_plan_by_hand():
    # 1 replica x 2 head-parallel ranks (ranks 0, 1: node 0) + 2 expert ranks (2, 3: node 1); batch 4, m = 1
    plan, work = SeparatedPlan(1, 2, 2, microbatches=1), Workload(batch=4, context=10)
    attn = cm.op_cost("attention", 0, 0, plan, 0, TOY, work, HW)
    alone = cm.attention_cost(TOY, HW, tokens=4, context=10, heads=2, kv_heads=2)
    assert attn.compute_s == alone.compute_s and attn.hbm_bytes == alone.hbm_bytes
    assert attn.transfer_s == pytest.approx(2e-6 + 4 * 64 * 2 / 1e11)  # all-reduce of 4 rows in the replica
    # expert rank 2 holds expert 0 and 1, each reachable by all 4 tokens
    assert cm.expert_tokens(plan, TOY, 4, 2, 0) == (4.0, 4.0)
    ex = cm.op_cost("experts", 0, 0, plan, 2, TOY, work, HW)
    assert ex.hbm_bytes == cm.experts_cost(TOY, HW, (4.0, 4.0)).hbm_bytes
    # dispatch from rank 0 moves padded blocks (parallel/routing.py) sized from the routing
    # (parallel/capacity.py): top-2 of 4 experts, 2 per expert rank, is 1 row per token to the
    # fullest rank on average; x 1.5 for 2 tokens = 3 payload rows (the worst case, 2 tokens x
    # min(2, 2), would be 4) + 1 header row (7 int64), x 64 x 2 B, to each of ranks 2 and 3 (other
    # node): 1,024 B in one round trip (the counts ride in the header), 256 B less than worst-case blocks
    d = cm.op_cost("dispatch", 0, 0, plan, 0, TOY, work, HW)
    assert d.link_bytes == 1024 and d.transfer_s == pytest.approx(2 * 1e-5 + 1024 / 1e10)
    assert d.link_bytes_saved == 2 * 1 * 64 * 2
    # combine: the 3 payload rows back from each, then the all-gather of the replica's 4 rows
    c = cm.op_cost("combine", 0, 0, plan, 0, TOY, work, HW)
    assert c.link_bytes == 768 and c.transfer_s == pytest.approx(2 * 1e-5 + 768 / 1e10)
    assert c.post_s == pytest.approx(1e-6 + 0.5 * 4 * 64 * 2 / 1e11)


@pytest.mark.timeout(10)
def test_expert_weights_are_read_once_per_microbatch_for_every_replica():
    # sep 2x1+1 m1, batch 8: 4 tokens per replica reach the one expert rank's 4 experts in the same
    # (layer, micro-batch). It runs one grouped matmul over all 8 (separated.py), so each expert's
    # weights are read if any of the 8 tokens picked it: 4 x (1 - (1/2)^8) experts, not
    # 2 x 4 x (1 - (1/2)^4) (serving each replica apart)
    plan, work = SeparatedPlan(2, 1, 1, microbatches=1), Workload(batch=8, context=10)
    assert cm.expert_tokens(plan, TOY, 8, 2, 0) == (8.0,) * 4
    ex = cm.op_cost("experts", 0, 0, plan, 2, TOY, work, HW)
    matrix = 2 * 64 * 128 * 2  # 2 matrices of 64 x 128 in bf16
    assert ex.weight_bytes == pytest.approx(4 * (1 - 0.5 ** 8) * matrix)
    apart = 2 * cm.experts_cost(TOY, HW, (4.0,) * 4).weight_bytes
    assert apart == pytest.approx(2 * 4 * (1 - 0.5 ** 4) * matrix) and ex.weight_bytes < 0.54 * apart
    # the simulator's op list has one experts op per (layer, micro-batch) on the expert rank
    from masep.perf.simulator import rank_ops
    assert [str(op) for op in rank_ops(plan, TOY, 2) if op.kind == "experts"] == ["experts(l0,mb0)"]


@pytest.mark.timeout(10)
def test_decode_blocks_sized_from_the_routing_move_fewer_bytes_than_the_worst_case():
    # ep4 over 16 experts (4 per rank), top-4, 32 tokens per rank: the worst case is 32 x min(4, 4)
    # = 128 rows per block; balanced routing gives the fullest rank 32 x 4 x 4/16 = 32 rows on
    # average, x 1.5 = 48 rows per block. Each rank's dispatch moves 4 blocks of 48 + 1 header rows
    # instead of 128 + 1
    cfg = TOY.replace(num_experts=16, top_k=4)
    plan, work = cm.EpPlan(4, microbatches=1), Workload(batch=128, context=10)
    d = cm.op_cost("dispatch", 0, 0, plan, 0, cfg, work, HW)
    assert d.link_bytes == 4 * (48 + 1) * 64 * 2 and d.link_bytes_saved == 4 * (128 - 48) * 64 * 2
    c = cm.op_cost("combine", 0, 0, plan, 0, cfg, work, HW)
    assert c.link_bytes == 4 * 48 * 64 * 2  # 2.7x fewer bytes than worst-case blocks
    from masep.perf.simulator import simulate
    sim = simulate(plan, cfg, work, HW, check_fit=False)
    assert sim.link_bytes_saved == pytest.approx(4 * 2 * d.link_bytes_saved)  # 4 ranks x (dispatch + combine)
    assert sim.summary()["link_bytes_saved_by_routed_capacity"] == sim.link_bytes_saved


@pytest.mark.timeout(10)
def test_paper_bytes_match_reference():
    paper = preset("paper")
    a100 = get_profile("a100-80g")
    qkvo = paper.attention_params_per_layer() * 2
    assert round(qkvo / 1e6, 1) == 134.2 and round(paper.expert_params() * 2 / 1e6, 1) == 268.4
    from masep.perf.floor import Rates, plan_floor
    work = Workload(24, 2048, lm_head=False)  # REFERENCE.md's floors leave the lm_head out
    bytes_only = Rates(a100.hbm_bytes_per_s, transfer_s={})
    # 12+4 (m = 1): the 4 expert GPUs stream 15.35 of 16 experts x 4 layers: >= 2.02 ms at 2.04 TB/s
    f = plan_floor(SeparatedPlan(12, 1, 4, 1), paper, work, a100, bytes_only)
    assert f.work_s * 1e3 == pytest.approx(2.02, abs=0.005) and f.seconds > f.work_s
    # TP8xPP2 (m = 1): one stage of 8 GPUs streams at a time: 1.24 ms
    assert plan_floor(TpPpPlan(8, 2, 1), paper, work, a100, bytes_only).seconds * 1e3 == pytest.approx(1.24, abs=0.005)


@pytest.mark.timeout(10)
def test_a_plan_that_does_not_fit_is_rejected_with_the_numbers():
    paper, a100 = preset("paper"), get_profile("a100-80g")
    work = Workload(batch=512, context=32768)  # 512 x 32768 keys x 4 layers x 64 KiB... = 275 GB of KV
    with pytest.raises(ValueError) as err:
        cm.check_memory(TpPpPlan(4, 1, 1), paper, work, a100)
    msg = str(err.value)
    for text in ("tp4pp1 m1 does not fit", "rank 0", "KV cache 274.9 GB", "batch 512, context 32768",
                 "80.0 GiB", "a100-80g"):
        assert text in msg, (text, msg)
    # the same plan at a small batch fits; the numbers add up
    use = cm.check_memory(TpPpPlan(4, 1, 1), paper, Workload(8, 2048), a100)[0]
    assert use.total == pytest.approx(use.weights + use.kv_cache + use.buffers)


@pytest.mark.timeout(10)
def test_user_profile_and_calibration(tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text('base = "h100"\nhbm_efficiency = 0.5\n[op_latency_s]\nexperts = 2e-5\n')
    hw = load_hardware(str(toml))
    assert hw.hbm_efficiency == 0.5 and hw.latency("experts") == 2e-5 and hw.latency("attention") == 5e-6
    assert hw.matmul_flops_per_s == get_profile("h100").matmul_flops_per_s
    with pytest.raises(ValueError, match="unknown hardware field"):
        profile_from_dict({"base": "h100", "hbm_bandwidth": 1})
    # calibration: measurements made from latency 20 us and efficiency 0.8 over the copy rate
    base = get_profile("h100")
    copy, mm = 3.0e12, 7.75e14
    rows = [{"op": "experts", "bytes": b, "flops": 1, "measured_ms": (20e-6 + b / copy / 0.8) * 1e3}
            for b in (1e8, 5e8, 2e9)]
    doc = {"device": "x", "date": "2026-01-01", "hbm_copy_bytes_per_s": copy, "matmul_flops_per_s": mm,
           "measurements": rows + [{"op": "step", "bytes": 1, "flops": 1, "measured_ms": 1.0}]}
    fitted = apply_calibration(base, doc)
    assert fitted.hbm_rate("attention") == pytest.approx(copy) and fitted.flop_rate("attention") == pytest.approx(mm)
    assert fitted.latency("experts") == pytest.approx(20e-6) and fitted.efficiency("experts") == pytest.approx(0.8)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(doc))
    assert load_hardware("h100", str(path)).efficiency("experts") == pytest.approx(0.8)
