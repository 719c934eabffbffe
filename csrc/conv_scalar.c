/* conv_scalar.c - the scalar twins: the c-scalar backend (the assignment's baseline) and the
 * reference each SIMD kernel is checked against.
 *
 * Primitive scalar operations only, single thread. The compiler must not auto-vectorize this file:
 * the pragma below turns off GCC's loop and SLP vectorizers for every function in it (the build
 * uses -O3, which would otherwise enable both). Integer sums are taken in uint32_t, so wrap-around
 * is defined (signed overflow would be UB) and equals the contract's two's-complement int32 sum.
 * Layout used here: nr = 1, grp = 1 (the kernel packed as [OC][KH][KW][C]), every integer stored
 * as int32. */
#pragma GCC optimize("no-tree-loop-vectorize", "no-tree-slp-vectorize")

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "qconv_impl.h"

/* One element of the contract's quantize: clamp(R(float32(t) * float32(s)), -qmax, qmax). */
static inline int32_t quantize1(float t, float s, int32_t qmax, int truncate)
{
    float v = t * s;                        /* one float32 multiply */
    double r = truncate ? truncf(v) : rintf(v);  /* rintf: half to even in the default mode */
    if (r > (double)qmax)                   /* double holds +-(2^31 - 1) exactly */
        return qmax;
    if (r < -(double)qmax)
        return -qmax;
    return (int32_t)r;
}

static int quantize__scalar(const float *src, int64_t count, float s, int32_t qmax, int truncate,
                            int store, void *dst)
{
    int bad = 0;
    for (int64_t i = 0; i < count; i++)
        bad |= !isfinite(src[i]);
    switch (store) {
    case QCONV_STORE_F32:
        memcpy(dst, src, (size_t)count * sizeof(float));
        break;
    case QCONV_STORE_I32: {
        int32_t *d = dst;
        for (int64_t i = 0; i < count; i++)
            d[i] = quantize1(src[i], s, qmax, truncate);
        break;
    }
    case QCONV_STORE_I16: {
        int16_t *d = dst;
        for (int64_t i = 0; i < count; i++)
            d[i] = (int16_t)quantize1(src[i], s, qmax, truncate);
        break;
    }
    case QCONV_STORE_I8: {
        int8_t *d = dst;
        for (int64_t i = 0; i < count; i++)
            d[i] = (int8_t)quantize1(src[i], s, qmax, truncate);
        break;
    }
    default: { /* QCONV_STORE_U8OFF */
        uint8_t *d = dst;
        for (int64_t i = 0; i < count; i++)
            d[i] = (uint8_t)(quantize1(src[i], s, qmax, truncate) + 128);
        break;
    }
    }
    return bad;
}

static float absmax__scalar(const float *src, int64_t count, int *nonfinite)
{
    float best = 0.0f;
    for (int64_t i = 0; i < count; i++) {
        if (!isfinite(src[i]))
            *nonfinite = 1;
        float v = fabsf(src[i]);
        best = v > best ? v : best;
    }
    return best;
}

static void dequantize__scalar(const int32_t *acc, int64_t npix, int64_t oc, const float *inv,
                               const float *bias, float *dst)
{
    for (int64_t p = 0; p < npix; p++)
        for (int64_t o = 0; o < oc; o++) {
            float y = (float)acc[p * oc + o] * inv[o];   /* int32 -> float rounds to nearest even */
            dst[p * oc + o] = bias != NULL ? y + bias[o] : y;
        }
}

/* y[n,i,j,o] = sum x[n, i*sh+u, j*sw+v, c] * w[o,u,v,c] over the padded input (tap t = u*KW + v
 * at a->tap[t]: qconv_impl.h's layout), float32
 * accumulation, then + bias[o]. */
static void qconv_f32_conv__scalar(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1)
{
    const float *xq = a->xq, *wq = a->wq;
    float *y = a->out;
    for (int64_t r = r0; r < r1; r++) {
        int64_t n = r / a->ho, i = r % a->ho;
        for (int64_t q = 0; q < a->wo; q++)
            for (int64_t o = b0; o < b1; o++) {
                const float *wo = wq + o * a->wblk;
                float acc = 0.0f;
                for (int64_t t = 0; t < a->kh * a->kw; t++) {
                    const float *xp = xq + n * a->img + i * a->rstep + q * a->xstep + a->tap[t];
                    const float *wp = wo + t * a->cp;
                    for (int64_t c = 0; c < a->c; c++)
                        acc += xp[c] * wp[c];
                }
                y[(r * a->wo + q) * a->ldy + o] = a->bias != NULL ? acc + a->bias[o] : acc;
            }
    }
}

/* The same with int32 operands, products and sums modulo 2^32; stores the accumulators (the
 * scalar family always dequantizes in its own pass). */
static void qconv_s32_conv__scalar(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1)
{
    const int32_t *xq = a->xq, *wq = a->wq;
    int32_t *y = a->out;
    for (int64_t r = r0; r < r1; r++) {
        int64_t n = r / a->ho, i = r % a->ho;
        for (int64_t q = 0; q < a->wo; q++)
            for (int64_t o = b0; o < b1; o++) {
                const int32_t *wo = wq + o * a->wblk;
                uint32_t acc = 0;
                for (int64_t t = 0; t < a->kh * a->kw; t++) {
                    const int32_t *xp = xq + n * a->img + i * a->rstep + q * a->xstep + a->tap[t];
                    const int32_t *wp = wo + t * a->cp;
                    for (int64_t c = 0; c < a->c; c++)
                        acc += (uint32_t)xp[c] * (uint32_t)wp[c];
                }
                y[(r * a->wo + q) * a->ldy + o] = (int32_t)acc;
            }
    }
}

/* 12 independent multiply-add chains of scalar floats (mul + add: this file is not contracted). */
double qconv_peak_body__scalar(int instr, int64_t iters)
{
    (void)instr;
    volatile float seed = 1.0f;
    float m = seed * 0.999999f, d = seed * 1e-7f;
    float a0 = seed, a1 = seed, a2 = seed, a3 = seed, a4 = seed, a5 = seed;
    float a6 = seed, a7 = seed, a8 = seed, a9 = seed, a10 = seed, a11 = seed;
    for (int64_t i = 0; i < iters; i++) {
        a0 = a0 * m + d; a1 = a1 * m + d; a2 = a2 * m + d; a3 = a3 * m + d;
        a4 = a4 * m + d; a5 = a5 * m + d; a6 = a6 * m + d; a7 = a7 * m + d;
        a8 = a8 * m + d; a9 = a9 * m + d; a10 = a10 * m + d; a11 = a11 * m + d;
    }
    seed = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
    return 12.0 * (double)iters;
}

const qconv_isa_table qconv_scalar_table = {
    .name = "scalar",
    .quantize = quantize__scalar,
    .absmax = absmax__scalar,
    .dequantize = dequantize__scalar,
    .conv = {qconv_f32_conv__scalar, qconv_s32_conv__scalar, qconv_s32_conv__scalar, qconv_s32_conv__scalar},
    .nr = {1, 1, 1, 1},
    .grp = {1, 1, 1, 1},
    .xstore = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I32, QCONV_STORE_I32},
    .wstore = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I32, QCONV_STORE_I32},
    .mr = {1, 1, 1, 1},
    .mrh = {0, 0, 0, 0},
    .dw = {qconv_f32_dwconv__scalar, qconv_s32_dwconv__scalar, qconv_s32_dwconv__scalar, qconv_s32_dwconv__scalar},
    .dw_store = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I32, QCONV_STORE_I32},
    .dw_block = 1,
    .dw_pack = qconv_dw_pack,
};
