"""What every PNG masep writes shares: the matplotlib check the plotting commands run before
computing anything, a figure that never touches a display, and tick labels a reader can read.

matplotlib is optional (the `plot` extra). Figures are built with `matplotlib.figure.Figure`
directly, not pyplot: no backend is switched and no global figure list grows, so plotting from a
server, a test or a notebook leaves the caller's matplotlib state alone.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

INSTALL_HINT = "pip install matplotlib (from a checkout: pip install -e '.[plot]')"


class PlottingUnavailable(ValueError):
    """matplotlib is missing. A ValueError so that the CLI's usual error path prints it and exits 2."""


def require_matplotlib(command: str) -> None:
    """Fail at once, before any computation, when `command` would end by drawing a PNG without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlottingUnavailable(f"{command} draws PNG plots and needs matplotlib, which is not installed in "
                                  f"this Python; install it with: {INSTALL_HINT}") from None


def new_figure(width: float, height: float):
    """A constrained-layout figure (labels and outside legends are fitted inside it) on its own Agg
    canvas: drawn and saved without a display or pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def count_label(v: float) -> str:
    """Sizes that are powers of two (batch, context): 512, 2k, 32k, 1M with k = 1024; other values plain
    below 10,000 and in decimal k above it."""
    v = float(v)
    if v >= 1 << 20 and v % (1 << 20) == 0:
        return f"{int(v) >> 20}M"
    if v >= 1024 and v % 1024 == 0:
        return f"{int(v) >> 10}k"
    if v < 10_000:
        return f"{v:g}"
    return rate_label(v)


def rate_label(v: float) -> str:
    """Decimal magnitudes (tokens/s): 800, 2k, 15k, 1.2M."""
    v = float(v)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def plain_label(v: float) -> str:
    """Small decimal values (milliseconds, ratios): 0.5, 2, 30."""
    return f"{float(v):.3g}"


def thin_out(values: Sequence[float], most: int) -> list[float]:
    """At most `most` of `values`, evenly spaced, always keeping the first and the last."""
    values = list(values)
    if len(values) <= most:
        return values
    step = math.ceil((len(values) - 1) / (most - 1))
    keep = values[::step]
    if keep[-1] != values[-1]:
        keep[-1] = values[-1]
    return keep


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick positions for a log axis from lo to hi: round linear steps (2k 4k 6k ...) within about a
    decade, 1-2-5 mantissas over a few decades, fewer as the range widens; always at least two."""
    from matplotlib.ticker import MaxNLocator
    lo, hi = min(lo, hi), max(lo, hi)
    if lo <= 0:
        raise ValueError(f"log axis from {lo} to {hi}: needs positive limits")
    decades = math.log10(hi / lo)
    inside = [lo * (1 - 1e-9), hi * (1 + 1e-9)]
    if decades <= 1.0:
        ticks = [float(t) for t in MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)]
        ticks = [t for t in ticks if inside[0] <= t <= inside[1]]
        if len(ticks) >= 2:
            return ticks
    for subs, widest in (((1, 2, 5), 2.8), ((1, 3), 4.5), ((1,), math.inf)):
        if decades > widest:
            continue
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in subs]
        ticks = [t for t in ticks if inside[0] <= t <= inside[1]]
        if len(ticks) >= 2:
            return ticks
    return [lo, hi]


def readable_log_axis(ax, which: str, label: Callable[[float], str]) -> None:
    """Replace matplotlib's 2x10^0-style log labels on `which` ("x" or "y") by plain ones from `label`,
    at log_ticks positions over the current limits; the minor ticks stay, unlabelled."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter
    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    axis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: label(v)))
    axis.set_minor_locator(LogLocator(subs="all"))
    axis.set_minor_formatter(NullFormatter())


def span_text(ids: Iterable[int], most: int = 6) -> str:
    """0-7 for a run, 0,2,5 for scattered ids, 0,1,2,... (24) for long scattered lists."""
    ids = list(ids)
    if not ids:
        return "none"
    if len(ids) > 1 and ids == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}-{ids[-1]}"
    if len(ids) <= most:
        return ",".join(map(str, ids))
    return ",".join(map(str, ids[:most])) + f",... ({len(ids)})"


def overlapping_texts(fig, texts) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty text artists whose boxes overlap, as last drawn (fig.canvas.draw() first)."""
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text()]
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]
