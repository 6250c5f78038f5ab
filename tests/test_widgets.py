"""The notebook widgets (nb_offload.widgets), kernel side: state after load, live and settled
trace events, re-pinning from the layer map, errors, the static fallback. The browser side is
tested in tests/browser/run.sh."""

import asyncio
import os
import subprocess
import sys
import threading
from array import array

import pytest

pytest.importorskip("anywidget")

from helpers import PROMPT  # noqa: E402

from nb_offload.errors import PinError  # noqa: E402
from nb_offload.planner import Plan, PlanEntry  # noqa: E402
from nb_offload.views import PALETTE, TIER_COLORS  # noqa: E402
from nb_offload.widgets import LayerMap, Memory, Timeline, dashboard, repin  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_shell(monkeypatch):
    """Outside a kernel by default, even if another test module made an IPython shell."""
    monkeypatch.setattr("nb_offload.widgets.cells.current_shell", lambda: None)


@pytest.fixture
def llm(model_dirs, tmp_path):
    import nb_offload
    model = nb_offload.load(model_dirs("llama"), device="cpu", disk=str(tmp_path / "offload"),
                            pins={"model.layers.2-3": "disk"}, progress=False)
    yield model
    model.unload()


@pytest.fixture
def dash(llm):
    """A dashboard whose outgoing widget messages are recorded instead of sent."""
    d = dashboard(llm)
    d.sent = []
    for w in (d.layer_map, d.timeline):
        w.send = lambda content, buffers=None, w=w: d.sent.append((w, content, buffers))
    yield d
    d.close()


def generate(llm, n=6):
    import torch
    return llm.generate(torch.tensor(PROMPT), max_new_tokens=n, min_new_tokens=n, do_sample=False)


def columns(header, buffers):
    """Decode a packed batch the way the browser does."""
    codes = {"start": "d", "end": "d", "bytes": "d", "kind": "B", "unit": "i", "step": "i"}
    out = {}
    for name, buf in zip(header["columns"], buffers):
        col = array(codes[name])
        col.frombytes(bytes(buf))
        out[name] = list(col)
    return out


def tiers(layer_map):
    return {e["name"]: e["tier"] for e in layer_map.plan["entries"]}


def test_import_loads_no_torch():
    code = "import sys, nb_offload, nb_offload.widgets; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_state_after_load(llm, dash):
    entries = dash.layer_map.plan["entries"]
    assert [e["name"] for e in entries] == [e.name for e in llm.plan]      # every unit, embeddings and head too
    assert {e["kind"] for e in entries} == {"top", "block"}
    assert tiers(dash.layer_map) == {e.name: e.tier for e in llm.plan}
    assert [e["name"] for e in entries if e["pinned"]] == ["model.layers.2", "model.layers.3"]
    assert dash.layer_map.plan["targets"] == ["cpu", "disk", "auto"]    # compute on cpu: no gpu tier
    assert dash.layer_map.colors["tiers"] == TIER_COLORS
    # the browser draws with the palette the static views use: tiers, lanes and reservations
    assert all(w.colors == PALETTE for w in (dash.layer_map, dash.memory, dash.timeline))
    rows = {r["tier"]: r for r in dash.memory.rows}
    assert set(rows) == {"cpu", "disk"}
    used = llm.plan.used()
    for tier, row in rows.items():
        assert row["used"] == used[tier] == row["weights"] + sum(p["bytes"] for p in row["reserved"])
        # the disk's "budget" is the drive's free space: not drawn as a limit (its bar would always look empty)
        assert row["budget"] == (None if tier == "disk" else llm.plan.budgets[tier])
    assert {p["name"] for p in rows["cpu"]["reserved"]} >= {"kv_cache", "activations", "staging_slots"}
    assert dash.timeline.events["count"] == len(llm.trace) == 0
    assert dash.sent == []


