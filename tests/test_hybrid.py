"""Blocks computed on the CPU where their bytes are (hybrid.py): the split, the plan, the pins, the hooks.
The plans here are for a CUDA device (made on a machine without one, as ``%offload_plan`` does); the
engine's side runs on CUDA (tests/gpu/test_hybrid_gpu.py)."""

import dataclasses

import pytest
import torch
from helpers import blocks

import nb_offload
from nb_offload import hybrid, loader
from nb_offload.hooks import ModuleHooks, bind
from nb_offload.trace import Stats, Trace

RATES = (20.0, 60.0)        # CPU, link GB/s: the CPU takes a quarter


def all_in_host_memory(folder, **options):
    """A CUDA plan with every block in host memory, as a large model's would be."""
    return nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins={"model.layers.*": "cpu"}, **options)


@pytest.fixture
def rates(monkeypatch):
    """Fixed rates instead of measured ones."""
    monkeypatch.setattr(loader.Inspection, "cpu_rates", lambda self: RATES)


def test_the_share_and_its_spread_between_streamed_blocks():
    assert hybrid.cpu_share(20, 60) == 0.25 and hybrid.cpu_share(0, 60) == 0.0
    assert hybrid.spread(list(range(8)), 0.25) == [2, 6]            # each followed by streamed ones
    assert hybrid.spread(list(range(8)), 0.5) == [1, 3, 5, 7]
    assert hybrid.spread(list(range(3)), 1.0) == [0, 1, 2]
    assert hybrid.spread(list(range(3)), 0.0) == [] and hybrid.spread([], 0.5) == []
    assert len(hybrid.spread(list(range(32)), 0.3)) == 9    # of 9 and 10 the count where both sides end sooner


def test_the_cpu_takes_the_count_whose_later_side_ends_first():
    from nb_offload.cpu_experts import split, taken
    assert taken(0.3, 2) == 0           # one expert on the CPU (1 / 0.3) would outlast both on the link (2 / 0.7)
    assert taken(0.36, 2) == 1 and taken(0.5, 1) == 1 and taken(0.5, 3) == 2      # a tie: the larger
    assert taken(0.0, 5) == 0 and taken(1.0, 5) == 5 and taken(0.7, 0) == 0
    assert split([1, 4, 6], 0.5) == ([1], [4, 6])


def test_the_step_model_counts_the_link_idle_where_the_slots_are_full():
    G = 1e9         # a GB, at 1 GB/s: a second
    # streamed units only: the link's time
    assert hybrid.step_seconds([("stream", 2 * G), ("gpu", 0)], 1.0, 1.0, 1, G) == pytest.approx(2.0)
    # a CPU block of 3 s, then a unit of three 1-GB pieces: with one piece copied ahead (two slots) the
    # link copies two during the block and the third after the first has run: 4 s; with two ahead, 3 s
    # (the bytes over both rates would say 3 s either way)
    order = [("cpu", 3 * G), ("stream", 3 * G)]
    assert hybrid.step_seconds(order, 1.0, 1.0, 1, G) == pytest.approx(4.0)
    assert hybrid.step_seconds(order, 1.0, 1.0, 2, G) == pytest.approx(3.0)
    # the CPU the slower: its time; a read from the drive adds to its piece's copy
    assert hybrid.step_seconds([("cpu", 5 * G), ("stream", G)], 1.0, 1.0, 1, G) == pytest.approx(5.0)
    assert hybrid.step_seconds([("disk", 2 * G)], 1.0, 2.0, 1, G, disk_gbps=1.0) == pytest.approx(3.0)
    # the GPU's compute, where given: a resident block's bytes, a streamed piece's once it is in (its copy
    # ran during the one before: 1 + 0.5 s), in turn with the CPU's blocks
    assert hybrid.step_seconds([("gpu", 2 * G), ("stream", G)], 1.0, 1.0, 1, G, gpu_gbps=2.0) == pytest.approx(1.5)
    assert hybrid.step_seconds([("gpu", 2 * G), ("cpu", G)], 1.0, 1.0, 1, G, gpu_gbps=2.0) == pytest.approx(2.0)
    # the split of least time, of equal ones the fewer blocks
    assert hybrid.fastest_split([1, 2, 3, 4], lambda chosen: abs(len(chosen) - 2)) == [2, 4]
    assert hybrid.fastest_split([1, 2], lambda chosen: 1.0) == []


def test_a_captured_step_s_pieces_take_the_same_slots_every_step(monkeypatch):
    """A replay's pieces go into the same slots every step, so its first piece waits for the slot its last
    piece used; an eager step's ring goes on turning."""
    G = 1e9
    # a 1-GB piece, a 2 s CPU block, a piece, a CPU block, a piece; two slots (one piece ahead). Eager, the
    # next step's first piece takes the slot the second piece freed mid-step: 4 s. Captured, it waits for
    # the third piece's slot, free at the step's end, and its copy runs alone: 5 s. With three slots, each
    # piece has its own and the first copies during the step's last CPU block: 4 s again.
    order = [("stream", G), ("cpu", 2 * G), ("stream", G), ("cpu", 2 * G), ("stream", G)]
    assert hybrid.step_seconds(order, 1.0, 1.0, 1, G) == pytest.approx(4.0)
    assert hybrid.step_seconds(order, 1.0, 1.0, 1, G, captured=True) == pytest.approx(5.0)
    assert hybrid.step_seconds(order, 1.0, 1.0, 2, G, captured=True) == pytest.approx(4.0)
    # which the plans take: the captured handoff's replays, where no unit is read from the drive
    assert hybrid.decode_captured(order) and not hybrid.decode_captured(order + [("disk", G)])
    monkeypatch.setattr(hybrid, "HANDOFF", "worker")
    assert not hybrid.decode_captured(order)


