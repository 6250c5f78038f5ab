"""Every user-facing mistake is an OffloadError that names the bad value and the accepted form."""

import os
import shutil

import pytest
import torch
from helpers import tight_cpu_budget

import nb_offload
from nb_offload import BudgetError, CheckpointError, DiskTierError, OffloadError, OptionError, PinError


def load(folder, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    return nb_offload.load(folder, **kw)


def test_malformed_sizes(model_dirs):
    folder = model_dirs("llama")
    for bad in ("abc", "-1GiB", "6 parsecs"):
        with pytest.raises(BudgetError, match=repr(bad)):
            load(folder, cpu=bad)


def test_budget_under_minimum_says_the_minimum(model_dirs, tmp_path):
    folder = model_dirs("llama")
    with pytest.raises(BudgetError) as info:
        load(folder, cpu="100KiB", disk=tmp_path)
    msg = str(info.value)
    assert "cpu=100 KiB is below the minimum" in msg and "at least" in msg
    # the minimum it names does load
    need = msg.split("at least ")[1].split(",")[0]
    llm = load(folder, cpu=need.replace(" ", ""), disk=tmp_path)
    assert any(e.tier == "disk" for e in llm.plan)
    llm.unload()


def test_budget_too_small_without_disk(model_dirs):
    folder = model_dirs("llama")
    with pytest.raises(BudgetError, match="disk= folder"):
        load(folder, cpu="6.6MiB")


def test_missing_folder(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load(missing)
    assert missing in str(info.value) and "save_pretrained" in str(info.value)


def test_folder_without_weights(tmp_path, model_dirs):
    shutil.copy(os.path.join(model_dirs("llama"), "config.json"), tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="has no weights") as info:
        load(str(tmp_path))
    assert ".safetensors" in str(info.value)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        load(str(tmp_path))


def test_hub_id_absent_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError) as info:
        load("some-org/some-model-that-is-not-cached")
    msg = str(info.value)
    assert "'some-org/some-model-that-is-not-cached'" in msg and "local Hugging Face cache" in msg


def test_pin_matches_nothing(model_dirs):
    with pytest.raises(PinError, match="'model.blocks.0' matches no module") as info:
        load(model_dirs("llama"), pins={"model.blocks.0": "cpu"})
    assert "model.layers" in str(info.value)


def test_pin_inside_a_block(model_dirs):
    with pytest.raises(PinError, match="names a part of block 'model.layers.0'"):
        load(model_dirs("llama"), pins={"model.layers.0.mlp": "cpu"})


def test_unknown_tier(model_dirs):
    with pytest.raises(PinError, match=r"tier 'vram' is unknown; accepted: a tier \(gpu, cpu, disk, or cpu-compute"):
        load(model_dirs("llama"), pins={"model.layers.0": "vram"})


def test_gpu_tier_without_gpu(model_dirs):
    with pytest.raises(PinError, match="not available here"):
        load(model_dirs("llama"), pins={"model.layers.0": "gpu"})


def test_backwards_range(model_dirs):
    with pytest.raises(PinError, match="runs backwards"):
        load(model_dirs("llama"), pins={"model.layers.3-1": "cpu"})


@pytest.mark.parametrize("kw,fragment", [
    (dict(dtype="float12"), "dtype='float12' is not supported; accepted: float32, float16, bfloat16"),
    (dict(quant="int3"), "quant='int3' is unknown"),
    (dict(policy="fastest"), "policy='fastest' is unknown; accepted: 'auto'"),
    (dict(device="tpu"), "device='tpu' is not supported"),
    (dict(context=0), "context=0 is not valid"),
    (dict(prefetch=-1), "prefetch=-1 is not valid"),
    (dict(temperature=3), "unsupported option(s) ['temperature']"),
])
def test_unknown_options(model_dirs, kw, fragment):
    with pytest.raises(OptionError) as info:
        load(model_dirs("llama"), **kw)
    assert fragment in str(info.value)


def test_gpu_budget_on_cpu_machine(model_dirs):
    with pytest.raises(OptionError, match="gpu='4GiB' was given but compute runs on the CPU"):
        load(model_dirs("llama"), gpu="4GiB")


def test_truncated_safetensors(model_dirs, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(model_dirs("llama"), bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load(str(bad))
    assert str(weights) in str(info.value)
    weights.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load(str(bad))


def test_pickle_checkpoint_needs_opt_in(model_dirs, tmp_path):
    from safetensors.torch import load_file
    folder = tmp_path / "pickled"
    shutil.copytree(model_dirs("llama"), folder)
    state = load_file(str(folder / "model.safetensors"))
    torch.save(state, folder / "pytorch_model.bin")
    os.remove(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="allow_pickle=True") as info:
        load(str(folder))
    assert "pytorch_model.bin" in str(info.value)
    llm = load(str(folder), allow_pickle=True)
    ref = load(model_dirs("llama"))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(llm(ids).logits, ref(ids).logits)
    llm.unload()
    ref.unload()


def test_disk_folder_that_cannot_be_created(model_dirs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DiskTierError) as info:
        load(model_dirs("llama"), disk=str(blocker / "offload"), pins={"model.layers.*": "disk"},
             dtype="bfloat16")
    assert str(blocker) in str(info.value) and "is a file" in str(info.value)


def test_disk_full_up_front_leaves_nothing(model_dirs, tmp_path, monkeypatch):
    import nb_offload.cache as cache
    monkeypatch.setattr(cache, "disk_free", lambda path: 1000)
    root = tmp_path / "offload"
    with pytest.raises(DiskTierError, match="1000 B free but the offload cache needs"):
        load(model_dirs("llama"), disk=str(root), pins={"model.layers.*": "disk"}, dtype="bfloat16")
    assert not root.exists()


def test_disk_full_while_writing_leaves_nothing_half_written(model_dirs, tmp_path, monkeypatch):
    import errno

    import nb_offload.cache as cache
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd, data):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(cache.os, "write", failing_write)
    root = tmp_path / "offload"
    with pytest.raises(DiskTierError, match="is full"):
        load(model_dirs("llama"), disk=str(root), pins={"model.layers.*": "disk"}, dtype="bfloat16")
    assert not root.exists()  # the folders this load made are gone, and with them every temp file


def test_model_still_generates_after_errors(model_dirs, tmp_path):
    folder = model_dirs("llama")
    llm = load(folder, disk=tmp_path, pins={"model.layers.2-3": "disk"})
    ids = torch.tensor([[5, 17, 42, 7]])
    before = llm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    plan_before = str(llm.plan)
    for bad in (lambda: llm.pin("model.nope", "cpu"), lambda: llm.pin("model.layers.0", "tape"),
                lambda: llm.pin("model.layers.0", "gpu"), lambda: llm.unpin("model.layers.0"),
                lambda: llm.pin("model.layers.0-1", "disk") and llm.pin("*", "cpu") and None):
        try:
            bad()
        except OffloadError:
            pass
    llm.unpin("model.layers.0-1") if llm.plan["model.layers.0"].pinned else None
    llm.pin("model.layers.2-3", "disk")
    after = llm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(before, after)
    assert "model.layers.2-3" in plan_before
    llm.unload()
    with pytest.raises(OffloadError, match="was unloaded"):
        llm.generate(ids, max_new_tokens=2)


def test_pin_over_budget_is_refused_and_model_unchanged(model_dirs, tmp_path):
    folder = model_dirs("llama")
    llm = load(folder, cpu=tight_cpu_budget(folder, tmp_path, keep_blocks=0), disk=tmp_path, split_blocks=True)
    ids = torch.tensor([[5, 17, 42, 7]])
    before = llm.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    plan_before = str(llm.plan)
    with pytest.raises(BudgetError, match="below the minimum"):
        llm.pin("*", "cpu")
    assert str(llm.plan) == plan_before
    assert torch.equal(llm.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False), before)
    llm.unload()


def test_hub_id_resolves_from_the_local_cache_offline(model_dirs, tmp_path, monkeypatch):
    """A Hub id found in the local Hugging Face cache loads with downloads off."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(model_dirs("llama"), snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    llm = load("tiny-org/tiny-llama")
    ref = load(model_dirs("llama"))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(llm(ids).logits, ref(ids).logits)
    assert llm.tokenizer is not None
    llm.unload()
    ref.unload()
