"""nb_offload against the resident model and Accelerate, on one CUDA card, in one process.

Builds a LLaMA-7B-shaped model (hidden 4096, 32 layers, intermediate 11008, vocab 32000) with
random bf16 weights and saves it; measures the page-locked host-to-GPU rate (several times, the
median is used) and the drive's cold and warm read rates; then runs the cases of issue 3 on the
same saved model. Repeats are interleaved (baseline, nb_offload, baseline, ...) and medians are
reported with their spread. Each case also checks that nb_offload's greedy tokens equal the
resident model's, and that the GPU memory nb_offload allocated stayed within its budget.

The bound of a step: the largest of (every streamed byte / link rate), (bytes read from disk /
the drive's best measured rate) and the same step run with everything resident. Reads and
host-to-GPU copies run in parallel, so this is stricter than adding the two transfer times.

    PYTHONPATH=. python3 benchmarks/bench_offload.py --json out.json
    python3 benchmarks/report.py out.json --title "..." --command "..."   # its RESULTS.md section

Keep the JSON as benchmarks/runs/raw-DATE-CARD-WHAT.json; RESULTS.md shows the latest run per card.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import statistics
import subprocess
import tempfile
import time
import traceback

GiB = 2**30


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pinned_rate(nbytes=GiB, repeats=5):
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    rates = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src, non_blocking=True)
        e.record()
        e.synchronize()
        rates.append(nbytes / (s.elapsed_time(e) / 1e3) / 1e9)
    del src, dst
    return rates


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def drive_rate(folder, nbytes=4 * GiB, cold=True, repeats=3, threads=4, uncached=False, buf=None):
    """Read ``nbytes`` of the checkpoint with nb_offload's own reader (chunked, ``threads`` threads;
    ``uncached``: O_DIRECT, as with drop_page_cache=True).

    ``buf``: a uint8 tensor of at least that many bytes to read into, for callers that read a
    whole checkpoint again and again (default: a fresh page-locked one).
    Returns the best of ``repeats`` reads (a bound needs the fastest the drive can go) and all.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from nb_offload.tiers import read_extents
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    extents, total = [], 0
    for f in files:
        n = min(os.path.getsize(f), nbytes - total)
        extents.append((f, 0, n, total))
        total += n
        if total >= nbytes:
            break
    buf = torch.empty(total, dtype=torch.uint8, pin_memory=True) if buf is None else buf[:total]
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            if cold and not drop_caches():
                return None, []
            t0 = time.perf_counter()
            read_extents(extents, buf, pool=pool, uncached=uncached)
            rates.append(total / (time.perf_counter() - t0) / 1e9)
    return max(rates), rates


def units_drive_rate(llm, cold, uncached):
    """Read every disk unit's extents (the bytes a disk case streams) with nb_offload's chunked
    reader, all queued at once, each unit lined up as the engine lines it up: the drive's rate on
    exactly that data, with no pipeline in the way."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from nb_offload.tiers import read_extents
    from nb_offload.uncached import ALIGN, alignment_shift
    eng = llm._engine
    disk = [i for i in eng.order if eng.sources[i].tier == "disk"]
    total = sum(eng.units[i].nbytes for i in disk)
    buf = torch.empty(total + 2 * ALIGN * (len(disk) + 1), dtype=torch.uint8)
    with ThreadPoolExecutor(llm.options.read_threads) as pool:
        if cold and not drop_caches():
            return None
        t0 = time.perf_counter()
        chunks, at = [], 0
        for i in disk:
            ext, n = eng.sources[i].extents, eng.units[i].nbytes
            at += alignment_shift(ext, buf.data_ptr() + at) if uncached else 0
            chunks += read_extents(ext, buf[at:at + n], pool=pool, uncached=uncached, wait=False)
            at += n + (-(at + n)) % ALIGN
        for c in chunks:
            c.result()
        return total / (time.perf_counter() - t0) / 1e9


def build(folder, layers, dtype="bfloat16"):
    """Save a LLaMA-7B-shaped model of ``layers`` layers with random ``dtype`` weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, dtype=dtype)
    save_random(LlamaForCausalLM, cfg, folder, dtype)


