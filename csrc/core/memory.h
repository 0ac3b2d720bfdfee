/* memory.h - how much memory the machine has and could give now, for the engine's default bounds.
 *
 * Linux: physical pages and the cgroup (v2) limit, /proc/meminfo's MemAvailable; elsewhere what sysconf
 * knows. Never fails: an unknown size is 0.
 */
#ifndef TK_MEMORY_H
#define TK_MEMORY_H

#include <stddef.h>

/* The machine's memory: its physical pages, or its cgroup's limit when lower (read once); 0 when unknown. */
size_t tk_memory_total(void);
/* What the kernel could give now without swapping (MemAvailable, within the cgroup's limit); 0 when unknown. */
size_t tk_memory_available(void);

#endif
