"""Static views of a plan and of a trace: text for terminals, HTML and inline SVG for notebooks.

Every rendering the package makes lives here, for outputs viewed with or without a kernel (SVG
rather than HTML tables where colour matters, so GitHub's sanitiser keeps it): the plan's table
(``Plan.__str__`` and ``Plan._repr_html_`` delegate here), the layer map and memory bars (the
widgets' static copies), and ``Timeline``, a trace as SVG and a text summary. The live,
zoomable views are the widgets' job; they draw with the same ``PALETTE``.

Imports no torch, no IPython and nothing of the notebook layer: plans and traces come in as
plain objects (``Plan``/``PlanEntry``, ``Trace``/``TraceEvent``), so this module stays cheap to
import and the core can use it.
"""

from __future__ import annotations

import html

from .budget import format_size

# -- the palette ----------------------------------------------------------------------------------
# One set of colours for every view, static and live: the widgets send PALETTE to the browser
# as their ``colors`` state. Keys follow planner.TIERS and trace.ALL_LANES, in their order.
TIER_COLORS = {"gpu": "#2e7d32", "cpu": "#1565c0", "disk": "#8d6e63"}
LANE_COLORS = {"read": "#8d6e63", "copy": "#1565c0", "compute": "#2e7d32", "step": "#9e9e9e", "cpu": "#00897b"}
# Reservations are what a tier holds besides weights; each gets its own colour in the bars.
RESERVED_COLORS = {"kv_cache": "#ef6c00", "activations": "#7b1fa2", "workspace": "#757575",
                   "staging_slots": "#00838f", "disk_staging": "#5d4037"}
OTHER_COLOR = "#9e9e9e"     # a reservation without a colour of its own (the front end uses the same)
PALETTE = {"tiers": TIER_COLORS, "lanes": LANE_COLORS, "reserved": RESERVED_COLORS}


# -- plan data, as the views (and the widgets) show it --------------------------------------------
def short_label(entry) -> str:
    """A cell label: the block index, or the last part of a top-level unit's name."""
    last = entry.name.rpartition(".")[2]
    return last if entry.kind == "block" and last.isdigit() else last.replace("embed_tokens", "embed")


def shown_tiers(plan) -> list:
    """The tiers this plan uses: no gpu row when the CPU computes, no disk row without a disk tier."""
    totals = plan.totals()       # every tier, in planner.TIERS order
    return [t for t in totals
            if not (t == "gpu" and plan.device != "cuda")
            and not (t == "disk" and plan.budgets.get("disk") is None and totals["disk"] == 0)]


def tier_totals(plan) -> list:
    """``(tier, "W weights, U used of B")`` for each tier the plan uses: the table's last lines."""
    totals, used = plan.totals(), plan.used()
    out = []
    for tier in shown_tiers(plan):
        budget = plan.budgets.get(tier)
        of = f" of {format_size(budget)}" if budget is not None else ""
        out.append((tier, f"{format_size(totals[tier])} weights, {format_size(used[tier])} used{of}"))
    return out


def memory_state(plan) -> list:
    """Per tier: weights, each reservation apart (KV cache, activations, ...), and the budget (none for disk)."""
    totals, used = plan.totals(), plan.used()
    rows = []
    for tier in shown_tiers(plan):
        reserved = dict(plan.reserved) if tier == plan.resident_tier else {}
        if tier == "cpu":
            reserved.update(plan.host_reserved)
        # The disk tier's "budget" is the drive's free space when planned: not a limit the user set, and
        # so large that a bar against it always looks empty. Its bar shows what is there.
        budget = None if tier == "disk" else plan.budgets.get(tier)
        rows.append({"tier": tier, "weights": totals[tier], "used": used[tier], "budget": budget,
                     "reserved": [{"name": k, "bytes": v} for k, v in reserved.items() if v]})
    return rows


