/*
 * LayerNorm, RMSNorm and the activations on the GPU.
 *
 * The norms give one warp to each row of d: the row's sums are warp
 * reductions (no shared memory, no block barrier), and the row, re-read for
 * each pass, stays in L1. The weight gradients dg, db are sums over rows:
 * LayerNorm's fused backward adds them per block of rows and finishes them
 * in its own last blocks (ln_finish_chunks); its fallback for wide rows and
 * RMSNorm's backward use the column sums of cuda_common.cuh
 * (colsum_accumulate). A fixed order either way, no float atomics.
 */
#include <stdio.h>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/cuda_act.cuh"

constexpr int NORM_ROWS_PER_BLOCK = CUDA_THREADS / 32; /* one warp per row */

static unsigned norm_blocks(int T) { return (unsigned)((T + NORM_ROWS_PER_BLOCK - 1) / NORM_ROWS_PER_BLOCK); }

/* ------------------------------------------------------------------ */
/* LayerNorm                                                           */
/* ------------------------------------------------------------------ */

__global__ void layernorm_fwd_kernel(const float *x, const float *g, const float *b, float *y,
                                     float *mean, float *rstd, int T, int d, float eps) {
    const int row = blockIdx.x * NORM_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= T) return; /* the whole warp leaves together */
    const float *xr = x + (size_t)row * d;
    float *yr = y + (size_t)row * d;
    float s = 0.0f;
    for (int i = lane; i < d; i += 32) s += xr[i];
    const float m = warp_sum(s) / (float)d;
    /* variance from the centred values (two passes): no cancellation */
    float v = 0.0f;
    for (int i = lane; i < d; i += 32) {
        float c = xr[i] - m;
        v += c * c;
    }
    const float var = warp_sum(v) / (float)d;
    const float r = 1.0f / sqrtf(var + eps);
    for (int i = lane; i < d; i += 32) yr[i] = (xr[i] - m) * r * g[i] + b[i];
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

/* The same for d = 128 V (V <= 8) with 16-byte aligned rows: a lane holds
 * V float4 of its row (columns 4 lane + 128 k ..) in registers, so the row
 * is read from memory once instead of three times. Same arithmetic; the
 * sums run in a different (fixed) order. When y_bf16 is not NULL (y is a
 * saved activation: keep_activations) the rows are also stored rounded to
 * bf16 there, the operand copy the GEMMs that read y would have made. */
template <int V>
__global__ void layernorm_fwd_vec_kernel(const float *x, const float *g, const float *b, float *y, float *mean,
                                         float *rstd, int T, float eps, __nv_bfloat16 *y_bf16) {
    constexpr int d = 128 * V;
    const int row = blockIdx.x * NORM_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= T) return;
    const float4 *xr = reinterpret_cast<const float4 *>(x + (size_t)row * d);
    float4 v[V];
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        v[k] = xr[lane + 32 * k];
        s += (v[k].x + v[k].y) + (v[k].z + v[k].w);
    }
    const float m = warp_sum(s) / (float)d;
    float q = 0.0f;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const float a = v[k].x - m, bb = v[k].y - m, c = v[k].z - m, e = v[k].w - m;
        q += (a * a + bb * bb) + (c * c + e * e);
    }
    const float r = 1.0f / sqrtf(warp_sum(q) / (float)d + eps);
    const float4 *g4 = reinterpret_cast<const float4 *>(g), *b4 = reinterpret_cast<const float4 *>(b);
    float4 *yr = reinterpret_cast<float4 *>(y + (size_t)row * d);
    uint2 *yh = y_bf16 ? reinterpret_cast<uint2 *>(y_bf16 + (size_t)row * d) : nullptr;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const float4 gg = g4[lane + 32 * k], bv = b4[lane + 32 * k];
        const float4 out = make_float4((v[k].x - m) * r * gg.x + bv.x, (v[k].y - m) * r * gg.y + bv.y,
                                       (v[k].z - m) * r * gg.z + bv.z, (v[k].w - m) * r * gg.w + bv.w);
        yr[lane + 32 * k] = out;
        if (yh) yh[lane + 32 * k] = pack_bf16x4(out.x, out.y, out.z, out.w);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

static bool rows_vec4(const void *p) { return (uintptr_t)p % 16 == 0; }

