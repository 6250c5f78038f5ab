"""The CPU blocks' one-row products from reordered weights (cpu_products.py): the check that admits a shape only
where they equal F.linear to the bit, the room the copies take, and tokens through them."""

import pytest
import torch
import torch.nn.functional as F

import nb_offload
from nb_offload import cpu_products
from nb_offload.cpu_products import PackedLinears, matches

BF16 = torch.bfloat16
# a tiny model's shapes, wide enough that torch's bf16 one-row product is oneDNN's (out * in > 4096)
WIDE = dict(hidden_size=128, intermediate_size=256)


@pytest.fixture
def fresh_checks(monkeypatch):
    monkeypatch.setattr(cpu_products, "_checked", {})


def _stand_in(monkeypatch, product):
    """Kernels standing in for oneDNN's: the "reordered" weights are a copy, multiplied by ``product``."""
    monkeypatch.setattr(cpu_products, "reorder", lambda torch, w: w.detach().clone())
    monkeypatch.setattr(cpu_products, "product", lambda torch, x, w, b, n: product(x, w, b))


def _halves(x, w, b):
    """Each half of the inputs summed on its own (in fp32, as a kernel's partial sums), then the two added."""
    h = x.shape[-1] // 2
    out = F.linear(x[..., :h].float(), w[:, :h].float()) + F.linear(x[..., h:].float(), w[:, h:].float())
    return (out if b is None else out + b.float()).to(x.dtype)


def _in_turn(x, w, b):
    """The products added one after another, in fp32."""
    out = (x.reshape(1, -1).float() * w.float()).cumsum(-1)[:, -1].reshape(*x.shape[:-1], -1)
    return (out if b is None else out + b.float()).to(x.dtype)


@pytest.mark.parametrize("other_order", [_halves, _in_turn], ids=["in two halves", "one after another"])
@pytest.mark.parametrize("shape", [(64, 64), (256, 512), (1024, 4096)])
def test_a_product_that_sums_in_another_order_is_refused(monkeypatch, fresh_checks, other_order, shape):
    _stand_in(monkeypatch, other_order)
    assert not matches(torch, *shape, BF16, False, 1)
    assert not matches(torch, *shape, BF16, True, 1)


def test_the_same_kernel_passes_and_the_verdict_is_kept_per_shape_and_threads(monkeypatch, fresh_checks):
    calls = []

    def same(x, w, b):
        calls.append(tuple(w.shape))
        return F.linear(x, w, b)
    _stand_in(monkeypatch, same)
    assert matches(torch, 256, 512, BF16, False, 1)
    assert calls == [(256, 512)] * cpu_products.CHECK_INPUTS
    assert matches(torch, 256, 512, BF16, False, 1) and len(calls) == cpu_products.CHECK_INPUTS    # kept
    assert matches(torch, 256, 512, BF16, False, 2) and len(calls) == 2 * cpu_products.CHECK_INPUTS
    assert torch.get_num_threads() == torch.get_num_threads()


def test_the_check_restores_the_callers_threads_even_where_the_kernel_fails(monkeypatch, fresh_checks):
    def broken(x, w, b):
        raise RuntimeError("no such kernel for this dtype")
    _stand_in(monkeypatch, broken)
    mine = torch.get_num_threads()
    assert not matches(torch, 128, 128, BF16, False, 1)
    assert torch.get_num_threads() == mine


def _real_matches():
    """The tiny model's shapes that oneDNN's reordered product matches on this CPU (none where it can't)."""
    if not cpu_products.available(torch):
        return []
    shapes = [(128, 128), (256, 128), (128, 256), (64, 128)]
    return [s for s in shapes if matches(torch, *s, BF16, False, torch.get_num_threads())]


def test_where_the_check_admits_a_shape_random_weights_and_inputs_match_too():
    """The check's verdict against plain random data, on this CPU's own kernels."""
    admitted = _real_matches()
    if not admitted:
        pytest.skip("this CPU's torch has no reordered bf16 product matching F.linear")
    g = torch.Generator().manual_seed(0)
    for out_features, in_features in admitted:
        w = torch.randn(out_features, in_features, generator=g).to(BF16)
        packed = cpu_products.reorder(torch, w)
        for _ in range(20):
            x = torch.randn(1, 1, in_features, generator=g).to(BF16)
            assert torch.equal(cpu_products.product(torch, x, packed, None, out_features), F.linear(x, w))


def _block(model_dirs, layer=1):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dirs("llama", **WIDE), dtype=BF16).eval()
    return model, model.model.layers[layer]


def test_a_blocks_linears_take_the_copies_for_one_row_in_host_memory_only(model_dirs, monkeypatch):
    """A prefill's rows and weights bound elsewhere (the block held, or streamed through a slot) go to the
    linear's own forward; one row with the weights still where they were copied from takes the copy. Tokens
    and logits are the model's own."""
    if not _real_matches():
        pytest.skip("this CPU's torch has no reordered bf16 product matching F.linear")
    model, block = _block(model_dirs)
    ids = torch.tensor([list(range(1, 9))])
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        logits = model(ids).logits
    packed = PackedLinears(torch, block, torch.get_num_threads())
    assert packed.linears and packed.bytes == sum(lin.weight.numel() * 2 for lin, _, _ in packed.linears)
    rows, real = [], cpu_products.product

    def counted(torch, x, w, b, n):
        rows.append(x.shape)
        return real(torch, x, w, b, n)
    monkeypatch.setattr(cpu_products, "product", counted)
    packed.install()
    try:
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, logits) and not rows      # a prefill: F.linear's
            assert torch.equal(model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False), want)
            assert len(rows) == 5 * len(packed.linears)      # the five decode steps, every copied linear
            assert all(shape[:-1] == (1, 1) for shape in rows)
            rows.clear()
            linear = packed.linears[0][0]
            home = linear.weight.data
            linear.weight.data = home.clone()        # bound elsewhere: its own forward, on the weights it has now
            x = torch.randn(1, 1, linear.in_features).to(BF16)
            assert torch.equal(linear(x), F.linear(x, linear.weight)) and not rows
            linear.weight.data = home
            linear(x)
            assert len(rows) == 1
    finally:
        packed.remove()
    assert not any("forward" in vars(m) for m in block.modules())


