"""One subscription to a model's trace, shared by the widgets that show that model.

The engine hands over a batch of events once per forward step, hundreds of times a second on
a small model; the browser gets at most ``rate`` live messages a second (the rest wait for the
next one), and when the cell ends the widgets settle: they take the full detail and the plan as
it now is (a ``pin`` in a cell changes it too). Outside IPython, call ``flush()`` to settle.
"""

from __future__ import annotations

import time

from . import cells


class TraceFeed:
    def __init__(self, llm, rate: float = 10.0):
        self.llm = llm
        self.interval = 1.0 / rate
        self._listeners: list = []
        self._pending: list = []
        self._last_sent = float("-inf")
        self._plan = llm.plan
        self._gone = False          # the model was unloaded (or replaced by a load under its name)
        self._unsubscribe = None
        self._shell = None

    # -- listeners: objects with live(events), settle() and plan_changed(plan) ------------------
    def add(self, listener):
        if listener not in self._listeners:
            self._listeners.append(listener)
        if self._unsubscribe is None:
            self._unsubscribe = self.llm.trace.subscribe(self._on_batch)
            self._shell = cells.current_shell()
            if self._shell is not None:
                self._shell.events.register("post_run_cell", self._on_cell_end)

    def remove(self, listener):
        if listener in self._listeners:
            self._listeners.remove(listener)
        if not self._listeners and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
            if self._shell is not None:
                self._shell.events.unregister("post_run_cell", self._on_cell_end)
                self._shell = None

    # -- flow -------------------------------------------------------------------------------------
    def _on_batch(self, events):
        self._pending.extend(events)
        if time.monotonic() - self._last_sent >= self.interval:
            self._send_pending()

    def _send_pending(self):
        events, self._pending = self._pending, []
        self._last_sent = time.monotonic()
        if events:
            for listener in list(self._listeners):
                listener.live(events)

    def check_plan(self):
        """Tell the listeners if the model has a new plan (after a pin, from a widget or a cell)."""
        if self.llm.plan is not self._plan:
            self._plan = self.llm.plan
            for listener in list(self._listeners):
                listener.plan_changed(self._plan)

    def check_loaded(self):
        """Tell the listeners once if the model was unloaded: their views stop offering to change it."""
        if not self._gone and not self.llm.loaded:
            self._gone = True
            for listener in list(self._listeners):
                listener.unloaded()

    def flush(self):
        """Send what is pending, then let every listener settle (full detail, fresh static view)."""
        self._send_pending()
        self.check_plan()
        self.check_loaded()
        for listener in list(self._listeners):
            listener.settle()

    def _on_cell_end(self, result=None):
        self.flush()
