"""The communication layer's differentiable side: autograd functions whose backward is the
transfer in reverse, so a trainer's `loss.backward()` runs through the split.

Head-parallel ranks (Megatron's f and g, and the token-slice pair):
  copy_to_heads    x -> x            backward: all-reduce (each rank's heads give a partial gradient)
  reduce_from_heads partial -> sum   backward: identity (every rank needs the whole gradient)
  split_rows       x [X, H] -> its rows [n, H]       backward: all-gather of the row gradients
  gather_rows      rows [n, H] -> x [X, H]           backward: this rank's rows of the gradient
Expert traffic:
  ep_expert_rows   EP: sorted rows -> expert outputs [N, H] over the symmetric exchange (this
                   rank's experts included); backward sends the output gradients to the ranks
                   whose experts produced them and receives the input gradients
(A separated attention rank cuts its graph at the bridge instead, parallel/train_separated.py,
so its micro-batches can interleave.)

Every transfer goes through comm.py (timeouts that name the peer and the schedule position).
Shapes: X tokens, n this rank's token slice, N rows sent (token, expert pairs), H hidden.
"""
from __future__ import annotations

from datetime import timedelta

import torch

from . import comm


class _CopyToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, timeout, what):
        ctx.args = (group, timeout, what)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        group, timeout, what = ctx.args
        return comm.replica_all_reduce(grad.contiguous().clone(), group, timeout, f"{what} (backward)"), None, None, None


class _ReduceFromHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, group, timeout, what):
        return comm.replica_all_reduce(partial.contiguous().clone(), group, timeout, what)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class _SplitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_XH, splits, index, group, timeout, what):
        ctx.args = (splits, index, group, timeout, what)
        start = sum(splits[:index])
        return x_XH[start:start + splits[index]].clone()

    @staticmethod
    def backward(ctx, grad_nH):
        splits, index, group, timeout, what = ctx.args
        full = comm.replica_all_gather_rows(grad_nH.contiguous(), splits, group, timeout, f"{what} (backward)")
        return full, None, None, None, None, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_nH, splits, index, group, timeout, what):
        ctx.args = (splits, index)
        return comm.replica_all_gather_rows(x_nH.contiguous(), splits, group, timeout, what)

    @staticmethod
    def backward(ctx, grad_XH):
        splits, index = ctx.args
        start = sum(splits[:index])
        return grad_XH[start:start + splits[index]], None, None, None, None, None


class HeadGroup:
    """A replica's (or stage's) head-parallel group as the four differentiable ops; a group of
    one rank makes each op the identity."""

    def __init__(self, group, size: int, index: int, timeout: timedelta, name: str):
        self.group, self.size, self.index, self.timeout, self.name = group, size, index, timeout, name

    def copy_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.size == 1 else _CopyToHeads.apply(x, self.group, self.timeout, self.name)

    def reduce_from_heads(self, partial: torch.Tensor) -> torch.Tensor:
        return partial if self.size == 1 else _ReduceFromHeads.apply(partial, self.group, self.timeout, self.name)

    def split_rows(self, x_XH: torch.Tensor, splits: list[int]) -> torch.Tensor:
        if self.size == 1:
            return x_XH
        return _SplitRows.apply(x_XH, splits, self.index, self.group, self.timeout, self.name)

    def gather_rows(self, x_nH: torch.Tensor, splits: list[int]) -> torch.Tensor:
        if self.size == 1:
            return x_nH
        return _GatherRows.apply(x_nH, splits, self.index, self.group, self.timeout, self.name)

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """A no-gradient sum over the group (the routed counts of a token group split over it)."""
        if self.size == 1:
            return counts
        return comm.replica_all_reduce(counts.clone(), self.group, self.timeout, f"{self.name}: expert counts")


class _EpExpertRows(torch.autograd.Function):
    """EP rank: its rows go to every rank holding their experts, this rank's experts serve the
    rows others sent (their graph is kept here and replayed when the gradients come back)."""

    @staticmethod
    def forward(ctx, z_XH, rows, bridge, layout, experts, layer, mb):
        handle = comm.ep_dispatch_rows(z_XH, rows, bridge, layout, len(experts.expert_ids), layer, mb)
        got = comm.ep_received(handle)
        with torch.enable_grad():
            x_in = got.x_NH.detach().requires_grad_()
            y = experts.forward_sorted(x_in, got.counts_L)
        comm.ep_combine_launch(handle, y.detach())
        ctx.handle, ctx.x_in, ctx.y, ctx.num_tokens = handle, x_in, y, z_XH.shape[0]
        return comm.ep_receive_back(handle)

    @staticmethod
    def backward(ctx, grad_NH):
        # backward(), not autograd.grad(): the expert weights' gradients must accumulate too.
        def input_grads_accumulating(grad_y):
            if ctx.y.numel():
                torch.autograd.backward(ctx.y, grad_y)
            return ctx.x_in.grad if ctx.x_in.grad is not None else torch.zeros_like(ctx.x_in)

        handle = ctx.handle
        grad_rows = comm.ep_exchange_grads(handle, grad_NH, input_grads_accumulating)
        grad_z = grad_rows.new_zeros(ctx.num_tokens, grad_rows.shape[1])
        return grad_z.index_add_(0, handle.sent.rows.token_R, grad_rows), None, None, None, None, None, None


def ep_expert_rows(z_XH: torch.Tensor, rows, bridge, layout, experts, layer: int, mb: int) -> torch.Tensor:
    return _EpExpertRows.apply(z_XH, rows, bridge, layout, experts, layer, mb)
