"""The static views (nb_offload.views): the plan's table as text and HTML, the layer map and
memory bars as SVG, a trace's timeline, and the one palette they and the widgets draw with.
Synthetic plans and traces: no model, no torch."""

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from nb_offload import OffloadError, views
from nb_offload.budget import format_size
from nb_offload.planner import TIERS, Plan, PlanEntry
from nb_offload.trace import ALL_LANES, LANES, Trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = "<script>alert('x')</script>"


def blocks(spec, head="model.layers"):
    """``[(tier, pinned), ...]`` -> block entries head.0, head.1, ... of 100 + i bytes."""
    return [PlanEntry(f"{head}.{i}", 100 + i, tier, pinned) for i, (tier, pinned) in enumerate(spec)]


def cuda_plan(**kw):
    spec = [("gpu", False)] * 4 + [("cpu", False)] * 2 + [("cpu", True)] + [("cpu", False)] + [("disk", False)] * 3
    entries = ([PlanEntry("model.embed_tokens", 1000, "gpu", False, "top", ("model.embed_tokens", "lm_head"))]
               + blocks(spec) + [PlanEntry("model.norm", 10, "gpu", True, "top")])
    args = dict(entries=entries, device="cuda", budgets={"gpu": 10_000, "cpu": 20_000, "disk": 50_000},
                reserved={"kv_cache": 500, "activations": 200, "workspace": 0, "staging_slots": 300},
                host_reserved={"disk_staging": 600, "library_code": 70}, model="tiny")
    return Plan(**{**args, **kw})


# -- the plan's table ---------------------------------------------------------------------------
def test_plan_text_folds_runs_of_blocks_and_totals_each_tier():
    plan = cuda_plan()
    text = str(plan)
    assert text == views.plan_text(plan)                      # Plan.__str__ delegates
    rows = [line.split() for line in text.splitlines()[2:] if line.startswith("  model")]
    assert [r[0] for r in rows] == ["model.embed_tokens", "model.layers.0-3", "model.layers.4-5",
                                    "model.layers.6", "model.layers.7", "model.layers.8-10", "model.norm"]
    # a pinned block breaks the run: layers 4-5, then 6 (pinned), then 7 alone
    line = {r[0]: " ".join(r) for r in rows}
    assert line["model.layers.0-3"].endswith("(4 blocks)")
    assert format_size(100 + 101 + 102 + 103) in line["model.layers.0-3"]
    assert line["model.layers.6"].split()[-1] == "yes" and "blocks" not in line["model.layers.7"]
    assert line["model.layers.8-10"].split()[1] == "disk"
    assert "model.embed_tokens = lm_head" in text            # a tied unit shows its aliases
    totals, used = plan.totals(), plan.used()
    for tier in TIERS:
        expected = (f"  {tier}: {format_size(totals[tier])} weights, {format_size(used[tier])} used "
                    f"of {format_size(plan.budgets[tier])}")
        assert expected in text.splitlines()
    assert totals["gpu"] == 1000 + 406 + 10 and used["gpu"] == totals["gpu"] + 1000
    assert "  reserved on gpu: kv cache 500 B, activations 200 B, staging slots 300 B" in text
    assert text.splitlines()[-1] == f"  streamed per step: {format_size(totals['cpu'])} from cpu, " \
                                    f"{format_size(totals['disk'])} from disk"


def test_plan_text_on_the_cpu_leaves_out_the_gpu_and_an_absent_disk():
    entries = blocks([("cpu", False)] * 3)
    plan = Plan(entries=entries, device="cpu", budgets={"gpu": None, "cpu": 5000, "disk": None},
                reserved={"kv_cache": 50}, split_blocks=True)
    lines = str(plan).splitlines()
    assert lines[0] == "nb_offload plan for model: compute on cpu, context 2048, batch 1"
    assert [line.split(":")[0].strip() for line in lines if ": " in line and " weights" in line] == ["cpu"]
    assert lines[-1].endswith("(blocks a submodule at a time)")
    assert len([line for line in lines if "model.layers" in line]) == 1      # 0-2 in one row


def test_repr_pretty_shows_the_table():
    plan = cuda_plan()
    shown = []
    plan._repr_pretty_(type("P", (), {"text": lambda self, s: shown.append(s)})(), False)
    assert shown == [views.plan_text(plan)]


