/*
 * expert_choice, CUDA path: the routing of expert_choice.c on the device.
 *
 *   1. scores:  one thread per token computes S[t,:] = softmax(l[t,:]).
 *   2. select:  one block per expert sorts its T candidates (score
 *               descending, token ascending: the CPU's qsort order) with a
 *               block-wide bitonic sort in shared memory and writes
 *               rank[t,e] = r for the first C; every other rank stays -1.
 *               Where T keys do not fit in a block's shared memory, the
 *               experts sort one after another in a T-key workspace buffer,
 *               as the CPU does with its one candidate list.
 *   3. assign:  one thread per token writes its row exactly as the CPU loop
 *               does (the paper's mode, or the seed mode's top-K' by logit).
 *
 * Routing decisions must be bitwise the CPU's, and here they depend on
 * rounding: an expert ranks the scores of different tokens, and with
 * thousands of tokens some scores are an ulp apart. CUDA's expf may differ
 * from the host's by an ulp or two, which would reorder such tokens. So the
 * scores use ec_expf below, a copy of the expf the CPU path gets from glibc
 * (2.27 and later, x86-64): checked against it on every float, it returns the
 * same bits. The sums and divisions around it are plain IEEE float operations
 * in the CPU's order, so S, and with it every choice, every slot and the
 * paper-mode weights, are the CPU's bit for bit. (Against another libm the
 * host's S may differ in the last bit, and a choice between two tokens whose
 * scores tie to that bit with it.) The seed mode's weights use the SDK's
 * moe_softk_weights (device expf): they may differ by an ulp.
 *
 * Non-finite logits (and, in backward, expert entries outside [-1, E)) are
 * refused before anything is written, as on the CPU: a first kernel records
 * the first bad element in the workspace, one 16-byte copy brings the flags
 * to the host, and the call fails naming the token and expert. That copy is
 * the one synchronization of a call.
 *
 * Pointers in the arguments are device pointers; everything runs on
 * ctx->stream.
 */
#include <moe/router_cuda.cuh>

/* The instance state exactly as expert_choice.c defines it: both files read one struct. */
typedef struct ec_state {
    int32_t E, K;
    int32_t max_tokens;
    int32_t max_per_token; /* K' of the seed-compatible mode; 0 = the paper's mode */
} ec_state;

#define EC_SORT_THREADS 1024

static int32_t ec_k_out(const ec_state *s) { return s->max_per_token > 0 ? s->max_per_token : s->E; }

/* ---- workspace -------------------------------------------------------------------
 * For T tokens:
 *   flags  2 x uint64      [0] first non-finite logit (t*E + e),
 *                          [1] first bad expert entry in backward (t*k_out + j)
 *   S      [T,E] float     softmax scores; seed mode, once the experts have
 *                          chosen: the masked logit rows (S is not read again)
 *   rank   [T,E] int32     token t's place in expert e's list, -1 if not taken
 *   keys   [T] uint64      one expert's sort keys, only when T keys do not
 *                          fit in a block's shared memory
 * That is never more than the CPU path's S, rank and candidate list (but for
 * a few bytes when E < 4), so query() reports the CPU's size, and the CPU
 * path still refuses T > max_tokens by its workspace check. */
typedef struct ec_layout {
    size_t S, rank, keys, total; /* byte offsets */
} ec_layout;

static ec_layout ec_layout_for(const ec_state *s, int32_t T) {
    const size_t TE = (size_t)T * (size_t)s->E;
    ec_layout L;
    L.S = 2 * sizeof(unsigned long long);
    L.rank = L.S + TE * sizeof(float);
    L.keys = L.rank + TE * sizeof(int32_t); /* 8-byte aligned: 16 + 8 TE */
    L.total = L.keys + (size_t)T * sizeof(unsigned long long);
    return L;
}

/* Whether the keys fit in shared memory depends on the device, which the host
 * has not picked yet: the size always counts them. */
extern "C" size_t expert_choice_cuda_workspace_bytes(const ec_state *s) {
    return ec_layout_for(s, s->max_tokens).total;
}

