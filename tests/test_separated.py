"""MA separation on real gloo processes, checked against the single-device model.

Tolerance: fp32 everywhere. The distributed path computes the same products in a different
order: head-parallel partial o_proj outputs are summed by an all-reduce, and expert outputs
are weighted and summed per token after the round trip. Reordering fp32 sums of O(100) terms
of size O(1) moves results by a few ulps (~1e-6 relative); atol 1e-5 / rtol 1e-4 leaves two
orders of magnitude of margin while a misrouted token or a wrong head changes logits by O(1e-2).
"""
from __future__ import annotations

import pytest
import torch

from masep.config import preset
from masep.engine import Request, generate, random_prompts
from masep.model import build_model
from masep.parallel import comm
from masep.parallel.groups import build_separated_groups, init_distributed
from masep.parallel.launch import spawn
from masep.parallel.separated import SeparatedAttentionRuntime, expert_route, serve_experts
from masep.plan import SeparatedPlan, split_evenly
from masep.runtime import LocalRuntime

ATOL, RTOL = 1e-5, 1e-4
# 16 experts as in the seeds; 32 heads so that 12 head-parallel ranks split them unevenly (3 or 2).
CFG = preset("tiny").replace(name="tiny16", num_experts=16, num_heads=32, num_kv_heads=8, head_dim=4,
                             num_layers=2, max_seq_len=64)
BATCH, PROMPT, NEW = 5, 6, 3  # 5 sequences: uneven over 2 replicas and over 2 or 3 micro-batches


def _requests():
    prompts = random_prompts(BATCH, PROMPT, CFG.vocab_size, seed=7)
    prompts[1] = prompts[1][:4]  # one shorter prompt: right padding inside a micro-batch
    return [Request(p, NEW, seed=i) for i, p in enumerate(prompts)]


def _check_rank(arg) -> dict:
    """Every rank: for each micro-batch count, compare prefill + decode logits and greedy tokens."""
    (r, t, e), microbatches, seq_split = arg
    env = init_distributed("cpu", timeout_s=60)
    model = build_model(CFG, seed=3)
    reqs = _requests()
    reference = generate(LocalRuntime(model), reqs).tokens
    for m in microbatches:
        plan = SeparatedPlan(r, t, e, m, seq_split=seq_split).validate(CFG, env.world_size)
        groups = build_separated_groups(plan, CFG, env)
        if groups.role.kind == "expert":
            calls = _count_expert_calls()
            stats = [serve_experts(model, plan, groups, env) for _ in ("logits", "generate")]
            # one grouped matmul per (step, layer, micro-batch) over every replica's rows
            served = sum(s.steps + s.reruns for s in stats)
            assert len(calls) == served * CFG.num_layers * m, (len(calls), served)
            continue
        mine = split_evenly(BATCH, r)[groups.role.replica]
        my_reqs = [reqs[i] for i in mine]
        _compare_logits(SeparatedAttentionRuntime(model, plan, groups, env), LocalRuntime(model), my_reqs)
        tokens = generate(SeparatedAttentionRuntime(model, plan, groups, env), my_reqs).tokens
        assert tokens == [reference[i] for i in mine], f"m={m}: greedy tokens differ from the single-device model"
    return {}


def _count_expert_calls() -> list:
    """The rows of every Experts.forward_sorted call in this (spawned) process from now on."""
    from masep.model import Experts
    grouped = getattr(Experts.forward_sorted, "uncounted", Experts.forward_sorted)
    calls = []

    def counted(self, x_NH, counts_E):
        calls.append(x_NH.shape[0])
        return grouped(self, x_NH, counts_E)
    counted.uncounted = grouped
    Experts.forward_sorted = counted
    return calls


def _compare_logits(dist_rt, local_rt, reqs) -> None:
    lens = torch.tensor([len(q.prompt) for q in reqs])
    ids = torch.zeros(len(reqs), int(lens.max()), dtype=torch.long)
    for b, q in enumerate(reqs):
        ids[b, :len(q.prompt)] = torch.tensor(q.prompt)
    for rt in (dist_rt, local_rt):
        rt.start(len(reqs), CFG.max_seq_len)
    torch.testing.assert_close(dist_rt.prefill(ids, lens), local_rt.prefill(ids, lens), atol=ATOL, rtol=RTOL)
    tokens, positions = ids[:, 0].clone(), lens.clone()
    for _ in range(2):
        got = dist_rt.decode(tokens, positions, int(positions.max()) + 1)
        want = local_rt.decode(tokens, positions, int(positions.max()) + 1)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        tokens, positions = want.argmax(-1), positions + 1
    dist_rt.finish()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", [(1, 1, 1), (3, 1, 1), (2, 2, 2)], ids=["1+1", "3x1+1", "2x2+2"])
