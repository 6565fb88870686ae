/*
 * fp32 GEMMs with one side of at most SKINNY_MAX (the gate: E logits per
 * token), where cuBLAS's general kernels spend most of their time on tiles
 * that are mostly empty and on a split-K reduction launched apart. The
 * gate's three shapes (row-major, C = alpha op(A) op(B) + beta C):
 *
 *   forward    logits[T,E]  = x[T,d] wg[d,E]        ta=0 tb=0, N small
 *   dW         dwg[d,E]    += x^T[d,T] dlogits[T,E] ta=1 tb=0, N small, K long
 *   dx         dx[T,d]     += dlogits[T,E] wg^T     ta=0 tb=1, K small
 *
 * The first two are bound by reading A (x: 8 MB at the expC shape), so both are laid
 * out to keep many wide loads of A in flight: each thread issues all its
 * loads of A for a pass before using any of them, and the first pass's
 * loads are issued before B is staged in shared memory, so the two
 * latencies overlap. A is read 16 bytes at a time where its rows allow it
 * (VEC = 4: A 16-byte aligned, lda and the vectorised extent multiples of
 * 4), else one float at a time (VEC = 1, the same code).
 *
 * The third is bound by reading and writing C (dx): a thread takes VEC
 * columns of NT_PASSES rows, and its loads of C and the block's staging of
 * A and B^T in shared memory are all in flight before it computes: 8.8 us
 * at the expC shape on the H100, where cuBLAS's fp32 kernel took 9.4 and a
 * first version of this one, reading A row by row after staging B, 10.0.
 *
 * Each output is one fp32 sum in an order fixed by the shape (a thread's
 * terms in k order, then lanes and warps combined in a fixed pattern, then
 * K chunks in chunk order), so a second run gives the same bits. Other
 * shapes return false and take cuBLAS.
 */
#include <stdint.h>

#include "backend/cuda/cuda_common.cuh"

constexpr int SKINNY_MAX = 16;
constexpr int SKINNY_THREADS = 256;
constexpr int SKINNY_WARPS = SKINNY_THREADS / 32;

/* beta == 0 overwrites C without reading it (C may hold NaN), as BLAS does. */
__device__ __forceinline__ float skinny_out(float alpha, float acc, float beta, float c) {
    return beta == 0.0f ? alpha * acc : alpha * acc + beta * c;
}

/* v[0 .. VEC) = p[0 .. VEC); VEC = 4 needs p 16-byte aligned. */
template <int VEC> __device__ __forceinline__ void load_floats(const float *p, float *v) {
    if constexpr (VEC == 4) {
        const float4 t = __ldg(reinterpret_cast<const float4 *>(p));
        v[0] = t.x;
        v[1] = t.y;
        v[2] = t.z;
        v[3] = t.w;
    } else {
        v[0] = __ldg(p);
    }
}

/* ---- N small: 8 lanes per row of A ----------------------------------- */

/* A warp reads 4 rows side by side (8 lanes each: 128 contiguous bytes of a
 * row per load with VEC = 4) and 2 such sets, so 8 rows; a block of 8 warps
 * takes 64 consecutive rows. Lane l of a row takes the vectors at k = (8 j
 * + l) VEC, j = 0, 1, ..., loaded 8 vectors at a time (one pass) before any
 * is used. B sits in shared memory as sB[n * KP + k] (KP: K rounded up to
 * 32, plus 4, so the staging writes spread over the banks): the 8 lanes of
 * a row read 8 consecutive vectors (no bank conflicts), and the 4 rows of a
 * set read the same ones (broadcasts). Each lane's N sums are added over
 * the row's 8 lanes by a butterfly; lane l then writes the outputs n with
 * n % 8 = l. */
constexpr int ROW_LANES = 8;
constexpr int ROW_GROUPS = 32 / ROW_LANES; /* rows a warp reads side by side */
/* 2 sets per warp: 1 (twice the blocks, half the registers) measured 8.0
 * against 7.5 us at the expC shape on the H100 */
constexpr int ROW_SETS = 2;                /* such sets per warp */
constexpr int ROW_VECS = 8;                /* vectors per lane per row in one pass */

/* v[s][j] = the vector of row s at k = k0 + (8 j + l) VEC, zero past K or
 * for a row past M. */
