/*
 * expert_choice, CUDA path: the routing of expert_choice.c on the device.
 *
 * Forward, where an expert's list is at most EC_FUSED_CHUNKS chunks (T <=
 * 8192) and the device holds the whole grid at once: one cooperative launch,
 * ec_select_fused_kernel, that does steps 1 to 3 below in phases. Each
 * (chunk, expert) block sorts its chunk as in step 1; it waits (flags in the
 * workspace) for the other chunks of its expert, loads their runs into shared
 * memory and ranks its own keys by binary searches there (the merge's rule
 * in one round, with no global loads on the way); then it waits for every
 * block and writes its share of the output rows as in step 3 (paper mode,
 * E <= 32; otherwise step 3 is a launch of its own). Where they fit,
 * EC_FUSED_SPLIT blocks sort each chunk alike and share its ranking, so that
 * SMs the sorts leave idle take half of it.
 *
 * Otherwise (larger T, or a grid too large to be resident), three launches:
 *   1. score and sort: expert e's T candidates are cut into chunks of
 *               EC_CHUNK tokens; one block per (chunk, expert) computes the
 *               chunk's scores S[t,e] = softmax(l[t,:])[e] (writing them to S),
 *               sorts its keys (score descending, token ascending: the CPU's
 *               qsort order) and keeps its first C as a run. Tokens past a
 *               chunk's first C can only be past the expert's first C: their
 *               rank[t,e] is -1 at once.
 *   2. merge:   rounds of one thread per kept key: a key's place in the union
 *               of EC_GROUP neighbouring runs is its place in its own run
 *               plus, for every other run, the number of keys there that are
 *               larger. The first C of a merged run go on; the others get
 *               rank -1. The last round, whose one run is the expert's whole
 *               list, writes rank[t,e] = place for the first C and -1 for the
 *               rest. (A single chunk writes the ranks right after its sort.)
 *               So every rank[t,e] is written exactly once, and no pass
 *               clears the array first.
 *   3. assign:  each token's row, exactly as the CPU loop writes it. The
 *               paper's mode with E <= 32 gives a token a group of lanes, one
 *               per expert: a ballot over the group says which experts took
 *               it, and each lane writes one output entry (coalesced).
 *               Otherwise one thread per token runs the CPU's loop (the seed
 *               mode's top-K' by logit, or E > 32).
 * Backward, one launch: the same lane groups (paper mode, E <= 32) or a
 * thread per token.
 *
 * Why this shape: one block per expert sorting all T keys left all but E
 * blocks of the GPU idle; at T = 8192, E = 8 that sort took 106 us a call on
 * an H100. Chunks give E * T / EC_CHUNK sort blocks, and a merge round is one
 * warp per 32 kept keys; at that shape the select is one sort and one merge
 * launch. Larger T adds a merge round for every factor of EC_GROUP, each a
 * pass over at most E * min(T, runs * C) keys. These kernels are short, so
 * what they cost is mostly launches and chains of dependent global loads:
 * the scores are computed where the sort reads them (no launch of their
 * own), the merge finds its way through the other runs with samples held in
 * shared memory (two rounds of global loads per key instead of a binary
 * search through global memory), ec_expf has no branch (a thread's
 * independent calls overlap), and the assignment and the backward read and
 * write whole rows with whole warps. The fused select removes two launches
 * and the merge's global loads where T allows. Measured numbers: at
 * ec_cuda_select.
 *
 * Routing decisions must be bitwise the CPU's, and here they depend on
 * rounding: an expert ranks the scores of different tokens, and with
 * thousands of tokens some scores are an ulp apart. CUDA's expf may differ
 * from the host's by an ulp or two, which would reorder such tokens. So the
 * scores use ec_expf below, a copy of the expf the CPU path gets from glibc
 * (2.27 and later, x86-64): checked against it on every float, it returns the
 * same bits. The sums and divisions around it are plain IEEE float operations
 * in the CPU's order, so S, and with it every choice, every slot and the
 * paper-mode weights, are the CPU's bit for bit. (Against another libm the
 * host's S may differ in the last bit, and a choice between two tokens whose
 * scores tie to that bit with it.) The seed mode's weights use the SDK's
 * moe_softk_weights (device expf): they may differ by an ulp.
 *
 * Non-finite logits (and, in backward, expert entries outside [-1, E)) are
 * refused before anything is written, as on the CPU: a first kernel records
 * the first bad element in the workspace, one 16-byte copy brings the flags
 * to the host, and the call fails naming the token and expert. That copy is
 * the one synchronization of a call; it is skipped when the host checks the
 * inputs itself (moe_context_inputs_checked: the training steps).
 *
 * Pointers in the arguments are device pointers; everything runs on
 * ctx->stream.
 */
#include <moe/router_cuda.cuh>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

/* The instance state exactly as expert_choice.c defines it: both files read one struct. */
typedef struct ec_state {
    int32_t E, K;
    int32_t max_tokens;
    int32_t max_per_token; /* K' of the seed-compatible mode; 0 = the paper's mode */
} ec_state;

/* Tokens per sorted chunk (a power of two: the bitonic network's size), keys
 * each sorting thread holds in registers (EC_CHUNK / EC_SORT_KEYS threads a
 * block), runs per merge round, warps per merge block, and the most samples
 * of a run a merge block holds in shared memory. At T = 8192 these give
 * E * 8 sort blocks and a single merge round, whose runs of 1024 keys have 32
 * samples each. Two keys a thread: the sort's threads each compute their
 * keys' softmax rows, a chain of 8 expf a row, and fewer rows a thread
 * measured faster (score and sort at T = 8192, E = 8 on an H100: 19.7 us
 * with 4 keys, 12.2 with 2, 12.9 with 1). */
#define EC_CHUNK 1024
#define EC_SORT_KEYS 2
#define EC_GROUP 8
#define EC_MERGE_WARPS 4
#define EC_SAMPLES 32
#define EC_ROW 8 /* the most logits a row has for the sort's rows in registers */
#define EC_FUSED_CHUNKS 8 /* the most chunks an expert for the fused select (its list in shared memory) */
#define EC_FUSED_SPLIT 2  /* blocks a chunk in the fused select where they fit (they share its ranking) */
#define EC_GRID_YZ 65535 /* the most blocks a grid has along y and z; kernels loop past it */
#define EC_FULL_WARP 0xFFFFFFFFu

static int32_t ec_k_out(const ec_state *s) { return s->max_per_token > 0 ? s->max_per_token : s->E; }

/* Chunks of expert e's list: ceil(T / EC_CHUNK), written so that T near
 * INT32_MAX cannot overflow. */
static int32_t ec_chunks(int32_t T) { return T > 0 ? (T - 1) / EC_CHUNK + 1 : 0; }

/* ---- workspace -------------------------------------------------------------------
 * For T tokens:
 *   flags  2 x uint64      [0] first non-finite logit (t*E + e),
 *                          [1] first bad expert entry in backward (t*k_out + j)
 *   S      [T,E] float     softmax scores; seed mode, once the experts have
 *                          chosen: the masked logit rows (S is not read again)
 *   rank   [T,E] int32     token t's place in expert e's list, -1 if not taken
 *   keys   [E,T] uint64    expert e's sorted runs: run j of `stride` tokens
 *                          at e*T + j*stride, its first min(C, tokens in it)
 *                          keys (after the sort, stride = EC_CHUNK)
 *   keys2  [E,T] uint64    where a merge round writes when it is not the last
 *                          one: only when T > EC_CHUNK * EC_GROUP (two or more
 *                          rounds; the rounds alternate between the two)
 *   flags  [2, EC_FUSED_CHUNKS, EC_FUSED_SPLIT, E] uint64   the fused
 *                          select's flags (its two waits; see
 *                          ec_select_fused_kernel)
 * That is more than the CPU path needs (S, rank, a [T] candidate list): 16 TE
 * bytes (24 TE where keys2 is needed) against 8 TE + 8 T, 1 MiB against
 * 0.6 MiB at T = 8192, E = 8. query() reports the larger of the two needs
 * (expert_choice.c), and both paths refuse T > max_tokens outright, since
 * the CPU's own workspace check would let a few more tokens through. */
typedef struct ec_layout {
    size_t S, rank, keys, keys2, flags, total; /* byte offsets; keys2 = 0: none */
} ec_layout;

