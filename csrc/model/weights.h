/* weights.h - building a tk_model from tensor sources (see weights.c). */
#ifndef TK_WEIGHTS_H
#define TK_WEIGHTS_H

#include "../backend/backend.h"
#include "../core/pool.h"
#include "model.h"

tk_status tk_weights_load(tk_model **out, const tk_model_config *cfg, const char *const *paths, int n_paths,
                          const tk_tensor_source *src, int n_src, tk_pool *pool, tk_backend *be);

#endif
