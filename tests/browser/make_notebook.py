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
llm = nb_offload.load("tiny-llama", device="cpu", disk="offload", pins={"model.layers.2-3": "disk"}, progress=False)
ids = torch.tensor([[5, 17, 42, 7, 99, 3, 64, 12]])
llm.generate(ids, max_new_tokens=8, do_sample=False)
print("EXPECTED " + json.dumps({"tiers": [e.tier for e in llm.plan], "events": len(llm.trace)}))""",
    # 1: the dashboard.
    """from nb_offload.widgets import dashboard
dash = dashboard(llm)
import threading
LOG = []
_orig = dash.layer_map.apply
def _apply(*a, **k):
    LOG.append(("start", time.time(), threading.current_thread().name))
    _orig(*a, **k)
    LOG.append(("end", time.time(), threading.current_thread().name))
dash.layer_map.apply = _apply
dash""",
    # 2: generate for a few seconds: the timeline grows while the cell runs.
    """for _ in range(12):
    llm.generate(ids, max_new_tokens=6, do_sample=False)
    time.sleep(0.25)
print("EVENTS", len(llm.trace))""",
    # 3: keep the kernel busy while the browser asks for a re-pin.
    f"T0 = time.time(); time.sleep({BUSY_SECONDS}); T1 = time.time()",
    # 4: the plan as the kernel sees it after the re-pin.
    """print("PLAN " + json.dumps({e.name: [e.tier, e.pinned] for e in llm.plan})); print("TIMES", T0, T1, LOG)""",
]


def main(folder):
    make_tiny_model(f"{folder}/tiny-llama", "llama")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nbformat.write(nb, f"{folder}/widgets.ipynb")
    print(json.dumps({"cells": len(CELLS), "busy_seconds": BUSY_SECONDS}))


if __name__ == "__main__":
    main(sys.argv[1])
