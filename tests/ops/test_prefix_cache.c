/* test_prefix_cache.c - the prefix cache's block tree on its own (csrc/model/prefix_cache.c), over a fake
 * backend whose buffers are host memory and whose alloc can be made to fail.
 *
 *     test_prefix_cache
 *
 * Checks: the longest run of whole blocks under the same key, capped by max_tokens; keys never mix; the rows
 * read back are the rows inserted, at their positions; LRU eviction of leaves only (a run's parent outlives
 * its continuation, so every block stays reachable), the bytes never over the bound; a pinned run survives a
 * lowered bound and goes when unpinned; a bound below one block caches nothing; a failing alloc only stops an
 * insert; the counters. Built and run by tests/test_sampling_prefix_cache.py under AddressSanitizer and UBSan
 * (the tree's frees). Prints the failed checks and exits 1 if any.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/prefix_cache.h"

static int failures, checks;

#define CHECK(cond)                                                              \
    do {                                                                         \
        checks++;                                                                \
        if (!(cond)) failures++, printf("FAIL line %d: %s\n", __LINE__, #cond); \
    } while (0)

/* ---- a backend of host memory: alloc, free, copy_rows ---- */

static int allocs_left = -1; /* >= 0: that many more allocs succeed */

static void *fake_alloc(tk_backend *be, size_t bytes)
{
    (void)be;
    if (allocs_left == 0) return NULL;
    if (allocs_left > 0) allocs_left--;
    return calloc(1, bytes);
}

static void fake_free(tk_backend *be, void *p)
{
    (void)be;
    free(p);
}

static void fake_copy_rows(tk_backend *be, float *const *dst, const float *const *src, int rows, int n)
{
    (void)be;
    for (int i = 0; i < rows; i++) memcpy(dst[i], src[i], (size_t)n * sizeof(float));
}

enum { L = 3, KV = 4, P = 100 }; /* layers, floats per row, rows of the engine-side caches */

/* An engine-side cache [L][P][KV] whose row r of layer l holds seed + l * 1000 + r (keys) and its negation
 * (values), so what comes back shows where it came from. */
static void fill_rows(float *k, float *v, float seed)
{
    for (int l = 0; l < L; l++)
        for (int r = 0; r < P; r++)
            for (int j = 0; j < KV; j++) {
                k[(l * P + r) * KV + j] = seed + (float)(l * 1000 + r) + 0.25f * (float)j;
                v[(l * P + r) * KV + j] = -k[(l * P + r) * KV + j];
            }
}

/* rows [0, n) of (k, v) equal those of (wk, wv) in every layer */
static int same_rows(const float *k, const float *v, const float *wk, const float *wv, int n)
{
    for (int l = 0; l < L; l++)
        if (memcmp(k + l * P * KV, wk + l * P * KV, (size_t)n * KV * sizeof(float)) ||
            memcmp(v + l * P * KV, wv + l * P * KV, (size_t)n * KV * sizeof(float)))
            return 0;
    return 1;
}

static int lookup(tk_prefix_cache *c, tk_backend *be, tk_prefix_key key, const int32_t *t, int n, int max)
{
    tk_prefix_node *hit;
    int got = tk_prefix_cache_lookup(c, key, t, n, max, &hit);
    tk_prefix_cache_unpin(c, be, hit);
    return got;
}

