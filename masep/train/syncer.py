"""Gradient synchronisation of a training rank: which tensors add up over which ranks.

Each rank's `ParamSync` list (parallel/training.py) names, per parameter or expert slice, the
ranks whose gradients of it sum to the full gradient. The distinct rank sets of the whole world
are agreed once (an all-gather of each rank's sets), every rank builds the groups of every set
in the same sorted order (torch's rule for new_group), and each set's tensors go through one
GradSync (hierarchical all-reduce, optional int8 compression with error feedback).

Overlap with backward: a rank whose schedule knows when a layer's gradients are final (a
separated attention rank, after the last micro-batch's backward of that layer) calls
`ready(params)`; their sums start at once on a worker thread (on CUDA, on a side stream) while
the backward goes on. `sync()` at the end adds everything not yet started and waits for all.
The worker issues every sync collective of this rank, in the order the jobs arrive: the ranks
of one set run the same schedule, so they post the same jobs in the same order.
"""
from __future__ import annotations

import queue
import threading
from collections import defaultdict

import torch
import torch.distributed as dist

from ..parallel import comm
from ..parallel.gradsync import GradSync, build_sync_groups
from ..parallel.training import ParamSync


class GradSyncer:
    def __init__(self, syncs: list[ParamSync], timeout, compression: str = "none", gpus_per_node: int = 8,
                 rank: int = 0):
        self.syncs, self.timeout, self.rank = syncs, timeout, rank
        by_set = defaultdict(list)
        for s in syncs:
            by_set[s.ranks].append(s)
        self.by_set = dict(by_set)
        mine = sorted({s.ranks for s in syncs if len(s.ranks) > 1})
        everyone = [mine]
        if dist.is_initialized():
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        self.groups: dict[tuple, GradSync] = {}
        self.reasons: dict[tuple, str] = {}
        for ranks in sorted({r for sets in everyone for r in sets}):
            groups = build_sync_groups(list(ranks), gpus_per_node, timeout)  # every rank, same order
            if ranks in self.by_set:
                self.groups[ranks] = GradSync(groups, compression)
                self.reasons[ranks] = getattr(groups, "reason", "")
        self._bucket_ids: dict[tuple, dict[tuple, int]] = {}  # rank set -> {names in a job: bucket}
        self.device = syncs[0].param.device if syncs else torch.device("cpu")
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.begin_step()

    # --- one step: ready() during backward, sync() at its end ------------------------------------
    def begin_step(self) -> None:
        self._started: set[int] = set()  # id(ParamSync) whose sum has been queued this step
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.early_elements = 0  # elements whose sum started before the backward ended

    def ready(self, params) -> None:
        """These parameters' gradients are final for this step: start summing them now."""
        ids = {id(p) for p in params}
        started = self._start([s for s in self.syncs if id(s.param) in ids])
        self.early_elements += started

    def sync(self) -> None:
        """Sum each set's gradients over its ranks, in place (unused parameters count as zero):
        whatever `ready` has not started, then wait for every sum of the step."""
        if not hasattr(self, "_started"):
            self.begin_step()
        self._start(list(self.syncs))
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()  # every collective inside has the group's timeout
            if self._side is not None:
                torch.cuda.current_stream(self._side.device).wait_stream(self._side)
        failure = self._failure
        self.begin_step()
        if failure is not None:
            raise failure

    def _start(self, syncs: list[ParamSync]) -> int:
        """Queue the sums of `syncs` not started yet, one job per rank set; returns elements queued."""
        todo = [s for s in syncs if id(s) not in self._started]
        for s in todo:
            self._started.add(id(s))
            if s.param.grad is None:
                s.param.grad = torch.zeros_like(s.param)
        by_set = defaultdict(list)
        for s in todo:
            if s.ranks in self.groups:
                by_set[s.ranks].append(s)
        queued = 0
        for ranks in sorted(by_set):
            tensors = [s.grad() for s in by_set[ranks]]
            # the bucket (int8 error feedback, the layout check) is named by what it holds
            ids = self._bucket_ids.setdefault(ranks, {})
            bucket = ids.setdefault(tuple(s.name for s in by_set[ranks]), len(ids))
            self._submit((ranks, tensors, bucket, self._mark()))
            queued += sum(t.numel() for t in tensors)
        return queued

    def _mark(self):
        """An event after the gradients' producers on the compute stream (CUDA), or None."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _submit(self, job) -> None:
        if self._worker is None:
            self._queue = queue.Queue()
            self._worker = threading.Thread(target=self._work, name="masep-grad-sync", daemon=True)
            self._worker.start()
        self._queue.put(job)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._failure is not None:
                continue  # drain: the step fails at sync()
            ranks, tensors, bucket, event = job
            try:
                if self._side is None:
                    self.groups[ranks].sync_(tensors, bucket=bucket)
                    continue
                with torch.cuda.stream(self._side):
                    self._side.wait_event(event)
                    self.groups[ranks].sync_(tensors, bucket=bucket)
            except BaseException as err:  # reported on the main thread by sync()
                self._failure = err

    def local_norm_sq(self) -> torch.Tensor:
        """Sum of squared gradients this rank owns (each element of the model counted once)."""
        total = torch.zeros((), dtype=torch.float32)
        for s in self.syncs:
            g = s.grad()
            if s.owner and g is not None:
                total = total + g.float().pow(2).sum().cpu()
        return total

    @property
    def bytes_sent(self) -> int:
        return sum(g.bytes_sent for g in self.groups.values())

    @property
    def bytes_uncompressed(self) -> int:
        return sum(g.bytes_uncompressed for g in self.groups.values())


def world_sum(values: torch.Tensor, timeout, what: str) -> torch.Tensor:
    """Sum a small float64 vector over every rank (step statistics, the gradient norm)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    return comm.group_all_reduce(values, None, timeout, what)
