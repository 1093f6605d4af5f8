"""Split-KV decode attention (masep/decode_attention.py) against SDPA with the model's mask.

The torch reference runs the kernels' algorithm (chunks, partial softmaxes, merge) on CPU; the
Triton kernels run in Triton's interpreter where triton is installed (float32: the interpreter's
bf16 dot is not faithful) and on CUDA in bf16 (tests/test_fastpath.py covers the model path).
Tolerance: float32 throughout, the chunked sums differ from SDPA's only in summation order,
a few ulps on outputs of size O(1): atol 1e-5 / rtol 1e-4, while reading one key too many or too
few moves an output by O(1/length) >= 1e-3 here (the planted bug below checks that).
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from masep.decode_attention import MIN_CHUNK, chunk_len, covers, decode_attention, num_splits, split_kv_reference


def _sdpa(q_BND, k, v, lengths_B, scale):
    """The model's decode attention: SDPA with a key mask (model.Attention._attend), GQA by repeat."""
    b, n, d = q_BND.shape
    kv, s = k.shape[1], k.shape[2]
    g = n // kv
    mask = (torch.arange(s, device=q_BND.device)[None, :] < lengths_B[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q_BND[:, :, None], k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                         attn_mask=mask, scale=scale)
    return out[:, :, 0]


CASES = [  # batch, query heads, KV heads, keys, head_dim, splits
    (3, 4, 4, 200, 16, 1), (3, 4, 4, 200, 16, 3), (5, 8, 2, 130, 32, 7), (2, 6, 3, 64, 8, 2), (4, 16, 1, 97, 16, 4)]


def _inputs(b, n, kv, s, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, d, generator=gen)
    k, v = torch.randn(b, kv, s, d, generator=gen), torch.randn(b, kv, s, d, generator=gen)
    lengths = torch.randint(1, s + 1, (b,), generator=gen)
    lengths[0], lengths[-1] = 1, s  # the shortest and the longest row
    return q, k, v, lengths


@pytest.mark.parametrize("b,n,kv,s,d,splits", CASES)
def test_reference_matches_masked_sdpa(b, n, kv, s, d, splits):
    q, k, v, lengths = _inputs(b, n, kv, s, d)
    scale = 1 / math.sqrt(d)
    torch.testing.assert_close(split_kv_reference(q, k, v, lengths, splits, scale), _sdpa(q, k, v, lengths, scale),
                               atol=1e-5, rtol=1e-4)


def test_one_key_too_many_fails_the_check():
    """The planted bug: every row reads one key past its length. The tolerance must catch it."""
    q, k, v, lengths = _inputs(3, 4, 4, 200, 16)
    lengths[0] = 5
    scale = 1 / math.sqrt(16)
    wrong = split_kv_reference(q, k, v, (lengths + 1).clamp_max(200), 3, scale)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(wrong, _sdpa(q, k, v, lengths, scale), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch,kv,max_len,sms", [(1, 32, 2048, 132), (24, 16, 2048, 132), (2048, 32, 512, 132),
                                                  (1, 1, 10, 132), (7, 3, 5000, 8)])
