/*
 * Rotary position embedding and causal multi-head softmax attention on the
 * GPU. Attention runs as tiled kernels (64 queries x 64 keys per shared-memory
 * tile) for hd <= 128: fp32 FMA kernels in fp32 precision mode, tensor-core
 * kernels with bf16 operands and fp32 accumulation in bf16 mode (both near
 * the end of the file). Larger heads fall back, in either mode, to the fp32
 * row kernels, one block per (batch, head, row), that follow cpu_attention.c
 * step by step. probs[B,H,S,S] is materialised because the backward contract
 * takes it; the backward uses it instead of recomputing.
 *
 * Layout: qkv[B,S,3*H*hd], each token row = [q heads | k heads | v heads],
 * each head hd contiguous. out[B,S,H*hd]. probs[B,H,S,S].
 */
#include <cuda_bf16.h>
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

/* ------------------------------------------------------------------ */
/* Tensor-core kernels (bf16 precision mode, hd <= 128)                */
/* ------------------------------------------------------------------ */

/* In bf16 mode the six products (Q K^T, P V, dO V^T, dS K, dS^T Q, P^T dO)
 * run as mma.sync m16n8k16 with bf16 operands and fp32 accumulators. The
 * operands are rounded to bf16 as they are staged from fp32 global memory
 * into shared memory; everything else (scores, softmax statistics, probs,
 * dP, dS, the outputs) stays fp32, and the contract is the fp32 kernels'
 * (probs written with zeros above the diagonal, dA as scratch).
 *
 * A block is 4 warps over a 64-row tile (the dK/dV kernel: 8 warps, see
 * there); warp w owns rows 16w..16w+15. In
 * the m16n8 accumulator layout lane (g, t) = (lane / 4, lane % 4) holds rows
 * g and g + 8 of its warp's 16, columns 8n + 2t and 8n + 2t + 1 of each
 * 8-column tile n; that layout is also the A operand of the next product, so
 * a score or dS tile goes from one MMA into the next without shared memory.
 * The head is padded with zeros to HDW = 64 or 128 columns and the sequence
 * to whole tiles, so every shape with hd <= 128 takes this path.
 *
 * The forward makes two passes over the key tiles instead of the fp32
 * kernel's round trips through probs: pass 1 keeps a running row max and
 * sum (online softmax), pass 2 recomputes the scores (the same MMAs on the
 * same operands, so the same bits), writes the probabilities and multiplies
 * them with V. The dQ kernel likewise computes dP = dO V^T twice, once for
 * the row sums D and once for dS, instead of storing and re-reading dP.
 * Every sum runs in an order fixed by the sizes: results repeat bit for bit. */
typedef __nv_bfloat16 bf16;

constexpr int AM = 64;           /* rows of a block's tile, and keys or queries per inner tile */
constexpr int AM_THREADS = 128;  /* 4 warps x 16 rows */
constexpr int AM_PAD = 8;        /* bf16 padding of a shared row: rows start 16 bytes apart modulo
                                    128, so the 8 row addresses of an ldmatrix hit distinct banks */
constexpr int AM_LS = AM + AM_PAD; /* row stride of a 64-column score tile */
constexpr int AM_NOMASK = 1 << 30;

/* Which global arrays allow vector access (alignment and row lengths; the
 * host checks): float4 loads of qkv and dout rows, float4 loads and stores of
 * probs / dA rows (S % 4 == 0), float2 access to them (S even). */
enum { AM_VEC_QKV = 1, AM_VEC_DOUT = 2, AM_VEC_S4 = 4, AM_VEC_S2 = 8 };

__device__ __forceinline__ uint32_t am_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); /* lo in the low half: the lower column */
    return *reinterpret_cast<uint32_t *>(&v);
}

/* c += a b for one 16x16 (A, row) by 16x8 (B, col) step */
__device__ __forceinline__ void am_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Four 8x8 bf16 matrices from shared memory; lane l gives the address of row
 * l % 8 of matrix l / 8. The .trans form hands each lane the transposed
 * elements (a column pair instead of a row pair). */
