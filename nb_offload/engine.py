"""The engine: runs a model's forward passes under a plan, streaming non-resident units just ahead of use.

It wires four parts together, each in a module of its own:
- the schedule (schedule.py): which unit goes into which slot when, learned run order, read-ahead;
- a mover (movers.py): how bytes reach the slots (CUDA copy stream and events, or the CPU path);
- the disk reader (reader.py): worker threads, reads around the page cache, abandoned reads;
- the hooks (hooks.py): the one part that touches ``nn.Module``, binding parameters to slot views.

A forward pass runs through ``step``; each streamed unit's hooks call ``_enter`` (take its job
from the schedule, wait for its bytes, bind its parameters to the slot) and ``_exit`` (free the
slot once its compute is done). Where the plan splits blocks (pieces.py), each piece is a unit
of the engine's own, bound only while its submodule runs. For one generate, ``hold`` gives
streamed units buffers of their own in room the plan reserved but the generate won't use (spare.py).
Blocks the CPU computes in small steps (hybrid.py) stream with the others in a large one (a prefill),
through the same slots: they join ``sources`` for that step (``_use_large``).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from concurrent.futures import wait as futures_wait

from . import cpu_experts, device_routing, experts, hybrid
from . import handoff as handoffs
from .budget import link_gbps
from .errors import OptionError, in_one_line
from .graphs import DecodeGraphs, given_cache, given_ids
from .handoff import GpuHandoff
from .hooks import ModuleHooks, bind, bind_views, to_device
from .movers import CpuMover, CudaMover, graph_waits_take_launch_record
from .planner import text_config
from .reader import DiskReader, read_usable
from .schedule import Schedule, Work
from .tiers import Source, param_views

# Model outputs transformers records from inside the blocks when asked (config flags of these names).
RECORDED_OUTPUTS = ("output_attentions", "output_router_logits")


class Engine:
    def __init__(self, model, units, params, sources: dict, device, trace, stats, *,
                 prefetch: int = 1, read_ahead: int = 2, read_threads: int = 8,
                 drop_page_cache: bool = False, split: bool = False, cuda_graph: bool = True,
                 fused_kernels: bool = True, expert_cache: int = 0, pinned_experts: dict | None = None,
                 expert_compute=None, experts_chosen: bool = False, cpu_blocks=None, cpu_max_tokens: int = 1,
                 decode_spare: int = 0, packed_room: int | None = 0, kernel: str = "",
                 handoff: str | None = None, read_back: str | None = None):
        import torch
        self.torch = torch
        self.model = model
        self.device = device
        self.cuda = device.type == "cuda"
        self.trace = trace
        self.stats = stats
        self.n_model = len(units)
        # engine unit index -> Parameters (slot order), Source (streamed units only)
        self.units, self.params, self.sources = list(units), dict(params), dict(sources)
        self.owner = {}           # engine unit index -> the model unit it is a piece of
        self.pieces_of = {}       # model unit index -> its engine units, in layout order
        self.rest = {}            # model unit index -> its leftovers' buffer on the compute device
        self.rest_binding = {}    # model unit index -> (its leftovers' parameters, their slots, that buffer)
        self.large_sources = {}   # the CPU blocks' sources (below), while they don't stream
        self.held = {}            # unit index -> (Source, own buffer), see hold(); a CPU block's: its large_sources
        self.in_step = False
        self._views = {}          # (unit, slot) -> parameter views into that slot
        self._open = {}           # unit index or "step" -> the mark its trace span started at
        self.hooks = ModuleHooks(model)
        # Blocks the CPU computes from host memory (index -> their bytes there; the caller bound them there). A
        # step too large for the CPU streams them as the others, split into pieces as they are: their sources
        # (``large_sources``: engine units, pieces included) join ``sources`` for such a step only.
        # (On the CPU device both sides are the CPU: loads give none there, a test may, to check the engine's part.)
        self.cpu_blocks = dict(cpu_blocks or {})
        self.sources.update((idx, Source("cpu", flat=host)) for idx, host in self.cpu_blocks.items())
        read_ahead = max(1, int(read_ahead)) * (self._split_into_pieces() if split else 1)
        self.large_sources = {k: src for k, src in self.sources.items() if self.model_unit(k) in self.cpu_blocks}
        for k in self.large_sources:
            del self.sources[k]
        for idx, host in self.cpu_blocks.items():   # the leftovers too (a piece's were bound to the GPU)
            bind(self.params[idx], self.units[idx], host)
        self.large = False      # this step streams the CPU's blocks too

        streamed = [self.units[i] for i in self.stream_order()]
        order = [u.index for u in streamed]
        large_order = self.stream_order(large=True)
        from_disk = [i for i in order if self.sources[i].tier == "disk"]
        slots = max(1, int(prefetch)) + 1 if large_order else 0
        slot_bytes = max((self.units[i].nbytes for i in large_order), default=0)
        staged = max((self.units[i].nbytes for i in from_disk), default=0) if self.cuda else 0
        self.reader = DiskReader(trace, threads=read_threads, uncached=drop_page_cache, staging_bytes=staged,
                                 staging_count=read_ahead if staged else 0)
        self.schedule = Schedule(order, slots=slots, prefetch=prefetch, staging=len(self.reader.staging),
                                 read_ahead=read_ahead, from_disk=from_disk, large_order=large_order,
                                 usable=None if self.cuda else read_usable)
        if self.cuda:
            self.mover = CudaMover(torch, device, slot_bytes, slots, units=self.units, sources=self.sources,
                                   schedule=self.schedule, reader=self.reader, trace=trace, stats=stats)
        else:
            self.mover = CpuMover(torch, slot_bytes, slots, reader=self.reader, trace=trace, stats=stats,
                                  schedule=self.schedule)
        for u in streamed:      # shapes, dtypes and device are right from the start
            bind_views(self.params[u.index], self._slot_views(u.index, 0))
        # Streamed MoE blocks come without their expert rows, and the routed ones once the router has
        # picked them (experts.py): read from disk on the CPU, copied from page-locked memory on CUDA.
        self.routed, self._without_experts = {}, {}
        self.routing = True         # this step brings MoE blocks as routed (set per step from its tokens)
        self.last_routed = {}       # model unit name -> the experts its last call brought as routed
        top_k = getattr(text_config(model.config), "num_experts_per_tok", None) or 1
        for u in streamed:
            found = experts.find(model, u, top_k)
            src = self.sources[u.index]
            if found is None or not found.worth_it(self.cuda) or src.tier != experts.routed_tier(self.cuda) \
                    or (self.cuda and src.flat is None):
                continue
            self.routed[u.index] = found
            rest = found.rest(u.params)
            if self.cuda:
                self._without_experts[u.index] = (rest, sum(b - a for a, b in rest))
            else:
                rest = experts.placed(src.extents, rest)
                self._without_experts[u.index] = (Source(src.tier, extents=rest), sum(e[2] for e in rest))
        # Slots keep the units they hold from step to step (Schedule.kept), except where a MoE block's routed
        # experts stream: their rows, the expert cache's lent entries and the GPU's fetches write slots too.
        self.schedule.keeping = not self.routed
        # Routed experts the CPU computes from host memory instead of copying them (cpu_experts.py): on CUDA,
        # for blocks whose experts come from page-locked memory; ``expert_compute``: a share, or "auto".
        self.host, self.expert_share, self.host_rates = None, 0.0, None
        self.signal = self.worker = None        # cpu_experts.HostSignal / HostWorker, on CUDA
        self.switch_interval = cpu_experts.SWITCH_INTERVAL      # the GIL's, while a worker computes
        self._outstanding = []      # the workers' calls not yet collected: (future, count(start, end))
        self.experts_chosen = experts_chosen    # the user named the experts implementation: it stays
        self._cpu_rows, self._gpu_rows, self._forwards, self._host_calls, self.last_on_cpu = {}, {}, {}, {}, {}
        self.cpu_max_tokens = cpu_max_tokens      # the most tokens a step the CPU blocks compute on the CPU
        # where decode steps' CPU blocks run and how their outputs come back: the load's (hybrid.HANDOFF and
        # handoff.READ_BACK as they were at load, so an engine built again by a re-plan keeps them)
        self.handoff_kind = hybrid.HANDOFF if handoff is None else handoff
        self.read_back = handoffs.READ_BACK if read_back is None else read_back
        self._cpu_hooks = {}        # index -> its hybrid.CpuBlock (install)
        # host memory the CPU blocks' reordered weights may take (cpu_products.py): 0 none, None no limit
        self.packed_room = packed_room
        self._packed = []           # their cpu_products.PackedLinears (or cpu_kernel.KernelLinears), installed
        # the kernel of nb_offload's they multiply one token's row by, where not torch's: "fast" (cpu_kernel.py,
        # cpu_kernel="fast") or "amx" (cpu_amx.py: F.linear's bits); on the CPU device every resident unit's
        self.kernel = kernel
        self._block_forwards = []   # their modules whose forward hands decode steps to the worker
        self.block_handoff, self.block_handoff_why_not = None, ""      # handoff.GpuHandoff, below
        try:        # a start that fails part way leaves no wrapped forward, worker or reader behind
            if expert_compute is not None and self.cuda and self.routed:
                self.compute_experts_on_cpu({i: self.sources[i].flat for i in self.routed}, expert_compute)
            self.block_handoff = self._block_handoff()
            # copies of often routed experts in the room the plan reserved for them; while GPU-fetched decode
            # steps run, also in the staging slots and in ``decode_spare`` bytes (a prefill's activations')
            self.decode_spare = decode_spare
            row = max((f.row_bytes for f in self.routed.values()), default=0)
            self.expert_cache = experts.ExpertCache(torch, device, row, expert_cache // row) \
                if row and expert_cache >= row else None
            if self.expert_cache is not None and pinned_experts:
                self._pin_experts(pinned_experts)
            if self.expert_cache is not None and self.cuda:
                self._warm_cache()
            # batch-1 decode steps fetch their routed experts by a kernel of the GPU's, with no host wait
            self.gpu_fetch, self.gpu_fetch_why_not = None, device_routing.why_not(self)
            if not self.gpu_fetch_why_not:
                try:
                    self.gpu_fetch = device_routing.DeviceRouting(self)
                except RuntimeError as exc:     # host memory the GPU can't read (page-locking failed)
                    self.gpu_fetch_why_not = in_one_line(exc)
            self.graphs = DecodeGraphs(self, enabled=cuda_graph, fuse=fused_kernels)
        except BaseException:
            self._stop_host_experts()
            if self.block_handoff is not None:
                self.block_handoff.close()
            self.reader.close()
            raise

    # -- set-up ---------------------------------------------------------------------------------
    def _pin_experts(self, pinned):
        """Fill the expert cache with the pinned experts (``pinned``: model unit index -> experts), kept
        for good; experts of blocks that don't stream as routed are on the device, or come whole, anyway."""
        cache = self.expert_cache
        for idx in self.routed:
            for e in sorted(pinned.get(self.model_unit(idx), ())):
                if not cache.free:      # the plan reserved room for them all; nothing more to keep
                    return
                self._keep(idx, e, cache.pin)

    def _keep(self, idx, e, take):
        """Copy expert ``e`` of routed block ``idx`` into the entry ``take((idx, e))`` gives it (the cache's
        ``pin`` or ``place``), from the block's tier; an entry not wholly written is forgotten."""
        cache, key = self.expert_cache, (idx, e)
        entry = take(key)
        try:
            cache.fill(self.routed[idx], e, self.sources[idx], entry)
        except BaseException:
            cache.forget(key)
            raise

    def _warm_cache(self):
        """Fill the cache's free entries at load with experts of the blocks streamed from host memory, one
        block after another round them, counted as never routed (the first experts routed more often replace
        them): a prefill takes the experts the cache holds from it (``_around_cache``), so the first one after
        the load moves no more than later ones, where the plan gave the cache a kept block's room."""
        cache = self.expert_cache
        blocks = [(idx, found) for idx, found in sorted(self.routed.items()) if self.sources[idx].flat is not None]
        for e in range(max((found.count for _, found in blocks), default=0)):
            for idx, found in blocks:
                if e >= found.count or (idx, e) in cache.where:
                    continue
                if not cache.free:
                    return
                self._keep(idx, e, cache.place)

    def compute_experts_on_cpu(self, flats: dict, share):
        """Let the CPU compute ``share`` (a number, or "auto": measured) of the routed experts a step needs
        that the GPU doesn't hold, from ``flats`` (routed block index -> its bytes in host memory): how the
        CPU computes an expert of each block from there (``cpu_experts.rows_for`` a twin of its experts
        module); the experts modules' forwards then combine both sides (``_experts_forward``)."""
        self._stop_host_experts()
        for idx, found in self.routed.items():
            unit, flat = self.units[idx], flats[idx]
            fused = {offset for offset, _ in found.rows}
            cut = len(found.module) + 1
            weights = {slot.names[0][cut:]: view for slot, view in zip(unit.params, param_views(unit, flat))
                       if slot.offset in fused}
            module = self.model.get_submodule(found.module)
            self._cpu_rows[idx] = cpu_experts.rows_for(cpu_experts.twin(module, weights),
                                                       kernel=self._experts_kernel(weights))
            self._gpu_rows[idx] = cpu_experts.rows_for(module)
            own = type(module).forward.__get__(module)     # the class's, whatever a failed start left on it
            self._forwards[idx] = (module, own)
            module.forward = self._experts_forward(idx, own)
        self.host = cpu_experts.HostCompute(self.torch, cpu_experts.host_threads())
        if self.cuda:       # the CPU's work off the caller's thread where the GPU can wait for it
            if self.signal is None:
                self.signal = cpu_experts.HostSignal(self.torch, self.device)
            if self.signal.available:
                kind = cpu_experts.HostOwed if cpu_experts.OWED_TO_CALLER else cpu_experts.HostWorker
                self.worker = kind(self.torch, self.host.threads, self.signal)
        if share != "auto":
            self.expert_share = float(share)
            return
        idx, found = next(iter(self.routed.items()))
        dtype = next(iter(self.model.get_submodule(found.module).parameters())).dtype
        cpu = self.host.rate(self._cpu_rows[idx], found.count, text_config(self.model.config).hidden_size, dtype,
                             found.row_bytes)
        link = link_gbps(self.device) * 1e9         # the page-locked link, measured once a process
        self.host_rates = (cpu, link)
        self.expert_share = hybrid.cpu_share(cpu, link)
        if cpu < link:
            self.keep_experts_on_gpu()

    def keep_experts_on_gpu(self):
        """"auto" found the CPU slower than the link: every expert stays on the GPU. A split call holds the
        host on the CPU's work, so what it launches next no longer hides under the link's copies; on the
        H200 host splits lost to all-GPU routing with the CPU at 0.54 and 0.97 of the link's rate (docs/moe.md).
        Unless the load named one, the experts compute with transformers' default implementation again (the
        eager one, chosen so the two sides combine in its order, reads the routing on the host)."""
        self._stop_host_experts()
        self.expert_share = 0.0
        if not self.experts_chosen:
            self.model.set_experts_implementation(None)

    def _split_into_pieces(self) -> int:
        """Streamed units that have pieces (pieces.py) stream a piece at a time; returns the most
        pieces of a disk block (reads ahead count in pieces, a staging buffer each, as planned).

        Each piece becomes a unit of the engine's own, numbered after the model's units, hooked on
        its submodule; the unit's leftovers are copied once into a small buffer on the compute device.
        """
        from types import SimpleNamespace

        from .units import Unit
        torch = self.torch
        for u in self.units[:self.n_model]:
            src = self.sources.get(u.index)
            if src is None or not u.pieces:
                continue
            del self.sources[u.index]
            by_name = {slot.names[0]: p for slot, p in zip(u.params, self.params[u.index])}
            ids = []
            for pc in u.pieces:
                k = len(self.units)
                self.units.append(Unit(index=k, name=u.name, modules=[pc.module], kind="piece",
                                       params=pc.params, nbytes=pc.nbytes))
                self.params[k] = [by_name[slot.names[0]] for slot in pc.params]
                self.sources[k] = src.part(pc.start, pc.end)
                self.owner[k] = u.index
                ids.append(k)
            self.pieces_of[u.index] = ids
            if u.rest:
                buf = torch.empty(u.rest_nbytes, dtype=torch.uint8, device=self.device)
                for slot, start in zip(u.rest, u.rest_from):
                    buf[slot.offset:slot.offset + slot.nbytes].copy_(src.read(start, slot.nbytes))
                rest = ([by_name[slot.names[0]] for slot in u.rest], SimpleNamespace(params=u.rest), buf)
                bind(*rest)
                self.rest[u.index], self.rest_binding[u.index] = buf, rest
        return max((len(ids) for ids in self.pieces_of.values() if self.sources[ids[0]].tier == "disk"), default=1)

    def stream_order(self, large: bool = False):
        """Engine units that stream, in the model's unit order (pieces in layout order); with ``large``, in a
        step too large for the CPU, which streams the CPU's blocks too."""
        streams = {**self.sources, **self.large_sources} if large else self.sources
        out = []
        for u in self.units[:self.n_model]:
            if u.index in streams:
                out.append(u.index)
            out.extend(k for k in self.pieces_of.get(u.index, ()) if k in streams)
        return out

    def model_unit(self, idx):
        """The model unit an engine unit belongs to (itself, or the unit it is a piece of)."""
        return self.owner.get(idx, idx)

    @property
    def small_order(self):
        """The units a small step streams, in the order learned for such steps, held ones included."""
        return self.schedule.orders[False]

    @property
    def order(self):
        """Streamed units in the order they are expected to run (learned from the first pass)."""
        return self.schedule.order

    @property
    def slots(self):
        return self.mover.slots

    @property
    def drop_page_cache(self) -> bool:
        return self.reader.uncached

    def _slot_views(self, idx, slot):
        views = self._views.get((idx, slot))
        if views is None:
            views = self._views[(idx, slot)] = param_views(self.units[idx], self.mover.slots[slot])
        return views

    def install(self):
        """Hook the units' modules (the forward pass as a whole goes through ``step``)."""
        full = self.trace.enabled and self.trace.detail == "full"
        for u in self.units:
            if u.index in self.cpu_blocks and u.index not in self.large_sources:  # its pieces stream in large steps
                continue
            if u.index in self.sources or u.index in self.large_sources or full:   # resident and not traced one
                self.hooks.install(u, self._enter, self._exit)                     # by one: no hook, no cost
        for idx, found in self.routed.items():
            self.hooks.around(found.module, lambda args, kwargs, idx=idx: self._before_experts(idx, args, kwargs),
                              lambda output, idx=idx: self._after_experts(idx, output))
        if isinstance(self.worker, cpu_experts.HostOwed):   # other MoE blocks' eager experts wait for the GPU
            # (``nonzero``), which may be waiting for a call the caller owes: pay it first
            top_k = getattr(text_config(self.model.config), "num_experts_per_tok", None) or 1
            hooked = {found.module for found in self.routed.values()}
            for u in self.units:
                if u.index in self.cpu_blocks:      # computed on the blocks' worker, which must not wait here
                    continue
                found = experts.find(self.model, u, top_k)
                if found is not None and found.module not in hooked:
                    hooked.add(found.module)
                    self.hooks.before_call(found.module, lambda args, kwargs: self._collect())
        st = self.stats
        st.cpu_packed_linears = st.cpu_plain_linears = st.cpu_packed_bytes = 0
        st.cpu_fast_linears = st.cpu_amx_linears = 0
        if not self.cuda:
            self._row_major_head_input()
            if self.kernel:
                self._kernel_for_resident_units()
        if self.cpu_blocks:
            threads = cpu_experts.host_threads()
            self._pack_cpu_weights(threads)
            for idx, host in self.cpu_blocks.items():
                u = self.units[idx]
                module = self.model.get_submodule(u.modules[0])
                whole = len(u.modules) == 1     # one module: its forward can hand its calls to the worker
                block = hybrid.CpuBlock(self.torch, u, self.params[idx], host, layer=hybrid.layer_index(module),
                                        device=self.device, rest=self.rest_binding.get(idx),
                                        large=lambda hidden: self.large,
                                        max_tokens=self.cpu_max_tokens, threads=threads, trace=self.trace,
                                        stats=self.stats, handoff=self.block_handoff if whole else None)
                self._cpu_hooks[idx] = block
                if block.handoff is not None:
                    module.forward = block.forward(type(module).forward.__get__(module))
                    self._block_forwards.append(module)
                    continue
                for name in u.modules:
                    self.hooks.around(name, block.before, block.after)

    def _row_major_head_input(self):
        """On the CPU device: the output head's input copied into a row-major tensor of its own where it is a view
        with other strides. transformers gives the head the hidden states' last position (``[:, -1:, :]`` of a
        prompt's), whose batch stride is the prompt's. Where the weights don't require grad (nb_offload binds
        them so), torch's matmul can't fold such a view into one product and takes the batched one, which on the
        CPU copies the head's weight transposed at each call: 0.3 s of a prefill for a head of 32,000 rows on a
        2-core machine, against 5 ms. Plain transformers' weights require grad, so its matmul folds the rows
        (copying them): the same product and bits as the copy here gives."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        name = next((n for n, m in self.model.named_modules() if m is head), None) if head is not None else None
        if name is None:
            return
        torch = self.torch

        def copy_to_row_major(args, kwargs):
            x = args[0] if args else None
            # the strides themselves: is_contiguous() ignores those of sizes of 1, and so takes that view as one
            if isinstance(x, torch.Tensor) and x.dim() > 2 and x.stride() != _row_major(x.shape):
                args = (x.clone(memory_format=torch.contiguous_format),) + tuple(args[1:])
            return args, kwargs
        self.hooks.rewrite_call(name, copy_to_row_major)

    def _kernel_policy(self, threads: int):
        """The policy of ``kernel`` (cpu_kernel.Fast, or cpu_amx.Amx with its shapes checked at ``threads``); None
        where the products are torch's."""
        from .cpu_amx import kernel_policy
        return kernel_policy(self.torch, self.kernel, threads)

    def _experts_kernel(self, weights: dict):
        """The policy the CPU's routed experts' one-row products take nb_offload's ``kernel`` by, at the experts'
        threads, the AMX kernel's chunks of one expert's shapes in ``weights`` looked for now; None for F.linear."""
        policy = self._kernel_policy(cpu_experts.host_threads())
        if self.kernel == "amx":
            for name in ("gate_up_proj", "down_proj"):
                if name in weights and weights[name].dim() == 3:
                    policy.check(*weights[name].shape[1:])
        return policy

    def _kernel_for_resident_units(self):
        """On the CPU device: the linears of the units computed where they live in host memory (not streamed into
        a slot) take nb_offload's kernel (``kernel``) for one-row products, with the caller's threads. A
        linear takes it where its weight is a resident unit's: a unit's module may hold other units' modules (a
        unit for a parameter of the blocks' container), whose linears may stream."""
        streamed = set(self.sources) | set(self.owner.values()) | set(self.cpu_blocks)
        resident = [u for u in self.units[:self.n_model] if u.index not in streamed]
        weights = {id(p) for u in resident for p in self.params.get(u.index, ())}
        for u in resident:
            for name in u.modules:
                taken = self._install_kernel(self.model.get_submodule(name) if name else self.model, weights)
                weights -= {id(linear.weight) for linear, _ in taken.linears}     # each linear once

    def _install_kernel(self, module, among=None, threads: int | None = None):
        """cpu_kernel.KernelLinears of ``kernel`` on ``module``'s linears (those whose weights ``among`` holds,
        where given), installed, counted and kept for ``remove``. ``threads``: the count the AMX kernel's shapes
        are checked at (a CPU block's own; the caller's where None)."""
        from .cpu_kernel import KernelLinears
        taken = KernelLinears(self.torch, module, self._kernel_policy(threads or self.torch.get_num_threads()),
                              among=among)
        taken.install()
        self._packed.append(taken)
        if self.kernel == "amx":
            self.stats.cpu_amx_linears += len(taken.linears)
        else:
            self.stats.cpu_fast_linears += len(taken.linears)
        self.stats.cpu_plain_linears += taken.skipped
        return taken

    def _pack_cpu_weights(self, threads: int):
        """The CPU blocks' linears that compute one token's row from reordered copies of their weights
        (cpu_products.py), block after block in the model's order while ``packed_room`` lasts."""
        from .cpu_products import PackedLinears
        st, left = self.stats, self.packed_room
        if self.kernel:
            for idx in sorted(self.cpu_blocks):
                for name in self.units[idx].modules:
                    self._install_kernel(self.model.get_submodule(name), threads=threads)
            return
        if left == 0:
            return
        for idx in sorted(self.cpu_blocks):
            for name in self.units[idx].modules:
                packed = PackedLinears(self.torch, self.model.get_submodule(name), threads, left)
                packed.install()
                self._packed.append(packed)
                st.cpu_packed_linears += len(packed.linears)
                st.cpu_plain_linears += packed.skipped
                st.cpu_packed_bytes += packed.bytes
                if left is not None:
                    left -= packed.bytes

    def _block_handoff(self):
        """The worker that computes decode steps' CPU blocks and how the GPU's stream passes them to it
        (handoff.py), on CUDA where the load's ``hybrid.HANDOFF`` asks for one; None where the caller computes them
        (``block_handoff_why_not`` says why, where a worker was asked for)."""
        if self.handoff_kind not in hybrid.HANDOFFS:
            raise OptionError(f"hybrid.HANDOFF is {self.handoff_kind!r}; accepted: {', '.join(hybrid.HANDOFFS)}")
        if self.read_back not in handoffs.READ_BACKS:
            raise OptionError(f"handoff.READ_BACK is {self.read_back!r}; accepted: {', '.join(handoffs.READ_BACKS)}")
        if not (self.cpu_blocks and self.cuda) or self.handoff_kind == "caller":
            return None
        signal = cpu_experts.HostSignal(self.torch, self.device)
        if not signal.available:
            self.block_handoff_why_not = f"the GPU can't wait for the worker: {signal.why_not}"
            return None
        worker = cpu_experts.HostWorker(self.torch, cpu_experts.host_threads(), signal, name="nb_offload-cpu-blocks",
                                        device=self.device)
        # a block of several modules stays on the caller (hooks, not one forward): no graph can hand it over
        whole = all(len(self.units[i].modules) == 1 for i in self.cpu_blocks)
        return GpuHandoff(self.torch, self.device, worker, signal, calls=len(self.cpu_blocks),
                          owe=lambda future, count: self._outstanding.append((future, count)),
                          capture=self.handoff_kind == "graph" and whole, read_back=self.read_back)

    def _stop_host_experts(self):
        """The experts modules' own forwards again, and no CPU side."""
        for module, _ in self._forwards.values():
            vars(module).pop("forward", None)       # the class's own again
        self._forwards, self._cpu_rows, self._gpu_rows, self._host_calls = {}, {}, {}, {}
        self.host = None
        if self.worker is not None:
            try:
                self._collect()
            except Exception:       # noqa: BLE001 - stopping: a failed call of the last step is moot
                pass
            self.worker.close()
            self.worker = None

    def _workers(self):
        """The threads computing on the CPU for the GPU: the experts' and the blocks'."""
        return [w for w in (self.worker, self.block_handoff and self.block_handoff.worker) if w is not None]

    def _collect(self):
        """Compute the CPU's calls still owed, or wait for the workers' (the GPU waits for them anyway),
        raising what failed in them, and count them."""
        for worker in self._workers():
            worker.settle()
        failed = None
        try:
            while self._outstanding:        # all of them, so none is left for a later step to raise
                future, count = self._outstanding.pop(0)
                try:
                    count(*future.result())
                except Exception as exc:     # noqa: BLE001 - raised below, once every call is collected
                    failed = failed or exc
        except BaseException:       # an interrupt while waiting: the step is abandoned, and its calls with it
            self._outstanding.clear()
            raise
        if failed is not None:
            raise failed

    def _count_cpu(self, name, t0, t1, nbytes):
        """A split call's CPU work, from ``t0`` to ``t1`` on ``nbytes`` of experts, in the stats and the trace."""
        self.stats.cpu_expert_seconds += t1 - t0
        self.stats.bytes_on_cpu += nbytes
        self.trace.host_event("cpu", name, t0, t1, nbytes)

    def remove(self):
        self.graphs.drop()
        self.hooks.remove()
        self._stop_host_experts()
        if self.block_handoff is not None:      # its last calls run (the GPU may wait for them), then it stops
            self.block_handoff.close()
            self.block_handoff = None
        for module in self._block_forwards:
            vars(module).pop("forward", None)       # the class's own again
        for block in self._cpu_hooks.values():      # the caller's threads, whatever an interrupt left
            block.reset()
        self._cpu_hooks, self._block_forwards = {}, []
        for packed in self._packed:     # the linears' own forwards, and the copies freed
            packed.remove()
        self._packed = []
        st = self.stats
        st.cpu_packed_linears = st.cpu_plain_linears = st.cpu_packed_bytes = 0
        st.cpu_fast_linears = st.cpu_amx_linears = 0
        self.release_held()
        self.drain()
        self.expert_cache = self.gpu_fetch = None      # its views of the slots, with the slots
        self.reader.close()
        self.mover.slots, self._views, self.rest, self.rest_binding = [], {}, {}, {}
        self.schedule.forget()

    def drain(self):
        """Wait for everything in flight and forget the queue (before re-planning or unload)."""
        self.graphs.primed = None
        self.settle_routing()
        for worker in self._workers():      # the GPU may be waiting for the CPU's rows of a call
            worker.settle()
        self._do(Work(abandoned=self.schedule.reset()))     # so no read waits for a copy that won't come
        self.reader.drain()
        self.mover.synchronize()
        self.trace.flush(wait=True)

    # -- one forward pass -------------------------------------------------------------------------
    def step(self, forward, args, kwargs):
        """Run the model's own ``forward`` once, streaming as planned (inputs may be on the CPU); a decode
        step of a generate given a static cache is captured and replayed (graphs.py), where no routed
        experts wait for the host."""
        on_gpu = False
        if self.routed:
            found = next(iter(self.routed.values()))
            tokens = _tokens(args, kwargs)
            self.routing = found.worth_routing(tokens)
            on_gpu = self.gpu_fetch is not None and tokens == 1 and self.routing and not self._forwards
            if self.gpu_fetch is not None:
                self.gpu_fetch.begin(on_gpu)
        if self.graphs.takes(args, kwargs):
            if on_gpu or not self.routed:
                return self.graphs.step(forward, to_device(args, self.device), to_device(kwargs, self.device))
            self.stats.graph_eager = ("the host brings the routed experts of this decode (a batch of more than one "
                                      "token, or a share of them computed on the CPU)")
        return self.eager_step(forward, args, kwargs)

    def eager_step(self, forward, args, kwargs):
        if self.in_step:        # the last step ended in an exception: start clean
            for worker in self._workers():      # the counter raised for every call the GPU may wait for
                worker.settle()
            self._outstanding.clear()
            self._do(Work(abandoned=self.schedule.reset()))
            self.schedule.forget()      # a copy or read it cut short may have left a slot part written
            for block in self._cpu_hooks.values():
                block.reset()
        self.in_step = True
        if self._cpu_hooks:
            # a step that records a block's inner outputs (attentions, router logits) keeps its CPU blocks on
            # this thread: transformers collects them through a context variable a worker thread doesn't see
            recorded = [k for k, v in kwargs.items()        # flags only: the other arguments are tensors
                        if k.startswith("output_") and k != "output_hidden_states" and v is True]
            recorded += [k for k in RECORDED_OUTPUTS if getattr(self.model.config, k, None)]
            for block in self._cpu_hooks.values():
                block.on_worker = not recorded and block.handoff is not None
        self.graphs.primed = None               # the slots will no longer hold a replay's first units
        if self.large_sources:
            self._use_large(_tokens(args, kwargs) > self.cpu_max_tokens)
        if self.cuda:
            self.mover.begin_step()
        if self.trace.enabled:
            self._open["step"] = self.mover.mark()
        work = self.schedule.begin_step()
        if self.cuda and self.mover.in_capture:     # a replay finds these in their slots (see replay)
            fetched = self.gpu_fetch.units if self.gpu_fetch is not None and self.gpu_fetch.active else ()
            self.mover.present([job for job in work.jobs if job.unit not in fetched])   # these bring nothing
        self._do(work)
        with self._handover():
            out = forward(*to_device(args, self.device), **to_device(kwargs, self.device))
        self._collect()         # a failed CPU call fails the step, before its output is used
        if self.trace.enabled:
            self._span_end("step")
        self.in_step = False
        self._do(self.schedule.end_step())
        self.stats.steps += 1
        self.stats.sample_host(every=0.05)
        self.trace.step += 1
        self.trace.flush()
        return out

    def prime(self):
        """Bring the first units of the next step into the slots now, while the link and the drive are idle
        (after a generate, and at load): a step that finds them there brings the rest only (Schedule.kept). The
        next step is taken to be a prompt's, so a large one where the CPU's blocks stream in such (hybrid.py).
        Nothing where the queue already begins that step (an eager step's end queued it), mid-step, or where MoE
        blocks stream as routed (what a step brings of them depends on its tokens, and slots keep nothing there)."""
        sched = self.schedule
        large = bool(self.large_sources)
        order = [i for i in sched.orders[large] if i not in sched.held]
        if self.in_step or not order or not self.mover.slots or not sched.keeping:
            return
        if sched.large == large and sched.queue and sched.pos % len(sched.order) == 0 \
                and sched.queue[0].unit == sched.order[0]:
            return
        self._use_large(large)
        self._do(Work(abandoned=sched.restart(wrap=True)))
        self.graphs.primed = None       # its copies may overwrite a replay's first units: the next replay copies them
        if self.cuda:       # after whatever last read the slots (a replay's kernels, a step's tail)
            self.mover.begin_step()
            self.mover.after_graph()
        st = self.stats
        before = (st.bytes_from_cpu, st.bytes_from_disk)
        try:
            self._do(sched.fill())
        except BaseException:       # (an interrupt) no job left queued whose bytes were never asked for
            self._do(Work(abandoned=sched.reset()))
            sched.forget()
            raise
        finally:
            st.primed_from_cpu += st.bytes_from_cpu - before[0]
            st.primed_from_disk += st.bytes_from_disk - before[1]

    def _use_large(self, large: bool):
        """From this step on, stream the CPU's blocks too (``large``: a step with more tokens than the CPU
        computes, where their hooks compute them on the GPU as the others), or not."""
        if large == self.large:
            return
        self.large = large
        if large:
            self.sources.update(self.large_sources)
        else:
            for k in self.large_sources:
                self.sources.pop(k, None)
        self._do(Work(abandoned=self.schedule.use(large)))

    def _handover(self):
        """Where a worker computes split calls' experts or CPU blocks: the GIL handed over quickly while the
        step's Python runs (cpu_experts.quick_handover), so the worker isn't left waiting for it between its
        products."""
        if (isinstance(self.worker, cpu_experts.HostWorker) and self.expert_share > 0) or self.block_handoff:
            return cpu_experts.quick_handover(self.switch_interval)
        return contextlib.nullcontext()

    # -- a captured step (graphs.py) ------------------------------------------------------------------
    @property
    def cpu_cache_layers(self) -> list:
        """The KV-cache layers of the blocks computed on the CPU: the only ones that move between steps."""
        return [block.layer for block in self._cpu_hooks.values()]

    def place_cpu_caches(self, args, kwargs):
        """The CPU blocks' KV-cache layers where this step computes them (``CpuBlock.place_cache``): before a
        graph's key is taken (it names where the cache's layers are) and before a capture (which can't move
        them). The worker is done with the calls before first: a step that failed part way may have left one
        computing from the layers' tensors."""
        if not self._cpu_hooks:
            return
        for worker in self._workers():
            worker.settle()
        large = bool(self.large_sources) and _tokens(args, kwargs) > self.cpu_max_tokens
        for block in self._cpu_hooks.values():
            block.place_cache(given_cache(kwargs), large)

    def capture_step(self, graph, forward, args, kwargs):
        """Record one forward pass into ``graph``: its copies, its compute and the events between them,
        with the slots filled from the start of the step, the first ones (``mover.ahead``) already
        there. Returns the output (in the graph's memory pool), the trace records the graph stamps on
        every replay, the bytes it copies a replay, the slots' use, and the CPU blocks' calls each replay
        hands to the worker (handoff.py)."""
        torch = self.torch
        self.drain()
        if self.mover.waits_per_unit is None:      # outside any capture: it captures a graph of its own
            self.mover.waits_per_unit = graph_waits_take_launch_record(torch, self.device)
        self.place_cpu_caches(args, kwargs)
        self.schedule.restart(wrap=False)       # a replay is whole: nothing fetched for the next step
        self.schedule.forget()      # its copies land at its replays, into slots as the ring gives them
        moved = self.stats.bytes_from_cpu
        steps, trace_step = self.stats.steps, self.trace.step
        recording = self.block_handoff.recording() if self.block_handoff else contextlib.nullcontext([])
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"), self.mover.capturing() as slots, \
                    self.trace.capturing() as records, recording as program:
                out = self.eager_step(forward, args, kwargs)
        finally:
            nbytes = self.stats.bytes_from_cpu - moved
            self.stats.bytes_from_cpu, self.stats.steps, self.trace.step = moved, steps, trace_step
            self.schedule.restart(wrap=True)
        return out, records, nbytes, slots, program

    def after_failed_capture(self):
        self.in_step = False
        self._open.clear()
        self.mover.reset_events()
        self.schedule.restart(wrap=True)
        self.schedule.forget()

    def replay(self, captured):
        """One decode step: the captured graph, ordered after any copy still in flight and before any to come.

        The graph finds its first streamed units in their slots: copied right after the last replay
        was launched, each once its slot's last use in that replay is done (so the copies run under
        the step's tail and the host's work between steps), or here, before the first replay."""
        self.trace.flush(wait_for=captured.records)     # its last replay's stamps, read before it overwrites them
        self._use_large(captured.large)         # the units its copies read: the CPU's blocks too, where large
        self._do(Work(abandoned=self.schedule.restart(wrap=True)))  # an eager step's prefetch, forgotten
        self.mover.begin_step()
        if self.graphs.primed is not captured:
            self.mover.prefetch(captured.ahead, None)
        self.mover.before_graph()
        # the graph stamps its own events; captured without them, the step is timed from outside
        start = self.mover.mark() if self.trace.enabled and not captured.records else None
        if captured.program:        # handed over before the launch: each call polls for the flag the graph sets
            self.block_handoff.before_replay(captured.program)
            self._outstanding += self.block_handoff.run(captured.program)
        try:
            self.schedule.forget()      # the replay's copies write the slots (the prefetch below keeps its own)
            try:
                captured.graph.replay()
            except BaseException:
                if captured.program:    # the calls stop polling; the GPU's waits for them end
                    self.block_handoff.abandon()
                raise
            if self.trace.enabled and captured.records:
                self.trace.replay(captured.records)
            if start is not None:
                self.mover.span("step", "forward", start)
            self.mover.prefetch(captured.ahead, captured.last_use)     # the next step's first units
            self.graphs.primed = captured
        finally:
            self.mover.after_graph()
        if captured.program:
            st = self.stats
            before = (st.cpu_decode_calls, st.cpu_decode_bytes, st.cpu_decode_seconds)
            with self._handover():
                self._collect()         # a failed CPU block fails the step
            st.cpu_replayed_calls += st.cpu_decode_calls - before[0]
            st.cpu_replayed_bytes += st.cpu_decode_bytes - before[1]
            st.cpu_replayed_seconds += st.cpu_decode_seconds - before[2]
        self.stats.bytes_from_cpu += captured.nbytes
        self.stats.graph_replays += 1
        self.stats.steps += 1
        self.stats.sample_host(every=0.05)
        self.trace.step += 1

    def _enter(self, idx):
        if idx in self.large_sources and not self.large:    # a CPU block's, computed on the CPU (maybe on the
            return                                          # worker, which must not touch the schedule)
        if self.cuda and not self.in_step:
            self.mover.begin_step()             # a module called outside a forward pass: its stream
        if idx in self.sources:
            job, work = self.schedule.take(idx)
            if job is None:                     # already bound (a module reused inside one pass)
                return
            self._do(work, first=job)
            self.mover.wait(job)
            if job.kept:
                self.stats.kept_units += 1
                self.stats.kept_bytes += self.units[idx].nbytes
            if job.cached:
                self._from_cache(idx, job)
            bind_views(self.params[idx], self._slot_views(idx, job.slot))
            self.schedule.start(job)
            self._do(self.schedule.fill())
        if self.trace.enabled:
            self._open[idx] = self.mover.mark()

    def _exit(self, idx):
        if idx in self.large_sources and not self.large:
            return
        if self.trace.enabled:
            self._span_end(idx)
        job = self.schedule.release(idx)
        if job is not None:
            self.mover.done(job)
            self.mover.pump(self.schedule.queue)

    def _do(self, work: Work, first=None):
        """Carry out a schedule decision: drop abandoned reads, issue new ones, start the jobs and
        issue their copies in run order (``first``, the unit about to compute, ahead of the queue)."""
        for read in work.abandoned:
            if read.io is not None:             # None: decided, never issued (an exception came between)
                self.reader.abandon(read.io)
        for read in work.reads:
            unit = self.units[read.unit]
            read.io = self.reader.read_staged(unit.name, unit.nbytes, self.sources[read.unit].extents, read.staging)
        for job in work.jobs:
            source, nbytes = self.sources[job.unit], None
            if self.routing and job.unit in self._without_experts:     # its routed experts come later
                part, nbytes = self._without_experts[job.unit]
                if self.cuda:
                    job.ranges = part
                else:
                    source, job.ranges = part, []
            elif job.unit in self.routed and self.expert_cache is not None:
                source, nbytes = self._around_cache(job, source)
            self.mover.start(job, self.units[job.unit], source, nbytes)
        if work.jobs:
            self.mover.pump(([first] if first is not None else []) + list(self.schedule.queue))

    def _around_cache(self, job, source):
        """A routed block coming whole (as in a prefill): the rows of its experts the cache holds in its own
        room are copied from there as it computes (``_from_cache``), the rest come from its tier (on CUDA the
        mover copies ``job.rest``; on the CPU the reader reads only those). Returns the source and its bytes.
        Not in a capture: a replay would copy whatever the entries hold by then."""
        cache = self.expert_cache
        if self.cuda and self.mover.in_capture:
            return source, None
        job.cached = sorted((key, entry) for key, entry in cache.where.items()
                            if key[0] == job.unit and entry < cache.own)    # lent entries are slot memory
        if not job.cached:
            return source, None
        found = self.routed[job.unit]
        job.rest = experts.outside(found.ranges([key[1] for key, _ in job.cached]), self.units[job.unit].nbytes)
        if self.cuda:
            return source, None
        rest = experts.placed(source.extents, job.rest)
        return Source(source.tier, extents=rest), sum(e[2] for e in rest)

    def _from_cache(self, idx, job):
        """Copy the rows of ``job``'s cached experts into its slot, in order on the compute stream (after any
        copy into an entry the step has queued): from their entries, or for an expert evicted since the job
        started, from its block's tier after all."""
        cache, found = self.expert_cache, self.routed[idx]
        slot, source = self.mover.slots[job.slot], self.sources[idx]
        gone = []
        for key, entry in job.cached:
            if cache is not None and cache.where.get(key) == entry:
                cache.load(found, key[1], slot, entry)
            else:
                gone.append(key[1])
        for a, b in found.ranges(gone):
            slot[a:b].copy_(source.read(a, b - a), non_blocking=True)
            if source.tier == "disk":
                self.stats.bytes_from_disk += b - a
            else:
                self.stats.bytes_from_cpu += b - a
        job.cached = []

    def _before_experts(self, idx, args, kwargs):
        """A routed block's experts module is about to compute: its routed experts brought, by the GPU
        (device_routing.py: the call may then take other arguments) or by the host (``_bring_routed``)."""
        if self.gpu_fetch is not None and self.gpu_fetch.active:
            call = self.gpu_fetch.before(idx, args, kwargs)
            if call is not None:
                return call
        else:
            self._bring_routed(idx, args, kwargs)
        return args, kwargs

    def _after_experts(self, idx, output):
        if self.gpu_fetch is not None and self.gpu_fetch.active:
            self.gpu_fetch.after(idx)
        return output

    def settle_routing(self, release: bool = False):
        """Count what the last GPU-fetched steps routed (the host reads it at the next step otherwise); with
        ``release`` (a generate's end), give back the room lent to the expert cache."""
        if self.gpu_fetch is not None:
            self.gpu_fetch.settle(release)

    def _bring_routed(self, idx, args, kwargs):
        """Before a streamed MoE block's experts compute: bring the rows of the experts routed to into its
        slot, where the block came without them: from the expert cache where it holds them, else over the
        link from host memory (CUDA) or from disk (the CPU device), then kept in the cache if it takes them."""
        self._host_calls.pop(idx, None)
        self._collect()     # the last call's CPU work (the router below waits for it on the GPU anyway)
        job = self.schedule.active.get(idx)
        if job is None or idx not in self.sources or job.ranges is None:   # held, not streaming, or whole
            return
        found, slot, cache = self.routed[idx], self.mover.slots[job.slot], self.expert_cache
        t0 = time.perf_counter()
        cpu_rows = self._cpu_rows.get(idx)
        hidden, index, weights = found.arguments(args, kwargs)
        if cpu_rows is not None and index is not None:
            index = index.to("cpu")
        chosen = found.routed_in(index)             # on CUDA the host waits here for the router's choice
        if self.cuda:
            self.stats.route_wait_seconds += time.perf_counter() - t0
        cached = {e: cache.lookup((idx, e)) for e in chosen} if cache is not None else {}
        missed = [e for e in chosen if cached.get(e) is None]
        hits = len(chosen) - len(missed)
        # the cache takes the missed experts it keeps (they must be copied to be kept); the CPU may take a
        # share of the rest (cpu_experts.py)
        kept = {}
        if cache is not None:
            for e in missed:
                entry = cache.place((idx, e))
                if entry is not None:
                    kept[e] = entry
        on_cpu = []
        splits = cpu_rows is not None and hidden is not None and weights is not None
        if splits:
            rest, on_cpu = cpu_experts.split([e for e in missed if e not in kept], self.expert_share)
            missed = sorted(list(kept) + rest)
        name = f"{found.module} ({len(chosen)} of {found.count} experts" + (f", {hits} cached" if hits else "") \
            + (f", {len(on_cpu)} on the CPU" if on_cpu else "") + ")"
        try:
            # A call the CPU takes part of is combined by the experts' forward (``_combine``), and so is every
            # call where the GPU's side computes by its products alone: the eager forward would make the host
            # wait for the copies (``nonzero``) before it launches what comes after.
            if splits and (on_cpu or self._gpu_rows[idx].func is cpu_experts.direct_rows):
                # the CPU's inputs to the host, and the indices to the device, before the copies are queued:
                # each transfer waits for the compute stream, which then holds nothing more. The worker
                # starts first: the CPU's side is the longer one where it takes an expert of two.
                host, started = (hidden.to("cpu"), weights.to("cpu")) if on_cpu else (None, None), None
                cpu_work = cpu_experts.calls(index, on_cpu)
                if on_cpu and self.worker is not None:      # it starts now, while the link copies the others
                    out = self.torch.empty((sum(len(t) for _, t in cpu_work.values()), hidden.shape[-1]),
                                           dtype=hidden.dtype, pin_memory=True)
                    value = self.signal.next()
                    started = (self.worker.submit(cpu_rows, *host, cpu_work, out, value), out, value)
                gpu_work = cpu_experts.calls(index, [e for e in chosen if e not in cpu_work])
                work = {e: cpu_work[e] if e in cpu_work else gpu_work[e] for e in chosen}
                on_device = cpu_experts.to_device(work, hidden.device)
                self._host_calls[idx] = (*host, work, on_device, cpu_work, name, started)
            if missed and self.cuda:
                self.stats.bytes_from_cpu += self.mover.copy_now(name, found.ranges(missed), self.sources[idx].flat,
                                                                 slot)
            elif missed:
                self._read_rows(name, found.ranges(missed), self.sources[idx].extents, slot, t0)
            for e, entry in cached.items():
                if entry is not None:
                    cache.load(found, e, slot, entry)
            for e, entry in list(kept.items()):
                cache.store(found, e, slot, entry)
                del kept[e]
        except BaseException:       # an interrupt: an entry not (wholly) written must not be found later
            for e in kept:
                cache.forget((idx, e))
            raise
        self.stats.expert_hits += hits
        self.stats.experts_read += len(chosen) - len(on_cpu)
        self.stats.experts_on_cpu += len(on_cpu)
        self.stats.experts_skipped += found.count - len(chosen)
        block = self.units[self.model_unit(idx)].name
        self.last_routed[block] = chosen
        if cpu_rows is not None:
            self.last_on_cpu[block] = on_cpu

    def _experts_forward(self, idx, original):
        """The forward of a routed block's experts module where the CPU computes some of them: the call the
        pre-hook split, else the module's own."""
        def forward(*args, **kwargs):
            pending = self._host_calls.pop(idx, None)
            if pending is None:
                return original(*args, **kwargs)
            return self._combine(idx, pending, args, kwargs)
        return forward

    def _combine(self, idx, pending, args, kwargs):
        """A split call's output: the GPU's experts and the CPU's rows, added in expert order (cpu_experts.py).

        The CPU's rows come from the worker the pre-hook started, the GPU's stream waiting for them on the
        counter (nothing waits on the host), or where there is no worker, from this thread. The routed copies
        run on the compute stream, and the eager forward waits on the host for that stream (``nonzero``), so
        the GPU's experts go first only by their products alone (the eager form: nothing waits); otherwise
        after the CPU's, which then run while the link copies."""
        host_hidden, host_weights, work, on_device, on_cpu, name, started = pending
        found = self.routed[idx]
        hidden, _, weights = found.arguments(args, kwargs)
        gpu_rows = self._gpu_rows[idx]
        waits = gpu_rows.func is not cpu_experts.direct_rows

        def on_gpu():
            return {e: gpu_rows(hidden, weights, e, *on_device[e]) for e in work if e not in on_cpu}
        rows = {} if waits else on_gpu()
        nbytes = found.row_bytes * len(on_cpu)
        if started is not None:     # the worker's rows, once the counter says they are there (no host wait)
            future, out, value = started
            self.signal.wait(self.torch.cuda.current_stream(hidden.device), value)
            self._outstanding.append((future, lambda t0, t1: self._count_cpu(name, t0, t1, nbytes)))
            moved = out.to(hidden.device, non_blocking=True).split([len(t) for _, t in on_cpu.values()])
            host_rows = dict(zip(on_cpu, moved))
        elif on_cpu:
            host_rows, t0, t1 = self.host.run(self._cpu_rows[idx], host_hidden, host_weights, on_cpu)
            self._count_cpu(name, t0, t1, nbytes)
        if waits:
            rows = on_gpu()
        if on_cpu:
            rows.update((e, r.to(hidden.device)) for e, r in host_rows.items())
        return cpu_experts.combine(hidden, rows, {e: token for e, (_, token) in on_device.items()})

    def expert_state(self) -> dict:
        """Per MoE block brought as routed: the experts its last call routed to, those of them the CPU
        computed, and those the expert cache holds (the layer map shows them)."""
        cached = {}
        if self.expert_cache is not None:
            for idx, e in self.expert_cache.where:
                cached.setdefault(self.units[self.model_unit(idx)].name, []).append(e)
        names = dict.fromkeys(self.units[self.model_unit(i)].name for i in sorted(self.routed))
        return {n: {"routed": list(self.last_routed.get(n, [])), "cached": sorted(cached.get(n, [])),
                    "cpu": list(self.last_on_cpu.get(n, []))} for n in names}

    def _read_rows(self, name, ranges, source_extents, slot, t0):
        """Read byte ``ranges`` of a disk unit into the same ranges of ``slot``, now (the compute waits)."""
        extents = experts.placed(source_extents, ranges)
        chunks = self.reader.read_urgent(extents, slot)
        try:
            for chunk in chunks:
                chunk.result()
        except BaseException:       # nothing may land in the slot after this
            for chunk in chunks:
                chunk.cancel()
            futures_wait(chunks)
            raise
        nbytes = sum(e[2] for e in extents)
        self.stats.bytes_from_disk += nbytes
        self.trace.host_event("read", name, t0, time.perf_counter(), nbytes)

    def _span_end(self, idx):
        start = self._open.pop(idx, None)
        if start is not None:
            kind, name = ("step", "forward") if idx == "step" else ("compute", self.units[idx].name)
            self.mover.span(kind, name, start)

    # -- holding streamed units for a while -----------------------------------------------------
    def hold(self, indices):
        """Give streamed units, and blocks the CPU computes, buffers of their own on the compute device,
        filled once, and run them as resident until ``release_held`` (room a short generate leaves unused)."""
        torch = self.torch
        blocks = [i for i in dict.fromkeys(indices) if i in self.cpu_blocks and i not in self.held]
        if not blocks and not any(i in self.sources and i not in self.large_sources for i in indices):
            return
        self.drain()
        self._use_large(False)      # ``sources``: the streamed units alone
        # once each: a unit that runs twice a pass (tied embedding and lm_head) is in the order twice
        indices = list(dict.fromkeys(i for i in indices if i in self.sources))
        # a unit a staging slot holds is copied from there (on the device, and no drive read); the drain above
        # waited for what brought it
        in_slots = {i: self._kept_slot(i) for i in indices}
        disk = [i for i in indices if self.sources[i].flat is None and in_slots[i] is None]
        inflight = deque()
        try:
            for idx in blocks:
                self._hold_cpu_block(idx)
            for idx in indices:
                if idx not in disk:
                    self._bind_held(idx, self._held_copy(idx, self.sources[idx].flat, in_slots[idx]))
            # Disk units: reads queued several ahead (on CUDA into the idle staging buffers, then
            # one copy each), so the drive stays busy while each lands and is copied.
            landings = [st.flat for st in self.reader.staging] if self.cuda else None
            depth = len(landings) if self.cuda else len(disk)
            started = 0

            def start():
                nonlocal started
                idx = disk[started]
                unit = self.units[idx]
                buf = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
                extents = self.sources[idx].extents
                if self.cuda:
                    landing = landings[started % depth]
                    shift = self.reader.shift(extents, landing)
                    flat = landing[shift:shift + unit.nbytes]
                else:
                    flat = buf
                inflight.append((idx, buf, flat, self.reader.read_now(extents, flat), time.perf_counter()))
                started += 1

            while started < min(depth, len(disk)):
                start()
            while inflight:
                idx, buf, flat, chunks, t0 = inflight.popleft()
                for c in chunks:
                    c.result()
                unit = self.units[idx]
                if self.cuda:
                    buf.copy_(flat[:unit.nbytes])       # synchronous: the landing buffer is free after
                self.stats.bytes_from_disk += unit.nbytes
                self.trace.host_event("read", unit.name + " (held)", t0, time.perf_counter(), unit.nbytes)
                self._bind_held(idx, buf)
                if started < len(disk):
                    start()
        except BaseException:
            for _, _, _, chunks, _ in inflight:     # nothing may land in a buffer after this
                for c in chunks:
                    c.cancel()
                futures_wait(chunks)
            raise
        finally:
            self.schedule.hold(self._held_units())

    def _held_units(self) -> set:
        """The engine units the held ones take out of the stream (a CPU block's pieces with it)."""
        return {k for idx in self.held for k in (idx, *self.pieces_of.get(idx, ()))}

    def _held_copy(self, idx, flat, slot=None):
        """Unit ``idx``'s bytes, in host memory at ``flat`` or in staging ``slot`` (a slot's memory holding
        them, ``_kept_slot``), copied into a buffer of its own on the device."""
        unit = self.units[idx]
        buf = self.torch.empty(unit.nbytes, dtype=self.torch.uint8, device=self.device)
        t0 = time.perf_counter()
        if slot is not None:
            buf.copy_(slot[:unit.nbytes])
            if self.cuda:       # done before any copy into the slot, which waits only for the slot's compute
                self.torch.cuda.current_stream(self.device).synchronize()
            self.stats.kept_units += 1
            self.stats.kept_bytes += unit.nbytes
            return buf
        buf.copy_(flat[:unit.nbytes])
        self.stats.bytes_from_cpu += unit.nbytes
        self.trace.host_event("copy", unit.name + " (held)", t0, time.perf_counter(), unit.nbytes)
        return buf

    def _kept_slot(self, idx):
        """The memory of the staging slot holding unit ``idx``'s bytes whole (Schedule.holder), or None; only once
        what brought them has landed (after a drain)."""
        slot = self.schedule.holder(idx)
        return None if slot is None else self.mover.slots[slot]

    def _hold_cpu_block(self, idx):
        """A CPU block computed on the GPU from a copy there, small steps too, until ``release_held``; its
        sources for large steps (``large_sources``: it, or its pieces) are kept with the copy meanwhile."""
        buf = self._held_copy(idx, self.cpu_blocks[idx])
        streams = {k: self.large_sources.pop(k) for k in (idx, *self.pieces_of.get(idx, ()))
                   if k in self.large_sources}
        self.held[idx] = (streams, buf)
        self._cpu_hooks[idx].hold(buf)

    def _bind_held(self, idx, buf):
        bind(self.params[idx], self.units[idx], buf)
        self.held[idx] = (self.sources.pop(idx), buf)

    def release_held(self):
        """Stream the held units again and free their buffers."""
        if not self.held:
            return
        self.drain()
        self._use_large(False)
        for idx, (src, _buf) in self.held.items():
            if idx in self.cpu_blocks:      # back to the CPU, and to streaming in large steps
                self.large_sources.update(src)
                self._cpu_hooks[idx].hold(None)
                continue
            self.sources[idx] = src
            bind_views(self.params[idx], self._slot_views(idx, 0))
        self.held.clear()
        self.schedule.unhold()
        self.graphs.forget_held()


def _tokens(args, kwargs) -> int:
    """The tokens a forward pass computes (batch x length of its ids or embeddings; 1 where it can't tell)."""
    shape = getattr(given_ids(args, kwargs), "shape", ())
    return int(shape[0] * shape[1]) if len(shape) >= 2 else 1


def _row_major(shape) -> tuple:
    """The strides of a row-major tensor of ``shape``."""
    strides = [1]
    for size in reversed(tuple(shape)[1:]):
        strides.insert(0, strides[0] * size)
    return tuple(strides)
