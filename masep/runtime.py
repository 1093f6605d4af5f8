"""The interface between the generation engine and whatever computes logits.

The engine (engine.py) drives a `Runtime`: the single-device model here, or one rank's view
of a distributed strategy (parallel/). Every runtime takes right-padded prompts and per-row
positions, so the engine never needs to know how the model is split.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .config import ModelConfig
from .model import KVCache, MoETransformer


class Runtime(Protocol):
    cfg: ModelConfig
    device: torch.device

    def start(self, batch: int, max_len: int) -> None:
        """Allocate the KV cache for `batch` sequences of up to `max_len` positions."""

    def prefill(self, input_ids_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts [B, T] (int64) with true lengths [B] -> logits [B, V] (float32)
        at each row's last prompt token."""

    def decode(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, attend_len: int) -> torch.Tensor:
        """One new token per row at absolute position positions_B -> logits [B, V] (float32).
        `attend_len` = max(positions_B) + 1, known on the host so no device sync is needed."""

    def finish(self) -> None:
        """Release the cache (a distributed runtime also tells its peers the work is done)."""


class LocalRuntime:
    """The whole model on one device: strategy `single`, and the oracle for the others."""

    def __init__(self, model: MoETransformer):
        self.model = model
        self.cfg = model.cfg
        self.device = model.device
        self.cache: KVCache | None = None

    def start(self, batch: int, max_len: int) -> None:
        self.cache = self.model.new_cache(batch, max_len)

    @torch.inference_mode()
    def prefill(self, input_ids_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        b, t = input_ids_BT.shape
        positions = torch.arange(t, device=self.device).expand(b, t)
        logits = self.model(input_ids_BT.to(self.device), positions, self.cache, attend_len=t,
                            logits_at_B=lengths_B.to(self.device) - 1)
        return logits.float()

    @torch.inference_mode()
    def decode(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, attend_len: int) -> torch.Tensor:
        logits = self.model(tokens_B.to(self.device)[:, None], positions_B.to(self.device)[:, None],
                            self.cache, attend_len=attend_len)
        return logits[:, 0].float()

    def finish(self) -> None:
        self.cache = None
