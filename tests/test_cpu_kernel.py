"""nb_offload's own batch-1 CPU kernel (cpu_kernel.py): its products are F.linear's to within rounding, its
bias and ragged shapes are taken, and a machine that can't run it is told why."""

import pytest
import torch

from nb_offload import cpu_kernel

needs_kernel = pytest.mark.skipif(cpu_kernel.why_unavailable() is not None,
                                  reason=f"the kernel can't run here: {cpu_kernel.why_unavailable()}")


def exact(x, w, bias=None):
    """The product in float64, then rounded once to bf16: what any order of additions approximates."""
    y = x.double() @ w.double().T
    return (y + bias.double() if bias is not None else y).to(torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("rows, cols", [(256, 4096), (7, 100), (5, 31), (64, 11008), (1, 1)])
def test_products_are_f_linear_s_to_within_rounding(rows, cols):
    """Over shapes whose rows leave a group of four part-filled and whose columns leave a part of 32: each
    output within one bf16 step of the exactly rounded product, and equal to F.linear's in nearly all."""
    gen = torch.Generator().manual_seed(rows * 7 + cols)
    w = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, cols, generator=gen).to(torch.bfloat16)
    got = cpu_kernel.product(torch, x, w, None, threads=2)
    assert got.shape == (1, rows) and got.dtype == torch.bfloat16
    want = exact(x, w)
    step = want.float().abs().clamp_min(1e-30) * 2 ** -7        # one bf16 step at the value (8 bits kept)
    assert ((got.float() - want.float()).abs() <= step).all()
    same = (got == torch.nn.functional.linear(x, w)).float().mean().item()
    assert same >= 0.98, same


@needs_kernel
def test_a_bias_is_added_and_the_input_s_leading_shape_kept():
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(40, 64, generator=gen) * 0.05).to(torch.bfloat16)
    b = torch.randn(40, generator=gen).to(torch.bfloat16)
    x = torch.randn(1, 1, 64, generator=gen).to(torch.bfloat16)
    got = cpu_kernel.product(torch, x, w, b, threads=1)
    assert got.shape == (1, 1, 40)
    step = exact(x, w, b).float().abs().clamp_min(1e-30) * 2 ** -7
    assert ((got.float() - exact(x, w, b).float()).abs() <= 2 * step).all()
    with pytest.raises(ValueError, match="40 bf16 values"):
        cpu_kernel.product(torch, x, w, b.float(), threads=1)
    # it reads raw memory: a call of another shape is refused, not read past
    with pytest.raises(ValueError, match=r"x \(1, 1, 32\) torch.bfloat16 on cpu.*one contiguous bf16 row"):
        cpu_kernel.product(torch, x[..., :32], w, None, threads=1)


@needs_kernel
def test_the_threads_don_t_change_the_bits():
    """Each output is one thread's sum, in one order whatever the count."""
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(512, 1000, generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, 1000, generator=gen).to(torch.bfloat16)
    one = cpu_kernel.product(torch, x, w, None, threads=1)
    assert torch.equal(one, cpu_kernel.product(torch, x, w, None, threads=2))
    assert torch.equal(one, cpu_kernel.product(torch, x, w, None, threads=7))


def test_what_the_kernel_takes():
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    assert cpu_kernel.applies(torch, torch.zeros(1, 16, dtype=torch.bfloat16), w)
    assert not cpu_kernel.applies(torch, torch.zeros(2, 16, dtype=torch.bfloat16), w)       # two rows
    assert not cpu_kernel.applies(torch, torch.zeros(1, 16), w)                              # float32 input
    assert not cpu_kernel.applies(torch, torch.zeros(1, 16, dtype=torch.bfloat16), w.T.contiguous().T)
    assert not cpu_kernel.applies(torch, torch.zeros(1, 32, dtype=torch.bfloat16)[:, ::2], w)   # strided
    assert not cpu_kernel.applies(torch, torch.zeros(2, 8, dtype=torch.bfloat16), w)     # as many values, two rows
    assert not cpu_kernel.applies(torch, torch.zeros(0, 16, dtype=torch.bfloat16), w)    # none


