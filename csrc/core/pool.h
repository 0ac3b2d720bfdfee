/* pool.h - a persistent team of worker threads for data-parallel loops.
 *
 * tk_pool_run(pool, n, fn, ctx) calls fn(ctx, task, thread) for task = 0..n-1,
 * spread over the team; the calling thread takes part as thread 0 and the call
 * returns when every task is done. Threads are created once (not per op, which
 * is what makes a fork/join per matmul cheap). Only one thread may call
 * tk_pool_run on a pool at a time: the engine worker owns its pool.
 */
#ifndef TK_POOL_H
#define TK_POOL_H

#include "status.h"

typedef struct tk_pool tk_pool;
typedef void (*tk_pool_fn)(void *ctx, int task, int thread);

/* n_threads counts the caller; 1 means everything runs on the caller. */
tk_status tk_pool_create(tk_pool **out, int n_threads);
void tk_pool_free(tk_pool *pool);
int tk_pool_threads(const tk_pool *pool);
void tk_pool_run(tk_pool *pool, int n_tasks, tk_pool_fn fn, void *ctx);

#endif
