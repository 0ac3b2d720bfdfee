/* engine.c - request queue, worker thread, completion queue (see engine.h).
 *
 * Locking: engine->mutex guards the FIFO, the completion list, next_id and
 * stopping; each request's own mutex guards its done/status fields. The worker
 * never holds the engine mutex while running a request.
 */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "../backend/backend.h"

struct tk_request {
    uint64_t id;
    atomic_int refcount;
    atomic_int cancelled;
    int notify;
    tk_request_fn run;
    tk_batch_fn run_batch;   /* with batch_key: runs with its queued neighbours */
    const void *batch_key;
    tk_payload_free_fn free_payload;
    void *payload;
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int done;
    tk_status status;
    char error[1024];
    tk_request *next; /* FIFO link, owned by the engine while queued */
};

/* The batch the worker is running: its requests, the first ones popped together and those that joined. */
struct tk_running {
    tk_engine *engine;
    const void *key;
    tk_batch_fn run_batch;
    tk_request **reqs;
    unsigned char *finished;
    int n, cap;
};

struct tk_engine {
    pthread_t worker;
    pthread_mutex_t mutex;
    pthread_cond_t work;
    tk_request *head, *tail;  /* FIFO of queued requests */
    uint64_t next_id;
    int stopping;
    struct tk_running running; /* the worker's: the batch it runs */
    void *payloads[TK_MAX_BATCH];
    uint64_t *completed;      /* ids of finished notify requests, not yet drained */
    size_t n_completed, cap_completed;
    int wake_fd;
    tk_exec exec;
};

/* ---- requests ------------------------------------------------------------ */

tk_request *tk_request_new(tk_request_fn run, void *payload, tk_payload_free_fn free_payload)
{
    tk_request *req = calloc(1, sizeof *req);
    if (!req) return NULL;
    atomic_init(&req->refcount, 1);
    atomic_init(&req->cancelled, 0);
    req->run = run;
    req->payload = payload;
    req->free_payload = free_payload;
    pthread_mutex_init(&req->mutex, NULL);
    pthread_cond_init(&req->cond, NULL);
    return req;
}

tk_request *tk_request_new_batched(tk_batch_fn run_batch, const void *key, void *payload,
                                   tk_payload_free_fn free_payload)
{
    tk_request *req = tk_request_new(NULL, payload, free_payload);
    if (req) {
        req->run_batch = run_batch;
        req->batch_key = key;
    }
    return req;
}

void tk_request_retain(tk_request *req) { atomic_fetch_add(&req->refcount, 1); }

void tk_request_release(tk_request *req)
{
    if (!req || atomic_fetch_sub(&req->refcount, 1) != 1) return;
    if (req->free_payload) req->free_payload(req->payload);
    pthread_mutex_destroy(&req->mutex);
    pthread_cond_destroy(&req->cond);
    free(req);
}

void *tk_request_payload(tk_request *req) { return req->payload; }

void tk_request_cancel(tk_request *req) { atomic_store(&req->cancelled, 1); }

const atomic_int *tk_request_cancel_flag(tk_request *req) { return &req->cancelled; }

int tk_request_done(tk_request *req)
{
    pthread_mutex_lock(&req->mutex);
    int done = req->done;
    pthread_mutex_unlock(&req->mutex);
    return done;
}

int tk_request_wait(tk_request *req, int timeout_ms)
{
    pthread_mutex_lock(&req->mutex);
    if (timeout_ms < 0) {
        while (!req->done) pthread_cond_wait(&req->cond, &req->mutex);
    } else if (!req->done) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        while (!req->done && pthread_cond_timedwait(&req->cond, &req->mutex, &until) != ETIMEDOUT) {
        }
    }
    int done = req->done;
    pthread_mutex_unlock(&req->mutex);
    return done;
}

tk_status tk_request_status(const tk_request *req, const char **message)
{
    if (message) *message = req->error;
    return req->status;
}