static ec_layout ec_layout_for(const ec_state *s, int32_t T) {
    const size_t TE = (size_t)T * (size_t)s->E;
    ec_layout L;
    L.S = 2 * sizeof(unsigned long long);
    L.rank = L.S + TE * sizeof(float);
    L.keys = L.rank + TE * sizeof(int32_t); /* 8-byte aligned: 16 + 8 TE */
    L.total = L.keys + TE * sizeof(unsigned long long);
    L.keys2 = 0;
    if (ec_chunks(T) > EC_GROUP) {
        L.keys2 = L.total;
        L.total += TE * sizeof(unsigned long long);
    }
    L.flags = L.total;
    L.total += 2 * (size_t)EC_FUSED_CHUNKS * EC_FUSED_SPLIT * (size_t)s->E * sizeof(unsigned long long);
    return L;
}

/* The size grows with T, so max_tokens' size serves every call. */
extern "C" size_t expert_choice_cuda_workspace_bytes(const ec_state *s) {
    return ec_layout_for(s, s->max_tokens).total;
}

/* ---- glibc's expf ------------------------------------------------------------------
 * The algorithm of ARM's optimized-routines (MIT licence), glibc's expf since
 * 2.28: exp(x) = 2^(k/32) * 2^(r/32) with k = round(32 x / ln 2), 2^(k/32)
 * from a table and 2^(r/32) from a cubic, all in double, rounded once to
 * float. The fused multiply-adds are where glibc's x86-64 build (the variant
 * it picks on every CPU with FMA, Hopper hosts included) has them; the plain
 * multiplies are __dmul_rn so the compiler cannot fuse others. Compared on
 * every one of the 2^32 floats with glibc 2.39's expf, on an H100 host: the
 * same bits throughout (CUDA's expf differs on 3.7% of them). The table is
 * in global memory, read through the read-only cache: the lanes of a warp
 * index it at random, which constant memory would serve one address at a
 * time. */
__device__ const unsigned long long ec_exp2f_table[32] = {
    /* asuint64(2^(i/32)) - (i << 47) */
    0x3ff0000000000000ull, 0x3fefd9b0d3158574ull, 0x3fefb5586cf9890full, 0x3fef9301d0125b51ull,
    0x3fef72b83c7d517bull, 0x3fef54873168b9aaull, 0x3fef387a6e756238ull, 0x3fef1e9df51fdee1ull,
    0x3fef06fe0a31b715ull, 0x3feef1a7373aa9cbull, 0x3feedea64c123422ull, 0x3feece086061892dull,
    0x3feebfdad5362a27ull, 0x3feeb42b569d4f82ull, 0x3feeab07dd485429ull, 0x3feea47eb03a5585ull,
    0x3feea09e667f3bcdull, 0x3fee9f75e8ec5f74ull, 0x3feea11473eb0187ull, 0x3feea589994cce13ull,
    0x3feeace5422aa0dbull, 0x3feeb737b0cdc5e5ull, 0x3feec49182a3f090ull, 0x3feed503b23e255dull,
    0x3feee89f995ad3adull, 0x3feeff76f2fb5e47ull, 0x3fef199bdd85529cull, 0x3fef3720dcef9069ull,
    0x3fef5818dcfba487ull, 0x3fef7c97337b9b5full, 0x3fefa4afa2a490daull, 0x3fefd0765b6e4540ull,
};

__device__ float ec_expf(float x) {
    const double inv_ln2_n = 0x1.71547652b82fep+0 * 32; /* 32 / ln 2 */
    const double shift = 0x1.8p+52;                      /* adding it rounds to an integer */
    const double c0 = 0x1.c6af84b912394p-5 / 32768, c1 = 0x1.ebfce50fac4f3p-3 / 1024, c2 = 0x1.62e42ff0c52d6p-1 / 32;

    /* glibc's main path runs for every x, and its result is replaced where
     * glibc takes a special case: with no branch, the compiler can overlap
     * the independent calls of a softmax row, where branches made each call
     * wait for the one before. For |x| >= 88, inf and NaN the main path's
     * value is garbage but harmless (the table index stays in range). */
    const double xd = (double)x;
    double kd = fma(inv_ln2_n, xd, shift);
    const unsigned long long ki = (unsigned long long)__double_as_longlong(kd);
    kd = __dsub_rn(kd, shift);
    const double r = fma(inv_ln2_n, xd, -kd); /* x * 32/ln2 - k, |r| <= 1/2 */
    const unsigned long long t = __ldg(&ec_exp2f_table[ki % 32]) + (ki << 47);
    const double s = __longlong_as_double((long long)t); /* 2^(k/32) */
    const double z = fma(c0, r, c1);
    const double r2 = __dmul_rn(r, r);
    double y = fma(c2, r, 1.0);
    y = fma(z, r2, y);
    y = __dmul_rn(y, s);
    const float main_path = __double2float_rn(y);

    /* glibc's special cases for |x| >= 88 or NaN, in its order: the select
     * applied last is the test glibc makes first. */
    const uint32_t ix = __float_as_uint(x);
    const uint32_t abstop = (ix >> 20) & 0x7ff;
    float special = main_path;                            /* 88 <= |x| without a case of its own */
    special = x < -0x1.9d1d9ep6f ? 0x1p-149f : special;   /* glibc's 0x1.4p-75f squared */
    special = x < -0x1.9fe368p6f ? 0.0f : special;        /* underflow */
    special = x > 0x1.62e42ep6f ? INFINITY : special;     /* overflow */
    special = abstop >= 0x7f8 ? x + x : special;          /* +inf or NaN */
    special = ix == 0xff800000u ? 0.0f : special;         /* -inf */
    return abstop >= 0x42b ? special : main_path;
}

/* moe_softmax_row(l, p, E, 1) with glibc's expf: the same max, the same sum in
 * the same order, the same division. (The CPU divides l_i - m by the
 * temperature 1, which changes nothing.) */
__device__ void ec_softmax_row(const float *l, float *p, int32_t E) {
    float m = -INFINITY;
    for (int32_t i = 0; i < E; ++i) m = l[i] > m ? l[i] : m;
    float s = 0.0f;
    for (int32_t i = 0; i < E; ++i) {
        p[i] = ec_expf(l[i] - m);
        s += p[i];
    }
    for (int32_t i = 0; i < E; ++i) p[i] /= s;
}

/* ---- sort keys ------------------------------------------------------------------
 * One 64-bit key per candidate whose unsigned order is the routing order
 * (moe_ranks_before: larger score first, ties to the lower token): the score
 * in the high word, mapped so that floats compare like unsigned integers, and
 * the complement of the token in the low word, so that among equal scores the
 * lower token has the larger key. Sorting keys in descending order is then
 * the CPU's qsort. Every key is nonzero (its high word is), so 0 pads. */
__device__ unsigned long long ec_key(float score, int32_t t) {
    if (score == 0.0f) score = 0.0f; /* -0 and +0 are equal scores: give them one key */
    uint32_t b = __float_as_uint(score);
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((unsigned long long)b << 32) | (0xFFFFFFFFu - (uint32_t)t);
}

__device__ int32_t ec_key_token(unsigned long long key) { return (int32_t)(0xFFFFFFFFu - (uint32_t)key); }

/* ---- select ---------------------------------------------------------------------- */

__device__ unsigned long long ec_max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
__device__ unsigned long long ec_min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }

/* v[q] for a q the compiler may not know: selects, so that v stays in
 * registers (indexing it would move it to local memory). */
template <int R>
__device__ unsigned long long ec_pick(const unsigned long long (&v)[R], int q) {
    unsigned long long x = v[0];
#pragma unroll
    for (int i = 1; i < R; ++i)
        if (i == q) x = v[i];
    return x;
}

__host__ __device__ constexpr int ec_log2(int n) { return n > 1 ? 1 + ec_log2(n / 2) : 0; }