def test_html_escapes_hostile_model_and_unit_names():
    entries = blocks([("gpu", False)] * 2) + [PlanEntry(HOSTILE, 5, "cpu", True, "top")]
    plan = Plan(entries=entries, device="cuda", budgets={"gpu": 1000, "cpu": 1000, "disk": None},
                reserved={}, model=f"m{HOSTILE}")
    outputs = {"table": plan._repr_html_(), "map": views.layer_map_html(plan, HOSTILE),
               "memory": views.memory_html(plan, HOSTILE)}
    assert outputs["table"] == views.plan_html(plan)         # Plan._repr_html_ delegates
    for what, out in outputs.items():
        assert "<script" not in out, what
        assert "&lt;script&gt;" in out, what
    table = outputs["table"]
    assert f"<code>m{HOSTILE.replace('<', '&lt;').replace('>', '&gt;')}" in table.replace("&#x27;", "'")
    assert "<td><code>model.layers.0-1</code></td>" in table
    assert table.count("<tr>") == 1 + 2 + 2     # header, 2 rows, a total per tier used (no disk tier here)
    assert f"color:{views.TIER_COLORS['cpu']}" in table


# -- the layer map and memory bars ----------------------------------------------------------------
def parse(svg):
    return ET.fromstring(svg)


def test_layer_map_has_one_cell_per_unit_in_its_tier_colour():
    plan = cuda_plan()
    root = parse(views.layer_map_svg(plan))
    cells = root.findall(f"{SVG}g")
    assert len(cells) == len(plan.entries)
    for cell, e in zip(cells, plan.entries):
        rect = cell.find(f"{SVG}rect")
        assert rect.get("fill") == views.TIER_COLORS[e.tier], e.name
        assert cell.find(f"{SVG}title").text.startswith(f"{e.name}: {e.tier}")
        assert (cell.find(f"{SVG}path") is not None) == e.pinned          # pinned: a white corner
    labels = [cell.find(f"{SVG}text").text for cell in cells]
    assert labels[:3] == ["embed", "0", "1"] and labels[-1] == "norm"
    # the legend: one swatch per tier in use, in the palette's colour, with its unit count
    legend = [r for r in root.findall(f"{SVG}rect")]
    assert [r.get("fill") for r in legend] == [views.TIER_COLORS[t] for t in TIERS]
    texts = [t.text for t in root.findall(f"{SVG}text")]
    assert f"disk: 3 units, {format_size(plan.totals()['disk'])}" in texts


def test_layer_map_wraps_rows_and_colours_follow_the_palette(monkeypatch):
    plan = Plan(entries=blocks([("disk", False)] * 45), device="cpu",
                budgets={"cpu": 100, "disk": 10_000}, reserved={})
    monkeypatch.setitem(views.TIER_COLORS, "disk", "#123456")
    root = parse(views.layer_map_svg(plan))
    rects = [g.find(f"{SVG}rect") for g in root.findall(f"{SVG}g")]
    assert len(rects) == 45 and {r.get("fill") for r in rects} == {"#123456"}
    assert len({r.get("y") for r in rects}) == 3                 # 20 a row


def test_memory_bars_colour_weights_by_tier_and_each_reservation():
    plan = cuda_plan()
    root = parse(views.memory_svg(plan))
    segments = {r.find(f"{SVG}title").text.split(":")[0]: r.get("fill")
                for r in root.findall(f"{SVG}rect") if r.find(f"{SVG}title") is not None}
    assert segments == {
        "gpu weights": views.TIER_COLORS["gpu"], "kv cache": views.RESERVED_COLORS["kv_cache"],
        "activations": views.RESERVED_COLORS["activations"], "staging slots": views.RESERVED_COLORS["staging_slots"],
        "cpu weights": views.TIER_COLORS["cpu"], "disk staging": views.RESERVED_COLORS["disk_staging"],
        "library code": views.OTHER_COLOR, "disk weights": views.TIER_COLORS["disk"]}
    rows = views.memory_state(plan)
    assert [r["tier"] for r in rows] == ["gpu", "cpu", "disk"]
    assert {r["tier"]: r["used"] for r in rows} == plan.used()


