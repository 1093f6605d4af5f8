"""Decode attention over a KV cache that reads only each row's own keys (split-KV, no mask).

A decode step has one query token per row; row b attends to the first `lengths[b]` positions of
its cache (its position + 1). SDPA needs a boolean mask for that (keys past a row's position,
up to the bucketed attend length of a CUDA graph) and reads every key of the bucket. Here each
program reads one KV head of one row over one chunk of its keys (flash-decoding): with few
rows and heads the keys are cut into more chunks so every SM streams, and a second kernel
merges the chunks' partial softmaxes:

    chunk c of row b, query head h:  m_c = max_s score_s,  l_c = sum_s exp(score_s - m_c),
                                     acc_c = sum_s exp(score_s - m_c) v_s
    merged:  M = max_c m_c,  out = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c

The query heads of one KV head (GQA group) share the program, so K and V are read once per
KV head, and its tensor cores do the dots. It serves GQA layouts (`covers`): at 32 query
over 8 KV heads it reads at 0.83-1.06 of the copy bandwidth where the masked SDPA reads at
0.43-0.68. `split_kv_reference` is the same algorithm in torch (the CPU check of the chunking
and the merge); `decode_attention` runs the Triton kernels on CUDA.

Shapes: q [B, N, D] (N query heads, N = KV x G), k, v [B, KV, S, D] (a layer of the cache,
last dim contiguous), lengths [B] (1 <= lengths <= S) -> out [B, N, D] in q's dtype.
"""
from __future__ import annotations

import math

import torch

from .triton_util import tl, triton  # triton None: not installed

BLOCK_S = 64  # keys per inner iteration
MIN_CHUNK = 256  # a chunk shorter than this costs more in the merge than it gains in parallelism
PROGRAMS_PER_SM = 4  # enough programs in flight to keep every SM's loads outstanding


