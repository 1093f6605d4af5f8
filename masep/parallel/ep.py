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
from . import comm
from .dispatcher import EpDispatcher, weighted_sum
from .groups import DistEnv, EpGroups
from .schedule import ATTENTION, COMBINE, DISPATCH, EXPERTS, HEAD, MLP, Op, ep_schedule
from .parts import shard_experts
from .stepper import MicroBatch, MicroBatchRuntime, OpTimer, dense_decode_rows, microbatch_rows


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
        self._init_steps(cfg.num_layers, cfg.num_kv_heads, model.dtype, graphs)
        self.dispatcher = EpDispatcher(self.bridge, self.route, cfg, plan.expert_placement(cfg), plan.microbatches,
                                       model.dtype, env.device, len(self.my_experts))
        self.idle = False  # no sequences of our own: empty micro-batches, flag idle
        self._graph_checks: dict = {}  # whole-step graph key -> its header verdicts
        self.all_idle = False
        self.stopped = False
        # rows served per (layer, local expert), kept on the device during the run
        self.load_dev = torch.zeros(cfg.num_layers, len(self.my_experts), dtype=torch.long, device=env.device)

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
        """A step with no rows serves the other ranks' experts (flag idle). A decode step that
        says the largest EP rank's rows (`rows.peer_rows`) sizes its blocks from them, as every
        rank does, and skips the handshake: it reads nothing on the host, so with graphs it is
        replayed whole (one CUDA graph: compute, all-to-alls, logits)."""
        self.idle = len(rows) == 0
        self._take_peer_rows(rows, "the largest EP rank's rows, the same on every rank")
        return super().forward(rows, step_id)

    @property
    def whole_step_graphs(self) -> bool:
        return self.peer_rows is not None

    def _agreed_rows(self) -> list[int]:
        """Rows per micro-batch of the step: every rank computes the same (_dense_rows)."""
        return microbatch_rows(self._agreed_count(), self.plan.microbatches)

    def _agreed_count(self) -> int:
        return dense_decode_rows(self.peer_rows, self.cache.num_slots, self.graphs.enabled)

    def _dense_rows(self, rows: StepRows) -> int | None:
        """A decode step told the largest rank's rows runs that many rows on every rank (its own
        padded with empty ones): every rank then has the same shapes, so every rank captures a
        whole-step graph at the same step, and a capture's eager warm-up runs its collectives
        on all of them alike (the EP ranks' caches have the same number of slots)."""
        if rows.is_decode and self.peer_rows is not None:
            return self._agreed_count()
        return super()._dense_rows(rows)

    def _step_graph_key(self) -> tuple:
        lay = self.dispatcher.begin_agreed_step(self.step, self._agreed_rows())  # the buffers: set here, not captured
        self._agreed_layout = lay
        return tuple(lay.caps), lay.header_rows

    def _after_graphed_step(self, key: tuple, captured: bool) -> None:
        """A replay rewrites the header verdicts the capture allocated, but appends them to no
        layout: keep them from the capture, put them back on each replay; count the step's blocks."""
        d = self.dispatcher
        if captured:
            self._graph_checks[key] = list(d.layout.checks)
        else:
            d.layout = self._agreed_layout
            d.layout.checks.extend(self._graph_checks[key])
        d.count_replayed_step()

    @property
    def load_LE(self) -> torch.Tensor:
        """Rows served per (layer, global expert) [layers, num_experts] (a host read)."""
        load = torch.zeros(self.cfg.num_layers, self.cfg.num_experts, dtype=torch.long)
        load[:, list(self.my_experts)] = self.load_dev.cpu()
        return load

    def _schedule(self, microbatches: int) -> list[Op]:
        return ep_schedule(self.cfg.num_layers, microbatches, self.cfg.first_dense_layers)

    def _begin_step(self, mbs: list[MicroBatch]) -> None:
        """Agree on the step with every EP rank: from the largest rank's rows when the step says
        them (inside a whole-step capture the step's buffers were set before it), else by the
        handshake (the one host read per step)."""
        if self.peer_rows is not None:
            self.dispatcher.begin_agreed_step(self.step, self._agreed_rows(), self.full_capacity,
                                              device_work=not self.whole_step)
            self.all_idle = False
            return
        layout = self.dispatcher.begin_step(self.step, [mb.ids.numel() for mb in mbs], self.decoding,
                                            self.full_capacity, self.idle)
        self.all_idle = all(f == comm.FLAG_IDLE for f in layout.flags)

    def _rerun(self) -> bool:
        return not self.all_idle and self.dispatcher.finish_step()

    def _op_handlers(self):
        def guard(fn):  # once all ranks are idle the rest of the step is skipped everywhere
            return lambda mb, layer, i: None if self.all_idle else fn(mb, layer, i)
        return {ATTENTION: guard(self._attention), DISPATCH: guard(self._dispatch),
                EXPERTS: guard(self._experts), COMBINE: guard(self._combine_launch),
                HEAD: guard(lambda mb, layer, i: self._head(mb, i)), MLP: guard(self._mlp)}

    def _logits(self, out, rows_B, index_B):
        if rows_B.numel() == 0:
            return torch.zeros(0, self.cfg.vocab_size, device=self.device)
        return super()._logits(out, rows_B, index_B)

    def _settle(self, mb: MicroBatch, layer: int):
        """(fn, inputs) that finish the previous layer's MoE for this micro-batch: the block's MoE
        residual over the combined rows -> the residual stream [X, H]; nothing to finish at layer 0."""
        w = mb.work
        if "handle" not in w:
            return (lambda x: x.reshape(-1, self.cfg.hidden_size)), (mb.x,)
        block, n = self.blocks[layer], mb.x.shape[0] * mb.x.shape[1]

        def settle(h, z, *combined):
            return block.moe_residual(h, z, weighted_sum(n, *combined))

        return settle, (w["h"], w["z"], *self.dispatcher.combine(w.pop("handle")))

    def _attention(self, mb: MicroBatch, layer: int, i: int) -> None:
        """The previous layer's combine, attention over this rank's sequences, the MoE norm and
        the router, and the rows for every rank (blocks, in a padded step)."""
        if self.blocks[layer].moe is None:
            return self._dense_attention(mb, layer, i)
        block, w, shape, d = self.blocks[layer], mb.work, mb.x.shape, self.dispatcher
        settle, settle_in = self._settle(mb, layer - 1)
        attend, cache = self._attend_len(mb), mb.cache

        def run(positions, head_4, *prev):
            x = settle(*prev).view(shape)
            h = x + block.attention_partial(x, positions, cache, layer, attend) if shape[0] else x
            h = h.reshape(-1, self.cfg.hidden_size)
            z, weights, ids = block.moe_inputs(h)
            return h, z, d.prepare(z, weights, ids, i, head_4)

        w["h"], w["z"], w["out"] = self._segment(("attention", layer, i, attend, d.cap(i)), run, mb.positions,
                                                 d.heads.get(layer, i), *settle_in)

    def _dense_attention(self, mb: MicroBatch, layer: int, i: int) -> None:
        """A dense layer's attention (dense layers come first: no previous combine to settle)."""
        block, shape, attend, cache = self.blocks[layer], mb.x.shape, self._attend_len(mb), mb.cache

        def run(x, positions):
            return x + block.attention_partial(x, positions, cache, layer, attend) if shape[0] else x

        mb.work["h"] = self._segment(("attention", layer, i, attend), run, mb.x, mb.positions)

    def _mlp(self, mb: MicroBatch, layer: int, i: int) -> None:
        """A dense layer's MLP on this rank's own tokens, with the residual."""
        block = self.blocks[layer]
        mb.x = self._segment(("mlp", layer, i), lambda h: h + block.mlp(block.moe_norm(h)), mb.work.pop("h"))

    def _dispatch(self, mb: MicroBatch, layer: int, i: int) -> None:
        mb.work["handle"] = self.dispatcher.dispatch(mb.work.pop("out"), layer, i, count=not self.whole_step)

    def _experts(self, mb: MicroBatch, layer: int, i: int) -> None:
        """This rank's experts over the rows every rank sent it (one grouped matmul)."""
        d, experts = self.dispatcher, self.experts[layer]
        got = d.received(mb.work["handle"])
        if not d.layout.padded:
            self.load_dev[layer] += got.counts_L
            mb.work["y"] = experts.forward_sorted(got.x_NH, got.counts_L)
            return
        served = self._segment(("experts", layer, i, d.layout.header_rows),
                               lambda blocks, head_4: d.serve(blocks, head_4, experts.forward_sorted, i), got,
                               d.heads.get(layer, i))
        d.note_checks(layer, i, served)
        self.load_dev[layer] += served.counts_L
        mb.work["y"] = served.back[0]

    def _combine_launch(self, mb: MicroBatch, layer: int, i: int) -> None:
        self.dispatcher.send_back(mb.work["handle"], mb.work.pop("y"))

    def _head(self, mb: MicroBatch, i: int) -> None:
        settle, settle_in = self._settle(mb, self.cfg.num_layers - 1)
        mb.out = self._segment(("head", i), lambda *prev: self.norm(settle(*prev).view(mb.x.shape)), *settle_in)
