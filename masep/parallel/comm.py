"""All inter-rank communication. Runtime code calls these functions, never torch.distributed.

Attention -> expert traffic runs on a *bridge* group (one attention replica + all expert
ranks) as `all_to_all_single`, which gloo and NCCL both support with uneven splits.

Protocol for one (layer, micro-batch) on a bridge:
  1. counts: every member sends every member an int64 row [flag, step, layer, mb, c_0..c_{L-1}]
     (c_j = rows for the receiver's local expert j). Receivers check the header and the counts
     before any payload moves: gloo aborts the process on inconsistent split sizes.
  2. dispatch payload: attention ranks send their token rows, sorted by (expert rank, local expert).
  3. combine payload: expert ranks send each row's expert output back in the order received.
Every wait has a timeout; a CommError names the peers, the layer, the micro-batch and the step.

Launch and wait are separate calls (`dispatch` launches, `combine` waits; `expert_send`
launches, `wait_sent` waits). On CUDA with NCCL every collective is issued with
async_op=True, so it runs on the process group's own stream, ordered after the producing
kernels by a CUDA event; `wait` makes the compute stream wait on the completion event
without blocking the host. The one host synchronisation per transfer is reading the
exchanged counts, which sizes the payload buffers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

HEADER = 4  # flag, step, layer, mb
FLAG_WORK, FLAG_STOP = 1, 2


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

    @property
    def size(self) -> int:
        return len(self.ranks)

    def expert_members(self) -> range:
        return range(self.num_attention, self.size)

    def where(self, what: str, step: int, layer: int, mb: int) -> str:
        return (f"{what} on bridge of attention replica {self.replica} (ranks {self.ranks}), "
                f"step {step}, layer {layer}, micro-batch {mb}")


def _wait(work, bridge: Bridge, what: str, step: int, layer: int, mb: int) -> None:
    _wait_named(work, bridge.timeout, bridge.where(what, step, layer, mb))


def _wait_named(work, timeout: timedelta, what: str) -> None:
    """Wait for a transfer; `what` says who waits for what and where in the schedule.

    gloo: a host wait bounded by `timeout`. NCCL: a stream wait (the host does not block);
    passing a timeout there turns it into a host busy-wait that polls in 10 ms sleeps (we
    measured 10 ms per wait on H200), so the bound is the process group's own timeout, given
    at group creation, which NCCL's watchdog enforces by aborting the communicator."""
    try:
        ok = work.wait() if _stream_waits() else work.wait(timeout=timeout)
    except Exception as err:  # gloo/NCCL raise their own types; re-raise naming the transfer
        raise CommError(f"{what}: {type(err).__name__}: {err}") from err
    if ok is False:
        raise CommError(f"{what}: no answer within {timeout.total_seconds():.0f} s")


def _stream_waits() -> bool:
    return dist.is_initialized() and dist.get_backend() == "nccl"


def _all_to_all(out, inp, out_splits, in_splits, bridge):
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=bridge.group, async_op=True)


def exchange_counts(bridge: Bridge, send_PC: torch.Tensor, step: int, layer: int, mb: int) -> torch.Tensor:
    """send_PC [P, HEADER + L] int64, row p for member p -> received [P, HEADER + L] (row p from p)."""
    recv = torch.empty_like(send_PC)
    work = _all_to_all(recv, send_PC.contiguous(), None, None, bridge)
    _wait(work, bridge, "token-count exchange", step, layer, mb)
    return recv


def _header(bridge: Bridge, flag: int, step: int, layer: int, mb: int) -> torch.Tensor:
    """Count rows that carry only a header (to the expert members): a stop request."""
    counts = torch.zeros(bridge.size, HEADER + bridge.max_local_experts, dtype=torch.int64, device=bridge.device)
    counts[bridge.expert_members(), :HEADER] = torch.tensor([flag, step, layer, mb], device=bridge.device)
    return counts


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
    token_R: torch.Tensor  # [rows] token index of each sent row
    weight_R: torch.Tensor  # [rows] routing weight of each sent row
    splits: list[int]  # rows sent to each member
    work: object = None
    keep: list = field(default_factory=list)  # buffers alive until the transfer completes