def num_splits(batch: int, kv_heads: int, max_len: int, sms: int) -> int:
    """Chunks per (row, KV head): enough programs for `sms` SMs, chunks of >= MIN_CHUNK keys.
    A host-side choice from the shapes (no sync; one CUDA graph holds one choice)."""
    if min(batch, kv_heads, max_len, sms) < 1:
        raise ValueError(f"num_splits: batch={batch}, kv_heads={kv_heads}, max_len={max_len}, sms={sms}: "
                         "each must be >= 1")
    want = -(-PROGRAMS_PER_SM * sms // (batch * kv_heads))
    return max(1, min(want, -(-max_len // MIN_CHUNK)))


def chunk_len(max_len: int, splits: int) -> int:
    """Keys per chunk: max_len over `splits` chunks, rounded up to a multiple of BLOCK_S."""
    per = -(-max_len // splits)
    return -(-per // BLOCK_S) * BLOCK_S


def covers(kv_group: int, head_dim: int) -> bool:
    """Where the kernel runs: GQA groups (>= 2 query heads per KV head; tl.dot needs head_dim
    >= 16). With one query head per KV head cuDNN's SDPA already reads K and V at the copy
    bandwidth (H200: 0.84-1.10 of it at batch >= 24), while a vector version of this kernel
    reached 0.48-0.76 and a tensor-core one padded to 16 rows 0.44-0.49
    (benchmarks/results/attention_h200_20261201*.json), so MHA keeps the masked SDPA."""
    return kv_group >= 2 and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _check(q_BND, k_BKSD, v_BKSD, lengths_B) -> tuple[int, int, int, int, int]:
    if q_BND.dim() != 3 or k_BKSD.dim() != 4 or v_BKSD.shape != k_BKSD.shape:
        raise ValueError(f"decode attention: q {tuple(q_BND.shape)}, k {tuple(k_BKSD.shape)}, v "
                         f"{tuple(v_BKSD.shape)}: need q [B, N, D] and k, v [B, KV, S, D]")
    b, n, d = q_BND.shape
    bk, kv, s, dk = k_BKSD.shape
    if bk != b or dk != d or n % kv or lengths_B.shape != (b,):
        raise ValueError(f"decode attention: q {tuple(q_BND.shape)}, k {tuple(k_BKSD.shape)}, lengths "
                         f"{tuple(lengths_B.shape)}: rows and head_dim must agree, N a multiple of KV")
    return b, n, d, kv, s


def split_kv_reference(q_BND, k_BKSD, v_BKSD, lengths_B, splits: int, scale: float) -> torch.Tensor:
    """The kernels' algorithm in torch, chunk by chunk (float32 statistics)."""
    b, n, d, kv, s = _check(q_BND, k_BKSD, v_BKSD, lengths_B)
    g, chunk = n // kv, chunk_len(s, splits)
    q = q_BND.float().view(b, kv, g, d)
    m_parts, l_parts, acc_parts = [], [], []
    keys = torch.arange(s, device=q.device)
    for c in range(splits):
        lo, hi = c * chunk, min((c + 1) * chunk, s)
        k, v = k_BKSD[:, :, lo:hi].float(), v_BKSD[:, :, lo:hi].float()
        score = torch.einsum("bkgd,bksd->bkgs", q, k) * scale
        valid = (keys[lo:hi][None, :] < lengths_B[:, None])[:, None, None, :]  # [B, 1, 1, chunk]
        score = score.masked_fill(~valid, -math.inf)
        m = score.amax(-1) if hi > lo else torch.full((b, kv, g), -math.inf, device=q.device)
        p = torch.exp(score - m.clamp_min(torch.finfo(torch.float32).min)[..., None])  # empty chunk: p = 0
        m_parts.append(m)
        l_parts.append(p.sum(-1))
        acc_parts.append(torch.einsum("bkgs,bksd->bkgd", p, v))
    m_all = torch.stack(m_parts)  # [splits, B, KV, G]
    top = m_all.amax(0)
    w = torch.exp(m_all - top)
    num = (w[..., None] * torch.stack(acc_parts)).sum(0)
    den = (w * torch.stack(l_parts)).sum(0)
    return (num / den[..., None]).view(b, n, d).to(q_BND.dtype)


if triton is not None:
    @triton.jit
    def _split_group_kernel(q_ptr, k_ptr, v_ptr, len_ptr, acc_ptr, ml_ptr, chunk, scale,
                            stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                            G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                            PRECISION: tl.constexpr):
        """Program (row b, KV head j, chunk c), GQA (G > 1 query heads per KV head): the partial
        softmax of the G heads over keys [c*chunk, min((c+1)*chunk, length)) on the tensor
        cores (G padded to BLOCK_G >= 16 rows). Writes acc [B, N, C, D], (m, l) [B, N, C, 2]."""
        b = tl.program_id(0)
        j = tl.program_id(1)
        c = tl.program_id(2)
        splits = tl.num_programs(2)
        length = tl.load(len_ptr + b)
        lo = c * chunk
        hi = tl.minimum(lo + chunk, length)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        s = tl.arange(0, BLOCK_S)
        g_ok = g < G
        heads = j * G + g
        b64 = b.to(tl.int64)  # a cache layer can pass 2^31 elements
        q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
        k_base = k_ptr + b64 * stride_kb + j.to(tl.int64) * stride_kh
        v_base = v_ptr + b64 * stride_vb + j.to(tl.int64) * stride_vh
        m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        for s0 in range(lo, hi, BLOCK_S):
            keys = s0 + s
            ok = keys < hi
            rows = keys.to(tl.int64)
            k = tl.load(k_base + rows[:, None] * stride_ks + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(v_base + rows[:, None] * stride_vs + d[None, :], mask=ok[:, None], other=0.0)
            score = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            score = tl.where(ok[None, :], score * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(score, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(score - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        part = (b64 * (tl.num_programs(1) * G) + heads) * splits + c  # [B, N, C] index
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=g_ok[:, None])
        tl.store(ml_ptr + part * 2, m_i, mask=g_ok)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=g_ok)

    @triton.jit
    def _merge_kernel(acc_ptr, ml_ptr, out_ptr, stride_ob, stride_oh, N,
                      SPLITS: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr):
        """Program (row b, query head h): the chunks' partial softmaxes merged -> out[b, h]."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        c = tl.arange(0, BLOCK_C)
        d = tl.arange(0, D)
        c_ok = c < SPLITS
        part = (b.to(tl.int64) * N + h) * SPLITS + c
        m = tl.load(ml_ptr + part * 2, mask=c_ok, other=float("-inf"))
        l = tl.load(ml_ptr + part * 2 + 1, mask=c_ok, other=0.0)
        top = tl.max(m, axis=0)  # chunk 0 holds key 0 of every row: finite
        w = tl.where(c_ok & (m > float("-inf")), tl.exp(m - top), 0.0)
        acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=c_ok[:, None], other=0.0)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def decode_attention(q_BND, k_BKSD, v_BKSD, lengths_B, scale: float, splits: int | None = None,
                     sms: int | None = None) -> torch.Tensor:
    """Attention of one query token per row over its first lengths[b] cached keys -> [B, N, D].
    Reads only those keys (no mask); `splits` chunks per (row, KV head), default num_splits."""
    b, n, d, kv, s = _check(q_BND, k_BKSD, v_BKSD, lengths_B)
    g = n // kv
    if not covers(g, d):
        raise ValueError(f"decode attention: {g} query heads per KV head, head_dim {d}: the kernel needs >= 2 "
                         "and a power of two >= 16 (use the masked SDPA otherwise)")
    if k_BKSD.stride(-1) != 1 or v_BKSD.stride(-1) != 1 or q_BND.stride(-1) != 1:
        raise ValueError("decode attention: q, k and v need a contiguous last dimension")
    if triton is None:
        raise RuntimeError("decode_attention needs triton (install a CUDA build of torch)")
    if splits is None:
        splits = num_splits(b, kv, s, sms or (_sm_count(q_BND.device) if q_BND.is_cuda else 1))
    chunk = chunk_len(s, splits)
    dev = q_BND.device
    acc = torch.empty(b, n, splits, d, dtype=torch.float32, device=dev)
    ml = torch.empty(b, n, splits, 2, dtype=torch.float32, device=dev)
    _split_group_kernel[(b, kv, splits)](
        q_BND, k_BKSD, v_BKSD, lengths_B, acc, ml, chunk, scale, q_BND.stride(0), q_BND.stride(1),
        k_BKSD.stride(0), k_BKSD.stride(1), k_BKSD.stride(2), v_BKSD.stride(0), v_BKSD.stride(1), v_BKSD.stride(2),
        G=g, BLOCK_G=max(16, 1 << (g - 1).bit_length()), D=d, BLOCK_S=BLOCK_S,
        PRECISION="ieee" if q_BND.dtype == torch.float32 else "tf32", num_warps=4)  # fp32 in full precision
    out = torch.empty(b, n, d, dtype=q_BND.dtype, device=dev)
    _merge_kernel[(b, n)](acc, ml, out, out.stride(0), out.stride(1), n,
                          SPLITS=splits, BLOCK_C=max(2, 1 << (splits - 1).bit_length()), D=d, num_warps=1)
    return out
