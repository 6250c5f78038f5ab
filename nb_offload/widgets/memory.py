"""Memory per tier: weights and each reservation apart, against the tier's budget."""

from __future__ import annotations

import html

from traitlets import List, Unicode

from .base import OffloadWidget
from .state import memory_state
from .static import memory_svg


class Memory(OffloadWidget):
    _kind = Unicode("memory").tag(sync=True)
    rows = List().tag(sync=True)

    def __init__(self, llm, **kwargs):
        super().__init__(llm, rows=memory_state(llm.plan), **kwargs)

    def plan_changed(self, plan):
        self.rows = memory_state(plan)
        super().plan_changed(plan)

    def static_html(self) -> str:
        return f"<div><b>nb_offload memory</b> {html.escape(self.llm.name)}<br>{memory_svg(self.llm.plan)}</div>"
