/* driver.h - what qconv.c (prepare) and run.c (the per-call driver) share: the prepared
 * convolution's struct, its work buffers, and small helpers. Not part of the ABI. */
#ifndef QCONV_DRIVER_H
#define QCONV_DRIVER_H

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "qconv_impl.h"

static inline size_t store_size(int store)
{
    switch (store) {
    case QCONV_STORE_F32: case QCONV_STORE_I32: return 4;
    case QCONV_STORE_I16: case QCONV_STORE_I16PL: return 2;
    case QCONV_STORE_I32PL: return 4;
    default: return 1;
    }
}

static inline void *alloc64(int64_t bytes)
{
    void *p = NULL;
    if (bytes <= 0)
        bytes = 64;
    if (posix_memalign(&p, 64, (size_t)((bytes + 63) & ~(int64_t)63)) != 0)
        return NULL;
    return p;
}

/* *acc *= v, refusing products past 2^48 (api.py refuses far earlier). */
static inline int checked_mul(int64_t *acc, int64_t v)
{
    return __builtin_mul_overflow(*acc, v, acc) || *acc > ((int64_t)1 << 48);
}

static inline int64_t round_up(int64_t v, int64_t m)
{
    return (v + m - 1) / m * m;
}
static inline int32_t qmax_of(int precision)
{
    return precision == QCONV_INT32 ? 2147483647 : precision == QCONV_INT16 ? 32767 : 127;
}

/* ---- the prepared convolution ------------------------------------------------------------ */

/* Work buffers, grown as calls need them (never shrunk until the handle is released). */
typedef struct {
    void *xq;            /* GEMM: the quantized, zero-padded input */
    int64_t xq_bytes;
    int32_t *acc;        /* GEMM with a separate dequantize: the int32 accumulators */
    int64_t acc_bytes;
    char *dw;            /* depthwise: per-thread rings of padded rows, tap pointers, a zero row */
    int64_t dw_bytes;
    float *inv;          /* OC dequantize factors */
    float *inv_pad;      /* the kernels' zero-padded copy (GEMM: per group, nocb*nr; dw: ocp) */
    int64_t inv_n, inv_pad_n;
    void *job;           /* the call's run_job (run.c): ~2 KB of per-worker slots, kept between calls */
    int64_t job_bytes;
} workspace;

struct qconv_conv {
    int precision, isa, threads, truncate, fused, kind;
    const qconv_isa_table *t;
    int64_t kh, kw, oc, icg, groups, sh, sw, ocg, c;
    /* GEMM */
    int64_t nr, grp, cp, nocb, nocbp, wblk, gblk;
    int xstore, wstore;
    void *wq;            /* groups * gblk packed kernel elements */
    int32_t *comp;       /* groups * nocbp (dpbusd) or NULL */
    /* depthwise */
    int64_t ocp, mult;
    void *dww;
    /* both */
    float *s_w;          /* OC kernel scales (one value replicated where one was given) */
    float *bias;         /* OC or NULL */
    float *bias_pad;     /* zero-padded like inv_pad, or NULL */
    int64_t pad_n;       /* entries of bias_pad / inv_pad */
    pthread_mutex_t lock;  /* guards ws */
    workspace ws;
};

static inline void ws_free(workspace *ws)
{
    free(ws->xq);
    free(ws->acc);
    free(ws->dw);
    free(ws->inv);
    free(ws->inv_pad);
    free(ws->job);
    memset(ws, 0, sizeof *ws);
}


#endif