def test_a_hybrid_plan_takes_the_split_and_the_depth_whose_step_is_shortest(model_dirs, rates):
    from nb_offload.planner import step_order
    folder = model_dirs("llama", num_hidden_layers=8)
    plan = all_in_host_memory(folder, compute="hybrid")
    cpu, link = RATES

    def step(plan):
        return plan.predicted_seconds_per_step(link, cpu_gbps=cpu)
    # the share chosen: no other count of spread blocks, at this depth, has a shorter modelled step
    names = [e.name for e in blocks(plan)]
    on_cpu = [e.name for e in plan if e.compute == "cpu"]
    assert on_cpu and on_cpu == hybrid.spread(names, plan.block_share)
    for n in range(len(names) + 1):
        other = [dataclasses.replace(e, compute="cpu" if e.name in hybrid.spread(names, n / len(names)) else
                 "" if e.compute == "cpu" else e.compute) for e in plan]
        alike = hybrid.decode_step_seconds(step_order(other), cpu, link, plan.prefetch, plan.slot_bytes,
                                           graphs=True)
        assert step(plan) <= alike * (1 + 1e-9)
    # the depth chosen: no other depth that fits has a step shorter by more than DEPTH_TIES; of those within it,
    # the one keeping the most bytes resident (a prefill streams the rest), then the shallowest
    depths = {d: all_in_host_memory(folder, compute="hybrid", prefetch=d) for d in range(1, hybrid.MOST_AHEAD + 1)}
    assert all(p.prefetch == d for d, p in depths.items())       # asked for: kept
    fastest = min(step(p) for p in depths.values())
    assert step(plan) <= fastest * (1 + loader.DEPTH_TIES)
    near = [d for d, p in depths.items() if step(p) <= fastest * (1 + loader.DEPTH_TIES)]
    assert plan.prefetch == min(near, key=lambda d: (loader.off_gpu_bytes(depths[d]), d))
    assert plan.reserved["staging_slots"] >= all_in_host_memory(folder).reserved["staging_slots"]
    assert all_in_host_memory(folder).prefetch == 1


def test_compute_auto_keeps_hybrid_only_where_its_modelled_step_is_shorter(model_dirs, monkeypatch):
    folder = model_dirs("llama", num_hidden_layers=8)
    for rates, hybrid_wins in ((RATES, True), ((0.5, 60.0), False)):
        monkeypatch.setattr(loader.Inspection, "cpu_rates", lambda self, r=rates: r)
        split = all_in_host_memory(folder, compute="hybrid")
        streamed = all_in_host_memory(folder)
        chosen = all_in_host_memory(folder, compute="auto")
        cpu, link = rates
        faster = any(e.compute == "cpu" for e in split) and \
            split.predicted_seconds_per_step(link, cpu_gbps=cpu) < streamed.predicted_seconds_per_step(link)
        assert faster is hybrid_wins
        want = split if faster else streamed
        assert [(e.name, e.tier, e.compute) for e in chosen] == [(e.name, e.tier, e.compute) for e in want]
        assert chosen.prefetch == want.prefetch and chosen.reserved == want.reserved
        assert chosen.compute_choice.startswith("compute=\"auto\": " + ("hybrid" if faster else "all streamed"))
        assert chosen.compute_choice in str(chosen)
    # an attention with GPU kernels only (flash, flex; not installed here, so the check is stood in for): no
    # error, all streamed, and the plan says why
    monkeypatch.setattr(hybrid, "gpu_only_attention", lambda attn: True)
    plan = all_in_host_memory(folder, compute="auto")
    assert not any(e.compute == "cpu" for e in plan) and "GPU kernels only" in plan.compute_choice
    # on the CPU device it changes nothing
    assert not nb_offload.plan(folder, device="cpu", compute="auto").compute_choice


def test_copying_further_ahead_never_fails_a_plan(model_dirs, rates):
    folder = model_dirs("llama")
    pins, whole = {"model.layers.*": "cpu"}, dict(split_blocks=False, cpu="1GiB")
    shallow = nb_offload.plan(folder, gpu="1GiB", pins=pins, compute="hybrid", prefetch=1, **whole)
    # a budget that holds the shallow plan and nothing more: the deeper slots don't fit, the plan stands
    exact = shallow.used()["gpu"]
    plan = nb_offload.plan(folder, gpu=exact, pins=pins, compute="hybrid", **whole)
    assert plan.prefetch == 1 and plan.reserved["staging_slots"] == shallow.reserved["staging_slots"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_a_hybrid_plan_computes_the_cpus_share_of_the_blocks_in_host_memory(arch, model_dirs, rates):
    folder = model_dirs(arch)
    streamed = all_in_host_memory(folder)
    hybrid_plan = all_in_host_memory(folder, compute="hybrid")
    names = [e.name for e in blocks(hybrid_plan)]
    on_cpu = [e.name for e in hybrid_plan if e.compute == "cpu"]
    share = hybrid_plan.block_share
    assert on_cpu == hybrid.spread(names, share) and on_cpu and share == len(on_cpu) / len(names)
    assert hybrid_plan.rates == RATES
    assert all(hybrid_plan[n].tier == "cpu" for n in on_cpu)               # in host memory, where it computes
    computed = sum(hybrid_plan[n].bytes for n in on_cpu)
    assert streamed.streamed_bytes_per_token()["cpu"] - hybrid_plan.streamed_bytes_per_token()["cpu"] == computed
    assert hybrid_plan.cpu_bytes_per_token() == computed and streamed.cpu_bytes_per_token() == 0
    # the link and the CPU at once, taking turns: at least the longer of the two
    link = hybrid_plan.streamed_bytes_per_token()["cpu"] / 60e9
    predicted = hybrid_plan.predicted_seconds_per_step(60, cpu_gbps=20)
    assert predicted >= max(link, computed / 20e9) * (1 - 1e-9)
    assert predicted < streamed.predicted_seconds_per_step(60) and predicted < link + computed / 20e9
    text = str(hybrid_plan)
    assert "computed on the CPU where their bytes are, not streamed" in text
    assert f"{100 * share:.0f}% of the blocks in host memory, the share whose step is shortest" in text
    assert "computed on the CPU" not in str(streamed)
    assert [e["compute"] for e in hybrid_plan.to_dict()["entries"]].count("cpu") == len(on_cpu)
    assert "computed on the CPU" in hybrid_plan._repr_html_()


def test_pins_keep_blocks_on_the_cpu_and_refuse_what_it_cant_compute(model_dirs):
    folder = model_dirs("llama")
    plan = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins={"model.layers.1-2": "cpu-compute"})
    assert [e.name for e in plan if e.compute == "cpu"] == ["model.layers.1", "model.layers.2"]
    assert all(plan[n].tier == "cpu" and plan[n].pinned for n in ("model.layers.1", "model.layers.2"))
    assert plan.block_share is None and "pinned \"cpu-compute\"" in str(plan)
    with pytest.raises(nb_offload.PinError, match="only blocks in the load dtype are computed on the CPU"):
        nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins={"lm_head": "cpu-compute"})
    # on the CPU device every unit computes on the CPU: the pin is its host memory
    cpu = nb_offload.plan(folder, device="cpu", cpu="1GiB", pins={"model.layers.1": "cpu-compute"})
    assert cpu["model.layers.1"].tier == "cpu" and not any(e.compute for e in cpu)
    with pytest.raises(nb_offload.PinError, match="cpu-compute: in host memory, computed by the CPU"):
        nb_offload.plan(folder, gpu="1GiB", pins={"model.layers.1": "cpu-computed"})


