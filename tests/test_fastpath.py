"""The decode fast path on CPU: GraphedLocalRuntime must fall back to eager and match LocalRuntime
exactly; attend_len buckets must not change the function; the static-shape expert path must give
the same numbers as the masked one; the Triton grouped matmul (via Triton's CPU interpreter,
where triton is installed) must match F.grouped_mm."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from masep.config import PRESETS
from masep.fastpath import GraphedLocalRuntime, block_rows, bucket_len, num_row_slots, set_expert_impl, set_fused
from masep.model import Experts, build_model
from masep.runtime import LocalRuntime


def test_bucket_len_rounds_up_and_caps():
    assert bucket_len(1, 2048) == 256
    assert bucket_len(256, 2048) == 256
    assert bucket_len(257, 2048) == 512
    assert bucket_len(2000, 2048) == 2048
    assert bucket_len(300, 300, step=256) == 300  # capped at the cache length
    assert bucket_len(5, 64, step=1) == 5


@pytest.mark.parametrize("attend_len,max_len,step", [(0, 10, 4), (11, 10, 4), (3, 10, 0)])
def test_bucket_len_rejects_bad_input(attend_len, max_len, step):
    with pytest.raises(ValueError):
        bucket_len(attend_len, max_len, step)


def test_row_slots_bound_every_split():
    """num_row_slots must cover sum(ceil(count/block)) for any split, or rows go unwritten."""
    gen = torch.Generator().manual_seed(0)
    for rows, groups in [(1, 16), (48, 16), (512, 16), (7, 3), (100, 1)]:
        block = block_rows(rows, groups)
        assert 16 <= block <= 64 and block & (block - 1) == 0
        for _ in range(50):
            counts = torch.bincount(torch.randint(0, groups, (rows,), generator=gen), minlength=groups)
            needed = int(((counts + block - 1) // block).sum())
            assert needed <= num_row_slots(rows, groups, block)


def _prompts(cfg, batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 9, 7][:batch])
    ids = torch.randint(0, cfg.vocab_size, (batch, int(lengths.max())), generator=gen)
    return ids, lengths


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_graphed_runtime_falls_back_on_cpu_with_identical_logits(preset):
    cfg = PRESETS[preset]
    model = build_model(cfg, seed=3)
    ref, fast = LocalRuntime(model), GraphedLocalRuntime(model)
    assert not fast.graphs  # no CUDA here: eager fallback
    ids, lengths = _prompts(cfg)
    for rt in (ref, fast):
        rt.start(3, 32)
    assert torch.equal(ref.prefill(ids, lengths), fast.prefill(ids, lengths))
    positions = lengths.clone()
    tokens = torch.tensor([1, 2, 3])
    for _ in range(4):  # rows sit at different positions: the mask must stay per row
        attend = int(positions.max()) + 1
        a, b = ref.decode(tokens, positions, attend), fast.decode(tokens, positions, attend)
        assert torch.equal(a, b)
        tokens, positions = a.argmax(-1), positions + 1
    ref.finish()
    fast.finish()


def test_graphs_on_cpu_is_an_error():
    with pytest.raises(ValueError, match="CUDA"):
        GraphedLocalRuntime(build_model(PRESETS["tiny"]), graphs=True)


def test_decode_checks_batch_and_start():
    rt = GraphedLocalRuntime(build_model(PRESETS["tiny"]))
    with pytest.raises(ValueError, match="start"):
        rt.decode(torch.tensor([1]), torch.tensor([0]), 1)
    rt.start(2, 16)
    with pytest.raises(ValueError, match="batch 2"):
        rt.decode(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0]), 1)


@pytest.mark.parametrize("kv_heads", [2, 8])  # grouped-query and one KV head per query head
def test_bucketed_attend_len_gives_the_same_logits(kv_heads):
    """A graph replays at the bucket length: keys past each row's position are masked, so only
    the summation order changes (float32: agreement to ~1e-6)."""
    cfg = PRESETS["tiny"].replace(num_kv_heads=kv_heads)
    model = build_model(cfg, seed=1)
    rt = LocalRuntime(model)
    rt.start(3, 64)
    ids, lengths = _prompts(cfg)
    rt.prefill(ids, lengths)
    snapshot = [t.clone() for t in rt.cache.k + rt.cache.v]
    tokens, positions = torch.tensor([4, 5, 6]), lengths
    exact = rt.decode(tokens, positions, int(positions.max()) + 1)
    for t, saved in zip(rt.cache.k + rt.cache.v, snapshot):
        t.copy_(saved)
    bucketed = rt.decode(tokens, positions, bucket_len(int(positions.max()) + 1, 64, step=16))
    torch.testing.assert_close(bucketed, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_expert_path_matches_masked_path_exactly(dtype):
    cfg = PRESETS["small"]
    experts = Experts(cfg, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for p in experts.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    x = torch.randn(37, cfg.hidden_size, generator=gen).to(dtype)
    ids = torch.rand(37, cfg.num_experts, generator=gen).topk(cfg.top_k, dim=-1).indices
    weights = torch.rand(37, cfg.top_k, generator=gen).to(dtype)
    assert experts.all_local
    fast = experts(x, weights, ids)
    experts.all_local = False  # force the boolean-mask path (used when experts are split)
    masked = experts(x, weights, ids)
    assert torch.equal(fast, masked)
    loop = experts(x, weights, ids, grouped=False)
    torch.testing.assert_close(fast.float(), loop.float(), rtol=2e-2, atol=2e-2)


def test_set_expert_impl_validates():
    model = build_model(PRESETS["tiny"])
    with pytest.raises(ValueError, match="choose one of"):
        set_expert_impl(model, "cutlass")
    set_expert_impl(model, "grouped_mm")
    assert all(b.moe.experts.grouped_mm_fn is None for b in model.layers)


def test_auto_expert_impl_picks_the_kernel_by_rows(monkeypatch):
    """Below WIDE_FROM_ROWS rows the Triton decode kernel, then the wide Triton kernel, from
    GROUPED_MM_FROM_ROWS F.grouped_mm (16-bit) unless the wide kernel's TMA path applies; fp32
    always the decode kernel (no fp32 F.grouped_mm on CUDA). The choice reads only the shape and
    layout. "wide" takes the wide kernel at every size (fp32: the decode kernel)."""
    from masep import fastpath as fp
    calls = []
    monkeypatch.setattr(fp, "triton_grouped_mm", lambda x, w, o: calls.append("triton"))
    monkeypatch.setattr(fp, "wide_grouped_mm", lambda x, w, o, act=None: calls.append("wide"))
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda x, w, offs: calls.append("grouped_mm"),
                        raising=False)
    w, offs = torch.zeros(2, 4, 4), torch.tensor([1, 2], dtype=torch.int32)
    assert fp.WIDE_FROM_ROWS < fp.GROUPED_MM_FROM_ROWS
    cases = ((fp.WIDE_FROM_ROWS - 1, torch.bfloat16), (fp.WIDE_FROM_ROWS, torch.bfloat16),
             (fp.GROUPED_MM_FROM_ROWS - 1, torch.bfloat16), (fp.GROUPED_MM_FROM_ROWS, torch.bfloat16),
             (fp.GROUPED_MM_FROM_ROWS, torch.float32))
    for rows, dtype in cases:
        fp.auto_grouped_mm(torch.zeros(rows, 4, dtype=dtype), w, offs)
    assert calls == ["triton", "wide", "wide", "grouped_mm", "triton"]
    calls.clear()
    monkeypatch.setattr(fp, "wide_tma_applies", lambda x, w: True)
    fp.auto_grouped_mm(torch.zeros(fp.GROUPED_MM_FROM_ROWS, 4, dtype=torch.bfloat16), w, offs)
    assert calls == ["wide"]
    calls.clear()
    for rows, dtype in cases:
        fp.wide_or_decode_mm(torch.zeros(rows, 4, dtype=dtype), w, offs)
    assert calls == ["wide", "wide", "wide", "wide", "triton"]


def test_fast_path_sets_the_fused_kernels_as_the_spec_says(monkeypatch):
    """use_fast_path on a CUDA rank: the auto expert kernels, and the fused small-op kernels
    unless RunSpec.fused is off (what `multi_gpu.py --impls fast-unfused` measures); --eager
    and CPU ranks change nothing."""
    from masep import fastpath as fp
    from masep.parallel.worker import RunSpec, use_fast_path
    calls = []
    monkeypatch.setattr(fp, "auto_expert_impl", lambda model: "auto")
    monkeypatch.setattr(fp, "set_expert_impl", lambda model, impl: calls.append(("impl", impl)))
    monkeypatch.setattr(fp, "set_fused", lambda model, on: calls.append(("fused", on)))
    model, cuda = object(), torch.device("cuda", 0)
    assert use_fast_path(RunSpec(plan=None, requests=[]), model, cuda)
    assert use_fast_path(RunSpec(plan=None, requests=[], fused=False), model, cuda)
    assert calls == [("impl", "auto"), ("fused", True), ("impl", "auto"), ("fused", False)]
    assert not use_fast_path(RunSpec(plan=None, requests=[], eager=True), model, cuda)
    assert not use_fast_path(RunSpec(plan=None, requests=[]), model, torch.device("cpu"))
    assert len(calls) == 4


def _run_in_triton_interpreter(code: str) -> None:
    """Run `code` in a fresh process with Triton's CPU interpreter; it must print "ok"."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    if "only 0-dimensional arrays can be converted" in result.stderr:
        pytest.skip("this triton's interpreter does not run under this numpy (>= 2.4)")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_triton(), reason="triton not installed (CPU-only torch)")
