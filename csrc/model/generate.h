/* generate.h - generation: prefill once, decode samples together with a KV cache.
 *
 * A sample request holds one prompt and its SamplingParams. Requests on the
 * same model and adapter that are queued together run as one batch: their
 * prompts are prefilled in one packed forward pass, then every sample of
 * every request decodes in shared steps (one GEMM per projection for all of
 * them), each attending to its request's prompt cache, shared by its
 * num_samples sequences, and to its own tokens. A prompt's first whole blocks
 * of tokens may come from the model's prefix cache (prefix_cache.h) instead of
 * the prefill: the rest is prefilled after them, with the same results.
 */
#ifndef TK_GENERATE_H
#define TK_GENERATE_H

#include "../core/engine.h"
#include "lora.h"
#include "mm.h"
#include "model.h"
#include "sampler.h"

/* stop_ids[n_stop_ids] end a sequence (the token is kept); stop strings are
 * byte strings stop_bytes[stop_offsets[i] .. stop_offsets[i+1]), matched
 * across token boundaries (needs the model's token bytes). */
tk_status tk_sample_request_create(tk_request **out, tk_model *m, tk_adapter *ad, const int32_t *prompt,
                                   int prompt_len, const tk_sample_params *p, const int32_t *stop_ids,
                                   int n_stop_ids, const char *stop_bytes, const uint32_t *stop_offsets,
                                   int n_stop_strings);

/* The bytes of keys and values a model's sampling holds at once: each admitted request reserves its prompt's rows
 * and max_tokens rows per sample (it may stop sooner, but its rows are there to be written), and a request that
 * would take the reservations past the limit waits, at the head of the queue, until decoding sequences finish
 * and free theirs; a request whose own reservation is past it is refused when it is made. The default
 * (tk_kv_default_limit, taken when the model has loaded: the weights' memory is then spoken for) is 3/4 of the
 * memory available then, at most half of the machine's; bytes 0 sets it back to the default. */
void tk_model_set_kv_limit(tk_model *m, size_t bytes);
size_t tk_model_kv_limit(const tk_model *m);
size_t tk_kv_default_limit(void);

/* Before submitting: the prompt's image features and positions (mm.h: one sequence, its tokens; pos_delta[0]
 * shifts the positions of the generated tokens). Copies them. */
tk_status tk_sample_request_set_mm(tk_request *req, const tk_mm *mm);

typedef struct {
    const int32_t *tokens;
    const float *logprobs;
    int n;
    int stopped;              /* 1: "stop", 0: "length" */
    const int32_t *topk_ids;  /* [n, topk] the top of each token's distribution, or NULL */
    const float *topk_logprobs;
    int topk;
} tk_sampled;

/* Results once done: sample i (0 <= i < num_samples), and the prompt scores
 * (NULL unless asked): logprobs[P] (entry 0 unused), top ids/logprobs [P, k]. */
int tk_sample_request_sample(tk_request *req, int i, tk_sampled *out);
const float *tk_sample_request_prompt(tk_request *req, int *prompt_len, const int32_t **topk_ids,
                                      const float **topk_logprobs, int *k);
/* How the request ran: the requests admitted with it (of any adapter; its cohort), the distinct prompts prefilled
 * for them (requests with the same prompt and adapter share one prefill), and whether it joined a decode that
 * was already running (continuous batching). */
void tk_sample_request_group(tk_request *req, int *group_requests, int *group_prompts, int *joined);
/* How many of its prompt's tokens had their keys and values from the model's prefix cache (prefix_cache.h)
 * instead of a prefill. */
int tk_sample_request_cached_tokens(tk_request *req);

#endif
