"""Giving up the groups of a dead rank, on the front end's word.

With NCCL a survivor's transfer with a dead peer never ends by itself: the front end tells every
live rank which rank died, the rank's control reader thread gives up (NCCL: aborts) its groups
that include it, and the step thread, released, finds the groups marked and fails the step. The
NCCL half runs in tests/test_failover_nccl.py on two GPUs; here: the marks on real gloo ranks,
the reader thread, and the step check that turns a step the abort cut short into a failure.
"""
from __future__ import annotations

import time
from datetime import timedelta
from multiprocessing import Pipe

import pytest
import torch

from masep.parallel import comm
from masep.parallel.launch import spawn


def _marks_only_the_groups_with_the_dead_rank(_):
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank = dist.get_rank()
    pair = dist.new_group([0, 1])
    alone = [dist.new_group([r]) for r in range(3)][rank]
    others = dist.new_group([0, 2])
    timeout = timedelta(seconds=30)
    if rank != 0:  # rank 0 gives up rank 1's groups; the others only check their groups still work
        dist.barrier(group=dist.group.WORLD)
        return None
    names = comm.give_up_groups_with({1}, "rank 1 (pid 7) was killed by SIGKILL")
    assert set(names) == {comm._group_name(pair), comm._group_name(dist.group.WORLD)}
    assert comm.given_up_why([alone, others]) is None
    assert comm.given_up_why([alone, pair]) == "rank 1 (pid 7) was killed by SIGKILL"
    with pytest.raises(comm.CommError, match=r"test transfer: the group was given up: rank 1 .*SIGKILL"):
        comm.replica_all_reduce(torch.ones(2), pair, timeout, "test transfer")
    assert comm.replica_all_reduce(torch.ones(2), alone, timeout, "alone").tolist() == [1.0, 1.0]
    assert comm.give_up_groups_with({1}, "again") == []  # once per group
    comm.forget_given_up()  # the world is left: names start again in the next one
    assert comm.given_up_why([pair]) is None
    dist.barrier(group=dist.group.WORLD)  # the world was never aborted on gloo: only marked
    return True


@pytest.mark.timeout(60)
def test_a_given_up_group_refuses_transfers_and_the_others_carry_on():
    assert spawn(3, _marks_only_the_groups_with_the_dead_rank, None, timeout_s=50)


@pytest.mark.timeout(20)
def test_the_reader_thread_acts_on_an_abort_while_the_step_thread_is_busy():
    """The step thread does not read while it steps; an abort must still land at once, and every
    other message keep its order."""
    from masep.parallel.rank_loop import RankChannel
    front, rank = Pipe()
    aborts = []
    channel = RankChannel(rank, "rank 2", lambda *a: aborts.append((time.monotonic(), a)))
    try:
        channel.busy(True)
        sent = time.monotonic()
        for msg in [("step", 4, None, [0]), ("abort", 0, [3], "rank 3 was killed"), ("stop",)]:
            front.send(msg)
        deadline = time.monotonic() + 5
        while not aborts and time.monotonic() < deadline:
            time.sleep(0.01)
        assert aborts and aborts[0][1] == (0, [3], "rank 3 was killed") and aborts[0][0] - sent < 1.0
        assert channel.recv() == ("step", 4, None, [0]) and channel.recv() == ("stop",)
        front.close()
        with pytest.raises(ConnectionError):
            channel.recv()
    finally:
        channel.close()


@pytest.mark.timeout(20)
def test_a_step_past_its_limit_gives_up_every_group():
    from masep.parallel.rank_loop import RankChannel
    front, rank = Pipe()
    aborts = []
    channel = RankChannel(rank, "rank 1", lambda *a: aborts.append(a), step_limit_s=0.3)
    try:
        channel.busy(True)
        deadline = time.monotonic() + 5
        while not aborts and time.monotonic() < deadline:
            time.sleep(0.05)
        assert aborts == [(None, None, "rank 1's step ran past 0.3 s; it gave up every group")]
        time.sleep(1.2)
        assert len(aborts) == 1  # once per step
    finally:
        channel.close()


