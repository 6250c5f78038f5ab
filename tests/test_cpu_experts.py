"""Routed experts computed on the CPU from host memory (cpu_experts.py), while the others are brought to the
compute device. Here the compute device is the CPU too, so every side rounds alike: the engine's split
calls must give plain transformers' eager tokens to the bit. On CUDA the same calls split between the
GPU and the CPU (tests/gpu/test_experts_gpu.py)."""

import copy
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import PROMPT, all_on_disk, batch_of_four, run_offloaded

import nb_offload
from nb_offload import cpu_amx, cpu_experts, cpu_kernel
from nb_offload.tiers import param_views

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


def eager_model(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, experts_implementation="eager").eval()


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("tokens", [1, 4, 9])
def test_an_experts_call_split_any_way_adds_up_to_the_eager_experts(arch, tokens, model_dirs):
    experts = eager_model(model_dirs(arch)).model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(tokens)
    with torch.no_grad():
        for p in experts.parameters():      # the tiny model's are near zero: make the sums round
            p.normal_(0, 0.5, generator=g)
    k = 2
    hidden = torch.randn(tokens, experts.gate_up_proj.shape[-1], generator=g).to(experts.gate_up_proj.dtype)
    index = torch.stack([torch.randperm(experts.num_experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g).to(hidden.dtype)
    with torch.no_grad():
        want = experts(hidden, index, weights)
        host = {n: p.detach().clone() for n, p in experts.named_parameters()}
        twin = cpu_experts.twin(experts, host)
        assert twin.gate_up_proj.data_ptr() == host["gate_up_proj"].data_ptr()
        assert experts.gate_up_proj.data_ptr() != host["gate_up_proj"].data_ptr()     # the original untouched
        chosen = sorted(set(index.flatten().tolist()))
        work = cpu_experts.calls(index, chosen)
        for on_host in (set(), set(chosen), set(chosen[::2])):
            rows = {e: cpu_experts.expert_rows((twin if e in on_host else experts).forward, hidden, weights, e,
                                               *work[e]) for e in chosen}
            got = cpu_experts.combine(hidden, rows, {e: token for e, (_, token) in work.items()})
            assert torch.equal(got, want), (arch, tokens, sorted(on_host))


def test_a_one_token_call_finds_the_same_positions_as_a_search():
    """``calls`` takes a one-token index's positions from its row; a batch's by a search of the index. Both give
    each expert its (top-k positions, tokens) in the eager experts' order, as int64 index tensors."""
    for row in ([3, 1], [1, 3], [0, 5, 2, 7], [6]):
        index = torch.tensor([row])
        fast = cpu_experts.calls(index, sorted(row) + [4])
        searched = cpu_experts.calls(torch.cat([index, torch.full_like(index, -1)]), sorted(row) + [4])
        assert list(fast) == list(searched)
        for e in fast:
            for a, b in zip(fast[e], searched[e]):
                assert a.dtype == b.dtype == torch.long and torch.equal(a, b), (row, e)
    assert [len(t) for t in cpu_experts.calls(torch.tensor([[3, 1]]), [4])[4]] == [0, 0]


def test_which_experts_the_cpu_takes():
    assert cpu_experts.split([1, 4, 6], 0.5) == ([1], [4, 6])       # the highest-numbered, 1.5 rounded up
    assert cpu_experts.split([3], 0.5) == ([], [3])
    assert cpu_experts.split([1, 4, 6], 0.4) == ([1, 4], [6])
    assert cpu_experts.split([1, 4, 6, 7], 0.5) == ([1, 4], [6, 7])
    assert cpu_experts.split([1, 4], 1.0) == ([], [1, 4])
    assert cpu_experts.split([1, 4], 0.0) == ([1, 4], [])
    assert cpu_experts.split([], 1.0) == ([], [])


@pytest.mark.parametrize("arch", MOE)
def test_the_cpu_computes_an_experts_products_alone_where_the_forward_is_the_eager_form(arch, model_dirs):
    experts = eager_model(model_dirs(arch)).model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.5, generator=g)
    twin = cpu_experts.twin(experts, {n: p.detach().clone() for n, p in experts.named_parameters()})
    rows = cpu_experts.rows_for(twin)
    assert rows.func is cpu_experts.direct_rows and rows.args[0] is twin
    hidden = torch.randn(5, experts.gate_up_proj.shape[-1], generator=g).to(experts.gate_up_proj.dtype)
    index = torch.stack([torch.randperm(experts.num_experts, generator=g)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, generator=g).to(hidden.dtype)
    with torch.no_grad():
        for e, (pos, token) in cpu_experts.calls(index, sorted(set(index.flatten().tolist()))).items():
            want = cpu_experts.expert_rows(experts.forward, hidden, weights, e, pos, token)
            assert torch.equal(rows(hidden, weights, e, pos, token), want), e

    # anything but the eager form calls the module's forward: a forward set on the instance, a subclass's own
    class Scaled(type(experts)):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)
    other = copy.copy(twin)
    other.__class__ = Scaled
    assert not cpu_experts.eager_form(other)
    assert cpu_experts.rows_for(other).func is cpu_experts.expert_rows
    wrapped = copy.copy(twin)
    wrapped.forward = lambda *a: None
    assert not cpu_experts.eager_form(wrapped)


def test_the_cpu_side_computes_on_the_callers_thread_with_its_own_threads_and_measures_its_rate(model_dirs):
    experts = eager_model(model_dirs("mixtral")).model.layers[0].mlp.experts
    mine = torch.get_num_threads()
    seen = []
    host = cpu_experts.HostCompute(torch, threads=1)
    twin = cpu_experts.twin(experts, {n: p.detach() for n, p in experts.named_parameters()})
    direct = cpu_experts.rows_for(twin)

    def rows(*args):
        seen.append((torch.get_num_threads(), threading.get_ident()))
        return direct(*args)
    row = experts.gate_up_proj[0].nbytes + experts.down_proj[0].nbytes
    assert host.rate(rows, experts.num_experts, experts.gate_up_proj.shape[-1], experts.gate_up_proj.dtype, row) > 0
    assert len(seen) == 6 * experts.num_experts     # every expert each pass, a warm-up pass and five timed
    hidden = torch.randn(3, experts.gate_up_proj.shape[-1]).to(experts.gate_up_proj.dtype)
    weights = torch.rand(3, 1).to(hidden.dtype)
    work = {1: (torch.zeros(3, dtype=torch.long), torch.arange(3))}
    got, t0, t1 = host.run(rows, hidden, weights, work)
    with torch.no_grad():           # the rows are the module's own for that expert
        assert torch.equal(got[1], cpu_experts.expert_rows(experts.forward, hidden, weights, 1, *work[1]))
    assert t1 >= t0
    assert set(seen) == {(1, threading.get_ident())}    # on this thread, with the CPU side's thread count
    assert torch.get_num_threads() == mine              # and the caller's back after
    assert 1 <= cpu_experts.host_threads()


def test_the_worker_writes_a_calls_rows_in_order_and_always_raises_the_counter(model_dirs):
    """On CUDA the worker computes a split call's experts while the caller goes on, into page-locked rows
    the GPU takes once the counter is raised (cpu_experts.HostSignal); here a stand-in counter."""
    experts = eager_model(model_dirs("mixtral")).model.layers[0].mlp.experts
    twin = cpu_experts.twin(experts, {n: p.detach() for n, p in experts.named_parameters()})
    rows = cpu_experts.rows_for(twin)

    class Counter:
        raised = []

        def raise_to(self, value):
            self.raised.append((value, threading.get_ident()))
    signal = Counter()
    worker = cpu_experts.HostWorker(torch, 1, signal)
    try:
        hidden = torch.randn(3, experts.gate_up_proj.shape[-1]).to(experts.gate_up_proj.dtype)
        weights = torch.rand(3, 2).to(hidden.dtype)
        work = {3: (torch.tensor([0, 1]), torch.tensor([0, 2])), 1: (torch.tensor([1]), torch.tensor([1]))}
        out = torch.full((3, hidden.shape[-1]), float("nan"), dtype=hidden.dtype)
        t0, t1 = worker.submit(rows, hidden, weights, work, out, 7).result()
        assert t1 >= t0
        with torch.no_grad():
            want = torch.cat([cpu_experts.expert_rows(experts.forward, hidden, weights, e, *work[e]) for e in (3, 1)])
        assert torch.equal(out, want)           # in the order of the work given, each expert's rows in turn
        assert signal.raised[-1][0] == 7 and signal.raised[-1][1] != threading.get_ident()
        with torch.inference_mode():        # rows made under inference mode (a load under it): written all the same
            frozen = torch.zeros_like(out)
        worker.submit(rows, hidden, weights, work, frozen, 9).result()
        assert torch.equal(frozen, want) and signal.raised[-1][0] == 9

        def failing(*args):
            raise ValueError("no")
        with pytest.raises(ValueError):
            worker.submit(failing, hidden, weights, work, out, 8).result()
        assert signal.raised[-1][0] == 8        # raised anyway: the GPU never waits for good

        # any work (a CPU block's): in the order given; settle waits for the last, its outcome left to its future
        gate, order = threading.Event(), []
        first = worker.call(lambda: (gate.wait(5), order.append(1)), 10)
        second = worker.call(lambda: order.append(2) or 1 / 0, 11)
        assert not second.done()
        gate.set()
        worker.settle()
        assert second.done() and order == [1, 2] and first.result()[0] is True
        assert [v for v, _ in signal.raised[-2:]] == [10, 11]
        with pytest.raises(ZeroDivisionError):
            second.result()
    finally:
        worker.close()


def test_a_worker_sets_its_threads_for_each_call_and_leaves_the_process_count_as_it_found_it():
    """torch keeps one thread count for the process, which a thread takes at its first parallel op: a worker
    that kept its own count set would hand it to every thread started later. Its calls run with its count;
    between them, and for threads started after, the count is what it was."""
    def fresh_count():
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return seen[0]
    before = fresh_count()
    if before == 1:
        pytest.skip("one core: a count of 1 can't show a leak")
    worker = cpu_experts.HostWorker(torch, 1, SimpleNamespace(raise_to=lambda value: None))
    try:
        assert worker.call(torch.get_num_threads, 3).result(timeout=5) == 1
        assert fresh_count() == before
        with pytest.raises(ZeroDivisionError):          # restored where the call raised too
            worker.call(lambda: 1 / 0).result(timeout=5)
        assert fresh_count() == before and worker.call(torch.get_num_threads).result(timeout=5) == 1
        # two workers at once (the experts' and the blocks'): one's call may start while the other's runs with
        # its own count set, and still each goes back to the caller's
        other = cpu_experts.HostWorker(torch, 1, SimpleNamespace(raise_to=lambda value: None))
        try:
            inside = threading.Event()
            first = worker.call(lambda: (inside.set(), time.sleep(0.2)))
            assert inside.wait(5)
            other.call(lambda: None).result(timeout=5)
            first.result(timeout=5)
            assert other.call(lambda: None).result(timeout=5) is None and fresh_count() == before
        finally:
            other.close()
        # a count the caller set after the workers started is the one they go back to
        torch.set_num_threads(before - 1)
        try:
            worker.call(lambda: None).result(timeout=5)
            assert fresh_count() == before - 1
        finally:
            torch.set_num_threads(before)
    finally:
        worker.close()
    assert fresh_count() == before


def test_a_worker_that_cannot_start_still_releases_the_gpu_for_every_call_and_fails_them():
    """The GPU waits on the counter (or a captured step's flag) for each call: a worker whose start fails
    (here: setting a CUDA device it can't) never runs them, and must still raise the counter and call
    ``ended``, or the GPU waits for good. A device without an index is the caller's current one."""
    from concurrent.futures import BrokenExecutor

    raised, ended, devices = [], [], []

    def refuse(index):
        devices.append(index)
        raise RuntimeError("no such device")
    fake = SimpleNamespace(set_num_threads=lambda n: None, get_num_threads=lambda: 1,
                           cuda=SimpleNamespace(current_device=lambda: 3, set_device=refuse))
    worker = cpu_experts.HostWorker(fake, 1, SimpleNamespace(raise_to=raised.append), device=torch.device("cuda"))
    try:
        first = worker.call(lambda: pytest.fail("ran on a worker that did not start"), 5, ended=lambda: ended.append(5))
        with pytest.raises(BrokenExecutor):
            first.result(timeout=5)
        assert devices == [3] and raised == [5] and ended == [5]
        with pytest.raises(BrokenExecutor):         # refused at once now, released all the same
            worker.call(lambda: None, 6, ended=lambda: ended.append(6))
        assert raised == [5, 6] and ended == [5, 6]
    finally:
        worker.close()


def test_a_worker_gets_the_gil_quickly_inside_quick_handover_and_the_interval_comes_back():
    import sys
    saved = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        with pytest.raises(RuntimeError):
            with cpu_experts.quick_handover(1e-4):
                assert sys.getswitchinterval() == pytest.approx(1e-4)
                raise RuntimeError("a failed step")
        assert sys.getswitchinterval() == pytest.approx(0.005)
        sys.setswitchinterval(1e-5)         # already shorter: left alone
        with cpu_experts.quick_handover(1e-4):
            assert sys.getswitchinterval() == pytest.approx(1e-5)
        assert sys.getswitchinterval() == pytest.approx(1e-5)
    finally:
        sys.setswitchinterval(saved)


def test_a_step_with_a_worker_runs_at_the_short_switch_interval_and_gives_the_old_one_back(model_dirs, tmp_path):
    """While a worker may compute split calls, each step's forward runs at the engine's switch interval (read
    at load); outside steps, and in an engine without a worker or without a share, the interval is the
    caller's own."""
    import sys
    saved = sys.getswitchinterval()
    seen = []
    try:
        sys.setswitchinterval(0.005)
        with all_on_disk(model_dirs("mixtral"), tmp_path, hold_spare=False) as llm:
            eng = llm._engine
            module = llm.model.get_submodule(next(iter(eng.routed.values())).module)
            module.register_forward_pre_hook(lambda *_: seen.append(sys.getswitchinterval()))
            run_offloaded(llm)
            assert seen and all(v == pytest.approx(0.005) for v in seen)     # no worker: the caller's
            eng.worker, eng.expert_share = cpu_experts.HostWorker(torch, 1, None), 0.5
            try:
                seen.clear()
                run_offloaded(llm)
                assert seen and all(v == pytest.approx(eng.switch_interval) for v in seen)
                assert sys.getswitchinterval() == pytest.approx(0.005)
                eng.expert_share, seen[:] = 0.0, []        # a worker with nothing to compute
                run_offloaded(llm)
                assert seen and all(v == pytest.approx(0.005) for v in seen)
            finally:
                eng.worker.close()
                eng.worker = None
    finally:
        sys.setswitchinterval(saved)


def test_owed_calls_are_computed_by_the_caller_in_order_or_by_the_standby_when_it_doesnt_come(model_dirs):
    """On CUDA a split call's CPU work is owed to the GPU (cpu_experts.HostOwed): the caller computes it when
    it would otherwise wait for the GPU (``settle``), oldest first; a call the caller doesn't come for within
    the patience is computed by a standby thread, so a wait for the GPU elsewhere ends. The counter is raised
    for each call, in order, also when it fails; here a stand-in counter."""
    experts = eager_model(model_dirs("mixtral")).model.layers[0].mlp.experts
    twin = cpu_experts.twin(experts, {n: p.detach() for n, p in experts.named_parameters()})
    rows = cpu_experts.rows_for(twin)

    class Counter:
        def __init__(self):
            self.raised = []

        def raise_to(self, value):
            self.raised.append((value, threading.get_ident()))
    hidden = torch.randn(3, experts.gate_up_proj.shape[-1]).to(experts.gate_up_proj.dtype)
    weights = torch.rand(3, 2).to(hidden.dtype)
    work = {3: (torch.tensor([0, 1]), torch.tensor([0, 2])), 1: (torch.tensor([1]), torch.tensor([1]))}
    with torch.no_grad():
        want = torch.cat([cpu_experts.expert_rows(experts.forward, hidden, weights, e, *work[e]) for e in (3, 1)])

    def nans():
        return torch.full((3, hidden.shape[-1]), float("nan"), dtype=hidden.dtype)
    signal = Counter()
    owed = cpu_experts.HostOwed(torch, 1, signal, patience=60.0)    # the standby never comes in this part
    try:
        first, second = nans(), nans()
        a = owed.submit(rows, hidden, weights, work, first, 7)
        b = owed.submit(rows, hidden, weights, work, second, 8)
        time.sleep(0.05)
        assert not a.done.is_set() and torch.isnan(first).all() and signal.raised == []     # owed, not computed
        owed.settle()
        me = threading.get_ident()
        assert signal.raised == [(7, me), (8, me)] and a.by == b.by == "caller"
        assert torch.equal(first, want) and torch.equal(second, want)
        assert a.result()[1] >= a.result()[0]

        def failing(*args):
            raise ValueError("no")
        c = owed.submit(failing, hidden, weights, work, nans(), 9)
        owed.settle()           # the caller goes on; the error waits for whoever collects the call
        with pytest.raises(ValueError):
            c.result()
        assert signal.raised[-1] == (9, me)
        with torch.inference_mode():        # rows made under inference mode (a load under it): written all the same
            frozen = torch.zeros_like(first)
        d = owed.submit(rows, hidden, weights, work, frozen, 10)
    finally:
        owed.close()            # computes what is still owed
    assert d.by == "caller" and torch.equal(frozen, want) and signal.raised[-1] == (10, me)

    signal = Counter()
    owed = cpu_experts.HostOwed(torch, 1, signal, patience=0.02)
    try:
        late = nans()
        e = owed.submit(rows, hidden, weights, work, late, 11)
        e.result()              # the caller never settles: the standby computes it
        assert e.by == "standby" and torch.equal(late, want)
        assert signal.raised == [(11, signal.raised[0][1])] and signal.raised[0][1] != threading.get_ident()
        f = owed.submit(rows, hidden, weights, work, nans(), 12)
        owed.settle()
        assert f.by == "caller" and [v for v, _ in signal.raised] == [11, 12]
        assert owed.by == {"caller": 1, "standby": 1}
    finally:
        owed.close()


def host_flats(llm):
    """Each routed block's bytes, read into host memory (what page-locked memory holds on CUDA)."""
    eng = llm._engine
    return {i: eng.sources[i].read(0, eng.units[i].nbytes).clone() for i in eng.routed}


@pytest.mark.parametrize("arch", MOE)
def test_the_engine_computes_a_share_of_the_missing_experts_on_the_cpu_and_stays_exact(arch, model_dirs, tmp_path):
    folder = model_dirs(arch)
    with torch.inference_mode():
        want, _ = run_offloaded(eager_model(folder))
        ids = batch_of_four()
        want_four = eager_model(folder).generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    row = None
    for share, cache in ((1.0, 0), (0.5, 0), (1.0, "small"), (1.0, "auto")):
        size = 2 * row if cache == "small" else cache
        with all_on_disk(folder, tmp_path / f"{share}-{cache}", hold_spare=False, expert_compute="cpu",
                         expert_cache=size) as llm:
            assert llm.model.config._experts_implementation == "eager"      # expert_compute selects it
            eng = llm._engine
            row = next(u.expert_row_nbytes for u in llm._insp.units if u.expert_row_nbytes)
            assert eng.host is None         # the CPU device computes every expert anyway
            eng.compute_experts_on_cpu(host_flats(llm), share)
            modules = [m for m, _ in eng._forwards.values()]
            before = llm.stats.as_dict()
            assert torch.equal(run_offloaded(llm)[0], want), (share, cache)
            assert torch.equal(llm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False), want_four)
            s = llm.stats
            # the cache takes the missed experts it keeps, the CPU a share of the rest: with room for every
            # expert, the cache takes each the first time, and the CPU none
            assert (s.expert_hits > 0) == bool(cache)
            if cache == "auto":
                assert s.experts_on_cpu == 0 and not any(e.kind == "cpu" for e in llm.trace)
                continue
            assert s.experts_on_cpu > 0 and s.bytes_on_cpu > 0 and s.cpu_expert_seconds > 0
            if share == 1.0 and not cache:
                assert s.experts_read == before["experts_read"]      # nothing read for the experts
            else:
                assert s.experts_read > before["experts_read"]
            assert any(e.kind == "cpu" and "on the CPU)" in e.unit for e in llm.trace)
            state = llm.expert_state()      # the last step's
            assert any(v["cpu"] for v in state.values())
            assert all(set(v["cpu"]) <= set(v["routed"]) for v in state.values())
            line = s.run_summary(before, 10, 1.0, held_on="cpu")
            assert "routed ones on the CPU from host memory" in line and "GB/s" in line
            assert "computed on the CPU" in str(s)
        for m in modules:                   # unload gives the experts modules their own forward back
            assert "forward" not in vars(m)


