/*
 * Rotary position embedding and causal multi-head softmax attention on the
 * GPU. Attention runs as tiled kernels (64 queries x 64 keys per shared-memory
 * tile, fp32, end of file) for hd <= 128; larger heads fall back to the
 * row kernels, one block per (batch, head, row), that follow cpu_attention.c
 * step by step. probs[B,H,S,S] is materialised because the backward contract
 * takes it; the backward uses it instead of recomputing.
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

static void attention_fwd_rows(moe_backend *be, const float *qkv, float *out, float *probs, int B, int S,
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

static void attention_bwd_rows(moe_backend *be, const float *qkv, const float *probs, const float *dout,
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

/* ------------------------------------------------------------------ */
/* Tiled kernels (hd <= 128)                                           */
/* ------------------------------------------------------------------ */

/* Tiles of 64 queries by 64 keys, 256 threads: thread (ty, tx) = (tid/16,
 * tid%16) owns rows ty*4..ty*4+3 and columns tx*4..tx*4+3 of a tile (and
 * columns tx*4+64.. of a 128-wide head). Operands are staged in shared
 * memory, either transposed ([hd][TS], the reduction index first) or as
 * rows ([64][W]); every sum runs in an order fixed by the sizes, so results
 * repeat bit for bit. The score, exp and probability values a thread makes
 * go through probs (or the dA scratch) and are read back by the same
 * thread, so no shared row buffer of S floats is needed. */
constexpr int AT = 64;        /* tile edge */
constexpr int TS = AT + 4;    /* stride of a transposed operand row (float4 aligned) */
constexpr int AT_THREADS = 256;
constexpr int AT_MAX_HD = 128;

static inline int at_width(int hd) { return hd > 64 ? 128 + 4 : 64 + 4; }

/* dst[k][r] = src[(row0 + r) * stride + k] for k < hd, rows past S zero. */
__device__ __forceinline__ void at_load_t(float *dst, const float *src, int row0, int S, size_t stride,
                                          int hd) {
    for (int idx = threadIdx.x; idx < AT * hd; idx += AT_THREADS) {
        const int r = idx / hd, k = idx - r * hd;
        const int row = row0 + r;
        dst[k * TS + r] = row < S ? src[(size_t)row * stride + k] : 0.0f;
    }
}

/* dst[r][c] = src[(row0 + r) * stride + c] for c < W, zero past S or hd. */
__device__ __forceinline__ void at_load_n(float *dst, const float *src, int row0, int S, size_t stride,
                                          int hd, int W) {
    for (int idx = threadIdx.x; idx < AT * W; idx += AT_THREADS) {
        const int r = idx / W, c = idx - r * W;
        const int row = row0 + r;
        dst[idx] = (row < S && c < hd) ? src[(size_t)row * stride + c] : 0.0f;
    }
}

/* acc[a][b] += sum_k At[k][ty*4+a] * Bt[k][tx*4+b] */
__device__ __forceinline__ void at_mm_tt(const float *At, const float *Bt, int hd, int ty, int tx,
                                         float acc[4][4]) {
#pragma unroll 4
    for (int k = 0; k < hd; ++k) {
        const float4 a4 = *reinterpret_cast<const float4 *>(At + k * TS + ty * 4);
        const float4 b4 = *reinterpret_cast<const float4 *>(Bt + k * TS + tx * 4);
        const float a[4] = {a4.x, a4.y, a4.z, a4.w}, bb[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * bb[j];
    }
}

/* acc[a][b + 4m] += sum_j Pt[j][ty*4+a] * X[j][tx*4+b+64m], j < 64 */
__device__ __forceinline__ void at_mm_tn(const float *Pt, const float *X, int W, bool two, int ty, int tx,
                                         float acc[4][8]) {
#pragma unroll 4
    for (int j = 0; j < AT; ++j) {
        const float4 p4 = *reinterpret_cast<const float4 *>(Pt + j * TS + ty * 4);
        const float4 x4 = *reinterpret_cast<const float4 *>(X + j * W + tx * 4);
        const float p[4] = {p4.x, p4.y, p4.z, p4.w}, x[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][c] += p[i] * x[c];
        if (two) {
            const float4 y4 = *reinterpret_cast<const float4 *>(X + j * W + 64 + tx * 4);
            const float y[4] = {y4.x, y4.y, y4.z, y4.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[i][4 + c] += p[i] * y[c];
        }
    }
}

/* Write one thread's 4x8 accumulator tile: rows r0 + ty*4 + a (those < S)
 * of a token-major tensor whose row r starts at dst + r * stride, columns
 * tx*4 + c + 64m (those < hd). */
__device__ __forceinline__ void at_store(float *dst, size_t stride, int r0, int S, int hd, int ty, int tx,
                                         const float acc[4][8]) {
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int r = r0 + ty * 4 + a;
        if (r >= S) continue;
        float *row = dst + (size_t)r * stride;
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int col = m * 64 + tx * 4 + c;
                if (col < hd) row[col] = acc[a][m * 4 + c];
            }
    }
}

