/*
 * loss_free_bias, CUDA path: the same per-token routines as the CPU path
 * (loss_free_bias.h, MOE_HD), one thread per token.
 *
 * Everything in the args is device memory; the work goes on the host's
 * stream (ctx->stream), and nothing is allocated: the per-expert counts live
 * in the workspace the host allocated for us. The calls return without
 * waiting for the kernels, except where an error must be reported (a
 * non-finite logit), which needs the answer on the host.
 */
#include <cuda_runtime.h>
#include <climits>
#include <cstdio>

#include "loss_free_bias.h"

namespace {

constexpr int kThreads = 128;

int blocks_for(int n) { return (n + kThreads - 1) / kThreads; }

/* bad[0] = the smallest flat index of a non-finite logit (INT_MAX if none). */
__global__ void check_kernel(const float *logits, long long n, int *bad) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && !isfinite(logits[i])) atomicMin(bad, (int)(i < INT_MAX ? i : INT_MAX - 1));
}

__global__ void forward_kernel(const float *logits, const float *bias, int T, int E, int K, int score, int normalize,
                               int32_t *expert, float *weight, int *count) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    int32_t *idx = expert + (size_t)t * K;
    lfb_route_row(logits + (size_t)t * E, bias, E, K, score, normalize, idx, weight + (size_t)t * K);
    if (count)
        for (int j = 0; j < K; ++j) atomicAdd(&count[idx[j]], 1); /* integer adds: order does not matter */
}

__global__ void bias_kernel(float *bias, const int *count, int E, double mean, float u) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e < E) bias[e] = lfb_bias_step(bias[e], count[e], mean, u);
}

__global__ void backward_kernel(const float *logits, const int32_t *expert, const float *dweight, int T, int E, int K,
                                int score, int normalize, float *dlogits) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    lfb_backward_row(logits + (size_t)t * E, expert + (size_t)t * K, dweight + (size_t)t * K, E, K, score, normalize,
                     dlogits + (size_t)t * E);
}

moe_status device_error(const moe_context *ctx, const char *what) {
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return MOE_OK;
    return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_DEVICE, "%s: %s", what, cudaGetErrorString(e));
}

moe_status check_shape(const lfb_state *s, const moe_context *ctx, int T, int E, int k_out, float *const *buffers) {
    if (T < 0 || E != s->E || k_out != s->K)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "called with T = %d, E = %d, k_out = %d; this instance has E = %d, k_out = %d", T, E, k_out,
                        s->E, s->K);
    if (T > 0 && (!buffers || !buffers[0]))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "the bias buffer is missing");
    if (T > 0 && (!ctx->workspace || ctx->workspace_bytes < LFB_WORKSPACE_BYTES(s->E)))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "workspace of %zu bytes, query() asked for %zu",
                        ctx->workspace_bytes, LFB_WORKSPACE_BYTES(s->E));
    return MOE_OK;
}

moe_status lfb_cuda_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const lfb_state *s = static_cast<const lfb_state *>(state);
    moe_status st = check_shape(s, ctx, a->T, a->E, a->k_out, a->buffers);
    if (st != MOE_OK || a->T == 0) return st;
    cudaStream_t stream = static_cast<cudaStream_t>(ctx->stream);
    const int T = a->T, E = s->E, K = s->K;
    int *count = static_cast<int *>(ctx->workspace);
    int *bad = count + E;

    /* Refuse non-finite logits, as the CPU path does: the one host sync. */
    const long long n = (long long)T * E;
    int h_bad = INT_MAX;
    cudaMemcpyAsync(bad, &h_bad, sizeof h_bad, cudaMemcpyHostToDevice, stream);
    check_kernel<<<(unsigned)((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a->logits, n, bad);
    cudaMemcpyAsync(&h_bad, bad, sizeof h_bad, cudaMemcpyDeviceToHost, stream);
    if (cudaStreamSynchronize(stream) != cudaSuccess) return device_error(ctx, "checking the logits");
    if (h_bad != INT_MAX)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "logit of token %d, expert %d is not finite; routing needs finite logits", h_bad / E, h_bad % E);

    if (ctx->training) cudaMemsetAsync(count, 0, (size_t)E * sizeof(int), stream);
    forward_kernel<<<blocks_for(T), kThreads, 0, stream>>>(a->logits, a->buffers[0], T, E, K, s->score, s->normalize,
                                                           a->expert, a->weight, ctx->training ? count : nullptr);
    if (ctx->training)
        bias_kernel<<<blocks_for(E), kThreads, 0, stream>>>(a->buffers[0], count, E, (double)T * K / E,
                                                            s->update_rate);
    return device_error(ctx, "launching the forward kernels");
}

moe_status lfb_cuda_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const lfb_state *s = static_cast<const lfb_state *>(state);
    moe_status st = check_shape(s, ctx, a->T, a->E, a->k_out, a->buffers);
    if (st != MOE_OK || a->T == 0) return st;
    /* Forward refused non-finite logits, and backward sees the same ones. */
    backward_kernel<<<blocks_for(a->T), kThreads, 0, static_cast<cudaStream_t>(ctx->stream)>>>(
        a->logits, a->expert, a->dweight, a->T, s->E, s->K, s->score, s->normalize, a->dlogits);
    return device_error(ctx, "launching the backward kernel");
}

} // namespace

/* The table loss_free_bias.c points its `cuda` member at. */
extern "C" const moe_router_impl lfb_cuda = {lfb_cuda_forward, lfb_cuda_backward};
