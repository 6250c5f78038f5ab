"""The planner on synthetic units: placement, reservations and errors follow from unit sizes and
the config alone, with no model built (and no torch or transformers imported)."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from nb_offload import BudgetError, PinError
from nb_offload.budget import format_size
from nb_offload.pieces import Piece
from nb_offload.planner import WORKSPACE, footprint, make_plan
from nb_offload.units import Unit

MiB = 2**20
N = 8                   # blocks
BLOCK = 4 * MiB         # norm 1/4 MiB, attention 1 MiB, norm 1/4 MiB, MLP 2.5 MiB
ATTN, MLP = MiB, 5 * MiB // 2
REST = MiB // 2         # a block's two norms: its leftovers when it streams as pieces
TOP = 2 * MiB           # the embedding and the lm_head
SHARED = MiB // 4       # weights of the blocks' container: they can't stream
DISK = 2**40

# 4 layers, 4 heads of 16 (hidden 64), 2 key/value heads, MLP 128, vocab 1000; 2-byte weights,
# a 16-token context and batch 1.
CONFIG = SimpleNamespace(num_hidden_layers=4, num_attention_heads=4, hidden_size=64, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1000)
KV = 2 * 4 * 2 * 16 * 16 * 2              # k and v, layers, kv heads, head dim, tokens, bytes
PER_TOKEN = (6 * 64 + 2 * 4 * 16 + 3 * 128) * 2
ACTIVATIONS = 16 * PER_TOKEN + 2 * 1000 * 4     # plus the last token's float32 logits and softmax
SCORES = 4 * 16 * 16 * 4                  # the CPU's attention scores: heads x context x context, float32
RESERVED = {"cpu": {"kv_cache": KV, "activations": ACTIVATIONS + SCORES, "workspace": 0},
            "cuda": {"kv_cache": KV, "activations": ACTIVATIONS, "workspace": WORKSPACE}}
FIXED = {device: sum(r.values()) for device, r in RESERVED.items()}
TOTAL = 2 * TOP + N * BLOCK + SHARED


def units(n=N, embed=TOP, pieces=True):
    """An embedding, ``n`` blocks, the lm_head, then the container's own weights (in the order
    find_units gives: the lm_head's index comes after every block's)."""
    out = [Unit(index=0, name="model.embed_tokens", modules=["model.embed_tokens"], kind="top", nbytes=embed)]
    for i in range(n):
        name = f"model.layers.{i}"
        u = Unit(index=i + 1, name=name, modules=[name], kind="block", nbytes=BLOCK)
        if pieces:
            u.pieces = [Piece(f"{name}.self_attn", MiB // 4, MiB // 4 + ATTN),
                        Piece(f"{name}.mlp", BLOCK - MLP, BLOCK)]
            u.rest_nbytes = REST
        out.append(u)
    out.append(Unit(index=n + 1, name="lm_head", modules=["lm_head"], kind="top", nbytes=TOP))
    out.append(Unit(index=n + 2, name="model", modules=["model"], kind="top", nbytes=SHARED, resident_only=True))
    return out


def plan(device="cpu", *, gpu=None, cpu=None, disk=DISK, pins=None, us=None, **kw):
    return make_plan(us or units(), device=device, budgets={"gpu": gpu, "cpu": cpu, "disk": disk},
                     pins=pins or {}, config=CONFIG, dtype_size=2, context=16, **kw)


def block_tiers(p):
    return [e.tier for e in p if e.kind == "block"]


def test_footprint_from_the_config():
    assert footprint(CONFIG, 2, 16, 1, "cpu") == RESERVED["cpu"]
    assert footprint(CONFIG, 2, 16, 1, "cuda") == RESERVED["cuda"]
    assert footprint(CONFIG, 2, 16, 2, "cuda")["kv_cache"] == 2 * KV
    # a multimodal config's text part; MoE: two routed experts of 96 outgrow the dense MLP's 128
    moe = SimpleNamespace(**vars(CONFIG), num_experts_per_tok=2, moe_intermediate_size=96)
    outer = SimpleNamespace(get_text_config=lambda: moe)
    routed = 16 * (6 * 64 + 2 * 4 * 16 + 3 * 2 * 96) * 2 + 2 * 1000 * 4
    assert footprint(outer, 2, 16, 1, "cuda") == {"kv_cache": KV, "activations": routed, "workspace": WORKSPACE}


def test_everything_fits_everything_resident():
    p = plan(cpu=2**30)
    assert {e.tier for e in p} == {"cpu"} and not p.split_blocks
    assert p.reserved == {**RESERVED["cpu"], "staging_slots": 0}
    assert p.used()["cpu"] == FIXED["cpu"] + TOTAL
    g = plan("cuda", gpu=2**30, cpu=2**30)
    assert {e.tier for e in g} == {"gpu"} and g.host_reserved == {}
    assert g.used() == {"gpu": FIXED["cuda"] + TOTAL, "cpu": 0, "disk": 0}


def test_top_level_units_are_kept_before_any_block():
    # room for both top-level units and two whole-block slots, not for a block more
    cap = FIXED["cpu"] + SHARED + 2 * TOP + 2 * BLOCK + BLOCK - 1
    p = plan(cpu=cap, split_blocks=False)
    assert p["lm_head"].tier == p["model.embed_tokens"].tier == "cpu"
    assert block_tiers(p) == ["disk"] * N


def test_sequential_keeps_the_first_blocks_that_fit():
    four = FIXED["cpu"] + SHARED + 2 * TOP + 4 * BLOCK + 2 * BLOCK   # four blocks and two whole-block slots
    p = plan(cpu=four, policy="sequential", split_blocks=False)
    assert block_tiers(p) == ["cpu"] * 4 + ["disk"] * 4
    assert p.reserved == {**RESERVED["cpu"], "staging_slots": 2 * BLOCK}
    assert p.used()["cpu"] == four
    assert block_tiers(plan(cpu=four - 1, policy="sequential", split_blocks=False)) == ["cpu"] * 3 + ["disk"] * 5


# 6: the room of every block without slots, so every block is kept (one at a time, the last two's slots
# would leave two streaming)
@pytest.mark.parametrize("kept, want", [(4, "cdcdcdcd"), (5, "cdccdcdc"), (6, "cccccccc")])
def test_auto_spreads_streamed_blocks_evenly(kept, want):
    cap = FIXED["cpu"] + SHARED + 2 * TOP + kept * BLOCK + 2 * BLOCK
    p = plan(cpu=cap, split_blocks=False)
    assert "".join(t[0] for t in block_tiers(p)) == want
    assert p.used()["cpu"] == cap


def test_pieces_make_staging_slots_smaller():
    """Split, a slot holds the largest piece and each streamed block's leftovers stay resident."""
    cap = FIXED["cpu"] + SHARED + 2 * TOP + 4 * BLOCK + 2 * MLP + 4 * REST
    split = plan(cpu=cap, policy="sequential", split_blocks=True)
    assert split.split_blocks and block_tiers(split) == ["cpu"] * 4 + ["disk"] * 4
    assert split.reserved["staging_slots"] == 2 * MLP + 4 * REST
    assert split.used()["cpu"] == cap
    whole = plan(cpu=cap, policy="sequential", split_blocks=False)
    assert not whole.split_blocks and block_tiers(whole) == ["cpu"] * 3 + ["disk"] * 5
    assert whole.reserved["staging_slots"] == 2 * BLOCK
    # "auto": whole-block slots would take over a tenth of the room left for weights
    assert plan(cpu=cap, policy="sequential").split_blocks
    # units without pieces never split
    assert not plan(cpu=cap, us=units(pieces=False), split_blocks=True).split_blocks


