/*
 * Rotary position embedding and causal multi-head softmax attention on the
 * GPU: straightforward kernels, one block per (batch, head, row), that follow
 * cpu_attention.c step by step. probs[B,H,S,S] is materialised because the
 * backward contract takes it; S is at most a few hundred here.
 *
 * Layout: qkv[B,S,3*H*hd], each token row = [q heads | k heads | v heads],
 * each head hd contiguous. out[B,S,H*hd]. probs[B,H,S,S].
 */
#include <stdio.h>

#include "backend/cuda/cuda_common.cuh"

constexpr int ATTN_THREADS = 128; /* 4 warps: one key per warp at a time */

/* ------------------------------------------------------------------ */
/* RoPE                                                                */
/* ------------------------------------------------------------------ */

/* One thread per (token, pair i): the angle sign * s * theta^(-2i/hd) in
 * double as on the CPU (s * freq reaches hundreds of radians, where float
 * would lose the phase), then the same rotation for the H q heads and the
 * H k heads. sign = -1 is the inverse rotation (the backward). */
__global__ void rope_kernel(float *qkv, int B, int S, int H, int hd, float theta, double sign) {
    const int half = hd / 2;
    GRID_STRIDE_LOOP(idx, (size_t)B * S * half) {
        const size_t bs = idx / half;
        const int i = (int)(idx % half);
        const int s = (int)(bs % S);
        double angle = sign * s * pow((double)theta, -2.0 * i / hd);
        float c = (float)cos(angle), sn = (float)sin(angle);
        float *row = qkv + bs * 3 * (size_t)H * hd;
        for (int h = 0; h < 2 * H; ++h) {
            float *x = row + (size_t)h * hd + 2 * i;
            float x0 = x[0], x1 = x[1];
            x[0] = x0 * c - x1 * sn;
            x[1] = x0 * sn + x1 * c;
        }
    }
}

static void rope(moe_backend *be, float *qkv, int B, int S, int H, int hd, float theta, double sign,
                 const char *what) {
    size_t n = (size_t)B * S * (hd / 2);
    if (B <= 0 || S <= 0 || H <= 0 || n == 0) return;
    rope_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cuda_stream(be)>>>(qkv, B, S, H, hd, theta, sign);
    KERNEL_CHECK(be, what);
}

void cuda_rope_fwd(moe_backend *be, float *qkv, int B, int S, int H, int hd, float theta) {
    rope(be, qkv, B, S, H, hd, theta, 1.0, "rope_kernel (fwd)");
}

void cuda_rope_bwd(moe_backend *be, float *dqkv, int B, int S, int H, int hd, float theta) {
    rope(be, dqkv, B, S, H, hd, theta, -1.0, "rope_kernel (bwd)");
}

/* ------------------------------------------------------------------ */
/* Forward                                                             */
/* ------------------------------------------------------------------ */

/* Block (b, h, s), s the query row; blockIdx.x = (b*H + h)*S + s, the row
 * index of probs. Dynamic shared memory: q[hd], p[S].
 *   a[j] = <q_s, k_j> / sqrt(hd) for j <= s,  p = softmax(a),  out_s = sum_j p[j] v_j. */
