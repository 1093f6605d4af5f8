"""Routing arithmetic for the padded (fixed-capacity) transfers; pure tensor code, no messages.

A decode step must not read token counts on the host (that would stall the CPU until the GPU
catches up, once per transfer). So in a decode step every sender gives every receiver a block
of a fixed size, known to both sides from the step's handshake:

    block = [header rows | cap payload rows]      (all [*, H] in the model's dtype)

The header rows carry int64 [flag, step, layer, mb, c_0 .. c_{L-1}] reinterpreted as the
model's dtype (bytes travel unchanged); c_j = rows for the receiver's local expert j. Payload
rows are sorted by local expert, then zero padding up to `cap`. `cap` bounds what any token
mix can need: a sender with X tokens sends a receiver at most X * min(k, L) rows (each token
picks k distinct experts, at most L of them on one receiver), so nothing is ever dropped.

The receiver checks the headers on the device (a flag it reads once the step is over) and
clamps bad counts to zero first, so a corrupt header can never index outside the buffer.

Shape legend: X tokens, k top-k, P bridge members, D destinations, S senders, L local experts
(per member, the bridge's maximum), R header rows, C capacity rows, H hidden.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

HEADER = 4  # flag, step, layer, mb
FLAG_WORK = 1


def capacity(rows: int, top_k: int, max_local: int) -> int:
    """Payload rows a sender with `rows` tokens may need toward one receiver."""
    return rows * min(top_k, max_local)


def header_rows(max_local: int, hidden: int, dtype: torch.dtype) -> int:
    """Rows of width `hidden` (in `dtype`) that hold HEADER + max_local int64 values."""
    row_bytes = hidden * torch.empty(0, dtype=dtype).element_size()
    if row_bytes % 8:
        raise ValueError(f"hidden_size={hidden} in {dtype}: a row is {row_bytes} bytes, not a multiple of 8, "
                         "so int64 headers cannot ride in it; use a hidden size divisible by 4")
    return -(-8 * (HEADER + max_local) // row_bytes)


def encode_header(ints_DN: torch.Tensor, rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """int64 [D, n] -> [D, rows, hidden] in `dtype` with the same bytes (zero filled)."""
    d, n = ints_DN.shape
    per_row = hidden * torch.empty(0, dtype=dtype).element_size() // 8
    buf = torch.zeros(d, rows * per_row, dtype=torch.int64, device=ints_DN.device)
    buf[:, :n] = ints_DN
    return buf.view(dtype).view(d, rows, hidden)


def decode_header(rows_SRH: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of encode_header: [S, R, H] -> int64 [S, n]."""
    s = rows_SRH.shape[0]
    return rows_SRH.reshape(s, -1).contiguous().view(torch.int64)[:, :n]


@dataclass
class SortedRows:
    """A sender's X*k (token, expert) pairs sorted by (member, local expert)."""

    token_R: torch.Tensor  # [X*k] token of each sorted pair
    weight_R: torch.Tensor  # [X*k] routing weight of each sorted pair
    member_R: torch.Tensor  # [X*k] bridge member it goes to
    counts_PL: torch.Tensor  # [P, L] pairs per (member, local expert)


