"""What the live widgets get, as plain JSON-able data: the plan's units, re-pin targets, colours.

The palette, the memory rows and the cell labels come from ``nb_offload.views``, which draws
the static (no-kernel) copies: the live views and the static ones show one description of the
plan in one set of colours.
"""

from __future__ import annotations

from ..hybrid import CPU_COMPUTE
from ..views import PALETTE, expert_moves, short_label

COLORS = PALETTE    # the widgets' ``colors`` state: the front end draws with these
UNPIN = "auto"      # the re-pin target that hands units back to the planner


def pin_targets(plan) -> list:
    """Tiers a unit can be pinned to under this plan, then the planner's own choice."""
    tiers = [plan.resident_tier] + [t for t in plan.streamed_tiers
                                    if t != "disk" or plan.budgets.get("disk") is not None]
    if plan.device == "cuda":      # blocks kept in host memory and computed there (hybrid.py)
        tiers.insert(tiers.index("cpu") + 1, CPU_COMPUTE)
    return tiers + [UNPIN]


def _experts(plan, e) -> dict:
    """A MoE block's routed experts: how many, how many a token uses, and how a step brings them
    (views.expert_moves)."""
    if not e.experts:
        return {}
    return {"experts": {"count": e.experts, "top_k": e.top_k, "moves": expert_moves(plan, e)}}


def plan_state(plan) -> dict:
    return {
        "model": plan.model, "device": plan.device, "targets": pin_targets(plan),
        "entries": [{"name": e.name, "label": short_label(e), "bytes": e.bytes, "tier": e.tier,
                     "pinned": e.pinned, "kind": e.kind, "format": e.fmt, **_experts(plan, e),
                     **({"compute": e.compute} if e.compute else {})} for e in plan.entries],
    }
