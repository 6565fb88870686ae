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

/* Operand conversion for the bf16 GEMMs: dst[b][r][c] = bf16(src[b*stride +
 * r*ld + c]), each matrix of the batch packed densely (ld = cols) so the
 * GEMM reads no padding. These passes move as many bytes as the GEMMs
 * themselves at the model's shapes, so they run at copy speed: 16-byte
 * loads where the layout allows, and no 64-bit division per element. */

/* A dense source (ld == cols, matrices back to back), n4 groups of 4. */
__global__ void to_bf16_dense_kernel(const float4 *src, uint2 *dst, size_t n4) {
    GRID_STRIDE_LOOP(i, n4) {
        const float4 v = src[i];
        dst[i] = pack_bf16x4(v.x, v.y, v.z, v.w);
    }
}

/* Any layout: one row per block step (the division is per row). With vec4,
 * cols, ld and the batch stride are multiples of 4 and src is 16-byte
 * aligned. */
template <bool vec4>
__global__ void to_bf16_rows_kernel(const float *src, long long ld, long long stride, int rows, int cols,
                                    long long nrows, __nv_bfloat16 *dst) {
    for (long long row = blockIdx.x; row < nrows; row += gridDim.x) {
        const long long b = row / rows, r = row - b * rows;
        const float *s = src + b * stride + r * ld;
        __nv_bfloat16 *d = dst + row * cols;
        if (vec4) {
            for (int c = threadIdx.x * 4; c < cols; c += blockDim.x * 4) {
                const float4 v = *reinterpret_cast<const float4 *>(s + c);
                *reinterpret_cast<__nv_bfloat162 *>(d + c) = __floats2bfloat162_rn(v.x, v.y);
                *reinterpret_cast<__nv_bfloat162 *>(d + c + 2) = __floats2bfloat162_rn(v.z, v.w);
            }
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] = __float2bfloat16_rn(s[c]);
        }
    }
}

static void to_bf16(moe_backend *be, const float *src, long long ld, long long stride, int rows, int cols,
                    int batch, __nv_bfloat16 *dst, const char *what) {
    const size_t n = (size_t)rows * cols * batch;
    const bool aligned = ((uintptr_t)src % 16) == 0;
    const bool dense = ld == cols && (batch == 1 || stride == (long long)rows * cols);
    cudaStream_t s = cuda_stream(be);
    if (dense && aligned && n % 4 == 0) {
        to_bf16_dense_kernel<<<cuda_blocks(n / 4), CUDA_THREADS, 0, s>>>((const float4 *)src, (uint2 *)dst,
                                                                         n / 4);
    } else {
        const long long nrows = (long long)rows * batch;
        const unsigned blocks = (unsigned)(nrows < 65536 ? nrows : 65536);
        const int threads = cols >= 512 ? 256 : (cols >= 128 ? 128 : 64);
        if (aligned && cols % 4 == 0 && ld % 4 == 0 && stride % 4 == 0)
            to_bf16_rows_kernel<true><<<blocks, threads, 0, s>>>(src, ld, stride, rows, cols, nrows, dst);
        else
            to_bf16_rows_kernel<false><<<blocks, threads, 0, s>>>(src, ld, stride, rows, cols, nrows, dst);
    }
    KERNEL_CHECK(be, what);
}

static bool lt_gemm(moe_backend *be, int bf16, int ta, int tb, int M, int N, int K, float alpha, const void *A,
                    int lda, long long sA, const void *B, int ldb, long long sB, const float *bias, long long sbias,
                    float beta, void *C, int ldc, long long sC, int batch, int out_bf16 = 0,
                    const float *residual = NULL);
static void gemm_bf16_ops(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha, const __nv_bfloat16 *A,
                          int lda, long long sA, const __nv_bfloat16 *B, int ldb, long long sB, const float *bias,
                          long long sbias, float beta, float *C, int ldc, long long sC, int batch,
                          const float *residual = NULL);

/* fp32: pure fp32 (no TF32) through a cuBLASLt plan, whose heuristics split
 * long sums (the gate's weight gradient, K = T) where cuBLAS's sgemm did
 * not; cuBLAS's sgemm (CUBLAS_DEFAULT_MATH, set at creation) where
 * cuBLASLt has no algorithm, and for K = 0. */
