/* cuda_ops.cu - the CUDA backend's device side (see cuda_ops.h): the context and its stream, memory, and the
 * kernels of the ops written so far. Float32 throughout, as the CPU backend; every float operation whose rounding
 * the CPU backend fixes (AdamW: torch's float ops one for one) is written with _rn intrinsics, so nvcc's
 * multiply-add contraction cannot change it.
 *
 * Not run yet (no GPU in the task that wrote it): tests/ops runs every op here against the float64 references
 * when a GPU is visible (issue #15).
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_common.cuh"

/* ---- the context ---- */

extern "C" tk_cu *tk_cu_create(int device, char *why, size_t why_size)
{
    cudaError_t err = cudaSetDevice(device);
    tk_cu *cu = err == cudaSuccess ? (tk_cu *)calloc(1, sizeof(tk_cu)) : NULL;
    if (cu) err = cudaStreamCreateWithFlags(&cu->stream, cudaStreamNonBlocking);
    if (cu && err == cudaSuccess) err = cudaMalloc((void **)&cu->sum, sizeof(double));
    if (cu && err == cudaSuccess) err = cudaMalloc((void **)&cu->peak, sizeof(unsigned));
    if (err != cudaSuccess || !cu) {
        snprintf(why, why_size, "CUDA device %d: %s", device, err != cudaSuccess ? cudaGetErrorString(err) : "out of memory");
        if (cu) tk_cu_destroy(cu);
        return NULL;
    }
    cu->device = device;
    return cu;
}

extern "C" void tk_cu_destroy(tk_cu *cu)
{
    if (!cu) return;
    if (cu->stream) cudaStreamSynchronize(cu->stream);
    if (cu->handle) cu->blas.destroy(cu->handle);
    if (cu->blas.lib) dlclose(cu->blas.lib);
    cudaFree(cu->sum);
    cudaFree(cu->peak);
    cudaFree(cu->wx);
    if (cu->stream) cudaStreamDestroy(cu->stream);
    free(cu);
}

extern "C" int tk_cu_sync(tk_cu *cu, char *why, size_t why_size)
{
    check(cu, cudaStreamSynchronize(cu->stream), "sync");
    if (cu->first == cudaSuccess) return 0;
    snprintf(why, why_size, "CUDA: %s in %s", cudaGetErrorString(cu->first), cu->where);
    int status = cu->first == cudaErrorMemoryAllocation ? 2 : 1;
    cu->first = cudaSuccess;
    cudaGetLastError(); /* a sticky error stays: the context is then unusable, and says so on every sync */
    return status;
}

/* ---- memory ---- */

extern "C" void *tk_cu_alloc(tk_cu *cu, size_t bytes)
{
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 256) != cudaSuccess) {
        cudaGetLastError(); /* out of memory is reported by the caller, not a sticky failure */
        return NULL;
    }
    check(cu, cudaMemsetAsync(p, 0, bytes, cu->stream), "alloc");
    return p;
}

extern "C" void tk_cu_free(tk_cu *cu, void *p)
{
    if (p) check(cu, cudaFree(p), "free"); /* cudaFree waits for the work queued that may still use it */
}

extern "C" void tk_cu_upload(tk_cu *cu, void *dst, const void *host, size_t bytes)
{
    if (bytes) check(cu, cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, cu->stream), "upload");
}

extern "C" void tk_cu_download(tk_cu *cu, void *host, const void *src, size_t bytes)
{
    if (bytes) check(cu, cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, cu->stream), "download");
    check(cu, cudaStreamSynchronize(cu->stream), "download");
}

