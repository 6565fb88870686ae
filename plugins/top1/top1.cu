/*
 * top1, CUDA path: the routing of top1.c on the device, one thread per token.
 *
 * Tokens are independent (a row of E logits in, one expert and one weight
 * out), so each thread runs the body of the CPU loop for its token with the
 * same SDK helpers. The expert comes from exact comparisons of the raw logits
 * (moe_topk_row), so it is bitwise the CPU's choice; the weight p_e goes
 * through expf, which on the device may differ from the host's by an ulp.
 *
 * Non-finite logits are refused before anything is written, as on the CPU: a
 * first kernel records the first bad (t, j) in the workspace, one 8-byte copy
 * brings it to the host, and the call fails naming it. That copy is the one
 * synchronization of a call (none with gate = "none" in backward).
 *
 * Pointers in the arguments are device pointers; everything runs on
 * ctx->stream.
 */
#include <moe/router_cuda.cuh>

/* The instance state exactly as top1.c defines it: both files read one struct. */
typedef enum top1_gate { TOP1_GATE_SOFTMAX, TOP1_GATE_NONE } top1_gate;
typedef struct top1_state {
    int32_t num_experts;
    top1_gate gate;
} top1_state;

/* Workspace: one 256-byte block for the error flag (the host aligns the
 * workspace to 256 bytes). p[E] of the CPU path is not needed: a thread keeps
 * the softmax's max and sum in registers instead. */
extern "C" size_t top1_cuda_workspace_bytes(const top1_state *s) {
    (void)s;
    return MOE_ROUTER_CUDA_FLAG_BYTES;
}

/* ---- kernels ------------------------------------------------------------------- */

/* The max m and the sum s of moe_softmax_row(l, p, E, 1): the same loops in the
 * same order, so p_j = exp(l_j - m) / s is the float the CPU stores in p[j].
 * (The CPU divides l_j - m by the temperature 1, which changes nothing.) */
__device__ void top1_softmax_stats(const float *l, int32_t E, float *m_out, float *s_out) {
    float m = -INFINITY;
    for (int32_t i = 0; i < E; ++i) m = l[i] > m ? l[i] : m;
    float s = 0.0f;
    for (int32_t i = 0; i < E; ++i) s += expf(l[i] - m);
    *m_out = m;
    *s_out = s;
}

/* e = argmax_j l_j, ties to the lower index: top1.c's top1_choose. */
__device__ int32_t top1_choose(const float *l, int32_t E) {
    int32_t e;
    moe_topk_row(l, E, 1, &e);
    return e;
}

__global__ void top1_forward_kernel(const float *logits, int32_t T, int32_t E, int gate_none, int32_t *expert,
                                    float *weight) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *l = logits + (size_t)t * E;
    const int32_t e = top1_choose(l, E);
    expert[t] = e;
    if (gate_none) {
        weight[t] = 1.0f;
    } else {
        float m, s;
        top1_softmax_stats(l, E, &m, &s);
        weight[t] = expf(l[e] - m) / s; /* p_e */
    }
}

/* dl_j = g p_e (delta_je - p_j), g = dweight[t]. */
__global__ void top1_backward_kernel(const float *logits, const float *dweight, int32_t T, int32_t E,
                                     float *dlogits) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *l = logits + (size_t)t * E;
    float *dl = dlogits + (size_t)t * E;
    /* Recomputed from the logits, not read from the forward's expert: the
     * host may have marked a dropped assignment -1 (its dweight is then 0). */
    const int32_t e = top1_choose(l, E);
    float m, s;
    top1_softmax_stats(l, E, &m, &s);
    const float g_pe = dweight[t] * (expf(l[e] - m) / s);
    for (int32_t j = 0; j < E; ++j) dl[j] = -g_pe * (expf(l[j] - m) / s);
    dl[e] += g_pe;
}

/* ---- host side ------------------------------------------------------------------- */

/* The checks of top1_check_call, against this path's workspace. */
static moe_status top1_cuda_check_call(const top1_state *s, const moe_context *ctx, int32_t T, int32_t E,
                                       int32_t k_out) {
    moe_status st = moe_router_check_T_E(ctx, T, E, s->num_experts);
    if (st != MOE_OK) return st;
    if (k_out != 1)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "k_out = %d but top1 writes exactly 1 assignment per token", (int)k_out);
    return T > 0 ? moe_router_check_workspace(ctx, top1_cuda_workspace_bytes(s)) : MOE_OK;
}

static moe_status top1_cuda_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const top1_state *s = (const top1_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = top1_cuda_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st != MOE_OK || a->T == 0) return st;
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    unsigned long long *flag = (unsigned long long *)ctx->workspace; /* every logit finite: the one copy back */
    st = moe_router_check_fwd_args(ctx, a);
    if (st == MOE_OK) st = moe_router_cuda_check_logits(ctx, stream, a->logits, a->T, a->E, flag);
    if (st != MOE_OK) return st;

    top1_forward_kernel<<<moe_router_cuda_row_blocks((size_t)a->T), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
        a->logits, a->T, a->E, s->gate == TOP1_GATE_NONE, a->expert, a->weight);
    MOE_ROUTER_LAUNCHED(top1_forward_kernel);
    return MOE_OK;
}

static moe_status top1_cuda_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const top1_state *s = (const top1_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = top1_cuda_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st == MOE_OK) st = moe_router_check_present(ctx, a->T, a->dlogits != NULL, "backward: dlogits");
    if (st != MOE_OK || a->T == 0) return st;
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    unsigned long long *flag = (unsigned long long *)ctx->workspace;
    const int32_t T = a->T, E = a->E;
    if (s->gate == TOP1_GATE_NONE) {
        /* weight = 1 does not depend on l; dlogits is an output, so zeros. */
        MOE_ROUTER_CUDA(cudaMemsetAsync(a->dlogits, 0, (size_t)T * E * sizeof(float), stream));
        return MOE_OK;
    }

    st = moe_router_check_present(ctx, T, a->logits && a->dweight, "backward: logits and dweight");
    if (st == MOE_OK) st = moe_router_cuda_check_logits(ctx, stream, a->logits, T, E, flag);
    if (st != MOE_OK) return st;

    top1_backward_kernel<<<moe_router_cuda_row_blocks((size_t)T), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
        a->logits, a->dweight, T, E, a->dlogits);
    MOE_ROUTER_LAUNCHED(top1_backward_kernel);
    return MOE_OK;
}

extern "C" {
extern const moe_router_impl top1_cuda_impl;
const moe_router_impl top1_cuda_impl = {top1_cuda_forward, top1_cuda_backward};
}
