/* memory.c - see memory.h. */
#define _DEFAULT_SOURCE /* sysconf(_SC_PHYS_PAGES) */
#include "memory.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* The number in a one-line file (cgroup's memory.max, memory.current); 0 when absent or not a number ("max"). */
static size_t file_number(const char *path)
{
    FILE *f = fopen(path, "r");
    unsigned long long value = 0;
    if (f && fscanf(f, "%llu", &value) != 1) value = 0;
    if (f) fclose(f);
    return (size_t)value;
}

size_t tk_memory_total(void)
{
    static _Atomic size_t known;
    size_t bytes = atomic_load(&known);
    if (bytes) return bytes;
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    bytes = pages > 0 && page > 0 ? (size_t)pages * (size_t)page : 0;
    size_t limit = file_number("/sys/fs/cgroup/memory.max");
    if (limit && (!bytes || limit < bytes)) bytes = limit;
    atomic_store(&known, bytes);
    return bytes;
}

size_t tk_memory_available(void)
{
    size_t avail = 0;
    FILE *f = fopen("/proc/meminfo", "r");
    char line[128];
    unsigned long long kb;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) {
            avail = (size_t)kb * 1024;
            break;
        }
    if (f) fclose(f);
    size_t limit = file_number("/sys/fs/cgroup/memory.max"), used = file_number("/sys/fs/cgroup/memory.current");
    if (limit && used <= limit && (!avail || limit - used < avail)) avail = limit - used;
    return avail;
}