def plan_rows(plan) -> list:
    """The table's rows: runs of consecutive blocks on one tier fold into one row (model.layers.0-7)."""
    rows = []
    for e in plan.entries:
        prev = rows[-1] if rows else None
        head, _, idx = e.name.rpartition(".")
        if (prev and e.kind == "block" and prev["kind"] == "block" and prev["tier"] == e.tier
                and prev["pinned"] == e.pinned and prev["fmt"] == e.fmt and idx.isdigit() and prev["head"] == head
                and prev["last"] + 1 == int(idx) and prev["compute"] == e.compute):
            prev["last"] = int(idx)
            prev["bytes"] += e.bytes
            prev["count"] += 1
            continue
        rows.append({"head": head, "first": int(idx) if idx.isdigit() else None,
                     "last": int(idx) if idx.isdigit() else None, "name": e.name, "kind": e.kind,
                     "tier": e.tier, "pinned": e.pinned, "bytes": e.bytes, "count": 1, "fmt": e.fmt,
                     "aliases": e.aliases, "compute": e.compute})
    for r in rows:
        if r["count"] > 1:
            r["name"] = f"{r['head']}.{r['first']}-{r['last']}"
        elif len(r["aliases"]) > 1:
            r["name"] = " = ".join(r["aliases"])
    return rows


def fold_names(names) -> list:
    """Unit names with runs of consecutive indices folded: model.layers.3, .4, .5 -> model.layers.3-5."""
    out = []
    for name in names:
        head, _, idx = name.rpartition(".")
        last = out[-1] if out else None
        if last and idx.isdigit() and last[0] == head and last[2] + 1 == int(idx):
            last[2] = int(idx)
            continue
        out.append([head, int(idx), int(idx)] if idx.isdigit() else [name, None, None])
    return [n if first is None else (f"{n}.{first}" if first == last else f"{n}.{first}-{last}")
            for n, first, last in out]


def moves_text(moved: dict, plan) -> str:
    """What a re-plan moved (``{unit index: (old tier, new tier)}``), named: "moved model.layers.20-23
    cpu -> gpu, lm_head gpu -> cpu"."""
    if not moved:
        return "nothing moved"
    by_move = {}
    for idx in sorted(moved):
        by_move.setdefault(moved[idx], []).append(plan.entries[idx].name)
    return "moved " + ", ".join(f"{', '.join(fold_names(names))} {old} -> {new}"
                                for (old, new), names in by_move.items())