def test_separated_matches_single_device(layout):
    r, t, e = layout
    spawn(r * t + e, _check_rank, (layout, (1, 2, 3), False), timeout_s=200)


@pytest.mark.timeout(300)
def test_twelve_uneven_head_ranks_and_four_expert_ranks():
    # 32 heads over 12 ranks: 8 ranks hold 3 heads, 4 hold 2; GQA groups of 4 straddle ranks.
    spawn(16, _check_rank, ((1, 12, 4), (1, 2, 3), False), timeout_s=280)


@pytest.mark.timeout(240)
def test_sequence_split_prefill_equals_unsplit():
    spawn(4, _check_rank, ((1, 2, 2), (2, 3), True), timeout_s=200)


# --- dispatch / combine on their own ------------------------------------------------------------
def _round_trip_rank(arg) -> dict:
    """Inputs encode their sender and token; experts check every row they get, then echo it.

    Layer 0 sends each token to one expert (column 2 names it, so the expert can check);
    layer 1 sends it to its top-2 with weights summing to 1, so the echo must come back whole.
    Both transfer modes: exact (counts read on the host) and padded (fixed-size blocks)."""
    *plan_args, padded = arg
    plan = SeparatedPlan(*plan_args).validate(CFG, None)
    env = init_distributed("cpu", timeout_s=60)
    groups = build_separated_groups(plan, CFG, env)
    h, f32 = CFG.hidden_size, torch.float32
    if groups.role.kind == "expert":
        mine = plan.expert_placement(CFG)[groups.role.index]
        layouts = [comm.expert_begin_step(b, 0, 1, h, f32) for b in groups.bridges]
        assert all(lay.padded == padded for lay in layouts)
        for layer in (0, 1):
            for bridge, layout in zip(groups.bridges, layouts):
                got = comm.expert_receive(bridge, layout, len(mine), h, f32, layer, 0)
                valid = got.x_NH[: int(got.counts_L.sum())]  # padded steps add padding rows last
                if layer == 0:  # rows arrive sorted by local expert
                    expected = torch.repeat_interleave(torch.tensor(mine, dtype=f32), got.counts_L)
                    assert torch.equal(valid[:, 2], expected), f"misrouted rows on rank {env.rank}"
                comm.wait_sent(comm.expert_send(got.x_NH, got, bridge, layout, layer, 0))
        for bridge, layout in zip(groups.bridges, layouts):
            comm.end_step(layout, bridge)
        return {}
    bridge, route = groups.bridges[0], expert_route(plan, CFG, groups.role.replica, "cpu")
    n = 7
    layout = comm.attention_begin_step(bridge, 0, [n], padded, h, f32)
    gen = torch.Generator().manual_seed(env.rank)
    ids = torch.stack([torch.randperm(CFG.num_experts, generator=gen)[:CFG.top_k] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, CFG.top_k, generator=gen), -1)
    x = torch.randn(n, h, generator=gen)
    x[:, 0], x[:, 1], x[:, 2] = env.rank, torch.arange(n), ids[:, 0].float()
    back = comm.combine(comm.dispatch(x, ids[:, :1], torch.ones(n, 1), route, bridge, layout, 0, 0), h, f32)
    assert torch.equal(back, x), "dispatch -> combine did not restore its input"
    back = comm.combine(comm.dispatch(x, ids, weights, route, bridge, layout, 1, 0), h, f32)
    torch.testing.assert_close(back, x, atol=ATOL, rtol=RTOL)  # sum_k w_k * x with sum_k w_k = 1
    return {}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
def test_dispatch_combine_round_trip_exposes_misrouting(padded):
    # 2 replicas x 2 head-parallel ranks + 2 expert ranks with an uneven, replicated placement.
    placement = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (8, 9, 10, 11, 12, 13, 14, 15))
    spawn(6, _round_trip_rank, (2, 2, 2, 1, placement, padded), timeout_s=100)


def _diverged_rank(arg) -> str:
    """The attention rank sends layer 1's block where layer 0's is due: the expert must raise
    a CommError naming the transfer once the padded step is over (nothing hangs)."""
    plan = SeparatedPlan(1, 1, 1, 1).validate(CFG, None)
    env = init_distributed("cpu", timeout_s=20)
    groups = build_separated_groups(plan, CFG, env)
    h, f32, bridge = CFG.hidden_size, torch.float32, groups.bridges[0]
    if groups.role.kind == "expert":
        layout = comm.expert_begin_step(bridge, 0, 1, h, f32)
        got = comm.expert_receive(bridge, layout, CFG.num_experts, h, f32, 0, 0)
        assert int(got.counts_L.sum()) == 0, "rows of a wrong header must be dropped, not served"
        comm.wait_sent(comm.expert_send(got.x_NH, got, bridge, layout, 0, 0))
        with pytest.raises(comm.CommError, match=r"block header check.*step 0, layer 0, micro-batch 0.*ranks \[0\]"):
            comm.end_step(layout, bridge)
        return ""
    route = expert_route(plan, CFG, 0, "cpu")
    layout = comm.attention_begin_step(bridge, 0, [3], True, h, f32)
    x, ids = torch.randn(3, h), torch.zeros(3, CFG.top_k, dtype=torch.long)
    ids[:, 1] = 1
    comm.combine(comm.dispatch(x, ids, torch.ones(3, 2), route, bridge, layout, 1, 0), h, f32)
    return ""


