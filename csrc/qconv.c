/* qconv.c - status text, qconv_cancel, and qconv_prepare: the kernel quantized and packed once
 * into a handle (driver.h) that run.c's qconv_run calls reuse. No SIMD here: the kernels live in
 * conv_scalar.c, conv_avx2.c, conv_avx512.c, conv_amx.c, conv_vnni_*.c, dwconv_scalar.c and
 * dwconv_avx2.c and are reached through qconv_table_for (cpu_features.c, which also says what
 * this CPU runs); peak.c holds the instruction microbenchmarks. */
#define _POSIX_C_SOURCE 200809L
#include "qconv.h"

#include <math.h>
#include <time.h>

#include "driver.h"

const char *qconv_strerror(int status)
{
    switch (status) {
    case QCONV_OK: return "ok";
    case QCONV_EINVAL: return "invalid argument (a size, precision, scale, thread count or pointer is out of range)";
    case QCONV_ENOMEM: return "out of memory allocating a work buffer";
    case QCONV_EISA: return "the requested instruction set is not available on this CPU or not compiled in";
    case QCONV_ETHREAD: return "the thread pool could not start a worker thread";
    case QCONV_ESIZE: return "a buffer size would overflow 64-bit arithmetic";
    case QCONV_ENONFINITE: return "the input holds NaN or infinite values";
    case QCONV_EMAXABS: return "maxabs: the input's largest magnitude is too small to scale within float32";
    case QCONV_ESCALE: return "1 / (s_input * s_kernel) is not a positive finite float32";
    case QCONV_EOVERFLOW: return "the FP32 convolution's output holds non-finite values: float32 overflowed";
    case QCONV_ECANCELED: return "the call was cancelled (qconv_cancel)";
    default: return "unknown qconv status";
    }
}

int qconv_cancel(int *flag)
{
    if (flag == NULL)
        return QCONV_EINVAL;
    __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
    return QCONV_OK;
}

double qconv_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- qconv_prepare ------------------------------------------------------------------------ */

int qconv_tile(int isa, int precision, qconv_tile_info *info)
{
    if (isa == QCONV_ISA_AUTO) {
        int st = qconv_best_isa(QCONV_ISA_AUTO, &isa);
        if (st != QCONV_OK)
            return st;
    }
    if (info == NULL || precision < QCONV_FP32 || precision > QCONV_INT8)
        return QCONV_EINVAL;
    const qconv_isa_table *t = qconv_table_for(isa);
    if (t == NULL)
        return QCONV_EISA;
    info->mr = t->mr[precision];
    info->mrh = t->mrh[precision];
    info->nr = (int)t->nr[precision];
    info->grp = (int)t->grp[precision];
    info->dw_block = (int)t->dw_block;
    info->cpad = (int)(t->cpad[precision] > t->grp[precision] ? t->cpad[precision] : t->grp[precision]);
    return QCONV_OK;
}

/* Re-layout group g of the quantized kernel src (KH, KW, OC, ICG) into
 * [ocb][KH][KW][cp/grp][nr][grp], zeros where o >= OCG or ch >= ICG: each (ocb, tap) block is
 * zeroed, then each output channel's source row (contiguous in ch) is scattered into it (grp is
 * 1, 2 or 4, so ch / grp and ch % grp are a shift and a mask). One typed loop per element size,
 * so every copy is a plain load/store. */
#define PACK_KERNEL(T)                                                                         \
    do {                                                                                       \
        const T *s = src;                                                                      \
        T *d = dst;                                                                            \
        const int64_t taps = cv->kh * cv->kw, nr = cv->nr, grp = cv->grp, icg = cv->icg;      \
        const int64_t oc = cv->oc, ocg = cv->ocg, nocb = cv->nocb;                             \
        const int lg = grp == 4 ? 2 : grp == 2 ? 1 : 0;                                        \
        const int64_t blk = (cv->cp / grp) * nr * grp;   /* elements of one (ocb, tap) */      \
        for (int64_t b = 0; b < nocb; b++)                                                     \
            for (int64_t tap = 0; tap < taps; tap++, d += blk) {                               \
                memset(d, 0, (size_t)blk * sizeof(T));                                         \
                for (int64_t r = 0; r < nr && b * nr + r < ocg; r++) {                         \
                    const T *row = s + (tap * oc + g * ocg + b * nr + r) * icg;                \
                    T *col = d + r * grp;                                                      \
                    for (int64_t ch = 0; ch < icg; ch++)                                       \
                        col[(ch >> lg) * nr * grp + (ch & (grp - 1))] = row[ch];               \
                }                                                                              \
            }                                                                                  \
    } while (0)

static void pack_group(const qconv_conv *cv, const void *src, void *dst, int64_t g)
{
    switch (store_size(cv->wstore)) {
    case 4: PACK_KERNEL(int32_t); break;   /* float or int32: the bits are copied */
    case 2: PACK_KERNEL(int16_t); break;
    default: PACK_KERNEL(int8_t); break;
    }
}

