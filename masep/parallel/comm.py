"""All inter-rank communication. Runtime code calls these functions, never torch.distributed.

Attention -> expert traffic runs on a *bridge* group (one attention replica + all expert
ranks): NCCL's `all_to_all_single` with uneven splits; on gloo, point-to-point transfers
between the pairs that carry rows (`_PairWork` says why; EP's group of equals keeps gloo's
all-to-all).

Every step opens with a handshake (`attention_begin_step`, `expert_begin_step`,
`ep_begin_step`): each sender tells the bridge its flag (work, stop, idle), whether the step
is *padded*, and how many token rows it has per micro-batch. (A decode step whose rows every
member was told skips it: `agreed_decode_step`; EP ranks are told the largest rank's rows, a
separated replica and its expert ranks the replica's.) That is the one message the
receivers read on the host, at the step boundary, where the engine has just read the previous
step's tokens anyway. Then, per (layer, micro-batch):

- padded steps (decode): fixed-size blocks (`routing.py`): header rows with the counts, then
  the rows padded to a capacity agreed in the handshake. One collective each way, split sizes
  known on both sides without reading anything on the host, so the whole step runs ahead of
  the GPU (and its compute between transfers can be replayed from CUDA graphs). Headers are
  checked on the device; `end_step` reads the verdicts once the step is over.
- exact steps (prefill, where padding to the worst case would move k*P times the bytes):
  the counts go first as int64 rows [flag, step, layer, mb, c_0..c_{L-1}] and are read and
  checked on the host before the payload (gloo aborts the process on inconsistent split
  sizes), then the payload with exact splits.

Launch and wait are separate calls (`dispatch` launches, `combine` waits; `expert_send`
launches, `wait_sent` waits). On CUDA with NCCL every collective is issued with
async_op=True, so it runs on the process group's own stream, ordered after the producing
kernels by a CUDA event; `wait` makes the compute stream wait on the completion event
without blocking the host. Every wait has a timeout; a CommError names the peers, the layer,
the micro-batch and the step.

Shapes: X tokens, k top-k, H hidden, P bridge members, A attention members, E expert
members, L local experts, C capacity rows, R header rows (routing.py).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from . import routing
from .routing import FLAG_WORK, HEADER

FLAG_STOP, FLAG_IDLE = 2, 3  # stop: this replica is done; idle: an EP rank with no sequences


class CommError(RuntimeError):
    """A transfer failed or timed out; the message names the peers and where in the schedule."""


@dataclass
class Bridge:
    """One attention replica plus all expert ranks. Members are ordered attention first."""

    group: object
    ranks: list[int]  # global ranks of the members
    me: int  # my index in `ranks`
    num_attention: int
    replica: int
    max_local_experts: int
    timeout: timedelta
    device: torch.device
    top_k: int = 1
    back_group: object = None  # the group the outputs return on (None: `group`)

    def __post_init__(self):
        if list(self.ranks) != sorted(self.ranks):  # torch numbers a group's members by global rank
            raise ValueError(f"bridge members {self.ranks}: must be in ascending global rank order, the order "
                             "of the group's ranks that the all-to-all splits follow")

    @property
    def size(self) -> int:
        return len(self.ranks)

    def expert_members(self) -> range:
        return range(self.num_attention, self.size)

    def where(self, what: str, step: int, layer: int, mb: int) -> str:
        return (f"{what} on bridge of attention replica {self.replica} (ranks {self.ranks}), "
                f"step {step}, layer {layer}, micro-batch {mb}")


# --- dry transfers: a whole-step graph's eager warm-up on one side of a bridge ----------------------
_dry = threading.local()


class _NoTransfer:
    """The work handle of a transfer that did not happen (dry_transfers)."""

    def wait(self, timeout=None) -> bool:
        return True


@contextmanager
def dry_transfers():
    """Inside: every transfer of this thread does nothing and every buffer it would receive into
    holds zeros. The eager warm-up before a CUDA-graph capture runs the step once to tune and
    allocate; where the peers do not run that extra step alongside (a separated replica and its
    expert ranks capture their whole-step graphs at different steps), its transfers must not
    reach them. What the warm-up computes from the zeros is thrown away: it rewrites only what
    the replay after it rewrites again (KV positions, the step's buffers, reset by the caller)."""
    before = getattr(_dry, "on", False)
    _dry.on = True
    try:
        yield
    finally:
        _dry.on = before


def _is_dry(*receive_into: torch.Tensor) -> bool:
    if not getattr(_dry, "on", False):
        return False
    for buf in receive_into:
        buf.zero_()
    return True


def _wait(work, bridge: Bridge, what: str, step: int, layer: int, mb: int) -> None:
    _wait_named(work, bridge.timeout, bridge.where(what, step, layer, mb))


def _wait_named(work, timeout: timedelta, what: str) -> None:
    """Wait for a transfer; `what` says who waits for what and where in the schedule.

    gloo: a host wait bounded by `timeout`. NCCL: a stream wait (the host does not block);
    passing a timeout there turns it into a host busy-wait that polls in 10 ms sleeps (we
    measured 10 ms per wait on H200), so the bound is the process group's own timeout, given
    at group creation, which NCCL's watchdog enforces by aborting the communicator."""
    if isinstance(work, _NoTransfer):
        return
    try:
        ok = work.wait() if _stream_waits() else work.wait(timeout=timeout)
    except Exception as err:  # gloo/NCCL raise their own types; re-raise naming the transfer
        raise CommError(f"{what}: {type(err).__name__}: {err}") from err
    if ok is False:
        raise CommError(f"{what}: no answer within {timeout.total_seconds():.0f} s")


def abandon_bridge(bridge: Bridge) -> None:
    """Give up a bridge that a failure broke, so that no peer keeps waiting on it.

    NCCL: a transfer with a dead peer never completes on the device, so the communicators are
    aborted (torch's `_abort_process_group`, where this torch has it) rather than waited on.
    gloo: the groups are destroyed; once the caller drops its last reference to the bridge
    (and the step's transfers), gloo closes its connections and every peer still waiting on
    this rank inside the group gets an error at once instead of waiting out its timeout."""
    groups = [g for g in {bridge.group, bridge.back_group} if g is not None]
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    for group in groups:
        try:
            if _stream_waits() and abort is not None:
                abort(group)
            else:
                dist.destroy_process_group(group)
        except (RuntimeError, ValueError):  # already aborted (NCCL's watchdog) or destroyed
            pass
    bridge.group = bridge.back_group = None


# --- groups given up because a member died --------------------------------------------------------
# Names of this process's groups that the front end said to give up -> why. Written by the
# control thread (rank_loop.RankChannel) while the step thread may be inside a transfer on one of
# them; read by the step thread before each launch and after each host read of received data.
_given_up: dict[str, str] = {}
_given_up_count = 0  # how many groups were ever given up (a step compares it before and after)


def _group_name(group) -> str:
    group = dist.group.WORLD if group is None else group
    return getattr(group, "group_name", None) or str(id(group))


def open_groups(device: torch.device) -> int:
    """Build now the communicator of every group this rank belongs to: one one-element sum per
    group, in the order the groups were created. NCCL would otherwise build each at the group's
    first transfer, inside a serving step, where a cold start of a few groups (seconds each)
    counts against the step's limit and the front end's timeouts. The creation order is the same
    on every rank, so the ranks meet group by group: the earliest group not yet open has every
    member waiting on it, and no rank waits on a peer busy opening another. Returns the number
    of groups opened."""
    table = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_group_ranks", None)
    if not dist.is_initialized() or table is None:
        return 0
    me, one, opened = dist.get_rank(), torch.zeros(1, device=device), 0
    for pg, members in list(table.items()):
        if me in members and _group_name(pg) not in _given_up:
            dist.all_reduce(one, group=pg)
            opened += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return opened


def give_up_groups_with(dead: set[int], why: str) -> list[str]:
    """Give up every group of this process that has a member in `dead` (global ranks); returns
    their names. Safe to call from another thread while a step runs.

    NCCL: a kernel waiting on a dead peer never finishes, and neither does a host read queued
    behind it, so the communicators are aborted, all at once (`_abort_all`). The kernels end, whatever the step thread was blocked on returns, and the mark makes its next
    launch or check raise CommError: a group is never used again after an abort (torch would
    try to build a new communicator with the dead peer). gloo: marked only; its transfers end
    with an error when the dead peer's sockets close (the front end kills a stuck rank)."""
    global _given_up_count
    table = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_group_ranks", None)
    if not dist.is_initialized() or table is None:
        return []
    hit = [pg for pg, members in list(table.items()) if dead & set(members) and _group_name(pg) not in _given_up]
    for pg in hit:
        _given_up[_group_name(pg)] = why
    _given_up_count += len(hit)
    if hit and _stream_waits():
        _abort_all(hit)
    return [_group_name(pg) for pg in hit]


def _abort_all(groups: list, wait_s: float = 60.0) -> None:
    """Abort the communicators of `groups` all at once, one thread each. In sequence they
    deadlock (seen on 2 x H200): ncclCommAbort ends its own kernels and then frees memory, and a
    free waits for the whole device, where the next group's kernel still waits on the dead
    peer. torch's NCCL group call around the aborts does not help, since each
    ProcessGroupNCCL.abort runs its ncclCommAbort on a thread of its own."""
    threads = [threading.Thread(target=_abort_one, args=(pg,), name="masep-abort", daemon=True) for pg in groups]
    for t in threads:
        t.start()
    deadline = time.monotonic() + wait_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


def _abort_one(pg) -> None:
    try:
        if hasattr(pg, "abort"):
            pg.abort()
        else:  # an older torch
            dist.distributed_c10d._abort_process_group(pg)
    except (RuntimeError, ValueError):  # already aborted (NCCL's watchdog) or destroyed
        pass


def given_up_count() -> int:
    return _given_up_count


def given_up_why(groups) -> str | None:
    """Why one of `groups` (None entries skipped) was given up, or None."""
    for group in groups:
        why = _given_up.get(_group_name(group)) if group is not None else None
        if why is not None:
            return why
    return None


def forget_given_up() -> None:
    """The world was left: group names start again from 0 in the next one."""
    _given_up.clear()


def check_group(group, where: str) -> None:
    """Raise CommError when `group` was given up (before a launch, after a host read)."""
    # nothing given up: no lookup on the hot path; group None is the world, as in torch's calls
    why = given_up_why([dist.group.WORLD if group is None else group]) if _given_up else None
    if why is not None:
        raise CommError(f"{where}: the group was given up: {why}")


def pair_transfers(ops: list[tuple[bool, torch.Tensor, int, object]], what: str) -> list:
    """Launch point-to-point transfers, each (send?, tensor, peer global rank, group), as one
    batch per group: NCCL then runs them on the group's own communicator, and a send and a
    receive with one peer on one group go in one batch (in two, each rank's send would queue
    its receive behind it on the group's stream and wait for the peer's, which waits alike).

    Why batches: a lone isend/irecv makes torch build a second, 2-rank communicator inside the
    group, and giving the group up then aborts two in sequence; the idle one's abort frees
    memory, which waits for the whole device, where the other's kernel still waits on the dead
    peer (seen on 4 x H200: the mirror exchange outlived the step limit). Every member of a
    group must take part in its first batch (torch's rule for batch_isend_irecv): a pair group
    has two members and both transfer.

    A group given up (its peer died) gets no transfer, but the other groups' still go, since
    their live peers wait for them (a ring neighbour that skipped its send would leave the next
    replica waiting out its timeout); then CommError names the dead group. Returns the works to
    wait on."""
    by_group: dict[int, list] = {}
    for send, tensor, peer, group in ops:
        by_group.setdefault(id(group), []).append(dist.P2POp(dist.isend if send else dist.irecv, tensor, peer, group))
    works, dead = [], []
    for batch in by_group.values():
        why = given_up_why([batch[0].group]) if _given_up else None  # nothing given up: no lookup
        if why is not None:
            peers = ", ".join(f"{'to' if op.op is dist.isend else 'from'} rank {op.peer}" for op in batch)
            dead.append(f"{what} {peers}: the group was given up: {why}")
            continue
        works += dist.batch_isend_irecv(batch)
    if dead:
        for work in works:  # the live peers take part: these end, and no buffer is freed under them
            work.wait()
        raise CommError("; ".join(dead))
    return works


def _check_bridge(bridge: Bridge, where: str) -> None:
    if bridge.group is None:
        raise CommError(f"{where}: the bridge was given up")
    check_group(bridge.group, where)
    if bridge.back_group is not None:
        check_group(bridge.back_group, where)


def warm_up_bridge(bridge: Bridge) -> None:
    """Connect every pair of the bridge's members now, on both groups, in the same order on
    every member. NCCL creates a communicator at its first collective, and the point-to-point
    connections of an all-to-all at the first all-to-all between each pair, both blocking the
    host until the peer gets there too; a schedule whose two sides first use the return group
    at different points (training's expert ranks send before the attention ranks' next
    dispatch) would wait on each other there for the whole timeout."""
    for group in (bridge.group, bridge.back_group):
        if group is not None:
            x = torch.zeros(bridge.size, device=bridge.device)
            _wait_named(dist.all_to_all_single(torch.empty_like(x), x, group=group, async_op=True), bridge.timeout,
                        f"connecting the bridge of attention replica {bridge.replica} (ranks {bridge.ranks})")


def _stream_waits() -> bool:
    return dist.is_initialized() and dist.get_backend() == "nccl"


def transfers_capturable() -> bool:
    """Whether a CUDA graph can hold this world's transfers: NCCL's, not gloo's (gloo moves a
    CUDA tensor through host memory, which a capture cannot hold)."""
    return _stream_waits()


def _all_to_all(out, inp, out_splits, in_splits, bridge):
    return _bridge_all_to_all(out, inp, out_splits, in_splits, bridge, bridge.group)


def _all_to_all_back(out, inp, out_splits, in_splits, bridge):
    """Expert outputs on their way back: on the bridge's second group, so (with NCCL, one
    communicator per group) they need not queue behind the next micro-batch's dispatch."""
    return _bridge_all_to_all(out, inp, out_splits, in_splits, bridge, bridge.back_group or bridge.group)


def _bridge_all_to_all(out, inp, out_splits, in_splits, bridge: Bridge, group):
    """One all-to-all on a bridge group (splits None: equal). NCCL, and EP (every member talks to
    every other): `all_to_all_single`. A separated bridge on gloo: transfers between the pairs
    that carry rows (`_PairWork`)."""
    _check_bridge(bridge, f"bridge of attention replica {bridge.replica} (ranks {bridge.ranks})")
    if _is_dry(out):
        return _NoTransfer()
    if _stream_waits() or bridge.num_attention == bridge.size:
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)
    return _pairwise(out, inp, out_splits, in_splits, bridge, group)


