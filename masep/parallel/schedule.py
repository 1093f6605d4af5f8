"""Schedules as data: a rank's work for one step is a list of ops with yield points.

Each micro-batch has its own op list; `interleave` runs micro-batch 0 up to its first yield,
then micro-batch 1 up to its first yield, and so on round-robin. The resulting flat order is
what the runtime executes and what the simulator times, so both model the same thing.

Because every rank derives its order from the same rule, the collectives on each bridge
group are issued in the same sequence by attention and expert ranks, e.g. for m = 2:
  dispatch(l0,mb0) dispatch(l0,mb1) combine(l0,mb0) dispatch(l1,mb0) combine(l0,mb1) ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

# Op kinds. Attention side: attention (norm + attention + head-parallel all-reduce + router),
# dispatch (launch the send of hidden states), combine (wait for expert outputs, add to the
# residual, gather the replica's tokens). Expert side: recv (post every replica's receive),
# experts (one grouped matmul over every replica's rows of the (layer, micro-batch): the weights
# are read once), send (each replica's outputs on its own bridge). head (final norm + lm_head),
# only on attention ranks.
ATTENTION, DISPATCH, COMBINE, HEAD = "attention", "dispatch", "combine", "head"
# A dense layer (DeepSeek's first layers, layer < dense_layers below) has no experts: its MLP
# (norm + SwiGLU + residual) runs where its attention ran, and nothing crosses to the experts:
# attention(l) mlp(l), no dispatch, no yield (tp_pp: column-split, then its all-reduce).
MLP = "mlp"
RECV, EXPERTS, SEND = "recv", "experts", "send"
# tp_pp: head-parallel attention and hidden-split experts, each followed by an all-reduce in the
# TP group; activations move between pipeline stages with send_act / recv_act.
ALLREDUCE, SEND_ACT, RECV_ACT = "allreduce", "send_act", "recv_act"
YIELD = "yield"
COMM_KINDS = (DISPATCH, COMBINE, RECV, SEND, ALLREDUCE, SEND_ACT, RECV_ACT)
# Training adds the backward of each op and the step's end. The gradients cross the bridge in
# reverse: dispatch_grad (attention side) == recv_grad (expert side) carries the gradients of
# the expert outputs to the experts; combine_grad == send_grad brings the gradients of their
# inputs back. EP runs both sides on every rank (dispatch_grad, experts_bwd, combine_grad).
ATTENTION_BWD, EXPERTS_BWD, HEAD_BWD = "attention_bwd", "experts_bwd", "head_bwd"
DISPATCH_GRAD, COMBINE_GRAD, RECV_GRAD, SEND_GRAD = "dispatch_grad", "combine_grad", "recv_grad", "send_grad"
ALLREDUCE_BWD, SEND_ACT_GRAD, RECV_ACT_GRAD = "allreduce_bwd", "send_act_grad", "recv_act_grad"
GRAD_SYNC, OPTIMIZER = "grad_sync", "optimizer"
TRAIN_COMM_KINDS = (DISPATCH_GRAD, COMBINE_GRAD, RECV_GRAD, SEND_GRAD, ALLREDUCE_BWD, SEND_ACT_GRAD, RECV_ACT_GRAD)


@dataclass(frozen=True)
class Op:
    kind: str
    layer: int = -1
    mb: int = -1

    def __str__(self) -> str:
        return f"{self.kind}(l{self.layer},mb{self.mb})" if self.layer >= 0 else f"{self.kind}(mb{self.mb})"


def attention_microbatch_ops(num_layers: int, mb: int, dense_layers: int = 0) -> list[Op]:
    """One micro-batch on an attention rank: yield while the experts work on it (layers
    [0, dense_layers) are dense: their MLP runs here, no transfer)."""
    ops: list[Op] = []
    for layer in range(num_layers):
        if layer < dense_layers:
            ops += [Op(ATTENTION, layer, mb), Op(MLP, layer, mb)]
        else:
            ops += [Op(ATTENTION, layer, mb), Op(DISPATCH, layer, mb), Op(YIELD, layer, mb), Op(COMBINE, layer, mb)]
    return ops + [Op(HEAD, -1, mb)]


def expert_ops_following(attention_ops: Iterable[Op]) -> list[Op]:
    """An expert rank's op list: the attention side's bridge collectives in the same order
    (recv == dispatch, send == combine), each micro-batch's expert computation right before its
    send: for m = 2, recv(0) recv(1) experts(0) send(0) recv(0') experts(1) send(1) ...

    recv only posts the receive; experts waits for it. A send's launch depends on everything
    already queued on the compute stream, so queueing experts(1) before send(0) would hold
    micro-batch 0's outputs until micro-batch 1's experts finish; queued this way, they leave
    while micro-batch 1 is computed. The host runs ahead of the GPU (no host reads in a decode
    step), so a computation queued late on the host still starts when its rows arrive."""
    ops: list[Op] = []
    for kind, layer, mb in comm_sequence(attention_ops):
        if kind == "a2e":
            ops.append(Op(RECV, layer, mb))
        elif kind == "e2a":
            ops += [Op(EXPERTS, layer, mb), Op(SEND, layer, mb)]
    return ops


def interleave(per_mb: list[list[Op]]) -> list[Op]:
    """Round-robin over micro-batches, switching at yield points; yields are dropped."""
    cursors = [0] * len(per_mb)
    out: list[Op] = []
    while any(c < len(ops) for c, ops in zip(cursors, per_mb)):
        for i, ops in enumerate(per_mb):
            while cursors[i] < len(ops):
                op = ops[cursors[i]]
                cursors[i] += 1
                if op.kind == YIELD:
                    break
                out.append(op)
    return out


def separated_schedule(role_kind: str, num_layers: int, microbatches: int, dense_layers: int = 0) -> list[Op]:
    attention = interleave([attention_microbatch_ops(num_layers, mb, dense_layers) for mb in range(microbatches)])
    return attention if role_kind == "attention" else expert_ops_following(attention)


def ep_microbatch_ops(num_layers: int, mb: int, dense_layers: int = 0) -> list[Op]:
    """Colocated EP: every rank runs attention on its own sequences and a share of the experts.
    Yields after each all-to-all launch, so one micro-batch's transfer hides under the other's
    compute (two-batch overlap when m = 2). A dense layer's MLP runs locally, no all-to-all."""
    ops: list[Op] = []
    for layer in range(num_layers):
        if layer < dense_layers:
            ops += [Op(ATTENTION, layer, mb), Op(MLP, layer, mb)]
            continue
        ops += [Op(ATTENTION, layer, mb), Op(DISPATCH, layer, mb), Op(YIELD, layer, mb),
                Op(EXPERTS, layer, mb), Op(COMBINE, layer, mb), Op(YIELD, layer, mb)]
    return ops + [Op(HEAD, -1, mb)]


def ep_schedule(num_layers: int, microbatches: int, dense_layers: int = 0) -> list[Op]:
    return interleave([ep_microbatch_ops(num_layers, mb, dense_layers) for mb in range(microbatches)])


def tp_pp_stage_ops(layers: range, stage: int, stages: int, mb: int, dense_layers: int = 0) -> list[Op]:
    """One micro-batch on one rank of pipeline stage `stage` (layers of that stage only); a
    dense layer's column-split MLP takes the experts' place."""
    ops: list[Op] = [Op(RECV_ACT, layers.start, mb)] if stage > 0 else []
    for layer in layers:
        ffn = MLP if layer < dense_layers else EXPERTS
        ops += [Op(ATTENTION, layer, mb), Op(ALLREDUCE, layer, mb), Op(ffn, layer, mb), Op(ALLREDUCE, layer, mb)]
    ops.append(Op(SEND_ACT, layers.stop - 1, mb) if stage < stages - 1 else Op(HEAD, -1, mb))
    return ops + [Op(YIELD, layers.stop - 1, mb)]


def tp_pp_schedule(layers: range, stage: int, stages: int, microbatches: int, dense_layers: int = 0) -> list[Op]:
    """GPipe order for inference: a stage runs micro-batch 0, then 1, ...; the stages overlap
    because stage s works on micro-batch i+1 while stage s+1 works on i."""
    return interleave([tp_pp_stage_ops(layers, stage, stages, mb, dense_layers) for mb in range(microbatches)])


# --- training: a step is every micro-batch's forward, then their backwards in reverse (GPipe) ----------
def _training(forward, backward, microbatches: int) -> list[Op]:
    """forward(mb) and backward(mb) op lists -> the step's ops, ending in the gradient sync and
    the optimizer. The backwards run in reverse micro-batch order: the last forward's graph is
    the first one freed (parallel/training.py runs exactly this order)."""
    ops: list[Op] = []
    for mb in range(microbatches):
        ops += forward(mb)
    for mb in reversed(range(microbatches)):
        ops += backward(mb)
    return ops + [Op(GRAD_SYNC), Op(OPTIMIZER)]


def attention_backward_ops(num_layers: int, mb: int) -> list[Op]:
    """One micro-batch's backward on a separated attention rank: yield while the experts turn
    the output gradients into input gradients."""
    ops = [Op(HEAD_BWD, -1, mb)]
    for layer in reversed(range(num_layers)):
        ops += [Op(DISPATCH_GRAD, layer, mb), Op(YIELD, layer, mb), Op(COMBINE_GRAD, layer, mb),
                Op(ATTENTION_BWD, layer, mb)]
    return ops


def train_attention_schedule(num_layers: int, microbatches: int) -> list[Op]:
    """A separated attention rank's training step: the forward interleaved as decode's
    (attention_microbatch_ops), then the backward interleaved the same way, last micro-batch
    first, then the gradient sync and the optimizer."""
    forward = interleave([attention_microbatch_ops(num_layers, mb) for mb in range(microbatches)])
    backward = interleave([attention_backward_ops(num_layers, mb) for mb in reversed(range(microbatches))])
    return forward + backward + [Op(GRAD_SYNC), Op(OPTIMIZER)]


def train_expert_ops_following(attention_ops: Iterable[Op]) -> list[Op]:
    """A training expert rank serves each (layer, micro-batch) as soon as its rows (or their
    output gradients) arrive: receive, compute, send, in the attention side's order. The
    outputs and input gradients return on the bridge's second group, whose order (the
    attention side's combines) is the same as the dispatches', so each group sees one order."""
    ops: list[Op] = []
    for kind, layer, mb in comm_sequence(attention_ops):
        if kind == "a2e":
            ops += [Op(RECV, layer, mb), Op(EXPERTS, layer, mb), Op(SEND, layer, mb)]
        elif kind == "a2e_grad":
            ops += [Op(RECV_GRAD, layer, mb), Op(EXPERTS_BWD, layer, mb), Op(SEND_GRAD, layer, mb)]
    return ops


def train_separated_schedule(role_kind: str, num_layers: int, microbatches: int) -> list[Op]:
    """Training step of a separated rank; the expert side follows the attention side's bridge
    order (`train_expert_ops_following`), then syncs its gradients and steps its optimizer."""
    attention = train_attention_schedule(num_layers, microbatches)
    if role_kind == "attention":
        return attention
    return train_expert_ops_following(attention) + [Op(GRAD_SYNC), Op(OPTIMIZER)]


def train_ep_schedule(num_layers: int, microbatches: int) -> list[Op]:
    def forward(mb):
        return [op for layer in range(num_layers) for op in
                (Op(ATTENTION, layer, mb), Op(DISPATCH, layer, mb), Op(EXPERTS, layer, mb),
                 Op(COMBINE, layer, mb))] + [Op(HEAD, -1, mb)]

    def backward(mb):
        return [Op(HEAD_BWD, -1, mb)] + [op for layer in reversed(range(num_layers)) for op in
                                         (Op(DISPATCH_GRAD, layer, mb), Op(EXPERTS_BWD, layer, mb),
                                          Op(COMBINE_GRAD, layer, mb), Op(ATTENTION_BWD, layer, mb))]
    return _training(forward, backward, microbatches)


def train_single_schedule(num_layers: int, microbatches: int) -> list[Op]:
    def forward(mb):
        return [op for layer in range(num_layers) for op in (Op(ATTENTION, layer, mb), Op(EXPERTS, layer, mb))] \
            + [Op(HEAD, -1, mb)]

    def backward(mb):
        return [Op(HEAD_BWD, -1, mb)] + [op for layer in reversed(range(num_layers)) for op in
                                         (Op(EXPERTS_BWD, layer, mb), Op(ATTENTION_BWD, layer, mb))]
    return _training(forward, backward, microbatches)


def train_tp_pp_schedule(layers: range, stage: int, stages: int, microbatches: int) -> list[Op]:
    """One rank of a stage. Forward as in inference; backward: the next stage's gradient (or the
    loss), each layer's experts and attention backward with the all-reduce of the gradient of
    their input (Megatron's f), the gradient of the stage's input to the previous stage."""
    def forward(mb):
        ops = [Op(RECV_ACT, layers.start, mb)] if stage > 0 else []
        for layer in layers:
            ops += [Op(ATTENTION, layer, mb), Op(ALLREDUCE, layer, mb), Op(EXPERTS, layer, mb), Op(ALLREDUCE, layer, mb)]
        return ops + [Op(SEND_ACT, layers.stop - 1, mb) if stage < stages - 1 else Op(HEAD, -1, mb)]

    def backward(mb):
        ops = [Op(RECV_ACT_GRAD, layers.stop - 1, mb) if stage < stages - 1 else Op(HEAD_BWD, -1, mb)]
        for layer in reversed(layers):
            ops += [Op(EXPERTS_BWD, layer, mb), Op(ALLREDUCE_BWD, layer, mb), Op(ATTENTION_BWD, layer, mb),
                    Op(ALLREDUCE_BWD, layer, mb)]
        return ops + ([Op(SEND_ACT_GRAD, layers.start, mb)] if stage > 0 else [])
    return _training(forward, backward, microbatches)


def comm_sequence(ops: Iterable[Op]) -> list[tuple[str, int, int]]:
    """The order of bridge collectives an op list issues, with attention/expert names unified
    (dispatch == recv, combine == send): equal sequences mean the two sides cannot mismatch."""
    unify = {DISPATCH: "a2e", RECV: "a2e", COMBINE: "e2a", SEND: "e2a",
             DISPATCH_GRAD: "a2e_grad", RECV_GRAD: "a2e_grad", COMBINE_GRAD: "e2a_grad", SEND_GRAD: "e2a_grad"}
    return [(unify[op.kind], op.layer, op.mb) for op in ops if op.kind in unify]


def execute(ops: Iterable[Op], handlers: dict[str, Callable[[Op], None]],
            on_op: Callable[[Op, float, float], None] | None = None) -> None:
    """Run ops in order by kind; `on_op(op, start, end)` records per-op wall times."""
    import time
    for op in ops:
        start = time.perf_counter()
        handlers[op.kind](op)
        if on_op is not None:
            on_op(op, start, time.perf_counter())
