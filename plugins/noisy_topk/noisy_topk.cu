/*
 * noisy_topk, CUDA path: the routing of noisy_topk.c on the device.
 *
 * Learned noise in training (sigma = softplus(pre), pre = x W_noise) runs on
 * tiles: a block takes `tokens` consecutive tokens (32 at E = 8) with one
 * thread per (token, expert), expert-major (a warp is 32 tokens of one
 * expert). It stages W_noise transposed (sW[e][d], read by every tile) and
 * its tokens' rows of x (sX[r][d], 16-byte coalesced loads) in shared
 * memory, with row strides of 4 mod 32 floats so that a warp's 16-byte reads
 * of 8 different rows fall in different banks; each thread then runs its own
 * sequential sum over d from shared memory (noisy_pre_tile), so that the
 * memory traffic is one read of x per pass, not one per expert.
 *
 * Forward:
 *   tile     l'[t,e] = l[t,e] + sigma[t,e] n[t,e], the noise drawn with
 *            moe_rng_normal(ctx->rng, t*E + e) exactly as the CPU draws it.
 *            When the host checks the inputs itself (the model's training
 *            steps) the same block then routes its tokens (softk on l', the
 *            CPU's moe_topk_row and moe_softk_weights, one thread per token
 *            on l' kept in shared memory); otherwise it flags the first
 *            non-finite l and l' and the route kernel follows once the flags
 *            are read.
 *   perturb  one thread per (t,e), x and W read from global memory: l' for
 *            fixed noise (sigma = noise_std), in evaluation (l' = l), and for
 *            learned noise when the tile does not fit (see below).
 *   route    one thread per token: softk on l'.
 * Backward, learned noise in training, one tile kernel:
 *            dl'[t,:] = d_route_logits + softk backward   one thread per token
 *            dlogits  = dl'                                (dl'/dl = 1)
 *            dpre[t,e] = dl'[t,e] n[t,e] sigmoid(pre[t,e])  n and sigmoid(pre)
 *                        read from the saved buffer, which the forward filled
 *                        (without one, pre and n computed again as in the
 *                        forward), dpre kept in shared memory
 *            dx[t,d]  += sum_e dpre[t,e] W[d,e]          e ascending, 16 bytes of
 *                        dx per thread and step
 *            partial[tile][d,e] = sum_t x[t,d] dpre[t,e]  a thread per d (and
 *                        group of 8 experts) with 8 sums, tokens ascending
 *   then dw_finish: dW[d,e] += the tiles' partials, each of 16 lanes adding a
 *   contiguous range of tiles in ascending order and the lanes added in lane
 *   order (no atomics: the same floats every run). Folding this sum into the
 *   tile kernel (the last block of each lane adds the lane, the last lane
 *   the lanes, counted with integer tickets) was measured slower on the H100:
 *   the tile kernel grew by 6.3 us per call against 4.4 us for dw_finish.
 * Without learned noise the backward is only dl' (noisy_dlp_kernel).
 *
 * The tile needs d_model % 4 == 0, x and dx 16-byte aligned, at most 32
 * experts and at least 8 tokens' rows plus W in 48 KB of shared memory
 * (d_model up to ~900 at E = 8). Otherwise learned noise takes the
 * global-memory kernels: perturb, then route; in backward dl', dpre (one
 * thread per (t,e)), dw_partial (a thread per (d,e) and chunk of
 * NOISY_DW_ROWS tokens), dw_finish, and dx (a block per row t, W staged
 * transposed in shared memory).
 *
 * Bitwise agreement with the CPU: the choice of experts compares l', so l'
 * is computed with the CPU's roundings, __fmul_rn / __fadd_rn keeping the
 * compiler from fusing x*w + acc or sigma*n + l into one FMA (the CPU build
 * has none), and pre summed over d in the CPU's order in both paths. With
 * noise_std, and in evaluation, l' and the choice are then the CPU's bit for
 * bit. Learned sigma goes through expf and log1pf, which on the device may
 * differ from glibc's by an ulp: l' then agrees to an ulp and the choice can
 * differ only where two perturbed logits tie to within that ulp. Weights and
 * gradients agree to fp32 rounding.
 *
 * Non-finite logits (and perturbed logits, and in backward expert entries
 * outside [0, E)) are refused naming the token and expert, as on the CPU:
 * the first bad element is flagged on the device and one 16-byte copy brings
 * the flags to the host, before expert and weight are written. That copy is
 * the one synchronization of a call; when the host checks the inputs itself
 * (moe_context_inputs_checked) there is neither the copy nor the flags.
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

/* The saved buffer (noisy_topk.c): its parts for T tokens, NULL when the
 * host passed none (older host, or no learned noise). */