def test_generate_sends_batched_events(llm, dash):
    batches = []
    llm.trace.subscribe(batches.append)
    generate(llm)
    total = sum(len(b) for b in batches)
    assert len(batches) >= 6 and total == len(llm.trace)
    live = [(c, b) for w, c, b in dash.sent if w is dash.timeline]
    # Throttled: a tiny model steps far faster than 10 a second, so the batches were merged.
    assert 1 <= len(live) < len(batches)
    assert all(c["type"] == "events" for c, _ in live)

    dash.feed.flush()                    # what the end of a cell does
    live = [(c, b) for w, c, b in dash.sent if w is dash.timeline]
    assert sum(c["count"] for c, _ in live) == total
    assert [c["first"] for c, _ in live] == [sum(c["count"] for c, _ in live[:i]) for i in range(len(live))]
    snap = dash.timeline.events
    assert snap["count"] == total and snap["first"] == 0
    cols = columns(snap, snap["buffers"])
    events = list(llm.trace)
    origin = min(e.start for e in events)
    assert [snap["names"][u] for u in cols["unit"]] == [e.unit for e in events]
    assert cols["start"] == pytest.approx([e.start - origin for e in events])
    assert cols["bytes"] == [e.bytes for e in events]
    assert {dash.timeline.lanes[k] for k in cols["kind"]} == {e.kind for e in events}
    assert {"read", "compute", "step"} <= {e.kind for e in events}   # disk blocks stream on cpu

    activity = [(c, b) for w, c, b in dash.sent if w is dash.layer_map]
    assert activity and all(c["type"] == "activity" for c, _ in activity)
    c, b = activity[-1]
    assert set(columns(c, b)["step"]) == {c["step"]}                 # only the latest step


def test_repin_from_the_layer_map(llm, dash):
    before_html = dash.layer_map.static_html()
    dash.layer_map.selection = ["model.layers.0", "model.layers.1", "lm_head"]
    dash.layer_map._on_message(dash.layer_map, {"type": "apply", "tier": "disk", "request": "r1",
                                                "names": dash.layer_map.selection}, [])
    assert dash.layer_map.status["state"] == "done" and dash.layer_map.status["request"] == "r1"
    assert "moved 3 units" in dash.layer_map.status["message"]
    for name in ("model.layers.0", "model.layers.1", "lm_head"):
        assert llm.plan[name].tier == "disk" and llm.plan[name].pinned
    assert tiers(dash.layer_map) == {e.name: e.tier for e in llm.plan}
    assert dash.layer_map.selection == []
    rows = {r["tier"]: r for r in dash.memory.rows}
    assert rows["disk"]["weights"] == llm.plan.totals()["disk"]
    after_html = dash.layer_map.static_html()
    disk = TIER_COLORS["disk"]
    assert after_html.count(f"fill='{disk}'") == before_html.count(f"fill='{disk}'") + 3

    dash.layer_map.apply("auto", ["model.layers.0", "model.layers.1", "lm_head"])   # unpin
    assert dash.layer_map.status["state"] == "done"
    assert not any(llm.plan[n].pinned for n in ("model.layers.0", "model.layers.1", "lm_head"))
    assert llm.plan["model.layers.2"].pinned


def test_repin_error_leaves_the_model_unchanged(llm, dash):
    plan = llm.plan.to_dict()
    dash.layer_map.selection = ["model.layers.0"]
    dash.layer_map.apply("gpu")                       # no GPU tier when the CPU computes
    assert dash.layer_map.status["state"] == "error"
    assert "not available" in dash.layer_map.status["message"]
    assert llm.plan.to_dict() == plan and tiers(dash.layer_map) == {e.name: e.tier for e in llm.plan}
    assert dash.layer_map.selection == ["model.layers.0"]   # kept, to pick another tier
    dash.layer_map.apply("disk", [])
    assert dash.layer_map.status["state"] == "error" and "select units" in dash.layer_map.status["message"]
    generate(llm, 2)                                  # the model still runs


class FakeShell:
    """The part of IPython's shell the widgets use: cell events."""

    def __init__(self):
        self.callbacks = []
        self.events = self

    def register(self, name, fn):
        self.callbacks.append((name, fn))

    def unregister(self, name, fn):
        self.callbacks.remove((name, fn))

    def trigger(self, name):
        for n, fn in list(self.callbacks):
            if n == name:
                fn(None)


def test_cell_end_settles_through_ipython_hook(llm, monkeypatch):
    shell = FakeShell()
    monkeypatch.setattr("nb_offload.widgets.cells.current_shell", lambda: shell)
    timeline = Timeline(llm)
    timeline.send = lambda content, buffers=None: None
    assert [n for n, _ in shell.callbacks] == ["post_run_cell"]
    generate(llm, 3)
    llm.pin("model.layers.0", "disk")                 # a pin typed in a cell
    memory = Memory(llm, feed=timeline.feed)
    llm.pin("model.layers.1", "disk")
    shell.trigger("post_run_cell")
    assert timeline.events["count"] == len(llm.trace)
    assert {r["tier"]: r["weights"] for r in memory.rows}["disk"] == llm.plan.totals()["disk"]
    memory.close()
    timeline.close()
    assert shell.callbacks == []                      # the last view closed: no hook, no subscription
    assert llm.trace._observers == []


