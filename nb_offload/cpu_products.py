"""The CPU's batch-1 products for the blocks it computes (hybrid.py), from copies of their weights reordered
for oneDNN's kernel.

torch's ``F.linear`` at one row on a CPU with AMX or AVX-512 BF16 runs oneDNN's matmul on the weights as they are
stored ([out, in]): each call gathers the weights into the layout its kernel multiplies from, a block of rows at
a time, reading dozens of rows side by side. A copy reordered once into that layout
(``torch.ops.mkldnn._reorder_linear_weight``, as torch.compile's CPU backend does for frozen weights) is read
front to back instead. A CPU block's tokens must still be those of ``F.linear``: the reordered kernel sums in
the same order for some shapes and not for others (on an AMX CPU, 2026-12-04: the same where a product has up to
4,096 inputs, not for LLaMA-7B's down projection with 11,008), and which ones may differ with the CPU and the
thread count. So each shape is checked at load, on this CPU with the threads the blocks compute with
(``matches``), and only the linears whose shape passed are reordered; the others compute with ``F.linear``.

The copies cost host memory beside the block's own bytes (which a prefill still streams to the GPU): they are
made only in the room the cpu budget leaves past the plan (``PackedLinears``'s ``room``), and
``pack_cpu_weights=False`` makes none.
"""

from __future__ import annotations

# The dtypes whose reordered products have matched F.linear: bf16 (fp16's and fp32's differ in the last bit
# on the same CPU: other kernels).
PACKED_DTYPES = ("bfloat16",)

# Exponents of the big values that cancel in the check's rows (``_check_weights``): about 2**21 times the small
# values, so that each small one added while a big one is in the sum loses a few of its low bits to rounding, and
# which bits depends on the order of the additions; far larger, the small ones vanish in any order.
CHECK_EXPONENTS = (19, 21, 23)
CHECK_INPUTS = 3

_checked = {}       # (out, in, dtype, bias, threads) -> whether the reordered product matched F.linear


def available(torch) -> bool:
    """Whether this torch can reorder weights for oneDNN and multiply with them."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def reorder(torch, weight):
    """``weight`` ([out, in]) copied into the layout oneDNN's one-row product reads (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def product(torch, x, packed, bias, out_features: int):
    """``x`` (one row, any leading shape) times the reordered weights, plus ``bias``."""
    rows = x.reshape(1, x.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "").view(*x.shape[:-1], out_features)


