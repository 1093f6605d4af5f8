"""DeepSeek-V3 checkpoints: masep vs transformers' DeepseekV3ForCausalLM on tiny random models.

An HF-written checkpoint loads into masep with the same logits and the same greedy tokens
(prefill, then decode steps through masep's compressed MLA cache); a masep-written one loads
into transformers with the same logits.

Tolerance (fp32 everywhere), as test_hf_parity.py: the same math with other kernels and
groupings (masep's explicit-mask SDPA over keys projected up from the cached latents; per-expert
loop vs grouped_mm; a top-k whose ties would order ids differently sums the same k terms in
another order): a few ulp per op, ~1e-6 on O(1) logits after 3 layers; atol = rtol = 1e-5. A
mapping mistake moves logits by O(0.1): the planted-bug test below shows two of them failing it.
"""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import masep
from masep.checkpoint import save_pretrained
from masep.model import init_random_, MoETransformer
from test_hf_parity import PROMPTS, TOL, greedy, randomize_

transformers = pytest.importorskip("transformers")

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
            kv_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, num_experts_per_tok=4,
            max_position_embeddings=64, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=None, eos_token_id=None)
VARIANTS = {
    # DeepSeek-V3's shape: no q latent here, YaRN (original context 16: the prompts run past it),
    # interleaved RoPE, one dense layer, 4 groups of 4 experts of which 2 are chosen
    "yarn-groups-dense": dict(q_lora_rank=None, n_group=4, topk_group=2, first_k_dense_replace=1,
                              rope_interleave=True, rope_parameters=YARN, routed_scaling_factor=2.5),
    # the other branches: a q latent, plain RoPE in halves, no groups, no renormalisation, no dense layer
    "qlora-plain": dict(q_lora_rank=24, n_group=1, topk_group=1, first_k_dense_replace=0, rope_interleave=False,
                        norm_topk_prob=False, routed_scaling_factor=1.5, n_shared_experts=2,
                        rope_parameters={"rope_type": "default", "rope_theta": 5e4}),
}


def make_hf(variant: str, path):
    cfg = transformers.DeepseekV3Config(**{**BASE, **VARIANTS[variant]})
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    randomize_(model)
    with torch.no_grad():  # a buffer transformers leaves at 0: make choosing by it matter
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(1)) * 0.1)
    model.save_pretrained(path)
    return model


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_deepseek_checkpoint_logits_and_greedy_tokens(variant, tmp_path):
    hf = make_hf(variant, tmp_path)
    model = masep.from_pretrained(tmp_path)
    assert model.cfg.is_mla and model.new_cache(1, 8).k[0].shape == (1, 1, 9, 32)
    ids = torch.tensor(PROMPTS[0])[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, **TOL)
    # Greedy: HF one prompt at a time (its own cache); masep both as one right-padded batch,
    # prefill then 11 decode steps through the latent cache, past the YaRN original context 16.
    want = [hf.generate(torch.tensor(p)[None], do_sample=False, max_new_tokens=12)[0, len(p):].tolist()
            for p in PROMPTS]
    assert greedy(model, PROMPTS, 12) == want


@pytest.mark.timeout(60)
def test_masep_checkpoint_loads_in_transformers(tmp_path):
    model = init_random_(MoETransformer(masep.preset("deepseek-tiny")), 0, std=0.1).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(save_pretrained(model, tmp_path)).eval()
    assert hf.config.model_type == "deepseek_v3" and hf.config.q_lora_rank == 24
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), **TOL)


@pytest.mark.timeout(60)
def test_multi_token_prediction_layers_are_skipped_with_a_log_line(tmp_path, caplog):
    model = init_random_(MoETransformer(masep.preset("deepseek-tiny")), 0, std=0.1).eval()
    path = save_pretrained(model, tmp_path)
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # DeepSeek-V3's layer 61 is its MTP module
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="masep.checkpoint"):
        again = masep.from_pretrained(path)
    assert "skipping the multi-token-prediction layer(s) [3] (1 tensors)" in caplog.text
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bug", ["kv_b rows of head 0 and 1 swapped", "bias weighs the experts"])
def test_planted_mapping_bugs_fail_the_tolerance(bug, tmp_path, monkeypatch):
    hf = make_hf("yarn-groups-dense", tmp_path)
    model = masep.from_pretrained(tmp_path)
    if bug.startswith("kv_b"):
        with torch.no_grad():
            w = model.layers[1].attn.kv_b_proj.weight
            w[:64] = torch.cat((w[32:64], w[:32])).clone()
    else:
        from masep.model import Router
        plain = Router._sigmoid_topk

        def biased(self, x):
            weights, ids = plain(self, x)
            return weights + self.e_score_correction_bias[ids], ids
        monkeypatch.setattr(Router, "_sigmoid_topk", biased)
    ids = torch.tensor(PROMPTS[0])[None]
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() > 100 * TOL["atol"]
