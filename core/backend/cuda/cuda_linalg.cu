/*
 * Dense linear algebra on the GPU: GEMMs through cuBLAS, bias add and its
 * gradient, and the vector ops the optimizer and gradient clipping need.
 *
 * cuBLAS is column-major and our matrices are row-major. A row-major X[r,c]
 * with leading dimension ld is, read column-major, X^T[c,r] with the same ld.
 * So C = op(A) op(B) (row-major) is C^T = op(B)^T op(A)^T (column-major):
 * we call cuBLAS with the operands swapped, B first, and M and N swapped;
 * the transpose flags keep their meaning.
 */
#include <cuda_bf16.h>

#include "backend/cuda/cuda_common.cuh"

static cublasOperation_t cublas_op(int t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }

/* ------------------------------------------------------------------ */
/* GEMM                                                                */
/* ------------------------------------------------------------------ */

/* dst[b][r][c] = bf16(src[b*stride + r*ld + c]): each matrix of the batch
 * packed densely (ld = cols), so the GEMM reads no padding and a stride of
 * 0 (one matrix shared by the batch) needs no special case. */
__global__ void to_bf16_kernel(const float *src, long long ld, long long stride, int rows, int cols,
                               int batch, __nv_bfloat16 *dst) {
    const size_t per_matrix = (size_t)rows * cols;
    GRID_STRIDE_LOOP(i, per_matrix * batch) {
        size_t b = i / per_matrix, rc = i % per_matrix;
        size_t r = rc / cols, c = rc % cols;
        dst[i] = __float2bfloat16_rn(src[(long long)b * stride + (long long)r * ld + (long long)c]);
    }
}

/* fp32: cuBLAS sgemm in pure fp32 (CUBLAS_DEFAULT_MATH, set at creation). */
static void gemm_fp32(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha,
                      const float *A, int lda, long long strideA, const float *B, int ldb,
                      long long strideB, float beta, float *C, int ldc, long long strideC,
                      int batch) {
    cublasHandle_t h = cuda_state(be)->cublas;
    if (batch == 1) {
        CUBLAS_CHECK(be, cublasSgemm(h, cublas_op(tb), cublas_op(ta), N, M, K, &alpha, B, ldb, A,
                                     lda, &beta, C, ldc));
    } else {
        CUBLAS_CHECK(be, cublasSgemmStridedBatched(h, cublas_op(tb), cublas_op(ta), N, M, K, &alpha,
                                                   B, ldb, strideB, A, lda, strideA, &beta, C, ldc,
                                                   strideC, batch));
    }
}

/* bf16: A and B rounded to bf16 into the scratch buffer, products
 * accumulated in fp32 into the fp32 C (so beta != 0 keeps full precision). */
