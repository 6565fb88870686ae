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
 * routers that own capacity a kept mask with only valid (expert, slot) and
 * its counts per expert.
 */
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
 * (2) one kernel ranks every assignment. The priority order is cut into
 * chunks, one per block, and a chunk into one segment per warp, walked 32
 * assignments (a step) at a time. Pass 1: each warp counts its segment's
 * assignments per expert (__match_any_sync groups a step's lanes by expert;
 * the group's lowest lane adds the group's size to the warp's row of
 * counts). A scan of those rows over the warps gives each warp's offset
 * inside the chunk and the chunk's total per expert, which the block
 * publishes. The block then adds the totals of every earlier chunk as they
 * appear. Pass 2: the warps walk their segments again; an assignment's rank
 * = its warp's running offset + its rank in its group. The block of the
 * last chunk, which then holds every total, writes the counts. Every sum is
 * of integers, so the result does not depend on timing.
 *
 * A block waits only for chunks of lower index, which publish without
 * waiting. A block takes its chunk from a counter when it starts (as CUB's
 * single-pass scans take their tiles), so every lower chunk belongs to a
 * block that started earlier and runs: the waits end however the blocks
 * are scheduled. The totals are published in the tickets (cuda_impl.
 * d_tickets, 0 between kernels) as total + 1, so a nonzero word is both the
 * flag and the value: [0] counts the blocks that are done, [1 + c E + e]
 * holds chunk c's total of expert e, the last word hands out the chunks;
 * the last block done puts them back to 0. So (chunks - 1) x E is at most
 * CUDA_TICKETS - 2 (one chunk, which publishes nothing, when E is larger). */
constexpr int CAP_THREADS = 256;
constexpr int CAP_WARPS = CAP_THREADS / 32;
constexpr int CAP_BATCH = 8; /* steps of a warp whose loads are issued together */
constexpr int CAP_PUBLISHED = CUDA_TICKETS - 2;
constexpr int CAP_NEXT_CHUNK = CUDA_TICKETS - 1; /* the ticket that hands out chunks */
constexpr size_t CAP_SHARED_MAX = 48 * 1024; /* the default, without opting in */

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

/* The assignment at position p < T*K of the priority order: its index a =
 * t*K + k and its expert, -1 for none (dropped without a count) and for one
 * >= E (flagged when flags != NULL). order (NULL: token order) holds, for
 * each k, the T tokens in priority order. 32-bit arithmetic: the host keeps
 * T*K below 2^31 (a 64-bit division costs several times more, per item). */
__device__ __forceinline__ int capacity_item(const int32_t *expert, const int32_t *order, unsigned T, unsigned K,
                                             int E, unsigned p, unsigned *a, int *flags) {
    const unsigned k = p / T, i = p - k * T;
    const unsigned t = order ? (unsigned)order[p] : i;
    *a = t * K + k;
    const int e = expert[*a];
    if (e >= E && flags) cuda_flag(flags, CUDA_FLAG_ROUTING);
    return e >= 0 && e < E ? e : -1;
}

/* counts: CAP_ROWS x E ints for each chunk when they do not fit in shared
 * memory (NULL: they do). Rows 0 .. CAP_WARPS-1: the warps' counts, then
 * their running offsets; then the earlier chunks' totals; then the chunk's
 * own. */
constexpr int CAP_ROWS = CAP_WARPS + 2;

__global__ void __launch_bounds__(CAP_THREADS)
capacity_rank_kernel(const int32_t *expert, const int32_t *order, int T, int K, int E, int C, int seg,
                     int32_t *kept, int32_t *slot, int32_t *counts_before, int32_t *counts_after, int *counts,
                     int *tickets, int *flags) {
    extern __shared__ int cap_smem[];
    __shared__ bool last_done;
    __shared__ int chunk_taken;
    const int nchunks = gridDim.x;
    if (threadIdx.x == 0) chunk_taken = nchunks > 1 ? atomicAdd(&tickets[CAP_NEXT_CHUNK], 1) : 0;
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, chunk = chunk_taken;
    int *cnt = counts ? counts + (size_t)chunk * CAP_ROWS * E : cap_smem;
    int *wcnt = cnt + (size_t)warp * E, *earlier = cnt + (size_t)CAP_WARPS * E, *own = earlier + E;
    int *published = tickets + 1;
    for (int i = threadIdx.x; i < CAP_ROWS * E; i += CAP_THREADS) cnt[i] = 0;
    __syncthreads();

    const unsigned nP = (unsigned)T * (unsigned)K, first = ((unsigned)chunk * CAP_WARPS + warp) * (unsigned)seg;
    const unsigned end = first < nP ? min(nP, first + (unsigned)seg) : first;
    const unsigned lanes_below = (1u << lane) - 1u;
    for (unsigned b = first; b < end; b += 32 * CAP_BATCH) {
        int e[CAP_BATCH];
#pragma unroll
        for (int q = 0; q < CAP_BATCH; ++q) {
            const unsigned p = b + q * 32 + lane;
            unsigned a;
            e[q] = p < end ? capacity_item(expert, order, T, K, E, p, &a, flags) : -1;
        }
#pragma unroll
        for (int q = 0; q < CAP_BATCH; ++q) {
            if (b + q * 32 >= end) break;
            const unsigned peers = __match_any_sync(0xffffffffu, e[q]);
            if (e[q] >= 0 && (peers & lanes_below) == 0) atomicAdd(&wcnt[e[q]], __popc(peers));
        }
    }
    __syncthreads();
    /* warp w scans experts w, w + CAP_WARPS, ...: lane i holds warp i's count */
    for (int e = warp; e < E; e += CAP_WARPS) {
        const int n = lane < CAP_WARPS ? cnt[lane * E + e] : 0;
        int incl = n;
#pragma unroll
        for (int off = 1; off < CAP_WARPS; off <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, incl, off);
            if (lane >= off) incl += y;
        }
        if (lane < CAP_WARPS) cnt[lane * E + e] = incl - n;
        const int total = __shfl_sync(0xffffffffu, incl, CAP_WARPS - 1);
        if (lane == 0) {
            own[e] = total;
            if (chunk < nchunks - 1) atomicExch(&published[chunk * E + e], total + 1);
        }
    }
    if (nchunks > 1) {
        /* chunk * E <= CAP_PUBLISHED words, a few per thread: all loads in flight */
        constexpr int PER_THREAD = (CAP_PUBLISHED + CAP_THREADS - 1) / CAP_THREADS;
        const int words = chunk * E;
        int v[PER_THREAD];
#pragma unroll
        for (int u = 0; u < PER_THREAD; ++u) {
            const int i = threadIdx.x + u * CAP_THREADS;
            v[u] = i < words ? *(volatile int *)&published[i] : 1;
        }
#pragma unroll
        for (int u = 0; u < PER_THREAD; ++u) {
            const int i = threadIdx.x + u * CAP_THREADS;
            while (v[u] == 0) {
                __nanosleep(32);
                v[u] = *(volatile int *)&published[i];
            }
        }
#pragma unroll
        for (int u = 0; u < PER_THREAD; ++u) {
            const int i = threadIdx.x + u * CAP_THREADS;
            if (i < words) atomicAdd(&earlier[i % E], v[u] - 1);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < CAP_WARPS * E; i += CAP_THREADS) cnt[i] += earlier[i % E];
    __syncthreads();
    if (chunk == nchunks - 1)
        for (int e = threadIdx.x; e < E; e += CAP_THREADS) {
            const int total = earlier[e] + own[e];
            counts_before[e] = total;
            counts_after[e] = total < C ? total : (C > 0 ? C : 0);
        }

    for (unsigned b = first; b < end; b += 32 * CAP_BATCH) {
        int e[CAP_BATCH];
        unsigned a[CAP_BATCH];
#pragma unroll
        for (int q = 0; q < CAP_BATCH; ++q) {
            const unsigned p = b + q * 32 + lane;
            e[q] = p < end ? capacity_item(expert, order, T, K, E, p, &a[q], nullptr) : -1;
        }
#pragma unroll
        for (int q = 0; q < CAP_BATCH; ++q) {
            if (b + q * 32 >= end) break;
            const unsigned peers = __match_any_sync(0xffffffffu, e[q]);
            const int rank = e[q] >= 0 ? wcnt[e[q]] + __popc(peers & lanes_below) : 0;
            __syncwarp(); /* every lane has read its group's offset */
            if (e[q] >= 0 && (peers & lanes_below) == 0) wcnt[e[q]] += __popc(peers);
            __syncwarp();
            if (b + q * 32 + lane < end) {
                const bool keep = e[q] >= 0 && rank < C;
                kept[a[q]] = keep ? e[q] : -1;
                slot[a[q]] = keep ? rank : -1;
            }
        }
    }
    if (nchunks == 1) return;
    __syncthreads();
    if (threadIdx.x == 0) last_done = atomicAdd(&tickets[0], 1) == nchunks - 1;
    __syncthreads();
    if (!last_done) return;
    for (int i = threadIdx.x; i < (nchunks - 1) * E; i += CAP_THREADS) published[i] = 0;
    if (threadIdx.x == 0) tickets[0] = 0, tickets[CAP_NEXT_CHUNK] = 0; /* every block took its chunk */
}

