"""Cost model: bytes, FLOPs and time of every op of a plan's schedule, one rank at a time.

Every function here is pure: (op kind, plan, rank, model config, tokens of the micro-batch,
context, hardware) -> numbers, so each value can be checked by hand.

Compute ops (attention, experts, head) move `hbm_bytes` through HBM and do `flops`:
    compute_s = max(hbm_bytes / achievable HBM rate, flops / achievable matmul rate) + op latency
  - attention (one layer, one rank): q/k/v/o weights of its heads + router + norms, the KV
    cache of its sequences at `context` keys, 2 activation rows per token; FLOPs of the
    projections (2*b*H*D*(2N + 2K)), of QK^T and PV (4*b*N*S*D) and of the router.
  - experts (one layer, one rank): the weights of the experts *touched*, in expectation: an
    expert seen by n tokens that each pick top-k of E uniformly is touched with probability
    1 - (1 - k/E)^n (16 * (1 - (14/16)^24) = 15.35 of 16 at 24 tokens, top-2); rows routed
    to it n*k/E; FLOPs 2 * rows * matrices * H * I. Micro-batches re-read the weights they
    touch, which is why m > 1 costs bytes at small batch.
  - multi-head latent attention (MLA, DeepSeek-V3), as mla.py runs it: the per-head q/kv_b/o
    weights of its heads plus the latent projections (whole on every head-parallel rank); the
    cache it reads is the compressed latent, (kv_lora_rank + qk_rope_head_dim) values per key,
    the whole of it on every head-parallel rank of a replica (replicated: each rank writes and
    reads the same latents); every step projects each sequence's cached latents up to its heads'
    keys and values: 2 * S * kv_lora_rank * N * (nope + v) FLOPs, and those keys and values
    [S, N, nope + v + head_dim] are written and read back (activation bytes). FLOPs of QK^T and
    PV: 2 * b * N * S * (head_dim + v_head_dim). (The absorbed form, not run here, would skip the
    up-projection: see mla.py.)
  - mlp (a dense layer: DeepSeek's first layers): the SwiGLU MLP where the attention ran, on the
    whole micro-batch, with no transfer: every head-parallel rank of a separated replica runs it
    whole; EP ranks on their own tokens; tp_pp ranks on their hidden columns (then all-reduce).
  - shared experts (Qwen2-MoE, DeepSeek): SwiGLU of shared_expert_hidden on the tokens an attention
    rank settles (separated: its slice; ep: its tokens), priced with its attention op (the same
    compute stream; the runtime runs it when the outputs come back); tp_pp: in the experts op of
    TP rank 0, which adds it alone; single: in the experts op.
  - head: final norm per micro-batch; then, as the runtimes do, the lm_head once per step over
    all the rank's rows, in full (no vocabulary split), on the ranks plan.rank_role says compute
    logits: every attention rank (separated), every rank (ep), every TP rank of the last stage
    (tp_pp), whose TP rank 0 then broadcasts them to the whole instance.
    `Workload.lm_head=False` leaves it out, as the floors of docs/reference.md do.
  These are the same definitions as `masep.perf.bench` (attention/experts bytes and FLOPs), so
  a calibration file's measurements fit this model directly.

Communication ops are alpha-beta per link (hardware.py): each rank's `transfer_s` is the time
its own bytes need once every member of the transfer has arrived; the simulator takes the
slowest member. Bytes to peers on the same node go over NVLink, others over the rank's NIC;
an all-to-all-like exchange with p peers pays p latencies per round trip (pairwise exchange:
(p-1) alpha + bytes beta; 7 NVLink peers at 2 us ~ 14 us, 8 A100s' NCCL all-to-all is ~20 us).
A decode step's dispatch and combine move fixed-size padded blocks in one round trip each (the
counts ride in a header; parallel/routing.py): every receiver gets a block sized for the largest
sender's tokens from the routing (parallel/capacity.py), here at its steady state under balanced
routing (1.5 x the fullest receiver's mean, at most the worst case of tokens x min(k, L) rows);
`link_bytes_saved` is what worst-case blocks would add. Skewed routing widens the blocks towards
the worst case, and a step whose blocks overflow runs again (neither is modelled). Ring all-reduce:
2(n-1) latency + 2(n-1)/n * bytes / bandwidth; all-gather: (n-1) latency + (n-1)/n * bytes / bw.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

from ..config import ModelConfig
from ..model import CacheLayout
from ..parallel.capacity import CapacityPolicy
from ..plan import (EpPlan, RankRole, SeparatedPlan, SinglePlan, TpPpPlan, contiguous_placement, format_plan,
                    split_evenly)
from ..plan import rank_role as plan_rank_role
from . import hardware as hwmod
from .hardware import Hardware

COMPUTE, COMM, BACK = 0, 1, 2  # stream ids; BACK: expert outputs returning (their own communicator)


# --- the workload and one op's cost -----------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    batch: int  # sequences decoding together (all micro-batches, all replicas)
    context: int  # keys each sequence attends to in this step
    lm_head: bool = True  # include final norm + lm_head (the floors of docs/reference.md exclude it)
    # How routed tokens cross the bridge: "padded", what masep's runtime does (parallel/routing.py: a
    # fixed-capacity block from every sender to every receiver); "routed", a what-if for a count-first
    # dispatcher such as DeepEP's low-latency kernels: only the expected routed rows, every peer posted at once.
    dispatch: str = "padded"

    def __post_init__(self) -> None:
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"Workload.batch={self.batch!r}: must be an integer >= 1")
        if not isinstance(self.context, int) or self.context < 1:
            raise ValueError(f"Workload.context={self.context!r}: must be an integer >= 1")
        if self.dispatch not in DISPATCH_MODELS:
            raise ValueError(f"Workload.dispatch={self.dispatch!r}: must be one of {DISPATCH_MODELS}")


DISPATCH_MODELS = ("padded", "routed")


@dataclass(frozen=True)
class OpCost:
    kind: str
    compute_s: float = 0.0  # this rank's own work before the rendezvous
    transfer_s: float = 0.0  # this rank's alpha-beta time once every member arrived
    post_s: float = 0.0  # this rank's tail after the transfer (all-gather inside a replica)
    hbm_bytes: float = 0.0
    weight_bytes: float = 0.0  # part of hbm_bytes that are weights
    kv_bytes: float = 0.0  # part of hbm_bytes that is KV cache read
    flops: float = 0.0
    link_bytes: float = 0.0
    link_bytes_saved: float = 0.0  # padded transfers: bytes blocks of the worst-case capacity would add

    @property
    def time_s(self) -> float:
        """The op alone (no waiting for peers)."""
        return self.compute_s + self.transfer_s + self.post_s


def elt_bytes(cfg: ModelConfig) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.dtype]


def roofline_s(hw: Hardware, kind: str, nbytes: float, flops: float) -> float:
    """max(bytes / HBM rate, FLOPs / matmul rate) + the kind's fixed latency; 0 for no work."""
    if nbytes <= 0 and flops <= 0:
        return 0.0
    return max(nbytes / hw.hbm_rate(kind), flops / hw.flop_rate(kind)) + hw.latency(kind)


