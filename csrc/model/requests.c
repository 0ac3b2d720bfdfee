/* requests.c - model and adapter requests (see requests.h).
 *
 * Payloads own copies of everything they read, so the Python objects that
 * supplied the inputs can go away while the request waits in the queue, and
 * they hold references on the model or adapter they run against. Working
 * memory comes from the engine's reusable scratch block (tk_exec_scratch).
 */
#include "requests.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "transformer.h"
#include "weights.h"

/* Training runs datums in groups whose stored activations fit in
 * TRAIN_STORE_BYTES, and of at most TRAIN_TOKEN_BUDGET tokens (a longer datum
 * runs alone): they take ~0.7 MB per token for SmolLM2 and ~1.8 MB for a
 * 1.1B model, so this bounds a step's memory whatever the batch and model.
 * Larger groups mean taller matmuls and fewer decodes of each base weight per
 * step (measured on SmolLM2 4 x 256: groups of 256 tokens spent 6% of the
 * step decoding weights); 512 MB keeps a 1.1B Q4_0 model's 4 x 128 step
 * under 2 GB (benchmarks/bench_memory.py). */
enum { TRAIN_TOKEN_BUDGET = 2048 };
#define TRAIN_STORE_BYTES ((size_t)512 << 20)

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
                           exec->pool, exec->backend);
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

/* ---- shared: a copied, checked batch of sequences ------------------------------ */

typedef struct {
    int32_t *tokens;    /* [T] */
    int32_t *seq_start; /* [n_seqs + 1] */
    int n_seqs, n_tokens;
} packed;

static void packed_free(packed *p)
{
    free(p->tokens);
    free(p->seq_start);
}

static tk_status pack_sequences(packed *out, const tk_model *m, const int32_t *tokens, long n_given,
                                const int32_t *seq_lens, int n_seqs, const char *what)
{
    memset(out, 0, sizeof *out);
    if (n_seqs < 1) return tk_error(TK_ERR_INVALID, "%s: no sequences given", what);
    long total = 0;
    for (int s = 0; s < n_seqs; s++) {
        if (seq_lens[s] > n_given - total)
            return tk_error(TK_ERR_INVALID, "%s: the sequence lengths add up to more than the %ld tokens given",
                            what, n_given);
        if (seq_lens[s] < 1) return tk_error(TK_ERR_INVALID, "%s: sequence %d is empty", what, s);
        if (seq_lens[s] > m->cfg.max_context)
            return tk_error(TK_ERR_INVALID, "%s: sequence %d has %d tokens, more than the model's context "
                            "length %d", what, s, seq_lens[s], m->cfg.max_context);
        for (int t = 0; t < seq_lens[s]; t++) {
            int32_t id = tokens[total + t];
            if (id < 0 || id >= m->cfg.vocab_size)
                return tk_error(TK_ERR_INVALID, "%s: sequence %d, position %d: token id %d is outside the "
                                "vocabulary [0, %d)", what, s, t, id, m->cfg.vocab_size);
        }
        total += seq_lens[s];
        if (total > (1L << 24)) return tk_error(TK_ERR_INVALID, "%s: more than %ld tokens in one batch", what,
                                                1L << 24);
    }
    if (total != n_given)
        return tk_error(TK_ERR_INVALID, "%s: the sequence lengths add up to %ld, but %ld tokens were given", what,
                        total, n_given);
    out->tokens = malloc((size_t)total * sizeof *out->tokens);
    out->seq_start = malloc(((size_t)n_seqs + 1) * sizeof *out->seq_start);
    if (!out->tokens || !out->seq_start) {
        packed_free(out);
        return tk_error(TK_ERR_NOMEM, "out of memory");
    }
    memcpy(out->tokens, tokens, (size_t)total * sizeof *tokens);
    out->seq_start[0] = 0;
    for (int s = 0; s < n_seqs; s++) out->seq_start[s + 1] = out->seq_start[s] + seq_lens[s];
    out->n_seqs = n_seqs;
    out->n_tokens = (int)total;
    return TK_OK;
}

/* ---- forward: logits ------------------------------------------------------------------ */

typedef struct {
    tk_model *model;
    tk_adapter **adapters; /* [n_seqs], entries NULL for the base model; a reference on each */
    packed batch;
    tk_mm mm;              /* image features and positions (mm.h), or none */
    float *logits;         /* [T, V] result */
} forward_payload;

static void forward_free(void *p)
{
    forward_payload *fp = p;
    if (!fp) return;
    for (int s = 0; fp->adapters && s < fp->batch.n_seqs; s++) tk_adapter_release(fp->adapters[s]);
    tk_model_release(fp->model);
    free(fp->adapters);
    packed_free(&fp->batch);
    tk_mm_free(&fp->mm);
    free(fp->logits);
    free(fp);
}

/* Floats of device scratch a request's image features take (embeds, then the deepstack blocks). */
static size_t mm_floats(const tk_mm *mm, int D)
{
    return (size_t)mm->n_embeds * (size_t)D * (size_t)(1 + mm->n_deepstack);
}

/* Uploads the image features to dst (mm_floats of device scratch) and points the batch, whose rows start at row
 * t0 of the request's tokens and sequences at sequence s0, at them and at its positions. */
static void place_mm(tk_batch *b, const tk_mm *mm, tk_backend *be, float *dst, int D, int t0, int s0)
{
    size_t n = (size_t)mm->n_embeds * (size_t)D;
    if (mm->embeds) {
        be->upload(be, dst, mm->embeds, n * sizeof(float));
        b->embeds = dst, b->embed_row = mm->embed_row + t0, b->n_embeds = mm->n_embeds;
    }
    if (mm->deepstack) {
        be->upload(be, dst + n, mm->deepstack, n * (size_t)mm->n_deepstack * sizeof(float));
        b->deepstack = dst + n, b->n_deepstack = mm->n_deepstack;
    }
    if (mm->pos) b->pos = mm->pos + (size_t)t0 * TK_MM_POS_DIMS;
    if (mm->pos_delta) b->pos_delta = mm->pos_delta + s0;
}

