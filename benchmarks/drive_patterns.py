"""Why does the cold disk case read slower than the drive probe? Read the very bytes case 5
streams from disk, cold, in several orders and ways, interleaved in rounds, beside the engine
itself doing a cold generate. Prints GB/s per pattern (median of the rounds, and all).

    PYTHONPATH=. python3 benchmarks/drive_patterns.py --json out.json

Patterns (each reads every disk unit of case 5's plan once, page cache dropped before):
  engine      stream order, each unit's extents in its flat layout order (what the engine does)
  unit-sorted stream order, each unit's extents sorted by file offset
  file        every extent merged and sorted by file offset (one sweep over the files)
  file-t16    the same with 16 threads;  file-c4 / file-c64: 4 MiB / 64 MiB chunks
  file-fd     file order through one shared descriptor per file (the kernel's readahead state)
  direct      file order with O_DIRECT (aligned ranges into an aligned scratch buffer); -t4/-t16
              4/16 threads, -c4/-c32/-c64 chunks of 4/32/64 MiB
  willneed    stream order after posix_fadvise(WILLNEED) on each unit as it is queued
  lib-direct  stream order through nb_offload's own uncached reader, each unit lined up as the
              engine lines it up (what drop_page_cache=True does, without the GPU)
  generate    nb_offload itself (drop_page_cache=True): a 3-token generate, disk bytes over time;
              its chunk timeline is summed up per phase (hold, steps, release)
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_offload as bo  # noqa: E402

GiB = 2**30
MiB = 2**20


def chunked(ranges, chunk):
    out = []
    for path, off, n, dst in ranges:
        for s in range(0, n, chunk):
            out.append((path, off + s, min(chunk, n - s), dst + s))
    return out


def merge(extents):
    """Extents sorted by (file, offset), touching ones joined; destinations laid end to end."""
    rows = sorted((p, o, n) for p, o, n, _ in extents)
    out = []
    for p, o, n in rows:
        if out and out[-1][0] == p and out[-1][1] + out[-1][2] == o:
            out[-1][2] += n
        else:
            out.append([p, o, n])
    dst, res = 0, []
    for p, o, n in out:
        res.append((p, o, n, dst))
        dst += n
    return res


def read_pieces(pieces, buf, threads, *, shared_fd=False, direct=False, willneed_groups=None):
    view = memoryview(buf)
    fds = {}
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)

    def fd_for(path):
        if path not in fds:
            fds[path] = os.open(path, flags)
        return fds[path]

    if shared_fd or direct:
        for p in {pc[0] for pc in pieces}:
            fd_for(p)

    def one(path, off, n, dst):
        if direct:
            lo = off - off % 4096
            hi = -(-(off + n) // 4096) * 4096
            d0 = dst - dst % 4096
            fd = fds[path]
            done = 0
            while done < hi - lo:
                k = os.preadv(fd, [view[d0 + done:d0 + hi - lo]], lo + done)
                if k <= 0:
                    break
                done += k
            return
        fd = fds[path] if shared_fd else os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < n:
                done += os.preadv(fd, [view[dst + done:dst + n]], off + done)
        finally:
            if not shared_fd:
                os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        futs = []
        for group in (willneed_groups or [pieces]):
            if willneed_groups:
                for path, off, n, _ in group:
                    fd = os.open(path, os.O_RDONLY)
                    os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
                    os.close(fd)
            futs += [pool.submit(one, *pc) for pc in group]
        for f in futs:
            f.result()
    for fd in fds.values():
        os.close(fd)


class Timeline:
    """Every chunk read (start, end, bytes) and the engine's phase marks, during one generate."""

    def __init__(self, eng):
        from nb_offload import tiers
        self.chunks, self.marks, self.on = [], [], False
        real_piece = tiers._read_piece

        def piece(buf, addr, path, off, n, dst, **kw):
            t0 = time.perf_counter()
            real_piece(buf, addr, path, off, n, dst, **kw)
            if self.on:
                self.chunks.append((t0, time.perf_counter(), n))
        tiers._read_piece = piece
        eng.model.register_forward_pre_hook(lambda *a: self.mark("step:in"))
        eng.model.register_forward_hook(lambda *a: self.mark("step:out"))
        for name in ("hold", "release_held"):
            real = getattr(eng, name)

            def wrapped(*a, _real=real, _name=name, **k):
                if self.on:
                    self.marks.append((time.perf_counter(), _name + ":in"))
                try:
                    return _real(*a, **k)
                finally:
                    if self.on:
                        self.marks.append((time.perf_counter(), _name + ":out"))
            setattr(eng, name, wrapped)

    def mark(self, what):
        if self.on:
            self.marks.append((time.perf_counter(), what))

    def summary(self, t0, t1):
        # phases: [t0, hold out), steps between root_pre in and root_post out, release, rest
        edges = [(t0, "start")] + [(t, m) for t, m in self.marks if t0 <= t <= t1] + [(t1, "end")]
        rows = []
        for (a, ma), (b, mb) in zip(edges, edges[1:]):
            if b - a < 1e-4:
                continue
            conc = sum(max(0.0, min(e, b) - max(s, a)) for s, e, _ in self.chunks) / (b - a)
            nbytes = sum(n * max(0.0, min(e, b) - max(s, a)) / (e - s) for s, e, n in self.chunks if e > s)
            rows.append(f"  {ma:>18s} -> {mb:<18s} {1e3 * (b - a):8.1f} ms  in flight {conc:4.1f}  "
                        f"{nbytes / (b - a) / 1e9:5.2f} GB/s")
        return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "nb_offload-bench-7b"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--patterns", default="all")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="a smoke test on the CPU with a tiny model")
    args = ap.parse_args()
    import torch

    import nb_offload
    dev = "cpu" if args.tiny else "cuda"
    if args.tiny:
        from nb_offload.tiny import make_tiny_model
        args.folder = make_tiny_model(tempfile.mkdtemp(), "llama")
    elif not os.path.isfile(os.path.join(args.folder, "config.json")):
        t0 = time.perf_counter()
        bo.build(args.folder, 32)
        print(f"built and saved the model in {time.perf_counter() - t0:.0f} s", flush=True)
    # case 5's plan, as bench_offload sets it up
    gpu = {} if args.tiny else {"gpu": "4GiB"}
    probe = nb_offload.load(args.folder, cpu="100GiB", context=1024, progress=False, device=dev, **gpu)
    streamed = [e for e in probe.plan if e.tier == "cpu"]
    blk = max(e.bytes for e in streamed)
    piece = max(u.stream_nbytes for u in probe._insp.units if u.kind == "block")
    cpu_budget = len(streamed) // 2 * blk + 2 * piece
    probe.unload()
    offload = tempfile.mkdtemp(prefix="nb_offload-disk-")
    if args.tiny:       # the CPU is the compute device: the tests' tight budget
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from helpers import tight_cpu_budget
        cpu_budget = tight_cpu_budget(args.folder, offload)
    llm = nb_offload.load(args.folder, cpu=cpu_budget, disk=offload, context=None if args.tiny else 1024, device=dev,
                          drop_page_cache=True, progress=False, **gpu)
    eng = llm._engine
    disk = [i for i in eng.order if eng.sources[i].tier == "disk"]
    units = []     # (extents re-based onto one big buffer)
    base = 0
    for i in disk:
        ext = [(p, o, n, base + d) for p, o, n, d in eng.sources[i].extents]
        units.append(ext)
        base += eng.units[i].nbytes
    total = base
    print(f"{len(disk)} disk units, {total / 1e9:.2f} GB; model units on disk: "
          f"{sorted({eng.units[eng.model_unit(i)].name for i in disk})[:3]}...", flush=True)
    raw = mmap.mmap(-1, total + 2 * MiB)          # page-aligned (O_DIRECT needs it)
    buf = torch.frombuffer(raw, dtype=torch.uint8)
    buf.numpy()[:: 4096] = 0                      # fault the pages in once
    np_buf = buf.numpy()
    ids = torch.randint(3, 100 if args.tiny else 31000, (1, 16), device=dev)
    llm.generate(ids, max_new_tokens=2, do_sample=False)

    flat_all = [e for u in units for e in u]
    file_all = merge(flat_all)
    C = 16 * MiB
    patterns = {
        "engine": lambda: read_pieces(chunked(flat_all, C), np_buf, 8),
        "unit-sorted": lambda: read_pieces(
            chunked([e for u in units for e in sorted(u, key=lambda x: (x[0], x[1]))], C), np_buf, 8),
        "file": lambda: read_pieces(chunked(file_all, C), np_buf, 8),
        "file-t16": lambda: read_pieces(chunked(file_all, C), np_buf, 16),
        "file-t32": lambda: read_pieces(chunked(file_all, C), np_buf, 32),
        "file-c4": lambda: read_pieces(chunked(file_all, 4 * MiB), np_buf, 8),
        "file-c64": lambda: read_pieces(chunked(file_all, 64 * MiB), np_buf, 8),
        "file-fd": lambda: read_pieces(chunked(file_all, C), np_buf, 8, shared_fd=True),
        "direct": lambda: read_pieces(chunked(file_all, C), np_buf, 8, direct=True),
        "direct-t16": lambda: read_pieces(chunked(file_all, C), np_buf, 16, direct=True),
        "direct-t4": lambda: read_pieces(chunked(file_all, C), np_buf, 4, direct=True),
        "direct-c4": lambda: read_pieces(chunked(file_all, 4 * MiB), np_buf, 8, direct=True),
        "direct-c32": lambda: read_pieces(chunked(file_all, 32 * MiB), np_buf, 8, direct=True),
        "direct-c64": lambda: read_pieces(chunked(file_all, 64 * MiB), np_buf, 8, direct=True),
        "willneed": lambda: read_pieces(None, np_buf, 8, willneed_groups=[chunked(u, C) for u in units]),
        # the bench's own probe of a case's disk bytes (the cache was dropped just before)
        "lib-direct": lambda: bo.units_drive_rate(llm, False, uncached=True),
    }
    if args.patterns != "all":
        patterns = {k: v for k, v in patterns.items() if k in args.patterns.split(",")}

    timeline = Timeline(eng)
    phases = []

    def generate():
        d0 = llm.stats.bytes_from_disk
        timeline.chunks, timeline.marks, timeline.on = [], [], True
        t0 = time.perf_counter()
        t = bo.time_call(lambda: llm.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False))
        timeline.on = False
        read = sum(n for _, _, n in timeline.chunks)
        phases.append(f"generate: {t:.2f} s, {(llm.stats.bytes_from_disk - d0) / 1e9:.2f} GB used, "
                      f"{read / 1e9:.2f} GB read\n" + timeline.summary(t0, t0 + t))
        return (llm.stats.bytes_from_disk - d0) / t / 1e9

    rates = {k: [] for k in list(patterns) + ["generate"]}
    for r in range(args.rounds):
        for name, fn in list(patterns.items()) + [("generate", None)]:
            if not bo.drop_caches() and not args.tiny:
                print("can't drop the page cache (not root?)")
                return
            try:
                if fn is None:
                    rate = generate()
                else:
                    t0 = time.perf_counter()
                    fn()
                    rate = total / (time.perf_counter() - t0) / 1e9
            except OSError as exc:
                print(f"{name}: {exc}", flush=True)
                rate = float("nan")
            rates[name].append(rate)
            print(f"round {r} {name:12s} {rate:.3f} GB/s", flush=True)
    print("\n== the engine's generates, phase by phase ==")
    print("\n".join(phases))
    print("\n== drive patterns (cold, GB/s: median over rounds; all) ==")
    for name, xs in rates.items():
        ok = [x for x in xs if x == x]
        print(f"{name:12s} {statistics.median(ok) if ok else float('nan'):6.3f}   {[round(x, 3) for x in xs]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"card": "cpu" if args.tiny else torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "total_bytes": total, "units": len(disk), "rates": rates, "phases": phases}, fh, indent=1)
    llm.unload()


if __name__ == "__main__":
    main()
