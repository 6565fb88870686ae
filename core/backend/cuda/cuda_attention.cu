/*
 * Rotary position embedding and causal multi-head softmax attention on the
 * GPU. Attention runs as tiled kernels (64 queries x 64 keys per shared-memory
 * tile) for hd <= 128: fp32 FMA kernels in fp32 precision mode, tensor-core
 * kernels with bf16 operands and fp32 accumulation in bf16 mode (both near
 * the end of the file). Larger heads fall back, in either mode, to the fp32
 * row kernels, one block per (batch, head, row), that follow cpu_attention.c
 * step by step. probs[B,H,S,S] is the backward's work space (backend.h):
 * the fp32 and row kernels keep the probabilities in it and the backward
 * reads them; the bf16 kernels keep only a log-sum-exp per query row and
 * the backward recomputes the probabilities from it.
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

/* In bf16 mode the products (Q K^T, P V, dO V^T, dS K, K Q^T, dS^T Q,
 * P^T dO) run as mma.sync m16n8k16 with bf16 operands and fp32
 * accumulators. The operands are rounded to bf16 on their way from fp32
 * global memory into the MMA; everything else (scores, softmax statistics,
 * P, dP, dS, the row sums D, the outputs) stays fp32.
 *
 * The S x S probabilities never go through memory (flash-attention style).
 * The forward keeps per query row i only the base-2 log-sum-exp of its
 * scaled scores, lse_i = log2 sum_{j<=i} 2^(s_ij) with s_ij = <q_i, k_j>
 * log2(e) / sqrt(hd), in the first B*H*S floats of the probs buffer (work
 * space by the contract); the backward recomputes every tile of
 * probabilities, P_ij = 2^(s_ij - lse_i), from Q and K on the tensor cores.
 * The fp32 probabilities are B*H*S*S floats (33.5 MB a layer at the shape
 * below, written once and read twice): moving them cost more than the
 * products that replace them.
 *
 * The backward needs D_i = sum_j P_ij dP_ij (= <dO_i, O_i>) before it can
 * form dS = P (dP - D) / sqrt(hd). It is given neither O nor room to keep
 * it (the buffer has S floats a row, fewer than hd when S < hd), so the dQ
 * kernel, whose block sees whole query rows, makes D in a first pass over
 * its key tiles (P and dP recomputed), stores it in a [B,H,S] scratch for
 * the dK/dV kernel that runs after it, and forms dS and dQ in a second
 * pass. One pass summing (P o dP) K and P K, with D subtracted at the end,
 * would save the first but cancels: both terms carry the common part of a
 * row's dP, and their bf16 operands 2^-9 of it.
 *
 * A block is 4 warps over a 64-row tile (the dK/dV kernel: 8 warps, see
 * there); warp w owns rows 16w..16w+15. In the m16n8 accumulator layout
 * lane (g, t) = (lane / 4, lane % 4) holds rows g and g + 8 of its warp's
 * 16, columns 8n + 2t and 8n + 2t + 1 of each 8-column tile n; that layout
 * is also the A operand of the next product, so a score, P or dS tile goes
 * from one MMA into the next without a round trip. The operands a block
 * keeps for its whole life (Q and dO of its query tile, or K and V of its
 * key tile) are held as A fragments in registers. The head is padded with
 * zeros to HDW = 64 or 128 columns and the sequence to whole tiles, so
 * every shape with hd <= 128 takes this path.
 *
 * The kernels are bound by instruction issue and by memory latency at the
 * few warps their registers and shared memory allow. Hence:
 *  - every tile a loop step needs is copied with cp.async into fp32
 *    staging buffers one step ahead, while the current step computes (no
 *    registers held for it); a step converts its staged K, V, Q or dO tile
 *    to bf16 once for all warps;
 *  - blocks are numbered heaviest first across all heads (a query tile
 *    qt does qt + 1 key tiles): with blocks handed to the multiprocessors
 *    in order, each gets a mix of long and short ones (numbered head by
 *    head, every 132nd block had the same tile index, so some
 *    multiprocessors got only the longest);
 *  - only the diagonal tile is masked, and its fully masked 16-column
 *    groups are skipped in the MMAs (their terms are zeros, so skipping
 *    them changes no bit); the FULL form of each kernel (below) checks no
 *    bounds, and the exponentials are single ex2 instructions.
 * On an H100 at B = 32, S = 256, H = 4, hd = 64 (ncu, per call): forward
 * 19.3 us, dQ 30.4 us, dK/dV 34.7 us (were 31.7, 33.7 and 34.9 with the
 * probabilities through memory). The forward issues an instruction in a
 * quarter of the cycles, at 2.6 warps a scheduler: latency, not the tensor
 * cores or DRAM (1.4 TB/s), limits it.
 * Every sum runs in an order fixed by the sizes: results repeat bit for bit. */
typedef __nv_bfloat16 bf16;

constexpr int AM = 64;           /* rows of a block's tile, and keys or queries per inner tile */
constexpr int AM_THREADS = 128;  /* 4 warps x 16 rows */
constexpr int AM_KV_THREADS = 256;
constexpr int AM_PAD = 8;        /* bf16 padding of a shared row: rows start 16 bytes apart modulo
                                    128, so the 8 row addresses of an ldmatrix hit distinct banks */
/* Which global arrays allow 16-byte copies of their rows (alignment and
 * hd % 4; the host checks): qkv, dout. */
enum { AM_VEC_QKV = 1, AM_VEC_DOUT = 2 };

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

/* Asynchronous copies into shared memory (cp.async), completed by
 * am_async_wait in the issuing thread and made visible to the block by the
 * __syncthreads after it. The 16-byte form needs both addresses aligned. */
