"""How many bytes a second the host gives its cores and the link together (issue 16's bound at 4 GiB): the
cores reading host memory (an fp32 sum, and a LLaMA-7B block's batch-1 products over distinct weights, so the
cache holds none) at several thread counts, alone and while the link copies page-locked memory to the GPU
from distinct 64 MiB chunks (past the last-level cache), with the link's rate alone and beside them. If
the two together stay near one total whatever the cores run, that total bounds a hybrid step: every byte it
reads, the CPU's and the link's, comes out of it. Page-locked buffers throughout, as the engine's are.

    PYTHONPATH=. python3 benchmarks/host_bound.py --json out.json [--threads 8,12,14,16] [--ways sum,products,packed]
    PYTHONPATH=. python3 benchmarks/host_bound.py --link-for 60    # only the link, for 60 s (beside another program)
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

from bench_offload import row_recorder

CHUNK = 64 << 20


def filled(nbytes: int, fill, huge_pages: bool = True):
    """A page-locked flat buffer of ``nbytes``, ``fill``ed before it is locked (cheaper than faulting locked
    pages in), or pageable where there is no GPU; ``huge_pages=False``: without tiers.HUGE_PAGES' advice."""
    import torch

    from nb_offload import tiers
    from nb_offload.tiers import alloc_host, lock_host
    pinned = torch.cuda.is_available()
    tiers.HUGE_PAGES, was = huge_pages, tiers.HUGE_PAGES
    try:
        flat = alloc_host(nbytes, pinned=pinned, lock=False)
    finally:
        tiers.HUGE_PAGES = was
    view = fill(flat)
    if pinned:
        lock_host(flat)
    return view


