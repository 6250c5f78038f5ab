"""Routed experts on CUDA (experts.py, issue 15) against whole MoE blocks streamed, on one card, in one process.

For each shape, at a GPU budget that streams most blocks from page-locked host memory, two loads of the
same model: *routed* (the default: a decode step copies each streamed block without its experts, then
the routed experts once the router has chosen; eager) and *whole* (every expert of every streamed block,
the captured decode step of graphs.py). Decode per-step medians over interleaved rounds, the bytes a
step moves (the model's own counters), the host's wait for routers, prefill of 2048 tokens, and tokens
against transformers with the whole model on the GPU (dynamic cache for the eager routed step, the
static cache for the captured one).

With ``--cpu-experts ROWS``, three more loads of those rows (cpu_experts.py): *split*
(``expert_compute="auto"``: a share of the experts a step misses on the GPU computed on the CPU from host
memory, the share from rates measured at load, or none where the CPU is the slower), *half*
(``expert_compute=0.5``: the split whatever the rates) and *CPU* (``expert_compute="cpu"``, no cache: every
routed expert of a streamed block on the CPU, as llama.cpp's ``--n-cpu-moe``). They compute with the
eager experts, so their tokens are compared with transformers' eager experts on the GPU: the CPU rounds
differently, so they may part after a while; the row says how many of the first tokens agree (the exact
reference is in tests/gpu/test_experts_gpu.py). Their CPU work runs where the library's default puts it
(cpu_experts.OWED_TO_CALLER); ``--owed-too`` adds the half and CPU loads the other way, ``--fast-kernel`` the
half and CPU loads with ``cpu_kernel="fast"``. ``--profile`` prints
where the host's time goes in the routed and half loads.

    PYTHONPATH=. python3 benchmarks/bench_moe.py --json out.json [--rows mixtral,qwen3] [--cpu-experts mixtral]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import traceback

from bench_graph import build_moe, host_profile, steps
from bench_offload import interleave, med, moved_per_step, pinned_rate, row_recorder, save_random, summarize


def build_qwen3(folder, layers):
    """A Qwen3-MoE shape (Qwen3-30B-A3B's blocks: hidden 2048, 128 experts of 768, top 8; ``layers`` of
    them, vocabulary 32000) with random bf16 weights."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=32000,
                         max_position_embeddings=4096, dtype="bfloat16")
    save_random(Qwen3MoeForCausalLM, cfg, folder)


