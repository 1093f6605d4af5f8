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

import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..model import Attention, Experts, KVCache, MoETransformer
from ..plan import SeparatedPlan, split_evenly
from . import comm
from .groups import DistEnv, SeparatedGroups
from .schedule import (ATTENTION, COMBINE, DISPATCH, EXPERTS, HEAD, RECV, SEND, Op, execute,
                       separated_schedule)


class OpTimer:
    """Per-op wall times (busy time per kind) and optional profiler labels for --trace."""

    def __init__(self, label_ops: bool = False):
        self.busy_s: dict[str, float] = defaultdict(float)
        self.label_ops = label_ops

    def record(self, op: Op, start: float, end: float) -> None:
        self.busy_s[op.kind] += end - start

    def label(self, op: Op):
        if not self.label_ops:
            return nullcontext()
        return torch.profiler.record_function(str(op))


def shard_attention(full: Attention, cfg: ModelConfig, heads: range) -> Attention:
    """A head-parallel slice of `full`: q/o for `heads`, k/v for the KV heads they read."""
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


def shard_experts(full: Experts, cfg: ModelConfig, expert_ids) -> Experts:
    part = Experts(cfg, expert_ids, device=full.w_up.device, dtype=full.w_up.dtype)
    idx = torch.tensor(list(expert_ids), device=full.w_up.device)
    with torch.no_grad():
        for name in ("w_gate", "w_up", "w_down"):
            if getattr(full, name) is not None:
                getattr(part, name).copy_(getattr(full, name)[idx])
    return part


def expert_route(plan: SeparatedPlan, cfg: ModelConfig, replica: int, device) -> comm.ExpertRoute:
    placement = plan.expert_placement(cfg)
    member, local = [], []
    for e in range(cfg.num_experts):
        holder = plan.holder(cfg, e, replica)
        member.append(plan.attn_tp + holder)
        local.append(placement[holder].index(e))
    return comm.ExpertRoute(torch.tensor(member, device=device), torch.tensor(local, device=device))


@dataclass
class _MicroBatch:
    """State of one micro-batch on an attention rank while it moves through the layers."""

    x: torch.Tensor  # [b, t, H] residual stream (replicated in the replica)
    positions: torch.Tensor  # [b, t]
    cache: KVCache  # view of the replica cache rows of this micro-batch
    attend_len: int
    h_slice: torch.Tensor | None = None  # [n, H] residual after attention, my token slice
    z_slice: torch.Tensor | None = None  # [n, H] normalised input of the MoE, my token slice
    handle: comm.DispatchHandle | None = None
    slices: list[int] = field(default_factory=list)  # tokens per head-parallel rank
    out: torch.Tensor | None = None  # [b, t, H] after the final norm