/* The block's sort of chunk c of expert e: it scores the tokens of chunk c,
 * [c * CH, c * CH + n), writes S[t,e], sorts their keys descending (left in
 * v: position seg + 32 r + lane in v[r]) and keeps the first min(n, C) as
 * run c in `keys`; with `single` (one chunk is the whole list) it writes
 * their ranks instead. Either way the tokens past the first C get rank -1: a
 * key past the chunk's first C can only be past the expert's first C. With
 * writes = 0 it only sorts (a second block of the fused select that shares
 * the chunk's ranking).
 *
 * Each thread computes whole softmax rows for its R tokens (the E logits of
 * a row are read by one thread, as the CPU sums them in one order), so every
 * (chunk, expert) block computes its chunk's rows again: E times the work of
 * a pass of its own over S, but no launch and no round trip through S. At
 * T = 8192, E = 8 that is 16 expf per thread. With ROW > 0 (E <= ROW) a
 * thread holds its rows in registers; ROW = 0 reads them in loops over E
 * (any E, a load's wait per entry).
 *
 * The sort is a bitonic network in the form whose comparators all put the
 * larger key at the lower index: for each run length k = 2, 4, .. CH first i
 * against its mirror i ^ (k - 1) within the run, then i against i + j for
 * j = k/4 .. 1, where i has bit j clear. A short chunk is padded with 0,
 * smaller than every real key. A fixed network of compare-exchanges on
 * distinct keys: the result depends on the keys alone, never on timing.
 *
 * Keys live in registers: warp w holds positions [w * SEG, (w + 1) * SEG),
 * SEG = 32 R, lane l's key r at position w * SEG + 32 r + l. A comparator
 * whose partner differs in the lane bits only is a shuffle, one that differs
 * in the register bits only stays in the thread, and a mirror within SEG is
 * both (lane ^ 31, register r ^ (k/32 - 1)). Only the steps with j >= SEG
 * (and their mirror) go through shared memory: 10 of the 55 at CH = 1024,
 * R = 2. */
template <int CH, int R, int ROW>
__device__ void ec_score_sort_chunk(const float *__restrict__ logits, int32_t T, int32_t E, int32_t C, int32_t c,
                                    int32_t e, int single, int writes, float *__restrict__ S,
                                    unsigned long long *__restrict__ keys, int32_t *__restrict__ rank,
                                    unsigned long long *sk, unsigned long long (&v)[R]) {
    constexpr int SEG = 32 * R, LOG_CH = ec_log2(CH);
    static_assert((1 << LOG_CH) == CH && SEG <= CH && (R & (R - 1)) == 0, "CH, R: powers of two, 32 R <= CH");
    const int lane = (int)(threadIdx.x & 31), seg = (int)(threadIdx.x >> 5) * SEG;
    const int32_t first = c * CH; /* < T */
    const int32_t n = T - first < CH ? T - first : CH;
    /* The R rows side by side (ec_softmax_row's steps for entry e),
     * so that their loads and expf chains overlap; a position past
     * the chunk computes its chunk's first row and drops it. */
    const float *row[R];
    float m[R], sum[R], p_e[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int32_t p = seg + 32 * r + lane;
        row[r] = logits + (size_t)(first + (p < n ? p : 0)) * E;
        m[r] = -INFINITY;
        sum[r] = 0.0f;
        p_e[r] = 0.0f;
    }
    if constexpr (ROW > 0) {
        /* Every load is issued before the first is used: one round
         * trip to memory, where a loop over E would wait on each. */
        float l[R][ROW];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int i = 0; i < ROW; ++i) l[r][i] = i < E ? row[r][i] : 0.0f;
#pragma unroll
        for (int i = 0; i < ROW; ++i)
#pragma unroll
            for (int r = 0; r < R; ++r)
                if (i < E) m[r] = l[r][i] > m[r] ? l[r][i] : m[r];
#pragma unroll
        for (int i = 0; i < ROW; ++i)
#pragma unroll
            for (int r = 0; r < R; ++r)
                if (i < E) {
                    const float x = ec_expf(l[r][i] - m[r]);
                    sum[r] += x;
                    if (i == e) p_e[r] = x;
                }
    } else {
        for (int32_t i = 0; i < E; ++i)
#pragma unroll
            for (int r = 0; r < R; ++r) m[r] = row[r][i] > m[r] ? row[r][i] : m[r];
        for (int32_t i = 0; i < E; ++i)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float x = ec_expf(row[r][i] - m[r]);
                sum[r] += x;
                if (i == e) p_e[r] = x;
            }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int32_t p = seg + 32 * r + lane;
        v[r] = 0ull;
        if (p < n) {
            const float score = p_e[r] / sum[r];
            if (writes) S[(size_t)(first + p) * E + e] = score;
            v[r] = ec_key(score, first + p);
        }
    }

#pragma unroll
    for (int lk = 1; lk <= LOG_CH; ++lk) {
        const int k = 1 << lk;
        int lj = lk - 1; /* j = 1 << lj, the step to do next */
        if (k > SEG) {
            /* Each thread stores and later loads only its own
             * positions, so only the steps need barriers. */
#pragma unroll
            for (int r = 0; r < R; ++r) sk[seg + 32 * r + lane] = v[r];
            __syncthreads();
            for (; (1 << lj) >= SEG; --lj) {
                const int j = 1 << lj;
                for (int q = (int)threadIdx.x; q < CH / 2; q += CH / R) {
                    const int i = ((q & ~(j - 1)) << 1) | (q & (j - 1));
                    const int partner = j == (k >> 1) ? (i ^ (k - 1)) : (i | j);
                    const unsigned long long x = sk[i], y = sk[partner];
                    if (x < y) {
                        sk[i] = y;
                        sk[partner] = x;
                    }
                }
                __syncthreads();
            }
#pragma unroll
            for (int r = 0; r < R; ++r) v[r] = sk[seg + 32 * r + lane];
        } else if (k <= 32) { /* the mirror, across lanes */
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const unsigned long long y = __shfl_xor_sync(EC_FULL_WARP, v[r], k - 1);
                v[r] = (lane & (k >> 1)) == 0 ? ec_max(v[r], y) : ec_min(v[r], y);
            }
            --lj;
        } else { /* the mirror, across lanes and registers */
            const int mr = k / 32 - 1;
            unsigned long long y[R];
#pragma unroll
            for (int r = 0; r < R; ++r) y[r] = __shfl_xor_sync(EC_FULL_WARP, ec_pick(v, r ^ mr), 31);
#pragma unroll
            for (int r = 0; r < R; ++r) v[r] = (r & (k / 64)) == 0 ? ec_max(v[r], y[r]) : ec_min(v[r], y[r]);
            --lj;
        }
#pragma unroll
        for (; lj >= 0; --lj) {
            const int j = 1 << lj;
            if (j >= 32) { /* within the thread */
                const int jr = j / 32;
                unsigned long long y[R];
#pragma unroll
                for (int r = 0; r < R; ++r) y[r] = ec_pick(v, r ^ jr);
#pragma unroll
                for (int r = 0; r < R; ++r) v[r] = (r & jr) == 0 ? ec_max(v[r], y[r]) : ec_min(v[r], y[r]);
            } else { /* across lanes */
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const unsigned long long y = __shfl_xor_sync(EC_FULL_WARP, v[r], j);
                    v[r] = (lane & j) == 0 ? ec_max(v[r], y) : ec_min(v[r], y);
                }
            }
        }
    }

    /* Positions < n hold the chunk's real keys (the padding sorts last). */
    const int32_t kept = n < C ? n : C;
    unsigned long long *run = keys + (size_t)e * T + first;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int32_t p = seg + 32 * r + lane;
        if (p >= n || !writes) continue;
        int32_t *rank_te = rank + (size_t)ec_key_token(v[r]) * E + e;
        if (single)
            *rank_te = p < kept ? p : -1;
        else if (p < kept)
            run[p] = v[r];
        else
            *rank_te = -1;
    }
}

/* The chunks' sorts as a launch of their own (the path with merge rounds):
 * block (c, e) and its grid-stride successors. */
template <int CH, int R, int ROW>
__global__ void __launch_bounds__(CH / R, 1)
    ec_score_sort_kernel(const float *__restrict__ logits, int32_t T, int32_t E, int32_t C, int32_t n_chunks,
                         int single, float *__restrict__ S, unsigned long long *__restrict__ keys,
                         int32_t *__restrict__ rank) {
    __shared__ unsigned long long sk[CH];
    for (int32_t e = blockIdx.y; e < E; e += gridDim.y)
        for (int32_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
            unsigned long long v[R];
            ec_score_sort_chunk<CH, R, ROW>(logits, T, E, C, c, e, single, 1, S, keys, rank, sk, v);
        }
}

/* Keys kept of run j when runs of `stride` tokens each keep their first C. */
__device__ int32_t ec_run_kept(int32_t T, int32_t C, long long stride, long long j) {
    long long n = (long long)T - j * stride;
    n = n < stride ? n : stride;
    return (int32_t)(n < C ? n : C);
}

/* The merge's sample step for runs of at most `held` keys: the smallest power
 * of two >= 32 that leaves at most EC_SAMPLES samples a run (32 while
 * held <= 32 EC_SAMPLES, as in one round at T = 8192). */
static int32_t ec_sample_step(int32_t held) {
    int32_t step = 32;
    while ((held - 1) / step + 1 > EC_SAMPLES) step *= 2;
    return step;
}

/* How many of the warp's 32 keys w, descending by lane (0 past the end),
 * are larger than x: a binary search over the lanes. */
