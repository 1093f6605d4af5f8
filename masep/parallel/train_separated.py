"""Training through MA separation with the micro-batches pipelined, forward and backward.

Both sides execute op lists from parallel/schedule.py (`train_separated_schedule`, the lists the
simulator times). The attention side interleaves its micro-batches at every transfer, as decode
does: while the expert ranks compute micro-batch 0 of a layer, the attention ranks compute
micro-batch 1's attention, and the other way round; the backward runs the same interleaving in
reverse. An expert rank serves each (layer, micro-batch) as soon as its rows arrive.

Autograd cannot yield in the middle of a graph, so each layer of each micro-batch is cut at the
expert transfer into two graphs with explicit leaves (what crosses a process boundary is always
a leaf here):

  part A  x [b, t, H] -> h_s [n, H] (this rank's token slice after attention), z [n, H] (the
          MoE norm's output: the rows sent), w_R [N] (routing weight of each sent pair)
  part B  leaves h_s', z', w_R', out [N, H] (the experts' outputs) -> x_next [b, t, H]

Backward of a layer: part B from the gradient of x_next gives the gradients of the expert
outputs (sent to the experts, `dispatch_grad`), of h_s', z' and w_R'; when the experts' input
gradients come back (`combine_grad`) they are added to z's, and part A runs backward
(`attention_bwd`) to the gradient of x. The router's auxiliary losses reach part A of every
layer from the micro-batch's loss (`head_bwd`), so that backward keeps the parts' graphs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model import MoETransformer, rope_cos_sin
from ..train.losses import token_loss_sum
from . import comm, comm_grad, routing
from . import schedule as S
from .parts import shard_attention, shard_experts
from .training import (MicroStats, ParamSync, StepShape, TrainRank, _aux_loss, _positions, _Recorder,
                       attention_sublayer, head_slice_syncs, microbatches, moe_inputs, moe_output)


@dataclass
class _Layer:
    """One layer of one micro-batch between its forward and its backward."""

    x_in: torch.Tensor  # part A's input leaf [b, t, H]
    h_s: torch.Tensor  # part A's outputs
    z: torch.Tensor
    w_R: torch.Tensor
    rows: object  # routing.SortedRows
    splits: list[int]
    handle: object = None  # comm.DispatchHandle, then the gradients' handle
    leaves: tuple = ()  # part B's leaves (h_s', z', w_R', out)
    x_next: torch.Tensor | None = None


@dataclass
class _Micro:
    """A micro-batch in flight on an attention rank."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    rope: tuple
    embedded: torch.Tensor  # the embedding's output (graph to the embedding table)
    x: torch.Tensor  # current activation leaf
    layers: dict = field(default_factory=dict)
    records: list = field(default_factory=list)  # router (logits, ids) per layer
    loss: torch.Tensor | None = None
    grad: torch.Tensor | None = None  # gradient of the activation the backward has reached


