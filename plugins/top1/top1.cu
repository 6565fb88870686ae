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
#include <cuda_runtime.h>
#include <moe/router.h>

/* The instance state exactly as top1.c defines it: both files read one struct. */
typedef enum top1_gate { TOP1_GATE_SOFTMAX, TOP1_GATE_NONE } top1_gate;
typedef struct top1_state {
    int32_t num_experts;
    top1_gate gate;
} top1_state;

/* Workspace: one 256-byte block for the error flag (the host aligns the
 * workspace to 256 bytes). p[E] of the CPU path is not needed: a thread keeps
 * the softmax's max and sum in registers instead. */
#define TOP1_FLAG_BYTES 256
#define TOP1_THREADS 256
#define TOP1_NO_FLAG 0xFFFFFFFFFFFFFFFFull

extern "C" size_t top1_cuda_workspace_bytes(const top1_state *s) {
    (void)s;
    return TOP1_FLAG_BYTES;
}

/* ---- errors ------------------------------------------------------------------ */

/* A failed CUDA call becomes MOE_ERR_DEVICE with the call named. */
static moe_status top1_cuda_status(const moe_context *ctx, cudaError_t err, const char *what) {
    if (err == cudaSuccess) return MOE_OK;
    return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_DEVICE, "%s failed: %s (%s)", what, cudaGetErrorString(err),
                    cudaGetErrorName(err));
}
#define TOP1_CUDA(call)                                                 \
    do {                                                                \
        moe_status st_ = top1_cuda_status(ctx, (call), #call);          \
        if (st_ != MOE_OK) return st_;                                  \
    } while (0)
/* A bad launch configuration is reported by the next cudaGetLastError. */
#define TOP1_LAUNCHED(kernel)                                                       \
    do {                                                                            \
        moe_status st_ = top1_cuda_status(ctx, cudaGetLastError(), "launch of " #kernel); \
        if (st_ != MOE_OK) return st_;                                              \
    } while (0)

static unsigned top1_blocks(size_t n, size_t cap) {
    size_t b = (n + TOP1_THREADS - 1) / TOP1_THREADS;
    return (unsigned)(b < cap ? (b > 0 ? b : 1) : cap);
}

/* ---- kernels ------------------------------------------------------------------- */

/* flag = the smallest t*E + j whose logit is not finite: atomicMin keeps the
 * first in row-major order, the one the CPU loop reports. */
__global__ void top1_find_nonfinite(const float *logits, size_t n, unsigned long long *flag) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        if (!isfinite(logits[i])) atomicMin(flag, (unsigned long long)i);
}

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
    if (T < 0) return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "T = %d is negative", (int)T);
    if (E != s->num_experts)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "E = %d but this instance was created with num_experts = %d", (int)E,
                        (int)s->num_experts);
    if (k_out != 1)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "k_out = %d but top1 writes exactly 1 assignment per token", (int)k_out);
    size_t need = top1_cuda_workspace_bytes(s);
    if (T > 0 && (!ctx->workspace || ctx->workspace_bytes < need))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "workspace of %zu bytes given, query() asked for %zu", ctx->workspace_bytes, need);
    return MOE_OK;
}

/* Every logit is checked before any output is written, so a failed call
 * leaves no half-routed batch behind: the one copy back of a call. */
static moe_status top1_cuda_check_logits(const moe_context *ctx, cudaStream_t stream, const float *logits, int32_t T,
                                         int32_t E) {
    unsigned long long *flag = (unsigned long long *)ctx->workspace;
    const size_t n = (size_t)T * E;
    TOP1_CUDA(cudaMemsetAsync(flag, 0xFF, sizeof *flag, stream));
    top1_find_nonfinite<<<top1_blocks(n, 1024), TOP1_THREADS, 0, stream>>>(logits, n, flag);
    TOP1_LAUNCHED(top1_find_nonfinite);
    unsigned long long first = 0;
    TOP1_CUDA(cudaMemcpyAsync(&first, flag, sizeof first, cudaMemcpyDeviceToHost, stream));
    TOP1_CUDA(cudaStreamSynchronize(stream));
    if (first == TOP1_NO_FLAG) return MOE_OK;
    float v = 0.0f; /* only on failure: fetch the value to name it */
    TOP1_CUDA(cudaMemcpyAsync(&v, logits + first, sizeof v, cudaMemcpyDeviceToHost, stream));
    TOP1_CUDA(cudaStreamSynchronize(stream));
    return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                    "logit[%d,%d] is %s: the gate produced a non-finite value", (int)(first / E), (int)(first % E),
                    isnan(v) ? "NaN" : (v > 0 ? "+Inf" : "-Inf"));
}

static moe_status top1_cuda_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const top1_state *s = (const top1_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = top1_cuda_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st != MOE_OK || a->T == 0) return st;
    if (!a->logits || !a->expert || !a->weight)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "forward: logits, expert and weight must not be NULL when T = %d > 0", (int)a->T);
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    st = top1_cuda_check_logits(ctx, stream, a->logits, a->T, a->E);
    if (st != MOE_OK) return st;

    top1_forward_kernel<<<top1_blocks((size_t)a->T, (size_t)1 << 30), TOP1_THREADS, 0, stream>>>(
        a->logits, a->T, a->E, s->gate == TOP1_GATE_NONE, a->expert, a->weight);
    TOP1_LAUNCHED(top1_forward_kernel);
    return MOE_OK;
}

static moe_status top1_cuda_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const top1_state *s = (const top1_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = top1_cuda_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st != MOE_OK || a->T == 0) return st;
    if (!a->dlogits)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "backward: dlogits must not be NULL when T = %d > 0", (int)a->T);
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    const int32_t T = a->T, E = a->E;
    if (s->gate == TOP1_GATE_NONE) {
        /* weight = 1 does not depend on l; dlogits is an output, so zeros. */
        TOP1_CUDA(cudaMemsetAsync(a->dlogits, 0, (size_t)T * E * sizeof(float), stream));
        return MOE_OK;
    }

    if (!a->logits || !a->dweight)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "backward: logits and dweight must not be NULL when T = %d > 0", (int)a->T);
    st = top1_cuda_check_logits(ctx, stream, a->logits, T, E);
    if (st != MOE_OK) return st;

    top1_backward_kernel<<<top1_blocks((size_t)T, (size_t)1 << 30), TOP1_THREADS, 0, stream>>>(a->logits, a->dweight,
                                                                                              T, E, a->dlogits);
    TOP1_LAUNCHED(top1_backward_kernel);
    return MOE_OK;
}

extern "C" {
extern const moe_router_impl top1_cuda_impl;
const moe_router_impl top1_cuda_impl = {top1_cuda_forward, top1_cuda_backward};
}
