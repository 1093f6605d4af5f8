"""A simulation as a Chrome trace (torch.profiler's export format) and as a PNG Gantt chart.

Trace: {"traceEvents": [...], "displayTimeUnit": "ms"}; one complete event ("ph": "X") per op
with ts/dur in microseconds, pid = GPU (rank), tid = stream (0 compute, 1 comm, 2 expert outputs back), and metadata
events ("ph": "M") naming processes and threads, as torch.profiler writes them. Open it in
chrome://tracing or https://ui.perfetto.dev next to a real run's trace.
"""
from __future__ import annotations

import json
from pathlib import Path

from .costmodel import describe, rank_role
from .simulator import Simulation

STREAM_NAMES = {0: "compute", 1: "comm", 2: "comm (expert outputs back)"}
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


def gantt_png(sim: Simulation, path: str | Path, title: str | None = None) -> Path:
    """One row per GPU: compute ops as full bars, comm ops (including waiting for peers) as thin
    bars beneath them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = sim.num_gpus
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.38 * n))
    for r in sim.records:
        y = n - 1 - r.rank
        color = COLORS.get(r.op.kind, "#999999")
        if r.stream == 0:
            ax.broken_barh([(r.start * 1e3, (r.end - r.start) * 1e3)], (y - 0.05, 0.45), facecolors=color,
                           edgecolor="white", linewidth=0.3)
        else:
            ax.broken_barh([(r.start * 1e3, (r.end - r.start) * 1e3)], (y - 0.40, 0.25), facecolors=color,
                           alpha=0.55, edgecolor="none")
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"GPU {n - 1 - i} {rank_role(sim.plan, sim.cfg, n - 1 - i).kind[:4]}" for i in range(n)],
                       fontsize=7)
    ax.set_xlabel("time in step (ms)")
    ax.set_xlim(0, sim.tpot_s * 1e3 * 1.01)
    labels: dict[str, list[str]] = {}  # one legend entry per colour: "dispatch/recv", "combine/send"
    for k in sorted({r.op.kind for r in sim.records}):
        labels.setdefault(COLORS.get(k, "#999999"), []).append(k)
    ax.legend(handles=[Patch(color=c, label="/".join(ks)) for c, ks in labels.items()], fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.12 if n > 4 else -0.25), ncol=len(labels))
    ax.set_title(title or f"{describe(sim.plan)} on {n} x {sim.hw.name}, batch {sim.work.batch}, context "
                 f"{sim.work.context}: simulated TPOT {sim.tpot_s * 1e3:.3f} ms (thick: compute, thin: comm)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
