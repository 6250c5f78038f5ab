"""Routed experts (experts.py): a streamed MoE block is read without its expert rows, and only the rows
of the experts the router picks are read before they compute. CPU device, blocks on disk."""

import pytest
import torch
from helpers import PROMPT, reference, run_offloaded

import nb_offload
from nb_offload.experts import RoutedExperts


def test_an_experts_rows_and_the_rest_of_the_block():
    found = RoutedExperts("model.layers.0.mlp.experts", 4, [(100, 10), (200, 5)])
    assert found.ranges([1, 3]) == [(110, 120), (130, 140), (205, 210), (215, 220)]
    from nb_offload.units import ParamSlot
    params = [ParamSlot(["a"], (10,), None, 0, 40), ParamSlot(["b"], (4,), None, 40, 16),
              ParamSlot(["e.gate_up"], (4, 10), None, 100, 40), ParamSlot(["n"], (1,), None, 160, 4),
              ParamSlot(["e.down"], (4, 5), None, 200, 20), ParamSlot(["m"], (2,), None, 256, 8)]
    assert found.rest(params) == [(0, 56), (160, 164), (256, 264)]      # their bytes, not the padding
    index = torch.tensor([[3, 1], [1, 0]])
    assert found.routed((None, index, None), {}) == [0, 1, 3]
    assert found.routed((None,), {"top_k_index": torch.tensor([[2, 2]])}) == [2]


def all_on_disk(folder, disk, **options):
    """The model loaded on the CPU device with every block streamed from disk."""
    return nb_offload.load(folder, device="cpu", disk=disk, pins={"model.layers.*": "disk"}, progress=False,
                           **options)


def batch_of_four():
    ids = torch.tensor(PROMPT * 4)
    ids[1:, 0] = torch.tensor([9, 11, 13])
    return ids


def plain_generate(folder, ids, n=8):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_streamed_moe_blocks_read_only_the_routed_experts(arch, model_dirs, tmp_path):
    folder = model_dirs(arch)
    want_tokens, want_logits = reference(folder)
    with all_on_disk(folder, tmp_path, hold_spare=False) as llm:
        eng = llm._engine
        blocks = [i for i in eng.stream_order() if eng.units[i].kind == "block"]
        assert set(eng.routed) == set(blocks) and blocks
        before = llm.stats.as_dict()
        tokens, logits = run_offloaded(llm)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
        s = llm.stats
        assert s.experts_read > 0 and s.experts_skipped > 0
        whole = sum(eng.units[i].nbytes for i in blocks)
        assert s.bytes_from_disk - before["bytes_from_disk"] < s.steps * whole     # fewer bytes than whole blocks
        assert any(e.kind == "read" and "experts)" in e.unit for e in llm.trace)
        assert "experts (the ones routed to)" in s.run_summary(before, 10, 1.0) and "experts read" in str(s)
        ids = batch_of_four()                   # a batch reads the union of its tokens' experts
        assert torch.equal(llm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False),
                           plain_generate(folder, ids))


def test_re_pinned_and_held_moe_blocks_stay_exact(model_dirs, tmp_path):
    folder = model_dirs("qwen2_moe")
    want_tokens, _ = reference(folder)
    with all_on_disk(folder, tmp_path, hold_spare=False) as llm:
        llm.pin("model.layers.0", "cpu")        # resident now: read whole, once
        assert all(llm._engine.units[i].name != "model.layers.0" for i in llm._engine.routed)
        assert torch.equal(run_offloaded(llm)[0], want_tokens)
        llm.hold_spare = True                   # held blocks run whole from buffers of their own
        assert torch.equal(run_offloaded(llm)[0], want_tokens)


def test_dense_blocks_have_no_routed_experts(model_dirs, tmp_path):
    with all_on_disk(model_dirs("llama"), tmp_path) as llm:
        assert llm._engine.routed == {}


def test_routed_experts_read_around_the_page_cache(model_dirs, tmp_path):
    folder = model_dirs("mixtral")
    want_tokens, _ = reference(folder)
    with all_on_disk(folder, tmp_path, drop_page_cache=True) as llm:
        assert llm.uncached_disk_reads
        assert torch.equal(run_offloaded(llm)[0], want_tokens) and llm.stats.experts_skipped > 0


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_every_experts_implementation_reads_only_routed_rows_and_matches_its_reference(implementation, model_dirs,
                                                                                       tmp_path):
    from transformers import AutoModelForCausalLM
    folder = model_dirs("mixtral")
    model = AutoModelForCausalLM.from_pretrained(folder, experts_implementation=implementation).eval()
    with torch.inference_mode():
        want, _ = run_offloaded(model)
    with all_on_disk(folder, tmp_path, experts_implementation=implementation) as llm:
        assert llm.model.config._experts_implementation == implementation
        assert torch.equal(run_offloaded(llm)[0], want) and llm.stats.experts_skipped > 0


def test_an_unknown_experts_implementation_is_refused(model_dirs):
    with pytest.raises(nb_offload.OptionError, match="experts_implementation='fast'.*accepted"):
        nb_offload.load(model_dirs("mixtral"), device="cpu", experts_implementation="fast", progress=False)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_the_plan_predicts_the_bytes_a_decode_step_reads(arch, model_dirs, tmp_path):
    """On the CPU, a streamed MoE block's entry counts what a batch-1 decode step reads of it; the engine's
    own counters, over a long and a short generate, read exactly that."""
    folder = model_dirs(arch)
    plan = nb_offload.plan(folder, device="cpu", disk=tmp_path / "p", pins={"model.layers.*": "disk"})
    predicted = plan.streamed_bytes_per_token()["disk"]
    assert 0 < predicted < sum(e.bytes for e in plan if e.tier == "disk")
    assert "only the routed experts" in str(plan)
    with all_on_disk(folder, tmp_path / "l", hold_spare=False) as llm:
        ids = torch.tensor(PROMPT)

        def read(n):
            before = llm.stats.bytes_from_disk
            llm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return llm.stats.bytes_from_disk - before
        read(2)             # the first pass after a load learns the run order (a surprise re-reads)
        assert (read(10) - read(2)) / 8 == predicted
