"""Quantized tiers on one CUDA card (issue 12): LLaMA-7B shape, bf16 checkpoint, decode at batch 1.

The rows are loaded one after another, each one's peak GPU memory taken from just before its load
through a warm-up generate, then timed together in interleaved rounds; all in one process on one card:
- nb_offload bf16 at gpu=4GiB (the baseline for "N x bf16");
- nb_offload nf4 at 4GiB, nf4 at 1.5GiB (most blocks streamed; context 512, as the default 2048's
  KV cache alone takes 1 GiB), int8 at 4GiB;
- transformers' nf4 and int8 models entirely on the GPU (each format's resident step: the bound
  when the link is not the limit);
- bitsandbytes' own offload: int8 with ``llm_int8_enable_fp32_cpu_offload`` and ``max_memory`` 4GiB
  (the baseline for "N x bitsandbytes offload").
Bounds: the larger of (quantized bytes streamed per step / page-locked link rate) and the same
format's resident step. Greedy tokens of each nb_offload row are compared with transformers' model
of the same format.

    PYTHONPATH=. python3 benchmarks/bench_quant.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_offload import build, decode_step, med, pinned_rate  # noqa: E402

GiB = 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "nb_offload-bench-7b"))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default="bf16,nf4,nf4-small,int8,nf4-resident,int8-resident,bnb-offload")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import bitsandbytes
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import nb_offload
    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        t0 = time.perf_counter()
        build(args.folder, 32)
        print(f"built and saved the model in {time.perf_counter() - t0:.0f} s", flush=True)
    links = [pinned_rate() for _ in range(3)]
    out = {"meta": {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "bitsandbytes": bitsandbytes.__version__, "link_gbps": med([med(x) for x in links])},
           "rows": []}
    torch.manual_seed(0)
    ids = torch.randint(3, 31000, (1, 16), device="cuda")
    tokens_of = {}

    def nf4_config(**kw):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                  **kw)

    makers = {
        "bf16": ("nb_offload bf16, gpu 4GiB", 4 * GiB, None,
                 lambda: nb_offload.load(args.folder, gpu="4GiB", cpu="100GiB", progress=False)),
        "nf4": ("nb_offload nf4, gpu 4GiB", 4 * GiB, "nf4",
                lambda: nb_offload.load(args.folder, gpu="4GiB", cpu="100GiB", quant="nf4", progress=False)),
        "nf4-small": ("nb_offload nf4, gpu 1.5GiB, context 512", int(1.5 * GiB), "nf4",
                      lambda: nb_offload.load(args.folder, gpu="1.5GiB", cpu="100GiB", quant="nf4", context=512,
                                              progress=False)),
        "int8": ("nb_offload int8, gpu 4GiB", 4 * GiB, "int8",
                 lambda: nb_offload.load(args.folder, gpu="4GiB", cpu="100GiB", quant="int8", progress=False)),
        "nf4-resident": ("transformers nf4, all on the GPU", None, "nf4",
                         lambda: AutoModelForCausalLM.from_pretrained(
                             args.folder, dtype=torch.bfloat16, device_map="cuda",
                             quantization_config=nf4_config()).eval()),
        "int8-resident": ("transformers int8, all on the GPU", None, "int8",
                          lambda: AutoModelForCausalLM.from_pretrained(
                              args.folder, dtype=torch.bfloat16, device_map="cuda",
                              quantization_config=BitsAndBytesConfig(load_in_8bit=True)).eval()),
        "bnb-offload": ("bitsandbytes int8 offload, max_memory 4GiB", 4 * GiB, None,
                        lambda: AutoModelForCausalLM.from_pretrained(
                            args.folder, dtype=torch.bfloat16, device_map="auto",
                            max_memory={0: 4 * GiB, "cpu": 100 * GiB},
                            quantization_config=BitsAndBytesConfig(load_in_8bit=True,
                                                                   llm_int8_enable_fp32_cpu_offload=True)).eval()),
    }
    # Phase 1: each row loaded in turn, its peak GPU memory taken from just before its load through a
    # warm-up generate (the rows loaded before it stay allocated, counted in its base, not its peak).
    loaded = {}
    for key in args.rows.split(","):
        name, budget, fmt, make = makers[key]
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            model = make()
        except Exception as exc:        # a baseline that can't load at this budget is a row too
            out["rows"].append({"row": key, "name": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print(json.dumps(out["rows"][-1]), flush=True)
            continue
        load_s = time.perf_counter() - t0
        n = args.tokens if key != "bnb-offload" else 4
        decode_step(model.generate, ids, n)         # warm-up, inside the peak
        peak = torch.cuda.max_memory_allocated() - base
        row = {"row": key, "name": name, "format": fmt, "load_s": load_s, "peak_gpu": peak, "budget": budget,
               "within_budget": budget is None or peak <= budget, "all_s": []}
        if isinstance(model, nb_offload.OffloadedModel):
            row["streamed_bytes"] = model.plan.streamed_bytes_per_token()["cpu"]
            row["resident_bytes"] = model.plan.totals()["gpu"]
            row["plan"] = str(model.plan).splitlines()
        out["rows"].append(row)
        loaded[key] = (model, n, row)
        print(json.dumps({k: v for k, v in row.items() if k != "plan"}, default=str), flush=True)
    # Phase 2: decode timed in interleaved rounds, so a slow spell of the host hits every row.
    for _ in range(args.repeats):
        for model, n, row in loaded.values():
            row["all_s"].append(decode_step(model.generate, ids, n))
    for key, (model, _, row) in loaded.items():
        row["tok_s"] = 1 / med(row["all_s"])
        tokens = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False).cpu()
        if key.endswith("-resident"):
            tokens_of[row["format"]] = tokens
        else:
            row["tokens"] = tokens
        if isinstance(model, nb_offload.OffloadedModel):
            model.unload()
    loaded.clear()

    rows = {r["row"]: r for r in out["rows"] if "tok_s" in r}
    link = out["meta"]["link_gbps"] * 1e9
    for r in rows.values():
        tokens = r.pop("tokens", None)
        if tokens is not None and r["format"] in tokens_of:
            r["same_tokens_as_transformers"] = bool(torch.equal(tokens, tokens_of[r["format"]]))
        if "streamed_bytes" in r:
            resident = rows.get(f"{r['format']}-resident")
            link_s = r["streamed_bytes"] / link
            step_s = 1 / resident["tok_s"] if resident else 0.0
            r["bound_tok_s"] = 1 / max(link_s, step_s) if max(link_s, step_s) else None
            r["bound_is"] = "link" if link_s >= step_s else "resident step"
            if r["bound_tok_s"]:
                r["pct_of_bound"] = 100 * r["tok_s"] / r["bound_tok_s"]
        if "bf16" in rows and r["format"] is not None:
            r["x_bf16"] = r["tok_s"] / rows["bf16"]["tok_s"]
        if "bnb-offload" in rows and r["format"] == "int8" and r["row"] == "int8":
            r["x_bnb_offload"] = r["tok_s"] / rows["bnb-offload"]["tok_s"]
    print("\n== summary ==")
    for r in out["rows"]:
        if "error" in r:
            print(f"{r['name']}: {r['error']}")
            continue
        extra = ", ".join(f"{k} {r[k]:.2f}" for k in ("pct_of_bound", "x_bf16", "x_bnb_offload") if k in r)
        print(f"{r['name']}: {r['tok_s']:.2f} tok/s, peak {r['peak_gpu'] / GiB:.2f} GiB "
              f"(within budget {r['within_budget']}), load {r['load_s']:.1f} s"
              + (f", {extra}" if extra else "")
              + (f", same tokens {r['same_tokens_as_transformers']}" if "same_tokens_as_transformers" in r else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
