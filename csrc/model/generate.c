/* generate.c - generation with a KV cache (see generate.h): the requests'
 * prompts are prefilled in one packed pass of the layer recipe, then every
 * sample decodes in shared steps (the same recipe over the caches), each
 * step's tokens chosen by sampler.c; prompt scores and stop conditions.
 * Before the prefill, each text prompt's longest cached prefix (prefix_cache.h)
 * is copied into its prompt cache and only the rest is prefilled (a resumed
 * prefill, tk_batch.resumed); prefixes that prompts admitted together share
 * and the cache lacks are prefilled once first (the lead pass). After it,
 * every text prompt's whole blocks go into the cache.
 */
#include "generate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../backend/backend.h"
#include "../core/memory.h"
#include "head.h"
#include "mm.h"
#include "prefix_cache.h"
#include "transformer.h"

typedef struct {
    tk_model *model;
    tk_adapter *adapter;      /* or NULL */
    int32_t *prompt;          /* [P] */
    int prompt_len;
    tk_sample_params p;
    int32_t *stop_ids;
    int n_stop_ids;
    char *stop_bytes;
    uint32_t *stop_offsets;   /* [n_stop_strings + 1] */
    int n_stop_strings, max_stop_len;
    tk_mm mm;                 /* the prompt's image features and positions (mm.h), or none */
    /* results */
    int group_requests, group_prompts; /* its cohort: requests admitted with it, distinct prompts prefilled */
    int joined;                        /* 1: it joined a decode already running */
    int cached_tokens;                 /* prompt tokens whose keys and values came from the prefix cache */
    int remaining;                     /* samples still decoding (it finishes at 0) */
    const atomic_int *cancelled;       /* its request's cancel flag */
    int32_t *tokens;          /* [num_samples, max_tokens] */
    float *logprobs;          /* [num_samples, max_tokens] */
    int32_t *sample_topk_ids; /* [num_samples, max_tokens, topk_sample] or NULL */
    float *sample_topk_lp;
    int *n_tokens, *stopped;  /* [num_samples] */
    float *prompt_lp;         /* [P] or NULL */
    int32_t *topk_ids;        /* [P, k] or NULL */
    float *topk_lp;
} sample_payload;

static void sample_free(void *ptr)
{
    sample_payload *sp = ptr;
    if (!sp) return;
    tk_model_release(sp->model);
    tk_adapter_release(sp->adapter);
    free(sp->prompt);
    free(sp->stop_ids);
    free(sp->stop_bytes);
    free(sp->stop_offsets);
    free(sp->tokens);
    free(sp->logprobs);
    free(sp->sample_topk_ids);
    free(sp->sample_topk_lp);
    free(sp->n_tokens);
    free(sp->stopped);
    free(sp->prompt_lp);
    free(sp->topk_ids);
    free(sp->topk_lp);
    tk_mm_free(&sp->mm);
    free(sp);
}

/* ---- stop strings ------------------------------------------------------------------ */

/* Appends token bytes to a sequence's tail and reports whether a stop string
 * now ends inside the new bytes. tail holds at most max_stop_len - 1 bytes. */
static int stop_string_hit(const sample_payload *sp, const tk_vocab_bytes *vocab, char *tail, int *tail_len,
                           int token, char *buf)
{
    const char *tb = vocab->bytes + vocab->offsets[token];
    int tn = (int)(vocab->offsets[token + 1] - vocab->offsets[token]), before = *tail_len;
    memcpy(buf, tail, (size_t)before);
    memcpy(buf + before, tb, (size_t)tn);
    int len = before + tn, hit = 0;
    for (int s = 0; s < sp->n_stop_strings && !hit; s++) {
        const char *str = sp->stop_bytes + sp->stop_offsets[s];
        int sl = (int)(sp->stop_offsets[s + 1] - sp->stop_offsets[s]);
        for (int end = before + 1; end <= len && !hit; end++) /* occurrences ending in the new bytes */
            if (end >= sl && memcmp(buf + end - sl, str, (size_t)sl) == 0) hit = 1;
    }
    int keep = sp->max_stop_len - 1 < len ? sp->max_stop_len - 1 : len;
    memcpy(tail, buf + len - keep, (size_t)keep);
    *tail_len = keep;
    return hit;
}

/* ---- the batch run ----------------------------------------------------------------- */

/* The sequences of one cohort: requests admitted together, their distinct prompts prefilled in one pass. Its
 * caches are freed when its last sequence finishes. */
typedef struct cohort {
    float *prompt_k, *prompt_v; /* [L][total_p][KV] the prompts' keys and values, shared by their samples */
    float *own_kv;              /* per sequence [2][L][its max_tokens][KV]: its own rows */
    char *tails;                /* per sequence [max_stop]: the last bytes, for stop strings */
    int live;                   /* sequences still decoding */
    size_t kv_bytes;            /* its caches' bytes, counted in the session's kv_bytes while it lives */
    struct cohort *next;
} cohort;

typedef struct {
    sample_payload *req;
    cohort *co;
    int sample;
    int n;                  /* tokens so far */
    tk_rng rng;
    tk_kv_seq kv;           /* its prompt's cache, then its own rows */
    char *tail;
    int tail_len;
} sequence;

static int is_stop_id(const sample_payload *sp, int token)
{
    for (int i = 0; i < sp->n_stop_ids; i++)
        if (sp->stop_ids[i] == token) return 1;
    return 0;
}

/* Records a chosen token (and the top k of the distribution it came from, when asked); returns 1 when the
 * sequence is finished. */
static int accept(sequence *s, int token, float logprob, tk_chooser *ch, int V, const tk_vocab_bytes *vocab,
                  char *buf)
{
    sample_payload *sp = s->req;
    size_t at = (size_t)s->sample * sp->p.max_tokens + (size_t)s->n;
    sp->tokens[at] = token;
    sp->logprobs[at] = logprob;
    if (sp->sample_topk_ids) {
        size_t k = (size_t)sp->p.topk_sample;
        tk_chooser_topk(ch, V, sp->p.topk_sample, sp->sample_topk_ids + at * k, sp->sample_topk_lp + at * k);
    }
    s->n++;
    sp->n_tokens[s->sample] = s->n;
    int stop = is_stop_id(sp, token) ||
               (sp->n_stop_strings && stop_string_hit(sp, vocab, s->tail, &s->tail_len, token, buf));
    sp->stopped[s->sample] = stop;
    return stop || s->n >= sp->p.max_tokens;
}

/* Prompt scores for one request from its prefill hidden states h[P, D], in
 * chunks: position i gets log p(prompt[i] | prompt[:i]) and the top k. */
