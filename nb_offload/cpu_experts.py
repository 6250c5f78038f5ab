"""Routed experts computed on the CPU, from the host memory their bytes live in, while the link copies others.

A streamed MoE block on CUDA brings only its routed experts (experts.py), copied from page-locked host
memory once the router has chosen. With ``expert_compute`` set, some of those the GPU doesn't hold are
not copied at all: the CPU computes them from the same host bytes, on a worker thread, while the link
carries the others and the GPU computes them, so the two rates add (as llama.cpp's ``--n-cpu-moe`` keeps
experts on the CPU, but per step and per expert rather than per layer).

How a call of the experts module is split. transformers' eager experts compute, for each routed expert
in ascending order, its tokens' rows (``top_k_index == e``, ordered by top-k position then token), and add
each weighted result into a zeroed output with ``index_add_``. ``combine`` does exactly that, with each
expert's rows computed by one call of the module's own forward restricted to that expert: on the GPU from
the slot, or on the CPU by a ``twin`` (the module with its fused weights as views of host memory). So an
all-GPU split gives eager's tokens bit for bit, and one where the CPU computes every routed expert gives
the tokens of transformers with the experts module placed on ``"cpu"``; a mixed split rounds each expert
where it was computed. This needs the eager implementation (``experts_implementation="eager"``, which
``expert_compute`` selects): the batched ones combine the top-k results in another order.

Which experts the CPU takes: the share ``expert_compute`` gives (or, for ``"auto"``, the CPU's rate over
both rates: the CPU's on one expert measured at load, the link's page-locked rate) of the step's experts
that are not on the GPU already and that the expert cache doesn't take, the count so both sides end
soonest (``taken``), the highest-numbered ones: fixed for given routing, so a run's tokens don't depend on timing.
"""

from __future__ import annotations

import copy
import os
import time
from concurrent.futures import ThreadPoolExecutor

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
    for e in experts:
        token, pos = torch.nonzero(index == e, as_tuple=True)
        order = torch.argsort(pos * index.shape[0] + token)
        out[e] = (pos[order], token[order])
    return out


def expert_rows(forward, hidden, weights, e, pos, token):
    """Expert ``e``'s weighted rows for ``token`` (``pos``: where ``e`` stands in each one's top k), computed
    by the experts' own ``forward`` given only those tokens, routed only to ``e``."""
    import torch
    index = torch.full((len(token), 1), e, dtype=torch.long, device=hidden.device)
    return forward(hidden[token], index, weights[token, pos].unsqueeze(-1))


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


class HostCompute:
    """The CPU side: one worker thread computing experts from host memory (``torch`` threads: ``threads``),
    and the rate it computes one at, for ``"auto"``'s share (the engine's stats count the rest)."""

    def __init__(self, torch, threads: int):
        self.torch, self.threads = torch, threads
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nb_offload-cpu-experts",
                                       initializer=torch.set_num_threads, initargs=(threads,))

    def submit(self, twin, hidden, weights, work: dict):
        """Compute each expert of ``work`` (expert -> (positions, tokens)) with ``twin`` on the CPU; a future of
        (expert -> rows, start, end) on the perf_counter clock."""
        return self.pool.submit(self._run, twin, hidden, weights, work)

    def _run(self, twin, hidden, weights, work):
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            rows = {e: expert_rows(twin.forward, hidden, weights, e, pos, token) for e, (pos, token) in work.items()}
        return rows, t0, time.perf_counter()

    def rate(self, twin, hidden_size: int, dtype, row_bytes: int, repeats: int = 5) -> float:
        """Bytes a second the CPU computes one expert for one token at, on the worker (the median of
        ``repeats``, after two to warm up: a single timing of a cold pool reads far slower)."""
        torch = self.torch
        hidden = torch.zeros((1, hidden_size), dtype=dtype)
        weights = torch.ones((1, 1), dtype=dtype)
        work = {0: (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))}
        times = []
        for k in range(repeats + 2):
            _, t0, t1 = self.submit(twin, hidden, weights, work).result()
            if k >= 2:
                times.append(t1 - t0)
        times.sort()
        return row_bytes / max(times[len(times) // 2], 1e-9)

    def close(self):
        self.pool.shutdown(wait=True)
