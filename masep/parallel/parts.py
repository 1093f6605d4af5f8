"""Which part of the model each rank holds, and how a rank gets it.

`rank_parts(plan, cfg, rank)` says it as `ModelParts`: per layer the heads, experts and expert
hidden columns (`BlockParts`), and whether the rank holds the token embedding and the final norm
with the lm_head. It reads plan.rank_role, the one description of what a rank holds and computes
that the runtimes and the cost model read too. A rank builds only those slices, either reading
them from a checkpoint (`checkpoint.from_pretrained(..., parts=...)`) or drawing them from the
seed (`model.build_model(..., parts=...)`, the values the whole model has there). `apply_parts`
slices a model already in memory the same way (a whole model handed to a runtime, tests).
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..mla import MLAttention
from ..model import Attention, BlockParts, DenseMLP, Experts, ModelParts, MoETransformer
from ..plan import rank_role


def rank_parts(plan, cfg: ModelConfig, rank: int) -> ModelParts:
    if plan.strategy == "single":
        return ModelParts.everything(cfg)
    role = rank_role(plan, cfg, rank)
    heads = role.heads if len(role.heads) else None
    experts = role.experts or None
    held = BlockParts(heads, experts, role.hidden_cols, dense_cols=role.dense_cols)
    gone = BlockParts(None, None, active=False)  # another pipeline stage's layer
    return ModelParts(tuple(held if layer in role.layers else gone for layer in range(cfg.num_layers)),
                      embedding=role.has_embedding, head=role.logits)


def shard_attention(full: Attention | MLAttention, cfg: ModelConfig, heads: range) -> Attention | MLAttention:
    """A head-parallel slice of `full`: q/o for `heads`, k/v for the KV heads they read (MLA:
    per-head rows and columns, the latent projections whole); `full` itself when it already
    is that slice."""
    if full.heads == heads:
        return full
    if isinstance(full, MLAttention):
        return MLAttention(cfg, heads, device=full.o_proj.weight.device, dtype=full.o_proj.weight.dtype
                           ).copy_heads_from_(full)
    part = Attention(cfg, heads, device=full.q_proj.weight.device, dtype=full.q_proj.weight.dtype)
    d = cfg.head_dim
    q_rows = slice(heads.start * d, heads.stop * d)
    kv_rows = slice(part.kv_heads.start * d, part.kv_heads.stop * d)
    with torch.no_grad():
        part.q_proj.weight.copy_(full.q_proj.weight[q_rows])
        part.k_proj.weight.copy_(full.k_proj.weight[kv_rows])
        part.v_proj.weight.copy_(full.v_proj.weight[kv_rows])
        part.o_proj.weight.copy_(full.o_proj.weight[:, q_rows])
        if cfg.qkv_bias:
            part.q_proj.bias.copy_(full.q_proj.bias[q_rows])
            part.k_proj.bias.copy_(full.k_proj.bias[kv_rows])
            part.v_proj.bias.copy_(full.v_proj.bias[kv_rows])
        if cfg.qk_norm:
            part.q_norm.weight.copy_(full.q_norm.weight)
            part.k_norm.weight.copy_(full.k_norm.weight)
    return part


def shard_experts(full: Experts, cfg: ModelConfig, expert_ids, hidden_cols: range | None = None) -> Experts:
    """Experts `expert_ids` of `full`, optionally only `hidden_cols` of each one's hidden
    dimension (`full` itself when it already is exactly that)."""
    if full.expert_ids == list(expert_ids) and full.hidden_cols == hidden_cols:
        return full
    assert full.hidden_cols is None, "slicing needs the experts' full hidden dimension"
    part = Experts(cfg, expert_ids, device=full.w_up.device, dtype=full.w_up.dtype, hidden_cols=hidden_cols)
    idx = torch.tensor(list(expert_ids), device=full.w_up.device)
    cols = slice(None) if hidden_cols is None else slice(hidden_cols.start, hidden_cols.stop)
    with torch.no_grad():
        if full.w_gate is not None:
            part.w_gate.copy_(full.w_gate[idx][:, cols])
        part.w_up.copy_(full.w_up[idx][:, cols])
        part.w_down.copy_(full.w_down[idx][:, :, cols])
    return part


def shard_dense_mlp(full: DenseMLP, cfg: ModelConfig, cols: range | None) -> DenseMLP:
    """Hidden columns `cols` of a dense layer's MLP (`full` itself when it already is that)."""
    if full.cols == cols:
        return full
    assert full.cols is None, "slicing needs the MLP's full hidden dimension"
    w = full.gate_proj.weight
    part = DenseMLP(cfg, device=w.device, dtype=w.dtype, cols=cols)
    c = slice(cols.start, cols.stop)
    with torch.no_grad():
        part.gate_proj.weight.copy_(full.gate_proj.weight[c])
        part.up_proj.weight.copy_(full.up_proj.weight[c])
        part.down_proj.weight.copy_(full.down_proj.weight[:, c])
    return part


def apply_parts(model: MoETransformer, parts: ModelParts | list[BlockParts]) -> MoETransformer:
    """In place: keep in each block only its parts, and the embedding and head only where held,
    dropping the rest (torchtitan's parallelize_*)."""
    cfg, parts = model.cfg, ModelParts.of(parts)
    if not parts.embedding:
        model.embed = None
    if not parts.head:
        model.norm = model.lm_head = None
    for block, p in zip(model.layers, parts):
        if not p.active:
            block.attn_norm = block.attn = block.moe_norm = block.moe = block.mlp = None
            continue
        block.attn = shard_attention(block.attn, cfg, p.heads) if p.heads is not None else None
        if block.moe is None:  # a dense layer: its MLP lives with the attention
            block.mlp = shard_dense_mlp(block.mlp, cfg, p.dense_cols) if p.heads is not None else None
            continue
        block.moe.experts = (shard_experts(block.moe.experts, cfg, p.experts, p.hidden_cols)
                             if p.experts is not None else None)
        if p.heads is None:  # the shared expert runs beside the attention (model.MoE)
            block.moe.shared = None
    return model
