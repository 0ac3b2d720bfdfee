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

#endif
