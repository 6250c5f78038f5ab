"""What a hybrid plan's staging depth costs a prefill, from dry-run plans of a LLaMA-7B-shaped checkpoint of
headers alone (``nb_offload.tiny.hollow_llama``), at CPU and link rates given (none is measured): per number
of pieces copied ahead, the decode step the plan models, the blocks it keeps resident, the bytes a prefill
streams, and those left once the slots hold the prompt's first units (``Engine.prime``: every slot,
filled between generates). The streamed plan (``compute="gpu"``) beside it. Runs no GPU.

    PYTHONPATH=. python3 benchmarks/prefill_room.py --budget 4GiB --cpu-gbps 35 --link-gbps 55
"""

from __future__ import annotations

import argparse
import os
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="4GiB")
    ap.add_argument("--cpu-gbps", type=float, default=35.0)
    ap.add_argument("--link-gbps", type=float, default=55.0)
    ap.add_argument("--deepest", type=int, default=9)
    args = ap.parse_args()
    import nb_offload
    from nb_offload import hybrid, loader
    from nb_offload.tiny import hollow_llama
    cpu, link = args.cpu_gbps, args.link_gbps
    # the rates given stand in for the load's measures (the CPU's products, the link; nothing is timed)
    loader.Inspection.cpu_rates = lambda self: (cpu, link)
    loader.Inspection.cpu_products = lambda self: "F.linear"
    hybrid.cpu_max_tokens = lambda *a, **k: 4
    folder = hollow_llama(os.path.join(tempfile.mkdtemp(), "llama-7b-headers"))

    def row(name, plan, decode_gbps):
        resident = sum(e.bytes for e in plan if e.tier == "gpu")
        streams = sum(e.bytes for e in plan if e.tier in ("cpu", "disk"))      # a prefill: every off-GPU unit
        primed = (plan.prefetch + 1) * plan.slot_bytes
        tok_s = 1 / plan.predicted_seconds_per_step(link, cpu_gbps=decode_gbps)
        print(f"{name:>9} | {plan.prefetch:>5} | {sum(e.compute == 'cpu' for e in plan):>10} | {tok_s:>10.2f} | "
              f"{resident / 2**30:>12.2f} | {streams / 1e9:>15.2f} | {primed / 1e9:>10.2f} | "
              f"{(streams - primed) / 1e9:>19.2f}")
    print(f"LLaMA-7B shape, gpu={args.budget}, CPU {cpu} GB/s, link {link} GB/s (dry-run plans)")
    print("plan      | ahead | CPU blocks | decode tok/s (modelled) | resident GiB | prefill streams GB | "
          "primed GB | prefill after priming GB")
    row("streamed", nb_offload.plan(folder, gpu=args.budget, cpu="100GiB"), None)
    for depth in range(1, args.deepest + 1):
        try:
            plan = nb_offload.plan(folder, gpu=args.budget, cpu="100GiB", compute="hybrid", prefetch=depth)
        except nb_offload.OffloadError as exc:
            print(f"{'hybrid':>9} | {depth:>5} | does not fit: {exc}")
            continue
        row("hybrid", plan, cpu)
    chosen = nb_offload.plan(folder, gpu=args.budget, cpu="100GiB", compute="hybrid")
    print(f"the hybrid plan takes {chosen.prefetch} ahead")


if __name__ == "__main__":
    main()
