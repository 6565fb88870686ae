/*
 * The MoE routing core on the GPU: capacity assignment, combine weights,
 * dispatch, combine, and the auxiliary losses. Results equal cpu_moe_ops.c:
 * bit for bit for the integer outputs, and for the float ones wherever the
 * CPU's sums are short enough to follow term by term (the products are then
 * rounded one at a time, __fmul_rn/__fadd_rn, as on the CPU).
 *
 * Index checks: an expert >= E or a slot outside [0, C) would write outside
 * Xe/dYe; such an assignment is skipped and flagged (CUDA_FLAG_ROUTING).
 */
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "backend/cuda/cuda_common.cuh"
#include "moe/router_util.h"

/* acc + a*b with the product rounded first, like the CPU's `acc += a * b`. */
__device__ __forceinline__ float add_product(float acc, float a, float b) {
    return __fadd_rn(acc, __fmul_rn(a, b));
}

/* ------------------------------------------------------------------ */
/* Capacity                                                            */
/* ------------------------------------------------------------------ */

/* The CPU visits assignments in priority order (k-major; within a k, token
 * order for "position", weight descending with ties to the lower token for
 * "probs") and gives each the next free slot of its expert while one is left.
 * Equivalently: the assignment's rank among the assignments to its expert,
 * in that order, is its slot if the rank is < C, and it is dropped otherwise.
 *
 * On the GPU: (1) for "probs", each k's tokens are sorted by weight with a
 * stable descending radix sort, so equal weights keep ascending token order;
 * (2) one block per expert walks the priority order (k by k, a tile of tokens
 * at a time) and ranks its assignments with a block-wide exclusive scan of
 * (expert == e), carrying its running count across tiles and k. */
constexpr int CAP_THREADS = 256;

/* kept = slot = -1 everywhere; the expert blocks then fill in what they keep.
 * Experts >= E are flagged (they are left dropped). */
__global__ void capacity_init_kernel(const int32_t *expert, size_t nA, int E, int32_t *kept,
                                     int32_t *slot, int *flags) {
    GRID_STRIDE_LOOP(a, nA) {
        kept[a] = -1;
        slot[a] = -1;
        if (expert[a] >= E) cuda_flag(flags, CUDA_FLAG_ROUTING);
    }
}

/* keys[k*T + t] = weight[t, k] for the sort. -0.0 becomes +0.0: the CPU
 * compares them equal (so the lower token goes first). CUB's radix sort
 * documents the same treatment; doing it here keeps the order independent of
 * that detail of the library. */
__global__ void capacity_keys_kernel(const float *weight, int T, int K, float *keys) {
    GRID_STRIDE_LOOP(i, (size_t)T * K) {
        const size_t k = i / T, t = i % T;
        const float w = weight[t * K + k];
        keys[i] = w == 0.0f ? 0.0f : w;
    }
}

__global__ void capacity_iota_kernel(int32_t *v, int n) {
    GRID_STRIDE_LOOP(i, n) v[i] = (int32_t)i;
}

/* Block e. order (NULL for token order) holds, for each k, the T tokens in
 * priority order. counts[e] = assignments routed to e, counts[E + e] = kept. */
__global__ void capacity_scan_kernel(const int32_t *expert, const int32_t *order, int T, int K,
                                     int E, int C, int32_t *kept, int32_t *slot, int32_t *counts) {
    typedef cub::BlockScan<int, CAP_THREADS> Scan;
    __shared__ typename Scan::TempStorage scan_tmp;
    const int e = blockIdx.x;
    int running = 0; /* assignments to e met so far, in priority order */
    for (int k = 0; k < K; ++k) {
        for (int base = 0; base < T; base += CAP_THREADS) {
            const int i = base + threadIdx.x;
            size_t a = 0;
            int match = 0;
            if (i < T) {
                const int t = order ? order[(size_t)k * T + i] : i;
                a = (size_t)t * K + k;
                match = expert[a] == e;
            }
            int rank, tile_total;
            Scan(scan_tmp).ExclusiveSum(match, rank, tile_total);
            if (match) {
                const int r = running + rank;
                if (r < C) {
                    kept[a] = e;
                    slot[a] = r;
                }
            }
            running += tile_total;
            __syncthreads(); /* scan_tmp is reused by the next tile */
        }
    }
    if (threadIdx.x == 0) {
        counts[e] = running;
        counts[E + e] = running < C ? running : (C > 0 ? C : 0);
    }
}