def test_a_model_pinned_on_the_cpu_device_computes_there_exactly(model_dirs):
    from helpers import reference, run_offloaded
    folder = model_dirs("qwen2")
    with nb_offload.load(folder, device="cpu", pins={"model.layers.0": "cpu-compute"}, progress=False) as llm:
        assert torch.equal(run_offloaded(llm)[0], reference(folder)[0])
        llm.pin("model.layers.1", "cpu-compute")
        assert llm.plan["model.layers.1"].pinned and llm._engine.cpu_blocks == {}
        assert llm.pins() == {"model.layers.0": "cpu-compute", "model.layers.1": "cpu-compute"}


def test_the_compute_option_is_checked(model_dirs):
    with pytest.raises(nb_offload.OptionError, match="compute='cpu' is unknown; accepted: 'gpu', 'hybrid', 'auto'"):
        nb_offload.Options(compute="cpu")
    for given in (dict(compute="hybrid"), dict(pins={"model.layers.1": "cpu-compute"})):
        with pytest.raises(nb_offload.OptionError, match="attn_implementation='flash_attention_2' can't compute"):
            nb_offload.Options(attn_implementation="flash_attention_2", **given)
        assert nb_offload.Options(attn_implementation="sdpa", **given)
    # a CPU-device plan has nothing to split
    assert nb_offload.plan(model_dirs("llama"), device="cpu", compute="hybrid").block_share is None


def test_the_cpu_rate_is_measured_with_the_threads_asked(model_dirs):
    rate = hybrid.rates_by_tokens(torch, torch.bfloat16, [(256, 128), (128, 256)], 1, (1,), 5)[1]
    assert rate > 0
    before = torch.get_num_threads()
    seen = []
    real = torch.nn.functional.linear
    try:
        torch.nn.functional.linear = lambda x, w: seen.append((torch.get_num_threads(), tuple(w.shape),
                                                               w.data_ptr())) or real(x, w)
        hybrid.rates_by_tokens(torch, torch.float32, [(64, 32), (32, 64)], 1, (1,), repeats=4)
    finally:
        torch.nn.functional.linear = real
    # the block's products in turn, two passes to warm up, then the timed ones
    assert [(t, shape) for t, shape, _ in seen] == [(1, (64, 32)), (1, (32, 64))] * 6
    # each pass on the next copy of the weights, in turn (a copy read once a step, as a CPU block's is)
    passes = [tuple(p for _, _, p in seen[k:k + 2]) for k in range(0, len(seen), 2)]
    assert len(set(passes)) == hybrid.MEASURED_COPIES == 3
    assert passes[:3] == passes[3:] and passes[0] != passes[1]
    assert torch.get_num_threads() == before
    # beside the link's copies (a BusyLink on CUDA): started before each pass, waited for after it
    events = []
    beside = type("Beside", (), {"start": lambda self: events.append("start"),
                                 "stop": lambda self: events.append("stop")})()
    try:
        torch.nn.functional.linear = lambda x, w: events.append("product") or real(x, w)
        hybrid.rates_by_tokens(torch, torch.float32, [(64, 32), (32, 64)], 1, (1,), repeats=1, beside=beside)
    finally:
        torch.nn.functional.linear = real
    assert events == ["start", "product", "product", "stop"] * 3
    cpu, link = loader.Inspection(model_dirs("llama"), nb_offload.Options(compute="hybrid")).cpu_rates()
    assert cpu > 0 and link == 25.0         # no GPU here: the link is assumed, as for a dry run