static void prompt_scores(sample_payload *sp, const float *h, tk_backend *be, float *logits, float *lse,
                          float *host, float *head_work, tk_cand *c)
{
    const tk_model *m = sp->model;
    int P = sp->prompt_len, V = m->cfg.vocab_size, D = m->cfg.d_model, k = sp->p.topk_prompt;
    enum { CHUNK = 64 };
    for (int r0 = 0; r0 < P - 1; r0 += CHUNK) {
        int rows = P - 1 - r0 < CHUNK ? P - 1 - r0 : CHUNK;
        tk_head_logits(logits, m, sp->adapter, be, h + (size_t)r0 * D, rows, head_work);
        be->logsumexp(be, lse, logits, V, rows, V);
        const float *lg = tk_host_view(be, host, logits, (size_t)rows * V * sizeof(float));
        const float *lse_h = tk_host_view(be, host ? host + (size_t)rows * V : NULL, lse, (size_t)rows * sizeof(float));
        for (int r = 0; r < rows; r++) {
            const float *row = lg + (size_t)r * V;
            int pos = r0 + r + 1; /* this row predicts prompt[pos] */
            if (sp->prompt_lp) sp->prompt_lp[pos] = row[sp->prompt[pos]] - lse_h[r];
            if (k <= 0) continue;
            for (int v = 0; v < V; v++) c[v] = (tk_cand){row[v], v};
            int kk = k < V ? k : V;
            tk_select_top(c, V, kk);
            qsort(c, (size_t)kk, sizeof *c, tk_cand_by_z_desc);
            for (int j = 0; j < kk; j++) {
                sp->topk_ids[(size_t)pos * k + j] = c[j].id;
                sp->topk_lp[(size_t)pos * k + j] = c[j].z - lse_h[r];
            }
        }
    }
}

/* Requests whose prompts are the same tokens under the same adapter share one prefill and its cache (RL
 * recipes send many single-sample requests of one prompt): uniq[r] is request r's prompt among the n_u
 * distinct ones; returns n_u. */
static int distinct_prompts(sample_payload **reqs, int n_req, int *uniq, int *first_req)
{
    int n_u = 0;
    for (int r = 0; r < n_req; r++) {
        uniq[r] = -1;
        for (int u = 0; u < n_u && uniq[r] < 0; u++) {
            const sample_payload *a = reqs[first_req[u]], *b = reqs[r];
            if (a->adapter == b->adapter && a->prompt_len == b->prompt_len &&
                memcmp(a->prompt, b->prompt, (size_t)a->prompt_len * sizeof *a->prompt) == 0 &&
                tk_mm_equal(&a->mm, &b->mm, a->prompt_len, a->model->cfg.d_model))
                uniq[r] = u;
        }
        if (uniq[r] < 0) first_req[n_u] = r, uniq[r] = n_u++;
    }
    return n_u;
}

/* ---- a decoding session: cohorts of requests, joined between steps (continuous batching) ---------- */

/* A batch from the engine decodes at most SESSION_SEQUENCES sequences at a time (a request with more runs
 * alone), so one step's memory stays bounded, and one admission prefills at most COHORT_PROMPT_TOKENS prompt
 * tokens (counted before prompts are shared; a longer prompt is admitted alone), so a prefill pass's working
 * memory does too. The caches of the admitted requests stay within the model's kv limit (generate.h). Requests
 * queued while it decodes join between steps while they fit, in queue order: one that does not fit waits at the
 * head until it does, so a stream of small requests cannot starve a large one. */
enum { SESSION_SEQUENCES = 256, COHORT_PROMPT_TOKENS = 8192 };

size_t tk_kv_default_limit(void)
{
    size_t half = tk_memory_total() / 2, avail = tk_memory_available() / 4 * 3;
    if (!half) half = (size_t)4 << 30; /* (a machine that does not say) */
    return avail && avail < half ? avail : half;
}

size_t tk_model_kv_limit(const tk_model *m)
{
    size_t bytes = atomic_load(&m->kv_limit);
    return bytes ? bytes : m->kv_default;
}

void tk_model_set_kv_limit(tk_model *m, size_t bytes) { atomic_store(&m->kv_limit, bytes); }

/* Rows of keys and values a sample generates (at least one, so every sample's block is distinct): sized per
 * request, so a short request admitted with a long one does not reserve the long one's rows. */
static int own_rows_for(int max_tokens) { return max_tokens > 1 ? max_tokens : 1; }
static int own_rows(const sample_payload *sp) { return own_rows_for(sp->p.max_tokens); }

/* The cache bytes a request reserves: [2][L][its prompt's rows + each sample's own rows][KV] floats */
static size_t kv_bytes_for(const tk_model *m, int prompt_len, int num_samples, int max_tokens)
{
    const tk_model_config *c = &m->cfg;
    size_t rows = (size_t)prompt_len + (size_t)num_samples * (size_t)own_rows_for(max_tokens);
    return 2 * (size_t)c->n_layers * rows * (size_t)c->n_kv_heads * (size_t)c->head_dim * sizeof(float);
}

static size_t request_kv_bytes(const sample_payload *sp)
{
    return kv_bytes_for(sp->model, sp->prompt_len, sp->p.num_samples, sp->p.max_tokens);
}

/* What a cohort being formed can still take: sequences, prompt tokens and cache bytes. The first request of a
 * cohort is taken whatever its prompt's length; past the cache bytes only when nothing else is live. */
typedef struct {
    int seqs;
    long tokens;
    size_t kv;
} room_left;

static int fits_room(const sample_payload *sp, const room_left *room)
{
    int first = room->tokens == COHORT_PROMPT_TOKENS;
    return sp->p.num_samples <= room->seqs && (first || sp->prompt_len <= room->tokens) &&
           request_kv_bytes(sp) <= room->kv;
}

static void take_room(room_left *room, const sample_payload *sp)
{
    room->seqs -= sp->p.num_samples;
    room->tokens -= sp->prompt_len;
    room->kv -= request_kv_bytes(sp);
}

typedef struct {
    const tk_model *m;
    tk_exec *exec;
    const tk_vocab_bytes *vocab;
    sequence *seqs;     /* [cap] every sequence admitted (finished ones stay: indices are stable) */
    int n_seqs, cap;
    int *live;          /* [cap] indices of the sequences still decoding */
    int n_live;
    cohort *cohorts;
    size_t kv_bytes;    /* the live cohorts' caches (bounded by the model's kv limit) */
    int admitted;       /* requests admitted so far */
    /* one step's batch, [cap] each */
    int32_t *step_tok, *step_rows, *step_delta;
    tk_kv_seq *step_kv;
    const tk_adapter **step_ads;
    float *logits_h;    /* host copy of the logits (devices whose memory the host cannot read) */
    size_t logits_h_rows;
    tk_chooser ch;
    char *buf;          /* stop-string scratch */
    int max_stop;
} session;

static tk_status session_init(session *S, const tk_model *m, tk_exec *exec)
{
    int V = m->cfg.vocab_size;
    *S = (session){.m = m, .exec = exec, .vocab = atomic_load(&((tk_model *)m)->vocab)};
    S->ch = (tk_chooser){malloc((size_t)V * sizeof(float)), malloc((size_t)V * sizeof(double)),
                         malloc((size_t)V * sizeof(tk_cand)), calloc((size_t)V, sizeof(int)), 0, 0.0};
    if (!S->ch.z || !S->ch.e || !S->ch.c || !S->ch.seen) return tk_error(TK_ERR_NOMEM, "sample: out of memory");
    return TK_OK;
}

static void cohort_free(tk_backend *be, cohort *co)
{
    be->free(be, co->prompt_k), be->free(be, co->prompt_v), be->free(be, co->own_kv);
    free(co->tails);
    free(co);
}

static void session_free(session *S)
{
    tk_backend *be = S->exec->backend;
    for (cohort *co = S->cohorts, *next; co; co = next) next = co->next, cohort_free(be, co);
    free(S->seqs), free(S->live), free(S->step_tok), free(S->step_rows), free(S->step_kv), free(S->step_ads);
    free(S->step_delta);
    free(S->logits_h), free(S->buf);
    free(S->ch.z), free(S->ch.e), free(S->ch.c), free(S->ch.seen);
}