__global__ void copy_rows_k(float *const *dst, const float *const *src, int n)
{
    const float *s = src[blockIdx.x];
    float *d = dst[blockIdx.x];
    for (int i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
}

extern "C" void tk_cu_copy_rows(tk_cu *cu, float *const *dst, const float *const *src, int rows, int n)
{
    if (rows <= 0 || n <= 0) return;
    float *const *d = (float *const *)staged(cu, dst, (size_t)rows * sizeof(float *));
    const float *const *s = (const float *const *)staged(cu, src, (size_t)rows * sizeof(float *));
    if (!failed(cu)) copy_rows_k<<<rows, THREADS, 0, cu->stream>>>(d, s, n);
    launched(cu, "copy_rows");
    unstage(cu, (void *)d), unstage(cu, (void *)s);
}

/* ---- row-wise: one block per row ---- */

__global__ void rmsnorm_k(float *y, int ldy, const float *x, int ldx, const float *w, int n, float eps, float *inv)
{
    const float *xr = x + (size_t)blockIdx.x * ldx;
    float *yr = y + (size_t)blockIdx.x * ldy;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    float s = rsqrtf(ss / (float)n + eps);
    if (inv && threadIdx.x == 0) inv[blockIdx.x] = s;
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * s * w[i]; /* y may be x: same element */
}

extern "C" void tk_cu_rmsnorm(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const float *w, int rows, int n,
                              float eps, float *inv_rms)
{
    if (rows <= 0) return;
    rmsnorm_k<<<rows, THREADS, 0, cu->stream>>>(y, ldy, x, ldx, w, n, eps, inv_rms);
    launched(cu, "rmsnorm");
}

__global__ void add_bias_k(float *y, int ldy, const float *b, int n)
{
    float *yr = y + (size_t)blockIdx.x * ldy;
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] += b[i];
}

extern "C" void tk_cu_add_bias(tk_cu *cu, float *y, int ldy, const float *b, int rows, int n)
{
    if (rows <= 0) return;
    add_bias_k<<<rows, THREADS, 0, cu->stream>>>(y, ldy, b, n);
    launched(cu, "add_bias");
}

__global__ void swiglu_k(float *act, const float *gate_up, int F)
{
    const float *g = gate_up + (size_t)blockIdx.x * 2 * F, *u = g + F;
    float *a = act + (size_t)blockIdx.x * F;
    for (int i = threadIdx.x; i < F; i += blockDim.x) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

extern "C" void tk_cu_swiglu(tk_cu *cu, float *act, const float *gate_up, int T, int F)
{
    if (T <= 0) return;
    swiglu_k<<<T, THREADS, 0, cu->stream>>>(act, gate_up, F);
    launched(cu, "swiglu");
}

__global__ void logsumexp_k(float *lse, const float *x, int ldx, int n)
{
    const float *xr = x + (size_t)blockIdx.x * ldx;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = block_max(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += expf(xr[i] - m);
    s = block_sum(s);
    if (threadIdx.x == 0) lse[blockIdx.x] = m + logf(s);
}

extern "C" void tk_cu_logsumexp(tk_cu *cu, float *lse, const float *x, int ldx, int rows, int n)
{
    if (rows <= 0) return;
    logsumexp_k<<<rows, 1024, 0, cu->stream>>>(lse, x, ldx, n); /* vocabulary-wide rows */
    launched(cu, "logsumexp");
}

__global__ void softmax_scale_k(float *x, int ldx, const float *lse, const float *g, int n)
{
    float *xr = x + (size_t)blockIdx.x * ldx, l = lse[blockIdx.x], scale = -g[blockIdx.x];
    for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] = scale * expf(xr[i] - l);
}

extern "C" void tk_cu_softmax_scale(tk_cu *cu, float *x, int ldx, const float *lse, const float *g, int rows, int n)
{
    if (rows <= 0) return;
    softmax_scale_k<<<rows, 1024, 0, cu->stream>>>(x, ldx, lse, g, n);
    launched(cu, "softmax_scale");
}

__global__ void zero_rows_k(float *x, int ldx, int n)
{
    float *xr = x + (size_t)blockIdx.x * ldx;
    for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] = 0.0f;
}