static void gemm_bf16(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha,
                      const float *A, int lda, long long strideA, const float *B, int ldb,
                      long long strideB, float beta, float *C, int ldc, long long strideC,
                      int batch) {
    /* stored (row-major) shapes of A and B */
    const int a_rows = ta ? K : M, a_cols = ta ? M : K;
    const int b_rows = tb ? N : K, b_cols = tb ? K : N;
    const size_t a_elems = (size_t)a_rows * a_cols * batch;
    const size_t b_elems = (size_t)b_rows * b_cols * batch;
    ScratchLayout lay;
    const size_t a_off = lay.add(a_elems * sizeof(__nv_bfloat16));
    const size_t b_off = lay.add(b_elems * sizeof(__nv_bfloat16));
    char *base = cuda_scratch(be, lay.total);
    if (!base) return;
    __nv_bfloat16 *Ah = (__nv_bfloat16 *)(base + a_off);
    __nv_bfloat16 *Bh = (__nv_bfloat16 *)(base + b_off);
    cudaStream_t s = cuda_stream(be);

    to_bf16_kernel<<<cuda_blocks(a_elems), CUDA_THREADS, 0, s>>>(A, lda, strideA, a_rows, a_cols,
                                                                  batch, Ah);
    KERNEL_CHECK(be, "to_bf16_kernel (A)");
    to_bf16_kernel<<<cuda_blocks(b_elems), CUDA_THREADS, 0, s>>>(B, ldb, strideB, b_rows, b_cols,
                                                                  batch, Bh);
    KERNEL_CHECK(be, "to_bf16_kernel (B)");

    CUBLAS_CHECK(be, cublasGemmStridedBatchedEx(
                         cuda_state(be)->cublas, cublas_op(tb), cublas_op(ta), N, M, K, &alpha, Bh,
                         CUDA_R_16BF, b_cols, (long long)b_rows * b_cols, Ah, CUDA_R_16BF, a_cols,
                         (long long)a_rows * a_cols, &beta, C, CUDA_R_32F, ldc, strideC, batch,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void cuda_gemm_strided_batched(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha,
                               const float *A, int lda, long long strideA, const float *B, int ldb,
                               long long strideB, float beta, float *C, int ldc, long long strideC,
                               int batch) {
    if (M <= 0 || N <= 0 || batch <= 0) return;
    /* With K = 0 there is nothing to round: the fp32 call scales C by beta. */
    if (cuda_state(be)->precision == MOE_PRECISION_BF16 && K > 0)
        gemm_bf16(be, ta, tb, M, N, K, alpha, A, lda, strideA, B, ldb, strideB, beta, C, ldc,
                  strideC, batch);
    else
        gemm_fp32(be, ta, tb, M, N, K, alpha, A, lda, strideA, B, ldb, strideB, beta, C, ldc,
                  strideC, batch);
}

void cuda_gemm(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha, const float *A,
               int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    cuda_gemm_strided_batched(be, ta, tb, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
}

/* ------------------------------------------------------------------ */
/* Bias                                                                */
/* ------------------------------------------------------------------ */

__global__ void add_bias_kernel(float *y, const float *b, size_t n, int N) {
    GRID_STRIDE_LOOP(i, n) y[i] += b[i % (size_t)N];
}

void cuda_add_bias(moe_backend *be, float *y, const float *b, int T, int N) {
    if (T <= 0 || N <= 0) return;
    size_t n = (size_t)T * N;
    add_bias_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cuda_stream(be)>>>(y, b, n, N);
    KERNEL_CHECK(be, "add_bias_kernel");
}

/* Shared by every column sum (cuda_common.cuh): adds each column's chunk
 * partials in chunk order. */
__global__ void colsum_finish_kernel(const float *partial, int nchunks, int N, float *out) {
    GRID_STRIDE_LOOP(j, N) {
        float s = 0.0f;
        for (int c = 0; c < nchunks; ++c) s += partial[(size_t)c * N + j];
        out[j] += s;
    }
}

struct dy_element {
    const float *dy;
    int N;
    __device__ float operator()(int t, int j) const { return dy[(size_t)t * N + j]; }
};

void cuda_bias_grad(moe_backend *be, const float *dy, float *db, int T, int N) {
    colsum_accumulate(be, dy_element{dy, N}, T, N, db, "bias_grad");
}

/* Batched (per-expert) bias: entry e is y + e*stride_y ([T,N]) and
 * b + e*stride_b ([N]); one launch for all entries. */
__global__ void add_bias_batched_kernel(float *y, const float *b, size_t n, size_t per, int N,
                                        long long stride_y, long long stride_b) {
    GRID_STRIDE_LOOP(i, n) {
        size_t e = i / per, r = i % per;
        y[(long long)e * stride_y + (long long)r] += b[(long long)e * stride_b + (long long)(r % (size_t)N)];
    }
}

void cuda_add_bias_batched(moe_backend *be, float *y, const float *b, int batch, int T, int N,
                           long long stride_y, long long stride_b) {
    if (batch <= 0 || T <= 0 || N <= 0) return;
    size_t per = (size_t)T * N, n = per * (size_t)batch;
    add_bias_batched_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cuda_stream(be)>>>(y, b, n, per, N,
                                                                                  stride_y, stride_b);
    KERNEL_CHECK(be, "add_bias_batched_kernel");
}

/* Column j of the batched column sum is entry j / N, column j % N. */
struct dy_batched_element {
    const float *dy;
    int N;
    long long stride;
    __device__ float operator()(int t, int j) const {
        int e = j / N, c = j - e * N;
        return dy[(long long)e * stride + (long long)t * N + c];
    }
};

__global__ void colsum_finish_batched_kernel(const float *partial, int nchunks, int N, int cols,
                                             float *out, long long stride_out) {
    GRID_STRIDE_LOOP(j, cols) {
        float s = 0.0f;
        for (int c = 0; c < nchunks; ++c) s += partial[(size_t)c * cols + j];
        int e = (int)j / N, col = (int)j - e * N;
        out[(long long)e * stride_out + col] += s;
    }
}

/* The same two passes as colsum_accumulate over batch*N columns (every
 * output's chunk partials added in chunk order: deterministic, no atomics),
 * the finish scattering each column to its entry's db. Per column this is
 * the exact arithmetic of cuda_bias_grad. */
void cuda_bias_grad_batched(moe_backend *be, const float *dy, float *db, int batch, int T, int N,
                            long long stride_dy, long long stride_db) {
    if (batch <= 0 || T <= 0 || N <= 0) return;
    const long long cols_ll = (long long)batch * N;
    const int nchunks = (T + COLSUM_ROWS - 1) / COLSUM_ROWS;
    const long long ntiles = (cols_ll + 31) / 32;
    if (ntiles > 65535) {
        cuda_record_error(be, __FILE__, __LINE__, "bias_grad_batched",
                          "too many columns for colsum (batch*N > 2097120)");
        return;
    }
    const int cols = (int)cols_ll;
    float *partial = (float *)cuda_scratch(be, (size_t)nchunks * cols * sizeof(float));
    if (!partial) return;
    colsum_partial_kernel<dy_batched_element>
        <<<dim3(nchunks, (unsigned)ntiles), dim3(32, COLSUM_LANES), 0, cuda_stream(be)>>>(
            dy_batched_element{dy, N, stride_dy}, T, cols, partial);
    KERNEL_CHECK(be, "bias_grad_batched");
    colsum_finish_batched_kernel<<<cuda_blocks((size_t)cols), CUDA_THREADS, 0, cuda_stream(be)>>>(
        partial, nchunks, N, cols, db, stride_db);
    KERNEL_CHECK(be, "bias_grad_batched");
}

/* ------------------------------------------------------------------ */
/* Vector ops                                                          */
/* ------------------------------------------------------------------ */

__global__ void axpy_kernel(float a, const float *x, float *y, size_t n) {
    GRID_STRIDE_LOOP(i, n) y[i] += a * x[i];
}

__global__ void scale_kernel(float *x, float a, size_t n) {
    GRID_STRIDE_LOOP(i, n) x[i] *= a;
}

__global__ void mul_kernel(const float *a, const float *b, float *out, size_t n) {
    GRID_STRIDE_LOOP(i, n) out[i] = a[i] * b[i];
}

void cuda_axpy(moe_backend *be, float a, const float *x, float *y, size_t n) {
    if (!n) return;
    axpy_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cuda_stream(be)>>>(a, x, y, n);
    KERNEL_CHECK(be, "axpy_kernel");
}

void cuda_scale(moe_backend *be, float *x, float a, size_t n) {
    if (!n) return;
    scale_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cuda_stream(be)>>>(x, a, n);
    KERNEL_CHECK(be, "scale_kernel");
}

void cuda_mul(moe_backend *be, const float *a, const float *b, float *out, size_t n) {
    if (!n) return;
    mul_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cuda_stream(be)>>>(a, b, out, n);
    KERNEL_CHECK(be, "mul_kernel");
}

/* Sum of squares in double, in two passes with a fixed grid: SUMSQ_BLOCKS
 * block partials (each a grid-stride sum per thread, then a fixed tree),
 * then one block adds the partials. The grid does not depend on the GPU, so
 * the order, and the result, are the same on every run. */
constexpr int SUMSQ_BLOCKS = 256;

__global__ void sumsq_partial_kernel(const float *x, size_t n, double *partial) {
    double s = 0.0;
    GRID_STRIDE_LOOP(i, n) {
        double v = (double)x[i];
        s += v * v;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void sumsq_finish_kernel(const double *partial, double *out) {
    double s = block_sum(threadIdx.x < SUMSQ_BLOCKS ? partial[threadIdx.x] : 0.0);
    if (threadIdx.x == 0) *out = s;
}

double cuda_sumsq(moe_backend *be, const float *x, size_t n) {
    if (!n) return 0.0;
    static_assert(SUMSQ_BLOCKS == CUDA_THREADS, "the finishing block has one thread per partial");
    ScratchLayout lay;
    const size_t part_off = lay.add(SUMSQ_BLOCKS * sizeof(double));
    const size_t out_off = lay.add(sizeof(double));
    char *base = cuda_scratch(be, lay.total);
    if (!base) return NAN;
    double *partial = (double *)(base + part_off), *d_out = (double *)(base + out_off);
    cudaStream_t s = cuda_stream(be);
    sumsq_partial_kernel<<<SUMSQ_BLOCKS, CUDA_THREADS, 0, s>>>(x, n, partial);
    KERNEL_CHECK_RET(be, "sumsq_partial_kernel", NAN);
    sumsq_finish_kernel<<<1, CUDA_THREADS, 0, s>>>(partial, d_out);
    KERNEL_CHECK_RET(be, "sumsq_finish_kernel", NAN);
    double result = NAN;
    CUDA_CHECK_RET(be, cudaMemcpyAsync(&result, d_out, sizeof result, cudaMemcpyDeviceToHost, s), NAN);
    CUDA_CHECK_RET(be, cudaStreamSynchronize(s), NAN);
    return result;
}

/* Global-norm clipping without a round trip: the sumsq passes above, then
 * norm = sqrt(sum) on the device (IEEE double sqrt, as the host's), then
 * every thread reads the norm and scales only when norm > clip, by the same
 * (float)(clip / norm) the host computed. */
__global__ void norm_finish_kernel(const double *partial, double *norm_out) {
    double s = block_sum(threadIdx.x < SUMSQ_BLOCKS ? partial[threadIdx.x] : 0.0);
    if (threadIdx.x == 0) *norm_out = sqrt(s);
}

__global__ void clip_scale_kernel(float *g, size_t n, double clip, const double *norm) {
    const double nrm = *norm;
    if (!(nrm > clip)) return; /* also for a NaN norm: the caller reports it */
    const float a = (float)(clip / nrm);
    GRID_STRIDE_LOOP(i, n) g[i] *= a;
}

void cuda_clip_grad_norm(moe_backend *be, float *g, size_t n, double clip, double *norm_out) {
    cudaStream_t s = cuda_stream(be);
    if (!n) {
        CUDA_CHECK(be, cudaMemsetAsync(norm_out, 0, sizeof(double), s)); /* +0.0 */
        return;
    }
    double *partial = (double *)cuda_scratch(be, SUMSQ_BLOCKS * sizeof(double));
    if (!partial) return;
    sumsq_partial_kernel<<<SUMSQ_BLOCKS, CUDA_THREADS, 0, s>>>(g, n, partial);
    KERNEL_CHECK(be, "sumsq_partial_kernel (clip)");
    norm_finish_kernel<<<1, CUDA_THREADS, 0, s>>>(partial, norm_out);
    KERNEL_CHECK(be, "norm_finish_kernel");
    if (clip > 0.0) {
        clip_scale_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, s>>>(g, n, clip, norm_out);
        KERNEL_CHECK(be, "clip_scale_kernel");
    }
}
