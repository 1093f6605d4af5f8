"""Model configuration: the ModelConfig dataclass, named presets, and HF config.json parsing.

A config is validated once, when it is built; every error is a ValueError that names the
field, the value and the rule.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hf_deepseek
from .files import read_json

EXPERT_ACTIVATIONS = ("gelu", "swiglu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 8  # explicit: Qwen3 uses head_dim != hidden / heads
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 128
    # "gelu": 2 matrices per expert (up, down); "swiglu": 3 (gate, up, down), gate first.
    expert_act: str = "swiglu"
    # Softmax over all experts, then top-k; renormalise the k weights to sum to 1 (Mixtral: yes).
    norm_topk_prob: bool = True
    shared_expert_hidden: int = 0  # 0 = no shared expert (Qwen2-MoE has one, gated by a sigmoid)
    qkv_bias: bool = False  # Qwen2-MoE projects q, k, v with a bias
    qk_norm: bool = False  # Qwen3-MoE: RMSNorm over head_dim on q and k before RoPE
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    max_seq_len: int = 512
    tie_embeddings: bool = False
    dtype: str = "float32"
    eos_token_id: int | None = None
    # --- DeepSeek-V3-class models (every default below leaves the models above unchanged) ---
    # Multi-head latent attention (MLA) when kv_lora_rank > 0: each token caches one latent of
    # kv_lora_rank values (after its RMSNorm) plus one roped key of qk_rope_head_dim shared by all
    # heads; per-head keys [qk_nope | qk_rope] and values [v_head_dim] are projected up from it.
    # head_dim is then the query/key width, qk_nope_head_dim + qk_rope_head_dim.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # MLA: queries through a normed latent of this width (0: one q projection)
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotate interleaved pairs (x0, x1), (x2, x3).. instead of the two halves
    first_dense_layers: int = 0  # layers [0, this) have a dense SwiGLU MLP instead of experts
    dense_hidden: int = 0  # that MLP's hidden size (HF intermediate_size)
    shared_expert_gate: bool = True  # Qwen2-MoE scales its shared expert by a sigmoid gate; DeepSeek does not
    # "sigmoid" (DeepSeek-V3): sigmoid scores; a per-expert correction bias is added to them only to
    # choose the experts (the weights are the plain scores); grouped choice below.
    router_scoring: str = "softmax"
    expert_groups: int = 1  # experts in this many equal groups; a token picks among the best topk_groups
    topk_groups: int = 1  # groups (a group's score: the sum of its two best biased scores)
    routed_scaling_factor: float = 1.0  # routed experts' weights are multiplied by this
    # RoPE scaling: "default" or "yarn" (YaRN: frequencies blended between rope_factor-interpolated
    # and original by a ramp over [beta_slow, beta_fast] rotations in rope_original_max_len positions;
    # cos/sin scaled by the attention factor; MLA's softmax scale by mscale(rope_factor, yarn_mscale_all_dim)^2).
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_len: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 0.0  # 0: not given (HF's None)
    yarn_mscale_all_dim: float = 0.0
    # Where an HF config came from, kept for saving a config.json transformers can read back.
    hf_model_type: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "num_experts", "top_k", "expert_hidden", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads="
                f"{self.num_kv_heads}: grouped-query attention shares each KV head by a whole group")
        if self.top_k > self.num_experts:
            raise ValueError(f"ModelConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.expert_act not in EXPERT_ACTIVATIONS:
            raise ValueError(f"ModelConfig.expert_act={self.expert_act!r}: must be one of {EXPERT_ACTIVATIONS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype={self.dtype!r}: must be one of {sorted(DTYPES)}")
        if self.shared_expert_hidden < 0:
            raise ValueError(f"ModelConfig.shared_expert_hidden={self.shared_expert_hidden}: must be >= 0")
        _validate_mla(self)
        _validate_dense_layers(self)
        _validate_router(self)
        _validate_rope(self)

    # --- derived sizes, used by the cost model and the planner -------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def expert_matrices(self) -> int:
        return 3 if self.expert_act == "swiglu" else 2

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head: all of head_dim, or MLA's qk_rope_head_dim."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def attn_out_dim(self) -> int:
        """Per-head width of the attention output (what o_proj reads): MLA's v_head_dim, else head_dim."""
        return self.v_head_dim if self.is_mla else self.head_dim

    def is_dense_layer(self, layer: int) -> bool:
        return layer < self.first_dense_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    @property
    def elt_bytes(self) -> int:
        return torch.finfo(self.torch_dtype).bits // 8

    def attention_params_per_layer(self) -> int:
        """Projection weights of one layer's attention (all heads); MLA adds its two latent norms."""
        return self.attention_params(self.num_heads, self.num_kv_heads)

    def attention_params(self, heads: int, kv_heads: int) -> int:
        """What a rank holding `heads` query heads (and `kv_heads` KV heads) holds of one layer's
        attention: GQA's q/o rows of its heads and k/v rows of its KV heads; MLA's per-head q,
        kv_b rows and o_proj columns, plus the latent projections and their norms, which every
        head slice holds whole."""
        h, d = self.hidden_size, self.head_dim
        if not self.is_mla:
            return h * d * (2 * heads + 2 * kv_heads)
        r, rope, qr = self.kv_lora_rank, self.qk_rope_head_dim, self.q_lora_rank
        per_head = (qr or h) * d + r * (self.qk_nope_head_dim + self.v_head_dim) + self.v_head_dim * h
        whole = (h * qr + qr if qr else 0) + h * (r + rope) + r
        return heads * per_head + whole

    def expert_params(self) -> int:
        return self.expert_matrices * self.hidden_size * self.expert_hidden

    def shared_expert_params(self) -> int:
        """The always-on shared expert(s) of an MoE layer (SwiGLU, plus Qwen2-MoE's gate row)."""
        if not self.shared_expert_hidden:
            return 0
        return 3 * self.hidden_size * self.shared_expert_hidden + (self.hidden_size if self.shared_expert_gate else 0)

    def dense_mlp_params(self) -> int:
        """The SwiGLU MLP of one dense layer (0 when there are none)."""
        return 3 * self.hidden_size * self.dense_hidden if self.first_dense_layers else 0

    def router_params(self) -> int:
        return self.num_experts * self.hidden_size + (self.num_experts if self.router_scoring == "sigmoid" else 0)

    def total_params(self) -> int:
        """Every weight of the model (embedding, lm_head unless tied, norms, all layers)."""
        return self._params(self.num_experts)

    def active_params(self) -> int:
        """Weights one token uses: everything but the routed experts it does not pick."""
        return self._params(self.top_k)

    def _params(self, experts_per_layer: int) -> int:
        h = self.hidden_size
        embed = self.vocab_size * h * (1 if self.tie_embeddings else 2) + h
        per_layer = self.attention_params_per_layer() + 2 * h
        if self.qk_norm:  # RMSNorm weights over head_dim on q and k
            per_layer += 2 * self.head_dim
        if self.qkv_bias:
            per_layer += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        moe = self.router_params() + experts_per_layer * self.expert_params() + self.shared_expert_params()
        return (embed + self.num_layers * per_layer + self.first_dense_layers * self.dense_mlp_params()
                + self.num_moe_layers * moe)

    def training_refusal(self) -> str | None:
        """Why `masep train` / `plan --train` refuse this config (None: they take it). The
        training paths (parallel/training.py, train_separated.py) and their cost model know GQA
        attention and MoE layers with softmax routing only; the single-device model runs the rest."""
        missing = [what for what, on in (("multi-head latent attention", self.is_mla),
                                         ("dense layers", self.first_dense_layers > 0),
                                         ("sigmoid routing with a correction bias", self.router_scoring == "sigmoid"))
                   if on]
        if not missing:
            return None
        return (f"training {self.name} is not supported: {', '.join(missing)} (DeepSeek-V3-class) run for "
                "inference only; training needs a GQA model with softmax routing")

    def kv_bytes_per_token_per_layer(self) -> int:
        """Cache bytes one token adds to one layer (all heads): K and V of every KV head, or MLA's
        compressed latent plus its one roped key, which every head shares."""
        if self.is_mla:
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.elt_bytes
        return 2 * self.num_kv_heads * self.head_dim * self.elt_bytes

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _bad(cfg: ModelConfig, name: str, rule: str) -> ValueError:
    return ValueError(f"ModelConfig.{name}={getattr(cfg, name)!r}: {rule}")


