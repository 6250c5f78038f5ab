"""Re-pinning a selection of units: the fewest pin patterns, applied all or nothing."""

from __future__ import annotations

from ..errors import OffloadError, PinError
from ..hybrid import CPU_COMPUTE
from .state import UNPIN


def patterns(names, plan) -> list:
    """Pin patterns naming exactly ``names``, in plan order: runs of consecutive blocks become
    one range (``model.layers.2-5``), so a shift-click range is one re-plan, not one per block."""
    order = {e.name: i for i, e in enumerate(plan.entries)}
    unknown = [n for n in names if n not in order]
    if unknown:
        raise PinError(f"{unknown[0]!r} is not a unit of this plan; units are e.g. "
                       f"{[e.name for e in plan.entries[:3]]}.")
    out, run = [], None            # run: [head, first index, last index] of consecutive blocks
    for i in sorted({order[n] for n in names}):
        e = plan.entries[i]
        head, _, idx = e.name.rpartition(".")
        if e.kind == "block" and idx.isdigit():
            if run and run[0] == head and run[2] + 1 == int(idx):
                run[2] = int(idx)
                continue
            if run:
                out.append(_range(run))
            run = [head, int(idx), int(idx)]
            continue
        if run:
            out.append(_range(run))
            run = None
        out.append(e.name)
    if run:
        out.append(_range(run))
    return out


def _range(run) -> str:
    head, lo, hi = run
    return f"{head}.{lo}" if lo == hi else f"{head}.{lo}-{hi}"


def apply(llm, names, tier, progress=None) -> list:
    """Pin ``names`` to ``tier`` (``"auto"``: unpin them) with ``llm.pin``/``llm.unpin``.

    A selection may need several patterns, hence several re-plans; if one fails, the ones
    already done are undone, so the model ends as it was. Returns the moves as
    ``(unit, old tier, new tier)``.
    """
    before = {e.name: (_where(e), e.pinned) for e in llm.plan.entries}
    pinned_as = llm.pins()          # "cpu-compute" too, which the plan shows as a "cpu" tier
    if tier == UNPIN:
        # Unpinning a unit that isn't pinned is an error in the core; skip those, unless that
        # leaves nothing, in which case the core's message says what is pinned.
        names = [n for n in names if before.get(n, (None, False))[1]] or list(names)
    todo = patterns(names, llm.plan)
    done = []
    try:
        for i, pattern in enumerate(todo, 1):
            if progress:
                progress(i, len(todo), pattern)
            if tier == UNPIN:
                llm.unpin(pattern)
            else:
                llm.pin(pattern, tier)
            done.append(pattern)
    except OffloadError as err:
        if done:
            _restore(llm, before, pinned_as, names, err)
        raise
    return [(e.name, before[e.name][0], _where(e)) for e in llm.plan.entries if _where(e) != before[e.name][0]]


def _where(entry) -> str:
    """A unit's tier, or "cpu-compute" for a block the CPU computes in host memory (hybrid.py)."""
    return CPU_COMPUTE if entry.compute == "cpu" else entry.tier


def _restore(llm, before, pinned_as, names, err):
    """Put back the pins ``names`` had (``pinned_as``: name -> pin): unpin first (it only loosens the plan),
    then re-pin."""
    now = {e.name: e.pinned for e in llm.plan.entries}
    unpin = [n for n in names if now[n] and not before[n][1]]
    repin = {}
    for n in names:
        if before[n][1]:
            repin.setdefault(pinned_as.get(n, before[n][0]), []).append(n)
    try:
        for pattern in patterns(unpin, llm.plan):
            llm.unpin(pattern)
        for tier, group in repin.items():
            for pattern in patterns(group, llm.plan):
                llm.pin(pattern, tier)
    except OffloadError as again:
        raise OffloadError(f"{err} Undoing the pins already applied failed too ({again}); "
                           f"the plan now is: {llm.plan!r}.") from err
