"""Re-planning: refit the cost model to a run's measured per-op times, propose a better plan when
the predicted gain passes a threshold (the MA Separation paper's "dynamic adjustment based on
execution time predictions").

Measured file (JSON), any of:
  - `masep bench dist --json` (its one row, with meta): plan, preset, dtype, batch, context, device,
    median_tpot_ms, busy_ms_per_step {rank: {op kind: ms}} (decode steps at `context`: the best input);
  - `masep run --json` (distributed; its one row, with meta): plan, config {batch, prompt_len,
    max_new_tokens}, model, busy [{rank, role, busy_ms}] over the timed round (prefill included:
    approximate);
  - by hand: {"plan": "sep 12x1+4 m2" (the plan notation) or {"strategy": "separated", "attn_replicas": 12, ...},
    "preset": "paper",
    "hardware": "a100-80g", "batch": 24, "context": 2048, "steps": 10,
    "busy_s": {"0": {"attention": 0.0123, ...}, ...}  (seconds summed over `steps` steps), or
    "measurements": [{"op": "attention", "rank": 0, "measured_ms": 0.31}, ...]  (per op)}.

Every measured file must say how its times were taken: `"timing": "cuda_events"` (CUDA events
recorded on the GPU's streams). Anything else is refused, files without the field included
(`"host_clock"`, as `masep bench dist` writes today, and `masep run --json`, which records no
source): a host clock around a step also counts kernel launches, host synchronisation and Python,
which are not the op's cost, so a refit to them would move the cost model by the engine's overhead.

Refit: for each compute op kind (attention, experts, head), factor = measured seconds / predicted
seconds over every rank that reports it (busy_s: per step; measurements: per op, matched by rank
and kind). The kind's efficiency is divided by the factor and its fixed latency multiplied by it,
so the refit model predicts exactly the measured op times. Communication ops are not refit:
their wall times include waiting for peers (a rank's recv is as long as the slowest sender),
which says nothing about the link.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig, preset
from ..files import read_json
from ..plan import parse_plan
from .costmodel import Workload, describe, plan_from_dict, plan_to_dict
from .hardware import COMPUTE_KINDS, Hardware
from .planner import search
from .simulator import all_costs, rank_ops, simulate


@dataclass
class Measured:
    plan: object
    cfg: ModelConfig
    work: Workload
    hardware: str | None
    steps: int
    busy_s: dict[int, dict[str, float]]
    measurements: list[dict]
    tpot_ms: float | None
    note: str = ""


def _model(doc: dict, source: str) -> ModelConfig:
    conf = doc.get("config", {})
    raw = doc.get("model") or conf.get("model")
    if isinstance(raw, dict):
        cfg = ModelConfig(**{k: v for k, v in raw.items() if k in ModelConfig.__dataclass_fields__})
    else:
        name = doc.get("preset") or conf.get("model_source", {}).get("preset")
        if not name:
            raise ValueError(f"{source}: needs `preset` or a `model` table of ModelConfig fields")
        cfg = preset(name)
    dtype = doc.get("dtype") or conf.get("dtype")
    return cfg.replace(dtype=dtype) if dtype else cfg


def hardware_from_device(name: str | None) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'h100' (None when the device is not a known GPU)."""
    text = (name or "").lower()
    for key, profile in (("h200", "h200"), ("h100", "h100"), ("a100", "a100-80g")):
        if key in text:
            return profile
    return None


def _busy(doc: dict) -> tuple[dict[int, dict[str, float]], int, str]:
    """Per-rank busy seconds by op kind, the steps they sum over, and a note on their quality."""
    if "busy_s" in doc:  # this module's own format
        return ({int(r): {k: float(v) for k, v in kinds.items()} for r, kinds in doc["busy_s"].items()},
                int(doc.get("steps", 1)), "")
    if "busy_ms_per_step" in doc:  # `masep bench dist`: decode steps at `context`
        return ({int(r): {k: v * 1e-3 for k, v in kinds.items()} for r, kinds in doc["busy_ms_per_step"].items()},
                1, "")
    if "busy" in doc:  # `masep run --json`: the timed round, prefill included
        steps = int(doc.get("config", {}).get("max_new_tokens", 1))
        return ({int(row["rank"]): {k: v * 1e-3 for k, v in row["busy_ms"].items()} for row in doc["busy"]}, steps,
                "busy times of `masep run` include the prefill: the refit over-estimates decode op times")
    return {}, 1, ""


