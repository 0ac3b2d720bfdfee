/* vision.c - the vision tower (see vision.h): its weights, loaded on first use, and its forward pass.
 *
 * Owns the tower (one allocation of float32 vectors and one of weight storage, both the backend's) once it is
 * published on its model; the model frees it. Every tensor is checked against the vision config before anything
 * is allocated: its name and role come from the architecture descriptor's vision table, its shape from that
 * table's expression over the config's letters. Matrices keep their file's storage (F32 / F16 / BF16 from
 * safetensors; any GGUF type from an mmproj file: tk_weight, decoded inside the matmuls as the language model's
 * are); vectors and the position table become float32.
 */
#include "vision.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/arena.h"
#include "../io/file.h"
#include "../io/quant.h"
#include "arch.h"

/* A merger (the main one or a deepstack tap): a LayerNorm then fc1 -> GELU(erf) -> fc2 */
typedef struct {
    float *norm_w, *norm_b, *fc1_b, *fc2_b;
    tk_weight fc1, fc2;
} merger;

typedef struct {
    float *norm1_w, *norm1_b, *qkv_b, *proj_b, *norm2_w, *norm2_b, *fc1_b, *fc2_b;
    tk_weight qkv, proj, fc1, fc2;
} vit_block;

struct tk_vision {
    tk_vision_config cfg;
    tk_backend *be;        /* a reference */
    tk_weight patch;       /* [D, C Tp P P] */
    float *patch_b;        /* [D] */
    float *pos;            /* [side^2, D] the learned position table */
    float *rope_inv_freq;  /* [d/2]: the d/4 frequencies for the row, then the same for the column */
    int8_t *rope_axis;     /* [d/2] host: 0 (row) for the first d/4, 1 (column) after */
    vit_block *blocks;     /* [depth] */
    merger main, *taps;    /* taps: [n_deepstack] */
    float *block;          /* the vectors above (device) */
    size_t block_floats;
    uint8_t *wblock;       /* every tk_weight's storage (device) */
};

void tk_vision_free(struct tk_vision *v)
{
    if (!v) return;
    if (v->be) {
        v->be->free(v->be, v->block);
        v->be->free(v->be, v->wblock);
        tk_backend_release(v->be);
    }
    free(v->rope_axis), free(v->blocks), free(v->taps), free(v);
}

/* ---- shapes ------------------------------------------------------------------------------------------------ */

/* A vision shape letter's value (arch.h's tk_arch_vision_tensor); -1 when unknown. */
static int64_t letter(const tk_vision_config *c, const char *s, size_t n)
{
    static const char *const names[] = {"Dv", "Fv", "C", "Tp", "P", "Np", "S", "O"};
    int64_t values[] = {c->d_model, c->d_ff, c->in_channels, c->temporal_patch, c->patch,
                        (int64_t)c->grid_side * c->grid_side, c->merge, c->out};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strlen(names[i]) == n && memcmp(names[i], s, n) == 0) return values[i];
    return -1;
}

/* "3*Dv,Dv" -> dims; the number of dims, or -1 when it does not parse (or has more than 5) */
static int eval_shape(int64_t *dims, const char *expr, const tk_vision_config *c)
{
    int n = 0;
    for (const char *p = expr; *p;) {
        int64_t value = 1;
        for (;;) {
            const char *start = p;
            while (isalnum((unsigned char)*p)) p++;
            if (p == start) return -1;
            int64_t term = isdigit((unsigned char)*start) ? strtoll(start, NULL, 10) : letter(c, start, (size_t)(p - start));
            if (term < 0) return -1;
            value *= term;
            if (*p != '*') break;
            p++;
        }
        if (n == 5) return -1;
        dims[n++] = value;
        if (*p == ',') p++;
        else if (*p) return -1;
    }
    return n;
}

/* ---- where each tensor goes ------------------------------------------------------------------------------ */

static int is_matrix(int role)
{
    return role == TK_VROLE_PATCH || role == TK_VROLE_QKV || role == TK_VROLE_PROJ || role == TK_VROLE_FC1 ||
           role == TK_VROLE_FC2 || role == TK_VROLE_M_FC1 || role == TK_VROLE_M_FC2;
}

static merger *merger_of(struct tk_vision *v, int scope, int index)
{
    return scope == TK_VISION_DEEPSTACK ? &v->taps[index] : &v->main;
}

