/* selftest.cu - the CUDA emulator's own checks, each provoked once (tests/test_cuda_emu.py runs this and reads
 * its report): correct kernels give the right answers (block reductions through shuffles and shared memory,
 * dynamic shared memory, a 3-D grid), and each fault the emulator exists to catch is caught: a deadlock, a
 * __syncthreads some threads skip by exiting, a shuffle naming an exited lane, a host pointer handed to a kernel,
 * launch configurations past an sm_90's limits, copies whose sides are the wrong memory, running out of device
 * memory, uninitialised device memory read as if zeroed. One line per case: "case <name>: <what happened>".
 */
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

__global__ void block_sum_k(float *out, const float *x, int n)
{
    __shared__ float part[32];
    float v = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        v = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (threadIdx.x == 0) out[blockIdx.x] = v;
    }
}

__global__ void reverse_k(float *y, const float *x, int n)
{
    extern __shared__ float tile[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) tile[i] = x[i];
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = tile[n - 1 - i];
}

__global__ void grid_ids_k(int *out)
{
    int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    out[b * blockDim.x * blockDim.y * blockDim.z + t] = b * 1000 + t;
}

__global__ void deadlock_k(float *x)
{
    if (threadIdx.x < 16) x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
    else __syncthreads();
}

__global__ void exit_then_sync_k(float *x)
{
    if (threadIdx.x >= 64) return;
    __syncthreads();
    x[threadIdx.x] = 1.0f;
}

__global__ void shuffle_exited_k(float *x)
{
    if (threadIdx.x == 5) return;
    x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void copy_k(float *y, const float *x, int n)
{
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = x[i];
}

static const char *name_of(cudaError_t e) { return cudaGetErrorName(e); }

int main(int argc, char **argv)
{
    const char *only = argc > 1 ? argv[1] : "";
    enum { N = 1000 };
    float host[N], back[N];
    for (int i = 0; i < N; i++) host[i] = (float)(i % 7) - 3.0f + 0.5f;
    float *x = NULL, *y = NULL;
    cudaMalloc(&x, N * sizeof(float));
    cudaMalloc(&y, N * sizeof(float));
    cudaMemcpy(x, host, sizeof host, cudaMemcpyHostToDevice);

    if (!strcmp(only, "") || !strcmp(only, "sums")) {
        double want = 0.0;
        for (int i = 0; i < N; i++) want += host[i];
        int ok = 1;
        for (int threads = 32; threads <= 1024; threads *= 2) {
            float got = 0.0f;
            block_sum_k<<<1, threads>>>(y, x, N);
            cudaMemcpy(&got, y, sizeof got, cudaMemcpyDeviceToHost);
            ok &= got == (float)want;
        }
        reverse_k<<<1, 128, N * sizeof(float)>>>(y, x, N);
        cudaMemcpy(back, y, sizeof back, cudaMemcpyDeviceToHost);
        for (int i = 0; i < N; i++) ok &= back[i] == host[N - 1 - i];
        int *ids = NULL, hid[2 * 3 * 2 * 4 * 2 * 2];
        cudaMalloc(&ids, sizeof hid);
        grid_ids_k<<<dim3(2, 3, 2), dim3(4, 2, 2)>>>(ids);
        cudaMemcpy(hid, ids, sizeof hid, cudaMemcpyDeviceToHost);
        for (int b = 0; b < 12; b++)
            for (int t = 0; t < 16; t++) ok &= hid[b * 16 + t] == b * 1000 + t;
        cudaFree(ids);
        printf("case sums: %s (%s)\n", ok ? "right" : "WRONG", name_of(cudaGetLastError()));
    }
    if (!strcmp(only, "uninitialised")) {
        float *fresh = NULL;
        cudaMalloc(&fresh, N * sizeof(float));
        copy_k<<<1, 256>>>(y, fresh, N);
        cudaMemcpy(back, y, sizeof back, cudaMemcpyDeviceToHost);
        printf("case uninitialised: %s\n", isnan(back[0]) && isnan(back[N - 1]) ? "NaN" : "not NaN");
    }
    if (!strcmp(only, "config")) {
        copy_k<<<1, 2048>>>(y, x, N);
        cudaError_t a = cudaGetLastError();
        copy_k<<<dim3(1, 70000), 32>>>(y, x, N);
        cudaError_t b = cudaGetLastError();
        reverse_k<<<1, 32, 64 * 1024>>>(y, x, N);
        cudaError_t c = cudaGetLastError();
        cudaFuncSetAttribute(reverse_k, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024);
        reverse_k<<<1, 32, 64 * 1024>>>(y, x, N);
        cudaError_t d = cudaGetLastError();
        printf("case config: %s %s %s %s\n", name_of(a), name_of(b), name_of(c), name_of(d));
    }
    if (!strcmp(only, "copies")) {
        cudaError_t a = cudaMemcpy(back, host, sizeof host, cudaMemcpyHostToDevice);
        cudaError_t b = cudaMemcpy(back, x, 2 * N * sizeof(float), cudaMemcpyDeviceToHost);
        cudaError_t c = cudaMemset(back, 0, sizeof back);
        printf("case copies: %s %s %s\n", name_of(a), name_of(b), name_of(c));
    }
    if (!strcmp(only, "memory")) {
        void *a = NULL, *b = NULL;
        cudaError_t ea = cudaMalloc(&a, 600 << 20), eb = cudaMalloc(&b, 600 << 20);
        cudaFree(a);
        cudaError_t ec = cudaMalloc(&b, 600 << 20);
        printf("case memory: %s %s %s\n", name_of(ea), name_of(eb), name_of(ec));
    }
    if (!strcmp(only, "host_pointer")) {
        copy_k<<<1, 32>>>(y, host, N);
        printf("case host_pointer: %s\n", name_of(cudaDeviceSynchronize()));
    }
    if (!strcmp(only, "deadlock")) {
        deadlock_k<<<1, 32>>>(x);
        printf("case deadlock: %s\n", name_of(cudaDeviceSynchronize()));
    }
    if (!strcmp(only, "exit_then_sync")) {
        exit_then_sync_k<<<1, 128>>>(x);
        printf("case exit_then_sync: %s\n", name_of(cudaDeviceSynchronize()));
    }
    if (!strcmp(only, "shuffle_exited")) {
        shuffle_exited_k<<<1, 32>>>(x);
        printf("case shuffle_exited: %s\n", name_of(cudaDeviceSynchronize()));
    }
    cudaFree(x);
    cudaFree(y);
    return 0;
}
