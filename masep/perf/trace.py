"""A simulation as a Chrome trace (torch.profiler's export format) and as a PNG Gantt chart.

Trace: {"traceEvents": [...], "displayTimeUnit": "ms"}; one complete event ("ph": "X") per op
with ts/dur in microseconds, pid = GPU (rank), tid = stream (0 compute, 1 comm, 2 expert outputs back), and metadata
events ("ph": "M") naming processes and threads, as torch.profiler writes them. Open it in
chrome://tracing or https://ui.perfetto.dev next to a real run's trace.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..plotting import new_figure, span_text
from .costmodel import describe, rank_role
from .simulator import Simulation

STREAM_NAMES = {0: "compute", 1: "comm", 2: "comm (expert outputs back)"}
LANE_NAMES = {1: "comm stream", 2: "comm stream of the expert outputs back"}
COLORS = {"attention": "#4C72B0", "experts": "#DD8452", "head": "#8172B3", "dispatch": "#55A868",
          "recv": "#55A868", "combine": "#C44E52", "send": "#C44E52", "allreduce": "#937860",
          "send_act": "#64B5CD", "recv_act": "#64B5CD"}


def chrome_trace(sim: Simulation) -> dict:
    events: list[dict] = []
    for rank in range(sim.num_gpus):
        role = rank_role(sim.plan, sim.cfg, rank)
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0,
                       "args": {"name": f"GPU {rank} ({role.kind})"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for tid, name in STREAM_NAMES.items():
            events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": name}})
    for r in sim.records:
        c = r.cost
        events.append({
            "ph": "X", "cat": "comm" if r.stream else "kernel", "name": r.name, "pid": r.rank, "tid": r.stream,
            "ts": round(r.start * 1e6, 4), "dur": round((r.end - r.start) * 1e6, 4),
            "args": {"compute_us": round(c.compute_s * 1e6, 3), "transfer_us": round(c.transfer_s * 1e6, 3),
                     "wait_us": round(max(0.0, r.end - r.start - c.time_s) * 1e6, 3),
                     "hbm_bytes": int(c.hbm_bytes), "flops": int(c.flops), "link_bytes": int(c.link_bytes)}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"source": "masep.perf.simulator", "plan": describe(sim.plan), "hardware": sim.hw.name,
                          "batch": sim.work.batch, "context": sim.work.context, "tpot_ms": sim.tpot_s * 1e3}}


def write_trace(sim: Simulation, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(sim)))
    return path


# Micro-batch i is drawn with hatch MB_HATCHES[i % len]: micro-batch 0 plain, the next ones striped.
MB_HATCHES = ("", "////", "\\\\\\\\", "xxxx", "....", "||||", "----", "++++")


def row_label(sim: Simulation, rank: int) -> str:
    """What GPU `rank` does, in full: "GPU 0 attention replica 0, heads 0-7", "GPU 12 experts 0-3"."""
    role = rank_role(sim.plan, sim.cfg, rank)
    if role.kind == "attention":
        return f"GPU {rank} attention replica {role.replica}, heads {span_text(role.heads)}"
    if role.kind == "expert":
        return f"GPU {rank} experts {span_text(role.experts)}"
    if role.kind == "stage":
        return f"GPU {rank} PP stage {role.replica}, TP rank {role.index}"
    if role.kind == "colocated":
        return f"GPU {rank} attention + experts {span_text(role.experts)}"
    return f"GPU {rank} {role.kind}"


def _lanes(streams: list[int]) -> dict[int, tuple[float, float]]:
    """(offset from the row centre, height) of each stream's bars; y grows downwards. Compute (stream 0)
    is the thick top lane, the comm streams share the thin lanes beneath it."""
    lanes = {0: (-0.40, 0.40)}
    comm = [s for s in streams if s != 0]
    if comm:
        h = (0.36 - 0.02 * (len(comm) - 1)) / len(comm)
        for i, s in enumerate(comm):
            lanes[s] = (0.04 + i * (h + 0.02), h)
    return lanes


def gantt_png(sim: Simulation, path: str | Path, title: str | None = None) -> Path:
    """gantt_figure as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gantt_figure(sim, title).savefig(path, dpi=110)
    return path


