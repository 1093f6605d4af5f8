"""`--protection mirror`: every attention replica's new KV rows are also kept on a buddy.

The MA Separation paper replicates attention state twice for fault tolerance. Here replica r's
buddy is replica (r + 1) mod R: after each step, every attention rank sends the KV rows it
wrote (its heads, every layer) to the rank with the same head slice in the buddy replica, which
keeps them in the upper half of its own cache (its slots [S, 2S) mirror the predecessor's
slots [0, S)). When replica r dies, its requests go on at the buddy in those slots, with nothing
copied and nothing recomputed, and the buddy serves 2S slots from then on. The front end tells every rank which rows its predecessor
wrote in the step (`MirrorRows`), so both sides of a transfer know its size.

Cost: twice the KV memory on every attention rank (a memory budget holds half the slots per
replica until a failure), and every new KV row crosses to another rank each step. One failure is covered: the ring is not re-formed after it (later failures of the
remaining replicas fall back to recompute).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..model import KVCache
from . import comm


@dataclass
class MirrorRows:
    """The KV rows a replica wrote in one step: slot b, positions [start_b, start_b + count_b)."""

    slots: list[int]
    starts: list[int]
    counts: list[int]

    @classmethod
    def of(cls, rows) -> "MirrorRows":
        return cls(list(rows.slots), list(rows.starts), [len(t) for t in rows.tokens])

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)


@dataclass
class MirrorLinks:
    """This attention rank's ring neighbours (global ranks) and the pair groups to them."""

    next_rank: int
    prev_rank: int
    next_group: object
    prev_group: object


def build_mirror_links(plan, env) -> MirrorLinks | None:
    """Pair groups between rank t of replica r and rank t of replica r + 1 (mod R), created in
    the same order on every rank. None for expert ranks or a plan of one replica."""
    R, T = plan.attn_replicas, plan.attn_tp
    if R < 2:
        return None
    groups = {}
    for r in range(R if R > 2 else 1):  # with two replicas the two directions share one pair
        for t in range(T):
            a, b = r * T + t, ((r + 1) % R) * T + t
            groups[frozenset((a, b))] = dist.new_group(sorted((a, b)), timeout=env.timeout)
    role = plan.role(env.rank)
    if role.kind != "attention":
        return None
    me, t = env.rank, role.index
    nxt, prv = ((role.replica + 1) % R) * T + t, ((role.replica - 1) % R) * T + t
    return MirrorLinks(nxt, prv, groups[frozenset((me, nxt))], groups[frozenset((me, prv))])


def _gather(cache: KVCache, rows: MirrorRows) -> torch.Tensor:
    """[tokens, layers, kv_heads, k_dim + v_dim] of the rows, in row order (k and v side by side:
    an MLA layer's latent and roped key differ in width)."""
    parts = []
    for slot, start, count in zip(rows.slots, rows.starts, rows.counts):
        kv = torch.stack([torch.cat((k[slot, :, start:start + count], v[slot, :, start:start + count]), -1)
                          for k, v in zip(cache.k, cache.v)])  # [L, K, n, Dk + Dv]
        parts.append(kv.permute(2, 0, 1, 3))  # [n, L, K, Dk + Dv]
    return torch.cat(parts).contiguous()


def _scatter(shadow: KVCache, rows: MirrorRows, data: torch.Tensor) -> None:
    offset, dk = 0, shadow.k[0].shape[-1]
    for slot, start, count in zip(rows.slots, rows.starts, rows.counts):
        block = data[offset:offset + count].permute(1, 2, 0, 3)  # [L, K, n, Dk + Dv]
        for layer in range(len(shadow.k)):
            shadow.k[layer][slot, :, start:start + count] = block[layer, ..., :dk]
            shadow.v[layer][slot, :, start:start + count] = block[layer, ..., dk:]
        offset += count


def exchange(links: MirrorLinks, cache: KVCache, shadow: KVCache, mine: MirrorRows | None,
             theirs: MirrorRows | None) -> None:
    """Send the rows this rank wrote in the step to the next replica; receive the previous
    replica's into the shadow cache. Raises on a failed transfer (a dead neighbour)."""
    ops, buf = [], None
    if mine is not None and mine.num_tokens:
        ops.append((True, _gather(cache, mine), links.next_rank, links.next_group))
    if theirs is not None and theirs.num_tokens:
        L, (_, K, _, Dk), Dv = len(shadow.k), shadow.k[0].shape, shadow.v[0].shape[-1]
        buf = torch.empty(theirs.num_tokens, L, K, Dk + Dv, dtype=shadow.k[0].dtype, device=shadow.k[0].device)
        ops.append((False, buf, links.prev_rank, links.prev_group))
    works = comm.pair_transfers(ops, "mirror rows") if ops else []
    for work in works:
        work.wait()
    if buf is not None:
        _scatter(shadow, theirs, buf)
