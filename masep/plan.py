"""Parallel plans: validated dataclasses that say how a model is split over ranks.

A plan is checked once, at the edge, before any process group exists. Every error is a
ValueError naming the field, the value, the rule and a fix. The runtime, the simulator and
the planner all read the same plan objects.

The one notation of a plan, printed by `format_plan` and read by `parse_plan` everywhere (plan,
simulate, sweep, replan, run, serve, train, plan files): `single`, `sep RxT+E mM`, `tpTppP mM`,
`epN mM`, with `seq-split` and `placement=0-3;4-7` where they apply (NOTATION).

Rank layout of `separated` (deterministic, printed by rank 0):
  ranks [0, R*T)          attention: replica r owns ranks [r*T, (r+1)*T), head-parallel inside
  ranks [R*T, R*T + E)    experts: expert rank e holds placement[e]
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from functools import lru_cache

from .config import ModelConfig

STRATEGIES = ("single", "separated", "tp_pp", "ep")


def _fail(field_name: str, value, rule: str, fix: str) -> None:
    raise ValueError(f"plan.{field_name}={value!r}: {rule}; {fix}")


def split_evenly(total: int, parts: int) -> list[range]:
    """Contiguous ranges covering [0, total); the first total % parts ranges get one extra."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def contiguous_placement(num_experts: int, ranks: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(r) for r in split_evenly(num_experts, ranks))


@lru_cache(maxsize=1024)  # validated once per placement, not once per candidate plan
def _check_placement(placement, num_experts: int, ranks: int, field_name: str = "placement") -> None:
    if len(placement) != ranks:
        _fail(field_name, placement, f"needs one expert list per expert rank ({ranks})",
              "give exactly one tuple of expert ids per expert rank")
    seen = set()
    for r, experts in enumerate(placement):
        if not experts:
            _fail(field_name, placement, f"expert rank {r} holds no expert", "give every expert rank an expert")
        bad = [e for e in experts if not 0 <= e < num_experts]
        if bad:
            _fail(field_name, placement, f"expert ids {bad} are outside [0, {num_experts})", "use valid expert ids")
        if len(set(experts)) != len(experts):
            _fail(field_name, placement, f"expert rank {r} lists an expert twice", "list each expert once per rank")
        seen.update(experts)
    missing = sorted(set(range(num_experts)) - seen)
    if missing:
        _fail(field_name, placement, f"experts {missing} are placed on no rank",
              "place every expert at least once")


def _check_counts(plan, names: tuple[str, ...]) -> None:
    """Each named field and micro-batches must be integers >= 1 (flag: the field with dashes)."""
    for name in names:
        value = getattr(plan, name)
        if not isinstance(value, int) or value < 1:
            _fail(name, value, "must be an integer >= 1", f"use --{name.replace('_', '-')} 1 or more")
    _check_microbatches(plan.microbatches)


def _check_microbatches(m: int) -> None:
    if not isinstance(m, int) or m < 1:
        _fail("microbatches", m, "must be an integer >= 1", "use --microbatches 1 or more")


def _hash_once(plan) -> int:
    """Plans key the cost model's caches on the planner's hot path, where a placement over hundreds
    of ranks was rehashed on every lookup: hash once per object. Never pickled (`_state_without_hash`):
    a str's hash differs between processes."""
    h = plan.__dict__.get("_hash")
    if h is None:
        h = hash(tuple(getattr(plan, f.name) for f in fields(plan)))
        object.__setattr__(plan, "_hash", h)
    return h


def _state_without_hash(plan) -> dict:
    return {k: v for k, v in plan.__dict__.items() if k != "_hash"}


@dataclass(frozen=True)
class SinglePlan:
    strategy: str = field(default="single", init=False)
    microbatches: int = 1

    @property
    def world_size(self) -> int:
        return 1

    def validate(self, cfg: ModelConfig, world_size: int | None = None) -> "SinglePlan":
        _check_world(self, world_size)
        return self

    def describe(self, cfg: ModelConfig | None = None) -> str:
        return "single: the whole model on one device"