void cuda_capacity_assign(moe_backend *be, const int32_t *expert, const float *weight, int T, int K,
                          int E, int C, int policy, int32_t *kept, int32_t *slot,
                          int32_t *counts_before, int32_t *counts_after) {
    if (E <= 0) return;
    cudaStream_t st = cuda_stream(be);
    int *flags = cuda_state(be)->d_flags;
    const size_t nA = (size_t)(T > 0 ? T : 0) * (K > 0 ? K : 0);
    const int sorted = policy == 1 && nA > 0;

    size_t sort_bytes = 0;
    if (sorted)
        CUDA_CHECK(be, cub::DeviceRadixSort::SortPairsDescending(
                           nullptr, sort_bytes, (const float *)nullptr, (float *)nullptr,
                           (const int32_t *)nullptr, (int32_t *)nullptr, T, 0, 32, st));
    ScratchLayout lay;
    const size_t counts_off = lay.add(2 * (size_t)E * sizeof(int32_t));
    const size_t keys_off = lay.add(sorted ? nA * sizeof(float) : 0);
    const size_t skeys_off = lay.add(sorted ? nA * sizeof(float) : 0);
    const size_t iota_off = lay.add(sorted ? (size_t)T * sizeof(int32_t) : 0);
    const size_t order_off = lay.add(sorted ? nA * sizeof(int32_t) : 0);
    const size_t tmp_off = lay.add(sort_bytes);
    char *base = cuda_scratch(be, lay.total);
    if (!base) return;
    int32_t *d_counts = (int32_t *)(base + counts_off);
    int32_t *order = nullptr;

    if (nA > 0) {
        capacity_init_kernel<<<cuda_blocks(nA), CUDA_THREADS, 0, st>>>(expert, nA, E, kept, slot, flags);
        KERNEL_CHECK(be, "capacity_init_kernel");
    }
    if (sorted) {
        float *keys = (float *)(base + keys_off), *sorted_keys = (float *)(base + skeys_off);
        int32_t *iota = (int32_t *)(base + iota_off);
        order = (int32_t *)(base + order_off);
        capacity_keys_kernel<<<cuda_blocks(nA), CUDA_THREADS, 0, st>>>(weight, T, K, keys);
        KERNEL_CHECK(be, "capacity_keys_kernel");
        capacity_iota_kernel<<<cuda_blocks((size_t)T), CUDA_THREADS, 0, st>>>(iota, T);
        KERNEL_CHECK(be, "capacity_iota_kernel");
        for (int k = 0; k < K; ++k) {
            CUDA_CHECK(be, cub::DeviceRadixSort::SortPairsDescending(
                               base + tmp_off, sort_bytes, keys + (size_t)k * T,
                               sorted_keys + (size_t)k * T, iota, order + (size_t)k * T, T, 0, 32, st));
            KERNEL_CHECK(be, "cub::DeviceRadixSort::SortPairsDescending (capacity)");
        }
    }
    capacity_scan_kernel<<<E, CAP_THREADS, 0, st>>>(expert, order, nA > 0 ? T : 0, nA > 0 ? K : 0, E, C,
                                                    kept, slot, d_counts);
    KERNEL_CHECK(be, "capacity_scan_kernel");

    /* The counts go to the caller's arrays, which core/model/moe.c keeps in
     * host memory (its routing statistics); cudaMemcpyDefault also serves a
     * caller that passes device arrays. Wait, since the caller reads them. */
    CUDA_CHECK(be, cudaMemcpyAsync(counts_before, d_counts, (size_t)E * sizeof(int32_t),
                                   cudaMemcpyDefault, st));
    CUDA_CHECK(be, cudaMemcpyAsync(counts_after, d_counts + E, (size_t)E * sizeof(int32_t),
                                   cudaMemcpyDefault, st));
    CUDA_CHECK(be, cudaStreamSynchronize(st));
}

/* ------------------------------------------------------------------ */
/* Combine weights                                                     */
/* ------------------------------------------------------------------ */