extern "C" void tk_cu_zero_rows(tk_cu *cu, float *x, int ldx, int rows, int n)
{
    if (rows <= 0) return;
    zero_rows_k<<<rows, THREADS, 0, cu->stream>>>(x, ldx, n);
    launched(cu, "zero_rows");
}

/* ---- indexing ---- */

__global__ void gather_k(float *out, const float *x, int ldx, const int32_t *row, const int32_t *col, int n)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = x[(size_t)row[i] * ldx + col[i]];
}

extern "C" void tk_cu_gather(tk_cu *cu, float *out, const float *x, int ldx, const int32_t *row, const int32_t *col,
                             int n)
{
    if (n <= 0) return;
    int32_t *r = (int32_t *)staged(cu, row, (size_t)n * sizeof *row), *c = (int32_t *)staged(cu, col, (size_t)n * sizeof *col);
    if (!failed(cu)) gather_k<<<blocks_for((size_t)n), THREADS, 0, cu->stream>>>(out, x, ldx, r, c, n);
    launched(cu, "gather");
    unstage(cu, r), unstage(cu, c);
}

/* in order, one thread: pairs may repeat and their sums must be the CPU's (a few hundred targets per call) */
__global__ void scatter_add_k(float *x, int ldx, const int32_t *row, const int32_t *col, const float *val, int n)
{
    for (int i = 0; i < n; i++) x[(size_t)row[i] * ldx + col[i]] += val[i];
}

extern "C" void tk_cu_scatter_add(tk_cu *cu, float *x, int ldx, const int32_t *row, const int32_t *col,
                                  const float *val, int n)
{
    if (n <= 0) return;
    int32_t *r = (int32_t *)staged(cu, row, (size_t)n * sizeof *row), *c = (int32_t *)staged(cu, col, (size_t)n * sizeof *col);
    if (!failed(cu)) scatter_add_k<<<1, 1, 0, cu->stream>>>(x, ldx, r, c, val, n);
    launched(cu, "scatter_add");
    unstage(cu, r), unstage(cu, c);
}

/* ---- the optimizer ---- */

__global__ void sum_squares_k(double *out, const float *x, size_t n)
{
    double s = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    s = block_sum_double(s);
    if (threadIdx.x == 0) atomicAdd(out, s);
}

extern "C" double tk_cu_sum_squares(tk_cu *cu, const float *x, size_t n)
{
    double s = 0.0;
    check(cu, cudaMemsetAsync(cu->sum, 0, sizeof(double), cu->stream), "sum_squares");
    unsigned blocks = blocks_for(n) < 1024 ? blocks_for(n) : 1024; /* grid-stride: a few per multiprocessor */
    if (n) sum_squares_k<<<blocks, THREADS, 0, cu->stream>>>(cu->sum, x, n);
    launched(cu, "sum_squares");
    tk_cu_download(cu, &s, cu->sum, sizeof s);
    return s;
}

typedef struct {
    float clip_scale, decay, step_size, bc2_sqrt, b1w, b2, b2w, eps;
} adamw_f;

/* torch's single-tensor AdamW in float32, operation for operation (optim_ops.c's adamw_element) */
__device__ void adamw_element(float *p, float *m, float *v, float g, const adamw_f f)
{
    float grad = __fmul_rn(g, f.clip_scale);
    float pn = __fmul_rn(*p, f.decay);
    float mn = f.b1w < 0.5f ? __fadd_rn(*m, __fmul_rn(f.b1w, __fsub_rn(grad, *m)))
                            : __fsub_rn(grad, __fmul_rn(__fsub_rn(grad, *m), __fsub_rn(1.0f, f.b1w)));
    float vn = __fadd_rn(__fmul_rn(*v, f.b2), __fmul_rn(__fmul_rn(f.b2w, grad), grad));
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vn), f.bc2_sqrt), f.eps);
    *p = __fadd_rn(pn, __fmul_rn(-f.step_size, __fdiv_rn(mn, denom)));
    *m = mn;
    *v = vn;
}

