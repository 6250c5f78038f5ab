"""Routed experts fetched by the GPU itself: a kernel reads the rows of the experts a router picked, by
indices that never leave the device, from wherever each one is (page-locked host memory over the link,
read by the kernel itself, "zero-copy"; or the expert cache in GPU memory), into the block's slot.

Why: the copy engine needs its addresses from the host, so a routed copy waits until the host has read
the router's choice, and a step that waits on the host can't be a captured CUDA graph. A kernel that
takes the indices from device memory can: the whole routed decode step is then captured and replayed,
with no host work between a block's router and its experts. Each expert's source is one address per
fused tensor in a table on the device, so the expert cache changes where an expert comes from by
rewriting its entries between steps.

Page-locked memory registered with CUDA (tiers.alloc_host) is mapped into the device's address space on
every system with unified addressing; ``device_address`` asks the driver for that address. Imported only
on CUDA, where triton is there with torch.
"""

from __future__ import annotations

import ctypes

import triton
import triton.language as tl

from . import driver

ALIGN = 512             # rows and addresses the 16-byte path takes: multiples of this many bytes


@triton.jit
def _fetch_rows(index_ptr, table_ptr, dst_ptr, words_ptr, count_ptr, anchor_ptr, anchor_addr, n_experts,
                T: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, ALIGNED: tl.constexpr):
    """Program (c, r): chunk c of fused tensor ``t = r % T``'s row of the expert at position ``p = r // T``
    of the index, copied from that expert's source (``table[e, t]``) to row p of the destination
    (``dst[t]``, rows packed in routing order), in 8-byte words."""
    r = tl.program_id(1)
    t = r % T
    p = r // T
    e = tl.load(index_ptr + p).to(tl.int64)
    if (e >= 0) & (e < n_experts):
        words = tl.load(words_ptr + t)
        src_addr = tl.load(table_ptr + e * T + t)
        dst_addr = tl.load(dst_ptr + t) + p * words * 8
        if ALIGNED:     # from a pointer argument (16-byte aligned), so the loads and stores are 16 bytes wide
            words = tl.multiple_of(words, 64)
            src = anchor_ptr + tl.multiple_of((src_addr - anchor_addr) // 8, 64)
            dst = anchor_ptr + tl.multiple_of((dst_addr - anchor_addr) // 8, 64)
        else:
            src = src_addr.to(tl.pointer_type(tl.int64))
            dst = dst_addr.to(tl.pointer_type(tl.int64))
        start = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            keep = offs < words
            tl.store(dst + offs, tl.load(src + offs, mask=keep), mask=keep)
        if (tl.program_id(0) == 0) & (t == 0):
            tl.atomic_add(count_ptr + e, 1)


class RowFetch:
    """The fetch of one block's routed experts: where each expert's row of each fused tensor comes from,
    and where the rows go: packed in routing order, position p of the index to row p of each tensor.

    ``sources``: per fused tensor, (address of expert 0's row, bytes of one row); expert e's row is e rows
    on. ``dests``: per fused tensor, the address of row 0. ``counts``: an int32 tensor on the device with an
    entry per expert, raised by one each time that expert is fetched."""

    def __init__(self, torch, device, count: int, sources, dests, counts, *, word: int = 16, block: int = 2048,
                 warps: int = 8, iters: int = 8):
        self.torch, self.count, self.tensors = torch, count, len(sources)
        self.rows = [row for _, row in sources]
        if any(row % 8 for row in self.rows):
            raise ValueError("expert rows must be whole 8-byte words")
        self.home = [[src + e * row for src, row in sources] for e in range(count)]   # rows in host memory
        self.table = torch.tensor(self.home, dtype=torch.int64, device=device)
        self.dests = torch.tensor(list(dests), dtype=torch.int64, device=device)
        self.words = torch.tensor([row // 8 for row in self.rows], dtype=torch.int64, device=device)
        self.counts = counts
        # any 16-byte aligned int64 tensor on the device: the aligned path's addresses are word offsets from it
        self.anchor = torch.zeros(2, dtype=torch.int64, device=device)
        every = [a for per in self.home for a in per] + list(dests) + self.rows
        self.aligned = word == 16 and all(a % ALIGN == 0 for a in every + [self.anchor.data_ptr()])
        self.block, self.warps, self.iters = block, warps, iters
        self.chunks = triton.cdiv(max(self.rows) // 8, block * iters)

    def __call__(self, index):
        """Copy the rows of the experts in ``index`` (any shape, on the device; entries outside 0..count-1
        are skipped, their rows left as they were), on the current stream."""
        index = index.reshape(-1)
        grid = (self.chunks, index.numel() * self.tensors)
        _fetch_rows[grid](index, self.table, self.dests, self.words, self.counts, self.anchor,
                          self.anchor.data_ptr(), self.count, T=self.tensors, BLOCK=self.block, ITERS=self.iters,
                          ALIGNED=self.aligned, num_warps=self.warps)

    def point(self, expert: int, addresses=None):
        """Make ``expert``'s rows come from ``addresses`` (one per fused tensor; None: its rows in host
        memory), in order on the current stream, so from the next fetch queued after."""
        for t, address in enumerate(self.home[expert] if addresses is None else addresses):
            self.table[expert, t].fill_(address)


READ_BLOCK = 1024      # bytes a program of ``_read_fresh`` copies


@triton.jit
def _read_fresh(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """Bytes ``[pid * BLOCK, +BLOCK)`` of ``src`` (page-locked host memory, seen by the device) copied to ``dst``
    with volatile loads: at system scope, never a line a cache kept from an earlier read."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask, volatile=True), mask=mask)


def read_fresh(view, out):
    """``out`` (uint8, on the device) = the bytes ``view`` (``in_place``'s, as long as ``out`` at least) holds
    now: for host memory the host rewrites between reads (a CPU block's output, handoff.py), where a plain load
    could be answered by a cache."""
    n = out.numel()
    _read_fresh[(triton.cdiv(n, READ_BLOCK),)](view, out, n, BLOCK=READ_BLOCK)


class _HostBytes:
    """Page-locked host memory at the device's address ``ptr``, as CUDA's array interface describes an array
    (``torch.as_tensor`` then views it without a copy); ``owner`` keeps the memory alive as long as the view."""

    def __init__(self, ptr: int, nbytes: int, owner):
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def in_place(flat, device):
    """A uint8 tensor on ``device`` (CUDA) viewing the bytes of page-locked host memory ``flat``: kernels read
    them over the link, where they are (an embedding table, of which a step needs a row a token; a CPU block's
    output, handoff.py). Raises RuntimeError where the memory isn't mapped for the device, or where torch made a
    copy instead of a view (the memory belongs to another device's context): a copy holds the bytes of the moment
    it was taken, on the device."""
    import torch
    address = device_address(flat)
    with torch.cuda.device(device):
        view = torch.as_tensor(_HostBytes(address, flat.numel() * flat.element_size(), flat), device=device)
    if view.data_ptr() != address:
        raise RuntimeError("torch gave a copy on the device, not a view of the host memory (it is another "
                           "device's)")
    return view


def device_address(flat) -> int:
    """The device's address of page-locked host memory ``flat`` (the host's own under unified addressing)."""
    fn = driver.function("cuMemHostGetDevicePointer", ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p,
                         ctypes.c_uint)
    out = ctypes.c_uint64(0)
    rc = fn(ctypes.byref(out), ctypes.c_void_p(flat.data_ptr()), 0)
    if rc != 0:
        raise RuntimeError(f"cuMemHostGetDevicePointer failed with CUDA error {rc}: the memory isn't mapped")
    return out.value