/* One thread per token, over its K assignments (K is small). */
__global__ void combine_weights_kernel(const float *weight, const int32_t *kept, int T, int K,
                                       int renorm, float *cw) {
    GRID_STRIDE_LOOP(t, T) {
        const float *w = weight + t * K;
        const int32_t *e = kept + t * K;
        float *out = cw + t * K;
        float sum = 0.0f;
        for (int k = 0; k < K; ++k) {
            out[k] = e[k] >= 0 ? w[k] : 0.0f;
            sum += out[k];
        }
        if (renorm && sum > 0.0f)
            for (int k = 0; k < K; ++k) out[k] /= sum;
    }
}

/* With renorm, cw_k = w_k / S over kept k, S = sum of kept w, so
 * dw_k = (dcw_k - sum_j cw_j dcw_j) / S for kept k, 0 otherwise. */
__global__ void combine_weights_bwd_kernel(const float *weight, const int32_t *kept, int T, int K,
                                           int renorm, const float *dcw, float *dweight) {
    GRID_STRIDE_LOOP(t, T) {
        const float *w = weight + t * K;
        const int32_t *e = kept + t * K;
        const float *g = dcw + t * K;
        float *dw = dweight + t * K;
        float sum = 0.0f, dot = 0.0f;
        for (int k = 0; k < K; ++k)
            if (e[k] >= 0) sum += w[k];
        const bool norm = renorm && sum > 0.0f;
        if (norm)
            for (int k = 0; k < K; ++k)
                if (e[k] >= 0) dot = add_product(dot, w[k] / sum, g[k]);
        for (int k = 0; k < K; ++k) {
            if (e[k] < 0)
                dw[k] = 0.0f;
            else if (norm)
                dw[k] = (g[k] - dot) / sum;
            else
                dw[k] = g[k];
        }
    }
}

void cuda_combine_weights(moe_backend *be, const float *weight, const int32_t *kept, int T, int K,
                          int renorm, float *cw) {
    if (T <= 0 || K <= 0) return;
    combine_weights_kernel<<<cuda_blocks((size_t)T), CUDA_THREADS, 0, cuda_stream(be)>>>(weight, kept, T,
                                                                                          K, renorm, cw);
    KERNEL_CHECK(be, "combine_weights_kernel");
}

void cuda_combine_weights_bwd(moe_backend *be, const float *weight, const int32_t *kept, int T,
                              int K, int renorm, const float *dcw, float *dweight) {
    if (T <= 0 || K <= 0) return;
    combine_weights_bwd_kernel<<<cuda_blocks((size_t)T), CUDA_THREADS, 0, cuda_stream(be)>>>(
        weight, kept, T, K, renorm, dcw, dweight);
    KERNEL_CHECK(be, "combine_weights_bwd_kernel");
}

/* ------------------------------------------------------------------ */
/* Dispatch and combine                                                */
/* ------------------------------------------------------------------ */

/* Xe was zeroed; one thread per (assignment, column) copies kept rows. */
__global__ void dispatch_kernel(const float *x, const int32_t *kept, const int32_t *slot, int K,
                                int C, int E, int d, size_t n, float *Xe, int *flags) {
    GRID_STRIDE_LOOP(idx, n) {
        const size_t a = idx / d;
        const int i = (int)(idx % d);
        const int e = kept[a];
        if (e < 0) continue;
        const int s = slot[a];
        if (e >= E || s < 0 || s >= C) {
            cuda_flag(flags, CUDA_FLAG_ROUTING);
            continue;
        }
        Xe[((size_t)e * C + s) * d + i] = x[(a / K) * d + i];
    }
}

void cuda_dispatch(moe_backend *be, const float *x, const int32_t *kept, const int32_t *slot, int T,
                   int K, int C, int E, int d, float *Xe) {
    if (E <= 0 || C <= 0 || d <= 0) return;
    cudaStream_t st = cuda_stream(be);
    CUDA_CHECK(be, cudaMemsetAsync(Xe, 0, (size_t)E * C * d * sizeof(float), st));
    if (T <= 0 || K <= 0) return;
    const size_t n = (size_t)T * K * d;
    dispatch_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, st>>>(x, kept, slot, K, C, E, d, n, Xe,
                                                             cuda_state(be)->d_flags);
    KERNEL_CHECK(be, "dispatch_kernel");
}

/* dx[t, i] += sum over kept k of dXe[row(t,k), i], k in order. E is not
 * passed: only the slot can be range-checked. */
