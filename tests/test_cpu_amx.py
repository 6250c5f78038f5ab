"""nb_offload's AMX kernel (cpu_amx.py): F.linear's bits for one row, from the chunks oneDNN sums in, found per
shape and thread count by a check that a kernel summing otherwise fails; the CPU device and the CPU's blocks
multiply by it by default where it runs, and a machine without it computes by F.linear."""

import pytest
import torch
import torch.nn.functional as F

from nb_offload import block_rest, cpu_amx, cpu_kernel, cpu_products

needs_amx = pytest.mark.skipif(cpu_amx.why_unavailable() is not None,
                               reason=f"the AMX kernel can't run here: {cpu_amx.why_unavailable()}")


def _bits_equal(a, b) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@needs_amx
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows, cols, bias", [(128, 128, False), (256, 512, True), (1024, 4096, False),
                                              (512, 11008, False), (96, 3584, True)])
def test_where_a_chunk_is_found_the_kernel_gives_f_linear_s_bits(rows, cols, bias, threads):
    """On random weights and inputs as well as the check's: every output's bits F.linear's at that thread count,
    the 11,008 inputs of LLaMA-7B's down projection too, which oneDNN sums in chunks."""
    chunk = cpu_amx.chunk_for(torch, rows, cols, torch.bfloat16, bias, threads)
    if chunk is None:
        pytest.skip(f"no chunk gives F.linear's bits for {rows}x{cols} here (torch may not run oneDNN for it)")
    assert chunk % cpu_amx.COLS == 0
    gen = torch.Generator().manual_seed(rows + cols)
    caller = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for scale in (0.02, 1.0):
            w = (torch.randn(rows, cols, generator=gen) * scale).to(torch.bfloat16)
            b = torch.randn(rows, generator=gen).to(torch.bfloat16) if bias else None
            x = torch.randn(1, 1, cols, generator=gen).to(torch.bfloat16)
            got = cpu_amx.product(torch, x, w, b, chunk, threads)
            assert got.shape == (1, 1, rows)
            assert _bits_equal(got, F.linear(x, w, b))
    finally:
        torch.set_num_threads(caller)


@needs_amx
@pytest.mark.parametrize("rows, cols", [(256, 4096), (256, 11008)])
def test_the_kernel_gives_f_linear_s_bits_at_the_edges_of_bf16(rows, cols):
    """Inputs and weights whose exponents span 2^-60 to 2^60, subnormal inputs (AMX and oneDNN treat them
    alike), a sum that overflows, an infinity and a NaN: every output's bits F.linear's (NaN for NaN)."""
    chunk = cpu_amx.chunk_for(torch, rows, cols, torch.bfloat16, False, 1)
    if chunk is None:
        pytest.skip(f"no chunk gives F.linear's bits for {rows}x{cols} here")
    gen = torch.Generator().manual_seed(cols)

    def spread(shape, reach):
        exponents = torch.randint(-reach, reach, shape, generator=gen).float()
        return torch.randn(shape, generator=gen) * torch.exp2(exponents)
    w = spread((rows, cols), 30).to(torch.bfloat16)
    inputs = {"wide": spread((1, cols), 30), "subnormal": torch.randn(1, cols, generator=gen) * 1e-39,
              "overflowing": torch.randn(1, cols, generator=gen) * 1e36,
              "infinite": torch.randn(1, cols, generator=gen).index_fill_(1, torch.tensor([5]), float("inf")),
              "nan": torch.randn(1, cols, generator=gen).index_fill_(1, torch.tensor([77]), float("nan"))}
    caller = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, x in inputs.items():
            x = x.to(torch.bfloat16)
            want, got = F.linear(x, w), cpu_amx.product(torch, x, w, None, chunk, 1)
            same = (want.view(torch.int16) == got.view(torch.int16)) | (want.isnan() & got.isnan())
            assert bool(same.all()), f"{kind}: {int((~same).sum())} outputs differ"
    finally:
        torch.set_num_threads(caller)