static tk_status forward_run(void *p, tk_exec *exec)
{
    forward_payload *fp = p;
    const tk_model *m = fp->model;
    tk_backend *be = exec->backend;
    tk_batch b = {.n_seqs = fp->batch.n_seqs, .n_tokens = fp->batch.n_tokens, .tokens = fp->batch.tokens,
                  .seq_start = fp->batch.seq_start, .adapters = (const tk_adapter *const *)fp->adapters};
    size_t T = (size_t)b.n_tokens, D = (size_t)m->cfg.d_model, V = (size_t)m->cfg.vocab_size;
    size_t n_mm = mm_floats(&fp->mm, (int)D);
    tk_workspace ws = tk_transformer_workspace(m, be, &b, 0);
    for (int s = 0; s < b.n_seqs; s++) ws = tk_workspace_max(ws, tk_head_workspace(m, fp->adapters[s]));
    /* the logits are the result, in host memory: computed straight into it when that is the device's
     * memory, else STAGE_ROWS at a time into the scratch and downloaded */
    enum { STAGE_ROWS = 256 };
    size_t staging = be->host_memory ? 0 : (size_t)STAGE_ROWS * V;
    float *work = tk_exec_scratch(exec, T * D + n_mm + staging + ws.dev), *host = tk_exec_host_scratch(exec, ws.host);
    fp->logits = malloc(T * V * sizeof(float));
    if (!work || !host || !fp->logits)
        return tk_error(TK_ERR_NOMEM, "forward: cannot allocate memory for %d tokens", b.n_tokens);
    float *h = work, *mm = h + T * D, *stage = mm + n_mm, *rest = stage + staging;
    place_mm(&b, &fp->mm, be, mm, (int)D, 0, 0); /* image features go to the device first */
    tk_transformer_forward(h, m, be, &b, NULL, rest, host);
    for (int s0 = 0; s0 < b.n_seqs;) { /* the head, per run of sequences with one adapter */
        int s1 = s0 + 1;
        while (s1 < b.n_seqs && fp->adapters[s1] == fp->adapters[s0]) s1++;
        int r1 = b.seq_start[s1], step = be->host_memory ? r1 : STAGE_ROWS;
        for (int r0 = b.seq_start[s0]; r0 < r1; r0 += step) {
            int rows = r1 - r0 < step ? r1 - r0 : step;
            float *out = fp->logits + (size_t)r0 * V;
            tk_head_logits(be->host_memory ? out : stage, m, fp->adapters[s0], be, h + (size_t)r0 * D, rows, rest);
            if (!be->host_memory) be->download(be, out, stage, (size_t)rows * V * sizeof(float));
        }
        s0 = s1;
    }
    return be->sync(be);
}

tk_status tk_forward_request_create(tk_request **out, tk_model *m, tk_adapter *const *adapters, int per_sequence,
                                    const int32_t *tokens, long n_tokens, const int32_t *seq_lens, int n_seqs)
{
    *out = NULL;
    for (int s = 0; s < (per_sequence ? n_seqs : 1); s++)
        if (adapters && adapters[s] && adapters[s]->model != m)
            return tk_error(TK_ERR_INVALID, "forward: the adapter belongs to another model");
    forward_payload *fp = calloc(1, sizeof *fp);
    if (!fp) return tk_error(TK_ERR_NOMEM, "out of memory");
    tk_status s = pack_sequences(&fp->batch, m, tokens, n_tokens, seq_lens, n_seqs, "forward");
    if (s == TK_OK && !(fp->adapters = calloc((size_t)n_seqs, sizeof *fp->adapters)))
        s = tk_error(TK_ERR_NOMEM, "out of memory");
    tk_request *req = s == TK_OK ? tk_request_new(forward_run, fp, forward_free) : NULL;
    if (!req) {
        forward_free(fp);
        return s != TK_OK ? s : tk_error(TK_ERR_NOMEM, "out of memory");
    }
    tk_model_retain(m);
    fp->model = m;
    for (int q = 0; q < n_seqs; q++) {
        fp->adapters[q] = adapters ? adapters[per_sequence ? q : 0] : NULL;
        if (fp->adapters[q]) tk_adapter_retain(fp->adapters[q]);
    }
    *out = req;
    return TK_OK;
}

/* The largest position component a request may give (M-RoPE's positions stay below the token count; this only
 * keeps float32 angles meaningful). */
#define MAX_POSITION (1L << 24)

tk_status tk_forward_request_set_mm(tk_request *req, const tk_mm *mm)
{
    forward_payload *fp = tk_request_payload(req);
    const tk_model_config *c = &fp->model->cfg;
    return tk_mm_copy(&fp->mm, mm, fp->batch.n_tokens, fp->batch.n_seqs, c->d_model, c->n_layers, MAX_POSITION,
                      "forward");
}

tk_status tk_forward_request_set_embeds(tk_request *req, const float *embeds, int n_embeds, const int32_t *embed_row,
                                        long n_rows)
{
    forward_payload *fp = tk_request_payload(req);
    if (n_rows != fp->batch.n_tokens)
        return tk_error(TK_ERR_INVALID, "forward: embed_rows has %ld entries for %d tokens", n_rows, fp->batch.n_tokens);
    tk_mm mm = {n_embeds, (float *)embeds, (int32_t *)embed_row, 0, NULL, NULL, NULL};
    return tk_forward_request_set_mm(req, &mm);
}