void cuda_capacity_assign(moe_backend *be, const int32_t *expert, const float *weight, int T, int K,
                          int E, int C, int policy, int32_t *kept, int32_t *slot,
                          int32_t *counts_before, int32_t *counts_after) {
    if (E <= 0) return;
    cudaStream_t st = cuda_stream(be);
    int *flags = cuda_state(be)->d_flags;
    if (T < 0) T = 0;
    if (K < 0) K = 0;
    const size_t nA = (size_t)T * K;
    if (nA > (size_t)INT32_MAX) { /* positions are 32-bit in the kernel */
        cuda_record_error(be, __FILE__, __LINE__, "capacity_assign", "more than 2^31 - 1 assignments");
        return;
    }
    const int sorted = policy == 1 && nA > 0;

    /* As many chunks as the published words allow, of at least one step per
     * warp; a warp's segment a whole number of steps. */
    const size_t block_step = 32 * CAP_WARPS;
    size_t nchunks = (nA + block_step - 1) / block_step;
    const size_t max_chunks = 1 + (size_t)CAP_PUBLISHED / E; /* the last chunk publishes nothing */
    if (nchunks > max_chunks) nchunks = max_chunks;
    if (nchunks < 1) nchunks = 1;
    const size_t per_warp = (nA + nchunks * CAP_WARPS - 1) / (nchunks * CAP_WARPS);
    const size_t seg = per_warp > 32 ? (per_warp + 31) / 32 * 32 : 32;
    nchunks = (nA + seg * CAP_WARPS - 1) / (seg * CAP_WARPS);
    if (nchunks < 1) nchunks = 1;
    const size_t count_bytes = (size_t)CAP_ROWS * E * sizeof(int);
    const bool shared_counts = count_bytes <= CAP_SHARED_MAX;

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
    const size_t big_off = lay.add(shared_counts ? 0 : nchunks * count_bytes);
    const size_t keys_off = lay.add(sorted ? nA * sizeof(float) : 0);
    const size_t skeys_off = lay.add(sorted ? nA * sizeof(float) : 0);
    const size_t iota_off = lay.add(sorted ? (size_t)T * sizeof(int32_t) : 0);
    const size_t order_off = lay.add(sorted ? nA * sizeof(int32_t) : 0);
    const size_t tmp_off = lay.add(sort_bytes);
    char *base = cuda_scratch(be, lay.total);
    if (!base) return;
    int32_t *d_counts = (int32_t *)(base + counts_off);
    int32_t *order = nullptr;

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
    capacity_rank_kernel<<<(unsigned)nchunks, CAP_THREADS, shared_counts ? count_bytes : 0, st>>>(
        expert, order, T, K, E, C, (int)seg, kept, slot, host_counts ? d_counts : counts_before,
        host_counts ? d_counts + E : counts_after, shared_counts ? nullptr : (int *)(base + big_off),
        cuda_state(be)->d_tickets, flags);
    KERNEL_CHECK(be, "capacity_rank_kernel");
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

/* One thread per token: blocks of ROW_THREADS, so a batch's tokens reach
 * every SM (8192 tokens in blocks of 256 would be 32 blocks). */
constexpr int ROW_THREADS = 64;

void cuda_combine_weights(moe_backend *be, const float *weight, const int32_t *kept, int T, int K,
                          int renorm, float *cw) {
    if (T <= 0 || K <= 0) return;
    combine_weights_kernel<<<cuda_blocks((size_t)T, ROW_THREADS), ROW_THREADS, 0, cuda_stream(be)>>>(
        weight, kept, T, K, renorm, cw);
    KERNEL_CHECK(be, "combine_weights_kernel");
}

void cuda_combine_weights_bwd(moe_backend *be, const float *weight, const int32_t *kept, int T,
                              int K, int renorm, const float *dcw, float *dweight) {
    if (T <= 0 || K <= 0) return;
    combine_weights_bwd_kernel<<<cuda_blocks((size_t)T, ROW_THREADS), ROW_THREADS, 0, cuda_stream(be)>>>(
        weight, kept, T, K, renorm, dcw, dweight);
    KERNEL_CHECK(be, "combine_weights_bwd_kernel");
}

/* ------------------------------------------------------------------ */
/* Dispatch and combine                                                */
/* ------------------------------------------------------------------ */

/* The row kernels move W floats at a time: W = 4 (16-byte vectors) when d is
 * a multiple of 4 and every row pointer is 16-byte aligned, W = 1 otherwise. */
template <int W>
struct VecF {
    float v[W];
};

template <int W>
__device__ __forceinline__ VecF<W> vload(const float *p) {
    VecF<W> r;
    if constexpr (W == 4) {
        const float4 q = *reinterpret_cast<const float4 *>(p);
        r.v[0] = q.x, r.v[1] = q.y, r.v[2] = q.z, r.v[3] = q.w;
    } else {
        r.v[0] = *p;
    }
    return r;
}

/* read-only input, through the non-coherent cache */
template <int W>
__device__ __forceinline__ VecF<W> vload_ro(const float *p) {
    VecF<W> r;
    if constexpr (W == 4) {
        const float4 q = __ldg(reinterpret_cast<const float4 *>(p));
        r.v[0] = q.x, r.v[1] = q.y, r.v[2] = q.z, r.v[3] = q.w;
    } else {
        r.v[0] = __ldg(p);
    }
    return r;
}

template <int W>
__device__ __forceinline__ void vstore(float *p, const VecF<W> &r) {
    if constexpr (W == 4)
        *reinterpret_cast<float4 *>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
    else
        *p = r.v[0];
}

/* The same values rounded to bf16 (an operand copy: keep_activations). */
template <int W>
__device__ __forceinline__ void vstore_bf16(__nv_bfloat16 *p, const VecF<W> &r) {
    if constexpr (W == 4)
        *reinterpret_cast<uint2 *>(p) = pack_bf16x4(r.v[0], r.v[1], r.v[2], r.v[3]);
    else
        *p = __float2bfloat16_rn(r.v[0]);
}

static inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Threads of a row kernel's block: one block per token (or assignment), at
 * most 256 threads, at least a warp. */
static inline int row_threads(int nvec) {
    int t = (nvec + 31) / 32 * 32;
    return t < 32 ? 32 : (t > CUDA_THREADS ? CUDA_THREADS : t);
}

/* Grid of one block per item, capped (the kernels stride over the rest). */
static inline unsigned row_blocks(size_t n) {
    const size_t cap = 1u << 30;
    return (unsigned)(n < 1 ? 1 : (n > cap ? cap : n));
}

/* Rows (e, s) with s >= fill_counts[e] of buf [E*C, d] (and of its bf16
 * copy when not NULL) set to 0, a warp per row, the warps of `nblocks`
 * blocks striding from block `block` on. */
template <int W>
__device__ void zero_rows_past_counts(float *__restrict__ buf, __nv_bfloat16 *__restrict__ buf_bf16,
                                      const int32_t *__restrict__ fill_counts, int E, int C, int d, unsigned block,
                                      unsigned nblocks) {
    const int nvec = d / W, lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    VecF<W> z;
#pragma unroll
    for (int c = 0; c < W; ++c) z.v[c] = 0.0f;
    const size_t nrows = (size_t)E * C, stride = (size_t)nblocks * wpb;
    for (size_t r = (size_t)block * wpb + (threadIdx.x >> 5); r < nrows; r += stride) {
        const int e = (int)(r / C), s = (int)(r - (size_t)e * C);
        if (s < fill_counts[e]) continue;
        for (int i = lane; i < nvec; i += 32) vstore<W>(buf + r * d + (size_t)i * W, z);
        if (buf_bf16)
            for (int i = lane; i < nvec; i += 32) vstore_bf16<W>(buf_bf16 + r * d + (size_t)i * W, z);
    }
}

/* Blocks for zero_rows_past_counts: a few per SM's worth, striding over the rows. */
static unsigned zero_blocks(size_t nrows, int threads) {
    const size_t warps = threads / 32, want = (nrows + warps - 1) / warps;
    return (unsigned)(want < 2048 ? (want ? want : 1) : 2048);
}

/* The rows a token's K assignments fill: rows[k] = e*C+s, or -1 when the
 * assignment is not kept (or invalid: flagged by thread 0 when `flag`). */
constexpr int DISPATCH_MAX_K = 8;

/* One block per token: x[t] is read once and stored to the row of each of
 * its kept assignments, which are marked in `filled`; also rounded to bf16
 * into Xe_bf16 when Xe is a saved activation (keep_activations). */
template <int W>
__global__ void dispatch_kernel(const float *__restrict__ x, const int32_t *__restrict__ kept,
                                const int32_t *__restrict__ slot, int T, int K, int C, int E, int d,
                                float *__restrict__ Xe, int32_t *__restrict__ filled, int *flags,
                                __nv_bfloat16 *__restrict__ Xe_bf16, const int32_t *__restrict__ fill_counts,
                                unsigned token_blocks) {
    const int nvec = d / W;
    if (blockIdx.x >= token_blocks) { /* the blocks past the tokens' zero the rows left empty */
        zero_rows_past_counts<W>(Xe, Xe_bf16, fill_counts, E, C, d, blockIdx.x - token_blocks,
                                 gridDim.x - token_blocks);
        return;
    }
    for (size_t t = blockIdx.x; t < (size_t)T; t += token_blocks) {
        for (int k0 = 0; k0 < K; k0 += DISPATCH_MAX_K) {
            const int nk = K - k0 < DISPATCH_MAX_K ? K - k0 : DISPATCH_MAX_K;
            size_t rows[DISPATCH_MAX_K];
            int any = 0;
#pragma unroll
            for (int j = 0; j < DISPATCH_MAX_K; ++j) {
                rows[j] = (size_t)-1;
                if (j >= nk) continue;
                const size_t a = t * K + k0 + j;
                const int e = kept[a];
                if (e < 0) continue;
                const int s = slot[a];
                if (e >= E || s < 0 || s >= C) {
                    if (threadIdx.x == 0) cuda_flag(flags, CUDA_FLAG_ROUTING);
                    continue;
                }
                rows[j] = (size_t)e * C + s;
                any = 1;
                if (threadIdx.x == 0 && filled) filled[rows[j]] = 1;
            }
            if (!any) continue;
            const float *src = x + t * d;
#pragma unroll 4
            for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
                const VecF<W> v = vload_ro<W>(src + (size_t)i * W);
#pragma unroll
                for (int j = 0; j < DISPATCH_MAX_K; ++j)
                    if (rows[j] != (size_t)-1) {
                        vstore<W>(Xe + rows[j] * d + (size_t)i * W, v);
                        if (Xe_bf16) vstore_bf16<W>(Xe_bf16 + rows[j] * d + (size_t)i * W, v);
                    }
            }
        }
    }
}

