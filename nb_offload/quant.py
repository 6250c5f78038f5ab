"""Quantized units with bitsandbytes: the option, the byte layout, quantizing at load, binding.

A quantized Linear keeps its weight quantized in every tier. Its parameter slot holds, one after
another and each 256-byte aligned, what bitsandbytes' forward reads: for 4-bit the packed codes,
the per-block absmax and, with double quantization, the offset and the second-level absmax; for
int8 the row-major codes and the per-row scales. The unit still moves as one flat buffer, and
binding points the module's weight at views of it (``QuantBinding``), with a ``QuantState`` built
once per buffer, so the model's own forward runs bitsandbytes' kernels unchanged.

Which modules are quantized, and how, is transformers' decision: its bitsandbytes quantizer
replaces them on the meta model (its skip rules differ between versions, so they are never
copied here), and each weight is quantized by the same bitsandbytes call, on the same device,
that ``from_pretrained(quantization_config=...)`` makes, so the bytes are the same.

Only the option parsing runs without torch (``spec_of``, used when options are checked).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from .dtypes import canonical_dtype
from .errors import OptionError

FORMATS = ("int8", "nf4", "fp4")
INSTALL = "pip install 'nb_offload[quant]'"
# Short keys (read well in YAML and the magics) and the BitsAndBytesConfig names they stand for.
KEYS = {"format": None, "double_quant": "bnb_4bit_use_double_quant", "compute_dtype": "bnb_4bit_compute_dtype",
        "skip": "llm_int8_skip_modules", "threshold": "llm_int8_threshold"}
_BNB_KEYS = {"load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
             "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage", "llm_int8_threshold", "llm_int8_skip_modules",
             "llm_int8_has_fp16_weight", "llm_int8_enable_fp32_cpu_offload", "quant_method", "_load_in_4bit",
             "_load_in_8bit"}
BLOCKSIZE_2 = 256   # bitsandbytes' nested (double-quantization) blocksize; its CUDA kernels take no other


@dataclass(frozen=True)
class QuantSpec:
    """A checked quantization: format, double quantization, compute dtype (None: the load dtype),
    modules left unquantized (None: transformers' defaults) and the int8 outlier threshold."""

    format: str
    double_quant: bool = False
    compute_dtype: str | None = None
    skip: tuple | None = None
    threshold: float = 6.0

    @property
    def bits(self) -> int:
        return 8 if self.format == "int8" else 4

    def key(self) -> str:
        """A stable text naming everything that changes the quantized bytes (for the offload cache)."""
        return (f"{self.format},dq={self.double_quant},compute={self.compute_dtype},skip={self.skip},"
                f"threshold={self.threshold}")


def spec_of(name, value) -> QuantSpec | None:
    """The QuantSpec of a ``quant=`` value, or an OptionError naming the accepted forms.

    Accepted: None; "int8", "nf4", "fp4"; a mapping with the short keys (``format``, ``double_quant``,
    ``compute_dtype``, ``skip``, ``threshold``) or BitsAndBytesConfig's own names; a BitsAndBytesConfig.
    """
    if value is None:
        return None
    accepted = (f"accepted: None, {', '.join(map(repr, FORMATS))}, a dict such as "
                "{\"format\": \"nf4\", \"double_quant\": True}, or a transformers BitsAndBytesConfig")
    if isinstance(value, QuantSpec):
        return value
    if isinstance(value, str):
        fmt = value.strip().lower()
        if fmt not in FORMATS:
            raise OptionError(f"{name}={value!r} is unknown; {accepted}.")
        return QuantSpec(fmt)
    if type(value).__name__ == "BitsAndBytesConfig" and hasattr(value, "to_dict"):
        return _from_bnb_kwargs(name, value.to_dict(), accepted, from_config=True)
    if not isinstance(value, Mapping):
        raise OptionError(f"{name}={value!r} is not valid; {accepted}.")
    if any(k in _BNB_KEYS for k in value):
        return _from_bnb_kwargs(name, dict(value), accepted)
    unknown = sorted(str(k) for k in value if k not in KEYS)
    if unknown:
        raise OptionError(f"{name}: unknown key(s) {unknown}; the keys are {', '.join(KEYS)} (or "
                          "BitsAndBytesConfig's own names).")
    if "format" not in value:
        raise OptionError(f"{name}={dict(value)!r} has no format; add \"format\": one of {', '.join(FORMATS)}.")
    return _checked(name, value["format"], value.get("double_quant", False), value.get("compute_dtype"),
                    value.get("skip"), value.get("threshold", 6.0), accepted)


def _from_bnb_kwargs(name, kw, accepted, from_config=False):
    unknown = sorted(k for k in kw if k not in _BNB_KEYS)
    if unknown:
        raise OptionError(f"{name}: unknown BitsAndBytesConfig key(s) {unknown}.")
    eight, four = bool(kw.get("load_in_8bit") or kw.get("_load_in_8bit")), bool(kw.get("load_in_4bit")
                                                                                 or kw.get("_load_in_4bit"))
    if eight == four:
        raise OptionError(f"{name}: give exactly one of load_in_4bit=True or load_in_8bit=True.")
    for key, why in (("llm_int8_has_fp16_weight", "keeps float16 weights beside the int8 ones, for training"),
                     ("llm_int8_enable_fp32_cpu_offload", "offloads unquantized float32 weights; nb_offload "
                                                          "keeps offloaded blocks quantized, so drop it")):
        if kw.get(key):
            raise OptionError(f"{name}: {key}=True is not supported ({why}).")
    storage = str(kw.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
    if storage != "uint8":
        raise OptionError(f"{name}: bnb_4bit_quant_storage={storage!r} is not supported; accepted: uint8.")
    fmt = "int8" if eight else kw.get("bnb_4bit_quant_type", "fp4")
    compute = kw.get("bnb_4bit_compute_dtype")
    if compute is None and from_config:
        compute = "float32"     # what BitsAndBytesConfig itself makes of None
    return _checked(name, fmt, kw.get("bnb_4bit_use_double_quant", False), compute,
                    kw.get("llm_int8_skip_modules"), kw.get("llm_int8_threshold", 6.0), accepted)


def _checked(name, fmt, double_quant, compute_dtype, skip, threshold, accepted):
    if not isinstance(fmt, str) or fmt.strip().lower() not in FORMATS:
        raise OptionError(f"{name}: format {fmt!r} is unknown; {accepted}.")
    fmt = fmt.strip().lower()
    if not isinstance(double_quant, bool):
        raise OptionError(f"{name}: double_quant={double_quant!r} is not valid; accepted: True or False.")
    if double_quant and fmt == "int8":
        raise OptionError(f"{name}: double_quant applies to nf4 and fp4, not int8.")
    compute = canonical_dtype(f"{name}: compute_dtype", compute_dtype)
    if compute == "auto":
        compute = None
    if skip is not None:
        if isinstance(skip, str) or not all(isinstance(s, str) and s for s in skip):
            raise OptionError(f"{name}: skip={skip!r} is not valid; give a list of module names, such as "
                              "[\"lm_head\", \"mlp.down_proj\"] (it replaces transformers' defaults).")
        skip = tuple(skip)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise OptionError(f"{name}: threshold={threshold!r} is not valid; give a number >= 0 (int8's outlier "
                          "threshold; 6.0 by default, 0 for none).")
    return QuantSpec(fmt, double_quant, compute, skip, float(threshold))


# -- everything below runs at load, with torch ------------------------------------------------
def require_bitsandbytes():
    """bitsandbytes, imported quietly and without a download, or an OptionError saying how to install it."""
    try:
        logger = logging.getLogger("bitsandbytes")
        level = logger.level
        logger.setLevel(logging.ERROR)      # its import warns about optional CPU kernels it can't find
        try:
            with _no_hub_kernels():
                import bitsandbytes
        finally:
            logger.setLevel(level)
    except ImportError as exc:
        raise OptionError(f"quant= needs bitsandbytes, which is not installed ({exc}); {INSTALL}.") from exc
    return bitsandbytes


@contextlib.contextmanager
def _no_hub_kernels():
    """Inside, the ``kernels`` package fetches nothing from the Hugging Face Hub. bitsandbytes' import asks it
    for a CPU kernel on hosts with AVX-512 BF16, where it is installed (transformers 5.25 and later require
    it): a download at run time, which nb_offload never makes. Refused, bitsandbytes keeps its own CPU code,
    as it does without ``kernels``."""
    try:
        import kernels
    except ImportError:
        yield
        return
    fetch = getattr(kernels, "get_kernel", None)

    def refused(*args, **kwargs):
        raise RuntimeError("nb_offload fetches no kernels from the Hub")
    kernels.get_kernel = refused
    try:
        yield
    finally:
        if fetch is None:
            del kernels.get_kernel
        else:
            kernels.get_kernel = fetch


def bnb_config(spec: QuantSpec, load_dtype):
    """The transformers BitsAndBytesConfig that quantizes as ``spec`` says."""
    import torch
    from transformers import BitsAndBytesConfig
    compute = getattr(torch, spec.compute_dtype) if spec.compute_dtype else load_dtype
    if spec.format == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=spec.threshold,
                                  llm_int8_skip_modules=list(spec.skip) if spec.skip is not None else None)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.format,
                              bnb_4bit_use_double_quant=spec.double_quant, bnb_4bit_compute_dtype=compute,
                              llm_int8_skip_modules=list(spec.skip) if spec.skip is not None else None)


