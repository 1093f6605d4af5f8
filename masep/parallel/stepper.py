"""What every distributed runtime shares: micro-batch cutting, the KV cache, op timing.

A subclass says which op list a step runs (`_schedule`), what each op kind does
(`_op_handlers`), how the embedding enters (`_embed`) and how logits leave (`_logits`). Both are
asked once per runtime (the op list once per micro-batch count), not per step. The engine sees
an ordinary `Runtime`.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ModelConfig
from ..fastpath import bucket_len, bucket_rows
from ..model import CacheLayout, KVCache
from ..plan import split_evenly
from ..runtime import StaticBatchMixin, StepRows, StepTensors, lay_out
from .graphs import SegmentGraphs
from .schedule import Op, execute


def dense_decode_rows(top: int, num_slots: int, graphs: bool) -> int:
    """Rows a decode step runs for slots below `top` in a cache of `num_slots`: with graphs,
    rounded up to a batch-size bucket (one graph serves every batch in it), never past the
    cache. The one rule for every rank that must agree on a step's shape without asking (EP
    ranks, a separated replica and its expert ranks)."""
    n = bucket_rows(top) if graphs and top else top
    return min(n, num_slots)


def microbatch_rows(rows: int, microbatches: int, slices: int = 1) -> list[int]:
    """Tokens per micro-batch of a `rows`-row decode step, and of those the largest share of
    one of `slices` ranks (a separated replica's head-parallel ranks split each micro-batch's
    tokens): what a padded transfer's blocks are sized for (capacity.py)."""
    return [-(-len(r) // slices) for r in split_evenly(rows, microbatches)]


class OpTimer:
    """Per-op-kind busy seconds, and profiler labels (`record_function`) when tracing.

    By default an op's time is the host clock around its handler (`timing` "host_clock"). With
    `cuda_events=True` (benchmarks on CUDA) each op is bracketed by CUDA events on the current
    stream instead (`timing` "cuda_events"): the GPU time from the op's first kernel being
    reachable to its last one ending, waits for peers included. The events are read only when
    `busy_s` is read (after the caller's synchronisation), so timing adds no host sync to a step.
    """

    def __init__(self, label_ops: bool = False, cuda_events: bool = False):
        self._busy_s: dict[str, float] = defaultdict(float)
        self.label_ops = label_ops
        self.cuda_events = cuda_events and torch.cuda.is_available()
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @property
    def timing(self) -> str:
        return "cuda_events" if self.cuda_events else "host_clock"

    @property
    def busy_s(self) -> dict[str, float]:
        """Seconds by op kind (reading it waits for the recorded events to complete)."""
        for kind, start, end in self._pending:
            end.synchronize()
            self._busy_s[kind] += start.elapsed_time(end) * 1e-3
        self._pending.clear()
        return self._busy_s

    def record(self, op: Op, start: float, end: float) -> None:
        if not self.cuda_events:
            self._busy_s[op.kind] += end - start

    def label(self, op: Op):
        return torch.profiler.record_function(str(op)) if self.label_ops else nullcontext()

    def wrap(self, handlers: dict[str, Callable[[Op], None]]) -> dict[str, Callable[[Op], None]]:
        def labelled(fn):
            def run(op):
                with self.label(op):
                    # inside a whole-step capture an op has no time of its own (one replay runs all)
                    if not self.cuda_events or torch.cuda.is_current_stream_capturing():
                        return fn(op)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(op)
                    end.record()
                    self._pending.append((op.kind, start, end))
            return run
        return {kind: labelled(fn) for kind, fn in handlers.items()}


@dataclass
class MicroBatch:
    """One micro-batch's state while it moves through a step. Fields are filled by the ops."""

    ids: torch.Tensor  # [b, t] token ids
    positions: torch.Tensor  # [b, t]
    cache: KVCache  # view of this micro-batch's cache rows
    attend_len: int
    x: torch.Tensor | None = None  # [b, t, H] residual stream
    out: torch.Tensor | None = None  # [b, t, H] after the final norm
    work: dict | None = None  # per-strategy scratch (partial sums, handles)


class MicroBatchRuntime(StaticBatchMixin):
    """Base of the distributed runtimes. Subclasses set cfg, device, env, plan, timer and call
    `_init_steps(num_cache_layers, num_kv_heads, dtype)`.

    With graphs, a decode step replays each compute segment from its CUDA graph (graphs.py), or,
    where the subclass says its step reads nothing on the host (`whole_step_graphs`), the whole
    step from one graph per (batch bucket, attention bucket): compute, collectives and the
    logits, with no launch between ops. Per-op busy times then do not exist (OpTimer records
    none inside the capture); the step's time does."""

    cfg: ModelConfig
    whole_step_graphs = False

    def _init_steps(self, num_cache_layers: int, num_kv_heads: int, dtype: torch.dtype, graphs: bool = False) -> None:
        """graphs: replay each decode step's compute segments from CUDA graphs (graphs.py).
        num_kv_heads: the KV heads this rank's attention holds (an MLA cache holds one latent
        per token whatever the heads: CacheLayout)."""
        self._cache_shape = (num_cache_layers, num_kv_heads, dtype)
        self._cache_layout = CacheLayout.of(self.cfg, num_kv_heads)
        self.cache: KVCache | None = None
        self.step = 0
        self.in_step = False
        self.graphs = SegmentGraphs(graphs, self.device)
        self.graphable = False  # this step's segments are replayed from graphs
        self.decoding = False  # this step is a decode step (set per step by forward)
        self.whole_step = False  # this step is being captured (or warmed up) as one graph
        self.full_capacity = False  # this step runs again with worst-case blocks (after an overflow)
        self._ops: dict[int, list[Op]] = {}  # the op list per micro-batch count, built once
        self._op_runners: dict[str, Callable[[Op], None]] | None = None  # per op kind, built once
        self._mbs: list[MicroBatch] = []  # the running step's micro-batches (what the runners act on)
        # a benchmark's hook, called right before a whole-step graph runs, after the step's host
        # preparation (rows checked, laid out, copied): it records a CUDA event there
        self.on_launch: Callable[[], None] | None = None
        self.peer_rows: int | None = None  # this decode step's agreed rows (StepRows.peer_rows), or None

    # --- Runtime interface (runtime.py) --------------------------------------------------------
    def start(self, num_slots: int, max_len: int) -> None:
        layers, _, dtype = self._cache_shape
        self.graphs.clear()  # they hold the old cache's addresses
        self.cache = KVCache.allocate(layers, num_slots, self._cache_layout, max_len, dtype, self.device)

    @torch.inference_mode()
    def forward(self, rows: StepRows, step_id: int | None = None) -> torch.Tensor | None:
        """One step over slot-addressed rows; logits [B, V] where this rank makes them."""
        if self.cache is None:
            raise ValueError("forward before start(): call start(num_slots, max_len) first")
        rows.check(self.cache.num_slots, self.cache.max_len)
        if step_id is not None:
            self.step = step_id
        st = lay_out(rows, self.cache.scratch_position, self.device, self._dense_rows(rows))
        self.decoding = st.decode  # decode steps use padded transfers and graphs; prefill steps exact ones
        if (st.decode and self.graphs.enabled and self.whole_step_graphs
                and st.ids_BT.shape[0] >= self.plan.microbatches):
            logits = self._graphed_step(st)
        else:
            logits = self._run(st, rows)
        if self._rerun():
            # A routed transfer overflowed the capacity sized from the routing (dispatcher.py): this
            # step's result is wrong. Run it again with blocks of the worst-case size; a step is
            # idempotent (it rewrites the same KV positions), so no token is lost.
            self.step -= 1
            self.full_capacity = True
            try:
                logits = self._run(st, rows)
                assert not self._rerun(), "a transfer overflowed blocks of the worst-case capacity"
            finally:
                self.full_capacity = False
        return logits

    def _run(self, st: StepTensors, rows: StepRows) -> torch.Tensor | None:
        """The step's op list over its micro-batches; the logits."""
        if not st.decode and getattr(self.plan, "seq_split", False):
            mbs = self._sequence_chunks(st, rows)
            dim = 1
        else:
            mbs = [self._mb(st.ids_BT[r.start:r.stop], st.positions_BT[r.start:r.stop],
                            _sub_rows(st.cache_rows, r), st.attend_len)
                   for r in split_evenly(st.ids_BT.shape[0], self.plan.microbatches)]
            dim = 0
        out = self._step(mbs, dim)
        return self._logits(out, st.logit_rows_B, st.logit_index_B)

    def _graphed_step(self, st: StepTensors) -> torch.Tensor:
        """The decode step replayed from one graph; logits [B, V] of the step's live rows."""
        n = st.ids_BT.shape[0]
        attend = bucket_len(st.attend_len, self.cache.max_len)

        def step(ids_n1, positions_n1):
            self.whole_step = True
            try:
                mbs = [self._mb(ids_n1[r.start:r.stop], positions_n1[r.start:r.stop], slice(r.start, r.stop), attend)
                       for r in split_evenly(n, self.plan.microbatches)]
                out = self._step(mbs, 0)
                rows = torch.arange(n, device=self.device)
                return self._logits(out, rows, torch.zeros_like(rows))
            finally:
                self.whole_step = False
        number = self.step  # _step counts the step only where it runs: in the capture, not in a replay
        key = ("step", n, attend, self.plan.microbatches) + self._step_graph_key()
        captures = self.graphs.captures
        if self.on_launch is not None:
            self.on_launch()
        logits_nV = self.graphs.run(key, step, st.ids_BT, st.positions_BT, shared_pool=True,
                                    warm_up=self._capture_warm_up)
        self.step = number + 1
        self._after_graphed_step(key, self.graphs.captures != captures)
        return logits_nV[st.logit_rows_B]  # a copy: the next replay overwrites the graph's output

    # The context a whole-step capture's eager warm-up runs in; None: as it is, its collectives
    # run on every rank alike (TP x PP, EP: all ranks capture at the same step).
    _capture_warm_up = None

    def _step_graph_key(self) -> tuple:
        """Before a whole-step graph runs: what else its key must name (EP: the step's block
        capacities, agreed here, outside the capture)."""
        return ()

    def _after_graphed_step(self, key: tuple, captured: bool) -> None:
        """After a whole-step graph ran (captured now, or replayed): host state a replay does not
        rebuild (EP: the step's header checks)."""

    def _take_peer_rows(self, rows: StepRows, meaning: str) -> None:
        """peer_rows of a decode step (StepRows.peer_rows; None otherwise), checked against this
        rank's rows and cache: what the ranks that must agree on the step's shape were all told."""
        self.peer_rows = rows.peer_rows if rows.is_decode else None
        own = max(rows.slots, default=-1) + 1
        if self.peer_rows is not None and not own <= self.peer_rows <= (self.cache.num_slots if self.cache else own):
            raise ValueError(f"rank {self.env.rank}: StepRows.peer_rows={self.peer_rows} must be at least this "
                             f"rank's rows ({own}: its highest slot + 1) and at most its KV slots; it is {meaning}")

    def _dense_rows(self, rows: StepRows) -> int | None:
        """Rows of a decode step: the slots up to the highest one, rounded up to a batch-size
        bucket when graphs are replayed (one graph serves every batch in the bucket)."""
        if not rows.is_decode:
            return None
        return dense_decode_rows(max(rows.slots, default=-1) + 1, self.cache.num_slots, self.graphs.enabled)

    def _sequence_chunks(self, st: StepTensors, rows: StepRows) -> list[MicroBatch]:
        """Prefill cut along the tokens: chunk r of every row, attending up to its end."""
        top = max(rows.starts)
        return [self._mb(st.ids_BT[:, r], st.positions_BT[:, r], st.cache_rows,
                         min(top + r.stop, self.cache.max_len))
                for r in split_evenly(st.ids_BT.shape[1], self.plan.microbatches)]

    # --- one step -----------------------------------------------------------------------------
    def _mb(self, ids_bt, positions_bt, rows: slice | torch.Tensor, attend_len: int) -> MicroBatch:
        return MicroBatch(ids_bt, positions_bt, self.cache.view(rows), attend_len, x=self._embed(ids_bt), work={})

    def _step(self, mbs: list[MicroBatch], dim: int) -> torch.Tensor | None:
        """Run this rank's op list over the micro-batches; the final-norm output [B, T, H]
        where this rank produces one, else None."""
        ops = self._ops.get(len(mbs))
        if ops is None:
            ops = self._ops[len(mbs)] = self._schedule(len(mbs))
        if self._op_runners is None:
            self._op_runners = self.timer.wrap({kind: self._on_micro_batch(fn)
                                                for kind, fn in self._op_handlers().items()})
        self._mbs = mbs
        self.in_step = True
        # decode steps only; an empty micro-batch (batch < m, an idle EP rank) runs eagerly:
        # nothing to gain, and no zero-size shapes to capture
        self.graphable = (self.graphs.enabled and self.decoding and not self.whole_step
                          and all(mb.ids.shape[0] > 0 for mb in mbs))
        try:
            self._begin_step(mbs)
            execute(ops, self._op_runners, self.timer.record)
            self._end_step()
        finally:
            # their tensors and transfers go with the step; on a failed one too: a transfer
            # still referenced keeps its gloo group's connections open, and a peer waiting on
            # this rank there gets no error until its own timeout
            self._mbs = []
        self.in_step = False
        self.step += 1
        outs = [mb.out for mb in mbs]
        return torch.cat(outs, dim=dim) if all(o is not None for o in outs) else None

    def _where(self, layer: int, mb: int) -> str:
        return f"rank {self.env.rank}: step {self.step}, layer {layer}, micro-batch {mb}"

    def _logits(self, out_BTH: torch.Tensor | None, rows_B: torch.Tensor, index_B: torch.Tensor):
        """Logits [B, V] (float32) at token index_B of rows rows_B of the step's output."""
        return self.lm_head(out_BTH[rows_B, index_B]).float()

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
        if not (self.graphable or self.whole_step) or self.cache is None:
            return mb.attend_len
        return bucket_len(mb.attend_len, self.cache.max_len)

    # --- for subclasses -----------------------------------------------------------------------
    def _begin_step(self, mbs: list[MicroBatch]) -> None:
        """Before the op list (the routed strategies agree on the step's layout here)."""

    def _end_step(self) -> None:
        """After the op list."""

    def _rerun(self) -> bool:
        """After the step's logits are queued: whether the step must run again at full capacity
        (the routed strategies read their device-side checks and overflow flags here)."""
        return False

    def _embed(self, ids_bt: torch.Tensor) -> torch.Tensor | None:
        return self.embed(ids_bt)

    def _schedule(self, microbatches: int) -> list[Op]:
        raise NotImplementedError

    def _op_handlers(self) -> dict[str, Callable[[MicroBatch, int, int], None]]:
        """What each op kind does: fn(micro-batch, layer, micro-batch index). Asked once per
        runtime; the step's micro-batches are looked up when an op runs."""
        raise NotImplementedError

    def _on_micro_batch(self, fn: Callable[[MicroBatch, int, int], None]) -> Callable[[Op], None]:
        return lambda op: fn(self._mbs[op.mb], op.layer, op.mb)


def _sub_rows(cache_rows: slice | torch.Tensor, r: range) -> slice | torch.Tensor:
    """Cache rows of micro-batch `r` (a range of the step's rows)."""
    if isinstance(cache_rows, slice):
        return slice(cache_rows.start + r.start, cache_rows.start + r.stop)
    return cache_rows[r.start:r.stop]
