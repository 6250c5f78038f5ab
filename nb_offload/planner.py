"""The plan: which tier each unit lives on, and the planner that makes it under budgets.

Tiers: ``gpu`` (resident on the CUDA device), ``cpu`` (host memory: streamed to the GPU when a
GPU computes, resident when the CPU computes) and ``disk`` (streamed). The planner reserves
room on the compute device for what a generate needs besides weights (KV cache at the planned
context and batch, activations, staging slots for streamed units, a workspace), so a plan
that validates does not run out of memory within its context length.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from . import experts, hybrid
from .budget import format_size
from .dtypes import SHORT_NAMES
from .errors import BudgetError, PinError
from .patterns import compile_pattern, match_units, segment_matcher
from .quant import FORMATS as QUANT_FORMATS
from .units import round_up

TIERS = ("gpu", "cpu", "disk")
WORKSPACE = 64 * 2**20        # cuBLAS workspace, allocator rounding, small temporaries
DEFAULT_CONTEXT = 2048
# split_blocks="auto" streams blocks as pieces (pieces.py) when whole-block staging slots would
# take more than this share of the budget left for weights (after the KV cache, activations and
# workspace reservations), or when only pieces fit. Pieces free that room for resident
# weights, but each costs a hook pair on the CPU, which shows when the step is compute-bound.
SPLIT_SHARE = 0.10


def resident_tier_of(device: str) -> str:
    """The tier that computes: the GPU's on CUDA, host memory's on the CPU device."""
    return "gpu" if device == "cuda" else "cpu"


@dataclass
class PlanEntry:
    name: str
    bytes: int
    tier: str
    pinned: bool
    kind: str = "block"
    aliases: tuple = ()
    fmt: str = ""                   # how its weights are stored: "bf16", "nf4", "int8" ...
    routed_bytes: int = 0           # streamed MoE block: what a batch-1 decode step reads of it (experts.py)
    experts: int = 0                # a MoE block's routed experts (experts.py), and how many a token uses
    top_k: int = 0
    expert_row_bytes: int = 0       # one routed expert's bytes, where a step brings them as routed
    compute: str = ""               # "cpu": a block in host memory the CPU computes, not streamed (hybrid.py);
    # "in place": in host memory, read there by the GPU as it computes (an embedding table: a row a token)

    def cpu_expert_bytes(self, share: float) -> int:
        """Bytes of routed experts a batch-1 decode step has the CPU compute at ``share`` (before the cache's
        hits), where this entry brings them as routed."""
        return int(share * self.top_k * self.expert_row_bytes) if self.routed_bytes else 0


@dataclass
class Plan:
    entries: list[PlanEntry]
    device: str                     # "cuda" or "cpu": where compute runs
    budgets: dict                   # tier -> bytes (None: no limit / no tier)
    reserved: dict                  # what the compute device holds besides resident weights
    host_reserved: dict = field(default_factory=dict)
    context: int = DEFAULT_CONTEXT
    batch: int = 1
    prefetch: int = 1
    model: str = ""
    split_blocks: bool = False      # streamed blocks travel as pieces (pieces.py)
    # routed experts the GPU doesn't hold that the CPU computes instead (cpu_experts.py): None (none),
    # a share, or "auto" (the CPU's rate over both rates, measured at load)
    expert_share: float | str | None = None
    # compute="hybrid" (hybrid.py): the rates in GB/s (cpu, link) the share of the blocks in host memory the
    # CPU computes was chosen from (``block_share``); None where the plan chose none. The most tokens a step
    # may have for them to compute on the CPU (larger ones bring them to the GPU), set by the loader.
    rates: tuple | None = None
    rates_reached: bool = False     # rates[0] is the rate the CPU's blocks reached decoding (a re-plan), not the load's
    # where rates[0] is the load's measure of a whole block's forward (block_rest.py): (the rate its products read
    # at, GB/s; the seconds its forward takes besides them), set by the loader
    cpu_rest: tuple | None = None
    cpu_max_tokens: int = 1
    slot_bytes: int = 0             # what a staging slot holds: the largest streamed unit, or piece where split
    # compute="hybrid": of the blocks in host memory the CPU could compute, the share it does, chosen at
    # ``rates``; None where the plan chose none
    block_share: float | None = None
    compute_choice: str = ""        # compute="auto": which of hybrid and all streamed the loader kept, and why
    # how the CPU multiplies one token's row (its blocks', its routed experts', on the CPU device every bf16
    # linear's), set by the loader: "fast" (nb_offload's own kernel, cpu_kernel="fast"), "amx" (nb_offload's AMX
    # kernel with F.linear's bits, cpu_amx.py, where it read fastest at load or on the CPU device and the CPU's
    # experts), "reordered" (copies of the weights reordered for oneDNN, cpu_products.py, where they read faster
    # than F.linear at load), else "F.linear" (or "" where the loader sets none)
    cpu_products: str = ""
    cpu_kernel_why_not: str = ""    # why cpu_kernel="fast" was asked for and the exact products compute instead

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, name):
        for e in self.entries:
            if e.name == name or name in e.aliases:
                return e
        raise KeyError(name)

    @property
    def resident_tier(self) -> str:
        return resident_tier_of(self.device)

    @property
    def streamed_tiers(self) -> tuple:
        return ("cpu", "disk") if self.device == "cuda" else ("disk",)

    def tier_of(self, name: str) -> str:
        """The tier of a unit (by any of its module names)."""
        try:
            return self[name].tier
        except KeyError:
            raise PinError(f"{name!r} is not a unit of this plan; units are e.g. "
                           f"{[e.name for e in self.entries[:3]]}.") from None

    def totals(self) -> dict:
        """Weight bytes per tier."""
        out = {t: 0 for t in TIERS}
        for e in self.entries:
            out[e.tier] += e.bytes
        return out

    def used(self) -> dict:
        """Bytes charged to each tier's budget: weights plus reservations."""
        out = self.totals()
        out[self.resident_tier] += sum(self.reserved.values())
        out["cpu"] += sum(self.host_reserved.values())
        return out

    def share_on_cpu(self, link_gbps: float = 25.0, cpu_gbps: float | None = None) -> float:
        """The share of the routed experts a step misses that the CPU computes: ``expert_share``, or for
        "auto" the CPU's rate over both (0 without one)."""
        if self.expert_share == "auto":
            return hybrid.cpu_share(cpu_gbps, link_gbps)
        return float(self.expert_share or 0.0)

    def cpu_bytes_per_token(self, share: float | None = None) -> int:
        """Bytes a batch-1 decode step has the CPU compute from host memory: its blocks (``compute="cpu"``)
        and routed experts (at ``share``, else the plan's own, before the expert cache's hits)."""
        share = self.share_on_cpu() if share is None else share
        return sum(e.bytes if e.compute == "cpu" else e.cpu_expert_bytes(share) for e in self.entries)

    def streamed_bytes_per_token(self, share: float | None = None) -> dict:
        """Bytes a batch-1 decode step moves to the compute device, by source tier (a MoE block that reads
        only its routed experts counts what it reads, less what the CPU computes at ``share``)."""
        share = self.share_on_cpu() if share is None else share
        return {t: sum(e.routed_bytes - e.cpu_expert_bytes(share) if e.routed_bytes else e.bytes
                       for e in self.entries if e.tier == t and not e.compute) for t in self.streamed_tiers}

    def predicted_seconds_per_step(self, link_gbps: float = 25.0, disk_gbps: float = 1.0,
                                   cpu_gbps: float | None = None) -> float:
        """A lower bound on a decode step's time from the bytes it streams, and from those the CPU computes
        experts from (at ``cpu_gbps``; both at once, so the longer counts); other compute not counted. With
        blocks the CPU computes, the step as their turns with the streamed units run (``hybrid.step_seconds``:
        the link copies ahead only as far as the staging slots let it)."""
        share = self.share_on_cpu(link_gbps, cpu_gbps)
        moved = self.streamed_bytes_per_token(share)
        if self.device != "cuda":
            return moved.get("disk", 0) / (disk_gbps * 1e9)
        link = moved.get("cpu", 0) / (link_gbps * 1e9) + moved.get("disk", 0) / (disk_gbps * 1e9)
        on_cpu = self.cpu_bytes_per_token(share)
        bound = max(link, on_cpu / (cpu_gbps * 1e9)) if on_cpu and cpu_gbps else link
        if cpu_gbps and any(e.compute == "cpu" for e in self.entries):
            return max(bound, hybrid.decode_step_seconds(step_order(self.entries, share), cpu_gbps, link_gbps,
                                                         self.prefetch, self.slot_bytes, disk_gbps=disk_gbps,
                                                         graphs="decode_graph" in self.reserved))
        return bound

    def to_dict(self) -> dict:
        return {
            "model": self.model, "device": self.device, "context": self.context, "batch": self.batch,
            "prefetch": self.prefetch, "split_blocks": self.split_blocks, "budgets": self.budgets,
            "reserved": self.reserved,
            "host_reserved": self.host_reserved,
            "entries": [{"name": e.name, "bytes": e.bytes, "tier": e.tier, "pinned": e.pinned,
                         "kind": e.kind, "aliases": list(e.aliases), "format": e.fmt, "compute": e.compute}
                        for e in self.entries],
        }

    # The renderings live in views.py (imported here on use: the core does not render).
    def __str__(self):
        from .views import plan_text
        return plan_text(self)

    def _repr_pretty_(self, p, cycle):
        from .views import plan_text
        p.text(plan_text(self))

    def __repr__(self):
        totals = ", ".join(f"{t}={format_size(v)}" for t, v in self.totals().items() if v)
        return f"<Plan {len(self.entries)} units on {self.device}: {totals}>"

    def _repr_html_(self):
        from .views import plan_html
        return plan_html(self)