def test_an_abort_about_a_world_already_left_is_ignored(monkeypatch):
    from masep.parallel import rank_loop
    calls = []
    monkeypatch.setattr(rank_loop.comm, "give_up_groups_with", lambda dead, why: calls.append((dead, why)))
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)
    monkeypatch.setattr("torch.distributed.get_world_size", lambda: 3)
    world = rank_loop.WorldEpoch(1)
    world.on_abort(0, [2], "old world")  # sent before the re-formation, read after it
    world.on_abort(1, [2], "rank 2 died")
    world.on_abort(None, None, "step limit")
    assert calls == [({2}, "rank 2 died"), ({0, 1, 2}, "step limit")]


class _Runtime:
    """A separated attention runtime whose forward ends normally although the abort came in
    the middle (what NCCL does: the aborted kernels return, the host read goes through)."""

    def __init__(self, groups):
        from types import SimpleNamespace
        self.bridge = SimpleNamespace(group=groups[0], back_group=None)
        self.replica_group = None
        self.fallback, self.in_step = True, True

    def forward(self, rows, step_id):
        comm._given_up[comm._group_name(self.bridge.group)] = "rank 1 (pid 9) was killed by SIGKILL"
        return torch.zeros(1, 4)


def test_a_step_whose_group_was_given_up_meanwhile_fails_instead_of_answering(monkeypatch):
    from types import SimpleNamespace

    from masep.parallel import rank_loop
    monkeypatch.setattr(rank_loop, "SeparatedAttentionRuntime", _Runtime)
    abandoned = []
    monkeypatch.setattr(rank_loop.comm, "abandon_bridge", abandoned.append)
    group = object()
    runtime = _Runtime([group])
    member = rank_loop.UnitMember.__new__(rank_loop.UnitMember)
    member.runtime, member.links = runtime, None
    member.info = SimpleNamespace(leader=True, unit=0)
    try:
        out = member._forward(3, SimpleNamespace(sample=[None]))
    finally:
        comm.forget_given_up()
    assert isinstance(out, rank_loop.StepFailed)
    assert "step 3 ended by the front end: rank 1 (pid 9) was killed by SIGKILL" in out.why
    assert abandoned == [runtime.bridge]  # routed around: the broken bridge is given up


def test_a_planted_missing_check_would_answer_with_the_cut_short_step(monkeypatch):
    """The check above can fail: without it the same step returns tokens."""
    from types import SimpleNamespace

    from masep.parallel import rank_loop
    monkeypatch.setattr(rank_loop, "SeparatedAttentionRuntime", _Runtime)
    monkeypatch.setattr(rank_loop.UnitMember, "_given_up_in_step", lambda self, before: None)
    member = rank_loop.UnitMember.__new__(rank_loop.UnitMember)
    member.runtime, member.links = _Runtime([object()]), None
    member.info = SimpleNamespace(leader=True, unit=0)
    try:
        out = member._forward(3, SimpleNamespace(sample=[None]))
    finally:
        comm.forget_given_up()
    assert out == [None]


def test_the_front_end_tells_every_live_rank_which_rank_died():
    """ClusterExecutor._kill -> ("abort", epoch, [rank], why) to each live rank but the dead."""
    from masep.parallel.cluster import ClusterExecutor
    sent = {}

    class Conn:
        def __init__(self, r):
            self.r = r

        def send(self, msg):
            sent.setdefault(self.r, []).append(msg)

    ex = ClusterExecutor.__new__(ClusterExecutor)
    ex.conns = {r: Conn(r) for r in range(4)}
    ex.gone = {2: "(pid 5) was killed by SIGKILL (signal 9)", 3: "stopped with attention replica 1"}
    ex.epoch = 1
    ex.procs = object()  # started elsewhere: nothing to kill here
    ex._kill(2)
    want = ("abort", 1, [2], "rank 2 (pid 5) was killed by SIGKILL (signal 9)")
    assert sent == {0: [want], 1: [want]}


def _opens_its_groups_in_creation_order(_):
    """Three ranks, pair groups in a ring: each rank opens only its own groups, in the order they
    were created, and none waits forever on a peer opening another group."""
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    rank = dist.get_rank()
    pairs = [dist.new_group(list(p)) for p in ((0, 1), (1, 2), (0, 2))]
    mine = 1 + sum(rank in p for p in ((0, 1), (1, 2), (0, 2)))  # the world and two pairs
    opened = comm.open_groups(torch.device("cpu"))
    assert opened == mine, (rank, opened, mine)
    if rank == 0:  # a given-up group is not opened again
        comm.give_up_groups_with({2}, "rank 2 (pid 9) was killed by SIGKILL")
        assert comm.open_groups(torch.device("cpu")) == 1  # only the (0, 1) pair has no rank 2
        comm.forget_given_up()
    elif rank == 1:  # rank 0's second opening of the (0, 1) pair
        dist.all_reduce(torch.zeros(1), group=pairs[0])
    dist.barrier()
    return opened