# -- the plan as a table ----------------------------------------------------------------------------
def plan_text(plan) -> str:
    """The plan for a terminal: folded rows, then each tier's totals, reservations and traffic."""
    rows = plan_rows(plan)
    width = max([len(r["name"]) for r in rows] + [6])
    lines = [f"nb_offload plan for {plan.model or 'model'}: compute on {plan.device}, "
             f"context {plan.context}, batch {plan.batch}",
             f"  {'module':<{width}}  {'tier':<4}  {'format':<6}  {'size':>10}  pinned"]
    for r in rows:
        count = f" ({r['count']} blocks)" if r["count"] > 1 else ""
        on_cpu = {"cpu": " computed on the CPU", "in place": " read in place by the GPU"}.get(r["compute"], "")
        lines.append(f"  {r['name']:<{width}}  {r['tier']:<4}  {r['fmt']:<6}  {format_size(r['bytes']):>10}  "
                     f"{'yes' if r['pinned'] else '':<6}{count}{on_cpu}".rstrip())
    lines += [f"  {tier}: {total}" for tier, total in tier_totals(plan)]
    extra = ", ".join(f"{k.replace('_', ' ')} {format_size(v)}" for k, v in plan.reserved.items() if v)
    lines.append(f"  reserved on {plan.resident_tier}: {extra}")
    moved = plan.streamed_bytes_per_token()
    lines.append("  streamed per step: " + ", ".join(f"{format_size(v)} from {k}" for k, v in moved.items())
                 + (" (blocks a submodule at a time)" if plan.split_blocks else "")
                 + (" (MoE blocks: only the routed experts, at batch 1" if any(e.routed_bytes for e in plan) else "")
                 + (", before the expert cache's hits)" if plan.reserved.get("expert_cache")
                    else ")" if any(e.routed_bytes for e in plan) else ""))
    blocks = [e for e in plan if e.compute == "cpu"]
    if blocks:
        why = (f"compute=\"hybrid\": {100 * plan.block_share:.0f}% of the blocks in host memory, the share "
               f"whose step is shortest at the CPU's {plan.rates[0]:.1f}"
               f"{' (the rate its blocks reached decoding)' if plan.rates_reached else _rest(plan)} and the link's "
               f"{plan.rates[1]:.1f} GB/s, "
               f"{plan.prefetch} {'pieces' if plan.split_blocks else 'units'} copied ahead"
               if plan.block_share is not None
               else "pinned \"cpu-compute\"")
        lines.append(f"  computed on the CPU where their bytes are, not streamed: {len(blocks)} blocks, "
                     f"{format_size(sum(e.bytes for e in blocks))} a step ({why})")
        lines += _kernel_lines(plan, "their products" + (", and those of the routed experts the CPU computes,"
                                                          if plan.expert_share else ""))
        if plan.cpu_products == "reordered":
            lines.append("  their products from copies of the weights reordered for the CPU where bit-identical to "
                         f"F.linear ({format_size(plan.host_reserved.get('reordered_weights', 0))} of host memory; "
                         "faster in the CPU's measure)")
    elif plan.device == "cpu":      # the CPU computes every unit
        lines += _kernel_lines(plan, "one-row products of the bf16 linears in host memory", short="products")
    if plan.compute_choice:
        lines.append(f"  {plan.compute_choice}")
    if plan.expert_share == "auto":
        lines.append("  routed experts the GPU doesn't hold: a share computed on the CPU from host memory, from the "
                     "CPU's and the link's rates measured at load (expert_compute=\"auto\")")
    elif plan.expert_share:
        lines.append(f"  routed experts the GPU doesn't hold: {100 * plan.expert_share:.0f}% computed on the CPU from "
                     f"host memory, {format_size(plan.cpu_bytes_per_token())} of them a step, not streamed")
    if plan.expert_share and not blocks:
        lines += _kernel_lines(plan, "their one-row products")
    return "\n".join(lines)


def _rest(plan) -> str:
    """What the plan's CPU rate is made of, where the load measured a block's whole forward (block_rest.py)."""
    if not plan.cpu_rest:
        return ""
    products, rest = plan.cpu_rest
    return f" (a block's forward: its products read at {products:.1f}, and {1e3 * rest:.3g} ms besides)"


def _kernel_lines(plan, what: str, short: str | None = None) -> list:
    """The plan's line on how the CPU multiplies ``what`` (``short``: a shorter name for it in the line saying
    the kernel can't run), where it is one of nb_offload's kernels or cpu_kernel="fast" was asked for."""
    if plan.cpu_products == "amx":
        return [f"  {what} by nb_offload's AMX kernel, with F.linear's bits (the chunks oneDNN sums in found at load "
                "for each shape; F.linear where none is)"]
    if plan.cpu_products == "fast":
        return [f"  {what} by nb_offload's own kernel (cpu_kernel=\"fast\": it sums in another order than F.linear, "
                "so tokens may differ from transformers')"]
    if plan.cpu_kernel_why_not:
        return [f"  {short or what} exact: cpu_kernel=\"fast\" can't run here ({plan.cpu_kernel_why_not})"]
    return []


def plan_html(plan) -> str:
    """The plan's table as HTML: folded rows with the tier in its colour, then each tier's totals."""
    body = "".join(
        f"<tr><td><code>{html.escape(r['name'])}</code></td>"
        f"<td><span style='color:{TIER_COLORS[r['tier']]};font-weight:bold'>{r['tier']}</span></td>"
        f"<td>{html.escape(r['fmt'])}</td><td style='text-align:right'>{format_size(r['bytes'])}</td>"
        f"<td>{'yes' if r['pinned'] else ''}{', computed on the CPU' if r['compute'] == 'cpu' else ''}</td></tr>"
        for r in plan_rows(plan))
    foot = "".join(f"<tr><th>{tier}</th><td colspan=4>{total}</td></tr>" for tier, total in tier_totals(plan))
    return (f"<div><b>nb_offload plan</b> for <code>{html.escape(plan.model)}</code> "
            f"(compute on {plan.device}, context {plan.context}, batch {plan.batch})"
            f"<table><tr><th>module</th><th>tier</th><th>format</th><th>size</th><th>pinned</th></tr>{body}{foot}"
            "</table></div>")


