"""How many payload rows a padded (decode) block carries: sized from the routing, never too small.

A decode step sends every receiver a block of a size both sides know before the step (from the
handshake), so nothing is read on the host inside the step. The worst case a sender with X tokens
can need toward one receiver is X * min(k, L) rows (each token picks k distinct experts, at most L
of them on one receiver); sizing every block for it moves min(k, L) * receivers / k times the
rows the routing actually sends (3-4x the bytes at EP4 with balanced routing).

So the sender sizes the block from what the routing did: `share` is the largest number of rows
per token that one receiver got in recent steps (a running max that decays), never below the
balanced share k * L_max / E (the fullest receiver's mean), and the capacity is
    cap(X) = min(X * min(k, L), round_up(X * share * margin))
When a transfer needs more (the device sees it: the sender writes its largest per-receiver row
count into every block's header, capacity.py's caller keeps the step's maximum in a device
buffer), the rows past the capacity are not sent, the step's result is discarded and the step
runs again at the worst-case capacity: a step is idempotent (it rewrites the same KV positions),
so no token is ever dropped. The flag is read on the host once the step is over, with the logits.

Pure arithmetic, no torch: the cost model uses the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def worst_case(rows: int, top_k: int, max_local: int) -> int:
    """Payload rows a sender with `rows` tokens may need toward one receiver."""
    return rows * min(top_k, max_local)


def round_up(rows: int) -> int:
    """The next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^n and 1.5 * 2^n): few distinct block
    sizes, so CUDA graphs keyed by the capacity are captured a few times, not once per step."""
    if rows <= 2:
        return max(rows, 0)
    power = 1 << (rows - 1).bit_length()  # smallest power of two >= rows
    return power * 3 // 4 if power * 3 // 4 >= rows else power


@dataclass
class CapacityPolicy:
    """Capacity of the next padded transfers of one sender (or of ranks that must agree: they
    feed it the same observations). `balanced_share` = top_k * max_local / num_experts."""

    top_k: int
    max_local: int
    balanced_share: float
    margin: float = 1.5  # head-room over the largest share seen: a burst beyond it costs a rerun
    decay: float = 0.9  # per step: a burst stops widening the blocks after some tens of steps
    share: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.margin >= 1.0:
            raise ValueError(f"CapacityPolicy.margin={self.margin!r}: must be >= 1 (below it the balanced "
                             "routing overflows every step)")
        self.share = self.balanced_share

    @classmethod
    def for_placement(cls, top_k: int, placement, num_experts: int, **kw) -> "CapacityPolicy":
        max_local = max(len(p) for p in placement)
        return cls(top_k, max_local, top_k * max_local / num_experts, **kw)

    def cap(self, rows: int, full: bool = False) -> int:
        """Payload rows per block for a sender of `rows` tokens (`full`: the worst case)."""
        worst = worst_case(rows, self.top_k, self.max_local)
        if full or rows == 0:
            return worst
        return min(worst, round_up(math.ceil(rows * self.share * self.margin)))

    def caps(self, rows_M: list[int], full: bool = False) -> list[int]:
        return [self.cap(r, full) for r in rows_M]

    def observe(self, demand_M: list[int], rows_M: list[int]) -> None:
        """After a step: demand_M[i] = the most rows one sender sent one receiver in micro-batch
        i (any layer), rows_M[i] = the tokens the capacity was sized for."""
        seen = max((d / r for d, r in zip(demand_M, rows_M) if r), default=0.0)
        self.share = max(seen, self.share * self.decay, self.balanced_share)
