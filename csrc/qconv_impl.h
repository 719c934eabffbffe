/* qconv_impl.h - what the translation units share inside the extension (not part of the ABI). */
#ifndef QCONV_IMPL_H
#define QCONV_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "qconv.h" /* QCONV_NR (the output-channel tile of the SIMD microkernels) lives there */

/* How quantize stores its integers. */
enum qconv_store {
    QCONV_STORE_F32 = 0,    /* no quantization: copy (fp32's padded input) */
    QCONV_STORE_I32 = 1,
    QCONV_STORE_I16 = 2,
    QCONV_STORE_I8 = 3,
    QCONV_STORE_U8OFF = 4,  /* q + 128 as uint8: vpdpbusd's unsigned operand */
    QCONV_STORE_I16PL = 5,  /* int16 as byte planes per 64-element block (AMX, amx_planes.c) */
    QCONV_STORE_I32PL = 6   /* int32 likewise: 4 planes per block */
};

/* The byte-plane stores (amx_planes.c): the plain store a plane store is split from (others:
 * themselves); p's `count` elements, stored plain, split into planes in place (others: nothing). */
int qconv_plain_store(int store);
void qconv_split_planes(void *p, int64_t count, int store);

/* One group of one convolution as the implicit-GEMM kernels see it.
 *
 * xq is the quantized (or copied) input, zero-padded to (N, HP, WP, G, cp) where cp is the
 * group's input channels ICG rounded up to the channel group `grp`; padding holds the
 * representation of zero (128 for QCONV_STORE_U8OFF). xq points at this group's first channel.
 * Each padded row is stored as sw phases of WQ = ceil(WP / sw) pixels (`pix` elements each):
 * padded column p at phase p % sw, position p / sw. Output pixel (n, i, j) reads the padded
 * pixels (n, i*sh + u, j*sw + v), that is row i*sh + u, phase v % sw, position j + v / sw: so
 * consecutive output pixels read consecutive stored pixels (`xstep` = pix) whatever the stride,
 * and a tile of a stride-2 layer streams through memory as one of a stride-1 layer does. (With
 * sw = 1 this is the plain padded row.) `rstep` = sh * row per output row; tap[t], t = u*KW + v,
 * is tap (u, v)'s offset from the output pixel's first element: u*row + ((v % sw)*WQ + v/sw)*pix.
 * wq is this group's packed kernel: [ocb][KH][KW][cp/grp][nr][grp] with its OC padded to a
 * multiple of nr by zeros. out points at the group's first output channel; pixels are `ldy`
 * (= the layer's OC) apart. */
typedef struct {
    int precision;
    int64_t n, ho, wo;              /* output images, rows, columns */
    int64_t c, kh, kw, oc;          /* c: the group's input channels (ICG); oc: its output channels */
    int64_t cp, grp, nr, nocb;
    int64_t pix, xstep, row, rstep, img;   /* xq strides in elements */
    const int64_t *tap;             /* KH*KW tap offsets in elements (above) */
    int64_t ldy;                    /* output pixel stride in elements (the layer's OC) */
    const void *xq;
    const void *wq;
    int64_t wblk;                   /* elements of wq per OC block = KH*KW*cp*nr */
    const int32_t *comp;            /* int8 dpbusd: -128 * sum of each OC's kernel (nocb*nr entries) */
    void *out;                      /* float (fp32, or fused) or int32 accumulators */
    int fused;                      /* integer precisions: store float32(acc) * inv[o] (+ bias[o]) */
    const float *inv;               /* nocb*nr dequantize factors, zero-padded (integers) */
    const float *bias;              /* nocb*nr bias values, zero-padded, or NULL */
} qconv_conv_args;

/* Computes output rows [r0, r1) of the flattened N*HO axis for OC blocks [b0, b1). */
typedef void (*qconv_conv_fn)(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1);

/* A depthwise convolution (groups == C, one input channel per group, OC = C * multiplier) as
 * its kernels see it: one output row from KH zero-padded input rows. Each padded row holds WP
 * pixels of `ocp` channels (OC rounded up to the family's dw_block, zeros past OC); input channel
 * c is replicated `multiplier` times, so output channel o reads row channel o. */
typedef struct {
    int precision;
    int64_t kh, kw, sw, wo, oc, ocp;
    const void *w;                  /* packed weights (the family's dw_pack layout) */
    const float *inv;               /* ocp dequantize factors, zero-padded (integers) */
    const float *bias;              /* ocp bias values, zero-padded, or NULL */
} qconv_dw_args;

/* One output row: y[j, o] for j < wo, o < oc (pixels oc apart). taps[t], t = u*KW + v, points at
 * the padded input that output pixel 0 reads through tap (u, v): padded row i*sh + u, pixel v;
 * output pixel j reads taps[t] + j * sw * ocp. */
typedef void (*qconv_dw_fn)(const qconv_dw_args *a, const void *const *taps, float *y);