typedef struct noisy_saved {
    float *sig, *noise;
} noisy_saved;
extern "C" noisy_saved noisy_saved_fwd(const noisy_state *s, const moe_router_fwd_args *a);
extern "C" noisy_saved noisy_saved_bwd(const noisy_state *s, const moe_router_bwd_args *a);

/* ---- the tile's shape and shared-memory layout ------------------------------------ */

#define NOISY_TILE_THREADS 256     /* at most tokens x E threads per block */
#define NOISY_TILE_TOKENS 32       /* at most this many tokens per tile: a warp of one expert */
#define NOISY_TILE_MIN_TOKENS 8    /* fewer and the global-memory path is as good */
#define NOISY_TILE_SHARED_MAX (48 * 1024) /* the default limit, no opt-in needed */
#define NOISY_DW_GROUP 8           /* dW sums per thread in the tile's partial */
#define NOISY_STAGE_BATCH 8        /* loads in flight per thread while staging (8: all of a 32 x 256 tile) */

/* A tile plan: tokens == 0 means the tile does not fit (global-memory path).
 * Shared memory, in floats from the start:
 *   sW  [E][stride]             W_noise transposed
 *   sX  [tokens][stride]        the tile's rows of x
 *   sP  [tokens][dpre_stride]   dpre (backward), 16-byte rows for the dW sums
 *   sL  [tokens][E + 1]         l' (forward) or dl' (backward), one row per
 *                               token's thread: an odd stride, no bank conflicts
 *   sI  [tokens][K]             int32: the chosen experts (forward) */
struct noisy_tile {
    int32_t E, K, d_model, tokens, stride, dpre_stride;
    __host__ __device__ size_t x_at() const { return (size_t)E * stride; }
    __host__ __device__ size_t dpre_at() const { return x_at() + (size_t)tokens * stride; }
    __host__ __device__ size_t row_at() const { return dpre_at() + (size_t)tokens * dpre_stride; }
    __host__ __device__ size_t idx_at() const { return row_at() + (size_t)tokens * (E + 1); }
    __host__ __device__ size_t bytes() const { return (idx_at() + (size_t)tokens * K) * sizeof(float); }
};

static noisy_tile noisy_tile_plan(int32_t E, int32_t K, int32_t d_model) {
    noisy_tile p;
    memset(&p, 0, sizeof p);
    p.E = E;
    p.K = K;
    p.d_model = d_model;
    if (d_model <= 0 || d_model % 4 != 0 || E <= 0 || E > NOISY_TILE_THREADS / NOISY_TILE_MIN_TOKENS ||
        d_model > NOISY_TILE_SHARED_MAX)
        return p;
    /* 4 mod 32: rows r and r+1 start 4 banks apart, so 8 rows' 16-byte reads
     * cover all 32 banks once; a multiple of 4 keeps rows 16-byte aligned. */
    p.stride = (d_model + 31) / 32 * 32 + 4;
    p.dpre_stride = (E + NOISY_DW_GROUP - 1) / NOISY_DW_GROUP * NOISY_DW_GROUP;
    p.tokens = NOISY_TILE_THREADS / E < NOISY_TILE_TOKENS ? NOISY_TILE_THREADS / E : NOISY_TILE_TOKENS;
    while (p.tokens >= NOISY_TILE_MIN_TOKENS && p.bytes() > NOISY_TILE_SHARED_MAX) --p.tokens;
    if (p.tokens < NOISY_TILE_MIN_TOKENS) p.tokens = 0;
    return p;
}

static int noisy_aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Workspace for T tokens:
 *   flags   256 bytes   [0] first non-finite logit (t*E + e); [1] forward: first
 *                       non-finite perturbed logit, backward: first expert
 *                       entry outside [0, E) (t*K + j)
 *   dpre    [T,E] float learned noise, global-memory path: dL/dpre, summed over
 *                       t for dW and over e for dx by the passes that follow
 *   partial [chunks, d_model, E] float  learned noise: dW's sum over each tile
 *                       of tokens (tile path) or each chunk of NOISY_DW_ROWS
 *                       tokens (global-memory path), whichever has more */
