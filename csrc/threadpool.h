/* threadpool.h - one persistent pthread pool for the whole extension (ggml style).
 *
 * qconv_pool_run(nth, fn, arg) calls fn(arg, ith, nth) for ith = 0..nth-1: ith 0 on the calling
 * thread, the others on pool workers 1..nth-1 that are created on first need, reused by every
 * later call and joined at process exit; a job wakes only the workers it uses. Calls from several
 * threads are serialized (one job at a time); kernels split their own work by (ith, nth) and take
 * no locks. A job's phases are separated by qconv_pool_barrier. */
#ifndef QCONV_THREADPOOL_H
#define QCONV_THREADPOOL_H

#include "qconv.h" /* QCONV_MAX_THREADS, status codes */

typedef void (*qconv_task_fn)(void *arg, int ith, int nth);

/* Returns QCONV_OK, QCONV_EINVAL (nth out of 1..QCONV_MAX_THREADS) or QCONV_ETHREAD. */
int qconv_pool_run(int nth, qconv_task_fn fn, void *arg);

/* Inside a job: returns once all nth threads of the job have called it (a short spin, then a
 * sleep); what each wrote before it is visible to all after it. nth == 1: returns at once. */
void qconv_pool_barrier(int nth);

/* Contiguous share [*lo, *hi) of [0, total) for worker ith of nth. */
static inline void qconv_split(long long total, int ith, int nth, long long *lo, long long *hi)
{
    long long base = total / nth, extra = total % nth;
    *lo = ith * base + (ith < extra ? ith : extra);
    *hi = *lo + base + (ith < extra ? 1 : 0);
}

#endif
