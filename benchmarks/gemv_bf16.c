// host_bound.py's "own" way: y[n] = bf16(sum_k W[n,k] x[k]) for bf16 W [N,K] stored by rows, the rows split
// over OpenMP threads, each row read front to back (4 rows at a time), pairs multiplied and summed into fp32
// lanes by AVX-512 BF16, the lanes summed at the end: another order of additions than F.linear's (oneDNN's).
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>

static inline uint16_t to_bf16(float f) {   // round to nearest even, as torch's conversion
    uint32_t u; __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

void gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, long n, long k, int threads) {
    const long blocks = (n + 3) / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) {
        long r0 = b * 4, rows = n - r0 < 4 ? n - r0 : 4;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        long j = 0;
        for (; j + 32 <= k; j += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + j));
            for (long r = 0; r < rows; r++) {
                const uint16_t *row = w + (r0 + r) * k + j;
                _mm_prefetch((const char *)(row + 512), _MM_HINT_T0);
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512((const void *)row), xv);
            }
        }
        if (j < k) {
            __mmask32 m = (__mmask32)((1ull << (k - j)) - 1);
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + j);
            for (long r = 0; r < rows; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(m, w + (r0 + r) * k + j), xv);
        }
        for (long r = 0; r < rows; r++) y[r0 + r] = to_bf16(_mm512_reduce_add_ps(acc[r]));
    }
}
