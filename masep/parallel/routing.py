"""Routing arithmetic for the padded (fixed-capacity) transfers; pure tensor code, no messages.

A decode step must not read token counts on the host (that would stall the CPU until the GPU
catches up, once per transfer). So in a decode step every sender gives every receiver a block
of a fixed size, known to both sides from the step's handshake:

    block = [header rows | cap payload rows]      (all [*, H] in the model's dtype)

The header rows carry int64 [flag, step, layer, mb, c_0 .. c_{L-1}, demand] reinterpreted as
the model's dtype (bytes travel unchanged); c_j = rows for the receiver's local expert j in this
block; demand = the most rows the sender had for any one receiver in this transfer. Payload rows
are sorted by local expert, then zero padding up to `cap`. The sender sizes `cap` from the
routing (capacity.py); when a receiver's rows do not fit, the rows past `cap` are not sent (the
counts say what was), and every receiver sees demand > cap in the header: the step is run again
at the worst-case capacity (X * min(k, L) rows, which any token mix fits), so nothing is dropped.

The receiver checks the headers on the device (a flag it reads once the step is over) and
clamps bad counts to zero first, so a corrupt header can never index outside the buffer.

Shape legend: X tokens, k top-k, P bridge members, D destinations, S senders, L local experts
(per member, the bridge's maximum), R header rows, C capacity rows, H hidden, N received rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .capacity import worst_case

HEADER = 4  # flag, step, layer, mb
FLAG_WORK = 1


def capacity(rows: int, top_k: int, max_local: int) -> int:
    """The worst-case payload rows toward one receiver (capacity.worst_case): any token mix fits."""
    return worst_case(rows, top_k, max_local)


def block_fields(max_local: int) -> int:
    """int64 values in a block's header: HEADER, one count per local expert, the demand."""
    return HEADER + max_local + 1


