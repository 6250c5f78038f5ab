"""Routed experts computed on the CPU, from the host memory their bytes live in, while the link copies others.

A streamed MoE block on CUDA brings only its routed experts (experts.py), copied from page-locked host
memory once the router has chosen. With ``expert_compute`` set, some of those the GPU doesn't hold are
not copied at all: the CPU computes them from the same host bytes while the link carries the others and
the GPU computes them, so the two rates add (as llama.cpp's ``--n-cpu-moe`` keeps
experts on the CPU, but per step and per expert rather than per layer).

How a call of the experts module is split. transformers' eager experts compute, for each routed expert
in ascending order, its tokens' rows (``top_k_index == e``, ordered by top-k position then token), and add
each weighted result into a zeroed output with ``index_add_``. ``combine`` does exactly that, with each
expert's rows computed on the GPU from the slot by one call of the module's own forward restricted to that
expert, or on the CPU from a ``twin`` (the module with its fused weights as views of host memory). So an
all-GPU split gives eager's tokens bit for bit, and one where the CPU computes every routed expert gives
the tokens of transformers with the experts module placed on ``"cpu"``; a mixed split rounds each expert
where it was computed. This needs the eager implementation (``experts_implementation="eager"``, which
``expert_compute`` selects): the batched ones combine the top-k results in another order.

How the CPU computes them. Where the experts module's eager forward is transformers' own form (forms.py),
the CPU runs just an expert's products (``direct_rows``: the loop body of that form, the same ops on the
same shapes); the forward's bookkeeping around them (one-hot masks, ``nonzero``, ``where``) cost a third of
the rate on the H200 host (benchmarks/bench_cpu_block.py). Anything else calls the forward restricted to the
expert. On CUDA a worker thread computes them (``HostWorker``) while the caller goes on launching what comes
after, the GPU waiting for their rows on a counter in page-locked memory (``HostSignal``); where the GPU
can't wait so, the caller computes them once the GPU's side is launched (``HostCompute``). Either sets
torch's threads to the cores less four for the work.

Which experts the CPU takes: the share ``expert_compute`` gives (or, for ``"auto"``, the CPU's rate over
both rates: the CPU's on a block's experts measured at load, the link's page-locked rate) of the step's experts
that are not on the GPU already and that the expert cache doesn't take, the count so both sides end
soonest (``taken``), the highest-numbered ones: fixed for given routing, so a run's tokens don't depend on timing.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import ctypes
import functools
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

from .errors import in_one_line
from .forms import is_form

# Cores left to the copy thread, the disk reader and the caller's thread: with every core computing, the
# CPU side fell from 55 to 7 GB/s on the H200 host while copies ran (the copy thread was starved).
CORES_LEFT = 4


def host_threads() -> int:
    """Threads the CPU computes experts with: the cores this process may use, less CORES_LEFT."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - CORES_LEFT)


def twin(module, host_weights: dict):
    """A copy of the experts ``module`` sharing everything but its weights, which are ``host_weights``
    (parameter name -> a view of host memory). Only its ``forward`` is called, never the module: hooks
    on the original don't run for it."""
    import torch
    out = copy.copy(module)
    vars(out).pop("forward", None)      # the class's forward, not a wrapper the engine put on the module
    out._parameters = dict(module._parameters)
    for name, view in host_weights.items():
        out._parameters[name] = torch.nn.Parameter(view, requires_grad=False)
    return out


def calls(index, experts) -> dict:
    """For each of ``experts``: the (top-k positions, tokens) routed to it in ``index`` ([tokens, top_k], on
    the CPU), in the order eager experts visit them (by position, then token), as two index tensors."""
    import torch
    out = {}
    if index.shape[0] == 1:         # a decode step of one token: its positions alone, without a search
        row = index[0].tolist()
        for e in experts:
            pos = [k for k, v in enumerate(row) if v == e]
            out[e] = (torch.tensor(pos, dtype=torch.long), torch.zeros(len(pos), dtype=torch.long))
        return out
    for e in experts:
        token, pos = torch.nonzero(index == e, as_tuple=True)
        order = torch.argsort(pos * index.shape[0] + token)
        out[e] = (pos[order], token[order])
    return out


def to_device(work: dict, device) -> dict:
    """``calls``' index tensors on ``device``, in one transfer (each one waits for the device's stream)."""
    import torch
    if not work:
        return {}
    parts = [t for pos, token in work.values() for t in (pos, token)]
    moved = torch.cat(parts).to(device).split([len(t) for t in parts])
    return {e: (moved[2 * k], moved[2 * k + 1]) for k, e in enumerate(work)}


