"""``python -m nb_offload demo``: the small model that ships with nb_offload, loaded through every tier
this machine has.

It plans the model (a 4-layer Llama trained on a page of sentences, see ``tiny.small_model``) so that
blocks land on each tier, generates greedily, checks the tokens against plain transformers, and
prints the plan, the sentence and the stats.
"""

from __future__ import annotations

import os
import shutil
import time


def run(folder: str | None = None, max_new_tokens: int = 40, prompt: str = "The old baker") -> int:
    import torch
    from transformers import AutoModelForCausalLM

    import nb_offload
    from nb_offload.tiny import small_model

    workdir = folder or os.path.join(os.getcwd(), ".demo")
    model_dir = small_model()
    offload_dir = os.path.join(workdir, "offload")
    cuda = torch.cuda.is_available()
    # The blocks spread over each tier this machine has: the GPU (if any), host memory, disk.
    if cuda:
        pins = {"model.layers.0": "gpu", "model.layers.1-2": "cpu", "model.layers.3": "disk"}
    else:
        pins = {"model.layers.0-1": "cpu", "model.layers.2-3": "disk"}
    t0 = time.perf_counter()
    llm = nb_offload.load(model_dir, disk=offload_dir, pins=pins, context=256)
    print(f"loaded in {time.perf_counter() - t0:.2f} s")
    print(llm.plan)
    tok = llm.tokenizer
    inputs = tok(prompt, return_tensors="pt")
    out = llm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)   # to the end of the sentence
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"{prompt}{text}")
    print(f"stats: {llm.stats}")
    summary = llm.trace.summary()
    print("trace: " + ", ".join(f"{k} {v['count']} events" for k, v in summary.items()))

    ref = AutoModelForCausalLM.from_pretrained(model_dir).to(llm.device)
    want = ref.generate(**{k: v.to(llm.device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens,
                        do_sample=False)
    same = torch.equal(out.cpu(), want.cpu())
    print(f"tokens identical to plain transformers: {'yes' if same else 'NO'}")
    llm.unload()
    if folder is None and os.path.isdir(offload_dir):
        shutil.rmtree(offload_dir, ignore_errors=True)
    return 0 if same else 1