static void gemm_fp32(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha,
                      const float *A, int lda, long long strideA, const float *B, int ldb,
                      long long strideB, float beta, float *C, int ldc, long long strideC,
                      int batch) {
    if (K > 0 && lt_gemm(be, 0, ta, tb, M, N, K, alpha, A, lda, strideA, B, ldb, strideB, NULL, 0, beta, C, ldc,
                         strideC, batch))
        return;
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

/* dst[b][c][r] = bf16(src[b*stride + r*ld + c]): the transpose, packed
 * ([cols][rows] per matrix), through a shared-memory tile so that both the
 * reads and the writes are coalesced. Block (32, 8), grid (cols/32,
 * rows/32, batch). */
__global__ void to_bf16_transposed_kernel(const float *src, long long ld, long long stride, int rows, int cols,
                                          __nv_bfloat16 *dst) {
    __shared__ float tile[32][33]; /* +1: no bank conflicts on the transposed read */
    const int r0 = blockIdx.y * 32, c0 = blockIdx.x * 32;
    const float *s = src + (long long)blockIdx.z * stride;
    __nv_bfloat16 *d = dst + (long long)blockIdx.z * rows * cols;
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        const int r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = s[(long long)r * ld + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        const int c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < cols) d[(long long)c * rows + r] = __float2bfloat16_rn(tile[threadIdx.x][i]);
    }
}

void cuda_round_bf16(moe_backend *be, const float *src, long long ld, long long stride, int rows, int cols,
                     int batch, __nv_bfloat16 *dst, bool transpose) {
    if (rows <= 0 || cols <= 0 || batch <= 0) return;
    if (!transpose) {
        to_bf16(be, src, ld, stride, rows, cols, batch, dst, "to_bf16");
        return;
    }
    if (batch > 65535) { /* the transposing kernel's grid z */
        cuda_record_error(be, __FILE__, __LINE__, "to_bf16 (transposed)", "more than 65535 matrices");
        return;
    }
    const dim3 grid((unsigned)((cols + 31) / 32), (unsigned)((rows + 31) / 32), (unsigned)batch);
    to_bf16_transposed_kernel<<<grid, dim3(32, 8), 0, cuda_stream(be)>>>(src, ld, stride, rows, cols, dst);
    KERNEL_CHECK(be, "to_bf16_transposed_kernel");
}

/* A and B of a bf16 GEMM, rounded into the scratch buffer: packed
 * (ld = the stored width), an operand shared by the batch (stride 0)
 * converted once and passed with stride 0 again. A transposed B (tb = 1)
 * is stored transposed, so cuBLAS gets op(B) as it is (tb = 0): the
 * rounding pass costs the same either way, and cuBLAS's kernels for that
 * layout are up to 3x slower at the experts' shapes (docs/perf.md). In
 * the model every transposed B is a weight matrix. */
struct bf16_operands {
    const __nv_bfloat16 *A, *B;
    int ta, tb, lda, ldb;
    long long sA, sB;
};

static bool round_operands(moe_backend *be, int ta, int tb, int M, int N, int K, const float *A, int lda,
                           long long strideA, const float *B, int ldb, long long strideB, int batch,
                           bf16_operands *out) {
    const int a_rows = ta ? K : M, a_cols = ta ? M : K;
    const int b_rows = tb ? N : K, b_cols = tb ? K : N;
    const int a_batch = strideA == 0 ? 1 : batch, b_batch = strideB == 0 ? 1 : batch;
    const long long a_pack = (long long)a_rows * a_cols, b_pack = (long long)b_rows * b_cols;
    ScratchLayout lay;
    const size_t a_off = lay.add((size_t)a_pack * a_batch * sizeof(__nv_bfloat16));
    const size_t b_off = lay.add((size_t)b_pack * b_batch * sizeof(__nv_bfloat16));
    char *base = cuda_scratch(be, lay.total);
    if (!base) return false;
    /* each as it is stored: a weight's or a saved activation's copy when
     * the operand has one (cuda_bf16_operand), else rounded here */
    out->A = cuda_bf16_operand(be, A, lda, strideA, a_rows, a_cols, a_batch, (__nv_bfloat16 *)(base + a_off), false);
    out->B = cuda_bf16_operand(be, B, ldb, strideB, b_rows, b_cols, b_batch, (__nv_bfloat16 *)(base + b_off), tb != 0);
    out->ta = ta, out->tb = 0;
    out->lda = a_cols, out->ldb = N; /* op(B) is [K, N] */
    out->sA = strideA == 0 ? 0 : a_pack, out->sB = strideB == 0 ? 0 : b_pack;
    return true;
}

/* bf16: A and B rounded to bf16, products accumulated in fp32 into the
 * fp32 C (so beta != 0 keeps full precision). */
static void gemm_bf16(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha,
                      const float *A, int lda, long long strideA, const float *B, int ldb,
                      long long strideB, float beta, float *C, int ldc, long long strideC,
                      int batch) {
    bf16_operands op;
    if (!round_operands(be, ta, tb, M, N, K, A, lda, strideA, B, ldb, strideB, batch, &op)) return;
    gemm_bf16_ops(be, op.ta, op.tb, M, N, K, alpha, op.A, op.lda, op.sA, op.B, op.ldb, op.sB, NULL, 0, beta, C, ldc,
                  strideC, batch);
}

