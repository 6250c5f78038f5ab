import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "opt", "mixtral", "qwen2_moe"]
PROMPT = [[5, 17, 42, 7, 99, 3, 64, 12]]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny models of each architecture, made once per session: ``model_dirs(arch)`` -> folder."""
    made = {}

    def get(arch, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            from nb_offload.tiny import make_tiny_model
            folder = tmp_path_factory.mktemp(f"{arch}-model")
            made[key] = make_tiny_model(str(folder), arch, **overrides)
        return made[key]

    return get


def reference(folder, device="cpu", max_new_tokens=10):
    """Greedy tokens and prompt logits of the plain transformers model."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    ids = torch.tensor(PROMPT, device=device)
    with torch.inference_mode():
        logits = model(ids).logits.float().cpu()
        tokens = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                do_sample=False).cpu()
    del model
    return tokens, logits


def run_offloaded(llm, max_new_tokens=10):
    import torch
    ids = torch.tensor(PROMPT)
    logits = llm(ids).logits.float().cpu()
    tokens = llm.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                          do_sample=False).cpu()
    return tokens, logits


def staging_bytes(folder, prefetch):
    """What streaming blocks costs the compute device with split_blocks=True: slots for the largest
    piece, plus every block's leftovers kept resident while it streams."""
    from nb_offload.loader import Inspection
    units = [u for u in Inspection(folder).units if u.kind == "block"]
    return (prefetch + 1) * max(u.stream_nbytes for u in units) + sum(u.rest_nbytes for u in units)


def host_staging(folder, read_ahead=2):
    """Page-locked disk staging with blocks split (split_blocks=True): a buffer per piece of
    ``read_ahead`` blocks."""
    from nb_offload.loader import Inspection
    units = [u for u in Inspection(folder).units if u.kind == "block"]
    return read_ahead * max(len(u.pieces) for u in units) * max(u.stream_nbytes for u in units)


def blocks(plan):
    return [e for e in plan if e.kind == "block"]


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """A real IPython shell (fresh IPYTHONDIR) with the extension loaded, one per test module."""
    os.environ["IPYTHONDIR"] = str(tmp_path_factory.mktemp("ipython"))
    from IPython.core.interactiveshell import InteractiveShell
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext nb_offload", store_history=False)
    yield sh
    sh.run_cell("%unload_ext nb_offload", store_history=False)


def run_cell(sh, code):
    """Run a cell; errors are raised, not swallowed."""
    result = sh.run_cell(code, store_history=False)
    if result.error_before_exec:
        raise result.error_before_exec
    if result.error_in_exec:
        raise result.error_in_exec
    return result