/* over the 16 threads of a row group (lanes of one half warp) */
__device__ __forceinline__ float at_half_sum(float v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float at_half_max(float v) {
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Block (b, h, query tile qt). Pass 1: scores into probs (j <= i), row max.
 * Pass 2: exp and row sum. Pass 3: probabilities (zeros above the diagonal)
 * into probs and, through shared memory, out = P V. */
__global__ void __launch_bounds__(AT_THREADS)
attention_fwd_tiled_kernel(const float *qkv, float *out, float *probs, int S, int H, int hd, float scale) {
    extern __shared__ float4 at_smem4[];
    float *sm = reinterpret_cast<float *>(at_smem4);
    const int nt = (S + AT - 1) / AT;
    const int bh = blockIdx.x / nt, qt = nt - 1 - (int)(blockIdx.x % nt); /* heavy tiles first */
    const int h = bh % H, b = bh / H;
    const size_t C = (size_t)H * hd, tok = 3 * C;
    const float *base = qkv + (size_t)b * S * tok + (size_t)h * hd;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int r0 = qt * AT;
    const int W = hd > 64 ? 128 + 4 : 64 + 4;
    const bool two = hd > 64;
    float *P = probs + (size_t)bh * S * S;

    float *Qt = sm, *Kt = sm + hd * TS;
    at_load_t(Qt, base, r0, S, tok, hd);
    float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    for (int kt = 0; kt <= qt; ++kt) {
        __syncthreads();
        at_load_t(Kt, base + C, kt * AT, S, tok, hd);
        __syncthreads();
        float acc[4][4] = {};
        at_mm_tt(Qt, Kt, hd, ty, tx, acc);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            const int i = r0 + ty * 4 + a;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int j = kt * AT + tx * 4 + c;
                if (i < S && j <= i) {
                    const float v = acc[a][c] * scale;
                    P[(size_t)i * S + j] = v;
                    mx[a] = fmaxf(mx[a], v);
                }
            }
        }
    }
    float inv[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) mx[a] = at_half_max(mx[a]);
    {
        float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int kt = 0; kt <= qt; ++kt) {
#pragma unroll
            for (int a = 0; a < 4; ++a) {
                const int i = r0 + ty * 4 + a;
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int j = kt * AT + tx * 4 + c;
                    if (i < S && j <= i) {
                        float *e = P + (size_t)i * S + j;
                        const float v = expf(*e - mx[a]);
                        *e = v;
                        sum[a] += v;
                    }
                }
            }
        }
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            const float t = at_half_sum(sum[a]);
            inv[a] = t > 0.0f ? 1.0f / t : 0.0f;
        }
    }
    __syncthreads(); /* Qt, Kt no longer read */

    float *Pt = sm, *Vn = sm + AT * TS;
    float acc[4][8] = {};
    for (int kt = 0; kt <= qt; ++kt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int j = kt * AT + tx * 4 + c;
            float col[4];
#pragma unroll
            for (int a = 0; a < 4; ++a) {
                const int i = r0 + ty * 4 + a;
                float p = 0.0f;
                if (i < S && j < S) {
                    float *e = P + (size_t)i * S + j;
                    if (j <= i) p = *e * inv[a];
                    *e = p;
                }
                col[a] = p;
            }
            *reinterpret_cast<float4 *>(Pt + (tx * 4 + c) * TS + ty * 4) = make_float4(col[0], col[1], col[2], col[3]);
        }
        at_load_n(Vn, base + 2 * C, kt * AT, S, tok, hd, W);
        __syncthreads();
        at_mm_tn(Pt, Vn, W, two, ty, tx, acc);
        __syncthreads();
    }
    at_store(out + (size_t)b * S * C + (size_t)h * hd, C, r0, S, hd, ty, tx, acc);
    /* causal zeros right of the diagonal tile */
    const int j0 = (qt + 1) * AT;
    if (j0 < S) {
        const int ncols = S - j0;
        const int nrows = min(AT, S - r0);
        for (int idx = tid; idx < nrows * ncols; idx += AT_THREADS) {
            const int r = idx / ncols, c = idx - r * ncols;
            P[(size_t)(r0 + r) * S + j0 + c] = 0.0f;
        }
    }
}