def touched(cfg: ModelConfig, tokens: float) -> float:
    """Probability that one given expert is picked by at least one of `tokens` tokens (top-k of E)."""
    return 1.0 - (1.0 - cfg.top_k / cfg.num_experts) ** tokens


def experts_touched(cfg: ModelConfig, tokens: float) -> float:
    """E(1 - (1 - k/E)^n): expected distinct experts per layer at n tokens."""
    return cfg.num_experts * touched(cfg, tokens)


def kv_heads_for(cfg: ModelConfig, heads: range) -> int:
    if len(heads) == 0:
        return 0
    return (heads.stop - 1) // cfg.kv_group - heads.start // cfg.kv_group + 1


def attention_cost(cfg: ModelConfig, hw: Hardware, tokens: int, context: int, heads: int, kv_heads: int,
                   router: bool = True) -> OpCost:
    """One layer of attention on one rank: `heads` query heads, `kv_heads` KV heads, `tokens` rows
    (decode: one per sequence), each attending to `context` keys; plus the router (not in a
    dense layer) and the two norms."""
    if tokens == 0:
        return OpCost("attention")
    h, d, e = cfg.hidden_size, cfg.head_dim, elt_bytes(cfg)
    proj = cfg.attention_params(heads, kv_heads)
    route = cfg.router_params() if router else 0
    weights = (proj + route + 2 * h) * e
    kv = tokens * context * CacheLayout.of(cfg, kv_heads).bytes_per_position(cfg.torch_dtype)
    act = 2 * tokens * h * e
    flops = 2 * tokens * proj + 2 * tokens * h * cfg.num_experts * router
    if cfg.is_mla:  # up-project every cached latent, then attend with [nope + rope] keys, v values
        up = cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        flops += 2 * tokens * context * up + 2 * tokens * heads * context * (d + cfg.v_head_dim)
        act += tokens * context * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim + d) * e * 2
    else:
        flops += 4 * tokens * heads * context * d
    nbytes = weights + kv + act
    return OpCost("attention", compute_s=roofline_s(hw, "attention", nbytes, flops), hbm_bytes=nbytes,
                  weight_bytes=weights, kv_bytes=kv, flops=flops)


