"""Routed experts (experts.py): a streamed MoE block is read without its expert rows, and only the rows
of the experts the router picks are read before they compute. CPU device, blocks on disk."""

import pytest
import torch
from helpers import PROMPT, all_on_disk, batch_of_four, reference, run_offloaded

import nb_offload
from nb_offload.experts import RoutedExperts


def test_an_experts_rows_and_the_rest_of_the_block():
    found = RoutedExperts("model.layers.0.mlp.experts", 4, [(100, 10), (200, 5)])
    assert found.ranges([1, 3]) == [(110, 120), (130, 140), (205, 210), (215, 220)]
    from nb_offload.units import ParamSlot
    params = [ParamSlot(["a"], (10,), None, 0, 40), ParamSlot(["b"], (4,), None, 40, 16),
              ParamSlot(["e.gate_up"], (4, 10), None, 100, 40), ParamSlot(["n"], (1,), None, 160, 4),
              ParamSlot(["e.down"], (4, 5), None, 200, 20), ParamSlot(["m"], (2,), None, 256, 8)]
    assert found.rest(params) == [(0, 56), (160, 164), (256, 264)]      # their bytes, not the padding
    index = torch.tensor([[3, 1], [1, 0]])
    assert found.routed((None, index, None), {}) == [0, 1, 3]
    assert found.routed((None,), {"top_k_index": torch.tensor([[2, 2]])}) == [2]


def read_by(llm, n):
    """Bytes a greedy generate of ``n`` tokens from PROMPT reads from disk."""
    before = llm.stats.bytes_from_disk
    llm.generate(torch.tensor(PROMPT), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return llm.stats.bytes_from_disk - before


def plain_generate(folder, ids, n=8):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_streamed_moe_blocks_read_only_the_routed_experts(arch, model_dirs, tmp_path):
    folder = model_dirs(arch)
    want_tokens, want_logits = reference(folder)
    with all_on_disk(folder, tmp_path, hold_spare=False) as llm:
        eng = llm._engine
        blocks = [i for i in eng.stream_order() if eng.units[i].kind == "block"]
        assert set(eng.routed) == set(blocks) and blocks
        before = llm.stats.as_dict()
        tokens, logits = run_offloaded(llm)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
        s = llm.stats
        assert s.experts_read > 0 and s.experts_skipped > 0
        whole = sum(eng.units[i].nbytes for i in blocks)
        assert s.bytes_from_disk - before["bytes_from_disk"] < s.steps * whole     # fewer bytes than whole blocks
        assert any(e.kind == "read" and "experts)" in e.unit for e in llm.trace)
        assert "experts of streamed MoE blocks (the routed ones)" in s.run_summary(before, 10, 1.0)
        assert "experts brought" in str(s)
        ids = batch_of_four()                   # a batch reads the union of its tokens' experts
        assert torch.equal(llm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False),
                           plain_generate(folder, ids))


def test_re_pinned_and_held_moe_blocks_stay_exact(model_dirs, tmp_path):
    folder = model_dirs("qwen2_moe")
    want_tokens, _ = reference(folder)
    with all_on_disk(folder, tmp_path, hold_spare=False) as llm:
        llm.pin("model.layers.0", "cpu")        # resident now: read whole, once
        assert all(llm._engine.units[i].name != "model.layers.0" for i in llm._engine.routed)
        assert torch.equal(run_offloaded(llm)[0], want_tokens)
        llm.hold_spare = True                   # held blocks run whole from buffers of their own
        assert torch.equal(run_offloaded(llm)[0], want_tokens)


def test_dense_blocks_have_no_routed_experts(model_dirs, tmp_path):
    with all_on_disk(model_dirs("llama"), tmp_path) as llm:
        assert llm._engine.routed == {}


def test_routed_experts_read_around_the_page_cache(model_dirs, tmp_path):
    folder = model_dirs("mixtral")
    want_tokens, _ = reference(folder)
    with all_on_disk(folder, tmp_path, drop_page_cache=True) as llm:
        assert llm.uncached_disk_reads
        assert torch.equal(run_offloaded(llm)[0], want_tokens) and llm.stats.experts_skipped > 0


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_every_experts_implementation_reads_only_routed_rows_and_matches_its_reference(implementation, model_dirs,
                                                                                       tmp_path):
    from transformers import AutoModelForCausalLM
    folder = model_dirs("mixtral")
    model = AutoModelForCausalLM.from_pretrained(folder, experts_implementation=implementation).eval()
    with torch.inference_mode():
        want, _ = run_offloaded(model)
    with all_on_disk(folder, tmp_path, experts_implementation=implementation) as llm:
        assert llm.model.config._experts_implementation == implementation
        assert torch.equal(run_offloaded(llm)[0], want) and llm.stats.experts_skipped > 0


