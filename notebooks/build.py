"""Write the teaching notebooks from the cells below, run each top to bottom, and keep the outputs
of the cells nbval checks (those marked ``# NBVAL_CHECK_OUTPUT``); other outputs are dropped, so the
files stay small and a reader sees fresh figures when they run them.

    .venv/bin/python notebooks/build.py            # all of them
    .venv/bin/python notebooks/build.py 03         # the ones whose name starts with 03

CI runs them with ``pytest --nbval-lax`` (see the Makefile's test-notebooks).
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECK = "# NBVAL_CHECK_OUTPUT"

SETUP = '''import tempfile

import plotly.io as pio
pio.renderers.default = "plotly_mimetype"   # figures as data, drawn by JupyterLab's plotly extension (offline)
import nb_offload
from nb_offload.tiny import small_model
MODEL = small_model()          # the 4-layer Llama that ships with nb_offload (3 MB)
OFFLOAD = tempfile.mkdtemp(prefix="nb_offload-notebook-")   # a private folder for the disk tier'''

RESULTS = '''import json
import pathlib
RUNS = pathlib.Path("..") / "benchmarks" / "runs"      # the GPU measurements behind benchmarks/RESULTS.md
def run_rows(name):
    return json.loads((RUNS / name).read_text())["rows"]'''

NOTEBOOKS = {
    "01-quick-start.ipynb": [
        ("md", """# 1. Quick start: load, generate, look

nb_offload runs a language model whose weights don't all fit where the computing happens. Each
*block* of the model lives on a **tier**, the GPU, host memory (`cpu`) or the **disk**, and the blocks
that don't live where the compute runs are brought there just before they are needed.

This notebook uses the small model that ships with nb_offload: a 4-layer Llama that learned one page of
sentences. It runs on any machine; on a CPU-only machine the CPU computes and the disk tier streams."""),
        ("code", "%load_ext nb_offload\n" + SETUP),
        ("md", """Load it with its four blocks on the disk. `%offload_load` plans where each block goes, reads the
checkpoint once into each tier, and binds the model to a variable (`llm`)."""),
        ("code", "%offload_load $MODEL --cpu 1GiB --disk $OFFLOAD --pin model.layers.*=disk --as llm"),
        ("code", f"{CHECK}\nfor entry in llm.plan:\n"
                 "    print(f\"{entry.name:<20} {entry.tier:<5} {entry.fmt}\")"),
        ("md", """Generate. The text streams into the cell; the last line says how many tokens came, how fast, and
what was brought in from each tier. `--as answer` keeps the text."""),
        ("code", "%%generate --max-new-tokens 40 --as answer\nThe old baker"),
        ("code", f"{CHECK}\nprint(\"The old baker\" + answer)"),
        ("md", """The model wrote a sentence it learned, reading its blocks from the disk at every step. The
tokens are exactly those plain transformers gives with the whole model in memory: where a block lives
changes the speed, never the result."""),
        ("code", "llm.stats"),
        ("md", """**The dashboard** (in JupyterLab or Notebook 7) shows where each layer lives, how full each tier is,
and a live timeline of reads, copies and compute. Click a layer to choose a tier, then *Apply*."""),
        ("code", "llm.dashboard()"),
        ("md", """### Exercise
How many bytes does one decode step read from the disk, by the plan? Each entry of `llm.plan` has
`bytes` and `tier`."""),
        ("code", f"""{CHECK}
per_step = sum(e.bytes for e in llm.plan if e.tier == "disk")          # your answer
print("correct" if per_step == llm.plan.streamed_bytes_per_token()["disk"] else "not yet: add up the disk entries")"""),
        ("code", """# What the last generate really read, per step: less than the plan says, because a short generate
# keeps some streamed blocks in the memory its length leaves free (hold_spare; llm.held names them)
llm.stats.bytes_from_disk / llm.stats.steps"""),
        ("code", "%offload_unload llm"),
    ],
    "02-tiers-and-budgets.ipynb": [
        ("md", """# 2. Tiers and budgets: how the planner decides, and the PCIe limit

The planner places each block under the budgets you give. On a GPU it first sets aside what a generate
needs besides weights (the KV cache for the context, activations, a workspace, and staging slots that
streamed blocks are copied into), then keeps as many blocks on the GPU as fit, and spreads the ones that
stream between resident ones so each copy overlaps compute.

