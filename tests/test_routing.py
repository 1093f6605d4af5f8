"""Padded-transfer arithmetic (masep/parallel/routing.py) on one process: blocks built by a
sender and read by receivers must deliver every (token, expert) pair exactly once, and bad
headers must be caught on the device without indexing outside the buffer.

Tolerance: fp32; the round trip only moves rows and sums at most top_k weighted products per
token, so results match a direct per-pair loop to ~1e-6 (atol 1e-5)."""
from __future__ import annotations

import pytest
import torch

from masep.parallel import routing
from masep.parallel.graphs import SegmentGraphs

H, E, K = 64, 8, 2
MEMBER_E = torch.tensor([1, 1, 1, 1, 2, 2, 2, 3])  # member 0 sends; 1..3 hold 4, 3 and 1 experts
LOCAL_E = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])
MAX_LOCAL = 4


def _route(x_tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(x_tokens)]) if x_tokens else \
        torch.zeros(0, K, dtype=torch.long)
    return torch.randn(x_tokens, H, generator=gen), ids, torch.rand(x_tokens, K, generator=gen)


def _round_trip(x, ids, w, head):
    """Sender packs for members 1..3; each receiver serves with a per-expert matrix; sender gathers."""
    mats = torch.randn(E, H, H, generator=torch.Generator().manual_seed(9))
    rows = routing.sort_rows(ids, w, MEMBER_E, LOCAL_E, 4, MAX_LOCAL)
    cap, hdr = routing.capacity(x.shape[0], K, MAX_LOCAL), routing.header_rows(MAX_LOCAL, H, x.dtype)
    packed = routing.pack(x, rows, 1, 3, cap, hdr, head)
    backs = []
    for d in range(3):
        held = [e for e in range(E) if MEMBER_E[e] == d + 1]

        def expert_fn(x_NH, counts_L, held=held):
            out, start = torch.zeros_like(x_NH), 0
            for local, n in enumerate(counts_L.tolist()):
                out[start:start + n] = x_NH[start:start + n] @ mats[held[local]]
                start += n
            return out

        back, counts, bad = routing.serve_blocks(packed.blocks[d:d + 1], expert_fn, hdr, MAX_LOCAL, len(held), head)
        assert not bad.any()
        assert int(counts.sum()) == int((MEMBER_E[ids] == d + 1).sum())
        backs.append(back)
    y = routing.gather(torch.cat(backs), packed.pos_R, rows.token_R, rows.weight_R, x.shape[0])
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(K):
            expected[t] += w[t, j] * (x[t] @ mats[ids[t, j]])
    return y, expected


@pytest.mark.parametrize("tokens", [0, 1, 5, 13])
def test_padded_round_trip_delivers_every_pair_once(tokens):
    x, ids, w = _route(tokens, seed=tokens)
    y, expected = _round_trip(x, ids, w, torch.tensor([1, 3, 0, 1]))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_capacity_holds_the_worst_case():
    # every token picks two experts of member 1: it needs X * min(k, L) rows, the capacity
    x = torch.randn(6, H)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    y, expected = _round_trip(x, ids, torch.ones(6, 2), torch.tensor([1, 0, 0, 0]))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_header_round_trips_through_the_model_dtype():
    ints = torch.tensor([[1, 7, 3, 1, 5, 0, 2, 9]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rows = routing.header_rows(4, H, dtype)
        assert torch.equal(routing.decode_header(routing.encode_header(ints, rows, H, dtype), 8), ints)
    with pytest.raises(ValueError, match="hidden_size=3.*multiple of 8"):
        routing.header_rows(4, 3, torch.bfloat16)


def test_a_wrong_header_or_overfull_counts_are_flagged_and_dropped():
    x, ids, w = _route(5, seed=1)
    rows = routing.sort_rows(ids, w, MEMBER_E, LOCAL_E, 4, MAX_LOCAL)
    cap, hdr = routing.capacity(5, K, MAX_LOCAL), routing.header_rows(MAX_LOCAL, H, x.dtype)
    head = torch.tensor([1, 2, 0, 0])
    blocks = routing.pack(x, rows, 1, 3, cap, hdr, head).blocks
    wrong_layer = routing.unpack(blocks[:1], hdr, MAX_LOCAL, 4, torch.tensor([1, 2, 1, 0]))
    assert wrong_layer.bad_S.tolist() == [True] and int(wrong_layer.counts_L.sum()) == 0
    # counts claiming more rows than the block holds: without the clamp, the grouped matmul's
    # offsets would point past the buffer
    ints = routing.decode_header(blocks[:1, :hdr], 4 + MAX_LOCAL).clone()
    ints[0, 4] = cap + 1
    forged = blocks[:1].clone()
    forged[:, :hdr] = routing.encode_header(ints, hdr, H, x.dtype)
    got = routing.unpack(forged, hdr, MAX_LOCAL, 4, head)
    assert got.bad_S.tolist() == [True] and int(got.counts_L.sum()) == 0


def test_segment_graphs_off_calls_through_and_need_cuda_when_on():
    graphs = SegmentGraphs(False, torch.device("cpu"))
    assert graphs.run(("k",), lambda a, b: a + b, torch.ones(2), torch.ones(2)).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        SegmentGraphs(True, torch.device("cpu"))


def test_segment_graph_inputs_are_reused_in_place_or_copied_and_shapes_are_checked():
    # the replay-side logic of SegmentGraphs, on CPU tensors (capture and replay need CUDA)
    from masep.parallel.graphs import _Captured
    graphs = SegmentGraphs(False, torch.device("cpu"))
    static = torch.zeros(3)
    entry = _Captured(graph=None, inputs=(static,), outputs=None)
    graphs._load("k", entry, (static,))  # the same tensor (a graph output, say): nothing to do
    fresh = torch.arange(3.0)
    graphs._load("k", entry, (fresh,))  # another tensor: copied into the captured buffer
    assert static.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match=r"CUDA graph k: input 0 is \(4,\).*captured \(3,\)"):
        graphs._load("k", entry, (torch.zeros(4),))