/* Rows of buf[nrows, d] not marked in `filled` are set to 0, one warp per
 * row (filled rows are left alone). Most rows are filled: a block per row
 * spent its time starting blocks that had nothing to do. */
template <int W>
__global__ void zero_unfilled_kernel(float *__restrict__ buf, const int32_t *__restrict__ filled,
                                     size_t nrows, int d, __nv_bfloat16 *__restrict__ buf_bf16) {
    const int nvec = d / W, lane = threadIdx.x & 31;
    const size_t warps = (size_t)gridDim.x * (blockDim.x >> 5);
    VecF<W> z;
#pragma unroll
    for (int c = 0; c < W; ++c) z.v[c] = 0.0f;
    for (size_t r = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < nrows; r += warps) {
        if (filled[r]) continue;
        float *dst = buf + r * d;
        for (int i = lane; i < nvec; i += 32) vstore<W>(dst + (size_t)i * W, z);
        if (buf_bf16)
            for (int i = lane; i < nvec; i += 32) vstore_bf16<W>(buf_bf16 + r * d + (size_t)i * W, z);
    }
}

/* A zeroed row mask of n ints in scratch; NULL (error recorded) on failure. */
static int32_t *filled_mask(moe_backend *be, size_t n) {
    int32_t *filled = (int32_t *)cuda_scratch(be, n * sizeof(int32_t));
    if (!filled) return NULL;
    CUDA_CHECK_RET(be, cudaMemsetAsync(filled, 0, n * sizeof(int32_t), cuda_stream(be)), NULL);
    return filled;
}

static void zero_unfilled(moe_backend *be, float *buf, const int32_t *filled, size_t nrows, int d, bool vec,
                          __nv_bfloat16 *buf_bf16 = nullptr) {
    cudaStream_t st = cuda_stream(be);
    const size_t rows_per_block = CUDA_THREADS / 32;
    const unsigned blocks = row_blocks((nrows + rows_per_block - 1) / rows_per_block);
    if (vec) {
        zero_unfilled_kernel<4><<<blocks, CUDA_THREADS, 0, st>>>(buf, filled, nrows, d, buf_bf16);
    } else {
        zero_unfilled_kernel<1><<<blocks, CUDA_THREADS, 0, st>>>(buf, filled, nrows, d, buf_bf16);
    }
    KERNEL_CHECK(be, "zero_unfilled_kernel");
}

