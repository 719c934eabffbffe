/* run.c - qconv_run: one call of a prepared convolution as one pool job (maxabs reduction,
 * quantize + pad, the convolution, the dequantize), its phases separated by barriers; FP32
 * overflow checked and the cancel flag polled between blocks of the convolution.
 * (Longer than the house's ~400 lines on purpose: every phase of one call reads the same run_job
 * and meets the others at its barriers; split across files, one call's control flow would be too.) */
#define _POSIX_C_SOURCE 200809L
#include "qconv.h"

#include <float.h>
#include <math.h>

#include "driver.h"
#include "threadpool.h"

/* Worker ith's share [*lo, *hi) of [0, total) in whole 16-element vectors (the last share ends
 * at total). */
static void split_vectors(int64_t total, int ith, int nth, long long *lo, long long *hi)
{
    qconv_split((total + 15) / 16, ith, nth, lo, hi);
    *lo *= 16;
    *hi = *hi * 16 < total ? *hi * 16 : total;
}

/* contract.maxabs_scale, bit for bit: s = float32(q / m) in double, stepped down while the
 * float32 product m * s rounds past q; m == 0 -> 1. QCONV_EMAXABS where q / m overflows float32. */
static int maxabs_scale(float m, int64_t q, float *out)
{
    if (m == 0.0f) {
        *out = 1.0f;
        return QCONV_OK;
    }
    float s = (float)((double)q / (double)m);
    if (!isfinite(s))
        return QCONV_EMAXABS;
    while ((double)(m * s) > (double)q)
        s = nextafterf(s, 0.0f);
    *out = s;
    return QCONV_OK;
}

/* Make *p hold at least `bytes` (64-byte aligned; old contents are not kept). */
static int grow(void **p, int64_t *have, int64_t bytes)
{
    if (bytes <= *have && *p != NULL)
        return QCONV_OK;
    free(*p);
    *p = alloc64(bytes);
    *have = *p != NULL ? bytes : 0;
    return *p != NULL ? QCONV_OK : QCONV_ENOMEM;
}

/* ---- per-call jobs ------------------------------------------------------------------------ */

typedef struct {
    const qconv_conv *cv;
    const qconv_isa_table *t;
    const float *x;
    int64_t n, h, w, pt, pl, ho, wo, hp, wp;
    int sampled;                /* a 1x1 layer with a stride: xq holds the sampled pixels (sample_task) */
    int64_t row_pix;            /* GEMM: pixels stored per padded row, sw phases (qconv_impl.h) */
    float s;
    float absmax;               /* maxabs: max|x|, which s was computed from */
    int32_t qmax;
    int64_t input_q;            /* maxabs's Q (0: s is given) */
    int store;
    int separate;               /* integers: a dequantize phase after the convolution */
    void *xq;
    int32_t *acc;
    float *y;
    const int *cancel;          /* NULL, or the caller's flag: stop between blocks once it is set */
    workspace *ws;
    const float *inv, *inv_pad;
    qconv_conv_args base;       /* GEMM: the per-group args less the group offsets */
    int64_t unit_rows, unit_blocks, col_units, units;   /* GEMM work units (work_units) */
    /* depthwise */
    char *dw;                   /* ring area, dw_worker bytes per worker */
    int64_t dw_worker, row_bytes;
    const void *zero_row;
    qconv_dw_args dwa;
    /* set by thread 0 between barriers */
    int st;                     /* maxabs: the scale's status */
    double t1;                  /* the scale known */
    /* results per worker */
    float part[QCONV_MAX_THREADS];
    int bad[QCONV_MAX_THREADS];         /* non-finite input */
    int stopped[QCONV_MAX_THREADS];     /* left work undone: the call was cancelled */
    int64_t overflowed[QCONV_MAX_THREADS];  /* FP32: non-finite outputs */
    /* When each thread left the barrier that starts the convolution, and the dequantize. The phase
     * starts at the earliest: a thread the OS holds back at the barrier may find every work unit
     * taken by the others, so no one thread's clock marks the phase. */
    double conv_began[QCONV_MAX_THREADS], deq_began[QCONV_MAX_THREADS];
    /* Each thread's share of the work units, [next, end): next is taken atomically, by the owner
     * and, once they have run out of their own, by the other threads (a cache line each). */
    struct {
        int64_t next, end;
        char pad[48];
    } share[QCONV_MAX_THREADS];
    int64_t taps[];             /* GEMM: base.tap, KH*KW offsets */
} run_job;