def _route_rows(ids_Xk: torch.Tensor, route: ExpertRoute, bridge: Bridge, flag: int, step: int, layer: int,
                mb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order of the X*k (token, expert) rows sorted by (member, local expert), the token of each
    sorted row, and the count rows to send: [P, HEADER + L] with this step's header."""
    k = ids_Xk.shape[1]
    member = route.member_E[ids_Xk].flatten()
    key = member * bridge.max_local_experts + route.local_E[ids_Xk].flatten()
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(bridge.size, HEADER + bridge.max_local_experts, dtype=torch.int64, device=bridge.device)
    counts[:, :HEADER] = torch.tensor([flag, step, layer, mb], device=bridge.device)
    counts[:, HEADER:] = torch.bincount(key, minlength=bridge.size * bridge.max_local_experts).view(bridge.size, -1)
    token = torch.arange(ids_Xk.shape[0], device=ids_Xk.device).repeat_interleave(k)[order]
    return order, token, counts


def _expert_sorted_order(counts_PL: torch.Tensor) -> torch.Tensor:
    """Rows arrive grouped by (sender, local expert); the permutation that groups them by local
    expert across senders (stable, so each sender's rows keep their order)."""
    senders, num_local = counts_PL.shape
    local_of_row = torch.repeat_interleave(torch.arange(num_local, device=counts_PL.device).repeat(senders),
                                           counts_PL.flatten())
    return torch.argsort(local_of_row, stable=True)


def dispatch(x_XH: torch.Tensor, ids_Xk: torch.Tensor, weights_Xk: torch.Tensor, route: ExpertRoute,
             bridge: Bridge, step: int, layer: int, mb: int) -> DispatchHandle:
    """Launch the send of each token's hidden state to the ranks holding its top-k experts.

    x [X, H] (model dtype), ids/weights [X, k]. Returns once counts are agreed and the payload
    is in flight; combine(handle) waits for it.
    """
    order, token, counts = _route_rows(ids_Xk, route, bridge, FLAG_WORK, step, layer, mb)
    exchange_counts(bridge, counts, step, layer, mb)
    splits = counts[:, HEADER:].sum(1).tolist()
    rows = x_XH[token].contiguous()
    work = _all_to_all(x_XH.new_empty(0, x_XH.shape[1]), rows, [0] * bridge.size, splits, bridge)
    return DispatchHandle(bridge, step, layer, mb, x_XH.shape[0], token, weights_Xk.flatten()[order],
                          splits, work, [rows])


def combine(handle: DispatchHandle, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Wait for the experts' outputs and return sum_k weight_k * expert_k(x) per token [X, H]."""
    b = handle.bridge
    _wait(handle.work, b, "dispatch payload", handle.step, handle.layer, handle.mb)
    out = torch.empty(sum(handle.splits), hidden, dtype=dtype, device=b.device)
    work = _all_to_all(out, out.new_empty(0, hidden), handle.splits, [0] * b.size, b)
    _wait(work, b, "combine payload", handle.step, handle.layer, handle.mb)
    y = torch.zeros(handle.num_tokens, hidden, dtype=dtype, device=b.device)
    return y.index_add_(0, handle.token_R, out * handle.weight_R[:, None].to(dtype))


def send_stop(bridge: Bridge, step: int) -> None:
    """Tell the expert ranks this replica has no more work (sent where dispatch(l0, mb0) would be)."""
    exchange_counts(bridge, _header(bridge, FLAG_STOP, step, 0, 0), step, 0, 0)


# --- expert side ------------------------------------------------------------------------------
@dataclass
class ExpertBatch:
    """Rows received for this rank's experts, sorted by local expert across all senders."""

    x_NH: torch.Tensor
    counts_L: torch.Tensor  # [local experts] rows per local expert
    perm_N: torch.Tensor  # arrival order -> expert-sorted order
    source_splits: list[int]  # rows received from each member
    stop: bool = False


def _check_counts(bridge: Bridge, recv: torch.Tensor, step: int, layer: int, mb: int, num_local: int) -> bool:
    """Validate headers and counts from every member; returns True on a stop request."""
    attn = recv[: bridge.num_attention]
    flags = set(attn[:, 0].tolist())
    where = bridge.where("token-count check", step, layer, mb)
    if flags == {FLAG_STOP}:
        return True
    if flags != {FLAG_WORK}:
        raise CommError(f"{where}: attention ranks sent flags {sorted(flags)}, expected all {FLAG_WORK} "
                        f"(work) or all {FLAG_STOP} (stop)")
    for p in range(bridge.num_attention):
        got = tuple(recv[p, 1:HEADER].tolist())
        if got != (step, layer, mb):
            raise CommError(f"{where}: rank {bridge.ranks[p]} is at (step, layer, mb)={got}: the schedules diverged")
    counts = recv[:, HEADER:]
    if (counts < 0).any() or counts[:, num_local:].any() or counts[bridge.num_attention:].any():
        raise CommError(f"{where}: invalid token counts {counts.tolist()} for {num_local} local experts")
    return False


def expert_receive(bridge: Bridge, num_local: int, hidden: int, dtype: torch.dtype,
                   step: int, layer: int, mb: int) -> ExpertBatch:
    """Receive this (layer, mb)'s rows from the replica's attention ranks (blocking, with timeout)."""
    recv = exchange_counts(bridge, torch.zeros(bridge.size, HEADER + bridge.max_local_experts,
                                               dtype=torch.int64, device=bridge.device), step, layer, mb)
    if _check_counts(bridge, recv, step, layer, mb, num_local):
        return ExpertBatch(torch.empty(0, hidden), torch.zeros(num_local), torch.empty(0), [], stop=True)
    counts_PL = recv[:, HEADER:HEADER + num_local]
    splits = counts_PL.sum(1).tolist()
    x = torch.empty(sum(splits), hidden, dtype=dtype, device=bridge.device)
    work = _all_to_all(x, x.new_empty(0, hidden), splits, [0] * bridge.size, bridge)
    _wait(work, bridge, "dispatch payload", step, layer, mb)
    perm = _expert_sorted_order(counts_PL)
    return ExpertBatch(x[perm], counts_PL.sum(0), perm, splits)


def expert_send(y_NH: torch.Tensor, batch: ExpertBatch, bridge: Bridge, step: int, layer: int, mb: int):
    """Launch the return of expert outputs (expert-sorted rows [N, H]) to their senders.
    Returns a handle for `wait_sent`."""
    back = torch.empty_like(y_NH)
    back[batch.perm_N] = y_NH
    work = _all_to_all(back.new_empty(0, y_NH.shape[1]), back, [0] * bridge.size, batch.source_splits, bridge)
    return (work, back, bridge, step, layer, mb)


def wait_sent(pending) -> None:
    work, _, bridge, step, layer, mb = pending
    _wait(work, bridge, "combine payload", step, layer, mb)


# --- inside an attention replica --------------------------------------------------------------
def replica_all_reduce(x: torch.Tensor, group, timeout: timedelta, what: str) -> torch.Tensor:
    """Sum partial attention outputs of a replica's head-parallel ranks (in place)."""
    _wait_named(dist.all_reduce(x, group=group, async_op=True), timeout, f"{what}: all-reduce")
    return x


def replica_all_gather_rows(x_slice: torch.Tensor, splits: list[int], group, timeout: timedelta,
                            what: str) -> torch.Tensor:
    """Concatenate each head-parallel rank's token slice [splits[t], H] into [sum(splits), H].
    Slices are padded to the largest so the collective has equal sizes."""
    pad = max(splits)
    buf = x_slice.new_zeros(pad, x_slice.shape[1])
    buf[: x_slice.shape[0]] = x_slice
    parts = [torch.empty_like(buf) for _ in splits]
    _wait_named(dist.all_gather(parts, buf, group=group, async_op=True), timeout, f"{what}: all-gather")
    return torch.cat([p[:n] for p, n in zip(parts, splits)])


# --- colocated expert parallelism: every member sends and receives ------------------------------
FLAG_IDLE = 3  # an EP rank with no sequences left still serves its experts


@dataclass
class ExchangeHandle:
    """Both halves of a symmetric EP exchange: what this rank sent (for combine) and what it got."""

    sent: DispatchHandle
    got: ExpertBatch | None = None
    work: object = None
    back: torch.Tensor | None = None  # expert outputs on their way back to their senders


def ep_dispatch(x_XH: torch.Tensor, ids_Xk: torch.Tensor, weights_Xk: torch.Tensor, route: ExpertRoute,
                bridge: Bridge, num_local: int, step: int, layer: int, mb: int, idle: bool = False
                ) -> tuple[ExchangeHandle, bool]:
    """Launch the all-to-all of token rows among all EP ranks (x [X, H], ids/weights [X, k]).

    Returns the handle and whether every rank is idle (then nothing was sent and the caller stops)."""
    order, token, counts = _route_rows(ids_Xk, route, bridge, FLAG_IDLE if idle else FLAG_WORK, step, layer, mb)
    recv = exchange_counts(bridge, counts, step, layer, mb)
    flags = set(recv[:, 0].tolist())
    if flags == {FLAG_IDLE}:
        return ExchangeHandle(DispatchHandle(bridge, step, layer, mb, 0, order, order, [])), True
    _check_symmetric_counts(bridge, recv, step, layer, mb, num_local)
    send_splits = counts[:, HEADER:].sum(1).tolist()
    counts_PL = recv[:, HEADER:HEADER + num_local]
    recv_splits = counts_PL.sum(1).tolist()
    rows = x_XH[token].contiguous()
    x_in = torch.empty(sum(recv_splits), x_XH.shape[1], dtype=x_XH.dtype, device=x_XH.device)
    work = _all_to_all(x_in, rows, recv_splits, send_splits, bridge)
    perm = _expert_sorted_order(counts_PL)
    sent = DispatchHandle(bridge, step, layer, mb, x_XH.shape[0], token, weights_Xk.flatten()[order],
                          send_splits, work, [rows, x_in])
    return ExchangeHandle(sent, ExpertBatch(x_in, counts_PL.sum(0), perm, recv_splits)), False


def _check_symmetric_counts(bridge: Bridge, recv: torch.Tensor, step: int, layer: int, mb: int,
                            num_local: int) -> None:
    where = bridge.where("token-count check", step, layer, mb)
    for p in range(bridge.size):
        got = tuple(recv[p, 1:HEADER].tolist())
        if got != (step, layer, mb):
            raise CommError(f"{where}: rank {bridge.ranks[p]} is at (step, layer, mb)={got}: the schedules diverged")
    counts = recv[:, HEADER:]
    if (counts < 0).any() or counts[:, num_local:].any():
        raise CommError(f"{where}: invalid token counts {counts.tolist()} for {num_local} local experts")


def ep_received(handle: ExchangeHandle) -> ExpertBatch:
    """Wait for this rank's incoming rows; returns them sorted by local expert."""
    s = handle.sent
    _wait(s.work, s.bridge, "dispatch payload", s.step, s.layer, s.mb)
    got = handle.got
    got.x_NH = got.x_NH[got.perm_N]
    return got


def ep_combine_launch(handle: ExchangeHandle, y_NH: torch.Tensor) -> None:
    """Send expert outputs (expert-sorted rows) back to their senders; receive our own rows'."""
    s, got = handle.sent, handle.got
    back = torch.empty_like(y_NH)
    back[got.perm_N] = y_NH
    handle.back = torch.empty(sum(s.splits), y_NH.shape[1], dtype=y_NH.dtype, device=y_NH.device)
    handle.work = _all_to_all(handle.back, back, s.splits, got.source_splits, s.bridge)
    s.keep.append(back)


def ep_combine_wait(handle: ExchangeHandle, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """sum_k weight_k * expert_k(x) per token [X, H] once the outputs are back."""
    s = handle.sent
    _wait(handle.work, s.bridge, "combine payload", s.step, s.layer, s.mb)
    y = torch.zeros(s.num_tokens, hidden, dtype=dtype, device=s.bridge.device)
    return y.index_add_(0, s.token_R, handle.back * s.weight_R[:, None].to(dtype))


# --- tensor and pipeline parallelism ------------------------------------------------------------
def group_all_reduce(x: torch.Tensor, group, timeout: timedelta, what: str) -> torch.Tensor:
    """In-place sum over a group (the TP all-reduce after attention and after the experts)."""
    return replica_all_reduce(x, group, timeout, what)


def send_activation(x: torch.Tensor, dst: int, group, timeout: timedelta, what: str):
    """Launch a point-to-point send of a stage's output [b, t, H] to the next stage's rank `dst`."""
    x = x.contiguous()
    return (dist.isend(x, dst=dst, group=group), x, timeout, what)


def recv_activation(shape, dtype, device, src: int, group, timeout: timedelta, what: str) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device)
    _wait_named(dist.irecv(buf, src=src, group=group), timeout, f"{what}: activations from rank {src}")
    return buf


def wait_activation_sent(pending) -> None:
    work, _, timeout, what = pending
    _wait_named(work, timeout, f"{what}: sending activations")


def broadcast(x: torch.Tensor, src: int, group, timeout: timedelta, what: str) -> torch.Tensor:
    """Share the last stage's logits with every rank of the model instance (in place)."""
    _wait_named(dist.broadcast(x, src=src, group=group, async_op=True), timeout, f"{what}: broadcast from rank {src}")
    return x