/* With fill_counts one launch: T blocks copy the tokens' rows, the blocks
 * after them zero the rows past each expert's count. Without, the filled
 * rows are marked and the others zeroed by a second launch. */
void cuda_dispatch(moe_backend *be, const float *x, const int32_t *kept, const int32_t *slot, int T,
                   int K, int C, int E, int d, const int32_t *fill_counts, float *Xe) {
    if (E <= 0 || C <= 0 || d <= 0) return;
    cudaStream_t st = cuda_stream(be);
    const size_t nrows = (size_t)E * C;
    if (T <= 0 || K <= 0) fill_counts = nullptr; /* nothing kept: the plain path zeroes every row */
    int32_t *filled = nullptr;
    if (!fill_counts) {
        filled = filled_mask(be, nrows);
        if (!filled) return;
    }
    const bool vec = d % 4 == 0 && aligned16(x) && aligned16(Xe);
    __nv_bfloat16 *Xe_bf16 = cuda_activation_copy_target(be, Xe, (long long)nrows, d); /* or NULL */
    if (T > 0 && K > 0) {
        int *flags = cuda_state(be)->d_flags;
        const int threads = vec ? row_threads(d / 4) : row_threads(d);
        const unsigned token_blocks = row_blocks((size_t)T);
        const unsigned blocks = token_blocks + (fill_counts ? zero_blocks(nrows, threads) : 0);
        if (vec) {
            dispatch_kernel<4><<<blocks, threads, 0, st>>>(x, kept, slot, T, K, C, E, d, Xe, filled, flags, Xe_bf16,
                                                           fill_counts, token_blocks);
        } else {
            dispatch_kernel<1><<<blocks, threads, 0, st>>>(x, kept, slot, T, K, C, E, d, Xe, filled, flags, Xe_bf16,
                                                           fill_counts, token_blocks);
        }
        KERNEL_CHECK(be, "dispatch_kernel");
    }
    /* the slots no kept assignment filled: the expert GEMMs read them */
    if (!fill_counts) zero_unfilled(be, Xe, filled, nrows, d, vec, Xe_bf16);
}

/* One block per token: out[t] = init + sum over kept k (ascending) of
 * scale_k * rows[t,k], scale_k = cw[t,k] (combine: init 0, products rounded
 * as on the CPU, then + residual[t] when not NULL) or 1 (dispatch_bwd: init
 * dx[t] when accumulating, else 0; plain sums). E is not passed: only the
 * slot can be range-checked. */
template <int W, bool WEIGHTED>
__global__ void gather_sum_kernel(const float *__restrict__ rows, const int32_t *__restrict__ kept,
                                  const int32_t *__restrict__ slot, const float *__restrict__ cw,
                                  const float *__restrict__ residual, int T, int K, int C, int d, int accumulate,
                                  float *__restrict__ out, int *flags) {
    const int nvec = d / W;
    for (size_t t = blockIdx.x; t < (size_t)T; t += gridDim.x) {
        float *dst = out + t * d;
#pragma unroll 2
        for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
            VecF<W> acc;
            if (!WEIGHTED && accumulate) {
                acc = vload<W>(dst + (size_t)i * W);
            } else {
#pragma unroll
                for (int c = 0; c < W; ++c) acc.v[c] = 0.0f;
            }
            for (int k = 0; k < K; ++k) {
                const size_t a = t * K + k;
                const int e = kept[a];
                if (e < 0) continue;
                const int s = slot[a];
                if (s < 0 || s >= C) {
                    if (i == (int)threadIdx.x && threadIdx.x == 0) cuda_flag(flags, CUDA_FLAG_ROUTING);
                    continue;
                }
                const VecF<W> v = vload_ro<W>(rows + ((size_t)e * C + s) * d + (size_t)i * W);
                if constexpr (WEIGHTED) {
                    const float w = cw[a];
#pragma unroll
                    for (int c = 0; c < W; ++c) acc.v[c] = add_product(acc.v[c], w, v.v[c]);
                } else {
#pragma unroll
                    for (int c = 0; c < W; ++c) acc.v[c] = __fadd_rn(acc.v[c], v.v[c]);
                }
            }
            if (WEIGHTED && residual) {
                const VecF<W> r = vload_ro<W>(residual + t * d + (size_t)i * W);
#pragma unroll
                for (int c = 0; c < W; ++c) acc.v[c] = __fadd_rn(acc.v[c], r.v[c]);
            }
            vstore<W>(dst + (size_t)i * W, acc);
        }
    }
}

/* dx[t, i] (+)= sum over kept k of dXe[row(t,k), i], k in order. */
void cuda_dispatch_bwd(moe_backend *be, const float *dXe, const int32_t *kept, const int32_t *slot,
                       int T, int K, int C, int d, int accumulate, float *dx) {
    if (T <= 0 || d <= 0) return;
    if (K < 0) K = 0; /* overwriting still writes the zeros */
    if (K == 0 && accumulate) return;
    cudaStream_t st = cuda_stream(be);
    int *flags = cuda_state(be)->d_flags;
    if (d % 4 == 0 && aligned16(dXe) && aligned16(dx)) {
        gather_sum_kernel<4, false><<<row_blocks((size_t)T), row_threads(d / 4), 0, st>>>(
            dXe, kept, slot, NULL, NULL, T, K, C, d, accumulate, dx, flags);
    } else {
        gather_sum_kernel<1, false><<<row_blocks((size_t)T), row_threads(d), 0, st>>>(
            dXe, kept, slot, NULL, NULL, T, K, C, d, accumulate, dx, flags);
    }
    KERNEL_CHECK(be, "dispatch_bwd_kernel");
}

/* y[t, i] = sum over kept k of cw[t,k] * Ye[row(t,k), i] (+ residual[t, i]
 * last, when not NULL) (overwrite). */
void cuda_combine(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                  const float *cw, int T, int K, int C, int d, const float *residual, float *y) {
    if (T <= 0 || d <= 0) return;
    cudaStream_t st = cuda_stream(be);
    int *flags = cuda_state(be)->d_flags;
    const int Kc = K > 0 ? K : 0;
    if (d % 4 == 0 && aligned16(Ye) && aligned16(y) && (!residual || aligned16(residual))) {
        gather_sum_kernel<4, true><<<row_blocks((size_t)T), row_threads(d / 4), 0, st>>>(
            Ye, kept, slot, cw, residual, T, Kc, C, d, 0, y, flags);
    } else {
        gather_sum_kernel<1, true><<<row_blocks((size_t)T), row_threads(d), 0, st>>>(
            Ye, kept, slot, cw, residual, T, Kc, C, d, 0, y, flags);
    }
    KERNEL_CHECK(be, "combine_kernel");
}

/* One warp per assignment (t,k): lanes across d write dYe[row] = cw * dy[t]
 * and form dcw = <dy[t], Ye[row]> (a warp sum); the row is marked in
 * `filled`, and the rows left unmarked are zeroed afterwards. */
