"""Every option of ``load`` and ``plan``: its name, default, check and one line of help, written once.

``Options`` is frozen and checked as a whole when it is made, before any file is opened; it is
passed whole from the loader to the planner, the storage and the model. The signatures and
docstrings of ``nb_offload.load``/``plan``, the ``%%offload`` keys and the magics' help are all
generated from these fields. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
from collections.abc import Mapping
from types import MappingProxyType

from .budget import parse_size
from .dtypes import canonical_dtype
from .errors import DiskTierError, OptionError
from .hybrid import CPU_COMPUTE, gpu_only_attention
from .planner import canonical_pin
from .quant import spec_of

POLICIES = ("auto", "sequential")
TRACE_DETAILS = ("streamed", "full")
EXPERT_COMPUTE = ("gpu", "cpu", "auto")
COMPUTE = ("gpu", "hybrid", "auto")
# Opt-ins that let a checkpoint folder run code: only the bool True opts in (the string "False"
# is truthy, so bool() of it would turn them on).
OPT_INS = {"trust_remote_code": "runs Python code from the model folder",
           "allow_pickle": "unpickling weight files can run code from them"}


# -- checks: each returns the value to keep, or raises an OffloadError naming the accepted form ----
def _size(name, value):
    if value is not None:
        parse_size(value, capacity=100, what=name)      # any capacity: a share is checked, not computed
    return value


def _cache_size(name, value):
    if value != "auto" and value != 0:
        if value is None or isinstance(value, bool):
            raise OptionError(f"{name}={value!r} is not valid; accepted: \"auto\", 0, or a size such as "
                              "\"2GiB\", 2**30 or \"10%\" (of the compute device's budget).")
        parse_size(value, capacity=100, what=name)
    return value


def _folder(name, value):
    if value is None:
        return None
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text.strip() or "\0" in text:
        raise DiskTierError(f"{name}={value!r} is not a folder path; give a path such as \"./offload\".")
    if os.path.exists(os.path.expanduser(text)) and not os.path.isdir(os.path.expanduser(text)):
        raise DiskTierError(f"{name}={value!r} is a file, not a folder; give a folder (it is created if missing).")
    return value


def _quant(name, value):
    """A QuantSpec (quant.py), or None."""
    return spec_of(name, value)


def _pins(name, value):
    from .errors import PinError
    if value is None or (isinstance(value, Mapping) and not value):
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise PinError(f"{name}={value!r} is not a mapping; give a dict such as {{\"model.layers.0-3\": \"gpu\"}}.")
    # read-only, as the rest of a frozen Options
    return MappingProxyType({pattern: canonical_pin(pin) for pattern, pin in value.items()})


def _expert_compute(name, value):
    if isinstance(value, str) and value in EXPERT_COMPUTE:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    raise OptionError(f"{name}={value!r} is not valid; accepted: \"gpu\", \"cpu\", \"auto\", or a share of them "
                      "computed on the CPU between 0 and 1, such as 0.5.")


def _device(name, value):
    """The device's canonical spelling: "cpu", "cuda" or "cuda:N" (also "cpu:N", as torch takes it)."""
    if value is None:
        return None
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", str(value))
    if match is None:
        raise OptionError(f"{name}={value!r} is not supported; accepted: \"cuda\", \"cuda:N\" or \"cpu\".")
    kind, index = match.groups()
    return kind if index is None else f"{kind}:{int(index)}"


def _one_of(*accepted, why=""):
    def check(name, value):
        if not isinstance(value, str) or value not in accepted:
            raise OptionError(f"{name}={value!r} is unknown; accepted: {', '.join(map(repr, accepted))}{why}.")
        return value
    return check


def _tristate(why):
    def check(name, value):
        if not (value is True or value is False or value == "auto"):
            raise OptionError(f"{name}={value!r} is not valid; accepted: True, False or \"auto\" ({why}).")
        return value
    return check


def _count(optional=False):
    def check(name, value):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"{name}={value!r} is not valid; give an int >= 1.")
        return value
    return check


