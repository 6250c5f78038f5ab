"""The captured decode step's parts that run without a GPU: buckets, signatures, the schedule of a
captured step, trace records kept aside, the plan's reservation, and why a generate stays eager.
(Capture and replay themselves: tests/gpu/test_graph_gpu.py.)"""

import pytest
import torch
from helpers import PROMPT

import nb_offload
from nb_offload.graphs import MIN_BUCKET, bucket, signature
from nb_offload.schedule import Schedule
from nb_offload.trace import Trace


def test_buckets_round_up_to_powers_of_two():
    assert [bucket(t) for t in (1, MIN_BUCKET, MIN_BUCKET + 1, 1000, 2048, 3000)] == \
        [MIN_BUCKET, MIN_BUCKET, 2 * MIN_BUCKET, 1024, 2048, 4096]


def test_a_signature_names_shapes_values_and_the_cache():
    cache = object()
    ids = torch.zeros(1, 1, dtype=torch.long)
    mask = {"full_attention": torch.ones(1, 1, 1, 256, dtype=torch.bool)}
    sig = signature(torch, cache, (ids,), {"past_key_values": cache, "attention_mask": mask, "use_cache": True})
    assert sig == signature(torch, cache, (ids + 5,), {"past_key_values": cache, "attention_mask": mask,
                                                       "use_cache": True})
    assert ((1, "past_key_values"), "cache") in sig
    # another shape, another value, another cache: another capture
    assert sig != signature(torch, cache, (torch.zeros(2, 1, dtype=torch.long),),
                            {"past_key_values": cache, "attention_mask": mask, "use_cache": True})
    assert sig != signature(torch, cache, (ids,), {"past_key_values": cache, "attention_mask": mask,
                                                   "use_cache": False})
    assert sig != signature(torch, object(), (ids,), {"past_key_values": cache, "attention_mask": mask,
                                                      "use_cache": True})
    # a value of a kind a capture can't hold: no signature (the step runs eager)
    assert signature(torch, cache, (ids,), {"past_key_values": cache, "streamer": object()}) is None


def test_a_captured_step_fills_slots_from_its_start_and_fetches_nothing_for_the_next():
    s = Schedule([10, 11, 12], slots=2, prefetch=1)
    s.begin_step()
    for idx in (10, 11, 12):
        job, _ = s.take(idx)
        s.start(job)
        s.release(idx)
        s.fill()
    assert s.queue              # eagerly, the next step's first unit is already queued
    s.restart(wrap=False)
    work = s.begin_step()
    assert [(j.unit, j.slot) for j in work.jobs] == [(10, 0), (11, 1)]
    slots = []
    for idx in (10, 11, 12):
        job, work = s.take(idx)
        slots.append(job.slot)
        s.start(job)
        s.release(idx)
        work = s.fill()
        assert all(j.unit != 10 for j in work.jobs)         # nothing of the next step
    assert slots == [0, 1, 0] and not s.queue
    assert not s.end_step().jobs
    s.restart(wrap=True)
    assert [(j.unit, j.slot) for j in s.begin_step().jobs] == [(10, 0), (11, 1)]


def test_trace_records_of_a_capture_are_kept_aside_and_queued_once_a_replay():
    t = Trace()
    t.step = 4
    with t.capturing() as records:
        t.cuda_event("copy", "model.layers.0", "s", "e", 10)
        t.flush()                                   # nothing is resolved while capturing
    assert records == [("copy", "model.layers.0", "s", "e", 10)] and not t._pending
    t.replay(records)
    t.step = 5
    t.replay(records)
    assert [p[-1] for p in t._pending] == [4, 5]


def test_the_plan_reserves_the_graph_pool_on_cuda_only(tmp_path):
    from nb_offload.tiny import hollow_llama
    folder = hollow_llama(str(tmp_path / "h"), layers=4)
    on = nb_offload.plan(folder, gpu="20GiB", cpu="20GiB")
    off = nb_offload.plan(folder, gpu="20GiB", cpu="20GiB", cuda_graph=False)
    cpu = nb_offload.plan(folder, device="cpu", cpu="20GiB")
    assert on.reserved["decode_graph"] > 0
    assert "decode_graph" not in off.reserved and "decode_graph" not in cpu.reserved
    assert "decode graph" in str(on)
    with pytest.raises(nb_offload.OptionError, match="cuda_graph"):
        nb_offload.plan(folder, gpu="20GiB", cuda_graph="yes")


