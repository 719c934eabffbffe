/* conv_amx.c - AMX INT8 kernels: the only translation unit built with AMX-TILE/AMX-INT8 (the
 * pragma below), reached through qconv_amx_table after qconv.c has checked the CPU and
 * qconv_amx_unusable() has asked Linux for the tile data state once.
 *
 * INT8 is an implicit GEMM on tiles (every tile 16 rows x 64 bytes, one configuration):
 *   A (tmm4, tmm5): 16 output pixels of one row x 64 input channels, loaded straight from the
 *      zero-padded int8 input with the pixel step as the row stride (no im2col);
 *   B (tmm6, tmm7): 16 channel quads x 16 output channels x 4 channels: the driver's packing
 *      [ocb][KH][KW][cp/4][16][4] with grp = 4 and nr = 16 is that layout (VNNI-interleaved K
 *      groups of 4), done once at prepare; the input channels are padded to 64 (cpad);
 *   C (tmm0..tmm3): 2 x 2 blocks of 16 pixels x 16 output channels, int32.
 * tdpbssd: C[m][n] += sum of four s8 x s8 products per K quad, in int32. The ISA's definition
 * (Intel SDM, TDPBSSD: DEST.dword += tmp1 + tmp2 + tmp3 + tmp4, no saturation step; only the
 * AVX "S" forms vpdpbusds/vpdpwssds saturate) is a plain 32-bit add, so it wraps modulo 2^32:
 * the contract's arithmetic (checked on the 16-core Xeon: tests/test_differential.py's K = 140,000
 * INT8 case, whose int32 sums pass 2^31, equals the reference bit for bit). Signed x needs no +128
 * compensation.
 * Rows of A past the row's last output pixel read up to 16 pixel steps past it: the driver gives
 * the padded input that much slack (xslack); those rows of C are never stored.
 * FP32, INT32 and INT16 are the AVX-512 kernels; depthwise is AVX2. */
#if defined(__x86_64__) || defined(__i386__)
#define _GNU_SOURCE
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")

#include <cpuid.h>
#include <errno.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "qconv_impl.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* ---- permission, once per process ------------------------------------------------------- */

static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static char amx_why[160];

static void amx_probe(void)
{
    unsigned a, b, c, d;
    const char *off = getenv("QCONV_NO_AMX");
    if (off != NULL && off[0] != '\0' && strcmp(off, "0") != 0) {
        snprintf(amx_why, sizeof amx_why, "AMX disabled by QCONV_NO_AMX=%.20s", off);
        return;
    }
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) {
        snprintf(amx_why, sizeof amx_why, "this CPU lacks AMX-TILE/AMX-INT8");
        return;
    }
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3) != 3) {
        snprintf(amx_why, sizeof amx_why, "the OS does not enable the tile state (XCR0 bits 17-18)");
        return;
    }
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        snprintf(amx_why, sizeof amx_why, "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) refused: %s",
                 strerror(errno));
        return;
    }
    amx_why[0] = '\0';
}

const char *qconv_amx_unusable(void)
{
    pthread_once(&amx_once, amx_probe);
    return amx_why[0] ? amx_why : NULL;
}

/* ---- tiles -------------------------------------------------------------------------------- */

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Palette 1, tiles 0..7 all 16 rows x 64 bytes (per thread: each worker loads it). */
static void load_config(void)
{
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* Rows m < mv, channels < nvalid of a 16 x 16 int32 block into y (pixels ldy apart); fused:
 * float32(acc) * inv[o] (+ bias[o]), one multiply and one add. */
ALWAYS_INLINE void store_block(const qconv_conv_args *a, const int32_t *blk, int32_t *y, int64_t mv, int64_t nvalid,
                               const float *ib, const float *bb)
{
    const __mmask16 k = nvalid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nvalid) - 1u);
    if (a->fused) {
        const __m512 inv = _mm512_loadu_ps(ib);
        const __m512 bias = bb ? _mm512_loadu_ps(bb) : _mm512_setzero_ps();
        for (int64_t m = 0; m < mv; m++) {
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(blk + 16 * m))), inv);
            if (bb)
                v = _mm512_add_ps(v, bias);
            _mm512_mask_storeu_ps((float *)(void *)(y + m * a->ldy), k, v);
        }
    } else {
        for (int64_t m = 0; m < mv; m++)
            _mm512_mask_storeu_epi32(y + m * a->ldy, k, _mm512_loadu_si512((const void *)(blk + 16 * m)));
    }
}

/* MT x NT blocks of 16 pixels x 16 channels: pixels [q, q + 16 MT) of the row at xr, OC blocks
 * b, b + 1 (NT = 2). */
