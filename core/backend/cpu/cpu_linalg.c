/*
 * Dense linear algebra on the CPU: GEMMs through OpenBLAS, bias add and its
 * gradient, and the vector ops the optimizer and gradient clipping need.
 *
 * OpenBLAS runs its own thread pool inside each sgemm (sized by
 * OPENBLAS_NUM_THREADS), so cblas is only ever called from serial code:
 * calling it from inside an OpenMP region would nest two thread pools.
 */
#include "backend/cpu/cpu_ops.h"

#include <cblas.h>
#include <math.h>

static CBLAS_TRANSPOSE cblas_op(int t) { return t ? CblasTrans : CblasNoTrans; }

void cpu_gemm(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha, const float *A,
              int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    (void)be;
    if (M <= 0 || N <= 0) return;
    cblas_sgemm(CblasRowMajor, cblas_op(ta), cblas_op(tb), M, N, K, alpha, A, lda, B, ldb, beta, C,
                ldc);
}

/* One sgemm per batch entry: each is large enough (an expert's C x d by d x h
 * product) for OpenBLAS to thread on its own. */
void cpu_gemm_strided_batched(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha,
                              const float *A, int lda, long long strideA, const float *B, int ldb,
                              long long strideB, float beta, float *C, int ldc, long long strideC,
                              int batch) {
    for (int i = 0; i < batch; ++i)
        cpu_gemm(be, ta, tb, M, N, K, alpha, A + i * strideA, lda, B + i * strideB, ldb, beta,
                 C + i * strideC, ldc);
}

void cpu_add_bias(moe_backend *be, float *y, const float *b, int T, int N) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
        float *row = y + (size_t)t * N;
        for (int j = 0; j < N; ++j) row[j] += b[j];
    }
}

/* db[j] += sum_t dy[t,j]. Threads own blocks of columns and walk the rows in
 * order, so every db[j] is summed in the same order whatever the thread count. */
void cpu_bias_grad(moe_backend *be, const float *dy, float *db, int T, int N) {
    (void)be;
    int nblocks = (N + CPU_COL_BLOCK - 1) / CPU_COL_BLOCK;
#pragma omp parallel for schedule(static)
    for (int blk = 0; blk < nblocks; ++blk) {
        int j0 = blk * CPU_COL_BLOCK;
        int j1 = j0 + CPU_COL_BLOCK < N ? j0 + CPU_COL_BLOCK : N;
        for (int t = 0; t < T; ++t) {
            const float *row = dy + (size_t)t * N;
            for (int j = j0; j < j1; ++j) db[j] += row[j];
        }
    }
}

/* C[e][m][j] += bias[e*stride_bias + j] for `batch` blocks of M rows at
 * any ldc: one addition per element. */
static void add_bias_rows(float *C, int ldc, long long strideC, const float *bias, long long stride_bias, int M,
                          int N, int batch) {
    if (batch <= 0 || M <= 0 || N <= 0) return;
    long long rows = (long long)batch * M;
#pragma omp parallel for schedule(static)
    for (long long r = 0; r < rows; ++r) {
        long long e = r / M, m = r % M;
        float *row = C + e * strideC + m * (long long)ldc;
        const float *b = bias + e * stride_bias;
        for (int j = 0; j < N; ++j) row[j] += b[j];
    }
}

/* C[e][m][j] += R[e][m][j] for `batch` blocks of M rows, R laid out as C:
 * one addition per element. */
static void add_residual_rows(float *C, int ldc, long long strideC, const float *R, int M, int N, int batch) {
    if (batch <= 0 || M <= 0 || N <= 0) return;
    long long rows = (long long)batch * M;
#pragma omp parallel for schedule(static)
    for (long long r = 0; r < rows; ++r) {
        long long e = r / M, m = r % M;
        long long off = e * strideC + m * (long long)ldc;
        float *row = C + off;
        const float *res = R + off;
        for (int j = 0; j < N; ++j) row[j] += res[j];
    }
}

/* The product, then the bias add of cpu_add_bias_batched (bitwise that pair
 * of calls when ldc == N), then the residual add (bitwise an axpy of 1 *
 * residual into that result: 1 * r is r, and the addition commutes). */
