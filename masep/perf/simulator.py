"""Event-driven simulator: the runtime's per-rank op lists, timed by the cost model.

Each rank runs the op list `masep.parallel.schedule` gives its role, in order, on CUDA-like
streams (the runtime's design: streams and events, no host sync inside a step):
  - stream 0 (compute): attention, experts, head, mlp (a dense layer's: no transfer);
  - stream 1 (comm): dispatch, recv, allreduce, send_act, recv_act;
  - stream 2 (back): combine, send: expert outputs return on a second group of the bridge, so
    their NCCL communicator does not queue them behind the next dispatch (parallel/groups.py).
An op starts when the previous op of its stream has ended *and* the previous op of the same
micro-batch on this rank has ended (its data). With `overlap=False` everything runs on one
stream: the in-order, blocking semantics of the CPU/gloo runtime.

Ops that involve other ranks are matched by a key (op names unified: dispatch == recv,
combine == send, send_act(l) == recv_act(l+1)) plus the n-th occurrence of that key on the
rank (tp_pp issues two all-reduces per layer). Member i *arrives* at start_i + compute_s_i;
when all members have arrived the transfer runs: every member ends at
    max(arrivals) + max(members' transfer_s) + its own post_s.
So a NCCL kernel that waits for a late peer occupies its stream (and shows as "kernel active")
while doing nothing: that is what nvidia-smi's utilization counts.

Matching groups (rank layouts of masep.plan):
  separated  a2e(l, mb): all attention + expert ranks; e2a(l, mb) likewise; attention with
             T > 1: the replica's ranks (head-parallel all-reduce inside the op)
  tp_pp      rank = stage * tp + t; all-reduce: the stage's TP group; activations: t of stage s
             with t of stage s+1
  ep         dispatch(l, mb), combine(l, mb): all ranks (all-to-all)
One step starts with every rank idle and ends when the last op ends: TPOT = that makespan
(the runtime returns logits of all micro-batches before the next step starts).

Metrics (per simulated step):
  busy fraction      compute-stream work (compute_s of compute ops) / TPOT, per GPU
  kernel active      union of all op intervals on all streams / TPOT, per GPU: the
                     nvidia-smi "GPU utilization" sense (secondary; counts NCCL kernels waiting)
  MBU                bytes all GPUs read from HBM in the step / TPOT / (GPUs x spec HBM rate)
  MBU (useful)       bytes one step must read at least (weights touched by the whole batch once,
                     KV, lm_head once) / TPOT / (GPUs x spec HBM rate)
  MFU                FLOPs of all GPUs / TPOT / (GPUs x spec matmul rate)
  floor              perf/floor.py's `plan_floor` at the profile's spec HBM and matmul rates, transfers
                     at the cost model's times: a lower bound on any run of the plan's op lists at its
                     m (bytes of the experts each micro-batch touches, per micro-batch), so the
                     simulated TPOT is never below it. `floor_binds` / `floor_parts` say what binds.
"""
from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache

from ..config import ModelConfig
from ..parallel.schedule import (ALLREDUCE, ATTENTION, COMBINE, DISPATCH, EXPERTS, HEAD, MLP, RECV, RECV_ACT,
                                 SEND, SEND_ACT, Op, ep_schedule, separated_schedule, tp_pp_schedule)
from ..plan import SinglePlan
from . import floor as floormod
from .classes import RankClasses, rank_classes
from .costmodel import (BACK, COMM, COMPUTE, MemoryUse, OpCost, Workload, check_memory, describe, op_cost,
                        rank_memory, rank_role)
from .hardware import Hardware

COMPUTE_KINDS = (ATTENTION, EXPERTS, HEAD, MLP)
GROUPED_ABOVE = 64  # GPUs: larger plans simulate one rank per class of alike ranks by default (classes.py)


# --- op lists and matching ----------------------------------------------------------------------------
def single_schedule(num_layers: int, microbatches: int = 1, dense_layers: int = 0) -> list[Op]:
    ops: list[Op] = []
    for mb in range(microbatches):
        for layer in range(num_layers):
            ops += [Op(ATTENTION, layer, mb), Op(MLP if layer < dense_layers else EXPERTS, layer, mb)]
        ops.append(Op(HEAD, -1, mb))
    return ops


