/*
 * noisy_topk, CUDA path: the routing of noisy_topk.c on the device.
 *
 * Forward:
 *   perturb  one thread per (t,e): l'[t,e] = l[t,e] + sigma[t,e] n[t,e], the
 *            noise drawn with moe_rng_normal(ctx->rng, t*E + e) exactly as
 *            the CPU draws it, sigma = softplus(x[t,:] W_noise[:,e]) (a dot
 *            product over d_model per thread) or noise_std; l' = l in
 *            evaluation. It also flags the first non-finite l and l'.
 *   route    one thread per token: softk on l' (moe_topk_row and
 *            moe_softk_weights, the CPU's helpers).
 * Backward:
 *   dl'      one thread per token: dlogits = d_route_logits + softk backward.
 *   learned noise in training, deterministic passes (no atomics, every sum
 *   in a fixed order):
 *            dpre[t,e] = dl'[t,e] n[t,e] sigmoid(pre[t,e])  one thread per (t,e)
 *            dW[d,e]  += sum_t x[t,d] dpre[t,e]              a thread per (d,e) and
 *                        chunk of NOISY_DW_ROWS tokens, then one per (d,e) adds
 *                        the chunks in order (a single thread over all T tokens
 *                        took most of a training step)
 *            dx[t,d]  += sum_e dpre[t,e] W[d,e]              a block per row t, W staged
 *                        transposed in shared memory
 *
 * Bitwise agreement with the CPU: the choice of experts compares l', so l'
 * is computed with the CPU's roundings, __fmul_rn / __fadd_rn keeping the
 * compiler from fusing x*w + acc or sigma*n + l into one FMA (the CPU build
 * has none). With noise_std, and in evaluation, l' and the choice are then
 * the CPU's bit for bit. Learned sigma goes through expf and log1pf, which on
 * the device may differ from glibc's by an ulp: l' then agrees to an ulp and
 * the choice can differ only where two perturbed logits tie to within that
 * ulp. Weights and gradients agree to fp32 rounding.
 *
 * Non-finite logits (and perturbed logits, and in backward expert entries
 * outside [0, E)) are refused naming the token and expert, as on the CPU:
 * the first bad element is flagged on the device and one 16-byte copy brings
 * the flags to the host, before expert and weight are written. That copy is
 * the one synchronization of a call.
 *
 * Pointers in the arguments are device pointers (params and param_grads are
 * host arrays of device pointers); everything runs on ctx->stream.
 */
#include <moe/router_cuda.cuh>

/* The instance state exactly as noisy_topk.c defines it: both files read one struct. */
typedef struct noisy_state {
    int32_t E, K, d_model;
    int learned;
    float noise_std;
    float temperature;
    int32_t max_tokens;
} noisy_state;

/* Workspace for T tokens:
 *   flags   256 bytes   [0] first non-finite logit (t*E + e); [1] forward: first
 *                       non-finite perturbed logit, backward: first expert
 *                       entry outside [0, E) (t*K + j)
 *   dpre    [T,E] float learned noise only: dL/dpre, summed over t for dW and
 *                       over e for dx by the passes that follow
 *   partial [ceil(T / NOISY_DW_ROWS), d_model, E] float  learned noise only:
 *                       dW's sum over each chunk of tokens */
#define NOISY_DW_ROWS 128

static size_t noisy_dw_chunks(int32_t T) { return ((size_t)T + NOISY_DW_ROWS - 1) / NOISY_DW_ROWS; }

static size_t noisy_cuda_bytes_for(const noisy_state *s, int32_t T) {
    if (!s->learned) return MOE_ROUTER_CUDA_FLAG_BYTES;
    return MOE_ROUTER_CUDA_FLAG_BYTES + (size_t)T * s->E * sizeof(float) +
           noisy_dw_chunks(T) * (size_t)s->d_model * s->E * sizeof(float);
}

extern "C" size_t noisy_topk_cuda_workspace_bytes(const noisy_state *s) {
    return noisy_cuda_bytes_for(s, s->max_tokens);
}

/* ---- the noise (device copies of noisy_topk.c's) ------------------------------- */

/* softplus(z) = max(z, 0) + log1p(e^-|z|): the exponent is never positive. */
__device__ float noisy_softplus(float z) { return fmaxf(z, 0.0f) + log1pf(expf(-fabsf(z))); }

/* sigmoid(z) = 1 / (1 + e^-z), evaluated with a non-positive exponent. */
__device__ float noisy_sigmoid(float z) {
    if (z >= 0.0f) return 1.0f / (1.0f + expf(-z));
    float ez = expf(z);
    return ez / (1.0f + ez);
}

