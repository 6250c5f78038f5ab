"""Run a model's forward passes under a plan, streaming non-resident units just ahead of use.

Hooks on each unit's modules bind the unit's parameters to views into a ring of staging
slots on the compute device. On CUDA, slots are filled on a dedicated copy stream from
page-locked host buffers, with CUDA events ordering copy and compute; disk units are first
read by a worker thread into page-locked staging buffers (around the page cache when
``drop_page_cache`` applies: each unit then lands lined up with the file's blocks, see
uncached.py). On the CPU the same engine reads disk units into RAM slots on the worker thread,
ahead of use. Reads the schedule no longer needs (a surprise, the end of a generate) are
abandoned: their chunks not yet started are dropped, so the drive moves on at once.

The order units run in is learned from the first forward pass; prefetch follows it and wraps
around into the next step. A unit that arrives out of order is loaded on the spot, so a
surprise costs time, never correctness.

Where the plan splits blocks (pieces.py), each piece is a unit of the engine's own, bound only
while its submodule runs. For one generate, ``hold`` can give streamed units buffers of their
own in room the plan reserved but the generate won't use (spare.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

from .tiers import alloc_host, param_views, read_extents, release_host, sub_extents
from .uncached import ALIGN, alignment_shift


class Source:
    """Where a streamed unit's bytes come from: a host buffer or disk extents."""

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


class _Job:
    __slots__ = ("unit", "slot", "ready", "read", "staging", "copied")

    def __init__(self, unit, slot):
        self.unit, self.slot = unit, slot
        self.ready = None      # CUDA event (copy done) or Future (CPU read done)
        self.read = None       # _Read for disk units on CUDA
        self.staging = None
        self.copied = False


class _Read:
    """A disk read into a page-locked staging buffer (CUDA path).

    The unit lands ``shift`` bytes into the buffer: where reads skip the page cache, that lines
    its bytes up with the file's blocks so they are read in place (uncached.alignment_shift).
    """

    __slots__ = ("unit", "staging", "ticket", "future", "consumed", "shift", "chunks", "abandoned")

    def __init__(self, unit, staging, ticket, shift=0):
        self.unit, self.staging, self.ticket, self.shift = unit, staging, ticket, shift
        self.future, self.consumed = None, False
        self.chunks, self.abandoned = (), False

    def landing(self, nbytes):
        return self.staging.flat[self.shift:self.shift + nbytes]

    def abandon(self):
        """No one will use this read: chunks not started yet are dropped (the reader thread
        drops them too if it queues them after this), so the drive moves on at once."""
        self.abandoned = True
        for c in self.chunks:
            c.cancel()


class _Staging:
    """A page-locked host buffer that disk reads land in before their copy to the GPU.

    Uses are numbered (tickets); a read waits until every earlier use has been copied out
    (or abandoned), then for that copy to finish on the GPU, before it overwrites the buffer.
    """

    __slots__ = ("flat", "uses", "finished", "copy_done", "cond")

    def __init__(self, flat):
        self.flat = flat
        self.uses = 0
        self.finished = 0
        self.copy_done = None
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


