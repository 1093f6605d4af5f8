"""Injected faults, for tests and demos: `--inject-fault KIND@RANK:STEP`.

A rank fires its fault when it receives the first step whose id is >= STEP (step ids come from
the front end and count prefill and decode steps alike), before it computes anything, so its
peers are left waiting inside the step's first transfer:
  kill   SIGKILL itself (a crash, an OOM kill: the process is gone, its sockets close)
  hang   SIGSTOP itself (a stuck rank: alive, silent; the front end must time it out)
  raise  raise an exception (a bug: the rank reports the error and exits)
"""
from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass

KINDS = ("kill", "hang", "raise")
_SYNTAX = re.compile(r"^(?P<kind>[a-z]+)@(?P<rank>\d+):(?P<step>\d+)$")


class InjectedFault(RuntimeError):
    """The exception a `raise` fault throws."""


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    rank: int
    step: int

    @classmethod
    def parse(cls, text: str) -> "FaultSpec":
        m = _SYNTAX.match(text.strip())
        if not m or m["kind"] not in KINDS:
            raise ValueError(f"--inject-fault {text!r}: must be KIND@RANK:STEP with KIND one of {', '.join(KINDS)} "
                             "and RANK, STEP integers >= 0 (e.g. kill@2:10)")
        return cls(m["kind"], int(m["rank"]), int(m["step"]))

    def __str__(self) -> str:
        return f"{self.kind}@{self.rank}:{self.step}"


def check_faults(faults: list[FaultSpec], world_size: int) -> None:
    for f in faults:
        if f.rank >= world_size:
            raise ValueError(f"--inject-fault {f}: rank {f.rank} does not exist (the plan has ranks 0..{world_size - 1})")


class FaultInjector:
    """This rank's pending faults; `before_step` fires each one once."""

    def __init__(self, faults, rank: int):
        self.pending = sorted((f for f in faults if f.rank == rank), key=lambda f: f.step)

    def before_step(self, step_id: int) -> None:
        while self.pending and step_id >= self.pending[0].step:
            fault = self.pending.pop(0)
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault.kind == "hang":
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                raise InjectedFault(f"injected fault {fault} (rank {fault.rank} raises at step {step_id})")
