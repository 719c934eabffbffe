/* conv_avx512.c - AVX-512 kernels (zmm): the only translation unit built with AVX512F/BW/VL/VNNI
 * (the pragma below). Reached only through qconv_avx512_table after cpu_features.c has checked the CPU
 * (AVX512F + BW + VL + VNNI, ZMM state saved by the OS), so the rest of the extension runs on any
 * x86-64.
 *
 * Microkernels (one body in conv_tile.h, the zmm pieces below): MR output pixels x 32 output
 * channels (two zmm columns), register-blocked, implicit GEMM over the zero-padded input as in
 * conv_avx2.c; the packed kernel rows are 32 wide (nr = 32, the driver packs
 * [ocb][KH][KW][cp/grp][32][grp]):
 *   f32: vbroadcastss + vfmadd231ps zmm            (14 x 32, 28 accumulators, 1 broadcast per 2 FMA)
 *   s32: vpbroadcastd + vpmulld + vpaddd zmm        (14 x 32), products and sums wrap mod 2^32
 *   s16: vpbroadcastd (2 channels) + vpdpwssd zmm   (14 x 32); the non-saturating form wraps, and
 *        |x0*w0 + x1*w1| <= 2 * 32767^2 < 2^31 anyway
 *   s8:  vpbroadcastd (4 uint8 channels holding q_x + 128) + vpdpbusd zmm with 4 int8 weights; every
 *        accumulator starts at -128 * sum(q_w) of its output channel (a->comp, packed once), so
 *        the result is sum q_x * q_w modulo 2^32 (as conv_vnni.inc)
 * A last OC block of <= 16 channels runs at half width (28 x 16: one zmm column, 28 accumulators).
 * Partial blocks store through write masks (no write past the row). 32 zmm registers: 28
 * accumulators + 2 kernel rows + 1 broadcast.
 * Quantize, dequantize and the depthwise kernels are the AVX2 ones (qconv_avx512_table). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "conv_tile.h"
#include "qconv_impl.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define NR512 32
#define MR512 14
#define MRH512 28

/* The write mask of the first n (0..16) lanes. */
ALWAYS_INLINE __mmask16 lanes16(int64_t n)
{
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* Store a tile's int32 accumulators, or with a->fused float32(acc) * inv[o] (+ bias[o]): cvtdq2ps
 * rounds to nearest even under the default MXCSR, then one multiply and one add, never fused. */
ALWAYS_INLINE void store_acc512(const qconv_conv_args *a, int32_t *y, __m512i (*acc)[2], const int mr,
                                const int half, int64_t nvalid, const float *ib, const float *bb)
{
    const __mmask16 k0 = lanes16(nvalid), k1 = lanes16(nvalid - 16);
    if (a->fused) {
        const __m512 i0 = _mm512_loadu_ps(ib), i1 = _mm512_loadu_ps(ib + 16);
        const __m512 c0 = bb ? _mm512_loadu_ps(bb) : _mm512_setzero_ps(), c1 = bb ? _mm512_loadu_ps(bb + 16) : c0;
        for (int m = 0; m < mr; m++) {
            float *ym = (float *)(void *)(y + m * a->ldy);
            __m512 v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[m][0]), i0);
            if (bb)
                v0 = _mm512_add_ps(v0, c0);
            _mm512_mask_storeu_ps(ym, k0, v0);
            if (!half) {
                __m512 v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[m][1]), i1);
                if (bb)
                    v1 = _mm512_add_ps(v1, c1);
                _mm512_mask_storeu_ps(ym + 16, k1, v1);
            }
        }
        return;
    }
    for (int m = 0; m < mr; m++) {
        int32_t *ym = y + m * a->ldy;
        _mm512_mask_storeu_epi32(ym, k0, acc[m][0]);
        if (!half)
            _mm512_mask_storeu_epi32(ym + 16, k1, acc[m][1]);
    }
}