class SeparatedAttentionTrain(TrainRank):
    """An attention rank of MA separation: its replica's sequences, its heads, whole norms,
    router and shared expert; routed tokens go over the replica's bridge."""

    def __init__(self, model: MoETransformer, plan, groups, env):
        cfg = self.cfg = model.cfg
        self.plan, self.env, self.rank, self.role = plan, env, env.rank, groups.role
        self.bridge = groups.bridges[0]
        comm.warm_up_bridge(self.bridge)
        heads = plan.head_split(cfg)[self.role.index]
        self.attn = torch.nn.ModuleList(shard_attention(b.attn, cfg, heads) for b in model.layers)
        for block in model.layers:  # the block keeps its norms, router and shared expert only
            block.attn, block.moe.experts = None, None
        self.model = model
        self.modules = {"": model, "attn": self.attn}
        self.heads = comm_grad.HeadGroup(groups.replica_group, plan.attn_tp, self.role.index, env.timeout,
                                         f"replica {self.role.replica} head group")
        from .separated import expert_route
        self.route = expert_route(plan, cfg, self.role.replica, env.device)
        self.recorder = _Recorder(model.layers)

    def syncs(self) -> list[ParamSync]:
        plan = self.plan
        everyone = tuple(range(plan.num_attention_ranks))
        same_t = tuple(r * plan.attn_tp + self.role.index for r in range(plan.attn_replicas))
        first = self.role.replica == 0
        split = plan.head_split(self.cfg)

        def ranks_of_t(t):
            return tuple(r * plan.attn_tp + t for r in range(plan.attn_replicas))

        out = []
        for name, p in self.named_parameters():
            token_sliced = ".moe." in name or ".moe_norm." in name  # router, shared expert, MoE norm
            if token_sliced:
                out.append(ParamSync(name, p, everyone, self.rank == 0))
            elif name.startswith("attn."):
                layer = int(name.split(".")[1])
                out += head_slice_syncs(name, p, self.attn[layer], self.cfg, split, ranks_of_t, self.role.index,
                                        first)
            else:
                out.append(ParamSync(name, p, same_t, first and self.role.index == 0))
        return out

    def step(self, ids_BT, shape: StepShape, step: int, scale: float) -> MicroStats:
        cfg, stats = self.cfg, MicroStats()
        mbs = microbatches(ids_BT, self.plan.microbatches)
        rows = [-(-mb[:, :-1].numel() // self.plan.attn_tp) for mb in mbs]
        layout = comm.attention_begin_step(self.bridge, step, rows, False, cfg.hidden_size, self.model.dtype)
        live = [self._start(mb) for mb in mbs]
        report = self.role.index == 0
        handlers = {
            S.ATTENTION: lambda op: self._attention(live[op.mb], op.layer),
            S.DISPATCH: lambda op: self._dispatch(live[op.mb], op, layout),
            S.COMBINE: lambda op: self._combine(live[op.mb], op.layer),
            S.HEAD: lambda op: self._head(live[op.mb], shape, stats, report),
            # the backward runs the last micro-batch first, so micro-batch 0 finishes each layer
            S.HEAD_BWD: lambda op: self._head_bwd(live[op.mb], scale, op.mb == 0),
            S.DISPATCH_GRAD: lambda op: self._dispatch_grad(live[op.mb], op.layer),
            S.COMBINE_GRAD: lambda op: self._combine_grad(live[op.mb], op.layer),
            S.ATTENTION_BWD: lambda op: self._attention_bwd(live[op.mb], op.layer, op.mb == 0),
        }
        ops = S.train_separated_schedule("attention", cfg.num_layers, self.plan.microbatches)
        S.execute([op for op in ops if op.kind not in (S.GRAD_SYNC, S.OPTIMIZER)], handlers)
        if not report:  # the counts were summed over the head group: report them once
            stats.load_LE = None
        return stats

    # --- forward ---------------------------------------------------------------------------------
    def _start(self, mb_BT: torch.Tensor) -> _Micro:
        inputs, targets = mb_BT[:, :-1], mb_BT[:, 1:]
        positions = _positions(inputs)
        embedded = self.model.embed(inputs)
        rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embedded.dtype)
        return _Micro(inputs, targets, positions, rope, embedded, embedded.detach().requires_grad_())

    def _attention(self, st: _Micro, layer: int) -> None:
        """Part A: attention, this rank's token slice, MoE norm, router, rows sorted by expert rank."""
        block, x_in = self.model.layers[layer], st.x
        h = attention_sublayer(block, self.attn[layer], x_in, st.positions, st.rope, self.heads)
        h_s, z, weights, ids, splits = moe_inputs(block, h, self.heads)
        st.records += self.recorder.take()
        rows = comm.sort_for_bridge(ids, weights, self.route, self.bridge)
        st.layers[layer] = _Layer(x_in, h_s, z, rows.weight_R, rows, splits)

    def _dispatch(self, st: _Micro, op: S.Op, layout) -> None:
        seg = st.layers[op.layer]
        seg.handle = comm.dispatch_rows(seg.z.detach(), seg.rows, self.bridge, layout, op.layer, op.mb)

    def _combine(self, st: _Micro, layer: int) -> None:
        """Part B: the experts' outputs weighted back onto their tokens, the shared expert, the residual."""
        seg, block = st.layers[layer], self.model.layers[layer]
        out = comm.receive_outputs(seg.handle, self.cfg.hidden_size, self.model.dtype).requires_grad_()
        h_s, z, w_R = (t.detach().requires_grad_() for t in (seg.h_s, seg.z, seg.w_R))
        pos = torch.arange(out.shape[0], device=out.device)
        routed = routing.gather(out, pos, seg.rows.token_R, w_R, z.shape[0])
        seg.x_next = moe_output(block, h_s, z, routed, self.heads, seg.splits, seg.x_in.shape)
        seg.leaves = (h_s, z, w_R, out)
        st.x = seg.x_next.detach().requires_grad_()

    def _head(self, st: _Micro, shape: StepShape, stats: MicroStats, report: bool) -> None:
        cfg, model = self.cfg, self.model
        ce = token_loss_sum(model.lm_head(model.norm(st.x)).flatten(0, 1), st.targets.flatten())
        if report:
            stats.token_loss += float(ce.detach())
        aux = _aux_loss(st.records, cfg.num_experts, st.inputs.numel(), shape, cfg.num_layers, self.heads.sum_counts,
                        stats)
        st.loss = ce / shape.global_tokens + aux

    # --- backward --------------------------------------------------------------------------------
    def _head_bwd(self, st: _Micro, scale: float, last: bool) -> None:
        # keeps the graphs: the auxiliary losses reached part A of every layer, which runs again
        (st.loss * scale).backward(retain_graph=True)
        st.grad, st.loss = st.x.grad, None
        if last and not self.cfg.tie_embeddings:  # a tied head's gradient also comes from the embedding
            self.grads_ready([*self.model.norm.parameters(), *self.model.lm_head.parameters()])

    def _dispatch_grad(self, st: _Micro, layer: int) -> None:
        seg = st.layers[layer]
        torch.autograd.backward(seg.x_next, st.grad)
        out = seg.leaves[3]
        grad_out = out.grad if out.grad is not None else torch.zeros_like(out)
        seg.handle = comm.launch_output_grads(seg.handle, grad_out)

    def _combine_grad(self, st: _Micro, layer: int) -> None:
        seg = st.layers[layer]
        got = comm.wait_input_grads(seg.handle)
        h_s, z, w_R, _ = seg.leaves
        grad_z = z.grad if z.grad is not None else torch.zeros_like(z)
        seg.handle = grad_z.index_add(0, seg.rows.token_R, got)  # the rows z sent, their gradients summed

    def _attention_bwd(self, st: _Micro, layer: int, last: bool) -> None:
        seg = st.layers.pop(layer)
        h_s, _, w_R, _ = seg.leaves
        outs, grads = [seg.h_s, seg.z], [_grad_or_zeros(h_s), seg.handle]
        if w_R.grad is not None:
            outs.append(seg.w_R)
            grads.append(w_R.grad)
        torch.autograd.backward(outs, grads)
        st.grad = seg.x_in.grad
        if layer == 0:
            torch.autograd.backward(st.embedded, st.grad)
        if last:  # no micro-batch has this layer's backward left: its gradients can be summed now
            ready = [*self.attn[layer].parameters(), *self.model.layers[layer].parameters()]
            if layer == 0:
                ready += [*self.model.embed.parameters(), *self.model.norm.parameters(), *self.model.lm_head.parameters()]
            self.grads_ready(ready)

    def finish(self) -> None:
        """Tell the expert ranks training is over (they leave their loop)."""
        comm.send_stop(self.bridge, -1, self.cfg.hidden_size, self.model.dtype, self.plan.microbatches)


def _grad_or_zeros(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


class SeparatedExpertTrain(TrainRank):
    """An expert rank of MA separation: per (micro-batch, layer) the rows of every replica in
    one grouped matmul; in backward the output gradients of all of them in one backward."""

    def __init__(self, model: MoETransformer, plan, groups, env):
        cfg = self.cfg = model.cfg
        self.plan, self.env, self.rank, self.role = plan, env, env.rank, groups.role
        self.bridges = groups.bridges
        for bridge in self.bridges:  # replica by replica, as each replica's attention ranks do
            comm.warm_up_bridge(bridge)
        self.my_experts = plan.expert_placement(cfg)[self.role.index]
        self.experts = torch.nn.ModuleList(shard_experts(b.moe.experts, cfg, self.my_experts) for b in model.layers)
        self.modules = {"experts": self.experts}
        self.dtype = model.dtype
        self.stopped = False

    def syncs(self) -> list[ParamSync]:
        placement = self.plan.expert_placement(self.cfg)
        first = self.plan.num_attention_ranks
        holders = {e: tuple(first + g for g, held in enumerate(placement) if e in held) for e in self.my_experts}
        out = []
        for name, p in self.named_parameters():
            for local, e in enumerate(self.my_experts):
                out.append(ParamSync(f"{name}[{e}]", p, holders[e], holders[e][0] == self.rank, local))
        return out

    def step(self, ids_BT, shape: StepShape, step: int, scale: float) -> MicroStats:
        """Run this rank's ops of the step's schedule (schedule.train_separated_schedule, the one
        the simulator times) up to the gradient sync, which the trainer runs after the step."""
        cfg, m = self.cfg, self.plan.microbatches
        layouts = [comm.expert_begin_step(b, step, m, cfg.hidden_size, self.dtype) for b in self.bridges]
        live: dict[tuple[int, int], dict] = {}  # (layer, mb) -> what its ops so far produced
        # Sends are launched, not waited: a replica takes this micro-batch's outputs only after it
        # has dispatched the next one (its combine comes later in its op list), and that dispatch
        # needs this rank's next receive. They complete in the background; the step waits at its end.
        sending: list = []

        def at(op):
            return live.setdefault((op.layer, op.mb), {})

        def receive(op):
            at(op)["batches"] = [comm.expert_receive(b, lay, len(self.my_experts), cfg.hidden_size, self.dtype,
                                                     op.layer, op.mb) for b, lay in zip(self.bridges, layouts)]

        def send(parts_of, op, state):
            for bridge, lay, bt, part in zip(self.bridges, layouts, state["batches"], parts_of(state)):
                sending.append(comm.expert_send(part, bt, bridge, lay, op.layer, op.mb))

        def receive_grads(op):
            st = at(op)
            st["grads"] = [comm.expert_receive_grads(b, bt, lay, op.layer, op.mb)
                           for b, lay, bt in zip(self.bridges, layouts, st["batches"])]

        handlers = {
            S.RECV: receive,
            S.EXPERTS: lambda op: at(op).update(self._forward(at(op)["batches"], op.layer)),
            S.SEND: lambda op: send(lambda st: st["y"].detach().split(st["sizes"]), op, at(op)),
            S.RECV_GRAD: receive_grads,
            S.EXPERTS_BWD: lambda op: self._backward(at(op)),
            S.SEND_GRAD: lambda op: send(lambda st: st["gx"].split(st["sizes"]), op, live.pop((op.layer, op.mb))),
        }
        ops = S.train_separated_schedule("expert", cfg.num_layers, m)
        S.execute([op for op in ops if op.kind not in (S.GRAD_SYNC, S.OPTIMIZER)], handlers)
        for pending in sending:
            comm.wait_sent(pending)
        return MicroStats()

    def _forward(self, batches, layer: int) -> dict:
        """Every replica's rows of one (layer, micro-batch) through this rank's experts, grouped."""
        x = torch.cat([bt.x_NH for bt in batches]).detach().requires_grad_()
        sizes = [bt.x_NH.shape[0] for bt in batches]
        local = [routing.local_of_rows(bt.counts_L, n) for bt, n in zip(batches, sizes)]
        x_sorted, order = routing.merge_by_expert(list(x.split(sizes)), local)  # every replica's rows by expert
        counts = torch.stack([bt.counts_L for bt in batches]).sum(0)
        y_sorted = self.experts[layer].forward_sorted(x_sorted, counts)
        y = torch.cat(routing.split_merged(y_sorted, order, sizes)) if y_sorted.numel() else y_sorted
        return dict(x=x, y=y, sizes=sizes)

    def _backward(self, state: dict) -> None:
        if state["y"].numel():
            torch.autograd.backward(state["y"], torch.cat(state["grads"]))
        x = state["x"]
        state["gx"] = x.grad if x.grad is not None else torch.zeros_like(x)

    def finish(self) -> None:
        """Read every replica's stop (sent by the attention ranks' finish)."""
        for b in self.bridges:
            comm.expert_begin_step(b, -1, self.plan.microbatches, self.cfg.hidden_size, self.dtype)
