/* cuda_runtime.h (the emulator's) - the part of the CUDA runtime and of CUDA C++'s device language that the
 * engine's .cu files use, on the CPU, so that their kernels run in tests on machines without a GPU.
 *
 * Tests only (tests/native_build.py builds the CUDA backend against it with g++ when asked for the emulated
 * CUDA backend); the shipped extension is built by nvcc against the real toolkit. What is emulated, and how:
 * - Kernels run block after block; a block's threads are fibers (tests/cuda_emu/emu.cpp) that switch only at
 *   __syncthreads and the warp-synchronous intrinsics, which have CUDA's meaning: __syncthreads waits for every
 *   thread of the block (one that exited first is reported: undefined behaviour on a GPU), a shuffle or
 *   __syncwarp waits for every lane its mask names (a named lane that exited or is not in the block is
 *   reported), and a block whose threads all wait on barriers that cannot complete is reported as a deadlock
 *   (a hang on a GPU). __shared__ memory is one copy per block (blocks never run at the same time here), and
 *   dynamic shared memory is filled with NaN bytes before every block, as are cudaMalloc'ed buffers.
 * - Launch configurations are checked against an sm_90 GPU's limits (1024 threads a block, grid.y and grid.z
 *   up to 65535, 48 KB of dynamic shared memory unless cudaFuncSetAttribute raised it, up to 227 KB), and every
 *   pointer argument of a kernel must point into device memory (cudaMalloc / cudaMallocAsync / cudaMallocHost):
 *   a host pointer handed to a kernel is the bug this catches (reported as an illegal address, a sticky error).
 * - cudaMemcpy* check that each side is the memory the kind says. Everything runs at the call, so streams are
 *   trivially ordered; device memory is bounded by $TK_CUDA_EMU_MEMORY bytes (default 80 GB), so running out
 *   of it can be tested, and $TK_CUDA_EMU_FAIL_ALLOC=n fails the n-th allocation (every allocation's failure
 *   path can be reached; $TK_CUDA_EMU_STATS=1 prints how many there were).
 * Not emulated: the timing and memory model of real hardware (races between blocks or threads that the
 * barriers do not order show only on a GPU), tensor cores, inline PTX, cooperative groups; device math calls
 * the host's libm (a GPU's expf / rsqrtf may differ in the last ulps).
 */
#ifndef TK_CUDA_EMU_RUNTIME_H
#define TK_CUDA_EMU_RUNTIME_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#define TK_CUDA_EMULATED 1

/* ---- the device language ---- */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef struct tk_emu_stream *cudaStream_t;

enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchFailure = 719,
    cudaErrorNotSupported = 801,
};
typedef enum cudaError cudaError_t;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    size_t sharedMemPerBlockOptin;
    int warpSize;
    int maxThreadsPerBlock;
    int major, minor;
    int multiProcessorCount;
};

/* ---- the runtime API (emu.cpp) ---- */
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device);
cudaError_t cudaDriverGetVersion(int *version);
cudaError_t cudaRuntimeGetVersion(int *version);
const char *cudaGetErrorName(cudaError_t err);
const char *cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes);

cudaError_t cudaMalloc(void **ptr, size_t bytes);
cudaError_t cudaMallocAsync(void **ptr, size_t bytes, cudaStream_t stream);
cudaError_t cudaMallocHost(void **ptr, size_t bytes);
cudaError_t cudaFree(void *ptr);
cudaError_t cudaFreeAsync(void *ptr, cudaStream_t stream);
cudaError_t cudaFreeHost(void *ptr);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream = 0);
cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t stream = 0);
cudaError_t cudaMemset(void *ptr, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void *ptr, int value, size_t bytes, cudaStream_t stream = 0);

cudaError_t cudaStreamCreate(cudaStream_t *stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);

template <typename T> cudaError_t cudaMalloc(T **ptr, size_t bytes) { return cudaMalloc((void **)ptr, bytes); }
template <typename T> cudaError_t cudaMallocAsync(T **ptr, size_t bytes, cudaStream_t s)
{
    return cudaMallocAsync((void **)ptr, bytes, s);
}
template <typename T> cudaError_t cudaMallocHost(T **ptr, size_t bytes) { return cudaMallocHost((void **)ptr, bytes); }

namespace tk_emu {

/* one emulated thread */
struct fiber;
struct fiber_state {
    uint3 tid;
    unsigned linear; /* x + y bx + z bx by */
};
extern thread_local fiber_state *g_cur;
extern thread_local uint3 g_block_idx;
extern thread_local dim3 g_block_dim, g_grid_dim;

/* warp-synchronous exchange: every lane of `mask` offers 8 bytes and gets lane `src`'s (its own where src is
 * not in the mask) */
uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane);
void sync_threads(void);
void sync_warp(unsigned mask);
void *dynamic_shared(void);

cudaError_t set_max_dynamic_shared(const void *kernel, int bytes);
/* Checks a launch; 1 to run it. */
int begin_launch(const char *name, const void *kernel, dim3 grid, dim3 block, size_t shared);
void check_pointer_arg(const char *name, int index, const void *p);
/* runs body(ctx) on every thread of every block */
void run_grid(void (*body)(void *), void *ctx);
void end_launch(void);

template <typename T> inline void check_arg(const char *, int, const T &) {}
template <typename T> inline void check_arg(const char *name, int index, T *const &p)
{
    check_pointer_arg(name, index, (const void *)p);
}

