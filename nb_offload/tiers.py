"""Where a unit's bytes live: a flat buffer on the compute device, in host memory, or on disk.

Each unit is one flat ``uint8`` buffer (see ``units.ParamSlot`` for the layout), so it moves in
one copy. Host buffers are page-locked when a CUDA device will read them. Disk units are read
from the checkpoint's own safetensors files when the bytes already have the right dtype and
layout, otherwise from the offload cache (cache.py).
"""

from __future__ import annotations

import mmap
import os
import warnings

from .budget import format_size
from .errors import DiskTierError
from .files import read_buffered
from .uncached import read as read_around_page_cache

# Page-locked buffers are our own mappings registered with CUDA, not torch's pin_memory=True: its
# caching host allocator rounds every request up to a power of two (a 386 MiB block takes 512 MiB,
# measured: benchmarks/rss/pinned_probe.py) and keeps freed blocks for reuse, so the host would
# hold up to twice what the plan counts against cpu=. Registered memory copies as fast.
#
# Host buffers of a huge page or more ask the kernel for transparent huge pages (2 MiB on x86-64): the CPU blocks
# of a hybrid plan (hybrid.py) read their weights from these buffers at tens of GB/s, where walking 4 KiB pages
# costs a TLB miss every 4 KiB. The kernel gives them where its setting allows ("always" or "madvise").
HUGE_PAGES = True
HUGE_PAGE = 2 << 20
_registered: dict = {}      # data_ptr -> the mapping behind a registered buffer
_unlocked: dict = {}        # data_ptr -> the mapping behind a buffer to be registered once filled


def alloc_host(nbytes: int, *, pinned: bool, lock: bool = True):
    """A flat uint8 host buffer of exactly ``nbytes``, page-locked if asked (falls back to pageable,
    with a warning). ``lock=False``: locked by ``lock_host`` later, once filled (locking pages that are
    there already is cheaper than faulting them in through the lock). Give a page-locked one back
    with ``release_host`` when done with it."""
    import torch
    if not pinned or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8)
    huge = HUGE_PAGES and nbytes >= HUGE_PAGE
    # a huge page's worth more, so the buffer can start on a huge page's boundary (its head is never touched)
    mapping = mmap.mmap(-1, nbytes + (HUGE_PAGE if huge else 0), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = 0
    if huge:
        start = (-torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()) % HUGE_PAGE
        _advise_huge_pages(mapping, start, nbytes)
    # a tensor of its own at the start, not a view into the mapping: torch tells page-locked memory by where a
    # tensor's storage starts (``is_pinned``), and copies from memory it takes for pageable otherwise (a
    # captured decode step's copies then fail the capture)
    flat = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=start)
    _unlocked[flat.data_ptr()] = mapping
    if lock:
        lock_host(flat)
    return flat


def _advise_huge_pages(mapping, start: int, nbytes: int):
    """Huge pages for the whole huge pages of ``mapping[start:start + nbytes]`` (``start`` on a huge page's
    boundary), none past them: a huge page at the tail would be faulted in whole for its first bytes, up to 2 MiB
    a buffer more than the plan counts against cpu=."""
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, start, whole)
        mapping.madvise(mmap.MADV_NOHUGEPAGE, start + whole, len(mapping) - start - whole)
    except (AttributeError, OSError):   # no transparent huge pages here: 4 KiB pages then
        pass


def lock_host(flat):
    """Page-lock a buffer from ``alloc_host(..., lock=False)`` (nothing for others)."""
    mapping = _unlocked.pop(flat.data_ptr(), None)
    if mapping is None:
        return
    import torch
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(flat.data_ptr(), flat.numel(), 0)
    if err != cudart.cudaError.success:
        warnings.warn(f"page-locking {format_size(flat.numel())} of host memory failed ({err}); using pageable "
                      "memory, which copies to the GPU several times slower.", RuntimeWarning, stacklevel=2)
        return
    _registered[flat.data_ptr()] = mapping


def release_host(flat):
    """Unlock a buffer from ``alloc_host`` (nothing for others). Its memory stays valid, as pageable
    memory, until the last view of it is gone: nothing can be left pointing at freed pages."""
    if flat is None or flat.device.type != "cpu":
        return
    _unlocked.pop(flat.data_ptr(), None)
    if _registered.pop(flat.data_ptr(), None) is None:
        return
    import torch
    torch.cuda.cudart().cudaHostUnregister(flat.data_ptr())