def rank_ops(plan, cfg: ModelConfig, rank: int) -> tuple[Op, ...]:
    """The op list the runtime runs on `rank` for one step."""
    role = rank_role(plan, cfg, rank)
    stages = plan.pp if plan.strategy == "tp_pp" else 1
    return _schedule(plan.strategy, role.kind, cfg.num_layers, role.layers, role.replica, stages, plan.microbatches,
                     cfg.first_dense_layers)


@lru_cache(maxsize=4096)
def _schedule(strategy: str, kind: str, num_layers: int, layers: range, stage: int, stages: int,
              m: int, dense: int = 0) -> tuple[Op, ...]:
    if strategy == "separated":
        return tuple(separated_schedule(kind, num_layers, m, dense))
    if strategy == "tp_pp":
        return tuple(tp_pp_schedule(layers, stage, stages, m, dense))
    if strategy == "ep":
        return tuple(ep_schedule(num_layers, m, dense))
    if strategy == "single":
        return tuple(single_schedule(num_layers, m, dense))
    raise ValueError(f"plan.strategy={strategy!r}: cannot simulate it")


def match(plan, rank: int, op: Op) -> tuple[tuple, tuple[int, ...]] | None:
    """(key, member ranks) of an op that needs other ranks, or None for a local op."""
    s = plan.strategy
    if s == "separated":
        if op.kind in (DISPATCH, RECV):
            return ("a2e", op.layer, op.mb), _world(plan.world_size)
        if op.kind in (COMBINE, SEND):
            return ("e2a", op.layer, op.mb), _world(plan.world_size)
        if op.kind == ATTENTION and plan.attn_tp > 1:
            replica = rank // plan.attn_tp
            return ("attn", replica, op.layer, op.mb), _replica(plan, replica)
        return None
    if s == "tp_pp":
        stage, t = divmod(rank, plan.tp)
        if op.kind == ALLREDUCE:
            return ("ar", stage, op.layer, op.mb), tuple(range(stage * plan.tp, (stage + 1) * plan.tp))
        if op.kind == SEND_ACT:
            return ("act", stage, t, op.mb), (rank, rank + plan.tp)
        if op.kind == RECV_ACT:
            return ("act", stage - 1, t, op.mb), (rank - plan.tp, rank)
        return None
    if s == "ep" and op.kind in (DISPATCH, COMBINE):
        return (op.kind, op.layer, op.mb), _world(plan.world_size)
    return None


@lru_cache(maxsize=65536)
def _replica(plan, replica: int) -> tuple[int, ...]:
    return tuple(plan.replica_ranks(replica))


@lru_cache(maxsize=64)
def _world(n: int) -> tuple[int, ...]:
    """Every rank: one shared tuple per size, so matching does not rebuild it for every op."""
    return tuple(range(n))


@lru_cache(maxsize=4096)
def _op_counts(strategy: str, kind: str, num_layers: int, layers: range, stage: int, stages: int,
               m: int, dense: int) -> tuple[tuple[str, int, int, int], ...]:
    """(kind, micro-batch, a layer of theirs, how many) of a rank's ops, apart for dense layers
    (the first `dense`): their attention has no router or shared expert."""
    counts: dict[tuple[str, int, bool], tuple[int, int]] = {}
    for o in _schedule(strategy, kind, num_layers, layers, stage, stages, m, dense):
        key = (o.kind, o.mb, 0 <= o.layer < dense)
        layer, n = counts.get(key, (o.layer, 0))
        counts[key] = (layer, n + 1)
    return tuple((k, mb, layer, n) for (k, mb, _), (layer, n) in counts.items())


