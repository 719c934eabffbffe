/* qconv.c - the C ABI: status text, CPU features, kernel dispatch, and the conv2d driver
 * (buffers, phases and their timing, work split over the thread pool). No SIMD here: the kernels
 * live in conv_scalar.c, conv_avx2.c and conv_vnni_*.c and are reached through qconv_isa_table. */
#define _POSIX_C_SOURCE 200809L
#include "qconv.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qconv_impl.h"
#include "threadpool.h"

#if defined(QCONV_HAVE_X86)
#include <cpuid.h>
#endif

const char *qconv_strerror(int status)
{
    switch (status) {
    case QCONV_OK: return "ok";
    case QCONV_EINVAL: return "invalid argument (a size, precision, scale, thread count or pointer is out of range)";
    case QCONV_ENOMEM: return "out of memory allocating a work buffer";
    case QCONV_EISA: return "the requested instruction set is not available on this CPU or not compiled in";
    case QCONV_ETHREAD: return "the thread pool could not start a worker thread";
    case QCONV_ESIZE: return "a buffer size would overflow 64-bit arithmetic";
    default: return "unknown qconv status";
    }
}

double qconv_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- CPU features ---------------------------------------------------------------------- */

#if defined(QCONV_HAVE_X86)
static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

static uint32_t detect_features(void)
{
    uint32_t f = 0;
#if defined(QCONV_HAVE_X86)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx)
        return 0;
    uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6)          /* XMM and YMM state saved by the OS */
        return 0;
    if (fma)
        f |= QCONV_CPU_FMA;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return f;
    if ((b >> 5) & 1)
        f |= QCONV_CPU_AVX2;
    int avx512f = (b >> 16) & 1, avx512vl = (b >> 31) & 1, avx512vnni = (c >> 11) & 1;
    if (avx512f && avx512vl && avx512vnni && (xcr0 & 0xE0) == 0xE0)
        f |= QCONV_CPU_AVX512VNNI_VL;
    unsigned max7 = a;
    if (max7 >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1))
        f |= QCONV_CPU_AVXVNNI;
#endif
    return f;
}

int qconv_cpu_features(uint32_t *features)
{
    if (features == NULL)
        return QCONV_EINVAL;
    *features = detect_features();
    return QCONV_OK;
}

static int isa_usable(int isa)
{
    uint32_t f = detect_features();
    int avx2 = (f & QCONV_CPU_AVX2) && (f & QCONV_CPU_FMA);
    switch (isa) {
    case QCONV_ISA_SCALAR: return 1;
#if defined(QCONV_HAVE_X86)
    case QCONV_ISA_AVX2: return avx2;
    case QCONV_ISA_AVX512VNNI: return avx2 && (f & QCONV_CPU_AVX512VNNI_VL);
    case QCONV_ISA_AVXVNNI: return avx2 && (f & QCONV_CPU_AVXVNNI);
#endif
    default: return 0;
    }
}

int qconv_best_isa(int cap, int *isa)
{
    if (isa == NULL || cap < QCONV_ISA_AUTO || cap > QCONV_ISA_AVXVNNI)
        return QCONV_EINVAL;
    /* Preference order; a cap admits the families at or below it in this order. */
    static const int order[] = {QCONV_ISA_AVX512VNNI, QCONV_ISA_AVXVNNI, QCONV_ISA_AVX2, QCONV_ISA_SCALAR};
    int rank_cap = 0;
    if (cap != QCONV_ISA_AUTO)
        for (int i = 0; i < 4; i++)
            if (order[i] == cap)
                rank_cap = i;
    for (int i = rank_cap; i < 4; i++)
        if (isa_usable(order[i])) {
            *isa = order[i];
            return QCONV_OK;
        }
    return QCONV_EISA;
}

static const qconv_isa_table *table_for(int isa)
{
    switch (isa) {
    case QCONV_ISA_SCALAR: return &qconv_scalar_table;
#if defined(QCONV_HAVE_X86)
    case QCONV_ISA_AVX2: return &qconv_avx2_table;
    case QCONV_ISA_AVX512VNNI: return &qconv_avx512vnni_table;
    case QCONV_ISA_AVXVNNI: return &qconv_avxvnni_table;
#endif
    default: return NULL;
    }
}

