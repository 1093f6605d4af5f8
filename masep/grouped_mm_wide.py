"""Grouped matmul for many rows per expert, where the experts' matmuls are bound by FLOPs.

At batch 2048 of `paper` (4096 token-expert rows over 16 experts, about 256 rows each) an expert
matmul does 2 * 256 FLOPs per weight byte it reads, above the H200's ridge (about 180), so the
kernel must keep the tensor cores busy rather than stream weights: large tiles (64-128 rows x
128-256 columns), Hopper's asynchronous tensor-core instructions (Triton emits them for tiles
of 64+ rows), and an order of tiles that reads every weight tile from HBM about once.

Tile order. Program p takes row block `slot` (the blocks of every group, in order: the same
slot numbering as fastpath's decode kernel) and column block `col`, in one of three orders
(ORDER; autotuning tries each, the best depends on the shapes):
0. row block major: a row block's activations stay in L2 while every weight tile of its group
   streams past; the group's other row blocks come a whole row of column blocks later;
1. row blocks fastest: one column block's weight tiles of every group are in flight at once,
   each shared by its group's row blocks; every activation is read once per column block;
2. group by group, column outer, the group's row blocks inner: the programs that share a weight
   tile run side by side (each weight tile leaves HBM once) and a group's activations (a few
   MB) stay in L2 across its column blocks.

Two load paths, chosen on the host: pointers (any strides, any triton with tl.dot) and TMA
tensor descriptors (Hopper, triton with `triton.tools.tensor_descriptor`, weights stored
[E, M, K] with K contiguous: the layout of model.Experts). Rows past a group's end are loaded
(they belong to the next group, or TMA fills zeros past N) but never stored.

Shapes: x [N, K] rows sorted by group, w [E, K, M] (a transposed view of [E, M, K] weights),
offs [E] int32 cumulative row ends (offs[-1] == N) -> out [N, M], x's dtype.
"""
from __future__ import annotations

import torch

from .triton_util import tl, triton, round_bf16  # triton None: not installed

try:  # host-side TMA descriptors: triton >= 3.3 (feature-checked, not version-pinned)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