def _validate_mla(c: ModelConfig) -> None:
    dims = ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")
    for name in dims:
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 0:
            raise _bad(c, name, "must be an integer >= 0")
    if not c.is_mla:
        for name in dims[:-1]:
            if getattr(c, name):
                raise _bad(c, name, "is a multi-head latent attention size: it needs kv_lora_rank > 0")
        return
    if c.qk_rope_head_dim < 2 or c.qk_rope_head_dim % 2:
        raise _bad(c, "qk_rope_head_dim", "MLA needs an even number >= 2 of roped dimensions")
    if c.v_head_dim < 1:
        raise _bad(c, "v_head_dim", "MLA needs a value width >= 1")
    if c.head_dim != c.qk_nope_head_dim + c.qk_rope_head_dim:
        raise _bad(c, "head_dim", f"with MLA it is the query/key width qk_nope_head_dim + qk_rope_head_dim = "
                                  f"{c.qk_nope_head_dim + c.qk_rope_head_dim}")
    if c.num_kv_heads != c.num_heads:
        raise _bad(c, "num_kv_heads", f"with MLA every head has its own key and value (projected from the "
                                      f"shared latent): must equal num_heads={c.num_heads}")
    for name in ("qkv_bias", "qk_norm"):
        if getattr(c, name):
            raise _bad(c, name, "is not part of multi-head latent attention")


