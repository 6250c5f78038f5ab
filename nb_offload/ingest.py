"""Reading the checkpoint into the tiers' buffers at load: once, in parallel, converting on the way.

Every tensor of a unit bound for the GPU or host tier is split into chunks that a pool of threads
reads straight from its safetensors file (``pread``: no mapping of the file stays in the process):
- into its place in the unit's host buffer, when the dtype already matches;
- through a small buffer of the reading thread, converted into place, when it doesn't (float32
  weights loaded as bfloat16: no temporary the size of a tensor or a unit; all threads' temporaries
  together take at most 2 % of the cpu budget, and 4 MiB each);
- through two small page-locked buffers of the reading thread, copied to the GPU on a stream of
  the thread's own, for units that live on the GPU.

Host buffers are page-locked after they are filled, by the thread that finished them: locking
pages that are already there is cheaper than faulting them in through the lock, and the faults
of the fill are spread over the threads. A tqdm bar shows the bytes and the rate.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

from .files import read_buffered

CHUNK = 16 * 2**20      # source bytes a thread reads at once: large reads keep a drive's queue deep
SMALL = 4 * 2**20       # the most bytes of each per-thread temporary (a conversion or staging buffer)
SCRATCH_SHARE = 0.02    # of the cpu budget, the most all threads' temporaries take together


def readable(unit, checkpoint) -> bool:
    """Whether each of ``unit``'s parameters is one safetensors tensor (no key conversion), so its
    bytes can be read in chunks straight from the file."""
    if checkpoint.is_pickle or unit.quantized:     # quantized units are quantized on their way (quant.py)
        return False
    return keys_are_params(unit)


def keys_are_params(unit) -> bool:
    """Whether every checkpoint key of ``unit`` is the name of one of its parameters (no key conversion)."""
    names = {n for s in unit.params for n in s.names}
    return all(k in names for k in unit.checkpoint_keys)


class _Thread:
    """A reading thread's own buffers: a conversion buffer, page-locked staging and a CUDA stream."""

    def __init__(self):
        self.convert = None
        self.pinned = []        # [flat, event] x 2, for GPU destinations
        self.turn = 0
        self.stream = None