def test_splits_fill_the_gpu_and_chunks_cover_every_key(batch, kv, max_len, sms):
    splits = num_splits(batch, kv, max_len, sms)
    chunk = chunk_len(max_len, splits)
    assert splits >= 1 and chunk * splits >= max_len and chunk * (splits - 1) < max_len  # no empty last chunk
    if splits > 1:
        assert -(-max_len // splits) >= MIN_CHUNK // 2  # chunks stay long enough to be worth a merge
    if batch * kv >= 4 * sms:
        assert splits == 1  # enough programs already: no merge cost


def test_bad_shapes_name_the_shapes():
    q, k, v, lengths = _inputs(2, 4, 4, 10, 8)
    with pytest.raises(ValueError, match="q \\(2, 4, 8\\)"):
        split_kv_reference(q, k[:1], v[:1], lengths, 1, 1.0)
    with pytest.raises(ValueError, match="batch=0"):
        num_splits(0, 4, 10, 1)
    with pytest.raises(ValueError, match="1 query heads per KV head, head_dim 8"):
        decode_attention(q, k, v, lengths, 1.0)  # checked before any kernel: no triton needed


@pytest.mark.parametrize("group,head_dim,covered", [(1, 128, False), (2, 128, True), (4, 8, False), (8, 96, False),
                                                    (16, 64, True)])
def test_covers_gqa_layouts_the_kernel_can_run(group, head_dim, covered):
    assert covers(group, head_dim) is covered


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.timeout(300)
@pytest.mark.skipif(not _has_triton(), reason="triton not installed (CPU-only torch)")
def test_triton_kernels_match_the_reference_in_interpreter():
    """The Triton split and merge kernels, run by Triton's interpreter on CPU (TRITON_INTERPRET
    must be set before triton.jit runs, hence the subprocess): one query head per KV head (the
    elementwise path) and GQA groups (the tl.dot path), with chunks past some rows' lengths."""
    code = textwrap.dedent("""
        import math, torch
        from masep.decode_attention import decode_attention, split_kv_reference
        gen = torch.Generator().manual_seed(0)
        for b, n, kv, s, d, splits in [(3, 8, 4, 200, 16, 3), (2, 8, 2, 130, 16, 2), (2, 32, 2, 70, 32, 1)]:
            q = torch.randn(b, n, d, generator=gen)
            k, v = torch.randn(b, kv, s, d, generator=gen), torch.randn(b, kv, s, d, generator=gen)
            lengths = torch.tensor([1, s] + [s // 3] * (b - 2))[:b]
            scale = 1 / math.sqrt(d)
            want = split_kv_reference(q, k, v, lengths, splits, scale)
            for row, length in enumerate(lengths.tolist()):  # unwritten slots: must never be read
                k[row, :, length:] = float("nan")
                v[row, :, length:] = float("nan")
            got = decode_attention(q, k, v, lengths, scale, splits=splits)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        print("ok")
    """)
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=280)
    if "only 0-dimensional arrays can be converted" in out.stderr:  # as tests/test_fastpath.py
        pytest.skip("this triton's interpreter does not run under this numpy (>= 2.4)")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def _cuda_triton() -> bool:
    return torch.cuda.is_available() and _has_triton()


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.skipif(not _cuda_triton(), reason="needs CUDA and triton")
@pytest.mark.parametrize("b,n,kv,s,d", [(24, 32, 8, 2048, 128), (3, 16, 8, 300, 128), (5, 32, 8, 777, 128),
                                        (1, 4, 1, 4096, 64), (64, 16, 4, 40, 16)])
def test_bf16_on_cuda_matches_masked_sdpa(b, n, kv, s, d):
    """bf16 K and V, float32 statistics: both kernels round only their output to bf16, so they
    agree to ~1 bf16 ulp (2^-8 relative); 1e-2 of the output's scale. Rows of random lengths."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(b, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, kv, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    lengths = torch.randint(1, s + 1, (b,), device="cuda", generator=gen)
    lengths[0] = s
    from masep.decode_attention import decode_attention
    got = decode_attention(q, k, v, lengths, 1 / math.sqrt(d))
    want = _sdpa(q.float(), k.float(), v.float(), lengths, 1 / math.sqrt(d))
    assert _rel(got, want) < 1e-2


@pytest.mark.skipif(not _cuda_triton(), reason="needs CUDA and triton")
def test_bf16_check_fails_on_one_key_too_many():
    """The tolerance above can fail: short rows (8 keys), each reading one key past its length."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(16, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(16, 2, 64, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    lengths = torch.full((16,), 8, device="cuda")
    from masep.decode_attention import decode_attention
    wrong = decode_attention(q, k, v, lengths + 1, 1 / math.sqrt(128))
    assert _rel(wrong, _sdpa(q.float(), k.float(), v.float(), lengths, 1 / math.sqrt(128))) > 1e-2


@pytest.mark.skipif(not _cuda_triton(), reason="needs CUDA and triton")
def test_past_2_31_elements_of_kv():
    """A cache layer of 520 rows x 32 KV heads x 1024 positions x 128 (2.2e9 elements, as batch
    512 / context 2048 of `paper`), 2 query heads per KV head: the last rows are reached (int64
    offsets) and correct."""
    from masep.decode_attention import decode_attention
    b, kv, s, d = 520, 32, 1024, 128
    assert b * kv * s * d > 2**31
    gen = torch.Generator(device="cuda").manual_seed(3)
    k = torch.randn(b, kv, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    q = torch.randn(b, 2 * kv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    lengths = torch.randint(1, s + 1, (b,), device="cuda", generator=gen)
    got = decode_attention(q, k, v, lengths, 1 / math.sqrt(d))
    torch.cuda.synchronize()
    tail = slice(b - 8, None)
    want = _sdpa(q[tail].float(), k[tail].float(), v[tail].float(), lengths[tail], 1 / math.sqrt(d))
    assert _rel(got[tail], want) < 1e-2
