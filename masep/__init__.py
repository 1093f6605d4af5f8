"""masep: MoE-Attention separation. Attention and experts on separate ranks, micro-batches ping-pong between them."""
from .config import ModelConfig, PRESETS, from_hf_config, preset
from .model import MoETransformer, build_model

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device="cpu"):
    """Load an HF Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint directory (see checkpoint.py)."""
    from .checkpoint import from_pretrained as _load
    return _load(path, dtype=dtype, device=device)


__all__ = ["ModelConfig", "PRESETS", "preset", "from_hf_config", "MoETransformer", "build_model",
           "from_pretrained", "__version__"]
