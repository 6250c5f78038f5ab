"""The schedule alone: slots, read-ahead, surprises, learning and holds, with no torch and no model."""

import random
import subprocess
import sys

from nb_offload.schedule import Schedule


def run_pass(s, order, computed=None):
    """Take and release each unit of ``order`` as a forward pass would; returns the jobs taken."""
    s.begin_step()
    jobs = []
    for idx in order:
        job, _ = s.take(idx)
        s.start(job)
        jobs.append(job)
        s.fill()
        s.release(idx)
        if computed is not None:
            computed.append((idx, job.slot))
    s.end_step()
    return jobs


def test_slots_alternate_and_the_queue_wraps_into_the_next_step():
    s = Schedule([0, 1, 2], slots=2, prefetch=1)
    first = s.begin_step()
    assert [(j.unit, j.slot) for j in first.jobs] == [(0, 0), (1, 1)]     # one computing, one ahead
    taken = []
    for idx in (0, 1, 2):
        job, work = s.take(idx)
        assert not work.abandoned and not work.jobs          # in order: no reset
        s.start(job)
        taken.append((job.unit, job.slot))
        s.fill()
        s.release(idx)
    assert taken == [(0, 0), (1, 1), (2, 0)]
    assert [j.unit for j in s.queue] == [0]                  # the next step's first unit is already queued
    assert s.pos == 3


def test_a_slot_is_never_given_to_two_units_at_once():
    rng = random.Random(7)
    order = list(range(9))
    s = Schedule(order, slots=3, prefetch=2)
    for _ in range(40):
        s.begin_step()
        run = order if rng.random() < 0.7 else rng.sample(order, len(order))
        for idx in run:
            job, _ = s.take(idx)
            s.start(job)
            s.fill()
            busy = [j.slot for j in s.queue] + [j.slot for j in s.active.values()]
            assert len(busy) == len(set(busy)) <= 3, busy
            s.release(idx)
        s.end_step()


def test_a_surprise_resets_the_queue_and_restarts_at_that_unit():
    s = Schedule([0, 1, 2, 3], slots=3, prefetch=2, staging=2, read_ahead=2, from_disk={1, 2, 3})
    s.begin_step()
    job, _ = s.take(0)
    s.start(job)
    s.fill()
    issued = list(s.reads)
    assert [r.unit for r in issued] == [1, 2, 3]
    s.release(0)
    job, work = s.take(3)               # skips 1 and 2
    assert job.unit == 3
    assert set(work.abandoned) >= set(issued[:2])         # their reads are of no use now
    assert [j.unit for j in s.queue] == [0, 1]             # restarted at 3, wrapping round
    assert s.pos == 4


def test_the_run_order_is_learned_from_a_pass_that_ran_every_unit():
    s = Schedule([0, 1, 2], slots=2, prefetch=1)
    run_pass(s, [2, 0, 1])
    assert s.order == [2, 0, 1]
    computed = []
    s2 = Schedule([0, 1, 2], slots=2, prefetch=1)
    run_pass(s2, [0, 1])                 # a partial pass teaches nothing
    assert s2.order == [0, 1, 2]
    run_pass(s, [2, 0, 1], computed)
    assert [j for j, _ in computed] == [2, 0, 1]


def test_a_unit_missing_from_the_order_runs_and_is_learned():
    s = Schedule([0, 1], slots=2, prefetch=1)
    s.begin_step()
    for idx in (0, 5, 1):
        job, _ = s.take(idx)
        s.start(job)
        assert job.unit == idx
        s.fill()
        s.release(idx)
    s.end_step()
    assert s.order == [0, 5, 1]


def test_disk_reads_run_ahead_of_the_copies_in_run_order():
    order = list(range(8))
    disk = {1, 3, 4, 6}
    s = Schedule(order, slots=2, prefetch=1, staging=2, read_ahead=2, from_disk=disk)
    work = s.begin_step()
    # unit 1 is queued: its read is issued, plus read_ahead more not yet claimed by a job
    assert [r.unit for r in work.reads] == [1, 3, 4]
    assert [r.staging for r in work.reads] == [0, 1, 0]         # a ring of staging buffers
    job1 = s.queue[1]
    assert job1.unit == 1 and job1.read is work.reads[0] and job1.read.claimed
    for read in list(s.reads):          # the copies out of them are issued: they no longer count ahead
        if read.claimed:
            s.copied(read)
    issued = []
    for idx in order:
        job, w = s.take(idx)
        s.start(job)
        issued += [r.unit for r in w.reads]
        w2 = s.fill()
        issued += [r.unit for r in w2.reads]
        for read in [r for r in s.reads if r.claimed]:
            s.copied(read)
        assert sum(1 for r in s.reads if not r.claimed) <= 2
        s.release(idx)
    assert issued == [6, 1, 3]           # in run order, wrapping into the next step
    assert all(j.read is not None for j in s.queue if j.unit in disk)