void cuda_layernorm_fwd(moe_backend *be, const float *x, const float *g, const float *b, float *y,
                        float *mean, float *rstd, int T, int d, float eps) {
    if (T <= 0 || d <= 0) return;
    const bool vec = d % 128 == 0 && d <= 1024 && rows_vec4(x) && rows_vec4(y) && rows_vec4(g) && rows_vec4(b);
    if (vec) {
        typedef void (*kernel_fn)(const float *, const float *, const float *, float *, float *, float *, int,
                                  float, __nv_bfloat16 *);
        static const kernel_fn by_v[8] = {layernorm_fwd_vec_kernel<1>, layernorm_fwd_vec_kernel<2>,
                                          layernorm_fwd_vec_kernel<3>, layernorm_fwd_vec_kernel<4>,
                                          layernorm_fwd_vec_kernel<5>, layernorm_fwd_vec_kernel<6>,
                                          layernorm_fwd_vec_kernel<7>, layernorm_fwd_vec_kernel<8>};
        __nv_bfloat16 *y_bf16 = cuda_activation_copy_target(be, y, T, d); /* NULL unless y is a saved activation */
        by_v[d / 128 - 1]<<<norm_blocks(T), CUDA_THREADS, 0, cuda_stream(be)>>>(x, g, b, y, mean, rstd, T, eps,
                                                                                y_bf16);
        KERNEL_CHECK(be, "layernorm_fwd_vec_kernel");
        return;
    }
    layernorm_fwd_kernel<<<norm_blocks(T), CUDA_THREADS, 0, cuda_stream(be)>>>(x, g, b, y, mean, rstd,
                                                                                T, d, eps);
    KERNEL_CHECK(be, "layernorm_fwd_kernel");
}

/* dx += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
 * xhat = (x - mean) * rstd, dxhat = dy * g. */
__global__ void layernorm_bwd_dx_kernel(const float *x, const float *g, const float *mean,
                                        const float *rstd, const float *dy, float *dx, int T, int d) {
    const int row = blockIdx.x * NORM_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= T) return;
    const float *xr = x + (size_t)row * d, *dyr = dy + (size_t)row * d;
    float *dxr = dx + (size_t)row * d;
    const float m = mean[row], r = rstd[row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int i = lane; i < d; i += 32) {
        float xhat = (xr[i] - m) * r;
        float dxhat = dyr[i] * g[i];
        s1 += dxhat;
        s2 += dxhat * xhat;
    }
    const float mean_dxhat = warp_sum(s1) / (float)d;
    const float mean_dxhat_xhat = warp_sum(s2) / (float)d;
    for (int i = lane; i < d; i += 32) {
        float xhat = (xr[i] - m) * r;
        float dxhat = dyr[i] * g[i];
        dxr[i] += r * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
    }
}

/* dg[j] = sum_t dy * xhat, written as (dy * (x - mean)) * rstd like the CPU. */
struct layernorm_dg_term {
    const float *x, *dy, *mean, *rstd;
    int d;
    __device__ float operator()(int t, int j) const {
        size_t k = (size_t)t * d + j;
        return dy[k] * (x[k] - mean[t]) * rstd[t];
    }
};

struct layernorm_db_term {
    const float *dy;
    int d;
    __device__ float operator()(int t, int j) const { return dy[(size_t)t * d + j]; }
};

/* The whole LayerNorm backward in one launch, for d a multiple of 32 up to
 * 32 * LN_MAX_COLS_PER_LANE: a block takes LN_CHUNK rows, a warp every
 * NORM_ROWS_PER_BLOCK-th of them; for each row it adds dx as
 * layernorm_bwd_dx_kernel does and keeps its lanes' dg and db terms in
 * registers (lane l owns columns l, l + 32, ...). The warps' sums are then
 * added in warp order into the block's partial, a row of 2d floats (dg's d
 * columns, then db's), and ln_finish_chunks adds the chunks' partials in a
 * fixed order inside the same launch, so the result repeats bit for bit. */
/* 4 rows per warp: 256 blocks for 8192 rows. On the H100, 16 rows (twice the
 * partials to add) and 64 (too few blocks) were slower. */
