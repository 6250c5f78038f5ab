"""The transfer timeline: read / copy / compute / step lanes (and the CPU's, where the model computes blocks
or routed experts there), zoomable, updated live."""

from __future__ import annotations

from traitlets import Dict, Int, List, Unicode

from ..trace import ALL_LANES, LANES
from ..views import Timeline as StaticTimeline
from .base import OffloadWidget
from .events import EventLog


class Timeline(OffloadWidget):
    """Live batches arrive as widget messages (deltas); when a cell ends, ``events`` takes a
    snapshot of everything kept, which a view drawn later (or redrawn) starts from."""

    _kind = Unicode("timeline").tag(sync=True)
    lanes = List(list(LANES)).tag(sync=True)
    events = Dict().tag(sync=True)
    max_events = Int(50_000).tag(sync=True)

    def __init__(self, llm, *, max_events: int = 50_000, **kwargs):
        self._log = EventLog(max_events)
        self._log.extend(list(llm.trace))
        engine = getattr(llm, "_engine", None)
        on_cpu = getattr(engine, "host", None) is not None or getattr(engine, "cpu_blocks", None)
        lanes = ALL_LANES if on_cpu else LANES
        super().__init__(llm, events=self._log.snapshot(), max_events=max_events, lanes=list(lanes), **kwargs)

    def live(self, events):
        since = self._log.end
        self._log.extend(events)
        header, buffers = self._log.pack(since)
        self.send({"type": "events", **header}, buffers)
        super().live(events)

    def settle(self):
        if self._changed:
            self.events = self._log.snapshot()
        super().settle()

    def static_html(self) -> str:
        return StaticTimeline(self.llm.trace, title=self.llm.name, max_events=2000)._repr_html_()
