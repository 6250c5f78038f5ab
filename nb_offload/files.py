"""Reading byte ranges of files: whole reads that fail loudly, never through a link at the end
of the path (a checkpoint's files are resolved once at load; the offload cache makes no links)."""

from __future__ import annotations

import os

from .errors import DiskTierError

# Reads never follow a link at the last step of the path: a checkpoint's files are resolved once
# at load (direct_extents), and the offload cache makes no links.
READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)


def read_buffered(path, view, offset, *, drop=False):
    """Fill ``view`` from ``path`` at ``offset`` through the page cache; ``drop``: drop those
    pages afterwards (where the platform can)."""
    fd = os.open(path, READ_FLAGS)
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