constexpr int LN_CHUNK = 32;
constexpr int LN_MAX_COLS_PER_LANE = 16;

/* The chunks' partials summed into dg and db by the kernel's last blocks
 * (last_block_arrived), in two levels: lane y < LN_FINISH_LANES adds chunks
 * y, y + LN_FINISH_LANES, ... in chunk order, done by the last of those
 * chunks' blocks to arrive; the last lane to be done adds the lane sums in
 * lane order into dg and db. A fixed order, and the one of a finishing pass
 * with LN_FINISH_LANES lanes per column. Two levels so that a finishing
 * block reads nchunks / LN_FINISH_LANES or LN_FINISH_LANES rows of 2d
 * floats, not nchunks (a single last block reading all 256 chunks of 8192
 * rows, 512 KiB at d = 256, took 12 us after the rows on the H100). The two
 * levels take 3.5-4 us after the rows there, about what a separate
 * finishing kernel took with its launch; the launch is saved. Tickets: [0]
 * counts the lanes, [1 + y] lane y's chunks. */
constexpr int LN_FINISH_LANES = 32;
constexpr int LN_TICKETS = 1 + LN_FINISH_LANES;
static_assert(LN_TICKETS <= CUDA_TICKETS, "the LayerNorm finish takes LN_TICKETS of the backend's tickets");

/* Called by every thread of every block once its partial row is written.
 * partial: [nchunks][2d]; lane_sums: [LN_FINISH_LANES][2d] scratch. */
__device__ void ln_finish_chunks(const float *partial, float *lane_sums, int nchunks, int d, float *dg, float *db,
                                 int *tickets) {
    const int lane = (int)(blockIdx.x % LN_FINISH_LANES);
    const unsigned lane_chunks = (unsigned)((nchunks - lane + LN_FINISH_LANES - 1) / LN_FINISH_LANES);
    if (!last_block_arrived(&tickets[1 + lane], lane_chunks)) return;
    /* a row of 2d floats read as d float2 (d is even, rows 8-byte aligned) */
    const float2 *p2 = reinterpret_cast<const float2 *>(partial);
    float2 *s2 = reinterpret_cast<float2 *>(lane_sums);
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float2 s = make_float2(0.0f, 0.0f);
#pragma unroll 8 /* independent loads in flight; the adds stay in chunk order */
        for (int c = lane; c < nchunks; c += LN_FINISH_LANES) {
            const float2 v = __ldcg(&p2[(size_t)c * d + j]);
            s.x += v.x;
            s.y += v.y;
        }
        s2[(size_t)lane * d + j] = s;
    }
    const int nlanes = min(nchunks, LN_FINISH_LANES);
    if (!last_block_arrived(&tickets[0], (unsigned)nlanes)) return;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float2 t = __ldcg(&s2[j]);
#pragma unroll
        for (int y = 1; y < LN_FINISH_LANES; ++y) {
            /* a lane with no chunk sums to 0, still added: the order above */
            const float2 v = y < nlanes ? __ldcg(&s2[(size_t)y * d + j]) : make_float2(0.0f, 0.0f);
            t.x += v.x;
            t.y += v.y;
        }
        const int col = 2 * j; /* partial columns col, col + 1: dg's below d, db's from d on */
        float *out = col < d ? dg + col : db + (col - d);
        out[0] += t.x;
        out[1] += t.y;
    }
}