__device__ __forceinline__ unsigned am_smem_addr(const float *p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void am_cp16(unsigned smem, const float *gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem) : "memory");
}
__device__ __forceinline__ void am_cp4(unsigned smem, const float *gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem), "l"(gmem) : "memory");
}
__device__ __forceinline__ void am_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/* every copy this thread started has landed */
__device__ __forceinline__ void am_async_wait() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

/* Starts copying a 64-row tile of a row-major fp32 matrix (row r at
 * src + r * stride) into dst (row stride ld floats), by NT threads: rows
 * r < nr, columns c < nc (of NC). What is not copied keeps stale data,
 * which am_convert zeroes. vec: 16-byte copies, 4 columns at a time (src,
 * stride and nc multiples of 4 floats, src 16-byte aligned); else 4-byte
 * ones. */
template <int NC, int NT, bool ALL>
__device__ __forceinline__ void am_copy_tile(float *dst, int ld, const float *src, size_t stride, int nr, int nc,
                                             bool vec) {
    /* a thread keeps one column group and walks down the rows: a rolled
     * loop over one pointer pair, not a set of precomputed addresses that
     * would stay in registers across the caller's loop. ALL: every row and
     * column exists (nr >= 64, nc = NC), nothing to check. */
    const int rmax = ALL ? AM : min(nr, AM);
    if (ALL || vec) {
        constexpr int G = NC / 4, RS = NT / G;
        static_assert(NT % G == 0, "a whole number of rows per pass");
        const int c = (threadIdx.x % G) * 4;
        int r = threadIdx.x / G;
        if (!ALL && c >= nc) return;
        const float *s = src + (size_t)r * stride + c;
        unsigned d = am_smem_addr(dst + r * ld + c);
#pragma unroll 1
        for (; r < rmax; r += RS, s += RS * stride, d += RS * ld * 4) am_cp16(d, s);
    } else {
        static_assert(NT % NC == 0, "a whole number of rows per pass");
        constexpr int RS = NT / NC;
        const int c = threadIdx.x % NC;
        if (c >= nc) return;
#pragma unroll 1
        for (int r = threadIdx.x / NC; r < rmax; r += RS)
            am_cp4(am_smem_addr(dst + r * ld + c), src + (size_t)r * stride + c);
    }
}

/* dst (bf16, row stride NC + AM_PAD) = src (fp32, row stride NC) over a
 * 64-row tile, by NT threads; rows r >= nr and columns c >= nc are zero, so
 * padded rows and columns add nothing to a product (ALL: none). A thread
 * converts 4 columns at a time (16-byte reads: a warp's reads cover
 * consecutive addresses; 8-byte writes: a half warp's cover one row). */
template <int NC, int NT, bool ALL>
__device__ __forceinline__ void am_convert(bf16 *dst, const float *src, int nr, int nc) {
    constexpr int G = NC / 4, RS = NT / G;
    const int r0 = threadIdx.x / G, c = (threadIdx.x % G) * 4;
#pragma unroll
    for (int u = 0; u < AM / RS; ++u) {
        const int r = r0 + u * RS;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (ALL || (r < nr && c < nc)) v = *reinterpret_cast<const float4 *>(src + r * NC + c);
        /* selects, not products: stale staging data may be anything */
        if (!ALL) {
            v.y = c + 1 < nc ? v.y : 0.0f;
            v.z = c + 2 < nc ? v.z : 0.0f;
            v.w = c + 3 < nc ? v.w : 0.0f;
        }
        *reinterpret_cast<uint2 *>(dst + r * (NC + AM_PAD) + c) = make_uint2(am_pack(v.x, v.y), am_pack(v.z, v.w));
    }
}

/* The A operand (bf16) of rows row0 + g and row0 + g + 8 (lane (g, t)) of
 * a token-major fp32 matrix, row r at src + r * stride, straight from
 * global memory: a[kk] covers columns 16kk..16kk+15 in the m16n8k16 order
 * (row g cols 2t, 2t+1; row g+8 the same; then both rows at cols + 8).
 * Rows >= nr and columns >= nc are zero. Read once per block. */
template <int NK>
__device__ __forceinline__ void am_frag_rows(uint32_t a[NK][4], const float *src, size_t stride, int row0, int nr,
                                             int nc, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = row0 + g + 8 * h;
        const bool ok = r < nr;
        const float *row = src + (size_t)(ok ? r : 0) * stride;
#pragma unroll
        for (int kk = 0; kk < NK; ++kk)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int c = 16 * kk + 8 * half + 2 * t;
                const float x = ok && c < nc ? row[c] : 0.0f, y = ok && c + 1 < nc ? row[c + 1] : 0.0f;
                a[kk][h + 2 * half] = am_pack(x, y);
            }
    }
}

/* acc = A Bs^T for the 16 columns 16np..16np+15 of a tile (accumulator
 * tiles 2np and 2np + 1) over the warp's 16 rows: A as fragments
 * (am_frag_rows), Bs as [64 columns][reduction] (row stride ld). */
template <int NK>
__device__ __forceinline__ void am_group_rbt(float acc[2][4], const uint32_t a[NK][4], const bf16 *Bs, int ld,
                                             int lane, int np) {
    acc[0][0] = acc[0][1] = acc[0][2] = acc[0][3] = 0.0f;
    acc[1][0] = acc[1][1] = acc[1][2] = acc[1][3] = 0.0f;
    const bf16 *b_at = Bs + (np * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * ld + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
        uint32_t b[4];
        am_ldsm4(b, b_at + kk * 16);
        am_mma(acc[0], a[kk], b[0], b[1]);
        am_mma(acc[1], a[kk], b[2], b[3]);
    }
}

