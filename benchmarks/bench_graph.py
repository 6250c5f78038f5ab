"""The captured decode step (graphs.py) against eager decode, on one CUDA card, in one process (issue 14).

Rows, each timed as per-step medians of a generate (StepClock: prefill excluded), interleaved in
rounds with its baselines, and each checking its tokens:
- resident: transformers eager (dynamic cache), transformers eager with the static cache nb_offload
  uses, transformers ``torch.compile(mode="reduce-overhead")`` through generate's compile config,
  nb_offload captured and nb_offload eager (``cuda_graph`` off);
- gpu 4GiB and 12GiB streamed: nb_offload captured and eager, with the link bound of the bytes a step
  moves (measured from the model's own counters) and the resident eager step;
- nf4 fully resident: bitsandbytes' own eager step, nb_offload nf4 captured;
- a Mixtral shape fully resident: transformers eager and nb_offload captured, tokens against
  transformers with the same experts implementation and static cache.

    PYTHONPATH=. python3 benchmarks/bench_graph.py --json out.json [--rows resident,4GiB,12GiB,nf4,moe]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import traceback

from bench_offload import (
    StepClock,
    build,
    interleave,
    med,
    moved_per_step,
    pinned_rate,
    row_recorder,
    save_random,
    spread,
    switched,
    untraced,
)


def build_moe(folder):
    """The Mixtral shape of the shared llama.cpp anchor (make_gguf_moe.py: hidden 2048, 16 layers, 16 heads,
    8 KV heads, 8 experts of 5632, top 2; 4.8 B parameters) with random bf16 weights."""
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                        max_position_embeddings=4096, dtype="bfloat16")
    save_random(MixtralForCausalLM, cfg, folder)


def replay_seconds(llm, k=50):
    """GPU seconds of one replay of the model's captured decode step, replayed back to back."""
    import torch
    captured = next(iter(llm._engine.graphs.graphs.values()), None)
    if captured is None:
        print(f"no captured step to replay: {llm.stats.graph_eager}", flush=True)
        return float("nan")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    captured.graph.replay()
    start.record()
    for _ in range(k):
        captured.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / k


def host_profile(generate, ids, n, top=25, inside=None):
    """Where the host's time goes in a generate (cProfile, the ``top`` costliest functions by own time), and
    with ``inside`` (a path part such as "nb_offload"), then that code's 40 costliest by time inside them."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    steps(generate, ids, n)
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(top)
    if inside:
        stats.sort_stats("cumulative").print_stats(inside, 40)


def kernel_times(llm, ids, n=8):
    """The GPU kernels of ``n`` eager decode steps (the kernels a replay runs), by total time per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        switched(llm, "cuda_graph", False,
                 lambda: llm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False))
    torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total, e.count) for e in prof.key_averages()
                   if e.device_time_total > 0), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    launches = sum(r[2] for r in rows)
    print(f"kernels of a prefill and {n} eager decode steps: {total / 1e3:.1f} ms in {launches} launches")
    for key, us, count in rows[:18]:
        print(f"  {us / 1e3:8.2f} ms {count:6d}x  {key[:90]}")
    return {"total_ms": total / 1e3, "launches": launches,
            "top": [(k[:90], us / 1e3, c) for k, us, c in rows[:18]]}


