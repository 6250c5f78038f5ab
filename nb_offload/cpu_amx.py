"""A batch-1 product kernel for the CPU that gives ``F.linear``'s bits, faster: AMX tiles over the weights as
stored, summed as oneDNN sums them (the default ``cpu_kernel="exact"``, where it runs and the load's check passes).

On a CPU with AMX, ``F.linear`` of one bf16 row runs oneDNN's brgemm matmul with AMX tiles. It takes the weights
as the second operand, which AMX wants with pairs of rows interleaved, so each call regathers the weights
(on the H200 host 40-48 GB/s against 62-75 for a kernel reading rows front to back; benchmarks/RESULTS.md). The
tile instruction's sums don't depend on which operand is which: a product's pairs are the same pairs. So this
kernel gives AMX the weights as the *first* operand, sixteen rows of 32 values a tile, straight from memory,
and the input as the second, one pair a tile row. Each output is then the same chain of tile steps as
oneDNN's, 32 inputs a step, where oneDNN runs the whole of the inputs as one chain.

Where oneDNN splits the inputs into chunks (it does for some shapes and thread counts: LLaMA-7B's down
projection, 11,008 inputs, in two of 5,504 at 2 threads and seven of 1,600 at one, on the CPU machine), it sums
each chunk from zero and adds the chunks' sums in order, in fp32; so does this kernel, given the chunk. The chunk
isn't published, so ``chunk_for`` finds it per shape and thread count at load: the candidates (the inputs in 1
to 32 equal parts, rounded up to 32 or 64) in turn, each checked against ``F.linear`` on weights whose products
show the order of the sums (``cpu_products._check_weights``); the first that gives F.linear's bits on every
check input is kept, and where none does, F.linear computes that shape. A bias is added to the fp32 sum before
it is rounded to bf16, as oneDNN's sum post-op does. A check, not a proof (cpu_products.py says what it can't
see); the GPU tests compare tokens with transformers through F.linear.

Each output is one thread's sum, so the kernel's own thread count doesn't change its bits; the chunk it
emulates is F.linear's at a given count, so a product takes the kernel only at a count checked for its shape.

Built as cpu_kernel.py's kernel is (cpu_kernel.build_library): Linux on x86-64, a CPU with AMX (amx_tile,
amx_bf16), a C compiler that knows them; and Linux must let the process use AMX's tile state (``arch_prctl``,
Linux 5.16 on), which oneDNN asks for too.
"""

from __future__ import annotations

import ctypes

from . import cpu_kernel

SOURCE = r"""
#include <immintrin.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
""" + cpu_kernel.BF16_C + r"""

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux lends a process AMX's tile state only once it asks (0 where granted) */
int nb_offload_amx_permit(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

typedef struct { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

/* y[r] = bf16(sum over chunks of (sum_j w[r][j] * x[j] over the chunk) (+ bias[r])), w of n rows of k bf16
   (n a multiple of 16, k and chunk of 32); each output one AMX chain a chunk, the chunks' sums added in order. */
void nb_offload_gemv_bf16_amx(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                              long n, long k, long chunk, int threads) {
    const long blocks = n / 16;
    #pragma omp parallel num_threads(threads)
    {
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        cfg.colsb[0] = 4;  cfg.rows[0] = 16;        /* the input: 16 pairs, one a row */
        cfg.colsb[1] = 64; cfg.rows[1] = 16;        /* 16 weight rows of 32 values */
        cfg.colsb[2] = 4;  cfg.rows[2] = 16;        /* their 16 sums */
        _tile_loadconfig(&cfg);
        float part[16] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (long b = 0; b < blocks; b++) {
            const uint16_t *rows = w + b * 16 * k;
            float sum[16] = {0};
            for (long first = 0; first < k; first += chunk) {
                long last = first + chunk < k ? first + chunk : k;
                _tile_zero(2);
                for (long j = first; j < last; j += 32) {
                    _tile_loadd(0, x + j, 4);
                    _tile_loadd(1, rows + j, k * 2);
                    _tile_dpbf16ps(2, 1, 0);
                }
                _tile_stored(2, part, 4);
                for (int r = 0; r < 16; r++) sum[r] += part[r];
            }
            for (int r = 0; r < 16; r++) {
                y[b * 16 + r] = to_bf16(bias ? sum[r] + from_bf16(bias[b * 16 + r]) : sum[r]);
            }
        }
        _tile_release();
    }
}
"""

FLAGS = ["-O3", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-fopenmp", "-shared", "-fPIC"]
CPU_FLAGS = ("amx_tile", "amx_bf16")
# The shapes it takes: whole tiles (16 outputs, 32 inputs at a time). LLaMA's, Qwen's and Mistral's are.
ROWS, COLS = 16, 32
# The parts the inputs are cut into at most, looking for oneDNN's chunk (seen: 1 to 14, a 70B down projection at
# one thread).
MOST_PARTS = 32

_built = None       # (the kernel's function, None) or (None, why not), once tried in this process
_chunks = {}        # (out, in, dtype, bias, threads) -> the chunk that gives F.linear's bits, or None


def why_unavailable() -> str | None:
    """Why this machine can't run the kernel, in a sentence; None where it can (it is then built)."""
    return _build()[1]


def _build():
    global _built
    if _built is None:
        library, why = cpu_kernel.build_library(SOURCE, FLAGS, CPU_FLAGS, "AMX with bf16")
        if library is None:
            _built = None, why
        elif library.nb_offload_amx_permit() != 0:
            _built = None, ("Linux did not let this process use AMX's tile state (arch_prctl ARCH_REQ_XCOMP_PERM, "
                            "Linux 5.16 on)")
        else:
            fn = library.nb_offload_gemv_bf16_amx
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int]
            fn.restype = None
            _built = fn, None
    return _built