class Ingest:
    """Fills the destinations given by ``add`` when ``run`` is called; see the module's docstring."""

    def __init__(self, checkpoint, *, threads: int, lock, device=None, host_budget: int | None = None):
        self.checkpoint = checkpoint
        self.device = device        # the GPU, where units go to one
        # Each thread may hold three temporaries (a conversion buffer, two staging buffers): together
        # a small share of the host budget, so a small budget gets small (slower) temporaries.
        share = SMALL if host_budget is None else int(host_budget * SCRATCH_SHARE) // (3 * max(1, threads))
        self.small = max(64 * 2**10, min(SMALL, share - share % (64 * 2**10)))
        self.threads = max(1, threads)
        self.lock = lock            # lock(flat): page-lock a filled host buffer (None: nothing to lock)
        self.tasks = []             # (unit index, path, file offset, src bytes, src dtype, dst view)
        self.units = {}             # unit index -> [chunks left, flat, bytes]
        self._local = threading.local()
        self._all: list[_Thread] = []
        self._guard = threading.Lock()
        self.lock_seconds = 0.0

    def add(self, unit, flat):
        """Read ``unit`` (``readable``) into ``flat``, a uint8 buffer on the host or the GPU."""
        import torch
        chunks = 0
        for slot in unit.params:
            key = next(n for n in slot.names if n in self.checkpoint.tensors)
            info = self.checkpoint.tensors[key]
            src_dtype = getattr(torch, info.dtype)
            dst = flat[slot.offset:slot.offset + slot.nbytes]
            if flat.device.type == "cpu" and src_dtype == slot.dtype:
                step = CHUNK
            else:       # whichever side is wider fills SMALL bytes of the thread's buffers
                step = self.small * src_dtype.itemsize // max(src_dtype.itemsize, slot.dtype.itemsize)
            for start in range(0, info.nbytes, step):
                n = min(step, info.nbytes - start)
                self.tasks.append((unit.index, info.file, info.offset + start, n, src_dtype, slot.dtype, dst, start))
                chunks += 1
        if chunks:
            self.units[unit.index] = [chunks, flat, unit.nbytes]
        elif self.lock is not None and flat.device.type == "cpu":
            self.lock(flat)         # nothing to read (tensors of no elements)

    def run(self, on_bytes=None):
        """Read every chunk; ``on_bytes(n)`` hears of each unit's bytes as it completes."""
        if not self.tasks:
            return
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="nb_offload-load")
        try:
            pending = {pool.submit(self._chunk, *task) for task in self.tasks}
            while pending:
                done, pending = futures_wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    finished = fut.result()         # raises a reader's error here
                    if finished and on_bytes is not None:
                        on_bytes(finished)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        finally:
            pool.shutdown(wait=True)
            self._close()

    def _chunk(self, *task) -> int:
        """Read one chunk into place; returns the unit's bytes if this was its last chunk, else 0."""
        import torch
        # A load called under inference_mode makes its buffers inference tensors, which only code
        # in that mode may write; this thread's mode is its own, so it enters it too (writing a
        # normal tensor is allowed there as well).
        with torch.inference_mode():
            return self._read_chunk(*task)

    def _read_chunk(self, unit, path, offset, nbytes, src_dtype, dst_dtype, dst, start) -> int:
        import torch
        me = self._thread()
        on_gpu = dst.device.type != "cpu"
        if src_dtype == dst_dtype and not on_gpu:
            read_buffered(path, memoryview(dst[start:start + nbytes].numpy()), offset)
        else:
            count = nbytes // src_dtype.itemsize
            at = start // src_dtype.itemsize * dst_dtype.itemsize
            out = dst[at:at + count * dst_dtype.itemsize]
            if src_dtype == dst_dtype:          # to the GPU as they are
                landing = self._staging(me, nbytes)
                read_buffered(path, memoryview(landing.numpy()), offset)
            else:
                raw = self._converting(me, nbytes)
                read_buffered(path, memoryview(raw.numpy()), offset)
                typed = raw.view(src_dtype)
                if not on_gpu:
                    out.view(dst_dtype).copy_(typed)
                    return self._finished(unit)
                landing = self._staging(me, len(out))
                landing.view(dst_dtype).copy_(typed)
            with torch.cuda.stream(me.stream):
                out.copy_(landing, non_blocking=True)
                me.pinned[me.turn][1].record(me.stream)
        return self._finished(unit)

    def _finished(self, unit) -> int:
        with self._guard:
            entry = self.units[unit]
            entry[0] -= 1
            if entry[0]:
                return 0
        flat = entry[1]
        if self.lock is not None and flat.device.type == "cpu":
            t0 = time.perf_counter()
            self.lock(flat)
            with self._guard:
                self.lock_seconds += time.perf_counter() - t0
        return entry[2]

    # -- each thread's buffers --------------------------------------------------------------------
    def _thread(self) -> _Thread:
        me = getattr(self._local, "me", None)
        if me is None:
            me = self._local.me = _Thread()
            with self._guard:
                self._all.append(me)
        return me

    def _converting(self, me, nbytes):
        import torch
        if me.convert is None:
            me.convert = torch.empty(self.small, dtype=torch.uint8)
        return me.convert[:nbytes]

    def _staging(self, me, nbytes):
        """The next of the thread's two page-locked buffers, once its last copy to the GPU is done."""
        import torch

        from .tiers import alloc_host
        if me.stream is None:
            me.stream = torch.cuda.Stream(self.device)
            me.pinned = [[alloc_host(self.small, pinned=True), torch.cuda.Event()] for _ in range(2)]
        me.turn ^= 1
        flat, event = me.pinned[me.turn]
        event.synchronize()
        return flat[:nbytes]

    def _close(self):
        from .tiers import release_host
        for me in self._all:
            if me.stream is not None:
                me.stream.synchronize()
            for flat, _ in me.pinned:
                release_host(flat)
        self._all = []
