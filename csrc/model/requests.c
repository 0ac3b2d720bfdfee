/* requests.c - load and forward requests (see requests.h).
 *
 * Payloads own copies of everything they read, so the Python objects that
 * supplied the inputs can go away while the request waits in the queue, and
 * they hold a reference on the model they run against.
 */
#include "requests.h"

#include <stdlib.h>
#include <string.h>

#include "transformer.h"
#include "weights.h"

/* ---- load ---------------------------------------------------------------- */

typedef struct {
    tk_model_config cfg;
    char **paths;
    int n_paths;
    tk_tensor_source *src;
    int n_src;
    tk_model *model; /* result */
} load_payload;

static void load_free(void *p)
{
    load_payload *lp = p;
    if (!lp) return;
    for (int i = 0; lp->paths && i < lp->n_paths; i++) free(lp->paths[i]);
    for (int i = 0; lp->src && i < lp->n_src; i++) {
        free((char *)lp->src[i].name);
        free((char *)lp->src[i].role);
    }
    free(lp->paths);
    free(lp->src);
    tk_model_release(lp->model);
    free(lp);
}

static tk_status load_run(void *p, tk_exec *exec)
{
    load_payload *lp = p;
    return tk_weights_load(&lp->model, &lp->cfg, (const char *const *)lp->paths, lp->n_paths, lp->src, lp->n_src,
                           exec->pool);
}

static char *copy_string(const char *s) { return s ? strdup(s) : strdup(""); }

tk_status tk_load_request_create(tk_request **out, const tk_model_config *cfg, const char *const *paths,
                                 int n_paths, const tk_tensor_source *src, int n_src)
{
    *out = NULL;
    TK_TRY(tk_model_config_check(cfg));
    load_payload *lp = calloc(1, sizeof *lp);
    if (!lp) return tk_error(TK_ERR_NOMEM, "out of memory");
    lp->cfg = *cfg;
    lp->paths = calloc((size_t)(n_paths > 0 ? n_paths : 1), sizeof *lp->paths);
    lp->src = calloc((size_t)(n_src > 0 ? n_src : 1), sizeof *lp->src);
    int ok = lp->paths && lp->src;
    for (int i = 0; ok && i < n_paths; i++, lp->n_paths++) ok = (lp->paths[i] = copy_string(paths[i])) != NULL;
    for (int i = 0; ok && i < n_src; i++, lp->n_src++) {
        lp->src[i] = src[i];
        lp->src[i].name = copy_string(src[i].name);
        lp->src[i].role = copy_string(src[i].role);
        ok = lp->src[i].name && lp->src[i].role;
    }
    tk_request *req = ok ? tk_request_new(load_run, lp, load_free) : NULL;
    if (!req) {
        load_free(lp);
        return tk_error(TK_ERR_NOMEM, "out of memory");
    }
    *out = req;
    return TK_OK;
}

tk_model *tk_load_request_model(tk_request *req)
{
    load_payload *lp = tk_request_payload(req);
    if (!tk_request_done(req) || !lp->model) return NULL;
    tk_model_retain(lp->model);
    return lp->model;
}

/* ---- forward --------------------------------------------------------------- */

typedef struct {
    tk_model *model;
    int32_t *tokens;    /* [T] */
    int32_t *seq_start; /* [n_seqs + 1] */
    int n_seqs, n_tokens;
    float *logits;      /* [T, V] result */
} forward_payload;

static void forward_free(void *p)
{
    forward_payload *fp = p;
    if (!fp) return;
    tk_model_release(fp->model);
    free(fp->tokens);
    free(fp->seq_start);
    free(fp->logits);
    free(fp);
}

