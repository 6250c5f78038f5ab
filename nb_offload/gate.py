"""One thread runs a model at a time, and re-plans wait until no run is under way.

A re-plan (``pin``, ``unpin``, the dashboard's Apply, ``unload``) stops the engine, moves bytes
between tiers and starts a new engine. Done while another thread's forward pass is between two
blocks, that forward would compute with half-moved weights: wrong tokens, no error. So every
forward pass and every ``OffloadedModel.generate`` holds the gate; re-plans wait for it.

The gate is re-entrant for runs (generate calls forward), and every hold is taken in a
``with``, so an exception of any kind, KeyboardInterrupt included, lets it go.
"""

from __future__ import annotations

import contextlib
import threading

from .errors import OffloadError


class RunGate:
    def __init__(self):
        self._cond = threading.Condition()
        self._owner = None      # thread ident of the run or re-plan under way
        self._depth = 0
        self._what = ""         # "run" or the re-plan's name, for messages

    @contextlib.contextmanager
    def run(self):
        """Hold the gate for a forward pass or a generate (re-entrant in one thread)."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me and self._what != "run":
                raise OffloadError(f"can't run the model from inside {self._what}; run it after that returns.")
            self._cond.wait_for(lambda: self._owner in (None, me))
            self._owner, self._what = me, "run"
            self._depth += 1
        try:
            yield
        finally:
            self._leave()

    @contextlib.contextmanager
    def exclusive(self, what: str):
        """Hold the gate for a re-plan: wait for the run under way to end, then keep runs out."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                raise OffloadError(f"can't {what} while this model is running in the same thread (from a "
                                   f"streamer, a hook or a callback); {what} after the run returns.")
            self._cond.wait_for(lambda: self._owner is None)
            self._owner, self._what, self._depth = me, what, 1
        try:
            yield
        finally:
            self._leave()

    def _leave(self):
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner, self._what = None, ""
                self._cond.notify_all()

    def held_here(self) -> bool:
        """Whether this thread runs the model or re-plans it now (a re-plan from here would raise)."""
        return self._owner == threading.get_ident()

    @property
    def busy(self) -> bool:
        """Whether a run or a re-plan is under way (in any thread)."""
        return self._owner is not None
