"""Tensor x pipeline parallelism (Megatron style): the MA Separation paper's comparator, TP=8 x PP=2.

Inside a stage, T ranks split the attention heads and each expert's hidden dimension
(gate/up column-parallel, down row-parallel), with one all-reduce after attention and one
after the experts per layer; a dense layer's MLP is split by its hidden columns the same way. Stages hold contiguous layers and pass activations [b, t, H]
point to point; micro-batches pipeline across stages (stage s works on micro-batch i+1 while
stage s+1 works on i). What each rank holds and computes is plan.rank_role (the description the
checkpoint slicing and the cost model read too): the first stage embeds, every TP rank of the
last stage computes the logits, and its TP rank 0 broadcasts them to every rank, so every
rank's engine samples the same tokens.
"""
from __future__ import annotations

import torch

from ..model import MoETransformer
from ..plan import TpPpPlan, rank_role
from . import comm
from .groups import DistEnv, TpPpGroups
from .schedule import ALLREDUCE, ATTENTION, EXPERTS, HEAD, MLP, RECV_ACT, SEND_ACT, Op, tp_pp_schedule
from .parts import shard_attention, shard_dense_mlp, shard_experts
from .stepper import MicroBatch, MicroBatchRuntime, OpTimer


class TpPpRuntime(MicroBatchRuntime):
    # a decode step is compute, NCCL all-reduces, stage-to-stage transfers and the logits
    # broadcast, with no host read: it is captured whole (stepper.py)
    whole_step_graphs = True

    def __init__(self, model: MoETransformer, plan: TpPpPlan, groups: TpPpGroups, env: DistEnv,
                 timer: OpTimer | None = None, graphs: bool = False):
        cfg = self.cfg = model.cfg
        self.plan, self.env, self.device, self.groups = plan, env, env.device, groups
        self.timer = timer or OpTimer()
        self.stage, self.tp_index = groups.role.replica, groups.role.index
        self.layers = plan.stage_layers(cfg)[self.stage]
        heads = plan.head_split(cfg)[self.tp_index]
        cols = plan.hidden_split(cfg)[self.tp_index]
        self.blocks = {i: model.layers[i] for i in self.layers}  # norms, router: whole
        self.attn = {i: shard_attention(model.layers[i].attn, cfg, heads) for i in self.layers}
        self.experts = {i: shard_experts(model.layers[i].moe.experts, cfg, range(cfg.num_experts), cols)
                        for i in self.layers if model.layers[i].moe is not None}
        self.mlp = {i: shard_dense_mlp(model.layers[i].mlp, cfg, plan.dense_split(cfg)[self.tp_index])
                    for i in self.layers if model.layers[i].moe is None}
        self.embed, self.norm, self.lm_head = model.embed, model.norm, model.lm_head
        role = rank_role(plan, cfg, env.rank)
        self.first, self.last = role.has_embedding, role.logits
        self.logits_src = next(r for r in range(plan.world_size) if rank_role(plan, cfg, r).broadcasts_logits)
        self.dtype = model.dtype
        self._init_steps(len(self.layers), len(self.attn[self.layers.start].kv_heads), self.dtype, graphs)
        self.sends: list = []

    def finish(self) -> None:
        self.cache = None

    def _schedule(self, microbatches: int) -> list[Op]:
        return tp_pp_schedule(self.layers, self.stage, self.plan.pp, microbatches, self.cfg.first_dense_layers)

    def _embed(self, ids_bt):
        return self.embed(ids_bt) if self.first else None

    def _op_handlers(self):
        return {RECV_ACT: lambda mb, layer, i: self._recv(mb, i), ATTENTION: self._attention,
                ALLREDUCE: self._all_reduce, EXPERTS: self._experts, MLP: self._mlp,
                SEND_ACT: lambda mb, layer, i: self._send(mb, i), HEAD: lambda mb, layer, i: self._head(mb, i)}

    def _step(self, mbs, dim):
        out = super()._step(mbs, dim)
        for pending in self.sends:
            comm.wait_activation_sent(pending)
        self.sends.clear()
        return out

    def _recv(self, mb: MicroBatch, i: int) -> None:
        b, t = mb.ids.shape
        src = (self.stage - 1) * self.plan.tp + self.tp_index
        mb.x = comm.recv_activation((b, t, self.cfg.hidden_size), self.dtype, self.device, src,
                                    self.groups.prev_group, self.env.timeout, self._where(self.layers.start, i))

    def _send(self, mb: MicroBatch, i: int) -> None:
        dst = (self.stage + 1) * self.plan.tp + self.tp_index
        mb.x = _add_pending(mb.x, mb.work.pop("pending", None))
        self.sends.append(comm.send_activation(mb.x, dst, self.groups.next_group, self.env.timeout,
                                               self._where(self.layers.stop - 1, i)))

    # Each compute op first adds the all-reduced partial sum of the op before it to the residual
    # (mb.work["pending"]), so the compute between two all-reduces is one segment.
    def _attention(self, mb: MicroBatch, layer: int, i: int) -> None:
        block, attn, attend, cache = self.blocks[layer], self.attn[layer], self._attend_len(mb), mb.cache
        local = layer - self.layers.start

        def run(positions, x, *pending):
            x = _add_pending(x, *pending)
            return x, attn(block.attn_norm(x), positions, cache, local, attend)

        pending = _pending_inputs(mb)
        mb.x, mb.work["partial"] = self._segment(("attention", layer, i, attend, len(pending)), run, mb.positions,
                                                 mb.x, *pending)

    def _experts(self, mb: MicroBatch, layer: int, i: int) -> None:
        moe, norm, experts = self.blocks[layer].moe, self.blocks[layer].moe_norm, self.experts[layer]
        add_shared = moe.shared is not None and self.tp_index == 0  # added once, before the all-reduce

        def run(x, *pending):
            x = _add_pending(x, *pending)
            z = norm(x).reshape(-1, self.cfg.hidden_size)
            weights, ids = moe.router(z)
            y = experts(z, weights, ids)
            return x, (moe.add_shared(z, y) if add_shared else y).view_as(x)

        pending = _pending_inputs(mb)
        mb.x, mb.work["partial"] = self._segment(("experts", layer, i, len(pending)), run, mb.x, *pending)

    def _mlp(self, mb: MicroBatch, layer: int, i: int) -> None:
        """A dense layer: this rank's hidden columns of its MLP; the all-reduce sums them."""
        norm, mlp = self.blocks[layer].moe_norm, self.mlp[layer]

        def run(x, *pending):
            x = _add_pending(x, *pending)
            return x, mlp(norm(x))

        pending = _pending_inputs(mb)
        mb.x, mb.work["partial"] = self._segment(("mlp", layer, i, len(pending)), run, mb.x, *pending)

    def _all_reduce(self, mb: MicroBatch, layer: int, i: int) -> None:
        partial = mb.work.pop("partial")
        if self.plan.tp > 1:
            comm.group_all_reduce(partial, self.groups.tp_group, self.env.timeout, self._where(layer, i))
        mb.work["pending"] = partial

    def _head(self, mb: MicroBatch, i: int) -> None:
        def run(x, *pending):
            return self.norm(_add_pending(x, *pending))

        pending = _pending_inputs(mb)
        mb.out = self._segment(("head", i, len(pending)), run, mb.x, *pending)

    def _logits(self, out, rows_B, index_B):
        """Logits [B, V] on every rank: the last stage's ranks compute them (rank_role.logits),
        the one that broadcasts_logits sends them to the others."""
        logits = torch.empty(rows_B.numel(), self.cfg.vocab_size, dtype=torch.float32, device=self.device)
        if self.last:
            logits.copy_(super()._logits(out, rows_B, index_B))
        if self.plan.world_size > 1:
            comm.broadcast(logits, self.logits_src, self.groups.model_group, self.env.timeout,
                           f"rank {self.env.rank}: logits")
        return logits


def _pending_inputs(mb: MicroBatch) -> tuple:
    pending = mb.work.pop("pending", None)
    return () if pending is None else (pending,)


def _add_pending(x: torch.Tensor, pending: torch.Tensor | None = None) -> torch.Tensor:
    return x if pending is None else x + pending