#define NOISY_DW_ROWS 128

static size_t noisy_dw_chunks(int32_t T) { return ((size_t)T + NOISY_DW_ROWS - 1) / NOISY_DW_ROWS; }

static size_t noisy_tile_count(const noisy_tile *p, int32_t T) {
    return ((size_t)T + (size_t)p->tokens - 1) / (size_t)p->tokens;
}

static size_t noisy_cuda_bytes_for(const noisy_state *s, int32_t T) {
    if (!s->learned) return MOE_ROUTER_CUDA_FLAG_BYTES;
    const noisy_tile tile = noisy_tile_plan(s->E, s->K, s->d_model);
    size_t chunks = noisy_dw_chunks(T);
    if (tile.tokens > 0 && noisy_tile_count(&tile, T) > chunks) chunks = noisy_tile_count(&tile, T);
    return MOE_ROUTER_CUDA_FLAG_BYTES + (size_t)T * s->E * sizeof(float) +
           chunks * (size_t)s->d_model * s->E * sizeof(float);
}

extern "C" size_t noisy_topk_cuda_workspace_bytes(const noisy_state *s) {
    return noisy_cuda_bytes_for(s, s->max_tokens);
}

/* ---- the noise (device copies of noisy_topk.c's) ------------------------------- */

/* sigmoid(z) = 1 / (1 + e^-z), evaluated with a non-positive exponent. */
__device__ float noisy_sigmoid(float z) {
    if (z >= 0.0f) return 1.0f / (1.0f + expf(-z));
    float ez = expf(z);
    return ez / (1.0f + ez);
}

/* n[t,e], the draw the CPU makes for element t*E + e. */
__device__ float noisy_noise(moe_rng_key key, int32_t t, int32_t E, int32_t e) {
    return moe_rng_normal(key, (uint64_t)t * (uint64_t)E + (uint64_t)e);
}

/* l' = l + sigma n, rounded as the CPU rounds it. */
__device__ float noisy_perturbed(float l, float sigma, float noise) { return __fadd_rn(l, __fmul_rn(sigma, noise)); }

/* softplus(z) = max(z, 0) + log1p(e^-|z|) (the exponent is never positive),
 * and sigmoid(z) into *sig, from one exponential: expf(-|z|) is
 * the exponent noisy_sigmoid takes on either side of 0, so *sig is
 * noisy_sigmoid(z) bit for bit. */
__device__ float noisy_softplus_sigmoid(float z, float *sig) {
    const float ez = expf(-fabsf(z));
    *sig = z >= 0.0f ? 1.0f / (1.0f + ez) : ez / (1.0f + ez);
    return fmaxf(z, 0.0f) + log1pf(ez);
}

/* dpre = dsigma sigmoid(pre), dsigma = dl' n; sig = sigmoid(pre). */
__device__ float noisy_dpre_value(float dl, float noise, float sig) {
    const float dsigma = dl * noise;
    return dsigma * sig;
}

/* pre[t,e] = sum_d x[t,d] W_noise[d,e], rounded as the CPU loop rounds, x and W in global memory. */
__device__ float noisy_pre(const float *x_t, const float *w_noise, int32_t d_model, int32_t E, int32_t e) {
    float acc = 0.0f;
    for (int32_t d = 0; d < d_model; ++d) acc = __fadd_rn(acc, __fmul_rn(x_t[d], w_noise[(size_t)d * E + e]));
    return acc;
}

/* The same sum from the tile: x_row = sX[r], w_col = sW[e], 16-byte aligned,
 * d_model % 4 == 0. Each 16-byte pair is added in d order, so the result is
 * noisy_pre's bit for bit. */
__device__ float noisy_pre_tile(const float *x_row, const float *w_col, int32_t d_model) {
    const float4 *x4 = (const float4 *)x_row, *w4 = (const float4 *)w_col;
    float acc = 0.0f;
#pragma unroll 4 /* shared loads ahead of the adds; the sum stays in d order */
    for (int32_t q = 0; q < d_model / 4; ++q) {
        const float4 a = x4[q], b = w4[q];
        acc = __fadd_rn(acc, __fmul_rn(a.x, b.x));
        acc = __fadd_rn(acc, __fmul_rn(a.y, b.y));
        acc = __fadd_rn(acc, __fmul_rn(a.z, b.z));
        acc = __fadd_rn(acc, __fmul_rn(a.w, b.w));
    }
    return acc;
}

