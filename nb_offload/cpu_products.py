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

The copies cost host memory beside the block's own bytes (which a prefill still streams to the GPU): a plan
that takes them reserves it (``reordered_bytes``; the loader), and ``pack_cpu_weights=False`` makes none.
"""

from __future__ import annotations

# The dtypes whose reordered products have matched F.linear: bf16 (fp16's and fp32's differ in the last bit
# on the same CPU: other kernels; the check's big values would also overflow fp16).
PACKED_DTYPES = ("bfloat16",)

# Exponents of the big weights the check's inputs cancel (``_check_weights``): their last bit in fp32 is
# 2**(e-23), from 1/32 to 2 here, about the size of one product of the small weights and inputs, so each one
# added while a big one is in the sum loses a part of itself to rounding that depends on the order of the
# additions; the rows take them in turn, so some rows round finely and some coarsely.
CHECK_EXPONENTS = (18, 19, 20, 21, 22, 23, 24)
# Linears with fewer outputs than this are left to F.linear: they are small (a router), and give the check few
# rows to see a difference in.
FEWEST_OUTPUTS = 64

_checked = {}       # (out, in, dtype, bias, threads) -> whether the reordered product matched F.linear
_reference = None   # the product the check compares with: F.linear (a test may stand another in)


def available(torch) -> bool:
    """Whether this torch can reorder weights for oneDNN and multiply with them."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def packable(dtype) -> bool:
    """Whether weights of ``dtype`` may take reordered copies (PACKED_DTYPES)."""
    return str(dtype).removeprefix("torch.") in PACKED_DTYPES


