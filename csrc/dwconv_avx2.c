/* dwconv_avx2.c - AVX2 depthwise kernels (groups == C; also used by the VNNI families).
 *
 * Memory-bound by design: each output row is computed from the KH zero-padded input rows that the
 * driver quantized into a small per-thread ring (run.c: one pass over x, quantize fused).
 * Vectorized over channels, 8 per ymm (the row's channel axis is padded to 16 with zeros), and
 * register-blocked over 8 output pixels: per kernel row the KW weight vectors sit in registers and,
 * at stride 1, every input vector is loaded once and multiplied into each output pixel that
 * reads it (a sliding window), so loads no longer outnumber the multiply-accumulates.
 *   f32: vfmadd231ps                                       (any order: the contract's FP32)
 *   s32: vpmulld + vpaddd, wrapping mod 2^32
 *   s16: vpmovsxwd (int16 rows: INT16, and INT8's +-127) + vpmulld + vpaddd
 * Dequantize fused in the store: cvtdq2ps, one multiply by inv[o], then + bias[o] (separate
 * instructions, no FMA). A partial last block stores through a buffer (no write past the row).
 * Kernel widths 1, 3, 5, 7 are specialized; others take a per-pixel loop. Weights as
 * qconv_dw_pack packs them: [tap][ocp], ocp = OC rounded up to QCONV_DW_BLOCK_AVX2.
 * Names: qconv_<type>_dwconv__avx2. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "qconv_impl.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Load 8 channels of the padded input as the accumulation type: float (fp32), int32 (int32), or
 * int16 sign-extended to int32 (vpmovsxwd; int16 and int8 rows hold int16). */
#define LD_F32(p) _mm256_loadu_ps((const float *)(p))
#define LD_S32(p) _mm256_loadu_si256((const __m256i *)(p))
#define LD_S16(p) _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(p)))
/* acc += x * w: one FMA (fp32: any order, the contract's FP32), or vpmulld + vpaddd wrapping. */
#define MAC_F32(acc, x, w) _mm256_fmadd_ps((x), (w), (acc))
#define MAC_S32(acc, x, w) _mm256_add_epi32((acc), _mm256_mullo_epi32((x), (w)))

/* Store 8 float outputs of one pixel at channel o, plus bias[o] if any (a partial last block
 * through a buffer): fp32 stores its accumulators so, adding the bias after its accumulation. */
ALWAYS_INLINE void store8(const qconv_dw_args *a, float *y, __m256 v, int64_t o)
{
    if (a->bias != NULL)
        v = _mm256_add_ps(v, _mm256_loadu_ps(a->bias + o));
    if (o + 8 <= a->oc) {
        _mm256_storeu_ps(y + o, v);
    } else {
        float t[8];
        _mm256_storeu_ps(t, v);
        memcpy(y + o, t, (size_t)(a->oc - o) * 4);
    }
}

/* Integers dequantize first: cvtdq2ps, one multiply by inv[o], then + bias[o] (never fused). */
ALWAYS_INLINE void store8_s32(const qconv_dw_args *a, float *y, __m256i acc, int64_t o)
{
    store8(a, y, _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(a->inv + o)), o);
}

#define MP 8   /* output pixels per strip: 8 accumulators, the kernel row (KW vectors), one input */

/* One strip of MPX output pixels (from j0) x 8 channels (from o), constant KW:
 * for each kernel row u the KW weight vectors are loaded once; at stride 1 each input vector of
 * the row is loaded once and multiplied into every output pixel that reads it (a sliding
 * window: MPX + KW - 1 loads for MPX * KW multiply-accumulates). ES: bytes per input element. */
#define DW_STRIP(NAME, VT, ACCZERO, LD, LW, MAC, STORE, ES)                                            \
    ALWAYS_INLINE void NAME(const qconv_dw_args *a, const void *const *taps, float *y, int64_t j0,   \
                            int64_t o, const int MPX, const int KW, const int S1)                    \
    {                                                                                                \
        const char *w = a->w;            /* [tap][ocp] of 4-byte weights */                          \
        const int64_t ocp = a->ocp, step = a->sw * ocp;                                              \
        VT acc[MP];                                                                                  \
        _Pragma("GCC unroll 16")                                                                     \
        for (int m = 0; m < MPX; m++)                                                                \
            acc[m] = ACCZERO;                                                                        \
        for (int64_t u = 0; u < a->kh; u++) {                                                        \
            const char *row = (const char *)taps[u * KW] + (size_t)(j0 * step + o) * (ES);           \
            const char *wr = w + (size_t)(u * KW * ocp + o) * 4;                                     \
            VT wv[7];                                                                                \
            _Pragma("GCC unroll 16")                                                                 \
            for (int v = 0; v < KW; v++)                                                             \
                wv[v] = LW(wr + (size_t)(v * ocp) * 4);                                              \
            if (S1) {                                                                                \
                _Pragma("GCC unroll 16")                                                             \
                for (int p = 0; p < MPX + KW - 1; p++) {                                             \
                    VT x = LD(row + (size_t)(p * ocp) * (ES));                                       \
                    _Pragma("GCC unroll 16")                                                         \
                    for (int v = 0; v < KW; v++)                                                     \
                        if (p - v >= 0 && p - v < MPX)                                               \
                            acc[p - v] = MAC(acc[p - v], x, wv[v]);                                  \
                }                                                                                    \
            } else {                                                                                 \
                _Pragma("GCC unroll 16")                                                             \
                for (int m = 0; m < MPX; m++)                                                        \
                    _Pragma("GCC unroll 16")                                                         \
                    for (int v = 0; v < KW; v++)                                                     \
                        acc[m] = MAC(acc[m], LD(row + (size_t)(m * step + v * ocp) * (ES)), wv[v]);  \
            }                                                                                        \
        }                                                                                            \
        _Pragma("GCC unroll 16")                                                                     \
        for (int m = 0; m < MPX; m++)                                                                \
            STORE(a, y + (j0 + m) * a->oc, acc[m], o);                                               \
    }

