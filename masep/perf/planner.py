"""Planner: enumerate the legal plans for N GPUs, simulate them, rank them, explain the winner.

Candidates (`candidate_plans`):
  separated  E expert ranks, the other A = N - E ranks as R replicas x T head-parallel ranks
             (every T <= heads dividing A); contiguous expert placement, or round-robin replicas
             when E > experts; m = 1..max_microbatches with m <= batch / R. E takes every value
             1..N-1 up to FULL_GRID_GPUS GPUs; above, 1..16 and the multiples of a node (expert
             groups of whole nodes: 79 values instead of 511 at 512 GPUs)
  tp_pp      tp x pp = N, tp <= heads, pp <= layers; m = 1..max_microbatches, m <= batch
  ep         ep = N (contiguous placement, round-robin replicas when N > experts);
             m <= ceil(batch / N)
  single     N = 1
Plans whose head-parallel groups span nodes or whose memory does not fit are rejected (with the
numbers, see `Search.rejected`). Ranks that behave alike are simulated once (classes.py).

Lowest TPOT at a batch (`search`) is exact branch and bound: `lower_bound_s` never exceeds the
simulated TPOT, so candidates are simulated in order of it until it passes the N-th best TPOT;
the winner is the plan exhaustive simulation would pick.

Highest throughput (or lowest cost per token) under a TPOT limit: `search_throughput`, in
throughput.py (imported here too).

Explanation (MegaScale-Infer, arXiv 2504.02263): per layer and micro-batch, T_a = attention
(+ its all-reduce), T_e = experts (+ all-reduce in tp_pp), T_c = the slowest transfer between
them; T_f = max(T_a, T_e). Ping-pong hides transfers when T_c < T_f and m >= 2(1 + T_c/T_f);
balance is T_a / T_e (1 = balanced).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import lru_cache

from ..config import ModelConfig
from ..plan import EpPlan, SeparatedPlan, SinglePlan, TpPpPlan
from .classes import rank_classes
from .costmodel import Workload, check_memory, describe, plan_to_dict, rank_role
from .hardware import Hardware, MixedHardware
from ..parallel.schedule import EXPERTS, RECV_ACT
from .simulator import COMPUTE_KINDS, Simulation, _stream, rank_cost_table, simulate

STRATEGY_NAMES = ("separated", "tp_pp", "ep", "single")


FULL_GRID_GPUS = 64  # up to this many GPUs every expert-group size is a candidate; above, a coarser grid


@lru_cache(maxsize=1024)
def _replicated(num_experts: int, ranks: int) -> tuple[tuple[int, ...], ...] | None:
    """None (contiguous) when every rank can hold distinct experts, else expert j % E on rank j (one
    shared tuple per size: plans that share it hash it once)."""
    if ranks <= num_experts:
        return None
    return tuple((j % num_experts,) for j in range(ranks))


def plan_label(plan, cfg: ModelConfig) -> str:
    """The plan's notation, with the planner's round-robin placement (expert j % E on expert rank j, every
    expert held by several ranks) shown as ' rr' instead of one entry per rank."""
    placement = getattr(plan, "placement", None)
    ranks = plan.expert_ranks if plan.strategy == "separated" else getattr(plan, "ep", 0)
    if placement is not None and placement == _replicated(cfg.num_experts, ranks):
        return describe(dataclasses.replace(plan, placement=None)) + " rr"
    return describe(plan)


def expert_group_sizes(gpus: int, gpus_per_node: int = 8) -> list[int]:
    """Candidate expert-rank counts E of a separated plan on `gpus` GPUs (module docstring)."""
    if gpus <= FULL_GRID_GPUS:
        return list(range(1, gpus))
    return sorted({e for e in range(1, 17)} | set(range(gpus_per_node, gpus, gpus_per_node)))


def candidate_plans(cfg: ModelConfig, gpus: int, batch: int, strategies=STRATEGY_NAMES,
                    max_microbatches: int = 8, gpus_per_node: int = 8) -> list:
    out: list = []
    if "separated" in strategies:
        for e in expert_group_sizes(gpus, gpus_per_node):
            a = gpus - e
            for t in range(1, min(a, cfg.num_heads) + 1):
                if a % t:
                    continue
                r = a // t
                for m in range(1, min(max_microbatches, max(1, batch // r)) + 1):
                    out.append(SeparatedPlan(r, t, e, m, placement=_replicated(cfg.num_experts, e)))
    if "tp_pp" in strategies:
        for tp in range(1, min(gpus, cfg.num_heads) + 1):
            if gpus % tp == 0 and gpus // tp <= cfg.num_layers:
                for m in range(1, min(max_microbatches, batch) + 1):
                    out.append(TpPpPlan(tp, gpus // tp, m))
    if "ep" in strategies and gpus > 1:
        for m in range(1, min(max_microbatches, math.ceil(batch / gpus)) + 1):
            out.append(EpPlan(gpus, m, placement=_replicated(cfg.num_experts, gpus)))
    if "single" in strategies and gpus == 1:
        out.append(SinglePlan())
    return out


# transfers whose members are every rank of the plan (separated: dispatch == recv, combine == send; ep:
# dispatch, combine): each member's op lasts at least the slowest member's transfer time
_PLAN_WIDE = {"dispatch": "a2e", "recv": "a2e", "combine": "e2a", "send": "e2a"}


def lower_bound_s(plan, cfg: ModelConfig, work: Workload, hw: Hardware, overlap: bool = True) -> float:
    """A lower bound on the simulated TPOT from the op costs alone (one rank per class, classes.py):
      - a stream runs its ops one after another, each for at least its own time: the busiest stream;
      - tp_pp: stage s cannot start before micro-batch 0 went through the stages before it, and
        micro-batch m-1 must still go through the stages after it once s has done all its compute
        ops: (micro-batch 0's chain on stages < s) + (s's compute) + (micro-batch m-1's chain on
        stages > s), each stage's chain being its fastest rank's summed op times for that micro-batch
        (recv_act left out: it is the same transfer as the previous stage's send_act); and every
        micro-batch's chain through all stages. Without these a deep pipeline's bound was 1/pp of
        its step and the search simulated nearly every candidate.
      - a transfer among every rank of the plan (separated and ep dispatch / combine) ends when its
        slowest member's transfer does: each member's op counts that member's time;
      - separated and ep: one micro-batch's chain: each layer's attention, dispatch, the slowest
        expert rank's experts (a combine waits for every expert rank) and combine, one after another
        (what bounds plans whose transfers dominate).
    tests/test_planner.py checks it never exceeds the simulated TPOT."""
    reps = rank_classes(plan, cfg, work, hw).reps
    tables = {rank: rank_cost_table(plan, cfg, rank, work, hw) for rank in reps}
    slowest: dict[tuple[str, int], float] = {}  # a plan-wide transfer waits for its slowest member's share
    for table in tables.values():
        for kind, mb, n, c in table:
            if kind in _PLAN_WIDE:
                key = (_PLAN_WIDE[kind], mb)
                slowest[key] = max(slowest.get(key, 0.0), c.transfer_s)
    busiest, compute, chain, experts = 0.0, {}, {}, {}
    for rank in reps:
        streams: dict[int, float] = {}
        for kind, mb, n, c in tables[rank]:
            t = n * (c.time_s if kind not in _PLAN_WIDE else c.compute_s + slowest[_PLAN_WIDE[kind], mb] + c.post_s)
            stream = _stream(kind, overlap)
            streams[stream] = streams.get(stream, 0.0) + t
            if kind in COMPUTE_KINDS:
                compute[rank] = compute.get(rank, 0.0) + t
            if kind == EXPERTS and plan.strategy == "separated":  # on an expert rank: joins every rank's chain
                experts[mb] = max(experts.get(mb, 0.0), t)
            elif kind != RECV_ACT:
                chain[rank, mb] = chain.get((rank, mb), 0.0) + t
        busiest = max(busiest, max(streams.values()))
    if plan.strategy in ("separated", "ep"):
        one = max(t + experts.get(mb, 0.0) for (rank, mb), t in chain.items()
                  if plan.strategy == "ep" or rank < plan.num_attention_ranks)
        return max(busiest, one)
    if plan.strategy != "tp_pp" or plan.pp == 1:
        return busiest
    m = plan.microbatches

    classes = rank_classes(plan, cfg, work, hw)

    def stage_chain(stage: int, mb: int) -> float:  # every rank of the stage, through its class's representative
        return min(chain.get((classes.reps[classes.class_of[r]], mb), 0.0) for r in plan.stage_ranks(stage))

    pipeline = max(sum(stage_chain(s, 0) for s in range(r // plan.tp)) + compute.get(r, 0.0)
                   + sum(stage_chain(s, m - 1) for s in range(r // plan.tp + 1, plan.pp)) for r in reps)
    whole = max(sum(stage_chain(s, mb) for s in range(plan.pp)) for mb in range(m))
    return max(busiest, pipeline, whole)


@dataclass
class Search:
    """What the planner looked at: the ranked simulations and what it rejected and why."""
    cfg: ModelConfig
    hw: Hardware
    gpus: int
    work: Workload  # the batch searched at (the winner's, under a TPOT limit)
    ranked: list[Simulation]  # best first
    candidates: int = 0
    simulated: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (plan, reason)
    tpot_limit_s: float | None = None
    prices: dict[str, float] | None = None  # USD per GPU-hour by profile name: ranked by cost per token

    @property
    def best(self) -> Simulation:
        if not self.ranked:
            raise ValueError(self.no_plan_message())
        return self.ranked[0]

    def no_plan_message(self) -> str:
        why = self.rejected[0][1] if self.rejected else "no candidate plans"
        limit = f" under a TPOT limit of {self.tpot_limit_s * 1e3:.3f} ms" if self.tpot_limit_s else ""
        return (f"no plan for {self.gpus} GPU(s), batch {self.work.batch}, context {self.work.context}{limit}: "
                f"{len(self.rejected)} of {self.candidates} candidates rejected; e.g. {why}")


def check_head_groups_in_nodes(plan, gpus_per_node: int) -> None:
    """ValueError when a head-parallel group (a separated replica's ranks, a TP×PP stage's TP
    group) spans two nodes: its all-reduces run once per layer on the critical path, and over
    the slower link between nodes they would set the step's pace."""
    size, count = ((plan.attn_tp, plan.attn_replicas) if plan.strategy == "separated" else
                   (plan.tp, plan.pp) if plan.strategy == "tp_pp" else (1, 0))
    for first in range(0, size * count, size):  # group i holds ranks [i * size, (i + 1) * size)
        last = first + size - 1
        if size > 1 and first // gpus_per_node != last // gpus_per_node:
            raise ValueError(f"plan {describe(plan)}: the head-parallel group of ranks {first}-{last} spans "
                             f"two nodes of {gpus_per_node} GPUs; keep each replica or TP group inside a node")


def hardware_for(hw, plan):
    """The hardware `plan` runs on: a MixedHardware bound to the plan's two groups, else `hw` itself."""
    return hw.bind(plan) if isinstance(hw, MixedHardware) else hw


def _fits(plan, cfg, work, hw, rejected) -> bool:
    """Legal, head-parallel groups inside nodes, and every rank's memory fits (one rank per class)."""
    try:
        plan.validate(cfg, plan.world_size)
        check_head_groups_in_nodes(plan, hw.gpus_per_node)
        check_memory(plan, cfg, work, hw, rank_classes(plan, cfg, work, hw).reps)
    except ValueError as err:
        rejected.append((describe(plan), str(err)))
        return False
    return True


def _order_key(sim: Simulation) -> tuple:
    return (round(sim.tpot_s, 12), sim.plan.microbatches, describe(sim.plan))


def search(cfg: ModelConfig, hw: Hardware, gpus: int, work: Workload, *, strategies=STRATEGY_NAMES, top: int = 5,
           max_microbatches: int = 8, overlap: bool = True) -> Search:
    """Rank plans for a fixed batch by simulated TPOT (exact branch and bound, module docstring)."""
    plans = candidate_plans(cfg, gpus, work.batch, _strategies_on(hw, strategies), max_microbatches, hw.gpus_per_node)
    result = Search(cfg, hw, gpus, work, [], candidates=len(plans))
    bounded = []
    for i, plan in enumerate(plans):
        hwp = hardware_for(hw, plan)
        if _fits(plan, cfg, work, hwp, result.rejected):
            bounded.append((lower_bound_s(plan, cfg, work, hwp, overlap), i, plan))
    bounded.sort(key=lambda x: (x[0], x[1]))
    best: list[Simulation] = []
    for lb, _, plan in bounded:
        if len(best) >= top and lb >= best[top - 1].tpot_s:
            break
        best.append(simulate(plan, cfg, work, hardware_for(hw, plan), overlap=overlap, check_fit=False, grouped=True))
        result.simulated += 1
        best.sort(key=_order_key)
        del best[top:]
    result.ranked = best
    return result


def _strategies_on(hw, strategies) -> tuple[str, ...]:
    """Attention and experts on two kinds of GPU (MixedHardware) is for separated plans only."""
    return tuple(s for s in strategies if s == "separated") if isinstance(hw, MixedHardware) else tuple(strategies)


# --- explaining a plan ----------------------------------------------------------------------------------
def _first(sim: Simulation, kinds: tuple[str, ...], layer: int = 0, mb: int = 0) -> dict[int, float]:
    """Per rank: summed op time (compute + transfer + post) of `kinds` at (layer, mb)."""
    out: dict[int, float] = {}
    for r in sim.records:
        if r.op.kind in kinds and r.op.mb == mb and r.op.layer == layer:
            out[r.rank] = out.get(r.rank, 0.0) + r.cost.time_s
    return out


def _transfer(sim: Simulation, kinds: tuple[str, ...], layer: int, mb: int) -> float:
    """Slowest member's transfer of the matched op(s) at (layer, mb) (what the group waits)."""
    worst = 0.0
    for r in sim.records:
        if r.op.kind in kinds and r.op.mb == mb and r.op.layer == layer:
            worst = max(worst, r.cost.transfer_s + r.cost.post_s)
    return worst


def explain(sim: Simulation) -> dict:
    """T_attention, T_experts, T_transfer per layer and micro-batch (micro-batch 0, the first
    layer a rank runs), balance and MegaScale-Infer's conditions for ping-pong. The layer is the
    first MoE layer (dense first layers have no experts and no transfer)."""
    s, plan, moe = sim.plan.strategy, sim.plan, sim.cfg.first_dense_layers
    if s == "separated":
        t_a = max(_first(sim, ("attention",), moe).values())
        t_e = max(_first(sim, ("experts",), moe).values())
        t_c = max(_transfer(sim, ("dispatch", "recv"), moe, 0), _transfer(sim, ("combine", "send"), moe, 0))
    elif s == "tp_pp":
        t_a = max(_first(sim, ("attention",), moe).values()) + _transfer(sim, ("allreduce",), moe, 0)
        t_e = max(_first(sim, ("experts",), moe).values()) + _transfer(sim, ("allreduce",), moe, 0)
        t_c = _transfer(sim, ("allreduce",), moe, 0) + (_transfer(sim, ("send_act",), rank_role(
            plan, sim.cfg, 0).layers.stop - 1, 0) if plan.pp > 1 else 0.0)
    elif s == "ep":
        t_a = max(_first(sim, ("attention",), moe).values())
        t_e = max(_first(sim, ("experts",), moe).values())
        t_c = max(_transfer(sim, ("dispatch",), moe, 0), _transfer(sim, ("combine",), moe, 0))
    else:
        t_a = max(_first(sim, ("attention",), moe).values())
        t_e = max(_first(sim, ("experts",), moe).values())
        t_c = 0.0
    t_f = max(t_a, t_e)
    m_min = 2 * (1 + t_c / t_f) if t_f > 0 else 2.0
    head = max((r.cost.time_s for r in sim.records if r.op.kind == "head"), default=0.0)
    return dict(plan=describe(plan), plan_fields=plan_to_dict(plan), t_attention_ms=t_a * 1e3,
                t_experts_ms=t_e * 1e3, t_transfer_ms=t_c * 1e3, t_head_ms=head * 1e3,
                balance_ta_over_te=t_a / t_e if t_e > 0 else math.inf,
                bound="attention" if t_a > t_e else "experts",
                tc_below_tf=t_c < t_f, m=plan.microbatches, m_min=m_min, m_condition=plan.microbatches >= m_min,
                applies="ping-pong between attention and expert ranks" if s == "separated" else
                "for reference only: the conditions are about separated attention/expert groups")


def ms(value: float) -> str:
    """Milliseconds with three decimals, or two significant digits below 0.01 ms (a tiny model's
    floor printed as 0.000 read as no floor at all)."""
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.0095 else f"{value:.2g}"


def explain_text(sim: Simulation) -> str:
    x = explain(sim)
    d = sim.summary()
    lines = [f"winner: {x['plan']}  ({sim.plan.strategy}, {sim.num_gpus} GPUs)",
             f"  TPOT {d['tpot_ms']:.3f} ms, {d['tps']:,.0f} tok/s; floor {ms(d['floor_ms'])} ms "
             f"({d['tpot_over_floor']:.2f}x floor); MBU {d['mbu']:.1%} (useful bytes {d['mbu_useful']:.1%}); "
             f"MFU {d['mfu']:.2%}",
             f"  floor binds at {d['floor_binds']}",
             f"  per layer and micro-batch: T_attention {x['t_attention_ms']:.3f} ms, T_experts "
             f"{x['t_experts_ms']:.3f} ms, T_transfer {x['t_transfer_ms']:.3f} ms; head {x['t_head_ms']:.3f} ms",
             f"  balance T_a/T_e = {x['balance_ta_over_te']:.2f} ({x['bound']}-bound)",
             f"  MegaScale-Infer: T_c < T_f: {'yes' if x['tc_below_tf'] else 'NO'}; m = {x['m']} vs "
             f"2(1 + T_c/T_f) = {x['m_min']:.2f}: {'met' if x['m_condition'] else 'not met'} ({x['applies']})"]
    if sim.plan.strategy == "separated" and x["m"] < x["m_min"]:
        lines.append("  (a smaller m wins here: each micro-batch re-reads the experts it touches, which costs more "
                     "than the overlap gains at this batch)")
    return "\n".join(lines)



# --- the MA Separation paper's table -----------------------------------------------------------------------
# Claims of the MA Separation paper (docs/reference.md; 16 x A100 80GB, NVLink 3, the `paper` model,
# ~24 sequences decoding: TPS x TPOT ~ 24 in both rows). Kept as data to print beside the simulation,
# never to tune it.
SEED_CLAIMS = (
    dict(label="the MA Separation paper's claim: tp8pp2", strategy="tp_pp", plan_obj=TpPpPlan(8, 2, 1), tpot_ms=2.76, tps=8696),
    dict(label="the MA Separation paper's claim: sep RxT+4, RxT = 12", strategy="separated", plan_obj=SeparatedPlan(12, 1, 4, 1),
         tpot_ms=1.82, tps=13289),
)


def best_of(plans, cfg: ModelConfig, hw: Hardware, work: Workload, overlap: bool = True) -> Simulation | None:
    """The fastest of `plans` that fit (None when none fits)."""
    return best_of_with_errors(plans, cfg, hw, work, overlap)[0]


def best_of_with_errors(plans, cfg: ModelConfig, hw: Hardware, work: Workload,
                        overlap: bool = True) -> tuple[Simulation | None, list[str]]:
    """The fastest of `plans` that fit (None when none fits), and why the others were rejected."""
    sims, errors = [], []
    for plan in plans:
        try:
            sims.append(simulate(plan, cfg, work, hw, overlap=overlap))
        except ValueError as err:
            errors.append(str(err))
    return (min(sims, key=_order_key) if sims else None), errors


def _row(label: str, sim: Simulation, note: str = "") -> dict:
    d = sim.summary()
    keep = ("strategy", "plan", "gpus", "tpot_ms", "tps", "floor_ms", "floor_achievable_ms", "tpot_over_floor", "mbu",
            "mbu_useful", "mfu", "busy_fraction_mean", "kernel_active_mean_nvidia_smi_style", "memory_max_gb",
            "microbatches", "busy_fraction", "kernel_active_nvidia_smi_style", "memory_gb")
    return dict(label=label, source="simulated", **{k: d[k] for k in keep}, plan_fields=plan_to_dict(sim.plan),
                explain=explain(sim), note=note)


def seeds_table(cfg: ModelConfig, hw: Hardware, gpus: int, work: Workload, *, max_microbatches: int = 4,
                overlap: bool = True, extra_plans=()) -> tuple[list[dict], list[Simulation]]:
    """Rows: the MA Separation paper's two claims (with the floors of their splits), simulated TPxPP,
    separated 3:1 (R x T = 3N/4 arranged both ways: the best, and one head-parallel replica as the
    paper describes), colocated EP, `extra_plans`, and the planner's best. Each named split is shown at
    its best micro-batch count."""
    rows, sims = [], []
    ms = range(1, max_microbatches + 1)
    if gpus == 16:
        min_bytes = None
        for claim in SEED_CLAIMS:
            plan = claim["plan_obj"]
            floor = _floor_of(plan, cfg, work, hw)
            if min_bytes is None:
                from .simulator import min_step_bytes
                min_bytes = min_step_bytes(cfg, work, hw)
            tpot = claim["tpot_ms"] * 1e-3
            below = tpot < floor
            rows.append(dict(label=claim["label"], source="claimed", strategy=claim["strategy"], plan="claimed",
                             gpus=16, tpot_ms=claim["tpot_ms"], tps=claim["tps"], floor_ms=floor * 1e3,
                             tpot_over_floor=tpot / floor, mbu=None,
                             mbu_useful=min_bytes / tpot / (16 * hw.hbm_bytes_per_s),
                             note=("BELOW the HBM floor of its own split: not reachable in "
                                   f"{cfg.dtype} at this batch" if below else "")))
    tp = min(8, gpus)
    named = []
    if gpus % tp == 0 and gpus // tp <= cfg.num_layers:
        named.append((f"simulated tp{tp}pp{gpus // tp} (best m)", [TpPpPlan(tp, gpus // tp, m) for m in ms], ""))
    a = max(1, round(gpus * 3 / 4)) if gpus > 1 else 0
    e = gpus - a
    if a >= 1 and e >= 1:
        arrangements = [(a // t, t) for t in range(1, min(a, cfg.num_heads) + 1) if a % t == 0]
        placement = _replicated(cfg.num_experts, e)
        named.append((f"simulated sep RxT+{e}, RxT = {a} (best R, T, m)",
                      [SeparatedPlan(r, t, e, m, placement=placement) for r, t in arrangements for m in ms
                       if m <= max(1, work.batch // r)], ""))
        if a <= cfg.num_heads:
            named.append((f"simulated sep 1x{a}+{e} (best m)",
                          [SeparatedPlan(1, a, e, m, placement=placement) for m in ms if m <= work.batch],
                          "the MA Separation paper's '32 heads across 12 GPUs'"))
    if gpus > 1:
        named.append((f"simulated colocated ep{gpus} (best m)",
                      [EpPlan(gpus, m, placement=_replicated(cfg.num_experts, gpus))
                       for m in ms if m <= max(1, math.ceil(work.batch / gpus))], ""))
    for plan in extra_plans:
        named.append((f"simulated {describe(plan)}", [plan], "requested with --plan"))
    for label, plans, note in named:
        sim, errors = best_of_with_errors(plans, cfg, hw, work, overlap)
        if sim is None:
            rows.append(dict(label=label, source="simulated", strategy=plans[0].strategy if plans else "?",
                             plan="does not fit", tpot_ms=None, tps=None, floor_ms=None,
                             note=errors[0] if errors else "no legal plan"))
            continue
        rows.append(_row(label, sim, note))
        sims.append(sim)
    res = search(cfg, hw, gpus, work, top=1, max_microbatches=max_microbatches, overlap=overlap)
    if res.ranked:
        rows.append(_row("planner's best", res.best, f"{res.simulated} of {res.candidates} candidates simulated"))
        sims.append(res.best)
    return rows, sims


def _floor_of(plan, cfg: ModelConfig, work: Workload, hw: Hardware) -> float:
    """A claimed system's floor: bytes and FLOPs at the spec rates, no transfer time (its links are
    not ours to model), so 'below the floor' is a statement about physics alone."""
    from .floor import Rates, plan_floor
    rates = Rates(hw.hbm_bytes_per_s, hw.matmul_flops_per_s, transfer_s={}, source=f"{hw.name} spec, no transfers")
    return plan_floor(plan, cfg, work, hw, rates).seconds



def __getattr__(name: str):
    """search_throughput, batch_candidates and legal_at live in throughput.py, which builds on this
    module (so it cannot be imported at the top here); `from masep.perf.planner import ...` still works."""
    if name in ("search_throughput", "batch_candidates", "legal_at"):
        from . import throughput
        return getattr(throughput, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