@dataclass(frozen=True)
class SeparatedPlan:
    """Attention on R replicas x T head-parallel ranks; experts on E ranks; m micro-batches."""

    attn_replicas: int = 1
    attn_tp: int = 1
    expert_ranks: int = 1
    microbatches: int = 2
    placement: tuple[tuple[int, ...], ...] | None = None  # expert ids per expert rank; None = contiguous
    seq_split: bool = False  # prefill: cut each prompt into m sequence chunks instead of batch slices
    strategy: str = field(default="separated", init=False)
    __hash__ = _hash_once
    __getstate__ = _state_without_hash

    @property
    def world_size(self) -> int:
        return self.attn_replicas * self.attn_tp + self.expert_ranks

    @property
    def num_attention_ranks(self) -> int:
        return self.attn_replicas * self.attn_tp

    def validate(self, cfg: ModelConfig, world_size: int | None = None) -> "SeparatedPlan":
        _check_counts(self, ("attn_replicas", "attn_tp", "expert_ranks"))
        if self.attn_tp > cfg.num_heads:
            _fail("attn_tp", self.attn_tp, f"more head-parallel ranks than attention heads ({cfg.num_heads})",
                  f"use --attn-tp <= {cfg.num_heads} and add replicas instead")
        if self.expert_ranks > cfg.num_experts and self.placement is None:
            _fail("expert_ranks", self.expert_ranks, f"more expert ranks than experts ({cfg.num_experts}) with "
                  "the contiguous placement", "give an explicit placement with replicated experts or fewer ranks")
        _check_placement(self.expert_placement(cfg), cfg.num_experts, self.expert_ranks)
        _check_world(self, world_size)
        return self

    def expert_placement(self, cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
        return self.placement if self.placement is not None else contiguous_placement(cfg.num_experts,
                                                                                       self.expert_ranks)

    def head_split(self, cfg: ModelConfig) -> list[range]:
        """Query heads of each head-parallel rank (uneven when T does not divide the heads)."""
        return split_evenly(cfg.num_heads, self.attn_tp)

    def role(self, rank: int) -> "Role":
        if rank < self.num_attention_ranks:
            return Role("attention", rank, replica=rank // self.attn_tp, index=rank % self.attn_tp)
        return Role("expert", rank, replica=None, index=rank - self.num_attention_ranks)

    def replica_ranks(self, replica: int) -> list[int]:
        return list(range(replica * self.attn_tp, (replica + 1) * self.attn_tp))

    def expert_rank_ids(self) -> list[int]:
        return list(range(self.num_attention_ranks, self.world_size))

    def holder(self, cfg: ModelConfig, expert: int, replica: int, without: int | None = None) -> int:
        """Expert-group index that serves `expert` for `replica` (spreads replicated experts);
        `without`: an expert-group index that is gone (its experts' other holders serve)."""
        holders = [r for r, experts in enumerate(self.expert_placement(cfg)) if expert in experts and r != without]
        return holders[replica % len(holders)]

    def survives_expert_loss(self, cfg: ModelConfig) -> bool:
        """Whether the replicas can route around one dead expert rank: every expert has a second
        holder, and each replica is one rank (a head-parallel replica's ranks could be caught
        on either side of a failed transfer, with its own group then out of step)."""
        placement = self.expert_placement(cfg)
        held = [sum(e in experts for experts in placement) for e in range(cfg.num_experts)]
        return self.attn_tp == 1 and self.expert_ranks >= 2 and min(held) >= 2

    def describe(self, cfg: ModelConfig | None = None) -> str:
        text = (f"separated: {self.attn_replicas} attention replica(s) x {self.attn_tp} head-parallel rank(s) "
                f"+ {self.expert_ranks} expert rank(s), {self.microbatches} micro-batch(es)"
                + (", sequence-split prefill" if self.seq_split else ""))
        if cfg is None:
            return text
        lines = [text]
        heads = self.head_split(cfg)
        for rank in range(self.world_size):
            role = self.role(rank)
            if role.kind == "attention":
                h = heads[role.index]
                lines.append(f"  rank {rank}: attention replica {role.replica} tp {role.index} "
                             f"heads [{h.start}, {h.stop})")
            else:
                lines.append(f"  rank {rank}: experts {list(self.expert_placement(cfg)[role.index])}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Role:
    kind: str  # "attention" | "expert" | ...
    rank: int
    replica: int | None
    index: int  # tp rank inside the replica, or expert-group index


def _check_world(plan, world_size: int | None) -> None:
    if world_size is not None and world_size != plan.world_size:
        _fail("world_size", world_size, f"the launch has {world_size} ranks but the plan needs {plan.world_size}",
              f"launch with --nproc-per-node {plan.world_size} or change the plan")


@dataclass(frozen=True)
class TpPpPlan:
    """Megatron-style baseline: T tensor-parallel ranks x P pipeline stages, m micro-batches.

    Rank r is stage r // T, tp index r % T. Heads and each expert's hidden dimension are split
    over the T ranks of a stage; the layers are split over the P stages."""

    tp: int = 1
    pp: int = 1
    microbatches: int = 1
    strategy: str = field(default="tp_pp", init=False)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def validate(self, cfg: ModelConfig, world_size: int | None = None) -> "TpPpPlan":
        _check_counts(self, ("tp", "pp"))
        if self.tp > cfg.num_heads:
            _fail("tp", self.tp, f"more tensor-parallel ranks than attention heads ({cfg.num_heads})",
                  f"use --tp <= {cfg.num_heads}")
        if self.tp > cfg.expert_hidden:
            _fail("tp", self.tp, f"more tensor-parallel ranks than expert hidden columns ({cfg.expert_hidden})",
                  f"use --tp <= {cfg.expert_hidden}")
        if cfg.first_dense_layers and self.tp > cfg.dense_hidden:
            _fail("tp", self.tp, f"more tensor-parallel ranks than dense-layer MLP columns ({cfg.dense_hidden})",
                  f"use --tp <= {cfg.dense_hidden}")
        if self.pp > cfg.num_layers:
            _fail("pp", self.pp, f"more pipeline stages than layers ({cfg.num_layers})",
                  f"use --pp <= {cfg.num_layers}")
        _check_world(self, world_size)
        return self

    def stage_layers(self, cfg: ModelConfig) -> list[range]:
        return split_evenly(cfg.num_layers, self.pp)

    def head_split(self, cfg: ModelConfig) -> list[range]:
        return split_evenly(cfg.num_heads, self.tp)

    def dense_split(self, cfg: ModelConfig) -> list[range]:
        """Each TP rank's columns of a dense layer's MLP (DeepSeek's first layers)."""
        return split_evenly(cfg.dense_hidden, self.tp)

    def hidden_split(self, cfg: ModelConfig) -> list[range]:
        """Columns of each expert's hidden dimension per TP rank (column- then row-parallel)."""
        return split_evenly(cfg.expert_hidden, self.tp)

    def role(self, rank: int) -> Role:
        return Role("tp_pp", rank, replica=rank // self.tp, index=rank % self.tp)  # replica = stage

    def stage_ranks(self, stage: int) -> list[int]:
        return list(range(stage * self.tp, (stage + 1) * self.tp))

    def describe(self, cfg: ModelConfig | None = None) -> str:
        text = f"tp_pp: {self.tp} tensor-parallel x {self.pp} pipeline stage(s), {self.microbatches} micro-batch(es)"
        if cfg is None:
            return text
        lines, layers, heads = [text], self.stage_layers(cfg), self.head_split(cfg)
        for rank in range(self.world_size):
            role = self.role(rank)
            lay, h = layers[role.replica], heads[role.index]
            lines.append(f"  rank {rank}: stage {role.replica} layers [{lay.start}, {lay.stop}) tp {role.index} "
                         f"heads [{h.start}, {h.stop})")
        return "\n".join(lines)


@dataclass(frozen=True)
class EpPlan:
    """Colocated expert parallelism: every rank runs attention for its own sequences (data
    parallel) and holds a share of the experts; all-to-all among all ranks."""

    ep: int = 1
    microbatches: int = 2
    placement: tuple[tuple[int, ...], ...] | None = None
    strategy: str = field(default="ep", init=False)
    __hash__ = _hash_once
    __getstate__ = _state_without_hash

    @property
    def world_size(self) -> int:
        return self.ep

    def validate(self, cfg: ModelConfig, world_size: int | None = None) -> "EpPlan":
        _check_counts(self, ("ep",))
        if self.ep > cfg.num_experts and self.placement is None:
            _fail("ep", self.ep, f"more ranks than experts ({cfg.num_experts}) with the contiguous placement",
                  "give an explicit placement with replicated experts or fewer ranks")
        _check_placement(self.expert_placement(cfg), cfg.num_experts, self.ep)
        _check_world(self, world_size)
        return self

    def expert_placement(self, cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
        return self.placement if self.placement is not None else contiguous_placement(cfg.num_experts, self.ep)

    def holder(self, cfg: ModelConfig, expert: int, rank: int) -> int:
        holders = [r for r, experts in enumerate(self.expert_placement(cfg)) if expert in experts]
        return rank if rank in holders else holders[rank % len(holders)]

    def role(self, rank: int) -> Role:
        return Role("ep", rank, replica=rank, index=rank)

    def describe(self, cfg: ModelConfig | None = None) -> str:
        text = f"ep: {self.ep} rank(s), each with data-parallel attention and a share of the experts, " \
               f"{self.microbatches} micro-batch(es)"
        if cfg is None:
            return text
        return "\n".join([text] + [f"  rank {r}: attention on its own sequences, experts {list(p)}"
                                   for r, p in enumerate(self.expert_placement(cfg))])


# --- what each rank holds and computes: the one description the runtimes, the checkpoint slicing
# (parallel/parts.py) and the cost model / simulator (perf/) read ---------------------------------------------
@dataclass(frozen=True)
class RankRole:
    """What one rank of a plan holds and computes.

    heads / experts / hidden_cols / layers: the attention heads, experts (and each expert's hidden
    columns: tp_pp splits them) of the layers it runs. has_embedding: it holds the token embedding
    and embeds the step's tokens. logits: it holds the final norm and the lm_head (in full) and
    computes the logits of its unit's rows: every attention rank (separated), every rank (ep), every
    TP rank of the last stage (tp_pp: each needs them for its own loss in training; in inference
    its TP rank 0 broadcasts them to the rest of the instance). Expert ranks hold neither."""

    kind: str  # "single" | "attention" | "expert" | "stage" | "colocated"
    rank: int
    heads: range = range(0)  # query heads held
    experts: tuple[int, ...] = ()  # experts held
    hidden_div: int = 1  # each expert's hidden dimension is split this many ways (tp_pp)
    hidden_cols: range | None = None  # this rank's columns of it (None: all)
    dense_cols: range | None = None  # its columns of a dense layer's MLP (tp_pp splits them; None: all)
    layers: range = range(0)  # layers this rank runs
    group: tuple[int, ...] = ()  # its TP group (tp_pp stage), attention replica, or the expert ranks
    replica: int = 0  # attention replica (separated); stage (tp_pp); rank (ep)
    index: int = 0  # index inside `group`; expert-rank index (separated)
    has_embedding: bool = False
    logits: bool = False

    @property
    def broadcasts_logits(self) -> bool:
        """tp_pp: the one rank whose logits every rank of the instance receives."""
        return self.kind == "stage" and self.logits and self.index == 0


def rank_role(plan, cfg: ModelConfig, rank: int) -> RankRole:
    """The role of `rank` in `plan` (every strategy; ValueError for a rank outside the plan)."""
    if not 0 <= rank < plan.world_size:
        raise ValueError(f"rank={rank}: the plan {format_plan(plan)} has ranks 0..{plan.world_size - 1}")
    s, every_layer = plan.strategy, range(cfg.num_layers)
    if s == "single":
        return RankRole("single", rank, range(cfg.num_heads), tuple(range(cfg.num_experts)), layers=every_layer,
                        group=(rank,), has_embedding=True, logits=True)
    if s == "separated":
        role = plan.role(rank)
        if role.kind == "attention":
            return RankRole("attention", rank, plan.head_split(cfg)[role.index], layers=every_layer,
                            group=tuple(plan.replica_ranks(role.replica)), replica=role.replica, index=role.index,
                            has_embedding=True, logits=True)
        return RankRole("expert", rank, experts=tuple(plan.expert_placement(cfg)[role.index]), layers=every_layer,
                        group=tuple(plan.expert_rank_ids()), index=role.index)
    if s == "tp_pp":
        stage, t = divmod(rank, plan.tp)
        return RankRole("stage", rank, plan.head_split(cfg)[t], tuple(range(cfg.num_experts)), hidden_div=plan.tp,
                        hidden_cols=plan.hidden_split(cfg)[t],
                        dense_cols=plan.dense_split(cfg)[t] if cfg.first_dense_layers else None,
                        layers=plan.stage_layers(cfg)[stage], group=tuple(plan.stage_ranks(stage)), replica=stage,
                        index=t, has_embedding=stage == 0, logits=stage == plan.pp - 1)
    if s == "ep":
        return RankRole("colocated", rank, range(cfg.num_heads), tuple(plan.expert_placement(cfg)[rank]),
                        layers=every_layer, group=(rank,), replica=rank, index=rank, has_embedding=True, logits=True)
    raise ValueError(f"plan.strategy={s!r}: must be one of {', '.join(STRATEGIES)}")


def plan_from_dict(data: dict):
    """Rebuild a plan from its JSON form (as printed by `masep run --json`)."""
    kinds = {"single": SinglePlan, "separated": SeparatedPlan, "tp_pp": TpPpPlan, "ep": EpPlan}
    data = dict(data)
    strategy = data.pop("strategy", None)
    if strategy not in kinds:
        raise ValueError(f"plan.strategy={strategy!r}: must be one of {sorted(kinds)}")
    if data.get("placement") is not None:
        data["placement"] = tuple(tuple(p) for p in data["placement"])
    return kinds[strategy](**data)


# --- the plan notation: one spelling for plan, simulate, sweep, run, serve, train and plan files ----------
NOTATION = ("'single' | 'sep RxT+E mM' (R attention replicas x T head-parallel ranks + E expert ranks, e.g. "
            "'sep 2x4+8 m2') | 'tpTppP mM' (e.g. 'tp2pp2 m2') | 'epN mM' (e.g. 'ep4 m2'); then, where they "
            "apply: 'seq-split' (sep), 'placement=0-3;4-7' (sep, ep: expert ids per expert rank)")
_SHAPES = (
    (re.compile(r"sep\s*(\d+)\s*x\s*(\d+)\s*\+\s*(\d+)"), "separated"),
    (re.compile(r"tp\s*(\d+)\s*x?\s*pp\s*(\d+)"), "tp_pp"),
    (re.compile(r"ep\s*(\d+)"), "ep"),
    (re.compile(r"single"), "single"),
)
_SHORT = {"separated": "sep", "tp_pp": "tpTppP", "ep": "epN", "single": "single"}


@lru_cache(maxsize=1024)  # a planner names thousands of candidates sharing a few placements
def format_placement(placement) -> str:
    """((0, 1, 2, 3), (4, 5)) -> '0-3;4,5': runs of 3 or more consecutive ids as ranges."""
    ranks = []
    for experts in placement:
        parts, i = [], 0
        while i < len(experts):
            j = i
            while j + 1 < len(experts) and experts[j + 1] == experts[j] + 1:
                j += 1
            if j - i >= 2:
                parts.append(f"{experts[i]}-{experts[j]}")
            else:
                parts.extend(str(e) for e in experts[i:j + 1])
            i = j + 1
        ranks.append(",".join(parts))
    return ";".join(ranks)


def parse_placement(text: str | None, what: str = "--placement"):
    """'0-2;3,4,5,6,7' -> ((0, 1, 2), (3, 4, 5, 6, 7)): expert ids per expert rank, ranks
    separated by ';', ids by ',', 'a-b' an inclusive range. None stays None."""
    if text is None:
        return None
    out = []
    try:
        for part in text.strip().split(";"):
            ids: list[int] = []
            for item in part.split(","):
                lo, dash, hi = item.strip().partition("-")
                ids.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
            out.append(tuple(ids))
    except ValueError:
        raise ValueError(f"{what}={text!r}: expected comma-separated expert ids or ranges per expert rank, ranks "
                         "separated by ';' (e.g. '0,1,2,3;4,5,6,7' or '0-3;4-7')") from None
    return tuple(out)


def format_plan(plan) -> str:
    """The plan in masep's plan notation ('sep 2x4+8 m2', 'tp2pp2 m2', 'ep4 m2', 'single'; the grammar
    is masep.plan.NOTATION); parse_plan(format_plan(p)) == p."""
    s, m = plan.strategy, plan.microbatches
    if s == "single":
        return "single" if m == 1 else f"single m{m}"
    if s == "separated":
        text = f"sep {plan.attn_replicas}x{plan.attn_tp}+{plan.expert_ranks} m{m}"
        text += " seq-split" if plan.seq_split else ""
    elif s == "tp_pp":
        text = f"tp{plan.tp}pp{plan.pp} m{m}"
    elif s == "ep":
        text = f"ep{plan.ep} m{m}"
    else:
        raise ValueError(f"plan.strategy={s!r}: must be one of {', '.join(STRATEGIES)}")
    placement = getattr(plan, "placement", None)
    return text + (f" placement={format_placement(placement)}" if placement is not None else "")


def parse_plan(text: str):
    """A plan from its notation ('sep 2x4+8 m2', 'tp2pp2 m2', 'ep4 m2', 'single', with 'seq-split' and
    'placement=0-3;4-7' where they apply; the grammar is masep.plan.NOTATION). Without 'mM' the
    micro-batches are `masep run`'s defaults: 2 for sep and ep, P for tpTppP, 1 for single.
    ValueError names the text and the grammar; the plan is not validated against a model here
    (plan.validate does that)."""
    spec = " ".join(str(text).strip().lower().split())
    for pattern, strategy in _SHAPES:
        shape = pattern.match(spec)
        if shape:
            break
    else:
        raise ValueError(f"plan {text!r}: does not start with a plan shape; write {NOTATION}")
    nums = [int(g) for g in shape.groups()]
    m, seq_split, placement = None, False, None
    for token in spec[shape.end():].split():
        if re.fullmatch(r"m\d+", token) and m is None:
            m = int(token[1:])
        elif token == "seq-split" and strategy == "separated" and not seq_split:
            seq_split = True
        elif token.startswith("placement=") and strategy in ("separated", "ep") and placement is None:
            placement = parse_placement(token[len("placement="):], f"plan {text!r}: placement")
        else:
            raise ValueError(f"plan {text!r}: {token!r} is given twice or is not an option of "
                             f"{_SHORT[strategy]} plans; write {NOTATION}")
    if strategy == "separated":
        return SeparatedPlan(*nums, 2 if m is None else m, placement=placement, seq_split=seq_split)
    if strategy == "tp_pp":
        return TpPpPlan(*nums, nums[1] if m is None else m)
    if strategy == "ep":
        return EpPlan(nums[0], 2 if m is None else m, placement=placement)
    return SinglePlan(1 if m is None else m)


# --- plan files: what `masep plan --out FILE` writes and `--plan FILE` reads --------------------------------
def plan_file_text(plan, planned_for: dict, prediction: dict | None = None, reasons=(), alternatives=()) -> str:
    """TOML: `plan` (the notation), [planned_for] (model, GPUs, hardware, workload), [prediction],
    `reasons` (the planner's explanation, one line each) and [[alternatives]] (the runners-up)."""
    from .files import toml_text
    doc = dict(plan=format_plan(plan), strategy=plan.strategy, world_size=plan.world_size, reasons=list(reasons),
               planned_for=planned_for, prediction=prediction, alternatives=list(alternatives))
    return toml_text(doc, "masep plan file: `masep run|serve|train|bench dist --plan FILE` runs this plan\n"
                          "(flags that set the same fields must agree with it; other flags are free)")


def read_plan_file(path: str, what: str = "--plan") -> tuple[object, dict]:
    """(plan, the whole document) of a plan file; ValueError names the file and the rule. Only
    `plan` is required (a hand-written file may hold just `plan = "ep4 m2"`)."""
    from .files import read_toml
    doc = read_toml(path, what)
    text = doc.get("plan")
    if not isinstance(text, str):
        raise ValueError(f"{what} {path}: needs a key plan = \"...\" holding the plan notation ({NOTATION})")
    try:
        plan = parse_plan(text)
    except ValueError as err:
        raise ValueError(f"{what} {path}: {err}") from None
    if doc.get("strategy", plan.strategy) != plan.strategy:
        raise ValueError(f"{what} {path}: strategy = {doc['strategy']!r} disagrees with plan = {text!r} "
                         f"({plan.strategy}); fix or drop `strategy`")
    return plan, doc


def load_plan(value: str, what: str = "--plan") -> tuple[object, dict | None]:
    """`value` is a plan file (TOML) or the notation itself: (plan, the file's document or None)."""
    from pathlib import Path
    if Path(value).is_file() or value.endswith(".toml"):
        return read_plan_file(value, what)
    try:
        return parse_plan(value), None
    except ValueError as err:
        raise ValueError(f"{what} {value!r}: neither a plan file nor a plan ({err})") from None
