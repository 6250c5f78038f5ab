"""Blocks computed on the CPU where their bytes are, while the link streams the others (``compute="hybrid"``).

At batch 1 a streamed block costs its bytes over the link. A block whose bytes are in host memory can
instead be computed by the CPU from there: its inputs (a token's activations) go to the CPU, its output
comes back, and meanwhile the copy stream keeps bringing the next streamed blocks to the GPU. With a
share of the off-GPU bytes computed by the CPU at rate C and the rest streamed at rate L, a step takes
about their bytes over C + L when the split is right, rather than over L alone.

- The plan (planner.py) marks such blocks ``compute="cpu"``: pinned ones (``"cpu-compute"``), and with
  ``compute="hybrid"`` the share C / (C + L) of the blocks in host memory, spread between the streamed
  ones so each CPU block runs while a copy is in flight. C is measured at load on a block-sized
  product in the model's dtype, L on the link (``budget.link_gbps``).
- The engine binds their weights to the host memory they live in and runs them through ``CpuBlock``
  hooks: inputs moved to the CPU, the torch threads set (``cpu_experts.host_threads``: cores left to
  the copy and reader threads), the output moved back. Their KV-cache layer is kept in host memory.
  A step of more tokens than the CPU computes faster than the link copies (``cpu_max_tokens``, measured
  at load: a prefill) copies the block into one GPU buffer the CPU blocks share and computes it there.
- Such plans decode eager (the host computes between the GPU's kernels).

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


def cpu_share(cpu_gbps: float, link_gbps: float) -> float:
    """The share of the off-GPU bytes the CPU should compute so it and the link end together."""
    return cpu_gbps / (cpu_gbps + link_gbps) if cpu_gbps > 0 and link_gbps > 0 else 0.0


def spread(candidates: list, share: float) -> list:
    """``share`` of ``candidates`` (in run order; ``cpu_experts.taken``), spread evenly between the others:
    each one the CPU computes is then followed by one the link brings meanwhile."""
    n = taken(share, len(candidates))
    if not n:
        return []
    step = len(candidates) / n
    return [candidates[min(len(candidates) - 1, int((k + 0.5) * step))] for k in range(n)]


def cpu_rate(torch, dtype, rows: int, cols: int, threads: int, tokens: int = 1, repeats: int = 3) -> float:
    """Bytes a second the CPU reads a [rows, cols] weight at in a product with ``tokens`` rows in ``dtype``,
    with ``threads`` torch threads (best of ``repeats``, after one to warm up)."""
    weight = torch.randn(rows, cols).to(dtype)
    x = torch.randn(tokens, cols).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = float("inf")
        with torch.inference_mode():
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                torch.nn.functional.linear(x, weight)
                best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return weight.nbytes / max(best, 1e-9)


# Step sizes tried for the most tokens a CPU block computes on the CPU (``cpu_max_tokens``).
TRIED_TOKENS = (1, 4, 16, 64)


def cpu_max_tokens(torch, dtype, rows: int, cols: int, threads: int, link_gbps: float) -> int:
    """The most tokens a step may have for the CPU to compute a block faster than the link brings it to the
    GPU: the largest of TRIED_TOKENS whose product over a [rows, cols] weight takes the CPU no longer than
    the weight's copy (measured; at least 1). Larger steps, prefills, bring CPU blocks to the GPU."""
    nbytes = rows * cols * torch.empty((), dtype=dtype).element_size()
    copy = nbytes / (link_gbps * 1e9) if link_gbps > 0 else 0.0
    best = 1
    for tokens in TRIED_TOKENS:
        if nbytes / cpu_rate(torch, dtype, rows, cols, threads, tokens=tokens, repeats=2) <= copy:
            best = tokens
    return best


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


class CpuBlock:
    """The hooks of one block computed on the CPU from ``host`` (its bytes in host memory, its parameters
    bound there): a step of at most ``max_tokens`` tokens moves the call's tensors to the CPU and the output
    back to ``device``, with ``threads`` torch threads meanwhile; a larger one (a prefill) copies the block
    into ``upload`` (a buffer on ``device``, shared by the CPU blocks, used in stream order) and computes it
    there, as a streamed block would be. The CPU's time goes on the trace's CPU lane."""

    def __init__(self, torch, unit, params, host, *, layer, device, upload, max_tokens: int, threads: int, mover,
                 trace, stats):
        self.torch, self.unit, self.params, self.host, self.layer = torch, unit, params, host, layer
        self.device, self.upload, self.max_tokens, self.threads = device, upload, max_tokens, threads
        self.mover, self.trace, self.stats = mover, trace, stats
        self._before = self._cache = None
        self._callers_threads = torch.get_num_threads()
        self._on_upload = False         # its parameters point into ``upload`` (a large step's)

    def before(self, args, kwargs):
        from .graphs import given_cache
        from .hooks import bind, to_device
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        tokens = hidden.shape[0] * hidden.shape[1] if getattr(hidden, "dim", lambda: 0)() >= 2 else 1
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
        t0, t1 = state, time.perf_counter()
        self.stats.cpu_block_seconds += t1 - t0
        self.stats.cpu_block_bytes += self.unit.nbytes
        self.stats.cpu_block_calls += 1
        self.trace.host_event("cpu", self.unit.name, t0, t1, self.unit.nbytes)
        return to_device(output, self.device)
