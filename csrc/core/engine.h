/* engine.h - the request queue, the worker thread and the completion queue.
 *
 * Every piece of engine work is a request: the binding builds one (inputs are
 * copied in, so no Python object outlives the call), submits it and gets its
 * id back at once. One worker thread runs requests strictly in submission
 * order. When a request finishes, its slot is marked done and its condition
 * variable broadcast (for blocking waits), and, if the submitter asked to be
 * notified, its id is appended to the completion list and the wake fd (an
 * eventfd) is written so an event loop watching the fd can drain the finished
 * ids in one go. The list is the source of truth; the fd only wakes.
 *
 * The core knows nothing of models: a request carries a run function and an
 * opaque payload with its destructor (model/requests.c defines the kinds).
 */
#ifndef TK_ENGINE_H
#define TK_ENGINE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "pool.h"
#include "status.h"

struct tk_backend;

/* What a running request may use: the worker's thread team, its backend and
 * a scratch block that grows to the largest request seen and is reused from
 * request to request (activations, workspaces), so steady training does not
 * allocate. */
typedef struct {
    tk_pool *pool;
    struct tk_backend *backend;
    float *scratch;             /* device memory (the backend's) */
    size_t scratch_floats;
    float *host_scratch;        /* host memory, for what model/ reads and writes itself */
    size_t host_scratch_floats;
    struct tk_running *running; /* the batch run_batch is running (NULL otherwise): see tk_exec_join */
    tk_status device_failure;   /* the device's first failure in the running batch (tk_exec_device_ok) */
    char device_error[256];
} tk_exec;

/* At least `floats` of device scratch (contents undefined), or NULL with an error. */
float *tk_exec_scratch(tk_exec *exec, size_t floats);
/* At least `floats` of host scratch (contents undefined, 64-byte aligned), or NULL with an error. */
float *tk_exec_host_scratch(tk_exec *exec, size_t floats);

/* For a batch function (continuous batching): while it runs, the request at the head of the queue joins it when
 * it has the batch's key and accept(payload, ctx) says it fits; returns its payload, or NULL (nothing waiting,
 * another kind of request first in line, or it does not fit). Requests behind another kind never overtake it. */
void *tk_exec_join(tk_exec *exec, int (*accept)(const void *payload, void *ctx), void *ctx);
/* Finishes one request of the running batch now (its waiters wake, its result may be read at once: the batch
 * must not touch its payload again). The batch's other requests finish when the batch function returns, with
 * its status. */
void tk_exec_finish(tk_exec *exec, void *payload, tk_status status);
/* Waits for the device and says whether everything queued in this batch so far ran: a device (a GPU) reports
 * its failures at a sync, and once one is seen it stays for the rest of the batch, whose shared state (a
 * decode's key/value caches) it may have spoilt. Checked before a result leaves the batch (tk_exec_finish, the
 * batch's end) and before anything computed in it is kept for later (prefix-cache blocks, gradients); on failure
 * the message is tk_last_error(). */
tk_status tk_exec_device_ok(tk_exec *exec);

typedef tk_status (*tk_request_fn)(void *payload, tk_exec *exec);
typedef void (*tk_payload_free_fn)(void *payload);
/* Runs n requests that share a batch key together (one status for all those it does not finish itself with
 * tk_exec_finish); more may join while it runs (tk_exec_join). */
typedef tk_status (*tk_batch_fn)(void **payloads, int n, tk_exec *exec);

typedef struct tk_engine tk_engine;
typedef struct tk_request tk_request;

/* An engine whose worker computes on the backend that create_backend makes over its thread pool. */
tk_status tk_engine_create(tk_engine **out, int n_threads, struct tk_backend *(*create_backend)(tk_pool *pool));
/* Finishes the request running now, fails the queued ones, joins the worker. */
void tk_engine_free(tk_engine *engine);
int tk_engine_threads(const tk_engine *engine);
/* The backend's name ("cpu", ...): which device runs the engine's work. */
const char *tk_engine_device(const tk_engine *engine);
int tk_engine_wake_fd(const tk_engine *engine);
/* Moves up to `max` finished ids (of notify requests) into ids; returns the count. */
size_t tk_engine_drain(tk_engine *engine, uint64_t *ids, size_t max);

/* A new request owning `payload` (freed with free_payload when the last
 * reference goes). The caller holds one reference. */
tk_request *tk_request_new(tk_request_fn run, void *payload, tk_payload_free_fn free_payload);
/* A request the worker may run together with the requests queued right
 * behind it that have the same key and batch function (e.g. sampling on one
 * model): up to TK_MAX_BATCH of them go through run_batch in one go. */
enum { TK_MAX_BATCH = 128 };
tk_request *tk_request_new_batched(tk_batch_fn run_batch, const void *key, void *payload,
                                   tk_payload_free_fn free_payload);
void tk_request_retain(tk_request *req);
void tk_request_release(tk_request *req);
/* Queues the request (the engine takes its own reference) and returns its id. */
uint64_t tk_engine_submit(tk_engine *engine, tk_request *req, int notify);

/* Waits up to timeout_ms (< 0: forever); returns 1 when the request is done. */
int tk_request_wait(tk_request *req, int timeout_ms);
int tk_request_done(tk_request *req);
/* Valid once done: the status and, on failure, the message. */
tk_status tk_request_status(const tk_request *req, const char **message);
void *tk_request_payload(tk_request *req);
/* Asks a request to stop: the kinds that can stop early (sampling) check the flag and finish with
 * TK_ERR_CANCELLED, freeing what they held; the others run to completion (training is never half-applied). */
void tk_request_cancel(tk_request *req);
/* The flag a payload may keep to check (valid as long as the request). */
const atomic_int *tk_request_cancel_flag(tk_request *req);

#endif