def _check_weights(torch, out_features: int, in_features: int, dtype, generator):
    """Weights whose one-row products show the order their sums are taken in: each row is random numbers plus
    a big value (2**e, e from CHECK_EXPONENTS by row) in the first quarter of its inputs and its negative in the
    last quarter. Where the input is the same at both (``_check_inputs``) the two cancel, and what is left is
    the small values with the low bits that rounding took from those added while the big one was in the sum:
    other bits in another order of additions, or in partial sums of other groups. So the rows' results differ
    where two kernels' orders do (in most rows, on an AMX CPU), where random weights alone show it in one output
    of thousands, or in none."""
    weights = torch.empty(out_features, in_features, dtype=torch.float32).normal_(generator=generator)
    rows = torch.arange(out_features)
    quarter = max(1, in_features // 4)
    first = torch.randint(0, quarter, (out_features,), generator=generator)
    last = torch.randint(in_features - quarter, in_features, (out_features,), generator=generator)
    big = torch.tensor([2.0 ** e for e in CHECK_EXPONENTS])[rows % len(CHECK_EXPONENTS)]
    weights[rows, first] = big
    weights[rows, last] = -big       # where both fell on one place (one input): that big value, no cancelling
    return weights.to(dtype)


def _check_inputs(torch, in_features: int, dtype, generator):
    """CHECK_INPUTS one-row inputs for ``_check_weights``: ones in the first and last quarters (where the big
    values are, so they cancel), and in the middle ones, then random numbers."""
    quarter = max(1, in_features // 4)
    for k in range(CHECK_INPUTS):
        x = torch.ones(1, 1, in_features)
        if k:
            x[..., quarter:in_features - quarter] = torch.empty(in_features - 2 * quarter).normal_(generator=generator)
        yield x.to(dtype)


def matches(torch, out_features: int, in_features: int, dtype, bias: bool, threads: int) -> bool:
    """Whether the reordered one-row product of this shape equals ``F.linear``'s to the bit, with ``threads``
    torch threads (the caller's restored after), on CHECK_INPUTS inputs over weights that show the order of the
    sums (``_check_weights``). A check, not a proof: a kernel whose order differs only where these weights
    don't show it would pass. Remembered per shape for the process."""
    key = (out_features, in_features, str(dtype), bias, threads)
    if key in _checked:
        return _checked[key]
    import torch.nn.functional as F
    generator = torch.Generator().manual_seed(out_features * 131 + in_features)
    caller = torch.get_num_threads()
    same = False
    try:
        with torch.inference_mode():
            torch.set_num_threads(threads)
            weights = _check_weights(torch, out_features, in_features, dtype, generator)
            offsets = torch.empty(out_features).normal_(generator=generator).to(dtype) if bias else None
            packed = reorder(torch, weights)
            same = True
            for x in _check_inputs(torch, in_features, dtype, generator):
                if not torch.equal(product(torch, x, packed, offsets, out_features), F.linear(x, weights, offsets)):
                    same = False
                    break
    except RuntimeError:        # a torch or CPU without these kernels for the dtype
        same = False
    finally:
        torch.set_num_threads(caller)
    _checked[key] = same
    return same


class PackedLinears:
    """The linears of one CPU-computed block (``module``) whose one-row products on the CPU read reordered copies
    of their weights: those in PACKED_DTYPES whose shape ``matches`` at ``threads``, while ``room`` (bytes, None
    for no limit) lasts. ``install`` gives each a forward that takes the copy for one row of input in host memory
    while its weight is still the one copied (bound to the block's host memory); any other call (a prefill, the
    block held on the GPU) is the linear's own. ``remove`` puts the linears' own forwards back."""

    def __init__(self, torch, module, threads: int, room: int | None = None):
        self.torch = torch
        self.linears = []       # (linear, its copy, the address of the weight copied)
        self.bytes = 0          # host memory the copies take
        self.skipped = 0        # linears of a packable dtype left to F.linear: shape unmatched, or no room
        if not available(torch):
            return
        for linear in module.modules():
            weight = getattr(linear, "weight", None)
            if not (isinstance(linear, torch.nn.Linear) and type(weight) in (torch.Tensor, torch.nn.Parameter)
                    and weight.dim() == 2 and weight.device.type == "cpu"
                    and str(weight.dtype).removeprefix("torch.") in PACKED_DTYPES):
                continue
            nbytes = weight.numel() * weight.element_size()
            out_features, in_features = weight.shape
            if (room is not None and self.bytes + nbytes > room) or not matches(
                    torch, out_features, in_features, weight.dtype, linear.bias is not None, threads):
                self.skipped += 1
                continue
            self.linears.append((linear, reorder(torch, weight), weight.data_ptr()))
            self.bytes += nbytes

    def install(self):
        torch = self.torch
        for linear, packed, home in self.linears:
            own = type(linear).forward.__get__(linear)
            out_features, in_features = linear.weight.shape

            def forward(x, linear=linear, packed=packed, home=home, own=own, n=out_features, k=in_features):
                weight = linear.weight
                if x.device.type == "cpu" and x.numel() == k and x.dtype == weight.dtype \
                        and weight.data_ptr() == home:
                    return product(torch, x, packed, linear.bias, n)
                return own(x)
            linear.forward = forward

    def remove(self):
        for linear, _, _ in self.linears:
            vars(linear).pop("forward", None)
        self.linears = []
