"""``python -m nb_offload demo``: a tiny Llama, made here, loaded through every tier this machine has.

It builds the model and its tokenizer offline, plans it so that blocks land on each tier,
generates greedily, checks the tokens against plain transformers, and prints the plan and stats.
"""

from __future__ import annotations

import os
import shutil
import time


def run(folder: str | None = None, max_new_tokens: int = 24, prompt: str = "Model offloading keeps") -> int:
    import torch
    from transformers import AutoModelForCausalLM

    import nb_offload
    from nb_offload.tiny import make_tiny_model

    workdir = folder or os.path.join(os.getcwd(), ".demo")
    model_dir = os.path.join(workdir, "tiny-llama")
    offload_dir = os.path.join(workdir, "offload")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        print(f"building a tiny Llama (random weights, offline tokenizer) in {model_dir}")
        make_tiny_model(model_dir, "llama", hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=320)
    cuda = torch.cuda.is_available()
    # Thirds of the blocks on each tier this machine has: the GPU (if any), host memory, disk.
    if cuda:
        pins = {"model.layers.0-2": "gpu", "model.layers.3-5": "cpu", "model.layers.6-7": "disk"}
    else:
        pins = {"model.layers.0-3": "cpu", "model.layers.4-7": "disk"}
    t0 = time.perf_counter()
    llm = nb_offload.load(model_dir, disk=offload_dir, pins=pins, context=256)
    print(f"loaded in {time.perf_counter() - t0:.2f} s")
    print(llm.plan)
    tok = llm.tokenizer
    inputs = tok(prompt, return_tensors="pt")
    out = llm.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:])
    shown = "".join(c if c.isprintable() else "\N{MIDDLE DOT}" for c in text)   # random bytes: no escapes
    print(f"prompt: {prompt}\ngenerated (random weights, so not prose): {shown}")
    print(f"stats: {llm.stats}")
    summary = llm.trace.summary()
    print("trace: " + ", ".join(f"{k} {v['count']} events" for k, v in summary.items()))

    ref = AutoModelForCausalLM.from_pretrained(model_dir).to(llm.device)
    want = ref.generate(**{k: v.to(llm.device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens,
                        min_new_tokens=max_new_tokens, do_sample=False)
    same = torch.equal(out.cpu(), want.cpu())
    print(f"tokens identical to plain transformers: {'yes' if same else 'NO'}")
    llm.unload()
    if folder is None and os.path.isdir(offload_dir):
        shutil.rmtree(offload_dir, ignore_errors=True)
    return 0 if same else 1