A plan reads only the checkpoint's headers, so we can plan a LLaMA-7B-shaped model on any machine:
`hollow_llama` writes one whose file has the right length but holds no weights (it is sparse, it takes
no disk space)."""),
        ("code", SETUP + "\nfrom nb_offload.tiny import hollow_llama\nSEVEN_B = hollow_llama(tempfile.mkdtemp())"),
        ("code", f"""{CHECK}
plan = nb_offload.plan(SEVEN_B, gpu="4GiB", cpu="64GiB")
for tier, total in plan.totals().items():
    print(f"{{tier:<5}} {{total / 2**30:5.1f}} GiB of weights")
print("reserved on the GPU:", {{k: round(v / 2**20) for k, v in plan.reserved.items()}}, "MiB")"""),
        ("code", "plan"),
        ("md", """At batch 1 every streamed byte crosses the link once per token. So a decode step takes at least
*(bytes streamed per token) / (link rate)*: that is the prediction `plan.predicted_seconds_per_step`
makes. Below, the prediction for several budgets at the H200's measured 55 GB/s, and what nb_offload
measured on that card (`benchmarks/RESULTS.md`: runs 16 and 17)."""),
        ("code", RESULTS + """
budgets = [4, 6, 8, 10, 12, 14]
seconds = {g: nb_offload.plan(SEVEN_B, gpu=f"{g}GiB", cpu="64GiB").predicted_seconds_per_step(link_gbps=55)
           for g in budgets}
predicted = {g: 1 / s if s else None for g, s in seconds.items()}    # none where nothing streams
measured = {round(r["gpu_budget"] / 2**30): r["nb_tok_s"] for r in run_rows("raw-2026-12-02-h200-run16.json")
            if r["case"].startswith(("1 decode", "2 decode"))}
from nb_offload.figures import budget_figure
budget_figure([{"budget": g, "predicted": predicted[g], "measured": measured.get(g)} for g in budgets],
              title="LLaMA-7B shape, bf16, H200: decode tok/s against the GPU budget")"""),
        ("md", """At 4 GiB the measurement sits on the prediction: the link is the limit, and nb_offload reaches it.
At 12 GiB so little streams that the GPU's own step (plain transformers with everything on the GPU,
about 25-35 tok/s on that machine) becomes the limit, and the prediction, which counts only bytes,
overshoots.

### Exercise
What is the smallest budget, in whole GiB, that keeps every block on the GPU (nothing streamed)?"""),
        ("code", f"""{CHECK}
def streams(g):
    return sum(nb_offload.plan(SEVEN_B, gpu=f"{{g}}GiB", cpu="64GiB").streamed_bytes_per_token().values())
answer = 14                                  # your answer
print("correct" if answer == min(g for g in range(4, 20) if streams(g) == 0) else "not yet: try plan.totals()")"""),
    ],
    "03-timelines-and-repinning.ipynb": [
        ("md", """# 3. Timelines and re-pinning: find the bottleneck, move a block, measure again

The trace records every disk read, every host-to-GPU copy and the compute of every streamed block.
Laid out in time, one lane each, it shows what a step waits for."""),
        ("code", SETUP + """
# hold_spare=False: every step streams the same blocks (by default a short generate keeps some of them
# in the memory its length leaves free, which makes a first timeline harder to read). prefetch=1: two
# staging slots for the three disk blocks, so every step reads them (blocks the slots all hold are read
# once, then found there)
llm = nb_offload.load(MODEL, device="cpu", disk=OFFLOAD, pins={"model.layers.1-3": "disk"}, hold_spare=False,
                      prefetch=1, progress=False)
prompt = llm.tokenizer("A notebook is", return_tensors="pt")
out = llm.generate(**prompt, max_new_tokens=40, do_sample=False)
print(llm.tokenizer.decode(out[0], skip_special_tokens=True))"""),
        ("code", "llm.timeline_figure()   # the last run; runs=\"all\": every run, idle time between them cut out"),
        ("code", "from nb_offload.figures import rates_figure\nrates_figure(llm.trace)"),
        ("md", """On this machine the CPU computes and three blocks stream from the disk (read into memory each step):