@needs_amx
def test_the_down_projection_s_chunks_are_found_and_a_whole_sum_is_refused():
    """oneDNN sums 11,008 inputs in chunks on this CPU at one or two threads (found by the check: not the whole);
    the kernel summing them whole then differs from F.linear in many of the check's outputs, where random data
    would show it in a few."""
    chunk = cpu_amx.chunk_for(torch, 256, 11008, torch.bfloat16, False, 1)
    if chunk is None:
        pytest.skip("no chunk matched here")
    gen = torch.Generator().manual_seed(3)
    w, _ = cpu_products._check_weights(torch, 256, 11008, torch.bfloat16, gen)
    caller = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = next(cpu_products._check_inputs(torch, 11008, torch.bfloat16, gen))
        want = F.linear(x, w)
        assert _bits_equal(cpu_amx.product(torch, x, w, None, chunk, 1), want)
        if chunk < 11008:
            whole = cpu_amx.product(torch, x, w, None, 11008, 1)
            assert (whole != want).sum() > 10
    finally:
        torch.set_num_threads(caller)


@needs_amx
def test_the_kernel_s_threads_don_t_change_its_bits():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(512, 1024, generator=gen).to(torch.bfloat16)
    x = torch.randn(1, 1024, generator=gen).to(torch.bfloat16)
    one = cpu_amx.product(torch, x, w, None, 512, threads=1)
    assert _bits_equal(one, cpu_amx.product(torch, x, w, None, 512, threads=2))
    assert _bits_equal(one, cpu_amx.product(torch, x, w, None, 512, threads=5))


@needs_amx
def test_the_check_refuses_a_kernel_that_sums_in_another_order():
    """nb_offload's fast kernel (one sum of 16 lanes a row) is close to F.linear but not its bits: the check that
    finds the AMX kernel's chunk turns it down."""
    if cpu_kernel.why_unavailable() is not None:
        pytest.skip(cpu_kernel.why_unavailable())

    def fast(weights):
        return lambda x, offsets: cpu_kernel.product(torch, x, weights, offsets, 1)
    assert cpu_products.first_as_linear(torch, 256, 4096, torch.bfloat16, False, 1, [fast]) is None
    assert cpu_amx.chunk_for(torch, 256, 4096, torch.bfloat16, False, 1) is not None


def test_the_chunks_tried():
    chunks = cpu_amx.candidate_chunks(11008)
    assert chunks[0] == 11008 and 5504 in chunks and 1600 in chunks       # whole, halves, sevenths
    assert all(c % cpu_amx.COLS == 0 for c in chunks) and len(chunks) == len(set(chunks))
    assert cpu_amx.candidate_chunks(100)[0] == 128      # rounded up to whole tiles


def test_what_the_kernel_takes_and_refuses():
    w = torch.zeros(32, 64, dtype=torch.bfloat16)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    assert cpu_amx.applies(torch, x, w)
    assert not cpu_amx.applies(torch, x[:, :48], torch.zeros(32, 48, dtype=torch.bfloat16))    # not whole tiles
    assert not cpu_amx.applies(torch, x, torch.zeros(24, 64, dtype=torch.bfloat16))
    assert not cpu_amx.applies(torch, torch.zeros(2, 64, dtype=torch.bfloat16), w)             # two rows
    if cpu_amx.why_unavailable() is None:
        with pytest.raises(ValueError, match="chunk 48: the AMX kernel takes"):
            cpu_amx.product(torch, x, w, None, 48, 1)
        with pytest.raises(ValueError, match=r"x \(1, 32\)"):
            cpu_amx.product(torch, x[:, :32], w, None, 32, 1)


def test_a_machine_without_amx_is_told_why_and_finds_no_chunk(monkeypatch):
    monkeypatch.setattr(cpu_amx, "_built", None)
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(cpu_amx, "_chunks", {})
    if cpu_kernel.sys.platform == "linux" and cpu_kernel.platform.machine() in ("x86_64", "AMD64"):
        assert cpu_amx.why_unavailable() == "this CPU lacks amx_tile, amx_bf16 (it needs AMX with bf16)"
        with pytest.raises(RuntimeError, match="AMX kernel is unavailable: this CPU lacks"):
            cpu_amx.product(torch, torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(16, 32, dtype=torch.bfloat16),
                            None, 32, 1)
    assert cpu_amx.chunk_for(torch, 256, 512, torch.bfloat16, False, 1) is None
    monkeypatch.setattr(cpu_amx, "_built", None)        # built again by the next test that asks


