"""Spare room: a short generate holds streamed units in the reservation it leaves unused (CPU)."""

import pytest
import torch
from helpers import PROMPT, InterruptAt, blocks, greedy, load_tight, reference

import nb_offload
from nb_offload import spare


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "mixtral"])
def test_held_units_give_identical_tokens_and_stream_fewer_bytes(arch, model_dirs, tmp_path):
    folder = model_dirs(arch)
    want, _ = reference(folder)
    moved = {}
    for hold in (False, True):
        llm = load_tight(folder, tmp_path / "offload", hold_spare=hold)
        try:
            streamed = [i for i, e in enumerate(llm.plan) if e.tier == "disk"]
            assert len(streamed) >= 2, str(llm.plan)
            assert torch.equal(greedy(llm), want)
            moved[hold] = llm.stats.bytes_from_disk
            assert (llm.stats.held_last > 0) == hold
            # afterwards every unit streams again, bound to the engine's slots
            eng = llm._engine
            assert llm.held == [] and not eng.held
            assert {eng.model_unit(i) for i in eng.sources} == set(streamed)
            assert sorted(eng.order) == sorted(eng.sources)
            slot_ptrs = {s.untyped_storage().data_ptr() for s in eng.slots}
            for i in eng.sources:
                assert all(p.untyped_storage().data_ptr() in slot_ptrs for p in eng.params[i])
            assert torch.equal(greedy(llm), want)          # and a second generate agrees
        finally:
            llm.unload()
    assert moved[True] < moved[False]


def test_a_unit_held_from_a_staging_slot_that_holds_it_is_not_read_again(model_dirs, tmp_path):
    """Units the slots hold (the load brought the first ones: Engine.prime) are held from there, with no drive
    read; the others are read. Tokens stay plain transformers'."""
    folder = model_dirs("llama")
    want, _ = reference(folder)
    llm = load_tight(folder, tmp_path / "offload", hold_spare=False)
    try:
        eng = llm._engine
        in_slots = [e[0] for e in eng.schedule.kept if e is not None]
        other = next(i for i in eng.order if i not in in_slots)
        assert in_slots
        read, kept = llm.stats.bytes_from_disk, llm.stats.kept_units
        eng.hold([in_slots[0], other])
        assert llm.stats.bytes_from_disk - read == eng.units[other].nbytes      # the other one only
        assert llm.stats.kept_units - kept == 1
        assert set(eng.held) == {in_slots[0], other}
        assert torch.equal(greedy(llm), want)
        eng.release_held()
        assert torch.equal(greedy(llm), want)
    finally:
        llm.unload()


def test_units_are_held_while_the_generate_runs(model_dirs, tmp_path):
    folder = model_dirs("llama")
    llm = load_tight(folder, tmp_path / "offload")
    seen = []

    class Spy:
        def put(self, value):
            seen.append(list(llm.held))

        def end(self):
            pass

    try:
        greedy(llm, streamer=Spy())
        assert seen and all(s == seen[0] for s in seen) and seen[0]
        disk = [e.name for e in llm.plan if e.tier == "disk"]
        assert all(any(h == d or h.startswith(d + ".") for d in disk) for h in seen[0]), seen[0]
        assert llm.held == []
    finally:
        llm.unload()


def test_a_generate_as_long_as_the_planned_context_holds_nothing(model_dirs, tmp_path):
    folder = model_dirs("llama")
    llm = load_tight(folder, tmp_path / "offload")
    try:
        ids = torch.tensor(PROMPT)
        assert llm._spare_picks((ids,), {"max_new_tokens": llm.plan.context - ids.shape[1]}) == []
        assert llm._spare_picks((ids,), {"max_new_tokens": 4}) != []
        # a batch (or beams) needs room per sequence
        wide = ids.expand(64, -1)
        picks = {k: len(llm._spare_picks((x,), {"max_new_tokens": 64})) for k, x in (("wide", wide), ("one", ids))}
        assert picks["wide"] < picks["one"]
    finally:
        llm.unload()