def test_a_cpu_block_computes_small_steps_on_the_cpu_and_leaves_large_ones_to_the_engine(model_dirs):
    """On the CPU device both sides are the CPU, so the tokens stay plain transformers' to the bit while the
    hooks do their work: a decode step runs with the block's own threads and on the CPU lane; a prefill
    (more tokens than ``max_tokens``) keeps the caller's threads and is not counted as the CPU's: the engine
    streams the block for it (on CUDA), and the hooks bind it back to host memory after."""
    from helpers import reference, run_offloaded
    folder = model_dirs("llama")
    want, _ = reference(folder)
    with nb_offload.load(folder, device="cpu", progress=False) as llm:
        idx = next(u.index for u in llm._insp.units if u.name == "model.layers.1")
        unit, params = llm._insp.units[idx], llm._params[idx]
        host = llm._storage.stores[idx].flat
        block = llm.model.get_submodule("model.layers.1")
        seen = []
        own = block.forward

        def spy(*args, **kwargs):
            seen.append((torch.get_num_threads(), params[0].data.data_ptr()))
            assert cpu._cache is not None       # the layer's cache, under the name transformers gives it
            return own(*args, **kwargs)
        block.forward = spy
        stats = Stats()
        cpu = hybrid.CpuBlock(torch, unit, params, host, layer=hybrid.layer_index(block), device=torch.device("cpu"),
                              max_tokens=1, threads=1, trace=Trace(enabled=False), stats=stats)
        assert cpu.layer == 1
        hooks = ModuleHooks(llm.model)
        hooks.around("model.layers.1", cpu.before, cpu.after)
        mine = torch.get_num_threads()
        assert mine > 1
        try:
            tokens = llm.generate(torch.tensor([list(range(1, 9))]), max_new_tokens=3, min_new_tokens=3,
                                  do_sample=False)
            assert torch.equal(run_offloaded(llm)[0], want)
        finally:
            hooks.remove()
            block.forward = own
        assert torch.equal(tokens, plain_tokens(folder))
        # the generates' prefills and run_offloaded's forward: the caller's threads; decode steps: the block's one
        assert [t for t, _ in seen].count(mine) == 3 and [t for t, _ in seen].count(1) == len(seen) - 3
        assert host.data_ptr() <= params[0].data.data_ptr() < host.data_ptr() + unit.nbytes   # bound back
        assert torch.get_num_threads() == mine      # the caller's threads its own again
        assert stats.cpu_block_calls == len(seen) - 3 and stats.cpu_block_bytes == stats.cpu_block_calls * unit.nbytes
        assert stats.bytes_from_cpu == 0            # the engine's streaming counts a large step's bytes
        summary = stats.run_summary(Stats().as_dict(), 1, 1.0)
        assert "blocks a step computed on the CPU from host memory" in summary
        assert "streaming may be" not in summary          # no link rate given: nothing to compare with


class ThreadHandoff:
    """handoff.GpuHandoff's part without a GPU: the worker a thread, and the device's copy of the output taken
    once the call is done (where the GPU's stream would wait on the counter)."""

    program = None          # never capturing

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="handoff-test")
        self.owed, self.buffers = [], []

    def host_buffer(self, like):
        self.buffers.append(torch.empty_like(like, device="cpu"))
        return self.buffers[-1]

    def device_view(self, out):
        return None             # the output copied back

    def inputs_ready(self):
        class Ready:
            def synchronize(self):
                pass
        return Ready()

    def submit(self, work, count, prepare=None):
        self.owed.append((self.pool.submit(work), count))
        return self.owed[-1][0]

    def output(self, waited, out, view=None):
        waited.result()
        return out.clone()


