/*
 * LayerNorm, RMSNorm and the activations on the GPU.
 *
 * The norms give one warp to each row of d: the row's sums are warp
 * reductions (no shared memory, no block barrier), and the row, re-read for
 * each pass, stays in L1. The weight gradients dg, db are sums over rows:
 * they go through colsum_accumulate (fixed order, no atomics).
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

void cuda_layernorm_fwd(moe_backend *be, const float *x, const float *g, const float *b, float *y,
                        float *mean, float *rstd, int T, int d, float eps) {
    if (T <= 0 || d <= 0) return;
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

void cuda_layernorm_bwd(moe_backend *be, const float *x, const float *g, const float *mean,
                        const float *rstd, const float *dy, float *dx, float *dg, float *db, int T,
                        int d) {
    if (T <= 0 || d <= 0) return;
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