def test_an_interrupted_split_call_leaves_nothing_for_the_next(model_dirs, tmp_path):
    folder = model_dirs("mixtral")
    with torch.inference_mode():
        want, _ = run_offloaded(eager_model(folder))
    with all_on_disk(folder, tmp_path, hold_spare=False, expert_compute="cpu", expert_cache=0) as llm:
        eng = llm._engine
        eng.compute_experts_on_cpu(host_flats(llm), 0.5)
        idx = next(iter(eng.routed))
        module, original = eng._forwards[idx]
        calls = []

        def interrupted(*args, **kwargs):       # a decode step's split call never runs: an interrupt between
            if idx not in eng._host_calls:
                return original(*args, **kwargs)
            calls.append(dict(eng._host_calls))
            raise KeyboardInterrupt
        module.forward = interrupted
        try:            # a generate may end at an interrupt with the tokens it has
            llm.generate(torch.tensor(PROMPT), max_new_tokens=3, min_new_tokens=3, do_sample=False)
        except KeyboardInterrupt:
            pass
        assert calls and idx in calls[0]        # the pre-hook had split the call
        module.forward = eng._experts_forward(idx, original)
        assert torch.equal(run_offloaded(llm)[0], want)


def test_expert_compute_is_checked_and_picks_the_eager_experts(model_dirs):
    with pytest.raises(nb_offload.OptionError, match="expert_compute='cpu' needs the eager experts"):
        nb_offload.Options(expert_compute="cpu", experts_implementation="grouped_mm")
    o = nb_offload.Options(expert_compute=0.25)
    assert (o.expert_compute, o.host_expert_share, o.experts) == (0.25, 0.25, "eager")
    assert nb_offload.Options().experts is None and nb_offload.Options().host_expert_share is None
    assert nb_offload.Options(expert_compute="cpu").host_expert_share == 1.0
    # a dense model takes it too (it has no experts to compute anywhere)
    with nb_offload.load(model_dirs("llama"), device="cpu", expert_compute="auto", progress=False) as llm:
        assert llm._engine.host is None


