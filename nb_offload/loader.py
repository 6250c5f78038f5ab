"""``load()`` and ``plan()``: from a model folder or Hub id to an OffloadedModel or a Plan.

Loading reads one unit at a time and puts it straight into its tier (device buffer,
page-locked host buffer, or disk), so host memory peaks at most one unit above its final use.
"""

from __future__ import annotations

import os

from . import hybrid
from .budget import format_size, host_memory, parse_size, process_memory
from .checkpoint import Checkpoint, resolve
from .errors import BudgetError, CheckpointError, OffloadError, OptionError, PinError
from .options import Options
from .planner import (
    DEFAULT_CONTEXT,
    Plan,
    make_plan,
    resident_tier_of,
    resolve_expert_pins,
    resolve_pins,
    step_order,
    text_config,
)
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


# Staging depths whose modelled decode steps are within this share of the shortest are taken as equal (loader
# ``_deeper``): the model's own error is larger, while the bytes a prefill streams are known (docs/hybrid.md).
DEPTH_TIES = 0.01


def off_gpu_bytes(plan) -> int:
    """The bytes of a plan's units not resident on its compute device: what a prefill streams."""
    return sum(e.bytes for e in plan if e.tier != plan.resident_tier)


# How much faster than F.linear's the reordered weights' products must read in the load's measure for a plan to
# take them (cpu_products.py): their copies cost host memory, and the measure is noisy.
REORDERED_MARGIN = 1.05