/* ---- the driver ------------------------------------------------------------------------ */

static size_t store_size(int store)
{
    switch (store) {
    case QCONV_STORE_F32: case QCONV_STORE_I32: return 4;
    case QCONV_STORE_I16: return 2;
    default: return 1;
    }
}

static void *alloc64(int64_t bytes)
{
    void *p = NULL;
    if (bytes <= 0)
        bytes = 64;
    if (posix_memalign(&p, 64, (size_t)((bytes + 63) & ~(int64_t)63)) != 0)
        return NULL;
    return p;
}

typedef struct {
    const qconv_isa_table *t;
    const qconv_conv_args *a;
    const float *x;
    float s;
    int32_t qmax;
    int truncate, store;
    const int32_t *acc;
    float inv;
    float *y;
    int split_rows;
    const float *k;     /* the float kernel, quantized into wtmp (NULL for fp32) */
    float s_w;
    int wstore;
    void *wtmp;
    void *wq;           /* the packed kernel being written */
} job;

/* Worker ith's share [*lo, *hi) of [0, total) in whole 16-element vectors (the last share ends
 * at total). */
static void split_vectors(int64_t total, int ith, int nth, long long *lo, long long *hi)
{
    qconv_split((total + 15) / 16, ith, nth, lo, hi);
    *lo *= 16;
    *hi = *hi * 16 < total ? *hi * 16 : total;
}

/* Quantize x into the padded layout, one padded row (n, i) at a time, and (integer precisions)
 * this worker's contiguous share of the kernel into wtmp. */
static void quantize_task(void *p, int ith, int nth)
{
    const job *j = p;
    if (j->wtmp != NULL) {
        int64_t nk = j->a->kh * j->a->kw * j->a->oc * j->a->c;
        long long lo, hi;
        split_vectors(nk, ith, nth, &lo, &hi);
        if (lo < hi)
            j->t->quantize(j->k + lo, hi - lo, j->s_w, j->qmax, j->truncate, j->wstore,
                           (char *)j->wtmp + (size_t)lo * store_size(j->wstore));
    }
    const qconv_conv_args *a = j->a;
    size_t es = store_size(j->store);
    int64_t hp = a->h + a->kh - 1, wp = a->w + a->kw - 1;
    int64_t pt = (a->kh - 1) / 2, pl = (a->kw - 1) / 2;
    int zero = j->store == QCONV_STORE_U8OFF ? 0x80 : 0;
    long long lo, hi;
    qconv_split(a->n * hp, ith, nth, &lo, &hi);
    for (long long r = lo; r < hi; r++) {
        int64_t n = r / hp, i = r % hp - pt;
        char *row = (char *)a->xq + (size_t)(r * a->row) * es;
        if (i < 0 || i >= a->h) {
            memset(row, zero, (size_t)a->row * es);
            continue;
        }
        const float *src = j->x + ((n * a->h + i) * a->w) * a->c;
        if (a->cp != a->c) {
            memset(row, zero, (size_t)a->row * es);
            for (int64_t q = 0; q < a->w; q++)
                j->t->quantize(src + q * a->c, a->c, j->s, j->qmax, j->truncate, j->store,
                               row + (size_t)((pl + q) * a->pix) * es);
        } else {
            memset(row, zero, (size_t)(pl * a->pix) * es);
            memset(row + (size_t)((pl + a->w) * a->pix) * es, zero, (size_t)((wp - pl - a->w) * a->pix) * es);
            j->t->quantize(src, a->w * a->c, j->s, j->qmax, j->truncate, j->store, row + (size_t)(pl * a->pix) * es);
        }
    }
}