__global__ void dispatch_bwd_kernel(const float *dXe, const int32_t *kept, const int32_t *slot,
                                    int K, int C, int d, size_t n, float *dx, int *flags) {
    GRID_STRIDE_LOOP(idx, n) {
        const size_t t = idx / d;
        const int i = (int)(idx % d);
        float acc = dx[idx];
        for (int k = 0; k < K; ++k) {
            const size_t a = t * K + k;
            const int e = kept[a];
            if (e < 0) continue;
            const int s = slot[a];
            if (s < 0 || s >= C) {
                cuda_flag(flags, CUDA_FLAG_ROUTING);
                continue;
            }
            acc += dXe[((size_t)e * C + s) * d + i];
        }
        dx[idx] = acc;
    }
}

void cuda_dispatch_bwd(moe_backend *be, const float *dXe, const int32_t *kept, const int32_t *slot,
                       int T, int K, int C, int d, float *dx) {
    if (T <= 0 || K <= 0 || d <= 0) return;
    const size_t n = (size_t)T * d;
    dispatch_bwd_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cuda_stream(be)>>>(
        dXe, kept, slot, K, C, d, n, dx, cuda_state(be)->d_flags);
    KERNEL_CHECK(be, "dispatch_bwd_kernel");
}

/* y[t, i] = sum over kept k of cw[t,k] * Ye[row(t,k), i] (overwrite). */
__global__ void combine_kernel(const float *Ye, const int32_t *kept, const int32_t *slot,
                               const float *cw, int K, int C, int d, size_t n, float *y, int *flags) {
    GRID_STRIDE_LOOP(idx, n) {
        const size_t t = idx / d;
        const int i = (int)(idx % d);
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) {
            const size_t a = t * K + k;
            const int e = kept[a];
            if (e < 0) continue;
            const int s = slot[a];
            if (s < 0 || s >= C) {
                cuda_flag(flags, CUDA_FLAG_ROUTING);
                continue;
            }
            acc = add_product(acc, cw[a], Ye[((size_t)e * C + s) * d + i]);
        }
        y[idx] = acc;
    }
}

void cuda_combine(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                  const float *cw, int T, int K, int C, int d, float *y) {
    if (T <= 0 || d <= 0) return;
    const size_t n = (size_t)T * d;
    combine_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cuda_stream(be)>>>(
        Ye, kept, slot, cw, K > 0 ? K : 0, C, d, n, y, cuda_state(be)->d_flags);
    KERNEL_CHECK(be, "combine_kernel");
}

/* dYe was zeroed. One warp per assignment (t,k): lanes across d write
 * dYe[row] = cw * dy[t] and form dcw = <dy[t], Ye[row]> (a warp sum). */
__global__ void combine_bwd_kernel(const float *Ye, const int32_t *kept, const int32_t *slot,
                                   const float *cw, const float *dy, size_t nA, int K, int C, int E,
                                   int d, float *dYe, float *dcw, int *flags) {
    const size_t a = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (a >= nA) return; /* the whole warp leaves together */
    const int e = kept[a];
    const int s = slot[a];
    if (e < 0 || e >= E || s < 0 || s >= C) {
        if (lane == 0) {
            dcw[a] = 0.0f;
            if (e >= 0) cuda_flag(flags, CUDA_FLAG_ROUTING);
        }
        return;
    }
    const float *g = dy + (a / K) * d;
    const size_t row = ((size_t)e * C + s) * d;
    const float w = cw[a];
    float dot = 0.0f;
    for (int i = lane; i < d; i += 32) {
        dYe[row + i] = w * g[i];
        dot += g[i] * Ye[row + i];
    }
    dot = warp_sum(dot);
    if (lane == 0) dcw[a] = dot;
}

void cuda_combine_bwd(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                      const float *cw, const float *dy, int T, int K, int C, int E, int d,
                      float *dYe, float *dcw) {
    cudaStream_t st = cuda_stream(be);
    if (E > 0 && C > 0 && d > 0)
        CUDA_CHECK(be, cudaMemsetAsync(dYe, 0, (size_t)E * C * d * sizeof(float), st));
    if (T <= 0 || K <= 0) return;
    const size_t nA = (size_t)T * K;
    const size_t warps_per_block = CUDA_THREADS / 32;
    const unsigned blocks = (unsigned)((nA + warps_per_block - 1) / warps_per_block);
    combine_bwd_kernel<<<blocks, CUDA_THREADS, 0, st>>>(Ye, kept, slot, cw, dy, nA, K, C, E, d > 0 ? d : 0,
                                                        dYe, dcw, cuda_state(be)->d_flags);
    KERNEL_CHECK(be, "combine_bwd_kernel");
}