ALWAYS_INLINE void store_ps512(const qconv_conv_args *a, float *y, __m512 (*acc)[2], const int mr,
                               const int half, int64_t nvalid, const float *bb)
{
    const __mmask16 k0 = lanes16(nvalid), k1 = lanes16(nvalid - 16);
    const __m512 c0 = bb ? _mm512_loadu_ps(bb) : _mm512_setzero_ps(), c1 = bb ? _mm512_loadu_ps(bb + 16) : c0;
    for (int m = 0; m < mr; m++) {
        float *ym = y + m * a->ldy;
        _mm512_mask_storeu_ps(ym, k0, bb ? _mm512_add_ps(acc[m][0], c0) : acc[m][0]);
        if (!half)
            _mm512_mask_storeu_ps(ym + 16, k1, bb ? _mm512_add_ps(acc[m][1], c1) : acc[m][1]);
    }
}

#define MAXMR MRH512

/* The zmm pieces of the microkernel (conv_tile.h), 16 lanes per column. Kernel columns are
 * aligned; fp32 and int32 index x (as these kernels always did: the pointer form changes GCC's
 * register allocation), int16 and int8 load 4 bytes at x + o + c. */
#define ZERO_PS512(init, k) _mm512_setzero_ps()
#define ZERO_SI512(init, k) _mm512_setzero_si512()
#define COMP512(init, k) _mm512_loadu_si512((const void *)((init) + 16 * (k))) /* int8: -128 * sum(q_w) */
#define LOAD_SI512(p) _mm512_load_si512((const void *)(p))
#define BCAST_F32_512(x, o, c) _mm512_set1_ps((x)[(o) + (c)])
#define BCAST_S32_512(x, o, c) _mm512_set1_epi32((x)[(o) + (c)])
#define BCAST32_512(x, o, c) _mm512_set1_epi32(qconv_load_i32((x) + (o) + (c)))
#define MAC_F32_512(acc, b, w) _mm512_fmadd_ps((b), (w), (acc))
#define MAC_S32_512(acc, b, w) _mm512_add_epi32((acc), _mm512_mullo_epi32((b), (w)))
/* vpdpwssd / vpdpbusd through inline asm, not the intrinsics: with the intrinsics GCC 12 copies
 * every accumulator of the wide tiles through another register and spills it to the stack on each
 * channel step (objdump: 119 instructions and 26 stack stores around the 14 x 32 tile's 28
 * vpdpbusd, against 53 instructions and none this way); "+v" ties the accumulator in place. AT&T
 * order: vpdpbusd w, b, acc = acc + b (u8) . w (s8). */
ALWAYS_INLINE __m512i dpwssd512(__m512i acc, __m512i b, __m512i w)
{
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(b), "v"(w));
    return acc;
}
ALWAYS_INLINE __m512i dpbusd512(__m512i acc, __m512i b, __m512i w)
{
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(b), "v"(w));
    return acc;
}
#define MAC_S16_512(acc, b, w) dpwssd512((acc), (b), (w))
#define MAC_S8_512(acc, b, w) dpbusd512((acc), (b), (w))
#define STORE_PS512(a, y, acc, mr, half, nvalid, ib, bb) store_ps512(a, y, acc, mr, half, nvalid, bb)

QCONV_DEFINE_UKERNEL(qconv_f32_ukernel__avx512_14x32, float, float, float, __m512, 1, ZERO_PS512, _mm512_load_ps,
                     BCAST_F32_512, MAC_F32_512, STORE_PS512)
QCONV_DEFINE_UKERNEL(qconv_s32_ukernel__avx512_14x32, int32_t, int32_t, int32_t, __m512i, 1, ZERO_SI512, LOAD_SI512,
                     BCAST_S32_512, MAC_S32_512, store_acc512)
QCONV_DEFINE_UKERNEL(qconv_s16_ukernel__avx512_14x32, int16_t, int16_t, int32_t, __m512i, 2, ZERO_SI512, LOAD_SI512,
                     BCAST32_512, MAC_S16_512, store_acc512)
QCONV_DEFINE_UKERNEL(qconv_s8_ukernel__avx512_14x32, uint8_t, int8_t, int32_t, __m512i, 4, COMP512, LOAD_SI512,
                     BCAST32_512, MAC_S8_512, store_acc512)