def test_a_generate_says_why_its_decode_runs_eager(model_dirs):
    llm = nb_offload.load(model_dirs("llama"), device="cpu", progress=False)
    try:
        ids = torch.tensor(PROMPT)
        llm.generate(ids, max_new_tokens=3, do_sample=False)
        assert llm.stats.graph_eager == "the CPU device runs eager" and llm.stats.graph_replays == 0
        llm.generate(ids, max_new_tokens=3, do_sample=False, num_beams=2)
        assert llm.stats.graph_eager == "beam search reorders the cache"
        llm.cuda_graph = False
        llm.generate(ids, max_new_tokens=3, do_sample=False)
        assert llm.stats.graph_eager == "cuda_graph=False"
        assert "graph_replays" in llm.stats.as_dict()
    finally:
        llm.unload()


def test_the_generate_summary_says_how_decode_ran():
    from nb_offload.trace import Stats
    s = Stats()
    before = s.as_dict()
    s.graph_replays = 30
    assert "30 decode steps replayed as one CUDA graph" in s.run_summary(before, 32, 1.0)
    s.graph_replays, s.graph_eager = 0, "beam search reorders the cache"
    assert "decode ran eager: beam search" in s.run_summary(s.as_dict(), 32, 1.0)
    assert "eager" not in s.run_summary(s.as_dict(), 32, 1.0, held_on="cpu")     # the CPU device: nothing to say


def test_the_cache_reaches_forward_under_the_name_generate_is_given_it(model_dirs):
    """transformers renamed ``past_key_values`` to ``cache``: the static cache is given, and a decode step
    recognised, under whichever name the installed version uses."""
    import inspect
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, StaticCache

    from nb_offload.graphs import DecodeGraphs, cache_name, given_cache
    model = AutoModelForCausalLM.from_pretrained(model_dirs("llama")).eval()
    cache = StaticCache(config=model.config, max_cache_len=MIN_BUCKET)
    engine = SimpleNamespace(torch=torch, cuda=True, sources={}, units=[], n_model=0, routed={}, cpu_blocks={})
    graphs = DecodeGraphs(engine, enabled=True)
    graphs.cache, graphs.active = cache, True
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append((given_cache(kwargs) is cache, graphs.takes(args, kwargs)))
        return forward(*args, **kwargs)
    spy.__signature__ = inspect.signature(forward)
    model.forward = spy
    with torch.inference_mode():
        model.generate(torch.tensor(PROMPT), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                       **{cache_name(model): cache})
    # the prefill (8 tokens) is not a decode step; the two after it are
    assert seen == [(True, False), (True, True), (True, True)]


def test_the_stats_say_what_the_graphs_did():
    from nb_offload.trace import Stats
    s = Stats()
    assert "CUDA graph" not in str(s)
    s.graph_captures, s.graph_replays, s.capture_seconds, s.graph_pool_bytes = 2, 60, 0.1, 6 * 2**20
    assert "decode: 60 steps replayed from 2 CUDA graph(s), 50 ms a capture, pool 6.0 MiB" in str(s)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failing check needs a machine without CUDA")
def test_a_failing_check_of_graph_waits_falls_back_to_waiting_for_every_first_copy():
    """The check before a first capture (movers.graph_waits_take_launch_record) that can't run says False: a
    replay then waits for all its first units' copies before it starts, the wait that needs no check."""
    from nb_offload import movers
    movers._LAUNCH_RECORD.pop(None, None)
    assert movers.graph_waits_take_launch_record(torch, "cpu") is False
    assert movers._LAUNCH_RECORD[None] is False