def swiglu_cost(kind: str, cfg: ModelConfig, hw: Hardware, tokens: float, inner: float) -> OpCost:
    """An always-on SwiGLU MLP of hidden size `inner` over `tokens` rows (a dense layer's MLP, a
    column slice of it, or the shared experts): 3 weight matrices read, 2 activation rows."""
    if tokens == 0 or inner == 0:
        return OpCost(kind)
    h, e = cfg.hidden_size, elt_bytes(cfg)
    weights = 3 * h * inner * e
    nbytes = weights + 2 * tokens * h * e
    flops = 2 * tokens * 3 * h * inner
    return OpCost(kind, compute_s=roofline_s(hw, "experts", nbytes, flops), hbm_bytes=nbytes, weight_bytes=weights,
                  flops=flops)


def plus(a: OpCost, b: OpCost) -> OpCost:
    """Op a with b's compute work added to it (b's own kernels: the times add)."""
    return dataclasses.replace(a, compute_s=a.compute_s + b.compute_s, hbm_bytes=a.hbm_bytes + b.hbm_bytes,
                               weight_bytes=a.weight_bytes + b.weight_bytes, flops=a.flops + b.flops)


def experts_cost(cfg: ModelConfig, hw: Hardware, tokens_per_expert: tuple[float, ...], hidden_div: int = 1) -> OpCost:
    """One layer of experts on one rank. tokens_per_expert[i]: tokens whose routing can reach the
    i-th held expert on this rank (each picks it with probability k/E)."""
    h, i, e = cfg.hidden_size, cfg.expert_hidden / hidden_div, elt_bytes(cfg)
    p = cfg.top_k / cfg.num_experts
    rows = sum(n * p for n in tokens_per_expert)
    if rows == 0:
        return OpCost("experts")
    weights = sum(touched(cfg, n) for n in tokens_per_expert) * cfg.expert_matrices * h * i * e
    nbytes = weights + 2 * rows * h * e
    flops = 2 * rows * cfg.expert_matrices * h * i
    return OpCost("experts", compute_s=roofline_s(hw, "experts", nbytes, flops), hbm_bytes=nbytes,
                  weight_bytes=weights, flops=flops)


def head_cost(cfg: ModelConfig, hw: Hardware, tokens: int, logit_rows: int = 0, lm_head: bool = True) -> OpCost:
    """Final norm over `tokens` rows, plus the lm_head over `logit_rows` rows (fp32 logits)."""
    vocab = cfg.vocab_size if lm_head and logit_rows else 0
    if tokens == 0 and vocab == 0:
        return OpCost("head")
    h, e = cfg.hidden_size, elt_bytes(cfg)
    weights = (vocab * h + h) * e
    nbytes = weights + 2 * tokens * h * e + logit_rows * vocab * 4
    flops = 2 * logit_rows * h * vocab
    return OpCost("head", compute_s=roofline_s(hw, "head", nbytes, flops), hbm_bytes=nbytes,
                  weight_bytes=weights, flops=flops)


# --- links ---------------------------------------------------------------------------------------------
def link_time(hw: Hardware, rank: int, peers: dict[int, float] | range, nbytes: float, round_trips: int = 1) -> float:
    """Alpha-beta time for `rank` to move `nbytes` to/from `peers` (rank -> share of the bytes, or a
    range of ranks with equal shares): pairwise exchange, one latency per peer and round trip,
    (p - 1) * alpha + bytes * beta. The share to itself costs nothing; NVLink peers and NIC peers
    progress concurrently."""
    if isinstance(peers, range):  # equal shares: count the peers on this rank's node, do not visit them
        node = hw.node_span(rank)
        mine = 1 if rank in peers else 0
        n_near = max(0, min(node.stop, peers.stop) - max(node.start, peers.start)) - mine
        n_far, total, near_w = len(peers) - n_near - mine, len(peers), None
    else:
        total = sum(peers.values())
        home = hw.node(rank)
        near = [w for r, w in peers.items() if w > 0 and r != rank and hw.node(r) == home]
        far = [w for r, w in peers.items() if w > 0 and hw.node(r) != home]
        n_near, n_far, near_w, far_w = len(near), len(far), sum(near), sum(far)
    if nbytes <= 0 or total <= 0 or not (n_near or n_far):
        return 0.0
    if near_w is None:
        near_w, far_w = n_near, n_far
    own = hw.for_rank(rank)  # NVLink of this rank's own kind; between nodes, the hardware's (slower side's) NIC
    latency = max(n_near * own.nvlink_latency_s, n_far * hw.internode_latency_s)
    return round_trips * latency + max(near_w / total * nbytes / own.nvlink_bytes_per_s,
                                       far_w / total * nbytes / hw.internode_bytes_per_s)