/* Whether a GEMM of bf16 mode takes bf16 operands. A product with a side
 * shorter than 16 (the gate's E columns, its backward's E-long sums) gains
 * nothing from tensor cores, while rounding its large operand costs a pass
 * over it: it runs in fp32, which also keeps the router's gate logits fp32
 * as design.md asks. With K = 0 there is nothing to round. */
bool cuda_gemm_takes_bf16(moe_backend *be, int M, int N, int K) {
    return cuda_state(be)->precision == MOE_PRECISION_BF16 && M >= 16 && N >= 16 && K >= 16;
}

void cuda_gemm_strided_batched(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha,
                               const float *A, int lda, long long strideA, const float *B, int ldb,
                               long long strideB, float beta, float *C, int ldc, long long strideC,
                               int batch) {
    if (M <= 0 || N <= 0 || batch <= 0) return;
    if (cuda_gemm_takes_bf16(be, M, N, K))
        gemm_bf16(be, ta, tb, M, N, K, alpha, A, lda, strideA, B, ldb, strideB, beta, C, ldc,
                  strideC, batch);
    else if (batch == 1 && cuda_skinny_gemm(be, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc))
        return; /* the gate's shapes (cuda_skinny_gemm.cu) */
    else
        gemm_fp32(be, ta, tb, M, N, K, alpha, A, lda, strideA, B, ldb, strideB, beta, C, ldc,
                  strideC, batch);
}

void cuda_gemm(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha, const float *A,
               int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    cuda_gemm_strided_batched(be, ta, tb, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
}

/* ------------------------------------------------------------------ */
/* GEMM with the bias in the epilogue (cuBLASLt)                       */
/* ------------------------------------------------------------------ */

/* Everything that decides the matmul's set-up; a plan is made (descriptors
 * and the heuristic's first algorithm) the first time a key is seen and
 * reused afterwards: the model calls a few shapes, every step. */
struct cuda_lt_key {
    int bf16, ta, tb, M, N, K, lda, ldb, ldc, batch, has_bias, align; /* bf16: the operands' type */
    long long sA, sB, sC, sbias;
    /* gelu_aux: D = gelu(product + bias) in bf16, and the pre-activation
     * product + bias in bf16 into an aux matrix of D's layout (ldc, sC) */
    int gelu_aux;
    /* out_bf16: the plain product (no bias) written to C in bf16, once
     * rounded from the fp32 sum */
    int out_bf16;
    /* has_residual: the GEMM's C input is another matrix than its output D
     * (same layout, beta 1), the residual of gemm_bias; its address counts
     * in align */
    int has_residual;
};

struct cuda_lt_plan {
    cuda_lt_key key;
    int usable; /* 0: cuBLASLt offered no algorithm; the op falls back */
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
};

void cuda_lt_release(cuda_impl *st) {
    for (int i = 0; i < st->lt_nplans; ++i) {
        cuda_lt_plan *p = &st->lt_plans[i];
        if (p->desc) cublasLtMatmulDescDestroy(p->desc);
        if (p->a) cublasLtMatrixLayoutDestroy(p->a);
        if (p->b) cublasLtMatrixLayoutDestroy(p->b);
        if (p->c) cublasLtMatrixLayoutDestroy(p->c);
    }
    free(st->lt_plans);
    st->lt_plans = NULL;
    st->lt_nplans = st->lt_cap = 0;
    if (st->lt_workspace) cudaFree(st->lt_workspace);
    st->lt_workspace = NULL;
    if (st->lt) cublasLtDestroy(st->lt);
    st->lt = NULL;
}

/* The largest power of two (<= 16) that divides the address: the plan's
 * heuristic must know how aligned the operands are. */
static int byte_alignment(const void *p) {
    const uintptr_t v = (uintptr_t)p;
    int a = 16;
    while (a > 1 && v % (uintptr_t)a) a >>= 1;
    return a;
}

static cublasLtMatrixLayout_t lt_layout(cudaDataType t, int rows, int cols, long long ld, int batch,
                                        long long stride, cublasStatus_t *status) {
    cublasLtMatrixLayout_t l = NULL;
    cublasStatus_t st = cublasLtMatrixLayoutCreate(&l, t, (uint64_t)rows, (uint64_t)cols, ld);
    if (st == CUBLAS_STATUS_SUCCESS && batch > 1) {
        st = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch);
        if (st == CUBLAS_STATUS_SUCCESS)
            st = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                  sizeof stride);
    }
    if (st != CUBLAS_STATUS_SUCCESS && *status == CUBLAS_STATUS_SUCCESS) *status = st;
    return l;
}