__global__ void adamw_k(float *p, float *g, float *m, float *v, size_t n, adamw_f f)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        adamw_element(&p[i], &m[i], &v[i], g[i], f);
        g[i] = 0.0f;
    }
}

static adamw_f factors_of(const float f[8]) { return adamw_f{f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]}; }

extern "C" void tk_cu_adamw(tk_cu *cu, float *p, float *g, float *m, float *v, size_t n, const float factors[8])
{
    if (!n) return;
    adamw_k<<<blocks_for(n), THREADS, 0, cu->stream>>>(p, g, m, v, n, factors_of(factors));
    launched(cu, "adamw");
}

__global__ void adamw_peak_k(unsigned *peak, const float *p, const float *g, const float *m, const float *v, size_t n,
                             adamw_f f)
{
    float top = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float pn = p[i], mn = m[i], vn = v[i];
        adamw_element(&pn, &mn, &vn, g[i], f);
        if (!isfinite(pn) || !isfinite(mn) || !isfinite(vn)) top = INFINITY;
        else top = fmaxf(top, fabsf(pn));
    }
    top = block_max(top);
    if (threadIdx.x == 0) atomicMax(peak, __float_as_uint(top)); /* non-negative floats order as their bits */
}

extern "C" float tk_cu_adamw_peak(tk_cu *cu, const float *p, const float *g, const float *m, const float *v, size_t n,
                                  const float factors[8])
{
    unsigned bits = 0;
    check(cu, cudaMemsetAsync(cu->peak, 0, sizeof(unsigned), cu->stream), "adamw_peak");
    if (n) adamw_peak_k<<<blocks_for(n), THREADS, 0, cu->stream>>>(cu->peak, p, g, m, v, n, factors_of(factors));
    launched(cu, "adamw_peak");
    tk_cu_download(cu, &bits, cu->peak, sizeof bits);
    float peak;
    memcpy(&peak, &bits, sizeof peak);
    return peak;
}

/* ---- embeddings ---- */

enum { GGML_F32 = 0, GGML_F16 = 1, GGML_BF16 = 30 };

__global__ void embed_k(float *x, const void *table, int type, int cols, int row0, int rows, const int32_t *tokens)
{
    int local = tokens[blockIdx.x] - row0;
    if (local < 0 || local >= rows) return; /* another part's row */
    size_t row = (size_t)local;
    float *out = x + (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        size_t at = row * cols + i;
        if (type == GGML_F32) out[i] = ((const float *)table)[at];
        else if (type == GGML_F16) out[i] = __half2float(((const __half *)table)[at]);
        else out[i] = __uint_as_float((unsigned)((const unsigned short *)table)[at] << 16);
    }
}

extern "C" void tk_cu_embed(tk_cu *cu, float *x, const void *table, int type, int cols, int row0, int rows,
                            const int32_t *tokens, int T)
{
    if (T <= 0) return;
    int32_t *t = (int32_t *)staged(cu, tokens, (size_t)T * sizeof *tokens);
    if (!failed(cu)) embed_k<<<T, THREADS, 0, cu->stream>>>(x, table, type, cols, row0, rows, t);
    launched(cu, "embed");
    unstage(cu, t);
}

/* ---- RoPE ---- */

__global__ void rope_table_k(float *cos_t, float *sin_t, const int32_t *pos, int pos_dims, int rows,
                             const float *inv_freq, const int8_t *axis, int half)
{
    size_t n = (size_t)rows * half;
    for (size_t at = (size_t)blockIdx.x * blockDim.x + threadIdx.x; at < n; at += (size_t)gridDim.x * blockDim.x) {
        size_t r = at / half;
        int i = (int)(at % half);
        float angle = __fmul_rn((float)pos[r * pos_dims + (axis ? axis[i] : 0)], inv_freq[i]);
        cos_t[at] = cosf(angle);
        sin_t[at] = sinf(angle);
    }
}

