"""Routed experts: a streamed mixture-of-experts block brings in only the experts its router picks.

transformers 5 keeps a block's routed experts as fused tensors in one experts module (``gate_up_proj``
of shape [experts, 2 x intermediate, hidden], ``down_proj`` of [experts, hidden, intermediate], and
their biases where the model has them), called as ``experts(hidden_states, top_k_index, top_k_weights)``.
One expert's weights are one row of each of those tensors: a byte range of the block's flat layout.

So a streamed block is read without those rows, and the experts module's forward pre-hook, which is
the first to know ``top_k_index``, reads the rows of the experts named there before they compute.
The rows of the experts not routed keep whatever the slot held: every experts implementation
transformers has (eager, batched_mm, grouped_mm) reads only the routed rows.

Applies where the engine streams whole blocks from disk on the CPU device (engine.py); elsewhere MoE
blocks stream whole as before.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass


@dataclass
class RoutedExperts:
    """The routed experts of one streamed block: the experts module, how many experts it has, and each
    fused tensor's place in the block's layout, as (offset, bytes of one expert's row)."""

    module: str
    count: int
    rows: list
    index_at: int = 1       # where ``top_k_index`` comes among the forward's positional arguments

    def ranges(self, experts) -> list:
        """Byte ranges of the block's layout holding ``experts`` (indices), in layout order."""
        return sorted((offset + e * row, offset + (e + 1) * row) for offset, row in self.rows for e in experts)

    def rest(self, params) -> list:
        """Byte ranges of the block's other weights (``params``: the unit's slots), read with the block:
        their bytes only, not the layout's padding, so what a step reads is what ``step_bytes`` counts."""
        fused = {offset for offset, _ in self.rows}
        out = []
        for s in sorted(params, key=lambda s: s.offset):
            if s.offset in fused or not s.nbytes:
                continue
            if out and out[-1][1] == s.offset:
                out[-1] = (out[-1][0], s.offset + s.nbytes)
            else:
                out.append((s.offset, s.offset + s.nbytes))
        return out

    def routed(self, args, kwargs) -> list:
        """The experts a call of the experts module routes to (valid indices, sorted)."""
        index = kwargs.get("top_k_index", args[self.index_at] if len(args) > self.index_at else None)
        if index is None:
            return list(range(self.count))      # can't tell: read them all
        return sorted(e for e in set(index.flatten().tolist()) if 0 <= e < self.count)


def find(model, unit) -> RoutedExperts | None:
    """The routed experts of ``unit``, a block, or None where it has none this can read apart."""
    if unit.kind != "block" or unit.quantized:
        return None
    for name, module in model.get_submodule(unit.modules[0]).named_modules():
        count = getattr(module, "num_experts", None)
        params = _parameters(module)
        if not isinstance(count, int) or count < 2 or "top_k_index" not in params:
            continue
        prefix = f"{unit.modules[0]}.{name}."
        fused = [s for s in unit.params if any(n.startswith(prefix) for n in s.names)]
        rows = []
        for slot in fused:
            if len(slot.names) != 1 or not slot.shape or slot.shape[0] != count or slot.nbytes % count:
                return None     # a tied or odd-shaped weight among them: stream the block whole
            rows.append((slot.offset, slot.nbytes // count))
        return RoutedExperts(prefix[:-1], count, rows, params.index("top_k_index")) if rows else None
    return None


def step_bytes(model, unit, top_k: int) -> int:
    """Bytes a batch-1 decode step reads of ``unit`` when its experts are read as routed (``top_k`` of them):
    every other weight and ``top_k`` rows of each fused tensor; 0 where the unit has no routed experts."""
    found = find(model, unit)
    if found is None:
        return 0
    fused = {offset for offset, _ in found.rows}
    rest = sum(s.nbytes for s in unit.params if s.offset not in fused)
    return rest + min(top_k, found.count) * sum(row for _, row in found.rows)


def _parameters(module) -> tuple:
    try:
        return tuple(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return ()





def placed(extents, ranges) -> list:
    """The extents of the layout's byte ``ranges``, each landing at its own offset in the layout."""
    from .tiers import sub_extents
    return [(path, file_offset, nbytes, flat_offset + start)
            for start, end in ranges for path, file_offset, nbytes, flat_offset in sub_extents(extents, start, end)]