__global__ void attention_fwd_kernel(const float *qkv, float *out, float *probs, int S, int H,
                                     int hd, float scale) {
    extern __shared__ float smem[];
    float *q = smem, *p = smem + hd;
    const size_t row = blockIdx.x;
    const int s = (int)(row % S);
    const size_t bh = row / S;
    const int h = (int)(bh % H);
    const size_t b = bh / H;
    const size_t C = (size_t)H * hd, tok = 3 * C;
    const float *base = qkv + b * S * tok + (size_t)h * hd; /* head h of token 0 in batch b */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;

    for (int i = threadIdx.x; i < hd; i += blockDim.x) q[i] = base[(size_t)s * tok + i];
    __syncthreads();

    /* scores: one warp per key, lanes across the head dimension */
    for (int j = warp; j <= s; j += nwarps) {
        const float *k = base + (size_t)j * tok + C;
        float dot = 0.0f;
        for (int i = lane; i < hd; i += 32) dot += q[i] * k[i];
        dot = warp_sum(dot);
        if (lane == 0) p[j] = dot * scale;
    }
    __syncthreads();

    /* softmax over j <= s, max subtracted so exp never overflows */
    float mx = -INFINITY;
    for (int j = threadIdx.x; j <= s; j += blockDim.x) mx = fmaxf(mx, p[j]);
    mx = block_max(mx);
    float sum = 0.0f;
    for (int j = threadIdx.x; j <= s; j += blockDim.x) {
        float e = expf(p[j] - mx);
        p[j] = e;
        sum += e;
    }
    sum = block_sum(sum);
    const float inv = 1.0f / sum;
    float *prow = probs + row * S;
    for (int j = threadIdx.x; j < S; j += blockDim.x) {
        float pj = 0.0f; /* causal: future keys get nothing */
        if (j <= s) {
            pj = p[j] * inv;
            p[j] = pj;
        }
        prow[j] = pj;
    }
    __syncthreads();

    /* out_s[i] = sum_j p[j] v_j[i], j in order as on the CPU */
    float *o = out + (b * S + s) * C + (size_t)h * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        const float *v = base + 2 * C + i;
        float acc = 0.0f;
        for (int j = 0; j <= s; ++j) acc += p[j] * v[(size_t)j * tok];
        o[i] = acc;
    }
}

/* Dynamic shared memory of the kernels: (hd + S) floats, within the default
 * 48 KB a block gets without opting in. */
static int attention_shape_ok(moe_backend *be, int S, int hd, const char *what) {
    if ((size_t)(hd + S) * sizeof(float) <= 48 * 1024) return 1;
    char why[128];
    snprintf(why, sizeof why, "S = %d, hd = %d need %zu bytes of shared memory (limit 49152)", S, hd,
             (size_t)(hd + S) * sizeof(float));
    cuda_record_error(be, __FILE__, __LINE__, what, why);
    return 0;
}

void cuda_attention_fwd(moe_backend *be, const float *qkv, float *out, float *probs, int B, int S,
                        int H, int hd) {
    if (B <= 0 || S <= 0 || H <= 0 || hd <= 0) return;
    if (!attention_shape_ok(be, S, hd, "attention_fwd")) return;
    const size_t rows = (size_t)B * H * S;
    const size_t shmem = (size_t)(hd + S) * sizeof(float);
    attention_fwd_kernel<<<(unsigned)rows, ATTN_THREADS, shmem, cuda_stream(be)>>>(
        qkv, out, probs, S, H, hd, 1.0f / sqrtf((float)hd));
    KERNEL_CHECK(be, "attention_fwd_kernel");
}

/* ------------------------------------------------------------------ */
/* Backward                                                            */
/* ------------------------------------------------------------------ */

/* Per query s (go = dout_s):
 *   dp[j] = <go, v_j>,  da[j] = p[j] (dp[j] - sum_i p[i] dp[i]) / sqrt(hd)
 *   dq_s = sum_j da[j] k_j                (this kernel, one block per query)
 *   dk_j = sum_{s>=j} da[s][j] q_s,  dv_j = sum_{s>=j} p[s][j] go_s
 *                                          (the next kernel, one block per key)
 * Splitting by query, then by key, makes every output element the work of
 * one thread, summed in the CPU's order: no atomics. da goes through dA, a
 * scratch [B,H,S,S] (only j <= s is written or read). */
