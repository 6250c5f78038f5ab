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

Both tell the schedule which unit's bytes a slot holds whole once they have issued its copy or read
(``Schedule.keep``), or that it holds something else now (``forget``); a job whose slot holds its unit
already (``job.kept``) brings nothing, and its compute waits for the copy or read that put them there.

A new way to bring bytes in (quantized units, experts on demand) is a new mover beside these.
"""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

from .reader import read_finished, wait_read


class CpuMover:
    def __init__(self, torch, slot_bytes: int, slots: int, *, reader, trace, stats, schedule):
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(slots)]
        self.reader, self.trace, self.stats, self.schedule = reader, trace, stats, schedule

    def start(self, job, unit, source, nbytes=None):
        """``nbytes``: what ``source`` holds where it is a part of the unit (a block without its experts). A
        source in memory (a block the CPU computes in small steps, streamed for a large one) is copied."""
        if job.kept:
            return
        whole = nbytes is None and job.ranges is None
        nbytes = unit.nbytes if nbytes is None else nbytes
        if source.flat is not None:     # on the reader's thread: a read into this slot may still be landing
            job.ready = self.reader.copy_into(source.flat[:nbytes], self.slots[job.slot])
            self.stats.bytes_from_cpu += nbytes
        else:
            self.stats.bytes_from_disk += nbytes
            job.ready = self.reader.read_into(unit.name, nbytes, source.extents, self.slots[job.slot])
        if whole:
            self.schedule.keep(job.slot, job.unit, job.ready)
        else:
            self.schedule.forget(job.slot)

    def pump(self, jobs, first=None):
        pass

    def wait(self, job):
        if job.ready is not None:
            try:
                wait_read(job.ready)
            except BaseException:
                self.schedule.forget(job.slot)      # what landed there is not the unit's
                raise

    def done(self, job):
        pass

    def synchronize(self):
        pass

    # -- the trace's clock --------------------------------------------------------------------------
    def mark(self):
        return time.perf_counter()

    def span(self, kind, name, start, end_mark=None):
        self.trace.host_event(kind, name, start, time.perf_counter() if end_mark is None else end_mark)


# device index -> whether a captured graph's wait on an external event takes the event's record made before the
# graph's launch (graph_waits_take_launch_record)
_LAUNCH_RECORD: dict = {}


def graph_waits_take_launch_record(torch, device) -> bool:
    """Whether a CUDA graph's wait on an external event takes the record made before the graph's launch and not
    one queued after it, checked once a device (about 0.1 s). ``CudaMover.present`` relies on it: a replay
    waits for its first units' copies, recorded before its launch, while the next step's copies record the same
    events again during the replay; a wait that took those later records would wait for the replay's own end,
    for good. Where it doesn't hold, or the check can't tell, replays wait for all those copies before they
    start (``before_graph``)."""
    device = torch.device(device)
    key = device.index
    try:
        if key is None:
            key = torch.cuda.current_device()
        if key not in _LAUNCH_RECORD:
            _LAUNCH_RECORD[key] = _check_launch_record(torch, torch.device("cuda", key))
    except Exception:   # noqa: BLE001 - no CUDA, an unexpected driver or torch: the wait that needs no check
        _LAUNCH_RECORD.setdefault(key, False)
    return _LAUNCH_RECORD[key]


def _check_launch_record(torch, device) -> bool:
    """A graph that sleeps 10 ms, then waits on an event recorded (done) before its launch; after the launch the
    host records the event again behind a sleep of at least 10 ms on another stream, timed there. The wait
    takes the earlier record where the graph ends well before that sleep does. The sleeps are measured in
    cycles at the clock a sleep of 20 ms brought the GPU to, so an idle clock doesn't shorten them."""
    with torch.cuda.device(device):
        side, own = torch.cuda.Stream(device), torch.cuda.Stream(device)

        def timed(stream, cycles):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record(stream)
                torch.cuda._sleep(cycles)
                end.record(stream)
            return start, end
        for _ in range(2):              # the second at the clock the first raised
            start, end = timed(own, 20_000_000)
            end.synchronize()
        cycles_per_ms = 20_000_000 / max(start.elapsed_time(end), 1e-3)
        arrived = torch.cuda.Event(external=True)
        arrived.record(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=own, capture_error_mode="thread_local"):
            torch.cuda._sleep(int(10 * cycles_per_ms))
            own.wait_event(arrived)
            torch.cuda._sleep(1)
        own.synchronize()
        arrived.record(side)                            # before the launch: done at once
        side.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(own):
            start.record(own)
            graph.replay()
            after = timed(side, int(40 * cycles_per_ms))     # after the launch: behind a sleep
            arrived.record(side)
            end.record(own)
        torch.cuda.synchronize(device)
        graph_ms, sleep_ms = start.elapsed_time(end), after[0].elapsed_time(after[1])
        return sleep_ms >= 10 and graph_ms < sleep_ms / 2


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
        # per slot, the arrival of a replay's first unit copied there before the launch (``prefetch``); a
        # captured step waits on it where that unit computes, not for every such copy before it starts.
        # Recorded once now: torch creates an event at its first record, and a wait on one not yet created
        # is skipped, which inside a capture would leave the unit's compute unordered after its copy
        self.arrived = [torch.cuda.Event(external=True) for _ in range(slots)]
        for ev in self.arrived:
            ev.record(self.copy_stream)
        self.prefetched_after = None    # an event after the copies issued before the last prefetch's
        self.waits_per_unit = None      # graph_waits_take_launch_record, checked before the first capture
        self.compute_stream = torch.cuda.current_stream(device)
        self.in_capture = False
        if trace.enabled:
            trace.calibrate(torch.cuda)

    def begin_step(self):
        """Compute runs on the caller's current stream, looked up once a step."""
        self.compute_stream = self.torch.cuda.current_stream(self.device)

    def start(self, job, unit, source, nbytes=None):
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
            ranges = job.ranges if job.ranges is not None else job.rest if job.rest is not None \
                else [(0, unit.nbytes)]
            nbytes = sum(b - a for a, b in ranges)
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.slot_free[job.slot])
                start = self._stamp(self.copy_stream) if timed else None
                for a, b in ranges:
                    self.slots[job.slot][a:b].copy_(src[a:b], non_blocking=True)
                # inside a capture the ordering event and the timing stamp are separate events
                done = self._kept(torch.cuda.Event(enable_timing=timed and not self.in_capture))
                done.record(self.copy_stream)
                end = self._stamp(self.copy_stream) if timed and self.in_capture else done
            job.ready, job.copied = done, True
            if not self.in_capture:         # (a capture's copies land at its replays, which forget the slots)
                self.copied_since_prefetch()
                if read is None and ranges == [(0, unit.nbytes)]:
                    self.schedule.keep(job.slot, job.unit, done)
                else:
                    self.schedule.forget(job.slot)
            if timed:
                self.trace.cuda_event("copy", unit.name, start, end, nbytes)
            if read is not None:
                self.schedule.copied(read)
                read.io.staging.finish(done)
                self.stats.bytes_from_disk += nbytes
            else:
                self.stats.bytes_from_cpu += nbytes

    def copy_now(self, name, ranges, src, slot) -> int:
        """Copy byte ``ranges`` of ``src`` (page-locked) into the same ranges of ``slot``, in order on the
        compute stream, which then waits for them (a MoE block's routed experts); the bytes copied."""
        timed = self.trace.enabled
        start = self._stamp(self.compute_stream) if timed else None
        with self.torch.cuda.stream(self.compute_stream):
            for a, b in ranges:
                slot[a:b].copy_(src[a:b], non_blocking=True)
        nbytes = sum(b - a for a, b in ranges)
        if timed:
            self.trace.cuda_event("copy", name, start, self._stamp(self.compute_stream), nbytes)
        return nbytes

    def wait(self, job):
        self.pump(self.schedule.queue, first=job)
        if job.ready is not None:           # None: in its slot before the step began (a replay's first units)
            self.compute_stream.wait_event(job.ready)

    def done(self, job):
        self.slot_free[job.slot].record(self.compute_stream)
        if self.in_capture:     # the slot's last use so far, as an event the graph records on every replay
            self._captured.last_use[job.slot] = ev = self._kept(self.torch.cuda.Event(external=True))
            ev.record(self.compute_stream)

    def _kept(self, event):
        """An event recorded inside a capture lives as long as the graph: one destroyed before the capture
        ends leaves the graph pointing at freed driver state (a crash at ``capture_end``)."""
        if self.in_capture:
            self._captured.keep.append(event)
        return event

    def synchronize(self):
        self.copy_stream.synchronize()
        self.torch.cuda.current_stream(self.device).synchronize()

    # -- capture and replay (graphs.py) ---------------------------------------------------------------
    @contextlib.contextmanager
    def capturing(self):
        """Inside ``torch.cuda.graph``: the copy stream forks from the capture and joins it at the end, and
        the slots start free, so everything the step does between them is recorded."""
        torch = self.torch
        capture = torch.cuda.current_stream(self.device)
        self.in_capture = True
        self._captured = SimpleNamespace(ahead=[], last_use={}, keep=list(self.slot_free) + list(self.arrived))
        fork = self._kept(torch.cuda.Event())
        fork.record(capture)
        self.copy_stream.wait_event(fork)
        for ev in self.slot_free:
            ev.record(capture)
        try:
            yield self._captured
            join = self._kept(torch.cuda.Event())
            join.record(self.copy_stream)
            capture.wait_event(join)
        finally:
            self.reset_events()

    def present(self, jobs):
        """Inside a capture: ``jobs`` are copied into their slots before a replay is launched (``prefetch``).
        Where graph waits take the launch's record (``waits_per_unit``), the replay waits for each one's arrival
        where it computes it (an external event ``prefetch`` records), and the graph's own copies follow the
        last; else ``before_graph`` waits for all of them before the replay starts."""
        for job in jobs:
            job.copied, job.ready = True, self.arrived[job.slot] if self.waits_per_unit else None
            self._captured.ahead.append((job.unit, job.slot))
        if jobs and self.waits_per_unit:    # the graph's own copies follow those on the link, as on one stream
            self.copy_stream.wait_event(self.arrived[jobs[-1].slot])

    def prefetch(self, ahead, last_use):
        """Copy a replay's first units into their slots: each once ``last_use[slot]`` (an event of the replay
        before) has passed, or, with ``last_use`` None, after everything the compute stream has queued."""
        torch = self.torch
        timed = self.trace.enabled
        with torch.cuda.stream(self.copy_stream):
            if last_use is None:
                self.copy_stream.wait_stream(self.compute_stream)
            self.prefetched_after = torch.cuda.Event()
            self.prefetched_after.record(self.copy_stream)
            for unit_index, slot in ahead:
                if last_use is not None and slot in last_use:
                    self.copy_stream.wait_event(last_use[slot])
                unit = self.units[unit_index]
                start = self._stamp(self.copy_stream) if timed else None
                self.slots[slot][:unit.nbytes].copy_(self.sources[unit_index].flat[:unit.nbytes], non_blocking=True)
                self.arrived[slot].record(self.copy_stream)
                self.schedule.keep(slot, unit_index, self.arrived[slot])
                if timed:
                    self.trace.cuda_event("copy", unit.name, start, self._stamp(self.copy_stream), unit.nbytes)
                self.stats.bytes_from_cpu += unit.nbytes

    def reset_events(self):
        """Fresh slot events: those recorded inside a capture mean nothing outside it."""
        self.in_capture = False
        self.slot_free = [self.torch.cuda.Event() for _ in self.slots]

    def copied_since_prefetch(self):
        """A copy was queued on the copy stream after the last ``prefetch``: the next replay waits for
        everything there (``before_graph``)."""
        self.prefetched_after = None

    def before_graph(self):
        """A replay waits for any eager copy still in flight into the slots: those issued before the last
        ``prefetch`` (the replay's first units), whose own copies it waits for unit by unit."""
        if self.prefetched_after is None or not self.waits_per_unit:
            self.compute_stream.wait_stream(self.copy_stream)
        else:
            self.compute_stream.wait_event(self.prefetched_after)

    def after_graph(self):
        """Eager copies after a replay wait for it to be done with the slots."""
        self.copy_stream.wait_stream(self.compute_stream)

    # -- the trace's clock: events on the compute stream, resolved after the step ---------------------
    def _stamp(self, stream):
        """A timing event recorded on ``stream``; inside a capture, one the graph records on every replay."""
        ev = self._kept(self.torch.cuda.Event(enable_timing=True, external=self.in_capture))
        ev.record(stream)
        return ev

    def mark(self):
        return self._stamp(self.compute_stream)

    def span(self, kind, name, start, end_mark=None):
        self.trace.cuda_event(kind, name, start, self.mark() if end_mark is None else end_mark)
