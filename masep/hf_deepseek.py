"""HF `deepseek_v3` config.json fields <-> ModelConfig fields (config.py calls these).

Missing keys take transformers' DeepseekV3Config defaults (transformers itself writes every
key; hand-written configs such as DeepSeek's own may leave some out). Values masep cannot
run are refused with the key, the value and why:
  - routing other than sigmoid scores with the correction bias (`scoring_func`, `topk_method`)
  - attention_bias (no released DeepSeek-V3-class model has one; a head-parallel o_proj bias
    would need to be added once per replica)
  - MoE layers other than every layer after the dense ones (`moe_layer_freq`)
  - RoPE other than default or YaRN, or YaRN's rarely used `attention_factor` / `truncate=False`
  - quantized checkpoints (config.py refuses `quantization_config` for every model type)
Multi-token-prediction modules (`num_nextn_predict_layers`) are not part of the config here:
checkpoint.py skips their tensors with a log line (they only serve speculative decoding).
"""
from __future__ import annotations

MODEL_TYPE = "deepseek_v3"
ARCHITECTURE = "DeepseekV3ForCausalLM"
# transformers 5.24 DeepseekV3Config defaults for keys a config.json may leave out.
DEFAULTS = dict(n_group=8, topk_group=4, first_k_dense_replace=3, rope_interleave=True, n_shared_experts=1,
                routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512,
                qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=256,
                moe_intermediate_size=2048, intermediate_size=18432)


def _get(raw: dict, key: str):
    """The key's value; its DeepseekV3Config default when absent (a null stays None)."""
    return raw[key] if key in raw else DEFAULTS[key]


def _refuse_unless(raw: dict, key: str, allowed: tuple, source: str, why: str) -> None:
    if key in raw and raw[key] not in allowed:
        raise ValueError(f"{source}: {key}={raw[key]!r} is not supported ({why})")


def rope_fields(raw: dict, source: str) -> dict:
    """ModelConfig RoPE-scaling fields from `rope_parameters` (transformers 5) or `rope_scaling`
    (DeepSeek's own config.json, which keeps rope_theta beside it)."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind != "yarn":
        raise ValueError(f"{source}: rope_type={kind!r} is not supported for {MODEL_TYPE} (default or yarn)")
    for key, ok in (("attention_factor", (None,)), ("truncate", (None, True)), ("partial_rotary_factor", (None, 1, 1.0))):
        if rope.get(key) not in ok:
            raise ValueError(f"{source}: rope {key}={rope[key]!r} is not supported (YaRN with the factor, the "
                             "original length, beta_fast/slow and mscale/mscale_all_dim only)")
    original = rope.get("original_max_position_embeddings")
    if not original:
        raise ValueError(f"{source}: YaRN rope needs original_max_position_embeddings")
    factor = rope.get("factor") or raw["max_position_embeddings"] / original
    return dict(rope_type="yarn", rope_factor=float(factor), rope_original_max_len=int(original),
                yarn_beta_fast=float(rope.get("beta_fast") or 32), yarn_beta_slow=float(rope.get("beta_slow") or 1),
                yarn_mscale=float(rope.get("mscale") or 0.0), yarn_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0))


def fields_from_hf(raw: dict, source: str) -> dict:
    """The ModelConfig fields a deepseek_v3 config.json sets beyond the ones every model type has
    (config.from_hf_dict builds those). head_dim there is transformers' RoPE width: ignored."""
    _refuse_unless(raw, "scoring_func", ("sigmoid",), source, "DeepSeek-V3 routing is sigmoid scores")
    _refuse_unless(raw, "topk_method", ("noaux_tc",), source, "DeepSeek-V3 chooses experts by grouped top-k "
                                                             "with the correction bias ('noaux_tc')")
    _refuse_unless(raw, "moe_layer_freq", (1,), source, "every layer after the dense ones must be an MoE layer")
    _refuse_unless(raw, "attention_bias", (False,), source, "MLA without projection biases only")
    heads = int(raw["num_attention_heads"])
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if kv_heads != heads:
        raise ValueError(f"{source}: num_key_value_heads={kv_heads} must equal num_attention_heads={heads} "
                         "(MLA projects a key and a value for every head)")
    nope, rope = int(_get(raw, "qk_nope_head_dim")), int(_get(raw, "qk_rope_head_dim"))
    expert_hidden = int(_get(raw, "moe_intermediate_size"))
    dense = int(_get(raw, "first_k_dense_replace") or 0)
    return dict(
        num_kv_heads=heads, head_dim=nope + rope, num_experts=int(_get(raw, "n_routed_experts")),
        expert_hidden=expert_hidden, norm_topk_prob=bool(_get(raw, "norm_topk_prob")),
        kv_lora_rank=int(_get(raw, "kv_lora_rank")), q_lora_rank=int(_get(raw, "q_lora_rank") or 0),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=int(_get(raw, "v_head_dim")),
        rope_interleave=bool(_get(raw, "rope_interleave")), first_dense_layers=dense,
        dense_hidden=int(_get(raw, "intermediate_size")) if dense else 0,
        shared_expert_hidden=expert_hidden * int(_get(raw, "n_shared_experts") or 0), shared_expert_gate=False,
        router_scoring="sigmoid", expert_groups=int(_get(raw, "n_group") or 1),
        topk_groups=int(_get(raw, "topk_group") or 1),
        routed_scaling_factor=float(_get(raw, "routed_scaling_factor")), **rope_fields(raw, source))


def cannot_save_as_deepseek(cfg) -> str | None:
    """Why `cfg` has no deepseek_v3 config.json (None when it has one)."""
    if not cfg.is_mla:
        return "deepseek_v3 attention is multi-head latent attention (kv_lora_rank > 0)"
    if cfg.router_scoring != "sigmoid" or cfg.shared_expert_gate and cfg.shared_expert_hidden:
        return "deepseek_v3 routes by sigmoid scores and has ungated shared experts"
    if cfg.expert_act != "swiglu" or cfg.shared_expert_hidden % cfg.expert_hidden:
        return (f"deepseek_v3 needs SwiGLU experts and shared experts of whole experts' width "
                f"(shared_expert_hidden={cfg.shared_expert_hidden}, expert_hidden={cfg.expert_hidden})")
    return None


def fields_to_hf(cfg) -> dict:
    """The deepseek_v3 keys of a config.json for `cfg` (config.to_hf_dict adds the common ones)."""
    why = cannot_save_as_deepseek(cfg)
    if why:
        raise ValueError(f"model_type={MODEL_TYPE!r} cannot express this config: {why}")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.rope_original_max_len, "beta_fast": cfg.yarn_beta_fast,
                "beta_slow": cfg.yarn_beta_slow}
        rope.update({k: v for k, v in (("mscale", cfg.yarn_mscale), ("mscale_all_dim", cfg.yarn_mscale_all_dim)) if v})
    return dict(
        head_dim=cfg.qk_rope_head_dim, n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_hidden,
        intermediate_size=cfg.dense_hidden or cfg.expert_hidden, first_k_dense_replace=cfg.first_dense_layers,
        n_shared_experts=cfg.shared_expert_hidden // cfg.expert_hidden, norm_topk_prob=cfg.norm_topk_prob,
        kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank or None, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave,
        n_group=cfg.expert_groups, topk_group=cfg.topk_groups, routed_scaling_factor=cfg.routed_scaling_factor,
        attention_bias=False, num_nextn_predict_layers=0, rope_parameters=rope)
