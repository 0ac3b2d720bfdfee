/* arch.c - the architecture descriptors (see arch.h): one table per architecture, and the lookups.
 *
 * Owns nothing but static tables. Invariants (tk_arch_validate checks them at import): every shape
 * expression parses, a role appears at most once per architecture, per-layer names have exactly one %d
 * (Hugging Face names of expert tensors two: layer, expert) and model-wide names none, every LoRA target adapts
 * a 2-D tensor (or an expert tensor) of its architecture, fused forms stack expert roles of one shape.
 */
#include "arch.h"

#include <ctype.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "lora.h"

static const char *const role_names[TK_ROLE_COUNT] = {
    [TK_ROLE_EMBED] = "embed", [TK_ROLE_FINAL_NORM] = "final_norm", [TK_ROLE_LM_HEAD] = "lm_head",
    [TK_ROLE_ROPE_FREQS] = "rope_freqs", [TK_ROLE_ATTN_NORM] = "attn_norm", [TK_ROLE_Q] = "q", [TK_ROLE_K] = "k",
    [TK_ROLE_V] = "v", [TK_ROLE_O] = "o", [TK_ROLE_Q_BIAS] = "q_bias", [TK_ROLE_K_BIAS] = "k_bias",
    [TK_ROLE_V_BIAS] = "v_bias", [TK_ROLE_Q_NORM] = "q_norm", [TK_ROLE_K_NORM] = "k_norm",
    [TK_ROLE_MLP_NORM] = "mlp_norm", [TK_ROLE_GATE] = "gate", [TK_ROLE_UP] = "up", [TK_ROLE_DOWN] = "down",
    [TK_ROLE_ROUTER] = "router", [TK_ROLE_EXP_GATE] = "exp_gate", [TK_ROLE_EXP_UP] = "exp_up",
    [TK_ROLE_EXP_DOWN] = "exp_down",
};

static const char *const when_names[TK_WHEN_COUNT] = {"always", "optional", "untied", "qkv_bias", "qk_norm",
                                                      "dense_mlp", "moe"};
static const char *const train_names[TK_TRAIN_COUNT] = {"train_attn", "train_mlp", "train_unembed"};
static const char *const flag_names[TK_ARCH_FLAG_COUNT] = {"qkv_bias", "qk_norm", "moe", "vision"};
static const char *const vision_scope_names[TK_VISION_SCOPE_COUNT] = {"model", "block", "deepstack"};

/* ---- the tables ------------------------------------------------------------------------------------------ */

#define MODEL 0
#define LAYER 1
#define ROPE_ROWS 1 /* llama.cpp's converter permuted these rows (llama q/k) */
#define EXPERTS 1   /* per_expert */
#define SHARED 0    /* a LoRA factor shared by all experts */
#define OWN 1       /* a LoRA factor each expert has its own of */
#define COUNT(a) (int)(sizeof(a) / sizeof((a)[0]))

