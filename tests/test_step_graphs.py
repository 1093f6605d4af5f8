"""The whole-step CUDA-graph path of a distributed decode step (stepper.py `_graphed_step`), on CPU.

CUDA graphs need a GPU (tests/test_fastpath_dist.py replays them on 2 GPUs); here the graph
cache is a stand-in that calls the step instead of capturing it, so the logic around the capture
(micro-batches cut from static buffers, bucketed attention length, logits of every row then the
live ones, the step counter) runs on real gloo ranks against the single-device model. fp32 and
the same kernels as the oracle, except that attention runs over a bucketed key length (masked
keys add exact zeros, the sum's order changes): atol 1e-5 on logits of size ~0.1.
"""
from __future__ import annotations

import pytest
import torch

from masep.config import preset
from masep.model import build_model
from masep.plan import TpPpPlan
from masep.runtime import LocalRuntime, StepRows

CFG = preset("tiny").replace(max_seq_len=64)
PLANS = {"tp2": TpPpPlan(2, 1, 1), "pp2 m2": TpPpPlan(1, 2, 2)}


class _CallingGraphs:
    """SegmentGraphs' interface, enabled, without CUDA: runs each entry instead of replaying it
    (so every run counts as a capture: what a replay must restore is checked on GPUs)."""
    enabled = True

    def __init__(self):
        self.keys = []
        self.captures = 0

    def run(self, key, fn, *inputs, shared_pool=False, warm_up=None):
        """A new key with a warm-up context (a separated plan's dry warm-up): the warm-up call
        runs in it first, as before a capture."""
        if warm_up is not None and key not in self.keys:
            with warm_up():
                fn(*inputs)
        self.keys.append(key)
        self.captures += 1
        return fn(*inputs)

    def clear(self):
        pass


def _rank(name):
    from masep.parallel.groups import build_tp_pp_groups, init_distributed
    from masep.parallel.tp_pp import TpPpRuntime
    from masep.parallel.worker import apply_plan
    env = init_distributed("cpu", timeout_s=60)
    model = build_model(CFG, seed=4)
    oracle = LocalRuntime(build_model(CFG, seed=4))
    plan = apply_plan(env, PLANS[name], model)
    runtime = TpPpRuntime(model, plan, build_tp_pp_groups(plan, env), env)
    runtime.graphs = _CallingGraphs()
    built = []  # op lists asked of the runtime: once per micro-batch count, not per step
    runtime._schedule = lambda m, schedule=runtime._schedule: built.append(m) or schedule(m)
    gen = torch.Generator().manual_seed(0)
    for rt in (runtime, oracle):
        rt.start(6, CFG.max_seq_len)
    prompts = [torch.randint(0, CFG.vocab_size, (3 + s,), generator=gen).tolist() for s in (0, 2, 4)]
    rows = StepRows([0, 2, 4], prompts, [0, 0, 0], prefill=True)  # slots 1, 3, 5 stay empty
    torch.testing.assert_close(runtime.forward(rows), oracle.forward(rows), atol=1e-5, rtol=1e-4)
    runners = runtime._op_runners
    live = {s: (p[-1], len(p)) for s, p in zip((0, 2, 4), prompts)}
    for _ in range(4):
        slots = sorted(live)
        rows = StepRows(slots, [[live[s][0]] for s in slots], [live[s][1] for s in slots])
        got, want = runtime.forward(rows, step_id=None), oracle.forward(rows)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        live = {s: (int(t), live[s][1] + 1) for s, t in zip(slots, want.argmax(-1))}
    keys = [k for k in runtime.graphs.keys if k[0] == "step"]
    # slots up to 4 (the highest live one) -> 5 rows -> batch bucket 8, capped at the 6 slots
    assert len(keys) == 4 and all(k[1] == 6 for k in keys), keys
    assert runtime.step == 5  # the prefill and four decode steps
    assert built == [PLANS[name].microbatches] and runtime._op_runners is runners
    return {}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(PLANS))
def test_whole_step_path_matches_single_device(name):
    from masep.parallel.launch import spawn
    spawn(2, _rank, name, timeout_s=100)