def test_a_replay_waits_per_unit_only_where_the_check_holds_and_no_copy_came_after_the_prefetch():
    """``CudaMover.present`` gives a replay's first units their slot's arrival event to wait on, and makes the
    graph's own copies follow the last of them, only where graph waits take the launch's record; ``before_graph``
    waits for the copies queued before the last prefetch, or, where the check failed or another copy came
    after that prefetch, for everything on the copy stream. (Streams and events stand in for CUDA's.)"""
    from types import SimpleNamespace

    from nb_offload.movers import CudaMover
    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_event(self, ev):
            log.append((self.name, "waits for", ev))

        def wait_stream(self, other):
            log.append((self.name, "waits for stream", other.name))

    def mover(waits_per_unit):
        m = object.__new__(CudaMover)
        m.copy_stream, m.compute_stream = Stream("copy"), Stream("compute")
        m.arrived = ["arrived0", "arrived1", "arrived2"]
        m.waits_per_unit, m.prefetched_after = waits_per_unit, None
        m._captured = SimpleNamespace(ahead=[])
        return m
    jobs = [SimpleNamespace(unit=4, slot=1, copied=False, ready="x"), SimpleNamespace(unit=6, slot=2, copied=False,
                                                                                         ready="x")]
    m = mover(True)
    m.present(jobs)
    assert [(j.copied, j.ready) for j in jobs] == [(True, "arrived1"), (True, "arrived2")]
    assert m._captured.ahead == [(4, 1), (6, 2)] and log == [("copy", "waits for", "arrived2")]
    log.clear()
    m.prefetched_after = "before the prefetch's copies"
    m.before_graph()
    assert log == [("compute", "waits for", "before the prefetch's copies")]
    log.clear()
    m.copied_since_prefetch()           # an eager copy, or an expert's, after the prefetch
    m.before_graph()
    assert log == [("compute", "waits for stream", "copy")]
    log.clear()
    m = mover(False)                    # the check failed: everything first, as before
    m.present(jobs)
    assert [j.ready for j in jobs] == [None, None] and log == []
    m.prefetched_after = "before the prefetch's copies"
    m.before_graph()
    assert log == [("compute", "waits for stream", "copy")]


def test_the_cuda_mover_keeps_a_slot_s_unit_only_for_its_whole_eager_copies():
    """``CudaMover.pump`` tells the schedule a slot holds a unit once it has issued a whole copy of it from host
    memory (the compute of a job that finds it there waits for that copy's event); a part of a unit, a disk
    unit's staged copy, or a copy inside a capture (it lands at the replays) leaves nothing kept. ``prefetch``
    keeps each unit it copies, with its slot's arrival event. (Streams and events stand in for CUDA's.)"""
    import contextlib
    from concurrent.futures import Future
    from types import SimpleNamespace

    from nb_offload.movers import CudaMover
    from nb_offload.schedule import Schedule

    class Event:
        def __init__(self, **kw):
            self.recorded = []

        def record(self, stream):
            self.recorded.append(stream.name)

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_event(self, ev):
            pass

        def wait_stream(self, other):
            pass
    m = object.__new__(CudaMover)
    m.torch = SimpleNamespace(cuda=SimpleNamespace(stream=lambda s: contextlib.nullcontext(), Event=Event))
    m.copy_stream, m.compute_stream = Stream("copy"), Stream("compute")
    m.units = [SimpleNamespace(name=f"u{i}", nbytes=8) for i in range(4)]
    m.sources = {i: SimpleNamespace(flat=torch.full((8,), i, dtype=torch.uint8)) for i in range(4)}
    m.slots = [torch.zeros(8, dtype=torch.uint8) for _ in range(3)]
    m.slot_free, m.arrived = [Event() for _ in range(3)], [Event() for _ in range(3)]
    m.trace = SimpleNamespace(enabled=False)
    m.stats = SimpleNamespace(bytes_from_cpu=0, bytes_from_disk=0)
    m.in_capture, m.prefetched_after = False, None
    m.schedule = Schedule([0, 1, 2, 3], slots=3, prefetch=2)
    kept = m.schedule.kept

    def job(unit, slot, **kw):
        return SimpleNamespace(unit=unit, slot=slot, copied=False, ready=None, read=None, ranges=None, rest=None, **kw)
    whole = job(0, 0)
    m.pump([whole])
    assert torch.equal(m.slots[0], m.sources[0].flat) and kept[0] == (0, whole.ready) and whole.copied
    part = job(1, 1)
    part.ranges = [(0, 4)]
    m.pump([part])
    assert kept[1] is None
    landed = Future()
    landed.set_result([])
    staging = SimpleNamespace(finish=lambda done: None)
    read = SimpleNamespace(io=SimpleNamespace(future=landed, landing=lambda n: m.sources[2].flat, staging=staging))
    m.schedule.reads.append(read)
    staged = job(2, 2)
    staged.read = read
    m.schedule.kept[2] = (3, "an older copy")
    m.pump([staged])
    assert kept[2] is None and m.stats.bytes_from_disk == 8
    m.in_capture = True
    m._captured = SimpleNamespace(keep=[])
    m.pump([job(3, 0)])
    assert kept[0] == (0, whole.ready)          # a capture's copy lands at its replays, which forget the slots
    m.in_capture = False
    m.prefetch([(3, 1)], None)
    assert kept[1] == (3, m.arrived[1]) and m.arrived[1].recorded == ["copy"]
    assert torch.equal(m.slots[1], m.sources[3].flat)