template <int W>
__global__ void combine_bwd_kernel(const float *__restrict__ Ye, const int32_t *__restrict__ kept,
                                   const int32_t *__restrict__ slot, const float *__restrict__ cw,
                                   const float *__restrict__ dy, size_t nA, int K, int C, int E, int d,
                                   float *__restrict__ dYe, float *__restrict__ dcw,
                                   int32_t *__restrict__ filled, int *flags, const int32_t *__restrict__ fill_counts,
                                   unsigned assign_blocks) {
    if (blockIdx.x >= assign_blocks) { /* the blocks past the assignments' zero the rows left empty */
        zero_rows_past_counts<W>(dYe, nullptr, fill_counts, E, C, d, blockIdx.x - assign_blocks,
                                 gridDim.x - assign_blocks);
        return;
    }
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
    const size_t r = (size_t)e * C + s;
    if (lane == 0 && filled) filled[r] = 1;
    const float *g = dy + (a / K) * d;
    const float *yr = Ye + r * d;
    float *dr = dYe + r * d;
    const float w = cw[a];
    const int nvec = d / W;
    float dot = 0.0f;
#pragma unroll 4
    for (int i = lane; i < nvec; i += 32) {
        const VecF<W> gv = vload_ro<W>(g + (size_t)i * W);
        const VecF<W> yv = vload_ro<W>(yr + (size_t)i * W);
        VecF<W> o;
#pragma unroll
        for (int c = 0; c < W; ++c) {
            o.v[c] = w * gv.v[c];
            dot += gv.v[c] * yv.v[c];
        }
        vstore<W>(dr + (size_t)i * W, o);
    }
    dot = warp_sum(dot);
    if (lane == 0) dcw[a] = dot;
}

void cuda_combine_bwd(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                      const float *cw, const float *dy, int T, int K, int C, int E, int d,
                      const int32_t *fill_counts, float *dYe, float *dcw) {
    cudaStream_t st = cuda_stream(be);
    const size_t nrows = E > 0 && C > 0 ? (size_t)E * C : 0;
    const int dd = d > 0 ? d : 0;
    const bool vec = dd % 4 == 0 && aligned16(Ye) && aligned16(dy) && aligned16(dYe);
    /* with fill_counts the empty rows are zeroed in the same launch (see cuda_dispatch) */
    if (T <= 0 || K <= 0 || nrows == 0 || dd == 0) fill_counts = nullptr;
    int32_t *filled = NULL;
    if (nrows > 0 && !fill_counts) {
        filled = filled_mask(be, nrows);
        if (!filled) return;
    }
    if (T > 0 && K > 0) {
        const size_t nA = (size_t)T * K;
        const size_t warps_per_block = CUDA_THREADS / 32;
        const unsigned assign_blocks = (unsigned)((nA + warps_per_block - 1) / warps_per_block);
        const unsigned blocks = assign_blocks + (fill_counts ? zero_blocks(nrows, CUDA_THREADS) : 0);
        /* with no rows (E*C == 0) every assignment is skipped: a scratch int
         * stands in for the mask */
        int32_t *mark = filled;
        if (!mark && !fill_counts) {
            mark = (int32_t *)cuda_scratch(be, sizeof(int32_t));
            if (!mark) return;
        }
        if (vec) {
            combine_bwd_kernel<4><<<blocks, CUDA_THREADS, 0, st>>>(Ye, kept, slot, cw, dy, nA, K, C, E, dd, dYe, dcw,
                                                                   mark, cuda_state(be)->d_flags, fill_counts,
                                                                   assign_blocks);
        } else {
            combine_bwd_kernel<1><<<blocks, CUDA_THREADS, 0, st>>>(Ye, kept, slot, cw, dy, nA, K, C, E, dd, dYe, dcw,
                                                                   mark, cuda_state(be)->d_flags, fill_counts,
                                                                   assign_blocks);
        }
        KERNEL_CHECK(be, "combine_bwd_kernel");
    }
    if (filled && dd > 0) zero_unfilled(be, dYe, filled, nrows, dd, vec);
}

/* ------------------------------------------------------------------ */
/* Auxiliary losses                                                    */
/* ------------------------------------------------------------------ */

/* The auxiliary losses in one kernel. One thread per token row (E, the
 * number of experts, is small):
 *   p = softmax(lb_logits[t]), fp = sum_e f_e p_e,
 *   d_lb[t,e] = alpha * E / T * p_e * (f_e - fp)        (overwrite)
 *   lse = logsumexp(logits[t]),
 *   dlogits[t,e] += beta * 2/T * lse * softmax(logits[t])_e   (accumulate)
 * with the same row helpers and the same expressions as the CPU (p is kept
 * in d_lb's row until it is overwritten by the gradient). f comes from
 * counts (as the CPU computes it: float division of the converted counts;
 * each block makes its own copy in shared memory) or is given in device
 * memory (for E > AUX_SHARED_E, aux_f_kernel computes it there first).
 * Each block sums its rows' fp and lse^2 in
 * double; the last block to finish adds the blocks' sums in block order:
 * out[0] = E * mean_t fp = lb, out[1] = mean_t lse^2 = z. */
constexpr int AUX_THREADS = 64; /* small blocks: a row is a long serial chain, so spread rows over SMs */
constexpr int AUX_MAX_BLOCKS = 1024;
constexpr int AUX_SHARED_E = 1024;

/* f[e] = counts[e] / sum(counts), one thread. */
__device__ void aux_f_from_counts(const int32_t *counts, int E, float *f) {
    long long routed = 0;
    for (int e = 0; e < E; ++e) routed += counts[e];
    for (int e = 0; e < E; ++e) f[e] = routed ? (float)counts[e] / (float)routed : 0.0f;
}

__global__ void aux_f_kernel(const int32_t *counts, int E, float *f) {
    if (threadIdx.x == 0) aux_f_from_counts(counts, E, f);
}

/* One row of aux_kernel for E <= EM with the row in registers: the same
 * operations in the same order as moe_softmax_row, moe_logsumexp_row and
 * the loops of the general path (so the same bits), without the round
 * trips through global memory that path makes for every element (p is
 * written, then read back twice). The dlogits row it adds to is loaded with
 * the logits; where d_lb is that row (aliased), the load-balancing term
 * stands in for it, as the store then the read-back would give. */
template <int EM>
__device__ __forceinline__ void aux_row_in_registers(const float *l, const float *lz, const float *f, int T, int E,
                                                     float alpha, float beta, float *d_lb, float *dl, bool aliased,
                                                     double &s_fp, double &s_z) {
    float p[EM], z[EM], g[EM];
    float m = -INFINITY, mz = -INFINITY;
#pragma unroll
    for (int e = 0; e < EM; ++e)
        if (e < E) {
            p[e] = l[e];
            z[e] = lz[e];
            if (!aliased) g[e] = dl[e];
            m = p[e] > m ? p[e] : m;
            mz = z[e] > mz ? z[e] : mz;
        }
    float s = 0.0f, sz = 0.0f;
#pragma unroll
    for (int e = 0; e < EM; ++e)
        if (e < E) {
            p[e] = expf((p[e] - m) / 1.0f);
            s += p[e];
            sz += expf(z[e] - mz);
        }
    double fp = 0.0;
#pragma unroll
    for (int e = 0; e < EM; ++e)
        if (e < E) {
            p[e] /= s;
            fp += (double)f[e] * p[e];
        }
#pragma unroll
    for (int e = 0; e < EM; ++e)
        if (e < E) {
            const float lb = (float)(alpha * (double)E / T * p[e] * (f[e] - fp));
            if (aliased) g[e] = lb;
            else d_lb[e] = lb;
        }
    s_fp += fp;
    const float lse = mz + logf(sz);
    s_z += (double)lse * lse;
#pragma unroll
    for (int e = 0; e < EM; ++e)
        if (e < E) dl[e] = g[e] + beta * 2.0f / (float)T * lse * expf(z[e] - lse);
}

