/*
 * fp32 GEMMs with one side of at most SKINNY_MAX (the gate: E logits per
 * token), where cuBLAS's general kernels spend most of their time on tiles
 * that are mostly empty and on a split-K reduction launched apart. Two of
 * the gate's three shapes (row-major, C = alpha op(A) op(B) + beta C):
 *
 *   forward    logits[T,E]  = x[T,d] wg[d,E]        ta=0 tb=0, N small
 *   dW         dwg[d,E]    += x^T[d,T] dlogits[T,E] ta=1 tb=0, N small, K long
 *
 * The third, dx[T,d] += dlogits[T,E] wg^T (K small), stays with cuBLAS: a
 * kernel of one thread per output measured slower (16 against 9 us at the
 * expC shape on the H100).
 *
 * Each output is one fp32 sum in a fixed order (lanes in lane order, K
 * chunks in chunk order), so a second run gives the same bits. Other shapes
 * return false and take cuBLAS.
 */
#include "backend/cuda/cuda_common.cuh"

constexpr int SKINNY_MAX = 16;

/* beta == 0 overwrites C without reading it (C may hold NaN), as BLAS does. */
__device__ __forceinline__ float skinny_out(float alpha, float acc, float beta, float c) {
    return beta == 0.0f ? alpha * acc : alpha * acc + beta * c;
}

/* ---- N small: one warp per row of A ---------------------------------- */

/* B in shared memory as sB[n * K + k] (consecutive lanes read consecutive
 * k: no bank conflicts); warp w of the block takes rows r = blockIdx.x *
 * warps + w, then every gridDim.x * warps-th row; the lanes stride over K,
 * and each of the N lane partials is summed across the warp by shuffles. */
template <int N>
__global__ void skinny_rows_kernel(int M, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                                   float beta, float *C, int ldc) {
    extern __shared__ float sB[];
    for (int i = threadIdx.x; i < K * N; i += blockDim.x) sB[i] = B[(size_t)(i % K) * ldb + i / K];
    __syncthreads();
    const int lane = threadIdx.x & 31, warps = blockDim.x / 32;
    for (int r = blockIdx.x * warps + threadIdx.x / 32; r < M; r += gridDim.x * warps) {
        const float *a = A + (size_t)r * lda;
        float acc[N];
#pragma unroll
        for (int n = 0; n < N; ++n) acc[n] = 0.0f;
        for (int k = lane; k < K; k += 32) {
            const float av = a[k];
#pragma unroll
            for (int n = 0; n < N; ++n) acc[n] = fmaf(av, sB[n * K + k], acc[n]);
        }
#pragma unroll
        for (int n = 0; n < N; ++n)
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) acc[n] += __shfl_xor_sync(0xffffffffu, acc[n], off);
        /* every lane holds every sum; lane n writes column n */
#pragma unroll
        for (int n = 0; n < N; ++n)
            if (lane == n) C[(size_t)r * ldc + n] = skinny_out(alpha, acc[n], beta, C[(size_t)r * ldc + n]);
    }
}

/* ---- ta = 1, N small, K long: split K in chunks ---------------------- */

/* Block (chunk of SKINNY_KCHUNK rows of k, tile of 32 columns m of A),
 * 8 warps: lane l takes column m = 32 * tile + l, warp w the chunk's rows
 * w * SKINNY_KCHUNK / 8 .. in order; the warps' sums are added in warp
 * order into partial[chunk][m][:]. The last chunk block of a tile to finish
 * adds the tile's partials in chunk order into C (last_block_arrived, one
 * ticket per tile). */
constexpr int SKINNY_KCHUNK = 256;
constexpr int SKINNY_TN_WARPS = 8;

