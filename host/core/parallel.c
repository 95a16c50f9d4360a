/* parallel.c: persistent worker threads for fork-join byte loops.
 *
 * Workers are started on the first parallel call and live for the process.
 * A call publishes one job; the caller and the workers claim chunks from an
 * atomic counter until none are left, then the caller waits for the workers
 * to finish their last chunk. Only one job runs at a time: a call made while
 * another is in flight (from another thread, or nested inside a chunk) runs
 * inline on its caller, so the function is safe to call from any thread but
 * gains parallelism only for one caller at a time. */
#include "parallel.h"
#include "env.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define WS_MAX_THREADS 256

static struct {
    pthread_once_t once;
    int nthreads;  /* including the caller */
    int started;   /* worker threads actually running */
    int launched;  /* start_workers has run (in this process) */
    pthread_mutex_t submit; /* held by the caller of the running job */
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    unsigned long generation;
    /* The current job. */
    ws_range_fn fn;
    void *ctx;
    size_t n, chunk, nchunks;
    atomic_size_t next;
    int active; /* workers still inside the current job */
} P = {.once = PTHREAD_ONCE_INIT,
       .submit = PTHREAD_MUTEX_INITIALIZER,
       .mu = PTHREAD_MUTEX_INITIALIZER,
       .wake = PTHREAD_COND_INITIALIZER,
       .done = PTHREAD_COND_INITIALIZER};

static void run_chunks(int worker)
{
    for (;;) {
        size_t c = atomic_fetch_add(&P.next, 1);
        if (c >= P.nchunks) return;
        size_t begin = c * P.chunk;
        size_t end = begin + P.chunk < P.n ? begin + P.chunk : P.n;
        P.fn(P.ctx, begin, end, worker);
    }
}

static void *worker_main(void *arg)
{
    int id = (int)(intptr_t)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&P.mu);
    for (;;) {
        while (P.generation == seen) pthread_cond_wait(&P.wake, &P.mu);
        seen = P.generation;
        pthread_mutex_unlock(&P.mu);
        run_chunks(id);
        pthread_mutex_lock(&P.mu);
        if (--P.active == 0) pthread_cond_signal(&P.done);
    }
    return NULL;
}

/* A forked child has none of the parent's threads: start again lazily. */
static void after_fork_child(void)
{
    pthread_mutex_init(&P.submit, NULL);
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.wake, NULL);
    pthread_cond_init(&P.done, NULL);
    P.started = 0;
    P.launched = 0;
    P.active = 0;
    /* New workers start having seen generation 0; a stale count would make
     * them replay the parent's last job and decrement `active` for a job
     * they did not run, letting a later caller return before its chunks end. */
    P.generation = 0;
}

static void init_threads(void)
{
    pthread_atfork(NULL, NULL, after_fork_child);
    int env = 0;
    /* A bad value is reported by ws_parallel_check_env; until then one
     * thread per CPU. */
    ws_env_threads(&env, WS_MAX_THREADS);
    long n = env;
    if (n <= 0) n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n <= 0) n = 1;
    if (n > WS_MAX_THREADS) n = WS_MAX_THREADS;
    P.nthreads = (int)n;
}

int ws_parallel_threads(void)
{
    pthread_once(&P.once, init_threads);
    return P.nthreads;
}

ws_status ws_parallel_check_env(void)
{
    int n;
    return ws_env_threads(&n, WS_MAX_THREADS);
}

/* Starts the workers (with the submit lock held). A failure to create a
 * thread only reduces parallelism. Workers block on a condition variable
 * between jobs and are never joined: they end with the process. */
static void start_workers(void)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int i = 1; i < P.nthreads; i++) {
        pthread_t th;
        if (pthread_create(&th, &attr, worker_main, (void *)(intptr_t)i) != 0) break;
        P.started++;
    }
    pthread_attr_destroy(&attr);
}

void ws_parallel_for(size_t n, size_t grain, ws_range_fn fn, void *ctx)
{
    if (n == 0) return;
    if (grain == 0) grain = 1;
    int threads = ws_parallel_threads();
    if (threads <= 1 || n < 2 * grain || pthread_mutex_trylock(&P.submit) != 0) {
        fn(ctx, 0, n, 0);
        return;
    }
    if (!P.launched) {
        start_workers();
        P.launched = 1;
    }
    if (P.started == 0) {
        pthread_mutex_unlock(&P.submit);
        fn(ctx, 0, n, 0);
        return;
    }
    /* A few chunks per thread balance uneven progress without making the
     * chunks too small to stream memory well. */
    size_t want = (size_t)(P.started + 1) * 4;
    size_t chunk = (n + want - 1) / want;
    if (chunk < grain) chunk = grain;
    pthread_mutex_lock(&P.mu);
    P.fn = fn;
    P.ctx = ctx;
    P.n = n;
    P.chunk = chunk;
    P.nchunks = (n + chunk - 1) / chunk;
    atomic_store(&P.next, 0);
    P.active = P.started;
    P.generation++;
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.mu);

    run_chunks(0);

    pthread_mutex_lock(&P.mu);
    while (P.active > 0) pthread_cond_wait(&P.done, &P.mu);
    pthread_mutex_unlock(&P.mu);
    pthread_mutex_unlock(&P.submit);
}