extern "C" void tk_cu_rope_table(tk_cu *cu, float *cos_t, float *sin_t, const int32_t *pos, int pos_dims, int rows,
                                 const float *inv_freq, const int8_t *axis, int half)
{
    if (rows <= 0 || half <= 0) return;
    int32_t *p = (int32_t *)staged(cu, pos, (size_t)rows * pos_dims * sizeof *pos);
    int8_t *a = axis ? (int8_t *)staged(cu, axis, (size_t)half) : NULL;
    if (!failed(cu)) rope_table_k<<<blocks_for((size_t)rows * half), THREADS, 0, cu->stream>>>(cos_t, sin_t, p, pos_dims, rows,
                                                                               inv_freq, a, half);
    launched(cu, "rope_table");
    unstage(cu, p), unstage(cu, a);
}

/* one block per row: q cos + rotate_half(q) sin (inverse: sin -> -sin), each pair by one thread */
__global__ void rope_k(float *x, int ldx, int n_heads, int head_dim, const float *cos_t, const float *sin_t,
                       float sign)
{
    int half = head_dim / 2;
    const float *c = cos_t + (size_t)blockIdx.x * half, *s = sin_t + (size_t)blockIdx.x * half;
    float *row = x + (size_t)blockIdx.x * ldx;
    for (int j = threadIdx.x; j < n_heads * half; j += blockDim.x) {
        int h = j / half, i = j % half;
        float *lo = row + (size_t)h * head_dim, *hi = lo + half;
        float a = lo[i], b = hi[i], sn = sign * s[i];
        lo[i] = __fsub_rn(__fmul_rn(a, c[i]), __fmul_rn(b, sn));
        hi[i] = __fadd_rn(__fmul_rn(b, c[i]), __fmul_rn(a, sn));
    }
}

extern "C" void tk_cu_rope(tk_cu *cu, float *x, int ldx, int rows, int n_heads, int head_dim, const float *cos_t,
                           const float *sin_t, int inverse)
{
    if (rows <= 0) return;
    rope_k<<<rows, THREADS, 0, cu->stream>>>(x, ldx, n_heads, head_dim, cos_t, sin_t, inverse ? -1.0f : 1.0f);
    launched(cu, "rope");
}

/* ---- float32 matmuls through cuBLAS (column-major: a row-major [R, C] matrix is its column-major [C, R]) ---- */

static int load_cublas(tk_cu *cu)
{
    if (cu->handle) return 1;
    if (cu->blas_error[0]) return 0;
    const char *names[] = {getenv("TINKER_CUBLAS"), "libcublas.so.13", "libcublas.so.12", "libcublas.so"};
    void *lib = NULL;
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !lib; i++)
        if (names[i]) lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(cu->blas_error, sizeof cu->blas_error, "cuBLAS not found (libcublas.so.13 or .12; set TINKER_CUBLAS "
                 "to its path): %s", dlerror());
        return 0;
    }
    cublas_api *b = &cu->blas;
    b->lib = lib;
    *(void **)&b->create = dlsym(lib, "cublasCreate_v2");
    *(void **)&b->destroy = dlsym(lib, "cublasDestroy_v2");
    *(void **)&b->set_stream = dlsym(lib, "cublasSetStream_v2");
    *(void **)&b->set_math_mode = dlsym(lib, "cublasSetMathMode");
    *(void **)&b->sgemm = dlsym(lib, "cublasSgemm_v2");
    *(void **)&b->gemm_ex = dlsym(lib, "cublasGemmEx");
    *(void **)&b->gemm_batched_ex = dlsym(lib, "cublasGemmBatchedEx");
    if (!b->create || !b->destroy || !b->set_stream || !b->set_math_mode || !b->sgemm || !b->gemm_ex ||
        !b->gemm_batched_ex || b->create(&cu->handle) != 0) {
        snprintf(cu->blas_error, sizeof cu->blas_error, "cuBLAS was found but could not be used");
        cu->handle = NULL;
        return 0;
    }
    b->set_stream(cu->handle, cu->stream);
    /* float32 arithmetic, no TF32; reductions in the compute type (float32) whatever the output type */
    b->set_math_mode(cu->handle, CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
    return 1;
}