QCONV_DEFINE_CONV(qconv_f32_conv__avx512, qconv_f32_ukernel__avx512_14x32, NR512, MR512, MRH512, float, float, float,
                  QCONV_ROW_HALF_INSIDE)
QCONV_DEFINE_CONV(qconv_s32_conv__avx512, qconv_s32_ukernel__avx512_14x32, NR512, MR512, MRH512, int32_t, int32_t,
                  int32_t, QCONV_ROW_HALF_INSIDE)
QCONV_DEFINE_CONV(qconv_s16_conv__avx512, qconv_s16_ukernel__avx512_14x32, NR512, MR512, MRH512, int16_t, int16_t,
                  int32_t, QCONV_ROW_HALF_INSIDE)
QCONV_DEFINE_CONV(qconv_s8_conv__avx512, qconv_s8_ukernel__avx512_14x32, NR512, MR512, MRH512, uint8_t, int8_t,
                  int32_t, QCONV_ROW_HALF_INSIDE)

/* ---- instruction microbenchmarks: 12 independent zmm accumulator chains ------------------ */
/* (vpdpwssd / vpdpbusd through dpwssd512 / dpbusd512: with the intrinsics GCC 12 put 21 register
 * copies around the loop's 12 vpdpbusd, 36 instructions an iteration against 22 now, objdump) */

double qconv_peak_body__avx512(int instr, int64_t iters)
{
    volatile int seed = 3;
    double lanes;
    if (instr == QCONV_PEAK_FMA512) {
        __m512 acc[12], b = _mm512_set1_ps(1e-3f * (float)seed), c = _mm512_set1_ps(5e-4f);
        for (int k = 0; k < 12; k++)
            acc[k] = _mm512_set1_ps((float)k);
        for (int64_t i = 0; i < iters; i++)
            for (int k = 0; k < 12; k++)
                acc[k] = _mm512_fmadd_ps(b, c, acc[k]);
        for (int k = 1; k < 12; k++)
            acc[0] = _mm512_add_ps(acc[0], acc[k]);
        seed = (int)_mm512_reduce_add_ps(acc[0]);
        return 16.0 * 12.0 * (double)iters;
    }
    __m512i acc[12], a = _mm512_set1_epi32(seed), b = _mm512_set1_epi32(seed + 1);
    for (int k = 0; k < 12; k++)
        acc[k] = _mm512_set1_epi32(k);
    if (instr == QCONV_PEAK_DPWSSD512) {
        for (int64_t i = 0; i < iters; i++)
            for (int k = 0; k < 12; k++)
                acc[k] = dpwssd512(acc[k], a, b);
        lanes = 32;
    } else {
        for (int64_t i = 0; i < iters; i++)
            for (int k = 0; k < 12; k++)
                acc[k] = dpbusd512(acc[k], a, b);
        lanes = 64;
    }
    for (int k = 1; k < 12; k++)
        acc[0] = _mm512_add_epi32(acc[0], acc[k]);
    seed = _mm512_reduce_add_epi32(acc[0]);
    return lanes * 12.0 * (double)iters;
}

const qconv_isa_table qconv_avx512_table = {
    .name = "avx512",
    .quantize = qconv_quantize__avx2,
    .absmax = qconv_absmax__avx2,
    .dequantize = qconv_dequantize__avx2,
    .conv = {qconv_f32_conv__avx512, qconv_s32_conv__avx512, qconv_s16_conv__avx512, qconv_s8_conv__avx512},
    .nr = {NR512, NR512, NR512, NR512},
    .grp = {1, 1, 2, 4},
    .xstore = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I16, QCONV_STORE_U8OFF},
    .wstore = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I16, QCONV_STORE_I8},
    .mr = {MR512, MR512, MR512, MR512},
    .mrh = {MRH512, MRH512, MRH512, MRH512},
    .dw = {qconv_f32_dwconv__avx2, qconv_s32_dwconv__avx2, qconv_s16_dwconv__avx2, qconv_s16_dwconv__avx2},
    .dw_store = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I16, QCONV_STORE_I16},
    .dw_block = QCONV_DW_BLOCK_AVX2,
    .dw_pack = qconv_dw_pack,
};
#endif /* x86 */
