"""Padded-transfer arithmetic (masep/parallel/routing.py) on one process: blocks built by a
sender and read by receivers must deliver every (token, expert) pair exactly once, and bad
headers must be caught on the device without indexing outside the buffer.

Tolerance: fp32; the round trip only moves rows and sums at most top_k weighted products per
token, so results match a direct per-pair loop to ~1e-6 (atol 1e-5)."""
from __future__ import annotations

import pytest
import torch

from masep.parallel import routing
from masep.parallel.capacity import CapacityPolicy, round_up
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


MATS = torch.randn(E, H, H, generator=torch.Generator().manual_seed(9))


def _expert_fn(member: int, calls: list | None = None):
    """A receiver's experts: a matrix per expert, one at a time (the oracle of a grouped matmul)."""
    held = [e for e in range(E) if MEMBER_E[e] == member]

    def run(x_NH, counts_L):
        if calls is not None:
            calls.append(x_NH.shape[0])
        out, start = torch.zeros_like(x_NH), 0
        for local, n in enumerate(counts_L.tolist()):
            out[start:start + n] = x_NH[start:start + n] @ MATS[held[local]]
            start += n
        return out
    return run, held


def _expected(x, ids, w, keep=None):
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(K):
            if keep is None or keep[t, j]:
                expected[t] += w[t, j] * (x[t] @ MATS[ids[t, j]])
    return expected


def _round_trip(x, ids, w, head, cap=None):
    """Sender packs for members 1..3; each receiver serves with a per-expert matrix; sender gathers."""
    rows = routing.sort_rows(ids, w, MEMBER_E, LOCAL_E, 4, MAX_LOCAL)
    cap = routing.capacity(x.shape[0], K, MAX_LOCAL) if cap is None else cap
    hdr = routing.header_rows(MAX_LOCAL, H, x.dtype)
    packed = routing.pack(x, rows, 1, 3, cap, hdr, head)
    backs = []
    for d in range(3):
        expert_fn, held = _expert_fn(d + 1)
        served = routing.serve_blocks([packed.blocks[d:d + 1]], [head], expert_fn, hdr, MAX_LOCAL, len(held))
        assert not served.bad[0].any() and int(served.demand[0]) == int(packed.demand)
        sent = min(cap, int((MEMBER_E[ids] == d + 1).sum()))
        assert int(served.counts_L.sum()) == sent
        backs.append(served.back[0])
    y = routing.gather(torch.cat(backs), packed.pos_R, rows.token_R, rows.weight_R, x.shape[0], packed.keep_R)
    return y, packed


@pytest.mark.parametrize("tokens", [0, 1, 5, 13])
def test_padded_round_trip_delivers_every_pair_once(tokens):
    x, ids, w = _route(tokens, seed=tokens)
    y, packed = _round_trip(x, ids, w, torch.tensor([1, 3, 0, 1]))
    assert packed.keep_R.all()
    torch.testing.assert_close(y, _expected(x, ids, w), atol=1e-5, rtol=1e-5)


def test_capacity_holds_the_worst_case():
    # every token picks two experts of member 1: it needs X * min(k, L) rows, the capacity
    x = torch.randn(6, H)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    w = torch.ones(6, 2)
    y, packed = _round_trip(x, ids, w, torch.tensor([1, 0, 0, 0]))
    assert int(packed.demand) == 12 and packed.keep_R.all()
    torch.testing.assert_close(y, _expected(x, ids, w), atol=1e-5, rtol=1e-5)