/* The block's shared memory, and which (token, expert) its thread is. */
struct noisy_tile_view {
    float *sW, *sX, *sP, *sL;
    int32_t *sI;
    int32_t t0, rows;      /* the tile's first token and its number of tokens */
    int32_t local, e;      /* this thread's token (within the tile) and expert */
    bool active;           /* local < rows (the last tile may be short) */
};

/* Lays out the shared memory of tile blockIdx.x and copies W_noise
 * (transposed) and the tile's rows of x into it. The caller syncs before
 * reading them. */
__device__ noisy_tile_view noisy_stage_tile(const noisy_tile &p, const float *x, const float *w_noise, int32_t T,
                                            float *smem) {
    noisy_tile_view v;
    v.sW = smem;
    v.sX = smem + p.x_at();
    v.sP = smem + p.dpre_at();
    v.sL = smem + p.row_at();
    v.sI = (int32_t *)(smem + p.idx_at());
    v.t0 = (int32_t)blockIdx.x * p.tokens;
    v.rows = min(p.tokens, T - v.t0);
    v.e = (int32_t)threadIdx.x / p.tokens;
    v.local = (int32_t)threadIdx.x - v.e * p.tokens;
    v.active = v.local < v.rows;
    const int32_t tid = threadIdx.x, nthreads = blockDim.x;
    /* Each thread's loads of a batch are all issued before its stores, so
     * several are in flight at once. W is read coalesced and written
     * transposed: a warp's 32 stores land in 32 different banks (4 rows of d
     * by 8 experts, rows 4 banks apart). */
    const int32_t nw = p.d_model * p.E;
    for (int32_t j0 = tid; j0 < nw; j0 += NOISY_STAGE_BATCH * nthreads) {
        float w[NOISY_STAGE_BATCH];
#pragma unroll
        for (int32_t b = 0; b < NOISY_STAGE_BATCH; ++b) {
            const int32_t j = j0 + b * nthreads;
            w[b] = j < nw ? w_noise[j] : 0.0f;
        }
#pragma unroll
        for (int32_t b = 0; b < NOISY_STAGE_BATCH; ++b) {
            const int32_t j = j0 + b * nthreads;
            if (j >= nw) break;
            const int32_t d = j / p.E, e = j - d * p.E;
            v.sW[(size_t)e * p.stride + d] = w[b];
        }
    }
    const int32_t d4 = p.d_model / 4, nx = v.rows * d4;
    const float4 *x4 = (const float4 *)(x + (size_t)v.t0 * p.d_model); /* the tile's rows are contiguous */
    for (int32_t j0 = tid; j0 < nx; j0 += NOISY_STAGE_BATCH * nthreads) {
        float4 xv[NOISY_STAGE_BATCH];
#pragma unroll
        for (int32_t b = 0; b < NOISY_STAGE_BATCH; ++b) {
            const int32_t j = j0 + b * nthreads;
            if (j < nx) xv[b] = x4[j];
        }
#pragma unroll
        for (int32_t b = 0; b < NOISY_STAGE_BATCH; ++b) {
            const int32_t j = j0 + b * nthreads;
            if (j >= nx) break;
            const int32_t r = j / d4, c = j - r * d4;
            *(float4 *)(v.sX + (size_t)r * p.stride + 4 * c) = xv[b];
        }
    }
    return v;
}

/* Routes one token: the top-K of its l' into idx (then expert) and their
 * softk weights. */
__device__ void noisy_route_row(const float *lp, int32_t E, int32_t K, float temperature, int32_t *idx,
                                int32_t *expert, float *weight) {
    moe_topk_row(lp, E, K, idx);
    moe_softk_weights(lp, idx, K, temperature, weight);
    if (expert != idx)
        for (int32_t j = 0; j < K; ++j) expert[j] = idx[j];
}

/* ---- kernels ------------------------------------------------------------------- */

