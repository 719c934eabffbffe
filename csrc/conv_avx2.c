/* conv_avx2.c - AVX2 + FMA kernels: the only translation unit built with AVX2 enabled (the pragma
 * below; the VNNI files carry their own). Reached only through qconv_avx2_table after cpu_features.c has
 * checked the CPU, so the rest of the extension runs on any x86-64.
 *
 * Microkernels (one body in conv_tile.h, the per-type pieces below): MR output pixels x 16 output
 * channels (two ymm columns), register-blocked, implicit GEMM over the zero-padded input (no
 * im2col): for each tap (u, v) and input channel (group) c, broadcast x[pixel m, c] and
 * multiply-accumulate with the packed kernel row w[c][0:16].
 *   f32: vbroadcastss + vfmadd231ps               (6 x 16, 12 accumulators)
 *   s32: vpbroadcastd + vpmulld + vpaddd           (6 x 16), products and sums wrap mod 2^32
 *   s16: vpbroadcastd (2 channels) + vpmaddwd + vpaddd (6 x 16); also INT8 here (values +-127
 *        held in int16), since a pair of int16 products never exceeds 2 * 32767^2 < 2^31.
 * A last OC block of <= 8 channels runs the integer tiles at half width (12 x 8, see conv_tile.h).
 * Names: qconv_<type>_ukernel__<isa>_<MR>x<NR>; the loops over tiles are qconv_<type>_conv__<isa>.
 * Quantize/dequantize are vectorized here too. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "conv_tile.h"
#include "qconv_impl.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ---- quantize / dequantize ------------------------------------------------------------- */

/* All ones in the lanes of t that hold a NaN or an infinity: |t| !< inf, unordered included. */
ALWAYS_INLINE __m256 nonfinite8(__m256 t)
{
    const __m256 abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), t);
    return _mm256_cmp_ps(abs, _mm256_set1_ps(__builtin_inff()), _CMP_NLT_UQ);
}

/* 8 floats -> 8 int32 under the contract: one multiply, round (half-even or toward zero),
 * clamp to +-qmax. INT8/INT16 clamp first, in float (qmax is exact), then convert: cvtps rounds
 * half to even under the default MXCSR, cvttps truncates, and rounding commutes with clamping to
 * integer bounds. The int32 store rounds first, then saturates values at or past +-2^31
 * explicitly (where cvt returns 0x80000000) to +-(2^31 - 1), then clamps to +-qmax in integers. */
ALWAYS_INLINE __m256i quantize8(__m256 t, __m256 s, const int wide, const int truncate, __m256 m, __m256 negm,
                                __m256i qpos, __m256i qneg)
{
    __m256 v = _mm256_mul_ps(t, s);
    if (wide) {
        __m256 r = truncate ? _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC)
                            : _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 hi = _mm256_cmp_ps(r, _mm256_set1_ps(2147483648.0f), _CMP_GE_OQ);
        __m256 lo = _mm256_cmp_ps(r, _mm256_set1_ps(-2147483648.0f), _CMP_LE_OQ);
        __m256i q = _mm256_cvttps_epi32(r);
        q = _mm256_blendv_epi8(q, _mm256_set1_epi32(2147483647), _mm256_castps_si256(hi));
        q = _mm256_blendv_epi8(q, _mm256_set1_epi32(-2147483647), _mm256_castps_si256(lo));
        /* A narrower qmax stored as int32 (the depthwise kernels' int16/int8 weights): clamp
         * the integers, exactly. */
        return _mm256_min_epi32(_mm256_max_epi32(q, qneg), qpos);
    }
    v = _mm256_min_ps(_mm256_max_ps(v, negm), m);
    return truncate ? _mm256_cvttps_epi32(v) : _mm256_cvtps_epi32(v);
}

/* 32 elements: the packs interleave 128-bit lanes, vpermd/vpermq put them back in order.
 * Non-finite lanes are or-ed into *bad. */
