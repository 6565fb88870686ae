/*
 * The MoE routing core on the GPU: capacity assignment, combine weights,
 * dispatch, combine, and the auxiliary losses. Results equal cpu_moe_ops.c:
 * bit for bit for the integer outputs, and for the float ones wherever the
 * CPU's sums are short enough to follow term by term (the products are then
 * rounded one at a time, __fmul_rn/__fadd_rn, as on the CPU).
 *
 * Index checks: an expert >= E or a slot outside [0, C) would write outside
 * Xe/dYe; such an assignment is skipped and flagged (CUDA_FLAG_ROUTING).
 * Reporting a plugin's bad output to the user is check_routing's job: it
 * records the first error in a device record without waiting, and gives
 * routers that own capacity a kept mask with only valid (expert, slot).
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
 * priority order. counts_before[e] = assignments routed to e,
 * counts_after[e] = kept. */
__global__ void capacity_scan_kernel(const int32_t *expert, const int32_t *order, int T, int K,
                                     int E, int C, int32_t *kept, int32_t *slot,
                                     int32_t *counts_before, int32_t *counts_after) {
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
        counts_before[e] = running;
        counts_after[e] = running < C ? running : (C > 0 ? C : 0);
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
    /* The counts are backend (device) memory by contract; a host array from
     * a tool written against the earlier contract goes through scratch and
     * is waited for. */
    const bool host_counts = !cuda_is_device_ptr(counts_before) || !cuda_is_device_ptr(counts_after);
    ScratchLayout lay;
    const size_t counts_off = lay.add(host_counts ? 2 * (size_t)E * sizeof(int32_t) : 0);
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
                                                    kept, slot, host_counts ? d_counts : counts_before,
                                                    host_counts ? d_counts + E : counts_after);
    KERNEL_CHECK(be, "capacity_scan_kernel");
    if (!host_counts) return;
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

/* f[e] = counts[e] / sum(counts) as the CPU computes it (float division of
 * the converted counts); one thread, E is small. */
__global__ void aux_f_kernel(const int32_t *counts, int E, float *f) {
    if (threadIdx.x != 0) return;
    long long routed = 0;
    for (int e = 0; e < E; ++e) routed += counts[e];
    for (int e = 0; e < E; ++e) f[e] = routed ? (float)counts[e] / (float)routed : 0.0f;
}

/* Both variants: f is in device memory (d_f, or computed from counts into
 * scratch), lb and z go to d_out[0..1] (device). */
static void aux_enqueue(moe_backend *be, const float *lb_logits, const float *logits, const float *h_f,
                        const int32_t *counts, int T, int E, float alpha, float beta, float *d_lb,
                        float *dlogits, double *d_out) {
    cudaStream_t st = cuda_stream(be);
    ScratchLayout lay;
    const size_t f_off = lay.add((size_t)E * sizeof(float));
    const size_t fp_off = lay.add((size_t)T * sizeof(double));
    const size_t z_off = lay.add((size_t)T * sizeof(double));
    char *base = cuda_scratch(be, lay.total);
    if (!base) return;
    float *d_f = (float *)(base + f_off);
    double *row_fp = (double *)(base + fp_off), *row_z = (double *)(base + z_off);
    if (counts) {
        aux_f_kernel<<<1, 32, 0, st>>>(counts, E, d_f);
        KERNEL_CHECK(be, "aux_f_kernel");
    } else {
        CUDA_CHECK(be, cudaMemcpyAsync(d_f, h_f, (size_t)E * sizeof(float), cudaMemcpyDefault, st));
    }
    aux_rows_kernel<<<cuda_blocks((size_t)T), CUDA_THREADS, 0, st>>>(lb_logits, logits, d_f, T, E, alpha,
                                                                     beta, d_lb, dlogits, row_fp, row_z);
    KERNEL_CHECK(be, "aux_rows_kernel");
    aux_sums_kernel<<<1, CUDA_THREADS, 0, st>>>(row_fp, row_z, T, E, d_out);
    KERNEL_CHECK(be, "aux_sums_kernel");
}

void cuda_aux_losses_counts(moe_backend *be, const float *lb_logits, const float *logits,
                            const int32_t *counts, int T, int E, float alpha, float beta, float *d_lb,
                            float *dlogits, double *out) {
    if (T <= 0 || E <= 0) { /* lb = z = 0, as on the CPU */
        CUDA_CHECK(be, cudaMemsetAsync(out, 0, 2 * sizeof(double), cuda_stream(be)));
        return;
    }
    aux_enqueue(be, lb_logits, logits, nullptr, counts, T, E, alpha, beta, d_lb, dlogits, out);
}

