/*
 * Token/position embeddings and dropout on the GPU.
 *
 * embed_bwd adds each token's gradient into its vocabulary row. A row may
 * receive many tokens (every space of a char corpus lands in one row), so
 * the sums are made in an order fixed by the sizes alone, without float
 * atomics (whose order, and so whose result, changes from run to run): a
 * run repeats bit for bit. Two paths, chosen by the sizes:
 *
 *   small vocabulary (a character corpus): no sort. Each block takes a few
 *   positions s (one warp each) and 32 columns; a warp adds the gradients
 *   of its tokens (b = 0, 1, ... at its s) into per-id accumulators in
 *   shared memory, the block adds its warps in order into its partial
 *   (a row per id, zero for an id it lacks), and a second kernel adds the
 *   blocks' partials in block order into dwte. The warp also sums its position's column over b, so dwpe
 *   needs no pass of its own.
 *
 *   large vocabulary (BPE): the tokens are stably sorted by id and each run
 *   of equal ids is summed in token order, in chunks, then chunk by chunk.
 *
 * dwpe is the CPU's sum in the CPU's order (the same bits). dwte's sums
 * group the tokens differently from the CPU's single pass in token order
 * (the small path takes them by position, then by batch row), so they agree
 * with it to rounding, not bit for bit.
 */
#include <cub/device/device_radix_sort.cuh>

#include "backend/cuda/cuda_common.cuh"
#include "moe/philox.h"

/* ------------------------------------------------------------------ */
/* Embeddings                                                          */
/* ------------------------------------------------------------------ */

/* out[bs, i] = wte[ids[bs], i] (+ wpe[bs % S, i]), VEC consecutive i per
 * thread (VEC = 4: 16-byte loads and stores, d % 4 == 0 and the three
 * arrays 16-byte aligned: 12.9 -> 6.5 us at the expC shape on the H100). The
 * vocabulary size is not passed, so only negative ids can be caught (the
 * row is zeroed and the error flagged). */
template <int VEC>
__global__ void embed_fwd_kernel(const int32_t *__restrict__ ids, const float *__restrict__ wte,
                                 const float *__restrict__ wpe, float *__restrict__ out, size_t nvec, int S, int d,
                                 int *flags) {
    const int dv = d / VEC;
    GRID_STRIDE_LOOP(idx, nvec) {
        const size_t bs = idx / dv;
        const int i = (int)(idx - bs * dv) * VEC;
        const int32_t id = ids[bs];
        float v[VEC];
        if (id < 0) {
#pragma unroll
            for (int q = 0; q < VEC; ++q) v[q] = 0.0f;
            cuda_flag(flags, CUDA_FLAG_TOKEN_ID);
        } else {
            const float *w = wte + (size_t)id * d + i;
            if constexpr (VEC == 4) {
                const float4 t = __ldg(reinterpret_cast<const float4 *>(w));
                v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
            } else {
                v[0] = __ldg(w);
            }
            if (wpe) {
                const float *pp = wpe + (bs % S) * d + i;
                if constexpr (VEC == 4) {
                    const float4 t = __ldg(reinterpret_cast<const float4 *>(pp));
                    v[0] = v[0] + t.x, v[1] = v[1] + t.y, v[2] = v[2] + t.z, v[3] = v[3] + t.w;
                } else {
                    v[0] = v[0] + __ldg(pp);
                }
            }
        }
        float *o = out + bs * d + i;
        if constexpr (VEC == 4) *reinterpret_cast<float4 *>(o) = make_float4(v[0], v[1], v[2], v[3]);
        else o[0] = v[0];
    }
}

void cuda_embed_fwd(moe_backend *be, const int32_t *ids, const float *wte, const float *wpe,
                    float *out, int B, int S, int d) {
    if (B <= 0 || S <= 0 || d <= 0) return;
    const size_t n = (size_t)B * S * d;
    cudaStream_t st = cuda_stream(be);
    int *flags = cuda_state(be)->d_flags;
    const bool vec = d % 4 == 0 && (((uintptr_t)wte | (uintptr_t)out | (uintptr_t)(wpe ? wpe : wte)) & 15) == 0;
    if (vec)
        embed_fwd_kernel<4><<<cuda_blocks(n / 4), CUDA_THREADS, 0, st>>>(ids, wte, wpe, out, n / 4, S, d, flags);
    else
        embed_fwd_kernel<1><<<cuda_blocks(n), CUDA_THREADS, 0, st>>>(ids, wte, wpe, out, n, S, d, flags);
    KERNEL_CHECK(be, "embed_fwd_kernel");
}