def test_triton_grouped_mm_matches_grouped_mm_in_interpreter():
    """Runs in a subprocess: TRITON_INTERPRET must be set before triton.jit decorates the kernel.
    float32 only: the interpreter's bf16 dot is not faithful (bf16 is checked on the GPU)."""
    code = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from masep.fastpath import triton_grouped_mm
        gen = torch.Generator().manual_seed(0)
        for n, e, k, m, counts in [(48, 16, 64, 96, None), (7, 4, 40, 24, [0, 5, 0, 2]), (130, 3, 256, 64, None)]:
            c = torch.tensor(counts) if counts else torch.bincount(torch.randint(0, e, (n,), generator=gen), minlength=e)
            offs = c.cumsum(0).to(torch.int32)
            x = torch.randn(n, k, generator=gen)
            w = torch.randn(e, m, k, generator=gen).transpose(1, 2)  # [E, K, M] view, as the model passes it
            out = triton_grouped_mm(x, w, offs, config=dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=2))
            ref = F.grouped_mm(x, w, offs=offs)
            err = float((out - ref).norm() / ref.norm())
            assert err < 1e-5, (n, e, k, m, err)
        print("ok")
    """)
    _run_in_triton_interpreter(code)


@pytest.mark.skipif(not _has_triton(), reason="triton not installed (CPU-only torch)")
def test_wide_grouped_mm_matches_per_group_matmuls_in_interpreter():
    """The wide kernel, both load paths and both tile orders, against one matmul per group
    (float32: exact to rounding). Empty groups, a group of one row, groups longer than a tile,
    K not a multiple of the tile, one group holding every row: a tile given the wrong group or
    rows fails the 1e-5 bound by orders of magnitude."""
    code = textwrap.dedent("""
        import torch
        from masep.grouped_mm_wide import wide_grouped_mm
        gen = torch.Generator().manual_seed(0)
        cases = [(48, 16, 64, 96, None), (7, 4, 48, 24, [0, 5, 0, 2]), (130, 3, 256, 64, None), (70, 2, 64, 80, [70, 0])]
        for n, e, k, m, counts in cases:
            c = torch.tensor(counts) if counts else torch.bincount(torch.randint(0, e, (n,), generator=gen), minlength=e)
            offs = c.cumsum(0).to(torch.int32)
            x = torch.randn(n, k, generator=gen)
            w = torch.randn(e, m, k, generator=gen).transpose(1, 2)  # [E, K, M] view, as the model passes it
            ends = offs.tolist()
            ref = torch.cat([x[a:b] @ w[g] for g, (a, b) in enumerate(zip([0] + ends[:-1], ends))])
            for tma in (False, True):
                for order in (0, 1, 2):
                    cfg = dict(BLOCK_N=16, BLOCK_M=32, BLOCK_K=32, ORDER=order, num_warps=4, num_stages=2)
                    out = wide_grouped_mm(x, w, offs, tma=tma, config=cfg)
                    err = float((out - ref).norm() / ref.norm())
                    assert err < 1e-5, (n, e, k, m, tma, order, err)
            gelu = wide_grouped_mm(x, w, offs, tma=False, config=cfg, act="gelu")  # the epilogue
            act = torch.nn.functional.gelu(ref)
            assert float((gelu - act).norm() / act.norm()) < 1e-5, (n, e, k, m)
        print("ok")
    """)
    _run_in_triton_interpreter(code)


def test_experts_hand_the_gelu_to_a_kernel_that_fuses_it():
    """Experts.matmuls: a kernel that says fuses_gelu gets act="gelu" for the up matrix of a
    GELU expert (and returns it applied); the result equals the unfused chain. SwiGLU experts
    never pass an act (their activation needs the gate)."""
    import torch.nn.functional as F
    acts = []

    def mm(x, w, offs, act=None):
        acts.append(act)
        out = F.grouped_mm(x, w, offs=offs)
        return F.gelu(out) if act == "gelu" else out
    mm.fuses_gelu = True
    for act_name, want in (("gelu", ["gelu", None]), ("swiglu", [None, None, None])):
        cfg = PRESETS["tiny"].replace(expert_act=act_name)
        experts = Experts(cfg)
        for p in experts.parameters():
            p.data.normal_(0, 0.1)
        x, counts = torch.randn(10, cfg.hidden_size), torch.tensor([3, 0, 7] + [0] * (cfg.num_experts - 3))
        plain = experts.forward_sorted(x, counts)
        experts.grouped_mm_fn, acts[:] = mm, []
        torch.testing.assert_close(experts.forward_sorted(x, counts), plain)
        assert acts == want, (act_name, acts)


def test_wide_grouped_mm_names_bad_shapes():
    from masep import grouped_mm_wide as gw
    if gw.triton is None:
        pytest.skip("triton not installed")
    with pytest.raises(ValueError, match=r"x \(4, 8\), w \(2, 6, 5\), offs \(2,\)"):
        gw.wide_grouped_mm(torch.zeros(4, 8), torch.zeros(2, 6, 5), torch.tensor([1, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="act='relu'"):
        gw.wide_grouped_mm(torch.zeros(4, 8), torch.zeros(2, 8, 5), torch.tensor([1, 4], dtype=torch.int32), act="relu")


@pytest.mark.skipif(not _has_triton(), reason="triton not installed (CPU-only torch)")
def test_fused_small_op_kernels_match_torch_in_interpreter():
    """RMSNorm, router tail, routing sort, combine and RoPE + cache-write kernels against the
    model's own code (float32; bf16 where no tl.dot is involved)."""
    code = textwrap.dedent("""
        import torch
        from masep.config import PRESETS
        from masep.model import RMSNorm, Router, Experts
        from masep import fastpath as fp
        torch.manual_seed(0)
        norm = RMSNorm(64, 1e-6)
        norm.weight.data.uniform_(0.5, 1.5)
        x = torch.randn(3, 2, 64)
        torch.testing.assert_close(fp.fused_rms_norm(x, norm.weight, norm.eps), norm(x))
        cfg = PRESETS["small"]
        router = Router(cfg)
        router.weight.data.normal_(0, 0.1)
        x = torch.randn(37, cfg.hidden_size)
        w, ids = router(x)
        w2, ids2 = fp.fused_topk_softmax(torch.nn.functional.linear(x, router.weight), cfg.top_k, True, x.dtype)
        assert torch.equal(ids, ids2)
        torch.testing.assert_close(w, w2)
        experts = Experts(cfg)
        for tokens in (37, 300):  # 600 pairs: three programs of the routing sort
            ids = torch.rand(tokens, cfg.num_experts).topk(cfg.top_k, dim=-1).indices
            wt = torch.rand(tokens, cfg.top_k)
            flat = experts.local_index[ids].flatten()
            order = torch.argsort(flat, stable=True)
            offs, token, w_sorted, where = fp.fused_route(experts.local_index[ids], wt, cfg.num_experts)
            assert torch.equal(offs, torch.bincount(flat, minlength=cfg.num_experts).cumsum(0).to(torch.int32))
            assert torch.equal(token, (torch.arange(flat.numel()) // cfg.top_k)[order])
            assert torch.equal(w_sorted, wt.flatten()[order])
            assert torch.equal(order[where], torch.arange(flat.numel()))  # where inverts the sort
            # the combine against the model's `y * w` then index_add_ into zeros, fp32 and bf16
            # (no tl.dot: the interpreter is faithful); a wrong `where` moves rows between tokens
            for dt in (torch.float32, torch.bfloat16):
                y, w = torch.randn(flat.numel(), 48).to(dt), wt.to(dt)
                ref = torch.zeros(tokens, 48, dtype=dt).index_add_(0, token, y * w_sorted.to(dt)[:, None])
                assert torch.equal(fp.fused_combine(y, w, where, cfg.top_k), ref)
            assert not torch.equal(fp.fused_combine(y, w, where.flip(0), cfg.top_k), ref)
        from masep.model import KVCache, apply_rope, rope_cos_sin
        b, n, kv, d, s = 3, 4, 2, 16, 10
        q, k, v = torch.randn(b, n, d), torch.randn(b, kv, d), torch.randn(b, kv, d)
        pos = torch.tensor([[3], [7], [5]])
        cos, sin = rope_cos_sin(pos, d, 10000.0, torch.float32)
        ref, got = (KVCache.empty(1, b, kv, s, d, torch.float32, "cpu") for _ in range(2))
        ref.write(0, pos, apply_rope(k[:, None].transpose(1, 2), cos, sin), v[:, None].transpose(1, 2))
        q_rot = fp.fused_rope_cache_write(q, k, v, cos, sin, pos[:, 0], got.k[0], got.v[0])
        assert torch.equal(q_rot, apply_rope(q[:, None].transpose(1, 2), cos, sin))
        assert torch.equal(got.k[0], ref.k[0]) and torch.equal(got.v[0], ref.v[0])
        # bf16 (no tl.dot in these two kernels, so the interpreter runs them faithfully): RoPE
        # rounds each product as torch does, bit for bit; RMSNorm too, given the same sum.
        bf = torch.bfloat16
        q, k, v = q.to(bf), k.to(bf), v.to(bf)
        cos, sin = rope_cos_sin(pos, d, 10000.0, bf)
        ref, got = (KVCache.empty(1, b, kv, s, d, bf, "cpu") for _ in range(2))
        ref.write(0, pos, apply_rope(k[:, None].transpose(1, 2), cos, sin), v[:, None].transpose(1, 2))
        q_rot = fp.fused_rope_cache_write(q, k, v, cos, sin, pos[:, 0], got.k[0], got.v[0])
        assert torch.equal(q_rot, apply_rope(q[:, None].transpose(1, 2), cos, sin))
        assert torch.equal(got.k[0], ref.k[0]) and torch.equal(got.v[0], ref.v[0])
        norm = RMSNorm(4096, 1e-6, dtype=bf)
        norm.weight.data.uniform_(0.5, 1.5)
        x = torch.randn(5, 1, 4096).to(bf)
        assert (fp.fused_rms_norm(x, norm.weight, norm.eps) != norm(x)).float().mean() < 1e-3
        print("ok")
    """)
    _run_in_triton_interpreter(code)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl,fused", [("grouped_mm", False), ("triton", False), ("triton", True)])
