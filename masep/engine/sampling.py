"""Next tokens from logits, as a pure function of each row's parameters.

Greedy rows take the argmax. Sampled rows apply temperature, top-k, then top-p, and draw
with the exponential race: argmax(p / q), q ~ Exp(1), which picks token v with probability
p_v (vLLM and gpt-fast use the same draw). The noise q comes from a counter-based hash of
(seed, output index, token id) instead of a generator with state: the draw for a request's
n-th token is the same whichever batch, rank or replica computes it, so a request moved to
another replica after a failure, or one that joined a busy batch, samples exactly the tokens
it would have sampled alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SampleSpec:
    """How one row's next token is chosen. temperature 0 = greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    index: int = 0  # which output token of the request this is (0 = the first)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) without leaving int64 (a full product would overflow)."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply, good avalanche): every input bit flips
    about half the output bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seeds_R: torch.Tensor, index_R: torch.Tensor, vocab: int) -> torch.Tensor:
    """u [R, V] in (0, 1), float32: a deterministic function of (seed, index, token id)."""
    dev = seeds_R.device
    h = _mix32(seeds_R & _MASK32)
    h = _mix32(h ^ ((seeds_R >> 32) & _MASK32))
    h = _mix32(h ^ (index_R & _MASK32))
    v = torch.arange(vocab, dtype=torch.int64, device=dev)
    bits = _mix32((_mix32(h[:, None] ^ v[None, :]) + 0x9E3779B9) & _MASK32)
    return ((bits.double() + 0.5) / 2.0 ** 32).float()


def mask_top_k_top_p(logits_RV: torch.Tensor, top_k_R: torch.Tensor, top_p_R: torch.Tensor) -> torch.Tensor:
    """Logits with tokens outside each row's top-k (0 = off), then outside its top-p nucleus
    (1 = off), set to -inf. Top-k applies first and top-p sees the renormalised rest (vLLM's order)."""
    sorted_RV, order_RV = logits_RV.sort(dim=-1, descending=True)
    rank_V = torch.arange(logits_RV.shape[-1], device=logits_RV.device)
    k_R1, p_R1 = top_k_R[:, None], top_p_R[:, None]
    drop_RV = (k_R1 > 0) & (rank_V >= k_R1)
    probs_RV = sorted_RV.masked_fill(drop_RV, float("-inf")).softmax(-1)
    mass_before_RV = probs_RV.cumsum(-1) - probs_RV  # the first token always stays
    drop_RV |= (p_R1 < 1) & (mass_before_RV >= p_R1)
    return logits_RV.masked_fill(torch.zeros_like(drop_RV).scatter(-1, order_RV, drop_RV), float("-inf"))


def sample(logits_BV: torch.Tensor, specs: Sequence[SampleSpec | None]) -> list[int | None]:
    """One token per row (None where the spec is None: a prefill chunk that is not a prompt's
    last). One host read for the whole batch."""
    if not len(specs):
        return []
    tokens_B = logits_BV.argmax(-1)
    rows = [i for i, s in enumerate(specs) if s is not None and s.temperature > 0]
    if rows:
        dev = logits_BV.device
        picked = [specs[i] for i in rows]
        temp_R1 = torch.tensor([[s.temperature] for s in picked], dtype=torch.float32, device=dev)
        top_k_R = torch.tensor([s.top_k for s in picked], dtype=torch.long, device=dev)
        top_p_R = torch.tensor([s.top_p for s in picked], dtype=torch.float32, device=dev)
        seeds_R = torch.tensor([s.seed for s in picked], dtype=torch.long, device=dev)
        index_R = torch.tensor([s.index for s in picked], dtype=torch.long, device=dev)
        rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
        probs_RV = mask_top_k_top_p(logits_BV[rows_t].float() / temp_R1, top_k_R, top_p_R).softmax(-1)
        q_RV = -torch.log(uniform_noise(seeds_R, index_R, probs_RV.shape[-1]))
        tokens_B[rows_t] = (probs_RV / q_RV).argmax(-1)
    out = tokens_B.tolist()
    return [t if s is not None else None for t, s in zip(out, specs)]