ALWAYS_INLINE void quantize32(const float *src, float s, int32_t qmax, const int truncate,
                              const int store, char *o, __m256 *bad)
{
    const int wide = store == QCONV_STORE_I32;
    const __m256 vs = _mm256_set1_ps(s), m = _mm256_set1_ps((float)qmax), negm = _mm256_set1_ps(-(float)qmax);
    const __m256i qpos = _mm256_set1_epi32(qmax), qneg = _mm256_set1_epi32(-qmax);
    const __m256 t0 = _mm256_loadu_ps(src), t1 = _mm256_loadu_ps(src + 8);
    const __m256 t2 = _mm256_loadu_ps(src + 16), t3 = _mm256_loadu_ps(src + 24);
    *bad = _mm256_or_ps(*bad, _mm256_or_ps(_mm256_or_ps(nonfinite8(t0), nonfinite8(t1)),
                                           _mm256_or_ps(nonfinite8(t2), nonfinite8(t3))));
    __m256i q0 = quantize8(t0, vs, wide, truncate, m, negm, qpos, qneg);
    __m256i q1 = quantize8(t1, vs, wide, truncate, m, negm, qpos, qneg);
    __m256i q2 = quantize8(t2, vs, wide, truncate, m, negm, qpos, qneg);
    __m256i q3 = quantize8(t3, vs, wide, truncate, m, negm, qpos, qneg);
    if (store == QCONV_STORE_I32) {
        _mm256_storeu_si256((__m256i *)o, q0);
        _mm256_storeu_si256((__m256i *)(o + 32), q1);
        _mm256_storeu_si256((__m256i *)(o + 64), q2);
        _mm256_storeu_si256((__m256i *)(o + 96), q3);
    } else if (store == QCONV_STORE_I16) {
        _mm256_storeu_si256((__m256i *)o, _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8));
        _mm256_storeu_si256((__m256i *)(o + 32), _mm256_permute4x64_epi64(_mm256_packs_epi32(q2, q3), 0xD8));
    } else {
        __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
        b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        if (store == QCONV_STORE_U8OFF)  /* q + 128 == q ^ 0x80 for q in -127..127 */
            b = _mm256_xor_si256(b, _mm256_set1_epi8((char)0x80));
        _mm256_storeu_si256((__m256i *)o, b);
    }
}

ALWAYS_INLINE int quantize_loop(const float *src, int64_t count, float s, int32_t qmax,
                                const int truncate, const int store, void *dst)
{
    const size_t es = store == QCONV_STORE_I32 ? 4 : store == QCONV_STORE_I16 ? 2 : 1;
    char *d = dst;
    __m256 bad = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= count; i += 32)
        quantize32(src + i, s, qmax, truncate, store, d + (size_t)i * es, &bad);
    if (i < count) { /* tail: through zero-padded buffers, the same arithmetic */
        float tin[32] = {0};
        char tout[128];
        memcpy(tin, src + i, (size_t)(count - i) * sizeof(float));
        quantize32(tin, s, qmax, truncate, store, tout, &bad);
        memcpy(d + (size_t)i * es, tout, (size_t)(count - i) * es);
    }
    return _mm256_movemask_ps(bad) != 0;
}

/* One constant-folded loop per (rounding, store). */
#define QUANTIZE_CASES(tr)                                                                            \
    switch (store) {                                                                                  \
    case QCONV_STORE_I32: return quantize_loop(src, count, s, qmax, tr, QCONV_STORE_I32, dst);        \
    case QCONV_STORE_I16: return quantize_loop(src, count, s, qmax, tr, QCONV_STORE_I16, dst);        \
    case QCONV_STORE_I8: return quantize_loop(src, count, s, qmax, tr, QCONV_STORE_I8, dst);          \
    default: return quantize_loop(src, count, s, qmax, tr, QCONV_STORE_U8OFF, dst);                   \
    }

