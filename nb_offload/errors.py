"""The exceptions nb_offload raises for user-facing problems.

Every message names the bad value and the accepted form, so a notebook user can fix the
call without reading a traceback.
"""

from __future__ import annotations


class OffloadError(Exception):
    """Base class of every error nb_offload raises on purpose."""

    def _render_traceback_(self):
        # IPython shows this instead of a traceback: the message already says what to fix.
        # The cell still fails (nbval and "run all" stop); %tb shows the full traceback.
        return [f"{type(self).__name__}: {self}"]


class BudgetError(OffloadError, ValueError):
    """A memory budget is malformed, or too small for the model."""


class CheckpointError(OffloadError):
    """The model folder, Hub id or weight files can't be used."""


class PinError(OffloadError, ValueError):
    """A pin pattern matches nothing, or names an unknown tier."""


class DiskTierError(OffloadError):
    """The disk tier's folder can't be created or written."""


class OptionError(OffloadError, ValueError):
    """An option (dtype, quantization, device, policy ...) has an unknown value."""


def in_one_line(exc: BaseException) -> str:
    """``exc`` as a reason kept for later ("RuntimeError: its message's first line"), where a step fell back
    to a slower path rather than failing."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
