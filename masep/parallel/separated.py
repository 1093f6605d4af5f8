"""MA separation: attention ranks and expert ranks run different op lists, micro-batches ping-pong.

An attention rank is a `Runtime` (the engine drives it like the single-device model) over its
replica's sequences and its slice of heads. An expert rank runs `serve_experts`, a loop that
answers every replica's bridge until each one says stop.

Per layer and micro-batch on an attention rank (replica of T head-parallel ranks):
  attention: x [b, t, H] -> partial attention of local heads -> all-reduce in replica -> h
             z = moe_norm(h); router(z) -> ids, weights [b*t, k]
  dispatch:  this rank's slice of the b*t tokens (split_evenly over T) goes to the expert ranks
  combine:   expert outputs for the slice -> h_slice + y (+ shared expert) -> all-gather -> x
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model import MoETransformer
from ..plan import SeparatedPlan, split_evenly
from . import comm
from .groups import DistEnv, SeparatedGroups
from .parts import shard_attention, shard_experts
from .schedule import (ATTENTION, COMBINE, DISPATCH, EXPERTS, HEAD, RECV, SEND, Op, execute,
                       separated_schedule)
from .stepper import MicroBatch, MicroBatchRuntime, OpTimer


def expert_route(plan: SeparatedPlan, cfg: ModelConfig, replica: int, device) -> comm.ExpertRoute:
    """Bridge member and local index serving each expert for `replica` (attention ranks come first)."""
    holders = [plan.holder(cfg, e, replica) for e in range(cfg.num_experts)]
    return comm.ExpertRoute.build(plan.expert_placement(cfg), holders, plan.attn_tp, device)


class SeparatedAttentionRuntime(MicroBatchRuntime):
    """The attention side of MA separation as an engine `Runtime` for one replica's sequences."""

    def __init__(self, model: MoETransformer, plan: SeparatedPlan, groups: SeparatedGroups, env: DistEnv,
                 timer: OpTimer | None = None):
        cfg = self.cfg = model.cfg
        self.plan, self.env, self.role = plan, env, groups.role
        self.device = env.device
        self.bridge = groups.bridges[0]
        self.replica_group = groups.replica_group
        self.timer = timer or OpTimer()
        heads = plan.head_split(cfg)[self.role.index]
        self.embed, self.norm, self.lm_head = model.embed, model.norm, model.lm_head
        self.attn = [shard_attention(b.attn, cfg, heads) for b in model.layers]
        self.blocks = list(model.layers)  # norms, router and shared expert are used whole
        self.route = expert_route(plan, cfg, self.role.replica, env.device)
        self._init_steps(cfg.num_layers, len(self.attn[0].kv_heads), model.embed.weight.dtype)
        self.stopped = False

    def finish(self) -> None:
        """Tell the expert ranks this replica is done (once; later calls do nothing)."""
        if not self.stopped and not self.in_step:  # mid-step (an error): peers see this rank exit
            self.stopped = True
            comm.send_stop(self.bridge, self.step, self.cfg.hidden_size, self._cache_shape[2], self.plan.microbatches)
        self.cache = None

    def _schedule(self, microbatches: int) -> list[Op]:
        return separated_schedule("attention", self.cfg.num_layers, microbatches)

    def _begin_step(self, mbs: list[MicroBatch]) -> None:
        """Announce the step: decode steps are padded (no host reads); each micro-batch's
        capacity follows from the replica's largest token slice."""
        padded = all(mb.ids.shape[1] == 1 for mb in mbs)
        rows = [-(-mb.ids.numel() // self.plan.attn_tp) for mb in mbs]
        self.layout = comm.attention_begin_step(self.bridge, self.step, rows, padded, self.cfg.hidden_size,
                                                self._cache_shape[2])

    def _handlers(self, mbs: list[MicroBatch]):
        return {ATTENTION: lambda op: self._attention(mbs[op.mb], op.layer, op.mb),
                DISPATCH: lambda op: self._dispatch(mbs[op.mb], op.layer, op.mb),
                COMBINE: lambda op: self._combine(mbs[op.mb], op.layer, op.mb),
                HEAD: lambda op: self._head(mbs[op.mb])}

    def _attention(self, mb: MicroBatch, layer: int, i: int) -> None:
        block, w = self.blocks[layer], mb.work
        part = self.attn[layer](block.attn_norm(mb.x), mb.positions, mb.cache, layer, mb.attend_len)
        if self.plan.attn_tp > 1:
            comm.replica_all_reduce(part, self.replica_group, self.env.timeout, self._where(layer, i))
        h = (mb.x + part).reshape(-1, self.cfg.hidden_size)
        w["slices"] = [len(r) for r in split_evenly(h.shape[0], self.plan.attn_tp)]
        start = sum(w["slices"][: self.role.index])
        w["h"] = h[start:start + w["slices"][self.role.index]]  # my token slice [n, H]
        w["z"] = block.moe_norm(w["h"])

    def _dispatch(self, mb: MicroBatch, layer: int, i: int) -> None:
        weights, ids = self.blocks[layer].moe.router(mb.work["z"])
        mb.work["handle"] = comm.dispatch(mb.work["z"], ids, weights, self.route, self.bridge, self.layout, layer,
                                          i)

    def _combine(self, mb: MicroBatch, layer: int, i: int) -> None:
        w = mb.work
        y = comm.combine(w["handle"], self.cfg.hidden_size, w["h"].dtype)
        shared = self.blocks[layer].moe.shared
        if shared is not None:
            y = y + shared(w["z"])
        x_slice = w["h"] + y
        if self.plan.attn_tp > 1:
            x_slice = comm.replica_all_gather_rows(x_slice, w["slices"], self.replica_group, self.env.timeout,
                                                   self._where(layer, i))
        mb.x = x_slice.view_as(mb.x)
        w.clear()

    def _head(self, mb: MicroBatch) -> None:
        mb.out = self.norm(mb.x)


# --- expert ranks -----------------------------------------------------------------------------
@dataclass
class ExpertStats:
    steps: int = 0
    load_LE: torch.Tensor | None = None  # [layers, num_experts] rows served per global expert


def serve_experts(model: MoETransformer, plan: SeparatedPlan, groups: SeparatedGroups, env: DistEnv,
                  timer: OpTimer | None = None, untimed_steps: int = 0) -> ExpertStats:
    """Answer every replica's bridge, step after step, until each has sent stop. The timer
    restarts after `untimed_steps` steps (a benchmark's warm-up, where NCCL builds its
    communicators on first use).

    Each step starts by reading every live replica's handshake (the one host read per step);
    the op list then runs without reading anything on the host, and the device-side header
    checks are read after it."""
    cfg = model.cfg
    timer = timer or OpTimer()
    my_experts = plan.expert_placement(cfg)[groups.role.index]
    experts = [shard_experts(b.moe.experts, cfg, my_experts) for b in model.layers]
    dtype = model.embed.weight.dtype
    stats = ExpertStats(load_LE=torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long))
    live = list(groups.bridges)
    ops = separated_schedule("expert", cfg.num_layers, plan.microbatches)
    while live:
        if stats.steps == untimed_steps:
            timer.busy_s.clear()
        layouts = [comm.expert_begin_step(b, stats.steps, plan.microbatches, cfg.hidden_size, dtype) for b in live]
        working = [(b, lay) for b, lay in zip(live, layouts) if lay.flags[0] != comm.FLAG_STOP]
        live = [b for b, _ in working]
        if not live:
            break
        with torch.inference_mode():
            loads = _serve_step(ops, working, experts, len(my_experts), cfg, dtype, timer)
        for bridge, layout in working:
            comm.end_step(layout, bridge)
        stats.load_LE[:, list(my_experts)] += loads.cpu()
        stats.steps += 1
    return stats


def _serve_step(ops: list[Op], working, experts, num_local: int, cfg: ModelConfig, dtype, timer: OpTimer):
    """One step's op list on an expert rank for the working bridges; rows served per
    (layer, local expert) [layers, L], left on the device."""
    batches: dict[tuple[int, int, int], comm.ExpertBatch] = {}
    outputs: dict[tuple[int, int, int], torch.Tensor] = {}
    pending = []
    loads = torch.zeros(cfg.num_layers, num_local, dtype=torch.long, device=experts[0].w_up.device)

    def recv(op: Op) -> None:
        for bi, (bridge, layout) in enumerate(working):
            got = comm.expert_receive(bridge, layout, num_local, cfg.hidden_size, dtype, op.layer, op.mb)
            batches[bi, op.layer, op.mb] = got
            loads[op.layer] += got.counts_L

    def run_experts(op: Op) -> None:
        for bi in range(len(working)):
            b = batches[bi, op.layer, op.mb]
            outputs[bi, op.layer, op.mb] = experts[op.layer].forward_sorted(b.x_NH, b.counts_L)

    def send(op: Op) -> None:
        for bi, (bridge, layout) in enumerate(working):
            b, y = batches.pop((bi, op.layer, op.mb)), outputs.pop((bi, op.layer, op.mb))
            pending.append(comm.expert_send(y, b, bridge, layout, op.layer, op.mb))

    execute(ops, timer.wrap({RECV: recv, EXPERTS: run_experts, SEND: send}), timer.record)
    for p in pending:
        comm.wait_sent(p)
    return loads