def test_holding_takes_units_out_of_the_order_until_released():
    s = Schedule([0, 1, 2, 3], slots=2, prefetch=1)
    run_pass(s, [0, 1, 2, 3])
    s.hold({1, 3})
    assert s.order == [0, 2]
    jobs = run_pass(s, [0, 2])
    assert [j.unit for j in jobs] == [0, 2]
    s.unhold()
    assert s.order == [0, 1, 2, 3] and s.pos == 0


def test_large_steps_run_their_own_order_and_each_kind_learns_its_own():
    """A large step (a prefill) streams the CPU's blocks too (hybrid.py): the schedule switches orders at a
    step's start, restarting its queue, and a step learns only its own kind's order."""
    s = Schedule([0, 2], slots=2, prefetch=1, large_order=[0, 1, 2, 3])
    assert s.use(False) == [] and s.order == [0, 2]
    run_pass(s, [0, 2])
    s.use(True)
    assert s.order == [0, 1, 2, 3] and s.pos == 0
    assert [j.unit for j in run_pass(s, [0, 1, 2, 3])] == [0, 1, 2, 3]
    run_pass(s, [1, 0, 2, 3])       # a large step in another order: learned for large steps
    assert s.order == [1, 0, 2, 3]
    s.use(False)
    assert s.order == [0, 2] and s.pos == 0 and not s.queue
    s.hold({2})
    s.use(True)
    assert s.order == [1, 0, 3]     # held units stay out of either order
    s.unhold()
    s.use(False)
    assert s.order == [0, 2]


def test_the_schedule_imports_no_torch():
    code = "import sys, nb_offload.schedule; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_after_a_pass_cut_short_reading_restarts_at_the_next_unit():
    """An exception mid-pass resets the schedule; the next pass must find a read for every disk unit
    (the reads issued ahead were dropped, so reading starts again where computing does)."""
    s = Schedule([0, 1, 2, 3], slots=2, prefetch=1, staging=2, read_ahead=2, from_disk={0, 1, 2, 3})
    s.begin_step()
    for idx in (0, 1):
        job, _ = s.take(idx)
        s.start(job)
        s.fill()
        s.release(idx)
    abandoned = s.reset()               # what the engine does when the pass raised
    assert abandoned and not s.reads
    work = s.begin_step()
    assert [j.unit for j in work.jobs] == [2, 3]
    assert all(j.read is not None and j.read in work.reads for j in work.jobs)
    assert [r.unit for r in work.reads][:2] == [2, 3]


def test_a_job_counts_as_computing_only_once_started():
    s = Schedule([0, 1, 2], slots=2, prefetch=1)
    s.begin_step()
    job, _ = s.take(0)
    assert 0 not in s.active            # its bytes may still be on their way
    s.start(job)
    assert s.active == {0: job}
    assert s.take(0) == (None, s.take(0)[1])     # re-entered within the pass: nothing to do


# -- what the slots keep -------------------------------------------------------------------------------
def bring(s, work, held=None):
    """What a mover does with a schedule decision: each job not kept gets its unit's bytes (``held``: slot ->
    the unit whose bytes it holds, kept up to date), which the schedule then keeps; the units brought."""
    brought = []
    for job in work.jobs:
        if not job.kept:
            s.keep(job.slot, job.unit, f"copy of {job.unit}")
            brought.append(job.unit)
            if held is not None:
                held[job.slot] = job.unit
    return brought


def pass_bringing(s, order, held=None):
    """``run_pass``, with a mover's part: the units brought into slots over the pass (its tail's included)."""
    brought = bring(s, s.begin_step(), held)
    for idx in order:
        job, work = s.take(idx)
        brought += bring(s, work, held)
        if held is not None:
            assert held.get(job.slot) == idx, (idx, job.slot, held)     # it computes from its own bytes
        s.start(job)
        brought += bring(s, s.fill(), held)
        s.release(idx)
    brought += bring(s, s.end_step(), held)
    return brought


