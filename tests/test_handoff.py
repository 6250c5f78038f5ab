"""How CPU blocks pass between the GPU's stream and the worker (handoff.py), what can be checked without a GPU:
the flags a captured step's worker polls, and the program a capture records and each replay hands over. The
passes themselves: tests/gpu/test_hybrid_gpu.py."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nb_offload import cpu_experts, handoff  # noqa: E402


def test_a_flag_waits_until_the_gpu_sets_it_then_clears_it():
    flags = np.zeros(4, dtype=np.int32)
    flag = handoff.Flag(flags, 2, patience=5)
    threading.Timer(0.05, lambda: flags.__setitem__(2, 1)).start()
    flag.synchronize()
    assert flags[2] == 0                # cleared: the next replay's set is a new one
    with pytest.raises(RuntimeError, match="did not reach a captured CPU block in 0 s"):
        handoff.Flag(flags, 0, patience=0.01).synchronize()


class Signal:
    def __init__(self):
        self.waits, self.value = [], 0

    def next(self):
        self.value += 1
        return self.value

    def wait(self, stream, value, address=None):
        self.waits.append((value, address))


def stand_in(calls=2):
    """A GpuHandoff whose GPU side is recorded instead of queued: flag writes and waits, copies as clones."""
    h = object.__new__(handoff.GpuHandoff)
    h.synchronized = 0

    def synchronize(device):
        h.synchronized += 1
    h.torch = SimpleNamespace(cuda=SimpleNamespace(current_stream=lambda device: "stream", synchronize=synchronize),
                              inference_mode=torch.inference_mode, bitwise_or=torch.bitwise_or, uint8=torch.uint8,
                              empty_like=lambda like, device, pin_memory=False: torch.empty_like(like, device=device))
    h.device, h.signal, h.program, h.abandoned = "cpu", Signal(), None, threading.Event()
    h.read_back, h.read_back_why_not = "copy", ""
    h.worker = cpu_experts.HostWorker(torch, 1, SimpleNamespace(raise_to=lambda value: None), name="handoff-test")
    h.owed = []
    h.owe = lambda future, count: h.owed.append((future, count))
    h.flag_tensor = torch.zeros(2 * calls, dtype=torch.int32)
    h.flags = h.flag_tensor.numpy()
    h.writes = []

    def write(stream, index, value):
        h.writes.append((index, value))
        h.flags[index] = value          # as the GPU would, when the stream gets there
    h._write = write
    return h


def test_a_capture_records_each_call_with_its_flags_and_a_replay_hands_them_over_in_order():
    h = stand_in(calls=2)
    order = []
    try:
        with h.recording() as program:
            for k in range(2):
                ready = h.inputs_ready()        # the graph sets the call's "in" flag after its inputs' copies
                out = torch.full((2,), float(k))

                def work(ready=ready, k=k):
                    ready.synchronize()
                    order.append(k)
                    return 0.0, 1.0
                waited = h.submit(work, lambda t0, t1, k=k: order.append(("counted", k)),
                                  prepare=lambda k=k: order.append(("prepared", k)))
                assert waited == k
                assert torch.equal(h.output(waited, out), out)      # the copy back, after the "out" flag
            with pytest.raises(RuntimeError, match="more than 2 CPU blocks' calls"):
                h.inputs_ready()
        assert h.program is None and len(program) == 2 and h.owed == []      # nothing ran while capturing
        base = h.flag_tensor.data_ptr()
        # each call: "in" set after the inputs' copies; the stream waits for "out", then clears it for the next
        assert h.writes == [(0, 1), (1, 0), (2, 1), (3, 0)]
        assert h.signal.waits == [(1, base + 4), (1, base + 12)]
        # flags a failed step left set: cleared before the replay, once the GPU is done (synchronize)
        h.before_replay(program)
        assert order == [("prepared", 0), ("prepared", 1)] and list(h.flags) == [0, 0, 0, 0]
        assert h.synchronized == 1
        del order[:]
        h.flags[0] = h.flags[2] = 1         # as the replay's graph sets them
        done = h.run(program)           # a replay: the worker takes each call once its "in" flag is set
        spans = [future.result(timeout=5) for future, _ in done]
        for (_, count), span in zip(done, spans):
            count(*span)
        assert order == [0, 1, ("counted", 0), ("counted", 1)]
        assert list(h.flags) == [0, 1, 0, 1]        # "in" cleared by the worker, "out" set for the GPU's wait
    finally:
        h.worker.close()


def test_an_eager_call_goes_to_the_worker_at_once_and_the_stream_waits_on_the_counter():
    h = stand_in()
    try:
        ran = threading.Event()
        value = h.submit(lambda: (ran.set(), (0.0, 1.0))[1], lambda t0, t1: None)
        assert value == 1 and len(h.owed) == 1
        assert h.owed[0][0].result(timeout=5) == (0.0, 1.0) and ran.is_set()
    finally:
        h.worker.close()


def test_a_failing_call_of_a_replay_still_sets_its_flag():
    h = stand_in(calls=1)
    try:
        with h.recording() as program:
            ready = h.inputs_ready()        # sets "in" here: the stand-in's GPU writes at once

            def work():
                ready.synchronize()
                raise ValueError("a block that fails")
            h.submit(work, lambda t0, t1: None)
        [(future, _)] = h.run(program)
        with pytest.raises(ValueError):
            future.result(timeout=5)
        assert h.flags[1] == 1          # the GPU's wait for the output ends all the same
    finally:
        h.worker.close()


def test_an_abandoned_replay_stops_its_calls_polling_and_ends_the_gpus_waits():
    """A replay whose launch failed (or was interrupted) after its calls went to the worker: they stop polling
    at once instead of after their patience, every "out" flag is set so no wait of the GPU's lasts, and the
    next replay starts once the worker is done with them, its flags cleared."""
    h = stand_in(calls=2)
    try:
        with h.recording() as program:
            for _ in range(2):
                ready = h.inputs_ready()
                h.submit(lambda ready=ready: (ready.synchronize(), (0.0, 1.0))[1], lambda t0, t1: None)
        h.flags[:] = 0                  # nothing of the graph ran
        h.before_replay(program)
        done = h.run(program)
        h.abandon()
        for future, _ in done:
            with pytest.raises(RuntimeError, match="abandoned"):
                future.result(timeout=5)
        assert list(h.flags[1::2]) == [1, 1]
        h.before_replay(program)        # waits for the worker, clears the flags (after a synchronize)
        assert not h.abandoned.is_set() and not h.flags.any() and h.synchronized == 1
    finally:
        h.worker.close()


def test_a_call_the_gpu_does_not_reach_in_time_gives_up_the_steps_other_calls_at_once(monkeypatch):
    """A replay whose GPU stalls (or faulted) before the first CPU block's inputs: that call waits its patience,
    then abandons the step, so the calls after it raise at once (not each after a patience of its own: 30 s
    times a step's 9-13 CPU blocks, in silence) and every wait of the GPU's for an output ends."""
    monkeypatch.setattr(handoff, "PATIENCE_SECONDS", 0.2)
    h = stand_in(calls=3)
    try:
        with h.recording() as program:
            for _ in range(3):
                ready = h.inputs_ready()
                ready.patience = handoff.PATIENCE_SECONDS
                h.submit(lambda ready=ready: (ready.synchronize(), (0.0, 1.0))[1], lambda t0, t1: None)
        h.flags[:] = 0                  # the GPU never gets to the first call's inputs
        h.before_replay(program)
        t0 = time.perf_counter()
        done = h.run(program)
        with pytest.raises(RuntimeError, match="did not reach a captured CPU block"):
            done[0][0].result(timeout=5)
        for future, _ in done[1:]:
            with pytest.raises(RuntimeError, match="abandoned"):
                future.result(timeout=5)
        assert time.perf_counter() - t0 < 2 * handoff.PATIENCE_SECONDS
        assert h.abandoned.is_set() and list(h.flags[1::2]) == [1, 1, 1]
    finally:
        h.worker.close()


def test_with_read_back_by_kernel_an_output_comes_back_through_its_device_view(monkeypatch):
    """READ_BACK="kernel": an output buffer's view for the device is made with the buffer (a capture can't ask the
    driver), kept by the caller with it, and the output is read through it, its bytes unchanged (bf16 NaN, -0 and
    subnormals too); with "copy", or a buffer the driver can't map, there is no view and the copy engine brings it,
    and the handoff says why."""
    viewed, reads = [], []

    def device_view(buf, device):
        viewed.append(buf)
        return buf.view(-1).view(torch.uint8)       # the device's view of the bytes: here the bytes themselves

    def read_in_place(view, out):
        reads.append(view)
        out.copy_(view)
    monkeypatch.setattr(handoff, "_device_view", device_view)
    monkeypatch.setattr(handoff, "_read_in_place", read_in_place)
    h = stand_in()
    try:
        like = torch.empty(1, 1, 8, dtype=torch.bfloat16, device="meta")
        assert h.device_view(h.host_buffer(like)) is None and viewed == []       # "copy": no view
        h.read_back = "kernel"
        out = h.host_buffer(like)
        view = h.device_view(out)
        assert viewed == [out] and view is not None
        values = torch.tensor([1.5, -0.0, float("nan"), 1e-40, -3.0, 65504.0, float("inf"), 7.0])
        out.copy_(values.to(torch.bfloat16).view(1, 1, 8))
        back = h.output(h.submit(lambda: (0.0, 1.0), lambda t0, t1: None), out, view)
        assert reads == [view] and back is not out
        assert torch.equal(back.view(torch.int16), out.view(torch.int16))
        h.output(h.submit(lambda: (0.0, 1.0), lambda t0, t1: None), out)        # no view: copied
        assert reads == [view]

        def unmapped(buf, device):
            raise RuntimeError("cuMemHostGetDevicePointer failed with CUDA error 1: the memory isn't mapped")
        monkeypatch.setattr(handoff, "_device_view", unmapped)
        assert h.device_view(h.host_buffer(like)) is None and "isn't mapped" in h.read_back_why_not
        h.read_back_why_not = ""
        assert h.device_view(torch.empty(4, 2, dtype=torch.bfloat16).t()) is None
        assert "isn't contiguous" in h.read_back_why_not
    finally:
        h.worker.close()


def test_an_unknown_read_back_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="READ_BACK='dma'; accepted: 'copy', 'kernel'"):
        handoff.GpuHandoff(torch, "cpu", None, None, None, calls=1, read_back="dma")
    monkeypatch.setattr(handoff, "READ_BACK", "dma")
    with pytest.raises(ValueError, match="READ_BACK='dma'"):
        handoff.GpuHandoff(torch, "cpu", None, None, None, calls=1)