/* Builds the plan for k in column-major terms (the operands swapped, as in
 * the GEMMs above): D[N,M] = op(B)^T op(A)^T + bias[N] broadcast along M.
 * Returns a cuBLAS status; a plan with usable = 0 is still stored, so a
 * shape cuBLASLt cannot take is asked about once only. */
static cublasStatus_t lt_plan_make(cuda_impl *st, const cuda_lt_key &k, cuda_lt_plan *p) {
    memset(p, 0, sizeof *p);
    p->key = k;
    const cudaDataType ab = k.bf16 ? CUDA_R_16BF : CUDA_R_32F;
    cublasStatus_t s = cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    const cublasOperation_t opa = cublas_op(k.tb), opb = cublas_op(k.ta);
    s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb);
    if (s == CUBLAS_STATUS_SUCCESS && (k.has_bias || k.gelu_aux)) {
        const cublasLtEpilogue_t epi = k.gelu_aux ? (k.has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS
                                                                : CUBLASLT_EPILOGUE_GELU_AUX)
                                                  : CUBLASLT_EPILOGUE_BIAS;
        s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi);
    }
    if (s == CUBLAS_STATUS_SUCCESS && k.has_bias) {
        /* the fp32 master bias; under the GELU epilogue's bf16 D, a bf16
         * copy (cuBLASLt refuses an fp32 bias there) */
        const cudaDataType bt = k.gelu_aux ? CUDA_R_16BF : CUDA_R_32F;
        s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt);
        if (s == CUBLAS_STATUS_SUCCESS && k.batch > 1)
            s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &k.sbias,
                                               sizeof k.sbias);
    }
    if (s == CUBLAS_STATUS_SUCCESS && k.gelu_aux) {
        const int64_t ld = k.ldc, stride = k.sC;
        s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld, sizeof ld);
        if (s == CUBLAS_STATUS_SUCCESS && k.batch > 1)
            s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, &stride,
                                               sizeof stride);
    }
    if (s != CUBLAS_STATUS_SUCCESS) {
        /* an attribute this cuBLASLt does not take: no plan, not an error */
        if (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_INVALID_VALUE) {
            p->usable = 0;
            return CUBLAS_STATUS_SUCCESS;
        }
        return s;
    }
    /* stored shapes, column-major: cuBLASLt's A is our B, its B our A */
    p->a = lt_layout(ab, k.tb ? k.K : k.N, k.tb ? k.N : k.K, k.ldb, k.batch, k.sB, &s);
    p->b = lt_layout(ab, k.ta ? k.M : k.K, k.ta ? k.K : k.M, k.lda, k.batch, k.sA, &s);
    p->c = lt_layout(k.gelu_aux || k.out_bf16 ? CUDA_R_16BF : CUDA_R_32F, k.N, k.M, k.ldc, k.batch, k.sC, &s);
    if (s != CUBLAS_STATUS_SUCCESS) return s;

    cublasLtMatmulPreference_t pref = NULL;
    s = cublasLtMatmulPreferenceCreate(&pref);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    const uint64_t ws = st->lt_workspace_bytes;
    const uint32_t align = (uint32_t)k.align;
    /* No split-K scheme that adds partial results in place: results must
     * repeat bit for bit. Nor, for a bf16 C, partials kept in bf16: the
     * product is rounded once, from its fp32 sum. */
    const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE |
                             (k.out_bf16 ? 0u : (uint32_t)CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE);
    s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    const cublasLtMatmulPreferenceAttributes_t aligns[] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4 && s == CUBLAS_STATUS_SUCCESS; ++i)
        s = cublasLtMatmulPreferenceSetAttribute(pref, aligns[i], &align, sizeof align);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes,
                                                 sizeof schemes);
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulAlgoGetHeuristic(st->lt, p->desc, p->a, p->b, p->c, p->c, pref, 1, &res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_INVALID_VALUE ||
        (s == CUBLAS_STATUS_SUCCESS && found == 0)) {
        p->usable = 0; /* not an error: the op takes another path */
        return CUBLAS_STATUS_SUCCESS;
    }
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    p->algo = res.algo;
    p->usable = 1;
    return CUBLAS_STATUS_SUCCESS;
}