template <int EM> /* 0: any E, the rows through global memory */
__global__ void __launch_bounds__(AUX_THREADS)
aux_kernel(const float *lb_logits, const float *logits, const int32_t *counts, const float *f_given, int T, int E,
           float alpha, float beta, float *d_lb, float *dlogits, double *partial, int *ticket, double *out) {
    __shared__ float f_shared[AUX_SHARED_E];
    const float *f = f_given;
    if (counts) { /* then E <= AUX_SHARED_E */
        if (threadIdx.x == 0) aux_f_from_counts(counts, E, f_shared);
        __syncthreads();
        f = f_shared;
    }
    double s_fp = 0.0, s_z = 0.0;
    GRID_STRIDE_LOOP(t, T) {
        if constexpr (EM > 0) {
            aux_row_in_registers<EM>(lb_logits + t * E, logits + t * E, f, T, E, alpha, beta, d_lb + t * E,
                                     dlogits + t * E, d_lb == dlogits, s_fp, s_z);
            continue;
        }
        const float *l = lb_logits + t * E;
        float *p = d_lb + t * E;
        moe_softmax_row(l, p, E, 1.0f);
        double fp = 0.0;
        for (int e = 0; e < E; ++e) fp += (double)f[e] * p[e];
        for (int e = 0; e < E; ++e) p[e] = (float)(alpha * (double)E / T * p[e] * (f[e] - fp));
        s_fp += fp;

        const float *lz = logits + t * E;
        const float lse = moe_logsumexp_row(lz, E);
        s_z += (double)lse * lse;
        float *dl = dlogits + t * E;
        for (int e = 0; e < E; ++e) dl[e] += beta * 2.0f / (float)T * lse * expf(lz[e] - lse);
    }
    s_fp = block_sum(s_fp);
    s_z = block_sum(s_z);
    if (threadIdx.x == 0) partial[2 * blockIdx.x] = s_fp, partial[2 * blockIdx.x + 1] = s_z;
    if (!last_block_arrived(ticket, gridDim.x)) return;
    s_fp = 0.0, s_z = 0.0;
    for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
        s_fp += __ldcg(&partial[2 * b]);
        s_z += __ldcg(&partial[2 * b + 1]);
    }
    s_fp = block_sum(s_fp);
    s_z = block_sum(s_z);
    if (threadIdx.x == 0) {
        out[0] = (double)E * s_fp / T;
        out[1] = s_z / T;
    }
}

