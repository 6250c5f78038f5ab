"""Dry runs of hybrid plans by staging depth (loader ``_deeper``, issue 16): the LLaMA-7B shape's plans at a GPU
budget for given CPU and link rates, streaming-only and hybrid as chosen, and hybrid at each depth asked for
(``prefetch=1..8``), with the step the model predicts, the bytes kept resident and the bytes a prefill streams.
A model's figures, not a measure: no GPU needed. The checkpoint is header-only (a sparse file: the planner reads
headers alone).

    PYTHONPATH=. python3 benchmarks/plan_depths.py --json out.json [--budgets 4GiB,12GiB] [--cpu 41.4,50] [--link 55.4]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import time

from bench_offload import row_recorder


def header_only_llama(folder: str):
    """A LLaMA-7B-shaped bf16 checkpoint in ``folder`` whose safetensors file is a header and a hole."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096, dtype="bfloat16")
    cfg.save_pretrained(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    header, offset = {}, 0
    for name, p in model.state_dict().items():
        nbytes = p.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(p.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.truncate(8 + len(text) + offset)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="4GiB,12GiB")
    ap.add_argument("--cpu", default="41.4,50", help="the CPU's rates (GB/s) to plan at")
    ap.add_argument("--link", type=float, default=55.4, help="the link's rate (GB/s)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import nb_offload
    from nb_offload import hybrid, loader
    out = {"meta": {"date": time.strftime("%Y-%m-%d"), "kind": "plan_depths", "link_gbps": args.link,
                    "depth_ties": loader.DEPTH_TIES}, "rows": []}
    add = row_recorder(out, args.json, digits=3)
    with tempfile.TemporaryDirectory() as folder:
        header_only_llama(folder)
        loader.Inspection.cpu_max_tokens = lambda self: 16      # a measure of this machine's CPU: not the point
        for cpu in (float(c) for c in args.cpu.split(",")):
            loader.Inspection.cpu_rates = lambda self, cpu=cpu: (cpu, args.link)
            for budget in args.budgets.split(","):
                def row(label, plan, cpu=cpu, budget=budget):
                    step = plan.predicted_seconds_per_step(args.link, cpu_gbps=cpu if plan.rates else None)
                    add(cpu_gbps=cpu, budget=budget, plan=label, prefetch=plan.prefetch,
                        split_blocks=plan.split_blocks, cpu_blocks=sum(e.compute == "cpu" for e in plan),
                        resident_gb=sum(e.bytes for e in plan if e.tier == plan.resident_tier) / 1e9,
                        prefill_streams_gb=loader.off_gpu_bytes(plan) / 1e9,
                        staging_mib=plan.reserved.get("staging_slots", 0) / 2**20, decode_tok_s=1 / step)
                common = dict(device="cuda", gpu=budget, cpu="100GiB")
                row("streamed", nb_offload.plan(folder, **common))
                row("hybrid", nb_offload.plan(folder, compute="hybrid", **common))
                for depth in range(1, hybrid.MOST_AHEAD + 1):
                    try:
                        row(f"hybrid, prefetch={depth}", nb_offload.plan(folder, compute="hybrid", prefetch=depth,
                                                                         **common))
                    except nb_offload.OffloadError as exc:
                        add(cpu_gbps=cpu, budget=budget, plan=f"hybrid, prefetch={depth}", error=str(exc)[:120])


if __name__ == "__main__":
    main()
