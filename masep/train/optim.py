"""AdamW parameter groups, the warm-up + cosine LR multiplier, and the optimizer config.

The optimizer itself is torch's AdamW; masep/train/precision.py runs it (on fp32 master copies
in bf16/fp16 training) with a LambdaLR over `warmup_cosine`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # Weight decay pulls a weight towards 0. For a norm's gain "0" means "switch the channel
    # off", not "simpler model", and a bias is an offset with nothing to regularise; both are
    # few parameters (1-D) that decay can only hurt (GPT-2, nanoGPT and Megatron exempt them).
    # Everything with ndim >= 2 (projections, experts, router, embeddings) is decayed.
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1] if "." in name else ""
    return p.ndim < 2 or name.endswith("bias") or "norm" in module


def param_groups(named_params: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """Two AdamW groups: [{"params": [(name, p), ...], "weight_decay": weight_decay}, {..., 0.0}].

    Params are given as (name, tensor) pairs, so torch.optim records "param_names" in each group.
    An empty group is left out (torch rejects none, but an empty group only clutters state dicts).
    A tensor listed twice (tied weights) is kept once, under its first name, as
    nn.Module.named_parameters() does: one parameter, one update.
    """
    decay, no_decay, seen = [], [], set()
    for name, p in named_params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if _no_decay(name, p) else decay).append((name, p))
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _check_schedule(warmup_steps, total_steps, min_lr_ratio) -> None:
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r}: must be an integer >= 0 (0 = no warm-up)")
    if not isinstance(total_steps, int) or total_steps <= warmup_steps:
        raise ValueError(f"total_steps={total_steps!r}: must be an integer > warmup_steps={warmup_steps} "
                         f"(the cosine phase needs at least one step); raise total_steps or lower warmup_steps")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio!r}: must be in [0, 1] (the final LR as a fraction of lr)")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier for optimizer update number `step` (0-based).

    Warm-up: (step + 1) / warmup_steps for step < warmup_steps, so the first update already moves
    (1/warmup, not 0) and update warmup_steps - 1 runs at the full LR. Then a half cosine from 1
    at step == warmup_steps to min_lr_ratio at step == total_steps, and min_lr_ratio after that.
    """
    _check_schedule(warmup_steps, total_steps, min_lr_ratio)
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r}: must be an integer >= 0 (the number of updates already taken)")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak LR, reached at the end of warm-up
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW); norms, biases and 1-D params get 0 (param_groups)
    warmup_steps: int = 100  # optimizer updates, not micro-batches; skipped (overflow) steps don't count
    total_steps: int = 10_000  # where the cosine reaches min_lr_ratio; the LR stays there after
    min_lr_ratio: float = 0.1  # final LR = lr * min_lr_ratio
    max_grad_norm: float = 1.0  # clip the global L2 norm to this; math.inf = no clipping

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "OptimConfig":
        """Raise ValueError naming the field, the value and the rule; return self when valid."""
        if not self.lr > 0:
            raise ValueError(f"OptimConfig.lr={self.lr!r}: must be > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimConfig.betas={self.betas!r}: must be two numbers in [0, 1), e.g. (0.9, 0.95)")
        if not self.eps > 0:
            raise ValueError(f"OptimConfig.eps={self.eps!r}: must be > 0 (it keeps Adam's division finite)")
        if not self.weight_decay >= 0:
            raise ValueError(f"OptimConfig.weight_decay={self.weight_decay!r}: must be >= 0")
        if not self.max_grad_norm > 0:
            raise ValueError(f"OptimConfig.max_grad_norm={self.max_grad_norm!r}: must be > 0 "
                             f"(math.inf disables clipping)")
        try:
            _check_schedule(self.warmup_steps, self.total_steps, self.min_lr_ratio)
        except ValueError as err:
            raise ValueError(f"OptimConfig.{err}") from None
        return self