@needs_amx
def test_a_linear_takes_the_kernel_only_at_a_thread_count_checked_for_its_shape():
    """The Amx policy: a linear whose shape has a chunk at the block's threads takes the kernel for a one-row call
    at those threads; at a count no chunk was found for, or for two rows, F.linear computes it."""
    linear = torch.nn.Linear(512, 256, bias=False).to(torch.bfloat16)
    module = torch.nn.Sequential(linear)
    taken = cpu_kernel.KernelLinears(torch, module, cpu_amx.Amx(torch, 1))
    if not taken.linears:
        pytest.skip("no chunk for 256x512 at one thread here")
    calls, real = [], cpu_amx.product
    caller = torch.get_num_threads()
    try:
        cpu_amx.product = lambda *a: calls.append(a[-1]) or real(*a)
        taken.install()
        x = torch.randn(1, 512).to(torch.bfloat16)
        torch.set_num_threads(1)
        assert _bits_equal(linear(x), F.linear(x, linear.weight)) and calls == [1]
        linear(torch.randn(2, 512).to(torch.bfloat16))          # two rows: F.linear
        cpu_amx._chunks.pop((256, 512, str(torch.bfloat16), False, 7), None)
        torch.set_num_threads(7)
        linear(x)                                               # no chunk found at 7 threads: F.linear
        assert calls == [1]
    finally:
        cpu_amx.product = real
        torch.set_num_threads(caller)
        taken.remove()
    assert "forward" not in vars(linear)


@needs_amx
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_on_the_cpu_device_the_exact_products_are_the_amx_kernel_s_and_the_tokens_plain_transformers(
        arch, model_dirs, monkeypatch):
    """The default cpu_kernel="exact" on the CPU device: the resident units' linears multiply one row by the AMX
    kernel (counted, called), the plan says so, and the tokens equal plain transformers' on the CPU; with
    cpu_kernel="torch" no linear takes it."""
    from transformers import AutoModelForCausalLM

    import nb_offload
    folder = model_dirs(arch, dtype="bfloat16", hidden_size=128, intermediate_size=256)
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    n = 8
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    want = plain.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    calls, real = [], cpu_amx.product
    monkeypatch.setattr(cpu_amx, "product", lambda *a: calls.append(a[2].shape) or real(*a))
    with nb_offload.load(folder, device="cpu", progress=False) as llm:
        assert llm.plan.cpu_products == "amx"
        assert "by nb_offload's AMX kernel, with F.linear's bits" in str(llm.plan)
        got = llm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        taken = llm.stats.cpu_amx_linears
    assert torch.equal(got, want)
    assert taken > 0 and len(calls) >= taken * (n - 1)
    calls.clear()
    with nb_offload.load(folder, device="cpu", cpu_kernel="torch", progress=False) as llm:
        assert llm.plan.cpu_products == "" and "AMX" not in str(llm.plan)
        assert torch.equal(llm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False), want)
        assert llm.stats.cpu_amx_linears == 0 and not calls


def test_without_amx_the_cpu_device_multiplies_by_f_linear(model_dirs, monkeypatch):
    import nb_offload
    monkeypatch.setattr(cpu_amx, "_built", (None, "this CPU lacks amx_tile, amx_bf16 (it needs AMX with bf16)"))
    plan = nb_offload.plan(model_dirs("llama", dtype="bfloat16", hidden_size=128, intermediate_size=256),
                           device="cpu")
    assert plan.cpu_products == "" and "AMX" not in str(plan)
    monkeypatch.setattr(cpu_amx, "_built", None)