/* ---- completion ---------------------------------------------------------- */

static void push_completed(tk_engine *e, uint64_t id)
{
    pthread_mutex_lock(&e->mutex);
    if (e->n_completed == e->cap_completed) {
        size_t cap = e->cap_completed ? 2 * e->cap_completed : 64;
        uint64_t *grown = realloc(e->completed, cap * sizeof *grown);
        if (grown) {
            e->completed = grown;
            e->cap_completed = cap;
        }
    }
    /* if even 64 ids cannot be allocated the id is dropped; its waiter still
     * sees `done` through the slot, only the wake-up is lost */
    if (e->n_completed < e->cap_completed) e->completed[e->n_completed++] = id;
    pthread_mutex_unlock(&e->mutex);
    uint64_t one = 1;
    ssize_t ignored = write(e->wake_fd, &one, sizeof one); /* EAGAIN: already signalled */
    (void)ignored;
}

static void finish(tk_engine *e, tk_request *req, tk_status status, const char *message)
{
    pthread_mutex_lock(&req->mutex);
    req->status = status;
    if (status != TK_OK) {
        strncpy(req->error, message, sizeof req->error - 1);
        req->error[sizeof req->error - 1] = '\0';
    }
    req->done = 1;
    pthread_cond_broadcast(&req->cond);
    pthread_mutex_unlock(&req->mutex);
    if (req->notify) push_completed(e, req->id);
}

size_t tk_engine_drain(tk_engine *e, uint64_t *ids, size_t max)
{
    uint64_t counter;
    ssize_t ignored = read(e->wake_fd, &counter, sizeof counter); /* reset the eventfd */
    (void)ignored;
    pthread_mutex_lock(&e->mutex);
    size_t n = e->n_completed < max ? e->n_completed : max;
    memcpy(ids, e->completed, n * sizeof *ids);
    memmove(e->completed, e->completed + n, (e->n_completed - n) * sizeof *ids);
    e->n_completed -= n;
    pthread_mutex_unlock(&e->mutex);
    if (e->n_completed > 0) { /* more than max were waiting: keep the fd readable */
        uint64_t one = 1;
        ignored = write(e->wake_fd, &one, sizeof one);
    }
    return n;
}

float *tk_exec_scratch(tk_exec *exec, size_t floats)
{
    if (floats <= exec->scratch_floats) return exec->scratch;
    exec->backend->free(exec->backend, exec->scratch);
    exec->scratch = exec->backend->alloc(exec->backend, floats * sizeof(float));
    exec->scratch_floats = exec->scratch ? floats : 0;
    if (!exec->scratch)
        tk_error(TK_ERR_NOMEM, "cannot allocate %.1f MB of working memory; use fewer or shorter sequences per call",
                 (double)floats * sizeof(float) / 1e6);
    return exec->scratch;
}

float *tk_exec_host_scratch(tk_exec *exec, size_t floats)
{
    if (floats <= exec->host_scratch_floats) return exec->host_scratch;
    free(exec->host_scratch);
    size_t bytes = (floats * sizeof(float) + 63) & ~(size_t)63;
    exec->host_scratch = aligned_alloc(64, bytes);
    exec->host_scratch_floats = exec->host_scratch ? floats : 0;
    if (!exec->host_scratch)
        tk_error(TK_ERR_NOMEM, "cannot allocate %.1f MB of host working memory; use fewer or shorter sequences per "
                 "call", (double)bytes / 1e6);
    return exec->host_scratch;
}

int tk_engine_wake_fd(const tk_engine *e) { return e->wake_fd; }
int tk_engine_threads(const tk_engine *e) { return tk_pool_threads(e->exec.pool); }
const char *tk_engine_device(const tk_engine *e) { return e->exec.backend->name; }

/* ---- the worker ---------------------------------------------------------- */

/* Pops the head of the queue and, for a batched request, the requests with
 * the same key queued right behind it. Returns how many (0: stopping). */
