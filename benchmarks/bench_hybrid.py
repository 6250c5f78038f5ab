"""Hybrid decode (hybrid.py, issue 16): blocks computed on the CPU where their bytes are while the link
streams the others, against streaming only, on one card, in one process.

LLaMA-7B shape (bench_offload.build), random bf16 weights. At each budget two loads: *streamed* (every
off-GPU block streams) and *hybrid* (``compute="hybrid"``: the CPU computes the share of the blocks in host
memory its measured rate gives, spread between the streamed ones). Decode per-step medians over
interleaved rounds; prefill of 2048 tokens; the split, the rates measured at load and those reached while
both ran (the CPU's from the model's counters, the link's from the bytes streamed over the step's time);
the dry-run prediction at the measured rates against the measured step; tokens against transformers with
the same blocks computed on the CPU for the steps the engine computes them there (tests/gpu/test_hybrid_gpu.py's
reference), and the streamed load's against transformers on the GPU. ``--hybrid-prefetch`` and
``--cpu-blocks`` add loads at other prefetch depths and other splits, ``--handoffs`` loads whose CPU blocks
run elsewhere (``hybrid.HANDOFF``: on a worker thread, in captured steps) (``variants``).

    PYTHONPATH=. python3 benchmarks/bench_hybrid.py --json out.json [--budgets 4GiB,12GiB]
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import sys
import tempfile
import threading
import time
import traceback

from bench_graph import steps
from bench_moe import step_breakdown, timeline
from bench_offload import build, interleave, med, moved_per_step, pinned_rate, row_recorder, summarize


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "nb_offload-bench-7b"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--budgets", default="4GiB,12GiB")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hybrid-prefetch", default="", help="more hybrid loads with these prefetch depths, "
                                                          "e.g. 2,3: units copied ahead while the CPU computes")
    ap.add_argument("--cpu-blocks", default="", help="more loads with this many of the blocks in host memory "
                                                     "pinned \"cpu-compute\" (spread), copying as far ahead as "
                                                     "the hybrid plan does, e.g. 2,6: the step at other splits")
    ap.add_argument("--read-back", action="store_true", help="also a hybrid load whose CPU blocks' outputs reach "
                    "the GPU by a kernel reading them in place (handoff.READ_BACK=\"kernel\"; variant "
                    "hybrid_read_kernel), against the copy engine's")
    ap.add_argument("--handoffs", default="", help="more hybrid loads with these hybrid.HANDOFF values, e.g. "
                                                    "worker,graph: the CPU blocks on a worker thread in eager "
                                                    "steps, and in captured steps")
    ap.add_argument("--auto", action="store_true", help="also a load with compute=\"auto\" (variant hybrid_auto): "
                    "hybrid where its modelled step is the shorter, else all streamed")
    ap.add_argument("--trace-dir", default=None, help="also write each load's timeline of a 16-token generate "
                    "and of a 2048-token prefill (-prefill.json): the engine's trace (copies, compute, the CPU's "
                    "blocks) as JSON rows there")
    ap.add_argument("--cores-left", type=int, default=None, help="cores the CPU blocks leave to the other "
                    "threads (cpu_experts.CORES_LEFT, 4 by default): the CPU computes with the rest")
    ap.add_argument("--stacks-every", type=float, default=60, help="seconds between dumps of every thread's stack "
                    "to stderr while the run goes on (a run a time limit cuts short still says where its time went); "
                    "0: none")
    ap.add_argument("--watchdog", type=float, default=300, help="seconds a budget may take before every "
                    "thread's stack is written out and the run ends (a hang says where it hangs); 0: no watchdog")
    ap.add_argument("--plain-products", action="store_true", help="also a hybrid load with pack_cpu_weights=False "
                    "(variant hybrid_flinear): its CPU blocks multiply by F.linear, whatever the load measured "
                    "faster")
    ap.add_argument("--fast-kernel", action="store_true", help="also a hybrid load with cpu_kernel=\"fast\" "
                    "(variant hybrid_fast): its CPU blocks multiply by nb_offload's own kernel, planned at its rate; "
                    "its reference computes those blocks by the same kernel")
    ap.add_argument("--small-pages", action="store_true", help="also a hybrid load whose host memory is in 4 KiB "
                    "pages (tiers.HUGE_PAGES off; variant hybrid_4k)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import nb_offload
    from nb_offload import cpu_experts, hybrid, tiers
    from nb_offload import handoff as handoffs
    from nb_offload.cpu_experts import host_threads
    if args.cores_left is not None:
        cpu_experts.CORES_LEFT = args.cores_left
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
    sys.path[:0] = [tests, os.path.join(tests, "gpu")]
    from test_hybrid_gpu import reference as cpu_reference
    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        t0 = time.perf_counter()
        build(args.folder, args.layers)
        print(f"built the 7B shape in {time.perf_counter() - t0:.0f} s", flush=True)
    torch.manual_seed(0)
    ids = torch.randint(3, 31000, (1, 16), device="cuda")
    long_ids = torch.randint(3, 31000, (1, 2048), device="cuda")
    n = args.tokens
    out = {"meta": {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__, "transformers": transformers.__version__, "tokens": n,
                    "cpu_threads": host_threads(), "cores": os.cpu_count()}, "rows": []}
    out["meta"]["link_gbps"] = link = med(pinned_rate())
    add = row_recorder(out, args.json, digits=4)
    torch.set_grad_enabled(False)        # for the whole run (an inference_mode object left unentered does nothing)

    def reference(on_cpu, max_tokens=0):
        """transformers on the GPU; with the blocks ``on_cpu`` computed on the CPU for steps of at most
        ``max_tokens`` tokens, as the engine computes them (the GPU test's reference): greedy tokens."""
        if on_cpu:
            return cpu_reference(args.folder, ids, on_cpu, max_tokens, n)
        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16, device_map="cuda").eval()
        tokens = steps(model.generate, ids, n)[1].cpu()
        del model
        gc.collect()
        torch.cuda.empty_cache()
        return tokens

    started = time.perf_counter()

    def say(what):
        """A progress line with the seconds since the run began (the rows come only at each budget's end)."""
        print(f"[{time.perf_counter() - started:6.1f} s] {what}", flush=True)
    if args.stacks_every > 0:
        stacks_every(args.stacks_every)
    want_gpu = reference([])
    say("reference tokens (transformers on the GPU)")
    for budget in args.budgets.split(","):
        t0 = time.perf_counter()
        if args.watchdog > 0:
            faulthandler.dump_traceback_later(args.watchdog, exit=True)
        llms = {}
        try:
            llms = {"streamed": nb_offload.load(args.folder, gpu=budget, cpu="100GiB", progress=False),
                    "hybrid": nb_offload.load(args.folder, gpu=budget, cpu="100GiB", compute="hybrid",
                                              progress=False)}
            for p in filter(None, args.hybrid_prefetch.split(",")):
                llms[f"hybrid_p{p}"] = nb_offload.load(args.folder, gpu=budget, cpu="100GiB", compute="hybrid",
                                                       prefetch=int(p), progress=False)
            if args.plain_products:
                llms["hybrid_flinear"] = nb_offload.load(args.folder, gpu=budget, cpu="100GiB", compute="hybrid",
                                                         pack_cpu_weights=False, progress=False)
            if args.fast_kernel:
                llms["hybrid_fast"] = nb_offload.load(args.folder, gpu=budget, cpu="100GiB", compute="hybrid",
                                                      cpu_kernel="fast", progress=False)
            if args.small_pages:
                tiers.HUGE_PAGES, was = False, tiers.HUGE_PAGES
                try:
                    llms["hybrid_4k"] = nb_offload.load(args.folder, gpu=budget, cpu="100GiB", compute="hybrid",
                                                        progress=False)
                finally:
                    tiers.HUGE_PAGES = was
            if args.auto:
                llms["hybrid_auto"] = nb_offload.load(args.folder, gpu=budget, cpu="100GiB", compute="auto",
                                                      progress=False)
            if args.read_back:
                handoffs.READ_BACK, was = "kernel", handoffs.READ_BACK
                try:
                    llms["hybrid_read_kernel"] = nb_offload.load(args.folder, gpu=budget, cpu="100GiB",
                                                                 compute="hybrid", progress=False)
                finally:
                    handoffs.READ_BACK = was
            default = hybrid.HANDOFF
            for handoff in filter(None, args.handoffs.split(",")):
                hybrid.HANDOFF = handoff
                try:
                    llms[f"hybrid_{handoff}"] = nb_offload.load(args.folder, gpu=budget, cpu="100GiB",
                                                                compute="hybrid", progress=False)
                finally:
                    hybrid.HANDOFF = default
            hyb = llms["hybrid"]
            say(f"{budget}: loaded {', '.join(llms)}; hybrid: {sum(e.compute == 'cpu' for e in hyb.plan)} CPU blocks, "
                f"{hyb.plan.prefetch} ahead, products {hyb.plan.cpu_products}, rates {hyb.plan.rates}, "
                f"rest {hyb.plan.cpu_rest}")
            in_host = [e.name for e in llms["streamed"].plan if e.tier == "cpu" and e.kind == "block"]
            for count in filter(None, args.cpu_blocks.split(",")):
                chosen = hybrid.spread(in_host, int(count) / len(in_host))
                llms[f"hybrid_pinned{count}"] = nb_offload.load(
                    args.folder, gpu=budget, cpu="100GiB", pins={name: "cpu-compute" for name in chosen},
                    prefetch=hyb.plan.prefetch, progress=False)
            # each load's plan as made at load, before a generate may plan again at the CPU's rate reached
            at_load = {k: dict(rates=llm.plan.rates, cpu_blocks=sum(e.compute == "cpu" for e in llm.plan),
                               prefetch=llm.plan.prefetch, cpu_rest=llm.plan.cpu_rest,
                               tok_s=1 / llm.plan.predicted_seconds_per_step(link, cpu_gbps=llm.plan.rates[0])
                               if llm.plan.rates else None) for k, llm in llms.items()}
            for k, llm in llms.items():   # a first generate, after which a load may plan again (RECALIBRATE_OVER)
                llm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                say(f"{budget}: {k}'s first generate ({llm.stats.graph_replays} replays; "
                    f"{llm.stats.graph_eager or 'captured'})")
            moved = {k: moved_per_step(llm, ids, 8)["cpu"] for k, llm in llms.items()}
            on_cpu = [e.name for e in hyb.plan if e.compute == "cpu"]
            counters, held_in = {}, {}

            def timed(llm, key, counters=counters, held_in=held_in):
                def fn():
                    s0, b0, c0 = llm.stats.cpu_block_seconds, llm.stats.cpu_block_bytes, llm.stats.steps
                    result = steps(llm.generate, ids, n)
                    held_in[key] = list(llm.last_held)      # what the generate whose tokens are compared held
                    held_in[key, "why"] = llm.stats.graph_eager
                    counters.setdefault(key, []).append((llm.stats.cpu_block_seconds - s0,
                                                         llm.stats.cpu_block_bytes - b0, llm.stats.steps - c0))
                    return result
                return fn
            runs = interleave({k: timed(llm, k) for k, llm in llms.items()}, args.repeats)
            say(f"{budget}: timed generates")
            t, sp, tokens, prefill = summarize(runs, llms, long_ids)
            breakdown = {}
            if args.trace_dir:
                for k, llm in llms.items():
                    breakdown[k] = step_breakdown(
                        timeline(llm, ids, os.path.join(args.trace_dir, f"timeline-{budget}-{k}.json"), tokens=16))
                    timeline(llm, long_ids, os.path.join(args.trace_dir, f"timeline-{budget}-{k}-prefill.json"),
                             tokens=1)
            def cpu_gbps(runs):
                return sum(c[1] for c in runs) / max(sum(c[0] for c in runs), 1e-9) / 1e9
            busy = sum(c[0] for c in counters["hybrid"])
            cpu_bytes = sum(c[1] for c in counters["hybrid"])
            cpu_rate, link_rate = hyb.plan.rates or (0.0, 0.0)    # the plan's: reached, where it was made again
            predicted = hyb.plan.predicted_seconds_per_step(link_gbps=link, cpu_gbps=cpu_rate)
            wanted = {}

            # what each load's timed generate held in its spare room (the same picks every time it runs)
            picks_of = {k: llm._spare_picks((ids,), dict(max_new_tokens=n, min_new_tokens=n)) if llm.hold_spare
                        else [] for k, llm in llms.items()}

            def holding(key, cpu, llms=llms, picks_of=picks_of):
                """The modelled step of ``key``'s timed generate, with what it held in its spare room (the plan's
                own prediction counts none): tok/s, and the CPU blocks and streamed units held."""
                llm, picks = llms[key], picks_of[key]
                blocks = sum(1 for i in picks if i in llm._engine.cpu_blocks)
                if not llm.plan.rates:
                    return None, blocks, len(picks) - blocks
                return 1 / llm._step_seconds_holding(picks, cpu, link), blocks, len(picks) - blocks

            def equals_reference(key, llm, tokens=tokens, wanted=wanted, held_in=held_in):
                """Whether ``llm``'s tokens equal transformers computing the same blocks on the CPU for the same
                steps, with a captured step's static cache where its decode was captured (the GPU test's
                reference; each split's made once)."""
                names = tuple(e.name for e in llm.plan if e.compute == "cpu" and e.name not in held_in[key])
                static, most = bool(llm.stats.graph_replays), llm.plan.cpu_max_tokens
                kernel = llm.plan.cpu_products == "fast"        # the same kernel in the reference's CPU blocks
                if (names, static, most, kernel) not in wanted:
                    wanted[names, static, most, kernel] = cpu_reference(args.folder, ids, list(names), most, n,
                                                                        static=static, kernel=kernel) \
                        if static or kernel else reference(list(names), most)
                return bool(torch.equal(tokens[key], wanted[names, static, most, kernel]))
            reached = cpu_bytes / busy / 1e9 if busy else cpu_rate
            held = holding("hybrid", cpu_rate)
            add(budget=budget, link_gbps=link, handoff=hybrid.HANDOFF, streamed_tok_s=1 / t["streamed"],
                hybrid_tok_s=1 / t["hybrid"],
                spread=sp, hybrid_over_streamed=t["streamed"] / t["hybrid"],
                blocks_on_cpu=len(on_cpu), blocks_streamed=sum(1 for e in hyb.plan if e.tier == "cpu"
                                                               and e.compute != "cpu"),
                block_share=hyb.plan.block_share, prefetch=hyb.plan.prefetch,
                cpu_products=hyb.plan.cpu_products, reordered_linears=hyb.stats.cpu_packed_linears,
                amx_linears=hyb.stats.cpu_amx_linears,
                flinear_linears=hyb.stats.cpu_plain_linears, reordered_bytes=hyb.stats.cpu_packed_bytes,
                staging=hyb.plan.reserved.get("staging_slots"),
                measured_at_load_cpu_gbps=(at_load["hybrid"]["rates"] or (0.0,))[0],
                measured_at_load_link_gbps=link_rate, plan_cpu_gbps=cpu_rate,
                replanned_at=hyb.replanned_at, at_load=at_load["hybrid"], timeline_steps=breakdown,
                waits_per_unit=getattr(hyb._engine.mover, "waits_per_unit", None),
                cpu_gbps_while_running=cpu_bytes / busy / 1e9 if busy else 0.0,
                cpu_busy_share_of_step=busy / sum(c[2] for c in counters["hybrid"]) / t["hybrid"],
                link_gbps_while_running=moved["hybrid"] / t["hybrid"] / 1e9,
                streamed_moved_per_step=moved["streamed"], hybrid_moved_per_step=moved["hybrid"],
                cpu_bytes_per_step=hyb.plan.cpu_bytes_per_token(),
                predicted_tok_s=1 / predicted,
                predicted_at_rate_reached_tok_s=1 / hyb.plan.predicted_seconds_per_step(
                    link_gbps=link, cpu_gbps=reached),
                predicted_holding_tok_s=held[0], held_cpu_blocks=held[1], held_streamed=held[2],
                predicted_holding_at_rate_reached_tok_s=holding("hybrid", reached)[0],
                prefill_2048_streamed_s=prefill["streamed"], prefill_2048_hybrid_s=prefill["hybrid"],
                streamed_equals_hf=bool(torch.equal(tokens["streamed"], want_gpu)),
                hybrid_equals_reference=equals_reference("hybrid", hyb),
                graph_eager=hyb.stats.graph_eager, plan=str(hyb.plan).splitlines()[-4:],
                graph_replays=hyb.stats.graph_replays, graph_captures=hyb.stats.graph_captures,
                graph_failed=sorted(set(hyb._engine.graphs.failed.values())),
                timed_graph_eager=held_in.get(("hybrid", "why")),
                variants={k: dict(tok_s=1 / t[k], over_streamed=t["streamed"] / t[k],
                                           blocks_on_cpu=sum(1 for e in llm.plan if e.compute == "cpu"),
                                           moved_per_step=moved[k], staging=llm.plan.reserved.get("staging_slots"),
                                           cpu_gbps=cpu_gbps(counters[k]),
                                           predicted_tok_s=1 / llm.plan.predicted_seconds_per_step(
                                               link_gbps=link, cpu_gbps=(llm.plan.rates or (cpu_rate,))[0]),
                                           # the step model at the CPU's rate reached: its own error apart
                                           predicted_at_rate_reached_tok_s=1 / llm.plan.predicted_seconds_per_step(
                                               link_gbps=link, cpu_gbps=cpu_gbps(counters[k])),
                                           predicted_holding_tok_s=holding(
                                               k, (llm.plan.rates or (cpu_rate,))[0])[0],
                                           predicted_holding_at_rate_reached_tok_s=holding(
                                               k, cpu_gbps(counters[k]) or cpu_rate)[0],
                                           held_cpu_blocks=holding(k, cpu_rate)[1],
                                           equals_reference=equals_reference(k, llm),
                                           graph_replays=llm.stats.graph_replays, graph_eager=llm.stats.graph_eager,
                                           compute_choice=llm.plan.compute_choice,
                                           cpu_products=llm.plan.cpu_products,
                                           reordered_linears=llm.stats.cpu_packed_linears,
                                           fast_linears=llm.stats.cpu_fast_linears,
                                           amx_linears=llm.stats.cpu_amx_linears,
                                           cpu_kernel_why_not=llm.plan.cpu_kernel_why_not,
                                           replanned_at=llm.replanned_at, at_load=at_load[k],
                                           graph_failed=sorted(set(llm._engine.graphs.failed.values())),
                                           read_back=_read_back(llm))
                                   for k, llm in llms.items() if k.startswith("hybrid_")})
        except Exception:
            traceback.print_exc()
            add(budget=budget, error=traceback.format_exc(limit=4))
        finally:
            for llm in llms.values():
                llm.unload()
            gc.collect()
            torch.cuda.empty_cache()
        faulthandler.cancel_dump_traceback_later()
        print(f"[{budget}: {time.perf_counter() - t0:.0f} s]", flush=True)


def stacks_every(seconds: float):
    """Every ``seconds``, every thread's stack to stderr, from a daemon thread (faulthandler's own timer is the
    watchdog's)."""
    def dump():
        while True:
            time.sleep(seconds)
            print(f"--- every thread's stack, {time.strftime('%H:%M:%S')} ---", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(all_threads=True)
    threading.Thread(target=dump, daemon=True, name="bench-stacks").start()


def _read_back(llm) -> str:
    """How a load's CPU blocks' outputs reached the GPU (handoff.READ_BACK), and why by the copy engine where a
    kernel was asked for."""
    h = llm._engine.block_handoff
    if h is None:
        return ""
    return h.read_back + (f" (copied: {h.read_back_why_not})" if h.read_back_why_not else "")


if __name__ == "__main__":
    main()