static tk_weight *matrix_dst(struct tk_vision *v, int role, int scope, int index)
{
    vit_block *b = scope == TK_VISION_BLOCK ? &v->blocks[index] : NULL;
    switch (role) {
    case TK_VROLE_PATCH: return &v->patch;
    case TK_VROLE_QKV: return &b->qkv;
    case TK_VROLE_PROJ: return &b->proj;
    case TK_VROLE_FC1: return &b->fc1;
    case TK_VROLE_FC2: return &b->fc2;
    case TK_VROLE_M_FC1: return &merger_of(v, scope, index)->fc1;
    case TK_VROLE_M_FC2: return &merger_of(v, scope, index)->fc2;
    }
    return NULL;
}

static float **vector_dst(struct tk_vision *v, int role, int scope, int index)
{
    vit_block *b = scope == TK_VISION_BLOCK ? &v->blocks[index] : NULL;
    merger *m = merger_of(v, scope, index);
    switch (role) {
    case TK_VROLE_PATCH_BIAS: return &v->patch_b;
    case TK_VROLE_POS: return &v->pos;
    case TK_VROLE_NORM1: return &b->norm1_w;
    case TK_VROLE_NORM1_BIAS: return &b->norm1_b;
    case TK_VROLE_QKV_BIAS: return &b->qkv_b;
    case TK_VROLE_PROJ_BIAS: return &b->proj_b;
    case TK_VROLE_NORM2: return &b->norm2_w;
    case TK_VROLE_NORM2_BIAS: return &b->norm2_b;
    case TK_VROLE_FC1_BIAS: return &b->fc1_b;
    case TK_VROLE_FC2_BIAS: return &b->fc2_b;
    case TK_VROLE_M_NORM: return &m->norm_w;
    case TK_VROLE_M_NORM_BIAS: return &m->norm_b;
    case TK_VROLE_M_FC1_BIAS: return &m->fc1_b;
    case TK_VROLE_M_FC2_BIAS: return &m->fc2_b;
    }
    return NULL;
}

/* ---- loading ----------------------------------------------------------------------------------------------- */

/* One checked source: its descriptor row, its bytes in the map, and its 2-D view (rows, cols). */
typedef struct {
    const tk_arch_vision_tensor *t;
    const tk_vision_source *src;
    const uint8_t *bytes;
    int64_t rows, cols;
    size_t at;  /* a vector's offset in the float block */
} vjob;

static int count_of(const tk_vision_config *c, int scope)
{
    return scope == TK_VISION_BLOCK ? c->depth : scope == TK_VISION_DEEPSTACK ? c->n_deepstack : 1;
}

static tk_status check_config(const tk_model *m, const tk_vision_config *c)
{
    if (!m->cfg.arch->n_vision)
        return tk_error(TK_ERR_INVALID, "architecture %s has no vision tower", m->cfg.arch->name);
    if (c->depth < 1 || c->d_model < 1 || c->d_ff < 1 || c->n_heads < 1 || c->d_model % c->n_heads ||
        (c->d_model / c->n_heads) % 4 || c->in_channels < 1 || c->patch < 1 || c->temporal_patch < 1 ||
        c->merge < 1 || c->grid_side < 1 || c->out != m->cfg.d_model || c->n_deepstack < 0 ||
        c->n_deepstack > TK_MM_MAX_DEEPSTACK || c->n_deepstack > m->cfg.n_layers ||
        c->act < TK_GELU_ERF || c->act > TK_GELU_QUICK || !(c->rope_theta > 0) || !(c->eps > 0))
        return tk_error(TK_ERR_INVALID, "vision config: a size is out of range (width %d over %d heads, out %d for a "
                        "language model of width %d, %d deepstack taps)", c->d_model, c->n_heads, c->out,
                        m->cfg.d_model, c->n_deepstack);
    for (int k = 0; k < c->n_deepstack; k++)
        if (c->deepstack_at[k] < 0 || c->deepstack_at[k] >= c->depth)
            return tk_error(TK_ERR_INVALID, "vision config: deepstack tap %d after block %d of %d", k,
                            c->deepstack_at[k], c->depth);
    return TK_OK;
}