static int pop(tk_engine *e, tk_request **out, int *stopping)
{
    pthread_mutex_lock(&e->mutex);
    while (!e->head && !e->stopping) pthread_cond_wait(&e->work, &e->mutex);
    int n = 0;
    while (e->head && n < (n == 0 || out[0]->batch_key ? TK_MAX_BATCH : 1)) {
        tk_request *req = e->head;
        if (n > 0 && (!req->batch_key || req->batch_key != out[0]->batch_key || req->run_batch != out[0]->run_batch))
            break;
        e->head = req->next;
        if (!e->head) e->tail = NULL;
        req->next = NULL;
        out[n++] = req;
    }
    *stopping = e->stopping;
    pthread_mutex_unlock(&e->mutex);
    return n;
}

static int running_grow(struct tk_running *r)
{
    if (r->n < r->cap) return 1;
    int cap = r->cap ? 2 * r->cap : TK_MAX_BATCH;
    tk_request **reqs = realloc(r->reqs, (size_t)cap * sizeof *reqs);
    if (reqs) r->reqs = reqs;
    unsigned char *finished = reqs ? realloc(r->finished, (size_t)cap) : NULL;
    if (finished) r->finished = finished;
    if (!reqs || !finished) return 0;
    r->cap = cap;
    return 1;
}

void *tk_exec_join(tk_exec *exec, int (*accept)(const void *payload, void *ctx), void *ctx)
{
    struct tk_running *r = exec->running;
    if (!r || !running_grow(r)) return NULL;
    tk_engine *e = r->engine;
    pthread_mutex_lock(&e->mutex);
    tk_request *req = e->head;
    if (!req || e->stopping || req->batch_key != r->key || req->run_batch != r->run_batch ||
        !accept(req->payload, ctx)) {
        pthread_mutex_unlock(&e->mutex);
        return NULL;
    }
    e->head = req->next;
    if (!e->head) e->tail = NULL;
    req->next = NULL;
    pthread_mutex_unlock(&e->mutex);
    r->reqs[r->n] = req;
    r->finished[r->n++] = 0;
    return req->payload;
}

tk_status tk_exec_device_ok(tk_exec *exec)
{
    if (exec->device_failure == TK_OK && (exec->device_failure = exec->backend->sync(exec->backend)) != TK_OK)
        snprintf(exec->device_error, sizeof exec->device_error, "%s", tk_last_error());
    if (exec->device_failure != TK_OK) return tk_error(exec->device_failure, "%s", exec->device_error);
    return TK_OK;
}

void tk_exec_finish(tk_exec *exec, void *payload, tk_status status)
{
    if (status == TK_OK) status = tk_exec_device_ok(exec); /* its results came from work that ran */
    struct tk_running *r = exec->running;
    for (int i = 0; r && i < r->n; i++)
        if (r->reqs[i]->payload == payload && !r->finished[i]) {
            r->finished[i] = 1;
            finish(r->engine, r->reqs[i], status, status == TK_OK ? "" : tk_last_error());
            return;
        }
}

static void *worker_main(void *arg)
{
    tk_engine *e = arg;
    struct tk_running running = e->running; /* allocated by tk_engine_create, TK_MAX_BATCH at least */
    void **payloads = e->payloads;
    for (;;) {
        running.n = 0;
        int stopping, n = pop(e, running.reqs, &stopping);
        if (n == 0) break; /* stopping and the queue is empty */
        running.n = n;
        memset(running.finished, 0, (size_t)n);
        running.key = running.reqs[0]->batch_key;
        running.run_batch = running.reqs[0]->run_batch;
        tk_status s = TK_ERR_INVALID;
        const char *message = "the engine was shut down before this request ran";
        if (!stopping) {
            tk_request *first = running.reqs[0];
            for (int i = 0; i < n; i++) payloads[i] = running.reqs[i]->payload;
            e->exec.running = first->run_batch ? &running : NULL;
            e->exec.device_failure = TK_OK;
            s = first->run_batch ? first->run_batch(payloads, n, &e->exec) : first->run(first->payload, &e->exec);
            e->exec.running = NULL;
            if (s == TK_OK) s = tk_exec_device_ok(&e->exec); /* a device's asynchronous failures */
            else e->exec.backend->sync(e->exec.backend);        /* (the request's own error is the one to report) */
            message = s == TK_OK ? "" : tk_last_error();
        }
        for (int i = 0; i < running.n; i++) {
            if (!running.finished[i]) finish(e, running.reqs[i], s, message);
            tk_request_release(running.reqs[i]);
        }
    }
    e->running = running; /* the arrays may have grown: tk_engine_free frees them */
    return NULL;
}

