"""Failover over NCCL on 2 GPUs: a survivor blocked in a transfer with a dead (or stopped) peer
is released by the front end's word, not by NCCL's watchdog, and recovers.

Skipped without 2 GPUs (CI has none; the same paths run on gloo in test_failover.py and
test_give_up.py). Two GPUs allow only plans of two ranks under NCCL (it refuses two ranks of one
communicator on one GPU): separated 1 + 1, where the expert rank is replaced, and EP2, where
the error must name the dead rank at once. A dead attention replica with survivors, and routing
around an expert rank, need 3 or more GPUs.

The oracle is the single-device model on the same GPU, greedy (argmax tokens: fp32 logits of
the two paths agree to ~1e-5, far below the tiny model's top-2 gaps).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from masep.config import preset
from masep.engine.executor import LocalExecutor
from masep.engine.scheduler import Scheduler, SchedulerConfig
from masep.model import build_model
from masep.plan import EpPlan, SeparatedPlan
from masep.runtime import LocalRuntime
from masep.serve.engine_client import EngineDead, ReplaceableRankLost, SamplingParams

from test_failover import _cluster as failover_cluster, _no_rank_left

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 GPUs")

CFG = preset("tiny")
PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11], [4, 4, 5, 6], [12, 13], [20, 21, 22, 23, 24, 25]]


def _needs(gpus: int):
    return pytest.mark.skipif(torch.cuda.device_count() < gpus, reason=f"needs {gpus} GPUs")


def _cluster(plan, faults, timeout_s=60.0, join_timeout_s=0.0, mirror=False):
    return failover_cluster(plan, faults, timeout_s, join_timeout_s, mirror, device="cuda", backend="nccl")


def _serve(executor, prompts, keep: list | None = None, protection: str = "recompute") -> list[list[int]]:
    """Greedy outputs of `prompts`; `keep` receives the scheduler (its failovers)."""
    sched = Scheduler(executor, SchedulerConfig(64, CFG.vocab_size, max_num_batched_tokens=6, protection=protection))
    seqs = [sched.add(str(i), p, SamplingParams(10, temperature=0.0)) for i, p in enumerate(prompts)]
    while sched.has_work:
        sched.iterate()
    if keep is not None:
        keep.append(sched)
    return [s.output for s in seqs]


@pytest.fixture(scope="module")
def reference():
    # drawn on the GPU, as the ranks draw their slices (CPU and CUDA generators differ for one seed)
    executor = LocalExecutor(LocalRuntime(build_model(CFG, seed=0, device="cuda")), num_slots=2, max_len=64)
    return _serve(executor, PROMPTS)


def _until_lost(sched, error, match):
    """Iterate until the step that raises; returns seconds from that step's start to the error."""
    with pytest.raises(error, match=match):
        while True:
            start = time.monotonic()
            sched.iterate()
    return time.monotonic() - start


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault,timeout_s,match,bound_s", [
    ("kill@1:5", 60.0, r"expert rank 1 \(experts 0, 1, 2, 3, 4, 5, 6, 7\).*SIGKILL", 2.0),
    ("hang@1:5", 3.0, r"expert rank 1 .*sent nothing for 3 s.*SIGSTOP", 3.0 + 2.0),
])
def test_a_dead_expert_rank_is_replaced_over_nccl_and_the_attention_rank_keeps_its_process(
        reference, fault, timeout_s, match, bound_s):
    """Separated 1 + 1: the attention rank is inside the step's NCCL transfers when the expert
    rank dies (or stops); the front end's abort releases it, it leaves its world, a new expert
    rank joins, and the next requests get the single-device model's tokens."""
    executor = _cluster(SeparatedPlan(1, 1, 1, 2), [fault], timeout_s, join_timeout_s=120)
    try:
        before = executor.infos[0].pid
        sched = Scheduler(executor, SchedulerConfig(64, CFG.vocab_size, max_num_batched_tokens=6))
        for i in range(2):
            sched.add(str(i), [1, 2, 3 + i], SamplingParams(30, temperature=0.0))
        took = _until_lost(sched, ReplaceableRankLost, match)
        print(f"\n{fault}: the error came {took:.2f} s after the step started")
        assert took < bound_s
        sched.fail_running("lost")
        joined = executor.replace_lost_ranks()
        print(f"{fault}: the replacement joined {joined['seconds']:.2f} s after the death was noticed")
        assert executor.infos[0].pid == before and os.path.exists(f"/proc/{before}")
        assert _serve(executor, PROMPTS) == reference
    finally:
        _no_rank_left(executor)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("plan,fault,match", [
    (EpPlan(2, 2), "kill@1:5", r"rank 1 \(ep\) .*SIGKILL.*ep cannot go on"),
    (SeparatedPlan(1, 1, 1, 2), "kill@0:5", r"every attention replica has failed.*rank 0 .*SIGKILL"),
])
def test_an_engine_ending_death_over_nccl_names_the_rank_at_once_and_leaves_no_process(plan, fault, match):
    executor = _cluster(plan, [fault])
    try:
        sched = Scheduler(executor, SchedulerConfig(64, CFG.vocab_size, max_num_batched_tokens=6))
        for i in range(2):
            sched.add(str(i), [1, 2, 3 + i], SamplingParams(30, temperature=0.0))
        took = _until_lost(sched, EngineDead, match)
        print(f"\n{plan.strategy} {fault}: the error came {took:.2f} s after the step started")
        assert took < 2.0
    finally:
        _no_rank_left(executor)


# --- 3 and 4 GPUs: survivors that keep serving (run when such a machine is lent) --------------------
@_needs(3)
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mirror", [False, True], ids=["recompute", "mirror"])
def test_a_dead_attention_replica_over_nccl_moves_its_requests_and_changes_no_token(reference, mirror):
    """sep 2x1+1: replica 1's rank is SIGKILLed in decode. The expert rank, inside replica 1's
    bridge transfers, is released by the abort of that bridge's communicators (not by NCCL's
    watchdog), drops the bridge and keeps serving replica 0, which finishes every request."""
    executor = _cluster(SeparatedPlan(2, 1, 1, 2), ["kill@1:5"], mirror=mirror)
    try:
        keep = []
        assert _serve(executor, PROMPTS, keep, "mirror" if mirror else "recompute") == reference
        [failover] = keep[0].failovers
        assert "rank 1" in failover.reason and "SIGKILL" in failover.reason
        assert (failover.adopted if mirror else failover.moved) and not failover.failed
        print(f"\nmirror={mirror}: {failover.reason}")
    finally:
        _no_rank_left(executor)


@_needs(3)
@pytest.mark.timeout(240)
def test_a_dead_expert_rank_with_redundancy_over_nccl_is_routed_around(reference):
    """sep 1x1+2, every expert on both expert ranks: rank 2 is SIGKILLed; the attention rank and
    rank 1 abort the bridge that includes it and switch to their bridge without it."""
    plan = SeparatedPlan(1, 1, 2, 2, placement=(tuple(range(8)), tuple(range(8))))
    executor = _cluster(plan, ["kill@2:5"])
    try:
        keep = []
        assert _serve(executor, PROMPTS, keep) == reference
        assert not keep[0].failovers and list(executor.lost_experts) == [2]
        print(f"\nrerouted: {executor.reroutes}")
    finally:
        _no_rank_left(executor)