/* fp32's padded copy: copy and look for non-finite values in the same pass. */
static int copy_checked(const float *src, int64_t count, float *dst)
{
    __m256 bad = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
        __m256 t0 = _mm256_loadu_ps(src + i), t1 = _mm256_loadu_ps(src + i + 8);
        bad = _mm256_or_ps(bad, _mm256_or_ps(nonfinite8(t0), nonfinite8(t1)));
        _mm256_storeu_ps(dst + i, t0);
        _mm256_storeu_ps(dst + i + 8, t1);
    }
    int tail = 0;
    for (; i < count; i++) {
        tail |= !__builtin_isfinite(src[i]);
        dst[i] = src[i];
    }
    return tail | (_mm256_movemask_ps(bad) != 0);
}

int qconv_quantize__avx2(const float *src, int64_t count, float s, int32_t qmax, int truncate,
                         int store, void *dst)
{
    if (store == QCONV_STORE_F32)
        return copy_checked(src, count, dst);
    if (truncate) {
        QUANTIZE_CASES(1)
    } else {
        QUANTIZE_CASES(0)
    }
}

/* max |src[i]|, four independent vmaxps chains; non-finite values flagged on the side (vmaxps
 * would drop a NaN). */
float qconv_absmax__avx2(const float *src, int64_t count, int *nonfinite)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m0 = _mm256_setzero_ps(), m1 = m0, m2 = m0, m3 = m0, bad = m0;
    int64_t i = 0;
    for (; i + 32 <= count; i += 32) {
        __m256 t0 = _mm256_loadu_ps(src + i), t1 = _mm256_loadu_ps(src + i + 8);
        __m256 t2 = _mm256_loadu_ps(src + i + 16), t3 = _mm256_loadu_ps(src + i + 24);
        bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_or_ps(nonfinite8(t0), nonfinite8(t1)),
                                             _mm256_or_ps(nonfinite8(t2), nonfinite8(t3))));
        m0 = _mm256_max_ps(m0, _mm256_andnot_ps(sign, t0));
        m1 = _mm256_max_ps(m1, _mm256_andnot_ps(sign, t1));
        m2 = _mm256_max_ps(m2, _mm256_andnot_ps(sign, t2));
        m3 = _mm256_max_ps(m3, _mm256_andnot_ps(sign, t3));
    }
    m0 = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
    float lanes[8];
    _mm256_storeu_ps(lanes, m0);
    float best = 0.0f;
    for (int k = 0; k < 8; k++)
        best = lanes[k] > best ? lanes[k] : best;
    int tail = 0;
    for (; i < count; i++) {
        float v = __builtin_fabsf(src[i]);
        tail |= !__builtin_isfinite(src[i]);
        best = v > best ? v : best;
    }
    if (tail || _mm256_movemask_ps(bad) != 0)
        *nonfinite = 1;
    return best;
}

/* dst[p, o] = (float)acc[p, o] * inv[o] (+ bias[o]): cvtdq2ps rounds to nearest even under the
 * default MXCSR; multiply and add are separate instructions. */
ALWAYS_INLINE __m256 dequant8(__m256i acc, const float *inv, const float *bias, const int has_bias)
{
    __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(inv));
    return has_bias ? _mm256_add_ps(y, _mm256_loadu_ps(bias)) : y;
}

ALWAYS_INLINE void dequantize_rows(const int32_t *acc, int64_t npix, int64_t oc, const float *inv,
                                   const float *bias, float *dst, const int has_bias)
{
    for (int64_t p = 0; p < npix; p++, acc += oc, dst += oc) {
        int64_t o = 0;
        for (; o + 8 <= oc; o += 8)
            _mm256_storeu_ps(dst + o, dequant8(_mm256_loadu_si256((const __m256i *)(acc + o)), inv + o,
                                               bias + (has_bias ? o : 0), has_bias));
        if (o < oc) {
            int32_t tin[8] = {0};
            float ti[8] = {0}, tb[8] = {0}, tout[8];
            memcpy(tin, acc + o, (size_t)(oc - o) * 4);
            memcpy(ti, inv + o, (size_t)(oc - o) * 4);
            if (has_bias)
                memcpy(tb, bias + o, (size_t)(oc - o) * 4);
            _mm256_storeu_ps(tout, dequant8(_mm256_loadu_si256((const __m256i *)tin), ti, tb, has_bias));
            memcpy(dst + o, tout, (size_t)(oc - o) * 4);
        }
    }
}

