/*
 * softk, CUDA path: the routing of softk.c on the device, one thread per
 * token.
 *
 * Tokens are independent, so each thread runs the body of the CPU loop for
 * its token with the same SDK helpers and the same two row functions
 * (softk_sum_weights, softk_sum_backward, copied below for the device). The
 * selection is moe_topk_row on the raw logits, exact comparisons, so it is
 * bitwise the CPU's choice (ties to the lower index); the weights and
 * gradients go through expf, which on the device may differ from the host's
 * by an ulp.
 *
 * Non-finite logits are refused before anything is written, as on the CPU: a
 * first kernel records the first bad (t, j) in the workspace, one 8-byte copy
 * brings it to the host, and the call fails naming it. That copy is the one
 * synchronization of a call.
 *
 * Pointers in the arguments are device pointers; everything runs on
 * ctx->stream.
 */
#include <moe/router_cuda.cuh>

/* Floor of the selected probabilities in normalize = "sum" (softk.c's SOFTK_SUM_FLOOR). */
#define SOFTK_SUM_FLOOR 1e-9f

/* The instance state exactly as softk.c defines it: both files read one struct. */
typedef enum softk_normalize { SOFTK_SOFTMAX, SOFTK_SUM } softk_normalize;
typedef struct softk_state {
    int32_t num_experts;
    int32_t top_k;
    float temperature;
    softk_normalize normalize;
    int32_t max_tokens;
} softk_state;

/* Workspace for T tokens: a 256-byte block for the error flag, then one
 * scratch row per token, carved as the CPU carves its single row:
 *     p[E]    full softmax                 "sum" only
 *     w[K]    weights of the selected experts
 *     dp[K]   gradient at the selected p   "sum" only
 *     idx[K]  selected experts
 * The CPU loop reuses one row; here every token runs at once. */
typedef struct softk_scratch {
    float *p;
    float *w;
    float *dp;
    int32_t *idx;
} softk_scratch;

static __host__ __device__ size_t softk_row_bytes(int32_t E, int32_t K, int sum) {
    size_t floats = sum ? (size_t)E + 2 * (size_t)K : (size_t)K;
    return floats * sizeof(float) + (size_t)K * sizeof(int32_t);
}

/* Token t's row of the scratch that follows the flag block. */
__device__ softk_scratch softk_carve(char *rows, int32_t E, int32_t K, int sum, int32_t t) {
    float *row = (float *)(rows + (size_t)t * softk_row_bytes(E, K, sum));
    softk_scratch sc;
    sc.p = row;
    sc.w = sc.p + (sum ? E : 0);
    sc.dp = sc.w + K;
    sc.idx = (int32_t *)(sc.dp + (sum ? K : 0));
    return sc;
}

static size_t softk_cuda_bytes_for(const softk_state *s, int32_t T) {
    return MOE_ROUTER_CUDA_FLAG_BYTES + (size_t)T * softk_row_bytes(s->num_experts, s->top_k, s->normalize == SOFTK_SUM);
}

extern "C" size_t softk_cuda_workspace_bytes(const softk_state *s) { return softk_cuda_bytes_for(s, s->max_tokens); }

/* ---- the two normalizations, one row each (device copies of softk.c's) ---------- */

/* normalize = "sum", forward: p = softmax(l / tau), c_j = max(p_idx_j, floor),
 * w_j = c_j / S. Returns S for the backward pass. */
__device__ float softk_sum_weights(const float *l, int32_t E, const int32_t *idx, int32_t K, float tau, float *p,
                                   float *w) {
    moe_softmax_row(l, p, E, tau);
    float S = 0.0f;
    for (int32_t j = 0; j < K; ++j) {
        float p_j = p[idx[j]];
        w[j] = p_j >= SOFTK_SUM_FLOOR ? p_j : SOFTK_SUM_FLOOR; /* c_j for now */
        S += w[j];
    }
    for (int32_t j = 0; j < K; ++j) w[j] /= S;
    return S;
}

/* normalize = "sum", backward: the chain rule through ratio, clamp and
 * softmax (see the top of softk.c). dl is the full row, overwritten. */
__device__ void softk_sum_backward(const int32_t *idx, int32_t K, int32_t E, float tau, const float *p,
                                   const float *w, float S, const float *g, float *dp, float *dl) {
    float wg = 0.0f; /* sum_i w_i g_i */
    for (int32_t j = 0; j < K; ++j) wg += w[j] * g[j];

    float pdp = 0.0f; /* sum_n p_n dp_n, only the selected n have dp_n != 0 */
    for (int32_t j = 0; j < K; ++j) {
        float p_j = p[idx[j]];
        dp[j] = p_j >= SOFTK_SUM_FLOOR ? (g[j] - wg) / S : 0.0f;
        pdp += p_j * dp[j];
    }

    for (int32_t m = 0; m < E; ++m) dl[m] = -p[m] * pdp / tau;
    for (int32_t j = 0; j < K; ++j) dl[idx[j]] += p[idx[j]] * dp[j] / tau;
}

