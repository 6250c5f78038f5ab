"""CUDA tests of routed experts (experts.py): a MoE block streamed from host memory comes without its
expert rows, and only the routed ones are copied in once the router has chosen. Tiny models save too
little for the engine to choose that on its own (``CUDA_MIN_SAVED``), so these tests lower the bar."""

import pytest
import torch
from helpers import PROMPT, blocks

import nb_offload
from nb_offload import cpu_experts, experts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

N = 10


def plain_generate(folder, ids, n=N):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda").eval()
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False).cpu()


def moved(llm, ids, n):
    """Bytes a generate of ``n`` tokens copies from host memory."""
    before = llm.stats.bytes_from_cpu
    llm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return llm.stats.bytes_from_cpu - before


def batch_of_four():
    ids = torch.tensor(PROMPT * 4, device="cuda")
    ids[1:, 0] = torch.tensor([9, 11, 13])
    return ids


CASES = [(arch, experts.ROUTED_SHARE, False) for arch in ("mixtral", "qwen2_moe", "qwen3_moe")] + [
    ("mixtral", 1.0, False), ("qwen3_moe", 1.0, False),     # every step routed, the prefill too
    ("mixtral", experts.ROUTED_SHARE, True), ("qwen2_moe", 1.0, True)]      # blocks as pieces (pieces.py)