/* l' = l + sigma n in training, l in evaluation; flags (when not NULL)[0] =
 * first non-finite logit, [1] = first non-finite l' (atomicMin: the first in
 * row-major order, the one the CPU loop reports). w_noise = NULL: sigma =
 * noise_std. */
__global__ void noisy_perturb_kernel(const float *logits, int32_t T, int32_t E, int training, moe_rng_key key,
                                     float noise_std, const float *x, const float *w_noise, int32_t d_model,
                                     float *route_logits, unsigned long long *flags, noisy_saved saved) {
    const size_t n = (size_t)T * E;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int32_t t = (int32_t)(i / E), e = (int32_t)(i % E);
        const float l = logits[i];
        if (flags && !isfinite(l)) atomicMin(&flags[0], (unsigned long long)i);
        float lp = l; /* in evaluation l' is l exactly, not l + 0 * n */
        if (training) {
            const float noise = noisy_noise(key, t, E, e);
            float sigma = noise_std, sig;
            if (w_noise) {
                sigma = noisy_softplus_sigmoid(noisy_pre(x + (size_t)t * d_model, w_noise, d_model, E, e), &sig);
                if (saved.sig) {
                    saved.sig[i] = sig;
                    saved.noise[i] = noise;
                }
            }
            lp = noisy_perturbed(l, sigma, noise);
        }
        route_logits[i] = lp;
        if (flags && !isfinite(lp)) atomicMin(&flags[1], (unsigned long long)i);
    }
}

/* The forward of learned noise in training on tiles: l' as noisy_perturb_kernel
 * computes it, and with `route` the routing of the tile's tokens (the host
 * checks l and l' itself, so expert and weight may be written at once). */
template <bool route>
__global__ void __launch_bounds__(NOISY_TILE_THREADS)
    noisy_forward_tile_kernel(noisy_tile p, const float *logits, int32_t T, moe_rng_key key, const float *x,
                              const float *w_noise, float temperature, float *route_logits, int32_t *expert_out,
                              float *weight_out, unsigned long long *flags, noisy_saved saved) {
    extern __shared__ float4 noisy_smem4[];
    const noisy_tile_view v = noisy_stage_tile(p, x, w_noise, T, (float *)noisy_smem4);
    __syncthreads();
    const int32_t E = p.E;
    if (v.active) {
        const int32_t t = v.t0 + v.local;
        const size_t i = (size_t)t * E + v.e;
        const float l = logits[i];
        if (flags && !isfinite(l)) atomicMin(&flags[0], (unsigned long long)i);
        const float pre = noisy_pre_tile(v.sX + (size_t)v.local * p.stride, v.sW + (size_t)v.e * p.stride, p.d_model);
        const float noise = noisy_noise(key, t, E, v.e);
        float sig;
        const float lp = noisy_perturbed(l, noisy_softplus_sigmoid(pre, &sig), noise);
        if (saved.sig) {
            saved.sig[i] = sig;
            saved.noise[i] = noise;
        }
        route_logits[i] = lp;
        if (flags && !isfinite(lp)) atomicMin(&flags[1], (unsigned long long)i);
        if (route) v.sL[(size_t)v.local * (E + 1) + v.e] = lp;
    }
    if (!route) return;
    __syncthreads();
    const int32_t r = threadIdx.x;
    if (r < v.rows) {
        const size_t t = (size_t)(v.t0 + r);
        noisy_route_row(v.sL + (size_t)r * (E + 1), E, p.K, temperature, v.sI + (size_t)r * p.K,
                        expert_out + t * p.K, weight_out + t * p.K);
    }
}

/* softk on l': the top-K of l', weights softmax(l'_selected / temperature). */
__global__ void noisy_route_kernel(const float *route_logits, int32_t T, int32_t E, int32_t K, float temperature,
                                   int32_t *expert_out, float *weight_out) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *lp = route_logits + (size_t)t * E;
    int32_t *expert = expert_out + (size_t)t * K;
    noisy_route_row(lp, E, K, temperature, expert, expert, weight_out + (size_t)t * K);
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

/* The backward of learned noise in training on tiles: dl' (into dlogits),
 * dpre, dx += dpre W^T and the tile's partial of dW = x^T dpre, from one
 * staging of x and W (see the top). */
