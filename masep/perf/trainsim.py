"""Simulated training step: the training schedules (parallel/schedule.py) timed by traincost.py
on the decode simulator's event loop, and a planner over them (`masep plan --train`).

Streams, as the training runtime blocks: every op runs on the rank's one compute stream, in
order, waiting for its transfer, except the transfers the runtime launches and waits for later
(an expert rank's sends, an attention rank's output gradients), which run on their own stream.
So separated ranks overlap across micro-batches (parallel/train_separated.py interleaves them),
while single, ep and tp_pp run their GPipe order with every transfer waited for.

Matching of transfers, beyond decode's (simulator.match):
  separated  a2e_grad(l, mb), e2a_grad(l, mb): all ranks; attention_bwd with T > 1: the replica
  ep         dispatch_grad(l, mb), combine_grad(l, mb): all ranks
  tp_pp      allreduce_bwd: the stage's TP group (two per layer); act_grad: t of stage s with t
             of stage s - 1
grad_sync and optimizer are local ops: the ranks of one replicated set run the same ops and
reach the sync together, so its time is the all-reduce's (traincost._sum_s).

Floor of a step (`train_floor_s`): the slowest rank's forward + backward FLOPs at the spec
matmul rate, or its bytes at the spec HBM rate, whichever is larger. Nothing overlaps in the
floor's favour that the hardware could not overlap, so the simulator never predicts below it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..parallel import schedule as S
from ..plan import SinglePlan
from .costmodel import BACK as BACK_STREAM, COMPUTE as COMPUTE_STREAM, OpCost, describe, plan_to_dict, rank_role
from .hardware import Hardware
from .simulator import OpRecord, _run, match
from .traincost import TrainMemory, TrainWorkload, check_train_memory, train_memory, train_op_cost

COMPUTE = (S.ATTENTION, S.EXPERTS, S.HEAD, S.ATTENTION_BWD, S.EXPERTS_BWD, S.HEAD_BWD, S.OPTIMIZER)
FORWARD = (S.ATTENTION, S.EXPERTS, S.HEAD)
BACKWARD = (S.ATTENTION_BWD, S.EXPERTS_BWD, S.HEAD_BWD)


def train_rank_ops(plan, cfg: ModelConfig, rank: int) -> list[S.Op]:
    role = rank_role(plan, cfg, rank)
    m, layers = plan.microbatches, cfg.num_layers
    if plan.strategy == "separated":
        return S.train_separated_schedule(role.kind, layers, m)
    if plan.strategy == "ep":
        return S.train_ep_schedule(layers, m)
    if plan.strategy == "tp_pp":
        return S.train_tp_pp_schedule(role.layers, role.replica, plan.pp, m)
    return S.train_single_schedule(layers, m)


def train_match(plan, rank: int, op: S.Op):
    s = plan.strategy
    if s in ("separated", "ep") and op.kind in (S.DISPATCH_GRAD, S.RECV_GRAD):
        return ("a2e_grad", op.layer, op.mb), tuple(range(plan.world_size))
    if s in ("separated", "ep") and op.kind in (S.COMBINE_GRAD, S.SEND_GRAD):
        return ("e2a_grad", op.layer, op.mb), tuple(range(plan.world_size))
    if s == "ep" and op.kind == S.EXPERTS:  # forward: decode's ep matching handles dispatch/combine
        return None
    if s == "separated" and op.kind == S.ATTENTION_BWD and plan.attn_tp > 1:
        replica = rank // plan.attn_tp
        return ("attn_bwd", replica, op.layer, op.mb), tuple(plan.replica_ranks(replica))
    if s == "tp_pp":
        stage, t = divmod(rank, plan.tp)
        if op.kind == S.ALLREDUCE_BWD:
            return ("ar_bwd", stage, op.layer, op.mb), tuple(plan.stage_ranks(stage))
        if op.kind == S.SEND_ACT_GRAD:
            return ("act_grad", stage - 1, t, op.mb), (rank - plan.tp, rank)
        if op.kind == S.RECV_ACT_GRAD:
            return ("act_grad", stage, t, op.mb), (rank, rank + plan.tp)
    return match(plan, rank, op)


LAUNCHED = (S.SEND, S.SEND_GRAD, S.DISPATCH_GRAD)  # launched, waited for later (separated runtime)


def _train_stream(kind: str) -> int:
    return BACK_STREAM if kind in LAUNCHED else COMPUTE_STREAM


def train_costs(plan, cfg: ModelConfig, work: TrainWorkload, hw: Hardware, ops) -> list[list[OpCost]]:
    return [[train_op_cost(o.kind, o.mb, plan, r, cfg, work, hw) for o in ops[r]] for r in range(plan.world_size)]


@dataclass
class TrainSimulation:
    plan: object
    cfg: ModelConfig
    work: TrainWorkload
    hw: Hardware
    records: list[OpRecord]
    memory: list[TrainMemory]
    floor_s: float

    @property
    def step_s(self) -> float:
        return max((r.end for r in self.records), default=0.0)

    @property
    def tokens_per_s(self) -> float:
        return self.work.tokens / self.step_s

    @property
    def flops(self) -> float:
        return sum(r.cost.flops for r in self.records)

    @property
    def mfu(self) -> float:
        """Model FLOPs (forward + backward of every op) / step / (GPUs x spec matmul rate)."""
        return self.flops / self.step_s / (self.plan.world_size * self.hw.matmul_flops_per_s)

    def phase_s(self, rank: int) -> dict[str, float]:
        """Seconds of this rank's step in each phase (own work; waits for peers count as transfer)."""
        out = dict(forward=0.0, backward=0.0, transfers=0.0, grad_sync=0.0, optimizer=0.0)
        for r in self.records:
            if r.rank != rank:
                continue
            k = r.op.kind
            key = "forward" if k in FORWARD else "backward" if k in BACKWARD else \
                "grad_sync" if k == S.GRAD_SYNC else "optimizer" if k == S.OPTIMIZER else "transfers"
            out[key] += r.end - r.start
        return out

    def summary(self) -> dict:
        busiest = max(range(self.plan.world_size), key=lambda r: sum(self.phase_s(r).values()))
        return dict(
            strategy=self.plan.strategy, plan=describe(self.plan), plan_fields=plan_to_dict(self.plan),
            gpus=self.plan.world_size, hardware=self.hw.name, sequences=self.work.batch, seq_len=self.work.seq_len,
            tokens_per_step=self.work.tokens, microbatches=self.plan.microbatches,
            compression=self.work.compression, step_ms=self.step_s * 1e3, tokens_per_s=self.tokens_per_s,
            mfu=self.mfu, floor_ms=self.floor_s * 1e3, step_over_floor=self.step_s / self.floor_s,
            phases_ms_busiest_rank={k: v * 1e3 for k, v in self.phase_s(busiest).items()}, busiest_rank=busiest,
            memory_gb=[round(m.total / 1e9, 3) for m in self.memory],
            memory_max_gb=max(m.total for m in self.memory) / 1e9)


