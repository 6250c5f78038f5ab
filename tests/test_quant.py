"""Quantized tiers with bitsandbytes on the CPU: the same logits and tokens as transformers' own
bitsandbytes model (``from_pretrained(device_map="cpu", quantization_config=...)``), from host memory
and streamed from disk, quantized at load or saved quantized; mixed formats by pins; bad input.

The GPU side (quantized on the GPU, bit-identical to transformers there, and the benchmark) is in
tests/gpu/test_quant_gpu.py.
"""

import json
import os

import pytest
import torch
from helpers import PROMPT, blocks, bnb_config, quant_reference, run_offloaded

import nb_offload
from nb_offload import OptionError, PinError
from nb_offload.errors import CheckpointError

bnb = pytest.importorskip("bitsandbytes")

ARCHS = ["llama", "qwen2", "gpt2", "phi3", "mixtral"]


@pytest.fixture(params=["avx512bf16", "canonical"])
def cpu_kernel(request, monkeypatch):
    """Both of bitsandbytes' CPU paths, whatever this CPU has: its AVX512-BF16 4-bit kernel (weights
    repacked on the first forward, which nb_offload does at load) and the canonical one."""
    import bitsandbytes.nn.modules as modules
    if request.param == "avx512bf16":
        if not modules.has_avx512bf16():
            pytest.skip("this CPU has no AVX512-BF16")
    else:
        monkeypatch.setattr(modules, "has_avx512bf16", lambda: False)
    return request.param


def disk_budget(folder, disk, **kw):
    """A cpu budget for a load with split_blocks=True that keeps the resident minimum and one block in
    memory: the other blocks stream from disk."""
    from nb_offload.loader import Inspection
    from nb_offload.options import Options
    p = nb_offload.plan(folder, device="cpu", cpu="64GiB", disk=disk, split_blocks=True, **kw)
    units = [u for u in Inspection(folder, Options(**kw), "cpu").units if u.kind == "block"]
    slots = (p.prefetch + 1) * max(u.stream_nbytes for u in units) + sum(u.rest_nbytes for u in units)
    fixed = sum(v for k, v in p.reserved.items() if k != "staging_slots")
    return fixed + sum(e.bytes for e in p if e.kind == "top") + slots + blocks(p)[0].bytes + 1024


def load_from_disk(folder, disk, **kw):
    return nb_offload.load(folder, device="cpu", cpu=disk_budget(folder, disk, **kw), disk=disk, split_blocks=True,
                           progress=False, **kw)


def assert_same(llm, want):
    tokens, logits = run_offloaded(llm)
    assert torch.equal(tokens, want[0])
    assert torch.equal(logits, want[1]), (logits - want[1]).abs().max()


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_units_match_bitsandbytes_in_memory_and_from_disk(arch, fmt, cpu_kernel, model_dirs, tmp_path):
    folder = model_dirs(arch, dtype="bfloat16")
    want = quant_reference(folder, bnb_config(fmt))
    llm = nb_offload.load(folder, quant=fmt, progress=False)
    try:
        assert {e.fmt for e in blocks(llm.plan)} == {fmt}
        assert_same(llm, want)
    finally:
        llm.unload()
    llm = load_from_disk(folder, tmp_path, quant=fmt)
    try:
        assert sum(e.tier == "disk" for e in blocks(llm.plan)) >= 2
        assert_same(llm, want)
        assert llm.stats.bytes_from_disk > 0
        # re-pin a streamed block into memory and back: the same outputs
        streamed = next(e.name for e in blocks(llm.plan) if e.tier == "disk")
        llm.pin(streamed, "cpu:" + fmt)
        assert llm.plan.tier_of(streamed) == "cpu"
        assert_same(llm, want)
    finally:
        llm.unload()


@pytest.mark.parametrize("quant,config", [
    ("fp4", dict(fmt="fp4")),
    ({"format": "nf4", "double_quant": True}, dict(fmt="nf4", double_quant=True)),
    ({"format": "fp4", "double_quant": True, "compute_dtype": "float32"}, None),
])
def test_fp4_double_quant_and_compute_dtype(quant, config, cpu_kernel, model_dirs, tmp_path):
    from transformers import BitsAndBytesConfig
    folder = model_dirs("llama", dtype="bfloat16")
    cfg = bnb_config(**config) if config else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    want = quant_reference(folder, cfg)
    llm = load_from_disk(folder, tmp_path, quant=quant)
    try:
        assert_same(llm, want)
    finally:
        llm.unload()


