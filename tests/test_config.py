"""ModelConfig presets, validation, and HF config.json parsing (no transformers needed)."""
from __future__ import annotations

import json

import pytest
import torch

from masep.config import ModelConfig, from_hf_config, from_hf_dict, preset, to_hf_dict
from masep.model import MoETransformer


def mixtral_raw(**changes) -> dict:
    """The fields a Mixtral config.json has (as transformers 5.24 writes them), with changes."""
    raw = dict(model_type="mixtral", vocab_size=128, hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=None, num_local_experts=8,
               num_experts_per_tok=2, intermediate_size=32, rms_norm_eps=1e-5, max_position_embeddings=64,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6}, hidden_act="silu",
               sliding_window=None, dtype="float32", eos_token_id=2, tie_word_embeddings=False)
    return {k: v for k, v in {**raw, **changes}.items() if v is not ...}


def qwen_raw(model_type="qwen3_moe", **changes) -> dict:
    qwen = dict(model_type=model_type, num_local_experts=..., intermediate_size=48, num_experts=8,
                moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                use_sliding_window=False, sliding_window=4096, head_dim=24)
    return mixtral_raw(**{**qwen, **changes})


# --- presets ---------------------------------------------------------------------------------
def test_paper_presets_match_the_seeds():
    paper = preset("paper")
    assert (paper.num_layers, paper.hidden_size, paper.num_heads, paper.head_dim) == (4, 4096, 32, 128)
    assert (paper.num_experts, paper.expert_hidden, paper.top_k, paper.max_seq_len) == (16, 16384, 2, 2048)
    assert paper.expert_act == "gelu" and paper.expert_matrices == 2 and paper.torch_dtype == torch.bfloat16
    assert paper.expert_params() == 2 * 4096 * 16384
    assert paper.attention_params_per_layer() == 4 * 4096 * 4096  # MHA: q, k, v, o all 4096 x 4096
    assert paper.kv_bytes_per_token_per_layer() == 2 * 4096 * 2
    swiglu = preset("paper-swiglu")
    assert swiglu.expert_matrices == 3 and swiglu.expert_params() == 3 * 4096 * 16384
    assert swiglu.replace(name="paper", expert_act="gelu") == paper


def test_tiny_is_small():
    model = MoETransformer(preset("tiny"), device="meta")
    params = sum(p.numel() for p in model.parameters())
    assert 100_000 < params < 1_000_000  # a few hundred thousand: fast enough for every CPU test


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'huge': choose one of \["):
        preset("huge")


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=6, num_kv_heads=4), r"num_heads=6 is not a multiple of num_kv_heads=4"),
    (dict(top_k=9), r"top_k=9 exceeds num_experts=8"),
    (dict(expert_act="relu"), r"expert_act='relu'"),
    (dict(dtype="float64"), r"dtype='float64'"),
    (dict(hidden_size=0), r"hidden_size=0: must be a positive integer"),
    (dict(shared_expert_hidden=-1), r"shared_expert_hidden=-1"),
])
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


# --- HF config.json --------------------------------------------------------------------------
def test_mixtral_config():
    cfg = from_hf_dict(mixtral_raw())
    assert cfg.hf_model_type == "mixtral" and cfg.head_dim == 16  # head_dim null -> hidden / heads
    assert (cfg.num_experts, cfg.expert_hidden, cfg.top_k, cfg.norm_topk_prob) == (8, 32, 2, True)
    assert (cfg.rope_theta, cfg.rms_eps, cfg.eos_token_id, cfg.dtype) == (1e6, 1e-5, 2, "float32")


def test_qwen_configs():
    q3 = from_hf_dict(qwen_raw())
    assert q3.qk_norm and not q3.qkv_bias and q3.head_dim == 24 and q3.expert_hidden == 32
    # transformers 5 writes qwen3_moe's expert count as num_local_experts.
    assert from_hf_dict(qwen_raw(num_experts=..., num_local_experts=6)).num_experts == 6
    assert not from_hf_dict(qwen_raw(norm_topk_prob=False)).norm_topk_prob
    q2 = from_hf_dict(qwen_raw("qwen2_moe", shared_expert_intermediate_size=48, eos_token_id=[7, 9]))
    assert q2.qkv_bias and q2.shared_expert_hidden == 48 and not q2.qk_norm and q2.eos_token_id == 7


@pytest.mark.parametrize("fields, dtype", [
    (dict(dtype="bfloat16"), "bfloat16"),
    (dict(dtype=..., torch_dtype="float16"), "float16"),  # transformers 4 wrote torch_dtype
    (dict(dtype="bfloat16", torch_dtype="float16"), "bfloat16"),  # dtype (transformers 5) wins
    (dict(dtype=...), "float32"),
])
def test_dtype_field(fields, dtype):
    assert from_hf_dict(mixtral_raw(**fields)).dtype == dtype