def check_device(spec: QuantSpec, device):
    """An OptionError, before any weight is read, where bitsandbytes can't run ``spec`` on ``device``."""
    bnb = require_bitsandbytes()
    if device.type == "cuda":
        return
    if device.type != "cpu":
        raise OptionError(f"quant={spec.format!r} can't run on {device}; accepted devices: cuda, cpu.")
    if not hasattr(bnb.functional, "quantize_4bit") or not hasattr(bnb.functional, "int8_vectorwise_quant"):
        raise OptionError(f"quant={spec.format!r}: this bitsandbytes ({bnb.__version__}) has no CPU support; "
                          "use a CUDA device, or bitsandbytes >= 0.48.")


def quantize_model(model, spec: QuantSpec, load_dtype, device, saved_config=None):
    """Replace ``model``'s Linears by bitsandbytes' modules, on meta, as transformers does for
    ``from_pretrained(quantization_config=...)`` (its skip rules, for this version); for a checkpoint
    saved quantized, from its own ``quantization_config`` (``saved_config``), as transformers loads it."""
    require_bitsandbytes()
    from transformers.quantizers.auto import AutoHfQuantizer
    config = dict(saved_config) if saved_config is not None else bnb_config(spec, load_dtype)
    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=saved_config is not None)
    quantizer.preprocess_model(model=model, dtype=load_dtype, device_map={"": str(device)})
    model.eval()        # the new modules start in training mode, which takes other kernels
    return quantizer


