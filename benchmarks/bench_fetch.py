"""Routed experts fetched by the GPU itself (issue 15): how fast a kernel reads expert rows straight out of
page-locked host memory over the link (zero-copy), chosen by indices that stay on the device, against the
copy engine's rate for the same bytes; whether such a fetch replays inside a CUDA graph with new indices;
and whether transformers' batched experts implementations give the same bits when the routed rows sit in
a compact buffer of k rows (the indices renumbered 0..k-1) instead of at their own rows.

Mixtral anchor shape (8 experts, 2048 x 5632, bf16) and a Qwen3-MoE-like one (128 experts, 2048 x 768).

    PYTHONPATH=. python3 benchmarks/bench_fetch.py --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_offload import row_recorder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from nb_offload import fetch
    out = {"meta": {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(),
                    "torch": torch.__version__}, "rows": []}
    add = row_recorder(out, args.json, digits=2)
    torch.manual_seed(0)
    for shape, (count, hidden, inter, k) in {"mixtral": (8, 2048, 5632, 2), "qwen3": (128, 2048, 768, 8)}.items():
        rates(torch, fetch, add, shape, count, hidden, inter, k, args.repeats)
    renumbered(torch, add)


def timed(torch, fn, repeats):
    """Median seconds of ``fn`` on the current stream, timed by events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def rates(torch, fetch, add, shape, count, hidden, inter, k, repeats):
    from nb_offload.tiers import alloc_host, release_host
    rows = [2 * inter * hidden * 2, hidden * inter * 2]        # one expert's bytes of gate_up_proj, down_proj
    layout = [0, count * rows[0]]
    total = sum(count * r for r in rows)
    host = alloc_host(total, pinned=True)
    host.view(torch.int16).random_()
    slot = torch.empty(total, dtype=torch.uint8, device="cuda")
    device_ptr = fetch.device_address(host)
    add(kind="pointer", shape=shape, same_address=device_ptr == host.data_ptr())
    chosen = torch.randperm(count)[:k].sort().values
    nbytes = k * sum(rows)

    def dma():
        for (offset, row) in zip(layout, rows):
            for e in chosen.tolist():
                slot[offset + e * row:offset + (e + 1) * row].copy_(host[offset + e * row:offset + (e + 1) * row],
                                                                    non_blocking=True)
    s = timed(torch, dma, repeats)
    add(kind="rate", shape=shape, how="copy engine", experts=k, bytes=nbytes, ms=s * 1e3, gbps=nbytes / s / 1e9)

    index = chosen.to("cuda").view(1, k)
    counts = torch.zeros(count, dtype=torch.int32, device="cuda")
    packed = [0, k * rows[0]]       # where each tensor's k rows go in the slot, packed in routing order

    def fetcher(**kw):
        return fetch.RowFetch(torch, "cuda", count, [(device_ptr + o, r) for o, r in zip(layout, rows)],
                              [slot.data_ptr() + o for o in packed], counts, **kw)

    def landed(experts):
        return all(torch.equal(slot[d + p * r:d + (p + 1) * r].cpu(), host[o + e * r:o + (e + 1) * r])
                   for o, d, r in zip(layout, packed, rows) for p, e in enumerate(experts))
    for words, block, warps in [(8, 2048, 8), (16, 1024, 4), (16, 2048, 8), (16, 4096, 16)]:
        plan = fetcher(word=words, block=block, warps=warps)
        slot.zero_()
        try:
            s = timed(torch, lambda plan=plan: plan(index), repeats)
        except Exception as exc:        # a variant the compiler refuses: say so, go on
            add(kind="rate", shape=shape, how=f"kernel {words}B x{block} w{warps}", error=str(exc)[:300])
            continue
        add(kind="rate", shape=shape, how=f"kernel {words}B x{block} w{warps}", experts=k, bytes=nbytes,
            ms=s * 1e3, gbps=nbytes / s / 1e9, equal=landed(chosen.tolist()), aligned=plan.aligned)
    # one fetch captured in a graph, replayed with other indices
    plan = fetcher()
    plan(index)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan(index)
    other = torch.randperm(count)[:k].sort().values
    index.copy_(other.view(1, k))
    slot.zero_()
    counts.zero_()
    graph.replay()
    torch.cuda.synchronize()
    good = landed(other.tolist()) and counts.cpu()[other].eq(1).all().item() and counts.sum().item() == k
    s = timed(torch, graph.replay, repeats)
    add(kind="graph", shape=shape, experts=k, bytes=nbytes, equal=good, ms=s * 1e3, gbps=nbytes / s / 1e9)
    release_host(host)


def renumbered(torch, add):
    """The experts module's output with the routed rows at their own rows, and in k rows renumbered 0..k-1."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    for impl in ("grouped_mm", "batched_mm", "eager"):
        cfg = MixtralConfig(hidden_size=2048, intermediate_size=5632, num_local_experts=8, num_experts_per_tok=2)
        cfg._experts_implementation = impl
        full = MixtralExperts(cfg).to("cuda", torch.bfloat16)
        for p in full.parameters():
            p.data.normal_(0, 0.02)
        small_cfg = MixtralConfig(hidden_size=2048, intermediate_size=5632, num_local_experts=2, num_experts_per_tok=2)
        small_cfg._experts_implementation = impl
        small = MixtralExperts(small_cfg).to("cuda", torch.bfloat16)
        same = True
        for _ in range(20):
            h = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
            idx = torch.randperm(8, device="cuda")[:2].view(1, 2)
            w = torch.softmax(torch.randn(1, 2, device="cuda"), -1).to(torch.bfloat16)
            with torch.no_grad():
                want = full(h, idx, w)
                small.gate_up_proj.data.copy_(full.gate_up_proj.data[idx[0]])
                small.down_proj.data.copy_(full.down_proj.data[idx[0]])
                got = small(h, torch.arange(2, device="cuda").view(1, 2), w)
            same = same and torch.equal(want, got)
        add(kind="renumbered", implementation=impl, equal=same)


if __name__ == "__main__":
    main()
