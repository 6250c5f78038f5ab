"""The model's units: the blocks and top-level modules that are planned, stored and streamed.

A unit is a block (an instance of a class in the model's ``_no_split_modules``) or a
top-level module that owns parameters (embeddings, final norm, lm_head). Tied parameters
join their modules into one unit. Each unit has a flat byte layout, so a whole unit lives in
one buffer and moves in one copy. Everything here works on the meta device: no weight is read.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field

from .dtypes import DTYPES, SHORT_NAMES
from .errors import CheckpointError, OptionError

ALIGN = 256  # bytes; keeps every tensor view aligned for vectorised kernels on any device


def round_up(n: int, step: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``step``."""
    return -(-n // step) * step


@dataclass
class ParamSlot:
    """One parameter's place inside its unit's flat buffer."""

    names: list[str]          # every name of the parameter (tied weights have several)
    shape: tuple
    dtype: object             # torch.dtype
    offset: int
    nbytes: int
    quant: object = None      # a quant.QuantLayout where the weight is quantized (shape, dtype: its data's)


@dataclass
class Unit:
    index: int
    name: str
    modules: list[str]        # modules whose forward needs this unit's weights
    kind: str                 # "block" or "top"
    params: list[ParamSlot] = field(default_factory=list)
    nbytes: int = 0
    resident_only: bool = False   # params owned by a container of blocks: can't be streamed
    checkpoint_keys: list[str] = field(default_factory=list)
    direct: bool = False      # every param is one checkpoint tensor of the same dtype
    # How the unit streams (see pieces.py): byte ranges bound only while their submodule runs,
    # and the params left over, kept on the compute device while the unit streams.
    pieces: list = field(default_factory=list)
    rest: list[ParamSlot] = field(default_factory=list)     # offsets in a small buffer of their own
    rest_from: list[int] = field(default_factory=list)      # each one's offset in the unit's layout
    rest_nbytes: int = 0
    fmt: str = ""             # how its weights are stored: "bf16", "nf4", "int8" ... (see quant.py)
    dequant_bytes: int = 0    # GPU bytes its largest 4-bit Linear dequantizes into at prefill
    routed_nbytes: int = 0    # a MoE block: what a batch-1 decode step brings of it, routed experts only (experts.py)
    routed_split_nbytes: int = 0    # the same where it streams as pieces
    expert_row_nbytes: int = 0      # one routed expert's bytes (all its fused tensors' rows), where they come apart
    expert_count: int = 0           # a MoE block's routed experts, and how many a token is routed to
    top_k: int = 0
    experts_module: str = ""        # its routed experts' module (pins may name single experts of it)
    rows_only: bool = False         # an embedding table alone: a step reads one row of it a token

    @property
    def quantized(self) -> bool:
        return any(s.quant is not None for s in self.params)

    @property
    def aliases(self) -> list[str]:
        return self.modules

    @property
    def stream_nbytes(self) -> int:
        """The most bytes of this unit one staging slot must hold while it streams."""
        return max((pc.nbytes for pc in self.pieces), default=self.nbytes)


def dtype_name(dtype) -> str:
    """The short name of a weight dtype, as the plan shows it ("bf16", "fp16", "fp32")."""
    text = str(dtype).removeprefix("torch.")
    return SHORT_NAMES.get(text, text)


def lay_out(unit):
    """Give ``unit``'s params consecutive aligned offsets, from their sizes."""
    offset = 0
    for slot in unit.params:
        slot.offset = offset
        offset += round_up(slot.nbytes)
    unit.nbytes = offset


def resolve_dtype(name, config=None):
    """The torch dtype of a checked dtype name (``options.Options.dtype``), or for None and "auto" the
    config's, else float32."""
    import torch
    if name is not None and name != "auto":
        return getattr(torch, name)
    cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg_dtype, str) and cfg_dtype in DTYPES:
        return getattr(torch, cfg_dtype)
    if isinstance(cfg_dtype, torch.dtype) and cfg_dtype.is_floating_point:
        return cfg_dtype
    return torch.float32