/* ------------------------------------------------------------------ */
/* Auxiliary losses                                                    */
/* ------------------------------------------------------------------ */

/* One thread per token row (E is the number of experts: small):
 *   p = softmax(lb_logits[t]), fp = sum_e f_e p_e,
 *   d_lb[t,e] = alpha * E / T * p_e * (f_e - fp)        (overwrite)
 *   lse = logsumexp(logits[t]),
 *   dlogits[t,e] += beta * 2/T * lse * softmax(logits[t])_e   (accumulate)
 * with the same row helpers and the same expressions as the CPU. The row's
 * fp and lse^2 go to per-row arrays, summed by the next kernel. p is kept in
 * d_lb's row until it is overwritten by the gradient. */
__global__ void aux_rows_kernel(const float *lb_logits, const float *logits, const float *f, int T,
                                int E, float alpha, float beta, float *d_lb, float *dlogits,
                                double *row_fp, double *row_z) {
    GRID_STRIDE_LOOP(t, T) {
        const float *l = lb_logits + t * E;
        float *p = d_lb + t * E;
        moe_softmax_row(l, p, E, 1.0f);
        double fp = 0.0;
        for (int e = 0; e < E; ++e) fp += (double)f[e] * p[e];
        for (int e = 0; e < E; ++e) p[e] = (float)(alpha * (double)E / T * p[e] * (f[e] - fp));
        row_fp[t] = fp;

        const float *lz = logits + t * E;
        const float lse = moe_logsumexp_row(lz, E);
        row_z[t] = (double)lse * lse;
        float *dl = dlogits + t * E;
        for (int e = 0; e < E; ++e) dl[e] += beta * 2.0f / (float)T * lse * expf(lz[e] - lse);
    }
}

/* out[0] = E * mean_t fp = lb, out[1] = mean_t lse^2 = z; one block, fixed order. */
__global__ void aux_sums_kernel(const double *row_fp, const double *row_z, int T, int E, double *out) {
    double s_fp = 0.0, s_z = 0.0;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        s_fp += row_fp[t];
        s_z += row_z[t];
    }
    s_fp = block_sum(s_fp);
    s_z = block_sum(s_z);
    if (threadIdx.x == 0) {
        out[0] = (double)E * s_fp / T;
        out[1] = s_z / T;
    }
}

void cuda_aux_losses(moe_backend *be, const float *lb_logits, const float *logits, const float *f,
                     int T, int E, float alpha, float beta, float *d_lb, float *dlogits, double *lb,
                     double *z) {
    if (T <= 0 || E <= 0) {
        *lb = 0.0;
        *z = 0.0;
        return;
    }
    *lb = NAN; /* what the caller sees if a step below fails */
    *z = NAN;
    cudaStream_t st = cuda_stream(be);
    ScratchLayout lay;
    const size_t f_off = lay.add((size_t)E * sizeof(float));
    const size_t fp_off = lay.add((size_t)T * sizeof(double));
    const size_t z_off = lay.add((size_t)T * sizeof(double));
    const size_t out_off = lay.add(2 * sizeof(double));
    char *base = cuda_scratch(be, lay.total);
    if (!base) return;
    float *d_f = (float *)(base + f_off);
    double *row_fp = (double *)(base + fp_off), *row_z = (double *)(base + z_off);
    double *d_out = (double *)(base + out_off);

    /* f is host memory (moe.c computes it from the host counts). */
    CUDA_CHECK(be, cudaMemcpyAsync(d_f, f, (size_t)E * sizeof(float), cudaMemcpyDefault, st));
    aux_rows_kernel<<<cuda_blocks((size_t)T), CUDA_THREADS, 0, st>>>(lb_logits, logits, d_f, T, E, alpha,
                                                                     beta, d_lb, dlogits, row_fp, row_z);
    KERNEL_CHECK(be, "aux_rows_kernel");
    aux_sums_kernel<<<1, CUDA_THREADS, 0, st>>>(row_fp, row_z, T, E, d_out);
    KERNEL_CHECK(be, "aux_sums_kernel");
    double out[2] = {NAN, NAN};
    CUDA_CHECK(be, cudaMemcpyAsync(out, d_out, sizeof out, cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(be, cudaStreamSynchronize(st));
    *lb = out[0];
    *z = out[1];
}
