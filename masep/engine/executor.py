"""Executors: what runs a scheduler step on the model.

An executor has `num_units` data-parallel units of `slots_per_unit` KV slots each and runs
`step(step_id, rows_by_unit) -> tokens_by_unit`: one StepRows per unit that has work, one
sampled token (or None) per row back. `LocalExecutor` drives a runtime in this process (the
single-device model, or a rank's runtime in a test); `parallel/cluster.py` drives ranks in
other processes over the control channel. The scheduler cannot tell them apart.
"""
from __future__ import annotations

from typing import Protocol

from ..runtime import Runtime, StepRows
from .sampling import sample


class Executor(Protocol):
    num_units: int
    slots_per_unit: int
    max_len: int

    def step(self, step_id: int, rows: dict[int, StepRows]) -> dict[int, list[int | None]]: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """One unit: a runtime in this process."""

    num_units = 1

    def __init__(self, runtime: Runtime, num_slots: int, max_len: int, own_step_ids: bool = False):
        """own_step_ids: let the runtime number its steps (several ranks, each driving its own
        runtime in lockstep, as the strategy tests do), instead of passing the scheduler's."""
        self.runtime, self.slots_per_unit, self.max_len = runtime, num_slots, max_len
        self.own_step_ids = own_step_ids
        runtime.start(num_slots, max_len)

    def step(self, step_id: int, rows: dict[int, StepRows]) -> dict[int, list[int | None]]:
        r = rows[0]
        logits = self.runtime.forward(r, None if self.own_step_ids else step_id)
        return {0: sample(logits, r.sample)}

    def shutdown(self) -> None:
        self.runtime.finish()
