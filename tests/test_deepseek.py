"""DeepSeek-V3-class models: config, multi-head latent attention and its compressed cache,
dense first layers, grouped sigmoid routing, YaRN, HF checkpoints, and the cost model's numbers.

Parity with transformers is in test_deepseek_parity.py; every parallel strategy in
test_deepseek_dist.py.
"""
from __future__ import annotations

import pytest

from masep.config import ModelConfig, from_hf_dict, preset, to_hf_dict

TINY = preset("deepseek-tiny")


def deepseek_raw(**changes) -> dict:
    """A deepseek_v3 config.json as transformers 5.24 writes it (head_dim is its RoPE width)."""
    raw = dict(model_type="deepseek_v3", vocab_size=128, hidden_size=64, intermediate_size=96,
               moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
               n_shared_experts=1, n_routed_experts=16, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
               v_head_dim=16, qk_nope_head_dim=16, head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=4,
               first_k_dense_replace=1, max_position_embeddings=256, rms_norm_eps=1e-6, hidden_act="silu",
               routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True, attention_bias=False,
               num_nextn_predict_layers=1, dtype="float32", tie_word_embeddings=False, eos_token_id=None,
               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32,
                                "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                "original_max_position_embeddings": 64})
    return {k: v for k, v in {**raw, **changes}.items() if v is not ...}


# --- config --------------------------------------------------------------------------------------
def test_hf_config_maps_every_deepseek_field():
    cfg = from_hf_dict(deepseek_raw())
    assert cfg.is_mla and cfg.hf_model_type == "deepseek_v3"
    assert (cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == \
        (32, 0, 16, 8, 16)
    assert cfg.head_dim == 24 and cfg.num_kv_heads == 4  # head_dim: the q/k width, not HF's RoPE width 8
    assert (cfg.first_dense_layers, cfg.dense_hidden, cfg.expert_hidden, cfg.shared_expert_hidden) == (1, 96, 32, 32)
    assert not cfg.shared_expert_gate and cfg.router_scoring == "sigmoid"
    assert (cfg.expert_groups, cfg.topk_groups, cfg.routed_scaling_factor) == (4, 2, 2.5)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_len, cfg.yarn_mscale_all_dim) == ("yarn", 4.0, 64, 1.0)
    assert cfg.rope_interleave and cfg.rope_dim == 8 and cfg.attn_out_dim == 16
    # two shared experts are one of twice the width; a q latent; DeepSeek's own rope_scaling key
    two = from_hf_dict(deepseek_raw(n_shared_experts=2, q_lora_rank=24, rope_parameters=...,
                                    rope_theta=50000.0, rope_scaling={"type": "yarn", "factor": 2,
                                                                      "original_max_position_embeddings": 128}))
    assert (two.shared_expert_hidden, two.q_lora_rank, two.rope_theta, two.rope_factor) == (64, 24, 50000.0, 2.0)
    assert (two.yarn_mscale, two.yarn_mscale_all_dim) == (0.0, 0.0)  # absent: not 1


@pytest.mark.parametrize("name", ["deepseek-tiny", "deepseek-v3"])
def test_to_hf_dict_round_trip(name):
    cfg = preset(name)
    raw = to_hf_dict(cfg)
    assert raw["model_type"] == "deepseek_v3" and raw["head_dim"] == cfg.qk_rope_head_dim
    assert raw["num_nextn_predict_layers"] == 0  # masep never writes multi-token-prediction modules
    assert from_hf_dict(raw).replace(name=name) == cfg
    plain = cfg.replace(q_lora_rank=0, rope_type="default", rope_factor=1.0, rope_original_max_len=0,
                        yarn_mscale=0.0, yarn_mscale_all_dim=0.0, first_dense_layers=0, dense_hidden=0)
    assert from_hf_dict(to_hf_dict(plain)).replace(name=name) == plain


@pytest.mark.parametrize("raw, message", [
    (deepseek_raw(scoring_func="softmax"), r"scoring_func='softmax' is not supported"),
    (deepseek_raw(topk_method="greedy"), r"topk_method='greedy' is not supported"),
    (deepseek_raw(attention_bias=True), r"attention_bias=True is not supported"),
    (deepseek_raw(num_key_value_heads=2), r"num_key_value_heads=2 must equal num_attention_heads=4"),
    (deepseek_raw(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     r"rope_type='linear' is not supported for deepseek_v3"),
    (deepseek_raw(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
                                   "original_max_position_embeddings": 64, "attention_factor": 0.5}),
     r"rope attention_factor=0.5 is not supported"),
    (deepseek_raw(quantization_config={"quant_method": "fp8"}), r"quant_method='fp8'.*dequantize"),
    (deepseek_raw(n_group=3), r"expert_groups=3: must be a positive divisor of num_experts=16"),
    (deepseek_raw(first_k_dense_replace=3), r"first_dense_layers=3: must be in \[0, num_layers=3\)"),
])
def test_hf_config_refusals(raw, message):
    with pytest.raises(ValueError, match=message):
        from_hf_dict(raw)


@pytest.mark.parametrize("changes, message", [
    (dict(kv_lora_rank=0), r"q_lora_rank=24: is a multi-head latent attention size: it needs kv_lora_rank > 0"),
    (dict(qk_rope_head_dim=7, head_dim=23), r"qk_rope_head_dim=7: MLA needs an even number"),
    (dict(head_dim=32), r"head_dim=32: with MLA it is the query/key width .* = 24"),
    (dict(num_kv_heads=2), r"num_kv_heads=2: with MLA every head"),
    (dict(v_head_dim=0), r"v_head_dim=0: MLA needs a value width"),
    (dict(dense_hidden=0), r"dense_hidden=0: dense layers need an MLP hidden size"),
    (dict(router_scoring="relu"), r"router_scoring='relu': must be 'softmax' or 'sigmoid'"),
    (dict(topk_groups=5), r"topk_groups=5: must be in \[1, expert_groups=4\]"),
    (dict(expert_groups=16, topk_groups=2), r"expert_groups=16: a group's score is the sum of its two best"),
    (dict(top_k=9), r"top_k=9: more than the 8 experts of the topk_groups=2 groups"),
    (dict(routed_scaling_factor=0.0), r"routed_scaling_factor=0.0: must be > 0"),
    (dict(rope_type="ntk"), r"rope_type='ntk': must be 'default' or 'yarn'"),
    (dict(rope_original_max_len=0), r"rope_original_max_len=0: YaRN needs the pre-training context length"),
    (dict(rope_factor=0.5), r"rope_factor=0.5: YaRN stretches the context"),
])
def test_config_validation_names_field_value_and_rule(changes, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**changes)


def test_defaults_leave_other_models_alone():
    with pytest.raises(ValueError, match=r"expert_groups=2: grouped expert choice is DeepSeek-V3's"):
        ModelConfig(expert_groups=2)
    with pytest.raises(ValueError, match=r"model_type='mixtral' cannot express first_dense_layers=1"):
        to_hf_dict(preset("tiny").replace(first_dense_layers=1, dense_hidden=32))
    tiny = preset("tiny")
    assert not tiny.is_mla and tiny.rope_dim == tiny.head_dim and tiny.num_moe_layers == tiny.num_layers
    assert tiny.kv_bytes_per_token_per_layer() == 2 * tiny.num_kv_heads * tiny.head_dim * 4


def test_deepseek_v3_sizes_by_hand():
    """The real model's published sizes: 671 B parameters, 37 B active per token; the MLA cache
    is (kv_lora_rank + qk_rope_head_dim) values per token per layer, whatever the head count."""
    v3 = preset("deepseek-v3")
    h, n = 7168, 128
    attn = (h * 1536 + 1536 + 1536 * n * 192) + (h * 576 + 512 + 512 * n * 256) + n * 128 * h
    assert v3.attention_params_per_layer() == attn == 187_107_328
    assert v3.kv_bytes_per_token_per_layer() == (512 + 64) * 2  # bf16; GQA with 128 KV heads of 192: 98 KiB
    assert v3.dense_mlp_params() == 3 * h * 18432 and v3.shared_expert_params() == 3 * h * 2048
    assert 670e9 < v3.total_params() < 672e9
    assert 36.5e9 < v3.active_params() < 38e9
