"""MA separation: attention ranks and expert ranks run different op lists, micro-batches ping-pong.

An attention rank is a `Runtime` (the engine drives it like the single-device model) over its
replica's sequences and its slice of heads; its transfers go through a SeparatedDispatcher
(dispatcher.py). An expert rank runs `serve_experts`, a loop that answers every replica's bridge
until each one says stop: per (layer, micro-batch) it runs its experts once over the rows of
every replica (one grouped matmul, the weights read once), and each replica's outputs return on
its own bridge.

Per layer and micro-batch on an attention rank (replica of T head-parallel ranks):
  attention: x [b, t, H] -> partial attention of local heads -> all-reduce in replica -> h
             z = moe_norm(h); router(z) -> ids, weights [b*t, k]
  dispatch:  this rank's slice of the b*t tokens (split_evenly over T) goes to the expert ranks
  combine:   expert outputs for the slice -> Block.moe_residual (h + y + shared expert) -> all-gather -> x
A dense layer (DeepSeek's first layers) has attention, then `mlp`: every rank of the replica
runs the whole MLP on the whole micro-batch; nothing crosses the bridge.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import ModelConfig
from ..errors import error_line
from ..model import MoETransformer
from ..plan import SeparatedPlan, split_evenly
from . import comm
from .capacity import CapacityPolicy
from .dispatcher import ExpertDispatcher, SeparatedDispatcher, weighted_sum
from .groups import DistEnv, SeparatedGroups
from .parts import shard_attention, shard_experts
from .graphs import SegmentGraphs
from .schedule import (ATTENTION, COMBINE, DISPATCH, EXPERTS, HEAD, MLP, RECV, SEND, Op, execute,
                       separated_schedule)
from .stepper import MicroBatch, MicroBatchRuntime, OpTimer, dense_decode_rows, microbatch_rows


def expert_route(plan: SeparatedPlan, cfg: ModelConfig, replica: int, device) -> comm.ExpertRoute:
    """Bridge member and local index serving each expert for `replica` (attention ranks come first)."""
    holders = [plan.holder(cfg, e, replica) for e in range(cfg.num_experts)]
    return comm.ExpertRoute.build(plan.expert_placement(cfg), holders, plan.attn_tp, device)


class SeparatedAttentionRuntime(MicroBatchRuntime):
    """The attention side of MA separation as an engine `Runtime` for one replica's sequences."""

    def __init__(self, model: MoETransformer, plan: SeparatedPlan, groups: SeparatedGroups, env: DistEnv,
                 timer: OpTimer | None = None, graphs: bool = False, step_graphs: bool = False):
        """step_graphs (with graphs): a decode step told its rows is replayed from one CUDA graph
        (compute, the bridge's and the replica's transfers, the logits) instead of one graph per
        compute segment with the transfers launched between them."""
        cfg = self.cfg = model.cfg
        self.plan, self.env, self.role = plan, env, groups.role
        self.device = env.device
        self.replica_group = groups.replica_group
        self.timer = timer or OpTimer()
        heads = plan.head_split(cfg)[self.role.index]
        self.embed, self.norm, self.lm_head = model.embed, model.norm, model.lm_head
        self.attn = [shard_attention(b.attn, cfg, heads) for b in model.layers]
        self.blocks = list(model.layers)  # norms, router and shared expert are used whole
        self._init_steps(cfg.num_layers, len(self.attn[0].kv_heads), model.dtype, graphs)
        self.dispatcher = SeparatedDispatcher(groups.bridges[0], expert_route(plan, cfg, self.role.replica, env.device),
                                              cfg, plan.expert_placement(cfg), plan.microbatches,
                                              model.dtype, env.device, groups.replica_group, env.timeout,
                                              f"rank {env.rank}")
        self.fallback = groups.fallback
        self.stopped = False
        self.step_graphs = step_graphs

    @property
    def bridge(self) -> comm.Bridge:
        return self.dispatcher.bridge

    def drop_expert_rank(self, x: int) -> None:
        """Route around dead expert-group index x: this replica's bridge without it (built at
        start-up), each of its experts served by another holder. A step that failed when it
        died is abandoned (the front end runs it again: it rewrites the same KV positions)."""
        replica, d = self.role.replica, self.dispatcher
        if d.bridge.group is not None:  # this replica's step went through: give the old bridge up now
            comm.abandon_bridge(d.bridge)
        d.bridge = self.fallback[replica, x]
        placement = [p for i, p in enumerate(self.plan.expert_placement(self.cfg)) if i != x]
        holders = [self.plan.holder(self.cfg, e, replica, without=x) for e in range(self.cfg.num_experts)]
        d.route = comm.ExpertRoute.build(placement, [g - (g > x) for g in holders], self.plan.attn_tp, self.device)
        d.restart_capacity()  # the expert ranks start theirs again at the same point
        self.graphs.clear()  # segment graphs bake in the old bridge's shapes
        self.in_step = False

    def use_groups(self, groups: SeparatedGroups) -> None:
        """Serve over the groups of a re-formed world (an expert rank was replaced): the same
        members as at start-up, so the route is the plan's again; the KV cache stays."""
        d = self.dispatcher
        d.bridge, self.replica_group, self.fallback = groups.bridges[0], groups.replica_group, groups.fallback
        d.replica_group = groups.replica_group
        d.route = expert_route(self.plan, self.cfg, self.role.replica, self.device)
        d.restart_capacity()  # the expert ranks (the replacement among them) start theirs again too
        self.graphs.clear()  # segment graphs bake in the old groups
        self.in_step = False

    def forward(self, rows, step_id: int | None = None):
        """A decode step that says the replica's rows (`rows.peer_rows`, which its expert ranks
        are told too: cluster.py) runs without the step handshake: both sides lay the step out
        from those rows and size its blocks with the same capacity policy (capacity.py), so
        the expert ranks read nothing on the host before serving it."""
        self._take_peer_rows(rows, "the replica's rows, which its expert ranks are told as well")
        return super().forward(rows, step_id)

    def _dense_rows(self, rows) -> int | None:
        if rows.is_decode and self.peer_rows is not None:
            return dense_decode_rows(self.peer_rows, self.cache.num_slots, self.graphs.enabled)
        return super()._dense_rows(rows)

    # --- one CUDA graph per decode step (step_graphs) ---------------------------------------------
    @property
    def whole_step_graphs(self) -> bool:
        return self.step_graphs and self.peer_rows is not None and comm.transfers_capturable()

    def _step_graph_key(self) -> tuple:
        """The step's layout (the buffers its graph reads are set here, outside the capture)."""
        rows = microbatch_rows(dense_decode_rows(self.peer_rows, self.cache.num_slots, self.graphs.enabled),
                               self.plan.microbatches, self.plan.attn_tp)
        lay = self.dispatcher.begin_agreed_step(self.step, rows)
        return tuple(lay.caps), lay.header_rows

    @contextmanager
    def _capture_warm_up(self):
        """The capture's eager warm-up moves nothing: the expert ranks serve this step once, when
        its graph replays. Its demand came from zeros: the step's buffers are set again."""
        with comm.dry_transfers():
            yield
        self.dispatcher.new_step_buffers(self.dispatcher.layout.step)

    def _after_graphed_step(self, key: tuple, captured: bool) -> None:
        """A replay runs no Python: count its blocks here (dispatch does not, in a whole step)."""
        self.dispatcher.count_replayed_step()

    def finish(self) -> None:
        """Tell the expert ranks this replica is done (once; later calls do nothing)."""
        if not self.stopped and not self.in_step:  # mid-step (an error): peers see this rank exit
            self.stopped = True
            comm.send_stop(self.bridge, self.step, self.cfg.hidden_size, self._cache_shape[2], self.plan.microbatches)
        self.cache = None

    def _schedule(self, microbatches: int) -> list[Op]:
        return separated_schedule("attention", self.cfg.num_layers, microbatches, self.cfg.first_dense_layers)

    def _begin_step(self, mbs: list[MicroBatch]) -> None:
        """Announce the step: decode steps are padded (no host reads), each micro-batch's block
        sized for the replica's largest token slice and the routing so far. A decode step whose
        rows the expert ranks were told too is laid out alike on both sides, with no handshake
        (inside a whole-step capture the step's buffers were set before it)."""
        rows = [-(-mb.ids.numel() // self.plan.attn_tp) for mb in mbs]
        if self.decoding and self.peer_rows is not None:
            self.dispatcher.begin_agreed_step(self.step, rows, self.full_capacity, device_work=not self.whole_step)
            return
        self.dispatcher.begin_step(self.step, rows, self.decoding, self.full_capacity)

    def _rerun(self) -> bool:
        return self.dispatcher.finish_step()

    def _op_handlers(self):
        return {ATTENTION: self._attention, DISPATCH: self._dispatch, COMBINE: self._combine,
                HEAD: lambda mb, layer, i: self._head(mb, i), MLP: self._mlp}

    def _attention(self, mb: MicroBatch, layer: int, i: int) -> None:
        """Attention, the replica's all-reduce, then this rank's token slice through the MoE
        norm and the router, and its rows for the expert ranks (blocks, in a padded step)."""
        if self.blocks[layer].moe is None:
            return self._dense_attention(mb, layer, i)
        block, attn, w, t, d = self.blocks[layer], self.attn[layer], mb.work, self.plan.attn_tp, self.dispatcher
        attend, cache = self._attend_len(mb), mb.cache
        w["slices"] = [len(r) for r in split_evenly(mb.ids.numel(), t)]
        start, n = sum(w["slices"][: self.role.index]), w["slices"][self.role.index]

        def attention(x, positions):
            return block.attention_partial(x, positions, cache, layer, attend, attn=attn)

        def route(x, part, head_4):
            h = (x + part).reshape(-1, self.cfg.hidden_size)[start:start + n]
            z, weights, ids = block.moe_inputs(h)
            return h, z, d.prepare(z, weights, ids, i, head_4)

        head_4 = d.heads.get(layer, i)
        if t == 1:  # nothing to sum: attention and routing are one segment
            w["h"], w["z"], w["out"] = self._segment(
                ("attention+route", layer, i, attend, d.cap(i)),
                lambda x, positions, head: route(x, attention(x, positions), head), mb.x, mb.positions, head_4)
            return
        part = self._segment(("attention", layer, i, attend), attention, mb.x, mb.positions)
        comm.replica_all_reduce(part, self.replica_group, self.env.timeout, self._where(layer, i))
        w["h"], w["z"], w["out"] = self._segment(("route", layer, i, d.cap(i)), route, mb.x, part, head_4)

    def _dense_attention(self, mb: MicroBatch, layer: int, i: int) -> None:
        """A dense layer's attention and the replica's all-reduce of it (partial [b, t, H])."""
        block, attn, attend, cache = self.blocks[layer], self.attn[layer], self._attend_len(mb), mb.cache
        part = self._segment(("attention", layer, i, attend),
                             lambda x, positions: block.attention_partial(x, positions, cache, layer, attend, attn=attn),
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
        mb.work["handle"] = self.dispatcher.dispatch(mb.work.pop("out"), layer, i, count=not self.whole_step)

    def _combine(self, mb: MicroBatch, layer: int, i: int) -> None:
        """Expert outputs back, weighted per token, the block's MoE residual; the replica's slices
        gathered into the whole micro-batch."""
        w, block = mb.work, self.blocks[layer]
        n = w["h"].shape[0]

        def settle(h, z, *combined):
            return block.moe_residual(h, z, weighted_sum(n, *combined))

        x_slice = self._segment(("combine", layer, i), settle, w["h"], w["z"], *self.dispatcher.combine(w["handle"]))
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
    reruns: int = 0  # replicas' steps served again after their blocks overflowed (capacity.py)


def serve_experts(model: MoETransformer, plan: SeparatedPlan, groups: SeparatedGroups, env: DistEnv,
                  timer: OpTimer | None = None, untimed_steps: int = 0, graphs: bool = False,
                  on_timed: Callable[[], None] | None = None,
                  agreed: Callable[[int], list[int] | None] | None = None, step_graphs: bool = False) -> ExpertStats:
    """Answer every replica's bridge, step after step, until each has sent stop. The timer
    restarts after `untimed_steps` steps (a benchmark's warm-up, where NCCL builds its
    communicators on first use), and `on_timed()` is called then (a benchmark starts its energy
    reading).

    Each step starts by reading every live replica's handshake (the one host read per step),
    or, where agreed(step) gives each replica's decode rows (dense_decode_rows of the peer_rows
    the replicas were given), from those (no host read); the op list then runs without
    reading anything on the host (padded steps; with `graphs` each (layer, micro-batch)'s
    expert compute is replayed from a CUDA graph; with `step_graphs` too, an agreed step is
    replayed whole from one), and the device-side header checks are read after it."""
    cfg = model.cfg
    timer = timer or OpTimer()
    server = _ExpertServer(model, plan, groups, env, graphs, step_graphs)
    stats = ExpertStats()
    served = torch.zeros(cfg.num_layers, len(server.my_experts), dtype=torch.long, device=env.device)
    live = list(groups.bridges)
    while live:
        if stats.steps == untimed_steps:
            timer.busy_s.clear()
            if on_timed is not None:
                on_timed()
        rows = agreed(stats.steps) if agreed is not None else None
        layouts, loads = server.serve(live, stats.steps, timer, agreed=rows and [rows[b.replica] for b in live])
        live = [b for b, lay in zip(live, layouts) if lay.flags[0] != comm.FLAG_STOP]
        if not live:
            break
        served += loads  # on the device: read once, at the end
        stats.steps += 1
    stats.load_LE = server.global_loads(served)
    stats.reruns = server.reruns
    return stats


def guarded(failed: dict[int, str], key: int, fn, *args):
    """fn(*args); a transfer error (gloo/NCCL raise RuntimeError subclasses; ours is CommError)
    is recorded as failed[key] instead of raised (None is returned then)."""
    try:
        return fn(*args)
    except RuntimeError as err:
        failed[key] = error_line(err)
        return None


@dataclass
class _ServingStep:
    """An expert rank's state while it serves one step: the working bridges (with their
    layouts), what arrived and what goes back per (layer, micro-batch), the sends to wait for."""

    working: list
    failed: dict[int, str] | None
    loads: torch.Tensor  # [layers, L] rows served per local expert
    arrived: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    pending: list = field(default_factory=list)

    def alive(self):
        return [(bi, b, lay) for bi, (b, lay) in enumerate(self.working) if self.failed is None or bi not in self.failed]

    def run(self, bi: int, fn, *args):
        return fn(*args) if self.failed is None else guarded(self.failed, bi, fn, *args)


class _ExpertServer:
    """An expert rank's state across steps: its experts, the step headers, the CUDA graphs."""

    def __init__(self, model: MoETransformer, plan: SeparatedPlan, groups: SeparatedGroups, env: DistEnv,
                 graphs: bool, step_graphs: bool = False):
        self.cfg = cfg = model.cfg
        self.plan = plan
        self.my_experts = plan.expert_placement(cfg)[groups.role.index]
        # None: a dense layer, served by the attention ranks
        self.experts = [shard_experts(b.moe.experts, cfg, self.my_experts) if b.moe is not None else None
                        for b in model.layers]
        self.dtype = model.dtype
        self.device = env.device
        self.heads = comm.StepHeads(cfg.num_layers, plan.microbatches, env.device)
        self.graphs = SegmentGraphs(graphs, env.device)
        # whole-step graphs (steps laid out from told rows): their own cache, one memory pool
        self.step_graphs = SegmentGraphs(graphs and step_graphs, env.device, max_graphs=64)
        self._graph_checks: dict = {}  # whole-step graph key -> per bridge (its checks, its demands)
        self.dispatcher = ExpertDispatcher(len(self.my_experts), cfg, self.dtype, self.heads, self.graphs)
        self.ops = separated_schedule("expert", cfg.num_layers, plan.microbatches, cfg.first_dense_layers)
        self.reruns = 0  # bridges served again after an overflow
        self.capacity: dict[int, CapacityPolicy] = {}  # replica -> a copy of its capacity policy
        self._now: _ServingStep | None = None  # the step being served
        self._runners = None  # (timer, the op kinds' runners wrapped by it), built once per timer

    def serve(self, bridges: list, step: int, timer: OpTimer, failed: dict[int, str] | None = None,
              agreed: list[int | None] | None = None) -> tuple[list, torch.Tensor]:
        """One step of the replicas on `bridges`: lay it out (read each one's handshake, or from
        `agreed`), run the op list, read the device-side checks. A replica whose blocks overflowed
        their capacity runs the step again at the worst-case capacity, and is served again here.
        Returns each bridge's layout (None where it failed; flags FLAG_STOP: that replica is
        done) and the rows served per (layer, local expert) [layers, L] on the device (rows
        served twice count twice).

        agreed: per bridge, the rows of a decode step its replica runs (dense_decode_rows of
        the rows the front end told both sides), or None: that replica announces its step in a
        handshake. An agreed step is laid out here as the replica lays it out, its blocks sized
        by this rank's copy of the replica's capacity policy, which observes what the replica's
        observes after every padded step (the largest demand in the block headers): the step
        then starts without a host read.

        failed: None = a failed transfer raises. A dict = failure isolation: a bridge whose
        transfer fails is recorded there (index into `bridges` -> why) and skipped for the
        rest of the step, while the other replicas' bridges, separate groups, carry on."""
        cfg = self.cfg
        layouts: list = [None] * len(bridges)
        loads = torch.zeros(cfg.num_layers, len(self.my_experts), dtype=torch.long, device=self.device)
        todo, full = list(range(len(bridges))), set()

        def run(i, fn, *args):
            return fn(*args) if failed is None else guarded(failed, i, fn, *args)

        while todo:
            for i in todo:
                if agreed is not None and agreed[i] is not None:
                    layouts[i] = self._agreed_layout(bridges[i], step, agreed[i], i in full)
                else:
                    layouts[i] = run(i, comm.expert_begin_step, bridges[i], step, self.plan.microbatches,
                                     cfg.hidden_size, self.dtype)
            working = [i for i in todo if layouts[i] is not None and layouts[i].flags[0] != comm.FLAG_STOP]
            if not working:
                break
            step_failed: dict[int, str] | None = None if failed is None else {}
            with torch.inference_mode():
                loads += self.step([(bridges[i], layouts[i]) for i in working], step, timer, step_failed)
            if step_failed:
                failed |= {working[j]: why for j, why in step_failed.items()}
            todo = [i for i in working if (failed is None or i not in failed)
                    and run(i, self._end_step, layouts[i], bridges[i])]
            full |= set(todo)
            self.reruns += len(todo)
        return layouts, loads

    def global_loads(self, served_LX: torch.Tensor) -> torch.Tensor:
        """Rows served per (layer, local expert) [layers, L] on the device -> per (layer, global
        expert) [layers, num_experts] on the host (a host read: once a run, not once a step)."""
        load_LE = torch.zeros(self.cfg.num_layers, self.cfg.num_experts, dtype=torch.long)
        load_LE[:, list(self.my_experts)] = served_LX.cpu()
        return load_LE

    def _policy(self, replica: int) -> CapacityPolicy:
        """This rank's copy of a replica's capacity policy (the replica's SeparatedDispatcher
        builds its own from the same placement)."""
        if replica not in self.capacity:
            self.capacity[replica] = CapacityPolicy.for_placement(self.cfg.top_k, self.plan.expert_placement(self.cfg),
                                                                  self.cfg.num_experts)
        return self.capacity[replica]

    def bridges_changed(self) -> None:
        """A rank was routed around or replaced: the graphs bake in the old bridges, and every
        replica's capacity policy starts again, as the replicas' own do (restart_capacity)."""
        self.graphs.clear()
        self.step_graphs.clear()
        self._graph_checks.clear()
        self.capacity.clear()

    def _agreed_layout(self, bridge: comm.Bridge, step: int, rows: int, full: bool) -> comm.StepLayout:
        rows_M = microbatch_rows(rows, self.plan.microbatches, self.plan.attn_tp)
        caps_M = self._policy(bridge.replica).caps(rows_M, full)
        return comm.agreed_decode_step(bridge, step, rows_M, caps_M, self.cfg.hidden_size, self.dtype)

    def _end_step(self, layout: comm.StepLayout, bridge: comm.Bridge) -> bool:
        """Read the step's checks (raise on a bad header); the replica's policy observes the
        demand of a padded step, as the replica's own does; True: the replica runs it again."""
        overflow, demand_M = comm.read_step_checks(layout, bridge)
        if layout.padded:
            self._policy(bridge.replica).observe(demand_M, layout.rows)
        return overflow

    def step(self, working, step: int, timer: OpTimer, failed: dict[int, str] | None = None) -> torch.Tensor:
        """One step's op list for the working bridges; rows served per (layer, local expert)
        [layers, L], left on the device.

        Each (layer, micro-batch) arrives on every working bridge; `experts` waits for all of it
        and runs one grouped matmul over every replica's rows (the weights are read once), then
        each replica's outputs go back on its own bridge. failed: see `serve` (indices into
        `working`); a failed bridge drops out of the (layer, micro-batch)s still to come.

        With step graphs, a step whose every bridge was laid out from told rows is replayed
        from one CUDA graph per (bridges, rows, capacities): transfers, grouped matmuls and
        header checks, nothing launched one by one."""
        self.heads.set_step(step)
        if self.step_graphs.enabled and all(lay.agreed for _, lay in working) and comm.transfers_capturable():
            return self._graphed_step(working, timer, failed)
        return self._run_ops(working, timer, failed)

    def _run_ops(self, working, timer: OpTimer, failed) -> torch.Tensor:
        num_local = len(self.my_experts)
        st = self._now = _ServingStep(working, failed, torch.zeros(self.cfg.num_layers, num_local, dtype=torch.long,
                                                                   device=self.device))
        if self._runners is None or self._runners[0] is not timer:
            self._runners = (timer, timer.wrap({RECV: self._receive, EXPERTS: self._serve_experts,
                                                SEND: self._send_back}))
        try:
            execute(self.ops, self._runners[1], timer.record)
            for bi, p in st.pending:
                if failed is None or bi not in failed:
                    st.run(bi, comm.wait_sent, p)
        finally:
            self._now = None
        return st.loads

    def _graphed_step(self, working, timer: OpTimer, failed) -> torch.Tensor:
        """The step from its whole-step graph. A replay appends no header checks to the step's
        layouts: those the capture appended (tensors the graph rewrites) are kept per graph and
        handed to each later step's layouts."""
        layouts = [lay for _, lay in working]
        key = (tuple((b.replica, tuple(lay.rows), tuple(lay.caps)) for b, lay in working), layouts[0].header_rows)

        @contextmanager
        def dry_warm_up():  # the replicas send this step once, to the replay: the warm-up moves nothing
            with comm.dry_transfers():
                yield
            for lay in layouts:  # its checks read zeros
                lay.checks.clear()
                lay.demands.clear()

        captures = self.step_graphs.captures
        self.dispatcher.whole_step = True  # no segment graphs inside this one
        try:
            loads = self.step_graphs.run(key, lambda: self._run_ops(working, timer, failed), warm_up=dry_warm_up)
        finally:
            self.dispatcher.whole_step = False
        if self.step_graphs.captures != captures:
            self._graph_checks[key] = [(list(lay.checks), list(lay.demands)) for lay in layouts]
        else:
            for lay, (checks, demands) in zip(layouts, self._graph_checks[key]):
                lay.checks.extend(checks)
                lay.demands.extend(demands)
        return loads

    # --- the op kinds, built once (the step's state is in self._now) ------------------------------
    def _receive(self, op: Op) -> None:
        st, d = self._now, self.dispatcher
        got = st.arrived.setdefault((op.layer, op.mb), {})
        for bi, bridge, layout in st.alive():
            got[bi] = st.run(bi, d.receive, bridge, layout, op.layer, op.mb)

    def _serve_experts(self, op: Op) -> None:
        st, d = self._now, self.dispatcher
        got = st.arrived[op.layer, op.mb]
        here = [(bi, bridge, layout, st.run(bi, d.arrived, got[bi])) for bi, bridge, layout in st.alive()]
        here = [h for h in here if st.failed is None or h[0] not in st.failed]
        if not here:
            return
        ys, counts = d.serve(self.experts[op.layer], [h[1:] for h in here], op.layer, op.mb)
        st.loads[op.layer] += counts
        st.outputs[op.layer, op.mb] = {h[0]: y for h, y in zip(here, ys)}

    def _send_back(self, op: Op) -> None:
        st, d = self._now, self.dispatcher
        got, ys = st.arrived.pop((op.layer, op.mb)), st.outputs.pop((op.layer, op.mb), {})
        for bi, bridge, layout in st.alive():
            if bi in ys:
                sent = st.run(bi, d.send, bridge, layout, got[bi], ys[bi], op.layer, op.mb)
                if sent is not None:
                    st.pending.append((bi, sent))
