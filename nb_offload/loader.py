"""``load()`` and ``plan()``: from a model folder or Hub id to an OffloadedModel or a Plan.

Loading reads one unit at a time and puts it straight into its tier (device buffer,
page-locked host buffer, or disk), so host memory peaks at most one unit above its final use.
"""

from __future__ import annotations

import contextlib
import os

from .budget import format_size, host_memory, parse_size
from .checkpoint import Checkpoint, resolve
from .errors import CheckpointError, OffloadError, OptionError
from .planner import DEFAULT_CONTEXT, make_plan, resolve_pins
from .trace import check_detail
from .units import build_meta_model, find_units, map_checkpoint, resolve_dtype

POLICIES = ("auto", "sequential")
QUANTS_PLANNED = ("int8", "nf4", "fp4")
GPU_HEADROOM = 0.05     # share of the card left free when gpu=None


def _check_options(quant, policy, batch, context, prefetch, read_ahead, read_threads=1, split_blocks="auto",
                   hold_spare=True, drop_page_cache="auto"):
    for name, value, auto in (
            ("split_blocks", split_blocks, "split when whole-block staging would take over a tenth of the room "
                                           "left for weights"),
            ("drop_page_cache", drop_page_cache, "skip the page cache when the disk tier is larger than the free RAM")):
        if not (value is True or value is False or value == "auto"):
            raise OptionError(f"{name}={value!r} is not valid; accepted: True, False or \"auto\" ({auto}).")
    if not isinstance(hold_spare, bool):
        raise OptionError(f"hold_spare={hold_spare!r} is not valid; accepted: True or False.")
    if quant is not None:
        if quant in QUANTS_PLANNED:
            raise OptionError(f"quant={quant!r} is not available in this version of nb_offload yet; "
                              "accepted now: None (weights in the checkpoint's dtype or dtype=).")
        raise OptionError(f"quant={quant!r} is unknown; accepted: None (and, in a later version, "
                          f"{', '.join(QUANTS_PLANNED)}).")
    if policy not in POLICIES:
        raise OptionError(f"policy={policy!r} is unknown; accepted: {', '.join(map(repr, POLICIES))}.")
    for name, value, low in (("batch", batch, 1), ("context", context, 1), ("prefetch", prefetch, 1),
                             ("read_ahead", read_ahead, 1), ("read_threads", read_threads, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise OptionError(f"{name}={value!r} is not valid; give an int >= {low}.")


def _compute_device(device, gpu_given: bool):
    import torch
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    text = str(device)
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cuda", "cpu"):
        raise OptionError(f"device={device!r} is not supported; accepted: \"cuda\", \"cuda:N\" or \"cpu\".")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"device={device!r}: this machine has no CUDA device; use device=\"cpu\".")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), numbered from 0.")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _budgets(device, gpu, cpu, disk, *, planning=False):
    """Budgets in bytes per tier. Percentages are of each tier's capacity on this machine."""
    total_ram, avail_ram = host_memory()
    out = {}
    if device == "cuda":
        if planning and gpu is None:
            raise OptionError("a dry-run plan for a GPU needs gpu= (the card is not on this machine).")
        if not planning or (isinstance(gpu, str) and gpu.strip().endswith("%")):
            import torch
            free, total = torch.cuda.mem_get_info()
        else:
            free = total = None
        out["gpu"] = (parse_size(gpu, capacity=total, what="gpu") if gpu is not None
                      else int(free - GPU_HEADROOM * total))
    out["cpu"] = (parse_size(cpu, capacity=total_ram, what="cpu") if cpu is not None
                  else int(avail_ram * 0.8))
    out["disk"] = None if disk is None else _disk_capacity(disk)
    return out


def _disk_capacity(disk):
    from .budget import disk_free
    if not isinstance(disk, (str, os.PathLike)) or not os.fspath(disk).strip():
        from .errors import DiskTierError
        raise DiskTierError(f"disk={disk!r} is not a folder path; give a path such as \"./offload\".")
    return disk_free(os.path.expanduser(os.fspath(disk)))


@contextlib.contextmanager
def _quiet_transformers():
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


class Inspection:
    """A model's config, meta model, units and checkpoint map: everything a plan needs."""

    def __init__(self, model, *, dtype=None, allow_pickle=False, trust_remote_code=False,
                 attn_implementation=None, local_files_only=None, revision=None):
        from transformers import AutoConfig
        self.folder = resolve(model, local_files_only=local_files_only, revision=revision)
        self.name = os.fspath(model)
        self.checkpoint = Checkpoint(self.folder, allow_pickle=allow_pickle)
        with _quiet_transformers():
            try:
                self.config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
            except Exception as exc:
                raise CheckpointError(f"model folder {self.folder!r}: config.json can't be read ({exc}).") from exc
        self.dtype = resolve_dtype(dtype, self.config)
        with _quiet_transformers():
            self.meta = build_meta_model(self.config, self.dtype, attn_implementation, trust_remote_code)
        self.units = find_units(self.meta)
        from .pieces import split_unit
        for u in self.units:
            split_unit(self.meta, u)
        self.buffer_keys, self.conversions = map_checkpoint(self.meta, self.units, self.checkpoint)

    def default_context(self):
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return min(DEFAULT_CONTEXT, limit) if limit else DEFAULT_CONTEXT

    @property
    def dtype_size(self) -> int:
        """Bytes per element of the weights (and of the KV cache) in the load dtype."""
        return self.dtype.itemsize if hasattr(self.dtype, "itemsize") else 2

    def make_plan(self, device_type, budgets, pin_map, context, batch, prefetch, read_ahead, policy="auto",
                  split_blocks="auto"):
        return make_plan(self.units, device=device_type, budgets=budgets, pins=pin_map, config=self.config,
                         dtype_size=self.dtype_size, context=context, batch=batch, prefetch=prefetch,
                         model_name=self.name, read_ahead=read_ahead, policy=policy, split_blocks=split_blocks)