__device__ int32_t ec_warp_count_larger(unsigned long long w, unsigned long long x) {
    int32_t n = 0;
#pragma unroll
    for (int s = 32; s > 0; s >>= 1) {
        const unsigned long long v = __shfl_sync(EC_FULL_WARP, w, (n + s < 32 ? n + s : 32) - 1);
        if (n + s <= 32 && v > x) n += s;
    }
    return n;
}

/* One merge round: expert e's runs of `stride` tokens (run j at src[e*T +
 * j*stride], its ec_run_kept keys descending) are merged G at a time. Keys
 * are distinct, so a key x's place in the merged run is its place i in its
 * own run plus, in each of the other G - 1 runs, the count of keys larger
 * than x (a prefix of that run). Only the merged run's first C are kept, and
 * they are exact: a key larger than one of them sits before it in its own
 * run too, so it was kept there; and a key whose true place is C or later
 * finds C larger keys, kept or not. The last round (dst == NULL: one merged
 * run, the expert's whole list) writes rank[t,e] = place for places < C and
 * -1 for the others; an earlier round writes the merged runs to dst and -1
 * for the keys it drops.
 *
 * Block (tile, j, e): its warps take 32 consecutive keys of run j each. Run
 * q's count for a key x is 32 b + (keys of its 32-key block b larger than
 * x), where b is the last block whose first key is larger than x. The block
 * first loads every step-th key of the group's runs into shared memory
 * (step = 32 at T = 8192: 32 samples of a 1024-key run), and each lane finds
 * its b among them (for step > 32, a binary search in global memory over
 * the step / 32 blocks between two samples follows). The warp's keys are
 * consecutive, so their blocks in run q are a short range, in practice one
 * or two: the warp loads them 32 keys at a time (the first two of every run
 * at once) and each lane counts in its own block by a binary search over
 * the lanes. So a key waits on two rounds of global loads (samples, blocks),
 * where a binary search through a 1024-key run in global memory would be a
 * chain of 11. */
template <int G>
__global__ void __launch_bounds__(32 * EC_MERGE_WARPS)
    ec_merge_kernel(const unsigned long long *__restrict__ src, int32_t T, int32_t E, int32_t C, int32_t stride,
                    int32_t n_runs, int32_t step, unsigned long long *__restrict__ dst, int32_t *__restrict__ rank) {
    constexpr int PER_THREAD = G * EC_SAMPLES / (32 * EC_MERGE_WARPS);
    static_assert(G >= 2 && G <= 32 && PER_THREAD * 32 * EC_MERGE_WARPS == G * EC_SAMPLES,
                  "G runs a round, their samples shared evenly by the block's threads");
    __shared__ unsigned long long sample[G][EC_SAMPLES];
    const int lane = (int)(threadIdx.x & 31);
    const int32_t held = stride < C ? stride : C; /* the most keys a run keeps */
    const int32_t tiles = (held - 1) / (32 * EC_MERGE_WARPS) + 1;
    const long long stride_out = (long long)stride * G;

    for (int32_t e = blockIdx.z; e < E; e += gridDim.z) {
        for (int32_t j = blockIdx.y; j < n_runs; j += gridDim.y) {
            const int32_t kept_j = ec_run_kept(T, C, stride, j);
            const int32_t g = j / G, j0 = g * G;
            const unsigned long long *group = src + (size_t)e * T + (size_t)j0 * stride;
            for (int32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
                const int32_t first = tile * 32 * EC_MERGE_WARPS + (int32_t)(threadIdx.x & ~31u);
                const int32_t i = first + lane;
                unsigned long long x = i < kept_j ? group[(size_t)(j - j0) * stride + i] : 0ull;

                /* All of a thread's sample loads are issued before it stores
                 * one: a single round trip. */
                unsigned long long got[PER_THREAD];
#pragma unroll
                for (int k = 0; k < PER_THREAD; ++k) {
                    const int a = (int)threadIdx.x + k * 32 * EC_MERGE_WARPS;
                    const int q = a / EC_SAMPLES, m = a % EC_SAMPLES;
                    const int32_t len = j0 + q < n_runs ? ec_run_kept(T, C, stride, j0 + q) : 0;
                    got[k] = (long long)m * step < len ? group[(size_t)q * stride + (size_t)m * step] : 0ull;
                }
                __syncthreads(); /* the previous tile is done with the samples */
#pragma unroll
                for (int k = 0; k < PER_THREAD; ++k) {
                    const int a = (int)threadIdx.x + k * 32 * EC_MERGE_WARPS;
                    sample[a / EC_SAMPLES][a % EC_SAMPLES] = got[k];
                }
                __syncthreads();
                if (first >= kept_j) continue; /* the whole warp */

                /* Lanes past the run's end take its last key, so that the
                 * warp's blocks below stay the range of its real keys. */
                const int last = kept_j - 1 - first < 31 ? kept_j - 1 - first : 31;
                const unsigned long long x_last = __shfl_sync(EC_FULL_WARP, x, last);
                if (lane > last) x = x_last;

                /* Run q's block b[q] for each lane's x, all runs side by
                 * side: first the samples in shared memory, then (step > 32
                 * only) a binary search over the step / 32 blocks that
                 * follow the last larger sample. */
                int32_t len[G], b[G];
#pragma unroll
                for (int q = 0; q < G; ++q) {
                    len[q] = j0 + q < n_runs && j0 + q != j ? ec_run_kept(T, C, stride, j0 + q) : 0;
                    const int32_t n_samples = len[q] > 0 ? (len[q] - 1) / step + 1 : 0;
                    int32_t c0 = 0; /* samples larger than x */
#pragma unroll
                    for (int s = EC_SAMPLES; s > 0; s >>= 1)
                        if (c0 + s <= n_samples && sample[q][c0 + s - 1] > x) c0 += s;
                    b[q] = c0 > 0 ? (c0 - 1) * (step / 32) : -1; /* -1: no key of run q is larger */
                }
                if (step > 32) {
#pragma unroll
                    for (int q = 0; q < G; ++q) {
                        const unsigned long long *run = group + (size_t)q * stride;
                        if (b[q] >= 0)
                            for (int32_t s = step / 64; s > 0; s >>= 1)
                                if ((long long)(b[q] + s) * 32 < len[q] && run[(size_t)(b[q] + s) * 32] > x) b[q] += s;
                    }
                }

                /* The warp's first two blocks of every run, loaded together;
                 * past the warp's last block (or the run's end) they read 0,
                 * which no key is below. */
                int32_t b0[G], b_hi[G];
                unsigned long long w0[G], w1[G];
#pragma unroll
                for (int q = 0; q < G; ++q) {
                    const int32_t b_lo = __shfl_sync(EC_FULL_WARP, b[q], 0);
                    b_hi[q] = __shfl_sync(EC_FULL_WARP, b[q], 31);
                    b0[q] = b_lo > 0 ? b_lo : 0;
                    const long long p0 = 32ll * b0[q] + lane, p1 = p0 + 32;
                    const unsigned long long *run = group + (size_t)q * stride;
                    w0[q] = b0[q] <= b_hi[q] && p0 < len[q] ? run[p0] : 0ull;
                    w1[q] = b0[q] + 1 <= b_hi[q] && p1 < len[q] ? run[p1] : 0ull;
                }

                /* Counts in those blocks, every run and both blocks side by
                 * side (a block of zeros counts nothing, and no lane's b[q]
                 * names it); then any further blocks, one at a time. */
                int32_t place = i;
#pragma unroll
                for (int q = 0; q < G; ++q) {
                    const int32_t n0 = ec_warp_count_larger(w0[q], x), n1 = ec_warp_count_larger(w1[q], x);
                    if (b[q] == b0[q]) place += 32 * b0[q] + n0;
                    if (b[q] == b0[q] + 1) place += 32 * (b0[q] + 1) + n1;
                }
#pragma unroll
                for (int q = 0; q < G; ++q) {
                    for (int32_t bb = b0[q] + 2; bb <= b_hi[q]; ++bb) {
                        const long long p = 32ll * bb + lane;
                        const unsigned long long w = p < len[q] ? group[(size_t)q * stride + (size_t)p] : 0ull;
                        const int32_t n_larger = ec_warp_count_larger(w, x);
                        if (bb == b[q]) place += 32 * bb + n_larger;
                    }
                }

                if (i >= kept_j) continue;
                int32_t *rank_te = rank + (size_t)ec_key_token(x) * E + e;
                if (!dst)
                    *rank_te = place < C ? place : -1;
                else if (place < ec_run_kept(T, C, stride_out, g))
                    dst[(size_t)e * T + (size_t)(g * stride_out) + place] = x;
                else
                    *rank_te = -1;
            }
        }
    }
}

