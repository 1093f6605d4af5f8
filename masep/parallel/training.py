"""Training through a plan: each rank's forward and backward of one step, for every strategy.

The block forward is written once (`attention_sublayer` + one of two MoE sublayers); a strategy
supplies the head group (comm_grad.HeadGroup) and how routed tokens reach their experts:
  single     the rank's own Experts module
  separated  parallel/train_separated.py: attention ranks cut each layer's graph at the bridge so
             their micro-batches interleave; expert ranks run one grouped matmul per
             (micro-batch, layer) over every replica's rows, and the same in reverse
  ep         every rank sends to every rank (comm_grad.ep_expert_rows)
  tp_pp      heads and each expert's hidden columns split over a stage, partial sums reduced;
             stages pass activations forward and their gradients back (GPipe order)

Schedule of a step (parallel/schedule.py's training schedules, which the simulator times too):
separated ranks execute their op lists, the micro-batches interleaved at each transfer in
forward and in backward; single, ep and tp_pp run the micro-batches' forwards in order, then
their backwards in reverse order (GPipe), each transfer waited for before the rank goes on.

Loss of a step (what the single-device trainer computes on the whole global batch):
    sum of token cross-entropies / global tokens
    + aux_coef * mean over token groups of (load-balancing loss averaged over layers)
    + z_coef * the same for the z-loss
where a token group is one micro-batch of one data-parallel replica. Each rank backpropagates
only its own terms; `syncs()` says which ranks' gradients of each parameter add up.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model import MoETransformer, rope_cos_sin
from ..plan import split_evenly
from ..train.losses import LossConfig, router_terms, token_loss_sum
from . import comm, comm_grad, routing
from .parts import shard_attention, shard_experts


@dataclass
class ParamSync:
    """One parameter (or one expert's slice of a stacked expert tensor): the ranks whose gradients
    of it add up to the full gradient, and whether this rank counts it in the global norm."""

    name: str
    param: torch.nn.Parameter
    ranks: tuple[int, ...]
    owner: bool
    index: int | None = None  # expert slice: param[index]

    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        return g if g is None or self.index is None else g[self.index]


@dataclass
class StepShape:
    """What every rank knows about a step: token groups and the global token count."""

    replicas: int
    microbatches: int
    global_tokens: int  # target tokens of the whole global batch
    loss: LossConfig = field(default_factory=LossConfig)

    @property
    def groups(self) -> int:
        return self.replicas * self.microbatches


@dataclass
class MicroStats:
    """Sums this rank reports for a step (added over ranks by the trainer)."""

    token_loss: float = 0.0  # sum of cross-entropies (only ranks that own the report)
    balance: float = 0.0  # aux terms, already scaled into the loss (coef / (layers * groups))
    zloss: float = 0.0
    load_LE: torch.Tensor | None = None  # routed pairs per (layer, expert), this rank's share


def microbatches(ids_BT: torch.Tensor, m: int) -> list[torch.Tensor]:
    """Cut a replica's sequences [B, L+1] into m micro-batches (contiguous, sizes differ by <= 1)."""
    return [ids_BT[r.start:r.stop] for r in split_evenly(ids_BT.shape[0], m)]


def replica_rows(ids_BT: torch.Tensor, replicas: int, replica: int) -> torch.Tensor:
    r = split_evenly(ids_BT.shape[0], replicas)[replica]
    return ids_BT[r.start:r.stop]


# --- the block forward, written once -----------------------------------------------------------
def attention_sublayer(block, attn, x_BTH, positions, rope, heads: comm_grad.HeadGroup) -> torch.Tensor:
    """h = x + attention(x) with the heads of `attn` (partials summed over the head group)."""
    return x_BTH + heads.reduce_from_heads(attn(heads.copy_to_heads(block.attn_norm(x_BTH)), positions, rope=rope))


def moe_inputs(block, h_BTH, heads: comm_grad.HeadGroup):
    """First half of the routed MoE sublayer: this rank's token slice h [n, H], the MoE norm's
    output z [n, H] (the rows the experts see), the router's weights and ids [n, k], the splits."""
    b, t, hidden = h_BTH.shape
    splits = [len(r) for r in split_evenly(b * t, heads.size)]
    h = heads.split_rows(h_BTH.reshape(-1, hidden), splits)
    z, weights, ids = block.moe_inputs(h)
    return h, z, weights, ids, splits


def moe_output(block, h_nH, z_nH, routed_nH, heads: comm_grad.HeadGroup, splits: list[int], shape_BTH) -> torch.Tensor:
    """Second half: the block's MoE residual (the routed experts' weighted sum, the shared expert)
    and the token slices gathered back into [B, T, H]."""
    return heads.gather_rows(block.moe_residual(h_nH, z_nH, routed_nH), splits).view(shape_BTH)


def routed_moe_sublayer(block, h_BTH, heads: comm_grad.HeadGroup, experts_fn) -> torch.Tensor:
    """The MoE on this rank's slice of the tokens (whole experts, wherever they live):
    experts_fn(z [n, H], weights [n, k], ids [n, k]) -> sum_k w_k expert_k(z) [n, H]."""
    h, z, weights, ids, splits = moe_inputs(block, h_BTH, heads)
    return moe_output(block, h, z, experts_fn(z, weights, ids), heads, splits, h_BTH.shape)


def sharded_moe_sublayer(block, experts, h_BTH, heads: comm_grad.HeadGroup, add_shared: bool) -> torch.Tensor:
    """The MoE with every expert's hidden columns split over the head group (tensor parallel):
    all tokens on every rank, partial outputs summed; the shared expert added on one rank."""
    b, t, hidden = h_BTH.shape
    z = heads.copy_to_heads(block.moe_norm(h_BTH).reshape(-1, hidden))
    weights, ids = block.moe.router(z)
    y = experts(z, weights, ids)
    y = block.moe.add_shared(z, y) if add_shared else y
    return h_BTH + heads.reduce_from_heads(y).view(b, t, hidden)


def _positions(ids_BT: torch.Tensor) -> torch.Tensor:
    b, t = ids_BT.shape
    return torch.arange(t, device=ids_BT.device).expand(b, t)


class _Recorder:
    """Collects the routers' (logits, ids) of one micro-batch, layer by layer."""

    def __init__(self, blocks):
        self.records: list = []
        for block in blocks:
            block.moe.router.record = self.records

    def take(self) -> list:
        out = list(self.records)
        self.records.clear()
        return out


def _aux_loss(records, num_experts: int, group_tokens: int, shape: StepShape, layers: int, counts_fn, stats: MicroStats):
    """This rank's share of a token group's auxiliary losses, scaled into the step loss."""
    lb, z, loads = router_terms(records, num_experts, group_tokens, counts_fn)
    scale = 1.0 / (layers * shape.groups)
    lb, z = shape.loss.aux_coef * scale * lb, shape.loss.z_coef * scale * z
    stats.balance += float(lb.detach())
    stats.zloss += float(z.detach())
    if loads is not None:
        stats.load_LE = loads if stats.load_LE is None else stats.load_LE + loads
    return lb + z


def routed_loss(model, mb_BT: torch.Tensor, attn_of, experts_of, heads: comm_grad.HeadGroup, recorder,
                shape: StepShape, stats: MicroStats, report: bool) -> torch.Tensor:
    """One micro-batch [b, L+1] through a model whose MoE routes tokens to whole experts (single,
    a separated attention rank, an EP rank): this rank's term of the step loss. attn_of(layer)
    is the layer's (sliced) attention, experts_of(layer) its experts_fn; `report`: this rank
    adds the cross-entropy to the step's statistics (one rank per replica)."""
    cfg = model.cfg
    inputs, targets = mb_BT[:, :-1], mb_BT[:, 1:]
    positions = _positions(inputs)
    x = model.embed(inputs)
    rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    for layer, block in enumerate(model.layers):
        h = attention_sublayer(block, attn_of(layer), x, positions, rope, heads)
        x = routed_moe_sublayer(block, h, heads, experts_of(layer))
    ce = token_loss_sum(model.lm_head(model.norm(x)).flatten(0, 1), targets.flatten())
    if report:
        stats.token_loss += float(ce.detach())
    aux = _aux_loss(recorder.take(), cfg.num_experts, inputs.numel(), shape, cfg.num_layers, heads.sum_counts, stats)
    return ce / shape.global_tokens + aux


def head_slice_syncs(name: str, p, attn, cfg, head_split: list[range], ranks_of_t, my_t: int,
                     first: bool) -> list[ParamSync]:
    """ParamSyncs of one parameter of a head slice (`attn`, tp index my_t of a head group split
    as head_split). q/o rows are this slice's alone (summed only over ranks_of_t(my_t), the same
    slice in other replicas). A KV head read by query heads of two slices (an uneven split, or
    one that straddles a KV group) gets partial gradients on both: its k/v rows are summed over
    every slice that reads it. q_norm/k_norm act on every head: summed over all slices."""
    from ..model import kv_heads_for
    leaf = name.rsplit(".", 2)[-2]  # "k_proj", "q_norm", ...
    everyone = tuple(r for t in range(len(head_split)) for r in ranks_of_t(t))
    if leaf in ("q_norm", "k_norm"):
        return [ParamSync(name, p, everyone, first and my_t == 0)]
    if leaf not in ("k_proj", "v_proj"):
        return [ParamSync(name, p, ranks_of_t(my_t), first)]
    d, out = cfg.head_dim, []
    for j, g in enumerate(attn.kv_heads):
        readers = [t for t, heads in enumerate(head_split) if g in kv_heads_for(cfg, heads)]
        ranks = tuple(sorted(r for t in readers for r in ranks_of_t(t)))
        out.append(ParamSync(f"{name}[kv{g}]", p, ranks, first and my_t == readers[0], slice(j * d, (j + 1) * d)))
    return out


class LastBackwardHooks:
    """Tells `ready(params)` when modules' gradients are final, from inside an autograd
    backward. Armed for a step's last backward, each parameter's post-accumulate hook checks it
    off its module; modules go to `ready` in the order given (the order the backward finishes
    them: head, last layer, ..., embedding), each once it and all before it are complete, so
    every rank and every step posts the same sums in the same order whatever order the hooks
    fire in. A parameter listed by two modules (a tied embedding) belongs to the later one.
    Only parameters for which `watch(param)` is true count: each must get a gradient in every
    step on every rank (else the ranks' orders of sums would differ); the others (an EP rank's
    experts, which get no rows in some steps) are left to the end-of-step sync."""

    def __init__(self, modules, ready, watch=lambda p: True):
        self.ready, self.armed = ready, False
        self.owner: dict[int, int] = {}
        params_of = [[p for p in m.parameters() if p.requires_grad and watch(p)] for m in modules]
        for i, params in enumerate(params_of):
            for p in params:
                if id(p) not in self.owner:
                    p.register_post_accumulate_grad_hook(self._accumulated)
                self.owner[id(p)] = i  # the later module wins
        self.params = [[p for p in params if self.owner[id(p)] == i] for i, params in enumerate(params_of)]
        self.left: list[set[int]] = []
        self.next = 0

    def arm(self) -> None:
        self.armed, self.next = True, 0
        self.left = [{id(p) for p in params} for params in self.params]
        self._flush()

    def disarm(self) -> None:
        self.armed = False

    def _accumulated(self, p) -> None:
        if self.armed:
            self.left[self.owner[id(p)]].discard(id(p))
            self._flush()

    def _flush(self) -> None:
        while self.next < len(self.params) and not self.left[self.next]:
            if self.params[self.next]:
                self.ready(self.params[self.next])
            self.next += 1


# --- strategies --------------------------------------------------------------------------------
class TrainRank:
    """A rank's part of training. Subclasses set `modules` (what this rank's optimizer sees)."""

    rank: int = 0

    def grads_ready(self, params) -> None:
        """The trainer replaces this: `params`' gradients are final for the step (sync may start)."""

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        seen, out = set(), []
        for prefix, module in self.modules.items():
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{prefix}.{name}" if prefix else name, p))
        return out

    def syncs(self) -> list[ParamSync]:
        raise NotImplementedError

    def step(self, ids_BT: torch.Tensor | None, shape: StepShape, step: int, scale: float) -> MicroStats:
        """Forward and backward of one step over this rank's sequences [B, L+1] (None on ranks
        that get no data); gradients accumulate into .grad, multiplied by `scale`."""
        raise NotImplementedError


class SingleTrain(TrainRank):
    """The oracle: the whole model on one device, the same token groups as a plan would form."""

    def __init__(self, model: MoETransformer, replicas: int = 1, microbatches_: int = 1):
        self.model, self.cfg = model, model.cfg
        self.replicas, self.m = replicas, microbatches_
        self.modules = {"": model}
        self.heads = comm_grad.HeadGroup(None, 1, 0, None, "single")
        self.recorder = _Recorder(model.layers)

    def syncs(self) -> list[ParamSync]:
        return [ParamSync(n, p, (0,), True) for n, p in self.named_parameters()]

    def step(self, ids_BT, shape: StepShape, step: int, scale: float) -> MicroStats:
        stats = MicroStats()
        for r in range(self.replicas):
            for mb in microbatches(replica_rows(ids_BT, self.replicas, r), self.m):
                loss = self._forward(mb, shape, stats)
                (loss * scale).backward()
        return stats

    def _forward(self, mb_BT, shape: StepShape, stats: MicroStats) -> torch.Tensor:
        layers = self.model.layers
        return routed_loss(self.model, mb_BT, lambda i: layers[i].attn, lambda i: layers[i].moe.experts, self.heads,
                           self.recorder, shape, stats, report=True)


class EpTrain(TrainRank):
    """An EP rank: data-parallel attention over its own sequences, a share of the experts; every
    rank sends routed rows to every rank and serves the rows others send."""

    def __init__(self, model: MoETransformer, plan, groups, env):
        cfg = self.cfg = model.cfg
        self.plan, self.env, self.rank = plan, env, env.rank
        self.bridge = groups.bridge
        self.my_experts = plan.expert_placement(cfg)[env.rank]
        for block in model.layers:
            block.moe.experts = shard_experts(block.moe.experts, cfg, self.my_experts)
        self.model = model
        self.modules = {"": model}
        self.heads = comm_grad.HeadGroup(None, 1, 0, env.timeout, "ep")
        from .ep import ep_route
        self.route = ep_route(plan, cfg, env.rank, env.device)
        self.recorder = _Recorder(model.layers)

    def syncs(self) -> list[ParamSync]:
        everyone = tuple(range(self.plan.ep))
        placement = self.plan.expert_placement(self.cfg)
        holders = {e: tuple(g for g, held in enumerate(placement) if e in held) for e in self.my_experts}
        out = []
        for name, p in self.named_parameters():
            if ".moe.experts." in name:
                for local, e in enumerate(self.my_experts):
                    out.append(ParamSync(f"{name}[{e}]", p, holders[e], holders[e][0] == self.rank, local))
            else:
                out.append(ParamSync(name, p, everyone, self.rank == 0))
        return out

    def step(self, ids_BT, shape: StepShape, step: int, scale: float) -> MicroStats:
        cfg, stats = self.cfg, MicroStats()
        mbs = microbatches(ids_BT, self.plan.microbatches)
        rows = [mb[:, :-1].numel() for mb in mbs]
        layout = comm.ep_begin_step(self.bridge, step, rows, False, cfg.hidden_size, self.model.dtype, idle=False)
        losses = [self._forward(mb, i, layout, shape, stats) for i, mb in enumerate(mbs)]
        if not hasattr(self, "_hooks"):  # a layer's sum starts once the last backward is past it
            m = self.model
            experts = {id(p) for block in m.layers for p in block.moe.experts.parameters()}
            self._hooks = LastBackwardHooks([m.lm_head, m.norm, *reversed(m.layers), m.embed], self.grads_ready,
                                            watch=lambda p: id(p) not in experts)
        for i, loss in reversed(list(enumerate(losses))):
            if i == 0:
                self._hooks.arm()
            try:
                (loss * scale).backward()
            finally:
                self._hooks.disarm()
        return stats

    def _forward(self, mb_BT, i: int, layout, shape: StepShape, stats: MicroStats) -> torch.Tensor:
        layers = self.model.layers
        return routed_loss(self.model, mb_BT, lambda layer: layers[layer].attn,
                           lambda layer: self._experts_fn(layers[layer], layout, layer, i), self.heads, self.recorder,
                           shape, stats, report=True)

    def _experts_fn(self, block, layout, layer: int, i: int):
        def run(z, weights, ids):
            rows = comm.sort_for_bridge(ids, weights, self.route, self.bridge)
            out = comm_grad.ep_expert_rows(z, rows, self.bridge, layout, block.moe.experts, layer, i)
            pos = torch.arange(out.shape[0], device=out.device)
            return routing.gather(out, pos, rows.token_R, rows.weight_R, z.shape[0])
        return run


class TpPpTrain(TrainRank):
    """A rank of T tensor-parallel x P pipeline stages: its stage's layers, its heads and its
    columns of every expert; GPipe order (all forwards, then the backwards in reverse)."""

    def __init__(self, model: MoETransformer, plan, groups, env):
        cfg = self.cfg = model.cfg
        self.plan, self.env, self.rank, self.groups = plan, env, env.rank, groups
        self.stage, self.t = groups.role.replica, groups.role.index
        self.layers = plan.stage_layers(cfg)[self.stage]
        heads, cols = plan.head_split(cfg)[self.t], plan.hidden_split(cfg)[self.t]
        self.first, self.last = self.stage == 0, self.stage == plan.pp - 1
        self.blocks = torch.nn.ModuleList(model.layers[i] for i in self.layers)
        for block in self.blocks:
            block.attn = shard_attention(block.attn, cfg, heads)
            block.moe.experts = shard_experts(block.moe.experts, cfg, range(cfg.num_experts), cols)
        self.model = model
        self.modules = {"layers": self.blocks}
        if self.first:
            self.modules["embed"] = model.embed
        if self.last:
            self.modules["norm"], self.modules["lm_head"] = model.norm, model.lm_head
        self.heads = comm_grad.HeadGroup(groups.tp_group, plan.tp, self.t, env.timeout, f"stage {self.stage} TP group")
        self.recorder = _Recorder(self.blocks)

    def syncs(self) -> list[ParamSync]:
        tp_group = tuple(self.plan.stage_ranks(self.stage))
        tied = self.cfg.tie_embeddings and self.plan.pp > 1
        out = []
        for name, p in self.named_parameters():
            if ".moe.router." in name or ".moe.shared." in name:  # partial gradients on each TP rank
                out.append(ParamSync(name, p, tp_group, self.t == 0))
            elif tied and name in ("embed.weight", "lm_head.weight"):  # one tensor, first and last stage
                ranks = (self.t, (self.plan.pp - 1) * self.plan.tp + self.t)
                out.append(ParamSync(name, p, ranks, self.t == 0 and self.first))
            elif ".attn." in name:
                block = self.blocks[int(name.split(".")[1])]
                out += head_slice_syncs(name, p, block.attn, self.cfg, self.plan.head_split(self.cfg),
                                        lambda t: (self.stage * self.plan.tp + t,), self.t, True)
            elif ".moe.experts." in name:
                out.append(ParamSync(name, p, (self.rank,), True))
            else:  # norms, embedding, head: the same full gradient on every TP rank
                out.append(ParamSync(name, p, (self.rank,), self.t == 0))
        return out

    def step(self, ids_BT, shape: StepShape, step: int, scale: float) -> MicroStats:
        stats, pending = MicroStats(), []
        for i, mb in enumerate(microbatches(ids_BT, self.plan.microbatches)):
            pending.append(self._forward(mb, i, shape, stats))
        for i in reversed(range(len(pending))):
            self._backward(i, *pending[i], scale)
        return stats

    def _forward(self, mb_BT, i: int, shape: StepShape, stats: MicroStats):
        cfg, model = self.cfg, self.model
        inputs, targets = mb_BT[:, :-1], mb_BT[:, 1:]
        b, t = inputs.shape
        positions = _positions(inputs)
        if self.first:
            x_in = x = model.embed(inputs)
        else:
            x_in = comm.recv_activation((b, t, cfg.hidden_size), model.dtype, self.env.device, self._peer(-1),
                                        self.groups.prev_group, self.env.timeout, self._where(i)).requires_grad_()
            x = x_in
        rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        for block in self.blocks:
            h = attention_sublayer(block, block.attn, x, positions, rope, self.heads)
            x = sharded_moe_sublayer(block, block.moe.experts, h, self.heads, add_shared=self.t == 0)
        # Router logits are the same on every TP rank: one rank adds the auxiliary terms (their
        # gradients then add up once when the router's gradients are summed over the stage).
        aux = _aux_loss(self.recorder.take(), cfg.num_experts, inputs.numel(), shape, cfg.num_layers, None,
                        stats if self.t == 0 else MicroStats())
        aux = aux if self.t == 0 else aux * 0.0
        if self.last:
            ce = token_loss_sum(model.lm_head(model.norm(x)).flatten(0, 1), targets.flatten())
            if self.t == 0:
                stats.token_loss += float(ce.detach())
            return x_in, ce / shape.global_tokens + aux, None
        comm.wait_activation_sent(comm.send_activation(x.detach(), self._peer(1), self.groups.next_group, self.env.timeout,
                                                       self._where(i)))
        return x_in, aux, x

    def _backward(self, i: int, x_in, loss, x_out, scale: float) -> None:
        if x_out is None:
            (loss * scale).backward()
        else:
            grad = comm.recv_activation(x_out.shape, x_out.dtype, self.env.device, self._peer(1), self.groups.next_group,
                                        self.env.timeout, self._where(i) + " (gradient)")
            torch.autograd.backward([x_out, loss * scale], [grad, None])
        if not self.first:
            comm.wait_activation_sent(comm.send_activation(x_in.grad, self._peer(-1), self.groups.prev_group, self.env.timeout,
                                                           self._where(i) + " (gradient)"))

    def _peer(self, stages: int) -> int:
        """Global rank of the same TP index `stages` stages on."""
        return (self.stage + stages) * self.plan.tp + self.t

    def _where(self, i: int) -> str:
        return f"rank {self.rank} (stage {self.stage}), micro-batch {i}"
