"""Triton kernels for fused.py: RMSNorm's elementwise parts, rotary embedding, and SiLU times up.

Each does the float operations of the eager ops it stands for, in their order, rounding to the
tensor's dtype wherever an eager op writes a tensor of that dtype, so the results are bit-identical.
The arithmetic is written out as PTX instructions (``_mul``, ``_add``, ``_div``): IEEE round-to-
nearest and subnormals kept, as torch's kernels compute, where triton's own operators may flush
subnormals to zero (its libdevice is linked flushing) or contract a multiply and an add into one
rounding. ``exp`` and ``rsqrt`` are libdevice's, the functions torch's kernels call; their inputs here
(``-g``, a variance plus epsilon) make flushing change nothing. Imported only when a model on CUDA is
captured: it needs triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK = 1024
EXACT = {"enable_fp_fusion": False}


@triton.jit
def _mul(a, b):
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _add(a, b):
    return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _div(a, b):
    return tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _squares(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """``x.to(float32).pow(2)``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    x = tl.load(x_ptr + offs, mask=keep).to(tl.float32)
    tl.store(out_ptr + offs, _mul(x, x), mask=keep)


@triton.jit
def _norm_scale(x_ptr, var_ptr, w_ptr, out_ptr, n, width, eps, BLOCK: tl.constexpr):
    """``weight * (x.float() * rsqrt(var + eps)).to(x.dtype)``, var one float per row of ``width``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    x = tl.load(x_ptr + offs, mask=keep).to(tl.float32)
    var = tl.load(var_ptr + offs // width, mask=keep, other=1.0)
    w = tl.load(w_ptr + offs % width, mask=keep).to(tl.float32)
    eps = tl.full([BLOCK], eps, tl.float32)
    scaled = _mul(x, libdevice.rsqrt(_add(var, eps))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offs, _mul(w, scaled).to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _silu_mul(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """``silu(g) * u``, silu as torch computes it: ``g / (1 + exp(-g))`` in float, rounded to g's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    g = tl.load(g_ptr + offs, mask=keep).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=keep).to(tl.float32)
    one = tl.full([BLOCK], 1.0, tl.float32)
    act = _div(g, _add(one, libdevice.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offs, _mul(act, u).to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _rotary(q_ptr, k_ptr, qo_ptr, ko_ptr, c_ptr, s_ptr, q_rows, q_heads, k_heads, seq,
            qs0, qs1, qs2, ks0, ks1, ks2, qos0, qos1, qos2, kos0, kos1, kos2, cs0, cs1, cs2, ss0, ss1, ss2,
            D: tl.constexpr, WIDTH: tl.constexpr):
    """``x * cos + rotate_half(x) * sin`` for q's rows, then k's, each op rounded to the dtype as eager's."""
    row = tl.program_id(0)
    if row < q_rows:
        b = row // (q_heads * seq)
        h = (row // seq) % q_heads
        t = row % seq
        src = q_ptr + b * qs0 + h * qs1 + t * qs2
        dst = qo_ptr + b * qos0 + h * qos1 + t * qos2
    else:
        r = row - q_rows
        b = r // (k_heads * seq)
        h = (r // seq) % k_heads
        t = r % seq
        src = k_ptr + b * ks0 + h * ks1 + t * ks2
        dst = ko_ptr + b * kos0 + h * kos1 + t * kos2
    j = tl.arange(0, WIDTH)
    keep = j < D
    half = D // 2
    first = j < half
    x = tl.load(src + j, mask=keep).to(tl.float32)
    partner = tl.load(src + tl.where(first, j + half, j - half), mask=keep).to(tl.float32)
    rotated = tl.where(first, -partner, partner)
    c = tl.load(c_ptr + b * cs0 + t * cs1 + j * cs2, mask=keep).to(tl.float32)
    s = tl.load(s_ptr + b * ss0 + t * ss1 + j * ss2, mask=keep).to(tl.float32)
    dt = qo_ptr.dtype.element_ty
    out = _add(_mul(x, c).to(dt).to(tl.float32), _mul(rotated, s).to(dt).to(tl.float32))
    tl.store(dst + j, out.to(dt), mask=keep)


def _grid(n):
    return (triton.cdiv(n, BLOCK),)


# Each launch is made with its tensors' device current: triton launches on the current device's stream.

def squares(x):
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _squares[_grid(x.numel())](x, out, x.numel(), BLOCK=BLOCK, **EXACT)
    return out


def norm_scale(x, var, weight, eps, out):
    with torch.cuda.device(x.device):
        _norm_scale[_grid(x.numel())](x, var, weight, out, x.numel(), x.shape[-1], eps, BLOCK=BLOCK, **EXACT)
    return out


def silu_mul(gate, up, out):
    with torch.cuda.device(gate.device):
        _silu_mul[_grid(gate.numel())](gate, up, out, gate.numel(), BLOCK=BLOCK, **EXACT)
    return out


def rotary(q, k, cos, sin, q_out, k_out):
    """q, k, q_out, k_out: (batch, heads, seq, dim), last dim contiguous; cos, sin: (batch, seq, dim)."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    with torch.cuda.device(q.device):
        _rotary[(b * (hq + hk) * t,)](q, k, q_out, k_out, cos, sin, b * hq * t, hq, hk, t,
                                     *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
                                     *cos.stride(), *sin.stride(), D=d, WIDTH=triton.next_power_of_2(d), **EXACT)
    return q_out, k_out
