"""The whole model's weights from the ranks' slices: for checks against the single-device trainer
and for `masep train --export` (an HF checkpoint any rank count can load again).

Each rank lists *pieces*: (key of the full model's state dict, index into that tensor, tensor).
Replicated weights are listed by one rank only (after gradient sync the replicas are equal), so
rank 0 writes every element exactly once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..model import MoETransformer
from ..parallel import train_separated as ts
from ..parallel import training as tr

Piece = tuple[str, tuple, torch.Tensor]


def attention_pieces(prefix: str, attn, cfg, of) -> list[Piece]:
    """A head slice's rows of q/k/v, columns of o (parts.shard_attention in reverse); of(param)
    picks what is listed (the weight or its gradient)."""
    d = cfg.head_dim
    q = slice(attn.heads.start * d, attn.heads.stop * d)
    kv = slice(attn.kv_heads.start * d, attn.kv_heads.stop * d)
    out = [(f"{prefix}.q_proj.weight", (q,), of(attn.q_proj.weight)),
           (f"{prefix}.k_proj.weight", (kv,), of(attn.k_proj.weight)),
           (f"{prefix}.v_proj.weight", (kv,), of(attn.v_proj.weight)),
           (f"{prefix}.o_proj.weight", (slice(None), q), of(attn.o_proj.weight))]
    if cfg.qkv_bias:
        out += [(f"{prefix}.q_proj.bias", (q,), of(attn.q_proj.bias)), (f"{prefix}.k_proj.bias", (kv,), of(attn.k_proj.bias)),
                (f"{prefix}.v_proj.bias", (kv,), of(attn.v_proj.bias))]
    if cfg.qk_norm:
        out += [(f"{prefix}.q_norm.weight", (), of(attn.q_norm.weight)),
                (f"{prefix}.k_norm.weight", (), of(attn.k_norm.weight))]
    return out


def expert_pieces(prefix: str, experts, of, keep=lambda e: True) -> list[Piece]:
    """Experts (or their hidden columns) of a stacked Experts module; `keep(e)` picks which."""
    cols = slice(None) if experts.hidden_cols is None else slice(experts.hidden_cols.start, experts.hidden_cols.stop)
    out = []
    for local, e in enumerate(experts.expert_ids):
        if not keep(e):
            continue
        if experts.w_gate is not None:
            out.append((f"{prefix}.w_gate", (e, cols), of(experts.w_gate)[local]))
        out.append((f"{prefix}.w_up", (e, cols), of(experts.w_up)[local]))
        out.append((f"{prefix}.w_down", (e, slice(None), cols), of(experts.w_down)[local]))
    return out


def _whole(module, prefix: str, of, skip=()) -> list[Piece]:
    return [(f"{prefix}{n}", (), of(p)) for n, p in module.named_parameters() if not any(s in n for s in skip)]


def rank_pieces(rank: tr.TrainRank, of=lambda p: p) -> list[Piece]:
    cfg = rank.cfg
    if isinstance(rank, tr.SingleTrain):
        return _whole(rank.model, "", of)
    if isinstance(rank, ts.SeparatedAttentionTrain):
        if rank.role.replica != 0:
            return []
        out = [p for i, a in enumerate(rank.attn) for p in attention_pieces(f"layers.{i}.attn", a, cfg, of)]
        return out + (_whole(rank.model, "", of) if rank.role.index == 0 else [])
    if isinstance(rank, ts.SeparatedExpertTrain):
        first = rank.plan.num_attention_ranks
        placement = rank.plan.expert_placement(cfg)

        def mine(e):  # the first holder writes a replicated expert
            return first + next(g for g, held in enumerate(placement) if e in held) == rank.rank
        return [p for i, ex in enumerate(rank.experts) for p in expert_pieces(f"layers.{i}.moe.experts", ex, of, mine)]
    if isinstance(rank, tr.EpTrain):
        placement = rank.plan.expert_placement(cfg)

        def mine(e):
            return next(g for g, held in enumerate(placement) if e in held) == rank.rank
        out = [p for i, b in enumerate(rank.model.layers) for p in expert_pieces(f"layers.{i}.moe.experts", b.moe.experts, of, mine)]
        return out + (_whole(rank.model, "", of, skip=(".moe.experts.",)) if rank.rank == 0 else [])
    if isinstance(rank, tr.TpPpTrain):
        out = []
        for local, layer in enumerate(rank.layers):
            block = rank.blocks[local]
            out += attention_pieces(f"layers.{layer}.attn", block.attn, cfg, of)
            out += expert_pieces(f"layers.{layer}.moe.experts", block.moe.experts, of)
            if rank.t == 0:
                out += _whole(block, f"layers.{layer}.", of, skip=("attn.", "moe.experts."))
        if rank.t == 0:
            if rank.first:
                out += _whole(rank.model.embed, "embed.", of)
            if rank.last:
                out += _whole(rank.model.norm, "norm.", of) + _whole(rank.model.lm_head, "lm_head.", of)
        return out
    raise TypeError(f"no pieces for {type(rank).__name__}")


def gather_full_state(rank: tr.TrainRank, template: MoETransformer, grads: bool = False) -> dict | None:
    """Rank 0: the whole model's state dict (CPU, float32 copies; `grads`: the gradients instead)
    in `template`'s shapes; other ranks: None. Every rank must call it (a gather over the world)."""
    of = (lambda p: p.grad if p.grad is not None else torch.zeros_like(p)) if grads else (lambda p: p)
    pieces = [(k, idx, t.detach().float().cpu()) for k, idx, t in rank_pieces(rank, of)]
    if not dist.is_initialized():
        gathered = [pieces]
    else:
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(pieces, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
    state = {k: torch.full(v.shape, float("nan")) for k, v in template.state_dict().items()}
    for part in gathered:
        for key, idx, tensor in part:
            state[key][idx] = tensor
    missing = [k for k, v in state.items() if torch.isnan(v).any()]
    if missing:
        raise RuntimeError(f"no rank wrote {missing[:4]}{'...' if len(missing) > 4 else ''}: the plan's pieces "
                           "do not cover the model")
    return state