def _validate_dense_layers(c: ModelConfig) -> None:
    if not isinstance(c.first_dense_layers, int) or not 0 <= c.first_dense_layers < c.num_layers:
        raise _bad(c, "first_dense_layers", f"must be in [0, num_layers={c.num_layers}): at least one layer "
                                            "must have experts")
    if c.first_dense_layers and (not isinstance(c.dense_hidden, int) or c.dense_hidden < 1):
        raise _bad(c, "dense_hidden", "dense layers need an MLP hidden size >= 1")
    if not c.first_dense_layers and c.dense_hidden:
        raise _bad(c, "dense_hidden", "is the dense layers' MLP size: it needs first_dense_layers > 0")
    if not c.shared_expert_gate and c.expert_act != "swiglu":
        raise _bad(c, "shared_expert_gate", "ungated shared experts are DeepSeek's: they need expert_act='swiglu'")


def _validate_router(c: ModelConfig) -> None:
    if c.router_scoring not in ("softmax", "sigmoid"):
        raise _bad(c, "router_scoring", "must be 'softmax' or 'sigmoid'")
    if not isinstance(c.expert_groups, int) or c.expert_groups < 1 or c.num_experts % c.expert_groups:
        raise _bad(c, "expert_groups", f"must be a positive divisor of num_experts={c.num_experts}")
    if not isinstance(c.topk_groups, int) or not 1 <= c.topk_groups <= c.expert_groups:
        raise _bad(c, "topk_groups", f"must be in [1, expert_groups={c.expert_groups}]")
    if c.router_scoring == "softmax" and c.expert_groups > 1:
        raise _bad(c, "expert_groups", "grouped expert choice is DeepSeek-V3's: it needs router_scoring='sigmoid'")
    per_group = c.num_experts // c.expert_groups
    if c.router_scoring == "sigmoid" and per_group < 2:
        raise _bad(c, "expert_groups", f"a group's score is the sum of its two best experts: groups of "
                                       f"{per_group} expert are too small")
    if c.top_k > c.topk_groups * per_group:
        raise _bad(c, "top_k", f"more than the {c.topk_groups * per_group} experts of the topk_groups="
                               f"{c.topk_groups} groups a token may choose from")
    if not c.routed_scaling_factor > 0:
        raise _bad(c, "routed_scaling_factor", "must be > 0")


def _validate_rope(c: ModelConfig) -> None:
    if c.rope_type not in ("default", "yarn"):
        raise _bad(c, "rope_type", "must be 'default' or 'yarn'")
    if c.rope_type == "default":
        if c.rope_factor != 1.0 or c.rope_original_max_len:
            raise _bad(c, "rope_factor" if c.rope_factor != 1.0 else "rope_original_max_len",
                       "RoPE scaling needs rope_type='yarn'")
        return
    if not c.rope_factor >= 1.0:
        raise _bad(c, "rope_factor", "YaRN stretches the context: must be >= 1")
    if not isinstance(c.rope_original_max_len, int) or c.rope_original_max_len < 1:
        raise _bad(c, "rope_original_max_len", "YaRN needs the pre-training context length (>= 1)")
    if c.yarn_beta_fast < c.yarn_beta_slow:
        raise _bad(c, "yarn_beta_fast", f"must be >= yarn_beta_slow={c.yarn_beta_slow}")