def test_an_unknown_experts_implementation_is_refused(model_dirs):
    with pytest.raises(nb_offload.OptionError, match="experts_implementation='fast'.*accepted"):
        nb_offload.load(model_dirs("mixtral"), device="cpu", experts_implementation="fast", progress=False)


@pytest.mark.parametrize("arch,split", [("mixtral", False), ("qwen3_moe", False), ("mixtral", True)])
def test_the_plan_predicts_the_bytes_a_decode_step_reads(arch, split, model_dirs, tmp_path):
    """On the CPU, a streamed MoE block's entry counts what a batch-1 decode step reads of it; the engine's
    own counters, over a long and a short generate, read exactly that. Split into pieces (pieces.py), the
    experts module is a piece of its own, read as routed."""
    folder = model_dirs(arch)
    plan = nb_offload.plan(folder, device="cpu", disk=tmp_path / "p", pins={"model.layers.*": "disk"},
                           split_blocks=split, expert_cache=0)
    assert plan.split_blocks == split
    predicted = plan.streamed_bytes_per_token()["disk"]
    assert 0 < predicted < sum(e.bytes for e in plan if e.tier == "disk")
    assert "only the routed experts" in str(plan)
    with all_on_disk(folder, tmp_path / "l", hold_spare=False, split_blocks=split, expert_cache=0) as llm:
        assert all(llm._engine.units[i].kind == ("piece" if split else "block") for i in llm._engine.routed)
        assert torch.equal(run_offloaded(llm)[0], reference(folder)[0])
        read_by(llm, 2)     # the first pass after a load learns the run order (a surprise re-reads)
        assert (read_by(llm, 10) - read_by(llm, 2)) / 8 == predicted


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_a_moe_block_streams_its_routed_experts_alone_and_keeps_the_rest(arch, model_dirs):
    """Where a block's experts come apart, its one piece is the experts module: the attention, the norms, the
    router and any shared experts are leftovers, kept on the compute device, since every token uses them."""
    from nb_offload.loader import Inspection
    for u in Inspection(model_dirs(arch), device_type="cpu").units:
        if u.kind != "block":
            continue
        assert u.expert_row_nbytes and [pc.module for pc in u.pieces] == [u.experts_module]
        kept = {n for s in u.rest for n in s.names}
        assert any(".self_attn." in n for n in kept) and any(".mlp.gate." in n for n in kept)
        assert not any(n.startswith(u.experts_module + ".") for n in kept)
        assert u.rest_nbytes + u.pieces[0].nbytes >= u.nbytes - 64 * len(u.params)     # every byte somewhere
        # a step reads the routed rows alone: the rest stays
        assert u.routed_split_nbytes == u.top_k * u.expert_row_nbytes


def test_whole_block_slots_where_the_leftovers_of_pieces_would_not_fit(model_dirs, tmp_path):
    """The pieces' leftovers of every streamed MoE block stay on the device, so streaming split can need more
    room than whole-block slots: under such a budget "auto" streams whole blocks; split_blocks=True can't."""
    from nb_offload.errors import BudgetError
    from nb_offload.loader import Inspection
    folder, disk = model_dirs("mixtral"), tmp_path / "offload"
    units = Inspection(folder, device_type="cpu").units
    blocks_ = [u for u in units if u.kind == "block"]
    roomy = nb_offload.plan(folder, device="cpu", cpu="64GiB", disk=disk)
    fixed = sum(v for k, v in roomy.reserved.items() if k != "staging_slots")
    whole_slots = (roomy.prefetch + 1) * max(u.nbytes for u in blocks_)
    split_slots = (roomy.prefetch + 1) * max(u.stream_nbytes for u in blocks_) + sum(u.rest_nbytes for u in blocks_)
    assert split_slots > whole_slots        # the tiny model's experts are a small share of its blocks
    budget = fixed + whole_slots + 1024     # everything streams, through whole-block slots
    plan = nb_offload.plan(folder, device="cpu", cpu=budget, disk=disk)
    assert not plan.split_blocks and all(e.tier == "disk" for e in plan if e.kind == "block")
    with pytest.raises(BudgetError):
        nb_offload.plan(folder, device="cpu", cpu=budget, disk=disk, split_blocks=True)


