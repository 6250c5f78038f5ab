"""``load()`` and ``plan()``: from a model folder or Hub id to an OffloadedModel or a Plan.

Loading reads one unit at a time and puts it straight into its tier (device buffer,
page-locked host buffer, or disk), so host memory peaks at most one unit above its final use.
"""

from __future__ import annotations

import os

from .budget import format_size, host_memory, parse_size, process_memory
from .checkpoint import Checkpoint, resolve
from .errors import BudgetError, CheckpointError, DiskTierError, OffloadError, OptionError
from .planner import DEFAULT_CONTEXT, make_plan, resolve_pins
from .trace import check_detail
from .units import build_meta_model, find_units, map_checkpoint, quiet_transformers, resolve_dtype

POLICIES = ("auto", "sequential")
QUANTS_PLANNED = ("int8", "nf4", "fp4")
GPU_HEADROOM = 0.05     # share of the card left free when gpu=None
PLAN_OPTIONS = ("gpu", "cpu", "disk", "dtype", "quant", "pins", "device", "policy", "context", "batch", "prefetch",
                "read_ahead", "split_blocks", "allow_pickle", "trust_remote_code", "attn_implementation",
                "local_files_only", "revision")
LOAD_OPTIONS = PLAN_OPTIONS + ("read_threads", "drop_page_cache", "trace", "trace_detail", "hold_spare",
                               "progress")


# Opt-ins that let a checkpoint folder run code: only the bool True opts in (the string "False"
# is truthy, so bool() of it would turn them on).
OPT_INS = {"trust_remote_code": "runs Python code from the model folder",
           "allow_pickle": "unpickling weight files can run code from them"}


def _check_opt_ins(**given):
    for name, value in given.items():
        if not isinstance(value, bool):
            raise OptionError(f"{name}={value!r} is not a bool; only True opts in ({OPT_INS[name]}), "
                              "False keeps it off.")


def _check_options(quant, policy, batch, context, prefetch, read_ahead, read_threads=1, split_blocks="auto",
                   hold_spare=True, drop_page_cache="auto", trace=True, progress=True, attn_implementation=None):
    for name, value, auto in (
            ("split_blocks", split_blocks, "split when whole-block staging would take over a tenth of the room "
                                           "left for weights"),
            ("drop_page_cache", drop_page_cache, "skip the page cache when the disk tier is larger than the free RAM")):
        if not (value is True or value is False or value == "auto"):
            raise OptionError(f"{name}={value!r} is not valid; accepted: True, False or \"auto\" ({auto}).")
    for name, value in (("hold_spare", hold_spare), ("trace", trace), ("progress", progress)):
        if not isinstance(value, bool):
            raise OptionError(f"{name}={value!r} is not valid; accepted: True or False.")
    if attn_implementation is not None and not isinstance(attn_implementation, str):
        raise OptionError(f"attn_implementation={attn_implementation!r} is not valid; accepted: None (the "
                          "model's default), \"eager\", \"sdpa\" or another name transformers knows.")
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


