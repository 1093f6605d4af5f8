"""The CUDA decode fast path: one decode step of the model captured in a CUDA graph.

`GraphedLocalRuntime` has the interface of `masep.runtime.LocalRuntime` (start / prefill /
decode / finish). On CUDA its decode step

- runs bf16 (whatever dtype the model has), SDPA over the KV cache (model.Attention),
- runs the experts as grouped matmuls (F.grouped_mm, or the Triton kernel below where it is
  faster), with routing counts kept on the device (model.Experts._forward_all_local),
- optionally (`set_fused`) replaces the small ops around them with Triton kernels: RMSNorm in
  one kernel, RoPE of q and k plus the KV-cache write in one, the router's softmax/top-k in
  one, the routing sort/count in one (a decode step is otherwise ~250 tiny kernels), and, for
  GQA layouts, the masked SDPA with split-KV decode attention that reads only each row's keys
  (decode_attention.py),
- is captured once per (batch, attend_len bucket) in a CUDA graph with static input buffers
  for tokens and positions, and replayed: no host sync and no per-kernel launch cost.

The attention length is rounded up to a bucket (`bucket_len`) so one graph serves many
steps; keys past a row's position are masked, so a longer bucket changes only the summation
order, not the function. Prefill stays eager (its length varies per call).

On CPU (or with graphs=False) decode runs the model eagerly with the exact attend_len, so
the logits are identical to LocalRuntime's: CPU is the test oracle.

Shape legend as in model.py: B batch, V vocabulary, N rows, K reduction dim, M output dim,
E experts.
"""
from __future__ import annotations

import functools
import math

import torch

from .decode_attention import covers as decode_attention_covers
from .decode_attention import decode_attention
from .grouped_mm_wide import group_tile, slot_rows  # None without triton, as the kernels below
from .grouped_mm_wide import grouped_mm_shapes
from .grouped_mm_wide import tma_applies as wide_tma_applies
from .grouped_mm_wide import wide_grouped_mm
from .model import Attention, Experts, MoETransformer, RMSNorm, Router, rope_tables
from .runtime import LocalRuntime, lay_out
from .triton_util import round_bf16, tl, triton  # triton None: not installed

EXPERT_IMPLS = ("grouped_mm", "triton", "wide", "auto")
# The expert kernel by token-expert rows ("auto"), from benchmarks/bench_grouped_mm.py on an H200
# (`paper`, bf16, one weight matrix; results/grouped_mm_h200_20261201*.md):
# - below WIDE_FROM_ROWS, the decode kernel below: its deep weight pipeline serves the
#   memory-bound small batches (1.4x F.grouped_mm at batch 24); at 128 rows the two tie;
# - from WIDE_FROM_ROWS, the wide kernel (grouped_mm_wide.py): 0.50 against the decode kernel's
#   0.57-0.59 ms at 256 rows over 16 experts, 0.56 against F.grouped_mm's 0.68-0.71 at 1024, 0.84
#   against 1.09-1.12 at 2048 (whole steps: 8.21 against 8.52 ms at batch 128, 12.09 against
#   12.74 at 256, 20.97 against 21.93 at 512); at 4096 rows (batch 2048) its TMA path ties or
#   beats F.grouped_mm (1.21 / 1.12 against 1.22 / 1.19 ms, up / down) but its pointer path does
#   not (1.37 / 1.31), so from GROUPED_MM_FROM_ROWS rows F.grouped_mm (CUTLASS) runs wherever the
#   TMA path does not apply.
WIDE_FROM_ROWS = 256
GROUPED_MM_FROM_ROWS = 4096


