/* threadpool.c - see threadpool.h.
 *
 * Each worker has its own job counter and condition variable, so a job wakes only the nth - 1
 * workers it uses: after one threads=256 call, a threads=2 call signals one worker, not 255.
 * A worker that ran a job of no more threads than the machine has CPUs spins for up to SPIN_S
 * on its own counter afterwards (back-to-back calls then start without a futex wake-up), then
 * sleeps; after an oversubscribed job it sleeps at once, so idle spinners never take the CPUs
 * from the next call. The submitter waits for the last worker, and a thread at the barrier for
 * the others, the same way with a shorter spin (WAIT_SPIN_S), then a condition variable. After
 * fork() the child starts with no workers and grows its own on first use. */
#define _GNU_SOURCE
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "qconv.h"
#include "qconv_impl.h" /* qconv_now */

/* How long a thread spins before it sleeps (microseconds). Measured on a 2-vCPU AMD VM, tiny layer,
 * 2 threads, call after call: 50 us left workers asleep between calls (int8 maxabs call 38 us
 * median vs 27 us at 1000 us); 1000 us is about what the former 20000 pause iterations took on
 * bare-metal Intel. */
#ifndef QCONV_SPIN_US
#define QCONV_SPIN_US 1000
#endif
#define SPIN_S (QCONV_SPIN_US * 1e-6)
/* How long a thread spins inside a call (the barrier between phases, the submitter waiting for the
 * workers) before it sleeps. A partner that is running arrives within microseconds; one that is
 * not is waiting for a CPU, maybe this one's, so spinning on only holds it off. Measured on the
 * 2-vCPU AMD VM, 12x12x8 INT8 layer, 2 threads, 200 calls, with one or two busy processes beside:
 * spinning 1000 us here, calls took 2 ms (200 of 200 over 0.9 ms in one round, 34-56 in others);
 * 20 us, 1-14 of 200, the median level with 1000 us without load (14.6-18 us) and on a 28x28x64
 * layer. Yielding in the spin instead did worse under load (29-70 us a call, rounds of 4 ms). */
#ifndef QCONV_WAIT_SPIN_US
#define QCONV_WAIT_SPIN_US 20
#endif
#define WAIT_SPIN_S (QCONV_WAIT_SPIN_US * 1e-6)

typedef struct {
    pthread_t tid;
    _Atomic unsigned long go;     /* bumped by the submitter when this worker has a job */
    pthread_mutex_t m;            /* with cv: where the worker sleeps */
    pthread_cond_t cv;
    char pad[64];
} worker;

static pthread_mutex_t submit_lock = PTHREAD_MUTEX_INITIALIZER;  /* one job at a time */
static worker workers[QCONV_MAX_THREADS - 1];
static int nworkers;               /* started workers; worker i runs as ith = i + 1 */
static qconv_task_fn job_fn;       /* the job: written before the go counters are bumped */
static void *job_arg;
static int job_nth;
static int job_spin;               /* workers may spin after this job (nth <= CPUs) */
static _Atomic int pending;        /* workers of the current job still running */
static pthread_mutex_t done_m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
static _Atomic int bar_arrived;    /* threads at the barrier in this round */
static _Atomic int bar_round;      /* bumped by the last thread to arrive */
static pthread_mutex_t bar_m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t bar_cv = PTHREAD_COND_INITIALIZER;
static _Atomic int shutting_down;
static int atexit_done;
static int ncpu;

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Returns once ready(ctx) holds: first spins on it for up to `spin` seconds, then sleeps on cv.
 * Whoever makes it hold signals cv with m held, so no wake-up is missed. */
static inline void wait_until(double spin, int (*ready)(const void *ctx), const void *ctx,
                              pthread_mutex_t *m, pthread_cond_t *cv)
{
    const double start = spin > 0.0 ? qconv_now() : 0.0, end = start + spin;
    for (double now = start; !ready(ctx) && now < end; now = qconv_now()) {
        for (int i = 0; i < 64 && !ready(ctx); i++)
            cpu_relax();
    }
    if (!ready(ctx)) {
        pthread_mutex_lock(m);
        while (!ready(ctx))
            pthread_cond_wait(cv, m);
        pthread_mutex_unlock(m);
    }
}

typedef struct {
    const worker *me;
    unsigned long seen;
} job_wait;

/* A new job for this worker, or shutdown. */
static int job_posted(const void *ctx)
{
    const job_wait *w = ctx;
    return atomic_load_explicit(&w->me->go, memory_order_acquire) != w->seen ||
           atomic_load_explicit(&shutting_down, memory_order_acquire);
}

static void *worker_main(void *p)
{
    worker *me = p;
    const int ith = (int)(me - workers) + 1;
    job_wait w = {me, 0};   /* go starts at 0 (grow): a job posted before this thread runs is not missed */
    int spin = 0;
    for (;;) {
        wait_until(spin ? SPIN_S : 0.0, job_posted, &w, &me->m, &me->cv);
        if (atomic_load(&shutting_down))
            return NULL;
        w.seen = atomic_load_explicit(&me->go, memory_order_acquire);
        spin = job_spin;
        job_fn(job_arg, ith, job_nth);
        if (atomic_fetch_sub_explicit(&pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&done_m);
            pthread_cond_signal(&done_cv);
            pthread_mutex_unlock(&done_m);
        }
    }
}

