"""The token dispatcher: dispatch -> expert compute -> combine, one interface for the routed strategies.

The shape is that of DeepEP's dispatch/combine handle and torchtitan's token dispatchers: dispatch
launches a micro-batch's routed rows and returns a handle, and the handle is all combine needs to
bring the expert outputs back. Each transfer is cut where a CUDA graph must end: device work that a
graph can hold (`prepare`: sort the (token, expert) pairs and, in a decode step, pack the blocks;
routing.weighted_sum after combine) and the launches and waits that it cannot (`dispatch`,
`combine`). A runtime's op handlers read:

    token side (a separated attention rank, an EP rank), per (layer, micro-batch):
        z, weights, ids = block.moe_inputs(h)                          \\ one graph segment
        out = d.prepare(z, weights, ids, mb, d.heads.get(layer, mb))    /
        handle = d.dispatch(out, layer, mb)                             launch
        ... other micro-batches ...
        inputs = d.combine(handle)                                      wait
        x = block.moe_residual(h, z, weighted_sum(n, *inputs))          one graph segment
    expert compute:
        EP (every rank also serves):  d.received(handle) -> d.serve(...) -> d.send_back(handle, y)
        separated expert ranks:       ExpertDispatcher over every replica's bridge: receive per
                                      bridge, ONE grouped matmul per (layer, micro-batch) over every
                                      replica's rows, each replica's rows back on its own bridge.

Two token-side implementations: `SeparatedDispatcher` (one attention replica <-> the expert ranks
over the replica's bridge) and `EpDispatcher` (all-to-all among the EP ranks). Both size decode
blocks from the routing (capacity.py): `finish_step` says, after the step, whether a transfer
overflowed its blocks, in which case the runtime runs the step again at the worst-case capacity.

Prefill steps send exact rows after agreeing the counts (comm.py); the handle and the calls are the
same. Shapes: X tokens of this rank's slice, k top-k, H hidden, S senders, C capacity rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import comm, routing
from .capacity import CapacityPolicy
from .graphs import SegmentGraphs


@dataclass
class Outbound:
    """A micro-batch's routed rows, ready to launch (what `prepare` made on the device)."""

    rows: routing.SortedRows
    num_tokens: int
    x_XH: torch.Tensor | None = None  # exact steps: the token rows (sent once the counts are agreed)
    packed: routing.Packed | None = None  # padded steps: the blocks


def weighted_sum(num_tokens: int, *combine_inputs: torch.Tensor) -> torch.Tensor:
    """sum_k w_k expert_k(x) per token [X, H] from what `combine` returned (device work only)."""
    return routing.weighted_sum(num_tokens, *combine_inputs)


