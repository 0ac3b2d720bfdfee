/* cuda_attention.cu - the CUDA backend's attention kernels (see cuda_attention.h), float32 throughout: scores,
 * softmax (expf, not __expf: the CPU backend's tolerances assume an accurate exp) and sums in float32, FlashAttention-2
 * style (the T x T probabilities are never stored: key tiles stream through shared memory and each query row keeps a
 * running max m, a running sum l and an unnormalised output, rescaled by expf(m_old - m_new) as the max grows).
 *
 * Layout of the work (all kernels, 256 threads = 8 warps unless said):
 * - forward (attention, attention_full, attention_cached): a block per (tile of BQ = 64 query positions of one
 *   sequence, query head). Each warp owns ROWS = 8 of the tile's rows. Key tiles of BK = 32 keys, counted from
 *   position 0 of the sequence, go through shared memory; within one, lane j scores key j against the warp's 8 rows
 *   (a d-ordered dot product), the rows' softmax updates use warp shuffles, and for P V lane c owns the output
 *   elements c, c + 32, ... (NC = ceil(head_dim / 32) of them per row, a template parameter: registers).
 * - every row's arithmetic depends on its own query, the keys, its position and the fixed key tiles only: keys past
 *   its position are skipped (not multiplied by zero), and a key tile it cannot see leaves it untouched. So which
 *   rows share its block (or where the block starts) does not change a bit of it, and attention_cached, which runs
 *   the same kernel over blocks holding only the rows it has queries for, gives each row exactly what attention
 *   gives it in a prefill of the whole sequence (tests/ops checks this bit for bit).
 * - backward: D[t, h] = dout . out first (a warp per row and head), then two kernels, no atomics, so the result
 *   is the same on every run: dq with a block per (query tile, head) as the forward, recomputing P = expf(s - lse)
 *   and dS = P (dout v^T - D) tile by tile; dk and dv with a block per (tile of 64 keys, kv head) whose warps own 8
 *   keys each and loop over the group's query heads and the query tiles that see the keys, in a fixed order.
 * - decoding: split-K (flash-decoding). A block of one warp takes up to 8 query heads of one kv head (so a key
 *   and value tile is read once for the heads sharing it) over one slice of the sequence's keys (both spans: the
 *   shared prompt, then its own rows); with several slices each writes its (m, l, unnormalised output) to a
 *   stream-ordered scratch buffer and a second kernel combines them in slice order. The slices are as many as keep
 *   about 1024 blocks busy, at least one 32-key tile each; one slice writes the output directly.
 *
 * Shared-memory tiles of 32 keys (or queries) x Dh are stored swizzled, element (j, d) at d * 32 + (j ^ (d & 31)):
 * lane j reading (j, d) for one d and lane d reading (j, d) for one j both touch 32 distinct banks, so the same
 * tile serves the scores (lane = key) and the P V products (lane = output element) without bank conflicts.
 *
 * Not run on a GPU yet: tests/ops checks every op against float64 references and attention_cached against
 * attention bit for bit (on a GPU, and on the CPU emulation of tests/cuda_emu).
 */
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cuda_attention.h"
#include "cuda_common.cuh"

/* the forward's and backward's tiles: BQ query rows (or keys) a block, ROWS a warp, BK keys (or queries) a tile */
enum { BQ = 64, BK = 32, ROWS = 8, WARPS = BQ / ROWS, ATTN_THREADS = WARPS * 32, MAX_NC = TK_CU_ATTN_MAX_HEAD_DIM / 32 };
/* dynamic shared memory a block may have without asking (cudaFuncSetAttribute raises it, up to 227 KB on sm_90) */
enum { DEFAULT_SHARED = 48 * 1024 };
/* decoding: about this many blocks (one warp each) make a step's work */
enum { DECODE_TARGET_BLOCKS = 1024 };

#define FULL_MASK 0xffffffffu

/* full unrolling of the loops over the register arrays (nvcc; the emulator's g++ needs none) */
#ifdef __CUDACC__
#define UNROLL _Pragma("unroll")
#else
#define UNROLL
#endif

/* Where one tile's rows are. Positions count from the start of the sequence; row `pos` of q (and of out, lse,
 * dout, dq) is q_row + pos, key `j` is row j of k and v (already at the sequence's first row). */
struct attn_tile {
    const float *k, *v; /* the sequence's key and value rows (column 0) */
    long long q_row;    /* the q row of position 0 (negative when the first positions have no query: cached) */
    int pos0;           /* the tile's first position (a multiple of BQ) */
    int first;          /* the first position with a query (attention_cached: the cached count; else 0) */
    int len;            /* the sequence's positions, = its keys */
};

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int clamp_keys(int n) { return n < 0 ? 0 : n > BK ? BK : n; }

/* element (j, d) of a swizzled [32][Dh] tile */
__device__ __forceinline__ int swz(int j, int d) { return d * 32 + (j ^ (d & 31)); }

/* butterfly reductions over a warp: every lane gets the same bits (each step adds a + b on one lane and b + a on
 * its partner), in an order that depends on nothing but the lanes' values */