@pytest.mark.timeout(60)
def test_a_padded_block_for_the_wrong_layer_is_dropped_and_reported():
    spawn(2, _diverged_rank, None, timeout_s=50)  # the expert rank asserts the error's wording


def test_invalid_plans_name_the_field():
    with pytest.raises(ValueError, match=r"attn_tp=33.*more head-parallel ranks than attention heads"):
        SeparatedPlan(1, 33, 4).validate(CFG)
    with pytest.raises(ValueError, match=r"microbatches=0.*>= 1"):
        SeparatedPlan(1, 2, 2, 0).validate(CFG)
    with pytest.raises(ValueError, match=r"world_size=5.*needs 6"):
        SeparatedPlan(2, 2, 2).validate(CFG, 5)
    with pytest.raises(ValueError, match=r"placed on no rank"):
        SeparatedPlan(1, 1, 2, placement=((0, 1), (2, 3))).validate(CFG)
    with pytest.raises(ValueError, match=r"expert_ranks=17"):
        SeparatedPlan(1, 1, 17).validate(CFG)


def test_plan_layout_is_deterministic():
    plan = SeparatedPlan(2, 3, 4, 2).validate(CFG)
    roles = [plan.role(r) for r in range(plan.world_size)]
    assert [x.kind for x in roles] == ["attention"] * 6 + ["expert"] * 4
    assert [len(h) for h in plan.head_split(CFG)] == [11, 11, 10]
    assert plan.expert_placement(CFG) == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15))


def _stuck_expert_rank(arg) -> str:
    """Rank 1 (the expert) never answers; rank 0 must fail with a CommError, not hang."""
    import time
    plan = SeparatedPlan(1, 1, 1, 1).validate(CFG, None)
    env = init_distributed("cpu", timeout_s=3)
    groups = build_separated_groups(plan, CFG, env)
    if groups.role.kind == "expert":
        time.sleep(8)
        return ""
    runtime = SeparatedAttentionRuntime(build_model(CFG, seed=3), plan, groups, env)
    runtime.start(1, 16)
    start = time.monotonic()
    try:
        runtime.prefill(torch.zeros(1, 4, dtype=torch.long), torch.tensor([4]))
    except comm.CommError as err:
        assert time.monotonic() - start < 7, "the wait outlived its timeout"
        return str(err)
    raise AssertionError("prefill returned although the expert rank never answered")


@pytest.mark.timeout(60)
def test_a_stuck_peer_is_an_error_naming_the_bridge_layer_and_step():
    message = spawn(2, _stuck_expert_rank, None, timeout_s=40)
    assert "ranks [0, 1]" in message and "step handshake" in message and "step 0" in message, message


# --- decode blocks sized from the routing (parallel/capacity.py) -------------------------------------
def _biased(model):
    """Every token's top-2 are experts 0 and 1, both on the first expert rank: the embedding's
    column 0 is held at 4 (the residual stream keeps it positive in every layer) and only the
    routers' rows of experts 0 and 1 read it, with weight 50."""
    with torch.no_grad():
        model.embed.weight[:, 0] = 4.0
        for block in model.layers:
            block.moe.router.weight[:2, 0] = 50.0
    return model


def _capacity_rank(arg) -> dict:
    """Decode through a plan whose blocks are sized from the routing: logits and greedy tokens of
    this rank's sequences against the single-device model. Returns the rank's dispatcher counts."""
    plan_text, biased, sequences = arg
    from masep.parallel.ep import EpRuntime
    from masep.parallel.groups import build_ep_groups
    from masep.plan import parse_plan
    env = init_distributed("cpu", timeout_s=60)
    model = build_model(CFG, seed=3)
    if biased:
        _biased(model)
    prompts = random_prompts(sequences, PROMPT, CFG.vocab_size, seed=11)
    reqs = [Request(p, NEW, seed=i) for i, p in enumerate(prompts)]
    plan = parse_plan(plan_text).validate(CFG, env.world_size)
    if plan.strategy == "ep":
        groups = build_ep_groups(plan, CFG, env)
        make, mine = (lambda: EpRuntime(model, plan, groups, env)), split_evenly(sequences, plan.ep)[env.rank]
    else:
        groups = build_separated_groups(plan, CFG, env)
        if groups.role.kind == "expert":
            stats = [serve_experts(model, plan, groups, env) for _ in range(2)]
            assert not biased or sum(s.reruns for s in stats) >= 1, "the expert rank served no overflowed step again"
            return {}
        make, mine = ((lambda: SeparatedAttentionRuntime(model, plan, groups, env)),
                      split_evenly(sequences, plan.attn_replicas)[groups.role.replica])
    my_reqs = [reqs[i] for i in mine]
    runtime = make()
    _compare_logits(runtime, LocalRuntime(model), my_reqs)
    tokens = generate(make(), my_reqs).tokens
    assert tokens == generate(LocalRuntime(model), my_reqs).tokens, "greedy tokens differ from the single-device model"
    d = runtime.dispatcher
    return dict(reruns=d.reruns, payload_rows=d.payload_rows, worst_payload_rows=d.worst_payload_rows)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("plan", ["sep 1x2+2 m1", "ep2 m1"])
