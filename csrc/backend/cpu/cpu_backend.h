/* cpu_backend.h - the CPU implementation of the op table (OpenBLAS sgemm plus
 * vectorised loops spread over the engine's thread pool). */
#ifndef TK_CPU_BACKEND_H
#define TK_CPU_BACKEND_H

#include "../../core/pool.h"
#include "../backend.h"

tk_backend *tk_cpu_backend_create(tk_pool *pool);
void tk_cpu_backend_free(tk_backend *be);

#endif