def applies(torch, x, weight, bias=None) -> bool:
    """Whether ``product`` takes this call: cpu_kernel.applies's (one contiguous bf16 row in host memory, a
    contiguous 2-D bf16 weight there, no bias or a bf16 one), with whole tiles: outputs a multiple of ROWS,
    inputs of COLS."""
    return cpu_kernel.applies(torch, x, weight, bias) and weight.shape[0] % ROWS == 0 and weight.shape[1] % COLS == 0


def product(torch, x, weight, bias, chunk: int, threads: int):
    """``F.linear(x, weight, bias)`` for one row by this kernel, the inputs summed in chunks of ``chunk`` (one
    ``chunk_for`` found: then F.linear's bits at the thread count it was found for), with ``threads`` threads;
    in x's shape but for the last dimension. Raises ValueError for a call ``applies`` refuses or a chunk that
    isn't a positive multiple of COLS (the kernel reads raw memory), RuntimeError where it is unavailable."""
    fn, why = _build()
    if fn is None:
        raise RuntimeError(f"nb_offload's AMX kernel is unavailable: {why}")
    if not applies(torch, x, weight, bias) or chunk <= 0 or chunk % COLS:
        seen = cpu_kernel.described
        raise ValueError(f"x {seen(x)}, weight {seen(weight)}, bias {seen(bias)}, chunk {chunk}: the AMX kernel "
                         f"takes one contiguous bf16 row in host memory, a contiguous 2-D bf16 weight there of as "
                         f"many columns, a multiple of {ROWS} rows and of {COLS} columns, no bias or a bf16 value "
                         f"an output, and a chunk that is a positive multiple of {COLS}")
    rows = weight.shape[0]
    out = torch.empty(*x.shape[:-1], rows, dtype=torch.bfloat16)
    fn(weight.data_ptr(), x.data_ptr(), bias.data_ptr() if bias is not None else None, out.data_ptr(),
       rows, weight.shape[1], chunk, max(1, int(threads)))
    return out


def candidate_chunks(in_features: int) -> list:
    """The chunks ``chunk_for`` tries, in turn: the inputs in 1 to MOST_PARTS equal parts, each rounded up to a
    multiple of 32 and of 64 (the grains oneDNN's blocks have shown), distinct, the fewest parts first."""
    seen = []
    for parts in range(1, MOST_PARTS + 1):
        share = -(-in_features // parts)
        for grain in (COLS, 2 * COLS):
            chunk = -(-share // grain) * grain
            if chunk not in seen:
                seen.append(chunk)
    return seen


def chunk_for(torch, out_features: int, in_features: int, dtype, bias: bool, threads: int,
              look: bool = True) -> int | None:
    """The chunk with which ``product`` gives ``F.linear``'s bits for one row of this shape at ``threads`` torch
    threads, or None where the kernel doesn't run here, doesn't take the shape, or no candidate matched
    (cpu_products.first_as_linear's check). Found once a process per shape and thread count; with ``look``
    False only one found already is returned (a call at a count not checked at load takes F.linear)."""
    key = (out_features, in_features, str(dtype), bias, threads)
    if key in _chunks or not look:
        return _chunks.get(key)
    found = None
    if dtype == torch.bfloat16 and out_features % ROWS == 0 and in_features % COLS == 0 \
            and why_unavailable() is None:
        from .cpu_products import first_as_linear
        chunks = candidate_chunks(in_features)
        kernels = [lambda weights, chunk=chunk: lambda x, offsets: product(torch, x, weights, offsets, chunk, threads)
                   for chunk in chunks]
        first = first_as_linear(torch, out_features, in_features, dtype, bias, threads, kernels)
        found = None if first is None else chunks[first]
    _chunks[key] = found
    return found


class Amx:
    """The policy of cpu_kernel.KernelLinears for this kernel: a linear takes it where its shape has a chunk
    (``chunk_for``) at ``threads``, found at install; a call takes it where its input ``applies`` and the thread
    count torch has for the call has a chunk found for the shape (a CPU block sets its own; on the CPU device, the
    caller's), else F.linear computes it."""

    name = "amx"

    def __init__(self, torch, threads: int):
        self.torch, self.threads = torch, threads

    def available(self) -> bool:
        return why_unavailable() is None

    def takes(self, linear) -> bool:
        return self.check(linear.out_features, linear.in_features, linear.bias is not None, linear.weight.dtype)

    def check(self, out_features: int, in_features: int, bias: bool = False, dtype=None) -> bool:
        """Whether a product of this shape (bf16 where ``dtype`` is None) takes the kernel at ``threads``: its
        chunk looked for now, where not yet."""
        dtype = dtype if dtype is not None else self.torch.bfloat16
        return chunk_for(self.torch, out_features, in_features, dtype, bias, self.threads) is not None

    def multiply(self, x, weight, bias):
        torch = self.torch
        if not applies(torch, x, weight, bias):
            return None
        threads = torch.get_num_threads()
        chunk = chunk_for(torch, *weight.shape, weight.dtype, bias is not None, threads, look=False)
        return None if chunk is None else product(torch, x, weight, bias, chunk, threads)


def kernel_policy(torch, products: str, threads: int):
    """The policy of cpu_kernel.KernelLinears for the products a plan names (``Plan.cpu_products``): "fast",
    cpu_kernel.Fast; "amx", ``Amx`` with its shapes checked at ``threads``; None for torch's ("F.linear",
    "reordered", "")."""
    if products == "fast":
        return cpu_kernel.Fast(torch)
    if products == "amx":
        return Amx(torch, threads)
    return None

