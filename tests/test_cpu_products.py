"""The CPU blocks' one-row products from reordered weights (cpu_products.py): the check that admits a shape only
where they equal F.linear to the bit, the room the copies take, and tokens through them."""

import pytest
import torch
import torch.nn.functional as F

import nb_offload
from nb_offload import block_rest, cpu_experts, cpu_products
from nb_offload.cpu_products import PackedLinears, matches

BF16 = torch.bfloat16
# a tiny model's shapes, wide enough that torch's bf16 one-row product is oneDNN's (out * in > 4096)
WIDE = dict(hidden_size=128, intermediate_size=256)


@pytest.fixture
def fresh_checks(monkeypatch):
    monkeypatch.setattr(cpu_products, "_checked", {})


def _in_turn(order=None):
    """A kernel that adds the products one after another in fp32, in ``order`` (positions; as they come where
    None), then the bias."""
    def product(x, w, b):
        rows = x.reshape(1, -1).float() * w.float()
        out = torch.zeros(rows.shape[0])
        for j in (order if order is not None else range(rows.shape[1])):
            out = out + rows[:, j]
        out = out if b is None else out + b.float()
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)
    return product


def _stand_in(monkeypatch, product, reference=None):
    """Kernels standing in for oneDNN's: the "reordered" weights are a copy, multiplied by ``product``; and for
    F.linear, ``reference`` where given."""
    monkeypatch.setattr(cpu_products, "reorder", lambda torch, w: w.detach().clone())
    monkeypatch.setattr(cpu_products, "product", lambda torch, x, w, b, n: product(x, w, b))
    if reference is not None:
        monkeypatch.setattr(cpu_products, "_reference", reference)


def _reversed_at(where):
    def order(k):
        positions = list(range(k))
        at = {"the first three": slice(0, 3), "the last three": slice(k - 3, k)}[where]
        positions[at] = positions[at][::-1]
        return positions
    return order


def _blocks_swapped(k):
    """Blocks of 16 inputs, the first two taken in turn the other way round (a K loop's order)."""
    return list(range(16, 32)) + list(range(16)) + list(range(32, k))


@pytest.mark.parametrize("order", [_reversed_at("the first three"), _reversed_at("the last three"),
                                   _blocks_swapped], ids=["first three reversed", "last three reversed",
                                                          "two blocks swapped"])
@pytest.mark.parametrize("shape", [(64, 64), (128, 64), (256, 512)])
def test_a_kernel_that_adds_in_another_order_is_refused(monkeypatch, fresh_checks, order, shape):
    """Against a reference that adds one product after another: the same kernel with a few additions in
    another order, where random data would rarely show it."""
    _stand_in(monkeypatch, _in_turn(order(shape[1])), reference=_in_turn())
    assert not matches(torch, *shape, BF16, False, 1)
    assert not matches(torch, *shape, BF16, True, 1)


def _halves(x, w, b):
    """Each half of the inputs summed on its own (in fp32, as a kernel's partial sums), then the two added."""
    h = x.shape[-1] // 2
    out = F.linear(x[..., :h].float(), w[:, :h].float()) + F.linear(x[..., h:].float(), w[:, h:].float())
    return (out if b is None else out + b.float()).to(x.dtype)


def _bias_after_rounding(x, w, b):
    out = F.linear(x, w)
    return out if b is None else out + b


@pytest.mark.parametrize("shape", [(64, 64), (256, 512), (1024, 4096)])
def test_partial_sums_of_other_groups_and_a_bias_added_after_rounding_are_refused(monkeypatch, fresh_checks, shape):
    _stand_in(monkeypatch, _halves)
    assert not matches(torch, *shape, BF16, False, 1)
    monkeypatch.setattr(cpu_products, "_checked", {})
    _stand_in(monkeypatch, _bias_after_rounding, reference=lambda x, w, b: F.linear(x.float(), w.float(), None
                                                                                    if b is None else b.float())
              .to(x.dtype))
    assert not matches(torch, *shape, BF16, True, 1)


