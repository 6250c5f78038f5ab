"""The captured decode step: a generate's decode forward pass recorded once as a CUDA graph, replayed per token.

At batch 1, transformers' eager decode launches every kernel from Python, and the host, not the card,
sets the pace (about 19 tok/s for a 7B on an H200, whose memory would allow some 350). A decode step
of a fixed plan is the same every token: the same kernels on the same shapes, the same units copied
into the same slots in the same order. So it is captured once and replayed:

- ``OffloadedModel.generate`` gives the generate a static KV cache (transformers' ``StaticCache``)
  from here, its length rounded up to a bucket, so every decode step has the same shapes and
  addresses; the cache and its graphs are kept for the next generate of the same bucket and batch.
- The first decode step of a new shape runs eager, so lazy set-up (cuBLAS handles, code tables)
  happens outside any capture. The second is captured: the engine runs it through its hooks as
  usual, with the copy stream joined into the capture and the slots filled from the start of the
  step, then replayed. Every later decode step copies its inputs into the captured ones and replays.
  A replay's first streamed units are copied outside it, right after the last replay's launch, each
  once its slot's last use there has passed; the replay waits for each where it computes it
  (movers.CudaMover.present), so those copies run under the last step's tail and the host's work between.
  Where the device fails the check that makes this sound (movers.graph_waits_take_launch_record), or
  another copy was queued after them, a replay waits for all of them before it starts.
- Copies stay overlapped with compute inside the graph, as the events order them eagerly.
- While a step is captured (and in the warm-up step before), the model's RMSNorms, rotary embedding
  and SiLU products run as fused kernels, bit-identical to the eager ones (fused.py): about half the
  kernels a replay launches.

Blocks computed on the CPU (hybrid.py) are captured only with ``hybrid.HANDOFF == "graph"``: the graph then
copies a block's inputs to page-locked memory, sets a flag there that a worker thread polls, and waits for the
worker's flag before it copies the output back (handoff.py); each replay hands the calls to the worker.

Eager as before: prefill; the CPU device; plans that stream from disk (reads are CPU work between
the copies, and the drive, not the launches, bounds those steps); steps that bring MoE blocks' routed
experts once the host has read the router's choice (experts.py): batches of more than one token, and
plans whose routed experts the GPU can't fetch itself (device_routing.py); int8 units (bitsandbytes splits
outlier columns with a host synchronisation); beam search (it reorders the cache into new tensors);
sliding-window caches (their lengths are host integers); models transformers doesn't compile with a
static cache; a step whose capture fails (``Stats.graph_eager`` says why).

Tokens: replaying the kernels of an eager step gives that step's results bit for bit, so greedy
tokens equal transformers' own generate with the same static cache (``cache_implementation=
"static"`` without compiling; tests/gpu check it).
"""

from __future__ import annotations

import contextlib
import inspect
import time

from .errors import in_one_line

MIN_BUCKET = 256        # the shortest static cache: generates up to this length share one capture
KEEP = 4                # captured steps kept per engine (the most recently replayed: one per set of held units
                        # and CPU blocks' cache layout seen lately)


def bucket(tokens: int) -> int:
    """The static cache length for a generate reaching ``tokens``: the next power of two, at least MIN_BUCKET."""
    length = MIN_BUCKET
    while length < tokens:
        length *= 2
    return length


def cache_name(model) -> str:
    """The keyword a model's forward, and its generate, take the KV cache by: ``cache`` in recent
    transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def given_cache(kwargs):
    """The cache a call was given, under either name."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def given_ids(args, kwargs):
    """The token ids a forward (or generate) call was given, else its embeddings; None where neither."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    return kwargs.get("inputs_embeds") if ids is None else ids


def _leaves(obj, path=()):
    """(path, value) of every leaf of nested tuples, lists and dicts."""
    if isinstance(obj, (tuple, list)):
        for i, o in enumerate(obj):
            yield from _leaves(o, path + (i,))
    elif isinstance(obj, dict):
        for k, o in obj.items():
            yield from _leaves(o, path + (k,))
    else:
        yield path, obj


def signature(torch, cache, args, kwargs):
    """What a captured step depends on: every tensor's shape, dtype and device, every other value, and the
    cache by identity; None where an input is of a kind a capture can't take."""
    return _signature(torch, cache, _leaves((args, kwargs)))