def test_a_cpu_block_hands_decode_steps_to_a_worker_once_it_knows_their_output(model_dirs):
    """With a handoff, the block's first small step runs on the caller (its output shows the form), and the
    later ones on the worker, which returns the same tokens; what the worker did is counted when the engine
    collects it. A step larger than ``max_tokens`` (a prefill) stays on the caller."""
    import threading
    folder = model_dirs("llama")
    with nb_offload.load(folder, device="cpu", progress=False) as llm:
        idx = next(u.index for u in llm._insp.units if u.name == "model.layers.1")
        unit, params = llm._insp.units[idx], llm._params[idx]
        host = llm._storage.stores[idx].flat
        block = llm.model.get_submodule("model.layers.1")
        threads, stats = [], Stats()

        def own(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            threads.append((threading.current_thread().name, hidden.shape[1], torch.get_num_threads()))
            return type(block).forward(block, *args, **kwargs)
        handoff = ThreadHandoff()
        cpu = hybrid.CpuBlock(torch, unit, params, host, layer=1, device=torch.device("cpu"), max_tokens=1,
                              threads=1, trace=Trace(enabled=False), stats=stats, handoff=handoff)
        block.forward = cpu.forward(own)
        try:
            tokens = llm.generate(torch.tensor([list(range(1, 9))]), max_new_tokens=4, min_new_tokens=4,
                                  do_sample=False)
        finally:
            del block.forward
            handoff.pool.shutdown()
        assert torch.equal(tokens, plain_tokens(folder, 4))
        main = threading.current_thread().name
        assert [(name == main, n) for name, n, _ in threads] == [(True, 8), (True, 1), (False, 1), (False, 1)]
        assert len(handoff.owed) == 2 and stats.cpu_block_calls == 1      # the caller's call, counted at once
        for future, count in handoff.owed:
            count(*future.result())
        assert stats.cpu_block_calls == 3 and stats.cpu_block_bytes == 3 * unit.nbytes
        # buffers kept for calls of the same shapes: the output's made once for both worker calls (the inputs
        # are on the CPU device already here, so they need none)
        assert len(handoff.buffers) == 1 and len(cpu._staging) == 1


def test_a_block_whose_output_is_not_its_hidden_state_stays_on_the_caller():
    hidden = torch.zeros(1, 1, 4)
    assert hybrid._output_form(hidden.clone(), hidden.shape, hidden.dtype) == "tensor"
    assert hybrid._output_form((hidden.clone(),), hidden.shape, hidden.dtype) == "tuple"
    assert hybrid._output_form((hidden, torch.zeros(1, 2, 1, 1)), hidden.shape, hidden.dtype) is None   # attentions
    assert hybrid._output_form(hidden.double(), hidden.shape, hidden.dtype) is None
    assert hybrid._output_form(hidden, None, None) is None


def test_the_summary_says_when_computing_on_the_cpu_did_not_pay():
    before = Stats().as_dict()
    # 6 GB streamed and 4 GB the CPU read: 0.2 s over a 50 GB/s link alone; the CPU was busy 0.3 s
    slow = Stats(steps=10, cpu_block_calls=20, cpu_block_bytes=4 * 10**9, cpu_block_seconds=0.3,
                 bytes_from_cpu=6 * 10**9).run_summary(before, 10, 0.5, link_gbps=50.0)
    assert "the CPU's work alone took 0.30 s, the link would carry all of it from host memory in 0.20 s" in slow
    assert "streaming may be faster here" in slow
    # busy less than that: the CPU and the link may have shared the step, nothing said
    assert "streaming may be" not in Stats(steps=10, cpu_block_calls=20, cpu_block_bytes=4 * 10**9,
                                          cpu_block_seconds=0.1, bytes_from_cpu=6 * 10**9).run_summary(
        before, 10, 0.5, link_gbps=50.0)
    # a generate that read from disk: the drive may have bound it, nothing to judge
    assert "streaming may be" not in Stats(steps=10, cpu_block_calls=20, cpu_block_bytes=4 * 10**9,
                                          cpu_block_seconds=0.3, bytes_from_cpu=6 * 10**9,
                                          bytes_from_disk=10**9).run_summary(before, 10, 0.5, link_gbps=50.0)
    # routed experts the CPU computed count the same way
    experts = Stats(steps=10, experts_read=4, experts_on_cpu=6, bytes_on_cpu=4 * 10**9, cpu_expert_seconds=0.3,
                    bytes_from_cpu=6 * 10**9)
    assert "streaming may be faster here" in experts.run_summary(before, 10, 0.5, link_gbps=50.0)
    assert "streaming may be" not in Stats(steps=10, bytes_from_cpu=10**10).run_summary(before, 10, 5.0,
                                                                                       link_gbps=50.0)


def plain_tokens(folder, n=3):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        return model.generate(torch.tensor([list(range(1, 9))]), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)


def test_a_step_an_interrupt_cut_short_leaves_the_next_one_clean(model_dirs):
    """A KeyboardInterrupt skips forward hooks: the engine's next step resets the CPU blocks (threads, binding)."""
    with nb_offload.load(model_dirs("llama"), device="cpu", progress=False) as llm:
        idx = next(u.index for u in llm._insp.units if u.name == "model.layers.1")
        unit, params = llm._insp.units[idx], llm._params[idx]
        host = llm._storage.stores[idx].flat
        slot = torch.empty(unit.nbytes, dtype=torch.uint8)      # where the engine binds it for a large step
        mine = torch.get_num_threads()
        for tokens in (1, 8):       # a small step, then a large one, cut short
            cpu = hybrid.CpuBlock(torch, unit, params, host, layer=1, device=torch.device("cpu"), max_tokens=1,
                                  threads=mine + 1, trace=Trace(enabled=False), stats=Stats())
            cpu.before((torch.zeros(1, tokens, 64),), {})
            if tokens > 1:
                bind(params, unit, slot)
            assert cpu._on_gpu == (tokens > 1)
            assert torch.get_num_threads() == (mine + 1 if tokens == 1 else mine)
            cpu.reset()
            assert torch.get_num_threads() == mine
            assert host.data_ptr() <= params[0].data.data_ptr() < host.data_ptr() + unit.nbytes


def test_a_held_cpu_block_computes_every_step_where_it_is_held(model_dirs):
    """Held (spare room, for one generate), a CPU block computes small steps too from its copy, with the
    caller's threads and uncounted as the CPU's; given back, it computes on the CPU from host memory again."""
    with nb_offload.load(model_dirs("llama"), device="cpu", progress=False) as llm:
        idx = next(u.index for u in llm._insp.units if u.name == "model.layers.1")
        unit, params = llm._insp.units[idx], llm._params[idx]
        host = llm._storage.stores[idx].flat
        copy = host.clone()
        mine = torch.get_num_threads()
        stats = Stats()
        cpu = hybrid.CpuBlock(torch, unit, params, host, layer=1, device=torch.device("cpu"), max_tokens=1,
                              threads=mine + 1, trace=Trace(enabled=False), stats=stats)
        cpu.hold(copy)
        assert copy.data_ptr() <= params[0].data.data_ptr() < copy.data_ptr() + unit.nbytes
        cpu.after(torch.zeros(1, 1, 64) if cpu.before((torch.zeros(1, 1, 64),), {}) else None)
        assert torch.get_num_threads() == mine and stats.cpu_block_calls == 0
        assert copy.data_ptr() <= params[0].data.data_ptr() < copy.data_ptr() + unit.nbytes
        cpu.hold(None)
        assert host.data_ptr() <= params[0].data.data_ptr() < host.data_ptr() + unit.nbytes
        cpu.before((torch.zeros(1, 1, 64),), {})
        assert torch.get_num_threads() == mine + 1
        cpu.after(torch.zeros(1, 1, 64))
        assert torch.get_num_threads() == mine and stats.cpu_block_calls == 1


def _with_cpu_block(llm, idx):
    """``llm``'s engine started again with the resident block ``idx`` as a block the CPU computes (loads give
    none on the CPU device, where both sides are the CPU: this checks the engine's part)."""
    from nb_offload.engine import Engine
    llm._engine.remove()
    resident = llm.plan.resident_tier
    stores = llm._storage.stores
    sources = {u.index: stores[u.index] for u in llm._insp.units if stores[u.index].tier != resident}
    eng = Engine(llm.model, llm._insp.units, llm._params, sources, llm._device, llm.trace, llm.stats,
                 prefetch=llm.plan.prefetch, split=llm.plan.split_blocks, cpu_blocks={idx: stores[idx].flat},
                 cpu_max_tokens=1)
    eng.install()
    llm._engine = eng
    return eng


def test_the_engine_streams_a_cpu_block_in_large_steps_in_pieces_and_holds_it(model_dirs, tmp_path):
    """A prefill streams the CPU's block through the staging slots (its pieces bound there, its leftovers to
    their own buffer) and the decode steps compute it from host memory; held, it computes every step from its
    copy; given back, as before. The schedule runs each kind of step's own order. Tokens stay plain
    transformers' (both sides are the CPU)."""
    from helpers import load_tight
    folder = model_dirs("llama")
    want = plain_tokens(folder, 4)
    with load_tight(folder, str(tmp_path / "off"), hold_spare=False) as llm:
        idx = next(u.index for u, e in zip(llm._insp.units, llm.plan) if e.kind == "block" and e.tier == "cpu")
        eng = _with_cpu_block(llm, idx)
        unit, params = llm._insp.units[idx], llm._params[idx]
        host = llm._storage.stores[idx].flat
        pieces = eng.pieces_of[idx]
        assert pieces and idx in eng.rest and not set(pieces) & set(eng.sources)
        assert set(pieces) <= set(eng.schedule.orders[True]) and not set(pieces) & set(eng.schedule.orders[False])
        block = llm.model.get_submodule(unit.name)
        attn = block.self_attn
        own, seen = attn.forward, []

        def inside(t, buf):
            return buf.data_ptr() <= t.data_ptr() < buf.data_ptr() + buf.numel()

        def spy(*args, **kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            weight = attn.q_proj.weight
            held = [b for _, b in eng.held.values()]
            seen.append((hidden.shape[1], "host" if inside(weight, host) else
                         "slot" if any(inside(weight, slot) for slot in eng.mover.slots) else
                         "held" if any(inside(weight, b) for b in held) else "other",
                         inside(block.input_layernorm.weight, eng.rest[idx])))
            return own(*args, **kwargs)
        attn.forward = spy
        eng.prime = lambda: None        # each generate starts from what the last left in the slots (no priming)
        try:
            moved = llm.stats.bytes_from_cpu
            ids = torch.tensor([list(range(1, 9))])
            assert torch.equal(llm.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False), want)
            # the prefill from the slots, its leftovers from their buffer; decode from host memory
            assert seen == [(8, "slot", True)] + [(1, "host", False)] * 3, seen
            assert llm.stats.bytes_from_cpu - moved == unit.nbytes - unit.rest_nbytes
            assert eng.order == eng.schedule.orders[False] and not eng.large
            assert host.data_ptr() <= params[0].data.data_ptr() < host.data_ptr() + unit.nbytes
            # held: every step from its copy, none streamed; given back: as before
            seen.clear()
            eng.hold([idx])
            assert eng.schedule.held >= set(pieces)
            assert torch.equal(llm.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False), want)
            assert seen == [(8, "held", False)] + [(1, "held", False)] * 3, seen
            assert llm.stats.cpu_block_calls == 3       # the first generate's decode steps only
            eng.release_held()
            seen.clear()
            assert torch.equal(llm.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False), want)
            assert seen == [(8, "slot", True)] + [(1, "host", False)] * 3, seen
        finally:
            del attn.forward