def test_the_same_kernel_passes_at_the_threads_asked_and_the_verdict_is_kept(monkeypatch, fresh_checks):
    threads_seen = []

    def same(x, w, b):
        threads_seen.append(torch.get_num_threads())
        return F.linear(x, w, b)
    _stand_in(monkeypatch, same)
    mine = torch.get_num_threads()
    assert matches(torch, 256, 512, BF16, False, 1)
    assert threads_seen and set(threads_seen) == {1}
    calls = len(threads_seen)
    assert matches(torch, 256, 512, BF16, False, 1) and len(threads_seen) == calls     # kept
    assert matches(torch, 256, 512, BF16, True, 2) and set(threads_seen[calls:]) == {2}
    assert torch.get_num_threads() == mine


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


def _block(model_dirs, layer=1, arch="llama"):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dirs(arch, **WIDE), dtype=BF16).eval()
    return model, model.model.layers[layer]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_blocks_linears_take_the_copies_for_one_row_in_host_memory_only(arch, model_dirs, monkeypatch):
    """Every block's linears given copies (qwen2's q/k/v have a bias): a prefill's rows go to the linears' own
    forward, one row with the weights still where they were copied from takes the copy, and the tokens and
    logits are the model's own."""
    if not _real_matches():
        pytest.skip("this CPU's torch has no reordered bf16 product matching F.linear")
    model, _ = _block(model_dirs, arch=arch)
    ids = torch.tensor([list(range(1, 9))])
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        logits = model(ids).logits
    threads = torch.get_num_threads()
    packs = [PackedLinears(torch, layer, threads) for layer in model.model.layers]
    copied = [lin for p in packs for lin, _, _ in p.linears]
    assert copied and all(p.bytes == sum(lin.weight.numel() * 2 for lin, _, _ in p.linears) for p in packs)
    assert (arch == "qwen2") == any(lin.bias is not None for lin in copied)
    rows, real = [], cpu_products.product

    def counted(torch, x, w, b, n):
        rows.append(x.shape)
        return real(torch, x, w, b, n)
    monkeypatch.setattr(cpu_products, "product", counted)
    for p in packs:
        p.install()
    try:
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, logits) and not rows      # a prefill: F.linear's
            assert torch.equal(model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False), want)
            assert len(rows) == 5 * len(copied)      # the five decode steps, every copied linear
            assert all(shape[:-1] == (1, 1) for shape in rows)
            rows.clear()
            linear = copied[0]
            x = torch.randn(1, 1, linear.in_features).to(BF16)
            home = linear.weight.data
            linear.weight.data = home.clone()        # bound elsewhere: its own forward, on the weights it has now
            assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias)) and not rows
            linear.weight.data = home
            wide = torch.randn(1, 1, 2 * linear.in_features).to(BF16)[..., ::2]     # a row, not contiguous
            assert torch.equal(linear(wide), F.linear(wide, linear.weight, linear.bias)) and not rows
            torch.set_num_threads(threads + 1)      # threads the check didn't see
            try:
                assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias)) and not rows
            finally:
                torch.set_num_threads(threads)
            with pytest.raises(RuntimeError):       # another dtype: the linear's own error
                linear(x.float())
            assert not rows
            for lin in copied:      # one row: the copy's product, F.linear's to the bit, bias and all
                one = torch.randn(1, 1, lin.in_features).to(BF16)
                assert torch.equal(lin(one), F.linear(one, lin.weight, lin.bias))
            assert len(rows) == len(copied)
    finally:
        for p in packs:
            p.remove()
    assert not any("forward" in vars(m) for m in model.modules())