/* The same over all 64 columns, as 8 accumulator tiles; only the groups np
 * in [nlo, nhi) are computed, the others are left zero (the caller's mask
 * covers them). */
template <int NK>
__device__ __forceinline__ void am_tile_rbt(float acc[8][4], const uint32_t a[NK][4], const bf16 *Bs, int ld, int lane,
                                            int nlo, int nhi) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
        if (np < nlo || np >= nhi) {
            acc[2 * np][0] = acc[2 * np][1] = acc[2 * np][2] = acc[2 * np][3] = 0.0f;
            acc[2 * np + 1][0] = acc[2 * np + 1][1] = acc[2 * np + 1][2] = acc[2 * np + 1][3] = 0.0f;
        } else {
            am_group_rbt<NK>(&acc[2 * np], a, Bs, ld, lane, np);
        }
    }
}

/* acc += X Ys for one reduction step kk (16 rows of Ys) over the warp's 16
 * rows: X the warp's accumulator tiles 2kk and 2kk + 1 (16 x 16 fp32,
 * rounded to bf16 here), Ys as [64 = reduction][NO * 8 columns] (row
 * stride ld). */
template <int NO>
__device__ __forceinline__ void am_group_xy(float acc[NO][4], const float x[2][4], const bf16 *Ys, int ld, int lane,
                                            int kk) {
    const int yrow = (lane & 7) + ((lane >> 3) & 1) * 8, ycol = ((lane >> 4) & 1) * 8;
    const uint32_t a[4] = {am_pack(x[0][0], x[0][1]), am_pack(x[0][2], x[0][3]), am_pack(x[1][0], x[1][1]),
                           am_pack(x[1][2], x[1][3])};
#pragma unroll
    for (int np = 0; np < NO / 2; ++np) {
        uint32_t b[4];
        am_ldsm4_t(b, Ys + (kk * 16 + yrow) * ld + np * 16 + ycol);
        am_mma(acc[2 * np], a, b[0], b[1]);
        am_mma(acc[2 * np + 1], a, b[2], b[3]);
    }
}

/* The same over the whole 64-row reduction, X as 8 accumulator tiles; only
 * the steps kk in [klo, khi) are taken: the caller's X is zero outside
 * them, so the others would add exact zeros. */
template <int NO>
__device__ __forceinline__ void am_tile_xy(float acc[NO][4], const float x[8][4], const bf16 *Ys, int ld, int lane,
                                           int klo, int khi) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
        if (kk >= klo && kk < khi) am_group_xy<NO>(acc, &x[2 * kk], Ys, ld, lane, kk);
}

/* Columns c and c + 1 (those < hd) of an output row: as they are in fp32;
 * in bf16 (the operand copy of a saved activation: keep_activations) as
 * one pair where hd is even (4-byte aligned), else one by one. */
__device__ __forceinline__ void am_store_pair(float *row, int c, int hd, float a, float b) {
    if (c < hd) row[c] = a;
    if (c + 1 < hd) row[c + 1] = b;
}
__device__ __forceinline__ void am_store_pair(bf16 *row, int c, int hd, float a, float b) {
    if (c + 1 < hd && hd % 2 == 0) {
        *reinterpret_cast<__nv_bfloat162 *>(row + c) = __floats2bfloat162_rn(a, b);
        return;
    }
    if (c < hd) row[c] = __float2bfloat16_rn(a);
    if (c + 1 < hd) row[c + 1] = __float2bfloat16_rn(b);
}

/* Rows i and i + 8 of a token-major tensor of fp32 or bf16 (row r at dst +
 * r * stride) from the lane's NO x 4 accumulators, columns < hd, rows < S. */
template <int NO, class Out>
__device__ __forceinline__ void am_store_rows(Out *dst, size_t stride, int i, int S, int hd, int t,
                                              const float acc[NO][4]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (i + 8 * r >= S) continue;
        Out *row = dst + (size_t)(i + 8 * r) * stride;
#pragma unroll
        for (int n = 0; n < NO; ++n) am_store_pair(row, 8 * n + 2 * t, hd, acc[n][2 * r], acc[n][2 * r + 1]);
    }
}

/* Blocks are numbered tile index first, heaviest first: block x is head
 * x % nbh, the (x / nbh)-th heaviest tile. */
__device__ __forceinline__ void am_block(int nt, int &bh, int &rank) {
    const int nbh = (int)(gridDim.x / nt);
    bh = (int)(blockIdx.x % nbh);
    rank = (int)(blockIdx.x / nbh);
}

/* A compile-time flag for the loop bodies, which are generic lambdas called
 * once with AmFlag<true> (the diagonal tile: causal mask, fully masked
 * groups skipped) and once with AmFlag<false> (every other tile: no mask at
 * all, since all its keys precede all the block's queries). */
template <bool B>
struct AmFlag {
    static constexpr bool value = B;
};

/* 2^x in one instruction (relative error about 2^-22, subnormal results
 * flushed to zero): the forward's softmax runs in base 2, with log2(e)
 * folded into the score scale, instead of expf's ten instructions. */
__device__ __forceinline__ float am_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* Each kernel comes in two forms. FULL (the host checks): S a multiple of
 * 64, hd = HDW and every vector access allowed, so no bounds are checked
 * anywhere; otherwise rows past S and columns past hd are masked as they
 * come. */

