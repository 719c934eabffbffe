/* conv_tile.h - the microkernel and the loop over tiles, written once for the SIMD translation
 * units (included after the file's `#pragma GCC target`, so everything expands with that file's
 * ISA: ymm for AVX2 and VNNI, zmm for AVX-512).
 *
 * A tile function computes `mr` consecutive output pixels of one output row for one block of NR
 * output channels (QCONV_NR = 16 with ymm, 32 with zmm):
 *   TILE(a, x, w, init, ib, bb, y, nvalid, mr, half)
 *     x: padded input at the tile's first pixel's top-left tap (pixel m is m * a->xstep further:
 *        the stride is in that step)
 *     w: the OC block's packed kernel; init: the block's accumulator start (or NULL: zero)
 *     ib, bb: the block's NR dequantize factors and bias values (bb NULL: no bias)
 *     y: output (float or int32) at the tile's first pixel, channel o0; pixels a->ldy apart;
 *        nvalid: OC columns to store (<= NR)
 *     half: nvalid <= NR/2, so only the lower vector column is computed (OC = 24: 16 + 8, not 16 + 16)
 * QCONV_DEFINE_UKERNEL(name, ...) defines such a tile from per-type pieces (below).
 * QCONV_DEFINE_CONV(name, TILE, NR, MR, MRH, XT, WT, YT, ROW) defines
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

/* The microkernel, written once for every ISA and element type: an mr x NR tile (two vector
 * columns of NR/2 output channels; with `half`, only the lower one) with the TILE signature above.
 * For each tap t (offset a->tap[t]) and each CSTEP input channels c: load the kernel row w[c][0:NR] (two
 * columns), then for each pixel m broadcast x[m][c:c+CSTEP] and multiply-accumulate it with both.
 * The including file supplies MAXMR (its widest tile) and names what differs:
 *   XT, WT, YT      input, packed kernel and output element types
 *   VT              the vector type of one column (kernel elements per column: sizeof VT / sizeof WT)
 *   CSTEP           input channels per broadcast: the packing's grp (2 int16, 4 int8, else 1)
 *   ACC0(init, k)   column k's starting accumulator (zero; int8 dpbusd: its compensation)
 *   LOAD_W(p)       one kernel column (aligned)
 *   BCAST(x, o, c)  the CSTEP input channels at x + o + c (pixel offset o, channel c), repeated
 *                   in every lane
 *   MAC(acc, b, w)  acc + b * w, lane by lane (wrapping mod 2^32 for integers)
 *   STORE(a, y, acc, mr, half, nvalid, ib, bb)   the tile's stores */