def _flag(name, value):
    if not isinstance(value, bool):
        raise OptionError(f"{name}={value!r} is not valid; accepted: True or False.")
    return value


def _opt_in(name, value):
    if not isinstance(value, bool):
        raise OptionError(f"{name}={value!r} is not a bool; only True opts in ({OPT_INS[name]}), "
                          "False keeps it off.")
    return value


def _text(accepted):
    def check(name, value):
        if value is not None and not isinstance(value, str):
            raise OptionError(f"{name}={value!r} is not valid; accepted: {accepted}.")
        return value
    return check


def _optional_flag(name, value):
    if value is not None and not isinstance(value, bool):
        raise OptionError(f"{name}={value!r} is not valid; accepted: None, True or False.")
    return value


def _option(default, check, help, *, load_only=False):
    return dataclasses.field(default=default, metadata={"check": check, "help": help, "load_only": load_only})


@dataclasses.dataclass(frozen=True)
class Options:
    """How a model is planned and loaded. Make one with ``Options(**kwargs)``: every value is checked."""

    gpu: str | int | None = _option(None, _size, "GPU budget: bytes, \"6GiB\", or \"80%\" of the card "
                                                  "(default: its free memory less 5 %)")
    cpu: str | int | None = _option(None, _size, "host-memory budget, same forms (default: 80 % of the RAM "
                                                  "available now)")
    disk: str | os.PathLike | None = _option(None, _folder, "folder for the disk tier, made private to you "
                                                            "(default: no disk tier)")
    dtype: str | None = _option(None, canonical_dtype, "weights' dtype: bfloat16, float16 or float32 (default: the "
                                              "checkpoint's)")
    quant: str | Mapping | None = _option(None, _quant, "bitsandbytes quantization of the blocks' Linears: "
                                                        "\"int8\", \"nf4\", \"fp4\", or {\"format\": \"nf4\", "
                                                        "\"double_quant\": True, \"compute_dtype\": ..., \"skip\": "
                                                        "[...], \"threshold\": 6.0}, or a BitsAndBytesConfig "
                                                        "(needs nb_offload[quant])")
    pins: Mapping = _option(None, _pins, "{pattern: tier}: units kept on a tier, e.g. {\"model.layers.0-3\": \"gpu\"}")
    device: str | None = _option(None, _device, "where compute runs: \"cuda\", \"cuda:N\" or \"cpu\" (default: "
                                                "cuda where there is one)")
    policy: str = _option("auto", _one_of(*POLICIES), "\"auto\" spreads streamed blocks between resident ones so "
                                                      "copies overlap compute; \"sequential\" streams the last ones")
    context: int | None = _option(None, _count(optional=True), "tokens the plan reserves KV cache and activations "
                                                               "for (default: the model's, at most 2048)")
    batch: int = _option(1, _count(), "sequences the plan reserves room for")
    prefetch: int | None = _option(None, _count(optional=True), "units copied ahead of the one computing "
                                                                "(default: 1 on CUDA, 2 on the CPU; a hybrid plan "
                                                                "as deep as its predicted step is shortest)")
    read_ahead: int = _option(2, _count(), "disk units read ahead of their copy, a page-locked staging "
                                           "buffer each")
    split_blocks: bool | str = _option("auto", _tristate("split when whole-block staging would take over a tenth "
                                                         "of the room left for weights"),
                                       "stream blocks a submodule at a time (smaller staging slots)")
    expert_cache: str | int = _option("auto", _cache_size, "room on the compute device for copies of the most often "
                                                           "routed experts of streamed MoE blocks: a size, 0 for "
                                                           "none, or \"auto\" (the room the plan leaves free)")
    compute: str = _option("gpu", _one_of(*COMPUTE), "\"hybrid\": the CPU computes a share of the blocks in host "
                                                     "memory, where their bytes are, while the link streams the "
                                                     "others (the share whose modelled step is shortest at the "
                                                     "CPU's and the link's rates, measured at load); \"auto\": "
                                                     "that where its modelled step is shorter than all streaming "
                                                     "(and the attention runs on the CPU); \"gpu\": all stream. "
                                                     "CUDA only")
    expert_compute: str | float = _option("gpu", _expert_compute, "where routed experts of streamed MoE blocks that "
                                                                   "the GPU doesn't hold compute: \"gpu\" (copied "
                                                                   "over the link), \"cpu\" (on the CPU, from host "
                                                                   "memory), a share of them on the CPU each step "
                                                                   "(0.4), or \"auto\" (the share from the CPU's and "
                                                                   "the link's rates, measured at load; none where "
                                                                   "the CPU is the slower); CUDA only, with the "
                                                                   "eager experts")
    pack_cpu_weights: bool = _option(True, _flag, "the CPU's blocks (compute=\"hybrid\", cpu-compute pins) "
                                                  "multiply one token's row by copies of their weights reordered "
                                                  "for oneDNN's kernel, read front to back: those whose shape a "
                                                  "check at load finds bit-identical to F.linear on this CPU, where "
                                                  "the load measured that 5 % faster; the plan reserves host "
                                                  "memory for the copies, or goes without them where the cpu "
                                                  "budget has no room (cpu_products.py)")
    cpu_kernel: str = _option("exact", _one_of("exact", "fast", "torch"),
                              "how the CPU multiplies one token's row, for the blocks it computes, the routed "
                              "experts it computes beside the GPU (expert_compute), and on the CPU device every "
                              "bf16 linear in host memory: \"exact\": with F.linear's bits, the tokens of "
                              "transformers computing those blocks on the CPU, by the fastest of F.linear, "
                              "reordered weights (pack_cpu_weights) and, on a CPU with AMX, nb_offload's AMX kernel "
                              "for bf16 weights, which a check at load finds F.linear's bits for each shape "
                              "(cpu_amx.py); \"fast\": nb_offload's own AVX-512 BF16 kernel for bf16 weights, "
                              "which reads faster and sums in another order, so tokens may differ (cpu_kernel.py; "
                              "F.linear where the machine can't run it, and the plan says why); \"torch\": torch's "
                              "kernels only, as \"exact\" without nb_offload's")
    cuda_graph: bool = _option(True, _flag, "decode steps captured as one CUDA graph and replayed per token, "
                                            "with a static KV cache (graphs.py says where they run eager)")
    fused_kernels: bool = _option(True, _flag, "in a captured decode step, RMSNorm, the rotary embedding and "
                                               "SiLU times up as fused kernels, bit-identical to the eager ones "
                                               "(fused.py); False: the eager kernels replayed as they are")
    allow_pickle: bool = _option(False, _opt_in, "read .bin/.pt weight files (unpickling can run code); True only")
    trust_remote_code: bool = _option(False, _opt_in, "run Python code from the model folder; True only")
    attn_implementation: str | None = _option(None, _text("None (the model's default), \"eager\", \"sdpa\" or "
                                                          "another name transformers knows"),
                                              "attention kernel, as transformers names it")
    experts_implementation: str | None = _option(None, _text("None (transformers' default), \"eager\", "
                                                             "\"batched_mm\" or \"grouped_mm\""),
                                                 "how MoE blocks compute their routed experts, as transformers "
                                                 "names it")
    local_files_only: bool | None = _option(None, _optional_flag, "for a Hub id: use only the local cache "
                                                                  "(default: when HF_HUB_OFFLINE is set)")
    revision: str | None = _option(None, _text("None or a branch, tag or commit"), "for a Hub id: which revision")
    read_threads: int = _option(8, _count(), "threads reading the drive", load_only=True)
    drop_page_cache: bool | str = _option("auto", _tristate("skip the page cache when the disk tier is larger "
                                                            "than the free RAM"),
                                          "read the disk tier around the page cache (O_DIRECT)", load_only=True)
    trace: bool = _option(True, _flag, "record reads, copies and compute for the timeline", load_only=True)
    trace_detail: str = _option("streamed", _one_of(*TRACE_DETAILS, why=" ('streamed': compute of streamed units "
                                                    "and whole steps; 'full': compute of every unit)"),
                                "what the trace records", load_only=True)
    hold_spare: bool = _option(True, _flag, "hold streamed units in room a short generate leaves unused",
                               load_only=True)
    progress: bool = _option(True, _flag, "show a progress bar while loading", load_only=True)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        on_cpu = self.compute == "hybrid" or any(pin.startswith(CPU_COMPUTE) for pin in self.pins.values())
        if on_cpu and gpu_only_attention(self.attn_implementation):
            raise OptionError(f"attn_implementation={self.attn_implementation!r} can't compute blocks on the CPU "
                              f"(compute=\"hybrid\" or {CPU_COMPUTE!r} pins): its kernels are the GPU's; give "
                              "\"sdpa\" or \"eager\", or leave it out.")
        if self.expert_compute != "gpu" and self.experts_implementation not in (None, "eager"):
            raise OptionError(f"expert_compute={self.expert_compute!r} needs the eager experts; got "
                              f"experts_implementation={self.experts_implementation!r}: leave it out, or give "
                              "\"eager\" (cpu_experts.py says why).")

    @property
    def experts(self) -> str | None:
        """The experts implementation to build with: the one given, else the eager one where the CPU computes
        some experts (it combines them in eager's order), else transformers' default."""
        if self.experts_implementation is None and self.expert_compute != "gpu":
            return "eager"
        return self.experts_implementation

    @property
    def host_expert_share(self):
        """``expert_compute`` as the engine takes it: None (all on the GPU), a share, or "auto"."""
        return {"gpu": None, "cpu": 1.0}.get(self.expert_compute, self.expert_compute)

    @classmethod
    def given(cls, function: str, kwargs: dict) -> Options:
        """The options of a ``load`` (or ``plan``) call, refusing names it doesn't take."""
        _refuse_unknown(f"nb_offload.{function}", kwargs, names(load=function == "load"))
        return cls(**kwargs)

    def replace(self, **changes) -> Options:
        return dataclasses.replace(self, **changes)