__global__ void __launch_bounds__(NOISY_TILE_THREADS)
    noisy_backward_tile_kernel(noisy_tile p, int32_t T, moe_rng_key key, const float *x, const float *w_noise,
                               const int32_t *expert, const float *weight, const float *dweight,
                               const float *d_route_logits, float temperature, float *dlogits, float *dx,
                               float *partial, noisy_saved saved) {
    extern __shared__ float4 noisy_smem4[];
    const noisy_tile_view v = noisy_stage_tile(p, x, w_noise, T, (float *)noisy_smem4);
    const int32_t E = p.E, tid = threadIdx.x, nthreads = blockDim.x;
    const int32_t t = v.t0 + v.local;
    const size_t i = (size_t)t * E + v.e;
    float *dl_row = v.sL + (size_t)v.local * (E + 1);
    if (v.active) dl_row[v.e] = d_route_logits ? d_route_logits[i] : 0.0f;
    /* sP's columns past E feed sums that are never stored; zeros keep them finite. */
    for (int32_t j = tid; j < p.tokens * p.dpre_stride; j += nthreads) v.sP[j] = 0.0f;
    __syncthreads();
    if (tid < v.rows) {
        const size_t tr = (size_t)(v.t0 + tid);
        moe_softk_weights_backward(expert + tr * p.K, weight + tr * p.K, dweight + tr * p.K, p.K, temperature,
                                   v.sL + (size_t)tid * (E + 1));
    }
    __syncthreads();
    if (v.active) {
        const float dl = dl_row[v.e];
        dlogits[i] = dl;
        float sig, noise;
        if (saved.sig) { /* the forward's values */
            sig = saved.sig[i];
            noise = saved.noise[i];
        } else {
            sig = noisy_sigmoid(
                noisy_pre_tile(v.sX + (size_t)v.local * p.stride, v.sW + (size_t)v.e * p.stride, p.d_model));
            noise = noisy_noise(key, t, E, v.e);
        }
        v.sP[(size_t)v.local * p.dpre_stride + v.e] = noisy_dpre_value(dl, noise, sig);
    }
    __syncthreads();

    /* dx[t, 4c..4c+3] += sum_e dpre[t,e] W[4c..4c+3, e], e ascending. The
     * loads of a batch go out before its stores, so several are in flight. */
    const int32_t d4 = p.d_model / 4, nx = v.rows * d4;
    constexpr int32_t batch = 4;
    for (int32_t j0 = tid; j0 < nx; j0 += batch * nthreads) {
        float4 acc[batch];
#pragma unroll
        for (int32_t b = 0; b < batch; ++b) {
            const int32_t j = j0 + b * nthreads;
            if (j < nx) acc[b] = ((const float4 *)(dx + (size_t)v.t0 * p.d_model))[j];
        }
#pragma unroll
        for (int32_t b = 0; b < batch; ++b) {
            const int32_t j = j0 + b * nthreads;
            if (j >= nx) break;
            const int32_t r = j / d4, c = j - r * d4;
            const float *dp = v.sP + (size_t)r * p.dpre_stride;
            for (int32_t e = 0; e < E; ++e) {
                const float pe = dp[e];
                const float4 w = *(const float4 *)(v.sW + (size_t)e * p.stride + 4 * c);
                acc[b].x += pe * w.x;
                acc[b].y += pe * w.y;
                acc[b].z += pe * w.z;
                acc[b].w += pe * w.w;
            }
            ((float4 *)(dx + (size_t)v.t0 * p.d_model))[j] = acc[b];
        }
    }

    /* partial[tile][d, e] = sum over the tile's tokens (ascending) of
     * x[t,d] dpre[t,e]: a thread per d and group of 8 experts. */
    const int32_t groups = p.dpre_stride / NOISY_DW_GROUP;
    float *out = partial + (size_t)blockIdx.x * p.d_model * E;
    for (int32_t j = tid; j < p.d_model * groups; j += nthreads) {
        const int32_t d = j / groups, g = j - d * groups;
        float acc[NOISY_DW_GROUP];
#pragma unroll
        for (int32_t q = 0; q < NOISY_DW_GROUP; ++q) acc[q] = 0.0f;
        for (int32_t r = 0; r < v.rows; ++r) {
            const float xv = v.sX[(size_t)r * p.stride + d];
            const float4 *dp = (const float4 *)(v.sP + (size_t)r * p.dpre_stride + g * NOISY_DW_GROUP);
            const float4 lo = dp[0], hi = dp[1];
            acc[0] += xv * lo.x;
            acc[1] += xv * lo.y;
            acc[2] += xv * lo.z;
            acc[3] += xv * lo.w;
            acc[4] += xv * hi.x;
            acc[5] += xv * hi.y;
            acc[6] += xv * hi.z;
            acc[7] += xv * hi.w;
        }
#pragma unroll
        for (int32_t q = 0; q < NOISY_DW_GROUP; ++q) {
            const int32_t e = g * NOISY_DW_GROUP + q;
            if (e < E) out[(size_t)d * E + e] = acc[q];
        }
    }
}