/* Room for `more` sequences in the session's arrays. */
static int session_reserve(session *S, int more)
{
    if (S->n_seqs + more <= S->cap) return 1;
    int cap = S->cap ? S->cap : 64;
    while (cap < S->n_seqs + more) cap *= 2;
#define GROW(ptr) do { void *p_ = realloc((ptr), (size_t)cap * sizeof *(ptr)); if (!p_) return 0; (ptr) = p_; } while (0)
    GROW(S->seqs); GROW(S->live); GROW(S->step_tok); GROW(S->step_kv); GROW(S->step_ads);
    GROW(S->step_delta);
    int32_t *rows = realloc(S->step_rows, ((size_t)cap + 1) * sizeof *rows);
    if (!rows) return 0;
    S->step_rows = rows;
#undef GROW
    for (int i = 0; i <= cap; i++) S->step_rows[i] = i;
    S->cap = cap;
    return 1;
}

/* Host memory for the logits of `rows` rows (none on a host-memory backend). */
static int session_host_logits(session *S, size_t rows)
{
    tk_backend *be = S->exec->backend;
    if (be->host_memory || rows <= S->logits_h_rows) return 1;
    size_t V = (size_t)S->m->cfg.vocab_size;
    float *h = realloc(S->logits_h, (rows * V + rows) * sizeof(float));
    if (!h) return 0;
    S->logits_h = h, S->logits_h_rows = rows;
    return 1;
}

/* The adapter with the widest unembed LoRA among those given (NULL: none has one): it sizes the head's
 * workspace for all of them. */
static const tk_adapter *widest_unembed(const tk_adapter *const *ads, int n)
{
    const tk_adapter *widest = NULL;
    for (int i = 0; i < n; i++)
        if (ads[i] && ads[i]->unembed.A && (!widest || ads[i]->cfg.rank > widest->cfg.rank)) widest = ads[i];
    return widest;
}

/* Drops one hold on a cohort (each live sequence holds one, and admission one while it runs): its caches go
 * with the last. */
static void cohort_release(session *S, cohort *co)
{
    if (--co->live > 0) return;
    cohort **link = &S->cohorts;
    while (*link != co) link = &(*link)->next;
    *link = co->next;
    S->kv_bytes -= co->kv_bytes;
    cohort_free(S->exec->backend, co);
}

static int is_cancelled(const sample_payload *sp) { return atomic_load(sp->cancelled); }

/* A cancelled request finishes at once, with TK_ERR_CANCELLED (once: its other sequences find it finished). */
static void finish_cancelled(tk_exec *exec, sample_payload *sp)
{
    if (sp->remaining < 0) return;
    sp->remaining = -1;
    tk_error(TK_ERR_CANCELLED, "sample: cancelled");
    tk_exec_finish(exec, sp, TK_ERR_CANCELLED);
}

/* A request is finished when its last sample is: its waiters wake now, whatever else still decodes. */
static void sequence_done(session *S, sequence *q)
{
    if (--q->req->remaining == 0) tk_exec_finish(S->exec, q->req, TK_OK);
    cohort_release(S, q->co);
}

/* The prefill's image inputs: the distinct prompts' (reqs[first_req[u]] for u < n_u, their new tokens at batch
 * rows starts[u] .., past[u] of them cached before: only text prompts have any) packed as their tokens are.
 * Embedding rows are renumbered into one table, deepstack blocks regrouped per layer (a prompt with fewer blocks
 * adds zeros), and a prompt without positions of its own counts them from past[u] on every axis. The packed
 * embed rows and positions are host arrays the batch points at; the features go to `dev` (prefill_mm_floats of
 * device scratch) through `host` (as many floats of host memory). */
typedef struct {
    int n_embeds, n_deepstack;
    int32_t *embed_row; /* [total_p] or NULL */
    int32_t *pos;       /* [total_p, TK_MM_POS_DIMS] or NULL */
    float *host;        /* [(1 + n_deepstack) n_embeds, D] or NULL */
} prefill_mm;

static void prefill_mm_free(prefill_mm *pm) { free(pm->embed_row), free(pm->pos), free(pm->host); }

static size_t prefill_mm_floats(const prefill_mm *pm, int D)
{
    return (size_t)pm->n_embeds * (size_t)D * (size_t)(1 + pm->n_deepstack);
}

static tk_status pack_prefill_mm(prefill_mm *pm, sample_payload **reqs, const int *first_req, int n_u,
                                 const int32_t *starts, const int *past, int D)
{
    memset(pm, 0, sizeof *pm);
    int any_pos = 0, total_p = starts[n_u];
    for (int u = 0; u < n_u; u++) {
        const tk_mm *mm = &reqs[first_req[u]]->mm;
        pm->n_embeds += mm->n_embeds;
        if (mm->n_deepstack > pm->n_deepstack) pm->n_deepstack = mm->n_deepstack;
        any_pos |= mm->pos != NULL;
    }
    if (!pm->n_embeds && !any_pos) return TK_OK;
    size_t rows = (size_t)pm->n_embeds * (size_t)D, K = (size_t)pm->n_deepstack;
    pm->embed_row = pm->n_embeds ? malloc((size_t)total_p * sizeof *pm->embed_row) : NULL;
    pm->pos = any_pos ? malloc((size_t)total_p * TK_MM_POS_DIMS * sizeof *pm->pos) : NULL;
    pm->host = pm->n_embeds ? calloc(rows * (1 + K), sizeof *pm->host) : NULL;
    if ((pm->n_embeds && (!pm->embed_row || !pm->host)) || (any_pos && !pm->pos)) {
        prefill_mm_free(pm);
        return tk_error(TK_ERR_NOMEM, "sample: out of memory for the prompts' image features");
    }
    for (int u = 0, row0 = 0; u < n_u; u++) {
        const tk_mm *mm = &reqs[first_req[u]]->mm;
        int P = starts[u + 1] - starts[u];
        for (int t = 0; pm->embed_row && t < P; t++)
            pm->embed_row[starts[u] + t] = mm->embed_row && mm->embed_row[t] >= 0 ? row0 + mm->embed_row[t] : -1;
        for (int t = 0; pm->pos && t < P; t++)
            for (int k = 0; k < TK_MM_POS_DIMS; k++)
                pm->pos[(size_t)(starts[u] + t) * TK_MM_POS_DIMS + k] =
                    mm->pos ? mm->pos[t * TK_MM_POS_DIMS + k] : past[u] + t;
        size_t n = (size_t)mm->n_embeds * (size_t)D, at = (size_t)row0 * (size_t)D;
        if (n) memcpy(pm->host + at, mm->embeds, n * sizeof(float));
        for (size_t k = 0; k < (size_t)mm->n_deepstack; k++)
            memcpy(pm->host + rows * (1 + k) + at, mm->deepstack + k * n, n * sizeof(float));
        row0 += mm->n_embeds;
    }
    return TK_OK;
}

/* Points the prefill batch at the packed image inputs, uploading the features to dev. */
static void place_prefill_mm(tk_batch *b, const prefill_mm *pm, tk_backend *be, float *dev, int D)
{
    b->pos = pm->pos;
    if (!pm->n_embeds) return;
    be->upload(be, dev, pm->host, prefill_mm_floats(pm, D) * sizeof(float));
    b->embeds = dev, b->embed_row = pm->embed_row, b->n_embeds = pm->n_embeds;
    if (pm->n_deepstack) b->deepstack = dev + (size_t)pm->n_embeds * D, b->n_deepstack = pm->n_deepstack;
}

/* ---- the prefix cache (prefix_cache.h) ------------------------------------------------------------ */

