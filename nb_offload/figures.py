"""plotly figures for what a person would rather look at than read: a trace's timeline, the link and
drive rates over a run, bytes per tier per token, and tok/s against the GPU budget.

plotly is imported when a figure is made (``pip install 'nb_offload[notebook]'``); the live dashboard
keeps its own canvas timeline, which redraws faster.
"""

from __future__ import annotations

from .errors import OffloadError
from .trace import IDLE, choose_runs, collapse_idle, split_runs
from .views import LANE_COLORS, TIER_COLORS

GB = 1e9


def _plotly():
    try:
        import plotly.graph_objects as go
    except ImportError as exc:
        raise OffloadError(f"figures need plotly ({exc}); pip install 'nb_offload[notebook]'.") from exc
    return go


def _chosen_runs(trace, runs, idle):
    return choose_runs(split_runs(list(trace), idle), runs)


def timeline_figure(trace, runs="last", idle: float = IDLE, title: str = ""):
    """One lane per kind of event (reads, copies, compute, whole steps), a bar per event, in ms.
    ``runs``: "last" (the latest generate or cell), "all", or how many of the latest; the idle time
    between runs is cut out and each join marked with a dotted line."""
    go = _plotly()
    chosen = _chosen_runs(trace, runs, idle)
    placed, joins = collapse_idle(chosen)
    fig = go.Figure()
    for lane, color in LANE_COLORS.items():
        mine = [(e, a, b) for e, a, b in placed if e.kind == lane]
        if not mine:
            continue
        fig.add_trace(go.Bar(
            name=lane, orientation="h", y=[lane] * len(mine), base=[a * 1e3 for _, a, _ in mine],
            x=[max((b - a) * 1e3, 1e-3) for _, a, b in mine], marker_color=color,
            hovertext=[f"{e.unit} · {(b - a) * 1e3:.2f} ms" + (f" · {e.bytes / 2**20:.1f} MiB" if e.bytes else "")
                       for e, a, b in mine], hoverinfo="text"))
    for x in joins:
        fig.add_vline(x=x * 1e3, line_dash="dot", line_color="#999")
    n = len(chosen)
    fig.update_layout(title=title or (f"timeline: {n} run{'s' if n != 1 else ''}, idle time between them cut out"
                                      if n > 1 else "timeline: the last run"),
                      xaxis_title="ms", barmode="overlay", height=260, margin=dict(l=70, r=20, t=40, b=40),
                      yaxis=dict(categoryorder="array", categoryarray=list(reversed(LANE_COLORS))))
    return fig


def rates_figure(trace, runs="last", idle: float = IDLE, bins: int = 40):
    """GB/s moved by copies (the link) and by reads (the drive) over a run, in ``bins`` time slices."""
    go = _plotly()
    chosen = _chosen_runs(trace, runs, idle)
    placed, _ = collapse_idle(chosen)
    span = max((b for _, _, b in placed), default=0.0) or 1e-9
    width = span / bins
    fig = go.Figure()
    for lane, label in (("copy", "link (copies)"), ("read", "drive (reads)")):
        moved = [0.0] * bins
        for e, a, b in placed:
            if e.kind != lane or not e.bytes or b <= a:
                continue
            rate = e.bytes / (b - a)
            for i in range(int(a / width), min(bins, int(b / width) + 1)):
                lo, hi = max(a, i * width), min(b, (i + 1) * width)
                if hi > lo:
                    moved[i] += rate * (hi - lo)
        if any(moved):
            fig.add_trace(go.Scatter(name=label, x=[(i + 0.5) * width * 1e3 for i in range(bins)],
                                     y=[m / width / GB for m in moved], mode="lines",
                                     line_color=LANE_COLORS[lane]))
    fig.update_layout(title="link and drive rates over the run", xaxis_title="ms", yaxis_title="GB/s", height=300)
    return fig


def bytes_figure(plans: dict):
    """Bytes each plan keeps resident and streams per token from each tier, one stacked bar per plan
    (``plans``: label -> Plan)."""
    go = _plotly()
    labels = list(plans)
    fig = go.Figure()
    resident = [p.totals()[p.resident_tier] for p in plans.values()]
    fig.add_trace(go.Bar(name="resident (not moved)", x=labels, y=[r / 2**20 for r in resident],
                         marker_color=TIER_COLORS["gpu"], opacity=0.45))
    for tier in ("cpu", "disk"):
        moved = [p.streamed_bytes_per_token().get(tier, 0) for p in plans.values()]
        if any(moved):
            fig.add_trace(go.Bar(name=f"streamed from {tier}, per token", x=labels, y=[m / 2**20 for m in moved],
                                 marker_color=TIER_COLORS[tier]))
    fig.update_layout(barmode="stack", yaxis_title="MiB", title="bytes per tier, per token", height=320)
    return fig


def budget_figure(rows, title: str = "tok/s against the GPU budget"):
    """tok/s against the budget: ``rows`` of ``{"budget": GiB, "predicted": tok/s, "measured": tok/s}``
    (either may be missing); predicted as a line, measured as points."""
    go = _plotly()
    rows = sorted(rows, key=lambda r: r["budget"])
    fig = go.Figure()
    for key, mode in (("predicted", "lines+markers"), ("measured", "markers")):
        pts = [(r["budget"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            fig.add_trace(go.Scatter(name=key, x=[p[0] for p in pts], y=[p[1] for p in pts], mode=mode,
                                     marker_size=10 if key == "measured" else 6))
    fig.update_layout(title=title, xaxis_title="GPU budget (GiB)", yaxis_title="tok/s", height=320)
    return fig
