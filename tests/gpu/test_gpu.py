"""CUDA tests: equality through GPU + CPU + disk tiers, the GPU budget, re-pinning, cycles.

Run on a CUDA machine: ``PYTHONPATH=. python3 -m pytest -m gpu tests/gpu``.
"""

import gc

import pytest
import torch
from helpers import PROMPT, blocks, host_staging, pin_while_generating, reference, staging_bytes, three_tier_pins

import nb_offload

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def run(llm, n=10):
    ids = torch.tensor(PROMPT)
    logits = llm(ids).logits.float().cpu()
    tokens = llm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False).cpu()
    return tokens, logits


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma", "gpt2", "opt", "mixtral", "qwen2_moe", "phi3"])
def test_three_tiers_match_transformers(arch, model_dirs, tmp_path):
    folder = model_dirs(arch)
    want_tokens, want_logits = reference(folder, device="cuda")
    pins = three_tier_pins(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))
    llm = nb_offload.load(folder, disk=tmp_path, pins=pins, progress=False)
    try:
        assert {e.tier for e in blocks(llm.plan)} == {"gpu", "cpu", "disk"}
        tokens, logits = run(llm)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
        kinds = {ev.kind for ev in llm.trace}
        assert kinds >= {"read", "copy", "compute"}, kinds
        assert llm.stats.bytes_from_cpu > 0 and llm.stats.bytes_from_disk > 0
        # re-pin: a disk block to the GPU, a GPU block to disk; same outputs
        disk_block = [e.name for e in blocks(llm.plan) if e.tier == "disk"][0]
        gpu_block = [e.name for e in blocks(llm.plan) if e.tier == "gpu"][0]
        llm.pin(disk_block, "gpu")
        llm.pin(gpu_block, "disk")
        assert llm.plan.tier_of(disk_block) == "gpu" and llm.plan.tier_of(gpu_block) == "disk"
        tokens, logits = run(llm)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    finally:
        llm.unload()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "mixtral"])
def test_an_embedding_read_in_place_in_host_memory_matches_transformers(arch, model_dirs):
    """Where the model doesn't fit, the token embedding stays in page-locked host memory and the GPU reads its
    rows there: the weight is a CUDA tensor at the host memory's own address; tokens equal, eager and captured."""
    folder = model_dirs(arch)
    want_tokens, want_logits = reference(folder, device="cuda")
    fits = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB")
    everything = sum(e.bytes for e in fits) + sum(fits.reserved.values())
    llm = nb_offload.load(folder, gpu=everything - 1, cpu="1GiB", progress=False)
    try:
        in_place = [u for u, e in zip(llm._insp.units, llm.plan.entries) if e.compute == "in place"]
        assert in_place         # the token embedding (OPT's is the output layer's too: its positions' then)
        for unit in in_place:
            weight, flat = llm.model.get_submodule(unit.name).weight, llm._storage.stores[unit.index].flat
            assert weight.is_cuda and not flat.is_cuda
            assert flat.data_ptr() <= weight.data_ptr() < flat.data_ptr() + flat.numel()    # the host's bytes
        tokens, logits = run(llm)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
        assert llm.stats.graph_replays > 0 or llm.stats.graph_eager
    finally:
        llm.unload()


@pytest.mark.parametrize("arch,split", [("llama", True), ("llama", False), ("mixtral", True)])
def test_disk_reads_that_skip_the_page_cache_match_transformers(arch, split, model_dirs, tmp_path):
    """drop_page_cache=True: O_DIRECT reads land each unit at a shift that lines it up with the file."""
    folder = model_dirs(arch)
    want_tokens, want_logits = reference(folder, device="cuda")
    pins = three_tier_pins(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))
    llm = nb_offload.load(folder, disk=tmp_path, pins=pins, drop_page_cache=True, split_blocks=split,
                          progress=False)
    try:
        eng = llm._engine
        shifts = []
        real = eng.reader.shift
        eng.reader.shift = lambda extents, buffer: shifts.append(real(extents, buffer)) or shifts[-1]
        for _ in range(2):
            tokens, logits = run(llm)
            assert torch.equal(tokens, want_tokens)
            torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
        assert llm.stats.bytes_from_disk > 0
        assert any(s != 0 for s in shifts), shifts     # safetensors data starts off a block
    finally:
        llm.unload()