def test_overflowing_decode_blocks_run_the_step_again_and_change_no_logit(plan):
    # 8 sequences, every token routed to the first expert rank: 4 tokens per sender need 8 rows
    # in that rank's block, but the balanced routing sizes it for 6 (1 row per token x 1.5): the
    # first decode step overflows on the device, runs again at the worst-case capacity (2 x 4 =
    # 8 rows), and its logits match the single-device model's to the usual tolerance
    got = spawn(4 if plan.startswith("sep") else 2, _capacity_rank, (plan, True, 8), timeout_s=100)
    assert got["reruns"] >= 1, got


@pytest.mark.timeout(120)
def test_decode_blocks_sized_from_the_routing_carry_fewer_rows_than_the_worst_case():
    # ep4: 16 experts, 4 per rank, top-2; 16 sequences, 4 per rank: a worst-case block holds
    # 4 x min(2, 4) = 8 rows, the fullest rank gets 2 on average
    got = spawn(4, _capacity_rank, ("ep4 m1", False, 16), timeout_s=100)
    assert 0 < got["payload_rows"] < 0.85 * got["worst_payload_rows"], got


def _agreed_rank(arg) -> dict:
    """Prefill with the step handshake, then decode steps whose rows both sides were told (the
    replica's StepRows.peer_rows, the expert ranks' `agreed`): no handshake, each side sizing
    the blocks with its own copy of the replica's capacity policy. Biased routing overflows the
    first decode step's blocks on both sides alike, so both run it again."""
    plan_text, sequences, decode_steps = arg
    from masep.plan import parse_plan
    env = init_distributed("cpu", timeout_s=60)
    model = _biased(build_model(CFG, seed=3))
    plan = parse_plan(plan_text).validate(CFG, env.world_size)
    groups = build_separated_groups(plan, CFG, env)
    per_replica = [len(r) for r in split_evenly(sequences, plan.attn_replicas)]
    if groups.role.kind == "expert":
        told = lambda step: per_replica if 1 <= step <= decode_steps else None  # noqa: E731
        stats = serve_experts(model, plan, groups, env, agreed=told)
        return {"expert_reruns": stats.reruns, "steps": stats.steps}
    prompts = random_prompts(sequences, PROMPT, CFG.vocab_size, seed=11)
    mine = [prompts[i] for i in split_evenly(sequences, plan.attn_replicas)[groups.role.replica]]
    ids, lens = torch.tensor(mine), torch.full((len(mine),), PROMPT)
    runtime, local = SeparatedAttentionRuntime(model, plan, groups, env), LocalRuntime(model)
    for rt in (runtime, local):
        rt.start(len(mine), CFG.max_seq_len)
    torch.testing.assert_close(runtime.prefill(ids, lens), local.prefill(ids, lens), atol=ATOL, rtol=RTOL)
    tokens, positions = ids[:, 0].clone(), lens.clone()
    for _ in range(decode_steps):
        got = runtime.decode(tokens, positions, peer_rows=len(mine))
        want = local.decode(tokens, positions)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        tokens, positions = want.argmax(-1), positions + 1
    reruns = runtime.dispatcher.reruns
    runtime.finish()
    return {"reruns": reruns}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("plan,world", [("sep 1x2+2 m1", 4), ("sep 2x1+2 m2", 4)])
def test_decode_steps_told_their_rows_need_no_handshake_and_match_the_model(plan, world):
    # 8 sequences with every token routed to the first experts: the first decode step overflows
    # the blocks sized for balanced routing; the replica and the expert ranks both see it in the
    # block headers, run it again at the worst case, and widen their capacity alike (had their
    # policies diverged, the next step's block sizes would disagree and the transfer fail: an
    # expert rank that does not observe the demand makes gloo abort here)
    got = spawn(world, _agreed_rank, (plan, 8, 3), timeout_s=150)
    assert got["reruns"] >= 1, got
