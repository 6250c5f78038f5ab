"""Loading speed and host memory: nb_offload.load against transformers, on one CUDA card, in one process.

Cases (``--cases``, default all three):

- warm: a LLaMA-7B-shaped bf16 checkpoint (bench_offload.py's ``build``, 32 layers) held in the page
  cache. ``AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")``
  against ``nb_offload.load(path, gpu="4GiB")``, in interleaved rounds, each timed to a CUDA sync;
  medians, and their ratio nb_offload / from_pretrained.
- cold: page cache dropped before each reading: per round, the drive's rate on the same files
  (bench_offload's buffered reader: 8 threads, 16 MiB chunks), then ``nb_offload.load``; the load's
  rate (checkpoint bytes / its time) as a share of the drive's rate in the same round.
  ``--cold-reference``: ``from_pretrained`` cold, once.
- fp32: a float32 checkpoint (8 layers of the same shape) loaded as bf16 with ``gpu="1.5GiB"`` and
  ``cpu=`` what the plan needs there plus ``--fp32-headroom``. A child process loads it (so this
  process's memory is not counted) while a thread samples its RssAnon + RssShmem every 10 ms; the
  peak over the figure just before the load, and ``llm.stats.host_peak``, against the budget.

The targets are in TARGETS; the JSON (``--json``, ``"kind": "load"``) keeps every raw time.

    PYTHONPATH=. python3 benchmarks/bench_load.py --json out.json    # as root: drop_caches needs it
    python3 benchmarks/report.py out.json --title "..." --command "..."   # its RESULTS.md section
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(HERE))      # nb_offload from this tree unless PYTHONPATH names one
from bench_offload import build, drive_rate, drop_caches, sync  # noqa: E402

GiB = 2**30
THREADS = 8                 # the drive probe's readers (nb_offload's read_threads default)
# warm: nb_offload / from_pretrained at most; cold: % of the drive's rate at least; fp32: peak / budget at most
TARGETS = {"warm": 1.25, "cold": 85.0, "fp32": 1.05}
CHILD_MARK = "BENCH_LOAD_CHILD "


def checkpoint_files(folder):
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    return files, sum(os.path.getsize(f) for f in files)


def checkpoint_info(folder):
    files, total = checkpoint_files(folder)
    with open(os.path.join(folder, "config.json")) as fh:
        cfg = json.load(fh)
    return {"checkpoint": os.path.basename(folder), "layers": cfg.get("num_hidden_layers"),
            "hidden": cfg.get("hidden_size"), "intermediate": cfg.get("intermediate_size"),
            "dtype": cfg.get("dtype", cfg.get("torch_dtype")), "files": len(files), "bytes": total}


def ensure_built(folder, layers, dtype):
    if not os.path.isfile(os.path.join(folder, "config.json")):
        t0 = time.perf_counter()
        build(folder, layers, dtype=dtype)
        print(f"built {folder} ({layers} layers, {dtype}) in {time.perf_counter() - t0:.0f} s", flush=True)
    info = checkpoint_info(folder)
    if info["layers"] != layers:
        print(f"note: {folder} has {info['layers']} layers, not {layers} (built by another run)", flush=True)
    return info


def free_cuda():
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_from_pretrained(path):
    """Seconds for transformers to load the checkpoint onto the card (the model is dropped after)."""
    import torch
    from transformers import AutoModelForCausalLM
    sync()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    sync()
    dt = time.perf_counter() - t0
    del model
    free_cuda()
    return dt


def time_nb_load(path, **kw):
    """Seconds for nb_offload.load, and its plan's weight bytes per tier (unloaded after)."""
    import nb_offload
    sync()
    t0 = time.perf_counter()
    llm = nb_offload.load(path, progress=False, **kw)
    sync()
    dt = time.perf_counter() - t0
    tiers = {k: v for k, v in llm.plan.totals().items() if v}
    # where the time went: reading the weights into the tiers (and, within it, page-locking, summed
    # over the threads), against the whole load
    print(f"  nb_offload.load {dt:.2f} s: weights placed in {llm._storage.seconds:.2f} s, page-locking "
          f"{llm._storage.lock_seconds:.2f} thread-s", flush=True)
    llm.unload()
    del llm
    free_cuda()
    return dt, tiers


