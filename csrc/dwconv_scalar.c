/* dwconv_scalar.c - the depthwise kernels' scalar twins (c-scalar, and the reference each SIMD
 * depthwise kernel is checked against).
 *
 * One output row at a time from the zero-padded input rows the driver quantized (qconv.c): for
 * every output pixel and channel, a plain sum over the KH*KW taps. Integers are held as int32 and
 * summed in uint32_t (wrap-around modulo 2^32, no signed-overflow UB); the dequantize is fused:
 * (float)acc * inv[o], then + bias[o], two float32 operations. Not vectorized (pragma below).
 * Weights: [tap][ocp] (float for fp32, int32 otherwise, zeros past OC), ocp = OC rounded up to
 * the family's dw_block (1 here); qconv_dw_pack packs them for every family. */
#pragma GCC optimize("no-tree-loop-vectorize", "no-tree-slp-vectorize")

#include <stdint.h>
#include <string.h>

#include "qconv_impl.h"

int64_t qconv_dw_pack(int precision, const void *src, int64_t taps, int64_t oc, int64_t ocp, void *dst)
{
    (void)precision;
    if (dst != NULL) {
        memset(dst, 0, (size_t)(taps * ocp) * 4);
        for (int64_t t = 0; t < taps; t++)
            memcpy((char *)dst + (size_t)(t * ocp) * 4, (const char *)src + (size_t)(t * oc) * 4, (size_t)oc * 4);
    }
    return taps * ocp * 4;
}

void qconv_f32_dwconv__scalar(const qconv_dw_args *a, const void *const *taps, float *y)
{
    const float *w = a->w;
    const int64_t nt = a->kh * a->kw, step = a->sw * a->ocp;
    for (int64_t j = 0; j < a->wo; j++)
        for (int64_t o = 0; o < a->oc; o++) {
            float acc = 0.0f;
            for (int64_t t = 0; t < nt; t++)
                acc += ((const float *)taps[t])[j * step + o] * w[t * a->ocp + o];
            y[j * a->oc + o] = a->bias != NULL ? acc + a->bias[o] : acc;
        }
}

void qconv_s32_dwconv__scalar(const qconv_dw_args *a, const void *const *taps, float *y)
{
    const int32_t *w = a->w;
    const int64_t nt = a->kh * a->kw, step = a->sw * a->ocp;
    for (int64_t j = 0; j < a->wo; j++)
        for (int64_t o = 0; o < a->oc; o++) {
            uint32_t acc = 0;
            for (int64_t t = 0; t < nt; t++)
                acc += (uint32_t)((const int32_t *)taps[t])[j * step + o] * (uint32_t)w[t * a->ocp + o];
            float v = (float)(int32_t)acc * a->inv[o];   /* int32 -> float rounds to nearest even */
            y[j * a->oc + o] = a->bias != NULL ? v + a->bias[o] : v;
        }
}