static void conv_task(void *p, int ith, int nth)
{
    const job *j = p;
    const qconv_conv_args *a = j->a;
    qconv_conv_fn fn = j->t->conv[a->precision];
    long long lo, hi;
    if (j->split_rows) {
        qconv_split(a->n * a->h, ith, nth, &lo, &hi);
        if (lo < hi)
            fn(a, lo, hi, 0, a->nocb);
    } else {
        qconv_split(a->nocb, ith, nth, &lo, &hi);
        if (lo < hi)
            fn(a, 0, a->n * a->h, lo, hi);
    }
}

static void dequantize_task(void *p, int ith, int nth)
{
    const job *j = p;
    int64_t total = j->a->n * j->a->h * j->a->w * j->a->oc;
    long long lo, hi;
    split_vectors(total, ith, nth, &lo, &hi);
    if (lo < hi)
        j->t->dequantize(j->acc + lo, hi - lo, j->inv, j->y + lo);
}

/* Re-layout the kernel: src (KH, KW, OC, C) -> [ocb][KH][KW][cp/grp][nr][grp], zeros where
 * o >= OC or ch >= C. One typed loop per element size, so every copy is a plain load/store. */
#define PACK_KERNEL(T)                                                                         \
    do {                                                                                       \
        const T *s = src;                                                                      \
        T *d = dst;                                                                            \
        const int64_t ng = a->cp / a->grp, taps = a->kh * a->kw;                               \
        d += b0 * a->wblk;                                                                     \
        for (int64_t b = b0; b < b1; b++)                                                      \
            for (int64_t tap = 0; tap < taps; tap++)                                           \
                for (int64_t cg = 0; cg < ng; cg++)                                            \
                    for (int64_t r = 0; r < a->nr; r++) {                                      \
                        const int64_t o = b * a->nr + r;                                       \
                        const T *so = s + (tap * a->oc + o) * a->c;                            \
                        for (int64_t g = 0; g < a->grp; g++) {                                 \
                            const int64_t ch = cg * a->grp + g;                                \
                            *d++ = (o < a->oc && ch < a->c) ? so[ch] : (T)0;                   \
                        }                                                                      \
                    }                                                                          \
    } while (0)

static void pack_kernel(const qconv_conv_args *a, const void *src, size_t es, void *dst, int64_t b0, int64_t b1)
{
    switch (es) {
    case 4: PACK_KERNEL(int32_t); break;   /* float or int32: the bits are copied */
    case 2: PACK_KERNEL(int16_t); break;
    default: PACK_KERNEL(int8_t); break;
    }
}

/* dpbusd multiplies (q_x + 128) by q_w: each accumulator starts at -128 * sum(q_w) of its output
 * channel (sums modulo 2^32). wq8: the quantized kernel (KH, KW, OC, C); comp: nocb * nr entries,
 * of which OC blocks [b0, b1) are written here. */
static void compensation(const qconv_conv_args *a, const int8_t *wq8, int32_t *comp, int64_t b0, int64_t b1)
{
    for (int64_t o = b0 * a->nr; o < b1 * a->nr; o++) {
        uint32_t sum = 0;
        if (o < a->oc)
            for (int64_t tap = 0; tap < a->kh * a->kw; tap++) {
                const int8_t *p = wq8 + (tap * a->oc + o) * a->c;
                for (int64_t ch = 0; ch < a->c; ch++)
                    sum += (uint32_t)(int32_t)p[ch];
            }
        comp[o] = (int32_t)(0u - 128u * sum);
    }
}

/* Pack this worker's OC blocks of the kernel (and their dpbusd compensation). */
static void pack_task(void *p, int ith, int nth)
{
    const job *j = p;
    const qconv_conv_args *a = j->a;
    long long lo, hi;
    qconv_split(a->nocb, ith, nth, &lo, &hi);
    if (lo >= hi)
        return;
    pack_kernel(a, j->wtmp != NULL ? j->wtmp : (const void *)j->k, store_size(j->wstore), j->wq, lo, hi);
    if (a->comp != NULL)
        compensation(a, j->wtmp, (int32_t *)a->comp, lo, hi);
}

static int checked_mul(int64_t *acc, int64_t v)
{
    return __builtin_mul_overflow(*acc, v, acc) || *acc > ((int64_t)1 << 48);
}