const float *tk_forward_request_logits(tk_request *req, int *rows, int *cols)
{
    forward_payload *fp = tk_request_payload(req);
    if (!tk_request_done(req) || !fp->logits) return NULL;
    *rows = fp->batch.n_tokens;
    *cols = fp->model->cfg.vocab_size;
    return fp->logits;
}

/* ---- forward / forward_backward with a loss ------------------------------------------ */

typedef struct {
    tk_adapter *adapter;
    packed batch;
    int32_t *tgt_start;  /* [T + 1] */
    int32_t *targets;    /* [E] */
    float *arrays[6];    /* weights, advantages, sampler_lp, clip_low, clip_high, ratio_mask: [E] or NULL */
    float *seq_log_ratio; /* [E] gspo scratch */
    long n_targets;
    tk_loss_config loss;
    int backward;
    tk_mm mm;            /* image features and positions (mm.h), or none */
    float *logprobs;     /* [E] result */
    double loss_sum;     /* result */
    int pass_requests;   /* result: the requests its pass ran (1: alone; more: a pass shared with other clients) */
    int64_t *expert_tokens; /* [n_moe_layers, experts] result: tokens routed to each expert, or NULL (dense) */
    int n_moe_layers;
} train_payload;

enum { ARR_WEIGHTS, ARR_ADVANTAGES, ARR_SAMPLER_LP, ARR_CLIP_LOW, ARR_CLIP_HIGH, ARR_RATIO_MASK, ARR_COUNT };
static const char *const array_names[ARR_COUNT] = {"weights", "advantages", "logprobs", "clip_low_threshold",
                                                    "clip_high_threshold", "sequence_ratio_mask"};

static void train_free(void *p)
{
    train_payload *tp = p;
    if (!tp) return;
    tk_adapter_release(tp->adapter);
    packed_free(&tp->batch);
    free(tp->tgt_start);
    free(tp->targets);
    for (int a = 0; a < ARR_COUNT; a++) free(tp->arrays[a]);
    free(tp->logprobs);
    free(tp->seq_log_ratio);
    free(tp->expert_tokens);
    tk_mm_free(&tp->mm);
    free(tp);
}

/* The head and loss of datums [first, last) of tp, whose final hidden states are h [T, D] (and dh [T, D] their
 * gradient, when training), into tp's logprobs and loss_sum. */
static void group_head(train_payload *tp, tk_backend *be, int first, int last, const float *h, float *dh,
                       float *work, float *host)
{
    tk_adapter *ad = tp->adapter;
    const tk_model *m = ad->model;
    int t0 = tp->batch.seq_start[first], T = tp->batch.seq_start[last] - t0, n_seqs = last - first;
    /* per-target arrays of this group start at the group's first target */
    long e0 = tp->tgt_start[t0];
    int32_t local_start[T + 1];
    for (int t = 0; t <= T; t++) local_start[t] = tp->tgt_start[t0 + t] - (int32_t)e0;
    int32_t seq_tgt[n_seqs + 1];
    for (int s = 0; s <= n_seqs; s++) seq_tgt[s] = local_start[tp->batch.seq_start[first + s] - t0];
    tk_loss_inputs in = {local_start, tp->targets + e0, NULL, NULL, NULL, NULL, NULL, NULL, seq_tgt, n_seqs,
                         tp->seq_log_ratio ? tp->seq_log_ratio + e0 : NULL};
    const float **fields[ARR_COUNT] = {&in.weights, &in.advantages, &in.sampler_lp, &in.clip_low, &in.clip_high,
                                       &in.ratio_mask};
    for (int a = 0; a < ARR_COUNT; a++) *fields[a] = tp->arrays[a] ? tp->arrays[a] + e0 : NULL;
    double loss = 0;
    tk_head_loss(tp->logprobs + e0, &loss, m, ad, be, h, T, &tp->loss, &in, tp->backward ? dh : NULL, work, host);
    tp->loss_sum += loss;
}

/* Datums [first, last) of one request: a pass is made of one or more of these (several when requests of
 * different clients share it). */
typedef struct {
    train_payload *tp;
    int first, last;
} pass_part;

/* One forward (and, training, backward) pass over parts[0..n) packed back to back: the base weights are read once
 * for all of them, each sequence runs under its request's adapter, each part's head and loss use its request's
 * inputs, and the gradients go to each sequence's adapter. Image inputs and expert counts are a request's own, so
 * only a pass of one part carries them. All parts are forward, or all forward_backward. */