/* dpre[t,e] = dsigma sigmoid(pre), dsigma = dl'[t,e] n[t,e] (forward's draw). */
__global__ void noisy_dpre_kernel(const float *dlogits, const float *x, const float *w_noise, int32_t T, int32_t E,
                                  int32_t d_model, moe_rng_key key, noisy_saved saved, float *dpre) {
    const size_t n = (size_t)T * E;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int32_t t = (int32_t)(i / E), e = (int32_t)(i % E);
        if (saved.sig)
            dpre[i] = noisy_dpre_value(dlogits[i], saved.noise[i], saved.sig[i]);
        else
            dpre[i] = noisy_dpre_value(dlogits[i], noisy_noise(key, t, E, e),
                                       noisy_sigmoid(noisy_pre(x + (size_t)t * d_model, w_noise, d_model, E, e)));
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

/* dW[i] += sum over the chunks of partial[c][i]: a block of 32 columns x
 * NOISY_FINISH_LANES lanes; lane y adds the y-th contiguous range of chunks
 * in ascending order, then the lanes are added in lane order. */
#define NOISY_FINISH_LANES 16

__global__ void noisy_dw_finish_kernel(const float *partial, int32_t nchunks, int32_t n, float *dW) {
    __shared__ float lane_sums[NOISY_FINISH_LANES][33]; /* +1 column: no bank conflicts */
    const int32_t i = (int32_t)blockIdx.x * 32 + (int32_t)threadIdx.x, y = threadIdx.y;
    const int32_t per = (nchunks + NOISY_FINISH_LANES - 1) / NOISY_FINISH_LANES;
    const int32_t c0 = min(nchunks, y * per), c1 = min(nchunks, c0 + per);
    float acc = 0.0f;
    if (i < n) {
#pragma unroll 8 /* loads in flight; the sum stays in chunk order */
        for (int32_t c = c0; c < c1; ++c) acc += partial[(size_t)c * n + i];
    }
    lane_sums[y][threadIdx.x] = acc;
    __syncthreads();
    if (y == 0 && i < n) {
        float s = lane_sums[0][threadIdx.x];
        for (int32_t q = 1; q < NOISY_FINISH_LANES; ++q) s += lane_sums[q][threadIdx.x];
        dW[i] += s;
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
    /* When the host checks l and l' itself there are no flags to set or read,
     * and the tile kernel routes as soon as l' is known. */
    const int checked = moe_context_inputs_checked(ctx);
    unsigned long long *flags = checked ? NULL : (unsigned long long *)ctx->workspace;
    const noisy_tile tile = noisy_tile_plan(E, K, s->d_model);
    const int tiled = w_noise && tile.tokens > 0 && noisy_aligned16(a->x);
    /* sigmoid(pre) and n for the backward, when the host keeps a saved buffer. */
    noisy_saved saved;
    memset(&saved, 0, sizeof saved);
    if (w_noise) saved = noisy_saved_fwd(s, a);

    if (flags) MOE_ROUTER_CUDA(cudaMemsetAsync(flags, 0xFF, 2 * sizeof *flags, stream));
    if (tiled) {
        const unsigned blocks = (unsigned)noisy_tile_count(&tile, T), threads = (unsigned)(tile.tokens * E);
        if (checked)
            noisy_forward_tile_kernel<true><<<blocks, threads, tile.bytes(), stream>>>(
                tile, a->logits, T, ctx->rng, a->x, w_noise, s->temperature, a->route_logits, a->expert, a->weight,
                flags, saved);
        else
            noisy_forward_tile_kernel<false><<<blocks, threads, tile.bytes(), stream>>>(
                tile, a->logits, T, ctx->rng, a->x, w_noise, s->temperature, a->route_logits, a->expert, a->weight,
                flags, saved);
        MOE_ROUTER_LAUNCHED(noisy_forward_tile_kernel);
        if (checked) return MOE_OK;
    } else {
        noisy_perturb_kernel<<<moe_router_cuda_row_blocks((size_t)T * E), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
            a->logits, T, E, ctx->training != 0, ctx->rng, s->noise_std, a->x, w_noise, s->d_model, a->route_logits,
            flags, saved);
        MOE_ROUTER_LAUNCHED(noisy_perturb_kernel);
    }
    /* route_logits is written by now; expert and weight only once l and l'
     * are known to be finite (or the host checks both after the step). */
    if (flags) {
        st = noisy_cuda_read_perturb_flags(ctx, stream, a->logits, a->route_logits, E);
        if (st != MOE_OK) return st;
    }

    noisy_route_kernel<<<moe_router_cuda_row_blocks((size_t)T), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
        a->route_logits, T, E, K, s->temperature, a->expert, a->weight);
    MOE_ROUTER_LAUNCHED(noisy_route_kernel);
    return MOE_OK;
}

