"""Cost model of a training step: forward, backward, gradient sync and optimizer, op by op.

The op lists are parallel/schedule.py's training schedules (what parallel/training.py runs);
each op is timed with the same roofline and alpha-beta rules as decode (costmodel.py), with the
token counts of training: a micro-batch of b sequences of length L has n = b * L tokens, and
every expert is touched (n * k / E rows each, at training sizes).

Per layer and micro-batch, on one rank (e = bytes per element of the weights and activations):
  attention      weights W_a = (H D (2h + 2kv) + E H + 2H) e (its heads, router, norms); reads
                 activations n (4H + 2(h + 2kv) D) e; FLOPs 2 n H D (2h + 2kv) + 2 n L D h
                 (causal QK^T and PV: each token sees L/2 keys on average) + 2 n H E (router)
  experts        weights of the held experts (all touched); rows r = n k / E per expert;
                 bytes W_e + r (2H + M I) e; FLOPs 2 r M H I
  head           final norm + lm_head over the micro-batch's n tokens (fp32 logits), loss
  *_bwd          twice the forward's FLOPs (input and weight gradients); weights read twice and
                 their gradients written once (3 W), activations read twice
  transfers      separated: the rows of a head-parallel slice, n k / T rows of H, to the expert
                 ranks and back (and the gradients the same way); EP: every rank's rows to
                 every rank; tp_pp: an all-reduce of n H per sublayer, the activations between
                 stages; head-parallel attention adds an all-reduce + all-gather of n H per layer
  grad_sync      each replicated tensor set summed over its ranks (a ring all-reduce; the
                 hierarchical path when the set spans nodes with equal members per node;
                 int8 compression sends a quarter of the bytes, plus one fp32 scale per chunk,
                 and reads and writes each element about 16 bytes' worth to quantise it)
  optimizer      AdamW over the rank's parameters (`optimizer_bytes_per_param`: 44 bytes of HBM
                 traffic per parameter with bf16 weights and fp32 masters, 32 in fp32)

Memory per rank (`train_memory`): parameters x 16 bytes (bf16 weight 2 + gradient 2 + fp32
master 4 + moments 8, the MA Separation paper's 14 bytes plus the gradient; fp32: 4 + 4 + 8) +
the activations every micro-batch keeps until its backward (GPipe holds all of them) + logits
and their gradient of one micro-batch + the profile's reserved bytes.

Checked against measured H200 runs in benchmarks/train_model_check.py (README "Training").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

from ..config import ModelConfig
from ..parallel import schedule as S
from . import hardware as hwmod
from .costmodel import (OpCost, _holder, allgather_s, allreduce_s, attention_tokens, comm_cost, describe, elt_bytes,
                        kv_heads_for, placement_of, rank_role, roofline_s)
from .hardware import Hardware

COMPRESSIONS = ("none", "int8")
GRAD_CHUNK = 1024  # elements per int8 scale (parallel/gradsync.py's default)


@dataclass(frozen=True)
class TrainWorkload:
    batch: int  # sequences per optimizer step (all replicas, all micro-batches)
    seq_len: int  # tokens per sequence
    compression: str = "none"  # gradient compression of the sync

    def __post_init__(self) -> None:
        for name in ("batch", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainWorkload.{name}={v!r}: must be an integer >= 1")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"TrainWorkload.compression={self.compression!r}: must be one of {COMPRESSIONS}")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def tokens_of(plan, cfg: ModelConfig, work: TrainWorkload, rank: int, mb: int) -> int:
    """Tokens of micro-batch `mb` that this rank's attention runs (0 on a separated expert rank)."""
    if rank_role(plan, cfg, rank).kind == "expert":
        return 0
    return attention_tokens(plan, cfg, work.batch, rank, mb) * work.seq_len


