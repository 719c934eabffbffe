/* qconv.h - the public C ABI of qconv's CPU backends.
 *
 * Every entry point returns an int status (QCONV_OK == 0); qconv_strerror() turns it into text.
 * The block between QCONV_CDEF_BEGIN and QCONV_CDEF_END is read verbatim by csrc/build_cffi.py
 * as the cffi cdef: keep it free of preprocessor lines and of anything cffi cannot parse.
 *
 * Layouts (all C-contiguous): x float32 (N, H, W, C); w float32 (KH, KW, OC, C / groups);
 * y float32 (N, HO, WO, OC). Stride, zero padding, groups, bias and per-channel kernel scales as
 * in ../shared/CONTRACT.md ("Extensions for real networks"); the caller resolves the padding.
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
    QCONV_EISA = 3,       /* the requested instruction set is not available on this CPU or not compiled in */
    QCONV_ETHREAD = 4,    /* the thread pool could not start a worker */
    QCONV_ESIZE = 5,      /* a size computation would overflow */
    QCONV_ENONFINITE = 6, /* the input holds NaN or +-inf (contract.check_finite) */
    QCONV_EMAXABS = 7,    /* maxabs: q / max|x| is past float32's range (contract.maxabs_scale) */
    QCONV_ESCALE = 8,     /* 1 / (s_x * s_w[o]) is not a positive finite float32 (contract.dequant_factor) */
    QCONV_EOVERFLOW = 9,  /* FP32: an output is non-finite, float32 overflowed (contract.fp32_overflow_error) */
    QCONV_ECANCELED = 10  /* qconv_cancel stopped the call; the output is incomplete */
};

enum qconv_precision { QCONV_FP32 = 0, QCONV_INT32 = 1, QCONV_INT16 = 2, QCONV_INT8 = 3 };

/* Kernel families, in increasing order. QCONV_ISA_AUTO picks the best the CPU has. */
enum qconv_isa {
    QCONV_ISA_AUTO = -1,
    QCONV_ISA_SCALAR = 0,       /* conv_scalar.c, dwconv_scalar.c: single thread, not vectorized */
    QCONV_ISA_AVX2 = 1,         /* conv_avx2.c, dwconv_avx2.c: AVX2 + FMA */
    QCONV_ISA_AVX512VNNI = 2,   /* conv_vnni_evex.c: AVX2 kernels + 256-bit EVEX vpdpbusd/vpdpwssd */
    QCONV_ISA_AVXVNNI = 3,      /* conv_vnni_vex.c: AVX2 kernels + VEX AVX-VNNI vpdpbusd/vpdpwssd */
    QCONV_ISA_VNNI_EMULATED = 4, /* conv_vnni_emu.c: the AVX512-VNNI family's kernels with vpdpbusd and
                                   vpdpwssd emulated by AVX2 (tests only; never chosen by auto) */
    QCONV_ISA_AVX512 = 5,       /* conv_avx512.c: zmm kernels (FMA, vpmulld, vpdpwssd, vpdpbusd), 14 x 32 */
    QCONV_ISA_AMX = 6,          /* conv_amx.c: INT8, INT16, INT32 on AMX tiles (tdpb**d); FP32 as AVX512 */
    QCONV_ISA_AMX_EMULATED = 7  /* conv_amx_emu.c: the AMX kernels with the tile instructions emulated
                                   in C (tests only; never chosen by auto; any AVX2 CPU) */
};

/* Bits of qconv_cpu_features(). */
enum qconv_feature {
    QCONV_CPU_AVX2 = 1,
    QCONV_CPU_FMA = 2,
    QCONV_CPU_AVX512VNNI_VL = 4,   /* AVX512F + AVX512VL + AVX512_VNNI, OS saves ZMM state */
    QCONV_CPU_AVXVNNI = 8,         /* VEX-encoded AVX-VNNI */
    QCONV_CPU_AVX512 = 16,         /* AVX512F + BW + VL + VNNI, OS saves ZMM state */
    QCONV_CPU_AMX = 32             /* AMX-TILE + AMX-INT8 in CPUID and XCR0 (Linux's permission aside) */
};

