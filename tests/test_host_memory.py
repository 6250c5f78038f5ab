"""Host memory stays within the cpu= budget: a fresh process loads a 24-layer model through cpu and
disk on the CPU device and generates, while a thread samples its RssAnon + RssShmem every 2 ms.

The baseline is taken after ``import torch, transformers, nb_offload``; the first load then imports
transformers' loading and generation code (about 90 MiB of code objects), which the plan charges to
the budget. Growth over it must stay within budget * 1.05 + 64 MiB after the load, at the load's
peak and at the generate's peak, and ``llm.stats`` reports the same measure.
"""

import json
import os
import subprocess
import sys

import pytest

MiB = 2**20
ALLOWANCE = 64 * MiB
SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=24, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=8000, max_position_embeddings=512)

CHILD = r"""
import json, sys, threading, time
import torch, transformers, nb_offload


def process_memory():
    with open("/proc/self/status", "rb") as fh:
        return sum(int(l.split()[1]) * 1024 for l in fh if l.startswith((b"RssAnon:", b"RssShmem:")))
torch.set_num_threads(2)
folder, budget, disk, dtype = sys.argv[1:5]
base = process_memory()
peak, phase, stop = {"load": 0, "generate": 0}, ["load"], threading.Event()

def sample():
    while not stop.is_set():
        peak[phase[0]] = max(peak[phase[0]], process_memory() - base)
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
llm = nb_offload.load(folder, device="cpu", cpu=budget, disk=disk, dtype=dtype, progress=False)
after_load = process_memory() - base
peak["load"] = max(peak["load"], after_load)
phase[0] = "generate"
ids = torch.randint(3, 7900, (1, 16), generator=torch.Generator().manual_seed(0))
for _ in range(2):
    llm.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
stop.set()
time.sleep(0.01)
stats = llm.stats
print(json.dumps(dict(after_load=after_load, peak_load=peak["load"], peak_generate=peak["generate"],
                      budget=nb_offload.parse_size(budget), stats_peak=getattr(stats, "host_peak", None),
                      disk_blocks=sum(e.tier == "disk" for e in llm.plan), used=llm.plan.used()["cpu"],
                      stats=str(llm.stats))))
"""


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    from nb_offload.tiny import make_tiny_model
    root = tmp_path_factory.mktemp("host-memory")
    return {dtype: make_tiny_model(str(root / dtype), "llama", dtype=dtype, tokenizer=False, **SHAPE)
            for dtype in ("float32", "bfloat16")}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize("budget, checkpoint", [
    ("200MiB", "float32"),       # read as it is: disk blocks straight from the checkpoint
    ("260MiB", "bfloat16"),      # converted to float32 a tensor at a time, disk blocks through the cache
])
def test_host_memory_stays_within_the_budget(model_folders, tmp_path, budget, checkpoint):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    out = subprocess.run([sys.executable, "-c", CHILD, model_folders[checkpoint], budget, str(tmp_path / "offload"),
                          "float32"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    limit = got["budget"] * 1.05 + ALLOWANCE
    report = {k: (f"{v / MiB:.1f} MiB" if isinstance(v, int) and k != "disk_blocks" else v) for k, v in got.items()}
    assert got["disk_blocks"] >= 8, report          # the budget really is tight: most blocks stream
    for key in ("after_load", "peak_load", "peak_generate"):
        assert got[key] <= limit, (key, f"limit {limit / MiB:.1f} MiB", report)
    # llm.stats reports the same measure: its peak (sampled after the load and every step) is real
    assert 0.5 * got["after_load"] <= got["stats_peak"] <= limit, report
    assert "host memory" in got["stats"] and f"of cpu={budget[:-3]}" in got["stats"].replace(".0 MiB", "")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
@pytest.mark.parametrize("huge_pages", [True, False])
def test_host_buffers_start_on_a_huge_page_and_advise_only_their_whole_ones(monkeypatch, huge_pages):
    """A page-locked host buffer (here left unlocked: no CUDA) starts on a 2 MiB boundary, so the CPU blocks read
    it through huge pages, and asks for them only over its whole huge pages: the tail's first bytes must not
    fault in 2 MiB that the plan never counted (tiers.HUGE_PAGES)."""
    from nb_offload import tiers
    monkeypatch.setattr(tiers, "HUGE_PAGES", huge_pages)
    nbytes = 3 * tiers.HUGE_PAGE + 12345
    flat = tiers.alloc_host(nbytes, pinned=True, lock=False)
    try:
        assert flat.numel() == nbytes
        # its storage starts where it does: torch tells page-locked memory by the storage's start (is_pinned)
        assert flat.untyped_storage().data_ptr() == flat.data_ptr() and flat.untyped_storage().nbytes() == nbytes
        flat.fill_(7)
        assert int(flat.sum()) == 7 * nbytes
        start = flat.data_ptr()
        advised = {}    # the advice of each mapping that overlaps the buffer, by its first address
        with open("/proc/self/smaps") as fh:
            first = None
            for line in fh:
                head = line.split()[0]
                if "-" in head and ":" not in head:
                    low, high = (int(x, 16) for x in head.split("-"))
                    first = low if low < start + nbytes and high > start else None
                elif first is not None and head == "VmFlags:":
                    advised[first] = ("hg" in line.split(), "nh" in line.split())
        if huge_pages:
            assert start % tiers.HUGE_PAGE == 0
            # the whole huge pages advised to use them, the rest (the tail) advised not to
            assert advised[start] == (True, False), advised
            assert advised[start + 3 * tiers.HUGE_PAGE] == (False, True), advised
        else:
            assert all(flags == (False, False) for flags in advised.values()), advised
    finally:
        tiers.release_host(flat)
    assert flat.data_ptr() not in tiers._unlocked
