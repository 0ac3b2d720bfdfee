/* arch.h - architecture descriptors: what each model architecture the engine runs is made of.
 *
 * One static table per architecture (arch.c) says
 *   - its tensors: role, model-wide or per layer, shape (up to TK_ARCH_MAX_DIMS dimension expressions over the
 *     config, PyTorch order; a leading expert dimension E fits), when a configuration uses it, its GGUF and
 *     Hugging Face names (printf patterns, %d = layer) and whether llama.cpp's converter interleaved its rows
 *     for RoPE. An expert tensor (per_expert: shape [E, ...]) is one 3-D tensor per layer in GGUF, and one
 *     2-D tensor per layer and expert in Hugging Face files (its name has a second %d, the expert); the loader
 *     hands the engine one slice per expert either way;
 *   - its fused forms: 3-D Hugging Face tensors [E, n * rows, cols] that hold n expert roles stacked along
 *     dimension 1 (transformers 5.x's mlp.experts.gate_up_proj = gate, then up);
 *   - its LoRA targets: the engine's name ("q" ... "down", "unembed"), the tensor each adapts (in = that
 *     tensor's last dimension, out = the one before), the flag that trains it (train_attn / train_mlp /
 *     train_unembed) and its PEFT module (a pattern, %d = layer); on an expert tensor, whether A and B are
 *     one per expert or one shared by all (Tinker's "shared-outer" layout: the factor that touches D is shared);
 *   - its names elsewhere: Hugging Face model_type and architectures class, GGUF general.architecture, and
 *     extra config.json keys an export from GGUF writes;
 *   - flags every config of it gets (qkv_bias, qk_norm: the names of tk_model_config's fields; vision: the model
 *     reads images, through a vision tower whose tensors (names, scopes, shapes) are listed too).
 * The loader (weights.c), the adapter layout (lora.c) and, through tinker._C.architectures(), the Python
 * loader, checkpoints and export (tinker/_arch.py) take names and shapes only from here.
 *
 * Adding an architecture: write its table in arch.c (start from the nearest one) and list it in `archs`.
 * Nothing else changes when its tensors play roles the engine already computes with; tk_arch_validate
 * (run at import) checks the table. A new kind of tensor (an MoE router, expert matrices) is also a new
 * tk_role with its name in arch.c, a place in weights.c's storage and a use in the layer recipe; a new
 * condition for using a tensor is a new tk_when (arch.c and tinker/_arch.py evaluate it).
 *
 * Shape expressions are products and quotients of integers and config letters: D d_model, H n_heads,
 * Hkv n_kv_heads, Dh head_dim, F d_ff, V vocab_size, E n_experts, Fe d_ff_expert (e.g. "H*Dh", "Dh/2").
 */
#ifndef TK_ARCH_H
#define TK_ARCH_H

#include <stdint.h>

#include "../core/status.h"
#include "model.h"

/* What a tensor is to the engine (weights.c stores each role in its place). */
enum tk_role {
    TK_ROLE_EMBED, TK_ROLE_FINAL_NORM, TK_ROLE_LM_HEAD, TK_ROLE_ROPE_FREQS,
    TK_ROLE_ATTN_NORM, TK_ROLE_Q, TK_ROLE_K, TK_ROLE_V, TK_ROLE_O, TK_ROLE_Q_BIAS, TK_ROLE_K_BIAS, TK_ROLE_V_BIAS,
    TK_ROLE_Q_NORM, TK_ROLE_K_NORM, TK_ROLE_MLP_NORM, TK_ROLE_GATE, TK_ROLE_UP, TK_ROLE_DOWN,
    TK_ROLE_ROUTER, TK_ROLE_EXP_GATE, TK_ROLE_EXP_UP, TK_ROLE_EXP_DOWN,
    TK_ROLE_COUNT,
};

