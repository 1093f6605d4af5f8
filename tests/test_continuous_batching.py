"""Continuous batching on every strategy, on real gloo ranks, against the single-device model.

Requests arrive while others are decoding (they join a busy batch mid-flight), there are fewer
KV slots than requests (some wait for a slot another request frees), and long prompts are
prefilled in chunks of a few tokens. Each request's tokens must equal what the single-device
model gives it alone, greedy and seeded sampling alike: exact equality, because fp32 logits of
the tiny model agree to ~1e-6 across strategies and batch compositions (test_separated,
test_baselines) while its top-2 logits are far apart, and sampling is a pure function of
(logits, seed, index) (engine/sampling.py).
"""
from __future__ import annotations

import pytest
import torch

from masep.config import preset
from masep.engine import Request, generate, random_prompts
from masep.engine.executor import LocalExecutor
from masep.engine.scheduler import Scheduler, SchedulerConfig
from masep.model import build_model
from masep.plan import EpPlan, SeparatedPlan, TpPpPlan
from masep.runtime import LocalRuntime
from masep.serve.engine_client import SamplingParams

CFG = preset("tiny")
PLANS = {
    "separated 2 replicas": SeparatedPlan(2, 1, 1, 2),
    "separated tp2 + 2 experts": SeparatedPlan(1, 2, 2, 2),
    "ep2": EpPlan(2, 2),
    "tp1 x pp2": TpPpPlan(1, 2, 2),
}


def _workload():
    """(arrival iteration, prompt, params): lengths 3..17, half sampled with a seed."""
    lens = [3, 17, 5, 11, 4, 9, 14]
    prompts = [random_prompts(1, n, CFG.vocab_size, seed=i)[0] for i, n in enumerate(lens)]
    params = [SamplingParams(6 + i % 3, 0.0 if i % 2 else 0.9, top_k=0 if i % 2 else 40, seed=100 + i)
              for i in range(len(lens))]
    return [(2 * i, p, q) for i, (p, q) in enumerate(zip(prompts, params))]


def _alone(prompt, params) -> list[int]:
    """The oracle: the request by itself on the single-device model."""
    runtime = LocalRuntime(build_model(CFG, seed=0))
    req = Request(prompt, params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed)
    return generate(runtime, [req]).tokens[0]


def _serve(executor, work, budget: int = 6) -> list[list[int]]:
    """Drive a scheduler: request i is added at its arrival iteration (while others run)."""
    sched = Scheduler(executor, SchedulerConfig(64, CFG.vocab_size, max_num_batched_tokens=budget))
    seqs, it = [], 0
    while len(seqs) < len(work) or sched.has_work:
        seqs += [sched.add(str(i), p, q) for i, (at, p, q) in enumerate(work) if at == it]
        sched.iterate()
        it += 1
    assert any(h.kind == "prefill" and h.tokens == budget for h in sched.history), "no prompt was chunked"
    return [s.output for s in seqs]


@pytest.fixture(scope="module")
def reference():
    return [_alone(p, q) for _, p, q in _workload()]


@pytest.mark.timeout(60)
def test_single_device_continuous_batching_matches_alone(reference):
    executor = LocalExecutor(LocalRuntime(build_model(CFG, seed=0)), num_slots=3, max_len=64)
    assert _serve(executor, _workload()) == reference


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(PLANS))
def test_strategy_continuous_batching_matches_alone(name, reference):
    from masep.parallel.cluster import ClusterExecutor
    from masep.parallel.worker import RunSpec
    plan = PLANS[name].validate(CFG)
    executor = ClusterExecutor(RunSpec(plan=plan, requests=[], preset="tiny", timeout_s=60), max_len=64,
                               max_num_seqs=2)
    try:
        got = _serve(executor, _workload())
    finally:
        reports = executor.shutdown()
    assert sorted(reports) == list(range(plan.world_size))  # every rank stopped and reported
    assert got == reference


@pytest.mark.timeout(60)
def test_a_planted_bug_is_caught(reference):
    """The comparison can fail: swap two experts' weights in the served model."""
    model = build_model(CFG, seed=0)
    with torch.no_grad():
        for layer in model.layers:
            w = layer.moe.experts.w_up
            w[[0, 1]] = w[[1, 0]].clone()
    executor = LocalExecutor(LocalRuntime(model), num_slots=3, max_len=64)
    assert _serve(executor, _workload()) != reference


@pytest.mark.timeout(60)
def test_a_rank_that_dies_fails_the_step_naming_it():
    """SIGKILL an expert rank mid-run: the next step raises EngineDead naming the rank, within
    the liveness poll (not the 60 s collective timeout), and no rank process is left."""
    import os
    import signal
    import time

    from masep.parallel.cluster import ClusterExecutor
    from masep.parallel.worker import RunSpec
    from masep.serve.engine_client import EngineDead
    plan = SeparatedPlan(1, 1, 1, 2).validate(CFG)
    executor = ClusterExecutor(RunSpec(plan=plan, requests=[], preset="tiny", timeout_s=60), max_len=64,
                               max_num_seqs=2)
    sched = Scheduler(executor, SchedulerConfig(64, CFG.vocab_size))
    sched.add("a", [1, 2, 3], SamplingParams(40, 0.0))
    sched.iterate()
    expert = executor.experts[0]
    os.kill(executor.procs.procs[expert].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDead, match=f"rank {expert}"):
        for _ in range(40):
            sched.iterate()
    assert time.monotonic() - start < 30
    executor.shutdown()
    assert not any(p.is_alive() for p in executor.procs.procs)


@pytest.mark.timeout(60)
def test_bucketed_graph_runtime_logic_matches_alone(reference):
    """GraphedLocalRuntime's serving path (decode over the dense slot range padded to a batch
    bucket, static buffers per bucket) on CPU, where it runs the same code without capturing."""
    from masep.fastpath import GraphedLocalRuntime
    runtime = GraphedLocalRuntime(build_model(CFG, seed=0), expert_impl=None)
    executor = LocalExecutor(runtime, num_slots=5, max_len=64)  # 3 busy slots run as a bucket of 4
    assert _serve(executor, _workload()) == reference
