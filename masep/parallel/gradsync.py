"""Gradient synchronisation for training: sum the gradients of replicated parameters.

Part of the communication layer: like comm.py, this module calls torch.distributed (the
trainer calls `GradSync.sync_`, never `dist.*`). Every collective is launched with
async_op=True and waited through `comm._wait_named`, so each wait has the group's timeout and
a CommError names the operation, the bucket and the ranks.

A parameter may be replicated over a set of ranks (the attention weights over R attention
replicas, an expert held by two expert ranks); its gradient is SUMMED over that set. The
trainer divides its loss by the global token count, so each rank's gradient is already its
share of the global mean, and the sum over the replicas is the global gradient (a mean here
would divide a second time).

Paths (`build_sync_groups` picks one and says why in `SyncGroups.reason`):
- hierarchical, when the set spans several nodes with the same number of members on each:
  reduce-scatter inside the node, all-reduce of the shard across nodes, all-gather inside
  the node. Only 1/L of the bucket (L members per node) crosses the slow link.
- flat: one all-reduce over the set (a single node, or uneven members per node).

Compression "int8" (with error feedback) applies to the cross-node phase and to the flat path;
see `GradSync` and `_compressed_sum`. Shapes: N bucket elements, L members per node, C nodes
(members of a cross-node group), P members of a compressed sum, S shard length, K chunk
length, Q chunks per shard.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import CommError, _wait_named

# torch 2.13 renamed the single-tensor collectives; older releases only have the old names.
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_INT8_MAX = 127  # symmetric range [-127, 127]: -128 would make the scale asymmetric


@dataclass
class SyncGroups:
    """The groups one rank uses to sum gradients over `ranks`; None where it is not a member."""

    ranks: list[int]  # the replica set, sorted global ranks
    rank: int  # this process's global rank
    hierarchical: bool
    reason: str  # which path and why, for the trainer's log
    timeout: timedelta
    node_ranks: list[int] = field(default_factory=list)  # hierarchical: my node's members of `ranks`
    node_group: object | None = None
    cross_ranks: list[int] = field(default_factory=list)  # hierarchical: the member with my index on every node
    cross_group: object | None = None
    flat_group: object | None = None  # flat path: all of `ranks` (None with one rank: nothing to sum)

    @property
    def member(self) -> bool:
        return self.rank in self.ranks


def node_layout(ranks: list[int], gpus_per_node: int) -> tuple[list[list[int]], bool, str]:
    """Split sorted global `ranks` by node (consecutive blocks of `gpus_per_node` global ranks, as
    torchrun numbers them) -> (members per node, hierarchical?, reason)."""
    nodes: dict[int, list[int]] = {}
    for r in ranks:
        nodes.setdefault(r // gpus_per_node, []).append(r)
    members = list(nodes.values())
    counts = {node: len(m) for node, m in nodes.items()}
    if len(ranks) == 1:
        return members, False, "one rank: nothing to sum"
    if len(members) == 1:
        return members, False, f"flat: all {len(ranks)} ranks on one node (gpus_per_node={gpus_per_node})"
    if len(set(counts.values())) > 1:
        return members, False, (f"flat: uneven members per node {counts} (node: count); the hierarchical "
                                "path needs the same count on every node")
    if len(members[0]) == 1:
        return members, False, f"flat: one member on each of {len(members)} nodes, no node phase to do"
    return members, True, (f"hierarchical: {len(members)} nodes x {len(members[0])} ranks "
                           f"(gpus_per_node={gpus_per_node})")


def build_sync_groups(ranks: list[int], gpus_per_node: int, timeout: timedelta | float) -> SyncGroups:
    """Create the groups for summing over `ranks`. EVERY rank of the world must call this, with
    the same arguments and in the same order as its other `new_group` calls (torch requires it);
    each gets back the groups it belongs to."""
    timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=timeout)
    world, me = dist.get_world_size(), dist.get_rank()
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node={gpus_per_node}: must be >= 1 (ranks per node, torchrun's --nproc-per-node)")
    if not ranks or len(set(ranks)) != len(ranks) or not all(0 <= r < world for r in ranks):
        raise ValueError(f"ranks={ranks}: must be distinct global ranks in [0, {world}), at least one")
    ranks = sorted(ranks)
    members, hierarchical, reason = node_layout(ranks, gpus_per_node)
    out = SyncGroups(ranks, me, hierarchical, reason, timeout)
    if len(ranks) == 1:
        return out
    if not hierarchical:
        group = dist.new_group(ranks, timeout=timeout)
        out.flat_group = group if me in ranks else None
        return out
    for node in members:
        group = dist.new_group(node, timeout=timeout)
        if me in node:
            out.node_ranks, out.node_group = node, group
    for i in range(len(members[0])):
        cross = [node[i] for node in members]
        group = dist.new_group(cross, timeout=timeout)
        if me in cross:
            out.cross_ranks, out.cross_group = cross, group
    return out


# --- int8 chunks (pure torch, device-side) -------------------------------------------------------
def quantize_chunks(x_PS: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_PS [P, S] fp32 -> (q_PS int8, scale_PQ fp32 [P, ceil(S / chunk)]), scale = max|x| / 127
    per chunk. Chunks never straddle rows: each row is one peer's shard. Rounding to nearest,
    so |x - q * scale| <= scale / 2 per element. A chunk with a non-finite value dequantises to
    non-finite values (the trainer's overflow check still sees it)."""
    P, S = x_PS.shape
    Q = -(-S // chunk)
    x_PQK = F.pad(x_PS, (0, Q * chunk - S)).view(P, Q, chunk)
    scale_PQ = x_PQK.abs().amax(-1) / _INT8_MAX
    safe_PQ = torch.where(scale_PQ > 0, scale_PQ, torch.ones_like(scale_PQ))  # all-zero chunk: q = 0
    q_PQK = torch.round(x_PQK / safe_PQ[..., None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q_PQK.view(P, Q * chunk)[:, :S], scale_PQ


def dequantize_chunks(q_PS: torch.Tensor, scale_PQ: torch.Tensor, chunk: int) -> torch.Tensor:
    """Inverse of `quantize_chunks`: [P, S] fp32."""
    P, S = q_PS.shape
    Q = scale_PQ.shape[1]
    x_PQK = F.pad(q_PS.float(), (0, Q * chunk - S)).view(P, Q, chunk) * scale_PQ[..., None]
    return x_PQK.view(P, Q * chunk)[:, :S]


def _pack(q_PS: torch.Tensor, scale_PQ: torch.Tensor) -> torch.Tensor:
    """One int8 message per peer: [P, S + 4Q] = the payload, then the fp32 scales' bytes."""
    return torch.cat([q_PS, scale_PQ.contiguous().view(torch.int8)], 1)


def _unpack(msg_PB: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a fresh copy: viewing int8 bytes as fp32 needs a storage offset divisible by 4, which a
    # slice at column S of a one-row message (already contiguous, so never copied) lacks
    return msg_PB[:, :S], msg_PB[:, S:].clone(memory_format=torch.contiguous_format).view(torch.float32)


class GradSync:
    """In-place sums of gradient buckets over `groups.ranks`.

    compression "int8": the cross-node phase (hierarchical) or the whole sum (flat) moves int8
    values with one fp32 scale per `chunk_size` elements, with error feedback: what
    quantisation drops in one call is added to the same bucket's values in the next call, so
    the running sum of the results stays within a constant of the true running sum. The state
    is keyed by the `bucket` argument of `sync_` (the caller's bucket index; a trainer that
    syncs every gradient as one bucket leaves it at 0): a bucket index must always name the
    same tensors, in the same order. `error_feedback=False` drops that state (for comparisons).

    The intra-node phases stay full precision: NVLink inside a node is ~10x the bandwidth of
    the cross-node link, the node's reduce-scatter already cuts what crosses the slow link to
    1/L, and each quantisation adds error, so compressing there would cost accuracy for little.

    Traffic (what this rank sends: payload + scales, cumulative over calls) is in `traffic`,
    {phase: [bytes sent, bytes the same call would send uncompressed]}, phases "intra_node",
    "cross_node", "flat"; `bytes_sent` and `bytes_uncompressed` sum the phases.

    `_native_reduce_scatter` (None: try once, then remember) is settable so tests can force the
    all_to_all fallback used where the backend has no reduce_scatter (older gloo)."""

    def __init__(self, groups: SyncGroups, compression: str = "none", chunk_size: int = 1024,
                 error_feedback: bool = True):
        if compression not in ("none", "int8"):
            raise ValueError(f"compression={compression!r}: must be 'none' or 'int8'")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size}: must be >= 1 (elements per int8 scale)")
        if not groups.member:
            raise ValueError(f"rank {groups.rank} is not in ranks={groups.ranks}: it has no gradients to sync here")
        self.groups, self.compression, self.chunk = groups, compression, chunk_size
        self.error_feedback = error_feedback
        self.traffic: dict[str, list[int]] = {}
        self._errors: dict[tuple[int, str], torch.Tensor] = {}  # (bucket, phase) -> carried error, fp32
        self._layouts: dict[int, list[int]] = {}  # bucket -> [numel, tensors, compressed, chunk], checked
        self._native_reduce_scatter: bool | None = None

    @property
    def bytes_sent(self) -> int:
        return sum(sent for sent, _ in self.traffic.values())

    @property
    def bytes_uncompressed(self) -> int:
        return sum(full for _, full in self.traffic.values())

    def sync_(self, tensors: list[torch.Tensor], bucket: int = 0) -> None:
        """Sum `tensors` over the ranks, in place. Every rank passes tensors of the same shapes,
        in the same order (checked on a bucket's first call, before any payload moves). Any
        floating dtype: the sum runs in one fp32 buffer [N], cast back into each tensor."""
        g = self.groups
        if len(g.ranks) == 1:
            return
        if any(not t.is_floating_point() for t in tensors):
            raise ValueError(f"bucket {bucket}: gradients must be floating point, got "
                             f"{sorted({str(t.dtype) for t in tensors})}")
        numel = sum(t.numel() for t in tensors)
        device = tensors[0].device if tensors else self._default_device()
        self._check_layout(bucket, [numel, len(tensors), int(self.compression == "int8"), self.chunk], device)
        if numel == 0:
            return
        flat_N = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        summed_N = self._sum_hierarchical(flat_N, bucket) if g.hierarchical else self._sum_flat(flat_N, bucket)
        offset = 0
        for t in tensors:
            t.copy_(summed_N[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()

    # --- the two paths ---------------------------------------------------------------------------
    def _sum_flat(self, x_N: torch.Tensor, bucket: int) -> torch.Tensor:
        g, P = self.groups, len(self.groups.ranks)
        what = f"grad sync bucket {bucket}: flat sum over ranks {g.ranks}"
        if self.compression == "int8":
            return self._compressed_sum(x_N, g.flat_group, P, bucket, "flat", what)
        self._count("flat", 2 * (P - 1) * -(-x_N.numel() // P) * 4)  # ring: reduce-scatter + all-gather
        _wait_named(dist.all_reduce(x_N, group=g.flat_group, async_op=True), g.timeout, f"{what}: all-reduce")
        return x_N

    def _sum_hierarchical(self, x_N: torch.Tensor, bucket: int) -> torch.Tensor:
        g, L, C = self.groups, len(self.groups.node_ranks), len(self.groups.cross_ranks)
        N, S = x_N.numel(), -(-x_N.numel() // L)
        where = f"grad sync bucket {bucket}"
        x_LS = F.pad(x_N, (0, L * S - N)).view(L, S)
        shard_S = self._reduce_scatter(x_LS, f"{where}: intra-node reduce-scatter over ranks {g.node_ranks}")
        what = f"{where}: cross-node sum over ranks {g.cross_ranks}"
        if self.compression == "int8":
            shard_S = self._compressed_sum(shard_S, g.cross_group, C, bucket, "cross_node", what)
        else:
            self._count("cross_node", 2 * (C - 1) * -(-S // C) * 4)
            _wait_named(dist.all_reduce(shard_S, group=g.cross_group, async_op=True), g.timeout, f"{what}: all-reduce")
        out_LS = torch.empty_like(x_LS)
        self._count("intra_node", (L - 1) * S * 4)
        _wait_named(_ALL_GATHER(out_LS.view(-1), shard_S, group=g.node_group, async_op=True), g.timeout,
                    f"{where}: intra-node all-gather over ranks {g.node_ranks}")
        return out_LS.view(-1)[:N]

    def _reduce_scatter(self, x_LS: torch.Tensor, what: str) -> torch.Tensor:
        """[L, S] -> my row of the sum over the node [S]. Native where the backend has it; else
        all_to_all_single (row l to member l) and a local sum, the same bytes on the wire."""
        g, L, S = self.groups, x_LS.shape[0], x_LS.shape[1]
        self._count("intra_node", (L - 1) * S * 4)
        if self._native_reduce_scatter is not False:
            out_S = x_LS.new_empty(S)
            try:
                work = _REDUCE_SCATTER(out_S, x_LS.view(-1), group=g.node_group, async_op=True)
            except (RuntimeError, NotImplementedError) as err:  # raised at launch, before any byte moves
                if self._native_reduce_scatter or "support" not in str(err).lower():
                    raise CommError(f"{what}: {type(err).__name__}: {err}") from err
                self._native_reduce_scatter = False
            else:
                self._native_reduce_scatter = True
                _wait_named(work, g.timeout, f"{what} (reduce_scatter)")
                return out_S
        recv_LS = torch.empty_like(x_LS)
        _wait_named(dist.all_to_all_single(recv_LS, x_LS, group=g.node_group, async_op=True), g.timeout,
                    f"{what} (all_to_all + local sum: the backend has no reduce_scatter)")
        return recv_LS.sum(0)

    # --- int8 with error feedback ----------------------------------------------------------------
    def _compressed_sum(self, x_M: torch.Tensor, group, P: int, bucket: int, phase: str, what: str) -> torch.Tensor:
        """Sum [M] fp32 over the P members of `group`, moving int8 + scales, in two phases (int8
        values with different scales cannot be added on the wire):
        (a) scatter: quantise (x + carried error) as P shards, all_to_all them (shard p to member
            p), dequantise the P shards received and sum them in fp32;
        (b) gather: quantise (summed shard + its carried error), all-gather, dequantise.
        Error per element of one call, without carried error: (a) adds at most scale_p / 2 for
        each member's chunk, (b) scale_sum / 2, so |result - sum| <= (P + 1) * max scale / 2.
        With error feedback the running sum over calls telescopes to the true running sum minus
        the errors still carried, a bound of the same size that does not grow with the calls."""
        K, M = self.chunk, x_M.numel()
        S = -(-M // P)
        Q = -(-S // K)
        x_PS = F.pad(x_M, (0, P * S - M)).view(P, S)
        q_PS, scale_PQ = self._quantize(x_PS, bucket, f"{phase}/scatter")
        recv_PB = torch.empty(P, S + 4 * Q, dtype=torch.int8, device=x_M.device)
        _wait_named(dist.all_to_all_single(recv_PB, _pack(q_PS, scale_PQ), group=group, async_op=True),
                    self.groups.timeout, f"{what}: int8 scatter (all_to_all)")
        shard_1S = dequantize_chunks(*_unpack(recv_PB, S), K).sum(0, keepdim=True)
        q_1S, scale_1Q = self._quantize(shard_1S, bucket, f"{phase}/gather")
        gathered_PB = torch.empty_like(recv_PB)
        _wait_named(_ALL_GATHER(gathered_PB, _pack(q_1S, scale_1Q), group=group, async_op=True),
                    self.groups.timeout, f"{what}: int8 gather (all_gather)")
        # what this rank sends: P - 1 packed shards in (a), its own packed shard to P - 1 peers in (b)
        self._count(phase, 2 * (P - 1) * (S + 4 * Q), 2 * (P - 1) * S * 4)
        return dequantize_chunks(*_unpack(gathered_PB, S), K).reshape(-1)[:M]

    def _quantize(self, x: torch.Tensor, bucket: int, phase: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise x plus the error carried for (bucket, phase); carry what this rounding drops.
        Non-finite errors (an fp16 overflow step the trainer will skip) are not carried, so they
        cannot poison later steps."""
        key = (bucket, phase)
        if self.error_feedback and key in self._errors:
            x = x + self._errors[key]
        q, scale = quantize_chunks(x, self.chunk)
        if self.error_feedback:
            self._errors[key] = torch.nan_to_num(x - dequantize_chunks(q, scale, self.chunk),
                                                 nan=0.0, posinf=0.0, neginf=0.0)
        return q, scale

    # --- bookkeeping ----------------------------------------------------------------------------
    def _count(self, phase: str, sent: int, uncompressed: int | None = None) -> None:
        row = self.traffic.setdefault(phase, [0, 0])
        row[0] += sent
        row[1] += sent if uncompressed is None else uncompressed

    def _check_layout(self, bucket: int, layout: list[int], device: torch.device) -> None:
        """On a bucket's first call, check every rank agrees on [numel, tensors, compressed, chunk]
        before any payload moves (gloo aborts the process on mismatched sizes). Hierarchical: the
        node compares, then each cross-node group compares and shares whether every node agreed,
        so every rank of the set reaches the same verdict and none is left waiting."""
        known = self._layouts.get(bucket)
        if known == layout:
            return
        if known is not None:
            raise ValueError(f"bucket {bucket}: was [numel, tensors, compressed, chunk] = {known}, now {layout}; "
                             "a bucket index must always name the same tensors")
        g = self.groups
        if g.hierarchical:
            what = f"bucket {bucket}: layout check"
            node = self._gather_ints(layout + [1], g.node_group, g.node_ranks, device, what)
            node_ok = all(row[:-1] == layout for row in node)
            cross = self._gather_ints(layout + [int(node_ok)], g.cross_group, g.cross_ranks, device, what)
            rows = {**dict(zip(g.node_ranks, node)), **dict(zip(g.cross_ranks, cross))}
            split = [r for r, row in zip(g.cross_ranks, cross) if row[-1] == 0]
            ok = node_ok and not split
        else:
            rows = dict(zip(g.ranks, self._gather_ints(layout, g.flat_group, g.ranks, device,
                                                       f"bucket {bucket}: layout check")))
            ok, split = all(row == layout for row in rows.values()), []
        if not ok:
            seen = {r: row[:4] for r, row in sorted(rows.items())}
            inside = f"; the nodes of ranks {split} disagree inside" if split else ""
            raise ValueError(f"grad sync bucket {bucket}: ranks disagree on [numel, tensors, compressed, chunk] "
                             f"(rank: layout, as far as this rank saw: {seen}{inside}); every rank must sync the "
                             "same tensors with the same settings")
        self._layouts[bucket] = layout

    def _gather_ints(self, row: list[int], group, ranks: list[int], device, what: str) -> list[list[int]]:
        mine = torch.tensor(row, dtype=torch.int64, device=device)
        out = torch.empty(len(ranks) * len(row), dtype=torch.int64, device=device)
        _wait_named(_ALL_GATHER(out, mine, group=group, async_op=True), self.groups.timeout,
                    f"grad sync {what} (all_gather over ranks {ranks})")
        return out.view(len(ranks), len(row)).tolist()

    @staticmethod
    def _default_device() -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