def test_gpu_budget_holds_during_generate_at_planned_context(model_dirs, tmp_path):
    folder = model_dirs("llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=8, vocab_size=4096, dtype="bfloat16")
    context = 512
    p = nb_offload.plan(folder, gpu="64GiB", cpu="8GiB", context=context)
    bl = blocks(p)
    fixed = sum(v for k, v in p.reserved.items() if k != "staging_slots")
    tops = sum(e.bytes for e in p if e.kind == "top")
    budget = fixed + tops + staging_bytes(folder, p.prefetch) + 3 * bl[0].bytes + 4096
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    llm = nb_offload.load(folder, gpu=budget, cpu="8GiB", context=context, disk=tmp_path, progress=False,
                          split_blocks=True)
    try:
        tiers = [e.tier for e in blocks(llm.plan)]
        assert tiers.count("gpu") == 3 and tiers.count("cpu") == 5, str(llm.plan)
        prompt = torch.randint(3, 4000, (1, context - 64))
        out = llm.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        assert out.shape[1] == context
        peak = torch.cuda.max_memory_allocated() - base
        print(f"GPU budget {budget / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
        assert peak <= budget, f"peak {peak} > budget {budget}\n{llm.plan}"
    finally:
        llm.unload()


def test_short_generate_holds_streamed_units_within_the_budget(model_dirs, tmp_path):
    folder = model_dirs("llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=8, vocab_size=4096, dtype="bfloat16")
    context = 1024
    p = nb_offload.plan(folder, gpu="64GiB", cpu="8GiB", context=context)
    block = blocks(p)[0].bytes
    fixed = sum(v for k, v in p.reserved.items() if k != "staging_slots")
    tops = sum(e.bytes for e in p if e.kind == "top")
    budget = fixed + tops + staging_bytes(folder, p.prefetch) + 2 * block + 4096
    cpu = 3 * block + host_staging(folder) + 4096          # three blocks, two blocks' disk staging
    ids = torch.randint(3, 4000, (1, 24))
    got = {}
    for hold in (False, True):
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        # the embedding pinned to the GPU, as the budgets count it (unpinned it would stay in host memory)
        llm = nb_offload.load(folder, gpu=budget, cpu=cpu, disk=tmp_path / "offload", context=context,
                              hold_spare=hold, split_blocks=True, progress=False, pins={"model.embed_tokens": "gpu"})
        try:
            tiers = [e.tier for e in blocks(llm.plan)]
            assert tiers.count("gpu") == 2 and tiers.count("disk") == 3, str(llm.plan)
            out = llm.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
            peak = torch.cuda.max_memory_allocated() - base
            print(f"hold={hold}: budget {budget / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, "
                  f"held {llm.stats.held_last}, {llm.stats}")
            assert peak <= budget, f"peak {peak} > budget {budget}\n{llm.plan}"
            got[hold] = (out.cpu(), llm.stats.bytes_from_disk, llm.stats.bytes_from_cpu, llm.stats.held_last)
            assert not llm._engine.held
        finally:
            llm.unload()
    assert torch.equal(got[True][0], got[False][0])
    assert got[False][3] == 0 and got[True][3] >= 2
    assert got[True][1] < got[False][1]          # disk units are held first


def test_ten_load_unload_cycles_return_gpu_and_host_memory(model_dirs, tmp_path):
    import os
    folder = model_dirs("llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=6, vocab_size=2048)

    def rss():
        with open(f"/proc/{os.getpid()}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS"))

    def cycle():
        pins = {"model.layers.0-1": "gpu", "model.layers.2-3": "cpu", "model.layers.4-5": "disk"}
        llm = nb_offload.load(folder, disk=tmp_path, pins=pins, progress=False)
        llm.generate(torch.tensor(PROMPT), max_new_tokens=3, do_sample=False)
        llm.unload()
        del llm
        gc.collect()

    cycle()
    cycle()
    gpu0, host0 = torch.cuda.memory_allocated(), rss()
    for _ in range(10):
        cycle()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == gpu0
    assert rss() - host0 < 48 * 2**20, f"host memory grew by {(rss() - host0) / 2**20:.1f} MiB"


def test_everything_resident_on_gpu(model_dirs):
    folder = model_dirs("qwen2")
    want_tokens, want_logits = reference(folder, device="cuda")
    llm = nb_offload.load(folder, progress=False)
    try:
        assert all(e.tier == "gpu" for e in llm.plan)
        tokens, logits = run(llm)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    finally:
        llm.unload()


def test_out_of_order_and_trace_off(model_dirs, tmp_path):
    folder = model_dirs("llama")
    want_tokens, _ = reference(folder, device="cuda")
    llm = nb_offload.load(folder, disk=tmp_path, pins={"model.layers.0-1": "cpu", "model.layers.2-3": "disk"},
                          trace=False, prefetch=2, progress=False)
    try:
        tokens, _ = run(llm)
        assert torch.equal(tokens, want_tokens)
        hidden = torch.randn(1, 3, 64, device="cuda")
        pos = llm.model.model.rotary_emb(hidden, torch.arange(3, device="cuda")[None])
        with torch.no_grad():
            llm.model.model.layers[3](hidden, position_embeddings=pos)
            llm.model.model.layers[1](hidden, position_embeddings=pos)
        tokens, _ = run(llm)
        assert torch.equal(tokens, want_tokens)
        assert len(llm.trace) == 0
    finally:
        llm.unload()


def test_a_pass_cut_short_leaves_the_model_usable(model_dirs, tmp_path):
    """An exception inside a forward pass (an interrupt, an out-of-memory) with disk units in flight:
    the next generate gives the same tokens."""
    folder = model_dirs("llama")
    want_tokens, _ = reference(folder, device="cuda")
    llm = nb_offload.load(folder, disk=tmp_path, pins={"model.layers.0-1": "cpu", "model.layers.2-3": "disk"},
                          read_ahead=2, progress=False)
    try:
        run(llm)
        layer = llm.model.model.layers[2].self_attn

        def interrupt(module, args):
            raise KeyboardInterrupt
        handle = layer.register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(torch.tensor(PROMPT), max_new_tokens=3, do_sample=False)
        handle.remove()
        for _ in range(2):
            tokens, _ = run(llm)
            assert torch.equal(tokens, want_tokens)
    finally:
        llm.unload()


def test_a_load_under_inference_mode_fills_the_gpu_on_its_threads(model_dirs):
    """GPU buffers made under inference_mode are inference tensors: the reading threads' copies into
    them must run in that mode too (found by the benchmark, which loads inside inference_mode)."""
    folder = model_dirs("llama")
    want_tokens, _ = reference(folder, device="cuda")
    with torch.inference_mode():
        llm = nb_offload.load(folder, dtype="float32", gpu="1GiB", progress=False)
    try:
        assert {e.tier for e in llm.plan} == {"gpu"}
        assert torch.equal(run(llm)[0], want_tokens)
    finally:
        llm.unload()


def test_magics_on_gpu_report_the_pcie_share(model_dirs, tmp_path):
    pytest.importorskip("IPython")
    import io
    import os
    import sys
    os.environ["IPYTHONDIR"] = str(tmp_path / "ipy")
    from IPython.core.interactiveshell import InteractiveShell
    sh = InteractiveShell.instance()
    assert sh.run_cell("%load_ext nb_offload").success
    folder = model_dirs("llama")
    r = sh.run_cell(f"%offload_load {folder} --disk {tmp_path} --pin model.layers.1-2=cpu model.layers.3=disk --as g")
    assert r.success, r.error_in_exec
    out, old = io.StringIO(), sys.stdout
    sys.stdout = out
    try:
        r = sh.run_cell("%%generate --model g --max-new-tokens 8 --as text\nModel offloading keeps")
    finally:
        sys.stdout = old
    assert r.success, r.error_in_exec
    assert "8 tokens in" in out.getvalue() and "of the PCIe limit" in out.getvalue(), out.getvalue()
    print("magics summary:", out.getvalue().strip().splitlines()[-1])
    assert sh.run_cell("%unload_ext nb_offload").success


def reference_on_cuda(folder, dtype, n=10):
    """transformers on the saved files, on the GPU, as the standard reference."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cuda").eval()
    ids = torch.tensor(PROMPT, device="cuda")
    with torch.inference_mode():
        logits = model(ids).logits.float().cpu()
        tokens = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False).cpu()
    del model
    torch.cuda.empty_cache()
    return tokens, logits


@pytest.mark.parametrize("arch,uncached", [("llama", True), ("llama", False), ("qwen2_moe", True)])
def test_verified_offload_cache_on_cuda(arch, uncached, model_dirs, tmp_path):
    """Disk units through the offload cache (bf16 from float32 files): written with their SHA-256,
    verified on the next load, read with and without O_DIRECT (the 4 KiB header keeps the bytes
    block-aligned); tokens and logits equal transformers' on the GPU."""
    folder = model_dirs(arch)
    want_tokens, want_logits = reference_on_cuda(folder, torch.bfloat16)
    pins = three_tier_pins(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))
    import glob
    import os
    for round_ in range(3):
        if round_ == 2:                  # no stamps: every file is read and hashed
            for stamps in glob.glob(str(tmp_path / "nb_offload-*" / "verified.json")):
                os.unlink(stamps)
        llm = nb_offload.load(folder, disk=tmp_path, pins=pins, dtype="bfloat16", drop_page_cache=uncached,
                              progress=False)
        try:
            cache = llm._storage.cache
            disk_bytes = sum(e.bytes for e in llm.plan if e.tier == "disk")
            assert (cache.stamped_bytes, cache.verified_bytes) == [(0, 0), (disk_bytes, 0), (0, disk_bytes)][round_]
            tokens, logits = run(llm)
            assert torch.equal(tokens, want_tokens)
            torch.testing.assert_close(logits, want_logits, rtol=1e-2, atol=1e-2)
            assert llm.stats.bytes_from_disk > 0
        finally:
            llm.unload()


def test_pin_from_another_thread_waits_on_cuda(model_dirs, tmp_path):
    folder = model_dirs("llama")
    pins = three_tier_pins(nb_offload.plan(folder, gpu="1GiB", cpu="1GiB"))
    llm = nb_offload.load(folder, disk=tmp_path, pins=pins, hold_spare=False, progress=False)
    try:
        want = run(llm, 24)[0]
        got, pin_waited = pin_while_generating(llm, "model.layers.0-1", "disk")
        assert torch.equal(got, want) and pin_waited
        assert torch.equal(run(llm, 24)[0], want)
    finally:
        llm.unload()


def test_page_locked_buffers_are_exactly_sized_and_counted(model_dirs):
    """Page-locked buffers take what they hold (torch's pin_memory=True rounds up to a power of two:
    128 MiB for this one), count in the host memory stats report, and unlock when released."""
    from nb_offload.budget import process_memory
    from nb_offload.tiers import alloc_host, release_host
    n = 100 * 2**20 + 1
    before = process_memory()
    flat = alloc_host(n, pinned=True)
    grown = process_memory() - before
    assert flat.is_pinned() and n <= grown < n + 8 * 2**20, grown
    release_host(flat)
    assert not flat.is_pinned()
    folder = model_dirs("llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=1000)
    llm = nb_offload.load(folder, pins={"model.layers.*": "cpu"}, cpu="4GiB", progress=False)
    try:
        run(llm)
        # (the growth itself can't be asserted here: earlier tests' freed memory goes back meanwhile)
        assert "host memory" in str(llm.stats) and "of cpu=4.0 GiB" in str(llm.stats)
        print(llm.stats)
    finally:
        llm.unload()