__device__ __forceinline__ void am_ldsm4(uint32_t r[4], const bf16 *p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void am_ldsm4_t(uint32_t r[4], const bf16 *p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

/* over the 4 lanes that share a row (a quad); every lane gets the same bits */
__device__ __forceinline__ float am_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float am_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

/* Staging of a 64 x W tile of fp32 rows into shared memory as bf16 (row
 * stride W + AM_PAD) by NT threads, in two halves so the loads of the next
 * tile can be in flight while the current one is used: am_fetch loads a
 * thread's part into registers, am_put converts and stores it. A thread
 * takes one group of 4 columns in every NT / (W / 4)-th row.
 *   am_fetch: v = src[r * stride + c] where r < nr and c < nc, zero
 *             elsewhere, so padded rows and columns add nothing to a
 *             product; vec: src, stride and nc allow float4 loads.
 *   am_put:   keeps the elements with c <= r + diag (the causal mask of a
 *             score tile; AM_NOMASK elsewhere). */
template <int W, int NT>
struct AmPart {
    static constexpr int G = W / 4;     /* float4 groups per row */
    static constexpr int RS = NT / G;   /* rows apart of a thread's groups */
    static constexpr int PER = AM / RS; /* groups per thread */
};

template <int W, int NT>
__device__ __forceinline__ void am_fetch(float4 (&v)[AmPart<W, NT>::PER], const float *src, size_t stride, int nr,
                                         int nc, bool vec) {
    constexpr int G = AmPart<W, NT>::G, RS = AmPart<W, NT>::RS, PER = AmPart<W, NT>::PER;
    const int r0 = threadIdx.x / G, c = (threadIdx.x % G) * 4;
    const float *p0 = src + (size_t)r0 * stride + c;
#pragma unroll
    for (int u = 0; u < PER; ++u) {
        const float *p = p0 + (size_t)u * RS * stride;
        v[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r0 + u * RS < nr && c < nc) {
            if (vec) {
                v[u] = *reinterpret_cast<const float4 *>(p);
            } else {
                v[u].x = p[0];
                if (c + 1 < nc) v[u].y = p[1];
                if (c + 2 < nc) v[u].z = p[2];
                if (c + 3 < nc) v[u].w = p[3];
            }
        }
    }
}

template <int W, int NT>
__device__ __forceinline__ void am_put(bf16 *dst, const float4 (&v)[AmPart<W, NT>::PER], int diag) {
    constexpr int G = AmPart<W, NT>::G, RS = AmPart<W, NT>::RS, PER = AmPart<W, NT>::PER;
    const int r0 = threadIdx.x / G, c = (threadIdx.x % G) * 4;
    bf16 *d0 = dst + r0 * (W + AM_PAD) + c;
#pragma unroll
    for (int u = 0; u < PER; ++u) {
        const int lim = r0 + u * RS + diag - c; /* column offsets <= lim are kept */
        /* a select, not a product: masked elements of dA may hold anything */
        const float x = 0 <= lim ? v[u].x : 0.0f, y = 1 <= lim ? v[u].y : 0.0f;
        const float z = 2 <= lim ? v[u].z : 0.0f, w = 3 <= lim ? v[u].w : 0.0f;
        *reinterpret_cast<uint2 *>(d0 + u * RS * (W + AM_PAD)) = make_uint2(am_pack(x, y), am_pack(z, w));
    }
}

/* Both halves at once, where nothing is left to overlap with. */
template <int W, int NT>
__device__ __forceinline__ void am_stage(bf16 *dst, const float *src, size_t stride, int nr, int nc, int diag,
                                         bool vec) {
    float4 v[AmPart<W, NT>::PER];
    am_fetch<W, NT>(v, src, stride, nr, nc, vec);
    am_put<W, NT>(dst, v, diag);
}

/* Asynchronous copies into shared memory (cp.async), completed by
 * am_async_wait1 in the issuing thread and made visible to the block by the
 * __syncthreads after it. The 16-byte form needs both addresses aligned. */
__device__ __forceinline__ void am_cp16(float *smem, const float *gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((unsigned)__cvta_generic_to_shared(smem)),
                 "l"(gmem)
                 : "memory");
}
__device__ __forceinline__ void am_cp4(float *smem, const float *gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"((unsigned)__cvta_generic_to_shared(smem)),
                 "l"(gmem)
                 : "memory");
}
__device__ __forceinline__ void am_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/* all but the most recently committed group are complete */
__device__ __forceinline__ void am_async_wait1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