/* Forward, block (b, h, query tile qt): one pass over the key tiles kt <= qt
 * with a running row max m of the raw scores and sum l of 2^((score - m)
 * scale2) (online softmax): a tile's exponentials are taken against the
 * new max, and l and the output accumulators are rescaled by 2^((m_old -
 * m) scale2) before the tile's P V is added. At the end out = acc / l, and
 * lse = m scale2 + log2(l) goes to lse[bh * S + i]. Shared memory: fp32
 * staging for a K and a V tile (cp.async), their bf16 copies; Q stays in
 * registers. scale2 = log2(e) / sqrt(hd): the scores in base 2. At
 * hd <= 64, 155 registers: 3 blocks a multiprocessor; capped at 128 for 4
 * blocks it spilled and took 20.3 us instead of 19.4. */
template <int HDW, bool FULL>
__global__ void __launch_bounds__(AM_THREADS, 1)
attention_fwd_mma_kernel(const float *qkv, float *out, float *lse, int S, int H, int hd, float scale2, int vec,
                         bf16 *out_bf16) {
    constexpr int LD = HDW + AM_PAD, NK = HDW / 16, NO = HDW / 8;
    extern __shared__ float4 am_smem4[];
    float *K32 = reinterpret_cast<float *>(am_smem4), *V32 = K32 + AM * HDW;
    bf16 *Ks = reinterpret_cast<bf16 *>(V32 + AM * HDW), *Vs = Ks + AM * LD;
    const int nt = (S + AM - 1) / AM;
    int bh, rank;
    am_block(nt, bh, rank);
    const int qt = nt - 1 - rank;
    const int h = bh % H, b = bh / H;
    const size_t C = (size_t)H * hd, tok = 3 * C;
    const float *base = qkv + (size_t)b * S * tok + (size_t)h * hd;
    const float *kbase = base + C, *vbase = base + 2 * C;
    const size_t tile = (size_t)AM * tok; /* from one key tile to the next */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
    const int r0 = qt * AM;
    const int i0 = r0 + warp * 16 + (lane >> 2); /* the lane's rows: i0 and i0 + 8 */
    const bool vq = FULL || (vec & AM_VEC_QKV);
    const int ncol = FULL ? HDW : hd;
    auto rows = [&](int kt) { return FULL ? AM : S - kt * AM; }; /* rows of tile kt that exist */
    auto load = [&](int kt) {
        am_copy_tile<HDW, AM_THREADS, FULL>(K32, HDW, kbase + kt * tile, tok, rows(kt), ncol, vq);
        am_copy_tile<HDW, AM_THREADS, FULL>(V32, HDW, vbase + kt * tile, tok, rows(kt), ncol, vq);
        am_async_commit();
    };

    load(0);
    uint32_t qa[NK][4];
    am_frag_rows<NK>(qa, base + (size_t)r0 * tok, tok, warp * 16, rows(qt), ncol, lane);

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float o[NO][4] = {};
    for (int kt = 0; kt <= qt; ++kt) {
        am_async_wait();
        __syncthreads(); /* tile kt staged for all; the last tile's Ks and Vs readers are done */
        am_convert<HDW, AM_THREADS, FULL>(Ks, K32, rows(kt), ncol);
        am_convert<HDW, AM_THREADS, FULL>(Vs, V32, rows(kt), ncol);
        __syncthreads();
        if (kt < qt) load(kt + 1);
        auto step = [&](auto dg) {
            constexpr bool DIAG = decltype(dg)::value;
            /* on the diagonal, the warp's rows see only the column groups np <= warp */
            const int nhi = DIAG ? warp + 1 : 4;
            float s[8][4];
            am_tile_rbt<NK>(s, qa, Ks, LD, lane, 0, nhi);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = i0 + 8 * r;
                float mx[2] = {-INFINITY, -INFINITY}; /* two chains each, for latency */
#pragma unroll
                for (int n = 0; n < 8; ++n)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        if (DIAG && kt * AM + 8 * n + 2 * t + e > i) s[n][2 * r + e] = -INFINITY;
                        mx[e] = fmaxf(mx[e], s[n][2 * r + e]);
                    }
                /* finite: key kt * 64 <= i for every row of a tile qt >= kt */
                const float mnew = fmaxf(m[r], am_quad_max(fmaxf(mx[0], mx[1])));
                const float alpha = am_ex2((m[r] - mnew) * scale2); /* 0 on the first tile (m = -inf) */
                const float neg = -mnew * scale2;
                float sum[2] = {0.0f, 0.0f};
#pragma unroll
                for (int n = 0; n < 8; ++n)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float p = am_ex2(__fmaf_rn(s[n][2 * r + e], scale2, neg)); /* masked: 0 */
                        s[n][2 * r + e] = p;
                        sum[e] += p;
                    }
                l[r] = l[r] * alpha + am_quad_sum(sum[0] + sum[1]);
                m[r] = mnew;
#pragma unroll
                for (int n = 0; n < NO; ++n) {
                    o[n][2 * r] *= alpha;
                    o[n][2 * r + 1] *= alpha;
                }
            }
            am_tile_xy<NO>(o, s, Vs, LD, lane, 0, nhi);
        };
        if (kt == qt)
            step(AmFlag<true>());
        else
            step(AmFlag<false>());
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float inv = 1.0f / l[r]; /* l >= 1: the max term is 2^0 */
#pragma unroll
        for (int n = 0; n < NO; ++n) {
            o[n][2 * r] *= inv;
            o[n][2 * r + 1] *= inv;
        }
    }
    am_store_rows<NO>(out + (size_t)b * S * C + (size_t)h * hd, C, i0, S, hd, t, o);
    if (out_bf16) am_store_rows<NO>(out_bf16 + (size_t)b * S * C + (size_t)h * hd, C, i0, S, hd, t, o);
    if (t == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
            if (FULL || i0 + 8 * r < S) lse[(size_t)bh * S + i0 + 8 * r] = m[r] * scale2 + log2f(l[r]);
    }
}

