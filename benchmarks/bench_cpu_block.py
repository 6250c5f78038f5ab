"""What a decoder block computed on the CPU reads at (hybrid.py, issue 16), and what slows it: one LLaMA-7B
block at batch 1 against its widest product alone, at several thread counts, with its weights in page-locked
memory, with torch's thread count set and restored around each call (as CpuBlock does), and while the link
copies page-locked bytes to the GPU beside it. Then a step's routed experts of the Mixtral anchor's shape
(cpu_experts.py, issue 15): 32 distinct experts (past the last-level cache, as a step reads them) by F.linear at
several thread counts, through the experts module's eager forward, on a worker thread as HostCompute runs them,
one thread per expert, with oneDNN's packed weights, in page-locked memory and with the link copying beside;
each way's outputs compared bit for bit with F.linear's. One process, random bf16 weights, medians.

    PYTHONPATH=. python3 benchmarks/bench_cpu_block.py --json out.json [--threads 8,12,14,16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

from bench_offload import row_recorder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="8,12,14,16")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--parts", default="block,experts", help="block, experts, threads, single: a comma list")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from nb_offload.cpu_experts import host_threads
    torch.manual_seed(0)
    out = {"meta": {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "host_threads": host_threads(),
                    "torch": torch.__version__, "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE", "0")}, "rows": []}
    add = row_recorder(out, args.json, digits=2)
    torch.set_grad_enabled(False)        # for the whole run (an inference_mode object left unentered does nothing)
    link = link_copier(torch) if torch.cuda.is_available() else None
    if "block" in args.parts:
        block_rows(torch, add, args, link)
    if "experts" in args.parts:
        experts(torch, add, host_threads(), link)
    if "threads" in args.parts:
        thread_rows(torch, add, host_threads(), link)
    if "single" in args.parts:
        single_rows(torch, add, host_threads())


def block_rows(torch, add, args, link):
    """One LLaMA-7B block at batch 1 (405 MB) and its widest product, as the module docstring says."""
    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from nb_offload.cpu_experts import host_threads
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16).eval()
    rotary = LlamaRotaryEmbedding(cfg)
    nbytes = sum(p.nbytes for p in block.parameters())
    cache = DynamicCache(config=cfg)
    prompt = torch.randn(1, 32, 4096, dtype=torch.bfloat16)
    positions = torch.arange(32)[None]
    block(prompt, position_embeddings=rotary(prompt, positions), past_key_values=cache, cache_position=positions[0])
    x = torch.randn(1, 1, 4096, dtype=torch.bfloat16)
    pe = rotary(x, torch.tensor([[32]]))
    wide = block.mlp.up_proj.weight

    def call():
        block(x, position_embeddings=pe, past_key_values=cache, cache_position=torch.tensor([32]))

    def rate(fn, threads, toggle=False):
        caller = torch.get_num_threads()
        torch.set_num_threads(threads)
        fn()
        times = []
        for _ in range(args.calls):
            if toggle:
                torch.set_num_threads(threads)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if toggle:
                torch.set_num_threads(caller)
        torch.set_num_threads(caller)
        return statistics.median(times), min(times)

    def record(what, threads, fn, nb, **kw):
        median, best = rate(fn, threads, **{k: v for k, v in kw.items() if k == "toggle"})
        add(what=what, threads=threads, median_ms=1e3 * median, gbps=nb / median / 1e9, best_gbps=nb / best / 1e9,
            **{k: v for k, v in kw.items() if k != "toggle"})

    for t in [int(s) for s in args.threads.split(",")]:
        record("the block's widest product alone (hybrid.cpu_rate measured this until 2026-12-02)", t,
               lambda: torch.nn.functional.linear(x[0], wide), wide.nbytes)
        record("block", t, call, nbytes)
    # the block's products as torch.mv (batch 1: one row), another of torch's CPU kernels for them
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    for m in linears:
        m.forward = lambda a, w=m.weight: torch.mv(w, a.reshape(-1)).reshape(*a.shape[:-1], w.shape[0])
    for t in [int(s) for s in args.threads.split(",")]:
        record("block, its products as torch.mv", t, call, nbytes)
    for m in linears:
        vars(m).pop("forward")
    threads = host_threads()
    record("block, torch threads set and restored around each call", threads, call, nbytes, toggle=True)
    # the weights as views into one page-locked buffer, as a loaded model's host tier holds them
    if link is not None:
        flat = torch.empty(nbytes + 4096, dtype=torch.uint8, pin_memory=True)
        offset = 0
        for p in block.parameters():
            n = p.nbytes
            view = flat[offset:offset + n].view(p.dtype).view(p.shape)
            view.copy_(p.data)
            p.data = view
            offset += (n + 255) // 256 * 256
        record("block, weights in page-locked memory", threads, call, nbytes)
        for t in sorted({threads, max(1, threads - 2), threads + 2}):
            with link() as link_rate:
                median, best = rate(call, t)
            add(what="block, page-locked weights, the link copying beside it", threads=t, median_ms=1e3 * median,
                gbps=nbytes / median / 1e9, best_gbps=nbytes / best / 1e9, link_gbps=link_rate())


def link_copier(torch):
    """A context manager factory: while inside, a thread copies 256 MiB of page-locked memory to the GPU over
    and over; it yields a function giving the rate the link reached."""
    import contextlib
    src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    stream = torch.cuda.Stream()

    @contextlib.contextmanager
    def beside():
        stop, copied = threading.Event(), [0, 0.0]

        def run():
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                while not stop.is_set():
                    dst.copy_(src, non_blocking=True)
                    stream.synchronize()
                    copied[0] += src.nbytes
            copied[1] = time.perf_counter() - t0
        copier = threading.Thread(target=run)
        copier.start()
        try:
            time.sleep(0.05)
            yield lambda: copied[0] / max(copied[1], 1e-9) / 1e9
        finally:
            stop.set()
            copier.join()
    return beside


def experts(torch, add, threads, link):
    """A step's routed experts of the Mixtral anchor (hidden 2048, 8 experts of 5632, top 2, 16 layers: 32
    distinct experts, 2.2 GB, far past the last-level cache) computed on the CPU for one token, by each
    candidate way; the rate is the pass's bytes over its time (median of passes), and each way's outputs are
    compared bit for bit with F.linear's on the caller's thread (the reference a CPU-computed expert has)."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    hidden_size, inter, count = 2048, 5632, 32
    cfg = MixtralConfig(hidden_size=hidden_size, intermediate_size=inter, num_local_experts=8, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(0)

    def weights(pin=False):
        out = []
        for _ in range(count):
            gate_up = torch.empty(2 * inter, hidden_size, dtype=torch.bfloat16, pin_memory=pin)
            down = torch.empty(hidden_size, inter, dtype=torch.bfloat16, pin_memory=pin)
            gate_up.uniform_(-0.02, 0.02, generator=gen)
            down.uniform_(-0.02, 0.02, generator=gen)
            out.append((gate_up, down))
        return out
    plain = weights()
    nbytes = sum(g.nbytes + d.nbytes for g, d in plain)
    x = torch.randn(1, hidden_size, dtype=torch.bfloat16, generator=gen)
    linear, silu = torch.nn.functional.linear, torch.nn.functional.silu

    def expert(w):
        gate, up = linear(x, w[0]).chunk(2, dim=-1)
        return linear(silu(gate) * up, w[1])

    def by_products(ws):
        return [expert(w) for w in ws]
    reference = by_products(plain)

    def timed(what, fn, t, nb=nbytes, **extra):
        caller = torch.get_num_threads()
        torch.set_num_threads(t)
        try:
            outs = fn()
            fn()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        finally:
            torch.set_num_threads(caller)
        median = statistics.median(times)
        equal = all(torch.equal(a, b) for a, b in zip(outs, reference)) if outs is not None else None
        add(what=what, threads=t, median_ms=1e3 * median, gbps=nb / median / 1e9, best_gbps=nb / min(times) / 1e9,
            equal_to_linear=equal, **extra)

    for t in (8, 12, 14, 16):
        timed("experts: F.linear products, caller's thread", lambda: by_products(plain), t)
    # torch.mv (weights times a vector): another of torch's CPU kernels for the same product
    def expert_mv(w):
        gate, up = torch.mv(w[0], x[0]).chunk(2, dim=-1)
        return torch.mv(w[1], silu(gate) * up)[None]
    for t in (8, 12, 14, 16):
        timed("experts: torch.mv products, caller's thread", lambda: [expert_mv(w) for w in plain], t)
    modules = []
    for gate_up, down in plain[:8]:
        m = MixtralExperts(cfg).to(torch.bfloat16)
        m.gate_up_proj.data = gate_up.unsqueeze(0).expand(8, -1, -1)
        m.down_proj.data = down.unsqueeze(0).expand(8, -1, -1)
        modules.append(m)
    index, routing = torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.bfloat16)
    with torch.inference_mode():
        module_out = [m(x, index, routing) for m in modules]
    # a quarter of the pass (8 experts) through the module's eager forward, scaled to the pass's bytes
    timed("experts: the module's eager forward (cpu_experts.expert_rows), 8 of 32",
          lambda: [m(x, index, routing) for m in modules], threads, nb=nbytes // 4,
          equal_forward=all(torch.equal(a, b) for a, b in zip(module_out, reference)))
    pool = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(threads,))
    try:
        timed("experts: F.linear products on a worker thread (HostCompute)",
              lambda: pool.submit(by_products, plain).result(), threads)
    finally:
        pool.shutdown()
    # one thread per expert: each product single-threaded, the experts in parallel (no fork-join per product)
    for workers in (8, 12):
        many = ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,))
        try:
            timed(f"experts: one thread each, {workers} in parallel", lambda p=many: list(p.map(expert, plain)), 1)
        finally:
            many.shutdown()
    # each product's output rows split across threads, each part single-threaded (one fork-join a product)
    for workers in (8, 12):
        many = ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,))

        def product(a, w, pool=many, parts=workers):
            out = a.new_empty((a.shape[0], w.shape[0]))
            bounds = [w.shape[0] * k // parts for k in range(parts + 1)]
            list(pool.map(lambda k: torch.mm(a, w[bounds[k]:bounds[k + 1]].t(), out=out[:, bounds[k]:bounds[k + 1]]),
                          range(parts)))
            return out

        def by_rows(product=product):
            outs = []
            for g, d in plain:
                gate, up = product(x, g).chunk(2, dim=-1)
                outs.append(product(silu(gate) * up, d))
            return outs
        try:
            timed(f"experts: each product's rows split across {workers} threads, one thread each", by_rows, 1)
        finally:
            many.shutdown()
    try:
        packed = [(torch.ops.mkldnn._reorder_linear_weight(g, 1), torch.ops.mkldnn._reorder_linear_weight(d, 1))
                  for g, d in plain]

        def by_packed(packed=packed):
            outs = []
            for g, d in packed:
                gate, up = torch.ops.mkldnn._linear_pointwise(x, g, None, "none", [], "").chunk(2, dim=-1)
                outs.append(torch.ops.mkldnn._linear_pointwise(silu(gate) * up, d, None, "none", [], ""))
            return outs
        timed("experts: oneDNN packed weights (mkldnn._linear_pointwise)", by_packed, threads)
        del packed
    except Exception as exc:        # noqa: BLE001 - a diagnostic row: say why the way isn't available
        add(what="experts: oneDNN packed weights", error=f"{type(exc).__name__}: {exc}"[:200])
    if link is not None:
        pinned = weights(pin=True)
        for k, (g, d) in enumerate(pinned):
            g.copy_(plain[k][0])
            d.copy_(plain[k][1])
        timed("experts: F.linear products, page-locked weights", lambda: by_products(pinned), threads)
        for t in (threads, threads + 2):
            with link() as rate:
                timed("experts: F.linear products, page-locked weights, the link copying beside it",
                      lambda: by_products(pinned), t)
            add(what="  (the link's rate during the row above)", link_gbps=rate())
        timed("experts: torch.mv products, page-locked weights", lambda: [expert_mv(w) for w in pinned], threads)
        with link() as rate:
            timed("experts: torch.mv products, page-locked weights, the link copying beside it",
                  lambda: [expert_mv(w) for w in pinned], threads)
        add(what="  (the link's rate during the row above)", link_gbps=rate())


def anchor_experts(torch, count=32, hidden_size=2048, inter=5632):
    """``count`` distinct Mixtral-anchor experts as (gate_up, down) bf16 weights (uniform in +-0.02, seed 0;
    together past the last-level cache, as a step reads them), and one token's hidden state after them."""
    gen = torch.Generator().manual_seed(0)
    plain = []
    for _ in range(count):
        gate_up = torch.empty(2 * inter, hidden_size, dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=gen)
        down = torch.empty(hidden_size, inter, dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=gen)
        plain.append((gate_up, down))
    return plain, torch.randn(1, hidden_size, dtype=torch.bfloat16, generator=gen)


def thread_rows(torch, add, threads, link):
    """Why a worker thread computed a step's experts slower than the calling thread (33-36 against 52-62 GB/s
    on the H200 host, 2026-12-02): the same F.linear products over 32 distinct Mixtral-anchor experts, on the
    caller and on workers set up in each way, with the caller idle, busy in Python, or the link copying."""
    from concurrent.futures import ThreadPoolExecutor
    plain, x = anchor_experts(torch)
    nbytes = sum(g.nbytes + d.nbytes for g, d in plain)
    linear, silu = torch.nn.functional.linear, torch.nn.functional.silu

    def by_products():
        outs = []
        for g, d in plain:
            gate, up = linear(x, g).chunk(2, dim=-1)
            outs.append(linear(silu(gate) * up, d))
        return outs

    def in_inference():
        with torch.inference_mode():
            return by_products()

    def with_threads():
        torch.set_num_threads(threads)
        return in_inference()

    def seen():
        return {"worker_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_WAIT_POLICY", ""),
                "gomp_spin": os.environ.get("GOMP_SPINCOUNT", ""), "affinity": len(os.sched_getaffinity(0))}

    def timed(what, fn, passes=7, **extra):
        fn()
        times = []
        for _ in range(passes):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        add(what=what, threads=threads, median_ms=1e3 * median, gbps=nbytes / median / 1e9,
            best_gbps=nbytes / min(times) / 1e9, env=os.environ.get("OMP_WAIT_POLICY", "") or "default", **extra)

    caller = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timed("threads: caller", by_products)
        pool = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(threads,))
        try:
            info = pool.submit(seen).result()
            timed("threads: pool worker, as bench 'experts' ran it", lambda: pool.submit(by_products).result(), **info)
            timed("threads: pool worker, inference mode", lambda: pool.submit(in_inference).result())
            timed("threads: pool worker, threads set each call", lambda: pool.submit(with_threads).result())
            # the caller busy in Python meanwhile, as a decode's host is (launching kernels holds the GIL)
            def busy_caller():
                future = pool.submit(in_inference)
                small = torch.zeros(8)
                while not future.done():
                    small.add_(1)
                return future.result()
            timed("threads: pool worker, the caller busy in Python", busy_caller)
            if link is not None:
                with link() as rate:
                    timed("threads: pool worker, the link copying beside it",
                          lambda: pool.submit(in_inference).result())
                add(what="  (the link's rate during the row above)", link_gbps=rate())
                with link() as rate:
                    timed("threads: caller, the link copying beside it", by_products)
                add(what="  (the link's rate during the row above)", link_gbps=rate())
        finally:
            pool.shutdown()

        def fresh():
            box = []
            t = threading.Thread(target=lambda: box.append(with_threads()))
            t.start()
            t.join()
            return box[0]
        timed("threads: a fresh thread each pass", fresh)
        timed("threads: caller again, after the workers", by_products)
    finally:
        torch.set_num_threads(caller)