constexpr int AM_LP = AM + 8; /* row stride (floats) of an fp32 probs tile in shared memory: the
                                 float2 reads of a quad's rows g = 0..3 cover the 32 banks */

/* Starts copying the 64 x 64 block at (i0, j0) of an S x S fp32 matrix into
 * dst (row stride AM_LP). Rows and columns past S are not copied; readers
 * take only elements with j <= i < S. v4: 16-byte copies (S % 4 == 0 and an
 * aligned matrix), else 4-byte ones. */
__device__ __forceinline__ void am_copy_async(float *dst, const float *M, int i0, int j0, int S, bool v4) {
    const int nr = min(AM, S - i0), nc = min(AM, S - j0);
    const float *src = M + (size_t)i0 * S + j0;
    if (v4) {
        for (int idx = threadIdx.x; idx < AM * AM / 4; idx += AM_THREADS) {
            const int r = idx >> 4, c = (idx & 15) * 4;
            if (r < nr && c < nc) am_cp16(dst + r * AM_LP + c, src + (size_t)r * S + c);
        }
    } else {
        for (int idx = threadIdx.x; idx < AM * AM; idx += AM_THREADS) {
            const int r = idx >> 6, c = idx & 63;
            if (r < nr && c < nc) am_cp4(dst + r * AM_LP + c, src + (size_t)r * S + c);
        }
    }
}

/* acc = As Bs^T over the warp's 16 rows and a tile's 64 columns: As as
 * [64 rows][reduction] (the warp's rows 16w..), Bs as [64 columns]
 * [reduction], both with row stride ld; NK steps of 16. */
