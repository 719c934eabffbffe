/* threadpool.c - see threadpool.h. Workers spin briefly on the job counter after finishing a
 * job (back-to-back calls then start without a futex wake-up), then sleep on a condition variable.
 * After fork() the child starts with no workers and grows its own on first use. */
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "qconv.h"

#define SPIN_ITERS 20000

static pthread_mutex_t submit_lock = PTHREAD_MUTEX_INITIALIZER;  /* one job at a time */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;         /* guards the fields below */
static pthread_cond_t work_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
static pthread_t workers[QCONV_MAX_THREADS];
static int nworkers;               /* started workers; worker i runs as ith = i + 1 */
static _Atomic unsigned long gen;  /* job counter: a new value means a new job */
static qconv_task_fn job_fn;
static void *job_arg;
static int job_nth;
static int pending;                /* workers of the current job still running */
static int shutting_down;
static int atexit_done;
static unsigned long start_gen[QCONV_MAX_THREADS];

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *worker_main(void *p)
{
    int ith = (int)(long)p;
    pthread_mutex_lock(&lock);
    unsigned long seen = start_gen[ith - 1];  /* the counter before any job this worker must run */
    pthread_mutex_unlock(&lock);
    for (;;) {
        /* Spin a little for the next job, then sleep. */
        for (int i = 0; i < SPIN_ITERS && atomic_load_explicit(&gen, memory_order_acquire) == seen; i++)
            cpu_relax();
        pthread_mutex_lock(&lock);
        while (atomic_load(&gen) == seen && !shutting_down)
            pthread_cond_wait(&work_cv, &lock);
        if (shutting_down) {
            pthread_mutex_unlock(&lock);
            return NULL;
        }
        seen = atomic_load(&gen);
        qconv_task_fn fn = job_fn;
        void *arg = job_arg;
        int nth = job_nth;
        pthread_mutex_unlock(&lock);
        if (ith < nth) {
            fn(arg, ith, nth);
            pthread_mutex_lock(&lock);
            if (--pending == 0)
                pthread_cond_signal(&done_cv);
            pthread_mutex_unlock(&lock);
        }
    }
}

static void pool_shutdown(void)
{
    pthread_mutex_lock(&submit_lock);
    pthread_mutex_lock(&lock);
    shutting_down = 1;
    atomic_fetch_add(&gen, 1);
    pthread_cond_broadcast(&work_cv);
    int n = nworkers;
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < n; i++)
        pthread_join(workers[i], NULL);
    pthread_mutex_lock(&lock);
    nworkers = 0;
    pthread_mutex_unlock(&lock);
    pthread_mutex_unlock(&submit_lock);
}

/* A forked child has none of the parent's workers (only the forking thread survives a fork):
 * forget them and start afresh, with fresh locks (the parent's may have been held mid-call). */
static void child_after_fork(void)
{
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    submit_lock = m;
    lock = m;
    work_cv = c;
    done_cv = c;
    nworkers = 0;
    pending = 0;
    shutting_down = 0;
}

/* Start workers until nth - 1 exist. Called with submit_lock held. */
static int grow(int nth)
{
    if (!atexit_done) {
        if (atexit(pool_shutdown) != 0 || pthread_atfork(NULL, NULL, child_after_fork) != 0)
            return QCONV_ETHREAD;
        atexit_done = 1;
    }
    while (nworkers < nth - 1) {
        pthread_mutex_lock(&lock);
        start_gen[nworkers] = atomic_load(&gen);
        pthread_mutex_unlock(&lock);
        if (pthread_create(&workers[nworkers], NULL, worker_main, (void *)(long)(nworkers + 1)) != 0)
            return QCONV_ETHREAD;
        pthread_mutex_lock(&lock);
        nworkers++;
        pthread_mutex_unlock(&lock);
    }
    return QCONV_OK;
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
    if (shutting_down) {
        pthread_mutex_unlock(&submit_lock);
        return QCONV_ETHREAD;
    }
    int st = grow(nth);
    if (st != QCONV_OK) {
        pthread_mutex_unlock(&submit_lock);
        return st;
    }
    pthread_mutex_lock(&lock);
    job_fn = fn;
    job_arg = arg;
    job_nth = nth;
    pending = nth - 1;
    atomic_fetch_add_explicit(&gen, 1, memory_order_release);
    pthread_cond_broadcast(&work_cv);
    pthread_mutex_unlock(&lock);

    fn(arg, 0, nth);

    pthread_mutex_lock(&lock);
    while (pending > 0)
        pthread_cond_wait(&done_cv, &lock);
    pthread_mutex_unlock(&lock);
    pthread_mutex_unlock(&submit_lock);
    return QCONV_OK;
}
