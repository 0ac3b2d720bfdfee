/* prefix_cache.c - the prefix cache's block tree, its LRU eviction and the copies in and out (see
 * prefix_cache.h).
 *
 * Owns every block: a node (host memory: its tokens, tree links, pin count, last use) and its keys and values
 * (one device buffer from the backend: [2][L][TK_PREFIX_BLOCK][KV], keys then values, layer-major, so each
 * layer's rows of a block are one contiguous piece on both sides of a copy). Invariants: a node's children
 * continue its path by one block each, with distinct tokens; a top-level node's key is its subtree's; `bytes`
 * is the sum of the blocks' buffers; only leaves (no children) with no pins are evicted.
 */
#include "prefix_cache.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct tk_prefix_node {
    tk_prefix_key key;                    /* of its top-level ancestor (compared at the top level only) */
    int32_t tokens[TK_PREFIX_BLOCK];
    int depth;                            /* blocks before it on its path */
    struct tk_prefix_node *parent;        /* NULL at the top level */
    struct tk_prefix_node *children;      /* first child; they are linked through next_sibling */
    struct tk_prefix_node *next_sibling;
    struct tk_prefix_node *prev, *next;   /* every node, for the eviction scan */
    float *kv;                            /* [2][L][B][KV] device buffer */
    uint64_t last_used;                   /* the cache's clock at its last lookup or insert */
    int pins;                             /* lookups whose rows are still being read */
};

struct tk_prefix_cache {
    pthread_mutex_t mutex;
    int n_layers, kv_floats;
    size_t block_bytes;                   /* of one block's buffer */
    tk_prefix_node *top;                  /* top-level blocks, through next_sibling */
    tk_prefix_node *all;                  /* every block, through next */
    uint64_t clock;
    tk_prefix_stats stats;
};

tk_prefix_cache *tk_prefix_cache_create(int n_layers, int kv_floats, size_t limit)
{
    tk_prefix_cache *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    if (pthread_mutex_init(&c->mutex, NULL) != 0) {
        free(c);
        return NULL;
    }
    c->n_layers = n_layers, c->kv_floats = kv_floats;
    c->block_bytes = 2 * (size_t)n_layers * TK_PREFIX_BLOCK * (size_t)kv_floats * sizeof(float);
    c->stats.limit = limit;
    return c;
}

/* ---- the tree ------------------------------------------------------------------------------- */

/* The child of parent (NULL: the top level, where the key must match too) that holds these tokens, or NULL. */
static tk_prefix_node *find_child(const tk_prefix_cache *c, const tk_prefix_node *parent, tk_prefix_key key,
                                  const int32_t *tokens)
{
    for (tk_prefix_node *n = parent ? parent->children : c->top; n; n = n->next_sibling)
        if ((parent || (n->key.adapter == key.adapter && n->key.version == key.version)) &&
            memcmp(n->tokens, tokens, sizeof n->tokens) == 0)
            return n;
    return NULL;
}

/* Unlinks a leaf from its parent's children (or the top level) and from the list of all blocks, and frees it. */
static void remove_leaf(tk_prefix_cache *c, tk_backend *be, tk_prefix_node *n)
{
    tk_prefix_node **link = n->parent ? &n->parent->children : &c->top;
    while (*link != n) link = &(*link)->next_sibling;
    *link = n->next_sibling;
    if (n->prev) n->prev->next = n->next;
    else c->all = n->next;
    if (n->next) n->next->prev = n->prev;
    be->free(be, n->kv);
    free(n);
    c->stats.blocks--;
    c->stats.bytes -= c->block_bytes;
    c->stats.blocks_evicted++;
}

/* The least recently used leaf that nothing pins (the deeper one on a tie: a run's blocks share their last
 * use, and its tail goes first), or NULL. */
static tk_prefix_node *eviction_victim(const tk_prefix_cache *c)
{
    tk_prefix_node *best = NULL;
    for (tk_prefix_node *n = c->all; n; n = n->next) {
        if (n->children || n->pins) continue;
        if (!best || n->last_used < best->last_used || (n->last_used == best->last_used && n->depth > best->depth))
            best = n;
    }
    return best;
}