class Inspection:
    """A model's config, meta model, units and checkpoint map: everything a plan needs."""

    def __init__(self, model, options: Options | None = None, device_type: str = "cpu"):
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
        self._cpu_rates = self._cpu_max_tokens = None     # measured on the first hybrid plan (cpu_rates)
        self._products = "F.linear"     # how the CPU's blocks multiply one row, chosen there (cpu_products)
        self._flinear_gbps = self._reordered_gbps = None      # F.linear's and the reordered weights' rates there
        self.products_gbps = None       # there, the chosen products' rate: a block's weights read at, in GB/s
        self.block_rest = None          # and the seconds a block's forward takes besides them (block_rest.py)
        self.fast_why_not = None        # why cpu_kernel="fast" was asked for and the exact products compute instead
        self._rates_reached = False     # the CPU's rate is the one its blocks reached decoding (use_cpu_rate)
        self.saved_quant = _saved_quantization(self.folder, self.config)    # its quantization_config, or None
        self.dtype = resolve_dtype(options.dtype, self.config)
        self.quant = options.quant      # a checked quant.QuantSpec, or None
        if self.saved_quant is not None:
            self.quant = _as_saved(self.folder, self.saved_quant, options.quant)
        if self.quant is not None:
            from .quant import check_device
            check_device(self.quant, _device_of(device_type))
        # The config is untrusted too: check it against the checkpoint on a model that allocates
        # nothing (vocab_size=10**12 would otherwise try a 256 TB allocation), then build the one
        # that runs, with its real buffers.
        attn, remote = options.attn_implementation, options.trust_remote_code
        experts = options.experts
        with quiet_transformers():
            structure = build_meta_model(self.config, self.dtype, attn, remote, buffers=False, experts=experts)
        self.units = find_units(structure)
        self.buffer_keys, self.conversions = map_checkpoint(structure, self.units, self.checkpoint,
                                                            saved_quantized=self.saved_quant is not None)
        del structure
        with quiet_transformers():
            self.meta = build_meta_model(self.config, self.dtype, attn, remote, experts=experts)
        self._check_formats(device_type)
        from .experts import describe
        from .pieces import split_unit
        cfg = text_config(self.config)
        top_k = getattr(cfg, "num_experts_per_tok", None) or 1
        for u in self.units:
            split_unit(self.meta, u)
            describe(self.meta, u, top_k, cuda=device_type == "cuda")
            if u.pieces and u.expert_row_nbytes:    # routed experts stream apart from what every token uses
                split_unit(self.meta, u, only=u.experts_module)
                if not u.pieces:        # its experts aren't one byte range of the layout: the usual pieces
                    split_unit(self.meta, u)
                describe(self.meta, u, top_k, cuda=device_type == "cuda")

    def _check_formats(self, device_type):
        """Quantize (``quant=``), keeping the units whose pins name the load dtype's format unquantized;
        a pin naming any other format is a PinError here, before any weight is read."""
        from .planner import pin_formats
        from .units import dtype_name
        formats = pin_formats(self.options.pins, self.units)
        plain = dtype_name(self.dtype)
        accepted = [plain] + ([self.quant.format] if self.quant is not None else [])
        for idx, fmt in formats.items():
            if fmt not in accepted:
                why = ("one quantization per load" if self.quant is not None
                       else "nothing is quantized without quant=")
                raise PinError(f"format {fmt!r} for {self.units[idx].name!r} can't be given here ({why}); "
                               f"accepted: {', '.join(accepted)}.")
        if self.quant is None:
            return
        keep = [self.units[i] for i, f in formats.items() if f == plain]
        if keep and self.saved_quant is not None:
            raise PinError(f"{keep[0].name!r} can't be pinned to {plain}: the checkpoint is saved quantized, and its "
                           f"units load as saved ({self.quant.format}).")
        self._quantize_units(device_type, keep=keep)
        for idx, fmt in formats.items():
            if fmt != plain and not self.units[idx].quantized:
                raise PinError(f"{self.units[idx].name!r} has no Linear that quant={self.quant.format!r} quantizes "
                               f"(transformers' skip rules); accepted for it: {plain}.")

    def _quantize_units(self, device_type, keep=()):
        """Swap the meta model's Linears for bitsandbytes' as transformers would (those of ``keep``
        swapped back), and lay the units out quantized (quant.py)."""
        import torch

        from . import quant
        with quiet_transformers():
            quant.quantize_model(self.meta, self.quant, self.dtype, _device_of(device_type), self.saved_quant)
        for unit in keep:
            quant.unquantize_modules(self.meta, unit.modules, self.dtype)
        compute = getattr(torch, self.quant.compute_dtype) if self.quant.compute_dtype else self.dtype
        quant.lay_out_units(self.meta, self.units, self.quant, self.dtype, _device_of(device_type),
                            compute.itemsize)
        for u in self.units:
            if u.quantized:
                u.direct = False
        if self.saved_quant is not None:
            quant.check_saved(self.units, self.checkpoint)
        if self.quant.format == "int8":
            quant.quiet_int8_casts()

    def default_context(self):
        cfg = text_config(self.config)
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return min(DEFAULT_CONTEXT, limit) if limit else DEFAULT_CONTEXT

    @property
    def dtype_size(self) -> int:
        """Bytes per element of the weights (and of the KV cache) in the load dtype."""
        return self.dtype.itemsize if hasattr(self.dtype, "itemsize") else 2

    def make_plan(self, device_type, budgets, pins, expert_pins=None, *, products: str | None = None) -> Plan:
        """The plan for these options on ``device_type`` under ``budgets``, with ``pins`` (unit index -> tier)
        and ``expert_pins`` (unit index -> experts kept in the expert cache). ``products``: how the CPU's blocks
        multiply, where not the one ``cpu_products`` measured faster (the plan made again with "F.linear" where
        the cpu budget has no room for reordered copies)."""
        o = self.options

        split = device_type == "cuda" and (o.compute == "hybrid" or (
            o.compute == "auto" and not hybrid.gpu_only_attention(o.attn_implementation)))
        rates = self._rates_for(products) if split else None

        def planned(prefetch, split_blocks=o.split_blocks, split=split):
            return make_plan(self.units, device=device_type, budgets=budgets, pins=pins, config=self.config,
                             dtype_size=self.dtype_size, context=o.context or self.default_context(), batch=o.batch,
                             prefetch=prefetch, model_name=self.name, read_ahead=o.read_ahead, policy=o.policy,
                             split_blocks=split_blocks, library_code=self.library_code,
                             decode_graph=o.cuda_graph, expert_cache=self._expert_cache(device_type, budgets),
                             expert_pins=expert_pins, cpu_rates=rates if split else None)
        plan = planned(prefetch_for(o, device_type))
        if o.prefetch is None:      # as far ahead as keeps the link busiest while the CPU computes a block
            plan = self._deeper(plan, planned)
        if o.compute == "auto" and split:
            plan = self._faster_of(plan, planned(prefetch_for(o, device_type), split=False))
        elif o.compute == "auto" and device_type == "cuda":
            plan.compute_choice = (f"compute=\"auto\": all streamed (attn_implementation="
                                   f"{o.attn_implementation!r} has GPU kernels only)")
        if device_type == "cuda" and any(e.routed_bytes for e in plan):
            plan.expert_share = o.host_expert_share
        if any(e.compute == "cpu" for e in plan):
            plan.cpu_max_tokens = self.cpu_max_tokens()
            plan.cpu_products = products or self.cpu_products()
            plan.cpu_kernel_why_not = self.fast_why_not or ""
            if plan.cpu_products == "reordered" and not self._reserve_reordered(plan, budgets):
                # no room for the copies: the plan made again with F.linear, at its rate
                return self.make_plan(device_type, budgets, pins, expert_pins, products="F.linear")
        elif o.cpu_kernel == "fast" and (plan.expert_share or device_type == "cpu"):
            # the CPU's routed experts, or on the CPU device every unit: one-row products by the kernel where it
            # runs, with no split of blocks to plan at its rate
            plan.cpu_products = "fast" if self._fast_kernel_runs() else "F.linear"
            plan.cpu_kernel_why_not = self.fast_why_not or ""
        elif o.cpu_kernel == "exact" and (plan.expert_share or device_type == "cpu") and self._amx_kernel_runs():
            # the CPU's routed experts, or on the CPU device every unit: F.linear's bits by the AMX kernel for the
            # shapes it has a chunk for (no rate is measured here: it read at least as fast, cpu_amx.py)
            plan.cpu_products = "amx"
        plan.rates_reached = bool(plan.rates) and self._rates_reached
        if plan.rates and not plan.rates_reached and self.block_rest:
            reordered_fallback = products == "F.linear" and self._products == "reordered"
            plan.cpu_rest = (self._flinear_gbps if reordered_fallback else self.products_gbps, self.block_rest)
        return plan

    def _rates_for(self, products: str | None) -> tuple:
        """``cpu_rates``, with the CPU's rate F.linear's where ``products`` is "F.linear" and the rate is the
        reordered products': at load, F.linear's own measure; reached decoding, that scaled by F.linear's share
        of the reordered rate at load."""
        cpu, link = self.cpu_rates()
        if products == "F.linear" and self._products == "reordered" and self._flinear_gbps:
            cpu = cpu * self._with_rest(self._flinear_gbps) / self._with_rest(self._reordered_gbps) \
                if self._rates_reached else self._with_rest(self._flinear_gbps)
        return cpu, link

    def _reserve_reordered(self, plan, budgets) -> bool:
        """Reserve in ``plan``'s host memory the reordered copies of its CPU blocks' weights
        (cpu_products.reordered_bytes, those of the shapes that match F.linear); False where the cpu budget
        has no room for them."""
        import torch

        from . import cpu_products
        from .cpu_experts import host_threads
        threads = host_threads()
        need = sum(cpu_products.reordered_bytes(torch, self.meta.get_submodule(name), self.dtype, threads)
                   for u, e in zip(self.units, plan.entries) if e.compute == "cpu" for name in u.modules)
        plan.host_reserved["reordered_weights"] = need
        return budgets.get("cpu") is None or plan.used()["cpu"] <= budgets["cpu"]

    def use_cpu_rate(self, gbps: float) -> tuple:
        """Plan from now on at the CPU's rate ``gbps``, the one its blocks reached decoding, instead of the
        load's measure (``OffloadedModel``'s re-plan; the link's rate stays). Returns what it replaced, for
        ``restore_cpu_rate``."""
        kept = self._cpu_rates, self._rates_reached
        self._cpu_rates = (gbps, self.cpu_rates()[1])
        self._rates_reached = True
        return kept

    def restore_cpu_rate(self, kept: tuple):
        """The CPU's rate as it was before ``use_cpu_rate`` returned ``kept`` (a re-plan that failed)."""
        self._cpu_rates, self._rates_reached = kept

    def cpu_rates(self) -> tuple:
        """(cpu, link) GB/s for ``compute="hybrid"``, measured once: the CPU's batch-1 products over a block's
        weights in the load dtype with the threads it would have (hybrid.rates_by_tokens: through F.linear, and
        with ``pack_cpu_weights`` from reordered weights too, and with ``cpu_kernel="exact"`` by nb_offload's AMX
        kernel where it runs here, the fastest kept; with ``cpu_kernel="fast"``
        nb_offload's own kernel's, where it runs here), while the link copies beside them on a CUDA machine,
        as in a hybrid step; the page-locked link (25 GB/s assumed on a machine without a GPU, as for a dry
        run's prediction)."""
        if self._cpu_rates is None:
            import torch

            from . import budget
            from .cpu_experts import host_threads
            cuda = torch.cuda.is_available()
            link = budget.link_gbps() if cuda else 25.0
            beside = hybrid.BusyLink(torch, torch.device("cuda", torch.cuda.current_device())) if cuda else None
            fast = self.options.cpu_kernel == "fast" and self._fast_kernel_runs()   # else the exact products
            amx = self.options.cpu_kernel == "exact" and self._amx_kernel_runs()
            try:
                rates = hybrid.rates_by_tokens(torch, self.dtype, self._block_shapes(), host_threads(), (1,), 5,
                                               beside, packed=self.options.pack_cpu_weights and not fast, fast=fast,
                                               amx=amx)
                if hybrid.FAST in rates:
                    self._products, rate = "fast", rates[hybrid.FAST]
                else:
                    reordered = rates.get(hybrid.REORDERED, 0.0)
                    self._flinear_gbps, self._reordered_gbps = rates[1] / 1e9, reordered / 1e9
                    self._products, rate = ("reordered", reordered) if reordered > rates[1] * REORDERED_MARGIN \
                        else ("F.linear", rates[1])
                    if rates.get(hybrid.AMX, 0.0) > rate:      # the same bits, and no copies
                        self._products, rate = "amx", rates[hybrid.AMX]
                self.products_gbps = rate / 1e9
                self.block_rest = self._measure_block_rest(beside)
            finally:
                if beside is not None:
                    beside.release()
            self._cpu_rates = (self._with_rest(self.products_gbps), link)
        return self._cpu_rates

    def _block_bytes(self) -> int:
        """The bytes of the first decoder block in the load dtype (0 where there is none unquantized)."""
        return next((u.nbytes for u in self.units if u.kind == "block" and not u.quantized), 0)

    def _with_rest(self, products_gbps: float) -> float:
        """The rate a block computes at whose products read at ``products_gbps``, its forward's rest measured
        at load added (block_rest.with_rest)."""
        from . import block_rest
        return block_rest.with_rest(products_gbps, self._block_bytes(), self.block_rest)

    def _measure_block_rest(self, beside) -> float | None:
        """The seconds a block's decode forward takes on the CPU besides its products (block_rest.py), with the
        products chosen, the threads a CPU block has, and ``beside`` copying; None where it can't be measured."""
        import torch

        from . import block_rest
        from .cpu_amx import kernel_policy
        from .cpu_experts import host_threads
        threads = host_threads()
        return block_rest.seconds(torch, self.config, self.dtype, self._block_bytes(), threads,
                                  attn_implementation=self.options.attn_implementation,
                                  kernel=kernel_policy(torch, self._products, threads),
                                  beside=beside, trust_remote_code=self.options.trust_remote_code)

    def _fast_kernel_runs(self) -> bool:
        """Whether nb_offload's kernel (cpu_kernel="fast") can multiply this model's weights here; where not,
        ``fast_why_not`` says why."""
        import torch

        from . import cpu_kernel
        self.fast_why_not = cpu_kernel.why_unavailable() if self.dtype == torch.bfloat16 \
            else f"it takes bf16 weights, and this model loads as {self.dtype}"
        return self.fast_why_not is None

    def _amx_kernel_runs(self) -> bool:
        """Whether nb_offload's AMX kernel (cpu_amx.py) can multiply this model's weights here."""
        import torch

        from . import cpu_amx
        return self.dtype == torch.bfloat16 and cpu_amx.why_unavailable() is None

    def cpu_products(self) -> str:
        """How the CPU's blocks multiply one token's row: "fast" with ``cpu_kernel="fast"`` where its kernel runs
        here (cpu_kernel.py); with ``cpu_kernel="exact"``, "amx" where nb_offload's AMX kernel (F.linear's bits,
        cpu_amx.py) read faster than torch's way below in ``cpu_rates``'s measure; "reordered" where
        ``pack_cpu_weights`` is on and the reordered weights' products (those that match F.linear,
        cpu_products.py) read faster than F.linear's alone by REORDERED_MARGIN (their copies cost host memory);
        else "F.linear"."""
        self.cpu_rates()
        return self._products

    def cpu_max_tokens(self) -> int:
        """The most tokens a step may have for CPU blocks to compute on the CPU (hybrid.cpu_max_tokens),
        measured once."""
        if self._cpu_max_tokens is None:
            import torch

            from .cpu_experts import host_threads
            self._cpu_max_tokens = hybrid.cpu_max_tokens(torch, self.dtype, self._block_shapes(), host_threads(),
                                                         self.cpu_rates()[1])
        return self._cpu_max_tokens

    def _block_shapes(self) -> list:
        """The [rows, cols] of a decoder block's matrices, in order (those of the first block in the load
        dtype), for the CPU's rate on it; a LLaMA-like block's from the config where there is none."""
        for u in self.units:
            if u.kind == "block" and not u.quantized:
                shapes = [tuple(p.shape) for p in u.params if len(p.shape) == 2]
                if shapes:
                    return shapes
        cfg = text_config(self.config)
        hidden, wide = cfg.hidden_size, getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
        return [(hidden, hidden)] * 4 + [(wide, hidden)] * 2 + [(hidden, wide)]

    def _deeper(self, plan, planned):
        """``plan``, or the one copying another number of pieces ahead (1 to hybrid.MOST_AHEAD) whose step it
        predicts shortest at the rates measured (``Plan.predicted_seconds_per_step``), where the rates chose
        the CPU's blocks: deeper staging keeps the link busy while the CPU computes a block, and takes room
        from resident blocks. Each depth's plan is the one ``prefetch=depth`` gives (blocks split into pieces
        where ``split_blocks`` says, "auto" deciding for that depth's slots). Steps within DEPTH_TIES of the
        shortest count as equal; of those, the plan with the fewest bytes off the GPU (a prefill streams them
        all: fewer is a faster prefill), then the shallower."""
        if not plan.rates:
            return plan
        cpu, link = plan.rates
        timed = {plan.prefetch: (plan.predicted_seconds_per_step(link, cpu_gbps=cpu), plan)}
        for depth in range(1, hybrid.MOST_AHEAD + 1):
            if depth not in timed:
                try:
                    other = planned(depth)
                except BudgetError:         # its slots don't fit beside what the plan must keep
                    continue
                timed[depth] = (other.predicted_seconds_per_step(link, cpu_gbps=cpu), other)
        fastest = min(t for t, _ in timed.values())
        near = [(off_gpu_bytes(p), depth, p) for depth, (t, p) in timed.items() if t <= fastest * (1 + DEPTH_TIES)]
        return min(near, key=lambda x: x[:2])[2]

    def _faster_of(self, split, streamed):
        """compute="auto": the plan whose CPU computes its chosen blocks (``split``), where its modelled step is
        shorter than ``streamed``'s (every off-GPU block streams, and the GPU keeps the room a prefill's CPU
        block would take); else ``streamed``. Each says which it is and why (``Plan.compute_choice``)."""
        if not any(e.compute == "cpu" for e in split):
            streamed.compute_choice = "compute=\"auto\": all streamed (the step model gives the CPU no block)"
            return streamed
        cpu, link = split.rates
        t_split = split.predicted_seconds_per_step(link, cpu_gbps=cpu)
        # the same model for both (the GPU's compute counted alike), at the link's rate alone for streaming
        t_streamed = max(streamed.predicted_seconds_per_step(link),
                         hybrid.decode_step_seconds(step_order(streamed.entries), cpu, link, streamed.prefetch,
                                                    streamed.slot_bytes, graphs="decode_graph" in streamed.reserved))
        chose_split = t_split < t_streamed
        plan = split if chose_split else streamed
        plan.compute_choice = (f"compute=\"auto\": {'hybrid' if chose_split else 'all streamed'}, modelled "
                               f"{1 / t_split:.1f} tok/s with CPU blocks against {1 / t_streamed:.1f} streaming "
                               f"(at the CPU's {cpu:.1f} and the link's {link:.1f} GB/s)")
        return plan

    def _expert_cache(self, device_type, budgets):
        """The ``expert_cache`` option in bytes (a share is of the compute device's budget), or "auto"."""
        asked = self.options.expert_cache
        if asked in ("auto", 0):
            return asked
        return parse_size(asked, capacity=budgets.get(resident_tier_of(device_type)), what="expert_cache")