def test_twins_see_the_host_bytes_the_engine_gave_them(model_dirs, tmp_path):
    with all_on_disk(model_dirs("qwen3_moe"), tmp_path, expert_compute="cpu") as llm:
        eng = llm._engine
        flats = host_flats(llm)
        eng.compute_experts_on_cpu(flats, 0.5)
        eng.compute_experts_on_cpu(flats, 1.0)         # again: the first set-up is undone, not wrapped
        for module, own in eng._forwards.values():
            assert own.__func__ is type(module).forward
        assert eng.expert_share == 1.0
        for idx, rows in eng._cpu_rows.items():
            twin = rows.args[0]
            twin = getattr(twin, "__self__", twin)      # the module, or its forward
            views = {v.data_ptr() for v in param_views(eng.units[idx], flats[idx]) if hasattr(v, "data_ptr")}
            assert {p.data_ptr() for p in twin.parameters()} <= views


def test_the_plan_counts_the_experts_the_cpu_computes(model_dirs, monkeypatch):
    from nb_offload import experts
    monkeypatch.setattr(experts, "CUDA_MIN_SAVED", 0)       # tiny experts: routed on CUDA anyway
    folder = model_dirs("mixtral")
    kw = dict(gpu="1GiB", cpu="1GiB", pins={"model.layers.*": "cpu"})
    base = nb_offload.plan(folder, **kw)
    assert base.device == "cuda" and base.expert_share is None and base.cpu_bytes_per_token() == 0
    routed = [e for e in base if e.routed_bytes]
    assert routed and all(e.expert_row_bytes for e in routed)
    half = nb_offload.plan(folder, expert_compute=0.5, **kw)
    on_cpu = sum(int(0.5 * e.top_k * e.expert_row_bytes) for e in routed)
    assert half.expert_share == 0.5 and half.cpu_bytes_per_token() > 0
    assert base.streamed_bytes_per_token()["cpu"] - half.streamed_bytes_per_token()["cpu"] == on_cpu
    assert "50% computed on the CPU from host memory" in str(half)
    # both at once: the longer of the link's time and the CPU's counts
    link = half.streamed_bytes_per_token()["cpu"] / 50e9
    cpu = half.cpu_bytes_per_token() / 50e9
    assert half.predicted_seconds_per_step(50, cpu_gbps=50) == pytest.approx(max(link, cpu))
    assert half.predicted_seconds_per_step(50) == pytest.approx(link)         # no CPU rate: its time not counted
    auto = nb_offload.plan(folder, expert_compute="auto", **kw)
    assert auto.share_on_cpu(50, 25) == pytest.approx(1 / 3) and auto.share_on_cpu(50) == 0.0
    assert auto.predicted_seconds_per_step(50, cpu_gbps=25) < base.predicted_seconds_per_step(50)
    assert "rates measured at load" in str(auto)
    # all of them: only the blocks' other weights stream
    every = nb_offload.plan(folder, expert_compute="cpu", **kw)
    assert every.streamed_bytes_per_token()["cpu"] == sum(
        e.routed_bytes - e.top_k * e.expert_row_bytes if e.routed_bytes else e.bytes for e in every if e.tier == "cpu")
    # the CPU device computes everything on the CPU: nothing to split
    assert nb_offload.plan(folder, device="cpu", expert_compute="cpu").expert_share is None
    # cpu_kernel="fast": the CPU's experts multiply one row by nb_offload's kernel where it runs, and the plan says
    assert "can't run here (it takes bf16 weights" in str(nb_offload.plan(folder, expert_compute=0.5,
                                                                          cpu_kernel="fast", **kw))
    bf16 = model_dirs("mixtral", dtype="bfloat16")
    fast = nb_offload.plan(bf16, expert_compute=0.5, cpu_kernel="fast", **kw)
    if cpu_kernel.why_unavailable() is None:
        assert fast.cpu_products == "fast" and "their one-row products by nb_offload's own kernel" in str(fast)
        # a block the CPU computes too: one line says both take it
        both = nb_offload.plan(bf16, expert_compute=0.5, cpu_kernel="fast",
                               **{**kw, "pins": {"model.layers.*": "cpu", "model.layers.1": "cpu-compute"}})
        assert "their products, and those of the routed experts the CPU computes, by nb_offload's own kernel" \
            in str(both)
    else:
        assert fast.cpu_products == "F.linear" and "can't run here" in str(fast)
    assert "own kernel" not in str(nb_offload.plan(bf16, cpu_kernel="fast", **kw))     # no expert on the CPU
    # exact (the default): the AMX kernel where it runs, F.linear's bits; "torch": torch's kernels
    exact = nb_offload.plan(bf16, expert_compute=0.5, **kw)
    assert exact.cpu_products == ("amx" if cpu_amx.why_unavailable() is None else "")
    assert ("their one-row products by nb_offload's AMX kernel, with F.linear's bits" in str(exact)) == \
        (cpu_amx.why_unavailable() is None)
    assert "AMX" not in str(nb_offload.plan(bf16, expert_compute=0.5, cpu_kernel="torch", **kw))
    monkeypatch.setattr(cpu_kernel, "_built", (None, "this CPU lacks avx512_bf16 (it needs AVX-512 BF16)"))
    without = nb_offload.plan(bf16, expert_compute=0.5, cpu_kernel="fast", **kw)
    assert without.cpu_products == "F.linear"
    assert "their one-row products exact: cpu_kernel=\"fast\" can't run here (this CPU lacks" in str(without)