/* A prompt with image inputs: its keys and values depend on its features and positions, not only its tokens,
 * so it neither reuses nor fills the prefix cache. */
static int has_images(const sample_payload *sp) { return sp->mm.n_embeds || sp->mm.pos || sp->mm.pos_delta; }

/* Whose weights computed a prompt's keys and values. An adapter of the unembedding alone leaves them the base
 * model's, so it shares the base model's blocks. */
static tk_prefix_key prefix_key(const tk_adapter *ad)
{
    if (!ad || (!ad->cfg.train_attn && !ad->cfg.train_mlp)) return (tk_prefix_key){0, 0};
    return (tk_prefix_key){ad->uid, ad->version};
}

/* A cohort's distinct prompts (reqs[first[u]] holds prompt u) and where their rows come from. */
typedef struct {
    sample_payload **reqs;
    const int *first;
    int n;
    int *usable;     /* [n] may start from cached rows: text, and no request of it wants prompt scores (those need
                      * the logits of every position) */
    int *past;       /* [n] rows it has before the main prefill: from the prefix cache or the lead pass */
    int *cached;     /* [n] of those, from the prefix cache */
    int *lead;       /* [n] > 0: it prefills its first lead[u] tokens in the lead pass, for the others */
} prompt_plan;

static const sample_payload *prompt_of(const prompt_plan *pl, int u) { return pl->reqs[pl->first[u]]; }

static int same_key(tk_prefix_key a, tk_prefix_key b) { return a.adapter == b.adapter && a.version == b.version; }

/* The cached rows each usable prompt starts from (whole blocks, its last token always left to prefill: the first
 * sample token comes from its logits); hits[u] pins the run until it is read. */
static void find_prefixes(tk_prefix_cache *pc, prompt_plan *pl, const int *uniq, int n_req, tk_prefix_node **hits)
{
    for (int u = 0; u < pl->n; u++) pl->usable[u] = 0, pl->past[u] = pl->cached[u] = pl->lead[u] = 0, hits[u] = NULL;
    if (!pc || !tk_prefix_cache_enabled(pc)) return;
    for (int u = 0; u < pl->n; u++) pl->usable[u] = !has_images(prompt_of(pl, u));
    for (int r = 0; r < n_req; r++)
        if (pl->reqs[r]->prompt_lp || pl->reqs[r]->topk_ids) pl->usable[uniq[r]] = 0;
    for (int u = 0; u < pl->n; u++) {
        const sample_payload *sp = prompt_of(pl, u);
        if (pl->usable[u])
            pl->past[u] = pl->cached[u] = tk_prefix_cache_lookup(pc, prefix_key(sp->adapter), sp->prompt,
                                                                 sp->prompt_len, sp->prompt_len - 1, &hits[u]);
    }
}

/* Copies each pinned run into its prompt's rows of the cohort's prompt cache (co->prompt_k / v [L][total_p][KV],
 * prompt u from row starts[u]) and unpins it. */
static void read_prefixes(tk_prefix_cache *pc, tk_backend *be, int n_u, tk_prefix_node **hits, const cohort *co,
                          const int32_t *starts, int KV, size_t stride)
{
    for (int u = 0; u < n_u; u++) {
        if (!hits[u]) continue;
        size_t at = (size_t)starts[u] * (size_t)KV;
        tk_prefix_cache_read(pc, be, hits[u], co->prompt_k + at, co->prompt_v + at, stride);
        tk_prefix_cache_unpin(pc, be, hits[u]);
        hits[u] = NULL;
    }
}

static void unpin_prefixes(tk_prefix_cache *pc, tk_backend *be, tk_prefix_node **hits, int n_u)
{
    for (int u = 0; u < n_u; u++) tk_prefix_cache_unpin(pc, be, hits[u]), hits[u] = NULL;
}

/* Whole blocks at the start of two prompts that are the same, each keeping its last token to prefill. */
static int common_blocks(const sample_payload *a, const sample_payload *b)
{
    int max = (a->prompt_len < b->prompt_len ? a->prompt_len : b->prompt_len) - 1, n = 0;
    while (n < max && a->prompt[n] == b->prompt[n]) n++;
    return n / TK_PREFIX_BLOCK * TK_PREFIX_BLOCK;
}

/* Prompts of one cohort that share a prefix the cache does not have would each prefill it (their lookups all
 * come before any of them fills the cache). Instead one of them, the leader, prefills it in a pass of its own
 * that goes into the cache, and the others read it from there as if an earlier request had cached it. A prompt
 * shares share[u] tokens (the most whole blocks it has in common with another usable prompt under the same
 * weights); the longest shares are placed first, so one leader serves every shorter share it covers. Sets
 * lead[u] for the leaders; returns how many there are. */
static int plan_leads(prompt_plan *pl, int *share)
{
    int n = pl->n, order[n], n_lead = 0;
    for (int u = 0; u < n; u++) share[u] = 0, order[u] = u;
    for (int u = 0; u < n; u++)
        for (int v = u + 1; pl->usable[u] && v < n; v++) {
            tk_prefix_key ku = prefix_key(prompt_of(pl, u)->adapter), kv = prefix_key(prompt_of(pl, v)->adapter);
            if (!pl->usable[v] || !same_key(ku, kv)) continue;
            int c = common_blocks(prompt_of(pl, u), prompt_of(pl, v));
            if (c > share[u]) share[u] = c;
            if (c > share[v]) share[v] = c;
        }
    for (int i = 1; i < n; i++) /* by share, longest first (stable) */
        for (int j = i; j > 0 && share[order[j]] > share[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1], order[j - 1] = t;
        }
    for (int i = 0; i < n; i++) {
        int u = order[i], covered = 0;
        if (share[u] <= pl->past[u]) continue;
        const sample_payload *a = prompt_of(pl, u);
        for (int l = 0; l < n && !covered; l++) {
            const sample_payload *b = prompt_of(pl, l);
            covered = pl->lead[l] >= share[u] && same_key(prefix_key(a->adapter), prefix_key(b->adapter)) &&
                      memcmp(a->prompt, b->prompt, (size_t)share[u] * sizeof *a->prompt) == 0;
        }
        if (!covered) pl->lead[u] = share[u], n_lead++;
    }
    return n_lead;
}

/* Caches prompt u's whole blocks among its first n tokens from its rows of the cohort's prompt cache, when the
 * device computed them (a block from a failed pass would be served to later requests). */
static void fill_prefix(tk_exec *exec, tk_prefix_cache *pc, tk_backend *be, const sample_payload *sp, int n,
                        const cohort *co, int32_t start, int KV, size_t stride)
{
    if (tk_exec_device_ok(exec) != TK_OK) return; /* the batch's requests fail with the device's error */
    size_t at = (size_t)start * (size_t)KV;
    tk_prefix_cache_insert(pc, be, prefix_key(sp->adapter), sp->prompt, n, co->prompt_k + at, co->prompt_v + at,
                           stride);
}

/* The lead pass (plan_leads): each leader's tokens past[l] .. lead[l] prefilled into its prompt rows (after the
 * rows it had from the cache) and cached; then the prompts that share them look up again and read them. Runs
 * only when it can: scratch it cannot get means the prompts prefill their shares themselves. */