/* Any KW (the slow path for kernels wider than 7): one pixel, taps from the pointer table. */
#define DW_PIXEL(NAME, VT, ACCZERO, LD, LW, MAC, STORE, ES)                                            \
    ALWAYS_INLINE void NAME(const qconv_dw_args *a, const void *const *taps, float *y, int64_t j,    \
                            int64_t o)                                                               \
    {                                                                                                \
        const char *w = a->w;                                                                        \
        const int64_t nt = a->kh * a->kw, ocp = a->ocp, step = a->sw * ocp;                          \
        VT acc = ACCZERO;                                                                            \
        for (int64_t t = 0; t < nt; t++)                                                             \
            acc = MAC(acc, LD((const char *)taps[t] + (size_t)(j * step + o) * (ES)),                \
                      LW(w + (size_t)(t * ocp + o) * 4));                                             \
        STORE(a, y + j * a->oc, acc, o);                                                             \
    }

/* The row: strips of MP pixels (then single pixels for the tail), each over every 8-channel block
 * in order (the input and weights stream sequentially); one instance per (KW, stride 1 or not). */
#define DW_ROW(NAME, STRIP, PIXEL)                                                                   \
    ALWAYS_INLINE void NAME##_kw(const qconv_dw_args *a, const void *const *taps, float *y,          \
                                 const int KW, const int S1)                                         \
    {                                                                                                \
        int64_t j = 0;                                                                               \
        for (; j + MP <= a->wo; j += MP)                                                             \
            for (int64_t o = 0; o < a->oc; o += 8)                                                    \
                STRIP(a, taps, y, j, o, MP, KW, S1);                                                 \
        for (; j < a->wo; j++)                                                                       \
            for (int64_t o = 0; o < a->oc; o += 8)                                                    \
                STRIP(a, taps, y, j, o, 1, KW, S1);                                                  \
    }                                                                                                \
    static void NAME(const qconv_dw_args *args, const void *const *taps, float *y)                   \
    {                                                                                                \
        /* A local copy: stores to y cannot alias it, so sizes and pointers stay in registers. */   \
        const qconv_dw_args local = *args, *a = &local;                                              \
        const int s1 = a->sw == 1;                                                                   \
        switch (a->kw * 2 + s1) {                                                                    \
        case 2: NAME##_kw(a, taps, y, 1, 0); return;                                                 \
        case 3: NAME##_kw(a, taps, y, 1, 1); return;                                                 \
        case 6: NAME##_kw(a, taps, y, 3, 0); return;                                                 \
        case 7: NAME##_kw(a, taps, y, 3, 1); return;                                                 \
        case 10: NAME##_kw(a, taps, y, 5, 0); return;                                                \
        case 11: NAME##_kw(a, taps, y, 5, 1); return;                                                \
        case 14: NAME##_kw(a, taps, y, 7, 0); return;                                                \
        case 15: NAME##_kw(a, taps, y, 7, 1); return;                                                \
        default:                                                                                     \
            for (int64_t j = 0; j < a->wo; j++)                                                      \
                for (int64_t o = 0; o < a->oc; o += 8)                                                \
                    PIXEL(a, taps, y, j, o);                                                         \
        }                                                                                            \
    }

DW_STRIP(f32_strip, __m256, _mm256_setzero_ps(), LD_F32, LD_F32, MAC_F32, store8, 4)
DW_STRIP(s32_strip, __m256i, _mm256_setzero_si256(), LD_S32, LD_S32, MAC_S32, store8_s32, 4)
DW_STRIP(s16_strip, __m256i, _mm256_setzero_si256(), LD_S16, LD_S32, MAC_S32, store8_s32, 2)
DW_PIXEL(f32_pixel, __m256, _mm256_setzero_ps(), LD_F32, LD_F32, MAC_F32, store8, 4)
DW_PIXEL(s32_pixel, __m256i, _mm256_setzero_si256(), LD_S32, LD_S32, MAC_S32, store8_s32, 4)
DW_PIXEL(s16_pixel, __m256i, _mm256_setzero_si256(), LD_S16, LD_S32, MAC_S32, store8_s32, 2)
DW_ROW(f32_row, f32_strip, f32_pixel)
DW_ROW(s32_row, s32_strip, s32_pixel)
DW_ROW(s16_row, s16_strip, s16_pixel)

void qconv_f32_dwconv__avx2(const qconv_dw_args *a, const void *const *taps, float *y)
{
    f32_row(a, taps, y);
}

void qconv_s32_dwconv__avx2(const qconv_dw_args *a, const void *const *taps, float *y)
{
    s32_row(a, taps, y);
}

void qconv_s16_dwconv__avx2(const qconv_dw_args *a, const void *const *taps, float *y)
{
    s16_row(a, taps, y);
}
#endif /* x86 */