/* Output values per block of the convolution: the cancel flag is polled between blocks, and
 * FP32 checks a block's outputs for overflow while they are still in cache. */
#define BLOCK_OUTPUTS (32 * 1024)

static int cancelled(const run_job *j)
{
    return j->cancel != NULL && __atomic_load_n(j->cancel, __ATOMIC_RELAXED) != 0;
}

/* How many of v[0..count) are NaN or infinite (a loop the compiler vectorizes). */
static int64_t count_nonfinite(const float *v, int64_t count)
{
    int64_t bad = 0;
    for (int64_t i = 0; i < count; i++)
        bad += !(fabsf(v[i]) <= FLT_MAX);
    return bad;
}

/* FP32: the non-finite values among y's rows [r0, r1) of the flattened N*HO axis, channels
 * [c0, c1) of each group. */
static int64_t overflowed_outputs(const run_job *j, int64_t r0, int64_t r1, int64_t c0, int64_t c1)
{
    const qconv_conv *cv = j->cv;
    if (cv->groups == 1 && c0 == 0 && c1 == cv->oc)
        return count_nonfinite(j->y + r0 * j->wo * cv->oc, (r1 - r0) * j->wo * cv->oc);
    int64_t bad = 0;
    for (int64_t p = r0 * j->wo; p < r1 * j->wo; p++)
        for (int64_t g = 0; g < cv->groups; g++)
            bad += count_nonfinite(j->y + p * cv->oc + g * cv->ocg + c0, c1 - c0);
    return bad;
}

/* max|x| and non-finite values over this worker's share of x. */
static void absmax_task(void *p, int ith, int nth)
{
    run_job *j = p;
    long long lo, hi;
    split_vectors(j->n * j->h * j->w * j->cv->c, ith, nth, &lo, &hi);
    int bad = 0;
    j->part[ith] = lo < hi ? j->t->absmax(j->x + lo, hi - lo, &bad) : 0.0f;
    j->bad[ith] = bad;
}

/* npix pixels of x, one every `step` pixels from src, into consecutive stored pixels at dst:
 * quantized (fp32: copied), each group's channels padded to cp with zero's representation. One
 * call for a contiguous run of dense pixels; returns 1 if a value was NaN or infinite. */
static int quantize_pixels(const run_job *j, const float *src, int64_t npix, int64_t step, char *dst)
{
    const qconv_conv *cv = j->cv;
    const size_t es = store_size(j->store);
    const int64_t pix = cv->groups * cv->cp, c = cv->c;
    if (cv->cp == cv->icg && step == 1)
        return j->t->quantize(src, npix * c, j->s, j->qmax, cv->truncate, j->store, dst);
    if (cv->cp != cv->icg)
        memset(dst, j->store == QCONV_STORE_U8OFF ? 0x80 : 0, (size_t)(npix * pix) * es);
    int bad = 0;
    for (int64_t q = 0; q < npix; q++, src += step * c, dst += (size_t)pix * es) {
        if (cv->cp == cv->icg)
            bad |= j->t->quantize(src, c, j->s, j->qmax, cv->truncate, j->store, dst);
        else
            for (int64_t g = 0; g < cv->groups; g++)
                bad |= j->t->quantize(src + g * cv->icg, cv->icg, j->s, j->qmax, cv->truncate, j->store,
                                      dst + (size_t)(g * cv->cp) * es);
    }
    return bad;
}

/* Quantize (fp32: copy) x into the padded layout (N, HP, WP, G, cp), each row in its sw phases
 * (qconv_impl.h), one padded row at a time; padding rows, columns and channels hold zero's
 * representation. */