@pytest.mark.parametrize("amx_rate, want", [(30e9, "amx"), (9e9, "F.linear"), (None, "F.linear")])
def test_a_hybrid_plan_takes_the_amx_kernel_where_the_load_measured_it_faster(model_dirs, monkeypatch, amx_rate,
                                                                           want):
    """The load's probe times the AMX kernel beside torch's ways (cpu_kernel="exact"), not with "torch" or "fast";
    the split is planned at the rate kept, and the plan says which."""
    import nb_offload
    from nb_offload import hybrid, loader
    asked = []

    def measured(torch, dtype, shapes, threads, token_counts, repeats, beside=None, packed=False, fast=False,
                 amx=False):
        asked.append(amx)
        return {1: 10e9, **({hybrid.AMX: amx_rate} if amx and amx_rate else {})}
    monkeypatch.setattr(hybrid, "rates_by_tokens", measured)
    monkeypatch.setattr(hybrid, "cpu_max_tokens", lambda *a, **k: 1)
    monkeypatch.setattr(block_rest, "seconds", lambda *a, **k: None)      # the products' rates alone
    monkeypatch.setattr(loader.Inspection, "_amx_kernel_runs", lambda self: amx_rate is not None)
    folder = model_dirs("llama", dtype="bfloat16")
    insp = loader.Inspection(folder, nb_offload.Options(compute="hybrid"))
    assert insp.cpu_products() == want and asked == [amx_rate is not None]
    assert insp.cpu_rates()[0] == max(10, (amx_rate or 0) / 1e9)
    plan = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins={"model.layers.*": "cpu-compute"})
    assert plan.cpu_products == want
    assert ("nb_offload's AMX kernel" in str(plan)) == (want == "amx")
    asked.clear()
    loader.Inspection(folder, nb_offload.Options(compute="hybrid", cpu_kernel="torch")).cpu_products()
    assert asked == [False]


@needs_amx
def test_the_rate_probe_times_the_amx_kernel_in_turn_with_f_linear(monkeypatch):
    """With ``amx``, the probe's AMX way multiplies by the kernel, at the block's threads, for the shapes it found
    a chunk for."""
    from nb_offload import hybrid
    shapes = [(256, 512), (512, 256)]
    calls, real = [], cpu_amx.product
    monkeypatch.setattr(cpu_amx, "product", lambda *a: calls.append((tuple(a[2].shape), a[-1])) or real(*a))
    rates = hybrid.rates_by_tokens(torch, torch.bfloat16, shapes, 1, (1,), 1, amx=True)
    found = [s for s in shapes if cpu_amx.chunk_for(torch, *s, torch.bfloat16, False, 1) is not None]
    if not found:
        pytest.skip("no chunk found for these shapes here")
    assert hybrid.AMX in rates and rates[hybrid.AMX] > 0 and rates[1] > 0
    assert {shape for shape, _ in calls} == set(found) and {threads for _, threads in calls} == {1}


@needs_amx
def test_the_engine_gives_its_cpu_blocks_the_amx_kernel_at_their_threads(model_dirs):
    """Engine._pack_cpu_weights with kernel="amx": the CPU blocks' linears whose shapes have a chunk at the blocks'
    thread count take the kernel (counted in cpu_amx_linears); no copies are made. (The engine computes CPU
    blocks on CUDA only, so its own state stands in here.)"""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from nb_offload.engine import Engine
    from nb_offload.trace import Stats
    folder = model_dirs("llama", dtype="bfloat16", hidden_size=128, intermediate_size=256)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    units = {1: SimpleNamespace(modules=["model.layers.1"])}
    eng = SimpleNamespace(torch=torch, model=model, units=units, cpu_blocks={1: None}, stats=Stats(),
                          packed_room=None, kernel="amx", _packed=[])
    eng._install_kernel = lambda module, among=None, threads=None: Engine._install_kernel(eng, module, among, threads)
    eng._kernel_policy = lambda threads: Engine._kernel_policy(eng, threads)
    Engine._pack_cpu_weights(eng, threads=1)
    try:
        block = model.model.layers[1]
        wide = [m for m in block.modules() if isinstance(m, torch.nn.Linear) and m.out_features >= 64]
        with_chunk = [m for m in wide
                      if cpu_amx.chunk_for(torch, m.out_features, m.in_features, m.weight.dtype, False, 1)]
        assert eng.stats.cpu_amx_linears == len(with_chunk) > 0 and eng.stats.cpu_packed_bytes == 0
        assert eng.stats.cpu_amx_linears + eng.stats.cpu_plain_linears == len(wide)
        assert all("forward" in vars(m) for m in with_chunk)
    finally:
        for packed in eng._packed:
            packed.remove()