def param_views(unit, flat):
    """Typed views of every parameter of ``unit`` inside its flat buffer ``flat`` (for a quantized
    weight, a ``quant.QuantBinding`` of its parts)."""
    out = []
    for slot in unit.params:
        raw = flat[slot.offset:slot.offset + slot.nbytes]
        if slot.quant is not None:
            from .quant import QuantBinding
            out.append(QuantBinding(slot.quant, raw))
        else:
            out.append(raw.view(slot.dtype).view(slot.shape))
    return out


def pack(unit, tensors: dict, flat):
    """Copy a unit's tensors (by parameter name) into its flat buffer (unquantized units)."""
    for slot, view in zip(unit.params, param_views(unit, flat)):
        name = next(n for n in slot.names if n in tensors)
        view.copy_(tensors[name])


CHUNK = 16 * 2**20   # bytes per parallel read: deep enough queues for NVMe, few enough calls


def read_extents(extents, flat, *, pool=None, uncached=False, wait=True):
    """Read a disk unit's byte ranges into the host buffer ``flat`` (releases the GIL).

    With ``pool``, large ranges are split into chunks read in parallel (drives answer a deep
    queue faster than one request at a time). ``uncached`` reads without leaving the pages in
    the page cache (``uncached.py``: O_DIRECT where the file system allows it), so a disk tier
    used because RAM is short doesn't fill RAM with page cache.
    ``wait=False`` returns the chunks' futures instead of waiting for them, so a caller can
    queue the next unit's chunks behind these and keep every reader busy across units.
    """
    buf = memoryview(flat.numpy())
    addr = flat.data_ptr()
    pieces = []
    for path, file_offset, nbytes, flat_offset in extents:
        step = CHUNK if pool is not None else max(nbytes, 1)   # without a pool: one piece a range
        for start in range(0, nbytes, step):
            pieces.append((path, file_offset + start, min(step, nbytes - start), flat_offset + start))
    if pool is None or (len(pieces) < 2 and wait):
        for piece in pieces:
            _read_piece(buf, addr, *piece, uncached=uncached)
        return []
    futures = [pool.submit(_read_piece, buf, addr, *piece, uncached=uncached) for piece in pieces]
    if wait:
        for fut in futures:
            fut.result()
        return []
    return futures


def sub_extents(extents, start, end):
    """The extents of flat bytes ``start:end``, re-based so that ``start`` lands at offset 0."""
    out = []
    for path, file_offset, nbytes, flat_offset in extents:
        lo, hi = max(start, flat_offset), min(end, flat_offset + nbytes)
        if lo < hi:
            out.append((path, file_offset + lo - flat_offset, hi - lo, lo - start))
    return out


def _read_piece(buf, addr, path, file_offset, nbytes, flat_offset, *, uncached=False):
    view = buf[flat_offset:flat_offset + nbytes]
    try:
        if uncached:
            read_around_page_cache(path, view, addr + flat_offset, file_offset, nbytes)
            return
        read_buffered(path, view, file_offset)
    except OSError as exc:      # the file was removed, replaced by a link or made unreadable
        raise DiskTierError(f"reading {path!r} failed ({exc.strerror or exc}); the file changed after the model "
                            "was loaded: restore it, or load the model again.") from exc


def direct_extents(unit, checkpoint):
    """Byte ranges of a unit's tensors inside the checkpoint's own files."""
    extents = []
    for slot in unit.params:
        key = next(n for n in slot.names if n in checkpoint.tensors)
        info = checkpoint.tensors[key]
        # the file itself, not a link to it (the Hub's cache links snapshots to blobs)
        extents.append((os.path.realpath(info.file), info.offset, info.nbytes, slot.offset))
    return extents


class Source:
    """Where a streamed unit's bytes come from: a host buffer (``flat``) or byte ranges on disk."""

    __slots__ = ("flat", "extents", "tier")

    def __init__(self, tier, flat=None, extents=None):
        self.tier, self.flat, self.extents = tier, flat, extents

    def part(self, start, end):
        """The source of bytes ``start:end`` of this one."""
        if self.flat is not None:
            return Source(self.tier, flat=self.flat[start:end])
        return Source(self.tier, extents=sub_extents(self.extents, start, end))

    def read(self, start, nbytes):
        """Bytes ``start:start+nbytes`` as a host tensor (a view where they are in memory)."""
        if self.flat is not None:
            return self.flat[start:start + nbytes]
        import torch
        out = torch.empty(nbytes, dtype=torch.uint8)
        read_extents(sub_extents(self.extents, start, start + nbytes), out)
        return out