/* ---- glibc's expf ------------------------------------------------------------------
 * The algorithm of ARM's optimized-routines (MIT licence), glibc's expf since
 * 2.28: exp(x) = 2^(k/32) * 2^(r/32) with k = round(32 x / ln 2), 2^(k/32)
 * from a table and 2^(r/32) from a cubic, all in double, rounded once to
 * float. The fused multiply-adds are where glibc's x86-64 build (the variant
 * it picks on every CPU with FMA, Hopper hosts included) has them; the plain
 * multiplies are __dmul_rn so the compiler cannot fuse others. Compared on
 * every one of the 2^32 floats with glibc 2.39's expf, on an H100 host: the
 * same bits throughout (CUDA's expf differs on 3.7% of them). */
__constant__ unsigned long long ec_exp2f_table[32] = {
    /* asuint64(2^(i/32)) - (i << 47) */
    0x3ff0000000000000ull, 0x3fefd9b0d3158574ull, 0x3fefb5586cf9890full, 0x3fef9301d0125b51ull,
    0x3fef72b83c7d517bull, 0x3fef54873168b9aaull, 0x3fef387a6e756238ull, 0x3fef1e9df51fdee1ull,
    0x3fef06fe0a31b715ull, 0x3feef1a7373aa9cbull, 0x3feedea64c123422ull, 0x3feece086061892dull,
    0x3feebfdad5362a27ull, 0x3feeb42b569d4f82ull, 0x3feeab07dd485429ull, 0x3feea47eb03a5585ull,
    0x3feea09e667f3bcdull, 0x3fee9f75e8ec5f74ull, 0x3feea11473eb0187ull, 0x3feea589994cce13ull,
    0x3feeace5422aa0dbull, 0x3feeb737b0cdc5e5ull, 0x3feec49182a3f090ull, 0x3feed503b23e255dull,
    0x3feee89f995ad3adull, 0x3feeff76f2fb5e47ull, 0x3fef199bdd85529cull, 0x3fef3720dcef9069ull,
    0x3fef5818dcfba487ull, 0x3fef7c97337b9b5full, 0x3fefa4afa2a490daull, 0x3fefd0765b6e4540ull,
};

__device__ float ec_expf(float x) {
    const double inv_ln2_n = 0x1.71547652b82fep+0 * 32; /* 32 / ln 2 */
    const double shift = 0x1.8p+52;                      /* adding it rounds to an integer */
    const double c0 = 0x1.c6af84b912394p-5 / 32768, c1 = 0x1.ebfce50fac4f3p-3 / 1024, c2 = 0x1.62e42ff0c52d6p-1 / 32;

    const uint32_t ix = __float_as_uint(x);
    const uint32_t abstop = (ix >> 20) & 0x7ff;
    if (abstop >= 0x42b) {                        /* |x| >= 88 or NaN: glibc's special cases */
        if (ix == 0xff800000u) return 0.0f;       /* -inf */
        if (abstop >= 0x7f8) return x + x;        /* +inf or NaN */
        if (x > 0x1.62e42ep6f) return INFINITY;   /* overflow */
        if (x < -0x1.9fe368p6f) return 0.0f;      /* underflow */
        if (x < -0x1.9d1d9ep6f) return 0x1p-149f; /* glibc's 0x1.4p-75f squared */
    }
    const double xd = (double)x;
    double kd = fma(inv_ln2_n, xd, shift);
    const unsigned long long ki = (unsigned long long)__double_as_longlong(kd);
    kd = __dsub_rn(kd, shift);
    const double r = fma(inv_ln2_n, xd, -kd); /* x * 32/ln2 - k, |r| <= 1/2 */
    const unsigned long long t = ec_exp2f_table[ki % 32] + (ki << 47);
    const double s = __longlong_as_double((long long)t); /* 2^(k/32) */
    const double z = fma(c0, r, c1);
    const double r2 = __dmul_rn(r, r);
    double y = fma(c2, r, 1.0);
    y = fma(z, r2, y);
    y = __dmul_rn(y, s);
    return __double2float_rn(y);
}

/* moe_softmax_row(l, p, E, 1) with glibc's expf: the same max, the same sum in
 * the same order, the same division. (The CPU divides l_i - m by the
 * temperature 1, which changes nothing.) */
__device__ void ec_softmax_row(const float *l, float *p, int32_t E) {
    float m = -INFINITY;
    for (int32_t i = 0; i < E; ++i) m = l[i] > m ? l[i] : m;
    float s = 0.0f;
    for (int32_t i = 0; i < E; ++i) {
        p[i] = ec_expf(l[i] - m);
        s += p[i];
    }
    for (int32_t i = 0; i < E; ++i) p[i] /= s;
}

