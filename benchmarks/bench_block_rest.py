"""Does the load's CPU rate predict the rate CPU blocks decode at? (block_rest.py, issue 16.) For each way the
CPU multiplies (F.linear; nb_offload's AMX kernel where it runs): the load's two measures, as the loader takes
them (the block's products, hybrid.rates_by_tokens; the rest of its forward, block_rest.seconds), and the rate the
blocks of a LLaMA-shaped model reach in decode steps on the CPU (a static cache of the shortest bucket, torch's
threads as a CPU block sets them, each block's forward timed by hooks, as the engine's rate reached is, and inside
it each linear's). Rounds interleaved, medians; the error of the products' rate and of the rate with the rest
against the blocks'. On a
CUDA machine every measure runs beside the link's copies (hybrid.BusyLink), as in a hybrid step.

    PYTHONPATH=. python3 benchmarks/bench_block_rest.py --json out.json [--threads 2] [--layers 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench_offload import row_recorder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: a CPU block's)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nb_offload import block_rest, cpu_amx, hybrid
    from nb_offload.cpu_experts import host_threads
    threads = args.threads or host_threads()
    torch.set_grad_enabled(False)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 128, vocab_size=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    layers = list(model.model.layers)
    shapes = [tuple(p.shape) for p in layers[0].parameters() if p.dim() == 2]
    nbytes = sum(p.numel() * p.element_size() for p in layers[0].parameters())
    cuda = torch.cuda.is_available()
    beside = hybrid.BusyLink(torch, torch.device("cuda")) if cuda else None
    out = {"meta": {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "threads": threads,
                    "torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "block_bytes": nbytes, "layers": args.layers}, "rows": []}
    add = row_recorder(out, args.json, digits=3)
    ways = {"F.linear": None}
    if cpu_amx.why_unavailable() is None:
        ways["amx"] = cpu_amx.Amx(torch, threads)
    else:
        print(f"the AMX kernel can't run here: {cpu_amx.why_unavailable()}")

    def decoded(kernel):
        """The blocks' median rate over ``args.steps`` decode steps (GB/s), their linears by ``kernel``; and
        their products' (GB/s) and the rest's (seconds a block) in those steps (block_rest.step_times, the probe's
        own timing, here on this model's random weights)."""
        times = block_rest.step_times(torch, model, layers, threads, kernel=kernel, beside=beside, steps=args.steps)
        rates = tuple(nbytes / statistics.median(t) / 1e9 for t in zip(*times))
        return rates + (statistics.median(block - linear for block, linear in times),)

    seen = {way: {"products": [], "rest": [], "decoded": [], "decoded_products": [], "decoded_rest": []}
            for way in ways}
    for _ in range(args.rounds):
        for way, kernel in ways.items():
            rates = hybrid.rates_by_tokens(torch, torch.bfloat16, shapes, threads, (1,), 5, beside,
                                           amx=kernel is not None)
            seen[way]["products"].append(rates[hybrid.AMX if kernel is not None else 1] / 1e9)
            seen[way]["rest"].append(block_rest.seconds(torch, cfg, torch.bfloat16, nbytes, threads,
                                                        attn_implementation="sdpa", kernel=kernel, beside=beside))
            for key, value in zip(("decoded", "decoded_products", "decoded_rest"), decoded(kernel)):
                seen[way][key].append(value)
    for way, s in seen.items():
        s["rest"] = [r for r in s["rest"] if r is not None]      # a round whose probe had no measure
        if not s["rest"]:
            add(way=way, threads=threads, error="block_rest.seconds gave no measure in any round")
            continue
        products, rest, decoded_gbps, decoded_products, decoded_rest = (
            statistics.median(s[k]) for k in ("products", "rest", "decoded", "decoded_products", "decoded_rest"))
        with_rest = block_rest.with_rest(products, nbytes, rest)
        add(way=way, threads=threads, products_gbps=products, rest_ms=rest * 1e3, with_rest_gbps=with_rest,
            decoded_gbps=decoded_gbps, decoded_products_gbps=decoded_products, decoded_rest_ms=decoded_rest * 1e3,
            products_error=products / decoded_gbps - 1,
            with_rest_error=with_rest / decoded_gbps - 1, rounds={k: [round(v, 4) for v in s[k]] for k in s})
    if beside is not None:
        beside.release()


if __name__ == "__main__":
    main()
