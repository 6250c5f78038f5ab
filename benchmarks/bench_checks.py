"""What issue 10's checks cost, on one CUDA card, in one process (LLaMA-7B shape, bf16).

1. Decode at gpu=4GiB, and everything resident: this nb_offload against the previous release
   (``--prev DIR``: a copy of the package before the checks, renamed ``nb_offload_prev``), timed in
   interleaved rounds, tokens compared. Each forward pass now goes through the run gate and the
   host-memory sample: that is the per-step cost.
2. Loading with the offload cache: a plan whose disk tier goes through the cache (float16 from
   this bf16 checkpoint converts every unit), written once, then loaded again: with every cache
   file read and hashed before use (stamps removed), checking only the files' headers (the same,
   without the hashes), and trusting files unchanged since their stamps (a reload of an unchanged
   cache); warm (the files in the page cache) and cold (page cache dropped before each load).

    mkdir -p .prev && git archive f2d756a nb_offload | tar -x -C .prev && mv .prev/nb_offload .prev/nb_offload_prev
    PYTHONPATH=. python3 benchmarks/bench_checks.py --prev .prev --json out.json

(f2d756a: the last commit before the checks; .prev is git-ignored, carried to the GPU machine.)
"""

from __future__ import annotations

import argparse
import functools
import gc
import glob
import importlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_offload import build, drop_caches, hook_clock, med, pinned_rate, row_recorder, step_times  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "nb_offload-bench-7b"))
    ap.add_argument("--prev", default=None, help="folder holding nb_offload_prev (the package before the checks)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default="decode,resident,verify")
    ap.add_argument("--decode-budgets", default="4GiB",
                    help="gpu budgets of the decode case, e.g. 4GiB,12GiB (12GiB: compute-bound on an H200)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    if args.prev:
        sys.path.insert(0, os.path.abspath(args.prev))
    import nb_offload
    prev = importlib.import_module("nb_offload_prev") if args.prev else None
    out = {"meta": {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__, "transformers": transformers.__version__}, "rows": []}

    add = row_recorder(out, args.json)

    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        t0 = time.perf_counter()
        build(args.folder, 32)
        print(f"built and saved the model in {time.perf_counter() - t0:.0f} s", flush=True)
    out["meta"]["link_gbps"] = med(pinned_rate())
    ref = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16, device_map="cuda").eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 31000, (1, 16), device="cuda")
    n = args.tokens
    cases = args.cases.split(",")
    torch.set_grad_enabled(False)        # for the whole run (an inference_mode object left unentered does nothing)

    def loaded(pkg, **kw):
        gc.collect()
        torch.cuda.empty_cache()
        return pkg.load(args.folder, progress=False, **kw)

    def same(a, b):
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
        return bool(torch.equal(a.generate(ids, **kw).cpu(), b.generate(ids, **kw).cpu()))

    def quartiles(xs):
        xs = sorted(xs)
        return "/".join(f"{xs[int(q * (len(xs) - 1))] * 1e3:.1f}" for q in (0.25, 0.5, 0.75)) + " ms"

    for budget in args.decode_budgets.split(",") if "decode" in cases and prev is not None else ():
        opts = dict(gpu=budget, cpu="100GiB")
        clocks = {name: hook_clock(importlib.import_module(pkg.__name__ + ".engine").Engine)
                  for name, pkg in (("new", nb_offload), ("prev", prev))}
        new, old = loaded(nb_offload, **opts), loaded(prev, **opts)
        gens = {"new": new.generate, "prev": old.generate, "transformers": ref.generate}
        m = 4 * n
        steps = {k: [] for k in gens}
        hook_s = {"new": 0.0, "prev": 0.0}
        for gen in gens.values():       # warm-up
            step_times(gen, ids, m)
        for _ in range(args.repeats):   # interleaved, so a slow spell of the host hits all three
            for name, gen in gens.items():
                before = clocks[name]["s"] if name in clocks else 0.0
                steps[name] += step_times(gen, ids, m)
                if name in clocks:
                    hook_s[name] += clocks[name]["s"] - before
        a, b, r = (med(steps[k]) for k in ("new", "prev", "transformers"))
        calls = args.repeats * m       # prefill included in the hook time: one pass more a generate
        streamed = new.plan.streamed_bytes_per_token()["cpu"]
        add(case=f"decode, gpu {budget}: this nb_offload vs the previous one (per-step medians)",
            new_tok_s=1 / a, prev_tok_s=1 / b, cost_pct=100 * (a - b) / b, transformers_tok_s=1 / r,
            new_quartiles=quartiles(steps["new"]), prev_quartiles=quartiles(steps["prev"]),
            transformers_quartiles=quartiles(steps["transformers"]), steps_each=len(steps["new"]),
            hooks_us_per_step_new=1e6 * hook_s["new"] / calls, hooks_us_per_step_prev=1e6 * hook_s["prev"] / calls,
            link_bound_tok_s=out["meta"]["link_gbps"] * 1e9 / streamed if streamed else None,
            same_tokens_as_prev=same(new, old), same_tokens_as_resident=same(new, ref),
            host_peak=new.stats.host_peak, host_now=new.stats.host_now, stats=str(new.stats))
        new.unload()
        old.unload()

    if "resident" in cases and prev is not None:
        opts = dict(gpu="60GiB", cpu="100GiB")
        new, old = loaded(nb_offload, **opts), loaded(prev, **opts)
        m = 4 * n
        steps = {"transformers": [], "new": [], "prev": []}
        for gen in (ref.generate, new.generate, old.generate):       # warm-up
            step_times(gen, ids, m)
        for _ in range(args.repeats):
            for name, gen in (("transformers", ref.generate), ("new", new.generate), ("prev", old.generate)):
                steps[name] += step_times(gen, ids, m)
        r, a, b = (med(steps[k]) for k in ("transformers", "new", "prev"))
        add(case="everything resident: per-step medians", transformers_tok_s=1 / r, new_tok_s=1 / a, prev_tok_s=1 / b,
            new_vs_prev_pct=100 * (a - b) / b, new_vs_transformers_pct=100 * (a - r) / r,
            steps_each=len(steps["new"]), same_tokens_as_resident=same(new, ref))
        new.unload()
        old.unload()

    if "verify" in cases:
        from nb_offload import cache as nb_cache
        offload = tempfile.mkdtemp(prefix="nb_offload-verify-")
        opts = dict(gpu="4GiB", cpu="3GiB", disk=offload, dtype="float16", context=1024)
        t0 = time.perf_counter()
        first = loaded(nb_offload, **opts)
        write_s = time.perf_counter() - t0
        cached = sum(e.bytes for e in first.plan if e.tier == "disk")
        first_tokens = first.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False).cpu()
        first.unload()
        real_check = nb_cache.OffloadCache._check_file
        header_only = functools.partialmethod(real_check, hash_bytes=False)
        stamp_files = os.path.join(offload, "nb_offload-*", nb_cache.STAMPS)

        def timed(mode, cold):
            """mode: "stamped" (the files unchanged since their stamps: not read), "hashed" (stamps
            removed: every file read and hashed), "header only" (stamps removed, headers checked)."""
            if mode != "stamped":
                for path in glob.glob(stamp_files):
                    os.unlink(path)
            if cold:
                drop_caches()
            nb_cache.OffloadCache._check_file = header_only if mode == "header only" else real_check
            try:
                t = time.perf_counter()
                llm = loaded(nb_offload, **opts)
                seconds = time.perf_counter() - t
                c = llm._storage.cache
                tokens = llm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False).cpu()
                llm.unload()
            finally:
                nb_cache.OffloadCache._check_file = real_check
            return seconds, c.verified_bytes, c.stamped_bytes, c.verify_seconds, bool(torch.equal(tokens, first_tokens))
        modes = ("hashed", "header only", "stamped")
        for label, cold, rounds in (("warm", False, 2), ("cold", True, 1)):
            if cold and not drop_caches():
                continue
            t = {m: [] for m in modes}
            for _ in range(rounds):
                for m in modes:
                    t[m].append(timed(m, cold))
            sec = {m: med([x[0] for x in t[m]]) for m in modes}
            _, vb, _, vs, _ = t["hashed"][-1]
            add(case=f"load with the offload cache ({label}): hashed, header only, stamped", cached_bytes=cached,
                first_load_writes_s=write_s, load_hashed_s=sec["hashed"], load_header_only_s=sec["header only"],
                load_stamped_s=sec["stamped"], hash_cost_s=sec["hashed"] - sec["header only"],
                hash_cost_pct=100 * (sec["hashed"] - sec["header only"]) / sec["header only"],
                stamped_cost_pct=100 * (sec["stamped"] - sec["header only"]) / sec["header only"],
                hashed_bytes=vb, stamped_bytes=t["stamped"][-1][2], hash_seconds=vs,
                hash_gbps=vb / vs / 1e9 if vs else None,
                all_s={m: [x[0] for x in t[m]] for m in modes},
                same_tokens=all(x[4] for m in modes for x in t[m]))
        shutil.rmtree(offload, ignore_errors=True)

    print("\n== summary ==")
    for r in out["rows"]:
        print(r["case"] + ": " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in r.items() if k != "case" and not isinstance(v, (list, dict))
                                           and k != "stats"))


if __name__ == "__main__":
    main()
