"""How much host memory does a CPU load and generate take, against the ``cpu=`` budget?

Each configuration runs in a fresh subprocess:

1. build (once, cached under /tmp) a 24-layer llama whose float32 weights (~282 MB) are well
   above both budgets, so ``cpu=120MiB`` and ``cpu=200MiB`` both stream blocks from disk;
2. import torch, transformers and nb_offload (and start a sampler thread), then take the
   baseline: RssAnon + RssShmem from /proc/self/status;
3. ``nb_offload.load(folder, device="cpu", cpu=BUDGET, disk=tmpdir, progress=False)``, with
   every phase of the load timed and its peak taken from the sampler (every 2 ms);
4. ``generate`` 32 new tokens greedily from a 16-token prompt, peak from the sampler;
5. print growth after load, peak during load, peak during generate, against the allowance
   ``budget * 1.05 + 64 MiB``, plus the plan's figures and a /proc/self/smaps breakdown of
   anonymous memory (main heap, malloc arenas of other threads, large mmapped chunks, stacks).

Experiments (``--exp``) change one thing each, without editing the package: environment
variables for glibc malloc, ``mallopt``/``malloc_trim`` through ctypes, load options, or
monkeypatches of nb_offload functions. See EXPERIMENTS below.

    .venv/bin/python benchmarks/rss/measure.py                         # base, 120MiB and 200MiB
    .venv/bin/python benchmarks/rss/measure.py --exp base,warm,arena2,mmap1m --reps 2
    .venv/bin/python benchmarks/rss/measure.py --list                  # what each experiment does
    .venv/bin/python benchmarks/rss/measure.py --child --budget 120MiB --exp base   # one run, JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.path.join(tempfile.gettempdir(), "nb_rss")
MiB = 2**20
SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=24, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=1000)
# "fp32": checkpoint already in the load dtype: units are "direct" (disk units read from the
#   safetensors file itself, cpu units read straight into their buffer; no offload cache).
# "bf16": a bfloat16 checkpoint loaded as float32: every unit goes through
#   Storage.read_tensors -> pack -> host_copy, and disk units are written to the offload cache.
# "fp32tok32k": the fp32 weights with a 32k-token byte-level BPE tokenizer (tokenizer.py builds it),
#   to see what a tokenizer of a real vocabulary adds at load.
MODELS = {"fp32": dict(save="float32", load=None), "bf16": dict(save="bfloat16", load="float32"),
          "fp32tok32k": dict(save="float32", load=None)}
PROMPT, NEW = 16, 32

# name -> (what it does, env vars, load kwargs)
EXPERIMENTS = {
    "base": ("as a user would load", {}, {}),
    "preimport": ("import the modeling/generation/tokenizer/accelerate/safetensors code and nb_offload's "
                  "modules before the baseline", {}, {}),
    "warm": ("load+generate+unload a 1-layer model of the same width before the baseline "
             "(all first-use costs: imports, kernels, thread pools)", {}, {}),
    "no_tok": ("OffloadedModel._load_tokenizer patched to return None", {}, {}),
    "arena2": ("MALLOC_ARENA_MAX=2", {"MALLOC_ARENA_MAX": "2"}, {}),
    "arena1": ("MALLOC_ARENA_MAX=1", {"MALLOC_ARENA_MAX": "1"}, {}),
    "mmap64k": ("MALLOC_MMAP_THRESHOLD_=65536 (fixed threshold: no dynamic raise)",
                {"MALLOC_MMAP_THRESHOLD_": "65536"}, {}),
    "mmap1m": ("mallopt(M_MMAP_THRESHOLD, 1 MiB) at run time, after the baseline", {}, {}),
    "mmap1m_trim": ("mallopt(M_MMAP_THRESHOLD, 1 MiB) + mallopt(M_TRIM_THRESHOLD, 1 MiB) after the baseline",
                    {}, {}),
    "trim": ("malloc_trim(0) after load (and before reading after-generate)", {}, {}),
    "trim_unit": ("malloc_trim(0) after each unit placed (Storage.place wrapped)", {}, {}),
    "rt1": ("read_threads=1 (no I/O pool)", {}, {"read_threads": 1}),
    "prefetch1": ("prefetch=1 (2 RAM slots instead of 3)", {}, {"prefetch": 1}),
    "nohold": ("hold_spare=False", {}, {"hold_spare": False}),
    "notrace": ("trace=False", {}, {"trace": False}),
    "nosplit": ("split_blocks=False", {}, {"split_blocks": False}),
    "dropcache": ("drop_page_cache=True (O_DIRECT reads through the per-thread 4 MiB bounce buffers)",
                  {}, {"drop_page_cache": True}),
    "omp1": ("OMP_NUM_THREADS=1", {"OMP_NUM_THREADS": "1"}, {}),
    "static": ("generate(..., cache_implementation=\"static\"): the KV cache allocated once at its full length "
               "instead of torch.cat'ed every step", {}, {}),
    "trim_step": ("malloc_trim(0) after every forward pass (Engine._root_post wrapped)", {}, {}),
    "bounce256k": ("nb_offload.uncached.BOUNCE = 256 KiB (per-thread O_DIRECT bounce buffer; use with dropcache)",
                   {}, {}),
    "charge": ("planner charges the process growth of the load's inspection phase (imports, meta model) to the "
               "cpu budget: footprint()['runtime'] = growth - NB_RSS_FREE_MIB (default 0)", {}, {}),
    "chargeN": ("as charge, with N MiB of that growth left uncharged (charge0, charge32, charge64)", {}, {}),
    "inplace": ("Storage.place patched: non-direct units converted tensor by tensor straight into their final "
                "buffer (cpu tier) or into one reused scratch buffer before the cache write (disk tier)", {}, {}),
    "tokfirst": ("the tokenizer is loaded inside the inspection phase (so chargeN counts it) and handed to "
                 "OffloadedModel._load_tokenizer", {}, {}),
    "trim_mat": ("malloc_trim(0) once, after Storage.materialize", {}, {}),
    "mmK": ("mallopt(M_MMAP_THRESHOLD, K KiB) right before load() (mm128, mm256, mm512 ...)", {}, {}),
    "mm64rt": ("mallopt(M_MMAP_THRESHOLD, 64 KiB) at run time, right before load() (what a call in loader.load "
               "would do)", {}, {}),
    "ctx256": ("context=256", {}, {"context": 256}),
}


# -- measuring ------------------------------------------------------------------------------
def rss_anon_shmem() -> int:
    anon = shmem = 0
    with open("/proc/self/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith(b"RssShmem:"):
                shmem = int(line.split()[1]) * 1024
    return anon + shmem


def rss_file() -> int:
    with open("/proc/self/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"RssFile:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """RssAnon+RssShmem every ``period`` seconds, kept as a time series."""

    def __init__(self, period=0.002):
        super().__init__(daemon=True, name="rss-sampler")
        self.period = period
        self.series = []            # (t, bytes)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.series.append((time.perf_counter(), rss_anon_shmem()))
            time.sleep(self.period)

    def peak(self, t0, t1, *known):
        """The largest sample in [t0, t1], or of ``known`` values (e.g. read at t0 and t1)."""
        vals = [v for t, v in self.series if t0 <= t <= t1]
        return max(vals + list(known))


def smaps_breakdown() -> dict:
    """Anonymous bytes by kind of mapping (RSS of pages that count in RssAnon/RssShmem)."""
    out = {"heap": 0, "arenas": 0, "stacks": 0, "mmap_chunks": 0, "file_private_anon": 0, "shmem": 0,
           "file_rss": 0, "n_arenas": 0, "n_chunks": 0, "safetensors_rss": 0}
    cur = None
    with open("/proc/self/smaps") as fh:
        lines = fh.read().splitlines()
    entries = []
    for line in lines:
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            cur = dict(lo=lo, hi=hi, perms=parts[1], inode=parts[4], path=" ".join(parts[5:]), fields={})
            entries.append(cur)
        elif cur is not None and parts and parts[0].endswith(":") and len(parts) >= 2:
            try:
                cur["fields"][parts[0][:-1]] = int(parts[1]) * 1024
            except ValueError:
                pass
    for i, e in enumerate(entries):
        f = e["fields"]
        anon = f.get("Anonymous", 0)
        size = e["hi"] - e["lo"]
        path = e["path"]
        if path.endswith(".safetensors"):
            out["safetensors_rss"] += f.get("Rss", 0)
        if path == "[heap]":
            out["heap"] += anon
        elif path.startswith("[stack"):
            out["stacks"] += anon
        elif e["inode"] != "0" and path and not path.startswith("/dev/zero") and not path.startswith("/SYSV"):
            out["file_private_anon"] += anon
            out["file_rss"] += f.get("Rss", 0) - anon
            if path.startswith("/memfd") or "(deleted)" in path or path.startswith("/dev/shm"):
                out["shmem"] += f.get("Rss", 0) - anon
        elif path == "" or path.startswith("[anon"):
            prev = entries[i - 1] if i else None
            # glibc's non-main arenas: heaps mapped at 64 MiB alignment (HEAP_MAX_SIZE)
            if e["lo"] % (64 * MiB) == 0 and size <= 64 * MiB and "rw" in e["perms"]:
                out["arenas"] += anon
                out["n_arenas"] += 1
            # thread stacks: 8 MiB rw mapping right above a 4 KiB guard page
            elif (prev is not None and prev["perms"].startswith("---") and prev["hi"] == e["lo"]
                  and prev["hi"] - prev["lo"] <= 64 * 1024 and size in (8 * MiB, 8 * MiB - 4096, 8 * MiB + 4096)):
                out["stacks"] += anon
            else:
                out["mmap_chunks"] += anon
                if anon:
                    out["n_chunks"] += 1
        else:
            out["shmem"] += f.get("Rss", 0)
    return out


def libc():
    import ctypes
    return ctypes.CDLL("libc.so.6")


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8


# -- the model --------------------------------------------------------------------------------
def model_folder(kind: str) -> str:
    folder = os.path.join(CACHE, f"llama24-{kind}")
    if kind == "fp32tok32k":
        if not os.path.isdir(folder):
            from tokenizer import build
            weights, tok = model_folder("fp32"), build(32_000)
            os.makedirs(folder + ".tmp", exist_ok=True)
            for src in (weights, tok):
                for name in os.listdir(src):
                    if src == tok or not name.startswith(("tokenizer", "special_tokens", "chat_template")):
                        os.symlink(os.path.join(src, name), os.path.join(folder + ".tmp", name))
            os.replace(folder + ".tmp", folder)
        return folder
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    code = ("import sys; from nb_offload.tiny import make_tiny_model; "
            f"make_tiny_model(sys.argv[1], 'llama', dtype={MODELS[kind]['save']!r}, **{SHAPE!r})")
    tmp = folder + ".tmp"
    subprocess.run([sys.executable, "-c", code, tmp], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    os.replace(tmp, folder)
    return folder


def warm_folder() -> str:
    folder = os.path.join(CACHE, "llama1-warm")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    shape = dict(SHAPE, num_hidden_layers=1)
    code = ("import sys; from nb_offload.tiny import make_tiny_model; "
            f"make_tiny_model(sys.argv[1], 'llama', **{shape!r})")
    tmp = folder + ".tmp"
    subprocess.run([sys.executable, "-c", code, tmp], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    os.replace(tmp, folder)
    return folder


def source_root(src: str) -> str:
    """Where to import nb_offload from: "worktree" (this checkout as it is now), or a commit
    ("HEAD", a sha), extracted read-only with ``git archive`` under /tmp (other people may be
    editing the work tree while this runs)."""
    if src == "worktree":
        return ROOT
    sha = subprocess.run(["git", "rev-parse", "--short", src], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    dest = os.path.join(CACHE, f"src-{sha}")
    if not os.path.isdir(os.path.join(dest, "nb_offload")):
        os.makedirs(dest + ".tmp", exist_ok=True)
        tar = subprocess.run(["git", "archive", sha, "nb_offload"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest + ".tmp"], input=tar, check=True)
        os.replace(dest + ".tmp", dest)
    return dest


# -- one run (child) ------------------------------------------------------------------------------
def child(args):
    import gc
    import tempfile
    exp = args.exp
    mods = set(exp.split("+"))
    sampler = Sampler()
    sampler.start()
    import torch
    import transformers  # noqa: F401

    import nb_offload
    torch.manual_seed(0)
    folder = args.folder
    disk = tempfile.mkdtemp(prefix="nb_rss_disk-", dir="/tmp")
    import atexit
    import shutil
    atexit.register(shutil.rmtree, disk, True)

    if "preimport" in mods:
        import accelerate  # noqa: F401
        import safetensors.torch  # noqa: F401
        import tokenizers  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: F401
        from transformers.generation import utils  # noqa: F401
        from transformers.models.llama import modeling_llama  # noqa: F401

        import nb_offload.engine
        import nb_offload.loader  # noqa: F401,E401
        import nb_offload.model
        import nb_offload.pieces  # noqa: F401,E401
        import nb_offload.spare
        import nb_offload.storage
        import nb_offload.uncached
        AutoConfig.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
    if "warm" in mods:
        w = nb_offload.load(warm_folder(), device="cpu", cpu="100MiB", disk=disk, progress=False,
                            pins={"model.layers.*": "disk"})
        w.generate(torch.randint(3, 300, (1, PROMPT)), max_new_tokens=4, do_sample=False)
        w.unload()
        del w
        gc.collect()
        libc().malloc_trim(0)
    if args.tracemalloc:
        import tracemalloc
        tracemalloc.start(8)

    gc.collect()
    time.sleep(0.05)
    n_mod0 = len(sys.modules)
    base = rss_anon_shmem()
    file0 = rss_file()
    smaps0 = smaps_breakdown()
    if args.tracemalloc:
        import tracemalloc
        snap0 = tracemalloc.take_snapshot()

    # patches, after the baseline: importing nb_offload's submodules is part of what a load costs
    from nb_offload import loader as L
    from nb_offload.model import OffloadedModel
    from nb_offload.storage import Storage
    phases = []

    def timed(owner, name, label=None):
        real = getattr(owner, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            before = rss_anon_shmem()
            try:
                return real(*a, **k)
            finally:
                t1 = time.perf_counter()
                phases.append(dict(phase=label or name, before=before, after=rss_anon_shmem(), t0=t0, t1=t1))
        setattr(owner, name, wrapper)

    if "no_tok" in mods:
        OffloadedModel._load_tokenizer = lambda self: None
    if "trim_unit" in mods:
        real_place = Storage.place
        lc = libc()

        def place(self, *a, **k):
            out = real_place(self, *a, **k)
            lc.malloc_trim(0)
            return out
        Storage.place = place
    if "trim_step" in mods:
        from nb_offload.engine import Engine
        name = "_root_post" if hasattr(Engine, "_root_post") else "_end_step"   # HEAD / newer engine
        real_post, lc_step = getattr(Engine, name), libc()

        def root_post(self, *a):
            out = real_post(self, *a)
            lc_step.malloc_trim(0)
            return out
        setattr(Engine, name, root_post)
    if "bounce256k" in mods:
        import nb_offload.uncached
        nb_offload.uncached.BOUNCE = 256 * 1024
    charge = {}
    from types import SimpleNamespace
    real_load_tok = OffloadedModel._load_tokenizer
    if "tokfirst" in mods:
        OffloadedModel._load_tokenizer = lambda self: charge.get("tok")
    charged = [m for m in mods if m.startswith("charge")]
    if charged:
        from nb_offload import planner as P
        real_fp, real_insp = P.footprint, L.Inspection
        free = int(charged[0][6:] or os.environ.get("NB_RSS_FREE_MIB", "0")) * MiB

        def insp(*a, **k):
            charge["rss0"] = rss_anon_shmem()
            out = real_insp(*a, **k)
            if "tokfirst" in mods:
                charge["tok"] = real_load_tok(SimpleNamespace(_insp=out))
            charge["rss1"] = rss_anon_shmem()
            return out

        def fp(*a, **k):
            out = real_fp(*a, **k)
            if "rss1" in charge:
                out["runtime"] = max(0, charge["rss1"] - charge["rss0"] - free)
            return out
        L.Inspection, P.footprint = insp, fp
    if "inplace" in mods:
        patch_inplace(Storage)
    if "trim_mat" in mods:
        real_mat, lc_mat = Storage.materialize, libc()

        def materialize(self, *a, **k):
            out = real_mat(self, *a, **k)
            lc_mat.malloc_trim(0)
            return out
        Storage.materialize = materialize
    timed(L, "Inspection", "inspect (config, meta model, units)")
    timed(Storage, "materialize", "materialize (read units into tiers)")
    timed(OffloadedModel, "_load_tokenizer", "tokenizer")
    timed(OffloadedModel, "_start_engine", "engine start")
    timed(OffloadedModel, "_load_generation_config", "generation config")
    timed(OffloadedModel, "_assemble", "assemble (buffers, params, tokenizer, engine)")

    if "mm64rt" in mods:
        libc().mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    for m in mods:     # mmK: mallopt(M_MMAP_THRESHOLD, K KiB) right before load()
        if m.startswith("mm") and m[2:].isdigit():
            libc().mallopt(M_MMAP_THRESHOLD, int(m[2:]) * 1024)
    if mods & {"mmap1m", "mmap1m_trim"}:
        lc = libc()
        lc.mallopt(M_MMAP_THRESHOLD, 1 * MiB)
        if "mmap1m_trim" in mods:
            lc.mallopt(M_TRIM_THRESHOLD, 1 * MiB)

    kwargs = dict(device="cpu", cpu=args.budget, disk=disk, progress=False)
    if MODELS[args.model]["load"]:
        kwargs["dtype"] = MODELS[args.model]["load"]
    for m in mods:
        kwargs.update(EXPERIMENTS.get(m, EXPERIMENTS["chargeN"])[2])
    t0 = time.perf_counter()
    try:
        llm = nb_offload.load(folder, **kwargs)
    except nb_offload.BudgetError as exc:
        print("RESULT " + json.dumps(dict(exp=exp, model=args.model, budget=args.budget, error=str(exc))))
        return
    t1 = time.perf_counter()
    after_load_raw = rss_anon_shmem()
    gc.collect()
    if "trim" in mods:
        libc().malloc_trim(0)
    after_load = rss_anon_shmem()
    smaps_load = smaps_breakdown()
    file_load = rss_file()
    n_mod1 = len(sys.modules)
    tm_top = None
    if args.tracemalloc:
        snap1 = tracemalloc.take_snapshot()
        stats = snap1.compare_to(snap0, "filename")
        tm_top = [(str(s.traceback[0].filename).replace(sys.prefix, "$venv"), s.size_diff) for s in stats[:25]]
        tm_total = sum(s.size_diff for s in stats)
        tm_overhead = tracemalloc.get_tracemalloc_memory()

    # live bytes the package holds on purpose, as torch tensors
    eng = llm._engine
    stores = llm._storage.stores
    live = dict(
        resident_weights=sum(s.flat.numel() for s in stores.values() if s.flat is not None),
        slots=sum(s.numel() for s in eng.slots),
        rest=sum(b.numel() for b in eng.rest.values()),
        buffers=sum(b.numel() * b.element_size() for b in llm.model.buffers()),
    )
    plan = llm.plan

    ids = torch.randint(3, 300, (1, args.prompt))
    g0 = time.perf_counter()
    held_bytes = {}
    real_hold = type(eng).hold

    def hold(self, indices):
        real_hold(self, indices)
        held_bytes["n"] = len(self.held)
        held_bytes["bytes"] = sum(b.numel() for _, b in self.held.values())
    type(eng).hold = hold
    gen_kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    if "static" in mods:
        gen_kw["cache_implementation"] = "static"
    gen_peaks = []
    with torch.inference_mode():
        for k in range(args.gens):
            s0 = time.perf_counter()
            if args.profile and k == 0:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    out = llm.generate(ids, **gen_kw)
            else:
                out = llm.generate(ids, **gen_kw)
            gen_peaks.append((s0, time.perf_counter(), rss_anon_shmem()))
    g1 = time.perf_counter()
    assert out.shape[1] == args.prompt + NEW
    after_gen_raw = rss_anon_shmem()
    gc.collect()
    if "trim" in mods:
        libc().malloc_trim(0)
    after_gen = rss_anon_shmem()
    smaps_gen = smaps_breakdown()
    time.sleep(0.01)
    sampler.stop.set()
    sampler.join()
    prof_info = None
    if args.profile:
        prof_info = torch_alloc_peak(prof)

    res = dict(
        exp=exp, model=args.model, prompt=args.prompt, gens=args.gens, nb_offload=os.path.dirname(nb_offload.__file__),
        budget=args.budget, budget_bytes=plan.budgets["cpu"],
        allowance=int(plan.budgets["cpu"] * 1.05 + 64 * MiB),
        base=base, after_load=after_load - base, after_load_raw=after_load_raw - base,
        peak_load=sampler.peak(t0, t1, after_load_raw) - base, peak_gen=sampler.peak(g0, g1, after_gen_raw) - base,
        after_gen=after_gen - base, gen_peaks=[sampler.peak(a, b, v) - base for a, b, v in gen_peaks],
        after_gen_raw=after_gen_raw - base,
        file_growth_load=file_load - file0,
        load_s=t1 - t0, gen_s=g1 - g0,
        plan_used=plan.used(), plan_totals=plan.totals(), reserved=plan.reserved,
        split=plan.split_blocks, streamed=sum(1 for e in plan if e.tier == "disk"),
        live=live, held=held_bytes, modules_imported=n_mod1 - n_mod0,
        smaps0=smaps0, smaps_load=smaps_load, smaps_gen=smaps_gen,
        phases=[dict(p, peak=sampler.peak(p["t0"], p["t1"], p["before"], p["after"]) - base, before=p["before"] - base,
                     after=p["after"] - base) for p in phases],
        threads=threading.active_count(), tracemalloc=tm_top, profile=prof_info,
    )
    if args.tracemalloc:
        res["tracemalloc_total"] = tm_total
        res["tracemalloc_overhead"] = tm_overhead
    if args.series:
        res["series"] = [(t - t0, v - base) for t, v in sampler.series]
    print("RESULT " + json.dumps(res))
    llm.unload()


def patch_inplace(Storage):
    """The fix proposed for storage.py, as a monkeypatch: no full-size temporaries per unit."""
    import torch

    from nb_offload.storage import UnitStore
    from nb_offload.tiers import alloc_host, pack, param_views
    real_place, real_mat = Storage.place, Storage.materialize

    def fill(self, unit, flat):
        ckpt = self.insp.checkpoint
        names = {n for s in unit.params for n in s.names}
        if any(k not in names for k in unit.checkpoint_keys):     # transformers' conversions: as before
            pack(unit, self.read_tensors(unit), flat)
            return
        for slot, view in zip(unit.params, param_views(unit, flat)):
            view.copy_(ckpt.get(next(n for n in slot.names if n in ckpt.tensors)))   # converts the dtype

    def place(self, unit, tier, resident_tier):
        if self.stores.get(unit.index) is None and not unit.direct and not self.cuda:
            if tier == "cpu":
                flat = alloc_host(unit.nbytes, pinned=False)
                fill(self, unit, flat)
                return UnitStore(tier, flat=flat)
            if tier == "disk" and self.cache is not None:
                if not self.cache.has(unit):
                    scratch = getattr(self, "_scratch", None)
                    if scratch is None or scratch.numel() < unit.nbytes:
                        biggest = max(u.nbytes for u in self.insp.units if not u.direct)
                        scratch = self._scratch = torch.empty(biggest, dtype=torch.uint8)
                    fill(self, unit, scratch[:unit.nbytes])
                    self.cache.write(unit, scratch[:unit.nbytes])
                return UnitStore(tier, extents=self.cache.extents(unit))
        return real_place(self, unit, tier, resident_tier)

    def materialize(self, *a, **k):
        try:
            return real_mat(self, *a, **k)
        finally:
            self._scratch = None
    Storage.place, Storage.materialize = place, materialize


def torch_alloc_peak(prof):
    """Peak of bytes allocated through torch's CPU allocator during the profiled region."""
    evs = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]":
            evs.append((e.start_ns(), e.nbytes()))
    evs.sort()
    cur = peak = 0
    for _, n in evs:
        cur += n
        peak = max(peak, cur)
    by_op = {}
    for e in prof.key_averages():
        if e.cpu_memory_usage > 0:
            by_op[e.key] = e.cpu_memory_usage
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:10]
    return dict(peak=peak, net=cur, n_allocs=sum(1 for _, n in evs if n > 0), top_ops=top)


