"""The disk reader: reads streamed units off the drive on worker threads, ahead of use.

One reader thread takes reads in run order (slot and staging-buffer reuse rely on that) and
splits each unit's byte ranges into chunks that a small pool reads in parallel; it queues a
unit's chunks without waiting for them, so the next unit's chunks queue right behind and the
drive never idles between units. Where ``uncached`` applies, reads go around the page cache
(uncached.py) and each unit lands at a shift that lines its bytes up with the file's blocks.

On CUDA, reads land in page-locked staging buffers, copied to the GPU after; each buffer's uses
are numbered (tickets), and a read waits until the buffer's earlier uses are copied out (or
abandoned) before it overwrites it. A read nobody will use any more is abandoned: its chunks not
yet started are dropped, so the drive moves on at once.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

from .tiers import alloc_host, read_extents, release_host
from .uncached import ALIGN, alignment_shift


class Staging:
    """A page-locked host buffer that disk reads land in before their copy to the GPU."""

    __slots__ = ("flat", "uses", "finished", "copy_done", "cond")

    def __init__(self, flat):
        self.flat = flat
        self.uses = 0              # tickets handed out
        self.finished = 0          # uses copied out or abandoned
        self.copy_done = None      # CUDA event of the last copy out
        self.cond = threading.Condition()

    def take(self) -> int:
        ticket = self.uses
        self.uses += 1
        return ticket

    def finish(self, copy_done=None):
        with self.cond:
            if copy_done is not None:
                self.copy_done = copy_done
            self.finished += 1
            self.cond.notify_all()

    def wait_turn(self, ticket):
        with self.cond:
            self.cond.wait_for(lambda: self.finished >= ticket)
            done = self.copy_done
        if done is not None:
            done.synchronize()


class StagedRead:
    """One unit's read into a staging buffer, ``shift`` bytes in (see ``DiskReader.shift``)."""

    __slots__ = ("staging", "ticket", "shift", "future", "chunks", "abandoned")

    def __init__(self, staging, ticket, shift=0):
        self.staging, self.ticket, self.shift = staging, ticket, shift
        self.future, self.chunks, self.abandoned = None, (), False

    def landing(self, nbytes):
        return self.staging.flat[self.shift:self.shift + nbytes]

    def abandon(self):
        """Nobody will use these bytes: drop chunks not started (the reader thread drops them too if
        it queues them after this)."""
        self.abandoned = True
        for c in self.chunks:
            c.cancel()