def test_the_plan_magic_predicts_with_experts_on_the_cpu(shell, model_dirs, monkeypatch):
    from IPython.utils.capture import capture_output

    from nb_offload import experts, loader
    monkeypatch.setattr(experts, "CUDA_MIN_SAVED", 0)
    own_plan = loader.plan       # the magic has no pins: every block in host memory, as a large model's would be
    monkeypatch.setattr(loader, "plan", lambda *a, **kw: own_plan(*a, pins={"model.layers.*": "cpu"}, **kw))
    folder = model_dirs("mixtral")
    line = f"%offload_plan {folder} --gpu 1GiB --cpu 1GiB --link 50"
    with capture_output() as plain:
        shell.run_line_magic("offload_plan", line.split(" ", 1)[1])
    with capture_output() as split:
        shell.run_line_magic("offload_plan", line.split(" ", 1)[1] + " --expert-compute 0.5 --cpu-rate 40")
    assert "the CPU computes from" in split.stdout and "at 40 GB/s" in split.stdout
    assert "50% computed on the CPU" in split.outputs[0].data["text/plain"]      # the plan, shown
    assert "the CPU computes" not in plain.stdout
    with capture_output() as auto:
        shell.run_line_magic("offload_plan", line.split(" ", 1)[1] + " --expert-compute auto")
    assert "its time not counted (--cpu-rate)" not in auto.stdout      # no CPU rate: "auto" computes none
    with pytest.raises(nb_offload.OptionError, match="expert_compute='everywhere' is not valid"):
        shell.run_line_magic("offload_plan", line.split(" ", 1)[1] + " --expert-compute everywhere")
    # --cpu-kernel: the plan says how the CPU's experts multiply (float32 here: exact, and why)
    with capture_output() as fast:
        shell.run_line_magic("offload_plan", line.split(" ", 1)[1] + " --expert-compute 0.5 --cpu-kernel fast")
    assert "their one-row products exact: cpu_kernel=\"fast\" can't run here (it takes bf16 weights" in \
        fast.outputs[0].data["text/plain"]
    with pytest.raises(nb_offload.OptionError, match="cpu_kernel='quick' is unknown; accepted: 'exact', 'fast'"):
        shell.run_line_magic("offload_plan", line.split(" ", 1)[1] + " --cpu-kernel quick")