def _signature(torch, cache, leaves):
    sig = []
    for path, value in leaves:
        if value is cache:
            sig.append((path, "cache"))
        elif isinstance(value, torch.Tensor):
            sig.append((path, tuple(value.shape), value.dtype, value.device))
        elif value is None or isinstance(value, (bool, int, float, str)):
            sig.append((path, value))
        else:
            return None
    return tuple(sig)


def _cache_layout(torch, cache, layers) -> tuple:
    """Where each tensor of ``cache``'s ``layers`` (indices) lives: its address where it is on the device (a
    graph reads and writes it there), else its device. A CPU block held in spare room has its layer moved to
    the GPU for the generate, to wherever the allocator puts it that time: a graph captured with it elsewhere
    must not replay (it would read and write memory the layer has left, which may hold anything since). The
    other layers never move (a new cache drops the graphs)."""
    entries = getattr(cache, "layers", ())
    layout = []
    for i in layers:
        if i is None or i >= len(entries):
            continue
        for name, t in vars(entries[i]).items():
            if isinstance(t, torch.Tensor):
                layout.append((i, name, "cpu" if t.is_cpu else t.data_ptr()))
    return tuple(layout)


class Captured:
    """One captured decode step: the graph, the inputs it reads, the output it writes, what it moves."""

    def __init__(self, graph, inputs, output, records, nbytes, slots, seconds, pool_bytes, program=(),
                 large=False):
        self.graph, self.inputs, self.output, self.records = graph, inputs, output, records
        # whether the step streamed the CPU's blocks too (a batch of more tokens than the CPU computes):
        # the engine's sources a replay's copies read from (engine.replay)
        self.large = large
        # the units a replay finds in their slots, (unit, slot), and an event per slot marking its last
        # use in the replay (recorded by the graph itself), after which the next step's may be copied
        self.ahead, self.last_use = slots.ahead, slots.last_use
        self.events = slots.keep        # every event recorded in the capture, kept for the graph's life
        self.program = list(program)        # CPU blocks' calls a replay hands to the worker (handoff.py)
        self.nbytes, self.seconds, self.pool_bytes = nbytes, seconds, pool_bytes