static cuda_lt_plan *lt_plan_find(moe_backend *be, const cuda_lt_key &k) {
    cuda_impl *st = cuda_state(be);
    for (int i = 0; i < st->lt_nplans; ++i)
        if (memcmp(&st->lt_plans[i].key, &k, sizeof k) == 0) return &st->lt_plans[i];
    if (st->lt_nplans == st->lt_cap) {
        int cap = st->lt_cap ? 2 * st->lt_cap : 16;
        cuda_lt_plan *np = (cuda_lt_plan *)realloc(st->lt_plans, (size_t)cap * sizeof *np);
        if (!np) {
            cuda_record_error(be, __FILE__, __LINE__, "gemm_bias", "out of host memory for cuBLASLt plans");
            return NULL;
        }
        st->lt_plans = np;
        st->lt_cap = cap;
    }
    cuda_lt_plan *p = &st->lt_plans[st->lt_nplans];
    cublasStatus_t s = lt_plan_make(st, k, p);
    ++st->lt_nplans; /* kept even when broken, so release() frees what it holds */
    if (s != CUBLAS_STATUS_SUCCESS) {
        p->usable = 0;
        cuda_record_error(be, __FILE__, __LINE__, "gemm_bias: cuBLASLt set-up", cublasGetStatusString(s));
        return NULL;
    }
    return p;
}

/* A bias on every row of `batch` products of M rows at any ldc: row r of
 * the batch is product r / M, row r % M. add: C += bias (the bias adds of
 * the ops without an epilogue); set: C = bias, or 0 without one (the
 * product with K = 0). */
template <bool set>
__global__ void bias_rows_kernel(float *C, int ldc, long long strideC, const float *bias, long long stride_bias,
                                 int M, int N, long long rows) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long e = r / M, m = r - e * M;
        float *row = C + e * strideC + m * ldc;
        const float *b = bias ? bias + e * stride_bias : NULL;
        for (int j = threadIdx.x; j < N; j += blockDim.x) row[j] = set ? (b ? b[j] : 0.0f) : row[j] + b[j];
    }
}

template <bool set>
static void bias_rows(moe_backend *be, float *C, int ldc, long long sC, const float *bias, long long sbias, int M,
                      int N, int batch) {
    const long long rows = (long long)batch * M;
    if (rows <= 0 || N <= 0) return;
    bias_rows_kernel<set><<<(unsigned)(rows < 65536 ? rows : 65536), 128, 0, cuda_stream(be)>>>(C, ldc, sC, bias,
                                                                                               sbias, M, N, rows);
    KERNEL_CHECK(be, set ? "bias_rows_kernel (set)" : "bias_rows_kernel (add)");
}

/* C += R element by element, R laid out as C: gemm_bias's residual where
 * no cuBLASLt plan takes it as the GEMM's C input. */
__global__ void residual_rows_kernel(float *C, int ldc, long long strideC, const float *R, int M, int N,
                                     long long rows) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long e = r / M, m = r - e * M;
        const long long off = e * strideC + m * ldc;
        for (int j = threadIdx.x; j < N; j += blockDim.x) C[off + j] += R[off + j];
    }
}

static void residual_rows(moe_backend *be, float *C, int ldc, long long sC, const float *R, int M, int N,
                          int batch) {
    const long long rows = (long long)batch * M;
    if (!R || rows <= 0 || N <= 0) return;
    residual_rows_kernel<<<(unsigned)(rows < 65536 ? rows : 65536), 128, 0, cuda_stream(be)>>>(C, ldc, sC, R, M,
                                                                                               N, rows);
    KERNEL_CHECK(be, "residual_rows_kernel");
}

/* C = op(A) op(B) (+ bias) + beta R through a cuBLASLt plan, R = residual
 * (fp32, C's layout, not overlapping C) when not NULL, else C itself; A and
 * B are bf16 or fp32 (bf16 != 0), C fp32, or bf16 where out_bf16 != 0 (then
 * without a bias or residual). Returns false, having done nothing, when
 * cuBLASLt has no algorithm for the shape (the caller takes another way);
 * true when it ran or an error was recorded. */
static bool lt_gemm(moe_backend *be, int bf16, int ta, int tb, int M, int N, int K, float alpha, const void *A,
                    int lda, long long sA, const void *B, int ldb, long long sB, const float *bias, long long sbias,
                    float beta, void *C, int ldc, long long sC, int batch, int out_bf16, const float *residual) {
    cuda_impl *st = cuda_state(be);
    cuda_lt_key k;
    memset(&k, 0, sizeof k); /* the key is compared bytewise, padding included */
    k.bf16 = bf16, k.ta = ta, k.tb = tb, k.M = M, k.N = N, k.K = K;
    k.lda = lda, k.ldb = ldb, k.ldc = ldc, k.batch = batch, k.has_bias = bias != NULL;
    k.sA = sA, k.sB = sB, k.sC = sC, k.sbias = bias ? sbias : 0;
    k.out_bf16 = out_bf16;
    k.has_residual = residual != NULL;
    k.align = min(byte_alignment(C), min(byte_alignment(A), byte_alignment(B)));
    if (residual) k.align = min(k.align, byte_alignment(residual));
    cuda_lt_plan *p = lt_plan_find(be, k);
    if (!p) return true; /* recorded */
    if (!p->usable) return false;
    if (bias) {
        cublasStatus_t s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                          sizeof bias);
        if (s != CUBLAS_STATUS_SUCCESS) {
            cuda_record_error(be, __FILE__, __LINE__, "cublasLtMatmulDescSetAttribute (bias)",
                              cublasGetStatusString(s));
            return true;
        }
    }
    const void *Cin = residual ? (const void *)residual : (const void *)C;
    cublasStatus_t s = cublasLtMatmul(st->lt, p->desc, &alpha, B, p->a, A, p->b, &beta, Cin, p->c, C, p->c,
                                      &p->algo, st->lt_workspace, st->lt_workspace_bytes, cuda_stream(be));
    if (s != CUBLAS_STATUS_SUCCESS)
        cuda_record_error(be, __FILE__, __LINE__, "cublasLtMatmul", cublasGetStatusString(s));
    return true;
}