/* pre[t,e] = sum_d x[t,d] W_noise[d,e], rounded as the CPU loop rounds. */
__device__ float noisy_pre(const float *x_t, const float *w_noise, int32_t d_model, int32_t E, int32_t e) {
    float acc = 0.0f;
    for (int32_t d = 0; d < d_model; ++d) acc = __fadd_rn(acc, __fmul_rn(x_t[d], w_noise[(size_t)d * E + e]));
    return acc;
}

/* ---- kernels ------------------------------------------------------------------- */

/* l' = l + sigma n in training, l in evaluation; flags[0] = first non-finite
 * logit, flags[1] = first non-finite l' (atomicMin: the first in row-major
 * order, the one the CPU loop reports). w_noise = NULL: sigma = noise_std. */
__global__ void noisy_perturb_kernel(const float *logits, int32_t T, int32_t E, int training, moe_rng_key key,
                                     float noise_std, const float *x, const float *w_noise, int32_t d_model,
                                     float *route_logits, unsigned long long *flags) {
    const size_t n = (size_t)T * E;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int32_t t = (int32_t)(i / E), e = (int32_t)(i % E);
        const float l = logits[i];
        if (!isfinite(l)) atomicMin(&flags[0], (unsigned long long)i);
        float lp = l; /* in evaluation l' is l exactly, not l + 0 * n */
        if (training) {
            const float noise = moe_rng_normal(key, (uint64_t)t * (uint64_t)E + (uint64_t)e);
            const float sigma =
                w_noise ? noisy_softplus(noisy_pre(x + (size_t)t * d_model, w_noise, d_model, E, e)) : noise_std;
            lp = __fadd_rn(l, __fmul_rn(sigma, noise));
        }
        route_logits[i] = lp;
        if (!isfinite(lp)) atomicMin(&flags[1], (unsigned long long)i);
    }
}

/* softk on l': the top-K of l', weights softmax(l'_selected / temperature). */
__global__ void noisy_route_kernel(const float *route_logits, int32_t T, int32_t E, int32_t K, float temperature,
                                   int32_t *expert_out, float *weight_out) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *lp = route_logits + (size_t)t * E;
    int32_t *expert = expert_out + (size_t)t * K;
    moe_topk_row(lp, E, K, expert);
    moe_softk_weights(lp, expert, K, temperature, weight_out + (size_t)t * K);
}

/* dl' = d_route_logits (or 0) + the softk backward of dweight; dl'/dl = 1, so
 * dl' is also dlogits. */
__global__ void noisy_dlp_kernel(const int32_t *expert, const float *weight, const float *dweight,
                                 const float *d_route_logits, int32_t T, int32_t E, int32_t K, float temperature,
                                 float *dlogits) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    float *dlp = dlogits + (size_t)t * E;
    for (int32_t e = 0; e < E; ++e) dlp[e] = d_route_logits ? d_route_logits[(size_t)t * E + e] : 0.0f;
    moe_softk_weights_backward(expert + (size_t)t * K, weight + (size_t)t * K, dweight + (size_t)t * K, K,
                               temperature, dlp);
}

/* dpre[t,e] = dsigma sigmoid(pre), dsigma = dl'[t,e] n[t,e] (forward's draw). */
__global__ void noisy_dpre_kernel(const float *dlogits, const float *x, const float *w_noise, int32_t T, int32_t E,
                                  int32_t d_model, moe_rng_key key, float *dpre) {
    const size_t n = (size_t)T * E;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int32_t t = (int32_t)(i / E), e = (int32_t)(i % E);
        const float noise = moe_rng_normal(key, (uint64_t)t * (uint64_t)E + (uint64_t)e);
        const float dsigma = dlogits[i] * noise;
        dpre[i] = dsigma * noisy_sigmoid(noisy_pre(x + (size_t)t * d_model, w_noise, d_model, E, e));
    }
}

/* partial[c][d,e] = sum over the tokens t of chunk c (ascending) of
 * x[t,d] dpre[t,e]; grid (ceil(d_model E / threads), chunks). */
__global__ void noisy_dw_partial_kernel(const float *x, const float *dpre, int32_t T, int32_t E, int32_t d_model,
                                        float *partial) {
    const size_t n = (size_t)d_model * E;
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int32_t d = (int32_t)(i / E), e = (int32_t)(i % E);
    const int32_t t0 = (int32_t)blockIdx.y * NOISY_DW_ROWS, t1 = min(T, t0 + NOISY_DW_ROWS);
    float acc = 0.0f;
#pragma unroll 8 /* loads in flight; the sum stays in token order */
    for (int32_t t = t0; t < t1; ++t) acc += x[(size_t)t * d_model + d] * dpre[(size_t)t * E + e];
    partial[(size_t)blockIdx.y * n + i] = acc;
}