template <int N>
__global__ void __launch_bounds__(32 * SKINNY_TN_WARPS)
skinny_tn_kernel(int M, int K, float alpha, const float *A, int lda, const float *B, int ldb, float beta, float *C,
                 int ldc, float *partial, int *tickets) {
    __shared__ float sB[SKINNY_KCHUNK * N];
    __shared__ float warp_acc[SKINNY_TN_WARPS][32][N + 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int k0 = blockIdx.x * SKINNY_KCHUNK, kn = min(SKINNY_KCHUNK, K - k0);
    for (int i = threadIdx.x; i < kn * N; i += blockDim.x) sB[i] = B[(size_t)(k0 + i / N) * ldb + i % N];
    __syncthreads();
    const int m = blockIdx.y * 32 + lane;
    float acc[N];
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n] = 0.0f;
    constexpr int per_warp = SKINNY_KCHUNK / SKINNY_TN_WARPS;
    const int kb = warp * per_warp, ke = min(kn, kb + per_warp);
    if (m < M)
#pragma unroll 4
        for (int k = kb; k < ke; ++k) {
            const float av = A[(size_t)(k0 + k) * lda + m];
#pragma unroll
            for (int n = 0; n < N; ++n) acc[n] = fmaf(av, sB[k * N + n], acc[n]);
        }
#pragma unroll
    for (int n = 0; n < N; ++n) warp_acc[warp][lane][n] = acc[n];
    __syncthreads();
    /* element i < 32 N of the tile: column 32 * tile + i / N, output n = i % N */
    const size_t tile_elems = (size_t)32 * N, chunk_stride = (size_t)gridDim.y * tile_elems;
    float *mine = partial + (size_t)blockIdx.x * chunk_stride + (size_t)blockIdx.y * tile_elems;
    for (int i = threadIdx.x; i < 32 * N; i += blockDim.x) {
        float s = 0.0f;
        for (int w = 0; w < SKINNY_TN_WARPS; ++w) s += warp_acc[w][i / N][i % N];
        mine[i] = s;
    }
    if (!last_block_arrived(&tickets[blockIdx.y], gridDim.x)) return;
    for (int i = threadIdx.x; i < 32 * N; i += blockDim.x) {
        const int mo = blockIdx.y * 32 + i / N, n = i % N;
        if (mo >= M) continue;
        const float *col = partial + (size_t)blockIdx.y * tile_elems + i;
        float s = 0.0f;
#pragma unroll 8 /* independent loads in flight; the adds stay in chunk order */
        for (unsigned c = 0; c < gridDim.x; ++c) s += __ldcg(col + c * chunk_stride);
        C[(size_t)mo * ldc + n] = skinny_out(alpha, s, beta, C[(size_t)mo * ldc + n]);
    }
}

/* ---- dispatch --------------------------------------------------------- */

struct skinny_args {
    moe_backend *be;
    int M, N, K;
    float alpha, beta;
    const float *A, *B;
    float *C;
    int lda, ldb, ldc;
};

constexpr size_t SKINNY_SHARED_MAX = 48 * 1024; /* the default, without opting in */

template <int N> struct run_rows {
    static bool run(const skinny_args &a) {
        const size_t smem = (size_t)a.K * N * sizeof(float);
        if (smem > SKINNY_SHARED_MAX) return false;
        const int threads = 256, warps = threads / 32;
        /* a few blocks per SM, each loading B once, striding over the rows */
        const long long want = ((long long)a.M + warps - 1) / warps;
        const unsigned blocks = (unsigned)(want < 512 ? want : 512);
        skinny_rows_kernel<N><<<blocks, threads, smem, cuda_stream(a.be)>>>(a.M, a.K, a.alpha, a.A, a.lda, a.B,
                                                                            a.ldb, a.beta, a.C, a.ldc);
        KERNEL_CHECK_RET(a.be, "skinny_rows_kernel", true);
        return true;
    }
};

template <int N> struct run_tn {
    static bool run(const skinny_args &a) {
        const int nchunks = (a.K + SKINNY_KCHUNK - 1) / SKINNY_KCHUNK, tiles = (a.M + 31) / 32;
        if (tiles > CUDA_TICKETS) return false;
        float *partial = (float *)cuda_scratch(a.be, (size_t)nchunks * tiles * 32 * N * sizeof(float));
        if (!partial) return true; /* cuda_scratch recorded the error */
        const dim3 grid((unsigned)nchunks, (unsigned)tiles);
        skinny_tn_kernel<N><<<grid, 32 * SKINNY_TN_WARPS, 0, cuda_stream(a.be)>>>(
            a.M, a.K, a.alpha, a.A, a.lda, a.B, a.ldb, a.beta, a.C, a.ldc, partial, cuda_state(a.be)->d_tickets);
        KERNEL_CHECK_RET(a.be, "skinny_tn_kernel", true);
        return true;
    }
};

/* F<v>::run(a) for the compile-time width equal to v in 1..SKINNY_MAX. */
template <template <int> class F> static bool by_width(int v, const skinny_args &a) {
    switch (v) {
    case 1: return F<1>::run(a);
    case 2: return F<2>::run(a);
    case 3: return F<3>::run(a);
    case 4: return F<4>::run(a);
    case 5: return F<5>::run(a);
    case 6: return F<6>::run(a);
    case 7: return F<7>::run(a);
    case 8: return F<8>::run(a);
    case 9: return F<9>::run(a);
    case 10: return F<10>::run(a);
    case 11: return F<11>::run(a);
    case 12: return F<12>::run(a);
    case 13: return F<13>::run(a);
    case 14: return F<14>::run(a);
    case 15: return F<15>::run(a);
    case 16: return F<16>::run(a);
    default: return false;
    }
}
static_assert(SKINNY_MAX == 16, "by_width lists every width up to SKINNY_MAX");

bool cuda_skinny_gemm(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                      const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0 || K <= 0) return false;
    const skinny_args a{be, M, N, K, alpha, beta, A, B, C, lda, ldb, ldc};
    if (!ta && !tb && N <= SKINNY_MAX) return by_width<run_rows>(N, a);
    if (ta && !tb && N <= SKINNY_MAX && K >= SKINNY_KCHUNK) return by_width<run_tn>(N, a);
    return false;
}