ALWAYS_INLINE void qconv_s8_ukernel__amx_32x32(const qconv_conv_args *a, const int8_t *xr, const int8_t *wb,
                                               int32_t *yr, int64_t b, int64_t q, const int MT, const int NT,
                                               int32_t *buf)
{
    const int64_t pix = a->pix, step = a->xstep, cp = a->cp, kw = a->kw;
    _tile_zero(0);
    if (NT == 2)
        _tile_zero(1);
    if (MT == 2) {
        _tile_zero(2);
        if (NT == 2)
            _tile_zero(3);
    }
    const int8_t *x0 = xr + q * step;
    for (int64_t u = 0; u < a->kh; u++)
        for (int64_t v = 0; v < kw; v++) {
            const int8_t *xp = x0 + u * a->row + v * pix;
            const int8_t *wp = wb + (u * kw + v) * cp * 16;
            for (int64_t c = 0; c < cp; c += 64) {
                _tile_loadd(4, xp + c, step);
                _tile_loadd(6, wp + c * 16, 64);
                if (NT == 2)
                    _tile_loadd(7, wp + a->wblk + c * 16, 64);
                _tile_dpbssd(0, 4, 6);
                if (NT == 2)
                    _tile_dpbssd(1, 4, 7);
                if (MT == 2) {
                    _tile_loadd(5, xp + 16 * step + c, step);
                    _tile_dpbssd(2, 5, 6);
                    if (NT == 2)
                        _tile_dpbssd(3, 5, 7);
                }
            }
        }
    _tile_stored(0, buf, 64);
    if (NT == 2)
        _tile_stored(1, buf + 256, 64);
    if (MT == 2) {
        _tile_stored(2, buf + 512, 64);
        if (NT == 2)
            _tile_stored(3, buf + 768, 64);
    }
    for (int mt = 0; mt < MT; mt++) {
        int64_t mv = a->wo - q - 16 * mt;
        mv = mv > 16 ? 16 : mv;
        for (int nt = 0; nt < NT; nt++) {
            const int64_t o0 = (b + nt) * 16;
            int64_t nvalid = a->oc - o0;
            nvalid = nvalid > 16 ? 16 : nvalid;
            store_block(a, buf + 256 * (2 * mt + nt), yr + (q + 16 * mt) * a->ldy + o0, mv, nvalid,
                        a->inv ? a->inv + o0 : NULL, a->bias ? a->bias + o0 : NULL);
        }
    }
}

/* Output rows [r0, r1), OC blocks [b0, b1) of 16 channels, in pairs of blocks and 32-pixel spans. */
void qconv_s8_conv__amx(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1)
{
    int32_t buf[1024] __attribute__((aligned(64)));
    const int8_t *xq = (const int8_t *)a->xq, *wq = (const int8_t *)a->wq;
    int32_t *out = (int32_t *)a->out;
    load_config();
    for (int64_t b = b0; b < b1; b += 2) {
        const int pair = b + 1 < b1;
        const int8_t *wb = wq + b * a->wblk;
        for (int64_t r = r0; r < r1; r++) {
            const int64_t n = r / a->ho, i = r % a->ho;
            const int8_t *xr = xq + n * a->img + i * a->rstep;
            int32_t *yr = out + r * a->wo * a->ldy;
            for (int64_t q = 0; q < a->wo; q += 32) {
                const int two = a->wo - q > 16;
                if (pair && two)
                    qconv_s8_ukernel__amx_32x32(a, xr, wb, yr, b, q, 2, 2, buf);
                else if (pair)
                    qconv_s8_ukernel__amx_32x32(a, xr, wb, yr, b, q, 1, 2, buf);
                else if (two)
                    qconv_s8_ukernel__amx_32x32(a, xr, wb, yr, b, q, 2, 1, buf);
                else
                    qconv_s8_ukernel__amx_32x32(a, xr, wb, yr, b, q, 1, 1, buf);
            }
        }
    }
    _tile_release();
}

/* 4 independent tdpbssd per iteration into tmm0..3 (16 x 16 x 64 MACs each). */
double qconv_peak_body__amx(int instr, int64_t iters)
{
    (void)instr;
    int8_t src[1024] __attribute__((aligned(64)));
    memset(src, 1, sizeof src);
    load_config();
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, src, 64);
    _tile_loadd(5, src, 64);
    _tile_loadd(6, src, 64);
    _tile_loadd(7, src, 64);
    for (int64_t i = 0; i < iters; i++) {
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
    }
    int32_t out[256] __attribute__((aligned(64)));
    _tile_stored(0, out, 64);
    _tile_release();
    volatile int32_t sink = out[0];
    (void)sink;
    return 4.0 * 16.0 * 16.0 * 64.0 * (double)iters;
}

extern void qconv_f32_conv__avx512(const qconv_conv_args *, int64_t, int64_t, int64_t, int64_t);
extern void qconv_s32_conv__avx512(const qconv_conv_args *, int64_t, int64_t, int64_t, int64_t);
extern void qconv_s16_conv__avx512(const qconv_conv_args *, int64_t, int64_t, int64_t, int64_t);

const qconv_isa_table qconv_amx_table = {
    .name = "amx",
    .quantize = qconv_quantize__avx2,
    .absmax = qconv_absmax__avx2,
    .dequantize = qconv_dequantize__avx2,
    .conv = {qconv_f32_conv__avx512, qconv_s32_conv__avx512, qconv_s16_conv__avx512, qconv_s8_conv__amx},
    .nr = {32, 32, 32, 16},
    .grp = {1, 1, 2, 4},
    .cpad = {0, 0, 0, 64},
    .xslack = {0, 0, 0, 16},
    .xstore = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I16, QCONV_STORE_I8},
    .wstore = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I16, QCONV_STORE_I8},
    .mr = {14, 14, 14, 16},
    .mrh = {28, 28, 28, 0},
    .dw = {qconv_f32_dwconv__avx2, qconv_s32_dwconv__avx2, qconv_s16_dwconv__avx2, qconv_s16_dwconv__avx2},
    .dw_store = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I16, QCONV_STORE_I16},
    .dw_block = QCONV_DW_BLOCK_AVX2,
    .dw_pack = qconv_dw_pack__avx2,
};
#endif /* x86 */