def flatten_document(doc: dict, source: str = "measured") -> dict:
    """A `--json` document of masep (masep/report.py: {"meta", "rows"}) with one row -> the row
    with the meta fields it lacks, `hardware` as a profile name; any other JSON unchanged."""
    if not (isinstance(doc.get("meta"), dict) and isinstance(doc.get("rows"), list)):
        return doc
    if len(doc["rows"]) != 1:
        raise ValueError(f"{source}: a document of {len(doc['rows'])} rows; replan reads one measured run "
                         "(`masep run --json` or `masep bench dist --json` of one plan)")
    meta = dict(doc["meta"])
    hw = meta.pop("hardware", None) or {}
    flat = {**meta, **doc["rows"][0]}
    flat["hardware"] = hw.get("profile") or hardware_from_device(hw.get("device_name"))
    flat.setdefault("device", hw.get("device_name"))
    return flat


TIMING_FIELD, CUDA_EVENTS = "timing", "cuda_events"


def check_timing(doc: dict, source: str) -> None:
    """ValueError unless the document says its times come from CUDA events (module docstring)."""
    timing = doc.get(TIMING_FIELD)
    if timing == CUDA_EVENTS:
        return
    what = (f"has no `{TIMING_FIELD}` field, so how its times were taken is unknown (`masep run --json` records "
            "none)" if timing is None else f"says `{TIMING_FIELD}: {timing!r}`")
    raise ValueError(f"{source} {what}; replan refits the cost model only to times taken with CUDA events "
                     f"(`\"{TIMING_FIELD}\": \"{CUDA_EVENTS}\"`): host-clock times include launch and "
                     "synchronisation overhead that is not the ops' cost. Measure with CUDA events, or write "
                     "the per-op times by hand with that field")


def parse_measured(doc: dict, source: str = "measured") -> Measured:
    doc = flatten_document(doc, source)
    check_timing(doc, source)
    if not isinstance(doc.get("plan"), (dict, str)):
        raise ValueError(f"{source}: needs a `plan`: the plan notation ('sep 12x1+4 m2') or an object with a "
                         "`strategy` field")
    cfg = _model(doc, source)
    conf = doc.get("config", {})
    batch = doc.get("batch", conf.get("batch"))
    context = doc.get("context")
    if context is None and "prompt_len" in conf:  # mean keys attended over the generated tokens
        context = conf["prompt_len"] + conf.get("max_new_tokens", 0) // 2
    if batch is None or context is None:
        raise ValueError(f"{source}: needs `batch` and `context`")
    busy, steps, note = _busy(doc)
    meas = list(doc.get("measurements", []))
    if not busy and not meas:
        raise ValueError(f"{source}: needs per-rank busy times by op kind (`busy_s`, `busy_ms_per_step` or "
                         "`busy`) or per-op `measurements`")
    if steps < 1:
        raise ValueError(f"{source}: steps={steps}: must be >= 1")
    tpot = next((doc[k] for k in ("tpot_ms", "median_tpot_ms", "tpot_ms_median") if doc.get(k) is not None), None)
    hardware = doc.get("hardware") or hardware_from_device(doc.get("device") or conf.get("device_name"))
    plan = parse_plan(doc["plan"]) if isinstance(doc["plan"], str) else plan_from_dict(doc["plan"])
    return Measured(plan, cfg, Workload(int(batch), int(context)), hardware,
                    steps, busy, meas, tpot, note)


def load_measured(path: str | Path) -> Measured:
    return parse_measured(read_json(path, "--measured"), str(path))


