/* cuda_backend.h - the op table on an NVIDIA GPU (issue #15; built only where nvcc was found: TK_HAVE_CUDA). */
#ifndef TK_CUDA_BACKEND_H
#define TK_CUDA_BACKEND_H

#include "../../core/pool.h"
#include "../backend.h"

/* The backend on GPU 0, or NULL with the reason recorded (tk_last_error). The ops not written yet are NULL,
 * so the engine does not run on it yet (tests/ops skips their checks on it). */
tk_backend *tk_cuda_backend_create(tk_pool *pool);

#endif