/* The GEMM of bf16 operands: a cuBLASLt plan, or cuBLAS and then the bias
 * (and the residual) where cuBLASLt has no algorithm. With a residual, beta
 * scales it instead of C (gemm_bias passes 1); without, C is the input. */
static void gemm_bf16_ops(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha, const __nv_bfloat16 *A,
                          int lda, long long sA, const __nv_bfloat16 *B, int ldb, long long sB, const float *bias,
                          long long sbias, float beta, float *C, int ldc, long long sC, int batch,
                          const float *residual) {
    if (M <= 0 || N <= 0 || K <= 0 || batch <= 0) return;
    if (lt_gemm(be, 1, ta, tb, M, N, K, alpha, A, lda, sA, B, ldb, sB, bias, sbias, beta, C, ldc, sC, batch, 0,
                residual))
        return;
    const float cublas_beta = residual ? 0.0f : beta;
    CUBLAS_CHECK(be, cublasGemmStridedBatchedEx(cuda_state(be)->cublas, cublas_op(tb), cublas_op(ta), N, M, K,
                                                &alpha, B, CUDA_R_16BF, ldb, sB, A, CUDA_R_16BF, lda, sA,
                                                &cublas_beta, C, CUDA_R_32F, ldc, sC, batch, CUBLAS_COMPUTE_32F,
                                                CUBLAS_GEMM_DEFAULT));
    if (bias) bias_rows<false>(be, C, ldc, sC, bias, sbias, M, N, batch);
    residual_rows(be, C, ldc, sC, residual, M, N, batch);
}

void cuda_gemm_bf16_operands(moe_backend *be, int ta, int tb, int M, int N, int K, const __nv_bfloat16 *A,
                             int lda, long long sA, const __nv_bfloat16 *B, int ldb, long long sB,
                             const float *bias, long long sbias, float beta, float *C, int ldc, long long sC,
                             int batch) {
    gemm_bf16_ops(be, ta, tb, M, N, K, 1.0f, A, lda, sA, B, ldb, sB, bias, sbias, beta, C, ldc, sC, batch);
}

