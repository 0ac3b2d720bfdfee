/* backend.c - what is known of any backend's table (backend.h). */
#include "backend.h"

#include <stddef.h>
#include <string.h>

#define ENTRY(name) {#name, offsetof(tk_backend, name)}
const tk_backend_entry tk_backend_entries[] = {
    ENTRY(destroy), ENTRY(weight_bytes), ENTRY(weight_put_row), ENTRY(matmul_w), ENTRY(matmul_w_decode),
    ENTRY(matmul_w_t), ENTRY(matmul_w_grouped), ENTRY(matmul_w_t_grouped), ENTRY(matmul_nt), ENTRY(matmul_nt_decode),
    ENTRY(matmul_nt_many), ENTRY(matmul_nn), ENTRY(matmul_tn_acc), ENTRY(alloc), ENTRY(free), ENTRY(upload),
    ENTRY(download), ENTRY(copy_rows), ENTRY(sync), ENTRY(add_rows), ENTRY(scale_rows), ENTRY(row_dot),
    ENTRY(zero_rows), ENTRY(gather), ENTRY(scatter_add), ENTRY(sum_squares), ENTRY(adamw), ENTRY(adamw_peak),
    ENTRY(embed), ENTRY(rmsnorm), ENTRY(rmsnorm_backward), ENTRY(add_bias), ENTRY(rope_table), ENTRY(rope),
    ENTRY(swiglu), ENTRY(swiglu_backward), ENTRY(logsumexp), ENTRY(softmax_scale), ENTRY(layer_norm), ENTRY(gelu),
    ENTRY(attention_full), ENTRY(attention), ENTRY(attention_workspace), ENTRY(attention_backward),
    ENTRY(attention_backward_workspace), ENTRY(attention_decode), ENTRY(attention_decode_workspace),
    ENTRY(attention_cached), ENTRY(attention_cached_workspace),
};
#undef ENTRY
const int tk_backend_n_entries = (int)(sizeof tk_backend_entries / sizeof tk_backend_entries[0]);

/* Every entry is a function pointer; a NULL one is an op the backend does not have yet. */
const char *tk_backend_missing_op(const tk_backend *be)
{
    for (int i = 0; i < tk_backend_n_entries; i++) {
        void (*fn)(void);
        memcpy(&fn, (const char *)be + tk_backend_entries[i].offset, sizeof fn);
        if (!fn) return tk_backend_entries[i].name;
    }
    return NULL;
}