/* Backward, block (b, h, query tile qt), two passes over the key tiles
 * kt <= qt. Pass 1: P = 2^(Q K^T scale2 - lse) and dP = dO V^T, and the row
 * sums D_i = sum_j P_ij dP_ij, stored for the dK/dV kernel. Pass 2: P and
 * dP again (the same MMAs on the same operands: the same bits), dS = P (dP
 * - D) / sqrt(hd) and dQ = dS K. A warp takes one 16-key group at a time
 * from scores to dS to dQ, so only 8 score and 8 dP registers live next to
 * the dQ accumulators. Shared memory: fp32 staging for a K and a V tile,
 * their bf16 copies; Q and dO stay in registers. At hd <= 64, 137
 * registers: 3 blocks a multiprocessor; capped at 128 for 4 blocks it
 * spilled and took 34.3 us instead of 30.8. */
template <int HDW, bool FULL>
__global__ void __launch_bounds__(AM_THREADS)
attention_bwd_q_mma_kernel(const float *qkv, const float *lse, const float *dout, float *dqkv, float *Dsum, int S,
                           int H, int hd, float scale, float scale2, int vec) {
    constexpr int LD = HDW + AM_PAD, NK = HDW / 16, NO = HDW / 8;
    extern __shared__ float4 am_smem4[];
    float *K32 = reinterpret_cast<float *>(am_smem4), *V32 = K32 + AM * HDW;
    bf16 *Ks = reinterpret_cast<bf16 *>(V32 + AM * HDW), *Vs = Ks + AM * LD;
    const int nt = (S + AM - 1) / AM;
    int bh, rank;
    am_block(nt, bh, rank);
    const int qt = nt - 1 - rank;
    const int h = bh % H, b = bh / H;
    const size_t C = (size_t)H * hd, tok = 3 * C;
    const float *base = qkv + (size_t)b * S * tok + (size_t)h * hd;
    const float *kbase = base + C, *vbase = base + 2 * C;
    const size_t tile = (size_t)AM * tok;
    const float *gbase = dout + (size_t)b * S * C + (size_t)h * hd;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
    const int r0 = qt * AM;
    const int i0 = r0 + warp * 16 + (lane >> 2);
    const bool vq = FULL || (vec & AM_VEC_QKV);
    const int ncol = FULL ? HDW : hd;
    auto rows = [&](int kt) { return FULL ? AM : S - kt * AM; };
    auto load = [&](int kt) {
        am_copy_tile<HDW, AM_THREADS, FULL>(K32, HDW, kbase + kt * tile, tok, rows(kt), ncol, vq);
        am_copy_tile<HDW, AM_THREADS, FULL>(V32, HDW, vbase + kt * tile, tok, rows(kt), ncol, vq);
        am_async_commit();
    };
    /* K and V tile kt, staged, into Ks and Vs; then tile `next` (if >= 0) starts staging */
    auto stage = [&](int kt, int next) {
        am_async_wait();
        __syncthreads(); /* tile kt staged for all; the last tile's Ks and Vs readers are done */
        am_convert<HDW, AM_THREADS, FULL>(Ks, K32, rows(kt), ncol);
        am_convert<HDW, AM_THREADS, FULL>(Vs, V32, rows(kt), ncol);
        __syncthreads();
        if (next >= 0) load(next);
    };

    load(0);
    uint32_t qa[NK][4], ga[NK][4];
    am_frag_rows<NK>(qa, base + (size_t)r0 * tok, tok, warp * 16, rows(qt), ncol, lane);
    am_frag_rows<NK>(ga, gbase + (size_t)r0 * C, C, warp * 16, rows(qt), ncol, lane);
    const bool row_ok[2] = {FULL || i0 < S, FULL || i0 + 8 < S};
    float L[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) L[r] = row_ok[r] ? lse[(size_t)bh * S + i0 + 8 * r] : 0.0f;

    /* P and dP of the warp's rows and the keys of group np of tile kt
     * (columns 16np..16np+15); P is 0 outside the causal mask and on rows
     * past S (selects, not products: their lse was never written) */
    auto group = [&](auto dg, int kt, int np, float p[2][4], float dp[2][4]) {
        constexpr bool DIAG = decltype(dg)::value;
        am_group_rbt<NK>(p, qa, Ks, LD, lane, np);
        am_group_rbt<NK>(dp, ga, Vs, LD, lane, np);
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int nn = 0; nn < 2; ++nn)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = kt * AM + 16 * np + 8 * nn + 2 * t + e;
                    const bool ok = row_ok[r] && (!DIAG || j <= i0 + 8 * r);
                    const float x = am_ex2(__fmaf_rn(p[nn][2 * r + e], scale2, -L[r]));
                    p[nn][2 * r + e] = ok ? x : 0.0f;
                }
    };

    float D[2] = {0.0f, 0.0f};
    for (int kt = 0; kt <= qt; ++kt) {
        stage(kt, kt < qt ? kt + 1 : 0); /* after the last tile, pass 2's first */
        auto row_sums = [&](auto dg) {
            constexpr bool DIAG = decltype(dg)::value;
            const int nhi = DIAG ? warp + 1 : 4;
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                if (np >= nhi) continue;
                float p[2][4], dp[2][4];
                group(dg, kt, np, p, dp);
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float a[2] = {0.0f, 0.0f}; /* two chains, for latency */
#pragma unroll
                    for (int nn = 0; nn < 2; ++nn)
#pragma unroll
                        for (int e = 0; e < 2; ++e) a[e] += p[nn][2 * r + e] * dp[nn][2 * r + e];
                    D[r] += a[0] + a[1];
                }
            }
        };
        if (kt == qt)
            row_sums(AmFlag<true>());
        else
            row_sums(AmFlag<false>());
    }
    D[0] = am_quad_sum(D[0]);
    D[1] = am_quad_sum(D[1]);
    if (t == 0) {
        if (row_ok[0]) Dsum[(size_t)bh * S + i0] = D[0];
        if (row_ok[1]) Dsum[(size_t)bh * S + i0 + 8] = D[1];
    }

    float dq[NO][4] = {};
    for (int kt = 0; kt <= qt; ++kt) {
        stage(kt, kt < qt ? kt + 1 : -1);
        auto ds_dq = [&](auto dg) {
            constexpr bool DIAG = decltype(dg)::value;
            const int nhi = DIAG ? warp + 1 : 4;
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                if (np >= nhi) continue;
                float p[2][4], dp[2][4];
                group(dg, kt, np, p, dp);
#pragma unroll
                for (int r = 0; r < 2; ++r)
#pragma unroll
                    for (int nn = 0; nn < 2; ++nn)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                            p[nn][2 * r + e] = p[nn][2 * r + e] * (dp[nn][2 * r + e] - D[r]) * scale;
                am_group_xy<NO>(dq, p, Ks, LD, lane, np);
            }
        };
        if (kt == qt)
            ds_dq(AmFlag<true>());
        else
            ds_dq(AmFlag<false>());
    }
    am_store_rows<NO>(dqkv + (size_t)b * S * tok + (size_t)h * hd, tok, i0, S, hd, t, dq);
}