def _talks(bridge: Bridge, i: int, j: int) -> bool:
    """Whether bridge members i and j send each other anything: never two expert members."""
    return i < bridge.num_attention or j < bridge.num_attention


class _PairWork:
    """The point-to-point transfers of one gloo bridge all-to-all, waited on together.

    Why not gloo's all-to-all: it passes a message, empty or not, between every two members,
    so an expert rank waits on the other expert ranks even where they send it nothing. When an
    attention rank dies, an expert rank that notices first gives the bridge up before it sends
    its empty messages, and a second expert rank, which had got every row it needed from the
    replica, waits on the first for the whole timeout, away from the live replicas, which
    then time out too (seen under `masep serve`: killing one replica's rank failed the other).
    Here each rank waits only on the members that send it rows."""

    def __init__(self, works: list, copy_in: list[tuple[torch.Tensor, torch.Tensor]]):
        self.works, self.copy_in = works, copy_in  # copy_in: (device slice, its host landing buffer)

    def wait(self, timeout: timedelta | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        for work in self.works:
            if deadline is None:
                work.wait()
            else:  # gloo raises when its wait runs out
                work.wait(timeout=timedelta(seconds=max(0.0, deadline - time.monotonic())))
        for dst, landed in self.copy_in:
            dst.copy_(landed)
        return True


def _pairwise(out, inp, out_splits, in_splits, bridge: Bridge, group) -> _PairWork:
    """gloo: send each member its rows and receive each member's, pair by pair, skipping the
    pairs with no rows and those of two expert members (what one would have received from the
    other reads as zeros: expert members only ever send each other zeros, in the equal-split
    handshake and count rows). Both sides of a pair know its split (all_to_all's contract) and
    post their transfers in the schedule's order, which gloo keeps per pair.

    Shapes: out [sum(out_splits), ...] receives, inp [sum(in_splits), ...] sends; splits per
    member (None: equal)."""
    size, me = bridge.size, bridge.me
    out_parts = out.split(out_splits or [out.shape[0] // size] * size)
    in_parts = inp.split(in_splits or [inp.shape[0] // size] * size)
    send_staged, recv_staged = inp.device.type != "cpu", out.device.type != "cpu"  # gloo's p2p: host memory
    works, copy_in = [], []
    for j in range(size):
        if j == me:
            out_parts[j].copy_(in_parts[j])
        elif not _talks(bridge, me, j):
            out_parts[j].zero_()
        elif in_parts[j].numel():
            works.append(dist.isend(in_parts[j].cpu() if send_staged else in_parts[j], bridge.ranks[j], group=group))
    for j in range(size):
        if j != me and _talks(bridge, me, j) and out_parts[j].numel():
            landing = torch.empty(out_parts[j].shape, dtype=out.dtype) if recv_staged else out_parts[j]
            works.append(dist.irecv(landing, bridge.ranks[j], group=group))
            if recv_staged:
                copy_in.append((out_parts[j], landing))
    return _PairWork(works, copy_in)


def exchange_counts(bridge: Bridge, send_PC: torch.Tensor, step: int, layer: int, mb: int) -> torch.Tensor:
    """send_PC [P, HEADER + L] int64, row p for member p -> received [P, HEADER + L] (row p from p)."""
    recv = torch.empty_like(send_PC)
    work = _all_to_all(recv, send_PC.contiguous(), None, None, bridge)
    _wait(work, bridge, "token-count exchange", step, layer, mb)
    return recv


# --- the step handshake ---------------------------------------------------------------------------
@dataclass
class StepLayout:
    """What a bridge agreed at the start of a step."""

    step: int
    flags: list[int]  # per member (attention side of separation: not read, all FLAG_WORK)
    padded: bool
    caps: list[int]  # per micro-batch: payload rows of one (sender, receiver) block
    header_rows: int
    rows: list[int] = field(default_factory=list)  # per micro-batch: the largest sender's tokens
    checks: list = field(default_factory=list)  # (layer, mb, first sender member, bad_S [S] bool)
    demands: list = field(default_factory=list)  # (mb, demand_S [S]): senders' largest rows to one receiver
    agreed: bool = False  # laid out from rows every member was told, with no handshake


class StepHeads:
    """The header every padded transfer of a step carries, int64 [layers, m, 4] = flag, step,
    layer, mb, on the device. One buffer, updated in place per step: CUDA graphs that pack or
    check headers read it at a fixed address."""

    def __init__(self, num_layers: int, microbatches: int, device):
        layer, mb = torch.meshgrid(torch.arange(num_layers), torch.arange(microbatches), indexing="ij")
        self.buf = torch.stack([torch.full_like(layer, FLAG_WORK), torch.zeros_like(layer), layer, mb], -1).to(device)

    def set_step(self, step: int) -> None:
        self.buf[..., 1].fill_(step)

    def get(self, layer: int, mb: int) -> torch.Tensor:
        return self.buf[layer, mb]


def _handshake_rows(bridge: Bridge, flag: int, step: int, padded: bool, rows_M: list[int],
                    caps_M: list[int]) -> torch.Tensor:
    """[P, HEADER + 2m] int64, the same row for every member: flag, step, padded, m, then the
    sender's tokens and its block capacity per micro-batch. The copy to the GPU is a blocking
    one (pageable memory), at the step boundary where the engine has just read the previous
    step's tokens, so the GPU's queue is empty and it costs no stall; an engine that queued
    steps ahead would want a pinned buffer here."""
    row = torch.tensor([flag, step, int(padded), len(rows_M), *rows_M, *caps_M], dtype=torch.int64)
    return row.expand(bridge.size, -1).contiguous().to(bridge.device)


def _worst_caps(bridge: Bridge, rows_M: list[int]) -> list[int]:
    return [routing.capacity(r, bridge.top_k, bridge.max_local_experts) for r in rows_M]


def _layout(bridge: Bridge, step: int, flags: list[int], padded: bool, rows_SM: list[list[int]],
            caps_SM: list[list[int]], hidden: int, dtype: torch.dtype) -> StepLayout:
    """Every sender's announced rows and capacities per micro-batch -> the step's layout (the
    largest sender sets the block)."""
    caps = [max(col, default=0) for col in zip(*caps_SM)]
    rows = [max(col, default=0) for col in zip(*rows_SM)]
    hdr = routing.header_rows(bridge.max_local_experts, hidden, dtype) if padded else 0
    return StepLayout(step, flags, padded, caps, hdr, rows)


def attention_begin_step(bridge: Bridge, step: int, rows_M: list[int], padded: bool, hidden: int,
                         dtype: torch.dtype, flag: int = FLAG_WORK, caps_M: list[int] | None = None) -> StepLayout:
    """Separated attention rank: announce this step (rows_M = the largest token slice of the
    replica per micro-batch, caps_M its blocks' capacities, both the same on every rank of the
    replica; None: the worst case). Nothing is read back, so the host does not wait here on NCCL."""
    caps_M = _worst_caps(bridge, rows_M) if caps_M is None else list(caps_M)
    send = _handshake_rows(bridge, flag, step, padded, rows_M, caps_M)
    recv = torch.empty_like(send)
    _wait(_all_to_all(recv, send, None, None, bridge), bridge, "step handshake", step, 0, 0)
    return _layout(bridge, step, [flag] * bridge.num_attention, padded, [rows_M], [caps_M], hidden, dtype)


def expert_begin_step(bridge: Bridge, step: int, microbatches: int, hidden: int, dtype: torch.dtype) -> StepLayout:
    """Expert rank: read one replica's announcement (blocks until the replica starts its step).
    flags == [FLAG_STOP, ...] means the replica is done."""
    send = torch.zeros(bridge.size, HEADER + 2 * microbatches, dtype=torch.int64, device=bridge.device)
    recv = torch.empty_like(send)
    _wait(_all_to_all(recv, send, None, None, bridge), bridge, "step handshake", step, 0, 0)
    rows = recv[: bridge.num_attention].tolist()
    where = bridge.where("step handshake", step, 0, 0)
    _check_bridge(bridge, where)  # NCCL: an aborted receive returns whatever the buffer held
    flags = sorted({r[0] for r in rows})
    if flags == [FLAG_STOP]:
        return StepLayout(step, [FLAG_STOP] * bridge.num_attention, False, [], 0)
    _check_handshake(rows, bridge, step, microbatches, where)
    m = microbatches
    caps = [r[HEADER + m:] for r in rows]
    if any(c != caps[0] for c in caps):  # a replica's ranks pack with their own capacity: they must agree
        raise CommError(f"{where}: the ranks {bridge.ranks[:bridge.num_attention]} announced different block "
                        f"capacities {caps}: their capacity policies diverged")
    return _layout(bridge, step, [FLAG_WORK] * bridge.num_attention, bool(rows[0][2]),
                   [r[HEADER:HEADER + m] for r in rows], caps, hidden, dtype)


def agreed_decode_step(bridge: Bridge, step: int, rows_M: list[int], caps_M: list[int], hidden: int,
                       dtype: torch.dtype) -> StepLayout:
    """A padded step whose rows and capacities every member computed alike from what they were
    all told (EP: the largest rank's rows): the layout the handshake would agree on, without it.
    Nothing moves and nothing is read; a member that computed otherwise is caught by the block
    header checks."""
    layout = _layout(bridge, step, [FLAG_WORK] * bridge.size, True, [rows_M], [caps_M], hidden, dtype)
    layout.agreed = True
    return layout


def ep_begin_step(bridge: Bridge, step: int, rows_M: list[int], padded: bool, hidden: int, dtype: torch.dtype,
                  idle: bool, caps_M: list[int] | None = None) -> StepLayout:
    """EP rank: every rank announces and reads every other's (all ranks send and receive); the
    blocks hold the largest capacity any rank asked for (caps_M None: the worst case)."""
    flag = FLAG_IDLE if idle else FLAG_WORK
    caps_M = _worst_caps(bridge, rows_M) if caps_M is None else list(caps_M)
    send = _handshake_rows(bridge, flag, step, padded, rows_M, caps_M)
    recv = torch.empty_like(send)
    _wait(_all_to_all(recv, send, None, None, bridge), bridge, "step handshake", step, 0, 0)
    rows = recv.tolist()
    _check_bridge(bridge, bridge.where("step handshake", step, 0, 0))
    busy = [r for r in rows if r[0] != FLAG_IDLE]
    m = len(rows_M)
    if busy:  # idle ranks know nothing of the step's shape; the busy ones must agree
        _check_handshake(busy, bridge, step, m, bridge.where("step handshake", step, 0, 0))
        padded = bool(busy[0][2])
    return _layout(bridge, step, [r[0] for r in rows], padded, [r[HEADER:HEADER + m] for r in rows],
                   [r[HEADER + m:] for r in rows], hidden, dtype)


def _check_handshake(rows: list[list[int]], bridge: Bridge, step: int, microbatches: int, where: str) -> None:
    for p, r in enumerate(rows):
        if r[0] not in (FLAG_WORK, FLAG_IDLE) or r[1] != step or r[3] != microbatches or r[2] != rows[0][2]:
            raise CommError(f"{where}: rank {bridge.ranks[p]} announced [flag, step, padded, micro-batches] = "
                            f"{r[:HEADER]}, expected [{FLAG_WORK}, {step}, {rows[0][2]}, {microbatches}]: "
                            "the ranks' schedules or plans diverged")


def end_step(layout: StepLayout, bridge: Bridge) -> bool:
    """Read the device-side checks of a padded step (one host read, after the step): raise on a
    bad header; True when a sender's rows overflowed a block's capacity (the senders run the
    step again at the worst-case capacity, and the receivers serve it again)."""
    return read_step_checks(layout, bridge)[0]


def read_step_checks(layout: StepLayout, bridge: Bridge) -> tuple[bool, list[int]]:
    """end_step, and the senders' largest rows to one receiver per micro-batch (any layer, any
    sender): what the senders' capacity policy observes (capacity.py), so a receiver that sizes
    the next blocks itself (an expert rank told the replica's rows) observes the same."""
    if not layout.checks and not layout.demands:
        return False, []
    # one host read: each header check's verdict, each transfer's largest demand (an overflow
    # is a demand past its micro-batch's capacity, decided here from those)
    values = torch.stack([c[3].any().long() for c in layout.checks] + [d.max() for _, d in layout.demands]).tolist()
    verdicts = values[:len(layout.checks)]
    _check_bridge(bridge, bridge.where("block header check", layout.step, -1, -1))
    checks = layout.checks[:]
    demand_M = [0] * len(layout.caps)
    for (mb, _), d in zip(layout.demands, values[len(layout.checks):]):
        demand_M[mb] = max(demand_M[mb], d)
    overflow = any(d > c for d, c in zip(demand_M, layout.caps))
    layout.checks.clear()
    layout.demands.clear()
    for (layer, mb, first, bad_S), is_bad in zip(checks, verdicts):
        if is_bad:
            senders = [bridge.ranks[first + s] for s in torch.nonzero(bad_S).flatten().tolist()]
            raise CommError(f"{bridge.where('block header check', layout.step, layer, mb)}: ranks {senders} sent "
                            "a header for another (step, layer, micro-batch) or counts beyond the capacity: the "
                            "schedules diverged (their rows were dropped)")
    return overflow, demand_M


def send_stop(bridge: Bridge, step: int, hidden: int, dtype: torch.dtype, microbatches: int) -> None:
    """Tell the expert ranks this replica has no more work (in place of a step handshake)."""
    attention_begin_step(bridge, step, [0] * microbatches, False, hidden, dtype, flag=FLAG_STOP)


# --- attention side ---------------------------------------------------------------------------
@dataclass
class ExpertRoute:
    """Where each global expert is served for one replica: bridge member and local index there."""

    member_E: torch.Tensor  # [num_experts] int64
    local_E: torch.Tensor  # [num_experts] int64

    @classmethod
    def build(cls, placement, holder_E: list[int], first_member: int, device) -> "ExpertRoute":
        """holder_E[e]: the expert-group index serving expert e; expert-group index g is bridge
        member first_member + g, and e is entry placement[g].index(e) of its experts."""
        local = [placement[g].index(e) for e, g in enumerate(holder_E)]
        return cls(torch.tensor([first_member + g for g in holder_E], device=device),
                   torch.tensor(local, device=device))


@dataclass
class DispatchHandle:
    """All that combine needs: which token and weight each sent row belongs to, and the splits."""

    bridge: Bridge
    step: int
    layer: int
    mb: int
    num_tokens: int
    rows: routing.SortedRows
    splits: list[int]  # exact: rows sent to each member; padded: payload rows per member block
    work: object = None
    keep: list = field(default_factory=list)  # buffers alive until the transfer completes
    pos_R: torch.Tensor | None = None  # padded: slot of each sorted row in the returned blocks
    keep_R: torch.Tensor | None = None  # padded: the pairs that fit in their blocks (routing.pack)

    def combine_inputs(self, back_NH: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What routing.gather needs besides the token count: (returned rows, pos_R, token_R,
        weight_R[, keep_R]); all tensors, so a CUDA-graph segment can take them as inputs."""
        out = (back_NH, self.pos_R, self.rows.token_R, self.rows.weight_R)
        return out if self.keep_R is None else out + (self.keep_R,)


def _sorted_rows(ids_Xk, weights_Xk, route: ExpertRoute, bridge: Bridge) -> routing.SortedRows:
    return routing.sort_rows(ids_Xk, weights_Xk, route.member_E, route.local_E, bridge.size,
                             bridge.max_local_experts)


def _head(step: int, layer: int, mb: int, device) -> torch.Tensor:
    return torch.tensor([FLAG_WORK, step, layer, mb], dtype=torch.int64).to(device, non_blocking=True)


def _exact_counts(rows: routing.SortedRows, bridge: Bridge, step: int, layer: int, mb: int) -> torch.Tensor:
    counts = torch.zeros(bridge.size, HEADER + bridge.max_local_experts, dtype=torch.int64, device=bridge.device)
    counts[:, :HEADER] = torch.tensor([FLAG_WORK, step, layer, mb], device=bridge.device)
    counts[:, HEADER:] = rows.counts_PL
    return counts


def _expert_sorted_order(counts_PL: torch.Tensor) -> torch.Tensor:
    """Rows arrive grouped by (sender, local expert); the permutation that groups them by local
    expert across senders (stable, so each sender's rows keep their order)."""
    senders, num_local = counts_PL.shape
    local_of_row = torch.repeat_interleave(torch.arange(num_local, device=counts_PL.device).repeat(senders),
                                           counts_PL.flatten())
    return torch.argsort(local_of_row, stable=True)


def pack_for_experts(x_XH: torch.Tensor, ids_Xk: torch.Tensor, weights_Xk: torch.Tensor, route: ExpertRoute,
                     bridge: Bridge, layout: StepLayout, mb: int, head_4: torch.Tensor) -> routing.Packed:
    """Padded step: the blocks for the expert members (device work only, no host read, no
    transfer: a CUDA graph can hold it). head_4 int64 [4] = flag, step, layer, mb."""
    rows = _sorted_rows(ids_Xk, weights_Xk, route, bridge)
    return routing.pack(x_XH, rows, bridge.num_attention, len(bridge.expert_members()), layout.caps[mb],
                        layout.header_rows, head_4)


def send_packed(packed: routing.Packed, bridge: Bridge, layout: StepLayout, layer: int, mb: int,
                num_tokens: int) -> DispatchHandle:
    """Launch the blocks [E, R+C, H] of `num_tokens` tokens to the expert members."""
    a, e, cap = bridge.num_attention, len(bridge.expert_members()), layout.caps[mb]
    send = packed.blocks.view(-1, packed.blocks.shape[-1])
    work = _all_to_all(send.new_empty(0, send.shape[1]), send, [0] * bridge.size,
                       [0] * a + [layout.header_rows + cap] * e, bridge)
    return DispatchHandle(bridge, layout.step, layer, mb, num_tokens, packed.rows, [0] * a + [cap] * e, work, [send],
                          packed.pos_R, packed.keep_R)


def dispatch(x_XH: torch.Tensor, ids_Xk: torch.Tensor, weights_Xk: torch.Tensor, route: ExpertRoute,
             bridge: Bridge, layout: StepLayout, layer: int, mb: int) -> DispatchHandle:
    """Launch the send of each token's hidden state to the ranks holding its top-k experts.

    x [X, H] (model dtype), ids/weights [X, k]. Returns once the payload is in flight;
    combine(handle) waits for it. Padded steps read nothing on the host."""
    step = layout.step
    if layout.padded:
        packed = pack_for_experts(x_XH, ids_Xk, weights_Xk, route, bridge, layout, mb,
                                  _head(step, layer, mb, x_XH.device))
        return send_packed(packed, bridge, layout, layer, mb, x_XH.shape[0])
    return dispatch_rows(x_XH, _sorted_rows(ids_Xk, weights_Xk, route, bridge), bridge, layout, layer, mb)


def sort_for_bridge(ids_Xk: torch.Tensor, weights_Xk: torch.Tensor, route: ExpertRoute,
                    bridge: Bridge) -> routing.SortedRows:
    """The (token, expert) pairs sorted by destination; weight_R keeps the weights' autograd
    history, so a trainer's combine differentiates through it."""
    return _sorted_rows(ids_Xk, weights_Xk, route, bridge)


def dispatch_rows(x_XH: torch.Tensor, rows: routing.SortedRows, bridge: Bridge, layout: StepLayout, layer: int,
                  mb: int) -> DispatchHandle:
    """Exact step: agree the counts, then launch rows x[token_R] [N, H] to their experts."""
    step = layout.step
    counts = _exact_counts(rows, bridge, step, layer, mb)
    exchange_counts(bridge, counts, step, layer, mb)
    splits = counts[:, HEADER:].sum(1).tolist()
    send = x_XH[rows.token_R].contiguous()
    work = _all_to_all(x_XH.new_empty(0, x_XH.shape[1]), send, [0] * bridge.size, splits, bridge)
    pos = torch.arange(send.shape[0], device=send.device)
    return DispatchHandle(bridge, step, layer, mb, x_XH.shape[0], rows, splits, work, [send], pos)


def receive_outputs(handle: DispatchHandle, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Wait for the dispatch, then for the experts' outputs: [rows, H], where handle.pos_R
    finds each sorted pair's output row."""
    b = handle.bridge
    _wait(handle.work, b, "dispatch payload", handle.step, handle.layer, handle.mb)
    out = torch.empty(sum(handle.splits), hidden, dtype=dtype, device=b.device)
    work = _all_to_all_back(out, out.new_empty(0, hidden), handle.splits, [0] * b.size, b)
    _wait(work, b, "combine payload", handle.step, handle.layer, handle.mb)
    return out


def combine(handle: DispatchHandle, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Wait for the experts' outputs and return sum_k weight_k * expert_k(x) per token [X, H]."""
    return routing.weighted_sum(handle.num_tokens, *combine_inputs_of(handle, hidden, dtype))


def combine_inputs_of(handle: DispatchHandle, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Wait for the experts' outputs; what routing.gather needs (DispatchHandle.combine_inputs)."""
    return handle.combine_inputs(receive_outputs(handle, hidden, dtype))


# --- expert side ------------------------------------------------------------------------------
@dataclass
class ExpertBatch:
    """Rows received for this rank's experts, sorted by local expert across all senders."""

    x_NH: torch.Tensor
    counts_L: torch.Tensor  # [local experts] rows per local expert
    perm_N: torch.Tensor  # exact: arrival order -> expert-sorted order; padded: slot of each sorted row
    source_splits: list[int]  # rows received from each member (padded: per block, payload only)
    senders: int = 0  # padded: number of sending blocks


def _check_counts(bridge: Bridge, recv: torch.Tensor, step: int, layer: int, mb: int, num_local: int,
                  senders: range) -> None:
    """Validate exact-step headers and counts from the senders (host read)."""
    where = bridge.where("token-count check", step, layer, mb)
    recv = recv.cpu()
    _check_bridge(bridge, where)
    for p in senders:
        got = tuple(recv[p, :HEADER].tolist())
        if got != (FLAG_WORK, step, layer, mb):
            raise CommError(f"{where}: rank {bridge.ranks[p]} sent header (flag, step, layer, mb)={got}: "
                            "the schedules diverged")
    counts = recv[:, HEADER:]
    outside = [p for p in range(bridge.size) if p not in senders]
    if (counts < 0).any() or counts[:, num_local:].any() or counts[outside].any():
        raise CommError(f"{where}: invalid token counts {counts.tolist()} for {num_local} local experts")


def expert_receive(bridge: Bridge, layout: StepLayout, num_local: int, hidden: int, dtype: torch.dtype,
                   layer: int, mb: int) -> ExpertBatch:
    """Receive this (layer, mb)'s rows from the replica's attention ranks."""
    a, step = bridge.num_attention, layout.step
    if layout.padded:  # the runtime's expert server calls these pieces itself (with CUDA graphs)
        blocks = blocks_arrived(expert_receive_blocks(bridge, layout, hidden, dtype, layer, mb))
        got = routing.unpack(blocks, layout.header_rows, bridge.max_local_experts, num_local,
                             _head(step, layer, mb, blocks.device))
        layout.checks.append((layer, mb, 0, got.bad_S))
        layout.demands.append((mb, got.demand_S))
        return ExpertBatch(got.x_NH, got.counts_L, got.slot_N, [layout.caps[mb]] * a, a)
    recv = exchange_counts(bridge, torch.zeros(bridge.size, HEADER + bridge.max_local_experts,
                                               dtype=torch.int64, device=bridge.device), step, layer, mb)
    _check_counts(bridge, recv, step, layer, mb, num_local, range(a))
    counts_PL = recv[:, HEADER:HEADER + num_local]
    splits = counts_PL.sum(1).tolist()
    x = torch.empty(sum(splits), hidden, dtype=dtype, device=bridge.device)
    work = _all_to_all(x, x.new_empty(0, hidden), splits, [0] * bridge.size, bridge)
    _wait(work, bridge, "dispatch payload", step, layer, mb)
    perm = _expert_sorted_order(counts_PL)
    return ExpertBatch(x[perm], counts_PL.sum(0), perm, splits)


@dataclass
class PendingBlocks:
    """A posted receive of padded blocks; `blocks_arrived` waits for it."""

    work: object
    blocks: torch.Tensor  # [S, R+C, H]
    bridge: Bridge
    step: int
    layer: int
    mb: int


def expert_receive_blocks(bridge: Bridge, layout: StepLayout, hidden: int, dtype: torch.dtype, layer: int,
                          mb: int) -> PendingBlocks:
    """Padded step: post the receive of the blocks from the replica's attention members."""
    a, width = bridge.num_attention, layout.header_rows + layout.caps[mb]
    x = torch.empty(a * width, hidden, dtype=dtype, device=bridge.device)
    work = _all_to_all(x, x.new_empty(0, hidden), [width] * a + [0] * (bridge.size - a), [0] * bridge.size, bridge)
    return PendingBlocks(work, x.view(a, width, hidden), bridge, layout.step, layer, mb)


def blocks_arrived(pending: PendingBlocks) -> torch.Tensor:
    """Wait for posted blocks [S, R+C, H] (NCCL: the compute stream waits, the host does not)."""
    _wait(pending.work, pending.bridge, "dispatch payload", pending.step, pending.layer, pending.mb)
    return pending.blocks


def expert_send_back(back_SCH: torch.Tensor, bridge: Bridge, layout: StepLayout, layer: int, mb: int):
    """Padded step: launch the outputs [A, C, H] back to the attention members (see wait_sent)."""
    a, cap = back_SCH.shape[0], back_SCH.shape[1]
    back = back_SCH.view(-1, back_SCH.shape[-1])
    work = _all_to_all_back(back.new_empty(0, back.shape[1]), back, [0] * bridge.size,
                            [cap] * a + [0] * (bridge.size - a), bridge)
    return (work, back, bridge, layout.step, layer, mb)


def _back_rows(y_NH: torch.Tensor, batch: ExpertBatch) -> torch.Tensor:
    """Expert outputs in the order the rows arrived: [sum(source_splits), H]."""
    if batch.senders:
        return routing.unsort(y_NH, batch.perm_N, batch.senders).reshape(-1, y_NH.shape[1])
    back = torch.empty_like(y_NH)
    back[batch.perm_N] = y_NH
    return back


def expert_send(y_NH: torch.Tensor, batch: ExpertBatch, bridge: Bridge, layout: StepLayout, layer: int, mb: int):
    """Launch the return of expert outputs (expert-sorted rows [N, H]) to their senders.
    Returns a handle for `wait_sent`."""
    back = _back_rows(y_NH, batch)
    splits = batch.source_splits + [0] * (bridge.size - len(batch.source_splits))
    work = _all_to_all_back(back.new_empty(0, y_NH.shape[1]), back, [0] * bridge.size, splits, bridge)
    return (work, back, bridge, layout.step, layer, mb)


def wait_sent(pending) -> None:
    work, _, bridge, step, layer, mb = pending
    _wait(work, bridge, "combine payload", step, layer, mb)


# --- inside an attention replica --------------------------------------------------------------
def replica_all_reduce(x: torch.Tensor, group, timeout: timedelta, what: str, largest: bool = False) -> torch.Tensor:
    """Sum partial attention outputs of a replica's head-parallel ranks (in place); `largest`:
    the element-wise maximum instead (ranks agreeing on a step's largest demand)."""
    op = dist.ReduceOp.MAX if largest else dist.ReduceOp.SUM
    check_group(group, what)
    if not _is_dry():  # dry: this rank's part stands for the sum
        _wait_named(dist.all_reduce(x, op=op, group=group, async_op=True), timeout, f"{what}: all-reduce")
    return x


def replica_all_gather_rows(x_slice: torch.Tensor, splits: list[int], group, timeout: timedelta,
                            what: str) -> torch.Tensor:
    """Concatenate each head-parallel rank's token slice [splits[t], H] into [sum(splits), H].
    Slices are padded to the largest so the collective has equal sizes."""
    pad = max(splits)
    buf = x_slice.new_zeros(pad, x_slice.shape[1])
    buf[: x_slice.shape[0]] = x_slice
    parts = [torch.empty_like(buf) for _ in splits]
    check_group(group, what)
    if not _is_dry(*parts):
        _wait_named(dist.all_gather(parts, buf, group=group, async_op=True), timeout, f"{what}: all-gather")
    return torch.cat([p[:n] for p, n in zip(parts, splits)])


# --- colocated expert parallelism: every member sends and receives ------------------------------
@dataclass
class ExchangeHandle:
    """Both halves of a symmetric EP exchange: what this rank sent (for combine) and what it got."""

    sent: DispatchHandle
    layout: StepLayout
    got: ExpertBatch | None = None  # exact steps
    recv: torch.Tensor | None = None  # padded: blocks as they arrived [P*(R+C), H]
    work: object = None
    back: torch.Tensor | None = None  # expert outputs on their way back to their senders


def ep_pack(x_XH: torch.Tensor, ids_Xk: torch.Tensor, weights_Xk: torch.Tensor, route: ExpertRoute,
            bridge: Bridge, layout: StepLayout, mb: int, head_4: torch.Tensor) -> routing.Packed:
    """Padded EP step: the blocks for every member, this rank included [P, R+C, H] (device work only)."""
    rows = _sorted_rows(ids_Xk, weights_Xk, route, bridge)
    return routing.pack(x_XH, rows, 0, bridge.size, layout.caps[mb], layout.header_rows, head_4)


def ep_send_packed(packed: routing.Packed, bridge: Bridge, layout: StepLayout, layer: int, mb: int,
                   num_tokens: int) -> ExchangeHandle:
    """Launch the symmetric exchange of equal blocks (no split sizes to agree on)."""
    send = packed.blocks.view(-1, packed.blocks.shape[-1])
    recv = torch.empty_like(send)
    work = _all_to_all(recv, send, None, None, bridge)
    sent = DispatchHandle(bridge, layout.step, layer, mb, num_tokens, packed.rows, [layout.caps[mb]] * bridge.size,
                          work, [send], packed.pos_R, packed.keep_R)
    return ExchangeHandle(sent, layout, recv=recv)


def ep_receive_blocks(handle: ExchangeHandle) -> torch.Tensor:
    """Padded EP step: wait for the blocks every member sent this rank [P, R+C, H]."""
    s = handle.sent
    _wait(s.work, s.bridge, "dispatch payload", s.step, s.layer, s.mb)
    return handle.recv.view(s.bridge.size, handle.layout.header_rows + handle.layout.caps[s.mb], -1)


def ep_send_back(handle: ExchangeHandle, back_PCH: torch.Tensor) -> None:
    """Padded EP step: launch the expert outputs [P, C, H] back; this rank's own come back too."""
    send = back_PCH.reshape(-1, back_PCH.shape[-1])
    handle.back = torch.empty_like(send)
    handle.work = _all_to_all_back(handle.back, send, None, None, handle.sent.bridge)
    handle.sent.keep.append(send)


def ep_receive_back(handle: ExchangeHandle) -> torch.Tensor:
    """Wait for this rank's rows' expert outputs; handle.sent.pos_R locates each pair's row."""
    s = handle.sent
    _wait(handle.work, s.bridge, "combine payload", s.step, s.layer, s.mb)
    return handle.back


def ep_dispatch(x_XH: torch.Tensor, ids_Xk: torch.Tensor, weights_Xk: torch.Tensor, route: ExpertRoute,
                bridge: Bridge, layout: StepLayout, num_local: int, layer: int, mb: int) -> ExchangeHandle:
    """Exact (prefill) step: launch the all-to-all of token rows among all EP ranks (x [X, H],
    ids/weights [X, k]) once the counts are agreed. Padded steps use ep_pack / ep_send_packed."""
    return ep_dispatch_rows(x_XH, _sorted_rows(ids_Xk, weights_Xk, route, bridge), bridge, layout, num_local,
                            layer, mb)


def ep_received(handle: ExchangeHandle) -> ExpertBatch:
    """Exact step: wait for this rank's incoming rows; returns them sorted by local expert."""
    s = handle.sent
    _wait(s.work, s.bridge, "dispatch payload", s.step, s.layer, s.mb)
    handle.got.x_NH = handle.got.x_NH[handle.got.perm_N]
    return handle.got


def ep_combine_launch(handle: ExchangeHandle, y_NH: torch.Tensor) -> None:
    """Exact step: send expert outputs (expert-sorted rows) back to their senders; receive our
    own rows' (ep_receive_back waits)."""
    s, got = handle.sent, handle.got
    back = _back_rows(y_NH, got)
    handle.back = torch.empty(sum(s.splits), y_NH.shape[1], dtype=y_NH.dtype, device=y_NH.device)
    handle.work = _all_to_all_back(handle.back, back, s.splits, got.source_splits, s.bridge)
    s.keep.append(back)


# --- tensor and pipeline parallelism ------------------------------------------------------------
def group_all_reduce(x: torch.Tensor, group, timeout: timedelta, what: str) -> torch.Tensor:
    """In-place sum over a group (the TP all-reduce after attention and after the experts)."""
    return replica_all_reduce(x, group, timeout, what)


def send_activation(x: torch.Tensor, dst: int, group, timeout: timedelta, what: str):
    """Launch a point-to-point send of a stage's output [b, t, H] to the next stage's rank `dst`."""
    x = x.contiguous()
    check_group(group, what)
    return (dist.isend(x, dst=dst, group=group), x, timeout, what)


def recv_activation(shape, dtype, device, src: int, group, timeout: timedelta, what: str) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device)
    check_group(group, what)
    _wait_named(dist.irecv(buf, src=src, group=group), timeout, f"{what}: activations from rank {src}")
    return buf


def wait_activation_sent(pending) -> None:
    work, _, timeout, what = pending
    _wait_named(work, timeout, f"{what}: sending activations")


def broadcast(x: torch.Tensor, src: int, group, timeout: timedelta, what: str) -> torch.Tensor:
    """Share the last stage's logits with every rank of the model instance (in place)."""
    check_group(group, what)
    _wait_named(dist.broadcast(x, src=src, group=group, async_op=True), timeout, f"{what}: broadcast from rank {src}")
    return x


# --- training: gradients retrace the rows' path with the splits both sides already know ----------
@dataclass
class GradHandle:
    """Output gradients on their way to the experts and the input gradients' posted receive."""

    dispatch: DispatchHandle
    sent: object
    back: object
    keep: list


def launch_output_grads(handle: DispatchHandle, grad_NH: torch.Tensor) -> GradHandle:
    """Backward of combine on an attention rank: launch the gradients of the N expert-output
    rows to the experts that produced them (the dispatch's splits) and post the receive of the
    gradients of the rows this rank sent, [N, H] (wait_input_grads)."""
    b = handle.bridge
    send = grad_NH.contiguous()
    sent = _all_to_all(send.new_empty(0, send.shape[1]), send, [0] * b.size, handle.splits, b)
    got = torch.empty_like(send)
    back = _all_to_all_back(got, got.new_empty(0, send.shape[1]), handle.splits, [0] * b.size, b)
    return GradHandle(handle, sent, back, [send, got])


def wait_input_grads(g: GradHandle) -> torch.Tensor:
    """The gradients of the rows this rank sent, [N, H] in the dispatch's sorted order."""
    h = g.dispatch
    _wait(g.sent, h.bridge, "output-gradient payload", h.step, h.layer, h.mb)
    _wait(g.back, h.bridge, "input-gradient payload", h.step, h.layer, h.mb)
    return g.keep[1]


def expert_receive_grads(bridge: Bridge, batch: ExpertBatch, layout: StepLayout, layer: int,
                         mb: int) -> torch.Tensor:
    """Expert rank, backward: the output gradients of the rows `batch` held, in its
    expert-sorted order [N, H] (they arrive in the order the rows did)."""
    splits = batch.source_splits + [0] * (bridge.size - len(batch.source_splits))
    x = batch.x_NH.new_empty(sum(splits), batch.x_NH.shape[1])
    work = _all_to_all(x, x.new_empty(0, x.shape[1]), splits, [0] * bridge.size, bridge)
    _wait(work, bridge, "output-gradient payload", layout.step, layer, mb)
    return x[batch.perm_N]


def ep_dispatch_rows(x_XH: torch.Tensor, rows: routing.SortedRows, bridge: Bridge, layout: StepLayout,
                     num_local: int, layer: int, mb: int) -> ExchangeHandle:
    """ep_dispatch with the pairs already sorted (sort_for_bridge)."""
    step, p, hidden = layout.step, bridge.size, x_XH.shape[1]
    counts = _exact_counts(rows, bridge, step, layer, mb)
    recv_counts = exchange_counts(bridge, counts, step, layer, mb)
    _check_counts(bridge, recv_counts, step, layer, mb, num_local, range(p))
    send_splits = counts[:, HEADER:].sum(1).tolist()
    counts_PL = recv_counts[:, HEADER:HEADER + num_local]
    recv_splits = counts_PL.sum(1).tolist()
    send = x_XH[rows.token_R].contiguous()
    x_in = torch.empty(sum(recv_splits), hidden, dtype=x_XH.dtype, device=x_XH.device)
    work = _all_to_all(x_in, send, recv_splits, send_splits, bridge)
    sent = DispatchHandle(bridge, step, layer, mb, x_XH.shape[0], rows, send_splits, work, [send, x_in],
                          torch.arange(send.shape[0], device=send.device))
    got = ExpertBatch(x_in, counts_PL.sum(0), _expert_sorted_order(counts_PL), recv_splits)
    return ExchangeHandle(sent, layout, got=got)


def ep_exchange_grads(handle: ExchangeHandle, grad_out_NH: torch.Tensor, input_grads) -> torch.Tensor:
    """EP backward, both halves: this rank's output-row gradients [N, H] go to the ranks whose
    experts produced them; `input_grads(grad_sorted [M, H]) -> [M, H]` turns the gradients of
    the rows this rank's experts served (expert-sorted) into their input gradients, which go
    back; returns the gradients of the rows this rank sent [N, H]."""
    s, got, b = handle.sent, handle.got, handle.sent.bridge
    arrived = grad_out_NH.new_empty(sum(got.source_splits), grad_out_NH.shape[1])
    work = _all_to_all(arrived, grad_out_NH.contiguous(), got.source_splits, s.splits, b)
    _wait(work, b, "output-gradient payload", s.step, s.layer, s.mb)
    grad_in = input_grads(arrived[got.perm_N])
    back = _back_rows(grad_in, got)
    mine = torch.empty_like(grad_out_NH)
    work = _all_to_all_back(mine, back, s.splits, got.source_splits, b)
    _wait(work, b, "input-gradient payload", s.step, s.layer, s.mb)
    return mine