/* ---- sort keys ------------------------------------------------------------------
 * One 64-bit key per candidate whose unsigned order is the routing order
 * (moe_ranks_before: larger score first, ties to the lower token): the score
 * in the high word, mapped so that floats compare like unsigned integers, and
 * the complement of the token in the low word, so that among equal scores the
 * lower token has the larger key. Sorting keys in descending order is then
 * the CPU's qsort. */
__device__ unsigned long long ec_key(float score, int32_t t) {
    if (score == 0.0f) score = 0.0f; /* -0 and +0 are equal scores: give them one key */
    uint32_t b = __float_as_uint(score);
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((unsigned long long)b << 32) | (0xFFFFFFFFu - (uint32_t)t);
}

__device__ int32_t ec_key_token(unsigned long long key) { return (int32_t)(0xFFFFFFFFu - (uint32_t)key); }

/* ---- kernels ------------------------------------------------------------------- */

/* S[t,:] = softmax(l[t,:]) */
__global__ void ec_scores_kernel(const float *logits, int32_t T, int32_t E, float *S) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    ec_softmax_row(logits + (size_t)t * E, S + (size_t)t * E, E);
}

/* Block b: expert e = e_first + b sorts its T candidates and takes the first
 * C. The keys live in shared memory (keys_global = NULL) or in the workspace
 * (one expert per launch); __syncthreads orders both kinds of memory within
 * the block.
 *
 * The sort is a bitonic network in the form whose comparators all put the
 * larger key at the lower index: for each run length k = 2, 4, .. P (P = T
 * rounded up to a power of two) first i against its mirror i ^ (k - 1)
 * within the run, then i against i ^ j for j = k/4 .. 1. The list is padded
 * to P with keys smaller than any real one; such a comparator never moves a
 * real key onto a pad, so the pads need no storage and comparators that
 * reach them are skipped. A fixed network of compare-exchanges on distinct
 * keys: the result depends on the keys alone, never on timing. */
__global__ void __launch_bounds__(EC_SORT_THREADS)
    ec_select_kernel(const float *S, int32_t T, int32_t E, int32_t C, int32_t e_first,
                     unsigned long long *keys_global, int32_t *rank) {
    extern __shared__ unsigned long long ec_keys_shared[];
    const int32_t e = e_first + (int32_t)blockIdx.x;
    unsigned long long *keys = keys_global ? keys_global : ec_keys_shared;

    for (int32_t i = threadIdx.x; i < T; i += blockDim.x) keys[i] = ec_key(S[(size_t)i * E + e], i);
    __syncthreads();

    int32_t P = 1;
    while (P < T) P <<= 1;
    for (int32_t k = 2; k <= P; k <<= 1) {
        for (int32_t j = k >> 1; j > 0; j >>= 1) {
            for (int32_t i = threadIdx.x; i < T; i += blockDim.x) {
                const int32_t partner = j == (k >> 1) ? (i ^ (k - 1)) : (i ^ j);
                if (partner <= i || partner >= T) continue;
                const unsigned long long a = keys[i], b = keys[partner];
                if (a < b) {
                    keys[i] = b;
                    keys[partner] = a;
                }
            }
            __syncthreads();
        }
    }

    for (int32_t r = threadIdx.x; r < C; r += blockDim.x) rank[(size_t)ec_key_token(keys[r]) * E + e] = r;
}

/* Token t's row of the output, as the CPU loop writes it. */
__global__ void ec_assign_kernel(const float *logits, const float *S, const int32_t *rank, int32_t T, int32_t E,
                                 int32_t k_out, int owns_capacity, float *rows, int32_t *expert_out,
                                 float *weight_out, int32_t *slot_out) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *l = logits + (size_t)t * E;
    const float *St = S + (size_t)t * E;
    const int32_t *rt = rank + (size_t)t * E;
    int32_t *expert = expert_out + (size_t)t * k_out;
    float *weight = weight_out + (size_t)t * k_out;
    int32_t n = 0; /* entries written for this token */

    if (owns_capacity) {
        /* The paper: every expert that took t, ascending, weight S[t,e]. */
        int32_t *slot = slot_out + (size_t)t * k_out;
        for (int32_t e = 0; e < E; ++e) {
            if (rt[e] < 0) continue;
            expert[n] = e;
            weight[n] = St[e];
            slot[n] = rt[e];
            ++n;
        }
        for (int32_t j = n; j < k_out; ++j) slot[j] = -1;
    } else {
        /* Seed mode: keep the K' best-logit experts among those that took t,
         * the others hidden behind -inf; none took t: its own top-K'. */
        float *row = rows + (size_t)t * E;
        int32_t chosen = 0;
        for (int32_t e = 0; e < E; ++e) {
            row[e] = rt[e] >= 0 ? l[e] : -INFINITY;
            chosen += rt[e] >= 0;
        }
        if (chosen > 0) {
            n = chosen < k_out ? chosen : k_out;
            moe_topk_row(row, E, n, expert);
        } else {
            n = k_out;
            moe_topk_row(l, E, n, expert);
        }
        moe_softk_weights(l, expert, n, 1.0f, weight);
    }
    for (int32_t j = n; j < k_out; ++j) {
        expert[j] = -1;
        weight[j] = 0.0f;
    }
}