def test_pinned_units_are_never_held(model_dirs, tmp_path):
    folder = model_dirs("llama")
    names = [e.name for e in blocks(nb_offload.plan(folder, device="cpu"))]
    llm = nb_offload.load(folder, device="cpu", disk=tmp_path / "offload", pins={names[0]: "disk", names[1]: "disk"},
                          progress=False)
    try:
        assert llm._spare_picks((torch.tensor(PROMPT),), {"max_new_tokens": 4}) == []
        greedy(llm)
        assert llm.stats.held_last == 0 and llm.stats.bytes_from_disk > 0
    finally:
        llm.unload()


def test_an_interrupted_generate_gives_the_units_back(model_dirs, tmp_path):
    folder = model_dirs("llama")
    want, _ = reference(folder)
    llm = load_tight(folder, tmp_path / "offload")

    try:
        with pytest.raises(KeyboardInterrupt):
            greedy(llm, streamer=InterruptAt(4))
        assert llm.stats.held_last > 0 and llm.held == [] and not llm._engine.held
        assert torch.equal(greedy(llm), want)
    finally:
        llm.unload()


def test_hold_can_be_switched_off_on_a_loaded_model(model_dirs, tmp_path):
    llm = load_tight(model_dirs("llama"), tmp_path / "offload")
    try:
        llm.hold_spare = False
        greedy(llm)
        assert llm.stats.held_last == 0
    finally:
        llm.unload()


class _Config:
    max_new_tokens = None
    max_length = 20
    num_beams = 1
    num_return_sequences = 1


class _Model:
    generation_config = _Config()


@pytest.mark.parametrize("args, kwargs, extent", [
    ((torch.zeros(1, 7),), {"max_new_tokens": 5}, (12, 1)),
    ((), {"input_ids": torch.zeros(2, 7), "max_new_tokens": 5}, (12, 2)),
    ((torch.zeros(1, 7),), {}, (20, 1)),                                  # the config's max_length
    ((torch.zeros(1, 30),), {}, (31, 1)),                                 # prompt beyond max_length
    ((torch.zeros(1, 7),), {"max_length": 50}, (50, 1)),
    ((torch.zeros(3, 7),), {"max_new_tokens": 5, "num_beams": 4}, (12, 12)),
    ((torch.zeros(1, 7),), {"max_new_tokens": 5, "num_return_sequences": 2, "do_sample": True}, (12, 2)),
    ((), {"inputs_embeds": torch.zeros(1, 7, 16), "max_new_tokens": 1}, (8, 1)),
    ((torch.zeros(1, 7),), {"past_key_values": object(), "max_new_tokens": 5}, None),
    ((torch.zeros(1, 7),), {"assistant_model": object(), "max_new_tokens": 5}, None),
    ((), {}, None),
])
def test_generate_extent(args, kwargs, extent):
    assert spare.generate_extent(_Model(), args, kwargs) == extent


def test_choose_prefers_disk_and_spreads_picks():
    mib = 2**20
    cands = [(i, "disk" if i % 3 == 0 else "cpu", 4 * mib) for i in range(12)]   # 4 disk, 8 cpu
    assert spare.choose(cands, 0) == []
    assert spare.choose(cands, 8 * mib) == [3, 9] or set(spare.choose(cands, 8 * mib)) <= {0, 3, 6, 9}
    assert set(spare.choose(cands, 16 * mib)) == {0, 3, 6, 9}
    picked = spare.choose(cands, 24 * mib)
    assert set(picked) >= {0, 3, 6, 9} and len(picked) == 6
    gaps = sorted(i for i in picked if i % 3)
    assert gaps[1] - gaps[0] > 1                       # cpu picks spread, not adjacent
    assert len(spare.choose(cands, 10**12)) == 12


