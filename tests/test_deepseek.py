"""DeepSeek-V3-class models: config, multi-head latent attention and its compressed cache,
dense first layers, grouped sigmoid routing, YaRN, HF checkpoints, and the cost model's numbers.

Parity with transformers is in test_deepseek_parity.py; every parallel strategy in
test_deepseek_dist.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from masep import model as model_module
from masep.checkpoint import from_pretrained, save_pretrained
from masep.config import ModelConfig, from_hf_dict, preset, to_hf_dict
from masep.mla import MLAttention, softmax_scale as mla_softmax_scale
from masep.model import (BlockParts, CacheLayout, DenseMLP, KVCache, MoETransformer, build_model, init_random_,
                         init_scratch_numel, rope_tables, yarn_inv_freq)
from masep.parallel.parts import apply_parts, rank_parts
from masep.parallel.worker import RunSpec, load_model
from masep.parallel.schedule import (ALLREDUCE, ATTENTION, COMBINE, DISPATCH, EXPERTS, HEAD, MLP, RECV, SEND,
                                     SEND_ACT, comm_sequence, ep_schedule, separated_schedule, tp_pp_schedule)
from masep.perf.costmodel import Workload, attention_cost, op_cost, rank_memory
from masep.perf.hardware import get_profile
from masep.perf.simulator import simulate
from masep.plan import EpPlan, SeparatedPlan, TpPpPlan

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


# DeepSeek-V3's own config.json (transformers 4.33 era: rope_scaling, its routing keys, fp8 weights)
DEEPSEEK_V3_RAW = dict(
    architectures=["DeepseekV3ForCausalLM"], attention_bias=False, attention_dropout=0.0, aux_loss_alpha=0.001,
    bos_token_id=0, eos_token_id=1, ep_size=1, first_k_dense_replace=3, hidden_act="silu", hidden_size=7168,
    initializer_range=0.02, intermediate_size=18432, kv_lora_rank=512, max_position_embeddings=163840,
    model_type="deepseek_v3", moe_intermediate_size=2048, moe_layer_freq=1, n_group=8, n_routed_experts=256,
    n_shared_experts=1, norm_topk_prob=True, num_attention_heads=128, num_experts_per_tok=8, num_hidden_layers=61,
    num_key_value_heads=128, num_nextn_predict_layers=1, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
    quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                         "weight_block_size": [128, 128]},
    rms_norm_eps=1e-06, rope_theta=10000, routed_scaling_factor=2.5, scoring_func="sigmoid", seq_aux=True,
    tie_word_embeddings=False, topk_group=4, topk_method="noaux_tc", torch_dtype="bfloat16", use_cache=True,
    v_head_dim=128, vocab_size=129280,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                  "original_max_position_embeddings": 4096, "type": "yarn"})


def test_deepseek_v3_own_config_is_the_preset_once_dequantized():
    with pytest.raises(ValueError, match=r"quant_method='fp8'.*dequantize the checkpoint to bf16 first"):
        from_hf_dict(DEEPSEEK_V3_RAW)
    raw = {k: v for k, v in DEEPSEEK_V3_RAW.items() if k != "quantization_config"}
    assert from_hf_dict(raw).replace(name="deepseek-v3") == preset("deepseek-v3")


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


# --- the model -----------------------------------------------------------------------------------
def _tiny_model(seed: int = 0, **changes):
    # std 0.1 rather than build_model's 0.02: scores far apart, so routing is decisive
    return init_random_(MoETransformer(TINY.replace(**changes)), seed, std=0.1).eval()


def test_layers_dense_first_then_moe_with_ungated_shared_experts():
    model = _tiny_model()
    first, second = model.layers[0], model.layers[1]
    assert first.moe is None and isinstance(first.mlp, DenseMLP) and first.mlp.gate_proj.out_features == 96
    assert second.mlp is None and second.moe.shared.gate is None and second.moe.shared.up_proj.out_features == 32
    assert isinstance(first.attn, MLAttention) and second.moe.router.e_score_correction_bias.dtype == torch.float32


@torch.no_grad()
def test_cache_holds_the_normed_latent_and_the_roped_key():
    model = _tiny_model()
    cache = model.new_cache(2, 16)
    assert cache.k[0].shape == (2, 1, 17, 32) and cache.v[0].shape == (2, 1, 17, 8)  # not [2, 4 heads, 17, 24]
    layout = CacheLayout.of(TINY, TINY.num_kv_heads)
    assert layout.bytes_per_position(torch.float32) == TINY.kv_bytes_per_token_per_layer() == (32 + 8) * 4
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    model(ids, torch.arange(5).expand(2, 5), cache, attend_len=5)
    attn, x = model.layers[0].attn, model.layers[0].attn_norm(model.embed(ids))
    latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(x)[..., :32])
    torch.testing.assert_close(cache.k[0][:, 0, :5], latent)
    assert cache.k[0][:, 0, 5:].abs().sum() == 0


@torch.no_grad()
def test_prefill_then_decode_through_the_cache_equals_one_forward():
    model = _tiny_model()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    whole = model(ids)
    cache = model.new_cache(2, 16)
    got = [model(ids[:, :6], torch.arange(6).expand(2, 6), cache, attend_len=6)[:, -1]]
    for p in range(6, 9):
        got.append(model(ids[:, p:p + 1], torch.full((2, 1), p), cache, attend_len=p + 1)[:, 0])
    # fp32, the same products in another grouping (one query vs all): a few ulps
    torch.testing.assert_close(torch.stack(got, 1), whole[:, 5:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_head_slices_sum_to_the_whole_and_each_keeps_the_whole_latent():
    """Head parallelism: q_b / kv_b rows and o_proj columns by head; every slice writes the same
    latent cache (replicated), and the partial outputs add up to the whole attention."""
    whole = _tiny_model().layers[1].attn
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(5).expand(2, 5)
    full_cache = KVCache.allocate(1, 2, whole.cache_layout, 8, torch.float32, "cpu")
    want = whole(x, pos, full_cache, 0, 5)
    parts = []
    for heads in (range(0, 3), range(3, 4)):
        part = MLAttention(TINY, heads).copy_heads_from_(whole)
        drawn = init_random_(MoETransformer(TINY, parts=[BlockParts(heads, None)] * 3), 0, std=0.1).layers[1].attn
        for (name, a), (_, b) in zip(part.named_parameters(), drawn.named_parameters()):
            assert torch.equal(a, b), name  # a rank's draw is its slice of the whole model's
        cache = KVCache.allocate(1, 2, part.cache_layout, 8, torch.float32, "cpu")
        parts.append(part(x, pos, cache, 0, 5))
        assert torch.equal(cache.k[0], full_cache.k[0]) and torch.equal(cache.v[0], full_cache.v[0])
    torch.testing.assert_close(parts[0] + parts[1], want, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_sigmoid_router_bias_chooses_but_does_not_weigh():
    router = _tiny_model().layers[1].moe.router
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    scores = torch.sigmoid(x @ router.weight.T)
    router.e_score_correction_bias.zero_()
    router.e_score_correction_bias[13] = 10.0  # expert 13 (group 3) wins every token's choice
    weights, ids = router(x)
    assert (ids == 13).any(dim=1).all()
    chosen = scores.gather(1, ids)
    torch.testing.assert_close(weights, chosen / chosen.sum(1, keepdim=True) * 2.5)  # plain scores, scaled
    groups = ids // 4  # experts come from at most topk_groups=2 of the 4 groups, one of them group 3
    assert all(len(set(g.tolist())) <= 2 and 3 in g.tolist() for g in groups)


@torch.no_grad()
def test_grouped_choice_differs_from_a_plain_top_k():
    """Some token's plain top-4 spans more than 2 groups; the grouped choice never does."""
    router = _tiny_model().layers[1].moe.router
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    plain = (torch.sigmoid(x @ router.weight.T) + router.e_score_correction_bias).topk(4).indices
    _, ids = router(x)
    assert max(len(set((plain[i] // 4).tolist())) for i in range(64)) > 2
    assert max(len(set((ids[i] // 4).tolist())) for i in range(64)) <= 2


def test_yarn_frequencies_by_hand():
    """rope_dim 8 -> 4 frequencies theta^(-2i/8); original context 64: a frequency turning
    more than beta_fast=32 times is kept, fewer than beta_slow=1 times divided by the factor 4."""
    inv = yarn_inv_freq(TINY)
    plain = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    turns = 64 * plain / (2 * math.pi)  # 10.2, 1.02, 0.10, 0.01
    assert turns[0] < 32 and turns[-1] < 1
    # the correction range is dims [floor(d(32)), ceil(d(1))] = [0, 2]: ramp 0, 0.5, 1, 1
    ramp = torch.tensor([0.0, 0.5, 1.0, 1.0])
    torch.testing.assert_close(inv, plain / 4 * ramp + plain * (1 - ramp))
    cos, _ = rope_tables(TINY, torch.zeros(1, 1, dtype=torch.long), torch.float32)
    assert torch.allclose(cos, torch.ones_like(cos))  # mscale == mscale_all_dim: attention factor 1
    assert mla_softmax_scale(TINY) == pytest.approx(24 ** -0.5 * (0.1 * math.log(4) + 1) ** 2)


def test_preset_help_states_deepseek_sizes():
    from masep.config import PRESET_HELP
    count = sum(p.numel() for p in MoETransformer(TINY, device="meta").parameters())
    assert count == TINY.total_params() and f"deepseek-tiny: {count / 1e6:.2f} M" in PRESET_HELP
    v3 = preset("deepseek-v3")
    assert f"deepseek-v3: {v3.total_params() / 1e9:.0f} B, {v3.active_params() / 1e9:.1f} B active" in PRESET_HELP


# --- schedules: dense layers run beside the attention, with no transfer ---------------------------------
def test_dense_layers_have_no_transfer_in_any_schedule():
    attention = separated_schedule("attention", 4, 2, dense_layers=2)
    expert = separated_schedule("expert", 4, 2, dense_layers=2)
    assert comm_sequence(attention) == comm_sequence(expert)  # the bridge sees the MoE layers only
    assert {op.layer for op in expert} == {2, 3}
    assert [op.kind for op in attention if op.layer == 0] == [ATTENTION, MLP, ATTENTION, MLP]  # both mbs
    ep = ep_schedule(4, 1, dense_layers=2)
    assert [op.kind for op in ep if op.layer in (0, 1)] == [ATTENTION, MLP, ATTENTION, MLP]
    assert [op.kind for op in tp_pp_schedule(range(0, 2), 0, 2, 1, dense_layers=1) if op.layer >= 0] == \
        [ATTENTION, ALLREDUCE, MLP, ALLREDUCE, ATTENTION, ALLREDUCE, EXPERTS, ALLREDUCE, SEND_ACT]


def test_simulator_sees_no_transfer_for_dense_layers():
    v3 = preset("deepseek-v3")
    sim = simulate(SeparatedPlan(1, 8, 16, 2), v3, Workload(16, 1024), get_profile("h200"))
    dense = [r for r in sim.records if r.op.layer in (0, 1, 2)]
    assert {r.op.kind for r in dense} == {ATTENTION, MLP} and {r.rank for r in dense} == set(range(8))
    assert all(r.op.kind in (ATTENTION, MLP, HEAD) or r.op.layer >= 3 for r in sim.records)
    moe = {r.op.kind for r in sim.records if r.op.layer == 3}
    assert {DISPATCH, COMBINE, RECV, SEND, EXPERTS} <= moe and MLP not in moe


# --- the cost model, by hand ----------------------------------------------------------------------------
def test_mla_attention_cost_by_hand():
    """deepseek-v3, 16 of its 128 heads (a head-parallel rank of 8), 8 sequences at 1000 keys, bf16."""
    v3, hw = preset("deepseek-v3"), get_profile("h200")
    c = attention_cost(v3, hw, tokens=8, context=1000, heads=16, kv_heads=16)
    # per head: q_b 1536 x 192, kv_b 512 x (128 + 128), o 128 x 7168; whole: q_a, its norm, kv_a, its norm
    proj = 16 * (1536 * 192 + 512 * 256 + 128 * 7168) + (7168 * 1536 + 1536 + 7168 * 576 + 512)
    assert proj == v3.attention_params(16, 16) == 36_636_672
    assert c.kv_bytes == 8 * 1000 * (512 + 64) * 2  # the latent, not 16 heads x (192 + 128)
    assert c.weight_bytes == (proj + 256 * 7168 + 256 + 2 * 7168) * 2  # + router (and its bias), 2 norms
    up = 2 * 8 * 1000 * 512 * 16 * 256  # every cached latent projected up to 16 heads' keys and values
    assert c.flops == 2 * 8 * proj + 2 * 8 * 7168 * 256 + up + 2 * 8 * 16 * 1000 * (192 + 128)
    # its up-projected keys and values [1000, 16, 128 + 128 + 192] written and read back, per sequence
    assert c.hbm_bytes == c.weight_bytes + c.kv_bytes + 2 * 8 * 7168 * 2 + 8 * 1000 * 16 * 448 * 2 * 2


def test_dense_mlp_and_shared_expert_costs_by_hand():
    v3, hw, work = preset("deepseek-v3"), get_profile("h200"), Workload(8, 1000)
    sep, tp = SeparatedPlan(1, 8, 8, 1), TpPpPlan(8, 1, 1)
    # a dense layer's MLP: whole on every head-parallel rank, on the replica's 8 tokens
    mlp = op_cost("mlp", 0, 0, sep, 3, v3, work, hw)
    assert mlp.weight_bytes == 3 * 7168 * 18432 * 2 and mlp.flops == 2 * 8 * 3 * 7168 * 18432
    assert op_cost("mlp", 0, 0, tp, 3, v3, work, hw).weight_bytes == 3 * 7168 * 18432 / 8 * 2  # its columns
    # the shared expert: with the attention of an MoE layer, on the rank's slice (1 of 8 tokens)
    moe_attn, dense_attn = (op_cost("attention", layer, 0, sep, 3, v3, work, hw) for layer in (3, 0))
    router = (256 * 7168 + 256) * 2
    assert moe_attn.weight_bytes - dense_attn.weight_bytes == 3 * 7168 * 2048 * 2 + router
    assert moe_attn.flops - dense_attn.flops == 2 * 1 * 3 * 7168 * 2048 + 2 * 8 * 7168 * 256
    # tp_pp: in the experts op of TP rank 0 only
    assert op_cost("experts", 3, 0, tp, 0, v3, work, hw).flops - op_cost("experts", 3, 0, tp, 1, v3, work, hw).flops \
        == 2 * 8 * 3 * 7168 * 2048


def test_memory_check_counts_the_compressed_cache_on_every_head_rank():
    v3, hw, work = preset("deepseek-v3"), get_profile("h200"), Workload(8, 1000)
    plan = SeparatedPlan(1, 8, 8, 1)
    uses = [rank_memory(plan, v3, r, work, hw) for r in range(16)]
    assert {u.kv_cache for u in uses[:8]} == {61 * 8 * 1000 * 1152} and {u.kv_cache for u in uses[8:]} == {0}
    attn = v3.attention_params(16, 16) + 2 * 7168
    moe = v3.router_params() + v3.shared_expert_params()
    vocab = 2 * 129280 * 7168
    assert uses[0].weights == (61 * attn + 58 * moe + 3 * v3.dense_mlp_params() + vocab) * 2
    assert uses[8].weights == 58 * 32 * v3.expert_params() * 2  # 32 of 256 experts, MoE layers only


# --- rank parts: reading, drawing and slicing give a rank the same tensors ---------------------------
@pytest.mark.parametrize("plan", [SeparatedPlan(1, 3, 2, 2), TpPpPlan(2, 2, 2), EpPlan(3, 2)],
                         ids=["separated-3+2", "tp2xpp2", "ep3"])
def test_a_rank_reads_and_draws_its_slice(plan, tmp_path, monkeypatch):
    """Heads 2/1/1 (MLA rows by head, latents whole), dense-MLP and expert columns over 2 TP
    ranks, experts 6/5/5: from the checkpoint, from the seed, and by slicing the whole model."""
    whole = init_random_(MoETransformer(TINY), 5, std=0.1).eval()
    path = save_pretrained(whole, tmp_path)
    sizes: list[int] = []
    real = model_module._Draws.__call__
    monkeypatch.setattr(model_module._Draws, "__call__", lambda self, name, shape: sizes.append(math.prod(shape))
                        or real(self, name, shape))
    for rank in range(plan.world_size):
        parts = rank_parts(plan, TINY, rank)
        want = apply_parts(init_random_(MoETransformer(TINY), 5, std=0.1), parts).state_dict()
        read = from_pretrained(path, parts=parts).state_dict()
        sizes.clear()
        drawn = load_model(RunSpec(plan=plan, requests=[], config=TINY, seed=5), torch.device("cpu"), rank)
        assert max(sizes) <= init_scratch_numel(TINY, parts)
        drawn_want = apply_parts(build_model(TINY, seed=5), parts).state_dict()
        assert read.keys() == want.keys() == drawn.state_dict().keys(), f"rank {rank}"
        for name in want:
            assert torch.equal(read[name], want[name]), f"rank {rank}: {name}"
            assert torch.equal(drawn.state_dict()[name], drawn_want[name]), f"rank {rank}: {name}"
    if plan.strategy == "separated":  # an expert rank: no attention, dense MLP, shared expert, embedding or head
        assert set(read) == {f"layers.{i}.{n}" for i in (1, 2) for n in (
            "attn_norm.weight", "moe_norm.weight", "moe.router.weight", "moe.router.e_score_correction_bias",
            "moe.experts.w_gate", "moe.experts.w_up", "moe.experts.w_down")} | {
            "layers.0.attn_norm.weight", "layers.0.moe_norm.weight"}


def test_run_memory_needs_size_the_latent_cache():
    """`masep run`'s check: each head-parallel rank allocates the whole latent cache."""
    from masep.cli import rank_memory_needs
    needs = rank_memory_needs(TINY, SeparatedPlan(1, 2, 1, 1), slots=4, max_len=16)
    assert [n.kv_cache for n in needs] == [4 * 17 * 3 * (32 + 8) * 4] * 2 + [0]


def test_training_refuses_deepseek_class_models():
    from masep.perf.traincost import TrainWorkload
    from masep.perf.trainsim import simulate_train
    why = TINY.training_refusal()
    assert "multi-head latent attention, dense layers, sigmoid routing" in why and preset("tiny").training_refusal() is None
    with pytest.raises(ValueError, match="training deepseek-v3 is not supported"):
        simulate_train(EpPlan(64), preset("deepseek-v3"), TrainWorkload(64, 1024), get_profile("h200"))