@contextlib.contextmanager
def quiet_transformers():
    """Keep transformers' own progress bars and load warnings out of ours."""
    from transformers.utils import logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_meta_model(config, dtype, attn_implementation=None, trust_remote_code=False, *, buffers=True,
                     experts=None):
    """Instantiate the model with parameters on the meta device.

    ``buffers=True``: buffers are real, computed on the CPU by the model's own ``__init__`` (the
    rotary tables then match ``from_pretrained``'s to the bit); each parameter is briefly
    allocated on the CPU on its way to meta. ``buffers=False``: everything on meta, nothing
    allocated, so it is safe for a config that describes absurd sizes; use it to check the config
    against the checkpoint first. ``experts``: the MoE experts implementation, as transformers names it.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts:
        kwargs["experts_implementation"] = experts
    context = init_empty_weights(include_buffers=False) if buffers else torch.device("meta")
    try:
        with context:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    except (ValueError, ImportError) as exc:
        if experts and "experts" in str(exc).lower():
            raise OptionError(f"experts_implementation={experts!r} can't run here ({str(exc).splitlines()[0]}); "
                              "accepted: \"eager\", \"batched_mm\" or \"grouped_mm\".") from exc
        if attn_implementation and any(w in str(exc).lower() for w in ("attn", "attention")):
            raise OptionError(
                f"attn_implementation={attn_implementation!r} can't run here ({str(exc).splitlines()[0]}); "
                "accepted: \"eager\", \"sdpa\", or a kernel this machine has installed "
                "(\"flash_attention_2\" needs the flash-attn package and a CUDA device).") from exc
        kind = getattr(config, "model_type", "?")
        if isinstance(exc, ImportError):
            raise CheckpointError(f"model type {kind!r} needs a package this machine lacks: {exc}") from exc
        raise CheckpointError(f"model type {kind!r} has no causal-LM class in this transformers: {exc}") from exc
    model.tie_weights()
    model.eval()
    return model


def find_units(model) -> list[Unit]:
    """Split the model into blocks and top-level units, in the order their forwards run."""
    import torch.nn as nn

    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    blocks: list[str] = []
    for name, module in model.named_modules():
        if type(module).__name__ in block_classes and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)
    if not blocks:  # no declared blocks: take the children of the largest ModuleList
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        if lists:
            lname, lmod = max(lists, key=lambda nm: len(nm[1]))
            blocks = [f"{lname}.{i}" for i in range(len(lmod))]
    block_set = set(blocks)
    module_order = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def owning_block(module_name):
        parts = module_name.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in block_set:
                return prefix
        return None

    # Each parameter (by identity, so tied weights count once) belongs to the unit of the module
    # that owns it: its block, or else the module itself. A parameter named from two such units
    # (tied weights, e.g. lm_head and the token embedding) joins them into one (union-find).
    by_id: dict[int, list[str]] = {}
    tensors = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(pname)
        tensors[id(p)] = p
    members: dict[str, list[int]] = {}    # unit key (module name) -> ids of the params it owns first
    parent: dict[str, str] = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    for pid, names in by_id.items():
        keys = []
        for pname in names:
            owner = pname.rsplit(".", 1)[0] if "." in pname else ""
            keys.append(owning_block(owner) or owner)
        root = find(keys[0])
        for k in keys[1:]:
            parent[find(k)] = root
        members.setdefault(keys[0], []).append(pid)

    groups: dict[str, list[str]] = {}
    for key in parent:
        groups.setdefault(find(key), []).append(key)
    units = []
    for keys in groups.values():
        keys.sort(key=lambda k: module_order.get(k, 0))
        pids = [pid for k in keys for pid in members.get(k, [])]
        is_block = any(k in block_set for k in keys)
        resident_only = any(
            any(b == k or b.startswith(k + ".") or k == "" for b in blocks) for k in keys if k not in block_set)
        unit = Unit(index=0, name=keys[0], modules=keys, kind="block" if is_block else "top",
                    resident_only=resident_only)
        offset = 0
        for pid in pids:
            p = tensors[pid]
            nbytes = p.numel() * p.element_size()
            unit.params.append(ParamSlot(names=by_id[pid], shape=tuple(p.shape), dtype=p.dtype,
                                         offset=offset, nbytes=nbytes))
            offset += round_up(nbytes)
        unit.nbytes = offset
        unit.fmt = dtype_name(unit.params[0].dtype) if unit.params else ""
        unit.rows_only = (not is_block and len(keys) == 1 and len(pids) == 1
                          and isinstance(model.get_submodule(keys[0]), nn.Embedding))
        units.append(unit)
    units.sort(key=lambda u: module_order.get(u.name, 0))
    for i, u in enumerate(units):
        u.index = i
    return units


def map_checkpoint(model, units: list[Unit], checkpoint, *, saved_quantized=False) -> tuple[dict, dict]:
    """Assign every checkpoint tensor to its unit (through transformers' key conversions).

    ``saved_quantized``: the checkpoint was saved quantized by bitsandbytes; its quantized weights
    are checked against the quantized layout later (quant.check_saved), not against the plain model.

    Returns ``(buffer_keys, conversions)``: checkpoint keys of persistent buffers by buffer
    name, and the conversion list to hand to transformers for units that need one.
    """
    meta_sd = model.state_dict()
    renamings, converters, conversions = [], [], []
    rename = None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        conversions = list(get_model_conversion_mapping(model))
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        rename = rename_source_key
    except ImportError:  # older transformers: checkpoint keys are the model's keys
        pass
    unit_of_param = {}
    for u in units:
        for slot in u.params:
            for n in slot.names:
                unit_of_param[n] = u
    buffers = {n for n, _ in model.named_buffers()}
    buffer_keys = {}
    converted_units = set()
    covered = set()
    for key, info in checkpoint.tensors.items():
        target, pattern = key, None
        if rename is not None:
            target, pattern = rename(key, renamings, converters, model.base_model_prefix, meta_sd)
            if target not in meta_sd and key in meta_sd:
                target, pattern = key, None
        if target in meta_sd and pattern is None and not (saved_quantized and _saved_quantized(key, info, checkpoint)):
            _check_shape(key, info, meta_sd[target].shape)
            _check_dtype(key, info, meta_sd[target].dtype)
        if target in buffers:
            buffer_keys[target] = key
            continue
        unit = unit_of_param.get(target)
        if unit is None:
            continue  # unexpected key: transformers ignores these too (with a warning)
        unit.checkpoint_keys.append(key)
        covered.add(target)
        if pattern is not None or target != key:
            converted_units.add(unit.index)
    if converters:  # a converter's other targets (e.g. fused experts) are covered by its sources
        for u in units:
            if u.index in converted_units:
                covered.update(n for s in u.params for n in s.names)
    ignore = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    missing = []
    for u in units:
        for slot in u.params:
            if not any(n in covered for n in slot.names):
                if not any(_re_search(pat, n) for pat in ignore for n in slot.names):
                    missing.append(slot.names[0])
    if missing:
        raise CheckpointError(
            f"checkpoint in {checkpoint.folder!r} lacks {len(missing)} weight(s) the model needs, "
            f"e.g. {missing[:3]}; is the config.json from the same model as the weights?")
    for u in units:
        if u.index in converted_units:
            u.direct = False
            continue
        by_name = {}
        for key in u.checkpoint_keys:
            by_name[key] = checkpoint.tensors[key]
        u.direct = not checkpoint.is_pickle and all(
            len([n for n in s.names if n in by_name]) >= 1
            and by_name[next(n for n in s.names if n in by_name)].dtype == str(s.dtype).removeprefix("torch.")
            and tuple(by_name[next(n for n in s.names if n in by_name)].shape) == s.shape
            for s in u.params)
    return buffer_keys, conversions


def _saved_quantized(key, info, checkpoint) -> bool:
    """Whether checkpoint tensor ``key`` is a bitsandbytes weight saved quantized (integer bytes with
    their quantization state beside them: quant.py reads them)."""
    return info.dtype in ("uint8", "int8") and (key + ".absmax" in checkpoint.tensors
                                                 or key.rsplit(".", 1)[0] + ".SCB" in checkpoint.tensors)


def _check_shape(key, info, expected):
    """A checkpoint tensor must have its parameter's shape: copying it would broadcast a [1]
    into a [64] without a word, or fail deep inside the engine."""
    if tuple(info.shape) != tuple(expected):
        raise CheckpointError(
            f"checkpoint tensor {key!r} in {info.file!r} has shape {list(info.shape)}, but the model "
            f"built from config.json expects {list(expected)}; is config.json from the same model as the "
            "weights?")


def _check_dtype(key, info, expected):
    """A floating-point parameter can't take integer or bool bytes (a bitsandbytes int8 checkpoint's
    weights): casting them would turn quantized values into wrong weights without a word."""
    if getattr(expected, "is_floating_point", False) and not info.dtype.startswith(("float", "bfloat")):
        raise CheckpointError(
            f"checkpoint tensor {key!r} in {info.file!r} holds {info.dtype} values, but the model built from "
            f"config.json has a {str(expected).removeprefix('torch.')} weight there; a quantized checkpoint "
            "can't be read as plain weights: load the unquantized checkpoint.")


def _re_search(pattern, name):
    import re
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return fnmatch.fnmatch(name, pattern)