/* dwpe[s, i] += dout[b, s, i] over b in order: one thread per (s, i). */
__global__ void embed_bwd_pos_kernel(const float *dout, float *dwpe, int B, int S, int d) {
    GRID_STRIDE_LOOP(idx, (size_t)S * d) {
        float acc = dwpe[idx];
        for (int b = 0; b < B; ++b) acc += dout[(size_t)b * S * d + idx];
        dwpe[idx] = acc;
    }
}

__global__ void iota_kernel(int32_t *v, int n) {
    GRID_STRIDE_LOOP(i, n) v[i] = (int32_t)i;
}

/* The large-vocabulary path. The token gradient sums rows of dout over the
 * tokens of each id. A run of equal ids may be thousands of tokens long (a
 * frequent id), so one block per run would add them one by one: instead
 * the sorted tokens are cut into chunks of EMBED_CHUNK, each chunk sums its
 * part of every run it touches (in sorted order, into partial[] at the
 * part's last index), and one block per run then adds its parts in chunk
 * order. Fixed order, no atomics: the result repeats bit for bit. */
constexpr int EMBED_CHUNK = 32;

__global__ void embed_bwd_chunk_kernel(const int32_t *sorted_ids, const int32_t *sorted_pos,
                                       const float *dout, float *partial, int n, int d) {
    const int r0 = blockIdx.x * EMBED_CHUNK, r1 = min(n, r0 + EMBED_CHUNK);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.0f;
        for (int r = r0; r < r1; ++r) {
            acc += dout[(size_t)sorted_pos[r] * d + i];
            if (r + 1 == r1 || sorted_ids[r + 1] != sorted_ids[r]) {
                partial[(size_t)r * d + i] = acc;
                acc = 0.0f;
            }
        }
    }
}

__global__ void embed_bwd_tok_kernel(const int32_t *sorted_ids, const float *partial, float *dwte, int n,
                                     int d, int *flags) {
    const int first = blockIdx.x;
    const int32_t id = sorted_ids[first];
    if (first > 0 && sorted_ids[first - 1] == id) return; /* not the start of a run */
    if (id < 0) {
        if (threadIdx.x == 0) cuda_flag(flags, CUDA_FLAG_TOKEN_ID);
        return;
    }
    /* the run's end: the first index past it, by binary search (a run may
     * be thousands of tokens long) */
    int lo = first + 1, hi = n;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (sorted_ids[mid] == id) lo = mid + 1;
        else hi = mid;
    }
    const int end = lo;
    float *row = dwte + (size_t)id * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.0f;
        /* the run's part in each chunk ends at the chunk's end or the run's */
        for (int c = first / EMBED_CHUNK; c * EMBED_CHUNK < end; ++c) {
            const int last = min(end, (c + 1) * EMBED_CHUNK) - 1;
            acc += partial[(size_t)last * d + i];
        }
        row[i] += acc;
    }
}

/* The small-vocabulary path. A block has EMBED_POS warps at most, warp w
 * taking position s = blockIdx.x * warps + w and the 32 columns of tile
 * blockIdx.y (one per lane). Its shared memory holds, per warp, a [V][32]
 * accumulator, and per id the bit set of warps that saw it; a warp clears
 * and adds into only the rows of the ids it sees, so its work follows its
 * token count, not V. */
constexpr int EMBED_TILE = 32;
constexpr int EMBED_POS = 8;
/* Shared memory a block may take: two blocks of 8 warps fit on an H100's
 * multiprocessor up to V = 110 (beyond, fewer warps per block). */
constexpr size_t EMBED_SMEM_BUDGET = 110 * 1024;

static size_t embed_small_smem(int warps, int V) {
    return (size_t)warps * V * EMBED_TILE * sizeof(float) + (size_t)V * sizeof(unsigned);
}

/* g[k] = dout[token (b0 + k, s), col] for the k < nb tokens of a group. */
__device__ __forceinline__ void embed_load_group(float (&g)[32], const float *dout, int b0, int nb, int s, int S,
                                                 int d, int col, bool col_ok) {
#pragma unroll
    for (int k = 0; k < 32; ++k)
        g[k] = col_ok && k < nb ? dout[((size_t)(b0 + k) * S + s) * d + col] : 0.0f;
}

