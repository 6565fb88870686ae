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
#include <moe/router_cuda.cuh>

#include "loss_free_bias.h"

namespace {

constexpr int kThreads = 128;

int blocks_for(int n) { return (n + kThreads - 1) / kThreads; }

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

moe_status lfb_cuda_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const lfb_state *s = static_cast<const lfb_state *>(state);
    moe_status st = lfb_check_call(s, ctx, a->T, a->E, a->k_out, a->buffers);
    if (st != MOE_OK || a->T == 0) return st;
    cudaStream_t stream = static_cast<cudaStream_t>(ctx->stream);
    const int T = a->T, E = s->E, K = s->K;
    int *count = static_cast<int *>(ctx->workspace);
    unsigned *bad = reinterpret_cast<unsigned *>(count + E); /* the workspace's last int */

    /* Refuse non-finite logits, as the CPU path does: the SDK's flag kernel
     * finds the first, and its one copy home is the one host sync. */
    MOE_ROUTER_CUDA(cudaMemsetAsync(bad, 0xFF, sizeof *bad, stream));
    st = moe_router_cuda_flag_nonfinite(ctx, stream, a->logits, (size_t)T * E, bad);
    unsigned first = 0;
    if (st == MOE_OK) st = moe_router_cuda_read_flags(ctx, stream, bad, &first, 1);
    if (st != MOE_OK) return st;
    if (first != 0xFFFFFFFFu)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "logit of token %d, expert %d is not finite; routing needs finite logits", (int)(first / E),
                        (int)(first % E));

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
    moe_status st = lfb_check_call(s, ctx, a->T, a->E, a->k_out, a->buffers);
    if (st != MOE_OK || a->T == 0) return st;
    /* Forward refused non-finite logits, and backward sees the same ones. */
    backward_kernel<<<blocks_for(a->T), kThreads, 0, static_cast<cudaStream_t>(ctx->stream)>>>(
        a->logits, a->expert, a->dweight, a->T, s->E, s->K, s->score, s->normalize, a->dlogits);
    return device_error(ctx, "launching the backward kernel");
}

} // namespace

/* The table loss_free_bias.c points its `cuda` member at. */
extern "C" const moe_router_impl lfb_cuda = {lfb_cuda_forward, lfb_cuda_backward};