/* Instruction microbenchmarks for qconv_peak(). */
enum qconv_peak_instr {
    QCONV_PEAK_FMA = 0,        /* vfmadd231ps ymm: 8 MAC */
    QCONV_PEAK_MULLO = 1,      /* vpmulld + vpaddd ymm: 8 MAC (8 independent per iteration) */
    QCONV_PEAK_MADD = 2,       /* vpmaddwd + vpaddd ymm: 16 MAC (8 independent per iteration) */
    QCONV_PEAK_DPWSSD = 3,     /* vpdpwssd ymm: 16 MAC */
    QCONV_PEAK_DPBUSD = 4,     /* vpdpbusd ymm: 32 MAC */
    QCONV_PEAK_SCALAR_FMA = 5, /* scalar float mul + add, the c-scalar baseline's instruction */
    QCONV_PEAK_FMA512 = 6,     /* vfmadd231ps zmm: 16 MAC */
    QCONV_PEAK_DPWSSD512 = 7,  /* vpdpwssd zmm: 32 MAC */
    QCONV_PEAK_DPBUSD512 = 8,  /* vpdpbusd zmm: 64 MAC */
    QCONV_PEAK_AMX_DPBSSD = 9  /* tdpbssd 16 x 16 x 64: 16384 MAC (4 independent tiles per iteration) */
};

/* Worker threads one call may use (qconv_prepare, qconv_peak); the output-channel tile. */
enum qconv_limits { QCONV_MAX_THREADS = 256, QCONV_NR = 16 };

/* Bits of qconv_prepare's flags. */
enum qconv_flags {
    QCONV_FLAG_SEPARATE_DEQUANTIZE = 1  /* SIMD families: dequantize in its own pass over int32
                                           accumulators instead of in the microkernel's store */
};

/* Which kernel a prepared convolution runs. */
enum qconv_kind {
    QCONV_KIND_GEMM = 0,       /* implicit GEMM over the zero-padded input, looped over groups */
    QCONV_KIND_DEPTHWISE = 1   /* groups == C, one input channel per group (OC = C * multiplier) */
};

/* Seconds spent in each phase of one call (CLOCK_MONOTONIC), and what ran. */
typedef struct {
    double quantize;     /* x to integers (into the zero-padded layout), with maxabs's reduction */
    double pack;         /* prepare: the kernel's re-layout; run: fp32's padded copy of x */
    double convolve;     /* the convolution proper (depthwise: quantize fused in) */
    double dequantize;   /* int32 accumulators to float32 (0 when fused into the convolve store) */
    int isa;             /* the kernel family that ran (enum qconv_isa) */
    int threads;         /* worker threads that ran the convolution */
    int fused_dequantize; /* 1: dequantize ran inside the convolve phase's stores */
    int kind;            /* enum qconv_kind */
    float s_x;           /* the input scale used (integer precisions; maxabs: the one computed) */
    float x_absmax;      /* maxabs: max|x| over the input, which s_x was computed from (else 0) */
    int temporary_buffers; /* 1: the handle's buffers were busy (another call), this call allocated */
    int64_t overflowed;  /* FP32: outputs that came out non-finite (QCONV_EOVERFLOW when > 0) */
} qconv_timings;

/* The tile a kernel family declares for one precision (tests derive boundary shapes from it). */
typedef struct {
    int mr;        /* output pixels per full-width tile (OC block of nr channels) */
    int mrh;       /* pixels per half-width tile (last OC block of <= nr/2 channels; 0: none) */
    int nr;        /* output channels per block */
    int grp;       /* input channels per packed group (pairs for madd/dpwssd, quads for dpbusd) */
    int dw_block;  /* depthwise: channels per vector block (the channel axis is padded to it) */
    int cpad;      /* GEMM: each group's input channels are padded to a multiple of this */
} qconv_tile_info;

/* A prepared convolution: the kernel quantized and packed once, plus reusable work buffers. */
typedef struct qconv_conv qconv_conv;

