"""Inline SVG of the layer map and the memory bars, for outputs viewed without a kernel.

The timeline's static form is ``nb_offload.timeline.Timeline``; these two complete the set.
SVG rather than HTML tables so GitHub's sanitiser keeps the colours.
"""

from __future__ import annotations

import html

from ..budget import format_size
from .state import RESERVED_COLORS, TIER_COLORS, memory_state, short_label

CELL, GAP, PER_ROW = 34, 4, 20


def _legend(plan, y: int) -> str:
    totals = plan.totals()
    parts, x = [], 0
    for tier, color in TIER_COLORS.items():
        count = sum(1 for e in plan.entries if e.tier == tier)
        if not count:
            continue
        label = f"{tier}: {count} units, {format_size(totals[tier])}"
        parts.append(f"<rect x='{x}' y='{y}' width='10' height='10' fill='{color}'/>"
                     f"<text x='{x + 14}' y='{y + 9}' font-size='11'>{html.escape(label)}</text>")
        x += 20 + 7 * len(label)
    return "".join(parts)


def layer_map_svg(plan) -> str:
    """One square per unit, in plan order, coloured by tier; pinned units get a white corner."""
    cells = []
    for i, e in enumerate(plan.entries):
        x, y = (i % PER_ROW) * (CELL + GAP), (i // PER_ROW) * (CELL + GAP)
        label = short_label(e)
        tip = f"{e.name}: {e.tier}, {format_size(e.bytes)}" + (", pinned" if e.pinned else "")
        pin = (f"<path d='M{x + CELL - 10},{y} h10 v10 z' fill='white'/>" if e.pinned else "")
        cells.append(f"<g><title>{html.escape(tip)}</title>"
                     f"<rect x='{x}' y='{y}' width='{CELL}' height='{CELL}' rx='3' fill='{TIER_COLORS[e.tier]}'/>{pin}"
                     f"<text x='{x + CELL / 2}' y='{y + CELL / 2 + 4}' font-size='{10 if len(label) < 6 else 8}' "
                     f"fill='white' text-anchor='middle'>{html.escape(label[:8])}</text></g>")
    rows = (len(plan.entries) + PER_ROW - 1) // PER_ROW
    height = rows * (CELL + GAP) + 16
    width = min(len(plan.entries), PER_ROW) * (CELL + GAP)
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{max(width, 420)}' height='{height}' "
            f"font-family='sans-serif'>{''.join(cells)}{_legend(plan, height - 12)}</svg>")


def memory_svg(plan) -> str:
    """Per tier: a bar of weights then reservations, against the budget."""
    rows = memory_state(plan)
    width, bar, label, pitch = 520, 16, 60, 48
    out = []
    for r, row in enumerate(rows):
        y = r * pitch
        scale = max(row["budget"] or 0, row["used"], 1)
        x = label
        segs = [(row["tier"] + " weights", row["weights"], TIER_COLORS[row["tier"]])]
        segs += [(p["name"].replace("_", " "), p["bytes"], RESERVED_COLORS.get(p["name"], "#9e9e9e"))
                 for p in row["reserved"]]
        for name, nbytes, color in [s for s in segs if s[1]]:
            w = nbytes / scale * (width - label)
            out.append(f"<rect x='{x:.1f}' y='{y}' width='{max(w, 0.5):.1f}' height='{bar}' fill='{color}' "
                       f"stroke='white' stroke-width='0.5'><title>{html.escape(name)}: {format_size(nbytes)}"
                       "</title></rect>")
            x += w
        of = f" of {format_size(row['budget'])}" if row["budget"] is not None else ""
        reserved = ", ".join(f"{p['name'].replace('_', ' ')} {format_size(p['bytes'])}" for p in row["reserved"])
        summary = f"{format_size(row['used'])} used{of}: weights {format_size(row['weights'])}"
        out.append(f"<text x='0' y='{y + 12}' font-size='12'>{row['tier']}</text>"
                   f"<rect x='{label}' y='{y}' width='{width - label}' height='{bar}' fill='none' stroke='#999'/>"
                   f"<text x='{label}' y='{y + bar + 12}' font-size='11'>{html.escape(summary)}</text>"
                   f"<text x='{label}' y='{y + bar + 25}' font-size='11'>"
                   f"{html.escape(reserved and 'reserved: ' + reserved)}</text>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width + 2}' height='{len(rows) * pitch}' "
            f"font-family='sans-serif'>{''.join(out)}</svg>")
