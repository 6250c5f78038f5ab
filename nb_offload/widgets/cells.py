"""Running work from a widget message between cells, on the thread that runs them.

A widget message is not handled between cells as one might think: ipykernel 7 handles the
messages JupyterLab's widget manager sends on a kernel subshell, a thread of its own, while a
cell may be running (and an async cell lets messages in while it awaits). A re-pin migrates
weights, so it must never overlap a cell, say one that is generating. ``CellGate`` queues
such work and runs it on the cells' thread when no cell runs: at once if the kernel is idle,
otherwise when the running cell ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque


class CellGate:
    def __init__(self, shell):
        """``shell``: the IPython shell, or None outside IPython (then work runs at once)."""
        self.shell = shell
        self.thread = threading.current_thread()
        try:
            self.loop = asyncio.get_running_loop()   # the kernel's loop, when made in a cell
        except RuntimeError:
            self.loop = None
        # Made in a cell, so a cell is running; its post_run_cell clears this.
        self.busy = shell is not None
        self._queue: deque = deque()
        if shell is not None:
            shell.events.register("pre_run_cell", self._cell_starts)
            shell.events.register("post_run_cell", self._cell_ends)

    def submit(self, work):
        """Run ``work()`` between cells (``busy`` tells whether it will wait for a cell)."""
        if self.shell is None:
            work()
            return
        self._queue.append(work)
        if threading.current_thread() is self.thread:
            self._drain()
        elif self.loop is not None:
            self.loop.call_soon_threadsafe(self._drain)

    def close(self):
        if self.shell is not None:
            self.shell.events.unregister("pre_run_cell", self._cell_starts)
            self.shell.events.unregister("post_run_cell", self._cell_ends)
            self.shell = None

    def _drain(self):
        while self._queue and not self.busy:
            self._queue.popleft()()

    def _cell_starts(self, info=None):
        self.busy = True

    def _cell_ends(self, result=None):
        self.busy = False
        self._drain()


def current_shell():
    """The IPython shell running this code, or None."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()