def train_floor_s(plan, cfg: ModelConfig, work: TrainWorkload, hw: Hardware, ops=None, costs=None) -> float:
    ops = ops or [train_rank_ops(plan, cfg, r) for r in range(plan.world_size)]
    costs = costs or train_costs(plan, cfg, work, hw, ops)
    worst = 0.0
    for rank_costs in costs:
        flops = sum(c.flops for c in rank_costs)
        nbytes = sum(c.hbm_bytes for c in rank_costs)
        worst = max(worst, flops / hw.matmul_flops_per_s, nbytes / hw.hbm_bytes_per_s)
    return worst


def simulate_train(plan, cfg: ModelConfig, work: TrainWorkload, hw: Hardware, check_fit: bool = True) -> TrainSimulation:
    """One training step of `plan`; ValueError (with the numbers) when a rank does not fit."""
    if cfg.training_refusal():
        raise ValueError(cfg.training_refusal())
    plan.validate(cfg, plan.world_size)
    _check_work(plan, work)
    memory = check_train_memory(plan, cfg, work, hw) if check_fit else \
        [train_memory(plan, cfg, r, work, hw) for r in range(plan.world_size)]
    ops = [train_rank_ops(plan, cfg, r) for r in range(plan.world_size)]
    costs = train_costs(plan, cfg, work, hw, ops)
    records = _run(plan, cfg, work, hw, False, costs, ops, train_match, _train_stream)
    return TrainSimulation(plan, cfg, work, hw, records, memory, train_floor_s(plan, cfg, work, hw, ops, costs))


def _check_work(plan, work: TrainWorkload) -> None:
    replicas = plan.attn_replicas if plan.strategy == "separated" else plan.ep if plan.strategy == "ep" else 1
    if work.batch < replicas * plan.microbatches:
        raise ValueError(f"{work.batch} sequences per step cannot fill plan {describe(plan)}: it needs at least "
                         f"replicas x micro-batches = {replicas} x {plan.microbatches} sequences")


def search_train(cfg: ModelConfig, hw: Hardware, gpus: int, work: TrainWorkload, *, strategies=None, top: int = 5,
                 max_microbatches: int = 8):
    """Rank the legal plans for `gpus` by simulated training tokens/s (every fitting plan is
    simulated: a training step has few ops per rank). Returns (ranked, rejected, candidates)."""
    from .planner import STRATEGY_NAMES, candidate_plans
    if cfg.training_refusal():
        raise ValueError(cfg.training_refusal())
    strategies = strategies or STRATEGY_NAMES
    plans = candidate_plans(cfg, gpus, work.batch, strategies, max_microbatches)
    if gpus == 1 and "single" in strategies:
        plans += [SinglePlan(m) for m in range(2, min(max_microbatches, work.batch) + 1)]
    ranked, rejected = [], []
    from .planner import check_head_groups_in_nodes
    for plan in plans:
        try:
            check_head_groups_in_nodes(plan, hw.gpus_per_node)
            ranked.append(simulate_train(plan, cfg, work, hw))
        except ValueError as err:
            rejected.append((describe(plan), str(err)))
    ranked.sort(key=lambda s: (round(s.step_s, 12), s.plan.microbatches, describe(s.plan)))
    return ranked[:top], rejected, len(plans)


def explain_train(sim: TrainSimulation) -> str:
    d = sim.summary()
    ph = d["phases_ms_busiest_rank"]
    lines = [f"winner: {d['plan']}  ({sim.plan.strategy}, {d['gpus']} GPUs)",
             f"  step {d['step_ms']:.1f} ms for {d['tokens_per_step']:,} tokens = {d['tokens_per_s']:,.0f} tok/s, "
             f"MFU {d['mfu']:.1%}; floor {d['floor_ms']:.1f} ms ({d['step_over_floor']:.2f}x floor)",
             f"  busiest rank {d['busiest_rank']}: forward {ph['forward']:.1f} ms, backward {ph['backward']:.1f} ms, "
             f"transfers and waits {ph['transfers']:.1f} ms, gradient sync {ph['grad_sync']:.1f} ms, "
             f"optimizer {ph['optimizer']:.1f} ms",
             f"  memory {d['memory_max_gb']:.1f} GB on the fullest rank (16 bytes per parameter + activations)"]
    if sim.plan.strategy == "separated":
        lines.append("  the training runtime waits for each transfer: attention and expert ranks take turns, so a "
                     "separated split pays both sides' time per layer")
    return "\n".join(lines)