/* Named barriers between a dK warp and the dV warp of the same keys (ids
 * 1-4; 0 is __syncthreads'): the dV warp arrives once its P^T is in shared
 * memory and goes on, the dK warp waits for it. Both order the shared
 * memory accesses before them for the 64 threads of the pair. */
__device__ __forceinline__ void am_pair_arrive(int id) {
    asm volatile("bar.arrive %0, 64;\n" ::"r"(id) : "memory");
}
__device__ __forceinline__ void am_pair_wait(int id) { asm volatile("bar.sync %0, 64;\n" ::"r"(id) : "memory"); }

/* Backward, block (b, h, key tile kt): dK = dS^T Q and dV = P^T dO over the
 * query tiles it >= kt, in query order, with P^T = 2^(K Q^T scale2 - lse)
 * and dS^T = P^T (V dO^T - D) / sqrt(hd) recomputed here (K and V of the
 * block's keys in registers, lse and D of each query tile staged with it).
 * 8 warps: warps 0-3 make dK, warps 4-7 dV, each for 16 keys, so a thread
 * holds one HDW-wide accumulator row pair instead of two. A step is two
 * products for each: the dV warp w + 4 makes P^T = 2^(K Q^T scale2 - lse),
 * hands it to the dK warp w of the same keys through shared memory, and
 * adds P^T dO; the dK warp makes dP^T = V dO^T meanwhile, then takes P^T
 * and adds dS^T Q. (With each half computing P^T itself, the dK warps did
 * three products a step and the kernel took 36.4 us instead of 34.7 at the
 * shape above.) At hd <= 64 the bound of 2 blocks a multiprocessor keeps
 * it at 128 registers; left alone, ptxas took 132, and one block fits.
 * Shared memory: fp32 staging for a Q and a dO tile, two lse and two D rows
 * (the tile in use and the next), bf16 copies of Q and dO, and the fp32
 * P^T of the step, held in the lanes' accumulator order (a lane writes and
 * its partner reads the same float4s: no bank conflicts). */
