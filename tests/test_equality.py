"""Greedy tokens and logits through every plan equal the plain transformers model's (CPU)."""

import pytest
import torch
from helpers import ARCHS, blocks, reference, run_offloaded, tight_cpu_budget

import nb_offload


@pytest.mark.parametrize("arch", ARCHS)
def test_all_resident(arch, model_dirs):
    folder = model_dirs(arch)
    want_tokens, want_logits = reference(folder)
    llm = nb_offload.load(folder, device="cpu", progress=False)
    try:
        assert all(e.tier == "cpu" for e in llm.plan)
        tokens, logits = run_offloaded(llm)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    finally:
        llm.unload()


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_and_disk_then_repin(arch, model_dirs, tmp_path):
    folder = model_dirs(arch)
    want_tokens, want_logits = reference(folder)
    disk = tmp_path / "offload"
    # hold_spare off: this test is about streaming every disk block in every step
    llm = nb_offload.load(folder, device="cpu", cpu=tight_cpu_budget(folder, disk), disk=disk, progress=False,
                          hold_spare=False, split_blocks=True)
    try:
        on_disk = [e for e in blocks(llm.plan) if e.tier == "disk"]
        assert len(on_disk) > len(blocks(llm.plan)) / 2, str(llm.plan)
        tokens, logits = run_offloaded(llm)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
        assert llm.stats.bytes_from_disk >= sum(e.bytes for e in on_disk)
        assert {ev.kind for ev in llm.trace} >= {"read", "compute"}

        # (c) re-pin a disk block to cpu: the planner makes room around it, outputs stay identical
        target = on_disk[-1].name
        llm.pin(target, "cpu")
        assert llm.plan.tier_of(target) == "cpu" and llm.plan[target].pinned
        assert llm.plan.used()["cpu"] <= llm.plan.budgets["cpu"]
        tokens, logits = run_offloaded(llm)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    finally:
        llm.unload()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_everything_on_disk_with_deep_prefetch(arch, model_dirs, tmp_path):
    folder = model_dirs(arch)
    want_tokens, _ = reference(folder, max_new_tokens=6)
    pins = {e.name: "disk" for e in nb_offload.plan(folder, device="cpu", disk=tmp_path)}
    llm = nb_offload.load(folder, device="cpu", disk=tmp_path / "d", pins=pins, prefetch=3, progress=False)
    try:
        assert all(e.tier == "disk" for e in llm.plan)
        tokens, _ = run_offloaded(llm, max_new_tokens=6)
        assert torch.equal(tokens, want_tokens)
    finally:
        llm.unload()


def test_bfloat16_through_disk_cache(model_dirs, tmp_path):
    """A dtype that differs from the checkpoint's goes through the offload cache, bit-exact."""
    folder = model_dirs("llama")
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ids = torch.tensor([[5, 17, 42, 7]])
    want = ref.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    llm = nb_offload.load(folder, device="cpu", dtype="bfloat16", disk=tmp_path,
                          pins={"model.layers.*": "disk"}, progress=False)
    try:
        got = llm.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(got, want)
        cached = list(tmp_path.glob("nb_offload-*/*.bin"))
        assert len(cached) == 4
    finally:
        llm.unload()


def test_model_generate_and_call_stream_too(model_dirs, tmp_path):
    """``llm.model`` itself streams: its forward and generate give the reference outputs."""
    folder = model_dirs("qwen2")
    want_tokens, want_logits = reference(folder)
    llm = nb_offload.load(folder, device="cpu", disk=tmp_path, pins={"model.layers.1-3": "disk"}, progress=False)
    try:
        ids = torch.tensor([[5, 17, 42, 7, 99, 3, 64, 12]])
        with torch.no_grad():
            logits = llm.model(ids).logits
            tokens = llm.model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    finally:
        llm.unload()


def test_out_of_order_calls_stay_correct(model_dirs, tmp_path):
    """A unit called out of the learned order is loaded on the spot: results don't change."""
    folder = model_dirs("llama")
    llm = nb_offload.load(folder, device="cpu", disk=tmp_path, pins={"model.layers.*": "disk"}, progress=False)
    try:
        ids = torch.tensor([[5, 17, 42]])
        first = llm(ids).logits
        layers = llm.model.model.layers
        hidden = torch.randn(1, 3, 64)
        pos = llm.model.model.rotary_emb(hidden, torch.arange(3)[None])
        with torch.no_grad():
            a = layers[2](hidden, position_embeddings=pos)
            b = layers[2](hidden, position_embeddings=pos)
            layers[0](hidden, position_embeddings=pos)
        a = a[0] if isinstance(a, tuple) else a
        b = b[0] if isinstance(b, tuple) else b
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(llm(ids).logits, first)
    finally:
        llm.unload()