@pytest.mark.timeout(60)
def test_open_groups_builds_every_group_of_the_rank_before_the_first_step():
    assert spawn(3, _opens_its_groups_in_creation_order, None, timeout_s=50) == 3


def _ring_sends_go_on_past_a_given_up_neighbour(_):
    """Mirror ring 0 -> 1 -> 2 -> 0 after rank 1's groups were given up: rank 2 still sends its
    rows to rank 0 (which waits for them) and only then reports the dead group."""
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    rank = dist.get_rank()
    g01, g12, g20 = (dist.new_group(list(p)) for p in ((0, 1), (1, 2), (2, 0)))
    if rank == 1:
        return None  # "dead": takes part in nothing
    if rank == 2:
        comm.give_up_groups_with({1}, "rank 1 (pid 7) was killed by SIGKILL")
        with pytest.raises(comm.CommError, match=r"mirror rows from rank 1: the group was given up: rank 1"):
            comm.pair_transfers([(True, torch.full((3,), 2.0), 0, g20), (False, torch.empty(3), 1, g12)],
                                "mirror rows")
        return None
    got = torch.empty(3)
    for work in comm.pair_transfers([(False, got, 2, g20)], "mirror rows"):
        work.wait()
    return got.tolist()


@pytest.mark.timeout(60)
def test_a_ring_neighbour_still_sends_when_its_other_neighbour_is_given_up():
    assert spawn(3, _ring_sends_go_on_past_a_given_up_neighbour, None, timeout_s=50) == [2.0, 2.0, 2.0]


def _an_expert_rank_that_gives_up_leaves_the_other_to_finish(_):
    """Bridge [attention = rank 0, experts = ranks 1 and 2]. The attention rank dispatches two
    rows to each expert rank; expert rank 2 hears that the replica is dead before it launches its
    receive (the front end's word) and gives the bridge up; expert rank 1, which got its rows,
    must have them at once, not wait on rank 2 until the bridge's limit."""
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, members = dist.get_rank(), [0, 1, 2]
    limit = timedelta(seconds=20)  # far above the moment the rows take to arrive on 2 cores
    bridge = comm.Bridge(dist.new_group(members, timeout=limit), members, rank, 1, 0, 2, limit, torch.device("cpu"))
    hidden, sending = 3, None
    if rank == 0:  # its sends are kept until the end (rank 2 never takes its part)
        rows = torch.arange(4 * hidden, dtype=torch.float32).view(4, hidden)
        sending = comm._all_to_all(rows.new_empty(0, hidden), rows, [0, 0, 0], [0, 2, 2], bridge)
    elif rank == 2:
        comm.give_up_groups_with({0}, "rank 0 was killed by SIGKILL")
        with pytest.raises(comm.CommError, match="given up: rank 0 was killed"):
            comm._all_to_all(torch.empty(2, hidden), torch.empty(0, hidden), [2, 0, 0], [0, 0, 0], bridge)
    else:
        got = torch.empty(2, hidden)
        t0 = time.monotonic()
        comm._wait(comm._all_to_all(got, got.new_empty(0, hidden), [2, 0, 0], [0, 0, 0], bridge), bridge, "dispatch",
                   0, 0, 0)
        waited_s = time.monotonic() - t0
        assert got.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        assert waited_s < 10.0, f"waited {waited_s:.1f} s for rows that had arrived"
    dist.barrier(group=dist.group.WORLD)
    del sending
    return True


@pytest.mark.timeout(90)
def test_an_expert_rank_giving_up_a_dead_replica_does_not_hold_up_the_other_expert_ranks():
    # gloo's own all-to-all passes an empty message between the two expert ranks: rank 1 waits
    # the bridge's 20 s limit for rank 2's and fails (CommError, "timed out": checked by hand)
    assert spawn(3, _an_expert_rank_that_gives_up_leaves_the_other_to_finish, None, timeout_s=80)