@pytest.mark.parametrize("cpu_rate, kept", [(1e9, False), (49e9, False), (50e9, True), (1e12, True)])
def test_auto_keeps_the_experts_on_the_gpu_where_the_cpu_is_slower_than_the_link(model_dirs, tmp_path, monkeypatch,
                                                                                 cpu_rate, kept):
    """"auto" measures the CPU against the link. Where the CPU is the slower, nothing is split: the experts
    modules keep their own forward and transformers' default experts implementation, and the tokens are
    plain transformers'."""
    from nb_offload import engine as engine_module
    folder = model_dirs("mixtral")
    monkeypatch.setattr(cpu_experts.HostCompute, "rate", lambda self, *a, **k: cpu_rate)
    monkeypatch.setattr(engine_module, "link_gbps", lambda device: 50.0)
    with all_on_disk(folder, tmp_path, hold_spare=False, expert_compute="auto", expert_cache=0) as llm:
        eng = llm._engine
        assert llm.model.config._experts_implementation == "eager"
        eng.compute_experts_on_cpu(host_flats(llm), "auto")
        assert (eng.host is not None) == kept and bool(eng._forwards) == kept
        if kept:
            assert eng.expert_share == pytest.approx(cpu_rate / (cpu_rate + 50e9))
            return
        assert eng.expert_share == 0.0
        assert llm.model.config._experts_implementation == llm.model.get_correct_experts_implementation(None)
        from transformers import AutoModelForCausalLM
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.inference_mode():
            want, _ = run_offloaded(plain)
        assert torch.equal(run_offloaded(llm)[0], want)


