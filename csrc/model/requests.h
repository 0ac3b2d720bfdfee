/* requests.h - the kinds of engine request that involve a model.
 *
 * Each constructor validates and copies its inputs (so bad input fails at
 * call time, naming the sequence and position) and returns a request that the
 * binding submits to the engine; accessors read the results once it is done.
 */
#ifndef TK_REQUESTS_H
#define TK_REQUESTS_H

#include "../core/engine.h"
#include "model.h"

/* Load a model from tensor sources (see weights.c). */
tk_status tk_load_request_create(tk_request **out, const tk_model_config *cfg, const char *const *paths,
                                 int n_paths, const tk_tensor_source *src, int n_src);
/* The loaded model; the caller receives a new reference (NULL unless done and ok). */
tk_model *tk_load_request_model(tk_request *req);

/* Forward pass over sequences packed back to back: tokens[n_tokens], which
 * must equal sum(seq_lens[0..n_seqs)). */
tk_status tk_forward_request_create(tk_request **out, tk_model *m, const int32_t *tokens, long n_tokens,
                                    const int32_t *seq_lens, int n_seqs);
/* logits[rows, cols] = [T, V] once done and ok; NULL otherwise. */
const float *tk_forward_request_logits(tk_request *req, int *rows, int *cols);

#endif
