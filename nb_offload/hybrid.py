"""Blocks computed on the CPU where their bytes are, while the link streams the others (``compute="hybrid"``).

At batch 1 a streamed block costs its bytes over the link. A block whose bytes are in host memory can
instead be computed by the CPU from there: its inputs (a token's activations) go to the CPU, its output
comes back, and meanwhile the copy stream keeps bringing the next streamed blocks to the GPU. With a
share of the off-GPU bytes computed by the CPU at rate C and the rest streamed at rate L, a step takes
about their bytes over C + L when the split is right, rather than over L alone.

- The plan (planner.py) marks such blocks ``compute="cpu"``: pinned ones (``"cpu-compute"``), and with
  ``compute="hybrid"`` the share C / (C + L) of the blocks in host memory, spread between the streamed
  ones so each CPU block runs while a copy is in flight. C is measured at load on a block's products in
  the model's dtype (``cpu_rate``), L on the link (``budget.link_gbps``). The plan copies far enough ahead
  (``prefetch_for``) that the link stays busy while the CPU computes a block.
- The engine binds their weights to the host memory they live in and runs them through ``CpuBlock``
  hooks: inputs moved to the CPU, the torch threads set (``cpu_experts.host_threads``: cores left to
  the copy and reader threads), the output moved back. Their KV-cache layer is kept in host memory.
  A step of more tokens than the CPU computes faster than the link copies (``cpu_max_tokens``, measured
  at load: a prefill) copies the block into one GPU buffer the CPU blocks share and computes it there.
- On CUDA a decode step's CPU blocks run on a worker thread (``GpuHandoff``): the block's inputs are copied
  to host memory on the GPU's stream, the worker computes the block once they are there and writes its
  output to page-locked memory, and the GPU's stream waits for that on a counter there (HostSignal) before
  copying it back. The caller meanwhile goes on launching the blocks after it and queueing the link's
  copies, instead of computing between them. Where the GPU can't wait so, the caller computes the block.
- Such plans decode eager (no one graph spans the CPU's work).

A CPU rounds differently from a GPU, so the reference for their tokens is transformers computing the same
blocks on the CPU for the same steps (tests/gpu/test_hybrid_gpu.py). A ``device_map`` with them on ``"cpu"``
is not that: Accelerate then runs them on the GPU, streaming their weights in.
"""

from __future__ import annotations

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
# products are enough for the rate, and a load shouldn't allocate that much more to measure it).
MEASURED_BYTES = 512 << 20


def cpu_rate(torch, dtype, shapes, threads: int, tokens: int = 1, repeats: int = 5) -> float:
    """Bytes a second the CPU reads a block's weights at, as a CPU block computes them: the products of
    ``tokens`` rows with weights of ``shapes`` ([rows, cols] each, a block's, in run order, up to
    MEASURED_BYTES) in ``dtype``, one after another, with torch's threads set to ``threads`` for the pass and
    restored after it (as ``CpuBlock`` does). The median of ``repeats`` passes, after two to warm up.

    A block's products read slower than its widest one alone (on the H200 host, 12 threads: 52 against
    82 GB/s; benchmarks/bench_cpu_block.py), and a single timing of a cold thread pool read far lower
    still, so it is the block's shapes, warmed up, and a median."""
    return rates_by_tokens(torch, dtype, shapes, threads, (tokens,), repeats)[tokens]