# -- the table (parent) --------------------------------------------------------------------------
def run_one(budget, exp, model, extra=(), src="HEAD"):
    env = dict(os.environ, PYTHONPATH=source_root(src), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for m in exp.split("+"):
        env.update(EXPERIMENTS.get(m, EXPERIMENTS["chargeN"])[1])
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--budget", budget, "--exp", exp,
           "--model", model, "--folder", model_folder(model), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{exp} {budget}: rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def mb(n):
    return f"{n / MiB:7.1f}"


def table(rows):
    head = (f"{'exp':12} {'model':5} {'prm':>4} {'budget':>7} {'allow':>7} {'plan cpu':>8} {'weights':>8} {'disk':>7} "
            f"{'load':>7} {'pk load':>7} {'pk gen':>7} {'aft gen':>7} {'held':>6} {'ok':>3}")
    print("MiB (2^20 bytes); growth of RssAnon+RssShmem over the baseline")
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['exp']:12} {r['model']:5} {r['budget']:>7}  BudgetError: {r['error'][:150]}")
            continue
        ok = "yes" if max(r["peak_load"], r["peak_gen"]) <= r["allowance"] else "NO"
        print(f"{r['exp']:12} {r['model']:5} {r.get('prompt', PROMPT):>4} {mb(r['budget_bytes'])} {mb(r['allowance'])} "
              f"{mb(r['plan_used']['cpu'])} "
              f"{mb(r['plan_totals']['cpu'])} {mb(r['plan_totals']['disk'])} {mb(r['after_load'])} "
              f"{mb(r['peak_load'])} {mb(r['peak_gen'])} {mb(r['after_gen'])} "
              f"{r['held'].get('bytes', 0) / MiB:6.1f} {ok:>3}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="120MiB,200MiB")
    ap.add_argument("--exp", default="base")
    ap.add_argument("--model", default="fp32", choices=sorted(MODELS))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every run's full record here")
    ap.add_argument("--detail", action="store_true", help="print phases and smaps per run")
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--profile", action="store_true", help="torch profiler's allocation peak in generate")
    ap.add_argument("--series", action="store_true")
    ap.add_argument("--gens", type=int, default=1, help="generates in a row (peak over all)")
    ap.add_argument("--prompt", type=int, default=PROMPT, help="prompt tokens (the plan's context is 512)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", default=None, help="print the table of saved --json files (comma-separated)")
    ap.add_argument("--src", default="HEAD", help='nb_offload to measure: "HEAD" (default; a git archive of '
                    'the commit under /tmp), another commit, or "worktree"')
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--budget")
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.table:
        rows = [r for path in args.table.split(",") for r in json.load(open(path))]
        table(rows)
        if args.detail:
            for r in rows:
                if "error" not in r:
                    detail(r)
        return
    if args.list:
        for k, (what, env, kw) in EXPERIMENTS.items():
            print(f"{k:12} {what}" + (f"  env={env}" if env else "") + (f"  load={kw}" if kw else ""))
        return
    if args.child:
        return child(args)
    os.makedirs(CACHE, exist_ok=True)
    extra = [f for f, on in (("--tracemalloc", args.tracemalloc), ("--profile", args.profile),
                             ("--series", args.series)) if on] + \
                ["--gens", str(args.gens), "--prompt", str(args.prompt)]
    rows = []
    for exp in args.exp.split(","):
        for budget in args.budgets.split(","):
            for _ in range(args.reps):
                r = run_one(budget, exp, args.model, extra, args.src)
                r["src"] = args.src
                rows.append(r)
                if args.detail and "error" not in r:
                    detail(r)
    table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


def detail(r):
    print(f"--- {r['exp']} {r['model']} {r['budget']}{' ' + r['tag'] if r.get('tag') else ''}: plan reserved "
          + ", ".join(f"{k} {v / MiB:.1f}" for k, v in r["reserved"].items())
          + f"; split={r['split']} streamed units={r['streamed']}; live "
          + ", ".join(f"{k} {v / MiB:.1f}" for k, v in r["live"].items())
          + f"; modules imported by load {r['modules_imported']}; threads {r['threads']}")
    for p in r["phases"]:
        print(f"   {p['phase']:48} before {mb(p['before'])} after {mb(p['after'])} peak {mb(p['peak'])} "
              f"({p['t1'] - p['t0']:.2f}s)")
    for key in ("smaps0", "smaps_load", "smaps_gen"):
        s = r[key]
        print(f"   {key:10} heap {mb(s['heap'])} arenas {mb(s['arenas'])} ({s['n_arenas']}) chunks "
              f"{mb(s['mmap_chunks'])} ({s['n_chunks']}) stacks {mb(s['stacks'])} file-anon "
              f"{mb(s['file_private_anon'])} shmem {mb(s['shmem'])} safetensors rss {mb(s['safetensors_rss'])}")
    print("   peak per generate: " + " ".join(mb(v) for v in r["gen_peaks"]))
    print(f"   after load raw {mb(r['after_load_raw'])} (gc'd {mb(r['after_load'])}); RssFile growth at load "
          f"{mb(r['file_growth_load'])}; load {r['load_s']:.1f}s, gen {r['gen_s']:.1f}s")
    if r.get("tracemalloc"):
        print(f"   tracemalloc: total {mb(r['tracemalloc_total'])}, own overhead {mb(r['tracemalloc_overhead'])}")
        for f, n in r["tracemalloc"][:15]:
            print(f"      {mb(n)}  {f}")
    if r.get("profile"):
        p = r["profile"]
        print(f"   torch allocator in generate: peak {mb(p['peak'])} net {mb(p['net'])} allocs {p['n_allocs']}")
        for k, v in p["top_ops"]:
            print(f"      {mb(v)}  {k}")


if __name__ == "__main__":
    main()
