/* conv_tile.h - the loop over tiles shared by the SIMD translation units (included after the
 * file's `#pragma GCC target`, so everything expands with that file's ISA).
 *
 * A tile function computes `mr` consecutive output pixels of one output row for one block of
 * QCONV_NR output channels:
 *   TILE(a, x, w, init, ib, bb, y, nvalid, mr, half)
 *     x: padded input at the tile's first pixel's top-left tap (pixel m is m * a->xstep further:
 *        the stride is in that step)
 *     w: the OC block's packed kernel; init: the block's accumulator start (or NULL: zero)
 *     ib, bb: the block's 16 dequantize factors and bias values (bb NULL: no bias)
 *     y: output (float or int32) at the tile's first pixel, channel o0; pixels a->ldy apart;
 *        nvalid: OC columns to store (<= QCONV_NR)
 *     half: nvalid <= 8, so only the lower ymm column is computed (OC = 24: 16 + 8, not 16 + 16)
 * QCONV_DEFINE_CONV(name, TILE, MR, MRH, XT, WT, YT) defines
 *   void name(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1)
 * that walks OC blocks (outer: the packed block stays in cache), then rows, then the row's tiles:
 * ceil(WO / MR) of them, widths balanced to within one pixel, each a constant-width instance. */
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

/* Store a tile's int32 accumulators, or with a->fused their dequantized values: cvtdq2ps
 * (round to nearest even under the default MXCSR), one multiply by inv[o], then (with a bias) one
 * add of bias[o]: two float32 operations, never fused (the build has -ffp-contract=off and no
 * fmadd is written here). */
static inline __attribute__((always_inline)) void qconv_store_tile_acc(const qconv_conv_args *a, int32_t *y,
                                                                        __m256i (*acc)[2], const int mr,
                                                                        int64_t nvalid, const float *ib,
                                                                        const float *bb)
{
    if (a->fused) {
        const __m256 i0 = _mm256_loadu_ps(ib), i1 = _mm256_loadu_ps(ib + 8);
        if (bb != NULL) {
            const __m256 c0 = _mm256_loadu_ps(bb), c1 = _mm256_loadu_ps(bb + 8);
            for (int m = 0; m < mr; m++)
                qconv_store16_ps((float *)(void *)(y + m * a->ldy),
                                 _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][0]), i0), c0),
                                 _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][1]), i1), c1), nvalid);
        } else {
            for (int m = 0; m < mr; m++)
                qconv_store16_ps((float *)(void *)(y + m * a->ldy), _mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][0]), i0),
                                 _mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][1]), i1), nvalid);
        }
        return;
    }
    for (int m = 0; m < mr; m++) {
        int32_t *ym = y + m * a->ldy;
        if (nvalid == 16) {
            _mm256_storeu_si256((__m256i *)ym, acc[m][0]);
            _mm256_storeu_si256((__m256i *)(ym + 8), acc[m][1]);
        } else {
            int32_t t[16];
            _mm256_storeu_si256((__m256i *)t, acc[m][0]);
            _mm256_storeu_si256((__m256i *)(t + 8), acc[m][1]);
            memcpy(ym, t, (size_t)nvalid * 4);
        }
    }
}

/* Store a tile's float32 accumulators (fp32), plus bias[o] after the accumulation if given. */
static inline __attribute__((always_inline)) void qconv_store_tile_ps(const qconv_conv_args *a, float *y,
                                                                       __m256 (*acc)[2], const int mr,
                                                                       int64_t nvalid, const float *bb)
{
    if (bb != NULL) {
        const __m256 c0 = _mm256_loadu_ps(bb), c1 = _mm256_loadu_ps(bb + 8);
        for (int m = 0; m < mr; m++)
            qconv_store16_ps(y + m * a->ldy, _mm256_add_ps(acc[m][0], c0), _mm256_add_ps(acc[m][1], c1), nvalid);
    } else {
        for (int m = 0; m < mr; m++)
            qconv_store16_ps(y + m * a->ldy, acc[m][0], acc[m][1], nvalid);
    }
}

#define QCONV_TILE_CASE(TILE, k, h)                                                            \
    case k: TILE(a, xr + q * a->xstep, wb, init, ib, bb, yr + q * a->ldy, nvalid, k, h); break;

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
            const float *ib = a->inv ? a->inv + b * QCONV_NR : NULL;                           \
            const float *bb = a->bias ? a->bias + b * QCONV_NR : NULL;                         \
            int64_t nvalid = a->oc - b * QCONV_NR;                                             \
            if (nvalid > QCONV_NR)                                                             \
                nvalid = QCONV_NR;                                                             \
            /* <= 8 channels left: the upper ymm column is all padding; skip it (MRH > 0).  */ \
            const int half = (MRH) > 0 && nvalid <= QCONV_NR / 2;                              \
            /* Balanced tiles: ceil(WO / width) tiles whose widths differ by at most one    */ \
            /* pixel (WO = 28, MR = 8: four tiles of 7, not three of 8 and a tail of 4).     */ \
            const int64_t mr = half ? (MRH) : (MR);                                            \
            const int64_t nt = (a->wo + mr - 1) / mr, tw = a->wo / nt, wide = a->wo % nt;      \
            for (int64_t r = r0; r < r1; r++) {                                                \
                int64_t n = r / a->ho, i = r % a->ho;                                          \
                const XT *xr = xq + n * a->img + i * a->rstep;                                 \
                YT *yr = out + r * a->wo * a->ldy + b * QCONV_NR;                              \
                if (half) {                                                                    \
                    QCONV_ROW_HALF(TILE)                                                       \
                } else {                                                                       \
                    QCONV_ROW_FULL(TILE)                                                       \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

#endif