def read_buffer(nbytes):
    """One pageable buffer for every whole-checkpoint read, touched once so no read pays page faults."""
    import torch
    buf = torch.empty(nbytes, dtype=torch.uint8)
    buf.fill_(0)
    return buf


def med(xs):
    return statistics.median(xs)


def case_warm(args, path, info):
    row = dict(info, gpu_budget=args.gpu, repeats=args.repeats, read_threads=THREADS, target_ratio=TARGETS["warm"])
    buf = read_buffer(info["bytes"])
    # The first read fills the page cache (from the drive where the build's pages were dropped);
    # the second is the rate of reading the checkpoint from it.
    t0 = time.perf_counter()
    drive_rate(path, nbytes=info["bytes"], cold=False, repeats=1, threads=THREADS, buf=buf)
    row["warmup_read_s"] = time.perf_counter() - t0
    row["page_cache_gbps"] = drive_rate(path, nbytes=info["bytes"], cold=False, repeats=1, threads=THREADS,
                                        buf=buf)[0]
    del buf
    hf, nb = [], []
    for r in range(args.repeats):
        hf.append(time_from_pretrained(path))
        dt, tiers = time_nb_load(path, gpu=args.gpu)
        nb.append(dt)
        row["nb_tiers"] = tiers
        print(f"warm round {r + 1}: from_pretrained {hf[-1]:.2f} s, nb_offload {nb[-1]:.2f} s", flush=True)
    row.update(from_pretrained_s=hf, nb_offload_s=nb, from_pretrained_median_s=med(hf),
               nb_offload_median_s=med(nb), ratio=med(nb) / med(hf))
    row["met"] = row["ratio"] <= TARGETS["warm"]
    return row


def case_cold(args, path, info):
    if not drop_caches():
        raise RuntimeError("can't drop the page cache (writing /proc/sys/vm/drop_caches needs root)")
    row = dict(info, gpu_budget=args.gpu, repeats=args.repeats, read_threads=THREADS, target_pct=TARGETS["cold"])
    buf = read_buffer(info["bytes"])
    drive, nb = [], []
    for r in range(args.repeats):
        # drive_rate drops the cache itself before reading; the load gets a cold cache too
        drive.append(drive_rate(path, nbytes=info["bytes"], cold=True, repeats=1, threads=THREADS, buf=buf)[0])
        drop_caches()
        nb.append(time_nb_load(path, gpu=args.gpu)[0])
        print(f"cold round {r + 1}: drive {drive[-1]:.2f} GB/s, nb_offload {nb[-1]:.2f} s "
              f"({info['bytes'] / nb[-1] / 1e9:.2f} GB/s)", flush=True)
    del buf
    rates = [info["bytes"] / t / 1e9 for t in nb]
    shares = [100 * a / b for a, b in zip(rates, drive)]
    row.update(drive_gbps=drive, nb_offload_s=nb, nb_offload_gbps=rates, share_pct=shares,
               nb_offload_median_s=med(nb), drive_median_gbps=med(drive), share_median_pct=med(shares))
    row["met"] = row["share_median_pct"] >= TARGETS["cold"]
    if args.cold_reference:
        drop_caches()
        row["from_pretrained_cold_s"] = time_from_pretrained(path)
        print(f"cold from_pretrained: {row['from_pretrained_cold_s']:.2f} s", flush=True)
    return row