/* ---- assign and backward ------------------------------------------------------------
 * The paper's mode with E <= 32 works on lane groups: `gs` lanes a token
 * (gs, a power of two, the smallest >= E), lane e of the group for expert e,
 * so that a warp reads and writes 32 / gs whole rows with consecutive
 * addresses. A group's lanes see each other through shuffles of width gs.
 * Every lane of a warp takes part in its shuffles and ballots; only lanes
 * with t < T and e < E read or write. */

/* The lanes of `lane`'s group, as a mask of the warp. */
__device__ unsigned ec_group_mask(int lane, int gs) {
    const unsigned ones = gs == 32 ? EC_FULL_WARP : (1u << gs) - 1u;
    return ones << (lane & ~(gs - 1));
}

/* Paper mode, E <= 32: token t lists the experts that took it in ascending
 * order, weight S[t,e], slot = rank, then -1 entries; here lane e writes the
 * entry at its place in that row: among the takers, the count of takers
 * below it; else after all takers, the count of non-takers below it. */
/* Lane item `id` = t * gs + e of that row (a lane with in_range = 0, or t, e
 * outside [0, T) x [0, E), only takes part in the ballot). The whole warp
 * calls it together. S and rank are read through L2 (__ldcg): in the fused
 * select they were written by other blocks of the same launch. */
__device__ void ec_assign_group_item(size_t id, int in_range, const float *S, const int32_t *rank, int32_t T,
                                     int32_t E, int gs, int32_t *__restrict__ expert_out,
                                     float *__restrict__ weight_out, int32_t *__restrict__ slot_out) {
    const int lane = (int)(threadIdx.x & 31);
    const size_t t = id / (unsigned)gs;
    const int32_t e = (int32_t)(id % (unsigned)gs);
    const int active = in_range && t < (size_t)T && e < E;
    const size_t at = t * (size_t)E;
    const int32_t r = active ? __ldcg(rank + at + e) : -1;
    const float w = active ? __ldcg(S + at + e) : 0.0f; /* loaded beside r, used if taken */
    const unsigned taken = __ballot_sync(EC_FULL_WARP, r >= 0) & ec_group_mask(lane, gs);
    if (!active) return;
    const int32_t takers = __popc(taken), takers_below = __popc(taken & ((1u << lane) - 1u));
    if (r >= 0) {
        expert_out[at + takers_below] = e;
        weight_out[at + takers_below] = w;
        slot_out[at + takers_below] = r;
    } else {
        const int32_t j = takers + (e - takers_below);
        expert_out[at + j] = -1;
        weight_out[at + j] = 0.0f;
        slot_out[at + j] = -1;
    }
}

__global__ void ec_assign_groups_kernel(const float *__restrict__ S, const int32_t *__restrict__ rank, int32_t T,
                                        int32_t E, int gs, int32_t *__restrict__ expert_out,
                                        float *__restrict__ weight_out, int32_t *__restrict__ slot_out) {
    ec_assign_group_item((size_t)blockIdx.x * blockDim.x + threadIdx.x, 1, S, rank, T, E, gs, expert_out, weight_out,
                         slot_out);
}

/* ---- the fused select -------------------------------------------------------------
 * Up to EC_FUSED_CHUNKS chunks an expert, one cooperative launch does the
 * whole forward that ec_score_sort_kernel, ec_merge_kernel and
 * ec_assign_groups_kernel do in three: block (c, e) sorts chunk c of expert e
 * as above, waits for the other chunks of its expert, ranks its own run's keys
 * against theirs (rank[t,e] for each), then waits for every block and writes
 * its share of the output rows (paper mode, E <= 32; otherwise the assignment
 * stays a launch of its own).
 *
 * The waits are flags in the workspace, one a block and phase: a block sets
 * its flag to the call's tag once its writes are visible device-wide, and
 * waits until the flags it needs hold that tag. The tags come from a host
 * counter, new for every call, so flags left by an earlier call (or any
 * other bytes the workspace holds) never read as arrived, and nothing has to
 * clear them. A cooperative launch is what makes waiting on other blocks safe:
 * it starts only with every block resident at once. */

/* Sets this block's flag once every thread's writes are visible to the
 * device: the barrier orders them before thread 0's fence, which is
 * cumulative (the order cooperative groups' grid sync relies on). */
__device__ void ec_arrive(unsigned long long *flag, unsigned long long tag) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(flag), "l"(tag) : "memory");
    }
}

/* Returns to the whole block once flags[0 .. n) all hold `tag` (warp 0 polls). */
__device__ void ec_wait(const unsigned long long *flags, int32_t n, unsigned long long tag) {
    if (threadIdx.x < 32) {
        for (;;) {
            int arrived = 1;
            for (int32_t i = (int32_t)threadIdx.x; i < n; i += 32) {
                unsigned long long f;
                asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(f) : "l"(flags + i) : "memory");
                arrived &= f == tag;
            }
            if (__all_sync(EC_FULL_WARP, arrived)) break;
        }
        __threadfence();
    }
    __syncthreads();
}

extern __shared__ unsigned long long ec_dyn_smem[];

/* The lane items [first, end) of n that block b of `blocks` takes: whole
 * warps (so a token's group never straddles two blocks), about n / blocks. */
__device__ void ec_block_share(size_t n, int32_t blocks, int32_t b, size_t *first, size_t *end) {
    const size_t per = ((n + (size_t)blocks - 1) / (size_t)blocks + 31) / 32 * 32;
    *first = (size_t)b * per;
    *end = *first + per < n ? *first + per : n;
}

/* Grid (n_chunks, E, H), n_chunks <= EC_FUSED_CHUNKS, all blocks resident;
 * block b = (h E + e) n_chunks + c. flags: 2 n_chunks E H words, one a block
 * for each wait (runs, ranks). Dynamic shared memory:
 * max(CH, n_chunks min(CH, C)) keys.
 *
 * Block (c, e, h) scores and sorts chunk c of expert e as
 * ec_score_sort_kernel does (rows of ROW logits in registers, 0: loops over
 * E). The sorts of blocks h > 0 repeat block h = 0's and write nothing: they
 * are there so that the ranking, the longest part, is shared by H blocks of
 * otherwise idle SMs. (Scores computed once, in lane groups, before the
 * sorts, with a wait for all blocks between, measured slower: 24.0 against
 * 22.8 us a call at T = 8192, E = 8, H = 2.)
 *
 * The ranking is the merge round's (a key's place is its place in its run plus
 * the count of larger keys in every other run; exact for places < C, see
 * ec_merge_kernel) with the expert's whole list in shared memory (64 KiB at
 * T = 8192, C >= 1024): each thread runs a binary search per run and key, all
 * of them side by side, so a key waits on log2(C) shared loads, not on global
 * ones; block h takes its threads' keys r = h, h + H, .. . assign: then the
 * output rows (gs lanes a token), shared by all blocks, as
 * ec_assign_groups_kernel writes them. */