def _flags() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Options) if f.metadata["check"] in (_flag, _opt_in))


def _refuse_unknown(who: str, kwargs: dict, accepted):
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise OptionError(f"unsupported option(s) {unknown}; {who} takes {', '.join(accepted)}.")


def _checked_init(init):
    """``Options(**kwargs)`` refuses an unknown name with an OptionError, as ``load`` does (not a TypeError)."""
    @functools.wraps(init)
    def __init__(self, **kwargs):
        _refuse_unknown("Options", kwargs, names())
        init(self, **kwargs)
    return __init__


Options.__init__ = _checked_init(Options.__init__)


def names(*, load: bool = True) -> tuple[str, ...]:
    """Option names, in order (``load=False``: only those ``plan`` takes)."""
    return tuple(f.name for f in dataclasses.fields(Options) if load or not f.metadata["load_only"])


def help_of(name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(Options) if f.name == name)


def document(*, load: bool, lead: str):
    """A decorator giving ``function(model, **options)`` the signature and docstring of every option it
    takes, so ``help()`` and ``?`` list them with their defaults."""
    return lambda function: _document(function, load=load, lead=lead)


def _document(function, *, load: bool, lead: str):
    fields = [f for f in dataclasses.fields(Options) if load or not f.metadata["load_only"]]
    params = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in fields]
    function.__signature__ = inspect.Signature(params)
    width = max(len(f"{f.name}={f.default!r}") for f in fields)
    lines = [f"    {f'{f.name}={f.default!r}':<{width}}  {f.metadata['help']}" for f in fields]
    function.__doc__ = (f"{lead}\n\n``model``: a folder in the save_pretrained layout, or a Hub id in the local "
                        "cache.\n\nOptions (keyword only, checked before any file is read):\n\n" + "\n".join(lines)
                        + "\n")
    return function


FLAGS = _flags()     # options that take only True or False