/* partial[chunk, v, col]: the chunk's sum for id v (0 where no token of the
 * chunk has it), its warps added in warp (position) order; each warp adds
 * its tokens b = 0, 1, ... in order. dwpe[s, col] += the tokens' column in
 * the same order, the CPU's. */
__global__ void embed_bwd_small_kernel(const int32_t *ids, const float *dout, float *dwpe, float *partial, int B,
                                       int S, int d, int V, int *flags) {
    extern __shared__ float embed_smem[];
    const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float *acc = embed_smem + (size_t)warp * V * EMBED_TILE;                      /* this warp's [V][32] */
    unsigned *seen_by = (unsigned *)(embed_smem + (size_t)warps * V * EMBED_TILE); /* [V]: warp bits */
    const int chunk = blockIdx.x, s = chunk * warps + warp;
    const int col = blockIdx.y * EMBED_TILE + lane;
    const bool col_ok = col < d;
    const unsigned all = 0xffffffffu;

    for (int v = threadIdx.x; v < V; v += blockDim.x) seen_by[v] = 0;
    __syncthreads();
    if (s < S) {
        /* the first group's gradients and dwpe's row are on their way while
         * the rows are cleared: one memory latency instead of three */
        float g[32];
        embed_load_group(g, dout, 0, min(32, B), s, S, d, col, col_ok);
        float pos = dwpe && col_ok ? dwpe[(size_t)s * d + col] : 0.0f;
        /* Clear the rows of the ids this warp will add into (a row seen
         * twice is cleared twice, before any add). */
        for (int b0 = 0; b0 < B; b0 += 32) {
            const int nb = min(32, B - b0);
            const int my = lane < nb ? ids[(size_t)(b0 + lane) * S + s] : 0;
            if (lane < nb) {
                if (my >= 0 && my < V) atomicOr(&seen_by[my], 1u << warp);
                else cuda_flag(flags, CUDA_FLAG_TOKEN_ID);
            }
            for (int j = 0; j < nb; ++j) {
                const int id = __shfl_sync(all, my, j);
                if (id >= 0 && id < V) acc[id * EMBED_TILE + lane] = 0.0f;
            }
        }
        __syncwarp();
        for (int b0 = 0;;) {
            const int nb = min(32, B - b0);
            const int my = lane < nb ? ids[(size_t)(b0 + lane) * S + s] : -1;
#pragma unroll
            for (int k = 0; k < 32; ++k) {
                const int id = __shfl_sync(all, my, k);
                if (k >= nb) break;
                pos += g[k];
                if (id >= 0 && id < V) acc[id * EMBED_TILE + lane] += g[k];
            }
            b0 += 32;
            if (b0 >= B) break;
            embed_load_group(g, dout, b0, min(32, B - b0), s, S, d, col, col_ok);
        }
        if (dwpe && col_ok) dwpe[(size_t)s * d + col] = pos;
    }
    __syncthreads();
    for (int v = warp; v < V; v += warps) {
        const unsigned m = seen_by[v];
        float sum = 0.0f;
        if (m) {
            sum = embed_smem[((size_t)(__ffs(m) - 1) * V + v) * EMBED_TILE + lane];
            for (unsigned rest = m & (m - 1); rest; rest &= rest - 1)
                sum += embed_smem[((size_t)(__ffs(rest) - 1) * V + v) * EMBED_TILE + lane];
        }
        if (col_ok) partial[((size_t)chunk * V + v) * d + col] = sum;
    }
}

/* dwte[v, i] += the chunks' partials for v, in chunk order. Every chunk has
 * a partial (0 for an id it lacks), so the loads wait on nothing: a group
 * of 32 chunks is loaded at once, then added in order (the rest eight at a
 * time). A row no token has gets + 0 (a -0 would turn into +0; its value
 * does not change). */
constexpr int EMBED_FINISH_THREADS = 128; /* V * d is small: spread it over more multiprocessors */