# -- the timeline ---------------------------------------------------------------------------------
def make_trace():
    """3 steps: a read and a copy of 1 KiB and 4 KiB, a compute, and the step itself."""
    trace = Trace()
    for s in range(3):
        trace.step = s
        trace.host_event("read", f"model.layers.{s}", 1.0 + s, 1.25 + s, 1024)
        trace.host_event("copy", f"model.layers.{s}", 1.25 + s, 1.5 + s, 4096)
        trace.host_event("compute", f"model.layers.{s}", 1.5 + s, 1.75 + s)
        trace.host_event("step", "", 1.0 + s, 1.9 + s)
    trace.flush()
    return trace


def test_timeline_svg_has_one_rect_per_event_in_its_lane_colour():
    trace = make_trace()
    out = views.Timeline(trace, title="run")._repr_html_()
    assert out.startswith("<div><b>nb_offload timeline</b> run (12 events)")
    root = parse(re.search(r"<svg.*</svg>", out).group(0))
    rects = root.findall(f"{SVG}rect")
    assert len(rects) == len(trace) == 12
    lane_y = {}
    for rect in rects:
        kind = rect.find(f"{SVG}title").text.split()[0]
        assert rect.get("fill") == views.LANE_COLORS[kind]
        lane_y.setdefault(kind, set()).add(rect.get("y"))
    assert all(len(ys) == 1 for ys in lane_y.values())          # one lane per kind
    assert sorted(lane_y, key=lambda k: int(next(iter(lane_y[k])))) == list(LANES)
    assert [t.text for t in root.findall(f"{SVG}text")][:4] == list(LANES)


def test_timeline_text_gives_counts_and_bytes_per_lane():
    timeline = views.Timeline(make_trace(), title="run")
    lines = repr(timeline).splitlines()
    assert lines[0] == "timeline run: 12 events over 2900.0 ms, the last run"
    per_lane = {line.split()[0]: line for line in lines[1:]}
    assert list(per_lane) == list(LANES)
    assert per_lane["read"].split()[1:3] == ["3", "events,"]
    assert f"{format_size(3 * 1024)}, busy 750.0 ms" in per_lane["read"]
    assert f"{format_size(3 * 4096)}, busy 750.0 ms" in per_lane["copy"]
    assert "GB/s while busy" in per_lane["copy"] and "GB/s" not in per_lane["compute"]
    assert f"{format_size(0)}, busy 2700.0 ms" in per_lane["step"]
    shown = []
    timeline._repr_pretty_(type("P", (), {"text": lambda self, s: shown.append(s)})(), False)
    assert shown == [repr(timeline)]


def test_timeline_keeps_the_latest_steps_and_escapes_names():
    trace = make_trace()
    trace.host_event("copy", HOSTILE, 5.0, 5.1, 10)
    trace.flush()
    latest = views.Timeline(trace, title=HOSTILE, last_steps=1, runs="all")
    assert {e.step for e in latest.events} == {2} and len(latest.events) == 5
    out = latest._repr_html_()
    assert "<script" not in out and out.count("&lt;script&gt;") >= 2      # title and tooltip
    assert len(views.Timeline(trace, max_events=3, runs="all").events) == 3
    empty = views.Timeline(Trace(), title="t")
    assert "no events yet" in repr(empty) and "<svg" not in empty._repr_html_()


def two_cells_apart(idle=15.0):
    """Two generates' worth of events with ``idle`` seconds between them, as two notebook cells."""
    trace = Trace()
    for base in (100.0, 100.0 + 0.6 + idle):
        for i in range(3):
            t = base + 0.2 * i
            trace.host_event("copy", f"layers.{i}", t, t + 0.1, 4096)
            trace.host_event("compute", f"layers.{i}", t + 0.1, t + 0.2)
    trace.flush()
    return trace


def test_the_timeline_shows_the_last_run_and_cuts_idle_time_out():
    trace = two_cells_apart()
    assert [len(run) for run in trace.runs()] == [6, 6]
    last = views.Timeline(trace, title="t")
    assert len(last.events) == 6 and min(e.start for e in last.events) > 110      # the second cell only
    assert "over 600.0 ms, the last run (2 in the trace" in repr(last)
    both = views.Timeline(trace, title="t", runs="all")
    assert len(both.events) == 12 and len(both.joins) == 1
    span = max(b for _, _, b in both.placed)
    assert 1.2 <= span < 1.3            # 2 x 600 ms busy and a short mark, not the 15 s between the cells
    assert "2 runs, the idle time between them cut out" in repr(both)
    assert "stroke-dasharray" in both._repr_html_() and "stroke-dasharray" not in last._repr_html_()
    assert len(views.Timeline(trace, runs=1).events) == 6
    with pytest.raises(OffloadError, match="runs='first' is not valid"):
        views.Timeline(trace, runs="first")