int main(void)
{
    tk_backend be = {0};
    be.name = "fake", be.host_memory = 1;
    be.alloc = fake_alloc, be.free = fake_free, be.copy_rows = fake_copy_rows;
    const size_t block = 2 * (size_t)L * TK_PREFIX_BLOCK * KV * sizeof(float);
    const tk_prefix_key base = {0, 0}, ad1 = {7, 0}, ad1_trained = {7, 1};
    static float k[L * P * KV], v[L * P * KV], k2[L * P * KV], v2[L * P * KV], out_k[L * P * KV], out_v[L * P * KV];
    int32_t a[P], b[P];
    for (int i = 0; i < P; i++) a[i] = i + 1, b[i] = i < 40 ? i + 1 : 500 + i; /* b shares a's first 40 tokens */
    fill_rows(k, v, 0.0f), fill_rows(k2, v2, 0.5f);

    tk_prefix_cache *c = tk_prefix_cache_create(L, KV, 100 * block);
    CHECK(c && tk_prefix_cache_enabled(c));
    /* 70 tokens: 4 whole blocks; lookups give whole blocks, at most max_tokens */
    tk_prefix_cache_insert(c, &be, base, a, 70, k, v, P * KV);
    tk_prefix_stats st;
    tk_prefix_cache_stats(c, &st);
    CHECK(st.blocks == 4 && st.bytes == 4 * block && st.blocks_inserted == 4);
    CHECK(lookup(c, &be, base, a, 100, 99) == 64);
    CHECK(lookup(c, &be, base, a, 100, 63) == 48);
    CHECK(lookup(c, &be, base, a, 20, 19) == 16);
    CHECK(lookup(c, &be, base, a, 15, 14) == 0);
    CHECK(lookup(c, &be, base, b, 100, 99) == 32); /* the blocks of the 40 shared tokens */
    CHECK(lookup(c, &be, ad1, a, 100, 99) == 0);   /* another adapter's keys are not the base model's */
    /* the rows read back are the inserted rows */
    tk_prefix_node *hit;
    CHECK(tk_prefix_cache_lookup(c, base, a, 100, 99, &hit) == 64 && hit);
    memset(out_k, 0, sizeof out_k), memset(out_v, 0, sizeof out_v);
    tk_prefix_cache_read(c, &be, hit, out_k, out_v, P * KV);
    tk_prefix_cache_unpin(c, &be, hit);
    CHECK(same_rows(out_k, out_v, k, v, 64));
    CHECK(out_k[64 * KV] == 0.0f); /* nothing past the run */
    /* b continues the shared blocks with its own: its rows from k2 (only the new blocks are read from them) */
    tk_prefix_cache_insert(c, &be, base, b, 80, k2, v2, P * KV);
    tk_prefix_cache_stats(c, &st);
    CHECK(st.blocks == 4 + 3);
    CHECK(tk_prefix_cache_lookup(c, base, b, 100, 99, &hit) == 80);
    memset(out_k, 0, sizeof out_k), memset(out_v, 0, sizeof out_v);
    tk_prefix_cache_read(c, &be, hit, out_k, out_v, P * KV);
    tk_prefix_cache_unpin(c, &be, hit);
    CHECK(same_rows(out_k, out_v, k, v, 32));
    CHECK(memcmp(out_k + 32 * KV, k2 + 32 * KV, 48 * KV * sizeof(float)) == 0);
    /* a trained adapter (new version) does not see its old blocks */
    tk_prefix_cache_insert(c, &be, ad1, a, 32, k2, v2, P * KV);
    CHECK(lookup(c, &be, ad1, a, 100, 99) == 32 && lookup(c, &be, ad1_trained, a, 100, 99) == 0);
    tk_prefix_cache_stats(c, &st);
    CHECK(st.lookups == 10 && st.hits == 7 && st.tokens_reused == 64 + 48 + 16 + 32 + 64 + 80 + 32);

    /* the bound: 5 blocks. Eviction takes least recently used leaves: a's run (touched last) keeps its head */
    CHECK(lookup(c, &be, base, a, 100, 99) == 64);
    tk_prefix_cache_set_limit(c, &be, 5 * block);
    tk_prefix_cache_stats(c, &st);
    CHECK(st.bytes <= 5 * block && st.blocks == 5);
    CHECK(lookup(c, &be, base, a, 100, 99) == 64); /* a's 4 blocks stayed; b's 3 leaves and ad1's 2 went first */
    CHECK(lookup(c, &be, base, b, 100, 99) == 32 && lookup(c, &be, ad1, a, 100, 99) <= 16);
    /* inserting past the bound evicts the oldest leaves, never the run being extended */
    int32_t d[P];
    for (int i = 0; i < P; i++) d[i] = 900 + i;
    tk_prefix_cache_insert(c, &be, base, d, 96, k, v, P * KV);
    tk_prefix_cache_stats(c, &st);
    CHECK(st.bytes <= 5 * block && lookup(c, &be, base, d, 100, 99) == 80); /* 5 of its 6 blocks fit */
    CHECK(lookup(c, &be, base, a, 100, 99) == 0);

    /* a pinned run survives a lowered bound (and the blocks it hangs from), and goes when unpinned */
    CHECK(tk_prefix_cache_lookup(c, base, d, 100, 99, &hit) == 80);
    tk_prefix_cache_set_limit(c, &be, 0);
    CHECK(!tk_prefix_cache_enabled(c));
    tk_prefix_cache_stats(c, &st);
    CHECK(st.blocks == 5);
    memset(out_k, 0, sizeof out_k), memset(out_v, 0, sizeof out_v);
    tk_prefix_cache_read(c, &be, hit, out_k, out_v, P * KV);
    CHECK(same_rows(out_k, out_v, k, v, 80));
    tk_prefix_cache_unpin(c, &be, hit);
    tk_prefix_cache_stats(c, &st);
    CHECK(st.blocks == 0 && st.bytes == 0);

    /* a bound below one block caches nothing */
    tk_prefix_cache_set_limit(c, &be, block - 1);
    tk_prefix_cache_insert(c, &be, base, a, 70, k, v, P * KV);
    tk_prefix_cache_stats(c, &st);
    CHECK(st.blocks == 0 && !tk_prefix_cache_enabled(c));

    /* a failing alloc stops the insert where it is: the blocks before it stay usable */
    tk_prefix_cache_set_limit(c, &be, 100 * block);
    allocs_left = 2;
    tk_prefix_cache_insert(c, &be, base, a, 70, k, v, P * KV);
    allocs_left = -1;
    tk_prefix_cache_stats(c, &st);
    CHECK(st.blocks == 2 && lookup(c, &be, base, a, 100, 99) == 32);
    tk_prefix_cache_count_prefill(c, 123);
    tk_prefix_cache_stats(c, &st);
    CHECK(st.tokens_prefilled == 123 && st.limit == 100 * block);

    tk_prefix_cache_free(c, &be);
    tk_prefix_cache_free(NULL, &be);
    printf("%d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
