/*
 * Shared by the CUDA backend's files: the backend's private state, error
 * checking, scratch memory, launch helpers, fixed-order reductions, and the
 * declarations of the ops (one file per theme):
 *
 *   cuda_backend.cu        creation, memory ops, errors, scratch
 *   cuda_linalg.cu         gemm (cuBLAS, fp32 or bf16), bias, axpy, scale, mul, sumsq
 *   cuda_norm_act.cu       layernorm, rmsnorm, activations
 *   cuda_attention.cu      rope, causal attention
 *   cuda_embed_dropout.cu  embeddings, dropout
 *   cuda_loss_optim.cu     cross-entropy, AdamW
 *   cuda_moe_ops.cu        capacity, combine weights, dispatch, combine, aux losses
 *   cuda_timing.cu         events, measured GEMM rate (benchmarks)
 *
 * Every op runs on the backend's one stream (be->stream), so ops are ordered
 * among themselves without synchronisation; only the ops that hand results
 * to the host wait for it: to_host, sumsq, aux_losses (host lb, z),
 * capacity_assign when given host count arrays, from_host beyond its pinned
 * staging (1 MiB), and scratch growth (and the growth of check_routing's
 * own tables). The model's path (capacity with
 * device counts, aux_losses_counts, check_routing, check_bytes,
 * xent_sums, clip_grad_norm) never waits.
 *
 * Determinism: no floating-point atomics. Every sum is computed in an order
 * fixed by the launch configuration (which depends only on the sizes), so a
 * run repeats bit for bit on the same GPU.
 */
#ifndef MOE_CUDA_COMMON_CUH
#define MOE_CUDA_COMMON_CUH

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* backend.h is a C header without C++ guards; the table's function types and
 * moe_backend_cuda_create must have C linkage. */
extern "C" {
#include "backend/backend.h"
}
#include "backend/cuda/cuda_backend.h"

/* ------------------------------------------------------------------ */
/* Backend state                                                       */
/* ------------------------------------------------------------------ */

/* Bits of cuda_impl::d_flags, set by kernels that meet an invalid index.
 * The kernel skips the element (writing zeros where it has an output) and
 * the host reports the bit at the next check (moe_cuda_backend_check, sync). */
enum {
    CUDA_FLAG_TOKEN_ID = 1,  /* embedding id < 0 */
    CUDA_FLAG_ROUTING = 2,   /* expert >= E, or slot outside [0, C) */
    CUDA_FLAG_TARGET = 4,    /* cross-entropy target >= V */
};

/* A cuBLASLt matmul set up once per shape (cuda_linalg.cu). */
struct cuda_lt_plan;

/* One saved activation declared by keep_activations and its bf16 copy. */
struct cuda_activation_copy {
    moe_activation_view view;
    __nv_bfloat16 *copy;
    bool written; /* by its producer or its first GEMM, since the declaration */
};

struct cuda_impl {
    cudaStream_t stream;
    cublasHandle_t cublas;
    moe_precision precision;
    /* cuBLASLt for the GEMMs with a bias epilogue: its handle, a workspace
     * of its own, and the plans made so far (searched by shape). */
    cublasLtHandle_t lt;
    void *lt_workspace;
    size_t lt_workspace_bytes;
    cuda_lt_plan *lt_plans;
    int lt_nplans, lt_cap;
    /* One scratch allocation shared by all ops (bf16 GEMM operands, sort
     * buffers, reduction partials), grown on demand. An op takes it once,
     * lays out everything it needs inside, and never holds a pointer into
     * it across a call that may grow it. Reuse across ops is safe because
     * all ops run in order on one stream. */
    void *scratch;
    size_t scratch_bytes;
    int *d_flags;           /* device int: CUDA_FLAG_* bits */
    double *d_aux_out;      /* 2 device doubles: aux_losses' results on their way to the host */
    int *d_tickets;         /* CUDA_TICKETS device ints, 0 between kernels: last_block_arrived */
    unsigned long long *d_check_keys; /* check_routing's smallest failure, all ones between kernels */
    /* check_routing with slots (cuda_moe_ops.cu): per (expert, slot) the
     * earliest assignment holding it, stamped with the call's epoch, so
     * that nothing is cleared between calls (the table is zeroed when it is
     * made, and again when the epoch wraps); and per expert the kept count
     * and largest slot + 1 after a duplicate flag, 0 between kernels. */
    unsigned long long *d_slot_holders;
    size_t slot_holders_n;
    unsigned slot_epoch;
    int *d_slot_sums;       /* [0] a duplicate was seen, [1, 1+E) counts, [1+E, 1+2E) largest slot + 1 */
    int slot_sums_E;
    /* round_weights' copies (cuda_weight_copies.cu): the views, host side,
     * and per view the offset of its bf16 copy in wcopy (its transpose
     * follows it); the kernel's table on the device. */
    const float *wv_params;
    moe_weight_view *wv;
    long long *wv_copy;
    int wv_n, wv_cap;
    __nv_bfloat16 *wcopy;
    size_t wcopy_elems;
    void *d_wv_table;
    size_t d_wv_table_bytes;
    /* keep_activations' copies (cuda_activation_copies.cu): the declared
     * views, host side, each with its bf16 copy in acopy_mem and whether
     * the copy has been written since the declaration. */
    cuda_activation_copy *acopy;
    int acopy_n, acopy_cap;
    __nv_bfloat16 *acopy_mem;
    size_t acopy_mem_elems;
    /* from_host's pinned staging: two halves used in turn; a half is
     * refilled only after the event recorded behind its last copy. */
    char *upload_stage[2];
    size_t upload_used[2];
    cudaEvent_t upload_done[2];
    int upload_half;
    int sync_each_launch;   /* MOE_CUDA_SYNC_CHECK=1: wait after every kernel so an
                               asynchronous fault is blamed on the kernel that made it */
    int errors_printed;
    char err[512];          /* first error, "" while there is none */
};