def sort_rows(ids_Xk: torch.Tensor, weights_Xk: torch.Tensor, member_E: torch.Tensor, local_E: torch.Tensor,
              members: int, max_local: int) -> SortedRows:
    """Sort the pairs by destination; counts by scatter_add (CUDA bincount reads its max to the host)."""
    k = ids_Xk.shape[1]
    member = member_E[ids_Xk].flatten()
    key = member * max_local + local_E[ids_Xk].flatten()
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(members * max_local, dtype=torch.long, device=ids_Xk.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    token = torch.div(torch.arange(key.numel(), device=key.device), k, rounding_mode="floor")[order]
    return SortedRows(token, weights_Xk.flatten()[order], member[order], counts.view(members, max_local))


@dataclass
class Packed:
    blocks: torch.Tensor  # [D, R + C, H] header rows, then payload rows (zero padded)
    pos_R: torch.Tensor  # [X*k] row of each sorted pair in the [D * C, H] outputs that come back
    rows: SortedRows


def pack(x_XH: torch.Tensor, rows: SortedRows, first_dest: int, num_dest: int, cap: int, hdr: int,
         head_4: torch.Tensor) -> Packed:
    """Blocks for members first_dest .. first_dest+num_dest-1 (see Packed).

    head_4: int64 [4] = flag, step, layer, mb for this transfer."""
    d_counts_DL = rows.counts_PL[first_dest:first_dest + num_dest]
    per_dest = d_counts_DL.sum(1)
    start_D = torch.cumsum(per_dest, 0) - per_dest  # first sorted pair of each destination
    dest_R = rows.member_R - first_dest
    rank_R = torch.arange(dest_R.numel(), device=dest_R.device) - start_D[dest_R]
    pos_R = dest_R * cap + rank_R
    hidden = x_XH.shape[1]
    ints = torch.cat([head_4.expand(num_dest, HEADER), d_counts_DL], dim=1)
    out = torch.zeros(num_dest, hdr + cap, hidden, dtype=x_XH.dtype, device=x_XH.device)
    out[:, :hdr] = encode_header(ints, hdr, hidden, x_XH.dtype)
    out.view(-1, hidden)[dest_R * (hdr + cap) + hdr + rank_R] = x_XH[rows.token_R]
    return Packed(out, pos_R, rows)


@dataclass
class Received:
    """Rows that arrived in padded blocks, reordered for grouped matmul."""

    x_NH: torch.Tensor  # [S*C, H] rows sorted by local expert; padding last
    counts_L: torch.Tensor  # [L_here] rows per local expert (over all senders)
    slot_N: torch.Tensor  # [S*C] payload slot of each sorted row (to send outputs back)
    bad_S: torch.Tensor  # [S] bool: header or counts of that sender were wrong (counts zeroed)


def unpack(blocks_SBH: torch.Tensor, hdr: int, max_local: int, num_local: int, head_4: torch.Tensor) -> Received:
    """blocks [S, hdr + C, H] from S senders -> Received, all on the device (no host read).

    head_4: the int64 [4] header every sender must have written for this transfer."""
    s, width, hidden = blocks_SBH.shape
    cap = width - hdr
    ints = decode_header(blocks_SBH[:, :hdr], HEADER + max_local)
    counts_SL = ints[:, HEADER:HEADER + num_local]
    bad = ((ints[:, :HEADER] != head_4).any(1) | (ints[:, HEADER + num_local:] != 0).any(1)
           | (counts_SL < 0).any(1) | (counts_SL.sum(1) > cap))
    counts_SL = torch.where(bad[:, None], 0, counts_SL)
    slot = torch.arange(cap, device=blocks_SBH.device).expand(s, cap).contiguous()
    # local expert of each payload slot; num_local (sorts last) for padding
    local_SC = torch.searchsorted(torch.cumsum(counts_SL, 1).contiguous(), slot, right=True)
    order = torch.argsort(local_SC.flatten(), stable=True)
    x = blocks_SBH[:, hdr:].reshape(s * cap, hidden)[order]
    return Received(x, counts_SL.sum(0), order, bad)


def unsort(y_NH: torch.Tensor, slot_N: torch.Tensor, senders: int) -> torch.Tensor:
    """Expert outputs back into payload slots: [S*C, H] sorted -> [S, C, H] as received."""
    back = torch.empty_like(y_NH)
    back[slot_N] = y_NH
    return back.view(senders, -1, y_NH.shape[1])


def gather(back_NH: torch.Tensor, pos_R: torch.Tensor, token_R: torch.Tensor, weight_R: torch.Tensor,
           num_tokens: int) -> torch.Tensor:
    """sum_k weight_k * expert_k(x) per token [X, H] from the returned rows [N, H] (padded
    blocks flattened, or exact rows); pos_R locates each sorted pair's output, token_R and
    weight_R (SortedRows) say whose it is and how much it counts."""
    hidden = back_NH.shape[-1]
    out = back_NH.reshape(-1, hidden)[pos_R] * weight_R[:, None].to(back_NH.dtype)
    y = torch.zeros(num_tokens, hidden, dtype=back_NH.dtype, device=back_NH.device)
    return y.index_add_(0, token_R, out)


def serve_blocks(blocks_SBH: torch.Tensor, expert_fn, hdr: int, max_local: int, num_local: int,
                 head_4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An expert rank's whole compute for one padded transfer (device work only, so a CUDA
    graph can hold it): blocks [S, R+C, H] -> outputs [S, C, H] in the slots they arrived in,
    rows per local expert [L], bad senders [S]. expert_fn(x_NH, counts_L) is Experts.forward_sorted."""
    got = unpack(blocks_SBH, hdr, max_local, num_local, head_4)
    y = expert_fn(got.x_NH, got.counts_L)
    return unsort(y, got.slot_N, blocks_SBH.shape[0]), got.counts_L, got.bad_S