def test_after_a_generate_the_slots_hold_the_next_prompt_s_first_units_the_cpu_s_block_s_pieces_included(
        model_dirs, tmp_path):
    """A generate's end brings the first units of a large step into the slots (Engine.prime: the next generate's
    prefill streams the CPU's blocks too), finding those the decode steps left there; the prefill then takes
    them as queued. Tokens stay plain transformers'."""
    from helpers import load_tight
    folder = model_dirs("llama")
    want = plain_tokens(folder, 4)
    with load_tight(folder, str(tmp_path / "off"), hold_spare=False) as llm:
        idx = next(u.index for u, e in zip(llm._insp.units, llm.plan) if e.kind == "block" and e.tier == "cpu")
        eng = _with_cpu_block(llm, idx)
        large = eng.schedule.orders[True]
        assert large != eng.schedule.orders[False]
        ids = torch.tensor([list(range(1, 9))])
        for _ in range(2):
            before = llm.stats.as_dict()
            assert torch.equal(llm.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False), want)
            primed = llm.stats.primed_from_cpu + llm.stats.primed_from_disk - before["primed_from_cpu"] - \
                before["primed_from_disk"]
            assert primed > 0
            line = llm.stats.run_summary(before, 4, 1.0)
            assert "brought into the staging slots for the next prompt" in line, line
            assert eng.large and eng.order == large
            queued = [job.unit for job in eng.schedule.queue]
            assert queued == large[:len(queued)] and len(queued) == len(eng.slots)
        assert llm.stats.kept_units >= 1        # found where the decode steps left them
        # a prompt of one token is a small step: the queue starts over in the small order, finding what it shares
        from transformers import AutoModelForCausalLM
        one = torch.tensor([[5]])
        with torch.inference_mode():
            plain = AutoModelForCausalLM.from_pretrained(folder).eval().generate(
                one, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        kept = llm.stats.kept_units
        assert torch.equal(llm.generate(one, max_new_tokens=3, min_new_tokens=3, do_sample=False), plain)
        assert llm.stats.kept_units > kept


def test_a_plan_that_fits_the_gpu_keeps_every_block_there_under_hybrid(model_dirs, rates):
    plan = nb_offload.plan(model_dirs("llama"), gpu="1GiB", cpu="1GiB", compute="hybrid")
    assert all(e.tier == "gpu" and not e.compute for e in plan)


def test_a_layers_cache_moves_where_its_block_computes():
    from transformers import DynamicCache
    cache = DynamicCache()
    cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 0)
    cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 1)
    hybrid.move_layer_cache(torch, cache, 1, torch.device("meta"))
    assert cache.layers[1].keys.device.type == "meta" and cache.layers[1].values.device.type == "meta"
    assert cache.layers[0].keys.device.type == "cpu"
    hybrid.move_layer_cache(torch, cache, 7, torch.device("meta"))     # no such layer: nothing
    hybrid.move_layer_cache(torch, None, 0, torch.device("meta"))


