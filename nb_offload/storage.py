"""Every unit's bytes, on the tier its plan gives: filled at load, moved by re-pinning, freed by unload."""

from __future__ import annotations

import os
import time

from .budget import trim_heap
from .cache import OffloadCache
from .errors import CheckpointError, DiskTierError
from .ingest import Ingest, keys_are_params, readable
from .tiers import Source, alloc_host, direct_extents, lock_host, pack, param_views, read_extents, release_host


def _source_shape(slot) -> tuple:
    """The shape a parameter has in the checkpoint (a quantized one's before quantizing)."""
    return tuple(slot.shape) if slot.quant is None else slot.quant.source_shape


def _quant_key(inspection, device):
    """What makes quantized bytes differ: the quantization, bitsandbytes' version, where it ran."""
    if inspection.quant is None:
        return None
    from .quant import require_bitsandbytes
    packed = any(s.quant.cpu_packed for u in inspection.units for s in u.params if s.quant is not None)
    return f"{inspection.quant.key()},bnb={require_bitsandbytes().__version__},{device.type},packed={packed}"


class Storage:
    def __init__(self, inspection, device, disk, *, read_threads=4, host_budget=None):
        self.insp = inspection
        self.device = device
        self.cuda = device.type == "cuda"
        self.stores: dict[int, Source] = {}     # unit index -> where its bytes are now
        self.read_threads = read_threads
        self.host_budget = host_budget       # the cpu budget, which the load's temporaries take a share of
        self.cache = None
        self.seconds = self.lock_seconds = 0.0       # the last materialize: all of it, and page-locking
        if disk is not None:
            fp = OffloadCache.fingerprint_of(inspection.checkpoint, inspection.dtype, _quant_key(inspection, device),
                                             inspection.units)
            self.cache = OffloadCache(os.fspath(disk), fp)

    # -- reading units from the checkpoint -----------------------------------------------------
    def _read_converted(self, unit):
        """A unit's parameters through transformers' key conversions (e.g. per-expert weights fused
        into one tensor), as CPU tensors in their target dtype."""
        import torch
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        from .units import quiet_transformers
        ckpt = self.insp.checkpoint
        meta = self.insp.meta
        state = {k: ckpt.get_slice(k) for k in unit.checkpoint_keys}
        cfg = LoadStateDictConfig(device_map={"": "cpu"}, dtype=self.insp.dtype,
                                  weight_mapping=self.insp.conversions)
        out = {}
        try:
            with quiet_transformers():
                convert_and_load_state_dict_in_model(meta, state, cfg)
            for slot in unit.params:
                mod_name, _, attr = slot.names[0].rpartition(".")
                out[slot.names[0]] = meta.get_submodule(mod_name)._parameters[attr].data
        except (RuntimeError, ValueError, KeyError) as exc:   # the checkpoint's tensors don't fit together
            raise CheckpointError(f"checkpoint tensors {sorted(unit.checkpoint_keys)[:4]} in {ckpt.folder!r} can't be "
                                  f"converted to {unit.name!r}'s weights ({exc}).") from exc
        finally:
            for slot in unit.params:     # back to meta, so the meta model never holds weights
                empty = torch.nn.Parameter(torch.empty(_source_shape(slot), dtype=slot.dtype, device="meta"),
                                           requires_grad=False)
                for alias in slot.names:
                    m, _, a = alias.rpartition(".")
                    meta.get_submodule(m)._parameters[a] = empty
        for slot in unit.params:
            got = out[slot.names[0]]
            if got.is_meta or tuple(got.shape) != _source_shape(slot):
                raise CheckpointError(
                    f"checkpoint tensors {sorted(unit.checkpoint_keys)[:4]} in {ckpt.folder!r} convert to "
                    f"{slot.names[0]!r} of shape {list(got.shape)}, but the model built from config.json expects "
                    f"{list(_source_shape(slot))}; is config.json from the same model as the weights?")
        return out

    def fill(self, unit, flat):
        """Write a unit's bytes into ``flat`` (host or device) from wherever they are now, or from the
        checkpoint, converting the dtype on the way: a unit never exists twice in host memory on its
        way to its tier (transformers' key conversions, which build whole fused tensors, excepted)."""
        store = self.stores.get(unit.index)
        if store is not None and store.flat is not None:
            flat.copy_(store.flat)
            return
        if store is not None:       # on disk: in the offload cache, or the checkpoint's own files
            if flat.device.type == "cpu":
                read_extents(store.extents, flat)
            else:           # one read at the drive's pace, then one copy
                flat.copy_(self._host_copy_of(unit))
            return
        ckpt = self.insp.checkpoint
        if unit.quantized:
            self._fill_quantized(unit, flat)
        elif readable(unit, ckpt):
            ingest = self._ingest()
            ingest.add(unit, flat)
            ingest.run()
        elif not ckpt.is_pickle:
            pack(unit, self._read_converted(unit), flat)
        else:
            for slot, view in zip(unit.params, param_views(unit, flat)):
                view.copy_(ckpt.get(next(n for n in slot.names if n in ckpt.tensors)))

    def _fill_quantized(self, unit, flat):
        """Quantize a unit's weights on the compute device, one tensor at a time, into ``flat`` (quant.py);
        its other parameters are copied in the load dtype."""
        from .quant import load_saved_into, quantize_into
        ckpt = self.insp.checkpoint
        converted = None
        if not ckpt.is_pickle and not keys_are_params(unit):
            converted = self._read_converted(unit)      # e.g. fused experts beside quantized attention
        for slot in unit.params:
            if slot.quant is not None and self.insp.saved_quant is not None:
                key = next(n for n in slot.names if n in ckpt.tensors)
                load_saved_into(slot.quant, key, ckpt, flat[slot.offset:slot.offset + slot.nbytes], self.device)
                continue
            if converted is not None:
                tensor = converted[slot.names[0]]
            else:
                tensor = ckpt.get(next(n for n in slot.names if n in ckpt.tensors))
            dest = flat[slot.offset:slot.offset + slot.nbytes]
            if slot.quant is None:
                dest.view(slot.dtype).view(slot.shape).copy_(tensor)
            else:       # in the load dtype first, as transformers materializes it before quantizing
                quantize_into(slot.quant, tensor.to(self.insp.dtype), dest, self.device)

    def _ingest(self) -> Ingest:
        return Ingest(self.insp.checkpoint, threads=self.read_threads, lock=lock_host if self.cuda else None,
                      device=self.device if self.cuda else None, host_budget=self.host_budget)

    def _host_copy_of(self, unit):
        import torch
        host = torch.empty(unit.nbytes, dtype=torch.uint8)
        self.fill(unit, host)
        return host

    # -- placing units ---------------------------------------------------------------------------
    def place(self, unit, tier, resident_tier) -> Source:
        """A new store for ``unit`` on ``tier`` (the old one, if any, is left untouched)."""
        if tier in ("gpu", "cpu"):
            flat = self._buffer(unit, tier, resident_tier)
            try:
                self.fill(unit, flat)
            except BaseException:
                release_host(flat)
                raise
            lock_host(flat)
            return Source(tier, flat=flat)
        if tier == "disk":
            if self.cache is None:
                raise DiskTierError(f"{unit.name!r} can't go to disk: no disk folder was given at load.")
            if unit.direct:
                return Source(tier, extents=direct_extents(unit, self.insp.checkpoint))
            if not self.cache.has(unit):
                self.cache.write(unit, self._host_copy_of(unit))
            return Source(tier, extents=self.cache.extents(unit))
        raise ValueError(tier)

    def _buffer(self, unit, tier, resident_tier):
        """An empty buffer for ``unit`` on ``tier``: on the GPU, or in host memory (page-locked where a GPU
        computes, once filled: ``lock_host``)."""
        import torch
        if tier == resident_tier and self.cuda:
            return torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
        return alloc_host(unit.nbytes, pinned=self.cuda, lock=False)

    def materialize(self, plan, progress=True):
        """Fill every unit's store per ``plan``: the units on the GPU and host tiers read in parallel
        (ingest.py), then the rest (offload-cache writes, key conversions) one at a time."""
        units = self.insp.units
        self._prepare_cache([u for u in units if plan.entries[u.index].tier == "disk"])
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=sum(u.nbytes for u in units), unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"nb_offload: loading {os.path.basename(self.insp.name.rstrip('/')) or 'model'}")
        t0 = time.perf_counter()
        ingest = self._ingest()
        later = []
        try:
            for u in units:
                tier = plan.entries[u.index].tier
                if tier == "disk" or not readable(u, self.insp.checkpoint):
                    later.append((u, tier))
                    continue
                flat = self._buffer(u, tier, plan.resident_tier)
                self.stores[u.index] = Source(tier, flat=flat)
                ingest.add(u, flat)
            ingest.run(on_bytes=bar.update if bar is not None else None)
            for u, tier in later:
                self.stores[u.index] = self.place(u, tier, plan.resident_tier)
                if bar is not None:
                    bar.update(u.nbytes)
        finally:
            if bar is not None:
                bar.close()
            self._settle()
        self.seconds = time.perf_counter() - t0
        self.lock_seconds = ingest.lock_seconds

    def _prepare_cache(self, to_disk):
        """Ready the offload cache for the units about to go to disk, all at once: create or check its
        folder, verify the files already there, check the drive has room for the rest."""
        if self.cache is not None:
            self.cache.prepare([u for u in to_disk if not u.direct], threads=self.read_threads)

    def _settle(self):
        """After filling stores: note the cache files checked, unmap the checkpoint and give freed
        heap pages back."""
        if self.cache is not None:
            self.cache.save_stamps()
        self.insp.checkpoint.drop_handles()
        trim_heap()

    def migrate(self, new_plan):
        """Move units whose tier changed; all new stores are made before any old one is dropped."""
        fresh = {}
        try:
            self._prepare_cache([u for u in self.insp.units if new_plan.entries[u.index].tier == "disk"
                                 and self.stores[u.index].tier != "disk"])
            for u in self.insp.units:
                tier = new_plan.entries[u.index].tier
                if self.stores[u.index].tier != tier:
                    fresh[u.index] = self.place(u, tier, new_plan.resident_tier)
        except BaseException:
            for store in fresh.values():
                release_host(store.flat)
            raise
        finally:
            self._settle()
        moved = {i: (self.stores[i].tier, fresh[i].tier) for i in fresh}
        for i in fresh:         # the engine that read the old stores has stopped
            release_host(self.stores[i].flat)
        self.stores.update(fresh)
        return moved

    def abort(self):
        """Undo a failed load: remove what it wrote to the offload cache (cache.py says what stays
        when another process shares the folder), and free buffers."""
        if self.cache is not None:
            self.cache.discard_new()
        self.release()

    def release(self):
        for store in self.stores.values():
            release_host(store.flat)
        self.stores.clear()
        self.insp.checkpoint.close()
        if self.cache is not None:
            self.cache.release()
