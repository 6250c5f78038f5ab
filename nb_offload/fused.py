"""Fewer kernels in a captured decode step, with the same bits: RMSNorm, rotary embedding and the
MLP's SiLU product as fused kernels while a step is captured (graphs.py).

A captured step replays every kernel the eager step launched. At batch 1 a LLaMA-7B step launches
about 1,350, and half are tiny elementwise kernels: eight for each RMSNorm (cast, square, mean, add,
rsqrt, multiply, cast, scale), ten for the rotary embedding of q and k, two for SiLU and the product
with up. Replayed back to back each still costs a launch and a ramp, about 2 us, so the matrix products'
4.2 ms become a 6.8 ms step. Here the norm becomes three kernels (squares, torch's own mean, one for
the rest), the rotary embedding one, the activation one.

Exact: each fused kernel (fused_kernels.py) does the float operations of the eager ops in their order
and rounds to the tensor's dtype wherever an eager op writes one, so its results are bit-identical;
the reduction (the mean) stays torch's. Before a model's first fused step, ``Fusion.check`` runs every
kernel against the eager ops on random values (all 65,536 bf16 values for SiLU) and fuses nothing
if any bit differs or triton is missing.

Only code known to be these ops is swapped. A module's ``forward`` (or a modeling module's
``apply_rotary_pos_emb``) must be one of the forms below: its source the same syntax (docstrings and
annotations aside), its loaded code the same names, constants, parameters and defaults as the form
compiled, no wrapper around it, and ``torch`` (``nn``, ``F``, ``rotate_half``) bound to what the form
means. The forms are copied from transformers' Llama, which Qwen2, Qwen3, Mistral, Mixtral and others
share. Anything else (Gemma's ``1 + weight`` norm, a GELU MLP, partial rotary, a kernel from the Hub, a
wrapper, a later rewrite) keeps its eager kernels, as does an MLP whose activation has hooks.

The swaps hold only while a step is captured or its warm-up step runs (so the kernels compile outside
the capture); the replays run no Python. A module's ``forward`` is swapped on the instance. The
rotary function lives in a modeling module that other models share, so it is swapped once for all
fusions applied at the time, put back when the last ends (in whatever order), and its fused path runs
only in a thread that has a fusion applied: elsewhere, the eager function. Each fused forward falls back
to the eager code for inputs it doesn't take (another device or dtype than the one checked, float32,
odd layouts).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading

from .errors import in_one_line
from .forms import is_form

NORM_FORM = """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
"""
MLP_FORM = """
def forward(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj
"""
SILU_FORMS = ("""
def forward(self, input):
    return nn.functional.silu(input)
""", """
def forward(self, input):
    return F.silu(input, inplace=self.inplace)
""")
ROTARY_FORM = """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
"""
ROTATE_HALF_FORM = """
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
"""


def _class_forward(module):
    return getattr(type(module).forward, "__func__", type(module).forward)


def _hooked(module) -> bool:
    """Whether calling ``module`` runs more than its class's ``forward``: its own hooks, global module hooks,
    or a ``forward`` set on the instance."""
    from torch.nn.modules import module as nn_module
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module)
                or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def _is_silu(module) -> bool:
    """A SiLU activation that computes out of place, with nothing else running when it is called."""
    import torch
    if not isinstance(module, torch.nn.Module) or getattr(module, "inplace", False) or _hooked(module):
        return False
    return type(module) is torch.nn.SiLU or is_form(_class_forward(module), *SILU_FORMS)


_HALF = ("bfloat16", "float16")


def _fits(fusion, *tensors) -> bool:
    """Tensors the kernels take: on the device and in the dtype ``fusion`` checked them on."""
    return all(t.device == fusion.device and t.dtype == fusion.dtype for t in tensors)


class Fusion:
    """The swaps that fuse one model's norms, MLP products and rotary embeddings, found once."""

    def __init__(self, model):
        import torch
        self.swaps = []         # (module, replacement forward)
        self.shared = []        # (modeling module, its eager apply_rotary_pos_emb)
        self.counts = {"norms": 0, "MLPs": 0, "rotary": 0}
        self.device = self.dtype = None     # where check() found the kernels exact
        homes_seen = set()
        kernelized = _kernelized(model)
        for module in model.modules():
            forward = _class_forward(module)
            if "forward" in vars(module):       # wrapped by someone else: theirs stays
                continue
            if is_form(forward, NORM_FORM) and isinstance(getattr(module, "weight", None), torch.Tensor):
                self.swaps.append((module, _fused_norm(self, module)))
                self.counts["norms"] += 1
            elif is_form(forward, MLP_FORM) and _is_silu(getattr(module, "act_fn", None)):
                self.swaps.append((module, _fused_mlp(self, module)))
                self.counts["MLPs"] += 1
            home = sys.modules.get(type(module).__module__)
            if home is None or id(home) in homes_seen:
                continue
            homes_seen.add(id(home))
            rotary = _eager_rotary(home)
            plain = _unwrapped(rotary)
            if (type(rotary) not in kernelized and is_form(plain, ROTARY_FORM)
                    and is_form(getattr(plain, "__globals__", {}).get("rotate_half"), ROTATE_HALF_FORM)):
                self.shared.append((home, rotary))
                self.counts["rotary"] += 1
        self.why_not = "" if self.swaps or self.shared else "no norm, MLP or rotary embedding of a known form"
        self.checked = False

    def describe(self) -> str:
        """What is fused, in words ("65 norms, 32 MLPs, rotary"); "" where nothing is."""
        if self.why_not:
            return ""
        parts = [f"{n} {what}" for what, n in self.counts.items() if n and what != "rotary"]
        return ", ".join(parts + (["rotary"] if self.counts["rotary"] else []))

    def check(self, device, dtype) -> bool:
        """Run every kernel once against the eager ops on ``device`` in ``dtype`` (compiling them); False,
        with ``why_not`` set, where triton is missing or any result differs in a bit."""
        if self.checked or self.why_not:
            return not self.why_not
        self.checked = True
        if str(dtype).removeprefix("torch.") not in _HALF:
            self.why_not = f"the model computes in {str(dtype).removeprefix('torch.')} (the kernels take bf16 and fp16)"
            return False
        key = (str(device), str(dtype))
        if key not in _TESTED:
            try:
                _TESTED[key] = self_test(device, dtype)
            except Exception as exc:     # no triton, no compiler, an unsupported card: the eager kernels
                self.off(exc)
                return False
        if _TESTED[key]:
            self.why_not = f"{_TESTED[key]} differs from the eager ops on this machine"
        else:
            import torch
            device = torch.device(device)
            if device.index is None:
                device = torch.device(device.type, torch.cuda.current_device())
            self.device, self.dtype = device, dtype
        return not self.why_not

    def off(self, exc):
        """Fuse nothing from now on, for the reason ``exc``."""
        self.why_not = in_one_line(exc)

    @contextlib.contextmanager
    def applied(self):
        """The swaps in place, undone on the way out (also where the step raised). A module that has
        gained a ``forward`` of its own since keeps it."""
        swapped, shared = [], []
        stack = vars(_ACTIVE).setdefault("stack", [])
        stack.append(self)
        try:
            for module, replacement in self.swaps:
                if "forward" not in vars(module):
                    module.forward = replacement
                    swapped.append(module)
            for home, eager in self.shared:
                _share(home, eager)
                shared.append(home)
            yield
        finally:
            stack.pop()
            for module in swapped:
                vars(module).pop("forward", None)
            for home in shared:
                _unshare(home)


_TESTED: dict = {}      # (device, dtype) -> self_test's answer, once a process
_ACTIVE = threading.local()     # .stack: the fusions applied in this thread, innermost last
_LOCK = threading.Lock()
_SHARED: dict = {}      # id(modeling module) -> [its eager apply_rotary_pos_emb, fusions applied]


def _eager_rotary(home):
    """A modeling module's own ``apply_rotary_pos_emb``, also while a fusion has it swapped."""
    fn = getattr(home, "apply_rotary_pos_emb", None)
    return getattr(fn, "_nb_offload_eager", fn)


def _unwrapped(fn):
    """The function under the module wrapper that transformers 5.25 and later put on a modeling module's
    ``apply_rotary_pos_emb`` (the ``kernels`` package's, so a Hub kernel can replace it per model); ``fn``
    itself where it is not wrapped. The wrapper calls the function unless a model was kernelized, which
    ``_kernelized`` finds."""
    import torch
    if not isinstance(fn, torch.nn.Module) or "forward" in vars(fn) or not hasattr(fn, "kernel_layer_name"):
        return fn
    return inspect.getclosurevars(type(fn).forward).nonlocals.get("func", fn)


def _kernelized(model) -> set:
    """The types of the function wrappers to which ``kernels.kernelize`` gave a Hub kernel's forward in
    ``model``: each attention holds its own instance of its modeling module's wrapper, and the wrapper at
    module level calls that instance's forward while the attention runs."""
    return {type(wrapper) for module in model.modules()
            for wrapper in vars(module).get("_kernel_funcs", {}).values() if "forward" in vars(wrapper)}


def _share(home, eager):
    with _LOCK:
        entry = _SHARED.get(id(home))
        if entry is None:
            entry = _SHARED[id(home)] = [eager, 0]
            home.apply_rotary_pos_emb = _fused_rotary(eager)
        entry[1] += 1


def _unshare(home):
    with _LOCK:
        entry = _SHARED[id(home)]
        entry[1] -= 1
        if entry[1] == 0:
            home.apply_rotary_pos_emb = entry[0]
            del _SHARED[id(home)]


def _fused_norm(fusion, module):
    eager = module.forward

    def forward(hidden_states):
        import torch
        weight, eps = module.weight, module.variance_epsilon
        if not (_fits(fusion, hidden_states) and hidden_states.is_contiguous() and weight.device == fusion.device
                and weight.dim() == 1 and weight.shape[0] == hidden_states.shape[-1] and weight.is_contiguous()
                and weight.dtype in (fusion.dtype, torch.float32)
                and eps >= torch.finfo(torch.float32).tiny):     # rsqrt of a subnormal: libdevice flushes it
            return eager(hidden_states)
        from . import fused_kernels
        variance = fused_kernels.squares(hidden_states).mean(-1, keepdim=True)
        out = torch.empty(hidden_states.shape, dtype=torch.promote_types(weight.dtype, hidden_states.dtype),
                          device=hidden_states.device)
        return fused_kernels.norm_scale(hidden_states, variance, weight, eps, out)
    return forward


def _fused_mlp(fusion, module):
    eager = module.forward

    def forward(x):
        if not _is_silu(module.act_fn):         # hooked (or replaced) since: its call must run
            return eager(x)
        gate, up = module.gate_proj(x), module.up_proj(x)
        if not (_fits(fusion, gate, up) and gate.shape == up.shape and gate.is_contiguous() and up.is_contiguous()):
            return module.down_proj(module.act_fn(gate) * up)
        import torch

        from . import fused_kernels
        return module.down_proj(fused_kernels.silu_mul(gate, up, torch.empty_like(gate)))
    return forward


def _fused_rotary(eager):
    plain = _unwrapped(eager)
    signature = inspect.signature(plain)

    def apply_rotary_pos_emb(*args, **kwargs):
        stack = getattr(_ACTIVE, "stack", None)
        if not stack:                           # a thread with no fusion applied: the eager function
            return eager(*args, **kwargs)
        fusion = stack[-1]
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        q, k, cos, sin = (bound.arguments[n] for n in ("q", "k", "cos", "sin"))
        if not (bound.arguments["unsqueeze_dim"] == 1 and _fits(fusion, q, k, cos, sin) and q.dim() == k.dim() == 4
                and cos.dim() == sin.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]
                and cos.shape[-1] == q.shape[-1] and q.shape[-1] % 2 == 0
                and all(t.stride(-1) == 1 for t in (q, k, cos, sin))):
            return eager(*args, **kwargs)
        import torch

        from . import fused_kernels
        batch, _, seq, dim = q.shape
        cos, sin = cos.expand(batch, seq, dim), sin.expand(batch, seq, dim)
        # the outputs laid out as the eager ops lay them out (worked out on the meta device)
        q_like, k_like = plain(*(t.to("meta") for t in (q, k, cos, sin)))
        q_out, k_out = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=q.device)
                        for t in (q_like, k_like))
        if q_out.stride(-1) != 1 or k_out.stride(-1) != 1:
            return eager(*args, **kwargs)
        return fused_kernels.rotary(q, k, cos, sin, q_out, k_out)
    apply_rotary_pos_emb._nb_offload_eager = eager
    return apply_rotary_pos_emb


