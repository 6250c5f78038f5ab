"""What a block's forward costs the CPU besides its products (block_rest.py): measured on blocks built from the
model's config, the linears' time taken out; the load's CPU rate counts it, and the plan says so."""

import time

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, MixtralConfig, Phi3Config, Qwen2Config

import nb_offload
from nb_offload import block_rest, hybrid, loader

SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=6, vocab_size=1000)


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config, Phi3Config])
def test_the_rest_of_a_block_s_forward_is_measured_on_blocks_built_from_the_config(config_class):
    caller = torch.get_num_threads()
    rest = block_rest.seconds(torch, config_class(**SMALL), torch.float32, 1 << 20, 1, attn_implementation="sdpa")
    assert rest is not None and 0 < rest < 0.5
    assert torch.get_num_threads() == caller


class _SlowLinears:
    """A kernel policy (cpu_kernel.KernelLinears') whose every one-row product takes 20 ms more than F.linear's
    (a prompt's it leaves to F.linear)."""
    name = "slow"

    def __init__(self):
        self.calls = 0

    def available(self):
        return True

    def takes(self, linear):
        return True

    def multiply(self, x, weight, bias):
        if x.shape[-2] != 1:
            return None
        self.calls += 1
        time.sleep(0.02)
        return F.linear(x, weight, bias)


def test_the_linears_time_is_not_counted_whoever_multiplies():
    """Products by a kernel 20 ms slower a call (seven a block) leave the rest as it was: it is the block's time
    less its linears'."""
    config = LlamaConfig(**SMALL)
    slow = _SlowLinears()
    rest = block_rest.seconds(torch, config, torch.bfloat16, 1 << 20, 1, kernel=slow, repeats=3)
    assert slow.calls == 7 * 3 * 5          # 7 linears, 3 blocks, 5 decode steps (the prompt's F.linear's)
    assert rest is not None and rest < 0.02


def test_each_step_runs_beside_the_link_s_copies():
    class Beside:
        starts = stops = 0

        def start(self):
            self.starts += 1

        def stop(self):
            self.stops += 1
    beside = Beside()
    assert block_rest.seconds(torch, LlamaConfig(**SMALL), torch.float32, 1 << 20, 1, beside=beside, repeats=3)
    assert beside.starts == beside.stops == 3 + 2


def test_no_measure_where_the_blocks_can_t_be_built_or_hold_more_than_linears():
    experts = MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
    assert block_rest.seconds(torch, experts, torch.float32, 1 << 20, 1) is None       # the experts' weights
    assert block_rest.seconds(torch, LlamaConfig(**SMALL), torch.float32, block_rest.MOST_BYTES + 1, 1) is None
    broken = LlamaConfig(**SMALL)
    broken.num_attention_heads = 5          # 128 isn't a multiple of 5: the block can't be built
    assert block_rest.seconds(torch, broken, torch.float32, 1 << 20, 1) is None


def test_no_measure_where_the_host_lacks_room_for_the_blocks(monkeypatch):
    from nb_offload import budget
    monkeypatch.setattr(budget, "host_memory", lambda: (8 << 30, block_rest.ROOM_BLOCKS * (1 << 20) - 1))
    assert block_rest.seconds(torch, LlamaConfig(**SMALL), torch.float32, 1 << 20, 1) is None
    monkeypatch.setattr(budget, "host_memory", lambda: (8 << 30, block_rest.ROOM_BLOCKS * (1 << 20)))
    assert block_rest.seconds(torch, LlamaConfig(**SMALL), torch.float32, 1 << 20, 1) is not None


def test_the_rate_with_the_rest():
    # 400 MB at 50 GB/s: 8 ms, 2 ms besides: 40 GB/s
    assert block_rest.with_rest(50.0, 400_000_000, 0.002) == pytest.approx(40.0)
    assert block_rest.with_rest(50.0, 400_000_000, None) == 50.0
    assert block_rest.with_rest(50.0, 0, 0.002) == 50.0


def test_the_load_s_cpu_rate_counts_the_rest_and_the_plan_says_so(model_dirs, monkeypatch):
    monkeypatch.setattr(hybrid, "rates_by_tokens", lambda *a, **k: {1: 100e9})
    monkeypatch.setattr(hybrid, "cpu_max_tokens", lambda *a, **k: 1)
    measured = []

    def rest(torch, config, dtype, block_bytes, threads, **kw):
        measured.append((block_bytes, kw.get("kernel")))
        return 1e-6
    monkeypatch.setattr(block_rest, "seconds", rest)
    folder = model_dirs("llama")
    insp = loader.Inspection(folder, nb_offload.Options(compute="hybrid"))
    block = next(u.nbytes for u in insp.units if u.kind == "block")
    assert insp.cpu_rates()[0] == pytest.approx(block_rest.with_rest(100.0, block, 1e-6))
    assert measured == [(block, None)]          # F.linear's products: no kernel
    plan = nb_offload.plan(folder, gpu="1GiB", cpu="1GiB", pins={"model.layers.*": "cpu"}, compute="hybrid")
    assert plan.cpu_rest == (100.0, 1e-6) and plan.block_share
    assert "its products read at 100.0, and 0.001 ms besides" in str(plan)