/* The host-scalar variant (tests, tools): f from the host, lb and z waited for. */
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
    double *d_out = cuda_state(be)->d_aux_out;
    aux_enqueue(be, lb_logits, logits, f, nullptr, T, E, alpha, beta, d_lb, dlogits, d_out);
    double out[2] = {NAN, NAN};
    CUDA_CHECK(be, cudaMemcpyAsync(out, d_out, sizeof out, cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(be, cudaStreamSynchronize(st));
    *lb = out[0];
    *z = out[1];
}

/* ------------------------------------------------------------------ */
/* Checks of a router's output, and expert counts                      */
/* ------------------------------------------------------------------ */

/* The CPU visits assignments in order and stops at the first failure; here
 * every assignment computes its own failure key a*3 + (0 expert, 1 weight,
 * 2 slot) and the smallest key wins (atomicMin on integers: the same result
 * whatever the order). For routers that own capacity, first[e*C + s] takes
 * the smallest assignment holding (e, s); any other holder is a duplicate,
 * and the smallest duplicate is the one the CPU's in-order scan meets first.
 * keys[0] = smallest failure key, keys[1] = smallest duplicate. */
constexpr unsigned long long CHECK_NONE = ~0ull;

__global__ void check_routing_scan_kernel(const int32_t *expert, const float *weight, const int32_t *slot,
                                          size_t nA, int E, int C, int32_t *kept,
                                          unsigned long long *first, unsigned long long *keys) {
    GRID_STRIDE_LOOP(a, nA) {
        const int e = expert[a];
        const int s = slot ? slot[a] : 0;
        unsigned long long key = CHECK_NONE;
        if (e < -1 || e >= E) {
            key = 3ull * a;
        } else if (e >= 0) {
            const float w = weight[a];
            if (!(isfinite(w) && w >= 0.0f)) key = 3ull * a + 1;
            else if (slot && (s < 0 || s >= C)) key = 3ull * a + 2;
        }
        if (key != CHECK_NONE) atomicMin(&keys[0], key);
        if (slot) {
            const bool valid = e >= 0 && e < E && s >= 0 && s < C;
            kept[a] = valid ? e : -1;
            if (valid) atomicMin(&first[(size_t)e * C + s], (unsigned long long)a);
        }
    }
}

__global__ void check_routing_dup_kernel(const int32_t *expert, const int32_t *slot, size_t nA, int E,
                                         int C, const unsigned long long *first,
                                         unsigned long long *keys) {
    GRID_STRIDE_LOOP(a, nA) {
        const int e = expert[a], s = slot[a];
        if (e >= 0 && e < E && s >= 0 && s < C && first[(size_t)e * C + s] != a)
            atomicMin(&keys[1], (unsigned long long)a);
    }
}

__device__ void write_record(int32_t *record, int32_t code, int32_t t, int32_t k, int32_t value,
                             int32_t extra) {
    record[1] = t;
    record[2] = k;
    record[3] = value;
    record[4] = extra;
    record[0] = code;
}

__global__ void check_routing_finish_kernel(const int32_t *expert, const float *weight, const int32_t *slot,
                                            int K, int E, int C, const unsigned long long *keys,
                                            int32_t *record) {
    if (threadIdx.x != 0 || record[0] != 0) return; /* the first error stays */
    if (keys[0] != CHECK_NONE) {
        const unsigned long long a = keys[0] / 3;
        const int what = (int)(keys[0] % 3);
        const int t = (int)(a / K), k = (int)(a % K);
        if (what == 0) write_record(record, MOE_CHECK_EXPERT, t, k, expert[a], E);
        else if (what == 1) write_record(record, MOE_CHECK_WEIGHT, t, k, __float_as_int(weight[a]), 0);
        else write_record(record, MOE_CHECK_SLOT, t, k, slot[a], C);
    } else if (slot && keys[1] != CHECK_NONE) {
        const unsigned long long a = keys[1];
        write_record(record, MOE_CHECK_SLOT_TWICE, (int)(a / K), (int)(a % K), slot[a], expert[a]);
    }
}

void cuda_check_routing(moe_backend *be, const int32_t *expert, const float *weight, const int32_t *slot,
                        int T, int K, int E, int C, int32_t *kept, int32_t *record) {
    const size_t nA = (size_t)(T > 0 ? T : 0) * (size_t)(K > 0 ? K : 0);
    if (nA == 0) return;
    cudaStream_t st = cuda_stream(be);
    const size_t table = slot && E > 0 && C > 0 ? (size_t)E * C : 0;
    ScratchLayout lay;
    const size_t keys_off = lay.add(2 * sizeof(unsigned long long));
    const size_t first_off = lay.add(table * sizeof(unsigned long long));
    char *base = cuda_scratch(be, lay.total);
    if (!base) return;
    unsigned long long *keys = (unsigned long long *)(base + keys_off);
    unsigned long long *first = (unsigned long long *)(base + first_off);
    /* 0xFF bytes: CHECK_NONE, larger than any key or index */
    CUDA_CHECK(be, cudaMemsetAsync(base, 0xFF, lay.total, st));
    check_routing_scan_kernel<<<cuda_blocks(nA), CUDA_THREADS, 0, st>>>(expert, weight, slot, nA, E, C, kept,
                                                                        first, keys);
    KERNEL_CHECK(be, "check_routing_scan_kernel");
    if (slot) {
        check_routing_dup_kernel<<<cuda_blocks(nA), CUDA_THREADS, 0, st>>>(expert, slot, nA, E, C, first, keys);
        KERNEL_CHECK(be, "check_routing_dup_kernel");
    }
    check_routing_finish_kernel<<<1, 32, 0, st>>>(expert, weight, slot, K, E, C, keys, record);
    KERNEL_CHECK(be, "check_routing_finish_kernel");
}

/* One block: the smallest index whose byte differs (atomicMin in shared). */
__global__ void check_bytes_kernel(const uint8_t *p, size_t n, uint8_t value, int32_t code, int32_t *record) {
    __shared__ unsigned long long smallest;
    if (threadIdx.x == 0) smallest = CHECK_NONE;
    __syncthreads();
    for (size_t i = threadIdx.x; i < n; i += blockDim.x)
        if (p[i] != value) {
            atomicMin(&smallest, (unsigned long long)i);
            break;
        }
    __syncthreads();
    if (threadIdx.x == 0 && smallest != CHECK_NONE && record[0] == 0)
        write_record(record, code, (int32_t)smallest, 0, p[smallest], 0);
}

void cuda_check_bytes(moe_backend *be, const void *p, size_t n, uint8_t value, int32_t code, int32_t *record) {
    if (n == 0) return;
    check_bytes_kernel<<<1, CUDA_THREADS, 0, cuda_stream(be)>>>((const uint8_t *)p, n, value, code, record);
    KERNEL_CHECK(be, "check_bytes_kernel");
}

/* Per-block histograms in shared memory, added into counts (zeroed first)
 * with integer atomics: exact, so the order does not matter. */
constexpr int COUNT_MAX_SHARED_E = 8192;

__global__ void expert_counts_kernel(const int32_t *kept, size_t nA, int E, int32_t *counts) {
    extern __shared__ int hist[];
    const bool shared = E <= COUNT_MAX_SHARED_E;
    if (shared)
        for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    GRID_STRIDE_LOOP(a, nA) {
        const int e = kept[a];
        if (e < 0 || e >= E) continue;
        if (shared) atomicAdd(&hist[e], 1);
        else atomicAdd(&counts[e], 1);
    }
    __syncthreads();
    if (shared)
        for (int e = threadIdx.x; e < E; e += blockDim.x)
            if (hist[e]) atomicAdd(&counts[e], hist[e]);
}

void cuda_expert_counts(moe_backend *be, const int32_t *kept, int T, int K, int E, int32_t *counts) {
    if (E <= 0) return;
    cudaStream_t st = cuda_stream(be);
    CUDA_CHECK(be, cudaMemsetAsync(counts, 0, (size_t)E * sizeof(int32_t), st));
    const size_t nA = (size_t)(T > 0 ? T : 0) * (size_t)(K > 0 ? K : 0);
    if (nA == 0) return;
    unsigned blocks = cuda_blocks(nA);
    if (blocks > 264) blocks = 264; /* a few per SM: fewer histograms to add */
    const size_t shmem = E <= COUNT_MAX_SHARED_E ? (size_t)E * sizeof(int) : 0;
    expert_counts_kernel<<<blocks, CUDA_THREADS, shmem, st>>>(kept, nA, E, counts);
    KERNEL_CHECK(be, "expert_counts_kernel");
}