def text_of(path: str) -> str:
    """A file's text, or "unknown" where it can't be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return "unknown"


class Link:
    """A thread copying page-locked host memory to the GPU, 64 MiB at a time from ``chunks`` distinct chunks
    in turn, until stopped; ``rate()`` is the GB/s of the last run."""

    def __init__(self, torch, chunks: int = 32):
        self.torch = torch
        self.source = filled(chunks * CHUNK, lambda flat: flat.fill_(1))
        self.target = torch.empty(CHUNK, dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream()
        self.chunks = chunks
        self.copied, self.seconds = 0, 0.0

    def run(self, stop: threading.Event):
        torch, k, copied = self.torch, 0, 0
        t0 = time.perf_counter()
        with torch.cuda.stream(self.stream):
            while not stop.is_set():
                a = (k % self.chunks) * CHUNK
                self.target.copy_(self.source[a:a + CHUNK], non_blocking=True)
                self.stream.synchronize()
                copied += CHUNK
                k += 1
        self.copied, self.seconds = copied, time.perf_counter() - t0

    def rate(self) -> float:
        return self.copied / max(self.seconds, 1e-9) / 1e9

    def beside(self, fn):
        """``fn()`` while the link copies: (fn's result, the link's GB/s meanwhile)."""
        stop = threading.Event()
        copier = threading.Thread(target=self.run, args=(stop,))
        copier.start()
        time.sleep(0.02)
        try:
            result = fn()
        finally:
            stop.set()
            copier.join()
        return result, self.rate()


def same_bits(torch, shapes, thread_counts) -> dict:
    """{(way, threads): whether its outputs equal F.linear's bit for bit} for the fused and torch.mv ways, on
    one block's random weights at each thread count (a CPU block's tokens must equal the reference's, which
    computes with F.linear)."""
    gen = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    block = [(torch.randn(r, c, generator=gen) * 0.02).to(dt) for r, c in shapes]
    inputs = {c: torch.randn(1, c, generator=gen).to(dt) for _, c in shapes}
    out, caller = {}, torch.get_num_threads()
    for threads in [int(t) for t in thread_counts.split(",")]:
        torch.set_num_threads(threads)
        want = [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in block]
        joined = [torch.nn.functional.linear(inputs[4096], torch.cat(block[0:3])),
                  torch.nn.functional.linear(inputs[4096], torch.cat(block[4:6]))]
        out["fused", threads] = (torch.equal(joined[0], torch.cat(want[0:3], dim=1))
                                 and torch.equal(joined[1], torch.cat(want[4:6], dim=1)))
        out["mv", threads] = all(torch.equal(torch.mv(w, inputs[w.shape[1]][0]), y[0]) for w, y in zip(block, want))
        for slices in (16, 64):
            out[f"bmm{slices}", threads] = all(torch.equal(torch.bmm(
                inputs[w.shape[1]].expand(slices, 1, w.shape[1]),
                w.view(slices, w.shape[0] // slices, w.shape[1]).transpose(1, 2)).reshape(1, -1), y)
                for w, y in zip(block, want))
        # the phased way's slices, each by one thread (set back before the next thread count)
        torch.set_num_threads(1)
        out["phased", threads] = all(torch.equal(torch.cat([torch.nn.functional.linear(
            inputs[w.shape[1]], w[k * w.shape[0] // threads:(k + 1) * w.shape[0] // threads])
            for k in range(threads)], dim=1), y) for w, y in zip(block, want))
    torch.set_num_threads(caller)
    return out


def _linears(torch, shapes):
    """A module of bias-free linears of ``shapes`` ([out, in]), called with one row of 4,096 and one of 11,008
    inputs (each linear takes the one of its width): a block's products as torch.compile sees them."""
    class Products(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linears = torch.nn.ModuleList(torch.nn.Linear(cols, rows, bias=False, device="meta")
                                               for rows, cols in shapes)

        def forward(self, *rows):
            by_width = {x.shape[-1]: x for x in rows}
            return [linear(by_width[linear.in_features]) for linear in self.linears]
    return Products().eval()


def compile_block_products(torch, weights):
    """``weights`` (blocks' matrices in run order) as linears compiled with frozen weights and max-autotune, and
    the inputs to call them with."""
    import torch._inductor.config as inductor
    inductor.freezing = True
    # its own templates only: max-autotune otherwise picks between them, oneDNN on reordered weights and aten's mm
    # by timing each at compile time, and the bits with them (on the 2-core machine the same shape took each)
    inductor.max_autotune_gemm_backends = "CPP"
    module = _linears(torch, [tuple(w.shape) for w in weights])
    for linear, w in zip(module.linears, weights):
        linear.weight = torch.nn.Parameter(w, requires_grad=False)
    call_inputs = [torch.full((1, cols), 0.5, dtype=weights[0].dtype) for cols in sorted({w.shape[1] for w in weights})]
    compiled = torch.compile(module, mode="max-autotune", dynamic=False)
    from torch._inductor.utils import run_and_get_code
    _, code = run_and_get_code(compiled, *call_inputs)
    return compiled, call_inputs, kernels_in("\n".join(code))


def kernels_in(code: str) -> list:
    """The matrix kernels inductor's generated ``code`` calls: its own templates (micro_gemm), oneDNN on reordered
    weights (_linear_pointwise) or aten's mm (F.linear's)."""
    import re
    return sorted(set(re.findall(r"kernel_micro_gemm_\w+|_linear_pointwise|extern_kernels\.mm|aten\.mm", code)))


def compiled_differing(torch, shapes) -> dict:
    """Per distinct shape, (outputs differing, outputs, kernels) of its compiled product against F.linear's, over
    the order-revealing check inputs of cpu_products (the weights and inputs its ``matches`` takes)."""
    from nb_offload import cpu_products
    found = {}
    for rows, cols in dict.fromkeys(shapes):
        gen = torch.Generator().manual_seed(rows * 131 + cols)
        w, _ = cpu_products._check_weights(torch, rows, cols, torch.bfloat16, gen)
        xs = [x.view(1, cols) for x in cpu_products._check_inputs(torch, cols, torch.bfloat16, gen)]
        torch._dynamo.reset()
        module, _, kernels = compile_block_products(torch, [w])
        differ = sum(int((module(x)[0] != torch.nn.functional.linear(x, w)).sum()) for x in xs)
        found[rows, cols] = (differ, rows * len(xs), kernels)
    torch._dynamo.reset()
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="8,12,14,16")
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--link-for", type=float, default=None)
    ap.add_argument("--ways", default="sum,products", help="what the cores read by: sum, products (F.linear, "
                    "fused and torch.mv too, each bit-compared with F.linear first; worker: F.linear on a worker "
                    "thread, as the engine's CPU blocks; packed: reordered copies where they equal F.linear, as the "
                    "engine's; packed_all: every product reordered; products_4k, products_pageable: other pages; "
                    "bmm16, bmm64: row slices through torch.bmm; phased: row slices on single-threaded workers; own: "
                    "nb_offload's own kernel, cpu_kernel=\"fast\", whose bits differ; amx: nb_offload's AMX kernel, "
                    "F.linear's bits where its check finds a chunk (cpu_amx.py); compiled: torch.compile with "
                    "frozen weights and max-autotune, bit-compared by shape; compiled_equal: compiled for the shapes "
                    "whose bits equal F.linear's, F.linear for the others)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    torch.set_grad_enabled(False)        # for the whole run (an inference_mode object left unentered does nothing)
    link = Link(torch) if torch.cuda.is_available() else None
    if args.link_for:
        if link is None:
            raise SystemExit("--link-for needs a CUDA device")
        stop = threading.Event()
        threading.Timer(args.link_for, stop.set).start()
        link.run(stop)
        print(f"link for {link.seconds:.0f} s: {link.rate():.1f} GB/s", flush=True)
        return
    out = {"meta": {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if link else "none"}, "rows": []}
    add = row_recorder(out, args.json, digits=2)
    dt = torch.bfloat16
    # a block's products, five blocks' worth of distinct weights (2.0 GB), read once a pass
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    # each block's matrices one after another in one flat buffer, as a unit's are in the engine's
    block_elements = sum(rows * cols for rows, cols in shapes)
    chosen = args.ways.split(",")

    def block_weights(alloc):
        flats = [alloc(block_elements * 2, lambda flat: flat.view(dt).fill_(0.01)).view(dt) for _ in range(5)]
        return flats, [matrix(flat, start, rows, cols) for flat in flats for start, (rows, cols) in zip(starts, shapes)]

    def matrix(flat, first, rows, cols):
        return flat[first:first + rows * cols].view(rows, cols)
    starts = [sum(r * c for r, c in shapes[:i]) for i in range(len(shapes))]
    flats, weights = block_weights(filled)
    product_bytes = sum(w.numel() * 2 for w in weights)
    inputs = {cols: torch.full((1, cols), 0.5, dtype=dt) for _, cols in shapes}
    floats = filled(4 << 30, lambda flat: flat.view(torch.float32).fill_(1.0))
    # the same products over weights in 4 KiB pages (page-locked without tiers.HUGE_PAGES' advice), and in torch's
    # own pageable memory: what the pages alone change
    small_pages = block_weights(lambda n, fill: filled(n, fill, huge_pages=False))[1] if "products_4k" in chosen \
        else []
    pageable = block_weights(lambda n, fill: fill(torch.empty(n, dtype=torch.uint8)))[1] \
        if "products_pageable" in chosen else []

    def products(among=weights):
        for w in among:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    # the same bytes as fewer products: q/k/v as one matrix and gate/up as one, views of the same memory (adjacent
    # in a block's flat buffer, as a CPU block could view them); and each product as torch.mv
    (q, cols), (gate, _) = shapes[0], shapes[4]
    fused = [w for flat in flats for w in (matrix(flat, starts[0], 3 * q, cols), matrix(flat, starts[3], q, cols),
                                           matrix(flat, starts[4], 2 * gate, cols), matrix(flat, starts[6], q, gate))]

    def fused_products():
        for w in fused:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    def mv_products():
        for w in weights:
            torch.mv(w, inputs[w.shape[1]][0])

    # reordered copies of the weights, as the engine's CPU blocks take them (nb_offload/cpu_products.py):
    # "packed" for the shapes whose reordered product matches F.linear at the threads of the pass, as the engine
    # does; "packed_all" for every shape (the down projection's too, which may differ in bits)
    from nb_offload import cpu_products
    packs = [cpu_products.reorder(torch, w) for w in weights] if {"packed", "packed_all"} & set(args.ways.split(",")) \
        else []

    def packed_products(every=False):
        threads = torch.get_num_threads()
        for w, packed in zip(weights, packs):
            if every or cpu_products.matches(torch, *w.shape, dt, False, threads):
                cpu_products.product(torch, inputs[w.shape[1]], packed, None, w.shape[0])
            else:
                torch.nn.functional.linear(inputs[w.shape[1]], w)

    # the products on a worker thread with the pass's thread count, as the engine's CPU blocks compute (handoff.py):
    # on the H200 host the Mixtral experts' F.linear products read 33-36 GB/s there against 52-62 on the calling
    # thread (RESULTS.md, 2026-12-02)
    from concurrent.futures import ThreadPoolExecutor
    workers = {}

    def on_worker():
        threads = torch.get_num_threads()
        if threads not in workers:
            workers[threads] = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,))
        workers[threads].submit(products).result()

    # each product as a batch of row slices (torch.bmm over a free [slices, rows, in] view): oneDNN's batched
    # kernel may hand each core whole slices, each read front to back by one thread, as one expert per
    # single-threaded worker read 67-68 GB/s (RESULTS.md, 2026-12-02) where one product over all threads reads less
    def sliced_products(slices):
        for w in weights:
            rows, cols = w.shape
            torch.bmm(inputs[cols].expand(slices, 1, cols), w.view(slices, rows // slices, cols).transpose(1, 2))

    # each product's rows split over single-threaded workers, all of a phase's products (q/k/v, o, gate/up,
    # down: those a block can compute at once) before the next phase: the same, without oneDNN's batching
    phased = {}

    def phased_products():
        threads = torch.get_num_threads()
        if threads not in phased:
            phased[threads] = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))
        pool, phases = phased[threads], ((0, 3), (3, 4), (4, 6), (6, 7))

        def part(phase_weights, k):
            for w in phase_weights:
                rows = w.shape[0]
                torch.nn.functional.linear(inputs[w.shape[1]], w[k * rows // threads:(k + 1) * rows // threads])
        for b in range(0, len(weights), len(shapes)):
            for first, last in phases:
                list(pool.map(part, [weights[b + first:b + last]] * threads, range(threads)))

    # nb_offload's own kernel (cpu_kernel.py, cpu_kernel="fast": each row read front to back, 4 rows a thread at
    # a time, AVX-512 BF16): what products read where the kernel streams as a sum does. Its sums run in another
    # order than F.linear's, so its bits differ
    from nb_offload import cpu_kernel
    if "own" in chosen and cpu_kernel.why_unavailable():
        raise SystemExit(f"--ways own: the kernel can't run here: {cpu_kernel.why_unavailable()}")

    def own_products():
        threads = torch.get_num_threads()
        for w in weights:
            cpu_kernel.product(torch, inputs[w.shape[1]], w, None, threads)
    if "own" in chosen:      # how far its bits are from F.linear's, on random weights and inputs
        gen = torch.Generator().manual_seed(0)
        differ = total = 0
        for rows, cols in dict.fromkeys(shapes):
            w = (torch.randn(rows, cols, generator=gen) * 0.02).to(dt)
            x = torch.randn(1, cols, generator=gen).to(dt)
            y = cpu_kernel.product(torch, x, w, None, torch.get_num_threads())
            differ += int((y != torch.nn.functional.linear(x, w)).sum())
            total += rows
        out["meta"]["own_kernel_outputs_differing"] = [differ, total]
        print(f"own kernel: {differ} of {total} outputs differ from F.linear's in the last bit or more", flush=True)

    # nb_offload's AMX kernel (cpu_amx.py, the default exact products where it runs): F.linear's bits for the shapes
    # whose chunk the check finds at the thread count, F.linear for the others; the weights read as stored
    from nb_offload import cpu_amx
    if "amx" in chosen and cpu_amx.why_unavailable():
        raise SystemExit(f"--ways amx: the AMX kernel can't run here: {cpu_amx.why_unavailable()}")

    def amx_products():        # as the engine's linears take it (cpu_amx.Amx), F.linear where it doesn't
        amx = cpu_amx.Amx(torch, torch.get_num_threads())
        for w in weights:
            if not amx.check(*w.shape, dtype=dt) or amx.multiply(inputs[w.shape[1]], w, None) is None:
                torch.nn.functional.linear(inputs[w.shape[1]], w)

    # torch.compile's CPU backend with frozen weights and max-autotune: its own AMX GEMM templates, over weights it
    # packs into a blocked layout of its own (copies, as "packed"'s). Compiled once a thread count (its kernels
    # take the count at compile time). On a 2-core AMX machine (2026-12-05) its bits equalled F.linear's with
    # 4,096 inputs and not with 11,008, as the reordered copies', and it read 24.7 GB/s against F.linear's 21.8
    # (benchmarks/RESULTS.md)
    compiled = {}       # threads -> (compiled module, its inputs, the weights it leaves to F.linear)

    def compiled_products(where_equal=False):
        threads = torch.get_num_threads()
        key = threads, where_equal
        if key not in compiled:
            if threads not in checked:      # first: the check resets torch.compile's caches
                checked[threads] = compiled_differing(torch, shapes)
                out["meta"].setdefault("compiled_outputs_differing", {})[threads] = {
                    f"{r}x{c}": f"{d}/{n} ({', '.join(k)})" for (r, c), (d, n, k) in checked[threads].items()}
                print(f"compiled, {threads} threads: outputs differing from F.linear's by shape "
                      f"{out['meta']['compiled_outputs_differing'][threads]}", flush=True)
            left = [w for w in weights if where_equal and checked[threads][tuple(w.shape)][0]]
            taken = [w for w in weights if not any(w is x for x in left)]
            module, call_inputs, kernels = compile_block_products(torch, taken)
            compiled[key] = module, call_inputs, left
            out["meta"].setdefault("compiled_kernels", {})[f"{threads}{' where equal' if where_equal else ''}"] = \
                kernels
        module, call_inputs, left = compiled[key]
        module(*call_inputs)
        for w in left:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
    checked = {}

    ways = {"sum": ("sum", lambda: floats.sum(), floats.numel() * 4),
            "products": ("products", products, product_bytes),
            "products_4k": ("products, 4 KiB pages", lambda: products(small_pages), product_bytes),
            "products_pageable": ("products, pageable memory", lambda: products(pageable), product_bytes),
            "fused": ("products, q/k/v and gate/up fused", fused_products, product_bytes),
            "mv": ("products as torch.mv", mv_products, product_bytes),
            "worker": ("products on a worker thread", on_worker, product_bytes),
            "packed": ("products, reordered where equal", packed_products, product_bytes),
            "packed_all": ("products, all reordered", lambda: packed_products(every=True), product_bytes),
            "bmm16": ("products as 16 row slices (torch.bmm)", lambda: sliced_products(16), product_bytes),
            "bmm64": ("products as 64 row slices (torch.bmm)", lambda: sliced_products(64), product_bytes),
            "phased": ("products' rows on single-threaded workers", phased_products, product_bytes),
            "own": ("products by nb_offload's own kernel (cpu_kernel.py)", own_products, product_bytes),
            "amx": ("products by nb_offload's AMX kernel (cpu_amx.py)", amx_products, product_bytes),
            "compiled": ("products compiled (inductor, frozen, max-autotune)", compiled_products, product_bytes),
            "compiled_equal": ("products compiled where equal, else F.linear", lambda: compiled_products(True),
                               product_bytes)}
    if unknown := set(chosen) - set(ways):
        raise SystemExit(f"--ways: {sorted(unknown)}; accepted: {', '.join(ways)}")
    out["meta"].update(huge_pages_setting=text_of("/sys/kernel/mm/transparent_hugepage/enabled").strip(),
                       anon_huge_pages=next((line.split(":")[1].strip() for line in
                                             text_of("/proc/self/smaps_rollup").splitlines()
                                             if line.startswith("AnonHugePages")), "unknown"))
    print(f"transparent huge pages: {out['meta']['huge_pages_setting']}; this process holds "
          f"{out['meta']['anon_huge_pages']} in them", flush=True)
    equal = same_bits(torch, shapes, args.threads) if {"fused", "mv", "bmm16", "bmm64", "phased"} & set(chosen) \
        else {}

    def timed(fn, nbytes):
        fn()
        times = []
        for _ in range(args.passes):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return nbytes / statistics.median(times) / 1e9

    if link is None:        # no GPU: the cores alone (a check of the script itself)
        link = type("NoLink", (), {"beside": staticmethod(lambda fn: (fn(), 0.0))})()
    _, alone = link.beside(lambda: time.sleep(1.0))
    add(what="link alone", link_gbps=alone)
    print(f"link alone: {alone:.1f} GB/s", flush=True)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for way in chosen:
            torch.set_num_threads(threads)     # again: a worker's own setting can reach the process's
            name, fn, nbytes = ways[way]
            cpu_alone = timed(fn, nbytes)
            cpu_beside, link_beside = link.beside(lambda fn=fn, nbytes=nbytes: timed(fn, nbytes))
            extra = {"equal_to_linear": equal[way, threads]} if (way, threads) in equal else {}
            if way == "packed":
                extra["reordered_shapes"] = [list(shape) for shape in dict.fromkeys(shapes)
                                             if cpu_products.matches(torch, *shape, dt, False, threads)]
            if way == "amx":
                extra["amx_chunks"] = {f"{r}x{c}": cpu_amx.chunk_for(torch, r, c, dt, False, threads)
                                       for r, c in dict.fromkeys(shapes)}
            add(what=name, threads=threads, cpu_alone_gbps=cpu_alone, cpu_beside_gbps=cpu_beside,
                link_beside_gbps=link_beside, together_gbps=cpu_beside + link_beside, **extra)
            print(f"{name:36s} {threads:2d} threads: cpu alone {cpu_alone:6.1f}, beside the link {cpu_beside:6.1f} "
                  f"+ link {link_beside:5.1f} = {cpu_beside + link_beside:6.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
