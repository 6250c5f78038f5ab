"""A batch-1 product kernel of nb_offload's own for the CPU's blocks (hybrid.py), opt-in: ``cpu_kernel="fast"``.

``F.linear`` at one row runs oneDNN's kernel, which reads dozens of a weight's rows side by side; on the H200
host (16 cores) its products over a LLaMA-7B block read 40-48 GB/s from host memory while the link copied,
where an fp32 sum read 66 (benchmarks/RESULTS.md, 2026-12-05). This kernel reads each row front to back, four
rows a thread at a time, multiplies bf16 pairs into fp32 lanes with AVX-512 BF16 and sums the lanes at the
end: 62-75 GB/s there beside the link. Its additions run in another order than oneDNN's, so its results differ
from F.linear's in the last bit of a few outputs (one in 19,200 over a block's random products), and a hybrid
generate's tokens may part from those of transformers computing the same blocks through F.linear. Hence
opt-in; its reference is transformers with the same blocks' linears computed by this kernel.

The C source below is compiled with the machine's C compiler when first used in a process, into a folder
``tempfile.mkdtemp`` makes for this user alone and removes once the library is loaded: nothing built earlier,
or by anyone else, is ever loaded. It needs Linux on x86-64, a CPU with AVX-512 BF16 and a C compiler with
OpenMP; ``why_unavailable`` names what is missing. Where torch's OpenMP runtime is loaded as ``libgomp.so.1``
(as torch's CPU wheels ship it), the library takes that one, and the two share one pool of threads.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
import tempfile

# bf16 to and from fp32 in C, for this kernel and cpu_amx.py's
BF16_C = r"""
#include <stdint.h>

static inline uint16_t to_bf16(float f) {       /* round to nearest even, as torch's and oneDNN's conversions */
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);     /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {     /* exact */
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
"""

SOURCE = r"""
#include <immintrin.h>
""" + BF16_C + r"""

/* y[r] = bf16(sum_j w[r][j] * x[j] (+ bias[r])) for bf16 w of n rows of k, x of k; the rows over `threads`. */
void nb_offload_gemv_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                          long n, long k, int threads) {
    const long groups = (n + 3) / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long g = 0; g < groups; g++) {
        long first = g * 4, rows = n - first < 4 ? n - first : 4;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        long j = 0;
        for (; j + 32 <= k; j += 32) {
            __m512bh xs = (__m512bh)_mm512_loadu_si512((const void *)(x + j));
            for (long r = 0; r < rows; r++) {
                const uint16_t *row = w + (first + r) * k + j;
                _mm_prefetch((const char *)(row + 512), _MM_HINT_T0);
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512((const void *)row), xs);
            }
        }
        if (j < k) {
            __mmask32 tail = (__mmask32)((1ull << (k - j)) - 1);
            __m512bh xs = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + j);
            for (long r = 0; r < rows; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(tail, w + (first + r) * k + j),
                                          xs);
        }
        for (long r = 0; r < rows; r++) {
            float sum = _mm512_reduce_add_ps(acc[r]);
            if (bias) sum += from_bf16(bias[first + r]);
            y[first + r] = to_bf16(sum);
        }
    }
}
"""

FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
# CPU flags the kernel's instructions need (Linux's names in /proc/cpuinfo)
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")

_built = None       # (the kernel's function, None) or (None, why not), once tried in this process


def cpu_flags() -> set:
    """The CPU's feature flags as Linux lists them, or an empty set where they can't be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compiler() -> str | None:
    """The C compiler to build with: $CC where set, else cc or gcc on the PATH."""
    named = os.environ.get("CC")
    return shutil.which(named) if named else (shutil.which("cc") or shutil.which("gcc"))


def why_unavailable() -> str | None:
    """Why this machine can't run the kernel, in a sentence; None where it can (it is then built)."""
    return _build()[1]


def _build():
    global _built
    if _built is None:
        library, why = build_library(SOURCE, FLAGS, CPU_FLAGS, "AVX-512 BF16")
        if library is None:
            _built = None, why
        else:
            fn = library.nb_offload_gemv_bf16
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_long, ctypes.c_int]
            fn.restype = None
            _built = fn, None
    return _built


