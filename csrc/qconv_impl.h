/* qconv_impl.h - what the translation units share inside the extension (not part of the ABI). */
#ifndef QCONV_IMPL_H
#define QCONV_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "qconv.h"

/* Output-channel tile of the SIMD microkernels; the packed kernel is padded to it with zeros. */
#define QCONV_NR 16

/* How quantize stores its integers. */
enum qconv_store {
    QCONV_STORE_F32 = 0,    /* no quantization: copy (fp32's padded input) */
    QCONV_STORE_I32 = 1,
    QCONV_STORE_I16 = 2,
    QCONV_STORE_I8 = 3,
    QCONV_STORE_U8OFF = 4   /* q + 128 as uint8: vpdpbusd's unsigned operand */
};

/* One convolution as the kernels see it. xq is the quantized (or copied) input, zero-padded to
 * (N, H+KH-1, W+KW-1, cp) where cp is C rounded up to the channel group `grp`; padding holds the
 * representation of zero (128 for QCONV_STORE_U8OFF). wq is the packed kernel:
 * [ocb][KH][KW][cp/grp][nr][grp] with OC padded to a multiple of nr by zeros. */
typedef struct {
    int precision;
    int64_t n, h, w, c, kh, kw, oc;
    int64_t cp, grp, nr, nocb;
    int64_t pix, row, img;          /* xq strides in elements: pixel (= cp), padded row, image */
    const void *xq;
    const void *wq;
    int64_t wblk;                   /* elements of wq per OC block = KH*KW*cp*nr */
    const int32_t *comp;            /* int8 dpbusd: 128 * sum of each OC's kernel (nocb*nr entries) */
    void *out;                      /* float (fp32, or fused) or int32 accumulators, (N, H, W, OC) */
    int fused;                      /* integer precisions: store float32(acc) * inv, not acc */
    float inv;
} qconv_conv_args;

/* Computes output rows [r0, r1) of the flattened N*H axis for OC blocks [b0, b1). */
typedef void (*qconv_conv_fn)(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1);

typedef struct {
    const char *name;
    /* dst[i] = store(clamp(R(src[i] * s), -qmax, qmax)); QCONV_STORE_F32 copies. */
    void (*quantize)(const float *src, int64_t count, float s, int32_t qmax, int truncate,
                     int store, void *dst);
    /* dst[i] = (float)acc[i] * inv */
    void (*dequantize)(const int32_t *acc, int64_t count, float inv, float *dst);
    qconv_conv_fn conv[4];        /* by enum qconv_precision */
    int64_t nr[4], grp[4];        /* packing of each precision */
    int xstore[4], wstore[4];     /* quantize stores for x and w (xstore FP32 -> F32) */
} qconv_isa_table;

extern const qconv_isa_table qconv_scalar_table;
#if defined(__x86_64__) || defined(__i386__)
extern const qconv_isa_table qconv_avx2_table;
extern const qconv_isa_table qconv_avx512vnni_table;
extern const qconv_isa_table qconv_avxvnni_table;
#define QCONV_HAVE_X86 1
#endif

/* AVX2 kernels that the VNNI tables reuse for fp32 and int32. */
void qconv_f32_conv__avx2(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1);
void qconv_s32_conv__avx2(const qconv_conv_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t b1);
void qconv_quantize__avx2(const float *src, int64_t count, float s, int32_t qmax, int truncate,
                          int store, void *dst);
void qconv_dequantize__avx2(const int32_t *acc, int64_t count, float inv, float *dst);

/* Microbenchmarks (per thread body): returns MACs done. */
double qconv_peak_body__avx2(int instr, int64_t iters);
double qconv_peak_body__avx512vnni(int instr, int64_t iters);
double qconv_peak_body__avxvnni(int instr, int64_t iters);
double qconv_peak_body__scalar(int instr, int64_t iters);

double qconv_now(void);

#endif