def rank_cost_table(plan, cfg: ModelConfig, rank: int, work: Workload,
                    hw: Hardware) -> list[tuple[str, int, int, OpCost]]:
    """(kind, micro-batch, how many such ops, their cost) of `rank`'s op list: what sums over the
    ops need, without visiting every layer's op."""
    role = rank_role(plan, cfg, rank)
    stages = plan.pp if plan.strategy == "tp_pp" else 1
    counts = _op_counts(plan.strategy, role.kind, cfg.num_layers, role.layers, role.replica, stages,
                        plan.microbatches, cfg.first_dense_layers)
    return [(kind, mb, n, op_cost(kind, max(layer, cfg.first_dense_layers) if kind == HEAD else layer, mb, plan,
                                  rank, cfg, work, hw))
            for kind, mb, layer, n in counts]


def rank_costs(plan, cfg: ModelConfig, rank: int, work: Workload, hw: Hardware, ops) -> list[OpCost]:
    """Cost of each op in `ops` on `rank` (costs depend on kind and micro-batch, and on the layer
    only by whether it is a dense one)."""
    memo: dict[tuple[str, int, bool], OpCost] = {}
    out = []
    for o in ops:
        key = (o.kind, o.mb, cfg.is_dense_layer(o.layer))
        c = memo.get(key)
        if c is None:
            c = memo[key] = op_cost(o.kind, o.layer, o.mb, plan, rank, cfg, work, hw)
        out.append(c)
    return out


# --- results -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpRecord:
    rank: int
    stream: int
    op: Op
    start: float
    arrive: float  # start + compute_s: when its own work was done
    end: float
    cost: OpCost

    @property
    def name(self) -> str:
        return str(self.op)


