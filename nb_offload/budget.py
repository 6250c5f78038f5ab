"""Sizes: parse budgets such as "6GiB" or "80%", print byte counts, and read what the machine has
(RAM, free disk, this process's memory, the host-to-GPU link rate).

Imports no torch: the magics parse sizes before a model (and torch) is loaded.
"""

from __future__ import annotations

import math
import os
import re
import shutil

from .errors import BudgetError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")
ACCEPTED = 'an int of bytes, or a string such as "6GiB", "6 GB", "500MiB", "1.5G" or "80%"'


def parse_size(value, *, capacity: int | None = None, what: str = "size") -> int:
    """Return ``value`` in bytes.

    ``capacity`` is what "80%" is a share of; without it a percentage is an error.
    """
    if isinstance(value, bool):
        raise BudgetError(f"{what}={value!r} is not a size; give {ACCEPTED}.")
    if isinstance(value, int):
        if value < 0:
            raise BudgetError(f"{what}={value!r} is negative; give {ACCEPTED}.")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise BudgetError(f"{what}={value!r} is not a size; give {ACCEPTED}.")
        return int(value)
    if not isinstance(value, str):
        raise BudgetError(f"{what}={value!r} is not a size; give {ACCEPTED}.")
    text = value.strip()
    if text.startswith("-"):
        raise BudgetError(f"{what}={value!r} is negative; give {ACCEPTED}.")
    pct = _PERCENT.match(text)
    if pct:
        share = float(pct.group(1))
        if share > 100:
            raise BudgetError(f"{what}={value!r} is more than 100%; give a share from 0% to 100%.")
        if capacity is None:
            raise BudgetError(f"{what}={value!r}: a percentage needs a known capacity; give a size in bytes such "
                              "as \"6GiB\".")
        return int(capacity * share / 100)
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise BudgetError(f"{what}={value!r} is not a size; give {ACCEPTED}.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    """Print bytes the way people read them: 1.5 GiB, 320 MiB, 12 KiB, 7 B."""
    n = float(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM on this machine."""
    total = available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key == "MemTotal":
                    total = int(rest.split()[0]) * 1024
                elif key == "MemAvailable":
                    available = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return total, available


def disk_free(path: str) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return shutil.disk_usage(probe).free


def process_memory() -> int | None:
    """Bytes of anonymous and shared memory this process holds (RssAnon + RssShmem: what a budget
    counts; page-locked buffers are in it; file pages, which the kernel can drop, are not), or
    None where the platform doesn't say."""
    try:
        with open("/proc/self/status", "rb") as fh:
            return sum(int(line.split()[1]) * 1024 for line in fh if line.startswith((b"RssAnon:", b"RssShmem:")))
    except (OSError, ValueError):
        return None


def trim_heap():
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    torch's CPU tensors come from malloc, and glibc keeps pages freed below its (self-raising)
    mmap threshold in the heap: after a load converts units, or a generate grows its cache, the
    process would hold them for good."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


_link_gbps: dict = {}


def link_gbps(device=None) -> float:
    """The page-locked host-to-GPU copy rate of this machine in GB/s, measured once a process: the median of
    five 64 MiB copies (within the workspace a plan reserves on the GPU), after one untimed. One copy alone
    read 45 GB/s on an H200 whose link ran at 55 (benchmarks/RESULTS.md, 2026-12-04)."""
    import torch
    device = torch.device("cuda") if device is None else torch.device(device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _link_gbps:
        n = 64 * 2**20
        src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=True)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
        events[0].record()
        for done in events[1:]:
            dst.copy_(src, non_blocking=True)
            done.record()
        events[-1].synchronize()
        ms = sorted(a.elapsed_time(b) for a, b in zip(events, events[1:]))
        _link_gbps[key] = n / (ms[len(ms) // 2] / 1e3) / 1e9
    return _link_gbps[key]