static tk_status check_source(vjob *job, const tk_arch *a, const tk_vision_config *c, const tk_vision_source *s,
                              const tk_mapped_file *files, int n_files, unsigned char *seen, int *first_of)
{
    const tk_arch_vision_tensor *t = NULL;
    int row = -1;
    for (int j = 0; j < a->n_vision && !t; j++)
        if (strcmp(a->vision[j].name, s->name) == 0) t = &a->vision[j], row = j;
    if (!t) return tk_error(TK_ERR_INVALID, "vision tensor '%s' is not in the %s vision tower", s->name, a->name);
    int count = count_of(c, (int)t->scope);
    if (t->scope == TK_VISION_MODEL ? s->index != -1 : (s->index < 0 || s->index >= count))
        return tk_error(TK_ERR_FORMAT, "vision tensor '%s' has index %d; its %s has %d", s->name, s->index,
                        tk_vision_scope_name((int)t->scope), count);
    unsigned char *flag = &seen[first_of[row] + (s->index > 0 ? s->index : 0)];
    if (*flag) return tk_error(TK_ERR_FORMAT, "vision tensor '%s' (index %d) is given twice", s->name, s->index);
    *flag = 1;
    if (s->file < 0 || s->file >= n_files)
        return tk_error(TK_ERR_INVALID, "vision tensor '%s': file index %d out of range", s->name, s->file);
    int64_t dims[5];
    int nd = eval_shape(dims, t->shape, c);
    int same = nd == s->n_dims;
    for (int d = 0; same && d < nd; d++) same = dims[d] == s->shape[d];
    if (!same)
        return tk_error(TK_ERR_FORMAT, "%s: vision tensor '%s' does not have the shape %s the vision config gives",
                        files[s->file].path, s->name, t->shape);
    int64_t elems = 1;
    for (int d = 0; d < nd; d++) elems *= dims[d];
    int64_t rows = nd == 1 ? 1 : dims[0];
    size_t row_bytes = tk_quant_row_bytes(s->type, (size_t)(elems / rows)); /* 0: not a type (or row) we read */
    if (!row_bytes || s->nbytes != (uint64_t)rows * row_bytes)
        return tk_error(TK_ERR_FORMAT, "%s: vision tensor '%s' must be %lld values in a GGUF type the engine reads "
                        "(F32, F16, BF16, Q8_0, ...: %llu bytes given)", files[s->file].path, s->name,
                        (long long)elems, (unsigned long long)s->nbytes);
    if (s->offset > files[s->file].size || s->nbytes > files[s->file].size - s->offset)
        return tk_error(TK_ERR_FORMAT, "%s: vision tensor '%s' lies past the end of the file", files[s->file].path,
                        s->name);
    job->t = t;
    job->src = s;
    job->bytes = files[s->file].data + s->offset;
    job->rows = rows;
    job->cols = elems / rows;
    return TK_OK;
}

/* The float block's layout (vectors, the position table, the rotary frequencies), then the weights' sizes; with
 * base NULL only counts. */
static size_t layout_vectors(struct tk_vision *v, vjob *jobs, int n, float *base)
{
    tk_arena a = {base, 0};
    for (int j = 0; j < n; j++) {
        if (is_matrix((int)jobs[j].t->role)) continue;
        float *at = tk_arena_take(&a, (size_t)(jobs[j].rows * jobs[j].cols));
        jobs[j].at = (size_t)(at - base);
        if (base) *vector_dst(v, (int)jobs[j].t->role, (int)jobs[j].t->scope, jobs[j].src->index) = at;
    }
    float *inv = tk_arena_take(&a, (size_t)(v->cfg.d_model / v->cfg.n_heads / 2));
    if (base) v->rope_inv_freq = inv;
    return a.at;
}

static tk_status allocate_weights(struct tk_vision *v, vjob *jobs, int n)
{
    tk_backend *be = v->be;
    size_t total = 0;
    for (int pass = 0; pass < 2; pass++) {
        size_t at = 0;
        for (int j = 0; j < n; j++) {
            if (!is_matrix((int)jobs[j].t->role)) continue;
            tk_weight *w = matrix_dst(v, (int)jobs[j].t->role, (int)jobs[j].t->scope, jobs[j].src->index);
            size_t bytes = be->weight_bytes(be, jobs[j].src->type, (int)jobs[j].rows, (int)jobs[j].cols);
            if (!bytes)
                return tk_error(TK_ERR_UNSUPPORTED, "the %s backend cannot hold vision tensor '%s'", be->name,
                                jobs[j].src->name);
            if (pass) {
                *w = (tk_weight){(int)jobs[j].rows, (int)jobs[j].cols, 1, {{jobs[j].src->type, 0, (int)jobs[j].rows,
                                                                              v->wblock + at}}};
            }
            at += bytes;
        }
        if (pass) break;
        total = at;
        if (!(v->wblock = be->alloc(be, total ? total : 64)))
            return tk_error(TK_ERR_NOMEM, "cannot allocate %.1f MB for the vision tower", (double)total / 1e6);
    }
    return TK_OK;
}