def bucket_len(attend_len: int, max_len: int, step: int = 256) -> int:
    """Round attend_len up to a multiple of `step`, capped at max_len (one CUDA graph per bucket)."""
    if attend_len < 1 or attend_len > max_len:
        raise ValueError(f"attend_len={attend_len}: must be in [1, max_len={max_len}]")
    if step < 1:
        raise ValueError(f"bucket step={step}: must be a positive integer")
    return min(max_len, -(-attend_len // step) * step)


# --- Triton grouped matmul for decode-sized expert batches -----------------------------------
def bucket_rows(rows: int) -> int:
    """Batch-size bucket of a decode step replayed from CUDA graphs: 1, 2, 4, 8, then multiples
    of 8 (vLLM's capture sizes are similar): at most 7 padding rows, a few dozen graphs."""
    if rows <= 8:
        return 1 << max(0, rows - 1).bit_length()
    return -(-rows // 8) * 8


def block_rows(rows: int, num_groups: int) -> int:
    """Rows per program: the expected rows per group, as a power of two in [16, 64]
    (tl.dot needs >= 16; larger blocks re-read each weight tile fewer times)."""
    per_group = max(1, -(-rows // max(1, num_groups)))
    return min(64, max(16, 1 << (per_group - 1).bit_length()))


def num_row_slots(rows: int, num_groups: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(count_e / block_m) over any split of `rows` into groups."""
    return (rows + num_groups * (block_m - 1)) // block_m


if triton is not None:
    @triton.jit
    def _grouped_mm_kernel(x_ptr, w_ptr, out_ptr, offs_ptr, M, K, num_slots,
                           stride_xn, stride_xk, stride_we, stride_wk, stride_wm, stride_on, stride_om,
                           E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
        """out[rows of group e] = x[rows of group e] @ w[e]; groups given by cumulative offs [E].

        Program (slot, m-block): slot = the slot-th block of BLOCK_N rows, counting the blocks
        of every group in order; slots past the last block exit. Slots vary fastest, so the
        blocks that read the same weight tile run together and share it through L2.
        """
        pid = tl.program_id(0)
        slot = pid % num_slots
        pid_m = pid // num_slots
        group, row0, row1 = slot_rows(offs_ptr, slot, E, BLOCK_N)
        if group >= 0:
            # int64 row offsets: a prefill's rows x K can pass 2^31 elements
            rows = (row0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < row1
            col_ok = cols < M
            acc = group_tile(x_ptr, w_ptr, group, rows, cols, row_ok, col_ok, K, stride_xn, stride_xk, stride_we,
                             stride_wk, stride_wm, BLOCK_N, BLOCK_M, BLOCK_K, EVEN_K, PRECISION)
            out_ptrs = out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_om
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    # Decode is memory-bound: few rows, long weight streams. Candidates favour deep pipelines.
    _CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bm, bk, w, s in [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 4), (128, 128, 8, 4),
                                     (32, 256, 4, 4), (64, 128, 4, 6), (128, 256, 8, 3), (32, 128, 4, 6)]]
    _grouped_mm_tuned = triton.autotune(configs=_CONFIGS, key=["M", "K", "BLOCK_N", "E"])(_grouped_mm_kernel)


def triton_grouped_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offs_E: torch.Tensor,
                      config: dict | None = None) -> torch.Tensor:
    """Same contract as F.grouped_mm(x, w, offs=offs) for 2-D x and 3-D w: rows of x sorted by
    group, offs [E] int32 cumulative row ends (offs[-1] == N) -> [N, M] in x's dtype.

    `config` (BLOCK_M, BLOCK_K, num_warps, num_stages) pins the tile instead of autotuning.
    """
    n, k, e, m = grouped_mm_shapes("triton_grouped_mm", x_NK, w_EKM, offs_E)
    out = torch.empty(n, m, dtype=x_NK.dtype, device=x_NK.device)
    if n == 0:
        return out
    # fp32 in full precision (tl.dot's default would round the inputs through TF32); 16-bit
    # inputs ignore the setting
    precision = "ieee" if x_NK.dtype == torch.float32 else "tf32"
    block_n = block_rows(n, e)
    slots = num_row_slots(n, e, block_n)
    args = (x_NK, w_EKM, out, offs_E, m, k, slots, *x_NK.stride(), *w_EKM.stride(), *out.stride())
    if config is None:
        grid = lambda meta: (slots * triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
        even = k % 256 == 0  # every candidate BLOCK_K divides 256
        _grouped_mm_tuned[grid](*args, E=e, BLOCK_N=block_n, EVEN_K=even, PRECISION=precision)
    else:
        meta = dict(config)
        warps, stages = meta.pop("num_warps", 4), meta.pop("num_stages", 3)
        grid = (slots * triton.cdiv(m, meta["BLOCK_M"]),)
        _grouped_mm_kernel[grid](*args, E=e, BLOCK_N=block_n, EVEN_K=k % meta["BLOCK_K"] == 0,
                                 PRECISION=precision, num_warps=warps, num_stages=stages, **meta)
    return out


# --- fused small ops: a decode step is ~250 tiny kernels besides the weight streams -----------
if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, H, eps, stride_x, stride_o, BLOCK: tl.constexpr,
                         ROUND_BF16: tl.constexpr):
        """One row: float32 mean of squares, rsqrt, cast to x's dtype, times the weight (as RMSNorm)."""
        row = tl.program_id(0).to(tl.int64)  # rows x H of a long prefill passes 2^31 elements
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        if ROUND_BF16:
            y = round_bf16(x * r)
        else:
            y = (x * r).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        out = w * y
        if ROUND_BF16:
            out = round_bf16(out)  # exact in bf16 now, whatever rounding the final cast uses
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _topk_softmax_kernel(logits_ptr, w_ptr, id_ptr, X, E: tl.constexpr, E2: tl.constexpr, K: tl.constexpr,
                             NORM: tl.constexpr, BLOCK_X: tl.constexpr):
        """Router tail per row: float32 softmax over E logits, top-K by repeated argmax (lowest
        index on ties), optional renormalisation; weights in w's dtype, ids int64."""
        rows = tl.program_id(0) * BLOCK_X + tl.arange(0, BLOCK_X)
        cols = tl.arange(0, E2)
        row_ok = rows < X
        logits = tl.load(logits_ptr + rows[:, None] * E + cols[None, :],
                         mask=row_ok[:, None] & (cols[None, :] < E), other=float("-inf")).to(tl.float32)
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        total = tl.zeros((BLOCK_X,), dtype=tl.float32)
        q = p
        for _ in tl.static_range(K):  # pass 1: the sum of the top-K probabilities
            best = tl.max(q, axis=1)
            pick = tl.min(tl.where(q == best[:, None], cols[None, :], E2), axis=1)
            total += best
            q = tl.where(cols[None, :] == pick[:, None], -1.0, q)
        if not NORM:
            total = tl.full((BLOCK_X,), 1.0, tl.float32)
        q = p
        for t in tl.static_range(K):  # pass 2: write them, renormalised
            best = tl.max(q, axis=1)
            pick = tl.min(tl.where(q == best[:, None], cols[None, :], E2), axis=1)
            tl.store(w_ptr + rows * K + t, (best / total).to(w_ptr.dtype.element_ty), mask=row_ok)
            tl.store(id_ptr + rows * K + t, pick.to(tl.int64), mask=row_ok)
            q = tl.where(cols[None, :] == pick[:, None], -1.0, q)

    @triton.jit
    def _route_kernel(ids_ptr, w_ptr, offs_ptr, token_ptr, w_sorted_ptr, where_ptr, n, K: tl.constexpr,
                      E: tl.constexpr, E2: tl.constexpr, BLOCK: tl.constexpr):
        """Stable counting sort of n token-expert pairs by expert: cumulative row ends offs [E]
        (int32), the token of each sorted row (int64), its routing weight, and where each pair
        went (where[j] = its sorted row). Program p places pairs [p*BLOCK, (p+1)*BLOCK): it counts
        every pair's expert (all programs read all n ids: a few KB) for the experts' starts, and
        the earlier programs' pairs for its own offset within each expert."""
        pid = tl.program_id(0)
        experts = tl.arange(0, E2)
        counts = tl.zeros((E2,), dtype=tl.int32)
        before = tl.zeros((E2,), dtype=tl.int32)
        for b in range(0, tl.cdiv(n, BLOCK)):
            j = b * BLOCK + tl.arange(0, BLOCK)
            ids = tl.load(ids_ptr + j, mask=j < n, other=-1)
            c = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
            counts += c
            before += tl.where(b < pid, c, 0)
        ends = tl.cumsum(counts, axis=0)
        j = pid * BLOCK + tl.arange(0, BLOCK)
        ok = j < n
        ids = tl.load(ids_ptr + j, mask=ok, other=-1)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [BLOCK, E2]
        rank = tl.sum(onehot * tl.cumsum(onehot, axis=0), axis=1) - 1  # earlier pairs of mine, same expert
        dest = tl.sum(onehot * (ends - counts + before)[None, :], axis=1) + rank
        if pid == 0:
            tl.store(offs_ptr + experts, ends, mask=experts < E)
        tl.store(token_ptr + dest, (j // K).to(tl.int64), mask=ok)
        tl.store(w_sorted_ptr + dest, tl.load(w_ptr + j, mask=ok), mask=ok)
        tl.store(where_ptr + j, dest.to(tl.int64), mask=ok)

    @triton.jit
    def _combine_kernel(y_ptr, w_ptr, where_ptr, out_ptr, H, stride_y, stride_o, K: tl.constexpr,
                        BLOCK_H: tl.constexpr, ROUND_BF16: tl.constexpr):
        """Program (token t, column block): out[t] = sum_i w[t, i] * y[where[t*K + i]], each
        product rounded to y's dtype and the sum rounded after each add, as the model's
        `y * w` then index_add_ into zeros round them; no atomics, so the result is the same
        every run."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = cols < H
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for i in tl.static_range(K):
            row = tl.load(where_ptr + t * K + i)
            w = tl.load(w_ptr + t * K + i).to(tl.float32)
            y = tl.load(y_ptr + row * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
            if ROUND_BF16:
                acc = round_bf16(acc + round_bf16(y * w))
            else:
                acc = (acc + (y * w).to(out_ptr.dtype.element_ty).to(tl.float32)).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, ck_ptr, cv_ptr, N,
                           s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_rb, s_ob, s_oh,
                           s_ckb, s_ckh, s_cks, s_cvb, s_cvh, s_cvs, D: tl.constexpr, ROUND_BF16: tl.constexpr):
        """Program (b, h): rotate-half RoPE of query head h into q_out, or (h >= N) of KV head
        h - N into the cache at the row's position, with its value. Rounds like apply_rope:
        x*cos and rotated*sin each to the storage dtype, then their sum.

        Offsets are int64: a cache layer [B, K, S, D] passes 2^31 elements at, e.g., batch 512 x
        32 KV heads x 2048 positions x 128, and an int32 `b * s_ckb` wraps to an illegal address."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        i = tl.arange(0, D)
        partner = (i + D // 2) % D
        sign = tl.where(i < D // 2, -1.0, 1.0)
        ty = q_out_ptr.dtype.element_ty
        cos = tl.load(cos_ptr + b * s_rb + i).to(tl.float32)
        sin = tl.load(sin_ptr + b * s_rb + i).to(tl.float32)
        if h < N:
            src = q_ptr + b * s_qb + h * s_qh
            x, xp = tl.load(src + i).to(tl.float32), tl.load(src + partner).to(tl.float32)
            if ROUND_BF16:
                out = round_bf16(round_bf16(x * cos) + round_bf16(sign * xp * sin)).to(ty)
            else:
                out = ((x * cos).to(ty).to(tl.float32) + (sign * xp * sin).to(ty).to(tl.float32)).to(ty)
            tl.store(q_out_ptr + b * s_ob + h * s_oh + i, out)
        else:
            kh = h - N
            pos = tl.load(pos_ptr + b)
            src = k_ptr + b * s_kb + kh * s_kh
            x, xp = tl.load(src + i).to(tl.float32), tl.load(src + partner).to(tl.float32)
            if ROUND_BF16:
                out = round_bf16(round_bf16(x * cos) + round_bf16(sign * xp * sin)).to(ty)
            else:
                out = ((x * cos).to(ty).to(tl.float32) + (sign * xp * sin).to(ty).to(tl.float32)).to(ty)
            tl.store(ck_ptr + b * s_ckb + kh * s_ckh + pos * s_cks + i, out)
            tl.store(cv_ptr + b * s_cvb + kh * s_cvh + pos * s_cvs + i, tl.load(v_ptr + b * s_vb + kh * s_vh + i))


ROUTE_MAX_PAIRS = 1 << 16  # each program of the routing sort reads every pair's expert: keep it to kilobytes


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm.forward in one kernel (float32 statistics; the same rounding steps)."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block = _pow2(h)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, h, eps, x2.stride(0), out.stride(0), BLOCK=block,
                                     ROUND_BF16=x.dtype == torch.bfloat16, num_warps=min(16, max(1, block // 256)))
    return out.view(x.shape)


def fused_topk_softmax(logits_XE: torch.Tensor, top_k: int, norm: bool, dtype: torch.dtype):
    """Router.forward's tail: weights [X, k] (dtype) and ids [X, k] (int64)."""
    x, e = logits_XE.shape
    logits_XE = logits_XE.contiguous()
    weights = torch.empty(x, top_k, dtype=dtype, device=logits_XE.device)
    ids = torch.empty(x, top_k, dtype=torch.long, device=logits_XE.device)
    block_x = 16
    _topk_softmax_kernel[(triton.cdiv(x, block_x),)](logits_XE, weights, ids, x, E=e, E2=_pow2(e), K=top_k,
                                                      NORM=norm, BLOCK_X=block_x)
    return weights, ids


def fused_route(local_ids_Xk: torch.Tensor, weights_Xk: torch.Tensor, num_experts: int):
    """Stable sort of token-expert pairs by local expert: offs [E] int32 (cumulative row ends),
    token [X*k] int64, sorted weights [X*k], where [X*k] int64 (pair j's sorted row); the same
    order as argsort(stable=True)."""
    x, k = local_ids_Xk.shape
    n = x * k
    if n > ROUTE_MAX_PAIRS:
        raise ValueError(f"fused_route: {n} token-expert pairs exceed ROUTE_MAX_PAIRS={ROUTE_MAX_PAIRS}")
    dev = local_ids_Xk.device
    offs = torch.empty(num_experts, dtype=torch.int32, device=dev)
    token = torch.empty(n, dtype=torch.long, device=dev)
    where = torch.empty(n, dtype=torch.long, device=dev)
    w_sorted = torch.empty(n, dtype=weights_Xk.dtype, device=dev)
    block = min(256, max(16, _pow2(n)))
    _route_kernel[(triton.cdiv(n, block),)](local_ids_Xk.contiguous(), weights_Xk.contiguous(), offs, token,
                                            w_sorted, where, n, K=k, E=num_experts,
                                            E2=max(16, _pow2(num_experts)), BLOCK=block, num_warps=4)
    return offs, token, w_sorted, where


def fused_combine(y_NH: torch.Tensor, weights_Xk: torch.Tensor, where: torch.Tensor, top_k: int) -> torch.Tensor:
    """The weighted sum of each token's expert outputs [X, H]: y_NH the expert rows in sorted
    order, weights [X, k] as the router gave them, where [X*k] from fused_route."""
    y_NH = y_NH.contiguous()  # the kernel reads rows with unit column stride
    n, h = y_NH.shape
    x = n // top_k
    out = torch.empty(x, h, dtype=y_NH.dtype, device=y_NH.device)
    if x == 0:
        return out
    block_h = min(1024, _pow2(h))
    _combine_kernel[(x, triton.cdiv(h, block_h))](y_NH, weights_Xk.contiguous(), where, out, h, y_NH.stride(0),
                                                  out.stride(0), K=top_k, BLOCK_H=block_h,
                                                  ROUND_BF16=y_NH.dtype == torch.bfloat16, num_warps=4)
    return out


def fused_rope_cache_write(q_BND, k_BKD, v_BKD, cos, sin, positions_B, cache_k, cache_v) -> torch.Tensor:
    """Decode (one token per row): RoPE on q -> [B, N, 1, D]; RoPE on k and v written into the
    layer's cache [B, K, S, D] at positions_B. Replaces apply_rope x2 and KVCache.write."""
    b, n, d = q_BND.shape
    kh = k_BKD.shape[1]
    q_out = torch.empty(b, n, 1, d, dtype=q_BND.dtype, device=q_BND.device)
    cos, sin = cos.reshape(b, d), sin.reshape(b, d)
    positions_B = positions_B.contiguous()
    _rope_cache_kernel[(b, n + kh)](
        q_BND, k_BKD, v_BKD, cos, sin, positions_B, q_out, cache_k, cache_v, n,
        q_BND.stride(0), q_BND.stride(1), k_BKD.stride(0), k_BKD.stride(1), v_BKD.stride(0), v_BKD.stride(1),
        cos.stride(0), q_out.stride(0), q_out.stride(1), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2), D=d, ROUND_BF16=q_BND.dtype == torch.bfloat16,
        num_warps=1)
    return q_out


def _attention_forward(attn, x_BTH, positions_BT, cache=None, layer=0, attend_len=None, rope=None):
    """Attention.forward for a CUDA decode step (one token per row, a cache; RoPE tables given,
    or made here): projections, then one kernel for RoPE + cache write, then split-KV attention
    (GQA layouts, decode_attention.covers) or the model's own SDPA, and o_proj."""
    b, t, _ = x_BTH.shape
    cfg = attn.cfg
    if not (x_BTH.is_cuda and cache is not None and cache.rows is None and t == 1 and b > 0
            and x_BTH.dtype == cache.k[layer].dtype and cfg.rope_dim == cfg.head_dim and cfg.head_dim % 2 == 0
            and cfg.head_dim & (cfg.head_dim - 1) == 0):
        return type(attn).forward(attn, x_BTH, positions_BT, cache, layer, attend_len, rope)
    if rope is None:  # the distributed runtimes call attention per layer without the tables
        rope = rope_tables(cfg, positions_BT, x_BTH.dtype)
    d = cfg.head_dim
    n, kv = len(attn.heads), len(attn.kv_heads)
    q = attn.q_proj(x_BTH).view(b, n, d)
    k = attn.k_proj(x_BTH).view(b, kv, d)
    v = attn.v_proj(x_BTH).view(b, kv, d)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q_BN1D = fused_rope_cache_write(q, k, v, rope[0], rope[1], positions_BT[:, 0], cache.k[layer], cache.v[layer])
    s = attend_len or cache.max_len
    keys, values = cache.k[layer][:, :, :s], cache.v[layer][:, :, :s]
    if attn.full_grid and decode_attention_covers(cfg.kv_group, d):
        # GQA: split-KV; row b attends to keys 0..position_b (the model's mask), read in place,
        # never past them. MHA keeps the masked SDPA, which reads at the copy bandwidth there.
        lengths_B = (positions_BT[:, 0] + 1).clamp_max(s)
        out = decode_attention(q_BN1D[:, :, 0], keys, values, lengths_B, 1.0 / math.sqrt(d))
        return attn.o_proj(out.reshape(b, t, n * d))
    key_pos = torch.arange(s, device=x_BTH.device).expand(b, s)
    out = attn._attend(q_BN1D, keys, values, positions_BT, key_pos)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def _norm_forward(norm, x):
    if not x.is_cuda or x.numel() == 0:
        return type(norm).forward(norm, x)
    return fused_rms_norm(x, norm.weight, norm.eps)


def _router_forward(router, x_XH):
    # the fused kernel is softmax top-k: DeepSeek's sigmoid scoring keeps the model's own code
    if not x_XH.is_cuda or x_XH.shape[0] == 0 or router.e_score_correction_bias is not None:
        return type(router).forward(router, x_XH)
    logits = torch.nn.functional.linear(x_XH, router.weight)
    return fused_topk_softmax(logits, router.cfg.top_k, router.cfg.norm_topk_prob, x_XH.dtype)


def _experts_forward(experts, x_XH, weights_Xk, ids_Xk, grouped=True):
    """Experts.forward for all-local experts with the routing prologue in one kernel."""
    if not (x_XH.is_cuda and grouped and experts.all_local and 0 < ids_Xk.numel() <= ROUTE_MAX_PAIRS):
        return type(experts).forward(experts, x_XH, weights_Xk, ids_Xk, grouped)
    offs, token, _, where = fused_route(experts.local_index[ids_Xk], weights_Xk, len(experts.expert_ids))
    return fused_combine(experts.matmuls(x_XH[token], offs), weights_Xk, where, ids_Xk.shape[1])


def set_fused(model: torch.nn.Module, on: bool) -> None:
    """Swap RMSNorm, Router and (all-local) Experts forwards for the fused Triton versions on
    CUDA inputs (CPU inputs keep the model's own code); off restores the model's forwards."""
    if on and triton is None:
        raise ValueError("fused kernels need triton, which is not installed")
    patches = {RMSNorm: _norm_forward, Router: _router_forward, Experts: _experts_forward,
               Attention: _attention_forward}
    for module in model.modules():
        patch = patches.get(type(module))
        module.__dict__.pop("forward", None)
        if on and patch is not None:
            module.forward = functools.partial(patch, module)


def auto_grouped_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offs_E: torch.Tensor, act: str | None = None
                    ) -> torch.Tensor:
    """The faster kernel for this many rows (WIDE_FROM_ROWS, GROUPED_MM_FROM_ROWS): a host-side
    choice from the shape, so it adds no sync and each CUDA graph holds one kernel. fp32 always
    takes the Triton decode kernel (F.grouped_mm has no fp32 CUDA kernel)."""
    rows = x_NK.shape[0]
    if x_NK.dtype == torch.float32 or rows < WIDE_FROM_ROWS:
        return _then(act, triton_grouped_mm(x_NK, w_EKM, offs_E))
    if rows < GROUPED_MM_FROM_ROWS or wide_tma_applies(x_NK, w_EKM):
        return wide_grouped_mm(x_NK, w_EKM, offs_E, act=act)
    return _then(act, torch.nn.functional.grouped_mm(x_NK, w_EKM, offs=offs_E))



def auto_expert_impl(model: torch.nn.Module) -> str | None:
    """"auto" (auto_grouped_mm: Triton kernels, F.grouped_mm for the largest matmuls without TMA) for a model on
    CUDA where triton is installed, else None (keep the model's F.grouped_mm). fp32 takes the
    Triton kernel at every size: F.grouped_mm has no fp32 CUDA kernel, and its fallback copies
    the offsets to the host, which a CUDA graph cannot hold; the Triton kernel runs fp32 in
    full (IEEE) precision, so fp32 stays the dtype we check against the oracle."""
    param = next(model.parameters())
    return "auto" if param.is_cuda and triton is not None else None


def _then(act: str | None, out: torch.Tensor) -> torch.Tensor:
    """A kernel without an activation epilogue: the activation as its own pass (as model.Experts)."""
    if act not in (None, "gelu"):
        raise ValueError(f"grouped matmul act={act!r}: only None or 'gelu' can be fused")
    return out if act is None else torch.nn.functional.gelu(out)


def wide_or_decode_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offs_E: torch.Tensor, act: str | None = None
                      ) -> torch.Tensor:
    """"wide": the wide Triton kernel at every size (16-bit; fp32 keeps the decode kernel, which
    runs it in IEEE): the A/B against "auto", which picks a kernel by rows."""
    if x_NK.dtype != torch.float32:
        return wide_grouped_mm(x_NK, w_EKM, offs_E, act=act)
    return _then(act, triton_grouped_mm(x_NK, w_EKM, offs_E))


def set_expert_impl(model: torch.nn.Module, impl: str) -> None:
    """Use `impl` ("grouped_mm", "triton", "wide" or "auto": by row count) for every Experts module."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"expert impl {impl!r}: choose one of {EXPERT_IMPLS}")
    if impl != "grouped_mm" and triton is None:
        raise ValueError(f"expert impl {impl!r} needs triton, which is not installed: use 'grouped_mm'")
    fn = {"grouped_mm": None, "triton": triton_grouped_mm, "wide": wide_or_decode_mm, "auto": auto_grouped_mm}[impl]
    for module in model.modules():
        if isinstance(module, Experts):
            module.grouped_mm_fn = fn


# --- the runtime --------------------------------------------------------------------------------
class GraphedLocalRuntime(LocalRuntime):
    """LocalRuntime with each decode step replayed from a CUDA graph (see the module docstring).

    graphs: None = on when the model is on CUDA. bucket: attend_len granularity of the graphs.
    expert_impl: "auto" = the Triton grouped matmul for a bf16/fp16 model on CUDA where triton is
    installed (1.4x F.grouped_mm's speed at decode sizes on an H200; see auto_expert_impl), else
    the model's setting; None keeps the
    model's setting; else see `set_expert_impl`.
    fused: None keeps the model's setting (off by default); else see `set_fused`.
    Pass tokens and positions on the model's device: a host tensor costs a blocking copy.
    """

    def __init__(self, model: MoETransformer, graphs: bool | None = None, bucket: int = 256,
                 expert_impl: str | None = "auto", fused: bool | None = None):
        super().__init__(model)
        on_cuda = self.device.type == "cuda"
        self.graphs = on_cuda if graphs is None else graphs
        if self.graphs and not on_cuda:
            raise ValueError(f"graphs=True needs a CUDA model, got device {self.device}")
        if bucket < 1:
            raise ValueError(f"bucket={bucket}: must be a positive integer")
        self.bucket = bucket
        if expert_impl == "auto":
            expert_impl = auto_expert_impl(model)
        if expert_impl is not None:
            set_expert_impl(model, expert_impl)
        if fused is not None:
            set_fused(model, fused)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def start(self, num_slots: int, max_len: int) -> None:
        super().start(num_slots, max_len)
        self._graphs.clear()
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def forward(self, rows, step_id: int | None = None) -> torch.Tensor:
        """Decode steps replay the graph of their batch-size bucket (the slots up to the highest
        one, rounded up; padding rows write the cache's scratch position); prefill runs eagerly."""
        if self.cache is None or not rows.is_decode or not len(rows):
            return super().forward(rows, step_id)
        rows.check(self.cache.num_slots, self.cache.max_len)
        n = min(bucket_rows(max(rows.slots) + 1), self.cache.num_slots)
        st = lay_out(rows, self.cache.scratch_position, self.device, dense_rows=n)
        return self._replay(n, st.ids_BT, st.positions_BT, st.attend_len)[st.logit_rows_B]

    @torch.inference_mode()
    def decode(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, attend_len: int) -> torch.Tensor:
        """A static batch (slot b = row b) from device tensors, with no host read (benchmarks)."""
        if self.cache is None:
            raise ValueError("decode before start(): call start(num_slots, max_len) first")
        if tokens_B.shape[0] > self.cache.num_slots:
            raise ValueError(f"tokens_B shape {tuple(tokens_B.shape)}: this runtime was started for "
                             f"batch {self.cache.num_slots}")
        return self._replay(tokens_B.shape[0], tokens_B[:, None], positions_B[:, None], attend_len)

    def _replay(self, n: int, ids_n1: torch.Tensor, positions_n1: torch.Tensor, attend_len: int) -> torch.Tensor:
        tokens, positions = self._buffers_for(n)
        tokens.copy_(ids_n1, non_blocking=True)
        positions.copy_(positions_n1, non_blocking=True)
        if not self.graphs:
            return self._step(n, attend_len)
        s = bucket_len(attend_len, self.cache.max_len, self.bucket)
        if (n, s) not in self._graphs:
            self._graphs[n, s] = self._capture(n, s)
        graph, out = self._graphs[n, s]
        graph.replay()
        return out.clone()  # the next replay overwrites `out`

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture now every graph a serving decode step can replay (each batch bucket up to
        num_slots x each attend bucket), as vLLM does at start-up, so no request waits for a
        capture mid-run. Largest first: later graphs reuse the memory pool the largest sized.
        The capture steps feed every row at the cache's scratch position, so no slot's KV
        changes. Returns the number of graphs (0 without CUDA graphs)."""
        if self.cache is None:
            raise ValueError("capture_all before start(): call start(num_slots, max_len) first")
        if not self.graphs:
            return 0
        slots, max_len = self.cache.num_slots, self.cache.max_len
        sizes = sorted({min(bucket_rows(r), slots) for r in range(1, slots + 1)}, reverse=True)
        lengths = sorted({bucket_len(a, max_len, self.bucket) for a in range(1, max_len + 1, self.bucket)}
                         | {max_len}, reverse=True)
        for n in sizes:
            tokens, positions = self._buffers_for(n)
            for s in lengths:
                if (n, s) not in self._graphs:
                    tokens.zero_()
                    positions.fill_(self.cache.scratch_position)
                    self._graphs[n, s] = self._capture(n, s)
        return len(self._graphs)

    def _buffers_for(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Static token and position buffers [n, 1] of batch bucket n (graphs read them in place)."""
        if n not in self._buffers:
            self._buffers[n] = (torch.zeros(n, 1, dtype=torch.long, device=self.device),
                                torch.zeros(n, 1, dtype=torch.long, device=self.device))
        return self._buffers[n]

    def _step(self, n: int, attend_len: int) -> torch.Tensor:
        tokens, positions = self._buffers[n]
        logits = self.model(tokens, positions, self.cache.view(slice(0, n)), attend_len=attend_len)
        return logits[:, 0].float()

    def _capture(self, n: int, attend_len: int):
        # Warm up on a side stream (autotuning, cuBLAS handles, lazy inits happen outside the
        # capture). The warm-up steps write this step's K/V into the cache; so does the replay,
        # with the same values.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(n, attend_len)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._step(n, attend_len)
        self._pool = graph.pool()
        return graph, out

    def finish(self) -> None:
        self.cache = None
        self._graphs.clear()
        self._pool = None
