"""``OffloadedModel``: the user's handle on a model loaded through the tiers."""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import time
import warnings

from . import handoff as handoffs
from . import hybrid
from .budget import format_size, host_memory, trim_heap
from .errors import OffloadError, PinError, in_one_line
from .gate import RunGate
from .hybrid import CPU_COMPUTE, decode_step_seconds, gpu_only_attention
from .patterns import match_units
from .planner import is_expert_pattern, resolve_expert_pins, split_pin
from .trace import Stats, Trace


def _same_placement(a, b) -> bool:
    """Whether plans ``a`` and ``b`` put every unit in the same tier, computed in the same place, with the same
    staging and reservations: an engine built for one runs the other (only their rates differ)."""
    def placed(p):
        return ([(e.name, e.tier, e.compute, e.fmt) for e in p.entries], p.prefetch, p.split_blocks, p.slot_bytes,
                dict(p.reserved), p.cpu_max_tokens, p.expert_share)
    return placed(a) == placed(b)


class OffloadedModel:
    """A transformers causal LM whose units live on GPU, host memory or disk, streamed as planned.

    ``.model`` is the transformers model itself: calling it (or its ``generate``) streams.
    """

    def __init__(self):  # use nb_offload.load()
        raise TypeError("use nb_offload.load(...) to make an OffloadedModel")

    @classmethod
    def _assemble(cls, insp, storage, plan, pin_map, device, *, budgets, host_before=None, expert_pins=None):
        import torch
        self = object.__new__(cls)
        self._insp, self._storage, self._device = insp, storage, device
        self.options = insp.options               # as given to load(), checked
        self._pins = dict(pin_map)
        self._expert_pins = dict(expert_pins or {})     # unit index -> experts kept in the expert cache
        self._budgets = budgets
        self.hold_spare = self.options.hold_spare  # may be switched off and on between generates
        self.last_held = []     # names of the units the last generate held in its spare room
        self._cpu_blocks_seen = dict.fromkeys(self.CPU_RATE_COUNTERS, 0)     # their sums over generates so far
        self.replanned_at = None    # (the CPU's GB/s at load, reached): planned again at the rate reached
        self._recalibration_tried = False
        self.cuda_graph = self.options.cuda_graph  # so may this (graphs.py)
        # where decode steps' CPU blocks run and how their outputs come back, as set at load: every engine of
        # this load (a re-plan builds one) keeps them
        self._handoff = (hybrid.HANDOFF, handoffs.READ_BACK)
        self.uncached_disk_reads = False           # drop_page_cache as it applies to the present plan
        self.plan = plan
        self.trace = Trace(enabled=self.options.trace, detail=self.options.trace_detail)
        self.stats = Stats(host_budget=budgets["cpu"], host_before=host_before)
        self.name = insp.name
        model = insp.meta
        # Buffers: persistent ones from the checkpoint, the rest as the model computed them.
        for bname, key in insp.buffer_keys.items():
            mod, _, attr = bname.rpartition(".")
            owner = model.get_submodule(mod) if mod else model
            owner._buffers[attr] = insp.checkpoint.get(key).to(owner._buffers[attr].dtype)
        for mod in model.modules():
            for attr, buf in list(mod._buffers.items()):
                if buf is not None:
                    mod._buffers[attr] = buf.to(device)
        # One Parameter object per weight, shared by every module that names it (tied weights).
        self._params = {}
        for u in insp.units:
            plist = []
            for slot in u.params:
                # Zero-sized until the engine binds it: .data may change shape, not device type.
                if slot.quant is not None:      # bitsandbytes' own parameter class, as its modules expect
                    from .quant import make_param
                    p = make_param(model.get_submodule(slot.names[0].rpartition(".")[0]), slot.quant, device)
                else:
                    p = torch.nn.Parameter(torch.empty(0, dtype=slot.dtype, device=device), requires_grad=False)
                for alias in slot.names:
                    mod, _, attr = alias.rpartition(".")
                    (model.get_submodule(mod) if mod else model)._parameters[attr] = p
                plist.append(p)
            self._params[u.index] = plist
        self.model = model
        self._gate = RunGate()
        self._gate_forward()
        self._load_generation_config()
        self.tokenizer = self._load_tokenizer()
        self._engine = None
        self._start_engine()
        self.stats.sample_host()
        return self

    def _load_generation_config(self):
        import os

        from transformers import GenerationConfig
        if os.path.isfile(os.path.join(self._insp.folder, "generation_config.json")):
            try:
                self.model.generation_config = GenerationConfig.from_pretrained(self._insp.folder)
            except Exception:  # a broken generation config should not stop a load
                pass

    def _gate_forward(self):
        """Route every forward pass of ``model`` through the gate and the engine of the moment.

        The model's ``forward`` is wrapped on the instance (not a hook: a KeyboardInterrupt skips
        forward hooks, and a re-plan waiting on the gate must not find it held forever). The
        engine is looked up once the gate is held, so a pass that waited for a re-plan runs on
        the engine that re-plan started; after ``unload`` a pass is an OffloadError.
        """
        forward = self.model.forward

        @functools.wraps(forward)
        def gated_forward(*args, **kwargs):
            with self._gate.run():
                self._check_loaded()
                return self._engine.step(forward, args, kwargs)
        # generate reads the signature of forward every step: given outright, it is found at once
        gated_forward.__signature__ = inspect.signature(forward)
        self.model.forward = gated_forward

    def _load_tokenizer(self):
        import os
        folder = self._insp.folder
        if not any(os.path.isfile(os.path.join(folder, f)) for f in
                   ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
            return None
        from transformers import AutoTokenizer

        from .units import quiet_transformers
        try:
            with quiet_transformers():
                # The load's decision on remote code, said outright: left unsaid, transformers asks
                # on stdin for a tokenizer with code of its own, which hangs a notebook kernel.
                return AutoTokenizer.from_pretrained(folder, trust_remote_code=self.options.trust_remote_code)
        except Exception as exc:
            warnings.warn(f"nb_offload: the tokenizer in {folder!r} was not loaded ({exc}); llm.tokenizer is "
                          "None, generate from token ids.", RuntimeWarning, stacklevel=2)
            return None

    def _start_engine(self):
        from .engine import Engine
        from .hooks import bind
        resident = self.plan.resident_tier
        sources, on_cpu = {}, {}
        for u, entry in zip(self._insp.units, self.plan.entries):
            store = self._storage.stores[u.index]
            if entry.compute == "in place":     # an embedding table the GPU reads in host memory (planner.py)
                bind(self._params[u.index], u, self._in_place(store.flat))
                continue
            if store.tier == resident or entry.compute == "cpu":    # the CPU computes it where it is (hybrid.py)
                bind(self._params[u.index], u, store.flat)
                if store.tier != resident:
                    on_cpu[u.index] = store.flat
            else:
                sources[u.index] = store
        o = self.options
        self.uncached_disk_reads = self._skip_page_cache(sources)
        self._engine = Engine(self.model, self._insp.units, self._params, sources, self._device, self.trace,
                              self.stats, prefetch=self.plan.prefetch, read_ahead=o.read_ahead,
                              read_threads=o.read_threads, drop_page_cache=self.uncached_disk_reads,
                              split=self.plan.split_blocks, cuda_graph=o.cuda_graph, fused_kernels=o.fused_kernels,
                              expert_cache=self.plan.reserved.get("expert_cache", 0),
                              pinned_experts=self._expert_pins, expert_compute=o.host_expert_share,
                              experts_chosen=o.experts_implementation is not None,
                              cpu_blocks=on_cpu, cpu_max_tokens=self.plan.cpu_max_tokens,
                              decode_spare=self.plan.reserved.get("activations", 0),
                              packed_room=self._packed_room() if on_cpu else 0,
                              kernel=self.plan.cpu_products if self.plan.cpu_products in ("fast", "amx") else "",
                              handoff=self._handoff[0], read_back=self._handoff[1])
        self._engine.install()
        self._prime()

    def _prime(self):
        """``Engine.prime``, which only saves the next step time: where it fails, a warning, and the next step
        brings its units itself (an interrupt still interrupts)."""
        try:
            self._engine.prime()
        except Exception as exc:    # noqa: BLE001 - nothing lost but the head start
            warnings.warn(f"nb_offload: bringing the next prompt's first units into the staging slots failed "
                          f"({in_one_line(exc)}); the next step brings them itself.", RuntimeWarning, stacklevel=3)

    def _packed_room(self) -> int | None:
        """Host memory the CPU blocks' reordered weights may take (cpu_products.py): what the plan reserved for
        them; nothing where its blocks multiply with F.linear (the option off, the reordered products no faster
        at load, or no room for them in the cpu budget)."""
        if not self.options.pack_cpu_weights or self.plan.cpu_products != "reordered":
            return 0
        return self.plan.host_reserved.get("reordered_weights", 0)

    def _in_place(self, flat):
        """``flat`` (page-locked host memory) as a tensor of the GPU's, read there over the link; where the
        memory isn't mapped for the GPU (page-locking failed), a copy on the GPU, past the budget by its size."""
        from . import fetch
        try:
            return fetch.in_place(flat, self._device)
        except RuntimeError as exc:
            warnings.warn(f"nb_offload: an embedding table planned to stay in host memory is copied to the GPU "
                          f"({exc}); it takes {format_size(flat.numel())} past the gpu budget.", RuntimeWarning,
                          stacklevel=3)
            return flat.to(self._device)

    def _skip_page_cache(self, sources) -> bool:
        """Whether disk reads bypass the page cache (``drop_page_cache``; "auto" decides here).

        A disk tier read over and over in one order, larger than the RAM the kernel could cache
        it in, gets no page-cache hits (each page is evicted before it comes round again): then
        O_DIRECT reads are faster and spare the RAM. One that fits is read from RAM after the
        first pass: then the page cache is worth keeping."""
        choice = self.options.drop_page_cache
        if choice != "auto":
            return choice
        disk = sum(self._insp.units[i].nbytes for i, s in sources.items() if s.tier == "disk")
        return disk > 0 and disk > host_memory()[1]

    def _stop_engine(self):
        if self._engine is not None:
            self._engine.remove()
            self._engine = None

    def _check_loaded(self):
        if self._engine is None:
            raise OffloadError(f"model {self.name!r} was unloaded; load it again (nb_offload.load(), or "
                               "%offload_load in a notebook).")

    # -- running ----------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        """False once ``unload`` has run (then calling the model is an OffloadError)."""
        return self._engine is not None

    def expert_state(self) -> dict:
        """MoE blocks whose routed experts come apart (experts.py), by name: the experts their last call
        brought (``"routed"``) and those the GPU expert cache holds (``"cached"``); empty for other models."""
        return self._engine.expert_state() if self._engine is not None else {}

    @property
    def device(self):
        return self._device

    def __call__(self, *args, **kwargs):
        self._check_loaded()
        import torch
        with torch.inference_mode():       # the forward pass holds the gate itself
            return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """``transformers`` generate, streaming as planned; inputs may be on the CPU."""
        self._check_loaded()
        import torch

        from .hooks import to_device
        args, kwargs = to_device(args, self._device), to_device(kwargs, self._device)
        inputs = kwargs.get("input_ids", args[0] if args else None)
        t0 = time.perf_counter()
        with self._gate.run():
            self._check_loaded()        # unloaded by another thread while this one waited
            try:
                with torch.inference_mode():    # the static cache's tensors are inference tensors
                    given, length = self._with_static_cache(args, kwargs)
                    with self._holding_spare(args, kwargs, length), self._engine.graphs.generating():
                        out = self.model.generate(*args, **given)
                self._engine.settle_routing(release=True)   # what they routed, counted; the lent room back
            except KeyboardInterrupt:   # the cache and temporaries of the generate cut short, freed
                self._release_memory()
                raise
            if self._device.type == "cuda":     # the generate's work, not the copies queued for the next prompt
                torch.cuda.current_stream(self._device).synchronize()
            self.stats.seconds += time.perf_counter() - t0
            self._prime()       # the next prompt's first units, brought while the user reads this one's
        self.stats.sample_host()
        trim_heap()         # a generate's cache and temporaries, freed: back to the system
        seqs = out.sequences if hasattr(out, "sequences") else out
        if isinstance(seqs, torch.Tensor) and isinstance(inputs, torch.Tensor) and seqs.dim() == 2:
            self.stats.tokens += (seqs.shape[1] - inputs.shape[1]) * seqs.shape[0]
        self._recalibrate()
        return out

    def _recalibrate(self):
        """After a generate: where the plan's split was chosen at a CPU rate more than hybrid.RECALIBRATE_OVER
        away from the one its blocks reached in decode steps (``cpu_rate_reached``), plan again at the rate
        reached, once a load (later re-pins plan at it too). Where that gives the same plan, only its rates
        change; else units move as a re-pin moves them. The plan's text then says so; ``replanned_at`` has
        both rates. A re-plan that fails leaves the plan made at load, with a warning, and the generate's
        output stands."""
        from . import hybrid
        if not self._wants_recalibration(hybrid.RECALIBRATE_OVER) or self._gate.held_here():
            return          # (a generate inside a generate's callback: the outer one's end decides)
        self._recalibration_tried = True
        with self._gate.exclusive("re-plan"):
            over, at_load, reached = hybrid.RECALIBRATE_OVER, self.plan.rates[0], self.cpu_rate_reached
            if self._engine is None or self.replanned_at is not None:     # unloaded, or done, meanwhile
                return
            kept = self._insp.use_cpu_rate(reached)
            try:
                plan = self._insp.make_plan(self.plan.device, self._budgets, self._pins, self._expert_pins)
                if _same_placement(plan, self.plan):
                    self.plan = plan
                else:
                    self._replan(self._pins)
            except Exception as exc:    # noqa: BLE001 - the plan made at load stays (_replan restores it)
                self._insp.restore_cpu_rate(kept)
                warnings.warn(f"nb_offload: planning again at the CPU's rate reached ({reached:.1f} GB/s, "
                              f"{over:.0%} or more from the {at_load:.1f} measured at load) failed, so the "
                              f"plan made at load stays: {in_one_line(exc)}", stacklevel=3)
                return
            self.replanned_at = (at_load, reached)

    def _wants_recalibration(self, over) -> bool:
        plan, reached = self.plan, self.cpu_rate_reached
        return (over is not None and not self._recalibration_tried and plan.rates is not None
                and not plan.rates_reached and self.options.compute in ("hybrid", "auto")
                and reached is not None and abs(reached / plan.rates[0] - 1) > over)

    def _with_static_cache(self, args, kwargs):
        """The generate's keyword arguments with a static KV cache from the engine's decode graphs, so its
        decode steps are captured and replayed (graphs.py), and the cache's length; or as given, and None,
        where they run eager (``stats.graph_eager`` says why)."""
        from . import spare
        from .graphs import cache_name, given_cache
        why = ""
        config = kwargs.get("generation_config") or self.model.generation_config
        extent = spare.generate_extent(self.model, args, kwargs)
        if not self.cuda_graph:
            why = "cuda_graph=False"
        elif given_cache(kwargs) is not None or kwargs.get("cache_implementation") \
                or getattr(config, "cache_implementation", None):
            why = "the generate brings its own cache"
        elif not kwargs.get("use_cache", getattr(config, "use_cache", True)):
            why = "use_cache=False"
        elif extent is None:
            why = "the generate's length is unknown (assistant model, prompt lookup, or no max length)"
        elif max(int(kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1), 1) > 1:
            why = "beam search reorders the cache"
        if not why:
            # sequences, as the cache will hold them (num_return_sequences included)
            cache, why = self._engine.graphs.static_cache(self.model, *extent, self.plan.context)
            if cache is not None:
                self.stats.graph_eager = ""
                return {**kwargs, cache_name(self.model): cache, "disable_compile": True}, cache.max_cache_len
        self.stats.graph_eager = why
        self._engine.graphs.drop()      # a kept cache and its graphs would sit in room this generate may use
        return kwargs, None

    @contextlib.contextmanager
    def _holding_spare(self, args, kwargs, length=None):
        """For one generate, hold streamed units in the room its length leaves unused (see spare.py);
        ``length``: a static cache's, where the generate was given one."""
        picks = self._spare_picks(args, kwargs, length) if self.hold_spare else []
        self.stats.held_last = len(picks)
        self.last_held = []
        st = self.stats
        before = {name: getattr(st, name) for name in self.CPU_RATE_COUNTERS}
        resets = st.resets
        try:
            if picks:
                self._engine.hold(picks)
                self.last_held = self.held
            yield
        finally:
            if picks:
                self._engine.release_held()
            if st.resets == resets:     # else the stats were reset meanwhile: this generate isn't counted
                for name, b in before.items():
                    self._cpu_blocks_seen[name] += getattr(st, name) - b

    # Decode calls of CPU blocks measured before their rate replaces the one measured at load
    RATE_AFTER_CALLS = 8
    # the Stats counters of the CPU blocks' decode calls that ``cpu_rate_reached`` sums over generates: all of them,
    # and those of replayed steps
    CPU_RATE_COUNTERS = ("cpu_decode_bytes", "cpu_decode_seconds", "cpu_decode_calls", "cpu_replayed_bytes",
                         "cpu_replayed_seconds", "cpu_replayed_calls")

    @property
    def cpu_rate_reached(self) -> float | None:
        """GB/s the CPU's blocks were computed at in the decode steps (calls of one token) of this model's
        generates so far; None before RATE_AFTER_CALLS such calls. The spare room's choice of what to hold models
        the step at this rate once it is known, and a load plans again at it (``_recalibrate``): on the H200 host
        the rate measured at load was 41-59 GB/s where decode reached 31-42 (hybrid.MEASURED_COPIES). Where decode
        steps were replayed, their calls alone: the eager steps around a capture read slower (a 12 GiB load's first
        generate reached 28.1 GB/s where its timed ones reached 37.4, benchmarks/RESULTS.md, 2026-12-05), and the
        plan's model takes decode as replayed."""
        seen = self._cpu_blocks_seen
        for kind in ("replayed", "decode"):
            nbytes, seconds, calls = (seen[f"cpu_{kind}_{what}"] for what in ("bytes", "seconds", "calls"))
            if calls >= self.RATE_AFTER_CALLS and seconds > 0:
                return nbytes / seconds / 1e9
        return None

    def _spare_picks(self, args, kwargs, length=None) -> list:
        from . import spare
        extent = spare.generate_extent(self.model, args, kwargs)
        if extent is None:
            return []
        if length is not None:
            extent = (max(length, extent[0]), extent[1])
        room = spare.spare_bytes(self.plan, self._insp.config, self._insp.dtype_size, *extent)
        eng = self._engine
        candidates = [(i, self.plan.entries[eng.model_unit(i)].tier, eng.units[i].nbytes)
                      for i in dict.fromkeys(eng.small_order)      # a tied unit runs twice a pass: once each
                      if i not in eng.held and eng.model_unit(i) not in self._pins]
        step = spare.granularity(self.plan.device)
        blocks = [(i, eng.units[i].nbytes) for i in eng.cpu_blocks if i not in self._pins]
        if not blocks or not self.plan.rates:
            return spare.choose(candidates, room, step)
        return spare.choose_with_cpu_blocks(candidates, blocks, room, step, self._step_seconds_holding)

    def _step_seconds_holding(self, held, cpu_gbps=None, link_gbps=None) -> float:
        """The modelled decode step (hybrid.step_seconds at the plan's rates, or those given; the CPU's rate
        reached in generates so far once there is one) with the engine units ``held`` on the GPU: a held CPU
        block computes there, a held streamed unit brings no bytes."""
        from .planner import step_order
        eng, plan = self._engine, self.plan
        order = step_order(plan.entries)
        for i in held:
            m = eng.model_unit(i)
            where, nbytes = order[m]
            left = 0 if where == "cpu" else nbytes - eng.units[i].nbytes
            order[m] = (where, left) if left > 0 else ("gpu", plan.entries[m].bytes)
        cpu, link = plan.rates
        cpu = cpu_gbps or self.cpu_rate_reached or cpu
        return decode_step_seconds(order, cpu, link_gbps or link, plan.prefetch, plan.slot_bytes,
                                   graphs=self.cuda_graph)

    @property
    def held(self) -> list:
        """Names of the streamed units held on the compute device during the generate running now."""
        if self._engine is None:
            return []
        units = self._engine.units
        return [units[i].modules[0] if units[i].kind == "piece" else units[i].name for i in self._engine.held]

    # -- re-pinning -------------------------------------------------------------------------
    def pin(self, pattern: str, tier: str):
        """Keep the units matching ``pattern`` on ``tier``; the others are re-planned around them.

        ``tier`` may name the units' format too ("gpu:nf4"); formats are chosen at load (``pins=``).
        A pattern naming single routed experts of MoE blocks (``model.layers.3.mlp.experts.5``, ranges
        and globs too) keeps them in the expert cache on the compute device: ``tier`` is then its tier.
        Waits for a generate or forward pass running in another thread to end first."""
        if is_expert_pattern(pattern):
            with self._gate.exclusive("re-pin"):
                self._check_loaded()
                named = resolve_expert_pins({pattern: tier}, self._insp.units, self.plan.device)
                pinned = {i: self._expert_pins.get(i, frozenset()) | named.get(i, frozenset())
                          for i in set(self._expert_pins) | set(named)}
                return self._replan(self._pins, pinned)
        tier, fmt = split_pin(tier)
        attn = self.options.attn_implementation
        if tier == CPU_COMPUTE and gpu_only_attention(attn):
            raise PinError(f"{pattern!r} can't be pinned {CPU_COMPUTE!r}: attn_implementation={attn!r} has only GPU "
                           "kernels; load with \"sdpa\" or \"eager\" to compute blocks on the CPU.")
        if tier is None:
            raise PinError(f"pin {fmt!r} names a format, not a tier; re-pinning moves units between tiers "
                           "(gpu, cpu, disk); a unit's format is chosen at load, with pins=.")
        with self._gate.exclusive("re-pin"):
            self._check_loaded()
            units = match_units(pattern, self._insp.units)
            changed = [u for u in units if fmt is not None and u.fmt != fmt]
            if changed:
                raise PinError(f"{changed[0].name!r} is stored as {changed[0].fmt}, not {fmt}: a unit's format is "
                               f"chosen at load; load again with pins={{{pattern!r}: {tier + ':' + fmt!r}}}.")
            pins = dict(self._pins)
            for u in units:
                pins[u.index] = tier
            return self._replan(pins)

    def unpin(self, pattern: str):
        """Let the planner place the units matching ``pattern`` again (waits like ``pin``)."""
        with self._gate.exclusive("unpin"):
            self._check_loaded()
            if is_expert_pattern(pattern):
                named = resolve_expert_pins({pattern: self.plan.resident_tier}, self._insp.units, self.plan.device)
                if not any(self._expert_pins.get(i, frozenset()) & e for i, e in named.items()):
                    raise PinError(f"pattern {pattern!r} matches no pinned expert; pinned now: "
                                   f"{self.pinned_experts() or 'none'}.")
                pinned = {i: left for i, e in self._expert_pins.items() if (left := e - named.get(i, frozenset()))}
                return self._replan(self._pins, pinned)
            units = match_units(pattern, self._insp.units)
            pinned = [u for u in units if u.index in self._pins]
            if not pinned:
                raise PinError(f"pattern {pattern!r} matches no pinned unit; pinned now: "
                               f"{[self._insp.units[i].name for i in self._pins] or 'none'}.")
            pins = {i: t for i, t in self._pins.items() if i not in {u.index for u in pinned}}
            return self._replan(pins)

    def pins(self) -> dict:
        """The units pinned, by name, to what they were pinned: ``{"model.layers.3": "cpu-compute"}``."""
        return {self._insp.units[i].name: tier for i, tier in sorted(self._pins.items())}

    def pinned_experts(self) -> dict:
        """The experts pinned in the expert cache, by experts module: ``{"model.layers.3.mlp.experts": [5]}``."""
        units = self._insp.units
        return {units[i].experts_module: sorted(e) for i, e in sorted(self._expert_pins.items())}

    def _replan(self, pins, expert_pins=None):
        expert_pins = self._expert_pins if expert_pins is None else expert_pins
        new_plan = self._insp.make_plan(self.plan.device, self._budgets, pins, expert_pins)  # raises before change
        self._stop_engine()
        try:
            moved = self._storage.migrate(new_plan)
        except BaseException:
            self._start_engine()       # the old stores are intact: carry on under the old plan
            raise
        self._pins, self._expert_pins, self.plan = pins, expert_pins, new_plan
        self._start_engine()
        self._release_memory()
        return moved

    # -- leaving ----------------------------------------------------------------------------
    def unload(self):
        """Free every buffer this model holds on the GPU, in host memory and in staging (waits for a
        run in another thread to end). Calling the model afterwards is an OffloadError."""
        with self._gate.exclusive("unload"):
            self._unload()

    def _unload(self):
        if self._engine is None:
            return
        import torch
        self._stop_engine()
        from .quant import unbind
        for plist in self._params.values():
            for p in plist:
                p.data = torch.empty(0, dtype=p.dtype, device=self._device)
                unbind(p)
        for mod in self.model.modules():
            for attr, buf in list(mod._buffers.items()):
                if buf is not None:
                    mod._buffers[attr] = torch.empty(0, dtype=buf.dtype, device=self._device)
        self._storage.release()
        self.trace.clear()
        self._release_memory()

    def _release_memory(self):
        import torch
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None and torch.cuda.is_available():
            host_empty()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unload()

    # -- views --------------------------------------------------------------------------------
    def dashboard(self):
        """The layer map (re-pin by click), memory per tier and live timeline, as one widget."""
        self._check_loaded()
        try:
            from .widgets import dashboard
        except ImportError as exc:
            raise OffloadError(f"the dashboard needs anywidget and ipywidgets ({exc}); "
                               "pip install 'nb_offload[widgets]'.") from exc
        return dashboard(self)

    def timeline_figure(self, runs="last", **kw):
        """The trace's timeline as a plotly Figure (``fig.write_html("timeline.html")`` saves it): the last
        run by default, ``runs="all"`` every run with the idle time between them cut out (figures.py)."""
        from .figures import timeline_figure
        return timeline_figure(self.trace, runs=runs, **kw)

    def to_device_map(self) -> dict:
        """The plan as a device map that Accelerate's ``dispatch_model`` accepts. Blocks the CPU computes here
        (hybrid.py) are "cpu" in it, where Accelerate would run them on the GPU, streaming their weights in."""
        where = {"gpu": self._device.index if self._device.index is not None else 0, "cpu": "cpu", "disk": "disk"}
        out = {}
        for u, e in zip(self._insp.units, self.plan.entries):
            for name in u.modules:
                out[name] = where[e.tier] if self._device.type == "cuda" or e.tier == "disk" else "cpu"
        return out

    @property
    def units(self):
        return list(self.plan.entries)

    def __repr__(self):
        state = "unloaded" if self._engine is None else f"{len(self.plan)} units on {self._device}"
        totals = ", ".join(f"{t} {format_size(v)}" for t, v in self.plan.totals().items() if v)
        return f"<OffloadedModel {self.name!r}: {state}; {totals}>"

    def _repr_html_(self):
        return self.plan._repr_html_()

    def _repr_pretty_(self, p, cycle):
        p.text(repr(self) + "\n" + str(self.plan))
