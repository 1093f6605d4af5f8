"""Failover of a lost attention unit, first in the scheduler alone (two in-process units, one
of which "dies" at a chosen step), then on real gloo ranks (tests below).

Exact token equality with the single-device model run alone: a moved request prefills prompt
+ generated tokens again and samples its next token from the last position; fp32 logits of
the tiny model agree to ~1e-6 between that prefill and the decode step it replaces, while its
top-2 logits are far apart, and sampling is a pure function of (logits, seed, index).
"""
from __future__ import annotations

import pytest

from masep.engine.sampling import sample
from masep.engine.scheduler import Scheduler, SchedulerConfig
from masep.model import build_model
from masep.runtime import LocalRuntime
from masep.serve.engine_client import UnitsLost

from test_continuous_batching import CFG, _workload, reference  # noqa: F401  (fixture)


class TwoUnits:
    """Two units in this process, each its own copy of the model; unit `dies` stops answering
    from step `at` on (its rows of that step are lost, as when a rank is killed mid-step)."""

    num_units = 2

    def __init__(self, dies: int | None = None, at: int = 0):
        self.units = [LocalRuntime(build_model(CFG, seed=0)) for _ in range(2)]
        self.slots_per_unit, self.max_len = 2, 64
        for rt in self.units:
            rt.start(self.slots_per_unit, self.max_len)
        self.dies, self.at, self.died_at = dies, at, None

    def step(self, step_id, rows):
        out = {u: sample(self.units[u].forward(r), r.sample) for u, r in rows.items()
               if not (u == self.dies and step_id >= self.at)}
        if self.dies in rows and step_id >= self.at:
            self.died_at = self.died_at or step_id
            raise UnitsLost({self.dies: "rank 2 (pid 1) was killed by signal 9"}, out)
        return out


def _serve(executor, work, protection="recompute"):
    sched = Scheduler(executor, SchedulerConfig(64, CFG.vocab_size, max_num_batched_tokens=6,
                                                protection=protection))
    seqs, it = [], 0
    while len(seqs) < len(work) or sched.has_work:
        seqs += [sched.add(str(i), p, q) for i, (at, p, q) in enumerate(work) if at == it]
        sched.iterate()
        it += 1
    return sched, seqs


@pytest.mark.timeout(60)
def test_recompute_moves_a_lost_units_requests_and_changes_no_token(reference):
    executor = TwoUnits(dies=1, at=9)
    sched, seqs = _serve(executor, _workload())
    assert executor.died_at is not None
    [failover] = sched.failovers
    assert failover.unit == 1 and failover.moved and not failover.failed
    moved = [s for s in seqs if s.moves]
    assert moved and all(s.output for s in moved)  # some had tokens already when moved
    assert [s.output for s in seqs] == reference
    assert all(s.finish_reason == "length" and s.error is None for s in seqs)
    assert sched.live_units == {0} and sched.slots_total == 2


@pytest.mark.timeout(60)
def test_protection_none_fails_only_the_lost_units_requests(reference):
    sched, seqs = _serve(TwoUnits(dies=1, at=9), _workload(), protection="none")
    [failover] = sched.failovers
    failed = [s for s in seqs if s.request_id in failover.failed]
    assert failed and all(s.finish_reason == "abort" and "unit 1 failed" in s.error and "signal 9" in s.error
                          for s in failed)
    for s, ref in zip(seqs, reference):
        if s not in failed:
            assert s.output == ref and s.error is None


@pytest.mark.timeout(60)
def test_a_planted_resume_bug_is_caught(reference, monkeypatch):
    """The comparison can fail: resume from the prompt alone (forgetting generated tokens)."""
    from masep.engine import scheduler as sched_mod
    monkeypatch.setattr(sched_mod.Sequence, "context", lambda self, start, n: (self.prompt * 4)[start:start + n])
    _, seqs = _serve(TwoUnits(dies=1, at=9), _workload())
    assert [s.output for s in seqs] != reference


def test_losing_every_unit_fails_every_request():
    executor = TwoUnits()
    sched = Scheduler(executor, SchedulerConfig(64, CFG.vocab_size))
    a = sched.add("a", [1, 2, 3], __import__("masep.serve.engine_client", fromlist=["x"]).SamplingParams(5))
    sched.iterate()
    ended = sched.lose_units({0: "gone", 1: "gone too"})
    assert a in ended and a.finish_reason == "abort" and "every attention unit" in a.error
    assert not sched.has_work