/* dW += the chunks' partials (both paths). */
static moe_status noisy_cuda_dw_finish(const moe_context *ctx, cudaStream_t stream, const float *partial,
                                       size_t nchunks, int32_t D, int32_t E, float *dW) {
    const int32_t n = D * E;
    const dim3 block(32, NOISY_FINISH_LANES);
    noisy_dw_finish_kernel<<<(unsigned)((n + 31) / 32), block, 0, stream>>>(partial, (int32_t)nchunks, n, dW);
    MOE_ROUTER_LAUNCHED(noisy_dw_finish_kernel);
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

    float *dpre = (float *)((char *)ctx->workspace + MOE_ROUTER_CUDA_FLAG_BYTES);
    float *partial = dpre + (size_t)T * E;
    const float *W = noise_path ? a->params[0] : NULL;
    /* The forward's sigmoid(pre) and n; without a saved buffer they are computed again. */
    noisy_saved saved;
    memset(&saved, 0, sizeof saved);
    if (noise_path) saved = noisy_saved_bwd(s, a);
    const noisy_tile tile = noisy_tile_plan(E, K, D);
    if (noise_path && tile.tokens > 0 && noisy_aligned16(a->x) && noisy_aligned16(a->dx)) {
        const size_t blocks = noisy_tile_count(&tile, T);
        noisy_backward_tile_kernel<<<(unsigned)blocks, (unsigned)(tile.tokens * E), tile.bytes(), stream>>>(
            tile, T, ctx->rng, a->x, W, a->expert, a->weight, a->dweight, a->d_route_logits, s->temperature,
            a->dlogits, a->dx, partial, saved);
        MOE_ROUTER_LAUNCHED(noisy_backward_tile_kernel);
        return noisy_cuda_dw_finish(ctx, stream, partial, blocks, D, E, a->param_grads[0]);
    }

    noisy_dlp_kernel<<<moe_router_cuda_row_blocks((size_t)T), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
        a->expert, a->weight, a->dweight, a->d_route_logits, T, E, K, s->temperature, a->dlogits);
    MOE_ROUTER_LAUNCHED(noisy_dlp_kernel);
    if (!noise_path) return MOE_OK;

    noisy_dpre_kernel<<<moe_router_cuda_row_blocks((size_t)T * E), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
        a->dlogits, a->x, W, T, E, D, ctx->rng, saved, dpre);
    MOE_ROUTER_LAUNCHED(noisy_dpre_kernel);
    const size_t nchunks = noisy_dw_chunks(T), nw = (size_t)D * E;
    const dim3 dw_grid((unsigned)((nw + MOE_ROUTER_CUDA_THREADS - 1) / MOE_ROUTER_CUDA_THREADS), (unsigned)nchunks);
    noisy_dw_partial_kernel<<<dw_grid, MOE_ROUTER_CUDA_THREADS, 0, stream>>>(a->x, dpre, T, E, D, partial);
    MOE_ROUTER_LAUNCHED(noisy_dw_partial_kernel);
    st = noisy_cuda_dw_finish(ctx, stream, partial, nchunks, D, E, a->param_grads[0]);
    if (st != MOE_OK) return st;
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
