"""CUDA tests of quantized tiers (bitsandbytes): tokens and logits equal to transformers' own
bitsandbytes model, quantized on the same GPU, through every tier and after re-pinning.

Run on a CUDA machine with bitsandbytes: ``PYTHONPATH=. python3 -m pytest tests/gpu``.
"""

import pytest
import torch
from helpers import blocks, bnb_config, quant_reference, run_offloaded, three_tier_pins

import nb_offload

bnb = pytest.importorskip("bitsandbytes")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def assert_same(llm, want):
    tokens, logits = run_offloaded(llm)
    assert torch.equal(tokens, want[0])
    assert torch.equal(logits, want[1]), (logits - want[1]).abs().max()


@pytest.mark.parametrize("fmt", ["nf4", "int8", "fp4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mixtral"])
def test_quantized_tiers_match_bitsandbytes_on_the_gpu(arch, fmt, model_dirs, tmp_path):
    folder = model_dirs(arch, dtype="bfloat16")
    want = quant_reference(folder, bnb_config(fmt), device="cuda")
    pins = three_tier_pins(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", quant=fmt))
    llm = nb_offload.load(folder, disk=tmp_path, pins=pins, quant=fmt, progress=False)
    try:
        assert {e.tier for e in blocks(llm.plan)} == {"gpu", "cpu", "disk"}
        assert {e.fmt for e in blocks(llm.plan)} == {fmt}
        assert_same(llm, want)
        assert llm.stats.bytes_from_cpu > 0 and llm.stats.bytes_from_disk > 0
        disk_block = [e.name for e in blocks(llm.plan) if e.tier == "disk"][0]
        gpu_block = [e.name for e in blocks(llm.plan) if e.tier == "gpu"][0]
        llm.pin(disk_block, "gpu")
        llm.pin(gpu_block, "disk")
        assert_same(llm, want)
    finally:
        llm.unload()


def test_double_quant_and_split_blocks_stream_from_host_and_disk(model_dirs, tmp_path):
    folder = model_dirs("llama", dtype="bfloat16")
    want = quant_reference(folder, bnb_config("nf4", double_quant=True), device="cuda")
    quant = {"format": "nf4", "double_quant": True}
    pins = three_tier_pins(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", quant=quant))
    llm = nb_offload.load(folder, disk=tmp_path, pins=pins, quant=quant, split_blocks=True, progress=False)
    try:
        assert llm.plan.split_blocks
        assert_same(llm, want)
    finally:
        llm.unload()


def test_quantized_streaming_stays_within_the_gpu_budget(model_dirs, tmp_path):
    folder = model_dirs("llama", dtype="bfloat16", num_hidden_layers=8, hidden_size=256, intermediate_size=768,
                        vocab_size=2048)
    want = quant_reference(folder, bnb_config("nf4"), device="cuda")
    p = nb_offload.plan(folder, gpu="10GiB", cpu="1GiB", quant="nf4", context=64)
    tight = sum(p.reserved.values()) + sum(e.bytes for e in p if e.kind == "top") + 2 * blocks(p)[0].bytes
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    llm = nb_offload.load(folder, gpu=tight, cpu="1GiB", quant="nf4", context=64, progress=False)
    try:
        assert sum(1 for e in blocks(llm.plan) if e.tier == "cpu") >= 4
        assert_same(llm, want)
        peak = torch.cuda.max_memory_allocated() - base
        print(f"nf4 budget {tight / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
        assert peak <= tight
    finally:
        llm.unload()


def test_quantized_units_are_smaller_and_the_plan_says_so(model_dirs):
    folder = model_dirs("llama", dtype="bfloat16")
    plain = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB")
    nf4 = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", quant="nf4")
    assert blocks(nf4)[0].bytes < blocks(plain)[0].bytes / 2.5
    assert "nf4" in str(nf4) and "dequant" in nf4.reserved


@pytest.mark.parametrize("fmt,double_quant", [("nf4", True), ("int8", False)])
def test_a_checkpoint_saved_quantized_on_the_gpu_loads_as_saved(fmt, double_quant, model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM
    folder = model_dirs("llama", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda",
                                                 quantization_config=bnb_config(fmt, double_quant=double_quant))
    saved = str(tmp_path / "saved")
    model.save_pretrained(saved)
    del model
    want = quant_reference(saved, None, device="cuda")
    pins = three_tier_pins(nb_offload.plan(saved, gpu="1GiB", cpu="1GiB"))
    llm = nb_offload.load(saved, disk=tmp_path / "offload", pins=pins, progress=False)
    try:
        assert {e.fmt for e in blocks(llm.plan)} == {fmt}
        assert_same(llm, want)
        llm.pin([e.name for e in blocks(llm.plan) if e.tier == "disk"][0], "gpu")
        assert_same(llm, want)
    finally:
        llm.unload()


def test_pins_keep_blocks_unquantized_on_the_gpu(model_dirs, tmp_path):
    from transformers import BitsAndBytesConfig
    folder = model_dirs("llama", dtype="bfloat16")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                             llm_int8_skip_modules=["lm_head", "model.layers.0.", "model.layers.3."])
    want = quant_reference(folder, cfg, device="cuda")
    pins = {"model.layers.0": "gpu:bf16", "model.layers.3": "disk:bf16", "model.layers.1": "cpu"}
    llm = nb_offload.load(folder, quant="nf4", pins=pins, disk=tmp_path, progress=False)
    try:
        assert [e.fmt for e in blocks(llm.plan)] == ["bf16", "nf4", "nf4", "bf16"]
        assert_same(llm, want)
    finally:
        llm.unload()