def test_an_overflowing_block_leaves_rows_out_safely_and_says_so():
    # every token picks two experts of member 1 (demand 12 rows) but the blocks hold 5: the rows
    # past 5 are left out (not written over the next block), the header counts the 5 sent, the
    # receiver sees demand 12 > 5 and flags nothing bad; the gather masks the left-out pairs
    x = torch.randn(6, H)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    w = torch.rand(6, 2)
    y, packed = _round_trip(x, ids, w, torch.tensor([1, 0, 0, 0]), cap=5)
    assert int(packed.demand) == 12 and int(packed.keep_R.sum()) == 5
    # sorted row r is flattened pair order[r] (sort_rows: a stable sort by member, local expert)
    order = torch.argsort(MEMBER_E[ids].flatten() * MAX_LOCAL + LOCAL_E[ids].flatten(), stable=True)
    kept = torch.zeros(6 * K, dtype=torch.bool)
    kept[order[packed.keep_R]] = True
    torch.testing.assert_close(y, _expected(x, ids, w, kept.view(6, K)), atol=1e-5, rtol=1e-5)


def test_one_grouped_call_serves_every_replicas_blocks():
    # two replicas send member 1 blocks of different capacities in the same (layer, micro-batch):
    # the receiver runs its experts ONCE over both (the weights are read once) and each
    # replica gets exactly what serving it alone gives
    hdr = routing.header_rows(MAX_LOCAL, H, torch.float32)
    head = torch.tensor([1, 4, 2, 0])
    sent = []
    for seed, tokens in ((1, 5), (2, 3)):
        x, ids, w = _route(tokens, seed=seed)
        rows = routing.sort_rows(ids, w, MEMBER_E, LOCAL_E, 4, MAX_LOCAL)
        sent.append((x, ids, w, rows, routing.pack(x, rows, 1, 3, routing.capacity(tokens, K, MAX_LOCAL), hdr, head)))
    calls = []
    expert_fn, held = _expert_fn(1, calls)
    served = routing.serve_blocks([p.blocks[:1] for *_, p in sent], [head, head], expert_fn, hdr, MAX_LOCAL, len(held))
    assert calls == [sum(p.blocks.shape[1] - hdr for *_, p in sent)]  # one call over both replicas' rows
    for (x, ids, w, rows, packed), back in zip(sent, served.back):
        alone = routing.serve_blocks([packed.blocks[:1]], [head], _expert_fn(1)[0], hdr, MAX_LOCAL, len(held))
        torch.testing.assert_close(back, alone.back[0], atol=1e-5, rtol=1e-5)
        returned = torch.zeros(3, *back.shape[1:])  # members 2 and 3 answer nothing here
        returned[0] = back[0]
        y = routing.gather(returned, packed.pos_R, rows.token_R, rows.weight_R, x.shape[0], packed.keep_R)
        mine = MEMBER_E[ids] == 1  # member 1's pairs only: the others went to other members
        torch.testing.assert_close(y, _expected(x, torch.where(mine, ids, 0), w * mine), atol=1e-5, rtol=1e-5)
    assert served.counts_L.tolist() == [int(sum(((ids == e).sum() for _, ids, *_ in sent))) for e in held]


def test_capacity_follows_the_routing_and_never_exceeds_the_worst_case():
    policy = CapacityPolicy.for_placement(2, ((0, 1, 2, 3, 4, 5, 6, 7), (8, 9, 10, 11, 12, 13, 14, 15)), 16)
    assert policy.balanced_share == 1.0  # top-2 of 16, 8 experts per rank: one row per token on average
    assert policy.cap(64) == 96 < routing.capacity(64, 2, 8) == 128  # 1.5 x the balanced share
    assert policy.cap(64, full=True) == 128 and policy.cap(0) == 0 and policy.cap(1) == 2
    policy.observe([100], [64])  # a skewed step: the fullest rank got 100 rows of 64 tokens
    assert policy.cap(64) == 128  # 64 x 1.56 x 1.5 > the worst case: the worst case
    for _ in range(30):  # balanced again: the running max decays back to the balanced share
        policy.observe([64], [64])
    assert policy.share == 1.0 and policy.cap(64) == 96
    assert [round_up(n) for n in (1, 2, 3, 5, 7, 9, 13, 100)] == [1, 2, 3, 6, 8, 12, 16, 128]
    with pytest.raises(ValueError, match="margin=0.5"):
        CapacityPolicy(2, 8, 1.0, margin=0.5)


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