class DiskReader:
    """Reads units' disk extents into host memory on worker threads; see the module's docstring."""

    def __init__(self, trace, *, threads: int = 8, uncached: bool = False, staging_bytes: int = 0,
                 staging_count: int = 0):
        self.trace = trace
        self.uncached = uncached
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nb_offload-reader")
        self._io = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nb_offload-io") \
            if threads > 1 else None
        self._landing = {}          # buffer address -> chunk futures last queued into it
        self._urgent = None         # a pool of its own for reads a compute waits on (read_urgent)
        self._threads = threads
        self._last_read_end = 0.0
        pad = ALIGN if uncached else 0
        self.staging = [Staging(alloc_host(staging_bytes + pad, pinned=True)) for _ in range(staging_count)] \
            if staging_bytes else []

    def shift(self, extents, buffer) -> int:
        """Where in ``buffer`` a unit should land: lined up with its file's blocks for reads around the
        page cache, else at the start."""
        return alignment_shift(extents, buffer.data_ptr()) if self.uncached else 0

    # -- reads in run order, on the reader thread ----------------------------------------------
    def read_into(self, name, nbytes, extents, flat):
        """Read a unit straight into ``flat`` (the CPU path: a slot in RAM); a future of its chunks."""
        return self._thread.submit(self._queue_chunks, name, nbytes, extents, flat, flat)

    def copy_into(self, src, flat):
        """Copy ``src`` (host memory) into ``flat`` on the reader thread, after the reads queued into it have
        landed (the CPU path: a slot a read may still be landing in); a future, as ``read_into``'s."""
        return self._thread.submit(self._copy_in, src, flat)

    def _copy_in(self, src, flat):
        futures_wait(self._landing.get(flat.data_ptr(), ()))
        flat[:src.numel()].copy_(src)
        self._landing[flat.data_ptr()] = []
        return []

    def read_staged(self, name, nbytes, extents, staging_index) -> StagedRead:
        """Read a unit into staging buffer ``staging_index``, once the buffer's earlier uses are done."""
        st = self.staging[staging_index]
        read = StagedRead(st, st.take(), self.shift(extents, st.flat))
        read.future = self._thread.submit(self._read_staged, name, nbytes, extents, read)
        return read

    def _read_staged(self, name, nbytes, extents, read):
        read.staging.wait_turn(read.ticket)
        if read.abandoned:
            return []
        read.chunks = self._queue_chunks(name, nbytes, extents, read.landing(nbytes), read.staging.flat)
        if read.abandoned:          # abandoned while queueing: abandon() may have missed these
            read.abandon()
        return read.chunks

    def _queue_chunks(self, name, nbytes, extents, dest, buffer):
        """Queue a unit's chunks (into ``dest``, a view of ``buffer``) on the I/O pool and return their
        futures without waiting for them."""
        # A read abandoned by a reset may still have chunks landing in this buffer: let them land
        # first (in normal flow they finished long ago), or they would overwrite the new bytes.
        futures_wait(self._landing.get(buffer.data_ptr(), ()))
        t0 = max(time.perf_counter(), self._last_read_end)
        chunks = read_extents(extents, dest, pool=self._io, uncached=self.uncached, wait=False)
        self._landing[buffer.data_ptr()] = chunks
        if not self.trace.enabled:
            return chunks
        if not chunks:
            self._last_read_end = time.perf_counter()
            self.trace.host_event("read", name, t0, self._last_read_end, nbytes)
            return chunks
        left = [len(chunks)]
        lock = threading.Lock()

        def one_done(_):
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last and not any(c.cancelled() for c in chunks):
                self._last_read_end = time.perf_counter()
                self.trace.host_event("read", name, t0, self._last_read_end, nbytes)
        for c in chunks:
            c.add_done_callback(one_done)
        return chunks

    def abandon(self, read: StagedRead):
        read.abandon()
        read.staging.finish()

    # -- reads outside the run order (holding units) ---------------------------------------------
    def read_now(self, extents, flat):
        """Queue a read of ``extents`` into ``flat`` on the I/O pool at once; its chunks' futures."""
        return read_extents(extents, flat, pool=self._io, uncached=self.uncached, wait=False)

    def read_urgent(self, extents, flat):
        """Like ``read_now``, on threads of their own: a read the compute is waiting on (a MoE block's routed
        experts) doesn't queue behind the reads ahead already issued."""
        if self._urgent is None and self._threads > 1:
            self._urgent = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="nb_offload-urgent")
        return read_extents(extents, flat, pool=self._urgent, uncached=self.uncached, wait=False)

    # -- ending ------------------------------------------------------------------------------------
    def drain(self):
        """Wait until every read queued so far has landed (or failed: a failed read is of a unit no
        one will run now). Reads run in order on the reader thread, which queues their chunks: once a
        no-op queued now has run, every read has queued its chunks."""
        self._thread.submit(lambda: None).result()
        for chunks in list(self._landing.values()):
            futures_wait(chunks)

    def close(self):
        self._thread.shutdown(wait=True)
        for pool in (self._io, self._urgent):
            if pool is not None:
                pool.shutdown(wait=True)
        for st in self.staging:
            release_host(st.flat)
        self.staging = []
        self._landing = {}      # its futures' callbacks refer back to this reader


def read_finished(fut) -> bool:
    """A reader-thread future is done and so is every chunk it queued."""
    return fut.done() and (fut.exception() is not None or all(c.done() for c in fut.result()))


def read_usable(fut) -> bool:
    """Whether a reader-thread future's bytes may still be used: None (nothing was read), or a read in flight
    or landed whole, not one that failed or was cut short."""
    if fut is None or not fut.done():
        return True
    if fut.exception() is not None:
        return False
    return not any(c.cancelled() or (c.done() and c.exception() is not None) for c in fut.result())


def wait_read(fut):
    """Wait for a reader-thread future and the chunks it queued (raising their errors)."""
    for chunk in fut.result():
        chunk.result()