# --- on real gloo ranks ----------------------------------------------------------------------
def _cluster(plan, faults, timeout_s=60.0, join_timeout_s=0.0, mirror=False, **where):
    """where: RunSpec's device and backend (test_failover_nccl.py: cuda, nccl)."""
    from masep.parallel.cluster import ClusterExecutor
    from masep.parallel.faults import FaultSpec
    from masep.parallel.worker import RunSpec
    return ClusterExecutor(RunSpec(plan=plan.validate(CFG), requests=[], preset="tiny", timeout_s=timeout_s, **where),
                           max_len=64, max_num_seqs=2, faults=tuple(FaultSpec.parse(f) for f in faults),
                           join_timeout_s=join_timeout_s, mirror=mirror)


def _no_rank_left(executor) -> None:
    executor.shutdown()
    assert not any(p.is_alive() for p in executor.procs.procs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("plan_args,fault,timeout_s", [
    ((2, 1, 1, 2), "kill@1:9", 60.0),  # replica 1's only rank is SIGKILLed
    ((2, 1, 1, 2), "raise@0:9", 60.0),  # replica 0's rank raises (a bug): it reports the error
    ((2, 1, 1, 2), "hang@1:9", 3.0),  # replica 1's rank is SIGSTOPped: silent for the 3 s timeout, then killed
    ((2, 2, 1, 2), "kill@3:9", 60.0),  # one of two head-parallel ranks of replica 1: the whole replica stops
])
def test_a_dead_attention_replica_loses_no_request_and_changes_no_token(reference, plan_args, fault, timeout_s):
    from masep.plan import SeparatedPlan
    executor = _cluster(SeparatedPlan(*plan_args), [fault], timeout_s)
    try:
        sched, seqs = _serve(executor, _workload())
        [failover] = sched.failovers
        assert failover.moved and not failover.failed
        assert [s.output for s in seqs] == reference
        assert all(s.error is None for s in seqs)
        rank = int(fault.split("@")[1].split(":")[0])
        how = {"kill": "SIGKILL", "raise": "injected fault", "hang": "sent nothing for 3 s"}[fault.split("@")[0]]
        assert f"rank {rank}" in failover.reason and how in failover.reason, failover.reason
        if fault.startswith("hang"):
            assert "SIGSTOP" in failover.reason
    finally:
        _no_rank_left(executor)


@pytest.mark.timeout(120)
def test_two_failures_in_a_row_leave_the_last_replica_serving(reference):
    from masep.plan import SeparatedPlan
    executor = _cluster(SeparatedPlan(3, 1, 1, 2), ["kill@1:6", "kill@2:14"])
    try:
        sched, seqs = _serve(executor, _workload())
        assert [f.unit for f in sched.failovers] == [1, 2]
        assert [s.output for s in seqs] == reference
    finally:
        _no_rank_left(executor)


@pytest.mark.timeout(120)
def test_protection_none_on_ranks_fails_the_dead_replicas_requests_only(reference):
    from masep.plan import SeparatedPlan
    executor = _cluster(SeparatedPlan(2, 1, 1, 2), ["kill@1:9"])
    try:
        sched, seqs = _serve(executor, _workload(), protection="none")
        [failover] = sched.failovers
        assert failover.failed and not failover.moved
        for s, ref in zip(seqs, reference):
            if s.request_id in failover.failed:
                assert s.finish_reason == "abort" and "rank 1 of attention replica 1" in s.error
            else:
                assert s.output == ref
    finally:
        _no_rank_left(executor)


@pytest.mark.timeout(120)
def test_a_dead_expert_rank_without_redundancy_fails_fast_naming_it_and_its_experts():
    import time

    from masep.plan import SeparatedPlan
    from masep.serve.engine_client import EngineDead, SamplingParams
    executor = _cluster(SeparatedPlan(2, 1, 1, 2), ["kill@2:5"])
    sched = Scheduler(executor, SchedulerConfig(64, CFG.vocab_size))
    seqs = [sched.add(str(i), [1, 2, 3 + i], SamplingParams(40)) for i in range(3)]
    try:
        start = time.monotonic()
        with pytest.raises(EngineDead, match=r"expert rank 2 \(experts 0, 1, 2, 3, 4, 5, 6, 7\).*SIGKILL"):
            while True:
                start = time.monotonic() if sched.step_id < 5 else start
                sched.iterate()
        assert time.monotonic() - start < 2.0  # from the step the rank died in to the error
        assert all(not s.finished for s in seqs)  # the scheduler still holds them (the engine fails them)
    finally:
        _no_rank_left(executor)


@pytest.mark.timeout(120)
def test_a_dead_expert_rank_without_redundancy_is_replaced_and_the_survivors_keep_their_processes(reference):
    """1 attention rank + 2 expert ranks (experts 0-3 and 4-7), rank 2 SIGKILLed in decode: the
    two requests in flight fail within 2 s naming it and its experts, the queued third waits; a
    new process for rank 2 loads experts 4-7 and forms a new world with ranks 0 and 1 (the same
    processes, attention KV cache kept); then the queued request and a workload that arrives
    after the join get exactly the single-device model's tokens."""
    import os
    import time

    from test_continuous_batching import _alone

    from masep.plan import SeparatedPlan
    from masep.serve.engine_client import ReplaceableRankLost, SamplingParams
    executor = _cluster(SeparatedPlan(1, 1, 2, 2), ["kill@2:5"], join_timeout_s=60)
    try:
        before = {r: i.pid for r, i in executor.infos.items()}
        sched = Scheduler(executor, SchedulerConfig(64, CFG.vocab_size, max_num_batched_tokens=6))
        seqs = [sched.add(str(i), [1, 2, 3 + i], SamplingParams(12, temperature=0.0)) for i in range(3)]
        with pytest.raises(ReplaceableRankLost, match=r"expert rank 2 \(experts 4, 5, 6, 7\).*SIGKILL"):
            while True:
                start = time.monotonic()
                sched.iterate()
        assert time.monotonic() - start < 2.0  # from the start of the step the rank died in to the error
        assert sched.fail_running("lost") == seqs[:2] and sched.waiting == seqs[2:]
        assert "being replaced" in executor.rank_states()[2]["state"]
        joined = executor.replace_lost_ranks()
        after = {r: i.pid for r, i in executor.infos.items()}
        assert joined["ranks"] == [2] and after[2] != before[2]
        assert {r: after[r] for r in (0, 1)} == {r: before[r] for r in (0, 1)}  # not restarted
        assert all(os.path.exists(f"/proc/{after[r]}") for r in (0, 1))
        later, it = [], 0
        while len(later) < len(_workload()) or sched.has_work:
            later += [sched.add(f"w{i}", p, q) for i, (at, p, q) in enumerate(_workload()) if at == it]
            sched.iterate()
            it += 1
        assert [s.output for s in later] == reference
        assert seqs[2].output == _alone(seqs[2].prompt, seqs[2].params)
    finally:
        _no_rank_left(executor)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("placement,dead", [
    (((0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3, 4, 5, 6, 7)), 3),  # every expert on both expert ranks
    (((0, 1, 2, 3, 4, 5), (4, 5, 6, 7, 0, 1), (2, 3, 6, 7)), 4),  # every expert on two of three ranks
])
def test_a_dead_expert_rank_with_redundancy_is_routed_around_and_changes_no_token(reference, placement, dead):
    from masep.plan import SeparatedPlan
    plan = SeparatedPlan(2, 1, len(placement), 2, placement=placement)
    executor = _cluster(plan, [f"kill@{dead}:9"])
    try:
        sched, seqs = _serve(executor, _workload())
        assert not sched.failovers  # no attention replica was lost ...
        assert list(executor.lost_experts) == [dead] and "SIGKILL" in executor.lost_experts[dead]
        assert [s.output for s in seqs] == reference  # ... and no token changed
    finally:
        _no_rank_left(executor)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("plan_args,fault,slots", [((2, 1, 1, 2), "kill@1:9", 4), ((2, 1, 1, 2), "kill@1:9", 2),
                                                   ((3, 1, 1, 2), "kill@1:9", 2), ((2, 2, 1, 2), "kill@1:9", 2)])
def test_mirror_continues_a_dead_replicas_requests_without_recompute(reference, plan_args, fault, slots):
    """Every request of the dead replica goes on where the next replica kept its KV rows, also
    when that replica's own slots are all taken (2 slots per replica: it is full at step 9)."""
    from masep.parallel.cluster import ClusterExecutor
    from masep.parallel.faults import FaultSpec
    from masep.parallel.worker import RunSpec
    from masep.plan import SeparatedPlan
    plan = SeparatedPlan(*plan_args).validate(CFG)
    executor = ClusterExecutor(RunSpec(plan=plan, requests=[], preset="tiny", timeout_s=60), max_len=64,
                               max_num_seqs=slots, faults=(FaultSpec.parse(fault),), mirror=True)
    try:
        sched, seqs = _serve(executor, _workload(), protection="mirror")
        [failover] = sched.failovers
        assert failover.adopted and not failover.moved and not failover.failed  # all on the buddy's copy
        adopted = [s for s in seqs if s.request_id in failover.adopted]
        assert all(s.moves == 0 for s in adopted)  # never prefilled again
        assert [s.output for s in seqs] == reference
    finally:
        _no_rank_left(executor)
