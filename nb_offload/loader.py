"""``load()`` and ``plan()``: from a model folder or Hub id to an OffloadedModel or a Plan.

Loading reads one unit at a time and puts it straight into its tier (device buffer,
page-locked host buffer, or disk), so host memory peaks at most one unit above its final use.
"""

from __future__ import annotations

import os

from .budget import format_size, host_memory, parse_size, process_memory
from .checkpoint import Checkpoint, resolve
from .errors import BudgetError, CheckpointError, OffloadError, OptionError
from .options import Options
from .planner import DEFAULT_CONTEXT, Plan, make_plan, resolve_pins
from .units import build_meta_model, find_units, map_checkpoint, quiet_transformers, resolve_dtype

GPU_HEADROOM = 0.05     # share of the card left free when gpu=None


def _compute_device(device):
    """The torch device of a checked ``device`` option (None: CUDA where there is one)."""
    import torch
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
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
    return disk_free(os.path.expanduser(os.fspath(disk)))


_library_code = None


def library_code() -> int:
    """Host memory of the transformers code a load needs, charged to every plan's cpu budget.

    Its loading and generation code pulls in torch.distributed, dynamo and sympy: about 90 MiB of
    code objects, more than the weights of a small budget. Measured once a process, when nb_offload
    first imports it (so every plan of the process charges the same; 0 when the process already
    had it, e.g. from using transformers before)."""
    global _library_code
    if _library_code is None:
        import torch  # noqa: F401  (already there for a load; imported first so only transformers is counted)
        before = process_memory()
        import transformers.core_model_loading  # noqa: F401
        import transformers.generation.utils  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
        after = process_memory()
        _library_code = max(0, after - before) if before is not None and after is not None else 0
    return _library_code


class Inspection:
    """A model's config, meta model, units and checkpoint map: everything a plan needs."""

    def __init__(self, model, options: Options | None = None):
        self.library_code = library_code()      # first: it measures what these imports take
        from transformers import AutoConfig
        self.options = options = options or Options()
        self.folder = resolve(model, local_files_only=options.local_files_only, revision=options.revision)
        self.name = os.fspath(model)
        self.checkpoint = Checkpoint(self.folder, allow_pickle=options.allow_pickle)
        with quiet_transformers():
            try:
                self.config = AutoConfig.from_pretrained(self.folder, trust_remote_code=options.trust_remote_code)
            except Exception as exc:
                raise CheckpointError(f"model folder {self.folder!r}: config.json can't be read ({exc}).") from exc
        _refuse_prequantized(self.folder, self.config)
        self.dtype = resolve_dtype(options.dtype, self.config)
        # The config is untrusted too: check it against the checkpoint on a model that allocates
        # nothing (vocab_size=10**12 would otherwise try a 256 TB allocation), then build the one
        # that runs, with its real buffers.
        attn, remote = options.attn_implementation, options.trust_remote_code
        with quiet_transformers():
            structure = build_meta_model(self.config, self.dtype, attn, remote, buffers=False)
        self.units = find_units(structure)
        from .pieces import split_unit
        for u in self.units:
            split_unit(structure, u)
        self.buffer_keys, self.conversions = map_checkpoint(structure, self.units, self.checkpoint)
        del structure
        with quiet_transformers():
            self.meta = build_meta_model(self.config, self.dtype, attn, remote)

    def default_context(self):
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return min(DEFAULT_CONTEXT, limit) if limit else DEFAULT_CONTEXT

    @property
    def dtype_size(self) -> int:
        """Bytes per element of the weights (and of the KV cache) in the load dtype."""
        return self.dtype.itemsize if hasattr(self.dtype, "itemsize") else 2

    def make_plan(self, device_type, budgets, pins) -> Plan:
        """The plan for these options on ``device_type`` under ``budgets``, with ``pins`` (unit index -> tier)."""
        o = self.options
        return make_plan(self.units, device=device_type, budgets=budgets, pins=pins, config=self.config,
                         dtype_size=self.dtype_size, context=o.context or self.default_context(), batch=o.batch,
                         prefetch=prefetch_for(o, device_type), model_name=self.name, read_ahead=o.read_ahead,
                         policy=o.policy, split_blocks=o.split_blocks, library_code=self.library_code)


def _refuse_prequantized(folder, config):
    """A checkpoint saved quantized (bitsandbytes, GPTQ, fp8...) holds packed values and their scales,
    not weights: read as weights it would give wrong output, so it is refused until it can be read."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    raise CheckpointError(f"model folder {folder!r} holds weights quantized by {method or 'an unknown method'} "
                          "(config.json's quantization_config), which nb_offload can't read yet; load the "
                          "unquantized checkpoint instead (dtype= picks the precision).")


def prefetch_for(options: Options, device_type: str) -> int:
    """Units copied ahead: 1 on CUDA (the copy stream runs beside compute), 2 on the CPU."""
    return options.prefetch or (1 if device_type == "cuda" else 2)


def plan(model, **options) -> Plan:
    """A dry run: where each unit would live, from the config and safetensors headers alone.

    With ``gpu=`` given the plan is for a CUDA device, also on a machine without one.
    """
    opts = Options.given("plan", options)
    if opts.device is not None:
        dev_type = opts.device.split(":")[0]
    elif opts.gpu is not None:
        dev_type = "cuda"
    else:
        import torch
        dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    budgets = _budgets(dev_type, opts.gpu, opts.cpu, opts.disk, planning=True)     # before any file is read
    insp = Inspection(model, opts)
    return insp.make_plan(dev_type, budgets, resolve_pins(opts.pins, insp.units))


def load(model, **options):
    """Load a causal LM under memory budgets; see ``nb_offload.load``."""
    opts = Options.given("load", options)     # every option checked before any weight is read
    import time

    import torch
    t0 = time.perf_counter()
    host_before = process_memory()
    dev = _compute_device(opts.device)
    if dev.type == "cpu" and opts.gpu is not None:
        raise OptionError(f"gpu={opts.gpu!r} was given but compute runs on the CPU (no CUDA device, or "
                          "device=\"cpu\"); drop gpu=, or load on a machine with a GPU.")
    insp = Inspection(model, opts)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            budgets = _budgets("cuda", opts.gpu, opts.cpu, opts.disk)
    else:
        budgets = _budgets("cpu", opts.gpu, opts.cpu, opts.disk)
    pin_map = resolve_pins(opts.pins, insp.units)
    the_plan = insp.make_plan(dev.type, budgets, pin_map)
    from .model import OffloadedModel
    from .storage import Storage
    storage = Storage(insp, dev, opts.disk, read_threads=opts.read_threads, host_budget=budgets["cpu"])
    try:
        storage.materialize(the_plan, progress=opts.progress)
        handle = OffloadedModel._assemble(insp, storage, the_plan, pin_map, dev, budgets=budgets,
                                          host_before=host_before)
    except BaseException as exc:
        storage.abort()
        if isinstance(exc, (OffloadError, KeyboardInterrupt)):
            raise
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise OffloadError(f"the GPU ran out of memory while loading ({exc}); give a smaller gpu= budget "
                               f"than {format_size(budgets.get('gpu') or 0)}.") from exc
        raise
    handle.stats.load_seconds = time.perf_counter() - t0
    handle.stats.load_bytes = sum(u.nbytes for u in insp.units)
    return handle