def unquantize_modules(model, roots, load_dtype):
    """Put plain modules back (on meta) in place of the bitsandbytes ones under each of ``roots``: units
    a pin keeps in the load dtype."""
    import torch
    from transformers.pytorch_utils import Conv1D
    bnb = require_bitsandbytes()
    for root in roots:
        base = model.get_submodule(root) if root else model
        for name, module in list(base.named_modules()):
            if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                continue
            with torch.device("meta"):
                if issubclass(getattr(module, "source_cls", torch.nn.Linear), Conv1D):
                    plain = Conv1D(module.out_features, module.in_features)
                else:
                    plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.to(load_dtype).eval()
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, plain)


@dataclass
class Part:
    """One tensor of a quantized weight, inside its slot's bytes."""

    role: str           # data, absmax, offset, absmax2 (4-bit); CB, SCB (int8)
    offset: int
    nbytes: int
    dtype: object
    shape: tuple


@dataclass
class QuantLayout:
    """How one quantized weight lies in its slot, and the metadata bitsandbytes' QuantState carries."""

    format: str
    shape: tuple                # the weight as quantized: (out features, in features)
    source_dtype: object        # the dtype it was quantized from (the load dtype)
    blocksize: int = 64
    nested: bool = False        # stored with double quantization's parts (its absmax quantized again)
    cpu_packed: bool = False    # the CPU's AVX512-BF16 layout (see ``layout_of``): double quantization undone
    double_quant: bool = False  # quantized with double quantization (stored nested unless cpu_packed)
    transpose: bool = False     # a GPT-2 Conv1D weight: transposed before quantizing, as transformers does
    parts: list = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def source_shape(self) -> tuple:
        """The weight's shape in the checkpoint (a Conv1D's is transposed)."""
        return (self.shape[1], self.shape[0]) if self.transpose else tuple(self.shape)


def _pack_parts(specs) -> tuple[list, int]:
    from .units import round_up
    parts, offset = [], 0
    for role, dtype, shape in specs:
        nbytes = _numel(shape) * dtype.itemsize
        parts.append(Part(role, offset, nbytes, dtype, tuple(shape)))
        offset += round_up(nbytes)
    return parts, offset


