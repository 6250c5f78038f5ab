"""The schedule: which streamed unit goes into which staging slot, and which disk read into which
staging buffer, when. Pure Python (no torch), so it can be read and tested on its own.

The order units run in is learned from the first forward pass; the schedule keeps ``prefetch``
units queued beyond the one computing, following that order and wrapping around into the next
step. Positions are a running count over repeated passes (position ``p`` runs unit
``order[p % len(order)]``). Where units come from disk through page-locked staging buffers
(CUDA), reads are issued ``read_ahead`` units ahead of the copies, into a ring of staging buffers.

A unit that arrives out of order (a surprise) resets the queue and restarts it from that unit:
a surprise costs time, never correctness. Reads the reset leaves without a user are handed back
as abandoned, so the reader can drop what it has not started.

A step larger than the CPU computes (a prefill) streams the blocks the CPU computes in decode steps
too (hybrid.py): such a step runs ``large_order``, the others ``order``; the schedule switches between
them at a step's start (``use``), as it does when units are held out of the stream (``hold``).

Slots keep what they hold (``kept``): the movers say which unit's bytes each slot holds whole once they
have issued its copy or read (``keep``), and forget it where something else writes there. A queue that
restarts (a switch of order, units held, a replay in between) places a unit in the slot that holds it,
and that job brings nothing; the other jobs take the free slots whose units run last. A prefill that
finds its first units in the slots, put there while the host was idle (the engine's ``prime``), streams
only what the resident blocks and the slots can't hold: deeper staging then costs a prefill nothing.

The schedule says what should happen; the movers and the reader do it (engine.py wires them up).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(eq=False)
class Read:
    """A disk read of ``unit`` into staging buffer ``staging``, ahead of its copy."""

    unit: int
    staging: int
    claimed: bool = False      # a queued job will copy out of it
    io: object = None          # the reader's record of the read in flight


@dataclass(eq=False)
class Job:
    """``unit``'s bytes brought into staging slot ``slot`` (through ``read`` where they come from disk)."""

    unit: int
    slot: int
    read: Read | None = None
    ready: object = None       # the mover's: a CUDA event (copy done) or a future (read done)
    copied: bool = False       # the mover's: the copy into the slot has been issued
    kept: bool = False         # its slot held its bytes already (``Schedule.kept``): nothing to bring
    # The engine's: None where the unit comes whole; else it comes without its routed experts (experts.py),
    # which its experts module's pre-hook brings: on CUDA these are the byte ranges to copy now, on the
    # CPU an empty list (the reader is given a source holding only those ranges)
    ranges: list | None = None
    # The engine's, where the unit comes whole: (key, entry) of its experts the expert cache holds, whose rows
    # the engine copies from there just before the unit computes; the mover brings the rest of its bytes
    cached: list = field(default_factory=list)
    rest: list | None = None    # those other byte ranges, where ``cached`` isn't empty


@dataclass
class Work:
    """What a schedule decision asks of the movers and the reader, in order."""

    jobs: list[Job] = field(default_factory=list)          # scheduled into slots, oldest first
    reads: list[Read] = field(default_factory=list)        # reads to issue, in run order
    abandoned: list[Read] = field(default_factory=list)    # reads nobody will use now

    def __iadd__(self, other: Work) -> Work:
        self.jobs += other.jobs
        self.reads += other.reads
        self.abandoned += other.abandoned
        return self