def test_which_steps_and_which_blocks_bring_experts_as_routed():
    mixtral = RoutedExperts("e", 8, [(0, 100 << 20)], top_k=2)
    assert [mixtral.worth_routing(t) for t in (1, 4, 5, 512)] == [True, True, False, False]
    qwen3 = RoutedExperts("e", 128, [(0, 1 << 20)], top_k=8)
    assert qwen3.worth_routing(21) and not qwen3.worth_routing(22)
    assert mixtral.saved() == 6 * (100 << 20) and qwen3.saved() == 120 << 20
    # on CUDA only where a step saves enough to pay for running eager; from disk on the CPU always
    tiny = RoutedExperts("e", 8, [(0, 4096)], top_k=2)
    assert mixtral.worth_it(cuda=True) and not tiny.worth_it(cuda=True) and tiny.worth_it(cuda=False)


def test_a_prefill_brings_moe_blocks_whole_and_decode_steps_the_routed_experts(model_dirs, tmp_path):
    folder = model_dirs("mixtral")          # 2 of 4 experts: a prompt of 8 tokens routes to almost all
    ids = torch.tensor(PROMPT)
    with all_on_disk(folder, tmp_path, hold_spare=False) as llm:
        blocks = sum(llm._engine.units[i].nbytes for i in llm._engine.routed)
        llm.generate(ids, max_new_tokens=1)                 # the prefill alone
        assert llm.stats.experts_read == llm.stats.experts_skipped == 0
        assert llm.stats.bytes_from_disk >= blocks
        before = llm.stats.bytes_from_disk
        out = llm.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert llm.stats.experts_read > 0 and llm.stats.experts_skipped > 0
        assert llm.stats.bytes_from_disk - before < 4 * blocks
        assert torch.equal(out, plain_generate(folder, ids, n=4))


def test_a_prefill_takes_the_experts_the_cache_holds_from_it(model_dirs, tmp_path, monkeypatch):
    """A routed block that comes whole (a prefill) reads only the bytes the expert cache doesn't hold, and
    copies the rest from the cache as it computes; an expert evicted between the block's start and its
    compute comes from disk after all. Tokens stay exact."""
    folder = model_dirs("mixtral")
    ids = torch.tensor(PROMPT)
    want = plain_generate(folder, ids, n=4)
    with all_on_disk(folder, tmp_path, hold_spare=False) as llm:
        eng = llm._engine
        cache = eng.expert_cache
        whole = sum(eng.units[i].nbytes for i in eng.routed)
        row = next(iter(eng.routed.values())).row_bytes
        assert torch.equal(llm.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False), want)

        def prefill():
            before = llm.stats.bytes_from_disk
            out = llm.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            assert torch.equal(out, want[:, :ids.shape[1] + 1])
            return llm.stats.bytes_from_disk - before
        prefill()               # the first blocks, started by the decode before, come routed: the cache takes some
        held = len(cache.where)
        assert 0 < held < sum(f.count for f in eng.routed.values())
        assert prefill() == whole - held * row
        assert len(cache.where) == held     # a prefill routes nothing: the cache stays as it was
        evicted = []
        around = eng._around_cache

        def evicting(job, source):      # the first block's first cached expert evicted before it computes
            out = around(job, source)
            if job.cached and not evicted:
                evicted.append(job.cached[0][0])
                cache.forget(evicted[0])
            return out
        monkeypatch.setattr(eng, "_around_cache", evicting)
        assert prefill() == whole - (held - 1) * row and evicted
        monkeypatch.undo()
        assert prefill() == whole - (held - 1) * row