/* When a configuration uses a tensor; a used tensor must be present, except an optional one. */
enum tk_when {
    TK_WHEN_ALWAYS,
    TK_WHEN_OPTIONAL, /* used when present (llama3 rope_freqs) */
    TK_WHEN_UNTIED,   /* !tied_embeddings */
    TK_WHEN_QKV_BIAS, /* qkv_bias */
    TK_WHEN_QK_NORM,  /* qk_norm */
    TK_WHEN_DENSE_MLP,/* layers whose MLP is dense (all layers of a model without experts) */
    TK_WHEN_MOE,      /* MoE layers (tk_model_layer_is_moe) */
    TK_WHEN_COUNT,
};

/* Which tk_lora_config flag trains a LoRA target. */
enum tk_train { TK_TRAIN_ATTN, TK_TRAIN_MLP, TK_TRAIN_UNEMBED, TK_TRAIN_COUNT };

/* Flags an architecture sets in the config of every model of it. */
enum {
    TK_ARCH_QKV_BIAS = 1 << 0, TK_ARCH_QK_NORM = 1 << 1, TK_ARCH_MOE = 1 << 2,
    TK_ARCH_VISION = 1 << 3, /* a vision-language model: image tokens, M-RoPE positions, a vision tower */
    TK_ARCH_FLAG_COUNT = 4
};

enum { TK_ARCH_MAX_DIMS = 4, TK_ARCH_MAX_FUSED = 2 };

typedef struct {
    enum tk_role role;
    int per_layer;                         /* 0: one for the model; 1: one per layer (names have %d) */
    const char *shape[TK_ARCH_MAX_DIMS];   /* dimension expressions, outermost first; unused ones NULL */
    enum tk_when when;
    int gguf_rope_rows;                    /* GGUF rows hold each head's rotate_half partners side by side */
    const char *gguf, *hf;                 /* name patterns; NULL: that format has no such tensor */
    int per_expert;                        /* shape [E, ...]: stacked experts (see the top of this file) */
} tk_arch_tensor;

typedef struct {
    int target;                /* enum tk_lora_target (lora.h); TK_LORA_PER_LAYER is the unembedding */
    const char *name;          /* the engine's tensor names: "layers.{l}.{name}.lora_A", "unembed.lora_A" */
    enum tk_role role;         /* the base tensor it adapts */
    enum tk_train trained_by;
    const char *peft;          /* PEFT module pattern: key "base_model.model.{peft}.lora_A.weight" */
    int a_per_expert, b_per_expert; /* on an expert tensor: A [E or 1, R, in], B [E or 1, out, R] */
} tk_arch_lora;

/* A Hugging Face tensor [E, n * rows, cols] holding n expert roles, each [E, rows, cols], along dimension 1. */
typedef struct {
    const char *hf;                       /* name pattern, %d = layer */
    enum tk_role roles[TK_ARCH_MAX_FUSED];
    int n_roles;
} tk_arch_fused;

/* Where a vision tower's tensor sits: once in the model, once per ViT block, or once per deepstack merger. */
enum tk_vision_scope { TK_VISION_MODEL, TK_VISION_BLOCK, TK_VISION_DEEPSTACK, TK_VISION_SCOPE_COUNT };

/* What a vision tensor is to the engine (vision.c stores each in its place): the patch embedding and the position
 * table; a block's norms, attention and MLP; a merger's norm and two linears (the main merger's at model scope,
 * a deepstack tap's at deepstack scope). */
enum tk_vision_role {
    TK_VROLE_PATCH, TK_VROLE_PATCH_BIAS, TK_VROLE_POS,
    TK_VROLE_NORM1, TK_VROLE_NORM1_BIAS, TK_VROLE_QKV, TK_VROLE_QKV_BIAS, TK_VROLE_PROJ, TK_VROLE_PROJ_BIAS,
    TK_VROLE_NORM2, TK_VROLE_NORM2_BIAS, TK_VROLE_FC1, TK_VROLE_FC1_BIAS, TK_VROLE_FC2, TK_VROLE_FC2_BIAS,
    TK_VROLE_M_NORM, TK_VROLE_M_NORM_BIAS, TK_VROLE_M_FC1, TK_VROLE_M_FC1_BIAS, TK_VROLE_M_FC2, TK_VROLE_M_FC2_BIAS,
    TK_VROLE_COUNT,
};