/* ---- kernels ------------------------------------------------------------------- */

__global__ void softk_forward_kernel(const float *logits, int32_t T, int32_t E, int32_t K, float tau, int sum,
                                     char *rows, int32_t *expert, float *weight) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *l = logits + (size_t)t * E;
    int32_t *idx = expert + (size_t)t * K;
    float *w = weight + (size_t)t * K;
    moe_topk_row(l, E, K, idx);
    if (!sum)
        moe_softk_weights(l, idx, K, tau, w);
    else
        softk_sum_weights(l, E, idx, K, tau, softk_carve(rows, E, K, sum, t).p, w);
}

__global__ void softk_backward_kernel(const float *logits, const float *dweight, int32_t T, int32_t E, int32_t K,
                                      float tau, int sum, char *rows, float *dlogits) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *l = logits + (size_t)t * E;
    const float *g = dweight + (size_t)t * K;
    float *dl = dlogits + (size_t)t * E;
    softk_scratch sc = softk_carve(rows, E, K, sum, t);
    /* Selection and weights are recomputed from the logits rather than read
     * from the forward's outputs: the host may have marked a dropped
     * assignment -1 or renormalized the kept weights (softk.c says more). */
    moe_topk_row(l, E, K, sc.idx);
    if (!sum) {
        moe_softk_weights(l, sc.idx, K, tau, sc.w);
        /* The helper accumulates into the selected entries only. */
        for (int32_t m = 0; m < E; ++m) dl[m] = 0.0f;
        moe_softk_weights_backward(sc.idx, sc.w, g, K, tau, dl);
    } else {
        float S = softk_sum_weights(l, E, sc.idx, K, tau, sc.p, sc.w);
        softk_sum_backward(sc.idx, K, E, tau, sc.p, sc.w, S, g, sc.dp, dl);
    }
}

/* ---- host side ------------------------------------------------------------------- */

/* The checks of softk_check_call, against this path's workspace. */
static moe_status softk_cuda_check_call(const softk_state *s, const moe_context *ctx, int32_t T, int32_t E,
                                        int32_t k_out) {
    moe_status st = moe_router_check_T_E(ctx, T, E, s->num_experts);
    if (st == MOE_OK) st = moe_router_check_k_out(ctx, k_out, s->top_k);
    if (st == MOE_OK && T > 0) st = moe_router_check_workspace_for(ctx, softk_cuda_bytes_for(s, T), T, s->max_tokens);
    return st;
}

static moe_status softk_cuda_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const softk_state *s = (const softk_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = softk_cuda_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st != MOE_OK || a->T == 0) return st;
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    unsigned long long *flag = (unsigned long long *)ctx->workspace; /* every logit finite: the one copy back */
    st = moe_router_check_fwd_args(ctx, a);
    if (st == MOE_OK) st = moe_router_cuda_check_logits(ctx, stream, a->logits, a->T, a->E, flag);
    if (st != MOE_OK) return st;

    char *rows = (char *)ctx->workspace + MOE_ROUTER_CUDA_FLAG_BYTES;
    softk_forward_kernel<<<moe_router_cuda_row_blocks((size_t)a->T), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
        a->logits, a->T, a->E, s->top_k, s->temperature, s->normalize == SOFTK_SUM, rows, a->expert, a->weight);
    MOE_ROUTER_LAUNCHED(softk_forward_kernel);
    return MOE_OK;
}

static moe_status softk_cuda_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const softk_state *s = (const softk_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = softk_cuda_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st != MOE_OK || a->T == 0) return st;
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    unsigned long long *flag = (unsigned long long *)ctx->workspace;
    st = moe_router_check_present(ctx, a->T, a->logits && a->dweight && a->dlogits,
                                  "backward: logits, dweight and dlogits");
    if (st == MOE_OK) st = moe_router_cuda_check_logits(ctx, stream, a->logits, a->T, a->E, flag);
    if (st != MOE_OK) return st;

    char *rows = (char *)ctx->workspace + MOE_ROUTER_CUDA_FLAG_BYTES;
    softk_backward_kernel<<<moe_router_cuda_row_blocks((size_t)a->T), MOE_ROUTER_CUDA_ROW_THREADS, 0,
                            stream>>>(a->logits, a->dweight, a->T, a->E, s->top_k, s->temperature,
                                      s->normalize == SOFTK_SUM, rows, a->dlogits);
    MOE_ROUTER_LAUNCHED(softk_backward_kernel);
    return MOE_OK;
}

extern "C" {
extern const moe_router_impl softk_cuda_impl;
const moe_router_impl softk_cuda_impl = {softk_cuda_forward, softk_cuda_backward};
}