def run_child(mode, params):
    """Run this script as a child (``plan`` or ``load``) and return the JSON it prints."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--child-args",
                           json.dumps(params)], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {mode} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len(CHILD_MARK):])


def case_fp32(args, path, info):
    from nb_offload.budget import parse_size
    where = {"device": "cpu"} if args.smoke else {"gpu": args.fp32_gpu}
    need = run_child("plan", dict(path=path, **where))
    headroom = parse_size(args.fp32_headroom)
    budget = need["cpu_used"] + headroom
    got = run_child("load", dict(path=path, cpu=budget, **where))
    row = dict(info, **where, loaded_as="bfloat16", plan_cpu_need=need["cpu_used"], plan_tiers=need["tiers"],
               headroom=headroom, cpu_budget=budget, target=TARGETS["fp32"], **got)
    row["sampled_over_budget"] = got["sampled_peak"] / budget
    row["stats_over_budget"] = got["stats_host_peak"] / budget
    row["met"] = max(row["sampled_over_budget"], row["stats_over_budget"]) <= TARGETS["fp32"]
    return row


def child(mode, params):
    """In the child: ``plan`` prints what the plan charges to the cpu budget; ``load`` loads the
    checkpoint as bf16 while a thread samples the process's host memory."""
    import torch
    if "gpu" in params:
        torch.zeros(1, device="cuda")       # the CUDA context's own host memory is not the load's
        torch.cuda.synchronize()
    import nb_offload
    from nb_offload.budget import process_memory
    where = {k: params[k] for k in ("gpu", "device") if k in params}
    if mode == "plan":
        plan = nb_offload.plan(params["path"], dtype="bfloat16", **where)
        result = {"cpu_used": plan.used()["cpu"], "tiers": {k: v for k, v in plan.totals().items() if v}}
    else:
        before = process_memory()
        peak, samples, stop = [before], [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], process_memory())
                samples[0] += 1
                stop.wait(0.01)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        sync()
        t0 = time.perf_counter()
        llm = nb_offload.load(params["path"], dtype="bfloat16", cpu=params["cpu"], progress=False, **where)
        sync()
        load_s = time.perf_counter() - t0
        stop.set()
        sampler.join()
        after = process_memory()
        peak[0] = max(peak[0], after)
        st = llm.stats
        result = {"load_s": load_s, "sampled_before": before, "sampled_peak": peak[0] - before,
                  "after_load": after - before, "samples": samples[0], "stats_host_peak": st.host_peak,
                  "stats_host_before": st.host_before, "stats_host_budget": st.host_budget,
                  "stats_host_now": st.host_now, "tiers": {k: v for k, v in llm.plan.totals().items() if v}}
        llm.unload()
    print(CHILD_MARK + json.dumps(result), flush=True)