/* A tensor of a vision tower (Qwen3-VL's ViT, merger and deepstack mergers). The tower is forward-only and runs
 * before the language model (tinker/_vision.py reads these): its tensors have their own names and shapes, in the
 * vision config's letters (comma-separated dimensions, each a product of letters and integers): Dv width, Fv MLP
 * width, C input channels, Tp temporal patch, P patch size, Np position-table entries, S spatial merge, O output
 * width (the language model's D). */
typedef struct {
    const char *name;          /* "qkv", "merger_fc1", ... */
    enum tk_vision_role role;
    enum tk_vision_scope scope;
    const char *hf;            /* Hugging Face name pattern; %d = block or deepstack merger */
    const char *gguf;          /* the name in llama.cpp's mmproj GGUF; %d = block, also for a deepstack merger (the
                                * block it taps); the patch embedding is that file's two temporal halves, this
                                * name and this name ".1", each [Dv, C, P, P] */
    const char *shape;         /* "3*Dv,Dv" (the Hugging Face form's) */
} tk_arch_vision_tensor;

typedef struct tk_arch {
    const char *name;          /* the engine's name (ModelSpec.arch, the config's "arch") */
    const char *hf_model_type; /* config.json model_type */
    const char *hf_class;      /* config.json architectures[0] */
    const char *gguf_name;     /* GGUF general.architecture, also its metadata key prefix */
    unsigned flags;            /* TK_ARCH_* */
    const char *hf_config;     /* extra config.json keys of an export from GGUF: JSON object text; a string value
                                * "$key" stands for the engine config's value of key ("$n_layers") */
    const tk_arch_tensor *tensors;
    int n_tensors;
    const tk_arch_lora *lora;
    int n_lora;
    const tk_arch_fused *fused;
    int n_fused;
    const tk_arch_vision_tensor *vision; /* the vision tower's tensors (TK_ARCH_VISION), else none */
    int n_vision;
} tk_arch;

typedef struct {
    int n_dims;
    int64_t dim[TK_ARCH_MAX_DIMS];
} tk_shape;

int tk_arch_count(void);
const tk_arch *tk_arch_at(int i);                 /* i in [0, tk_arch_count()) */
const tk_arch *tk_arch_find(const char *name);    /* NULL when the engine has no such architecture */
const char *tk_role_name(int role);               /* "embed", "q", ...; NULL out of range */
int tk_role_from_name(const char *name);          /* -1 when unknown */
const char *tk_when_name(int when);               /* "always", "optional", "untied", "qkv_bias", "qk_norm",
                                                   * "dense_mlp", "moe" */
const char *tk_train_name(int train);             /* "train_attn", "train_mlp", "train_unembed" */
const char *tk_arch_flag_name(int bit);           /* name of flag 1 << bit: "qkv_bias", "qk_norm", "moe", "vision" */
const char *tk_vision_scope_name(int scope);      /* "model", "block", "deepstack" */

/* The architecture's tensor of a role (NULL when it has none) and its LoRA target (NULL likewise). */
const tk_arch_tensor *tk_arch_tensor_of(const tk_arch *a, int role);
const tk_arch_lora *tk_arch_lora_of(const tk_arch *a, int target);

/* A shape expression's value for a config; -1 when it does not parse. */
int64_t tk_arch_eval(const char *expr, const tk_model_config *c);
tk_shape tk_arch_shape(const tk_arch_tensor *t, const tk_model_config *c);
/* Whether a configuration uses / requires the tensor in a layer (-1 for model-wide tensors). */
int tk_arch_used(const tk_arch_tensor *t, const tk_model_config *c, int layer);
int tk_arch_required(const tk_arch_tensor *t, const tk_model_config *c, int layer);
/* [in, out] of a LoRA target for a config (of one expert for an expert tensor); 0, 0 when the architecture has
 * no such target. */
void tk_arch_lora_dims(const tk_arch *a, int target, const tk_model_config *c, int *in, int *out);

/* Checks every table (expressions parse, each role once, %d exactly in per-layer names, LoRA targets adapt a
 * 2-D tensor the architecture has); TK_ERR_INTERNAL with the first problem otherwise. */
tk_status tk_arch_validate(void);

#endif