class TokenDispatcher:
    """The token side of one bridge (an attention replica's, or the EP ranks'). Subclasses say how
    a step is announced and who the blocks go to."""

    def __init__(self, bridge: comm.Bridge, route: comm.ExpertRoute, cfg, placement, microbatches: int,
                 dtype: torch.dtype, device):
        self.bridge, self.route = bridge, route
        self.hidden, self.dtype = cfg.hidden_size, dtype
        self.heads = comm.StepHeads(cfg.num_layers, microbatches, device)
        self._new_capacity = lambda: CapacityPolicy.for_placement(cfg.top_k, placement, cfg.num_experts)
        self.capacity = self._new_capacity()
        # the step's largest rows from one sender to one receiver, per micro-batch (any layer):
        # written by the graph segments (a fixed address), read once the step is over
        self.demand_M = torch.zeros(microbatches, dtype=torch.long, device=device)
        self.layout: comm.StepLayout | None = None
        self.reruns = 0  # steps run again at the worst-case capacity after an overflow
        self.payload_rows = 0  # rows of every padded block this rank sent (the worst case: below)
        self.worst_payload_rows = 0
        self.moe_layers = cfg.num_moe_layers  # dispatches per micro-batch in a step

    # --- the step -------------------------------------------------------------------------------
    def begin_step(self, step: int, rows_M: list[int], padded: bool, full: bool = False, idle: bool = False
                   ) -> comm.StepLayout:
        """Announce the step on the bridge (rows_M: this sender's tokens per micro-batch; full: the
        worst-case capacity, after an overflow). Padded: capacities from the routing so far."""
        caps = self.capacity.caps(rows_M, full) if padded else [0] * len(rows_M)
        self.layout = self._announce(step, rows_M, padded, caps, idle)
        if self.layout.padded:
            self.new_step_buffers(step)
        return self.layout

    def begin_agreed_step(self, step: int, rows_M: list[int], full: bool = False, device_work: bool = True
                          ) -> comm.StepLayout:
        """A decode step whose rows_M every rank of the bridge was given alike: the layout with no
        handshake (comm.agreed_decode_step). device_work=False: leave the step's header and demand
        buffers alone (a whole-step graph being captured sets them before its replays)."""
        caps = self.capacity.caps(rows_M, full)
        self.layout = comm.agreed_decode_step(self.bridge, step, rows_M, caps, self.hidden, self.dtype)
        if device_work:
            self.new_step_buffers(step)
        return self.layout

    def restart_capacity(self) -> None:
        """Forget the routing seen so far (the balanced share again): after a failure, at the
        point where every rank that sizes this bridge's blocks restarts its policy too."""
        self.capacity = self._new_capacity()

    def new_step_buffers(self, step: int) -> None:
        self.heads.set_step(step)
        self.demand_M.zero_()

    def finish_step(self) -> bool:
        """After the step's ops (its logits queued): read the device-side checks (one host read),
        learn the capacity from the routing; True when a transfer overflowed its blocks, so the
        step must run again with `begin_step(..., full=True)`."""
        lay = self.layout
        if lay is None or not lay.padded:
            return False
        demand = self._agreed_demand().tolist()
        overflow = any(d > c for d, c in zip(demand, lay.caps))
        self.capacity.observe(demand, lay.rows)
        self.reruns += overflow
        return overflow

    # --- one transfer ---------------------------------------------------------------------------
    def prepare(self, z_XH: torch.Tensor, weights_Xk: torch.Tensor, ids_Xk: torch.Tensor, mb: int,
                head_4: torch.Tensor) -> Outbound:
        """Sort the (token, expert) pairs by destination; in a padded step also pack the blocks
        (device work only: a CUDA graph can hold it). head_4 = heads.get(layer, mb)."""
        rows = comm.sort_for_bridge(ids_Xk, weights_Xk, self.route, self.bridge)
        if not self.layout.padded:
            return Outbound(rows, z_XH.shape[0], x_XH=z_XH)
        first, num = self._destinations()
        packed = routing.pack(z_XH, rows, first, num, self.layout.caps[mb], self.layout.header_rows, head_4)
        self._note_sent_demand(mb, packed.demand)
        return Outbound(rows, z_XH.shape[0], packed=packed)

    def cap(self, mb: int) -> int:
        """This step's block capacity of micro-batch mb (0 in exact steps): graph segments that
        pack or serve blocks name it in their key."""
        return self.layout.caps[mb] if self.layout.padded else 0

    def _count_payload(self, mb: int, blocks: int) -> None:
        lay = self.layout
        self.payload_rows += blocks * lay.caps[mb]
        self.worst_payload_rows += blocks * routing.capacity(lay.rows[mb], self.bridge.top_k,
                                                             self.bridge.max_local_experts)

    def count_replayed_step(self) -> None:
        """Count the blocks of a step replayed from a whole-step graph, which runs no Python
        (dispatch does not count inside one: its warm-up and capture would count twice)."""
        for mb in range(len(self.layout.caps)):
            self._count_payload(mb, self.moe_layers * self._receivers())

    def _receivers(self) -> int:
        raise NotImplementedError

    # --- for subclasses ---------------------------------------------------------------------------
    def _announce(self, step, rows_M, padded, caps, idle) -> comm.StepLayout:
        raise NotImplementedError

    def _destinations(self) -> tuple[int, int]:
        """(first bridge member, number of members) the blocks go to."""
        raise NotImplementedError

    def _note_sent_demand(self, mb: int, demand: torch.Tensor) -> None:
        """A packed transfer's largest rows to one receiver (device)."""

    def _agreed_demand(self) -> torch.Tensor:
        """demand_M as every rank that must agree on a rerun sees it."""
        return self.demand_M