PRESETS: dict[str, ModelConfig] = {
    # A few hundred KB: for tests.
    "tiny": ModelConfig(name="tiny", vocab_size=256, hidden_size=64, num_layers=2, num_heads=8,
                        num_kv_heads=2, head_dim=8, num_experts=8, top_k=2, expert_hidden=96,
                        expert_act="swiglu", max_seq_len=256),
    # Tens of MB: the CPU demo.
    "small": ModelConfig(name="small", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=16,
                         num_kv_heads=4, head_dim=16, num_experts=16, top_k=2, expert_hidden=512,
                         expert_act="swiglu", max_seq_len=1024),
    # The MA Separation paper's model: 2-matrix GELU experts, bf16.
    "paper": ModelConfig(name="paper", vocab_size=32000, hidden_size=4096, num_layers=4, num_heads=32,
                         num_kv_heads=32, head_dim=128, num_experts=16, top_k=2, expert_hidden=16384,
                         expert_act="gelu", max_seq_len=2048, dtype="bfloat16"),
}
PRESETS["paper-swiglu"] = PRESETS["paper"].replace(name="paper-swiglu", expert_act="swiglu")
# DeepSeek-V3's own config.json (671 B parameters, 37 B active): for the planner and the cost
# model; its bf16 weights (1.3 TB) are never built on a CPU.
PRESETS["deepseek-v3"] = ModelConfig(
    name="deepseek-v3", vocab_size=129280, hidden_size=7168, num_layers=61, num_heads=128, num_kv_heads=128,
    head_dim=192, num_experts=256, top_k=8, expert_hidden=2048, expert_act="swiglu", norm_topk_prob=True,
    shared_expert_hidden=2048, shared_expert_gate=False, rope_theta=10000.0, max_seq_len=163840,
    dtype="bfloat16", eos_token_id=1, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True, first_dense_layers=3, dense_hidden=18432,
    router_scoring="sigmoid", expert_groups=8, topk_groups=4, routed_scaling_factor=2.5, rope_type="yarn",
    rope_factor=40.0, rope_original_max_len=4096, yarn_mscale=1.0, yarn_mscale_all_dim=1.0,
    hf_model_type="deepseek_v3")
# Its shape in a few hundred thousand parameters (tests, CPU demos): MLA with a q latent, one
# dense first layer, 16 experts in 4 groups (2 chosen), a shared expert, YaRN.
PRESETS["deepseek-tiny"] = ModelConfig(
    name="deepseek-tiny", vocab_size=256, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=4,
    head_dim=24, num_experts=16, top_k=4, expert_hidden=32, expert_act="swiglu", norm_topk_prob=True,
    shared_expert_hidden=32, shared_expert_gate=False, max_seq_len=256, kv_lora_rank=32, q_lora_rank=24,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True, first_dense_layers=1,
    dense_hidden=96, router_scoring="sigmoid", expert_groups=4, topk_groups=2, routed_scaling_factor=2.5,
    rope_type="yarn", rope_factor=4.0, rope_original_max_len=64, yarn_mscale=1.0, yarn_mscale_all_dim=1.0,
    hf_model_type="deepseek_v3")
# Large published models, for planning and simulation at scale (`masep plan`, benchmarks/plans_at_scale.py):
# the fields of their Hugging Face config.json; no weights are ever built from these presets.
# Qwen/Qwen3-235B-A22B: 94 layers, every one MoE (decoder_sparse_step 1, no mlp_only_layers), 128 experts top-8
# with renormalised weights, GQA 64 query / 4 KV heads of 128, RMSNorm on q and k.
PRESETS["qwen3-235b-a22b"] = ModelConfig(
    name="qwen3-235b-a22b", hf_model_type="qwen3_moe", vocab_size=151936, hidden_size=4096, num_layers=94,
    num_heads=64, num_kv_heads=4, head_dim=128, num_experts=128, top_k=8, expert_hidden=1536, expert_act="swiglu",
    norm_topk_prob=True, qk_norm=True, rope_theta=1e6, rms_eps=1e-6, max_seq_len=40960, dtype="bfloat16",
    eos_token_id=151645)