@pytest.mark.parametrize("cpu_rate", [1e9, 1e12])
def test_a_named_experts_implementation_stays_under_auto(model_dirs, tmp_path, monkeypatch, cpu_rate):
    from nb_offload import engine as engine_module
    monkeypatch.setattr(cpu_experts.HostCompute, "rate", lambda self, *a, **k: cpu_rate)
    monkeypatch.setattr(engine_module, "link_gbps", lambda device: 50.0)
    with all_on_disk(model_dirs("mixtral"), tmp_path, hold_spare=False, expert_compute="auto", expert_cache=0,
                     experts_implementation="eager") as llm:
        llm._engine.compute_experts_on_cpu(host_flats(llm), "auto")
        assert (llm._engine.host is not None) == (cpu_rate > 50e9)     # split only where the CPU is faster
        assert llm.model.config._experts_implementation == "eager"


def _every_routed_expert_on_the_cpu_by(kernel, folder, tmp_path, ids, n, calls):
    """A greedy generate of ``n`` tokens with every routed expert computed on the CPU, whose one-row products
    take nb_offload's ``kernel`` ("fast" or "amx": the engine's attribute standing in for the plan's);
    ``calls`` emptied once the engine has taken the kernel (the AMX check's products are not the generate's).
    Returns (the tokens, the experts computed on the CPU)."""
    with all_on_disk(folder, tmp_path, hold_spare=False, expert_compute="cpu", expert_cache=0) as llm:
        eng = llm._engine
        eng.kernel = kernel
        eng.compute_experts_on_cpu(host_flats(llm), 1.0)
        calls.clear()
        got = llm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return got, llm.stats.experts_on_cpu