def test_the_layer_map_marks_blocks_computed_on_the_cpu(model_dirs, rates):
    from nb_offload import views
    from nb_offload.widgets.state import pin_targets, plan_state
    plan = all_in_host_memory(model_dirs("llama"), compute="hybrid")
    on_cpu = [e.name for e in plan if e.compute == "cpu"]
    state = plan_state(plan)
    assert [e["name"] for e in state["entries"] if e.get("compute") == "cpu"] == on_cpu
    assert pin_targets(plan)[:3] == ["gpu", "cpu", "cpu-compute"]
    svg = views.layer_map_svg(plan)
    assert svg.count("computed on the CPU where its bytes are") == len(on_cpu)
    cpu_plan = nb_offload.plan(model_dirs("llama"), device="cpu", cpu="1GiB")
    assert "cpu-compute" not in pin_targets(cpu_plan)


def test_the_plan_magic_predicts_a_hybrid_split(shell, model_dirs, monkeypatch, rates):
    from IPython.utils.capture import capture_output
    own_plan = loader.plan
    monkeypatch.setattr(loader, "plan", lambda *a, **kw: own_plan(*a, pins={"model.layers.*": "cpu"}, **kw))
    folder = model_dirs("llama")
    with capture_output() as out:
        shell.run_line_magic("offload_plan", f"{folder} --gpu 1GiB --cpu 1GiB --link 60 --compute hybrid "
                                             "--cpu-rate 20")
    assert "computed on the CPU where their bytes are" in out.outputs[0].data["text/plain"]
    assert "the CPU computes" in out.stdout and "at 20 GB/s" in out.stdout


def test_the_offload_cell_takes_the_compute_keys_and_cpu_compute_pins(shell, model_dirs):
    from helpers import run_cell
    folder = model_dirs("mixtral")
    run_cell(shell, f"%%offload hyb\nmodel: {folder}\ndevice: cpu\ncompute: hybrid\n"
                    "expert_compute: 0.5\npin:\n  model.layers.1: cpu-compute\n")
    try:
        llm = shell.user_ns["hyb"]
        assert (llm.options.compute, llm.options.expert_compute) == ("hybrid", 0.5)
        assert llm.pins() == {"model.layers.1": "cpu-compute"}
    finally:
        shell.run_cell("%offload_unload hyb", store_history=False)


def test_the_step_collects_every_call_of_the_workers_and_raises_the_first_failure(model_dirs):
    """A failed CPU call fails its step, and no other call of that step is left for a later one to raise."""
    from concurrent.futures import Future
    with nb_offload.load(model_dirs("llama"), device="cpu", progress=False) as llm:
        eng, counted = llm._engine, []

        def done(value=None, error=None):
            future = Future()
            future.set_exception(error) if error else future.set_result(value)
            return future
        eng._outstanding = [(done((0.0, 1.0)), lambda t0, t1: counted.append(1)),
                            (done(error=ValueError("first")), lambda t0, t1: counted.append(2)),
                            (done(error=KeyError("second")), lambda t0, t1: counted.append(3)),
                            (done((1.0, 2.0)), lambda t0, t1: counted.append(4))]
        with pytest.raises(ValueError, match="first"):
            eng._collect()
        assert counted == [1, 4] and eng._outstanding == []
        eng._collect()          # nothing left over


def test_a_step_that_records_inner_outputs_keeps_the_cpu_blocks_on_the_caller(model_dirs):
    """transformers gathers attentions (and MoE router logits) through a context variable a worker thread
    doesn't see: such steps compute their CPU blocks on the caller."""
    from types import SimpleNamespace
    with nb_offload.load(model_dirs("llama"), device="cpu", progress=False) as llm:
        block = SimpleNamespace(on_worker=True, handoff=object(), reset=lambda: None)
        llm._engine._cpu_hooks[-1] = block
        ids = torch.tensor([[1, 2, 3]])
        mask = torch.ones_like(ids)     # tensors among the keywords, as generate passes them
        llm.model(input_ids=ids, attention_mask=mask, output_attentions=True)
        assert block.on_worker is False
        llm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)   # returned, not recorded inside
        assert block.on_worker is True
        llm.model.config.output_router_logits = True
        llm.model(input_ids=ids, attention_mask=mask)
        assert block.on_worker is False
        del llm._engine._cpu_hooks[-1]


def test_an_unknown_handoff_is_refused_naming_the_accepted_ones(model_dirs, monkeypatch):
    monkeypatch.setattr(hybrid, "HANDOFF", "Graph")
    with pytest.raises(nb_offload.OptionError, match=r"hybrid.HANDOFF is 'Graph'; accepted: caller, worker, graph"):
        nb_offload.load(model_dirs("llama"), device="cpu", progress=False)
    from nb_offload import handoff
    monkeypatch.setattr(hybrid, "HANDOFF", "graph")
    monkeypatch.setattr(handoff, "READ_BACK", "dma")
    with pytest.raises(nb_offload.OptionError, match=r"handoff.READ_BACK is 'dma'; accepted: copy, kernel"):
        nb_offload.load(model_dirs("llama"), device="cpu", progress=False)


