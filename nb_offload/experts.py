"""Routed experts: a streamed mixture-of-experts block brings in only the experts its router picks.

transformers 5 keeps a block's routed experts as fused tensors in one experts module (``gate_up_proj``
of shape [experts, 2 x intermediate, hidden], ``down_proj`` of [experts, hidden, intermediate], and
their biases where the model has them), called as ``experts(hidden_states, top_k_index, top_k_weights)``.
One expert's weights are one row of each of those tensors: a byte range of the block's flat layout.

So a streamed block is read without those rows, and the experts module's forward pre-hook, which is
the first to know ``top_k_index``, reads the rows of the experts named there before they compute.
The rows of the experts not routed keep whatever the slot held: every experts implementation
transformers has (eager, batched_mm, grouped_mm) reads only the routed rows.

Applies to MoE blocks the engine streams (engine.py): from disk on the CPU device, where the routed
rows are read into the slot, and from page-locked host memory on CUDA, where they are copied into it
once the host has read the router's choice (a wait a captured step can't hold: such plans decode
eager). Blocks streamed from disk on CUDA, and held ones, come whole. Each step chooses from its token
count (``worth_routing``): a prefill, where most experts are routed, brings its blocks whole.
"""

from __future__ import annotations

import heapq
import inspect
from collections import Counter
from dataclasses import dataclass

# The largest expected share of a block's experts a step brings as routed: past it the block comes whole.
# Mixtral (2 of 8) routes up to 4 tokens a step (68 % expected), Qwen3-MoE (8 of 128) up to 21.
ROUTED_SHARE = 0.75
# The expert cache halves its routing counts every this many lookups: the experts a new prompt routes to
# often can then replace the last prompt's.
AGE_EVERY = 1 << 14

# On CUDA, the least a block must save a decode step for its experts to come as routed. On the host's path
# a routed block runs eager (the host reads the router's choice), and an eager step costs the host about
# 1 ms a block (transformers' Mixtral shape on an H200: 15 ms for 16 blocks), which the link fills with some
# 55 MB; below that, the captured step with whole blocks is faster. Set before the GPU fetched routed experts
# itself in captured steps (device_routing.py); not measured again since.
CUDA_MIN_SAVED = 48 << 20


@dataclass
class RoutedExperts:
    """The routed experts of one streamed block: the experts module, how many experts it has, and each
    fused tensor's place in the block's layout, as (offset, bytes of one expert's row)."""

    module: str
    count: int
    rows: list
    index_at: int = 1       # where ``top_k_index`` comes among the forward's positional arguments
    top_k: int = 1          # experts each token is routed to

    def worth_routing(self, tokens: int) -> bool:
        """Whether a step of ``tokens`` tokens should bring the block without its experts and then only the
        routed ones: while they are expected (routing uniform, the worst case) to be at most ROUTED_SHARE
        of them. Above that, as in a prefill, the block comes whole, ahead of use, with no wait for the router."""
        return 1 - (1 - min(self.top_k, self.count) / self.count) ** max(1, tokens) <= ROUTED_SHARE

    @property
    def row_bytes(self) -> int:
        """One expert's bytes: its row of every fused tensor."""
        return sum(row for _, row in self.rows)

    def saved(self) -> int:
        """Bytes a batch-1 decode step doesn't bring of the block: the rows of the experts not routed to."""
        return max(0, self.count - self.top_k) * self.row_bytes

    def worth_it(self, cuda: bool) -> bool:
        """Whether the block is brought as routed on this device at all (always from disk on the CPU)."""
        return not cuda or self.saved() >= CUDA_MIN_SAVED

    def ranges(self, experts) -> list:
        """Byte ranges of the block's layout holding ``experts`` (indices), in layout order."""
        return sorted((offset + e * row, offset + (e + 1) * row) for offset, row in self.rows for e in experts)

    def rest(self, params) -> list:
        """Byte ranges of the block's other weights (``params``: the unit's slots), read with the block:
        their bytes only, not the layout's padding, so what a step reads is what ``describe`` counts."""
        fused = {offset for offset, _ in self.rows}
        out = []
        for s in sorted(params, key=lambda s: s.offset):
            if s.offset in fused or not s.nbytes:
                continue
            if out and out[-1][1] == s.offset:
                out[-1] = (out[-1][0], s.offset + s.nbytes)
            else:
                out.append((s.offset, s.offset + s.nbytes))
        return out

    def arguments(self, args, kwargs) -> tuple:
        """A call's (hidden_states, top_k_index, top_k_weights), each None where the call doesn't give it."""
        def given(name, at):
            return kwargs.get(name, args[at] if len(args) > at else None)
        return given("hidden_states", 0), given("top_k_index", self.index_at), given("top_k_weights", self.index_at + 1)

    def routed(self, args, kwargs) -> list:
        """The experts a call of the experts module routes to (valid indices, sorted)."""
        return self.routed_in(self.arguments(args, kwargs)[1])

    def routed_in(self, index) -> list:
        """The experts ``index`` (top_k_index) routes to (valid indices, sorted); all where it is None."""
        if index is None:
            return list(range(self.count))      # can't tell: read them all
        return sorted(e for e in set(index.flatten().tolist()) if 0 <= e < self.count)


