"""Blocks computed on the CPU where their bytes are, while the link streams the others (``compute="hybrid"``).

At batch 1 a streamed block costs its bytes over the link. A block whose bytes are in host memory can
instead be computed by the CPU from there: its inputs (a token's activations) go to the CPU, its output
comes back, and meanwhile the copy stream keeps bringing the next streamed blocks to the GPU. With a
share of the off-GPU bytes computed by the CPU at rate C and the rest streamed at rate L, a step takes
about their bytes over C + L when the split is right and the link never waits, rather than over L alone.

- The plan (planner.py) marks such blocks ``compute="cpu"``: pinned ones (``"cpu-compute"``), and with
  ``compute="hybrid"`` a share of the blocks in host memory, spread between the streamed ones so each CPU
  block runs while copies are in flight. The share, and how far ahead the link copies (the loader's
  ``_deeper``), are those whose step ``step_seconds`` models shortest: the link copies during a CPU block
  only as far as the staging slots let it (in a captured step, the same slots every step). C is measured at
  load on a block's products in the model's dtype, beside the link's copies on CUDA (``rates_by_tokens``,
  ``BusyLink``), L on the link (``budget.link_gbps``). C as measured at load varies more than decode's does,
  so once the blocks have computed decode steps, the spare room's choice models the step at the rate they
  reached, and a load whose rate was more than RECALIBRATE_OVER off plans again at it (model.py).
- The engine binds their weights to the host memory they live in and runs them through ``CpuBlock``
  hooks: inputs moved to the CPU, the torch threads set (``cpu_experts.host_threads``: cores left to
  the copy and reader threads), the output moved back. Their KV-cache layer is kept in host memory.
  A step of more tokens than the CPU computes faster than the link copies (``cpu_max_tokens``, measured
  at load: a prefill) streams the CPU's blocks through the staging slots as the other off-GPU units, and
  the GPU computes them (the engine's ``large_sources``).
- Where their decode steps run (``HANDOFF``, read at load): "caller", on the thread that launches the GPU's
  kernels, between them, in eager steps; "worker", on a worker thread the GPU's stream hands them to and
  waits for (handoff.py), so the caller goes on launching the blocks after them and queueing the link's
  copies, in eager steps; "graph", the same in a captured decode step (graphs.py), where the graph itself
  passes each block to the worker and takes its output back, and no host runs between the GPU's kernels.

A CPU rounds differently from a GPU, so the reference for their tokens is transformers computing the same
blocks on the CPU for the same steps (tests/gpu/test_hybrid_gpu.py). A ``device_map`` with them on ``"cpu"``
is not that: Accelerate then runs them on the GPU, streaming their weights in.
"""

from __future__ import annotations

import math
import time

from .cpu_experts import taken

# The pin that keeps a block in host memory and computes it there.
CPU_COMPUTE = "cpu-compute"


def gpu_only_attention(attn_implementation) -> bool:
    """Whether an attention implementation has GPU kernels only (flash, flex): blocks using it can't compute
    on the CPU."""
    return any(k in (attn_implementation or "") for k in ("flash", "flex"))


def cpu_share(cpu_gbps: float | None, link_gbps: float) -> float:
    """The share of the off-GPU bytes the CPU should compute so it and the link end together (0 without a
    CPU rate)."""
    return cpu_gbps / (cpu_gbps + link_gbps) if cpu_gbps and cpu_gbps > 0 and link_gbps > 0 else 0.0


def spread(candidates: list, share: float) -> list:
    """``share`` of ``candidates`` (in run order; ``cpu_experts.taken``), spread evenly between the others:
    each one the CPU computes is then followed by one the link brings meanwhile."""
    n = taken(share, len(candidates))
    if not n:
        return []
    step = len(candidates) / n
    return [candidates[min(len(candidates) - 1, int((k + 0.5) * step))] for k in range(n)]