class SeparatedDispatcher(TokenDispatcher):
    """An attention rank of a replica: its token slice to the expert ranks over the replica's bridge.

    The replica's ranks pack their own slices with one capacity and must agree on reruns: with
    head-parallel ranks (T > 1) they take the largest demand of the replica (a small all-reduce
    in the replica once the step is over), so their capacity policies stay equal."""

    def __init__(self, bridge, route, cfg, placement, microbatches, dtype, device, replica_group=None,
                 timeout=None, who: str = ""):
        super().__init__(bridge, route, cfg, placement, microbatches, dtype, device)
        self.replica_group, self.timeout, self.who = replica_group, timeout, who

    def _announce(self, step, rows_M, padded, caps, idle) -> comm.StepLayout:
        return comm.attention_begin_step(self.bridge, step, rows_M, padded, self.hidden, self.dtype, caps_M=caps)

    def _destinations(self) -> tuple[int, int]:
        return self.bridge.num_attention, len(self.bridge.expert_members())

    def _note_sent_demand(self, mb: int, demand: torch.Tensor) -> None:
        self.demand_M[mb] = torch.maximum(self.demand_M[mb], demand)

    def _agreed_demand(self) -> torch.Tensor:
        if self.bridge.num_attention == 1:
            return self.demand_M
        return comm.replica_all_reduce(self.demand_M.clone(), self.replica_group, self.timeout,
                                       f"{self.who}: step {self.layout.step} block demand", largest=True)

    def _receivers(self) -> int:
        return len(self.bridge.expert_members())

    def dispatch(self, out: Outbound, layer: int, mb: int, count: bool = True) -> comm.DispatchHandle:
        """Launch the rows to the expert ranks; the handle is all `combine` needs. count: add the
        blocks to payload_rows (a whole-step graph counts its replays instead: count_replayed_step)."""
        if out.packed is None:
            return comm.dispatch_rows(out.x_XH, out.rows, self.bridge, self.layout, layer, mb)
        if count:
            self._count_payload(mb, self._receivers())
        return comm.send_packed(out.packed, self.bridge, self.layout, layer, mb, out.num_tokens)

    def combine(self, handle: comm.DispatchHandle) -> tuple[torch.Tensor, ...]:
        """Wait for the experts' outputs of this rank's rows: weighted_sum's inputs."""
        return comm.combine_inputs_of(handle, self.hidden, self.dtype)


class EpDispatcher(TokenDispatcher):
    """An EP rank: its tokens to every rank holding their experts, and every rank's rows for its own
    experts back. Every rank receives every sender's block headers, so all see the same demand."""

    def __init__(self, bridge, route, cfg, placement, microbatches, dtype, device, num_local: int):
        super().__init__(bridge, route, cfg, placement, microbatches, dtype, device)
        self.num_local = num_local  # this rank's experts

    def _announce(self, step, rows_M, padded, caps, idle) -> comm.StepLayout:
        return comm.ep_begin_step(self.bridge, step, rows_M, padded, self.hidden, self.dtype, idle, caps_M=caps)

    def _destinations(self) -> tuple[int, int]:
        return 0, self.bridge.size

    def finish_step(self) -> bool:
        if self.layout is not None:
            comm.end_step(self.layout, self.bridge)  # bad headers raise; the demand is read below
        return super().finish_step()

    def _receivers(self) -> int:
        return self.bridge.size

    def dispatch(self, out: Outbound, layer: int, mb: int, count: bool = True) -> comm.ExchangeHandle:
        """count: as SeparatedDispatcher.dispatch."""
        if out.packed is None:
            return comm.ep_dispatch_rows(out.x_XH, out.rows, self.bridge, self.layout, self.num_local, layer, mb)
        if count:
            self._count_payload(mb, self._receivers())
        return comm.ep_send_packed(out.packed, self.bridge, self.layout, layer, mb, out.num_tokens)

    def received(self, handle: comm.ExchangeHandle):
        """Wait for the rows every rank sent this rank's experts: blocks [P, R+C, H] (padded) or
        an ExpertBatch sorted by local expert (exact)."""
        return comm.ep_receive_blocks(handle) if self.layout.padded else comm.ep_received(handle)

    def serve(self, blocks_PBH: torch.Tensor, head_4: torch.Tensor, expert_fn, mb: int) -> routing.Served:
        """This rank's experts over the received blocks (device work only): outputs [P, C, H]."""
        served = routing.serve_blocks([blocks_PBH], [head_4], expert_fn, self.layout.header_rows,
                                      self.bridge.max_local_experts, self.num_local)
        self.demand_M[mb] = torch.maximum(self.demand_M[mb], served.demand[0].max())
        return served

    def note_checks(self, layer: int, mb: int, served: routing.Served) -> None:
        self.layout.checks.append((layer, mb, 0, served.bad[0]))

    def send_back(self, handle: comm.ExchangeHandle, y) -> None:
        """Launch this rank's expert outputs back to their senders (padded: [P, C, H] in the slots
        the rows came in; exact: expert-sorted rows [N, H])."""
        (comm.ep_send_back if self.layout.padded else comm.ep_combine_launch)(handle, y)

    def combine(self, handle: comm.ExchangeHandle) -> tuple[torch.Tensor, ...]:
        return handle.sent.combine_inputs(comm.ep_receive_back(handle))


