"""CUDA graphs for the compute between two transfers of a distributed step.

A decode step on a distributed rank is a chain: compute, transfer, compute, transfer, ...
The transfers stay eager (NCCL on its own stream, ordered by events); each compute segment
in between is captured once per key (op, layer, micro-batch, shapes, attention bucket) and
replayed afterwards, so a segment of dozens of small kernels costs one launch.

Contract of a segment `fn(*inputs) -> tensor or tuple of tensors`:
- it reads only its inputs and tensors with fixed addresses (weights, the KV cache, buffers
  the runtime keeps), launches no collective and reads nothing on the host;
- its side effects are idempotent (the KV-cache write): the first call runs it eagerly once
  (Triton autotuning and lazy initialisation happen outside the capture), then captures it;
- its outputs are valid until the same key replays again (the next step), so callers use them
  within the step, or clone.

An input whose address differs from the one captured is copied into the captured buffer
(a device copy, no host sync); inputs produced by another segment's graph keep their address
from step to step, so most are not copied at all.

With `enabled=False` (CPU, or --eager) `run` just calls `fn`: the CPU tests exercise the same
segment code the GPU replays.

A runtime whose decode step reads nothing on the host (tp_pp: compute and NCCL collectives only;
EP when each rank is told the largest rank's rows, ep.py) captures the whole step, collectives
included, as one entry (stepper.py `whole_step_graphs`). Every rank of a collective must
capture at the same step (a capture's eager warm-up runs the collectives once more), so the
ranks' keys must agree: same shapes on every rank;
NCCL collectives and point-to-point transfers can be captured once their communicator exists,
which the eager warm-up call makes sure of.

Segment graphs each keep a private memory pool. They must not share one: micro-batches
interleave, so the output of one segment (micro-batch 1's hidden state) must survive the replay
of another (micro-batch 0's next layer), and a shared pool lets a later capture place its output
where an earlier graph keeps its scratch. Whole-step graphs (`run(..., shared_pool=True)`) share
one pool, as vLLM's do: each one's output (the logits) is consumed before any other replays. The
cache is bounded
(`max_graphs`): past it, the entries are dropped and captured again as needed (a tensor a
dropped graph produced stays valid while referenced).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Hashable

import torch


@dataclass
class _Captured:
    graph: object
    inputs: tuple[torch.Tensor, ...]
    outputs: object


class SegmentGraphs:
    def __init__(self, enabled: bool, device: torch.device, max_graphs: int = 4096):
        if enabled and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs}: must be a positive integer")
        self.enabled = enabled
        self.device = device
        self.max_graphs = max_graphs
        self._graphs: dict[Hashable, _Captured] = {}
        self._pool = None
        self.captures = 0

    def run(self, key: Hashable, fn: Callable, *inputs: torch.Tensor, shared_pool: bool = False,
            warm_up: Callable[[], ContextManager] | None = None):
        """fn(*inputs), replayed from the graph captured for `key` (captured now if new).
        warm_up: a context the capture's eager warm-up call runs in (comm.dry_transfers where
        the peers do not run the warm-up alongside: a separated plan's whole-step graphs)."""
        if not self.enabled:
            return fn(*inputs)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.clear()
            entry = self._graphs[key] = self._capture(fn, inputs, shared_pool, warm_up)
            self.captures += 1
        else:
            self._load(key, entry, inputs)
        entry.graph.replay()
        return entry.outputs

    def clear(self) -> None:
        self._graphs.clear()
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def _load(self, key, entry: _Captured, inputs) -> None:
        for i, (static, given) in enumerate(zip(entry.inputs, inputs)):
            if given.data_ptr() == static.data_ptr() and given.stride() == static.stride():
                continue
            if given.shape != static.shape or given.dtype != static.dtype:
                raise ValueError(f"CUDA graph {key}: input {i} is {tuple(given.shape)} {given.dtype}, captured "
                                 f"{tuple(static.shape)} {static.dtype} (the key must name every shape)")
            static.copy_(given)

    def _capture(self, fn: Callable, inputs, shared_pool: bool, warm_up=None) -> _Captured:
        # Keep the given tensors as the graph's inputs: most are outputs of an earlier segment's
        # graph, whose address never changes, so later replays need no copy.
        with warm_up() if warm_up is not None else nullcontext():
            fn(*inputs)  # warm-up: autotuning, cuBLAS workspaces, lazy allocations
        graph = torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread polls events while we capture; under the
        # default "global" mode that would invalidate the capture.
        with torch.cuda.graph(graph, pool=self._pool if shared_pool else None, capture_error_mode="thread_local"):
            outputs = fn(*inputs)
        if shared_pool:
            self._pool = graph.pool()
        return _Captured(graph, tuple(inputs), outputs)