static void quantize_task(void *p, int ith, int nth)
{
    run_job *j = p;
    const qconv_conv *cv = j->cv;
    const size_t es = store_size(j->store);
    const int64_t pix = cv->groups * cv->cp, row_el = j->row_pix * pix, sw = cv->sw, per = j->row_pix / sw;
    const int zero = j->store == QCONV_STORE_U8OFF ? 0x80 : 0;
    long long lo, hi;
    int bad = 0;
    qconv_split(j->n * j->hp, ith, nth, &lo, &hi);
    for (long long r = lo; r < hi; r++) {
        int64_t n = r / j->hp, i = r % j->hp - j->pt;
        char *row = (char *)j->xq + (size_t)(r * row_el) * es;
        if (i < 0 || i >= j->h) {
            memset(row, zero, (size_t)row_el * es);
            continue;
        }
        const float *src = j->x + ((n * j->h + i) * j->w) * cv->c;
        if (sw == 1) {
            memset(row, zero, (size_t)(j->pl * pix) * es);
            memset(row + (size_t)((j->pl + j->w) * pix) * es, zero, (size_t)((j->wp - j->pl - j->w) * pix) * es);
            bad |= quantize_pixels(j, src, j->w, 1, row + (size_t)(j->pl * pix) * es);
            continue;
        }
        memset(row, zero, (size_t)row_el * es);
        /* phase ph holds padded columns ph, ph + sw, ...: x's columns q0, q0 + sw, ... */
        for (int64_t ph = 0; ph < sw; ph++) {
            const int64_t q0 = ((ph - j->pl) % sw + sw) % sw;
            if (q0 < j->w)
                bad |= quantize_pixels(j, src + q0 * cv->c, (j->w - q0 + sw - 1) / sw, sw,
                                       row + (size_t)((ph * per + (j->pl + q0) / sw) * pix) * es);
        }
    }
    j->bad[ith] = bad;
}

/* A 1x1 layer with a stride reads one input pixel in sh * sw: xq holds only those, as (N, HO, WO,
 * G, cp), and the kernels run a stride-1 layer over it (oneDNN's "reduce to unit stride"): a
 * quarter of the quantize at stride 2, and the tiles read consecutive pixels. absmax_task has
 * checked every pixel of x for NaN/inf before, as quantizing all of it does in the other layouts. */
static void sample_task(run_job *j, int ith, int nth)
{
    const int64_t pix = j->cv->groups * j->cv->cp;
    long long lo, hi;
    int bad = 0;
    qconv_split(j->n * j->ho, ith, nth, &lo, &hi);
    for (long long r = lo; r < hi; r++) {   /* a 1x1 kernel has no padding: every sample is in x */
        const int64_t n = r / j->ho, i = (r % j->ho) * j->cv->sh;
        bad |= quantize_pixels(j, j->x + ((n * j->h + i) * j->w) * j->cv->c, j->wo, j->cv->sw,
                               (char *)j->xq + (size_t)(r * j->wo * pix) * store_size(j->store));
    }
    j->bad[ith] |= bad;
}

/* Output rows [r0, r1), OC blocks [b0, b1), every group in turn; FP32 checks the outputs for
 * overflow while they are still in cache. Returns 0 (nothing done) once the call is cancelled. */
static int conv_block(run_job *j, int ith, int64_t r0, int64_t r1, int64_t b0, int64_t b1)
{
    const qconv_conv *cv = j->cv;
    if (cancelled(j)) {
        j->stopped[ith] = 1;
        return 0;
    }
    const size_t xes = store_size(j->store), wes = store_size(cv->wstore);
    for (int64_t g = 0; g < cv->groups; g++) {
        qconv_conv_args a = j->base;
        a.xq = (const char *)j->xq + (size_t)(g * cv->cp) * xes;
        a.wq = (const char *)cv->wq + (size_t)(g * cv->gblk) * wes;
        a.comp = cv->comp != NULL ? cv->comp + g * cv->nocbp : NULL;
        a.out = (char *)j->base.out + (size_t)(g * cv->ocg) * 4;
        a.inv = j->inv_pad != NULL ? j->inv_pad + g * cv->nocbp : NULL;
        a.bias = cv->bias_pad != NULL ? cv->bias_pad + g * cv->nocbp : NULL;
        j->t->conv[cv->precision](&a, r0, r1, b0, b1);
    }
    if (cv->precision == QCONV_FP32) {
        const int64_t c0 = b0 * cv->nr, c1 = b1 * cv->nr < cv->ocg ? b1 * cv->nr : cv->ocg;
        j->overflowed[ith] += overflowed_outputs(j, r0, r1, c0, c1);
    }
    return 1;
}