static void lead_pass(session *S, prompt_plan *pl, const int *share, const cohort *co, const int32_t *starts,
                      size_t stride)
{
    const tk_model *m = S->m;
    tk_backend *be = S->exec->backend;
    tk_prefix_cache *pc = m->prefix_cache;
    const int n = pl->n, D = m->cfg.d_model, KV = m->cfg.n_kv_heads * m->cfg.head_dim;
    int32_t seq_start[n + 1];
    tk_kv_seq kvs[n];
    const tk_adapter *ads[n];
    int n_seqs = 0, total = 0, resumed = 0;
    for (int u = 0; u < n; u++) total += pl->lead[u] ? pl->lead[u] - pl->past[u] : 0;
    int32_t *tokens = malloc((size_t)total * sizeof *tokens);
    seq_start[0] = 0;
    for (int u = 0; tokens && u < n; u++) {
        if (!pl->lead[u]) continue;
        const sample_payload *sp = prompt_of(pl, u);
        size_t at = (size_t)starts[u] * (size_t)KV;
        int n_new = pl->lead[u] - pl->past[u];
        memcpy(tokens + seq_start[n_seqs], sp->prompt + pl->past[u], (size_t)n_new * sizeof *tokens);
        kvs[n_seqs] = (tk_kv_seq){NULL, NULL, 0, co->prompt_k + at, co->prompt_v + at, pl->past[u], 0, stride};
        ads[n_seqs] = sp->adapter;
        resumed |= pl->past[u] > 0;
        seq_start[n_seqs + 1] = seq_start[n_seqs] + n_new;
        n_seqs++;
    }
    tk_batch b = {.n_seqs = n_seqs, .n_tokens = total, .tokens = tokens, .seq_start = seq_start, .adapters = ads,
                  .kv = kvs, .resumed = resumed};
    tk_workspace ws = tk_transformer_workspace(m, be, &b, 0);
    float *work = tokens ? tk_exec_scratch(S->exec, (size_t)total * D + ws.dev + 16) : NULL;
    float *host = work ? tk_exec_host_scratch(S->exec, ws.host) : NULL;
    if (!work || !host) { /* not an error: the prompts prefill their shares themselves */
        for (int u = 0; u < n; u++) pl->lead[u] = 0;
        free(tokens);
        return;
    }
    tk_transformer_forward(work, m, be, &b, NULL, work + (size_t)total * D, host);
    free(tokens);
    tk_prefix_cache_count_prefill(pc, total);
    for (int u = 0; u < n; u++)
        if (pl->lead[u]) {
            fill_prefix(S->exec, pc, be, prompt_of(pl, u), pl->lead[u], co, starts[u], KV, stride);
            pl->past[u] = pl->lead[u];
        }
    tk_prefix_node *hits[n];
    for (int u = 0; u < n; u++) {
        const sample_payload *sp = prompt_of(pl, u);
        hits[u] = NULL;
        if (pl->lead[u] || share[u] <= pl->past[u]) continue;
        pl->past[u] = pl->cached[u] = tk_prefix_cache_lookup(pc, prefix_key(sp->adapter), sp->prompt, sp->prompt_len,
                                                             sp->prompt_len - 1, &hits[u]);
    }
    read_prefixes(pc, be, n, hits, co, starts, KV, stride);
}

/* Admits requests reqs[0..n_req) as one cohort: one prefill of their distinct prompts (each from the rows the
 * prefix cache has of it, or the lead pass prefilled for it), the prompt scores, and the first token of every
 * sample; the unfinished samples join the live set. */
