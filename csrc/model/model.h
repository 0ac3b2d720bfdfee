/* model.h - a loaded base model: its config and its weights.
 *
 * The config is the blueprint (shape letters used throughout the engine:
 * T tokens, D model width, H query heads, Hkv kv heads, Dh head dim,
 * F MLP width, V vocab; for mixture-of-experts models E experts, k experts
 * per token, Fe one expert's width). Every matrix is a tk_weight (backend.h) that keeps
 * its file's storage type - a Q4_1 GGUF costs about its file size in memory -
 * and is decoded exactly to float32 inside the matmuls; vectors (norms,
 * biases) are float32. Row-major, PyTorch order ([out, in] for projections),
 * with RoPE in Hugging Face's rotate_half pairing for every architecture:
 * GGUF llama q/k rows are un-permuted at load. q, k and v (and their biases)
 * sit back to back, so one GEMM computes all three; gate and up likewise.
 * An MoE layer keeps a router [E, D] and, per expert, its own gate|up
 * [2Fe, D] and down [D, Fe] handles (views of the file's 3-D or per-expert
 * tensors, still in the file's format), so a pass multiplies only the
 * experts its tokens were routed to.
 *
 * A model is shared by every request and client on it and is immutable after
 * load (but for its prefix cache, which guards itself); it is reference
 * counted because queued requests keep it alive.
 */
#ifndef TK_MODEL_H
#define TK_MODEL_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "../backend/backend.h"
#include "../core/status.h"

enum tk_rope_scaling { TK_ROPE_NONE = 0, TK_ROPE_LINEAR = 1, TK_ROPE_LLAMA3 = 2 };

enum { TK_MAX_MOE_LAYERS = 256, TK_MAX_EXPERTS = 1024 }; /* bounds of an MoE config (mlp_only_layers bits) */

struct tk_arch;   /* arch.h */
struct tk_vision; /* vision.h */
struct tk_prefix_cache; /* prefix_cache.h */

typedef struct {
    const struct tk_arch *arch; /* the architecture descriptor: tensor roles, shapes, names, LoRA targets */
    int n_layers, d_model, n_heads, n_kv_heads, head_dim, d_ff, vocab_size, max_context;
    float rms_eps, rope_theta;
    int tied_embeddings; /* lm_head is the embedding table */
    int qkv_bias;        /* Qwen2: q, k, v projections have biases */
    int qk_norm;         /* Qwen3: RMSNorm over Dh on q and k per head, before RoPE */
    int rope_scaling;    /* tk_rope_scaling */
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_original_context;
    /* M-RoPE (Qwen3-VL): positions have three components (temporal, height, width); frequency i of the Dh/2 takes
     * its angle from height when i % 3 == 1 and i < 3 mrope_section[1], from width when i % 3 == 2 and
     * i < 3 mrope_section[2], else from the temporal component (Hugging Face's interleaved layout). All zero: plain
     * RoPE over one position. */
    int mrope_section[3];
    /* Mixture of experts (Qwen3-MoE): layer l's MLP is a routed block of n_experts SwiGLU experts of width
     * d_ff_expert, n_experts_used per token, when tk_model_layer_is_moe(c, l); else the dense SwiGLU of d_ff. */
    int moe;               /* the architecture has MoE layers (n_experts > 0) */
    int n_experts, n_experts_used, d_ff_expert;
    int norm_topk_prob;    /* renormalise the kept probabilities to sum 1 */
    int decoder_sparse_step; /* layer l is sparse iff (l + 1) % step == 0 ... */
    uint64_t mlp_only_layers[TK_MAX_MOE_LAYERS / 64]; /* ... and its bit here is clear */
} tk_model_config;

typedef struct {
    float *attn_norm;      /* [D] */
    tk_weight wqkv;        /* [(H + 2 Hkv) Dh, D]: q rows, then k rows, then v rows */
    float *bqkv;           /* [(H + 2 Hkv) Dh] or NULL */
    float *q_norm, *k_norm;/* [Dh] or NULL */
    tk_weight wo;          /* [D, H Dh] */
    float *mlp_norm;       /* [D] */
    tk_weight w_gate_up;   /* [2F, D]: gate rows, then up rows */
    tk_weight w_down;      /* [D, F] */
    /* an MoE layer (moe = 1) has these instead of w_gate_up / w_down: */
    int moe;
    tk_weight router;      /* [E, D] */
    tk_weight *expert_gate_up; /* [E] handles of [2Fe, D]: expert e's gate rows, then its up rows */
    tk_weight *expert_down;    /* [E] handles of [D, Fe] */
} tk_layer_weights;

