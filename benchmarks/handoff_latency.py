"""How long a CPU block's output takes to reach the GPU while the link streams (hybrid.py, handoff.py; issue 16).

A hybrid decode step hands each CPU block's output (one token's hidden state: 8 KiB for LLaMA-7B) back to the
GPU with a small host-to-device copy on the GPU's stream, while the copy stream is moving the next streamed units'
pieces (90-134 MiB each, 2-3 ms apiece) the same way. If the small copy queues behind the piece in flight, every
CPU block waits up to a piece's time for its output: at 4 GiB, 11 CPU blocks a step, up to 25 ms of a 138 ms step
the step model doesn't see. This times, with CUDA events on a stream of its own, each small transfer: alone, and
while another stream copies pieces back to back; both by the copy engine (``copy_``) and by a kernel reading the
page-locked buffer where it is (``fetch.in_place``, read by ``fetch.read_fresh`` as the handoff reads it), and the
input's way too (device to host). Medians, 90th percentiles and maxima in microseconds. Then whether such a kernel,
replayed in a CUDA graph after each host write, reads the host's last bytes: with the handoff's volatile loads and
with a plain elementwise kernel (a count of stale reads).

    PYTHONPATH=. python3 benchmarks/handoff_latency.py --json out.json [--bytes 8192] [--piece-mib 134]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_offload import row_recorder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bytes", type=int, default=8192, help="the handed-off tensor's bytes (one LLaMA-7B token)")
    ap.add_argument("--piece-mib", type=int, default=134, help="the streamed pieces' size")
    ap.add_argument("--pieces", type=int, default=8, help="distinct page-locked pieces the link copies in turn")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from nb_offload import fetch
    device = torch.device("cuda")
    out = {"meta": {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__, "bytes": args.bytes, "piece_mib": args.piece_mib}, "rows": []}
    add = row_recorder(out, args.json, digits=1)
    piece = args.piece_mib << 20
    sources = [torch.full((piece,), k, dtype=torch.uint8, pin_memory=True) for k in range(args.pieces)]
    target = torch.empty(piece, dtype=torch.uint8, device=device)
    host = torch.arange(args.bytes, dtype=torch.int64).to(torch.uint8).pin_memory()
    on_device = torch.empty(args.bytes, dtype=torch.uint8, device=device)
    back = torch.empty(args.bytes, dtype=torch.uint8, pin_memory=True)
    mapped = fetch.in_place(host, device)       # the GPU's view of the page-locked bytes
    link, own = torch.cuda.Stream(device), torch.cuda.Stream(device)

    ways = {"copy engine, host to device": lambda: on_device.copy_(host, non_blocking=True),
            "kernel reading host memory (fetch.read_fresh)": lambda: fetch.read_fresh(mapped, on_device),
            "copy engine, device to host": lambda: back.copy_(on_device, non_blocking=True)}
    for way, transfer in ways.items():
        for beside in (False, True):
            torch.cuda.synchronize()
            marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                     for _ in range(args.samples)]
            if beside:      # pieces enough to keep the link busy past the last sample (about 0.2 ms apart)
                with torch.cuda.stream(link):
                    for k in range(max(16, args.samples // 4)):
                        target.copy_(sources[k % len(sources)], non_blocking=True)
            with torch.cuda.stream(own):
                for start, end in marks:
                    torch.cuda._sleep(200_000)      # samples apart, at points of a piece's copy that vary
                    start.record(own)
                    transfer()
                    end.record(own)
            torch.cuda.synchronize()
            us = sorted(1e3 * start.elapsed_time(end) for start, end in marks)
            add(way=way, beside_pieces=beside, median_us=statistics.median(us), p90_us=us[int(0.9 * len(us))],
                max_us=us[-1])
    torch.cuda.synchronize()
    assert torch.equal(on_device.cpu(), host), "the kernel's read differs from the host's bytes"
    fresh(torch, fetch, add, host, mapped, on_device)


def fresh(torch, fetch, add, host, mapped, on_device, rounds: int = 200):
    """Whether a kernel reading page-locked memory in place sees what the host wrote since its last read: a
    CUDA graph of one read replayed after each host write (as a hybrid step's replay reads a CPU block's output
    where the last step's was), by the handoff's volatile loads and by a plain elementwise kernel; the reads whose
    bytes weren't the host's last."""
    reads = {"fetch.read_fresh (volatile loads)": lambda: fetch.read_fresh(mapped, on_device),
             "torch.bitwise_or (plain loads)": lambda: torch.bitwise_or(mapped, 0, out=on_device)}
    for way, read in reads.items():
        read()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            read()
        stale = 0
        for k in range(rounds):
            host.fill_(k % 251)
            graph.replay()
            torch.cuda.synchronize()
            stale += int(not torch.equal(on_device.cpu(), host))
        add(way=way, fresh_check_rounds=rounds, stale_reads=stale)


if __name__ == "__main__":
    main()