/* dW[d,e] += the chunks' sums, in chunk order. */
__global__ void noisy_dw_finish_kernel(const float *partial, size_t nchunks, size_t n, float *dW) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float acc = 0.0f;
#pragma unroll 8
        for (size_t c = 0; c < nchunks; ++c) acc += partial[c * n + i];
        dW[i] += acc;
    }
}

/* dx[t,d] += sum_e dpre[t,e] W[d,e], e ascending as in the CPU loop. A
 * block strides over rows t of dx, its threads over d (no index division,
 * dx read and written coalesced). With `staged`, the block first copies W
 * transposed into shared memory (sW[e][d]), so a warp's reads of W are
 * consecutive words rather than one E-float stride per thread. */
constexpr size_t NOISY_DX_SHARED_MAX = 32 * 1024;

template <bool staged>
__global__ void noisy_dx_kernel(const float *dpre, const float *w_noise, int32_t T, int32_t E, int32_t d_model,
                                float *dx) {
    extern __shared__ float sW[];
    if (staged) {
        for (int32_t i = threadIdx.x; i < E * d_model; i += blockDim.x) {
            const int32_t e = i / d_model, d = i - e * d_model;
            sW[i] = w_noise[(size_t)d * E + e];
        }
        __syncthreads();
    }
    for (int32_t t = blockIdx.x; t < T; t += gridDim.x) {
        const float *dp = dpre + (size_t)t * E;
        float *dxr = dx + (size_t)t * d_model;
        for (int32_t d = threadIdx.x; d < d_model; d += blockDim.x) {
            float acc = dxr[d];
            for (int32_t e = 0; e < E; ++e)
                acc += dp[e] * (staged ? sW[(size_t)e * d_model + d] : w_noise[(size_t)d * E + e]);
            dxr[d] = acc;
        }
    }
}

/* ---- host side ------------------------------------------------------------------- */

/* noisy_check_common's checks, against this path's workspace (the logits'
 * values are checked on the device). */
static moe_status noisy_cuda_check_common(const noisy_state *s, const moe_context *ctx, int32_t T, int32_t E,
                                          int32_t k_out, const float *logits, const float *x, float *const *params) {
    moe_status st = moe_router_check_shape(ctx, T, E, k_out, s->E, s->K);
    if (st != MOE_OK || T == 0) return st;
    if (!logits) return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "logits must not be NULL");
    if (s->learned && ctx->training && (!x || !params || !params[0]))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "learned noise in training needs x and the w_noise parameter (got NULL)");
    return moe_router_check_workspace_for(ctx, noisy_cuda_bytes_for(s, T), T, s->max_tokens);
}

/* Brings the perturb kernel's two flags home (the one copy back of a call)
 * and turns the first set one into the CPU's message: logits first, as the
 * CPU checks them first, then the perturbed logits. */
static moe_status noisy_cuda_read_perturb_flags(const moe_context *ctx, cudaStream_t stream, const float *logits,
                                                const float *route_logits, int32_t E) {
    unsigned long long first[2] = {0, 0};
    moe_status st =
        moe_router_cuda_read_flags(ctx, stream, (const unsigned long long *)ctx->workspace, first, 2);
    if (st != MOE_OK) return st;
    float v = 0.0f; /* only on failure: fetch the value to name it */
    if (first[0] != MOE_ROUTER_NO_FLAG) {
        st = moe_router_cuda_fetch(ctx, stream, &v, logits + first[0], sizeof v);
        return st != MOE_OK ? st : moe_router_fail_token_logit(ctx, first[0] / E, first[0] % E, v);
    }
    if (first[1] == MOE_ROUTER_NO_FLAG) return MOE_OK;
    st = moe_router_cuda_fetch(ctx, stream, &v, route_logits + first[1], sizeof v);
    if (st != MOE_OK) return st;
    return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                    "perturbed logit of token %d, expert %d is %g; check x and w_noise", (int)(first[1] / E),
                    (int)(first[1] % E), (double)v);
}

