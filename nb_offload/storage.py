"""Every unit's bytes, on the tier its plan gives: filled at load, moved by re-pinning, freed by unload."""

from __future__ import annotations

import os

from .errors import DiskTierError
from .tiers import OffloadCache, alloc_host, direct_extents, pack, read_extents


class UnitStore:
    """Where one unit is now: ``flat`` (device or host buffer) or ``extents`` on disk."""

    __slots__ = ("tier", "flat", "extents")

    def __init__(self, tier, flat=None, extents=None):
        self.tier, self.flat, self.extents = tier, flat, extents


class Storage:
    def __init__(self, inspection, device, disk):
        self.insp = inspection
        self.device = device
        self.cuda = device.type == "cuda"
        self.stores: dict[int, UnitStore] = {}
        self.cache = None
        if disk is not None:
            from .tiers import OffloadCache
            fp = OffloadCache.fingerprint_of(inspection.checkpoint, inspection.dtype, None, inspection.units)
            self.cache = OffloadCache(os.fspath(disk), fp)

    # -- reading units from the checkpoint -----------------------------------------------------
    def read_tensors(self, unit) -> dict:
        """A unit's parameters as CPU tensors in their target dtype (through transformers' key
        conversions, e.g. per-expert weights fused into one tensor, when the checkpoint needs them)."""
        ckpt = self.insp.checkpoint
        converted = any(k not in {n for s in unit.params for n in s.names} for k in unit.checkpoint_keys)
        if not converted:
            out = {}
            for slot in unit.params:
                key = next(n for n in slot.names if n in ckpt.tensors)
                out[slot.names[0]] = ckpt.get(key).to(slot.dtype)
            return out
        return self._read_converted(unit)

    def _read_converted(self, unit):
        import torch
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from .loader import _quiet_transformers
        ckpt = self.insp.checkpoint
        meta = self.insp.meta
        state = {k: ckpt.get_slice(k) for k in unit.checkpoint_keys}
        cfg = LoadStateDictConfig(device_map={"": "cpu"}, dtype=self.insp.dtype,
                                  weight_mapping=self.insp.conversions)
        with _quiet_transformers():
            convert_and_load_state_dict_in_model(meta, state, cfg)
        out = {}
        for slot in unit.params:
            name = slot.names[0]
            mod_name, _, attr = name.rpartition(".")
            module = meta.get_submodule(mod_name)
            out[name] = module._parameters[attr].data
            # back to meta, so the meta model never holds weights
            empty = torch.nn.Parameter(torch.empty(slot.shape, dtype=slot.dtype, device="meta"), requires_grad=False)
            for alias in slot.names:
                m, _, a = alias.rpartition(".")
                meta.get_submodule(m)._parameters[a] = empty
        return out

    def host_copy(self, unit):
        """A unit's flat bytes in (pageable) host memory, from wherever it is now or from the checkpoint."""
        import torch
        store = self.stores.get(unit.index)
        if store is not None and store.flat is not None:
            return store.flat.cpu() if store.flat.device.type != "cpu" else store.flat
        flat = torch.empty(unit.nbytes, dtype=torch.uint8)
        if store is not None and store.extents is not None:
            read_extents(store.extents, flat)
        elif unit.direct:
            read_extents(direct_extents(unit, self.insp.checkpoint), flat)
        else:
            pack(unit, self.read_tensors(unit), flat)
        return flat

    # -- placing units ---------------------------------------------------------------------------
    def place(self, unit, tier, resident_tier) -> UnitStore:
        """A new store for ``unit`` on ``tier`` (the old one, if any, is left untouched)."""
        import torch
        if tier == resident_tier and self.cuda:
            flat = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
            flat.copy_(self.host_copy(unit))
            return UnitStore(tier, flat=flat)
        if tier in ("cpu",):
            flat = alloc_host(unit.nbytes, pinned=self.cuda)
            old = self.stores.get(unit.index)
            if old is None and unit.direct:
                read_extents(direct_extents(unit, self.insp.checkpoint), flat)
            else:
                flat.copy_(self.host_copy(unit))
            return UnitStore(tier, flat=flat)
        if tier == "disk":
            if self.cache is None:
                raise DiskTierError(f"{unit.name!r} can't go to disk: no disk folder was given at load.")
            if unit.direct:
                return UnitStore(tier, extents=direct_extents(unit, self.insp.checkpoint))
            if not self.cache.has(unit):
                self.cache.write(unit, self.host_copy(unit))
            return UnitStore(tier, extents=self.cache.extents(unit))
        raise ValueError(tier)

    def materialize(self, plan, progress=True):
        """Fill every unit's store per ``plan``, one unit at a time."""
        if self.cache is not None:
            need = sum(u.nbytes for u in self.insp.units
                       if plan.entries[u.index].tier == "disk" and not u.direct)
            self.cache.prepare(need)
        units = self.insp.units
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=sum(u.nbytes for u in units), unit="B", unit_scale=True,
                       desc=f"nb_offload: loading {os.path.basename(self.insp.name.rstrip('/')) or 'model'}")
        try:
            for u in units:
                self.stores[u.index] = self.place(u, plan.entries[u.index].tier, plan.resident_tier)
                if bar is not None:
                    bar.set_postfix_str(f"{u.name} -> {plan.entries[u.index].tier}", refresh=False)
                    bar.update(u.nbytes)
        finally:
            if bar is not None:
                bar.close()

    def migrate(self, new_plan):
        """Move units whose tier changed; all new stores are made before any old one is dropped."""
        fresh = {}
        for u in self.insp.units:
            tier = new_plan.entries[u.index].tier
            if self.stores[u.index].tier != tier:
                fresh[u.index] = self.place(u, tier, new_plan.resident_tier)
        moved = {i: (self.stores[i].tier, fresh[i].tier) for i in fresh}
        self.stores.update(fresh)
        return moved

    def abort(self):
        """Undo a failed load: free buffers and remove any cache folder this load created."""
        self.release()
        if self.cache is not None:
            self.cache.discard_new()

    def release(self):
        self.stores.clear()
        self.insp.checkpoint.close()
