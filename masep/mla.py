"""Multi-head latent attention (MLA, DeepSeek-V2/V3) over a slice of query heads, and its cache.

Per token x [H]:
  queries   q = q_b(norm(q_a(x))) (or q_proj(x) without a q latent) -> per head [nope | rope]
  latent    [c | k_pe] = kv_a(x); c = norm(c) [kv_lora_rank]; k_pe [qk_rope_head_dim], roped,
            one for all heads
  cache     c and the roped k_pe, per token and layer: CacheLayout(1, kv_lora_rank, rope),
            i.e. (kv_lora_rank + qk_rope_head_dim) values instead of 2 x heads x head_dim
  keys      per head [kv_b(c)[nope part] | k_pe], values kv_b(c)[value part] [v_head_dim]
  output    o_proj over the heads' values; the slices' outputs sum to the whole (head parallel)

Head parallelism splits q_b (or q_proj) rows, kv_b rows and o_proj columns by head. The latent
projections kv_a / q_a and their norms serve every head: every head-parallel rank holds them
whole and computes them for all its tokens, and every rank of a replica keeps the same latent
cache (replicated, as the cost model counts it).

Decode reads the cached latents and projects them up to per-head keys and values every step:
kv_lora_rank * heads * (nope + v_head_dim) multiply-adds per cached key and layer (16.8 M for
DeepSeek-V3: 512 x 128 x 256) before the attention's own heads * (head_dim + v_head_dim), and
[S, heads, nope + rope + v] keys and values in memory. The absorbed form would fold kv_b's key
half into the query (q_nope -> a kv_lora_rank-wide query per head) and its value half into
o_proj, attending straight over the cached latents: per cached key heads * (2 kv_lora_rank +
rope) multiply-adds (0.14 M for DeepSeek-V3, ~120x fewer), reading the same (kv_lora_rank + rope)
values, plus heads * kv_lora_rank * (nope + v) per query token whatever the context. Prefill,
whose keys are its own tokens, gains little from it. perf/costmodel.py prices the form run here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .model import CacheLayout, KVCache, RMSNorm, apply_rope, rope_tables, through_cache, yarn_mscale

# transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(query-key width), times YaRN's mscale(factor, mscale_all_dim)^2 when set (DeepSeek's
    compensation for the cos/sin of a stretched context)."""
    scale = cfg.head_dim ** -0.5
    if cfg.rope_type == "yarn" and cfg.yarn_mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_factor, cfg.yarn_mscale_all_dim) ** 2
    return scale


