"""Shared fixtures. Keep this small: a fixture belongs here only when several test files use it."""
from __future__ import annotations

import pytest

from masep.config import preset
from masep.model import MoETransformer, init_random_

# masep configs that save_pretrained writes as each HF model type (see config.to_hf_dict).
HF_STYLE = {
    "mixtral": dict(),
    "qwen2_moe": dict(qkv_bias=True, shared_expert_hidden=48, norm_topk_prob=False),
    "qwen3_moe": dict(qk_norm=True, norm_topk_prob=False, head_dim=12),
}


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: save a random `tiny` model as an HF checkpoint dir of `model_type`; returns (model, dir).

    The checkpoint is written by masep.checkpoint.save_pretrained (per-expert layout, what
    transformers 5 writes), so tests that need a checkpoint don't need transformers.
    """
    from masep.checkpoint import save_pretrained

    def make(model_type: str = "mixtral", seed: int = 0, std: float = 0.1, **changes):
        cfg = preset("tiny").replace(**{**HF_STYLE[model_type], **changes})
        # std 0.1 rather than build_model's 0.02: router scores far apart, so routing is decisive.
        model = init_random_(MoETransformer(cfg), seed, std).eval()
        path = save_pretrained(model, tmp_path / f"{model_type}-{seed}")
        return model, path

    return make