/* The convolution's work units: `unit_rows` output rows x `unit_blocks` OC blocks each, as many
 * units as rows allow at about BLOCK_OUTPUTS outputs a unit; where that leaves fewer than four
 * units a thread, the OC blocks are split too, in groups of an even number of blocks (the tile
 * kernels take blocks in pairs). */
static void work_units(run_job *j, int nth)
{
    const int64_t rows = j->n * j->ho, nocb = j->cv->nocb;
    const int64_t want = 4 * (int64_t)nth, per_row = j->wo * j->cv->oc;
    int64_t ur = BLOCK_OUTPUTS / per_row > 1 ? BLOCK_OUTPUTS / per_row : 1;
    if (nth > 1 && rows / want < ur)
        ur = rows / want > 1 ? rows / want : 1;
    const int64_t row_units = (rows + ur - 1) / ur;
    int64_t ub = nocb;
    if (nth > 1 && row_units < want && nocb > 2) {
        const int64_t groups = (want + row_units - 1) / row_units;
        ub = (nocb + groups - 1) / groups;
        ub += ub & 1;
    }
    j->unit_rows = ur;
    j->unit_blocks = ub;
    j->col_units = (nocb + ub - 1) / ub;
    j->units = row_units * j->col_units;
    for (int i = 0; i < nth; i++) {
        long long lo, hi;
        qconv_split(j->units, i, nth, &lo, &hi);
        j->share[i].next = lo;
        j->share[i].end = hi;
    }
}

/* Runs the units left in thread v's share; 0 once the call is cancelled. */
static int run_share(run_job *j, int ith, int v)
{
    const int64_t rows = j->n * j->ho, nocb = j->cv->nocb;
    for (;;) {
        const int64_t u = __atomic_fetch_add(&j->share[v].next, 1, __ATOMIC_RELAXED);
        if (u >= j->share[v].end)
            return 1;
        const int64_t r0 = u / j->col_units * j->unit_rows, b0 = u % j->col_units * j->unit_blocks;
        const int64_t r1 = r0 + j->unit_rows < rows ? r0 + j->unit_rows : rows;
        const int64_t b1 = b0 + j->unit_blocks < nocb ? b0 + j->unit_blocks : nocb;
        if (!conv_block(j, ith, r0, r1, b0, b1))
            return 0;
    }
}

/* This worker's part of the convolution: its own share of the units first (contiguous rows: the
 * input rows its own quantize pass left in its cache), then whatever the other threads have not
 * started yet. A thread on a slower CPU (a vCPU that the host shares with another tenant) then
 * runs fewer units, and the phase does not wait for it to finish a share sized for the fastest. */
static void conv_task(void *p, int ith, int nth)
{
    run_job *j = p;
    for (int k = 0; k < nth; k++)
        if (!run_share(j, ith, (ith + k) % nth))
            return;
}

static void dequantize_task(void *p, int ith, int nth)
{
    run_job *j = p;
    const qconv_conv *cv = j->cv;
    long long lo, hi;
    qconv_split(j->n * j->ho * j->wo, ith, nth, &lo, &hi);
    if (lo < hi)
        j->t->dequantize(j->acc + lo * cv->oc, hi - lo, cv->oc, j->inv, cv->bias, j->y + lo * cv->oc);
}

/* Depthwise: quantize input row ii of image n into a padded ring row (WP pixels of ocp channels;
 * each input channel replicated `mult` times). tmp: W * OC floats for the replication. */
static int dw_fill_row(const run_job *j, int64_t n, int64_t ii, char *row, float *tmp)
{
    const qconv_conv *cv = j->cv;
    const size_t es = store_size(j->store);
    const int64_t ocp = cv->ocp, oc = cv->oc, c = cv->c, w = j->w;
    const float *src = j->x + ((n * j->h + ii) * w) * c;
    int bad = 0;
    memset(row, 0, (size_t)(j->pl * ocp) * es);
    memset(row + (size_t)((j->pl + w) * ocp) * es, 0, (size_t)((j->wp - j->pl - w) * ocp) * es);
    if (cv->mult > 1) {
        for (int64_t q = 0; q < w; q++)
            for (int64_t o = 0; o < oc; o++)
                tmp[q * oc + o] = src[q * c + o / cv->mult];
        src = tmp;
    }
    char *dst = row + (size_t)(j->pl * ocp) * es;
    if (ocp == oc)
        return j->t->quantize(src, w * oc, j->s, j->qmax, cv->truncate, j->store, dst);
    for (int64_t q = 0; q < w; q++) {
        bad |= j->t->quantize(src + q * oc, oc, j->s, j->qmax, cv->truncate, j->store, dst + (size_t)(q * ocp) * es);
        memset(dst + (size_t)(q * ocp + oc) * es, 0, (size_t)(ocp - oc) * es);
    }
    return bad;
}