@dataclass
class Simulation:
    plan: object
    cfg: ModelConfig
    work: Workload
    hw: Hardware
    overlap: bool
    records: list[OpRecord]  # the representative ranks' ops (classes.py): every rank's when classes is None
    memory: list[MemoryUse]  # per world rank
    min_step_bytes: float
    classes: RankClasses | None = None
    tpot_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.tpot_s = max((r.end for r in self.records), default=0.0)
        if self.classes is None:
            self.classes = RankClasses.identity(self.plan.world_size)
        counts = self.classes.counts
        self._weight = {rep: counts[i] for i, rep in enumerate(self.classes.reps)}  # world ranks per record's rank

    @property
    def num_gpus(self) -> int:
        return self.plan.world_size

    @functools.cached_property
    def floor(self) -> floormod.Floor:
        """The plan's floor at the spec rates (perf/floor.py); computed when first asked for."""
        return floormod.plan_floor(self.plan, self.cfg, self.work, self.hw)

    @property
    def floor_s(self) -> float:
        return self.floor.seconds

    @functools.cached_property
    def floor_achievable_s(self) -> float:
        """The same floor at the profile's achievable rates (not a bound: fitted rates can beat it)."""
        return floormod.plan_floor(self.plan, self.cfg, self.work, self.hw, achievable=True).seconds

    @property
    def tps(self) -> float:
        return self.work.batch / self.tpot_s

    def _per_rank(self, fn) -> list[float]:
        """fn summed over each GPU's ops (a GPU's class representative's ops)."""
        index = {rep: i for i, rep in enumerate(self.classes.reps)}
        out = [0.0] * len(index)
        for r in self.records:
            out[index[r.rank]] += fn(r)
        return self.classes.expand(out)

    @property
    def busy_fraction(self) -> list[float]:
        busy = self._per_rank(lambda r: r.cost.compute_s if r.op.kind in COMPUTE_KINDS else 0.0)
        return [b / self.tpot_s for b in busy]

    @property
    def kernel_active(self) -> list[float]:
        """nvidia-smi-style: fraction of the step during which any op (kernel) is on the GPU."""
        index = {rep: i for i, rep in enumerate(self.classes.reps)}
        spans: list[list[tuple[float, float]]] = [[] for _ in index]
        for r in self.records:
            if r.end > r.start:
                spans[index[r.rank]].append((r.start, r.end))
        out = []
        for s in spans:
            total, cur_start, cur_end = 0.0, None, None
            for a, b in sorted(s):
                if cur_end is None or a > cur_end:
                    total += (cur_end - cur_start) if cur_end is not None else 0.0
                    cur_start, cur_end = a, b
                else:
                    cur_end = max(cur_end, b)
            total += (cur_end - cur_start) if cur_end is not None else 0.0
            out.append(total / self.tpot_s)
        return self.classes.expand(out)

    @property
    def hbm_bytes(self) -> float:
        return sum(r.cost.hbm_bytes * self._weight[r.rank] for r in self.records)

    @property
    def flops(self) -> float:
        return sum(r.cost.flops * self._weight[r.rank] for r in self.records)

    def _spec_sum(self, attr: str) -> float:
        """A spec rate summed over the GPUs (each GPU its own kind's)."""
        return sum(getattr(self.hw.for_rank(r), attr) for r in range(self.num_gpus))

    @property
    def link_bytes(self) -> float:
        """Bytes every rank's transfers move in the step (each member counts its own)."""
        return sum(r.cost.link_bytes for r in self.records)

    @property
    def link_bytes_saved(self) -> float:
        """Bytes the decode blocks would add at the worst-case capacity instead of the one sized
        from the routing (parallel/capacity.py)."""
        return sum(r.cost.link_bytes_saved for r in self.records)

    @property
    def mbu(self) -> float:
        return self.hbm_bytes / self.tpot_s / self._spec_sum("hbm_bytes_per_s")

    @property
    def mbu_useful(self) -> float:
        return self.min_step_bytes / self.tpot_s / self._spec_sum("hbm_bytes_per_s")

    @property
    def mfu(self) -> float:
        return self.flops / self.tpot_s / self._spec_sum("matmul_flops_per_s")

    def op_times(self, rank: int | None = None) -> dict[str, float]:
        """Seconds per op kind, summed (one rank, or all), of the op alone (no waiting)."""
        rep = None if rank is None else self.classes.reps[self.classes.class_of[rank]]
        out: dict[str, float] = {}
        for r in self.records:
            if rep is None or r.rank == rep:
                out[r.op.kind] = out.get(r.op.kind, 0.0) + r.cost.time_s * (self._weight[r.rank] if rep is None else 1)
        return out

    def summary(self) -> dict:
        busy, active = self.busy_fraction, self.kernel_active
        return dict(
            strategy=self.plan.strategy, plan=describe(self.plan), gpus=self.num_gpus, hardware=self.hw.name,
            batch=self.work.batch, context=self.work.context, microbatches=self.plan.microbatches,
            overlap=self.overlap, tpot_ms=self.tpot_s * 1e3, tps=self.tps, floor_ms=self.floor_s * 1e3,
            floor_achievable_ms=self.floor_achievable_s * 1e3, tpot_over_floor=self.tpot_s / self.floor_s,
            floor_binds=self.floor.label, floor_parts=self.floor.to_dict(),
            mbu=self.mbu, mbu_useful=self.mbu_useful, mfu=self.mfu,
            busy_fraction_mean=sum(busy) / len(busy), busy_fraction=busy,
            kernel_active_mean_nvidia_smi_style=sum(active) / len(active), kernel_active_nvidia_smi_style=active,
            hbm_bytes=self.hbm_bytes, min_step_bytes=self.min_step_bytes, flops=self.flops,
            link_bytes=self.link_bytes, link_bytes_saved_by_routed_capacity=self.link_bytes_saved,
            memory_gb=[round(m.total / 1e9, 3) for m in self.memory],
            memory_max_gb=max(m.total for m in self.memory) / 1e9,
        )


# --- floors ------------------------------------------------------------------------------------------
def _rank_bytes(plan, cfg: ModelConfig, rank: int, work: Workload, hw: Hardware) -> float:
    ops = [op for op in rank_ops(plan, cfg, rank) if op.kind in COMPUTE_KINDS]
    return sum(c.hbm_bytes for c in rank_costs(plan, cfg, rank, work, hw, ops))


def floor_s(plan, cfg: ModelConfig, work: Workload, hw: Hardware, achievable: bool = False) -> float:
    """The plan's floor (perf/floor.py) at the profile's spec (or achievable) rates."""
    return floormod.plan_floor(plan, cfg, work, hw, achievable=achievable).seconds