class Engine:
    def __init__(self, model, units, params, sources: dict, device, trace, stats, *,
                 prefetch: int = 1, read_ahead: int = 2, read_threads: int = 8,
                 drop_page_cache: bool = False, split: bool = False):
        import torch
        self.torch = torch
        self.model = model
        self.units = units
        self.params = params                  # unit index -> list of Parameters (slot order)
        self.sources = sources                # unit index -> Source, streamed units only
        self.device = device
        self.cuda = device.type == "cuda"
        self.trace = trace
        self.stats = stats
        self.prefetch = max(1, int(prefetch))
        self.read_ahead = max(1, int(read_ahead))
        self._hooks = []
        # One reader thread keeps reads in run order (slot and staging reuse rely on it); it
        # splits each unit's read into chunks that a small pool reads in parallel.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nb_offload-reader")
        self._io = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="nb_offload-io") \
            if read_threads > 1 else None
        self.drop_page_cache = drop_page_cache
        self._last_read_end = 0.0
        self._landing = {}                    # buffer address -> chunk futures last queued into it
        self.held = {}                        # unit index -> (Source, own buffer), see hold()
        self._order_before_hold = None
        self._split_into_pieces(split)
        self._configure()

    # -- set-up ---------------------------------------------------------------------------
    def _split_into_pieces(self, split):
        """Streamed units that have pieces (pieces.py) stream a piece at a time.

        Each piece becomes a unit of the engine's own, numbered after the model's units, hooked
        on its submodule; the unit's leftovers are copied once into a small buffer on the
        compute device. The model's unit lists are copied, not changed.
        """
        from types import SimpleNamespace

        from .units import Unit
        torch = self.torch
        self.n_model = len(self.units)
        self.units, self.params, self.sources = list(self.units), dict(self.params), dict(self.sources)
        self.owner = {}           # engine unit index -> the model unit it is a piece of
        self.pieces_of = {}       # model unit index -> its engine units, in layout order
        self.rest = {}            # model unit index -> leftover buffer
        for u in self.units[:self.n_model] if split else ():
            src = self.sources.get(u.index)
            if src is None or not u.pieces:
                continue
            del self.sources[u.index]
            by_name = {slot.names[0]: p for slot, p in zip(u.params, self.params[u.index])}
            ids = []
            for pc in u.pieces:
                k = len(self.units)
                self.units.append(Unit(index=k, name=u.name, modules=[pc.module], kind="piece",
                                       params=pc.params, nbytes=pc.nbytes))
                self.params[k] = [by_name[slot.names[0]] for slot in pc.params]
                self.sources[k] = src.part(pc.start, pc.end)
                self.owner[k] = u.index
                ids.append(k)
            self.pieces_of[u.index] = ids
            if u.rest:
                buf = torch.empty(u.rest_nbytes, dtype=torch.uint8, device=self.device)
                for slot, start in zip(u.rest, u.rest_from):
                    buf[slot.offset:slot.offset + slot.nbytes].copy_(src.read(start, slot.nbytes))
                rest = SimpleNamespace(params=u.rest)
                for slot, v in zip(u.rest, param_views(rest, buf)):
                    by_name[slot.names[0]].data = v
                self.rest[u.index] = buf
        # read ahead as many blocks as asked: a staging buffer per piece (as the plan counted them)
        per_block = [len(ids) for ids in self.pieces_of.values() if self.sources[ids[0]].tier == "disk"]
        if per_block:
            self.read_ahead *= max(per_block)

    def stream_order(self):
        """Engine units that stream, in the model's unit order (pieces in layout order)."""
        out = []
        for u in self.units[:self.n_model]:
            if u.index in self.sources:
                out.append(u.index)
            out.extend(k for k in self.pieces_of.get(u.index, ()) if k in self.sources)
        return out

    def model_unit(self, idx):
        """The model unit an engine unit belongs to (itself, or the unit it is a piece of)."""
        return self.owner.get(idx, idx)

    def _configure(self):
        torch = self.torch
        streamed = [self.units[i] for i in self.stream_order()]
        self.order = [u.index for u in streamed]
        self.pos = 0
        self.queue: deque[_Job] = deque()
        self.reads: deque[_Read] = deque()    # issued disk reads whose copy is not issued yet
        self.read_pos = 0                     # next position (running count) to read from disk
        self.active: dict[int, _Job] = {}
        self.seen: list[int] = []
        self.in_step = False
        self._views = {}
        n_slots = self.prefetch + 1 if streamed else 0
        slot_bytes = max((u.nbytes for u in streamed), default=0)
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
            self.slot_free = [torch.cuda.Event() for _ in range(n_slots)]
            disk_bytes = max((u.nbytes for u in streamed if self.sources[u.index].tier == "disk"), default=0)
            pad = ALIGN if self.drop_page_cache else 0
            self.staging = [_Staging(alloc_host(disk_bytes + pad, pinned=True)) for _ in range(self.read_ahead)] \
                if disk_bytes else []
            if self.trace.enabled:
                self.trace.calibrate(torch.cuda)
        else:
            self.slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(n_slots)]
            self.staging = []
        self.next_slot = 0
        self.next_staging = 0
        self._open = {}
        for u in streamed:  # shapes, dtypes and device are right from the start
            for p, v in zip(self.params[u.index], self._slot_views(u, 0)):
                p.data = v

    def _slot_views(self, unit, slot):
        key = (unit.index, slot)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = param_views(unit, self.slots[slot])
        return views

    def install(self):
        """Hook the units' modules (the forward pass as a whole goes through ``step``)."""
        root = self.model
        for u in self.units:
            if u.index not in self.sources and not (self.trace.enabled and self.trace.detail == "full"):
                continue        # resident and not traced one by one: no hook, no cost
            for name in u.modules:
                module = root.get_submodule(name) if name else root
                self._hooks.append(module.register_forward_pre_hook(self._make_pre(u)))
                self._hooks.append(module.register_forward_hook(self._make_post(u)))

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.release_held()
        self.drain()
        self._reader.shutdown(wait=True)
        if self._io is not None:
            self._io.shutdown(wait=True)
        for st in self.staging:
            release_host(st.flat)
        self.slots, self._views, self.staging, self.rest = [], {}, [], {}
        self._landing = {}      # its futures' callbacks refer back to this engine

    def drain(self):
        """Wait for everything in flight and forget the queue (before re-planning or unload)."""
        self._reset()           # abandons queued reads, so none waits for a copy that won't come
        # Reads run in order on the reader thread, which queues their chunks: once a no-op queued
        # now has run, every read has queued its chunks; then wait for those to land (a failed read
        # is of a unit no one will run now).
        self._reader.submit(lambda: None).result()
        for chunks in list(self._landing.values()):
            futures_wait(chunks)
        if self.cuda:
            self.copy_stream.synchronize()
            self.torch.cuda.current_stream(self.device).synchronize()
        self.trace.flush(wait=True)

    # -- holding streamed units for a while -----------------------------------------------
    def hold(self, indices):
        """Give streamed units buffers of their own on the compute device, filled once, and run
        them as resident until ``release_held`` (room a short generate leaves unused)."""
        torch = self.torch
        indices = [i for i in indices if i in self.sources]
        if not indices:
            return
        self.drain()
        if self._order_before_hold is None:
            self._order_before_hold = list(self.order)
        disk = [i for i in indices if self.sources[i].flat is None]
        inflight = deque()
        try:
            for idx in indices:
                if idx in disk:
                    continue
                unit, src = self.units[idx], self.sources[idx]
                buf = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
                t0 = time.perf_counter()
                buf.copy_(src.flat[:unit.nbytes])
                self.stats.bytes_from_cpu += unit.nbytes
                self.trace.host_event("copy", unit.name + " (held)", t0, time.perf_counter(), unit.nbytes)
                self._bind_held(idx, buf)
            # Disk units: reads queued several ahead (on CUDA into the idle staging buffers, then
            # one copy each), so the drive stays busy while each lands and is copied.
            landings = [st.flat for st in self.staging] if self.cuda else None
            depth = len(landings) if self.cuda else len(disk)
            started = 0

            def start():
                nonlocal started
                idx = disk[started]
                unit = self.units[idx]
                buf = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
                extents = self.sources[idx].extents
                if self.cuda:
                    landing = landings[started % depth]
                    shift = self._shift(extents, landing)
                    flat = landing[shift:shift + unit.nbytes]
                else:
                    flat = buf
                t0 = time.perf_counter()
                chunks = read_extents(extents, flat, pool=self._io, uncached=self.drop_page_cache, wait=False)
                inflight.append((idx, buf, flat, chunks, t0))
                started += 1

            while started < min(depth, len(disk)):
                start()
            while inflight:
                idx, buf, flat, chunks, t0 = inflight.popleft()
                for c in chunks:
                    c.result()
                unit = self.units[idx]
                if self.cuda:
                    buf.copy_(flat[:unit.nbytes])       # synchronous: the landing buffer is free after
                self.stats.bytes_from_disk += unit.nbytes
                self.trace.host_event("read", unit.name + " (held)", t0, time.perf_counter(), unit.nbytes)
                self._bind_held(idx, buf)
                if started < len(disk):
                    start()
        except BaseException:
            for _, _, _, chunks, _ in inflight:     # nothing may land in a buffer after this
                for c in chunks:
                    c.cancel()
                futures_wait(chunks)
            raise
        finally:
            self.order = [i for i in self.order if i not in self.held]
            self.pos = self.read_pos = 0

    def _bind_held(self, idx, buf):
        for p, v in zip(self.params[idx], param_views(self.units[idx], buf)):
            p.data = v
        self.held[idx] = (self.sources.pop(idx), buf)

    def release_held(self):
        """Stream the held units again and free their buffers."""
        if not self.held:
            return
        self.drain()
        for idx, (src, _buf) in self.held.items():
            self.sources[idx] = src
            for p, v in zip(self.params[idx], self._slot_views(self.units[idx], 0)):
                p.data = v
        self.held.clear()
        self.order, self._order_before_hold = self._order_before_hold, None
        self.pos = self.read_pos = 0

    # -- one forward pass ----------------------------------------------------------------
    def step(self, forward, args, kwargs):
        """Run the model's own ``forward`` once, streaming as planned (inputs may be on the CPU)."""
        self._begin_step()
        out = forward(*_to_device(args, self.device), **_to_device(kwargs, self.device))
        self._end_step()
        return out

    def _begin_step(self):
        if self.in_step:        # the last step ended in an exception: start clean
            self._reset()
        self.in_step = True
        self.seen = []
        if self.cuda:
            self._stream = self.torch.cuda.current_stream(self.device)
        if self.trace.enabled:
            self._mark_start("step")
        if self.order and not self.queue:
            self._fill()

    def _end_step(self):
        if self.trace.enabled:
            self._mark_end("step")
        self.in_step = False
        if self.seen and self.seen != self.order and set(self.seen) >= set(self.order):
            self.order = list(self.seen)   # learned: prefetch follows it from the next step
            self._reset()
            self.pos = self.read_pos = 0
            self._fill()
        self.stats.steps += 1
        self.stats.sample_host(every=0.05)
        self.trace.step += 1
        self.trace.flush()

    # -- hooks ----------------------------------------------------------------------------
    def _make_pre(self, unit):
        idx = unit.index

        def pre(module, args):
            self._enter(idx)
        return pre

    def _make_post(self, unit):
        idx = unit.index

        def post(module, args, output):
            self._exit(idx)
        return post

    def _enter(self, idx):
        if idx not in self.sources:       # resident: only the trace
            if self.trace.enabled:
                self._mark_start(idx)
            return
        if idx in self.active:            # already bound (a module reused inside one pass)
            return
        self.seen.append(idx)
        if not self.queue or self.queue[0].unit != idx:
            self._reset()
            self.pos = self.read_pos = self._position_of(idx)
            self._fill()
        job = self.queue.popleft()
        self.pos += 1
        if self.cuda:
            self._issue_copies(first=job)
            self._compute_stream().wait_event(job.ready)
        else:
            _wait_read(job.ready)
        for p, v in zip(self.params[idx], self._slot_views(self.units[idx], job.slot)):
            p.data = v
        self.active[idx] = job
        self._fill()
        if self.trace.enabled:
            self._mark_start(idx)

    def _exit(self, idx):
        if self.trace.enabled:
            self._mark_end(idx)
        job = self.active.pop(idx, None)
        if job is not None and self.cuda:
            self.slot_free[job.slot].record(self._compute_stream())
            self._issue_copies()

    # -- scheduling -----------------------------------------------------------------------
    def _position_of(self, idx):
        """The next position (a running count over repeated passes) at which ``idx`` runs."""
        n = len(self.order)
        for k in range(n):
            if self.order[(self.pos + k) % n] == idx:
                return self.pos + k
        self.order.append(idx)      # a unit the learned order lacks: run it, relearn after the step
        return self.pos - self.pos % (n + 1) + n if n else 0

    def _fill(self):
        """Schedule the next unit and ``prefetch`` more (wrapping into the next step)."""
        n = len(self.order)
        want = min(self.prefetch + (0 if self.active else 1), len(self.slots))
        while len(self.queue) < want:
            self._schedule(self.order[(self.pos + len(self.queue)) % n], self.pos + len(self.queue))
        if self.cuda and self.staging:
            self._issue_reads(self.pos + len(self.queue) - 1)

    def _schedule(self, idx, position):
        unit = self.units[idx]
        job = _Job(idx, self.next_slot)
        self.next_slot = (self.next_slot + 1) % len(self.slots)
        src = self.sources[idx]
        if not self.cuda:
            self.stats.bytes_from_disk += unit.nbytes
            job.ready = self._reader.submit(self._read_into, unit, src.extents, self.slots[job.slot])
        elif src.tier == "disk":
            self._issue_reads(position)
            job.read = next(r for r in self.reads if r.unit == idx and not r.consumed)
            job.read.consumed = True
        self.queue.append(job)
        if self.cuda:
            self._issue_copies()

    def _issue_reads(self, must_reach):
        """Issue disk reads in run order: through position ``must_reach``, then ``read_ahead`` more."""
        n = len(self.order)
        ahead = sum(1 for r in self.reads if not r.consumed)
        while self.read_pos <= must_reach or (ahead < self.read_ahead and self.read_pos < self.pos + n):
            idx = self.order[self.read_pos % n]
            self.read_pos += 1
            if self.sources[idx].tier != "disk":
                continue
            st = self.staging[self.next_staging]
            self.next_staging = (self.next_staging + 1) % len(self.staging)
            extents = self.sources[idx].extents
            r = _Read(idx, st, st.take(), self._shift(extents, st.flat))
            r.future = self._reader.submit(self._read_staged, self.units[idx], extents, r)
            self.reads.append(r)
            ahead += 1

    def _issue_copies(self, first=None):
        """Issue host-to-device copies for scheduled jobs, in order.

        Only ``first`` (the unit about to run) may wait for its disk read; the others are
        issued once their reads are done, at a later hook.
        """
        torch = self.torch
        jobs = ([first] if first is not None else []) + list(self.queue)
        for job in jobs:
            if job.copied:
                continue
            r = job.read
            if r is not None:
                if job is not first and not _read_finished(r.future):
                    break
                _wait_read(r.future)
                src_flat = r.landing(self.units[job.unit].nbytes)
            else:
                src_flat = self.sources[job.unit].flat
            unit = self.units[job.unit]
            timed = self.trace.enabled
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.slot_free[job.slot])
                start = torch.cuda.Event(enable_timing=True) if timed else None
                if timed:
                    start.record(self.copy_stream)
                self.slots[job.slot][:unit.nbytes].copy_(src_flat[:unit.nbytes], non_blocking=True)
                done = torch.cuda.Event(enable_timing=timed)
                done.record(self.copy_stream)
            job.ready, job.copied = done, True
            if timed:
                self.trace.cuda_event("copy", unit.name, start, done, unit.nbytes)
            if r is not None:
                self.reads.remove(r)
                r.staging.finish(done)
                self.stats.bytes_from_disk += unit.nbytes
            else:
                self.stats.bytes_from_cpu += unit.nbytes

    def _reset(self):
        """Forget the prefetch queue after a surprise; in-flight transfers finish harmlessly.

        Copies already issued stay ordered on the copy stream (and reads on the single reader
        thread) ahead of anything issued later into the same slot or staging buffer.
        """
        for r in self.reads:
            r.abandon()
            r.staging.finish()
        self.reads.clear()
        self.queue.clear()
        self.active.clear()

    # -- worker-thread reads -------------------------------------------------------------
    def _shift(self, extents, buffer):
        return alignment_shift(extents, buffer.data_ptr()) if self.drop_page_cache else 0

    def _read_into(self, unit, extents, flat):
        return self._read_chunks(unit, extents, flat, flat)

    def _read_staged(self, unit, extents, read):
        read.staging.wait_turn(read.ticket)
        if read.abandoned:
            return []
        read.chunks = self._read_chunks(unit, extents, read.landing(unit.nbytes), read.staging.flat)
        if read.abandoned:          # abandoned while queueing: abandon() may have missed these
            read.abandon()
        return read.chunks

    def _read_chunks(self, unit, extents, dest, buffer):
        """Queue a unit's chunks (into ``dest``, a view of ``buffer``) on the I/O pool and return
        their futures without waiting: the next unit's chunks queue right behind, so the drive
        never idles between units."""
        # A read abandoned by a reset may still have chunks landing in this buffer: let them land
        # first (in normal flow they finished long ago), or they would overwrite the new bytes.
        futures_wait(self._landing.get(buffer.data_ptr(), ()))
        t0 = max(time.perf_counter(), self._last_read_end)
        chunks = read_extents(extents, dest, pool=self._io, uncached=self.drop_page_cache, wait=False)
        self._landing[buffer.data_ptr()] = chunks
        if not self.trace.enabled:
            return chunks
        if not chunks:
            self._last_read_end = time.perf_counter()
            self.trace.host_event("read", unit.name, t0, self._last_read_end, unit.nbytes)
            return chunks
        left = [len(chunks)]
        lock = threading.Lock()

        def one_done(_):
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last and not any(c.cancelled() for c in chunks):
                self._last_read_end = time.perf_counter()
                self.trace.host_event("read", unit.name, t0, self._last_read_end, unit.nbytes)
        for c in chunks:
            c.add_done_callback(one_done)
        return chunks

    def _compute_stream(self):
        """The stream compute runs on: the caller's current stream, looked up once a step."""
        if not self.in_step:
            return self.torch.cuda.current_stream(self.device)
        return self._stream

    # -- trace marks ----------------------------------------------------------------------
    def _mark_start(self, idx):
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record(self._compute_stream())
            self._open[idx] = ev
        else:
            self._open[idx] = time.perf_counter()

    def _mark_end(self, idx):
        start = self._open.pop(idx, None)
        if start is None:
            return
        kind, name = ("step", "forward") if idx == "step" else ("compute", self.units[idx].name)
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record(self._compute_stream())
            self.trace.cuda_event(kind, name, start, ev)
        else:
            self.trace.host_event(kind, name, start, time.perf_counter())


def _read_finished(fut) -> bool:
    """A reader-thread future is done and so is every chunk it queued."""
    return fut.done() and (fut.exception() is not None or all(c.done() for c in fut.result()))


def _wait_read(fut):
    """Wait for a reader-thread future and the chunks it queued (raising their errors)."""
    for chunk in fut.result():
        chunk.result()


def _to_device(obj, device):
    """Move tensors in (nested) args to the compute device, as callers pass CPU inputs."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj
