"""How a block computed on the CPU passes between the GPU's stream and the worker thread that computes it
(hybrid.py), so that neither the caller nor the GPU's other work waits on the host.

A CPU block's call in a CUDA decode step: its inputs are copied into page-locked buffers on the GPU's stream,
the worker computes the block from them once they are there and writes its output to a page-locked buffer,
and the GPU's stream waits until the worker says it is written before copying it back. The caller goes on
launching the blocks after it and queueing the link's copies meanwhile.

- Eager steps: the worker waits for an event recorded after the inputs' copies; the GPU's stream waits on
  a counter the worker raises (cpu_experts.HostSignal, the driver's ``cuStreamWaitValue32``).
- A captured step (graphs.py; ``recording``): no host runs during a replay, so the graph itself sets a flag
  in page-locked memory once the inputs are copied (``cuStreamWriteValue32``), which the worker polls and
  clears, and waits for the worker's flag before the copy back, clearing it too: every replay then does the
  same. The calls made while the step is captured become the graph's ``program``, which ``run`` hands to
  the worker at each replay, in the same order.

A block's failure on the worker, or a worker that never ran it, still sets its flag or raises the counter, so
the GPU never waits for good; the error reaches the caller at the step's end (engine._collect).

The output comes back to the device (``READ_BACK``, read when the engine is built) by a host-to-device copy on
the GPU's stream, which the copy engine runs; or by a kernel that reads the page-locked buffer where it is
(``fetch.in_place``) with loads that no cache answers (``fetch.read_fresh``: the worker rewrites those bytes every
step) and writes them to the device unchanged. Why: the link's copy stream keeps the copy engine busy with pieces
of 90-134 MiB, and a small copy that waits for the piece in flight would hold each CPU block's output back by up
to a piece's time (benchmarks/handoff_latency.py measures whether it does).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time

from .errors import in_one_line

# How long the worker polls for a captured step's inputs before it gives up on the step (the replay that
# should set the flag failed to launch, stalled or faulted): its other calls then stop polling at once.
PATIENCE_SECONDS = 30.0
POLL_SECONDS = 1e-5         # between two looks at a flag: Linux sleeps about 60 us for it
# How a CPU block's output reaches the device (the default of a load's engines, read at load): "copy" (the copy
# engine) or "kernel" (a kernel reading the page-locked buffer in place; where it can't be mapped, the copy engine).
READ_BACK = "copy"
READ_BACKS = ("copy", "kernel")


class Flag:
    """One flag in page-locked memory, set by the GPU; ``synchronize`` waits until it is set, then clears
    it, as an event's would wait for the copies queued before it. It gives up once ``abandoned`` (a
    threading.Event) is set (the replay that would set it was not launched), or after ``patience`` seconds,
    calling ``give_up()`` first: the step's other calls then give up at once, instead of each waiting its
    own ``patience`` for a GPU that has stalled or faulted."""

    def __init__(self, flags, index: int, patience: float = PATIENCE_SECONDS, abandoned=None, give_up=None):
        self.flags, self.index, self.patience, self.abandoned = flags, index, patience, abandoned
        self.give_up = give_up

    def synchronize(self):
        end = time.perf_counter() + self.patience
        while self.flags[self.index] == 0:
            if self.abandoned is not None and self.abandoned.is_set():
                raise RuntimeError("the captured step was abandoned before the GPU reached this CPU block")
            if time.perf_counter() > end:
                if self.give_up is not None:
                    self.give_up()
                raise RuntimeError(f"the GPU did not reach a captured CPU block in {self.patience:.0f} s")
            time.sleep(POLL_SECONDS)
        self.flags[self.index] = 0


class GpuHandoff:
    """The passes of CPU blocks' calls between ``device``'s stream and ``worker`` (cpu_experts.HostWorker),
    with ``signal`` (cpu_experts.HostSignal) for eager steps and ``calls`` pairs of flags for a captured
    one (as many calls as a step makes). ``owe(future, count)``: an eager call's future, which the engine
    collects at the step's end and passes to ``count`` (its start and end)."""

    def __init__(self, torch, device, worker, signal, owe, calls: int, capture: bool = False,
                 read_back: str | None = None):
        read_back = READ_BACK if read_back is None else read_back
        if read_back not in READ_BACKS:
            raise ValueError(f"handoff.READ_BACK={read_back!r}; accepted: {', '.join(map(repr, READ_BACKS))}")
        self.torch, self.device, self.worker, self.signal, self.owe = torch, device, worker, signal, owe
        with torch.inference_mode(False):      # a load under inference mode: the worker writes them outside
            self.flag_tensor = torch.zeros(2 * max(1, calls), dtype=torch.int32, pin_memory=True)
        self.flags = self.flag_tensor.numpy()
        self.program = None         # while a step is captured: [(work, count, prepare)] of its calls, in order
        self.read_back = read_back
        self.read_back_why_not = ""     # why an output buffer came back by the copy engine after all ("kernel")
        self.abandoned = threading.Event()      # a replay's calls stop polling (``abandon``)
        self._write_value, self.why_not_captured = None, "" if capture else "asked for eager steps only"
        if capture:
            try:
                self._write_value = _driver_write_value()
                self._check()
            except Exception as exc:     # noqa: BLE001 - eager steps still hand over; captures don't
                self._write_value = None
                self.why_not_captured = in_one_line(exc)

    @property
    def captures(self) -> bool:
        """Whether decode steps with CPU blocks are captured (asked for, and the GPU can write the flags)."""
        return self._write_value is not None

    def host_buffer(self, like):
        """A page-locked buffer for ``like``'s values (its strides kept, so the CPU computes on the same
        layout): the copies to and from it queue without a wait, and a graph can capture them. Not an
        inference tensor, so steps outside inference mode write it too."""
        with self.torch.inference_mode(False):
            return self.torch.empty_like(like, device="cpu", pin_memory=True)

    def device_view(self, out):
        """With ``read_back`` "kernel", the device's view of the output buffer ``out`` (``host_buffer``'s), for
        ``output`` to read it through; made with the buffer, as a capture can't ask the driver for it, and kept
        with it by the caller (it holds the buffer). None with "copy", or where ``out`` can't be read so
        (``read_back_why_not`` says why): then the copy engine brings it."""
        if self.read_back != "kernel":
            return None
        if not out.is_contiguous():
            self.read_back_why_not = "an output buffer isn't contiguous"
            return None
        try:
            return _device_view(out, self.device)
        except (RuntimeError, ImportError) as exc:      # not mapped, a copy, or no triton: the copy engine
            self.read_back_why_not = in_one_line(exc)
            return None

    @contextlib.contextmanager
    def recording(self):
        """While a step is captured: each call's passes go into the graph, and the call into ``program``."""
        self.program = []
        try:
            yield self.program
        finally:
            self.program = None

    def inputs_ready(self):
        """What the worker waits for before it reads the call's inputs, whose copies are queued before this."""
        stream = self.torch.cuda.current_stream(self.device)
        if self.program is None:
            ready = self.torch.cuda.Event()
            ready.record(stream)
            return ready
        k = len(self.program)
        if 2 * k + 1 >= len(self.flags):
            raise RuntimeError(f"a captured step with more than {len(self.flags) // 2} CPU blocks' calls")
        self._write(stream, 2 * k, 1)
        return Flag(self.flags, 2 * k, abandoned=self.abandoned, give_up=self.abandon)

    def submit(self, work, count, prepare=None):
        """Hand ``work()`` (which returns its start and end) to the worker, now or at each replay; what
        ``output`` needs to wait for it. ``prepare()``: what the caller does before each replay of it (the
        block's KV cache moved to host memory after a prefill computed it on the GPU)."""
        if self.program is None:
            value = self.signal.next()
            self.owe(self.worker.call(work, value), count)
            return value
        self.program.append((work, count, prepare))
        return len(self.program) - 1

    def _setting(self, index):
        def set_flag():
            self.flags[index] = 1
        return set_flag

    def output(self, waited, out, view=None):
        """``out`` (page-locked, written by the worker) brought to the device once the worker says so: copied,
        or read through ``view`` (``device_view``'s) where given."""
        stream = self.torch.cuda.current_stream(self.device)
        if self.program is None:
            self.signal.wait(stream, waited)
        else:
            index = 2 * waited + 1
            self.signal.wait(stream, 1, address=self.flag_tensor.data_ptr() + 4 * index)
            self._write(stream, index, 0)
        if view is None:
            return out.to(self.device, non_blocking=True)
        on_device = self.torch.empty_like(out, device=self.device)
        _read_in_place(view, on_device.view(-1).view(self.torch.uint8))
        return on_device

    def before_replay(self, program):
        """Before a replay of a step whose calls are ``program``: the worker done with the calls before (an
        abandoned replay's stop polling at once), flags that a step which failed part way left set cleared
        once the GPU is done with it, then each call's ``prepare``."""
        self.worker.settle()
        self.abandoned.clear()
        if self.flags.any():
            self.torch.cuda.synchronize(self.device)
            self.flags[:] = 0
        for _, _, prepare in program:
            if prepare is not None:
                prepare()

    def abandon(self):
        """A replay's launch failed or was interrupted after its calls were handed over, or the GPU didn't reach
        one of them in time: they stop polling, and every wait of the GPU's for a call's output ends (the step
        has failed; its output is not used)."""
        self.abandoned.set()
        self.flags[1::2] = 1

    def run(self, program) -> list:
        """A replay's calls handed to the worker, in order: [(future, count)] for the engine to collect."""
        return [(self.worker.call(work, ended=self._setting(2 * k + 1)), count)
                for k, (work, count, _) in enumerate(program)]

    def close(self):
        self.worker.close()

    def _write(self, stream, index: int, value: int):
        rc = self._write_value(ctypes.c_void_p(stream.cuda_stream),
                               ctypes.c_uint64(self.flag_tensor.data_ptr() + 4 * index), ctypes.c_uint32(value),
                               ctypes.c_uint(0))
        if rc:
            raise RuntimeError(f"cuStreamWriteValue32 failed with CUDA error {rc}")

    def _check(self):
        """A value the GPU writes reaches the host."""
        torch = self.torch
        stream = torch.cuda.current_stream(self.device)
        self._write(stream, 0, 7)
        torch.cuda.synchronize(self.device)
        seen, self.flags[0] = int(self.flags[0]), 0
        if seen != 7:
            raise RuntimeError(f"the GPU's write of a flag did not reach the host (read {seen})")


def _device_view(buf, device):
    """The device's view of page-locked ``buf`` (fetch.in_place, imported here: it imports triton, which a CUDA
    machine's torch brings; it raises RuntimeError where the buffer can't be viewed)."""
    from . import fetch
    return fetch.in_place(buf, device)


def _read_in_place(view, out):
    """``out`` (bytes on the device) = the bytes ``view`` shows now (fetch.read_fresh)."""
    from . import fetch
    fetch.read_fresh(view, out)


def _driver_write_value():
    """The CUDA driver's ``cuStreamWriteValue32``."""
    from .driver import function
    return function("cuStreamWriteValue32", ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint)
