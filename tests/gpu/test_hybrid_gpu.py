"""CUDA tests of blocks computed on the CPU where their bytes are (hybrid.py), while the others stream.

The reference computes the same blocks on the CPU too, from a copy of each there, for steps the engine
computes them on the CPU (those of at most ``cpu_max_tokens`` tokens, decode steps), with their KV cache in
host memory; larger steps (a prefill) compute them on the GPU, then move their KV cache to host memory.
(A device_map with "cpu" would not do: Accelerate runs such modules on the GPU, streaming their weights.)"""

import copy

import pytest
import torch
from helpers import PROMPT, blocks

import nb_offload
from nb_offload import hybrid, loader
from nb_offload.cpu_experts import host_threads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

N = 10


def _moved(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_moved(y, device) for y in x)
    if isinstance(x, dict):         # the call's kwargs: position_embeddings, attention_mask ...
        return {k: _moved(v, device) for k, v in x.items()}
    return x


def reference(folder, ids, on_cpu, max_tokens, n=N, static=False, dtype=None, kernel=False):
    """Greedy tokens of transformers with the blocks named ``on_cpu`` computed on the CPU for steps of at most
    ``max_tokens`` tokens, as above; ``static``: with the static cache a captured step has (graphs.py), of
    the length nb_offload gives the generate; ``kernel``: those blocks' one-row products by nb_offload's own
    kernel (cpu_kernel="fast"), as the engine's then are."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda", **({"dtype": dtype} if dtype else {}))
    model.eval()
    for name in on_cpu:
        block = model.get_submodule(name)
        twin, own = copy.deepcopy(block).to("cpu"), block.forward
        layer = block.self_attn.layer_idx
        if kernel:
            from nb_offload.cpu_kernel import FastLinears
            FastLinears(torch, twin).install()

        def forward(*args, twin=twin, own=own, layer=layer, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))     # transformers 5 says "cache"
            kv = cache.layers[layer] if cache is not None and layer < len(cache.layers) else None

            def put(device):
                if kv is not None:
                    for attr, t in list(vars(kv).items()):
                        if isinstance(t, torch.Tensor):
                            setattr(kv, attr, t.to(device))
                    if isinstance(getattr(kv, "device", None), torch.device):
                        kv.device = torch.device(device)
            if hidden.shape[0] * hidden.shape[1] > max_tokens:
                put("cuda")
                out = own(*args, **kwargs)
                put("cpu")
                return out
            put("cpu")
            caller = torch.get_num_threads()
            torch.set_num_threads(host_threads())       # as the engine's CPU blocks compute (F.linear's bits
            try:                                        # may change with the thread count)
                return _moved(twin.forward(*_moved(args, "cpu"), **_moved(kwargs, "cpu")), "cuda")
            finally:
                torch.set_num_threads(caller)
        block.forward = forward
    kw = {}
    if static:
        from transformers import StaticCache

        from nb_offload.graphs import bucket, cache_name
        kw[cache_name(model)] = StaticCache(config=model.config, max_cache_len=bucket(ids.shape[1] + n))
        kw["disable_compile"] = True     # eager, as the captured step computes (generate compiles for a static cache)
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw).cpu()


@pytest.mark.parametrize("handoff", hybrid.HANDOFFS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_blocks_computed_on_the_cpu_match_transformers_computing_them_there(arch, handoff, model_dirs, monkeypatch):
    """On the caller's thread, on the worker in eager steps, and on the worker in captured steps (whose
    reference has the same static cache). A prefill streams the CPU's blocks through the staging slots, whole
    or in pieces (``split_blocks``)."""
    monkeypatch.setattr(hybrid, "HANDOFF", handoff)
    static = handoff == "graph"
    folder = model_dirs(arch)
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    ids = torch.tensor(PROMPT, device="cuda")
    four = torch.tensor(PROMPT * 4, device="cuda")
    four[1:, 0] = torch.tensor([9, 11, 13])
    monkeypatch.setattr(loader.Inspection, "cpu_rates", lambda self: (20.0, 60.0))
    monkeypatch.setattr(hybrid, "RECALIBRATE_OVER", None)     # the plan as made, whatever rate the blocks reach
    in_host = {n: "cpu" for n in names}
    for pins, compute, split in (({names[1]: "cpu-compute"}, "gpu", "auto"), (in_host, "hybrid", "auto"),
                                 (dict.fromkeys(names[1:3], "cpu-compute"), "gpu", True)):
        llm = nb_offload.load(folder, pins=pins, compute=compute, hold_spare=False, split_blocks=split,
                              progress=False)
        try:
            eng = llm._engine
            on_cpu = [e.name for e in llm.plan if e.compute == "cpu"]
            assert on_cpu and sorted(eng.units[i].name for i in eng.cpu_blocks) == sorted(on_cpu)
            # bound to host memory, streamed in large steps only (the load primed the slots for one: a prompt's)
            assert not set(eng.cpu_blocks) & (set(eng.sources) - set(eng.large_sources))
            if handoff == "caller":
                assert "computed on the CPU" in eng.graphs.why_not and eng.block_handoff is None
            else:
                assert eng.block_handoff is not None, eng.block_handoff_why_not
            if static:
                assert eng.graphs.enabled, eng.graphs.why_not
            most = eng.cpu_max_tokens
            assert most == llm.plan.cpu_max_tokens >= 1
            print(f"{arch}: {len(on_cpu)} blocks on the CPU, steps of up to {most} tokens there")
            assert llm.plan.split_blocks == (split is True) and "cpu_block_upload" not in llm.plan.reserved
            got = llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu()
            assert torch.equal(got, reference(folder, ids, on_cpu, most, static=static)), (pins, compute, split)
            s = llm.stats
            streamed = sum(e.bytes for e in llm.plan if e.tier != "gpu" and e.compute != "cpu")
            on_cpu_bytes = sum(e.bytes for e in llm.plan if e.compute == "cpu")
            assert s.bytes_from_cpu >= streamed + on_cpu_bytes       # the prefill brought the CPU's blocks too
            assert s.cpu_block_calls >= len(on_cpu) * (N - 1) and s.cpu_block_seconds > 0
            if static:
                assert s.graph_replays >= N - 3 and not s.graph_eager, s.graph_eager
            assert torch.equal(llm.generate(four, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(),
                               reference(folder, four, on_cpu, most, static=static))
            assert any(e.kind == "cpu" for e in llm.trace)
            # a re-pin moves a block back to the GPU: still exact against its own reference
            llm.pin(on_cpu[0], "gpu")
            left = [e.name for e in llm.plan if e.compute == "cpu"]
            got = llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu()
            assert torch.equal(got, reference(folder, ids, left, llm._engine.cpu_max_tokens, static=static))
        finally:
            llm.unload()


def _generate_counting(llm, module, ids, monkeypatch):
    """A greedy generate of N tokens with calls of ``module.product`` (the CPU blocks' products: cpu_products,
    cpu_kernel, cpu_amx) counted, put back after; its decode steps replayed, the CPU blocks computing each one.
    Returns (the tokens, on the CPU; the calls)."""
    calls, real = [], module.product

    def counted(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(module, "product", counted)
    got = llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu()
    monkeypatch.setattr(module, "product", real)
    s, on_cpu = llm.stats, [e.name for e in llm.plan if e.compute == "cpu"]
    assert s.graph_replays >= N - 3 and s.cpu_block_calls >= len(on_cpu) * (N - 1)
    return got, len(calls)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cpu_blocks_multiplying_by_reordered_weights_match_transformers_computing_them_there(arch, model_dirs,
                                                                                             monkeypatch):
    """bf16 blocks wide enough for oneDNN's products (cpu_products.py), their weights reordered where the check
    at load admits the shape (qwen2's q/k/v with a bias), computed on the worker in captured steps: the tokens
    are F.linear's, the reference's."""
    from nb_offload import cpu_products
    monkeypatch.setattr(hybrid, "HANDOFF", "graph")
    folder = model_dirs(arch, dtype="bfloat16", hidden_size=128, intermediate_size=256)
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    ids = torch.tensor(PROMPT, device="cuda")
    monkeypatch.setattr(loader.Inspection, "cpu_rates", lambda self: (20.0, 60.0))
    monkeypatch.setattr(loader.Inspection, "cpu_products", lambda self: "reordered")
    monkeypatch.setattr(hybrid, "RECALIBRATE_OVER", None)
    with nb_offload.load(folder, pins=dict.fromkeys(names[1:3], "cpu-compute"), hold_spare=False,
                         progress=False) as llm:
        s = llm.stats
        print(f"{arch}: {s.cpu_packed_linears} linears reordered, {s.cpu_plain_linears} left to F.linear "
              f"(available: {cpu_products.available(torch)})")
        if not s.cpu_packed_linears:
            pytest.skip("this CPU's torch has no reordered bf16 product matching F.linear")
        on_cpu = [e.name for e in llm.plan if e.compute == "cpu"]
        got, calls = _generate_counting(llm, cpu_products, ids, monkeypatch)
        assert calls >= s.cpu_packed_linears * (N - 1)       # every decode step through the copies
        want = reference(folder, ids, on_cpu, llm._engine.cpu_max_tokens, static=True, dtype=torch.bfloat16)
        assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_cpu_blocks_multiplying_by_the_amx_kernel_match_transformers_computing_them_there(arch, model_dirs,
                                                                                        monkeypatch):
    """The exact products by nb_offload's AMX kernel (cpu_amx.py; the plan's way where the load measured it
    faster, taken here whatever the measure), on the worker in captured steps: the tokens are F.linear's, the
    reference's (qwen2's q/k/v with a bias, phi3's fused projections)."""
    from nb_offload import cpu_amx
    if cpu_amx.why_unavailable():
        pytest.skip(f"the AMX kernel can't run here: {cpu_amx.why_unavailable()}")
    monkeypatch.setattr(hybrid, "HANDOFF", "graph")
    monkeypatch.setattr(hybrid, "RECALIBRATE_OVER", None)
    monkeypatch.setattr(loader.Inspection, "cpu_rates", lambda self: (20.0, 60.0))
    monkeypatch.setattr(loader.Inspection, "cpu_products", lambda self: "amx")
    folder = model_dirs(arch, dtype="bfloat16", hidden_size=128, intermediate_size=256)
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    ids = torch.tensor(PROMPT, device="cuda")
    with nb_offload.load(folder, pins=dict.fromkeys(names[1:3], "cpu-compute"), hold_spare=False,
                         progress=False) as llm:
        s = llm.stats
        assert llm.plan.cpu_products == "amx" and "nb_offload's AMX kernel" in str(llm.plan)
        assert s.cpu_amx_linears > 0 and s.cpu_packed_linears == s.cpu_fast_linears == 0
        on_cpu = [e.name for e in llm.plan if e.compute == "cpu"]
        got, calls = _generate_counting(llm, cpu_amx, ids, monkeypatch)
        assert calls >= s.cpu_amx_linears * (N - 1)       # every decode step through the kernel
        want = reference(folder, ids, on_cpu, llm._engine.cpu_max_tokens, static=True, dtype=torch.bfloat16)
        assert torch.equal(got, want)


