"""Disk reads that leave nothing in the page cache: O_DIRECT, or read-then-drop where refused.

The disk tier is read this way with ``drop_page_cache=True``, or with "auto" when the tier is
larger than the free RAM. A buffered read fills RAM the user gave no budget for; on the drive measured
(the "drive patterns" runs in ``benchmarks/runs/``) it also ran 0-29 % slower than O_DIRECT reads of the same bytes:
the kernel's readahead keeps fewer requests in flight than one large direct read does.

O_DIRECT wants the file offset, the length and the memory address aligned to the drive's block.
The aligned middle of a range is read straight into place when memory and file line up (a caller
that can choose where a unit lands lines them up with ``alignment_shift``); the unaligned head
and tail, and ranges that don't line up, go through a small buffer of each reading thread. Where
the file system refuses O_DIRECT (tmpfs, some network file systems) the file is read buffered and
its pages dropped after.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading

from .files import READ_FLAGS, ended_early, read_buffered, read_fully
from .units import round_up

ALIGN = 4096                 # covers 512-byte and 4 KiB logical blocks, and the page size
BOUNCE = 2**20               # per reading thread: heads, tails and ranges that don't line up

_O_DIRECT = getattr(os, "O_DIRECT", 0)   # Linux; elsewhere reads are buffered, then dropped
_buffered_only: set[str] = set()     # files whose file system refused O_DIRECT
_local = threading.local()


def alignment_shift(extents, base_addr: int) -> int:
    """How far past ``base_addr`` to put a unit so its first extent's file offset and memory
    address line up on ``ALIGN`` (then every extent with the same offset pattern does too)."""
    if not extents:
        return 0
    _, file_offset, _, flat_offset = extents[0]
    return (file_offset - flat_offset - base_addr) % ALIGN


def _down(x):
    return x - x % ALIGN


def _up(x):
    return round_up(x, ALIGN)


def _bounce():
    buf = getattr(_local, "buf", None)
    if buf is None:
        # page-aligned, private (a shared mapping would count as shared memory); the view keeps it alive
        mm = mmap.mmap(-1, BOUNCE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf = _local.buf = (memoryview(mm), ctypes.addressof(ctypes.c_char.from_buffer(mm)))
    return buf


def read(path, dest, dest_addr, file_offset, nbytes):
    """Read ``nbytes`` of ``path`` at ``file_offset`` into ``dest`` (a writable memoryview of
    ``nbytes`` bytes at address ``dest_addr``) without leaving its pages in the page cache."""
    if _O_DIRECT and path not in _buffered_only:
        try:
            fd = os.open(path, READ_FLAGS | _O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _buffered_only.add(path)
        else:
            try:
                _read_direct(fd, path, dest, dest_addr, file_offset, nbytes)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _buffered_only.add(path)      # e.g. a block larger than ALIGN: read it buffered
            finally:
                os.close(fd)
    read_buffered(path, dest[:nbytes], file_offset, drop=True)


def _read_direct(fd, path, dest, dest_addr, file_offset, nbytes):
    start, end = file_offset, file_offset + nbytes
    mid_lo, mid_hi = _up(start), _down(end)
    rest = [(start, end)]
    if mid_lo < mid_hi and (dest_addr + mid_lo - start) % ALIGN == 0:
        read_fully(fd, path, dest[mid_lo - start:mid_hi - start], mid_lo)
        rest = [(start, mid_lo), (mid_hi, end)]
    bounce, bounce_addr = _bounce()
    for lo, hi in rest:
        while lo < hi:
            a = _down(lo)
            want = min(_up(hi), a + BOUNCE) - a
            got = os.preadv(fd, [bounce[:want]], a)     # short only at the end of the file
            take = min(hi, a + got) - lo
            if take <= 0:
                raise ended_early(path, nbytes, file_offset)
            ctypes.memmove(dest_addr + (lo - start), bounce_addr + (lo - a), take)
            lo += take

