/* cuda_probe.cu - what CUDA can run here: the GPUs the driver shows, with their names, compute capability and
 * memory, or why there are none (no driver, a driver older than this build's runtime, no device).
 *
 * The first CUDA source of the engine, compiled by nvcc when the build finds it (setup.py, TINKER_CUDA) and linked
 * with the static CUDA runtime, so the extension imports and runs on machines without a GPU or driver: the probe
 * then reports the reason. The CUDA backend (the op table of backend.h on the GPU) builds on this (issue #15).
 */
#include <cuda_runtime.h>
#include <stdio.h>

#include "cuda_probe.h"

extern "C" int tk_cuda_probe(tk_cuda_device *devices, int max, char *why, size_t why_size)
{
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        int driver = 0, runtime = 0;
        cudaDriverGetVersion(&driver);
        cudaRuntimeGetVersion(&runtime);
        snprintf(why, why_size, "CUDA reports %s (%s); driver API version %d, this build's runtime %d",
                 cudaGetErrorName(err), cudaGetErrorString(err), driver, runtime);
        cudaGetLastError(); /* clear it */
        return 0;
    }
    if (count == 0) snprintf(why, why_size, "the CUDA driver shows no GPU");
    for (int i = 0; i < count && i < max; i++) {
        cudaDeviceProp p;
        if (cudaGetDeviceProperties(&p, i) != cudaSuccess) {
            snprintf(why, why_size, "cannot read the properties of GPU %d", i);
            return i;
        }
        snprintf(devices[i].name, sizeof devices[i].name, "%s", p.name);
        devices[i].major = p.major, devices[i].minor = p.minor;
        devices[i].memory = p.totalGlobalMem;
        devices[i].multiprocessors = p.multiProcessorCount;
    }
    return count < max ? count : max;
}