@pytest.mark.parametrize("handoff", ["worker", "graph"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cpu_blocks_outputs_read_back_by_a_kernel_give_the_same_tokens(arch, handoff, model_dirs, monkeypatch):
    """handoff.READ_BACK="kernel": each CPU block's output reaches the GPU through a kernel reading its page-locked
    buffer in place (not the copy engine), in eager steps on the worker and in replayed ones; tokens equal the
    reference's, as with the copy."""
    from nb_offload import handoff as handoffs
    monkeypatch.setattr(hybrid, "HANDOFF", handoff)
    monkeypatch.setattr(handoffs, "READ_BACK", "kernel")
    monkeypatch.setattr(hybrid, "RECALIBRATE_OVER", None)
    monkeypatch.setattr(loader.Inspection, "cpu_rates", lambda self: (20.0, 60.0))
    folder = model_dirs(arch)
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    ids = torch.tensor(PROMPT, device="cuda")
    with nb_offload.load(folder, pins=dict.fromkeys(names[1:3], "cpu-compute"), hold_spare=False,
                         progress=False) as llm:
        h = llm._engine.block_handoff
        assert h is not None and h.read_back == "kernel"
        got = llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu()
        views = [staged[2] for block in llm._engine._cpu_hooks.values() for staged in block._staging.values()]
        assert views and all(v is not None for v in views) and not h.read_back_why_not, h.read_back_why_not
        on_cpu = [e.name for e in llm.plan if e.compute == "cpu"]
        if handoff == "graph":
            assert llm.stats.graph_replays >= N - 3, llm.stats.graph_eager
        assert torch.equal(got, reference(folder, ids, on_cpu, llm._engine.cpu_max_tokens,
                                          static=handoff == "graph"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cpu_blocks_multiplying_by_the_fast_kernel_match_transformers_multiplying_by_it(arch, model_dirs,
                                                                                        monkeypatch):
    """cpu_kernel="fast": the CPU blocks' one-row products by nb_offload's own kernel (cpu_kernel.py), on the
    worker in captured steps, at the rate measured for it at load; the tokens are those of transformers with the
    same blocks computed on the CPU by the same kernel."""
    from nb_offload import cpu_kernel
    if cpu_kernel.why_unavailable():
        pytest.skip(f"the kernel can't run here: {cpu_kernel.why_unavailable()}")
    monkeypatch.setattr(hybrid, "HANDOFF", "graph")
    monkeypatch.setattr(hybrid, "RECALIBRATE_OVER", None)
    folder = model_dirs(arch, dtype="bfloat16", hidden_size=128, intermediate_size=256)
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    ids = torch.tensor(PROMPT, device="cuda")
    with nb_offload.load(folder, pins=dict.fromkeys(names[1:3], "cpu-compute"), hold_spare=False,
                         cpu_kernel="fast", progress=False) as llm:
        s = llm.stats
        assert llm.plan.cpu_products == "fast" and "nb_offload's own kernel" in str(llm.plan)
        assert s.cpu_fast_linears > 0 and s.cpu_packed_linears == 0
        on_cpu = [e.name for e in llm.plan if e.compute == "cpu"]
        got, calls = _generate_counting(llm, cpu_kernel, ids, monkeypatch)
        assert calls >= s.cpu_fast_linears * (N - 1)      # every decode step through the kernel
        want = reference(folder, ids, on_cpu, llm._engine.cpu_max_tokens, static=True, dtype=torch.bfloat16,
                         kernel=True)
        assert torch.equal(got, want)


@pytest.mark.parametrize("handoff", ["worker", "graph"])
def test_a_failing_cpu_block_on_the_worker_fails_its_step_and_the_next_generate_is_exact(handoff, model_dirs,
                                                                                          monkeypatch):
    """The worker raises the counter (or sets the flag) also where the block raised, so the GPU never waits
    for good; the error reaches the caller at the step's end, and the model stays usable."""
    monkeypatch.setattr(hybrid, "HANDOFF", handoff)
    folder = model_dirs("llama")
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    # longer than any step the CPU computes (hybrid.TRIED_TOKENS): the prefill is on the GPU, whatever the rates
    ids = torch.tensor([list(range(3, 3 + 2 * hybrid.TRIED_TOKENS[-1]))], device="cuda")
    llm = nb_offload.load(folder, pins={names[1]: "cpu-compute"}, hold_spare=False, progress=False)
    try:
        want = reference(folder, ids, names[1:2], llm._engine.cpu_max_tokens, static=handoff == "graph")
        attn = llm.model.get_submodule(names[1]).self_attn
        own, calls = attn.forward, []

        def failing(*args, **kwargs):
            calls.append(kwargs.get("hidden_states", args[0] if args else None).device.type)
            if len(calls) == 3:         # a decode step on the worker (the first one ran on the caller; a
                # capture runs none: the third call is the captured step's replay)
                raise RuntimeError("a CPU block that fails")
            return own(*args, **kwargs)
        attn.forward = failing
        try:
            with pytest.raises(RuntimeError, match="a CPU block that fails"):
                llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)
        finally:
            del attn.forward
        assert calls == ["cuda", "cpu", "cpu"]          # prefill on the GPU, decode on the CPU
        got = llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu()
        assert torch.equal(got, want)
    finally:
        llm.unload()


def test_a_cpu_block_held_in_spare_room_computes_on_the_gpu_and_on_the_cpu_again_after(model_dirs, monkeypatch):
    """A generate that holds a CPU block in its spare room computes it on the GPU from its copy there, in the
    prefill and the captured decode steps; a generate holding nothing computes it on the CPU again. The same
    hold again may find its step's shape warmed up before and capture at once: the other CPU block's cache
    layer, which the prefill left on the GPU, goes back to host memory before the capture (a capture can't
    move it). Tokens equal the reference with the blocks computed on the CPU in each, every decode captured."""
    folder = model_dirs("llama")
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    ids = torch.tensor(PROMPT, device="cuda")
    llm = nb_offload.load(folder, pins=dict.fromkeys(names[1:3], "cpu-compute"), progress=False)
    try:
        eng = llm._engine
        on_cpu = sorted(eng.units[i].name for i in eng.cpu_blocks)
        assert len(on_cpu) == 2
        first = min(eng.cpu_blocks)
        name = eng.units[first].name
        for picks in ([first], [first], [], [first], []):
            monkeypatch.setattr(llm, "_spare_picks", lambda *a, picks=picks, **k: list(picks))
            calls, replays = llm.stats.cpu_block_calls, llm.stats.graph_replays
            got = llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu()
            assert llm.last_held == ([name] if picks else []) and not eng.held      # given back after
            assert not llm.stats.graph_eager and llm.stats.graph_replays >= replays + N - 3, llm.stats.graph_eager
            on_cpu_now = [n for n in on_cpu if not (picks and n == name)]
            want = reference(folder, ids, on_cpu_now, eng.cpu_max_tokens, static=True)
            assert torch.equal(got, want), picks
            assert llm.stats.cpu_block_calls > calls
        # the rate the CPU's blocks reached in these generates' replayed steps (every decode here was captured),
        # which later holds are chosen at: not the eager steps' around a capture
        stats = llm.stats
        assert stats.cpu_replayed_calls >= llm.RATE_AFTER_CALLS
        assert llm.cpu_rate_reached == pytest.approx(stats.cpu_replayed_bytes / stats.cpu_replayed_seconds / 1e9)
    finally:
        llm.unload()


def test_a_held_cpu_blocks_cache_layer_moved_elsewhere_is_not_replayed_where_it_was(model_dirs, monkeypatch):
    """A CPU block held in spare room has its cache layer moved to the GPU for the generate, wherever the
    allocator puts it that time. Here a generate holds it, the next holds nothing (the layer goes back to host
    memory), tensors of the layer's size take the room it left, and a third holds it again with another
    prompt of the same length: its decode must not replay the first generate's graph, which reads and writes
    the layer where it was (the stale keys of the first prompt, in memory the spacers own now). Tokens equal
    the reference, every decode captured."""
    folder = model_dirs("llama")
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    prompts = [torch.tensor(PROMPT, device="cuda"), torch.tensor(PROMPT, device="cuda").flip(1) + 1]
    llm = nb_offload.load(folder, pins=dict.fromkeys(names[1:3], "cpu-compute"), progress=False)
    spacers = []
    try:
        eng = llm._engine
        first = min(eng.cpu_blocks)
        layer = hybrid.layer_index(llm.model.get_submodule(eng.units[first].name))
        on_cpu = sorted(eng.units[i].name for i in eng.cpu_blocks)
        release, held_at, layer_at = eng.release_held, [], []

        def released():         # where the held block's weights and its cache layer were, this generate
            if first in eng.held:       # (not at the unload)
                held_at.append(eng.held[first][1].data_ptr())
                layer_at.append(eng.graphs.cache.layers[layer].keys.data_ptr())
            release()
        monkeypatch.setattr(eng, "release_held", released)
        for picks, ids in (([first], prompts[0]), ([], prompts[0]), ([first], prompts[1])):
            if ids is prompts[1]:       # the room the layer left on the GPU, taken
                kv = eng.graphs.cache.layers[layer]
                spacers += [torch.empty_like(t, device="cuda") for t in vars(kv).values()
                            if isinstance(t, torch.Tensor) for _ in range(2)]
            monkeypatch.setattr(llm, "_spare_picks", lambda *a, picks=picks, **k: list(picks))
            replays = llm.stats.graph_replays
            got = llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu()
            assert not llm.stats.graph_eager and llm.stats.graph_replays >= replays + N - 3, llm.stats.graph_eager
            want = reference(folder, ids, [n for n in on_cpu if not (picks and n == eng.units[first].name)],
                             eng.cpu_max_tokens, static=True)
            assert torch.equal(got, want), (picks, got, want)
        # the case the test is for: the layer elsewhere the second time (the weights' copy where it was, or not:
        # where not, the held buffer's address alone would have kept the first graph from replaying)
        assert layer_at[0] != layer_at[1], layer_at
        print(f"held block's weights at the same address both times: {held_at[0] == held_at[1]}")
    finally:
        del spacers
        llm.unload()


def test_a_load_whose_cpu_reached_another_rate_is_planned_again_and_stays_exact(model_dirs, monkeypatch):
    """A plan whose split was chosen at a CPU rate its blocks don't reach (here 1000 GB/s) is made again
    at the rate reached after the first generate, once; the next generate's tokens equal the reference for
    the blocks the new plan computes on the CPU, its decode captured."""
    folder = model_dirs("llama", num_hidden_layers=8)
    ids = torch.tensor(PROMPT, device="cuda")
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    # as if misread at load: far above what a tiny model's blocks reach (the rate reached, once set, is used)
    monkeypatch.setattr(loader.Inspection, "cpu_rates", lambda self: self._cpu_rates or (1000.0, 60.0))
    llm = nb_offload.load(folder, pins={n: "cpu" for n in names}, compute="hybrid", hold_spare=False, progress=False)
    try:
        at_load = llm.plan.rates[0]
        first = [e.name for e in llm.plan if e.compute == "cpu"]
        llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)
        reached = llm.cpu_rate_reached
        assert first and reached and llm.replanned_at == (at_load, reached) and reached < at_load / 2
        assert llm.plan.rates[0] == reached and llm.plan.rates_reached
        on_cpu = [e.name for e in llm.plan if e.compute == "cpu"]
        assert len(on_cpu) < len(first)             # a slower CPU: fewer blocks
        assert not on_cpu or "(the rate its blocks reached decoding)" in str(llm.plan)
        print(f"planned again at {reached:.2f} GB/s (at load {at_load:.2f}): CPU blocks {first} -> {on_cpu}")
        got = llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu()
        assert torch.equal(got, reference(folder, ids, on_cpu, llm._engine.cpu_max_tokens, static=True))
        assert not llm.stats.graph_eager, llm.stats.graph_eager
        assert llm.replanned_at == (at_load, reached)          # once
    finally:
        llm.unload()