def _reject_unknown(function, kwargs, accepted):
    if kwargs:
        raise OptionError(f"unsupported option(s) {sorted(kwargs)}; nb_offload.{function} takes "
                          f"{', '.join(accepted)}.")


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
            if not torch.cuda.is_available():
                raise BudgetError(f"gpu={gpu!r}: a percentage is a share of the card's memory, and this machine "
                                  "has no CUDA device; for a dry run give a size such as \"20GiB\".")
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
    text = os.fspath(disk) if isinstance(disk, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text.strip() or "\0" in text:
        raise DiskTierError(f"disk={disk!r} is not a folder path; give a path such as \"./offload\".")
    return disk_free(os.path.expanduser(text))


_library_code = None


def library_code() -> int:
    """Host memory of the transformers code a load needs, charged to every plan's cpu budget.

    Its loading and generation code pulls in torch.distributed, dynamo and sympy: about 90 MiB of
    code objects, more than the weights of a small budget. Measured once a process, when nb_offload
    first imports it (so every plan of the process charges the same; 0 when the process already
    had it, e.g. from using transformers before)."""
    global _library_code
    if _library_code is None:
        before = process_memory()
        import transformers.core_model_loading  # noqa: F401
        import transformers.generation.utils  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
        after = process_memory()
        _library_code = max(0, after - before) if before is not None and after is not None else 0
    return _library_code


class Inspection:
    """A model's config, meta model, units and checkpoint map: everything a plan needs."""

    def __init__(self, model, *, dtype=None, allow_pickle=False, trust_remote_code=False,
                 attn_implementation=None, local_files_only=None, revision=None):
        self.library_code = library_code()      # first: it measures what these imports take
        from transformers import AutoConfig
        self.folder = resolve(model, local_files_only=local_files_only, revision=revision)
        self.name = os.fspath(model)
        self.checkpoint = Checkpoint(self.folder, allow_pickle=allow_pickle)
        with quiet_transformers():
            try:
                self.config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
            except Exception as exc:
                raise CheckpointError(f"model folder {self.folder!r}: config.json can't be read ({exc}).") from exc
        self.dtype = resolve_dtype(dtype, self.config)
        self.trust_remote_code = trust_remote_code
        # The config is untrusted too: check it against the checkpoint on a model that allocates
        # nothing (vocab_size=10**12 would otherwise try a 256 TB allocation), then build the one
        # that runs, with its real buffers.
        with quiet_transformers():
            structure = build_meta_model(self.config, self.dtype, attn_implementation, trust_remote_code,
                                         buffers=False)
        self.units = find_units(structure)
        from .pieces import split_unit
        for u in self.units:
            split_unit(structure, u)
        self.buffer_keys, self.conversions = map_checkpoint(structure, self.units, self.checkpoint)
        del structure
        with quiet_transformers():
            self.meta = build_meta_model(self.config, self.dtype, attn_implementation, trust_remote_code)

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
                         model_name=self.name, read_ahead=read_ahead, policy=policy, split_blocks=split_blocks,
                         library_code=self.library_code)


def plan(model, *, gpu=None, cpu=None, disk=None, dtype=None, quant=None, pins=None, device=None,
         policy="auto", context=None, batch=1, prefetch=None, read_ahead=2, allow_pickle=False,
         trust_remote_code=False, split_blocks="auto", attn_implementation=None, local_files_only=None,
         revision=None, **unknown):
    """A dry run: where each unit would live, from the config and safetensors headers alone.

    With ``gpu=`` given the plan is for a CUDA device, also on a machine without one.
    """
    _reject_unknown("plan", unknown, PLAN_OPTIONS)
    _check_opt_ins(trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    _check_options(quant, policy, batch, context, prefetch, read_ahead, split_blocks=split_blocks,
                   attn_implementation=attn_implementation)
    insp = Inspection(model, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                      attn_implementation=attn_implementation, local_files_only=local_files_only,
                      revision=revision)
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
         trace_detail="streamed", hold_spare=True, split_blocks="auto", trust_remote_code=False,
         attn_implementation=None, local_files_only=None, revision=None, low_cpu_mem_usage=None, **unknown):
    """Load a causal LM under memory budgets; see the README for the options."""
    _reject_unknown("load", unknown, LOAD_OPTIONS)
    _check_opt_ins(trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    _check_options(quant, policy, batch, context, prefetch, read_ahead, read_threads, split_blocks, hold_spare,
                   drop_page_cache, trace, progress, attn_implementation)
    check_detail(trace_detail)      # before any weight is read
    import torch
    host_before = process_memory()
    dev = _compute_device(device, gpu is not None)
    if dev.type == "cpu" and gpu is not None:
        raise OptionError(f"gpu={gpu!r} was given but compute runs on the CPU (no CUDA device, or "
                          "device=\"cpu\"); drop gpu=, or load on a machine with a GPU.")
    insp = Inspection(model, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                      attn_implementation=attn_implementation, local_files_only=local_files_only,
                      revision=revision)
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
    storage = Storage(insp, dev, disk, read_threads=read_threads)
    try:
        storage.materialize(the_plan, progress=progress)
        engine_options = dict(prefetch=prefetch, read_ahead=read_ahead, read_threads=read_threads,
                              drop_page_cache=drop_page_cache)
        handle = OffloadedModel._assemble(insp, storage, the_plan, pin_map, dev, budgets=budgets,
                                          engine_options=engine_options, policy=policy, trace=trace,
                                          trace_detail=trace_detail, hold_spare=hold_spare,
                                          split_blocks=split_blocks, host_before=host_before)
    except BaseException as exc:
        storage.abort()
        if isinstance(exc, (OffloadError, KeyboardInterrupt)):
            raise
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise OffloadError(f"the GPU ran out of memory while loading ({exc}); give a smaller gpu= budget "
                               f"than {format_size(budgets.get('gpu') or 0)}.") from exc
        raise
    return handle
