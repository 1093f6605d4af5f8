"""The runtime contract: what the scheduler asks of whatever computes logits.

A *unit* is one data-parallel copy of the model's attention state: the single-device model,
one attention replica of a separated plan, one EP rank, or the whole TP x PP group. A unit
owns `num_slots` KV slots of `max_len` positions each. The scheduler (masep/engine/) keeps
every request's tokens and decides, between steps, which request holds which slot; the
runtime never sees a request, only slots:

  start(num_slots, max_len)   allocate the KV cache (slots are numbered 0..num_slots-1)
  forward(rows, step_id)      one step over some slots -> logits at each row's last token
  finish()                    release the cache (a distributed runtime tells its peers)

`StepRows` is slot-addressed: row b feeds `tokens[b]` to slot `slots[b]` at positions
`starts[b] ..`. A row of one token is a decode row; a longer row is a prefill chunk (the
first chunk of a prompt starts at 0, later chunks continue where the last stopped, so a long
prompt never holds up the decode steps for long). A step is either all decode rows or all
prefill chunks, never mixed: the routed strategies agree on a step's shape with their peers
before it starts. Rows of one step name distinct slots. A slot's positions below `starts[b]`
must hold that request's KV (written by earlier steps); positions past the row's last token
may hold anything: no query attends past its own position.

How the runtimes honour it:
- decode steps run over the dense slot range [0, max slot + 1) (rounded up to a batch-size
  bucket when replaying CUDA graphs); slots not in the step are padding rows that write only
  the cache's scratch position. Dense ranges keep the KV reads in place (no gather), which is
  what makes a decode step memory-bound on weights and KV and nothing else. A scheduler that
  gives out the lowest free slot keeps the range short.
- prefill steps run over the rows as given (any slots, any order), right-padded to the
  longest chunk; padding writes the scratch position.
- `step_id` is the front end's global step number: the ranks of a unit and their peers (expert
  ranks, other EP ranks) check it in their step handshake, so a diverged schedule fails loudly.
  None: the runtime counts its own steps (a runtime driven directly, as in tests).

Sampling is not the runtime's job: `masep.engine.sampling` turns logits into tokens from
per-row parameters alone (no generator state), so a request samples the same tokens on any
unit, in any batch, and after being moved to another replica.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .config import ModelConfig
from .model import MoETransformer


@dataclass
class StepRows:
    """One step for one unit. Shapes are host lists: this crosses the control channel."""

    slots: list[int]  # [B] KV slot of each row, distinct
    tokens: list[list[int]]  # [B][t_b] tokens fed; every t_b == 1 in a decode step
    starts: list[int]  # [B] absolute position of each row's first token
    sample: list = field(default_factory=list)  # [B] engine.sampling.SampleSpec, or None: no token wanted
    prefill: bool = False  # a prefill step even if every chunk is one token (EP ranks must agree on the kind)
    attend_at_least: int = 0  # attend over at least this many keys (benchmarks pin the KV length)
    # EP decode steps: the largest (highest slot + 1) of any EP rank's rows in this step, from
    # whoever sees every rank's rows (the front end, a benchmark; it also sets attend_at_least to
    # the longest). With it every rank runs the same shapes and sizes its blocks alike without a
    # handshake, so the step reads nothing on the host (ep.py).
    peer_rows: int | None = None

    def __post_init__(self):
        assert len(self.slots) == len(self.tokens) == len(self.starts), "rows of unequal length"
        assert len(set(self.slots)) == len(self.slots), f"a slot twice in one step: {self.slots}"

    @classmethod
    def empty(cls) -> "StepRows":
        return cls([], [], [], [])

    def __len__(self) -> int:
        return len(self.slots)

    # The properties and check below run once per step on the host, in front of the GPU's work:
    # they iterate with builtins (map, min, max) rather than Python loops, which at 2048 rows took
    # about 1 ms a step on a 2-core CPU.
    @property
    def is_decode(self) -> bool:
        return not self.prefill and all(map((1).__eq__, map(len, self.tokens)))

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.tokens))

    @property
    def attend_len(self) -> int:
        """Keys the step needs: one past the furthest position written (0 for no rows)."""
        return max(self.attend_at_least, max(map(operator.add, self.starts, map(len, self.tokens)), default=0))

    def check(self, num_slots: int, max_len: int) -> None:
        """Internal invariant (the scheduler guarantees it); cheap enough to keep on."""
        if not self.slots:
            return
        lengths = list(map(len, self.tokens))
        ends = list(map(operator.add, self.starts, lengths))
        if (min(self.slots) >= 0 and max(self.slots) < num_slots and min(lengths) > 0 and min(self.starts) >= 0
                and max(ends) <= max_len):
            return
        for slot, start, n in zip(self.slots, self.starts, lengths):  # name the first bad row
            assert 0 <= slot < num_slots and n and start >= 0 and start + n <= max_len, \
                f"row (slot {slot}, start {start}, {n} tokens) outside {num_slots} slots x {max_len}"


@dataclass
class StepTensors:
    """A step laid out for the model: ids/positions [B', T] (right-padded; padding at the
    cache's scratch position), the cache rows it addresses, and where each row's logits are.

    Decode: B' = dense slot range (cache rows = slice(0, B')), logits of row b at (slots[b], 0).
    Prefill: B' = B, cache rows = the slots (an index tensor, or a slice when contiguous)."""

    ids_BT: torch.Tensor
    positions_BT: torch.Tensor
    cache_rows: slice | torch.Tensor
    logit_rows_B: torch.Tensor  # which of the B' rows each step row's logits come from
    logit_index_B: torch.Tensor  # at which token of that row
    attend_len: int
    decode: bool


