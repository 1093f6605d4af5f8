"""The single-device model: KV-cache decode vs full recompute, grouped-matmul experts vs a loop."""
import pytest
import torch

from masep import build_model, preset
from masep.model import Experts, init_random_
from masep.runtime import LocalRuntime

# fp32 throughout. Cached decode and full recompute run the same math in a different order
# (one query against S keys vs a T x T masked matrix; matmuls of other shapes), so they agree to
# rounding: with logits up to ~0.6 we measured differences of ~2e-7; 1e-5 leaves ~50x headroom
# and is still far below what one wrong key or position would change (> 1e-3).
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def tiny():
    return build_model(preset("tiny"), seed=0)


def _prompts(lengths, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.timeout(60)
def test_prefill_all_positions_match_unpadded_forward(tiny):
    """Right-padded prefill through the cache equals each row run alone, at every real position."""
    lengths = [5, 9, 2]
    prompts = _prompts(lengths, tiny.cfg.vocab_size, seed=1)
    ids = torch.zeros(3, max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    cache = tiny.new_cache(3, 32)
    with torch.no_grad():
        padded = tiny(ids, cache=cache, attend_len=ids.shape[1])
        for b, p in enumerate(prompts):
            alone = tiny(torch.tensor([p]))[0]
            torch.testing.assert_close(padded[b, :len(p)], alone, atol=ATOL, rtol=RTOL)


@pytest.mark.timeout(60)
def test_cached_decode_matches_full_recompute_every_step(tiny):
    """Batch 3, prompts of different lengths right-padded, then 6 teacher-forced decode steps.

    At step j row b's query sits at position len_b + j while other rows sit elsewhere, so the
    mask must be built from per-row positions. With `is_causal=True` a single decode query
    would attend only to key 0 and this test fails at the first step.
    """
    cfg, lengths, steps = tiny.cfg, [5, 9, 2], 6
    prompts = _prompts(lengths, cfg.vocab_size, seed=2)
    conts = _prompts([steps] * 3, cfg.vocab_size, seed=3)
    with torch.no_grad():
        full = [tiny(torch.tensor([p + c]))[0] for p, c in zip(prompts, conts)]  # [len + steps, V]
    runtime = LocalRuntime(tiny)
    runtime.start(3, max(lengths) + steps)
    ids = torch.zeros(3, max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    logits = runtime.prefill(ids, torch.tensor(lengths))
    for b, n in enumerate(lengths):
        torch.testing.assert_close(logits[b], full[b][n - 1], atol=ATOL, rtol=RTOL)
    for j in range(steps):
        positions = torch.tensor([n + j for n in lengths])
        tokens = torch.tensor([c[j] for c in conts])
        logits = runtime.decode(tokens, positions, attend_len=int(positions.max()) + 1)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(logits[b], full[b][n + j], atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"row {b} step {j}: {m}")
    runtime.finish()


def _experts(cfg, expert_ids=None, seed=0):
    ex = Experts(cfg, expert_ids=expert_ids)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return ex


def _routing(cfg, tokens, skip_expert, seed=0):
    """Random top-k routing [X, k] that never picks `skip_expert` (so it gets zero tokens)."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(cfg.num_experts) if e != skip_expert])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:cfg.top_k]] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, cfg.top_k, generator=gen), -1)
    return weights, ids


@pytest.mark.timeout(60)
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_grouped_experts_match_loop_with_an_empty_expert(act):
    cfg = preset("tiny").replace(expert_act=act)
    ex = _experts(cfg)
    x = torch.randn(13, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    weights, ids = _routing(cfg, 13, skip_expert=3)
    assert torch.bincount(ids.flatten(), minlength=cfg.num_experts)[3] == 0
    with torch.no_grad():
        # fp32 on CPU: the grouped kernel and the loop sum each dot product in the same order in
        # practice; 1e-6 only absorbs a different blocking, far below a misrouted row (~1e-2).
        torch.testing.assert_close(ex(x, weights, ids, grouped=True), ex(x, weights, ids, grouped=False),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.timeout(60)
def test_expert_subsets_sum_to_all_experts():
    """Experts(cfg, expert_ids=subset) with the matching weight slices adds exactly the subset's
    share: the shares of a partition sum to the full layer (what expert parallelism relies on)."""
    cfg = preset("tiny")
    full = _experts(cfg)
    x = torch.randn(17, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    weights, ids = _routing(cfg, 17, skip_expert=5, seed=2)
    parts = [[0, 2, 5], [1, 3], [4, 6, 7]]  # expert 5 holds no tokens
    total = torch.zeros_like(x)
    with torch.no_grad():
        for part in parts:
            sub = Experts(cfg, expert_ids=part)
            for name in ("w_gate", "w_up", "w_down"):
                getattr(sub, name).copy_(getattr(full, name)[part])
            y_grouped, y_loop = sub(x, weights, ids, grouped=True), sub(x, weights, ids, grouped=False)
            torch.testing.assert_close(y_grouped, y_loop, atol=1e-6, rtol=1e-5)
            total += y_grouped
        # A token's two experts can sit in different parts, so the sum order differs from the
        # full layer's: rounding of one fp32 addition (~1e-8 here), 1e-6 is ample.
        torch.testing.assert_close(total, full(x, weights, ids), atol=1e-6, rtol=1e-5)


@pytest.mark.timeout(60)
def test_whole_model_grouped_matches_loop(tiny):
    ids = torch.randint(0, tiny.cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(tiny(ids, grouped=True), tiny(ids, grouped=False), atol=ATOL, rtol=RTOL)


@pytest.mark.timeout(60)
def test_init_is_deterministic():
    a, b = build_model(preset("tiny"), seed=7), build_model(preset("tiny"), seed=7)
    c = init_random_(build_model(preset("tiny"), seed=0), seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


@pytest.mark.parametrize("heads", [range(0, 8), range(2, 7), range(3, 4)], ids=["all", "straddles", "one"])
def test_attention_reads_the_kv_cache_in_place(monkeypatch, heads):
    """GQA over the cache passes the cache's own K and V to SDPA (no gather, no repeat), also
    when the head slice cuts KV groups; the local heads' output equals the full attention's."""
    import masep.model as M
    cfg = preset("tiny")  # 8 heads, 2 KV heads: groups of 4
    full = M.Attention(cfg)
    torch.manual_seed(0)
    for p in full.parameters():
        p.data.normal_(0, 0.1)
    part = M.Attention(cfg, heads)
    kv = M.kv_heads_for(cfg, heads)
    d = cfg.head_dim
    part.q_proj.weight.data = full.q_proj.weight.data[heads.start * d:heads.stop * d]
    part.k_proj.weight.data = full.k_proj.weight.data[kv.start * d:kv.stop * d]
    part.v_proj.weight.data = full.v_proj.weight.data[kv.start * d:kv.stop * d]
    x, pos = torch.randn(3, 1, cfg.hidden_size), torch.tensor([[5], [2], [7]])
    caches = [M.KVCache.empty(1, 3, len(a.kv_heads), 16, d, torch.float32, "cpu") for a in (full, part)]
    for c in caches:  # earlier positions hold values, as after a prefill
        c.k[0].normal_()
        c.v[0].normal_()
    caches[1].k[0].copy_(caches[0].k[0][:, kv.start:kv.stop])
    caches[1].v[0].copy_(caches[0].v[0][:, kv.start:kv.stop])
    seen = []
    sdpa = M.F.scaled_dot_product_attention
    monkeypatch.setattr(M.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((k.untyped_storage().data_ptr(),
                                                           v.untyped_storage().data_ptr())) or sdpa(q, k, v, **kw))
    part(x, pos, caches[1], 0, attend_len=10)
    assert seen == [(caches[1].k[0].untyped_storage().data_ptr(), caches[1].v[0].untyped_storage().data_ptr())]
    # the local heads' attention (before o_proj) equals the full model's for those heads
    got, want = [], []
    monkeypatch.setattr(M.F, "scaled_dot_product_attention", sdpa)
    for attn, cache, out in ((full, caches[0], want), (part, caches[1], got)):
        attn.o_proj = torch.nn.Identity()
        out.append(attn(x, pos, cache, 0, attend_len=10).view(3, 1, -1, d))
    torch.testing.assert_close(got[0], want[0][:, :, heads.start:heads.stop], atol=1e-6, rtol=1e-5)