if triton is not None:
    @triton.jit
    def _find_tile(offs_ptr, pid, N, M, E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   ORDER: tl.constexpr):
        """Program -> (group, first row, row end of the group, first column); group -1: no tile.
        ORDER (module docstring): 0 row block major, 1 row blocks fastest, 2 group by group."""
        num_slots = (N + E * (BLOCK_N - 1)) // BLOCK_N  # bound on sum_e ceil(count_e / BLOCK_N)
        num_cols = tl.cdiv(M, BLOCK_M)
        if ORDER == 0:
            slot, col = pid // num_cols, pid % num_cols
        elif ORDER == 1:
            slot, col = pid % num_slots, pid // num_slots
        else:  # find the group whose tiles hold pid, then column outer, its row blocks inner
            first_tile, first_block, start, slot, col = 0, 0, 0, -1, 0
            for e in tl.static_range(E):
                end = tl.load(offs_ptr + e)
                blocks = (end - start + BLOCK_N - 1) // BLOCK_N
                local = pid - first_tile
                hit = (local >= 0) & (local < blocks * num_cols)
                slot = tl.where(hit, first_block + local % tl.maximum(blocks, 1), slot)
                col = tl.where(hit, local // tl.maximum(blocks, 1), col)
                first_tile += blocks * num_cols
                first_block += blocks
                start = end
        group, row0, row1 = slot_rows(offs_ptr, slot, E, BLOCK_N)
        return group, row0, row1, col * BLOCK_M

    @triton.jit
    def slot_rows(offs_ptr, slot, E: tl.constexpr, BLOCK_N: tl.constexpr):
        """Row block `slot`, counting the BLOCK_N-row blocks of every group in order -> (its
        group, its first row, its group's row end); group -1 past the last block. Shared with
        the decode kernel (fastpath.py)."""
        first_block, start, group, row0, row1 = 0, 0, -1, 0, 0
        for e in tl.static_range(E):
            end = tl.load(offs_ptr + e)
            blocks = (end - start + BLOCK_N - 1) // BLOCK_N
            hit = (slot >= first_block) & (slot < first_block + blocks)
            group = tl.where(hit, e, group)
            row0 = tl.where(hit, start + (slot - first_block) * BLOCK_N, row0)
            row1 = tl.where(hit, end, row1)
            first_block += blocks
            start = end
        return group, row0, row1

    @triton.jit
    def group_tile(x_ptr, w_ptr, group, rows, cols, row_ok, col_ok, K, stride_xn, stride_xk, stride_we, stride_wk,
                   stride_wm, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
        """x[rows] @ w[group][:, cols] in float32 [BLOCK_N, BLOCK_M], over K in BLOCK_K steps
        (rows past row_ok and columns past col_ok read zeros); rows int64. Shared with the decode
        kernel (fastpath.py); Triton inlines it, so the K loop is pipelined as if written there."""
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xk
        w_ptrs = w_ptr + group.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wm
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + ks) < K
                a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        return acc

    @triton.jit
    def _store_tile(out_ptr, acc, row0, row1, col0, M, stride_on, stride_om, BLOCK_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, GELU: tl.constexpr):
        """The tile's rows of its group; GELU: the exact (erf) GELU of the rounded product, as
        F.gelu of the matmul's output computes it (in float32, rounded once more at the end)."""
        if GELU:
            if out_ptr.dtype.element_ty == tl.bfloat16:
                v = round_bf16(acc)
            else:
                v = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
            acc = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
        rows = (row0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = col0 + tl.arange(0, BLOCK_M)
        ptrs = out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_om
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < row1)[:, None] & (cols < M)[None, :])

    @triton.jit
    def _wide_ptr_kernel(x_ptr, w_ptr, out_ptr, offs_ptr, N, M, K, N_BUCKET,
                         stride_xn, stride_xk, stride_we, stride_wk, stride_wm, stride_on, stride_om,
                         E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                         ORDER: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, GELU: tl.constexpr):
        """N_BUCKET: only the autotuner's key."""
        group, row0, row1, col0 = _find_tile(offs_ptr, tl.program_id(0), N, M, E, BLOCK_N, BLOCK_M, ORDER)
        if group >= 0:
            rows = (row0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # rows x K of a prefill can pass 2^31
            cols = col0 + tl.arange(0, BLOCK_M)
            acc = group_tile(x_ptr, w_ptr, group, rows, cols, rows < N, cols < M, K, stride_xn, stride_xk, stride_we,
                             stride_wk, stride_wm, BLOCK_N, BLOCK_M, BLOCK_K, EVEN_K, PRECISION)
            _store_tile(out_ptr, acc, row0, row1, col0, M, stride_on, stride_om, BLOCK_N, BLOCK_M, GELU)

    @triton.jit
    def _wide_tma_kernel(x_desc, w_desc, out_ptr, offs_ptr, N, M, K, N_BUCKET, stride_on, stride_om,
                         E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                         ORDER: tl.constexpr, GELU: tl.constexpr):
        """w_desc: the weights as a 2-D [E * M, K] tensor (K contiguous); a column block that runs
        past M reads the next expert's rows, which land only in columns that are not stored."""
        group, row0, row1, col0 = _find_tile(offs_ptr, tl.program_id(0), N, M, E, BLOCK_N, BLOCK_M, ORDER)
        if group >= 0:
            w_row = group * M + col0
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                a = x_desc.load([row0, k0])
                b = w_desc.load([w_row, k0])
                acc = tl.dot(a, b.T, acc)
            _store_tile(out_ptr, acc, row0, row1, col0, M, stride_on, stride_om, BLOCK_N, BLOCK_M, GELU)

    def _configs(tma: bool):
        def set_blocks(nargs):  # TMA descriptors carry their block shape: set it per candidate
            if tma:
                nargs["x_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
                nargs["w_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        # (BLOCK_N, BLOCK_M, BLOCK_K, warps, stages): the five that won somewhere on an H200 from
        # 128 to 4096 rows (bench_grouped_mm.py rows keep the pick); 128x128 tiles never did
        shapes = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (64, 256, 64, 4, 4), (64, 256, 64, 8, 4),
                  (64, 128, 64, 4, 5)]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk, "ORDER": order},
                              num_warps=w, num_stages=s, pre_hook=set_blocks)
                for bn, bm, bk, w, s in shapes for order in (0, 1, 2)]

    # keyed by the shapes that set the best tile; N in powers of two (rows vary step to step)
    _wide_ptr = triton.autotune(configs=_configs(False), key=["M", "K", "E", "N_BUCKET"])(
        triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_wide_ptr_kernel))
    _wide_tma = triton.autotune(configs=_configs(True), key=["M", "K", "E", "N_BUCKET"])(_wide_tma_kernel)
else:  # the kernels exist only where triton is installed
    group_tile = slot_rows = None


def grouped_mm_shapes(who: str, x_NK: torch.Tensor, w_EKM: torch.Tensor, offs_E: torch.Tensor
                      ) -> tuple[int, int, int, int]:
    """(N, K, E, M) of a grouped matmul's operands, checked (a Triton kernel's caller)."""
    if triton is None:
        raise RuntimeError(f"{who} needs triton (install a CUDA build of torch)")
    n, k = x_NK.shape
    e, k2, m = w_EKM.shape
    if k != k2 or offs_E.shape != (e,):
        raise ValueError(f"{who}: x {tuple(x_NK.shape)}, w {tuple(w_EKM.shape)}, offs "
                         f"{tuple(offs_E.shape)}: need x [N, K], w [E, K, M], offs [E]")
    return n, k, e, m


def _num_slots(n: int, e: int, block_n: int) -> int:
    return (n + e * (block_n - 1)) // block_n


def tma_applies(x_NK: torch.Tensor, w_EKM: torch.Tensor) -> bool:
    """The TMA path: a Hopper-class GPU, a triton with host descriptors, 16-bit data, x rows
    contiguous and the weights stored [E, M, K] contiguous (w_EKM its transposed view)."""
    if TensorDescriptor is None or not x_NK.is_cuda or torch.cuda.get_device_capability(x_NK.device)[0] < 9:
        return False
    w_EMK = w_EKM.transpose(1, 2)
    return (x_NK.dtype in (torch.bfloat16, torch.float16) and x_NK.is_contiguous() and w_EMK.is_contiguous()
            and x_NK.shape[1] % 16 == 0)  # TMA: 16-byte aligned row strides and blocks


def wide_grouped_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offs_E: torch.Tensor, tma: bool | None = None,
                    config: dict | None = None, act: str | None = None) -> torch.Tensor:
    """F.grouped_mm(x, w, offs=offs)'s contract (2-D x, 3-D w) for many rows per group; act
    "gelu": F.gelu of it, applied in the epilogue.

    tma: None = where it applies (tma_applies). config: pin one candidate (BLOCK_N, BLOCK_M,
    BLOCK_K, ORDER, num_warps, num_stages) instead of autotuning (tests, benchmarks)."""
    n, k, e, m = grouped_mm_shapes("wide_grouped_mm", x_NK, w_EKM, offs_E)
    if act not in (None, "gelu"):
        raise ValueError(f"wide_grouped_mm: act={act!r}, the epilogue has None or 'gelu'")
    out = torch.empty(n, m, dtype=x_NK.dtype, device=x_NK.device)
    if n == 0:
        return out
    use_tma = tma_applies(x_NK, w_EKM) if tma is None else tma
    n_bucket = 1 << max(0, n - 1).bit_length()
    grid = lambda meta: (_num_slots(n, e, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    extra = {"GELU": act == "gelu"}
    if use_tma:
        x_desc = TensorDescriptor.from_tensor(x_NK, [64, 64])  # block shapes: set per candidate
        w_desc = TensorDescriptor.from_tensor(w_EKM.transpose(1, 2).reshape(e * m, k), [64, 64])
        args = (x_desc, w_desc, out, offs_E, n, m, k, n_bucket, *out.stride())
        kernel, tuned = _wide_tma_kernel, _wide_tma
    else:
        args = (x_NK, w_EKM, out, offs_E, n, m, k, n_bucket, *x_NK.stride(), *w_EKM.stride(), *out.stride())
        kernel, tuned = _wide_ptr_kernel, _wide_ptr
        # fp32 in full precision (tl.dot's default rounds the inputs through TF32)
        extra["PRECISION"] = "ieee" if x_NK.dtype == torch.float32 else "tf32"
    if config is None:
        tuned[grid](*args, E=e, **extra)
        return out
    meta = dict(config)
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    if use_tma:
        x_desc.block_shape, w_desc.block_shape = [meta["BLOCK_N"], meta["BLOCK_K"]], [meta["BLOCK_M"], meta["BLOCK_K"]]
    else:
        meta["EVEN_K"] = k % meta["BLOCK_K"] == 0
    kernel[grid(meta)](*args, E=e, num_warps=warps, num_stages=stages, **meta, **extra)
    return out
