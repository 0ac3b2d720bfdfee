/* qmatmul_hook.c - a test-only entry point to the CPU backend's quantized
 * decode kernel (backend/cpu/qmatmul.h tk_cpu_matmul_nt_q, which matmul_w_decode
 * runs for Q4_0 / Q4_1 / Q8_0 parts, and its plain-C reference), for
 * tests/test_decode_kernel.py: built into a shared library with the engine's
 * C sources by the test itself and called through ctypes. Not part of the
 * shipped module.
 *
 * y[T, N] = alpha x[T, K] . W^T + beta y with W given as N rows of ggml
 * blocks of `type`, repacked here as the loader does (tk_qmatrix_put_row).
 * Returns 0, 1 for invalid arguments (the message in err), 2 when out of
 * memory.
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "core/pool.h"
#include "backend/cpu/qmatmul.h"
#include "backend/qmatrix.h"
#include "io/quant.h"

__attribute__((visibility("default"))) int tk_test_matmul_q(int type, const uint8_t *w, size_t w_len, const float *x,
                                                            size_t x_len, float *y, size_t y_len, int N, int K, int T,
                                                            float alpha, float beta, int portable, int threads,
                                                            char *err, size_t err_len)
{
    if (!tk_qmatrix_supports(type) || N < 1 || K < TK_QBLOCK || K % TK_QBLOCK || T < 1) {
        snprintf(err, err_len, "matmul_q: ggml_type must be Q4_0, Q4_1 or Q8_0 (got %s), N and T >= 1 and K a "
                 "positive multiple of 32 (got N=%d K=%d T=%d)", tk_quant_type_name(type), N, K, T);
        return 1;
    }
    size_t row_bytes = tk_quant_row_bytes(type, (size_t)K);
    if (w_len < row_bytes * (size_t)N || x_len < (size_t)T * K * sizeof(float) ||
        y_len < (size_t)T * N * sizeof(float)) {
        snprintf(err, err_len, "matmul_q: w, x or y is shorter than N, K and T need");
        return 1;
    }
    tk_qmatrix q = {type, N, K, calloc(1, tk_qmatrix_bytes(type, N, K))}; /* padding rows zero */
    tk_pool *pool = NULL;
    if (threads <= 0) threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    int status = 2;
    if (q.tiles && tk_pool_create(&pool, threads) == TK_OK) {
        for (int r = 0; r < N; r++) tk_qmatrix_put_row(&q, r, w + (size_t)r * row_bytes);
        if (portable) tk_cpu_matmul_nt_q_portable(pool, y, N, x, K, &q, T, alpha, beta);
        else tk_cpu_matmul_nt_q(pool, y, N, x, K, &q, T, alpha, beta);
        status = 0;
    } else {
        snprintf(err, err_len, "matmul_q: out of memory");
    }
    tk_pool_free(pool);
    free(q.tiles);
    return status;
}
