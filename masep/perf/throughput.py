"""Highest throughput under a TPOT limit, or lowest cost per million output tokens with prices.

A plan shape (a plan without its batch) streams its weights once per micro-batch whatever the
batch, so its tokens/s grows with the batch while TPOT stays under the limit. Each shape is taken
at the largest batch of the grid (powers of two up to --max-batch) whose memory fits (memory only
grows with the batch: bisection) and whose lower bound meets the limit (bisection), and shapes are
simulated in order of batch / bound (a simulation stops as soon as it passes the limit); a shape
whose simulated TPOT misses the limit goes back with the next smaller batch. The search ends when no
shape left can beat the N-th best. Hardware options (several profiles, or attention and experts on
two kinds, hardware.MixedHardware) are shapes too, each paying its own kinds' prices (pricing.py).
"""
from __future__ import annotations

import dataclasses
import heapq
import math

from ..config import ModelConfig
from .costmodel import Workload, describe
from .planner import (STRATEGY_NAMES, Search, _fits, _strategies_on, candidate_plans, hardware_for,
                      lower_bound_s)
from .pricing import usd_per_hour, usd_per_million_tokens
from .simulator import OverDeadline, Simulation, simulate


def legal_at(plan, batch: int) -> bool:
    """Whether candidate_plans offers `plan`'s micro-batch count at `batch`."""
    m = plan.microbatches
    if plan.strategy == "separated":
        return m <= max(1, batch // plan.attn_replicas)
    if plan.strategy == "tp_pp":
        return m <= batch
    if plan.strategy == "ep":
        return m <= math.ceil(batch / plan.ep)
    return True


def batch_candidates(max_batch: int) -> list[int]:
    out, b = [], 1
    while b <= max_batch:
        out.append(b)
        b *= 2
    if out[-1] != max_batch:
        out.append(max_batch)
    return out


class _Goal:
    """What the throughput search ranks by: tokens/s (higher first) or, with prices, USD per million
    output tokens (lower first). `key` is smaller for better; `bound` is the best key a shape can
    reach at a batch given the TPOT lower bound there."""

    def __init__(self, prices: dict[str, float] | None):
        self.prices = prices
        self._hourly: dict = {}

    def hourly(self, hw, world: int) -> float:
        if (hw, world) not in self._hourly:
            self._hourly[hw, world] = usd_per_hour(hw, world, self.prices)
        return self._hourly[hw, world]

    def _key(self, hw, world: int, tps: float) -> float:
        return -tps if self.prices is None else usd_per_million_tokens(self.hourly(hw, world), tps)

    def bound(self, plan, hw, batch: int, lb: float) -> float:
        return self._key(hw, plan.world_size, batch / lb)

    def key(self, sim: Simulation) -> tuple:
        return round(self._key(sim.hw, sim.num_gpus, sim.tps), 9), describe(sim.plan), sim.hw.name


class _Shape:
    """One plan shape on one hardware: its legal batches, and memory / lower-bound checks at each,
    each done at most once."""

    def __init__(self, plan, hw, cfg, batches, work: Workload, overlap):
        self.plan, self.hw, self.cfg, self.overlap = plan, hw, cfg, overlap
        self.works = [dataclasses.replace(work, batch=b) for b in batches if legal_at(plan, b)]
        self._fit: dict[int, str | None] = {}
        self._lb: dict[int, float] = {}

    def why_not(self, i: int) -> str | None:
        """None when the shape fits at its i-th batch, else the reason."""
        if i not in self._fit:
            rejected: list = []
            self._fit[i] = None if _fits(self.plan, self.cfg, self.works[i], self.hw, rejected) else rejected[0][1]
        return self._fit[i]

    def lb(self, i: int) -> float:
        if i not in self._lb:
            self._lb[i] = lower_bound_s(self.plan, self.cfg, self.works[i], self.hw, self.overlap)
        return self._lb[i]

    def largest(self, below: int, ok) -> int:
        """The largest index < below where ok(i) holds, ok being true up to some index and false after
        (memory, lower bound: both only grow with the batch); -1 when none."""
        lo, hi = 0, below - 1
        if hi < 0 or not ok(0):
            return -1
        if ok(hi):  # often the case under a loose limit: no bisection needed
            return hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
        return lo


def search_throughput(cfg: ModelConfig, hw, gpus: int, context: int, tpot_limit_s: float, *,
                      max_batch: int = 1024, strategies=STRATEGY_NAMES, top: int = 5, max_microbatches: int = 8,
                      lm_head: bool = True, overlap: bool = True, prices: dict[str, float] | None = None,
                      dispatch: str = "padded") -> Search:
    """Rank (batch, plan) pairs with simulated TPOT <= tpot_limit_s by tokens/s, or with `prices` (USD
    per GPU-hour by profile name) by USD per million output tokens (module docstring). `hw`: a
    profile, a MixedHardware split, or a list of them (hardware options searched together).
    `dispatch`: Workload.dispatch (the runtime's padded blocks, or the routed-rows what-if)."""
    options = list(hw) if isinstance(hw, (list, tuple)) else [hw]
    goal, batches = _Goal(prices), batch_candidates(max_batch)
    template = Workload(1, context, lm_head, dispatch)
    shapes = [_Shape(plan, hardware_for(option, plan), cfg, batches, template, overlap)
              for option in options
              for plan in candidate_plans(cfg, gpus, max_batch, _strategies_on(option, strategies), max_microbatches,
                                          option.gpus_per_node)]
    rejected: list[tuple[str, str]] = []
    heap: list = []

    def push(k: int, below: int) -> None:
        """Shape k at its largest batch below index `below` that fits and whose bound meets the limit."""
        shape = shapes[k]
        fit = shape.largest(below, lambda i: shape.why_not(i) is None)
        if fit < 0:
            if below == len(shape.works) and shape.works:
                rejected.append((describe(shape.plan), shape.why_not(0)))
            return
        i = shape.largest(fit + 1, lambda i: shape.lb(i) <= tpot_limit_s)
        if i >= 0:
            heapq.heappush(heap, (goal.bound(shape.plan, shape.hw, shape.works[i].batch, shape.lb(i)), k, i))

    for k, shape in enumerate(shapes):
        push(k, len(shape.works))
    best: list[Simulation] = []
    simulated = 0
    while heap:
        bound, k, i = heapq.heappop(heap)
        if len(best) >= top and bound >= goal.key(best[top - 1])[0]:
            break
        shape = shapes[k]
        simulated += 1
        try:
            sim = simulate(shape.plan, cfg, shape.works[i], shape.hw, overlap=overlap, check_fit=False, grouped=True,
                           deadline_s=tpot_limit_s)
        except OverDeadline:  # over the limit at this batch: the shape may still meet it at a smaller one
            push(k, i)
            continue
        best.append(sim)
        best.sort(key=goal.key)
        del best[top:]
    work = best[0].work if best else template
    return Search(cfg, hw, gpus, work, best, candidates=sum(len(s.works) for s in shapes), simulated=simulated,
                  rejected=rejected, tpot_limit_s=tpot_limit_s, prices=prices)