def test_the_copies_take_only_the_room_given(model_dirs, fresh_checks, monkeypatch):
    _stand_in(monkeypatch, lambda x, w, b: F.linear(x, w, b))
    monkeypatch.setattr(cpu_products, "available", lambda torch: True)
    _, block = _block(model_dirs)
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    every = PackedLinears(torch, block, 1)
    assert [lin for lin, _, _ in every.linears] == linears and every.skipped == 0
    first = linears[0].weight.numel() * 2
    some = PackedLinears(torch, block, 1, room=first)
    assert [lin for lin, _, _ in some.linears] == linears[:1] and some.bytes == first
    assert some.skipped == len(linears) - 1
    none = PackedLinears(torch, block, 1, room=0)
    assert not none.linears and none.bytes == 0


def test_weights_of_other_dtypes_are_left_to_f_linear(model_dirs, fresh_checks, monkeypatch):
    from transformers import AutoModelForCausalLM
    _stand_in(monkeypatch, lambda x, w, b: F.linear(x, w, b))
    monkeypatch.setattr(cpu_products, "available", lambda torch: True)
    model = AutoModelForCausalLM.from_pretrained(model_dirs("llama", **WIDE), dtype=torch.float32)
    packed = PackedLinears(torch, model.model.layers[0], 1)
    assert not packed.linears and packed.skipped == 0


def test_the_engine_packs_its_cpu_blocks_within_its_room_and_unpacks_them_when_removed(model_dirs, tmp_path):
    """On the CPU device (both sides the CPU) the engine's part: the copies made at install for the CPU's
    block, counted, used by its decode steps, gone with the engine; tokens stay plain transformers'."""
    if not _real_matches():
        pytest.skip("this CPU's torch has no reordered bf16 product matching F.linear")
    from transformers import AutoModelForCausalLM

    from nb_offload.engine import Engine
    folder = model_dirs("llama", **WIDE)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=BF16).eval()
    ids = torch.tensor([list(range(1, 9))])
    with torch.inference_mode():
        want = plain.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with nb_offload.load(folder, device="cpu", dtype="bfloat16", progress=False, hold_spare=False,
                         pins={"model.layers.2": "cpu"}) as llm:
        idx = next(u.index for u in llm._insp.units if u.name == "model.layers.2")
        llm._engine.remove()
        stores = llm._storage.stores
        eng = Engine(llm.model, llm._insp.units, llm._params, {}, llm._device, llm.trace, llm.stats,
                     cpu_blocks={idx: stores[idx].flat}, cpu_max_tokens=1, packed_room=None)
        eng.install()
        llm._engine = eng
        block = llm.model.get_submodule("model.layers.2")
        assert llm.stats.cpu_packed_linears == sum(len(p.linears) for p in eng._packed) > 0
        assert llm.stats.cpu_packed_bytes > 0
        assert "products from reordered weights" in str(llm.stats)
        assert torch.equal(llm.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False), want)
        eng.remove()
        assert not any("forward" in vars(m) for m in block.modules() if isinstance(m, torch.nn.Linear))
        llm._engine = Engine(llm.model, llm._insp.units, llm._params, {}, llm._device, llm.trace, llm.stats,
                             cpu_blocks={idx: stores[idx].flat}, cpu_max_tokens=1, packed_room=0)
        llm._engine.install()
        assert not llm._engine._packed


def test_the_option_is_a_bool():
    with pytest.raises(nb_offload.OffloadError, match="pack_cpu_weights"):
        nb_offload.Options(pack_cpu_weights="no")
    assert nb_offload.Options().pack_cpu_weights is True


@pytest.mark.parametrize("reordered, packed_asked, want", [(20e9, True, "reordered"), (8e9, True, "F.linear"),
                                                           (None, False, "F.linear")])
def test_a_plan_takes_the_reordered_products_where_they_read_faster_at_load(model_dirs, monkeypatch, reordered,
                                                                            packed_asked, want):
    """The load measures both ways, takes the faster one's rate for the split, and says which in the plan."""
    from nb_offload import hybrid, loader
    asked = []

    def measured(torch, dtype, shapes, threads, token_counts, repeats, beside=None, packed=False):
        asked.append(packed)
        rates = {1: 10e9}
        if packed and reordered:
            rates[hybrid.REORDERED] = reordered
        return rates
    monkeypatch.setattr(hybrid, "rates_by_tokens", measured)
    monkeypatch.setattr(hybrid, "cpu_max_tokens", lambda *a, **k: 1)
    insp = loader.Inspection(model_dirs("llama"), nb_offload.Options(compute="hybrid", pack_cpu_weights=packed_asked))
    assert insp.cpu_products() == want and asked == [packed_asked]
    assert insp.cpu_rates()[0] == max(10, (reordered or 0) / 1e9)
    plan = nb_offload.plan(model_dirs("llama"), gpu="1GiB", cpu="1GiB", pins={"model.layers.*": "cpu-compute"},
                           pack_cpu_weights=packed_asked)
    assert plan.cpu_products == want
    assert ("reordered for the CPU" in str(plan)) == (want == "reordered")
