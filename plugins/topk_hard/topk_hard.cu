/*
 * topk_hard, CUDA path: the routing of topk_hard.c on the device, one thread
 * per token.
 *
 * Tokens are independent, so each thread runs the body of the CPU loop for
 * its token with the same SDK helpers: moe_topk_row picks the K experts by
 * exact comparisons of the raw logits (bitwise the CPU's choice, ties to the
 * lower index), the weights are the constants 1/K or 1, and the
 * straight-through backward is moe_softk_weights(_backward) at temperature 1,
 * whose expf may differ from the host's by an ulp.
 *
 * Non-finite logits are refused before anything is written, as on the CPU: a
 * first kernel records the first bad (t, j) in the workspace, one 8-byte copy
 * brings it to the host, and the call fails naming it. That copy is the one
 * synchronization of a call (none in the backward of "uniform" and "one",
 * which read no logits).
 *
 * Pointers in the arguments are device pointers; everything runs on
 * ctx->stream.
 */
#include <moe/router_cuda.cuh>

/* The instance state exactly as topk_hard.c defines it: both files read one struct. */
typedef enum topk_hard_weight { TOPK_HARD_UNIFORM, TOPK_HARD_ST, TOPK_HARD_ONE } topk_hard_weight;
typedef struct topk_hard_state {
    int32_t num_experts;
    int32_t top_k;
    topk_hard_weight weight;
    int32_t max_tokens;
} topk_hard_state;

/* Workspace for T tokens:
 *   flag     256 bytes      the first non-finite logit (t*E + j)
 *   w[T,K]   float          "st" backward: surrogate softk weights
 *   idx[T,K] int32          "st" backward: selected experts
 * The CPU loop reuses one row of w and idx; here every token runs at once and
 * needs its own row. */
static size_t topk_hard_cuda_bytes_for(const topk_hard_state *s, int32_t T) {
    size_t scratch = s->weight == TOPK_HARD_ST ? (size_t)T * s->top_k * (sizeof(float) + sizeof(int32_t)) : 0;
    return MOE_ROUTER_CUDA_FLAG_BYTES + scratch;
}

extern "C" size_t topk_hard_cuda_workspace_bytes(const topk_hard_state *s) {
    return topk_hard_cuda_bytes_for(s, s->max_tokens);
}

/* ---- kernels ------------------------------------------------------------------- */

__global__ void topk_hard_forward_kernel(const float *logits, int32_t T, int32_t E, int32_t K, float w,
                                         int32_t *expert, float *weight) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    moe_topk_row(logits + (size_t)t * E, E, K, expert + (size_t)t * K);
    for (int32_t j = 0; j < K; ++j) weight[(size_t)t * K + j] = w;
}

/* Straight-through: dl_idx_j += w_j (g_j - sum_i w_i g_i) with w the softk
 * weights at temperature 1; the rows were zeroed before the launch. */
__global__ void topk_hard_st_backward_kernel(const float *logits, const float *dweight, int32_t T, int32_t E,
                                             int32_t K, float *w_scratch, int32_t *idx_scratch, float *dlogits) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *l = logits + (size_t)t * E;
    float *w = w_scratch + (size_t)t * K;
    int32_t *idx = idx_scratch + (size_t)t * K;
    /* The selection is recomputed from the logits, not read from the
     * forward's expert: the host may have marked a dropped assignment -1
     * there, while the surrogate softmax still runs over all K selected. */
    moe_topk_row(l, E, K, idx);
    moe_softk_weights(l, idx, K, 1.0f, w);
    moe_softk_weights_backward(idx, w, dweight + (size_t)t * K, K, 1.0f, dlogits + (size_t)t * E);
}

/* ---- host side ------------------------------------------------------------------- */

/* The checks of topk_hard_check_call, against this path's workspace. */
static moe_status topk_hard_cuda_check_call(const topk_hard_state *s, const moe_context *ctx, int32_t T, int32_t E,
                                            int32_t k_out) {
    moe_status st = moe_router_check_T_E(ctx, T, E, s->num_experts);
    if (st == MOE_OK) st = moe_router_check_k_out(ctx, k_out, s->top_k);
    if (st == MOE_OK && T > 0)
        st = moe_router_check_workspace_for(ctx, topk_hard_cuda_bytes_for(s, T), T, s->max_tokens);
    return st;
}

static moe_status topk_hard_cuda_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const topk_hard_state *s = (const topk_hard_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = topk_hard_cuda_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st != MOE_OK || a->T == 0) return st;
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    unsigned long long *flag = (unsigned long long *)ctx->workspace; /* every logit finite: the one copy back */
    st = moe_router_check_fwd_args(ctx, a);
    if (st == MOE_OK) st = moe_router_cuda_check_logits(ctx, stream, a->logits, a->T, a->E, flag);
    if (st != MOE_OK) return st;

    /* "st" shares the uniform forward pass; only its backward differs. */
    const float w = s->weight == TOPK_HARD_ONE ? 1.0f : 1.0f / (float)s->top_k;
    topk_hard_forward_kernel<<<moe_router_cuda_row_blocks((size_t)a->T), MOE_ROUTER_CUDA_ROW_THREADS, 0,
                               stream>>>(a->logits, a->T, a->E, s->top_k, w, a->expert, a->weight);
    MOE_ROUTER_LAUNCHED(topk_hard_forward_kernel);
    return MOE_OK;
}

static moe_status topk_hard_cuda_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const topk_hard_state *s = (const topk_hard_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = topk_hard_cuda_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st == MOE_OK) st = moe_router_check_present(ctx, a->T, a->dlogits != NULL, "backward: dlogits");
    if (st != MOE_OK || a->T == 0) return st;
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    unsigned long long *flag = (unsigned long long *)ctx->workspace;
    const int32_t T = a->T, E = a->E, K = s->top_k;
    /* dlogits is an output: every entry is written, zeros where no gradient flows. */
    MOE_ROUTER_CUDA(cudaMemsetAsync(a->dlogits, 0, (size_t)T * E * sizeof(float), stream));
    if (s->weight != TOPK_HARD_ST) return MOE_OK;

    st = moe_router_check_present(ctx, T, a->logits && a->dweight, "backward: logits and dweight");
    if (st == MOE_OK) st = moe_router_cuda_check_logits(ctx, stream, a->logits, T, E, flag);
    if (st != MOE_OK) return st;

    char *base = (char *)ctx->workspace + MOE_ROUTER_CUDA_FLAG_BYTES;
    float *w = (float *)base;                            /* [T,K] */
    int32_t *idx = (int32_t *)(w + (size_t)T * K);       /* [T,K] */
    topk_hard_st_backward_kernel<<<moe_router_cuda_row_blocks((size_t)T), MOE_ROUTER_CUDA_ROW_THREADS, 0,
                                   stream>>>(a->logits, a->dweight, T, E, K, w, idx, a->dlogits);
    MOE_ROUTER_LAUNCHED(topk_hard_st_backward_kernel);
    return MOE_OK;
}

extern "C" {
extern const moe_router_impl topk_hard_cuda_impl;
const moe_router_impl topk_hard_cuda_impl = {topk_hard_cuda_forward, topk_hard_cuda_backward};
}