def single_rows(torch, add, threads, layers=14, passes=9):
    """Why a split decode step's worker read one expert at 16-30 GB/s on the H200 host (timelines of
    bench_moe.py, 2026-12-03) when 32 experts back to back read 37-48: one Mixtral-anchor expert a call, as a
    decode step submits them (one a layer, ``layers`` a step, distinct experts), the caller meanwhile idle,
    pausing between calls as the GPU's side of a layer does, copying an expert's bytes to the GPU and waiting
    for them (as the routed copies make it), busy in Python with small torch ops, or that with a shorter GIL
    switch interval. The rate is the worker's own time for its expert (from its start to its end), a median."""
    import sys
    from concurrent.futures import ThreadPoolExecutor
    plain, x = anchor_experts(torch)
    count, nbytes = len(plain), plain[0][0].nbytes + plain[0][1].nbytes
    linear, silu = torch.nn.functional.linear, torch.nn.functional.silu
    cuda = torch.cuda.is_available()
    if cuda:
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        stream = torch.cuda.Stream()

    def one(k):
        t0 = time.perf_counter()
        with torch.inference_mode():
            g, d = plain[k % count]
            gate, up = linear(x, g).chunk(2, dim=-1)
            linear(silu(gate) * up, d)
        return t0, time.perf_counter()

    pool = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(threads,))

    def run(what, meanwhile, pause=0.0, interval=None):
        saved = sys.getswitchinterval()
        if interval is not None:
            sys.setswitchinterval(interval)
        spans, walls, k = [], [], 0
        try:
            for p in range(passes + 1):
                for _ in range(layers):
                    t0 = time.perf_counter()
                    future = pool.submit(one, k)
                    meanwhile(future)
                    a, b = future.result()
                    if p:           # the first pass warms up
                        spans.append(b - a)
                        walls.append(time.perf_counter() - t0)
                    k += 1
                    if pause:
                        time.sleep(pause)
        finally:
            sys.setswitchinterval(saved)
        med = statistics.median(spans)
        add(what=what, threads=threads, median_ms=1e3 * med, gbps=nbytes / med / 1e9,
            best_gbps=nbytes / min(spans) / 1e9, wall_ms=1e3 * statistics.median(walls),
            switch_interval_us=1e6 * (interval or saved))

    def idle(future):
        pass

    def copying(future):
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        stream.synchronize()

    small = torch.zeros(8)

    def busy(future):
        while not future.done():
            small.add_(1)

    def busy_pure(future):
        n = 0
        while not future.done():
            n += 1

    try:
        run("single: one expert a call, caller idle, back to back", idle)
        run("single: one expert a call, caller idle, 1 ms between calls", idle, pause=1e-3)
        if cuda:
            run("single: caller copying an expert to the GPU and waiting for it, 1 ms between", copying, pause=1e-3)
        run("single: caller busy in small torch ops, 1 ms between", busy, pause=1e-3)
        run("single: caller busy in pure Python, 1 ms between", busy_pure, pause=1e-3)
        run("single: caller busy in small torch ops, switch interval 0.1 ms", busy, pause=1e-3, interval=1e-4)
        run("single: caller busy in pure Python, switch interval 0.1 ms", busy_pure, pause=1e-3, interval=1e-4)
    finally:
        pool.shutdown()


if __name__ == "__main__":
    main()
