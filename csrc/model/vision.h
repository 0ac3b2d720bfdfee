/* vision.h - a vision-language model's vision tower (Qwen3-VL's ViT), forward only.
 *
 * Tinker adapts the language model only, so the tower runs once per image, before the language-model request
 * that uses its outputs: image features replacing the image tokens' embeddings and deepstack features added
 * after the first layers (mm.h). For an image of gh x gw patches (N = gh gw rows in 2x2 merge-block order, each
 * a C x Tp x P x P patch), D the tower's width, d = D / heads:
 *   1. x = patches . W_patch^T + b (the Conv3d whose stride is its kernel, as a matmul);
 *   2. x += the learned [side, side] position table, bilinearly resampled (corner-aligned) to the gh x gw grid;
 *   3. per block: x += proj(attention(rope(q), rope(k), v)) over LN1(x), bidirectional within the image, then
 *      x += fc2(act(fc1(LN2(x)))); LayerNorms with bias, eps 1e-6; the 2-D rotary angles of a patch at (row, col)
 *      are [row f_0 .. row f_{d/4-1}, col f_0 .. col f_{d/4-1}], f_i = theta^(-4 i / d) (rotate_half);
 *   4. after the blocks the config names, deepstack tap k = fc2(gelu(fc1(LN(4 rows side by side))));
 *   5. the merger: fc2(gelu(fc1(LN(x), 4 rows side by side))): the image's tokens [N / 4, O].
 * GELU in the mergers is the erf one; the blocks' activation is the config's.
 *
 * The tower is loaded on first use (a request of its own, after the model) and published on the model once
 * (tk_model's vision); its weights keep the file's F32 / F16 / BF16 storage like the language model's.
 */
#ifndef TK_VISION_H
#define TK_VISION_H

#include <stdint.h>

#include "../core/engine.h"
#include "mm.h"
#include "model.h"

typedef struct {
    int depth, d_model, d_ff, n_heads, in_channels, patch, temporal_patch, merge, out, grid_side;
    int n_deepstack;
    int deepstack_at[TK_MM_MAX_DEEPSTACK]; /* the block after which each tap is taken, in tap order */
    int act;                               /* enum tk_gelu of the blocks' MLP */
    float rope_theta, eps;
} tk_vision_config;

/* A vision tensor's bytes as the Python loader found them (the descriptor's vision table names them). */
typedef struct {
    const char *name;    /* the descriptor's name ("qkv", "merger_fc1", ...) */
    int index;           /* block or deepstack merger; -1 for model-wide */
    int file;
    uint64_t offset, nbytes;
    int type;            /* F32, F16 or BF16 (ggml ids) */
    int n_dims;
    int64_t shape[5];
} tk_vision_source;

/* Loads the tower of model m from the sources (checked against the config and the descriptor's shapes) and
 * publishes it on the model; a model's tower is loaded once (a second load request finds it there). */
tk_status tk_vision_load_request_create(tk_request **out, tk_model *m, const tk_vision_config *cfg,
                                        const char *const *paths, int n_paths, const tk_vision_source *src, int n_src);
/* The features of n_images images: pixels [N, C Tp P P] (their patches back to back), grids [n_images][3]
 * (1, gh, gw; N = sum gh gw). Needs the model's tower loaded (by an earlier request). */
tk_status tk_vision_request_create(tk_request **out, tk_model *m, const float *pixels, long n_values,
                                   const int32_t *grids, int n_images);
/* Once done and ok: [1 + n_deepstack, tokens, O] (the merger's rows, then each tap's), tokens = N / merge^2. */
const float *tk_vision_request_result(tk_request *req, int *tokens, int *blocks, int *width);

void tk_vision_free(struct tk_vision *v);

#endif
