/*
 * MoE Routing Bench SDK: shared mechanics of a router's CUDA path (CUDA C++,
 * header-only; include it from the plugin's .cu file after <moe/router.h>
 * or instead of it).
 *
 *   - CUDA errors as moe_status: moe_router_cuda_status, and the macros
 *     MOE_ROUTER_CUDA(call) and MOE_ROUTER_LAUNCHED(kernel), which return
 *     MOE_ERR_DEVICE from the calling function with the call named (they
 *     expect `const moe_context *ctx` in scope);
 *   - launch sizes: MOE_ROUTER_CUDA_THREADS per block, moe_router_cuda_blocks;
 *   - refusing bad values before anything is written, as the CPU path does:
 *     a kernel flags the first bad element (moe_router_find_nonfinite,
 *     moe_router_find_out_of_range: an atomicMin on a flag word in the
 *     workspace keeps the first in row-major order, the one a CPU loop
 *     reports), one small copy brings the flags to the host
 *     (moe_router_cuda_read_flags, the one synchronization of a call), and
 *     only on failure one more copy fetches the bad value to name it
 *     (moe_router_cuda_fetch). moe_router_cuda_check_logits and
 *     moe_router_cuda_check_values do all of it with the CPU helpers'
 *     messages (moe/router_check.h), and skip it when the host says it
 *     checks the inputs itself (moe_context_inputs_checked: the model's
 *     training steps then run without any wait inside).
 *
 * Flags are unsigned 64-bit words (unsigned 32-bit ones work too, for
 * fewer than 2^32 elements), set to all ones (MOE_ROUTER_NO_FLAG) before the
 * kernel runs. A plugin reserves them at the start of its workspace;
 * MOE_ROUTER_CUDA_FLAG_BYTES (256) keeps what follows 256-byte aligned.
 */
#ifndef MOE_ROUTER_CUDA_CUH
#define MOE_ROUTER_CUDA_CUH

#include <cuda_runtime.h>

#include "router.h"

#define MOE_ROUTER_CUDA_THREADS 256
#define MOE_ROUTER_CUDA_FLAG_BYTES 256
#define MOE_ROUTER_NO_FLAG 0xFFFFFFFFFFFFFFFFull

/* ---- errors ------------------------------------------------------------------ */

/* A failed CUDA call becomes MOE_ERR_DEVICE with the call named. */
static inline moe_status moe_router_cuda_status(const moe_context *ctx, cudaError_t err, const char *what) {
    if (err == cudaSuccess) return MOE_OK;
    return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_DEVICE, "%s failed: %s (%s)", what, cudaGetErrorString(err),
                    cudaGetErrorName(err));
}

/* Run a CUDA runtime call; on failure return its status from the calling function. */
#define MOE_ROUTER_CUDA(call)                                                   \
    do {                                                                        \
        moe_status st_ = moe_router_cuda_status(ctx, (call), #call);            \
        if (st_ != MOE_OK) return st_;                                          \
    } while (0)

/* After a launch: a bad launch configuration is reported by the next cudaGetLastError. */
#define MOE_ROUTER_LAUNCHED(kernel)                                                             \
    do {                                                                                        \
        moe_status st_ = moe_router_cuda_status(ctx, cudaGetLastError(), "launch of " #kernel); \
        if (st_ != MOE_OK) return st_;                                                          \
    } while (0)

/* ---- launch sizes -------------------------------------------------------------- */

/* Blocks of MOE_ROUTER_CUDA_THREADS for n elements (one thread each), at
 * least 1 and at most cap (a kernel with a grid-stride loop covers the rest). */
static inline unsigned moe_router_cuda_blocks(size_t n, size_t cap) {
    size_t b = (n + MOE_ROUTER_CUDA_THREADS - 1) / MOE_ROUTER_CUDA_THREADS;
    return (unsigned)(b < cap ? (b > 0 ? b : 1) : cap);
}

/* For kernels of one thread per token (or per logit) that each run a serial
 * loop (a row's top-k, softmax, a dot product): blocks of
 * MOE_ROUTER_CUDA_ROW_THREADS, so a batch of 8192 tokens makes 128 blocks
 * instead of 32 and reaches every SM of a large GPU. */
#define MOE_ROUTER_CUDA_ROW_THREADS 64
static inline unsigned moe_router_cuda_row_blocks(size_t n) {
    size_t b = (n + MOE_ROUTER_CUDA_ROW_THREADS - 1) / MOE_ROUTER_CUDA_ROW_THREADS;
    const size_t cap = (size_t)1 << 30;
    return (unsigned)(b < cap ? (b > 0 ? b : 1) : cap);
}

/* ---- flag kernels ---------------------------------------------------------------- */

/* *flag = min(*flag, the smallest i with v[i] not finite). */
template <typename Flag>
__global__ void moe_router_find_nonfinite(const float *v, size_t n, Flag *flag) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        if (!isfinite(v[i])) atomicMin(flag, (Flag)i);
}

/* *flag = min(*flag, the smallest i with v[i] outside [lo, hi)). */
template <typename Flag>
__global__ void moe_router_find_out_of_range(const int32_t *v, size_t n, int32_t lo, int32_t hi, Flag *flag) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        if (v[i] < lo || v[i] >= hi) atomicMin(flag, (Flag)i);
}

/* ---- host side ------------------------------------------------------------------- */