static moe_status noisy_cuda_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const noisy_state *s = (const noisy_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = noisy_cuda_check_common(s, ctx, a->T, a->E, a->k_out, a->logits, a->x, a->params);
    if (st != MOE_OK || a->T == 0) return st;
    if (!a->expert || !a->weight || !a->route_logits)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "forward: expert, weight and route_logits must not be NULL");
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    const int32_t T = a->T, E = s->E, K = s->K;
    const float *w_noise = s->learned && ctx->training ? a->params[0] : NULL;
    unsigned long long *flags = (unsigned long long *)ctx->workspace;

    MOE_ROUTER_CUDA(cudaMemsetAsync(flags, 0xFF, 2 * sizeof *flags, stream));
    noisy_perturb_kernel<<<moe_router_cuda_row_blocks((size_t)T * E), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
        a->logits, T, E, ctx->training != 0, ctx->rng, s->noise_std, a->x, w_noise, s->d_model, a->route_logits,
        flags);
    MOE_ROUTER_LAUNCHED(noisy_perturb_kernel);
    /* route_logits is written by now; expert and weight only once l and l'
     * are known to be finite (or the host checks both after the step). */
    if (!moe_context_inputs_checked(ctx)) {
        st = noisy_cuda_read_perturb_flags(ctx, stream, a->logits, a->route_logits, E);
        if (st != MOE_OK) return st;
    }

    noisy_route_kernel<<<moe_router_cuda_row_blocks((size_t)T), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
        a->route_logits, T, E, K, s->temperature, a->expert, a->weight);
    MOE_ROUTER_LAUNCHED(noisy_route_kernel);
    return MOE_OK;
}

static moe_status noisy_cuda_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const noisy_state *s = (const noisy_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = noisy_cuda_check_common(s, ctx, a->T, a->E, a->k_out, a->logits, a->x, a->params);
    if (st != MOE_OK || a->T == 0) return st;
    const int32_t T = a->T, E = s->E, K = s->K, D = s->d_model;
    const int noise_path = s->learned && ctx->training;
    if (!a->expert || !a->weight || !a->dweight || !a->dlogits)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "backward: expert, weight, dweight and dlogits must not be NULL");
    if (noise_path && (!a->dx || !a->param_grads || !a->param_grads[0]))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "backward: learned noise in training needs dx and the w_noise gradient (got NULL)");
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    /* Non-finite logits and expert entries outside [0, E), in one copy back. */
    st = moe_router_cuda_check_values(ctx, stream, a->logits, T, E, a->expert, K, 0,
                                      (unsigned long long *)ctx->workspace);
    if (st != MOE_OK) return st;

    noisy_dlp_kernel<<<moe_router_cuda_row_blocks((size_t)T), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
        a->expert, a->weight, a->dweight, a->d_route_logits, T, E, K, s->temperature, a->dlogits);
    MOE_ROUTER_LAUNCHED(noisy_dlp_kernel);
    if (!noise_path) return MOE_OK;

    float *dpre = (float *)((char *)ctx->workspace + MOE_ROUTER_CUDA_FLAG_BYTES);
    const float *W = a->params[0];
    noisy_dpre_kernel<<<moe_router_cuda_row_blocks((size_t)T * E), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
        a->dlogits, a->x, W, T, E, D, ctx->rng, dpre);
    MOE_ROUTER_LAUNCHED(noisy_dpre_kernel);
    float *partial = dpre + (size_t)T * E;
    const size_t nchunks = noisy_dw_chunks(T), nw = (size_t)D * E;
    const dim3 dw_grid((unsigned)((nw + MOE_ROUTER_CUDA_THREADS - 1) / MOE_ROUTER_CUDA_THREADS), (unsigned)nchunks);
    noisy_dw_partial_kernel<<<dw_grid, MOE_ROUTER_CUDA_THREADS, 0, stream>>>(a->x, dpre, T, E, D, partial);
    MOE_ROUTER_LAUNCHED(noisy_dw_partial_kernel);
    noisy_dw_finish_kernel<<<moe_router_cuda_blocks(nw, 1u << 16), MOE_ROUTER_CUDA_THREADS, 0, stream>>>(
        partial, nchunks, nw, a->param_grads[0]);
    MOE_ROUTER_LAUNCHED(noisy_dw_finish_kernel);
    const size_t w_bytes = (size_t)D * E * sizeof(float);
    if (w_bytes <= NOISY_DX_SHARED_MAX) { /* a few blocks per SM, each staging W once */
        const unsigned blocks = (unsigned)(T < 512 ? T : 512);
        noisy_dx_kernel<true><<<blocks, MOE_ROUTER_CUDA_THREADS, w_bytes, stream>>>(dpre, W, T, E, D, a->dx);
    } else {
        const unsigned blocks = (unsigned)(T < 65535 ? T : 65535);
        noisy_dx_kernel<false><<<blocks, MOE_ROUTER_CUDA_THREADS, 0, stream>>>(dpre, W, T, E, D, a->dx);
    }
    MOE_ROUTER_LAUNCHED(noisy_dx_kernel);
    return MOE_OK;
}

extern "C" {
extern const moe_router_impl noisy_topk_cuda_impl;
const moe_router_impl noisy_topk_cuda_impl = {noisy_cuda_forward, noisy_cuda_backward};
}