the `read` lane sits beside `compute` in every step. `llm.trace.summary()` adds the lanes up.

### Exercise
Which blocks does each step read from the disk? Find them in the trace (each event has `kind` and
`unit`), then check against the plan."""),
        ("code", f"""{CHECK}
answer = ["model.layers.1", "model.layers.2", "model.layers.3"]         # your answer
read = sorted({{e.unit for e in llm.trace if e.kind == "read"}})
print("correct" if answer == read == [e.name for e in llm.plan if e.tier == "disk"] else f"not yet: {{read}}")"""),
        ("md", """Memory is plentiful here, so move those blocks into it, and measure again: the same text, and no disk
reads. `pin` re-plans and moves only what changed (on a GPU, `llm.pin("model.layers.20-23", "gpu")`)."""),
        ("code", f"""{CHECK}
before = llm.stats.bytes_from_disk
moved = llm.pin("model.layers.1-3", "cpu")        # re-plan and move the blocks into memory
print({{llm.plan.entries[i].name: f"{{src}} -> {{dst}}" for i, (src, dst) in moved.items()}})"""),
        ("code", f"""{CHECK}
llm.trace.clear()
again = llm.generate(**prompt, max_new_tokens=40, do_sample=False)
print("same text:", bool((again == out).all()))
print("read from disk in this generate:", llm.stats.bytes_from_disk - before, "bytes")"""),
        ("code", "llm.unload()"),
    ],
    "04-quantization.ipynb": [
        ("md", """# 4. Quantization and offloading: fewer bytes per token

At batch 1 a streamed model decodes no faster than the link moves its bytes. Quantized weights are
fewer bytes: `quant="nf4"` keeps 4 bits a weight plus a scale per 64, `quant="int8"` 8 bits plus a
scale per row. nb_offload quantizes the blocks' Linears with bitsandbytes at load, exactly as
transformers would, and keeps them quantized in every tier, so a quarter of the bytes crosses the link.

Plans first, at real size (a LLaMA-7B-shaped checkpoint with no weights in it, as in notebook 2)."""),
        ("code", SETUP + "\nfrom nb_offload.tiny import hollow_llama\nSEVEN_B = hollow_llama(tempfile.mkdtemp())"),
        ("code", f"""{CHECK}
plans = {{q or "bf16": nb_offload.plan(SEVEN_B, gpu="4GiB", cpu="64GiB", quant=q) for q in (None, "int8", "nf4")}}
for name, p in plans.items():
    block = next(e for e in p if e.kind == "block")
    print(f"{{name:<5}} a block {{block.bytes / 2**20:6.1f}} MiB, streamed per token "
          f"{{p.streamed_bytes_per_token()['cpu'] / 2**30:5.2f}} GiB")"""),
        ("code", "from nb_offload.figures import bytes_figure\nbytes_figure(plans)"),
        ("md", """Measured on an H200 (`benchmarks/RESULTS.md`, issue 12): the same card, the same budget, one run."""),
        ("code", RESULTS + f"""
{CHECK}
for r in run_rows("raw-2026-12-02-h200-quant.json"):
    if "tok_s" in r:
        print(f"{{r['name']:<45}} {{r['tok_s']:6.2f}} tok/s, peak {{r['peak_gpu'] / 2**30:4.2f}} GiB"
              + (f", within its budget: {{r['within_budget']}}" if r.get('budget') else ""))"""),
        ("md", """The small model runs quantized on the CPU too (bitsandbytes has CPU kernels for int8, nf4 and fp4).
Its blocks are tiny, so the saving is small in bytes, but the mechanics are the same: a quantized block
moves as one buffer of codes and scales."""),
        ("code", f"""{CHECK}
import logging
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)     # its int8 matmul warns about a cast on first use
llm = nb_offload.load(MODEL, device="cpu", disk=OFFLOAD, quant="int8", pins={{"model.layers.2-3": "disk"}},
                      progress=False)
ids = llm.tokenizer("The old baker", return_tensors="pt")
print(llm.tokenizer.decode(llm.generate(**ids, max_new_tokens=40, do_sample=False)[0], skip_special_tokens=True))
print(sorted({{e.fmt for e in llm.plan if e.kind == "block"}}))
llm.unload()"""),
        ("md", """### Exercise