def _group_link(hw: Hardware, group: tuple[int, ...]) -> tuple[float, float]:
    """(bandwidth, latency) of a ring over `group`: the NIC when it spans nodes."""
    if len({hw.node(r) for r in group}) > 1:
        return hw.internode_bytes_per_s, hw.internode_latency_s
    own = hw.for_rank(group[0])
    return own.nvlink_bytes_per_s, own.nvlink_latency_s


def allreduce_s(hw: Hardware, group: tuple[int, ...], nbytes: float) -> float:
    bw, lat = _group_link(hw, group)
    return hwmod.ring_allreduce_s(nbytes, len(group), bw, lat)


def broadcast_s(hw: Hardware, group: tuple[int, ...], nbytes: float) -> float:
    """Pipelined ring broadcast: (n-1) latencies + bytes / bandwidth."""
    if len(group) <= 1:
        return 0.0
    bw, lat = _group_link(hw, group)
    return (len(group) - 1) * lat + nbytes / bw


def allgather_s(hw: Hardware, group: tuple[int, ...], nbytes: float) -> float:
    bw, lat = _group_link(hw, group)
    return hwmod.ring_allgather_s(nbytes, len(group), bw, lat)


def comm_cost(kind: str, hw: Hardware, rank: int, peers: dict[int, float], nbytes: float, round_trips: int = 1,
              post_s: float = 0.0) -> OpCost:
    return OpCost(kind, transfer_s=link_time(hw, rank, peers, nbytes, round_trips), post_s=post_s,
                  link_bytes=nbytes)


# --- rank roles ------------------------------------------------------------------------------------------
# What each rank holds and does is plan.rank_role, the description the runtimes and the checkpoint
# slicing read too (cached here: the simulator asks for it once per op).
rank_role = lru_cache(maxsize=65536)(plan_rank_role)


def strategy_of(plan) -> str:
    return plan.strategy