/* Fills the float block (host mirror) and the weights from the maps; the rotary frequencies theta^(-4i/d). */
static void convert(struct tk_vision *v, vjob *jobs, int n, float *host)
{
    tk_backend *be = v->be;
    for (int j = 0; j < n; j++) {
        const vjob *job = &jobs[j];
        size_t row_bytes = tk_quant_row_bytes(job->src->type, (size_t)job->cols);
        if (!is_matrix((int)job->t->role)) {
            tk_dequantize(host + job->at, job->bytes, job->src->type, (size_t)(job->rows * job->cols));
            continue;
        }
        tk_weight *w = matrix_dst(v, (int)job->t->role, (int)job->t->scope, job->src->index);
        for (int64_t r = 0; r < job->rows; r++) be->weight_put_row(be, &w->part[0], w->cols, (int)r, job->bytes + r * row_bytes);
    }
    int d = v->cfg.d_model / v->cfg.n_heads, quarter = d / 4;
    float *inv = host + (v->rope_inv_freq - v->block);
    for (int i = 0; i < quarter; i++) {
        /* as transformers: 1 / theta^(2i / (d/2)) in float32, the same for rows and columns */
        float f = 1.0f / powf(v->cfg.rope_theta, (float)(2 * i) / (float)(d / 2));
        inv[i] = inv[quarter + i] = f;
        v->rope_axis[i] = 0, v->rope_axis[quarter + i] = 1;
    }
}

static tk_status load(struct tk_vision **out, tk_model *m, const tk_vision_config *c, const char *const *paths,
                      int n_paths, const tk_vision_source *src, int n_src, tk_backend *be)
{
    *out = NULL;
    TK_TRY(check_config(m, c));
    const tk_arch *a = m->cfg.arch;
    struct tk_vision *v = calloc(1, sizeof *v);
    tk_mapped_file *files = calloc((size_t)(n_paths > 0 ? n_paths : 1), sizeof *files);
    vjob *jobs = calloc((size_t)(n_src > 0 ? n_src : 1), sizeof *jobs);
    int first_of[a->n_vision + 1], n_flags = 0;
    for (int j = 0; j < a->n_vision; j++) first_of[j] = n_flags, n_flags += count_of(c, (int)a->vision[j].scope);
    unsigned char *seen = calloc((size_t)n_flags + 1, 1);
    float *host = NULL;
    tk_status s = TK_OK;
    if (!v || !files || !jobs || !seen) {
        s = tk_error(TK_ERR_NOMEM, "out of memory loading the vision tower");
        goto done;
    }
    v->cfg = *c;
    tk_backend_retain(be);
    v->be = be;
    v->blocks = calloc((size_t)c->depth, sizeof *v->blocks);
    v->taps = calloc((size_t)(c->n_deepstack > 0 ? c->n_deepstack : 1), sizeof *v->taps);
    v->rope_axis = malloc((size_t)(c->d_model / c->n_heads / 2));
    if (!v->blocks || !v->taps || !v->rope_axis) {
        s = tk_error(TK_ERR_NOMEM, "out of memory loading the vision tower");
        goto done;
    }
    for (int f = 0; f < n_paths && s == TK_OK; f++) s = tk_file_map(&files[f], paths[f]);
    for (int i = 0; i < n_src && s == TK_OK; i++) s = check_source(&jobs[i], a, c, &src[i], files, n_paths, seen, first_of);
    for (int j = 0; j < a->n_vision && s == TK_OK; j++)
        for (int k = 0; k < count_of(c, (int)a->vision[j].scope) && s == TK_OK; k++)
            if (!seen[first_of[j] + k])
                s = tk_error(TK_ERR_FORMAT, "the model files have no vision tensor '%s' (index %d)", a->vision[j].name,
                             a->vision[j].scope == TK_VISION_MODEL ? -1 : k);
    if (s == TK_OK) {
        v->block_floats = layout_vectors(v, jobs, n_src, NULL);
        v->block = be->alloc(be, v->block_floats * sizeof(float));
        host = calloc(v->block_floats, sizeof(float));
        if (!v->block || !host) s = tk_error(TK_ERR_NOMEM, "out of memory loading the vision tower");
    }
    if (s == TK_OK) {
        layout_vectors(v, jobs, n_src, v->block);
        s = allocate_weights(v, jobs, n_src);
    }
    if (s == TK_OK) {
        convert(v, jobs, n_src, host);
        be->upload(be, v->block, host, v->block_floats * sizeof(float));
        s = be->sync(be);
    }
done:
    for (int f = 0; files && f < n_paths; f++) tk_file_unmap(&files[f]);
    free(files), free(jobs), free(seen), free(host);
    if (s != TK_OK) tk_vision_free(v);
    else *out = v;
    return s;
}