static tk_status admit(session *S, sample_payload **reqs, int n_req)
{
    const tk_model *m = S->m;
    tk_backend *be = S->exec->backend;
    tk_prefix_cache *pc = m->prefix_cache;
    const tk_model_config *c = &m->cfg;
    const int V = c->vocab_size, D = c->d_model, L = c->n_layers, KV = c->n_kv_heads * c->head_dim;
    int uniq[n_req], first_req[n_req];
    int n_u = distinct_prompts(reqs, n_req, uniq, first_req);
    int usable[n_u], past[n_u], cached[n_u], lead[n_u], share[n_u];
    prompt_plan pl = {reqs, first_req, n_u, usable, past, cached, lead};
    tk_prefix_node *hits[n_u];
    find_prefixes(pc, &pl, uniq, n_req, hits);
    const tk_adapter *req_ads[n_req];
    for (int r = 0; r < n_req; r++) req_ads[r] = reqs[r]->adapter;
    const tk_adapter *widest = widest_unembed(req_ads, n_req);
    float *h_rows[n_req], *last_rows[n_req];
    int total_p = 0, total_new = 0, resumed = 0, n_seq = 0, max_stop = 1;
    size_t own_floats = 0; /* every sample's own rows: [2][L][its max_tokens][KV], sized per request */
    prefill_mm pm = {0};
    for (int u = 0; u < n_u; u++) total_p += reqs[first_req[u]]->prompt_len;
    for (int r = 0; r < n_req; r++) {
        sample_payload *sp = reqs[r];
        n_seq += sp->p.num_samples;
        own_floats += (size_t)sp->p.num_samples * 2 * L * own_rows(sp) * KV;
        if (sp->max_stop_len > max_stop) max_stop = sp->max_stop_len;
        sp->group_requests = n_req, sp->group_prompts = n_u, sp->joined = S->admitted > 0;
        sp->remaining = sp->p.num_samples;
    }
    S->admitted += n_req;
    size_t prompt_stride = (size_t)total_p * KV;
    cohort *co = calloc(1, sizeof *co);
    /* starts: each prompt's rows in the prompt cache; rows: its new rows in the prefill batch (and in h) */
    int32_t *tokens = malloc((size_t)total_p * sizeof *tokens), *starts = malloc(((size_t)n_u + 1) * sizeof *starts);
    int32_t *rows_at = malloc(((size_t)n_u + 1) * sizeof *rows_at);
    tk_kv_seq *kvs = malloc((size_t)n_u * sizeof *kvs);
    const tk_adapter **ads = malloc((size_t)n_u * sizeof *ads); /* the prompts' */
    if (max_stop > S->max_stop) {
        free(S->buf);
        S->buf = malloc((size_t)max_stop + TK_MAX_TOKEN_BYTES);
        S->max_stop = S->buf ? max_stop : 0;
    }
    if (co) {
        co->prompt_k = be->alloc(be, (size_t)L * prompt_stride * sizeof(float));
        co->prompt_v = be->alloc(be, (size_t)L * prompt_stride * sizeof(float));
        co->own_kv = be->alloc(be, own_floats * sizeof(float));
        co->tails = malloc((size_t)n_seq * (size_t)max_stop);
    }
    tk_status status = TK_OK;
    size_t rows = (size_t)(n_req > 64 ? n_req : 64); /* prompt-score chunks and the first tokens */
    if (!co || !co->prompt_k || !co->prompt_v || !co->own_kv || !co->tails || !tokens || !starts || !rows_at ||
        !kvs || !ads || !S->buf || !session_reserve(S, n_seq) || !session_host_logits(S, rows)) {
        status = tk_error(TK_ERR_NOMEM, "sample: out of memory for %d sequences", n_seq);
        goto done;
    }

    /* 1. each prompt's first rows: the cached ones copied into its prompt cache, then (lead pass) the prefixes
     * prompts of this cohort share and the cache lacked */
    starts[0] = 0;
    for (int u = 0; u < n_u; u++) starts[u + 1] = starts[u] + reqs[first_req[u]]->prompt_len;
    read_prefixes(pc, be, n_u, hits, co, starts, KV, prompt_stride);
    if (pc && plan_leads(&pl, share) > 0) lead_pass(S, &pl, share, co, starts, prompt_stride);
    for (int r = 0; r < n_req; r++) reqs[r]->cached_tokens = cached[uniq[r]];

    /* 2. prefill every distinct prompt's other rows in one packed forward pass, filling the rest of its cache */
    rows_at[0] = 0;
    for (int u = 0; u < n_u; u++) {
        const sample_payload *sp = reqs[first_req[u]];
        memcpy(tokens + rows_at[u], sp->prompt + past[u], (size_t)(sp->prompt_len - past[u]) * sizeof *tokens);
        rows_at[u + 1] = rows_at[u] + sp->prompt_len - past[u];
        ads[u] = sp->adapter;
        size_t at = (size_t)starts[u] * KV;
        kvs[u] = (tk_kv_seq){NULL, NULL, 0, co->prompt_k + at, co->prompt_v + at, past[u], 0, prompt_stride};
        resumed |= past[u] > 0;
    }
    total_new = rows_at[n_u];
    tk_batch prefill = {.n_seqs = n_u, .n_tokens = total_new, .tokens = tokens, .seq_start = rows_at, .adapters = ads,
                        .kv = kvs, .resumed = resumed};
    if ((status = pack_prefill_mm(&pm, reqs, first_req, n_u, rows_at, past, D)) != TK_OK) goto done;
    tk_workspace body = tk_transformer_workspace(m, be, &prefill, 0), head = tk_head_workspace(m, widest);
    size_t n_mm = prefill_mm_floats(&pm, D);
    float *work = tk_exec_scratch(S->exec,
                                  (size_t)total_new * D + rows * D + rows * V + rows + n_mm + body.dev + head.dev + 64);
    float *host = work ? tk_exec_host_scratch(S->exec, body.host) : NULL;
    if (!work || !host) {
        status = tk_error_prefix(TK_ERR_NOMEM, "sample: ");
        goto done;
    }
    float *h = work, *hs = h + (size_t)total_new * D, *logits = hs + rows * D, *lse = logits + rows * V;
    float *mm = lse + rows, *rest = mm + n_mm, *head_work = rest + body.dev;
    place_prefill_mm(&prefill, &pm, be, mm, D);
    tk_transformer_forward(h, m, be, &prefill, NULL, rest, host);
    if (pc) tk_prefix_cache_count_prefill(pc, total_new);
    for (int u = 0; pc && u < n_u; u++) /* every text prompt's whole blocks, for the requests to come */
        if (!has_images(reqs[first_req[u]]) && tk_prefix_cache_enabled(pc))
            fill_prefix(S->exec, pc, be, reqs[first_req[u]], reqs[first_req[u]]->prompt_len, co, starts[u], KV,
                            prompt_stride);
    for (int r = 0; r < n_req; r++) /* these prompts were prefilled whole (find_prefixes) */
        if (reqs[r]->prompt_lp || reqs[r]->topk_ids)
            prompt_scores(reqs[r], h + (size_t)rows_at[uniq[r]] * D, be, logits, lse, S->logits_h, head_work, S->ch.c);

    /* 3. the first token of every sample, from its prompt's last position; the cohort joins the session, held
     * by its admission until every sample is placed */
    co->live = 1, co->next = S->cohorts, S->cohorts = co;
    co->kv_bytes = (2 * (size_t)L * prompt_stride + own_floats) * sizeof(float);
    S->kv_bytes += co->kv_bytes;
    for (int r = 0; r < n_req; r++)
        h_rows[r] = hs + (size_t)r * D, last_rows[r] = h + (size_t)(rows_at[uniq[r] + 1] - 1) * D;
    be->copy_rows(be, h_rows, (const float *const *)last_rows, n_req, D);
    tk_head_logits_decode_rows(logits, m, req_ads, widest, be, hs, n_req, head_work);
    const float *lg = tk_host_view(be, S->logits_h, logits, (size_t)n_req * V * sizeof(float));
    float *own_k = co->own_kv;
    for (int r = 0, i = 0; r < n_req; r++) {
        sample_payload *sp = reqs[r];
        size_t own_stride = (size_t)own_rows(sp) * KV, own = (size_t)L * own_stride;
        for (int s = 0; s < sp->p.num_samples; s++, i++, own_k += 2 * own) {
            sequence *q = &S->seqs[S->n_seqs++];
            *q = (sequence){.req = sp, .co = co, .sample = s, .rng = tk_rng_for(sp->p.seed, s),
                            .tail = co->tails + (size_t)i * (size_t)max_stop};
            q->kv = (tk_kv_seq){co->prompt_k + (size_t)starts[uniq[r]] * KV, co->prompt_v + (size_t)starts[uniq[r]] * KV,
                                sp->prompt_len, own_k, own_k + own, 0, prompt_stride, own_stride};
            co->live++;
            int finished = sp->p.max_tokens == 0;
            if (!finished) {
                float lp;
                int t = tk_choose(&S->ch, lg + (size_t)r * V, V, &sp->p, sp->prompt, sp->prompt_len, NULL, 0, &q->rng,
                                  &lp);
                finished = accept(q, t, lp, &S->ch, V, S->vocab, S->buf);
            }
            if (finished) sequence_done(S, q);
            else S->live[S->n_live++] = (int)(q - S->seqs);
        }
    }
    cohort_release(S, co);
    co = NULL;
done:
    unpin_prefixes(pc, be, hits, n_u);
    if (co) cohort_free(be, co);
    free(tokens), free(starts), free(rows_at), free(kvs), free(ads);
    prefill_mm_free(&pm);
    return status;
}

/* Drops the live sequences of cancelled requests: their slots and caches are free for the requests waiting. */
static void drop_cancelled(session *S)
{
    int still = 0;
    for (int j = 0; j < S->n_live; j++) {
        sequence *q = &S->seqs[S->live[j]];
        if (!is_cancelled(q->req)) {
            S->live[still++] = S->live[j];
            continue;
        }
        finish_cancelled(S->exec, q->req);
        cohort_release(S, q->co);
    }
    S->n_live = still;
}

/* Moves the cancelled requests of reqs[0..n) out (finishing them); returns how many are left. */
static int without_cancelled(tk_exec *exec, sample_payload **reqs, int n)
{
    int kept = 0;
    for (int r = 0; r < n; r++) {
        if (is_cancelled(reqs[r])) finish_cancelled(exec, reqs[r]);
        else reqs[kept++] = reqs[r];
    }
    return kept;
}