def expert_rows(forward, hidden, weights, e, pos, token):
    """Expert ``e``'s weighted rows for ``token`` (``pos``: where ``e`` stands in each one's top k), computed
    by the experts' own ``forward`` given only those tokens, routed only to ``e``."""
    import torch
    index = torch.full((len(token), 1), e, dtype=torch.long, device=hidden.device)
    return forward(hidden[token], index, weights[token, pos].unsqueeze(-1))


# transformers' eager experts forward (Mixtral, Qwen2-MoE, Qwen3-MoE and the models copied from them), as
# 5.17 and as later versions write it (a one-hot of one more class).
_EAGER_EXPERTS = """
def forward(self, hidden_states, top_k_index, top_k_weights):
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts{extra})
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()

    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = nn.functional.linear(current_hidden_states, self.down_proj[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))

    return final_hidden_states
"""
EAGER_EXPERTS_FORMS = (_EAGER_EXPERTS.format(extra=""), _EAGER_EXPERTS.format(extra=" + 1"))


def eager_form(module) -> bool:
    """Whether ``module``'s eager experts forward (its class's, under transformers' implementation switch) is
    one of EAGER_EXPERTS_FORMS, with nothing else on the instance."""
    forward = type(module).forward
    eager = getattr(forward, "__wrapped__", forward)
    return "forward" not in vars(module) and is_form(eager, *EAGER_EXPERTS_FORMS)


def direct_rows(module, hidden, weights, e, pos, token, kernel=None):
    """What ``expert_rows`` gives for a module of the eager form, by the loop body of that form alone: the
    rows it adds for expert ``e`` (into zeros, where the output's dtype is the rows' own). ``kernel``: where
    given, the policy (cpu_kernel.Fast, cpu_amx.Amx) its one-row products (a token routed alone to the expert,
    in a decode step or a prompt) take one of nb_offload's kernels by (``kernel_linear``)."""
    import torch
    linear = functools.partial(kernel_linear, kernel=kernel) if kernel is not None else torch.nn.functional.linear
    gate, up = linear(hidden[token], module.gate_up_proj[e]).chunk(2, dim=-1)
    rows = linear(module.act_fn(gate) * up, module.down_proj[e])
    return rows * weights[token, pos, None]


def kernel_linear(x, weight, kernel):
    """``F.linear(x, weight)``, by the kernel of the policy ``kernel`` where it takes the call (``multiply``: one
    row in host memory; the AMX kernel at a thread count checked for the shape), else by F.linear."""
    import torch
    out = kernel.multiply(x, weight, None)
    return torch.nn.functional.linear(x, weight) if out is None else out


def rows_for(module, kernel=None):
    """How the CPU computes an expert's rows of ``module`` (a twin): ``(hidden, weights, e, pos, token) ->
    rows``, by ``direct_rows`` where its forward is the eager form (its one-row products by nb_offload's kernel
    with the policy ``kernel``), else by calling that forward (F.linear's products, whatever ``kernel`` says:
    only the eager form's products can be told apart)."""
    if eager_form(module):
        return functools.partial(direct_rows, module, kernel=kernel)
    return functools.partial(expert_rows, module.forward)


def combine(hidden, rows: dict, tokens: dict):
    """The experts module's output: each expert's ``rows`` added at its ``tokens`` (on ``hidden``'s device),
    in ascending expert order, into zeros, as the eager experts do."""
    out = hidden.new_zeros(hidden.shape)
    for e in sorted(rows):
        out.index_add_(0, tokens[e], rows[e].to(out.dtype))
    return out


def taken(share: float, count: int) -> int:
    """How many of ``count`` equal parts the CPU takes, given its ``share`` of the rate (CPU / (CPU + link)):
    of the two counts nearest ``share * count``, the one whose later side ends first (the CPU's taken over
    ``share``, or the link's rest over ``1 - share``), the larger on a tie. Two routed experts at a share of
    0.3 stay with the link (rounding would give the CPU one, and the step would wait for it)."""
    if share <= 0 or count <= 0:
        return 0
    if share >= 1:
        return count
    fewer = min(count, int(share * count))
    more = min(count, fewer + 1)

    def ends(n):
        return max(n / share, (count - n) / (1 - share))
    return more if ends(more) <= ends(fewer) else fewer