/* ---- the load request -------------------------------------------------------------------------------------- */

typedef struct {
    tk_model *model;
    tk_vision_config cfg;
    char **paths;
    int n_paths;
    tk_vision_source *src;
    int n_src;
} load_payload;

static void load_free(void *p)
{
    load_payload *lp = p;
    if (!lp) return;
    for (int i = 0; lp->paths && i < lp->n_paths; i++) free(lp->paths[i]);
    for (int i = 0; lp->src && i < lp->n_src; i++) free((char *)lp->src[i].name);
    free(lp->paths), free(lp->src);
    tk_model_release(lp->model);
    free(lp);
}

static tk_status load_run(void *p, tk_exec *exec)
{
    load_payload *lp = p;
    if (atomic_load(&lp->model->vision)) return TK_OK; /* loaded by an earlier request */
    struct tk_vision *v;
    TK_TRY(load(&v, lp->model, &lp->cfg, (const char *const *)lp->paths, lp->n_paths, lp->src, lp->n_src,
                exec->backend));
    struct tk_vision *expected = NULL;
    if (!atomic_compare_exchange_strong(&lp->model->vision, &expected, v)) tk_vision_free(v);
    return TK_OK;
}

tk_status tk_vision_load_request_create(tk_request **out, tk_model *m, const tk_vision_config *cfg,
                                        const char *const *paths, int n_paths, const tk_vision_source *src, int n_src)
{
    *out = NULL;
    TK_TRY(check_config(m, cfg));
    load_payload *lp = calloc(1, sizeof *lp);
    if (!lp) return tk_error(TK_ERR_NOMEM, "out of memory");
    lp->cfg = *cfg;
    lp->paths = calloc((size_t)(n_paths > 0 ? n_paths : 1), sizeof *lp->paths);
    lp->src = calloc((size_t)(n_src > 0 ? n_src : 1), sizeof *lp->src);
    int ok = lp->paths && lp->src;
    for (int i = 0; ok && i < n_paths; i++, lp->n_paths++) ok = (lp->paths[i] = strdup(paths[i])) != NULL;
    for (int i = 0; ok && i < n_src; i++, lp->n_src++) {
        lp->src[i] = src[i];
        ok = (lp->src[i].name = strdup(src[i].name ? src[i].name : "")) != NULL;
    }
    tk_request *req = ok ? tk_request_new(load_run, lp, load_free) : NULL;
    if (!req) {
        load_free(lp);
        return tk_error(TK_ERR_NOMEM, "out of memory");
    }
    tk_model_retain(m);
    lp->model = m;
    *out = req;
    return TK_OK;
}

/* ---- the forward pass -------------------------------------------------------------------------------------- */

typedef struct {
    tk_model *model;
    float *pixels;       /* [N, C Tp P P] host */
    int32_t *grids;      /* [n_images][3] */
    int n_images, n_patches;
    float *result;       /* [1 + taps, N / merge^2, O] */
} run_payload;

static void run_free(void *p)
{
    run_payload *rp = p;
    if (!rp) return;
    tk_model_release(rp->model);
    free(rp->pixels), free(rp->grids), free(rp->result);
    free(rp);
}

/* The bilinear resampling of the [side, side] table to each image's grid (corner-aligned, float32 as
 * transformers computes it): for patch i, 4 taps with table rows and weights. */
static void axis_taps(int index, int size, int side, int taps[2], float weights[2])
{
    float src = (float)index * (float)(side - 1) / (float)(size > 1 ? size - 1 : 1);
    float fl = floorf(src), frac = src - fl;
    taps[0] = (int)fl;
    taps[1] = taps[0] + 1 < side ? taps[0] + 1 : side - 1;
    weights[0] = 1.0f - frac, weights[1] = frac;
}