def test_auto_keeps_blocks_whole_where_their_slots_are_a_small_share():
    cap = FIXED["cpu"] + SHARED + 2 * TOP + 30 * BLOCK + 2 * BLOCK   # 2 slots: under a tenth of 32 blocks
    p = plan(cpu=cap, us=units(n=40), policy="sequential")
    assert not p.split_blocks
    assert block_tiers(p) == ["cpu"] * 30 + ["disk"] * 10
    assert p.reserved["staging_slots"] == 2 * BLOCK


@pytest.mark.parametrize("split, staging", [(False, 2 * BLOCK), (True, 2 * 2 * MLP)])
def test_cuda_fills_the_gpu_then_host_memory_then_disk(split, staging):
    """Disk units need page-locked staging in host memory: read_ahead (2) blocks, or with pieces
    a buffer per piece (2) of each of 2 blocks."""
    slots = 2 * MLP + 6 * REST if split else 2 * BLOCK
    gpu = FIXED["cuda"] + SHARED + 2 * TOP + 2 * BLOCK + slots
    cpu = 2 * BLOCK + staging
    p = plan("cuda", gpu=gpu, cpu=cpu, policy="sequential", split_blocks=split)
    assert p.split_blocks == split
    assert block_tiers(p) == ["gpu"] * 2 + ["cpu"] * 2 + ["disk"] * 4
    assert p.host_reserved == {"disk_staging": staging}
    assert p.reserved == {**RESERVED["cuda"], "staging_slots": slots}
    assert p.used() == {"gpu": gpu, "cpu": cpu, "disk": 4 * BLOCK}
    less = plan("cuda", gpu=gpu, cpu=cpu - 1, policy="sequential", split_blocks=split)
    assert block_tiers(less) == ["gpu"] * 2 + ["cpu"] + ["disk"] * 5