typedef struct {
    const char *name;
    /* dst[i] = store(clamp(R(src[i] * s), -qmax, qmax)); QCONV_STORE_F32 copies. Returns 1 if
     * src held a NaN or an infinity (the stored values are then meaningless), else 0. */
    int (*quantize)(const float *src, int64_t count, float s, int32_t qmax, int truncate,
                    int store, void *dst);
    /* max |src[i]|; sets *nonfinite to 1 if src held a NaN or an infinity (else leaves it). */
    float (*absmax)(const float *src, int64_t count, int *nonfinite);
    /* dst[p, o] = (float)acc[p, o] * inv[o] (+ bias[o]) for p < npix, o < oc: one multiply and
     * one add, never fused. */
    void (*dequantize)(const int32_t *acc, int64_t npix, int64_t oc, const float *inv,
                       const float *bias, float *dst);
    qconv_conv_fn conv[4];        /* by enum qconv_precision */
    int64_t nr[4], grp[4];        /* packing of each precision */
    int64_t cpad[4];              /* input channels padded to a multiple of this (0: grp) */
    int64_t xslack[4];            /* pixel steps a tile may read past a row's last output pixel
                                     (the padded input gets that much slack; 0: none) */
    int mr[4], mrh[4];            /* declared tiles (qconv_tile) */
    int xstore[4], wstore[4];     /* quantize stores for x and w (xstore FP32 -> F32) */
    /* Depthwise. */
    qconv_dw_fn dw[4];
    int dw_store[4];              /* how the padded rows hold x */
    int64_t dw_block;             /* the channel axis is padded to a multiple of this */
    /* Pack src (taps, oc) - float for fp32, int32 quantized otherwise - into dst (NULL: only
     * return the bytes needed); ocp = oc rounded up to dw_block. */
    int64_t (*dw_pack)(int precision, const void *src, int64_t taps, int64_t oc, int64_t ocp, void *dst);
} qconv_isa_table;

extern const qconv_isa_table qconv_scalar_table;
#if defined(__x86_64__) || defined(__i386__)
extern const qconv_isa_table qconv_avx2_table;
extern const qconv_isa_table qconv_avx512vnni_table;
extern const qconv_isa_table qconv_avxvnni_table;
extern const qconv_isa_table qconv_vnni_emulated_table;
extern const qconv_isa_table qconv_avx512_table;
extern const qconv_isa_table qconv_amx_table;
extern const qconv_isa_table qconv_amx_emulated_table;
/* qconv_quantize__avx2, then the byte planes for QCONV_STORE_I16PL / I32PL (amx_planes.c). */
int qconv_quantize__amx(const float *src, int64_t count, float s, int32_t qmax, int truncate, int store, void *dst);
/* NULL when AMX INT8 may run in this process (CPU, XCR0, and Linux granted XTILEDATA through
 * arch_prctl, asked once); else why not (conv_amx.c). */
const char *qconv_amx_unusable(void);
#define QCONV_HAVE_X86 1
#endif

/* AVX2 kernels that the VNNI tables reuse for fp32 and int32 (and depthwise). */
void qconv_f32_conv__avx2(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1);
void qconv_s32_conv__avx2(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1);
int qconv_quantize__avx2(const float *src, int64_t count, float s, int32_t qmax, int truncate,
                         int store, void *dst);
float qconv_absmax__avx2(const float *src, int64_t count, int *nonfinite);
void qconv_dequantize__avx2(const int32_t *acc, int64_t npix, int64_t oc, const float *inv,
                            const float *bias, float *dst);
void qconv_f32_dwconv__avx2(const qconv_dw_args *a, const void *const *taps, float *y);
void qconv_s32_dwconv__avx2(const qconv_dw_args *a, const void *const *taps, float *y);
void qconv_s16_dwconv__avx2(const qconv_dw_args *a, const void *const *taps, float *y);
#define QCONV_DW_BLOCK_AVX2 16

/* The scalar depthwise twins, and the weight packing every family uses (dwconv_scalar.c). */
void qconv_f32_dwconv__scalar(const qconv_dw_args *a, const void *const *taps, float *y);
void qconv_s32_dwconv__scalar(const qconv_dw_args *a, const void *const *taps, float *y);
int64_t qconv_dw_pack(int precision, const void *src, int64_t taps, int64_t oc, int64_t ocp, void *dst);

/* Microbenchmarks (per thread body): returns MACs done. */
double qconv_peak_body__avx2(int instr, int64_t iters);
double qconv_peak_body__avx512vnni(int instr, int64_t iters);
double qconv_peak_body__avxvnni(int instr, int64_t iters);
double qconv_peak_body__vnni_emulated(int instr, int64_t iters);
double qconv_peak_body__scalar(int instr, int64_t iters);
double qconv_peak_body__avx512(int instr, int64_t iters);
double qconv_peak_body__amx(int instr, int64_t iters);

double qconv_now(void);

/* cpu_features.c: the table of a kernel family (NULL: not in this build), and whether this CPU
 * and OS run it (features detected once per process). */
const qconv_isa_table *qconv_table_for(int isa);
int qconv_isa_usable(int isa);

#endif