/* row and column of patch i of a gh x gw grid in merge-block order */
static void patch_cell(int i, int gw, int merge, int *row, int *col)
{
    int per = merge * merge, block = i / per, within = i % per;
    *row = (block / (gw / merge)) * merge + within / merge;
    *col = (block % (gw / merge)) * merge + within % merge;
}

/* Scratch of one pass over N patches: [floats] */
typedef struct {
    float *x, *h, *qkv, *att, *ff, *pos, *cos, *sin, *m1, *m2, *attn_work;
    float **dst, **src_rows;   /* host pointer arrays: [4N] */
    float *scale;              /* host [4N] */
    int32_t *rc, *seq_start;   /* host: [N][2] rows and columns, [n_images + 1] */
} scratch;

static tk_workspace carve(scratch *s, float *work, float *host, const struct tk_vision *v, int N, int n_images,
                          int max_len)
{
    const tk_vision_config *c = &v->cfg;
    size_t n = (size_t)N, D = (size_t)c->d_model, M = (size_t)c->merge * c->merge;
    size_t half = D / c->n_heads / 2, wide = n / M * M * D; /* a merger's [N / M, M D] */
    tk_arenas a = {{work, 0}, {host, 0}};
    scratch dummy;
    if (!s) s = &dummy;
    s->x = tk_arena_take(&a.dev, n * D);
    s->h = tk_arena_take(&a.dev, n * D);
    s->qkv = tk_arena_take(&a.dev, n * 3 * D);
    s->att = tk_arena_take(&a.dev, n * D);
    s->ff = tk_arena_take(&a.dev, n * (size_t)c->d_ff);
    s->pos = tk_arena_take(&a.dev, n * D);
    s->cos = tk_arena_take(&a.dev, n * half);
    s->sin = tk_arena_take(&a.dev, n * half);
    s->m1 = tk_arena_take(&a.dev, wide);
    s->m2 = tk_arena_take(&a.dev, wide);
    s->attn_work = tk_arena_take(&a.dev, v->be->attention_workspace(v->be, N, max_len, c->n_heads, (int)(2 * half)));
    s->dst = (float **)tk_arena_take(&a.host, (4 * n * sizeof(float *) + 3) / 4);
    s->src_rows = (float **)tk_arena_take(&a.host, (4 * n * sizeof(float *) + 3) / 4);
    s->scale = tk_arena_take(&a.host, 4 * n);
    s->rc = (int32_t *)tk_arena_take(&a.host, 2 * n);
    s->seq_start = (int32_t *)tk_arena_take(&a.host, (size_t)n_images + 1);
    return tk_arenas_used(&a);
}

/* y[rows, out] = x W^T + b */
static void linear(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, const float *b,
                   int rows)
{
    be->matmul_w(be, y, ldy, x, ldx, w, rows, 1.0f, 0.0f);
    be->add_bias(be, y, ldy, b, rows, w->rows);
}

/* out[N / M, O] = a merger of x[N, D] (post_norm: the LayerNorm over the regrouped rows, a deepstack tap's) */
static void run_merger(const struct tk_vision *v, const merger *mg, float *out, const float *x, int N, int post_norm,
                       const scratch *s)
{
    tk_backend *be = v->be;
    int D = v->cfg.d_model, M = v->cfg.merge * v->cfg.merge, rows = N / M, wide = M * D;
    if (post_norm) be->layer_norm(be, s->m1, wide, x, wide, mg->norm_w, mg->norm_b, rows, wide, v->cfg.eps);
    else be->layer_norm(be, s->m1, D, x, D, mg->norm_w, mg->norm_b, N, D, v->cfg.eps); /* [N, D] = [N/M, M D] */
    linear(be, s->m2, wide, s->m1, wide, &mg->fc1, mg->fc1_b, rows);
    be->gelu(be, s->m2, wide, s->m2, wide, rows, wide, TK_GELU_ERF);
    linear(be, out, v->cfg.out, s->m2, wide, &mg->fc2, mg->fc2_b, rows);
}

