"""Write the browser test's fixtures into a folder: a tiny Llama and the notebook that uses it."""

import json
import sys

import nbformat

from nb_offload.tiny import make_tiny_model

# Seconds the "busy" cell sleeps: the browser clicks Apply meanwhile, which must show as pending.
BUSY_SECONDS = 6

CELLS = [
    # 0: load and generate; the expected layer map for the browser to compare against.
    """import json, time
import torch, nb_offload
# two blocks on disk, streamed a submodule at a time: more pieces than the three staging slots, so every step
# reads (units the slots all hold are read once)
llm = nb_offload.load("tiny-llama", device="cpu", disk="offload", pins={"model.layers.2-3": "disk"},
                      split_blocks=True, progress=False)
ids = torch.tensor([[5, 17, 42, 7, 99, 3, 64, 12]])
llm.generate(ids, max_new_tokens=8, do_sample=False)
print("EXPECTED " + json.dumps({"tiers": [e.tier for e in llm.plan], "events": len(llm.trace)}))""",
    # 1: the dashboard.
    """from nb_offload.widgets import dashboard
dash = dashboard(llm)
dash""",
    # 2: generate for a few seconds: the timeline grows while the cell runs.
    """for _ in range(20):
    llm.generate(ids, max_new_tokens=6, do_sample=False)
    time.sleep(0.25)
print("EVENTS", len(llm.trace))""",
    # 3: keep the kernel busy while the browser asks for a re-pin, which must wait for the end
    # of the cell: the plan printed here is still the one from before.
    f"""time.sleep({BUSY_SECONDS})
print("DURING " + json.dumps([e.tier for e in llm.plan]))""",
    # 4: the plan as the kernel sees it after the re-pin.
    """print("PLAN " + json.dumps({e.name: [e.tier, e.pinned] for e in llm.plan}))""",
    # 5: 12,000 more events at once, as a long run leaves: the timeline must stay smooth.
    """blocks = [e.name for e in llm.plan if e.kind == "block"]
t = time.perf_counter()
for i in range(12_000):
    s = t + i * 5e-5
    llm.trace.host_event(("read", "copy", "compute")[i % 3], blocks[i % len(blocks)], s, s + 4e-5, 1 << 16)
llm.trace.flush()
print("STRESS", len(llm.trace))""",
    # 6: a mixture-of-experts model, its blocks read from disk with only the routed experts: its layer map.
    """from nb_offload.widgets import LayerMap
moe = nb_offload.load("tiny-mixtral", device="cpu", disk="offload-moe", pins={"model.layers.*": "disk"},
                      expert_cache=0, progress=False)
print("MOE " + json.dumps({"blocks": [e.name for e in moe.plan if e.experts], "experts": moe.plan.entries[1].experts}))
LayerMap(moe)""",
    # 7: decode steps bring the routed experts; the map marks the last step's, and those the CPU computed.
    # (On the CPU device every expert computes on the CPU anyway: splitting them as on CUDA, half of those
    # a step needs computed from a host copy of their block, lets the map show CPU-computed experts.)
    """eng = moe._engine
eng.compute_experts_on_cpu({i: eng.sources[i].read(0, eng.units[i].nbytes).clone() for i in eng.routed}, 0.5)
moe.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
print("ROUTED " + json.dumps({k: v["routed"] for k, v in moe.expert_state().items()}))
print("ON_CPU " + json.dumps({k: v["cpu"] for k, v in moe.expert_state().items()}))""",
]


def main(folder):
    make_tiny_model(f"{folder}/tiny-llama", "llama")
    make_tiny_model(f"{folder}/tiny-mixtral", "mixtral")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nbformat.write(nb, f"{folder}/widgets.ipynb")
    print(json.dumps({"cells": len(CELLS), "busy_seconds": BUSY_SECONDS}))


if __name__ == "__main__":
    main(sys.argv[1])