@pytest.mark.parametrize("arch,share,split", CASES)
def test_routed_experts_copied_after_the_router_match_transformers(arch, share, split, model_dirs, monkeypatch):
    monkeypatch.setattr(experts, "CUDA_MIN_SAVED", 0)
    monkeypatch.setattr(experts, "ROUTED_SHARE", share)
    folder = model_dirs(arch)
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    pins = {n: "cpu" for n in names[1:]}
    ids = torch.tensor(PROMPT, device="cuda")
    llm = nb_offload.load(folder, pins=pins, hold_spare=False, split_blocks=split, expert_cache=0, progress=False)
    try:
        eng = llm._engine
        assert llm.plan.split_blocks == split
        assert {eng.units[i].name for i in eng.routed} == set(names[1:])
        assert all(eng.units[i].kind == ("piece" if split else "block") for i in eng.routed)
        # a block streamed whole needs its slot for the rest of it: the host brings the routed experts; a block's
        # experts streamed alone are fetched by the GPU in a batch-1 decode, and that step is captured
        fetched = split
        assert (eng.gpu_fetch is not None) == fetched and eng.graphs.enabled == fetched
        if not fetched:
            assert "routed experts" in eng.graphs.why_not
        predicted = llm.plan.streamed_bytes_per_token()["cpu"]
        assert predicted < sum(e.bytes for e in llm.plan if e.tier == "cpu")
        assert torch.equal(llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(),
                           plain_generate(folder, ids))
        s = llm.stats
        assert s.experts_read > 0 and s.experts_skipped > 0
        assert (s.route_wait_seconds > 0) == (not fetched or share == 1.0)      # a routed prefill waits
        assert (s.graph_replays > 0) == fetched
        assert any(e.kind == "copy" and ("fetched by the GPU)" if fetched else "experts)") in e.unit
                   for e in llm.trace)
        # a decode step brings what the plan predicts (two generates differenced: the prefill cancels)
        if share < 1.0:
            assert (moved(llm, ids, N) - moved(llm, ids, 2)) / (N - 2) == predicted
        four = batch_of_four()
        assert torch.equal(llm.generate(four, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(),
                           plain_generate(folder, four))
        # re-pinned and held blocks come whole and stay exact
        llm.pin(names[1], "gpu")
        assert eng is not llm._engine and {llm._engine.units[i].name for i in llm._engine.routed} == set(names[2:])
        llm.hold_spare = True
        assert torch.equal(llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(),
                           plain_generate(folder, ids))
    finally:
        llm.unload()


def test_small_experts_stream_whole_and_the_step_is_captured(model_dirs):
    folder = model_dirs("mixtral")
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    llm = nb_offload.load(folder, pins={n: "cpu" for n in names}, hold_spare=False, progress=False)
    try:
        assert llm._engine.routed == {} and llm._engine.graphs.enabled
        assert llm.plan.streamed_bytes_per_token()["cpu"] == sum(e.bytes for e in llm.plan if e.tier == "cpu")
    finally:
        llm.unload()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_the_expert_cache_full_small_and_empty(arch, model_dirs, monkeypatch):
    monkeypatch.setattr(experts, "CUDA_MIN_SAVED", 0)
    folder = model_dirs(arch)
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    pins = {n: "cpu" for n in names}
    ids = torch.tensor(PROMPT, device="cuda")
    want = plain_generate(folder, ids)
    four = batch_of_four()
    want_four = plain_generate(folder, four)
    row = None
    for cache in ("auto", "small", 0):
        if cache == "small":
            cache = 2 * row
        llm = nb_offload.load(folder, pins=pins, hold_spare=False, expert_cache=cache, progress=False)
        try:
            eng = llm._engine
            row = next(u.expert_row_nbytes for u in llm._insp.units if u.expert_row_nbytes)
            held = eng.expert_cache.capacity if eng.expert_cache is not None else 0
            every = sum(u.expert_count for u in llm._insp.units if u.expert_row_nbytes)
            assert held == {"auto": every, 0: 0}.get(llm.options.expert_cache, 2), (cache, held)
            for _ in range(2):          # the second generate finds what the first kept
                assert torch.equal(llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(),
                                   want)
            assert torch.equal(llm.generate(four, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(),
                               want_four)
            s = llm.stats
            if held == every:           # full: every routed expert is a hit, so a decode step moves the rest only
                hits, read = s.expert_hits, s.experts_read
                rest = sum(b - a for i in eng.routed for a, b in eng._without_experts[i][0])
                assert moved(llm, ids, N) - moved(llm, ids, 2) == (N - 2) * rest
                assert s.expert_hits - hits == s.experts_read - read > 0
            assert (s.expert_hits > 0) == (held > 0)
            print(f"{arch} expert_cache={cache!r}: {held} of {every} experts kept, hits {s.expert_hits} of "
                  f"{s.experts_read} routed")
        finally:
            llm.unload()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_experts_fetched_by_the_gpu_in_a_captured_step_match_transformers(arch, model_dirs, monkeypatch):
    """Each block's experts streamed alone: a batch-1 decode step fetches the routed ones by a kernel (no host
    wait) and is replayed as a graph; the cache, in its own room and in the slots lent to it, full, small and
    empty; batches of four and prefills go the host's way and give the slots back."""
    monkeypatch.setattr(experts, "CUDA_MIN_SAVED", 0)
    folder = model_dirs(arch)
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    pins = {n: "cpu" for n in names}
    ids = torch.tensor(PROMPT, device="cuda")
    want, four = plain_generate(folder, ids), batch_of_four()
    want_four = plain_generate(folder, four)
    row = None
    for cache in ("auto", 0, "one"):
        if cache == "one":
            cache = row
        llm = nb_offload.load(folder, pins=pins, hold_spare=False, split_blocks=True, expert_cache=cache,
                              progress=False)
        try:
            eng = llm._engine
            row = next(u.expert_row_nbytes for u in llm._insp.units if u.expert_row_nbytes)
            assert eng.gpu_fetch is not None and eng.graphs.enabled, eng.gpu_fetch_why_not
            own = eng.expert_cache.own if eng.expert_cache is not None else 0
            for _ in range(2):          # the second generate finds what the first kept
                assert torch.equal(llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(),
                                   want)
            s = llm.stats
            assert s.graph_replays > 0 and s.experts_read > 0 and (s.expert_hits > 0) == (cache != 0)
            if cache != 0:      # the slots' room went to the cache while the decode ran, given back at its end
                assert eng.gpu_fetch.lent_at_most > 0 and not eng.gpu_fetch.lent
                assert eng.expert_cache.capacity == own
            else:               # every step fetches what the plan predicts
                predicted = llm.plan.streamed_bytes_per_token()["cpu"]
                assert (moved(llm, ids, N) - moved(llm, ids, 2)) / (N - 2) == predicted
            assert torch.equal(llm.generate(four, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(),
                               want_four)
            assert not eng.gpu_fetch.lent or eng.gpu_fetch.active
            assert torch.equal(llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(), want)
            print(f"{arch} expert_cache={cache!r}: own {own}, lent {len(eng.gpu_fetch.lendable)}, hits "
                  f"{s.expert_hits} of {s.experts_read} routed, {s.graph_replays} replays")
            llm.pin(names[1], "gpu")        # a new engine: captured afresh
            assert torch.equal(llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(), want)
            assert llm._engine.gpu_fetch is not None and llm._engine.gpu_fetch.dirty is False
        finally:
            llm.unload()


def test_the_cache_is_filled_at_load_and_prefills_take_its_experts_from_it(model_dirs, monkeypatch):
    """The cache's entries hold experts from the load on (counted as never routed), and a prefill, which
    brings its blocks whole, copies the experts the cache holds from there: it moves the rest only."""
    monkeypatch.setattr(experts, "CUDA_MIN_SAVED", 0)
    folder = model_dirs("mixtral")
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    pins = {n: "cpu" for n in names}
    row = max(e.expert_row_bytes for e in nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins=pins))
    ids = torch.tensor(PROMPT, device="cuda")
    want = plain_generate(folder, ids)
    llm = nb_offload.load(folder, pins=pins, hold_spare=False, split_blocks=True, expert_cache=3 * row,
                          progress=False)
    try:
        eng = llm._engine
        cache = eng.expert_cache
        assert len(cache.where) == cache.own == 3 and not cache.pinned
        assert {i for i, _ in cache.where} == set(sorted(eng.routed)[:3])      # one block after another
        whole = sum(eng.units[i].nbytes for i in eng.routed)

        def prefill():
            before = llm.stats.bytes_from_cpu
            out = llm.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False).cpu()
            assert torch.equal(out, want[:, :ids.shape[1] + 1])
            return llm.stats.bytes_from_cpu - before
        prefill()
        assert prefill() == whole - 3 * row
        assert torch.equal(llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(), want)
        assert torch.equal(llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(), want)
    finally:
        llm.unload()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_experts_fetched_by_the_gpu_in_eager_steps_with_a_warm_cache_match_transformers(arch, model_dirs,
                                                                                         monkeypatch):
    """Without the captured step each fetch runs eager, beside the copies that fill the cache's entries: an
    expert is fetched from its entry only once that copy has landed; pinned experts are fetched from theirs."""
    monkeypatch.setattr(experts, "CUDA_MIN_SAVED", 0)
    folder = model_dirs(arch)
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    pins = {**{n: "cpu" for n in names}, "model.layers.1.mlp.experts.0-1": "gpu"}
    ids = torch.tensor(PROMPT, device="cuda")
    want = plain_generate(folder, ids, n=3 * N)
    llm = nb_offload.load(folder, pins=pins, hold_spare=False, split_blocks=True, cuda_graph=False, progress=False)
    try:
        assert llm._engine.gpu_fetch is not None and not llm._engine.graphs.enabled
        for _ in range(2):
            assert torch.equal(llm.generate(ids, max_new_tokens=3 * N, min_new_tokens=3 * N, do_sample=False).cpu(),
                               want)
        s = llm.stats
        assert s.graph_replays == 0 and s.expert_hits > 0
        assert llm.expert_state()["model.layers.1"]["cached"][:2] == [0, 1]
    finally:
        llm.unload()


def test_pinned_experts_are_kept_on_the_gpu_from_the_start(model_dirs, monkeypatch):
    monkeypatch.setattr(experts, "CUDA_MIN_SAVED", 0)
    folder = model_dirs("qwen3_moe")
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    pins = {**{n: "cpu" for n in names}, "model.layers.1.mlp.experts.0-3": "gpu"}
    ids = torch.tensor(PROMPT, device="cuda")
    llm = nb_offload.load(folder, pins=pins, hold_spare=False, expert_cache=0, progress=False)
    try:
        assert llm.expert_state()["model.layers.1"]["cached"] == [0, 1, 2, 3]
        assert torch.equal(llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(),
                           plain_generate(folder, ids))
        assert llm.stats.expert_hits > 0
    finally:
        llm.unload()


def eager_reference(folder, ids, share, n=N, kernel=False):
    """Greedy tokens of transformers (eager experts) with the experts of every block computed as an engine
    with ``expert_compute`` and no cache computes them at every routed step: ``share`` of each call's
    experts (the highest-numbered, rounded half up) on the CPU from a copy of the module there, the rest on
    the GPU, each as transformers' eager experts compute one and add it, in expert order. ``share`` 1: the
    experts modules moved to the CPU under Accelerate's hook (their inputs there, their output back).
    ``kernel``: the CPU's one-row products by nb_offload's own kernel (cpu_kernel="fast"), as the engine's then
    are."""
    import copy

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda", experts_implementation="eager").eval()
    for layer in model.model.layers:
        module = layer.mlp.experts
        if share == 1.0 and not kernel:
            module.to("cpu")
            add_hook_to_module(module, AlignDevicesHook(execution_device="cpu", io_same_device=True))
            continue
        on_cpu = copy.deepcopy(module).to("cpu")

        def forward(hidden, index, weights, on_cpu=on_cpu, on_gpu=module):
            out = torch.zeros_like(hidden)
            host_index = index.cpu()
            chosen = sorted(set(host_index.flatten().tolist()))
            cpu_side = set(chosen[len(chosen) - int(share * len(chosen) + 0.5):])
            for e in chosen:
                pos, token = torch.where(host_index.T == e)     # by top-k position, then token, as eager
                m = on_cpu if e in cpu_side else on_gpu
                x, w = hidden[token.cuda()], weights[token.cuda(), pos.cuda()].unsqueeze(-1)
                if e in cpu_side:
                    x, w = x.cpu(), w.cpu()
                linear = cpu_experts.kernel_linear if kernel and e in cpu_side else torch.nn.functional.linear
                gate, up = linear(x, m.gate_up_proj[e]).chunk(2, dim=-1)
                y = linear(m.act_fn(gate) * up, m.down_proj[e]) * w
                out.index_add_(0, token.cuda(), y.cuda().to(out.dtype))
            return out
        module.forward = forward
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False).cpu()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_experts_computed_on_the_cpu_match_transformers_computing_them_there(arch, model_dirs, monkeypatch):
    monkeypatch.setattr(experts, "CUDA_MIN_SAVED", 0)
    monkeypatch.setattr(experts, "ROUTED_SHARE", 1.0)      # every step routed, the prefill too
    folder = model_dirs(arch)
    names = [e.name for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))]
    pins = {n: "cpu" for n in names}
    ids = torch.tensor(PROMPT, device="cuda")
    four = batch_of_four()
    for compute in ("cpu", 0.5, "auto"):
        llm = nb_offload.load(folder, pins=pins, hold_spare=False, expert_cache=0, expert_compute=compute,
                              progress=False)
        try:
            eng = llm._engine
            share = eng.expert_share
            if compute == "auto":
                cpu, link = eng.host_rates
                print(f"{arch}: measured at load CPU {cpu / 1e9:.1f} GB/s, link {link / 1e9:.1f} GB/s, share "
                      f"{share:.2f}")
                if eng.host is None:    # at that share the CPU would take none: all on the GPU, default experts
                    assert share == 0.0 and llm.model.config._experts_implementation != "eager"
                    got = llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu()
                    assert torch.equal(got, plain_generate(folder, ids))
                    continue
                assert cpu > 0 and link > 0 and share == pytest.approx(cpu / (cpu + link))
            assert eng.host is not None and set(eng._cpu_rows) == set(eng.routed) == set(eng.sources)
            # transformers' eager experts (this machine's version of them): the CPU runs the products alone,
            # on the worker, the GPU waiting for its rows on the page-locked counter
            assert all(r.func is cpu_experts.direct_rows for r in eng._cpu_rows.values())
            assert eng.worker is not None, eng.signal.why_not
            got = llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu()
            assert torch.equal(got, eager_reference(folder, ids, share)), (compute, share)
            assert torch.equal(llm.generate(four, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu(),
                               eager_reference(folder, four, share)), (compute, share)
            s = llm.stats
            assert s.route_wait_seconds > 0
            # a fixed share takes experts every step; "auto"'s, measured on tiny experts, may round to none
            if compute != "auto":
                assert s.experts_on_cpu > 0 and any(e.kind == "cpu" for e in llm.trace)
            assert (s.experts_on_cpu > 0) == any(e.kind == "cpu" for e in llm.trace)
            if share == 1.0:            # the link carries the blocks' other weights only
                rest = sum(b - a for i in eng.routed for a, b in eng._without_experts[i][0])
                assert moved(llm, ids, N) - moved(llm, ids, 2) == (N - 2) * rest
            if compute == "cpu":        # a CPU call that fails fails its step (the GPU isn't left waiting)
                idx = next(iter(eng._cpu_rows))
                good = eng._cpu_rows[idx]

                def failing(*args):
                    raise ValueError("a CPU call failed")
                eng._cpu_rows[idx] = failing
                with pytest.raises(ValueError, match="a CPU call failed"):
                    llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)
                eng._cpu_rows[idx] = good
                again = llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu()
                assert torch.equal(again, eager_reference(folder, ids, share))
        finally:
            llm.unload()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_experts_computed_on_the_cpu_by_the_fast_kernel_match_transformers_computing_them_so(arch, model_dirs,
                                                                                         monkeypatch):
    """cpu_kernel="fast" with expert_compute: the experts the CPU computes multiply one row (a token routed
    alone) by nb_offload's own kernel, and the tokens are transformers' with those products by the same kernel."""
    from nb_offload import cpu_kernel
    if cpu_kernel.why_unavailable():
        pytest.skip(f"the kernel can't run here: {cpu_kernel.why_unavailable()}")
    monkeypatch.setattr(experts, "CUDA_MIN_SAVED", 0)
    monkeypatch.setattr(experts, "ROUTED_SHARE", 1.0)
    folder = model_dirs(arch, dtype="bfloat16")
    pins = {e.name: "cpu" for e in blocks(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))}
    ids = torch.tensor(PROMPT, device="cuda")
    calls, product = [], cpu_kernel.product
    monkeypatch.setattr(cpu_kernel, "product", lambda *a: calls.append(a[2].shape) or product(*a))
    for compute in ("cpu", 0.5, "auto"):
        calls.clear()
        llm = nb_offload.load(folder, pins=pins, hold_spare=False, expert_cache=0, expert_compute=compute,
                              cpu_kernel="fast", progress=False)
        try:
            eng = llm._engine
            assert llm.plan.cpu_products == "fast" and "their one-row products by nb_offload's own kernel" in \
                str(llm.plan)
            if compute == "auto":       # its rate measured by the kernel; at a share of none, nothing to compare
                assert calls
                if eng.host is None:
                    continue
            assert all(r.keywords.get("fast_kernel") for r in eng._cpu_rows.values())
            calls.clear()
            got = llm.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False).cpu()
            by_engine = sorted(calls)
            calls.clear()
            want = eager_reference(folder, ids, eng.expert_share, kernel=True)
            # the same products through the kernel (its bits differ from F.linear's too rarely for the tokens
            # of tiny models to show it), and the same tokens
            assert by_engine and by_engine == sorted(calls) and llm.stats.experts_on_cpu > 0, compute
            assert torch.equal(got, want), compute
        finally:
            llm.unload()
