"""Plans at scale: the best plan of each strategy family for a model on N GPUs, and the published
results of large deployments beside the simulator's number for the closest setting.

A family's row is `masep plan --strategies FAMILY --tpot-limit-ms L` on N GPUs: the plan and batch
with the most output tokens/s whose simulated TPOT meets the limit (planner.search_throughput), with
its memory headroom (the tightest GPU's free memory). One model instance spans all N GPUs. The same
rows at smaller N also give the best *replicated* deployment of N GPUs: N/k independent copies of
the best k-GPU instance (k divides N), with the per-GPU throughput of that instance. Plans are shown
in masep's plan notation (`notation`, what `masep run --plan` takes) and shorter (`plan`: ' rr' for
the planner's round-robin expert placement).

Families: separated (attention and experts on their own GPUs), ep (colocated expert parallelism:
every GPU runs attention for its sequences and holds a share of the experts) and tp_pp (tensor x
pipeline parallel). Dispatch: "padded" is what masep's runtime moves (a fixed-capacity block to every
peer); "routed" is the what-if of a count-first dispatcher (costmodel.Workload.dispatch).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..config import ModelConfig
from .costmodel import describe
from .planner import plan_label
from .throughput import search_throughput

FAMILIES = ("separated", "ep", "tp_pp")


@dataclass(frozen=True)
class Setting:
    """The workload every row is planned for."""
    context: int = 2048  # keys per sequence (SGLang's published run: 2,000-token inputs)
    tpot_limit_ms: float = 50.0
    max_microbatches: int = 4
    batch_per_gpu: int = 256  # largest batch tried: this x GPUs (powers of two up to it)
    lm_head: bool = True

    def __post_init__(self) -> None:
        for name in ("context", "max_microbatches", "batch_per_gpu"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Setting.{name}={getattr(self, name)!r}: must be an integer >= 1")
        if not self.tpot_limit_ms > 0:
            raise ValueError(f"Setting.tpot_limit_ms={self.tpot_limit_ms!r}: must be > 0")


def headroom(sim) -> tuple[float, float]:
    """(GB, fraction) of memory left on the GPU with the least left."""
    left = [(sim.hw.for_rank(r).memory_bytes - m.total, sim.hw.for_rank(r).memory_bytes)
            for r, m in enumerate(sim.memory)]
    gb, cap = min(left)
    return gb / 1e9, gb / cap


def family_row(cfg: ModelConfig, hw, gpus: int, family: str, setting: Setting, dispatch: str = "padded") -> dict:
    """The best plan of `family` on `gpus` GPUs of `hw` under the setting's TPOT limit (module docstring)."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: must be one of {FAMILIES}")
    start, cpu = time.perf_counter(), time.process_time()
    res = search_throughput(cfg, hw, gpus, setting.context, setting.tpot_limit_ms * 1e-3,
                            max_batch=gpus * setting.batch_per_gpu, strategies=(family,), top=1,
                            max_microbatches=setting.max_microbatches, lm_head=setting.lm_head, dispatch=dispatch)
    row = dict(model=cfg.name, hardware=hw.name, gpus=gpus, gpus_per_node=hw.gpus_per_node,
               nodes=math.ceil(gpus / hw.gpus_per_node), family=family, dispatch=dispatch,
               context=setting.context, tpot_limit_ms=setting.tpot_limit_ms, search_s=time.perf_counter() - start,
               search_cpu_s=time.process_time() - cpu,
               candidates=res.candidates, simulated=res.simulated, rejected=len(res.rejected))
    if not res.ranked:
        return dict(row, plan=None, why=res.no_plan_message())
    sim = res.best
    gb, frac = headroom(sim)
    per_gpu = sim.tps / gpus
    split = (dict(attention_gpus=sim.plan.num_attention_ranks, expert_gpus=sim.plan.expert_ranks)
             if sim.plan.strategy == "separated" else {})
    return dict(row, **split, plan=plan_label(sim.plan, cfg), notation=describe(sim.plan), batch=sim.work.batch, tpot_ms=sim.tpot_s * 1e3,
                tokens_per_s=sim.tps, tokens_per_s_per_gpu=per_gpu, tokens_per_s_per_node=per_gpu * hw.gpus_per_node,
                floor_ms=sim.floor_s * 1e3, memory_max_gb=max(m.total for m in sim.memory) / 1e9,
                headroom_gb=gb, headroom_fraction=frac)


def replicated(rows: list[dict], gpus: int) -> dict | None:
    """The row whose instance, copied gpus/k times, gives `gpus` GPUs the most tokens/s per GPU (k divides
    gpus); None when no row fits. The copy count is added as `replicas`."""
    fits = [r for r in rows if r.get("plan") and gpus % r["gpus"] == 0 and r["gpus"] <= gpus]
    if not fits:
        return None
    best = max(fits, key=lambda r: (r["tokens_per_s_per_gpu"], -r["gpus"]))
    return dict(best, replicas=gpus // best["gpus"], total_gpus=gpus)