/* Depthwise, one pass over x: this worker's output rows, each from KH padded rows kept in a ring
 * (a row shared by consecutive output rows is quantized once). Input rows that no output row
 * reads (stride > KH, or past the last output row) are still checked for non-finite values. */
static void dw_task(void *p, int ith, int nth)
{
    run_job *j = p;
    const qconv_conv *cv = j->cv;
    const size_t es = store_size(j->store);
    const int64_t kh = cv->kh, kw = cv->kw, ocp = cv->ocp;
    char *mine = j->dw + (size_t)(ith * j->dw_worker);
    const void **taps = (const void **)(void *)mine;                          /* kh*kw */
    int64_t *slot_of = (int64_t *)(void *)(mine + round_up(kh * kw * (int64_t)sizeof(void *), 64));  /* kh */
    char *ring = mine + round_up(kh * kw * (int64_t)sizeof(void *), 64) + round_up(kh * 8, 64);
    float *tmp = (float *)(void *)(ring + kh * j->row_bytes);
    for (int64_t u = 0; u < kh; u++)
        slot_of[u] = -1;
    long long lo, hi;
    int bad = 0;
    qconv_split(j->n * j->ho, ith, nth, &lo, &hi);
    for (long long r = lo; r < hi; r++) {
        if (cancelled(j)) {
            j->stopped[ith] = 1;
            break;
        }
        const int64_t n = r / j->ho, i = r % j->ho;
        for (int64_t u = 0; u < kh; u++) {
            const int64_t pr = i * cv->sh + u, ii = pr - j->pt;
            const char *row;
            if (ii < 0 || ii >= j->h) {
                row = j->zero_row;
            } else {
                const int64_t slot = pr % kh, key = n * j->hp + pr;
                char *sr = ring + slot * j->row_bytes;
                if (slot_of[slot] != key) {
                    bad |= dw_fill_row(j, n, ii, sr, tmp);
                    slot_of[slot] = key;
                }
                row = sr;
            }
            for (int64_t v = 0; v < kw; v++)
                taps[u * kw + v] = row + (size_t)(v * ocp) * es;
        }
        /* Rows this output row owns but does not read: [i*sh - pt + KH, next row's first). */
        int64_t own_end = i == j->ho - 1 ? j->h : (i + 1) * cv->sh - j->pt;
        for (int64_t ii = i * cv->sh - j->pt + kh; ii < own_end; ii++)
            if (ii >= 0 && ii < j->h)
                (void)j->t->absmax(j->x + ((n * j->h + ii) * j->w) * cv->c, j->w * cv->c, &bad);
        float *yr = j->y + r * j->wo * cv->oc;
        j->t->dw[cv->precision](&j->dwa, taps, yr);
        if (cv->precision == QCONV_FP32)
            j->overflowed[ith] += count_nonfinite(yr, j->wo * cv->oc);
    }
    j->bad[ith] = bad;
}

static int any_bad(const run_job *j, int nth)
{
    int bad = 0;
    for (int i = 0; i < nth; i++)
        bad |= j->bad[i];
    return bad;
}

static double earliest(const double *t, int nth)
{
    double first = t[0];
    for (int i = 1; i < nth; i++)
        first = t[i] < first ? t[i] : first;
    return first;
}

static int any_stopped(const run_job *j, int nth)
{
    int stopped = 0;
    for (int i = 0; i < nth; i++)
        stopped |= j->stopped[i];
    return stopped;
}

/* The input scale (maxabs: from the workers' partial maxima, refusing non-finite input), then
 * inv[o] = float32(1 / (double(s_x) * double(s_w[o]))) and its zero-padded copy. */