def test_a_machine_without_it_is_told_why(monkeypatch):
    """Each missing part named; the product then refuses with the reason rather than computing otherwise."""
    monkeypatch.setattr(cpu_kernel, "_built", None)
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: {"avx512f", "sse2"})
    if cpu_kernel.sys.platform == "linux" and cpu_kernel.platform.machine() in ("x86_64", "AMD64"):
        assert cpu_kernel.why_unavailable() == "this CPU lacks avx512bw, avx512_bf16 (it needs AVX-512 BF16)"
        with pytest.raises(RuntimeError, match="unavailable: this CPU lacks"):
            cpu_kernel.product(torch, torch.zeros(1, 4, dtype=torch.bfloat16),
                               torch.zeros(2, 4, dtype=torch.bfloat16), None, 1)
        monkeypatch.setattr(cpu_kernel, "_built", None)
        monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: set(cpu_kernel.CPU_FLAGS))
        monkeypatch.setattr(cpu_kernel, "compiler", lambda: None)
        assert "no C compiler" in cpu_kernel.why_unavailable()
    else:
        assert "Linux on x86-64" in cpu_kernel.why_unavailable()
    monkeypatch.setattr(cpu_kernel, "_built", None)     # the next test builds it again


def test_a_compiler_that_fails_is_reported_with_its_last_line(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'first line' >&2\necho 'error: no such flag' >&2\nexit 1\n")
    fake.chmod(0o700)
    monkeypatch.setattr(cpu_kernel, "_built", None)
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: set(cpu_kernel.CPU_FLAGS))
    monkeypatch.setattr(cpu_kernel, "compiler", lambda: str(fake))
    if cpu_kernel.sys.platform == "linux" and cpu_kernel.platform.machine() in ("x86_64", "AMD64"):
        assert cpu_kernel.why_unavailable() == f"{fake} could not build it: error: no such flag"
    monkeypatch.setattr(cpu_kernel, "_built", None)


def test_the_option_is_checked():
    import nb_offload
    assert nb_offload.Options().cpu_kernel == "exact"
    with pytest.raises(nb_offload.OptionError,
                       match="cpu_kernel='quick' is unknown; accepted: 'exact', 'fast', 'torch'"):
        nb_offload.Options(cpu_kernel="quick")


@needs_kernel
def test_a_plan_with_the_fast_kernel_says_so_and_plans_at_its_rate(model_dirs, monkeypatch):
    """The load's measure times the kernel (not F.linear, not reordered weights) and the plan's split takes that
    rate; the plan's text says the tokens may differ. A machine that can't run it plans with F.linear and says
    why; so does a model that doesn't load as bf16."""
    import nb_offload
    from nb_offload import hybrid
    folder = model_dirs("llama", dtype="bfloat16", hidden_size=128, intermediate_size=256)
    timed = []
    real = cpu_kernel.product
    monkeypatch.setattr(cpu_kernel, "product", lambda *a: timed.append(a[2].shape) or real(*a))
    pins = {"model.layers.1": "cpu-compute"}
    plan = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins=pins, cpu_kernel="fast")
    assert plan.cpu_products == "fast" and timed       # its rate measured by the kernel itself
    assert "their products by nb_offload's own kernel" in str(plan) and "may differ" in str(plan)
    assert plan.rates is None or plan.rates[0] > 0
    exact = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins=pins)
    assert exact.cpu_products in ("F.linear", "reordered", "amx") and "own kernel" not in str(exact)
    monkeypatch.setattr(cpu_kernel, "_built", (None, "this CPU lacks avx512_bf16 (it needs AVX-512 BF16)"))
    without = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins=pins, cpu_kernel="fast")
    assert without.cpu_products in ("F.linear", "reordered")
    assert "cpu_kernel=\"fast\" can't run here (this CPU lacks avx512_bf16" in str(without)
    monkeypatch.setattr(cpu_kernel, "_built", None)
    as_float = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins=pins, cpu_kernel="fast", dtype="float32")
    assert "can't run here (it takes bf16 weights, and this model loads as torch.float32)" in str(as_float)
    assert hybrid.FAST == "fast"