def test_repin_message_waits_for_the_running_cell(llm, monkeypatch):
    """Widget messages may arrive on another thread (a kernel subshell) while a cell runs:
    the re-pin is queued, shown as pending, and runs on the cells' thread when the cell ends."""
    shell = FakeShell()
    monkeypatch.setattr("nb_offload.widgets.cells.current_shell", lambda: shell)
    layer_map = LayerMap(llm)                         # made in a cell: that cell is running
    layer_map.send = lambda content, buffers=None: None
    ran_on = []
    monkeypatch.setattr(llm, "pin", lambda *a, _pin=llm.pin: (ran_on.append(threading.current_thread()), _pin(*a)))
    message = {"type": "apply", "tier": "disk", "names": ["model.layers.0"], "request": "r2"}
    t = threading.Thread(target=layer_map._on_message, args=(layer_map, message, []))
    t.start()
    t.join()
    assert layer_map.status == {"state": "pending", "request": "r2",
                                "message": "queued in the kernel: runs when the running cell finishes"}
    assert llm.plan["model.layers.0"].tier == "cpu" and ran_on == []
    shell.trigger("post_run_cell")
    assert ran_on == [threading.main_thread()]
    assert layer_map.status["state"] == "done" and llm.plan["model.layers.0"].tier == "disk"
    layer_map.close()
    assert shell.callbacks == []


def test_cell_gate_hands_work_to_the_idle_kernel_loop():
    from nb_offload.widgets.cells import CellGate

    async def kernel():
        gate = CellGate(FakeShell())
        gate._cell_ends()                             # the kernel is idle
        ran_on = []
        t = threading.Thread(target=gate.submit, args=(lambda: ran_on.append(threading.current_thread()),))
        t.start()
        t.join()
        for _ in range(100):
            if ran_on:
                break
            await asyncio.sleep(0.01)
        gate.close()
        return ran_on

    assert asyncio.run(kernel()) == [threading.main_thread()]


def test_static_fallback_in_mimebundle(llm, dash):
    generate(llm, 2)
    dash.feed.flush()
    for w in (dash, dash.layer_map, dash.memory, dash.timeline):
        data, _ = w._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in data
        assert "<svg" in data["text/html"]
    html = dash._repr_mimebundle_()[0]["text/html"]
    assert html.count("<rect x=") >= len(llm.plan) and "nb_offload timeline" in html
    assert html.count("<path d=") == sum(e.pinned for e in llm.plan)      # pinned corners


def test_widgets_alone(llm):
    layer_map = LayerMap(llm)
    assert len(layer_map.plan["entries"]) == len(llm.plan)
    layer_map.close()
    assert llm.trace._observers == []


# -- re-pin patterns and all-or-nothing, on a stand-in model -------------------------------------
def fake_plan(n=6):
    entries = [PlanEntry("model.embed_tokens", 10, "cpu", False, "top")]
    entries += [PlanEntry(f"model.layers.{i}", 100, "cpu", False) for i in range(n)]
    entries += [PlanEntry("lm_head", 10, "cpu", False, "top")]
    return Plan(entries=entries, device="cpu", budgets={"cpu": 10**9, "disk": 10**9}, reserved={})


def test_patterns_fold_ranges():
    plan = fake_plan()
    names = ["lm_head", "model.layers.4", "model.layers.1", "model.layers.2", "model.layers.3", "model.embed_tokens"]
    assert repin.patterns(names, plan) == ["model.embed_tokens", "model.layers.1-4", "lm_head"]
    assert repin.patterns(["model.layers.0", "model.layers.2"], plan) == ["model.layers.0", "model.layers.2"]
    with pytest.raises(PinError, match="not a unit"):
        repin.patterns(["model.layers.9"], plan)


class FakeModel:
    """Pins by exact pattern; ``refuse`` patterns raise, as an over-budget pin would."""

    def __init__(self, refuse=()):
        self.plan, self.refuse, self.calls = fake_plan(), set(refuse), []

    def _names(self, pattern):
        if pattern.startswith("model.layers.") and "-" in pattern:
            lo, hi = map(int, pattern.rpartition(".")[2].split("-"))
            return [f"model.layers.{i}" for i in range(lo, hi + 1)]
        return [pattern]

    def pin(self, pattern, tier):
        self.calls.append(("pin", pattern, tier))
        if pattern in self.refuse:
            raise PinError(f"{pattern} refused")
        for n in self._names(pattern):
            self.plan[n].tier, self.plan[n].pinned = tier, True

    def pins(self):
        return {e.name: e.tier for e in self.plan if e.pinned}

    def unpin(self, pattern):
        self.calls.append(("unpin", pattern))
        for n in self._names(pattern):
            self.plan[n].tier, self.plan[n].pinned = "cpu", False


