"""The host's side of the GPU-fetched routed experts (device_routing.py), on the CPU: what the last steps
routed, counted from the fetch's counters; the cache's policy on it; an expert fetched from its cache entry
only once its copy there has landed; an entry's old expert pointed back to host memory before the entry is
overwritten; the slots' room lent while such steps run and given back before any other. The kernel and its
streams are CUDA's (tests/gpu/test_experts_gpu.py): here they are stand-ins that log the order of things."""

import contextlib
from types import SimpleNamespace

import torch

from nb_offload import device_routing
from nb_offload.experts import ExpertCache, RoutedExperts

ROW = 16        # one expert's bytes: a row of 8 of each of two fused tensors


class Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")


class Fetch:
    """Logs where each expert's rows are pointed (fetch.RowFetch.point)."""

    def __init__(self, log):
        self.log = log

    def point(self, expert, addresses=None):
        self.log.append(("home" if addresses is None else "entry", expert))


def routing(own=1, lent=1, spare=0):
    """A DeviceRouting of one MoE block of 4 experts, top 2, its bytes in ``flat``, with stand-in streams,
    events (landed once ``done[0]``) and fetch; returns it, its log, the flat bytes and the landing switch."""
    log, done = [], [False]

    class Event:
        def record(self, stream):
            log.append(f"copy recorded on {stream.name}")

        def query(self):
            return done[0]

    found = RoutedExperts("model.layers.1.mlp.experts", 4, [(0, 8), (32, 8)], top_k=2)
    flat = torch.arange(64, dtype=torch.uint8)
    cache = ExpertCache(torch, "cpu", ROW, own)
    stats = SimpleNamespace(bytes_from_cpu=0, expert_hits=0, experts_read=0, experts_skipped=0)
    mover = SimpleNamespace(compute_stream=Stream("compute", log), copy_stream=Stream("copy", log),
                            copied_since_prefetch=lambda: None)
    engine = SimpleNamespace(expert_cache=cache, stats=stats, last_routed={}, sources={5: SimpleNamespace(flat=flat)},
                             mover=mover, held={})
    d = object.__new__(device_routing.DeviceRouting)
    d.engine = engine
    d.torch = SimpleNamespace(cuda=SimpleNamespace(stream=lambda s: contextlib.nullcontext(), Event=Event))
    d.top_k, d.count, d.row_bytes = 2, 4, ROW
    d.counts = torch.zeros((1, 4), dtype=torch.int32)
    d.seen = [[0] * 4]
    d.units = {5: device_routing.Routed(found, None, Fetch(log), [], "model.layers.1")}
    d.order, d.pointed, d.pending, d.backlog = [5], {}, {}, []
    d.dirty = d.active = d.lent = False
    room = torch.zeros(lent * ROW, dtype=torch.uint8)
    d.lendable = [room[i * ROW:(i + 1) * ROW] for i in range(lent)]
    d.spare_entries, d.spare, d.lent_at_most = spare, None, 0
    engine.device = "cpu"
    d.torch.empty, d.torch.uint8 = torch.empty, torch.uint8
    return d, log, flat, done


def routed(d, *experts):
    """A GPU-fetched step ran and routed ``experts`` (the kernel raises the counters)."""
    for e in experts:
        d.counts[0, e] += 1


def kept(d, done, *experts):
    """Decode steps with the copies landing at once: the first routes ``experts``, the cache takes them,
    and from the third they are fetched from their entries."""
    done[0] = True
    d.begin(True)
    routed(d, *experts)
    d.begin(True)
    d.begin(True)


def test_an_admitted_expert_is_fetched_from_its_entry_only_once_its_copy_has_landed():
    d, log, flat, done = routing()
    cache, stats = d.engine.expert_cache, d.engine.stats
    d.begin(True)                       # the first decode step: the slots' room lent, nothing routed yet
    assert d.active and d.dirty and d.lent and cache.capacity == 2
    routed(d, 1, 3)
    d.begin(True)
    assert stats.experts_read == 2 and stats.expert_hits == 0
    assert set(d.pending) == {(5, 1), (5, 3)} and not d.pointed
    assert not [x for x in log if isinstance(x, tuple)]          # nothing pointed at an entry being filled
    assert log.index("copy waits for compute") < log.index("copy recorded on copy")
    assert stats.bytes_from_cpu == 2 * ROW + 2 * ROW              # the two fetched from host, the two copies
    entry = cache.where[(5, 1)]
    assert cache.entry(entry).tolist() == flat[8:16].tolist() + flat[40:48].tolist()     # expert 1's rows
    routed(d, 1, 2)
    d.begin(True)                       # the copies haven't landed: expert 1 still comes from host memory
    assert not d.pointed and stats.expert_hits == 0 and stats.bytes_from_cpu == 6 * ROW
    done[0] = True
    routed(d, 1, 3)
    d.begin(True)                       # landed: from now on fetched from the entries
    assert set(d.pointed) == {(5, 1), (5, 3)} and not d.pending
    assert ("entry", 1) in log and ("entry", 3) in log
    routed(d, 1, 0)
    d.settle()                          # the end of a generate: counted now, given to the policy next step
    assert stats.expert_hits == 1 and stats.experts_read == 8 and d.backlog == [(5, 0), (5, 1)]
    assert d.engine.last_routed == {"model.layers.1": [0, 1]}


