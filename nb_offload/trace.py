"""Cheap records of every disk read, host-to-device copy and compute, and the run's stats.

The engine appends raw records; CUDA records hold events that are resolved into times only
after a step ends (no synchronize on the hot path). Resolved events go into a bounded ring and
are handed to observers in batches, once a step.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .errors import OffloadError

LANES = ("read", "copy", "compute", "step")
# Lanes shown only where a model has such events: the CPU's work on routed experts (cpu_experts.py).
CPU_LANE = "cpu"
ALL_LANES = LANES + (CPU_LANE,)
IDLE = 0.25     # seconds with no event in any lane that end a run (a generate, a cell)


def split_runs(events, idle: float = IDLE) -> list:
    """``events`` grouped into runs separated by more than ``idle`` seconds of nothing."""
    runs, end = [], None
    for e in sorted(events, key=lambda e: e.start):
        if end is None or e.start - end > idle:
            runs.append([])
            end = e.end
        runs[-1].append(e)
        end = max(end, e.end)
    return runs


def choose_runs(runs: list, which) -> list:
    """The runs to show: ``which`` is "last", "all", or a count of the latest."""
    if which == "last":
        return runs[-1:]
    if which == "all":
        return runs
    if isinstance(which, int) and not isinstance(which, bool) and which > 0:
        return runs[-which:]
    raise OffloadError(f"runs={which!r} is not valid; accepted: \"last\", \"all\", or a count of the latest runs.")


def lane_totals(events) -> dict:
    """Totals per lane: count, bytes and busy seconds (every lane of LANES, and any other kind seen)."""
    out = {k: {"count": 0, "bytes": 0, "seconds": 0.0} for k in LANES}
    for e in events:
        lane = out.setdefault(e.kind, {"count": 0, "bytes": 0, "seconds": 0.0})
        lane["count"] += 1
        lane["bytes"] += e.bytes
        lane["seconds"] += e.duration
    return out


def collapse_idle(runs, gap_share: float = 0.02):
    """The events of ``runs`` on one time axis with the idle time between runs cut to a short gap
    (``gap_share`` of the busy time): a list of ``(event, start, end)`` in seconds from the first run's
    start, and the positions where runs were joined."""
    busy = sum(max(e.end for e in run) - min(e.start for e in run) for run in runs) or 1e-9
    gap = gap_share * busy
    out, joins, offset = [], [], 0.0
    for i, run in enumerate(runs):
        t0, t1 = min(e.start for e in run), max(e.end for e in run)
        if i:
            offset += gap
            joins.append(offset - gap / 2)
        out += [(e, offset + e.start - t0, offset + e.end - t0) for e in run]
        offset += t1 - t0
    return out, joins


@dataclass
class TraceEvent:
    kind: str          # "read", "copy", "compute" (one unit) or "step" (one whole forward pass)
    unit: str
    start: float       # seconds, on the trace's clock (time.perf_counter based)
    end: float
    bytes: int = 0
    step: int = 0

    @property
    def duration(self) -> float:
        return self.end - self.start


class Trace:
    """A bounded ring of resolved events plus the pending CUDA records of the current step."""

    def __init__(self, capacity: int = 100_000, enabled: bool = True, detail: str = "streamed"):
        self.enabled = enabled
        # "streamed": compute events for streamed units and one "step" event per forward pass,
        # so resident units pay no hook at all; "full": a compute event for every unit.
        self.detail = detail
        self.events: deque[TraceEvent] = deque(maxlen=capacity)
        self._pending: list = []        # (kind, unit, start_event, end_event, bytes, step)
        self._host: list = []           # TraceEvents recorded by other threads
        self._lock = threading.Lock()
        self._observers: list = []
        self._origin_event = None       # CUDA event matched to _origin_time
        self._origin_time = 0.0
        self._captured = None           # while a step is captured (graphs.py): its records go here
        self.step = 0

    # -- recording (engine side) -------------------------------------------------------
    def host_event(self, kind, unit, start, end, nbytes=0):
        if self.enabled:
            with self._lock:
                self._host.append(TraceEvent(kind, unit, start, end, nbytes, self.step))

    def cuda_event(self, kind, unit, start_ev, end_ev, nbytes=0):
        if self.enabled:
            if self._captured is not None:
                self._captured.append((kind, unit, start_ev, end_ev, nbytes))
            else:
                self._pending.append((kind, unit, start_ev, end_ev, nbytes, self.step))

    @contextlib.contextmanager
    def capturing(self):
        """While a step is captured: its CUDA records are kept aside (the graph stamps their events on
        every replay; ``replay`` queues them once a replay), and nothing is resolved."""
        self._captured = []
        try:
            yield self._captured
        finally:
            self._captured = None

    def replay(self, records):
        self._pending += [(*rec, self.step) for rec in records]

    def calibrate(self, torch_cuda):
        """Tie CUDA event times to the host clock (one synchronize, at engine start)."""
        ev = torch_cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        self._origin_event, self._origin_time = ev, time.perf_counter()

    def flush(self, wait: bool = False, wait_for=()):
        """Resolve finished CUDA records, move everything into the ring, notify observers. ``wait``: every record
        resolved, waiting for those not done; ``wait_for`` (records): those waited for, the rest resolved where
        done (a replay overwrites only its own graph's stamps: the link's copies queued after the last replay
        need not have landed before the next is launched)."""
        if self._captured is not None:
            return
        batch = []
        keep = []
        waited = {id(rec[3]) for rec in wait_for}
        for rec in self._pending:
            kind, unit, s, e, nbytes, step = rec
            must = wait or id(e) in waited
            if not must and not e.query():
                keep.append(rec)
                continue
            if must:
                e.synchronize()
            t0 = self._origin_time + self._origin_event.elapsed_time(s) / 1e3
            t1 = self._origin_time + self._origin_event.elapsed_time(e) / 1e3
            batch.append(TraceEvent(kind, unit, t0, t1, nbytes, step))
        self._pending = keep
        with self._lock:
            batch.extend(self._host)
            self._host = []
        if batch:
            batch.sort(key=lambda ev: ev.start)
            self.events.extend(batch)
            for fn in list(self._observers):
                fn(batch)
        return batch

    # -- reading (user side) -----------------------------------------------------------
    def subscribe(self, callback):
        """Call ``callback(list_of_events)`` with each batch of new events; returns an unsubscribe function."""
        self._observers.append(callback)
        return lambda: self._observers.remove(callback) if callback in self._observers else None

    def clear(self):
        self.events.clear()

    def __len__(self):
        return len(self.events)

    def __iter__(self):
        return iter(list(self.events))

    def to_chrome_trace(self) -> dict:
        """The events as Chrome-trace JSON (open in chrome://tracing or Perfetto)."""
        evs = list(self.events)
        t0 = min((e.start for e in evs), default=0.0)
        lanes = {k: i for i, k in enumerate(ALL_LANES)}
        out = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": i, "args": {"name": k}}
               for k, i in lanes.items()]
        for e in evs:
            out.append({"name": e.unit, "cat": e.kind, "ph": "X", "pid": 1, "tid": lanes.get(e.kind, 3),
                        "ts": (e.start - t0) * 1e6, "dur": max(e.duration, 0) * 1e6,
                        "args": {"bytes": e.bytes, "step": e.step}})
        return {"traceEvents": out, "displayTimeUnit": "ms"}

    def export(self, path: str):
        with open(path, "w") as fh:
            json.dump(self.to_chrome_trace(), fh)
        return path

    def runs(self, idle: float = IDLE) -> list:
        """The events split into runs: a new run starts after ``idle`` seconds with nothing in any lane
        (the time a person spends between two cells). Each run is a list of events, by start."""
        return split_runs(list(self.events), idle)

    def summary(self) -> dict:
        """Totals per lane: count, bytes and busy seconds."""
        return lane_totals(self.events)