/* paper mode: dS[t,e] = dweight for chosen (t,e), dl_j = S_j (dS_j - sum_i S_i dS_i);
 * seed mode: the softk backward over the kept entries. */
__global__ void ec_backward_kernel(const float *logits, const int32_t *expert_in, const float *weight_in,
                                   const float *dweight_in, int32_t T, int32_t E, int32_t k_out, int owns_capacity,
                                   float *S, float *dlogits) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const int32_t *expert = expert_in + (size_t)t * k_out;
    const float *dweight = dweight_in + (size_t)t * k_out;
    float *dl = dlogits + (size_t)t * E;
    for (int32_t e = 0; e < E; ++e) dl[e] = 0.0f;

    if (owns_capacity) {
        /* dl holds dS first, then is turned into dl in place. */
        float *St = S + (size_t)t * E;
        for (int32_t j = 0; j < k_out; ++j)
            if (expert[j] >= 0) dl[expert[j]] += dweight[j];
        ec_softmax_row(logits + (size_t)t * E, St, E);
        float dot = 0.0f; /* sum_i S_i dS_i */
        for (int32_t e = 0; e < E; ++e) dot += St[e] * dl[e];
        for (int32_t e = 0; e < E; ++e) dl[e] = St[e] * (dl[e] - dot);
    } else {
        /* Forward writes the kept experts first, then -1 entries. */
        int32_t n = 0;
        while (n < k_out && expert[n] >= 0) ++n;
        moe_softk_weights_backward(expert, weight_in + (size_t)t * k_out, dweight, n, 1.0f, dl);
    }
}

/* ---- host side ------------------------------------------------------------------- */

/* ec_check_common's checks, against this path's workspace (the values are
 * checked on the device, see ec_cuda_check_values). */
static moe_status ec_cuda_check_common(const ec_state *s, const moe_context *ctx, int32_t T, int32_t E,
                                       int32_t k_out, const float *logits) {
    moe_status st = moe_router_check_shape(ctx, T, E, k_out, s->E, ec_k_out(s));
    if (st != MOE_OK || T == 0) return st;
    if (!logits) return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "logits must not be NULL");
    return moe_router_check_workspace_for(ctx, ec_layout_for(s, T).total, T, s->max_tokens);
}

/* The first non-finite logit and, given `expert`, the first entry outside
 * [-1, E), found on the device before anything is written (the one copy back
 * of a call), reported as the CPU reports them. */
static moe_status ec_cuda_check_values(const moe_context *ctx, cudaStream_t stream, const float *logits, int32_t T,
                                       int32_t E, const int32_t *expert, int32_t k_out) {
    return moe_router_cuda_check_values(ctx, stream, logits, T, E, expert, k_out, -1,
                                        (unsigned long long *)ctx->workspace);
}

/* Every expert takes its top C: all at once with the keys in shared memory
 * (raising the block's limit past the default 48 KiB where T needs it), or,
 * where T keys exceed what a block can have, one expert after another in the
 * workspace's key buffer. */