uint64_t tk_engine_submit(tk_engine *e, tk_request *req, int notify)
{
    tk_request_retain(req);
    pthread_mutex_lock(&e->mutex);
    req->id = ++e->next_id;
    req->notify = notify;
    if (e->tail) e->tail->next = req; else e->head = req;
    e->tail = req;
    pthread_cond_signal(&e->work);
    pthread_mutex_unlock(&e->mutex);
    return req->id;
}

tk_status tk_engine_create(tk_engine **out, int n_threads, tk_backend *(*create_backend)(tk_pool *pool))
{
    *out = NULL;
    tk_engine *e = calloc(1, sizeof *e);
    if (!e) return tk_error(TK_ERR_NOMEM, "engine: out of memory");
    pthread_mutex_init(&e->mutex, NULL);
    pthread_cond_init(&e->work, NULL);
    e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    tk_status s = TK_OK;
    if (e->wake_fd < 0) s = tk_error(TK_ERR_IO, "engine: cannot create the wake eventfd: %s", strerror(errno));
    if (s == TK_OK) s = tk_pool_create(&e->exec.pool, n_threads);
    if (s == TK_OK) {
        tk_error(TK_ERR_NOMEM, "out of memory"); /* the reason, unless the factory records its own */
        if (!(e->exec.backend = create_backend(e->exec.pool))) s = tk_error_prefix(TK_ERR_UNSUPPORTED, "engine: ");
    }
    const char *missing = s == TK_OK ? tk_backend_missing_op(e->exec.backend) : NULL;
    if (missing)
        s = tk_error(TK_ERR_UNSUPPORTED, "engine: the %s backend is not complete yet (it has no %s op)",
                     e->exec.backend->name, missing);
    e->running.engine = e;
    if (s == TK_OK && !running_grow(&e->running)) s = tk_error(TK_ERR_NOMEM, "engine: out of memory");
    if (s == TK_OK && pthread_create(&e->worker, NULL, worker_main, e) != 0)
        s = tk_error(TK_ERR_INTERNAL, "engine: cannot start the worker thread");
    if (s != TK_OK) {
        tk_backend_release(e->exec.backend);
        tk_pool_free(e->exec.pool);
        if (e->wake_fd >= 0) close(e->wake_fd);
        free(e->running.reqs), free(e->running.finished);
        free(e);
        return s;
    }
    *out = e;
    return TK_OK;
}

void tk_engine_free(tk_engine *e)
{
    if (!e) return;
    pthread_mutex_lock(&e->mutex);
    e->stopping = 1;
    pthread_cond_signal(&e->work);
    pthread_mutex_unlock(&e->mutex);
    pthread_join(e->worker, NULL);
    e->exec.backend->free(e->exec.backend, e->exec.scratch);
    free(e->exec.host_scratch);
    tk_backend_release(e->exec.backend);
    tk_pool_free(e->exec.pool);
    close(e->wake_fd);
    free(e->completed);
    free(e->running.reqs), free(e->running.finished);
    pthread_mutex_destroy(&e->mutex);
    pthread_cond_destroy(&e->work);
    free(e);
}