template <int CH, int R, int ROW, int H>
__global__ void __launch_bounds__(CH / R, 1)
    ec_select_fused_kernel(const float *__restrict__ logits, int32_t T, int32_t E, int32_t C, int32_t n_chunks,
                           float *S, unsigned long long *keys, int32_t *rank, unsigned long long *flags,
                           unsigned long long tag, int gs, int assign, int32_t *__restrict__ expert_out,
                           float *__restrict__ weight_out, int32_t *__restrict__ slot_out) {
    constexpr int SEG = 32 * R, K = R / H; /* K keys a thread ranks */
    static_assert(H >= 1 && K * H == R, "H divides R");
    const int32_t c = (int32_t)blockIdx.x, e = (int32_t)blockIdx.y, h = (int32_t)blockIdx.z;
    const int32_t blocks = n_chunks * E * H, b = (h * E + e) * n_chunks + c;
    unsigned long long *flags_runs = flags, *flags_ranks = flags + blocks;
    const int lane = (int)(threadIdx.x & 31), seg = (int)(threadIdx.x >> 5) * SEG;

    unsigned long long v[R];
    ec_score_sort_chunk<CH, R, ROW>(logits, T, E, C, c, e, n_chunks == 1, h == 0, S, keys, rank, ec_dyn_smem, v);

    if (n_chunks > 1) {
        if (h == 0) ec_arrive(flags_runs + (size_t)e * n_chunks + c, tag);
        ec_wait(flags_runs + (size_t)e * n_chunks, n_chunks, tag);
        /* The other runs into shared memory, run q at q * held (a run holds
         * at most CH = R blockDim keys: R a thread). Every load is issued
         * before the first store: one round trip to L2, where a loop storing
         * each key as it came waited on every load in turn. */
        const int32_t held = C < CH ? C : CH;
        int32_t len[EC_FUSED_CHUNKS], n[EC_FUSED_CHUNKS][K];
        unsigned long long got[EC_FUSED_CHUNKS][R];
#pragma unroll
        for (int q = 0; q < EC_FUSED_CHUNKS; ++q) {
            len[q] = q < n_chunks && q != c ? ec_run_kept(T, C, CH, q) : 0; /* 0: run q adds nothing */
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int32_t m = (int32_t)threadIdx.x + r * (int32_t)blockDim.x;
                got[q][r] = m < len[q] ? __ldcg(keys + (size_t)e * T + (size_t)q * CH + (size_t)m) : 0ull;
            }
#pragma unroll
            for (int i = 0; i < K; ++i) n[q][i] = 0;
        }
#pragma unroll
        for (int q = 0; q < EC_FUSED_CHUNKS; ++q)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int32_t m = (int32_t)threadIdx.x + r * (int32_t)blockDim.x;
                if (m < len[q]) ec_dyn_smem[q * held + m] = got[q][r];
            }
        __syncthreads();
        unsigned long long x[K]; /* this block's keys of the thread: v[i H + h] */
#pragma unroll
        for (int i = 0; i < K; ++i) x[i] = H == 1 ? v[i] : ec_pick(v, i * H + h);
        int32_t top = 1; /* the largest power of two <= held */
        while (2 * top <= held) top *= 2;
        /* n[q][i] = the count of run q's keys larger than x[i]: a prefix. */
        for (int32_t step = top; step > 0; step >>= 1) {
#pragma unroll
            for (int q = 0; q < EC_FUSED_CHUNKS; ++q)
#pragma unroll
                for (int i = 0; i < K; ++i) {
                    const int32_t k = n[q][i] + step;
                    if (k <= len[q] && ec_dyn_smem[q * held + k - 1] > x[i]) n[q][i] = k;
                }
        }
        const int32_t kept = ec_run_kept(T, C, CH, c);
#pragma unroll
        for (int i = 0; i < K; ++i) {
            const int32_t p = seg + 32 * (i * H + h) + lane;
            if (p >= kept) continue; /* rank -1 already, or padding */
            int32_t place = p;
#pragma unroll
            for (int q = 0; q < EC_FUSED_CHUNKS; ++q) place += n[q][i];
            rank[(size_t)ec_key_token(x[i]) * E + e] = place < C ? place : -1;
        }
    }

    if (assign) {
        ec_arrive(flags_ranks + b, tag);
        ec_wait(flags_ranks, blocks, tag);
        size_t first, end;
        ec_block_share((size_t)T * (size_t)gs, blocks, b, &first, &end);
        for (size_t base = first; base < end; base += blockDim.x)
            ec_assign_group_item(base + threadIdx.x, base + threadIdx.x < end, S, rank, T, E, gs, expert_out,
                                 weight_out, slot_out);
    }
}

/* Token t's row of the output, as the CPU loop writes it: the seed mode, and
 * the paper's mode with E > 32. */
__global__ void ec_assign_kernel(const float *logits, const float *S, const int32_t *rank, int32_t T, int32_t E,
                                 int32_t k_out, int owns_capacity, float *rows, int32_t *expert_out,
                                 float *weight_out, int32_t *slot_out) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *l = logits + (size_t)t * E;
    const float *St = S + (size_t)t * E;
    const int32_t *rt = rank + (size_t)t * E;
    int32_t *expert = expert_out + (size_t)t * k_out;
    float *weight = weight_out + (size_t)t * k_out;
    int32_t n = 0; /* entries written for this token */

    if (owns_capacity) {
        /* The paper: every expert that took t, ascending, weight S[t,e]. */
        int32_t *slot = slot_out + (size_t)t * k_out;
        for (int32_t e = 0; e < E; ++e) {
            if (rt[e] < 0) continue;
            expert[n] = e;
            weight[n] = St[e];
            slot[n] = rt[e];
            ++n;
        }
        for (int32_t j = n; j < k_out; ++j) slot[j] = -1;
    } else {
        /* Seed mode: keep the K' best-logit experts among those that took t,
         * the others hidden behind -inf; none took t: its own top-K'. */
        float *row = rows + (size_t)t * E;
        int32_t chosen = 0;
        for (int32_t e = 0; e < E; ++e) {
            row[e] = rt[e] >= 0 ? l[e] : -INFINITY;
            chosen += rt[e] >= 0;
        }
        if (chosen > 0) {
            n = chosen < k_out ? chosen : k_out;
            moe_topk_row(row, E, n, expert);
        } else {
            n = k_out;
            moe_topk_row(l, E, n, expert);
        }
        moe_softk_weights(l, expert, n, 1.0f, weight);
    }
    for (int32_t j = n; j < k_out; ++j) {
        expert[j] = -1;
        weight[j] = 0.0f;
    }
}

/* Paper mode, E <= 32 (k_out = E): dS[t,e] = the sum of dweight[t,j] over
 * the entries j with expert e, in j order from 0 (the CPU's accumulation),
 * then dl_e = S_e (dS_e - sum_i S_i dS_i) with S the softmax row. Lane e
 * holds logit e and entry j = e; the row's max, sums and dot product run over
 * the group in the CPU's order, so the result is the CPU's bit for bit
 * (the products are rounded before they are added, as the CPU does). Entries
 * outside [0, E) match no lane: they add nothing, as the CPU skips -1. */
__global__ void ec_backward_groups_kernel(const float *__restrict__ logits, const int32_t *__restrict__ expert_in,
                                          const float *__restrict__ dweight_in, int32_t T, int32_t E, int gs,
                                          float *__restrict__ dlogits) {
    const size_t id = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t t = id / (unsigned)gs;
    const int32_t e = (int32_t)(id % (unsigned)gs);
    const int active = t < (size_t)T && e < E;
    const size_t at = t * (size_t)E + (size_t)e;
    const float l = active ? logits[at] : 0.0f;
    const int32_t ex = active ? expert_in[at] : -1;
    const float dw = active ? dweight_in[at] : 0.0f;

    float ds = 0.0f, m = -INFINITY;
    for (int32_t j = 0; j < E; ++j) {
        const int32_t ex_j = __shfl_sync(EC_FULL_WARP, ex, j, gs);
        const float dw_j = __shfl_sync(EC_FULL_WARP, dw, j, gs);
        const float l_j = __shfl_sync(EC_FULL_WARP, l, j, gs);
        if (ex_j == e) ds += dw_j;
        m = l_j > m ? l_j : m;
    }
    const float p = ec_expf(l - m);
    float s = 0.0f;
    for (int32_t i = 0; i < E; ++i) s += __shfl_sync(EC_FULL_WARP, p, i, gs);
    const float S_e = p / s;
    float dot = 0.0f;
    for (int32_t i = 0; i < E; ++i)
        dot += __fmul_rn(__shfl_sync(EC_FULL_WARP, S_e, i, gs), __shfl_sync(EC_FULL_WARP, ds, i, gs));
    if (active) dlogits[at] = S_e * (ds - dot);
}

/* The backward of the seed mode and of the paper's mode with E > 32:
 * paper mode: dS[t,e] = dweight for chosen (t,e), dl_j = S_j (dS_j - sum_i S_i dS_i);
 * seed mode: the softk backward over the kept entries. */
__global__ void ec_backward_kernel(const float *logits, const int32_t *expert_in, const float *weight_in,
                                   const float *dweight_in, int32_t T, int32_t E, int32_t k_out, int owns_capacity,
                                   float *S, float *dlogits) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const int32_t *expert = expert_in + (size_t)t * k_out;
    const float *dweight = dweight_in + (size_t)t * k_out;
    float *dl = dlogits + (size_t)t * E;
    for (int32_t e = 0; e < E; ++e) dl[e] = 0.0f;

    if (owns_capacity) {
        /* dl holds dS first, then is turned into dl in place. */
        float *St = S + (size_t)t * E;
        for (int32_t j = 0; j < k_out; ++j)
            if (expert[j] >= 0) dl[expert[j]] += dweight[j];
        ec_softmax_row(logits + (size_t)t * E, St, E);
        float dot = 0.0f; /* sum_i S_i dS_i */
        for (int32_t e = 0; e < E; ++e) dot += St[e] * dl[e];
        for (int32_t e = 0; e < E; ++e) dl[e] = St[e] * (dl[e] - dot);
    } else {
        /* Forward writes the kept experts first, then -1 entries. */
        int32_t n = 0;
        while (n < k_out && expert[n] >= 0) ++n;
        moe_softk_weights_backward(expert, weight_in + (size_t)t * k_out, dweight, n, 1.0f, dl);
    }
}