# mistralai/Mixtral-8x22B-v0.1: 56 layers, 8 experts top-2, GQA 48 query / 8 KV heads of 128, no sliding window.
PRESETS["mixtral-8x22b"] = ModelConfig(
    name="mixtral-8x22b", hf_model_type="mixtral", vocab_size=32000, hidden_size=6144, num_layers=56, num_heads=48,
    num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, expert_hidden=16384, expert_act="swiglu",
    norm_topk_prob=True, rope_theta=1e6, rms_eps=1e-5, max_seq_len=65536, dtype="bfloat16", eos_token_id=2)
PRESET_HELP = ("tiny: 0.35 M parameters (tests); small: 28 M (CPU demos); paper: 9.1 B, the MA Separation paper's "
               "model (GPUs); paper-swiglu: 13.4 B, the same with SwiGLU experts; deepseek-tiny: 0.31 M, "
               "DeepSeek-V3's shape (MLA, a dense first layer, grouped sigmoid routing; tests); deepseek-v3: 671 B, "
               "37.6 B active per token (the planner); qwen3-235b-a22b: 235 B (Qwen3-235B-A22B's shape, for "
               "plan/simulate); mixtral-8x22b: 141 B (Mixtral-8x22B's shape, for plan/simulate)")  # for --help


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# --- HF config.json ---------------------------------------------------------------------------
HF_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", hf_deepseek.MODEL_TYPE)


def _require(raw: dict, key: str, source: str):
    if key not in raw or raw[key] is None:
        raise ValueError(f"{source}: required field {key!r} is missing")
    return raw[key]


def _rope_theta(raw: dict, source: str, scaled_ok: bool = False) -> float:
    """rope_theta; a scaled RoPE (YaRN) is refused unless the model type reads it (`scaled_ok`)."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    if isinstance(rope, dict):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" and not scaled_ok:
            raise ValueError(f"{source}: rope_type={rope_type!r} is not supported (only 'default' RoPE)")
        if "rope_theta" in rope:
            return float(rope["rope_theta"])
    return float(_require(raw, "rope_theta", source))


def _check_all_layers_sparse(raw: dict, source: str) -> None:
    dense = raw.get("mlp_only_layers") or []
    step = raw.get("decoder_sparse_step", 1) or 1
    if dense or step != 1:
        raise ValueError(f"{source}: mlp_only_layers={dense}, decoder_sparse_step={step}: masep needs every "
                         "layer to be an MoE layer (dense MLP layers are not supported)")


def _check_no_sliding_window(raw: dict, source: str) -> None:
    window = raw.get("sliding_window")
    enabled = raw.get("use_sliding_window", window is not None)
    if enabled and window is not None and window < raw.get("max_position_embeddings", 0):
        raise ValueError(f"{source}: sliding_window={window} is not supported (full attention only)")


def _dtype_name(raw: dict) -> str:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    name = str(name).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: must be one of {sorted(DTYPES)}")
    return name


def from_hf_dict(raw: dict, source: str = "config.json", max_seq_len: int | None = None) -> ModelConfig:
    """Build a ModelConfig from the parsed HF config.json of a Mixtral, Qwen2-MoE, Qwen3-MoE or
    DeepSeek-V3 model."""
    model_type = raw.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported: use one of {HF_MODEL_TYPES}")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?") if isinstance(raw["quantization_config"], dict) \
            else "?"
        raise ValueError(f"{source}: quantization_config (quant_method={method!r}) is not supported: masep loads "
                         "float weights only; dequantize the checkpoint to bf16 first")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={raw['hidden_act']!r}: HF MoE experts must use 'silu' (SwiGLU)")
    _check_no_sliding_window(raw, source)
    hidden = int(_require(raw, "hidden_size", source))
    heads = int(_require(raw, "num_attention_heads", source))
    common = dict(
        name=raw.get("_name_or_path") or model_type, hf_model_type=model_type,
        vocab_size=int(_require(raw, "vocab_size", source)), hidden_size=hidden,
        num_layers=int(_require(raw, "num_hidden_layers", source)), num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        top_k=int(_require(raw, "num_experts_per_tok", source)),
        rope_theta=_rope_theta(raw, source, scaled_ok=model_type == hf_deepseek.MODEL_TYPE),
        rms_eps=float(_require(raw, "rms_norm_eps", source)),
        max_seq_len=int(max_seq_len or _require(raw, "max_position_embeddings", source)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)), dtype=_dtype_name(raw),
        expert_act="swiglu", eos_token_id=_first_eos(raw.get("eos_token_id")),
    )
    if model_type == hf_deepseek.MODEL_TYPE:
        return ModelConfig(**{**common, **hf_deepseek.fields_from_hf(raw, source)})
    if model_type == "mixtral":
        return ModelConfig(**common, num_experts=int(_require(raw, "num_local_experts", source)),
                           expert_hidden=int(_require(raw, "intermediate_size", source)), norm_topk_prob=True)
    _check_all_layers_sparse(raw, source)
    # transformers >= 5 writes qwen3_moe's expert count as `num_local_experts` (attribute_map).
    num_experts = raw.get("num_experts") or _require(raw, "num_local_experts" if "num_local_experts" in raw
                                                     else "num_experts", source)
    extra = dict(num_experts=int(num_experts),
                 expert_hidden=int(_require(raw, "moe_intermediate_size", source)),
                 norm_topk_prob=bool(raw.get("norm_topk_prob", False)))
    if model_type == "qwen2_moe":
        return ModelConfig(**common, **extra, qkv_bias=bool(raw.get("qkv_bias", True)),
                           shared_expert_hidden=int(raw.get("shared_expert_intermediate_size") or 0))
    if raw.get("attention_bias", False):
        raise ValueError(f"{source}: attention_bias=True is not supported for qwen3_moe")
    return ModelConfig(**common, **extra, qk_norm=True)


def _first_eos(value) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def from_hf_config(path: str | Path, max_seq_len: int | None = None) -> ModelConfig:
    """Read `config.json` from a model directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ValueError(f"{file}: no config.json found")
    raw = read_json(file, "config")
    return from_hf_dict(raw, source=str(file), max_seq_len=max_seq_len)


