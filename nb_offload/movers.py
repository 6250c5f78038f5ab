"""Movers: how a scheduled unit's bytes reach its staging slot on the compute device.

A mover owns the slots and the clock the trace is timed by, and answers to five calls from the
engine: ``start`` (a job was scheduled), ``pump`` (issue what can be issued now), ``wait`` (the
unit is about to compute), ``done`` (it finished computing) and ``synchronize``.

- ``CudaMover``: slots on the GPU, filled on a copy stream of their own from page-locked host
  buffers (host-tier units) or staging buffers (disk units, once their read has landed). CUDA
  events order the copies after the compute that last used a slot, and the compute after its copy;
  the host never waits for the GPU.
- ``CpuMover``: compute on the CPU, slots in RAM; disk units are read straight into their slot by
  the reader thread, and compute waits for that read.

A new way to bring bytes in (quantized units, experts on demand) is a new mover beside these.
"""

from __future__ import annotations

import time

from .reader import read_finished, wait_read


class CpuMover:
    def __init__(self, torch, slot_bytes: int, slots: int, *, reader, trace, stats):
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(slots)]
        self.reader, self.trace, self.stats = reader, trace, stats

    def start(self, job, unit, source):
        self.stats.bytes_from_disk += unit.nbytes
        job.ready = self.reader.read_into(unit.name, unit.nbytes, source.extents, self.slots[job.slot])

    def pump(self, jobs, first=None):
        pass

    def wait(self, job):
        wait_read(job.ready)

    def done(self, job):
        pass

    def synchronize(self):
        pass

    # -- the trace's clock --------------------------------------------------------------------------
    def mark(self):
        return time.perf_counter()

    def span(self, kind, name, start, end_mark=None):
        self.trace.host_event(kind, name, start, time.perf_counter() if end_mark is None else end_mark)


class CudaMover:
    """See the module's docstring. ``units`` and ``sources`` are the engine's (sources change as
    units are held); ``schedule`` hears when a staged read has been copied out."""

    def __init__(self, torch, device, slot_bytes: int, slots: int, *, units, sources, schedule, reader, trace,
                 stats):
        self.torch, self.device = torch, device
        self.units, self.sources, self.schedule, self.reader = units, sources, schedule, reader
        self.trace, self.stats = trace, stats
        self.copy_stream = torch.cuda.Stream(device)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(slots)]
        self.slot_free = [torch.cuda.Event() for _ in range(slots)]
        self.compute_stream = torch.cuda.current_stream(device)
        if trace.enabled:
            trace.calibrate(torch.cuda)

    def begin_step(self):
        """Compute runs on the caller's current stream, looked up once a step."""
        self.compute_stream = self.torch.cuda.current_stream(self.device)

    def start(self, job, unit, source):
        pass            # copies are issued by pump, in queue order

    def pump(self, jobs, first=None):
        """Issue host-to-device copies for scheduled ``jobs``, in order, up to the first whose disk read
        has not landed. Only ``first`` (the unit about to compute, issued ahead of them) may wait for
        its read; the others are issued once their reads have landed, at a later hook.
        """
        torch = self.torch
        for job in ([first] if first is not None else []) + list(jobs):
            if job.copied:
                continue
            unit = self.units[job.unit]
            read = job.read
            if read is not None:
                if job is not first and not read_finished(read.io.future):
                    break
                wait_read(read.io.future)
                src = read.io.landing(unit.nbytes)
            else:
                src = self.sources[job.unit].flat
            timed = self.trace.enabled
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.slot_free[job.slot])
                start = torch.cuda.Event(enable_timing=True) if timed else None
                if timed:
                    start.record(self.copy_stream)
                self.slots[job.slot][:unit.nbytes].copy_(src[:unit.nbytes], non_blocking=True)
                done = torch.cuda.Event(enable_timing=timed)
                done.record(self.copy_stream)
            job.ready, job.copied = done, True
            if timed:
                self.trace.cuda_event("copy", unit.name, start, done, unit.nbytes)
            if read is not None:
                self.schedule.copied(read)
                read.io.staging.finish(done)
                self.stats.bytes_from_disk += unit.nbytes
            else:
                self.stats.bytes_from_cpu += unit.nbytes

    def wait(self, job):
        self.pump(self.schedule.queue, first=job)
        self.compute_stream.wait_event(job.ready)

    def done(self, job):
        self.slot_free[job.slot].record(self.compute_stream)

    def synchronize(self):
        self.copy_stream.synchronize()
        self.torch.cuda.current_stream(self.device).synchronize()

    # -- the trace's clock: events on the compute stream, resolved after the step ---------------------
    def mark(self):
        ev = self.torch.cuda.Event(enable_timing=True)
        ev.record(self.compute_stream)
        return ev

    def span(self, kind, name, start, end_mark=None):
        self.trace.cuda_event(kind, name, start, self.mark() if end_mark is None else end_mark)
