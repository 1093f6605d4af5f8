"""Single-device MoE transformer: the oracle every parallel strategy is tested against.

This file never imports torch.distributed and never reads a rank. Parallel strategies build
the same modules over a slice of heads or experts (`Attention(cfg, heads=...)`,
`Experts(cfg, expert_ids=...)`) and copy weights in from outside.

Shape legend (suffixes on tensor names):
  B batch (sequences)   T tokens per sequence in this call   S key/value positions attended
  H hidden size         N query heads (local)                K key/value heads (local)
  D head dim            E experts (local)                    I expert hidden size
  V vocabulary          X flattened tokens (B*T)             k experts per token (top-k)
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# SDPA grew `enable_gqa` in torch 2.5; feature-check rather than pin a version.


class RMSNorm(nn.Module):
    """Normalises in float32 and casts back before the weight, as transformers does."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 inv_freq: torch.Tensor | None = None, scale: float = 1.0):
    """cos, sin [B, 1, T, D] for rotate-half RoPE, computed in float32 (times `scale`, YaRN's
    attention factor). inv_freq [D/2]: the frequencies when scaled (rope_tables), else theta's."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_BT.device).float() / head_dim))
    freqs = positions_BT.float()[..., None] * inv_freq.to(positions_BT.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    if scale == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched `factor` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """YaRN frequencies [rope_dim / 2]: dimensions that turn fewer than beta_slow times over the
    original context are interpolated (divided by the factor), those turning more than beta_fast
    times are kept, and a linear ramp blends the ones between."""
    d, base, factor = cfg.rope_dim, cfg.rope_theta, cfg.rope_factor
    pos_freqs = base ** (torch.arange(0, d, 2).float() / d)

    def turning_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return d * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(turning_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(turning_dim(cfg.yarn_beta_slow)), d - 1)
    ramp = ((torch.arange(d // 2).float() - low) / ((high - low) or 0.001)).clamp(0, 1)
    keep = 1 - ramp  # the share of the original (extrapolated) frequency
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_tables(cfg: ModelConfig, positions_BT: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B, 1, T, rope_dim] for every layer of `cfg` (YaRN-scaled when configured)."""
    if cfg.rope_type != "yarn":
        return rope_cos_sin(positions_BT, cfg.rope_dim, cfg.rope_theta, dtype)
    f, m, m_all = cfg.rope_factor, cfg.yarn_mscale, cfg.yarn_mscale_all_dim
    scale = yarn_mscale(f, m) / yarn_mscale(f, m_all) if m and m_all else yarn_mscale(f)
    return rope_cos_sin(positions_BT, cfg.rope_dim, cfg.rope_theta, dtype, yarn_inv_freq(cfg), scale)