__global__ void embed_bwd_small_finish_kernel(const float *__restrict__ partial, float *dwte, int nchunks, int V,
                                              int d) {
    const size_t vd = (size_t)V * d;
    GRID_STRIDE_LOOP(idx, vd) {
        float r = dwte[idx];
        int c = 0;
        for (; c + 32 <= nchunks; c += 32) {
            float p[32];
#pragma unroll
            for (int k = 0; k < 32; ++k) p[k] = __ldg(&partial[(size_t)(c + k) * vd + idx]);
#pragma unroll
            for (int k = 0; k < 32; ++k) r += p[k];
        }
#pragma unroll 8
        for (; c < nchunks; ++c) r += __ldg(&partial[(size_t)c * vd + idx]);
        dwte[idx] = r;
    }
}

/* Warps per block of the small path for this vocabulary (positions per
 * chunk), 0 where it should not run: its shared memory must fit, and the
 * partials (V rows per chunk, written once and read once) must stay within
 * a few times the gradient dout (the sort path costs far more than its own
 * read of dout). The path's parallelism is over positions (S / warps blocks
 * per column tile): fine for the training shapes, slow but correct for a
 * very short S with a long batch. */
static int embed_small_warps(int B, int S, int V, size_t smem_max) {
    for (int w = EMBED_POS; w >= 1; w /= 2) {
        if (embed_small_smem(w, V) > smem_max) continue;
        const long long nchunks = (S + w - 1) / w;
        return nchunks * V <= 4LL * B * S + 4096 ? w : 0;
    }
    return 0;
}

static void embed_bwd_small(moe_backend *be, const int32_t *ids, const float *dout, float *dwte, float *dwpe,
                            int B, int S, int d, int V, int warps) {
    cudaStream_t st = cuda_stream(be);
    const int nchunks = (S + warps - 1) / warps;
    const unsigned ntiles = (unsigned)((d + EMBED_TILE - 1) / EMBED_TILE);
    float *partial = (float *)cuda_scratch(be, (size_t)nchunks * V * d * sizeof(float));
    if (!partial) return;
    const size_t smem = embed_small_smem(warps, V);
    if (smem > 48 * 1024) {
        CUDA_CHECK(be, cudaFuncSetAttribute(embed_bwd_small_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)smem));
        /* all of the unified memory as shared: two blocks per multiprocessor
         * (the kernel reads dout once, L1 has nothing to keep) */
        CUDA_CHECK(be, cudaFuncSetAttribute(embed_bwd_small_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                            cudaSharedmemCarveoutMaxShared));
    }
    embed_bwd_small_kernel<<<dim3((unsigned)nchunks, ntiles), warps * 32, smem, st>>>(
        ids, dout, dwpe, partial, B, S, d, V, cuda_state(be)->d_flags);
    KERNEL_CHECK(be, "embed_bwd_small_kernel");
    embed_bwd_small_finish_kernel<<<cuda_blocks((size_t)V * d, EMBED_FINISH_THREADS), EMBED_FINISH_THREADS, 0, st>>>(
        partial, dwte, nchunks, V, d);
    KERNEL_CHECK(be, "embed_bwd_small_finish_kernel");
}

