"""masep.from_pretrained vs transformers on tiny random Mixtral / Qwen2-MoE / Qwen3-MoE models.

Both directions: an HF-written checkpoint loads into masep with the same logits and greedy
tokens, and a masep-written checkpoint loads into transformers with the same logits.

Tolerance (fp32 everywhere): the two sides compute the same math with different kernels
(grouped_mm vs one linear per expert, masep's explicit-mask SDPA vs transformers' attention).
On CPU with torch 2.13 / transformers 5.24 the logits happen to be bitwise equal, but nothing
guarantees the same kernels or summation order elsewhere: a different order costs a few ulp
per op (~1e-7 relative), ~1e-6 on O(1) logits after 2 layers. atol = rtol = 1e-5 allows that,
while any mapping mistake moves logits by O(0.1) (swapping gate and up in one layer: 0.4-0.9).
"""
from __future__ import annotations

import pytest
import torch

import masep
from masep.checkpoint import save_pretrained
from masep.runtime import LocalRuntime

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=1e-5)
COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
              eos_token_id=None, bos_token_id=None, pad_token_id=0)
HF_MODELS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, rope_theta=1e6)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, qkv_bias=True,
                       shared_expert_intermediate_size=48, norm_topk_prob=False)),
    # head_dim 24 != hidden / heads = 16: q_proj is [96, 64], o_proj [64, 96].
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=24,
                       norm_topk_prob=True)),
    "qwen3_moe_unnormed": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                           dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=24,
                                norm_topk_prob=False)),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """transformers initialises some weights to 0 or 1 (norms, biases); make every one matter."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * std
        p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)


def make_hf(kind: str, path, **overrides):
    cfg_cls, model_cls, extra = HF_MODELS[kind]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    randomize_(model)
    model.save_pretrained(path)
    return model


def greedy(model: masep.MoETransformer, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Right-padded batch prefill, then one decode step per token, through LocalRuntime."""
    rt = LocalRuntime(model)
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = torch.tensor(p)
    rt.start(len(prompts), int(lengths.max()) + steps)
    token = rt.prefill(ids, lengths).argmax(-1)
    out, positions = [token], lengths.clone()
    for _ in range(steps - 1):
        token = rt.decode(token, positions, attend_len=int(positions.max()) + 1).argmax(-1)
        out.append(token)
        positions += 1
    rt.finish()
    return torch.stack(out, 1).tolist()


PROMPTS = [[5, 17, 99, 3, 42, 8, 64], [11, 7, 120, 33, 2]]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", list(HF_MODELS))
def test_hf_checkpoint_logits_and_greedy_tokens(kind, tmp_path):
    hf = make_hf(kind, tmp_path)
    model = masep.from_pretrained(tmp_path)
    ids = torch.tensor(PROMPTS[0])[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, **TOL)
    # Greedy: HF one prompt at a time (no padding); masep the two prompts as one padded batch.
    want = [hf.generate(torch.tensor(p)[None], do_sample=False, max_new_tokens=8)[0, len(p):].tolist()
            for p in PROMPTS]
    assert greedy(model, PROMPTS, 8) == want


@pytest.mark.timeout(120)
def test_tied_embeddings(tmp_path):
    hf = make_hf("qwen3_moe", tmp_path, tie_word_embeddings=True)
    model = masep.from_pretrained(tmp_path)
    assert model.cfg.tie_embeddings and model.lm_head.weight is model.embed.weight
    ids = torch.tensor(PROMPTS[1])[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, **TOL)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_save_pretrained_loads_in_transformers(model_type, tiny_checkpoint):
    model, path = tiny_checkpoint(model_type)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert hf.config.model_type == model_type
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), **TOL)


@pytest.mark.timeout(120)
def test_save_load_roundtrip_is_exact(tiny_checkpoint, tmp_path):
    model, path = tiny_checkpoint("qwen2_moe")
    again = masep.from_pretrained(save_pretrained(masep.from_pretrained(path), tmp_path / "again"))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