def to_hf_dict(cfg: ModelConfig) -> dict:
    """A config.json that transformers reads back (Mixtral unless the config came from Qwen or
    DeepSeek, or has multi-head latent attention)."""
    model_type = cfg.hf_model_type or (hf_deepseek.MODEL_TYPE if cfg.is_mla
                                       else "qwen2_moe" if cfg.shared_expert_hidden or cfg.qkv_bias
                                       else "qwen3_moe" if cfg.qk_norm or not cfg.norm_topk_prob
                                       else "mixtral")
    if model_type != hf_deepseek.MODEL_TYPE and _deepseek_features(cfg):
        raise ValueError(f"model_type={model_type!r} cannot express {_deepseek_features(cfg)}: "
                         f"only {hf_deepseek.MODEL_TYPE} has them")
    if cfg.expert_act != "swiglu":
        raise ValueError(f"expert_act={cfg.expert_act!r}: HF MoE checkpoints need SwiGLU experts "
                         "(saving 2-matrix GELU experts has no HF equivalent)")
    out = dict(model_type=model_type, architectures=[_ARCH[model_type]], vocab_size=cfg.vocab_size,
               hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_experts_per_tok=cfg.top_k,
               rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps, max_position_embeddings=cfg.max_seq_len,
               tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.dtype, hidden_act="silu",
               rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    if cfg.eos_token_id is not None:
        out["eos_token_id"] = cfg.eos_token_id
    if model_type == hf_deepseek.MODEL_TYPE:
        return {**out, **hf_deepseek.fields_to_hf(cfg)}
    if model_type == "mixtral":
        out.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.expert_hidden, sliding_window=None)
    else:
        out.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_hidden,
                   norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
                   intermediate_size=cfg.expert_hidden)
    if model_type == "qwen2_moe":
        out.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=cfg.shared_expert_hidden,
                   use_sliding_window=False)
    if model_type == "qwen3_moe":
        out.update(attention_bias=False, use_sliding_window=False)
    return out


def _deepseek_features(cfg: ModelConfig) -> str:
    """The DeepSeek-V3-class settings of `cfg` that no other HF model type has ('' for none)."""
    default = ModelConfig()
    names = ("kv_lora_rank", "first_dense_layers", "router_scoring", "expert_groups", "routed_scaling_factor",
             "rope_type", "rope_interleave")
    changed = [f"{n}={getattr(cfg, n)!r}" for n in names if getattr(cfg, n) != getattr(default, n)]
    if cfg.shared_expert_hidden and not cfg.shared_expert_gate:
        changed.append("shared_expert_gate=False")
    return ", ".join(changed)


_ARCH = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
         hf_deepseek.MODEL_TYPE: hf_deepseek.ARCHITECTURE}