def test_an_entry_s_old_expert_goes_back_to_host_memory_before_the_entry_is_overwritten():
    d, log, flat, done = routing(own=1, lent=0)
    cache = d.engine.expert_cache
    kept(d, done, 2, 3)                 # one entry: expert 2 taken, 3 not (routed no more often)
    assert d.pointed == {(5, 2): 0}
    log.clear()
    for _ in range(2):
        routed(d, 3)
        d.begin(True)                   # 3 routed more often than 2 now: it takes 2's entry
    assert cache.where == {(5, 3): 0}
    assert log.index(("home", 2)) < log.index("copy waits for compute")
    d.begin(True)
    assert d.pointed == {(5, 3): 0} and cache.entry(0).tolist() == flat[24:32].tolist() + flat[56:64].tolist()


def test_an_entry_placed_and_then_taken_in_the_same_step_is_copied_once():
    d, log, flat, done = routing(own=1, lent=0)
    d.begin(True)
    routed(d, 0, 1, 1)                  # expert 0 takes the free entry, then 1, routed twice, takes it from 0
    d.begin(True)
    assert d.engine.expert_cache.where == {(5, 1): 0} and set(d.pending) == {(5, 1)}
    assert log.count("copy recorded on copy") == 1
    assert d.engine.stats.bytes_from_cpu == 3 * ROW + ROW          # three fetched from host, one copy


def test_a_step_of_the_host_s_path_takes_the_lent_room_back_and_forgets_what_it_held():
    d, log, flat, done = routing(own=1, lent=1)
    cache = d.engine.expert_cache
    kept(d, done, 0, 1)
    assert set(d.pointed) == {(5, 0), (5, 1)} and cache.capacity == 2
    log.clear()
    d.begin(False)                      # a prefill: it writes the slots
    assert not d.lent and not d.active and cache.capacity == 1
    assert set(d.pointed) == {(5, 0)} and ("home", 1) in log      # the one kept in our own room stays
    assert "compute waits for copy" in log
    d.begin(True)                       # decode again: the room lent again, empty
    assert d.lent and cache.capacity == 2 and len(cache.free) == 1


def test_the_room_of_a_prefill_s_activations_is_lent_while_decode_steps_run_and_freed_for_the_next():
    d, log, flat, done = routing(own=1, lent=1, spare=2)
    cache = d.engine.expert_cache
    kept(d, done, 0, 1, 2, 3)
    assert cache.capacity == 4 and d.spare is not None and tuple(d.spare.shape) == (2, ROW)
    assert len(cache.where) == 4 and len(d.pointed) == 4       # own, the slot's and the two spare entries
    spare = {cache.entry(e).data_ptr() for e in range(cache.own + 1, cache.capacity)}
    assert spare == {d.spare[i].data_ptr() for i in range(2)}
    d.begin(False)                      # a prefill: the room is freed for its activations
    assert d.spare is None and cache.capacity == 1 and len(d.pointed) == 1
    d.begin(True)
    assert d.spare is not None and cache.capacity == 4 and len(cache.free) == 3


def test_a_generate_s_end_gives_the_lent_room_back_after_counting_what_it_routed():
    """So what the next generate holds in spare room (spare.py) never meets the room lent in this one."""
    d, log, flat, done = routing(own=1, lent=1, spare=1)
    cache = d.engine.expert_cache
    kept(d, done, 0, 1, 2)
    assert d.lent and cache.capacity == 3 and d.lent_at_most == 2
    routed(d, 2, 3)
    log.clear()
    d.settle(release=True)
    assert not d.lent and d.spare is None and cache.capacity == 1 and len(cache.where) == 1
    assert d.backlog == [(5, 2), (5, 3)]            # counted, for the policy at the next step
    assert "compute waits for copy" in log and ("home", 1) in log and ("home", 2) in log
    assert set(d.pointed) == {(5, 0)}
    d.engine.held = {9: (None, torch.empty(ROW))}   # the next generate holds a unit in the activations' room
    d.begin(True)
    assert d.lent and d.spare is None and cache.capacity == 2   # the slot's entry lent, no spare room left
