"""How fast one card runs the batch-1 products of a LLaMA-7B decode step, each captured in a CUDA graph
(so launch gaps don't count): the bytes a decode step must read, over the time. Shows what a captured
step can reach with torch's own kernels (the floor is every weight read once at the copy rate).

    python3 benchmarks/gemv_rates.py
"""

from __future__ import annotations

import torch


def rate(fn, nbytes, k=200):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(k):
            fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / (5 * k)
    return seconds, nbytes / seconds / 1e9


def main():
    dt = torch.bfloat16
    big = torch.empty(4 * 2**30, dtype=torch.uint8, device="cuda")
    other = torch.empty_like(big)
    _, copy_gbps = rate(lambda: other.copy_(big), 2 * big.numel(), k=5)
    print(f"device copy: {copy_gbps:.0f} GB/s (read + write)")
    shapes = {"q/k/v/o 4096x4096": (4096, 4096), "gate/up 11008x4096": (11008, 4096),
              "down 4096x11008": (4096, 11008), "lm_head 32000x4096": (32000, 4096)}
    per_step = {"q/k/v/o 4096x4096": 4 * 32, "gate/up 11008x4096": 2 * 32, "down 4096x11008": 32,
                "lm_head 32000x4096": 1}
    total = 0.0
    for name, (out_f, in_f) in shapes.items():
        # several weights in turn, so the 50 MB L2 holds none of them between calls
        ws = [torch.randn(out_f, in_f, dtype=dt, device="cuda") for _ in range(8)]
        x = torch.randn(1, 1, in_f, dtype=dt, device="cuda")
        turn = iter(range(10**9))
        seconds, gbps = rate(lambda x=x, ws=ws, turn=turn: torch.nn.functional.linear(x, ws[next(turn) % 8]),
                             out_f * in_f * 2)
        total += seconds * per_step[name]
        print(f"{name}: {seconds * 1e6:.1f} us, {gbps:.0f} GB/s")
    print(f"the step's products: {total * 1e3:.2f} ms -> at most {1 / total:.0f} tok/s from them alone")


if __name__ == "__main__":
    main()