template <typename... P> struct launcher {
    const char *name;
    void (*kernel)(P...);
    dim3 grid, block;
    size_t shared;

    template <typename... A> void operator()(A &&...a) const
    {
        static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
        std::tuple<typename std::decay<P>::type...> args(static_cast<P>(a)...);
        if (!begin_launch(name, (const void *)kernel, grid, block, shared)) return;
        int index = 0;
        std::apply([&](const auto &...x) { (check_arg(name, index++, x), ...); }, args);
        struct ctx_t {
            void (*kernel)(P...);
            std::tuple<typename std::decay<P>::type...> *args;
        } ctx = {kernel, &args};
        run_grid([](void *c) {
            ctx_t *k = (ctx_t *)c;
            std::apply(k->kernel, *k->args); /* each thread gets its own copies of the arguments */
        }, &ctx);
        end_launch();
    }
};

/* kernel<<<grid, block, shared, stream>>>(args) is rewritten as tk_emu::launch("kernel", kernel, grid, block,
 * shared, stream)(args) by tests/native_build.py */
template <typename... P>
launcher<P...> launch(const char *name, void (*kernel)(P...), dim3 grid, dim3 block, size_t shared = 0,
                      cudaStream_t stream = 0)
{
    (void)stream;
    return launcher<P...>{name, kernel, grid, block, shared};
}

template <typename T> inline uint64_t to_bits(T v)
{
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof v);
    return b;
}

template <typename T> inline T from_bits(uint64_t b)
{
    T v;
    memcpy(&v, &b, sizeof v);
    return v;
}

inline unsigned lane_id(void) { return g_cur->linear & 31u; }

} // namespace tk_emu

template <typename T> cudaError_t cudaFuncSetAttribute(T *kernel, cudaFuncAttribute attr, int value)
{
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
    return tk_emu::set_max_dynamic_shared((const void *)kernel, value);
}

#define threadIdx (tk_emu::g_cur->tid)
#define blockIdx (tk_emu::g_block_idx)
#define blockDim (tk_emu::g_block_dim)
#define gridDim (tk_emu::g_grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads(void) { tk_emu::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { tk_emu::sync_warp(mask); }

template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32)
{
    unsigned lane = tk_emu::lane_id();
    int from = (int)(lane & ~(unsigned)(width - 1)) + (src & (width - 1));
    return tk_emu::from_bits<T>(tk_emu::warp_exchange(mask, tk_emu::to_bits(v), from));
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32)
{
    int lane = (int)tk_emu::lane_id(), from = lane ^ lane_mask;
    if ((from & ~(width - 1)) != (lane & ~(width - 1))) from = lane; /* outside its segment: its own value */
    return tk_emu::from_bits<T>(tk_emu::warp_exchange(mask, tk_emu::to_bits(v), from));
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    int lane = (int)tk_emu::lane_id(), from = lane + (int)delta;
    if ((from & ~(width - 1)) != (lane & ~(width - 1))) from = lane;
    return tk_emu::from_bits<T>(tk_emu::warp_exchange(mask, tk_emu::to_bits(v), from));
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    int lane = (int)tk_emu::lane_id(), from = lane - (int)delta;
    if (from < 0 || (from & ~(width - 1)) != (lane & ~(width - 1))) from = lane;
    return tk_emu::from_bits<T>(tk_emu::warp_exchange(mask, tk_emu::to_bits(v), from));
}
unsigned __ballot_sync(unsigned mask, int predicate);
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return (__ballot_sync(mask, predicate) & mask) == mask; }

/* atomics: threads switch only at barriers, so a read-modify-write is atomic as written */
template <typename T> inline T atomicAdd(T *a, T v)
{
    T old = *a;
    *a = old + v;
    return old;
}
template <typename T> inline T atomicSub(T *a, T v)
{
    T old = *a;
    *a = old - v;
    return old;
}
template <typename T> inline T atomicMax(T *a, T v)
{
    T old = *a;
    *a = old > v ? old : v;
    return old;
}
template <typename T> inline T atomicMin(T *a, T v)
{
    T old = *a;
    *a = old < v ? old : v;
    return old;
}
template <typename T> inline T atomicExch(T *a, T v)
{
    T old = *a;
    *a = v;
    return old;
}
template <typename T> inline T atomicCAS(T *a, T compare, T v)
{
    T old = *a;
    if (old == compare) *a = v;
    return old;
}

/* ---- device math and intrinsics (built with -ffp-contract=off: a * b + c rounds twice, as the _rn forms) ---- */
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : a > 1.0f ? 1.0f : a; }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline double rsqrt(double a) { return 1.0 / sqrt(a); }
inline float __frsqrt_rn(float a) { return 1.0f / sqrtf(a); }
inline unsigned __float_as_uint(float f) { return tk_emu::from_bits<unsigned>(tk_emu::to_bits(f)); }
inline float __uint_as_float(unsigned u) { return tk_emu::from_bits<float>(tk_emu::to_bits(u)); }
inline int __float_as_int(float f) { return tk_emu::from_bits<int>(tk_emu::to_bits(f)); }
inline float __int_as_float(int i) { return tk_emu::from_bits<float>(tk_emu::to_bits(i)); }
inline long long __double_as_longlong(double d) { return tk_emu::from_bits<long long>(tk_emu::to_bits(d)); }
inline double __longlong_as_double(long long i) { return tk_emu::from_bits<double>(tk_emu::to_bits(i)); }
inline float __int2float_rn(int i) { return (float)i; }
inline int __float2int_rn(float f) { return (int)lrintf(f); }
inline int __float2int_rz(float f) { return (int)f; }
inline float __double2float_rn(double d) { return (float)d; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
template <typename T> inline T __ldg(const T *p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

#endif
