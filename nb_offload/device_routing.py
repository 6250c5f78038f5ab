"""Routed experts fetched by the GPU in a batch-1 decode step, so the step needs no host and is captured.

On CUDA a streamed MoE block otherwise brings its routed experts once the host has read the router's
choice (experts.py): a wait per block, and a step that can't be a CUDA graph. Here, in a decode step of
one token, the experts module's pre-hook launches a kernel (fetch.py) that reads the routed experts' rows
itself, by the router's indices in device memory: from the expert cache where it holds them, else
straight from page-locked host memory over the link. The rows land packed in routing order in a small
buffer of ``top_k`` rows, and the experts module computes on that buffer with the indices renumbered
0..top_k-1 (and ``num_experts`` top_k for the call). transformers' experts implementations (eager,
batched_mm, grouped_mm) give the same bits so as at the experts' own rows: each token's k rows are
computed apart and summed in routing order either way (benchmarks/bench_fetch.py checks it on the GPU,
tests/gpu the tokens). With no host wait, the graphs of graphs.py capture the whole step.

Where every streamed unit is such an experts module (pieces.py streams a MoE block's experts alone),
these steps copy nothing into the slots, so the slots' memory goes to the expert cache while they run:
"lent" entries, given back before any other step (a prefill brings its blocks whole into the slots).

The cache's policy is experts.ExpertCache's, run by the host between steps on what the last step
routed: each fetch counts its experts in device memory, read back at the next step's start (the host
waits for the GPU there anyway, for the token). An expert the cache takes is copied into its entry from
host memory on the copy stream (a replay waits for it to finish; an eager step runs beside it), and is
fetched from there from the first step after that copy has landed.
Each expert's source is an address in the fetch's table, rewritten on the compute stream between steps:
an entry's old expert is pointed back to host memory before the entry is overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tiers import param_views


@dataclass
class Routed:
    """One streamed block's experts module as fetched by the GPU."""

    found: object           # experts.RoutedExperts
    module: object          # the experts module
    fetch: object           # fetch.RowFetch
    views: list             # the unit's parameters as views of the packed buffer (top_k rows each)
    block: str              # the model unit's name, for last_routed


ENABLED = True      # False: the host brings every routed expert, as before (benchmarks compare the two)


def why_not(engine) -> str:
    """Why ``engine``'s routed blocks can't be fetched by the GPU ("" where they can)."""
    e = engine
    if not e.cuda or not e.routed:
        return "no streamed MoE blocks on CUDA"
    if not ENABLED:
        return "device_routing.ENABLED is off"
    streamed = e.stream_order()
    if any(i not in e.routed or e._without_experts[i][1] for i in streamed):
        return "a streamed unit holds more than a MoE block's experts (it needs the slots)"
    if any(e.sources[i].flat is None for i in streamed):
        return "experts not in page-locked host memory"
    counts = {(f.count, f.top_k, tuple(r for _, r in f.rows)) for f in e.routed.values()}
    if len(counts) != 1:
        return "MoE blocks of different shapes"
    found = next(iter(e.routed.values()))
    from .planner import text_config
    if getattr(text_config(e.model.config), "num_experts_per_tok", None) != found.top_k:
        return "the config names no num_experts_per_tok (the packed rows are sized by it)"
    if not found.worth_routing(1):
        return "a one-token step would bring its blocks whole"
    if any(row % 16 for _, row in found.rows):      # packed rows stay as aligned as the experts' own
        return "expert rows not whole 16-byte words"
    if found.top_k * found.row_bytes > len(e.mover.slots[0]):
        return "the slot can't hold top_k experts"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return ""