#define QCONV_DEFINE_UKERNEL(name, XT, WT, YT, VT, CSTEP, ACC0, LOAD_W, BCAST, MAC, STORE)      \
    static inline __attribute__((always_inline)) void name(                                    \
        const qconv_conv_args *a, const XT *x, const WT *w, const int32_t *init, const float *ib,\
        const float *bb, YT *y, int64_t nvalid, const int mr, const int half)                  \
    {                                                                                          \
        (void)init;                                                                            \
        (void)ib;                                                                              \
        VT acc[MAXMR][2];                                                                      \
        const VT acc0 = ACC0(init, 0), acc1 = ACC0(init, 1);                                   \
        for (int m = 0; m < mr; m++) {                                                         \
            acc[m][0] = acc0;                                                                  \
            acc[m][1] = acc1;                                                                  \
        }                                                                                      \
        const int64_t step = a->xstep, cp = a->cp, taps = a->kh * a->kw;                       \
        const int64_t col = (int64_t)(sizeof(VT) / sizeof(WT));                                \
        for (int64_t t = 0; t < taps; t++) {                                                   \
            const XT *xp = x + a->tap[t];                                                      \
            for (int64_t c = 0; c < cp; c += (CSTEP)) {                                        \
                VT w0 = LOAD_W(w), w1 = LOAD_W(w + col);                                       \
                w += 2 * col;                                                                  \
                for (int m = 0; m < mr; m++) {                                                 \
                    VT b = BCAST(xp, m * step, c);                                             \
                    acc[m][0] = MAC(acc[m][0], b, w0);                                         \
                    if (!half) /* nvalid <= NR/2: the upper column is padding */               \
                        acc[m][1] = MAC(acc[m][1], b, w1);                                     \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        STORE(a, y, acc, mr, half, nvalid, ib, bb);                                            \
    }

/* The ymm pieces shared by the AVX2 and VNNI kernels (NR = 16). */
#define QCONV_YMM_ZERO_PS(init, k) _mm256_setzero_ps()
#define QCONV_YMM_ZERO_SI(init, k) _mm256_setzero_si256()
#define QCONV_YMM_LOAD_SI(p) _mm256_load_si256((const __m256i *)(const void *)(p))
/* 4 input bytes (two int16 or four uint8 channels) in every 32-bit lane: vpbroadcastd. */
#define QCONV_YMM_BCAST32(x, o, c) _mm256_set1_epi32(qconv_load_i32((x) + (o) + (c)))
#define QCONV_YMM_STORE_PS(a, y, acc, mr, half, nvalid, ib, bb) qconv_store_tile_ps(a, y, acc, mr, nvalid, bb)
#define QCONV_YMM_STORE_ACC(a, y, acc, mr, half, nvalid, ib, bb) qconv_store_tile_acc(a, y, acc, mr, nvalid, ib, bb)

/* One case of a row's switch over tile widths: the tile of width k (half: one column). */
#define QCONV_TILE_CASE(TILE, k, h)                                                            \
    case k: TILE(a, xr + q * a->xstep, wb, init, ib, bb, yr + q * a->ldy, nvalid, k, h); break;

/* QCONV_TILES(MR, TILE, h): the cases for widths 1 .. MR (MR one of 0, 6, 8, 12, 14, 16, 28). */
#define QCONV_TILES_0(T, h)
#define QCONV_TILES_6(T, h)                                                                    \
    QCONV_TILE_CASE(T, 1, h) QCONV_TILE_CASE(T, 2, h) QCONV_TILE_CASE(T, 3, h)                 \
    QCONV_TILE_CASE(T, 4, h) QCONV_TILE_CASE(T, 5, h) QCONV_TILE_CASE(T, 6, h)
#define QCONV_TILES_8(T, h) QCONV_TILES_6(T, h) QCONV_TILE_CASE(T, 7, h) QCONV_TILE_CASE(T, 8, h)
#define QCONV_TILES_12(T, h)                                                                   \
    QCONV_TILES_8(T, h) QCONV_TILE_CASE(T, 9, h) QCONV_TILE_CASE(T, 10, h)                     \
    QCONV_TILE_CASE(T, 11, h) QCONV_TILE_CASE(T, 12, h)
#define QCONV_TILES_14(T, h) QCONV_TILES_12(T, h) QCONV_TILE_CASE(T, 13, h) QCONV_TILE_CASE(T, 14, h)
#define QCONV_TILES_16(T, h) QCONV_TILES_14(T, h) QCONV_TILE_CASE(T, 15, h) QCONV_TILE_CASE(T, 16, h)
#define QCONV_TILES_28(T, h)                                                                   \
    QCONV_TILES_16(T, h) QCONV_TILE_CASE(T, 17, h) QCONV_TILE_CASE(T, 18, h)                   \
    QCONV_TILE_CASE(T, 19, h) QCONV_TILE_CASE(T, 20, h) QCONV_TILE_CASE(T, 21, h)              \
    QCONV_TILE_CASE(T, 22, h) QCONV_TILE_CASE(T, 23, h) QCONV_TILE_CASE(T, 24, h)              \
    QCONV_TILE_CASE(T, 25, h) QCONV_TILE_CASE(T, 26, h) QCONV_TILE_CASE(T, 27, h)              \
    QCONV_TILE_CASE(T, 28, h)
#define QCONV_CAT_(a, b) a##b
#define QCONV_CAT(a, b) QCONV_CAT_(a, b)
#define QCONV_TILES(MR, TILE, h) QCONV_CAT(QCONV_TILES_, MR)(TILE, h)

/* Walk one output row in nt balanced tiles of width tw or tw + 1 (the first `wide` ones). */
#define QCONV_ROW(MR, TILE, h)                                                                 \
    for (int64_t t = 0, q = 0; t < nt; q += tw + (t < wide), t++)                              \
        switch (tw + (t < wide)) {                                                             \
        QCONV_TILES(MR, TILE, h)                                                               \
        default: break; /* unreachable: 1 <= width <= MR */                                    \
        }

/* The row walk with the `half` test outside the tile loop (ymm) or inside it (zmm): the same
 * walk, but GCC allocates registers differently around the two, and each family keeps the
 * placement it was measured with. Built the other way, the AVX-512 kernels' disassembly changed
 * (some 28-pixel half tiles spilled several times more accumulators) and the VNNI ones' too;
 * neither can be timed on an AVX2-only machine. */
#define QCONV_ROW_HALF_OUTSIDE(MR, MRH, TILE)                                                  \
    if (half) {                                                                                \
        QCONV_ROW(MRH, TILE, 1)                                                                \
    } else {                                                                                   \
        QCONV_ROW(MR, TILE, 0)                                                                 \
    }
#define QCONV_ROW_HALF_INSIDE(MR, MRH, TILE)                                                   \
    for (int64_t t = 0, q = 0; t < nt; q += tw + (t < wide), t++) {                            \
        if (half) {                                                                            \
            switch (tw + (t < wide)) {                                                         \
            QCONV_TILES(MRH, TILE, 1)                                                          \
            default: break; /* unreachable: 1 <= width <= MRH */                               \
            }                                                                                  \
        } else {                                                                               \
            switch (tw + (t < wide)) {                                                         \
            QCONV_TILES(MR, TILE, 0)                                                           \
            default: break; /* unreachable: 1 <= width <= MR */                                \
            }                                                                                  \
        }                                                                                      \
    }

/* Half-width tiles (one vector column) hold twice the pixels: as many independent accumulator
 * chains as a full tile. They need one x broadcast per multiply-accumulate instruction (a full
 * tile: one per two), which caps FP32 at about half the FMA rate on Zen 4 (measured: an
 * 8-channel block cost as much as a 16-channel one), so the AVX2 FP32 kernel passes MRH = 0 (no
 * half tiles); the integer kernels gain (int8 dpbusd: 8 channels in 76% of the time of 16;
 * int32: 57%). */
#define QCONV_DEFINE_CONV(name, TILE, NR, MR, MRH, XT, WT, YT, ROW)                            \
    void name(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1)        \
    {                                                                                          \
        const XT *xq = (const XT *)a->xq;                                                      \
        const WT *wq = (const WT *)a->wq;                                                      \
        YT *out = (YT *)a->out;                                                                \
        for (int64_t b = b0; b < b1; b++) {                                                    \
            const WT *wb = wq + b * a->wblk;                                                   \
            const int32_t *init = a->comp ? a->comp + b * (NR) : NULL;                         \
            const float *ib = a->inv ? a->inv + b * (NR) : NULL;                               \
            const float *bb = a->bias ? a->bias + b * (NR) : NULL;                             \
            int64_t nvalid = a->oc - b * (NR);                                                 \
            if (nvalid > (NR))                                                                 \
                nvalid = (NR);                                                                 \
            /* <= NR/2 channels left: the upper column is all padding; skip it (MRH > 0).   */ \
            const int half = (MRH) > 0 && nvalid <= (NR) / 2;                                  \
            /* Balanced tiles: ceil(WO / width) tiles whose widths differ by at most one    */ \
            /* pixel (WO = 28, MR = 8: four tiles of 7, not three of 8 and a tail of 4).     */ \
            const int64_t mr = half ? (MRH) : (MR);                                            \
            const int64_t nt = (a->wo + mr - 1) / mr, tw = a->wo / nt, wide = a->wo % nt;      \
            for (int64_t r = r0; r < r1; r++) {                                                \
                int64_t n = r / a->ho, i = r % a->ho;                                          \
                const XT *xr = xq + n * a->img + i * a->rstep;                                 \
                YT *yr = out + r * a->wo * a->ldy + b * (NR);                                  \
                ROW(MR, MRH, TILE)                                                             \
            }                                                                                  \
        }                                                                                      \
    }

#endif