def per_head_weights(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """The weights split by head: name -> (width per head, dim): dim 0 splits the rows of an
    (out, in) weight, dim 1 o_proj's columns. The other weights are whole on every head slice."""
    q = "q_b_proj.weight" if cfg.q_lora_rank else "q_proj.weight"
    return {q: (cfg.head_dim, 0), "kv_b_proj.weight": (cfg.qk_nope_head_dim + cfg.v_head_dim, 0),
            "o_proj.weight": (cfg.v_head_dim, 1)}


class MLAttention(nn.Module):
    """MLA over query heads `heads` (all by default; a contiguous slice for head parallelism).
    The same forward signature and partial-output contract as model.Attention."""

    def __init__(self, cfg: ModelConfig, heads: range | None = None, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.heads = heads if heads is not None else range(cfg.num_heads)
        self.kv_heads = self.heads  # every head has its own key and value (num_kv_heads == num_heads)
        n, h, r = len(self.heads), cfg.hidden_size, cfg.kv_lora_rank
        kw = dict(bias=False, device=device, dtype=dtype)
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, device, dtype)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, n * cfg.head_dim, **kw)
        else:
            self.q_proj = nn.Linear(h, n * cfg.head_dim, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(h, r + cfg.qk_rope_head_dim, **kw)
        self.kv_a_layernorm = RMSNorm(r, LATENT_NORM_EPS, device, dtype)
        self.kv_b_proj = nn.Linear(r, n * (cfg.qk_nope_head_dim + cfg.v_head_dim), **kw)
        self.o_proj = nn.Linear(n * cfg.v_head_dim, h, **kw)
        self.scale = softmax_scale(cfg)

    @property
    def cache_layout(self) -> CacheLayout:
        return CacheLayout.of(self.cfg, len(self.heads))

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x_BTH: torch.Tensor, positions_BT: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, attend_len: int | None = None, rope=None) -> torch.Tensor:
        """Partial attention output [B, T, H] of the local heads (through their o_proj columns).
        With a cache: writes the tokens' latents at their positions, then attends over the
        first `attend_len` positions (keys past a query's position are masked)."""
        c = self.cfg
        b, t, _ = x_BTH.shape
        n, nope, dr, dv = len(self.heads), c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        cos, sin = rope if rope is not None else rope_tables(c, positions_BT, x_BTH.dtype)
        q_BNTD = self._queries(x_BTH).view(b, t, n, c.head_dim).transpose(1, 2)
        q_nope, q_pe = q_BNTD.split([nope, dr], dim=-1)
        latent_BTR, k_pe_BTD = self.kv_a_proj_with_mqa(x_BTH).split([c.kv_lora_rank, dr], dim=-1)
        latent_B1TR = self.kv_a_layernorm(latent_BTR)[:, None]
        k_pe_B1TD = self._rope(k_pe_BTD[:, None], cos, sin)
        q_BNTD = torch.cat((q_nope, self._rope(q_pe, cos, sin)), dim=-1)
        latent_B1SR, k_pe_B1SD, key_pos_BS = through_cache(cache, layer, positions_BT, latent_B1TR, k_pe_B1TD,
                                                           attend_len)
        k_BNSD, v_BNSD = self._up_project(latent_B1SR, k_pe_B1SD, n)
        # An explicit mask, never is_causal: with a cache, is_causal aligns the mask top-left.
        mask = key_pos_BS[:, None, None, :] <= positions_BT[:, None, :, None]
        out = F.scaled_dot_product_attention(q_BNTD, k_BNSD, v_BNSD, attn_mask=mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, n * dv))

    def _queries(self, x_BTH: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTH)))
        return self.q_proj(x_BTH)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE over the roped dims; DeepSeek's interleaved pairs are first laid out as halves
        (evens, then odds): the same rotation, in the layout rotate-half RoPE reads. Queries and
        keys are both laid out so, so their products are those of the interleaved form."""
        if self.cfg.rope_interleave:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rope(x, cos, sin)

    def _up_project(self, latent_B1SR: torch.Tensor, k_pe_B1SD: torch.Tensor, n: int):
        """Per-head keys [B, N, S, nope + rope] and values [B, N, S, v] from cached latents."""
        c = self.cfg
        b, _, s, _ = latent_B1SR.shape
        kv = self.kv_b_proj(latent_B1SR[:, 0]).view(b, s, n, c.qk_nope_head_dim + c.v_head_dim).transpose(1, 2)
        k_nope, v_BNSD = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k_BNSD = torch.cat((k_nope, k_pe_B1SD.expand(b, n, s, c.qk_rope_head_dim)), dim=-1)
        return k_BNSD, v_BNSD

    # --- slices and random init ---------------------------------------------------------------
    def head_rows(self) -> dict[str, tuple[int, int]]:
        return per_head_weights(self.cfg)

    @torch.no_grad()
    def copy_heads_from_(self, full: "MLAttention") -> "MLAttention":
        """Fill this slice's weights from `full` (an attention over more heads, from head 0)."""
        per_head = self.head_rows()
        theirs = dict(full.named_parameters())
        for name, p in self.named_parameters():
            if name in per_head:
                width, dim = per_head[name]
                rows = slice((self.heads.start - full.heads.start) * width, (self.heads.stop - full.heads.start) * width)
                p.copy_(theirs[name][rows] if dim == 0 else theirs[name][:, rows])
            else:
                p.copy_(theirs[name])
        return self

    def init_units_(self, prefix: str, draw) -> None:
        """model.init_random_'s units: one per (head-split weight, global head), named by the
        head, so a head slice draws exactly its own heads; the latent projections whole; norms
        at 1."""
        per_head = self.head_rows()
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name not in per_head:
                p.copy_(draw(f"{prefix}.{name}", tuple(p.shape)))
            else:
                width, dim = per_head[name]
                for local, head in enumerate(self.heads):
                    rows = slice(local * width, (local + 1) * width)
                    shape = (width, p.shape[1]) if dim == 0 else (p.shape[0], width)
                    unit = draw(f"{prefix}.{name}[{head}]", shape)
                    if dim == 0:
                        p[rows] = unit
                    else:
                        p[:, rows] = unit