def _predicted(m: Measured, hw: Hardware) -> dict[tuple[int, str], tuple[float, int]]:
    """(rank, kind) -> (predicted compute seconds per step, ops per step)."""
    out: dict[tuple[int, str], tuple[float, int]] = {}
    costs = all_costs(m.plan, m.cfg, m.work, hw)
    for rank, rank_cost in enumerate(costs):
        for op, c in zip(rank_ops(m.plan, m.cfg, rank), rank_cost):
            if op.kind in COMPUTE_KINDS:
                t, n = out.get((rank, op.kind), (0.0, 0))
                out[rank, op.kind] = (t + c.compute_s, n + 1)
    return out


def refit_factors(m: Measured, hw: Hardware) -> dict[str, float]:
    """measured / predicted seconds per compute op kind."""
    pred = _predicted(m, hw)
    meas_sum: dict[str, float] = {}
    pred_sum: dict[str, float] = {}
    for rank, kinds in m.busy_s.items():
        for kind, seconds in kinds.items():
            if kind in COMPUTE_KINDS and (rank, kind) in pred:
                meas_sum[kind] = meas_sum.get(kind, 0.0) + seconds / m.steps
                pred_sum[kind] = pred_sum.get(kind, 0.0) + pred[rank, kind][0]
    for row in m.measurements:
        kind, rank = row.get("op"), row.get("rank")
        if kind in COMPUTE_KINDS and (rank, kind) in pred and row.get("measured_ms") is not None:
            t, n = pred[rank, kind]
            meas_sum[kind] = meas_sum.get(kind, 0.0) + row["measured_ms"] * 1e-3
            pred_sum[kind] = pred_sum.get(kind, 0.0) + t / n
    return {k: meas_sum[k] / pred_sum[k] for k in sorted(meas_sum) if pred_sum[k] > 0}


def refit(hw: Hardware, factors: dict[str, float]) -> Hardware:
    eff, lat = dict(hw.op_efficiency), dict(hw.op_latency_s)
    for kind, f in factors.items():
        eff[kind] = eff.get(kind, 1.0) / f
        lat[kind] = lat.get(kind, 0.0) * f
    return hw.replace(op_efficiency=eff, op_latency_s=lat, source=f"{hw.source} + refit to measured op times")


def replan(m: Measured, hw: Hardware, threshold: float, gpus: int | None = None, max_microbatches: int = 4) -> dict:
    """Refit, re-predict the running plan, search the best plan under the refit model, and say
    whether switching is worth it: gain = 1 - best TPOT / current TPOT > threshold."""
    if not 0 <= threshold < 1:
        raise ValueError(f"--threshold {threshold}: must be in [0, 1) (a fraction of the current TPOT)")
    gpus = gpus or m.plan.world_size
    before = simulate(m.plan, m.cfg, m.work, hw)
    factors = refit_factors(m, hw)
    fitted = refit(hw, factors)
    current = simulate(m.plan, m.cfg, m.work, fitted)
    best = search(m.cfg, fitted, gpus, m.work, top=1, max_microbatches=max_microbatches).best
    gain = 1.0 - best.tpot_s / current.tpot_s
    switch = gain > threshold and describe(best.plan) != describe(m.plan)
    return dict(plan=describe(m.plan), plan_fields=plan_to_dict(m.plan), gpus=gpus, batch=m.work.batch,
                context=m.work.context, hardware=hw.name, measured_tpot_ms=m.tpot_ms, note=m.note,
                predicted_tpot_ms_before_refit=before.tpot_s * 1e3, refit_factors=factors,
                predicted_tpot_ms=current.tpot_s * 1e3, best_plan=describe(best.plan),
                best_plan_fields=plan_to_dict(best.plan), best_tpot_ms=best.tpot_s * 1e3, gain=gain,
                threshold=threshold, switch=switch,
                advice=(f"switch to {describe(best.plan)}: predicted {best.tpot_s * 1e3:.3f} ms vs "
                        f"{current.tpot_s * 1e3:.3f} ms ({gain:.1%} faster > {threshold:.0%})") if switch else
                (f"keep {describe(m.plan)}: the best plan under the refit model ({describe(best.plan)}) gains "
                 f"{max(gain, 0.0):.1%}, not more than {threshold:.0%}"))