def plan(model, *, gpu=None, cpu=None, disk=None, dtype=None, quant=None, pins=None, device=None,
         policy="auto", context=None, batch=1, prefetch=None, read_ahead=2, allow_pickle=False,
         trust_remote_code=False, split_blocks="auto", **kwargs):
    """A dry run: where each unit would live, from the config and safetensors headers alone.

    With ``gpu=`` given the plan is for a CUDA device, also on a machine without one.
    """
    _check_options(quant, policy, batch, context, prefetch, read_ahead, split_blocks=split_blocks)
    insp = Inspection(model, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                      local_files_only=kwargs.pop("local_files_only", None), revision=kwargs.pop("revision", None))
    if device is not None:
        dev_type = str(device).split(":")[0]
        if dev_type not in ("cuda", "cpu"):
            raise OptionError(f"device={device!r} is not supported; accepted: \"cuda\", \"cuda:N\" or \"cpu\".")
    elif gpu is not None:
        dev_type = "cuda"
    else:
        import torch
        dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    budgets = _budgets(dev_type, gpu, cpu, disk, planning=True)
    pin_map = resolve_pins(pins, insp.units)
    prefetch = prefetch or (1 if dev_type == "cuda" else 2)
    return insp.make_plan(dev_type, budgets, pin_map, context or insp.default_context(), batch,
                          prefetch, read_ahead, policy, split_blocks)


def load(model, *, gpu=None, cpu=None, disk=None, dtype=None, quant=None, pins=None, device=None,
         policy="auto", context=None, batch=1, prefetch=None, read_ahead=2, trace=True,
         allow_pickle=False, progress=True, read_threads=8, drop_page_cache="auto",
         trace_detail="streamed", hold_spare=True, split_blocks="auto", **from_pretrained_kwargs):
    """Load a causal LM under memory budgets; see the README for the options."""
    _check_options(quant, policy, batch, context, prefetch, read_ahead, read_threads, split_blocks, hold_spare,
                   drop_page_cache)
    check_detail(trace_detail)      # before any weight is read
    trust_remote_code = bool(from_pretrained_kwargs.pop("trust_remote_code", False))
    attn = from_pretrained_kwargs.pop("attn_implementation", None)
    local_only = from_pretrained_kwargs.pop("local_files_only", None)
    revision = from_pretrained_kwargs.pop("revision", None)
    from_pretrained_kwargs.pop("low_cpu_mem_usage", None)
    if from_pretrained_kwargs:
        raise OptionError(f"unsupported option(s) {sorted(from_pretrained_kwargs)}; nb_offload.load takes "
                          "gpu, cpu, disk, dtype, quant, pins, device, policy, context, batch, prefetch, "
                          "read_ahead, read_threads, drop_page_cache, trace, trace_detail, hold_spare, "
                          "split_blocks, allow_pickle, "
                          "trust_remote_code, attn_implementation, "
                          "local_files_only and revision.")
    import torch
    dev = _compute_device(device, gpu is not None)
    if dev.type == "cpu" and gpu is not None:
        raise OptionError(f"gpu={gpu!r} was given but compute runs on the CPU (no CUDA device, or "
                          "device=\"cpu\"); drop gpu=, or load on a machine with a GPU.")
    insp = Inspection(model, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                      attn_implementation=attn, local_files_only=local_only, revision=revision)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            budgets = _budgets("cuda", gpu, cpu, disk)
    else:
        budgets = _budgets("cpu", gpu, cpu, disk)
    pin_map = resolve_pins(pins, insp.units)
    prefetch = prefetch or (1 if dev.type == "cuda" else 2)
    the_plan = insp.make_plan(dev.type, budgets, pin_map, context or insp.default_context(), batch,
                              prefetch, read_ahead, policy, split_blocks)
    from .model import OffloadedModel
    from .storage import Storage
    storage = Storage(insp, dev, disk)
    try:
        storage.materialize(the_plan, progress=progress)
        engine_options = dict(prefetch=prefetch, read_ahead=read_ahead, read_threads=read_threads,
                              drop_page_cache=drop_page_cache)
        handle = OffloadedModel._assemble(insp, storage, the_plan, pin_map, dev, budgets=budgets,
                                          engine_options=engine_options, policy=policy, trace=trace,
                                          trace_detail=trace_detail, hold_spare=hold_spare,
                                          split_blocks=split_blocks)
    except BaseException as exc:
        storage.abort()
        if isinstance(exc, (OffloadError, KeyboardInterrupt)):
            raise
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise OffloadError(f"the GPU ran out of memory while loading ({exc}); give a smaller gpu= budget "
                               f"than {format_size(budgets.get('gpu') or 0)}.") from exc
        raise
    return handle