static tk_status run_pass(const pass_part *parts, int n, tk_exec *exec)
{
    const tk_model *m = parts[0].tp->adapter->model;
    tk_backend *be = exec->backend;
    int backward = parts[0].tp->backward, n_seqs = 0, T = 0;
    for (int i = 0; i < n; i++) {
        const packed *pk = &parts[i].tp->batch;
        n_seqs += parts[i].last - parts[i].first;
        T += pk->seq_start[parts[i].last] - pk->seq_start[parts[i].first];
    }
    /* the pass's geometry on the heap: one datum may be long (its own group past the token budget) */
    const tk_adapter **adapters = malloc((size_t)n_seqs * sizeof *adapters);
    int32_t *tokens = malloc(((size_t)T + n_seqs + 1) * sizeof *tokens), *seq_start = tokens + T;
    if (!adapters || !tokens) {
        free(adapters), free(tokens);
        return tk_error(TK_ERR_NOMEM, "forward_backward: out of memory");
    }
    seq_start[0] = 0;
    for (int i = 0, q = 0, t = 0; i < n; i++) {
        const packed *pk = &parts[i].tp->batch;
        int t0 = pk->seq_start[parts[i].first], len = pk->seq_start[parts[i].last] - t0;
        memcpy(tokens + t, pk->tokens + t0, (size_t)len * sizeof *tokens);
        for (int s = parts[i].first; s < parts[i].last; s++, q++)
            seq_start[q + 1] = t + pk->seq_start[s + 1] - t0, adapters[q] = parts[i].tp->adapter;
        t += len;
    }
    const train_payload *only = n == 1 ? parts[0].tp : NULL;
    tk_batch b = {.n_seqs = n_seqs, .n_tokens = T, .tokens = tokens, .seq_start = seq_start, .adapters = adapters,
                  .expert_tokens = only ? only->expert_tokens : NULL};

    int R = tk_batch_max_rank(&b);
    size_t D = (size_t)m->cfg.d_model;
    size_t store_floats = backward ? tk_activation_floats(m, T, R) : 0;
    size_t n_mm = only ? mm_floats(&only->mm, (int)D) : 0;
    tk_workspace ws = tk_transformer_workspace(m, be, &b, backward);
    for (int i = 0; i < n; i++) ws = tk_workspace_max(ws, tk_head_workspace(m, parts[i].tp->adapter));
    float *work = tk_exec_scratch(exec, 2 * (size_t)T * D + n_mm + store_floats + ws.dev);
    float *host = work ? tk_exec_host_scratch(exec, ws.host) : NULL;
    if (!work || !host) {
        free(adapters), free(tokens);
        return tk_error_prefix(TK_ERR_NOMEM, "forward_backward: ");
    }
    float *h = work, *dh = h + (size_t)T * D, *mm = dh + (size_t)T * D, *store_mem = mm + n_mm;
    float *rest = store_mem + store_floats;
    if (only) /* the whole request's features: the rows index them */
        place_mm(&b, &only->mm, be, mm, (int)D, only->batch.seq_start[parts[0].first], parts[0].first);

    tk_layer_acts layers[m->cfg.n_layers];
    tk_activations store;
    if (backward) tk_activations_carve(&store, layers, store_mem, m, T, R);
    tk_transformer_forward(h, m, be, &b, backward ? &store : NULL, rest, host);
    int trains_layers = 0;
    for (int i = 0, t = 0; i < n; i++) {
        train_payload *tp = parts[i].tp;
        group_head(tp, be, parts[i].first, parts[i].last, h + (size_t)t * D, dh + (size_t)t * D, rest, host);
        t += tp->batch.seq_start[parts[i].last] - tp->batch.seq_start[parts[i].first];
        trains_layers |= tp->adapter->cfg.train_attn || tp->adapter->cfg.train_mlp;
    }
    if (backward && trains_layers) tk_transformer_backward(m, be, &b, &store, dh, rest, host);
    free(adapters), free(tokens);
    return TK_OK;
}

/* Tokens per group: the store's floats grow linearly with the tokens (measured at 1024, past the padding). */
static int group_tokens(const train_payload *tp)
{
    if (!tp->backward) return TRAIN_TOKEN_BUDGET;
    size_t per_token = tk_activation_floats(tp->adapter->model, 1024, tp->adapter->cfg.rank) * sizeof(float) / 1024;
    size_t tokens = TRAIN_STORE_BYTES / (per_token ? per_token : 1);
    return tokens < TRAIN_TOKEN_BUDGET ? (int)tokens : TRAIN_TOKEN_BUDGET;
}

static tk_status train_groups(train_payload *tp, tk_exec *exec)
{
    int budget = group_tokens(tp);
    tp->loss_sum = 0;
    if (tp->expert_tokens)
        memset(tp->expert_tokens, 0, (size_t)tp->n_moe_layers * tp->adapter->model->cfg.n_experts * sizeof(int64_t));
    for (int first = 0; first < tp->batch.n_seqs;) {
        int last = first + 1;
        while (last < tp->batch.n_seqs && tp->batch.seq_start[last + 1] - tp->batch.seq_start[first] <= budget)
            last++;
        TK_TRY(run_pass(&(pass_part){tp, first, last}, 1, exec));
        first = last;
    }
    return TK_OK;
}

static int loss_uses(int kind, int array);

/* ", largest |weights| 3e+38, largest |logprobs| 1e+30": the loss inputs that can overflow float32 arithmetic. */
static void describe_loss_inputs(char *out, size_t size, const train_payload *tp)
{
    size_t used = 0;
    out[0] = 0;
    for (int a = 0; a < ARR_COUNT && used < size; a++) {
        if (!tp->arrays[a] || !loss_uses(tp->loss.kind, a) || a == ARR_RATIO_MASK) continue;
        float peak = 0;
        for (long e = 0; e < tp->n_targets; e++)
            if (fabsf(tp->arrays[a][e]) > peak) peak = fabsf(tp->arrays[a][e]);
        int w = snprintf(out + used, size - used, ", largest |%s| %g", array_names[a], (double)peak);
        if (w > 0) used += (size_t)w;
    }
}

/* AdamW squares each gradient in float32 (its second moment), so a gradient past sqrt(FLT_MAX) ~ 1.8e19 would
 * make the moment infinite and every later step NaN; the accumulated gradients' norm is kept below this. */
#define GRADIENT_NORM_LIMIT 1e18

/* A pass whose loss or gradients come out non-finite, or too large for AdamW, is refused: its gradients would
 * poison the adapter at the next optim_step (and every forward after it). The caller puts the accumulated
 * gradients back as they were. */
static tk_status check_finite_pass(const train_payload *tp, tk_backend *be, const char *what)
{
    tk_adapter *ad = tp->adapter;
    double grad_norm = tp->backward ? sqrt(be->sum_squares(be, ad->block + ad->n_params, ad->n_params)) : 0;
    char problem[96];
    if (!isfinite(tp->loss_sum)) snprintf(problem, sizeof problem, "the loss is %g", tp->loss_sum);
    else if (!isfinite(grad_norm)) snprintf(problem, sizeof problem, "the gradients are not finite");
    else if (grad_norm > GRADIENT_NORM_LIMIT)
        snprintf(problem, sizeof problem, "the accumulated gradients' norm is %g, past the %g AdamW can square in "
                 "float32", grad_norm, GRADIENT_NORM_LIMIT);
    else return TK_OK;
    char inputs[160];
    describe_loss_inputs(inputs, sizeof inputs, tp);
    return tk_error(TK_ERR_INVALID,
                    "%s: %s (loss %g%s): float32 arithmetic overflowed, so nothing was applied%s. Scale the "
                    "loss_fn_inputs down to ordinary magnitudes",
                    what, problem, tp->loss_sum, inputs,
                    tp->backward ? " and the adapter's accumulated gradients are unchanged" : "");
}