static void pool_shutdown(void)
{
    pthread_mutex_lock(&submit_lock);
    atomic_store(&shutting_down, 1);
    for (int i = 0; i < nworkers; i++) {
        pthread_mutex_lock(&workers[i].m);
        pthread_cond_signal(&workers[i].cv);
        pthread_mutex_unlock(&workers[i].m);
    }
    for (int i = 0; i < nworkers; i++) {
        pthread_join(workers[i].tid, NULL);
        pthread_mutex_destroy(&workers[i].m);
        pthread_cond_destroy(&workers[i].cv);
    }
    nworkers = 0;
    pthread_mutex_unlock(&submit_lock);
}

/* A forked child has none of the parent's workers (only the forking thread survives a fork):
 * forget them and start afresh, with fresh locks (the parent's may have been held mid-call). */
static void child_after_fork(void)
{
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    submit_lock = m;
    done_m = m;
    done_cv = c;
    bar_m = m;
    bar_cv = c;
    atomic_store(&bar_arrived, 0);
    nworkers = 0;
    atomic_store(&pending, 0);
    atomic_store(&shutting_down, 0);
}

/* Start workers until nth - 1 exist. Called with submit_lock held. */
static int grow(int nth)
{
    if (!atexit_done) {
        if (atexit(pool_shutdown) != 0 || pthread_atfork(NULL, NULL, child_after_fork) != 0)
            return QCONV_ETHREAD;
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        ncpu = n > 0 ? (int)n : 1;
        atexit_done = 1;
    }
    while (nworkers < nth - 1) {
        worker *wk = &workers[nworkers];
        atomic_store(&wk->go, 0);
        if (pthread_mutex_init(&wk->m, NULL) != 0 || pthread_cond_init(&wk->cv, NULL) != 0)
            return QCONV_ETHREAD;
        if (pthread_create(&wk->tid, NULL, worker_main, wk) != 0) {
            pthread_mutex_destroy(&wk->m);
            pthread_cond_destroy(&wk->cv);
            return QCONV_ETHREAD;
        }
        nworkers++;
    }
    return QCONV_OK;
}

/* Every worker of the job has finished. */
static int workers_done(const void *ctx)
{
    (void)ctx;
    return atomic_load_explicit(&pending, memory_order_acquire) <= 0;
}

int qconv_pool_run(int nth, qconv_task_fn fn, void *arg)
{
    if (nth < 1 || nth > QCONV_MAX_THREADS || fn == NULL)
        return QCONV_EINVAL;
    if (nth == 1) {
        fn(arg, 0, 1);
        return QCONV_OK;
    }
    pthread_mutex_lock(&submit_lock);
    if (atomic_load(&shutting_down)) {
        pthread_mutex_unlock(&submit_lock);
        return QCONV_ETHREAD;
    }
    int st = grow(nth);
    if (st != QCONV_OK) {
        pthread_mutex_unlock(&submit_lock);
        return st;
    }
    job_fn = fn;
    job_arg = arg;
    job_nth = nth;
    job_spin = nth <= ncpu;
    atomic_store_explicit(&pending, nth - 1, memory_order_release);
    for (int i = 0; i < nth - 1; i++) {   /* only the workers this job uses */
        worker *wk = &workers[i];
        atomic_fetch_add_explicit(&wk->go, 1, memory_order_release);
        pthread_mutex_lock(&wk->m);       /* no futex call unless the worker sleeps */
        pthread_cond_signal(&wk->cv);
        pthread_mutex_unlock(&wk->m);
    }

    fn(arg, 0, nth);

    wait_until(job_spin ? WAIT_SPIN_S : 0.0, workers_done, NULL, &done_m, &done_cv);
    pthread_mutex_unlock(&submit_lock);
    return QCONV_OK;
}

/* bar_round has moved past *ctx. */
static int round_over(const void *ctx)
{
    return atomic_load_explicit(&bar_round, memory_order_acquire) != *(const int *)ctx;
}

void qconv_pool_barrier(int nth)
{
    if (nth == 1)
        return;
    /* The round cannot end before this thread arrives, so reading it first is safe. */
    const int round = atomic_load_explicit(&bar_round, memory_order_acquire);
    if (atomic_fetch_add_explicit(&bar_arrived, 1, memory_order_acq_rel) == nth - 1) {
        atomic_store_explicit(&bar_arrived, 0, memory_order_relaxed);   /* published by the round's release */
        pthread_mutex_lock(&bar_m);
        atomic_store_explicit(&bar_round, round + 1, memory_order_release);
        pthread_cond_broadcast(&bar_cv);
        pthread_mutex_unlock(&bar_m);
        return;
    }
    wait_until(job_spin ? WAIT_SPIN_S : 0.0, round_over, &round, &bar_m, &bar_cv);
}