def timeline(llm, ids, path, tokens=8):
    """A ``tokens``-token generate's events (the engine's trace: copies, compute, the CPU's work) with the host's time
    in each routed call added (``host:bring``: the pre-hook; ``host:router``: its wait for the router's
    choice; ``host:combine``: a split call's forward), as JSON rows (kind, unit, start, end, bytes, step)."""
    import json
    eng, trace = llm._engine, llm.trace
    patched = []

    def wrap(owner, attr, kind, label):
        inner = getattr(owner, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                trace.host_event(kind, label(a), t0, time.perf_counter())
        setattr(owner, attr, timed)
        patched.append((owner, attr))
    wrap(eng, "_bring_routed", "host:bring", lambda a: str(a[0]))
    wrap(eng, "_combine", "host:combine", lambda a: str(a[0]))
    for idx, found in eng.routed.items():
        wrap(found, "routed_in", "host:router", lambda a, idx=idx: str(idx))
    try:
        trace.flush(wait=True)
        trace.clear()
        llm.generate(ids, max_new_tokens=tokens, do_sample=False)
        trace.flush(wait=True)
        rows = [(e.kind, e.unit, e.start, e.end, e.bytes, e.step) for e in trace]
    finally:
        for owner, attr in patched:
            vars(owner).pop(attr, None)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(rows, fh)
    return rows


def _busy(spans) -> list:
    """The union of ``spans`` ([(start, end)]) as sorted, disjoint spans."""
    merged = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _overlap(x, y) -> float:
    """Seconds both of two sorted disjoint span lists cover."""
    total, i, j = 0.0, 0, 0
    while i < len(x) and j < len(y):
        total += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def step_breakdown(rows) -> dict | None:
    """Where a timeline's decode steps (``timeline``'s rows) spend their time, the median over its steps after
    the first two (a prefill, a capture), in ms: the step (its "step" event), the link busy (the union of its
    copies), the CPU busy (of its CPU blocks' work), both at once, neither (the GPU alone or waiting), and the
    GPU's compute; GB a step over the link and over the CPU. None where the timeline has fewer than three steps."""
    import statistics
    by_step = {}
    for kind, _unit, start, end, nbytes, step in rows:
        by_step.setdefault(step, []).append((kind, start, end, nbytes))
    steps = sorted(by_step)[2:]
    if not steps:
        return None
    seen = []
    for step in steps:
        events = by_step[step]
        marks = [(a, b) for kind, a, b, _ in events if kind == "step"]
        t0, t1 = marks[0] if marks else (min(e[1] for e in events), max(e[2] for e in events))
        spans = {kind: _busy([(max(a, t0), min(b, t1)) for k, a, b, _ in events if k == kind and b > t0 and a < t1])
                 for kind in ("copy", "cpu", "compute")}
        link, cpu = (sum(b - a for a, b in spans[k]) for k in ("copy", "cpu"))
        both = _overlap(spans["copy"], spans["cpu"])
        seen.append(dict(step_ms=(t1 - t0) * 1e3, link_busy_ms=link * 1e3, cpu_busy_ms=cpu * 1e3,
                         both_ms=both * 1e3, neither_ms=(t1 - t0 - link - cpu + both) * 1e3,
                         gpu_compute_ms=sum(b - a for a, b in spans["compute"]) * 1e3,
                         link_gb=sum(n for k, *_, n in events if k == "copy") / 1e9,
                         cpu_gb=sum(n for k, *_, n in events if k == "cpu") / 1e9))
    return {key: statistics.median(s[key] for s in seen) for key in seen[0]} | {"steps": len(seen)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="mixtral,qwen3")
    ap.add_argument("--mixtral-folder", default=os.path.join(tempfile.gettempdir(), "nb_offload-bench-moe"))
    ap.add_argument("--qwen3-folder", default=os.path.join(tempfile.gettempdir(), "nb_offload-bench-qwen3"))
    ap.add_argument("--qwen3-layers", type=int, default=16)
    ap.add_argument("--mixtral-gpu", default="3GiB")
    ap.add_argument("--qwen3-gpu", default="4GiB")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu-experts", default="", help="rows that also get the split and CPU loads "
                                                      "(cpu_experts.py), e.g. mixtral: five loads of a row "
                                                      "hold five copies in host memory")
    ap.add_argument("--owed-too", action="store_true", help="with --cpu-experts: also the half and CPU loads "
                                                             "with the CPU's work owed to the caller "
                                                             "(cpu_experts.HostOwed; the others take the library's "
                                                             "default, cpu_experts.OWED_TO_CALLER)")
    ap.add_argument("--half-variants", default="", help="with --cpu-experts: more half loads, each with one setting "
                                                        "changed at load: si<N>us (cpu_experts.SWITCH_INTERVAL, "
                                                        "the GIL's while a worker computes), left<N> "
                                                        "(cpu_experts.CORES_LEFT); a comma list")
    ap.add_argument("--fast-kernel", action="store_true", help="with --cpu-experts: also the half and CPU loads "
                                                                "with cpu_kernel=\"fast\" (the CPU's one-row expert "
                                                                "products by nb_offload's own kernel, which rounds "
                                                                "otherwise: their tokens may part from the eager "
                                                                "reference sooner)")
    ap.add_argument("--profile", action="store_true", help="also print where the host's time goes in a 16-token "
                                                           "generate of the routed load, and of the half one with "
                                                           "--cpu-experts (cProfile, by own time)")
    ap.add_argument("--trace-dir", default=None, help="also write each load's timeline of an 8-token generate "
                                                    "(the engine's trace plus the host's time in the routed calls) "
                                                    "as JSON here")
    args = ap.parse_args()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, StaticCache

    import nb_offload
    from nb_offload import cpu_experts, device_routing, experts
    from nb_offload.graphs import bucket, cache_name
    torch.manual_seed(0)
    ids = torch.randint(3, 31000, (1, 16), device="cuda")
    long_ids = torch.randint(3, 31000, (1, 2048), device="cuda")
    n = args.tokens
    out = {"meta": {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__, "transformers": transformers.__version__, "tokens": n},
           "rows": []}
    out["meta"]["link_gbps"] = link = med(pinned_rate())
    add = row_recorder(out, args.json, digits=4)
    inference = torch.inference_mode()
    inference.__enter__()

    def load(folder, gpu, routed, owed=None, variant="", by_host=False, **options):
        saved = (experts.CUDA_MIN_SAVED, cpu_experts.OWED_TO_CALLER, cpu_experts.SWITCH_INTERVAL,
                 cpu_experts.CORES_LEFT)
        experts.CUDA_MIN_SAVED = saved[0] if routed else 1 << 62      # whole: no block saves that much
        device_routing.ENABLED = not by_host
        cpu_experts.OWED_TO_CALLER = saved[1] if owed is None else owed
        if variant.startswith("si"):
            cpu_experts.SWITCH_INTERVAL = float(variant[2:].removesuffix("us")) * 1e-6
        elif variant.startswith("left"):
            cpu_experts.CORES_LEFT = int(variant[4:])
        elif variant:
            raise SystemExit(f"unknown half variant {variant!r}: si<N>us or left<N>")
        try:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            llm = nb_offload.load(folder, gpu=gpu, cpu="110GiB", progress=False, **options)
            torch.cuda.synchronize()
            llm.bench_held = torch.cuda.memory_allocated() - before     # the GPU memory the load took
            return llm
        finally:
            (experts.CUDA_MIN_SAVED, cpu_experts.OWED_TO_CALLER, cpu_experts.SWITCH_INTERVAL,
             cpu_experts.CORES_LEFT) = saved
            device_routing.ENABLED = True

    def row(name, folder, gpu, make):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            t0 = time.perf_counter()
            make(folder)
            print(f"built {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda").eval()
        static = {cache_name(ref): StaticCache(config=ref.config, max_cache_len=bucket(ids.shape[1] + n)),
                  "disable_compile": True}
        want_dynamic = steps(ref.generate, ids, n)[1].cpu()
        want_static = steps(ref.generate, ids, n, **static)[1].cpu()
        hf_step = med(steps(ref.generate, ids, n)[0])
        del ref, static
        want_eager = None
        with_cpu = name in args.cpu_experts.split(",")
        if with_cpu:
            ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda",
                                                       experts_implementation="eager").eval()
            want_eager = steps(ref.generate, ids, n)[1].cpu()
            del ref
        gc.collect()
        torch.cuda.empty_cache()
        llms = {"routed": load(folder, gpu, True), "whole": load(folder, gpu, False),
                "routed_nocache": load(folder, gpu, True, expert_cache=0),
                "routed_host": load(folder, gpu, True, by_host=True)}
        if with_cpu:
            llms["split"] = load(folder, gpu, True, expert_compute="auto")
            llms["half"] = load(folder, gpu, True, expert_compute=0.5)
            llms["cpu"] = load(folder, gpu, True, expert_compute="cpu", expert_cache=0)
            for v in filter(None, args.half_variants.split(",")):
                llms[f"half_{v}"] = load(folder, gpu, True, variant=v, expert_compute=0.5)
            if args.fast_kernel:
                llms["half_fast"] = load(folder, gpu, True, expert_compute=0.5, cpu_kernel="fast")
                llms["cpu_fast"] = load(folder, gpu, True, expert_compute="cpu", expert_cache=0, cpu_kernel="fast")
            if args.owed_too:
                llms["half_owed"] = load(folder, gpu, True, owed=True, expert_compute=0.5)
                llms["cpu_owed"] = load(folder, gpu, True, owed=True, expert_compute="cpu", expert_cache=0)
        try:
            routed, whole = llms["routed"], llms["whole"]
            assert routed._engine.routed and not whole._engine.routed, "the two loads must differ"
            assert llms["routed_nocache"]._engine.expert_cache is None
            moved = {k: moved_per_step(llm, ids, 8)["cpu"] for k, llm in llms.items()}
            waits, hits = {}, {}

            def timed(llm, key):
                def fn():
                    w0, s0 = llm.stats.route_wait_seconds, llm.stats.steps
                    h0, r0 = llm.stats.expert_hits, llm.stats.experts_read
                    result = steps(llm.generate, ids, n)
                    waits.setdefault(key, []).append((llm.stats.route_wait_seconds - w0) / (llm.stats.steps - s0))
                    if llm.stats.experts_read > r0:
                        hits.setdefault(key, []).append((llm.stats.expert_hits - h0) / (llm.stats.experts_read - r0))
                    return result
                return fn
            runs = interleave({k: timed(llm, k) for k, llm in llms.items()}, args.repeats)
            t, sp, tokens, prefill = summarize(runs, llms, long_ids)
            if args.profile:
                for k in ("routed", "half"):
                    if k in llms:
                        print(f"--- where the host's time goes, {name} {k} (16 tokens)", flush=True)
                        host_profile(llms[k].generate, ids, 16, top=30, inside="nb_offload")
            if args.trace_dir:
                for k, llm in llms.items():
                    timeline(llm, ids, os.path.join(args.trace_dir, f"timeline-{name}-{k}.json"))
            # the routed load's GPU memory at its peak: what it holds, and a prefill of 2048 and a decode past it
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            routed.generate(long_ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            torch.cuda.synchronize()
            routed_peak = routed.bench_held + torch.cuda.max_memory_allocated() - base
            cache = routed._engine.expert_cache
            on_cpu = {}
            for k in [k for k in llms if k not in ("routed", "whole", "routed_nocache", "routed_host")]:    # the CPU's
                llm, eng = llms[k], llms[k]._engine
                # a load that split nothing computes as plain transformers does: the routed load's tokens
                want = want_eager if eng.host is not None else tokens["routed"]
                agree = int((tokens[k][0] == want[0]).cumprod(0).sum()) - ids.shape[1]
                on_cpu[k] = dict(tok_s=1 / t[k], spread=sp[k], moved_per_step=moved[k], share=eng.expert_share,
                                 measured_cpu_gbps=eng.host_rates[0] / 1e9 if eng.host_rates else None,
                                 measured_link_gbps=eng.host_rates[1] / 1e9 if eng.host_rates else None,
                                 cpu_gbps=llm.stats.bytes_on_cpu / max(llm.stats.cpu_expert_seconds, 1e-9) / 1e9,
                                 experts_on_cpu_per_step=llm.stats.experts_on_cpu / max(llm.stats.steps, 1),
                                 products=llm.plan.cpu_products or "F.linear",
                                 cpu_threads=eng.host.threads if eng.host else 0, prefill_2048_s=prefill[k],
                                 route_wait_ms_per_step=1e3 * med(waits[k]),
                                 hit_rate=med(hits[k]) if k in hits else 0.0,
                                 equals_hf_eager=bool(torch.equal(tokens[k], want)), split=eng.host is not None,
                                 tokens_agreeing=agree, over_routed=t["routed"] / t[k],
                                 where=type(eng.worker).__name__ if eng.worker is not None else "caller",
                                 switch_interval_us=1e6 * eng.switch_interval,
                                 computed_by=dict(getattr(eng.worker, "by", {})))
            add(row=name, budget=gpu, link_gbps=link,
                routed_tok_s=1 / t["routed"], whole_tok_s=1 / t["whole"], spread=sp,
                routed_nocache_tok_s=1 / t["routed_nocache"], routed_nocache_moved_per_step=moved["routed_nocache"],
                expert_cache_bytes=routed.plan.reserved.get("expert_cache", 0),
                expert_cache_experts=cache.own if cache is not None else 0,
                experts_streamed=sum(u.expert_count for u in routed._insp.units if u.expert_row_nbytes and
                                     routed.plan[u.name].tier == "cpu"),
                hit_rate=med(hits["routed"]) if "routed" in hits else 0.0,
                routed_over_whole=t["whole"] / t["routed"], hf_resident_eager_tok_s=1 / hf_step,
                routed_moved_per_step=moved["routed"], whole_moved_per_step=moved["whole"],
                routed_predicted_per_step=routed.plan.streamed_bytes_per_token()["cpu"],
                routed_link_bound_tok_s=link * 1e9 / moved["routed"],
                whole_link_bound_tok_s=link * 1e9 / moved["whole"],
                routed_pct_of_link_bound=100 * moved["routed"] / (link * 1e9) / t["routed"],
                whole_pct_of_link_bound=100 * moved["whole"] / (link * 1e9) / t["whole"],
                route_wait_ms_per_step=1e3 * med(waits["routed"]), routed_units=len(routed._engine.routed),
                split_blocks=routed.plan.split_blocks,
                prefill_2048_routed_s=prefill["routed"], prefill_2048_whole_s=prefill["whole"],
                routed_host_tok_s=1 / t["routed_host"], routed_over_routed_host=t["routed_host"] / t["routed"],
                routed_host_moved_per_step=moved["routed_host"],
                routed_host_equals_hf=bool(torch.equal(tokens["routed_host"], want_dynamic)),
                fetched_by_gpu=routed._engine.gpu_fetch is not None, fetch_why_not=routed._engine.gpu_fetch_why_not,
                routed_graph_replays=routed.stats.graph_replays,
                expert_cache_own=cache.own if cache is not None else 0,
                expert_cache_lent=len(routed._engine.gpu_fetch.lendable) if routed._engine.gpu_fetch else 0,
                expert_cache_lent_activations=routed._engine.gpu_fetch.spare_entries if routed._engine.gpu_fetch else 0,
                routed_gpu_peak_bytes=routed_peak, budget_bytes=nb_offload.parse_size(gpu),
                in_place=[e.name for e in routed.plan if e.compute == "in place"],
                routed_equals_hf=bool(torch.equal(tokens["routed"], want_static if routed.stats.graph_replays
                                                  else want_dynamic)),
                whole_equals_hf_static=bool(torch.equal(tokens["whole"], want_static)),
                routed_graph_eager=routed.stats.graph_eager, whole_graph_replays=whole.stats.graph_replays,
                plan=str(routed.plan).splitlines()[-4:], cpu_experts=on_cpu)
        finally:
            for llm in llms.values():
                llm.unload()
            gc.collect()
            torch.cuda.empty_cache()

    for name in args.rows.split(","):
        t0 = time.perf_counter()
        try:
            if name == "mixtral":
                row("mixtral", args.mixtral_folder, args.mixtral_gpu, build_moe)
            elif name == "qwen3":
                row("qwen3", args.qwen3_folder, args.qwen3_gpu, lambda f: build_qwen3(f, args.qwen3_layers))
            else:
                raise SystemExit(f"unknown row {name!r}: mixtral or qwen3")
        except Exception:
            traceback.print_exc()
            add(row=name, error=traceback.format_exc(limit=4))
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