@needs_kernel
def test_fast_linears_take_one_row_from_their_own_weights_and_leave_the_rest_to_the_linear(model_dirs):
    """Installed on a block: a one-row call in host memory goes to the kernel; more rows, another dtype, or the
    weight bound elsewhere (held on the GPU, say) is the linear's own; removed, the linears are as they were."""
    from transformers import AutoModelForCausalLM

    folder = model_dirs("llama", dtype="bfloat16", hidden_size=128, intermediate_size=256)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    block = model.model.layers[0]
    fast = cpu_kernel.FastLinears(torch, block)
    wide = [m for m in block.modules() if isinstance(m, torch.nn.Linear) and m.out_features >= 64]
    assert [linear for linear, _ in fast.linears] == wide and fast.skipped == 0 and fast.bytes == 0
    up = block.mlp.up_proj
    x = torch.randn(1, 1, up.in_features).to(torch.bfloat16)
    fast.install()
    try:
        assert torch.equal(up(x), cpu_kernel.product(torch, x, up.weight, None, 1))
        two = torch.randn(1, 2, up.in_features).to(torch.bfloat16)
        assert torch.equal(up(two), torch.nn.functional.linear(two, up.weight))
        moved = up.weight.data
        up.weight.data = moved.clone()          # bound elsewhere: F.linear
        assert torch.equal(up(x), torch.nn.functional.linear(x, up.weight))
        up.weight.data = moved
        up.bias = torch.nn.Parameter(torch.ones(up.out_features, dtype=torch.bfloat16))     # a bias added too
        assert torch.equal(up(x), cpu_kernel.product(torch, x, up.weight, up.bias, 1))
        up.bias = None
    finally:
        fast.remove()
    assert "forward" not in vars(up) and fast.linears == []


@needs_kernel
def test_the_engine_gives_its_cpu_blocks_the_kernel_where_the_plan_says_fast(model_dirs):
    """Engine._pack_cpu_weights with ``kernel="fast"``: every CPU block's wide linears take the kernel (counted),
    no reordered copies are made; without it, none do. (The engine computes CPU blocks on CUDA only, so its
    own state stands in here.)"""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from nb_offload.engine import Engine
    from nb_offload.trace import Stats
    folder = model_dirs("llama", dtype="bfloat16", hidden_size=128, intermediate_size=256)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    units = {1: SimpleNamespace(modules=["model.layers.1"]), 2: SimpleNamespace(modules=["model.layers.2"])}
    wide = sum(1 for m in model.model.layers[1].modules() if isinstance(m, torch.nn.Linear) and m.out_features >= 64)
    for fast in (True, False):
        eng = SimpleNamespace(torch=torch, model=model, units=units, cpu_blocks={1: None, 2: None}, stats=Stats(),
                              packed_room=0, kernel="fast" if fast else "", _packed=[])
        eng._install_kernel = lambda module, among=None, threads=None, eng=eng: Engine._install_kernel(eng, module,
                                                                                                    among, threads)
        eng._kernel_policy = lambda threads, eng=eng: Engine._kernel_policy(eng, threads)
        Engine._pack_cpu_weights(eng, threads=1)
        try:
            assert eng.stats.cpu_fast_linears == (2 * wide if fast else 0)
            assert eng.stats.cpu_packed_linears == 0 and eng.stats.cpu_packed_bytes == 0
            assert ("forward" in vars(model.model.layers[1].mlp.up_proj)) == fast
            assert "forward" not in vars(model.model.layers[0].mlp.up_proj)      # not a CPU block
        finally:
            for packed in eng._packed:
                packed.remove()


