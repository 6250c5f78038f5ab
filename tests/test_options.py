"""The options object: one place for each option's name, default and check."""

import dataclasses
import inspect

import pytest

import nb_offload
from nb_offload import BudgetError, DiskTierError, OffloadError, OptionError, Options, PinError, options

# one value each option refuses, and the error it is refused with
BAD = {
    "gpu": ("6 gigs", BudgetError), "cpu": ("120%", BudgetError), "disk": ("", DiskTierError),
    "dtype": ("float8", OptionError), "quant": ("nf5", OptionError), "pins": ({"lm_head": "tpu"}, PinError),
    "device": ("mps", OptionError), "policy": ("fastest", OptionError), "context": (0, OptionError),
    "batch": (True, OptionError), "prefetch": (1.5, OptionError), "read_ahead": (-1, OptionError),
    "split_blocks": ("yes", OptionError), "allow_pickle": ("False", OptionError),
    "trust_remote_code": (1, OptionError), "attn_implementation": (3, OptionError),
    "local_files_only": ("no", OptionError), "revision": (5, OptionError), "read_threads": (0, OptionError),
    "drop_page_cache": (None, OptionError), "trace": ("on", OptionError), "trace_detail": ("all", OptionError),
    "hold_spare": (None, OptionError), "progress": ("no", OptionError), "cuda_graph": ("yes", OptionError),
    "fused_kernels": (1, OptionError), "pack_cpu_weights": ("no", OptionError), "cpu_kernel": ("quick", OptionError),
    "experts_implementation": (3, OptionError), "expert_cache": (True, OptionError),
    "expert_compute": (1.5, OptionError), "compute": ("cpu", OptionError),
}


def test_every_option_has_a_refusal_case():
    assert set(BAD) == set(options.names())


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_refused_naming_the_option(name):
    value, error = BAD[name]
    with pytest.raises(error) as info:
        Options(**{name: value})
    message = str(info.value)
    bad = "tier 'tpu'" if name == "pins" else f"{name}={value!r}"     # the value, and what it was given as
    assert bad in message
    assert any(word in message for word in ("accepted", "give", "only True opts in")), message


def test_options_are_frozen_and_checked_values_are_normal_forms():
    o = Options(dtype="bf16", device="cuda:0", pins={"model.layers.0-3": " GPU "})
    assert (o.dtype, o.device, o.pins) == ("bfloat16", "cuda:0", {"model.layers.0-3": "gpu"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.gpu = "1GiB"
    assert o.replace(batch=4).batch == 4 and o.batch == 1
    with pytest.raises(OptionError):
        o.replace(batch=0)          # replace checks again


def test_help_shows_every_option_with_its_default():
    for function, load in ((nb_offload.load, True), (nb_offload.plan, False)):
        params = inspect.signature(function).parameters
        fields = [f for f in dataclasses.fields(Options) if load or not f.metadata["load_only"]]
        assert list(params) == ["model"] + [f.name for f in fields]
        for f in fields:
            assert params[f.name].default == f.default
            assert f"{f.name}={f.default!r}" in function.__doc__
    assert "read_threads" not in inspect.signature(nb_offload.plan).parameters


def test_the_loader_writes_no_option_of_its_own():
    """load and plan take the options whole; their defaults live in Options only."""
    from nb_offload import loader
    for function in (loader.load, loader.plan):
        kinds = [p.kind for p in inspect.signature(function).parameters.values()]
        assert kinds == [inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_KEYWORD]


def test_unknown_and_load_only_options_are_refused_by_name(model_dirs):
    with pytest.raises(OptionError, match=r"unsupported option\(s\) \['gpus'\]"):
        nb_offload.load(model_dirs("llama"), gpus="1GiB")
    with pytest.raises(OptionError, match=r"\['read_threads'\]; nb_offload.plan takes gpu, cpu"):
        nb_offload.plan(model_dirs("llama"), read_threads=2)


def test_the_offload_cell_keys_are_the_options():
    pytest.importorskip("IPython")
    from nb_offload.magics import OFFLOAD_KEYS
    assert set(OFFLOAD_KEYS) == set(options.names()) - {"pins", "progress"} | {"model", "pin", "as"}


def test_a_loaded_model_keeps_its_options(model_dirs):
    llm = nb_offload.load(model_dirs("llama"), device="cpu", read_ahead=3, hold_spare=False, progress=False)
    try:
        assert isinstance(llm.options, Options)
        assert (llm.options.read_ahead, llm.options.hold_spare, llm.hold_spare) == (3, False, False)
    finally:
        llm.unload()
    assert issubclass(BudgetError, OffloadError)


def test_devices_are_spelled_one_way_and_checked_before_torch_sees_them(model_dirs):
    assert [Options(device=d).device for d in ("cuda:01", "cpu:00", "cuda", "cpu")] == ["cuda:1", "cpu:0", "cuda",
                                                                                        "cpu"]
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="no CUDA device"):
            nb_offload.load(model_dirs("llama"), device="cuda:01")


def test_options_refuse_unknown_names_and_stay_frozen_inside():
    with pytest.raises(OptionError, match=r"unsupported option\(s\) \['bogus'\]; Options takes gpu"):
        Options(bogus=1)
    o = Options(pins={"lm_head": "gpu"})
    with pytest.raises(TypeError):
        o.pins["model.norm"] = "cpu"          # the pins of a frozen Options are read-only too
    assert o == Options(pins={"lm_head": "gpu"}) and o.replace(batch=2).pins == {"lm_head": "gpu"}


def test_what_needs_no_model_is_refused_before_the_model_is_read(tmp_path):
    """A bad option is named even when the model folder is missing (nothing was read to find that out)."""
    missing = str(tmp_path / "no-such-model")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    with pytest.raises(DiskTierError, match="is a file, not a folder"):
        nb_offload.plan(missing, device="cpu", disk=a_file)
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(BudgetError, match="a percentage is a share of the card's memory"):
            nb_offload.plan(missing, gpu="80%")


def test_the_static_timeline_is_public():
    from nb_offload.views import Timeline
    assert nb_offload.Timeline is Timeline and "Timeline" in nb_offload.__all__