def test_subclasses_with_a_forward_of_their_own_and_narrow_linears_keep_f_linear(fresh_checks, monkeypatch):
    _stand_in(monkeypatch, lambda x, w, b: F.linear(x, w, b))
    monkeypatch.setattr(cpu_products, "available", lambda torch: True)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Plain(torch.nn.Linear):       # no forward of its own: its products are nn.Linear's
        pass
    block = torch.nn.ModuleDict({"scaled": Scaled(64, 64, dtype=BF16), "plain": Plain(64, 64, dtype=BF16),
                                 "router": torch.nn.Linear(64, 8, dtype=BF16), "wide": torch.nn.Linear(64, 64,
                                                                                                     dtype=BF16)})
    packed = PackedLinears(torch, block, 1)
    assert [lin for lin, _, _ in packed.linears] == [block["plain"], block["wide"]]


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
    names = ["model.layers.1", "model.layers.2"]
    with nb_offload.load(folder, device="cpu", dtype="bfloat16", progress=False, hold_spare=False,
                         pins=dict.fromkeys(names, "cpu")) as llm:
        ids_of = [next(u.index for u in llm._insp.units if u.name == name) for name in names]
        llm._engine.remove()
        stores = llm._storage.stores
        first = llm.model.get_submodule(names[0])
        room = cpu_products.reordered_bytes(torch, first, BF16, cpu_experts.host_threads())
        assert room > 0

        def engine(room):
            eng = Engine(llm.model, llm._insp.units, llm._params, {}, llm._device, llm.trace, llm.stats,
                         cpu_blocks={i: stores[i].flat for i in ids_of}, cpu_max_tokens=1, packed_room=room)
            eng.install()
            llm._engine = eng
            return eng
        eng = engine(room)         # room for the first block's copies only
        packed = [lin for p in eng._packed for lin, _, _ in p.linears]
        assert packed and all(lin in set(first.modules()) for lin in packed)
        assert llm.stats.cpu_packed_linears == len(packed) and llm.stats.cpu_packed_bytes == room
        assert llm.stats.cpu_plain_linears == len(cpu_products.candidates(torch, llm.model.get_submodule(names[1]),
                                                                          BF16))
        assert "products from reordered weights" in str(llm.stats)
        assert torch.equal(llm.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False), want)
        eng.remove()
        assert not any("forward" in vars(m) for m in llm.model.modules() if isinstance(m, torch.nn.Linear))
        assert llm.stats.cpu_packed_linears == llm.stats.cpu_packed_bytes == 0
        assert "reordered" not in str(llm.stats)
        eng = engine(None)
        assert llm.stats.cpu_packed_bytes == 2 * room
        eng.remove()
        assert not engine(0)._packed and llm.stats.cpu_packed_linears == 0


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

    def measured(torch, dtype, shapes, threads, token_counts, repeats, beside=None, packed=False, fast=False,
                 amx=False):
        asked.append(packed)
        rates = {1: 10e9}
        if packed and reordered:
            rates[hybrid.REORDERED] = reordered
        return rates
    monkeypatch.setattr(hybrid, "rates_by_tokens", measured)
    monkeypatch.setattr(hybrid, "cpu_max_tokens", lambda *a, **k: 1)
    monkeypatch.setattr(block_rest, "seconds", lambda *a, **k: None)      # the products' rates alone
    insp = loader.Inspection(model_dirs("llama"), nb_offload.Options(compute="hybrid", pack_cpu_weights=packed_asked))
    assert insp.cpu_products() == want and asked == [packed_asked]
    assert insp.cpu_rates()[0] == max(10, (reordered or 0) / 1e9)
    plan = nb_offload.plan(model_dirs("llama"), gpu="1GiB", cpu="1GiB", pins={"model.layers.*": "cpu-compute"},
                           pack_cpu_weights=packed_asked)
    assert plan.cpu_products == want
    assert ("reordered for the CPU" in str(plan)) == (want == "reordered")


def test_the_rate_probe_times_the_reordered_products_in_turn_with_f_linear(monkeypatch, fresh_checks):
    """The reordered way multiplies by the copies for the shapes that match, by F.linear for the others, and its
    passes alternate with F.linear's."""
    from nb_offload import hybrid
    events = []
    real_linear = F.linear
    monkeypatch.setattr(cpu_products, "available", lambda torch: True)
    monkeypatch.setattr(cpu_products, "reorder", lambda torch, w: w.detach().clone())
    monkeypatch.setattr(cpu_products, "product", lambda torch, x, w, b, n: events.append("copy") or real_linear(x, w))
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: events.append("linear") or real_linear(*a))
    cpu_products._checked.update({(256, 128, str(BF16), False, 1): True, (128, 256, str(BF16), False, 1): False})
    rates = hybrid.rates_by_tokens(torch, BF16, [(256, 128), (128, 256)], 1, (1,), repeats=1, packed=True)
    assert set(rates) == {1, hybrid.REORDERED} and all(r > 0 for r in rates.values())
    assert events == ["linear", "linear", "copy", "linear"] * 3      # two passes to warm up, one timed
    events.clear()
    assert set(hybrid.rates_by_tokens(torch, BF16, [(256, 128)], 1, (1,), repeats=1)) == {1}
    assert events == ["linear"] * 3


