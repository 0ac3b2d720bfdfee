/* sampler.h - choosing a token from a row of logits (see sampler.c). */
#ifndef TK_SAMPLER_H
#define TK_SAMPLER_H

#include <stdint.h>

#include "../core/status.h"

typedef struct {
    int num_samples, max_tokens;
    double temperature;       /* 0: greedy */
    int top_k;                /* <= 0: off */
    double top_p, min_p;
    double repetition_penalty, presence_penalty, frequency_penalty;
    uint64_t seed;
    int prompt_logprobs;      /* also return log p(prompt[i] | prompt[:i]) */
    int topk_prompt;          /* and the top k (id, logprob) at each prompt position */
    int topk_sample;          /* the top k (id, logprob) of each generated token's distribution */
} tk_sample_params;

/* A sequence's own xoshiro256** stream, seeded from (seed, sample index), so a sample does not depend on
 * what else shares its batch. */
typedef struct {
    uint64_t s[4];
} tk_rng;

tk_rng tk_rng_for(uint64_t seed, int sample);

/* A candidate token: its (scaled) logit and id. */
typedef struct {
    float z;
    int id;
} tk_cand;

/* qsort order: larger z first, then smaller id */
int tk_cand_by_z_desc(const void *a, const void *b);
/* Moves the k largest of c[0..n) to the front (unordered), by quickselect. */
void tk_select_top(tk_cand *c, int n, int k);

/* Working memory for choosing over a vocabulary of V tokens (one per thread that chooses). */
typedef struct {
    float *z;          /* [V] working logits */
    double *e;         /* [V] exp(z - max z), from logsumexp, reused by the draw */
    tk_cand *c;        /* [V] */
    int *seen;         /* [V] stamp per token for the penalties */
    int stamp;
    double lse;        /* log sum exp of z after tk_choose: logprobs are z - lse */
} tk_chooser;

/* The chosen token of one row of logits[V] under p, given the prompt and the tokens generated so far (for the
 * penalties); *logprob is its log-probability under the penalised, temperature-scaled distribution
 * (temperature 1 when greedy). */
int tk_choose(tk_chooser *ch, const float *logits, int V, const tk_sample_params *p, const int32_t *prompt, int P,
              const int32_t *out, int n_out, tk_rng *rng, float *logprob);

/* After tk_choose: the k most likely tokens of the distribution its logprob came from, most likely first
 * (ids[k], logprobs[k]); partial selection, the vocabulary is not sorted. Uses ch->c. */
void tk_chooser_topk(tk_chooser *ch, int V, int k, int32_t *ids, float *logprobs);

#endif