typedef struct {
    tk_weight embed;       /* [V, D] */
    float *final_norm;     /* [D] */
    tk_weight lm_head;     /* [V, D]; the embedding's storage when tied */
    float *rope_inv_freq;  /* [Dh/2] angle per position of each rotated pair */
    int8_t *rope_axis;     /* [Dh/2] host: the position component of each frequency (M-RoPE), or NULL */
    tk_layer_weights *layers; /* [n_layers] */
    tk_weight *experts;    /* [2 E] per MoE layer: the layers' expert_gate_up / expert_down point into it */
    float *block;          /* the float32 vectors above point into it */
    size_t block_floats;
    uint8_t *wblock;       /* the resident storage of every tk_weight above (backend weight_bytes each) */
    size_t wblock_bytes;
    size_t quantized_bytes;/* of wblock, in block-quantized types (not F32 / F16 / BF16) */
} tk_weights;

/* Each token's bytes (for matching stop strings while sampling), set once
 * from the tokenizer: token t is bytes[offsets[t] .. offsets[t+1]). */
typedef struct {
    uint32_t *offsets; /* [V + 1] */
    char *bytes;
} tk_vocab_bytes;

enum { TK_MAX_TOKEN_BYTES = 1024 }; /* bounds the stop-string matcher's buffer */

typedef struct tk_model {
    tk_model_config cfg;
    tk_weights w;
    tk_backend *be;        /* holds the weights' buffers (a reference) */
    _Atomic(tk_vocab_bytes *) vocab; /* NULL until set */
    _Atomic(struct tk_vision *) vision; /* a vision-language model's tower, once loaded (vision.h); else NULL */
    struct tk_prefix_cache *prefix_cache; /* prompt prefixes' keys and values for sampling (prefix_cache.h: the
                                           * one mutable part, behind its own lock), or NULL */
    _Atomic size_t kv_limit; /* bytes of keys and values sampling holds at once (generate.h); 0: kv_default */
    size_t kv_default;       /* that limit's default, set when the weights have loaded */
    atomic_int refcount;
} tk_model;

/* Where one tensor's bytes are, as the Python loader found them (GGUF tensor
 * info or safetensors header). Shape is in PyTorch order. */
typedef struct {
    const char *name;      /* the file's tensor name, for messages */
    const char *role;      /* "embed", "q", "gate", ... (tk_role_name, arch.h) */
    int layer;             /* -1 for model-wide tensors */
    int expert;            /* the expert of an expert tensor's slice (its shape is one expert's); else -1 */
    int file;              /* index into the list of mapped files */
    uint64_t offset, nbytes;
    int type;              /* ggml type id (safetensors F32/F16/BF16 use the same ids) */
    int n_dims;
    int64_t shape[2];
    int rope_rows_interleaved; /* GGUF llama q/k: each head's rotate_half partners are adjacent rows */
    uint64_t col_stride;   /* 0: rows stored one after another. Else the [rows, cols] tensor is stored transposed,
                            * element (r, c) being element c * col_stride + r from offset (an expert's slice of a
                            * fused [E, in, n out] tensor used as x @ W[e], Qwen3-VL-MoE's layout); float types
                            * only, nbytes spans ((cols - 1) col_stride + rows) elements */
} tk_tensor_source;

int tk_model_qkv_rows(const tk_model_config *cfg);
/* 1 when positions have M-RoPE's three components (mrope_section set) */
int tk_model_mrope(const tk_model_config *cfg);
/* 1 when layer l's MLP is the routed MoE block (Hugging Face's Qwen3-MoE rule) */
int tk_model_layer_is_moe(const tk_model_config *cfg, int layer);
tk_status tk_model_config_check(const tk_model_config *cfg);
/* Publishes the token byte table (copied); a table already set is kept. */
tk_status tk_model_set_vocab_bytes(tk_model *m, const uint32_t *offsets, const char *bytes, int n_tokens);
void tk_model_retain(tk_model *m);
void tk_model_release(tk_model *m);

#endif