/* x[N, D] = patch embedding + resampled positions; rope tables; sequence bounds (host pieces first) */
static void embed_patches(const struct tk_vision *v, const run_payload *rp, const scratch *s, const float *pixels)
{
    tk_backend *be = v->be;
    const tk_vision_config *c = &v->cfg;
    int D = c->d_model, side = c->grid_side, n = 0, at = 0;
    linear(be, s->x, D, pixels, (int)v->patch.cols, &v->patch, v->patch_b, rp->n_patches);
    s->seq_start[0] = 0;
    for (int img = 0; img < rp->n_images; img++) {
        int gh = rp->grids[3 * img + 1], gw = rp->grids[3 * img + 2];
        for (int i = 0; i < gh * gw; i++, at++) {
            int row, col, ht[2], wt[2];
            float hw[2], ww[2];
            patch_cell(i, gw, c->merge, &row, &col);
            s->rc[2 * at] = row, s->rc[2 * at + 1] = col;
            axis_taps(row, gh, side, ht, hw);
            axis_taps(col, gw, side, wt, ww);
            for (int a = 0; a < 2; a++)
                for (int b = 0; b < 2; b++, n++) {
                    s->dst[n] = s->pos + (size_t)at * D;
                    s->src_rows[n] = v->pos + (size_t)(ht[a] * side + wt[b]) * D;
                    s->scale[n] = hw[a] * ww[b];
                }
        }
        s->seq_start[img + 1] = at;
    }
    be->zero_rows(be, s->pos, D, rp->n_patches, D);
    be->add_rows(be, s->dst, (const float *const *)s->src_rows, s->scale, n, D);
    for (int i = 0; i < rp->n_patches; i++) s->dst[i] = s->x + (size_t)i * D, s->src_rows[i] = s->pos + (size_t)i * D;
    be->add_rows(be, s->dst, (const float *const *)s->src_rows, NULL, rp->n_patches, D);
    int half = D / c->n_heads / 2;
    be->rope_table(be, s->cos, s->sin, s->rc, 2, rp->n_patches, v->rope_inv_freq, v->rope_axis, half);
}

static void run_block(const struct tk_vision *v, const vit_block *b, const scratch *s, int N, int n_images)
{
    tk_backend *be = v->be;
    const tk_vision_config *c = &v->cfg;
    int D = c->d_model, H = c->n_heads, Dh = D / H, F = c->d_ff;
    be->layer_norm(be, s->h, D, s->x, D, b->norm1_w, b->norm1_b, N, D, c->eps);
    linear(be, s->qkv, 3 * D, s->h, D, &b->qkv, b->qkv_b, N);
    be->rope(be, s->qkv, 3 * D, N, H, Dh, s->cos, s->sin, 0);
    be->rope(be, s->qkv + D, 3 * D, N, H, Dh, s->cos, s->sin, 0);
    be->attention_full(be, s->att, D, s->qkv, s->qkv + D, s->qkv + 2 * D, 3 * D, s->seq_start, n_images, H, Dh,
                       s->attn_work);
    linear(be, s->h, D, s->att, D, &b->proj, b->proj_b, N);
    for (int i = 0; i < N; i++) s->dst[i] = s->x + (size_t)i * D, s->src_rows[i] = s->h + (size_t)i * D;
    be->add_rows(be, s->dst, (const float *const *)s->src_rows, NULL, N, D);
    be->layer_norm(be, s->h, D, s->x, D, b->norm2_w, b->norm2_b, N, D, c->eps);
    linear(be, s->ff, F, s->h, D, &b->fc1, b->fc1_b, N);
    be->gelu(be, s->ff, F, s->ff, F, N, F, c->act);
    linear(be, s->h, D, s->ff, F, &b->fc2, b->fc2_b, N);
    be->add_rows(be, s->dst, (const float *const *)s->src_rows, NULL, N, D);
}

