"""nb_offload: run language models larger than GPU memory, from a notebook.

The public surface is what this module exports (``__all__``): ``load``, ``plan``, ``Options`` and the
types they return. The submodules are internal and may change between versions. Importing this
package is cheap: torch and transformers load with the first model.
"""

from __future__ import annotations

from .budget import format_size, parse_size
from .errors import BudgetError, CheckpointError, DiskTierError, OffloadError, OptionError, PinError
from .model import OffloadedModel
from .options import Options, document
from .planner import Plan, PlanEntry
from .trace import Stats, Trace, TraceEvent
from .views import Timeline

__version__ = "0.1.0"
__all__ = ["load", "plan", "Options", "OffloadedModel", "Plan", "PlanEntry", "Stats", "Trace", "TraceEvent", "Timeline",
           "OffloadError", "BudgetError", "CheckpointError", "DiskTierError", "OptionError", "PinError",
           "parse_size", "format_size", "__version__"]


@document(load=True, lead="Load a causal LM through the memory tiers; returns an ``OffloadedModel``.")
def load(model, **options):
    from .loader import load as _load
    return _load(model, **options)


@document(load=False, lead="A dry-run ``Plan`` from the config and safetensors headers; no weight is read.\n\n"
                           "With ``gpu=`` given the plan is for a CUDA device, also on a machine without one.")
def plan(model, **options):
    from .loader import plan as _plan
    return _plan(model, **options)


def load_ipython_extension(ipython):
    """``%load_ext nb_offload``: register the magics (imports no torch)."""
    from .magics import OffloadMagics
    magics = OffloadMagics(shell=ipython)
    ipython.register_magics(magics)
    ipython.configurables.append(magics) if magics not in ipython.configurables else None
    ipython._nb_offload_magics = magics


def unload_ipython_extension(ipython):
    """``%unload_ext nb_offload``: unload every model and remove the magics."""
    magics = getattr(ipython, "_nb_offload_magics", None)
    if magics is None:
        return
    magics.unload_all()
    for table in ipython.magics_manager.magics.values():
        for name in list(table):
            if getattr(table[name], "__self__", None) is magics:
                del table[name]
    registry = ipython.magics_manager.registry
    for key in [k for k, v in registry.items() if v is magics]:
        del registry[key]
    if magics in ipython.configurables:
        ipython.configurables.remove(magics)
    del ipython._nb_offload_magics