__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

/* ---- loads into shared memory (by all the block's threads) ---- */

/* dst = a swizzled [32][Dh] tile of rows j0 .. j0 + 32 of two spans (row j is a + j ld for j < na, else
 * b + (j - na) ld; column col on): tile row j < n is that row, the others zeros. */
__device__ void load_tile(float *dst, const float *a, int na, const float *b, int ld, int col, int j0, int n, int Dh)
{
    for (int idx = threadIdx.x; idx < BK * Dh; idx += blockDim.x) {
        int j = idx / Dh, d = idx - j * Dh, row = j0 + j;
        float x = 0.0f;
        if (j < n) x = (row < na ? a + (size_t)row * ld : b + (size_t)(row - na) * ld)[col + d];
        dst[swz(j, d)] = x;
    }
}

/* dst[i][d] (row-major [R][Dh]) = src[(row0 + pos0 + i) ld + d] for positions pos0 + i in [lo, hi), else 0 */
__device__ void load_rows(float *dst, int R, const float *src, long long row0, int ld, int pos0, int lo, int hi,
                          int Dh)
{
    for (int idx = threadIdx.x; idx < R * Dh; idx += blockDim.x) {
        int i = idx / Dh, d = idx - i * Dh, pos = pos0 + i;
        dst[idx] = pos >= lo && pos < hi ? src[(row0 + pos) * ld + d] : 0.0f;
    }
}

/* ---- one warp's rows against one key tile ---- */

/* s[r] = A[r] . T[lane] for the warp's ROWS rows A [ROWS][Dh] (row-major) and the swizzled tile T: lane = key,
 * products added in d order */
__device__ __forceinline__ void tile_dots(float s[ROWS], const float *A, const float *T, int Dh)
{
    const int lane = threadIdx.x & 31;
    UNROLL for (int r = 0; r < ROWS; r++) s[r] = 0.0f;
    for (int d = 0; d < Dh; d++) {
        const float t = T[swz(lane, d)];
        UNROLL for (int r = 0; r < ROWS; r++) s[r] += A[r * Dh + d] * t;
    }
}

/* The online-softmax step of the warp's ROWS query rows Q [ROWS][Dh] over a key tile K (swizzled), first half:
 * row r sees the tile's first nk[r] keys (0: the row is left exactly as it was). m, l: each row's running max and
 * sum (every lane holds the same), acc[r][c]: its unnormalised output element lane + 32 c, rescaled here to the new
 * max. P [ROWS][BK] (shared memory) gets the rows' probabilities for tile_values. */
template <int NC>
__device__ void tile_softmax(const float *Q, const float *K, float *P, const int nk[ROWS], float scale, int Dh,
                             float m[ROWS], float l[ROWS], float acc[ROWS][NC])
{
    const int lane = threadIdx.x & 31;
    float s[ROWS];
    tile_dots(s, Q, K, Dh);
    UNROLL for (int r = 0; r < ROWS; r++) {
        if (nk[r] == 0) continue; /* the same for the whole warp */
        const float x = lane < nk[r] ? s[r] * scale : -INFINITY;
        const float mn = fmaxf(m[r], warp_max(x));
        const float p = lane < nk[r] ? expf(x - mn) : 0.0f;
        const float alpha = expf(m[r] - mn); /* 0 on the row's first tile (m = -inf) */
        l[r] = l[r] * alpha + warp_sum(p);
        m[r] = mn;
        UNROLL for (int c = 0; c < NC; c++) acc[r][c] *= alpha;
        P[r * BK + lane] = p;
    }
}

/* Second half: acc[r] += sum over the tile's first nk[r] keys j, in order, of P[r][j] v_j (V swizzled). The
 * caller orders P's writes before (a barrier). */
template <int NC>
__device__ void tile_values(const float *V, const float *P, const int nk[ROWS], int Dh, float acc[ROWS][NC])
{
    const int lane = threadIdx.x & 31;
    int jmax = 0;
    UNROLL for (int r = 0; r < ROWS; r++) jmax = imax(jmax, nk[r]);
    for (int j = 0; j < jmax; j++) {
        float vj[NC];
        UNROLL for (int c = 0; c < NC; c++) vj[c] = lane + 32 * c < Dh ? V[swz(j, lane + 32 * c)] : 0.0f;
        UNROLL for (int r = 0; r < ROWS; r++) {
            if (j >= nk[r]) continue;
            const float p = P[r * BK + j];
            UNROLL for (int c = 0; c < NC; c++) acc[r][c] += p * vj[c];
        }
    }
}

/* ---- the forward: attention, attention_full, attention_cached ---- */

/* Block (tile, head h): out[q_row + pos, h Dh:] for the tile's positions that have a query, and lse (optional,
 * row stride n_heads). q rows of ldq floats, k / v rows of ld_kv, the kv head g = h / group at column g Dh.
 * Shared: Q [BQ][Dh], K and V swizzled [BK][Dh], P [BQ][BK]. */
