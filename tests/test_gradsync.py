"""Gradient sums over real gloo ranks (masep.parallel.gradsync), checked against a reference sum.

Ranks: 4 as 2 "nodes" x 2 (gpus_per_node=2) for the hierarchical path, 3 (nodes of 2 and 1
members) for the flat fallback. Inputs encode their sender (`_inputs`): integer values with a
term 16 * 2^rank, never zero, so a dropped or doubled rank changes every element, and small
enough (|sum| < 256) that fp32, bf16 and fp16 hold every partial sum exactly: uncompressed
sums are compared exactly. int8 sums are compared against bounds derived from the scales.
"""
from __future__ import annotations

import pytest
import torch

from masep.parallel.gradsync import (GradSync, SyncGroups, _pack, _unpack, build_sync_groups, dequantize_chunks,
                                     node_layout, quantize_chunks)
from masep.parallel.groups import init_distributed
from masep.parallel.launch import spawn

GPUS_PER_NODE = 2
CHUNK = 64  # small chunks so that the test buckets hold many of them
# Odd sizes: the bucket (3 + 15 + 0 + 1 + 1030 + 2 = 1051 elements) is no multiple of 2, 3, 4 or
# CHUNK, so every path pads; an empty tensor and a scalar ride along.
_SHAPES = [(3,), (3, 5), (0,), (), (1030,), (2, 1)]
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16]


def _inputs(rank: int, shapes=_SHAPES, dtypes=_DTYPES) -> list[torch.Tensor]:
    out = []
    for shape, dtype in zip(shapes, dtypes):
        j = torch.arange(torch.Size(shape).numel()).view(shape)
        out.append((16 * 2 ** rank + (j + rank) % 7 - 3).to(dtype))
    return out


def _reference(ranks: list[int]) -> list[torch.Tensor]:
    per_rank = [_inputs(r) for r in ranks]
    return [sum(ts[i].double() for ts in per_rank) for i in range(len(_SHAPES))]


def assert_sums_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w, dtype in zip(got, want, _DTYPES):
        assert g.dtype == dtype and g.shape == w.shape, f"dtype/shape not restored: {g.dtype} {g.shape}"
        assert torch.equal(g.double(), w), f"sum differs: max error {(g.double() - w).abs().max()}"


