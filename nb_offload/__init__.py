"""nb_offload: run language models larger than GPU memory, from a notebook.

Importing this package is cheap: torch and transformers load with the first model.
"""

from __future__ import annotations

from .errors import (BudgetError, CheckpointError, DiskTierError, OffloadError, OptionError,
                     PinError)

__version__ = "0.1.0"
__all__ = ["load", "plan", "OffloadError", "BudgetError", "CheckpointError", "DiskTierError",
           "OptionError", "PinError", "parse_size", "format_size", "__version__"]

from .budget import format_size, parse_size


def load(model, **kwargs):
    """Load a causal LM through the memory tiers; returns an ``OffloadedModel``.

    ``nb_offload.load(model, *, gpu=None, cpu=None, disk=None, dtype=None, quant=None, pins=None,
    device=None, policy="auto", context=None, batch=1, prefetch=None, read_ahead=2, trace=True,
    allow_pickle=False, progress=True, trust_remote_code=False, attn_implementation=None)``
    """
    from .loader import load as _load
    return _load(model, **kwargs)


def plan(model, **kwargs):
    """A dry-run ``Plan`` from the config and safetensors headers; no weight is read."""
    from .loader import plan as _plan
    return _plan(model, **kwargs)