__global__ void __launch_bounds__(CUDA_THREADS)
layernorm_bwd_fused_kernel(const float *x, const float *g, const float *mean, const float *rstd, const float *dy,
                           float *dx, int T, int d, float *partial, float *lane_sums, float *dg, float *db,
                           int *tickets) {
    extern __shared__ float ln_smem[]; /* [NORM_ROWS_PER_BLOCK][2][d] */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int ncols = d / 32;
    float dg_acc[LN_MAX_COLS_PER_LANE], db_acc[LN_MAX_COLS_PER_LANE];
#pragma unroll
    for (int k = 0; k < LN_MAX_COLS_PER_LANE; ++k) dg_acc[k] = db_acc[k] = 0.0f;
    const int r0 = blockIdx.x * LN_CHUNK, r1 = min(T, r0 + LN_CHUNK);
    for (int row = r0 + warp; row < r1; row += NORM_ROWS_PER_BLOCK) {
        const float *xr = x + (size_t)row * d, *dyr = dy + (size_t)row * d;
        float *dxr = dx + (size_t)row * d;
        const float m = mean[row], r = rstd[row];
        float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
        for (int k = 0; k < LN_MAX_COLS_PER_LANE; ++k) {
            if (k >= ncols) break;
            const int i = lane + 32 * k;
            const float xhat = (xr[i] - m) * r, dyv = dyr[i], dxhat = dyv * g[i];
            s1 += dxhat;
            s2 += dxhat * xhat;
            dg_acc[k] += dyv * (xr[i] - m) * r; /* (dy * (x - mean)) * rstd, as the CPU */
            db_acc[k] += dyv;
        }
        const float mean_dxhat = warp_sum(s1) / (float)d;
        const float mean_dxhat_xhat = warp_sum(s2) / (float)d;
#pragma unroll
        for (int k = 0; k < LN_MAX_COLS_PER_LANE; ++k) {
            if (k >= ncols) break;
            const int i = lane + 32 * k;
            const float xhat = (xr[i] - m) * r, dxhat = dyr[i] * g[i];
            dxr[i] += r * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
        }
    }
    float *mine = ln_smem + (size_t)warp * 2 * d;
#pragma unroll
    for (int k = 0; k < LN_MAX_COLS_PER_LANE; ++k) {
        if (k >= ncols) break;
        mine[lane + 32 * k] = dg_acc[k];
        mine[d + lane + 32 * k] = db_acc[k];
    }
    __syncthreads();
    float *row_out = partial + (size_t)blockIdx.x * 2 * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float sg = 0.0f, sb = 0.0f;
        for (int w = 0; w < NORM_ROWS_PER_BLOCK; ++w) {
            sg += ln_smem[(size_t)w * 2 * d + j];
            sb += ln_smem[(size_t)w * 2 * d + d + j];
        }
        row_out[j] = sg;
        row_out[d + j] = sb;
    }
    ln_finish_chunks(partial, lane_sums, (int)gridDim.x, d, dg, db, tickets);
}

/* One row's operands as a lane of the vectorised kernel holds them: its V
 * float4 of x, dy and dx (columns 4 lane + 128 k ..) and the row's mean
 * and rstd. */
template <int V>
struct ln_row_regs {
    float4 x[V], dy[V], dx[V];
    float mean, rstd;
};

template <int V>
__device__ __forceinline__ void ln_row_load(ln_row_regs<V> &reg, const float *x, const float *dy, const float *dx,
                                            const float *mean, const float *rstd, int row, int lane) {
    constexpr int d = 128 * V;
    const float4 *xr = reinterpret_cast<const float4 *>(x + (size_t)row * d);
    const float4 *dyr = reinterpret_cast<const float4 *>(dy + (size_t)row * d);
    const float4 *dxr = reinterpret_cast<const float4 *>(dx + (size_t)row * d);
#pragma unroll
    for (int k = 0; k < V; ++k) {
        reg.x[k] = xr[lane + 32 * k];
        reg.dy[k] = dyr[lane + 32 * k];
        reg.dx[k] = dxr[lane + 32 * k];
    }
    reg.mean = mean[row];
    reg.rstd = rstd[row];
}

/* layernorm_bwd_fused_kernel for d = 128 V (V <= 4) with 16-byte aligned
 * rows: a lane keeps its V float4 of x, dy and dx in registers, so each row
 * is read once, and loads the warp's next row before working on the
 * current one, so that the next row's reads are in flight during this
 * row's shuffles and store (reading dx only after the row's sums were done
 * took 15.0 against 14.5 us for 8192 x 256 rows not in L2, on the H100).
 * Two blocks per SM for d = 256: 8192 rows make 256 blocks, one wave on 132
 * SMs. */