def steps(generate, ids, n, **kw):
    clock = StepClock()
    out = generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock, **kw)
    return clock.steps(), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "nb_offload-bench-7b"))
    ap.add_argument("--moe-folder", default=os.path.join(tempfile.gettempdir(), "nb_offload-bench-moe"))
    ap.add_argument("--rows", default="resident,4GiB,12GiB,nf4,moe")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="add torch.compile reduce-overhead to the resident row")
    ap.add_argument("--experts", default=None, help="the Mixtral row's experts implementation, in both models "
                    "(default: transformers' own choice)")
    ap.add_argument("--profile", action="store_true", help="print where the host's time goes in a captured generate")
    ap.add_argument("--kernels", action="store_true", help="print the GPU kernels of eager decode steps by total time")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, StaticCache

    import nb_offload
    from nb_offload.graphs import bucket, cache_name
    torch.manual_seed(0)
    ids = torch.randint(3, 31000, (1, 16), device="cuda")
    n, reps = args.tokens, args.repeats
    out = {"meta": {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__, "transformers": transformers.__version__, "tokens": n},
           "rows": []}
    links = pinned_rate()
    out["meta"]["link_gbps"] = med(links)
    rows = args.rows.split(",")

    add = row_recorder(out, args.json, digits=4)

    def static(model):
        cache = StaticCache(config=model.config, max_cache_len=bucket(ids.shape[1] + n))
        return {cache_name(model): cache, "disable_compile": True}

    def timed(variants: dict):
        """Per-step seconds of each variant (warm-up run first, then interleaved rounds) and its last tokens."""
        runs = interleave(variants, reps)
        times = {k: [x for t, _ in r for x in t] for k, r in runs.items()}
        tokens = {k: r[-1][1].cpu() for k, r in runs.items()}
        return {k: med(v) for k, v in times.items()}, {k: spread(v) for k, v in times.items()}, tokens

    def nb_variants(llm):
        def run():
            return steps(llm.generate, ids, n)
        return {"nb_graph": lambda: switched(llm, "cuda_graph", True, run),
                "nb_eager": lambda: switched(llm, "cuda_graph", False, run)}

    def guard(name, fn):
        if name not in rows:
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:
            traceback.print_exc()
            add(row=name, error=traceback.format_exc(limit=4))
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)

    if any(r in rows for r in ("resident", "4GiB", "12GiB", "nf4")) and \
            not os.path.isfile(os.path.join(args.folder, "config.json")):
        t0 = time.perf_counter()
        build(args.folder, 32)
        print(f"built the 7B shape in {time.perf_counter() - t0:.0f} s", flush=True)
    inference = torch.inference_mode()
    inference.__enter__()
    ref = None
    resident_step = {}

    def reference():
        nonlocal ref
        if ref is None:
            ref = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16, device_map="cuda").eval()
        return ref

    def row_resident():
        model = reference()
        llm = nb_offload.load(args.folder, gpu="60GiB", cpu="100GiB", progress=False)
        # the same plan with the eager kernels replayed as they are (fused.py off)
        unfused = nb_offload.load(args.folder, gpu="60GiB", cpu="100GiB", progress=False, fused_kernels=False)
        variants = {"hf_eager": lambda: steps(model.generate, ids, n),
                    "hf_eager_static": lambda: steps(model.generate, ids, n, **static(model)),
                    **nb_variants(llm),
                    "nb_graph_unfused": lambda: steps(unfused.generate, ids, n),
                    "nb_graph_untraced": lambda: untraced(llm, lambda: steps(llm.generate, ids, n))}
        if args.compile:
            from transformers import CompileConfig
            cc = CompileConfig(mode="reduce-overhead", fullgraph=True)
            t0 = time.perf_counter()
            steps(model.generate, ids, n, cache_implementation="static", compile_config=cc)
            out["meta"]["compile_warmup_s"] = time.perf_counter() - t0
            variants["hf_compile"] = lambda: steps(model.generate, ids, n, cache_implementation="static",
                                                   compile_config=cc)
        t, sp, tok = timed(variants)
        resident_step.update(t)
        steps(llm.generate, ids, n)     # the eager variant dropped the captured steps
        replay = replay_seconds(llm)
        unfused_replay = replay_seconds(unfused)
        unfused.unload()
        if args.profile:
            host_profile(llm.generate, ids, n)
        kernels = kernel_times(llm, ids) if args.kernels else None
        add(row="resident", **{f"{k}_tok_s": 1 / v for k, v in t.items()}, spread=sp,
            replay_ms=1e3 * replay, host_ms_per_step=1e3 * (t["nb_graph"] - replay),
            unfused_replay_ms=1e3 * unfused_replay, graph_fused=llm.stats.graph_fused,
            unfused_equals_hf_static=bool(torch.equal(tok["nb_graph_unfused"], tok["hf_eager_static"])),
            untraced_host_ms_per_step=1e3 * (t["nb_graph_untraced"] - replay), kernels=kernels,
            graph_over_hf_eager=t["hf_eager"] / t["nb_graph"],
            nb_graph_equals_hf_static=bool(torch.equal(tok["nb_graph"], tok["hf_eager_static"])),
            nb_eager_equals_hf_eager=bool(torch.equal(tok["nb_eager"], tok["hf_eager"])),
            hf_static_equals_hf_eager=bool(torch.equal(tok["hf_eager_static"], tok["hf_eager"])),
            compile_equals_hf_static=bool(torch.equal(tok["hf_compile"], tok["hf_eager_static"]))
            if "hf_compile" in tok else None,
            capture_ms=1e3 * llm.stats.capture_seconds / max(1, llm.stats.graph_captures),
            pool_bytes=llm.stats.graph_pool_bytes, pool_reserved=llm.plan.reserved.get("decode_graph"),
            graph_eager=llm.stats.graph_eager)
        llm.unload()

    def row_streamed(budget):
        model = reference()
        llm = nb_offload.load(args.folder, gpu=budget, cpu="100GiB", progress=False)
        held_moved = moved_per_step(llm, ids, 8)["cpu"]
        held = llm.stats.held_last
        llm.hold_spare = False          # the plan's streaming as it stands
        moved = moved_per_step(llm, ids, 8)["cpu"]

        def graph_held():
            return switched(llm, "hold_spare", True, lambda: steps(llm.generate, ids, n))
        variants = {**nb_variants(llm), "nb_graph_held": graph_held,
                    "hf_eager_static": lambda: steps(model.generate, ids, n, **static(model))}
        t, sp, tok = timed(variants)
        link = out["meta"]["link_gbps"] * 1e9
        bound = max(moved / link, resident_step.get("nb_graph", 0))
        add(row=budget, budget=budget, moved_per_step=moved, link_bound_tok_s=link / moved if moved else None,
            nb_graph_tok_s=1 / t["nb_graph"], nb_eager_tok_s=1 / t["nb_eager"],
            hf_eager_static_tok_s=1 / t["hf_eager_static"], spread=sp,
            pct_of_link_bound=100 * (moved / link) / t["nb_graph"] if moved else None,
            pct_of_bound=100 * bound / t["nb_graph"], graph_over_eager=t["nb_eager"] / t["nb_graph"],
            binds="link" if moved / link >= resident_step.get("nb_graph", 0) else "resident step",
            held_units=held, held_moved_per_step=held_moved, nb_graph_held_tok_s=1 / t["nb_graph_held"],
            held_pct_of_link_bound=100 * (held_moved / link) / t["nb_graph_held"] if held_moved else None,
            tokens_equal=bool(torch.equal(tok["nb_graph"], tok["hf_eager_static"])),
            capture_ms=1e3 * llm.stats.capture_seconds / max(1, llm.stats.graph_captures),
            graph_eager=llm.stats.graph_eager, plan_totals=llm.plan.totals())
        llm.unload()

    def row_nf4():
        nonlocal ref
        from transformers import BitsAndBytesConfig
        ref = None
        gc.collect()
        torch.cuda.empty_cache()
        bnb = AutoModelForCausalLM.from_pretrained(
            args.folder, dtype=torch.bfloat16, device_map="cuda",
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.bfloat16)).eval()
        llm = nb_offload.load(args.folder, gpu="60GiB", cpu="100GiB", quant="nf4", progress=False)
        t, sp, tok = timed({"bnb_eager": lambda: steps(bnb.generate, ids, n),
                            "bnb_eager_static": lambda: steps(bnb.generate, ids, n, **static(bnb)),
                            **nb_variants(llm)})
        add(row="nf4", bnb_eager_tok_s=1 / t["bnb_eager"], nb_graph_tok_s=1 / t["nb_graph"],
            nb_eager_tok_s=1 / t["nb_eager"], spread=sp, graph_over_bnb_eager=t["bnb_eager"] / t["nb_graph"],
            nb_graph_equals_bnb_static=bool(torch.equal(tok["nb_graph"], tok["bnb_eager_static"])),
            nb_eager_equals_bnb_eager=bool(torch.equal(tok["nb_eager"], tok["bnb_eager"])),
            graph_eager=llm.stats.graph_eager)
        llm.unload()

    def row_moe():
        nonlocal ref
        ref = None
        gc.collect()
        torch.cuda.empty_cache()
        if not os.path.isfile(os.path.join(args.moe_folder, "config.json")):
            t0 = time.perf_counter()
            build_moe(args.moe_folder)
            print(f"built the Mixtral shape in {time.perf_counter() - t0:.0f} s", flush=True)
        chosen = {"experts_implementation": args.experts} if args.experts else {}
        model = AutoModelForCausalLM.from_pretrained(args.moe_folder, dtype=torch.bfloat16, device_map="cuda",
                                                     **chosen).eval()
        llm = nb_offload.load(args.moe_folder, gpu="60GiB", cpu="100GiB", progress=False, **chosen)
        unfused = nb_offload.load(args.moe_folder, gpu="60GiB", cpu="100GiB", progress=False, fused_kernels=False,
                                  **chosen)
        t, sp, tok = timed({"hf_eager": lambda: steps(model.generate, ids, n),
                            "hf_eager_static": lambda: steps(model.generate, ids, n, **static(model)),
                            **nb_variants(llm), "nb_graph_unfused": lambda: steps(unfused.generate, ids, n)})
        steps(llm.generate, ids, n)     # the eager variant, run last, dropped the captured steps
        replay = replay_seconds(llm)
        unfused_replay = replay_seconds(unfused)
        unfused.unload()
        if args.profile:
            host_profile(llm.generate, ids, n)
        kernels = kernel_times(llm, ids) if args.kernels else None
        add(row="moe", experts_implementation=model.config._experts_implementation,
            replay_ms=1e3 * replay, host_ms_per_step=1e3 * (t["nb_graph"] - replay), kernels=kernels,
            unfused_replay_ms=1e3 * unfused_replay, graph_fused=llm.stats.graph_fused,
            nb_graph_unfused_tok_s=1 / t["nb_graph_unfused"],
            unfused_equals_hf_static=bool(torch.equal(tok["nb_graph_unfused"], tok["hf_eager_static"])),
            nb_experts_implementation=llm.model.config._experts_implementation,
            hf_eager_tok_s=1 / t["hf_eager"], nb_graph_tok_s=1 / t["nb_graph"], nb_eager_tok_s=1 / t["nb_eager"],
            spread=sp, graph_over_hf_eager=t["hf_eager"] / t["nb_graph"],
            nb_graph_equals_hf_static=bool(torch.equal(tok["nb_graph"], tok["hf_eager_static"])),
            graph_eager=llm.stats.graph_eager, graph_captures=llm.stats.graph_captures,
            graph_replays=llm.stats.graph_replays)
        llm.unload()

    guard("resident", row_resident)
    guard("4GiB", lambda: row_streamed("4GiB"))
    guard("12GiB", lambda: row_streamed("12GiB"))
    guard("nf4", row_nf4)
    guard("moe", row_moe)
    out["meta"]["link_gbps_after"] = med(pinned_rate(repeats=3))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