def _measured_rates(monkeypatch, reordered=20e9):
    from nb_offload import hybrid

    def measured(torch, dtype, shapes, threads, token_counts, repeats, beside=None, packed=False, fast=False,
                 amx=False):
        return {1: 10e9, **({hybrid.REORDERED: reordered} if packed and reordered else {})}
    monkeypatch.setattr(hybrid, "rates_by_tokens", measured)
    monkeypatch.setattr(hybrid, "cpu_max_tokens", lambda *a, **k: 1)
    monkeypatch.setattr(block_rest, "seconds", lambda *a, **k: None)      # the products' rates alone


def test_a_plan_reserves_host_memory_for_the_copies_or_multiplies_by_f_linear_without_room(model_dirs, monkeypatch):
    _measured_rates(monkeypatch)
    monkeypatch.setattr(cpu_products, "matches", lambda *a, **k: True)
    folder = model_dirs("llama", dtype="bfloat16", **WIDE)
    pins = {"model.layers.*": "cpu"}        # all in host memory, the hybrid split's to choose from
    plan = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins=pins, compute="hybrid")
    on_cpu = [e for e in plan if e.compute == "cpu"]
    h, wide = WIDE["hidden_size"], WIDE["intermediate_size"]
    per_block = 2 * (2 * h * h + 2 * (h // 2) * h + 3 * wide * h)        # q, o; k, v (two of four heads); mlp
    assert plan.cpu_products == "reordered" and plan.rates[0] == 20.0
    assert on_cpu and plan.host_reserved["reordered_weights"] == len(on_cpu) * per_block
    assert "reordered for the CPU" in str(plan)
    tight = plan.used()["cpu"] - per_block      # the blocks fit, their copies don't
    plan = nb_offload.plan(folder, gpu="1GiB", cpu=tight, pins=pins, compute="hybrid")
    assert plan.cpu_products == "F.linear" and plan.rates[0] == 10.0
    assert not plan.host_reserved.get("reordered_weights") and plan.used()["cpu"] <= tight
    # one inspection planning under both budgets in turn (a re-plan of a loaded model): each as if alone
    from nb_offload import loader
    opts = nb_offload.Options(compute="hybrid", pins=pins)
    insp = loader.Inspection(folder, opts, "cuda")
    pinned = loader.resolve_pins(opts.pins, insp.units)
    for cpu, products, rate in ((tight, "F.linear", 10.0), (1 << 30, "reordered", 20.0), (tight, "F.linear", 10.0)):
        plan = insp.make_plan("cuda", {"gpu": 1 << 30, "cpu": cpu, "disk": None}, pinned)
        assert (plan.cpu_products, plan.rates[0]) == (products, rate)
    # at a rate reached decoding (with the reordered products), F.linear's is that scaled as at load
    insp.use_cpu_rate(30.0)
    plan = insp.make_plan("cuda", {"gpu": 1 << 30, "cpu": tight, "disk": None}, pinned)
    assert plan.cpu_products == "F.linear" and plan.rates[0] == 15.0 and plan.rates_reached


def test_reordered_products_must_beat_f_linear_by_a_margin(model_dirs, monkeypatch):
    from nb_offload import loader
    _measured_rates(monkeypatch, reordered=10e9 * (loader.REORDERED_MARGIN - 0.01))
    insp = loader.Inspection(model_dirs("llama"), nb_offload.Options(compute="hybrid"))
    assert insp.cpu_products() == "F.linear" and insp.cpu_rates()[0] == 10.0


def test_the_model_gives_the_engine_the_room_its_plan_reserved():
    from types import SimpleNamespace

    from nb_offload.model import OffloadedModel
    plan = SimpleNamespace(cpu_products="reordered", host_reserved={"reordered_weights": 123})
    model = SimpleNamespace(options=nb_offload.Options(), plan=plan)
    assert OffloadedModel._packed_room(model) == 123
    plan.cpu_products = "F.linear"
    assert OffloadedModel._packed_room(model) == 0
    plan.cpu_products, model.options = "reordered", nb_offload.Options(pack_cpu_weights=False)
    assert OffloadedModel._packed_room(model) == 0
