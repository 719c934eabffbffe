/* qconv.h - the public C ABI of qconv's CPU backends.
 *
 * Every entry point returns an int status (QCONV_OK == 0); qconv_strerror() turns it into text.
 * The block between QCONV_CDEF_BEGIN and QCONV_CDEF_END is read verbatim by csrc/build_cffi.py
 * as the cffi cdef: keep it free of preprocessor lines and of anything cffi cannot parse.
 *
 * Layouts (all C-contiguous): x float32 (N, H, W, C); w float32 (KH, KW, OC, C);
 * y float32 (N, H, W, OC). 'SAME' padding, stride 1, as in ../shared/CONTRACT.md.
 */
#ifndef QCONV_H
#define QCONV_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* QCONV_CDEF_BEGIN */
enum qconv_status {
    QCONV_OK = 0,
    QCONV_EINVAL = 1,     /* an argument is out of its documented range */
    QCONV_ENOMEM = 2,     /* a work buffer could not be allocated */
    QCONV_EISA = 3,       /* the requested instruction set is not compiled in or not on this CPU */
    QCONV_ETHREAD = 4,    /* the thread pool could not start a worker */
    QCONV_ESIZE = 5       /* a size computation would overflow */
};

enum qconv_precision { QCONV_FP32 = 0, QCONV_INT32 = 1, QCONV_INT16 = 2, QCONV_INT8 = 3 };

/* Kernel families, in increasing order. QCONV_ISA_AUTO picks the best the CPU has. */
enum qconv_isa {
    QCONV_ISA_AUTO = -1,
    QCONV_ISA_SCALAR = 0,       /* conv_scalar.c: single thread, not vectorized */
    QCONV_ISA_AVX2 = 1,         /* conv_avx2.c: AVX2 + FMA */
    QCONV_ISA_AVX512VNNI = 2,   /* conv_vnni_evex.c: AVX2 kernels + 256-bit EVEX vpdpbusd/vpdpwssd */
    QCONV_ISA_AVXVNNI = 3       /* conv_vnni_vex.c: AVX2 kernels + VEX AVX-VNNI vpdpbusd/vpdpwssd */
};

/* Bits of qconv_cpu_features(). */
enum qconv_feature {
    QCONV_CPU_AVX2 = 1,
    QCONV_CPU_FMA = 2,
    QCONV_CPU_AVX512VNNI_VL = 4,   /* AVX512F + AVX512VL + AVX512_VNNI, OS saves ZMM state */
    QCONV_CPU_AVXVNNI = 8          /* VEX-encoded AVX-VNNI */
};

/* Instruction microbenchmarks for qconv_peak(). */
enum qconv_peak_instr {
    QCONV_PEAK_FMA = 0,        /* vfmadd231ps ymm: 8 MAC */
    QCONV_PEAK_MULLO = 1,      /* vpmulld + vpaddd ymm: 8 MAC (8 independent per iteration) */
    QCONV_PEAK_MADD = 2,       /* vpmaddwd + vpaddd ymm: 16 MAC (8 independent per iteration) */
    QCONV_PEAK_DPWSSD = 3,     /* vpdpwssd ymm: 16 MAC */
    QCONV_PEAK_DPBUSD = 4,     /* vpdpbusd ymm: 32 MAC */
    QCONV_PEAK_SCALAR_FMA = 5  /* scalar float mul + add, the c-scalar baseline's instruction */
};

/* Worker threads one call may use (qconv_conv2d, qconv_peak). */
enum qconv_limits { QCONV_MAX_THREADS = 256 };

/* Bits of qconv_conv2d's flags. */
enum qconv_flags {
    QCONV_FLAG_SEPARATE_DEQUANTIZE = 1  /* SIMD families: dequantize in its own pass over int32
                                           accumulators instead of in the microkernel's store */
};

/* Seconds spent in each phase of one qconv_conv2d call (CLOCK_MONOTONIC). */
typedef struct {
    double quantize;     /* x and w to integers (x into the zero-padded layout) */
    double pack;         /* kernel re-layout for the microkernel (and fp32's padded copy of x) */
    double convolve;     /* the convolution proper */
    double dequantize;   /* int32 accumulators to float32 (0 when fused into the convolve store) */
    int isa;             /* the kernel family that ran (enum qconv_isa) */
    int threads;         /* worker threads that ran the convolution */
    int fused_dequantize; /* 1: dequantize ran inside the convolve phase's stores */
} qconv_timings;

const char *qconv_strerror(int status);

/* Bitmask of enum qconv_feature for this CPU (CPUID + XGETBV). */
int qconv_cpu_features(uint32_t *features);

/* The best kernel family usable here, capped at `cap` (QCONV_ISA_AUTO: no cap). */
int qconv_best_isa(int cap, int *isa);

/* y = conv2d(x, w) under the contract. precision: enum qconv_precision. isa: enum qconv_isa
 * (QCONV_ISA_SCALAR needs threads == 1). truncate: 0 round half to even, 1 toward zero.
 * flags: enum qconv_flags. SIMD families fuse the dequantize into the microkernel's store
 * (same arithmetic: cvtdq2ps, one multiply by inv) unless QCONV_FLAG_SEPARATE_DEQUANTIZE.
 * s_x, s_w, inv are ignored for QCONV_FP32. Sizes must be positive; the caller owns y. */
int qconv_conv2d(int precision, int isa, int threads, int truncate, int flags,
                 float s_x, float s_w, float inv,
                 const float *x, int64_t n, int64_t h, int64_t w, int64_t c,
                 const float *k, int64_t kh, int64_t kw, int64_t oc,
                 float *y, qconv_timings *timings);

/* Run `iters` iterations of a loop of 12 (mullo, madd: 8) independent instances of one
 * instruction on `threads` threads of the pool.
 * *macs: multiply-accumulates done in total; *seconds: wall time. */
int qconv_peak(int instr, int threads, int64_t iters, double *macs, double *seconds);
/* QCONV_CDEF_END */

#ifdef __cplusplus
}
#endif
#endif /* QCONV_H */