def apply_rope(x_BNTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x_BNTD.shape[-1] // 2
    rotated = torch.cat((-x_BNTD[..., half:], x_BNTD[..., :half]), dim=-1)
    return x_BNTD * cos + rotated * sin


def kv_heads_for(cfg: ModelConfig, heads: range) -> range:
    """The KV heads that query heads `heads` read under grouped-query attention."""
    return range(heads.start // cfg.kv_group, (heads.stop - 1) // cfg.kv_group + 1)


@dataclass(frozen=True)
class CacheLayout:
    """What one layer's cache holds per slot and position: k [heads, k_dim] and v [heads, v_dim].

    GQA: keys and values of the KV heads held. MLA (mla.py): k is the token's compressed latent
    [1, kv_lora_rank] (after its norm) and v its roped key [1, qk_rope_head_dim]; every head
    reads them, so every head-parallel rank of a replica holds the whole of it (replicated)."""

    heads: int
    k_dim: int
    v_dim: int

    @classmethod
    def of(cls, cfg: ModelConfig, kv_heads: int) -> "CacheLayout":
        """The layout of an attention holding `kv_heads` KV heads (MLA: always the one latent)."""
        if cfg.is_mla:
            return cls(1, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        return cls(kv_heads, cfg.head_dim, cfg.head_dim)

    def bytes_per_position(self, dtype: torch.dtype) -> int:
        return self.heads * (self.k_dim + self.v_dim) * torch.finfo(dtype).bits // 8


@dataclass
class KVCache:
    """Per-layer key/value tensors [slots, K, S_max + 1, D] for the local KV heads (an MLA
    layer's k and v are its latent and roped key instead: CacheLayout).

    Position S_max is a scratch column: rows that only pad a batch (a free slot inside a decode
    batch, the right padding of a prefill chunk) write there, and no real query ever attends to
    it (keys are read up to `attend_len` <= S_max). So padding never touches a live position.

    A view (`view(rows)`) addresses some slots: a slice keeps views of the storage (no copy);
    an index tensor [B] (any slots, in any order) writes in place and gathers on read.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    rows: torch.Tensor | None = None  # slot of each batch row; None: the tensors' own rows, in order

    @classmethod
    def empty(cls, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        return cls.allocate(num_layers, batch, CacheLayout(kv_heads, head_dim, head_dim), max_len, dtype, device)

    @classmethod
    def allocate(cls, num_layers: int, batch: int, layout: CacheLayout, max_len: int, dtype, device):
        def zeros(dim):
            return torch.zeros((batch, layout.heads, max_len + 1, dim), dtype=dtype, device=device)
        return cls([zeros(layout.k_dim) for _ in range(num_layers)], [zeros(layout.v_dim) for _ in range(num_layers)])

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] - 1

    @property
    def scratch_position(self) -> int:
        return self.max_len

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[0]

    def view(self, rows: slice | torch.Tensor) -> "KVCache":
        """The slots `rows` of this (unviewed) cache, as one batch."""
        assert self.rows is None, "a view of a view"
        if isinstance(rows, slice):
            return KVCache([k[rows] for k in self.k], [v[rows] for v in self.v])
        return KVCache(self.k, self.v, rows)

    def write(self, layer: int, positions_BT: torch.Tensor, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> None:
        rows = self.rows if self.rows is not None else torch.arange(positions_BT.shape[0], device=positions_BT.device)
        rows = rows[:, None].expand_as(positions_BT)
        self.k[layer][rows, :, positions_BT] = k_BKTD.transpose(1, 2)
        self.v[layer][rows, :, positions_BT] = v_BKTD.transpose(1, 2)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, K, length, D] of the first `length` positions."""
        k, v = self.k[layer][:, :, :length], self.v[layer][:, :, :length]
        return (k, v) if self.rows is None else (k[self.rows], v[self.rows])


def through_cache(cache: "KVCache | None", layer: int, positions_BT: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  attend_len: int | None):
    """The step's two cached tensors (K and V; MLA: latent and roped key) [B, heads, T, *] written
    at positions_BT, and what attention reads back: both over the first `attend_len` positions
    (default: all) with their key positions [B, S]; without a cache, the step's own tensors."""
    if cache is None:
        return a, b, positions_BT
    cache.write(layer, positions_BT, a, b)
    s = attend_len or cache.max_len
    a_keys, b_keys = cache.read(layer, s)
    return a_keys, b_keys, torch.arange(s, device=positions_BT.device).expand(positions_BT.shape[0], s)


class Attention(nn.Module):
    """GQA attention over query heads `heads` (all by default; a contiguous slice for head parallelism).

    The output projection covers only the local heads, so partial outputs of a head-parallel
    group sum to the full output.
    """

    def __init__(self, cfg: ModelConfig, heads: range | None = None, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.heads = heads if heads is not None else range(cfg.num_heads)
        self.kv_heads = kv_heads_for(cfg, self.heads)
        n, k, d, h = len(self.heads), len(self.kv_heads), cfg.head_dim, cfg.hidden_size
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(h, n * d, bias=cfg.qkv_bias, **kw)
        self.k_proj = nn.Linear(h, k * d, bias=cfg.qkv_bias, **kw)
        self.v_proj = nn.Linear(h, k * d, bias=cfg.qkv_bias, **kw)
        self.o_proj = nn.Linear(n * d, h, bias=False, **kw)
        self.q_norm = RMSNorm(d, cfg.rms_eps, **kw) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_eps, **kw) if cfg.qk_norm else None
        # Where each local query head sits in a [local KV heads x kv_group] grid (its KV head's row,
        # its place in that KV head's group): _attend lays the queries out on this grid so every
        # KV head is read in place, also when the head split cuts a group (see _attend).
        g = cfg.kv_group
        slot_of_q = torch.tensor([(q // g - self.kv_heads.start) * g + q % g for q in self.heads])
        self.register_buffer("slot_of_q", slot_of_q.to(device), persistent=False)
        self.full_grid = self.heads.start % g == 0 and len(self.heads) % g == 0

    @property
    def cache_layout(self) -> CacheLayout:
        return CacheLayout.of(self.cfg, len(self.kv_heads))

    def forward(self, x_BTH: torch.Tensor, positions_BT: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, attend_len: int | None = None, rope=None) -> torch.Tensor:
        """Partial attention output [B, T, H] of the local heads (already through o_proj).
        `rope`: (cos, sin) of rope_cos_sin(positions_BT, ...) when the caller computed it once
        for all layers; None computes it here."""
        b, t, _ = x_BTH.shape
        d = self.cfg.head_dim
        n, kv = len(self.heads), len(self.kv_heads)  # explicit: an empty micro-batch has b = 0
        q = self.q_proj(x_BTH).view(b, t, n, d)
        k = self.k_proj(x_BTH).view(b, t, kv, d)
        v = self.v_proj(x_BTH).view(b, t, kv, d).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope if rope is not None else rope_tables(self.cfg, positions_BT, x_BTH.dtype)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        keys, values, key_pos = through_cache(cache, layer, positions_BT, k, v, attend_len)
        out = self._attend(q, keys, values, positions_BT, key_pos)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, n * d))

    def _attend(self, q_BNTD, k_BKSD, v_BKSD, q_pos_BT, k_pos_BS) -> torch.Tensor:
        """Attention of the local query heads over the local KV heads, reading K and V in place.

        GQA without copying the cache: the g query heads of KV head j are folded into the query
        length, q [B, K, g*T, D] against k, v [B, K, S, D], one SDPA call in which every KV head
        serves its own g*T queries. Where a head split cuts a group (an uneven split, e.g. 32
        heads over 12 ranks), the missing heads of the edge groups are zero queries whose
        outputs are dropped: padding copies queries, never the cache. The mask is the same for
        the g heads of a group, so it is repeated along the query length (B x g*T x S booleans).
        """
        # An explicit mask, never is_causal: with a cache, is_causal=True aligns the mask top-left
        # and a single decode query would attend only to key 0.
        mask = k_pos_BS[:, None, None, :] <= q_pos_BT[:, None, :, None]  # [B, 1, T, S]
        scale = 1.0 / math.sqrt(self.cfg.head_dim)
        g = self.cfg.kv_group
        if g == 1:  # one query head per KV head: nothing to fold
            return F.scaled_dot_product_attention(q_BNTD, k_BKSD, v_BKSD, attn_mask=mask, scale=scale)
        b, n, t, d = q_BNTD.shape
        kv = k_BKSD.shape[1]
        if self.full_grid:
            grid = q_BNTD
        else:
            grid = q_BNTD.new_zeros(b, kv * g, t, d)
            grid[:, self.slot_of_q] = q_BNTD
        out = F.scaled_dot_product_attention(grid.reshape(b, kv, g * t, d), k_BKSD, v_BKSD,
                                             attn_mask=mask.repeat(1, 1, g, 1), scale=scale)
        out = out.reshape(b, kv * g, t, d)  # SDPA may return a non-contiguous layout (fp32 prefill)
        return out if self.full_grid else out[:, self.slot_of_q]


def _grouped_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x_NK, w_EKM, offs=offs_E)


class Router(nn.Module):
    """Softmax over all experts, top-k, optional renormalisation (Mixtral / Qwen semantics); or
    DeepSeek-V3's sigmoid scoring (`cfg.router_scoring`, see `_sigmoid_topk`)."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, device=device, dtype=dtype))
        # DeepSeek-V3's per-expert bias added to the scores only to choose experts; set by a
        # load-balancing rule, not by gradients; float32 as transformers keeps it.
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(cfg.num_experts, device=device, dtype=torch.float32), requires_grad=False)
            if cfg.router_scoring == "sigmoid" else None)
        # A trainer sets a list here to receive (logits [X, E] float32, ids [X, k]) of every call:
        # the auxiliary losses need the router's logits, which forward() does not return.
        self.record: list | None = None

    def forward(self, x_XH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weights [X, k] (x's dtype) and expert ids [X, k] (int64)."""
        if self.e_score_correction_bias is not None:
            return self._sigmoid_topk(x_XH)
        logits = F.linear(x_XH, self.weight).float()
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, self.cfg.top_k, dim=-1)
        if self.record is not None:
            self.record.append((logits, ids))
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x_XH.dtype), ids

    def _sigmoid_topk(self, x_XH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3: scores = sigmoid(logits) in float32; the experts are chosen by scores +
        bias, first the best `topk_groups` groups (a group's merit: its two best biased scores),
        then the top-k inside them; the weights are the chosen plain scores (renormalised when
        norm_topk_prob) times routed_scaling_factor."""
        c = self.cfg
        logits = F.linear(x_XH.float(), self.weight.float())
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias
        if c.topk_groups < c.expert_groups:
            grouped = choice.view(-1, c.expert_groups, c.num_experts // c.expert_groups)
            merit = grouped.topk(2, dim=-1).values.sum(dim=-1)
            best = merit.topk(c.topk_groups, dim=-1).indices
            keep = torch.zeros_like(merit, dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, c.num_experts)
        ids = choice.topk(c.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.record is not None:
            self.record.append((logits, ids))
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * c.routed_scaling_factor).to(x_XH.dtype), ids


class Experts(nn.Module):
    """The experts `expert_ids` (all by default), stacked for grouped matmul.

    w_gate/w_up [E, I, H] and w_down [E, H, I], in nn.Linear's (out, in) orientation.
    """

    def __init__(self, cfg: ModelConfig, expert_ids: Sequence[int] | None = None, device=None, dtype=None,
                 hidden_cols: range | None = None):
        super().__init__()
        # hidden_cols: only these columns of each expert's hidden dimension (tensor parallelism);
        # the activation is elementwise over it, so the slices' outputs sum to the full output.
        self.hidden_cols = hidden_cols
        self.full_hidden = cfg.expert_hidden  # of the whole expert (init_random_ draws whole ones)
        cfg = cfg if hidden_cols is None else cfg.replace(expert_hidden=len(hidden_cols))
        self.cfg = cfg
        self.expert_ids = list(expert_ids) if expert_ids is not None else list(range(cfg.num_experts))
        e, i, h = len(self.expert_ids), cfg.expert_hidden, cfg.hidden_size
        kw = dict(device=device, dtype=dtype)
        self.w_gate = nn.Parameter(torch.empty(e, i, h, **kw)) if cfg.expert_act == "swiglu" else None
        self.w_up = nn.Parameter(torch.empty(e, i, h, **kw))
        self.w_down = nn.Parameter(torch.empty(e, h, i, **kw))
        # global expert id -> local index (-1 = not held here)
        local = torch.full((cfg.num_experts,), -1, dtype=torch.long)
        local[self.expert_ids] = torch.arange(e)
        self.register_buffer("local_index", local.to(device), persistent=False)
        # Every expert held here: no token is dropped, so routing needs no boolean mask and all
        # shapes are static (no host sync; the step can be captured in a CUDA graph).
        self.all_local = sorted(self.expert_ids) == list(range(cfg.num_experts))
        # Optional grouped-matmul kernel (x [N, K], w [E, K, M], offs [E] int32) -> [N, M];
        # None = F.grouped_mm. masep.fastpath installs a Triton kernel here on CUDA.
        self.grouped_mm_fn = None

    def _act(self, gate, up):
        return F.silu(gate) * up if self.w_gate is not None else F.gelu(up)

    def forward_sorted(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows of x sorted by local expert, counts [E] per local expert -> outputs [N, H].

        One grouped matmul per weight matrix; the offsets stay on the device (no host sync).
        """
        return self.matmuls(x_NH, torch.cumsum(counts_E, 0).to(torch.int32))

    def matmuls(self, x_NH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """forward_sorted given the cumulative row ends offs [E] (int32). A grouped-matmul kernel
        that says `fuses_gelu` applies a GELU expert's activation in its epilogue instead of a
        separate pass over the [N, I] hidden rows."""
        mm = self.grouped_mm_fn or _grouped_mm
        if self.w_gate is None and getattr(mm, "fuses_gelu", False):
            hidden = mm(x_NH, self.w_up.transpose(1, 2), offs_E, act="gelu")
        else:
            up = mm(x_NH, self.w_up.transpose(1, 2), offs_E)
            gate = mm(x_NH, self.w_gate.transpose(1, 2), offs_E) if self.w_gate is not None else None
            hidden = self._act(gate, up)
        return mm(hidden, self.w_down.transpose(1, 2), offs_E)

    def forward_loop(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Reference path: one expert at a time, plain matmuls."""
        outs, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            rows = x_NH[start:start + n]
            gate = rows @ self.w_gate[e].T if self.w_gate is not None else None
            outs.append(self._act(gate, rows @ self.w_up[e].T) @ self.w_down[e].T)
            start += n
        return torch.cat(outs) if outs else x_NH.new_zeros(0, self.cfg.hidden_size)

    def forward(self, x_XH: torch.Tensor, weights_Xk: torch.Tensor, ids_Xk: torch.Tensor,
                grouped: bool = True) -> torch.Tensor:
        """Weighted sum over the token's local experts [X, H]; experts held elsewhere add nothing."""
        if self.all_local:
            return self._forward_all_local(x_XH, weights_Xk, ids_Xk, grouped)
        local_Xk = self.local_index[ids_Xk]
        mine = (local_Xk >= 0).flatten()
        flat_local = local_Xk.flatten()[mine]
        order = torch.argsort(flat_local, stable=True)
        token = torch.arange(x_XH.shape[0], device=x_XH.device).repeat_interleave(ids_Xk.shape[1])[mine][order]
        counts = torch.bincount(flat_local, minlength=len(self.expert_ids))
        run = self.forward_sorted if grouped else self.forward_loop
        y = run(x_XH[token], counts) * weights_Xk.flatten()[mine][order, None]
        return torch.zeros_like(x_XH).index_add_(0, token, y.to(x_XH.dtype))

    def _forward_all_local(self, x_XH, weights_Xk, ids_Xk, grouped):
        """forward() when every expert is local: the same arithmetic, with static shapes and no
        host sync (counts by scatter_add: CUDA bincount reads its max back to the host)."""
        k = ids_Xk.shape[1]
        flat_local = self.local_index[ids_Xk].flatten()
        order = torch.argsort(flat_local, stable=True)
        token = torch.div(torch.arange(flat_local.numel(), device=x_XH.device), k, rounding_mode="floor")[order]
        counts = torch.zeros(len(self.expert_ids), dtype=torch.long, device=x_XH.device)
        counts.scatter_add_(0, flat_local, torch.ones_like(flat_local))
        run = self.forward_sorted if grouped else self.forward_loop
        y = run(x_XH[token], counts) * weights_Xk.flatten()[order, None]
        return torch.zeros_like(x_XH).index_add_(0, token, y.to(x_XH.dtype))


class SharedExpert(nn.Module):
    """The always-on SwiGLU expert of an MoE layer: Qwen2-MoE's, scaled by sigmoid(gate(x));
    DeepSeek's (its n shared experts as one of n times the width), ungated."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        h, i = cfg.hidden_size, cfg.shared_expert_hidden
        self.gate_proj, self.up_proj = nn.Linear(h, i, **kw), nn.Linear(h, i, **kw)
        self.down_proj = nn.Linear(i, h, **kw)
        self.gate = nn.Linear(h, 1, **kw) if cfg.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return y if self.gate is None else torch.sigmoid(self.gate(x)) * y


class DenseMLP(nn.Module):
    """The SwiGLU MLP of a dense layer (DeepSeek's first layers), or the hidden columns `cols`
    of it (tensor parallelism: gate/up rows and down columns; the slices' outputs sum to the
    whole, as the experts' do)."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None, cols: range | None = None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.cols, self.full_hidden = cols, cfg.dense_hidden  # init_random_ draws whole matrices
        h, i = cfg.hidden_size, len(cols) if cols is not None else cfg.dense_hidden
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i, **kw), nn.Linear(h, i, **kw), nn.Linear(i, h, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass(frozen=True)
class BlockParts:
    """Which slices of one block a module holds; a parallel plan decides (parallel/parts.py).

    heads: query heads of the attention (None: no attention). experts: global ids of the experts
    held (None: none). hidden_cols: each held expert's hidden columns (None: all). active: False
    when the whole layer lives elsewhere (another pipeline stage): nothing is held.
    dense_cols: a dense layer's MLP columns held (None: all); its MLP is held where its
    attention is (heads not None): it runs on the attention side, nothing crosses to experts."""

    heads: range | None
    experts: tuple[int, ...] | None
    hidden_cols: range | None = None
    active: bool = True
    dense_cols: range | None = None

    @classmethod
    def everything(cls, cfg: ModelConfig) -> "BlockParts":
        return cls(range(cfg.num_heads), tuple(range(cfg.num_experts)))


@dataclass(frozen=True)
class ModelParts:
    """What one rank holds of the whole model (a parallel plan decides: parallel/parts.py): one
    BlockParts per layer, the token embedding, the final norm with the lm_head. Indexing and
    iterating go over the layers' BlockParts."""

    blocks: tuple[BlockParts, ...]
    embedding: bool = True
    head: bool = True

    @classmethod
    def of(cls, parts: "Sequence[BlockParts] | ModelParts") -> "ModelParts":
        """A list of BlockParts (the layers only) holds the embedding and the head too."""
        return parts if isinstance(parts, ModelParts) else cls(tuple(parts))

    @classmethod
    def everything(cls, cfg: ModelConfig) -> "ModelParts":
        return cls((BlockParts.everything(cfg),) * cfg.num_layers)

    def __getitem__(self, layer: int) -> BlockParts:
        return self.blocks[layer]

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None, parts: BlockParts | None = None):
        super().__init__()
        parts = parts or BlockParts.everything(cfg)
        self.router = Router(cfg, device, dtype)
        self.experts = (Experts(cfg, parts.experts, device, dtype, parts.hidden_cols)
                        if parts.experts is not None else None)
        # the shared expert runs where the tokens are settled, beside the attention: a rank with
        # experts only (a separated expert rank) does not hold it
        held = cfg.shared_expert_hidden and parts.heads is not None
        self.shared = SharedExpert(cfg, device, dtype) if held else None

    def add_shared(self, z_XH: torch.Tensor, routed_XH: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum [X, H] plus the shared expert of the same rows z (when
        the model has one): the one place the shared expert joins the routed output."""
        if self.shared is None or z_XH.shape[0] == 0:
            return routed_XH
        return routed_XH + self.shared(z_XH)

    def forward(self, x_BTH: torch.Tensor, grouped: bool = True) -> torch.Tensor:
        x_XH = x_BTH.reshape(-1, x_BTH.shape[-1])
        weights, ids = self.router(x_XH)
        return self.add_shared(x_XH, self.experts(x_XH, weights, ids, grouped=grouped)).view_as(x_BTH)


def make_attention(cfg: ModelConfig, heads: range | None = None, device=None, dtype=None) -> nn.Module:
    """The attention class the config asks for, over query heads `heads`: GQA, or multi-head
    latent attention (mla.py, which builds on this file: imported here, when first needed)."""
    if cfg.is_mla:
        from .mla import MLAttention
        return MLAttention(cfg, heads, device, dtype)
    return Attention(cfg, heads, device, dtype)


class Block(nn.Module):
    """One layer: attention, then the MoE; or, in a dense layer (`cfg.is_dense_layer`), a dense
    MLP in the MoE's place (`moe` is None, `mlp` is set; `moe_norm` is the norm before either).

    The forward is written once, in pieces a distributed runtime can cut between at its
    transfers (the attention may run on a head slice and be summed elsewhere; the routed rows
    may travel to other ranks and back): attention_partial, then h = x + (summed) partial,
    moe_inputs(h) -> the rows the experts see and their routing, then moe_residual(h, z, routed)
    once the experts' weighted outputs are back. forward() is those pieces on one device."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None, parts: BlockParts | None = None, layer: int = -1):
        super().__init__()
        parts = parts or BlockParts.everything(cfg)
        self.mlp = None
        if not parts.active:
            self.attn_norm = self.attn = self.moe_norm = self.moe = None
            return
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, device, dtype)
        self.attn = make_attention(cfg, parts.heads, device, dtype) if parts.heads is not None else None
        self.moe_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, device, dtype)
        if cfg.is_dense_layer(layer):
            self.moe = None
            self.mlp = DenseMLP(cfg, device, dtype, parts.dense_cols) if parts.heads is not None else None
        else:
            self.moe = MoE(cfg, device, dtype, parts)

    def attention_partial(self, x_BTH, positions_BT, cache=None, layer=0, attend_len=None, rope=None,
                          attn: "Attention | None" = None) -> torch.Tensor:
        """attn(attn_norm(x)) [B, T, H] with `attn` (default: this block's), a head slice's partial
        output when it is one (partials of a head group sum to the whole)."""
        return (attn or self.attn)(self.attn_norm(x_BTH), positions_BT, cache, layer, attend_len, rope)

    def moe_inputs(self, h_XH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z = moe_norm(h) [X, H] (the rows the experts see) and the router's weights, ids [X, k]."""
        z = self.moe_norm(h_XH)
        weights, ids = self.moe.router(z)
        return z, weights, ids

    def moe_residual(self, h_XH: torch.Tensor, z_XH: torch.Tensor, routed_XH: torch.Tensor) -> torch.Tensor:
        """h + sum_k w_k expert_k(z) (+ the shared expert of z): the block's output rows [X, H]."""
        return h_XH + self.moe.add_shared(z_XH, routed_XH)

    def forward(self, x, positions, cache=None, layer=0, attend_len=None, grouped=True, rope=None):
        h = x + self.attention_partial(x, positions, cache, layer, attend_len, rope)
        if self.moe is None:
            return h + self.mlp(self.moe_norm(h))
        h_XH = h.reshape(-1, h.shape[-1])
        z, weights, ids = self.moe_inputs(h_XH)
        return self.moe_residual(h_XH, z, self.moe.experts(z, weights, ids, grouped=grouped)).view_as(h)


class MoETransformer(nn.Module):
    """The whole model; with `parts` (ModelParts, or one BlockParts per layer) only those slices
    of each block, and the embedding and head only where held (None otherwise), as a rank of a
    parallel plan holds them (such a model is driven by a parallel runtime, not by forward())."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None,
                 parts: "ModelParts | Sequence[BlockParts] | None" = None):
        super().__init__()
        self.cfg = cfg
        dtype = dtype or cfg.torch_dtype
        parts = ModelParts.of(parts) if parts is not None else ModelParts.everything(cfg)
        if len(parts) != cfg.num_layers:
            raise ValueError(f"parts: {len(parts)} entries for {cfg.num_layers} layers")
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype) \
            if parts.embedding else None
        self.layers = nn.ModuleList(Block(cfg, device, dtype, p, layer) for layer, p in enumerate(parts))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, device, dtype) if parts.head else None
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype) \
            if parts.head else None
        if cfg.tie_embeddings and self.embed is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed.weight

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        c = self.cfg
        return KVCache.allocate(c.num_layers, batch, CacheLayout.of(c, c.num_kv_heads), max_len or c.max_seq_len,
                                self.dtype, self.device)

    def forward(self, input_ids_BT: torch.Tensor, positions_BT: torch.Tensor | None = None,
                cache: KVCache | None = None, attend_len: int | None = None,
                logits_at_B: torch.Tensor | None = None, grouped: bool = True) -> torch.Tensor:
        """Logits [B, T, V]; or [B, V] at positions `logits_at_B` (index into T) when given."""
        b, t = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = torch.arange(t, device=input_ids_BT.device).expand(b, t)
        x = self.embed(input_ids_BT)
        # RoPE tables once per call, not once per layer (a decode step is launch-bound on small ops).
        rope = rope_tables(self.cfg, positions_BT, x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, positions_BT, cache, i, attend_len, grouped, rope)
        if logits_at_B is not None:
            x = x[torch.arange(b, device=x.device), logits_at_B]
        return self.lm_head(self.norm(x))


def _unit_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for one draw unit, from the model seed and the unit's name (a
    stable hash: the same on every process and machine)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _Draws:
    """normal(0, std) float32 values of named draw units, each from its own seeded generator on
    `device` (CPU and CUDA generators give different streams for one seed)."""

    def __init__(self, seed: int, std: float, device: torch.device):
        self.seed, self.std, self.device = seed, std, device
        self.gen = torch.Generator(device=device)

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        self.gen.manual_seed(_unit_seed(self.seed, name))
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32).mul_(self.std)


def _init_attention_(attn: Attention, prefix: str, draw: _Draws) -> None:
    """One unit per query head (its q rows, o columns) and per KV head (its k, v rows), named
    by the global head: a head slice draws exactly its own heads."""
    d, h = attn.cfg.head_dim, attn.cfg.hidden_size
    for local, head in enumerate(attn.heads):
        rows = slice(local * d, (local + 1) * d)
        attn.q_proj.weight[rows] = draw(f"{prefix}.q_proj.weight[{head}]", (d, h))
        attn.o_proj.weight[:, rows] = draw(f"{prefix}.o_proj.weight[{head}]", (h, d))
        if attn.q_proj.bias is not None:
            attn.q_proj.bias[rows] = draw(f"{prefix}.q_proj.bias[{head}]", (d,))
    for local, head in enumerate(attn.kv_heads):
        rows = slice(local * d, (local + 1) * d)
        for proj in ("k_proj", "v_proj"):
            linear = getattr(attn, proj)
            linear.weight[rows] = draw(f"{prefix}.{proj}.weight[{head}]", (d, h))
            if linear.bias is not None:
                linear.bias[rows] = draw(f"{prefix}.{proj}.bias[{head}]", (d,))
    for norm in (attn.q_norm, attn.k_norm):
        if norm is not None:
            norm.weight.fill_(1.0)


def _init_experts_(experts: Experts, prefix: str, draw: _Draws) -> None:
    """One unit per (matrix, expert), named by the global expert id. A hidden-column slice
    (tensor parallelism) draws its experts' whole matrices and keeps its columns: the extra
    is one expert matrix at a time."""
    i, h = experts.full_hidden, experts.cfg.hidden_size
    cols = slice(None) if experts.hidden_cols is None else slice(experts.hidden_cols.start, experts.hidden_cols.stop)
    for local, e in enumerate(experts.expert_ids):
        if experts.w_gate is not None:
            experts.w_gate[local] = draw(f"{prefix}.w_gate[{e}]", (i, h))[cols]
        experts.w_up[local] = draw(f"{prefix}.w_up[{e}]", (i, h))[cols]
        experts.w_down[local] = draw(f"{prefix}.w_down[{e}]", (h, i))[:, cols]


def _init_dense_mlp_(mlp: DenseMLP, prefix: str, draw: _Draws) -> None:
    """Each matrix one unit, drawn whole and cut to the held columns (the whole MLP draws the
    same values under the same names)."""
    h, i = mlp.gate_proj.in_features, mlp.full_hidden
    cols = slice(None) if mlp.cols is None else slice(mlp.cols.start, mlp.cols.stop)
    mlp.gate_proj.weight.copy_(draw(f"{prefix}.gate_proj.weight", (i, h))[cols])
    mlp.up_proj.weight.copy_(draw(f"{prefix}.up_proj.weight", (i, h))[cols])
    mlp.down_proj.weight.copy_(draw(f"{prefix}.down_proj.weight", (h, i))[:, cols])


@torch.no_grad()
def init_random_(model: MoETransformer, seed: int = 0, std: float = 0.02) -> MoETransformer:
    """Deterministic random weights (normal(0, std); norms at 1) drawn on the model's device.

    Every value depends only on the seed, the device type and where it sits in the whole model:
    weights are drawn in units (one query or KV head of an attention projection, one expert
    matrix, any other parameter whole), each from a generator seeded by (seed, unit name). So a
    model built with `parts` (a rank's slice) gets exactly the values of that slice of the whole
    model, drawing no more than its own units, and holding at most one unit beyond its weights.
    """
    draw = _Draws(seed, std, model.device)
    done: set[int] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, Attention):
            _init_attention_(module, prefix, draw)
        elif isinstance(module, Experts):
            _init_experts_(module, prefix, draw)
        elif isinstance(module, DenseMLP):
            _init_dense_mlp_(module, prefix, draw)
        elif hasattr(module, "init_units_"):  # mla.MLAttention: per-head units, like Attention's
            module.init_units_(prefix, draw)
        else:
            continue
        done.update(id(p) for p in module.parameters())
    for name, p in model.named_parameters():
        if id(p) in done:
            continue
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name == "lm_head.weight" and model.cfg.tie_embeddings:  # a head held without the embedding
            p.copy_(draw("embed.weight", tuple(p.shape)))
        else:
            p.copy_(draw(name, tuple(p.shape)))
    return model


def init_scratch_numel(cfg: ModelConfig, parts: "ModelParts | Sequence[BlockParts] | None" = None) -> int:
    """Elements of the largest float32 unit `init_random_` draws for a model built with `parts`
    (held beside the weights while it is copied in): a rank's start-up peak is its weights plus
    this many float32 values."""
    parts = ModelParts.of(parts) if parts is not None else ModelParts.everything(cfg)
    embed = cfg.vocab_size * cfg.hidden_size if parts.embedding or parts.head else 0
    shared = cfg.hidden_size * cfg.shared_expert_hidden
    held = [p for p in parts if p.active]
    expert = cfg.expert_hidden * cfg.hidden_size if any(p.experts for p in held) else 0
    with_attention = [i for i, p in enumerate(parts) if p.active and p.heads is not None]
    dense = cfg.dense_hidden * cfg.hidden_size if any(cfg.is_dense_layer(i) for i in with_attention) else 0
    return max(embed, shared, expert, dense, cfg.num_experts * cfg.hidden_size if held else 0,
               _attention_unit_numel(cfg) if with_attention else 0)


def _attention_unit_numel(cfg: ModelConfig) -> int:
    """The largest attention draw unit: one head's q (or k, v, o) rows; MLA: also its latent
    projections, drawn whole (mla.MLAttention.init_units_)."""
    h = cfg.hidden_size
    if not cfg.is_mla:
        return cfg.head_dim * h
    r, q_in = cfg.kv_lora_rank, cfg.q_lora_rank or h
    return max(cfg.q_lora_rank * h, (r + cfg.qk_rope_head_dim) * h, cfg.head_dim * q_in,
               (cfg.qk_nope_head_dim + cfg.v_head_dim) * r, h * cfg.v_head_dim)


def build_model(cfg: ModelConfig, seed: int = 0, device="cpu", dtype: torch.dtype | None = None,
                parts: "ModelParts | Sequence[BlockParts] | None" = None) -> MoETransformer:
    """A model with deterministic random weights (the embedded default for demos and tests).
    parts: what a rank holds (parallel/parts.py `rank_parts`): build only those slices, with the
    values the whole model has there (init_random_)."""
    return init_random_(MoETransformer(cfg, device=device, dtype=dtype, parts=parts), seed).eval()
