"""Colocated expert parallelism (the DeepSeek / SGLang / vLLM baseline).

Every rank runs full attention over its own sequences (data parallel) and holds a share of
the experts. Per layer and micro-batch: attention -> router -> all-to-all dispatch among all
ranks -> local experts on what arrived -> all-to-all combine. With m = 2 the op list overlaps
one micro-batch's transfer with the other's compute (two-batch overlap).

A rank whose own sequences are done keeps serving its experts with empty micro-batches
(flag "idle") until every rank is idle, so no peer is left waiting in a collective.
A dense layer (DeepSeek's first layers) runs its MLP locally after attention: no all-to-all.
"""
from __future__ import annotations

import torch

from ..model import MoETransformer
from ..plan import EpPlan
from ..runtime import StepRows
from . import comm, routing
from .groups import DistEnv, EpGroups
from .schedule import ATTENTION, COMBINE, DISPATCH, EXPERTS, HEAD, MLP, Op, ep_schedule
from .parts import shard_experts
from .stepper import MicroBatch, MicroBatchRuntime, OpTimer


def ep_route(plan: EpPlan, cfg, rank: int, device) -> comm.ExpertRoute:
    """Serve an expert locally when this rank holds it, else from a holder chosen by rank."""
    holders = [plan.holder(cfg, e, rank) for e in range(cfg.num_experts)]
    return comm.ExpertRoute.build(plan.expert_placement(cfg), holders, 0, device)