/* ---- host side ------------------------------------------------------------------- */

/* Lanes a token for the lane-group kernels: the smallest power of two >= E,
 * or 0 where E > 32 (the kernels of a thread per token then). */
static int ec_group_size(int32_t E) {
    int gs = 1;
    while (gs < E) gs *= 2;
    return gs <= 32 ? gs : 0;
}

/* Blocks of MOE_ROUTER_CUDA_THREADS for T tokens of gs lanes each (T * gs < 2^36: well inside a grid's x). */
static unsigned ec_group_blocks(int32_t T, int gs) {
    const size_t n = (size_t)T * (size_t)gs;
    return (unsigned)((n + MOE_ROUTER_CUDA_THREADS - 1) / MOE_ROUTER_CUDA_THREADS);
}

/* ec_check_common's checks, against this path's workspace (the values are
 * checked on the device, see ec_cuda_check_values). */
static moe_status ec_cuda_check_common(const ec_state *s, const moe_context *ctx, int32_t T, int32_t E,
                                       int32_t k_out, const float *logits) {
    moe_status st = moe_router_check_shape(ctx, T, E, k_out, s->E, ec_k_out(s));
    if (st != MOE_OK || T == 0) return st;
    if (!logits) return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "logits must not be NULL");
    if (T > s->max_tokens) /* as ec_check_common says it */
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "T = %d exceeds max_tokens = %d", T,
                        s->max_tokens);
    return moe_router_check_workspace_for(ctx, ec_layout_for(s, T).total, T, s->max_tokens);
}

/* The first non-finite logit and, given `expert`, the first entry outside
 * [-1, E), found on the device before anything is written (the one copy back
 * of a call), reported as the CPU reports them. */
static moe_status ec_cuda_check_values(const moe_context *ctx, cudaStream_t stream, const float *logits, int32_t T,
                                       int32_t E, const int32_t *expert, int32_t k_out) {
    return moe_router_cuda_check_values(ctx, stream, logits, T, E, expert, k_out, -1,
                                        (unsigned long long *)ctx->workspace);
}

/* A new tag for every call of the fused select (see there). The counter
 * starts at the clock's count, so that another process's flags left in
 * reused device memory do not carry this process's tags either. */
static unsigned long long ec_next_tag(void) {
    static std::atomic<unsigned long long> next{
        (unsigned long long)std::chrono::steady_clock::now().time_since_epoch().count()};
    return next.fetch_add(1, std::memory_order_relaxed);
}

/* What the fused select asks of the runtime, asked once and kept: a
 * device's answers never change, nor a kernel's for a shared-memory size,
 * and asking in every forward costs host time (four layers a step). */
struct ec_device_caps {
    int coop, sms, smem_max;
};

static moe_status ec_caps_of(const moe_context *ctx, int dev, ec_device_caps *out) {
    static std::mutex mu;
    static std::map<int, ec_device_caps> known;
    std::lock_guard<std::mutex> lock(mu);
    const auto it = known.find(dev);
    if (it != known.end()) {
        *out = it->second;
        return MOE_OK;
    }
    ec_device_caps c = {};
    MOE_ROUTER_CUDA(cudaDeviceGetAttribute(&c.coop, cudaDevAttrCooperativeLaunch, dev));
    MOE_ROUTER_CUDA(cudaDeviceGetAttribute(&c.sms, cudaDevAttrMultiProcessorCount, dev));
    MOE_ROUTER_CUDA(cudaDeviceGetAttribute(&c.smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    known[dev] = c;
    *out = c;
    return MOE_OK;
}

/* The blocks per SM that `kernel` fits on device dev with `threads`
 * threads and `smem` bytes of dynamic shared memory, once the kernel is
 * allowed that much. The allowance is only ever raised, so every size
 * answered before still launches. */
static moe_status ec_blocks_per_sm(const moe_context *ctx, const void *kernel, int dev, int threads, size_t smem,
                                   int *per_sm) {
    static std::mutex mu;
    static std::map<std::tuple<const void *, int, size_t>, int> fits;
    static std::map<std::pair<const void *, int>, size_t> allowed;
    std::lock_guard<std::mutex> lock(mu);
    const auto key = std::make_tuple(kernel, dev, smem);
    const auto it = fits.find(key);
    if (it != fits.end()) {
        *per_sm = it->second;
        return MOE_OK;
    }
    size_t &limit = allowed[std::make_pair(kernel, dev)];
    if (smem > limit) {
        MOE_ROUTER_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        limit = smem;
    }
    MOE_ROUTER_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, threads, smem));
    fits[key] = *per_sm;
    return MOE_OK;
}

/* The fused select (rows of ROW logits in registers; 0: any E) with H
 * blocks a chunk, if the device can hold all n_chunks E H blocks at
 * once and their shared memory: *launched says whether it ran (if not,
 * nothing was launched). */
template <int ROW, int H>
static moe_status ec_launch_fused(const moe_context *ctx, cudaStream_t stream, const float *logits, int32_t T,
                                  int32_t E, int32_t C, int32_t n_chunks, float *S, unsigned long long *keys,
                                  int32_t *rank, unsigned long long *flags, int gs, int assign, int32_t *expert_out,
                                  float *weight_out, int32_t *slot_out, int *launched) {
    void (*kernel)(const float *, int32_t, int32_t, int32_t, int32_t, float *, unsigned long long *, int32_t *,
                   unsigned long long *, unsigned long long, int, int, int32_t *, float *, int32_t *) =
        ec_select_fused_kernel<EC_CHUNK, EC_SORT_KEYS, ROW, H>;
    const int threads = EC_CHUNK / EC_SORT_KEYS;
    const size_t held = (size_t)(C < EC_CHUNK ? C : EC_CHUNK);
    const size_t n_keys = (size_t)n_chunks * held > EC_CHUNK ? (size_t)n_chunks * held : (size_t)EC_CHUNK;
    const size_t smem = n_keys * sizeof(unsigned long long);
    int dev = 0, per_sm = 0;
    ec_device_caps caps;
    *launched = 0;
    MOE_ROUTER_CUDA(cudaGetDevice(&dev));
    const moe_status st = ec_caps_of(ctx, dev, &caps);
    if (st != MOE_OK) return st;
    if (!caps.coop || smem > (size_t)caps.smem_max) return MOE_OK;
    const moe_status fit = ec_blocks_per_sm(ctx, (const void *)kernel, dev, threads, smem, &per_sm);
    if (fit != MOE_OK) return fit;
    if ((long long)per_sm * caps.sms < (long long)n_chunks * E * H) return MOE_OK;

    cudaLaunchAttribute attr[1] = {};
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)n_chunks, (unsigned)E, (unsigned)H);
    cfg.blockDim = dim3((unsigned)threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    MOE_ROUTER_CUDA(cudaLaunchKernelEx(&cfg, kernel, logits, T, E, C, n_chunks, S, keys, rank, flags, ec_next_tag(),
                                       gs, assign, expert_out, weight_out, slot_out));
    *launched = 1;
    return MOE_OK;
}

/* The fused select with EC_FUSED_SPLIT blocks a chunk where they fit, else
 * one (a single chunk has no ranking to share); *launched = 0: neither fits. */
template <int ROW>
static moe_status ec_launch_fused_any(const moe_context *ctx, cudaStream_t stream, const float *logits, int32_t T,
                                      int32_t E, int32_t C, int32_t n_chunks, float *S, unsigned long long *keys,
                                      int32_t *rank, unsigned long long *flags, int gs, int assign,
                                      int32_t *expert_out, float *weight_out, int32_t *slot_out, int *launched) {
    *launched = 0;
    if (n_chunks > 1) {
        const moe_status st = ec_launch_fused<ROW, EC_FUSED_SPLIT>(ctx, stream, logits, T, E, C, n_chunks, S, keys,
                                                                   rank, flags, gs, assign, expert_out, weight_out,
                                                                   slot_out, launched);
        if (st != MOE_OK || *launched) return st;
    }
    return ec_launch_fused<ROW, 1>(ctx, stream, logits, T, E, C, n_chunks, S, keys, rank, flags, gs, assign,
                                   expert_out, weight_out, slot_out, launched);
}