def save_random(model_class, cfg, folder, dtype="bfloat16"):
    """Save a ``model_class`` of ``cfg`` with random ``dtype`` weights (made on the GPU, then freed)."""
    import torch
    with torch.device("cuda"):
        model = model_class(cfg).to(getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def time_call(fn):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def decode_step(generate, ids, n):
    """Seconds per decode step: the difference of a (2+n)- and a 2-token generate, over n."""
    kw = dict(do_sample=False)
    short = time_call(lambda: generate(ids, max_new_tokens=2, min_new_tokens=2, **kw))
    long = time_call(lambda: generate(ids, max_new_tokens=2 + n, min_new_tokens=2 + n, **kw))
    return (long - short) / n


class StepClock:
    """A generate streamer that notes when each token arrives: per-step durations, prefill excluded."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass

    def steps(self):
        # put() is called with the prompt, then once per new token; the first gap is the prefill
        return [b - a for a, b in zip(self.stamps[2:], self.stamps[3:])]


def step_times(generate, ids, n):
    clock = StepClock()
    generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
    return clock.steps()


def moved_per_step(llm, ids, n):
    """Bytes a decode step brings to the GPU, per source tier: from the model's own counters over
    a (2+n)- and a 2-token generate, differenced like ``decode_step`` (so one-off copies cancel)."""
    def moved(k):
        before = (llm.stats.bytes_from_cpu, llm.stats.bytes_from_disk)
        llm.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        return llm.stats.bytes_from_cpu - before[0], llm.stats.bytes_from_disk - before[1]
    moved(2)            # the first call after a change of mode starts from another queue state
    short, long = moved(2), moved(2 + n)
    return {"cpu": (long[0] - short[0]) / n, "disk": (long[1] - short[1]) / n}


def read_busy(trace, t0, t1):
    """Share of [t0, t1] in which at least one disk read was in progress (from the trace)."""
    trace.flush(wait=True)
    spans = sorted((max(e.start, t0), min(e.end, t1)) for e in trace
                   if e.kind == "read" and e.end > t0 and e.start < t1)
    busy, end = 0.0, t0
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / (t1 - t0)


def switched(obj, name, value, fn):
    """Run ``fn`` with ``obj.name`` set to ``value``, then put back what it was."""
    before = getattr(obj, name)
    setattr(obj, name, value)
    try:
        return fn()
    finally:
        setattr(obj, name, before)


def unheld(llm, fn):
    """Run ``fn`` with spare-room holding switched off (the plan's streaming as it stands)."""
    return switched(llm, "hold_spare", False, fn)


def untraced(llm, fn):
    """Run ``fn`` with the model's trace switched off (case 7's baseline)."""
    return switched(llm.trace, "enabled", False, fn)


def row_recorder(out, path, digits=5):
    """An ``add(**row)`` that appends the row to ``out["rows"]``, prints it as a JSON line (floats to
    ``digits`` places) and, given ``path``, rewrites the JSON there, so a run cut short keeps its rows."""
    def add(**row):
        out["rows"].append(row)
        print(json.dumps({k: (round(v, digits) if isinstance(v, float) else v) for k, v in row.items()}),
              flush=True)
        if path:
            with open(path, "w") as fh:
                json.dump(out, fh, indent=1, default=str)
    return add


def interleave(fns: dict, repeats):
    """Run each variant once to warm up, then ``repeats`` rounds in turn: A, B, A, B, ..."""
    out = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k].append(fn())
    return out


def summarize(runs: dict, llms: dict, long_ids):
    """Of ``interleave``'d runs of ``bench_graph.steps`` (variant -> [(step seconds, tokens)]): each variant's
    median step, its range, its last tokens, and the median of three prefills of ``long_ids``."""
    t = {k: med([x for s, _ in r for x in s]) for k, r in runs.items()}
    sp = {k: spread([x for s, _ in r for x in s]) for k, r in runs.items()}
    tokens = {k: r[-1][1].cpu() for k, r in runs.items()}
    prefill = {k: med([time_call(lambda llm=llm: llm.generate(long_ids, max_new_tokens=1)) for _ in range(3)])
               for k, llm in llms.items()}
    return t, sp, tokens, prefill


def hook_clock(engine_cls) -> dict:
    """Time the engine's hooks (``_enter`` + ``_exit``) from now on: the returned dict's "s" adds up the
    host seconds spent in them. At a budget where the step is bound by Python launching kernels, this
    is what the engine adds to a step."""
    spent = {"s": 0.0}
    for name in ("_enter", "_exit"):
        real = getattr(engine_cls, name)

        def timed(self, idx, _real=real):
            t0 = time.perf_counter()
            try:
                return _real(self, idx)
            finally:
                spent["s"] += time.perf_counter() - t0
        setattr(engine_cls, name, timed)
    return spent


def med(xs):
    return statistics.median(xs)


def spread(xs):
    return f"{min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f} ms"


class Bench:
    def __init__(self, args):
        import accelerate
        import torch
        import transformers
        self.args = args
        self.torch = torch
        self.rows = []
        self.meta = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "layers": args.layers}
        self.links = []
        self.add = row_recorder({"meta": self.meta, "links": self.links, "rows": self.rows}, args.json)

    def link(self):
        return med(self.links)

    def same_tokens(self, llm, ref, ids):
        a = ref.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        b = llm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        return bool(self.torch.equal(a.cpu(), b.cpu()))

    def load(self, **kw):
        import nb_offload
        torch = self.torch
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        llm = nb_offload.load(self.args.folder, progress=False, read_threads=self.args.read_threads, **kw)
        llm._bench_base = base
        return llm

    def peak_after(self, llm, run):
        """GPU bytes allocated since just before the load, at their peak, after ``run`` (nothing
        else has allocated on the card in between)."""
        run()
        sync()
        llm._bench_peak = self.torch.cuda.max_memory_allocated() - llm._bench_base
        return llm._bench_peak

    def peak(self, llm):
        return llm._bench_peak