static inline cuda_impl *cuda_state(moe_backend *be) { return (cuda_impl *)be->impl; }
static inline cudaStream_t cuda_stream(moe_backend *be) { return cuda_state(be)->stream; }

/* ------------------------------------------------------------------ */
/* Errors                                                              */
/* ------------------------------------------------------------------ */

/* Records (first one kept) and prints an error: where, what was called, why. */
void cuda_record_error(moe_backend *be, const char *file, int line, const char *what,
                       const char *why);

/* Check a CUDA runtime call; on failure record it and leave the op
 * (`return`, or `return val` in ops that return a value). */
#define CUDA_OK_OR(be, call, on_fail)                                                    \
    do {                                                                                 \
        cudaError_t st_ = (call);                                                        \
        if (st_ != cudaSuccess) {                                                        \
            cuda_record_error((be), __FILE__, __LINE__, #call, cudaGetErrorString(st_)); \
            on_fail;                                                                     \
        }                                                                                \
    } while (0)
#define CUDA_CHECK(be, call) CUDA_OK_OR(be, call, return)
#define CUDA_CHECK_RET(be, call, val) CUDA_OK_OR(be, call, return (val))

#define CUBLAS_CHECK(be, call)                                                            \
    do {                                                                                  \
        cublasStatus_t st_ = (call);                                                      \
        if (st_ != CUBLAS_STATUS_SUCCESS) {                                               \
            cuda_record_error((be), __FILE__, __LINE__, #call, cublasGetStatusString(st_)); \
            return;                                                                       \
        }                                                                                 \
    } while (0)

/* After every kernel launch: a bad launch configuration shows here; with
 * MOE_CUDA_SYNC_CHECK=1 a fault inside the kernel shows here too. Returns 0
 * when the op may go on. */
int cuda_after_launch(moe_backend *be, const char *file, int line, const char *kernel);
#define KERNEL_CHECK(be, kernel_name)                                       \
    do {                                                                    \
        if (!cuda_after_launch((be), __FILE__, __LINE__, (kernel_name))) return; \
    } while (0)
#define KERNEL_CHECK_RET(be, kernel_name, val)                                   \
    do {                                                                         \
        if (!cuda_after_launch((be), __FILE__, __LINE__, (kernel_name))) return (val); \
    } while (0)

/* ------------------------------------------------------------------ */
/* Scratch memory                                                      */
/* ------------------------------------------------------------------ */

/* Lays several arrays out in one scratch allocation, each on a 256-byte
 * boundary (cuBLAS and CUB like aligned operands). */
struct ScratchLayout {
    size_t total = 0;
    size_t add(size_t bytes) {
        size_t off = total;
        total += (bytes + 255) / 256 * 256;
        return off;
    }
};

/* The scratch buffer, at least `bytes` long (0 included: never NULL but on
 * failure); NULL (error recorded) on failure. */
char *cuda_scratch(moe_backend *be, size_t bytes);

/* Whether p is device (or managed) memory, so usable by kernels; host
 * memory, registered or not, gives false. */
bool cuda_is_device_ptr(const void *p);

/* ------------------------------------------------------------------ */
/* Launch helpers                                                      */
/* ------------------------------------------------------------------ */

constexpr int CUDA_THREADS = 256;

/* Blocks for a grid-stride loop over n items: enough to fill the GPU, capped
 * so the count fits any grid (the loop covers the rest). */
static inline unsigned cuda_blocks(size_t n, int threads = CUDA_THREADS) {
    size_t b = (n + (size_t)threads - 1) / (size_t)threads;
    const size_t cap = 65536;
    return (unsigned)(b < 1 ? 1 : (b > cap ? cap : b));
}

#define GRID_STRIDE_LOOP(i, n)                                                  \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); \
         i += (size_t)gridDim.x * blockDim.x)

__device__ __forceinline__ void cuda_flag(int *flags, int bit) { atomicOr(flags, bit); }

/* ------------------------------------------------------------------ */
/* Fixed-order reductions                                              */
/* ------------------------------------------------------------------ */

/* Butterfly sum over a warp. Every lane ends with the same value (each step
 * adds the same two numbers on both lanes, and float addition commutes). */
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

template <class T>
__device__ __forceinline__ T warp_max(T v) {
    for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

/* Sum (or max) over the block, returned to every thread. blockDim.x must be
 * a multiple of 32 and every thread must call it. Each thread combines the
 * per-warp values in warp order: the same result on every thread and every
 * run. */
template <class T, bool IsMax>
__device__ T block_reduce(T v) {
    __shared__ T warp_vals[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = IsMax ? warp_max(v) : warp_sum(v);
    __syncthreads(); /* an earlier call's readers are done with warp_vals */
    if (lane == 0) warp_vals[warp] = v;
    __syncthreads();
    T r = warp_vals[0];
    for (int w = 1; w < nwarps; ++w) r = IsMax ? fmax(r, warp_vals[w]) : r + warp_vals[w];
    return r;
}
template <class T> __device__ T block_sum(T v) { return block_reduce<T, false>(v); }
template <class T> __device__ T block_max(T v) { return block_reduce<T, true>(v); }

/* A reduction finished inside the kernel that made its partials, instead
 * of in a second launch: every block writes its partials, then calls this;
 * it returns true in exactly one block, the last of `nblocks` to arrive at
 * *ticket, which then reads every block's partials (with __ldcg: they were
 * written by other SMs) and adds them in a fixed order, so the result does
 * not depend on which block came last. The last block puts the ticket back
 * to 0, so kernels in stream order can share tickets (cuda_impl.d_tickets,
 * CUDA_TICKETS of them; a kernel whose groups finish separately takes one
 * per group). Every thread of the block must call it. */
constexpr int CUDA_TICKETS = 1024;

__device__ __forceinline__ bool last_block_arrived(int *ticket, unsigned nblocks) {
    __shared__ bool last;
    __threadfence(); /* this block's partials are visible before its ticket */
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
        last = atomicAdd(ticket, 1) == (int)nblocks - 1;
        if (last) *ticket = 0;
    }
    __syncthreads();
    if (last) __threadfence(); /* order the partials' loads after the ticket */
    return last;
}

/* Column sums for weight gradients: out[j] += sum_t f(t, j) over T rows and
 * N columns, in a fixed order without atomics. Pass 1: a block of 32 columns
 * x COLSUM_LANES row lanes takes COLSUM_ROWS rows; each thread sums its rows
 * in order, the lanes are added in lane order, giving one partial per (chunk,
 * column). Pass 2: each column adds its partials in chunk order, done by the
 * last block of the column tile to finish (colsum_out), or by a second
 * kernel when there are more tiles than tickets. */
constexpr int COLSUM_LANES = 8;
/* 64 rows per chunk: at a dense layer's shape (8192 rows, 256-768 columns
 * in tiles of 128) 256-row chunks made 64-192 blocks, too few to keep the
 * GPU's memory busy (the fused dY passes ran at a third of its bandwidth);
 * the in-kernel finish then adds more partials, which costs far less. */
constexpr int COLSUM_ROWS = 64;

/* Where finished column sums go: column j = e * N + c adds into
 * out[e * stride + c] (a plain sum: N = the column count, stride 0). out
 * NULL: the partials are left for colsum_finish_if_needed. tickets: one per
 * column tile (cuda_impl.d_tickets). */
struct colsum_out {
    float *out;
    int N;
    long long stride;
    int *tickets;
};

/* The tile's columns [col0, col0 + width) of `cols`, once every chunk's
 * partial is in: each adds its chunks in chunk order (the order of
 * colsum_finish_batched_kernel, so the sums are the same floats) into its
 * output. */
__device__ __forceinline__ void colsum_finish_tile(const float *partial, int cols, int col0, int width,
                                                   const colsum_out &dst) {
    if (!last_block_arrived(&dst.tickets[blockIdx.y], gridDim.x)) return;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
    for (int i = tid; i < width; i += nthreads) {
        const int j = col0 + i;
        if (j >= cols) break;
        float s = 0.0f;
#pragma unroll 8 /* independent loads in flight; the adds stay in chunk order */
        for (unsigned c = 0; c < gridDim.x; ++c) s += __ldcg(&partial[(size_t)c * cols + j]);
        const int e = j / dst.N, col = j - e * dst.N;
        dst.out[(long long)e * dst.stride + col] += s;
    }
}

template <class F>
__global__ void colsum_partial_kernel(F f, int T, int N, float *partial, colsum_out dst) {
    __shared__ float lane_sums[COLSUM_LANES][33]; /* +1 column: no bank conflicts */
    const int chunk = blockIdx.x;
    const int j = blockIdx.y * 32 + threadIdx.x;
    const int t0 = chunk * COLSUM_ROWS;
    const int t1 = min(T, t0 + COLSUM_ROWS);
    float acc = 0.0f;
    if (j < N)
        for (int t = t0 + threadIdx.y; t < t1; t += COLSUM_LANES) acc += f(t, j);
    lane_sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < N) {
        float s = lane_sums[0][threadIdx.x];
        for (int y = 1; y < COLSUM_LANES; ++y) s += lane_sums[y][threadIdx.x];
        partial[(size_t)chunk * N + j] = s;
    }
    if (dst.out) colsum_finish_tile(partial, N, blockIdx.y * 32, 32, dst);
}

/* Four floats rounded to bf16 and packed for one 8-byte store. */
__device__ __forceinline__ uint2 pack_bf16x4(float a, float b, float c, float d) {
    __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
    uint2 packed;
    packed.x = *reinterpret_cast<unsigned *>(&lo);
    packed.y = *reinterpret_cast<unsigned *>(&hi);
    return packed;
}

/* Column sums fused into an elementwise pass (the bf16 paths' dH and dY
 * passes): the grid of colsum_partial_kernel's layout, blocks of (32,
 * COLSUM_LANES) over COLSUM_ROWS rows and 32 columns, or 128 columns with
 * four per thread (vec4). False, with the error recorded, past the grid's
 * limit. */
static inline bool colsum_grid(moe_backend *be, int T, int cols, bool vec4, const char *what, dim3 *grid) {
    const int per_block = vec4 ? 128 : 32;
    const long long ntiles = ((long long)cols + per_block - 1) / per_block;
    if (ntiles > 65535) {
        cuda_record_error(be, __FILE__, __LINE__, what, "too many columns for a column sum (over 65535 blocks)");
        return false;
    }
    *grid = dim3((unsigned)((T + COLSUM_ROWS - 1) / COLSUM_ROWS), (unsigned)ntiles);
    return true;
}

/* Rows a thread of the dY passes (round_colsum_vec4_kernel,
 * ffn_dy_vec4_kernel) loads before it uses the first: two 16-byte loads in
 * flight instead of one. Measured apart from the backend on the H100 at
 * the expC shapes, 2 was about as fast as 1 (within 0.5 us), 4 no better, 8
 * slower (more registers, fewer blocks per SM). Only the loads are
 * batched; each thread still adds its rows in order. */
constexpr int COLSUM_ROWS_IN_FLIGHT = 2;

/* The dY passes' walk over a thread's rows t0 + threadIdx.y, + COLSUM_LANES,
 * ... (< t1) of four columns: row t's floats at in + t * stride (16-byte
 * aligned), rounded to bf16 at out + t * stride, and added to acc in row
 * order, COLSUM_ROWS_IN_FLIGHT rows' loads issued before the first add. */
__device__ __forceinline__ void round_rows4_colsum(const float *__restrict__ in, __nv_bfloat16 *__restrict__ out,
                                                   size_t stride, int t0, int t1, float acc[4]) {
    constexpr int B = COLSUM_ROWS_IN_FLIGHT;
    for (int t = t0 + threadIdx.y; t < t1; t += B * COLSUM_LANES) {
        float4 v[B];
#pragma unroll
        for (int b = 0; b < B; ++b)
            if (t + b * COLSUM_LANES < t1)
                v[b] = *reinterpret_cast<const float4 *>(in + (size_t)(t + b * COLSUM_LANES) * stride);
#pragma unroll
        for (int b = 0; b < B; ++b)
            if (t + b * COLSUM_LANES < t1) {
                acc[0] += v[b].x, acc[1] += v[b].y, acc[2] += v[b].z, acc[3] += v[b].w;
                *reinterpret_cast<uint2 *>(out + (size_t)(t + b * COLSUM_LANES) * stride) =
                    pack_bf16x4(v[b].x, v[b].y, v[b].z, v[b].w);
            }
    }
}

/* colsum_finish_tile for the four-column passes' tiles of 128 columns and
 * blocks of 32 x COLSUM_LANES = 256 threads, the same sums (each column
 * adds its chunks in chunk order) with the loads spread over the block:
 * every round all threads load COLSUM_STAGE_CHUNKS chunks' partials of the
 * tile (16-byte loads, all in flight together) into shared memory, and
 * thread i < 128 adds column i's values from there in order. The finish
 * is the kernel's tail, run by one block per tile after the others are
 * done; one thread per column loading its chunks 8 at a
 * time (colsum_finish_tile) made that tail 6.1 us of round_colsum's 13.8
 * us at 8192 x 256 on the H100 (128 chunks a column; measured apart from
 * the backend, against the pass without a finish). The destination's old
 * value is loaded first, beside the first round. The next round's loads
 * are not issued before this round's adds: that kept 10 more registers
 * live. In a softk step (ncu, H100) with this finish and two rows in flight
 * round_colsum took 13.3 -> 11.2 us at N = 256 and 18.4 -> 17.3 us at
 * N = 768, ffn_dy 14.2 -> 14.0 us; ffn_bwd's dH pass (10 chunks a column)
 * took 48.5 -> 51.9 us with it, two rows in flight and __restrict__
 * pointers together, and keeps colsum4_store. */
constexpr int COLSUM_STAGE_CHUNKS = 32;
static_assert(COLSUM_LANES == 8, "the staged finish is written for blocks of 256 threads");
__device__ __forceinline__ void colsum_finish_tile4(const float *partial, int cols, int col0, const colsum_out &dst) {
    if (!last_block_arrived(&dst.tickets[blockIdx.y], gridDim.x)) return;
    constexpr int per_thread = COLSUM_STAGE_CHUNKS * 32 / 256; /* float4 of a round per thread */
    __shared__ float4 stage[COLSUM_STAGE_CHUNKS * 32];          /* [chunk][128 columns] */
    const int tid = threadIdx.y * 32 + threadIdx.x;
    const int nchunks = (int)gridDim.x;
    const int j = col0 + tid; /* the column thread tid < 128 adds */
    const bool adds = tid < 128 && j < cols;
    float *out = nullptr;
    float old = 0.0f;
    if (adds) {
        const int e = j / dst.N, col = j - e * dst.N;
        out = &dst.out[(long long)e * dst.stride + col];
        old = *out;
    }
    float4 v[per_thread];
    auto load_round = [&](int c0) {
#pragma unroll
        for (int k = 0; k < per_thread; ++k) {
            const int q = tid + 256 * k, c = c0 + q / 32, jc = col0 + 4 * (q % 32);
            v[k] = c < nchunks && jc < cols ? __ldcg(reinterpret_cast<const float4 *>(partial + (size_t)c * cols + jc))
                                            : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    };
    float s = 0.0f;
    for (int c0 = 0; c0 < nchunks; c0 += COLSUM_STAGE_CHUNKS) {
        load_round(c0);
#pragma unroll
        for (int k = 0; k < per_thread; ++k) stage[tid + 256 * k] = v[k];
        __syncthreads();
        if (adds) {
            const float *st = reinterpret_cast<const float *>(stage) + tid;
            const int m = min(COLSUM_STAGE_CHUNKS, nchunks - c0);
            if (m == COLSUM_STAGE_CHUNKS) {
#pragma unroll /* independent shared loads; the adds stay in chunk order */
                for (int c = 0; c < COLSUM_STAGE_CHUNKS; ++c) s += st[c * 128];
            } else {
                for (int c = 0; c < m; ++c) s += st[c * 128];
            }
        }
        __syncthreads(); /* the round is read before the next overwrites it */
    }
    if (adds) *out = old + s;
}

/* The end of a four-columns-per-thread block: thread (x, y) holds the sums
 * of columns 4x..4x+3 over its rows; the lanes are added in lane order, as
 * colsum_partial_kernel adds them, into partial[chunk][column]. */
static_assert(32 * COLSUM_LANES >= 128, "the finishing threads cover a block's 128 columns");
__device__ __forceinline__ void colsum4_partial(float (&lane_sums)[COLSUM_LANES][128], const float acc[4], int cols,
                                                float *partial) {
#pragma unroll
    for (int q = 0; q < 4; ++q) lane_sums[threadIdx.y][threadIdx.x * 4 + q] = acc[q];
    __syncthreads();
    const int tid = threadIdx.y * 32 + threadIdx.x, col = blockIdx.y * 128 + tid;
    if (tid < 128 && col < cols) {
        float s = lane_sums[0][tid];
        for (int y = 1; y < COLSUM_LANES; ++y) s += lane_sums[y][tid];
        partial[(size_t)blockIdx.x * cols + col] = s;
    }
}

/* The block's partial, then, in the last block of the column tile, the
 * tile's finish by one thread per column (colsum_finish_tile). For passes
 * with few chunks a column (ffn_bwd's dH pass: 10 at the expC shape). */
__device__ __forceinline__ void colsum4_store(float (&lane_sums)[COLSUM_LANES][128], const float acc[4], int cols,
                                              float *partial, const colsum_out &dst) {
    colsum4_partial(lane_sums, acc, cols, partial);
    if (dst.out) colsum_finish_tile(partial, cols, blockIdx.y * 128, 128, dst);
}

/* The same with the staged finish (colsum_finish_tile4), for passes with
 * many chunks a column (the dense layers' and the experts' dY passes). */
__device__ __forceinline__ void colsum4_store_staged(float (&lane_sums)[COLSUM_LANES][128], const float acc[4],
                                                     int cols, float *partial, const colsum_out &dst) {
    colsum4_partial(lane_sums, acc, cols, partial);
    if (dst.out) colsum_finish_tile4(partial, cols, blockIdx.y * 128, dst);
}

__global__ void colsum_finish_batched_kernel(const float *partial, int nchunks, int N, int cols, float *out,
                                             long long stride_out);

/* The destination of a column sum over a grid with `ntiles` column tiles:
 * finished in the partial kernel when each tile can have a ticket, else
 * left (out NULL) for colsum_finish_*_kernel, which the caller launches when
 * colsum_needs_finish says so. */
static inline colsum_out colsum_dest(moe_backend *be, float *out, int N, long long stride, unsigned ntiles) {
    colsum_out d;
    d.out = ntiles <= (unsigned)CUDA_TICKETS ? out : nullptr;
    d.N = N;
    d.stride = stride;
    d.tickets = cuda_state(be)->d_tickets;
    return d;
}
static inline bool colsum_needs_finish(const colsum_out &d, const float *out) { return out && !d.out; }

/* The second pass, when the partial kernel could not finish the sums itself
 * (more column tiles than tickets): the chunks' partials of `cols` columns
 * added in chunk order into out, mapped as dst says. */
static inline void colsum_finish_if_needed(moe_backend *be, const colsum_out &dst, float *out, const float *partial,
                                           int nchunks, int cols, const char *what) {
    if (!colsum_needs_finish(dst, out)) return;
    colsum_finish_batched_kernel<<<cuda_blocks((size_t)cols), CUDA_THREADS, 0, cuda_stream(be)>>>(
        partial, nchunks, dst.N, cols, out, dst.stride);
    KERNEL_CHECK(be, what);
}

template <class F>
void colsum_accumulate(moe_backend *be, F f, int T, int N, float *out, const char *what) {
    if (T <= 0 || N <= 0) return;
    const int nchunks = (T + COLSUM_ROWS - 1) / COLSUM_ROWS;
    const int ntiles = (N + 31) / 32;
    if (ntiles > 65535) {
        cuda_record_error(be, __FILE__, __LINE__, what, "too many columns for colsum (N > 2097120)");
        return;
    }
    float *partial = (float *)cuda_scratch(be, (size_t)nchunks * N * sizeof(float));
    if (!partial) return;
    const colsum_out dst = colsum_dest(be, out, N, 0, (unsigned)ntiles);
    colsum_partial_kernel<F><<<dim3(nchunks, ntiles), dim3(32, COLSUM_LANES), 0, cuda_stream(be)>>>(
        f, T, N, partial, dst);
    KERNEL_CHECK(be, what);
    colsum_finish_if_needed(be, dst, out, partial, nchunks, N, what);
}

/* ------------------------------------------------------------------ */
/* The ops (contracts: backend.h)                                      */
/* ------------------------------------------------------------------ */

/* cuda_timing.cu */
void *cuda_event_create(moe_backend *be);
void cuda_event_destroy(moe_backend *be, void *ev);
void cuda_event_record(moe_backend *be, void *ev);
float cuda_event_elapsed_ms(moe_backend *be, void *start, void *end);
double cuda_measure_gemm_tflops(moe_backend *be);

/* cuda_linalg.cu */
void cuda_gemm(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha, const float *A,
               int lda, const float *B, int ldb, float beta, float *C, int ldc);
void cuda_gemm_bias(moe_backend *be, int ta, int tb, int M, int N, int K, const float *A, int lda,
                    long long strideA, const float *B, int ldb, long long strideB, const float *bias,
                    long long stride_bias, const float *residual, float *C, int ldc, long long strideC,
                    int batch);
/* Whether a GEMM of M x N x K takes bf16 operands: bf16 mode, and no side
 * shorter than 16 (those run in fp32; cuda_linalg.cu says why). */
bool cuda_gemm_takes_bf16(moe_backend *be, int M, int N, int K);
/* One fp32 GEMM (row-major, as gemm) with a side of at most 16, the gate's
 * shapes, by kernels of cuda_skinny_gemm.cu; false (nothing done) for a
 * shape they do not take. */
bool cuda_skinny_gemm(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                      const float *B, int ldb, float beta, float *C, int ldc);
/* Rounds `batch` matrices of rows x cols (leading dimension ld, `stride`
 * apart; stride 0: one matrix) to bf16, packed into dst as [batch][rows]
 * [cols], or as [batch][cols][rows] with transpose. */
void cuda_round_bf16(moe_backend *be, const float *src, long long ld, long long stride, int rows, int cols,
                     int batch, __nv_bfloat16 *dst, bool transpose);
/* C = op(A) op(B) (+ bias[e*sbias + n] on every row of product e, when
 * bias != NULL) + beta C for bf16 operands, fp32 accumulation and C: the
 * gemm_bias of bf16 mode for operands already rounded. */
void cuda_gemm_bf16_operands(moe_backend *be, int ta, int tb, int M, int N, int K, const __nv_bfloat16 *A,
                             int lda, long long sA, const __nv_bfloat16 *B, int ldb, long long sB,
                             const float *bias, long long sbias, float beta, float *C, int ldc, long long sC,
                             int batch);
/* C = op(A) op(B) for bf16 operands with fp32 accumulation, C written in
 * bf16 (each element rounded once from its fp32 sum), for a product whose
 * reader is bound by reading it. Does nothing where M, N, K or batch is 0:
 * the caller needs K > 0. */
void cuda_gemm_bf16_out(moe_backend *be, int ta, int tb, int M, int N, int K, const __nv_bfloat16 *A, int lda,
                        long long sA, const __nv_bfloat16 *B, int ldb, long long sB, __nv_bfloat16 *C, int ldc,
                        long long sC, int batch);
/* The experts' first layer with GELU in the GEMM's epilogue: for `batch`
 * packed products of A [M, K] (bf16) and B [K, N] (bf16), D = bf16(gelu(A B
 * + bias)) and aux = bf16(A B + bias), both [M, N] per product, bias [N]
 * per product in bf16 (NULL: none). cuda_gelu_aux_available says whether
 * cuBLASLt takes the shape and these pointers' alignment;
 * cuda_gemm_bf16_gelu_aux returns false, doing nothing, where it does not.
 * The GELU is the tanh form, the one the CPU uses. */
bool cuda_gelu_aux_available(moe_backend *be, int M, int N, int K, const void *A, const void *B, const void *bias,
                             const void *D, const void *aux, int batch);
bool cuda_gemm_bf16_gelu_aux(moe_backend *be, int M, int N, int K, const __nv_bfloat16 *A, const __nv_bfloat16 *B,
                             const __nv_bfloat16 *bias, __nv_bfloat16 *D, __nv_bfloat16 *aux, int batch);
/* Pass 2 of a batched column sum (cuda_linalg.cu): column j of `cols`
 * adds its chunk partials, in chunk order, to out[(j / N) * stride_out +
 * j % N]. */
__global__ void colsum_finish_batched_kernel(const float *partial, int nchunks, int N, int cols, float *out,
                                             long long stride_out);
void cuda_ffn_fwd(moe_backend *be, moe_act_kind kind, const float *X, const float *w1, const float *b1,
                  const float *w2, const float *b2, float *H, float *A, float *Y, int batch, int C, int d,
                  int n);
void cuda_ffn_bwd(moe_backend *be, moe_act_kind kind, const float *X, const float *w1, const float *w2,
                  const float *H, const float *A, const float *dY, float *dA, float *dH, float *dX, float *dw1,
                  float *db1, float *dw2, float *db2, int batch, int C, int d, int n, int accumulate_dw);
void cuda_linear_bwd(moe_backend *be, const float *X, const float *W, const float *dY, float *dX, float *dW,
                     float *db, int T, int K, int N);
/* Releases the cuBLASLt plans (backend destruction). */
void cuda_lt_release(cuda_impl *st);
void cuda_gemm_strided_batched(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha,
                               const float *A, int lda, long long strideA, const float *B, int ldb,
                               long long strideB, float beta, float *C, int ldc, long long strideC,
                               int batch);
void cuda_add_bias(moe_backend *be, float *y, const float *b, int T, int N);
void cuda_bias_grad(moe_backend *be, const float *dy, float *db, int T, int N);
void cuda_add_bias_batched(moe_backend *be, float *y, const float *b, int batch, int T, int N,
                           long long stride_y, long long stride_b);
void cuda_bias_grad_batched(moe_backend *be, const float *dy, float *db, int batch, int T, int N,
                            long long stride_dy, long long stride_db);
void cuda_axpy(moe_backend *be, float a, const float *x, float *y, size_t n);
void cuda_scale(moe_backend *be, float *x, float a, size_t n);
void cuda_mul(moe_backend *be, const float *a, const float *b, float *out, size_t n);
double cuda_sumsq(moe_backend *be, const float *x, size_t n);
void cuda_clip_grad_norm(moe_backend *be, float *g, size_t n, double clip, double *norm_out);

/* cuda_norm_act.cu */
void cuda_layernorm_fwd(moe_backend *be, const float *x, const float *g, const float *b, float *y,
                        float *mean, float *rstd, int T, int d, float eps);
void cuda_layernorm_bwd(moe_backend *be, const float *x, const float *g, const float *mean,
                        const float *rstd, const float *dy, float *dx, float *dg, float *db, int T,
                        int d);
void cuda_rmsnorm_fwd(moe_backend *be, const float *x, const float *g, float *y, float *rstd, int T,
                      int d, float eps);
void cuda_rmsnorm_bwd(moe_backend *be, const float *x, const float *g, const float *rstd,
                      const float *dy, float *dx, float *dg, int T, int d);
void cuda_act_fwd(moe_backend *be, moe_act_kind kind, const float *in, float *out, int T, int n);
void cuda_act_bwd(moe_backend *be, moe_act_kind kind, const float *in, const float *dout,
                  float *din, int T, int n);

/* cuda_attention.cu */
void cuda_rope_fwd(moe_backend *be, float *qkv, int B, int S, int H, int hd, float theta);
void cuda_rope_bwd(moe_backend *be, float *dqkv, int B, int S, int H, int hd, float theta);
void cuda_attention_fwd(moe_backend *be, const float *qkv, float *out, float *probs, int B, int S,
                        int H, int hd);
void cuda_attention_bwd(moe_backend *be, const float *qkv, const float *probs, const float *dout,
                        float *dqkv, int B, int S, int H, int hd);

/* cuda_embed_dropout.cu */
void cuda_embed_fwd(moe_backend *be, const int32_t *ids, const float *wte, const float *wpe,
                    float *out, int B, int S, int d);
void cuda_embed_bwd(moe_backend *be, const int32_t *ids, const float *dout, float *dwte,
                    float *dwpe, int B, int S, int d, int V);
void cuda_dropout_fwd(moe_backend *be, const float *x, float *y, size_t n, float p,
                      moe_rng_key key);
void cuda_dropout_bwd(moe_backend *be, const float *dy, float *dx, size_t n, float p,
                      moe_rng_key key);

/* cuda_loss_optim.cu */
void cuda_xent_fwd_bwd(moe_backend *be, const float *logits, const int32_t *targets, int T, int V,
                       float *losses, int32_t *correct, float *dlogits, float grad_scale);
void cuda_xent_sums(moe_backend *be, const float *losses, const int32_t *correct, int T, double *out);
void cuda_adamw(moe_backend *be, float *p, const float *g, float *m, float *v,
                const uint8_t *decay, size_t n, float lr, float b1, float b2, float eps, float wd,
                long long t, const double *grad_norm, double clip);

/* cuda_moe_ops.cu */
void cuda_capacity_assign(moe_backend *be, const int32_t *expert, const float *weight, int T, int K,
                          int E, int C, int policy, int32_t *kept, int32_t *slot,
                          int32_t *counts_before, int32_t *counts_after);
void cuda_combine_weights(moe_backend *be, const float *weight, const int32_t *kept, int T, int K,
                          int renorm, float *cw);
void cuda_combine_weights_bwd(moe_backend *be, const float *weight, const int32_t *kept, int T,
                              int K, int renorm, const float *dcw, float *dweight);
void cuda_dispatch(moe_backend *be, const float *x, const int32_t *kept, const int32_t *slot, int T,
                   int K, int C, int E, int d, const int32_t *fill_counts, float *Xe);
void cuda_dispatch_bwd(moe_backend *be, const float *dXe, const int32_t *kept, const int32_t *slot,
                       int T, int K, int C, int d, int accumulate, float *dx);
void cuda_combine(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                  const float *cw, int T, int K, int C, int d, const float *residual, float *y);
void cuda_combine_bwd(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                      const float *cw, const float *dy, int T, int K, int C, int E, int d,
                      const int32_t *fill_counts, float *dYe, float *dcw);
void cuda_aux_losses(moe_backend *be, const float *lb_logits, const float *logits, const float *f,
                     int T, int E, float alpha, float beta, float *d_lb, float *dlogits, double *lb,
                     double *z);
void cuda_aux_losses_counts(moe_backend *be, const float *lb_logits, const float *logits,
                            const int32_t *counts, int T, int E, float alpha, float beta, float *d_lb,
                            float *dlogits, double *out);
void cuda_check_routing(moe_backend *be, const moe_guard_zone *guard, const moe_finite_zone *finite,
                        const int32_t *expert, const float *weight, const int32_t *slot, int T, int K, int E, int C,
                        int dense_slots, int32_t *kept, int32_t *counts_before, int32_t *counts_after,
                        int32_t *record);
void cuda_check_bytes(moe_backend *be, const void *p, size_t n, uint8_t value, int32_t code, int32_t *record);
/* cuda_weight_copies.cu */
void cuda_round_weights(moe_backend *be, const float *params, const moe_weight_view *views, int n);
/* round_weights' bf16 copy of the weight src read as rows x cols matrices
 * (leading dimension ld, `stride` apart, `batch` of them), transposed or
 * not, or NULL when src is not a listed weight of that shape. */
const __nv_bfloat16 *cuda_weight_copy(moe_backend *be, const float *src, long long ld, long long stride, int rows,
                                      int cols, int batch, bool transpose);
/* What a bf16 GEMM reads for the fp32 operand src: round_weights' copy when
 * there is one, else keep_activations' copy (made now if no op wrote it
 * yet), else src rounded into dst (cuda_round_bf16). */
const __nv_bfloat16 *cuda_bf16_operand(moe_backend *be, const float *src, long long ld, long long stride, int rows,
                                       int cols, int batch, __nv_bfloat16 *dst, bool transpose);
void cuda_weight_copies_release(cuda_impl *st);
/* cuda_activation_copies.cu */
void cuda_keep_activations(moe_backend *be, const moe_activation_view *views, int n);
/* The declared activation src read as `batch` packed rows x cols matrices
 * `stride` apart (ld = cols), or NULL when src is not one declared whole. */
cuda_activation_copy *cuda_activation_copy_of(moe_backend *be, const float *src, long long ld, long long stride,
                                              int rows, int cols, int batch);
/* For a producer about to write the declared activation dst [rows, cols]:
 * where it writes the bf16 copy in the same pass (the copy then counts as
 * written), or NULL when dst is not declared. A producer that cannot write
 * the copy does not ask: the first GEMM then makes it. */
__nv_bfloat16 *cuda_activation_copy_target(moe_backend *be, const float *dst, long long rows, long long cols);
void cuda_activation_copies_release(cuda_impl *st);

#endif
