"""Ranks that behave alike: the simulator times one of each and counts the others.

In a separated or colocated-EP plan most ranks run the same op list at the same costs, and they
meet the others only in transfers whose members are every rank of the plan (dispatch, combine)
or one whole attention replica (its head-parallel all-reduce). A rank's timeline follows from its
own costs and from when each transfer's slowest member arrives, so ranks with equal costs have
equal timelines: simulating one representative per class gives every rank's times, at the cost of
a few ranks instead of hundreds (a 512-GPU plan has a handful of classes).

A class key holds everything the cost model reads about a rank, computed without the costs:
  attention replica (separated)  its sequences (part of the batch), whether it spans nodes, and
                                 per rank the number of expert ranks on its node (the rest of
                                 its dispatch crosses nodes); its rank index t gives its heads
  expert rank (separated)        per held expert, the tokens it serves in each micro-batch (from
                                 how many ranks hold that expert and which of them this is), and
                                 the number of attention ranks on its node
  rank (ep)                      its sequences, the tokens each held expert receives in every
                                 micro-batch (counted for all ranks at once), its node's size
  TP column (tp_pp)              rank t of every stage, stage by stage: its heads, the KV heads
                                 they span, the logits, whether its TP group spans nodes and its
                                 pipeline neighbours share its node
Whole units are represented: a representative replica brings all of its ranks (its all-reduce keeps
every member), a representative column all of its stages (each activation handed down the pipeline
finds its receiver); a TP group's all-reduce then waits for the columns kept, which are the slowest
of their kind. single plans have one rank.

tests/test_classes.py checks that members of one class have equal costs and that a simulation of
the representatives gives the TPOT, floor and per-GPU numbers of the full simulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..config import ModelConfig
from ..plan import split_evenly
from .costmodel import Workload, _by_residue, kv_heads_for, part_size, placement_of, plan_holders, routed_tokens


@dataclass(frozen=True)
class RankClasses:
    reps: tuple[int, ...]  # one world rank per class, ascending
    class_of: tuple[int, ...]  # world rank -> index of its class in `reps`

    @property
    def counts(self) -> tuple[int, ...]:
        """How many world ranks each representative stands for."""
        out = [0] * len(self.reps)
        for c in self.class_of:
            out[c] += 1
        return tuple(out)

    def expand(self, per_rep: list) -> list:
        """Values of the representatives, one per world rank."""
        return [per_rep[c] for c in self.class_of]

    @classmethod
    def identity(cls, world_size: int) -> "RankClasses":
        return cls(tuple(range(world_size)), tuple(range(world_size)))


def _per_node(hw, ranks: range) -> dict[int, int]:
    """How many of `ranks` each node holds, one node at a time (not one rank at a time)."""
    out: dict[int, int] = {}
    r = ranks.start
    while r < ranks.stop:
        stop = min(hw.node_span(r).stop, ranks.stop)
        out[hw.node(r)] = out.get(hw.node(r), 0) + stop - r
        r = stop
    return out


@lru_cache(maxsize=4096)
def _separated_layout(plan, cfg: ModelConfig, hw) -> tuple[list[tuple], list[tuple]]:
    """What a separated plan's keys hold apart from the batch (the same at every batch): per replica,
    whether it spans nodes and each rank's expert ranks on its node; per expert rank, its copies and
    the attention ranks on its node."""
    a, world, t = plan.num_attention_ranks, plan.world_size, plan.attn_tp
    node_e, node_a = _per_node(hw, range(a, world)), _per_node(hw, range(a))  # the other group, per node
    near_e: list[int] = []  # per attention rank: expert ranks on its node
    for node, count in sorted(node_a.items()):
        near_e += [node_e.get(node, 0)] * count
    replicas = [(hw.node(lo) != hw.node(lo + t - 1), tuple(near_e[lo:lo + t])) for lo in range(0, a, t)]
    holders = plan_holders(plan, cfg)
    experts = [(tuple((len(holders[e]), holders[e].index(j)) for e in held), node_a.get(hw.node(a + j), 0))
               for j, held in enumerate(placement_of(plan, cfg))]
    return replicas, experts


def _separated_keys(plan, cfg: ModelConfig, work: Workload, hw) -> list:
    """One key per unit: a whole attention replica (T ranks), then each expert rank. An expert rank's
    key holds the tokens each held expert gets in each micro-batch (copy q of an expert held c times
    serves the replicas r = q (mod c), costmodel.routed_tokens), so copies that serve as many tokens
    share a class."""
    replicas, experts = _separated_layout(plan, cfg, hw)
    base, extra = divmod(work.batch, plan.attn_replicas)  # split_evenly: the first `extra` replicas get one more
    served: dict[tuple[int, int], tuple[int, ...]] = {}

    def tokens(c: int, q: int) -> tuple[int, ...]:
        if (c, q) not in served:
            served[c, q] = tuple(_by_residue(plan, work.batch, mb, c)[q] for mb in range(plan.microbatches))
        return served[c, q]

    return [("replica", base + (r < extra), *layout) for r, layout in enumerate(replicas)] + [
        ("experts", tuple(tokens(c, q) for c, q in copies), near) for copies, near in experts]


def _ep_keys(plan, cfg: ModelConfig, work: Workload, hw) -> list:
    sizes = _per_node(hw, range(plan.world_size))
    return [("rank", part_size(work.batch, plan.ep, r),
             tuple(routed_tokens(plan, cfg, work.batch, mb, r) for mb in range(plan.microbatches)), sizes[hw.node(r)])
            for r in range(plan.ep)]


def _tp_pp_columns(plan, cfg: ModelConfig, hw) -> tuple[list[tuple], list]:
    """tp_pp: one unit per TP column t (rank t of every stage, which hand activations down the
    pipeline to each other); its key holds, stage by stage, what the cost model reads about the rank:
    its heads, the KV heads they span, whether it computes the logits, whether its TP group spans
    nodes and whether its neighbours up and down the pipeline share its node."""
    heads = split_evenly(cfg.num_heads, plan.tp)
    units, keys = [], []
    for t in range(plan.tp):
        ranks = tuple(s * plan.tp + t for s in range(plan.pp))
        key = []
        for s, r in enumerate(ranks):
            first, last = s * plan.tp, (s + 1) * plan.tp - 1
            key.append((len(heads[t]), kv_heads_for(cfg, heads[t]), s == plan.pp - 1 and t == 0,
                        hw.node(first) != hw.node(last),
                        s > 0 and hw.node(r) == hw.node(r - plan.tp),
                        s < plan.pp - 1 and hw.node(r) == hw.node(r + plan.tp)))
        units.append(ranks)
        keys.append(("column", tuple(key)))
    return units, keys


@lru_cache(maxsize=4096)
def rank_classes(plan, cfg: ModelConfig, work: Workload, hw) -> RankClasses:
    """The classes of `plan`'s ranks (module docstring); every rank its own class for single."""
    world = plan.world_size
    if plan.strategy == "tp_pp":
        units, keys = _tp_pp_columns(plan, cfg, hw)
    elif plan.strategy == "ep":
        units = [(r,) for r in range(world)]
        keys = _ep_keys(plan, cfg, work, hw)
    elif plan.strategy == "separated":
        t, a = plan.attn_tp, plan.num_attention_ranks
        units = [tuple(range(r * t, (r + 1) * t)) for r in range(plan.attn_replicas)] + [(r,) for r in range(a, world)]
        keys = _separated_keys(plan, cfg, work, hw)
    else:
        return RankClasses.identity(world)
    first: dict = {}
    class_of = [0] * world
    reps: list[int] = []
    for unit, key in zip(units, keys):
        if key not in first:
            first[key] = len(reps)
            reps.extend(unit)
        base = first[key]
        for i, r in enumerate(unit):
            class_of[r] = base + i
    order = sorted(range(len(reps)), key=lambda i: reps[i])  # representatives ascending, as world ranks
    where = {old: new for new, old in enumerate(order)}
    return RankClasses(tuple(reps[i] for i in order), tuple(where[c] for c in class_of))

