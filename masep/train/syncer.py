"""Gradient synchronisation of a training rank: which tensors add up over which ranks.

Each rank's `ParamSync` list (parallel/training.py) names, per parameter or expert slice, the
ranks whose gradients of it sum to the full gradient. The distinct rank sets of the whole world
are agreed once (an all-gather of each rank's sets), every rank builds the groups of every set
in the same sorted order (torch's rule for new_group), and each set's tensors go through one
GradSync (hierarchical all-reduce, optional int8 compression with error feedback).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from ..parallel import comm
from ..parallel.gradsync import GradSync, build_sync_groups
from ..parallel.training import ParamSync


class GradSyncer:
    def __init__(self, syncs: list[ParamSync], timeout, compression: str = "none", gpus_per_node: int = 8,
                 rank: int = 0):
        self.syncs, self.timeout, self.rank = syncs, timeout, rank
        by_set = defaultdict(list)
        for s in syncs:
            by_set[s.ranks].append(s)
        self.by_set = dict(by_set)
        mine = sorted({s.ranks for s in syncs if len(s.ranks) > 1})
        everyone = [mine]
        if dist.is_initialized():
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        self.groups: dict[tuple, GradSync] = {}
        self.reasons: dict[tuple, str] = {}
        for ranks in sorted({r for sets in everyone for r in sets}):
            groups = build_sync_groups(list(ranks), gpus_per_node, timeout)  # every rank, same order
            if ranks in self.by_set:
                self.groups[ranks] = GradSync(groups, compression)
                self.reasons[ranks] = getattr(groups, "reason", "")

    def sync(self) -> None:
        """Sum each set's gradients over its ranks, in place (unused parameters count as zero)."""
        for s in self.syncs:
            if s.param.grad is None:
                s.param.grad = torch.zeros_like(s.param)
        for bucket, (ranks, sync) in enumerate(sorted(self.groups.items())):
            sync.sync_([s.grad() for s in self.by_set[ranks]], bucket=bucket)

    def local_norm_sq(self) -> torch.Tensor:
        """Sum of squared gradients this rank owns (each element of the model counted once)."""
        total = torch.zeros((), dtype=torch.float32)
        for s in self.syncs:
            g = s.grad()
            if s.owner and g is not None:
                total = total + g.float().pow(2).sum().cpu()
        return total

    @property
    def bytes_sent(self) -> int:
        return sum(g.bytes_sent for g in self.groups.values())

    @property
    def bytes_uncompressed(self) -> int:
        return sum(g.bytes_uncompressed for g in self.groups.values())


def world_sum(values: torch.Tensor, timeout, what: str) -> torch.Tensor:
    """Sum a small float64 vector over every rank (step statistics, the gradient norm)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    return comm.group_all_reduce(values, None, timeout, what)
