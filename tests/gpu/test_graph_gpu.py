"""CUDA tests of the captured decode step (graphs.py): tokens, recapture, held units, the trace, memory.

The reference for a captured step is the same step run eager with the same static cache: transformers'
own ``generate`` given a ``StaticCache`` of the same length, without compiling.
"""

import pytest
import torch
from helpers import PROMPT, InterruptAt, blocks, staging_bytes

import nb_offload
from nb_offload.graphs import bucket, cache_name

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

N = 12


def plain(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, device_map="cuda").eval()


def plain_generate(model, ids, n=N, static=True, **kw):
    """transformers' generate; ``static``: with a static cache of the length nb_offload gives this generate."""
    from transformers import StaticCache
    if static:
        kw.update({cache_name(model): StaticCache(config=model.config, max_cache_len=bucket(ids.shape[1] + n))},
                  disable_compile=True)
    kw.setdefault("do_sample", False)
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw).cpu()


def offloaded(llm, ids, n=N, **kw):
    kw.setdefault("do_sample", False)
    return llm.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw).cpu()


def streamed_pins(folder):
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    return {n: "cpu" for n in names[::2]}


FUSED = {"llama": "9 norms, 4 MLPs, rotary", "qwen2": "9 norms, 4 MLPs, rotary", "gemma": "rotary",
         "phi3": "9 norms", "mixtral": "9 norms, rotary", "qwen2_moe": "9 norms, 4 MLPs, rotary"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "phi3", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("where", ["resident", "streamed"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captured_decode_matches_transformers(arch, where, dtype, model_dirs):
    """In bfloat16 the captured step runs fused kernels (fused.py): the tokens are still the eager step's."""
    folder = model_dirs(arch) if dtype == "float32" else model_dirs(arch, dtype=dtype)
    ids = torch.tensor(PROMPT, device="cuda")
    ref = plain(folder)
    want = plain_generate(ref, ids)
    dynamic = plain_generate(ref, ids, static=False)
    del ref
    pins = streamed_pins(folder) if where == "streamed" else {}
    llm = nb_offload.load(folder, pins=pins, progress=False)
    try:
        assert (where == "streamed") == any(e.tier == "cpu" for e in llm.plan)
        first = offloaded(llm, ids)
        captures = llm.stats.graph_captures
        assert llm.stats.graph_eager == "", llm.stats.graph_eager
        assert captures == 1 and llm.stats.graph_replays == N - 2       # decode step 1 eager, then captured
        assert torch.equal(first, want), (first, want)
        if dtype == "bfloat16":
            assert llm.stats.graph_fused == FUSED[arch], llm.stats.graph_fused
        else:
            assert llm.stats.graph_fused.startswith("none: the model computes in float32")
        second = offloaded(llm, ids)                                     # the same bucket: replayed from the start
        assert torch.equal(second, want)
        assert llm.stats.graph_captures == captures and llm.stats.graph_replays == 2 * N - 3
        llm.cuda_graph = False
        eager = offloaded(llm, ids)                                      # the eager path, dynamic cache
        assert torch.equal(eager, dynamic)
        print(f"{arch} {where}: captured == static reference; eager dynamic == static: {torch.equal(eager, want)}")
    finally:
        llm.unload()


def test_recapture_after_a_repin_and_with_held_units(model_dirs):
    # blocks large enough that a short generate leaves room to hold some (spare.py), two of eight resident
    folder = model_dirs("llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=8, vocab_size=4096, dtype="bfloat16")
    p = nb_offload.plan(folder, gpu="64GiB", cpu="8GiB", context=1024)
    block = blocks(p)[0].bytes
    fixed = sum(v for k, v in p.reserved.items() if k != "staging_slots")
    tops = sum(e.bytes for e in p if e.kind == "top")
    budget = fixed + tops + staging_bytes(folder, p.prefetch) + 2 * block + 4096
    ids = torch.randint(3, 4000, (1, 24), device="cuda")
    want = plain_generate(plain(folder), ids)
    llm = nb_offload.load(folder, gpu=budget, cpu="8GiB", context=1024, hold_spare=False, progress=False)
    try:
        assert [e.tier for e in blocks(llm.plan)].count("gpu") == 2, str(llm.plan)
        assert torch.equal(offloaded(llm, ids), want)
        cpu_block = next(e.name for e in blocks(llm.plan) if e.tier == "cpu")
        llm.pin(cpu_block, "gpu")                   # a new engine: its step captured afresh
        before = llm.stats.graph_captures
        assert torch.equal(offloaded(llm, ids), want)
        assert llm.stats.graph_captures == before + 1
        llm.unpin(cpu_block)
        llm.hold_spare = True                       # held units run from buffers of their own: another graph
        before = llm.stats.graph_captures
        assert torch.equal(offloaded(llm, ids), want)
        assert llm.stats.held_last >= 2 and llm.stats.graph_captures == before + 1
        assert not llm._engine.held
        # held again: the graph is replayed where the buffers land where they were, else captured again
        assert torch.equal(offloaded(llm, ids), want)
        print(f"held again: {llm.stats.graph_captures - before - 1} new capture(s)")
    finally:
        llm.unload()


def test_captured_steps_move_the_same_bytes_and_keep_the_trace(model_dirs):
    folder = model_dirs("llama")
    ids = torch.tensor(PROMPT, device="cuda")
    llm = nb_offload.load(folder, pins=streamed_pins(folder), hold_spare=False, progress=False)
    try:
        units = [e.bytes for e in llm.plan if e.tier == "cpu"]
        offloaded(llm, ids)
        llm.trace.clear()
        s = llm.stats
        before = (s.bytes_from_cpu, s.kept_bytes, s.kept_units)
        offloaded(llm, ids)
        # prefill and every decode step have each streamed unit in its slot once, copied there or found there
        # (the prefill finds what the last generate's end left: Engine.prime); besides, the prefill's prefetch
        # for the next step and the last replay's for a step that doesn't come (two slots each) go unused
        moved, kept_bytes, kept = (a - b for a, b in zip((s.bytes_from_cpu, s.kept_bytes, s.kept_units), before))
        assert kept >= 1, kept
        assert N * sum(units) <= moved + kept_bytes <= N * sum(units) + 4 * max(units)
        events = list(llm.trace)
        steps = [e for e in events if e.kind == "step"]
        copies = [e for e in events if e.kind == "copy"]
        assert len(steps) == N and N * len(units) <= len(copies) + kept <= N * len(units) + 4
        assert all(e.end >= e.start > 0 for e in events)
        # a replay's copies (those its graph stamps, and the next step's first units after it) follow its start
        last = steps[-1]
        assert [c for c in copies if c.step == last.step]
        assert all(c.start >= steps[0].start - 1e-4 for c in copies)
        assert sorted(events, key=lambda e: e.start)[-1].end <= last.end + 0.05
    finally:
        llm.unload()


def test_pool_and_capture_cost_are_within_the_reservation(model_dirs):
    folder = model_dirs("llama")
    ids = torch.tensor(PROMPT, device="cuda")
    llm = nb_offload.load(folder, progress=False)
    try:
        offloaded(llm, ids)
        s = llm.stats
        print(f"capture {s.capture_seconds * 1e3:.1f} ms, pool {s.graph_pool_bytes} B, "
              f"reserved {llm.plan.reserved['decode_graph']} B")
        assert s.graph_captures == 1 and s.capture_seconds > 0
        assert 0 < s.graph_pool_bytes <= llm.plan.reserved["decode_graph"]
    finally:
        llm.unload()


def test_sampling_streamers_and_stops_work_through_the_graph(model_dirs):
    from transformers import StoppingCriteria, StoppingCriteriaList

    folder = model_dirs("llama")
    ids = torch.tensor(PROMPT, device="cuda")
    ref = plain(folder)
    torch.manual_seed(7)
    want = plain_generate(ref, ids, do_sample=True, top_k=20)
    llm = nb_offload.load(folder, pins=streamed_pins(folder), progress=False)
    try:
        torch.manual_seed(7)
        assert torch.equal(offloaded(llm, ids, do_sample=True, top_k=20), want)

        class Collect:
            def __init__(self):
                self.tokens = []

            def put(self, value):
                self.tokens += value.flatten().tolist()

            def end(self):
                pass

        class StopAt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), input_ids.shape[1] >= len(PROMPT[0]) + 6,
                                  dtype=torch.bool, device=input_ids.device)
        streamer = Collect()
        out = llm.generate(ids, max_new_tokens=N, do_sample=False, streamer=streamer,
                           stopping_criteria=StoppingCriteriaList([StopAt()])).cpu()
        assert out.shape[1] == len(PROMPT[0]) + 6
        assert streamer.tokens == out[0].tolist()
        assert torch.equal(out, plain_generate(ref, ids)[:, :out.shape[1]])
    finally:
        llm.unload()


def test_an_interrupt_between_replays_leaves_the_model_usable(model_dirs):
    folder = model_dirs("llama")
    ids = torch.tensor(PROMPT, device="cuda")
    want = plain_generate(plain(folder), ids)
    llm = nb_offload.load(folder, pins=streamed_pins(folder), progress=False)

    try:
        with pytest.raises(KeyboardInterrupt):
            offloaded(llm, ids, streamer=InterruptAt(6))
        assert torch.equal(offloaded(llm, ids), want)
    finally:
        llm.unload()


def test_plans_that_stay_eager_say_why(model_dirs, tmp_path):
    folder = model_dirs("llama")
    ids = torch.tensor(PROMPT, device="cuda")
    want = plain_generate(plain(folder), ids, static=False)
    llm = nb_offload.load(folder, disk=tmp_path, pins={"model.layers.0": "disk"}, progress=False)
    try:
        assert torch.equal(offloaded(llm, ids), want)
        assert "disk" in llm.stats.graph_eager and llm.stats.graph_replays == 0
    finally:
        llm.unload()
    llm = nb_offload.load(folder, cuda_graph=False, progress=False)
    try:
        assert torch.equal(offloaded(llm, ids), want)
        assert llm.stats.graph_eager == "cuda_graph=False" and "decode_graph" not in llm.plan.reserved
    finally:
        llm.unload()
    ref = plain(folder)
    want = plain_generate(ref, ids, static=False, num_beams=2)
    llm = nb_offload.load(folder, progress=False)
    try:
        assert torch.equal(offloaded(llm, ids, num_beams=2), want)
        assert "beam" in llm.stats.graph_eager and llm.stats.graph_replays == 0
    finally:
        llm.unload()


def test_where_graph_waits_fail_the_check_replays_wait_for_every_first_copy_and_stay_exact(model_dirs, monkeypatch):
    """The fallback of movers.graph_waits_take_launch_record: a replay waits for all its first units' copies
    before it starts (no per-unit events). Streamed units, two generates: tokens equal the static reference."""
    from nb_offload import movers
    monkeypatch.setitem(movers._LAUNCH_RECORD, torch.cuda.current_device(), False)
    folder = model_dirs("llama")
    ids = torch.tensor(PROMPT, device="cuda")
    ref = plain(folder)
    want = plain_generate(ref, ids)
    del ref
    llm = nb_offload.load(folder, pins=streamed_pins(folder), progress=False)
    try:
        for _ in range(2):
            assert torch.equal(offloaded(llm, ids), want)
        assert llm._engine.mover.waits_per_unit is False and llm.stats.graph_replays >= 2 * N - 3
    finally:
        llm.unload()


def test_a_replay_waits_for_the_record_made_before_its_launch():
    """A replay waits for its first units' copies on external events that ``prefetch`` records before the
    launch, and records again for the next step while the replay runs (movers.CudaMover.present). That is
    sound only where a graph's wait takes the record made before its launch, not a later one (a later one
    waits for this replay's end: a hang). Here a record queued behind a long sleep, after the launch, must
    not hold the replay up."""
    side = torch.cuda.Stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles_per_ms = 10_000_000 / start.elapsed_time(end)
    arrived = torch.cuda.Event(external=True)
    arrived.record(side)
    x = torch.zeros((), device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.cuda._sleep(int(50 * cycles_per_ms))      # the replay reaches its wait after 50 ms
        torch.cuda.current_stream().wait_event(arrived)
        x.add_(1)
    torch.cuda.synchronize()
    for _ in range(2):
        arrived.record(side)                             # this launch's record: done at once
        start.record()
        graph.replay()
        with torch.cuda.stream(side):                    # the next step's, queued behind 500 ms
            torch.cuda._sleep(int(500 * cycles_per_ms))
            arrived.record(side)
        end.record()
        end.synchronize()
        assert start.elapsed_time(end) < 250
        torch.cuda.synchronize()
    assert x.item() == 2
    # the check the engine makes before its first capture (a replay waits for all its first units where it fails)
    from nb_offload.movers import graph_waits_take_launch_record
    assert graph_waits_take_launch_record(torch, torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernels_equal_the_eager_ops_bit_for_bit(dtype):
    """SiLU times up over every finite value of the dtype, RMSNorm at three scales and widths, the rotary
    embedding with and without grouped heads: fused.self_test compares each with the eager ops."""
    from nb_offload import fused
    assert fused.self_test(torch.device("cuda"), dtype) == ""


def test_fused_forwards_give_the_eager_forward_s_logits(model_dirs):
    """A bf16 Llama's prefill and decode forward with the swaps in place: logits equal, bit for bit."""
    from transformers import AutoModelForCausalLM

    from nb_offload import fused
    folder = model_dirs("llama", hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=4096, dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda").eval()
    fusion = fused.Fusion(model)
    assert fusion.check(torch.device("cuda"), model.dtype), fusion.why_not
    ids = torch.tensor(PROMPT, device="cuda")
    with torch.inference_mode():
        for tokens in (ids, ids[:, :1], ids.repeat(2, 1)):
            want = model(tokens).logits
            with fusion.applied():
                got = model(tokens).logits
            assert torch.equal(got, want)