def split(missed: list, share: float) -> tuple[list, list]:
    """``missed`` (sorted experts the GPU doesn't hold) as (copied, computed on the CPU): the CPU takes the
    highest-numbered ``taken(share, len(missed))``."""
    n = taken(share, len(missed))
    return missed[:len(missed) - n], missed[len(missed) - n:]


def computed(torch, rows, hidden, weights, work: dict) -> dict:
    """Each expert of ``work`` (expert -> (positions, tokens)) computed by ``rows`` (``rows_for``), in
    ``work``'s order: expert -> its rows."""
    with torch.inference_mode():
        return {e: rows(hidden, weights, e, pos, token) for e, (pos, token) in work.items()}


def computed_into(torch, rows, hidden, weights, work: dict, out):
    """``computed``'s rows written into consecutive rows of ``out`` (page-locked, for the GPU to take)."""
    parts = computed(torch, rows, hidden, weights, work)
    with torch.inference_mode():     # ``out`` may be an inference tensor (a load under it)
        torch.cat(list(parts.values()), out=out)


class HostCompute:
    """The CPU side: computes experts from host memory on the caller's thread with torch's threads set to
    ``threads`` (restored after), and measures the rate it does so at, for ``"auto"``'s share (the engine's
    stats count the rest)."""

    def __init__(self, torch, threads: int):
        self.torch, self.threads = torch, threads

    def run(self, rows, hidden, weights, work: dict):
        """Each expert of ``work`` (expert -> (positions, tokens)) computed by ``rows`` (``rows_for``):
        (expert -> rows, start, end) on the perf_counter clock."""
        torch = self.torch
        caller = torch.get_num_threads()
        t0 = time.perf_counter()
        torch.set_num_threads(self.threads)
        try:
            out = computed(torch, rows, hidden, weights, work)
        finally:
            torch.set_num_threads(caller)
        return out, t0, time.perf_counter()

    def rate(self, rows, experts: int, hidden_size: int, dtype, row_bytes: int, repeats: int = 5) -> float:
        """Bytes a second the CPU computes experts for one token at: each of a block's ``experts`` once a pass
        (as a step reads them: one expert over and over would be read from the cache), the median of
        ``repeats`` passes after one to warm up."""
        torch = self.torch
        hidden = torch.zeros((1, hidden_size), dtype=dtype)
        weights = torch.ones((1, 1), dtype=dtype)
        first = torch.zeros(1, dtype=torch.long)
        work = {e: (first, first) for e in range(experts)}
        times = []
        for k in range(repeats + 1):
            _, t0, t1 = self.run(rows, hidden, weights, work)
            if k:
                times.append(t1 - t0)
        times.sort()
        return experts * row_bytes / max(times[len(times) // 2], 1e-9)


class HostSignal:
    """A counter in page-locked memory that the CPU raises and a CUDA stream waits on (the driver's
    ``cuStreamWaitValue32``): the GPU then takes the CPU's rows when they are there, and the host need not
    wait for them before it launches what comes after. ``available`` is False where the driver lacks the
    call or a check at start (a wait released by a raise) failed; the CPU's work then runs on the caller."""

    # how long the check at start waits for the GPU to see a raise, and to not run past an unraised one
    CHECK_SECONDS = 2.0

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        with torch.inference_mode(False):      # a load under inference mode: the worker writes it outside
            self.count = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self._written = self.count.numpy()      # the worker's writes, without torch's checks
        self.issued = 0
        self.why_not = ""
        try:
            self._wait_value = _driver_wait_value()
            self._check()
        except Exception as exc:        # no driver call, or a wait the GPU didn't honour: stay synchronous
            self._wait_value = None
            self.why_not = in_one_line(exc)

    @property
    def available(self) -> bool:
        return self._wait_value is not None

    def next(self) -> int:
        """The value the next raise will reach."""
        self.issued += 1
        return self.issued

    def wait(self, stream, value: int, address: int | None = None):
        """Make ``stream`` wait (on the GPU) until the counter reaches ``value``; or another int32 in page-locked
        memory, at ``address`` (handoff.py's flags)."""
        where = self.count.data_ptr() if address is None else address
        rc = self._wait_value(ctypes.c_void_p(stream.cuda_stream), ctypes.c_uint64(where),
                              ctypes.c_uint32(value & 0xFFFFFFFF), ctypes.c_uint(0))    # 0: wait for >=
        if rc:
            raise RuntimeError(f"cuStreamWaitValue32 failed with CUDA error {rc}")

    def raise_to(self, value: int):
        """Let the waits for ``value`` (and below) go: after the rows they guard are written. One call is
        outstanding at a time, so the counter only goes up (the GPU compares with wrap-around)."""
        self._written[0] = (value + (1 << 31)) % (1 << 32) - (1 << 31)     # as the int32 the GPU reads

    def _check(self):
        """A wait on a side stream holds an event back until the counter is raised."""
        torch = self.torch
        stream = torch.cuda.Stream(self.device)
        done = torch.cuda.Event()
        value = self.next()
        self.wait(stream, value)
        done.record(stream)
        time.sleep(0.01)
        held = not done.query()
        self.raise_to(value)
        end = time.perf_counter() + self.CHECK_SECONDS
        while not done.query():
            if time.perf_counter() > end:
                raise RuntimeError("the GPU did not see the counter raised")
            time.sleep(0.001)
        if not held:
            raise RuntimeError("the GPU ran past a wait on the counter")


def _driver_wait_value():
    """The CUDA driver's ``cuStreamWaitValue32``."""
    from .driver import function
    return function("cuStreamWaitValue32", ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint)


# A worker launches an expert's products from Python, so it needs the GIL between them, while the caller runs
# the step's Python (hooks, transformers' modules) between its own torch calls. CPython hands the GIL to a
# waiting thread when its holder blocks, or else only after the switch interval (5 ms unless set): on the H200
# host a worker read one Mixtral-anchor expert at 42 GB/s with the caller idle, 2.1 GB/s with the caller busy
# in plain Python, and 28 GB/s with it so at a 0.1 ms interval (bench_cpu_block.py --parts single,
# benchmarks/RESULTS.md). Read at load.
SWITCH_INTERVAL = 1e-4


@contextlib.contextmanager
def quick_handover(interval: float):
    """Inside, the interpreter's switch interval is at most ``interval`` (a worker computes experts while the
    caller runs Python); the one before is restored after."""
    saved = sys.getswitchinterval()
    sys.setswitchinterval(min(saved, interval))
    try:
        yield
    finally:
        sys.setswitchinterval(saved)


class HostWorker:
    """The CPU's work off the caller's thread, for CUDA (``HostSignal``): one worker thread, with torch's
    threads set to ``threads`` for each call, computes a call's experts into page-locked rows and raises the
    counter (also when it fails, so the GPU never waits for good); the caller collects the outcome later.

    The threads are set for each call and, after it, set back to the count the caller had when it made the call,
    not once for the worker: torch keeps one count for the process beside each thread's own, and a thread takes
    that count at its first parallel op, so a worker that kept its count set would hand it to every thread
    started later (the caller's too, where it hadn't computed yet). The caller's count, read as it calls, not the
    worker's own before the call: with two workers at once (the experts' and the blocks'), one could read the
    other's, and a count the user set after the load would be undone."""

    def __init__(self, torch, threads: int, signal: HostSignal, name: str = "nb_offload-cpu-experts", device=None):
        self.torch, self.signal, self.threads, self._last = torch, signal, threads, None
        index = None
        if device is not None and getattr(device, "type", None) == "cuda":     # its events are that device's
            # set_device takes an index: "cuda" alone means the caller's current device, so read it here
            index = device.index if device.index is not None else torch.cuda.current_device()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._start,
                                       initargs=(index,))

    def _start(self, index):
        if index is not None:
            self.torch.cuda.set_device(index)

    def submit(self, rows, hidden, weights, work: dict, out, value: int):
        """Compute each expert of ``work`` into consecutive rows of ``out`` (page-locked), then raise the
        counter to ``value``; a future of (start, end) on the perf_counter clock."""
        def compute():
            t0 = time.perf_counter()
            computed_into(self.torch, rows, hidden, weights, work, out)
            return t0, time.perf_counter()
        return self.call(compute, value)

    def call(self, work, value: int | None = None, ended=None):
        """Run ``work()`` on the worker, then raise the counter to ``value`` (where given) and call ``ended()``
        (where given), also where it raised or never ran (the worker failed to start, or was shut down): the
        GPU waits for them. A future of what it returned. Calls run in the order given, so the counter only
        goes up."""
        ran = []
        callers = self.torch.get_num_threads()      # on the caller's thread: what the process count goes back to

        def release():
            if value is not None:
                self.signal.raise_to(value)
            if ended is not None:
                ended()

        def run():
            ran.append(True)
            try:
                self.torch.set_num_threads(self.threads)
                try:
                    return work()
                finally:
                    self.torch.set_num_threads(callers)
            finally:
                release()
        try:
            future = self.pool.submit(run)
        except BaseException:
            release()
            raise
        future.add_done_callback(lambda _: ran or release())    # a pool that broke fails its calls unrun
        self._last = future
        return future

    def settle(self):
        """Wait until the calls given so far have run (their outcomes stay with their futures)."""
        if self._last is not None:
            wait([self._last])

    def close(self):
        self.pool.shutdown(wait=True)


# Where a split call's CPU work runs on CUDA: True, on the caller when it would otherwise wait (HostOwed);
# False, on a worker thread from the start (HostWorker). Read at load. On the H200 host HostOwed decoded the
# half load at 11.9 tok/s against the worker's 15.8 (benchmarks/RESULTS.md; bench_moe.py --owed-too now).
OWED_TO_CALLER = False


class Owed:
    """One split call's CPU work that the GPU waits for; ``result()`` as a future's: (start, end) on the
    perf_counter clock once it is computed, or what it raised."""

    def __init__(self, rows, hidden, weights, work, out, value, deadline):
        self.args = (rows, hidden, weights, work, out)
        self.value, self.deadline = value, deadline
        self.span, self.error, self.by = None, None, None
        self.done = threading.Event()

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.span


class HostOwed:
    """The CPU's experts of a split call on CUDA, owed to the GPU, which waits for their rows on HostSignal's
    counter. The caller computes them at its next chance (``settle``), which the engine takes where it would
    otherwise wait for the GPU: before the next router's choice, at the step's end. The host has then
    launched the rest of the layer and the next one's attention, and the CPU reads at the calling thread's
    rate (a worker thread read 30-36 GB/s on the H200 host against the caller's 52-62). A standby thread
    computes a call the caller hasn't come for within ``patience`` seconds: a wait for the GPU that the
    engine doesn't know of would otherwise never end. One computes at a time, oldest first, so the counter
    only goes up; each call raises it, also when it fails."""

    PATIENCE = 0.02     # seconds: a layer's worth of host time is 1-3 ms

    def __init__(self, torch, threads: int, signal: HostSignal, patience: float | None = None):
        self.torch, self.threads, self.signal = torch, threads, signal
        self.patience = self.PATIENCE if patience is None else patience
        self._queue = collections.deque()
        self._turn = threading.Lock()           # held while a call is taken and computed
        self._changed = threading.Condition()   # guards the queue; notified on submit and close
        self._closed = False
        self.by = {"caller": 0, "standby": 0}      # calls computed by each (the standby's are waits unforeseen)
        self._standby = threading.Thread(target=self._watch, name="nb_offload-cpu-experts-standby", daemon=True)
        self._standby.start()

    def submit(self, rows, hidden, weights, work: dict, out, value: int) -> Owed:
        """Owe the GPU each expert of ``work`` computed into consecutive rows of ``out`` (page-locked), then
        the counter raised to ``value``."""
        owed = Owed(rows, hidden, weights, work, out, value, time.perf_counter() + self.patience)
        with self._changed:
            self._queue.append(owed)
            self._changed.notify()
        return owed

    def settle(self):
        """Compute every call still owed, on this thread, oldest first (after the one the standby is on)."""
        while True:
            with self._turn:
                owed = self._take()
                if owed is None:
                    return
                self._compute(owed, "caller")

    def _take(self, expected=None):
        """The oldest owed call off the queue (only if it is ``expected``, where given); None if there is none."""
        with self._changed:
            if not self._queue or (expected is not None and self._queue[0] is not expected):
                return None
            return self._queue.popleft()

    def _compute(self, owed, by):
        torch = self.torch
        rows, hidden, weights, work, out = owed.args
        before = torch.get_num_threads()
        t0 = time.perf_counter()
        try:
            torch.set_num_threads(self.threads)
            computed_into(torch, rows, hidden, weights, work, out)
            owed.span, owed.by = (t0, time.perf_counter()), by
            self.by[by] += 1
        except BaseException as exc:    # noqa: BLE001 - given to whoever collects the call; the GPU goes on
            owed.error = exc
        finally:
            torch.set_num_threads(before)
            self.signal.raise_to(owed.value)
            owed.args = None
            owed.done.set()

    def _watch(self):
        while True:
            with self._changed:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if not self._queue:
                    return
                oldest = self._queue[0]
                late = oldest.deadline - time.perf_counter()
                if late > 0:
                    self._changed.wait(late)
                    continue
            with self._turn:
                owed = self._take(expected=oldest)
                if owed is not None:
                    self._compute(owed, "standby")

    def close(self):
        """Compute what is still owed, then stop the standby."""
        self.settle()
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._standby.join()