@pytest.mark.parametrize("fields, theta", [
    (dict(), 1e6),
    (dict(rope_parameters=..., rope_theta=5e5), 5e5),
    (dict(rope_parameters={"rope_type": "default"}, rope_theta=5e5), 5e5),
    (dict(rope_parameters=..., rope_scaling=None, rope_theta=123.0), 123.0),
])
def test_rope_theta(fields, theta):
    assert from_hf_dict(mixtral_raw(**fields)).rope_theta == theta


@pytest.mark.parametrize("raw, message", [
    (mixtral_raw(model_type="llama"), r"model_type='llama' is not supported"),
    (mixtral_raw(model_type=...), r"model_type=None is not supported"),
    (mixtral_raw(hidden_size=...), r"required field 'hidden_size' is missing"),
    (mixtral_raw(num_local_experts=...), r"required field 'num_local_experts' is missing"),
    (qwen_raw(moe_intermediate_size=...), r"required field 'moe_intermediate_size' is missing"),
    (qwen_raw(num_experts=...), r"required field 'num_experts' is missing"),
    (mixtral_raw(rope_parameters=...), r"required field 'rope_theta' is missing"),
    (mixtral_raw(rope_parameters={"rope_type": "yarn", "factor": 4.0}), r"rope_type='yarn' is not supported"),
    (mixtral_raw(hidden_act="gelu"), r"hidden_act='gelu'"),
    (mixtral_raw(sliding_window=16), r"sliding_window=16 is not supported"),
    (qwen_raw(mlp_only_layers=[0]), r"mlp_only_layers=\[0\].*dense MLP layers are not supported"),
    (qwen_raw(decoder_sparse_step=2), r"decoder_sparse_step=2"),
    (qwen_raw(attention_bias=True), r"attention_bias=True is not supported"),
    (mixtral_raw(dtype="int8"), r"dtype='int8'"),
])
def test_hf_config_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        from_hf_dict(raw)


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json found"):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(mixtral_raw()))
    assert from_hf_config(tmp_path, max_seq_len=32).max_seq_len == 32


@pytest.mark.parametrize("changes, model_type", [
    (dict(), "mixtral"),
    (dict(qkv_bias=True, shared_expert_hidden=48, norm_topk_prob=False), "qwen2_moe"),
    (dict(qk_norm=True, head_dim=12), "qwen3_moe"),
])
def test_to_hf_dict_round_trip(changes, model_type):
    cfg = preset("tiny").replace(eos_token_id=3, **changes)
    raw = to_hf_dict(cfg)
    assert raw["model_type"] == model_type
    assert from_hf_dict(raw).replace(name="tiny") == cfg


def test_preset_help_states_the_parameter_counts():
    from masep.config import PRESET_HELP
    from masep.model import build_model
    for name, shown in (("tiny", "0.35 M"), ("small", "28 M")):
        count = sum(p.numel() for p in build_model(preset(name)).parameters())
        assert f"{name}: {shown}" in PRESET_HELP and f"{count / 1e6:.{2 if name == 'tiny' else 0}f} M" == shown


@pytest.mark.parametrize("changes", [{}, dict(qk_norm=True), dict(qkv_bias=True), dict(shared_expert_hidden=32),
                                     dict(tie_embeddings=True), dict(expert_act="gelu")])
def test_num_params_counts_what_the_model_builds(changes):
    from masep.model import build_model
    cfg = preset("tiny").replace(**changes)
    assert cfg.total_params() == sum(p.numel() for p in build_model(cfg).parameters())


# The published config.json fields of the two large presets (Qwen/Qwen3-235B-A22B, mistralai/Mixtral-8x22B-v0.1)
QWEN3_235B_HF = dict(model_type="qwen3_moe", hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                     num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                     vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16", attention_bias=False,
                     use_sliding_window=False, sliding_window=None, eos_token_id=151645)
MIXTRAL_8X22B_HF = dict(model_type="mixtral", hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                        num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                        vocab_size=32000, max_position_embeddings=65536, rope_theta=1000000.0, rms_norm_eps=1e-5,
                        hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16", sliding_window=None,
                        eos_token_id=2)


@pytest.mark.parametrize("name, raw, billions", [("qwen3-235b-a22b", QWEN3_235B_HF, 235),
                                                 ("mixtral-8x22b", MIXTRAL_8X22B_HF, 141)])
def test_large_presets_are_their_hf_configs(name, raw, billions):
    from masep.config import PRESET_HELP
    cfg = preset(name)
    assert from_hf_dict(raw).replace(name=name) == cfg
    assert round(cfg.total_params() / 1e9) == billions and f"{name}: {billions} B" in PRESET_HELP