template <int NC>
__global__ void attn_fwd_k(const attn_tile *tiles, const float *q, int ldq, float *out, int ldo, float *lse, int ld_kv,
                           int n_heads, int group, int Dh, float scale, int causal)
{
    extern __shared__ float smem[];
    float *Qs = smem, *Ks = Qs + BQ * Dh, *Vs = Ks + BK * Dh, *Ps = Vs + BK * Dh;
    const attn_tile t = tiles[blockIdx.x];
    const int h = blockIdx.y, col = (h / group) * Dh, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int end = imin(t.pos0 + BQ, t.len); /* past the tile's last position */
    load_rows(Qs, BQ, q + (size_t)h * Dh, t.q_row, ldq, t.pos0, t.first, end, Dh);

    float m[ROWS], l[ROWS], acc[ROWS][NC];
    int pos[ROWS], sees[ROWS]; /* a row's position, and the keys it sees (0: no query there) */
    UNROLL for (int r = 0; r < ROWS; r++) {
        pos[r] = t.pos0 + warp * ROWS + r;
        sees[r] = pos[r] >= t.first && pos[r] < end ? (causal ? pos[r] + 1 : t.len) : 0;
        m[r] = -INFINITY, l[r] = 0.0f;
        UNROLL for (int c = 0; c < NC; c++) acc[r][c] = 0.0f;
    }
    const int n_keys = causal ? end : t.len;
    for (int k0 = 0; k0 < n_keys; k0 += BK) {
        const int n = imin(BK, n_keys - k0);
        __syncthreads(); /* the last tile's readers are done (the first time: Qs is written) */
        load_tile(Ks, t.k, INT_MAX, NULL, ld_kv, col, k0, n, Dh);
        load_tile(Vs, t.v, INT_MAX, NULL, ld_kv, col, k0, n, Dh);
        __syncthreads();
        int nk[ROWS];
        UNROLL for (int r = 0; r < ROWS; r++) nk[r] = clamp_keys(sees[r] - k0);
        float *Pw = Ps + warp * ROWS * BK;
        tile_softmax<NC>(Qs + warp * ROWS * Dh, Ks, Pw, nk, scale, Dh, m, l, acc);
        __syncwarp(); /* the warp's P rows */
        tile_values<NC>(Vs, Pw, nk, Dh, acc);
    }
    UNROLL for (int r = 0; r < ROWS; r++) {
        if (!sees[r]) continue;
        const long long row = t.q_row + pos[r];
        float *o = out + row * ldo + (size_t)h * Dh;
        UNROLL for (int c = 0; c < NC; c++)
            if (lane + 32 * c < Dh) o[lane + 32 * c] = acc[r][c] / l[r];
        if (lse && lane == 0) lse[row * n_heads + h] = m[r] + logf(l[r]);
    }
}

/* ---- the backward ---- */

/* D[t, h] = dout[t, h Dh:] . out[t, h Dh:]: block t, a warp per head */
__global__ void attn_bwd_rowdot_k(float *D, const float *dout, const float *out, int ldo, int n_heads, int Dh)
{
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const float *dr = dout + (size_t)blockIdx.x * ldo, *orow = out + (size_t)blockIdx.x * ldo;
    for (int h = threadIdx.x >> 5; h < n_heads; h += warps) {
        float s = 0.0f;
        for (int d = lane; d < Dh; d += 32) s += dr[(size_t)h * Dh + d] * orow[(size_t)h * Dh + d];
        s = warp_sum(s);
        if (lane == 0) D[(size_t)blockIdx.x * n_heads + h] = s;
    }
}

/* Block (query tile, head h): dq[q_row + pos, h Dh:] = scale sum_j dS_j k_j over the keys j <= pos, with
 * P_j = expf(scale q . k_j - lse), dS_j = P_j (dout . v_j - D). Shared: Q and dout [BQ][Dh], K and V swizzled
 * [BK][Dh], dS [BQ][BK]. */