def summary(name, r):
    if "error" in r:
        return f"{name}: ERROR {r['error'].strip().splitlines()[-1]}"
    ok = "met" if r["met"] else "NOT met"
    if name == "warm":
        return (f"warm page cache ({r['bytes'] / 1e9:.1f} GB, page cache read {r['page_cache_gbps']:.1f} GB/s): "
                f"nb_offload.load(gpu={r['gpu_budget']}) {r['nb_offload_median_s']:.2f} s, from_pretrained "
                f"{r['from_pretrained_median_s']:.2f} s (medians of {len(r['nb_offload_s'])}): ratio "
                f"{r['ratio']:.2f} (target <= {r['target_ratio']}): {ok}")
    if name == "cold":
        ref = (f"; from_pretrained cold {r['from_pretrained_cold_s']:.2f} s"
               if "from_pretrained_cold_s" in r else "")
        return (f"cold page cache: nb_offload.load {r['nb_offload_median_s']:.2f} s, "
                f"{med(r['nb_offload_gbps']):.2f} GB/s against the drive's {r['drive_median_gbps']:.2f} GB/s: "
                f"{r['share_median_pct']:.1f} % (median of the rounds' shares; target >= {r['target_pct']:.0f} %): "
                f"{ok}{ref}")
    return (f"fp32 checkpoint as bf16 ({r['bytes'] / 1e9:.1f} GB): host peak {r['sampled_peak'] / GiB:.2f} GiB "
            f"sampled, {r['stats_host_peak'] / GiB:.2f} GiB by llm.stats, of cpu={r['cpu_budget'] / GiB:.2f} GiB: "
            f"{max(r['sampled_over_budget'], r['stats_over_budget']):.2f}x (target <= {r['target']}x): {ok}; "
            f"load {r['load_s']:.2f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="warm,cold,fp32", help="comma list of warm, cold, fp32")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the warm and cold cases")
    ap.add_argument("--folder", default=tempfile.gettempdir(),
                    help="where the checkpoints are built (and found again by later runs)")
    ap.add_argument("--gpu", default="4GiB", help="nb_offload's gpu budget in the warm and cold cases")
    ap.add_argument("--fp32-gpu", default="1.5GiB",
                    help="the fp32 case's gpu budget (1GiB is under its plan's minimum at the default context)")
    ap.add_argument("--fp32-layers", type=int, default=8)
    ap.add_argument("--fp32-headroom", default="64MiB", help="the fp32 case's cpu= over what its plan needs")
    ap.add_argument("--cold-reference", action="store_true", help="also time from_pretrained cold, once")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)   # fp32 path on the CPU, tiny model
    ap.add_argument("--child", choices=("plan", "load"), help=argparse.SUPPRESS)
    ap.add_argument("--child-args", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, json.loads(args.child_args))
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - {"warm", "cold", "fp32"}
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}")
    import torch
    import transformers

    import nb_offload
    transformers.utils.logging.disable_progress_bar()
    if args.smoke:
        cases = ["fp32"]
        if args.fp32_headroom == ap.get_default("fp32_headroom"):
            args.fp32_headroom = "16MiB"
    elif not torch.cuda.is_available():
        sys.exit("bench_load.py needs a CUDA card (--smoke runs the fp32 path on the CPU)")
    else:
        torch.zeros(1, device="cuda")       # the CUDA context, before any timed load
        # and the code both loaders run (a notebook pays these imports once, not per load)
        for mod in ("transformers.modeling_utils", "transformers.core_model_loading", "transformers.generation.utils",
                    "transformers.models.llama.modeling_llama", "nb_offload.loader"):
            try:
                importlib.import_module(mod)
            except ImportError:
                pass
    out = {"kind": "load",
           "meta": {"card": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
                    "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                    "transformers": transformers.__version__, "nb_offload": nb_offload.__version__,
                    "cpus": os.cpu_count(), "repeats": args.repeats, "targets": TARGETS,
                    "argv": sys.argv[1:]},
           "cases": {}}

    def save():
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1)

    big = os.path.join(args.folder, "nb_offload-bench-7b")      # bench_offload.py's default: shared
    small = os.path.join(args.folder, "nb_offload-smoke-fp32" if args.smoke
                         else f"nb_offload-bench-fp32-{args.fp32_layers}layers")
    for name in cases:
        t0 = time.perf_counter()
        try:
            if name == "fp32":
                if args.smoke:
                    from nb_offload.tiny import make_tiny_model
                    if not os.path.isfile(os.path.join(small, "config.json")):
                        make_tiny_model(small, "llama", dtype="float32", tokenizer=False, hidden_size=512,
                                        intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                                        num_key_value_heads=4, vocab_size=8000)
                    info = checkpoint_info(small)
                else:
                    info = ensure_built(small, args.fp32_layers, "float32")
                row = case_fp32(args, small, info)
            else:
                info = ensure_built(big, 32, "bfloat16")
                row = (case_warm if name == "warm" else case_cold)(args, big, info)
        except Exception:
            traceback.print_exc()
            row = {"error": traceback.format_exc(limit=3)}
        row["case_s"] = time.perf_counter() - t0
        out["cases"][name] = row
        save()
        print(f"[{name}: {row['case_s']:.0f} s]", flush=True)
    print("\n== summary ==")
    for name, row in out["cases"].items():
        print(summary(name, row))


if __name__ == "__main__":
    main()