/* Backward, block (b, h, query tile qt): dP = dO V^T (into dA), the row sums
 * D_i = sum_j P_ij dP_ij, then dS = P (dP - D) / sqrt(hd) (into dA, j <= i)
 * and dQ = dS K. */
__global__ void __launch_bounds__(AT_THREADS)
attention_bwd_q_tiled_kernel(const float *qkv, const float *probs, const float *dout, float *dqkv, float *dA,
                             int S, int H, int hd, float scale) {
    extern __shared__ float4 at_smem4[];
    float *sm = reinterpret_cast<float *>(at_smem4);
    const int nt = (S + AT - 1) / AT;
    const int bh = blockIdx.x / nt, qt = nt - 1 - (int)(blockIdx.x % nt);
    const int h = bh % H, b = bh / H;
    const size_t C = (size_t)H * hd, tok = 3 * C;
    const float *base = qkv + (size_t)b * S * tok + (size_t)h * hd;
    const float *gbase = dout + (size_t)b * S * C + (size_t)h * hd;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int r0 = qt * AT;
    const int W = hd > 64 ? 128 + 4 : 64 + 4;
    const bool two = hd > 64;
    const float *P = probs + (size_t)bh * S * S;
    float *A = dA + (size_t)bh * S * S;

    float *Gt = sm, *Vt = sm + hd * TS;
    at_load_t(Gt, gbase, r0, S, C, hd);
    float D[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int kt = 0; kt <= qt; ++kt) {
        __syncthreads();
        at_load_t(Vt, base + 2 * C, kt * AT, S, tok, hd);
        __syncthreads();
        float acc[4][4] = {};
        at_mm_tt(Gt, Vt, hd, ty, tx, acc);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            const int i = r0 + ty * 4 + a;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int j = kt * AT + tx * 4 + c;
                if (i < S && j <= i) {
                    A[(size_t)i * S + j] = acc[a][c];
                    D[a] += P[(size_t)i * S + j] * acc[a][c];
                }
            }
        }
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) D[a] = at_half_sum(D[a]);
    __syncthreads();

    float *St = sm, *Kn = sm + AT * TS;
    float acc[4][8] = {};
    for (int kt = 0; kt <= qt; ++kt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int j = kt * AT + tx * 4 + c;
            float col[4];
#pragma unroll
            for (int a = 0; a < 4; ++a) {
                const int i = r0 + ty * 4 + a;
                float ds = 0.0f;
                if (i < S && j <= i) {
                    float *e = A + (size_t)i * S + j;
                    ds = P[(size_t)i * S + j] * (*e - D[a]) * scale;
                    *e = ds;
                }
                col[a] = ds;
            }
            *reinterpret_cast<float4 *>(St + (tx * 4 + c) * TS + ty * 4) = make_float4(col[0], col[1], col[2], col[3]);
        }
        at_load_n(Kn, base + C, kt * AT, S, tok, hd, W);
        __syncthreads();
        at_mm_tn(St, Kn, W, two, ty, tx, acc);
        __syncthreads();
    }
    at_store(dqkv + (size_t)b * S * tok + (size_t)h * hd, tok, r0, S, hd, ty, tx, acc);
}

/* Backward, block (b, h, key tile kt): dK = dS^T Q and dV = P^T dO over the
 * query tiles it >= kt, in query order. dS and P tiles are read as rows
 * (query i, key j), which is the transposed operand at_mm_tn wants. */