How many times fewer bytes is one nf4 block than one bf16 block of the 7B shape?"""),
        ("code", f"""{CHECK}
def block_bytes(plan):
    return next(e for e in plan if e.kind == "block").bytes
ratio = block_bytes(plans["bf16"]) / block_bytes(plans["nf4"])
answer = 3.6                                    # your answer, to one decimal
print("correct" if round(ratio, 1) == answer else "not yet: compare the two plans' block sizes")"""),
    ],
    "05-disk-and-cache.ipynb": [
        ("md", """# 5. The disk tier and the offload cache

A block on the disk is read from the checkpoint's own files when its bytes are already what the model
needs. When they are not, because you asked for another dtype (or for quantization), nb_offload writes
the converted block once into an **offload cache** in the folder you give as `disk=`, and reads it from
there whenever the block streams, on this load and later ones.

The small model is saved in float32; loading it as bfloat16 puts its disk blocks in the cache."""),
        ("code", SETUP + """
import os
llm = nb_offload.load(MODEL, device="cpu", disk=OFFLOAD, dtype="bfloat16", pins={"model.layers.1-3": "disk"},
                      progress=False)
ids = llm.tokenizer("The old baker", return_tensors="pt")
first = llm.generate(**ids, max_new_tokens=40, do_sample=False)
print(llm.tokenizer.decode(first[0], skip_special_tokens=True))"""),
        ("code", f"""{CHECK}
cache = next(os.path.join(OFFLOAD, d) for d in os.listdir(OFFLOAD) if d.startswith("nb_offload-"))
files = sorted(f for f in os.listdir(cache) if not f.startswith(("verified", ".")))
print(files)
print("folder private to you:", oct(os.stat(cache).st_mode & 0o777))
llm.unload()"""),
        ("md", """Each file carries a SHA-256 of its bytes. A later load checks the files it has not seen change since
they were last hashed, and rewrites any that fail, with a warning. Below: a second load reuses the
cache; then one file is damaged and the third load repairs it."""),
        ("code", f"""{CHECK}
import warnings
llm = nb_offload.load(MODEL, device="cpu", disk=OFFLOAD, dtype="bfloat16", pins={{"model.layers.1-3": "disk"}},
                      progress=False)
print("reused from the cache:", llm._storage.cache.stamped_bytes > 0 or llm._storage.cache.verified_bytes > 0)
print("same text:", bool((llm.generate(**ids, max_new_tokens=40, do_sample=False) == first).all()))
llm.unload()
with open(os.path.join(cache, files[0]), "r+b") as fh:     # damage one byte of one cached block
    fh.seek(-1, os.SEEK_END)
    byte = fh.read(1)
    fh.seek(-1, os.SEEK_END)
    fh.write(bytes([byte[0] ^ 0xFF]))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    llm = nb_offload.load(MODEL, device="cpu", disk=OFFLOAD, dtype="bfloat16", pins={{"model.layers.1-3": "disk"}},
                          progress=False)
print("warned:", any("rewrit" in str(w.message) or "fail" in str(w.message) for w in caught))
print("same text:", bool((llm.generate(**ids, max_new_tokens=40, do_sample=False) == first).all()))"""),
        ("md", """### Exercise
How many cached files does a load write when three blocks go to the disk in another dtype?"""),
        ("code", f"""{CHECK}
answer = 3                                    # your answer
print("correct" if answer == len(files) else "not yet: one file per block on the disk")
llm.unload()"""),
    ],
}


def build(name, cells):
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for i, (kind, text) in enumerate(cells):
        cell = nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
        cell.id = f"{name.split('-')[0]}-{i:02d}"     # stable ids: a rebuild changes only what changed
        nb.cells.append(cell)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    seconds = time.perf_counter() - t0
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if CHECK in cell.source:        # kept, numbered in order (nbval refuses outputs of an unrun cell)
            count += 1
            cell.execution_count = count
            for out in cell.outputs:
                if "execution_count" in out:
                    out["execution_count"] = count
        else:
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, os.path.join(HERE, name))
    print(f"{name}: ran in {seconds:.0f} s")


def main():
    wanted = sys.argv[1:]
    for name, cells in NOTEBOOKS.items():
        if not wanted or any(name.startswith(w) for w in wanted):
            build(name, cells)


if __name__ == "__main__":
    main()