def test_graphed_runtime_on_cuda_matches_eager(impl, fused):
    """Graph replays (across a bucket boundary) match eager LocalRuntime; a capture that
    succeeds proves the step has no host sync. bf16: logits agree to ~1e-2 relative."""
    if impl == "triton" and not _has_triton():
        pytest.skip("no triton")
    cfg = PRESETS["small"]
    model = build_model(cfg, seed=2, device="cuda", dtype=torch.bfloat16)
    ref, fast = LocalRuntime(model), GraphedLocalRuntime(model, bucket=8, expert_impl=impl)
    ids, lengths = _prompts(cfg)
    ids, lengths = ids.cuda(), lengths.cuda()
    for rt in (ref, fast):
        rt.start(3, 64)
    tokens = torch.tensor([1, 2, 3], device="cuda")
    # Both runtimes run the same kernels (fused or not): the fused kernels round differently
    # from torch and flip near-tie routing of random weights (their own tests are below).
    set_fused(model, fused)
    a, b = ref.prefill(ids, lengths), fast.prefill(ids, lengths)

    positions, buckets = lengths.clone(), set()
    for step in range(12):  # attend_len 10..21: buckets 16 and 24
        attend = int(positions.max()) + 1
        buckets.add(bucket_len(attend, 64, 8))
        a, b = ref.decode(tokens, positions, attend), fast.decode(tokens, positions, attend)
        err = float((a - b).norm() / a.norm())
        assert err < 3e-2, (step, err)
        tokens, positions = a.argmax(-1), positions + 1
    assert {s for _, s in fast._graphs} == buckets == {16, 24}  # keys: (batch bucket, attend bucket)
    set_expert_impl(model, "grouped_mm")
    set_fused(model, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_runtime_serves_sparse_slots_on_cuda():
    """The serving path on the GPU: prefills into scattered slots between decode steps, decode
    over a slot range padded to its batch bucket (1, 2, 4, 8), graph replays against eager
    LocalRuntime on the same model. bf16: logits agree to ~1e-2 relative (3e-2 allows for the
    different kernels' rounding; a wrong slot or position gives O(1))."""
    from masep.runtime import StepRows
    cfg = PRESETS["small"]
    model = build_model(cfg, seed=3, device="cuda", dtype=torch.bfloat16)
    ref, fast = LocalRuntime(model), GraphedLocalRuntime(model, bucket=8, expert_impl="grouped_mm")
    for rt in (ref, fast):
        rt.start(8, 64)
    gen = torch.Generator().manual_seed(0)
    live: dict[int, tuple[int, int]] = {}  # slot -> (next token, next position)
    for step, admit in enumerate([[0], [5], [], [2, 7], [], [1], [], []]):
        if step == 1:  # capturing every graph must leave slot 0's KV as it is
            assert fast.capture_all() == 4 * 8  # batch buckets 1, 2, 4, 8 x attend buckets 8..64
        if admit:  # prefill prompts of 3..6 tokens into these slots
            prompts = [torch.randint(0, cfg.vocab_size, (3 + s % 4,), generator=gen).tolist() for s in admit]
            rows = StepRows(admit, prompts, [0] * len(admit), prefill=True)
            a, b = ref.forward(rows), fast.forward(rows)
            assert float((a - b).norm() / a.norm()) < 3e-2
            live |= {s: (int(t), len(p)) for s, t, p in zip(admit, a.argmax(-1), prompts)}
        slots = sorted(live)
        rows = StepRows(slots, [[live[s][0]] for s in slots], [live[s][1] for s in slots])
        a, b = ref.forward(rows), fast.forward(rows)
        err = float((a - b).norm() / a.norm())
        assert err < 3e-2, (step, slots, err)
        live = {s: (int(t), live[s][1] + 1) for s, t in zip(slots, a.argmax(-1))}
    assert len(fast._graphs) == 32  # nothing captured after capture_all


@pytest.mark.skipif(not (torch.cuda.is_available() and _has_triton()), reason="needs CUDA and triton")
def test_wide_grouped_mm_on_cuda_bf16():
    """bf16 on the GPU, both load paths (autotuned), against F.grouped_mm: the same products
    summed in another order, so ~1e-3 relative (bf16 outputs); swapping two groups' weights
    moves the output by ~1.4 (unrelated random weights) and must fail it. A CUDA-graph replay
    gives the eager call's bits: the autotuner ran outside the capture."""
    import torch.nn.functional as F
    from masep.grouped_mm_wide import tma_applies, wide_grouped_mm
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, e, k, m in [(1024, 16, 512, 768), (2500, 8, 384, 256), (3000, 3, 256, 512)]:
        counts = torch.bincount(torch.randint(0, e, (n,), device="cuda", generator=gen), minlength=e)
        counts[1] = 0  # an empty group
        counts[0] += n - int(counts.sum())
        offs = counts.cumsum(0).to(torch.int32)
        x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = torch.randn(e, m, k, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2) / k ** 0.5
        ref = F.grouped_mm(x, w, offs=offs).float()
        swapped = w[[2, *range(1, 2), 0, *range(3, e)]] if e > 2 else w.flip(0)
        for tma in (False, True) if tma_applies(x, w) else (False,):
            out = wide_grouped_mm(x, w, offs, tma=tma)
            err = float((out.float() - ref).norm() / ref.norm())
            assert err < 1e-2, (n, e, tma, err)
            bad = float((wide_grouped_mm(x, swapped, offs, tma=tma).float() - ref).norm() / ref.norm())
            assert bad > 0.1, (n, e, tma, bad)  # the planted bug fails the bound above
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = wide_grouped_mm(x, w, offs, tma=tma)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(replayed, out), (n, e, tma)
            # the GELU epilogue: F.gelu of the rounded product, but for erf's last bits
            gelu, want = wide_grouped_mm(x, w, offs, tma=tma, act="gelu"), F.gelu(out)
            assert (gelu != want).float().mean() < 0.01, (n, e, tma)
            torch.testing.assert_close(gelu, want, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not (torch.cuda.is_available() and _has_triton()), reason="needs CUDA and triton")
def test_fused_kernels_on_cuda_bf16():
    """bf16 on the GPU: RoPE + cache write, the routing sort and the combine are exact; RMSNorm is within one
    bf16 rounding (float32 reduction order); the router picks the same experts but for ties."""
    from masep import fastpath as fp
    from masep.model import KVCache, RMSNorm, Router, apply_rope, rope_cos_sin

    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    norm = RMSNorm(4096, 1e-6, device=dev, dtype=dt)
    norm.weight.data.uniform_(0.5, 1.5, generator=gen)
    x = torch.randn(24, 1, 4096, device=dev, dtype=dt, generator=gen)
    torch.testing.assert_close(fp.fused_rms_norm(x, norm.weight, norm.eps), norm(x), rtol=8e-3, atol=1e-2)
    cfg = PRESETS["paper"]
    router = Router(cfg, device=dev, dtype=dt)
    router.weight.data.normal_(0, 0.02, generator=gen)
    x = torch.randn(256, cfg.hidden_size, device=dev, dtype=dt, generator=gen)
    w, ids = router(x)
    w2, ids2 = fp.fused_topk_softmax(torch.nn.functional.linear(x, router.weight), cfg.top_k, True, dt)
    same = (ids == ids2).all(-1)
    assert same.float().mean() > 0.97
    torch.testing.assert_close(w2[same], w[same], rtol=1e-2, atol=1e-2)
    experts = Experts(cfg, device=dev, dtype=dt)
    flat = experts.local_index[ids].flatten()
    order = torch.argsort(flat, stable=True)
    offs, token, w_sorted, where = fp.fused_route(experts.local_index[ids], w, cfg.num_experts)
    assert torch.equal(offs, torch.bincount(flat, minlength=cfg.num_experts).cumsum(0).to(torch.int32))
    assert torch.equal(token, (torch.arange(flat.numel(), device=dev) // cfg.top_k)[order])
    assert torch.equal(w_sorted, w.flatten()[order])
    assert torch.equal(order[where], torch.arange(flat.numel(), device=dev))
    # the combine: each product rounded, then one rounded sum (top-2), as index_add_ into zeros
    y = torch.randn(flat.numel(), cfg.hidden_size, device=dev, dtype=dt, generator=gen)
    ref = torch.zeros(x.shape[0], cfg.hidden_size, device=dev, dtype=dt).index_add_(0, token, y * w_sorted[:, None])
    assert torch.equal(fp.fused_combine(y, w, where, cfg.top_k), ref)
    # 4096 pairs (batch 2048, top-2): the routing sort over 16 programs
    big = torch.rand(2048, cfg.num_experts, device=dev, generator=gen).topk(cfg.top_k, dim=-1).indices
    flat = big.flatten()
    offs, token, _, where = fp.fused_route(big, torch.ones(2048, cfg.top_k, device=dev, dtype=dt), cfg.num_experts)
    order = torch.argsort(flat, stable=True)
    assert torch.equal(token, (torch.arange(flat.numel(), device=dev) // cfg.top_k)[order])
    assert torch.equal(order[where], torch.arange(flat.numel(), device=dev))
    b, n, kv, d, s = 24, 32, 32, 128, 64
    q, k, v = (torch.randn(b, h, d, device=dev, dtype=dt, generator=gen) for h in (n, kv, kv))
    pos = torch.randint(0, s, (b, 1), device=dev, generator=gen)
    cos, sin = rope_cos_sin(pos, d, 10000.0, dt)
    ref, got = (KVCache.empty(1, b, kv, s, d, dt, dev) for _ in range(2))
    ref.write(0, pos, apply_rope(k[:, None].transpose(1, 2), cos, sin), v[:, None].transpose(1, 2))
    q_rot = fp.fused_rope_cache_write(q, k, v, cos, sin, pos[:, 0], got.k[0], got.v[0])
    assert torch.equal(q_rot, apply_rope(q[:, None].transpose(1, 2), cos, sin))
    assert torch.equal(got.k[0], ref.k[0]) and torch.equal(got.v[0], ref.v[0])


@pytest.mark.skipif(not (torch.cuda.is_available() and _has_triton()), reason="needs CUDA and triton")
def test_fused_kernels_past_2_31_elements():
    """A KV cache layer past 2^31 elements (batch 520 x 32 KV heads x 1024 positions x 128, as
    batch 512 / context 2048 of `paper`): the RoPE + cache write reaches the last rows (an int32
    offset wrapped to an illegal address before), and RMSNorm over a prefill of more than 2^31
    elements reaches its last rows. Exact, as at small sizes (same kernels)."""
    from masep import fastpath as fp
    from masep.model import RMSNorm, apply_rope, rope_cos_sin

    dev, dt = "cuda", torch.bfloat16
    b, n, kv, d, s = 520, 32, 32, 128, 1024
    assert b * kv * s * d > 2**31
    gen = torch.Generator(device=dev).manual_seed(0)
    cache_k = torch.zeros(b, kv, s, d, device=dev, dtype=dt)
    cache_v = torch.zeros_like(cache_k)
    q, k, v = (torch.randn(b, h, d, device=dev, dtype=dt, generator=gen) for h in (n, kv, kv))
    pos = torch.full((b, 1), s - 1, device=dev)
    pos[: b // 2] = torch.randint(0, s, (b // 2, 1), device=dev, generator=gen)
    cos, sin = rope_cos_sin(pos, d, 10000.0, dt)
    q_rot = fp.fused_rope_cache_write(q, k, v, cos, sin, pos[:, 0], cache_k, cache_v)
    torch.cuda.synchronize()
    assert torch.equal(q_rot, apply_rope(q[:, None].transpose(1, 2), cos, sin))
    rows = torch.arange(b, device=dev)
    want_k = apply_rope(k[:, None].transpose(1, 2), cos, sin)[:, :, 0]  # [b, kv, d]
    assert torch.equal(cache_k[rows, :, pos[:, 0]], want_k) and torch.equal(cache_v[rows, :, pos[:, 0]], v)
    del cache_k, cache_v
    torch.cuda.empty_cache()
    norm = RMSNorm(4096, 1e-6, device=dev, dtype=dt)
    x = torch.randn(2**31 // 4096 + 64, 4096, device=dev, dtype=dt, generator=gen)
    tail = slice(x.shape[0] - 64, None)
    torch.testing.assert_close(fp.fused_rms_norm(x, norm.weight, norm.eps)[tail], norm(x[tail]), rtol=8e-3, atol=1e-2)