def test_cuda_auto_spaces_disk_units_among_cpu_units():
    gpu = FIXED["cuda"] + SHARED + 2 * TOP + 6 * BLOCK
    cpu = 2 * BLOCK + BLOCK                 # two blocks and one block's disk staging (read_ahead=1)
    p = plan("cuda", gpu=gpu, cpu=cpu, read_ahead=1, split_blocks=False)
    assert block_tiers(p) == ["gpu", "cpu", "gpu", "disk", "gpu", "cpu", "gpu", "disk"]
    assert p.used()["cpu"] == cpu


def test_cuda_without_disk_needs_host_room_for_every_streamed_unit():
    gpu = FIXED["cuda"] + SHARED + 2 * TOP + 6 * BLOCK
    p = plan("cuda", gpu=gpu, cpu=4 * BLOCK, disk=None, split_blocks=False)
    assert block_tiers(p).count("cpu") == 4 and p.host_reserved == {}
    with pytest.raises(BudgetError, match=f"can't hold the {format_size(4 * BLOCK)} of weights"):
        plan("cuda", gpu=gpu, cpu=4 * BLOCK - 1, disk=None, split_blocks=False)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("policy", ["auto", "sequential"])
@pytest.mark.parametrize("split", ["auto", True, False])
def test_budgets_are_never_exceeded(device, policy, split):
    """Every budget from too small to roomy: a plan either fits it or raises BudgetError."""
    made = refused = 0
    resident = "gpu" if device == "cuda" else "cpu"
    for cap in range(FIXED[device], FIXED[device] + TOTAL + 3 * BLOCK, 100_003):
        for host in ((5 * BLOCK, 9 * BLOCK) if device == "cuda" else (None,)):
            budgets = {"gpu": cap, "cpu": host} if device == "cuda" else {"cpu": cap}
            try:
                p = plan(device, **budgets, policy=policy, split_blocks=split)
            except BudgetError:
                refused += 1
                continue
            made += 1
            used = p.used()
            assert used[resident] <= cap, str(p)
            assert device == "cpu" or used["cpu"] <= host, str(p)
            assert p["model"].tier == resident
    assert made and refused


def test_pins_are_honoured():
    p = plan(cpu=2**30, pins={4: "disk", N + 1: "disk"})
    assert p["model.layers.3"].tier == p["lm_head"].tier == "disk"
    assert p["model.layers.3"].pinned and not p["model.layers.2"].pinned
    assert [e.name for e in p if e.tier == "disk"] == ["model.layers.3", "lm_head"]
    # a pin to the resident tier takes room before the free blocks do
    four = FIXED["cpu"] + SHARED + 2 * TOP + 4 * BLOCK + 2 * BLOCK
    q = plan(cpu=four, pins={N: "cpu"}, policy="sequential", split_blocks=False)
    assert block_tiers(q) == ["cpu"] * 3 + ["disk"] * 4 + ["cpu"]
    g = plan("cuda", gpu=2**30, cpu=2**30, pins={1: "cpu", 2: "disk"}, split_blocks=False)
    assert block_tiers(g) == ["cpu", "disk"] + ["gpu"] * (N - 2)
    assert g.reserved["staging_slots"] == 2 * BLOCK and g.host_reserved == {"disk_staging": 2 * BLOCK}