def test_with_an_expert_cache_the_plan_gives_it_the_room_of_moe_blocks_it_would_keep(model_dirs, monkeypatch,
                                                                                     tmp_path):
    """On CUDA, where blocks stream split and the cache is "auto", no MoE block is kept for its experts: the
    room goes to the cache, which keeps the most often routed experts of every block. Kept anyway: blocks
    pinned there, and every block where the whole model fits; with no cache (or one of a given size) the
    plan keeps blocks as before."""
    from nb_offload import experts
    from nb_offload.loader import Inspection
    monkeypatch.setattr(experts, "CUDA_MIN_SAVED", 0)      # tiny experts come apart too
    folder = model_dirs("mixtral")
    units = Inspection(folder, device_type="cuda").units
    blocks_ = [u for u in units if u.kind == "block"]
    row = max(u.expert_row_nbytes for u in blocks_)

    def plan(gpu, **kw):
        p = nb_offload.plan(folder, gpu=gpu, cpu="1GiB", split_blocks=True, **kw)
        return p, [e.name for e in p if e.kind == "block" and e.tier == "gpu"]
    fits, kept = plan("1GiB")
    assert len(kept) == len(blocks_) and "expert_cache" not in fits.reserved
    everything = sum(u.nbytes for u in units) + sum(fits.reserved.values())
    # a budget where, without a cache, one block would be kept
    budget = next(b for b in range(everything - 1, 0, -4096) if len(plan(b, expert_cache=0)[1]) == 1)
    without, kept = plan(budget, expert_cache=0)
    assert len(kept) == 1 and "expert_cache" not in without.reserved
    auto, none_kept = plan(budget)
    assert none_kept == [] and auto.reserved["expert_cache"] >= row
    assert auto.reserved["expert_cache"] % row == 0
    sized, kept = plan(budget, expert_cache=row)
    assert sized.reserved["expert_cache"] == row and len(kept) <= 1
    pinned, kept = plan(budget, pins={"model.layers.2": "gpu"})
    assert kept == ["model.layers.2"]
    # where host memory can't take the blocks it would stream, they'd go to disk, where the cache can't serve
    # them: the block stays kept
    library = without.host_reserved.get("library_code", 0)
    for cpu in range(library + row, library + 40 * row, 2 * row):
        try:
            cached = nb_offload.plan(folder, gpu=budget, cpu=cpu, disk=str(tmp_path), split_blocks=True)
            kept_ = nb_offload.plan(folder, gpu=budget, cpu=cpu, disk=str(tmp_path), split_blocks=True,
                                    expert_cache=0)
        except nb_offload.BudgetError:
            continue
        on_disk = [sum(e.bytes for e in p if e.tier == "disk") for p in (cached, kept_)]
        assert on_disk[0] <= on_disk[1], cpu


def test_the_expert_cache_keeps_the_most_often_routed_and_copies_rows_both_ways():
    from nb_offload.experts import ExpertCache
    found = RoutedExperts("e", 4, [(0, 3), (12, 2)], top_k=1)     # 4 experts: rows of 3 and of 2 bytes
    cache = ExpertCache(torch, "cpu", 5, 2)
    slot = torch.arange(20, dtype=torch.uint8)
    for key in [("b", 1), ("b", 3)]:                        # room: both kept
        assert cache.lookup(key) is None
        cache.store(found, key[1], slot, cache.place(key))
    assert cache.lookup(("b", 1)) == 0                     # routed twice now
    assert cache.lookup(("c", 0)) is None and cache.place(("c", 0)) is None     # once, like ("b", 3): not kept
    assert cache.lookup(("c", 0)) is None and cache.place(("c", 0)) == 1        # twice: in place of ("b", 3)
    assert cache.lookup(("b", 3)) is None and set(cache.where) == {("b", 1), ("c", 0)}
    # a step visiting more experts than the cache holds, over and over, keeps hitting the ones kept
    hits = 0
    for _ in range(5):
        for key in [("b", 1), ("b", 2), ("c", 0), ("c", 3)]:
            if cache.lookup(key) is not None:
                hits += 1
            elif cache.place(key) is not None:
                raise AssertionError(f"{key} displaced one routed as often")
    assert hits == 10
    other = torch.zeros(20, dtype=torch.uint8)
    cache.load(found, 1, other, 0)
    assert other[3:6].tolist() == [3, 4, 5] and other[14:16].tolist() == [14, 15]
    assert int(other.count_nonzero()) == 5