__global__ void attention_bwd_query_kernel(const float *qkv, const float *probs, const float *dout,
                                           float *dqkv, float *dA, int S, int H, int hd,
                                           float scale) {
    extern __shared__ float smem[];
    float *go = smem, *da = smem + hd;
    const size_t row = blockIdx.x;
    const int s = (int)(row % S);
    const size_t bh = row / S;
    const int h = (int)(bh % H);
    const size_t b = bh / H;
    const size_t C = (size_t)H * hd, tok = 3 * C;
    const float *base = qkv + b * S * tok + (size_t)h * hd;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const float *prow = probs + row * S;

    for (int i = threadIdx.x; i < hd; i += blockDim.x) go[i] = dout[(b * S + s) * C + (size_t)h * hd + i];
    __syncthreads();

    /* dp[j] (kept in da[] until it becomes da) */
    for (int j = warp; j <= s; j += nwarps) {
        const float *v = base + (size_t)j * tok + 2 * C;
        float dot = 0.0f;
        for (int i = lane; i < hd; i += 32) dot += go[i] * v[i];
        dot = warp_sum(dot);
        if (lane == 0) da[j] = dot;
    }
    __syncthreads();

    float part = 0.0f;
    for (int j = threadIdx.x; j <= s; j += blockDim.x) part += prow[j] * da[j];
    const float sum_pdp = block_sum(part);
    float *dArow = dA + row * S;
    for (int j = threadIdx.x; j <= s; j += blockDim.x) {
        float a = prow[j] * (da[j] - sum_pdp) * scale;
        da[j] = a;
        dArow[j] = a;
    }
    __syncthreads();

    float *dq = dqkv + (b * S + s) * tok + (size_t)h * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        const float *k = base + C + i;
        float acc = 0.0f;
        for (int j = 0; j <= s; ++j) acc += da[j] * k[(size_t)j * tok];
        dq[i] = acc;
    }
}

/* Block (b, h, j), j the key row: dk_j and dv_j over the queries s >= j, in
 * query order. Every thread of the block reads the same dA and probs
 * element at a time (a broadcast); the q and go rows are read coalesced. */
__global__ void attention_bwd_key_kernel(const float *qkv, const float *probs, const float *dout,
                                         const float *dA, float *dqkv, int S, int H, int hd) {
    const size_t row = blockIdx.x;
    const int j = (int)(row % S);
    const size_t bh = row / S;
    const int h = (int)(bh % H);
    const size_t b = bh / H;
    const size_t C = (size_t)H * hd, tok = 3 * C;
    const float *qbase = qkv + b * S * tok + (size_t)h * hd;
    const float *gobase = dout + b * S * C + (size_t)h * hd;
    const float *pcol = probs + bh * S * S + j, *dAcol = dA + bh * S * S + j;
    float *dk = dqkv + (b * S + j) * tok + C + (size_t)h * hd;
    float *dv = dk + C;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float acc_k = 0.0f, acc_v = 0.0f;
        for (int s = j; s < S; ++s) {
            acc_k += dAcol[(size_t)s * S] * qbase[(size_t)s * tok + i];
            acc_v += pcol[(size_t)s * S] * gobase[(size_t)s * C + i];
        }
        dk[i] = acc_k;
        dv[i] = acc_v;
    }
}

void cuda_attention_bwd(moe_backend *be, const float *qkv, const float *probs, const float *dout,
                        float *dqkv, int B, int S, int H, int hd) {
    if (B <= 0 || S <= 0 || H <= 0 || hd <= 0) return;
    if (!attention_shape_ok(be, S, hd, "attention_bwd")) return;
    const size_t rows = (size_t)B * H * S;
    float *dA = (float *)cuda_scratch(be, rows * S * sizeof(float));
    if (!dA) return;
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t shmem = (size_t)(hd + S) * sizeof(float);
    cudaStream_t st = cuda_stream(be);
    attention_bwd_query_kernel<<<(unsigned)rows, ATTN_THREADS, shmem, st>>>(qkv, probs, dout, dqkv, dA,
                                                                            S, H, hd, scale);
    KERNEL_CHECK(be, "attention_bwd_query_kernel");
    attention_bwd_key_kernel<<<(unsigned)rows, ATTN_THREADS, 0, st>>>(qkv, probs, dout, dA, dqkv, S, H,
                                                                      hd);
    KERNEL_CHECK(be, "attention_bwd_key_kernel");
}