static int scale_step(run_job *j, int nth)
{
    const qconv_conv *cv = j->cv;
    workspace *ws = j->ws;
    if (j->input_q > 0) {
        if (any_bad(j, nth))
            return QCONV_ENONFINITE;
        float m = 0.0f;
        for (int i = 0; i < nth; i++)
            m = j->part[i] > m ? j->part[i] : m;
        j->absmax = m;
        int st = maxabs_scale(m, j->input_q, &j->s);
        if (st != QCONV_OK)
            return st;
    }
    for (int64_t o = 0; o < cv->oc; o++) {
        float inv = (float)(1.0 / ((double)j->s * (double)cv->s_w[o]));
        if (!(isfinite(inv) && inv > 0))
            return QCONV_ESCALE;
        ws->inv[o] = inv;
    }
    memset(ws->inv_pad, 0, (size_t)cv->pad_n * 4);
    if (cv->kind == QCONV_KIND_DEPTHWISE)
        memcpy(ws->inv_pad, ws->inv, (size_t)cv->oc * 4);
    else
        for (int64_t g = 0; g < cv->groups; g++)
            memcpy(ws->inv_pad + g * cv->nocbp, ws->inv + g * cv->ocg, (size_t)cv->ocg * 4);
    return QCONV_OK;
}

/* A whole call as one pool job, its phases separated by barriers (one wake-up of the workers
 * per call, not one per phase). Thread 0 takes the phase times at the barriers. Every thread
 * takes the same branches: they read only what a barrier has published. */
static void call_task(void *p, int ith, int nth)
{
    run_job *j = p;
    if (j->input_q > 0) {
        absmax_task(j, ith, nth);
        qconv_pool_barrier(nth);
        if (ith == 0) {
            j->st = scale_step(j, nth);
            j->t1 = qconv_now();
        }
        qconv_pool_barrier(nth);
        if (j->st != QCONV_OK)
            return;
    }
    if (j->cv->kind == QCONV_KIND_DEPTHWISE) {
        dw_task(j, ith, nth);   /* quantize fused into the convolution, one pass over x */
        return;
    }
    if (j->sampled) {
        if (j->input_q == 0)
            absmax_task(j, ith, nth);   /* for its NaN/inf check of the pixels not sampled */
        sample_task(j, ith, nth);
    } else {
        quantize_task(j, ith, nth);
    }
    qconv_pool_barrier(nth);
    if (any_bad(j, nth))
        return;
    j->conv_began[ith] = qconv_now();
    conv_task(j, ith, nth);
    if (!j->separate)
        return;
    qconv_pool_barrier(nth);   /* dequantize splits pixels, the convolution work units */
    j->deq_began[ith] = qconv_now();
    if (!any_stopped(j, nth))
        dequantize_task(j, ith, nth);
}

/* ---- qconv_run ---------------------------------------------------------------------------- */

/* Grow ws for this call's geometry. */
static int ws_reserve(workspace *ws, const qconv_conv *cv, int64_t xq_bytes, int64_t acc_bytes, int64_t dw_bytes)
{
    int st;
    if (xq_bytes > 0 && (st = grow(&ws->xq, &ws->xq_bytes, xq_bytes)) != QCONV_OK)
        return st;
    if (acc_bytes > 0 && (st = grow((void **)&ws->acc, &ws->acc_bytes, acc_bytes)) != QCONV_OK)
        return st;
    if (dw_bytes > 0 && (st = grow((void **)&ws->dw, &ws->dw_bytes, dw_bytes)) != QCONV_OK)
        return st;
    if ((st = grow((void **)&ws->inv, &ws->inv_n, cv->oc * 4)) != QCONV_OK)
        return st;
    return grow((void **)&ws->inv_pad, &ws->inv_pad_n, cv->pad_n * 4);
}