def test_a_bitsandbytes_config_is_taken_as_transformers_takes_it(model_dirs):
    from transformers import BitsAndBytesConfig
    folder = model_dirs("qwen2", dtype="bfloat16")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["mlp.down_proj"])
    want = quant_reference(folder, cfg)      # compute dtype float32 (its default); lm_head quantized too
    llm = nb_offload.load(folder, quant=cfg, progress=False)
    try:
        assert llm.options.quant.compute_dtype == "float32" and llm.options.quant.skip == ("mlp.down_proj",)
        assert llm.plan["lm_head"].fmt == "nf4"      # an explicit skip list replaces transformers' defaults
        assert_same(llm, want)
    finally:
        llm.unload()


def save_quantized(folder, fmt, out, double_quant=False):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu",
                                                 quantization_config=bnb_config(fmt, double_quant=double_quant))
    model.save_pretrained(out)     # before any forward: a CPU forward repacks 4-bit weights in place
    return str(out)


@pytest.mark.parametrize("fmt,double_quant", [("nf4", True), ("fp4", False), ("int8", False)])
def test_a_checkpoint_saved_quantized_loads_as_saved(fmt, double_quant, cpu_kernel, model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM
    saved = save_quantized(model_dirs("llama", dtype="bfloat16"), fmt, tmp_path / "saved", double_quant)
    ref = AutoModelForCausalLM.from_pretrained(saved, device_map="cpu")
    ids = torch.tensor(PROMPT)
    with torch.inference_mode():
        want = (ref.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False), ref(ids).logits.float())
    disk = tmp_path / "offload"
    llm = load_from_disk(saved, disk)
    try:
        assert {e.fmt for e in blocks(llm.plan)} == {fmt}
        assert sum(e.tier == "disk" for e in blocks(llm.plan)) >= 2
        assert_same(llm, want)
    finally:
        llm.unload()
    with pytest.raises(OptionError, match=f"is saved quantized as {fmt}.*drop quant="):
        nb_offload.plan(saved, quant="int8" if fmt != "int8" else "nf4")


def test_a_tampered_saved_checkpoint_is_refused_before_any_weight_is_read(model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file
    saved = save_quantized(model_dirs("llama", dtype="bfloat16"), "nf4", tmp_path / "saved")
    path = os.path.join(saved, "model.safetensors")
    tensors = load_file(path)
    blob = "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(tensors[blob].tolist()).decode())
    meta["shape"] = [meta["shape"][1], meta["shape"][0]]
    tensors[blob] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="up_proj.weight.*was saved as nf4 of shape"):
        nb_offload.load(saved, disk=tmp_path / "offload", progress=False)
    assert not os.path.exists(tmp_path / "offload")


def test_pins_keep_blocks_unquantized(cpu_kernel, model_dirs, tmp_path):
    from transformers import BitsAndBytesConfig
    folder = model_dirs("llama", dtype="bfloat16")
    skip = ["lm_head", "model.layers.0.", "model.layers.3."]
    want = quant_reference(folder, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16,
                                                      llm_int8_skip_modules=skip))
    pins = {"model.layers.0": "bf16", "model.layers.3": "cpu:bf16", "model.layers.1-2": "nf4"}
    llm = nb_offload.load(folder, quant="nf4", pins=pins, progress=False)
    try:
        fmts = [e.fmt for e in blocks(llm.plan)]
        assert fmts == ["bf16", "nf4", "nf4", "bf16"]
        assert llm.plan["model.layers.3"].pinned and not llm.plan["model.layers.0"].pinned
        assert "bf16" in str(llm.plan) and "nf4" in str(llm.plan)
        assert_same(llm, want)
        with pytest.raises(PinError, match="stored as bf16, not nf4: a unit's format is chosen at load"):
            llm.pin("model.layers.0", "cpu:nf4")
        with pytest.raises(PinError, match="names a format, not a tier"):
            llm.pin("model.layers.1", "bf16")
        assert_same(llm, want)          # a refused pin changes nothing
    finally:
        llm.unload()


@pytest.mark.parametrize("kw,error,fragment", [
    (dict(quant="int3"), OptionError, "quant='int3' is unknown; accepted: None, 'int8', 'nf4', 'fp4'"),
    (dict(quant={"formt": "nf4"}), OptionError, "unknown key(s) ['formt']; the keys are format, double_quant"),
    (dict(quant={"double_quant": True}), OptionError, "has no format"),
    (dict(quant={"format": "int8", "double_quant": True}), OptionError, "double_quant applies to nf4 and fp4"),
    (dict(quant={"format": "nf4", "compute_dtype": "float8"}), OptionError, "compute_dtype='float8' is not supported"),
    (dict(quant={"format": "nf4", "skip": "lm_head"}), OptionError, "skip='lm_head' is not valid; give a list"),
    (dict(quant={"load_in_8bit": True, "llm_int8_enable_fp32_cpu_offload": True}), OptionError,
     "llm_int8_enable_fp32_cpu_offload=True is not supported"),
    (dict(quant="nf4", pins={"model.layers.0": "int8"}), PinError, "format 'int8' for 'model.layers.0' can't be given"),
    (dict(quant="nf4", pins={"model.embed_tokens": "nf4"}), PinError, "has no Linear that quant='nf4' quantizes"),
    (dict(pins={"model.layers.0": "nf4"}), PinError, "nothing is quantized without quant="),
    (dict(pins={"model.layers.0": "gpu:nf5"}), PinError, "pin 'gpu:nf5' is unknown"),
])
def test_bad_quantization_input_is_refused_before_any_weight_is_read(kw, error, fragment, model_dirs, tmp_path):
    folder = model_dirs("llama", dtype="bfloat16")
    with pytest.raises(error) as info:
        nb_offload.load(folder, disk=tmp_path / "offload", progress=False, **kw)
    assert fragment in str(info.value)
    assert not os.path.exists(tmp_path / "offload")