/* The gradients an adapter has accumulated before a forward_backward pass (which adds to them), kept to be put
 * back when the pass fails: a copy, or none when they are all zero (the common case, right after optim_step:
 * the copy would cost 4 bytes per LoRA parameter, 2 GB for rank 32 on Qwen3-30B-A3B's experts). */
typedef struct {
    float *copy;
    int was_zero;
} grads_backup;

static tk_status backup_grads(grads_backup *b, const tk_adapter *ad, tk_backend *be)
{
    b->was_zero = ad->grads_zero;
    b->copy = NULL;
    if (b->was_zero) return TK_OK;
    size_t bytes = ad->n_params * sizeof(float);
    if (!(b->copy = malloc(bytes ? bytes : 1))) return tk_error(TK_ERR_NOMEM, "forward_backward: out of memory");
    be->download(be, b->copy, ad->block + ad->n_params, bytes);
    return TK_OK;
}

/* After the pass: restores the gradients (failed) or marks them as accumulated (applied); frees the copy. */
static void settle_grads(grads_backup *b, tk_adapter *ad, tk_backend *be, int failed)
{
    float *grads = ad->block + ad->n_params;
    if (failed && b->was_zero) {
        enum { ROW = 1 << 16 }; /* zeroed as rows, whose count fits an int for any adapter */
        size_t rows = ad->n_params / ROW, tail = ad->n_params % ROW;
        if (rows) be->zero_rows(be, grads, ROW, (int)rows, ROW);
        if (tail) be->zero_rows(be, grads + rows * ROW, (int)tail, 1, (int)tail);
    } else if (failed) {
        be->upload(be, grads, b->copy, ad->n_params * sizeof(float));
    }
    ad->grads_zero = failed ? b->was_zero : 0;
    free(b->copy);
    b->copy = NULL;
}

static tk_status train_run(void *p, tk_exec *exec)
{
    train_payload *tp = p;
    tk_backend *be = exec->backend;
    grads_backup backup = {0};
    if (tp->backward) TK_TRY(backup_grads(&backup, tp->adapter, be));
    tk_status s = train_groups(tp, exec);
    if (s == TK_OK) s = tk_exec_device_ok(exec); /* a device's failure in the pass: the gradients are restored */
    if (s == TK_OK) s = check_finite_pass(tp, be, tp->backward ? "forward_backward" : "forward");
    if (tp->backward) settle_grads(&backup, tp->adapter, be, s != TK_OK);
    return s;
}

/* ---- several training clients' requests in one pass (issue: many adapters, one pass) ---------------- */

/* Whether tp may share a pass: it runs whole in one group, on a model without experts (an MoE request's routing
 * counts are its own metrics) and without image inputs (their features and positions are the request's). */
static int shareable(const train_payload *tp)
{
    return tp->batch.n_tokens <= group_tokens(tp) && !tp->expert_tokens && !tp->mm.embed_row && !tp->mm.pos &&
           !tp->mm.pos_delta;
}

/* The distinct adapters of tps[0..n) into ads; returns how many. */
static int distinct_adapters(train_payload **tps, int n, tk_adapter **ads)
{
    int k = 0;
    for (int i = 0; i < n; i++) {
        int seen = 0;
        for (int j = 0; j < k && !seen; j++) seen = ads[j] == tps[i]->adapter;
        if (!seen) ads[k++] = tps[i]->adapter;
    }
    return k;
}

/* One pass over the requests tps[0..n) (each whole in one group, all forward or all forward_backward, of any
 * adapters of one model). Returns nonzero when a request's loss or an adapter's gradients came out non-finite
 * (nothing is then applied: the caller runs them one by one). */
static int shared_pass(train_payload **tps, int n, tk_exec *exec, tk_adapter **ads, int n_ads, tk_status *status)
{
    pass_part parts[n];
    for (int i = 0; i < n; i++) {
        parts[i] = (pass_part){tps[i], 0, tps[i]->batch.n_seqs};
        tps[i]->loss_sum = 0;
        tps[i]->pass_requests = n;
    }
    if ((*status = run_pass(parts, n, exec)) != TK_OK || (*status = tk_exec_device_ok(exec)) != TK_OK) return 0;
    /* the checks of check_finite_pass, per request and per adapter */
    int bad = 0;
    for (int i = 0; i < n; i++) bad |= !isfinite(tps[i]->loss_sum);
    for (int a = 0; tps[0]->backward && a < n_ads; a++) {
        double norm = sqrt(exec->backend->sum_squares(exec->backend, ads[a]->block + ads[a]->n_params,
                                                      ads[a]->n_params));
        bad |= !(norm <= GRADIENT_NORM_LIMIT);
    }
    return bad;
}

/* Whether ad is the adapter of one of tps[0..n). */
static int adapter_among(train_payload **tps, int n, const tk_adapter *ad)
{
    for (int i = 0; i < n; i++)
        if (tps[i]->adapter == ad) return 1;
    return 0;
}

/* Runs the engine's batch of training requests (forward / forward_backward of any clients on one model, in
 * submission order): consecutive requests of different adapters that fit one group together share a pass; the
 * others run as before. Two requests of one client never share a pass, so a client's results are the same
 * whether it submits its calls at once or one by one (its gradients summed pass by pass, as alone). */