int qconv_conv2d(int precision, int isa, int threads, int truncate, int flags,
                 float s_x, float s_w, float inv,
                 const float *x, int64_t n, int64_t h, int64_t w, int64_t c,
                 const float *k, int64_t kh, int64_t kw, int64_t oc,
                 float *y, qconv_timings *timings)
{
    if (precision < QCONV_FP32 || precision > QCONV_INT8 || (truncate != 0 && truncate != 1) ||
        (flags & ~QCONV_FLAG_SEPARATE_DEQUANTIZE) != 0 ||
        threads < 1 || threads > QCONV_MAX_THREADS || x == NULL || k == NULL || y == NULL ||
        timings == NULL || n <= 0 || h <= 0 || w <= 0 || c <= 0 || kh <= 0 || kw <= 0 || oc <= 0)
        return QCONV_EINVAL;
    int is_int = precision != QCONV_FP32;
    if (is_int && !(isfinite(s_x) && isfinite(s_w) && isfinite(inv) && s_x > 0 && s_w > 0 && inv > 0))
        return QCONV_EINVAL;
    if (isa == QCONV_ISA_AUTO) {
        int st = qconv_best_isa(QCONV_ISA_AUTO, &isa);
        if (st != QCONV_OK)
            return st;
    }
    if (!isa_usable(isa))
        return QCONV_EISA;
    if (isa == QCONV_ISA_SCALAR && threads != 1)
        return QCONV_EINVAL;
    const qconv_isa_table *t = table_for(isa);
    if (t == NULL)
        return QCONV_EISA;

    qconv_conv_args a;
    memset(&a, 0, sizeof a);
    a.precision = precision;
    a.n = n; a.h = h; a.w = w; a.c = c; a.kh = kh; a.kw = kw; a.oc = oc;
    a.nr = t->nr[precision];
    a.grp = t->grp[precision];
    a.cp = (c + a.grp - 1) / a.grp * a.grp;
    a.nocb = (oc + a.nr - 1) / a.nr;
    int xstore = t->xstore[precision], wstore = t->wstore[precision];
    size_t xes = store_size(xstore), wes = store_size(wstore);

    /* Sizes, refusing anything past 2^48 elements (api.py refuses far earlier). */
    int64_t hp = h + kh - 1, wp = w + kw - 1, nx = n, nwq = a.nocb, nk = kh, ny = n;
    if (checked_mul(&nx, hp) || checked_mul(&nx, wp) || checked_mul(&nx, a.cp) ||
        checked_mul(&nwq, a.nr) || checked_mul(&nwq, kh) || checked_mul(&nwq, kw) || checked_mul(&nwq, a.cp) ||
        checked_mul(&nk, kw) || checked_mul(&nk, oc) || checked_mul(&nk, c) ||
        checked_mul(&ny, h) || checked_mul(&ny, w) || checked_mul(&ny, oc))
        return QCONV_ESIZE;
    a.pix = a.cp;
    a.row = wp * a.cp;
    a.img = hp * a.row;
    a.wblk = kh * kw * a.cp * a.nr;

    /* SIMD families dequantize in the microkernel's store unless asked not to. */
    int fused = is_int && isa != QCONV_ISA_SCALAR && !(flags & QCONV_FLAG_SEPARATE_DEQUANTIZE);
    int separate = is_int && !fused;
    void *xq = alloc64(nx * (int64_t)xes);
    void *wq = alloc64(nwq * (int64_t)wes);
    void *wtmp = is_int ? alloc64(nk * (int64_t)wes) : NULL;
    int32_t *acc = separate ? alloc64(ny * 4) : NULL;
    int32_t *comp = wstore == QCONV_STORE_I8 ? alloc64(a.nocb * a.nr * 4) : NULL;
    int st = QCONV_OK;
    if (xq == NULL || wq == NULL || (is_int && wtmp == NULL) || (separate && acc == NULL) ||
        (wstore == QCONV_STORE_I8 && comp == NULL)) {
        st = QCONV_ENOMEM;
        goto out;
    }
    a.xq = xq;
    a.wq = wq;
    a.comp = comp;
    a.out = separate ? (void *)acc : (void *)y;
    a.fused = fused;
    a.inv = inv;

    int32_t qmax = precision == QCONV_INT32 ? 2147483647 : precision == QCONV_INT16 ? 32767 : 127;
    job j = {.t = t, .a = &a, .x = x, .s = s_x, .qmax = qmax, .truncate = truncate, .store = xstore,
             .acc = acc, .inv = inv, .y = y, .k = k, .s_w = s_w, .wstore = wstore, .wtmp = wtmp, .wq = wq};
    /* The largest of the two split axes: output rows (N*H) or OC blocks. */
    j.split_rows = n * h >= a.nocb;

    double t0 = qconv_now();
    if ((st = qconv_pool_run(threads, quantize_task, &j)) != QCONV_OK)
        goto out;
    double t1 = qconv_now();
    if ((st = qconv_pool_run(threads, pack_task, &j)) != QCONV_OK)
        goto out;
    double t2 = qconv_now();
    if ((st = qconv_pool_run(threads, conv_task, &j)) != QCONV_OK)
        goto out;
    double t3 = qconv_now();
    if (separate && (st = qconv_pool_run(threads, dequantize_task, &j)) != QCONV_OK)
        goto out;
    double t4 = qconv_now();

    if (is_int) {
        timings->quantize = t1 - t0;
        timings->pack = t2 - t1;
    } else {
        timings->quantize = 0.0;
        timings->pack = t2 - t0;   /* fp32: the padded copy of x and the kernel re-layout */
    }
    timings->convolve = t3 - t2;
    timings->dequantize = separate ? t4 - t3 : 0.0;
    timings->isa = isa;
    timings->threads = threads;
    timings->fused_dequantize = fused;
out:
    free(xq);
    free(wq);
    free(wtmp);
    free(acc);
    free(comp);
    return st;
}