class Schedule:
    """The slot ring, the staging ring and the read-ahead window over a learned run order.

    ``order``: engine unit indices that stream, in the order expected to run. ``slots``: staging
    slots on the compute device; ``prefetch``: units queued beyond the one computing. ``staging``:
    page-locked buffers disk reads land in (0: disk units are read straight into their slot);
    ``read_ahead``: reads kept issued beyond the copies. ``from_disk``: units whose bytes come from disk.
    ``large_order``: the order of a large step, where it streams more units (hybrid.py); else ``order``.
    ``usable(ready)``: whether a slot's kept bytes may be used (the CPU's: its read didn't fail).
    """

    def __init__(self, order, *, slots: int, prefetch: int, staging: int = 0, read_ahead: int = 1,
                 from_disk=(), large_order=None, usable=None):
        self.order = list(order)
        # the learned orders of small and large steps, held units included; ``order`` is the one in use
        self.orders = {False: list(order), True: list(order if large_order is None else large_order)}
        self.large = False
        self.held = frozenset()
        self.slots, self.prefetch = slots, max(1, prefetch)
        self.staging, self.read_ahead = staging, max(1, read_ahead)
        self.from_disk = set(from_disk)
        self.pos = 0                  # position of the next unit to compute
        self.read_pos = 0             # position of the next unit to read from disk
        self.queue: deque[Job] = deque()
        self.reads: deque[Read] = deque()     # issued reads whose copy is not issued yet
        self.active: dict[int, Job] = {}      # computing now
        self.seen: list[int] = []             # streamed units entered this step, in order
        self.next_slot = self.next_staging = 0
        self.wrap = True              # fill on into the next step (False while a step is captured)
        # per slot, (unit, ready) of the unit whose bytes it holds whole, as the movers last said, or None
        self.kept: list = [None] * slots
        self.keeping = True           # jobs may use kept bytes (the engine turns it off where others write slots)
        self.usable = usable or (lambda ready: True)
        self._positions = (None, 0, {})     # (the order indexed, its length, unit -> its positions there)

    # -- a step ---------------------------------------------------------------------------------
    def begin_step(self) -> Work:
        self.seen = []
        return self.fill() if self.order and not self.queue else Work()

    def take(self, idx: int) -> tuple[Job | None, Work]:
        """The job of ``idx``, about to compute (None when it is computing already: a module reused
        within one pass); ``start`` it once its bytes are in. A surprise first resets the queue and
        restarts it at ``idx``."""
        if idx in self.active:
            return None, Work()
        self.seen.append(idx)
        work = Work()
        if not self.queue or self.queue[0].unit != idx:
            work.abandoned = self.reset()
            self.pos = self.read_pos = self._position_of(idx)
            work += self.fill()
        job = self.queue.popleft()
        self.pos += 1
        return job, work

    def start(self, job: Job):
        """``job``'s unit computes now: its slot stays taken until ``release``."""
        self.active[job.unit] = job

    def release(self, idx: int) -> Job | None:
        """``idx`` finished computing: its slot may be refilled once the compute is done."""
        return self.active.pop(idx, None)

    def end_step(self) -> Work:
        """After a forward pass: a pass that ran every streamed unit in a new order teaches it."""
        if self.wrap and self.seen and self.seen != self.order and set(self.seen) >= set(self.order):
            self.order = list(self.seen)
            if not self.held:       # learned while units are held, it lasts until they stream again
                self.orders[self.large] = list(self.seen)
            work = Work(abandoned=self.reset())
            self.pos = self.read_pos = 0
            work += self.fill()
            return work
        return Work()

    # -- filling the rings ------------------------------------------------------------------------
    def fill(self) -> Work:
        """Queue the next unit and ``prefetch`` more into slots, and issue the reads they need."""
        work = Work()
        n = len(self.order)
        if not n:
            return work
        # never a unit queued twice where the order is shorter than the slots: its bytes are in a slot already
        want = min(self.prefetch + (0 if self.active else 1), self.slots, n - len(self.active))
        while len(self.queue) < want:
            position = self.pos + len(self.queue)
            if not self.wrap and position >= n:
                break
            unit = self.order[position % n]
            slot, kept = self._slot_for(unit, position)
            job = Job(unit, slot)
            self.next_slot = (slot + 1) % self.slots
            if kept is not None:        # its bytes are there: the mover brings nothing, the compute waits for them
                job.kept, job.copied, job.ready = True, True, kept[1]
            else:
                self.kept[slot] = None      # to be overwritten; the mover keeps the job's unit once it brings it
            if kept is None and self.staging and job.unit in self.from_disk:
                work.reads += self._issue_reads(position)
                job.read = next(r for r in self.reads if r.unit == job.unit and not r.claimed)
                job.read.claimed = True
            self.queue.append(job)
            work.jobs.append(job)
        if self.staging:
            work.reads += self._issue_reads(self.pos + len(self.queue) - 1)
        return work

    def _slot_for(self, unit: int, position: int):
        """The slot for ``unit``'s job at ``position``, and the slot's kept entry where it holds the unit's bytes
        (else None). A free slot: the one holding the unit, or of the others the one whose kept unit runs last
        from here (none kept: the next in ring order, as before slots kept anything)."""
        busy = {j.slot for j in self.queue} | {j.slot for j in self.active.values()}
        ring = [(self.next_slot + k) % self.slots for k in range(self.slots)]
        free = [s for s in ring if s not in busy]
        if not free:        # more jobs than slots (no pass makes them): the ring's next, as it always was
            return ring[0], None
        if self.keeping and not (self.staging and unit in self.from_disk):     # staged reads go by position
            s = self.holder(unit, free)
            if s is not None:
                return s, self.kept[s]
        if len(free) > 1 and any(self.kept[s] is not None for s in free):
            free.sort(key=lambda s: -self._needed_after(self.kept[s], position))    # stable: ring order in ties
        return free[0], None

    def _needed_after(self, entry, position: int) -> float:
        """How many positions after ``position`` the unit of kept ``entry`` runs next (inf: none, or not at all)."""
        if entry is None:
            return math.inf
        n = len(self.order)
        indexed, length, runs_at = self._positions
        if indexed is not self.order or length != n:    # another order, or a unit appended to this one
            runs_at = {}
            for i, u in enumerate(self.order):
                runs_at.setdefault(u, []).append(i)
            self._positions = (self.order, n, runs_at)
        at = runs_at.get(entry[0])
        return min((i - position) % n for i in at) if at else math.inf

    # -- what the slots hold -------------------------------------------------------------------------
    def holder(self, unit: int, among=None) -> int | None:
        """The first slot of ``among`` (every slot, where None) that holds ``unit``'s bytes whole, usable; else None."""
        for s in range(self.slots) if among is None else among:
            entry = self.kept[s]
            if entry is not None and entry[0] == unit and self.usable(entry[1]):
                return s
        return None

    def keep(self, slot: int, unit: int, ready=None):
        """``slot`` holds ``unit``'s bytes whole once ``ready`` (the mover's event or future) is."""
        if self.keeping:
            self.kept[slot] = (unit, ready)

    def forget(self, slot: int | None = None):
        """``slot`` (every slot, where None) may hold anything now: it was written otherwise."""
        if slot is None:
            self.kept = [None] * self.slots
        else:
            self.kept[slot] = None

    def _issue_reads(self, must_reach: int) -> list[Read]:
        """Reads in run order: through position ``must_reach``, then ``read_ahead`` unclaimed ones."""
        out = []
        n = len(self.order)
        ahead = sum(1 for r in self.reads if not r.claimed)
        while self.read_pos <= must_reach or (ahead < self.read_ahead and self.read_pos < self.pos + n):
            idx = self.order[self.read_pos % n]
            self.read_pos += 1
            if idx not in self.from_disk:
                continue
            read = Read(idx, self.next_staging)
            self.next_staging = (self.next_staging + 1) % self.staging
            self.reads.append(read)
            out.append(read)
            ahead += 1
        return out

    def copied(self, read: Read):
        """The copy out of ``read``'s staging buffer has been issued: the read is done with."""
        self.reads.remove(read)

    def reset(self) -> list[Read]:
        """Forget the queue; returns the issued reads nobody will copy now (to abandon). Reading
        starts again from the next unit to compute."""
        abandoned = list(self.reads)
        self.reads.clear()
        self.queue.clear()
        self.active.clear()
        self.read_pos = self.pos
        return abandoned

    def restart(self, *, wrap: bool):
        """Start over from the first unit of a step, in the first slot (a captured step begins so, and
        the eager steps after it: the graph's slot events mean nothing outside it)."""
        abandoned = self.reset()
        self.pos = self.read_pos = self.next_slot = self.next_staging = 0
        self.wrap = wrap
        return abandoned

    def _position_of(self, idx: int) -> int:
        """The next position at which ``idx`` runs (a unit the learned order lacks is appended:
        run it now, relearn after the step)."""
        n = len(self.order)
        for k in range(n):
            if self.order[(self.pos + k) % n] == idx:
                return self.pos + k
        self.order.append(idx)
        return self.pos - self.pos % (n + 1) + n if n else 0

    # -- which units stream ------------------------------------------------------------------------
    def use(self, large: bool) -> list[Read]:
        """Run the large steps' order (True) or the small ones' from this step on; returns the reads the
        switch leaves without a user (the queue restarts from the step's first unit)."""
        self.large = large
        return self._apply()

    def hold(self, held) -> list[Read]:
        """Take ``held`` out of the order (they run from buffers of their own) until ``unhold``."""
        self.held = frozenset(held)
        return self._apply()

    def unhold(self) -> list[Read]:
        self.held = frozenset()
        return self._apply()

    def _apply(self) -> list[Read]:
        order = [i for i in self.orders[self.large] if i not in self.held]
        if order == self.order:
            return []
        self.order = order
        abandoned = self.reset()
        self.pos = self.read_pos = 0
        return abandoned