@pytest.mark.skipif(cpu_kernel.why_unavailable() is not None,
                    reason=f"nb_offload's CPU kernel can't run here: {cpu_kernel.why_unavailable()}")
@pytest.mark.parametrize("arch", MOE)
def test_with_the_fast_kernel_the_cpu_s_experts_multiply_one_row_by_it(arch, model_dirs, tmp_path, monkeypatch):
    """cpu_kernel="fast" with expert_compute: the routed experts the CPU computes take nb_offload's kernel for
    their one-row products (a token routed alone to an expert), and the tokens are those of transformers' eager
    experts multiplying the same products by the same kernel. (Both sides are the CPU here; the engine's flag
    stands in for the plan's. A prompt of one token: every step is a one-token step, whose routed experts all
    split to the CPU; a longer prompt's first decode step finds some blocks brought whole, experts and all.)"""
    from transformers import AutoModelForCausalLM

    folder = model_dirs(arch, dtype="bfloat16")
    ids = torch.tensor([[5]])
    n = 8
    reference = AutoModelForCausalLM.from_pretrained(folder, experts_implementation="eager",
                                                     dtype=torch.bfloat16).eval()
    experts_weights = {id(p) for m in reference.modules() if hasattr(m, "gate_up_proj")
                       for p in (m.gate_up_proj, m.down_proj)}
    linear = torch.nn.functional.linear

    def experts_by_kernel(x, weight, bias=None):
        if bias is None and id(weight._base) in experts_weights and cpu_kernel.applies(torch, x, weight):
            return cpu_kernel.product(torch, x, weight, None, torch.get_num_threads())
        return linear(x, weight, bias)
    monkeypatch.setattr(torch.nn.functional, "linear", experts_by_kernel)
    want = reference.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    calls, product = [], cpu_kernel.product
    monkeypatch.setattr(cpu_kernel, "product", lambda *a: calls.append(a[2].shape) or product(*a))
    got, on_cpu = _every_routed_expert_on_the_cpu_by("fast", folder, tmp_path, ids, n, calls)
    assert torch.equal(got, want)
    # every step's routed experts on the CPU, each through the kernel twice (gate and up together, then down)
    config = reference.config
    assert on_cpu == n * config.num_experts_per_tok * config.num_hidden_layers and len(calls) == 2 * on_cpu


