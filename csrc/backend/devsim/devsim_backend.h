/* devsim_backend.h - the CPU backend behind device pointers the host cannot read: checks that model/ reaches
 * device memory only through the op table, as a GPU requires (see devsim_backend.c). */
#ifndef TK_DEVSIM_BACKEND_H
#define TK_DEVSIM_BACKEND_H

#include "../../core/pool.h"
#include "../backend.h"

tk_backend *tk_devsim_backend_create(tk_pool *pool);

#endif