class DecodeGraphs:
    """The static cache and captured decode steps of one engine (a re-plan starts a new engine: recapture)."""

    def __init__(self, engine, *, enabled: bool, fuse: bool = True):
        self.engine = engine
        self.torch = engine.torch
        self.enabled, self.why_not = self._eligible(enabled)
        self.fuse = fuse
        self.fusion = None          # fused.Fusion, found at the first warm-up step
        self.cache = None
        self.cache_key = None       # (batch, length) of self.cache
        self.active = False         # a generate given self.cache is running
        self.graphs: dict = {}      # (signature, held units' buffers, CPU blocks' cache layout) -> Captured
        self.warm: set = set()      # keys whose first step ran eager
        self.failed: dict = {}      # key -> why its capture failed (it runs eager)
        self.primed = None          # the Captured whose first units are in their slots (engine.replay)

    def _eligible(self, enabled):
        e = self.engine
        if not enabled:
            return False, "cuda_graph=False"
        if not e.cuda:
            return False, "the CPU device runs eager"
        if any(s.tier == "disk" for s in e.sources.values()):
            return False, "units stream from disk (the reads are CPU work between copies; the drive bounds the step)"
        if e.routed and e.gpu_fetch is None:
            return False, ("streamed MoE blocks bring only their routed experts, copied once the host has read "
                           f"the router's choice (the GPU can't fetch them: {e.gpu_fetch_why_not})")
        if e.cpu_blocks and not (e.block_handoff is not None and e.block_handoff.captures):
            why = e.block_handoff.why_not_captured if e.block_handoff is not None else ""
            return False, ("blocks computed on the CPU (the host runs them between the GPU's kernels"
                           + (f"; a graph can't hand them over: {why}" if why else "") + ")")
        if any(getattr(u, "fmt", "") == "int8" for u in e.units[:e.n_model]):
            return False, "int8 units (bitsandbytes splits outlier columns with a host synchronisation)"
        return True, ""

    # -- the cache a generate is given ---------------------------------------------------------------
    def static_cache(self, model, tokens: int, batch: int, limit: int):
        """A reset static cache for a generate reaching ``tokens`` at ``batch``, or ``(None, why)``.

        ``limit``: the plan's context (the KV cache it reserved room for)."""
        if not self.enabled:
            return None, self.why_not
        if not getattr(model, "_can_compile_fullgraph", False):
            return None, f"{type(model).__name__} has no static-cache decode in transformers"
        length = bucket(tokens)
        if length > limit:
            length = tokens
            if length > limit:
                return None, f"the generate reaches {tokens} tokens, past the plan's context of {limit}"
        key = (batch, length)
        if key != self.cache_key:
            self.drop()
            from transformers import StaticCache
            cache = StaticCache(config=model.config, max_cache_len=length)
            if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
                return None, "sliding-window attention (its cache keeps lengths on the host)"
            self.cache, self.cache_key = cache, key
        self.cache.reset()
        return self.cache, ""

    @contextlib.contextmanager
    def generating(self):
        """Decode steps that use ``self.cache`` are captured and replayed while this is open."""
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def drop(self):
        """Forget the graphs and the cache (their memory goes back to the allocator)."""
        self.primed = None
        self.graphs.clear()
        self.warm.clear()
        self.failed.clear()
        self.cache = self.cache_key = None

    def forget_held(self):
        """Held units went back to streaming. Graphs that read their buffers stay, keyed by the buffers'
        addresses: a later generate that holds the same units where the allocator puts them again (as it
        often does) replays them without a capture; one that can't, captures afresh."""
        self.primed = None

    def _fusion(self):
        """The fusion (fused.py) that swaps the model's norms, MLP products and rotary embeddings for fused
        kernels in a warm-up step (which compiles them) and a capture, found and checked at the first
        warm-up step; None where nothing is fused."""
        if not self.fuse:
            return None
        e = self.engine
        if self.fusion is None:
            from .fused import Fusion
            try:
                self.fusion = Fusion(e.model)
                self.fusion.check(e.device, getattr(e.model, "dtype", None))
            except Exception as exc:    # a module the forms can't read: the eager kernels, never a failed step
                self.fuse = False
                e.stats.graph_fused = f"none: {in_one_line(exc)}"
                return None
            e.stats.graph_fused = self.fusion.describe() or f"none: {self.fusion.why_not}"
        return None if self.fusion.why_not else self.fusion

    def _fusion_failed(self, exc):
        self.fusion.off(exc)
        self.engine.stats.graph_fused = f"none: {self.fusion.why_not}"

    def _warm_up(self, forward, args, kwargs):
        """The eager first step of a shape, fused (compiling the kernels outside any capture). Where the fused
        kernels raise, fusion goes off and the step runs again without them: it writes the same cache
        positions again, and the engine starts a step that ended in an exception afresh."""
        fusion = self._fusion()
        if fusion is not None:
            try:
                with fusion.applied():
                    return self.engine.eager_step(forward, args, kwargs)
            except Exception as exc:
                self._fusion_failed(exc)
        return self.engine.eager_step(forward, args, kwargs)

    # -- a forward pass -------------------------------------------------------------------------------
    def takes(self, args, kwargs) -> bool:
        """Whether this forward pass is a decode step of the generate given ``self.cache``."""
        if not self.active or self.cache is None or given_cache(kwargs) is not self.cache:
            return False
        ids = given_ids(args, kwargs)
        return getattr(ids, "ndim", 0) >= 2 and ids.shape[1] == 1

    def step(self, forward, args, kwargs):
        e = self.engine
        leaves = list(_leaves((args, kwargs)))     # walked once: for the signature, then the inputs' copies
        sig = _signature(self.torch, self.cache, leaves)
        e.place_cpu_caches(args, kwargs)        # where the key finds them, as a replay or capture wants them
        key = (sig, frozenset((idx, buf.data_ptr()) for idx, (_, buf) in e.held.items()),
               _cache_layout(self.torch, self.cache, e.cpu_cache_layers))
        if sig is None or key in self.failed:
            e.stats.graph_eager = self.failed.get(key, "an input a capture can't hold")
            return e.eager_step(forward, args, kwargs)
        captured = self.graphs.get(key)
        if captured is None:
            if key not in self.warm:        # lazy set-up happens here, outside any capture
                if len(self.warm) > 8 * KEEP:   # keys of held buffers long gone
                    self.warm.clear()
                self.warm.add(key)
                return self._warm_up(forward, args, kwargs)
            captured = self._capture(key, forward, args, kwargs)
            if captured is None:
                return e.eager_step(forward, args, kwargs)
            while len(self.graphs) >= KEEP:        # the least recently replayed go, with their memory pools
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = captured
        else:
            self.graphs[key] = self.graphs.pop(key)     # the most recently used last: the oldest go first
            for path, value in leaves:
                static = captured.inputs.get(path)
                if static is not None:
                    static.copy_(value, non_blocking=True)
        e.replay(captured)
        return _copied(self.torch, captured.output, self.cache)

    def _capture(self, key, forward, args, kwargs):
        """Capture one decode step (None, and the reason kept, where it can't be captured)."""
        torch, e = self.torch, self.engine
        inputs = {}

        def static(path, value):
            if isinstance(value, torch.Tensor) and value is not self.cache:
                inputs[path] = value.clone()
                return inputs[path]
            return value
        s_args, s_kwargs = _rebuild((args, kwargs), static)
        t0 = time.perf_counter()
        torch.cuda.synchronize(e.device)
        torch.cuda.empty_cache()        # as torch.cuda.graph does on entry: what's reserved after is the pool
        before = torch.cuda.memory_reserved(e.device)
        trace, stream = e.trace, torch.cuda.current_stream(e.device)
        tracing = trace.enabled
        fusion = self._fusion()
        try:
            while True:     # fused and traced; then without the fused kernels; then without trace events
                graph = torch.cuda.CUDAGraph()
                try:
                    with fusion.applied() if fusion else contextlib.nullcontext():
                        output, records, nbytes, slots, program = e.capture_step(graph, forward, s_args,
                                                                                 s_kwargs)
                    break
                except BaseException as exc:   # any failure means "run this step eager"; an interrupt, stop
                    e.after_failed_capture()
                    torch.cuda.set_stream(stream)   # a failed capture_end leaves its side stream current
                    if not isinstance(exc, Exception):
                        raise
                    if fusion is not None:
                        self._fusion_failed(exc)
                        fusion = None
                    elif trace.enabled:
                        trace.enabled = False   # events inside a graph unsupported here: step times only
                    else:
                        self.failed[key] = in_one_line(exc)
                        e.stats.graph_eager = self.failed[key]
                        return None
        finally:
            trace.enabled = tracing
        captured = Captured(graph, inputs, output, records, nbytes, slots, time.perf_counter() - t0,
                            torch.cuda.memory_reserved(e.device) - before, program, large=e.large)
        e.stats.graph_captures += 1
        e.stats.capture_seconds += captured.seconds
        e.stats.graph_pool_bytes = max(e.stats.graph_pool_bytes, captured.pool_bytes)
        return captured


def _rebuild(obj, leaf, path=()):
    if isinstance(obj, tuple):
        return tuple(_rebuild(o, leaf, path + (i,)) for i, o in enumerate(obj))
    if isinstance(obj, list):
        return [_rebuild(o, leaf, path + (i,)) for i, o in enumerate(obj)]
    if isinstance(obj, dict):
        return {k: _rebuild(o, leaf, path + (k,)) for k, o in obj.items()}
    return leaf(path, obj)


def _copied(torch, output, cache):
    """The step's output with its tensors copied out of the graph's pool (the next replay overwrites them)."""
    def clone(path, value):
        return value.clone() if isinstance(value, torch.Tensor) else value
    if hasattr(output, "keys") and hasattr(output, "__class__"):
        return type(output)(**{k: (v if v is cache else _rebuild(v, clone)) for k, v in output.items()})
    return _rebuild(output, clone)
