"""What every nb_offload widget shares: the front-end bundle, the trace feed, and a static
copy of itself in its output for viewers without a kernel."""

from __future__ import annotations

import pathlib
import uuid
from collections import deque

import anywidget
from traitlets import Dict, Unicode

from .feed import TraceFeed
from .state import COLORS

STATIC = pathlib.Path(__file__).parent / "static"
if not (STATIC / "widget.js").is_file():
    raise ImportError(f"nb_offload's widget front-end is not built ({STATIC / 'widget.js'} is missing); "
                      "run labextension/build.sh")


class LiveView:
    """A view of one model that a ``TraceFeed`` keeps current.

    Its output carries ``text/html`` (inline SVG) beside the widget view: JupyterLab shows the
    live widget, while nbconvert, GitHub and a notebook opened without a kernel show the HTML.
    That copy is refreshed when a cell ends, if the view changed, so a saved notebook shows the
    last plan and trace rather than the state at display time.
    """

    def _attach(self, llm, feed):
        self.llm = llm
        self.feed = feed
        self._changed = False
        # Handles of the outputs this view was displayed in; a re-run cell leaves a stale one
        # behind, so only the latest few are kept.
        self._displays = deque(maxlen=4)
        feed.add(self)

    # -- TraceFeed listener -------------------------------------------------------------------
    def live(self, events):
        self._changed = True

    def plan_changed(self, plan):
        self._changed = True

    def unloaded(self):
        """The model is gone: a view that could change it says so and stops offering."""
        self._changed = True

    def settle(self):
        if self._changed:
            self._changed = False
            self.refresh_static()

    # -- output -------------------------------------------------------------------------------
    def static_html(self) -> str:
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        data, meta = bundle if isinstance(bundle, tuple) else (bundle, {})
        return {**data, "text/html": self.static_html()}, meta

    def _ipython_display_(self):
        # Displayed with an id, so refresh_static can update that output in place.
        from IPython.display import display
        data, meta = self._repr_mimebundle_()
        handle = display(data, metadata=meta, raw=True, display_id=True)
        if handle is not None:       # None outside IPython: nothing to update later
            self._displays.append(handle)

    def refresh_static(self):
        if self._displays:
            data, meta = self._repr_mimebundle_()
            for handle in self._displays:
                handle.update(data, metadata=meta, raw=True)

    def close(self):
        self.feed.remove(self)
        super().close()


class OffloadWidget(LiveView, anywidget.AnyWidget):
    """An anywidget whose view is drawn by ``static/widget.js`` (built from labextension/src)."""

    _esm = STATIC / "widget.js"
    _css = STATIC / "widget.css"
    _kind = Unicode().tag(sync=True)        # which view widget.js draws
    _uid = Unicode().tag(sync=True)         # tells this model's views from another's (views.ts)
    colors = Dict(COLORS).tag(sync=True)

    def __init__(self, llm, *, feed: TraceFeed | None = None, **kwargs):
        super().__init__(_uid=uuid.uuid4().hex, **kwargs)
        self._attach(llm, feed or TraceFeed(llm))