# Bytes of block-shaped weights the CPU's rate is measured on at most (a 70B block is 1.7 GB: its first
# products are enough for the rate). The probe holds MEASURED_COPIES times this (twice, with reordered copies:
# cpu_products.py), and BusyLink's 512 MiB, for the moment it runs at load, and frees them.
MEASURED_BYTES = 512 << 20
# Copies of them the passes take in turn: a decode step reads each CPU block's weights once, gigabytes apart,
# where passes over one copy could find part of it still in the CPU's last-level cache (hundreds of MB on a
# server CPU). On the H200 host the rate measured on one copy was 8-32 % above the rate the blocks reached
# decoding; over three copies it still read 41 to 59 GB/s between loads of one process where decode reached
# 38-42 (benchmarks/RESULTS.md, 2026-12-04), so a plan is made again at the rate reached (RECALIBRATE_OVER).
MEASURED_COPIES = 3

# Where the CPU's blocks computed at a rate more than this share away from the one a plan's split was chosen
# at (OffloadedModel.cpu_rate_reached, after a generate), the model is planned again, once, at the rate reached: the
# split, the staging's depth, and compute="auto"'s choice. None: never.
RECALIBRATE_OVER = 0.15


class BusyLink:
    """Host-to-GPU copies from page-locked memory queued on a stream of their own, ``start`` before a timed
    pass and ``stop`` (waiting for them) after it: enough to keep the link busy for ``seconds`` at the
    55 GB/s of a PCIe 5 link (a slower link stays busy longer). They read ``CHUNKS`` chunks in turn, more
    than a CPU's cache holds, so they take memory bandwidth from the CPU as a step's copies of distinct
    units do."""

    CHUNK = 64 << 20
    CHUNKS = 8

    def __init__(self, torch, device, seconds: float = 0.05):
        from .tiers import alloc_host
        self.torch = torch
        with torch.inference_mode(False):       # page-locked as the engine's own buffers are (tiers.py)
            self.source = alloc_host(self.CHUNKS * self.CHUNK, pinned=True)
            self.target = torch.empty(self.CHUNK, dtype=torch.uint8, device=device)
        self.stream = torch.cuda.Stream(device)
        self.copies = max(1, int(seconds * 55e9 / self.CHUNK))
        self.next = 0

    def start(self):
        with self.torch.cuda.stream(self.stream):
            for _ in range(self.copies):
                a = self.next * self.CHUNK
                self.target.copy_(self.source[a:a + self.CHUNK], non_blocking=True)
                self.next = (self.next + 1) % self.CHUNKS

    def stop(self):
        self.stream.synchronize()

    def release(self):
        """Its page-locked source unlocked (after the last ``stop``)."""
        from .tiers import release_host
        release_host(self.source)


# The key of ``rates_by_tokens``'s rate for one token's products from reordered weights (cpu_products.py).
REORDERED = "reordered"
# The key of its rate for one token's products by nb_offload's own kernel (cpu_kernel.py).
FAST = "fast"
# And by nb_offload's AMX kernel, with F.linear's bits (cpu_amx.py).
AMX = "amx"


