"""Inputs that used to escape as plain Python errors (or pass silently) are OffloadErrors that name
the value and the accepted form; a checkpoint that doesn't fit its config is refused, not broadcast."""

import json
import os
import shutil

import pytest
import torch

import nb_offload
from nb_offload import BudgetError, CheckpointError, DiskTierError, OptionError, PinError


def load(folder, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    return nb_offload.load(folder, **kw)


def test_infinite_or_nan_budget(model_dirs):
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(BudgetError, match=f"cpu={bad!r} is not a size"):
            load(model_dirs("llama"), cpu=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="about machines without CUDA")
def test_gpu_percentage_planned_without_cuda(model_dirs):
    with pytest.raises(BudgetError, match="gpu='50%': a percentage is a share of the card's memory") as info:
        nb_offload.plan(model_dirs("llama"), gpu="50%")
    assert '"20GiB"' in str(info.value)
    assert nb_offload.plan(model_dirs("llama"), gpu="200MiB").device == "cuda"     # a size works


def test_disk_path_with_a_nul_byte(model_dirs):
    with pytest.raises(DiskTierError, match=r"disk='off\\x00load' is not a folder path"):
        load(model_dirs("llama"), disk="off\0load")


def test_plan_rejects_unknown_options(model_dirs):
    with pytest.raises(OptionError, match=r"unsupported option\(s\) \['read_aheda'\]; nb_offload.plan takes") as info:
        nb_offload.plan(model_dirs("llama"), device="cpu", read_aheda=3)
    assert "read_ahead" in str(info.value)


@pytest.mark.parametrize("impl", ["flash_attention_2", "no_such_kernel"])
def test_attention_implementation_the_machine_cannot_run(model_dirs, impl):
    with pytest.raises(OptionError, match=f"attn_implementation='{impl}' can't run here") as info:
        load(model_dirs("llama"), attn_implementation=impl)
    assert '"eager", "sdpa"' in str(info.value)
    with pytest.raises(OptionError, match="attn_implementation=3 is not valid"):
        load(model_dirs("llama"), attn_implementation=3)
    llm = load(model_dirs("llama"), attn_implementation="eager")      # one it can run
    llm.unload()


def test_absurd_config_sizes_are_checked_before_allocating(model_dirs, tmp_path):
    folder = tmp_path / "huge-vocab"
    shutil.copytree(model_dirs("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 10**12                       # 256 TB of embedding in float32
    (folder / "config.json").write_text(json.dumps(cfg))
    for call in (lambda: load(str(folder)), lambda: nb_offload.plan(str(folder), device="cpu")):
        with pytest.raises(CheckpointError, match=r"has shape \[320, 64\], but the model built from config.json "
                                                  r"expects \[1000000000000, 64\]"):
            call()


def test_pin_pattern_that_is_not_a_string(model_dirs):
    with pytest.raises(PinError, match=r"pin pattern 5 is not a string \(int\)"):
        load(model_dirs("llama"), pins={5: "disk"})


@pytest.mark.parametrize("name, value", [("trace", "maybe"), ("trace", 1), ("progress", "no"), ("hold_spare", None)])
def test_switches_take_bools(model_dirs, name, value):
    with pytest.raises(OptionError, match=f"{name}={value!r} is not valid; accepted: True or False"):
        load(model_dirs("llama"), **{name: value})


# -- shapes ------------------------------------------------------------------------------------------
def rewrite_tensor(folder, key, make):
    """Replace one tensor of a copied checkpoint with ``make(old)``."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors[key] = make(tensors[key]).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("key, make", [
    ("model.layers.1.input_layernorm.weight", lambda t: t[:1]),                 # [1] for [64]: broadcast before
    ("model.layers.2.self_attn.k_proj.weight", lambda t: t.t()),                # [64, 32] for [32, 64]
    ("model.layers.2.mlp.up_proj.weight", lambda t: t.t()),                     # transposed: a RuntimeError before
])
@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_checkpoint_shape_differs_from_the_model(model_dirs, tmp_path, key, make, where):
    folder = tmp_path / "bad-shape"
    shutil.copytree(model_dirs("llama"), folder)
    path = rewrite_tensor(str(folder), key, make)
    pins = {"model.layers.*": "disk"} if where == "disk" else None
    with pytest.raises(CheckpointError) as info:
        load(str(folder), disk=tmp_path / "offload", pins=pins, dtype="bfloat16")
    msg = str(info.value)
    assert repr(key) in msg and repr(path) in msg and "expects" in msg
    assert not (tmp_path / "offload").exists()


def test_converted_tensors_with_wrong_shapes(model_dirs, tmp_path):
    """Per-expert tensors that transformers fuses: a wrong shape is caught after the conversion."""
    folder = tmp_path / "bad-expert"
    shutil.copytree(model_dirs("mixtral"), folder)
    from safetensors import safe_open
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        expert = next(k for k in f.keys() if ".experts." in k and k.startswith("model.layers.1."))
    rewrite_tensor(str(folder), expert, lambda t: t[:, :-1])
    with pytest.raises(CheckpointError) as info:
        load(str(folder))
    assert "model.layers.1" in str(info.value) and "expects" in str(info.value)