def header_rows(max_local: int, hidden: int, dtype: torch.dtype) -> int:
    """Rows of width `hidden` (in `dtype`) that hold block_fields(max_local) int64 values."""
    row_bytes = hidden * torch.empty(0, dtype=dtype).element_size()
    if row_bytes % 8:
        raise ValueError(f"hidden_size={hidden} in {dtype}: a row is {row_bytes} bytes, not a multiple of 8, "
                         "so int64 headers cannot ride in it; use a hidden size divisible by 4")
    return -(-8 * block_fields(max_local) // row_bytes)


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
    keep_R: torch.Tensor  # [X*k] bool: the pair fit in its block (all True unless the transfer overflowed)
    demand: torch.Tensor  # int64 []: the most rows one destination needed (> C: overflowed)


def pack(x_XH: torch.Tensor, rows: SortedRows, first_dest: int, num_dest: int, cap: int, hdr: int,
         head_4: torch.Tensor) -> Packed:
    """Blocks for members first_dest .. first_dest+num_dest-1 (see Packed); device work only.

    head_4: int64 [4] = flag, step, layer, mb for this transfer. Rows past `cap` toward one
    destination are left out (the header counts what was sent; `demand` > cap says so)."""
    d_counts_DL = rows.counts_PL[first_dest:first_dest + num_dest]
    per_dest = d_counts_DL.sum(1)
    demand = per_dest.max() if num_dest else per_dest.new_zeros(())
    start_D = torch.cumsum(per_dest, 0) - per_dest  # first sorted pair of each destination
    dest_R = rows.member_R - first_dest
    rank_R = torch.arange(dest_R.numel(), device=dest_R.device) - start_D[dest_R]
    keep_R = rank_R < cap
    # the rows each local expert gets within the capacity: clamp the running count, then difference
    sent_DL = torch.diff(torch.cumsum(d_counts_DL, 1).clamp(max=cap), dim=1, prepend=d_counts_DL.new_zeros(num_dest, 1))
    hidden = x_XH.shape[1]
    ints = torch.cat([head_4.expand(num_dest, HEADER), sent_DL, demand.expand(num_dest, 1)], dim=1)
    width = hdr + cap
    flat = torch.zeros(num_dest * width + 1, hidden, dtype=x_XH.dtype, device=x_XH.device)  # + 1: a sink row
    target = torch.where(keep_R, dest_R * width + hdr + rank_R, num_dest * width)
    flat[target] = x_XH[rows.token_R]
    out = flat[:-1].view(num_dest, width, hidden)
    out[:, :hdr] = encode_header(ints, hdr, hidden, x_XH.dtype)
    # a pair left out points at row 0 (gather masks it): no index outside the returned rows
    pos_R = torch.where(keep_R, dest_R * cap + rank_R, 0)
    return Packed(out, pos_R, rows, keep_R, demand)


@dataclass
class Received:
    """Rows that arrived in padded blocks, reordered for grouped matmul."""

    x_NH: torch.Tensor  # [S*C, H] rows sorted by local expert; padding last
    counts_L: torch.Tensor  # [L_here] rows per local expert (over all senders)
    slot_N: torch.Tensor  # [S*C] payload slot of each sorted row (to send outputs back)
    bad_S: torch.Tensor  # [S] bool: header or counts of that sender were wrong (counts zeroed)
    local_N: torch.Tensor  # [S*C] local expert of each sorted row (L_here for padding)
    demand_S: torch.Tensor  # [S] each sender's largest rows to one receiver in this transfer


def unpack(blocks_SBH: torch.Tensor, hdr: int, max_local: int, num_local: int, head_4: torch.Tensor) -> Received:
    """blocks [S, hdr + C, H] from S senders -> Received, all on the device (no host read).

    head_4: the int64 [4] header every sender must have written for this transfer."""
    s, width, hidden = blocks_SBH.shape
    cap = width - hdr
    ints = decode_header(blocks_SBH[:, :hdr], block_fields(max_local))
    counts_SL = ints[:, HEADER:HEADER + num_local]
    bad = ((ints[:, :HEADER] != head_4).any(1) | (ints[:, HEADER + num_local:HEADER + max_local] != 0).any(1)
           | (counts_SL < 0).any(1) | (counts_SL.sum(1) > cap))
    counts_SL = torch.where(bad[:, None], 0, counts_SL)
    slot = torch.arange(cap, device=blocks_SBH.device).expand(s, cap).contiguous()
    # local expert of each payload slot; num_local (sorts last) for padding
    local_SC = torch.searchsorted(torch.cumsum(counts_SL, 1).contiguous(), slot, right=True)
    order = torch.argsort(local_SC.flatten(), stable=True)
    x = blocks_SBH[:, hdr:].reshape(s * cap, hidden)[order]
    return Received(x, counts_SL.sum(0), order, bad, local_SC.flatten()[order], ints[:, HEADER + max_local])


def unsort(y_NH: torch.Tensor, slot_N: torch.Tensor, senders: int) -> torch.Tensor:
    """Expert outputs back into payload slots: [S*C, H] sorted -> [S, C, H] as received."""
    back = torch.empty_like(y_NH)
    back[slot_N] = y_NH
    return back.view(senders, -1, y_NH.shape[1])


def gather(back_NH: torch.Tensor, pos_R: torch.Tensor, token_R: torch.Tensor, weight_R: torch.Tensor,
           num_tokens: int, keep_R: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weight_k * expert_k(x) per token [X, H] from the returned rows [N, H] (padded
    blocks flattened, or exact rows); pos_R locates each sorted pair's output, token_R and
    weight_R (SortedRows) say whose it is and how much it counts; keep_R (padded) masks the
    pairs an overflowing transfer left out (that step runs again; masked, its values stay finite)."""
    hidden = back_NH.shape[-1]
    out = back_NH.reshape(-1, hidden)[pos_R] * weight_R[:, None].to(back_NH.dtype)
    if keep_R is not None:
        out = torch.where(keep_R[:, None], out, 0)
    y = torch.zeros(num_tokens, hidden, dtype=back_NH.dtype, device=back_NH.device)
    return y.index_add_(0, token_R, out)


def weighted_sum(num_tokens: int, back_NH, pos_R, token_R, weight_R, keep_R=None) -> torch.Tensor:
    """gather() with the token count first: the rest is a handle's combine inputs
    (comm.DispatchHandle.combine_inputs), passed through a CUDA-graph segment as they are."""
    return gather(back_NH, pos_R, token_R, weight_R, num_tokens, keep_R)


def local_of_rows(counts_L: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows] local expert of each row of an expert-sorted batch with counts_L [L] (L for rows
    past the counts: padding). Device work only (no repeat_interleave, whose size is a host read)."""
    slot = torch.arange(rows, device=counts_L.device)
    return torch.searchsorted(torch.cumsum(counts_L, 0).contiguous(), slot, right=True)


def merge_by_expert(x_list: list[torch.Tensor], local_list: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several expert-sorted batches (one per replica) -> one: rows [M, H] sorted by local expert
    across all of them (padding last), and order_M, the row of the concatenation each came from.
    One grouped matmul then reads each expert's weights once for every replica's rows."""
    key = torch.cat(local_list)
    order = torch.argsort(key, stable=True)
    return torch.cat(x_list)[order], order


def split_merged(y_MH: torch.Tensor, order_M: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Inverse of merge_by_expert for the outputs: each batch's rows [N_i, H], in its own order."""
    back = torch.empty_like(y_MH)
    back[order_M] = y_MH
    return list(back.split(sizes))


@dataclass
class Served:
    """An expert rank's compute for the padded transfers of one (layer, micro-batch)."""

    back: list  # per transfer: outputs [S, C, H] in the slots the rows arrived in
    counts_L: torch.Tensor  # [L] rows per local expert, over every transfer
    bad: list  # per transfer: [S] bool, a sender's header or counts were wrong
    demand: list  # per transfer: [S] each sender's largest rows to one receiver


def serve_blocks(blocks: list[torch.Tensor], heads: list[torch.Tensor], expert_fn, hdr: int, max_local: int,
                 num_local: int) -> Served:
    """An expert rank's whole compute for the padded transfers of one (layer, micro-batch), one
    block set [S_i, R+C_i, H] per transfer (per replica's bridge, or the one EP exchange) with
    its header heads[i] int64 [4]: every transfer's rows in ONE grouped matmul (the weights are
    read once), each transfer's outputs back in its own slots. Device work only, so a CUDA graph
    can hold it. expert_fn(x_NH, counts_L) is Experts.forward_sorted."""
    got = [unpack(b, hdr, max_local, num_local, h) for b, h in zip(blocks, heads)]
    if len(got) == 1:  # nothing to merge
        ys = [expert_fn(got[0].x_NH, got[0].counts_L)]
        counts = got[0].counts_L
    else:
        x, order = merge_by_expert([g.x_NH for g in got], [g.local_N for g in got])
        counts = torch.stack([g.counts_L for g in got]).sum(0)
        ys = split_merged(expert_fn(x, counts), order, [g.x_NH.shape[0] for g in got])
    back = [unsort(y, g.slot_N, b.shape[0]) for y, g, b in zip(ys, got, blocks)]
    return Served(back, counts, [g.bad_S for g in got], [g.demand_S for g in got])