def test_without_bitsandbytes_quant_says_how_to_install_it(model_dirs, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)      # import bitsandbytes now fails
    with pytest.raises(OptionError, match=r"quant= needs bitsandbytes.*pip install 'nb_offload\[quant\]'"):
        nb_offload.plan(model_dirs("llama", dtype="bfloat16"), quant="nf4", device="cpu")


def test_a_weight_the_cpu_kernel_cant_take_is_an_option_error(model_dirs, monkeypatch):
    import bitsandbytes.nn.modules as modules
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)     # the check runs before any kernel
    folder = model_dirs("gemma", dtype="bfloat16")                   # k_proj: 1 head of 16 outputs
    with pytest.raises(OptionError, match=r"divisible by 32.*use quant=\"int8\", or a CUDA device"):
        nb_offload.plan(folder, quant="nf4", device="cpu")


def test_the_plan_counts_quantized_bytes_and_reserves_the_prefill_dequantization(model_dirs):
    folder = model_dirs("llama", dtype="bfloat16")
    plain = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB")
    nf4 = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", quant="nf4")
    int8 = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", quant="int8")
    assert blocks(nf4)[0].bytes * 2.5 < blocks(plain)[0].bytes
    assert blocks(plain)[0].bytes / 2.5 < blocks(int8)[0].bytes < blocks(plain)[0].bytes
    assert nf4["lm_head"].bytes == plain["lm_head"].bytes            # transformers keeps lm_head unquantized
    assert nf4.reserved["dequant"] > 0 and "dequant" not in plain.reserved
    assert "  format" in str(nf4).splitlines()[1] and " nf4 " in str(nf4)
    assert nf4.to_dict()["entries"][1]["format"] == "nf4"


def test_the_offload_cache_is_keyed_by_the_quantization(model_dirs, tmp_path):
    folder = model_dirs("llama", dtype="bfloat16")
    for quant in ("nf4", "int8", "nf4"):
        llm = load_from_disk(folder, tmp_path, quant=quant)
        run_offloaded(llm, max_new_tokens=2)
        llm.unload()
    caches = [d for d in os.listdir(tmp_path) if d.startswith("nb_offload-")]
    assert len(caches) == 2, caches      # nf4 and int8 apart; the second nf4 load used the first's files


def test_unload_drops_the_quantized_weights_references(model_dirs):
    folder = model_dirs("llama", dtype="bfloat16")
    for quant in ("nf4", "int8"):
        llm = nb_offload.load(folder, quant=quant, progress=False)
        run_offloaded(llm, max_new_tokens=2)
        proj = llm.model.model.layers[0].self_attn.q_proj
        llm.unload()
        assert proj.weight.numel() == 0
        assert getattr(proj.weight, "quant_state", None) is None
        assert getattr(getattr(proj, "state", None), "CB", None) is None


def test_importing_bitsandbytes_fetches_no_kernel_from_the_hub():
    """bitsandbytes' import asks the ``kernels`` package (which transformers 5.25 requires) for a CPU kernel from
    the Hub on hosts with AVX-512 BF16: refused while nb_offload imports it, and restored after."""
    import subprocess
    import sys

    from nb_offload import quant
    kernels = pytest.importorskip("kernels")
    fetch = kernels.get_kernel
    with quant._no_hub_kernels():
        with pytest.raises(RuntimeError, match="fetches no kernels"):
            kernels.get_kernel("kernels-community/quantization-bitsandbytes", version=1)
    assert kernels.get_kernel is fetch
    # a fresh process: the import says nothing (offline, the fetch would have warned) and fetches nothing
    code = ("import kernels\n"
            "asked = []\n"
            "real = kernels.get_kernel\n"
            "kernels.get_kernel = lambda *a, **k: asked.append(a) or real(*a, **k)\n"
            "from nb_offload.quant import require_bitsandbytes\n"
            "require_bitsandbytes()\n"
            "assert asked == [], asked\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Hub" not in done.stderr and "kernels-community" not in done.stderr, done.stderr
