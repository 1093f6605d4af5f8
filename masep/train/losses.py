"""Training losses: next-token cross-entropy and the router's auxiliary losses.

Every loss here is written as a *sum of per-rank terms*, so that ranks holding disjoint slices of
one token group (the head-parallel ranks of a separated replica each route a slice of the
micro-batch's tokens) can each backpropagate their own term and the terms add up to the loss the
single-device trainer computes on the whole group.

Token groups: the auxiliary losses are defined per micro-batch (as Megatron-Core computes them),
so the single-device trainer, run with the same number of micro-batches, is the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossConfig:
    aux_coef: float = 0.01  # load-balancing loss weight (Switch Transformer uses 1e-2)
    z_coef: float = 0.0  # router z-loss weight (ST-MoE uses 1e-3); 0 turns it off

    def validate(self) -> "LossConfig":
        for name in ("aux_coef", "z_coef"):
            value = getattr(self, name)
            if not (value >= 0.0 and value < float("inf")):
                raise ValueError(f"{name}={value!r}: must be a finite number >= 0")
        return self


def token_loss_sum(logits_XV: torch.Tensor, targets_X: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy over X tokens, in float32: the trainer divides by the
    global batch's token count once, so replicas and micro-batches add up exactly."""
    return F.cross_entropy(logits_XV.float(), targets_X, reduction="sum")


def expert_counts(ids_Xk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed (token, expert) pairs per expert, float32 [E] (no gradient)."""
    counts = torch.zeros(num_experts, dtype=torch.float32, device=ids_Xk.device)
    return counts.index_add_(0, ids_Xk.flatten(), torch.ones(ids_Xk.numel(), device=ids_Xk.device))


def load_balance_term(logits_XE: torch.Tensor, counts_E: torch.Tensor, group_tokens: int) -> torch.Tensor:
    """This rank's term of the Switch / Mixtral load-balancing loss of one token group:

        E * sum_e f_e * P_e,   f_e = pairs routed to e / N,   P_e = mean router probability of e,

    with N the group's tokens (HF Mixtral's definition: f sums over the k choices, so a perfectly
    balanced top-k router scores k). counts_E is the whole group's (summed over the ranks that
    share it); only this rank's probabilities enter, so the ranks' terms add up to the loss."""
    probs = torch.softmax(logits_XE.float(), dim=-1)
    num_experts = logits_XE.shape[-1]
    return num_experts * (counts_E / group_tokens * probs.sum(0) / group_tokens).sum()


def z_loss_term(logits_XE: torch.Tensor, group_tokens: int) -> torch.Tensor:
    """This rank's term of ST-MoE's router z-loss, mean over the group of logsumexp(logits)^2."""
    return torch.logsumexp(logits_XE.float(), dim=-1).pow(2).sum() / group_tokens


def router_terms(records: list, num_experts: int, group_tokens: int, counts_fn=None) -> tuple:
    """(load-balancing, z) terms of one micro-batch summed over layers, from a Router's records
    [(logits [X, E], ids [X, k]), ...] (one per layer, in order). counts_fn(counts_E) sums the
    counts over the ranks sharing the group (identity on one rank). Also returns the per-layer
    expert loads [layers, E] for the log."""
    lb, z, loads = 0.0, 0.0, []
    for logits, ids in records:
        counts = expert_counts(ids, num_experts)
        counts = counts_fn(counts) if counts_fn is not None else counts
        loads.append(counts)
        lb = lb + load_balance_term(logits, counts, group_tokens)
        z = z + z_loss_term(logits, group_tokens)
    return lb, z, torch.stack(loads) if loads else None