def test_a_restarted_queue_finds_units_in_the_slots_that_hold_them():
    """A queue that starts over (a replay, a switch of order, units held) places each unit in the slot that
    holds it: that job brings nothing, and its compute waits for what brought it there."""
    s = Schedule([0, 1, 2, 3, 4], slots=3, prefetch=2)
    pass_bringing(s, [0, 1, 2, 3, 4])
    held = {slot: entry[0] for slot, entry in enumerate(s.kept)}
    assert sorted(held.values()) == [0, 1, 4]       # the last unit, and the next step's first two
    s.restart(wrap=True)
    work = s.begin_step()
    kept = [j for j in work.jobs if j.kept]
    assert [(j.unit, j.slot, j.copied, j.ready) for j in kept] == \
        [(u, slot, True, f"copy of {u}") for u in (0, 1) for slot in [next(k for k, v in held.items() if v == u)]]
    other = next(j for j in work.jobs if not j.kept)
    assert other.unit == 2 and held[other.slot] == 4      # the slot whose unit runs last from here


def test_a_switch_of_order_keeps_what_both_orders_share():
    """A prefill after decode steps (hybrid.py): the large order's units that the small order's last step left
    in the slots are not brought again; the CPU's blocks take the slots whose units run last."""
    s = Schedule([0, 2, 4], slots=3, prefetch=2, large_order=[0, 1, 2, 3, 4])
    pass_bringing(s, [0, 2, 4])
    assert {e[0] for e in s.kept} == {0, 2, 4}
    s.use(True)
    # 0 and 2 found; 1 takes 4's slot (4 runs last), then each unit the slot the last one left
    assert pass_bringing(s, [0, 1, 2, 3, 4]) == [1, 3, 4, 0, 1]


def test_more_units_than_slots_are_brought_every_step_and_fewer_once():
    """Keeping changes nothing in a steady stream of more units than slots (one slot is free at a time, as
    in a ring); as many units as slots are brought once, then found there every step."""
    s = Schedule([0, 1, 2, 3], slots=3, prefetch=2)
    for _ in range(3):
        pass_bringing(s, [0, 1, 2, 3])
    assert sorted(pass_bringing(s, [0, 1, 2, 3])) == [0, 1, 2, 3]
    s = Schedule([0, 1, 2], slots=3, prefetch=2)
    assert sorted(pass_bringing(s, [0, 1, 2])) == [0, 1, 2]
    assert pass_bringing(s, [0, 1, 2]) == pass_bringing(s, [0, 1, 2]) == []


def test_nothing_is_found_that_was_forgotten_unusable_or_not_kept():
    def restarted(s):
        s.restart(wrap=True)
        return [j.kept for j in s.begin_step().jobs]
    s = Schedule([0, 1, 2], slots=3, prefetch=2)
    pass_bringing(s, [0, 1, 2])
    assert any(restarted(s))
    s.forget()
    assert not any(restarted(s)) and s.kept == [None] * 3
    s.keep(0, 0, "a read that failed")
    s.usable = lambda ready: ready != "a read that failed"
    assert not any(restarted(s))
    s = Schedule([0, 1, 2], slots=3, prefetch=2)
    s.keeping = False       # where others write the slots too (routed experts)
    pass_bringing(s, [0, 1, 2])
    assert s.kept == [None] * 3 and not any(restarted(s))


def test_units_read_through_staging_buffers_are_never_found_in_a_slot():
    """On CUDA a disk unit's read is issued by position, ahead of its job: it is always brought."""
    s = Schedule([0, 1, 2], slots=3, prefetch=2, staging=2, read_ahead=2, from_disk={1})
    pass_bringing(s, [0, 1, 2])
    s.restart(wrap=True)
    jobs = {j.unit: j for j in s.begin_step().jobs}
    assert jobs[0].kept and not jobs[1].kept and jobs[1].read is not None


def test_every_unit_computes_from_its_own_bytes_through_restarts_switches_and_holds():
    """Random passes, restarts, switches of order, holds and forgetting: no slot is given to two jobs at
    once, and each unit computes from a slot holding its bytes (a mover's copies simulated)."""
    rng = random.Random(11)
    small, large = [0, 2, 4, 6], [0, 1, 2, 3, 4, 5, 6]
    for slots in (2, 3, 5, 8):
        s = Schedule(small, slots=slots, prefetch=slots - 1, large_order=large)
        held = {}
        for _ in range(60):
            r = rng.random()
            if r < 0.15:
                s.restart(wrap=True)
            elif r < 0.3:
                s.use(rng.random() < 0.5)
            elif r < 0.4:
                s.hold(set(rng.sample(large, 2)))
            elif r < 0.5:
                s.unhold()
            elif r < 0.55:      # a step cut short: the queue forgotten, and what the slots hold
                s.reset()
                s.forget()
                held.clear()
            run = list(s.order) if rng.random() < 0.8 else rng.sample(s.order, len(s.order))
            pass_bringing(s, run, held)
            busy = [j.slot for j in s.queue] + [j.slot for j in s.active.values()]
            assert len(busy) == len(set(busy))