extern "C" int tk_cu_blas_ready(tk_cu *cu, char *why, size_t why_size)
{
    if (load_cublas(cu)) return 1;
    snprintf(why, why_size, "%s", cu->blas_error);
    return 0;
}

static void sgemm(tk_cu *cu, int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda, const float *B,
                  int ldb, float beta, float *C, int ldc, const char *op)
{
    if (m <= 0 || n <= 0) return;
    if (!load_cublas(cu)) {
        check(cu, cudaErrorNotSupported, cu->blas_error);
        return;
    }
    if (cu->blas.sgemm(cu->handle, ta, tb, m, n, k, &alpha, A, lda, B, ldb, &beta, C, ldc) != 0)
        check(cu, cudaErrorLaunchFailure, op);
}

/* ---- matmul_nt: a kernel of our own, not cuBLAS, because each row's result must not depend on the other rows of
 * the call, bit for bit (a prompt's rows prefilled after a cached prefix must equal the same rows of a whole
 * prefill: the prefix cache's exactness rests on it), and cuBLAS picks its algorithm (tiling, split-K) by shape.
 * Here every output is one float32 fmaf chain over k = 0 .. K-1 in order, whatever T, N or the tile it falls in.
 * Its shapes are LoRA's (K or N the rank) and small float32 weights; the base weights' GEMMs use cuBLAS. ---- */

enum { NT_TILE = 64, NT_STEP = 16 }; /* a block: a 64 x 64 tile of y; 256 threads of 4 x 4 outputs; k in steps of 16 */

__global__ void matmul_nt_k(float *y, int ldy, const float *x, int ldx, const float *w, int T, int N, int K, float alpha,
                            float beta)
{
    __shared__ float xs[NT_STEP][NT_TILE + 1], ws[NT_STEP][NT_TILE + 1]; /* [k][row of the tile]: x rows, w rows */
    int t0 = blockIdx.y * NT_TILE, n0 = blockIdx.x * NT_TILE;
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16; /* outputs (t0 + ty + 16 i, n0 + tx + 16 j) */
    float acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += NT_STEP) {
        for (int e = threadIdx.x; e < NT_TILE * NT_STEP; e += blockDim.x) {
            int row = e / NT_STEP, kk = e % NT_STEP, k = k0 + kk;
            xs[kk][row] = t0 + row < T && k < K ? x[(size_t)(t0 + row) * ldx + k] : 0.0f;
            ws[kk][row] = n0 + row < N && k < K ? w[(size_t)(n0 + row) * K + k] : 0.0f;
        }
        __syncthreads();
        int steps = min(NT_STEP, K - k0);
        for (int kk = 0; kk < steps; kk++)
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(xs[kk][ty + 16 * i], ws[kk][tx + 16 * j], acc[i][j]);
        __syncthreads();
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            int t = t0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (t >= T || n >= N) continue;
            float *out = y + (size_t)t * ldy + n;
            *out = beta == 0.0f ? alpha * acc[i][j] : alpha * acc[i][j] + beta * *out; /* beta 0: y is not read */
        }
}

extern "C" void tk_cu_matmul_nt(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const float *w, int T, int N,
                                int K, float alpha, float beta)
{
    if (T <= 0 || N <= 0) return;
    dim3 grid((unsigned)((N + NT_TILE - 1) / NT_TILE), (unsigned)((T + NT_TILE - 1) / NT_TILE));
    matmul_nt_k<<<grid, THREADS, 0, cu->stream>>>(y, ldy, x, ldx, w, T, N, K, alpha, beta);
    launched(cu, "matmul_nt");
}

