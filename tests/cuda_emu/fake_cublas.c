/* fake_cublas.c - a stand-in for libcublas with the CUDA emulator (include/cuda_runtime.h): the entry points the
 * CUDA backend loads with dlopen (TINKER_CUBLAS names this library in tests), with cuBLAS's documented
 * semantics: column-major matrices, C = alpha op(A) op(B) + beta C, op N / T (C: conjugate transpose, the same
 * for real types), leading dimensions checked as cuBLAS checks them (CUBLAS_STATUS_INVALID_VALUE otherwise),
 * C not read when beta is 0, A and B not read when alpha is 0 or k is 0. The products are float32 (OpenBLAS's
 * sgemm on float copies of the operands: bf16 and f16 operands widen exactly), as cuBLAS's
 * CUBLAS_COMPUTE_32F; summation order differs from a GPU's, which tests' tolerances cover.
 *
 * Device memory is host memory under the emulator, so pointers are used directly. Tests only.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#ifdef TK_BLAS_SCIPY
#define fake_sgemm scipy_cblas_sgemm
#else
#define fake_sgemm cblas_sgemm
#endif

enum { OK = 0, NOT_INITIALIZED = 1, ALLOC_FAILED = 3, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };
enum { OP_N = 0, OP_T = 1, OP_C = 2 };
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };                          /* cudaDataType */
enum { COMPUTE_32F = 68, COMPUTE_32F_PEDANTIC = 69 };                 /* cublasComputeType_t */
enum { MATH_DEFAULT = 0, MATH_PEDANTIC = 2, MATH_TF32 = 3, MATH_NO_REDUCED = 16 };

typedef struct handle {
    int magic;
    void *stream;
    int math;
} handle;

enum { MAGIC = 0x5eb1a5 };

int cublasCreate_v2(handle **h)
{
    if (!h) return INVALID_VALUE;
    *h = calloc(1, sizeof **h);
    if (!*h) return ALLOC_FAILED;
    (*h)->magic = MAGIC;
    return OK;
}

int cublasDestroy_v2(handle *h)
{
    if (!h || h->magic != MAGIC) return NOT_INITIALIZED;
    h->magic = 0;
    free(h);
    return OK;
}

int cublasSetStream_v2(handle *h, void *stream)
{
    if (!h || h->magic != MAGIC) return NOT_INITIALIZED;
    h->stream = stream;
    return OK;
}

int cublasSetMathMode(handle *h, int mode)
{
    if (!h || h->magic != MAGIC) return NOT_INITIALIZED;
    int base = mode & ~MATH_NO_REDUCED;
    if (base != MATH_DEFAULT && base != MATH_PEDANTIC && base != MATH_TF32 && base != 1) return INVALID_VALUE;
    h->math = mode;
    return OK;
}

static float widen(const void *p, int type, size_t at)
{
    if (type == R_32F) return ((const float *)p)[at];
    uint16_t h = ((const uint16_t *)p)[at];
    uint32_t bits;
    if (type == R_16BF) bits = (uint32_t)h << 16;
    else { /* IEEE half */
        uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31u, man = h & 1023u;
        if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
        else if (exp == 0) {
            float v = (float)man * (1.0f / 16777216.0f);
            return sign ? -v : v;
        } else bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* op(X) as a row-major [rows, cols] float matrix, X column-major with leading dimension ld */
static float *packed(const void *x, int type, int op, int rows, int cols, int ld)
{
    float *out = malloc((size_t)(rows ? rows : 1) * (size_t)(cols ? cols : 1) * sizeof *out);
    if (!out) return NULL;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) /* op N: X(r, c) = x[r + c ld]; op T: X(c, r) */
            out[(size_t)r * cols + c] = widen(x, type, op == OP_N ? (size_t)r + (size_t)c * ld : (size_t)c + (size_t)r * ld);
    return out;
}

static int gemm(handle *h, int ta, int tb, int m, int n, int k, const float *alpha, const void *A, int atype, int lda,
                const void *B, int btype, int ldb, const float *beta, float *C, int ldc)
{
    if (!h || h->magic != MAGIC) return NOT_INITIALIZED;
    if ((ta != OP_N && ta != OP_T && ta != OP_C) || (tb != OP_N && tb != OP_T && tb != OP_C)) return INVALID_VALUE;
    if (m < 0 || n < 0 || k < 0 || !alpha || !beta) return INVALID_VALUE;
    int arows = ta == OP_N ? m : k, brows = tb == OP_N ? k : n;
    if (lda < (arows > 1 ? arows : 1) || ldb < (brows > 1 ? brows : 1) || ldc < (m > 1 ? m : 1)) return INVALID_VALUE;
    if (!m || !n) return OK;
    float a = *alpha, b = *beta;
    if (b == 0.0f) /* C is not read */
        for (int j = 0; j < n; j++) memset(C + (size_t)j * ldc, 0, (size_t)m * sizeof *C);
    if (a == 0.0f || !k) {
        if (b != 0.0f && b != 1.0f)
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++) C[(size_t)j * ldc + i] *= b;
        return OK;
    }
    float *pa = packed(A, atype, ta, m, k, lda), *pb = packed(B, btype, tb, k, n, ldb);
    if (!pa || !pb) {
        free(pa), free(pb);
        return ALLOC_FAILED;
    }
    /* pa (row-major [m, k]) is column-major [k, m] = op(A)^T, pb (row-major [k, n]) column-major [n, k] = op(B)^T */
    fake_sgemm(CblasColMajor, CblasTrans, CblasTrans, m, n, k, a, pa, k, pb, n, b, C, ldc);
    free(pa), free(pb);
    return OK;
}