def lay_out(rows: StepRows, scratch: int, device, dense_rows: int | None = None) -> StepTensors:
    """Tensors for `rows`. `dense_rows`: decode over this many leading slots (>= max slot + 1;
    a CUDA-graph bucket), default max slot + 1."""
    b = len(rows)
    if rows.is_decode:
        n = dense_rows if dense_rows is not None else max(rows.slots, default=-1) + 1
        # ids and positions [2, n, 1] built on the host in numpy (torch.tensor of a Python list
        # costs ~0.1 us an element, numpy's conversion a tenth of that) and moved in one copy
        both = np.empty((2, n, 1), dtype=np.int64)
        both[0] = 0
        both[1] = scratch
        slots = np.asarray(rows.slots, dtype=np.int64)
        both[0, slots, 0] = np.fromiter(itertools.chain.from_iterable(rows.tokens), dtype=np.int64, count=b)
        both[1, slots, 0] = np.asarray(rows.starts, dtype=np.int64)
        both, slots = torch.from_numpy(both).to(device), torch.from_numpy(slots).to(device)
        return StepTensors(both[0], both[1], slice(0, n), slots, torch.zeros(b, dtype=torch.long, device=device),
                           rows.attend_len, True)
    t = max(len(x) for x in rows.tokens)
    ids = torch.zeros(b, t, dtype=torch.long)
    pos = torch.full((b, t), scratch, dtype=torch.long)
    for i, (start, toks) in enumerate(zip(rows.starts, rows.tokens)):
        ids[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        pos[i, :len(toks)] = torch.arange(start, start + len(toks))
    lo = min(rows.slots)
    contiguous = rows.slots == list(range(lo, lo + b))
    cache_rows = slice(lo, lo + b) if contiguous else torch.tensor(rows.slots, dtype=torch.long, device=device)
    last = torch.tensor([len(x) - 1 for x in rows.tokens], dtype=torch.long)
    return StepTensors(ids.to(device), pos.to(device), cache_rows, torch.arange(b, device=device),
                       last.to(device), rows.attend_len, False)


def static_rows(ids_BT: torch.Tensor, lengths_B: torch.Tensor | None = None, positions_B=None) -> StepRows:
    """A static batch as slot-addressed rows (slot b = row b): prefill of right-padded prompts
    [B, T] with true lengths [B], or (positions_B given) one decode token per row."""
    if positions_B is not None:  # tolist() gives Python ints already
        return StepRows(list(range(ids_BT.shape[0])), [[x] for x in ids_BT.view(-1).tolist()],
                        positions_B.view(-1).tolist())
    lens = lengths_B.tolist() if lengths_B is not None else [ids_BT.shape[1]] * ids_BT.shape[0]
    return StepRows(list(range(ids_BT.shape[0])), [row[:n] for row, n in zip(ids_BT.tolist(), lens)],
                    [0] * ids_BT.shape[0])


class Runtime(Protocol):
    cfg: ModelConfig
    device: torch.device

    def start(self, num_slots: int, max_len: int) -> None:
        """Allocate the KV cache: `num_slots` slots of `max_len` positions."""

    def forward(self, rows: StepRows, step_id: int | None = None) -> torch.Tensor | None:
        """Logits [B, V] (float32) at each row's last token; None on a rank that does not
        produce logits (all but one rank of a distributed unit)."""

    def finish(self) -> None:
        """Release the cache (a distributed runtime also tells its peers the work is done)."""


class StaticBatchMixin:
    """prefill/decode over slots 0..B-1: the static-batch calls benchmarks and tests use."""

    def prefill(self, input_ids_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts [B, T] with true lengths [B] -> logits [B, V] at the last prompt token."""
        return self.forward(static_rows(input_ids_BT.cpu(), lengths_B.cpu()))

    def decode(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, attend_len: int | None = None,
               peer_rows: int | None = None):
        """One token per row (slot b = row b) at positions_B -> logits [B, V], attending over
        at least `attend_len` keys (default: the positions imply it); peer_rows: StepRows."""
        rows = static_rows(tokens_B.cpu(), positions_B=positions_B.cpu())
        rows.attend_at_least = attend_len or 0
        rows.peer_rows = peer_rows
        return self.forward(rows)


class LocalRuntime(StaticBatchMixin):
    """The whole model on one device: strategy `single`, and the oracle for the others."""

    def __init__(self, model: MoETransformer):
        self.model = model
        self.cfg = model.cfg
        self.device = model.device
        self.cache = None

    def start(self, num_slots: int, max_len: int) -> None:
        self.cache = self.model.new_cache(num_slots, max_len)

    @torch.inference_mode()
    def forward(self, rows: StepRows, step_id: int | None = None) -> torch.Tensor:
        if self.cache is None:
            raise ValueError("forward before start(): call start(num_slots, max_len) first")
        rows.check(self.cache.num_slots, self.cache.max_len)
        if not len(rows):
            return torch.zeros(0, self.cfg.vocab_size, device=self.device)
        st = lay_out(rows, self.cache.scratch_position, self.device)
        return self.run(st)

    def run(self, st: StepTensors) -> torch.Tensor:
        cache = self.cache.view(st.cache_rows)
        if st.decode:  # logits of the dense rows [B', 1, V], then the step's rows
            return self.model(st.ids_BT, st.positions_BT, cache, attend_len=st.attend_len)[st.logit_rows_B, 0].float()
        return self.model(st.ids_BT, st.positions_BT, cache, attend_len=st.attend_len,
                          logits_at_B=st.logit_index_B).float()

    def finish(self) -> None:
        self.cache = None
