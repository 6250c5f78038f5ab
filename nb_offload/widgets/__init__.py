"""Notebook widgets for an offloaded model: the layer map (re-pin by click), memory per tier,
the live transfer timeline, and a dashboard of all three.

Needs ``anywidget`` (``pip install nb_offload[widgets]``). Imports no torch.
"""

from __future__ import annotations

from .dashboard import Dashboard
from .layermap import LayerMap
from .memory import Memory
from .timeline import Timeline

__all__ = ["dashboard", "Dashboard", "LayerMap", "Memory", "Timeline"]


def dashboard(llm) -> Dashboard:
    """The layer map, memory bars and timeline of ``llm``, kept current as it runs."""
    return Dashboard(llm)
