"""The step model (hybrid.step_seconds) against hybrid decode runs already measured: each run's plan rebuilt on
this machine from a LLaMA-7B-shaped checkpoint of headers alone (``nb_offload.tiny.hollow_llama``), with the blocks
the run computed on the CPU (bench_hybrid.py's JSON: their count, the rates at load, the depth copied
ahead), then the modelled tok/s at the CPU's rate measured at load and at the rate reached while running,
against the measured tok/s. Runs no GPU.

    PYTHONPATH=. python3 benchmarks/hybrid_model_check.py benchmarks/runs/raw-...-hybrid.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    import nb_offload
    from nb_offload import hybrid
    from nb_offload.tiny import hollow_llama
    folder = hollow_llama(os.path.join(tempfile.mkdtemp(), "llama-7b-headers"))
    for path in args.runs:
        for r in json.load(open(path))["rows"]:
            if "error" in r or not r.get("prefetch"):
                continue
            cpu, link = r["measured_at_load_cpu_gbps"], r["measured_at_load_link_gbps"]
            streamed = nb_offload.plan(folder, gpu=r["budget"], cpu="100GiB")
            in_host = [e.name for e in streamed if e.tier == "cpu" and e.kind == "block"]
            runs = [("hybrid", r["hybrid_tok_s"], r["blocks_on_cpu"], r["cpu_gbps_while_running"])]
            runs += [(k, v["tok_s"], v["blocks_on_cpu"], v["cpu_gbps"]) for k, v in r.get("variants", {}).items()]
            for name, measured, count, reached in runs:
                chosen = hybrid.spread(in_host, count / len(in_host))
                plan = nb_offload.plan(folder, gpu=r["budget"], cpu="100GiB", prefetch=r["prefetch"],
                                       pins=dict.fromkeys(chosen, "cpu-compute"))
                at_load = 1 / plan.predicted_seconds_per_step(link, cpu_gbps=cpu)
                at_reached = 1 / plan.predicted_seconds_per_step(link, cpu_gbps=reached)
                print(f"{os.path.basename(path)} {r['budget']} {name}: {count} blocks on the CPU, {plan.prefetch} "
                      f"ahead; measured {measured:.2f} tok/s; modelled at the CPU's rate at load ({cpu:.1f} GB/s) "
                      f"{at_load:.2f} ({100 * (at_load / measured - 1):+.0f} %), at the rate reached "
                      f"({reached:.1f} GB/s) {at_reached:.2f} ({100 * (at_reached / measured - 1):+.0f} %)")


if __name__ == "__main__":
    main()
