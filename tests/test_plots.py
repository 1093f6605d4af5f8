"""The PNGs masep draws, checked for what a reader needs: full labels, legends off the data and
the axis labels, micro-batches told apart, plain tick labels, no text drawn over other text; and
the plotting commands stopping at once, with the install command, when matplotlib is missing."""
from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("matplotlib")

from masep.config import preset  # noqa: E402
from masep.perf.costmodel import Workload  # noqa: E402
from masep.perf.hardware import get_profile  # noqa: E402
from masep.perf.simulator import simulate  # noqa: E402
from masep.perf.sweep import STRATEGY_STYLE, sweep_figure, write_sweep  # noqa: E402
from masep.perf.trace import MB_HATCHES, gantt_figure, gantt_png, row_label  # noqa: E402
from masep.plan import SeparatedPlan, TpPpPlan  # noqa: E402
from masep.plotting import (PlottingUnavailable, count_label, log_ticks, overlapping_texts,  # noqa: E402
                            require_matplotlib)
from masep.train.log import loss_figure, plot_losses  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _box(fig, artist):
    return artist.get_window_extent(fig.canvas.get_renderer())


def _inside_figure(fig, box) -> bool:
    f = fig.bbox
    return box.x0 >= f.x0 - 1 and box.x1 <= f.x1 + 1 and box.y0 >= f.y0 - 1 and box.y1 <= f.y1 + 1


def _texts(fig, ax, legend=None) -> list:
    texts = [*ax.get_yticklabels(), *ax.get_xticklabels(), ax.xaxis.label, ax.yaxis.label, ax.title]
    return texts + (list(legend.get_texts()) if legend is not None else [])


# --- matplotlib missing ---------------------------------------------------------------------------------------
def test_require_matplotlib_names_the_command_and_the_install(monkeypatch):
    require_matplotlib("masep sweep")  # installed here: no error
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(PlottingUnavailable, match=r"masep sweep .*pip install matplotlib"):
        require_matplotlib("masep sweep")


