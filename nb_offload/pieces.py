"""Pieces: how a streamed block travels, a submodule at a time.

A block's forward runs its submodules one after another (attention, then the MLP's
projections), and each needs only its own weights while it runs. Streaming a block as pieces,
each bound to a staging slot only while its submodule runs, lets a slot hold the largest piece
instead of the whole block: for a LLaMA-7B block 128 MiB (the attention) instead of 386 MiB.
The GPU room saved keeps more blocks resident. The block's small leftovers (norms, and any
parameter outside the chosen submodules) stay on the compute device while the block streams.
A MoE block whose routed experts come apart (experts.py) streams its experts module alone: all
the rest is left over, since every token uses it (``split_unit``'s ``only``).

A submodule becomes a piece when its parameters are its own (no tied weight shared with a
sibling) and lie together in the block's byte layout; a submodule larger than ``LARGEST`` of
the block that owns no parameters directly is split into its children in turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .units import ParamSlot, round_up

LARGEST = 1 / 3       # split a submodule holding more than this share of its block
SMALLEST = 1 / 64     # a submodule under this share stays with the leftovers


@dataclass
class Piece:
    module: str                    # the submodule whose forward needs these bytes
    start: int                     # byte range in the block's flat layout
    end: int
    params: list[ParamSlot] = field(default_factory=list)   # offsets relative to ``start``

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def split_unit(model, unit, only: str = "") -> None:
    """Give a block unit its pieces and leftovers (leaves the unit whole where it can't split). With
    ``only`` (a submodule's name), that submodule is the one piece and everything else is left over: a MoE
    block's routed experts (experts.py), whose other weights every token uses, so that a byte of them kept
    on the device saves a byte a step, against a quarter of one for a kept expert of Mixtral's 2 of 8."""
    unit.pieces, unit.rest, unit.rest_from, unit.rest_nbytes = [], [], [], 0
    if unit.kind != "block" or len(unit.modules) != 1 or not unit.nbytes:
        return
    root = unit.modules[0]
    block = model.get_submodule(root)
    slots_under = {}

    def owned(prefix):
        """The unit's slots all of whose names lie under module ``prefix``."""
        if prefix not in slots_under:
            slots_under[prefix] = [s for s in unit.params if all(n.startswith(prefix + ".") for n in s.names)]
        return slots_under[prefix]

    def size(slots):
        return sum(s.nbytes for s in slots)

    def contiguous(slots):
        """The slots fill one byte range of the layout, with no other slot inside it."""
        if not slots:
            return False
        lo = min(s.offset for s in slots)
        hi = max(s.offset + s.nbytes for s in slots)
        inside = [s for s in unit.params if s.offset >= lo and s.offset + s.nbytes <= hi]
        return len(inside) == len(slots)

    chosen = []
    todo = [(f"{root}.{name}", child) for name, child in block.named_children()]
    if only:
        slots = owned(only)
        chosen, todo = ([(only, slots)] if contiguous(slots) and size(slots) < unit.nbytes else []), []
    while todo:
        name, module = todo.pop(0)
        slots = owned(name)
        share = size(slots) / unit.nbytes
        if share < SMALLEST:
            continue
        children = [(f"{name}.{n}", c) for n, c in module.named_children() if owned(f"{name}.{n}")]
        own_params = any(True for _ in module.parameters(recurse=False))
        if share > LARGEST and len(children) >= 2 and not own_params:
            todo[:0] = children
            continue
        if contiguous(slots):
            chosen.append((name, slots))
    if len(chosen) < (1 if only else 2):
        return
    in_pieces = {id(s) for _, slots in chosen for s in slots}
    for name, slots in chosen:
        start = min(s.offset for s in slots)
        end = max(s.offset + s.nbytes for s in slots)
        end = round_up(end)
        params = [replace(s, offset=s.offset - start) for s in sorted(slots, key=lambda s: s.offset)]
        unit.pieces.append(Piece(module=name, start=start, end=min(end, unit.nbytes), params=params))
    unit.pieces.sort(key=lambda pc: pc.start)
    offset = 0
    for s in unit.params:
        if id(s) not in in_pieces:
            unit.rest.append(replace(s, offset=offset))
            unit.rest_from.append(s.offset)
            offset += round_up(s.nbytes)
    unit.rest_nbytes = offset