@pytest.mark.parametrize("device, pins, disk, message", [
    ("cpu", {1: "gpu"}, DISK, "not available here"),
    ("cuda", {1: "disk"}, None, "loaded without a disk folder"),
    ("cpu", {N + 2: "disk"}, DISK, "must stay on cpu"),
    ("cuda", {N + 2: "cpu"}, DISK, "must stay on gpu"),
])
def test_bad_pins_are_refused(device, pins, disk, message):
    with pytest.raises(PinError, match=message):
        plan(device, gpu=2**30, cpu=2**30, disk=disk, pins=pins)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_minimum_streams_everything(device):
    """Two whole-block slots: the top-level units, smaller than a block, stream through them."""
    resident = "gpu" if device == "cuda" else "cpu"
    need = FIXED[device] + SHARED + 2 * BLOCK
    budget = {"gpu": need, "cpu": 2**30} if device == "cuda" else {"cpu": need}
    p = plan(device, **budget, split_blocks=False)
    assert [e.name for e in p if e.tier == resident] == ["model"]
    assert p.used()[resident] == need
    with pytest.raises(BudgetError, match=f"below the minimum {re.escape(format_size(need))} "):
        plan(device, **{**budget, resident: need - 1}, split_blocks=False)


def test_the_minimum_keeps_a_large_embedding():
    """Keeping a 16 MiB embedding costs less than two slots of its size."""
    need = FIXED["cpu"] + SHARED + 16 * MiB + TOP + 2 * BLOCK
    p = plan(cpu=need, us=units(embed=16 * MiB), split_blocks=False)
    assert p["model.embed_tokens"].tier == p["lm_head"].tier == "cpu"
    assert block_tiers(p) == ["disk"] * N
    with pytest.raises(BudgetError, match=f"below the minimum {re.escape(format_size(need))} "):
        plan(cpu=need - 1, us=units(embed=16 * MiB), split_blocks=False)


def test_library_code_is_charged_to_host_memory():
    four = FIXED["cpu"] + SHARED + 2 * TOP + 4 * BLOCK + 2 * BLOCK
    p = plan(cpu=four, policy="sequential", split_blocks=False, library_code=BLOCK)
    assert p.reserved["library_code"] == BLOCK
    assert block_tiers(p) == ["cpu"] * 3 + ["disk"] * 5 and p.used()["cpu"] == four
    gpu = FIXED["cuda"] + SHARED + 2 * TOP + 4 * BLOCK + 2 * BLOCK
    g = plan("cuda", gpu=gpu, cpu=4 * BLOCK, policy="sequential", split_blocks=False, library_code=BLOCK)
    assert "library_code" not in g.reserved
    assert g.host_reserved == {"library_code": BLOCK, "disk_staging": 2 * BLOCK}
    assert block_tiers(g) == ["gpu"] * 4 + ["cpu"] + ["disk"] * 3 and g.used()["cpu"] == 4 * BLOCK


def test_planning_imports_no_torch_or_transformers():
    code = """if True:
        import sys
        from types import SimpleNamespace
        from nb_offload.planner import make_plan
        from nb_offload.units import Unit
        units = [Unit(index=i, name=f"model.layers.{i}", modules=[f"model.layers.{i}"], kind="block", nbytes=2**20)
                 for i in range(4)]
        p = make_plan(units, device="cpu", budgets={"cpu": 2**30, "disk": None}, pins={},
                      config=SimpleNamespace(num_hidden_layers=4, hidden_size=64), dtype_size=2)
        assert p.used()["cpu"] > 4 * 2**20
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"
