"""Where a quantized decode step's time goes, on one CUDA card: nf4 at gpu=4GiB (LLaMA-7B shape), with
the engine's knobs varied one at a time, against transformers' nf4 model entirely on the GPU.

For each variant: decode tok/s (per-step median of timed generates), host time inside the engine's
hooks per forward pass, and from the trace of one step: the copies' busy time and the step's span.

    PYTHONPATH=. python3 benchmarks/quant_variants.py --json out.json
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
from bench_offload import build, hook_clock, med, step_times  # noqa: E402

VARIANTS = {"default": {}, "prefetch 2": {"prefetch": 2}, "prefetch 3": {"prefetch": 3}, "trace off": {"trace": False},
            "no holding": {"hold_spare": False}, "sequential": {"policy": "sequential"}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "nb_offload-bench-7b"))
    ap.add_argument("--gpu", default="4GiB")
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import nb_offload
    from nb_offload.engine import Engine
    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        build(args.folder, 32)
    spent = hook_clock(Engine)
    torch.manual_seed(0)
    ids = torch.randint(3, 31000, (1, 16), device="cuda")
    rows = []
    ref = AutoModelForCausalLM.from_pretrained(
        args.folder, dtype=torch.bfloat16, device_map="cuda",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    step_times(ref.generate, ids, 8)
    ref_steps = step_times(ref.generate, ids, 48)
    rows.append({"variant": "transformers, all on the GPU", "tok_s": 1 / med(ref_steps)})
    print(json.dumps(rows[-1]), flush=True)
    del ref
    gc.collect()
    torch.cuda.empty_cache()
    for label, kw in VARIANTS.items():
        llm = nb_offload.load(args.folder, gpu=args.gpu, cpu="100GiB", quant=args.quant, progress=False, **kw)
        step_times(llm.generate, ids, 8)
        before, passes = spent["s"], 48
        steps = step_times(llm.generate, ids, passes)
        hooks_us = 1e6 * (spent["s"] - before) / passes
        row = {"variant": label, "tok_s": 1 / med(steps), "hooks_us_per_pass": hooks_us,
               "streamed_units": len(llm._engine.order), "held": len(llm.held), "split": llm.plan.split_blocks}
        if llm.trace.enabled:
            llm.trace.clear()
            llm.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            llm.trace.flush(wait=True)
            events = list(llm.trace)
            last = max(e.step for e in events)
            step = [e for e in events if e.step == last]
            copies = [e for e in step if e.kind == "copy"]
            fwd = [e for e in step if e.kind == "step"]
            row.update(copy_ms=1e3 * sum(e.end - e.start for e in copies), copies=len(copies),
                       step_ms=1e3 * sum(e.end - e.start for e in fwd),
                       streamed_compute_ms=1e3 * sum(e.end - e.start for e in step if e.kind == "compute"))
        rows.append(row)
        print(json.dumps(row), flush=True)
        llm.unload()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "gpu": args.gpu,
                       "quant": args.quant, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