template <int NC>
__global__ void attn_bwd_dq_k(const attn_tile *tiles, float *dq, const float *q, int ldqkv, const float *dout, int ldo,
                              const float *lse, const float *D, int n_heads, int group, int Dh, float scale)
{
    extern __shared__ float smem[];
    float *Qs = smem, *dOs = Qs + BQ * Dh, *Ks = dOs + BQ * Dh, *Vs = Ks + BK * Dh, *Ss = Vs + BK * Dh;
    const attn_tile t = tiles[blockIdx.x];
    const int h = blockIdx.y, col = (h / group) * Dh, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int end = imin(t.pos0 + BQ, t.len);
    load_rows(Qs, BQ, q + (size_t)h * Dh, t.q_row, ldqkv, t.pos0, 0, end, Dh);
    load_rows(dOs, BQ, dout + (size_t)h * Dh, t.q_row, ldo, t.pos0, 0, end, Dh);
    const float *Qw = Qs + warp * ROWS * Dh, *dOw = dOs + warp * ROWS * Dh;
    float *Sw = Ss + warp * ROWS * BK;

    float acc[ROWS][NC], row_lse[ROWS], row_D[ROWS];
    int pos[ROWS], sees[ROWS];
    UNROLL for (int r = 0; r < ROWS; r++) {
        pos[r] = t.pos0 + warp * ROWS + r;
        sees[r] = pos[r] < end ? pos[r] + 1 : 0;
        const long long row = t.q_row + pos[r];
        row_lse[r] = sees[r] ? lse[row * n_heads + h] : 0.0f;
        row_D[r] = sees[r] ? D[row * n_heads + h] : 0.0f;
        UNROLL for (int c = 0; c < NC; c++) acc[r][c] = 0.0f;
    }
    for (int k0 = 0; k0 < end; k0 += BK) {
        const int n = imin(BK, end - k0);
        __syncthreads();
        load_tile(Ks, t.k, INT_MAX, NULL, ldqkv, col, k0, n, Dh);
        load_tile(Vs, t.v, INT_MAX, NULL, ldqkv, col, k0, n, Dh);
        __syncthreads();
        int nk[ROWS], jmax = 0;
        float s[ROWS], dp[ROWS];
        tile_dots(s, Qw, Ks, Dh);
        tile_dots(dp, dOw, Vs, Dh);
        UNROLL for (int r = 0; r < ROWS; r++) {
            nk[r] = clamp_keys(sees[r] - k0);
            jmax = imax(jmax, nk[r]);
            Sw[r * BK + lane] = lane < nk[r] ? expf(s[r] * scale - row_lse[r]) * (dp[r] - row_D[r]) : 0.0f;
        }
        __syncwarp();
        for (int j = 0; j < jmax; j++) {
            float kj[NC];
            UNROLL for (int c = 0; c < NC; c++) kj[c] = lane + 32 * c < Dh ? Ks[swz(j, lane + 32 * c)] : 0.0f;
            UNROLL for (int r = 0; r < ROWS; r++) {
                if (j >= nk[r]) continue;
                const float ds = Sw[r * BK + j];
                UNROLL for (int c = 0; c < NC; c++) acc[r][c] += ds * kj[c];
            }
        }
    }
    UNROLL for (int r = 0; r < ROWS; r++) {
        if (!sees[r]) continue;
        float *o = dq + (t.q_row + pos[r]) * ldqkv + (size_t)h * Dh;
        UNROLL for (int c = 0; c < NC; c++)
            if (lane + 32 * c < Dh) o[lane + 32 * c] = acc[r][c] * scale;
    }
}

/* Block (tile of BQ keys, kv head g): dk = scale sum dS_i q_i and dv = sum P_i dout_i over the group's query heads
 * and the queries i at or after each key, in the order head, query. Each warp owns ROWS keys (acc elements lane +
 * 32 c); lane = query for the scores. Shared: K and V [BQ][Dh], Q and dout swizzled [BK][Dh], P and dS [BQ][BK],
 * lse and D [BK]. */
