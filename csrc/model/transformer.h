/* transformer.h - the decoder stack as one layer recipe: prefill, training
 * forward and decoding steps are the same function, given different batches;
 * the backward pass walks the same blocks in reverse. */
#ifndef TK_TRANSFORMER_H
#define TK_TRANSFORMER_H

#include "../backend/backend.h"
#include "../core/arena.h"
#include "lora.h"
#include "model.h"

enum { TK_POS_DIMS = 3 }; /* position components per token: (temporal, height, width) for M-RoPE */

/* A sequence's keys and values in a KV cache, rows of Hkv Dh floats; layer l's at base + l * stride. A prefix
 * it attends to but does not own (a prompt its samples share: n0 rows, possibly 0), then its own rows, n1 of
 * them cached before this pass: the pass writes its new rows' keys and values right after those and attends
 * to all of them. The strides are the sequence's own: sequences of one decoding step may live in caches
 * allocated at different times (requests that joined a running decode). */
typedef struct {
    const float *k0, *v0;
    int n0;
    float *k1, *v1;
    int n1;
    size_t stride0, stride1; /* layer strides (floats) of the prefix and of the own rows */
} tk_kv_seq;

/* What one pass computes: sequences packed back to back without padding, sequence s being rows
 * seq_start[s] .. seq_start[s+1] (its new tokens). Per token, its position and optionally an embedding that
 * replaces the token's (image features); per sequence, its adapter and its KV cache. A decoding step is a
 * batch with a cache and one row per sequence; prefill and training have no cache rows before the pass.
 * Image tokens of a vision-language model (mm.h) also get deepstack features added to their hidden states after
 * each of the first n_deepstack layers, and positions with three components (M-RoPE). */
typedef struct {
    int n_seqs;
    int n_tokens;                      /* T = seq_start[n_seqs] */
    const int32_t *tokens;             /* [T] */
    const int32_t *seq_start;          /* [n_seqs + 1] */
    const int32_t *pos;                /* [T][TK_POS_DIMS], or NULL: row i of sequence s is at n0 + n1 + i */
    const float *embeds;               /* [*, D] replacement embeddings, or NULL */
    const int32_t *embed_row;          /* [T]: -1 (the token's embedding) or a row of embeds; NULL: none */
    const tk_adapter *const *adapters; /* [n_seqs], NULL entries: the base model; NULL: no adapter at all */
    const tk_kv_seq *kv;               /* [n_seqs], or NULL: no cache (each sequence attends to its rows) */
    int64_t *expert_tokens;            /* out: [MoE layers, E], or NULL: the forward pass adds each MoE layer's
                                        * (token, expert) assignments per expert to its row (moe.c) */
    const int32_t *pos_delta;          /* [n_seqs] added to the counted positions (pos NULL), or NULL: none */
    const float *deepstack;            /* [n_deepstack, n_embeds, D]: feature k of the token with embed_row j is
                                        * row j of block k, added after layer k; NULL: none */
    int n_deepstack, n_embeds;
    int resumed;                       /* 1: prompts' rows prefilled over cached rows of their own (kv n1 > 0,
                                        * the prefix cache's): prefill kernels even when each sequence has one
                                        * new row, and the attention that reads the cached keys */
} tk_batch;

/* Runs of sequences with the same adapter: body for rows [r0, r1) of each run that has one. */
#define FOR_EACH_ADAPTER_SEGMENT(b, ad, r0, r1, body)                                             \
    for (int seg_s0_ = 0; (b)->adapters && seg_s0_ < (b)->n_seqs;) {                               \
        const tk_adapter *ad = (b)->adapters[seg_s0_];                                             \
        int seg_s1_ = seg_s0_ + 1;                                                                 \
        while (seg_s1_ < (b)->n_seqs && (b)->adapters[seg_s1_] == ad) seg_s1_++;                   \
        int r0 = (b)->seq_start[seg_s0_], r1 = (b)->seq_start[seg_s1_];                            \
        if (ad) { body }                                                                           \
        seg_s0_ = seg_s1_;                                                                         \
    }

/* 1 when every sequence of the batch is one new token over a cache (and not a resumed prefill): a decoding
 * step. */
int tk_batch_is_decode(const tk_batch *b);

/* What the forward pass keeps for the backward pass, per layer (about 6k floats per token and layer for
 * SmolLM2; see tk_activation_floats). Every other intermediate is recomputed from these. */
typedef struct {
    float *x;          /* [T, D] layer input (the residual stream) */
    float *inv_rms1;   /* [T] of the attention norm */
    float *qkv;        /* [T, (H + 2 Hkv) Dh] projections (+ bias), before q/k norm and RoPE */
    float *att;        /* [T, H Dh] attention output */
    float *lse;        /* [T, H] log-sum-exp of each attention row */
    float *x2;         /* [T, D] after the attention residual */
    float *inv_rms2;   /* [T] of the MLP norm */
    float *gate_up;    /* [T, 2F]; an MoE layer: [T k, 2Fe] of its expert-sorted rows (moe.c) */
    float *router_logits; /* [T, E] of an MoE layer, else NULL */
    float *u;          /* [T, 10R] scale * (x A^T) of q|k|v|o|gate|up|down|exp_gate|exp_up, and in an MoE layer
                        * exp_down's per-token sum (moe.c); R the batch's largest rank */
} tk_layer_acts;

typedef struct {
    tk_layer_acts *layers;  /* [n_layers] */
    float *x_final;         /* [T, D] input of the final norm */
    float *inv_rms_final;   /* [T] */
} tk_activations;

/* Floats of device and host scratch tk_transformer_forward / _backward need (for `store`, add
 * tk_activation_floats to the device's). */
tk_workspace tk_transformer_workspace(const tk_model *m, tk_backend *be, const tk_batch *b, int backward);
size_t tk_activation_floats(const tk_model *m, int n_tokens, int max_rank);
/* Points `store` (and its layer array, n_layers entries the caller provides) into mem. */
void tk_activations_carve(tk_activations *store, tk_layer_acts *layers, float *mem, const tk_model *m,
                          int n_tokens, int max_rank);
/* The largest LoRA rank among the batch's adapters (0: none). */
int tk_batch_max_rank(const tk_batch *b);

/* h[T, D] = the final-norm output for every row; `store` may be NULL (inference). */
void tk_transformer_forward(float *h, const tk_model *m, tk_backend *be, const tk_batch *b, tk_activations *store,
                            float *work, float *host);
/* Backward from dh[T, D] (gradient of the final-norm output): accumulates the LoRA gradients of the
 * batch's adapters. dh is clobbered. */
void tk_transformer_backward(const tk_model *m, tk_backend *be, const tk_batch *b, const tk_activations *store,
                             float *dh, float *work, float *host);

#endif
