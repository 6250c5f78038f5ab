"""Memory per tier: weights and each reservation apart, against the tier's budget."""

from __future__ import annotations

from traitlets import List, Unicode

from ..views import memory_html, memory_state
from .base import OffloadWidget


class Memory(OffloadWidget):
    _kind = Unicode("memory").tag(sync=True)
    rows = List().tag(sync=True)

    def __init__(self, llm, **kwargs):
        super().__init__(llm, rows=memory_state(llm.plan), **kwargs)

    def plan_changed(self, plan):
        self.rows = memory_state(plan)
        super().plan_changed(plan)

    def static_html(self) -> str:
        return memory_html(self.llm.plan, self.llm.name)
