"""The notebook widgets (nb_offload.widgets), kernel side: state after load, live and settled
trace events, re-pinning from the layer map, errors, the static fallback. The browser side is
tested in tests/browser/run.sh."""

import os
import subprocess
import sys
from array import array

import pytest

pytest.importorskip("anywidget")

from nb_offload.errors import PinError  # noqa: E402
from nb_offload.planner import Plan, PlanEntry  # noqa: E402
from nb_offload.widgets import LayerMap, Memory, Timeline, dashboard, repin  # noqa: E402
from nb_offload.widgets.state import TIER_COLORS  # noqa: E402

from conftest import PROMPT  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    rows = {r["tier"]: r for r in dash.memory.rows}
    assert set(rows) == {"cpu", "disk"}
    used = llm.plan.used()
    for tier, row in rows.items():
        assert row["used"] == used[tier] == row["weights"] + sum(p["bytes"] for p in row["reserved"])
        assert row["budget"] == llm.plan.budgets[tier]
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


def test_cell_end_settles_through_ipython_hook(llm, monkeypatch):
    class Events:
        def __init__(self):
            self.callbacks = []

        def register(self, name, fn):
            self.callbacks.append((name, fn))

        def unregister(self, name, fn):
            self.callbacks.remove((name, fn))

    class Shell:
        events = Events()

    monkeypatch.setattr("nb_offload.widgets.feed._ipython", lambda: Shell)
    timeline = Timeline(llm)
    timeline.send = lambda content, buffers=None: None
    assert [n for n, _ in Shell.events.callbacks] == ["post_run_cell"]
    generate(llm, 3)
    llm.pin("model.layers.0", "disk")                 # a pin typed in a cell
    memory = Memory(llm, feed=timeline.feed)
    llm.pin("model.layers.1", "disk")
    for _, fn in Shell.events.callbacks:
        fn(None)
    assert timeline.events["count"] == len(llm.trace)
    assert {r["tier"]: r["weights"] for r in memory.rows}["disk"] == llm.plan.totals()["disk"]
    memory.close()
    timeline.close()
    assert Shell.events.callbacks == []               # the last view closed: no hook, no subscription
    assert llm.trace._observers == []


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