def test_the_plotly_timeline_and_figures():
    pytest.importorskip("plotly")
    from nb_offload.figures import budget_figure, rates_figure, timeline_figure
    trace = two_cells_apart()
    fig = timeline_figure(trace)
    assert {d.name for d in fig.data} == {"copy", "compute"}
    assert max(b + x for d in fig.data for b, x in zip(d.base, d.x)) < 700        # ms: the last run only
    both = timeline_figure(trace, runs="all")
    assert max(b + x for d in both.data for b, x in zip(d.base, d.x)) < 1300
    assert len(both.layout.shapes) == 1 and "2 runs" in both.layout.title.text
    rates = rates_figure(trace, runs="all", bins=10)
    assert [d.name for d in rates.data] == ["link (copies)"] and max(rates.data[0].y) > 0
    b = budget_figure([{"budget": 12, "predicted": 20.0, "measured": 19.0}, {"budget": 4, "predicted": 5.0}])
    assert list(b.data[0].x) == [4, 12] and list(b.data[1].y) == [19.0]
    with pytest.raises(OffloadError, match="runs=0 is not valid"):
        timeline_figure(trace, runs=0)


# -- one palette, and a light module --------------------------------------------------------------
def test_one_palette_for_every_view():
    assert tuple(views.TIER_COLORS) == TIERS and tuple(views.LANE_COLORS) == ALL_LANES
    assert views.PALETTE == {"tiers": views.TIER_COLORS, "lanes": views.LANE_COLORS,
                             "reserved": views.RESERVED_COLORS}
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for group in views.PALETTE.values() for c in group.values())
    # the front end's colour for a reservation without one of its own is the static bars' own
    memory_ts = os.path.join(ROOT, "labextension", "src", "memory.ts")
    if not os.path.isfile(memory_ts):
        pytest.skip("no labextension sources here")
    assert f'colors.reserved[r.name] ?? "{views.OTHER_COLOR}"' in open(memory_ts).read()


def test_views_imports_no_torch_ipython_or_widgets():
    code = ("import sys, nb_offload.views\n"
            "heavy = ('torch', 'IPython', 'ipywidgets', 'anywidget', 'traitlets', 'transformers')\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
            "             or m.startswith(('nb_offload.widgets', 'nb_offload.magics')))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_moves_are_named_with_consecutive_blocks_folded():
    assert views.fold_names(["model.layers.3", "model.layers.4", "model.layers.5", "lm_head", "model.layers.9"]) \
        == ["model.layers.3-5", "lm_head", "model.layers.9"]
    plan = cuda_plan()
    names = [e.name for e in plan.entries]
    moved = {names.index("model.layers.1"): ("cpu", "gpu"), names.index("model.layers.2"): ("cpu", "gpu"),
             names.index("model.norm"): ("gpu", "cpu")}
    assert views.moves_text(moved, plan) == "moved model.layers.1-2 cpu -> gpu, model.norm gpu -> cpu"
    assert views.moves_text({}, plan) == "nothing moved"


def test_the_generate_summary_says_what_streamed_in_words():
    from nb_offload.trace import Stats
    stats = Stats()
    before = stats.as_dict()
    assert "nothing streamed" in stats.run_summary(before, 8, 1.0)
    stats.bytes_from_disk += 3 * 2**20
    line = stats.run_summary(before, 5, 1.0, held_on="cpu", asked=8)
    assert "streamed 3.0 MiB from disk" in line and "host memory" not in line      # a CPU machine: no "0 B"
    assert "(stopped at the end-of-sequence token, 8 allowed)" in line
    assert "stopped" not in stats.run_summary(before, 8, 1.0, asked=8)
    stats.bytes_from_cpu += 2**30
    stats.held_last = 2
    line = stats.run_summary(before, 8, 1.0, link_gbps=50.0)
    assert "1.0 GiB from host memory, 3.0 MiB from disk" in line and "kept on the gpu for this generate" in line
    assert "% of the PCIe limit (50 GB/s)" in line