/* Llama (SmolLM2, Llama 2/3.x): no biases, no q/k norm; a GGUF may carry llama3 rope factors. */
static const tk_arch_tensor llama_tensors[] = {
    /* role               scope   shape             when              GGUF rows  GGUF name                     Hugging Face name    experts */
    {TK_ROLE_EMBED,       MODEL,  {"V", "D"},       TK_WHEN_ALWAYS,   0,         "token_embd.weight",          "model.embed_tokens.weight",                        0},
    {TK_ROLE_FINAL_NORM,  MODEL,  {"D"},            TK_WHEN_ALWAYS,   0,         "output_norm.weight",         "model.norm.weight",                                0},
    {TK_ROLE_LM_HEAD,     MODEL,  {"V", "D"},       TK_WHEN_UNTIED,   0,         "output.weight",              "lm_head.weight",                                   0},
    {TK_ROLE_ROPE_FREQS,  MODEL,  {"Dh/2"},         TK_WHEN_OPTIONAL, 0,         "rope_freqs.weight",          NULL,                                               0},
    {TK_ROLE_ATTN_NORM,   LAYER,  {"D"},            TK_WHEN_ALWAYS,   0,         "blk.%d.attn_norm.weight",    "model.layers.%d.input_layernorm.weight",           0},
    {TK_ROLE_Q,           LAYER,  {"H*Dh", "D"},    TK_WHEN_ALWAYS,   ROPE_ROWS, "blk.%d.attn_q.weight",       "model.layers.%d.self_attn.q_proj.weight",          0},
    {TK_ROLE_K,           LAYER,  {"Hkv*Dh", "D"},  TK_WHEN_ALWAYS,   ROPE_ROWS, "blk.%d.attn_k.weight",       "model.layers.%d.self_attn.k_proj.weight",          0},
    {TK_ROLE_V,           LAYER,  {"Hkv*Dh", "D"},  TK_WHEN_ALWAYS,   0,         "blk.%d.attn_v.weight",       "model.layers.%d.self_attn.v_proj.weight",          0},
    {TK_ROLE_O,           LAYER,  {"D", "H*Dh"},    TK_WHEN_ALWAYS,   0,         "blk.%d.attn_output.weight",  "model.layers.%d.self_attn.o_proj.weight",          0},
    {TK_ROLE_MLP_NORM,    LAYER,  {"D"},            TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_norm.weight",     "model.layers.%d.post_attention_layernorm.weight",  0},
    {TK_ROLE_GATE,        LAYER,  {"F", "D"},       TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_gate.weight",     "model.layers.%d.mlp.gate_proj.weight",             0},
    {TK_ROLE_UP,          LAYER,  {"F", "D"},       TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_up.weight",       "model.layers.%d.mlp.up_proj.weight",               0},
    {TK_ROLE_DOWN,        LAYER,  {"D", "F"},       TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_down.weight",     "model.layers.%d.mlp.down_proj.weight",             0},
};

/* The LoRA targets of the decoder-only models here: PEFT wraps each nn.Linear (and lm_head). */
static const tk_arch_lora decoder_lora[] = {
    /* target           name       adapts           trained by        PEFT module                             A, B per expert */
    {TK_LORA_Q,         "q",       TK_ROLE_Q,       TK_TRAIN_ATTN,    "model.layers.%d.self_attn.q_proj",  0, 0},
    {TK_LORA_K,         "k",       TK_ROLE_K,       TK_TRAIN_ATTN,    "model.layers.%d.self_attn.k_proj",  0, 0},
    {TK_LORA_V,         "v",       TK_ROLE_V,       TK_TRAIN_ATTN,    "model.layers.%d.self_attn.v_proj",  0, 0},
    {TK_LORA_O,         "o",       TK_ROLE_O,       TK_TRAIN_ATTN,    "model.layers.%d.self_attn.o_proj",  0, 0},
    {TK_LORA_GATE,      "gate",    TK_ROLE_GATE,    TK_TRAIN_MLP,     "model.layers.%d.mlp.gate_proj",     0, 0},
    {TK_LORA_UP,        "up",      TK_ROLE_UP,      TK_TRAIN_MLP,     "model.layers.%d.mlp.up_proj",       0, 0},
    {TK_LORA_DOWN,      "down",    TK_ROLE_DOWN,    TK_TRAIN_MLP,     "model.layers.%d.mlp.down_proj",     0, 0},
    /* with tied embeddings the adapter changes the output projection only: its shape is still lm_head's */
    {TK_LORA_PER_LAYER, "unembed", TK_ROLE_LM_HEAD, TK_TRAIN_UNEMBED, "lm_head",  0, 0},
};

/* Qwen2 / Qwen2.5: Llama plus biases on q, k and v; GGUF rows in Hugging Face order. */
static const tk_arch_tensor qwen2_tensors[] = {
    /* role               scope   shape             when              GGUF rows  GGUF name                     Hugging Face name    experts */
    {TK_ROLE_EMBED,       MODEL,  {"V", "D"},       TK_WHEN_ALWAYS,   0,         "token_embd.weight",          "model.embed_tokens.weight",                        0},
    {TK_ROLE_FINAL_NORM,  MODEL,  {"D"},            TK_WHEN_ALWAYS,   0,         "output_norm.weight",         "model.norm.weight",                                0},
    {TK_ROLE_LM_HEAD,     MODEL,  {"V", "D"},       TK_WHEN_UNTIED,   0,         "output.weight",              "lm_head.weight",                                   0},
    {TK_ROLE_ATTN_NORM,   LAYER,  {"D"},            TK_WHEN_ALWAYS,   0,         "blk.%d.attn_norm.weight",    "model.layers.%d.input_layernorm.weight",           0},
    {TK_ROLE_Q,           LAYER,  {"H*Dh", "D"},    TK_WHEN_ALWAYS,   0,         "blk.%d.attn_q.weight",       "model.layers.%d.self_attn.q_proj.weight",          0},
    {TK_ROLE_K,           LAYER,  {"Hkv*Dh", "D"},  TK_WHEN_ALWAYS,   0,         "blk.%d.attn_k.weight",       "model.layers.%d.self_attn.k_proj.weight",          0},
    {TK_ROLE_V,           LAYER,  {"Hkv*Dh", "D"},  TK_WHEN_ALWAYS,   0,         "blk.%d.attn_v.weight",       "model.layers.%d.self_attn.v_proj.weight",          0},
    {TK_ROLE_O,           LAYER,  {"D", "H*Dh"},    TK_WHEN_ALWAYS,   0,         "blk.%d.attn_output.weight",  "model.layers.%d.self_attn.o_proj.weight",          0},
    {TK_ROLE_Q_BIAS,      LAYER,  {"H*Dh"},         TK_WHEN_QKV_BIAS, 0,         "blk.%d.attn_q.bias",         "model.layers.%d.self_attn.q_proj.bias",            0},
    {TK_ROLE_K_BIAS,      LAYER,  {"Hkv*Dh"},       TK_WHEN_QKV_BIAS, 0,         "blk.%d.attn_k.bias",         "model.layers.%d.self_attn.k_proj.bias",            0},
    {TK_ROLE_V_BIAS,      LAYER,  {"Hkv*Dh"},       TK_WHEN_QKV_BIAS, 0,         "blk.%d.attn_v.bias",         "model.layers.%d.self_attn.v_proj.bias",            0},
    {TK_ROLE_MLP_NORM,    LAYER,  {"D"},            TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_norm.weight",     "model.layers.%d.post_attention_layernorm.weight",  0},
    {TK_ROLE_GATE,        LAYER,  {"F", "D"},       TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_gate.weight",     "model.layers.%d.mlp.gate_proj.weight",             0},
    {TK_ROLE_UP,          LAYER,  {"F", "D"},       TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_up.weight",       "model.layers.%d.mlp.up_proj.weight",               0},
    {TK_ROLE_DOWN,        LAYER,  {"D", "F"},       TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_down.weight",     "model.layers.%d.mlp.down_proj.weight",             0},
};

/* Qwen3 (dense): Llama plus RMSNorm over each head of q and k; explicit head_dim; GGUF rows in HF order. */
static const tk_arch_tensor qwen3_tensors[] = {
    /* role               scope   shape             when              GGUF rows  GGUF name                     Hugging Face name    experts */
    {TK_ROLE_EMBED,       MODEL,  {"V", "D"},       TK_WHEN_ALWAYS,   0,         "token_embd.weight",          "model.embed_tokens.weight",                        0},
    {TK_ROLE_FINAL_NORM,  MODEL,  {"D"},            TK_WHEN_ALWAYS,   0,         "output_norm.weight",         "model.norm.weight",                                0},
    {TK_ROLE_LM_HEAD,     MODEL,  {"V", "D"},       TK_WHEN_UNTIED,   0,         "output.weight",              "lm_head.weight",                                   0},
    {TK_ROLE_ATTN_NORM,   LAYER,  {"D"},            TK_WHEN_ALWAYS,   0,         "blk.%d.attn_norm.weight",    "model.layers.%d.input_layernorm.weight",           0},
    {TK_ROLE_Q,           LAYER,  {"H*Dh", "D"},    TK_WHEN_ALWAYS,   0,         "blk.%d.attn_q.weight",       "model.layers.%d.self_attn.q_proj.weight",          0},
    {TK_ROLE_K,           LAYER,  {"Hkv*Dh", "D"},  TK_WHEN_ALWAYS,   0,         "blk.%d.attn_k.weight",       "model.layers.%d.self_attn.k_proj.weight",          0},
    {TK_ROLE_V,           LAYER,  {"Hkv*Dh", "D"},  TK_WHEN_ALWAYS,   0,         "blk.%d.attn_v.weight",       "model.layers.%d.self_attn.v_proj.weight",          0},
    {TK_ROLE_O,           LAYER,  {"D", "H*Dh"},    TK_WHEN_ALWAYS,   0,         "blk.%d.attn_output.weight",  "model.layers.%d.self_attn.o_proj.weight",          0},
    {TK_ROLE_Q_NORM,      LAYER,  {"Dh"},           TK_WHEN_QK_NORM,  0,         "blk.%d.attn_q_norm.weight",  "model.layers.%d.self_attn.q_norm.weight",          0},
    {TK_ROLE_K_NORM,      LAYER,  {"Dh"},           TK_WHEN_QK_NORM,  0,         "blk.%d.attn_k_norm.weight",  "model.layers.%d.self_attn.k_norm.weight",          0},
    {TK_ROLE_MLP_NORM,    LAYER,  {"D"},            TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_norm.weight",     "model.layers.%d.post_attention_layernorm.weight",  0},
    {TK_ROLE_GATE,        LAYER,  {"F", "D"},       TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_gate.weight",     "model.layers.%d.mlp.gate_proj.weight",             0},
    {TK_ROLE_UP,          LAYER,  {"F", "D"},       TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_up.weight",       "model.layers.%d.mlp.up_proj.weight",               0},
    {TK_ROLE_DOWN,        LAYER,  {"D", "F"},       TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_down.weight",     "model.layers.%d.mlp.down_proj.weight",             0},
};

/* Qwen3-MoE: Qwen3's attention; each layer's MLP is either a router over E SwiGLU experts of width Fe (top k of
 * a float32 softmax) or, in the layers the config keeps dense, Qwen3's SwiGLU of width F. No shared expert. */
static const tk_arch_tensor qwen3moe_tensors[] = {
    /* role               scope   shape                when               GGUF rows  GGUF name                       Hugging Face name                                       experts */
    {TK_ROLE_EMBED,       MODEL,  {"V", "D"},          TK_WHEN_ALWAYS,    0,         "token_embd.weight",            "model.embed_tokens.weight",                            0},
    {TK_ROLE_FINAL_NORM,  MODEL,  {"D"},               TK_WHEN_ALWAYS,    0,         "output_norm.weight",           "model.norm.weight",                                    0},
    {TK_ROLE_LM_HEAD,     MODEL,  {"V", "D"},          TK_WHEN_UNTIED,    0,         "output.weight",                "lm_head.weight",                                       0},
    {TK_ROLE_ATTN_NORM,   LAYER,  {"D"},               TK_WHEN_ALWAYS,    0,         "blk.%d.attn_norm.weight",      "model.layers.%d.input_layernorm.weight",               0},
    {TK_ROLE_Q,           LAYER,  {"H*Dh", "D"},       TK_WHEN_ALWAYS,    0,         "blk.%d.attn_q.weight",         "model.layers.%d.self_attn.q_proj.weight",              0},
    {TK_ROLE_K,           LAYER,  {"Hkv*Dh", "D"},     TK_WHEN_ALWAYS,    0,         "blk.%d.attn_k.weight",         "model.layers.%d.self_attn.k_proj.weight",              0},
    {TK_ROLE_V,           LAYER,  {"Hkv*Dh", "D"},     TK_WHEN_ALWAYS,    0,         "blk.%d.attn_v.weight",         "model.layers.%d.self_attn.v_proj.weight",              0},
    {TK_ROLE_O,           LAYER,  {"D", "H*Dh"},       TK_WHEN_ALWAYS,    0,         "blk.%d.attn_output.weight",    "model.layers.%d.self_attn.o_proj.weight",              0},
    {TK_ROLE_Q_NORM,      LAYER,  {"Dh"},              TK_WHEN_QK_NORM,   0,         "blk.%d.attn_q_norm.weight",    "model.layers.%d.self_attn.q_norm.weight",              0},
    {TK_ROLE_K_NORM,      LAYER,  {"Dh"},              TK_WHEN_QK_NORM,   0,         "blk.%d.attn_k_norm.weight",    "model.layers.%d.self_attn.k_norm.weight",              0},
    {TK_ROLE_MLP_NORM,    LAYER,  {"D"},               TK_WHEN_ALWAYS,    0,         "blk.%d.ffn_norm.weight",       "model.layers.%d.post_attention_layernorm.weight",      0},
    {TK_ROLE_GATE,        LAYER,  {"F", "D"},          TK_WHEN_DENSE_MLP, 0,         "blk.%d.ffn_gate.weight",       "model.layers.%d.mlp.gate_proj.weight",                 0},
    {TK_ROLE_UP,          LAYER,  {"F", "D"},          TK_WHEN_DENSE_MLP, 0,         "blk.%d.ffn_up.weight",         "model.layers.%d.mlp.up_proj.weight",                   0},
    {TK_ROLE_DOWN,        LAYER,  {"D", "F"},          TK_WHEN_DENSE_MLP, 0,         "blk.%d.ffn_down.weight",       "model.layers.%d.mlp.down_proj.weight",                 0},
    {TK_ROLE_ROUTER,      LAYER,  {"E", "D"},          TK_WHEN_MOE,       0,         "blk.%d.ffn_gate_inp.weight",   "model.layers.%d.mlp.gate.weight",                      0},
    {TK_ROLE_EXP_GATE,    LAYER,  {"E", "Fe", "D"},    TK_WHEN_MOE,       0,         "blk.%d.ffn_gate_exps.weight",  "model.layers.%d.mlp.experts.%d.gate_proj.weight",      EXPERTS},
    {TK_ROLE_EXP_UP,      LAYER,  {"E", "Fe", "D"},    TK_WHEN_MOE,       0,         "blk.%d.ffn_up_exps.weight",    "model.layers.%d.mlp.experts.%d.up_proj.weight",        EXPERTS},
    {TK_ROLE_EXP_DOWN,    LAYER,  {"E", "D", "Fe"},    TK_WHEN_MOE,       0,         "blk.%d.ffn_down_exps.weight",  "model.layers.%d.mlp.experts.%d.down_proj.weight",      EXPERTS},
};

/* transformers 5.x keeps the experts as 3-D parameters (its save_pretrained writes per-expert names again, but
 * other writers store these): gate_up_proj [E, 2 Fe, D] is every expert's gate rows, then its up rows. */
static const tk_arch_fused qwen3moe_fused[] = {
    {"model.layers.%d.mlp.experts.gate_up_proj", {TK_ROLE_EXP_GATE, TK_ROLE_EXP_UP}, 2},
    {"model.layers.%d.mlp.experts.down_proj", {TK_ROLE_EXP_DOWN}, 1},
};

/* Tinker's LoRA on Qwen3-MoE: attention and the dense layers' MLP as the decoder's; on the experts one adapter
 * per projection in the shared-outer layout (the factor touching D shared, the other per expert) under
 * Tinker's names w1 (gate), w3 (up), w2 (down). The router is not adapted. */
static const tk_arch_lora qwen3moe_lora[] = {
    /* target           name        adapts             trained by        PEFT module                              A       B */
    {TK_LORA_Q,         "q",        TK_ROLE_Q,         TK_TRAIN_ATTN,    "model.layers.%d.self_attn.q_proj",      0,      0},
    {TK_LORA_K,         "k",        TK_ROLE_K,         TK_TRAIN_ATTN,    "model.layers.%d.self_attn.k_proj",      0,      0},
    {TK_LORA_V,         "v",        TK_ROLE_V,         TK_TRAIN_ATTN,    "model.layers.%d.self_attn.v_proj",      0,      0},
    {TK_LORA_O,         "o",        TK_ROLE_O,         TK_TRAIN_ATTN,    "model.layers.%d.self_attn.o_proj",      0,      0},
    {TK_LORA_GATE,      "gate",     TK_ROLE_GATE,      TK_TRAIN_MLP,     "model.layers.%d.mlp.gate_proj",         0,      0},
    {TK_LORA_UP,        "up",       TK_ROLE_UP,        TK_TRAIN_MLP,     "model.layers.%d.mlp.up_proj",           0,      0},
    {TK_LORA_DOWN,      "down",     TK_ROLE_DOWN,      TK_TRAIN_MLP,     "model.layers.%d.mlp.down_proj",         0,      0},
    {TK_LORA_EXP_GATE,  "exp_gate", TK_ROLE_EXP_GATE,  TK_TRAIN_MLP,     "model.layers.%d.mlp.experts.w1",        SHARED, OWN},
    {TK_LORA_EXP_UP,    "exp_up",   TK_ROLE_EXP_UP,    TK_TRAIN_MLP,     "model.layers.%d.mlp.experts.w3",        SHARED, OWN},
    {TK_LORA_EXP_DOWN,  "exp_down", TK_ROLE_EXP_DOWN,  TK_TRAIN_MLP,     "model.layers.%d.mlp.experts.w2",        OWN,    SHARED},
    {TK_LORA_PER_LAYER, "unembed",  TK_ROLE_LM_HEAD,   TK_TRAIN_UNEMBED, "lm_head",                               0,      0},
};

/* Qwen3-VL's language model: Qwen3 under model.language_model (positions M-RoPE's, image features replacing the
 * image tokens' embeddings and deepstack features added after the first layers: mm.h). Its GGUF form (llama.cpp's
 * qwen3vl) holds the language model alone, under Qwen3's names: llama.cpp writes the vision tower to a separate
 * mmproj file (the vision table's GGUF names; tinker/_models.py finds it beside the model). */
static const tk_arch_tensor qwen3vl_tensors[] = {
    /* role               scope   shape             when              GGUF rows  GGUF name                      Hugging Face name    experts */
    {TK_ROLE_EMBED,       MODEL,  {"V", "D"},       TK_WHEN_ALWAYS,   0,         "token_embd.weight",           "model.language_model.embed_tokens.weight",                        0},
    {TK_ROLE_FINAL_NORM,  MODEL,  {"D"},            TK_WHEN_ALWAYS,   0,         "output_norm.weight",          "model.language_model.norm.weight",                                0},
    {TK_ROLE_LM_HEAD,     MODEL,  {"V", "D"},       TK_WHEN_UNTIED,   0,         "output.weight",               "lm_head.weight",                                                  0},
    {TK_ROLE_ATTN_NORM,   LAYER,  {"D"},            TK_WHEN_ALWAYS,   0,         "blk.%d.attn_norm.weight",     "model.language_model.layers.%d.input_layernorm.weight",           0},
    {TK_ROLE_Q,           LAYER,  {"H*Dh", "D"},    TK_WHEN_ALWAYS,   0,         "blk.%d.attn_q.weight",        "model.language_model.layers.%d.self_attn.q_proj.weight",          0},
    {TK_ROLE_K,           LAYER,  {"Hkv*Dh", "D"},  TK_WHEN_ALWAYS,   0,         "blk.%d.attn_k.weight",        "model.language_model.layers.%d.self_attn.k_proj.weight",          0},
    {TK_ROLE_V,           LAYER,  {"Hkv*Dh", "D"},  TK_WHEN_ALWAYS,   0,         "blk.%d.attn_v.weight",        "model.language_model.layers.%d.self_attn.v_proj.weight",          0},
    {TK_ROLE_O,           LAYER,  {"D", "H*Dh"},    TK_WHEN_ALWAYS,   0,         "blk.%d.attn_output.weight",   "model.language_model.layers.%d.self_attn.o_proj.weight",          0},
    {TK_ROLE_Q_NORM,      LAYER,  {"Dh"},           TK_WHEN_QK_NORM,  0,         "blk.%d.attn_q_norm.weight",   "model.language_model.layers.%d.self_attn.q_norm.weight",          0},
    {TK_ROLE_K_NORM,      LAYER,  {"Dh"},           TK_WHEN_QK_NORM,  0,         "blk.%d.attn_k_norm.weight",   "model.language_model.layers.%d.self_attn.k_norm.weight",          0},
    {TK_ROLE_MLP_NORM,    LAYER,  {"D"},            TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_norm.weight",      "model.language_model.layers.%d.post_attention_layernorm.weight",  0},
    {TK_ROLE_GATE,        LAYER,  {"F", "D"},       TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_gate.weight",      "model.language_model.layers.%d.mlp.gate_proj.weight",             0},
    {TK_ROLE_UP,          LAYER,  {"F", "D"},       TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_up.weight",        "model.language_model.layers.%d.mlp.up_proj.weight",               0},
    {TK_ROLE_DOWN,        LAYER,  {"D", "F"},       TK_WHEN_ALWAYS,   0,         "blk.%d.ffn_down.weight",      "model.language_model.layers.%d.mlp.down_proj.weight",             0},
};

/* Tinker adapts the language model only: the decoder's targets, under the language model's module names. */
static const tk_arch_lora qwen3vl_lora[] = {
    /* target           name       adapts           trained by        PEFT module                                          A, B per expert */
    {TK_LORA_Q,         "q",       TK_ROLE_Q,       TK_TRAIN_ATTN,    "model.language_model.layers.%d.self_attn.q_proj",  0, 0},
    {TK_LORA_K,         "k",       TK_ROLE_K,       TK_TRAIN_ATTN,    "model.language_model.layers.%d.self_attn.k_proj",  0, 0},
    {TK_LORA_V,         "v",       TK_ROLE_V,       TK_TRAIN_ATTN,    "model.language_model.layers.%d.self_attn.v_proj",  0, 0},
    {TK_LORA_O,         "o",       TK_ROLE_O,       TK_TRAIN_ATTN,    "model.language_model.layers.%d.self_attn.o_proj",  0, 0},
    {TK_LORA_GATE,      "gate",    TK_ROLE_GATE,    TK_TRAIN_MLP,     "model.language_model.layers.%d.mlp.gate_proj",     0, 0},
    {TK_LORA_UP,        "up",      TK_ROLE_UP,      TK_TRAIN_MLP,     "model.language_model.layers.%d.mlp.up_proj",       0, 0},
    {TK_LORA_DOWN,      "down",    TK_ROLE_DOWN,    TK_TRAIN_MLP,     "model.language_model.layers.%d.mlp.down_proj",     0, 0},
    {TK_LORA_PER_LAYER, "unembed", TK_ROLE_LM_HEAD, TK_TRAIN_UNEMBED, "lm_head",  0, 0},
};

/* Qwen3-VL-MoE's language model: Qwen3-MoE under model.language_model. Its files hold the experts fused, as
 * [E, 2 Fe, D] / [E, D, Fe] (transformers 5.x) or transposed, [E, D, 2 Fe] / [E, Fe, D] (the hub's files, used as
 * x @ W[e]); the loader reads both (tinker/_models.py). The per-expert names only name a missing expert. */
static const tk_arch_tensor qwen3vlmoe_tensors[] = {
    /* role               scope   shape                when               GGUF rows  GGUF name                      Hugging Face name                                                        experts */
    {TK_ROLE_EMBED,       MODEL,  {"V", "D"},          TK_WHEN_ALWAYS,    0,         "token_embd.weight",           "model.language_model.embed_tokens.weight",                              0},
    {TK_ROLE_FINAL_NORM,  MODEL,  {"D"},               TK_WHEN_ALWAYS,    0,         "output_norm.weight",          "model.language_model.norm.weight",                                      0},
    {TK_ROLE_LM_HEAD,     MODEL,  {"V", "D"},          TK_WHEN_UNTIED,    0,         "output.weight",               "lm_head.weight",                                                        0},
    {TK_ROLE_ATTN_NORM,   LAYER,  {"D"},               TK_WHEN_ALWAYS,    0,         "blk.%d.attn_norm.weight",     "model.language_model.layers.%d.input_layernorm.weight",                 0},
    {TK_ROLE_Q,           LAYER,  {"H*Dh", "D"},       TK_WHEN_ALWAYS,    0,         "blk.%d.attn_q.weight",        "model.language_model.layers.%d.self_attn.q_proj.weight",                0},
    {TK_ROLE_K,           LAYER,  {"Hkv*Dh", "D"},     TK_WHEN_ALWAYS,    0,         "blk.%d.attn_k.weight",        "model.language_model.layers.%d.self_attn.k_proj.weight",                0},
    {TK_ROLE_V,           LAYER,  {"Hkv*Dh", "D"},     TK_WHEN_ALWAYS,    0,         "blk.%d.attn_v.weight",        "model.language_model.layers.%d.self_attn.v_proj.weight",                0},
    {TK_ROLE_O,           LAYER,  {"D", "H*Dh"},       TK_WHEN_ALWAYS,    0,         "blk.%d.attn_output.weight",   "model.language_model.layers.%d.self_attn.o_proj.weight",                0},
    {TK_ROLE_Q_NORM,      LAYER,  {"Dh"},              TK_WHEN_QK_NORM,   0,         "blk.%d.attn_q_norm.weight",   "model.language_model.layers.%d.self_attn.q_norm.weight",                0},
    {TK_ROLE_K_NORM,      LAYER,  {"Dh"},              TK_WHEN_QK_NORM,   0,         "blk.%d.attn_k_norm.weight",   "model.language_model.layers.%d.self_attn.k_norm.weight",                0},
    {TK_ROLE_MLP_NORM,    LAYER,  {"D"},               TK_WHEN_ALWAYS,    0,         "blk.%d.ffn_norm.weight",      "model.language_model.layers.%d.post_attention_layernorm.weight",        0},
    {TK_ROLE_GATE,        LAYER,  {"F", "D"},          TK_WHEN_DENSE_MLP, 0,         "blk.%d.ffn_gate.weight",      "model.language_model.layers.%d.mlp.gate_proj.weight",                   0},
    {TK_ROLE_UP,          LAYER,  {"F", "D"},          TK_WHEN_DENSE_MLP, 0,         "blk.%d.ffn_up.weight",        "model.language_model.layers.%d.mlp.up_proj.weight",                     0},
    {TK_ROLE_DOWN,        LAYER,  {"D", "F"},          TK_WHEN_DENSE_MLP, 0,         "blk.%d.ffn_down.weight",      "model.language_model.layers.%d.mlp.down_proj.weight",                   0},
    {TK_ROLE_ROUTER,      LAYER,  {"E", "D"},          TK_WHEN_MOE,       0,         "blk.%d.ffn_gate_inp.weight",  "model.language_model.layers.%d.mlp.gate.weight",                        0},
    {TK_ROLE_EXP_GATE,    LAYER,  {"E", "Fe", "D"},    TK_WHEN_MOE,       0,         "blk.%d.ffn_gate_exps.weight", "model.language_model.layers.%d.mlp.experts.%d.gate_proj.weight",        EXPERTS},
    {TK_ROLE_EXP_UP,      LAYER,  {"E", "Fe", "D"},    TK_WHEN_MOE,       0,         "blk.%d.ffn_up_exps.weight",   "model.language_model.layers.%d.mlp.experts.%d.up_proj.weight",          EXPERTS},
    {TK_ROLE_EXP_DOWN,    LAYER,  {"E", "D", "Fe"},    TK_WHEN_MOE,       0,         "blk.%d.ffn_down_exps.weight", "model.language_model.layers.%d.mlp.experts.%d.down_proj.weight",        EXPERTS},
};

static const tk_arch_fused qwen3vlmoe_fused[] = {
    {"model.language_model.layers.%d.mlp.experts.gate_up_proj", {TK_ROLE_EXP_GATE, TK_ROLE_EXP_UP}, 2},
    {"model.language_model.layers.%d.mlp.experts.down_proj", {TK_ROLE_EXP_DOWN}, 1},
};

/* Tinker's LoRA on Qwen3-VL-MoE: Qwen3-MoE's (the shared-outer expert layout under w1 / w3 / w2) on the language
 * model; nothing in the vision tower, not the router. */
static const tk_arch_lora qwen3vlmoe_lora[] = {
    /* target           name        adapts             trained by        PEFT module                                              A       B */
    {TK_LORA_Q,         "q",        TK_ROLE_Q,         TK_TRAIN_ATTN,    "model.language_model.layers.%d.self_attn.q_proj",      0,      0},
    {TK_LORA_K,         "k",        TK_ROLE_K,         TK_TRAIN_ATTN,    "model.language_model.layers.%d.self_attn.k_proj",      0,      0},
    {TK_LORA_V,         "v",        TK_ROLE_V,         TK_TRAIN_ATTN,    "model.language_model.layers.%d.self_attn.v_proj",      0,      0},
    {TK_LORA_O,         "o",        TK_ROLE_O,         TK_TRAIN_ATTN,    "model.language_model.layers.%d.self_attn.o_proj",      0,      0},
    {TK_LORA_GATE,      "gate",     TK_ROLE_GATE,      TK_TRAIN_MLP,     "model.language_model.layers.%d.mlp.gate_proj",         0,      0},
    {TK_LORA_UP,        "up",       TK_ROLE_UP,        TK_TRAIN_MLP,     "model.language_model.layers.%d.mlp.up_proj",           0,      0},
    {TK_LORA_DOWN,      "down",     TK_ROLE_DOWN,      TK_TRAIN_MLP,     "model.language_model.layers.%d.mlp.down_proj",         0,      0},
    {TK_LORA_EXP_GATE,  "exp_gate", TK_ROLE_EXP_GATE,  TK_TRAIN_MLP,     "model.language_model.layers.%d.mlp.experts.w1",        SHARED, OWN},
    {TK_LORA_EXP_UP,    "exp_up",   TK_ROLE_EXP_UP,    TK_TRAIN_MLP,     "model.language_model.layers.%d.mlp.experts.w3",        SHARED, OWN},
    {TK_LORA_EXP_DOWN,  "exp_down", TK_ROLE_EXP_DOWN,  TK_TRAIN_MLP,     "model.language_model.layers.%d.mlp.experts.w2",        OWN,    SHARED},
    {TK_LORA_PER_LAYER, "unembed",  TK_ROLE_LM_HEAD,   TK_TRAIN_UNEMBED, "lm_head",                                              0,      0},
};

#define VMODEL TK_VISION_MODEL
#define VBLOCK TK_VISION_BLOCK
#define VDEEP TK_VISION_DEEPSTACK

/* Qwen3-VL's vision tower (arch.h's tk_arch_vision_tensor): patch embedding (a Conv3d over [C, Tp, P, P] patches),
 * a learned position table, ViT blocks, the 2x2 merger, and one merger per deepstack tap (its norm after the
 * regrouping, so over S*S*Dv). */
static const tk_arch_vision_tensor qwen3vl_vision[] = {
    /* name                 role                   scope   Hugging Face name                                            GGUF name (mmproj)                 shape */
    {"patch_embed",         TK_VROLE_PATCH,        VMODEL, "model.visual.patch_embed.proj.weight",                      "v.patch_embd.weight",             "Dv,C,Tp,P,P"},
    {"patch_embed_bias",    TK_VROLE_PATCH_BIAS,   VMODEL, "model.visual.patch_embed.proj.bias",                        "v.patch_embd.bias",               "Dv"},
    {"pos_embed",           TK_VROLE_POS,          VMODEL, "model.visual.pos_embed.weight",                             "v.position_embd.weight",          "Np,Dv"},
    {"norm1",               TK_VROLE_NORM1,        VBLOCK, "model.visual.blocks.%d.norm1.weight",                       "v.blk.%d.ln1.weight",             "Dv"},
    {"norm1_bias",          TK_VROLE_NORM1_BIAS,   VBLOCK, "model.visual.blocks.%d.norm1.bias",                         "v.blk.%d.ln1.bias",               "Dv"},
    {"qkv",                 TK_VROLE_QKV,          VBLOCK, "model.visual.blocks.%d.attn.qkv.weight",                    "v.blk.%d.attn_qkv.weight",        "3*Dv,Dv"},
    {"qkv_bias",            TK_VROLE_QKV_BIAS,     VBLOCK, "model.visual.blocks.%d.attn.qkv.bias",                      "v.blk.%d.attn_qkv.bias",          "3*Dv"},
    {"proj",                TK_VROLE_PROJ,         VBLOCK, "model.visual.blocks.%d.attn.proj.weight",                   "v.blk.%d.attn_out.weight",        "Dv,Dv"},
    {"proj_bias",           TK_VROLE_PROJ_BIAS,    VBLOCK, "model.visual.blocks.%d.attn.proj.bias",                     "v.blk.%d.attn_out.bias",          "Dv"},
    {"norm2",               TK_VROLE_NORM2,        VBLOCK, "model.visual.blocks.%d.norm2.weight",                       "v.blk.%d.ln2.weight",             "Dv"},
    {"norm2_bias",          TK_VROLE_NORM2_BIAS,   VBLOCK, "model.visual.blocks.%d.norm2.bias",                         "v.blk.%d.ln2.bias",               "Dv"},
    {"fc1",                 TK_VROLE_FC1,          VBLOCK, "model.visual.blocks.%d.mlp.linear_fc1.weight",              "v.blk.%d.ffn_up.weight",          "Fv,Dv"},
    {"fc1_bias",            TK_VROLE_FC1_BIAS,     VBLOCK, "model.visual.blocks.%d.mlp.linear_fc1.bias",                "v.blk.%d.ffn_up.bias",            "Fv"},
    {"fc2",                 TK_VROLE_FC2,          VBLOCK, "model.visual.blocks.%d.mlp.linear_fc2.weight",              "v.blk.%d.ffn_down.weight",        "Dv,Fv"},
    {"fc2_bias",            TK_VROLE_FC2_BIAS,     VBLOCK, "model.visual.blocks.%d.mlp.linear_fc2.bias",                "v.blk.%d.ffn_down.bias",          "Dv"},
    {"merger_norm",         TK_VROLE_M_NORM,       VMODEL, "model.visual.merger.norm.weight",                           "v.post_ln.weight",                "Dv"},
    {"merger_norm_bias",    TK_VROLE_M_NORM_BIAS,  VMODEL, "model.visual.merger.norm.bias",                             "v.post_ln.bias",                  "Dv"},
    {"merger_fc1",          TK_VROLE_M_FC1,        VMODEL, "model.visual.merger.linear_fc1.weight",                     "mm.0.weight",                     "S*S*Dv,S*S*Dv"},
    {"merger_fc1_bias",     TK_VROLE_M_FC1_BIAS,   VMODEL, "model.visual.merger.linear_fc1.bias",                       "mm.0.bias",                       "S*S*Dv"},
    {"merger_fc2",          TK_VROLE_M_FC2,        VMODEL, "model.visual.merger.linear_fc2.weight",                     "mm.2.weight",                     "O,S*S*Dv"},
    {"merger_fc2_bias",     TK_VROLE_M_FC2_BIAS,   VMODEL, "model.visual.merger.linear_fc2.bias",                       "mm.2.bias",                       "O"},
    {"deepstack_norm",      TK_VROLE_M_NORM,       VDEEP,  "model.visual.deepstack_merger_list.%d.norm.weight",         "v.deepstack.%d.norm.weight",      "S*S*Dv"},
    {"deepstack_norm_bias", TK_VROLE_M_NORM_BIAS,  VDEEP,  "model.visual.deepstack_merger_list.%d.norm.bias",           "v.deepstack.%d.norm.bias",        "S*S*Dv"},
    {"deepstack_fc1",       TK_VROLE_M_FC1,        VDEEP,  "model.visual.deepstack_merger_list.%d.linear_fc1.weight",   "v.deepstack.%d.fc1.weight",       "S*S*Dv,S*S*Dv"},
    {"deepstack_fc1_bias",  TK_VROLE_M_FC1_BIAS,   VDEEP,  "model.visual.deepstack_merger_list.%d.linear_fc1.bias",     "v.deepstack.%d.fc1.bias",         "S*S*Dv"},
    {"deepstack_fc2",       TK_VROLE_M_FC2,        VDEEP,  "model.visual.deepstack_merger_list.%d.linear_fc2.weight",   "v.deepstack.%d.fc2.weight",       "O,S*S*Dv"},
    {"deepstack_fc2_bias",  TK_VROLE_M_FC2_BIAS,   VDEEP,  "model.visual.deepstack_merger_list.%d.linear_fc2.bias",     "v.deepstack.%d.fc2.bias",         "O"},
};

static const tk_arch archs[] = {
    {
        .name = "llama", .hf_model_type = "llama", .hf_class = "LlamaForCausalLM", .gguf_name = "llama",
        .flags = 0,
        .hf_config = "{\"attention_bias\": false, \"mlp_bias\": false}",
        .tensors = llama_tensors, .n_tensors = COUNT(llama_tensors),
        .lora = decoder_lora, .n_lora = COUNT(decoder_lora),
    },
    {
        .name = "qwen2", .hf_model_type = "qwen2", .hf_class = "Qwen2ForCausalLM", .gguf_name = "qwen2",
        .flags = TK_ARCH_QKV_BIAS,
        .hf_config = "{\"use_sliding_window\": false, \"sliding_window\": null, \"max_window_layers\": \"$n_layers\"}",
        .tensors = qwen2_tensors, .n_tensors = COUNT(qwen2_tensors),
        .lora = decoder_lora, .n_lora = COUNT(decoder_lora),
    },
    {
        .name = "qwen3", .hf_model_type = "qwen3", .hf_class = "Qwen3ForCausalLM", .gguf_name = "qwen3",
        .flags = TK_ARCH_QK_NORM,
        .hf_config = "{\"use_sliding_window\": false, \"sliding_window\": null, \"max_window_layers\": \"$n_layers\", "
                     "\"attention_bias\": false}",
        .tensors = qwen3_tensors, .n_tensors = COUNT(qwen3_tensors),
        .lora = decoder_lora, .n_lora = COUNT(decoder_lora),
    },
    {
        .name = "qwen3moe", .hf_model_type = "qwen3_moe", .hf_class = "Qwen3MoeForCausalLM", .gguf_name = "qwen3moe",
        .flags = TK_ARCH_QK_NORM | TK_ARCH_MOE,
        .hf_config = "{\"use_sliding_window\": false, \"sliding_window\": null, \"max_window_layers\": \"$n_layers\", "
                     "\"attention_bias\": false}",
        .tensors = qwen3moe_tensors, .n_tensors = COUNT(qwen3moe_tensors),
        .lora = qwen3moe_lora, .n_lora = COUNT(qwen3moe_lora),
        .fused = qwen3moe_fused, .n_fused = COUNT(qwen3moe_fused),
    },
    {
        .name = "qwen3vl", .hf_model_type = "qwen3_vl", .hf_class = "Qwen3VLForConditionalGeneration",
        .gguf_name = "qwen3vl", .flags = TK_ARCH_QK_NORM | TK_ARCH_VISION,
        .hf_config = "{\"attention_bias\": false}",
        .tensors = qwen3vl_tensors, .n_tensors = COUNT(qwen3vl_tensors),
        .lora = qwen3vl_lora, .n_lora = COUNT(qwen3vl_lora),
        .vision = qwen3vl_vision, .n_vision = COUNT(qwen3vl_vision),
    },
    {
        .name = "qwen3vlmoe", .hf_model_type = "qwen3_vl_moe", .hf_class = "Qwen3VLMoeForConditionalGeneration",
        .gguf_name = "qwen3vlmoe", .flags = TK_ARCH_QK_NORM | TK_ARCH_MOE | TK_ARCH_VISION,
        .hf_config = "{\"attention_bias\": false}",
        .tensors = qwen3vlmoe_tensors, .n_tensors = COUNT(qwen3vlmoe_tensors),
        .lora = qwen3vlmoe_lora, .n_lora = COUNT(qwen3vlmoe_lora),
        .fused = qwen3vlmoe_fused, .n_fused = COUNT(qwen3vlmoe_fused),
        .vision = qwen3vl_vision, .n_vision = COUNT(qwen3vl_vision),
    },
};

/* ---- lookups --------------------------------------------------------------------------------------------- */

int tk_arch_count(void) { return COUNT(archs); }

const tk_arch *tk_arch_at(int i) { return i >= 0 && i < COUNT(archs) ? &archs[i] : NULL; }

const tk_arch *tk_arch_find(const char *name)
{
    for (int i = 0; name && i < COUNT(archs); i++)
        if (strcmp(archs[i].name, name) == 0) return &archs[i];
    return NULL;
}

const char *tk_role_name(int role) { return role >= 0 && role < TK_ROLE_COUNT ? role_names[role] : NULL; }

int tk_role_from_name(const char *name)
{
    for (int r = 0; r < TK_ROLE_COUNT; r++)
        if (strcmp(role_names[r], name) == 0) return r;
    return -1;
}

const char *tk_when_name(int when) { return when >= 0 && when < TK_WHEN_COUNT ? when_names[when] : NULL; }
const char *tk_train_name(int train) { return train >= 0 && train < TK_TRAIN_COUNT ? train_names[train] : NULL; }
const char *tk_arch_flag_name(int bit) { return bit >= 0 && bit < TK_ARCH_FLAG_COUNT ? flag_names[bit] : NULL; }
const char *tk_vision_scope_name(int scope)
{
    return scope >= 0 && scope < TK_VISION_SCOPE_COUNT ? vision_scope_names[scope] : NULL;
}

const tk_arch_tensor *tk_arch_tensor_of(const tk_arch *a, int role)
{
    for (int i = 0; a && i < a->n_tensors; i++)
        if ((int)a->tensors[i].role == role) return &a->tensors[i];
    return NULL;
}

const tk_arch_lora *tk_arch_lora_of(const tk_arch *a, int target)
{
    for (int i = 0; a && i < a->n_lora; i++)
        if (a->lora[i].target == target) return &a->lora[i];
    return NULL;
}

/* ---- shapes and conditions --------------------------------------------------------------------------------- */

static const struct {
    const char *letter;
    size_t offset; /* of an int field of tk_model_config */
} letters[] = {
    {"D", offsetof(tk_model_config, d_model)},       {"H", offsetof(tk_model_config, n_heads)},
    {"Hkv", offsetof(tk_model_config, n_kv_heads)},  {"Dh", offsetof(tk_model_config, head_dim)},
    {"F", offsetof(tk_model_config, d_ff)},          {"V", offsetof(tk_model_config, vocab_size)},
    {"E", offsetof(tk_model_config, n_experts)},     {"Fe", offsetof(tk_model_config, d_ff_expert)},
};

static int64_t letter_value(const char *s, size_t n, const tk_model_config *c)
{
    for (size_t i = 0; i < sizeof letters / sizeof letters[0]; i++)
        if (strlen(letters[i].letter) == n && memcmp(letters[i].letter, s, n) == 0)
            return *(const int *)((const char *)c + letters[i].offset);
    return -1;
}

int64_t tk_arch_eval(const char *expr, const tk_model_config *c)
{
    int64_t value = 1;
    char op = '*';
    for (const char *p = expr;;) {
        int64_t term;
        if (isdigit((unsigned char)*p)) {
            char *end;
            term = strtoll(p, &end, 10);
            p = end;
        } else if (isalpha((unsigned char)*p)) {
            const char *start = p;
            while (isalnum((unsigned char)*p)) p++;
            term = letter_value(start, (size_t)(p - start), c);
        } else {
            return -1;
        }
        if (term < 0 || (op == '/' && term == 0)) return -1;
        value = op == '*' ? value * term : value / term;
        if (*p == '\0') return value;
        if (*p != '*' && *p != '/') return -1;
        op = *p++;
    }
}

tk_shape tk_arch_shape(const tk_arch_tensor *t, const tk_model_config *c)
{
    tk_shape s = {0, {0}};
    for (int d = 0; d < TK_ARCH_MAX_DIMS && t->shape[d]; d++) s.dim[s.n_dims++] = tk_arch_eval(t->shape[d], c);
    return s;
}

/* Whether some layer's MLP is MoE (want_moe) / dense. */
static int some_layer_is(const tk_model_config *c, int want_moe)
{
    for (int l = 0; l < c->n_layers; l++)
        if (tk_model_layer_is_moe(c, l) == want_moe) return 1;
    return 0;
}

int tk_arch_used(const tk_arch_tensor *t, const tk_model_config *c, int layer)
{
    switch (t->when) {
    case TK_WHEN_ALWAYS: case TK_WHEN_OPTIONAL: return 1;
    case TK_WHEN_UNTIED: return !c->tied_embeddings;
    case TK_WHEN_QKV_BIAS: return c->qkv_bias != 0;
    case TK_WHEN_QK_NORM: return c->qk_norm != 0;
    case TK_WHEN_DENSE_MLP: return layer < 0 ? some_layer_is(c, 0) : !tk_model_layer_is_moe(c, layer);
    case TK_WHEN_MOE: return layer < 0 ? some_layer_is(c, 1) : tk_model_layer_is_moe(c, layer);
    default: return 0;
    }
}

int tk_arch_required(const tk_arch_tensor *t, const tk_model_config *c, int layer)
{
    return t->when != TK_WHEN_OPTIONAL && tk_arch_used(t, c, layer);
}

void tk_arch_lora_dims(const tk_arch *a, int target, const tk_model_config *c, int *in, int *out)
{
    const tk_arch_lora *l = tk_arch_lora_of(a, target);
    const tk_arch_tensor *t = l ? tk_arch_tensor_of(a, l->role) : NULL;
    tk_shape s = t ? tk_arch_shape(t, c) : (tk_shape){0, {0}};
    *in = s.n_dims >= 2 ? (int)s.dim[s.n_dims - 1] : 0;
    *out = s.n_dims >= 2 ? (int)s.dim[s.n_dims - 2] : 0;
}

/* ---- validation -------------------------------------------------------------------------------------------- */

/* number of "%d" in a pattern; -1 when it has any other conversion */
static int layer_slots(const char *pattern)
{
    int n = 0;
    for (const char *p = strchr(pattern, '%'); p; p = strchr(p + 2, '%')) {
        if (p[1] != 'd') return -1;
        n++;
    }
    return n;
}

/* Fused forms stack per-layer expert roles of one shape; their names have one %d (the layer). */
static tk_status validate_fused(const tk_arch *a)
{
    for (int j = 0; j < a->n_fused; j++) {
        const tk_arch_fused *f = &a->fused[j];
        if (!f->hf || layer_slots(f->hf) != 1 || f->n_roles < 1 || f->n_roles > TK_ARCH_MAX_FUSED)
            return tk_error(TK_ERR_INTERNAL, "architecture %s: fused form %d has a bad name or role count", a->name, j);
        for (int r = 0; r < f->n_roles; r++) {
            const tk_arch_tensor *t = tk_arch_tensor_of(a, (int)f->roles[r]);
            const tk_arch_tensor *t0 = tk_arch_tensor_of(a, (int)f->roles[0]);
            if (!t || !t->per_expert)
                return tk_error(TK_ERR_INTERNAL, "architecture %s: fused form %s holds a role without experts",
                                a->name, f->hf);
            for (int d = 0; d < TK_ARCH_MAX_DIMS; d++)
                if ((t->shape[d] == NULL) != (t0->shape[d] == NULL) || (t->shape[d] && strcmp(t->shape[d], t0->shape[d])))
                    return tk_error(TK_ERR_INTERNAL, "architecture %s: fused form %s stacks roles of different shapes",
                                    a->name, f->hf);
        }
    }
    return TK_OK;
}

/* A vision tower's tensors: distinct names, a %d exactly where the scope has an index, shapes of letters. */
static tk_status validate_vision(const tk_arch *a)
{
    if ((a->n_vision > 0) != ((a->flags & TK_ARCH_VISION) != 0))
        return tk_error(TK_ERR_INTERNAL, "architecture %s: vision tensors without the vision flag, or the reverse",
                        a->name);
    for (int j = 0; j < a->n_vision; j++) {
        const tk_arch_vision_tensor *v = &a->vision[j];
        if (!v->name || !v->hf || !v->gguf || !v->shape || !tk_vision_scope_name((int)v->scope) ||
            layer_slots(v->hf) != (v->scope != TK_VISION_MODEL) || layer_slots(v->gguf) != (v->scope != TK_VISION_MODEL))
            return tk_error(TK_ERR_INTERNAL, "architecture %s: vision tensor %d is malformed", a->name, j);
        if ((int)v->role < 0 || v->role >= TK_VROLE_COUNT)
            return tk_error(TK_ERR_INTERNAL, "architecture %s: vision tensor %s has a bad role", a->name, v->name);
        for (int k = 0; k < j; k++)
            if (strcmp(a->vision[k].name, v->name) == 0 || strcmp(a->vision[k].hf, v->hf) == 0 ||
                strcmp(a->vision[k].gguf, v->gguf) == 0 ||
                (a->vision[k].role == v->role && a->vision[k].scope == v->scope))
                return tk_error(TK_ERR_INTERNAL, "architecture %s: vision tensor %s is listed twice", a->name,
                                v->name);
        for (const char *p = v->shape; *p; p++)
            if (!isalnum((unsigned char)*p) && *p != '*' && *p != ',')
                return tk_error(TK_ERR_INTERNAL, "architecture %s: vision tensor %s has a bad shape '%s'", a->name,
                                v->name, v->shape);
    }
    return TK_OK;
}

tk_status tk_arch_validate(void)
{
    tk_model_config probe = {0}; /* every letter 2: an expression that parses is positive */
    probe.d_model = probe.n_heads = probe.n_kv_heads = probe.head_dim = probe.d_ff = probe.vocab_size = 2;
    probe.n_experts = probe.d_ff_expert = 2;
    for (int i = 0; i < COUNT(archs); i++) {
        const tk_arch *a = &archs[i];
        if (tk_arch_find(a->name) != a)
            return tk_error(TK_ERR_INTERNAL, "architecture %s is listed twice", a->name);
        for (int j = 0; j < a->n_tensors; j++) {
            const tk_arch_tensor *t = &a->tensors[j];
            const char *role = tk_role_name((int)t->role);
            if (!role || (int)t->when < 0 || t->when >= TK_WHEN_COUNT || tk_arch_tensor_of(a, (int)t->role) != t)
                return tk_error(TK_ERR_INTERNAL, "architecture %s: tensor %d has a bad or repeated role", a->name, j);
            if (!t->shape[0])
                return tk_error(TK_ERR_INTERNAL, "architecture %s: %s has no shape", a->name, role);
            for (int d = 0; d < TK_ARCH_MAX_DIMS && t->shape[d]; d++)
                if (tk_arch_eval(t->shape[d], &probe) <= 0)
                    return tk_error(TK_ERR_INTERNAL, "architecture %s: %s: shape expression '%s' does not parse",
                                    a->name, role, t->shape[d]);
            if (t->per_expert && (!t->per_layer || strcmp(t->shape[0], "E") != 0 || !t->shape[2]))
                return tk_error(TK_ERR_INTERNAL, "architecture %s: expert tensor %s must be per layer, [E, rows, cols]",
                                a->name, role);
            const char *names[2] = {t->gguf, t->hf};
            for (int k = 0; k < 2; k++) {
                int slots = t->per_layer + (k == 1 && t->per_expert); /* HF names an expert tensor per expert */
                if (names[k] && layer_slots(names[k]) != slots)
                    return tk_error(TK_ERR_INTERNAL, "architecture %s: %s: name '%s' must have %d %%d", a->name,
                                    role, names[k], slots);
            }
        }
        TK_TRY(validate_fused(a));
        TK_TRY(validate_vision(a));
        for (int j = 0; j < a->n_lora; j++) {
            const tk_arch_lora *l = &a->lora[j];
            const tk_arch_tensor *t = tk_arch_tensor_of(a, (int)l->role);
            int per_layer = l->target != TK_LORA_PER_LAYER;
            if (l->target < 0 || l->target > TK_LORA_PER_LAYER || tk_arch_lora_of(a, l->target) != l || !l->name ||
                (int)l->trained_by < 0 || l->trained_by >= TK_TRAIN_COUNT)
                return tk_error(TK_ERR_INTERNAL, "architecture %s: LoRA target %d is bad or repeated", a->name, j);
            if (!t || !t->shape[1] || t->per_layer != per_layer)
                return tk_error(TK_ERR_INTERNAL, "architecture %s: LoRA target %s must adapt a %s matrix it has",
                                a->name, l->name, per_layer ? "per-layer" : "model-wide");
            if ((l->a_per_expert || l->b_per_expert) && !t->per_expert)
                return tk_error(TK_ERR_INTERNAL, "architecture %s: LoRA target %s has per-expert factors on a tensor "
                                "without experts", a->name, l->name);
            if (!l->peft || layer_slots(l->peft) != per_layer)
                return tk_error(TK_ERR_INTERNAL, "architecture %s: LoRA target %s: bad PEFT module pattern", a->name,
                                l->name);
        }
    }
    return TK_OK;
}
