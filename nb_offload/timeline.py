"""A static timeline of a trace: inline SVG for notebooks (it survives nbconvert and GitHub),
and a text summary for terminals. The live, zoomable view is the widget's job."""

from __future__ import annotations

import html

from .budget import format_size

LANE_COLORS = {"read": "#8d6e63", "copy": "#1565c0", "compute": "#2e7d32", "step": "#9e9e9e"}


class Timeline:
    def __init__(self, trace, title: str = "", last_steps: int | None = None, max_events: int = 5000):
        events = list(trace)
        if last_steps is not None and events:
            last = max(e.step for e in events)
            events = [e for e in events if e.step > last - last_steps]
        self.events = events[-max_events:]
        self.title = title
        self.summary = trace.summary()

    def __repr__(self):
        if not self.events:
            return f"<Timeline {self.title}: no events yet; run a generate first>"
        t0 = min(e.start for e in self.events)
        t1 = max(e.end for e in self.events)
        lines = [f"timeline {self.title}: {len(self.events)} events over {(t1 - t0) * 1e3:.1f} ms"]
        for lane, s in self.summary.items():
            if s["count"]:
                rate = f", {s['bytes'] / s['seconds'] / 1e9:.1f} GB/s while busy" if s["bytes"] and s["seconds"] else ""
                lines.append(f"  {lane:<8} {s['count']:>6} events, {format_size(s['bytes']):>10}, "
                             f"busy {s['seconds'] * 1e3:.1f} ms{rate}")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):
        p.text(repr(self))

    def _repr_html_(self):
        if not self.events:
            return f"<div><i>{html.escape(repr(self))}</i></div>"
        lanes = [k for k in LANE_COLORS if any(e.kind == k for e in self.events)]
        t0 = min(e.start for e in self.events)
        span = max(max(e.end for e in self.events) - t0, 1e-9)
        width, lane_h, left = 900, 22, 70
        rects = []
        for e in self.events:
            y = lanes.index(e.kind) * lane_h + 4
            x = left + (e.start - t0) / span * (width - left)
            w = max((e.end - e.start) / span * (width - left), 0.5)
            tip = (f"{e.kind} {e.unit} {(e.end - e.start) * 1e3:.2f} ms"
                   + (f" {format_size(e.bytes)}" if e.bytes else ""))
            rects.append(f"<rect x='{x:.1f}' y='{y}' width='{w:.1f}' height='{lane_h - 8}' "
                         f"fill='{LANE_COLORS[e.kind]}'><title>{html.escape(tip)}</title></rect>")
        labels = "".join(f"<text x='2' y='{i * lane_h + 17}' font-size='12'>{k}</text>" for i, k in enumerate(lanes))
        h = len(lanes) * lane_h + 18
        axis = f"<text x='{left}' y='{h - 2}' font-size='11'>0 ms</text>" \
               f"<text x='{width - 60}' y='{h - 2}' font-size='11'>{span * 1e3:.1f} ms</text>"
        return (f"<div><b>nb_offload timeline</b> {html.escape(self.title)} ({len(self.events)} events)"
                f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{h}'>{labels}{''.join(rects)}{axis}"
                f"</svg><pre>{html.escape(repr(self))}</pre></div>")