static tk_status train_batch(void **payloads, int n, tk_exec *exec)
{
    train_payload **tps = (train_payload **)payloads;
    tk_backend *be = exec->backend;
    for (int first = 0; first < n;) {
        int last = first + 1, tokens = tps[first]->batch.n_tokens;
        if (shareable(tps[first]))
            while (last < n && tps[last]->backward == tps[first]->backward && shareable(tps[last]) &&
                   !adapter_among(tps + first, last - first, tps[last]->adapter) &&
                   tokens + tps[last]->batch.n_tokens <= group_tokens(tps[last]) &&
                   tokens + tps[last]->batch.n_tokens <= group_tokens(tps[first]))
                tokens += tps[last++]->batch.n_tokens;
        int k = last - first, shared_ok = 0;
        if (k > 1) {
            tk_adapter *ads[k];
            grads_backup saved[k];
            int n_ads = distinct_adapters(tps + first, k, ads), backward = tps[first]->backward, have = 0;
            /* the gradients accumulated so far, restored when the shared pass fails a check */
            while (have < n_ads && (!backward || backup_grads(&saved[have], ads[have], be) == TK_OK)) have++;
            tk_status s = TK_ERR_NOMEM;
            if (have == n_ads && !shared_pass(tps + first, k, exec, ads, n_ads, &s) && s == TK_OK) shared_ok = 1;
            for (int a = 0; backward && a < have; a++) settle_grads(&saved[a], ads[a], be, !shared_ok);
        }
        for (int i = first; !shared_ok && i < last; i++) { /* alone, each with its own checks and error */
            tps[i]->pass_requests = 1;
            tk_status s = train_run(tps[i], exec);
            if (s != TK_OK) tk_exec_finish(exec, tps[i], s);
        }
        first = last;
    }
    return TK_OK;
}

static int loss_uses(int kind, int array)
{
    if (array == ARR_WEIGHTS) return kind == TK_LOSS_CROSS_ENTROPY;
    if (array == ARR_ADVANTAGES || array == ARR_SAMPLER_LP) return kind != TK_LOSS_CROSS_ENTROPY;
    if (array == ARR_RATIO_MASK) return kind == TK_LOSS_GSPO;
    return kind == TK_LOSS_PPO || kind == TK_LOSS_CISPO || kind == TK_LOSS_GSPO; /* clip overrides */
}

static const char *const loss_names[TK_LOSS_COUNT] = {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro",
                                                      "gspo", "stable_reinforce"};

/* gspo: every datum's sequence ratio needs at least one target marked by sequence_ratio_mask. */
static tk_status check_ratio_mask(const tk_train_batch *tb)
{
    if (!tb->ratio_mask) return tk_error(TK_ERR_INVALID, "gspo needs loss_fn_inputs 'sequence_ratio_mask'");
    long e = 0;
    for (int i = 0; i < tb->n_seqs; i++) {
        long n = (long)tb->seq_lens[i] * tb->k_per_datum[i], marked = 0;
        for (long j = 0; j < n; j++) marked += tb->ratio_mask[e + j] != 0.0f;
        if (!marked)
            return tk_error(TK_ERR_INVALID, "datum %d: sequence_ratio_mask marks no target, so gspo has no sequence "
                            "ratio for it (mark the sampled tokens with 1)", i);
        e += n;
    }
    return TK_OK;
}

/* Checks the targets and the arrays the loss needs, naming the datum, field and position. */
static tk_status check_targets(const tk_model *m, const tk_train_batch *tb, const tk_loss_config *loss)
{
    long e = 0;
    for (int i = 0; i < tb->n_seqs; i++) {
        int K = tb->k_per_datum[i];
        if (K < 1) return tk_error(TK_ERR_INVALID, "datum %d: target_tokens has %d columns; it needs at least 1", i, K);
        long n = (long)tb->seq_lens[i] * K;
        if (n > tb->n_targets - e) return tk_error(TK_ERR_INVALID, "the batch has fewer targets than its shapes say");
        for (long j = 0; j < n; j++) {
            int32_t id = tb->targets[e + j];
            if (id < 0 || id >= m->cfg.vocab_size)
                return tk_error(TK_ERR_INVALID, "datum %d: target_tokens[%ld] = %d is outside the vocabulary [0, %d)",
                                i, j / K, id, m->cfg.vocab_size);
        }
        const float *arrays[ARR_COUNT] = {tb->weights, tb->advantages, tb->sampler_lp, tb->clip_low, tb->clip_high,
                                          tb->ratio_mask};
        for (int a = 0; a < ARR_COUNT; a++) {
            if (!arrays[a] || !loss_uses(loss->kind, a)) continue;
            for (long j = 0; j < n; j++)
                if (!isfinite(arrays[a][e + j]))
                    return tk_error(TK_ERR_INVALID, "datum %d: %s[%ld] is %g; %s must be finite", i, array_names[a],
                                    j / K, (double)arrays[a][e + j], array_names[a]);
        }
        e += n;
    }
    if (e != tb->n_targets)
        return tk_error(TK_ERR_INVALID, "the batch has %ld targets, but its shapes say %ld", tb->n_targets, e);
    if (loss->kind == TK_LOSS_CROSS_ENTROPY && !tb->weights)
        return tk_error(TK_ERR_INVALID, "cross_entropy needs loss_fn_inputs 'weights'");
    if (loss->kind != TK_LOSS_CROSS_ENTROPY && (!tb->advantages || !tb->sampler_lp))
        return tk_error(TK_ERR_INVALID, "%s needs loss_fn_inputs 'advantages' and 'logprobs'", loss_names[loss->kind]);
    return loss->kind == TK_LOSS_GSPO ? check_ratio_mask(tb) : TK_OK;
}