def test_the_expert_cache_takes_lent_entries_after_its_own_and_drops_their_experts_when_given_back():
    from nb_offload.experts import ExpertCache
    found = RoutedExperts("e", 4, [(0, 3), (12, 2)], top_k=1)
    cache = ExpertCache(torch, "cpu", 5, 1)
    lent = torch.zeros(10, dtype=torch.uint8)       # two entries' room, lent for a while
    cache.lend([lent[:5], lent[5:]])
    assert cache.capacity == 3
    slot = torch.arange(20, dtype=torch.uint8)
    placed = []
    for expert in range(3):
        assert cache.lookup(("b", expert)) is None
        placed.append(cache.place(("b", expert)))
        cache.store(found, expert, slot, placed[-1])
    assert placed == [0, 1, 2]          # our own first
    assert lent.tolist() == [3, 4, 5, 14, 15, 6, 7, 8, 16, 17]     # experts 1 and 2 in the lent room
    assert cache.entry(2).data_ptr() == lent[5:].data_ptr()
    assert sorted(cache.reclaim()) == [("b", 1), ("b", 2)]
    assert set(cache.where) == {("b", 0)} and cache.capacity == 1 and not cache.free
    assert cache.lookup(("b", 2)) is None and cache.lookup(("b", 0)) == 0
    cache.lend([lent[:5]])              # lent again: the room is free, nothing of before is found there
    assert cache.capacity == 2 and cache.free == [1] and cache.lookup(("b", 1)) is None


def test_the_plan_sizes_the_expert_cache_in_whole_experts(model_dirs, monkeypatch):
    from nb_offload import experts
    monkeypatch.setattr(experts, "CUDA_MIN_SAVED", 0)     # tiny experts come apart too
    folder = model_dirs("mixtral")
    pins = {"model.layers.*": "cpu"}
    auto = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins=pins)
    streamed = [e for e in auto if e.routed_bytes]
    assert len(streamed) == 4
    row = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins=pins, expert_cache=0)
    assert "expert_cache" not in row.reserved
    # every expert of the streamed blocks fits in 1 GiB: "auto" takes them all, and no more
    size = auto.reserved["expert_cache"]
    sized = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins=pins, expert_cache=size // 4 + 1)
    one = size // 16        # 4 blocks of 4 experts
    assert sized.reserved["expert_cache"] == (size // 4 + 1) // one * one
    assert "expert cache" in str(sized)
    none_streamed = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB")
    assert "expert_cache" not in none_streamed.reserved
    with pytest.raises(nb_offload.OptionError, match="expert_cache=None is not valid"):
        nb_offload.plan(folder, gpu="1GiB", expert_cache=None)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_the_expert_cache_full_small_and_empty_stays_exact(arch, model_dirs, tmp_path):
    """On the CPU device the cache holds experts read from disk in RAM (where the disk tier is larger than
    the page cache could keep): full, a decode step reads only the blocks' other weights."""
    folder = model_dirs(arch)
    want_tokens, _ = reference(folder)
    ids = batch_of_four()
    want_four = plain_generate(folder, ids)
    row = None
    for size in ("auto", "small", 0):
        cache = 2 * row if size == "small" else size
        with all_on_disk(folder, tmp_path / str(size), hold_spare=False, expert_cache=cache) as llm:
            eng = llm._engine
            row = next(u.expert_row_nbytes for u in llm._insp.units if u.expert_row_nbytes)
            every = sum(u.expert_count for u in llm._insp.units if u.expert_row_nbytes)
            held = eng.expert_cache.capacity if eng.expert_cache is not None else 0
            assert held == {"auto": every, "small": 2, 0: 0}[size]
            assert ("expert_cache" in llm.plan.reserved) == bool(held)
            for _ in range(2):
                assert torch.equal(run_offloaded(llm)[0], want_tokens)
            assert torch.equal(llm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False), want_four)
            s = llm.stats
            assert (s.expert_hits > 0) == bool(held)
            if size == "auto":      # every expert kept: a decode step reads the rest of each block only
                rest = sum(e[2] for i in eng.routed for e in eng._without_experts[i][0].extents)
                assert read_by(llm, 10) - read_by(llm, 2) == 8 * rest
                since_load = {**s.as_dict(), "expert_hits": 0, "experts_read": 0, "experts_skipped": 0}
                assert "from the expert cache" in s.run_summary(since_load, 1, 1.0, held_on="cpu")
            llm.pin("model.layers.0", "cpu")        # a re-pin: a new engine, a new cache; still exact
            assert torch.equal(run_offloaded(llm)[0], want_tokens)


