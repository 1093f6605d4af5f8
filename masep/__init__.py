"""masep: MoE-Attention separation. Attention and experts on separate ranks, micro-batches ping-pong between them.

The library API (docs/api.md) is importable from here: `masep.load_model`, `make_plan`,
`search_plans`, `simulate`, `generate`, `serve_model`, `train_model`, and the plan classes. Those names are
loaded on first use, so `import masep` costs no more than the config and the model.
"""
from .config import ModelConfig, PRESETS, from_hf_config, preset
from .logs import setup_from_environment as _setup_logging
from .model import MoETransformer, build_model

_setup_logging()  # a rank started by a masep front end logs as the front end does (masep/logs.py)

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device="cpu"):
    """Load an HF Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint directory (see checkpoint.py)."""
    from .checkpoint import from_pretrained as _load
    return _load(path, dtype=dtype, device=device)


# name -> module it lives in, imported when the name is first used (PEP 562). Not `serve` or
# `train`: those are the subpackages masep.serve and masep.train.
_LAZY = {name: "api" for name in ("LoadedModel", "Generation", "load_model", "make_plan", "search_plans", "explain",
                                  "simulate", "write_trace", "generate", "serve_model", "train_model")}
_LAZY.update({name: "plan" for name in ("SinglePlan", "SeparatedPlan", "TpPpPlan", "EpPlan", "format_plan",
                                        "parse_plan")})


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'masep' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["ModelConfig", "PRESETS", "preset", "from_hf_config", "MoETransformer", "build_model",
           "from_pretrained", "__version__", *_LAZY]
