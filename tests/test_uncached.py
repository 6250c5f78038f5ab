"""Disk reads that skip the page cache (drop_page_cache=True): same bytes as buffered reads,
in place where memory and file line up, buffered-then-dropped where O_DIRECT is refused."""

import ctypes
import errno
import mmap
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import greedy, load_tight, reference

import nb_offload
from nb_offload import tiers, uncached
from nb_offload.errors import DiskTierError

A = uncached.ALIGN


@pytest.fixture
def data_file(tmp_path):
    data = random.Random(7).randbytes(3 * 2**20 + 4321)                   # ends off a block
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    return str(path), data


@pytest.fixture
def small_bounce(monkeypatch):
    monkeypatch.setattr(uncached, "BOUNCE", 4 * A)     # several trips through the bounce buffer
    monkeypatch.setattr(uncached, "_local", type(uncached._local)())


def read(extents, nbytes, shift=0, pool=None):
    """Read into a buffer that starts ``shift`` bytes past a page boundary."""
    backing = torch.empty(nbytes + 2 * A, dtype=torch.uint8)
    base = (-backing.data_ptr()) % A                         # first page-aligned byte
    out = backing[base + shift:base + shift + nbytes]
    out.fill_(0xAA)
    tiers.read_extents(extents, out, pool=pool, uncached=True)
    return bytes(out.numpy())


# (file offset, length): aligned, unaligned heads and tails, a byte, the file's last bytes
RANGES = [(0, 64 * A), (1, 5 * A), (A - 1, 2), (5000, 70001), (12 * A, 1), (3 * 2**20 - 9, 4321 + 9)]


@pytest.mark.parametrize("shift", [0, 1, 808, A - 1])
@pytest.mark.parametrize("pooled", [False, True])
def test_uncached_reads_give_the_bytes_of_the_file(data_file, small_bounce, shift, pooled, monkeypatch):
    path, data = data_file
    extents, dst = [], 0
    for off, n in RANGES:
        extents.append((path, off, n, dst))
        dst += n
    want = b"".join(data[off:off + n] for off, n in RANGES)
    monkeypatch.setattr(tiers, "CHUNK", 3 * A + 17)          # chunks that split ranges off blocks
    if pooled:
        with ThreadPoolExecutor(4) as pool:
            assert read(extents, dst, shift, pool) == want
    else:
        assert read(extents, dst, shift) == want


def test_a_lined_up_unit_is_read_in_place(data_file, small_bounce, monkeypatch):
    """With the shift alignment_shift gives, only heads and tails go through the bounce buffer."""
    path, data = data_file
    extents = [(path, 5000, 40 * A, 0), (path, 5000 + 50 * A, 30 * A, 40 * A)]   # same offset pattern
    nbytes = 70 * A
    moved = []
    real = ctypes.memmove
    monkeypatch.setattr(uncached.ctypes, "memmove", lambda d, s, n: (moved.append(n), real(d, s, n))[1])
    backing = torch.empty(nbytes + 2 * A, dtype=torch.uint8)
    shift = uncached.alignment_shift(extents, backing.data_ptr())
    out = backing[shift:shift + nbytes]
    tiers.read_extents(extents, out, uncached=True)
    assert bytes(out.numpy()) == data[5000:5000 + 40 * A] + data[5000 + 50 * A:5000 + 80 * A]
    if path in uncached._buffered_only:
        pytest.skip("this file system refuses O_DIRECT; the read-then-drop path was used")
    assert sum(moved) <= 4 * A, moved                       # two heads and two tails at most
    moved.clear()
    tiers.read_extents(extents, backing[shift + 1:shift + 1 + nbytes], uncached=True)   # off by one
    assert sum(moved) == nbytes                             # all of it through the bounce buffer


def test_o_direct_refused_falls_back_to_buffered_reads(data_file, monkeypatch):
    path, data = data_file
    real_open = os.open

    def no_direct(p, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)
    monkeypatch.setattr(uncached.os, "open", no_direct)
    monkeypatch.setattr(uncached, "_buffered_only", set())
    dropped = []
    real_fadvise = getattr(os, "posix_fadvise", None)
    if real_fadvise is not None:
        monkeypatch.setattr(uncached.os, "posix_fadvise",
                            lambda fd, off, n, advice: (dropped.append((off, n, advice)),
                                                        real_fadvise(fd, off, n, advice))[1])
    assert read([(path, 77, 3 * A, 0)], 3 * A) == data[77:77 + 3 * A]
    if uncached._O_DIRECT:
        assert path in uncached._buffered_only               # not tried again for this file
    if real_fadvise is not None:
        assert dropped == [(77, 3 * A, os.POSIX_FADV_DONTNEED)]


def test_an_uncached_read_past_the_end_names_the_file(data_file):
    path, data = data_file
    with pytest.raises(DiskTierError, match="ended early") as err:
        read([(path, len(data) - 100, 2 * A, 0)], 2 * A)
    assert path in str(err.value)


def resident_pages(path):
    """How many of the file's pages are in the page cache (mincore on a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
            assert libc.mincore(addr, size, vec) == 0
            return sum(v & 1 for v in vec)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs Linux page-cache calls")
def test_uncached_reads_leave_no_pages_in_the_page_cache(data_file):
    path, data = data_file
    drop(path)
    if resident_pages(path) > 0:
        pytest.skip("this file system keeps its pages whatever we ask (tmpfs?)")
    extents = [(path, 0, len(data), 0)]
    with ThreadPoolExecutor(4) as pool:
        assert read(extents, len(data), pool=pool) == data
    assert resident_pages(path) == 0
    out = torch.empty(len(data), dtype=torch.uint8)
    tiers.read_extents(extents, out)                        # buffered: the check can see pages
    assert resident_pages(path) > 0


def test_drop_page_cache_streaming_gives_identical_tokens(model_dirs, tmp_path):
    folder = model_dirs("llama")
    want, _ = reference(folder)
    llm = load_tight(folder, tmp_path / "offload", drop_page_cache=True)
    try:
        assert any(e.tier == "disk" for e in llm.plan)
        assert torch.equal(greedy(llm), want)
        assert llm.stats.bytes_from_disk > 0
        assert torch.equal(greedy(llm), want)
    finally:
        llm.unload()


def test_drop_page_cache_must_be_a_bool(model_dirs):
    with pytest.raises(nb_offload.OffloadError,
                       match=r"drop_page_cache='yes' is not valid; accepted: True, False or \"auto\""):
        nb_offload.load(model_dirs("llama"), device="cpu", drop_page_cache="yes", progress=False)


def test_auto_skips_the_page_cache_only_for_a_disk_tier_larger_than_free_ram(model_dirs, tmp_path, monkeypatch):
    from nb_offload import model as model_module
    folder = model_dirs("llama")
    want, _ = reference(folder)
    seen = {}
    for label, free, option in (("fits", 2**40, "auto"), ("outgrows", 1, "auto"), ("forced on", 2**40, True),
                                ("forced off", 1, False)):
        monkeypatch.setattr(model_module, "host_memory", lambda free=free: (2**40, free))
        llm = load_tight(folder, tmp_path / "offload", drop_page_cache=option)
        try:
            assert torch.equal(greedy(llm), want)
            seen[label] = (llm.uncached_disk_reads, llm._engine.drop_page_cache)
        finally:
            llm.unload()
    assert seen == {"fits": (False, False), "outgrows": (True, True), "forced on": (True, True),
                    "forced off": (False, False)}