def test_a_load_keeps_the_handoff_it_was_made_with_through_a_re_plan(model_dirs, monkeypatch):
    """hybrid.HANDOFF and handoff.READ_BACK are read at load: an engine a re-pin (or a re-plan at the rate
    reached) builds later keeps the load's, whatever the module's values are by then."""
    from nb_offload import handoff
    monkeypatch.setattr(hybrid, "HANDOFF", "worker")
    monkeypatch.setattr(handoff, "READ_BACK", "kernel")
    with nb_offload.load(model_dirs("llama"), device="cpu", progress=False) as llm:
        monkeypatch.setattr(hybrid, "HANDOFF", "caller")
        monkeypatch.setattr(handoff, "READ_BACK", "copy")
        first = llm._engine
        llm.pin("model.layers.1", "cpu-compute")
        assert llm._engine is not first         # a new engine
        assert (llm._engine.handoff_kind, llm._engine.read_back) == ("worker", "kernel")


def test_a_load_plans_again_once_at_the_cpu_rate_its_blocks_reached(model_dirs, monkeypatch):
    """After a generate whose CPU blocks computed more than hybrid.RECALIBRATE_OVER away from the rate the split
    was chosen at, the model is planned again at the rate reached, once: units move (``_replan``) where the
    new plan places them otherwise, else only the plan's rates change. Within the margin, switched off, for a
    plan whose split no rate chose, or from inside a run in this thread, never. A re-plan that fails leaves
    the plan and the rate made at load, warns, and the generate's output stands."""
    from nb_offload import model as model_module
    folder = model_dirs("llama")
    ids = torch.tensor([[1, 5, 9, 13]])

    def loaded(compute="hybrid", reached=(30e9, 1.0, 8), load_rate=40.0, moves=True, fails=False):
        llm = nb_offload.load(folder, device="cpu", compute=compute, progress=False)
        llm._insp._cpu_rates = (load_rate, 25.0)         # as measured at load (the CPU device measures none)
        llm.plan.rates = (load_rate, 25.0)
        # no replayed steps: every decode call counts
        llm._cpu_blocks_seen.update(cpu_decode_bytes=reached[0], cpu_decode_seconds=reached[1],
                                    cpu_decode_calls=reached[2])
        replans = []

        def replan(pins):
            if fails:
                raise RuntimeError("no room")
            replans.append(llm._insp.cpu_rates())
        monkeypatch.setattr(llm, "_replan", replan)
        monkeypatch.setattr(model_module, "_same_placement", lambda a, b: not moves)
        return llm, replans
    llm, replans = loaded()
    try:
        out = llm.generate(ids, max_new_tokens=2)
        assert replans == [(30.0, 25.0)] and llm.replanned_at == (40.0, 30.0) and llm._insp._rates_reached
        llm.generate(ids, max_new_tokens=2)
        assert len(replans) == 1                        # once a load
    finally:
        llm.unload()
    llm, replans = loaded(moves=False)                  # the same placement: the plan's rates only
    try:
        llm.generate(ids, max_new_tokens=2)
        assert replans == [] and llm.replanned_at == (40.0, 30.0) and llm.plan.rates_reached is False
    finally:
        llm.unload()
    llm, replans = loaded(fails=True)
    try:
        with pytest.warns(UserWarning, match=r"planning again at the CPU's rate reached \(30.0 GB/s.*no room"):
            out = llm.generate(ids, max_new_tokens=2)
        assert out.shape == (1, 6) and llm.replanned_at is None
        assert llm._insp.cpu_rates() == (40.0, 25.0) and not llm._insp._rates_reached
        llm.generate(ids, max_new_tokens=2)             # tried once: not again
    finally:
        llm.unload()
    llm, replans = loaded()
    try:
        with llm._gate.run():                           # inside a run in this thread: the outer one decides
            llm._recalibrate()
        assert replans == [] and not llm._recalibration_tried
    finally:
        llm.unload()
    for kw, patch in ((dict(reached=(36e9, 1.0, 8)), None),                 # 10 % below: kept
                      (dict(reached=(30e9, 1.0, 7)), None),                 # too few calls to tell
                      (dict(compute="gpu"), None),                          # no split chosen by rates
                      ({}, "off")):
        if patch == "off":
            monkeypatch.setattr(hybrid, "RECALIBRATE_OVER", None)
        llm, replans = loaded(**kw)
        try:
            llm.generate(ids, max_new_tokens=2)
            assert replans == [] and llm.replanned_at is None, kw
        finally:
            llm.unload()


def test_a_plan_made_at_the_rate_reached_says_so(model_dirs, monkeypatch):
    monkeypatch.setattr(loader.Inspection, "cpu_rates", lambda self: self._cpu_rates or RATES)
    folder = model_dirs("llama", num_hidden_layers=8)
    at_load = all_in_host_memory(folder, compute="hybrid")
    assert at_load.rates == RATES and not at_load.rates_reached
    assert "the rate its blocks reached decoding" not in str(at_load)
    insp = loader.Inspection(folder, nb_offload.Options(compute="hybrid"))
    insp.use_cpu_rate(10.0)
    assert insp.cpu_rates() == (10.0, RATES[1]) and insp._rates_reached
    replanned = insp.make_plan("cuda", at_load.budgets, {u.index: "cpu" for u in insp.units if u.kind == "block"})
    assert replanned.rates == (10.0, RATES[1]) and replanned.rates_reached
    assert "at the CPU's 10.0 (the rate its blocks reached decoding)" in str(replanned)
    # a slower CPU computes fewer of the blocks
    assert sum(e.compute == "cpu" for e in replanned) < sum(e.compute == "cpu" for e in at_load)