# -- the layer map and the memory bars, as SVG --------------------------------------------------------
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


def expert_moves(plan, e) -> str:
    """How a step brings a MoE block's routed experts: "routed" (only those chosen, experts.py), "whole"
    (streamed with the block) or "resident"."""
    if e.routed_bytes:
        return "routed"
    return "resident" if e.tier == plan.resident_tier else "whole"


EXPERT_MOVES = {"routed": "a step brings only those routed to", "whole": "streamed with the block",
                "resident": "resident"}


def _expert_strip(e, x, y) -> str:
    """A MoE block's experts as ticks along the cell's foot (a plain bar where there are more than 16)."""
    ticks = e.experts if e.experts <= 16 else 1
    width = (CELL - 4 - (ticks - 1)) / ticks
    return "".join(f"<rect x='{x + 2 + k * (width + 1):.1f}' y='{y + CELL - 6}' width='{width:.1f}' height='4' "
                   "fill='white' fill-opacity='0.45'/>" for k in range(ticks))


def layer_map_svg(plan) -> str:
    """One square per unit, in plan order, coloured by tier; pinned units get a white corner, blocks the CPU
    computes are hatched."""
    cells = []
    for i, e in enumerate(plan.entries):
        x, y = (i % PER_ROW) * (CELL + GAP), (i // PER_ROW) * (CELL + GAP)
        label = short_label(e)
        tip = (f"{e.name}: {e.tier}, " + (f"{e.fmt}, " if e.fmt else "") + format_size(e.bytes)
               + (", pinned" if e.pinned else ""))
        pin = (f"<path d='M{x + CELL - 10},{y} h10 v10 z' fill='white'/>" if e.pinned else "")
        if e.experts:
            tip += f"; experts: {e.experts}, {e.top_k} a token, {EXPERT_MOVES[expert_moves(plan, e)]}"
            pin += _expert_strip(e, x, y)
        if e.compute == "in place":
            tip += "; its rows read by the GPU in host memory as they are needed, not streamed"
        if e.compute == "cpu":      # hatched: the CPU computes it where its bytes are (hybrid.py)
            tip += "; computed on the CPU where its bytes are, not streamed"
            pin += "".join(f"<path d='M{x},{y + k} L{x + k},{y} M{x + k},{y + CELL} L{x + CELL},{y + k}' "
                           "stroke='white' stroke-opacity='0.35' stroke-width='2'/>" for k in range(7, CELL, 7))
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
        segs += [(p["name"].replace("_", " "), p["bytes"], RESERVED_COLORS.get(p["name"], OTHER_COLOR))
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


def layer_map_html(plan, title: str = "") -> str:
    """The layer map with its heading (the layer-map widget's copy for viewers without a kernel)."""
    return f"<div><b>nb_offload layer map</b> {html.escape(title)}<br>{layer_map_svg(plan)}</div>"


def memory_html(plan, title: str = "") -> str:
    """The memory bars with their heading (the memory widget's copy for viewers without a kernel)."""
    return f"<div><b>nb_offload memory</b> {html.escape(title)}<br>{memory_svg(plan)}</div>"


# -- a trace ------------------------------------------------------------------------------------------
def timeline_svg(events, joins=()) -> str:
    """One lane per event kind (in LANE_COLORS order), one rect per event, and a time axis. ``events``:
    TraceEvents, or ``(event, start, end)`` already placed on a collapsed axis (trace.collapse_idle), whose
    ``joins`` (where idle time was cut out) are drawn as dotted lines."""
    placed = [e if isinstance(e, tuple) else (e, e.start, e.end) for e in events]
    lanes = [k for k in LANE_COLORS if any(e.kind == k for e, _, _ in placed)]
    t0 = min(a for _, a, _ in placed)
    span = max(max(b for _, _, b in placed) - t0, 1e-9)
    width, lane_h, left = 900, 22, 70
    rects = []
    for e, a, b in placed:
        y = lanes.index(e.kind) * lane_h + 4
        x = left + (a - t0) / span * (width - left)
        w = max((b - a) / span * (width - left), 0.5)
        tip = (f"{e.kind} {e.unit} {(b - a) * 1e3:.2f} ms"
               + (f" {format_size(e.bytes)}" if e.bytes else ""))
        rects.append(f"<rect x='{x:.1f}' y='{y}' width='{w:.1f}' height='{lane_h - 8}' "
                     f"fill='{LANE_COLORS[e.kind]}'><title>{html.escape(tip)}</title></rect>")
    h = len(lanes) * lane_h + 18
    for j in joins:
        x = left + (j - t0) / span * (width - left)
        rects.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='0' y2='{h - 14}' stroke='#999' stroke-dasharray='3,3'>"
                     "<title>idle time between runs, cut out</title></line>")
    labels = "".join(f"<text x='2' y='{i * lane_h + 17}' font-size='12'>{k}</text>" for i, k in enumerate(lanes))
    axis = f"<text x='{left}' y='{h - 2}' font-size='11'>0 ms</text>" \
           f"<text x='{width - 60}' y='{h - 2}' font-size='11'>{span * 1e3:.1f} ms</text>"
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{h}'>{labels}{''.join(rects)}{axis}"
            "</svg>")