def min_step_bytes(cfg: ModelConfig, work: Workload, hw: Hardware) -> float:
    """Bytes one decode step reads at least: the whole model on one device, one micro-batch."""
    return _rank_bytes(SinglePlan(), cfg, 0, work, hw.for_rank(0))


# --- the event loop ----------------------------------------------------------------------------------
class Deadlock(RuntimeError):
    """The op lists cannot finish: some matched op never gets all its members."""


class OverDeadline(Exception):
    """The step runs past the deadline it was given (a planner's TPOT limit): no need to finish it."""


def all_costs(plan, cfg: ModelConfig, work: Workload, hw: Hardware, ranks=None) -> list[list[OpCost]]:
    """Cost of every op of every rank in `ranks` (default: all), in op-list order."""
    ranks = range(plan.world_size) if ranks is None else ranks
    return [rank_costs(plan, cfg, r, work, hw, rank_ops(plan, cfg, r)) for r in ranks]


STREAMS = (COMPUTE, COMM, BACK)


def _stream(kind: str, overlap: bool) -> int:
    """The stream an op kind runs on; everything on one stream without overlap (gloo/CPU)."""
    if not overlap or kind in COMPUTE_KINDS:
        return COMPUTE
    return BACK if kind in (COMBINE, SEND) else COMM


def _run(plan, cfg: ModelConfig, work: Workload, hw: Hardware, overlap: bool,
         costs: list[list[OpCost]] | None = None, ops: list | None = None, match_fn=None,
         stream_of=None, ranks=None, deadline_s: float | None = None) -> list[OpRecord]:
    """`ops` (per rank), `match_fn` and `stream_of(kind)` default to a decode step's; training
    passes its own. `ranks`: the world ranks to run (default all): one per class (classes.py),
    each transfer then waits for the members among them; `ops` and `costs` are in that order.
    `deadline_s`: raise OverDeadline as soon as an op ends later (the step can only be longer)."""
    ranks = list(range(plan.world_size)) if ranks is None else list(ranks)
    local = {world: i for i, world in enumerate(ranks)}
    n = len(ranks)
    ops = ops if ops is not None else [rank_ops(plan, cfg, r) for r in ranks]
    stream_of = stream_of or (lambda kind: _stream(kind, overlap))
    costs = costs if costs is not None else all_costs(plan, cfg, work, hw, ranks)

    seen_members: dict[int, tuple] = {}  # id(members) -> (members, their indices into `ranks`)

    def match_fn(plan, r, op, _match=match_fn or match):  # members as indices into `ranks`
        m = _match(plan, ranks[r], op)
        if m is None:
            return None
        got = seen_members.get(id(m[1]))
        if got is None or got[0] is not m[1]:  # the all-ranks tuple is shared: mapped once, not per op
            got = seen_members[id(m[1])] = (m[1], tuple(local[w] for w in m[1] if w in local))
        return m[0], got[1]
    stream = [[stream_of(o.kind) for o in ops[r]] for r in range(n)]
    # dependencies: previous op on the same stream, previous op of the same micro-batch
    deps, keys = [], []
    for r in range(n):
        last_stream, last_mb, seen, d, k = {}, {}, {}, [], []
        for i, o in enumerate(ops[r]):
            d.append((last_stream.get(stream[r][i], -1), last_mb.get(o.mb, -1)))
            last_stream[stream[r][i]], last_mb[o.mb] = i, i
            m = match_fn(plan, r, o)
            if m is not None:
                nth = seen.get(m[0], 0)
                seen[m[0]] = nth + 1
                m = ((*m[0], nth), m[1])
            k.append(m)
        deps.append(d)
        keys.append(k)
    by_stream = [[[i for i in range(len(ops[r])) if stream[r][i] == s] for s in STREAMS] for r in range(n)]
    ptr = [[0] * len(STREAMS) for _ in range(n)]
    waiting = [[False] * len(STREAMS) for _ in range(n)]
    start = [[None] * len(ops[r]) for r in range(n)]
    arrive = [[None] * len(ops[r]) for r in range(n)]
    end = [[None] * len(ops[r]) for r in range(n)]
    groups: dict[tuple, dict[int, int]] = {}  # key -> {rank: op index} of members that arrived
    queue = deque(range(n))
    queued = [True] * n

    def finish(r: int, i: int, t: float) -> None:
        if deadline_s is not None and t > deadline_s:
            raise OverDeadline(f"an op of rank {ranks[r]} ends at {t * 1e3:.3f} ms, past {deadline_s * 1e3:.3f} ms")
        end[r][i] = t
        s = stream[r][i]
        waiting[r][s] = False
        ptr[r][s] += 1

    while queue:
        r = queue.popleft()
        queued[r] = False
        progress = True
        while progress:
            progress = False
            for s in STREAMS:
                if waiting[r][s] or ptr[r][s] >= len(by_stream[r][s]):
                    continue
                i = by_stream[r][s][ptr[r][s]]
                before = [end[r][j] for j in deps[r][i] if j >= 0]
                if any(t is None for t in before):
                    continue
                t0 = max(before, default=0.0)
                start[r][i], arrive[r][i] = t0, t0 + costs[r][i].compute_s
                progress = True
                if keys[r][i] is None:
                    finish(r, i, arrive[r][i] + costs[r][i].transfer_s + costs[r][i].post_s)
                    continue
                key, members = keys[r][i]
                if r not in members:
                    raise AssertionError(f"rank {r} is not a member of its own transfer {key}")
                waiting[r][s] = True
                got = groups.setdefault(key, {})
                got[r] = i
                if len(got) == len(members):
                    t = max(arrive[m][j] for m, j in got.items()) + max(costs[m][j].transfer_s for m, j in got.items())
                    for m, j in sorted(got.items()):
                        finish(m, j, t + costs[m][j].post_s)
                        if m != r and not queued[m]:
                            queue.append(m)
                            queued[m] = True
                    del groups[key]
    stuck = [(r, str(ops[r][by_stream[r][s][ptr[r][s]]])) for r in range(n) for s in STREAMS
             if ptr[r][s] < len(by_stream[r][s])]
    if stuck:
        raise Deadlock(f"plan {describe(plan)}: op lists cannot complete; first blocked ops (rank, op): "
                       f"{stuck[:8]}; transfers missing members: {sorted(groups)[:4]}")
    return [OpRecord(ranks[r], stream[r][i], ops[r][i], start[r][i], arrive[r][i], end[r][i], costs[r][i])
            for r in range(n) for i in range(len(ops[r]))]