/* y^T [N, T] = alpha w^T [N, K] . x^T [K, T] + beta y^T */
extern "C" void tk_cu_matmul_nn(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const float *w, int ldw, int T,
                                int N, int K, float alpha, float beta)
{
    sgemm(cu, CUBLAS_OP_N, CUBLAS_OP_N, N, T, K, alpha, w, ldw, x, ldx, beta, y, ldy, "matmul_nn");
}

/* g^T [N, M] += alpha b^T [N, T] . a [T, M] */
extern "C" void tk_cu_matmul_tn_acc(tk_cu *cu, float *g, int ldg, const float *a, int lda, const float *b, int ldb,
                                    int T, int M, int N, float alpha)
{
    sgemm(cu, CUBLAS_OP_N, CUBLAS_OP_T, N, M, T, alpha, b, ldb, a, lda, 1.0f, g, ldg, "matmul_tn_acc");
}

/* ---- backward element-wise ops ---- */

/* dx = r (dy w) - x r^3 mean(dy w x), r the forward's inv_rms */
__global__ void rmsnorm_backward_k(float *dx, int lddx, const float *dy, int lddy, const float *x, int ldx,
                                   const float *w, const float *inv_rms, int n, int accumulate)
{
    const float *xr = x + (size_t)blockIdx.x * ldx, *dyr = dy + (size_t)blockIdx.x * lddy;
    float *dxr = dx + (size_t)blockIdx.x * lddx, inv = inv_rms[blockIdx.x];
    float dot = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) dot += dyr[i] * w[i] * xr[i];
    dot = block_sum(dot);
    float c = inv * inv * inv * dot / (float)n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float d = inv * dyr[i] * w[i] - c * xr[i];
        dxr[i] = accumulate ? dxr[i] + d : d;
    }
}

extern "C" void tk_cu_rmsnorm_backward(tk_cu *cu, float *dx, int lddx, const float *dy, int lddy, const float *x,
                                       int ldx, const float *w, const float *inv_rms, int rows, int n, int accumulate)
{
    if (rows <= 0) return;
    rmsnorm_backward_k<<<rows, THREADS, 0, cu->stream>>>(dx, lddx, dy, lddy, x, ldx, w, inv_rms, n, accumulate);
    launched(cu, "rmsnorm_backward");
}

__global__ void swiglu_backward_k(float *dgate_up, const float *dact, const float *gate_up, int F)
{
    const float *g = gate_up + (size_t)blockIdx.x * 2 * F, *u = g + F, *da = dact + (size_t)blockIdx.x * F;
    float *dg = dgate_up + (size_t)blockIdx.x * 2 * F, *du = dg + F;
    for (int i = threadIdx.x; i < F; i += blockDim.x) {
        float s = 1.0f / (1.0f + expf(-g[i]));
        dg[i] = da[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
        du[i] = da[i] * g[i] * s;
    }
}

extern "C" void tk_cu_swiglu_backward(tk_cu *cu, float *dgate_up, const float *dact, const float *gate_up, int T,
                                      int F)
{
    if (T <= 0) return;
    swiglu_backward_k<<<T, THREADS, 0, cu->stream>>>(dgate_up, dact, gate_up, F);
    launched(cu, "swiglu_backward");
}

/* ---- the MoE block's row ops ---- */

/* dst rows may repeat: each thread owns columns and walks the rows in order, so a row's terms add in order */
__global__ void add_rows_k(float *const *dst, const float *const *src, const float *scale, int rows, int n)
{
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x)
        for (int i = 0; i < rows; i++) dst[i][j] += (scale ? scale[i] : 1.0f) * src[i][j];
}