static tk_status forward_run(void *p, tk_exec *exec)
{
    forward_payload *fp = p;
    tk_batch batch = {fp->n_seqs, fp->n_tokens, fp->tokens, fp->seq_start};
    size_t V = (size_t)fp->model->cfg.vocab_size;
    size_t work_floats = tk_forward_workspace_floats(fp->model, exec->backend, &batch);
    float *work = malloc(work_floats * sizeof(float));
    fp->logits = malloc((size_t)fp->n_tokens * V * sizeof(float));
    if (!work || !fp->logits) {
        free(work);
        free(fp->logits);
        fp->logits = NULL;
        return tk_error(TK_ERR_NOMEM, "forward: cannot allocate %.1f MB for %d tokens",
                        (double)(work_floats + (size_t)fp->n_tokens * V) * sizeof(float) / 1e6, fp->n_tokens);
    }
    tk_transformer_forward(fp->logits, fp->model, exec->backend, &batch, work);
    free(work);
    return TK_OK;
}

static tk_status check_batch(const tk_model *m, const int32_t *tokens, long n_given, const int32_t *seq_lens,
                             int n_seqs, int *n_tokens)
{
    if (n_seqs < 1) return tk_error(TK_ERR_INVALID, "forward: no sequences given");
    long total = 0;
    for (int s = 0; s < n_seqs; s++) {
        if (seq_lens[s] > n_given - total)
            return tk_error(TK_ERR_INVALID, "forward: the sequence lengths add up to more than the %ld tokens given",
                            n_given);
        if (seq_lens[s] < 1) return tk_error(TK_ERR_INVALID, "forward: sequence %d is empty", s);
        if (seq_lens[s] > m->cfg.max_context)
            return tk_error(TK_ERR_INVALID, "forward: sequence %d has %d tokens, more than the model's context "
                            "length %d", s, seq_lens[s], m->cfg.max_context);
        for (int t = 0; t < seq_lens[s]; t++) {
            int32_t id = tokens[total + t];
            if (id < 0 || id >= m->cfg.vocab_size)
                return tk_error(TK_ERR_INVALID, "forward: sequence %d, position %d: token id %d is outside the "
                                "vocabulary [0, %d)", s, t, id, m->cfg.vocab_size);
        }
        total += seq_lens[s];
        if (total > (1L << 24)) return tk_error(TK_ERR_INVALID, "forward: more than %ld tokens in one batch", 1L << 24);
    }
    if (total != n_given)
        return tk_error(TK_ERR_INVALID, "forward: the sequence lengths add up to %ld, but %ld tokens were given",
                        total, n_given);
    *n_tokens = (int)total;
    return TK_OK;
}

tk_status tk_forward_request_create(tk_request **out, tk_model *m, const int32_t *tokens, long n_given,
                                    const int32_t *seq_lens, int n_seqs)
{
    *out = NULL;
    int n_tokens = 0;
    TK_TRY(check_batch(m, tokens, n_given, seq_lens, n_seqs, &n_tokens));
    forward_payload *fp = calloc(1, sizeof *fp);
    if (!fp) return tk_error(TK_ERR_NOMEM, "out of memory");
    fp->tokens = malloc((size_t)n_tokens * sizeof *fp->tokens);
    fp->seq_start = malloc(((size_t)n_seqs + 1) * sizeof *fp->seq_start);
    tk_request *req = fp->tokens && fp->seq_start ? tk_request_new(forward_run, fp, forward_free) : NULL;
    if (!req) {
        forward_free(fp);
        return tk_error(TK_ERR_NOMEM, "out of memory");
    }
    memcpy(fp->tokens, tokens, (size_t)n_tokens * sizeof *tokens);
    fp->seq_start[0] = 0;
    for (int s = 0; s < n_seqs; s++) fp->seq_start[s + 1] = fp->seq_start[s] + seq_lens[s];
    fp->n_seqs = n_seqs;
    fp->n_tokens = n_tokens;
    tk_model_retain(m);
    fp->model = m;
    *out = req;
    return TK_OK;
}

const float *tk_forward_request_logits(tk_request *req, int *rows, int *cols)
{
    forward_payload *fp = tk_request_payload(req);
    if (!tk_request_done(req) || !fp->logits) return NULL;
    *rows = fp->n_tokens;
    *cols = fp->model->cfg.vocab_size;
    return fp->logits;
}