template <int NC>
__global__ void attn_bwd_dkv_k(const attn_tile *tiles, float *dk, float *dv, const float *q, int ldqkv,
                               const float *dout, int ldo, const float *lse, const float *D, int n_heads, int group,
                               int Dh, float scale)
{
    extern __shared__ float smem[];
    float *Ks = smem, *Vs = Ks + BQ * Dh, *Qt = Vs + BQ * Dh, *dOt = Qt + BK * Dh, *Ps = dOt + BK * Dh;
    float *Ss = Ps + BQ * BK, *lse_s = Ss + BQ * BK, *D_s = lse_s + BK;
    const attn_tile t = tiles[blockIdx.x];
    const int g = blockIdx.y, col = g * Dh, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int end = imin(t.pos0 + BQ, t.len);
    /* the keys' rows: k and v are at the sequence's first row already */
    load_rows(Ks, BQ, t.k + col, 0, ldqkv, t.pos0, 0, end, Dh);
    load_rows(Vs, BQ, t.v + col, 0, ldqkv, t.pos0, 0, end, Dh);
    const float *Kw = Ks + warp * ROWS * Dh, *Vw = Vs + warp * ROWS * Dh;
    float *Pw = Ps + warp * ROWS * BK, *Sw = Ss + warp * ROWS * BK;
    const float *q_seq = q + t.q_row * ldqkv, *dout_seq = dout + t.q_row * ldo;

    float dk_acc[ROWS][NC], dv_acc[ROWS][NC];
    int key[ROWS], valid[ROWS];
    UNROLL for (int r = 0; r < ROWS; r++) {
        key[r] = t.pos0 + warp * ROWS + r;
        valid[r] = key[r] < end;
        UNROLL for (int c = 0; c < NC; c++) dk_acc[r][c] = dv_acc[r][c] = 0.0f;
    }
    const int first_key = t.pos0 + warp * ROWS; /* the warp's first key: no query before it sees its keys */
    for (int hh = 0; hh < group; hh++) {
        const int h = g * group + hh;
        for (int q0 = t.pos0; q0 < t.len; q0 += BK) {
            const int n = imin(BK, t.len - q0);
            __syncthreads();
            load_tile(Qt, q_seq, INT_MAX, NULL, ldqkv, h * Dh, q0, n, Dh);
            load_tile(dOt, dout_seq, INT_MAX, NULL, ldo, h * Dh, q0, n, Dh);
            if (threadIdx.x < BK) {
                const long long row = t.q_row + q0 + threadIdx.x;
                lse_s[threadIdx.x] = (int)threadIdx.x < n ? lse[row * n_heads + h] : 0.0f;
                D_s[threadIdx.x] = (int)threadIdx.x < n ? D[row * n_heads + h] : 0.0f;
            }
            __syncthreads();
            float s[ROWS], dp[ROWS];
            tile_dots(s, Kw, Qt, Dh);
            tile_dots(dp, Vw, dOt, Dh);
            UNROLL for (int r = 0; r < ROWS; r++) {
                const int seen = valid[r] && lane < n && q0 + lane >= key[r];
                const float p = seen ? expf(s[r] * scale - lse_s[lane]) : 0.0f;
                Pw[r * BK + lane] = p;
                Sw[r * BK + lane] = seen ? p * (dp[r] - D_s[lane]) : 0.0f;
            }
            __syncwarp();
            for (int i = imax(0, first_key - q0); i < n; i++) {
                float qi[NC], di[NC];
                UNROLL for (int c = 0; c < NC; c++) {
                    const int d = lane + 32 * c;
                    qi[c] = d < Dh ? Qt[swz(i, d)] : 0.0f;
                    di[c] = d < Dh ? dOt[swz(i, d)] : 0.0f;
                }
                UNROLL for (int r = 0; r < ROWS; r++) {
                    if (!valid[r] || q0 + i < key[r]) continue;
                    const float p = Pw[r * BK + i], ds = Sw[r * BK + i];
                    UNROLL for (int c = 0; c < NC; c++) {
                        dv_acc[r][c] += p * di[c];
                        dk_acc[r][c] += ds * qi[c];
                    }
                }
            }
        }
    }
    UNROLL for (int r = 0; r < ROWS; r++) {
        if (!valid[r]) continue;
        const long long row = t.q_row + key[r];
        float *k_out = dk + row * ldqkv + col, *v_out = dv + row * ldqkv + col;
        UNROLL for (int c = 0; c < NC; c++)
            if (lane + 32 * c < Dh) {
                k_out[lane + 32 * c] = dk_acc[r][c] * scale;
                v_out[lane + 32 * c] = dv_acc[r][c];
            }
    }
}

/* ---- decoding ---- */

/* Block (key slice, kv head g's chunk of up to ROWS query heads, sequence i), one warp: the heads' online softmax
 * over keys [slice tiles_per_slice BK, ...) of both spans. One slice (part NULL): out[i, h Dh:] normalised; else
 * part[((i n_heads + h) slices + slice) (Dh + 2) ..] = m, l, then the unnormalised output (an empty slice: -inf,
 * 0, zeros). Shared: Q [ROWS][Dh], one swizzled [BK][Dh] tile (the keys, then the values: a small block, so that
 * many fit on a multiprocessor), P [ROWS][BK]. */
template <int NC>
__global__ void attn_decode_k(const tk_cu_kv_view *views, const float *q, int ldq, float *out, int ldo, float *part,
                              int n_heads, int group, int Dh, int ld_kv, float scale, int tiles_per_slice)
{
    extern __shared__ float smem[];
    float *Qs = smem, *KVs = Qs + ROWS * Dh, *Ps = KVs + BK * Dh;
    const tk_cu_kv_view kv = views[blockIdx.z];
    const int chunks = (group + ROWS - 1) / ROWS, g = blockIdx.y / chunks, chunk = blockIdx.y % chunks;
    const int h0 = g * group + chunk * ROWS, nh = imin(ROWS, group - chunk * ROWS), col = g * Dh;
    const int lane = threadIdx.x & 31, n_keys = kv.n0 + kv.n1;
    /* the chunk's heads are consecutive Dh-wide pieces of the sequence's q row */
    load_rows(Qs, ROWS, q + (size_t)blockIdx.z * ldq + (size_t)h0 * Dh, 0, Dh, 0, 0, nh, Dh);

    float m[ROWS], l[ROWS], acc[ROWS][NC];
    UNROLL for (int r = 0; r < ROWS; r++) {
        m[r] = -INFINITY, l[r] = 0.0f;
        UNROLL for (int c = 0; c < NC; c++) acc[r][c] = 0.0f;
    }
    const int lo = blockIdx.x * tiles_per_slice * BK, hi = imin(n_keys, lo + tiles_per_slice * BK);
    for (int k0 = lo; k0 < hi; k0 += BK) {
        const int n = imin(BK, hi - k0);
        int nk[ROWS];
        UNROLL for (int r = 0; r < ROWS; r++) nk[r] = r < nh ? n : 0;
        __syncthreads(); /* the last tile's values are read (the first time: Qs is written) */
        load_tile(KVs, kv.k0, kv.n0, kv.k1, ld_kv, col, k0, n, Dh);
        __syncthreads();
        tile_softmax<NC>(Qs, KVs, Ps, nk, scale, Dh, m, l, acc);
        __syncthreads(); /* the keys are read; P is written */
        load_tile(KVs, kv.v0, kv.n0, kv.v1, ld_kv, col, k0, n, Dh);
        __syncthreads();
        tile_values<NC>(KVs, Ps, nk, Dh, acc);
    }
    UNROLL for (int r = 0; r < ROWS; r++) {
        if (r >= nh) continue;
        const int h = h0 + r;
        if (!part) {
            float *o = out + (size_t)blockIdx.z * ldo + (size_t)h * Dh;
            UNROLL for (int c = 0; c < NC; c++)
                if (lane + 32 * c < Dh) o[lane + 32 * c] = acc[r][c] / l[r];
            continue;
        }
        float *p = part + (((size_t)blockIdx.z * n_heads + h) * gridDim.x + blockIdx.x) * (Dh + 2);
        if (lane == 0) p[0] = m[r], p[1] = l[r];
        UNROLL for (int c = 0; c < NC; c++)
            if (lane + 32 * c < Dh) p[2 + lane + 32 * c] = acc[r][c];
    }
}

