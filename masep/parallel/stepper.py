"""What every distributed runtime shares: micro-batch cutting, the KV cache, op timing.

A subclass says which op list a step runs (`_schedule`), what each op kind does
(`_handlers`), how the embedding enters (`_embed`) and how logits leave (`_logits`). The
engine sees an ordinary `Runtime`.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ModelConfig
from ..fastpath import bucket_len
from ..model import KVCache
from ..plan import split_evenly
from .graphs import SegmentGraphs
from .schedule import Op, execute


class OpTimer:
    """Per-op-kind busy seconds, and profiler labels (`record_function`) when tracing."""

    def __init__(self, label_ops: bool = False):
        self.busy_s: dict[str, float] = defaultdict(float)
        self.label_ops = label_ops

    def record(self, op: Op, start: float, end: float) -> None:
        self.busy_s[op.kind] += end - start

    def label(self, op: Op):
        return torch.profiler.record_function(str(op)) if self.label_ops else nullcontext()

    def wrap(self, handlers: dict[str, Callable[[Op], None]]) -> dict[str, Callable[[Op], None]]:
        def labelled(fn):
            def run(op):
                with self.label(op):
                    fn(op)
            return run
        return {kind: labelled(fn) for kind, fn in handlers.items()}


@dataclass
class MicroBatch:
    """One micro-batch's state while it moves through a step. Fields are filled by the ops."""

    ids: torch.Tensor  # [b, t] token ids
    positions: torch.Tensor  # [b, t]
    cache: KVCache | None  # view of this micro-batch's cache rows
    attend_len: int
    x: torch.Tensor | None = None  # [b, t, H] residual stream
    out: torch.Tensor | None = None  # [b, t, H] after the final norm
    work: dict | None = None  # per-strategy scratch (partial sums, handles)


class MicroBatchRuntime:
    """Base of the distributed runtimes. Subclasses set cfg, device, env, plan, timer and call
    `_init_steps(num_cache_layers, num_kv_heads, dtype)`."""

    cfg: ModelConfig

    def _init_steps(self, num_cache_layers: int, num_kv_heads: int, dtype: torch.dtype, graphs: bool = False) -> None:
        """graphs: replay each decode step's compute segments from CUDA graphs (graphs.py)."""
        self._cache_shape = (num_cache_layers, num_kv_heads, dtype)
        self.cache: KVCache | None = None
        self.step = 0
        self.in_step = False
        self.graphs = SegmentGraphs(graphs, self.device)
        self.graphable = False  # this step's segments are replayed from graphs

    # --- Runtime interface ------------------------------------------------------------------
    def start(self, batch: int, max_len: int) -> None:
        layers, kv, dtype = self._cache_shape
        self.graphs.clear()  # they hold the old cache's addresses
        self.cache = KVCache.empty(layers, batch, kv, max_len, self.cfg.head_dim, dtype, self.device)

    @torch.inference_mode()
    def prefill(self, input_ids_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        b, t = input_ids_BT.shape
        ids = input_ids_BT.to(self.device)
        positions = torch.arange(t, device=self.device).expand(b, t)
        if getattr(self.plan, "seq_split", False):
            chunks = split_evenly(t, self.plan.microbatches)
            mbs = [self._mb(ids[:, r], positions[:, r], slice(0, b), r.stop) for r in chunks]
            dim = 1
        else:
            rows = split_evenly(b, self.plan.microbatches)
            mbs = [self._mb(ids[r.start:r.stop], positions[r.start:r.stop], slice(r.start, r.stop), t) for r in rows]
            dim = 0
        out = self._step(mbs, dim)
        return self._logits(out, lengths_B.to(self.device) - 1, b)

    @torch.inference_mode()
    def decode(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, attend_len: int) -> torch.Tensor:
        tokens, positions = tokens_B.to(self.device)[:, None], positions_B.to(self.device)[:, None]
        rows = split_evenly(tokens.shape[0], self.plan.microbatches)
        mbs = [self._mb(tokens[r.start:r.stop], positions[r.start:r.stop], slice(r.start, r.stop), attend_len)
               for r in rows]
        out = self._step(mbs, 0)
        return self._logits(out, torch.zeros(tokens.shape[0], dtype=torch.long, device=self.device),
                            tokens.shape[0])

    # --- one step -----------------------------------------------------------------------------
    def _mb(self, ids_bt, positions_bt, rows: slice, attend_len: int) -> MicroBatch:
        view = None
        if self.cache is not None:
            view = KVCache([k[rows] for k in self.cache.k], [v[rows] for v in self.cache.v])
        return MicroBatch(ids_bt, positions_bt, view, attend_len, x=self._embed(ids_bt), work={})

    def _step(self, mbs: list[MicroBatch], dim: int) -> torch.Tensor | None:
        """Run this rank's op list over the micro-batches; the final-norm output [B, T, H]
        where this rank produces one, else None."""
        ops = self._schedule(len(mbs))
        self.in_step = True
        # decode steps only; an empty micro-batch (batch < m, an idle EP rank) runs eagerly:
        # nothing to gain, and no zero-size shapes to capture
        self.graphable = self.graphs.enabled and all(mb.ids.shape[1] == 1 and mb.ids.shape[0] > 0 for mb in mbs)
        self._begin_step(mbs)
        execute(ops, self.timer.wrap(self._handlers(mbs)), self.timer.record)
        self._end_step()
        self.in_step = False
        self.step += 1
        outs = [mb.out for mb in mbs]
        return torch.cat(outs, dim=dim) if all(o is not None for o in outs) else None

    def _where(self, layer: int, mb: int) -> str:
        return f"rank {self.env.rank}: step {self.step}, layer {layer}, micro-batch {mb}"

    def _logits(self, out_BTH: torch.Tensor | None, index_B: torch.Tensor, batch: int) -> torch.Tensor:
        """Logits [B, V] (float32) at token index_B of each row."""
        rows = torch.arange(batch, device=self.device)
        return self.lm_head(out_BTH[rows, index_B]).float()

    def _segment(self, key: tuple, fn, *inputs: torch.Tensor):
        """Run the compute between two transfers: replayed from a CUDA graph in a graphable
        (decode) step, else called. `key` names the op, layer, micro-batch and every non-tensor
        value `fn` bakes in; the input shapes are added here."""
        if not self.graphable:
            return fn(*inputs)
        return self.graphs.run(key + tuple(tuple(t.shape) for t in inputs), fn, *inputs)

    def _attend_len(self, mb: MicroBatch) -> int:
        """Keys a micro-batch attends over: rounded up to a bucket when replaying graphs, so one
        graph serves many steps (keys past a row's position are masked either way)."""
        if not self.graphable or self.cache is None:
            return mb.attend_len
        return bucket_len(mb.attend_len, self.cache.max_len)

    # --- for subclasses -----------------------------------------------------------------------
    def _begin_step(self, mbs: list[MicroBatch]) -> None:
        """Before the op list (the routed strategies agree on the step's layout here)."""

    def _end_step(self) -> None:
        """After the op list (the routed strategies read their device-side checks here)."""

    def _embed(self, ids_bt: torch.Tensor) -> torch.Tensor | None:
        return self.embed(ids_bt)

    def _schedule(self, microbatches: int) -> list[Op]:
        raise NotImplementedError

    def _handlers(self, mbs: list[MicroBatch]) -> dict[str, Callable[[Op], None]]:
        raise NotImplementedError