int cublasSgemm_v2(handle *h, int ta, int tb, int m, int n, int k, const float *alpha, const float *A, int lda,
                   const float *B, int ldb, const float *beta, float *C, int ldc)
{
    return gemm(h, ta, tb, m, n, k, alpha, A, R_32F, lda, B, R_32F, ldb, beta, C, ldc);
}

static int types_ok(int atype, int btype, int ctype, int compute)
{
    if (ctype != R_32F || (compute != COMPUTE_32F && compute != COMPUTE_32F_PEDANTIC)) return 0;
    if (atype != btype) return 0;
    return atype == R_32F || atype == R_16F || atype == R_16BF;
}

int cublasGemmEx(handle *h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A, int atype, int lda,
                 const void *B, int btype, int ldb, const void *beta, void *C, int ctype, int ldc, int compute, int algo)
{
    (void)algo;
    if (!types_ok(atype, btype, ctype, compute)) return NOT_SUPPORTED;
    return gemm(h, ta, tb, m, n, k, alpha, A, atype, lda, B, btype, ldb, beta, C, ldc);
}

int cublasSgemmStridedBatched(handle *h, int ta, int tb, int m, int n, int k, const float *alpha, const float *A,
                              int lda, long long sa, const float *B, int ldb, long long sb, const float *beta,
                              float *C, int ldc, long long sc, int batch)
{
    if (batch < 0) return INVALID_VALUE;
    for (int i = 0; i < batch; i++) {
        int s = gemm(h, ta, tb, m, n, k, alpha, A + i * sa, R_32F, lda, B + i * sb, R_32F, ldb, beta, C + i * sc, ldc);
        if (s != OK) return s;
    }
    return OK;
}

static size_t type_bytes(int type) { return type == R_32F ? 4 : 2; }

int cublasGemmStridedBatchedEx(handle *h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A,
                               int atype, int lda, long long sa, const void *B, int btype, int ldb, long long sb,
                               const void *beta, void *C, int ctype, int ldc, long long sc, int batch, int compute,
                               int algo)
{
    (void)algo;
    if (!types_ok(atype, btype, ctype, compute)) return NOT_SUPPORTED;
    if (batch < 0) return INVALID_VALUE;
    for (int i = 0; i < batch; i++) {
        int s = gemm(h, ta, tb, m, n, k, alpha, (const char *)A + i * sa * (long long)type_bytes(atype), atype, lda,
                     (const char *)B + i * sb * (long long)type_bytes(btype), btype, ldb, beta,
                     (float *)C + i * sc, ldc);
        if (s != OK) return s;
    }
    return OK;
}

/* the pointer arrays are device memory (host memory under the emulator) */
int cublasGemmBatchedEx(handle *h, int ta, int tb, int m, int n, int k, const void *alpha, const void *const A[],
                        int atype, int lda, const void *const B[], int btype, int ldb, const void *beta, void *const C[],
                        int ctype, int ldc, int batch, int compute, int algo)
{
    (void)algo;
    if (!types_ok(atype, btype, ctype, compute)) return NOT_SUPPORTED;
    if (batch < 0) return INVALID_VALUE;
    for (int i = 0; i < batch; i++) {
        int s = gemm(h, ta, tb, m, n, k, alpha, A[i], atype, lda, B[i], btype, ldb, beta, (float *)C[i], ldc);
        if (s != OK) return s;
    }
    return OK;
}

int cublasSgemmBatched(handle *h, int ta, int tb, int m, int n, int k, const float *alpha, const float *const A[],
                       int lda, const float *const B[], int ldb, const float *beta, float *const C[], int ldc, int batch)
{
    return cublasGemmBatchedEx(h, ta, tb, m, n, k, alpha, (const void *const *)A, R_32F, lda,
                               (const void *const *)B, R_32F, ldb, beta, (void *const *)C, R_32F, ldc, batch,
                               COMPUTE_32F, -1);
}