def simulate(plan, cfg: ModelConfig, work: Workload, hw: Hardware, overlap: bool = True,
             check_fit: bool = True, costs: list[list[OpCost]] | None = None,
             grouped: bool | None = None, deadline_s: float | None = None) -> Simulation:
    """One decode step of `plan`; ValueError (with the numbers) when a rank's memory does not fit.
    grouped: run one rank per class of alike ranks (classes.py: the same times, far fewer ops at scale,
    `records` then hold the representatives' ops); False: every rank (a trace shows every GPU); None:
    grouped above GROUPED_ABOVE GPUs. `costs`: `all_costs(plan, cfg, work, hw, ranks)` of the ranks
    simulated (rank_classes(...).reps when grouped) when the caller has them already. `deadline_s`:
    raise OverDeadline once the step is sure to take longer (a TPOT limit: stop early)."""
    plan.validate(cfg, plan.world_size)
    if grouped is None:
        grouped = plan.world_size > GROUPED_ABOVE
    classes = rank_classes(plan, cfg, work, hw) if grouped else RankClasses.identity(plan.world_size)
    reps = classes.reps
    memory = check_memory(plan, cfg, work, hw, reps) if check_fit else \
        [rank_memory(plan, cfg, r, work, hw) for r in reps]
    records = _run(plan, cfg, work, hw, overlap, costs, ranks=reps, deadline_s=deadline_s)
    return Simulation(plan, cfg, work, hw, overlap, records, classes.expand(memory), min_step_bytes(cfg, work, hw),
                      classes)