@pytest.mark.parametrize("argv, computes", [
    (["sweep", "--preset", "tiny", "--gpus", "2", "--out", "OUT"], "masep.perf.sweep.run_sweep"),
    (["simulate", "--preset", "tiny", "--gpus", "2", "--trace", "OUT"], "masep.perf.planner.seeds_table"),
])
def test_plotting_commands_stop_before_computing_without_matplotlib(monkeypatch, capsys, tmp_path, argv, computes):
    from masep.cli import main

    def must_not_run(*a, **k):
        raise AssertionError("computed before checking for matplotlib")
    monkeypatch.setattr(computes, must_not_run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([str(tmp_path) if a == "OUT" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "pip install matplotlib" in err and "[plot]" in err


# --- tick labels -------------------------------------------------------------------------------------------------
def test_count_labels_and_log_ticks_are_plain_numbers():
    assert [count_label(v) for v in (1, 512, 1024, 2048, 8192, 32768, 1 << 20, 24, 3000)] == \
        ["1", "512", "1k", "2k", "8k", "32k", "1M", "24", "3000"]
    assert log_ticks(1.7, 4.6) == [2.0, 2.5, 3.0, 3.5, 4.0, 4.5]  # within a decade: round linear steps
    assert log_ticks(0.7, 17) == [1, 2, 5, 10]
    assert len(log_ticks(5300, 17000)) >= 3
    assert log_ticks(1, 1e8)[:3] == [1, 10, 100]


# --- Gantt chart ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sep_m3():
    # tiny model, 2 head-parallel attention ranks + 1 expert rank, 3 micro-batches
    return simulate(SeparatedPlan(1, 2, 1, microbatches=3), preset("tiny"), Workload(6, 64), get_profile("a100-80g"))


def test_gantt_rows_legend_and_microbatches(sep_m3, tmp_path):
    sim = sep_m3
    fig = gantt_figure(sim)
    ax = fig.axes[0]
    fig.canvas.draw()
    # full row names, GPU 0 on top, nothing cut at the figure's edge
    names = [row_label(sim, r) for r in range(sim.num_gpus)]
    assert names[0] == "GPU 0 attention replica 0, heads " + names[0].rsplit(" ", 1)[1]
    assert names[2].startswith("GPU 2 experts ")
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert all(_inside_figure(fig, _box(fig, t)) for t in ax.get_yticklabels())
    top, bottom = ax.get_ylim()
    assert top > bottom  # inverted: row 0 drawn highest
    # the legend sits right of the plot, inside the figure, and covers no axis text
    leg = ax.get_legend()
    lb, axb = _box(fig, leg), ax.get_window_extent()
    assert lb.x0 >= axb.x1 and _inside_figure(fig, lb)
    assert not lb.overlaps(_box(fig, ax.xaxis.label))
    # one hatch per micro-batch on the bars, and a legend entry for each
    hatches = {p.get_hatch() for p in ax.patches if (p.get_gid() or "").startswith("mb")}
    assert len(hatches | {""}) == 3 and hatches <= set(MB_HATCHES)
    labels = [t.get_text() for t in leg.get_texts()]
    assert [lb for lb in labels if lb.startswith("micro-batch ")] == \
        ["micro-batch (hatch), m = 3", "micro-batch 0", "micro-batch 1", "micro-batch 2"]
    assert "ms" in ax.get_xlabel() and "TPOT" in ax.get_title()
    assert not overlapping_texts(fig, _texts(fig, ax, leg))
    assert gantt_png(sim, tmp_path / "g.png").read_bytes()[:8] == PNG


def test_gantt_without_microbatches_has_no_hatch_legend():
    sim = simulate(TpPpPlan(2, 1, 1), preset("tiny"), Workload(4, 64), get_profile("a100-80g"))
    fig = gantt_figure(sim)
    ax = fig.axes[0]
    assert not any(p.get_hatch() for p in ax.patches)
    assert not any(t.get_text().startswith("micro-batch") for t in ax.get_legend().get_texts())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["GPU 0 PP stage 0, TP rank 0", "GPU 1 PP stage 0, TP rank 1"]


# --- sweep ---------------------------------------------------------------------------------------------------------
def _row(key, x, fits=True):
    row = {key: x}
    for i, s in enumerate(STRATEGY_STYLE):
        if s == "tp_pp" and not fits:
            row[s] = {"error": "does not fit"}
            continue
        tpot = 1.5 + 0.0001 * x * (1 + i / 3)
        row[s] = {"plan": s, "tpot_ms": tpot, "tps": 24 / tpot * 1e3, "attention_to_experts": "12:4" if s == "separated"
                  else None}
    row["speedup"] = min(row[b]["tpot_ms"] for b in ("tp_pp", "ep") if "tpot_ms" in row[b]) / row["separated"]["tpot_ms"]
    return row


def test_sweep_context_ticks_legend_and_splits(tmp_path):
    contexts = [512, 1024, 2048, 4096, 8192, 16384, 32768]
    rows = [_row("context", c, fits=c < 32768) for c in contexts]
    fig = sweep_figure(rows, "context", list(STRATEGY_STYLE), "a title")
    fig.canvas.draw()
    tpot, tps, speed = fig.axes
    for ax in fig.axes:
        assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == \
            ["512", "1k", "2k", "4k", "8k", "16k", "32k"]
        assert not overlapping_texts(fig, ax.get_xticklabels())
        assert not overlapping_texts(fig, [ax.xaxis.label, *ax.get_xticklabels()])
    # plain numbers on the log y axes, at least two of them, with units in the axis labels
    for ax in (tpot, tps):
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert len(labels) >= 2 and not any("^" in lb or "$" in lb or "e+" in lb for lb in labels)
    assert "ms" in tpot.get_ylabel() and "tokens/s" in tps.get_ylabel()
    # the speedup panel names the split under each value
    assert [t.get_text().split("\n")[1] for t in speed.get_xticklabels()] == ["12:4"] * 7
    # the legend is below all three panels, with their axis labels, and clear of the title
    leg = fig.legends[0]
    lb = _box(fig, leg)
    assert _inside_figure(fig, lb)
    for ax in fig.axes:
        assert not lb.overlaps(ax.get_tightbbox(fig.canvas.get_renderer()))
    assert not lb.overlaps(_box(fig, fig._suptitle))
    assert any("gaps" in t.get_text() for t in leg.get_texts())  # tp_pp misses 32k
    doc = {"model": "tiny", "gpus": 4, "hardware": "a100-80g", "fixed_batch": 8, "fixed_context": 2048,
           "strategies": list(STRATEGY_STYLE), "over_batch": [_row("batch", b) for b in (1, 8, 64)],
           "over_context": rows}
    files = write_sweep(doc, tmp_path)
    assert [f.name for f in files] == ["sweep.json", "sweep_batch.png", "sweep_context.png"]
    assert all(f.read_bytes()[:8] == PNG for f in files[1:])


# --- training loss -------------------------------------------------------------------------------------------------
def test_loss_plot_resumed_and_skipped_steps(tmp_path):
    rows = [{"step": s, "loss": 5 - s / 10 + 0.02, "token_loss": 5 - s / 10, "balance_loss": 0.02, "z_loss": 0.0,
             "skipped": s == 4} for s in [*range(1, 9), *range(6, 13)]]  # resumed from step 5
    fig = loss_figure(rows)
    ax, ax_router = fig.axes
    fig.canvas.draw()
    assert len([ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata()) > 2]) == 2
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "resumed here" in labels and "skipped step (overflow)" in labels
    for a in (ax, ax_router):
        assert _box(fig, a.get_legend()).x0 >= a.get_window_extent().x1
        assert _inside_figure(fig, _box(fig, a.get_legend()))
    assert "nats" in ax.get_ylabel() and ax.get_title()
    log = tmp_path / "train.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_losses(log, tmp_path / "loss.png").read_bytes()[:8] == PNG


def test_loss_plot_of_a_short_run_has_whole_steps():
    rows = [{"step": s, "loss": 8 - s / 4, "token_loss": 8 - s / 4 - 0.02, "balance_loss": 0.02} for s in range(1, 6)]
    fig = loss_figure(rows)
    fig.canvas.draw()
    ticks = [t for t in fig.axes[1].get_xticks() if 1 <= t <= 5]
    assert ticks and all(float(t).is_integer() for t in ticks)
