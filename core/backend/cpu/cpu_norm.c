/*
 * LayerNorm and RMSNorm over rows of d on the CPU.
 *
 * Forward passes and dx are per row (one thread per row). The weight
 * gradients dg, db are sums over rows; they are computed in a separate pass
 * in which threads own blocks of columns and walk the rows in order, so every
 * element is summed in a fixed order (see cpu_ops.h).
 */
#include "backend/cpu/cpu_ops.h"

#include <math.h>

void cpu_layernorm_fwd(moe_backend *be, const float *x, const float *g, const float *b, float *y,
                       float *mean, float *rstd, int T, int d, float eps) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
        const float *xr = x + (size_t)t * d;
        float *yr = y + (size_t)t * d;
        float m = 0.0f;
        for (int i = 0; i < d; ++i) m += xr[i];
        m /= (float)d;
        /* variance from the centred values (two passes): no cancellation */
        float var = 0.0f;
        for (int i = 0; i < d; ++i) var += (xr[i] - m) * (xr[i] - m);
        var /= (float)d;
        float r = 1.0f / sqrtf(var + eps);
        for (int i = 0; i < d; ++i) yr[i] = (xr[i] - m) * r * g[i] + b[i];
        mean[t] = m;
        rstd[t] = r;
    }
}

/* With xhat = (x - mean) * rstd and dxhat = dy * g:
 *   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
 *   dg = sum_t dy * xhat,  db = sum_t dy. */
void cpu_layernorm_bwd(moe_backend *be, const float *x, const float *g, const float *mean,
                       const float *rstd, const float *dy, float *dx, float *dg, float *db, int T,
                       int d) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
        const float *xr = x + (size_t)t * d, *dyr = dy + (size_t)t * d;
        float *dxr = dx + (size_t)t * d;
        float m = mean[t], r = rstd[t];
        float mean_dxhat = 0.0f, mean_dxhat_xhat = 0.0f;
        for (int i = 0; i < d; ++i) {
            float xhat = (xr[i] - m) * r;
            float dxhat = dyr[i] * g[i];
            mean_dxhat += dxhat;
            mean_dxhat_xhat += dxhat * xhat;
        }
        mean_dxhat /= (float)d;
        mean_dxhat_xhat /= (float)d;
        for (int i = 0; i < d; ++i) {
            float xhat = (xr[i] - m) * r;
            float dxhat = dyr[i] * g[i];
            dxr[i] += r * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
        }
    }
    int nblocks = (d + CPU_COL_BLOCK - 1) / CPU_COL_BLOCK;
#pragma omp parallel for schedule(static)
    for (int blk = 0; blk < nblocks; ++blk) {
        int i0 = blk * CPU_COL_BLOCK;
        int i1 = i0 + CPU_COL_BLOCK < d ? i0 + CPU_COL_BLOCK : d;
        for (int t = 0; t < T; ++t) {
            const float *xr = x + (size_t)t * d, *dyr = dy + (size_t)t * d;
            float m = mean[t], r = rstd[t];
            for (int i = i0; i < i1; ++i) {
                dg[i] += dyr[i] * (xr[i] - m) * r;
                db[i] += dyr[i];
            }
        }
    }
}

void cpu_rmsnorm_fwd(moe_backend *be, const float *x, const float *g, float *y, float *rstd, int T,
                     int d, float eps) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
        const float *xr = x + (size_t)t * d;
        float *yr = y + (size_t)t * d;
        float ms = 0.0f;
        for (int i = 0; i < d; ++i) ms += xr[i] * xr[i];
        ms /= (float)d;
        float r = 1.0f / sqrtf(ms + eps);
        for (int i = 0; i < d; ++i) yr[i] = xr[i] * r * g[i];
        rstd[t] = r;
    }
}

/* y = x * r * g with r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / d:
 *   dx = r * (dy*g - x * r^2 * mean(dy * g * x)),  dg = sum_t dy * x * r. */
void cpu_rmsnorm_bwd(moe_backend *be, const float *x, const float *g, const float *rstd,
                     const float *dy, float *dx, float *dg, int T, int d) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
        const float *xr = x + (size_t)t * d, *dyr = dy + (size_t)t * d;
        float *dxr = dx + (size_t)t * d;
        float r = rstd[t];
        float mean_dyg_x = 0.0f;
        for (int i = 0; i < d; ++i) mean_dyg_x += dyr[i] * g[i] * xr[i];
        mean_dyg_x /= (float)d;
        for (int i = 0; i < d; ++i) dxr[i] += r * (dyr[i] * g[i] - xr[i] * r * r * mean_dyg_x);
    }
    int nblocks = (d + CPU_COL_BLOCK - 1) / CPU_COL_BLOCK;
#pragma omp parallel for schedule(static)
    for (int blk = 0; blk < nblocks; ++blk) {
        int i0 = blk * CPU_COL_BLOCK;
        int i1 = i0 + CPU_COL_BLOCK < d ? i0 + CPU_COL_BLOCK : d;
        for (int t = 0; t < T; ++t) {
            const float *xr = x + (size_t)t * d, *dyr = dy + (size_t)t * d;
            for (int i = i0; i < i1; ++i) dg[i] += dyr[i] * xr[i] * rstd[t];
        }
    }
}
