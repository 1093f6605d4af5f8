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
from ..plotting import count_label, new_figure, plain_label, rate_label, readable_log_axis, thin_out
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


# name in the legend, colour, marker: the same in every sweep plot
STRATEGY_STYLE = {"tp_pp": ("TP x PP (Megatron)", "#4C72B0", "s"), "ep": ("colocated EP", "#DD8452", "^"),
                  "separated": ("MA separated", "#55A868", "o")}
AXIS_TEXT = {"batch": "batch (sequences decoding together)", "context": "context (tokens each sequence attends to)"}


def _x_axis(ax, xs: list[int], key: str, splits: dict[int, str] | None = None) -> None:
    """log2 x axis with a tick at each swept value (at most 12), labelled 512, 2k, 32k; with `splits`,
    a second line under each tick names the best separated split there."""
    from matplotlib.ticker import NullLocator
    ax.set_xscale("log", base=2)
    ticks = thin_out(sorted(set(xs)), 12)
    labels = [count_label(x) + (f"\n{splits.get(x, '-')}" if splits is not None else "") for x in ticks]
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) == 1:  # one point: give it some room instead of a zero-width axis
        ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)
    text = AXIS_TEXT.get(key, key) + (", k = 1024" if any("k" in count_label(x) for x in ticks) else "")
    if splits is not None:
        text += "\nunder each value: the best separated split, attention:expert GPUs"
    ax.set_xlabel(text, fontsize=9)


def sweep_figure(rows: list[dict], x_key: str, strategies, title: str):
    """Three panels over `x_key` ("batch" or "context"): TPOT and tokens/s of each strategy's best
    plan, and separation's speedup over the best baseline with its attention:expert split."""
    from matplotlib.lines import Line2D

    fig = new_figure(17, 5.6)
    ax_tpot, ax_tps, ax_speed = fig.subplots(1, 3)
    xs = [r[x_key] for r in rows]
    handles = []
    for s in strategies:
        name, colour, marker = STRATEGY_STYLE.get(s, (s, None, "o"))
        pts = [(r[x_key], r[s]["tpot_ms"], r[s]["tps"]) for r in rows if "tpot_ms" in r.get(s, {})]
        if not pts:
            handles.append(Line2D([], [], color=colour, marker=marker, linestyle="none",
                                  label=f"{name}: no plan fits"))
            continue
        kw = dict(color=colour, marker=marker, markersize=5)
        ax_tpot.plot([p[0] for p in pts], [p[1] for p in pts], **kw)
        ax_tps.plot([p[0] for p in pts], [p[2] for p in pts], **kw)
        gaps = len(pts) < len(rows)
        handles.append(Line2D([], [], **kw, label=name + (" (gaps: no plan fits there)" if gaps else "")))
    ax_tpot.set_yscale("log")
    ax_tps.set_yscale("log")
    if ax_tpot.lines:
        readable_log_axis(ax_tpot, "y", plain_label)
        readable_log_axis(ax_tps, "y", rate_label)
    ax_tpot.set_ylabel("TPOT (ms per output token, log scale)")
    ax_tpot.set_title("time per output token (lower is better)", fontsize=10)
    ax_tps.set_ylabel("throughput (output tokens/s, log scale)")
    ax_tps.set_title("throughput (higher is better)", fontsize=10)

    sep = [(r[x_key], r["speedup"]) for r in rows if "speedup" in r]
    splits = {r[x_key]: r["separated"]["attention_to_experts"] for r in rows
              if r.get("separated", {}).get("attention_to_experts")}
    if sep:
        ax_speed.plot([p[0] for p in sep], [p[1] for p in sep], color="black", linewidth=1, zorder=2)
        ax_speed.scatter([p[0] for p in sep], [p[1] for p in sep], zorder=3, s=28,
                         c=["#55A868" if y > 1 else "#C44E52" for _, y in sep])
        lo, hi = min(1.0, *(p[1] for p in sep)), max(1.0, *(p[1] for p in sep))
        pad = 0.08 * (hi - lo) or 0.1
        ax_speed.set_ylim(lo - pad, hi + pad)
    ax_speed.axhline(1.0, color="gray", linestyle="--", linewidth=0.9)
    top = ax_speed.get_ylim()[1]
    if top > 1.0:
        ax_speed.axhspan(1.0, top, color="#55A868", alpha=0.08, linewidth=0)
        ax_speed.set_ylim(top=top)
    ax_speed.set_ylabel("speedup of separation (x)")
    ax_speed.set_title("best baseline TPOT / separated TPOT", fontsize=10)
    for ax in (ax_tpot, ax_tps):
        _x_axis(ax, xs, x_key)
    _x_axis(ax_speed, xs, x_key, splits)
    for ax in (ax_tpot, ax_tps, ax_speed):
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", axis="y", alpha=0.12)
    dot = dict(marker="o", linestyle="none", markersize=6)
    handles += [Line2D([], [], color="#55A868", **dot, label="speedup > 1: separation faster"),
                Line2D([], [], color="#C44E52", **dot, label="speedup < 1: a baseline faster"),
                Line2D([], [], color="gray", linestyle="--", label="break-even")]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


def write_sweep(doc: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "sweep.json"
    data.write_text(json.dumps(doc, indent=1))
    head = f"{doc['model']} on {doc['gpus']} x {doc['hardware']}, the best plan of each strategy"
    by_batch, by_context = out / "sweep_batch.png", out / "sweep_context.png"
    sweep_figure(doc["over_batch"], "batch", doc["strategies"], f"Simulated decode step over batch: {head}, "
                 f"context {doc['fixed_context']} tokens").savefig(by_batch, dpi=110)
    sweep_figure(doc["over_context"], "context", doc["strategies"], f"Simulated decode step over context: {head}, "
                 f"batch {doc['fixed_batch']} sequences").savefig(by_context, dpi=110)
    return [data, by_batch, by_context]


def summary_lines(doc: dict) -> list[str]:
    """Two tables (over batch, over context): each strategy's best plan and its TPOT, the speedup
    of separation and its split; columns sized to their widest cell."""
    lines = []
    plans = [c["plan"] for axis in ("over_batch", "over_context") for r in doc[axis] for c in r.values()
             if isinstance(c, dict) and "plan" in c]
    plan_w = max([len("does not fit"), *map(len, plans)])
    cell_w = plan_w + 9
    heads = [f"{s}: plan, TPOT ms" for s in doc["strategies"]]
    widths = [max(cell_w, len(h)) for h in heads]
    for axis, key in (("over_batch", "batch"), ("over_context", "context")):
        fixed = f"context {doc['fixed_context']}" if key == "batch" else f"batch {doc['fixed_batch']}"
        label = f"{key} ({fixed})"
        lines.append(f"{label}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths)) + "  speedup x  split A:E")
        for r in doc[axis]:
            cells = []
            for s, w in zip(doc["strategies"], widths):
                c = r.get(s, {})
                cell = f"{c['plan']:>{plan_w}} {c['tpot_ms']:8.3f}" if "tpot_ms" in c else "does not fit"
                cells.append(f"{cell:>{w}}")
            sp = f"{r['speedup']:8.2f}x" if "speedup" in r else f"{'-':>9}"
            split = r.get("separated", {}).get("attention_to_experts") or "-"
            lines.append(f"{r[key]:>{len(label)}}  " + "  ".join(cells) + f"  {sp}  {split}")
    return lines