class DeviceRouting:
    """The GPU-fetched routed experts of one engine (``why_not(engine)`` is "")."""

    def __init__(self, engine):
        from . import fetch
        e = self.engine = engine
        torch = self.torch = e.torch
        first = next(iter(e.routed.values()))
        self.top_k, self.count, self.row_bytes = first.top_k, first.count, first.row_bytes
        slot0 = e.mover.slots[0]
        self.packed = slot0[:self.top_k * self.row_bytes]      # the routed rows of the block computing
        self.renumbered = torch.arange(self.top_k, device=e.device).view(1, self.top_k)
        self.counts = torch.zeros((len(e.routed), self.count), dtype=torch.int32, device=e.device)
        self.seen = [[0] * self.count for _ in e.routed]        # counts as last read
        self.units: dict = {}
        for n, (idx, found) in enumerate(sorted(e.routed.items())):
            unit, flat = e.units[idx], e.sources[idx].flat
            host = fetch.device_address(flat)
            starts, at = {}, 0          # each fused tensor's packed rows, in the order of found.rows
            for offset, row in found.rows:
                starts[offset] = at
                at += self.top_k * row
            views = list(param_views(unit, slot0))
            for i, s in enumerate(unit.params):
                if s.offset in starts:
                    a = starts[s.offset]
                    raw = self.packed[a:a + self.top_k * (s.nbytes // found.count)]
                    views[i] = raw.view(views[i].dtype).view(self.top_k, *s.shape[1:])
            rf = fetch.RowFetch(torch, e.device, found.count, [(host + o, r) for o, r in found.rows],
                                [self.packed.data_ptr() + starts[o] for o, _ in found.rows], self.counts[n])
            self.units[idx] = Routed(found, e.model.get_submodule(found.module), rf, views,
                                     e.units[e.model_unit(idx)].name)
        self.order = sorted(self.units)             # row n of counts
        self.pointed = {}           # (unit, expert) -> cache entry its fetch reads from now
        self.pending = {}           # (unit, expert) -> (entry, event of its copy into the entry)
        self.dirty = False          # a step fetched since the counts were last read
        self.backlog = []           # keys counted by ``settle`` and not yet seen by the cache's policy
        self.active = False         # this step is fetched by the GPU
        # the slots' memory past the packed rows, in whole entries, for the cache while such steps run
        self.lendable = []
        if e.expert_cache is not None:
            for i, slot in enumerate(e.mover.slots):
                at = len(self.packed) if i == 0 else 0
                while at + self.row_bytes <= len(slot):
                    self.lendable.append(slot[at:at + self.row_bytes])
                    at += self.row_bytes
        # the room the plan keeps for a prefill's activations, in whole entries, lent too: a GPU-fetched step's
        # own tensors are in its captured graph's pool (or a token's worth, eager). Allocated when lent, freed
        # when given back, so the next prefill's activations find it in the allocator.
        self.spare_entries = e.decode_spare // self.row_bytes if e.expert_cache is not None else 0
        self.spare = None
        self.lent = False
        self.lent_at_most = 0       # the most entries lent at once (a generate gives them back at its end)

    # -- between steps -------------------------------------------------------------------------------
    def begin(self, on_device: bool):
        """Before a forward pass: ``on_device`` where the GPU fetches its routed experts (a batch-1 decode)."""
        e, cache = self.engine, self.engine.expert_cache
        routed, self.backlog = self.backlog + self.account(), []
        if not on_device:
            if cache is not None:       # counted for the policy; the host's path places what it copies
                for key in routed:
                    cache.lookup(key)
            self.give_back()        # the host path reads the cache's entries, and slots get written
            self.active = False
            return
        if not self.active:         # after a host-path step: its copies into the slots come first
            e.mover.compute_stream.wait_stream(e.mover.copy_stream)
        self.active = True
        self.dirty = True           # the step about to run fetches (a replay too, where no hook runs)
        if cache is None:
            return
        if not self.lent and (self.lendable or self.spare_entries):
            cache.lend(self.lendable + self._spare_entries())
            self.lent = True
            self.lent_at_most = max(self.lent_at_most, cache.capacity - cache.own)
        admit = {}
        try:
            for key in routed:          # the cache's policy, on what the last step routed
                if cache.lookup(key) is None:
                    entry = cache.place(key)
                    if entry is not None:
                        admit[key] = entry
            # an entry placed twice here (a key placed, then evicted by a later one) is copied once
            admit = {k: entry for k, entry in admit.items() if cache.where.get(k) == entry}
            for key in [k for k in self.pending if cache.where.get(k) != self.pending[k][0]]:
                del self.pending[key]           # evicted before its copy landed
            # evicted experts back to host memory before their entries are overwritten; those taken now
            # are fetched from their entries only once their copies have landed
            self._reconcile(skip=admit)
            self._admit(admit)
        except BaseException:       # an entry placed and not (yet) being filled must not be found later
            for key in admit:
                if key not in self.pending:
                    cache.forget(key)
            raise

    def _spare_entries(self) -> list:
        """The activations' room as entries (allocated now, on the compute stream), or none where the device
        can't give it (memory taken outside the plan)."""
        torch = self.torch
        # less what the generate holds in spare room (spare.py counts the activations' room in it)
        held = sum(buf.numel() for _, buf in self.engine.held.values())
        entries = max(0, self.spare_entries * self.row_bytes - held) // self.row_bytes
        try:
            self.spare = torch.empty((entries, self.row_bytes), dtype=torch.uint8,
                                     device=self.engine.device) if entries else None
        except torch.cuda.OutOfMemoryError:     # tried again when next lent
            self.spare = None
        return list(self.spare) if self.spare is not None else []

    def settle(self, release: bool = False):
        """Count what the GPU-fetched steps since the last read routed (the host waits for them); the next
        step's ``begin`` gives the keys to the cache's policy. ``release`` (a generate's end): the lent room
        given back too, so what the next generate holds in spare room (spare.py) never meets it."""
        self.backlog.extend(self.account())
        if release:
            self.give_back()

    def give_back(self):
        """The lent room back (the experts kept there forgotten, the activations' room freed), every copy into
        an entry ordered before what the compute stream does next, and each expert's fetch pointed again."""
        e, cache = self.engine, self.engine.expert_cache
        if not (self.lent or self.pending):
            return
        e.mover.compute_stream.wait_stream(e.mover.copy_stream)
        e.mover.copy_stream.wait_stream(e.mover.compute_stream)    # after every read of the lent room
        self.pending.clear()
        if self.lent:
            cache.reclaim()
            self.lent, self.spare = False, None
        self._reconcile()

    def _admit(self, admit):
        """Copy each key of ``admit`` from host memory into its cache entry, on the copy stream after what the
        compute stream has queued (the last step, and the table pointing the entry's old expert away)."""
        if not admit:
            return
        e, torch, cache = self.engine, self.torch, self.engine.expert_cache
        copy = e.mover.copy_stream
        e.mover.copied_since_prefetch()
        with torch.cuda.stream(copy):
            copy.wait_stream(e.mover.compute_stream)
            for key, entry in admit.items():
                idx, expert = key
                flat, found = e.sources[idx].flat, self.units[idx].found
                for (a, b), (c, d) in cache._pairs(found, expert):
                    cache.entry(entry)[c:d].copy_(flat[a:b], non_blocking=True)
                done = torch.cuda.Event()
                done.record(copy)
                self.pending[key] = (entry, done)
                e.stats.bytes_from_cpu += found.row_bytes

    def _reconcile(self, skip=()):
        """Point each expert's fetch at the cache entry holding it once its copy there has landed, else at host
        memory (``skip``: keys whose copies aren't queued yet)."""
        cache = self.engine.expert_cache
        want = {}
        if cache is not None:
            for key, entry in cache.where.items():
                if key[0] in self.units and key not in self.pending and key not in skip:
                    want[key] = entry
        for key in [k for k, entry in self.pointed.items() if want.get(k) != entry]:
            self.units[key[0]].fetch.point(key[1], None)
            del self.pointed[key]
        landed = [k for k, (_, done) in self.pending.items() if done.query()]
        for key in landed:
            want[key] = self.pending.pop(key)[0]
        for key, entry in want.items():
            if self.pointed.get(key) != entry:
                at = cache.entry(entry).data_ptr()      # each fused tensor's row where the entry keeps it
                addresses = [at + c for _, (c, _) in cache._pairs(self.units[key[0]].found, key[1])]
                self.units[key[0]].fetch.point(key[1], addresses)
                self.pointed[key] = entry

    def account(self) -> list:
        """Read what the steps since the last call fetched (the host waits for them), into the stats and
        ``last_routed``; the (unit, expert) keys fetched, once per time."""
        if not self.dirty:
            return []
        self.dirty = False
        e, stats = self.engine, self.engine.stats
        now = self.counts.tolist()
        keys = []
        for n, idx in enumerate(self.order):
            routed = self.units[idx]
            chosen = []
            for expert, (was, is_) in enumerate(zip(self.seen[n], now[n])):
                times = is_ - was
                if times <= 0:
                    continue
                chosen.append(expert)
                keys.extend([(idx, expert)] * times)
                if (idx, expert) in self.pointed:
                    stats.expert_hits += times
                else:
                    stats.bytes_from_cpu += times * routed.found.row_bytes
                stats.experts_read += times
            self.seen[n] = now[n]
            if chosen:
                stats.experts_skipped += max(0, routed.found.count - len(chosen))
                e.last_routed[routed.block] = chosen
        return keys

    # -- in a step -------------------------------------------------------------------------------------
    def before(self, idx, args, kwargs):
        """The experts module's pre-hook in a GPU-fetched step: fetch the routed rows into the packed buffer,
        bind the module's weights to it, and call it with the indices renumbered; None where the block isn't
        streaming (held: its experts are all there)."""
        e = self.engine
        job = e.schedule.active.get(idx)
        if job is None or idx not in e.sources:
            return None
        routed = self.units[idx]
        found = routed.found
        _, index, _ = found.arguments(args, kwargs)
        if index is None or index.numel() != self.top_k or index.shape[-1] != self.top_k:
            raise RuntimeError(f"{found.module}: routed to {None if index is None else tuple(index.shape)} experts "
                               f"in a one-token step; the packed rows hold {self.top_k}")
        timed = e.trace.enabled
        start = e.mover.mark() if timed else None
        routed.fetch(index)
        if timed:
            e.trace.cuda_event("copy", f"{found.module} ({self.top_k} routed, fetched by the GPU)", start,
                               e.mover.mark(), self.top_k * found.row_bytes)
        self.dirty = True
        for p, v in zip(e.params[idx], routed.views):
            p.data = v
        routed.module.num_experts = self.top_k
        if "top_k_index" in kwargs:
            return args, {**kwargs, "top_k_index": self.renumbered}
        args = list(args)
        args[found.index_at] = self.renumbered
        return tuple(args), kwargs

    def after(self, idx):
        """After the experts module: its own expert count again."""
        routed = self.units[idx]
        routed.module.num_experts = routed.found.count