def test_apply_undoes_earlier_patterns_when_one_fails():
    llm = FakeModel(refuse={"lm_head"})
    llm.plan["model.layers.1"].tier, llm.plan["model.layers.1"].pinned = "cpu", True
    before = [(e.tier, e.pinned) for e in llm.plan]
    seen = []
    with pytest.raises(PinError, match="lm_head refused"):
        repin.apply(llm, ["model.layers.0", "model.layers.1", "lm_head"], "disk",
                    progress=lambda i, n, p: seen.append((i, n, p)))
    assert seen == [(1, 2, "model.layers.0-1"), (2, 2, "lm_head")]
    assert [(e.tier, e.pinned) for e in llm.plan] == before
    assert llm.calls[-2:] == [("unpin", "model.layers.0"), ("pin", "model.layers.1", "cpu")]


def test_apply_reports_moves():
    llm = FakeModel()
    moves = repin.apply(llm, ["model.layers.4", "model.layers.5"], "disk")
    assert moves == [("model.layers.4", "cpu", "disk"), ("model.layers.5", "cpu", "disk")]
    assert llm.calls == [("pin", "model.layers.4-5", "disk")]


def test_state_of_a_cuda_plan():
    """What a GPU plan shows (no GPU needed): a gpu row with the reservations, host staging on cpu."""
    from nb_offload.views import memory_state
    from nb_offload.widgets.state import plan_state
    entries = [PlanEntry("model.layers.0", 100, "gpu", True), PlanEntry("model.layers.1", 100, "cpu", False),
               PlanEntry("model.layers.2", 100, "disk", False)]
    plan = Plan(entries=entries, device="cuda", budgets={"gpu": 1000, "cpu": 2000, "disk": 5000},
                reserved={"kv_cache": 50, "activations": 20, "workspace": 10, "staging_slots": 200},
                host_reserved={"disk_staging": 200})
    assert plan_state(plan)["targets"] == ["gpu", "cpu", "cpu-compute", "disk", "auto"]
    rows = {r["tier"]: r for r in memory_state(plan)}
    assert list(rows) == ["gpu", "cpu", "disk"]
    assert [p["name"] for p in rows["gpu"]["reserved"]] == ["kv_cache", "activations", "workspace", "staging_slots"]
    assert rows["cpu"]["reserved"] == [{"name": "disk_staging", "bytes": 200}]
    assert {t: r["used"] for t, r in rows.items()} == plan.used()
    plan.budgets["disk"] = None
    plan.entries[2].tier = "cpu"
    assert plan_state(plan)["targets"] == ["gpu", "cpu", "cpu-compute", "auto"]
    assert [r["tier"] for r in memory_state(plan)] == ["gpu", "cpu"]


def test_event_log_keeps_the_latest_events_with_sequence_numbers():
    from nb_offload.trace import TraceEvent
    from nb_offload.widgets.events import EventLog
    log = EventLog(max_events=100)
    for step in range(30):
        log.extend([TraceEvent("copy", f"model.layers.{i}", step + i / 10, step + i / 10 + 0.05, 64, step)
                    for i in range(10)])
    assert log.end == 300 and 100 <= len(log) <= 125 and log.first == 300 - len(log)
    header, buffers = log.pack(since=290)
    assert (header["first"], header["count"]) == (290, 10)
    cols = columns(header, buffers)
    assert cols["step"] == [29] * 10 and cols["start"][0] == pytest.approx(29.0)
    header, _ = log.pack(since=0)                     # older than what is kept: everything kept
    assert (header["first"], header["count"]) == (log.first, len(log))
    assert log.names == [f"model.layers.{i}" for i in range(10)]


def test_a_dashboard_of_an_unloaded_model_stops_offering_to_change_it(model_dirs, tmp_path):
    import nb_offload
    llm = nb_offload.load(model_dirs("llama"), device="cpu", progress=False)
    d = dashboard(llm)
    try:
        d.layer_map.selection = ["model.layers.0"]
        llm.unload()
        d.layer_map.feed.flush()                  # what the end of the cell does
        assert d.layer_map.status["state"] == "unloaded" and d.layer_map.selection == []
        assert "was unloaded, or loaded again under its name" in d.layer_map.status["message"]
        assert "%offload_load" in d.layer_map.status["message"]
        d.layer_map._on_message(d.layer_map, {"type": "apply", "tier": "disk", "names": ["model.layers.0"],
                                              "request": "late"}, [])
        assert d.layer_map.status["state"] == "unloaded"      # a stale view's request changes nothing
        with pytest.raises(Exception, match=r"load it again \(nb_offload.load\(\), or %offload_load"):
            generate(llm)
    finally:
        d.close()