/* dpbusd multiplies (q_x + 128) by q_w: each accumulator starts at -128 * sum(q_w) of its output
 * channel (sums modulo 2^32). wq8: the quantized kernel (KH, KW, OC, ICG). */
static void compensation(const qconv_conv *cv, const int8_t *wq8, int64_t g, int32_t *comp)
{
    for (int64_t o = 0; o < cv->nocbp; o++) {
        uint32_t sum = 0;
        if (o < cv->ocg)
            for (int64_t tap = 0; tap < cv->kh * cv->kw; tap++) {
                const int8_t *p = wq8 + (tap * cv->oc + g * cv->ocg + o) * cv->icg;
                for (int64_t ch = 0; ch < cv->icg; ch++)
                    sum += (uint32_t)(int32_t)p[ch];
            }
        comp[o] = (int32_t)(0u - 128u * sum);
    }
}

int qconv_release(qconv_conv *cv)
{
    if (cv == NULL)
        return QCONV_OK;
    ws_free(&cv->ws);
    free(cv->wq);
    free(cv->comp);
    free(cv->dww);
    free(cv->s_w);
    free(cv->bias);
    free(cv->bias_pad);
    pthread_mutex_destroy(&cv->lock);
    free(cv);
    return QCONV_OK;
}

int qconv_prepare(int precision, int isa, int threads, int truncate, int flags,
                  int64_t kh, int64_t kw, int64_t oc, int64_t icg, int64_t groups,
                  int64_t sh, int64_t sw, const float *s_w, int64_t n_sw,
                  const float *k, const float *bias, qconv_conv **out, qconv_timings *timings)
{
    if (out == NULL)
        return QCONV_EINVAL;
    *out = NULL;
    if (precision < QCONV_FP32 || precision > QCONV_INT8 || (truncate != 0 && truncate != 1) ||
        (flags & ~QCONV_FLAG_SEPARATE_DEQUANTIZE) != 0 || threads < 1 || threads > QCONV_MAX_THREADS ||
        k == NULL || kh <= 0 || kw <= 0 || oc <= 0 || icg <= 0 || groups <= 0 || oc % groups != 0 ||
        sh <= 0 || sw <= 0)
        return QCONV_EINVAL;
    const int is_int = precision != QCONV_FP32;
    if (is_int) {
        if (s_w == NULL || (n_sw != 1 && n_sw != oc))
            return QCONV_EINVAL;
        for (int64_t o = 0; o < n_sw; o++)
            if (!(isfinite(s_w[o]) && s_w[o] > 0))
                return QCONV_EINVAL;
    }
    if (isa == QCONV_ISA_AUTO) {
        int st = qconv_best_isa(QCONV_ISA_AUTO, &isa);
        if (st != QCONV_OK)
            return st;
    }
    if (!qconv_isa_usable(isa))
        return QCONV_EISA;
    if (isa == QCONV_ISA_SCALAR && threads != 1)
        return QCONV_EINVAL;
    const qconv_isa_table *t = qconv_table_for(isa);
    if (t == NULL)
        return QCONV_EISA;
    int64_t nk = kh;   /* kernel elements */
    if (checked_mul(&nk, kw) || checked_mul(&nk, oc) || checked_mul(&nk, icg))
        return QCONV_ESIZE;

    double t0 = qconv_now();
    qconv_conv *cv = calloc(1, sizeof *cv);
    if (cv == NULL)
        return QCONV_ENOMEM;
    if (pthread_mutex_init(&cv->lock, NULL) != 0) {
        free(cv);
        return QCONV_ENOMEM;
    }
    cv->precision = precision;
    cv->isa = isa;
    cv->threads = threads;
    cv->truncate = truncate;
    cv->t = t;
    cv->kh = kh; cv->kw = kw; cv->oc = oc; cv->icg = icg; cv->groups = groups;
    cv->sh = sh; cv->sw = sw;
    cv->ocg = oc / groups;
    cv->c = icg * groups;
    cv->kind = groups > 1 && icg == 1 ? QCONV_KIND_DEPTHWISE : QCONV_KIND_GEMM;
    /* SIMD families dequantize in the microkernel's store unless asked not to; the depthwise
     * kernels always do. */
    cv->fused = is_int && (cv->kind == QCONV_KIND_DEPTHWISE ||
                           (isa != QCONV_ISA_SCALAR && !(flags & QCONV_FLAG_SEPARATE_DEQUANTIZE)));
    const int64_t taps = kh * kw;
    int st = QCONV_OK;
    void *wtmp = NULL;
    double t1 = t0;

    cv->s_w = alloc64(oc * 4);
    if (cv->s_w == NULL)
        goto nomem;
    for (int64_t o = 0; o < oc; o++)
        cv->s_w[o] = is_int ? s_w[n_sw == 1 ? 0 : o] : 1.0f;
    if (bias != NULL) {
        if ((cv->bias = alloc64(oc * 4)) == NULL)
            goto nomem;
        memcpy(cv->bias, bias, (size_t)oc * 4);
    }

    /* The quantized kernel (KH, KW, OC, ICG), in the store the packing reads. */
    if (cv->kind == QCONV_KIND_DEPTHWISE) {
        cv->wstore = is_int ? QCONV_STORE_I32 : QCONV_STORE_F32;
        cv->xstore = t->dw_store[precision];
    } else {
        cv->wstore = t->wstore[precision];
        cv->xstore = t->xstore[precision];
    }
    const size_t wes = store_size(cv->wstore);
    const void *wsrc = k;   /* what the packing reads: FP32 the caller's kernel, no copy */
    {
        int bad = 0;
        const int32_t qmax = is_int ? qmax_of(precision) : 0;
        const int wplain = qconv_plain_store(cv->wstore);   /* byte planes: split after packing */
        if (!is_int) {
            (void)t->absmax(k, nk, &bad);   /* the finiteness check only: FP32 packs k itself */
        } else if ((wtmp = alloc64(nk * (int64_t)wes)) == NULL) {
            goto nomem;
        } else if (n_sw == 1) {
            bad = t->quantize(k, nk, s_w[0], qmax, truncate, wplain, wtmp);
        } else {   /* per output channel: each (tap, o) row of ICG values with its own scale */
            for (int64_t tap = 0; tap < taps; tap++)
                for (int64_t o = 0; o < oc; o++) {
                    const int64_t at = (tap * oc + o) * icg;
                    bad |= t->quantize(k + at, icg, s_w[o], qmax, truncate, wplain, (char *)wtmp + (size_t)at * wes);
                }
        }
        if (bad) {
            st = QCONV_EINVAL;   /* Python refuses a non-finite kernel before this */
            goto fail;
        }
        if (wtmp != NULL)
            wsrc = wtmp;
    }
    t1 = qconv_now();

    if (cv->kind == QCONV_KIND_DEPTHWISE) {
        cv->mult = cv->ocg;
        cv->ocp = round_up(oc, t->dw_block);
        cv->pad_n = cv->ocp;
        int64_t bytes = t->dw_pack(precision, wsrc, taps, oc, cv->ocp, NULL);
        if ((cv->dww = alloc64(bytes)) == NULL)
            goto nomem;
        t->dw_pack(precision, wsrc, taps, oc, cv->ocp, cv->dww);
    } else {
        cv->nr = t->nr[precision];
        cv->grp = t->grp[precision];
        cv->cp = round_up(icg, t->cpad[precision] > cv->grp ? t->cpad[precision] : cv->grp);
        cv->nocb = (cv->ocg + cv->nr - 1) / cv->nr;
        cv->nocbp = cv->nocb * cv->nr;
        cv->wblk = taps * cv->cp * cv->nr;
        cv->gblk = cv->nocb * cv->wblk;
        cv->pad_n = groups * cv->nocbp;
        int64_t nwq = groups;
        if (checked_mul(&nwq, cv->gblk)) {
            st = QCONV_ESIZE;
            goto fail;
        }
        if ((cv->wq = alloc64(nwq * (int64_t)wes)) == NULL)
            goto nomem;
        for (int64_t g = 0; g < groups; g++)
            pack_group(cv, wsrc, (char *)cv->wq + (size_t)(g * cv->gblk) * wes, g);
        qconv_split_planes(cv->wq, nwq, cv->wstore);
        if (cv->wstore == QCONV_STORE_I8) {
            if ((cv->comp = alloc64(cv->pad_n * 4)) == NULL)
                goto nomem;
            for (int64_t g = 0; g < groups; g++)
                compensation(cv, wtmp, g, cv->comp + g * cv->nocbp);
        }
    }
    if (bias != NULL) {
        if ((cv->bias_pad = alloc64(cv->pad_n * 4)) == NULL)
            goto nomem;
        memset(cv->bias_pad, 0, (size_t)cv->pad_n * 4);
        if (cv->kind == QCONV_KIND_DEPTHWISE)
            memcpy(cv->bias_pad, bias, (size_t)oc * 4);
        else
            for (int64_t g = 0; g < groups; g++)
                memcpy(cv->bias_pad + g * cv->nocbp, bias + g * cv->ocg, (size_t)cv->ocg * 4);
    }
    free(wtmp);
    if (timings != NULL) {
        memset(timings, 0, sizeof *timings);
        timings->quantize = is_int ? t1 - t0 : 0.0;
        timings->pack = qconv_now() - (is_int ? t1 : t0);
        timings->isa = isa;
        timings->threads = threads;
        timings->fused_dequantize = cv->fused;
        timings->kind = cv->kind;
    }
    *out = cv;
    return QCONV_OK;
nomem:
    st = QCONV_ENOMEM;
fail:
    free(wtmp);
    qconv_release(cv);
    return st;
}