template <int V>
__global__ void __launch_bounds__(CUDA_THREADS, V <= 2 ? 2 : 1)
layernorm_bwd_fused_vec_kernel(const float *x, const float *g, const float *mean, const float *rstd, const float *dy,
                               float *dx, int T, float *partial, float *lane_sums, float *dg, float *db,
                               int *tickets) {
    constexpr int d = 128 * V;
    __shared__ float ln_sums[NORM_ROWS_PER_BLOCK][2][d];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float4 dg_acc[V], db_acc[V], gv[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        dg_acc[k] = db_acc[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        gv[k] = reinterpret_cast<const float4 *>(g)[lane + 32 * k];
    }
    const int r0 = blockIdx.x * LN_CHUNK, r1 = min(T, r0 + LN_CHUNK);
    int row = r0 + warp;
    ln_row_regs<V> cur{};
    if (row < r1) ln_row_load(cur, x, dy, dx, mean, rstd, row, lane);
    for (; row < r1; row += NORM_ROWS_PER_BLOCK) {
        ln_row_regs<V> next = cur;
        if (row + NORM_ROWS_PER_BLOCK < r1) ln_row_load(next, x, dy, dx, mean, rstd, row + NORM_ROWS_PER_BLOCK, lane);
        const float m = cur.mean, r = cur.rstd;
        float4 xc[V]; /* x - mean */
        float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float4 xv = cur.x[k], dv = cur.dy[k];
            xc[k] = make_float4(xv.x - m, xv.y - m, xv.z - m, xv.w - m);
            const float4 dh = make_float4(dv.x * gv[k].x, dv.y * gv[k].y, dv.z * gv[k].z, dv.w * gv[k].w);
            s1 += (dh.x + dh.y) + (dh.z + dh.w);
            s2 += (dh.x * xc[k].x * r + dh.y * xc[k].y * r) + (dh.z * xc[k].z * r + dh.w * xc[k].w * r);
            /* (dy * (x - mean)) * rstd, as the CPU */
            dg_acc[k].x += dv.x * xc[k].x * r, dg_acc[k].y += dv.y * xc[k].y * r;
            dg_acc[k].z += dv.z * xc[k].z * r, dg_acc[k].w += dv.w * xc[k].w * r;
            db_acc[k].x += dv.x, db_acc[k].y += dv.y, db_acc[k].z += dv.z, db_acc[k].w += dv.w;
        }
        const float mean_dxhat = warp_sum(s1) / (float)d;
        const float mean_dxhat_xhat = warp_sum(s2) / (float)d;
        float4 *dxr = reinterpret_cast<float4 *>(dx + (size_t)row * d);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float4 dv = cur.dy[k];
            float4 o = cur.dx[k];
            o.x += r * (dv.x * gv[k].x - mean_dxhat - xc[k].x * r * mean_dxhat_xhat);
            o.y += r * (dv.y * gv[k].y - mean_dxhat - xc[k].y * r * mean_dxhat_xhat);
            o.z += r * (dv.z * gv[k].z - mean_dxhat - xc[k].z * r * mean_dxhat_xhat);
            o.w += r * (dv.w * gv[k].w - mean_dxhat - xc[k].w * r * mean_dxhat_xhat);
            dxr[lane + 32 * k] = o;
        }
        cur = next;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
        reinterpret_cast<float4 *>(ln_sums[warp][0])[lane + 32 * k] = dg_acc[k];
        reinterpret_cast<float4 *>(ln_sums[warp][1])[lane + 32 * k] = db_acc[k];
    }
    __syncthreads();
    float *row_out = partial + (size_t)blockIdx.x * 2 * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float sg = 0.0f, sb = 0.0f;
        for (int w = 0; w < NORM_ROWS_PER_BLOCK; ++w) {
            sg += ln_sums[w][0][j];
            sb += ln_sums[w][1][j];
        }
        row_out[j] = sg;
        row_out[d + j] = sb;
    }
    ln_finish_chunks(partial, lane_sums, (int)gridDim.x, d, dg, db, tickets);
}

