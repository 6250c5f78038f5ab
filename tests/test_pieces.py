"""Blocks stream a submodule at a time (pieces.py): layout, planning, and identical outputs (CPU)."""

import pytest
import torch
from helpers import ARCHS, blocks, reference, run_offloaded

import nb_offload
from nb_offload.loader import Inspection


def block_units(folder):
    return [u for u in Inspection(folder).units if u.kind == "block"]


def test_llama_block_pieces_are_attention_and_the_mlp_projections(model_dirs):
    u = block_units(model_dirs("llama"))[0]
    names = [pc.module.removeprefix(u.name + ".") for pc in u.pieces]
    assert names == ["self_attn", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert [s.names[0].removeprefix(u.name + ".") for s in u.rest] == ["input_layernorm.weight",
                                                                        "post_attention_layernorm.weight"]
    assert u.stream_nbytes == max(pc.nbytes for pc in u.pieces) < u.nbytes / 2


@pytest.mark.parametrize("arch", ARCHS)
def test_pieces_cover_the_block_once(arch, model_dirs):
    for u in block_units(model_dirs(arch)):
        assert u.pieces, f"{arch}: {u.name} did not split"
        spans = sorted((pc.start, pc.end) for pc in u.pieces)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= u.nbytes
        in_pieces = [s.names[0] for pc in u.pieces for s in pc.params]
        in_rest = [s.names[0] for s in u.rest]
        assert sorted(in_pieces + in_rest) == sorted(s.names[0] for s in u.params)
        for pc in u.pieces:             # every piece param lies inside its piece's range
            assert all(0 <= s.offset and s.offset + s.nbytes <= pc.nbytes for s in pc.params)
            assert all(n.startswith(pc.module + ".") for s in pc.params for n in s.names)


def test_split_blocks_off_streams_whole_blocks(model_dirs):
    folder = model_dirs("llama")
    pins = {"model.layers.*": "cpu"}
    whole = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins=pins, split_blocks=False)
    split = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins=pins, split_blocks=True)
    assert not whole.split_blocks and split.split_blocks
    assert split.reserved["staging_slots"] < whole.reserved["staging_slots"]


def test_auto_splits_when_whole_slots_would_crowd_the_budget(model_dirs):
    folder = model_dirs("llama", num_hidden_layers=8)
    whole = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", split_blocks=False)
    block = blocks(whole)[0].bytes
    base = sum(whole.reserved.values()) + sum(e.bytes for e in whole if e.kind == "top")
    tight = nb_offload.plan(folder, gpu=base + 4 * block, cpu="1GiB")       # slots: a third of it
    roomy = nb_offload.plan(folder, gpu=base + 40 * block, cpu="1GiB",      # slots: a few percent
                            pins={"model.layers.0-1": "cpu"})
    assert tight.split_blocks and not roomy.split_blocks
    assert nb_offload.plan(folder, gpu=base + 40 * block, cpu="1GiB", pins={"model.layers.0-1": "cpu"},
                           split_blocks=True).split_blocks


def test_bad_split_option_is_refused(model_dirs):
    with pytest.raises(nb_offload.OffloadError, match="split_blocks='yes'.*True, False or \"auto\""):
        nb_offload.plan(model_dirs("llama"), device="cpu", split_blocks="yes")


def test_smaller_slots_keep_more_blocks_resident(model_dirs):
    folder = model_dirs("llama", num_hidden_layers=8)
    whole = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", split_blocks=False)
    block = blocks(whole)[0].bytes
    gpu = sum(whole.reserved.values()) + sum(e.bytes for e in whole if e.kind == "top") + 5 * block
    on_gpu = {flag: [e.tier for e in blocks(nb_offload.plan(folder, gpu=gpu, cpu="1GiB", split_blocks=flag))
                     ].count("gpu")
              for flag in (False, True)}
    assert on_gpu[True] > on_gpu[False], on_gpu


@pytest.mark.parametrize("arch", ["gpt2", "mixtral"])
def test_whole_and_split_streaming_give_the_same_tokens(arch, model_dirs, tmp_path):
    folder = model_dirs(arch)
    want_tokens, want_logits = reference(folder)
    for flag in (False, True):
        pins = {e.name: "disk" for e in blocks(nb_offload.plan(folder, device="cpu"))}
        llm = nb_offload.load(folder, device="cpu", disk=tmp_path / "offload", pins=pins, split_blocks=flag,
                              hold_spare=False, progress=False)
        try:
            tokens, logits = run_offloaded(llm)
            assert torch.equal(tokens, want_tokens)
            torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
            eng = llm._engine
            assert bool(eng.pieces_of) == flag
            computed = {ev.unit for ev in llm.trace if ev.kind == "compute"}
            assert computed == {e.name for e in blocks(llm.plan)}      # pieces report their block's name
        finally:
            llm.unload()