# --- the expert side of separation ---------------------------------------------------------------------
class ExpertDispatcher:
    """A separated expert rank's side of every replica's bridge. Each (layer, micro-batch) arrives on
    every replica's bridge; `serve` runs this rank's experts ONCE over all of it (one grouped matmul:
    the weights are read once per micro-batch, not once per replica) and each replica's outputs go
    back on its own bridge. A bridge that failed is simply not among `arrivals`."""

    def __init__(self, num_local: int, cfg, dtype: torch.dtype, heads: comm.StepHeads, graphs: SegmentGraphs):
        self.num_local, self.hidden, self.dtype = num_local, cfg.hidden_size, dtype
        self.heads, self.graphs = heads, graphs
        self.whole_step = False  # inside a whole-step graph's capture: no segment graphs of its own

    def receive(self, bridge: comm.Bridge, layout: comm.StepLayout, layer: int, mb: int):
        """Padded: post the receive of the replica's blocks (serve waits). Exact: agree the counts and
        receive the rows (blocking), an ExpertBatch sorted by local expert."""
        if layout.padded:
            return comm.expert_receive_blocks(bridge, layout, self.hidden, self.dtype, layer, mb)
        return comm.expert_receive(bridge, layout, self.num_local, self.hidden, self.dtype, layer, mb)

    @staticmethod
    def arrived(got):
        """Wait for a posted receive (padded): blocks [A, R+C, H]; exact batches are already here."""
        return comm.blocks_arrived(got) if isinstance(got, comm.PendingBlocks) else got

    def serve(self, experts, arrivals: list, layer: int, mb: int) -> tuple[list, torch.Tensor]:
        """arrivals: (bridge, layout, blocks or ExpertBatch) per replica that sent this (layer, mb).
        Returns each replica's outputs (padded: [A, C, H] in its slots; exact: expert-sorted [N, H])
        and the rows per local expert [L]."""
        padded = [lay.padded for _, lay, _ in arrivals]
        if all(padded):
            served = self._serve_blocks(experts, arrivals, layer, mb)
            for (_, lay, _), bad, demand in zip(arrivals, served.bad, served.demand):
                lay.checks.append((layer, mb, 0, bad))
                lay.demands.append((mb, demand))
            return served.back, served.counts_L
        return self._serve_mixed(experts, arrivals, layer, mb)

    def _serve_blocks(self, experts, arrivals, layer: int, mb: int) -> routing.Served:
        """Every replica's blocks in one graph segment (replayed from a CUDA graph when enabled)."""
        blocks = [got for _, _, got in arrivals]
        hdr, max_local = arrivals[0][1].header_rows, arrivals[0][0].max_local_experts
        head = self.heads.get(layer, mb)

        def serve(*blocks_):
            return routing.serve_blocks(list(blocks_), [head] * len(blocks_), experts.forward_sorted, hdr, max_local,
                                        self.num_local)

        if self.whole_step or any(b.shape[1] == hdr for b in blocks):  # empty micro-batch: no zero-size capture
            return serve(*blocks)
        key = ("experts", layer, mb, hdr, tuple(b.replica for b, _, _ in arrivals), tuple(tuple(b.shape) for b in blocks))
        return self.graphs.run(key, serve, *blocks)

    def _serve_mixed(self, experts, arrivals, layer: int, mb: int) -> tuple[list, torch.Tensor]:
        """Replicas in different kinds of step (one prefills, one decodes): eagerly, still one
        grouped matmul over every replica's rows."""
        head = self.heads.get(layer, mb)
        parts = []  # (x sorted by local expert, local expert of each row, counts, how to return)
        for bridge, lay, got in arrivals:
            if lay.padded:
                u = routing.unpack(got, lay.header_rows, bridge.max_local_experts, self.num_local, head)
                lay.checks.append((layer, mb, 0, u.bad_S))
                lay.demands.append((mb, u.demand_S))
                parts.append((u.x_NH, u.local_N, u.counts_L, (u.slot_N, got.shape[0])))
            else:
                parts.append((got.x_NH, routing.local_of_rows(got.counts_L, got.x_NH.shape[0]), got.counts_L, None))
        x, order = routing.merge_by_expert([p[0] for p in parts], [p[1] for p in parts])
        counts = torch.stack([p[2] for p in parts]).sum(0)
        ys = routing.split_merged(experts.forward_sorted(x, counts), order, [p[0].shape[0] for p in parts])
        out = [y if p[3] is None else routing.unsort(y, *p[3]) for y, p in zip(ys, parts)]
        return out, counts

    @staticmethod
    def send(bridge: comm.Bridge, layout: comm.StepLayout, got, y, layer: int, mb: int):
        """Launch one replica's outputs back on its bridge; a handle for comm.wait_sent."""
        if layout.padded:
            return comm.expert_send_back(y, bridge, layout, layer, mb)
        return comm.expert_send(y, got, bridge, layout, layer, mb)
