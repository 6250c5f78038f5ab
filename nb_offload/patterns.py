"""Pin patterns: module names as in ``named_modules()``, with ``*`` globs and index ranges.

``model.layers.0-3`` names blocks 0 to 3; ``model.layers.*`` every block; ``model.layers``
every unit under that module; ``lm_head`` one top-level unit.
"""

from __future__ import annotations

import fnmatch
import re

from .errors import PinError

_RANGE = re.compile(r"^(\d+)-(\d+)$")
ACCEPTED = ('a module name as in named_modules(), with * globs and index ranges, e.g. "model.layers.0-3", '
            '"model.layers.*", "lm_head"')


def segment_matcher(seg: str, pattern: str):
    """A test of one part of a name against ``seg``, one part of ``pattern``: an index range ("0-3") or a
    glob (a plain name, "*")."""
    m = _RANGE.match(seg)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            raise PinError(f"pin pattern {pattern!r}: range {seg!r} runs backwards; write it low-high, "
                           f"e.g. \"{hi}-{lo}\".")
        return lambda s: s.isdigit() and lo <= int(s) <= hi
    if not seg:
        raise PinError(f"pin pattern {pattern!r} has an empty part; give {ACCEPTED}.")
    rx = re.compile(fnmatch.translate(seg))
    return lambda s: rx.match(s) is not None


def compile_pattern(pattern: str):
    """Return a function that tells whether a module name falls under ``pattern``."""
    if not isinstance(pattern, str):
        raise PinError(f"pin pattern {pattern!r} is not a string ({type(pattern).__name__}); give {ACCEPTED}.")
    if not pattern.strip():
        raise PinError(f"pin pattern {pattern!r} is empty; give {ACCEPTED}.")
    pattern = pattern.strip()
    if pattern == "*":
        return lambda name: True
    matchers = [segment_matcher(seg, pattern) for seg in pattern.split(".")]

    def matches(name: str) -> bool:
        parts = name.split(".") if name else []
        if len(parts) < len(matchers):
            return False
        return all(m(p) for m, p in zip(matchers, parts))

    return matches


def match_units(pattern: str, units) -> list:
    """The units a pattern names, or a PinError that says what it could have named."""
    matches = compile_pattern(pattern)
    found = [u for u in units if any(matches(name) for name in u.modules)]
    if found:
        return found
    segs = pattern.strip().split(".")
    for u in units:  # does the pattern point inside a unit?
        for cut in range(len(segs) - 1, 0, -1):
            inner = compile_pattern(".".join(segs[:cut]))
            if any(inner(n) and len(n.split(".")) == cut for n in u.modules):
                raise PinError(
                    f"pin pattern {pattern!r} names a part of {u.kind} {u.name!r}; pins move whole units, "
                    f"e.g. {u.name!r}.")
    examples = ", ".join(repr(u.name) for u in units[:2] + units[-1:])
    raise PinError(f"pin pattern {pattern!r} matches no module of this model; give {ACCEPTED} "
                   f"(this model's units include {examples}).")
