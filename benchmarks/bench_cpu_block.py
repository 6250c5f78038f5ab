"""What a decoder block computed on the CPU reads at (hybrid.py, issue 16), and what slows it: one LLaMA-7B
block at batch 1 against its widest product alone, at several thread counts, with its weights in page-locked
memory, with torch's thread count set and restored around each call (as CpuBlock does), and while the link
copies page-locked bytes to the GPU beside it. Then one routed expert of the Mixtral anchor's shape
(cpu_experts.py, issue 15): its products alone, the experts module's eager forward, on the caller's thread and
on a worker thread as HostCompute runs it. One process, random bf16 weights, medians.

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
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from nb_offload.cpu_experts import host_threads
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16).eval()
    rotary = LlamaRotaryEmbedding(cfg)
    nbytes = sum(p.nbytes for p in block.parameters())
    out = {"meta": {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "host_threads": host_threads(),
                    "block_bytes": nbytes, "torch": torch.__version__}, "rows": []}
    add = row_recorder(out, args.json, digits=2)
    torch.inference_mode().__enter__()
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
    threads = host_threads()
    record("block, torch threads set and restored around each call", threads, call, nbytes, toggle=True)
    # the weights as views into one page-locked buffer, as a loaded model's host tier holds them
    if torch.cuda.is_available():
        flat = torch.empty(nbytes + 4096, dtype=torch.uint8, pin_memory=True)
        offset = 0
        for p in block.parameters():
            n = p.nbytes
            view = flat[offset:offset + n].view(p.dtype).view(p.shape)
            view.copy_(p.data)
            p.data = view
            offset += (n + 255) // 256 * 256
        record("block, weights in page-locked memory", threads, call, nbytes)
        src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(src, device="cuda")
        stream = torch.cuda.Stream()
        stop, copied = threading.Event(), [0, 0.0]

        def link():
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                while not stop.is_set():
                    dst.copy_(src, non_blocking=True)
                    stream.synchronize()
                    copied[0] += src.nbytes
            copied[1] = time.perf_counter() - t0
        for t in sorted({threads, max(1, threads - 2), threads + 2}):
            copier = threading.Thread(target=link)
            stop.clear()
            copied[:] = [0, 0.0]
            copier.start()
            try:
                time.sleep(0.05)
                median, best = rate(call, t)
            finally:
                stop.set()
                copier.join()
            add(what="block, page-locked weights, the link copying beside it", threads=t, median_ms=1e3 * median,
                gbps=nbytes / median / 1e9, best_gbps=nbytes / best / 1e9, link_gbps=copied[0] / copied[1] / 1e9)
    experts(torch, record, threads)


def experts(torch, record, threads):
    """One expert of the Mixtral anchor's experts module (hidden 2048, 8 experts of 5632) for one token."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    cfg = MixtralConfig(hidden_size=2048, intermediate_size=5632, num_local_experts=8, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    module = MixtralExperts(cfg).to(torch.bfloat16)
    row = sum(p[0].nbytes for p in module.parameters())
    hidden = torch.randn(1, 2048, dtype=torch.bfloat16)
    index, weights = torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.bfloat16)
    linear = torch.nn.functional.linear

    def products():
        gate, up = linear(hidden, module.gate_up_proj[3]).chunk(2, -1)
        linear(torch.nn.functional.silu(gate) * up, module.down_proj[3])
    record("expert: its products alone", threads, products, row)
    record("expert: the experts module's eager forward", threads, lambda: module(hidden, index, weights), row)
    pool = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(threads,))
    try:
        record("expert: the module's forward on a worker thread (HostCompute)", threads,
               lambda: pool.submit(module, hidden, index, weights).result(), row)
    finally:
        pool.shutdown()


if __name__ == "__main__":
    main()
