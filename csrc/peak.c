/* peak.c - qconv_peak: one instruction's throughput on `threads` pool workers (the bodies live in
 * the ISA files: qconv_peak_body__*). */
#include "qconv.h"

#include <string.h>

#include "qconv_impl.h"
#include "threadpool.h"

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
        if (!qconv_isa_usable(QCONV_ISA_AVX2))
            return QCONV_EISA;
        j.body = qconv_peak_body__avx2;
        break;
    case QCONV_PEAK_FMA512: case QCONV_PEAK_DPWSSD512: case QCONV_PEAK_DPBUSD512:
        if (!qconv_isa_usable(QCONV_ISA_AVX512))
            return QCONV_EISA;
        j.body = qconv_peak_body__avx512;
        break;
    case QCONV_PEAK_AMX_DPBSSD:
        if (!qconv_isa_usable(QCONV_ISA_AMX))
            return QCONV_EISA;
        j.body = qconv_peak_body__amx;
        break;
    case QCONV_PEAK_DPWSSD: case QCONV_PEAK_DPBUSD:
        if (qconv_isa_usable(QCONV_ISA_AVX512VNNI))
            j.body = qconv_peak_body__avx512vnni;
        else if (qconv_isa_usable(QCONV_ISA_AVXVNNI))
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