/* ---- microbenchmarks ------------------------------------------------------------------- */

typedef struct {
    double (*body)(int, int64_t);
    int instr;
    int64_t iters;
    double macs[QCONV_MAX_THREADS];
} peak_job;

static void peak_task(void *p, int ith, int nth)
{
    (void)nth;
    peak_job *j = p;
    j->macs[ith] = j->body(j->instr, j->iters);
}

int qconv_peak(int instr, int threads, int64_t iters, double *macs, double *seconds)
{
    if (macs == NULL || seconds == NULL || iters < 1 || threads < 1 || threads > QCONV_MAX_THREADS)
        return QCONV_EINVAL;
    peak_job j;
    memset(&j, 0, sizeof j);
    j.instr = instr;
    j.iters = iters;
    switch (instr) {
    case QCONV_PEAK_SCALAR_FMA:
        j.body = qconv_peak_body__scalar;
        break;
#if defined(QCONV_HAVE_X86)
    case QCONV_PEAK_FMA: case QCONV_PEAK_MULLO: case QCONV_PEAK_MADD:
        if (!isa_usable(QCONV_ISA_AVX2))
            return QCONV_EISA;
        j.body = qconv_peak_body__avx2;
        break;
    case QCONV_PEAK_DPWSSD: case QCONV_PEAK_DPBUSD:
        if (isa_usable(QCONV_ISA_AVX512VNNI))
            j.body = qconv_peak_body__avx512vnni;
        else if (isa_usable(QCONV_ISA_AVXVNNI))
            j.body = qconv_peak_body__avxvnni;
        else
            return QCONV_EISA;
        break;
#endif
    default:
        return QCONV_EINVAL;
    }
    double t0 = qconv_now();
    int st = qconv_pool_run(threads, peak_task, &j);
    double t1 = qconv_now();
    if (st != QCONV_OK)
        return st;
    double total = 0;
    for (int i = 0; i < threads; i++)
        total += j.macs[i];
    *macs = total;
    *seconds = t1 - t0;
    return QCONV_OK;
}
