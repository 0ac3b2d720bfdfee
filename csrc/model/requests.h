/* requests.h - the kinds of engine request that involve a model or adapter.
 *
 * Each constructor validates and copies its inputs (so bad input fails at
 * call time, naming the datum, field and position) and returns a request the
 * binding submits to the engine; accessors read the results once it is done.
 * Requests on one engine run strictly in submission order, so an adapter's
 * forward_backward, optim_step and reads happen in the order they were made.
 */
#ifndef TK_REQUESTS_H
#define TK_REQUESTS_H

#include "../core/engine.h"
#include "head.h"
#include "lora.h"
#include "mm.h"
#include "model.h"
#include "optim.h"

/* Load a model from tensor sources (see weights.c). */
tk_status tk_load_request_create(tk_request **out, const tk_model_config *cfg, const char *const *paths,
                                 int n_paths, const tk_tensor_source *src, int n_src);
/* The loaded model; the caller receives a new reference (NULL unless done and ok). */
tk_model *tk_load_request_model(tk_request *req);

/* Logits at every position of sequences packed back to back: tokens[n_tokens]
 * with n_tokens = sum(seq_lens[0..n_seqs)). With per_sequence, adapters[s] is
 * sequence s's adapter (NULL: the base model), all in one pass over the base;
 * otherwise adapters[0] is every sequence's (or NULL). */
tk_status tk_forward_request_create(tk_request **out, tk_model *m, tk_adapter *const *adapters, int per_sequence,
                                    const int32_t *tokens, long n_tokens, const int32_t *seq_lens, int n_seqs);
/* Before submitting: the request's image features and positions (mm.h; its arrays index the packed batch's
 * tokens and sequences). Copies them. */
tk_status tk_forward_request_set_mm(tk_request *req, const tk_mm *mm);
/* The same with replacement embeddings only: row t of the batch embeds as embeds[embed_row[t]] ([n_embeds, D])
 * instead of its token where embed_row[t] >= 0. */
tk_status tk_forward_request_set_embeds(tk_request *req, const float *embeds, int n_embeds, const int32_t *embed_row,
                                        long n_rows);
/* logits[rows, cols] = [T, V] once done and ok; NULL otherwise. */
const float *tk_forward_request_logits(tk_request *req, int *rows, int *cols);

/* A training batch: datum i has seq_lens[i] tokens and k_per_datum[i]
 * targets per token; the per-target arrays hold n_targets =
 * sum(seq_lens[i] * k_per_datum[i]) values, datum after datum. Arrays a loss
 * does not use may be NULL. */
typedef struct {
    const int32_t *tokens;
    long n_tokens;
    const int32_t *seq_lens, *k_per_datum;
    int n_seqs;
    const int32_t *targets;
    const float *weights, *advantages, *sampler_lp, *clip_low, *clip_high;
    const float *ratio_mask; /* gspo's sequence_ratio_mask */
    long n_targets;
} tk_train_batch;

/* forward (backward = 0) or forward_backward (backward = 1) with a loss. */
tk_status tk_train_request_create(tk_request **out, tk_adapter *ad, const tk_train_batch *batch,
                                  const tk_loss_config *loss, int backward);
/* Before submitting: the datums' image features and positions (mm.h; over the packed tokens and datums). */
tk_status tk_train_request_set_mm(tk_request *req, const tk_mm *mm);
/* logprobs[n_targets] and the summed loss, once done and ok. */
/* pass_requests (optional): how many requests its pass ran (more than 1: shared with other clients' requests). */
const float *tk_train_request_result(tk_request *req, long *n_targets, double *loss, int *pass_requests);
/* An MoE model's routing over the whole request, once done: [n_moe_layers, n_experts], the (token, expert)
 * assignments each expert received in each sparse layer (in layer order), summed over the datums; NULL for a
 * model without experts. */
const int64_t *tk_train_request_expert_tokens(tk_request *req, int *n_moe_layers, int *n_experts);

tk_status tk_optim_request_create(tk_request **out, tk_adapter *ad, const tk_adam_params *params);
const tk_optim_result *tk_optim_request_result(tk_request *req);

/* Copies of the adapter's arrays at the request's place in the queue: parts
 * is a bit mask of 1 << k for k = 0 params, 1 grads, 2 exp_avg, 3 exp_avg_sq;
 * the result holds the chosen arrays back to back (n_params floats each). */
tk_status tk_adapter_read_request_create(tk_request **out, tk_adapter *ad, int parts);
const float *tk_adapter_read_result(tk_request *req, size_t *n_floats, int64_t *step);
/* Overwrites the chosen arrays (same layout as a read) and, when exp_avg is
 * among them, the step count. Values must be finite. */
tk_status tk_adapter_write_request_create(tk_request **out, tk_adapter *ad, int parts, const float *data,
                                          size_t n_floats, int64_t step);

/* A frozen copy of the adapter's parameters at the request's place in the queue. */
tk_status tk_snapshot_request_create(tk_request **out, tk_adapter *ad);
tk_adapter *tk_snapshot_request_adapter(tk_request *req); /* a new reference, once done */

#endif