def test_graphs_are_kept_by_last_replay_and_keyed_by_where_the_caches_layers_are(monkeypatch):
    """DecodeGraphs.step with the engine stood in: a shape's first step runs eager, its second is captured,
    later ones replay; past KEEP graphs the least recently replayed goes (not the oldest captured); and a step
    whose cache has a CPU block's layer elsewhere (here: on another device than before) gets a key of its own,
    after the CPU blocks' layers are placed for it."""
    from types import SimpleNamespace

    from nb_offload import graphs
    events = []
    cache = SimpleNamespace(layers=[SimpleNamespace(keys=torch.zeros(2), values=torch.zeros(2)) for _ in range(2)])
    moves = []          # a layer the next step's placing moves (as a held CPU block's goes to the GPU)

    def place(args, kwargs):
        events.append("placed")
        if moves:
            cache.layers[0].keys = moves.pop()
    engine = SimpleNamespace(held={}, stats=SimpleNamespace(graph_eager=""), torch=torch, cpu_cache_layers=[0],
                             place_cpu_caches=place,
                             replay=lambda captured: events.append(("replay", captured.n)),
                             eager_step=lambda forward, args, kwargs: events.append("eager"))
    g = object.__new__(graphs.DecodeGraphs)
    g.engine, g.torch, g.cache, g.active = engine, torch, cache, True
    g.graphs, g.warm, g.failed, g.primed = {}, set(), {}, None
    monkeypatch.setattr(g, "_warm_up", lambda forward, args, kwargs: events.append("warm-up"))
    monkeypatch.setattr(g, "_capture", lambda key, forward, args, kwargs: SimpleNamespace(
        n=args[0].shape[1], inputs={}, output=None))
    monkeypatch.setattr(graphs, "_copied", lambda torch, output, cache: output)

    def step(n):
        events.clear()
        g.step(None, (torch.zeros(1, n, dtype=torch.long), cache), {})
        return [e for e in events if e != "placed"]
    for n in range(1, graphs.KEEP + 1):        # KEEP shapes, each warmed up, then captured
        assert step(n) == ["warm-up"] and step(n) == [("replay", n)]
    assert step(1) == [("replay", 1)]           # shape 1 replayed last: shape 2 is now the least recent
    assert step(9) == ["warm-up"] and step(9) == [("replay", 9)]
    kept = sorted(c.n for c in g.graphs.values())
    assert len(g.graphs) == graphs.KEEP and 1 in kept and 2 not in kept
    cache.layers[1].keys = torch.zeros(2, device="meta")        # not a CPU block's layer: not looked at
    assert step(1) == [("replay", 1)]
    moves.append(torch.zeros(2, device="meta"))     # the step's placing moves the CPU block's layer: the key,
    assert step(1) == ["warm-up"]                   # taken after it, is a new one (not shape 1's graph)
    assert step(1) == [("replay", 1)] and not moves


