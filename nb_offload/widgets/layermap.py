"""The layer map: a cell per unit coloured by tier, the units at work lit up, re-pin by click."""

from __future__ import annotations

from traitlets import Dict, List, Unicode

from ..budget import format_size
from ..errors import OffloadError
from ..views import layer_map_html
from . import cells, repin
from .base import OffloadWidget
from .events import EventLog
from .state import UNPIN, plan_state

IDLE = {"state": "idle", "message": ""}


class LayerMap(OffloadWidget):
    """Click a unit to select it, shift-click for a range, ctrl/cmd-click to add one; pick a
    tier and Apply. The browser sends the request as a widget message; the re-pin runs between
    cells (see ``CellGate``), so while a cell runs the request shows as pending."""

    _kind = Unicode("layermap").tag(sync=True)
    plan = Dict().tag(sync=True)
    selection = List(Unicode()).tag(sync=True)
    status = Dict(IDLE).tag(sync=True)      # state: idle | pending | applying | done | error | unloaded
    # MoE blocks brought as routed: {name: {"routed": experts of the last call, "cached": on the GPU}}
    experts = Dict().tag(sync=True)

    def __init__(self, llm, **kwargs):
        super().__init__(llm, plan=plan_state(llm.plan), **kwargs)
        self._gate = cells.CellGate(cells.current_shell())
        self.on_msg(self._on_message)

    def live(self, events):
        """Send the latest step's events: the browser replays them to light up the units."""
        last = max(e.step for e in events)
        log = EventLog()
        log.extend([e for e in events if e.step == last])
        header, buffers = log.pack()
        self.send({"type": "activity", "step": last, **header}, buffers)
        if self.llm.loaded:
            self.experts = self.llm.expert_state()
        super().live(events)

    def plan_changed(self, plan):
        self.plan = plan_state(plan)
        super().plan_changed(plan)

    def unloaded(self):
        self.selection = []
        self.status = {"state": "unloaded", "message": f"{self.llm.name} was unloaded, or loaded again under its "
                       "name: this map shows its last plan and no longer changes it. Load it again (%offload_load, "
                       "or nb_offload.load) for a new dashboard."}
        super().unloaded()

    def static_html(self) -> str:
        return layer_map_html(self.llm.plan, self.llm.name)

    def _on_message(self, _widget, content, _buffers):
        if content.get("type") != "apply":
            return
        request = content.get("request")
        if not self.llm.loaded:         # a stale view (another browser tab) asking anyway
            self.feed.check_loaded()
            return
        if self._gate.busy:      # said before queuing: the work may run (and report) at once
            self.status = {"state": "pending", "request": request,
                           "message": "queued in the kernel: runs when the running cell finishes"}
        self._gate.submit(lambda: self.apply(content.get("tier", ""), content.get("names"), request=request))

    def close(self):
        self._gate.close()
        super().close()

    def apply(self, tier: str, names=None, *, request=None):
        """Pin the selected units (or ``names``) to ``tier`` ("auto": unpin); errors go to ``status``."""
        names = list(self.selection if names is None else names)

        def progress(i, n, pattern):
            verb = "unpinning" if tier == UNPIN else f"pinning to {tier}:"
            self.status = {"state": "applying", "message": f"{verb} {pattern} ({i}/{n})", "request": request}

        try:
            if not names:
                raise OffloadError("select units first: click a cell, shift-click for a range.")
            moves = repin.apply(self.llm, names, tier, progress)
        except Exception as err:
            # The widget says what went wrong either way; a bug (not an OffloadError) is also
            # raised, for the kernel's log.
            known = isinstance(err, OffloadError)
            self.status = {"state": "error", "message": str(err) if known else f"{type(err).__name__}: {err}",
                           "request": request}
            if not known:
                raise
        else:
            self.selection = []
            listed = ", ".join(f"{n} {a}\u2192{b}" for n, a, b in moves[:6]) + (" \u2026" if len(moves) > 6 else "")
            size = format_size(sum(self.llm.plan[n].bytes for n, _, _ in moves))
            count = f"{len(moves)} unit" + ("s" if len(moves) != 1 else "")
            self.status = {"state": "done", "request": request,
                           "message": f"moved {count} ({size}): {listed}" if moves else "no unit moved"}
        finally:
            # Every view of this model (memory bars, static copies) takes the new plan now: this
            # may run after the end-of-cell settle, or with no cell at all.
            self.feed.flush()