@pytest.mark.skipif(cpu_amx.why_unavailable() is not None,
                    reason=f"nb_offload's AMX kernel can't run here: {cpu_amx.why_unavailable()}")
@pytest.mark.parametrize("arch", MOE)
def test_exact_the_cpu_s_experts_multiply_one_row_by_the_amx_kernel_with_transformers_tokens(arch, model_dirs,
                                                                                            tmp_path, monkeypatch):
    """The default cpu_kernel="exact" with expert_compute where the CPU has AMX: the routed experts the CPU
    computes take the AMX kernel for their one-row products (shapes with a chunk at the experts' threads), and the
    tokens are plain transformers' eager experts', F.linear's bits. (Wider experts than the other tests': torch
    runs oneDNN, whose sums the kernel follows, only for products of more than 4,096 weights.)"""
    from transformers import AutoModelForCausalLM
    wide = {"mixtral": dict(intermediate_size=128)}.get(arch, dict(moe_intermediate_size=64))
    folder = model_dirs(arch, dtype="bfloat16", hidden_size=128, **wide)
    ids = torch.tensor([[5]])
    n = 8
    reference = AutoModelForCausalLM.from_pretrained(folder, experts_implementation="eager",
                                                     dtype=torch.bfloat16).eval()
    want = reference.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    calls, product = [], cpu_amx.product
    monkeypatch.setattr(cpu_amx, "product", lambda *a: calls.append(a[2].shape) or product(*a))
    got, on_cpu = _every_routed_expert_on_the_cpu_by("amx", folder, tmp_path, ids, n, calls)
    assert torch.equal(got, want)
    assert on_cpu == n * reference.config.num_experts_per_tok * reference.config.num_hidden_layers
    # gate and up together, then down: both shapes found a chunk (the CPU device's head takes the kernel too)
    head = tuple(reference.lm_head.weight.shape)
    assert len([shape for shape in calls if tuple(shape) != head]) == 2 * on_cpu