void cuda_layernorm_bwd(moe_backend *be, const float *x, const float *g, const float *mean,
                        const float *rstd, const float *dy, float *dx, float *dg, float *db, int T,
                        int d) {
    if (T <= 0 || d <= 0) return;
    if (d % 32 == 0 && d <= 32 * LN_MAX_COLS_PER_LANE) {
        const int nchunks = (T + LN_CHUNK - 1) / LN_CHUNK;
        ScratchLayout lay;
        const size_t part_off = lay.add((size_t)nchunks * 2 * d * sizeof(float));
        const size_t lanes_off = lay.add((size_t)LN_FINISH_LANES * 2 * d * sizeof(float));
        char *base = cuda_scratch(be, lay.total);
        if (!base) return;
        float *partial = (float *)(base + part_off), *lane_sums = (float *)(base + lanes_off);
        int *tickets = cuda_state(be)->d_tickets;
        const bool vec = d % 128 == 0 && d <= 512 && rows_vec4(x) && rows_vec4(dy) && rows_vec4(dx) && rows_vec4(g);
        if (vec) {
            typedef void (*kernel_fn)(const float *, const float *, const float *, const float *, const float *,
                                      float *, int, float *, float *, float *, float *, int *);
            static const kernel_fn by_v[4] = {layernorm_bwd_fused_vec_kernel<1>, layernorm_bwd_fused_vec_kernel<2>,
                                              layernorm_bwd_fused_vec_kernel<3>, layernorm_bwd_fused_vec_kernel<4>};
            by_v[d / 128 - 1]<<<(unsigned)nchunks, CUDA_THREADS, 0, cuda_stream(be)>>>(
                x, g, mean, rstd, dy, dx, T, partial, lane_sums, dg, db, tickets);
            KERNEL_CHECK(be, "layernorm_bwd_fused_vec_kernel");
            return;
        }
        const size_t smem = (size_t)NORM_ROWS_PER_BLOCK * 2 * d * sizeof(float); /* <= 32 KiB */
        layernorm_bwd_fused_kernel<<<(unsigned)nchunks, CUDA_THREADS, smem, cuda_stream(be)>>>(
            x, g, mean, rstd, dy, dx, T, d, partial, lane_sums, dg, db, tickets);
        KERNEL_CHECK(be, "layernorm_bwd_fused_kernel");
        return;
    }
    layernorm_bwd_dx_kernel<<<norm_blocks(T), CUDA_THREADS, 0, cuda_stream(be)>>>(x, g, mean, rstd, dy,
                                                                                   dx, T, d);
    KERNEL_CHECK(be, "layernorm_bwd_dx_kernel");
    colsum_accumulate(be, layernorm_dg_term{x, dy, mean, rstd, d}, T, d, dg, "layernorm_bwd dg");
    colsum_accumulate(be, layernorm_db_term{dy, d}, T, d, db, "layernorm_bwd db");
}

/* ------------------------------------------------------------------ */
/* RMSNorm                                                             */
/* ------------------------------------------------------------------ */

__global__ void rmsnorm_fwd_kernel(const float *x, const float *g, float *y, float *rstd, int T,
                                   int d, float eps) {
    const int row = blockIdx.x * NORM_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= T) return;
    const float *xr = x + (size_t)row * d;
    float *yr = y + (size_t)row * d;
    float s = 0.0f;
    for (int i = lane; i < d; i += 32) s += xr[i] * xr[i];
    const float ms = warp_sum(s) / (float)d;
    const float r = 1.0f / sqrtf(ms + eps);
    for (int i = lane; i < d; i += 32) yr[i] = xr[i] * r * g[i];
    if (lane == 0) rstd[row] = r;
}

void cuda_rmsnorm_fwd(moe_backend *be, const float *x, const float *g, float *y, float *rstd, int T,
                      int d, float eps) {
    if (T <= 0 || d <= 0) return;
    rmsnorm_fwd_kernel<<<norm_blocks(T), CUDA_THREADS, 0, cuda_stream(be)>>>(x, g, y, rstd, T, d, eps);
    KERNEL_CHECK(be, "rmsnorm_fwd_kernel");
}

/* dx += r * (dy*g - x * r^2 * mean(dy * g * x)). */
__global__ void rmsnorm_bwd_dx_kernel(const float *x, const float *g, const float *rstd,
                                      const float *dy, float *dx, int T, int d) {
    const int row = blockIdx.x * NORM_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= T) return;
    const float *xr = x + (size_t)row * d, *dyr = dy + (size_t)row * d;
    float *dxr = dx + (size_t)row * d;
    const float r = rstd[row];
    float s = 0.0f;
    for (int i = lane; i < d; i += 32) s += dyr[i] * g[i] * xr[i];
    const float mean_dyg_x = warp_sum(s) / (float)d;
    for (int i = lane; i < d; i += 32) dxr[i] += r * (dyr[i] * g[i] - xr[i] * r * r * mean_dyg_x);
}

