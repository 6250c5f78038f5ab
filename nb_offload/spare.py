"""Spare room: what one generate leaves unused of the plan's reservations, and what may fill it.

A plan reserves room on the compute device for the KV cache and activations of its planned
context and batch (2048 tokens by default), so that no generate up to that length runs out of
memory. Most notebook generates are far shorter: a 30-token prompt and 50 new tokens use a few
percent of that reservation. For the length of such a generate, the unused part holds some
streamed units in buffers of their own, so each step moves fewer bytes. The budget is never
exceeded (the room is counted from the plan's own figures, with the generate's own estimated
needs counted twice as a margin for temporaries the estimate misses), and the units go
back to streaming when the generate ends, however it ends.

Units the user pinned are never held: a pin says where a unit's bytes come from.

Where the CPU computes some blocks (hybrid.py), holding one of them takes its time off the CPU's side of the
step, and holding a streamed unit takes its bytes off the link's: ``choose_with_cpu_blocks`` holds as many of
the CPU's blocks as make the modelled step (hybrid.step_seconds) shortest, and fills the room left with
streamed units as ``choose`` does.
"""

from __future__ import annotations

from .graphs import given_cache, given_ids
from .planner import footprint


def granularity(device: str) -> int:
    """The step large allocations are rounded up to: 2 MiB in PyTorch's CUDA caching allocator."""
    return 2 * 2**20 if device == "cuda" else 64


def generate_extent(model, args, kwargs):
    """``(tokens, sequences)`` a ``generate(*args, **kwargs)`` call can reach, or None if unknown.

    Unknown when the cache is passed in (it may already hold any length), or when the call
    uses an assistant model or prompt lookup (they run extra forward passes of their own).
    """
    if given_cache(kwargs) is not None or kwargs.get("assistant_model") is not None \
            or kwargs.get("prompt_lookup_num_tokens"):
        return None
    shape = getattr(given_ids(args, kwargs), "shape", None)
    if shape is None or len(shape) < 2:
        return None
    batch, prompt = int(shape[0]), int(shape[1])
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def option(name, default=None):
        if name in kwargs:
            return kwargs[name]
        return getattr(config, name, default) if config is not None else default

    new = option("max_new_tokens")
    if new is not None:
        tokens = prompt + int(new)
    else:
        length = option("max_length")
        if length is None:
            return None
        tokens = max(int(length), prompt + 1)
    beams = max(int(option("num_beams", 1) or 1), int(option("num_return_sequences", 1) or 1))
    return tokens, batch * beams


def spare_bytes(plan, config, dtype_size: int, tokens: int, sequences: int) -> int:
    """Bytes of the compute device's budget that a generate of this extent will not use."""
    cap = plan.budgets.get(plan.resident_tier)
    if cap is None:
        return 0
    need = footprint(config, dtype_size, tokens, sequences, plan.device)
    needed = need["kv_cache"] + need["activations"]
    reserved = plan.reserved.get("kv_cache", 0) + plan.reserved.get("activations", 0)
    slack = cap - plan.used()[plan.resident_tier]     # what the plan left unplaced
    return max(0, slack + reserved - 2 * needed - granularity(plan.device))


def choose(candidates, room: int, step: int = 64) -> list:
    """Which of ``candidates`` (``(index, tier, nbytes)`` in run order) to hold in ``room`` bytes.

    Each costs its size rounded up to the allocator's ``step``. Disk units first (each saves a drive
    read per step, the slowest path), then host units;
    within a tier, picks are spread evenly over the run order, so the units still streamed keep
    alternating with computed ones and each copy still overlaps compute.
    """
    from .planner import _evenly_spaced
    from .units import round_up

    picked = []
    for tier in ("disk", "cpu"):
        group = [c for c in candidates if c[1] == tier]
        for k in range(len(group), 0, -1):
            positions = _evenly_spaced(len(group), k) if k < len(group) else set(range(len(group)))
            if positions is None:
                continue
            take = [group[i] for i in sorted(positions)]
            need = sum(round_up(c[2], step) for c in take)
            if need <= room:
                picked += [c[0] for c in take]
                room -= need
                break
    return picked


def choose_with_cpu_blocks(candidates, blocks, room: int, step: int, time_of) -> list:
    """Which of ``candidates`` (streamed, as for ``choose``) and ``blocks`` (``(index, nbytes)`` of blocks the
    CPU computes, in run order) to hold in ``room`` bytes: for each count of the blocks (spread over the run
    order) that fits, those and the streamed units ``choose`` adds in the room left; the picks whose step
    ``time_of(picks)`` says is shortest (of equal ones, the fewer blocks)."""
    from .planner import _evenly_spaced
    from .units import round_up

    best, best_time = None, None
    for k in range(len(blocks) + 1):
        positions = _evenly_spaced(len(blocks), k) if 0 < k < len(blocks) else set(range(k))
        if positions is None:
            continue
        held = [blocks[i][0] for i in sorted(positions)]
        need = sum(round_up(blocks[i][1], step) for i in positions)
        if need > room:
            break
        picks = held + choose(candidates, room - need, step)
        t = time_of(picks)
        if best_time is None or t < best_time * (1 - 1e-9):
            best, best_time = picks, t
    return best or []
