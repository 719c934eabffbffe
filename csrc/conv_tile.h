/* conv_tile.h - the loop over tiles shared by the SIMD translation units (included after the
 * file's `#pragma GCC target`, so everything expands with that file's ISA).
 *
 * A tile function computes `mr` consecutive output pixels of one output row for one block of
 * QCONV_NR output channels:
 *   TILE(a, x, w, init, y, nvalid, mr, half)
 *     x: padded input at (n, i, q, 0) (the tile's first pixel, top-left tap)
 *     w: the OC block's packed kernel; init: the block's accumulator start (or NULL: zero)
 *     y: output (float or int32) at (n, i, q, o0); nvalid: OC columns to store (<= QCONV_NR)
 *     half: nvalid <= 8, so only the lower ymm column is computed (OC = 24: 16 + 8, not 16 + 16)
 * QCONV_DEFINE_CONV(name, TILE, MR, MRH, XT, WT, YT) defines
 *   void name(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1)
 * that walks OC blocks (outer: the packed block stays in cache), then rows, then the row's tiles:
 * ceil(W / MR) of them, widths balanced to within one pixel, each a constant-width instance. */
#ifndef QCONV_CONV_TILE_H
#define QCONV_CONV_TILE_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "qconv_impl.h"

/* Unaligned 4-byte load without aliasing UB (one mov). */
static inline __attribute__((always_inline)) int32_t qconv_load_i32(const void *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Store one pixel's 16 outputs; a partial OC block goes through a buffer (no write past the row). */
static inline __attribute__((always_inline)) void qconv_store16_ps(float *y, __m256 a0, __m256 a1, int64_t nvalid)
{
    if (nvalid == 16) {
        _mm256_storeu_ps(y, a0);
        _mm256_storeu_ps(y + 8, a1);
    } else {
        float t[16];
        _mm256_storeu_ps(t, a0);
        _mm256_storeu_ps(t + 8, a1);
        memcpy(y, t, (size_t)nvalid * 4);
    }
}

/* Store one pixel's 16 int32 accumulators, or with a->fused their dequantized values:
 * cvtdq2ps (round to nearest even under the default MXCSR) then one multiply by inv. */
static inline __attribute__((always_inline)) void qconv_store16_acc(const qconv_conv_args *a, int32_t *y,
                                                                     __m256i a0, __m256i a1, int64_t nvalid)
{
    if (a->fused) {
        __m256 inv = _mm256_set1_ps(a->inv);
        qconv_store16_ps((float *)(void *)y, _mm256_mul_ps(_mm256_cvtepi32_ps(a0), inv),
                         _mm256_mul_ps(_mm256_cvtepi32_ps(a1), inv), nvalid);
    } else if (nvalid == 16) {
        _mm256_storeu_si256((__m256i *)y, a0);
        _mm256_storeu_si256((__m256i *)(y + 8), a1);
    } else {
        int32_t t[16];
        _mm256_storeu_si256((__m256i *)t, a0);
        _mm256_storeu_si256((__m256i *)(t + 8), a1);
        memcpy(y, t, (size_t)nvalid * 4);
    }
}

#define QCONV_TILE_CASE(TILE, k, h)                                                            \
    case k: TILE(a, xr + q * a->pix, wb, init, yr + q * a->oc, nvalid, k, h); break;

/* Walk one output row in ntiles balanced tiles of width tw or tw + 1 (the first `wide` ones). */
#define QCONV_ROW_FULL(TILE)                                                                   \
    for (int64_t t = 0, q = 0; t < nt; q += tw + (t < wide), t++)                              \
        switch (tw + (t < wide)) {                                                             \
        QCONV_TILE_CASE(TILE, 1, 0) QCONV_TILE_CASE(TILE, 2, 0) QCONV_TILE_CASE(TILE, 3, 0)    \
        QCONV_TILE_CASE(TILE, 4, 0) QCONV_TILE_CASE(TILE, 5, 0) QCONV_TILE_CASE(TILE, 6, 0)    \
        QCONV_TILE_CASE(TILE, 7, 0) QCONV_TILE_CASE(TILE, 8, 0)                                \
        default: break; /* unreachable: 1 <= width <= MR <= 8 */                               \
        }

/* Half-width tiles (one ymm column) hold twice the pixels, up to 16: as many independent
 * accumulator chains as a full tile. They need one x broadcast per multiply-accumulate
 * instruction (a full tile: one per two), which caps FP32 at about half the FMA rate on Zen 4
 * (measured: an 8-channel block cost as much as a 16-channel one), so the FP32 kernel passes
 * MRH = 0 (no half tiles); the integer kernels gain (int8 dpbusd: 8 channels in 76% of the time
 * of 16; int32: 57%). */
#define QCONV_ROW_HALF(TILE)                                                                   \
    for (int64_t t = 0, q = 0; t < nt; q += tw + (t < wide), t++)                              \
        switch (tw + (t < wide)) {                                                             \
        QCONV_TILE_CASE(TILE, 1, 1) QCONV_TILE_CASE(TILE, 2, 1) QCONV_TILE_CASE(TILE, 3, 1)    \
        QCONV_TILE_CASE(TILE, 4, 1) QCONV_TILE_CASE(TILE, 5, 1) QCONV_TILE_CASE(TILE, 6, 1)    \
        QCONV_TILE_CASE(TILE, 7, 1) QCONV_TILE_CASE(TILE, 8, 1) QCONV_TILE_CASE(TILE, 9, 1)    \
        QCONV_TILE_CASE(TILE, 10, 1) QCONV_TILE_CASE(TILE, 11, 1) QCONV_TILE_CASE(TILE, 12, 1) \
        QCONV_TILE_CASE(TILE, 13, 1) QCONV_TILE_CASE(TILE, 14, 1) QCONV_TILE_CASE(TILE, 15, 1) \
        QCONV_TILE_CASE(TILE, 16, 1)                                                           \
        default: break; /* unreachable: 1 <= width <= MRH <= 16 */                             \
        }

#define QCONV_DEFINE_CONV(name, TILE, MR, MRH, XT, WT, YT)                                     \
    void name(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1)        \
    {                                                                                          \
        const XT *xq = (const XT *)a->xq;                                                      \
        const WT *wq = (const WT *)a->wq;                                                      \
        YT *out = (YT *)a->out;                                                                \
        for (int64_t b = b0; b < b1; b++) {                                                    \
            const WT *wb = wq + b * a->wblk;                                                   \
            const int32_t *init = a->comp ? a->comp + b * QCONV_NR : NULL;                     \
            int64_t nvalid = a->oc - b * QCONV_NR;                                             \
            if (nvalid > QCONV_NR)                                                             \
                nvalid = QCONV_NR;                                                             \
            /* <= 8 channels left: the upper ymm column is all padding; skip it (MRH > 0).  */ \
            const int half = (MRH) > 0 && nvalid <= QCONV_NR / 2;                              \
            /* Balanced tiles: ceil(W / width) tiles whose widths differ by at most one     */ \
            /* pixel (W = 28, MR = 8: four tiles of 7, not three of 8 and a tail of 4).      */ \
            const int64_t mr = half ? (MRH) : (MR);                                            \
            const int64_t nt = (a->w + mr - 1) / mr, tw = a->w / nt, wide = a->w % nt;         \
            for (int64_t r = r0; r < r1; r++) {                                                \
                int64_t n = r / a->h, i = r % a->h;                                            \
                const XT *xr = xq + n * a->img + i * a->row;                                   \
                YT *yr = out + r * a->w * a->oc + b * QCONV_NR;                                \
                if (half) {                                                                    \
                    QCONV_ROW_HALF(TILE)                                                       \
                } else {                                                                       \
                    QCONV_ROW_FULL(TILE)                                                       \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

#endif