template <int VEC, int SETS>
__device__ __forceinline__ void rows_load(const float *const (&a)[SETS], const bool (&ok)[SETS], int k0,
                                          int K, int l, float (&v)[SETS][ROW_VECS][VEC]) {
#pragma unroll
    for (int s = 0; s < SETS; ++s)
#pragma unroll
        for (int j = 0; j < ROW_VECS; ++j) {
            const int k = k0 + (j * ROW_LANES + l) * VEC;
            if (ok[s] && k < K) {
                load_floats<VEC>(a[s] + k, v[s][j]);
            } else {
#pragma unroll
                for (int q = 0; q < VEC; ++q) v[s][j][q] = 0.0f;
            }
        }
}

template <int N, int VEC, int SETS>
__global__ void __launch_bounds__(SKINNY_THREADS)
skinny_rows_kernel(int M, int K, int KP, float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                   float *C, int ldc) {
    extern __shared__ float4 rows_smem[]; /* float4: the vectors' alignment */
    float *sB = reinterpret_cast<float *>(rows_smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int l = lane % ROW_LANES, g = lane / ROW_LANES;
    const long long row0 = (long long)blockIdx.x * (SKINNY_WARPS * ROW_GROUPS * SETS) + warp * (ROW_GROUPS * SETS) + g;
    const float *a[SETS];
    bool ok[SETS];
#pragma unroll
    for (int s = 0; s < SETS; ++s) {
        const long long r = row0 + s * ROW_GROUPS;
        ok[s] = r < M;
        a[s] = A + (size_t)(ok[s] ? r : 0) * lda;
    }
    constexpr int PASS = ROW_LANES * VEC * ROW_VECS; /* k covered by one pass */
    float v[SETS][ROW_VECS][VEC];
    rows_load<VEC, SETS>(a, ok, 0, K, l, v); /* in flight while B is staged */
#pragma unroll 8 /* loads in flight */
    for (int i = threadIdx.x; i < K * N; i += SKINNY_THREADS) {
        const int k = i / N, n = i % N;
        sB[n * KP + k] = B[(size_t)k * ldb + n];
    }
    __syncthreads();
    float acc[SETS][N];
#pragma unroll
    for (int s = 0; s < SETS; ++s)
#pragma unroll
        for (int n = 0; n < N; ++n) acc[s][n] = 0.0f;
    for (int k0 = 0;;) {
#pragma unroll
        for (int j = 0; j < ROW_VECS; ++j) {
            const int k = k0 + (j * ROW_LANES + l) * VEC;
            if (k >= K) break;
#pragma unroll
            for (int n = 0; n < N; ++n) {
                float b[VEC];
                if constexpr (VEC == 4) {
                    const float4 t = *reinterpret_cast<const float4 *>(sB + n * KP + k);
                    b[0] = t.x;
                    b[1] = t.y;
                    b[2] = t.z;
                    b[3] = t.w;
                } else {
                    b[0] = sB[n * KP + k];
                }
#pragma unroll
                for (int s = 0; s < SETS; ++s)
#pragma unroll
                    for (int q = 0; q < VEC; ++q) acc[s][n] = fmaf(v[s][j][q], b[q], acc[s][n]);
            }
        }
        k0 += PASS;
        if (k0 >= K) break;
        rows_load<VEC, SETS>(a, ok, k0, K, l, v);
    }
    /* the row's 8 lanes are an aligned group of the warp: xor 4, 2, 1 stays inside it */
#pragma unroll
    for (int s = 0; s < SETS; ++s)
#pragma unroll
        for (int n = 0; n < N; ++n)
#pragma unroll
            for (int off = ROW_LANES / 2; off > 0; off >>= 1)
                acc[s][n] += __shfl_xor_sync(0xffffffffu, acc[s][n], off);
#pragma unroll
    for (int s = 0; s < SETS; ++s) {
        if (!ok[s]) continue;
        float *c = C + (size_t)(row0 + s * ROW_GROUPS) * ldc;
#pragma unroll
        for (int n = 0; n < N; ++n)
            if (n % ROW_LANES == l) c[n] = skinny_out(alpha, acc[s][n], beta, c[n]);
    }
}

/* ---- ta = 1, N small, K long: split K in chunks ---------------------- */

/* Block (chunk of TN_ROWS rows k of A, tile of TN_COLS columns m): the
 * columns are spread over TPR = TN_COLS / VEC threads (each VEC columns,
 * 128 contiguous bytes of a row of A per TPR threads), the rows over the
 * block's 256 / TPR row lanes (lane r takes rows r, r + lanes, ...), all
 * of a thread's loads of A issued before B's rows of the chunk are staged
 * in shared memory (sB[k][n], each row read as float4 broadcasts). Each
 * thread keeps VEC x N sums; the row lanes of a warp are added by a
 * butterfly, the warps in warp order, into partial[chunk][tile][:]. The
 * last chunk block of a tile to finish adds the tile's partials in chunk
 * order into C (last_block_arrived, one ticket per tile). */
constexpr int TN_COLS = 32;
/* chunks of 256 rows: 128 and 512 measured 10.5 against 10.2 us at the
 * expC shape on the H100 (smaller blocks overlap better, but leave more
 * partials to the finish) */
constexpr int TN_ROWS = 256;
constexpr int SKINNY_TN_MIN_K = 256; /* shorter sums go to cuBLAS */

template <int N, int VEC, int KC>
__global__ void __launch_bounds__(SKINNY_THREADS)
skinny_tn_kernel(int M, int K, float alpha, const float *A, int lda, const float *B, int ldb, float beta, float *C,
                 int ldc, float *partial, int *tickets) {
    constexpr int TPR = TN_COLS / VEC;           /* threads along a row of the tile */
    constexpr int LANES = SKINNY_THREADS / TPR;  /* row lanes */
    constexpr int RPL = KC / LANES;         /* rows per lane */
    constexpr int NP = (N + 3) / 4 * 4;          /* a row of sB, in whole float4 */
    constexpr int OUT = TN_COLS * N;             /* outputs of a tile */
    constexpr int STAGE = KC * NP, PARTS = SKINNY_WARPS * OUT;
    /* B's rows while summing, then the warps' sums */
    __shared__ float4 tn_smem[(STAGE > PARTS ? STAGE : PARTS) / 4];
    float *sB = reinterpret_cast<float *>(tn_smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, c = tid % TPR, lrow = tid / TPR;
    const int k0 = blockIdx.x * KC, kn = min(KC, K - k0);
    const int m = blockIdx.y * TN_COLS + c * VEC;
    const bool col_ok = m < M; /* VEC = 4 needs M % 4 == 0: a vector is wholly in or out */
    float v[RPL][VEC];
#pragma unroll
    for (int j = 0; j < RPL; ++j) {
        const int k = lrow + j * LANES;
        if (col_ok && k < kn) {
            load_floats<VEC>(A + (size_t)(k0 + k) * lda + m, v[j]);
        } else {
#pragma unroll
            for (int q = 0; q < VEC; ++q) v[j][q] = 0.0f;
        }
    }
    /* rows past the chunk's end and columns n >= N are zeros, so the sums
     * below need no bounds */
    static_assert(STAGE % SKINNY_THREADS == 0, "the staging loop has no remainder");
#pragma unroll /* every load in flight at once */
    for (int i = tid; i < STAGE; i += SKINNY_THREADS) {
        const int k = i / NP, n = i % NP;
        sB[i] = k < kn && n < N ? B[(size_t)(k0 + k) * ldb + n] : 0.0f;
    }
    __syncthreads();
    float acc[VEC][N];
#pragma unroll
    for (int q = 0; q < VEC; ++q)
#pragma unroll
        for (int n = 0; n < N; ++n) acc[q][n] = 0.0f;
#pragma unroll
    for (int j = 0; j < RPL; ++j) {
        const float4 *b = reinterpret_cast<const float4 *>(sB + (lrow + j * LANES) * NP);
#pragma unroll
        for (int n4 = 0; n4 < NP / 4; ++n4) {
            const float4 t = b[n4];
            const float bn[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int n = 4 * n4 + i;
                if (n >= N) break;
#pragma unroll
                for (int q = 0; q < VEC; ++q) acc[q][n] = fmaf(v[j][q], bn[i], acc[q][n]);
            }
        }
    }
    /* the warp's row lanes (lanes c, c + TPR, ...) */
#pragma unroll
    for (int q = 0; q < VEC; ++q)
#pragma unroll
        for (int n = 0; n < N; ++n)
#pragma unroll
            for (int off = TPR; off < 32; off <<= 1) acc[q][n] += __shfl_xor_sync(0xffffffffu, acc[q][n], off);
    __syncthreads(); /* sB is read by every warp before it holds the sums */
    /* element i = (q N + n) TPR + c of a tile: column c VEC + q, output n
     * (consecutive lanes write consecutive words) */
    float *parts = sB;
    if (lane < TPR)
#pragma unroll
        for (int q = 0; q < VEC; ++q)
#pragma unroll
            for (int n = 0; n < N; ++n) parts[warp * OUT + (q * N + n) * TPR + c] = acc[q][n];
    __syncthreads();
    const size_t chunk_stride = (size_t)gridDim.y * OUT;
    float *mine = partial + (size_t)blockIdx.x * chunk_stride + (size_t)blockIdx.y * OUT;
    for (int i = tid; i < OUT; i += SKINNY_THREADS) {
        float s = parts[i];
        for (int w = 1; w < SKINNY_WARPS; ++w) s += parts[w * OUT + i];
        mine[i] = s;
    }
    if (!last_block_arrived(&tickets[blockIdx.y], gridDim.x)) return;
    for (int i = tid; i < OUT; i += SKINNY_THREADS) {
        const int qn = i / TPR, mo = blockIdx.y * TN_COLS + (i % TPR) * VEC + qn / N, n = qn % N;
        if (mo >= M) continue;
        const float *col = partial + (size_t)blockIdx.y * OUT + i;
        float s = 0.0f;
#pragma unroll 32 /* independent loads in flight; the adds stay in chunk order */
        for (unsigned ch = 0; ch < gridDim.x; ++ch) s += __ldcg(col + ch * chunk_stride);
        C[(size_t)mo * ldc + n] = skinny_out(alpha, s, beta, C[(size_t)mo * ldc + n]);
    }
}

/* ---- K small: C = alpha A B^T + beta C --------------------------------- */

/* A block takes NT_ROWS rows and NT_TPR * VEC columns: thread (x, y) the
 * VEC columns at x * VEC of rows y, y + NT_ROW_LANES, ... . Every global
 * load is issued before the first use: the thread's rows of C (registers),
 * then the block's rows of A and, transposed, B's rows for its columns
 * (shared memory: sB[k][n], so a thread's VEC columns for one k are one
 * 16-byte read with VEC = 4). Each output is one sum over k ascending
 * (fmaf), then skinny_out. */
constexpr int NT_TPR = 64;
constexpr int NT_ROW_LANES = SKINNY_THREADS / NT_TPR;
constexpr int NT_PASSES = 8; /* rows per thread */
constexpr int NT_ROWS = NT_ROW_LANES * NT_PASSES;

template <int KW, int VEC>
__global__ void __launch_bounds__(SKINNY_THREADS)
    skinny_nt_kernel(int M, int N, float alpha, const float *__restrict__ A, int lda, const float *__restrict__ B,
                     int ldb, float beta, float *__restrict__ C, int ldc) {
    constexpr int NTC = NT_TPR * VEC; /* the block's columns */
    __shared__ __align__(16) float sB[KW][NTC];
    __shared__ float sA[NT_ROWS][KW];
    const int n0 = blockIdx.y * NTC, m0 = blockIdx.x * NT_ROWS;
    const int x = threadIdx.x % NT_TPR, y = threadIdx.x / NT_TPR;
    const int n = n0 + x * VEC;
    const bool mine = n < N; /* VEC = 4 needs N % 4 == 0: a thread's columns are all in or all out */
    float c[NT_PASSES][VEC];
#pragma unroll
    for (int p = 0; p < NT_PASSES; ++p) {
        const int r = m0 + y + p * NT_ROW_LANES;
        if (mine && r < M && beta != 0.0f) load_floats<VEC>(C + (size_t)r * ldc + n, c[p]);
    }
    for (int i = threadIdx.x; i < NT_ROWS * KW; i += SKINNY_THREADS) {
        const int rr = i / KW, k = i - rr * KW;
        sA[rr][k] = m0 + rr < M ? __ldg(A + (size_t)(m0 + rr) * lda + k) : 0.0f;
    }
    for (int i = threadIdx.x; i < KW * NTC; i += SKINNY_THREADS) { /* B's rows read contiguously */
        const int nn = i / KW, k = i - nn * KW;
        sB[k][nn] = n0 + nn < N ? __ldg(B + (size_t)(n0 + nn) * ldb + k) : 0.0f;
    }
    __syncthreads();
    if (!mine) return;
#pragma unroll
    for (int p = 0; p < NT_PASSES; ++p) {
        const int rr = y + p * NT_ROW_LANES, r = m0 + rr;
        if (r >= M) break;
        float acc[VEC];
#pragma unroll
        for (int q = 0; q < VEC; ++q) acc[q] = 0.0f;
#pragma unroll
        for (int k = 0; k < KW; ++k) {
            const float a = sA[rr][k];
            float b[VEC];
            if constexpr (VEC == 4) {
                const float4 t = *reinterpret_cast<const float4 *>(&sB[k][x * 4]);
                b[0] = t.x, b[1] = t.y, b[2] = t.z, b[3] = t.w;
            } else {
                b[0] = sB[k][x];
            }
#pragma unroll
            for (int q = 0; q < VEC; ++q) acc[q] = fmaf(a, b[q], acc[q]);
        }
        float *out = C + (size_t)r * ldc + n;
        if constexpr (VEC == 4) {
            float4 o;
            o.x = skinny_out(alpha, acc[0], beta, c[p][0]);
            o.y = skinny_out(alpha, acc[1], beta, c[p][1]);
            o.z = skinny_out(alpha, acc[2], beta, c[p][2]);
            o.w = skinny_out(alpha, acc[3], beta, c[p][3]);
            *reinterpret_cast<float4 *>(out) = o;
        } else {
            out[0] = skinny_out(alpha, acc[0], beta, c[p][0]);
        }
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

static bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

template <int N, int VEC> static void launch_rows(const skinny_args &a, int KP, size_t smem) {
    constexpr int rows_per_block = SKINNY_WARPS * ROW_GROUPS * ROW_SETS;
    const unsigned blocks = (unsigned)(((long long)a.M + rows_per_block - 1) / rows_per_block);
    skinny_rows_kernel<N, VEC, ROW_SETS><<<blocks, SKINNY_THREADS, smem, cuda_stream(a.be)>>>(
        a.M, a.K, KP, a.alpha, a.A, a.lda, a.B, a.ldb, a.beta, a.C, a.ldc);
}

template <int N> struct run_rows {
    static bool run(const skinny_args &a) {
        const int KP = (a.K + 31) / 32 * 32 + 4;
        const size_t smem = (size_t)KP * N * sizeof(float);
        if (smem > SKINNY_SHARED_MAX) return false;
        if (aligned16(a.A) && a.lda % 4 == 0 && a.K % 4 == 0)
            launch_rows<N, 4>(a, KP, smem);
        else
            launch_rows<N, 1>(a, KP, smem);
        KERNEL_CHECK_RET(a.be, "skinny_rows_kernel", true);
        return true;
    }
};

template <int N, int VEC> static void launch_tn(const skinny_args &a, dim3 grid, float *partial) {
    skinny_tn_kernel<N, VEC, TN_ROWS><<<grid, SKINNY_THREADS, 0, cuda_stream(a.be)>>>(
        a.M, a.K, a.alpha, a.A, a.lda, a.B, a.ldb, a.beta, a.C, a.ldc, partial, cuda_state(a.be)->d_tickets);
}

template <int N> struct run_tn {
    static bool run(const skinny_args &a) {
        const int nchunks = (a.K + TN_ROWS - 1) / TN_ROWS, tiles = (a.M + TN_COLS - 1) / TN_COLS;
        if (tiles > CUDA_TICKETS) return false;
        float *partial = (float *)cuda_scratch(a.be, (size_t)nchunks * tiles * TN_COLS * N * sizeof(float));
        if (!partial) return true; /* cuda_scratch recorded the error */
        const dim3 grid((unsigned)nchunks, (unsigned)tiles);
        if (aligned16(a.A) && a.lda % 4 == 0 && a.M % 4 == 0)
            launch_tn<N, 4>(a, grid, partial);
        else
            launch_tn<N, 1>(a, grid, partial);
        KERNEL_CHECK_RET(a.be, "skinny_tn_kernel", true);
        return true;
    }
};

template <int KW, int VEC> static void launch_nt(const skinny_args &a) {
    const dim3 grid((unsigned)(((long long)a.M + NT_ROWS - 1) / NT_ROWS),
                    (unsigned)((a.N + NT_TPR * VEC - 1) / (NT_TPR * VEC)));
    skinny_nt_kernel<KW, VEC><<<grid, SKINNY_THREADS, 0, cuda_stream(a.be)>>>(a.M, a.N, a.alpha, a.A, a.lda, a.B,
                                                                             a.ldb, a.beta, a.C, a.ldc);
}

template <int KW> struct run_nt {
    static bool run(const skinny_args &a) {
        if ((a.N + NT_TPR - 1) / NT_TPR > 65535) return false; /* past the grid's y limit: cuBLAS */
        if (aligned16(a.C) && a.ldc % 4 == 0 && a.N % 4 == 0)
            launch_nt<KW, 4>(a);
        else
            launch_nt<KW, 1>(a);
        KERNEL_CHECK_RET(a.be, "skinny_nt_kernel", true);
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
    if (ta && !tb && N <= SKINNY_MAX && K >= SKINNY_TN_MIN_K) return by_width<run_tn>(N, a);
    if (!ta && tb && K <= SKINNY_MAX) return by_width<run_nt>(K, a);
    return false;
}