void qconv_dequantize__avx2(const int32_t *acc, int64_t npix, int64_t oc, const float *inv,
                            const float *bias, float *dst)
{
    if (bias != NULL)
        dequantize_rows(acc, npix, oc, inv, bias, dst, 1);
    else
        dequantize_rows(acc, npix, oc, inv, inv, dst, 0);
}

/* ---- microkernels ---------------------------------------------------------------------- */

#define AVX2_MR 6   /* 16 ymm registers: 6 x 16 tile = 12 accumulators, 2 kernel columns, 1 broadcast */
#define AVX2_MRH 12 /* half-width tiles: 12 x 8 = 12 accumulators */
#define MAXMR AVX2_MRH

/* The AVX2 pieces of the microkernel (conv_tile.h). x[o + c] in every lane: int32 indexes x, as
 * this kernel always did (the pointer form changes GCC's register allocation; int16 uses it). */
#define BCAST_F32(x, o, c) _mm256_broadcast_ss((x) + (o) + (c))
#define BCAST_S32(x, o, c) _mm256_set1_epi32((x)[(o) + (c)])
/* acc + b * w: one vfmadd231ps; or vpmulld + vpaddd (wrapping); or vpmaddwd (b holds two int16
 * channels: x0*w0 + x1*w1 per lane) + vpaddd. */
#define MAC_F32(acc, b, w) _mm256_fmadd_ps((b), (w), (acc))
#define MAC_S32(acc, b, w) _mm256_add_epi32((acc), _mm256_mullo_epi32((b), (w)))
#define MAC_S16(acc, b, w) _mm256_add_epi32((acc), _mm256_madd_epi16((b), (w)))

QCONV_DEFINE_UKERNEL(qconv_f32_ukernel__avx2_6x16, float, float, float, __m256, 1, QCONV_YMM_ZERO_PS,
                     _mm256_load_ps, BCAST_F32, MAC_F32, QCONV_YMM_STORE_PS)
QCONV_DEFINE_UKERNEL(qconv_s32_ukernel__avx2_6x16, int32_t, int32_t, int32_t, __m256i, 1, QCONV_YMM_ZERO_SI,
                     QCONV_YMM_LOAD_SI, BCAST_S32, MAC_S32, QCONV_YMM_STORE_ACC)
QCONV_DEFINE_UKERNEL(qconv_s16_ukernel__avx2_6x16, int16_t, int16_t, int32_t, __m256i, 2, QCONV_YMM_ZERO_SI,
                     QCONV_YMM_LOAD_SI, QCONV_YMM_BCAST32, MAC_S16, QCONV_YMM_STORE_ACC)

/* FP32 has no half tiles (MRH 0: see conv_tile.h). */
QCONV_DEFINE_CONV(qconv_f32_conv__avx2, qconv_f32_ukernel__avx2_6x16, QCONV_NR, AVX2_MR, 0, float, float, float,
                  QCONV_ROW_HALF_OUTSIDE)
QCONV_DEFINE_CONV(qconv_s32_conv__avx2, qconv_s32_ukernel__avx2_6x16, QCONV_NR, AVX2_MR, AVX2_MRH, int32_t, int32_t,
                  int32_t, QCONV_ROW_HALF_OUTSIDE)
QCONV_DEFINE_CONV(qconv_s16_conv__avx2, qconv_s16_ukernel__avx2_6x16, QCONV_NR, AVX2_MR, AVX2_MRH, int16_t, int16_t,
                  int32_t, QCONV_ROW_HALF_OUTSIDE)

/* ---- instruction microbenchmarks ------------------------------------------------------- */

/* 12 independent accumulator chains per loop, one function per instruction so that only the
 * 12 accumulators and 2 operands are live (no spills). Each returns the MACs done. */
