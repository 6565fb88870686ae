/*
 * Token/position embeddings and dropout on the GPU.
 *
 * embed_bwd adds each token's gradient into its vocabulary row. A row may
 * receive many tokens (every space of a char corpus lands in one row), so
 * instead of float atomics (whose order, and so whose result, changes from
 * run to run) the tokens are stably sorted by id and each run of equal ids is
 * summed in token order by one block: the same order as the CPU, hence the
 * same bits.
 */
#include <cub/device/device_radix_sort.cuh>

#include "backend/cuda/cuda_common.cuh"
#include "moe/philox.h"

/* ------------------------------------------------------------------ */
/* Embeddings                                                          */
/* ------------------------------------------------------------------ */

/* out[bs, i] = wte[ids[bs], i] (+ wpe[bs % S, i]). The vocabulary size is not
 * passed, so only negative ids can be caught (the row is zeroed and the
 * error flagged). */
__global__ void embed_fwd_kernel(const int32_t *ids, const float *wte, const float *wpe, float *out,
                                 size_t n, int S, int d, int *flags) {
    GRID_STRIDE_LOOP(idx, n) {
        const size_t bs = idx / d;
        const int i = (int)(idx % d);
        const int32_t id = ids[bs];
        if (id < 0) {
            out[idx] = 0.0f;
            cuda_flag(flags, CUDA_FLAG_TOKEN_ID);
            continue;
        }
        float v = wte[(size_t)id * d + i];
        if (wpe) v = v + wpe[(bs % S) * d + i];
        out[idx] = v;
    }
}

void cuda_embed_fwd(moe_backend *be, const int32_t *ids, const float *wte, const float *wpe,
                    float *out, int B, int S, int d) {
    if (B <= 0 || S <= 0 || d <= 0) return;
    const size_t n = (size_t)B * S * d;
    embed_fwd_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cuda_stream(be)>>>(
        ids, wte, wpe, out, n, S, d, cuda_state(be)->d_flags);
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

/* One block per sorted position; the block at the start of a run of equal
 * ids adds the run's gradient rows, in token order, into the id's row. */
/* The token gradient sums rows of dout over the tokens of each id. With a
 * small vocabulary a run of equal ids is thousands of tokens long, so one
 * block per run would add them one by one: instead the sorted tokens are cut
 * into chunks of EMBED_CHUNK, each chunk sums its part of every run it
 * touches (in sorted order, into partial[] at the part's last index), and
 * one block per run then adds its parts in chunk order. Fixed order, no
 * atomics: the result repeats bit for bit. */
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

void cuda_embed_bwd(moe_backend *be, const int32_t *ids, const float *dout, float *dwte,
                    float *dwpe, int B, int S, int d, int V) {
    if (B <= 0 || S <= 0 || d <= 0) return;
    const int n = B * S;
    cudaStream_t st = cuda_stream(be);
    int *flags = cuda_state(be)->d_flags;

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