template <int HDW, bool FULL>
__global__ void __launch_bounds__(AM_KV_THREADS, HDW == 64 ? 2 : 1)
attention_bwd_kv_mma_kernel(const float *qkv, const float *lse, const float *dout, const float *Dsum, float *dqkv,
                            int S, int H, int hd, float scale, float scale2, int vec) {
    constexpr int LD = HDW + AM_PAD, NK = HDW / 16, NO = HDW / 8;
    extern __shared__ float4 am_smem4[];
    float4 *Pbuf = am_smem4; /* [4 key groups][4 query groups][2 tiles][32 lanes] */
    float *Q32 = reinterpret_cast<float *>(Pbuf + 4 * 4 * 2 * 32), *G32 = Q32 + AM * HDW;
    float *Lbuf = G32 + AM * HDW; /* [2][AM] */
    float *Dbuf = Lbuf + 2 * AM;  /* [2][AM] */
    bf16 *Qs = reinterpret_cast<bf16 *>(Dbuf + 2 * AM), *Gs = Qs + AM * LD;
    const int nt = (S + AM - 1) / AM;
    int bh, kt;
    am_block(nt, bh, kt); /* heavy tiles (small kt) first */
    const int h = bh % H, b = bh / H;
    const size_t C = (size_t)H * hd, tok = 3 * C;
    const float *base = qkv + (size_t)b * S * tok + (size_t)h * hd;
    const float *gbase = dout + (size_t)b * S * C + (size_t)h * hd;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3, g = lane >> 2;
    const bool is_v = warp >= 4; /* uniform per warp */
    const int wr = warp & 3;     /* the warp's keys: j0 + 16 wr + (0..15) */
    const int j0 = kt * AM;
    const bool vq = FULL || (vec & AM_VEC_QKV), vg = FULL || (vec & AM_VEC_DOUT);
    const int ncol = FULL ? HDW : hd;
    auto rows = [&](int it) { return FULL ? AM : S - it * AM; };
    const float *Lrow = lse + (size_t)bh * S, *Drow = Dsum + (size_t)bh * S;
    /* query tile it into the staging buffers, its lse and D into buffers it & 1 */
    auto load = [&](int it) {
        const int i0 = it * AM, u = it & 1, n = min(AM, rows(it)), x = threadIdx.x;
        am_copy_tile<HDW, AM_KV_THREADS, FULL>(Q32, HDW, base + (size_t)i0 * tok, tok, rows(it), ncol, vq);
        am_copy_tile<HDW, AM_KV_THREADS, FULL>(G32, HDW, gbase + (size_t)i0 * C, C, rows(it), ncol, vg);
        if (x < n)
            am_cp4(am_smem_addr(Lbuf + u * AM + x), Lrow + i0 + x);
        else if (x >= AM && x - AM < n)
            am_cp4(am_smem_addr(Dbuf + u * AM + x - AM), Drow + i0 + x - AM);
        am_async_commit();
    };

    load(kt);
    /* the warp's 16 keys: K for the dV warps, V for the dK warps */
    uint32_t kva[NK][4];
    am_frag_rows<NK>(kva, base + (is_v ? C : 2 * C) + (size_t)j0 * tok, tok, wr * 16, rows(kt), ncol, lane);
    float4 *Pw = Pbuf + wr * 4 * 2 * 32 + lane; /* the pair's P^T, group np, tile nn at Pw[(2np + nn) * 32] */

    float acc[NO][4] = {};
    for (int it = kt; it < nt; ++it) {
        const int i0 = it * AM;
        am_async_wait();
        __syncthreads(); /* tile it staged for all; Qs, Gs, Pbuf and the other lse and D rows are no longer read */
        am_convert<HDW, AM_KV_THREADS, FULL>(Qs, Q32, rows(it), ncol);
        am_convert<HDW, AM_KV_THREADS, FULL>(Gs, G32, rows(it), ncol);
        __syncthreads();
        if (it + 1 < nt) load(it + 1);
        /* the lane's queries in group np: i0 + 16np + 8nn + 2t + e, their
         * lse and D at Lt, Dt[16np + 8nn + e] */
        const float *Lt = Lbuf + (it & 1) * AM + 2 * t, *Dt = Dbuf + (it & 1) * AM + 2 * t;
        auto body = [&](auto dg) {
            constexpr bool DIAG = decltype(dg)::value;
            const int klo = DIAG ? wr : 0; /* on the diagonal the warp's keys see only query groups >= wr */
            /* the warp's 16 keys x queries 16np..16np+15: P^T (dV warps) or dP^T (dK warps) */
            float x[4][2][4];
            if (is_v) {
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    if (np < klo) continue;
                    am_group_rbt<NK>(x[np], kva, Qs, LD, lane, np);
#pragma unroll
                    for (int nn = 0; nn < 2; ++nn) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int q = 16 * np + 8 * nn + e, i = i0 + q + 2 * t;
                            const float L = Lt[q];
#pragma unroll
                            for (int hh = 0; hh < 2; ++hh) {
                                const int j = j0 + wr * 16 + g + 8 * hh;
                                /* selects, not products: lse past S was never staged */
                                const bool ok = (FULL || i < S) && (!DIAG || j <= i);
                                const float p = am_ex2(__fmaf_rn(x[np][nn][2 * hh + e], scale2, -L));
                                x[np][nn][2 * hh + e] = ok ? p : 0.0f;
                            }
                        }
                        Pw[(2 * np + nn) * 32] = make_float4(x[np][nn][0], x[np][nn][1], x[np][nn][2], x[np][nn][3]);
                    }
                }
                am_pair_arrive(1 + wr);
#pragma unroll
                for (int np = 0; np < 4; ++np)
                    if (np >= klo) am_group_xy<NO>(acc, x[np], Gs, LD, lane, np);
            } else {
#pragma unroll
                for (int np = 0; np < 4; ++np)
                    if (np >= klo) am_group_rbt<NK>(x[np], kva, Gs, LD, lane, np);
                am_pair_wait(1 + wr);
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    if (np < klo) continue;
#pragma unroll
                    for (int nn = 0; nn < 2; ++nn) {
                        const float4 p4 = Pw[(2 * np + nn) * 32];
                        const float p[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int q = 16 * np + 8 * nn + e;
                            const float d = FULL || i0 + q + 2 * t < S ? Dt[q] : 0.0f;
#pragma unroll
                            for (int hh = 0; hh < 2; ++hh)
                                x[np][nn][2 * hh + e] = p[2 * hh + e] * (x[np][nn][2 * hh + e] - d) * scale;
                        }
                    }
                    am_group_xy<NO>(acc, x[np], Qs, LD, lane, np);
                }
            }
        };
        if (it == kt)
            body(AmFlag<true>());
        else
            body(AmFlag<false>());
    }
    /* dK at column C of a token's dqkv row, dV at 2C */
    float *dst = dqkv + (size_t)b * S * tok + (is_v ? 2 * C : C) + (size_t)h * hd;
    am_store_rows<NO>(dst, tok, j0 + wr * 16 + g, S, hd, t, acc);
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

/* The tensor-core kernels' opt-in, and all of the multiprocessor's unified
 * memory as shared memory: with a smaller carveout the driver may fit fewer
 * blocks than the shared memory sizes allow (the kernels use no L1 reuse:
 * cp.async.cg bypasses it). */