def self_test(device, dtype) -> str:
    """The first fused kernel whose results differ from the eager ops' on ``device`` in ``dtype``, or ""
    where none does."""
    import torch

    from . import fused_kernels
    gen = torch.Generator(device=device).manual_seed(0)
    every = torch.arange(1 << 16, dtype=torch.int32, device=device).to(torch.int16).view(dtype)
    every = every[torch.isfinite(every)].contiguous()
    up = torch.randn(every.shape, generator=gen, device=device).to(dtype)
    if not torch.equal(fused_kernels.silu_mul(every, up, torch.empty_like(every)),
                       torch.nn.functional.silu(every) * up):
        return f"SiLU times up ({dtype})"
    tiny = torch.finfo(dtype).tiny      # the smallest normal: rows below it hold subnormals
    for width, scale in ((4096, 1.0), (128, 30.0), (2048, 1e-3), (256, 8 * tiny)):
        x = (torch.randn(8, width, generator=gen, device=device) * scale).to(dtype)
        weight = torch.randn(width, generator=gen, device=device).to(dtype)
        eps = 1e-6
        h = x.to(torch.float32)
        want = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        variance = fused_kernels.squares(x).mean(-1, keepdim=True)
        if not torch.equal(fused_kernels.norm_scale(x, variance, weight, eps, torch.empty_like(x)), want):
            return f"RMSNorm ({dtype}, width {width})"
    for heads, kv_heads, dim, scale in ((32, 32, 128, 1.0), (14, 2, 64, 1.0), (8, 8, 128, 4 * tiny)):
        q = torch.randn(1, 1, heads, dim, generator=gen, device=device).to(dtype).transpose(1, 2)
        k = torch.randn(1, 1, kv_heads, dim, generator=gen, device=device).to(dtype).transpose(1, 2)
        # scale 4 * tiny: cos, sin and their products with q and k about the smallest normal, many subnormal
        cos = (torch.randn(1, 1, dim, generator=gen, device=device) * scale).to(dtype)
        sin = (torch.randn(1, 1, dim, generator=gen, device=device) * scale).to(dtype)
        got = fused_kernels.rotary(q, k, cos, sin, torch.empty_like(q), torch.empty_like(k))
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        if not all(torch.equal(g, x * c + _rotate_half(torch, x) * s) for g, x in zip(got, (q, k))):
            return f"rotary embedding ({dtype}, head dim {dim}, scale {scale:.3g})"
    return ""


def _rotate_half(torch, x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
