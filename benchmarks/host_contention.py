"""Do page-cache reads and host-to-GPU copies slow each other down? (case 5 with a warm cache)

Times, alone and then at once: a page-locked host-to-GPU copy loop, and nb_offload's reader
copying a warm (cached) file into page-locked memory. If the two together move fewer bytes a
second than each alone, they share a limit of the host (its memory bandwidth), which the
issue's bound (each rate measured alone, perfect overlap) does not count.

    PYTHONPATH=. python3 benchmarks/host_contention.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

GiB = 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=int, default=4)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from nb_offload.tiers import read_extents
    n = args.gib * GiB
    path = os.path.join(tempfile.mkdtemp(), "warm.bin")
    block = os.urandom(64 * 2**20)
    with open(path, "wb") as fh:
        for _ in range(n // len(block)):
            fh.write(block)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    landing = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    pool = ThreadPoolExecutor(args.threads)
    read_extents([(path, 0, n, 0)], landing, pool=pool)            # warm the page cache

    def read_once():
        t0 = time.perf_counter()
        read_extents([(path, 0, n, 0)], landing, pool=pool)
        return n / (time.perf_counter() - t0) / 1e9

    def copy_once():
        with torch.cuda.stream(stream):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dev.copy_(host, non_blocking=True)
            e.record()
        e.synchronize()
        return n / (s.elapsed_time(e) / 1e3) / 1e9

    def both_once():
        """Copies back to back on a side thread for as long as one read takes."""
        rates, stop = [], threading.Event()

        def copies():
            while not stop.is_set():
                rates.append(copy_once())
        t = threading.Thread(target=copies)
        t.start()
        time.sleep(0.05)
        r = read_once()
        stop.set()
        t.join()
        return r, statistics.median(rates)

    out = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "gib": args.gib,
           "threads": args.threads, "copy_alone": [], "read_alone": [], "read_both": [], "copy_both": []}
    for _ in range(args.rounds):
        out["copy_alone"].append(copy_once())
        out["read_alone"].append(read_once())
        r, c = both_once()
        out["read_both"].append(r)
        out["copy_both"].append(c)
    med = {k: statistics.median(v) for k, v in out.items() if isinstance(v, list)}
    print(f"alone: copy {med['copy_alone']:.1f} GB/s, warm read {med['read_alone']:.1f} GB/s; "
          f"at once: copy {med['copy_both']:.1f} GB/s, warm read {med['read_both']:.1f} GB/s "
          f"(rounds: {json.dumps({k: [round(x, 1) for x in v] for k, v in out.items() if isinstance(v, list)})})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    os.unlink(path)


if __name__ == "__main__":
    main()
