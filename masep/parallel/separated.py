"""MA separation: attention ranks and expert ranks run different op lists, micro-batches ping-pong.

An attention rank is a `Runtime` (the engine drives it like the single-device model) over its
replica's sequences and its slice of heads. An expert rank runs `serve_experts`, a loop that
answers every replica's bridge until each one says stop.

Per layer and micro-batch on an attention rank (replica of T head-parallel ranks):
  attention: x [b, t, H] -> partial attention of local heads -> all-reduce in replica -> h
             z = moe_norm(h); router(z) -> ids, weights [b*t, k]
  dispatch:  this rank's slice of the b*t tokens (split_evenly over T) goes to the expert ranks
  combine:   expert outputs for the slice -> h_slice + y (+ shared expert) -> all-gather -> x
A dense layer (DeepSeek's first layers) has attention, then `mlp`: every rank of the replica
runs the whole MLP on the whole micro-batch; nothing crosses the bridge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ModelConfig
from ..errors import error_line
from ..model import MoETransformer
from ..plan import SeparatedPlan, split_evenly
from . import comm, routing
from .groups import DistEnv, SeparatedGroups
from .parts import shard_attention, shard_experts
from .graphs import SegmentGraphs
from .schedule import (ATTENTION, COMBINE, DISPATCH, EXPERTS, HEAD, MLP, RECV, SEND, Op, execute,
                       separated_schedule)
from .stepper import MicroBatch, MicroBatchRuntime, OpTimer


def expert_route(plan: SeparatedPlan, cfg: ModelConfig, replica: int, device) -> comm.ExpertRoute:
    """Bridge member and local index serving each expert for `replica` (attention ranks come first)."""
    holders = [plan.holder(cfg, e, replica) for e in range(cfg.num_experts)]
    return comm.ExpertRoute.build(plan.expert_placement(cfg), holders, plan.attn_tp, device)


class SeparatedAttentionRuntime(MicroBatchRuntime):
    """The attention side of MA separation as an engine `Runtime` for one replica's sequences."""

    def __init__(self, model: MoETransformer, plan: SeparatedPlan, groups: SeparatedGroups, env: DistEnv,
                 timer: OpTimer | None = None, graphs: bool = False):
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
        self._init_steps(cfg.num_layers, len(self.attn[0].kv_heads), model.embed.weight.dtype, graphs)
        self.heads = comm.StepHeads(cfg.num_layers, plan.microbatches, env.device)
        self.fallback = groups.fallback
        self.stopped = False

    def drop_expert_rank(self, x: int) -> None:
        """Route around dead expert-group index x: this replica's bridge without it (built at
        start-up), each of its experts served by another holder. A step that failed when it
        died is abandoned (the front end runs it again: it rewrites the same KV positions)."""
        replica = self.role.replica
        if self.bridge.group is not None:  # this replica's step went through: give the old bridge up now
            comm.abandon_bridge(self.bridge)
        self.bridge = self.fallback[replica, x]
        placement = [p for i, p in enumerate(self.plan.expert_placement(self.cfg)) if i != x]
        holders = [self.plan.holder(self.cfg, e, replica, without=x) for e in range(self.cfg.num_experts)]
        self.route = comm.ExpertRoute.build(placement, [g - (g > x) for g in holders], self.plan.attn_tp,
                                            self.device)
        self.graphs.clear()  # segment graphs bake in the old bridge's shapes
        self.in_step = False

    def use_groups(self, groups: SeparatedGroups) -> None:
        """Serve over the groups of a re-formed world (an expert rank was replaced): the same
        members as at start-up, so the route is the plan's again; the KV cache stays."""
        self.bridge, self.replica_group, self.fallback = groups.bridges[0], groups.replica_group, groups.fallback
        self.route = expert_route(self.plan, self.cfg, self.role.replica, self.device)
        self.graphs.clear()  # segment graphs bake in the old groups
        self.in_step = False

    def finish(self) -> None:
        """Tell the expert ranks this replica is done (once; later calls do nothing)."""
        if not self.stopped and not self.in_step:  # mid-step (an error): peers see this rank exit
            self.stopped = True
            comm.send_stop(self.bridge, self.step, self.cfg.hidden_size, self._cache_shape[2], self.plan.microbatches)
        self.cache = None

    def _schedule(self, microbatches: int) -> list[Op]:
        return separated_schedule("attention", self.cfg.num_layers, microbatches, self.cfg.first_dense_layers)

    def _begin_step(self, mbs: list[MicroBatch]) -> None:
        """Announce the step: decode steps are padded (no host reads); each micro-batch's
        capacity follows from the replica's largest token slice."""
        padded = self.decoding
        rows = [-(-mb.ids.numel() // self.plan.attn_tp) for mb in mbs]
        self.layout = comm.attention_begin_step(self.bridge, self.step, rows, padded, self.cfg.hidden_size,
                                                self._cache_shape[2])
        if padded:
            self.heads.set_step(self.step)

    def _handlers(self, mbs: list[MicroBatch]):
        return {ATTENTION: lambda op: self._attention(mbs[op.mb], op.layer, op.mb),
                DISPATCH: lambda op: self._dispatch(mbs[op.mb], op.layer, op.mb),
                COMBINE: lambda op: self._combine(mbs[op.mb], op.layer, op.mb),
                HEAD: lambda op: self._head(mbs[op.mb], op.mb),
                MLP: lambda op: self._mlp(mbs[op.mb], op.layer, op.mb)}

    def _attention(self, mb: MicroBatch, layer: int, i: int) -> None:
        """Attention, the replica's all-reduce, then this rank's token slice through the MoE
        norm and the router; in a padded step also the blocks for the expert ranks."""
        if self.blocks[layer].moe is None:
            return self._dense_attention(mb, layer, i)
        block, attn, w, t = self.blocks[layer], self.attn[layer], mb.work, self.plan.attn_tp
        attend, cache = self._attend_len(mb), mb.cache
        w["slices"] = [len(r) for r in split_evenly(mb.ids.numel(), t)]
        start, n = sum(w["slices"][: self.role.index]), w["slices"][self.role.index]
        padded, cap = self.layout.padded, (self.layout.caps[i] if self.layout.padded else 0)

        def attention(x, positions):
            return attn(block.attn_norm(x), positions, cache, layer, attend)

        def route(x, part, head_4):
            h = (x + part).reshape(-1, self.cfg.hidden_size)[start:start + n]
            z = block.moe_norm(h)
            weights, ids = block.moe.router(z)
            if not padded:
                return h, z, (weights, ids)
            return h, z, comm.pack_for_experts(z, ids, weights, self.route, self.bridge, self.layout, i, head_4)

        head_4 = self.heads.get(layer, i)
        if t == 1:  # nothing to sum: attention and routing are one segment
            w["h"], w["z"], w["routed"] = self._segment(
                ("attention+route", layer, i, attend, cap),
                lambda x, positions, head: route(x, attention(x, positions), head), mb.x, mb.positions, head_4)
            return
        part = self._segment(("attention", layer, i, attend), attention, mb.x, mb.positions)
        comm.replica_all_reduce(part, self.replica_group, self.env.timeout, self._where(layer, i))
        w["h"], w["z"], w["routed"] = self._segment(("route", layer, i, cap), route, mb.x, part, head_4)

    def _dense_attention(self, mb: MicroBatch, layer: int, i: int) -> None:
        """A dense layer's attention and the replica's all-reduce of it (partial [b, t, H])."""
        block, attn, attend, cache = self.blocks[layer], self.attn[layer], self._attend_len(mb), mb.cache
        part = self._segment(("attention", layer, i, attend),
                             lambda x, positions: attn(block.attn_norm(x), positions, cache, layer, attend),
                             mb.x, mb.positions)
        if self.plan.attn_tp > 1:
            comm.replica_all_reduce(part, self.replica_group, self.env.timeout, self._where(layer, i))
        mb.work["attention"] = part

    def _mlp(self, mb: MicroBatch, layer: int, i: int) -> None:
        """A dense layer's MLP on the whole micro-batch, on every rank of the replica (each has
        all its tokens: no gather), with both residuals."""
        block = self.blocks[layer]

        def mlp(x, part):
            h = x + part
            return h + block.mlp(block.moe_norm(h))

        mb.x = self._segment(("mlp", layer, i), mlp, mb.x, mb.work.pop("attention"))

    def _dispatch(self, mb: MicroBatch, layer: int, i: int) -> None:
        w = mb.work
        if self.layout.padded:
            w["handle"] = comm.send_packed(w["routed"], self.bridge, self.layout, layer, i, w["h"].shape[0])
        else:
            weights, ids = w["routed"]
            w["handle"] = comm.dispatch(w["z"], ids, weights, self.route, self.bridge, self.layout, layer, i)

    def _combine(self, mb: MicroBatch, layer: int, i: int) -> None:
        """Expert outputs back, weighted per token, plus the shared expert and the residual; the
        replica's slices gathered into the whole micro-batch."""
        w, handle = mb.work, mb.work["handle"]
        shared, n = self.blocks[layer].moe.shared, w["h"].shape[0]
        out = comm.receive_outputs(handle, self.cfg.hidden_size, w["h"].dtype)

        def settle(out, pos, token, weight, h, z):
            y = routing.gather(out, pos, token, weight, n)
            return h + (y + shared(z) if shared is not None else y)

        x_slice = self._segment(("combine", layer, i), settle, out, handle.pos_R, handle.rows.token_R,
                                handle.rows.weight_R, w["h"], w["z"])
        if self.plan.attn_tp > 1:
            x_slice = comm.replica_all_gather_rows(x_slice, w["slices"], self.replica_group, self.env.timeout,
                                                   self._where(layer, i))
        mb.x = x_slice.view_as(mb.x)
        w.clear()

    def _head(self, mb: MicroBatch, i: int) -> None:
        mb.out = self._segment(("head", i), self.norm, mb.x)


# --- expert ranks -----------------------------------------------------------------------------
@dataclass
class ExpertStats:
    steps: int = 0
    load_LE: torch.Tensor | None = None  # [layers, num_experts] rows served per global expert


def serve_experts(model: MoETransformer, plan: SeparatedPlan, groups: SeparatedGroups, env: DistEnv,
                  timer: OpTimer | None = None, untimed_steps: int = 0, graphs: bool = False,
                  on_timed: Callable[[], None] | None = None) -> ExpertStats:
    """Answer every replica's bridge, step after step, until each has sent stop. The timer
    restarts after `untimed_steps` steps (a benchmark's warm-up, where NCCL builds its
    communicators on first use), and `on_timed()` is called then (a benchmark starts its energy
    reading).

    Each step starts by reading every live replica's handshake (the one host read per step);
    the op list then runs without reading anything on the host (padded steps; with `graphs`
    each transfer's expert compute is replayed from a CUDA graph), and the device-side header
    checks are read after it."""
    cfg = model.cfg
    timer = timer or OpTimer()
    server = _ExpertServer(model, plan, groups, env, graphs)
    stats = ExpertStats(load_LE=torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long))
    live = list(groups.bridges)
    ops = separated_schedule("expert", cfg.num_layers, plan.microbatches, cfg.first_dense_layers)
    while live:
        if stats.steps == untimed_steps:
            timer.busy_s.clear()
            if on_timed is not None:
                on_timed()
        layouts = [comm.expert_begin_step(b, stats.steps, plan.microbatches, cfg.hidden_size, server.dtype)
                   for b in live]
        working = [(b, lay) for b, lay in zip(live, layouts) if lay.flags[0] != comm.FLAG_STOP]
        live = [b for b, _ in working]
        if not live:
            break
        with torch.inference_mode():
            loads = server.step(ops, working, stats.steps, timer)
        for bridge, layout in working:
            comm.end_step(layout, bridge)
        stats.load_LE[:, list(server.my_experts)] += loads.cpu()
        stats.steps += 1
    return stats


def guarded(failed: dict[int, str], key: int, fn, *args) -> None:
    """fn(*args); a transfer error (gloo/NCCL raise RuntimeError subclasses; ours is CommError)
    is recorded as failed[key] instead of raised."""
    try:
        fn(*args)
    except RuntimeError as err:
        failed[key] = error_line(err)


class _ExpertServer:
    """An expert rank's state across steps: its experts, the step headers, the CUDA graphs."""

    def __init__(self, model: MoETransformer, plan: SeparatedPlan, groups: SeparatedGroups, env: DistEnv,
                 graphs: bool):
        self.cfg = cfg = model.cfg
        self.my_experts = plan.expert_placement(cfg)[groups.role.index]
        self.experts = [shard_experts(b.moe.experts, cfg, self.my_experts) if b.moe is not None else None
                        for b in model.layers]  # None: a dense layer, served by the attention ranks
        self.dtype = model.embed.weight.dtype
        self.device = env.device
        self.heads = comm.StepHeads(cfg.num_layers, plan.microbatches, env.device)
        self.graphs = SegmentGraphs(graphs, env.device)

    def step(self, ops: list[Op], working, step: int, timer: OpTimer, failed: dict[int, str] | None = None
             ) -> torch.Tensor:
        """One step's op list for the working bridges; rows served per (layer, local expert)
        [layers, L], left on the device.

        failed: None = a failed transfer raises (the whole rank fails). A dict = failure
        isolation: a bridge whose transfer fails (its replica died or stopped answering) is
        recorded there (index into `working` -> why) and skipped for the rest of the step,
        while the other replicas' bridges, separate groups, carry on."""
        cfg, num_local = self.cfg, len(self.my_experts)
        batches: dict[tuple[int, int, int], object] = {}
        outputs: dict[tuple[int, int, int], object] = {}
        pending = []
        loads = torch.zeros(cfg.num_layers, num_local, dtype=torch.long, device=self.device)
        self.heads.set_step(step)

        def each(fn) -> None:
            for bi, (bridge, layout) in enumerate(working):
                if failed is None:
                    fn(bi, bridge, layout)
                elif bi not in failed:
                    guarded(failed, bi, fn, bi, bridge, layout)

        def recv_one(bi, bridge, layout, op: Op) -> None:  # padded: post only; run_experts waits
            if layout.padded:
                got = comm.expert_receive_blocks(bridge, layout, cfg.hidden_size, self.dtype, op.layer, op.mb)
            else:
                got = comm.expert_receive(bridge, layout, num_local, cfg.hidden_size, self.dtype, op.layer, op.mb)
                loads[op.layer] += got.counts_L
            batches[bi, op.layer, op.mb] = got

        def experts_one(bi, bridge, layout, op: Op) -> None:
            got = batches[bi, op.layer, op.mb]
            if layout.padded:
                back, counts, bad = self._serve(bi, bridge, layout, comm.blocks_arrived(got), op.layer, op.mb)
                layout.checks.append((op.layer, op.mb, 0, bad))
                loads[op.layer] += counts
                outputs[bi, op.layer, op.mb] = back
            else:
                outputs[bi, op.layer, op.mb] = self.experts[op.layer].forward_sorted(got.x_NH, got.counts_L)

        def send_one(bi, bridge, layout, op: Op) -> None:
            got, y = batches.pop((bi, op.layer, op.mb)), outputs.pop((bi, op.layer, op.mb))
            if layout.padded:
                pending.append((bi, comm.expert_send_back(y, bridge, layout, op.layer, op.mb)))
            else:
                pending.append((bi, comm.expert_send(y, got, bridge, layout, op.layer, op.mb)))

        handlers = {kind: (lambda fn: lambda op: each(lambda bi, b, lay: fn(bi, b, lay, op)))(fn)
                    for kind, fn in ((RECV, recv_one), (EXPERTS, experts_one), (SEND, send_one))}
        execute(ops, timer.wrap(handlers), timer.record)
        for bi, p in pending:
            if failed is None:
                comm.wait_sent(p)
            elif bi not in failed:
                guarded(failed, bi, comm.wait_sent, p)
        return loads

    def _serve(self, bi: int, bridge, layout, blocks_SBH: torch.Tensor, layer: int, mb: int):
        """(outputs [A, C, H], rows per local expert, bad senders) for one padded transfer."""
        experts, hdr = self.experts[layer], layout.header_rows

        def serve(blocks, head_4):
            return routing.serve_blocks(blocks, experts.forward_sorted, hdr, bridge.max_local_experts,
                                        len(self.my_experts), head_4)

        if blocks_SBH.shape[1] == hdr:  # no rows can come (an empty micro-batch): headers only, eagerly
            return serve(blocks_SBH, self.heads.get(layer, mb))
        key = ("experts", bi, layer, mb, hdr, tuple(blocks_SBH.shape))
        return self.graphs.run(key, serve, blocks_SBH, self.heads.get(layer, mb))
