/* cuda_common.cuh - what the CUDA backend's .cu files share: the context (struct tk_cu: the device, its one
 * stream, cuBLAS loaded at run time, the first failure since the last sync), error capture after each launch, the
 * staging of host arrays an op reads, and block-wide reductions.
 */
#ifndef TK_CUDA_COMMON_CUH
#define TK_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>

#include "cuda_ops.h"

/* ---- cuBLAS, declared here and loaded at run time: this machine's CUDA toolkit has no cuBLAS headers, and the
 * GPU machines have the library (the nvidia-cublas wheel beside torch, or the toolkit's) ---- */
typedef struct cublas_ctx *cublas_handle;
enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16 };
/* cublasGemmEx's enum values (library_types.h's CUDA_R_32F / CUDA_R_16BF, cublas_api.h's CUBLAS_COMPUTE_32F /
 * CUBLAS_GEMM_DEFAULT), passed as the ints they are; prefixed, as cuda_runtime.h may declare the first two */
enum { TK_BLAS_R_32F = 0, TK_BLAS_R_16BF = 14, TK_BLAS_COMPUTE_32F = 68, TK_BLAS_GEMM_DEFAULT = -1 };
typedef struct {
    void *lib;
    int (*create)(cublas_handle *);
    int (*destroy)(cublas_handle);
    int (*set_stream)(cublas_handle, cudaStream_t);
    int (*set_math_mode)(cublas_handle, int);
    int (*sgemm)(cublas_handle, int, int, int, int, int, const float *, const float *, int, const float *, int,
                 const float *, float *, int);
    /* cublasGemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
     * computeType, algo): the base-weight matmuls (bf16 A and B, float32 C and arithmetic) */
    int (*gemm_ex)(cublas_handle, int, int, int, int, int, const void *, const void *, int, int, const void *, int,
                   int, const void *, void *, int, int, int, int);
    /* cublasGemmBatchedEx: the same with device arrays of A, B and C pointers and a batch count before
     * computeType (an MoE layer's experts of one shape in one call) */
    int (*gemm_batched_ex)(cublas_handle, int, int, int, int, int, const void *, const void *const *, int, int,
                           const void *const *, int, int, const void *, void *const *, int, int, int, int, int);
} cublas_api;

struct tk_cu {
    int device;
    cudaStream_t stream;
    cublas_api blas;
    cublas_handle handle; /* NULL until the first matmul loads cuBLAS */
    char blas_error[160];
    cudaError_t first; /* the first failure since the last sync */
    char where[192];   /* what failed */
    double *sum;       /* [1] sum_squares' result */
    unsigned *peak;    /* [1] adamw_peak's result (float bits: non-negative floats order as unsigned) */
    void *wx;          /* the bf16 copy of a base-weight matmul's activations (cuda_weights.cu; grown, never shrunk) */
    size_t wx_bytes;
};

enum { THREADS = 256 };

static inline void check(tk_cu *cu, cudaError_t err, const char *where)
{
    if (err != cudaSuccess && cu->first == cudaSuccess) {
        cu->first = err;
        snprintf(cu->where, sizeof cu->where, "%s", where);
    }
}

/* A failure is pending (until sync reports it): an op whose staging copy failed must not launch (its kernel
 * would read a null pointer) */
static inline int failed(const tk_cu *cu) { return cu->first != cudaSuccess; }

static inline void launched(tk_cu *cu, const char *op) { check(cu, cudaGetLastError(), op); }

static inline unsigned blocks_for(size_t n)
{
    size_t b = (n + THREADS - 1) / THREADS;
    return (unsigned)(b < 1 ? 1 : b > 65535 ? 65535 : b);
}

/* A device copy of a host array for one op (stream-ordered: freed after the op, in the stream) */
static inline void *staged(tk_cu *cu, const void *host, size_t bytes)
{
    void *d = NULL;
    check(cu, cudaMallocAsync(&d, bytes ? bytes : 4, cu->stream), "staging");
    if (d && bytes) check(cu, cudaMemcpyAsync(d, host, bytes, cudaMemcpyHostToDevice, cu->stream), "staging");
    return d;
}

static inline void unstage(tk_cu *cu, void *d)
{
    if (d) check(cu, cudaFreeAsync(d, cu->stream), "staging");
}

/* ---- reductions within a block (blockDim.x a multiple of 32): each warp's, then the first warp's over them ---- */

struct op_sum {
    template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct op_max {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T, typename Op> __device__ T block_reduce(T v, Op op, T identity)
{
    __shared__ T part[32];
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? part[lane] : identity;
        for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) part[0] = v;
    }
    __syncthreads();
    T total = part[0];
    __syncthreads(); /* the next call may write part */
    return total;
}

__device__ inline float block_sum(float v) { return block_reduce(v, op_sum(), 0.0f); }
__device__ inline float block_max(float v) { return block_reduce(v, op_max(), -INFINITY); }
__device__ inline double block_sum_double(double v) { return block_reduce(v, op_sum(), 0.0); }

#endif
