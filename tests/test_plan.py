"""Dry-run plans: no weight read, pins, budgets, the table, device maps."""

import json
import os
import stat
import subprocess
import sys

from helpers import blocks, host_staging, staging_bytes

import nb_offload
from nb_offload.patterns import compile_pattern


def test_dry_run_reads_no_weight(model_dirs, monkeypatch):
    import nb_offload.checkpoint as ck
    import nb_offload.tiers as tiers

    def boom(*a, **k):
        raise AssertionError("a weight was read during a dry run")

    monkeypatch.setattr(ck.Checkpoint, "_handle", boom)
    monkeypatch.setattr(ck.Checkpoint, "get", boom)
    monkeypatch.setattr(ck.Checkpoint, "get_slice", boom)
    monkeypatch.setattr(tiers, "read_extents", boom)
    p = nb_offload.plan(model_dirs("mixtral"), gpu="106MiB", cpu="1GiB")
    assert p.device == "cuda"
    assert {e.tier for e in p} == {"gpu", "cpu"}
    assert len(blocks(p)) == 4


def test_plan_for_a_gpu_fills_gpu_then_cpu_then_disk(model_dirs, tmp_path):
    folder = model_dirs("llama", num_hidden_layers=8)
    big = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB")
    assert all(e.tier == "gpu" for e in big)
    bl = blocks(big)
    fixed = sum(big.reserved.values())
    tops = sum(e.bytes for e in big if e.kind == "top")
    gpu = fixed + tops + staging_bytes(folder, 1) + bl[0].bytes  # two slots and one resident block
    cpu = 2 * bl[0].bytes + host_staging(folder)   # two blocks and two blocks' disk staging
    # the embedding pinned: where the model doesn't fit, it would stay in host memory (read in place)
    p = nb_offload.plan(folder, gpu=gpu, cpu=cpu, disk=tmp_path, policy="sequential", split_blocks=True,
                        pins={"model.embed_tokens": "gpu"})
    tiers = [e.tier for e in blocks(p)]
    assert tiers[0] == "gpu" and "cpu" in tiers and "disk" in tiers, str(p)
    assert tiers == sorted(tiers, key=["gpu", "cpu", "disk"].index)  # in order: gpu, then cpu, then disk
    assert tiers == ["gpu"] + ["cpu"] * 2 + ["disk"] * 5
    assert p.used()["gpu"] <= gpu and p.used()["cpu"] <= cpu
    assert p.streamed_bytes_per_token()["disk"] == sum(e.bytes for e in p if e.tier == "disk")
    assert p.predicted_seconds_per_step() > 0


def test_auto_policy_spreads_streamed_blocks(model_dirs):
    """With few blocks streamed, "auto" spaces them out so their copies overlap resident compute."""
    folder = model_dirs("llama", num_hidden_layers=8)
    big = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB")
    bl = blocks(big)
    fixed = sum(big.reserved.values())
    tops = sum(e.bytes for e in big if e.kind == "top")
    gpu = fixed + tops + staging_bytes(folder, 1) + 6 * bl[0].bytes     # six resident blocks, two streamed
    auto = [e.tier for e in blocks(nb_offload.plan(folder, gpu=gpu, cpu="1GiB", split_blocks=True))]
    seq = [e.tier for e in blocks(nb_offload.plan(folder, gpu=gpu, cpu="1GiB", policy="sequential",
                                                  split_blocks=True))]
    assert seq == ["gpu"] * 6 + ["cpu"] * 2
    assert auto.count("cpu") == 2 and auto != seq
    first, second = [i for i, t in enumerate(auto) if t == "cpu"]
    assert second - first >= 3, auto


def test_pins_ranges_globs_and_tied_aliases(model_dirs):
    folder = model_dirs("gpt2")
    p = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB",
                        pins={"transformer.h.1-2": "cpu", "lm_head": "cpu"})
    assert [e.tier for e in blocks(p)] == ["gpu", "cpu", "cpu", "gpu"]
    tied = p["lm_head"]                          # GPT-2 ties lm_head to the token embedding
    assert tied.tier == "cpu" and tied.pinned and "transformer.wte" in tied.aliases
    assert p.tier_of("transformer.wte") == "cpu"


def test_pattern_matching():
    m = compile_pattern("model.layers.0-3")
    assert m("model.layers.0") and m("model.layers.3") and not m("model.layers.4")
    assert compile_pattern("model.layers.*")("model.layers.17")
    assert compile_pattern("model.layers")("model.layers.5")
    assert not compile_pattern("lm_head")("model.norm")


def test_table_and_html(model_dirs, tmp_path):
    folder = model_dirs("llama")
    p = nb_offload.plan(folder, device="cpu", disk=tmp_path, pins={"model.layers.2-3": "disk"})
    text = str(p)
    assert "model.layers.0-1" in text and "model.layers.2-3" in text and "(2 blocks)" in text
    assert "streamed per step" in text and "kv cache" in text
    html = p._repr_html_()
    assert "<table>" in html and "model.layers.2-3" in html
    d = p.to_dict()
    json.dumps(d)
    assert len(d["entries"]) == len(p)


def test_context_changes_the_reservation(model_dirs):
    folder = model_dirs("llama")
    short = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", context=128)
    long = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", context=512)
    assert long.reserved["kv_cache"] == 4 * short.reserved["kv_cache"]


def test_device_map_is_accepted_by_accelerate(model_dirs, tmp_path):
    from accelerate.utils import check_device_map
    folder = model_dirs("gpt2")
    llm = nb_offload.load(folder, device="cpu", disk=tmp_path, pins={"transformer.h.2-3": "disk"}, progress=False)
    dm = llm.to_device_map()
    assert dm["transformer.h.3"] == "disk" and dm["transformer.h.0"] == "cpu"
    from transformers import AutoModelForCausalLM
    check_device_map(AutoModelForCausalLM.from_pretrained(folder), dm)
    llm.unload()