def layout_of(module, param, load_dtype, device) -> QuantLayout:
    """The layout of a bitsandbytes module's weight once quantized on ``device``.

    On a CPU with AVX512-BF16, bitsandbytes' 4-bit forward rewrites a weight into a packed layout
    on its first call (``_convert_weight_packed_for_cpu``: 32-row interleaved codes, bf16 absmax,
    double quantization undone); a view bound into a staging slot would be replaced. So there the
    stored layout is the packed one, made once at load by that same function.
    """
    import torch

    bnb = require_bitsandbytes()
    from transformers.pytorch_utils import Conv1D
    out_f, in_f = module.out_features, module.in_features
    transpose = issubclass(getattr(module, "source_cls", torch.nn.Linear), Conv1D)
    if isinstance(module, bnb.nn.Linear8bitLt):
        parts, _ = _pack_parts([("CB", torch.int8, (out_f, in_f)), ("SCB", torch.float32, (out_f,))])
        return QuantLayout("int8", (out_f, in_f), load_dtype, parts=parts, transpose=transpose)
    blocksize, double_quant = param.blocksize, bool(param.compress_statistics)
    nested = double_quant
    numel = out_f * in_f
    blocks = -(-numel // blocksize)
    cpu_packed = device.type == "cpu" and bool(getattr(module, "support_avx512bf16_for_cpu", False))
    if cpu_packed:
        if out_f % 32 or in_f % blocksize:
            raise OptionError(
                f"quant={param.quant_type!r} on this CPU: bitsandbytes' AVX512-BF16 kernel needs a weight's output "
                f"features divisible by 32 and input features by {blocksize}, and {module.__class__.__name__} "
                f"of shape [{out_f}, {in_f}] has neither; use quant=\"int8\", or a CUDA device.")
        specs = [("data", torch.uint8, (out_f, in_f // 2)), ("absmax", torch.bfloat16, (in_f // blocksize, out_f))]
        nested = False
    else:
        specs = [("data", torch.uint8, ((numel + 1) // 2, 1))]
        if nested:
            specs += [("absmax", torch.uint8, (blocks,)), ("offset", torch.float32, ()),
                      ("absmax2", torch.float32, (-(-blocks // BLOCKSIZE_2),))]
        else:
            specs += [("absmax", torch.float32, (blocks,))]
    parts, _ = _pack_parts(specs)
    return QuantLayout(param.quant_type, (out_f, in_f), load_dtype, blocksize, nested, cpu_packed, double_quant,
                       transpose, parts)


def lay_out_units(model, units, spec: QuantSpec, load_dtype, device, compute_itemsize: int):
    """Give the units of a model ``quantize_model`` changed their quantized layouts: each bitsandbytes
    module's weight becomes a quantized slot, its bias is kept in the load dtype (as transformers
    loads it), and the units' offsets, sizes and formats follow."""
    from .units import dtype_name, lay_out
    bnb = require_bitsandbytes()
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    for unit in units:
        changed = False
        for slot in unit.params:
            module_name, _, attr = slot.names[0].rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            if not isinstance(module, quantized):
                continue
            if attr == "weight":
                slot.quant = layout_of(module, module.weight, load_dtype, device)
                data = next(p for p in slot.quant.parts if p.role in ("data", "CB"))
                slot.dtype, slot.shape, slot.nbytes = data.dtype, data.shape, slot_bytes(slot.quant)
                unit.dequant_bytes = max(unit.dequant_bytes,
                                         dequant_bytes(slot.quant, compute_itemsize, spec.threshold))
            else:
                slot.dtype = load_dtype
                slot.nbytes = _numel(slot.shape) * load_dtype.itemsize
            changed = True
        if changed:
            lay_out(unit)
            unit.fmt = next(s.quant.format for s in unit.params if s.quant is not None)
        elif unit.params:
            unit.fmt = dtype_name(unit.params[0].dtype)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def slot_bytes(layout: QuantLayout) -> int:
    last = layout.parts[-1]
    return last.offset + last.nbytes


def dequant_bytes(layout: QuantLayout, compute_itemsize: int, threshold: float) -> int:
    """GPU bytes a quantized forward may allocate beside its weight. 4-bit on many tokens (prefill):
    the whole weight dequantized into the compute dtype, and an fp32 copy of the absmax. int8 with an
    outlier threshold: the weight's columns the activations' outliers fall in, copied, dequantized to
    fp32 and cast to the compute dtype; at worst all of them."""
    if layout.format == "int8":
        return layout.numel * (1 + 4 + compute_itemsize) if threshold > 0 else 0
    return layout.numel * compute_itemsize + -(-layout.numel // layout.blocksize) * 4


# -- quantizing at load -------------------------------------------------------------------------
def quantize_into(layout: QuantLayout, weight, dest, device):
    """Quantize ``weight`` (the checkpoint tensor in the load dtype, on any device) on ``device`` the
    way transformers does at load, and write its parts into ``dest`` (the slot's bytes, any device)."""
    import torch
    bnb = require_bitsandbytes()
    F = bnb.functional
    w = weight.to(device)
    if layout.transpose:
        w = w.T
    if layout.format == "int8":
        cb, scb, _ = F.int8_vectorwise_quant(w.contiguous().to(device=device, dtype=torch.float16))
        _write_parts(layout, {"CB": cb, "SCB": scb}, dest)
        return
    data, state = F.quantize_4bit(w.contiguous(), blocksize=layout.blocksize, compress_statistics=layout.double_quant,
                                  quant_type=layout.format, quant_storage=torch.uint8)
    _write_4bit(layout, data, state, dest)


def load_saved_into(layout: QuantLayout, key: str, checkpoint, dest, device):
    """Copy a weight saved quantized by transformers (its ``key`` and companions in ``checkpoint``) into
    ``dest`` as it is (on a CPU with AVX512-BF16, repacked as bitsandbytes' forward would)."""
    F = require_bitsandbytes().functional
    data = checkpoint.get(key)
    if layout.format == "int8":
        _write_parts(layout, {"CB": data, "SCB": checkpoint.get(_module_of(key) + ".SCB")}, dest)
        return
    companions = {k[len(key) + 1:]: checkpoint.get(k) for k in saved_companions(key, checkpoint)}
    state = F.QuantState.from_dict(companions, device)
    _write_4bit(layout, data.to(device), state, dest)


def _write_4bit(layout, data, state, dest):
    F = require_bitsandbytes().functional
    if layout.cpu_packed:
        data, state = F._convert_weight_packed_for_cpu(data, state)
    tensors = {"data": data, "absmax": state.absmax}
    if state.nested:
        tensors.update(offset=state.offset, absmax2=state.state2.absmax)
    _write_parts(layout, tensors, dest)


def _write_parts(layout, tensors, dest):
    for part in layout.parts:
        src = tensors[part.role]
        if tuple(src.shape) != part.shape or src.dtype != part.dtype:
            raise RuntimeError(f"bitsandbytes gave {part.role} as {src.dtype} {list(src.shape)}, the layout "
                               f"expects {part.dtype} {list(part.shape)}")
        part_view(dest, part).copy_(src)


def part_view(flat, part: Part):
    return flat[part.offset:part.offset + part.nbytes].view(part.dtype).view(part.shape)


# -- checkpoints saved quantized -----------------------------------------------------------------
def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


def saved_companions(key: str, checkpoint) -> list:
    """The keys a 4-bit weight saved by transformers carries beside ``key`` (absmax, quant_map, ...)."""
    return [k for k in checkpoint.tensors if k.startswith(key + ".")]


def check_saved(units, checkpoint):
    """Check each quantized weight of a checkpoint saved quantized against the layout the model expects,
    and take the dtype it was quantized from; a CheckpointError names the first that doesn't fit."""
    import torch

    from .errors import CheckpointError
    for unit in units:
        for slot in unit.params:
            layout = slot.quant
            if layout is None:
                continue
            key = next((n for n in slot.names if n in checkpoint.tensors), slot.names[0])

            def bad(what, key=key):
                return CheckpointError(f"checkpoint tensor {key!r} in {checkpoint.folder!r} {what}; is config.json's "
                                       "quantization_config from the same model as the weights?")
            info = checkpoint.tensors.get(key)
            want = next(p for p in layout.parts if p.role in ("data", "CB"))
            if info is None or info.nbytes != want.nbytes or info.dtype != str(want.dtype).removeprefix("torch."):
                raise bad(f"is not the {layout.format} weight of shape {list(layout.shape)} the model expects")
            if layout.format == "int8":
                scb = checkpoint.tensors.get(_module_of(key) + ".SCB")
                if scb is None or tuple(scb.shape) != (layout.shape[0],):
                    raise bad(f"has no {_module_of(key)}.SCB of {layout.shape[0]} row scales beside it")
                continue
            blob = f"{key}.quant_state.bitsandbytes__{layout.format}"
            if blob not in checkpoint.tensors:
                raise bad(f"has no {blob.rsplit('.', 1)[-1]} quantization state beside it")
            try:
                import json
                meta = json.loads(bytes(checkpoint.get(blob).tolist()).decode())
                dtype = getattr(torch, meta["dtype"])
                fits = (meta["quant_type"] == layout.format and int(meta["blocksize"]) == layout.blocksize
                        and list(meta["shape"]) == list(layout.shape) and isinstance(dtype, torch.dtype)
                        and ("nested_offset" in meta) == layout.double_quant)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise bad(f"has a quantization state that can't be read ({exc})") from exc
            if not fits:
                raise bad(f"was saved as {meta.get('quant_type')} of shape {meta.get('shape')}, blocksize "
                          f"{meta.get('blocksize')}, not {layout.format} of shape {list(layout.shape)}")
            layout.source_dtype = dtype


# -- binding ------------------------------------------------------------------------------------
_constants: dict = {}


def _code(kind, device):
    """bitsandbytes' code tables, one tensor per device (it makes a copy per weight; they never differ)."""
    key = (kind, str(device))
    if key not in _constants:
        F = require_bitsandbytes().functional
        table = F.create_dynamic_map() if kind == "dynamic" else F.get_4bit_type(kind, device="cpu")
        _constants[key] = table.to(device)
    return _constants[key]


class QuantBinding:
    """A quantized weight's views inside one buffer, bound to its parameter by ``bind_to``."""

    __slots__ = ("data", "state", "scb")

    def __init__(self, layout: QuantLayout, flat):
        import torch
        views = {p.role: part_view(flat, p) for p in layout.parts}
        self.scb = None
        if layout.format == "int8":
            self.data, self.state, self.scb = views["CB"], None, views["SCB"]
            return
        F = require_bitsandbytes().functional
        self.data = views["data"]
        state2 = None
        if layout.nested:
            state2 = F.QuantState(absmax=views["absmax2"], code=_code("dynamic", flat.device),
                                  blocksize=BLOCKSIZE_2, dtype=torch.float32)
        self.state = F.QuantState(absmax=views["absmax"], shape=torch.Size(layout.shape),
                                  code=_code(layout.format, flat.device), blocksize=layout.blocksize,
                                  quant_type=layout.format,
                                  dtype=torch.bfloat16 if layout.cpu_packed else layout.source_dtype,
                                  offset=views.get("offset"), state2=state2)
        if layout.cpu_packed:
            self.state.packing_format_for_cpu = True

    def bind_to(self, param):
        param.data = self.data
        if self.scb is not None:
            # Linear8bitLt's forward reads its module's state; set it here, not through weight.CB (which
            # forward moves into the state only when it next runs: until then the state would keep the
            # last buffer alive, e.g. a held unit's after it was released).
            state = param.module_state
            state.CB, state.SCB = self.data, self.scb
        else:
            param.quant_state = self.state


def unbind(param):
    """Drop a quantized parameter's references to its buffers (so unloading frees them)."""
    state = getattr(param, "module_state", None)
    if state is not None:
        state.CB = state.SCB = None
    if getattr(param, "quant_state", None) is not None:
        param.quant_state = None


def make_param(module, layout: QuantLayout, device):
    """The empty parameter a quantized module's weight starts as (bound later), of bitsandbytes' class."""
    import torch
    bnb = require_bitsandbytes()
    if layout.format == "int8":
        param = bnb.nn.Int8Params(torch.empty(0, dtype=torch.int8, device=device), requires_grad=False,
                                  has_fp16_weights=False)
        param.module_state = module.state       # where its binding puts CB and SCB
        return param
    return bnb.nn.Params4bit(torch.empty(0, dtype=torch.uint8, device=device), requires_grad=False,
                             blocksize=layout.blocksize, compress_statistics=layout.nested,
                             quant_type=layout.format, quant_storage=torch.uint8, module=module,
                             bnb_quantized=True)


class _OnceFilter(logging.Filter):
    """Lets bitsandbytes' int8 cast warning through once: it logs it on every matmul ("inputs will be
    cast from torch.bfloat16 to float16"), hundreds of lines a generate."""

    seen = False

    def filter(self, record):
        if "will be cast" not in record.getMessage():
            return True
        first, _OnceFilter.seen = not _OnceFilter.seen, True
        return first


def quiet_int8_casts():
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in logger.filters):
        logger.addFilter(_OnceFilter())
