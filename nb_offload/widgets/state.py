"""What the widgets show, as plain JSON-able data: the plan's units and the memory per tier.

Kept apart from the widget classes so the static (no-kernel) renderings and the live views
draw from one description of the plan.
"""

from __future__ import annotations

from ..planner import TIER_COLORS, TIERS
from ..timeline import LANE_COLORS

# Reservations are what a tier holds besides weights; each gets its own colour in the bars.
RESERVED_COLORS = {"kv_cache": "#ef6c00", "activations": "#7b1fa2", "workspace": "#757575",
                   "staging_slots": "#00838f", "disk_staging": "#5d4037"}
COLORS = {"tiers": TIER_COLORS, "lanes": LANE_COLORS, "reserved": RESERVED_COLORS}
UNPIN = "auto"      # the re-pin target that hands units back to the planner


def short_label(entry) -> str:
    """A cell label: the block index, or the last part of a top-level unit's name."""
    last = entry.name.rpartition(".")[2]
    return last if entry.kind == "block" and last.isdigit() else last.replace("embed_tokens", "embed")


def pin_targets(plan) -> list:
    """Tiers a unit can be pinned to under this plan, then the planner's own choice."""
    tiers = [plan.resident_tier] + [t for t in plan.streamed_tiers
                                    if t != "disk" or plan.budgets.get("disk") is not None]
    return tiers + [UNPIN]


def plan_state(plan) -> dict:
    return {
        "model": plan.model, "device": plan.device, "targets": pin_targets(plan),
        "entries": [{"name": e.name, "label": short_label(e), "bytes": e.bytes, "tier": e.tier,
                     "pinned": e.pinned, "kind": e.kind} for e in plan.entries],
    }


def shown_tiers(plan) -> list:
    """The tiers this plan uses: no gpu row when the CPU computes, no disk row without a disk tier."""
    totals = plan.totals()
    return [t for t in TIERS
            if not (t == "gpu" and plan.device != "cuda")
            and not (t == "disk" and plan.budgets.get("disk") is None and totals["disk"] == 0)]


def memory_state(plan) -> list:
    """Per tier: weights, each reservation apart (KV cache, activations, ...), and the budget."""
    totals, used = plan.totals(), plan.used()
    rows = []
    for tier in shown_tiers(plan):
        reserved = dict(plan.reserved) if tier == plan.resident_tier else {}
        if tier == "cpu":
            reserved.update(plan.host_reserved)
        rows.append({"tier": tier, "weights": totals[tier], "used": used[tier], "budget": plan.budgets.get(tier),
                     "reserved": [{"name": k, "bytes": v} for k, v in reserved.items() if v]})
    return rows
