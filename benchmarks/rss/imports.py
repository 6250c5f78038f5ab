"""What the first load imports, and what each import costs in RssAnon+RssShmem.

Imports, in the order a first ``nb_offload.load`` reaches them, the modules a load pulls in
after ``import torch, transformers, nb_offload``, and prints the growth of each step, the
number of modules each adds (by top-level package), and the total against a full first load.

    .venv/bin/python benchmarks/rss/imports.py
"""

from __future__ import annotations

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import MiB, model_folder, rss_anon_shmem  # noqa: E402

STEPS = [
    ("nb_offload.loader (+budget, checkpoint, planner, units, trace)", "import nb_offload.loader"),
    ("transformers.AutoConfig", "from transformers import AutoConfig"),
    ("AutoConfig.from_pretrained (llama config)", "AutoConfig.from_pretrained(FOLDER)"),
    ("accelerate.init_empty_weights", "from accelerate import init_empty_weights"),
    ("transformers.AutoModelForCausalLM", "from transformers import AutoModelForCausalLM"),
    ("transformers.modeling_utils", "import transformers.modeling_utils"),
    ("transformers.generation.utils", "import transformers.generation.utils"),
    ("transformers.models.llama.modeling_llama", "import transformers.models.llama.modeling_llama"),
    ("meta model from_config (llama, 24 layers)",
     "nb_offload.units.build_meta_model(AutoConfig.from_pretrained(FOLDER), __import__('torch').float32)"),
    ("transformers.conversion_mapping + core_model_loading",
     "import transformers.conversion_mapping, transformers.core_model_loading"),
    ("safetensors.safe_open", "from safetensors import safe_open"),
    ("nb_offload.model/engine/storage/pieces/spare/uncached",
     "import nb_offload.model, nb_offload.engine, nb_offload.storage, nb_offload.pieces, nb_offload.spare, "
     "nb_offload.uncached"),
    ("tokenizers + AutoTokenizer", "from transformers import AutoTokenizer"),
    ("AutoTokenizer.from_pretrained (tiny tokenizer)", "AutoTokenizer.from_pretrained(FOLDER)"),
    ("GenerationConfig.from_pretrained",
     "from transformers import GenerationConfig; GenerationConfig.from_pretrained(FOLDER)"),
]


def main():
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import nb_offload  # noqa: F401
    ns = {"FOLDER": model_folder("fp32"), "nb_offload": nb_offload}
    gc.collect()
    base = rss_anon_shmem()
    print(f"baseline RssAnon+RssShmem {base / MiB:.1f} MiB, {len(sys.modules)} modules")
    print(f"{'step':62} {'MiB':>6} {'total':>6} {'mods':>5}  top packages of the new modules")
    prev = base
    for label, code in STEPS:
        before = set(sys.modules)
        t0 = time.perf_counter()
        exec(code, ns)
        dt = time.perf_counter() - t0
        gc.collect()
        now = rss_anon_shmem()
        new = set(sys.modules) - before
        tops = {}
        for m in new:
            key = ".".join(m.split(".")[:2]) if m.startswith(("transformers", "torch")) else m.split(".")[0]
            tops[key] = tops.get(key, 0) + 1
        top = ", ".join(f"{k} {v}" for k, v in sorted(tops.items(), key=lambda kv: -kv[1])[:5])
        print(f"{label:62} {(now - prev) / MiB:6.1f} {(now - base) / MiB:6.1f} {len(new):5}  {top} ({dt:.2f}s)")
        prev = now


if __name__ == "__main__":
    main()
