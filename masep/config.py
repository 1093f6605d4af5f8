"""Model configuration: the ModelConfig dataclass, named presets, and HF config.json parsing.

A config is validated once, when it is built; every error is a ValueError that names the
field, the value and the rule.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

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

    def attention_params_per_layer(self) -> int:
        h, d = self.hidden_size, self.head_dim
        return h * d * (2 * self.num_heads + 2 * self.num_kv_heads)

    def expert_params(self) -> int:
        return self.expert_matrices * self.hidden_size * self.expert_hidden

    def num_params(self) -> int:
        """Parameters of the whole model (embeddings, lm_head unless tied, norms, router, experts)."""
        h = self.hidden_size
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        biases = self.head_dim * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
        shared = (3 * h * self.shared_expert_hidden + h) if self.shared_expert_hidden else 0
        layer = (self.attention_params_per_layer() + biases + norms + self.num_experts * h
                 + self.num_experts * self.expert_params() + shared)
        vocab = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + vocab + h

    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * torch.finfo(self.torch_dtype).bits // 8

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


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
               "model (GPUs); paper-swiglu: 13.4 B, the same with SwiGLU experts; qwen3-235b-a22b: 235 B "
               "(Qwen3-235B-A22B's shape, for plan/simulate); mixtral-8x22b: 141 B (Mixtral-8x22B's shape, for "
               "plan/simulate)")  # for --help


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# --- HF config.json ---------------------------------------------------------------------------
HF_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


def _require(raw: dict, key: str, source: str):
    if key not in raw or raw[key] is None:
        raise ValueError(f"{source}: required field {key!r} is missing")
    return raw[key]


def _rope_theta(raw: dict, source: str) -> float:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    if isinstance(rope, dict):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
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
    """Build a ModelConfig from the parsed HF config.json of a Mixtral, Qwen2-MoE or Qwen3-MoE model."""
    model_type = raw.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported: use one of {HF_MODEL_TYPES}")
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
        rope_theta=_rope_theta(raw, source), rms_eps=float(_require(raw, "rms_norm_eps", source)),
        max_seq_len=int(max_seq_len or _require(raw, "max_position_embeddings", source)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)), dtype=_dtype_name(raw),
        expert_act="swiglu", eos_token_id=_first_eos(raw.get("eos_token_id")),
    )
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
    """A config.json that transformers reads back (Mixtral unless the config came from Qwen)."""
    model_type = cfg.hf_model_type or ("qwen2_moe" if cfg.shared_expert_hidden or cfg.qkv_bias
                                       else "qwen3_moe" if cfg.qk_norm or not cfg.norm_topk_prob
                                       else "mixtral")
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


_ARCH = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
