"""The fused kernels of the captured step (nb_offload/fused.py) against the eager ops, on the GPU: how
many results differ (none may), and the time of each as a CUDA graph of 32 calls, fused and eager.

    python3 benchmarks/fused_check.py
"""

import time

import torch

from nb_offload import fused, fused_kernels


def graph_us(fn, calls=32, replays=20):
    """Microseconds a call of ``fn`` takes, captured 32 times in one CUDA graph, replayed."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / replays / calls


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    for dtype in (torch.bfloat16, torch.float16):
        t0 = time.perf_counter()
        differs = fused.self_test(dev, dtype)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fused.self_test(dev, dtype)
        print(f"{dtype}: self_test: {differs or 'every result equal'}; {first:.2f} s the first time (compiling, "
              f"triton's cache as this machine had it), {time.perf_counter() - t0:.3f} s again")
        every = torch.arange(1 << 16, dtype=torch.int32, device=dev).to(torch.int16).view(dtype)
        every = every[torch.isfinite(every)].contiguous()
        up = torch.ones_like(every)
        got, want = fused_kernels.silu_mul(every, up, torch.empty_like(every)), torch.nn.functional.silu(every)
        bad = (got.view(torch.int16) != want.view(torch.int16)).nonzero().flatten()
        print(f"  SiLU over every finite value: {bad.numel()} differ in a bit" + "".join(
            f"; silu({every[i].item():.4g}) = {want[i].item():.4g}, fused {got[i].item():.4g}" for i in bad[:4]))
    dt = torch.bfloat16
    x = torch.randn(1, 1, 4096, device=dev).to(dt)
    w = torch.randn(4096, device=dev).to(dt)
    g, u = torch.randn(1, 1, 11008, device=dev).to(dt), torch.randn(1, 1, 11008, device=dev).to(dt)
    q = torch.randn(1, 1, 32, 128, device=dev).to(dt).transpose(1, 2)
    k = torch.randn(1, 1, 32, 128, device=dev).to(dt).transpose(1, 2)
    c, s = torch.randn(1, 1, 128, device=dev).to(dt), torch.randn(1, 1, 128, device=dev).to(dt)

    def norm_eager():
        h = x.to(torch.float32)
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt)

    def norm_fused():
        return fused_kernels.norm_scale(x, fused_kernels.squares(x).mean(-1, keepdim=True), w, 1e-6,
                                        torch.empty_like(x))

    def rotary_eager():
        cc, ss = c.unsqueeze(1), s.unsqueeze(1)
        return q * cc + fused._rotate_half(torch, q) * ss, k * cc + fused._rotate_half(torch, k) * ss

    def rotary_fused():
        return fused_kernels.rotary(q, k, c, s, torch.empty_like(q), torch.empty_like(k))
    pairs = {"RMSNorm 4096": (norm_eager, norm_fused),
             "SiLU times up 11008": (lambda: torch.nn.functional.silu(g) * u,
                                     lambda: fused_kernels.silu_mul(g, u, torch.empty_like(g))),
             "rotary q, k 32x128": (rotary_eager, rotary_fused)}
    for name, (eager, fast) in pairs.items():
        e, f = graph_us(eager), graph_us(fast)
        print(f"{name}: eager ops {e:.1f} us, fused {f:.1f} us a call ({e / f:.1f}x)")


if __name__ == "__main__":
    main()