static int am_smem_optin(moe_backend *be, const void *kernel, size_t bytes, const char *what) {
    if (!at_smem_optin(be, kernel, bytes, what)) return 0;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         cudaSharedmemCarveoutMaxShared);
    if (e == cudaSuccess) return 1;
    cuda_record_error(be, __FILE__, __LINE__, what, cudaGetErrorString(e));
    return 0;
}

/* The AM_VEC_* bits the arrays' addresses and the head size allow. */
static int am_vec_flags(const float *qkv, const float *dout, int hd) {
    const uintptr_t a16 = 15;
    int f = 0;
    if (hd % 4 == 0 && ((uintptr_t)qkv & a16) == 0) f |= AM_VEC_QKV;
    if (hd % 4 == 0 && dout && ((uintptr_t)dout & a16) == 0) f |= AM_VEC_DOUT;
    return f;
}

/* Whether a shape takes the FULL form of the kernels (see there). */
template <int HDW>
static bool am_full(int S, int hd, int vec, int need) {
    return S % AM == 0 && hd == HDW && (vec & need) == need;
}

/* log2(e) / sqrt(hd): the scores in base 2; one value for the forward and
 * the backward, whose probabilities must agree with the forward's lse */
static float am_scale2(int hd) { return (float)(1.4426950408889634 / sqrt((double)hd)); }

/* probs: the lse rows go to its first B*H*S floats; the rest is not touched */
template <int HDW>
static void am_fwd(moe_backend *be, const float *qkv, float *out, float *probs, int B, int S, int H, int hd) {
    const unsigned blocks = (unsigned)((size_t)B * H * ((S + AM - 1) / AM));
    const size_t shmem = (size_t)2 * AM * HDW * sizeof(float) + (size_t)2 * AM * (HDW + AM_PAD) * sizeof(bf16);
    const int vec = am_vec_flags(qkv, NULL, hd);
    const bool full = am_full<HDW>(S, hd, vec, AM_VEC_QKV);
    const float scale2 = am_scale2(hd);
    const void *kernel = full ? (const void *)attention_fwd_mma_kernel<HDW, true>
                              : (const void *)attention_fwd_mma_kernel<HDW, false>;
    if (!am_smem_optin(be, kernel, shmem, "attention_fwd")) return;
    cudaStream_t st = cuda_stream(be);
    bf16 *out_bf16 = cuda_activation_copy_target(be, out, (long long)B * S, (long long)H * hd); /* or NULL */
    if (full)
        attention_fwd_mma_kernel<HDW, true>
            <<<blocks, AM_THREADS, shmem, st>>>(qkv, out, probs, S, H, hd, scale2, vec, out_bf16);
    else
        attention_fwd_mma_kernel<HDW, false>
            <<<blocks, AM_THREADS, shmem, st>>>(qkv, out, probs, S, H, hd, scale2, vec, out_bf16);
    KERNEL_CHECK(be, "attention_fwd_mma_kernel");
}

/* probs: as am_fwd left it (the lse rows) */
template <int HDW>
static void am_bwd(moe_backend *be, const float *qkv, const float *probs, const float *dout, float *dqkv, int B,
                   int S, int H, int hd) {
    const unsigned blocks = (unsigned)((size_t)B * H * ((S + AM - 1) / AM));
    float *Dsum = (float *)cuda_scratch(be, (size_t)B * H * S * sizeof(float));
    if (!Dsum) return;
    const int vec = am_vec_flags(qkv, dout, hd);
    const bool full = am_full<HDW>(S, hd, vec, AM_VEC_QKV | AM_VEC_DOUT);
    const float scale = 1.0f / sqrtf((float)hd), scale2 = am_scale2(hd);
    const size_t staged = (size_t)2 * AM * HDW * sizeof(float), bf = (size_t)2 * AM * (HDW + AM_PAD) * sizeof(bf16);
    const size_t sh_q = staged + bf;
    const size_t sh_kv = staged + (size_t)(4 * AM + AM * AM) * sizeof(float) + bf; /* + lse, D rows, P^T */
    const void *kq = full ? (const void *)attention_bwd_q_mma_kernel<HDW, true>
                          : (const void *)attention_bwd_q_mma_kernel<HDW, false>;
    const void *kkv = full ? (const void *)attention_bwd_kv_mma_kernel<HDW, true>
                           : (const void *)attention_bwd_kv_mma_kernel<HDW, false>;
    if (!am_smem_optin(be, kq, sh_q, "attention_bwd")) return;
    if (!am_smem_optin(be, kkv, sh_kv, "attention_bwd")) return;
    cudaStream_t st = cuda_stream(be);
    if (full)
        attention_bwd_q_mma_kernel<HDW, true><<<blocks, AM_THREADS, sh_q, st>>>(qkv, probs, dout, dqkv, Dsum, S, H, hd,
                                                                                scale, scale2, vec);
    else
        attention_bwd_q_mma_kernel<HDW, false><<<blocks, AM_THREADS, sh_q, st>>>(qkv, probs, dout, dqkv, Dsum, S, H,
                                                                                 hd, scale, scale2, vec);
    KERNEL_CHECK(be, "attention_bwd_q_mma_kernel");
    /* after the dQ kernel: it writes the row sums D this one reads */
    if (full)
        attention_bwd_kv_mma_kernel<HDW, true><<<blocks, AM_KV_THREADS, sh_kv, st>>>(qkv, probs, dout, Dsum, dqkv, S,
                                                                                     H, hd, scale, scale2, vec);
    else
        attention_bwd_kv_mma_kernel<HDW, false><<<blocks, AM_KV_THREADS, sh_kv, st>>>(qkv, probs, dout, Dsum, dqkv, S,
                                                                                      H, hd, scale, scale2, vec);
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