def gantt_figure(sim: Simulation, title: str | None = None):
    """One row per GPU, GPU 0 on top: the compute stream as a thick bar, each comm stream (which
    includes waiting for peers) as a thin bar beneath it. Colour: the op; hatch: the micro-batch."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = sim.num_gpus
    labels = [row_label(sim, r) for r in range(n)]
    streams = sorted({r.stream for r in sim.records} | {0})
    lanes = _lanes(streams)
    mbs = sorted({r.op.mb for r in sim.records if r.op.mb >= 0})
    fig = new_figure(15, max(1.8 + 0.42 * n, 0.8 + 0.2 * (len(mbs) + 15)))  # tall enough for the legend
    ax = fig.subplots()
    groups: dict[tuple, list] = {}  # one bar collection per (stream, kind, micro-batch)
    for r in sim.records:
        groups.setdefault((r.stream, r.op.kind, max(r.op.mb, 0)), []).append(r)
    for (stream, kind, mb), recs in sorted(groups.items()):
        off, h = lanes[stream]
        hatch = MB_HATCHES[mb % len(MB_HATCHES)] if len(mbs) > 1 else ""
        bars = dict(y=[r.rank + off for r in recs], width=[(r.end - r.start) * 1e3 for r in recs], height=h,
                    left=[r.start * 1e3 for r in recs], align="edge")
        # white edges keep back-to-back ops apart; the hatch, drawn in the edge colour, needs a second pass
        ax.barh(**bars, color=COLORS.get(kind, "#999999"), alpha=1.0 if stream == 0 else 0.6, edgecolor="white",
                linewidth=0.6)
        if hatch:
            ax.barh(**bars, color="none", edgecolor="#333333", linewidth=0, hatch=hatch, gid=f"mb{mb}")
    ax.set_yticks(range(n), [lb for lb in labels], fontsize=8)
    ax.set_ylim(n - 0.45, -0.55)
    ax.set_xlim(0, sim.tpot_s * 1e3 * 1.01)
    ax.set_xlabel("time within one decode step (ms)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)

    by_colour: dict[str, list[str]] = {}  # one entry per colour: "dispatch / recv", "combine / send"
    for k in sorted({r.op.kind for r in sim.records}):
        by_colour.setdefault(COLORS.get(k, "#999999"), []).append(k)
    sections = [("op (colour)", [Patch(facecolor=c, label=" / ".join(ks)) for c, ks in by_colour.items()])]
    if len(mbs) > 1:
        sections.append((f"micro-batch (hatch), m = {len(mbs)}",
                         [Patch(facecolor="white", edgecolor="#333333", hatch=MB_HATCHES[mb % len(MB_HATCHES)] or None,
                                label=f"micro-batch {mb}") for mb in mbs]))
    lanes_legend = [Line2D([], [], color="#777777", linewidth=8, solid_capstyle="butt", label="thick: compute stream")]
    for i, s in enumerate(streams[1:]):
        lanes_legend.append(Line2D([], [], color="#777777", alpha=0.6, linewidth=8 * lanes[s][1] / 0.40,
                                   solid_capstyle="butt", label=f"{('thin', '2nd thin', '3rd thin')[min(i, 2)]}: "
                                   f"{LANE_NAMES.get(s, f'stream {s}')}"))
    sections.append(("bars in each row (comm includes waiting)", lanes_legend))
    handles, headings = [], []
    for heading, entries in sections:  # one legend, a bold heading above each section
        headings.append(len(handles))
        handles += [Patch(visible=False, label=heading), *entries]
    leg = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, handleheight=1.5,
                    borderaxespad=0, frameon=False)
    for i in headings:
        leg.get_texts()[i].set_fontweight("bold")
    ax.set_title(title or f"Simulated decode step: {describe(sim.plan)} on {n} x {sim.hw.name}, batch "
                 f"{sim.work.batch}, context {sim.work.context} -> TPOT {sim.tpot_s * 1e3:.3f} ms", fontsize=10)
    return fig