static float *copy_floats(const float *src, long n)
{
    float *dst = malloc((size_t)(n > 0 ? n : 1) * sizeof *dst);
    if (dst && n > 0) memcpy(dst, src, (size_t)n * sizeof *dst);
    return dst;
}

tk_status tk_train_request_create(tk_request **out, tk_adapter *ad, const tk_train_batch *tb,
                                  const tk_loss_config *loss, int backward)
{
    *out = NULL;
    const char *what = backward ? "forward_backward" : "forward";
    if (ad->frozen) return tk_error(TK_ERR_INVALID, "%s: this adapter is a frozen snapshot for sampling", what);
    if (loss->kind < 0 || loss->kind >= TK_LOSS_COUNT) return tk_error(TK_ERR_INVALID, "unknown loss %d", loss->kind);
    if (!isfinite(loss->clip_low) || !isfinite(loss->clip_high) || !isfinite(loss->beta))
        return tk_error(TK_ERR_INVALID, "%s: loss_fn_config values must be finite", what);
    train_payload *tp = calloc(1, sizeof *tp);
    if (!tp) return tk_error(TK_ERR_NOMEM, "out of memory");
    tk_status s = pack_sequences(&tp->batch, ad->model, tb->tokens, tb->n_tokens, tb->seq_lens, tb->n_seqs, what);
    if (s == TK_OK) s = check_targets(ad->model, tb, loss);
    if (s == TK_OK) {
        tp->tgt_start = malloc(((size_t)tp->batch.n_tokens + 1) * sizeof *tp->tgt_start);
        tp->targets = malloc((size_t)(tb->n_targets > 0 ? tb->n_targets : 1) * sizeof *tp->targets);
        tp->logprobs = calloc((size_t)(tb->n_targets > 0 ? tb->n_targets : 1), sizeof *tp->logprobs);
        const float *arrays[ARR_COUNT] = {tb->weights, tb->advantages, tb->sampler_lp, tb->clip_low, tb->clip_high,
                                          tb->ratio_mask};
        int ok = tp->tgt_start && tp->targets && tp->logprobs;
        const tk_model_config *c = &ad->model->cfg;
        for (int l = 0; l < c->n_layers; l++) tp->n_moe_layers += tk_model_layer_is_moe(c, l);
        if (ok && tp->n_moe_layers)
            ok = (tp->expert_tokens = calloc((size_t)tp->n_moe_layers * c->n_experts, sizeof(int64_t))) != NULL;
        if (ok && loss->kind == TK_LOSS_GSPO)
            ok = (tp->seq_log_ratio = malloc((size_t)(tb->n_targets > 0 ? tb->n_targets : 1) * sizeof(float))) != NULL;
        for (int a = 0; ok && a < ARR_COUNT; a++)
            if (arrays[a] && loss_uses(loss->kind, a)) ok = (tp->arrays[a] = copy_floats(arrays[a], tb->n_targets)) != NULL;
        if (!ok) s = tk_error(TK_ERR_NOMEM, "out of memory");
    }
    tk_request *req = s == TK_OK ? tk_request_new_batched(train_batch, ad->model, tp, train_free) : NULL;
    if (!req) {
        train_free(tp);
        return s != TK_OK ? s : tk_error(TK_ERR_NOMEM, "out of memory");
    }
    memcpy(tp->targets, tb->targets, (size_t)tb->n_targets * sizeof *tp->targets);
    long e = 0;
    for (int i = 0, t = 0; i < tb->n_seqs; i++)
        for (int j = 0; j < tb->seq_lens[i]; j++, t++, e += tb->k_per_datum[i]) tp->tgt_start[t] = (int32_t)e;
    tp->tgt_start[tp->batch.n_tokens] = (int32_t)e;
    tp->n_targets = tb->n_targets;
    tp->loss = *loss;
    tp->backward = backward;
    tk_adapter_retain(ad);
    tp->adapter = ad;
    *out = req;
    return TK_OK;
}

tk_status tk_train_request_set_mm(tk_request *req, const tk_mm *mm)
{
    train_payload *tp = tk_request_payload(req);
    const tk_model_config *c = &tp->adapter->model->cfg;
    return tk_mm_copy(&tp->mm, mm, tp->batch.n_tokens, tp->batch.n_seqs, c->d_model, c->n_layers, MAX_POSITION,
                      tp->backward ? "forward_backward" : "forward");
}

const float *tk_train_request_result(tk_request *req, long *n_targets, double *loss, int *pass_requests)
{
    train_payload *tp = tk_request_payload(req);
    if (!tk_request_done(req)) return NULL;
    *n_targets = tp->n_targets;
    *loss = tp->loss_sum;
    if (pass_requests) *pass_requests = tp->pass_requests;
    return tp->logprobs;
}

const int64_t *tk_train_request_expert_tokens(tk_request *req, int *n_moe_layers, int *n_experts)
{
    train_payload *tp = tk_request_payload(req);
    if (!tk_request_done(req) || !tp->expert_tokens) return NULL;
    *n_moe_layers = tp->n_moe_layers;
    *n_experts = tp->adapter->model->cfg.n_experts;
    return tp->expert_tokens;
}

/* ---- optim_step ------------------------------------------------------------------------ */

typedef struct {
    tk_adapter *adapter;
    tk_adam_params params;
    tk_optim_result result;
} optim_payload;

static void optim_free(void *p)
{
    optim_payload *op = p;
    if (!op) return;
    tk_adapter_release(op->adapter);
    free(op);
}

static tk_status optim_run(void *p, tk_exec *exec)
{
    optim_payload *op = p;
    return tk_adamw_step(&op->result, op->adapter, &op->params, exec->backend);
}