class EpRuntime(MicroBatchRuntime):
    def __init__(self, model: MoETransformer, plan: EpPlan, groups: EpGroups, env: DistEnv,
                 timer: OpTimer | None = None, graphs: bool = False):
        cfg = self.cfg = model.cfg
        self.plan, self.env, self.device = plan, env, env.device
        self.bridge = groups.bridge
        self.timer = timer or OpTimer()
        self.embed, self.norm, self.lm_head = model.embed, model.norm, model.lm_head
        self.blocks = list(model.layers)  # attention, norms, router, shared expert: whole
        self.my_experts = plan.expert_placement(cfg)[env.rank]
        self.experts = [shard_experts(b.moe.experts, cfg, self.my_experts) if b.moe is not None else None
                        for b in model.layers]  # None: a dense layer (its MLP is whole in self.blocks)
        self.route = ep_route(plan, cfg, env.rank, env.device)
        self._init_steps(cfg.num_layers, cfg.num_kv_heads, model.embed.weight.dtype, graphs)
        self.heads = comm.StepHeads(cfg.num_layers, plan.microbatches, env.device)
        self.idle = False  # no sequences of our own: empty micro-batches, flag idle
        self.all_idle = False
        self.stopped = False
        # rows served per (layer, local expert), kept on the device during the run
        self.load_dev = torch.zeros(cfg.num_layers, len(self.my_experts), dtype=torch.long, device=env.device)
        self.layout: comm.StepLayout | None = None

    def finish(self) -> None:
        """Serve the other ranks' experts with empty micro-batches until every rank is idle."""
        if self.stopped or self.in_step:  # mid-step (an error): peers see this rank exit
            return
        self.idle = True
        if self.cache is None:  # never started (no sequences at all): serve the others anyway
            self.start(0, 1)
        while not self.all_idle:
            self.forward(StepRows.empty())
        self.stopped, self.cache = True, None

    def forward(self, rows: StepRows, step_id: int | None = None):
        """A step with no rows serves the other ranks' experts (flag idle)."""
        self.idle = len(rows) == 0
        return super().forward(rows, step_id)

    @property
    def load_LE(self) -> torch.Tensor:
        """Rows served per (layer, global expert) [layers, num_experts] (a host read)."""
        load = torch.zeros(self.cfg.num_layers, self.cfg.num_experts, dtype=torch.long)
        load[:, list(self.my_experts)] = self.load_dev.cpu()
        return load

    def _schedule(self, microbatches: int) -> list[Op]:
        return ep_schedule(self.cfg.num_layers, microbatches, self.cfg.first_dense_layers)

    def _begin_step(self, mbs: list[MicroBatch]) -> None:
        """Agree on the step with every EP rank (the one host read per step), after reading the
        previous step's device-side header checks (complete by now: its logits were read)."""
        if self.layout is not None:
            comm.end_step(self.layout, self.bridge)
        padded = self.decoding
        self.layout = comm.ep_begin_step(self.bridge, self.step, [mb.ids.numel() for mb in mbs], padded,
                                         self.cfg.hidden_size, self._cache_shape[2], self.idle)
        self.all_idle = all(f == comm.FLAG_IDLE for f in self.layout.flags)
        if padded:
            self.heads.set_step(self.step)

    def _handlers(self, mbs: list[MicroBatch]):
        def guard(fn):  # once all ranks are idle the rest of the step is skipped everywhere
            return lambda op: None if self.all_idle else fn(mbs[op.mb], op.layer, op.mb)
        return {ATTENTION: guard(self._attention), DISPATCH: guard(self._dispatch),
                EXPERTS: guard(self._experts), COMBINE: guard(self._combine_launch),
                HEAD: guard(lambda mb, layer, i: self._head(mb, i)), MLP: guard(self._mlp)}

    def _logits(self, out, rows_B, index_B):
        if rows_B.numel() == 0:
            return torch.zeros(0, self.cfg.vocab_size, device=self.device)
        return super()._logits(out, rows_B, index_B)

    def _settle(self, mb: MicroBatch, layer: int):
        """(fn, inputs) that finish the previous layer's MoE for this micro-batch: residual +
        weighted expert outputs (+ shared expert) -> the residual stream [X, H]; nothing to
        finish at layer 0."""
        w = mb.work
        if "exchange" not in w:
            return (lambda x: x.reshape(-1, self.cfg.hidden_size)), (mb.x,)
        handle = w.pop("exchange")
        back, sent = comm.ep_receive_back(handle), handle.sent
        shared, n = self.blocks[layer].moe.shared, mb.x.shape[0] * mb.x.shape[1]

        def settle(back, pos, token, weight, h, z):
            y = routing.gather(back, pos, token, weight, n)
            return h + (y + shared(z) if shared is not None and n else y)

        return settle, (back, sent.pos_R, sent.rows.token_R, sent.rows.weight_R, w["h"], w["z"])

    def _attention(self, mb: MicroBatch, layer: int, i: int) -> None:
        """The previous layer's combine, attention over this rank's sequences, the MoE norm and
        the router; in a padded step also the blocks for every rank."""
        if self.blocks[layer].moe is None:
            return self._dense_attention(mb, layer, i)
        block, w, shape = self.blocks[layer], mb.work, mb.x.shape
        settle, settle_in = self._settle(mb, layer - 1) if layer > 0 else self._settle(mb, -1)
        attend, cache, padded = self._attend_len(mb), mb.cache, self.layout.padded
        cap = self.layout.caps[i] if padded else 0

        def run(positions, head_4, *prev):
            x = settle(*prev).view(shape)
            h = x + block.attn(block.attn_norm(x), positions, cache, layer, attend) if shape[0] else x
            h = h.reshape(-1, self.cfg.hidden_size)
            z = block.moe_norm(h)
            weights, ids = block.moe.router(z)
            if not padded:
                return h, z, (weights, ids)
            return h, z, comm.ep_pack(z, ids, weights, self.route, self.bridge, self.layout, i, head_4)

        w["h"], w["z"], w["routed"] = self._segment(("attention", layer, i, attend, cap), run, mb.positions,
                                                    self.heads.get(layer, i), *settle_in)

    def _dense_attention(self, mb: MicroBatch, layer: int, i: int) -> None:
        """A dense layer's attention (dense layers come first: no previous combine to settle)."""
        block, shape, attend, cache = self.blocks[layer], mb.x.shape, self._attend_len(mb), mb.cache

        def run(x, positions):
            return x + block.attn(block.attn_norm(x), positions, cache, layer, attend) if shape[0] else x

        mb.work["h"] = self._segment(("attention", layer, i, attend), run, mb.x, mb.positions)

    def _mlp(self, mb: MicroBatch, layer: int, i: int) -> None:
        """A dense layer's MLP on this rank's own tokens, with the residual."""
        block = self.blocks[layer]
        mb.x = self._segment(("mlp", layer, i), lambda h: h + block.mlp(block.moe_norm(h)), mb.work.pop("h"))

    def _dispatch(self, mb: MicroBatch, layer: int, i: int) -> None:
        w, num_local = mb.work, len(self.my_experts)
        if self.layout.padded:
            w["exchange"] = comm.ep_send_packed(w.pop("routed"), self.bridge, self.layout, layer, i, w["h"].shape[0])
        else:
            weights, ids = w.pop("routed")
            w["exchange"] = comm.ep_dispatch(w["z"], ids, weights, self.route, self.bridge, self.layout, num_local,
                                             layer, i)

    def _experts(self, mb: MicroBatch, layer: int, i: int) -> None:
        handle, experts = mb.work["exchange"], self.experts[layer]
        if not self.layout.padded:
            got = comm.ep_received(handle)
            self.load_dev[layer] += got.counts_L
            mb.work["y"] = experts.forward_sorted(got.x_NH, got.counts_L)
            return
        hdr, maxl, num_local = self.layout.header_rows, self.bridge.max_local_experts, len(self.my_experts)

        def serve(blocks, head_4):
            return routing.serve_blocks(blocks, experts.forward_sorted, hdr, maxl, num_local, head_4)

        back, counts, bad = self._segment(("experts", layer, i, hdr), serve, comm.ep_receive_blocks(handle),
                                          self.heads.get(layer, i))
        self.layout.checks.append((layer, i, 0, bad))
        self.load_dev[layer] += counts
        mb.work["y"] = back

    def _combine_launch(self, mb: MicroBatch, layer: int, i: int) -> None:
        handle, y = mb.work["exchange"], mb.work.pop("y")
        if self.layout.padded:
            comm.ep_send_back(handle, y)
        else:
            comm.ep_combine_launch(handle, y)

    def _head(self, mb: MicroBatch, i: int) -> None:
        settle, settle_in = self._settle(mb, self.cfg.num_layers - 1)
        mb.out = self._segment(("head", i), lambda *prev: self.norm(settle(*prev).view(mb.x.shape)), *settle_in)