def build_library(source: str, flags: list, needs: tuple, needs_in_words: str):
    """(the library ``source`` builds with ``flags``, loaded by ctypes, None), or (None, why not): this machine
    isn't Linux on x86-64, its CPU lacks one of ``needs`` (``needs_in_words`` says what they are), there is no
    C compiler or it failed. Built in a folder made for this user alone and removed once the library is loaded
    (a loaded library stays mapped), so nothing built earlier, or by anyone else, is ever loaded."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"it runs on Linux on x86-64 (this is {sys.platform} on {platform.machine()})"
    missing = [flag for flag in needs if flag not in cpu_flags()]
    if missing:
        return None, f"this CPU lacks {', '.join(missing)} (it needs {needs_in_words})"
    cc = compiler()
    if cc is None:
        return None, "no C compiler was found (cc or gcc on the PATH, or $CC)"
    folder = tempfile.mkdtemp(prefix="nb_offload-kernel-")     # this user's alone: nothing planted is loaded
    try:
        source_file, library = os.path.join(folder, "kernel.c"), os.path.join(folder, "kernel.so")
        with open(source_file, "w") as f:
            f.write(source)
        try:
            done = subprocess.run([cc, *flags, source_file, "-o", library], capture_output=True, text=True,
                                  timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{cc} could not build it ({exc})"
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            return None, f"{cc} could not build it: {last}"
        return ctypes.CDLL(library), None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def applies(torch, x, weight, bias=None) -> bool:
    """Whether ``product`` takes this call: one row of input in host memory, contiguous, bf16 as the
    weight is, the weight a contiguous 2-D bf16 tensor in host memory, and no bias or one bf16 value an
    output in host memory."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.is_contiguous()
            and x.is_contiguous() and x.numel() == weight.shape[1] == x.shape[-1]
            and (bias is None or (bias.device.type == "cpu" and bias.dtype == torch.bfloat16
                                  and bias.is_contiguous() and bias.numel() == weight.shape[0])))


def described(t) -> str:
    """A tensor argument as an error names it: shape, dtype and device, or None."""
    return "None" if t is None else f"{tuple(t.shape)} {t.dtype} on {t.device}"


def product(torch, x, weight, bias, threads: int):
    """``F.linear(x, weight, bias)`` for one row by this kernel with ``threads`` threads, in x's shape but for
    the last dimension; its bits may differ from F.linear's (the module's docstring). Raises ValueError for a
    call ``applies`` refuses (the kernel reads raw memory: a wrong shape would read past it), RuntimeError where
    the kernel is unavailable."""
    fn, why = _build()
    if fn is None:
        raise RuntimeError(f"nb_offload's CPU kernel is unavailable: {why}")
    if not applies(torch, x, weight, bias):
        seen = described
        raise ValueError(f"x {seen(x)}, weight {seen(weight)}, bias {seen(bias)}: the kernel takes one contiguous "
                         f"bf16 row in host memory, a contiguous 2-D bf16 weight there of as many columns, and "
                         f"no bias or {weight.shape[0] if weight.dim() else '?'} bf16 values in host memory")
    rows = weight.shape[0]
    out = torch.empty(*x.shape[:-1], rows, dtype=torch.bfloat16)
    fn(weight.data_ptr(), x.data_ptr(), bias.data_ptr() if bias is not None else None, out.data_ptr(),
       rows, weight.shape[1], max(1, int(threads)))
    return out


class Fast:
    """The policy of ``KernelLinears`` for this kernel: a linear in host memory takes it for every one-row call
    ``applies`` to, with the threads torch has for the call."""

    name = "fast"

    def __init__(self, torch):
        self.torch = torch

    def available(self) -> bool:
        return why_unavailable() is None

    def takes(self, linear) -> bool:
        return True

    def multiply(self, x, weight, bias):
        torch = self.torch
        return product(torch, x, weight, bias, torch.get_num_threads()) if applies(torch, x, weight, bias) else None


class KernelLinears:
    """The linears of one module the CPU computes (a CPU block, a unit on the CPU device) whose one-row products
    take one of nb_offload's kernels, as ``kernel`` says (``Fast`` here, cpu_amx.Amx): where ``kernel.available()``,
    plain ``nn.Linear``s with 2-D bf16 weights (cpu_products.candidates) in host memory, contiguous, that
    ``kernel.takes``.
    ``install`` gives each a forward that calls ``kernel.multiply(x, weight, bias)`` while its weight is still the
    one it found (bound to the module's host memory), and the linear's own forward where that returns None (a
    prefill, the block held on the GPU). ``remove`` puts the linears' own forwards back. The same surface as
    cpu_products.PackedLinears (it copies nothing)."""

    bytes = 0

    def __init__(self, torch, module, kernel, among=None):
        """``among``: where given, the ids of the weights whose linears may take it (the others are left out,
        neither taken nor counted)."""
        from .cpu_products import candidates
        self.kernel = kernel
        self.linears, self.skipped = [], 0      # (linear, the address of its weight), and those left to F.linear
        if not kernel.available():
            return
        for linear in candidates(torch, module, torch.bfloat16):
            if among is not None and id(linear.weight) not in among:
                continue
            if linear.weight.device.type == "cpu" and linear.weight.is_contiguous() and kernel.takes(linear):
                self.linears.append((linear, linear.weight.data_ptr()))
            else:
                self.skipped += 1

    def install(self):
        multiply = self.kernel.multiply
        for linear, home in self.linears:
            own = type(linear).forward.__get__(linear)

            def forward(x, linear=linear, home=home, own=own):
                weight = linear.weight
                out = multiply(x, weight, linear.bias) if weight.data_ptr() == home else None
                return own(x) if out is None else out
            linear.forward = forward

    def remove(self):
        for linear, _ in self.linears:
            vars(linear).pop("forward", None)
        self.linears = []


class FastLinears(KernelLinears):
    """``KernelLinears`` of this kernel (``Fast``)."""

    def __init__(self, torch, module, among=None):
        super().__init__(torch, module, Fast(torch), among)
