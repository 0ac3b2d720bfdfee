/* mm.c - copying and checking a request's multimodal inputs (see mm.h). Owns the copies it makes. */
#include "mm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void tk_mm_free(tk_mm *mm)
{
    free(mm->embeds), free(mm->embed_row), free(mm->deepstack), free(mm->pos), free(mm->pos_delta);
    memset(mm, 0, sizeof *mm);
}

static tk_status check_finite(const float *x, size_t n, const char *what, const char *field)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return tk_error(TK_ERR_INVALID, "%s: %s value %zu is not finite", what, field, i);
    return TK_OK;
}

static tk_status check(const tk_mm *src, long n_tokens, int d_model, int n_layers, long max_position,
                       const char *what)
{
    if (src->n_embeds < 0 || (src->n_embeds > 0) != (src->embeds != NULL) || (src->embeds && !src->embed_row))
        return tk_error(TK_ERR_INVALID, "%s: embeds and embed_rows go together", what);
    if (src->n_deepstack < 0 || src->n_deepstack > n_layers || src->n_deepstack > TK_MM_MAX_DEEPSTACK ||
        (src->n_deepstack > 0) != (src->deepstack != NULL) || (src->deepstack && !src->embeds))
        return tk_error(TK_ERR_INVALID, "%s: %d deepstack features, but the model has %d layers (and deepstack "
                        "features need embeds)", what, src->n_deepstack, n_layers);
    for (long t = 0; src->embed_row && t < n_tokens; t++)
        if (src->embed_row[t] < -1 || src->embed_row[t] >= src->n_embeds)
            return tk_error(TK_ERR_INVALID, "%s: embed_rows[%ld] = %d, but there are %d embeddings (-1: the token's "
                            "own)", what, t, src->embed_row[t], src->n_embeds);
    size_t rows = (size_t)src->n_embeds * (size_t)d_model;
    TK_TRY(check_finite(src->embeds, src->embeds ? rows : 0, what, "embedding"));
    TK_TRY(check_finite(src->deepstack, src->deepstack ? rows * (size_t)src->n_deepstack : 0, what, "deepstack"));
    for (long i = 0; src->pos && i < n_tokens * TK_MM_POS_DIMS; i++)
        if (src->pos[i] < 0 || src->pos[i] > max_position)
            return tk_error(TK_ERR_INVALID, "%s: token %ld has position component %d, outside [0, %ld]", what,
                            i / TK_MM_POS_DIMS, src->pos[i], max_position);
    return TK_OK;
}

static void *copy_of(const void *src, size_t bytes)
{
    void *dst = malloc(bytes ? bytes : 1);
    if (dst && bytes) memcpy(dst, src, bytes);
    return dst;
}

tk_status tk_mm_copy(tk_mm *dst, const tk_mm *src, long n_tokens, int n_seqs, int d_model, int n_layers,
                     long max_position, const char *what)
{
    TK_TRY(check(src, n_tokens, d_model, n_layers, max_position, what));
    tk_mm out = {src->n_embeds, NULL, NULL, src->n_deepstack, NULL, NULL, NULL};
    size_t rows = (size_t)src->n_embeds * (size_t)d_model * sizeof(float);
    int ok = 1;
    if (src->embeds) ok &= (out.embeds = copy_of(src->embeds, rows)) != NULL;
    if (src->embed_row) ok &= (out.embed_row = copy_of(src->embed_row, (size_t)n_tokens * sizeof(int32_t))) != NULL;
    if (src->deepstack) ok &= (out.deepstack = copy_of(src->deepstack, rows * (size_t)src->n_deepstack)) != NULL;
    if (src->pos) ok &= (out.pos = copy_of(src->pos, (size_t)n_tokens * TK_MM_POS_DIMS * sizeof(int32_t))) != NULL;
    if (src->pos_delta) ok &= (out.pos_delta = copy_of(src->pos_delta, (size_t)n_seqs * sizeof(int32_t))) != NULL;
    if (!ok) {
        tk_mm_free(&out);
        return tk_error(TK_ERR_NOMEM, "%s: out of memory for the image features", what);
    }
    tk_mm_free(dst);
    *dst = out;
    return TK_OK;
}

/* both NULL, or both set and equal over n bytes */
static int same(const void *a, const void *b, size_t n)
{
    return (a == NULL) == (b == NULL) && (!a || memcmp(a, b, n) == 0);
}

int tk_mm_equal(const tk_mm *a, const tk_mm *b, long n_tokens, int d_model)
{
    size_t rows = (size_t)a->n_embeds * (size_t)d_model * sizeof(float);
    return a->n_embeds == b->n_embeds && a->n_deepstack == b->n_deepstack && same(a->embeds, b->embeds, rows) &&
           same(a->embed_row, b->embed_row, (size_t)n_tokens * sizeof(int32_t)) &&
           same(a->deepstack, b->deepstack, rows * (size_t)a->n_deepstack) &&
           same(a->pos, b->pos, (size_t)n_tokens * TK_MM_POS_DIMS * sizeof(int32_t)) &&
           same(a->pos_delta, b->pos_delta, sizeof(int32_t)); /* one sequence: a sample request's prompt */
}