static moe_status ec_cuda_select(const moe_context *ctx, cudaStream_t stream, const float *S, int32_t T, int32_t E,
                                 int32_t C, unsigned long long *keys, int32_t *rank) {
    const size_t key_bytes = (size_t)T * sizeof(unsigned long long);
    /* Threads loop over the keys, so a short list needs no more than T. */
    const unsigned threads = T < EC_SORT_THREADS ? (unsigned)((T + 31) / 32 * 32) : EC_SORT_THREADS;
    int device = 0, max_shared = 0;
    MOE_ROUTER_CUDA(cudaGetDevice(&device));
    MOE_ROUTER_CUDA(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (key_bytes <= (size_t)max_shared) {
        if (key_bytes > 48 * 1024)
            MOE_ROUTER_CUDA(
                cudaFuncSetAttribute(ec_select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)key_bytes));
        ec_select_kernel<<<(unsigned)E, threads, key_bytes, stream>>>(S, T, E, C, 0, NULL, rank);
        MOE_ROUTER_LAUNCHED(ec_select_kernel);
        return MOE_OK;
    }
    for (int32_t e = 0; e < E; ++e) {
        ec_select_kernel<<<1, threads, 0, stream>>>(S, T, E, C, e, keys, rank);
        MOE_ROUTER_LAUNCHED(ec_select_kernel);
    }
    return MOE_OK;
}

static moe_status ec_cuda_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const ec_state *s = (const ec_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = ec_cuda_check_common(s, ctx, a->T, a->E, a->k_out, a->logits);
    if (st != MOE_OK || a->T == 0) return st;
    const int32_t T = a->T, E = s->E, k_out = ec_k_out(s);
    const int owns_capacity = s->max_per_token == 0;
    if (!a->expert || !a->weight || (owns_capacity && !a->slot))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "forward: expert, weight%s must not be NULL",
                        owns_capacity ? " and slot" : "");
    if (a->capacity < 0)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "capacity = %d is negative", a->capacity);
    const int32_t C = a->capacity < T ? a->capacity : T;
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    st = ec_cuda_check_values(ctx, stream, a->logits, T, E, NULL, k_out);
    if (st != MOE_OK) return st;

    const ec_layout L = ec_layout_for(s, T);
    char *ws = (char *)ctx->workspace;
    float *S = (float *)(ws + L.S);
    int32_t *rank = (int32_t *)(ws + L.rank);

    ec_scores_kernel<<<moe_router_cuda_blocks((size_t)T, (size_t)1 << 30), MOE_ROUTER_CUDA_THREADS, 0, stream>>>(
        a->logits, T, E, S);
    MOE_ROUTER_LAUNCHED(ec_scores_kernel);
    MOE_ROUTER_CUDA(cudaMemsetAsync(rank, 0xFF, (size_t)T * E * sizeof(int32_t), stream)); /* -1: not taken */
    if (C > 0) {
        st = ec_cuda_select(ctx, stream, S, T, E, C, (unsigned long long *)(ws + L.keys), rank);
        if (st != MOE_OK) return st;
    }
    /* Seed mode builds its masked logit rows in S, which no one reads again. */
    ec_assign_kernel<<<moe_router_cuda_blocks((size_t)T, (size_t)1 << 30), MOE_ROUTER_CUDA_THREADS, 0, stream>>>(
        a->logits, S, rank, T, E, k_out, owns_capacity, owns_capacity ? NULL : S, a->expert, a->weight, a->slot);
    MOE_ROUTER_LAUNCHED(ec_assign_kernel);
    return MOE_OK;
}

/* The selection is piecewise constant in the logits; the gradient flows
 * through the weights of the chosen assignments only (expert_choice.c). */
static moe_status ec_cuda_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const ec_state *s = (const ec_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = ec_cuda_check_common(s, ctx, a->T, a->E, a->k_out, a->logits);
    if (st != MOE_OK || a->T == 0) return st;
    const int32_t T = a->T, E = s->E, k_out = ec_k_out(s);
    if (!a->expert || !a->weight || !a->dweight || !a->dlogits)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "backward: expert, weight, dweight and dlogits must not be NULL");
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    st = ec_cuda_check_values(ctx, stream, a->logits, T, E, a->expert, k_out);
    if (st != MOE_OK) return st;

    float *S = (float *)((char *)ctx->workspace + ec_layout_for(s, T).S);
    ec_backward_kernel<<<moe_router_cuda_blocks((size_t)T, (size_t)1 << 30), MOE_ROUTER_CUDA_THREADS, 0, stream>>>(
        a->logits, a->expert, a->weight, a->dweight, T, E, k_out, s->max_per_token == 0, S, a->dlogits);
    MOE_ROUTER_LAUNCHED(ec_backward_kernel);
    return MOE_OK;
}

extern "C" {
extern const moe_router_impl expert_choice_cuda_impl;
const moe_router_impl expert_choice_cuda_impl = {ec_cuda_forward, ec_cuda_backward};
}