static __attribute__((noinline)) double peak_fma(int64_t iters)
{
    volatile float seed = 1e-3f;
    __m256 acc[12], b = _mm256_set1_ps(seed), c = _mm256_set1_ps(seed * 0.5f);
    for (int k = 0; k < 12; k++)
        acc[k] = _mm256_set1_ps(seed * (float)k);
    for (int64_t i = 0; i < iters; i++)
        for (int k = 0; k < 12; k++)
            acc[k] = _mm256_fmadd_ps(b, c, acc[k]);
    for (int k = 1; k < 12; k++)
        acc[0] = _mm256_add_ps(acc[0], acc[k]);
    seed = _mm256_cvtss_f32(acc[0]);
    return 8.0 * 12.0 * (double)iters;
}

/* The kernels' pattern: acc += op(x, w) with op = vpmulld or vpmaddwd off the accumulator
 * chain. 4 operands x 2 operands b give 8 distinct products per iteration into 8 accumulators;
 * the empty asm makes b look modified every iteration so no product can be hoisted or merged.
 * 15 ymm registers live: no spills. */
static __attribute__((noinline)) double peak_int(int madd, int64_t iters)
{
    volatile int seed = 3;
    __m256i acc[8], x[4];
    __m256i b0 = _mm256_set1_epi32(seed), b1 = _mm256_set1_epi32(seed + 1);
    for (int k = 0; k < 8; k++)
        acc[k] = _mm256_set1_epi32(seed + k);
    for (int k = 0; k < 4; k++)
        x[k] = _mm256_set1_epi32(seed * (k + 5));
    if (madd) {
        for (int64_t i = 0; i < iters; i++) {
            __asm__ volatile("" : "+x"(b0), "+x"(b1));
            for (int k = 0; k < 4; k++) {
                acc[2 * k] = _mm256_add_epi32(acc[2 * k], _mm256_madd_epi16(x[k], b0));
                acc[2 * k + 1] = _mm256_add_epi32(acc[2 * k + 1], _mm256_madd_epi16(x[k], b1));
            }
        }
    } else {
        for (int64_t i = 0; i < iters; i++) {
            __asm__ volatile("" : "+x"(b0), "+x"(b1));
            for (int k = 0; k < 4; k++) {
                acc[2 * k] = _mm256_add_epi32(acc[2 * k], _mm256_mullo_epi32(x[k], b0));
                acc[2 * k + 1] = _mm256_add_epi32(acc[2 * k + 1], _mm256_mullo_epi32(x[k], b1));
            }
        }
    }
    for (int k = 1; k < 8; k++)
        acc[0] = _mm256_add_epi32(acc[0], acc[k]);
    seed = _mm256_cvtsi256_si32(acc[0]);
    return (madd ? 16.0 : 8.0) * 8.0 * (double)iters;
}

double qconv_peak_body__avx2(int instr, int64_t iters)
{
    switch (instr) {
    case QCONV_PEAK_FMA: return peak_fma(iters);
    case QCONV_PEAK_MULLO: return peak_int(0, iters);
    default: return peak_int(1, iters);  /* QCONV_PEAK_MADD */
    }
}

const qconv_isa_table qconv_avx2_table = {
    .name = "avx2",
    .quantize = qconv_quantize__avx2,
    .absmax = qconv_absmax__avx2,
    .dequantize = qconv_dequantize__avx2,
    .conv = {qconv_f32_conv__avx2, qconv_s32_conv__avx2, qconv_s16_conv__avx2, qconv_s16_conv__avx2},
    .nr = {QCONV_NR, QCONV_NR, QCONV_NR, QCONV_NR},
    .grp = {1, 1, 2, 2},
    .xstore = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I16, QCONV_STORE_I16},
    .wstore = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I16, QCONV_STORE_I16},
    .mr = {AVX2_MR, AVX2_MR, AVX2_MR, AVX2_MR},
    .mrh = {0, AVX2_MRH, AVX2_MRH, AVX2_MRH},
    .dw = {qconv_f32_dwconv__avx2, qconv_s32_dwconv__avx2, qconv_s16_dwconv__avx2, qconv_s16_dwconv__avx2},
    .dw_store = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I16, QCONV_STORE_I16},
    .dw_block = QCONV_DW_BLOCK_AVX2,
    .dw_pack = qconv_dw_pack,
};
#endif /* x86 */