def rates_by_tokens(torch, dtype, shapes, threads: int, token_counts, repeats: int) -> dict:
    """``cpu_rate`` at each of ``token_counts`` (tokens -> bytes a second), on one set of weights."""
    weights, total = [], 0
    for rows, cols in shapes:
        if weights and total + rows * cols * torch.empty((), dtype=dtype).element_size() > MEASURED_BYTES:
            break
        weights.append(torch.full((rows, cols), 0.01, dtype=dtype))
        total += weights[-1].nbytes
    caller = torch.get_num_threads()
    rates = {}
    try:
        with torch.inference_mode():
            for tokens in token_counts:
                inputs = {cols: torch.full((tokens, cols), 0.5, dtype=dtype) for _, cols in shapes}
                times = []
                for k in range(max(1, repeats) + 2):
                    torch.set_num_threads(threads)
                    t0 = time.perf_counter()
                    for w in weights:
                        torch.nn.functional.linear(inputs[w.shape[1]], w)
                    if k >= 2:
                        times.append(time.perf_counter() - t0)
                    torch.set_num_threads(caller)
                times.sort()
                rates[tokens] = total / max(times[len(times) // 2], 1e-9)
    finally:
        torch.set_num_threads(caller)
    return rates


# The most units copied ahead for a hybrid plan: each is a staging slot on the GPU.
MOST_AHEAD = 8


def copies_ahead(block_bytes: int, slot_bytes: int, cpu_gbps: float, link_gbps: float) -> int:
    """Streamed units to have queued on the link when a CPU block of ``block_bytes`` starts, so the link stays
    busy while the CPU computes it: what the link copies meanwhile, in slots of ``slot_bytes`` (at least 1,
    at most MOST_AHEAD). With one unit ahead (the default) the link would idle for the rest of the block."""
    if cpu_gbps <= 0 or slot_bytes <= 0:
        return 1
    return max(1, min(MOST_AHEAD, -(-int(block_bytes * link_gbps / cpu_gbps) // slot_bytes)))


# Step sizes tried for the most tokens a CPU block computes on the CPU (``cpu_max_tokens``).
TRIED_TOKENS = (1, 4, 16, 64)


def cpu_max_tokens(torch, dtype, shapes, threads: int, link_gbps: float) -> int:
    """The most tokens a step may have for the CPU to compute a block faster than the link brings it to the
    GPU: the largest of TRIED_TOKENS at whose ``cpu_rate`` over the block's ``shapes`` the CPU is no slower
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


# Whether a CUDA decode step's CPU blocks run on a worker thread (GpuHandoff) rather than on the caller's
# thread between the GPU's launches. Read when a model is loaded.
ON_WORKER = True


class GpuHandoff:
    """How a CPU block of a CUDA decode step passes between the GPU's stream and a worker thread: the step's
    inputs are ready for the worker once an event after their copies to host memory has passed, and the GPU's
    stream takes the output once the worker has raised ``signal``'s counter past the call's value."""

    def __init__(self, torch, device, worker, signal):
        self.torch, self.device, self.worker, self.signal = torch, device, worker, signal

    def inputs_ready(self):
        """An event the worker waits for: the inputs' copies to host memory, queued before it, are done."""
        ready = self.torch.cuda.Event()
        ready.record(self.torch.cuda.current_stream(self.device))
        return ready

    def host_buffer(self, shape, dtype):
        """Where the worker writes a block's output: page-locked, so the copy back queues without a wait."""
        return self.torch.empty(shape, dtype=dtype, pin_memory=True)

    def submit(self, work):
        """``work()`` on the worker; (its future, the counter value the GPU waits for)."""
        value = self.signal.next()
        return self.worker.call(work, value), value

    def output(self, value, out, future):
        """``out`` (page-locked, written by the worker) on the device, after the stream waits for ``value``."""
        del future      # the GPU waits for it on the counter, not the host
        self.signal.wait(self.torch.cuda.current_stream(self.device), value)
        return out.to(self.device, non_blocking=True)

    def close(self):
        self.worker.close()


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
    bound there): a step of at most ``max_tokens`` tokens moves the call's tensors to the CPU and the output
    back to ``device``, with ``threads`` torch threads meanwhile; a larger one (a prefill) copies the block
    into ``upload`` (a buffer on ``device``, shared by the CPU blocks, used in stream order) and computes it
    there, as a streamed block would be. The CPU's time goes on the trace's CPU lane.

    With a ``handoff`` (GpuHandoff), ``forward`` computes a small step's block on its worker: once the block
    has been computed so on the caller (which shows the form of its output), and while ``on_worker`` holds
    (the engine clears it for steps that record the blocks' attentions). ``owe(future, count)``: the engine
    collects the worker's (start, end) at the step's end and passes it to ``count``."""

    def __init__(self, torch, unit, params, host, *, layer, device, upload, max_tokens: int, threads: int, mover,
                 trace, stats, handoff=None, owe=None):
        self.torch, self.unit, self.params, self.host, self.layer = torch, unit, params, host, layer
        self.device, self.upload, self.max_tokens, self.threads = device, upload, max_tokens, threads
        self.mover, self.trace, self.stats = mover, trace, stats
        self.handoff, self.owe, self.on_worker = handoff, owe, handoff is not None
        self._before = self._cache = None
        self._form = None       # how the block returns its output, once seen (``_output_form``)
        self._shape = (None, None)      # the input hidden state's shape and dtype in a call on the caller
        self._callers_threads = torch.get_num_threads()
        self._on_upload = False         # its parameters point into ``upload`` (a large step's)

    def forward(self, own):
        """The block's forward, around ``own`` (the module's): a small step on the worker where it may, else
        on this thread through ``before`` and ``after``."""
        def forward(*args, **kwargs):
            hidden = _hidden(args, kwargs)
            if (self.on_worker and self._form is not None and _tokens(hidden) <= self.max_tokens
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
        from .hooks import to_device
        torch, cpu = self.torch, self.torch.device("cpu")
        if self._on_upload:         # a large step an interrupt cut short before ``after``
            self._bind_host()
        move_layer_cache(torch, given_cache(kwargs), self.layer, cpu)     # after a prefill: once
        host_args, host_kwargs = to_device(args, cpu), to_device(kwargs, cpu)     # queued, not waited for
        ready = self.handoff.inputs_ready()
        out = self.handoff.host_buffer(hidden.shape, hidden.dtype)
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def work():
            ready.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):     # as the caller's step
                result = own(*host_args, **host_kwargs)
                out.copy_(result if self._form == "tensor" else result[0])
            return t0, time.perf_counter()
        future, value = self.handoff.submit(work)
        self.owe(future, self._count)
        on_device = self.handoff.output(value, out, future)
        return on_device if self._form == "tensor" else (on_device,)

    def _count(self, t0, t1):
        self.stats.cpu_block_seconds += t1 - t0
        self.stats.cpu_block_bytes += self.unit.nbytes
        self.stats.cpu_block_calls += 1
        self.trace.host_event("cpu", self.unit.name, t0, t1, self.unit.nbytes)

    def before(self, args, kwargs):
        from .graphs import given_cache
        from .hooks import bind, to_device
        hidden = _hidden(args, kwargs)
        tokens = _tokens(hidden)
        self._cache = given_cache(kwargs)
        if tokens > self.max_tokens and self.upload is not None:
            move_layer_cache(self.torch, self._cache, self.layer, self.device)
            n = self.unit.nbytes
            start = self.mover.mark() if self.trace.enabled else None
            self.upload[:n].copy_(self.host[:n], non_blocking=True)      # on the compute stream, in order
            if start is not None:
                self.trace.cuda_event("copy", self.unit.name + " (a large step: on the GPU)", start, self.mover.mark(),
                                      n)
            bind(self.params, self.unit, self.upload)
            self._on_upload = True
            self.stats.bytes_from_cpu += n
            self._before = "uploaded"
            return args, kwargs
        cpu = self.torch.device("cpu")
        if self._on_upload:         # a large step an interrupt cut short before ``after``
            self._bind_host()
        move_layer_cache(self.torch, self._cache, self.layer, cpu)
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
        self._bind_host()
        self._before = self._cache = None

    def _bind_host(self):
        from .hooks import bind
        bind(self.params, self.unit, self.host)
        self._on_upload = False

    def after(self, output):
        """Also called where the forward raised (``output`` None): the binding and the threads come back."""
        from .hooks import to_device
        state, self._before = self._before, None
        if state == "uploaded":     # its KV cache moves to host memory at the next small step (no wait here)
            self._bind_host()
            self._cache = None
            return output
        self._cache = None
        self.torch.set_num_threads(self._callers_threads)
        if state is None or output is None:     # the forward raised
            return output
        self._count(state, time.perf_counter())
        if self._form is None and self.handoff is not None:
            self._form = _output_form(output, *self._shape)
        return to_device(output, self.device)
