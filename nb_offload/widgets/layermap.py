"""The layer map: a cell per unit coloured by tier, the units at work lit up, re-pin by click."""

from __future__ import annotations

from traitlets import Dict, List, Unicode

from ..budget import format_size
from ..errors import OffloadError
from . import repin
from .base import OffloadWidget
from .events import EventLog
from .state import plan_state
from .static import layer_map_svg

IDLE = {"state": "idle", "message": ""}


class LayerMap(OffloadWidget):
    """Click a unit to select it, shift-click for a range, ctrl/cmd-click to add one; pick a
    tier and Apply. The browser sends the request as a widget message, which the kernel
    handles once it is idle, so while a cell runs the request shows as pending."""

    _kind = Unicode("layermap").tag(sync=True)
    plan = Dict().tag(sync=True)
    selection = List(Unicode()).tag(sync=True)
    status = Dict(IDLE).tag(sync=True)      # state: idle | applying | done | error

    def __init__(self, llm, **kwargs):
        super().__init__(llm, plan=plan_state(llm.plan), **kwargs)
        self.on_msg(self._on_message)

    def live(self, events):
        """Send the latest step's events: the browser replays them to light up the units."""
        last = max(e.step for e in events)
        log = EventLog()
        log.extend([e for e in events if e.step == last])
        header, buffers = log.pack()
        self.send({"type": "activity", "step": last, **header}, buffers)
        super().live(events)

    def plan_changed(self, plan):
        self.plan = plan_state(plan)
        super().plan_changed(plan)

    def static_html(self) -> str:
        return f"<div><b>nb_offload layer map</b> {self.llm.name}<br>{layer_map_svg(self.llm.plan)}</div>"

    def _on_message(self, _widget, content, _buffers):
        if content.get("type") == "apply":
            self.apply(content.get("tier", ""), content.get("names"), request=content.get("request"))

    def apply(self, tier: str, names=None, *, request=None):
        """Pin the selected units (or ``names``) to ``tier`` ("auto": unpin); errors go to ``status``."""
        names = list(self.selection if names is None else names)

        def progress(i, n, pattern):
            verb = "unpinning" if tier == "auto" else f"pinning to {tier}:"
            self.status = {"state": "applying", "message": f"{verb} {pattern} ({i}/{n})", "request": request}

        try:
            if not names:
                raise OffloadError("select units first: click a cell, shift-click for a range.")
            moves = repin.apply(self.llm, names, tier, progress)
        except OffloadError as err:
            self.status = {"state": "error", "message": str(err), "request": request}
        else:
            self.selection = []
            moved = ", ".join(f"{n} {a}\u2192{b}" for n, a, b in moves[:6]) + (" \u2026" if len(moves) > 6 else "")
            size = format_size(sum(self.llm.plan[n].bytes for n, _, _ in moves))
            self.status = {"state": "done", "request": request,
                           "message": f"moved {len(moves)} units ({size}): {moved}" if moves else "no unit moved"}
        # Every view of this model (memory bars, static copies) takes the new plan now: no cell
        # ends after a widget message, so nothing else would tell them.
        self.feed.flush()