int qconv_run(qconv_conv *cv, const float *x, int64_t n, int64_t h, int64_t w,
              int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t ho, int64_t wo,
              float s_x, int64_t input_q, float *y, qconv_timings *timings, const int *cancel)
{
    if (cv == NULL || x == NULL || y == NULL || timings == NULL || n <= 0 || h <= 0 || w <= 0 ||
        pt < 0 || pb < 0 || pl < 0 || pr < 0 || pt >= cv->kh || pb >= cv->kh || pl >= cv->kw || pr >= cv->kw)
        return QCONV_EINVAL;
    const int64_t hp = h + pt + pb, wp = w + pl + pr;
    const int dw = cv->kind == QCONV_KIND_DEPTHWISE;
    const int sampled = !dw && cv->kh == 1 && cv->kw == 1 && (cv->sh > 1 || cv->sw > 1);   /* sample_task */
    const int64_t hq = sampled ? ho : hp, wq = sampled ? wo : wp;   /* GEMM: xq's rows and columns */
    const int64_t sh = sampled ? 1 : cv->sh, sw = sampled ? 1 : cv->sw;   /* and its strides */
    const int64_t row_pix = sw * ((wq + sw - 1) / sw);   /* GEMM: pixels stored per xq row, sw phases */
    if (hp < cv->kh || wp < cv->kw || ho != (hp - cv->kh) / cv->sh + 1 || wo != (wp - cv->kw) / cv->sw + 1)
        return QCONV_EINVAL;
    const int is_int = cv->precision != QCONV_FP32;
    const int32_t qmax = is_int ? qmax_of(cv->precision) : 0;
    if (is_int && !(s_x == 0.0f ? input_q >= 1 && input_q <= qmax : isfinite(s_x) && s_x > 0))
        return QCONV_EINVAL;
    const qconv_isa_table *t = cv->t;
    const int nth = cv->threads;
    const size_t xes = store_size(cv->xstore);

    /* Sizes (elements), refusing anything past 2^48. */
    int64_t nx = n, npad = n, ny = n;
    if (checked_mul(&nx, h) || checked_mul(&nx, w) || checked_mul(&nx, cv->c) ||
        checked_mul(&npad, hq) || checked_mul(&npad, dw ? wp : row_pix) ||
        checked_mul(&npad, dw ? cv->ocp : cv->groups * cv->cp) ||
        checked_mul(&ny, ho) || checked_mul(&ny, wo) || checked_mul(&ny, cv->oc))
        return QCONV_ESIZE;
    const int separate = is_int && !cv->fused;
    int64_t xq_bytes = 0, acc_bytes = 0, dw_bytes = 0, dw_worker = 0, row_bytes = 0;
    if (dw) {
        row_bytes = round_up(wp * cv->ocp * (int64_t)xes, 64);
        dw_worker = round_up(cv->kh * cv->kw * (int64_t)sizeof(void *), 64) + round_up(cv->kh * 8, 64) +
                    cv->kh * row_bytes + (cv->mult > 1 ? round_up(w * cv->oc * 4, 64) : 0);
        dw_bytes = row_bytes + nth * dw_worker;   /* the zero row, then the workers' areas */
    } else {
        xq_bytes = npad * (int64_t)xes;
        if (t->xslack[cv->precision] > 0)   /* tiles that read past a row's last pixel (AMX) */
            xq_bytes += ((t->xslack[cv->precision] + cv->kw) * cv->groups * cv->cp + 64) * (int64_t)xes;
        acc_bytes = separate ? ny * 4 : 0;
    }

    /* The handle's buffers, or this call's own when another call holds them. */
    workspace tmp_ws;
    memset(&tmp_ws, 0, sizeof tmp_ws);
    workspace *ws = &tmp_ws;
    const int own = pthread_mutex_trylock(&cv->lock) == 0;
    if (own)
        ws = &cv->ws;
    int st = ws_reserve(ws, cv, xq_bytes, acc_bytes, dw_bytes);
    if (st != QCONV_OK)
        goto out;

    /* the job: not on a worker's stack */
    if ((st = grow(&ws->job, &ws->job_bytes, sizeof(run_job) + cv->kh * cv->kw * sizeof(int64_t))) != QCONV_OK)
        goto out;
    run_job *j = ws->job;
    memset(j, 0, offsetof(run_job, part));
    memset(j->stopped, 0, sizeof j->stopped);
    memset(j->overflowed, 0, sizeof j->overflowed);
    j->cv = cv; j->t = t; j->x = x;
    j->n = n; j->h = h; j->w = w; j->pt = pt; j->pl = pl; j->ho = ho; j->wo = wo; j->hp = hp; j->wp = wp;
    j->sampled = sampled;
    j->row_pix = row_pix;
    j->qmax = qmax;
    j->input_q = is_int && s_x == 0.0f ? input_q : 0;
    j->s = is_int ? s_x : 1.0f;
    j->store = cv->xstore;
    j->separate = separate;
    j->y = y;
    j->cancel = cancel;
    j->ws = ws;
    j->inv = ws->inv;
    j->inv_pad = is_int ? ws->inv_pad : NULL;
    if (dw) {
        j->dw = ws->dw + row_bytes;
        j->dw_worker = dw_worker;
        j->row_bytes = row_bytes;
        memset(ws->dw, 0, (size_t)row_bytes);
        j->zero_row = ws->dw;
        j->dwa.precision = cv->precision;
        j->dwa.kh = cv->kh; j->dwa.kw = cv->kw; j->dwa.sw = cv->sw; j->dwa.wo = wo;
        j->dwa.oc = cv->oc; j->dwa.ocp = cv->ocp;
        j->dwa.w = cv->dww;
        j->dwa.inv = j->inv_pad;
        j->dwa.bias = cv->bias_pad;
    } else {
        j->xq = ws->xq;
        j->acc = ws->acc;
        qconv_conv_args *a = &j->base;
        a->precision = cv->precision;
        a->n = n; a->ho = ho; a->wo = wo;
        a->c = cv->icg; a->kh = cv->kh; a->kw = cv->kw; a->oc = cv->ocg;
        a->cp = cv->cp; a->grp = cv->grp; a->nr = cv->nr; a->nocb = cv->nocb;
        a->pix = cv->groups * cv->cp;
        a->xstep = a->pix;
        a->row = row_pix * a->pix;
        a->rstep = sh * a->row;
        a->img = hq * a->row;
        for (int64_t u = 0; u < cv->kh; u++)
            for (int64_t v = 0; v < cv->kw; v++)
                j->taps[u * cv->kw + v] = u * a->row + ((v % sw) * (row_pix / sw) + v / sw) * a->pix;
        a->tap = j->taps;
        a->ldy = cv->oc;
        a->wblk = cv->wblk;
        a->out = separate ? (void *)ws->acc : (void *)y;
        a->fused = cv->fused;
        work_units(j, nth);
    }
    memset(timings, 0, sizeof *timings);

    /* One pool job: [maxabs, the scale,] quantize, convolve[, dequantize] (call_task). A given
     * scale's inv[] is formed here first; maxabs's by thread 0 inside the job. */
    double t0 = qconv_now();
    if (is_int && j->input_q == 0 && (st = scale_step(j, nth)) != QCONV_OK)
        goto out;
    j->t1 = qconv_now();
    if ((st = qconv_pool_run(nth, call_task, j)) != QCONV_OK)
        goto out;
    const double tend = qconv_now();
    if (j->st != QCONV_OK) {
        st = j->st;
        goto out;
    }
    if (any_bad(j, nth)) {
        st = QCONV_ENONFINITE;
        goto out;
    }
    if (any_stopped(j, nth)) {
        st = QCONV_ECANCELED;
        goto out;
    }
    for (int i = 0; i < nth; i++)
        timings->overflowed += j->overflowed[i];
    if (timings->overflowed > 0) {
        st = QCONV_EOVERFLOW;
        goto out;
    }
    const double t2 = dw ? j->t1 : earliest(j->conv_began, nth), t3 = separate ? earliest(j->deq_began, nth) : tend;
    if (is_int) {
        timings->quantize = t2 - t0;
        timings->s_x = j->s;
        timings->x_absmax = j->absmax;
    } else {
        timings->pack = t2 - t0;   /* fp32: the padded copy of x */
    }
    timings->convolve = t3 - t2;
    timings->dequantize = separate ? tend - t3 : 0.0;
    timings->isa = cv->isa;
    timings->threads = nth;
    timings->fused_dequantize = cv->fused;
    timings->kind = cv->kind;
    timings->temporary_buffers = !own;
out:
    if (own)
        pthread_mutex_unlock(&cv->lock);
    else
        ws_free(&tmp_ws);
    return st;
}