__global__ void __launch_bounds__(AT_THREADS)
attention_bwd_kv_tiled_kernel(const float *qkv, const float *probs, const float *dout, const float *dA,
                              float *dqkv, int S, int H, int hd) {
    extern __shared__ float4 at_smem4[];
    float *sm = reinterpret_cast<float *>(at_smem4);
    const int nt = (S + AT - 1) / AT;
    const int bh = blockIdx.x / nt, kt = (int)(blockIdx.x % nt); /* heavy tiles (small kt) first */
    const int h = bh % H, b = bh / H;
    const size_t C = (size_t)H * hd, tok = 3 * C;
    const float *base = qkv + (size_t)b * S * tok + (size_t)h * hd;
    const float *gbase = dout + (size_t)b * S * C + (size_t)h * hd;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int j0 = kt * AT;
    const int W = hd > 64 ? 128 + 4 : 64 + 4;
    const bool two = hd > 64;
    const float *P = probs + (size_t)bh * S * S;
    const float *A = dA + (size_t)bh * S * S;

    float *Dn = sm, *Pn = sm + AT * TS, *Qn = sm + 2 * AT * TS, *Gn = Qn + AT * W;
    float accK[4][8] = {}, accV[4][8] = {};
    for (int it = kt; it < nt; ++it) {
        const int i0 = it * AT;
        __syncthreads();
        for (int idx = tid; idx < AT * AT; idx += AT_THREADS) {
            const int r = idx / AT, c = idx - r * AT;
            const int i = i0 + r, j = j0 + c;
            const bool ok = i < S && j <= i;
            Dn[r * TS + c] = ok ? A[(size_t)i * S + j] : 0.0f;
            Pn[r * TS + c] = ok ? P[(size_t)i * S + j] : 0.0f;
        }
        at_load_n(Qn, base, i0, S, tok, hd, W);
        at_load_n(Gn, gbase, i0, S, C, hd, W);
        __syncthreads();
        at_mm_tn(Dn, Qn, W, two, ty, tx, accK);
        at_mm_tn(Pn, Gn, W, two, ty, tx, accV);
    }
    float *dk = dqkv + (size_t)b * S * tok + C + (size_t)h * hd;
    at_store(dk, tok, j0, S, hd, ty, tx, accK);
    at_store(dk + C, tok, j0, S, hd, ty, tx, accV);
}

/* Shared memory above the 48 KB default needs the kernel's opt-in. */
static int at_smem_optin(moe_backend *be, const void *kernel, size_t bytes, const char *what) {
    if (bytes <= 48 * 1024) return 1;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e == cudaSuccess) return 1;
    cuda_record_error(be, __FILE__, __LINE__, what, cudaGetErrorString(e));
    return 0;
}

static size_t at_smem_qside(int hd) {
    size_t a = (size_t)2 * hd * TS, p = (size_t)AT * TS + (size_t)AT * at_width(hd);
    return (a > p ? a : p) * sizeof(float);
}

void cuda_attention_fwd(moe_backend *be, const float *qkv, float *out, float *probs, int B, int S,
                        int H, int hd) {
    if (B <= 0 || S <= 0 || H <= 0 || hd <= 0) return;
    if (hd > AT_MAX_HD) {
        attention_fwd_rows(be, qkv, out, probs, B, S, H, hd);
        return;
    }
    const int nt = (S + AT - 1) / AT;
    const size_t blocks = (size_t)B * H * nt;
    const size_t shmem = at_smem_qside(hd);
    if (!at_smem_optin(be, (const void *)attention_fwd_tiled_kernel, shmem, "attention_fwd")) return;
    attention_fwd_tiled_kernel<<<(unsigned)blocks, AT_THREADS, shmem, cuda_stream(be)>>>(
        qkv, out, probs, S, H, hd, 1.0f / sqrtf((float)hd));
    KERNEL_CHECK(be, "attention_fwd_tiled_kernel");
}

void cuda_attention_bwd(moe_backend *be, const float *qkv, const float *probs, const float *dout,
                        float *dqkv, int B, int S, int H, int hd) {
    if (B <= 0 || S <= 0 || H <= 0 || hd <= 0) return;
    if (hd > AT_MAX_HD) {
        attention_bwd_rows(be, qkv, probs, dout, dqkv, B, S, H, hd);
        return;
    }
    const int nt = (S + AT - 1) / AT;
    const size_t blocks = (size_t)B * H * nt;
    float *dA = (float *)cuda_scratch(be, (size_t)B * H * S * S * sizeof(float));
    if (!dA) return;
    const float scale = 1.0f / sqrtf((float)hd);
    cudaStream_t st = cuda_stream(be);
    const size_t sh_q = at_smem_qside(hd);
    const size_t sh_kv = ((size_t)2 * AT * TS + (size_t)2 * AT * at_width(hd)) * sizeof(float);
    if (!at_smem_optin(be, (const void *)attention_bwd_q_tiled_kernel, sh_q, "attention_bwd")) return;
    if (!at_smem_optin(be, (const void *)attention_bwd_kv_tiled_kernel, sh_kv, "attention_bwd")) return;
    attention_bwd_q_tiled_kernel<<<(unsigned)blocks, AT_THREADS, sh_q, st>>>(qkv, probs, dout, dqkv, dA, S,
                                                                             H, hd, scale);
    KERNEL_CHECK(be, "attention_bwd_q_tiled_kernel");
    attention_bwd_kv_tiled_kernel<<<(unsigned)blocks, AT_THREADS, sh_kv, st>>>(qkv, probs, dout, dA, dqkv,
                                                                               S, H, hd);
    KERNEL_CHECK(be, "attention_bwd_kv_tiled_kernel");
}