void cuda_gemm_bf16_out(moe_backend *be, int ta, int tb, int M, int N, int K, const __nv_bfloat16 *A, int lda,
                        long long sA, const __nv_bfloat16 *B, int ldb, long long sB, __nv_bfloat16 *C, int ldc,
                        long long sC, int batch) {
    if (M <= 0 || N <= 0 || K <= 0 || batch <= 0) return;
    const float one = 1.0f, zero = 0.0f;
    if (lt_gemm(be, 1, ta, tb, M, N, K, one, A, lda, sA, B, ldb, sB, NULL, 0, zero, C, ldc, sC, batch, 1)) return;
    CUBLAS_CHECK(be, cublasGemmStridedBatchedEx(cuda_state(be)->cublas, cublas_op(tb), cublas_op(ta), N, M, K, &one,
                                                B, CUDA_R_16BF, ldb, sB, A, CUDA_R_16BF, lda, sA, &zero, C,
                                                CUDA_R_16BF, ldc, sC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

static cuda_lt_key gelu_aux_key(int M, int N, int K, const void *A, const void *B, const void *bias, const void *D,
                                const void *aux, int batch) {
    cuda_lt_key k;
    memset(&k, 0, sizeof k);
    k.bf16 = 1, k.M = M, k.N = N, k.K = K, k.lda = K, k.ldb = N, k.ldc = N, k.batch = batch;
    k.has_bias = bias != NULL, k.gelu_aux = 1;
    k.sA = (long long)M * K, k.sB = (long long)K * N, k.sC = (long long)M * N, k.sbias = bias ? N : 0;
    k.align = min(min(byte_alignment(A), byte_alignment(B)), min(byte_alignment(D), byte_alignment(aux)));
    return k;
}

bool cuda_gelu_aux_available(moe_backend *be, int M, int N, int K, const void *A, const void *B, const void *bias,
                             const void *D, const void *aux, int batch) {
    if (M <= 0 || N <= 0 || K <= 0 || batch <= 0) return false;
    cuda_lt_plan *p = lt_plan_find(be, gelu_aux_key(M, N, K, A, B, bias, D, aux, batch));
    return p && p->usable;
}

bool cuda_gemm_bf16_gelu_aux(moe_backend *be, int M, int N, int K, const __nv_bfloat16 *A, const __nv_bfloat16 *B,
                             const __nv_bfloat16 *bias, __nv_bfloat16 *D, __nv_bfloat16 *aux, int batch) {
    cuda_lt_plan *p = lt_plan_find(be, gelu_aux_key(M, N, K, A, B, bias, D, aux, batch));
    if (!p || !p->usable) return false;
    cuda_impl *st = cuda_state(be);
    cublasStatus_t s = CUBLAS_STATUS_SUCCESS;
    if (bias) s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof aux);
    const float one = 1.0f, zero = 0.0f;
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmul(st->lt, p->desc, &one, B, p->a, A, p->b, &zero, D, p->c, D, p->c, &p->algo,
                           st->lt_workspace, st->lt_workspace_bytes, cuda_stream(be));
    if (s != CUBLAS_STATUS_SUCCESS) cuda_record_error(be, __FILE__, __LINE__, "cublasLtMatmul (gelu aux)",
                                                      cublasGetStatusString(s));
    return true;
}

/* The residual enters cuBLASLt as the GEMM's C input with beta 1 (D, the
 * output, another matrix of the same layout): the model's residual add
 * costs no pass of its own. */
void cuda_gemm_bias(moe_backend *be, int ta, int tb, int M, int N, int K, const float *A, int lda,
                    long long strideA, const float *B, int ldb, long long strideB, const float *bias,
                    long long stride_bias, const float *residual, float *C, int ldc, long long strideC,
                    int batch) {
    if (M <= 0 || N <= 0 || batch <= 0) return;
    if (K <= 0) { /* an empty sum: C is the bias (or 0); cuBLAS would refuse ld = 0 */
        bias_rows<true>(be, C, ldc, strideC, bias, stride_bias, M, N, batch);
        residual_rows(be, C, ldc, strideC, residual, M, N, batch);
        return;
    }
    const float beta = residual ? 1.0f : 0.0f;
    if (cuda_gemm_takes_bf16(be, M, N, K)) {
        bf16_operands op;
        if (!round_operands(be, ta, tb, M, N, K, A, lda, strideA, B, ldb, strideB, batch, &op)) return;
        gemm_bf16_ops(be, op.ta, op.tb, M, N, K, 1.0f, op.A, op.lda, op.sA, op.B, op.ldb, op.sB, bias, stride_bias,
                      beta, C, ldc, strideC, batch, residual);
        return;
    }
    if (lt_gemm(be, 0, ta, tb, M, N, K, 1.0f, A, lda, strideA, B, ldb, strideB, bias, stride_bias, beta, C, ldc,
                strideC, batch, 0, residual))
        return;
    cuda_gemm_strided_batched(be, ta, tb, M, N, K, 1.0f, A, lda, strideA, B, ldb, strideB, 0.0f, C, ldc,
                              strideC, batch);
    if (bias) bias_rows<false>(be, C, ldc, strideC, bias, stride_bias, M, N, batch);
    residual_rows(be, C, ldc, strideC, residual, M, N, batch);
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
void cuda_add_bias_batched(moe_backend *be, float *y, const float *b, int batch, int T, int N,
                           long long stride_y, long long stride_b) {
    bias_rows<false>(be, y, N, stride_y, b, stride_b, T, N, batch);
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

/* Every column sum's second pass, when its partial kernel could not finish
 * it (colsum_finish_if_needed): column j adds its chunk partials in chunk
 * order into out[(j / N) * stride_out + j % N] (a plain sum: N = cols). */
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
    const colsum_out dst = colsum_dest(be, db, N, stride_db, (unsigned)ntiles);
    colsum_partial_kernel<dy_batched_element>
        <<<dim3(nchunks, (unsigned)ntiles), dim3(32, COLSUM_LANES), 0, cuda_stream(be)>>>(
            dy_batched_element{dy, N, stride_dy}, T, cols, partial, dst);
    KERNEL_CHECK(be, "bias_grad_batched");
    colsum_finish_if_needed(be, dst, db, partial, nchunks, cols, "bias_grad_batched");
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

/* Sum of squares in double, in one launch with a fixed grid: SUMSQ_BLOCKS
 * block partials (each a grid-stride sum per thread, then a fixed tree),
 * added by the last block to finish (last_block_arrived) in block order
 * per thread and then a fixed tree. The grid does not depend on the GPU, so
 * the order, and the result, are the same on every run. Sized for the
 * H100's (and H200's) 132 SMs: 4 blocks on each, all resident at once, so
 * one wave in which every thread has the same share of the work. */
constexpr int SUMSQ_BLOCKS_PER_SM = 4;
constexpr int SUMSQ_BLOCKS = 132 * SUMSQ_BLOCKS_PER_SM;
/* float4 loads a thread has in flight. On the H100, 18M gradients: a plain
 * grid-stride loop on 256 blocks (one load at a time) took 40 us, this
 * 29 us (2.5 TB/s); 8 loads, or 792 or 1056 blocks, were within 0.5 us. */
constexpr int SUMSQ_UNROLL = 4;

__device__ __forceinline__ double sumsq4(float4 v) {
    return (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
}

/* out[0] = the sum, or its square root (IEEE double sqrt, as the host's)
 * when root: clip_grad_norm's norm without another launch. */
__global__ void __launch_bounds__(CUDA_THREADS, SUMSQ_BLOCKS_PER_SM)
sumsq_kernel(const float *x, size_t n, double *partial, int *ticket, double *out, bool root) {
    double s = 0.0;
    /* 16-byte loads for the aligned body (a fixed split for a given x and n,
     * so the order stays fixed), then the few elements left. The unrolled
     * loop takes the elements of SUMSQ_UNROLL strides at once and adds them
     * in stride order: the order of the plain loop that finishes the body. */
    const size_t n4 = ((uintptr_t)x % 16 == 0) ? n / 4 : 0;
    const float4 *x4 = reinterpret_cast<const float4 *>(x);
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + (SUMSQ_UNROLL - 1) * stride < n4; i += SUMSQ_UNROLL * stride) {
        float4 v[SUMSQ_UNROLL];
#pragma unroll
        for (int u = 0; u < SUMSQ_UNROLL; ++u) v[u] = x4[i + u * stride];
#pragma unroll
        for (int u = 0; u < SUMSQ_UNROLL; ++u) s += sumsq4(v[u]);
    }
    for (; i < n4; i += stride) s += sumsq4(x4[i]);
    GRID_STRIDE_LOOP(k, n - 4 * n4) {
        const double v = (double)x[4 * n4 + k];
        s += v * v;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
    if (!last_block_arrived(ticket, gridDim.x)) return;
    double t = 0.0;
    for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) t += __ldcg(&partial[b]);
    t = block_sum(t);
    if (threadIdx.x == 0) *out = root ? sqrt(t) : t;
}

/* sumsq_kernel's launch; partial: SUMSQ_BLOCKS doubles of scratch. */
static bool sumsq_launch(moe_backend *be, const float *x, size_t n, double *partial, double *out, bool root) {
    sumsq_kernel<<<SUMSQ_BLOCKS, CUDA_THREADS, 0, cuda_stream(be)>>>(x, n, partial, cuda_state(be)->d_tickets, out,
                                                                     root);
    KERNEL_CHECK_RET(be, "sumsq_kernel", false);
    return true;
}

double cuda_sumsq(moe_backend *be, const float *x, size_t n) {
    if (!n) return 0.0;
    ScratchLayout lay;
    const size_t part_off = lay.add(SUMSQ_BLOCKS * sizeof(double));
    const size_t out_off = lay.add(sizeof(double));
    char *base = cuda_scratch(be, lay.total);
    if (!base) return NAN;
    double *partial = (double *)(base + part_off), *d_out = (double *)(base + out_off);
    if (!sumsq_launch(be, x, n, partial, d_out, false)) return NAN;
    cudaStream_t s = cuda_stream(be);
    double result = NAN;
    CUDA_CHECK_RET(be, cudaMemcpyAsync(&result, d_out, sizeof result, cudaMemcpyDeviceToHost, s), NAN);
    CUDA_CHECK_RET(be, cudaStreamSynchronize(s), NAN);
    return result;
}

/* Global-norm clipping without a round trip: sumsq_kernel writes norm =
 * sqrt(sum) on the device, then every thread reads the norm and scales
 * only when norm > clip, by the same (float)(clip / norm) the host
 * computed. */
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
    if (!partial || !sumsq_launch(be, g, n, partial, norm_out, true)) return;
    if (clip > 0.0) {
        clip_scale_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, s>>>(g, n, clip, norm_out);
        KERNEL_CHECK(be, "clip_scale_kernel");
    }
}