/* Both variants: f from counts (device) or h_f (host), lb and z to d_out[0..1] (device). */
static void aux_enqueue(moe_backend *be, const float *lb_logits, const float *logits, const float *h_f,
                        const int32_t *counts, int T, int E, float alpha, float beta, float *d_lb,
                        float *dlogits, double *d_out) {
    cudaStream_t st = cuda_stream(be);
    const long long want = ((long long)T + AUX_THREADS - 1) / AUX_THREADS;
    const unsigned blocks = (unsigned)(want < AUX_MAX_BLOCKS ? want : AUX_MAX_BLOCKS);
    ScratchLayout lay;
    const size_t f_off = lay.add((size_t)E * sizeof(float));
    const size_t part_off = lay.add((size_t)blocks * 2 * sizeof(double));
    char *base = cuda_scratch(be, lay.total);
    if (!base) return;
    float *d_f = (float *)(base + f_off);
    double *partial = (double *)(base + part_off);
    if (!counts) {
        CUDA_CHECK(be, cudaMemcpyAsync(d_f, h_f, (size_t)E * sizeof(float), cudaMemcpyDefault, st));
    } else if (E > AUX_SHARED_E) {
        aux_f_kernel<<<1, 32, 0, st>>>(counts, E, d_f);
        KERNEL_CHECK(be, "aux_f_kernel");
        counts = nullptr;
    }
    int *tickets = cuda_state(be)->d_tickets;
    if (E <= 8)
        aux_kernel<8><<<blocks, AUX_THREADS, 0, st>>>(lb_logits, logits, counts, d_f, T, E, alpha, beta, d_lb,
                                                      dlogits, partial, tickets, d_out);
    else if (E <= 32)
        aux_kernel<32><<<blocks, AUX_THREADS, 0, st>>>(lb_logits, logits, counts, d_f, T, E, alpha, beta, d_lb,
                                                       dlogits, partial, tickets, d_out);
    else
        aux_kernel<0><<<blocks, AUX_THREADS, 0, st>>>(lb_logits, logits, counts, d_f, T, E, alpha, beta, d_lb,
                                                      dlogits, partial, tickets, d_out);
    KERNEL_CHECK(be, "aux_kernel");
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

/* The CPU checks the guard zone first, then the finite zone, then visits
 * assignments in order and stops at the first failure; here every failure
 * gets a key and the smallest key wins (atomicMin on integers: the same
 * result whatever the order). A guard byte i that differs has key i (block
 * 0 scans the zone); a non-finite float i of the finite zone has key
 * guard.n + i; assignment a has key guard.n + finite.n + a*3 + (0 expert,
 * 1 weight, 2 slot). */
constexpr unsigned long long CHECK_NONE = ~0ull;

/* The guard zone of a check_routing launch (n = 0: none). */
struct check_guard {
    const uint8_t *p;
    unsigned n;
    uint8_t value;
    int32_t code;
};

__device__ __forceinline__ void scan_guard(const check_guard &g, unsigned long long *smallest) {
    if (blockIdx.x != 0) return;
    for (unsigned i = threadIdx.x; i < g.n; i += blockDim.x)
        if (g.p[i] != g.value) {
            atomicMin(smallest, (unsigned long long)i);
            break; /* this thread's later bytes come after i */
        }
}

/* The finite zone of a check_routing launch (n = 0: none); vec4: v is
 * 16-byte aligned, so the grid reads it as float4. */
struct check_finite_zone {
    const float *v;
    unsigned n;
    int32_t code;
    bool vec4;
};

/* The zone's work items, one a thread: its float4s when read as float4,
 * else its floats. */
__host__ __device__ __forceinline__ size_t finite_items(const check_finite_zone &f) {
    return f.vec4 ? (f.n + 3) / 4 : f.n;
}

__device__ __forceinline__ void scan_finite(const check_finite_zone &f, unsigned long long base,
                                            unsigned long long *smallest) {
    if (f.vec4) {
        const float4 *v4 = reinterpret_cast<const float4 *>(f.v);
        const size_t full = f.n / 4;
        GRID_STRIDE_LOOP(q, finite_items(f)) {
            float x[4];
            if (q < full) {
                const float4 v = v4[q];
                x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
            } else { /* the tail: n % 4 floats */
                for (int j = 0; j < 4; ++j) x[j] = 4 * q + j < f.n ? f.v[4 * q + j] : 0.0f;
            }
            int j = 0;
            while (j < 4 && isfinite(x[j])) ++j;
            if (j < 4) {
                atomicMin(smallest, base + 4 * q + j);
                break; /* this thread's later floats come after */
            }
        }
        return;
    }
    GRID_STRIDE_LOOP(i, f.n)
    if (!isfinite(f.v[i])) {
        atomicMin(smallest, base + i);
        break;
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

/* The record of failure key `key` (not CHECK_NONE). */
__device__ void record_failure(const check_guard &g, const check_finite_zone &f, const int32_t *expert,
                               const float *weight, const int32_t *slot, int K, int E, int C, unsigned long long key,
                               int32_t *record) {
    if (key < g.n) {
        write_record(record, g.code, (int32_t)key, 0, g.p[key], 0);
        return;
    }
    key -= g.n;
    if (key < f.n) {
        write_record(record, f.code, (int32_t)key, 0, __float_as_int(f.v[key]), (int32_t)f.n);
        return;
    }
    key -= f.n;
    const unsigned long long a = key / 3;
    const int what = (int)(key % 3);
    const int t = (int)(a / K), k = (int)(a % K);
    if (what == 0) write_record(record, MOE_CHECK_EXPERT, t, k, expert[a], E);
    else if (what == 1) write_record(record, MOE_CHECK_WEIGHT, t, k, __float_as_int(weight[a]), 0);
    else write_record(record, MOE_CHECK_SLOT, t, k, slot[a], C);
}

/* Without slot, in one launch: each block's smallest key (shared atomicMin)
 * goes to keys[0], and the last block to finish records the smallest and
 * puts keys[0] back to CHECK_NONE, as it found it (cuda_impl.d_check_keys). */
__global__ void check_routing_kernel(check_guard guard, check_finite_zone finite, const int32_t *expert,
                                     const float *weight, size_t nA, int K, int E, unsigned long long *keys,
                                     int *ticket, int32_t *record) {
    __shared__ unsigned long long smallest;
    if (threadIdx.x == 0) smallest = CHECK_NONE;
    __syncthreads();
    scan_guard(guard, &smallest);
    scan_finite(finite, guard.n, &smallest);
    const unsigned long long base = (unsigned long long)guard.n + finite.n;
    GRID_STRIDE_LOOP(a, nA) {
        const int e = expert[a];
        if (e < -1 || e >= E) {
            atomicMin(&smallest, base + 3ull * a);
        } else if (e >= 0) {
            const float w = weight[a];
            if (!(isfinite(w) && w >= 0.0f)) atomicMin(&smallest, base + 3ull * a + 1);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0 && smallest != CHECK_NONE) atomicMin(&keys[0], smallest);
    if (!last_block_arrived(ticket, gridDim.x)) return;
    if (threadIdx.x != 0) return;
    const unsigned long long first = atomicExch(&keys[0], CHECK_NONE);
    if (first != CHECK_NONE && record[0] == 0)
        record_failure(guard, finite, expert, weight, nullptr, K, E, 0, first, record);
}

/* With slots, in one launch as well, with the kept mask and the counts.
 * Duplicates: every valid assignment a puts holder_key(epoch, a) into its
 * (expert, slot)'s word of the holder table with atomicMax. The epoch (high
 * half) grows from call to call, so the table's words from earlier calls
 * are smaller than any of this call, and among this call's the largest key
 * is the smallest index: after the launch each word holds its slot's
 * earliest holder, and nothing had to be cleared before. An atomicMax that
 * finds this call's epoch already there is a duplicate (either holder may be
 * the later one). Counts and largest slot + 1 per expert are integer sums
 * and maxima (per block in shared memory, then into d_slot_sums), so they do
 * not depend on timing either. The last block to arrive writes the counts,
 * puts the sums, flag and key back to 0 / CHECK_NONE, and records in the
 * CPU's order: the smallest failure key; else, if a duplicate was seen, the
 * smallest assignment that is not its slot's earliest holder (the first
 * one the CPU's in-order scan meets whose slot is taken); else, with
 * dense_slots, the lowest expert whose largest slot + 1 differs from its
 * count, with the lowest slot below the count that holds no assignment of
 * this call. Only these failure paths re-read the table. */
constexpr int CHECK_SHARED_E = 2048; /* per-block sums in shared memory up to this many experts */

__device__ __forceinline__ unsigned long long holder_key(unsigned epoch, size_t a) {
    return ((unsigned long long)epoch << 32) | (unsigned long long)(0xFFFFFFFFu - (unsigned)a);
}

__global__ void __launch_bounds__(CUDA_THREADS)
check_routing_slots_kernel(check_guard guard, check_finite_zone finite, const int32_t *__restrict__ expert,
                           const float *__restrict__ weight,
                           const int32_t *__restrict__ slot, size_t nA, int K, int E, int C, int dense_slots,
                           unsigned epoch, int32_t *__restrict__ kept, unsigned long long *holders, int *sums,
                           unsigned long long *keys, int *ticket, int32_t *counts_before, int32_t *counts_after,
                           int32_t *record) {
    extern __shared__ int block_sums[]; /* counts [E], largest slot + 1 [E], when E <= CHECK_SHARED_E */
    __shared__ unsigned long long smallest, gap;
    __shared__ int dup, stop;
    const bool in_shared = E <= CHECK_SHARED_E;
    int *g_count = sums + 1, *g_max = sums + 1 + E;
    int *b_count = in_shared ? block_sums : g_count, *b_max = in_shared ? block_sums + E : g_max;
    if (threadIdx.x == 0) {
        smallest = CHECK_NONE;
        dup = 0;
    }
    if (in_shared)
        for (int i = threadIdx.x; i < 2 * E; i += blockDim.x) block_sums[i] = 0;
    __syncthreads();
    scan_guard(guard, &smallest);
    scan_finite(finite, guard.n, &smallest);
    const unsigned long long base = (unsigned long long)guard.n + finite.n;
    GRID_STRIDE_LOOP(a, nA) {
        const int e = expert[a], s = slot[a];
        unsigned long long key = CHECK_NONE;
        if (e < -1 || e >= E) {
            key = base + 3ull * a;
        } else if (e >= 0) {
            const float w = weight[a];
            if (!(isfinite(w) && w >= 0.0f)) key = base + 3ull * a + 1;
            else if (s < 0 || s >= C) key = base + 3ull * a + 2;
        }
        if (key != CHECK_NONE) atomicMin(&smallest, key);
        const bool valid = e >= 0 && e < E && s >= 0 && s < C;
        kept[a] = valid ? e : -1;
        if (!valid) continue;
        const unsigned long long before = atomicMax(&holders[(size_t)e * C + s], holder_key(epoch, a));
        if ((unsigned)(before >> 32) == epoch) atomicOr(&dup, 1);
        atomicAdd(&b_count[e], 1);
        atomicMax(&b_max[e], s + 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        if (smallest != CHECK_NONE) atomicMin(&keys[0], smallest);
        if (dup) atomicOr(&sums[0], 1);
    }
    if (in_shared)
        for (int e = threadIdx.x; e < E; e += blockDim.x)
            if (block_sums[e]) {
                atomicAdd(&g_count[e], block_sums[e]);
                atomicMax(&g_max[e], block_sums[E + e]);
            }
    if (!last_block_arrived(ticket, gridDim.x)) return;

    /* The last block: counts out, state back to its between-kernels values. */
    if (threadIdx.x == 0) {
        smallest = atomicExch(&keys[0], CHECK_NONE);
        dup = atomicExch(&sums[0], 0);
        gap = CHECK_NONE;
        stop = record[0] != 0; /* the first error of the layer stays */
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const int n = atomicExch(&g_count[e], 0), top = atomicExch(&g_max[e], 0);
        if (counts_before) counts_before[e] = n;
        if (counts_after) counts_after[e] = n;
        if (dense_slots && top != n) atomicMin(&gap, ((unsigned long long)e << 32) | (unsigned)n);
    }
    __syncthreads();
    if (stop) return;
    if (smallest != CHECK_NONE) {
        if (threadIdx.x == 0) record_failure(guard, finite, expert, weight, slot, K, E, C, smallest, record);
        return;
    }
    if (dup) {
        __shared__ unsigned long long first_dup;
        if (threadIdx.x == 0) first_dup = CHECK_NONE;
        __syncthreads();
        for (size_t a = threadIdx.x; a < nA; a += blockDim.x) {
            const int e = expert[a], s = slot[a];
            if (e < 0 || e >= E || s < 0 || s >= C) continue;
            if (__ldcg(&holders[(size_t)e * C + s]) != holder_key(epoch, a)) {
                atomicMin(&first_dup, (unsigned long long)a);
                break; /* this thread's later assignments come after a */
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            const unsigned long long a = first_dup;
            write_record(record, MOE_CHECK_SLOT_TWICE, (int)(a / K), (int)(a % K), slot[a], expert[a]);
        }
        return;
    }
    if (gap != CHECK_NONE) {
        __shared__ int first_empty;
        const int e = (int)(gap >> 32), n = (int)(unsigned)gap;
        if (threadIdx.x == 0) first_empty = n;
        __syncthreads();
        for (int s = threadIdx.x; s < n; s += blockDim.x)
            if ((unsigned)(__ldcg(&holders[(size_t)e * C + s]) >> 32) != epoch) {
                atomicMin(&first_empty, s);
                break;
            }
        __syncthreads();
        if (threadIdx.x == 0) {
            record[1] = 0;
            record[2] = 0;
            record[3] = first_empty;
            record[4] = e;
            record[5] = n;
            record[0] = MOE_CHECK_SLOT_GAP;
        }
    }
}

/* The holder table for `holders` (expert, slot) words and the sums for E
 * experts, made or grown (zeroed, after the work that may still use the old
 * ones), and the epoch of this call; false (error recorded) on failure. */
static bool slot_check_state(moe_backend *be, size_t holders, int E, unsigned *epoch) {
    cuda_impl *st = cuda_state(be);
    const bool grow_holders = holders > st->slot_holders_n, grow_sums = E > st->slot_sums_E || !st->d_slot_sums;
    if ((grow_holders && st->d_slot_holders) || (grow_sums && st->d_slot_sums))
        CUDA_CHECK_RET(be, cudaStreamSynchronize(st->stream), false); /* earlier checks may still read them */
    if (grow_holders) {
        if (st->d_slot_holders) cudaFree(st->d_slot_holders);
        st->d_slot_holders = NULL;
        st->slot_holders_n = 0;
        CUDA_CHECK_RET(be, cudaMalloc(&st->d_slot_holders, holders * sizeof(unsigned long long)), false);
        CUDA_CHECK_RET(be, cudaMemsetAsync(st->d_slot_holders, 0, holders * sizeof(unsigned long long), st->stream),
                       false);
        st->slot_holders_n = holders;
    }
    if (grow_sums) {
        if (st->d_slot_sums) cudaFree(st->d_slot_sums);
        st->d_slot_sums = NULL;
        st->slot_sums_E = 0;
        const size_t bytes = (1 + 2 * (size_t)E) * sizeof(int);
        CUDA_CHECK_RET(be, cudaMalloc(&st->d_slot_sums, bytes), false);
        CUDA_CHECK_RET(be, cudaMemsetAsync(st->d_slot_sums, 0, bytes, st->stream), false);
        st->slot_sums_E = E;
    }
    if (++st->slot_epoch == 0) { /* wrapped: the old stamps would look newer than the next ones */
        CUDA_CHECK_RET(be,
                       cudaMemsetAsync(st->d_slot_holders, 0, st->slot_holders_n * sizeof(unsigned long long),
                                       st->stream),
                       false);
        st->slot_epoch = 1;
    }
    *epoch = st->slot_epoch;
    return true;
}

void cuda_check_routing(moe_backend *be, const moe_guard_zone *guard, const moe_finite_zone *finite,
                        const int32_t *expert, const float *weight, const int32_t *slot, int T, int K, int E, int C,
                        int dense_slots, int32_t *kept, int32_t *counts_before, int32_t *counts_after,
                        int32_t *record) {
    const size_t nA = (size_t)(T > 0 ? T : 0) * (size_t)(K > 0 ? K : 0);
    cudaStream_t st = cuda_stream(be);
    cuda_impl *state = cuda_state(be);
    check_guard g = {nullptr, 0, 0, 0};
    if (guard && guard->n > 0) g = {(const uint8_t *)guard->p, (unsigned)guard->n, guard->value, guard->code};
    check_finite_zone f = {nullptr, 0, 0, false};
    if (finite && finite->n > 0)
        f = {finite->v, (unsigned)finite->n, finite->code, (uintptr_t)finite->v % 16 == 0};
    /* a thread per assignment, or per float4 of the finite zone if there are more */
    const unsigned blocks = cuda_blocks(nA > finite_items(f) ? nA : finite_items(f));
    if (nA == 0) { /* nothing to route: the zones alone (the kernel without slots), and counts of 0 */
        if (g.n > 0 || f.n > 0) {
            check_routing_kernel<<<blocks, CUDA_THREADS, 0, st>>>(g, f, expert, weight, 0, K, E, state->d_check_keys,
                                                                 state->d_tickets, record);
            KERNEL_CHECK(be, "check_routing_kernel");
        }
        if (slot && E > 0 && counts_before)
            CUDA_CHECK(be, cudaMemsetAsync(counts_before, 0, (size_t)E * sizeof(int32_t), st));
        if (slot && E > 0 && counts_after)
            CUDA_CHECK(be, cudaMemsetAsync(counts_after, 0, (size_t)E * sizeof(int32_t), st));
        return;
    }
    if (!slot) {
        check_routing_kernel<<<blocks, CUDA_THREADS, 0, st>>>(g, f, expert, weight, nA, K, E, state->d_check_keys,
                                                             state->d_tickets, record);
        KERNEL_CHECK(be, "check_routing_kernel");
        return;
    }
    const int En = E > 0 ? E : 0;
    const size_t table = (En > 0 && C > 0 ? (size_t)En * C : 1);
    unsigned epoch = 0;
    if (!slot_check_state(be, table, En, &epoch)) return;
    const size_t shmem = En <= CHECK_SHARED_E ? 2 * (size_t)En * sizeof(int) : 0;
    check_routing_slots_kernel<<<blocks, CUDA_THREADS, shmem, st>>>(
        g, f, expert, weight, slot, nA, K, En, C, dense_slots, epoch, kept, state->d_slot_holders, state->d_slot_sums,
        state->d_check_keys, state->d_tickets, counts_before, counts_after, record);
    KERNEL_CHECK(be, "check_routing_slots_kernel");
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