/* Block (h, i): out[i, h Dh:] from the slices' partial results, in slice order: with M the largest m,
 * out = sum_s acc_s expf(m_s - M) / sum_s l_s expf(m_s - M). */
__global__ void attn_decode_combine_k(const float *part, float *out, int ldo, int n_heads, int Dh, int slices)
{
    const int h = blockIdx.x, i = blockIdx.y;
    const float *p = part + ((size_t)i * n_heads + h) * slices * (Dh + 2);
    float M = -INFINITY, L = 0.0f;
    for (int s = 0; s < slices; s++) M = fmaxf(M, p[(size_t)s * (Dh + 2)]);
    for (int s = 0; s < slices; s++) L += p[(size_t)s * (Dh + 2) + 1] * expf(p[(size_t)s * (Dh + 2)] - M);
    for (int d = threadIdx.x; d < Dh; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < slices; s++) o += p[(size_t)s * (Dh + 2) + 2 + d] * expf(p[(size_t)s * (Dh + 2)] - M);
        out[(size_t)i * ldo + (size_t)h * Dh + d] = o / L;
    }
}

/* ---- the host side ---- */

typedef void (*fwd_fn)(const attn_tile *, const float *, int, float *, int, float *, int, int, int, int, float, int);
typedef void (*dq_fn)(const attn_tile *, float *, const float *, int, const float *, int, const float *, const float *,
                      int, int, int, float);
typedef void (*dkv_fn)(const attn_tile *, float *, float *, const float *, int, const float *, int, const float *,
                       const float *, int, int, int, float);
typedef void (*decode_fn)(const tk_cu_kv_view *, const float *, int, float *, int, float *, int, int, int, int, float,
                          int);

/* the kernels for NC = 1 .. MAX_NC output elements a lane */
#define FOR_EACH_NC(k) {k<1>, k<2>, k<3>, k<4>, k<5>, k<6>, k<7>, k<8>}
static const fwd_fn FWD_KERNELS[MAX_NC] = FOR_EACH_NC(attn_fwd_k);
static const dq_fn DQ_KERNELS[MAX_NC] = FOR_EACH_NC(attn_bwd_dq_k);
static const dkv_fn DKV_KERNELS[MAX_NC] = FOR_EACH_NC(attn_bwd_dkv_k);
static const decode_fn DECODE_KERNELS[MAX_NC] = FOR_EACH_NC(attn_decode_k);
#undef FOR_EACH_NC

/* NC for head_dim (0, with the failure recorded, when no kernel takes it) */
static int chunks_of(tk_cu *cu, int head_dim, const char *op)
{
    if (head_dim > 0 && head_dim <= TK_CU_ATTN_MAX_HEAD_DIM) return (head_dim + 31) / 32;
    check(cu, cudaErrorInvalidValue, op); /* "invalid argument in <op>": head_dim outside 1 .. 256 */
    return 0;
}

/* lets `kernel` have `bytes` of dynamic shared memory (past the default 48 KB) */
template <typename K> static void allow_shared(tk_cu *cu, K *kernel, size_t bytes, const char *op)
{
    if (bytes > DEFAULT_SHARED)
        check(cu, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), op);
}

/* The tiles of BQ positions of every sequence, from position 0: a host array (free it), *n of them. k and v are
 * at each sequence's first row. */