@dataclass
class Stats:
    """What the model has done since load (or the last ``reset``)."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    bytes_from_cpu: int = 0     # host-to-device copies
    bytes_from_disk: int = 0    # drive reads
    held_last: int = 0          # units held in spare room during the last generate (streamed or CPU blocks)
    graph_replays: int = 0      # decode steps run as a captured CUDA graph (graphs.py)
    graph_captures: int = 0
    capture_seconds: float = 0.0
    graph_pool_bytes: int = 0   # the largest captured graph's private memory pool
    graph_eager: str = ""       # why the last generate's decode ran eager, where it did
    graph_fused: str = ""       # what captured steps run as fused kernels ("65 norms, 32 MLPs, rotary"; fused.py)
    experts_read: int = 0       # routed experts of streamed MoE blocks read (experts.py), per block call
    experts_skipped: int = 0    # and those not routed, so not read
    route_wait_seconds: float = 0.0     # host time waiting for routers' choices (CUDA: copies start after)
    expert_hits: int = 0        # routed experts copied from the GPU expert cache, not over the link
    experts_on_cpu: int = 0     # routed experts the CPU computed from host memory instead (cpu_experts.py)
    bytes_on_cpu: int = 0       # their weights' bytes
    cpu_expert_seconds: float = 0.0     # the CPU's time computing them
    cpu_block_calls: int = 0            # blocks computed on the CPU where their bytes are (hybrid.py)
    cpu_block_bytes: int = 0
    cpu_block_seconds: float = 0.0
    cpu_decode_calls: int = 0           # of those, the calls of one token (a batch-1 decode step's)
    cpu_decode_bytes: int = 0
    cpu_decode_seconds: float = 0.0
    cpu_replayed_calls: int = 0         # of those, the calls of replayed (captured) steps, as the step model takes
    cpu_replayed_bytes: int = 0         # decode (the eager steps around a capture read slower)
    cpu_replayed_seconds: float = 0.0
    cpu_packed_linears: int = 0         # the CPU's blocks' linears computing from reordered copies (cpu_products.py)
    cpu_plain_linears: int = 0          # and those of a packable dtype left to F.linear (shape unmatched, no room)
    cpu_packed_bytes: int = 0           # host memory the copies take
    cpu_fast_linears: int = 0           # linears multiplying one row by nb_offload's kernel (cpu_kernel.py)
    cpu_amx_linears: int = 0            # and by nb_offload's AMX kernel, F.linear's bits (cpu_amx.py)
    kept_units: int = 0         # streamed units found in their slots, put there before the step (Schedule.kept)
    kept_bytes: int = 0         # and their bytes, neither copied nor read again
    primed_from_cpu: int = 0    # of bytes_from_cpu, those brought for the next prompt after a generate (Engine.prime)
    primed_from_disk: int = 0   # and of bytes_from_disk
    resets: int = 0                     # times ``reset`` was called
    load_seconds: float = 0.0   # nb_offload.load, from the call to the model ready
    load_bytes: int = 0         # the weights it placed
    # Host memory against the cpu= budget: the process's RssAnon + RssShmem (page-locked buffers
    # included) over what it held just before the load, now and at its highest, sampled after the
    # load and after every forward step.
    host_budget: int = 0
    host_before: int | None = None
    host_peak: int = 0
    _host_sampled: float = field(default=0.0, repr=False)

    def reset(self):
        self.steps = self.tokens = self.bytes_from_cpu = self.bytes_from_disk = self.held_last = 0
        self.graph_replays = self.graph_captures = self.experts_read = self.experts_skipped = 0
        self.expert_hits = self.experts_on_cpu = self.bytes_on_cpu = 0
        self.seconds = self.capture_seconds = self.route_wait_seconds = self.cpu_expert_seconds = 0.0
        self.cpu_block_seconds = self.cpu_decode_seconds = self.cpu_replayed_seconds = 0.0
        self.cpu_block_calls = self.cpu_block_bytes = self.cpu_decode_calls = self.cpu_decode_bytes = 0
        self.cpu_replayed_calls = self.cpu_replayed_bytes = 0
        self.kept_units = self.kept_bytes = self.primed_from_cpu = self.primed_from_disk = 0
        self.resets += 1
        self.host_peak = self.host_now

    @property
    def host_now(self) -> int:
        """Host memory held over the pre-load figure, now (0 where the platform doesn't say, or where
        the process has since freed more than the load took)."""
        from .budget import process_memory
        now = process_memory()
        held = 0 if now is None or self.host_before is None else max(0, now - self.host_before)
        self.host_peak = max(self.host_peak, held)      # so "at most" is never below "now"
        return held

    def sample_host(self, every: float = 0.0):
        """Note host memory, if ``every`` seconds have passed since the last note (a step samples
        every 50 ms: reading the figure costs tens of microseconds)."""
        now = time.monotonic()
        if now - self._host_sampled >= every:
            self._host_sampled = now
            self.host_peak = max(self.host_peak, self.host_now)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def streamed_gbps(self) -> float:
        """Bytes brought to the compute device per second of generation, in GB/s."""
        return (self.bytes_from_cpu + self.bytes_from_disk) / self.seconds / 1e9 if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_second": self.tokens_per_second, "bytes_from_cpu": self.bytes_from_cpu,
                "bytes_from_disk": self.bytes_from_disk, "streamed_gbps": self.streamed_gbps,
                "held_last": self.held_last, "graph_replays": self.graph_replays,
                "graph_captures": self.graph_captures, "capture_seconds": self.capture_seconds,
                "graph_pool_bytes": self.graph_pool_bytes, "graph_eager": self.graph_eager,
                "graph_fused": self.graph_fused,
                "experts_read": self.experts_read, "experts_skipped": self.experts_skipped,
                "route_wait_seconds": self.route_wait_seconds, "expert_hits": self.expert_hits,
                "experts_on_cpu": self.experts_on_cpu, "bytes_on_cpu": self.bytes_on_cpu,
                "cpu_expert_seconds": self.cpu_expert_seconds, "cpu_block_seconds": self.cpu_block_seconds,
                "cpu_block_calls": self.cpu_block_calls, "cpu_block_bytes": self.cpu_block_bytes,
                "cpu_decode_calls": self.cpu_decode_calls, "cpu_decode_bytes": self.cpu_decode_bytes,
                "cpu_decode_seconds": self.cpu_decode_seconds, "cpu_replayed_calls": self.cpu_replayed_calls,
                "cpu_replayed_bytes": self.cpu_replayed_bytes, "cpu_replayed_seconds": self.cpu_replayed_seconds,
                "cpu_packed_linears": self.cpu_packed_linears,
                "cpu_plain_linears": self.cpu_plain_linears, "cpu_packed_bytes": self.cpu_packed_bytes,
                "cpu_fast_linears": self.cpu_fast_linears, "cpu_amx_linears": self.cpu_amx_linears,
                "kept_units": self.kept_units, "kept_bytes": self.kept_bytes,
                "primed_from_cpu": self.primed_from_cpu, "primed_from_disk": self.primed_from_disk,
                "host_now": self.host_now, "host_peak": self.host_peak,
                "host_budget": self.host_budget, "load_seconds": self.load_seconds, "load_bytes": self.load_bytes}

    def run_summary(self, before: dict, tokens: int, seconds: float, *, held_on: str = "gpu",
                    link_gbps: float | None = None, asked: int | None = None) -> str:
        """One line on a generate, in words a newcomer reads: tokens and rate (and, given ``asked``,
        whether it stopped early at the end-of-sequence token), what it brought in from each tier
        since ``before`` (an ``as_dict()`` taken before it), the units it kept resident for its
        duration and, given the link's rate, the share of it used."""
        from .budget import format_size
        # what its steps brought: the units brought for the next prompt at its end are that prompt's
        primed = {"host memory": self.primed_from_cpu - before.get("primed_from_cpu", 0),
                  "disk": self.primed_from_disk - before.get("primed_from_disk", 0)}
        moved = {"host memory": self.bytes_from_cpu - before["bytes_from_cpu"] - primed["host memory"],
                 "disk": self.bytes_from_disk - before["bytes_from_disk"] - primed["disk"]}
        text = f"{tokens} tokens in {seconds:.2f} s, {tokens / seconds if seconds else 0:.2f} tok/s"
        if asked is not None and tokens < asked:
            text += f" (stopped at the end-of-sequence token, {asked} allowed)"
        streamed = [f"{format_size(n)} from {where}" for where, n in moved.items() if n]
        text += " · streamed " + ", ".join(streamed) if streamed else " · nothing streamed"
        kept = self.kept_units - before.get("kept_units", 0)
        if kept:
            text += (f" ({kept} streamed units found in their staging slots, "
                     f"{format_size(self.kept_bytes - before.get('kept_bytes', 0))} not brought again)")
        if sum(primed.values()):
            text += f" · {format_size(sum(primed.values()))} brought into the staging slots for the next prompt"
        if self.held_last:
            text += (f" · {self.held_last} off-{held_on} unit(s) kept on the {held_on} for this generate, in room "
                     "its short length left free")
        if link_gbps and seconds and sum(moved.values()):
            share = sum(moved.values()) / seconds / 1e9 / link_gbps
            text += f" · {100 * share:.0f}% of the PCIe limit ({link_gbps:.0f} GB/s)"
        read = self.experts_read - before.get("experts_read", 0)
        skipped = self.experts_skipped - before.get("experts_skipped", 0)
        on_cpu = self.experts_on_cpu - before.get("experts_on_cpu", 0)
        if read + skipped + on_cpu:
            text += f" · brought {read} of {read + on_cpu + skipped} experts of streamed MoE blocks (the routed ones)"
            hits = self.expert_hits - before.get("expert_hits", 0)
            if hits:
                text += f", {hits} of them from the expert cache ({100 * hits / read:.0f}%)"
            if on_cpu:
                busy = self.cpu_expert_seconds - before.get("cpu_expert_seconds", 0.0)
                nbytes = self.bytes_on_cpu - before.get("bytes_on_cpu", 0)
                text += (f", and computed {on_cpu} routed ones on the CPU from host memory"
                         + (f" ({nbytes / busy / 1e9:.1f} GB/s)" if busy else ""))
            waited = self.route_wait_seconds - before.get("route_wait_seconds", 0.0)
            if waited:
                text += f", {1e3 * waited:.0f} ms waiting for the routers' choices"
        calls = self.cpu_block_calls - before.get("cpu_block_calls", 0)
        if calls:
            steps = max(1, self.steps - before.get("steps", 0))
            busy = self.cpu_block_seconds - before.get("cpu_block_seconds", 0.0)
            nbytes = self.cpu_block_bytes - before.get("cpu_block_bytes", 0)
            text += (f" · {calls / steps:.0f} blocks a step computed on the CPU from host memory"
                     + (f" ({nbytes / busy / 1e9:.1f} GB/s)" if busy else "")
                     + (f", {self.cpu_packed_linears} of their {self.cpu_packed_linears + self.cpu_plain_linears} "
                        "products from reordered weights" if self.cpu_packed_linears else "")
                     + (f", {self.cpu_amx_linears} of their {self.cpu_amx_linears + self.cpu_plain_linears} "
                        "products by nb_offload's AMX kernel (F.linear's bits)" if self.cpu_amx_linears else ""))
        text += self._cpu_hint(before, moved, link_gbps)
        replays = self.graph_replays - before.get("graph_replays", 0)
        if replays:
            text += f" · {replays} decode steps replayed as one CUDA graph"
        elif held_on == "gpu" and self.graph_eager and self.graph_eager != "cuda_graph=False":
            text += f" · decode ran eager: {self.graph_eager}"
        return text

    def _cpu_hint(self, before: dict, moved: dict, link_gbps: float | None) -> str:
        """Where the CPU computed blocks or experts from host memory: a hint if its busy time alone was
        longer than the link would take to carry everything from host memory, the CPU's bytes included. A
        step then can't beat streaming all of it (``compute="gpu"``, ``expert_compute="gpu"``), which on the
        H200 machine was faster (docs/hybrid.md). Prefill and the GPU's own compute don't count either way, and
        a generate that read from disk gets no hint (the drive may have bound it), so a hint is no false
        alarm (though a step can lose without one)."""
        on_cpu = (self.cpu_block_bytes - before.get("cpu_block_bytes", 0)
                  + self.bytes_on_cpu - before.get("bytes_on_cpu", 0))
        busy = (self.cpu_block_seconds - before.get("cpu_block_seconds", 0.0)
                + self.cpu_expert_seconds - before.get("cpu_expert_seconds", 0.0))
        if not (on_cpu and link_gbps) or moved["disk"]:     # the drive bound the step: nothing to judge
            return ""
        link_alone = (moved["host memory"] + on_cpu) / (link_gbps * 1e9)
        if busy <= link_alone:
            return ""
        return (f" · the CPU's work alone took {busy:.2f} s, the link would carry all of it from host memory "
                f"in {link_alone:.2f} s: streaming may be faster here")

    def __str__(self):
        from .budget import format_size
        text = (f"{self.tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_second:.2f} tok/s), "
                f"{self.steps} steps; streamed {format_size(self.bytes_from_cpu)} from cpu, "
                f"{format_size(self.bytes_from_disk)} from disk ({self.streamed_gbps:.2f} GB/s)")
        if self.kept_units:
            text += (f"; {self.kept_units} streamed units found in their slots, "
                     f"{format_size(self.kept_bytes)} not brought again")
        if self.host_before is not None:
            text += (f"; host memory {format_size(self.host_now)} now, {format_size(self.host_peak)} at most, "
                     f"of cpu={format_size(self.host_budget)}")
        if self.cpu_packed_linears:
            text += (f"; the CPU's blocks: {self.cpu_packed_linears} of "
                     f"{self.cpu_packed_linears + self.cpu_plain_linears} products from reordered weights, "
                     f"{format_size(self.cpu_packed_bytes)} of host memory")
        for taken, by in ((self.cpu_amx_linears, "nb_offload's AMX kernel, with F.linear's bits"),
                          (self.cpu_fast_linears, "nb_offload's own kernel (cpu_kernel=\"fast\")")):
            if taken:
                text += f"; one-row products of {taken} linears by {by}"
        if self.graph_captures:
            text += (f"; decode: {self.graph_replays} steps replayed from {self.graph_captures} CUDA graph(s), "
                     f"{1e3 * self.capture_seconds / self.graph_captures:.0f} ms a capture, pool "
                     f"{format_size(self.graph_pool_bytes)}"
                     + (f", fused kernels: {self.graph_fused}" if self.graph_fused else ""))
        if self.experts_read + self.experts_skipped + self.experts_on_cpu:
            total = self.experts_read + self.experts_skipped + self.experts_on_cpu
            text += (f"; experts brought {self.experts_read} of {total} (routed)"
                     + (f", {self.expert_hits} from the expert cache" if self.expert_hits else "")
                     + (f", {self.experts_on_cpu} computed on the CPU" if self.experts_on_cpu else "")
                     + (f", {1e3 * self.route_wait_seconds:.0f} ms waiting for routers" if self.route_wait_seconds
                        else ""))
        return text
