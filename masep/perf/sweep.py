"""Sweep: the best plan of each strategy over batch (at a fixed context) and over context (at a
fixed batch), plotted as TPOT and TPS, plus where separation wins and by how much.

For every point and strategy the planner's exact search picks the best plan of that strategy
(its m, and for separated its attention:expert split and head-parallel width); `speedup` is
the best baseline's TPOT (tp_pp or ep, whichever is faster there) over separated's, so > 1
means separation wins. Points where no plan of a strategy fits in memory have an `error`.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from .costmodel import Workload, describe, plan_to_dict
from .hardware import Hardware
from .planner import search

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DEFAULT_CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
SWEEP_STRATEGIES = ("tp_pp", "ep", "separated")
BASELINES = ("tp_pp", "ep")


def _split(plan) -> str | None:
    if plan.strategy != "separated":
        return None
    return f"{plan.num_attention_ranks}:{plan.expert_ranks}"


def sweep_point(cfg: ModelConfig, hw: Hardware, gpus: int, work: Workload, strategies=SWEEP_STRATEGIES,
                max_microbatches: int = 8, overlap: bool = True) -> dict:
    row: dict = {"batch": work.batch, "context": work.context}
    for s in strategies:
        res = search(cfg, hw, gpus, work, strategies=(s,), top=1, max_microbatches=max_microbatches, overlap=overlap)
        if not res.ranked:
            row[s] = {"error": res.no_plan_message()}
            continue
        sim = res.best
        row[s] = {"plan": describe(sim.plan), "plan_fields": plan_to_dict(sim.plan), "tpot_ms": sim.tpot_s * 1e3,
                  "tps": sim.tps, "floor_ms": sim.floor_s * 1e3, "mbu": sim.mbu,
                  "attention_to_experts": _split(sim.plan)}
    base = [row[b]["tpot_ms"] for b in BASELINES if b in row and "tpot_ms" in row[b]]
    if base and "tpot_ms" in row.get("separated", {}):
        row["speedup"] = min(base) / row["separated"]["tpot_ms"]
    return row


def run_sweep(cfg: ModelConfig, hw: Hardware, gpus: int, *, batch: int, context: int, batches=DEFAULT_BATCHES,
              contexts=DEFAULT_CONTEXTS, lm_head: bool = True, strategies=SWEEP_STRATEGIES, max_microbatches: int = 8,
              overlap: bool = True, progress=None) -> dict:
    doc = {"model": cfg.name, "hardware": hw.name, "hardware_source": hw.source, "gpus": gpus,
           "fixed_batch": batch, "fixed_context": context, "lm_head": lm_head, "overlap": overlap,
           "strategies": list(strategies), "over_batch": [], "over_context": []}
    for axis, values in (("over_batch", batches), ("over_context", contexts)):
        for v in values:
            work = Workload(v, context, lm_head) if axis == "over_batch" else Workload(batch, v, lm_head)
            doc[axis].append(sweep_point(cfg, hw, gpus, work, strategies, max_microbatches, overlap))
            if progress:
                progress(axis, v)
    return doc


def _plot_axis(rows: list[dict], x_key: str, strategies, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    xs = [r[x_key] for r in rows]
    for s in strategies:
        pts = [(r[x_key], r[s]["tpot_ms"], r[s]["tps"]) for r in rows if "tpot_ms" in r.get(s, {})]
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=s)
    sep = [(r[x_key], r["speedup"], r["separated"]["attention_to_experts"]) for r in rows if "speedup" in r]
    if sep:
        axes[2].plot([p[0] for p in sep], [p[1] for p in sep], marker="o", color="black")
        for x, y, label in sep:
            axes[2].annotate(label, (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    axes[2].axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    for ax, ylabel in zip(axes, ("simulated TPOT (ms)", "tokens/s", "best baseline TPOT / separated TPOT")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if xs:
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs], fontsize=7, rotation=45)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].legend()
    axes[2].set_title("> 1: separation wins (labels: best attention:expert GPUs)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep(doc: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "sweep.json"
    data.write_text(json.dumps(doc, indent=1))
    head = f"{doc['model']} on {doc['gpus']} x {doc['hardware']}, best plan per strategy (simulated decode step)"
    by_batch, by_context = out / "sweep_batch.png", out / "sweep_context.png"
    _plot_axis(doc["over_batch"], "batch", doc["strategies"], f"{head}, context {doc['fixed_context']}", by_batch)
    _plot_axis(doc["over_context"], "context", doc["strategies"], f"{head}, batch {doc['fixed_batch']}", by_context)
    return [data, by_batch, by_context]


def summary_lines(doc: dict) -> list[str]:
    lines = []
    for axis, key in (("over_batch", "batch"), ("over_context", "context")):
        fixed = f"context {doc['fixed_context']}" if key == "batch" else f"batch {doc['fixed_batch']}"
        lines.append(f"{key:>8} ({fixed})  " + "  ".join(f"{s:>22}" for s in doc["strategies"]) + "   speedup  split")
        for r in doc[axis]:
            cells = []
            for s in doc["strategies"]:
                c = r.get(s, {})
                cells.append(f"{c['plan']:>13} {c['tpot_ms']:7.3f}ms" if "tpot_ms" in c else f"{'does not fit':>22}")
            sp = f"{r['speedup']:8.2f}x" if "speedup" in r else f"{'-':>9}"
            split = r.get("separated", {}).get("attention_to_experts") or "-"
            lines.append(f"{r[key]:>8}  {'':>{len(fixed) + 2}}" + "  ".join(cells) + f"  {sp}  {split}")
    return lines