def reorder(torch, weight):
    """``weight`` ([out, in]) copied into the layout oneDNN's one-row product reads (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def product(torch, x, packed, bias, out_features: int):
    """``x`` (one contiguous row, any leading shape) times the reordered weights, plus ``bias``."""
    rows = x.reshape(1, x.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "").view(*x.shape[:-1], out_features)


def _pairs(in_features: int) -> list:
    """The input positions the check's big weights stand at, in pairs mirrored about the middle: the first and
    the last, and where there is room one a third of the way in and its mirror."""
    if in_features < 2:
        return []
    pairs = [(0, in_features - 1)]
    if in_features >= 6:
        pairs.append((in_features // 3, in_features - 1 - in_features // 3))
    return pairs


def _check_weights(torch, out_features: int, in_features: int, dtype, generator):
    """Weights whose one-row products show the order their sums are taken in, and a bias for them: each row
    mirrored about its middle (w[k-1-j] = w[j]), random numbers but at ``_pairs``, where it holds a big value
    (a power of two from CHECK_EXPONENTS, by row, either sign). An input mirrored with its sign turned
    (``_check_inputs``) makes every product cancel with its mirror's, so the exact sum is 0 and what a kernel
    returns is only what rounding took from the values it added while a big one was in the sum: a few multiples
    of the big value's last bit, which bf16 holds exactly. Another order of additions, or partial sums of other
    groups, round other bits away, and the rows' results differ, where random data show it in one output of
    thousands, or in none. The bias is a few of those last bits too, so adding it before or after rounding shows
    as well."""
    # made in ``dtype`` from the start: a 70B block's widest check takes 470 MB so, where fp32 would take 940
    half = torch.empty(out_features, in_features // 2 + 1, dtype=dtype).normal_(generator=generator)
    weights = torch.cat([half[:, :in_features - in_features // 2], half[:, :in_features // 2].flip(1)], dim=1)
    exponents = torch.tensor(CHECK_EXPONENTS, dtype=torch.float32)[torch.arange(out_features) % len(CHECK_EXPONENTS)]
    signs = torch.randint(0, 2, (out_features,), generator=generator).float() * 2 - 1
    for first, last in _pairs(in_features):
        weights[:, first] = weights[:, last] = (signs * 2.0 ** exponents).to(dtype)     # powers of two: exact
    bias = torch.randint(-8, 9, (out_features,), generator=generator).float() * 2.0 ** (exponents - 24)
    return weights, bias.to(dtype)


def _check_inputs(torch, in_features: int, dtype, generator):
    """The check's one-row inputs: random numbers mirrored with the sign turned (x[k-1-j] = -x[j]; the middle one,
    where ``in_features`` is odd, 0), for each pair of ``_pairs`` one with 1 and -1 there and 0 at the other pairs
    (whose big weights would swamp the sum); last, random numbers not mirrored, with 0 at every pair."""
    pairs = _pairs(in_features)
    for k in range(len(pairs) + 1):
        x = torch.empty(1, 1, in_features).normal_(generator=generator)
        if k < len(pairs):
            x[..., in_features - in_features // 2:] = -x[..., :in_features // 2].flip(-1)
            if in_features % 2:
                x[..., in_features // 2] = 0.0
        for j, (first, last) in enumerate(pairs):
            x[..., first], x[..., last] = (1.0, -1.0) if j == k else (0.0, 0.0)
        yield x.to(dtype)


def matches(torch, out_features: int, in_features: int, dtype, bias: bool, threads: int) -> bool:
    """Whether the reordered one-row product of this shape equals ``F.linear``'s to the bit, both with
    ``threads`` torch threads (``first_as_linear``'s check). Remembered per shape for the process."""
    key = (out_features, in_features, str(dtype), bias, threads)
    if key not in _checked:
        def reordered(weights):
            packed = reorder(torch, weights)
            return lambda x, offsets: product(torch, x, packed, offsets, out_features)
        _checked[key] = first_as_linear(torch, out_features, in_features, dtype, bias, threads, [reordered]) == 0
    return _checked[key]


def first_as_linear(torch, out_features: int, in_features: int, dtype, bias: bool, threads: int,
                    kernels: list) -> int | None:
    """The index of the first of ``kernels`` whose one-row products of this shape equal ``F.linear``'s to the
    bit, both with ``threads`` torch threads (the caller's restored after), on the inputs of ``_check_inputs``
    over weights that show the order of the sums (``_check_weights``); None where none does, or where one
    raises RuntimeError (a torch or CPU without such kernels for the dtype). A kernel is called with the check's
    weights and returns the product of a row with them and a bias (None where ``bias`` is False). A check, not a
    proof: a kernel whose order differs only where these weights don't show it would pass."""
    import torch.nn.functional as F
    reference = _reference or F.linear
    generator = torch.Generator().manual_seed(out_features * 131 + in_features)
    caller = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(threads)
            weights, offsets = _check_weights(torch, out_features, in_features, dtype, generator)
            offsets = offsets if bias else None
            checks = [(x, reference(x, weights, offsets)) for x in _check_inputs(torch, in_features, dtype, generator)]
            for index, kernel in enumerate(kernels):
                multiply = kernel(weights)
                if all(torch.equal(multiply(x, offsets), want) for x, want in checks):
                    return index
    except RuntimeError:
        pass
    finally:
        torch.set_num_threads(caller)
    return None


def candidates(torch, module, dtype) -> list:
    """The linears of ``module`` whose one-row products may take reordered weights: plain ``nn.Linear``s (a
    subclass's own forward may compute otherwise) with 2-D weights of ``dtype``, in PACKED_DTYPES, and at least
    FEWEST_OUTPUTS outputs."""
    if not packable(dtype):
        return []
    return [m for m in module.modules()
            if type(m).forward is torch.nn.Linear.forward and isinstance(m, torch.nn.Linear)
            and type(m.weight) in (torch.Tensor, torch.nn.Parameter) and m.weight.dim() == 2
            and m.weight.dtype == dtype and m.out_features >= FEWEST_OUTPUTS]


def _linear_matches(torch, linear, threads: int) -> bool:
    """``matches`` for ``linear``'s shape, dtype and bias."""
    return matches(torch, linear.out_features, linear.in_features, linear.weight.dtype, linear.bias is not None,
                   threads)


def _weight_bytes(linear) -> int:
    return linear.weight.numel() * linear.weight.element_size()


def reordered_bytes(torch, module, dtype, threads: int) -> int:
    """The host memory ``PackedLinears`` would take for ``module`` (a block, on any device, the meta one
    included) with room for all: its ``candidates``' weights whose shape ``matches``."""
    return sum(_weight_bytes(m) for m in candidates(torch, module, dtype) if _linear_matches(torch, m, threads))


class PackedLinears:
    """The linears of one CPU-computed block (``module``) whose one-row products on the CPU read reordered copies
    of their weights: its ``candidates`` whose shape ``matches`` at ``threads``, while ``room`` (bytes, None for no
    limit) lasts. ``install`` gives each a forward that takes the copy for a contiguous row of input in host
    memory, with ``threads`` torch threads, while its weight is still the one copied (bound to the block's host
    memory); any other call (a prefill, the block held on the GPU) is the linear's own. ``remove`` puts the
    linears' own forwards back.

    The copies are made once: weights changed in place after (not a thing an offloaded model's bound weights
    are for) would leave them stale."""

    def __init__(self, torch, module, threads: int, room: int | None = None):
        self.torch, self.threads = torch, threads
        self.linears = []       # (linear, its copy, the address of the weight copied)
        self.bytes = 0          # host memory the copies take
        self.skipped = 0        # candidates left to F.linear: shape unmatched, no room, or the copy failed
        if not available(torch):
            return
        dtype = next((p.dtype for p in module.parameters()), None)
        for linear in candidates(torch, module, dtype):
            weight, nbytes = linear.weight, _weight_bytes(linear)
            if weight.device.type != "cpu" or (room is not None and self.bytes + nbytes > room) \
                    or not _linear_matches(torch, linear, threads):
                self.skipped += 1
                continue
            try:
                packed = reorder(torch, weight)
            except RuntimeError:        # out of memory, say: this one by F.linear
                self.skipped += 1
                continue
            self.linears.append((linear, packed, weight.data_ptr()))
            self.bytes += nbytes

    def install(self):
        torch, threads = self.torch, self.threads
        for linear, packed, home in self.linears:
            own = type(linear).forward.__get__(linear)

            def forward(x, linear=linear, packed=packed, home=home, own=own, n=linear.out_features,
                        k=linear.in_features):
                weight = linear.weight
                if x.device.type == "cpu" and x.numel() == k and x.is_contiguous() and x.dtype == weight.dtype \
                        and weight.data_ptr() == home and torch.get_num_threads() == threads:
                    return product(torch, x, packed, linear.bias, n)
                return own(x)
            linear.forward = forward

    def remove(self):
        for linear, _, _ in self.linears:
            vars(linear).pop("forward", None)
        self.linears = []