def run(args):
    import torch
    from transformers import AutoModelForCausalLM

    from nb_offload.budget import parse_size
    b = Bench(args)
    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        t0 = time.perf_counter()
        build(args.folder, args.layers)
        print(f"built and saved the model in {time.perf_counter() - t0:.0f} s", flush=True)
    b.links += pinned_rate()
    # the drive's best: buffered reads and O_DIRECT ones (drop_page_cache=True reads that way)
    buffered, b.meta["drive_cold_all"] = drive_rate(args.folder, cold=True, threads=args.read_threads)
    direct, b.meta["drive_cold_direct_all"] = drive_rate(args.folder, cold=True, threads=args.read_threads,
                                                         uncached=True)
    b.meta["drive_cold_gbps"] = max(buffered or 0, direct or 0) or None
    b.meta["drive_warm_gbps"], b.meta["drive_warm_all"] = drive_rate(args.folder, cold=False, threads=args.read_threads)
    b.meta["read_threads"] = args.read_threads
    print(f"link {b.link():.1f} GB/s; drive cold {b.meta['drive_cold_gbps']} GB/s, warm "
          f"{b.meta['drive_warm_gbps']} GB/s", flush=True)
    ref = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16, device_map={"": 0}).eval()
    torch.manual_seed(0)
    ids1 = torch.randint(3, 31000, (1, 16), device="cuda")
    ids8 = torch.randint(3, 31000, (8, 16), device="cuda")
    prompt = torch.randint(3, 31000, (1, 2048), device="cuda")
    n, reps = args.tokens, args.repeats
    inference = torch.inference_mode()
    inference.__enter__()
    cases = set(args.cases.split(","))

    def guard(name, fn):
        if name not in cases and "all" not in cases:
            return
        t0 = time.perf_counter()
        try:
            fn()
            print(f"[case {name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        except Exception:
            traceback.print_exc()
            b.add(case=name, error=traceback.format_exc(limit=3))

    def case_decode(budget, name, batch_ids, context=None, batch=1, with_acc=False, with_trace_off=False,
                    with_no_hold=False):
        kw = dict(gpu=budget, cpu="100GiB")
        if context:
            kw["context"] = context
        if batch > 1:
            kw["batch"] = batch
        llm = b.load(**kw)
        b.peak_after(llm, lambda: llm.generate(batch_ids, max_new_tokens=2 + n, min_new_tokens=2 + n,
                                               do_sample=False))
        held = llm.stats.held_last
        moved = moved_per_step(llm, batch_ids, n)
        fns = {"resident": lambda: decode_step(ref.generate, batch_ids, n),
               "nb_offload": lambda: decode_step(llm.generate, batch_ids, n)}
        if with_trace_off:
            fns["nb_offload_trace_off"] = lambda: untraced(llm, lambda: decode_step(llm.generate, batch_ids, n))
        if with_no_hold:
            fns["nb_offload_no_hold"] = lambda: unheld(llm, lambda: decode_step(llm.generate, batch_ids, n))
            moved_no_hold = unheld(llm, lambda: moved_per_step(llm, batch_ids, n))
        acc = None
        if with_acc:
            # Loaded beside nb_offload (the card has room for both), so its repeats interleave too.
            gc.collect()
            acc_base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            acc = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16, device_map="auto",
                                                       max_memory={0: parse_size(budget), "cpu": 100 * GiB})
            acc.generate(batch_ids, max_new_tokens=3, do_sample=False)
            b.meta["accelerate_peak_gpu"] = torch.cuda.max_memory_allocated() - acc_base
            b.meta["accelerate_budget"] = parse_size(budget)
            fns["accelerate"] = lambda: decode_step(acc.generate, batch_ids, max(2, n // 4))
        t = interleave(fns, reps)
        b.links += pinned_rate(repeats=2)
        streamed = moved["cpu"] + moved["disk"]
        bound = max(streamed / (b.link() * 1e9), med(t["resident"]))
        row = dict(case=name, batch=batch_ids.shape[0], prompt=batch_ids.shape[1], new_tokens=n,
                   gpu_budget=parse_size(budget), streamed_bytes=streamed, held_units=held,
                   planned_streamed_bytes=llm.plan.streamed_bytes_per_token()["cpu"],
                   resident_tok_s=batch_ids.shape[0] / med(t["resident"]),
                   nb_tok_s=batch_ids.shape[0] / med(t["nb_offload"]), nb_spread=spread(t["nb_offload"]),
                   resident_spread=spread(t["resident"]), bound_tok_s=batch_ids.shape[0] / bound,
                   pct_of_bound=100 * bound / med(t["nb_offload"]),
                   pct_of_pcie=100 * streamed / (b.link() * 1e9) / med(t["nb_offload"]),
                   peak_gpu=b.peak(llm), within_budget=b.peak(llm) <= parse_size(budget),
                   tokens_identical=b.same_tokens(llm, ref, batch_ids), plan=str(llm.plan).splitlines()[2:6])
        if with_trace_off:
            off_s, on_s = med(t["nb_offload_trace_off"]), med(t["nb_offload"])
            row.update(trace_off_tok_s=batch_ids.shape[0] / off_s, trace_cost_pct=100 * (on_s - off_s) / off_s,
                       trace_off_spread=spread(t["nb_offload_trace_off"]))
        if with_no_hold:
            row.update(no_hold_tok_s=batch_ids.shape[0] / med(t["nb_offload_no_hold"]),
                       no_hold_spread=spread(t["nb_offload_no_hold"]),
                       no_hold_streamed_bytes=moved_no_hold["cpu"] + moved_no_hold["disk"])
        if acc is not None:
            acc_s = med(t["accelerate"])
            b.meta["accelerate_s"], b.meta["accelerate_all"] = acc_s, t["accelerate"]
            row.update(accelerate_tok_s=1 / acc_s, accelerate_spread=spread(t["accelerate"]),
                       x_accelerate=acc_s / med(t["nb_offload"]))
            if with_no_hold:
                row["no_hold_x_accelerate"] = acc_s / med(t["nb_offload_no_hold"])
            del acc
        elif b.meta.get("accelerate_budget") == parse_size(budget) and batch_ids.shape[0] == 1:
            acc_s = b.meta["accelerate_s"]      # measured in an earlier case's rounds
            row.update(accelerate_tok_s=1 / acc_s, x_accelerate=acc_s / med(t["nb_offload"]))
        llm.unload()
        llm = None          # drop the handle before the next case's load
        gc.collect()
        torch.cuda.empty_cache()
        b.add(**row)
        return row

    def case_prefill():
        llm = b.load(gpu="4GiB", cpu="100GiB", context=2048)
        b.peak_after(llm, lambda: llm.model(prompt, use_cache=False, logits_to_keep=1))
        streamed = llm.plan.streamed_bytes_per_token()["cpu"]
        fwd = dict(use_cache=False, logits_to_keep=1)
        t = interleave({"resident": lambda: time_call(lambda: ref(prompt, **fwd)),
                        "nb_offload": lambda: time_call(lambda: llm.model(prompt, **fwd))}, reps)
        bound = max(streamed / (b.link() * 1e9), med(t["resident"]))
        same = bool(torch.equal(ref(prompt, **fwd).logits.argmax(-1), llm.model(prompt, **fwd).logits.argmax(-1)))
        b.add(case="4 prefill 2048 tokens, gpu 4GiB", batch=1, prompt=2048, gpu_budget=4 * GiB,
              streamed_bytes=streamed, resident_tok_s=2048 / med(t["resident"]),
              nb_tok_s=2048 / med(t["nb_offload"]), nb_spread=spread(t["nb_offload"]),
              bound_tok_s=2048 / bound, pct_of_bound=100 * bound / med(t["nb_offload"]),
              peak_gpu=b.peak(llm), within_budget=b.peak(llm) <= 4 * GiB, next_token_identical=same)
        llm.unload()

    def case_disk():
        probe = b.load(gpu="4GiB", cpu="100GiB", context=1024)
        streamed_blocks = [e for e in probe.plan if e.tier == "cpu"]
        blk = max(e.bytes for e in streamed_blocks)
        piece = max(u.stream_nbytes for u in probe._insp.units if u.kind == "block")
        half = len(streamed_blocks) // 2
        cpu_budget = half * blk + 2 * piece          # half the blocks, plus two staging buffers
        probe.unload()
        offload = tempfile.mkdtemp(prefix="nb_offload-disk-")
        for label, cold in (("cold", True), ("warm", False)):
            llm = b.load(gpu="4GiB", cpu=cpu_budget, disk=offload, context=1024, drop_page_cache=cold)
            b.peak_after(llm, lambda: llm.generate(ids1, max_new_tokens=2, do_sample=False))  # noqa: B023 (runs now)
            # The drive is measured again in every round, just before the timed generate (the rate
            # drifts by tenths over minutes here): the first 4 GiB of the checkpoint and the very
            # bytes this case streams, each buffered and O_DIRECT; the round's bound takes the fastest.
            warm_units = None if cold else units_drive_rate(llm, False, uncached=False)
            times, moved, busy, rates, probes = [], {"cpu": [], "disk": []}, [], [], []
            for _ in range(3 if cold else reps):
                if cold:
                    now = {"first 4 GiB, O_DIRECT": drive_rate(args.folder, repeats=1, threads=args.read_threads,
                                                               uncached=True)[0],
                           "first 4 GiB, buffered": drive_rate(args.folder, repeats=1, threads=args.read_threads)[0],
                           "these units, O_DIRECT": units_drive_rate(llm, True, uncached=True),
                           "these units, buffered": units_drive_rate(llm, True, uncached=False)}
                    probes.append(now)
                    rates.append(max(v or 0 for v in now.values()) or None)
                    drop_caches()
                else:
                    rates.append(max(b.meta["drive_warm_gbps"], warm_units))
                    llm.generate(ids1, max_new_tokens=2, do_sample=False)
                steps0, cpu0, disk0 = llm.stats.steps, llm.stats.bytes_from_cpu, llm.stats.bytes_from_disk
                t_start = time.perf_counter()
                dt = time_call(lambda: llm.generate(ids1, max_new_tokens=3, min_new_tokens=3,  # noqa: B023
                                                    do_sample=False))
                busy.append(read_busy(llm.trace, t_start, time.perf_counter()))
                steps = llm.stats.steps - steps0
                times.append(dt / steps)
                # bytes of this very generate (a unit held in spare room counts once, in its first step)
                moved["cpu"].append((llm.stats.bytes_from_cpu - cpu0) / steps)
                moved["disk"].append((llm.stats.bytes_from_disk - disk0) / steps)
            resident = med([decode_step(ref.generate, ids1, 4) for _ in range(2)])

            def bound_of(cpu_bytes, disk_bytes, rate, resident=resident):
                # every streamed byte crosses the link; disk bytes also come off the drive, in parallel
                return max((cpu_bytes + disk_bytes) / (b.link() * 1e9), disk_bytes / (rate * 1e9), resident)
            bounds = [bound_of(c, d, r) for c, d, r in zip(moved["cpu"], moved["disk"], rates)]
            best = max(rates + [b.meta["drive_cold_gbps"] if cold else b.meta["drive_warm_gbps"]])
            b.add(case=f"5 disk tier ({label} page cache), gpu 4GiB", batch=1, gpu_budget=4 * GiB,
                  cpu_budget=cpu_budget, streamed_from_cpu=med(moved["cpu"]), streamed_from_disk=med(moved["disk"]),
                  drive_gbps=med(rates), drive_all=rates, drive_probes=probes, nb_tok_s=1 / med(times),
                  nb_spread=spread(times), nb_all_s=times, bound_tok_s=1 / med(bounds),
                  pct_of_bound=100 * med([bd / t for bd, t in zip(bounds, times)]),
                  drive_best_gbps=best,
                  pct_of_bound_best_drive=100 * bound_of(med(moved["cpu"]), med(moved["disk"]), best) / med(times),
                  peak_gpu=b.peak(llm), within_budget=b.peak(llm) <= 4 * GiB, held_units=llm.stats.held_last,
                  drive_busy_pct=100 * med(busy), drop_page_cache=cold,
                  tokens_identical=b.same_tokens(llm, ref, ids1))
            llm.unload()

    def case_resident():
        llm = b.load(gpu="60GiB", cpu="100GiB")
        b.peak_after(llm, lambda: None)
        assert all(e.tier == "gpu" for e in llm.plan)
        # The resident step is Python-bound and the noisiest number here (whole runs shift by tens of
        # percent on these machines). Every step of every round is timed, and the pooled per-step
        # medians are compared as well as the per-run figures.
        m = 4 * n
        t = interleave({"resident": lambda: step_times(ref.generate, ids1, m),
                        "nb_offload": lambda: step_times(llm.generate, ids1, m),
                        "nb_offload_trace_off": lambda: untraced(llm, lambda: step_times(llm.generate, ids1, m))},
                       3 * reps)
        runs = {k: [med(v) for v in runs] for k, runs in t.items()}
        pooled = {k: med([x for v in runs for x in v]) for k, runs in t.items()}
        r, o, f = pooled["resident"], pooled["nb_offload"], pooled["nb_offload_trace_off"]
        rr, ro = med(runs["resident"]), med(runs["nb_offload"])
        b.add(case="6 everything resident", batch=1, resident_tok_s=1 / r, nb_tok_s=1 / o,
              nb_trace_off_tok_s=1 / f, slower_pct=100 * (o - r) / r, slower_trace_off_pct=100 * (f - r) / r,
              steps_per_variant=sum(len(v) for v in t["resident"]),
              per_run_slower_pct=100 * (ro - rr) / rr,
              resident_spread=spread(runs["resident"]), nb_spread=spread(runs["nb_offload"]),
              tokens_identical=b.same_tokens(llm, ref, ids1))
        llm.unload()

    guard("1", lambda: case_decode("4GiB", "1 decode, gpu 4GiB (+7 trace on/off)", ids1,
                                   with_acc=not args.skip_accelerate,
                                   with_trace_off=True, with_no_hold=True))
    guard("1", lambda: case_decode("4GiB", "1b decode, gpu 4GiB, context 512", ids1, context=512))
    guard("2", lambda: case_decode("12GiB", "2 decode, gpu 12GiB", ids1))
    guard("3", lambda: case_decode("4GiB", "3 decode batch 8, gpu 4GiB, context 512", ids8, context=512, batch=8))
    guard("4", case_prefill)
    guard("5", case_disk)
    guard("6", case_resident)
    b.links += pinned_rate(repeats=3)
    b.meta["link_gbps_median"] = b.link()
    b.meta["link_gbps_all"] = [round(x, 1) for x in b.links]
    b.add(case="link", link_gbps=b.link(), link_min=min(b.links), link_max=max(b.links))
    return b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "nb_offload-bench-7b"))
    ap.add_argument("--cases", default="all", help="comma list of 1-6, or all")
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--read-threads", type=int, default=8,
                    help="nb_offload's and the drive probe's read threads (8: the library default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    b = run(args)
    print("\n== summary ==")
    for r in b.rows:
        if "pct_of_bound" in r:
            extra = ""
            if "x_accelerate" in r:
                extra += f", {r['x_accelerate']:.1f}x Accelerate ({r['accelerate_tok_s']:.2f} tok/s)"
            if "pct_of_pcie" in r:
                extra += f", {r['pct_of_pcie']:.1f}% of PCIe"
            if "trace_cost_pct" in r:
                extra += f", trace cost {r['trace_cost_pct']:+.1f}%"
            if "drive_busy_pct" in r:
                extra += f"; drive busy {r['drive_busy_pct']:.0f}% of the time"
            if "drive_all" in r:
                extra += (f"; drive per round {', '.join(f'{x:.2f}' for x in r['drive_all'])} GB/s; against "
                          f"the run's fastest drive reading ({r['drive_best_gbps']:.2f} GB/s) "
                          f"{r['pct_of_bound_best_drive']:.1f}% of bound")
            if r.get("held_units"):
                extra += f"; {r['held_units']} units held in spare room"
            if "no_hold_tok_s" in r:
                extra += (f" (without: {r['no_hold_tok_s']:.2f} tok/s, "
                          f"{r.get('no_hold_x_accelerate', 0):.1f}x Accelerate)")
            print(f"{r['case']}: nb {r['nb_tok_s']:.2f} tok/s, bound {r['bound_tok_s']:.2f} -> "
                  f"{r['pct_of_bound']:.1f}% of bound{extra}; peak {r['peak_gpu'] / GiB:.2f} GiB "
                  f"within budget {r['within_budget']}; same tokens "
                  f"{r.get('tokens_identical', r.get('next_token_identical'))}")
        elif "slower_pct" in r:
            print(f"{r['case']}: resident {r['resident_tok_s']:.2f}, nb {r['nb_tok_s']:.2f} "
                  f"({r['slower_pct']:+.1f}%), trace off {r['nb_trace_off_tok_s']:.2f} "
                  f"({r['slower_trace_off_pct']:+.1f}%); same tokens {r['tokens_identical']}")
        elif "error" in r:
            print(f"{r['case']}: ERROR {r['error'].splitlines()[-1]}")
    print(f"link median {b.link():.1f} GB/s over {len(b.links)} samples")


if __name__ == "__main__":
    main()