extern "C" void tk_cu_add_rows(tk_cu *cu, float *const *dst, const float *const *src, const float *scale, int rows,
                               int n)
{
    if (rows <= 0 || n <= 0) return;
    float *const *d = (float *const *)staged(cu, dst, (size_t)rows * sizeof(float *));
    const float *const *s = (const float *const *)staged(cu, src, (size_t)rows * sizeof(float *));
    float *sc = scale ? (float *)staged(cu, scale, (size_t)rows * sizeof(float)) : NULL;
    if (!failed(cu)) add_rows_k<<<blocks_for((size_t)n), THREADS, 0, cu->stream>>>(d, s, sc, rows, n);
    launched(cu, "add_rows");
    unstage(cu, (void *)d), unstage(cu, (void *)s), unstage(cu, sc);
}

__global__ void scale_rows_k(float *x, int ldx, const float *scale, int n)
{
    float *xr = x + (size_t)blockIdx.x * ldx, s = scale[blockIdx.x];
    for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] *= s;
}

extern "C" void tk_cu_scale_rows(tk_cu *cu, float *x, int ldx, const float *scale, int rows, int n)
{
    if (rows <= 0) return;
    float *sc = (float *)staged(cu, scale, (size_t)rows * sizeof(float));
    if (!failed(cu)) scale_rows_k<<<rows, THREADS, 0, cu->stream>>>(x, ldx, sc, n);
    launched(cu, "scale_rows");
    unstage(cu, sc);
}

__global__ void row_dot_k(float *out, const float *a, int lda, const float *b, int ldb, int n)
{
    const float *ar = a + (size_t)blockIdx.x * lda, *br = b + (size_t)blockIdx.x * ldb;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += (double)ar[i] * br[i];
    s = block_sum_double(s);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)s;
}

extern "C" void tk_cu_row_dot(tk_cu *cu, float *out, const float *a, int lda, const float *b, int ldb, int rows, int n)
{
    if (rows <= 0) return;
    row_dot_k<<<rows, THREADS, 0, cu->stream>>>(out, a, lda, b, ldb, n);
    launched(cu, "row_dot");
}

/* ---- a vision tower's ---- */

/* LayerNorm with the mean and the biased variance in double, as the CPU backend */
__global__ void layer_norm_k(float *y, int ldy, const float *x, int ldx, const float *w, const float *b, int n,
                             float eps)
{
    const float *xr = x + (size_t)blockIdx.x * ldx;
    float *yr = y + (size_t)blockIdx.x * ldy;
    double sum = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += xr[i];
    double mean = block_sum_double(sum) / n, sq = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sq += (xr[i] - mean) * (xr[i] - mean);
    double inv = 1.0 / sqrt(block_sum_double(sq) / n + (double)eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = (float)((xr[i] - mean) * inv * w[i] + b[i]);
}

extern "C" void tk_cu_layer_norm(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const float *w, const float *b,
                                 int rows, int n, float eps)
{
    if (rows <= 0) return;
    layer_norm_k<<<rows, THREADS, 0, cu->stream>>>(y, ldy, x, ldx, w, b, n, eps);
    launched(cu, "layer_norm");
}

enum { GELU_ERF = 0, GELU_TANH = 1, GELU_QUICK = 2 }; /* backend.h's enum tk_gelu */

__global__ void gelu_k(float *y, int ldy, const float *x, int ldx, int n, int kind)
{
    const float *xr = x + (size_t)blockIdx.x * ldx;
    float *yr = y + (size_t)blockIdx.x * ldy;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        double v = xr[i], g;
        if (kind == GELU_TANH) g = 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
        else if (kind == GELU_QUICK) g = v / (1.0 + exp(-1.702 * v));
        else g = 0.5 * v * erfc(-v * 0.7071067811865476);
        yr[i] = (float)g;
    }
}

extern "C" void tk_cu_gelu(tk_cu *cu, float *y, int ldy, const float *x, int ldx, int rows, int n, int kind)
{
    if (rows <= 0) return;
    gelu_k<<<rows, THREADS, 0, cu->stream>>>(y, ldy, x, ldx, n, kind);
    launched(cu, "gelu");
}
