"""Issue 5's speed check: generation with the dashboard live against without, same run, one card.

Outside a kernel the widgets' messages go to no front-end, so this times what the dashboard
adds in the kernel process: the trace subscription, event packing and throttled updates.
Uses the model that bench_offload.py builds (or builds it), GPU budget 4 GiB, batch 1.

    PYTHONPATH=. python3 benchmarks/bench_dashboard.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from bench_offload import build, decode_step, interleave, spread


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gpu", default="4GiB")
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "nb_offload-bench-7b"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    import nb_offload
    from nb_offload.widgets import dashboard
    cuda = torch.cuda.is_available()
    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        build(args.folder, args.layers)
    # Without a GPU (a smoke run of this script) the model streams from disk on the CPU.
    kw = dict(gpu=args.gpu, cpu="100GiB") if cuda else dict(device="cpu", disk=tempfile.mkdtemp(),
                                                            pins={"model.layers.*": "disk"})
    llm = nb_offload.load(args.folder, progress=False, **kw)
    vocab = llm.model.config.vocab_size
    ids = torch.randint(3, vocab - 1, (1, 16), device=llm.device)
    board = {"widget": None}

    def with_dashboard():
        board["widget"] = board["widget"] or dashboard(llm)
        return decode_step(llm.generate, ids, args.tokens)

    def without():
        if board["widget"] is not None:
            board["widget"].close()
            board["widget"] = None
        return decode_step(llm.generate, ids, args.tokens)

    with torch.inference_mode():
        t = interleave({"without": without, "dashboard": with_dashboard}, args.repeats)
    a, b = statistics.median(t["without"]), statistics.median(t["dashboard"])
    row = {"card": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
           "gpu_budget": args.gpu,
           "without_tok_s": 1 / a, "dashboard_tok_s": 1 / b, "slower_pct": 100 * (b - a) / a,
           "without_spread": spread(t["without"]), "dashboard_spread": spread(t["dashboard"]),
           "trace_events": len(llm.trace)}
    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=1)
    llm.unload()


if __name__ == "__main__":
    main()