def text_config(config):
    """The config of a model's language part (a multimodal config nests it), or the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def footprint(config, dtype_size: int, context: int, batch: int, device: str) -> dict:
    """Bytes a generate needs on the compute device besides weights, at this context and batch."""
    cfg = text_config(config)
    layers = getattr(cfg, "num_hidden_layers", 1)
    heads = getattr(cfg, "num_attention_heads", 1)
    hidden = getattr(cfg, "hidden_size", 0)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // max(heads, 1)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden
    top_k = getattr(cfg, "num_experts_per_tok", 1) or 1
    moe_inter = getattr(cfg, "moe_intermediate_size", None) or inter
    vocab = getattr(cfg, "vocab_size", 0)
    tokens = context * batch
    kv = 2 * layers * kv_heads * head_dim * tokens * dtype_size
    # Per-layer live tensors during a full-context prefill: residual, normed input, q/k/v and
    # the repeated k/v of grouped-query attention, attention output, and the MLP's gate, up and
    # product (per routed expert for MoE); float32 logits and their softmax for the last token.
    per_token = (6 * hidden + 2 * heads * head_dim + 3 * max(inter, moe_inter * top_k)) * dtype_size
    activations = tokens * per_token + 2 * batch * vocab * 4
    if device == "cpu":  # the CPU's scaled-dot-product attention materialises the score matrix
        activations += batch * heads * context * context * 4
    return {"kv_cache": kv, "activations": activations, "workspace": WORKSPACE if device == "cuda" else 0}


def graph_pool(config, dtype_size: int, context: int, batch: int) -> int:
    """Bytes a captured decode step's private memory pool may hold (graphs.py): its live tensors at one token
    a sequence, attention scores over the whole static cache, the logits, twice over for the allocator's
    rounding, three of its 2 MiB segments, and cuBLAS's workspace for the capture stream. Reserved apart
    from ``activations``: the pool stays while the next prefill runs."""
    cfg = text_config(config)
    scores = batch * getattr(cfg, "num_attention_heads", 1) * context * 4
    live = footprint(config, dtype_size, 1, batch, "cuda")["activations"] + 2 * scores
    # tensors of 1 MiB or more come from 20 MiB segments of their own (PyTorch's caching allocator)
    inter = max(getattr(cfg, "intermediate_size", 0) or 0,
                (getattr(cfg, "moe_intermediate_size", 0) or 0) * (getattr(cfg, "num_experts_per_tok", 1) or 1))
    largest = batch * max(getattr(cfg, "vocab_size", 0) * 4, getattr(cfg, "num_attention_heads", 1) * context * 4,
                          inter * dtype_size)
    large = round_up(live, 20 * 2**20) if largest >= 2**20 else 0
    return 2 * live + large + 6 * 2**20 + CUBLAS_CAPTURE_WORKSPACE


# The first capture in a process gives cuBLAS a workspace for the capture stream, and takes it from the
# graph's pool: 32 MiB on Hopper (its default CUBLAS_WORKSPACE_CONFIG, 4096 KiB x 8). Measured on an H200:
# a first capture's pool 36 MiB, later ones 4 MiB (benchmarks/RESULTS.md, issue 14).
CUBLAS_CAPTURE_WORKSPACE = 32 << 20


@dataclass
class _Slots:
    """Staging slots on the compute device: ``count`` of them, each holding the largest streamed unit,
    or its largest piece when blocks stream split (their leftovers then stay resident)."""

    count: int
    split: bool = False

    def size(self, u) -> int:
        return u.stream_nbytes if self.split else u.nbytes

    def bytes(self, streamed) -> int:
        return (self.count * max((self.size(u) for u in streamed), default=0)
                + (sum(u.rest_nbytes for u in streamed) if self.split else 0))


def make_plan(units, *, device: str, budgets: dict, pins: dict, config, dtype_size: int,
              context: int = DEFAULT_CONTEXT, batch: int = 1, prefetch: int = 1, model_name: str = "",
              read_ahead: int = 2, policy: str = "auto", split_blocks="auto", library_code: int = 0,
              decode_graph: bool = False, expert_cache="auto", expert_pins=None, cpu_rates=None) -> Plan:
    """Place every unit on a tier: the compute device's first (``_choose_resident``), then, on CUDA,
    host memory and disk (``_place_on_host``); on the CPU everything else streams from disk.

    ``budgets``: tier -> bytes, None where the tier is absent (disk without a folder) or unbounded.
    ``pins``: unit index -> tier. ``library_code``: host memory the load's own imports took (charged
    to the cpu budget: on the CPU device with the other reservations, on CUDA to the host's).
    ``expert_cache``: bytes on the compute device for copies of routed experts (experts.ExpertCache), taken
    before the resident blocks are chosen, or "auto": what the plan leaves free (both only where MoE blocks
    stream as routed). ``expert_pins``: unit index -> experts kept in that cache (``resolve_expert_pins``);
    the cache holds at least them. ``cpu_rates``: (cpu, link) GB/s for ``compute="hybrid"`` on CUDA
    (hybrid.py): the CPU computes their share of the blocks in host memory; None for none. A pin of
    ``"cpu-compute"`` keeps a block in host memory, computed there, either way.
    """
    resident = resident_tier_of(device)
    on_cpu = {i for i, t in pins.items() if t == hybrid.CPU_COMPUTE}
    for i in on_cpu:
        if units[i].kind != "block" or units[i].quantized:
            raise PinError(f"{units[i].name!r} can't be pinned {hybrid.CPU_COMPUTE!r}: only blocks in the load "
                           "dtype are computed on the CPU; pin it \"cpu\" to keep it in host memory.")
    pins = {i: ("cpu" if t == hybrid.CPU_COMPUTE else t) for i, t in pins.items()}
    _check_pins(units, pins, device, budgets)
    reserved = footprint(config, dtype_size, context, batch, device)
    dequant = max((u.dequant_bytes for u in units), default=0)
    if device == "cuda" and dequant:     # a quantized forward's temporaries, one weight at a time (quant.py)
        reserved["dequant"] = dequant
    if device == "cpu" and library_code:
        reserved["library_code"] = library_code
    if device == "cuda" and decode_graph:   # the captured decode step's memory pool stays between generates
        reserved["decode_graph"] = graph_pool(config, dtype_size, context, batch)
    # (a prefill streams the blocks the CPU computes through the staging slots, which count every unit off
    # the compute device: they need no room of their own)
    cap = budgets[resident]
    experts_apart = any(u.expert_row_nbytes for u in units)
    expert_pins = expert_pins or {}
    pinned = sum(len(expert_pins.get(u.index, ())) * u.expert_row_nbytes for u in units)
    if experts_apart and (expert_cache not in ("auto", 0) or pinned):
        reserved["expert_cache"] = max(pinned, 0 if expert_cache == "auto" else expert_cache)
    # Two choices that give the compute device's room to what streams, where the model doesn't fit (on CUDA):
    # an embedding table stays in host memory, the GPU reading the rows it needs there (a row a token, a few
    # KiB a decode step); and with the expert cache "auto", MoE blocks aren't kept for their experts
    # (``_choose_resident``). Each streams more from host memory, so they are kept only where the host's
    # budget takes it: no more bytes on disk than the plan without them, and no error where it has none.
    in_place = {u.index for u in units if device == "cuda" and u.rows_only and not u.quantized
                and u.index not in pins and cap is not None
                and sum(v.nbytes for v in units) + sum(reserved.values()) > cap}
    to_cache = device == "cuda" and experts_apart and expert_cache == "auto"

    def place(in_place, to_cache):
        held = dict(reserved)
        here = [u for u in units if u.index not in in_place]
        on_res, slots = _choose_resident(here, pins, resident, cap, held, _Slots(prefetch + 1), split_blocks, policy,
                                         context, experts_to_cache=to_cache)
        stream = [u for u in here if u.index not in on_res]
        held["staging_slots"] = slots.bytes(stream)
        tiers = {u.index: resident for u in units if u.index in on_res}
        if device == "cuda":
            host = _place_on_host(stream + [u for u in units if u.index in in_place],
                                  {**pins, **dict.fromkeys(in_place, "cpu")}, budgets, library_code, read_ahead, slots,
                                  policy, tiers)
        else:
            host = {}
            if stream and budgets.get("disk") is None:
                need = sum(held.values()) - held["staging_slots"] + sum(u.nbytes for u in units)
                raise BudgetError(
                    f"cpu={format_size(cap)} can't hold this model: it needs {format_size(need)} with everything "
                    f"in memory at context {context}; give cpu= at least {format_size(need)}, or a disk= folder "
                    "to stream blocks from.")
            tiers.update((u.index, "disk") for u in stream)
        on_disk = sum(u.nbytes for u in units if tiers[u.index] == "disk")
        return in_place, slots, held, tiers, host, on_disk

    # the first of these (both choices, either, neither) with the fewest bytes on disk; an error only where all fail
    chosen, error = None, None
    for choice in dict.fromkeys([(frozenset(in_place), to_cache), (frozenset(in_place), False),
                                 (frozenset(), to_cache), (frozenset(), False)]):
        try:
            tried = place(*choice)
        except BudgetError as exc:
            error = error or exc
            continue
        if chosen is None or tried[-1] < chosen[-1]:
            chosen = tried
        if not chosen[-1]:
            break
    if chosen is None:
        raise error
    in_place, slots, reserved, tiers, host_reserved, _ = chosen
    # MoE blocks bring only their routed experts where the engine does so (experts.py): streamed from disk
    # on the CPU, from host memory on CUDA
    routed_tier = experts.routed_tier(device == "cuda")
    entries = [PlanEntry(name=u.name, bytes=u.nbytes, tier=tiers[u.index], pinned=u.index in pins,
                         kind=u.kind, aliases=tuple(u.modules), fmt=u.fmt,
                         routed_bytes=0 if tiers[u.index] != routed_tier
                         else u.routed_split_nbytes if slots.split and u.pieces else u.routed_nbytes,
                         experts=u.expert_count, top_k=u.top_k,
                         expert_row_bytes=u.expert_row_nbytes if tiers[u.index] == routed_tier else 0)
               for u in units]
    for u, e in zip(units, entries):
        if u.index in in_place:
            e.compute = "in place"
    streamed = [u for u in units if tiers[u.index] != resident and u.index not in in_place]
    slot_bytes = max((slots.size(u) for u in streamed), default=0)
    chose = _computed_on_cpu(units, entries, on_cpu, cpu_rates, device, prefetch, slot_bytes, decode_graph)
    if experts_apart:
        _size_expert_cache(units, entries, reserved, budgets[resident], resident, expert_cache, expert_pins)
    return Plan(entries=entries, device=device, budgets=dict(budgets), reserved=reserved,
                host_reserved=host_reserved, context=context, batch=batch, prefetch=prefetch, model=model_name,
                split_blocks=slots.split, rates=tuple(cpu_rates) if chose is not None else None,
                slot_bytes=slot_bytes, block_share=chose)


def step_order(entries, share: float = 0.0) -> list:
    """[(where, bytes)] of a batch-1 decode step's units in run order, for ``hybrid.step_seconds``: "gpu"
    (resident, or read in place: a block's bytes, which the GPU computes; other units' taken as none), "cpu"
    (a block the CPU computes), "stream" or "disk" (the bytes it brings: a MoE block's routed experts, less
    the CPU's ``share`` of them)."""
    order = []
    for e in entries:
        if e.compute == "cpu":
            order.append(("cpu", e.bytes))
        elif e.tier in ("cpu", "disk") and e.compute != "in place":
            brings = e.routed_bytes - e.cpu_expert_bytes(share) if e.routed_bytes else e.bytes
            order.append(("stream" if e.tier == "cpu" else "disk", brings))
        else:
            order.append(("gpu", e.bytes if e.kind == "block" and e.compute != "in place" else 0))
    return order


def _computed_on_cpu(units, entries, pinned, rates, device, prefetch, slot_bytes, graphs=True):
    """Mark the blocks the CPU computes on CUDA (hybrid.py): those pinned ``"cpu-compute"``, and with
    ``rates`` (cpu, link GB/s) a share of the other blocks in host memory, spread between the streamed
    ones: the share whose step ``hybrid.step_seconds`` finds shortest with ``prefetch`` pieces of
    ``slot_bytes`` copied ahead. Quantized blocks and those with routed experts stream. Returns the share
    chosen by ``rates``, or None where it chose none."""
    if device != "cuda":
        return None         # the CPU device computes everything on the CPU
    for u, e in zip(units, entries):
        if u.index in pinned:
            e.compute, e.routed_bytes, e.expert_row_bytes = "cpu", 0, 0     # whole, where its bytes are
    if rates is None:
        return None
    candidates = [e for u, e in zip(units, entries) if e.tier == "cpu" and e.kind == "block" and not e.compute
                  and not e.routed_bytes and not u.quantized]

    def mark(chosen):
        ids = {id(e) for e in chosen}
        for e in candidates:
            e.compute = "cpu" if id(e) in ids else ""

    def step_with(chosen):
        mark(chosen)
        return hybrid.decode_step_seconds(step_order(entries), rates[0], rates[1], prefetch, slot_bytes,
                                          graphs=graphs)
    chosen = hybrid.fastest_split(candidates, step_with)
    mark(chosen)
    return len(chosen) / len(candidates) if candidates else 0.0


AUTO_CACHE_SHARE = 0.9      # "auto" keeps a tenth of the free room free: the allocator rounds up


def _size_expert_cache(units, entries, reserved, budget, resident, asked, expert_pins):
    """Size the expert cache (on the compute device) in whole experts, at most every expert of the blocks
    streamed as routed, at least those pinned of them; none where no block is streamed as routed."""
    routed = [u for u, e in zip(units, entries) if e.routed_bytes]
    row = max((u.expert_row_nbytes for u in routed), default=0)
    if asked == "auto" and row and budget is not None:
        weights = sum(e.bytes for e in entries if e.tier == resident)
        free = max(0, budget - weights - sum(reserved.values()))
        asked = reserved.get("expert_cache", 0) + int(AUTO_CACHE_SHARE * free)
    useful = sum(u.expert_row_nbytes * u.expert_count for u in routed)
    pinned = sum(len(expert_pins.get(u.index, ())) for u in routed) * row
    size = max(pinned, (min(asked, useful) // row) * row) if row and asked != "auto" else 0
    if size:
        reserved["expert_cache"] = size
    else:
        reserved.pop("expert_cache", None)


def _check_pins(units, pins, device, budgets):
    resident = resident_tier_of(device)
    allowed = (resident, "cpu", "disk") if device == "cuda" else ("cpu", "disk")
    for idx, tier in pins.items():
        u = units[idx]
        if tier not in allowed:
            raise PinError(f"tier {tier!r} for {u.name!r} is not available here (compute on {device}); "
                           f"accepted: {', '.join(allowed)}.")
        if tier == "disk" and budgets.get("disk") is None:
            raise PinError(f"{u.name!r} can't be pinned to disk: this model was loaded without a disk "
                           "folder; load with disk=\"./offload\" to enable the disk tier.")
        if tier != resident and u.resident_only:
            raise PinError(f"{u.name!r} holds weights used outside any block, so it must stay on {resident}.")


def _choose_resident(units, pins, resident, cap, reserved, slots, split_blocks, policy, context,
                     experts_to_cache=False):
    """The units kept on the compute device within ``cap`` (counting ``reserved`` and the staging slots
    the rest need), and the slots: split into pieces or not (``split_blocks``).

    ``experts_to_cache``: where blocks stream split, a MoE block whose experts come apart isn't kept for
    them (unless pinned), while the room left would not hold every streamed expert anyway: its other
    weights stay on the device as any streamed piece's leftovers, and the room its experts would take goes
    to the expert cache ("auto"), which keeps the experts routed most often of every block. A kept block's
    experts are found by its own router only, 2 of 8 a step for Mixtral, as any cache entry is under
    uniform routing; the cache's are the most often routed. On the Mixtral shape at ``gpu=3GiB``, a routing
    trace of random weights replayed: 15.2 experts over the link a step with a block kept, 12.8 with its
    room cached. A prefill takes the cached experts from the cache too (engine.py).
    """
    fixed = sum(reserved.values())
    must = [u for u in units if pins.get(u.index) == resident or u.resident_only]
    free = [u for u in units if u.index not in pins and not u.resident_only]
    # Top-level units first (streaming a 2 GiB embedding for a few rows wastes the link), then
    # blocks in the order they run.
    candidates = [u for u in free if u.kind == "top"] + [u for u in free if u.kind == "block"]
    streamable = [u for u in units if not u.resident_only and pins.get(u.index) != resident]
    on_res = {u.index for u in must}
    used = fixed + sum(u.nbytes for u in must)
    # The least this needs: everything streams, or the top-level units stay (they may be larger
    # than a block's largest piece, so keeping them can need less room than their slots).
    tops = [u for u in streamable if u.kind == "top"]

    def minimum():
        return min(used + slots.bytes(streamable),
                   used + sum(u.nbytes for u in tops) + slots.bytes([u for u in streamable if u.kind != "top"]))

    everything = fixed + sum(u.nbytes for u in units)
    if any(u.pieces for u in streamable) and split_blocks is not False:
        # "auto": split where whole-block slots would take a large share of the budget, or
        # where only pieces fit at all
        slots.split = (split_blocks is True or slots.bytes(streamable) > SPLIT_SHARE * (cap - fixed)
                       or (minimum() > cap and everything > cap))
        if slots.split and split_blocks == "auto" and minimum() > cap:
            # the pieces' leftovers, kept on the device, need more room than whole-block slots would
            # (a MoE block streams its routed experts alone: pieces.py)
            slots.split = False
            if minimum() > cap:     # neither fits: the message counts the pieces' room
                slots.split = True
    min_needed = minimum()
    if experts_to_cache and slots.split and everything > cap:
        candidates = [u for u in candidates if not (u.kind == "block" and u.expert_row_nbytes and u.pieces)]
        free = [u for u in free if not (u.kind == "block" and u.expert_row_nbytes and u.pieces)]

    def too_small():
        return BudgetError(_too_small(resident, cap, min_needed, reserved, slots, streamable, context, must))
    if everything > cap and min_needed > cap:
        raise too_small()
    if everything > cap and used + slots.bytes(streamable) > cap:
        # only the second way fits: keep the free top-level units, all at once
        for u in tops:
            if u.index not in pins:
                on_res.add(u.index)
                used += u.nbytes
    # every free unit, where they all fit: one at a time below, the slots the last ones' rest would need can
    # leave a model that fits streaming blocks (a LLaMA-7B shape at 14 GiB streamed two)
    pinned_off = [v for v in streamable if v.index not in on_res and v.index in pins]
    left = sum(u.nbytes for u in candidates if u.index not in on_res)
    if used + left + slots.bytes(pinned_off) <= cap:
        on_res |= {u.index for u in candidates}
        used += left
    for u in candidates:
        if u.index in on_res:
            continue
        rest = [v for v in streamable if v.index not in on_res and v.index != u.index]
        if used + u.nbytes + slots.bytes(rest) <= cap:
            on_res.add(u.index)
            used += u.nbytes
    if policy == "auto":
        on_res = _spread(units, free, on_res, cap - fixed, slots.bytes)
    stream = [u for u in units if u.index not in on_res]
    if everything > cap and fixed + sum(u.nbytes for u in units if u.index in on_res) + slots.bytes(stream) > cap:
        reserved["staging_slots"] = slots.bytes(stream)      # for the message
        raise too_small()
    if experts_to_cache and slots.split and everything > cap:
        room = cap - fixed - sum(u.nbytes for u in units if u.index in on_res) - slots.bytes(stream)
        if AUTO_CACHE_SHARE * room >= sum(u.expert_row_nbytes * u.expert_count for u in stream):
            # the cache would keep every streamed expert: blocks kept whole need no copies at all
            return _choose_resident(units, pins, resident, cap, reserved, _Slots(slots.count), split_blocks,
                                    policy, context)
    return on_res, slots


def _place_on_host(stream, pins, budgets, library_code, read_ahead, slots, policy, tiers) -> dict:
    """On CUDA, the streamed units' tiers (into ``tiers``): as many in host memory as the cpu budget
    holds beside the page-locked staging that disk units need there, the rest on disk. Returns the
    host memory reserved besides weights."""
    host_reserved = {"library_code": library_code} if library_code else {}
    cpu_cap = budgets["cpu"] - library_code
    to_disk = [u for u in stream if pins.get(u.index) == "disk"]
    to_cpu = [u for u in stream if pins.get(u.index) == "cpu"]
    loose = [u for u in stream if u.index not in pins]
    cpu_used = sum(u.nbytes for u in to_cpu)
    disk_on = budgets.get("disk") is not None

    def host_staging(disk_units):
        # read_ahead blocks' worth: with pieces, read_ahead buffers per piece of a block
        per_block = max((len(u.pieces) for u in disk_units), default=1) if slots.split else 1
        return read_ahead * per_block * max((slots.size(u) for u in disk_units), default=0)

    # The first k loose units go to cpu, the rest to disk: the largest k that fits, counting
    # the page-locked staging buffers that disk units need in host memory.
    best = None
    for k in range(len(loose), -1, -1):
        rest = loose[k:]
        if rest and not disk_on:
            continue
        staging = host_staging(rest + to_disk) if (rest or to_disk) else 0
        if cpu_used + sum(u.nbytes for u in loose[:k]) + staging <= cpu_cap:
            best = k
            break
    if best is None:
        need = sum(v.nbytes for v in stream if pins.get(v.index) != "disk")
        if not disk_on:
            raise BudgetError(
                f"cpu={format_size(cpu_cap)} can't hold the {format_size(need)} of weights that don't fit "
                f"on the GPU (gpu={format_size(budgets['gpu'])}); give cpu= at least {format_size(need)}, "
                "a larger gpu budget, or a disk= folder for the rest.")
        best = 0
    on_disk = set(range(best, len(loose)))
    if policy == "auto" and 0 < best < len(loose):
        # Space the disk units out among the cpu ones: the drive then reads all step long,
        # while the link copies cpu units, instead of idling through a run of cpu units.
        spaced = _evenly_spaced(len(loose), len(loose) - best)
        if spaced is not None:
            spread_cpu = sum(u.nbytes for i, u in enumerate(loose) if i not in spaced)
            spread_staging = host_staging([u for i, u in enumerate(loose) if i in spaced] + to_disk)
            if cpu_used + spread_cpu + spread_staging <= cpu_cap:
                on_disk = spaced
    for i, u in enumerate(loose):
        tiers[u.index] = "disk" if i in on_disk else "cpu"
    cpu_used += sum(u.nbytes for i, u in enumerate(loose) if i not in on_disk)
    tiers.update((u.index, "cpu") for u in to_cpu)
    tiers.update((u.index, "disk") for u in to_disk)
    disk_units = [u for u in stream if tiers[u.index] == "disk"]
    if disk_units:
        host_reserved["disk_staging"] = host_staging(disk_units)
    if cpu_used + host_reserved.get("disk_staging", 0) > cpu_cap:
        raise BudgetError(
            f"cpu={format_size(cpu_cap)} is below the "
            f"{format_size(cpu_used + host_reserved.get('disk_staging', 0))} "
            "that the units pinned to cpu and the disk staging buffers need; raise cpu= or pin fewer units to cpu.")
    return host_reserved


def _evenly_spaced(n: int, k: int) -> set | None:
    """``k`` of the positions ``0..n-1``, spread evenly (None where they would collide)."""
    picks = {min(n - 1, int((i + 0.5) * n / k)) for i in range(k)}
    return picks if len(picks) == k else None


def _spread(units, free, on_res, room, slot_bytes):
    """Stream evenly spaced blocks instead of the last ones (policy "auto").

    Each streamed block's copy then overlaps the compute of the resident blocks before it, so
    the link stays busy through the step; streaming only the last blocks leaves it idle while
    the resident ones compute. Kept only if it fits the same budget.
    """
    free_blocks = [u for u in free if u.kind == "block"]
    streamed = [u for u in free_blocks if u.index not in on_res]
    if not streamed or len(streamed) == len(free_blocks):
        return on_res
    positions = _evenly_spaced(len(free_blocks), len(streamed))
    if positions is None:
        return on_res
    picks = {free_blocks[i].index for i in positions}
    spread = (on_res - {u.index for u in free_blocks}) | {u.index for u in free_blocks if u.index not in picks}
    out = [u for u in units if u.index not in spread]
    weights = sum(u.nbytes for u in units if u.index in spread)
    if weights + slot_bytes(out) <= room:
        return spread
    return on_res


def _too_small(tier, cap, need, reserved, slots, streamable, context, must):
    parts = [f"{k.replace('_', ' ')} {format_size(v)}" for k, v in reserved.items() if v]
    if streamable:
        parts.append(f"{slots.count} staging slots of {format_size(max(slots.size(u) for u in streamable))}")
    if must:
        parts.append(f"units kept on {tier} {format_size(sum(u.nbytes for u in must))}")
    return (f"{tier}={format_size(cap)} is below the minimum {format_size(need)} this model needs on the "
            f"compute device at context {context} ({', '.join(parts)}); give {tier}= at least "
            f"{format_size(need)}, or a shorter context.")


def resolve_pins(pins, units) -> dict:
    """Turn ``{pattern: pin}`` into ``{unit index: tier}`` for the pins that name a tier, checking every
    pattern and value (see ``split_pin``)."""
    return _resolved(pins, units, 0)


def pin_formats(pins, units) -> dict:
    """``{unit index: format}`` for the pins that name a format ("bf16", "nf4" ...)."""
    return _resolved(pins, units, 1)


def _resolved(pins, units, part: int) -> dict:
    """``{unit index: part of its pin}`` (0: the tier, 1: the format) where the pin names that part."""
    if not pins:
        return {}
    if not isinstance(pins, Mapping):
        raise PinError(f"pins={pins!r} is not a mapping; give a dict such as {{\"model.layers.0-3\": \"gpu\"}}.")
    out = {}
    for pattern, value in pins.items():
        named = split_pin(value)[part]
        if is_expert_pattern(pattern):      # single experts: resolve_expert_pins
            continue
        for u in match_units(pattern, units):
            if named is not None:
                out[u.index] = named
    return out


def is_expert_pattern(pattern) -> bool:
    """Whether a pin pattern names single routed experts of MoE blocks: ``model.layers.3.mlp.experts.5``,
    ``model.layers.*.mlp.experts.0-3`` (an index, a range or a glob after an ``experts`` module)."""
    segs = pattern.strip().split(".") if isinstance(pattern, str) else []
    return len(segs) >= 3 and segs[-2] == "experts"


def resolve_expert_pins(pins, units, device: str) -> dict:
    """``{unit index: frozenset of experts}`` for the pins that name single experts (``is_expert_pattern``):
    kept on the compute device, in the expert cache, for as long as the pin stands. Only the tier of the
    compute device (``device``: "cuda" or "cpu") is accepted for them: an expert that isn't kept comes with
    its block."""
    resident = resident_tier_of(device)
    out = {}
    for pattern, value in (pins or {}).items():
        if not is_expert_pattern(pattern):
            continue
        tier, fmt = split_pin(value)
        if tier != resident or fmt is not None:
            raise PinError(f"pin {value!r} for {pattern!r}: single experts are kept on the compute device "
                           f"({resident!r}), in the expert cache, or come with their block; pin them {resident!r}, "
                           "or pin their block to move them.")
        prefix, last = pattern.strip().rsplit(".", 1)
        module, pick = compile_pattern(prefix), segment_matcher(last, pattern)
        depth = len(prefix.split("."))
        found = [u for u in units if u.expert_count and len(u.experts_module.split(".")) == depth
                 and module(u.experts_module)]
        if not found:
            named = [u.experts_module for u in units if u.expert_count]
            raise PinError(f"pin pattern {pattern!r} names no experts module of this model"
                           + (f"; its MoE blocks' are e.g. {named[0]!r}." if named else ": it has no MoE blocks."))
        for u in found:
            chosen = frozenset(e for e in range(u.expert_count) if pick(str(e)))
            if not chosen:
                raise PinError(f"pin pattern {pattern!r} names no expert of {u.experts_module!r}, which has "
                               f"experts 0-{u.expert_count - 1}.")
            out[u.index] = out.get(u.index, frozenset()) | chosen
    return out


# A pin names a tier, a format, or both ("gpu:bf16"): the format keeps a unit unquantized (in the
# load dtype) or says it is quantized; formats are chosen at load.
PLAIN_FORMATS = {**{short: short for short in SHORT_NAMES.values()}, **SHORT_NAMES}   # "bfloat16" -> "bf16" too
PIN_FORMS = (f"a tier ({', '.join(TIERS)}, or {hybrid.CPU_COMPUTE}: in host memory, computed by the CPU), "
             f"a format ({', '.join(QUANT_FORMATS + tuple(SHORT_NAMES.values()))}) or both, e.g. \"gpu:bf16\"")


def split_pin(value) -> tuple:
    """``(tier or None, format or None)`` of a pin: "gpu", "nf4", "gpu:bf16" (also "bf16:gpu")."""
    if not isinstance(value, str) or not value.strip():
        raise PinError(f"pin {value!r} is unknown; accepted: {PIN_FORMS}.")
    tier = fmt = None
    for part in value.strip().lower().split(":"):
        part = part.strip()
        if (part in TIERS or part == hybrid.CPU_COMPUTE) and tier is None:
            tier = part
        elif part in QUANT_FORMATS and fmt is None:
            fmt = part
        elif part in PLAIN_FORMATS and fmt is None:
            fmt = PLAIN_FORMATS[part]
        else:
            which = "tier" if ":" not in value else "pin"
            raise PinError(f"{which} {value!r} is unknown; accepted: {PIN_FORMS}.")
    return tier, fmt


def canonical_pin(value) -> str:
    tier, fmt = split_pin(value)
    return ":".join(p for p in (tier, fmt) if p)