void cuda_embed_bwd(moe_backend *be, const int32_t *ids, const float *dout, float *dwte,
                    float *dwpe, int B, int S, int d, int V) {
    if (B <= 0 || S <= 0 || d <= 0) return;
    const int n = B * S;
    cudaStream_t st = cuda_stream(be);
    int *flags = cuda_state(be)->d_flags;

    int dev = 0, smem_optin = 0;
    CUDA_CHECK(be, cudaGetDevice(&dev));
    CUDA_CHECK(be, cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    const size_t smem_max = (size_t)smem_optin < EMBED_SMEM_BUDGET ? (size_t)smem_optin : EMBED_SMEM_BUDGET;
    const int warps = V > 0 ? embed_small_warps(B, S, V, smem_max) : 0;
    if (warps > 0) {
        embed_bwd_small(be, ids, dout, dwte, dwpe, B, S, d, V, warps);
        return;
    }

    if (dwpe) {
        embed_bwd_pos_kernel<<<cuda_blocks((size_t)S * d), CUDA_THREADS, 0, st>>>(dout, dwpe, B, S, d);
        KERNEL_CHECK(be, "embed_bwd_pos_kernel");
    }

    /* Stable sort of (id, position) by id: equal ids keep token order. Ids
     * are in [0, V), so only their low bits need sorting (one pass of the
     * radix sort for a character vocabulary instead of four). */
    int key_bits = 1;
    while (key_bits < 31 && (1LL << key_bits) < (long long)V) ++key_bits;
    size_t sort_bytes = 0;
    CUDA_CHECK(be, cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, (const int32_t *)nullptr,
                                                   (int32_t *)nullptr, (const int32_t *)nullptr,
                                                   (int32_t *)nullptr, n, 0, key_bits, st));
    ScratchLayout lay;
    const size_t pos_off = lay.add((size_t)n * sizeof(int32_t));
    const size_t sids_off = lay.add((size_t)n * sizeof(int32_t));
    const size_t spos_off = lay.add((size_t)n * sizeof(int32_t));
    const size_t tmp_off = lay.add(sort_bytes);
    const size_t part_off = lay.add((size_t)n * d * sizeof(float));
    char *base = cuda_scratch(be, lay.total);
    if (!base) return;
    int32_t *pos = (int32_t *)(base + pos_off);
    int32_t *sorted_ids = (int32_t *)(base + sids_off);
    int32_t *sorted_pos = (int32_t *)(base + spos_off);

    iota_kernel<<<cuda_blocks((size_t)n), CUDA_THREADS, 0, st>>>(pos, n);
    KERNEL_CHECK(be, "iota_kernel");
    CUDA_CHECK(be, cub::DeviceRadixSort::SortPairs(base + tmp_off, sort_bytes, ids, sorted_ids, pos,
                                                   sorted_pos, n, 0, key_bits, st));
    KERNEL_CHECK(be, "cub::DeviceRadixSort::SortPairs (embed_bwd)");
    float *partial = (float *)(base + part_off);
    const unsigned nchunks = (unsigned)((n + EMBED_CHUNK - 1) / EMBED_CHUNK);
    embed_bwd_chunk_kernel<<<nchunks, CUDA_THREADS, 0, st>>>(sorted_ids, sorted_pos, dout, partial, n, d);
    KERNEL_CHECK(be, "embed_bwd_chunk_kernel");
    embed_bwd_tok_kernel<<<(unsigned)n, CUDA_THREADS, 0, st>>>(sorted_ids, partial, dwte, n, d, flags);
    KERNEL_CHECK(be, "embed_bwd_tok_kernel");
}

/* ------------------------------------------------------------------ */
/* Dropout                                                             */
/* ------------------------------------------------------------------ */

/* out[i] = in[i] * mask[i] * scale, mask[i] = (uniform(key, i) > p). One
 * Philox call gives the words of 4 consecutive elements (philox.h), so a
 * thread takes one block of 4: the mask is the CPU's, element for element.
 * Forward and backward are the same map; in == out is allowed. */
__global__ void dropout_kernel(const float *in, float *out, size_t n, float p, float scale,
                               moe_rng_key key) {
    GRID_STRIDE_LOOP(blk, (n + 3) / 4) {
        moe_u32x4 words = moe_rng_block(key, blk);
        for (int lane = 0; lane < 4; ++lane) {
            size_t i = 4 * blk + lane;
            if (i < n) out[i] = moe_u32_to_unit(words.v[lane]) > p ? in[i] * scale : 0.0f;
        }
    }
}

static void dropout_apply(moe_backend *be, const float *in, float *out, size_t n, float p,
                          moe_rng_key key, const char *what) {
    if (!n) return;
    if (p <= 0.0f) { /* p = 0 copies */
        if (in != out)
            CUDA_CHECK(be, cudaMemcpyAsync(out, in, n * sizeof(float), cudaMemcpyDeviceToDevice,
                                           cuda_stream(be)));
        return;
    }
    const float scale = 1.0f / (1.0f - p); /* on the host, as on the CPU */
    dropout_kernel<<<cuda_blocks((n + 3) / 4), CUDA_THREADS, 0, cuda_stream(be)>>>(in, out, n, p, scale,
                                                                                    key);
    KERNEL_CHECK(be, what);
}

void cuda_dropout_fwd(moe_backend *be, const float *x, float *y, size_t n, float p,
                      moe_rng_key key) {
    dropout_apply(be, x, y, n, p, key, "dropout_kernel (fwd)");
}

void cuda_dropout_bwd(moe_backend *be, const float *dy, float *dx, size_t n, float p,
                      moe_rng_key key) {
    dropout_apply(be, dy, dx, n, p, key, "dropout_kernel (bwd)");
}
