/* transformer.h - the decoder stack's forward and backward passes over a batch
 * of packed sequences, with an optional LoRA adapter. */
#ifndef TK_TRANSFORMER_H
#define TK_TRANSFORMER_H

#include "../backend/backend.h"
#include "lora.h"
#include "model.h"

/* Sequences of different lengths packed back to back, without padding:
 * sequence s is tokens[seq_start[s] .. seq_start[s+1]). */
typedef struct {
    int n_seqs;
    int n_tokens;              /* T = seq_start[n_seqs] */
    const int32_t *tokens;     /* [T] */
    const int32_t *seq_start;  /* [n_seqs + 1] */
} tk_batch;

/* What the forward pass keeps for the backward pass, per layer (about 6k
 * floats per token and layer for SmolLM2; see tk_activation_floats). Every
 * other intermediate is recomputed from these in the backward pass. */
typedef struct {
    float *x;          /* [T, D] layer input (the residual stream) */
    float *inv_rms1;   /* [T] of the attention norm */
    float *qkv;        /* [T, (H + 2 Hkv) Dh] projections (+ bias), before q/k norm and RoPE */
    float *att;        /* [T, H Dh] attention output */
    float *lse;        /* [T, H] log-sum-exp of each attention row */
    float *x2;         /* [T, D] after the attention residual */
    float *inv_rms2;   /* [T] of the MLP norm */
    float *gate_up;    /* [T, 2F] */
    float *u;          /* [T, 7R] scale * (x A^T) of q|k|v|o|gate|up|down (unused when untrained) */
} tk_layer_acts;

typedef struct {
    tk_layer_acts *layers;  /* [n_layers] */
    float *x_final;         /* [T, D] input of the final norm */
    float *inv_rms_final;   /* [T] */
} tk_activations;

/* Floats of scratch tk_transformer_forward / _backward need (for `store`,
 * add tk_activation_floats). */
size_t tk_transformer_workspace(const tk_model *m, const tk_adapter *ad, tk_backend *be, const tk_batch *b,
                                int backward);
size_t tk_activation_floats(const tk_model *m, const tk_adapter *ad, int n_tokens);
/* Points `store` (and its layer array, n_layers entries the caller provides) into mem. */
void tk_activations_carve(tk_activations *store, tk_layer_acts *layers, float *mem, const tk_model *m,
                          const tk_adapter *ad, int n_tokens);

/* Where a forward pass writes each layer's keys and values (after q/k norm
 * and RoPE) to fill a KV cache: row t of the batch goes to
 * k + l * layer_stride + t * (Hkv Dh) for layer l. */
typedef struct {
    float *k, *v;
    size_t layer_stride;
} tk_kv_out;

/* h[T, D] = the final-norm output for every position. `ad` may be NULL (base
 * model); `store` may be NULL (inference); `kv` may be NULL (no cache). */
void tk_transformer_forward(float *h, const tk_model *m, const tk_adapter *ad, tk_backend *be, const tk_batch *b,
                            tk_activations *store, const tk_kv_out *kv, float *work);

/* One decoding step for n sequences: each has one new token at position
 * pos[i] and a KV cache in two spans - a prompt it may share with others and
 * its own tokens (layer l at base + l * stride, rows of Hkv Dh floats). The
 * new token's keys and values are written to its own span at row own_len[i]. */
typedef struct {
    int n;
    const int32_t *tokens, *pos;        /* [n] */
    const float *const *prompt_k, *const *prompt_v;
    const int *prompt_len;
    size_t prompt_stride;
    float *const *own_k, *const *own_v;
    const int *own_len;                 /* rows cached before this step */
    size_t own_stride;
} tk_decode_batch;

size_t tk_decode_workspace(const tk_model *m, const tk_adapter *ad, tk_backend *be, int n, int max_keys);
/* h[n, D] = the final-norm output of each sequence's new token. */
void tk_transformer_decode(float *h, const tk_model *m, const tk_adapter *ad, tk_backend *be, const tk_decode_batch *b,
                           float *work);
/* Backward from dh[T, D] (gradient of the final-norm output): accumulates the
 * adapter's LoRA gradients. dh is clobbered. */
void tk_transformer_backward(const tk_adapter *ad, tk_backend *be, const tk_batch *b, const tk_activations *store,
                             float *dh, float *work);

#endif