def _ep_rank(_):
    """EP2 whose ranks hold different numbers of sequences (3 and 1): decode steps told the
    largest rank's rows (StepRows.peer_rows) and the longest attention take the whole-step path
    with no handshake, both ranks with the same shapes and block capacities, and each rank's
    logits equal the single-device model's for its own rows."""
    import torch.distributed as dist

    from masep.parallel.cluster import agree_decode
    from masep.parallel.ep import EpRuntime
    from masep.parallel.groups import build_ep_groups, init_distributed
    from masep.parallel.worker import apply_plan
    from masep.plan import EpPlan
    env = init_distributed("cpu", timeout_s=60)
    model = build_model(CFG, seed=4)
    oracle = LocalRuntime(build_model(CFG, seed=4))
    plan = apply_plan(env, EpPlan(2, 2), model)
    runtime = EpRuntime(model, plan, build_ep_groups(plan, CFG, env), env)
    runtime.graphs = _CallingGraphs()
    for rt in (runtime, oracle):
        rt.start(6, CFG.max_seq_len)
    gen = torch.Generator().manual_seed(0)
    prompts = {u: [torch.randint(0, CFG.vocab_size, (3 + 2 * s + u,), generator=gen).tolist() for s in slots]
               for u, slots in ((0, (0, 2, 4)), (1, (1,)))}  # every rank draws both ranks' prompts
    slots = {0: [0, 2, 4], 1: [1]}
    me = env.rank
    rows = StepRows(slots[me], prompts[me], [0] * len(slots[me]), prefill=True)
    torch.testing.assert_close(runtime.forward(rows), oracle.forward(rows), atol=1e-5, rtol=1e-4)
    live = {u: {s: (p[-1], len(p)) for s, p in zip(slots[u], prompts[u])} for u in (0, 1)}
    for _ in range(3):
        step = {u: StepRows(sorted(live[u]), [[live[u][s][0]] for s in sorted(live[u])],
                            [live[u][s][1] for s in sorted(live[u])]) for u in (0, 1)}
        step = agree_decode(step)
        assert step[me].peer_rows == 5 and step[me].attend_len == max(r.attend_len for r in step.values())
        got = runtime.forward(step[me])
        want = oracle.forward(StepRows(step[me].slots, step[me].tokens, step[me].starts))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        for u in (0, 1):  # both ranks' next tokens: the other's are stood in for (each checks its own)
            live[u] = {s: ((int(t) if u == me else 0), live[u][s][1] + 1)
                       for s, t in zip(sorted(live[u]), got.argmax(-1) if u == me else [0] * len(live[u]))}
    keys = [k for k in runtime.graphs.keys if k[0] == "step"]
    # rank 0's slots up to 4 -> 5 rows -> bucket 8, capped at 6 slots: on both ranks, whatever their own rows
    assert len(keys) == 3 and all(k[1] == 6 for k in keys), keys
    both = [None, None]
    dist.all_gather_object(both, keys)
    assert both[0] == both[1], f"the ranks' whole-step graph keys differ, so would their captures: {both}"
    assert runtime.dispatcher.reruns == 0 and runtime.step == 4
    bad = StepRows([0, 2, 4], [[1], [1], [1]], [9, 9, 9], peer_rows=3)  # slot 4 needs 5 rows
    with pytest.raises(ValueError, match=r"peer_rows=3 must be at least this rank's rows \(5"):
        runtime.forward(bad)
    return {}


@pytest.mark.timeout(120)
def test_ep_ranks_of_unequal_batches_take_the_whole_step_path_alike():
    from masep.parallel.launch import spawn
    spawn(2, _ep_rank, None, timeout_s=100)


def _separated_rank(_):
    """Separated 1+2 (two expert ranks, two micro-batches): the replica's decode steps told their
    rows take the whole-step path (the stand-in runs the capture's dry warm-up before the first
    call of each key); the expert ranks serve those steps laid out from the same rows. Every
    step's logits equal the single-device model's, and the expert ranks serve each step exactly
    once: a warm-up that moved anything would leave one side waiting or make gloo abort."""
    from masep.parallel import comm
    from masep.parallel.groups import build_separated_groups, init_distributed
    from masep.parallel.separated import SeparatedAttentionRuntime, serve_experts
    from masep.parallel.worker import apply_plan
    from masep.plan import SeparatedPlan
    env = init_distributed("cpu", timeout_s=60)
    model = build_model(CFG, seed=4)
    plan = apply_plan(env, SeparatedPlan(1, 1, 2, 2), model)
    groups = build_separated_groups(plan, CFG, env)
    steps = 4
    if groups.role.kind == "expert":
        stats = serve_experts(model, plan, groups, env, agreed=lambda s: [3] if 1 <= s <= steps else None)
        assert stats.steps == 1 + steps, stats.steps  # the prefill and the decode steps, once each
        return {}
    comm.transfers_capturable = lambda: True  # as on NCCL: the whole-step path is taken
    oracle = LocalRuntime(build_model(CFG, seed=4))
    runtime = SeparatedAttentionRuntime(model, plan, groups, env, step_graphs=True)
    runtime.graphs = _CallingGraphs()
    for rt in (runtime, oracle):
        rt.start(3, CFG.max_seq_len)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, CFG.vocab_size, (3 + s,), generator=gen).tolist() for s in range(3)]
    rows = StepRows([0, 1, 2], prompts, [0, 0, 0], prefill=True)
    torch.testing.assert_close(runtime.forward(rows), oracle.forward(rows), atol=1e-5, rtol=1e-4)
    live = [(p[-1], len(p)) for p in prompts]
    for _ in range(steps):
        rows = StepRows([0, 1, 2], [[t] for t, _ in live], [n for _, n in live], peer_rows=3)
        got, want = runtime.forward(rows), oracle.forward(StepRows(rows.slots, rows.tokens, rows.starts))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        live = [(int(t), n + 1) for t, (_, n) in zip(want.argmax(-1), live)]
    keys = [k for k in runtime.graphs.keys if k[0] == "step"]
    assert len(keys) == steps, keys  # every decode step took the whole-step path
    runtime.finish()
    return {}


@pytest.mark.timeout(120)
def test_separated_whole_step_path_warms_up_without_transfers():
    from masep.parallel.launch import spawn
    spawn(3, _separated_rank, None, timeout_s=100)
