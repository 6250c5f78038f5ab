"""Streaming speed on one CUDA card: nb_offload against the resident model and Accelerate, same run.

Builds a LLaMA-7B-shaped model (hidden 4096, intermediate 11008, vocab 32000; ``--layers`` of
them) with random bf16 weights, saves it, measures the page-locked host-to-GPU rate, then times
batch-1 greedy decode: everything resident, nb_offload with a small GPU budget (blocks streamed
from page-locked host memory), and transformers + Accelerate (device_map="auto", max_memory)
under the same budget. Repeats are interleaved; medians are printed with their spread.

    PYTHONPATH=. python3 benchmarks/bench_stream.py --layers 8 --gpu 4GiB --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time


def pinned_rate(torch, nbytes=1 << 30, repeats=5):
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rates = []
    for _ in range(repeats + 1):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src, non_blocking=True)
        e.record()
        e.synchronize()
        rates.append(nbytes / (s.elapsed_time(e) / 1e3) / 1e9)
    del src, dst
    return statistics.median(rates[1:]), rates[1:]


def build(folder, layers, torch):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, dtype="bfloat16")
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def decode_time(generate, torch, ids, new_tokens):
    """Seconds per decode step, from the difference of two generate lengths (prefill cancels)."""
    def timed(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    short, long = timed(2), timed(2 + new_tokens)
    return (long - short) / new_tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--gpu", default="4GiB")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folder", default=None)
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    import transformers
    import nb_offload
    from nb_offload.budget import parse_size
    folder = args.folder or tempfile.mkdtemp(prefix="nb_offload-bench-")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        build(folder, args.layers, torch)
    link, link_all = pinned_rate(torch)
    print(f"page-locked host-to-GPU: median {link:.1f} GB/s of {[round(r, 1) for r in link_all]}")
    ids = torch.randint(3, 31000, (1, 16), device="cuda")
    budget = parse_size(args.gpu)

    # resident model (plain transformers on the GPU)
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    llm = nb_offload.load(folder, gpu=budget, cpu="100GiB", progress=False)
    streamed = llm.plan.streamed_bytes_per_token()["cpu"]
    print(llm.plan)
    res, off = [], []
    with torch.inference_mode():
        for _ in range(args.repeats):
            res.append(decode_time(ref.generate, torch, ids, args.tokens))
            off.append(decode_time(llm.generate, torch, ids, args.tokens))
    # correctness on the same run
    with torch.inference_mode():
        a = ref.generate(ids, max_new_tokens=8, do_sample=False)
        b = llm.generate(ids, max_new_tokens=8, do_sample=False)
    same = torch.equal(a, b)
    del ref
    gc.collect()
    torch.cuda.empty_cache()
    resident = statistics.median(res)
    streamed_t = statistics.median(off)
    bound = max(streamed / (link * 1e9), resident)
    summary = llm.trace.summary()
    llm.unload()
    acc = None
    if not args.skip_accelerate:
        from transformers import AutoModelForCausalLM as A
        acc_model = A.from_pretrained(folder, dtype=torch.bfloat16, device_map="auto",
                                      max_memory={0: budget, "cpu": 100 * 2**30})
        with torch.inference_mode():
            acc = decode_time(acc_model.generate, torch, ids, max(4, args.tokens // 4))
        del acc_model
        gc.collect()
        torch.cuda.empty_cache()
    rows = {
        "card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "layers": args.layers, "gpu_budget": budget, "streamed_bytes_per_token": streamed,
        "link_gbps": link, "resident_s": resident, "resident_all": res, "nb_offload_s": streamed_t,
        "nb_offload_all": off, "bound_s": bound, "pct_of_bound": 100 * bound / streamed_t,
        "pct_of_pcie": 100 * (streamed / (link * 1e9)) / streamed_t, "accelerate_s": acc,
        "x_accelerate": (acc / streamed_t) if acc else None, "tokens_identical": same,
        "trace_summary": summary,
    }
    print(f"resident decode {1 / resident:.2f} tok/s; nb_offload {1 / streamed_t:.2f} tok/s "
          f"(spread {min(off):.4f}-{max(off):.4f} s); bound {1 / bound:.2f} tok/s -> "
          f"{rows['pct_of_bound']:.1f}% of the bound, {rows['pct_of_pcie']:.1f}% of the PCIe limit")
    if acc:
        print(f"accelerate {1 / acc:.2f} tok/s -> nb_offload is {rows['x_accelerate']:.2f}x")
    print(f"tokens identical to resident: {same}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
