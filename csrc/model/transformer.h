/* transformer.h - the forward pass over a batch of packed sequences. */
#ifndef TK_TRANSFORMER_H
#define TK_TRANSFORMER_H

#include "../backend/backend.h"
#include "model.h"

/* Sequences of different lengths packed back to back, without padding:
 * sequence s is tokens[seq_start[s] .. seq_start[s+1]). */
typedef struct {
    int n_seqs;
    int n_tokens;              /* T = seq_start[n_seqs] */
    const int32_t *tokens;     /* [T] */
    const int32_t *seq_start;  /* [n_seqs + 1] */
} tk_batch;

size_t tk_forward_workspace_floats(const tk_model *m, tk_backend *be, const tk_batch *batch);
/* logits[T, V] for every position; `work` holds tk_forward_workspace_floats. */
void tk_transformer_forward(float *logits, const tk_model *m, tk_backend *be, const tk_batch *batch, float *work);

#endif