/* One decoding step of every live sequence: one token each. */
static void step(session *S)
{
    const tk_model *m = S->m;
    tk_backend *be = S->exec->backend;
    const int V = m->cfg.vocab_size, D = m->cfg.d_model, n = S->n_live;
    for (int j = 0; j < n; j++) {
        sequence *q = &S->seqs[S->live[j]];
        S->step_tok[j] = q->req->tokens[(size_t)q->sample * q->req->p.max_tokens + (size_t)(q->n - 1)];
        S->step_kv[j] = q->kv;
        S->step_kv[j].n1 = q->n - 1; /* its tokens before the newest are cached */
        S->step_ads[j] = q->req->adapter;
        S->step_delta[j] = q->req->mm.pos_delta ? q->req->mm.pos_delta[0] : 0; /* M-RoPE after an image */
    }
    tk_batch step = {.n_seqs = n, .n_tokens = n, .tokens = S->step_tok, .seq_start = S->step_rows,
                     .adapters = S->step_ads, .kv = S->step_kv, .pos_delta = S->step_delta};
    const tk_adapter *widest = widest_unembed(S->step_ads, n);
    tk_workspace body = tk_transformer_workspace(m, be, &step, 0), head = tk_head_workspace(m, widest);
    float *work = tk_exec_scratch(S->exec, (size_t)n * D + (size_t)n * V + body.dev + head.dev + 64);
    float *host = work ? tk_exec_host_scratch(S->exec, body.host) : NULL;
    if (!work || !host || !session_host_logits(S, (size_t)n)) { /* out of memory mid-decode: these sequences stop here */
        for (int j = 0; j < n; j++) sequence_done(S, &S->seqs[S->live[j]]);
        S->n_live = 0;
        return;
    }
    float *hs = work, *logits = hs + (size_t)n * D, *rest = logits + (size_t)n * V, *head_work = rest + body.dev;
    tk_transformer_forward(hs, m, be, &step, NULL, rest, host);
    tk_head_logits_decode_rows(logits, m, S->step_ads, widest, be, hs, n, head_work);
    const float *lg = tk_host_view(be, S->logits_h, logits, (size_t)n * V * sizeof(float));
    int still = 0;
    for (int j = 0; j < n; j++) {
        sequence *q = &S->seqs[S->live[j]];
        sample_payload *sp = q->req;
        float lp;
        int t = tk_choose(&S->ch, lg + (size_t)j * V, V, &sp->p, sp->prompt, sp->prompt_len,
                          sp->tokens + (size_t)q->sample * sp->p.max_tokens, q->n, &q->rng, &lp);
        if (accept(q, t, lp, &S->ch, V, S->vocab, S->buf)) sequence_done(S, q);
        else S->live[still++] = S->live[j];
    }
    S->n_live = still;
}

/* A queued request joins the running decode when it fits in the room left (ctx: a room_left). */
static int fits(const void *payload, void *ctx) { return fits_room(payload, ctx); }

/* The cache bytes the session may still reserve. */
static size_t kv_room(const session *S)
{
    size_t limit = tk_model_kv_limit(S->m);
    return S->kv_bytes < limit ? limit - S->kv_bytes : 0;
}

/* Whether request sp can be admitted now: its samples and its caches fit beside the live sequences (an empty
 * session takes any one request). */
static int can_admit(const session *S, const sample_payload *sp)
{
    return S->n_live == 0 ||
           (sp->p.num_samples <= SESSION_SEQUENCES - S->n_live && request_kv_bytes(sp) <= kv_room(S));
}

/* Runs the engine's batch of sample requests, and those queued behind it while it decodes. */
static tk_status run_batch(void **payloads, int n_req, tk_exec *exec)
{
    sample_payload **reqs = (sample_payload **)payloads;
    session S;
    tk_status status = session_init(&S, reqs[0]->model, exec);
    n_req = without_cancelled(exec, reqs, n_req);
    for (int first = 0; status == TK_OK && first < n_req;) { /* the popped requests, as many as fit at once */
        while (!can_admit(&S, reqs[first])) step(&S); /* no room: decode until there is */
        size_t kv_first = request_kv_bytes(reqs[first]), kv_left = kv_room(&S);
        room_left room = {SESSION_SEQUENCES - S.n_live - reqs[first]->p.num_samples,
                          COHORT_PROMPT_TOKENS - reqs[first]->prompt_len, kv_first < kv_left ? kv_left - kv_first : 0};
        int last = first + 1;
        for (; last < n_req && fits_room(reqs[last], &room); last++) take_room(&room, reqs[last]);
        tk_status s = admit(&S, reqs + first, last - first);
        for (int r = first; s != TK_OK && r < last; r++) tk_exec_finish(exec, reqs[r], s);
        first = last;
    }
    while (status == TK_OK && S.n_live > 0) {
        sample_payload *joined[TK_MAX_BATCH];
        int n_joined = 0;
        room_left room = {SESSION_SEQUENCES - S.n_live, COHORT_PROMPT_TOKENS, kv_room(&S)};
        while (n_joined < TK_MAX_BATCH && (joined[n_joined] = tk_exec_join(exec, fits, &room)) != NULL)
            take_room(&room, joined[n_joined++]);
        n_joined = without_cancelled(exec, joined, n_joined);
        if (n_joined > 0) {
            tk_status s = admit(&S, joined, n_joined);
            for (int r = 0; s != TK_OK && r < n_joined; r++) tk_exec_finish(exec, joined[r], s);
        }
        drop_cancelled(&S);
        if (S.n_live > 0) step(&S);
    }
    session_free(&S);
    return status;
}

/* ---- creating requests and reading results -------------------------------------------- */

static tk_status check_params(const tk_model *m, const tk_sample_params *p, int prompt_len)
{
    if (p->num_samples < 1 || p->num_samples > 256)
        return tk_error(TK_ERR_INVALID, "num_samples is %d; it must be from 1 to 256", p->num_samples);
    if (p->max_tokens < 0) return tk_error(TK_ERR_INVALID, "max_tokens is %d; it must be >= 0", p->max_tokens);
    if ((long)prompt_len + p->max_tokens > m->cfg.max_context)
        return tk_error(TK_ERR_INVALID, "the prompt has %d tokens and max_tokens is %d: together more than the "
                        "model's context length %d", prompt_len, p->max_tokens, m->cfg.max_context);
    if (!isfinite(p->temperature) || p->temperature < 0)
        return tk_error(TK_ERR_INVALID, "temperature is %g; it must be >= 0", p->temperature);
    if (!(p->top_p > 0 && p->top_p <= 1)) return tk_error(TK_ERR_INVALID, "top_p is %g; it must be in (0, 1]", p->top_p);
    if (!(p->min_p >= 0 && p->min_p <= 1)) return tk_error(TK_ERR_INVALID, "min_p is %g; it must be in [0, 1]", p->min_p);
    if (p->top_k < -1 || p->top_k == 0)
        return tk_error(TK_ERR_INVALID, "top_k is %d; it must be -1 (off) or >= 1", p->top_k);
    if (!(p->repetition_penalty > 0) || !isfinite(p->repetition_penalty) || !isfinite(p->presence_penalty) ||
        !isfinite(p->frequency_penalty))
        return tk_error(TK_ERR_INVALID, "penalties must be finite and repetition_penalty > 0");
    if (p->topk_prompt < 0 || p->topk_prompt > 1000)
        return tk_error(TK_ERR_INVALID, "topk_prompt_logprobs is %d; it must be from 0 to 1000", p->topk_prompt);
    if (p->topk_sample < 0 || p->topk_sample > 1000)
        return tk_error(TK_ERR_INVALID, "topk_sample_logprobs is %d; it must be from 0 to 1000", p->topk_sample);
    size_t kv = kv_bytes_for(m, prompt_len, p->num_samples, p->max_tokens), limit = tk_model_kv_limit(m);
    if (kv > limit)
        return tk_error(TK_ERR_INVALID, "the request's keys and values (%d prompt tokens and %d samples of up to %d "
                        "tokens) would take %.2f GiB, more than sampling may hold at once (%.2f GiB): lower "
                        "num_samples or max_tokens, or raise $TINKER_KV_CACHE_MB",
                        prompt_len, p->num_samples, p->max_tokens, kv / 1073741824.0, limit / 1073741824.0);
    return TK_OK;
}

