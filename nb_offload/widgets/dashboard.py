"""The dashboard: layer map and memory side by side, the timeline below, fed by one trace feed."""

from __future__ import annotations

import ipywidgets

from .base import LiveView
from .feed import TraceFeed
from .layermap import LayerMap
from .memory import Memory
from .timeline import Timeline


class Dashboard(LiveView, ipywidgets.VBox):
    def __init__(self, llm, **kwargs):
        feed = TraceFeed(llm)
        self.layer_map = LayerMap(llm, feed=feed)
        self.memory = Memory(llm, feed=feed)
        self.timeline = Timeline(llm, feed=feed)
        row = ipywidgets.HBox([self.layer_map, self.memory])
        super().__init__([row, self.timeline], **kwargs)
        self.add_class("nb-offload-dashboard")
        self._attach(llm, feed)

    def static_html(self) -> str:
        return "".join(w.static_html() for w in (self.layer_map, self.memory, self.timeline))

    def close(self):
        for w in (self.layer_map, self.memory, self.timeline):
            w.close()
        super().close()