def test_an_interrupt_while_the_cache_keeps_an_expert_leaves_no_half_written_entry(model_dirs, tmp_path,
                                                                                   monkeypatch):
    from nb_offload.experts import ExpertCache
    folder = model_dirs("mixtral")
    store = ExpertCache.store

    def interrupted(self, found, expert, slot, entry):     # Ctrl-C between an expert's two rows
        (a, b), (c, d) = next(ExpertCache._pairs(found, expert))
        self.rows[entry, c:d].copy_(slot[a:b])
        raise KeyboardInterrupt
    with all_on_disk(folder, tmp_path, hold_spare=False) as llm:
        monkeypatch.setattr(ExpertCache, "store", interrupted)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(torch.tensor(PROMPT), max_new_tokens=10, min_new_tokens=10, do_sample=False)
        monkeypatch.setattr(ExpertCache, "store", store)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            ids = torch.randint(3, 300, (1, 6), generator=g)
            assert torch.equal(llm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False),
                               plain_generate(folder, ids))
        assert llm.stats.expert_hits > 0


def test_the_expert_cache_forgets_old_prompts_counts():
    from nb_offload import experts
    cache = experts.ExpertCache(torch, "cpu", 4, 1)
    assert cache.lookup(("b", 0)) is None and cache.place(("b", 0)) == 0
    for _ in range(4 * experts.AGE_EVERY):          # a long generate routes to expert 0 over and over
        cache.lookup(("b", 0))
    # a new prompt routes to expert 1 from now on: without halving the counts it would take more routings
    # than expert 0 had to displace it
    admitted = next(n for n in range(1, 4 * experts.AGE_EVERY)
                    if cache.lookup(("b", 1)) is None and cache.place(("b", 1)) is not None)
    assert admitted < 2 * experts.AGE_EVERY and set(cache.where) == {("b", 1)}


def test_pinned_experts_are_kept_in_the_cache_from_the_start(model_dirs, tmp_path):
    folder = model_dirs("qwen3_moe")         # 8 experts a block, 2 a token
    want_tokens, _ = reference(folder)
    pins = {"model.layers.*": "disk", "model.layers.1-2.mlp.experts.0-2": "cpu"}
    plan = nb_offload.plan(folder, device="cpu", disk=tmp_path / "p", pins=pins, expert_cache=0)
    with all_on_disk(folder, tmp_path / "l", hold_spare=False, expert_cache=0,
                     pins={"model.layers.1-2.mlp.experts.0-2": "cpu"}) as llm:
        row = next(u.expert_row_nbytes for u in llm._insp.units if u.expert_row_nbytes)
        assert plan.reserved["expert_cache"] == llm.plan.reserved["expert_cache"] == 6 * row
        assert llm.pinned_experts() == {"model.layers.1.mlp.experts": [0, 1, 2],
                                        "model.layers.2.mlp.experts": [0, 1, 2]}
        state = llm.expert_state()              # filled at load, before any step
        assert state["model.layers.1"]["cached"] == [0, 1, 2] and state["model.layers.0"]["cached"] == []
        assert torch.equal(run_offloaded(llm)[0], want_tokens)
        hits = llm.stats.expert_hits
        assert hits > 0 and llm._engine.expert_cache.free == []     # room for the pinned ones only
        llm.pin("model.layers.3.mlp.experts.7", "cpu")
        assert llm.plan.reserved["expert_cache"] == 7 * row and llm.expert_state()["model.layers.3"]["cached"] == [7]
        llm.unpin("model.layers.*.mlp.experts.0-2")
        assert llm.pinned_experts() == {"model.layers.3.mlp.experts": [7]}
        assert torch.equal(run_offloaded(llm)[0], want_tokens)
        with pytest.raises(nb_offload.PinError, match="has experts 0-7"):
            llm.pin("model.layers.1.mlp.experts.8", "cpu")
        with pytest.raises(nb_offload.PinError, match="single experts are kept on the compute device"):
            llm.pin("model.layers.1.mlp.experts.1", "disk")
        with pytest.raises(nb_offload.PinError, match="matches no pinned expert"):
            llm.unpin("model.layers.0.mlp.experts.1")
        assert llm.pinned_experts() == {"model.layers.3.mlp.experts": [7]}     # the refusals changed nothing


def test_expert_pins_of_a_dense_model_are_refused(model_dirs):
    with pytest.raises(nb_offload.PinError, match="it has no MoE blocks"):
        nb_offload.plan(model_dirs("llama"), device="cpu", pins={"model.layers.0.mlp.experts.1": "cpu"})