def _device_of(device_type):
    import torch
    return torch.device(device_type)


def _saved_quantization(folder, config):
    """The ``quantization_config`` of a checkpoint saved quantized by bitsandbytes (a dict), or None.

    Weights saved by another method (GPTQ, AWQ, fp8 ...) hold packed values and scales that would
    read as wrong weights: refused."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    saved = quant if isinstance(quant, dict) else quant.to_dict() if hasattr(quant, "to_dict") else {}
    method = saved.get("quant_method")
    if method != "bitsandbytes":
        raise CheckpointError(f"model folder {folder!r} holds weights quantized by {method or 'an unknown method'} "
                              "(config.json's quantization_config), which nb_offload can't read; accepted: "
                              "checkpoints saved by transformers with bitsandbytes, or unquantized ones.")
    return saved


def _as_saved(folder, saved, asked):
    """The QuantSpec a checkpoint saved quantized loads as; ``quant=`` may only name the same format."""
    from .quant import spec_of
    try:
        spec = spec_of("config.json's quantization_config", saved)
    except OptionError as exc:
        raise CheckpointError(f"model folder {folder!r}: {exc}") from exc
    if asked is not None and (asked.format != spec.format or asked.double_quant != spec.double_quant):
        raise OptionError(f"quant={asked.format!r}{' with double_quant' if asked.double_quant else ''} can't apply: "
                          f"{folder!r} is saved quantized as {spec.format}"
                          f"{' with double_quant' if spec.double_quant else ''}; drop quant= to load it as saved.")
    return spec


def prefetch_for(options: Options, device_type: str) -> int:
    """Units copied ahead: 1 on CUDA (the copy stream runs beside compute), 2 on the CPU. A hybrid plan copies
    as far ahead as its predicted step is shortest (``Inspection._deeper``)."""
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
    insp = Inspection(model, opts, dev_type)
    expert_pins = resolve_expert_pins(opts.pins, insp.units, dev_type)
    return insp.make_plan(dev_type, budgets, resolve_pins(opts.pins, insp.units), expert_pins)


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
    insp = Inspection(model, opts, dev.type)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            budgets = _budgets("cuda", opts.gpu, opts.cpu, opts.disk)
    else:
        budgets = _budgets("cpu", opts.gpu, opts.cpu, opts.disk)
    pin_map = resolve_pins(opts.pins, insp.units)
    expert_pins = resolve_expert_pins(opts.pins, insp.units, dev.type)
    the_plan = insp.make_plan(dev.type, budgets, pin_map, expert_pins)
    from .model import OffloadedModel
    from .storage import Storage
    storage = Storage(insp, dev, opts.disk, read_threads=opts.read_threads, host_budget=budgets["cpu"])
    try:
        storage.materialize(the_plan, progress=opts.progress)
        handle = OffloadedModel._assemble(insp, storage, the_plan, pin_map, dev, budgets=budgets,
                                          host_before=host_before, expert_pins=expert_pins)
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