void cpu_gemm_bias(moe_backend *be, int ta, int tb, int M, int N, int K, const float *A, int lda,
                   long long strideA, const float *B, int ldb, long long strideB, const float *bias,
                   long long stride_bias, const float *residual, float *C, int ldc, long long strideC,
                   int batch) {
    cpu_gemm_strided_batched(be, ta, tb, M, N, K, 1.0f, A, lda, strideA, B, ldb, strideB, 0.0f, C, ldc,
                             strideC, batch);
    if (bias) add_bias_rows(C, ldc, strideC, bias, stride_bias, M, N, batch);
    if (residual) add_residual_rows(C, ldc, strideC, residual, M, N, batch);
}

/* The per-expert forms: entry e of the batch is y + e*stride_y ([T,N]) and
 * b + e*stride_b ([N]). Every element sees the same single addition as in
 * cpu_add_bias, and every db[e*stride_db + j] is summed by one thread over
 * the rows in order, starting from what it held: the results are bitwise
 * those of a loop of cpu_add_bias / cpu_bias_grad over the entries. */
void cpu_add_bias_batched(moe_backend *be, float *y, const float *b, int batch, int T, int N,
                          long long stride_y, long long stride_b) {
    (void)be;
    add_bias_rows(y, N, stride_y, b, stride_b, T, N, batch);
}

void cpu_bias_grad_batched(moe_backend *be, const float *dy, float *db, int batch, int T, int N,
                           long long stride_dy, long long stride_db) {
    (void)be;
    if (batch <= 0 || T <= 0 || N <= 0) return;
    int nblocks = (N + CPU_COL_BLOCK - 1) / CPU_COL_BLOCK;
    long long work = (long long)batch * nblocks;
#pragma omp parallel for schedule(static)
    for (long long w = 0; w < work; ++w) {
        long long e = w / nblocks;
        int blk = (int)(w % nblocks);
        int j0 = blk * CPU_COL_BLOCK;
        int j1 = j0 + CPU_COL_BLOCK < N ? j0 + CPU_COL_BLOCK : N;
        const float *src = dy + e * stride_dy;
        float *dst = db + e * stride_db;
        for (int t = 0; t < T; ++t) {
            const float *row = src + (size_t)t * N;
            for (int j = j0; j < j1; ++j) dst[j] += row[j];
        }
    }
}

void cpu_axpy(moe_backend *be, float a, const float *x, float *y, size_t n) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void cpu_scale(moe_backend *be, float *x, float a, size_t n) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) x[i] *= a;
}

/* A fixed number of chunks, each summed in order, then the partials summed in
 * chunk order: the result is the same for every thread count (an OpenMP
 * reduction clause leaves the combining order unspecified). */
#define SUMSQ_CHUNKS 256

double cpu_sumsq(moe_backend *be, const float *x, size_t n) {
    (void)be;
    double partial[SUMSQ_CHUNKS];
    size_t chunk = (n + SUMSQ_CHUNKS - 1) / SUMSQ_CHUNKS;
#pragma omp parallel for schedule(static)
    for (int c = 0; c < SUMSQ_CHUNKS; ++c) {
        size_t lo = (size_t)c * chunk < n ? (size_t)c * chunk : n;
        size_t hi = lo + chunk < n ? lo + chunk : n;
        double s = 0.0;
        for (size_t i = lo; i < hi; ++i) s += (double)x[i] * (double)x[i];
        partial[c] = s;
    }
    double total = 0.0;
    for (int c = 0; c < SUMSQ_CHUNKS; ++c) total += partial[c];
    return total;
}

/* The session's clipping, as it was written on the host: the same sumsq,
 * sqrt and scale, so results are unchanged. */
void cpu_clip_grad_norm(moe_backend *be, float *g, size_t n, double clip, double *norm_out) {
    double norm = sqrt(cpu_sumsq(be, g, n));
    *norm_out = norm;
    if (clip > 0.0 && norm > clip) cpu_scale(be, g, (float)(clip / norm), n);
}