def test_a_replay_waits_only_for_its_own_graphs_stamps_before_it_overwrites_them():
    """Before a replay (Engine.replay, the rest of the engine stood in) the trace resolves the stamps of that
    graph's last replay, waiting for them (the replay records the same events again); the link's copies
    queued after the last launch, each with events of its own, are resolved where done and kept for a later
    flush where not, without a wait."""
    from types import SimpleNamespace

    from nb_offload.engine import Engine
    flushes = []
    e = object.__new__(Engine)
    e.trace = SimpleNamespace(flush=lambda **kw: flushes.append(kw), enabled=False, step=0)
    e._use_large = e._do = lambda *a: None
    e.schedule = SimpleNamespace(restart=lambda wrap: [], forget=lambda: flushes.append("slots forgotten"))
    e.mover = SimpleNamespace(begin_step=lambda: None, prefetch=lambda *a: None, before_graph=lambda: None,
                              after_graph=lambda: None)
    e.graphs, e.block_handoff = SimpleNamespace(primed=None), None
    e.stats = SimpleNamespace(bytes_from_cpu=0, graph_replays=0, steps=0, sample_host=lambda every: None)
    captured = SimpleNamespace(records=["its stamps"], large=False, ahead=[], last_use={}, program=[], nbytes=0,
                               graph=SimpleNamespace(replay=lambda: flushes.append("replayed")))
    e.replay(captured)
    # the slots' kept units forgotten before the graph's copies overwrite them
    assert flushes == [{"wait_for": ["its stamps"]}, "slots forgotten", "replayed"]
    t = Trace()
    t._origin_event, t._origin_time = SimpleNamespace(elapsed_time=lambda ev: ev.at), 0.0
    waited = []

    def event(at, done):
        ev = SimpleNamespace(at=at, done=done, query=lambda: ev.done)
        ev.synchronize = lambda: (waited.append(ev.at), setattr(ev, "done", True))
        return ev
    own = [("compute", "model.layers.0", event(1.0, True), event(2.0, False), 0)]
    t.replay(own)
    t.cuda_event("copy", "model.layers.1", event(2.5, True), event(3.0, True), 8)        # landed
    t.cuda_event("copy", "model.layers.2", event(3.5, False), event(4.0, False), 8)      # in flight
    batch = t.flush(wait_for=own)
    assert waited == [2.0]
    assert [ev.unit for ev in batch] == ["model.layers.0", "model.layers.1"]
    assert [rec[1] for rec in t._pending] == ["model.layers.2"]


def test_a_replays_cpu_block_calls_count_as_replayed():
    """The CPU blocks' decode calls a replay collects (Engine.replay, the rest of the engine stood in) count
    among the replayed calls too, whose rate a load plans again at (model.cpu_rate_reached)."""
    import contextlib
    from types import SimpleNamespace

    from nb_offload.engine import Engine
    from nb_offload.trace import Stats
    e = object.__new__(Engine)
    e.trace = SimpleNamespace(flush=lambda **kw: None, enabled=False, step=0)
    e._use_large = e._do = lambda *a: None
    e.schedule = SimpleNamespace(restart=lambda wrap: [], forget=lambda: None)
    e.mover = SimpleNamespace(begin_step=lambda: None, prefetch=lambda *a: None, before_graph=lambda: None,
                              after_graph=lambda: None)
    e.graphs, e._outstanding = SimpleNamespace(primed=None), []
    e.block_handoff = SimpleNamespace(before_replay=lambda program: None, run=lambda program: [])
    e._handover = contextlib.nullcontext
    e.stats = st = Stats()
    st.cpu_decode_calls, st.cpu_decode_bytes, st.cpu_decode_seconds = 5, 500, 5.0     # eager steps' before

    def collect():      # the two CPU blocks' calls of the step, counted as CpuBlock._count counts them
        st.cpu_decode_calls += 2
        st.cpu_decode_bytes += 200
        st.cpu_decode_seconds += 0.5
    e._collect = collect
    captured = SimpleNamespace(records=[], large=False, ahead=[], last_use={}, program=["block 1", "block 3"],
                               nbytes=0, graph=SimpleNamespace(replay=lambda: None))
    e.replay(captured)
    e.replay(captured)
    assert (st.cpu_replayed_calls, st.cpu_replayed_bytes, st.cpu_replayed_seconds) == (4, 400, 1.0)
    assert st.cpu_decode_calls == 9 and st.graph_replays == 2
