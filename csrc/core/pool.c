/* pool.c - persistent thread team (see pool.h).
 *
 * Helpers sleep on `start` until the generation counter moves, then claim task
 * indices from an atomic counter until none are left, and the last helper to
 * finish signals `done`. The caller claims tasks too, so a 2-thread pool on 2
 * cores keeps both busy. Invariant: fn/ctx/n_tasks are only written while no
 * helper is running (between generations), under the mutex.
 */
#include "pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

struct tk_pool {
    int n_threads;
    pthread_t *threads;        /* [n_threads - 1] helpers */
    pthread_mutex_t mutex;
    pthread_cond_t start, done;
    unsigned long generation;  /* bumped once per tk_pool_run */
    int running_helpers;       /* helpers still inside the current generation */
    int shutting_down;
    tk_pool_fn fn;
    void *ctx;
    int n_tasks;
    atomic_int next_task;
};

typedef struct {
    tk_pool *pool;
    int thread;
} tk_pool_helper_arg;

static void run_tasks(tk_pool *pool, int thread)
{
    for (;;) {
        int task = atomic_fetch_add(&pool->next_task, 1);
        if (task >= pool->n_tasks) return;
        pool->fn(pool->ctx, task, thread);
    }
}

static void *helper_main(void *p)
{
    tk_pool_helper_arg arg = *(tk_pool_helper_arg *)p;
    free(p);
    tk_pool *pool = arg.pool;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool->mutex);
    for (;;) {
        while (pool->generation == seen && !pool->shutting_down)
            pthread_cond_wait(&pool->start, &pool->mutex);
        if (pool->shutting_down) break;
        seen = pool->generation;
        pthread_mutex_unlock(&pool->mutex);
        run_tasks(pool, arg.thread);
        pthread_mutex_lock(&pool->mutex);
        if (--pool->running_helpers == 0) pthread_cond_signal(&pool->done);
    }
    pthread_mutex_unlock(&pool->mutex);
    return NULL;
}

tk_status tk_pool_create(tk_pool **out, int n_threads)
{
    *out = NULL;
    if (n_threads < 1) n_threads = 1;
    tk_pool *pool = calloc(1, sizeof *pool);
    if (!pool) return tk_error(TK_ERR_NOMEM, "thread pool: out of memory");
    pool->threads = calloc((size_t)n_threads, sizeof *pool->threads);
    if (!pool->threads) {
        free(pool);
        return tk_error(TK_ERR_NOMEM, "thread pool: out of memory");
    }
    pthread_mutex_init(&pool->mutex, NULL);
    pthread_cond_init(&pool->start, NULL);
    pthread_cond_init(&pool->done, NULL);
    pool->n_threads = 1;
    for (int t = 1; t < n_threads; t++) {
        tk_pool_helper_arg *arg = malloc(sizeof *arg);
        if (!arg) break;
        arg->pool = pool;
        arg->thread = t;
        if (pthread_create(&pool->threads[t - 1], NULL, helper_main, arg) != 0) {
            free(arg);
            break; /* run with fewer threads rather than fail */
        }
        pool->n_threads++;
    }
    *out = pool;
    return TK_OK;
}

void tk_pool_free(tk_pool *pool)
{
    if (!pool) return;
    pthread_mutex_lock(&pool->mutex);
    pool->shutting_down = 1;
    pthread_cond_broadcast(&pool->start);
    pthread_mutex_unlock(&pool->mutex);
    for (int t = 1; t < pool->n_threads; t++) pthread_join(pool->threads[t - 1], NULL);
    pthread_mutex_destroy(&pool->mutex);
    pthread_cond_destroy(&pool->start);
    pthread_cond_destroy(&pool->done);
    free(pool->threads);
    free(pool);
}

int tk_pool_threads(const tk_pool *pool) { return pool ? pool->n_threads : 1; }

void tk_pool_run(tk_pool *pool, int n_tasks, tk_pool_fn fn, void *ctx)
{
    if (n_tasks <= 0) return;
    if (!pool || pool->n_threads == 1 || n_tasks == 1) {
        for (int task = 0; task < n_tasks; task++) fn(ctx, task, 0);
        return;
    }
    pthread_mutex_lock(&pool->mutex);
    pool->fn = fn;
    pool->ctx = ctx;
    pool->n_tasks = n_tasks;
    atomic_store(&pool->next_task, 0);
    pool->running_helpers = pool->n_threads - 1;
    pool->generation++;
    pthread_cond_broadcast(&pool->start);
    pthread_mutex_unlock(&pool->mutex);

    run_tasks(pool, 0);

    pthread_mutex_lock(&pool->mutex);
    while (pool->running_helpers > 0) pthread_cond_wait(&pool->done, &pool->mutex);
    pthread_mutex_unlock(&pool->mutex);
}