class SeparatedAttentionRuntime:
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
        self.num_kv = len(self.attn[0].kv_heads)
        self.cache: KVCache | None = None
        self.step = 0
        self.stopped = False
        self.in_step = False

    # --- Runtime interface ------------------------------------------------------------------
    def start(self, batch: int, max_len: int) -> None:
        c = self.cfg
        self.cache = KVCache.empty(c.num_layers, batch, self.num_kv, max_len, c.head_dim,
                                   self.embed.weight.dtype, self.device)

    @torch.inference_mode()
    def prefill(self, input_ids_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        b, t = input_ids_BT.shape
        ids = input_ids_BT.to(self.device)
        positions = torch.arange(t, device=self.device).expand(b, t)
        if self.plan.seq_split:
            chunks = [r for r in split_evenly(t, self.plan.microbatches)]
            mbs = [self._mb(ids[:, r], positions[:, r], slice(0, b), r.stop) for r in chunks]
            out = torch.cat([mb.out for mb in self._run(mbs)], dim=1)
        else:
            rows = split_evenly(b, self.plan.microbatches)
            mbs = [self._mb(ids[r.start:r.stop], positions[r.start:r.stop], slice(r.start, r.stop), t)
                   for r in rows]
            out = torch.cat([mb.out for mb in self._run(mbs)], dim=0)
        last = lengths_B.to(self.device) - 1
        return self.lm_head(out[torch.arange(b, device=self.device), last]).float()

    @torch.inference_mode()
    def decode(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, attend_len: int) -> torch.Tensor:
        tokens, positions = tokens_B.to(self.device)[:, None], positions_B.to(self.device)[:, None]
        rows = split_evenly(tokens.shape[0], self.plan.microbatches)
        mbs = [self._mb(tokens[r.start:r.stop], positions[r.start:r.stop], slice(r.start, r.stop), attend_len)
               for r in rows]
        out = torch.cat([mb.out for mb in self._run(mbs)], dim=0)
        return self.lm_head(out[:, 0]).float()

    def finish(self) -> None:
        """Tell the expert ranks this replica is done (once; later calls do nothing)."""
        if not self.stopped and not self.in_step:  # mid-step (an error): peers see this rank exit
            self.stopped = True
            comm.send_stop(self.bridge, self.step)
        self.cache = None

    # --- one step -----------------------------------------------------------------------------
    def _mb(self, ids_bt, positions_bt, rows: slice, attend_len: int) -> _MicroBatch:
        view = KVCache([k[rows] for k in self.cache.k], [v[rows] for v in self.cache.v])
        return _MicroBatch(self.embed(ids_bt), positions_bt, view, attend_len)

    def _run(self, mbs: list[_MicroBatch]) -> list[_MicroBatch]:
        handlers = {ATTENTION: lambda op: self._attention(mbs[op.mb], op.layer, op.mb),
                    DISPATCH: lambda op: self._dispatch(mbs[op.mb], op.layer, op.mb),
                    COMBINE: lambda op: self._combine(mbs[op.mb], op.layer, op.mb),
                    HEAD: lambda op: self._head(mbs[op.mb])}
        ops = separated_schedule("attention", self.cfg.num_layers, len(mbs))
        labelled = {k: self._labelled(fn) for k, fn in handlers.items()}
        self.in_step = True
        execute(ops, labelled, self.timer.record)
        self.in_step = False
        self.step += 1
        return mbs

    def _labelled(self, fn):
        def run(op):
            with self.timer.label(op):
                fn(op)
        return run

    def _where(self, layer: int, mb: int) -> str:
        return f"rank {self.env.rank}: step {self.step}, layer {layer}, micro-batch {mb}"

    def _attention(self, mb: _MicroBatch, layer: int, i: int) -> None:
        block = self.blocks[layer]
        part = self.attn[layer](block.attn_norm(mb.x), mb.positions, mb.cache, layer, mb.attend_len)
        if self.plan.attn_tp > 1:
            comm.replica_all_reduce(part, self.replica_group, self.env.timeout, self._where(layer, i))
        h = (mb.x + part).reshape(-1, self.cfg.hidden_size)
        mb.slices = [len(r) for r in split_evenly(h.shape[0], self.plan.attn_tp)]
        start = sum(mb.slices[: self.role.index])
        mine = slice(start, start + mb.slices[self.role.index])
        mb.h_slice = h[mine]
        mb.z_slice = block.moe_norm(mb.h_slice)

    def _dispatch(self, mb: _MicroBatch, layer: int, i: int) -> None:
        weights, ids = self.blocks[layer].moe.router(mb.z_slice)
        mb.handle = comm.dispatch(mb.z_slice, ids, weights, self.route, self.bridge, self.step, layer, i)

    def _combine(self, mb: _MicroBatch, layer: int, i: int) -> None:
        y = comm.combine(mb.handle, self.cfg.hidden_size, mb.h_slice.dtype)
        shared = self.blocks[layer].moe.shared
        if shared is not None:
            y = y + shared(mb.z_slice)
        x_slice = mb.h_slice + y
        if self.plan.attn_tp > 1:
            x_slice = comm.replica_all_gather_rows(x_slice, mb.slices, self.replica_group, self.env.timeout,
                                                   self._where(layer, i))
        mb.x = x_slice.view_as(mb.x)
        mb.handle = mb.h_slice = mb.z_slice = None

    def _head(self, mb: _MicroBatch) -> None:
        mb.out = self.norm(mb.x)


# --- expert ranks -----------------------------------------------------------------------------
@dataclass
class ExpertStats:
    steps: int = 0
    load_LE: torch.Tensor | None = None  # [layers, num_experts] rows served per global expert


def serve_experts(model: MoETransformer, plan: SeparatedPlan, groups: SeparatedGroups, env: DistEnv,
                  timer: OpTimer | None = None) -> ExpertStats:
    """Answer every replica's bridge, step after step, until each has sent stop."""
    cfg = model.cfg
    timer = timer or OpTimer()
    my_experts = plan.expert_placement(cfg)[groups.role.index]
    experts = [shard_experts(b.moe.experts, cfg, my_experts) for b in model.layers]
    dtype = model.embed.weight.dtype
    stats = ExpertStats(load_LE=torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long))
    live = list(groups.bridges)
    ops = separated_schedule("expert", cfg.num_layers, plan.microbatches)
    while live:
        batches: dict[tuple[int, int, int], comm.ExpertBatch] = {}
        outputs: dict[tuple[int, int, int], torch.Tensor] = {}
        pending, stopped = [], set()

        def recv(op: Op) -> None:
            for bi, bridge in enumerate(live):
                if bi in stopped:
                    continue
                got = comm.expert_receive(bridge, len(my_experts), cfg.hidden_size, dtype, stats.steps,
                                          op.layer, op.mb)
                if got.stop:
                    if (op.layer, op.mb) != (0, 0):
                        raise comm.CommError(bridge.where("stop request", stats.steps, op.layer, op.mb)
                                             + ": a replica may only stop between steps")
                    stopped.add(bi)
                    continue
                batches[bi, op.layer, op.mb] = got
                stats.load_LE[op.layer, my_experts] += got.counts_L.cpu()

        def run_experts(op: Op) -> None:
            for bi in range(len(live)):
                if (bi, op.layer, op.mb) in batches:
                    b = batches[bi, op.layer, op.mb]
                    outputs[bi, op.layer, op.mb] = experts[op.layer].forward_sorted(b.x_NH, b.counts_L)

        def send(op: Op) -> None:
            for bi, bridge in enumerate(live):
                if (bi, op.layer, op.mb) in batches:
                    b = batches.pop((bi, op.layer, op.mb))
                    y = outputs.pop((bi, op.layer, op.mb))
                    pending.append(comm.expert_send(y, b, bridge, stats.steps, op.layer, op.mb))

        def labelled(fn):
            def run(op):
                with timer.label(op):
                    fn(op)
            return run

        with torch.inference_mode():
            execute(ops, {RECV: labelled(recv), EXPERTS: labelled(run_experts), SEND: labelled(send)},
                    timer.record)
        for p in pending:
            comm.wait_sent(p)
        live = [b for bi, b in enumerate(live) if bi not in stopped]
        if len(stopped) < len(groups.bridges):
            stats.steps += 1
    return stats