/* Evicts until `more` bytes fit under the limit; returns whether they do. */
static int make_room(tk_prefix_cache *c, tk_backend *be, size_t more)
{
    while (c->stats.bytes + more > c->stats.limit) {
        tk_prefix_node *victim = eviction_victim(c);
        if (!victim) return 0;
        remove_leaf(c, be, victim);
    }
    return 1;
}

void tk_prefix_cache_set_limit(tk_prefix_cache *c, tk_backend *be, size_t limit)
{
    pthread_mutex_lock(&c->mutex);
    c->stats.limit = limit;
    make_room(c, be, 0);
    pthread_mutex_unlock(&c->mutex);
}

void tk_prefix_cache_stats(tk_prefix_cache *c, tk_prefix_stats *out)
{
    pthread_mutex_lock(&c->mutex);
    *out = c->stats;
    pthread_mutex_unlock(&c->mutex);
}

int tk_prefix_cache_enabled(tk_prefix_cache *c)
{
    pthread_mutex_lock(&c->mutex);
    int on = c->stats.limit >= c->block_bytes;
    pthread_mutex_unlock(&c->mutex);
    return on;
}

void tk_prefix_cache_count_prefill(tk_prefix_cache *c, long n)
{
    pthread_mutex_lock(&c->mutex);
    c->stats.tokens_prefilled += (uint64_t)n;
    pthread_mutex_unlock(&c->mutex);
}

void tk_prefix_cache_free(tk_prefix_cache *c, tk_backend *be)
{
    if (!c) return;
    for (tk_prefix_node *n = c->all, *next; n; n = next) {
        next = n->next;
        be->free(be, n->kv);
        free(n);
    }
    pthread_mutex_destroy(&c->mutex);
    free(c);
}

/* ---- copies between blocks and an engine cache -------------------------------------------------- */

/* Row pointers for copy_rows, flushed when full: a block is 2L pieces (keys and values of each layer), a run
 * of blocks many of those. */
enum { BATCH_PIECES = 64 };

typedef struct {
    tk_backend *be;
    int n, floats;
    float *dst[BATCH_PIECES];
    const float *src[BATCH_PIECES];
} piece_batch;

static void flush(piece_batch *pb)
{
    if (pb->n) pb->be->copy_rows(pb->be, pb->dst, pb->src, pb->n, pb->floats);
    pb->n = 0;
}

static void add_piece(piece_batch *pb, float *dst, const float *src)
{
    pb->dst[pb->n] = dst, pb->src[pb->n++] = src;
    if (pb->n == BATCH_PIECES) flush(pb);
}

/* Block `n`'s rows to or from rows [row0, row0 + B) of an engine cache (k, v: layer l at + l * stride). */
static void copy_block(const tk_prefix_cache *c, piece_batch *pb, const tk_prefix_node *n, float *k, float *v,
                       const float *k_src, const float *v_src, size_t stride, size_t row0, int to_block)
{
    size_t piece = (size_t)TK_PREFIX_BLOCK * (size_t)c->kv_floats, at = row0 * (size_t)c->kv_floats;
    for (int l = 0; l < c->n_layers; l++) {
        float *bk = n->kv + (size_t)l * piece, *bv = bk + (size_t)c->n_layers * piece;
        if (to_block) {
            add_piece(pb, bk, k_src + (size_t)l * stride + at);
            add_piece(pb, bv, v_src + (size_t)l * stride + at);
        } else {
            add_piece(pb, k + (size_t)l * stride + at, bk);
            add_piece(pb, v + (size_t)l * stride + at, bv);
        }
    }
}

void tk_prefix_cache_read(tk_prefix_cache *c, tk_backend *be, const tk_prefix_node *hit, float *k, float *v,
                          size_t stride)
{
    piece_batch pb = {be, 0, TK_PREFIX_BLOCK * c->kv_floats, {0}, {0}};
    /* a pinned run's blocks cannot be evicted (its last block pins its path: only leaves go) */
    for (const tk_prefix_node *n = hit; n; n = n->parent)
        copy_block(c, &pb, n, k, v, NULL, NULL, stride, (size_t)n->depth * TK_PREFIX_BLOCK, 0);
    flush(&pb);
}