/* Every expert takes its top C (1 <= C <= T): the chunks' scores and sort,
 * then merge rounds until one run is left (see the top of the file); S and
 * every rank[t,e] are written. keys2 is needed only past one round
 * (ec_layout_for).
 *
 * Measured on an H100 (Nsight Compute, T = 8192, E = 8, C = 2560, per
 * layer of a training step): the fused select 22.8 us and the backward 4.4,
 * 27.2 us in two launches, against 31.8 in four for score and sort (12.2),
 * merge (11.3), assign (3.7) and backward (4.4). Earlier forms of the fused
 * select, same shape: one block a chunk 24.8 us (and 29 with its runs
 * loaded into shared memory one key at a time); scores first in lane groups
 * with a wait for all blocks, 24.0 with two blocks a chunk and 27.0 with
 * one. Before the chunks: 45.6 us for a scores kernel (6.6), the sort
 * (10.2), a merge searching through global memory (12.0), assign and
 * backward with a thread per token (7.4, 9.4). */
static moe_status ec_cuda_select(const moe_context *ctx, cudaStream_t stream, const float *logits, int32_t T,
                                 int32_t E, int32_t C, float *S, unsigned long long *keys, unsigned long long *keys2,
                                 int32_t *rank, unsigned long long *flags, int gs, int owns_capacity,
                                 int32_t *expert_out, float *weight_out, int32_t *slot_out, int *assigned) {
    const int32_t n_chunks = ec_chunks(T);
    *assigned = 0;
    if (n_chunks <= EC_FUSED_CHUNKS) {
        int launched = 0;
        const int assign = owns_capacity && gs > 0;
        const moe_status st =
            E <= EC_ROW ? ec_launch_fused_any<EC_ROW>(ctx, stream, logits, T, E, C, n_chunks, S, keys, rank, flags,
                                                      gs, assign, expert_out, weight_out, slot_out, &launched)
                        : ec_launch_fused_any<0>(ctx, stream, logits, T, E, C, n_chunks, S, keys, rank, flags, gs,
                                                 assign, expert_out, weight_out, slot_out, &launched);
        if (st != MOE_OK || launched) {
            *assigned = assign;
            return st;
        }
    }
    const unsigned grid_e = (unsigned)(E < EC_GRID_YZ ? E : EC_GRID_YZ);
    const dim3 sort_grid((unsigned)n_chunks, grid_e);
    if (E <= EC_ROW)
        ec_score_sort_kernel<EC_CHUNK, EC_SORT_KEYS, EC_ROW><<<sort_grid, EC_CHUNK / EC_SORT_KEYS, 0, stream>>>(
            logits, T, E, C, n_chunks, n_chunks == 1, S, keys, rank);
    else
        ec_score_sort_kernel<EC_CHUNK, EC_SORT_KEYS, 0><<<sort_grid, EC_CHUNK / EC_SORT_KEYS, 0, stream>>>(
            logits, T, E, C, n_chunks, n_chunks == 1, S, keys, rank);
    MOE_ROUTER_LAUNCHED(ec_score_sort_kernel);

    unsigned long long *src = keys, *dst = keys2;
    int32_t stride = EC_CHUNK, n_runs = n_chunks;
    while (n_runs > 1) {
        const int32_t n_out = (n_runs - 1) / EC_GROUP + 1;
        const int32_t held = stride < C ? stride : C;
        const unsigned tiles = (unsigned)((held - 1) / (32 * EC_MERGE_WARPS) + 1);
        const dim3 grid(tiles, (unsigned)(n_runs < EC_GRID_YZ ? n_runs : EC_GRID_YZ), grid_e);
        ec_merge_kernel<EC_GROUP><<<grid, 32 * EC_MERGE_WARPS, 0, stream>>>(
            src, T, E, C, stride, n_runs, ec_sample_step(held), n_out > 1 ? dst : NULL, rank);
        MOE_ROUTER_LAUNCHED(ec_merge_kernel);
        unsigned long long *written = dst;
        dst = src;
        src = written;
        n_runs = n_out;
        if (n_runs > 1) stride *= EC_GROUP; /* < T: more than one run of it */
    }
    return MOE_OK;
}

static moe_status ec_cuda_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const ec_state *s = (const ec_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = ec_cuda_check_common(s, ctx, a->T, a->E, a->k_out, a->logits);
    if (st != MOE_OK || a->T == 0) return st;
    const int32_t T = a->T, E = s->E, k_out = ec_k_out(s);
    const int owns_capacity = s->max_per_token == 0;
    if (!a->expert || !a->weight || (owns_capacity && !a->slot))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "forward: expert, weight%s must not be NULL",
                        owns_capacity ? " and slot" : "");
    if (a->capacity < 0)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "capacity = %d is negative", a->capacity);
    const int32_t C = a->capacity < T ? a->capacity : T;
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    st = ec_cuda_check_values(ctx, stream, a->logits, T, E, NULL, k_out);
    if (st != MOE_OK) return st;

    const ec_layout L = ec_layout_for(s, T);
    char *ws = (char *)ctx->workspace;
    float *S = (float *)(ws + L.S);
    int32_t *rank = (int32_t *)(ws + L.rank);
    unsigned long long *keys = (unsigned long long *)(ws + L.keys);
    unsigned long long *keys2 = L.keys2 ? (unsigned long long *)(ws + L.keys2) : NULL;

    const int gs = ec_group_size(E);
    int assigned = 0;
    if (C > 0) {
        st = ec_cuda_select(ctx, stream, a->logits, T, E, C, S, keys, keys2, rank,
                            (unsigned long long *)(ws + L.flags), gs, owns_capacity, a->expert, a->weight, a->slot,
                            &assigned);
        if (st != MOE_OK) return st;
    } else {
        /* No expert takes anything; S is not read (seed mode uses it for its rows). */
        MOE_ROUTER_CUDA(cudaMemsetAsync(rank, 0xFF, (size_t)T * E * sizeof(int32_t), stream)); /* -1 */
    }
    if (assigned) return MOE_OK;
    if (owns_capacity && gs > 0) {
        ec_assign_groups_kernel<<<ec_group_blocks(T, gs), MOE_ROUTER_CUDA_THREADS, 0, stream>>>(
            S, rank, T, E, gs, a->expert, a->weight, a->slot);
        MOE_ROUTER_LAUNCHED(ec_assign_groups_kernel);
    } else {
        /* Seed mode builds its masked logit rows in S, which no one reads again. */
        ec_assign_kernel<<<moe_router_cuda_row_blocks((size_t)T), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
            a->logits, S, rank, T, E, k_out, owns_capacity, owns_capacity ? NULL : S, a->expert, a->weight,
            a->slot);
        MOE_ROUTER_LAUNCHED(ec_assign_kernel);
    }
    return MOE_OK;
}

/* The selection is piecewise constant in the logits; the gradient flows
 * through the weights of the chosen assignments only (expert_choice.c). */
static moe_status ec_cuda_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const ec_state *s = (const ec_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = ec_cuda_check_common(s, ctx, a->T, a->E, a->k_out, a->logits);
    if (st != MOE_OK || a->T == 0) return st;
    const int32_t T = a->T, E = s->E, k_out = ec_k_out(s);
    if (!a->expert || !a->weight || !a->dweight || !a->dlogits)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "backward: expert, weight, dweight and dlogits must not be NULL");
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    st = ec_cuda_check_values(ctx, stream, a->logits, T, E, a->expert, k_out);
    if (st != MOE_OK) return st;

    const int owns_capacity = s->max_per_token == 0;
    const int gs = ec_group_size(E);
    if (owns_capacity && gs > 0) {
        ec_backward_groups_kernel<<<ec_group_blocks(T, gs), MOE_ROUTER_CUDA_THREADS, 0, stream>>>(
            a->logits, a->expert, a->dweight, T, E, gs, a->dlogits);
        MOE_ROUTER_LAUNCHED(ec_backward_groups_kernel);
    } else {
        float *S = (float *)((char *)ctx->workspace + ec_layout_for(s, T).S);
        ec_backward_kernel<<<moe_router_cuda_row_blocks((size_t)T), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
            a->logits, a->expert, a->weight, a->dweight, T, E, k_out, owns_capacity, S, a->dlogits);
        MOE_ROUTER_LAUNCHED(ec_backward_kernel);
    }
    return MOE_OK;
}

extern "C" {
extern const moe_router_impl expert_choice_cuda_impl;
const moe_router_impl expert_choice_cuda_impl = {ec_cuda_forward, ec_cuda_backward};
}