def _kernel_reference(folder, ids, n, skip=()):
    """Plain transformers' greedy tokens on the CPU with every wide linear but those under ``skip`` (module
    names) multiplying one row by the kernel: what a CPU-device load with cpu_kernel="fast" computes."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    fast = [cpu_kernel.FastLinears(torch, module) for module in model.children()]
    for f in fast:
        f.linears = [(linear, home) for linear, home in f.linears
                     if not any(m is linear for s in skip for m in model.get_submodule(s).modules())]
        f.install()
    try:
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    finally:
        for f in fast:
            f.remove()


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_on_the_cpu_device_the_units_in_host_memory_multiply_by_the_kernel(arch, model_dirs, tmp_path, monkeypatch):
    """cpu_kernel="fast" on the CPU device: the units computed where they live in host memory take the kernel for
    one-row products (decode steps), a unit streamed from the disk tier into a slot doesn't, and the tokens are
    those of transformers multiplying the same linears by the same kernel. The plan says so; exact, the tokens
    are plain transformers'."""
    import nb_offload
    folder = model_dirs(arch, dtype="bfloat16", hidden_size=128, intermediate_size=256)
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    n = 6
    calls, real = [], cpu_kernel.product
    monkeypatch.setattr(cpu_kernel, "product", lambda *a: calls.append(a[2].shape) or real(*a))
    with nb_offload.load(folder, device="cpu", cpu_kernel="fast", disk=str(tmp_path / "off"),
                         pins={"model.layers.1": "disk"}, progress=False) as llm:
        assert llm.plan.cpu_products == "fast" and llm.plan.tier_of("model.layers.1") == "disk"
        assert "one-row products of the bf16 linears in host memory by nb_offload's own kernel" in str(llm.plan)
        got = llm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        fast_linears = llm.stats.cpu_fast_linears
    # each decode step's, and of the prefill's only the head's: transformers computes it for the last token alone
    assert fast_linears > 0 and len(calls) == fast_linears * (n - 1) + 1
    assert torch.equal(got, _kernel_reference(folder, ids, n, skip=["model.layers.1"]))
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()

    def wide(module):
        return sum(isinstance(m, torch.nn.Linear) and m.out_features >= 64 for m in module.modules())
    assert fast_linears == wide(plain) - wide(plain.model.layers[1])        # all but the streamed block's
    monkeypatch.setattr(cpu_kernel, "product", real)
    with nb_offload.load(folder, device="cpu", progress=False) as llm:
        assert llm.plan.cpu_products in ("", "amx") and llm.stats.cpu_fast_linears == 0     # exact: cpu_amx.py
        assert "own kernel" not in str(llm.plan)
        exact = llm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    assert torch.equal(exact, plain.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False))


def test_on_the_cpu_device_a_machine_without_the_kernel_computes_exactly_and_says_why(model_dirs, monkeypatch):
    import nb_offload
    folder = model_dirs("llama", dtype="bfloat16", hidden_size=128, intermediate_size=256)
    monkeypatch.setattr(cpu_kernel, "_built", (None, "this CPU lacks avx512_bf16 (it needs AVX-512 BF16)"))
    plan = nb_offload.plan(folder, device="cpu", cpu_kernel="fast")
    assert plan.cpu_products == "F.linear"
    assert "products exact: cpu_kernel=\"fast\" can't run here (this CPU lacks avx512_bf16" in str(plan)
    monkeypatch.setattr(cpu_kernel, "_built", None)
    as_float = nb_offload.plan(folder, device="cpu", cpu_kernel="fast", dtype="float32")
    assert "can't run here (it takes bf16 weights, and this model loads as torch.float32)" in str(as_float)


@needs_kernel
def test_on_the_cpu_device_a_unit_holding_a_streamed_unit_s_module_leaves_its_linears_alone(model_dirs):
    """A unit's module may hold other units' modules (a unit for a parameter of the blocks' container, whose
    module is the container): the kernel goes to the linears whose weights are resident units', each once, and a
    block streamed into slots keeps F.linear. (The engine's own state stands in for a load's.)"""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from nb_offload.engine import Engine
    from nb_offload.trace import Stats
    folder = model_dirs("llama", dtype="bfloat16", hidden_size=128, intermediate_size=256)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    names = {0: "model", 1: "model.layers.0", 2: "model.layers.1", 3: "lm_head"}
    units = [SimpleNamespace(index=i, modules=[name]) for i, name in names.items()]
    params = {0: [model.model.norm.weight]}
    params.update((i, list(model.get_submodule(names[i]).parameters())) for i in (1, 2, 3))
    eng = SimpleNamespace(torch=torch, model=model, units=units, n_model=4, params=params, sources={2: None},
                          owner={}, cpu_blocks={}, stats=Stats(), _packed=[], kernel="fast")
    eng._install_kernel = lambda module, among=None, threads=None: Engine._install_kernel(eng, module, among, threads)
    eng._kernel_policy = lambda threads: Engine._kernel_policy(eng, threads)
    Engine._kernel_for_resident_units(eng)
    try:
        def wide(module):
            return [m for m in module.modules() if isinstance(m, torch.nn.Linear) and m.out_features >= 64]
        taken = [linear for fast in eng._packed for linear, _ in fast.linears]
        assert len(taken) == len({id(linear) for linear in taken}) == eng.stats.cpu_fast_linears
        assert {id(linear) for linear in taken} == {id(m) for m in wide(model.model.layers[0]) + wide(model.lm_head)}
        assert not any("forward" in vars(m) for m in wide(model.model.layers[1]))      # streamed: F.linear
    finally:
        for fast in eng._packed:
            fast.remove()
