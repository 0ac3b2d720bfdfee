/* prefix_cache.h - a base model's cache of prompt prefixes' keys and values, for sampling.
 *
 * Requests whose prompts start with the same tokens under the same weights (a system prompt, a few-shot
 * preamble, the turns so far of a conversation) reuse those tokens' keys and values instead of prefilling them
 * again, as vLLM's and SGLang's prefix caches do. The cache is a tree of blocks of TK_PREFIX_BLOCK tokens
 * (SGLang's radix tree, at vLLM's block granularity): a block holds the keys and values of its tokens in every
 * layer, given the blocks on its path from the root before it; a top-level block also carries the weights'
 * identity (tk_prefix_key) that every block under it shares.
 *
 * A lookup returns the longest run of whole cached blocks that starts a prompt (up to a bound the caller sets:
 * the prompt's last token is always prefilled, its logits being needed) and pins the run's last block; the
 * caller copies the run's rows into its own cache (tk_prefix_cache_read) and unpins it. After a prefill the
 * caller inserts the prompt's whole blocks (those not cached yet are copied in). Memory is bounded by a limit
 * in bytes: inserting evicts the least recently used unpinned leaf blocks (a block with cached continuations is
 * never evicted before them, so every cached block stays reachable from the root); a block that does not fit
 * is not cached. Allocation failure only means a block is not cached: nothing here fails a request.
 *
 * The tree is shared by every thread that samples on the model; one mutex guards it (the engine's worker thread
 * does the lookups and inserts, any thread may read the stats or change the limit).
 */
#ifndef TK_PREFIX_CACHE_H
#define TK_PREFIX_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "../backend/backend.h"

enum { TK_PREFIX_BLOCK = 16 }; /* tokens per block (vLLM's default block size) */
/* The bound a model's cache starts with (TINKER_PREFIX_CACHE_MB overrides it: tinker/_engine.py) */
#define TK_PREFIX_CACHE_DEFAULT_BYTES ((size_t)256 << 20)

/* Whose weights computed a block's keys and values: an adapter's unique id (0: the base model alone) and the
 * version of its weights (bumped by every change: a training adapter's optim_step or loaded state). */
typedef struct {
    uint64_t adapter, version;
} tk_prefix_key;

typedef struct {
    uint64_t lookups;          /* prompts looked up */
    uint64_t hits;             /* of them, prompts that reused at least one block */
    uint64_t tokens_reused;    /* prompt tokens whose keys and values came from the cache */
    uint64_t tokens_prefilled; /* prompt tokens prefilled (cache on or off: tk_prefix_cache_count_prefill) */
    uint64_t blocks_inserted, blocks_evicted;
    size_t blocks;             /* held now */
    size_t bytes, limit;       /* held now (keys and values), and the bound */
} tk_prefix_stats;

typedef struct tk_prefix_cache tk_prefix_cache;
typedef struct tk_prefix_node tk_prefix_node;

/* An empty cache for a model of n_layers layers whose key and value rows are kv_floats wide, holding at most
 * limit bytes (0: disabled). NULL when out of memory (the model then samples without one). */
tk_prefix_cache *tk_prefix_cache_create(int n_layers, int kv_floats, size_t limit);
/* Frees every block (none may be pinned) through be, then the cache. NULL: nothing. */
void tk_prefix_cache_free(tk_prefix_cache *c, tk_backend *be);

/* Sets the bound; blocks past it are evicted now (pinned ones, and the blocks they hang from, when unpinned). */
void tk_prefix_cache_set_limit(tk_prefix_cache *c, tk_backend *be, size_t limit);
void tk_prefix_cache_stats(tk_prefix_cache *c, tk_prefix_stats *out);
/* 1 when the limit lets it hold anything (0 disables the cache: no lookups, nothing inserted). */
int tk_prefix_cache_enabled(tk_prefix_cache *c);

/* The number of leading tokens of tokens[0 .. n) whose blocks are cached under key, whole blocks only and at
 * most max_tokens; when it is > 0, *hit is the run's last block, pinned (tk_prefix_cache_unpin). Counts a
 * lookup (and a hit). */
int tk_prefix_cache_lookup(tk_prefix_cache *c, tk_prefix_key key, const int32_t *tokens, int n, int max_tokens,
                           tk_prefix_node **hit);
/* Copies a pinned run's rows (its tokens, from the root) into a cache laid out as the engine's: layer l's
 * key rows at k + l * stride, rows of kv_floats, row i of the run at row i; values likewise. */
void tk_prefix_cache_read(tk_prefix_cache *c, tk_backend *be, const tk_prefix_node *hit, float *k, float *v,
                          size_t stride);
/* Unpins a run (blocks past the bound, if it was lowered meanwhile, are evicted now). */
void tk_prefix_cache_unpin(tk_prefix_cache *c, tk_backend *be, tk_prefix_node *hit);

/* Caches the whole blocks of tokens[0 .. n) under key from rows laid out as tk_prefix_cache_read's (rows of
 * blocks already cached are not read); stops at the first block that cannot be cached. */
void tk_prefix_cache_insert(tk_prefix_cache *c, tk_backend *be, tk_prefix_key key, const int32_t *tokens, int n,
                            const float *k, const float *v, size_t stride);
/* Adds n to tokens_prefilled (the engine counts every prompt token it prefills, so hit rates can be read). */
void tk_prefix_cache_count_prefill(tk_prefix_cache *c, long n);

#endif