static tk_status run(void *p, tk_exec *exec)
{
    run_payload *rp = p;
    const struct tk_vision *v = atomic_load(&rp->model->vision);
    if (!v) return tk_error(TK_ERR_INVALID, "vision: the model's vision tower is not loaded");
    tk_backend *be = exec->backend;
    const tk_vision_config *c = &v->cfg;
    int N = rp->n_patches, M = c->merge * c->merge, tokens = N / M, O = c->out, max_len = 0;
    for (int i = 0; i < rp->n_images; i++) {
        int len = rp->grids[3 * i + 1] * rp->grids[3 * i + 2];
        if (len > max_len) max_len = len;
    }
    size_t K = (size_t)v->patch.cols, n_out = (size_t)(1 + c->n_deepstack) * (size_t)tokens * (size_t)O;
    tk_workspace need = carve(NULL, NULL, NULL, v, N, rp->n_images, max_len);
    float *work = tk_exec_scratch(exec, need.dev + (size_t)N * K + n_out);
    float *host = work ? tk_exec_host_scratch(exec, need.host) : NULL;
    rp->result = malloc(n_out * sizeof(float));
    if (!work || !host || !rp->result)
        return tk_error(TK_ERR_NOMEM, "vision: cannot allocate memory for %d patches", N);
    scratch s;
    carve(&s, work, host, v, N, rp->n_images, max_len);
    float *pixels = work + need.dev, *out = pixels + (size_t)N * K;
    be->upload(be, pixels, rp->pixels, (size_t)N * K * sizeof(float));
    embed_patches(v, rp, &s, pixels);
    for (int i = 0, tap = 0; i < c->depth; i++) {
        run_block(v, &v->blocks[i], &s, N, rp->n_images);
        for (int k = 0; k < c->n_deepstack; k++)
            if (c->deepstack_at[k] == i)
                run_merger(v, &v->taps[k], out + (size_t)(1 + tap++) * tokens * O, s.x, N, 1, &s);
    }
    run_merger(v, &v->main, out, s.x, N, 0, &s);
    be->download(be, rp->result, out, n_out * sizeof(float));
    return be->sync(be);
}

tk_status tk_vision_request_create(tk_request **out, tk_model *m, const float *pixels, long n_values,
                                   const int32_t *grids, int n_images)
{
    *out = NULL;
    const struct tk_vision *v = atomic_load(&m->vision);
    if (!v) return tk_error(TK_ERR_INVALID, "vision: load the model's vision tower first");
    const tk_vision_config *c = &v->cfg;
    long K = (long)v->patch.cols, n_patches = 0;
    if (n_images < 1) return tk_error(TK_ERR_INVALID, "vision: no images given");
    for (int i = 0; i < n_images; i++) {
        int t = grids[3 * i], gh = grids[3 * i + 1], gw = grids[3 * i + 2];
        if (t != 1 || gh < c->merge || gw < c->merge || gh % c->merge || gw % c->merge || gh > (1 << 14) ||
            gw > (1 << 14))
            return tk_error(TK_ERR_INVALID, "vision: image %d has grid (%d, %d, %d); an image is one frame of rows and "
                            "columns multiples of %d", i, t, gh, gw, c->merge);
        n_patches += (long)gh * gw;
        if (n_patches > (1L << 24)) return tk_error(TK_ERR_INVALID, "vision: more than %ld patches", 1L << 24);
    }
    if (n_values != n_patches * K)
        return tk_error(TK_ERR_INVALID, "vision: %ld pixel values for %ld patches of %ld", n_values, n_patches, K);
    for (long i = 0; i < n_values; i++)
        if (!isfinite(pixels[i])) return tk_error(TK_ERR_INVALID, "vision: pixel value %ld is not finite", i);
    run_payload *rp = calloc(1, sizeof *rp);
    if (rp) {
        rp->pixels = malloc((size_t)n_values * sizeof(float));
        rp->grids = malloc((size_t)n_images * 3 * sizeof(int32_t));
    }
    tk_request *req = rp && rp->pixels && rp->grids ? tk_request_new(run, rp, run_free) : NULL;
    if (!req) {
        run_free(rp);
        return tk_error(TK_ERR_NOMEM, "out of memory");
    }
    memcpy(rp->pixels, pixels, (size_t)n_values * sizeof(float));
    memcpy(rp->grids, grids, (size_t)n_images * 3 * sizeof(int32_t));
    rp->n_images = n_images;
    rp->n_patches = (int)n_patches;
    tk_model_retain(m);
    rp->model = m;
    *out = req;
    return TK_OK;
}

const float *tk_vision_request_result(tk_request *req, int *tokens, int *blocks, int *width)
{
    run_payload *rp = tk_request_payload(req);
    if (!tk_request_done(req) || !rp->result) return NULL;
    const struct tk_vision *v = atomic_load(&rp->model->vision);
    *tokens = rp->n_patches / (v->cfg.merge * v->cfg.merge);
    *blocks = 1 + v->cfg.n_deepstack;
    *width = v->cfg.out;
    return rp->result;
}