tk_status tk_optim_request_create(tk_request **out, tk_adapter *ad, const tk_adam_params *params)
{
    *out = NULL;
    if (ad->frozen) return tk_error(TK_ERR_INVALID, "optim_step: this adapter is a frozen snapshot for sampling");
    TK_TRY(tk_adam_params_check(params));
    optim_payload *op = calloc(1, sizeof *op);
    tk_request *req = op ? tk_request_new(optim_run, op, optim_free) : NULL;
    if (!req) {
        free(op);
        return tk_error(TK_ERR_NOMEM, "out of memory");
    }
    op->params = *params;
    tk_adapter_retain(ad);
    op->adapter = ad;
    *out = req;
    return TK_OK;
}

const tk_optim_result *tk_optim_request_result(tk_request *req)
{
    optim_payload *op = tk_request_payload(req);
    return tk_request_done(req) ? &op->result : NULL;
}

/* ---- adapter reads and writes ------------------------------------------------------------- */

typedef struct {
    tk_adapter *adapter;
    int parts;
    float *data;        /* [popcount(parts) * n_params] */
    size_t n_floats;
    int64_t step;
    int write;
} adapter_io_payload;

static void adapter_io_free(void *p)
{
    adapter_io_payload *io = p;
    if (!io) return;
    tk_adapter_release(io->adapter);
    free(io->data);
    free(io);
}

static tk_status adapter_io_run(void *p, tk_exec *exec)
{
    adapter_io_payload *io = p;
    tk_adapter *a = io->adapter;
    tk_backend *be = exec->backend;
    size_t n = a->n_params, at = 0;
    for (int k = 0; k < 4; k++) {
        if (!(io->parts & (1 << k))) continue;
        float *array = a->block + (size_t)k * n;
        if (io->write) be->upload(be, array, io->data + at, n * sizeof(float));
        else be->download(be, io->data + at, array, n * sizeof(float));
        at += n;
    }
    if (io->write && (io->parts & 2)) a->grads_zero = 0;
    if (io->write && (io->parts & 1)) a->version++; /* new parameters (prefix_cache.h) */
    if (io->write && (io->parts & 4)) a->step = io->step;
    if (!io->write) io->step = a->step;
    return TK_OK;
}

static tk_status adapter_io_create(tk_request **out, tk_adapter *ad, int parts, const float *data, size_t n_floats,
                                   int64_t step, int write)
{
    *out = NULL;
    if (parts <= 0 || parts > 15 || (ad->frozen && parts != 1))
        return tk_error(TK_ERR_INVALID, "adapter parts mask %d is invalid for this adapter", parts);
    size_t need = (size_t)__builtin_popcount((unsigned)parts) * ad->n_params;
    if (write && n_floats != need)
        return tk_error(TK_ERR_INVALID, "adapter state has %zu values, but this adapter needs %zu", n_floats, need);
    for (size_t i = 0; write && i < n_floats; i++)
        if (!isfinite(data[i])) return tk_error(TK_ERR_INVALID, "adapter state value %zu is %g; values must be finite",
                                                i, (double)data[i]);
    if (write && step < 0) return tk_error(TK_ERR_INVALID, "adapter step %lld is negative", (long long)step);
    adapter_io_payload *io = calloc(1, sizeof *io);
    if (io) io->data = malloc((need ? need : 1) * sizeof(float));
    tk_request *req = io && io->data ? tk_request_new(adapter_io_run, io, adapter_io_free) : NULL;
    if (!req) {
        if (io) free(io->data);
        free(io);
        return tk_error(TK_ERR_NOMEM, "out of memory");
    }
    if (write) memcpy(io->data, data, need * sizeof(float));
    io->n_floats = need;
    io->parts = parts;
    io->step = step;
    io->write = write;
    tk_adapter_retain(ad);
    io->adapter = ad;
    *out = req;
    return TK_OK;
}

tk_status tk_adapter_read_request_create(tk_request **out, tk_adapter *ad, int parts)
{
    return adapter_io_create(out, ad, parts, NULL, 0, 0, 0);
}

tk_status tk_adapter_write_request_create(tk_request **out, tk_adapter *ad, int parts, const float *data,
                                          size_t n_floats, int64_t step)
{
    return adapter_io_create(out, ad, parts, data, n_floats, step, 1);
}

const float *tk_adapter_read_result(tk_request *req, size_t *n_floats, int64_t *step)
{
    adapter_io_payload *io = tk_request_payload(req);
    if (!tk_request_done(req) || io->write) return NULL;
    *n_floats = io->n_floats;
    *step = io->step;
    return io->data;
}

/* ---- snapshots for sampling ------------------------------------------------------------------ */

typedef struct {
    tk_adapter *source, *copy;
} snapshot_payload;

static void snapshot_free(void *p)
{
    snapshot_payload *sp = p;
    if (!sp) return;
    tk_adapter_release(sp->source);
    tk_adapter_release(sp->copy);
    free(sp);
}

static tk_status snapshot_run(void *p, tk_exec *exec)
{
    (void)exec;
    snapshot_payload *sp = p;
    return tk_adapter_snapshot(&sp->copy, sp->source);
}

tk_status tk_snapshot_request_create(tk_request **out, tk_adapter *ad)
{
    *out = NULL;
    snapshot_payload *sp = calloc(1, sizeof *sp);
    tk_request *req = sp ? tk_request_new(snapshot_run, sp, snapshot_free) : NULL;
    if (!req) {
        free(sp);
        return tk_error(TK_ERR_NOMEM, "out of memory");
    }
    tk_adapter_retain(ad);
    sp->source = ad;
    *out = req;
    return TK_OK;
}

tk_adapter *tk_snapshot_request_adapter(tk_request *req)
{
    snapshot_payload *sp = tk_request_payload(req);
    if (!tk_request_done(req) || !sp->copy) return NULL;
    tk_adapter_retain(sp->copy);
    return sp->copy;
}
