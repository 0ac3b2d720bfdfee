/* cuda_probe.h - the GPUs CUDA can run on here (cuda_probe.cu; built only when nvcc was found: TK_HAVE_CUDA). */
#ifndef TK_CUDA_PROBE_H
#define TK_CUDA_PROBE_H

#include <stddef.h>

typedef struct {
    char name[256];
    int major, minor;       /* compute capability */
    size_t memory;          /* bytes */
    int multiprocessors;
} tk_cuda_device;

#ifdef __cplusplus
extern "C" {
#endif
/* Fills devices[0 .. n) and returns n (at most max); 0 with the reason in why when CUDA cannot run here. */
int tk_cuda_probe(tk_cuda_device *devices, int max, char *why, size_t why_size);
#ifdef __cplusplus
}
#endif

#endif