@pytest.mark.parametrize("cpu_gbps, link_gbps, held_blocks", [(1.0, 10.0, 2), (10.0, 1.0, 0)])
def test_the_spare_room_holds_the_cpus_blocks_where_they_make_the_step_longest(cpu_gbps, link_gbps, held_blocks):
    """A hybrid plan: three blocks the CPU computes (0, 2, 4) between three streamed (1, 3, 5), room for two. A
    slow CPU: the two held are CPU blocks; a slow link: streamed units."""
    from nb_offload import hybrid
    mib = 2**20
    where = {0: "cpu", 1: "stream", 2: "cpu", 3: "stream", 4: "cpu", 5: "stream"}

    def time_of(held):
        order = [("gpu", 0) if i in held else (where[i], 8 * mib) for i in range(6)]
        return hybrid.step_seconds(order, cpu_gbps, link_gbps, ahead=1, slot_bytes=8 * mib)
    streamed = [(i, "cpu", 8 * mib) for i in (1, 3, 5)]
    picks = spare.choose_with_cpu_blocks(streamed, [(0, 8 * mib), (2, 8 * mib), (4, 8 * mib)], 16 * mib, 2 * mib,
                                         time_of)
    assert len(picks) == 2 and sum(1 for i in picks if where[i] == "cpu") == held_blocks
    assert spare.choose_with_cpu_blocks(streamed, [(0, 8 * mib)], 0, 2 * mib, time_of) == []


def test_the_cpu_blocks_rate_reached_is_kept_over_generates(model_dirs):
    """What the CPU's blocks compute in each generate's decode calls adds up (``cpu_rate_reached``, which the
    spare room's choice then models the step at); none before enough calls, and a generate whose stats were
    reset meanwhile adds nothing. Once enough calls were in replayed steps, theirs alone."""
    llm = nb_offload.load(model_dirs("llama"), device="cpu", progress=False)
    try:
        ids, kw = torch.tensor(PROMPT), dict(max_new_tokens=4)
        st = llm.stats

        def generate(nbytes, seconds, calls, reset=False, replayed=0):
            with llm._holding_spare((ids,), kw):
                if reset:
                    st.reset()
                st.cpu_decode_bytes += nbytes
                st.cpu_decode_seconds += seconds
                st.cpu_decode_calls += calls
                if replayed:        # the last ``replayed`` calls were a replayed step's, as fast as the others here
                    st.cpu_replayed_bytes += nbytes * replayed / calls
                    st.cpu_replayed_seconds += seconds * replayed / calls / 2
                    st.cpu_replayed_calls += replayed
                st.cpu_block_bytes += 10 * nbytes       # larger calls (a prefill on the CPU) aren't counted
                st.cpu_block_seconds += seconds
        assert llm.cpu_rate_reached is None
        generate(4e9, 0.1, llm.RATE_AFTER_CALLS - 1)
        assert llm.cpu_rate_reached is None             # too few calls yet
        generate(2e9, 0.1, 1)
        assert llm.cpu_rate_reached == pytest.approx(30.0)
        generate(9e9, 0.1, 4, reset=True)               # counted from the reset: dropped
        assert llm.cpu_rate_reached == pytest.approx(30.0)
        generate(1e9, 0.1, 4)
        assert llm.cpu_rate_reached == pytest.approx(7e9 / 0.3 / 1e9)
        generate(8e9, 0.2, 8, replayed=4)     # half of them replayed, in half the time each: too few yet
        assert llm.cpu_rate_reached == pytest.approx(15e9 / 0.5 / 1e9)
        generate(8e9, 0.2, 8, replayed=4)     # now enough: the replayed steps' rate alone
        assert llm.cpu_rate_reached == pytest.approx(8e9 / 0.1 / 1e9)
    finally:
        llm.unload()


def test_bad_hold_option_is_refused_before_loading(model_dirs):
    with pytest.raises(nb_offload.OffloadError, match=r"hold_spare='no' is not valid; accepted: True or False"):
        nb_offload.load(model_dirs("llama"), device="cpu", hold_spare="no", progress=False)
