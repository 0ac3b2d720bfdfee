/* mm.h - a request's multimodal inputs: image features and the positions of its tokens.
 *
 * A vision-language model (Qwen3-VL) reads an image as a run of placeholder tokens whose embeddings the image
 * features replace; its language model also adds "deepstack" features to the hidden states at those tokens after
 * each of its first layers, and rotates by M-RoPE positions with three components (temporal, height, width) that
 * the image's grid gives. The vision tower runs before the request is made; this is what it hands the engine,
 * copied into the request so the caller's buffers may go away:
 *   - embeds [n_embeds, D] and, per token of the request's packed batch, embed_row[t]: -1 (the token's own
 *     embedding) or the row of embeds that replaces it;
 *   - deepstack [n_deepstack, n_embeds, D]: feature k of an image token (its embed_row) is added to its hidden
 *     state after decoder layer k;
 *   - pos [T, TK_MM_POS_DIMS]: each token's position components (NULL: counted as for text);
 *   - pos_delta [n_seqs]: what tokens generated after a prompt add to their count-based positions (M-RoPE's
 *     rope delta: the prompt's largest position + 1 - its length); NULL: 0.
 * Every field may be absent (NULL / 0): a text request has none.
 */
#ifndef TK_MM_H
#define TK_MM_H

#include <stddef.h>
#include <stdint.h>

#include "../core/status.h"

enum { TK_MM_POS_DIMS = 3, TK_MM_MAX_DEEPSTACK = 64 };

typedef struct {
    int n_embeds;
    float *embeds;       /* [n_embeds, D] host, or NULL */
    int32_t *embed_row;  /* [T] or NULL */
    int n_deepstack;
    float *deepstack;    /* [n_deepstack, n_embeds, D] host, or NULL */
    int32_t *pos;        /* [T, TK_MM_POS_DIMS] or NULL */
    int32_t *pos_delta;  /* [n_seqs] or NULL */
} tk_mm;

/* Checks src against a batch of n_tokens tokens in n_seqs sequences of a model of width d_model and n_layers
 * layers (rows in range, values finite, positions in [0, max_position], at most n_layers deepstack features)
 * and copies it into dst (freeing what dst held); `what` names the request in messages. */
tk_status tk_mm_copy(tk_mm *dst, const tk_mm *src, long n_tokens, int n_seqs, int d_model, int n_layers,
                     long max_position, const char *what);
void tk_mm_free(tk_mm *mm);
/* Whether two requests' inputs are the same (n_tokens tokens each; width d_model): prompts that share one
 * prefill must have the same features and positions too. */
int tk_mm_equal(const tk_mm *a, const tk_mm *b, long n_tokens, int d_model);

#endif
