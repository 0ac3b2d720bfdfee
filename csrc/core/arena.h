/* arena.h - the one bump allocator: carving many float arrays out of one block.
 *
 * Every size table in the engine (weights' vectors, activations, per-request
 * scratch, the head's chunks) is walked twice: once with base == NULL to count
 * the floats, then over the allocated block to hand out pointers. Pieces are
 * rounded to 16 floats, so each starts 64-byte aligned when the block does.
 */
#ifndef TK_ARENA_H
#define TK_ARENA_H

#include <stddef.h>

typedef struct {
    float *base; /* NULL: only count */
    size_t at;   /* floats handed out so far */
} tk_arena;

static inline float *tk_arena_take(tk_arena *a, size_t n)
{
    float *p = a->base ? a->base + a->at : NULL;
    a->at += (n + 15) & ~(size_t)15;
    return p;
}

/* A pass's scratch comes in two blocks: device memory for the tensors the backend's ops read and write, and
 * host memory for what model/ reads or writes itself (index lists, positions, decode views, downloaded
 * values), which a GPU's memory cannot hold. Sizes in floats; counted with both bases NULL. */
typedef struct {
    tk_arena dev, host;
} tk_arenas;

typedef struct {
    size_t dev, host; /* floats of each block */
} tk_workspace;

static inline tk_workspace tk_arenas_used(const tk_arenas *a) { return (tk_workspace){a->dev.at, a->host.at}; }

/* The larger of two workspaces that use the same blocks one after the other, block by block. */
static inline tk_workspace tk_workspace_max(tk_workspace a, tk_workspace b)
{
    return (tk_workspace){a.dev > b.dev ? a.dev : b.dev, a.host > b.host ? a.host : b.host};
}

#endif