struct rmsnorm_dg_term {
    const float *x, *dy, *rstd;
    int d;
    __device__ float operator()(int t, int j) const {
        size_t k = (size_t)t * d + j;
        return dy[k] * x[k] * rstd[t];
    }
};

void cuda_rmsnorm_bwd(moe_backend *be, const float *x, const float *g, const float *rstd,
                      const float *dy, float *dx, float *dg, int T, int d) {
    if (T <= 0 || d <= 0) return;
    rmsnorm_bwd_dx_kernel<<<norm_blocks(T), CUDA_THREADS, 0, cuda_stream(be)>>>(x, g, rstd, dy, dx, T,
                                                                                 d);
    KERNEL_CHECK(be, "rmsnorm_bwd_dx_kernel");
    colsum_accumulate(be, rmsnorm_dg_term{x, dy, rstd, d}, T, d, dg, "rmsnorm_bwd dg");
}

/* ------------------------------------------------------------------ */
/* Activations (same formulas as cpu_ops.c)                            */
/* ------------------------------------------------------------------ */

__global__ void act_fwd_kernel(moe_act_kind kind, const float *in, float *out, int n, size_t count) {
    GRID_STRIDE_LOOP(i, count) {
        if (kind == MOE_ACT_GELU) {
            out[i] = gelu(in[i]);
        } else if (kind == MOE_ACT_SILU) {
            out[i] = silu(in[i]);
        } else { /* SwiGLU: in row t = [gate (n) | up (n)], out[t,j] = silu(gate) * up */
            size_t t = i / (size_t)n, j = i % (size_t)n;
            const float *row = in + t * 2 * (size_t)n;
            out[i] = silu(row[j]) * row[n + j];
        }
    }
}

__global__ void act_bwd_kernel(moe_act_kind kind, const float *in, const float *dout, float *din,
                               int n, size_t count) {
    GRID_STRIDE_LOOP(i, count) {
        if (kind == MOE_ACT_GELU) {
            din[i] = dout[i] * gelu_grad(in[i]);
        } else if (kind == MOE_ACT_SILU) {
            din[i] = dout[i] * silu_grad(in[i]);
        } else { /* each (t, j) writes both halves of din's row: dgate[j] and dup[j] */
            size_t t = i / (size_t)n, j = i % (size_t)n;
            const float *row = in + t * 2 * (size_t)n;
            float *drow = din + t * 2 * (size_t)n;
            float gate = row[j], up = row[n + j], go = dout[i];
            drow[j] = go * up * silu_grad(gate);
            drow[n + j] = go * silu(gate);
        }
    }
}

static int act_kind_ok(moe_backend *be, moe_act_kind kind, const char *op) {
    if (kind == MOE_ACT_GELU || kind == MOE_ACT_SILU || kind == MOE_ACT_SWIGLU) return 1;
    char why[64];
    snprintf(why, sizeof why, "unknown activation kind %d", (int)kind);
    cuda_record_error(be, __FILE__, __LINE__, op, why);
    return 0;
}

/* count = T*n outputs for every kind (SwiGLU's input is twice as wide). */
void cuda_act_fwd(moe_backend *be, moe_act_kind kind, const float *in, float *out, int T, int n) {
    if (!act_kind_ok(be, kind, "act_fwd") || T <= 0 || n <= 0) return;
    size_t count = (size_t)T * n;
    act_fwd_kernel<<<cuda_blocks(count), CUDA_THREADS, 0, cuda_stream(be)>>>(kind, in, out, n, count);
    KERNEL_CHECK(be, "act_fwd_kernel");
}

void cuda_act_bwd(moe_backend *be, moe_act_kind kind, const float *in, const float *dout,
                  float *din, int T, int n) {
    if (!act_kind_ok(be, kind, "act_bwd") || T <= 0 || n <= 0) return;
    size_t count = (size_t)T * n;
    act_bwd_kernel<<<cuda_blocks(count), CUDA_THREADS, 0, cuda_stream(be)>>>(kind, in, dout, din, n,
                                                                              count);
    KERNEL_CHECK(be, "act_bwd_kernel");
}
