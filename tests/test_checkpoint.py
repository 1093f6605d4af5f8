"""Checkpoint reading by slice, both expert layouts, shards, dtype casts, and every error path.

Checkpoints here are written by masep.checkpoint.save_pretrained (transformers' per-expert
layout; test_hf_parity.py checks that transformers reads them back), then edited on disk.
Loads are exact copies, so comparisons are torch.equal, not a tolerance.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import masep
from masep.checkpoint import CheckpointReader, copy_into_, load_attention, load_experts, save_pretrained
from masep.model import Attention, Experts


def rewrite(path, edit) -> None:
    """Apply `edit(tensors) -> tensors` to path/model.safetensors."""
    tensors = edit(load_file(path / "model.safetensors"))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def edit_config(path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (path / "config.json").write_text(json.dumps(raw))


def fuse(tensors: dict, cfg, old: str, new: str, names=("gate_proj", "up_proj", "down_proj")) -> dict:
    """Per-expert -> fused layout: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
    Also renames the MoE block prefix `old` -> `new` (Mixtral: block_sparse_moe -> mlp)."""
    out = {k.replace(f".{old}.", f".{new}."): v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(cfg.num_layers):
        stack = [torch.stack([tensors[f"model.layers.{layer}.{old}.experts.{j}.{n}.weight"]
                              for j in range(cfg.num_experts)]) for n in names]
        out[f"model.layers.{layer}.{new}.experts.gate_up_proj"] = torch.cat(stack[:2], dim=1)
        out[f"model.layers.{layer}.{new}.experts.down_proj"] = stack[2]
    return out


def assert_same_weights(a: masep.MoETransformer, b: masep.MoETransformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


# --- layouts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type, old, new, names", [
    ("qwen3_moe", "mlp", "mlp", ("gate_proj", "up_proj", "down_proj")),
    ("mixtral", "block_sparse_moe", "block_sparse_moe", ("w1", "w3", "w2")),
    ("mixtral", "block_sparse_moe", "mlp", ("w1", "w3", "w2")),  # transformers 5's in-memory names
])
def test_fused_layout_loads_identically(tiny_checkpoint, model_type, old, new, names):
    model, path = tiny_checkpoint(model_type)
    rewrite(path, lambda t: fuse(t, model.cfg, old, new, names))
    reader = CheckpointReader(path)
    assert reader.fused == [True, True] and reader.moe_prefix[0] == f"model.layers.0.{new}."
    assert_same_weights(masep.from_pretrained(path), model)


def test_sharded_checkpoint_with_index(tiny_checkpoint):
    model, path = tiny_checkpoint("qwen2_moe")
    tensors = load_file(path / "model.safetensors")
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for key, tensor in tensors.items():
        shards[sorted(shards)[".layers.1." in key]][key] = tensor
    for name, part in shards.items():
        save_file(part, path / name, metadata={"format": "pt"})
    weight_map = {key: name for name, part in shards.items() for key in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "model.safetensors").unlink()
    assert_same_weights(masep.from_pretrained(path), model)

    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"index.json: shard file 'model-00002-of-00002.safetensors'.*missing"):
        masep.from_pretrained(path)


# --- slices for distributed ranks ------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_load_subset_of_experts(tiny_checkpoint, fused):
    model, path = tiny_checkpoint("qwen3_moe")
    if fused:
        rewrite(path, lambda t: fuse(t, model.cfg, "mlp", "mlp"))
    full = model.layers[1].moe.experts
    ids = [5, 2, 3, 7]  # unordered, non-contiguous: several slice reads
    part = load_experts(path, 1, ids)
    for name in ("w_gate", "w_up", "w_down"):
        assert torch.equal(part[name], getattr(full, name)[ids]), name
    # A partition of the experts over "ranks" sums to the full expert output.
    x = torch.randn(6, model.cfg.hidden_size)
    weights, ids_Xk = model.layers[1].moe.router(x)
    total = torch.zeros_like(x)
    with CheckpointReader(path) as reader:
        for rank_experts in ([0, 3, 4], [1, 2, 5, 6, 7]):
            experts = Experts(model.cfg, expert_ids=rank_experts)
            copy_into_(experts, load_experts(reader, 1, rank_experts))
            total += experts(x, weights, ids_Xk, grouped=False)
    torch.testing.assert_close(total, full(x, weights, ids_Xk, grouped=False), atol=1e-6, rtol=1e-6)


def test_load_head_range(tiny_checkpoint):
    model, path = tiny_checkpoint("qwen2_moe")  # 8 heads over 2 KV heads, q/k/v biases
    cfg, full = model.cfg, model.layers[0].attn
    x = torch.randn(2, 5, cfg.hidden_size)
    positions = torch.arange(5).expand(2, 5)
    total = torch.zeros_like(x)
    for heads in (range(0, 3), range(3, 8)):  # uneven: the first split shares KV head 0
        attn = Attention(cfg, heads=heads)
        copy_into_(attn, load_attention(path, 0, heads))
        total += attn(x, positions)
    # Partial outputs sum in a different order than one full o_proj: a few fp32 ulp.
    torch.testing.assert_close(total, full(x, positions), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"heads=range\(6, 9\)"):
        load_attention(path, 0, range(6, 9))
    with pytest.raises(ValueError, match=r"expert_ids=\[8\]"):
        load_experts(path, 0, [1, 8])


# --- dtype and tying -------------------------------------------------------------------------
def test_dtype_cast(tiny_checkpoint):
    model, path = tiny_checkpoint("mixtral")
    bf16 = masep.from_pretrained(path, dtype=torch.bfloat16)
    assert bf16.cfg.dtype == "bfloat16" and bf16.dtype == torch.bfloat16
    assert torch.equal(bf16.layers[0].moe.experts.w_down, model.layers[0].moe.experts.w_down.bfloat16())
    rewrite(path, lambda t: {k: v.half() for k, v in t.items()})  # stored fp16 -> cast up to fp32
    assert masep.from_pretrained(path, dtype="float32").dtype == torch.float32
    with pytest.raises(ValueError, match=r"dtype=torch.float64: must be one of"):
        masep.from_pretrained(path, dtype=torch.float64)


def test_tied_embeddings(tiny_checkpoint):
    model, path = tiny_checkpoint("mixtral", tie_embeddings=True)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    loaded = masep.from_pretrained(path)
    assert loaded.lm_head.weight is loaded.embed.weight
    assert_same_weights(loaded, model)
    # Some tied checkpoints still store lm_head: tolerated and ignored, as transformers does.
    rewrite(path, lambda t: {**t, "lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])})
    assert_same_weights(masep.from_pretrained(path), model)


# --- errors ----------------------------------------------------------------------------------
def drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def put(key, value):
    return lambda t: {**t, key: value}


@pytest.mark.parametrize("edit, message", [
    (drop("model.layers.1.self_attn.k_proj.weight"),
     r"model.safetensors: missing tensor 'model.layers.1.self_attn.k_proj.weight'"),
    (drop("model.layers.0.block_sparse_moe.experts.3.w2.weight"),
     r"missing tensor 'model.layers.0.block_sparse_moe.experts.3.w2.weight'"),
    (put("model.layers.0.block_sparse_moe.router_bias", torch.zeros(8)),
     r"model.safetensors: unexpected tensor 'model.layers.0.block_sparse_moe.router_bias'"),
    (put("model.layers.1.self_attn.q_proj.weight", torch.zeros(64, 32)),
     r"model.safetensors: tensor 'model.layers.1.self_attn.q_proj.weight' has shape \[64, 32\], "
     r"config.json implies \[64, 64\]"),
    (put("model.norm.weight", torch.ones(64, dtype=torch.int32)),
     r"model.safetensors: tensor 'model.norm.weight' has dtype I32"),
])
def test_bad_tensors(tiny_checkpoint, edit, message):
    _, path = tiny_checkpoint("mixtral")
    rewrite(path, edit)
    with pytest.raises(ValueError, match=message):
        masep.from_pretrained(path)


def test_truncated_file(tiny_checkpoint):
    _, path = tiny_checkpoint("mixtral")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors: unreadable safetensors file \(truncated or corrupt"):
        masep.from_pretrained(path)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="llama"), r"config.json: model_type='llama' is not supported"),
    (dict(hidden_size=None), r"config.json: required field 'hidden_size' is missing"),
    (dict(num_local_experts=6), r"missing tensor|shape \[6, 64\]|unexpected tensor"),
])
def test_bad_config(tiny_checkpoint, changes, message):
    _, path = tiny_checkpoint("mixtral")
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=message):
        masep.from_pretrained(path)


def test_no_checkpoint(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        masep.from_pretrained(tmp_path / "nowhere")
    _, path = tiny_checkpoint("mixtral")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        masep.from_pretrained(path)


def test_save_refuses_what_hf_cannot_express(tmp_path):
    cfg = masep.preset("tiny")
    with pytest.raises(ValueError, match="expert_act='gelu'"):
        save_pretrained(masep.build_model(cfg.replace(expert_act="gelu")), tmp_path)
    model = masep.build_model(cfg)
    model.layers[1].moe.experts = Experts(cfg, expert_ids=[0, 1])
    with pytest.raises(ValueError, match="layer 1 holds a slice"):
        save_pretrained(model, tmp_path)