def rates_by_tokens(torch, dtype, shapes, threads: int, token_counts, repeats: int, beside=None,
                    packed: bool = False, fast: bool = False, amx: bool = False) -> dict:
    """Bytes a second the CPU reads a block's weights at, as a CPU block computes them, at each of
    ``token_counts`` (tokens -> bytes a second): the products of that many rows with weights of ``shapes``
    ([rows, cols] each, a block's, in run order, up to MEASURED_BYTES) in ``dtype``, through F.linear, one after
    another, with torch's threads set to ``threads`` for the pass and restored after it (as ``CpuBlock`` does).
    The median of ``repeats`` passes, after two to warm up; the passes take MEASURED_COPIES copies of the
    weights in turn, so each reads weights the cache has let go.

    A block's products read slower than its widest one alone (on the H200 host, 12 threads: 52 against
    82 GB/s; benchmarks/bench_cpu_block.py), and a single timing of a cold thread pool read far lower
    still, so it is the block's shapes, warmed up, and a median.

    ``beside`` (a ``BusyLink``): the link copies during each pass, as it does while a hybrid step's CPU
    block computes. Both read host memory: on the H200 host a block read 51 GB/s alone and 41 beside the
    copies (bench_cpu_block.py), and the rate while decoding was the lower one. The weights are then
    page-locked, as a CUDA plan's CPU blocks are: on one machine start of the H200 host the rate measured on
    pageable weights was 30 % above the one the blocks reached while decoding (benchmarks/RESULTS.md).

    With ``packed``, also one token's products (under the key REORDERED) from reordered copies of the weights
    of the shapes that ``cpu_products.matches`` (F.linear's for the others), as a CPU block's with
    ``pack_cpu_weights``: where no shape matches, none. (Both ways over the same shapes, the first
    MEASURED_BYTES of a block's: for a 70B block, q/k/v/o only.) The ways' passes take turns.

    With ``fast``, also one token's products by nb_offload's own kernel (cpu_kernel.py, under the key FAST),
    where it runs here and the weights are bf16.

    With ``amx``, also one token's products by nb_offload's AMX kernel (cpu_amx.py, under the key AMX) for the
    shapes it gives F.linear's bits at ``threads`` (F.linear's for the others), where it runs here and the weights
    are bf16: where no shape has a chunk, none."""
    from . import cpu_amx, cpu_kernel, cpu_products
    from .tiers import alloc_host, lock_host, release_host
    kept, total = [], 0
    size = torch.empty((), dtype=dtype).element_size()
    for rows, cols in shapes:
        if kept and total + rows * cols * size > MEASURED_BYTES:
            break
        kept.append((rows, cols))
        total += rows * cols * size
    # page-locked as a CUDA plan's CPU blocks are, and the same way (tiers.alloc_host: not torch's caching
    # allocator, which would keep the buffers locked after the probe)
    pinned = beside is not None and torch.cuda.is_available()
    flats = []

    def matrix(shape):
        flats.append(alloc_host(shape[0] * shape[1] * size, pinned=pinned, lock=False))
        weights = flats[-1].view(dtype).view(shape).fill_(0.01)
        if pinned:
            lock_host(flats[-1])
        return weights
    copies = [[matrix(shape) for shape in kept] for _ in range(MEASURED_COPIES)]
    caller = torch.get_num_threads()
    packs = {}      # id of a copy's weights -> their reordered copy, where one-row products take one
    # the ways timed: F.linear at each count of tokens, and one token's products from the reordered copies;
    # their passes take turns, so each way meets the same state of the machine as the others
    try:
        if packed and cpu_products.available(torch) and cpu_products.packable(dtype):
            try:
                for weights in (w for copy in copies for w in copy):
                    if cpu_products.matches(torch, *weights.shape, dtype, False, threads):
                        packs[id(weights)] = cpu_products.reorder(torch, weights)
            except RuntimeError:        # no memory for the copies, say: F.linear's rate alone
                packs.clear()
        # nb_offload's kernels, by the policies the engine's linears take them by (a call they don't take: F.linear)
        kernels = {}
        if fast and dtype == torch.bfloat16 and cpu_kernel.why_unavailable() is None:
            kernels[FAST] = cpu_kernel.Fast(torch)
        if amx and dtype == torch.bfloat16 and cpu_amx.why_unavailable() is None:
            policy = cpu_amx.Amx(torch, threads)
            if any([policy.check(*shape) for shape in kept]):      # every shape's chunk looked for now
                kernels[AMX] = policy
        ways = list(token_counts) + ([REORDERED] if packs else []) + list(kernels)
        times = {way: [] for way in ways}
        with torch.inference_mode():
            inputs = {tokens: {cols: torch.full((tokens, cols), 0.5, dtype=dtype) for _, cols in shapes}
                      for tokens in set(token_counts) | {1}}
            for k in range(max(1, repeats) + 2):
                for way in ways:
                    rows = inputs[1 if way in (REORDERED, FAST, AMX) else way]
                    torch.set_num_threads(threads)
                    if beside is not None:
                        beside.start()
                    try:
                        t0 = time.perf_counter()
                        for w in copies[k % len(copies)]:
                            if way == REORDERED and id(w) in packs:
                                cpu_products.product(torch, rows[w.shape[1]], packs[id(w)], None, w.shape[0])
                            elif way not in kernels or kernels[way].multiply(rows[w.shape[1]], w, None) is None:
                                torch.nn.functional.linear(rows[w.shape[1]], w)
                        if k >= 2:
                            times[way].append(time.perf_counter() - t0)
                    finally:        # its copies done before its buffers can be freed
                        torch.set_num_threads(caller)
                        if beside is not None:
                            beside.stop()
        rates = {way: total / max(sorted(t)[len(t) // 2], 1e-9) for way, t in times.items()}
    finally:
        torch.set_num_threads(caller)
        for flat in flats:
            release_host(flat)
    return rates


# The most units copied ahead for a hybrid plan: each is a staging slot on the GPU.
MOST_AHEAD = 8


# The rate a captured batch-1 decode step computes the GPU's units at, in the step model: on the H200 the
# LLaMA-7B shape fully resident replayed at 158.7 tok/s (6.3 ms a step, 13.5 GB: about 2.1 TB/s with the host's
# time between replays; benchmarks/RESULTS.md, 2026-12-02), and a hybrid step's GPU units took 0.15 ms a block
# of 405 MB (2.7 TB/s) in the 2026-12-04 timelines. Per block it is small beside a copy (7 ms) or a CPU block
# (10 ms), but a 12 GiB plan's 29 GPU blocks add about 5 ms to a step of 25.
GPU_GBPS = 2400.0


def decode_captured(order, graphs: bool = True) -> bool:
    """Whether the step model takes a plan's decode step as a replayed graph (``step_seconds``'s ``captured``):
    decode graphs on (``graphs``: the ``cuda_graph`` option), the captured handoff (``HANDOFF == "graph"``) and
    no unit read from the drive (graphs.py keeps those steps eager). ``order`` as ``step_seconds`` takes it.
    A generate may still run eager for its own reasons (its own cache, beam search: ``stats.graph_eager``)."""
    return graphs and HANDOFF == "graph" and all(where != "disk" for where, _ in order)


def step_seconds(order, cpu_gbps: float, link_gbps: float, ahead: int, slot_bytes: int,
                 disk_gbps: float | None = None, steps: int = 3, gpu_gbps: float | None = None,
                 captured: bool = False) -> float:
    """A batch-1 decode step's seconds, from the order its units run in and where each computes, for a plan
    whose CPU blocks and streamed units take turns: ``order`` is [(where, bytes)] in run order, where "gpu"
    (resident), "cpu" (computed by the CPU at ``cpu_gbps``), "stream" (copied at ``link_gbps``) or "disk"
    (read at ``disk_gbps``, then copied).

    The units run one after another (each takes the one before's output). With ``gpu_gbps``, a unit the GPU
    computes ("gpu", or streamed once its bytes are in) takes its bytes over that rate. A streamed unit travels in
    pieces of at most ``slot_bytes`` (a staging slot's), copied in order while the link is free and a slot
    is: ``ahead + 1`` slots taken in turn, a piece's copy waits until its slot's last piece has run. So the
    link works while the CPU computes a block only as far as the slots let it, which a share of the bytes
    over both rates (``cpu_share``) doesn't see: on the H200 host it predicted 8.5 tok/s where 5.9 ran
    (benchmarks/RESULTS.md). Without ``gpu_gbps`` the GPU's own compute is taken as nothing beside the
    copies. Steps follow each other (the next step's first pieces copy during this one's last units): the
    last of ``steps`` simulated steps is the answer.

    ``captured``: the step is a replayed graph, whose pieces take the same slots every step (the schedule
    starts a captured step at the first slot), so where a step's pieces don't fill the slots a whole number
    of times, its first pieces wait for the slots its last pieces used. An eager step's turn goes on from
    the last step's (with three pieces and two slots, the next step's first piece takes the slot freed by
    the second, mid-step, where a replay's waits for the third, at the step's end)."""
    link = link_gbps * 1e9

    def on_gpu(nbytes):
        return nbytes / (gpu_gbps * 1e9) if gpu_gbps else 0.0
    pieces = []         # (bytes, extra seconds: a read from the drive) of each piece, one step's, in order
    tasks = []          # per unit: ("piece", its pieces), or ("cpu" | "gpu", seconds)
    for where, nbytes in order:
        if where in ("stream", "disk") and nbytes > 0:
            count = max(1, math.ceil(nbytes / max(1, slot_bytes)))
            read = nbytes / count / (disk_gbps * 1e9) if where == "disk" and disk_gbps else 0.0
            pieces += [(nbytes / count, read)] * count
            tasks.append(("piece", count))
        elif where == "cpu":
            tasks.append(("cpu", nbytes / (cpu_gbps * 1e9) if cpu_gbps and cpu_gbps > 0 else float("inf")))
        elif on_gpu(nbytes):
            tasks.append(("gpu", on_gpu(nbytes)))
    link_free = now = 0.0
    slots = max(0, ahead) + 1
    free_at = [0.0] * slots     # when each slot's last piece has run
    turn = 0                    # the slot the next piece takes
    ends = []
    for _ in range(max(2, steps)):
        k = 0           # this step's next piece
        if captured:
            turn = 0
        for kind, value in tasks:
            if kind != "piece":
                now += value
                continue
            for _ in range(value):
                nbytes, read = pieces[k]
                k += 1
                start = max(link_free, free_at[turn])
                link_free = start + read + nbytes / link
                now = max(now, link_free) + on_gpu(nbytes)
                free_at[turn] = now
                turn = (turn + 1) % slots
        ends.append(now)
    return ends[-1] - ends[-2]


def decode_step_seconds(order, cpu_gbps: float, link_gbps: float, ahead: int, slot_bytes: int, *, graphs: bool,
                        disk_gbps: float | None = None) -> float:
    """``step_seconds`` as the plans model a batch-1 decode step: the GPU's compute at GPU_GBPS, the step captured
    where ``decode_captured(order, graphs)`` says it is."""
    return step_seconds(order, cpu_gbps, link_gbps, ahead, slot_bytes, disk_gbps, gpu_gbps=GPU_GBPS,
                        captured=decode_captured(order, graphs))


def fastest_split(candidates: list, time_of) -> list:
    """Of ``candidates`` (blocks in host memory, in run order), the ones the CPU computes: the spread share
    (``spread``) whose step ``time_of(chosen)`` says is shortest; of equal times the fewer."""
    best, best_time = [], time_of([])
    for n in range(1, len(candidates) + 1):
        chosen = spread(candidates, n / len(candidates))
        t = time_of(chosen)
        if t < best_time * (1 - 1e-9):
            best, best_time = chosen, t
    return best


# Step sizes tried for the most tokens a CPU block computes on the CPU (``cpu_max_tokens``).
TRIED_TOKENS = (1, 4, 16, 64)


def cpu_max_tokens(torch, dtype, shapes, threads: int, link_gbps: float) -> int:
    """The most tokens a step may have for the CPU to compute a block faster than the link brings it to the
    GPU: the largest of TRIED_TOKENS at whose ``rates_by_tokens`` rate over the block's ``shapes`` the CPU is no slower
    than the link (measured; at least 1). Larger steps, prefills, bring CPU blocks to the GPU."""
    rates = rates_by_tokens(torch, dtype, shapes, threads, TRIED_TOKENS, repeats=3)
    return max((tokens for tokens, rate in rates.items() if rate >= link_gbps * 1e9), default=1)


def layer_index(block) -> int | None:
    """The KV-cache layer a decoder block writes (its attention's ``layer_idx``), or None."""
    for module in block.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int):
            return idx
    return None


def move_layer_cache(torch, cache, layer: int | None, device):
    """Move every tensor of layer ``layer`` of ``cache`` (a transformers Cache: keys, values, and such state as
    a static layer's ``cumulative_length``) to ``device``, where it is elsewhere: a CPU block keeps its KV
    cache in host memory, and a prefill it computes on the GPU writes it there first."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer is None or layer >= len(layers):
        return
    entry = layers[layer]
    for name, t in list(vars(entry).items()):
        if isinstance(t, torch.Tensor) and t.device != torch.device(device):
            setattr(entry, name, t.to(device))
    if isinstance(getattr(entry, "device", None), torch.device):
        entry.device = torch.device(device)


# Where a CUDA decode step's CPU blocks run (above): "caller", "worker" or "graph". Read when a model is
# loaded. "graph": the fastest measured on the H200 (docs/hybrid.md), its tokens equal to the reference.
HANDOFF = "graph"
HANDOFFS = ("caller", "worker", "graph")


def _hidden(args, kwargs):
    return kwargs.get("hidden_states", args[0] if args else None)


def _tokens(hidden) -> int:
    return hidden.shape[0] * hidden.shape[1] if getattr(hidden, "dim", lambda: 0)() >= 2 else 1


def _output_form(output, shape, dtype) -> str | None:
    """How a block returned its output for an input hidden state of ``shape`` and ``dtype``: "tensor" (shaped
    so), "tuple" (that tensor alone in a tuple, as transformers 4's blocks return it), or None (anything
    else: its calls stay on the caller)."""
    def like(t):
        return shape is not None and getattr(t, "shape", None) == shape and getattr(t, "dtype", None) == dtype
    if like(output):
        return "tensor"
    if isinstance(output, tuple) and len(output) == 1 and like(output[0]):
        return "tuple"
    return None


class CpuBlock:
    """The hooks of one block computed on the CPU from ``host`` (its bytes in host memory, its parameters
    bound there): a small step moves the call's tensors to the CPU and the output back to ``device``, with
    ``threads`` torch threads meanwhile. In a step that ``large()`` says is too large for the CPU (more than
    ``max_tokens`` tokens: a prefill), the engine streams the block through its staging slots as any other
    and binds its parameters there (engine.py); these hooks then move its KV-cache layer to ``device`` and bind
    ``rest`` there (its leftovers' parameters, their slots and their buffer on ``device``, where the block
    streams in pieces), and bind everything back to host memory after. The CPU's time goes on the trace's
    CPU lane.

    With a ``handoff`` (handoff.GpuHandoff), ``forward`` computes a small step's block on its worker: once the
    block has been computed so on the caller (which shows the form of its output), and while ``on_worker``
    holds (the engine clears it for steps that record the blocks' inner outputs: attentions, router logits).
    The call's tensors go through page-locked buffers kept for calls of the same shapes (``_staged``), which
    a captured step's graph then copies into at every replay."""

    # staged buffers kept per block: one set for each input shape seen lately (batch sizes, cache lengths)
    STAGED_KEPT = 8

    def __init__(self, torch, unit, params, host, *, layer, device, max_tokens: int, threads: int, trace, stats,
                 rest=None, large=None, handoff=None):
        self.torch, self.unit, self.params, self.host, self.layer = torch, unit, params, host, layer
        self.device, self.rest, self.max_tokens, self.threads = device, rest, max_tokens, threads
        self.trace, self.stats = trace, stats
        # whether this step computes the block on the GPU: the engine's say, so its hooks and these agree
        self.large = large if large is not None else lambda hidden: _tokens(hidden) > max_tokens
        self.handoff, self.on_worker = handoff, handoff is not None
        self._staging = {}      # the call's tensors' shapes -> (page-locked buffer per tensor, for the output)
        self._before = self._cache = None
        self._form = None       # how the block returns its output, once seen (``_output_form``)
        self._shape = (None, None)      # the input hidden state's shape and dtype in a call on the caller
        self._callers_threads = torch.get_num_threads()
        self._on_gpu = False        # a large step computes it on the GPU (its parameters in slots, ``rest``)
        self.held = None            # its copy on the GPU, where it computes every step while held (``hold``)

    def forward(self, own):
        """The block's forward, around ``own`` (the module's): a small step on the worker where it may, else
        on this thread through ``before`` and ``after``."""
        def forward(*args, **kwargs):
            hidden = _hidden(args, kwargs)
            if (self.on_worker and self.held is None and self._form is not None and not self.large(hidden)
                    and getattr(hidden, "shape", None) is not None):
                return self._on_worker(own, hidden, args, kwargs)
            args, kwargs = self.before(args, kwargs)
            output = None
            try:
                output = own(*args, **kwargs)
            finally:
                output = self.after(output)
            return output
        return forward

    def _on_worker(self, own, hidden, args, kwargs):
        """Queue the inputs' copies to host memory, hand the block to the worker, and return its output as the
        device will have it once the worker is done (the GPU waits for it, not this thread)."""
        from .graphs import given_cache
        torch = self.torch
        if self._on_gpu:        # a large step an interrupt cut short before ``after``
            self._bind_home()
        cache = given_cache(kwargs)
        self.cache_to_host(cache)       # after a prefill: once (a capture can't, and fails)
        (host_args, host_kwargs), out, view = self._staged(args, kwargs, hidden)
        ready = self.handoff.inputs_ready()
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        form = self._form

        def work():
            ready.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):     # as the caller's step
                result = own(*host_args, **host_kwargs)
                out.copy_(result if form == "tensor" else result[0])
            return t0, time.perf_counter()
        tokens = _tokens(hidden)
        waited = self.handoff.submit(work, lambda t0, t1: self._count(t0, t1, tokens),
                                     prepare=lambda: self.cache_to_host(cache))
        on_device = self.handoff.output(waited, out, view)
        return on_device if form == "tensor" else (on_device,)

    def _staged(self, args, kwargs, hidden):
        """The call's arguments with their device tensors copied (queued, on the GPU's stream) into page-locked
        buffers kept for calls of these shapes, the buffer for its output, and the device's view of that buffer
        (None: the output is copied; ``handoff.device_view``)."""
        from .graphs import _rebuild
        on_device = self._device_tensors(args, kwargs)
        buffers, out, view = self._buffers(on_device, hidden)
        for path, t in on_device:
            buffers[path].copy_(t, non_blocking=True)
        return _rebuild((args, kwargs), lambda path, v: buffers.get(path, v)), out, view

    def _device_tensors(self, args, kwargs):
        """[(path, tensor)] of the call's tensors not in host memory."""
        from .graphs import _leaves
        return [(path, t) for path, t in _leaves((args, kwargs))
                if isinstance(t, self.torch.Tensor) and t.device.type != "cpu"]

    def _buffers(self, on_device, hidden):
        """The page-locked buffers for a call whose device tensors are ``on_device`` ([(path, tensor)]) and whose
        hidden state is ``hidden``, and the output buffer's device view (or None): kept per shapes, together (a
        view holds its buffer, so both go when the entry does), made where there are none yet. Not while a step is
        captured: allocating or freeing page-locked memory then queries CUDA events, which a capture forbids
        (the caller's call before the capture made them, or the warm-up step's)."""
        torch = self.torch
        key = tuple((path, tuple(t.shape), t.stride(), t.dtype) for path, t in on_device) \
            + ((tuple(hidden.shape), hidden.dtype),)
        staged = self._staging.pop(key, None)
        if staged is None:
            if self.handoff.program is not None:
                raise RuntimeError(f"{self.unit.name}: no page-locked buffers for this step's shapes before its "
                                   "capture")
            while len(self._staging) >= self.STAGED_KEPT:
                self._staging.pop(next(iter(self._staging)))
            out = self.handoff.host_buffer(torch.empty(hidden.shape, dtype=hidden.dtype, device="meta"))
            staged = ({path: self.handoff.host_buffer(t) for path, t in on_device}, out,
                      self.handoff.device_view(out))
        self._staging[key] = staged         # the most recent last
        return staged

    def place_cache(self, cache, large: bool):
        """This block's KV-cache layer where a step computes it: on the GPU where the block is held or the
        step is ``large``, else in host memory. Before a capture, which can't move it (a prefill since the last
        eager small step left it on the GPU; a capture of a shape seen before has no eager step first)."""
        on_gpu = self.held is not None or large
        move_layer_cache(self.torch, cache, self.layer, self.device if on_gpu else self.torch.device("cpu"))

    def cache_to_host(self, cache):
        """This block's KV-cache layer in host memory, where a prefill computed on the GPU left it (a replay
        of a captured step finds it there; a capture can't move it, and fails)."""
        move_layer_cache(self.torch, cache, self.layer, self.torch.device("cpu"))

    def _count(self, t0, t1, tokens: int = 1):
        st = self.stats
        st.cpu_block_seconds += t1 - t0
        st.cpu_block_bytes += self.unit.nbytes
        st.cpu_block_calls += 1
        if tokens == 1:         # a batch-1 decode step's: the rate a plan's split is chosen for
            st.cpu_decode_seconds += t1 - t0
            st.cpu_decode_bytes += self.unit.nbytes
            st.cpu_decode_calls += 1
        self.trace.host_event("cpu", self.unit.name, t0, t1, self.unit.nbytes)

    def before(self, args, kwargs):
        from .graphs import given_cache
        from .hooks import bind, to_device
        hidden = _hidden(args, kwargs)
        self._cache = given_cache(kwargs)
        if self.held is not None or self.large(hidden):
            move_layer_cache(self.torch, self._cache, self.layer, self.device)
            if self.rest is not None and self.held is None:
                bind(*self.rest)
            self._on_gpu = True
            self._before = "on gpu"
            return args, kwargs
        cpu = self.torch.device("cpu")
        if self._on_gpu:        # a large step an interrupt cut short before ``after``
            self._bind_home()
        move_layer_cache(self.torch, self._cache, self.layer, cpu)
        if self.handoff is not None and self._form is None and getattr(hidden, "shape", None) is not None:
            # the buffers the next step's call on the worker takes, made now: a capture of that step can't
            self._buffers(self._device_tensors(args, kwargs), hidden)
        args, kwargs = to_device(args, cpu, False), to_device(kwargs, cpu, False)   # waits for the GPU's work
        now = self.torch.get_num_threads()
        if now != self.threads:         # else still ours from a step an interrupt cut short
            self._callers_threads = now
        self._shape = getattr(hidden, "shape", None), getattr(hidden, "dtype", None)
        self._before = time.perf_counter()
        self.torch.set_num_threads(self.threads)
        return args, kwargs

    def reset(self):
        """After a step an interrupt cut short (forward hooks don't run for a KeyboardInterrupt): the caller's
        threads again, the weights bound to host memory."""
        self.torch.set_num_threads(self._callers_threads)
        self._bind_home()
        self._before = self._cache = None

    def hold(self, buf):
        """Compute every step on the GPU from ``buf`` (the block's bytes copied there), or, given None, on the
        CPU again."""
        self.held = buf
        self._bind_home()

    def _bind_home(self):
        """The parameters bound where the block computes between large steps: its held copy, or host memory."""
        from .hooks import bind
        bind(self.params, self.unit, self.host if self.held is None else self.held)
        self._on_gpu = False

    def after(self, output):
        """Also called where the forward raised (``output`` None): the binding and the threads come back."""
        from .hooks import to_device
        state, self._before = self._before, None
        if state == "on gpu":       # its KV cache moves to host memory at the next small step (no wait here)
            self._bind_home()
            self._cache = None
            return output
        self._cache = None
        self.torch.set_num_threads(self._callers_threads)
        if state is None or output is None:     # the forward raised
            return output
        shape = self._shape[0]
        self._count(state, time.perf_counter(), shape[0] * shape[1] if shape is not None and len(shape) >= 2 else 1)
        if self._form is None and self.handoff is not None:
            self._form = _output_form(output, *self._shape)
        return to_device(output, self.device)
