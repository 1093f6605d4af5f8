"""The floor of a plan's decode step: a lower bound on any run of the plan's per-rank op lists.

One function (`plan_floor`) serves the simulator (spec rates of the hardware profile, collective
times of the cost model), the GPU benchmarks (copy bandwidth, matmul rate and collective times
measured in the same run) and the README tables.

Work of one op. Every compute op (attention, experts, head) of rank r and micro-batch i reads
the cost model's bytes and does its FLOPs *at the plan's m* (costmodel.py): a micro-batch re-reads
the experts its own tokens touch, so m > 1 costs bytes at small batch. Its bound is
    b(op) = max(bytes / HBM bandwidth, FLOPs / matmul peak)
(no per-op latency). A transfer's bound is its collective time (`Rates.transfer_s`). A rank runs
its compute ops one after another on its compute stream (runtime and simulator), so they add:
    W_r = sum of b(op) over r's compute ops of every micro-batch.

The floor is the largest of two kinds of bound, each true for any schedule of those ops:
  rank      max over ranks r of  pre_r + W_r + post_r.  pre_r: the shortest chain of work (ops of
            other ranks and transfers, each at its bound) that some micro-batch must finish before
            r can start its first compute op; post_r: the shortest chain that must follow r's last
            compute op. For tp_pp this is the classic pipeline bound: fill (a micro-batch through
            the stages before s) + all of stage s's work + drain (a micro-batch through the stages
            after s, the lm_head and the logits broadcast); at m = 1 it is the sum of the stages.
            For separated plans it adds one layer's attention + dispatch before an expert rank's
            work and combine + head after it; for single and ep plans pre = post = 0.
  chain     max over micro-batches of the dependency chain of that micro-batch alone (every op of
            it on every rank, each transfer waiting for all its members). At m = 1 this is the
            whole step with its transfers in line (the TP all-reduces of a TP-only plan).
Chains are the simulator's own dependency rules (same op lists, same matching), run with every op
at its bound; micro-batch sizes only fall with the index, so the shortest pre and post chains come
from the last two micro-batches and the longest chain from the first or the last (the lm_head).

What the floor leaves out (so it stays a lower bound): per-op latencies, waiting for peers, the
time a transfer takes beyond its collective time, and any overlap the runtime fails to reach.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ModelConfig
from .costmodel import OpCost, Workload, experts_touched, part_size
from .hardware import Hardware

COMPUTE_KINDS = ("attention", "experts", "head", "mlp")


@dataclass(frozen=True)
class Rates:
    """What the floor divides by.

    hbm_bytes_per_s     HBM bandwidth: the profile's spec (simulator) or the copy bandwidth measured
                        in the same run (benchmarks: bytes read + written per second of a large copy).
    matmul_flops_per_s  matmul peak: spec, or a measured bf16 matmul rate; None: FLOPs not counted.
    transfer_s          None: each transfer at the cost model's alpha-beta time from the profile
                        (what the simulator charges); a dict: seconds per transfer by op kind
                        (dispatch, combine, recv, send, allreduce, send_act, recv_act, allgather:
                        inside a replica after combine, broadcast: tp_pp's logits), e.g. medians of
                        CUDA-event-timed collectives; kinds missing from it count 0.
    source              a few words saying where the numbers came from (reported beside the floor).
    """
    hbm_bytes_per_s: float
    matmul_flops_per_s: float | None = None
    transfer_s: tuple | dict | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.hbm_bytes_per_s, (int, float)) and self.hbm_bytes_per_s > 0):
            raise ValueError(f"Rates.hbm_bytes_per_s={self.hbm_bytes_per_s!r}: must be a positive number")
        if self.matmul_flops_per_s is not None and not self.matmul_flops_per_s > 0:
            raise ValueError(f"Rates.matmul_flops_per_s={self.matmul_flops_per_s!r}: must be > 0 or None")
        if isinstance(self.transfer_s, dict):  # stored as sorted pairs: hashable, comparable
            object.__setattr__(self, "transfer_s", tuple(sorted(self.transfer_s.items())))

    @classmethod
    def spec(cls, hw: Hardware) -> "Rates":
        """The profile's datasheet rates; transfers at the cost model's times."""
        return cls(hw.hbm_bytes_per_s, hw.matmul_flops_per_s, None, f"{hw.name} spec")

    @classmethod
    def achievable(cls, hw: Hardware) -> "Rates":
        """The profile's achievable rates (spec x efficiency); transfers at the cost model's times."""
        return cls(hw.hbm_bytes_per_s * hw.hbm_efficiency, hw.matmul_flops_per_s * hw.matmul_efficiency, None,
                   f"{hw.name} achievable")

    def op_s(self, nbytes: float, flops: float) -> float:
        t = nbytes / self.hbm_bytes_per_s
        return max(t, flops / self.matmul_flops_per_s) if self.matmul_flops_per_s else t


@dataclass(frozen=True)
class Floor:
    """A plan's floor and the parts that explain it (seconds, bytes, FLOPs)."""
    seconds: float
    binds: str  # "rank" (pre + a rank's work + post) or "chain" (one micro-batch's dependency chain)
    rank: int  # the binding rank (rank bound) or the rank whose work is largest (chain bound)
    microbatch: int  # the micro-batch whose chain binds (chain bound), else -1
    pre_s: float  # chain before the binding rank's first compute op (rank bound)
    work_s: float  # the binding rank's compute ops at their bounds
    post_s: float  # chain after its last compute op (rank bound)
    transfer_s: float  # part of the binding bound that is transfer time
    bytes: float  # HBM bytes the binding rank reads in the step
    flops: float  # its FLOPs
    bytes_s: float  # bytes / bandwidth of that rank
    flops_s: float  # FLOPs / matmul peak of that rank (0 when the peak is not given)
    rates: Rates
    label: str  # e.g. "rank 56 (stage 7): fill 3.1 + work 40.2 + drain 0.0 ms"

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rates"}
        d["rates"] = dict(hbm_bytes_per_s=self.rates.hbm_bytes_per_s, matmul_flops_per_s=self.rates.matmul_flops_per_s,
                          transfer_s=dict(self.rates.transfer_s) if self.rates.transfer_s else self.rates.transfer_s,
                          source=self.rates.source)
        return d


def _scaled(plan, cfg: ModelConfig, work: Workload, c: OpCost, mb: int, touched: float | None) -> OpCost:
    """An experts op with its weight bytes scaled to `touched` measured experts per layer (see plan_floor)."""
    if touched is None or c.kind != "experts" or c.weight_bytes == 0:
        return c
    if plan.strategy not in ("single", "tp_pp"):
        raise ValueError(f"experts_touched_per_layer: only for single and tp_pp plans (every rank sees every "
                         f"token of a micro-batch), not {plan.strategy}")
    tokens = part_size(work.batch, plan.microbatches, mb)
    ratio = touched / experts_touched(cfg, tokens)
    return dataclasses.replace(c, hbm_bytes=c.hbm_bytes + (ratio - 1) * c.weight_bytes,
                               weight_bytes=c.weight_bytes * ratio)


# a transfer inside a compute op, or after it, by the kind a measured `Rates.transfer_s` names it
_INNER = {"attention": "allreduce"}  # separated, T > 1: the replica's head-parallel partial sums
_POST = {"combine": "allgather", "head": "broadcast"}  # inside a replica; tp_pp's logits to every rank


def _bound_costs(costs, rates: Rates, transfers: bool) -> list[OpCost]:
    """Each op at its bound: a compute op's max(bytes/bw, FLOPs/peak), then its transfer and its
    tail (all-gather inside a replica, the logits broadcast) at their collective times."""
    out = []
    for c in costs:
        comp = rates.op_s(c.hbm_bytes, c.flops) if c.kind in COMPUTE_KINDS else 0.0
        tr = post = 0.0
        if transfers and rates.transfer_s is None:
            tr, post = c.transfer_s, c.post_s
        elif transfers:
            table = dict(rates.transfer_s)
            tr = table.get(_INNER.get(c.kind, c.kind), 0.0) if c.transfer_s or c.kind not in COMPUTE_KINDS else 0.0
            post = table.get(_POST.get(c.kind, ""), 0.0) if c.post_s else 0.0
        out.append(OpCost(c.kind, compute_s=comp, transfer_s=tr, post_s=post))
    return out


def _chains(plan, cfg, work, hw, ops, costs, mb: int, reverse: bool, ranks) -> tuple[list[float], float]:
    """Micro-batch `mb` alone, every op at its bound: per rank of `ranks` (one per class of alike
    ranks, classes.py), when its first compute op can start (reverse=True: how long must follow its
    last compute op), and the chain's length."""
    from .simulator import _run, match
    n = len(ranks)
    index = {r: i for i, r in enumerate(ranks)}
    sel = [[i for i, o in enumerate(ops[r]) if o.mb == mb] for r in range(n)]
    if reverse:
        sel = [s[::-1] for s in sel]
    sub_ops = [[ops[r][i] for i in sel[r]] for r in range(n)]
    sub_costs = [[costs[r][i] for i in sel[r]] for r in range(n)]
    if reverse:  # a member's own work now follows the rendezvous and its tail precedes it
        sub_costs = [[dataclasses.replace(c, compute_s=c.post_s, post_s=c.compute_s) for c in cs] for cs in sub_costs]
    recs = _run(plan, cfg, work, hw, False, sub_costs, sub_ops, match, lambda kind: 0, ranks)
    first = [None] * n
    for rec in recs:  # records come rank by rank in op order
        if rec.op.kind in COMPUTE_KINDS and first[index[rec.rank]] is None:
            first[index[rec.rank]] = rec.start
    return [f if f is not None else 0.0 for f in first], max((rec.end for rec in recs), default=0.0)


def plan_floor(plan, cfg: ModelConfig, work: Workload, hw: Hardware, rates: Rates | None = None,
               experts_touched_per_layer: float | None = None, achievable: bool = False) -> Floor:
    """The floor of one decode step of `plan` (module docstring). `hw` gives the GPU layout (nodes)
    and, for `rates.transfer_s=None`, the transfer times; `rates` defaults to `Rates.spec(hw)`.
    `experts_touched_per_layer`: distinct experts per layer and micro-batch counted from a run's
    routing; scales every experts op's weight bytes from the expectation to it (benchmarks).
    Without `rates`, each rank at its own kind's spec rates (achievable=True: its achievable rates, which is
    not a bound); hw.for_rank gives a rank's kind (MixedHardware has two).
    Ranks are taken one per class of alike ranks (classes.py): the bounds are the same for all."""
    from .classes import rank_classes
    from .simulator import all_costs, rank_ops
    reps = rank_classes(plan, cfg, work, hw).reps
    own = Rates.achievable if achievable else Rates.spec
    rank_rates = [rates or own(hw.for_rank(r)) for r in reps]
    m, n = plan.microbatches, len(reps)
    ops = [rank_ops(plan, cfg, r) for r in reps]
    model = [[_scaled(plan, cfg, work, c, o.mb, experts_touched_per_layer) for o, c in zip(ops[i], cs)]
             for i, cs in enumerate(all_costs(plan, cfg, work, hw, reps))]
    full = [_bound_costs(cs, rank_rates[i], True) for i, cs in enumerate(model)]
    bare = [_bound_costs(cs, rank_rates[i], False) for i, cs in enumerate(model)]

    def compute(r, key):  # sum over r's compute ops
        return sum(key(c, b) for c, b in zip(model[r], full[r]) if c.kind in COMPUTE_KINDS)

    work_s = [compute(r, lambda c, b: b.compute_s) for r in range(n)]
    runs: dict = {}

    def chains(costs, i, reverse):  # each micro-batch chain is run once per cost set and direction
        key = (id(costs), i, reverse)
        if key not in runs:
            runs[key] = _chains(plan, cfg, work, hw, ops, costs, i, reverse, reps)
        return runs[key]

    short = sorted({max(m - 2, 0), m - 1})  # the smallest micro-batches (with and without the lm_head)

    def around(costs, r=None):  # shortest chain before / after each rank's compute
        pre = [min(v) for v in zip(*[chains(costs, i, False)[0] for i in short])]
        post = [min(v) for v in zip(*[chains(costs, i, True)[0] for i in short])]
        return pre, post

    pre, post = around(full)
    rank_b = [pre[r] + work_s[r] + post[r] for r in range(n)]
    r = max(range(n), key=lambda i: (rank_b[i], -i))
    lengths = {i: chains(full, i, False)[1] for i in sorted({0, m - 1})}
    mb = max(lengths, key=lambda i: (lengths[i], -i))
    nbytes, flops = compute(r, lambda c, b: c.hbm_bytes), compute(r, lambda c, b: c.flops)
    rates = rank_rates[r]
    peak = rates.matmul_flops_per_s
    common = dict(rank=reps[r], pre_s=pre[r], work_s=work_s[r], post_s=post[r], bytes=nbytes, flops=flops,
                  bytes_s=nbytes / rates.hbm_bytes_per_s, flops_s=flops / peak if peak else 0.0, rates=rates)
    if lengths[mb] > rank_b[r]:
        tr = lengths[mb] - chains(bare, mb, False)[1]
        return Floor(lengths[mb], "chain", microbatch=mb, transfer_s=tr,
                     label=f"micro-batch {mb}'s dependency chain {lengths[mb] * 1e3:.3f} ms (transfers "
                           f"{tr * 1e3:.3f} ms of it)", **common)
    pre0, post0 = around(bare)
    tr = (pre[r] - pre0[r]) + (post[r] - post0[r])
    where = f"rank {reps[r]}" + (f" (stage {reps[r] // plan.tp})" if plan.strategy == "tp_pp" else "")
    return Floor(rank_b[r], "rank", microbatch=-1, transfer_s=tr,
                 label=f"{where}: before {pre[r] * 1e3:.3f} + work {work_s[r] * 1e3:.3f} + after "
                       f"{post[r] * 1e3:.3f} ms ({nbytes / 1e9:.2f} GB, {flops / 1e12:.2f} TFLOP)", **common)


def floor_s(plan, cfg: ModelConfig, work: Workload, hw: Hardware, rates: Rates | None = None) -> float:
    return plan_floor(plan, cfg, work, hw, rates).seconds