/* ---- lookups and inserts ------------------------------------------------------------------------ */

int tk_prefix_cache_lookup(tk_prefix_cache *c, tk_prefix_key key, const int32_t *tokens, int n, int max_tokens,
                           tk_prefix_node **hit)
{
    *hit = NULL;
    if (max_tokens > n) max_tokens = n;
    pthread_mutex_lock(&c->mutex);
    uint64_t now = ++c->clock;
    tk_prefix_node *at = NULL;
    int blocks = 0;
    for (; (blocks + 1) * TK_PREFIX_BLOCK <= max_tokens; blocks++) {
        tk_prefix_node *next = find_child(c, at, key, tokens + (size_t)blocks * TK_PREFIX_BLOCK);
        if (!next) break;
        next->last_used = now;
        at = next;
    }
    int reused = blocks * TK_PREFIX_BLOCK;
    c->stats.lookups++;
    if (at) {
        at->pins++;
        c->stats.hits++;
        c->stats.tokens_reused += (uint64_t)reused;
    }
    pthread_mutex_unlock(&c->mutex);
    *hit = at;
    return reused;
}

void tk_prefix_cache_unpin(tk_prefix_cache *c, tk_backend *be, tk_prefix_node *hit)
{
    if (!hit) return;
    pthread_mutex_lock(&c->mutex);
    hit->pins--;
    make_room(c, be, 0); /* the bound was lowered while it was pinned */
    pthread_mutex_unlock(&c->mutex);
}

/* A new block under parent (NULL: top level) holding these tokens, room made for it and its rows copied in
 * (through pb); NULL when it does not fit or cannot be allocated. The parent is pinned meanwhile: making
 * room must not evict the block it hangs from. */
static tk_prefix_node *new_block(tk_prefix_cache *c, tk_backend *be, piece_batch *pb, tk_prefix_node *parent,
                                 tk_prefix_key key, const int32_t *tokens, int depth, const float *k, const float *v,
                                 size_t stride)
{
    if (c->block_bytes > c->stats.limit) return NULL; /* would empty the cache and still not fit */
    if (parent) parent->pins++;
    int room = make_room(c, be, c->block_bytes);
    if (parent) parent->pins--;
    if (!room) return NULL;
    tk_prefix_node *n = calloc(1, sizeof *n);
    if (n) n->kv = be->alloc(be, c->block_bytes);
    if (!n || !n->kv) { /* out of memory: the prompt is simply not cached further */
        free(n);
        return NULL;
    }
    n->key = parent ? parent->key : key;
    memcpy(n->tokens, tokens, sizeof n->tokens);
    n->depth = depth, n->parent = parent;
    copy_block(c, pb, n, NULL, NULL, k, v, stride, (size_t)depth * TK_PREFIX_BLOCK, 1);
    tk_prefix_node **siblings = parent ? &parent->children : &c->top;
    n->next_sibling = *siblings, *siblings = n;
    n->next = c->all;
    if (c->all) c->all->prev = n;
    c->all = n;
    c->stats.blocks++;
    c->stats.bytes += c->block_bytes;
    c->stats.blocks_inserted++;
    return n;
}

void tk_prefix_cache_insert(tk_prefix_cache *c, tk_backend *be, tk_prefix_key key, const int32_t *tokens, int n,
                            const float *k, const float *v, size_t stride)
{
    piece_batch pb = {be, 0, TK_PREFIX_BLOCK * c->kv_floats, {0}, {0}};
    pthread_mutex_lock(&c->mutex);
    uint64_t now = ++c->clock;
    tk_prefix_node *at = NULL;
    for (int b = 0; (b + 1) * TK_PREFIX_BLOCK <= n; b++) {
        const int32_t *block = tokens + (size_t)b * TK_PREFIX_BLOCK;
        tk_prefix_node *next = find_child(c, at, key, block);
        if (!next) next = new_block(c, be, &pb, at, key, block, b, k, v, stride);
        if (!next) break;
        next->last_used = now;
        at = next;
    }
    flush(&pb); /* before unlocking: a block's rows are in place before anyone can look it up */
    pthread_mutex_unlock(&c->mutex);
}
