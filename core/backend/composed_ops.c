/*
 * The composite ops of backend.h written with the backend's plain ops: the
 * experts' MLP (ffn_fwd / ffn_bwd) and a linear layer's backward
 * (linear_bwd). These are the CPU backend's implementations, and the CUDA
 * backend's in fp32; its bf16 paths (cuda_ffn.cu, cuda_linear.cu) compute
 * the same quantities with fewer passes over memory and are tested against
 * these.
 *
 * Shapes of the MLP per expert e: X [C, d], w1 [d, hin], H [C, hin],
 * A [C, n], w2 [n, d], Y [C, d]; hin = 2n for SwiGLU (gate | up), else n.
 */
#include "backend/backend.h"

static int ffn_in_width(moe_act_kind kind, int n) { return kind == MOE_ACT_SWIGLU ? 2 * n : n; }

void moe_ffn_fwd_reference(moe_backend *be, moe_act_kind kind, const float *X, const float *w1,
                           const float *b1, const float *w2, const float *b2, float *H, float *A, float *Y,
                           int batch, int C, int d, int n) {
    const int hin = ffn_in_width(kind, n);
    const long long sX = (long long)C * d, sH = (long long)C * hin, sA = (long long)C * n;
    /* H = X w1 + b1 */
    be->gemm_bias(be, 0, 0, C, hin, d, X, d, sX, w1, hin, (long long)d * hin, b1, hin, NULL, H, hin, sH, batch);
    /* A = act(H) */
    be->act_fwd(be, kind, H, A, batch * C, n);
    /* Y = A w2 + b2 */
    be->gemm_bias(be, 0, 0, C, d, n, A, n, sA, w2, d, (long long)n * d, b2, d, NULL, Y, d, sX, batch);
}

void moe_ffn_bwd_reference(moe_backend *be, moe_act_kind kind, const float *X, const float *w1,
                           const float *w2, const float *H, const float *A, const float *dY, float *dA,
                           float *dH, float *dX, float *dw1, float *db1, float *dw2, float *db2, int batch,
                           int C, int d, int n, int accumulate_dw) {
    const int hin = ffn_in_width(kind, n);
    const float dw_beta = accumulate_dw ? 1.0f : 0.0f;
    const long long sX = (long long)C * d, sH = (long long)C * hin, sA = (long long)C * n;
    /* the second layer: db2 += colsum dY; dA = dY w2^T; dw2 (+)= A^T dY */
    if (db2) be->bias_grad_batched(be, dY, db2, batch, C, d, sX, d);
    be->gemm_strided_batched(be, 0, 1, C, n, d, 1.0f, dY, d, sX, w2, d, (long long)n * d, 0.0f, dA, n, sA,
                             batch);
    be->gemm_strided_batched(be, 1, 0, n, d, C, 1.0f, A, n, sA, dY, d, sX, dw_beta, dw2, d, (long long)n * d,
                             batch);
    /* the activation: dH = act'(H) dA; db1 += colsum dH */
    be->act_bwd(be, kind, H, dA, dH, batch * C, n);
    if (db1) be->bias_grad_batched(be, dH, db1, batch, C, hin, sH, hin);
    /* the first layer: dX = dH w1^T; dw1 (+)= X^T dH */
    be->gemm_strided_batched(be, 0, 1, C, d, hin, 1.0f, dH, hin, sH, w1, hin, (long long)d * hin, 0.0f, dX, d,
                             sX, batch);
    be->gemm_strided_batched(be, 1, 0, d, hin, C, 1.0f, X, d, sX, dH, hin, sH, dw_beta, dw1, hin,
                             (long long)d * hin, batch);
}

void moe_linear_bwd_reference(moe_backend *be, const float *X, const float *W, const float *dY, float *dX,
                              float *dW, float *db, int T, int K, int N) {
    /* db += colsum dY; dW += X^T dY; dX = dY W^T */
    if (db) be->bias_grad(be, dY, db, T, N);
    be->gemm(be, 1, 0, K, N, T, 1.0f, X, K, dY, N, 1.0f, dW, N);
    be->gemm(be, 0, 1, T, K, N, 1.0f, dY, N, W, N, 0.0f, dX, K);
}