def test_offload_cache_is_private_reused_and_keyed(model_dirs, tmp_path):
    folder = model_dirs("llama")
    root = tmp_path / "offload"
    pins = {"model.layers.*": "disk"}
    llm = nb_offload.load(folder, device="cpu", dtype="bfloat16", disk=root, pins=pins, progress=False)
    llm.unload()
    (cache,) = list(root.glob("nb_offload-*"))
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    files = sorted(cache.glob("*.bin"))
    assert len(files) == 4 and all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)
    assert not list(cache.glob("*.tmp*"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    llm = nb_offload.load(folder, device="cpu", dtype="bfloat16", disk=root, pins=pins, progress=False)
    llm.unload()
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # reused, not rewritten
    llm = nb_offload.load(folder, device="cpu", dtype="float16", disk=root, pins=pins, progress=False)
    llm.unload()
    assert len(list(root.glob("nb_offload-*"))) == 2       # another dtype, another fingerprint


def test_matching_dtype_streams_from_the_checkpoint_itself(model_dirs, tmp_path):
    folder = model_dirs("llama")
    root = tmp_path / "offload"
    llm = nb_offload.load(folder, device="cpu", disk=root, pins={"model.layers.*": "disk"}, progress=False)
    llm(__import__("torch").tensor([[1, 2, 3]]))
    assert not list(root.glob("nb_offload-*/*.bin"))
    assert llm.stats.bytes_from_disk > 0
    llm.unload()


def test_import_and_plan_cli_leave_torch_out_of_import():
    code = "import sys, nb_offload; assert 'torch' not in sys.modules; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_cli_plan(model_dirs):
    out = subprocess.run([sys.executable, "-m", "nb_offload", "plan", model_dirs("llama"), "--gpu", "1GiB",
                          "--cpu", "1GiB"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert "model.layers.0-3" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "nb_offload", "plan", model_dirs("llama"), "--gpu", "lots"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert bad.returncode == 2 and "gpu='lots' is not a size" in bad.stderr


def test_auto_policy_interleaves_disk_and_cpu_units(model_dirs, tmp_path):
    folder = model_dirs("llama", num_hidden_layers=8)
    big = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB")
    bl = blocks(big)
    gpu = sum(big.reserved.values()) + sum(e.bytes for e in big if e.kind == "top") + staging_bytes(folder, 1)
    cpu = 4 * bl[0].bytes + host_staging(folder)          # four blocks and two blocks' disk staging
    kept = {"model.embed_tokens": "gpu"}
    auto = [e.tier for e in blocks(nb_offload.plan(folder, gpu=gpu, cpu=cpu, disk=tmp_path, split_blocks=True,
                                                   pins=kept))]
    seq = [e.tier for e in blocks(nb_offload.plan(folder, gpu=gpu, cpu=cpu, disk=tmp_path, policy="sequential",
                                                  split_blocks=True, pins=kept))]
    assert seq == ["cpu"] * 4 + ["disk"] * 4
    assert sorted(auto) == sorted(seq) and auto != seq
    assert "disk" in auto[:4] and "cpu" in auto[4:], auto


def test_an_embedding_table_stays_in_host_memory_where_the_model_does_not_fit(model_dirs):
    """On CUDA, where the model doesn't fit the gpu budget, the token embedding stays in host memory and the
    GPU reads its rows there ("read in place"): not streamed, its room given to what streams. Kept on the GPU
    where everything fits, where pinned there, and where the table is tied to the output layer."""
    folder = model_dirs("llama", num_hidden_layers=8)
    fits = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB")
    assert fits["model.embed_tokens"].tier == "gpu" and not fits["model.embed_tokens"].compute
    everything = sum(e.bytes for e in fits) + sum(fits.reserved.values())
    tight = nb_offload.plan(folder, gpu=everything - 1, cpu="1GiB")
    emb = tight["model.embed_tokens"]
    assert (emb.tier, emb.compute) == ("cpu", "in place") and "read in place by the GPU" in str(tight)
    assert tight.totals()["cpu"] >= emb.bytes and tight.used()["cpu"] <= tight.budgets["cpu"]
    assert all(e.tier == "gpu" for e in tight if e is not emb)       # its room kept the blocks
    streamed = tight.streamed_bytes_per_token()
    assert streamed == {"cpu": 0, "disk": 0}                   # it isn't streamed
    pinned = nb_offload.plan(folder, gpu=everything - 1, cpu="1GiB", pins={"model.embed_tokens": "gpu"})
    assert pinned["model.embed_tokens"].tier == "gpu" and any(e.tier == "cpu" for e in pinned)
    tied = model_dirs("gemma")          # its embedding is the output layer's weight too
    fits = nb_offload.plan(tied, gpu="1GiB", cpu="1GiB")
    everything = sum(e.bytes for e in fits) + sum(fits.reserved.values())
    assert not any(e.compute for e in nb_offload.plan(tied, gpu=everything - 1, cpu="1GiB"))
    on_cpu = nb_offload.plan(folder, device="cpu", cpu="1GiB")
    assert not any(e.compute for e in on_cpu)


def test_the_embedding_stays_on_the_gpu_where_host_memory_would_not_take_it(model_dirs, tmp_path):
    """Read in place only where the cpu budget takes it: no error where the plan without it has none, and no
    more bytes on disk than that plan."""
    folder = model_dirs("llama", num_hidden_layers=8)
    fits = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB")
    block = blocks(fits)[0].bytes
    everything = sum(e.bytes for e in fits) + sum(fits.reserved.values())
    library = fits.host_reserved.get("library_code", 0)
    gpu = everything - 2 * block
    seen = set()
    for cpu in range(library + block // 2, library + 6 * block, block // 4):
        try:
            kept = nb_offload.plan(folder, gpu=gpu, cpu=cpu, disk=tmp_path, pins={"model.embed_tokens": "gpu"})
        except nb_offload.BudgetError:
            continue
        plan = nb_offload.plan(folder, gpu=gpu, cpu=cpu, disk=tmp_path)        # never fails where kept doesn't
        on_disk = sum(e.bytes for e in plan if e.tier == "disk")
        assert on_disk <= sum(e.bytes for e in kept if e.tier == "disk"), (cpu, str(plan))
        seen.add(plan["model.embed_tokens"].compute)
    assert seen == {"", "in place"}         # the budgets tried take it at some sizes, not at others
