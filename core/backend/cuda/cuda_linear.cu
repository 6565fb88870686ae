/*
 * A linear layer's backward on the GPU (backend.h, linear_bwd):
 *   db += colsum dY,  dW += X^T dY,  dX = dY W^T.
 *
 * In fp32 (and for products with a side under 16, which bf16 mode runs in
 * fp32: cuda_gemm_takes_bf16) this is the composition of plain ops (core/backend/composed_ops.c).
 * With bf16 GEMM operands both products need dY rounded to bf16: it is
 * rounded once, and db is summed from the fp32 values in that same pass,
 * in the order colsum_partial_kernel uses (so db is the bias_grad op's to
 * the bit). W is rounded transposed, so the dX product reads both operands
 * untransposed.
 */
#include "backend/cuda/cuda_common.cuh"

/* Element (t, j) of dY for colsum_partial_kernel: stores its bf16 rounding
 * and returns the fp32 value. */
struct round_term {
    const float *dY;
    __nv_bfloat16 *out;
    int N;
    __device__ float operator()(int t, int j) const {
        const size_t k = (size_t)t * N + j;
        const float v = dY[k];
        out[k] = __float2bfloat16_rn(v);
        return v;
    }
};

/* The same pass four columns per thread (N % 4 == 0, dY 16-byte aligned):
 * block (32, COLSUM_LANES) covers 128 columns of COLSUM_ROWS rows; each
 * thread sums its rows in order (loading COLSUM_ROWS_IN_FLIGHT of them
 * before using the first), the lanes are added in lane order, as in
 * colsum_partial_kernel, so every column's partial is the same float.
 * db's finish is the staged one (128 chunks a column at 8192 rows): in a
 * softk step (ncu, H100) 13.3 -> 11.2 us per call at N = 256, 18.4 ->
 * 17.3 us at N = 768. */
__global__ void round_colsum_vec4_kernel(const float *__restrict__ dY, __nv_bfloat16 *__restrict__ out, int T, int N,
                                         float *partial, colsum_out dst) {
    __shared__ float lane_sums[COLSUM_LANES][128];
    const int chunk = blockIdx.x;
    const int j = blockIdx.y * 128 + threadIdx.x * 4;
    const int t0 = chunk * COLSUM_ROWS, t1 = min(T, t0 + COLSUM_ROWS);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (j < N) round_rows4_colsum(dY + j, out + j, (size_t)N, t0, t1, acc);
    colsum4_store_staged(lane_sums, acc, N, partial, dst);
}

void cuda_linear_bwd(moe_backend *be, const float *X, const float *W, const float *dY, float *dX, float *dW,
                     float *db, int T, int K, int N) {
    if (!cuda_gemm_takes_bf16(be, T, K, N)) { /* both products have sides T, K and N */
        moe_linear_bwd_reference(be, X, W, dY, dX, dW, db, T, K, N);
        return;
    }
    const int nchunks = (T + COLSUM_ROWS - 1) / COLSUM_ROWS;
    const bool vec4 = N % 4 == 0 && (uintptr_t)dY % 16 == 0;
    dim3 grid;
    if (!colsum_grid(be, T, N, vec4, "linear_bwd", &grid)) return;
    ScratchLayout lay;
    const size_t dy_off = lay.add((size_t)T * N * sizeof(__nv_bfloat16));
    const size_t x_off = lay.add((size_t)T * K * sizeof(__nv_bfloat16));
    const size_t wt_off = lay.add((size_t)K * N * sizeof(__nv_bfloat16));
    const size_t part_off = lay.add((size_t)nchunks * N * sizeof(float));
    char *base = cuda_scratch(be, lay.total);
    if (!base) return;
    __nv_bfloat16 *dYh = (__nv_bfloat16 *)(base + dy_off), *Xh = (__nv_bfloat16 *)(base + x_off);

    float *partial = (float *)(base + part_off);
    cudaStream_t st = cuda_stream(be);

    /* dY to bf16, its column sums on the way */
    const dim3 block(32, COLSUM_LANES);
    const colsum_out dst = colsum_dest(be, db, N, 0, grid.y);
    if (vec4) {
        round_colsum_vec4_kernel<<<grid, block, 0, st>>>(dY, dYh, T, N, partial, dst);
        KERNEL_CHECK(be, "round_colsum_vec4_kernel");
    } else {
        colsum_partial_kernel<round_term><<<grid, block, 0, st>>>(round_term{dY, dYh, N}, T, N, partial, dst);
        KERNEL_CHECK(be, "colsum_partial_kernel (linear dY)");
    }
    colsum_finish_if_needed(be, dst, db, partial, nchunks, N, "colsum finish (linear db)");
    /* dW += X^T dY */
    const __nv_bfloat16 *Xop = cuda_bf16_operand(be, X, K, 0, T, K, 1, Xh, false); /* the forward's copy, if kept */
    cuda_gemm_bf16_operands(be, 1, 0, K, N, T, Xop, K, 0, dYh, N, 0, NULL, 0, 1.0f, dW, N, 0, 1);
    /* dX = dY W^T, with W rounded as [N, K] */
    const __nv_bfloat16 *Wt = cuda_bf16_operand(be, W, N, 0, K, N, 1, (__nv_bfloat16 *)(base + wt_off), true);
    cuda_gemm_bf16_operands(be, 0, 0, T, K, N, dYh, N, 0, Wt, K, 0, NULL, 0, 0.0f, dX, K, 0, 1);
}
