"""Hooks: the one part of the engine that touches ``nn.Module``.

Each streamed unit's modules get a forward pre-hook and a forward hook that tell the engine the
unit is about to compute and has finished; parameters are bound to views of whatever buffer
holds the unit's bytes at that moment (a staging slot, a held buffer, a resident buffer) by
swapping ``Parameter.data``, so the model's own forward code runs unchanged.
"""

from __future__ import annotations

from .quant import QuantBinding
from .tiers import param_views


class ModuleHooks:
    """Forward pre/post hooks on units' modules, calling ``enter(unit index)`` and ``exit(unit index)``."""

    def __init__(self, root):
        self.root = root
        self._handles = []

    def install(self, unit, enter, exit):
        idx = unit.index

        def pre(module, args):
            enter(idx)

        def post(module, args, output):
            exit(idx)
        for name in unit.modules:
            module = self.root.get_submodule(name) if name else self.root
            self._handles.append(module.register_forward_pre_hook(pre))
            self._handles.append(module.register_forward_hook(post))

    def around(self, name, before, after):
        """``before(args, kwargs)`` returns the (args, kwargs) module ``name``'s forward is called with, and
        ``after(output)`` what the call returns; ``after`` runs where the forward raised too (``output`` None)."""
        module = self.root.get_submodule(name) if name else self.root
        self._handles.append(module.register_forward_pre_hook(lambda m, args, kwargs: before(args, kwargs),
                                                              with_kwargs=True))
        self._handles.append(module.register_forward_hook(lambda m, args, output: after(output), always_call=True))

    def rewrite_call(self, name, fn):
        """``fn(args, kwargs)`` returns the (args, kwargs) module ``name``'s forward is called with."""
        module = self.root.get_submodule(name) if name else self.root
        self._handles.append(module.register_forward_pre_hook(lambda m, args, kwargs: fn(args, kwargs),
                                                              with_kwargs=True))

    def before_call(self, name, fn):
        """Call ``fn(args, kwargs)`` before module ``name``'s forward runs (it sees the call's arguments)."""
        def pre(module, args, kwargs):
            fn(args, kwargs)
        self._handles.append(self.root.get_submodule(name).register_forward_pre_hook(pre, with_kwargs=True))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def bind(params, unit, flat):
    """Point each of ``unit``'s parameters at its view inside ``flat`` (shapes and dtypes from the layout)."""
    bind_views(params, param_views(unit, flat))


def bind_views(params, views):
    for p, v in zip(params, views):
        if type(v) is QuantBinding:
            v.bind_to(p)
        else:
            p.data = v


def to_device(obj, device, non_blocking: bool = True):
    """Move tensors in (nested) args to ``device``, as callers pass CPU inputs to the compute device.
    ``non_blocking=False`` for copies to the CPU that are read at once (an asynchronous one isn't there yet)."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking) if obj.device != device else obj
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, non_blocking) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, non_blocking) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj
