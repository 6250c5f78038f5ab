"""Where a unit's bytes live: a flat buffer on the compute device, in host memory, or on disk.

Each unit is one flat ``uint8`` buffer (see ``units.ParamSlot`` for the layout), so it moves in
one copy. Host buffers are page-locked when a CUDA device will read them. Disk units are read
from the checkpoint's own safetensors files when the bytes already have the right dtype and
layout, otherwise from an offload cache written once, atomically, under a fingerprint of the
checkpoint, dtype and quantization.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings

from .budget import disk_free, format_size
from .errors import DiskTierError

CACHE_FORMAT = 1


def alloc_host(nbytes: int, *, pinned: bool):
    """A flat uint8 host buffer, page-locked if asked (falls back to pageable, with a warning)."""
    import torch
    if pinned:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            warnings.warn(f"page-locked allocation of {format_size(nbytes)} failed ({exc}); using pageable "
                          "memory, which copies to the GPU several times slower.", RuntimeWarning, stacklevel=2)
    return torch.empty(nbytes, dtype=torch.uint8)


def param_views(unit, flat):
    """Typed views of every parameter of ``unit`` inside its flat buffer ``flat``."""
    out = []
    for slot in unit.params:
        out.append(flat[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape))
    return out


def pack(unit, tensors: dict, flat):
    """Copy a unit's tensors (by parameter name) into its flat buffer."""
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
    if uncached:
        from . import uncached as direct
        direct.read(path, view, addr + flat_offset, file_offset, nbytes)
        return
    read_buffered(path, view, file_offset)


def read_buffered(path, view, offset, *, drop=False):
    """Fill ``view`` from ``path`` at ``offset`` through the page cache; ``drop``: drop those
    pages afterwards (where the platform can)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        read_fully(fd, path, view, offset)
        if drop and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_fully(fd, path, view, offset):
    """Fill ``view`` from ``fd`` at ``offset`` (reads may come back short)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ended_early(path, len(view), offset)
        done += n


def ended_early(path, nbytes, offset):
    return DiskTierError(f"{path!r} ended early while reading {nbytes} bytes at {offset}; "
                         "the file was truncated after loading: reload the model.")


def direct_extents(unit, checkpoint):
    """Byte ranges of a unit's tensors inside the checkpoint's own files."""
    extents = []
    for slot in unit.params:
        key = next(n for n in slot.names if n in checkpoint.tensors)
        info = checkpoint.tensors[key]
        extents.append((info.file, info.offset, info.nbytes, slot.offset))
    return extents


def make_private_dir(path: str) -> list[str]:
    """Create ``path`` (and missing parents) readable by this user only; return what was created."""
    created = []
    probe = os.path.abspath(path)
    todo = []
    while not os.path.isdir(probe):
        if os.path.exists(probe):
            raise DiskTierError(f"disk={path!r} can't be used: {probe!r} is a file, not a folder; "
                                "give a folder path that can be created.")
        todo.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    for d in reversed(todo):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            for c in reversed(created):
                try:
                    os.rmdir(c)
                except OSError:
                    pass
            raise DiskTierError(f"disk={path!r} can't be created ({exc.strerror}: {d!r}); "
                                "give a folder you can write.") from exc
        created.append(d)
    if not os.access(path, os.W_OK | os.X_OK):
        raise DiskTierError(f"disk={path!r} is not writable by this user; give a folder you can write.")
    return created


class OffloadCache:
    """Unit files under ``<disk>/nb_offload-<fingerprint>/``, each written once and reused."""

    def __init__(self, root: str, fingerprint: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.fingerprint = fingerprint
        self.folder = os.path.join(self.root, f"nb_offload-{fingerprint}")
        self._created: list[str] = []

    @staticmethod
    def fingerprint_of(checkpoint, dtype, quant, units) -> str:
        h = hashlib.sha256()
        layout = [[u.name, u.nbytes] for u in units]
        h.update(json.dumps([CACHE_FORMAT, checkpoint.fingerprint_parts(), str(dtype), quant, layout]).encode())
        return h.hexdigest()[:16]

    def prepare(self, bytes_needed: int):
        """Create the folders (private), and check the drive has room for what will be written."""
        self._created = make_private_dir(self.root)
        if not os.path.isdir(self.folder):
            os.mkdir(self.folder, 0o700)
            self._created.append(self.folder)
        missing = bytes_needed - self.cached_bytes()
        free = disk_free(self.folder)
        if missing > free:
            self.discard_new()
            raise DiskTierError(
                f"disk={self.root!r} has {format_size(free)} free but the offload cache needs "
                f"{format_size(missing)} more; free space there or give another folder.")

    def cached_bytes(self) -> int:
        if not os.path.isdir(self.folder):
            return 0
        return sum(os.path.getsize(os.path.join(self.folder, n)) for n in os.listdir(self.folder)
                   if n.endswith(".bin"))

    def path_for(self, unit) -> str:
        safe = unit.name.replace("/", "_") or "root"
        return os.path.join(self.folder, f"{safe}.bin")

    def has(self, unit) -> bool:
        path = self.path_for(unit)
        return os.path.isfile(path) and os.path.getsize(path) == unit.nbytes

    def write(self, unit, flat):
        """Write a unit's flat bytes: to a temp file first, renamed into place once complete."""
        path = self.path_for(unit)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(flat.numpy())
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if exc.errno == errno.ENOSPC:
                raise DiskTierError(f"disk={self.root!r} is full: writing {unit.name!r} "
                                    f"({format_size(unit.nbytes)}) failed; free space there or give another folder.") from exc
            raise DiskTierError(f"disk={self.root!r}: writing {unit.name!r} failed ({exc.strerror}).") from exc

    def extents(self, unit):
        return [(self.path_for(unit), 0, unit.nbytes, 0)]

    def discard_new(self):
        """Remove the folders this load created (after a failed load)."""
        for d in reversed(self._created):
            shutil.rmtree(d, ignore_errors=True)
        self._created = []