static attn_tile *sequence_tiles(const int32_t *seq_start, int n_seqs, const float *k, const float *v, int ldqkv,
                                 int *n)
{
    int count = 0;
    for (int s = 0; s < n_seqs; s++) count += (seq_start[s + 1] - seq_start[s] + BQ - 1) / BQ;
    attn_tile *tiles = (attn_tile *)malloc((size_t)(count ? count : 1) * sizeof *tiles);
    *n = 0;
    if (!tiles) return NULL;
    for (int s = 0; s < n_seqs; s++) {
        int start = seq_start[s], len = seq_start[s + 1] - start;
        for (int p0 = 0; p0 < len; p0 += BQ)
            tiles[(*n)++] = attn_tile{k + (size_t)start * ldqkv, v + (size_t)start * ldqkv, start, p0, 0, len};
    }
    return tiles;
}

static size_t fwd_shared(int Dh) { return ((size_t)(BQ + 2 * BK) * Dh + BQ * BK) * sizeof(float); }
static size_t dq_shared(int Dh) { return ((size_t)(2 * BQ + 2 * BK) * Dh + BQ * BK) * sizeof(float); }
static size_t dkv_shared(int Dh) { return ((size_t)(2 * BQ + 2 * BK) * Dh + 2 * BQ * BK + 2 * BK) * sizeof(float); }
static size_t decode_shared(int Dh) { return ((size_t)(ROWS + BK) * Dh + ROWS * BK) * sizeof(float); }

/* the forward kernel over a host tile list (staged here) */
static void run_forward(tk_cu *cu, const attn_tile *host_tiles, int n_tiles, const float *q, int ldq, float *out,
                        int ldo, float *lse, int ld_kv, int n_heads, int n_kv_heads, int head_dim, int causal,
                        const char *op)
{
    int nc = chunks_of(cu, head_dim, op);
    if (!nc || n_tiles == 0 || n_heads <= 0) return;
    attn_tile *tiles = (attn_tile *)staged(cu, host_tiles, (size_t)n_tiles * sizeof *host_tiles);
    if (failed(cu)) return unstage(cu, tiles); /* the staging failed: sync reports it */
    fwd_fn fwd = FWD_KERNELS[nc - 1];
    size_t shared = fwd_shared(head_dim);
    allow_shared(cu, fwd, shared, op);
    dim3 grid((unsigned)n_tiles, (unsigned)n_heads);
    float scale = 1.0f / sqrtf((float)head_dim);
    fwd<<<grid, ATTN_THREADS, shared, cu->stream>>>(tiles, q, ldq, out, ldo, lse, ld_kv, n_heads, n_heads / n_kv_heads, head_dim, scale, causal);
    launched(cu, op);
    unstage(cu, tiles);
}

extern "C" void tk_cu_attention(tk_cu *cu, float *out, int ldo, const float *q, const float *k, const float *v,
                                int ldqkv, const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads,
                                int head_dim, float *lse, int causal)
{
    const char *op = causal ? "attention" : "attention_full";
    int n_tiles;
    attn_tile *tiles = sequence_tiles(seq_start, n_seqs, k, v, ldqkv, &n_tiles);
    if (!tiles) return check(cu, cudaErrorMemoryAllocation, op);
    run_forward(cu, tiles, n_tiles, q, ldqkv, out, ldo, lse, ldqkv, n_heads, n_kv_heads, head_dim, causal, op);
    free(tiles);
}

/* Sequence i's new rows (seq_start[i] .. seq_start[i+1] of q and out) are its last positions; the tiles are the
 * ones attention takes from position 0 that hold any of them, their cached positions skipped. */
extern "C" void tk_cu_attention_cached(tk_cu *cu, float *out, int ldo, const float *q, int ldq,
                                       const tk_cu_kv_view *views, const int32_t *seq_start, int n_seqs, int n_heads,
                                       int n_kv_heads, int head_dim, int ld_kv)
{
    int count = 0;
    for (int i = 0; i < n_seqs; i++) {
        int len = seq_start[i + 1] - seq_start[i], total = views[i].n1;
        if (len > 0) count += (total + BQ - 1) / BQ - (total - len) / BQ;
    }
    attn_tile *tiles = (attn_tile *)malloc((size_t)(count ? count : 1) * sizeof *tiles);
    if (!tiles) return check(cu, cudaErrorMemoryAllocation, "attention_cached");
    int n = 0;
    for (int i = 0; i < n_seqs; i++) {
        int len = seq_start[i + 1] - seq_start[i], total = views[i].n1, past = total - len;
        for (int p0 = past / BQ * BQ; len > 0 && p0 < total; p0 += BQ)
            tiles[n++] = attn_tile{views[i].k1, views[i].v1, (long long)seq_start[i] - past, p0, past, total};
    }
    run_forward(cu, tiles, n, q, ldq, out, ldo, NULL, ld_kv, n_heads, n_kv_heads, head_dim, 1, "attention_cached");
    free(tiles);
}

extern "C" size_t tk_cu_attention_backward_workspace(int n_tokens, int n_heads)
{
    size_t n = (size_t)(n_tokens > 0 ? n_tokens : 0) * (size_t)(n_heads > 0 ? n_heads : 0);
    return n ? n : 1;
}