def _chunk_ids(N: int, L: int, C: int, K: int) -> torch.Tensor:
    """Which int8 chunk element j of an N-element bucket falls in: node shard l (length S),
    then cross-node shard p (length s), then chunk c (length K). The flat path is L = 1."""
    S = -(-N // L)
    s = -(-S // C)
    j = torch.arange(N)
    l, o = j // S, j % S
    return (l * C + o // s) * (-(-s // K)) + (o % s) // K


def _chunk_amax(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per element: max |x| over its chunk."""
    amax = torch.zeros(int(ids.max()) + 1, dtype=x.dtype).scatter_reduce_(0, ids, x.abs(), "amax")
    return amax[ids]


def int8_bound(parts: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |compressed sum - true sum| for one call without carried error.

    `parts` are what enters the compressed phase (node sums, or each rank's tensor on the flat
    path). Phase (a) rounds each part to its chunk's scale a_p / 127: at most a_p / 254 each.
    Phase (b) rounds the summed shard y to a_y / 127, a_y <= a_true + sum_p a_p / 254: at most
    a_y / 254. The 1e-5 relative slack covers fp32 arithmetic (x / scale, q * scale, sums)."""
    a_parts = sum(_chunk_amax(p, ids) for p in parts)
    a_y = _chunk_amax(sum(parts), ids) + a_parts / 254
    return (a_parts + a_y) / 254 + 1e-5 * (a_parts + 1e-30)


def _check_int8_once(groups, parts_fn, L: int, C: int, N: int, rank: int) -> float:
    """One int8 call on random data with per-chunk magnitudes from 1e-3 to 1e3; returns the
    int8 bytes ratio of the compressed phase."""
    ranks = groups.ranks
    def data(r):
        g = torch.Generator().manual_seed(100 + r)
        return torch.randn(N, generator=g) * 10.0 ** (torch.arange(N) // 97 % 7 - 3)
    sync = GradSync(groups, "int8", chunk_size=CHUNK)
    mine = data(rank)
    sync.sync_([mine])
    true = sum(data(r).double() for r in ranks).float()
    bound = int8_bound(parts_fn(data), _chunk_ids(N, L, C, CHUNK))
    err = (mine - true).abs()
    assert (err <= bound).all(), f"int8 error {float((err / bound).max()):.3f} x the bound"
    assert (err > 0).any(), "int8 lost nothing: was it compressed at all?"
    phase = "cross_node" if groups.hierarchical else "flat"
    sent, full = sync.traffic[phase]
    return sent / full


def _four_ranks(_) -> dict:
    env = init_distributed("cpu", timeout_s=30)
    rank, ranks = env.rank, [0, 1, 2, 3]
    every = build_sync_groups(ranks, GPUS_PER_NODE, env.timeout)  # every rank builds every group, in order
    single = build_sync_groups([2], GPUS_PER_NODE, env.timeout)
    one_node = build_sync_groups([1, 0], GPUS_PER_NODE, env.timeout)
    one_each = build_sync_groups([1, 3], GPUS_PER_NODE, env.timeout)
    assert every.hierarchical and every.reason.startswith("hierarchical: 2 nodes x 2 ranks"), every.reason
    assert "one node" in one_node.reason and "one member on each" in one_each.reason
    assert every.node_ranks == [rank - rank % 2, rank - rank % 2 + 1] and every.cross_ranks == [rank % 2, rank % 2 + 2]

    for native in (None, False):  # False: reduce-scatter as all_to_all + local sum (gloo without it)
        sync = GradSync(every)
        sync._native_reduce_scatter = native
        grads = _inputs(rank)
        sync.sync_(grads)
        assert_sums_equal(grads, _reference(ranks))
        sync.sync_([], bucket=1)  # an empty list: nothing to do (bucket 0 is the 1051-element one)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(999, generator=g)
    want = sum(torch.randn(999, generator=torch.Generator().manual_seed(r)) for r in ranks)
    GradSync(every).sync_([x])
    # fp32: the hierarchical order (x0 + x1) + (x2 + x3) differs from the reference's
    # ((x0 + x1) + x2) + x3 by at most two roundings of sums of size O(4): ~5e-7; 1e-5 is margin.
    torch.testing.assert_close(x, want, atol=1e-5, rtol=1e-5)

    if rank == 2:
        alone = _inputs(2)
        GradSync(single).sync_(alone)  # one rank: nothing to sum, inputs unchanged
        assert all(torch.equal(a, b) for a, b in zip(alone, _inputs(2)))
    else:
        with pytest.raises(ValueError, match="not in ranks"):
            GradSync(single)
    for flat in (one_node, one_each):
        if rank in flat.ranks:
            grads = _inputs(rank)
            GradSync(flat).sync_(grads)
            assert_sums_equal(grads, _reference(flat.ranks))

    node_sums = lambda data: [data(0) + data(1), data(2) + data(3)]  # noqa: E731 (what crosses nodes)
    ratio = _check_int8_once(every, node_sums, 2, 2, 1501, rank)
    _check_error_feedback(every, rank)
    _check_non_finite(every, rank)
    # rank 3 syncs 12 elements, the others 11: every rank raises before any payload moves, none hangs
    seen = r"3: \[12," if rank != 0 else r"nodes of ranks \[2\] disagree inside"
    with pytest.raises(ValueError, match=r"ranks disagree.*" + seen):
        GradSync(every).sync_([torch.ones(12 if rank == 3 else 11)], bucket=9)
    return {"cross_node_ratio": ratio}


def _check_error_feedback(groups, rank: int, steps: int = 40) -> None:
    """A constant component (delta) below the quantisation step: without error feedback every
    call rounds it away and the running error grows by 4 * delta per step; with it the running
    sum of results telescopes to the true running sum minus the errors still carried, at most
    (C * a_node + a_sum) / 254 for C = 2 nodes, whatever the number of steps."""
    N, delta = 1000, 2e-3
    spikes = torch.zeros(N)
    spikes[::16] = 1.0  # every chunk's scale ~1/127, so delta * 127 ~ 0.25 of a step rounds to 0
    errors = {}
    for feedback in (True, False):
        sync = GradSync(groups, "int8", chunk_size=CHUNK, error_feedback=feedback)
        run_got, run_true, errs = torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64), []
        for k in range(steps):
            sign = 1.0 if k % 3 else -1.0
            x = sign * spikes + delta
            run_true += 4 * x.double()
            sync.sync_([x])
            run_got += x.double()
            errs.append(float((run_got - run_true).abs().max()))
        errors[feedback] = errs
    # a_node = 2 (1 + delta), a_sum = 4 (1 + delta); 5% for carried error inflating the scales + fp32
    bound = (2 * 2 * (1 + delta) + 4 * (1 + delta)) / 254 * 1.05
    assert max(errors[True]) <= bound, f"error feedback: running error {max(errors[True]):.4f} > {bound:.4f}"
    # the same check fails without error feedback: the test can tell the two apart
    assert errors[False][-1] > 5 * bound and errors[False][-1] > 3 * errors[False][steps // 4 - 1]


def _check_non_finite(groups, rank: int) -> None:
    """An overflowed gradient (inf) shows in the result and is not carried into the next call."""
    sync = GradSync(groups, "int8", chunk_size=CHUNK)
    x = torch.ones(300)
    if rank == 0:
        x[5] = float("inf")
    sync.sync_([x], bucket=3)
    assert not torch.isfinite(x).all(), "an inf gradient must not vanish from the sum"
    x = torch.ones(300)
    sync.sync_([x], bucket=3)
    torch.testing.assert_close(x, torch.full((300,), 4.0), atol=3 * 4 / 254, rtol=0)


def _three_ranks(_) -> dict:
    env = init_distributed("cpu", timeout_s=30)
    groups = build_sync_groups([0, 1, 2], GPUS_PER_NODE, env.timeout)
    assert not groups.hierarchical and "uneven members per node {0: 2, 1: 1}" in groups.reason, groups.reason
    grads = _inputs(env.rank)
    GradSync(groups).sync_(grads)
    assert_sums_equal(grads, _reference([0, 1, 2]))
    ratio = _check_int8_once(groups, lambda data: [data(r) for r in range(3)], 1, 3, 1501, env.rank)
    sync = GradSync(groups, "int8")  # default 1024-element chunks, a large bucket: the steady-state ratio
    sync.sync_([torch.randn(3 * 2 ** 16 + 5)])
    return {"flat_ratio": ratio, "flat_ratio_1024": sync.bytes_sent / sync.bytes_uncompressed,
            "reason": groups.reason}


@pytest.mark.timeout(60)
def test_hierarchical_sums_on_two_nodes_of_two():
    out = spawn(4, _four_ranks, None, timeout_s=55)
    # int8 payload is 1/4 of fp32; a 4-byte scale per 64-element chunk adds 1/64 of the payload
    assert 0.25 <= out["cross_node_ratio"] <= 0.25 * (1 + 4 / CHUNK) + 0.01, out
    print(f"\nint8 bytes ratio, cross-node phase (chunk {CHUNK}): {out['cross_node_ratio']:.4f}")


@pytest.mark.timeout(60)
def test_flat_fallback_for_uneven_nodes():
    out = spawn(3, _three_ranks, None, timeout_s=55)
    assert 0.25 <= out["flat_ratio"] <= 0.25 * (1 + 4 / CHUNK) + 0.01, out
    assert 0.25 <= out["flat_ratio_1024"] <= 0.25 * (1 + 4 / 1024) + 1e-4, out  # 0.25098 + padding
    print(f"\nint8 bytes ratio, flat (chunk {CHUNK}): {out['flat_ratio']:.4f}; "
          f"chunk 1024: {out['flat_ratio_1024']:.5f}")


# --- without processes -----------------------------------------------------------------------------
def test_the_checks_catch_a_dropped_rank():
    """Planted bugs: a sum that misses rank 3 fails the exact check, and an int8 result that
    misses one node fails the int8 bound."""
    want = _reference([0, 1, 2, 3])
    dropped = [(w - x.double()).to(d) for w, x, d in zip(want, _inputs(3), _DTYPES)]
    with pytest.raises(AssertionError, match="sum differs"):
        assert_sums_equal(dropped, want)
    assert_sums_equal([w.to(d) for w, d in zip(want, _DTYPES)], want)  # and the right sum passes
    parts = [torch.randn(500), torch.randn(500)]
    ids = _chunk_ids(500, 2, 2, CHUNK)
    assert not ((parts[0] - sum(parts)).abs() <= int8_bound(parts, ids)).all()


def test_node_layout_reasons():
    assert node_layout([0, 1, 2, 3], 2)[1:] == (True, "hierarchical: 2 nodes x 2 ranks (gpus_per_node=2)")
    assert node_layout([0, 1, 2], 2)[1] is False and "uneven" in node_layout([0, 1, 2], 2)[2]
    assert node_layout([4, 5, 6, 7], 8)[1] is False and "one node" in node_layout([4, 5, 6, 7], 8)[2]
    assert node_layout([1, 9], 8)[1] is False and "one member on each" in node_layout([1, 9], 8)[2]
    assert node_layout([3], 8)[2] == "one rank: nothing to sum"
    # nodes are consecutive blocks of global ranks: 8-15 is node 1, whatever subset is used
    members, hier, _ = node_layout([2, 3, 10, 11], 8)
    assert hier and members == [[2, 3], [10, 11]]


def test_quantize_chunks_bound_and_padding():
    x = torch.randn(3, 150) * torch.logspace(-3, 3, 150)
    x[1, :64] = 0.0  # an all-zero chunk: scale 0, no division by zero
    q, scale = quantize_chunks(x, 64)
    assert q.dtype == torch.int8 and q.shape == (3, 150) and scale.shape == (3, 3)  # 150 = 64 + 64 + 22
    back = dequantize_chunks(q, scale, 64)
    step = scale.repeat_interleave(64, 1)[:, :150]
    assert ((back - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(back[1, :64], torch.zeros(64))


@pytest.mark.parametrize("peers", [1, 3])
def test_pack_unpack_round_trip(peers):
    # one peer: the message is a single row, so the scales' slice starts at an odd byte offset
    q, scale = quantize_chunks(torch.randn(peers, 133), 64)
    got_q, got_scale = _unpack(_pack(q, scale), 133)
    assert torch.equal(got_q, q) and torch.equal(got_scale, scale)


def test_invalid_settings_name_the_field():
    from datetime import timedelta
    groups = SyncGroups([0, 1], 0, False, "flat", timedelta(seconds=1))
    with pytest.raises(ValueError, match="compression='fp8'"):
        GradSync(groups, "fp8")
    with pytest.raises(ValueError, match="chunk_size=0"):
        GradSync(groups, "int8", chunk_size=0)
    with pytest.raises(ValueError, match="rank 5 is not in ranks"):
        GradSync(SyncGroups([0, 1], 5, False, "flat", timedelta(seconds=1)))