def replica_tokens(plan, cfg: ModelConfig, work: TrainWorkload, mb: int) -> list[int]:
    """Tokens of micro-batch `mb` each source sends to the experts (separated: each replica; ep: each rank)."""
    if plan.strategy == "separated":
        return [attention_tokens(plan, cfg, work.batch, r * plan.attn_tp, mb) * work.seq_len
                for r in range(plan.attn_replicas)]
    if plan.strategy == "ep":
        return [attention_tokens(plan, cfg, work.batch, r, mb) * work.seq_len for r in range(plan.ep)]
    return [attention_tokens(plan, cfg, work.batch, 0, mb) * work.seq_len]


def computes_loss(plan, role) -> bool:
    """Ranks that run the lm_head and the loss in training: those that compute logits
    (plan.rank_role: every rank with attention; in tp_pp every TP rank of the last stage, each
    holding the head in full)."""
    return role.logits


# --- compute ops ------------------------------------------------------------------------------------------
def _attention(cfg: ModelConfig, hw: Hardware, n: int, seq_len: int, heads: int, kv: int, backward: bool,
               routed: int) -> OpCost:
    """n tokens through `heads` query heads; the router over `routed` of them (a head-parallel
    rank routes only its slice of the tokens)."""
    if n == 0:
        return OpCost(S.ATTENTION_BWD if backward else S.ATTENTION)
    h, d, e = cfg.hidden_size, cfg.head_dim, elt_bytes(cfg)
    weights = (h * d * (2 * heads + 2 * kv) + cfg.num_experts * h + 2 * h) * e
    act = n * (4 * h + 2 * (heads + 2 * kv) * d) * e
    flops = 2 * n * h * d * (2 * heads + 2 * kv) + 2 * n * seq_len * d * heads + 2 * routed * h * cfg.num_experts
    return _compute(S.ATTENTION, weights, act, flops, hw, backward)


def _experts(cfg: ModelConfig, hw: Hardware, rows_per_expert: list[float], hidden_div: int, backward: bool) -> OpCost:
    rows = sum(rows_per_expert)
    if rows == 0:
        return OpCost(S.EXPERTS_BWD if backward else S.EXPERTS)
    h, i, e = cfg.hidden_size, cfg.expert_hidden / hidden_div, elt_bytes(cfg)
    weights = sum(1 for r in rows_per_expert if r > 0) * cfg.expert_matrices * h * i * e
    act = rows * (2 * h + cfg.expert_matrices * i) * e
    return _compute(S.EXPERTS, weights, act, 2 * rows * cfg.expert_matrices * h * i, hw, backward)


def _head(cfg: ModelConfig, hw: Hardware, n: int, backward: bool) -> OpCost:
    if n == 0:
        return OpCost(S.HEAD_BWD if backward else S.HEAD)
    h, e = cfg.hidden_size, elt_bytes(cfg)
    weights = (cfg.vocab_size * h + h) * e
    act = 2 * n * h * e + 2 * n * cfg.vocab_size * 4  # fp32 logits written and read by the loss
    return _compute(S.HEAD, weights, act, 2 * n * h * cfg.vocab_size, hw, backward)


def _compute(kind: str, weights: float, act: float, flops: float, hw: Hardware, backward: bool) -> OpCost:
    """Forward: weights + activations, FLOPs; backward: 3 x weights, 2 x activations, 2 x FLOPs.
    Timed at the forward kind's rates (calibration measures forward ops)."""
    if backward:
        weights, act, flops = 3 * weights, 2 * act, 2 * flops
    nbytes = weights + act
    return OpCost(kind + "_bwd" if backward else kind, compute_s=roofline_s(hw, kind, nbytes, flops),
                  hbm_bytes=nbytes, weight_bytes=weights, flops=flops)


def expert_rows(plan, cfg: ModelConfig, work: TrainWorkload, rank: int, mb: int) -> list[float]:
    """Routed rows per held expert of micro-batch `mb` on this rank, in expectation (k/E of each
    source's tokens; a replicated expert serves the sources assigned to this copy)."""
    role = rank_role(plan, cfg, rank)
    p = cfg.top_k / cfg.num_experts
    if plan.strategy in ("single", "tp_pp"):
        return [replica_tokens(plan, cfg, work, mb)[0] * p for _ in role.experts]
    placement = placement_of(plan, cfg)
    sources = replica_tokens(plan, cfg, work, mb)
    local = plan.strategy == "ep"
    return [sum(n * p for src, n in enumerate(sources) if _holder(placement, ex, src, local) == role.index)
            for ex in role.experts]