template <int NK>
__device__ __forceinline__ void am_tile_abt(float acc[8][4], const bf16 *As, const bf16 *Bs, int ld, int warp,
                                            int lane) {
#pragma unroll
    for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    const bf16 *a_at = As + (warp * 16 + (lane & 15)) * ld + (lane >> 4) * 8;
    const bf16 *b_at = Bs + ((lane & 7) + ((lane >> 4) & 1) * 8) * ld + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
        uint32_t a[4];
        am_ldsm4(a, a_at + kk * 16);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            uint32_t b[4];
            am_ldsm4(b, b_at + np * 16 * ld + kk * 16);
            am_mma(acc[2 * np], a, b[0], b[1]);
            am_mma(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

/* acc += X Ys over the warp's 16 rows: X the warp's 16 x 64 fp32 tile in
 * accumulator layout (rounded to bf16 here), Ys as [64 = reduction][NO * 8
 * columns] (row stride ld). */
template <int NO>
__device__ __forceinline__ void am_tile_xy(float acc[NO][4], const float x[8][4], const bf16 *Ys, int ld, int lane) {
    const int yrow = (lane & 7) + ((lane >> 3) & 1) * 8, ycol = ((lane >> 4) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const uint32_t a[4] = {am_pack(x[2 * kk][0], x[2 * kk][1]), am_pack(x[2 * kk][2], x[2 * kk][3]),
                               am_pack(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                               am_pack(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
        for (int np = 0; np < NO / 2; ++np) {
            uint32_t b[4];
            am_ldsm4_t(b, Ys + (kk * 16 + yrow) * ld + np * 16 + ycol);
            am_mma(acc[2 * np], a, b[0], b[1]);
            am_mma(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

/* acc += Xs^T Ys over the warp's 16 rows: Xs as [64 = reduction][64] whose
 * columns 16w.. are the warp's rows, Ys as [64 = reduction][NO * 8]. */
template <int NO>
__device__ __forceinline__ void am_tile_xty(float acc[NO][4], const bf16 *Xs, int ldx, const bf16 *Ys, int ldy,
                                            int warp, int lane) {
    const int xrow = (lane & 7) + ((lane >> 4) & 1) * 8, xcol = warp * 16 + ((lane >> 3) & 1) * 8;
    const int yrow = (lane & 7) + ((lane >> 3) & 1) * 8, ycol = ((lane >> 4) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4];
        am_ldsm4_t(a, Xs + (kk * 16 + xrow) * ldx + xcol);
#pragma unroll
        for (int np = 0; np < NO / 2; ++np) {
            uint32_t b[4];
            am_ldsm4_t(b, Ys + (kk * 16 + yrow) * ldy + np * 16 + ycol);
            am_mma(acc[2 * np], a, b[0], b[1]);
            am_mma(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

/* Rows i and i + 8 of a token-major fp32 tensor (row r at dst + r * stride)
 * from the lane's NO x 4 accumulators, columns < hd, rows < S. */
template <int NO>
__device__ __forceinline__ void am_store_rows(float *dst, size_t stride, int i, int S, int hd, int t,
                                              const float acc[NO][4]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (i + 8 * r >= S) continue;
        float *row = dst + (size_t)(i + 8 * r) * stride;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
            const int c = 8 * n + 2 * t;
            if (c < hd) row[c] = acc[n][2 * r];
            if (c + 1 < hd) row[c + 1] = acc[n][2 * r + 1];
        }
    }
}

/* Stores the pair (i, j), (i, j + 1) of an S x S row-major matrix (j even,
 * j < S; j + 1 may be S when S is odd, then only the first is written). */
__device__ __forceinline__ void am_put2(float *M, int i, int j, int S, bool v2, float a, float b) {
    float *p = M + (size_t)i * S + j;
    if (v2) {
        *reinterpret_cast<float2 *>(p) = make_float2(a, b);
    } else {
        p[0] = a;
        if (j + 1 < S) p[1] = b;
    }
}

/* Forward, block (b, h, query tile qt); shared memory: Q, K, V tiles. In
 * pass 1 the next K tile is loaded into registers while the current one is
 * used. Not in pass 2: next to the output accumulators, registers for K and
 * V took the kernel from 128 to 202 and made it slower on an H100 (45 us
 * instead of 39 at B = 32, S = 256, H = 4, hd = 64). */
template <int HDW>
__global__ void __launch_bounds__(AM_THREADS)
attention_fwd_mma_kernel(const float *qkv, float *out, float *probs, int S, int H, int hd, float scale, int vec) {
    constexpr int LD = HDW + AM_PAD, NK = HDW / 16, NO = HDW / 8, PER = AmPart<HDW, AM_THREADS>::PER;
    extern __shared__ float4 am_smem4[];
    bf16 *Qs = reinterpret_cast<bf16 *>(am_smem4), *Ks = Qs + AM * LD, *Vs = Ks + AM * LD;
    const int nt = (S + AM - 1) / AM;
    const int bh = blockIdx.x / nt, qt = nt - 1 - (int)(blockIdx.x % nt); /* heavy tiles first */
    const int h = bh % H, b = bh / H;
    const size_t C = (size_t)H * hd, tok = 3 * C;
    const float *base = qkv + (size_t)b * S * tok + (size_t)h * hd;
    const float *kbase = base + C, *vbase = base + 2 * C;
    const size_t tile = (size_t)AM * tok; /* from one key tile to the next */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
    const int r0 = qt * AM;
    const int i0 = r0 + warp * 16 + (lane >> 2); /* the lane's rows: i0 and i0 + 8 */
    const bool vq = vec & AM_VEC_QKV, v2 = vec & AM_VEC_S2;
    float *P = probs + (size_t)bh * S * S;

    float4 pk[PER];
    am_fetch<HDW, AM_THREADS>(pk, kbase, tok, S, hd, vq);
    am_stage<HDW, AM_THREADS>(Qs, base + (size_t)r0 * tok, tok, S - r0, hd, AM_NOMASK, vq);

    /* pass 1: row max m and sum l of exp(score - m), updated tile by tile */
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    for (int kt = 0; kt <= qt; ++kt) {
        __syncthreads(); /* the last tile's Ks readers are done */
        am_put<HDW, AM_THREADS>(Ks, pk, AM_NOMASK);
        __syncthreads();
        if (kt < qt) am_fetch<HDW, AM_THREADS>(pk, kbase + (kt + 1) * tile, tok, S - (kt + 1) * AM, hd, vq);
        float s[8][4];
        am_tile_abt<NK>(s, Qs, Ks, LD, warp, lane);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = i0 + 8 * r;
            float tmax = -INFINITY;
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = kt * AM + 8 * n + 2 * t + e;
                    /* __fmul_rn: not fused into pass 2's subtraction, so both passes see one value */
                    const float v = j <= i ? __fmul_rn(s[n][2 * r + e], scale) : -INFINITY;
                    s[n][2 * r + e] = v;
                    tmax = fmaxf(tmax, v);
                }
            /* finite: key kt * 64 <= i for every row of a tile qt >= kt */
            const float mnew = fmaxf(m[r], am_quad_max(tmax));
            float sum = 0.0f;
#pragma unroll
            for (int n = 0; n < 8; ++n) sum += expf(s[n][2 * r] - mnew) + expf(s[n][2 * r + 1] - mnew);
            l[r] = l[r] * expf(m[r] - mnew) + am_quad_sum(sum);
            m[r] = mnew;
        }
    }
    const float inv[2] = {1.0f / l[0], 1.0f / l[1]};

    /* pass 2: probabilities into probs (zeros above the diagonal), out = P V */
    float o[NO][4] = {};
    for (int kt = 0; kt <= qt; ++kt) {
        __syncthreads();
        am_stage<HDW, AM_THREADS>(Ks, kbase + kt * tile, tok, S - kt * AM, hd, AM_NOMASK, vq);
        am_stage<HDW, AM_THREADS>(Vs, vbase + kt * tile, tok, S - kt * AM, hd, AM_NOMASK, vq);
        __syncthreads();
        float s[8][4];
        am_tile_abt<NK>(s, Qs, Ks, LD, warp, lane);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = i0 + 8 * r;
#pragma unroll
            for (int n = 0; n < 8; ++n) {
                const int j = kt * AM + 8 * n + 2 * t;
                const float p0 = j <= i ? expf(__fmul_rn(s[n][2 * r], scale) - m[r]) * inv[r] : 0.0f;
                const float p1 = j + 1 <= i ? expf(__fmul_rn(s[n][2 * r + 1], scale) - m[r]) * inv[r] : 0.0f;
                s[n][2 * r] = p0;
                s[n][2 * r + 1] = p1;
                if (i < S && j < S) am_put2(P, i, j, S, v2, p0, p1);
            }
        }
        am_tile_xy<NO>(o, s, Vs, LD, lane);
    }
    am_store_rows<NO>(out + (size_t)b * S * C + (size_t)h * hd, C, i0, S, hd, t, o);

    /* causal zeros right of the diagonal tile */
    const int j0 = (qt + 1) * AM;
    if (j0 < S) {
        const int ncols = S - j0, nrows = min(AM, S - r0);
        if (vec & AM_VEC_S4) { /* S % 4 == 0, so ncols too */
            const int n4 = ncols / 4;
            for (int idx = threadIdx.x; idx < nrows * n4; idx += AM_THREADS) {
                const int r = idx / n4, c = idx - r * n4;
                float4 *z = reinterpret_cast<float4 *>(P + (size_t)(r0 + r) * S + j0 + 4 * c);
                *z = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
        } else {
            for (int idx = threadIdx.x; idx < nrows * ncols; idx += AM_THREADS) {
                const int r = idx / ncols, c = idx - r * ncols;
                P[(size_t)(r0 + r) * S + j0 + c] = 0.0f;
            }
        }
    }
}

/* Backward, block (b, h, query tile qt): pass 1 dP = dO V^T and the row sums
 * D_i = sum_j P_ij dP_ij; pass 2 dP again, dS = P (dP - D) / sqrt(hd) into
 * dA (j <= i; zeros above the diagonal inside the diagonal tile) and
 * dQ = dS K. Shared memory: dO, V, K tiles (bf16) and two fp32 tiles of
 * probs, which cp.async fills one tile ahead (reading probs straight from
 * global memory after the MMAs left its latency exposed: 75 us instead of 46
 * on an H100 at the shape above); in pass 1 the next V tile is loaded into
 * registers while the current one is used. */
template <int HDW>
__global__ void __launch_bounds__(AM_THREADS)
attention_bwd_q_mma_kernel(const float *qkv, const float *probs, const float *dout, float *dqkv, float *dA, int S,
                           int H, int hd, float scale, int vec) {
    constexpr int LD = HDW + AM_PAD, NK = HDW / 16, NO = HDW / 8, PER = AmPart<HDW, AM_THREADS>::PER;
    extern __shared__ float4 am_smem4[];
    bf16 *Gs = reinterpret_cast<bf16 *>(am_smem4), *Vs = Gs + AM * LD, *Ks = Vs + AM * LD;
    float *Pbuf = reinterpret_cast<float *>(Ks + AM * LD); /* [2][AM][AM_LP] */
    const int nt = (S + AM - 1) / AM;
    const int bh = blockIdx.x / nt, qt = nt - 1 - (int)(blockIdx.x % nt);
    const int h = bh % H, b = bh / H;
    const size_t C = (size_t)H * hd, tok = 3 * C;
    const float *base = qkv + (size_t)b * S * tok + (size_t)h * hd;
    const float *kbase = base + C, *vbase = base + 2 * C;
    const size_t tile = (size_t)AM * tok;
    const float *gbase = dout + (size_t)b * S * C + (size_t)h * hd;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
    const int r0 = qt * AM;
    const int i0 = r0 + warp * 16 + (lane >> 2);
    const bool vq = vec & AM_VEC_QKV, v2 = vec & AM_VEC_S2, v4 = vec & AM_VEC_S4;
    const float *P = probs + (size_t)bh * S * S;
    float *A = dA + (size_t)bh * S * S;
    /* the lane's element (row 8r of its pair, column 8n) of a probs tile */
    const int poff = (warp * 16 + (lane >> 2)) * AM_LP + 2 * t;

    float4 pv[PER];
    am_copy_async(Pbuf, P, r0, 0, S, v4);
    am_async_commit();
    am_fetch<HDW, AM_THREADS>(pv, vbase, tok, S, hd, vq);
    am_stage<HDW, AM_THREADS>(Gs, gbase + (size_t)r0 * C, C, S - r0, hd, AM_NOMASK, vec & AM_VEC_DOUT);

    float D[2] = {0.0f, 0.0f};
    for (int kt = 0; kt <= qt; ++kt) {
        __syncthreads(); /* Vs and the probs buffer about to be refilled are no longer read */
        if (kt < qt) am_copy_async(Pbuf + ((kt + 1) & 1) * AM * AM_LP, P, r0, (kt + 1) * AM, S, v4);
        am_async_commit(); /* possibly empty: one group per iteration keeps the wait below right */
        am_put<HDW, AM_THREADS>(Vs, pv, AM_NOMASK);
        am_async_wait1(); /* this tile's probs */
        __syncthreads();
        if (kt < qt) am_fetch<HDW, AM_THREADS>(pv, vbase + (kt + 1) * tile, tok, S - (kt + 1) * AM, hd, vq);
        const float *Pt = Pbuf + (kt & 1) * AM * AM_LP + poff;
        float dp[8][4];
        am_tile_abt<NK>(dp, Gs, Vs, LD, warp, lane);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = i0 + 8 * r;
            if (i >= S) continue;
#pragma unroll
            for (int n = 0; n < 8; ++n) {
                const int j = kt * AM + 8 * n + 2 * t;
                if (j > i) continue;
                const float2 p = *reinterpret_cast<const float2 *>(Pt + 8 * r * AM_LP + 8 * n);
                D[r] += p.x * dp[n][2 * r];
                if (j + 1 <= i) D[r] += p.y * dp[n][2 * r + 1];
            }
        }
    }
    D[0] = am_quad_sum(D[0]);
    D[1] = am_quad_sum(D[1]);

    __syncthreads(); /* the probs buffers are no longer read */
    am_copy_async(Pbuf, P, r0, 0, S, v4);
    am_async_commit();
    float dq[NO][4] = {};
    for (int kt = 0; kt <= qt; ++kt) {
        __syncthreads();
        if (kt < qt) am_copy_async(Pbuf + ((kt + 1) & 1) * AM * AM_LP, P, r0, (kt + 1) * AM, S, v4);
        am_async_commit();
        am_stage<HDW, AM_THREADS>(Vs, vbase + kt * tile, tok, S - kt * AM, hd, AM_NOMASK, vq);
        am_stage<HDW, AM_THREADS>(Ks, kbase + kt * tile, tok, S - kt * AM, hd, AM_NOMASK, vq);
        am_async_wait1();
        __syncthreads();
        const float *Pt = Pbuf + (kt & 1) * AM * AM_LP + poff;
        float dp[8][4];
        am_tile_abt<NK>(dp, Gs, Vs, LD, warp, lane);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = i0 + 8 * r;
#pragma unroll
            for (int n = 0; n < 8; ++n) {
                const int j = kt * AM + 8 * n + 2 * t;
                float d0 = 0.0f, d1 = 0.0f;
                if (i < S && j <= i) {
                    const float2 p = *reinterpret_cast<const float2 *>(Pt + 8 * r * AM_LP + 8 * n);
                    d0 = p.x * (dp[n][2 * r] - D[r]) * scale;
                    if (j + 1 <= i) d1 = p.y * (dp[n][2 * r + 1] - D[r]) * scale;
                }
                dp[n][2 * r] = d0;
                dp[n][2 * r + 1] = d1;
                if (i < S && j < S) am_put2(A, i, j, S, v2, d0, d1);
            }
        }
        am_tile_xy<NO>(dq, dp, Ks, LD, lane);
    }
    am_store_rows<NO>(dqkv + (size_t)b * S * tok + (size_t)h * hd, tok, i0, S, hd, t, dq);
}

/* Backward, block (b, h, key tile kt): dK = dS^T Q and dV = P^T dO over the
 * query tiles it >= kt, in query order. The dS and P tiles are staged as
 * stored ([query][key], masked to j <= i) and read transposed by ldmatrix.
 * 8 warps: warps 0-3 make dK, warps 4-7 dV, each for 16 keys, so a thread
 * holds one HDW-wide accumulator row pair instead of two. Shared memory: dS,
 * P, Q, dO tiles. */
constexpr int AM_KV_THREADS = 256;

template <int HDW>
__global__ void __launch_bounds__(AM_KV_THREADS)
attention_bwd_kv_mma_kernel(const float *qkv, const float *probs, const float *dout, const float *dA, float *dqkv,
                            int S, int H, int hd, int vec) {
    constexpr int LD = HDW + AM_PAD, NO = HDW / 8;
    extern __shared__ float4 am_smem4[];
    bf16 *Ss = reinterpret_cast<bf16 *>(am_smem4), *Ps = Ss + AM * AM_LS, *Qs = Ps + AM * AM_LS, *Gs = Qs + AM * LD;
    const int nt = (S + AM - 1) / AM;
    const int bh = blockIdx.x / nt, kt = (int)(blockIdx.x % nt); /* heavy tiles (small kt) first */
    const int h = bh % H, b = bh / H;
    const size_t C = (size_t)H * hd, tok = 3 * C;
    const float *base = qkv + (size_t)b * S * tok + (size_t)h * hd;
    const float *gbase = dout + (size_t)b * S * C + (size_t)h * hd;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
    const bool is_v = warp >= 4; /* uniform per warp */
    const int j0 = kt * AM;
    const bool vq = vec & AM_VEC_QKV, vg = vec & AM_VEC_DOUT, v4 = vec & AM_VEC_S4;
    const float *P = probs + (size_t)bh * S * S;
    const float *A = dA + (size_t)bh * S * S;
    const bf16 *Xs = is_v ? Ps : Ss, *Ys = is_v ? Gs : Qs;

    float acc[NO][4] = {};
    for (int it = kt; it < nt; ++it) {
        const int i0 = it * AM;
        __syncthreads();
        am_stage<AM, AM_KV_THREADS>(Ss, A + (size_t)i0 * S + j0, S, S - i0, S - j0, i0 - j0, v4);
        am_stage<AM, AM_KV_THREADS>(Ps, P + (size_t)i0 * S + j0, S, S - i0, S - j0, i0 - j0, v4);
        am_stage<HDW, AM_KV_THREADS>(Qs, base + (size_t)i0 * tok, tok, S - i0, hd, AM_NOMASK, vq);
        am_stage<HDW, AM_KV_THREADS>(Gs, gbase + (size_t)i0 * C, C, S - i0, hd, AM_NOMASK, vg);
        __syncthreads();
        am_tile_xty<NO>(acc, Xs, AM_LS, Ys, LD, warp & 3, lane);
    }
    /* dK at column C of a token's dqkv row, dV at 2C */
    float *dst = dqkv + (size_t)b * S * tok + (is_v ? 2 * C : C) + (size_t)h * hd;
    am_store_rows<NO>(dst, tok, j0 + (warp & 3) * 16 + (lane >> 2), S, hd, t, acc);
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

/* The AM_VEC_* bits the arrays' addresses and the sizes allow. */
static int am_vec_flags(const float *qkv, const float *dout, const float *probs, int S, int hd) {
    const uintptr_t a16 = 15, a8 = 7;
    int f = 0;
    if (hd % 4 == 0 && ((uintptr_t)qkv & a16) == 0) f |= AM_VEC_QKV;
    if (hd % 4 == 0 && dout && ((uintptr_t)dout & a16) == 0) f |= AM_VEC_DOUT;
    if (S % 4 == 0 && ((uintptr_t)probs & a16) == 0) f |= AM_VEC_S4; /* dA: scratch, 256-byte aligned */
    if (S % 2 == 0 && ((uintptr_t)probs & a8) == 0) f |= AM_VEC_S2;
    return f;
}

template <int HDW>
static void am_fwd(moe_backend *be, const float *qkv, float *out, float *probs, int B, int S, int H, int hd) {
    const unsigned blocks = (unsigned)((size_t)B * H * ((S + AM - 1) / AM));
    const size_t shmem = (size_t)3 * AM * (HDW + AM_PAD) * sizeof(bf16);
    if (!at_smem_optin(be, (const void *)attention_fwd_mma_kernel<HDW>, shmem, "attention_fwd")) return;
    attention_fwd_mma_kernel<HDW><<<blocks, AM_THREADS, shmem, cuda_stream(be)>>>(
        qkv, out, probs, S, H, hd, 1.0f / sqrtf((float)hd), am_vec_flags(qkv, NULL, probs, S, hd));
    KERNEL_CHECK(be, "attention_fwd_mma_kernel");
}

template <int HDW>
static void am_bwd(moe_backend *be, const float *qkv, const float *probs, const float *dout, float *dqkv, int B,
                   int S, int H, int hd) {
    const unsigned blocks = (unsigned)((size_t)B * H * ((S + AM - 1) / AM));
    float *dA = (float *)cuda_scratch(be, (size_t)B * H * S * S * sizeof(float));
    if (!dA) return;
    const int vec = am_vec_flags(qkv, dout, probs, S, hd);
    const size_t sh_q = (size_t)3 * AM * (HDW + AM_PAD) * sizeof(bf16) + (size_t)2 * AM * AM_LP * sizeof(float);
    const size_t sh_kv = ((size_t)2 * AM * AM_LS + (size_t)2 * AM * (HDW + AM_PAD)) * sizeof(bf16);
    if (!at_smem_optin(be, (const void *)attention_bwd_q_mma_kernel<HDW>, sh_q, "attention_bwd")) return;
    if (!at_smem_optin(be, (const void *)attention_bwd_kv_mma_kernel<HDW>, sh_kv, "attention_bwd")) return;
    cudaStream_t st = cuda_stream(be);
    attention_bwd_q_mma_kernel<HDW><<<blocks, AM_THREADS, sh_q, st>>>(qkv, probs, dout, dqkv, dA, S, H, hd,
                                                                      1.0f / sqrtf((float)hd), vec);
    KERNEL_CHECK(be, "attention_bwd_q_mma_kernel");
    attention_bwd_kv_mma_kernel<HDW><<<blocks, AM_KV_THREADS, sh_kv, st>>>(qkv, probs, dout, dA, dqkv, S, H, hd, vec);
    KERNEL_CHECK(be, "attention_bwd_kv_mma_kernel");
}

void cuda_attention_fwd(moe_backend *be, const float *qkv, float *out, float *probs, int B, int S,
                        int H, int hd) {
    if (B <= 0 || S <= 0 || H <= 0 || hd <= 0) return;
    if (hd > AT_MAX_HD) {
        attention_fwd_rows(be, qkv, out, probs, B, S, H, hd);
        return;
    }
    if (cuda_state(be)->precision == MOE_PRECISION_BF16) {
        if (hd <= 64)
            am_fwd<64>(be, qkv, out, probs, B, S, H, hd);
        else
            am_fwd<128>(be, qkv, out, probs, B, S, H, hd);
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
    if (cuda_state(be)->precision == MOE_PRECISION_BF16) {
        if (hd <= 64)
            am_bwd<64>(be, qkv, probs, dout, dqkv, B, S, H, hd);
        else
            am_bwd<128>(be, qkv, probs, dout, dqkv, B, S, H, hd);
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