@lru_cache(maxsize=4096)
def placement_of(plan, cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
    """Experts held by each expert rank (separated) or each rank (ep)."""
    if plan.placement is not None:
        return tuple(tuple(p) for p in plan.placement)
    ranks = plan.expert_ranks if plan.strategy == "separated" else plan.ep
    return contiguous_placement(cfg.num_experts, ranks)


def stage_layers(cfg: ModelConfig, pp: int) -> list[range]:
    return split_evenly(cfg.num_layers, pp)


# --- sequences per micro-batch ------------------------------------------------------------------------------
def part_size(total: int, parts: int, i: int) -> int:
    """len(split_evenly(total, parts)[i]) without building the ranges."""
    base, extra = divmod(total, parts)
    return base + (1 if i < extra else 0)


def attention_tokens(plan, cfg: ModelConfig, batch: int, rank: int, mb: int) -> int:
    """Sequences of micro-batch `mb` that this rank's attention runs."""
    s, m = plan.strategy, plan.microbatches
    if s in ("single", "tp_pp"):
        return part_size(batch, m, mb)
    if s == "separated":
        return part_size(part_size(batch, plan.attn_replicas, rank // plan.attn_tp), m, mb)
    if s == "ep":
        return part_size(part_size(batch, plan.ep, rank), m, mb)
    raise ValueError(s)


@lru_cache(maxsize=4096)
def _holders(placement: tuple[tuple[int, ...], ...]) -> dict[int, tuple[int, ...]]:
    out: dict[int, list[int]] = {}
    for r, experts in enumerate(placement):
        for e in experts:
            out.setdefault(e, []).append(r)
    return {e: tuple(rs) for e, rs in out.items()}


@lru_cache(maxsize=4096)
def plan_holders(plan, cfg: ModelConfig) -> dict[int, tuple[int, ...]]:
    """Expert id -> the ranks (expert-group indices) holding it, keyed by the plan (whose hash is
    computed once) rather than by its placement (rehashed on every lookup)."""
    return _holders(placement_of(plan, cfg))


def _holder(placement, expert: int, source: int, local_first: bool = False) -> int:
    """Index of the rank serving `expert` for `source`, as the plans' `holder`: separated spreads
    replicas over the copies; ep serves from the source rank itself when it holds a copy."""
    holders = _holders(placement)[expert]
    if local_first and source in holders:
        return source
    return holders[source % len(holders)]


@lru_cache(maxsize=65536)
def expert_tokens(plan, cfg: ModelConfig, batch: int, rank: int, mb: int) -> tuple[float, ...]:
    """Per held expert: tokens of micro-batch `mb` whose routing reaches it on this rank (sources
    are attention replicas in separated, ranks in ep; replicated experts split sources)."""
    s, role = plan.strategy, rank_role(plan, cfg, rank)
    if s in ("single", "tp_pp"):
        return tuple(float(part_size(batch, plan.microbatches, mb)) for _ in role.experts)
    return routed_tokens(plan, cfg, batch, mb, role.index)


@lru_cache(maxsize=4096)
def _sources(plan, batch: int, mb: int) -> tuple[int, int, int, int]:
    """(sources, extra, more, fewer): split_evenly gives the first `extra` sources (replicas in
    separated, ranks in ep) `more` tokens of micro-batch mb and the others `fewer`."""
    count = plan.ep if plan.strategy == "ep" else plan.attn_replicas
    base, extra = divmod(batch, count)
    return count, extra, part_size(base + 1, plan.microbatches, mb), part_size(base, plan.microbatches, mb)


@lru_cache(maxsize=65536)
def _by_residue(plan, batch: int, mb: int, c: int) -> tuple[int, ...]:
    """Tokens of micro-batch mb summed over the sources s = q (mod c), for q in [0, c)."""
    count, extra, more, fewer = _sources(plan, batch, mb)
    return tuple(more * len(range(q, extra, c)) + fewer * (len(range(q, count, c)) - len(range(q, extra, c)))
                 for q in range(c))


def routed_tokens(plan, cfg: ModelConfig, batch: int, mb: int, index: int) -> tuple[float, ...]:
    """expert_tokens of the expert-holding rank `index` (expert-group index in separated, rank in ep),
    counted by residues instead of visiting every source. A source sends an expert's rows to holder
    (source % c) of its c holders (`_holder`), so holder q gets the tokens of the sources s = q (mod c);
    in ep a source holding the expert keeps its own rows instead, so holder q gets its own tokens plus
    those of the sources s = q (mod c) that hold no copy."""
    holders = plan_holders(plan, cfg)
    count, extra, more, fewer = _sources(plan, batch, mb)
    tokens = lambda src: more if src < extra else fewer  # noqa: E731
    out = []
    for e in placement_of(plan, cfg)[index]:
        hs = holders[e]
        c, q = len(hs), hs.index(index)
        got = _by_residue(plan, batch, mb, c)[q]
        if plan.strategy == "ep":  # the holders among the sources s = q (mod c) keep their rows; this one too
            got += tokens(index) - sum(tokens(h) for h in hs if h % c == q)
        out.append(float(got))
    return tuple(out)


def dispatch_slice(plan, cfg: ModelConfig, batch: int, rank: int, mb: int) -> int:
    """Tokens this attention rank sends (separated: its share of the replica's micro-batch)."""
    n = attention_tokens(plan, cfg, batch, rank, mb)
    if plan.strategy == "separated":
        return part_size(n, plan.attn_tp, rank % plan.attn_tp)
    return n


def _head_op(plan, role: RankRole, cfg: ModelConfig, work: Workload, hw: Hardware, b: int, mb: int) -> OpCost:
    """Final norm of micro-batch `mb`; the logits of all the rank's rows come after the last
    micro-batch (the runtimes compute them once per step). tp_pp: every TP rank of the last stage
    computes them; its TP rank 0 broadcasts [batch, vocab] fp32 to every rank (the others take
    part in the broadcast)."""
    last = mb == plan.microbatches - 1
    rows = sum(attention_tokens(plan, cfg, work.batch, role.rank, i) for i in range(plan.microbatches)) \
        if role.logits and last else 0
    c = head_cost(cfg, hw.for_rank(role.rank), b, rows, work.lm_head)
    if plan.strategy == "tp_pp" and rows and work.lm_head and plan.world_size > 1:
        c = dataclasses.replace(c, post_s=broadcast_s(hw, tuple(range(plan.world_size)), rows * cfg.vocab_size * 4))
    return c


# --- one op of one rank -------------------------------------------------------------------------------------
def op_cost(kind: str, layer: int, mb: int, plan, rank: int, cfg: ModelConfig, work: Workload, hw: Hardware) -> OpCost:
    """Cost of op `kind(layer, mb)` on `rank` of `plan` (layer matters through the role, and
    whether it is a dense layer: no router, no shared expert)."""
    return _op_cost(kind, mb, plan, rank, cfg, work, hw, cfg.is_dense_layer(layer))


@lru_cache(maxsize=262144)
def _op_cost(kind: str, mb: int, plan, rank: int, cfg: ModelConfig, work: Workload, hw: Hardware,
             dense: bool = False) -> OpCost:
    role = rank_role(plan, cfg, rank)
    e, hsz = elt_bytes(cfg), cfg.hidden_size
    b = attention_tokens(plan, cfg, work.batch, rank, mb) if role.kind != "expert" else 0
    if kind == "attention":
        c = attention_cost(cfg, hw.for_rank(rank), b, work.context, len(role.heads), kv_heads_for(cfg, role.heads),
                           not dense)
        if not dense and plan.strategy in ("separated", "ep"):  # the shared expert on the tokens it settles
            settled = dispatch_slice(plan, cfg, work.batch, rank, mb)
            c = plus(c, swiglu_cost("attention", cfg, hw.for_rank(rank), settled, cfg.shared_expert_hidden))
        if plan.strategy == "separated" and plan.attn_tp > 1:  # head-parallel partial sums
            c = dataclasses.replace(c, transfer_s=allreduce_s(hw, role.group, b * hsz * e), link_bytes=b * hsz * e)
        return c
    if kind == "mlp":  # a dense layer's MLP where its attention ran (its hidden columns in tp_pp)
        return swiglu_cost("mlp", cfg, hw.for_rank(rank), b, cfg.dense_hidden / role.hidden_div)
    if kind == "experts":
        c = experts_cost(cfg, hw.for_rank(rank), expert_tokens(plan, cfg, work.batch, rank, mb), role.hidden_div)
        if plan.strategy in ("single", "tp_pp") and role.index == 0:  # the shared expert, added once
            c = plus(c, swiglu_cost("experts", cfg, hw.for_rank(rank), b, cfg.shared_expert_hidden))
        return c
    if kind == "head":
        return _head_op(plan, role, cfg, work, hw, b, mb)
    if kind == "allreduce":
        return OpCost(kind, transfer_s=allreduce_s(hw, role.group, b * hsz * e), link_bytes=b * hsz * e)
    if kind in ("send_act", "recv_act"):
        peer = rank + plan.tp if kind == "send_act" else rank - plan.tp
        return comm_cost(kind, hw, rank, {peer: 1.0}, b * hsz * e)
    if kind in ("dispatch", "combine", "recv", "send"):
        return _padded_transfer(kind, mb, plan, rank, cfg, work, hw)
    raise ValueError(f"op kind {kind!r}: the cost model has no rule for it")


@lru_cache(maxsize=4096)
def _capacity_policy(plan, cfg: ModelConfig) -> CapacityPolicy:
    return CapacityPolicy.for_placement(cfg.top_k, placement_of(plan, cfg), cfg.num_experts)


@lru_cache(maxsize=4096)
def _largest_dispatch_slice(plan, cfg: ModelConfig, batch: int, mb: int) -> int:
    """Tokens of the largest attention rank's dispatch (the same for every rank of the step): rank 0's,
    as split_evenly gives the first replica, micro-batch part and head-parallel slice the extra rows."""
    return dispatch_slice(plan, cfg, batch, 0, mb)


def _padded_transfer(kind: str, mb: int, plan, rank: int, cfg: ModelConfig, work: Workload, hw: Hardware) -> OpCost:
    """A decode step's routed transfer as the runtime moves it (parallel/routing.py): one block
    per (sender, receiver) of the capacity the routing sizes (parallel/capacity.py, at its steady
    state under balanced routing) for the largest sender's tokens, plus the header, in one round
    trip (the counts ride in the header). dispatch / combine: an attention (or colocated) rank's
    side; recv / send: an expert rank's. `Workload.dispatch = "routed"` prices exact routed rows
    instead (_routed_transfer)."""
    if work.dispatch == "routed":
        return _routed_transfer(kind, mb, plan, rank, cfg, work, hw)
    e, hsz = elt_bytes(cfg), cfg.hidden_size
    policy = _capacity_policy(plan, cfg)
    hdr = -(-8 * (4 + policy.max_local + 1) // (hsz * e))  # routing.header_rows
    if plan.strategy == "separated":
        senders = range(plan.num_attention_ranks)
        tokens = _largest_dispatch_slice(plan, cfg, work.batch, mb)
        with_header = kind in ("dispatch", "recv")
        if kind in ("dispatch", "combine"):  # to / from every expert rank of the plan
            peers = range(plan.num_attention_ranks, plan.world_size)
        else:  # to / from every attention rank (each replica's bridge; replicas run side by side)
            peers = senders
    else:  # ep: every rank sends a block to every rank, itself included
        tokens = attention_tokens(plan, cfg, work.batch, 0, mb)  # rank 0 has the most
        with_header = kind == "dispatch"
        peers = range(plan.ep)
    width = policy.cap(tokens) + (hdr if with_header else 0)
    nbytes = len(peers) * width * hsz * e
    saved = len(peers) * (policy.cap(tokens, full=True) - policy.cap(tokens)) * hsz * e
    post = 0.0
    if kind == "combine" and plan.strategy == "separated" and plan.attn_tp > 1:
        role = rank_role(plan, cfg, rank)
        post = allgather_s(hw, role.group, attention_tokens(plan, cfg, work.batch, rank, mb) * hsz * e)
    return dataclasses.replace(comm_cost(kind, hw, rank, peers, nbytes, round_trips=1, post_s=post),
                               link_bytes_saved=saved)


def _routed_transfer(kind: str, mb: int, plan, rank: int, cfg: ModelConfig, work: Workload, hw: Hardware) -> OpCost:
    """The what-if of `Workload.dispatch = "routed"`: a rank moves only its expected routed rows, one
    per (token, chosen expert): an attention rank sends (combine: gets back) its dispatch slice x k
    rows; an expert rank receives (send: returns) the rows its experts get (as experts_cost counts
    them); an EP rank does both at once and waits for the larger. All peers are posted together,
    so one latency per round trip (of the NIC when any peer is on another node), not one per peer:
    DeepEP's published low-latency EP256 dispatch (194 us for 128 tokens x top-8 x 7168 in FP8 on
    H800 + 400 Gb/s) is 1.33x this model's 146 us for the same 7.3 MB per rank."""
    e, hsz = elt_bytes(cfg), cfg.hidden_size
    sent = (dispatch_slice(plan, cfg, work.batch, rank, mb) * cfg.top_k
            if rank_role(plan, cfg, rank).kind != "expert" else 0)
    got = sum(expert_tokens(plan, cfg, work.batch, rank, mb)) * cfg.top_k / cfg.num_experts \
        if rank_role(plan, cfg, rank).experts else 0.0
    if plan.strategy == "separated":
        peers = range(plan.num_attention_ranks, plan.world_size) if kind in ("dispatch", "combine") else \
            range(plan.num_attention_ranks)
    else:
        peers = range(plan.ep)
    nbytes = max(sent, got) * hsz * e
    post = 0.0
    if kind == "combine" and plan.strategy == "separated" and plan.attn_tp > 1:
        post = allgather_s(hw, rank_role(plan, cfg, rank).group, attention_tokens(plan, cfg, work.batch, rank, mb) * hsz * e)
    return OpCost(kind, transfer_s=posted_together_s(hw, rank, peers, nbytes), post_s=post, link_bytes=nbytes)


def posted_together_s(hw: Hardware, rank: int, peers: range, nbytes: float) -> float:
    """`nbytes` spread evenly over `peers`, every peer posted at once: one latency (the NIC's when a
    peer is on another node), then the NVLink and NIC shares in parallel."""
    if nbytes <= 0:
        return 0.0
    node = hw.node_span(rank)
    mine = 1 if rank in peers else 0
    near = max(0, min(node.stop, peers.stop) - max(node.start, peers.start)) - mine
    far = len(peers) - near - mine
    if near <= 0 and far <= 0:
        return 0.0
    own = hw.for_rank(rank)
    latency = hw.internode_latency_s if far > 0 else own.nvlink_latency_s
    return latency + max(near / len(peers) * nbytes / own.nvlink_bytes_per_s,
                         far / len(peers) * nbytes / hw.internode_bytes_per_s)


# --- memory -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryUse:
    weights: float
    kv_cache: float
    buffers: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.buffers


def rank_memory(plan, cfg: ModelConfig, rank: int, work: Workload, hw: Hardware) -> MemoryUse:
    """Weights held + KV cache for `context` keys of its sequences + working buffers
    (activations and logits of the largest micro-batch, expert intermediates, MLA's up-projected
    keys and values of one layer) + the profile's reserved bytes (CUDA context, NCCL buffers,
    allocator slack). An MLA cache is the compressed latent per token, whole on every
    head-parallel rank; dense layers hold their MLP where the attention is (tp_pp: a column
    slice) and no experts; shared experts sit with the attention (every rank but a separated
    expert rank)."""
    role = rank_role(plan, cfg, rank)
    e, h = elt_bytes(cfg), cfg.hidden_size
    layers = len(role.layers)
    dense = sum(1 for layer in role.layers if cfg.is_dense_layer(layer))
    kv = kv_heads_for(cfg, role.heads)
    attn = (cfg.attention_params(len(role.heads), kv) + 2 * h) * e if role.heads else 0
    always_on = ((cfg.router_params() + cfg.shared_expert_params()) * e if role.heads else 0,  # per MoE layer
                 cfg.dense_mlp_params() / role.hidden_div * e if role.heads else 0)  # per dense layer
    experts = len(role.experts) * cfg.expert_params() / role.hidden_div * e
    vocab = cfg.vocab_size * h * e
    tied = cfg.tie_embeddings and role.has_embedding and role.logits  # one tensor for both
    weights = (layers * attn + (layers - dense) * (experts + always_on[0]) + dense * always_on[1]
               + vocab * (role.has_embedding + role.logits - tied))
    seqs = sum(attention_tokens(plan, cfg, work.batch, rank, i) for i in range(plan.microbatches)) \
        if role.kind != "expert" else 0
    kv_bytes = layers * seqs * work.context * CacheLayout.of(cfg, kv).bytes_per_position(cfg.torch_dtype)
    biggest = max(attention_tokens(plan, cfg, work.batch, rank, i) for i in range(plan.microbatches)) \
        if role.kind != "expert" else 0
    rows = max((sum(expert_tokens(plan, cfg, work.batch, rank, i)) * cfg.top_k / cfg.num_experts
                for i in range(plan.microbatches)), default=0) if role.experts else 0
    rows_all = work.batch if plan.strategy == "tp_pp" else seqs  # tp_pp: every rank receives the logits
    up_kv = biggest * work.context * len(role.heads) * (cfg.qk_nope_head_dim + cfg.v_head_dim + cfg.head_dim) * e \
        if cfg.is_mla else 0
    buffers = (plan.microbatches * biggest * h * e * 4 + rows_all * cfg.vocab_size * 4
               + rows * (2 * h + cfg.expert_hidden / role.hidden_div * cfg.expert_matrices) * e
               + up_kv + hw.for_rank(rank).reserved_bytes)
    return MemoryUse(weights, kv_bytes, buffers)


def check_memory(plan, cfg: ModelConfig, work: Workload, hw: Hardware, ranks=None) -> list[MemoryUse]:
    """Memory of each rank in `ranks` (default: all); ValueError naming the rank and the numbers when one
    does not fit."""
    out = []
    for rank in range(plan.world_size) if ranks is None else ranks:
        use = rank_memory(plan, cfg, rank, work, hw)
        own = hw.for_rank(rank)
        if use.total > own.memory_bytes:
            role = rank_role(plan, cfg, rank)
            raise ValueError(
                f"plan {describe(plan)} does not fit: rank {rank} ({role.kind}) needs {use.total / 1e9:.1f} GB = "
                f"weights {use.weights / 1e9:.1f} GB + KV cache {use.kv_cache / 1e9:.1f} GB (batch {work.batch}, "
                f"context {work.context}) + buffers {use.buffers / 1e9:.1f} GB, more than the "
                f"{own.memory_bytes / 2**30:.1f} GiB ({own.memory_bytes / 1e9:.1f} GB) of one {own.name}; use more "
                "GPUs, a smaller batch or context, or a plan that spreads this rank's part")
        out.append(use)
    return out


def describe(plan) -> str:
    """The plan's notation (plan.format_plan): `sep 12x1+4 m2`, `tp8pp2 m2`, `ep16 m2`, `single`."""
    return format_plan(plan)


def plan_to_dict(plan) -> dict:
    d = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    if d.get("placement") is not None:
        d["placement"] = [list(p) for p in d["placement"]]
    return d


def plan_from_dict(d: dict):
    d = dict(d)
    s = d.pop("strategy", None)
    if d.get("placement") is not None:
        d["placement"] = tuple(tuple(p) for p in d["placement"])
    cls = {"separated": SeparatedPlan, "tp_pp": TpPpPlan, "ep": EpPlan, "single": SinglePlan}.get(s)
    if cls is None:
        raise ValueError(f"plan.strategy={s!r}: must be one of separated, tp_pp, ep, single")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"plan fields {unknown} are not fields of a {s} plan ({sorted(names)})")
    return cls(**d)