tk_status tk_sample_request_create(tk_request **out, tk_model *m, tk_adapter *ad, const int32_t *prompt,
                                   int prompt_len, const tk_sample_params *p, const int32_t *stop_ids,
                                   int n_stop_ids, const char *stop_bytes, const uint32_t *stop_offsets,
                                   int n_stop_strings)
{
    *out = NULL;
    if (ad && ad->model != m) return tk_error(TK_ERR_INVALID, "sample: the adapter belongs to another model");
    if (prompt_len < 1) return tk_error(TK_ERR_INVALID, "sample: the prompt is empty; it needs at least one token");
    TK_TRY(check_params(m, p, prompt_len));
    for (int i = 0; i < prompt_len; i++)
        if (prompt[i] < 0 || prompt[i] >= m->cfg.vocab_size)
            return tk_error(TK_ERR_INVALID, "sample: prompt position %d: token id %d is outside the vocabulary [0, %d)",
                            i, prompt[i], m->cfg.vocab_size);
    for (int i = 0; i < n_stop_ids; i++)
        if (stop_ids[i] < 0 || stop_ids[i] >= m->cfg.vocab_size)
            return tk_error(TK_ERR_INVALID, "sample: stop token id %d is outside the vocabulary", stop_ids[i]);
    if (n_stop_strings > 0 && !atomic_load(&m->vocab))
        return tk_error(TK_ERR_INVALID, "sample: stop strings need the model's token bytes (set them first)");
    sample_payload *sp = calloc(1, sizeof *sp);
    if (!sp) return tk_error(TK_ERR_NOMEM, "out of memory");
    size_t S = (size_t)p->num_samples, N = (size_t)(p->max_tokens > 0 ? p->max_tokens : 1), P = (size_t)prompt_len;
    size_t stop_len = n_stop_strings > 0 ? stop_offsets[n_stop_strings] : 0;
    sp->prompt = malloc(P * sizeof *sp->prompt);
    sp->stop_ids = malloc(((size_t)n_stop_ids + 1) * sizeof *sp->stop_ids);
    sp->stop_bytes = malloc(stop_len + 1);
    sp->stop_offsets = malloc(((size_t)n_stop_strings + 1) * sizeof *sp->stop_offsets);
    sp->tokens = malloc(S * N * sizeof *sp->tokens);
    sp->logprobs = malloc(S * N * sizeof *sp->logprobs);
    sp->n_tokens = calloc(S, sizeof *sp->n_tokens);
    sp->stopped = calloc(S, sizeof *sp->stopped);
    int ok = sp->prompt && sp->stop_ids && sp->stop_bytes && sp->stop_offsets && sp->tokens && sp->logprobs &&
             sp->n_tokens && sp->stopped;
    if (ok && p->prompt_logprobs) ok = (sp->prompt_lp = calloc(P, sizeof *sp->prompt_lp)) != NULL;
    if (ok && p->topk_prompt > 0) {
        sp->topk_ids = calloc(P * (size_t)p->topk_prompt, sizeof *sp->topk_ids);
        sp->topk_lp = calloc(P * (size_t)p->topk_prompt, sizeof *sp->topk_lp);
        ok = sp->topk_ids && sp->topk_lp;
    }
    if (ok && p->topk_sample > 0) {
        size_t k = (size_t)(p->topk_sample < m->cfg.vocab_size ? p->topk_sample : m->cfg.vocab_size);
        sp->sample_topk_ids = calloc(S * N * k, sizeof *sp->sample_topk_ids);
        sp->sample_topk_lp = calloc(S * N * k, sizeof *sp->sample_topk_lp);
        ok = sp->sample_topk_ids && sp->sample_topk_lp;
    }
    tk_request *req = ok ? tk_request_new_batched(run_batch, (const void *)m, sp, sample_free)
                         : NULL;
    if (!req) {
        sample_free(sp);
        return tk_error(TK_ERR_NOMEM, "out of memory");
    }
    memcpy(sp->prompt, prompt, P * sizeof *prompt);
    sp->prompt_len = prompt_len;
    sp->cancelled = tk_request_cancel_flag(req);
    sp->p = *p;
    if (sp->p.topk_sample > m->cfg.vocab_size) sp->p.topk_sample = m->cfg.vocab_size; /* the rows allocated */
    memcpy(sp->stop_ids, stop_ids, (size_t)n_stop_ids * sizeof *stop_ids);
    sp->n_stop_ids = n_stop_ids;
    if (stop_len) memcpy(sp->stop_bytes, stop_bytes, stop_len);
    sp->stop_offsets[0] = 0;
    sp->max_stop_len = 1;
    for (int i = 0; i < n_stop_strings; i++) {
        sp->stop_offsets[i + 1] = stop_offsets[i + 1];
        int len = (int)(stop_offsets[i + 1] - stop_offsets[i]);
        if (len > sp->max_stop_len) sp->max_stop_len = len;
    }
    sp->n_stop_strings = n_stop_strings;
    tk_model_retain(m);
    sp->model = m;
    if (ad) tk_adapter_retain(ad);
    sp->adapter = ad;
    *out = req;
    return TK_OK;
}

tk_status tk_sample_request_set_mm(tk_request *req, const tk_mm *mm)
{
    sample_payload *sp = tk_request_payload(req);
    const tk_model_config *c = &sp->model->cfg;
    if (mm->pos_delta && (mm->pos_delta[0] < -(1L << 24) || mm->pos_delta[0] > (1L << 24)))
        return tk_error(TK_ERR_INVALID, "sample: rope delta %d is out of range", mm->pos_delta[0]);
    return tk_mm_copy(&sp->mm, mm, sp->prompt_len, 1, c->d_model, c->n_layers, 1L << 24, "sample");
}

int tk_sample_request_sample(tk_request *req, int i, tk_sampled *out)
{
    sample_payload *sp = tk_request_payload(req);
    if (!tk_request_done(req) || i < 0 || i >= sp->p.num_samples) return 0;
    out->tokens = sp->tokens + (size_t)i * (size_t)(sp->p.max_tokens > 0 ? sp->p.max_tokens : 1);
    out->logprobs = sp->logprobs + (size_t)i * (size_t)(sp->p.max_tokens > 0 ? sp->p.max_tokens : 1);
    out->n = sp->n_tokens[i];
    out->stopped = sp->stopped[i];
    size_t row = (size_t)i * (size_t)(sp->p.max_tokens > 0 ? sp->p.max_tokens : 1) * (size_t)sp->p.topk_sample;
    out->topk_ids = sp->sample_topk_ids ? sp->sample_topk_ids + row : NULL;
    out->topk_logprobs = sp->sample_topk_lp ? sp->sample_topk_lp + row : NULL;
    out->topk = sp->sample_topk_ids ? sp->p.topk_sample : 0;
    return 1;
}

const float *tk_sample_request_prompt(tk_request *req, int *prompt_len, const int32_t **topk_ids,
                                      const float **topk_logprobs, int *k)
{
    sample_payload *sp = tk_request_payload(req);
    *prompt_len = sp->prompt_len;
    *topk_ids = sp->topk_ids;
    *topk_logprobs = sp->topk_lp;
    *k = sp->p.topk_prompt;
    return sp->prompt_lp;
}

void tk_sample_request_group(tk_request *req, int *group_requests, int *group_prompts, int *joined)
{
    const sample_payload *sp = tk_request_payload(req);
    *group_requests = sp->group_requests;
    *group_prompts = sp->group_prompts;
    *joined = sp->joined;
}

int tk_sample_request_cached_tokens(tk_request *req)
{
    const sample_payload *sp = tk_request_payload(req);
    return sp->cached_tokens;
}
