/* lora.h - a LoRA adapter on a loaded base model: parameters, gradients and
 * AdamW moments in one allocation.
 *
 * y = W x + scale * B (A x), scale = alpha / R, alpha = 32, on q, k, v, o
 * (train_attn), gate, up, down (train_mlp) and the output projection
 * (train_unembed; with tied embeddings only the output side changes). In an
 * MoE layer train_mlp adapts every expert's gate, up and down in Tinker's
 * shared-outer layout: expert e's delta is scale * B_e A_e where the factor
 * touching the model width D is one matrix shared by all experts (A of gate
 * and up [R, D], B of down [D, R]) and the other is the expert's own (moe.c).
 * A [R, in] is seeded random (kaiming-uniform, as peft), B [out, R] is zero,
 * so a fresh adapter leaves the model unchanged. Per layer the A's of q, k, v
 * (and of gate, up) are adjacent rows of one matrix (see lora.c). The block holds four arrays
 * with the same layout - params | grads | exp_avg | exp_avg_sq - so a
 * parameter's gradient and moments sit at fixed offsets from it. Many
 * adapters share one base model; the base weights are never copied.
 */
#ifndef TK_LORA_H
#define TK_LORA_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "../backend/backend.h"
#include "model.h"

/* The per-layer targets; a layer has either the dense MLP's gate / up / down or, in an MoE layer, the experts'
 * (exp_*). TK_LORA_PER_LAYER counts them and also stands for the unembedding. */
enum tk_lora_target { TK_LORA_Q, TK_LORA_K, TK_LORA_V, TK_LORA_O, TK_LORA_GATE, TK_LORA_UP, TK_LORA_DOWN,
                      TK_LORA_EXP_GATE, TK_LORA_EXP_UP, TK_LORA_EXP_DOWN, TK_LORA_PER_LAYER };

typedef struct {
    int rank;          /* R, 1..256 */
    uint64_t seed;
    int train_attn, train_mlp, train_unembed;
} tk_lora_config;

typedef struct {
    float *A;          /* [a_experts R, in], NULL when this projection is not trained (or the layer lacks it) */
    float *B;          /* [b_experts out, R] */
    int in, out;       /* of one expert's matrix for an expert target */
    int a_experts, b_experts; /* 1, or E for a factor that each expert has its own of (expert targets) */
} tk_lora_pair;

typedef struct tk_adapter {
    tk_model *model;   /* a reference */
    tk_lora_config cfg;
    float scale;       /* alpha / R */
    tk_lora_pair *layers; /* [n_layers * TK_LORA_PER_LAYER] */
    tk_lora_pair unembed;
    float *block;      /* [4 * n_params] */
    size_t n_params;
    int64_t step;      /* AdamW steps taken */
    int frozen;        /* a snapshot for sampling: params only, no gradients or moments */
    int grads_zero;    /* the gradients are all zero (just created or stepped): a failed pass zeroes them again */
    uint64_t uid;      /* unique in the process (never reused, unlike the address): the prefix cache's key */
    uint64_t version;  /* bumped whenever the parameters change (optim_step, a state write): cached keys and
                        * values of an older version are never reused (prefix_cache.h) */
    atomic_int refcount;
} tk_adapter;

#define TK_LORA_ALPHA 32.0f

tk_status tk_adapter_create(tk_adapter **out, tk_model *m, const tk_lora_config *cfg);
/* A frozen copy of src's parameters (for sampling: later training of src does not change it). */
tk_status tk_adapter_snapshot(tk_adapter **out, const tk_adapter *src);
void tk_adapter_retain(tk_adapter *a);
void tk_adapter_release(tk_adapter *a);

static inline const tk_lora_pair *tk_lora_at(const tk_adapter *a, int layer, int target)
{
    return &a->layers[(size_t)layer * TK_LORA_PER_LAYER + (size_t)target];
}
/* The gradient (k = 1) or a moment (k = 2, 3) of parameter p. */
static inline float *tk_adapter_slot(const tk_adapter *a, const float *p, int k)
{
    return a->block + (size_t)k * a->n_params + (size_t)(p - a->block);
}

/* ---- the LoRA math, on the rows of one adapter ---- */

/* A group of n targets that share the input x (q, k, v; gate, up; o; down), whose A's are adjacent rows of
 * one [nR, in] matrix (see carve in lora.c). */
typedef struct {
    int first, n;          /* targets first .. first + n - 1 */
    float *y[3];           /* the targets' outputs (forward) or dy (backward) */
    int ld;                /* their row stride */
} tk_lora_group;

/* One adapter's rows [r0, r1) of a pass. */
typedef struct {
    const tk_adapter *ad;
    int r0, r1;
} tk_lora_segment;

/* For every segment (rows r0..r1 with adapter ad): y_j += u_j B_j^T for each target j, with
 * u = scale x [A_0; ...; A_n-1]^T [rows, nR] kept for the backward pass in the group's columns of u
 * (g->first R on, R the segment's rank). x, u and g->y point at row 0 of the pass. All segments' A products
 * go to the device as one call, then all their B products as another (matmul_nt_many): a decoding step of
 * one-row segments does not pay a call per adapter. `decoding`: the rows of a decoding step. */
void tk_lora_forward(tk_backend *be, const tk_lora_segment *segs, int n_segs, int layer, const tk_lora_group *g,
                     const float *x, int ldx, float *u, int ldu, int decoding);
/* Given each target's dy: t_j = dy_j B_j into t [T, nR] (scratch), dB_j += dy_j^T u_j, then with the
 * stacked A: dx += scale t A (when dx != NULL) and dA += scale t^T x. The base part of dx is the caller's. */
void tk_lora_backward(tk_backend *be, const tk_adapter *ad, int layer, const tk_lora_group *g, const float *x,
                      int ldx, const float *u, int ldu, float *dx, int lddx, float *t, int T);

/* Every trained tensor, in a fixed order (the export layout): name
 * "layers.{l}.{proj}.lora_A" / "...lora_B" / "unembed.lora_A" / "unembed.lora_B". An expert target's
 * tensors are 3-D [experts, rows / experts, cols] (experts 1 for a shared factor); others have experts 0. */
typedef struct {
    char name[64];
    const float *data; /* in the params array */
    int rows, cols;
    int experts;
} tk_lora_tensor;
int tk_adapter_tensors(const tk_adapter *a, tk_lora_tensor *out, int max);

#endif
