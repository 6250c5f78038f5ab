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
  the copy and reader threads), the output moved back. Their KV cache is then on the CPU too (the
  cache's layers are made where their first keys are).
- Such plans decode eager (the host computes between the GPU's kernels).

The reference for their tokens is transformers with the same blocks placed on ``"cpu"`` in a
``device_map`` (Accelerate moves each block's inputs there and its output back): a CPU rounds differently.
"""

from __future__ import annotations

import time

# The pin that keeps a block in host memory and computes it there.
CPU_COMPUTE = "cpu-compute"


def cpu_share(cpu_gbps: float, link_gbps: float) -> float:
    """The share of the off-GPU bytes the CPU should compute so it and the link end together."""
    return cpu_gbps / (cpu_gbps + link_gbps) if cpu_gbps > 0 and link_gbps > 0 else 0.0


def spread(candidates: list, share: float) -> list:
    """``round(share x len(candidates))`` of ``candidates`` (in run order), spread evenly between the
    others: each one the CPU computes is then followed by one the link brings meanwhile."""
    n = min(len(candidates), max(0, int(share * len(candidates) + 0.5)))
    if not n:
        return []
    step = len(candidates) / n
    return [candidates[min(len(candidates) - 1, int((k + 0.5) * step))] for k in range(n)]


def cpu_rate(torch, dtype, rows: int, cols: int, threads: int, repeats: int = 3) -> float:
    """Bytes a second the CPU reads a [rows, cols] weight at in a batch-1 product in ``dtype`` with
    ``threads`` torch threads (best of ``repeats``, after one to warm up)."""
    weight = torch.randn(rows, cols).to(dtype)
    x = torch.randn(1, cols).to(dtype)
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


class CpuBlock:
    """The hooks of one block computed on the CPU: its call's tensors to the CPU and its output back to
    ``device``, with ``threads`` torch threads meanwhile; the time it took, on the trace's CPU lane."""

    def __init__(self, torch, name: str, nbytes: int, device, threads: int, trace, stats):
        self.torch, self.name, self.nbytes, self.device = torch, name, nbytes, device
        self.threads, self.trace, self.stats = threads, trace, stats
        self._before = None

    def before(self, args, kwargs):
        from .hooks import to_device
        cpu = self.torch.device("cpu")
        args, kwargs = to_device(args, cpu, False), to_device(kwargs, cpu, False)   # waits for the GPU's work
        self._before = (self.torch.get_num_threads(), time.perf_counter())
        self.torch.set_num_threads(self.threads)
        return args, kwargs

    def after(self, output):
        from .hooks import to_device
        threads, t0 = self._before or (self.torch.get_num_threads(), time.perf_counter())
        self._before = None
        self.torch.set_num_threads(threads)
        t1 = time.perf_counter()
        self.stats.cpu_block_seconds += t1 - t0
        self.stats.cpu_block_bytes += self.nbytes
        self.stats.cpu_block_calls += 1
        self.trace.host_event("cpu", self.name, t0, t1, self.nbytes)
        return to_device(output, self.device)