# --- transfers --------------------------------------------------------------------------------------------
def _bridge(kind: str, plan, cfg: ModelConfig, work: TrainWorkload, rank: int, mb: int, hw: Hardware) -> OpCost:
    """Rows (or their gradients) between attention and experts: expected rows, not padded blocks
    (training sends each row once, parallel/comm.py dispatch_rows)."""
    e, hsz, k = elt_bytes(cfg), cfg.hidden_size, cfg.top_k
    if plan.strategy == "separated":
        first = plan.num_attention_ranks
        if rank < first:  # this rank's token slice, spread over the expert ranks
            n = -(-tokens_of(plan, cfg, work, rank, mb) // plan.attn_tp)
            peers = {first + g: len(held) for g, held in enumerate(placement_of(plan, cfg))}
            return comm_cost(kind, hw, rank, peers, n * k * hsz * e)
        rows = sum(expert_rows(plan, cfg, work, rank, mb))  # from every attention rank
        peers = {a: 1.0 for a in range(first)}
        return comm_cost(kind, hw, rank, peers, rows * hsz * e)
    # ep: the rank's rows to every rank, in proportion to the experts each holds
    n = tokens_of(plan, cfg, work, rank, mb)
    peers = {r: len(held) for r, held in enumerate(placement_of(plan, cfg))}
    return comm_cost(kind, hw, rank, peers, n * k * hsz * e)


def _head_parallel_s(plan, cfg: ModelConfig, work: TrainWorkload, rank: int, mb: int, hw: Hardware) -> float:
    """Separated attention with T > 1: per layer, the all-reduce of the attention output and the
    all-gather of the MoE sublayer's token slices (the same again in backward)."""
    if plan.strategy != "separated" or plan.attn_tp == 1 or rank >= plan.num_attention_ranks:
        return 0.0
    group = tuple(rank_role(plan, cfg, rank).group)
    nbytes = tokens_of(plan, cfg, work, rank, mb) * cfg.hidden_size * elt_bytes(cfg)
    return allreduce_s(hw, group, nbytes) + allgather_s(hw, group, nbytes)


# --- the step's end: gradient sync and optimizer ---------------------------------------------------------
def rank_params(plan, cfg: ModelConfig, rank: int) -> dict[tuple[int, ...], float]:
    """Parameters this rank holds, by the set of ranks their gradients are summed over."""
    role = rank_role(plan, cfg, rank)
    h, d = cfg.hidden_size, cfg.head_dim
    layers = len(role.layers)
    attn = h * d * (2 * len(role.heads) + 2 * kv_heads_for(cfg, role.heads)) + 2 * h if role.heads else 0
    router = cfg.num_experts * h + (3 * h * cfg.shared_expert_hidden + h if cfg.shared_expert_hidden else 0)
    vocab = cfg.vocab_size * h
    out: dict[tuple[int, ...], float] = {}

    def add(ranks, n):
        if n:
            key = tuple(sorted(ranks))
            out[key] = out.get(key, 0.0) + n
    if plan.strategy == "separated" and role.kind == "attention":
        same_t = [r * plan.attn_tp + role.index for r in range(plan.attn_replicas)]
        add(same_t, layers * attn + vocab * (1 + (not cfg.tie_embeddings)))
        add(range(plan.num_attention_ranks), layers * router)
    elif role.kind == "expert" or plan.strategy == "ep":
        placement = placement_of(plan, cfg)
        first = plan.num_attention_ranks if plan.strategy == "separated" else 0
        for ex in role.experts:
            add([first + g for g, held in enumerate(placement) if ex in held], layers * cfg.expert_params())
        if plan.strategy == "ep":
            add(range(plan.ep), layers * (attn + router) + vocab * (1 + (not cfg.tie_embeddings)))
    elif plan.strategy == "tp_pp":
        add(role.group, layers * router)
        add([rank], layers * (attn + len(role.experts) * cfg.expert_params() / role.hidden_div)
            + vocab * (role.has_embedding + computes_loss(plan, role)))
    else:
        add([rank], layers * (attn + router + len(role.experts) * cfg.expert_params())
            + vocab * (1 + (not cfg.tie_embeddings)))
    return out


def _sum_s(hw: Hardware, ranks: tuple[int, ...], nbytes: float, compression: str) -> float:
    """Time to sum `nbytes` of gradients over `ranks`: flat ring, or reduce-scatter in the node,
    ring across nodes, all-gather in the node when the set spans nodes evenly (gradsync.py)."""
    if len(ranks) <= 1:
        return 0.0
    ratio = (1 + 4 / GRAD_CHUNK) / 4 if compression == "int8" else 1.0
    nodes: dict[int, list[int]] = {}
    for r in ranks:
        nodes.setdefault(hw.node(r), []).append(r)
    sizes = {len(v) for v in nodes.values()}
    if len(nodes) > 1 and len(sizes) == 1 and sizes != {1}:
        per = sizes.pop()
        inside = hwmod.ring_allgather_s(nbytes, per, hw.nvlink_bytes_per_s, hw.nvlink_latency_s)
        across = hwmod.ring_allreduce_s(nbytes / per * ratio, len(nodes), hw.internode_bytes_per_s,
                                        hw.internode_latency_s)
        return 2 * inside + across
    return allreduce_s(hw, tuple(ranks), nbytes * ratio)


def _grad_sync(plan, cfg: ModelConfig, work: TrainWorkload, rank: int, hw: Hardware) -> OpCost:
    e = elt_bytes(cfg)
    sets = rank_params(plan, cfg, rank)
    t = sum(_sum_s(hw, ranks, n * e, work.compression) for ranks, n in sets.items())
    shared = sum(n for ranks, n in sets.items() if len(ranks) > 1)
    # int8 passes over each element: read the gradient and the carried error, write the error
    # and the int8 copy, then read the received copies and write the sum (about 16 bytes)
    quant = 16 * shared / hw.hbm_rate("experts") if work.compression == "int8" and shared else 0.0
    return OpCost(S.GRAD_SYNC, compute_s=quant, transfer_s=t, link_bytes=shared * e, hbm_bytes=16 * shared * (quant > 0))


def optimizer_bytes_per_param(cfg: ModelConfig) -> int:
    """HBM traffic of one optimizer step per parameter, as train/precision.py runs it: the norm
    reads the gradient (4); AdamW reads gradient, master and two moments and writes master and
    moments (28). With bf16/fp16 weights add the gradient's copy to fp32 (2 + 4) and the
    master's copy back to the weight (4 + 2)."""
    return 32 + (12 if elt_bytes(cfg) == 2 else 0)


def _optimizer(plan, cfg: ModelConfig, rank: int, hw: Hardware) -> OpCost:
    params = sum(rank_params(plan, cfg, rank).values())
    nbytes = optimizer_bytes_per_param(cfg) * params
    return OpCost(S.OPTIMIZER, compute_s=nbytes / hw.hbm_rate("experts") + hw.latency("experts"), hbm_bytes=nbytes)


# --- one op of one rank -----------------------------------------------------------------------------------
@lru_cache(maxsize=65536)
def train_op_cost(kind: str, mb: int, plan, rank: int, cfg: ModelConfig, work: TrainWorkload, hw: Hardware) -> OpCost:
    role = rank_role(plan, cfg, rank)
    n = tokens_of(plan, cfg, work, rank, mb)
    e, hsz = elt_bytes(cfg), cfg.hidden_size
    if kind in (S.ATTENTION, S.ATTENTION_BWD):
        routed = -(-n // plan.attn_tp) if plan.strategy == "separated" else n
        c = _attention(cfg, hw, n, work.seq_len, len(role.heads), kv_heads_for(cfg, role.heads), kind != S.ATTENTION,
                       routed)
        extra = _head_parallel_s(plan, cfg, work, rank, mb, hw)
        return dataclasses.replace(c, transfer_s=extra) if extra else c
    if kind in (S.EXPERTS, S.EXPERTS_BWD):
        return _experts(cfg, hw, expert_rows(plan, cfg, work, rank, mb), role.hidden_div, kind != S.EXPERTS)
    if kind in (S.HEAD, S.HEAD_BWD):
        return _head(cfg, hw, n if computes_loss(plan, role) else 0, kind != S.HEAD)
    if kind in (S.ALLREDUCE, S.ALLREDUCE_BWD):
        return OpCost(kind, transfer_s=allreduce_s(hw, role.group, n * hsz * e), link_bytes=n * hsz * e)
    if kind in (S.SEND_ACT, S.RECV_ACT, S.SEND_ACT_GRAD, S.RECV_ACT_GRAD):
        peer = rank + plan.tp if kind in (S.SEND_ACT, S.RECV_ACT_GRAD) else rank - plan.tp
        return comm_cost(kind, hw, rank, {peer: 1.0}, n * hsz * e)
    if kind in (S.DISPATCH, S.COMBINE, S.RECV, S.SEND, S.DISPATCH_GRAD, S.COMBINE_GRAD, S.RECV_GRAD, S.SEND_GRAD):
        return _bridge(kind, plan, cfg, work, rank, mb, hw)
    if kind == S.GRAD_SYNC:
        return _grad_sync(plan, cfg, work, rank, hw)
    if kind == S.OPTIMIZER:
        return _optimizer(plan, cfg, rank, hw)
    raise ValueError(f"op kind {kind!r}: the training cost model has no rule for it")


# --- memory -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainMemory:
    states: float  # parameters x 16 bytes (weights, gradients, fp32 masters, moments)
    activations: float  # kept by every micro-batch until its backward
    buffers: float  # logits + their gradient of one micro-batch, reserved bytes

    @property
    def total(self) -> float:
        return self.states + self.activations + self.buffers


def train_memory(plan, cfg: ModelConfig, rank: int, work: TrainWorkload, hw: Hardware) -> TrainMemory:
    role = rank_role(plan, cfg, rank)
    e, h, d = elt_bytes(cfg), cfg.hidden_size, cfg.head_dim
    states = 16 * sum(rank_params(plan, cfg, rank).values())
    layers, m = len(role.layers), plan.microbatches
    tokens = sum(tokens_of(plan, cfg, work, rank, i) for i in range(m))
    per_token = (6 * h + 3 * (len(role.heads) + 2 * kv_heads_for(cfg, role.heads)) * d) * e if role.heads else 0
    rows = sum(sum(expert_rows(plan, cfg, work, rank, i)) for i in range(m)) if role.experts else 0
    per_row = (2 * h + (cfg.expert_matrices + 1) * cfg.expert_hidden / role.hidden_div) * e
    activations = layers * (tokens * per_token + rows * per_row)
    biggest = max(tokens_of(plan, cfg, work, rank, i) for i in range(m)) if computes_loss(plan, role) else 0
    return TrainMemory(states, activations, biggest * cfg.vocab_size * 4 * 2 + hw.reserved_bytes)


def check_train_memory(plan, cfg: ModelConfig, work: TrainWorkload, hw: Hardware) -> list[TrainMemory]:
    """Training memory per rank; ValueError naming the rank and the numbers when one does not fit."""
    out = []
    for rank in range(plan.world_size):
        use = train_memory(plan, cfg, rank, work, hw)
        if use.total > hw.memory_bytes:
            raise ValueError(
                f"plan {describe(plan)} does not fit for training: rank {rank} ({rank_role(plan, cfg, rank).kind}) "
                f"needs {use.total / 1e9:.1f} GB = optimizer states {use.states / 1e9:.1f} GB (16 bytes per "
                f"parameter) + activations {use.activations / 1e9:.1f} GB ({work.batch} sequences of "
                f"{work.seq_len}, m={plan.microbatches}) + buffers {use.buffers / 1e9:.1f} GB, more than the "
                f"{hw.memory_bytes / 1e9:.1f} GB of one {hw.name}; use more GPUs, fewer sequences per step or "
                "more micro-batches")
        out.append(use)
    return out