/* work: D [T, n_heads] */
extern "C" void tk_cu_attention_backward(tk_cu *cu, float *dq, float *dk, float *dv, const float *dout,
                                         const float *out, int ldo, const float *q, const float *k, const float *v,
                                         int ldqkv, const float *lse, const int32_t *seq_start, int n_seqs,
                                         int n_heads, int n_kv_heads, int head_dim, float *work)
{
    int nc = chunks_of(cu, head_dim, "attention_backward"), T = seq_start[n_seqs];
    if (!nc || T <= 0 || n_heads <= 0) return;
    int n_tiles, group = n_heads / n_kv_heads;
    attn_tile *host_tiles = sequence_tiles(seq_start, n_seqs, k, v, ldqkv, &n_tiles);
    if (!host_tiles) return check(cu, cudaErrorMemoryAllocation, "attention_backward");
    attn_tile *tiles = (attn_tile *)staged(cu, host_tiles, (size_t)n_tiles * sizeof *host_tiles);
    free(host_tiles);
    if (failed(cu)) return unstage(cu, tiles);
    float scale = 1.0f / sqrtf((float)head_dim);
    float *D = work; /* [T, n_heads] */
    attn_bwd_rowdot_k<<<(unsigned)T, ATTN_THREADS, 0, cu->stream>>>(D, dout, out, ldo, n_heads, head_dim);
    launched(cu, "attention_backward D");

    dq_fn dqk = DQ_KERNELS[nc - 1];
    size_t shared = dq_shared(head_dim);
    allow_shared(cu, dqk, shared, "attention_backward dq");
    dim3 grid_q((unsigned)n_tiles, (unsigned)n_heads);
    dqk<<<grid_q, ATTN_THREADS, shared, cu->stream>>>(tiles, dq, q, ldqkv, dout, ldo, lse, D, n_heads, group, head_dim, scale);
    launched(cu, "attention_backward dq");

    dkv_fn dkvk = DKV_KERNELS[nc - 1];
    shared = dkv_shared(head_dim);
    allow_shared(cu, dkvk, shared, "attention_backward dk dv");
    dim3 grid_kv((unsigned)n_tiles, (unsigned)n_kv_heads);
    dkvk<<<grid_kv, ATTN_THREADS, shared, cu->stream>>>(tiles, dk, dv, q, ldqkv, dout, ldo, lse, D, n_heads, group, head_dim, scale);
    launched(cu, "attention_backward dk dv");
    unstage(cu, tiles);
}

extern "C" void tk_cu_attention_decode(tk_cu *cu, float *out, int ldo, const float *q, int ldq,
                                       const tk_cu_kv_view *views, int n, int n_heads, int n_kv_heads, int head_dim,
                                       int ld_kv)
{
    int nc = chunks_of(cu, head_dim, "attention_decode");
    if (!nc || n <= 0 || n_heads <= 0) return;
    int group = n_heads / n_kv_heads, chunks = (group + ROWS - 1) / ROWS, max_keys = 1;
    for (int i = 0; i < n; i++)
        if (views[i].n0 + views[i].n1 > max_keys) max_keys = views[i].n0 + views[i].n1;
    /* slices: enough blocks to fill the GPU, each at least one tile */
    long base = (long)n * n_kv_heads * chunks;
    int max_tiles = (max_keys + BK - 1) / BK;
    long want = (DECODE_TARGET_BLOCKS + base - 1) / base;
    int slices = (int)(want < max_tiles ? want : max_tiles);
    int tiles_per_slice = (max_tiles + slices - 1) / slices;
    slices = (max_tiles + tiles_per_slice - 1) / tiles_per_slice;

    tk_cu_kv_view *dviews = (tk_cu_kv_view *)staged(cu, views, (size_t)n * sizeof *views);
    if (failed(cu)) return unstage(cu, dviews);
    float *part = NULL;
    if (slices > 1) {
        check(cu, cudaMallocAsync((void **)&part, (size_t)n * n_heads * slices * (head_dim + 2) * sizeof(float), cu->stream),
              "attention_decode scratch");
        if (!part) return unstage(cu, dviews);
    }
    decode_fn dec = DECODE_KERNELS[nc - 1];
    size_t shared = decode_shared(head_dim);
    allow_shared(cu, dec, shared, "attention_decode");
    dim3 grid((unsigned)slices, (unsigned)(n_kv_heads * chunks), (unsigned)n);
    float scale = 1.0f / sqrtf((float)head_dim);
    dec<<<grid, 32, shared, cu->stream>>>(dviews, q, ldq, out, ldo, part, n_heads, group, head_dim, ld_kv, scale, tiles_per_slice);
    launched(cu, "attention_decode");
    if (part) {
        dim3 grid_c((unsigned)n_heads, (unsigned)n);
        attn_decode_combine_k<<<grid_c, 64, 0, cu->stream>>>(part, out, ldo, n_heads, head_dim, slices);
        launched(cu, "attention_decode combine");
        check(cu, cudaFreeAsync(part, cu->stream), "attention_decode scratch");
    }
    unstage(cu, dviews);
}