class Timeline:
    """A trace's reads, copies and compute: inline SVG for notebooks (it survives nbconvert and
    GitHub) and a text summary for terminals.

    ``runs``: "last" (default: the latest generate or cell, not the idle time before it), "all" (every
    run, the idle time between them cut out), or a count of the latest runs; ``last_steps``: only the
    latest forward steps; ``max_events``: at most the latest this many events are drawn. The summary
    counts the runs shown."""

    def __init__(self, trace, title: str = "", last_steps: int | None = None, max_events: int = 5000,
                 runs="last"):
        from .trace import choose_runs, collapse_idle, lane_totals, split_runs
        events = list(trace)
        if last_steps is not None and events:
            last = max(e.step for e in events)
            events = [e for e in events if e.step > last - last_steps]
        found = split_runs(events[-max_events:])
        chosen = choose_runs(found, runs)
        self.placed, self.joins = collapse_idle(chosen)
        self.events = [e for e, _, _ in self.placed]
        self.runs, self.all_runs = len(chosen), len(found)
        self.title = title
        self.summary = lane_totals(self.events)

    def __repr__(self):
        if not self.events:
            return f"<Timeline {self.title}: no events yet; run a generate first>"
        busy = max(b for _, _, b in self.placed)
        which = ("the last run" if self.runs == 1 else f"{self.runs} runs, the idle time between them cut out")
        if self.all_runs > self.runs:
            which += f" ({self.all_runs} in the trace: runs=\"all\" or --all shows them)"
        lines = [f"timeline{' ' + self.title if self.title else ''}: {len(self.events)} events over "
                 f"{busy * 1e3:.1f} ms, {which}"]
        for lane, s in self.summary.items():
            if s["count"]:
                rate = f", {s['bytes'] / s['seconds'] / 1e9:.1f} GB/s while busy" if s["bytes"] and s["seconds"] else ""
                lines.append(f"  {lane:<8} {s['count']:>6} events, {format_size(s['bytes']):>10}, "
                             f"busy {s['seconds'] * 1e3:.1f} ms{rate}")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):
        p.text(repr(self))

    def _repr_html_(self):
        if not self.events:
            return f"<div><i>{html.escape(repr(self))}</i></div>"
        return (f"<div><b>nb_offload timeline</b> {html.escape(self.title)} ({len(self.events)} events)"
                f"{timeline_svg(self.placed, self.joins)}<pre>{html.escape(repr(self))}</pre></div>")