const char *qconv_strerror(int status);

/* Bitmask of enum qconv_feature for this CPU (CPUID + XGETBV). */
int qconv_cpu_features(uint32_t *features);

/* The best kernel family usable here, capped at `cap` (QCONV_ISA_AUTO: no cap); a cap of
 * QCONV_ISA_VNNI_EMULATED or QCONV_ISA_AMX_EMULATED asks for exactly that family (usable wherever
 * AVX2 is). */
int qconv_best_isa(int cap, int *isa);

/* Why `isa` cannot run here, into buf (len bytes, NUL-terminated); "" when it can. */
int qconv_isa_reason(int isa, char *buf, int64_t len);

/* The declared tile of `isa`'s kernels for `precision`. */
int qconv_tile(int isa, int precision, qconv_tile_info *info);

/* Prepare y = conv2d(x, k) under the contract (../shared/CONTRACT.md, with its extensions).
 * precision: enum qconv_precision; isa: enum qconv_isa (QCONV_ISA_SCALAR needs threads == 1);
 * truncate: 0 round half to even, 1 toward zero; flags: enum qconv_flags.
 * k: float32 (KH, KW, OC, ICG), ICG = C / groups, OC divisible by groups; stride (sh, sw).
 * s_w: n_sw == 1 or OC float32 kernel scales (> 0, finite; ignored for fp32).
 * bias: NULL or OC float32 values, added after dequantization (fp32: after accumulation).
 * Depthwise layers (groups > 1, ICG == 1) get the depthwise kernels. timings (may be NULL):
 * quantize and pack of the kernel. *out is released with qconv_release. */
int qconv_prepare(int precision, int isa, int threads, int truncate, int flags,
                  int64_t kh, int64_t kw, int64_t oc, int64_t icg, int64_t groups,
                  int64_t sh, int64_t sw, const float *s_w, int64_t n_sw,
                  const float *k, const float *bias, qconv_conv **out, qconv_timings *timings);

/* Run a prepared convolution on x float32 (N, H, W, C) into y float32 (N, HO, WO, OC).
 * Zero padding (pt, pb, pl, pr) and the output size come from the caller's geometry; they must
 * satisfy HO = (H + pt + pb - KH) / sh + 1 (likewise WO) and pads < the kernel (QCONV_EINVAL).
 * Integer precisions: s_x > 0 quantizes with s_x; s_x == 0 takes maxabs of x to input_q
 * (bit-identical to contract.maxabs_scale) in a threaded reduction. inv[o] = float32(1 /
 * (double(s_x) * double(s_w[o]))) is formed here. Non-finite x: QCONV_ENONFINITE (nothing
 * written to y past that point is meaningful). FP32 outputs that overflow float32 (NaN or inf
 * from finite data): QCONV_EOVERFLOW, their count in timings->overflowed. cancel: NULL, or a
 * flag that qconv_cancel may set from another thread while the call runs; the convolution then
 * stops between blocks of work and the call returns QCONV_ECANCELED. Safe to call from several
 * threads at once: a call that finds the handle's buffers busy allocates its own. */
int qconv_run(qconv_conv *conv, const float *x, int64_t n, int64_t h, int64_t w,
              int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t ho, int64_t wo,
              float s_x, int64_t input_q, float *y, qconv_timings *timings, const int *cancel);

/* Ask the qconv_run given this flag to stop (sets *flag; safe from any thread). */
int qconv_cancel(int *flag);

/* Free a prepared convolution and its buffers (NULL: nothing). */
int qconv_release(qconv_conv *conv);

/* Run `iters` iterations of a loop of 12 (mullo, madd: 8) independent instances of one
 * instruction on `threads` threads of the pool.
 * *macs: multiply-accumulates done in total; *seconds: wall time. */
int qconv_peak(int instr, int threads, int64_t iters, double *macs, double *seconds);
/* QCONV_CDEF_END */

#ifdef __cplusplus
}
#endif
#endif /* QCONV_H */