def routed_tier(cuda: bool) -> str:
    """The tier streamed MoE blocks come apart from: host memory on CUDA, disk on the CPU device."""
    return "cpu" if cuda else "disk"


def find(model, unit, top_k: int = 1) -> RoutedExperts | None:
    """The routed experts of ``unit``, a block or a piece of one (pieces.py: the experts module is a piece
    of its own where a plan splits blocks), or None where it has none this can bring apart; ``top_k``:
    the experts each token is routed to (the config's ``num_experts_per_tok``)."""
    if unit.kind not in ("block", "piece") or unit.quantized:
        return None
    root = unit.modules[0]
    for name, module in model.get_submodule(root).named_modules():
        count = getattr(module, "num_experts", None)
        params = _parameters(module)
        if not isinstance(count, int) or count < 2 or "top_k_index" not in params:
            continue
        prefix = f"{root}.{name}." if name else f"{root}."
        fused = [s for s in unit.params if any(n.startswith(prefix) for n in s.names)]
        rows = []
        for slot in fused:
            if len(slot.names) != 1 or not slot.shape or slot.shape[0] != count or slot.nbytes % count:
                return None     # a tied or odd-shaped weight among them: stream the block whole
            rows.append((slot.offset, slot.nbytes // count))
        return RoutedExperts(prefix[:-1], count, rows, params.index("top_k_index"), top_k) if rows else None
    return None


def describe(model, unit, top_k: int, cuda: bool) -> None:
    """Note on ``unit`` what the planner needs of its routed experts: the bytes a batch-1 decode step brings
    of it streamed whole (``routed_nbytes``) and as pieces (``routed_split_nbytes``; pieces.py: each piece
    whole but the experts' one, the leftovers staying on the device), and one expert's bytes and the
    count and top-k (``expert_row_nbytes``, ``expert_count``, ``top_k``); the bytes are zeros where it has
    no routed experts or they don't come apart on this device (``worth_it``), the counts where it has none."""
    found = find(model, unit, top_k)
    unit.routed_nbytes = unit.routed_split_nbytes = unit.expert_row_nbytes = 0
    unit.expert_count, unit.top_k = (found.count, found.top_k) if found is not None else (0, 0)
    unit.experts_module = found.module if found is not None else ""
    if found is None or not found.worth_it(cuda):
        return
    unit.routed_nbytes = _routed_bytes(found, unit.params)
    unit.routed_split_nbytes = _split_bytes(model, unit, top_k) if unit.pieces else 0
    unit.expert_row_nbytes = found.row_bytes


def _split_bytes(model, unit, top_k) -> int:
    from .units import Unit
    split = 0
    for pc in unit.pieces:
        part = find(model, Unit(index=-1, name=unit.name, modules=[pc.module], kind="piece", params=pc.params,
                                nbytes=pc.nbytes), top_k)
        split += _routed_bytes(part, pc.params) if part is not None else pc.nbytes
    return split


def _routed_bytes(found, params) -> int:
    """Every weight but the fused ones, and ``top_k`` rows of each of those."""
    fused = {offset for offset, _ in found.rows}
    rest = sum(s.nbytes for s in params if s.offset not in fused)
    return rest + min(found.top_k, found.count) * found.row_bytes


class ExpertCache:
    """Copies on the GPU of the most often routed experts of streamed MoE blocks, in room the plan reserves
    (``expert_cache``).

    A routed expert found here is copied into its block's slot from the GPU (a device-to-device copy)
    instead of over the link. One that isn't is copied from host memory, then kept while there is room,
    or in place of the least often routed one kept, if it has been routed more often. Not least recently
    used: a decode step visits every block in turn, so once a step routes to more experts than the cache
    holds, each one would be evicted before its block came round again (measured: no hits at all on an
    H200 with 3 of 112 experts kept, benchmarks/RESULTS.md). Each entry holds one expert's rows of every
    fused tensor, one after another. Every copy runs on the stream the experts compute on, in order, so
    an entry is never overwritten before an earlier copy has read it."""

    def __init__(self, torch, device, row_bytes: int, capacity: int):
        self.rows = torch.empty((capacity, row_bytes), dtype=torch.uint8, device=device)
        self.own = self.capacity = capacity
        self.lent = []                  # entries in memory lent for a while (``lend``), numbered after our own
        self.where = {}                 # (unit, expert) -> entry
        self.free = list(range(capacity - 1, -1, -1))      # entries holding nothing (popped from the end)
        self.pinned = set()             # keys kept for good (expert pins): never evicted
        self.routed = Counter()         # (unit, expert) -> times routed to, halved every AGE_EVERY lookups
        self._least = []                # heap of (times routed, key) of evictable keys; stale items skipped
        self._lookups = 0

    def lookup(self, key):
        """Count a routing to ``key``; the entry holding it, or None."""
        self.routed[key] += 1
        self._lookups += 1
        if self._lookups % AGE_EVERY == 0:
            self._age()
        entry = self.where.get(key)
        if entry is not None and key not in self.pinned:
            self._push(key)
        return entry

    def place(self, key):
        """An entry for ``key`` (just looked up and missed): a free one, or the least often routed kept
        one's where ``key`` has been routed more often; None where it isn't kept. The caller fills it,
        and ``forget``s the key if it can't."""
        if self.free:
            entry = self.where[key] = self.free.pop()
            self._push(key)
            return entry
        while self._least:
            times, victim = self._least[0]
            if self.where.get(victim) is not None and victim not in self.pinned and times == self.routed[victim]:
                break
            heapq.heappop(self._least)
        if not self._least or self.routed[key] <= self._least[0][0]:
            return None
        _, victim = heapq.heappop(self._least)
        entry = self.where[key] = self.where.pop(victim)
        self._push(key)
        return entry

    def pin(self, key) -> int:
        """A free entry kept for ``key`` for good (the caller fills it)."""
        entry = self.where[key] = self.free.pop()
        self.pinned.add(key)
        return entry

    def forget(self, key):
        """Drop ``key`` (its entry was not filled: a copy interrupted); its entry is free again."""
        entry = self.where.pop(key, None)
        self.pinned.discard(key)
        if entry is not None:
            self.free.append(entry)

    def entry(self, entry):
        """The bytes of ``entry``: one expert's rows of every fused tensor, one after another."""
        return self.rows[entry] if entry < self.own else self.lent[entry - self.own]

    def lend(self, views):
        """More entries, in memory lent until ``reclaim`` (``views``: uint8 tensors of one entry's bytes each)."""
        self.reclaim()
        self.lent = list(views)
        self.capacity = self.own + len(self.lent)
        self.free[:0] = range(self.capacity - 1, self.own - 1, -1)     # our own entries are taken first

    def reclaim(self) -> list:
        """Give the lent entries back: the keys they held are no longer kept (returned)."""
        dropped = [key for key, entry in self.where.items() if entry >= self.own]
        for key in dropped:
            del self.where[key]
        self.free = [entry for entry in self.free if entry < self.own]
        self.lent, self.capacity = [], self.own
        return dropped

    def _push(self, key):
        heapq.heappush(self._least, (self.routed[key], key))
        if len(self._least) > 4 * self.capacity + 64:      # drop the stale items
            self._rebuild()

    def _age(self):
        """Halve every count, so experts a new prompt routes to often can replace an old prompt's."""
        self.routed = Counter({k: n // 2 for k, n in self.routed.items() if n > 1})
        self._rebuild()

    def _rebuild(self):
        self._least = [(self.routed[k], k) for k in self.where if k not in self.pinned]
        heapq.heapify(self._least)

    def fill(self, found, expert, source, entry):
        """Copy ``expert``'s rows from its block's ``source`` (tiers.Source: host memory or disk) into
        ``entry`` (an expert pinned in the cache, before the first step)."""
        for (a, b), (c, d) in self._pairs(found, expert):
            self.entry(entry)[c:d].copy_(source.read(a, b - a))

    def load(self, found, expert, slot, entry):
        """Copy ``expert``'s rows from ``entry`` into their places in ``slot`` (the block's flat bytes)."""
        for (a, b), (c, d) in self._pairs(found, expert):
            slot[a:b].copy_(self.entry(entry)[c:d], non_blocking=True)

    def store(self, found, expert, slot, entry):
        """Copy ``expert``'s rows from ``slot`` into ``entry``."""
        for (a, b), (c, d) in self._pairs(found, expert):
            self.entry(entry)[c:d].copy_(slot[a:b], non_blocking=True)

    @staticmethod
    def _pairs(found, expert):
        at = 0
        for offset, row in found.rows:
            yield (offset + expert * row, offset + (expert + 1) * row), (at, at + row)
            at += row


def _parameters(module) -> tuple:
    try:
        return tuple(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return ()


def outside(ranges, total: int) -> list:
    """The byte ranges of ``0..total`` that none of ``ranges`` (sorted, not overlapping) covers."""
    out, at = [], 0
    for a, b in ranges:
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < total:
        out.append((at, total))
    return out


def placed(extents, ranges) -> list:
    """The extents of the layout's byte ``ranges``, each landing at its own offset in the layout."""
    from .tiers import sub_extents
    return [(path, file_offset, nbytes, flat_offset + start)
            for start, end in ranges for path, file_offset, nbytes, flat_offset in sub_extents(extents, start, end)]