/* Launch moe_router_find_nonfinite over v[0..n) on `stream` (the flag must be set already). */
template <typename Flag>
static inline moe_status moe_router_cuda_flag_nonfinite(const moe_context *ctx, cudaStream_t stream, const float *v,
                                                        size_t n, Flag *flag) {
    moe_router_find_nonfinite<<<moe_router_cuda_blocks(n, 1024), MOE_ROUTER_CUDA_THREADS, 0, stream>>>(v, n, flag);
    MOE_ROUTER_LAUNCHED(moe_router_find_nonfinite);
    return MOE_OK;
}

/* Launch moe_router_find_out_of_range over v[0..n) on `stream` (the flag must be set already). */
template <typename Flag>
static inline moe_status moe_router_cuda_flag_out_of_range(const moe_context *ctx, cudaStream_t stream,
                                                           const int32_t *v, size_t n, int32_t lo, int32_t hi,
                                                           Flag *flag) {
    moe_router_find_out_of_range<<<moe_router_cuda_blocks(n, 1024), MOE_ROUTER_CUDA_THREADS, 0, stream>>>(v, n, lo,
                                                                                                          hi, flag);
    MOE_ROUTER_LAUNCHED(moe_router_find_out_of_range);
    return MOE_OK;
}

/* Bring `count` flags home: one copy and the call's one synchronization. */
template <typename Flag>
static inline moe_status moe_router_cuda_read_flags(const moe_context *ctx, cudaStream_t stream, const Flag *flags,
                                                    Flag *first, size_t count) {
    MOE_ROUTER_CUDA(cudaMemcpyAsync(first, flags, count * sizeof *first, cudaMemcpyDeviceToHost, stream));
    MOE_ROUTER_CUDA(cudaStreamSynchronize(stream));
    return MOE_OK;
}

/* Copy `bytes` from the device to the host and wait: only on a failure, to
 * fetch the bad value the message names. */
static inline moe_status moe_router_cuda_fetch(const moe_context *ctx, cudaStream_t stream, void *dst, const void *src,
                                               size_t bytes) {
    MOE_ROUTER_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
    MOE_ROUTER_CUDA(cudaStreamSynchronize(stream));
    return MOE_OK;
}

/* The device side of moe_router_check_logits_cpu: every logits[T,E] finite,
 * else the first bad one refused with moe_router_fail_logit. `flag` is one
 * word of workspace. */
static inline moe_status moe_router_cuda_check_logits(const moe_context *ctx, cudaStream_t stream,
                                                      const float *logits, int32_t T, int32_t E,
                                                      unsigned long long *flag) {
    if (moe_context_inputs_checked(ctx)) return MOE_OK; /* the host checks them, without a wait */
    const size_t n = (size_t)T * E;
    MOE_ROUTER_CUDA(cudaMemsetAsync(flag, 0xFF, sizeof *flag, stream));
    moe_status st = moe_router_cuda_flag_nonfinite(ctx, stream, logits, n, flag);
    unsigned long long first = 0;
    if (st == MOE_OK) st = moe_router_cuda_read_flags(ctx, stream, flag, &first, 1);
    if (st != MOE_OK || first == MOE_ROUTER_NO_FLAG) return st;
    float v = 0.0f;
    st = moe_router_cuda_fetch(ctx, stream, &v, logits + first, sizeof v);
    return st != MOE_OK ? st : moe_router_fail_logit(ctx, first / E, first % E, v);
}

/* The device side of moe_router_check_token_logits_cpu and, given `expert`
 * (backward), of moe_router_check_expert_entries_cpu(expert, T, k_out, lo, E),
 * with one copy for both: flags[0] and flags[1] are two words of workspace.
 * The logits are reported first, as the CPU checks them first. */
static inline moe_status moe_router_cuda_check_values(const moe_context *ctx, cudaStream_t stream,
                                                      const float *logits, int32_t T, int32_t E,
                                                      const int32_t *expert, int32_t k_out, int32_t lo,
                                                      unsigned long long *flags) {
    if (moe_context_inputs_checked(ctx)) return MOE_OK; /* the host checks them, without a wait */
    const size_t n = (size_t)T * E, nk = (size_t)T * k_out;
    MOE_ROUTER_CUDA(cudaMemsetAsync(flags, 0xFF, 2 * sizeof *flags, stream));
    moe_status st = moe_router_cuda_flag_nonfinite(ctx, stream, logits, n, &flags[0]);
    if (st == MOE_OK && expert) st = moe_router_cuda_flag_out_of_range(ctx, stream, expert, nk, lo, E, &flags[1]);
    unsigned long long first[2] = {0, 0};
    if (st == MOE_OK) st = moe_router_cuda_read_flags(ctx, stream, flags, first, 2);
    if (st != MOE_OK) return st;
    if (first[0] != MOE_ROUTER_NO_FLAG) {
        float v = 0.0f;
        st = moe_router_cuda_fetch(ctx, stream, &v, logits + first[0], sizeof v);
        return st != MOE_OK ? st : moe_router_fail_token_logit(ctx, first[0] / E, first[0] % E, v);
    }
    if (expert && first[1] != MOE_ROUTER_NO_FLAG) {
        int32_t bad = 0;
        st = moe_router_cuda_fetch(ctx, stream, &bad, expert + first[1], sizeof bad);
        return st != MOE_OK ? st : moe_router_fail_expert_entry(ctx, first[1], k_out, bad, lo, E);
    }
    return MOE_OK;
}

#endif
