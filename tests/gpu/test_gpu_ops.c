/*
 * The CUDA backend against the CPU backend, op by op.
 *
 * For every op of the moe_backend table: fresh random inputs, the CPU op and
 * the CUDA op (fp32; the GEMMs also in bf16 mode), then
 *   - float outputs compared by the norm-wise relative error
 *     ||gpu - cpu|| / ||cpu|| (TOL_EW for elementwise ops, norms, reductions
 *     and the MoE ops; TOL_MM for GEMMs and attention, whose long sums are
 *     ordered differently; TOL_BF16 for the bf16 GEMMs);
 *   - integer outputs (capacity, argmax) and dropout compared exactly;
 *   - determinism: each op runs twice on the GPU, the outputs must be
 *     bitwise equal.
 * GPU outputs are poisoned before each run (floats: 0xFF bytes, a NaN;
 * integers: 0x5A bytes, since -1 is a legitimate value), so an element the
 * kernel forgot to write shows up as a NaN or a wild integer.
 *
 * Sizes: the model's (T = 2048 tokens as B = 8 x S = 256, d = 256, 4 heads,
 * E = 8, K = 2, V = 80), an odd one (T = 999, d = 200, hd = 50, K = 3) that
 * matches no block size, and T = 1.
 *
 * The ops whose results stay on the device (capacity counts in device
 * arrays, aux_losses_counts, check_routing's record, kept mask and counts
 * for every fault bad_router.c can make, duplicates of three claimants and
 * gaps in slots declared dense (also for E > 2048 and T = 0), check_bytes,
 * xent_sums,
 * clip_grad_norm) are compared with the CPU the same way: records, masks and
 * counts exactly. from_host's pinned staging is checked by many small copies
 * whose source is overwritten at once.
 *
 * Every test starts on fresh backends, so each op's first call (nothing
 * allocated yet) is tested as well as its second; capacity_assign also
 * runs as the first call of a backend on the model's shapes.
 *
 * The timing ops (events, measured GEMM rate) are checked for plausible
 * values only.
 *
 * Output: one line per compared output, "PASS|FAIL <size>/<op>.<output>
 * <rel_err>", and on failure what is needed to diagnose it (size, first bad
 * index, expected vs got, largest error). The last line is "N passed, M
 * failed"; the exit status is non-zero on any failure, and 77 (skipped) when
 * no CUDA device is present. MOE_TEST_SEED=<n> repeats a run's inputs.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "test_util.h"

#define TOL_EW 1e-5   /* elementwise, norms, reductions, MoE ops, loss, optimizer */
#define TOL_MM 1e-4   /* fp32 GEMMs and attention */
#define TOL_BF16 1e-2 /* GEMMs with bf16 operands */
#define TOL_SUMSQ 1e-9 /* double-precision sum of squares */

#define POISON_F32 0xFF /* 0xFFFFFFFF is a NaN */
#define POISON_I32 0x5A /* 0x5A5A5A5A: no valid index, unlike -1 */

typedef struct cfg {
    const char *name;
    int B, S, d, H, E, K, V, hidden;
} cfg;

static moe_backend *cpu, *gpu, *gpu16; /* gpu16: bf16 GEMMs */
static moe_test_rng rng;
static const cfg *cur;      /* the size being tested, for the output lines */
static const cfg *cfgs_first; /* the first size: extra attention shapes run there */
static int need_reset;      /* a CUDA error was seen: re-create the GPU backends */

/* ------------------------------------------------------------------ */
/* Memory bookkeeping: everything a test allocates is freed after it    */
/* ------------------------------------------------------------------ */

#define MAX_BUFS 512
static void *host_bufs[MAX_BUFS];
static int n_host;
static void *dev_bufs[MAX_BUFS];
static moe_backend *dev_owner[MAX_BUFS];
static int n_dev;

static void *halloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p || n_host == MAX_BUFS) {
        fprintf(stderr, "test_gpu_ops: out of host memory or buffer slots\n");
        exit(2);
    }
    host_bufs[n_host++] = p;
    return p;
}

static void *dalloc(moe_backend *g, size_t bytes) {
    void *p = g->alloc(g, bytes);
    if (!p || n_dev == MAX_BUFS) {
        fprintf(stderr, "test_gpu_ops: device allocation of %zu bytes failed\n", bytes);
        exit(2);
    }
    dev_owner[n_dev] = g;
    dev_bufs[n_dev++] = p;
    return p;
}

static void free_all(void) {
    for (int i = 0; i < n_host; ++i) free(host_bufs[i]);
    n_host = 0;
    for (int i = 0; i < n_dev; ++i) dev_owner[i]->free(dev_owner[i], dev_bufs[i]);
    n_dev = 0;
}

static float *hrand(size_t n, float lo, float hi) {
    float *x = halloc(n * sizeof *x);
    moe_test_fill(&rng, x, n, lo, hi);
    return x;
}

static void *hdup(const void *src, size_t bytes) {
    void *p = halloc(bytes);
    if (bytes) memcpy(p, src, bytes);
    return p;
}

/* device copy of host data */
static void *up(moe_backend *g, const void *h, size_t bytes) {
    void *d = dalloc(g, bytes);
    g->from_host(g, d, h, bytes);
    return d;
}

/* host copy of device data */
static void *down(moe_backend *g, const void *d, size_t bytes) {
    void *h = halloc(bytes);
    g->to_host(g, h, d, bytes);
    return h;
}

static void poison(moe_backend *g, void *d, size_t bytes, int byte) {
    void *h = malloc(bytes ? bytes : 1);
    memset(h, byte, bytes);
    g->from_host(g, d, h, bytes);
    free(h);
}

/* a device buffer full of poison */
static void *dpoison(moe_backend *g, size_t bytes, int byte) {
    void *d = dalloc(g, bytes);
    poison(g, d, bytes, byte);
    return d;
}

/* ------------------------------------------------------------------ */
/* Reporting                                                           */
/* ------------------------------------------------------------------ */

static void pass_line(const char *op, const char *fmt_value, double value) {
    ++moe_test_passed_;
    printf("PASS %s/%s ", cur->name, op);
    printf(fmt_value, value);
    putchar('\n');
}

static void fail_line(const char *op, const char *fmt_value, double value) {
    ++moe_test_failed_;
    printf("FAIL %s/%s ", cur->name, op);
    printf(fmt_value, value);
    putchar('\n');
}

/* After a GPU op: did the backend record an error? */
static int gpu_ok(moe_backend *g, const char *op) {
    char msg[600];
    if (moe_cuda_backend_check(g, msg, sizeof msg) == 0) return 1;
    ++moe_test_failed_;
    printf("FAIL %s/%s cuda-error\n  %s\n", cur->name, op, msg);
    need_reset = 1;
    return 0;
}

/* Norm-wise relative error of got against want; fails on rel > tol or on a
 * non-finite value where the CPU has a finite one (an unwritten element). */
static void report_f32(const char *op, const float *got, const float *want, size_t n, double tol) {
    double num = 0.0, den = 0.0, max_abs = 0.0;
    size_t imax = 0, nonfinite = 0, first_nonfinite = 0;
    for (size_t i = 0; i < n; ++i) {
        double g = got[i], w = want[i];
        if (!isfinite(g) != !isfinite(w) || !isnan(g) != !isnan(w)) {
            if (!nonfinite++) first_nonfinite = i;
            continue;
        }
        if (!isfinite(w)) continue; /* both non-finite alike: nothing to measure */
        double diff = fabs(g - w);
        num += diff * diff;
        den += w * w;
        if (diff > max_abs) {
            max_abs = diff;
            imax = i;
        }
    }
    double rel = den > 0.0 ? sqrt(num / den) : sqrt(num);
    if (nonfinite == 0 && rel <= tol) {
        pass_line(op, "%.3e", rel);
        return;
    }
    fail_line(op, "%.3e", rel);
    printf("  n = %zu, tolerance %.1e (norm-wise relative)\n", n, tol);
    if (nonfinite)
        printf("  %zu element(s) non-finite on one side only; first at [%zu]: expected %.9g got %.9g\n",
               nonfinite, first_nonfinite, want[first_nonfinite], got[first_nonfinite]);
    /* the first element whose error is large against the output's scale */
    double rms = n ? sqrt(den / (double)n) : 0.0;
    size_t nbad = 0, first_bad = 0;
    for (size_t i = 0; i < n; ++i) {
        double g = got[i], w = want[i];
        if (!isfinite(g) || !isfinite(w)) continue;
        if (fabs(g - w) > tol * (fabs(w) + rms) && !nbad++) first_bad = i;
    }
    if (nbad)
        printf("  %zu element(s) off by more than tol*(|expected|+rms); first at [%zu]: expected %.9g got %.9g\n",
               nbad, first_bad, want[first_bad], got[first_bad]);
    if (n)
        printf("  largest abs error %.3e at [%zu]: expected %.9g got %.9g\n", max_abs, imax, want[imax],
               got[imax]);
}

static void report_i32(const char *op, const int32_t *got, const int32_t *want, size_t n) {
    size_t nbad = 0, first = 0;
    for (size_t i = 0; i < n; ++i)
        if (got[i] != want[i] && !nbad++) first = i;
    if (!nbad) {
        pass_line(op, "%.0f", 0.0);
        return;
    }
    fail_line(op, "%.0f", (double)nbad);
    printf("  %zu of %zu integers differ (exact compare); first at [%zu]: expected %d got %d\n", nbad, n,
           first, want[first], got[first]);
}

/* Bitwise equality (dropout, and the determinism of every op). */
static void report_bits(const char *op, const void *got, const void *want, size_t n, size_t elem) {
    const unsigned char *a = got, *b = want;
    size_t nbad = 0, first = 0;
    for (size_t i = 0; i < n; ++i)
        if (memcmp(a + i * elem, b + i * elem, elem) != 0 && !nbad++) first = i;
    if (!nbad) {
        pass_line(op, "%.0f", 0.0);
        return;
    }
    fail_line(op, "%.0f", (double)nbad);
    printf("  %zu of %zu elements differ bitwise; first at [%zu]", nbad, n, first);
    if (elem == 4) { /* floats: show values and bits */
        float fa, fb;
        uint32_t ua, ub;
        memcpy(&fa, a + first * elem, 4);
        memcpy(&fb, b + first * elem, 4);
        memcpy(&ua, a + first * elem, 4);
        memcpy(&ub, b + first * elem, 4);
        printf(": expected %.9g (bits %08x) got %.9g (bits %08x)", fb, (unsigned)ub, fa, (unsigned)ua);
    }
    putchar('\n');
}

/* run 0 against run 1 of the same GPU op */
static void report_repeat(const char *op, const void *run0, const void *run1, size_t n, size_t elem) {
    char name[256];
    snprintf(name, sizeof name, "%s:repeat", op);
    report_bits(name, run1, run0, n, elem);
}

/* compare with the CPU, then with the second GPU run */
static void check_f32(const char *op, float *const got[2], const float *want, size_t n, double tol) {
    report_f32(op, got[0], want, n, tol);
    report_repeat(op, got[0], got[1], n, sizeof(float));
}

static void check_i32(const char *op, int32_t *const got[2], const int32_t *want, size_t n) {
    report_i32(op, got[0], want, n);
    report_repeat(op, got[0], got[1], n, sizeof(int32_t));
}

static int T_of(const cfg *c) { return c->B * c->S; }

/* ------------------------------------------------------------------ */
/* Dense linear algebra                                                */
/* ------------------------------------------------------------------ */

/* C[M,N] = alpha op(A) op(B) + beta C, row-major, every operand with `pad`
 * extra columns (ld > width) so wrong leading dimensions show. The padding
 * of C must be left alone. With beta = 0 the GPU's C starts as NaN, which
 * must not leak into the result. */
static void test_gemm_case(moe_backend *g, const char *tag, int ta, int tb, int M, int N, int K,
                           float alpha, float beta, int pad, double tol) {
    const int a_rows = ta ? K : M, a_cols = ta ? M : K, lda = a_cols + pad;
    const int b_rows = tb ? N : K, b_cols = tb ? K : N, ldb = b_cols + pad;
    const int ldc = N + pad;
    const size_t nA = (size_t)a_rows * lda, nB = (size_t)b_rows * ldb, nC = (size_t)M * ldc;
    float *A = hrand(nA, -1, 1), *B = hrand(nB, -1, 1), *C0 = hrand(nC, -1, 1);
    float *want = hdup(C0, nC * sizeof(float));
    cpu->gemm(cpu, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, want, ldc);

    float *dA = up(g, A, nA * sizeof(float)), *dB = up(g, B, nB * sizeof(float));
    float *got[2], *init = NULL;
    char op[128];
    snprintf(op, sizeof op, "%s(ta=%d,tb=%d,M=%d,N=%d,K=%d,alpha=%g,beta=%g,pad=%d)", tag, ta, tb, M, N,
             K, alpha, beta, pad);
    for (int r = 0; r < 2; ++r) {
        float *dC;
        if (beta == 0.0f) {
            dC = dpoison(g, nC * sizeof(float), POISON_F32);
        } else {
            dC = up(g, C0, nC * sizeof(float));
        }
        if (!init) init = down(g, dC, nC * sizeof(float));
        g->gemm(g, ta, tb, M, N, K, alpha, dA, lda, dB, ldb, beta, dC, ldc);
        if (!gpu_ok(g, op)) return;
        got[r] = down(g, dC, nC * sizeof(float));
    }
    /* compare the M x N part; the padding must still hold its initial bytes */
    float *g0 = halloc((size_t)M * N * sizeof(float)), *g1 = halloc((size_t)M * N * sizeof(float));
    float *w = halloc((size_t)M * N * sizeof(float));
    size_t pad_touched = 0;
    for (int i = 0; i < M; ++i) {
        memcpy(g0 + (size_t)i * N, got[0] + (size_t)i * ldc, (size_t)N * sizeof(float));
        memcpy(g1 + (size_t)i * N, got[1] + (size_t)i * ldc, (size_t)N * sizeof(float));
        memcpy(w + (size_t)i * N, want + (size_t)i * ldc, (size_t)N * sizeof(float));
        if (memcmp(got[0] + (size_t)i * ldc + N, init + (size_t)i * ldc + N, (size_t)pad * sizeof(float)))
            ++pad_touched;
    }
    float *gg[2] = {g0, g1};
    check_f32(op, gg, w, (size_t)M * N, tol);
    if (pad_touched) {
        char name[256];
        snprintf(name, sizeof name, "%s:padding", op);
        fail_line(name, "%.0f", (double)pad_touched);
        printf("  %zu row(s) of C had their padding (columns >= N) overwritten\n", pad_touched);
    }
}

/* Batched: `batch` products at strides of one matrix plus `gap` elements;
 * shareB gives B a stride of 0 (one B for the whole batch). */
static void test_gemm_batched_case(moe_backend *g, const char *tag, int ta, int tb, int M, int N,
                                   int K, int batch, float alpha, float beta, int gap, int shareB,
                                   double tol) {
    const int a_rows = ta ? K : M, a_cols = ta ? M : K;
    const int b_rows = tb ? N : K, b_cols = tb ? K : N;
    const long long sA = (long long)a_rows * a_cols + gap;
    const long long sB = shareB ? 0 : (long long)b_rows * b_cols + gap;
    const long long sC = (long long)M * N + gap;
    const size_t nA = (size_t)sA * batch, nC = (size_t)sC * batch;
    const size_t nB = shareB ? (size_t)b_rows * b_cols : (size_t)sB * batch;
    float *A = hrand(nA, -1, 1), *B = hrand(nB, -1, 1), *C0 = hrand(nC, -1, 1);
    float *want = hdup(C0, nC * sizeof(float));
    cpu->gemm_strided_batched(cpu, ta, tb, M, N, K, alpha, A, a_cols, sA, B, b_cols, sB, beta, want, N,
                              sC, batch);
    float *dA = up(g, A, nA * sizeof(float)), *dB = up(g, B, nB * sizeof(float));
    float *got[2];
    char op[160];
    snprintf(op, sizeof op, "%s(ta=%d,tb=%d,M=%d,N=%d,K=%d,batch=%d,alpha=%g,beta=%g,gap=%d%s)", tag, ta,
             tb, M, N, K, batch, alpha, beta, gap, shareB ? ",strideB=0" : "");
    for (int r = 0; r < 2; ++r) {
        float *dC = up(g, C0, nC * sizeof(float));
        if (beta == 0.0f) /* C is not read: poison the products, keep the gaps' values */
            for (int b = 0; b < batch; ++b)
                poison(g, dC + (size_t)b * sC, (size_t)M * N * sizeof(float), POISON_F32);
        g->gemm_strided_batched(g, ta, tb, M, N, K, alpha, dA, a_cols, sA, dB, b_cols, sB, beta, dC, N, sC,
                                batch);
        if (!gpu_ok(g, op)) return;
        got[r] = down(g, dC, nC * sizeof(float));
    }
    /* the gaps hold C0 on both sides, so the whole buffer compares */
    check_f32(op, got, want, nC, tol);
}

static void test_gemm(const cfg *c) {
    const int T = T_of(c), d = c->d;
    for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb) {
            test_gemm_case(gpu, "gemm", ta, tb, T, 3 * d, d, 1.0f, 0.0f, 0, TOL_MM);
            test_gemm_case(gpu16, "gemm_bf16", ta, tb, T, 3 * d, d, 1.0f, 0.0f, 0, TOL_BF16);
        }
    /* accumulate into C, scaled, with padded leading dimensions */
    test_gemm_case(gpu, "gemm", 0, 1, T, c->hidden, d, 0.5f, 0.75f, 3, TOL_MM);
    test_gemm_case(gpu, "gemm", 1, 0, d, c->hidden, T, -1.0f, 1.0f, 5, TOL_MM);
    test_gemm_case(gpu16, "gemm_bf16", 0, 1, T, c->hidden, d, 0.5f, 0.75f, 3, TOL_BF16);
    test_gemm_case(gpu16, "gemm_bf16", 1, 0, d, c->hidden, T, -1.0f, 1.0f, 5, TOL_BF16);
    /* the gate's shapes (fp32 in both modes: cuda_skinny_gemm.cu), with and
     * without accumulation and padding, and widths 1 and 16 at the edges */
    for (int beta = 0; beta < 2; ++beta)
        for (int pad = 0; pad < 4; pad += 3) {
            test_gemm_case(gpu16, "gemm_gate", 0, 0, T, c->E, d, 1.0f, (float)beta, pad, TOL_MM);
            test_gemm_case(gpu16, "gemm_gate", 1, 0, d, c->E, T, 1.0f, (float)beta, pad, TOL_MM);
            test_gemm_case(gpu16, "gemm_gate", 0, 1, T, d, c->E, 1.0f, (float)beta, pad, TOL_MM);
            test_gemm_case(gpu, "gemm_gate", 0, 0, T, c->E, d, 0.5f, (float)beta, pad, TOL_MM);
            test_gemm_case(gpu, "gemm_gate", 1, 0, d, c->E, T, -1.0f, (float)beta, pad, TOL_MM);
            test_gemm_case(gpu, "gemm_gate", 0, 1, T, d, c->E, 2.0f, (float)beta, pad, TOL_MM);
        }
    test_gemm_case(gpu, "gemm_gate", 0, 0, T, 1, d, 1.0f, 0.0f, 1, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 1, 0, d, 16, T, 1.0f, 1.0f, 0, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 0, 1, T, d, 16, 1.0f, 0.0f, 2, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 1, 0, 37, 3, 300, 1.0f, 0.0f, 1, TOL_MM); /* a short K: cuBLAS */
    if (c != cfgs_first) return;
    /* the 16-byte paths at the edge widths and at odd widths, with a
     * partial last tile and chunk of dW, and the expC shape (T = 8192) */
    test_gemm_case(gpu, "gemm_gate", 0, 0, T, 1, d, 1.0f, 0.0f, 0, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 0, 0, T, 16, d, -0.5f, 1.0f, 0, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 0, 0, 77, 5, 1000, 1.0f, 0.0f, 0, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 1, 0, 100, 5, 1000, 1.0f, 1.0f, 0, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 1, 0, 36, 3, 1300, 2.0f, 0.0f, 0, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 1, 0, 36, 1, 777, 1.0f, 0.0f, 0, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 0, 0, 8192, 8, 256, 1.0f, 0.0f, 0, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 1, 0, 256, 8, 8192, 1.0f, 1.0f, 0, TOL_MM);
    free_all(); /* many cases in one test: keep within the buffer slots */
    /* dx: the expC shape, a partial last column tile (16-byte and single
     * columns), a partial last row block, K = 1 */
    test_gemm_case(gpu, "gemm_gate", 0, 1, 8192, 256, 8, 1.0f, 1.0f, 0, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 0, 1, 77, 300, 5, 1.0f, 1.0f, 0, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 0, 1, 100, 1001, 3, -0.5f, 0.0f, 0, TOL_MM);
    test_gemm_case(gpu, "gemm_gate", 0, 1, 33, 64, 1, 1.0f, 1.0f, 1, TOL_MM);
}

static void test_gemm_batched(const cfg *c) {
    const int T = T_of(c), d = c->d, h = c->hidden, E = c->E;
    /* expert capacity at capacity factor 1.25 */
    const int C = (int)ceil(1.25 * T * c->K / E);
    /* the expert forward (Xe w1) and the two backward products */
    test_gemm_batched_case(gpu, "gemm_batched", 0, 0, C, h, d, E, 1.0f, 0.0f, 0, 0, TOL_MM);
    test_gemm_batched_case(gpu, "gemm_batched", 0, 1, C, d, h, E, 1.0f, 0.0f, 0, 0, TOL_MM);
    test_gemm_batched_case(gpu, "gemm_batched", 1, 0, d, h, C, E, 1.0f, 1.0f, 0, 0, TOL_MM);
    test_gemm_batched_case(gpu, "gemm_batched", 1, 1, h, d, C, E, 0.5f, -0.25f, 7, 0, TOL_MM);
    test_gemm_batched_case(gpu, "gemm_batched", 0, 0, C, h, d, E, 1.0f, 0.0f, 0, 1, TOL_MM);
    test_gemm_batched_case(gpu16, "gemm_batched_bf16", 0, 0, C, h, d, E, 1.0f, 0.0f, 0, 0, TOL_BF16);
    test_gemm_batched_case(gpu16, "gemm_batched_bf16", 0, 1, C, d, h, E, 1.0f, 0.0f, 0, 0, TOL_BF16);
    test_gemm_batched_case(gpu16, "gemm_batched_bf16", 1, 0, d, h, C, E, 1.0f, 1.0f, 0, 0, TOL_BF16);
    test_gemm_batched_case(gpu16, "gemm_batched_bf16", 1, 1, h, d, C, E, 0.5f, -0.25f, 7, 1, TOL_BF16);
}

/* gemm_bias: C = op(A) op(B) + bias (+ residual) over `batch` products.
 * `gap` extra elements between products, `pad` extra columns in every
 * leading dimension, `off` elements of misalignment of every pointer (fp32
 * operands are handed to cuBLASLt as they are), shareB a stride of 0 for B,
 * bias_mode 0 no bias, 1 one per product, 2 one for all; with_res a random
 * residual laid out as C (misaligned by off too). C starts random: an
 * element left unwritten, or a gap or padding overwritten, shows. */
static void test_gemm_bias_case(moe_backend *g, const char *tag, int ta, int tb, int M, int N, int K,
                                int batch, int gap, int pad, int off, int shareB, int bias_mode,
                                int with_res, double tol) {
    const int a_rows = ta ? K : M, a_cols = ta ? M : K, lda = a_cols + pad;
    const int b_rows = tb ? N : K, b_cols = tb ? K : N, ldb = b_cols + pad;
    const int ldc = N + pad;
    const long long sA = (long long)a_rows * lda + gap;
    const long long sB = shareB ? 0 : (long long)b_rows * ldb + gap;
    const long long sC = (long long)M * ldc + gap;
    const long long sbias = bias_mode == 1 ? N + gap : 0;
    const size_t nA = (size_t)sA * batch + off, nC = (size_t)sC * batch + off;
    const size_t nB = (shareB ? (size_t)b_rows * ldb : (size_t)sB * batch) + off;
    const size_t nbias = (bias_mode == 1 ? (size_t)sbias * batch : (size_t)N) + off;
    float *A = hrand(nA, -1, 1), *B = hrand(nB, -1, 1), *C0 = hrand(nC, -1, 1), *bias = hrand(nbias, -1, 1);
    float *res = hrand(nC, -2, 2);
    float *want = hdup(C0, nC * sizeof(float));
    cpu->gemm_bias(cpu, ta, tb, M, N, K, A + off, lda, sA, B + off, ldb, sB, bias_mode ? bias + off : NULL,
                   sbias, with_res ? res + off : NULL, want + off, ldc, sC, batch);
    float *dA = up(g, A, nA * sizeof(float)), *dB = up(g, B, nB * sizeof(float));
    float *dbias = up(g, bias, nbias * sizeof(float)), *dres = up(g, res, nC * sizeof(float));
    float *got[2];
    char op[200];
    snprintf(op, sizeof op, "%s(ta=%d,tb=%d,M=%d,N=%d,K=%d,batch=%d,gap=%d,pad=%d,off=%d%s,bias=%s%s)", tag,
             ta, tb, M, N, K, batch, gap, pad, off, shareB ? ",strideB=0" : "",
             bias_mode == 0 ? "none" : bias_mode == 1 ? "each" : "shared", with_res ? ",residual" : "");
    for (int r = 0; r < 2; ++r) {
        float *dC = up(g, C0, nC * sizeof(float));
        g->gemm_bias(g, ta, tb, M, N, K, dA + off, lda, sA, dB + off, ldb, sB, bias_mode ? dbias + off : NULL,
                     sbias, with_res ? dres + off : NULL, dC + off, ldc, sC, batch);
        if (!gpu_ok(g, op)) return;
        got[r] = down(g, dC, nC * sizeof(float));
    }
    check_f32(op, got, want, nC, tol);
}

static void test_gemm_bias(const cfg *c) {
    const int T = T_of(c), d = c->d, h = c->hidden, E = c->E;
    const int C = (int)ceil(1.25 * T * c->K / E);
    struct {
        moe_backend *g;
        const char *tag;
        double tol;
    } precisions[2] = {{gpu, "gemm_bias", TOL_MM}, {gpu16, "gemm_bias_bf16", TOL_BF16}};
    for (int p = 0; p < 2; ++p) {
        moe_backend *g = precisions[p].g;
        const char *tag = precisions[p].tag;
        const double tol = precisions[p].tol;
        /* the model's calls: the experts' two products, the attention
         * projections (the output one with its residual) */
        test_gemm_bias_case(g, tag, 0, 0, C, h, d, E, 0, 0, 0, 0, 1, 0, tol);
        test_gemm_bias_case(g, tag, 0, 0, C, d, h, E, 0, 0, 0, 0, 1, 0, tol);
        test_gemm_bias_case(g, tag, 0, 0, T, 3 * d, d, 1, 0, 0, 0, 0, 1, 0, tol);
        test_gemm_bias_case(g, tag, 0, 0, T, d, d, 1, 0, 0, 0, 0, 1, 1, tol);
        test_gemm_bias_case(g, tag, 0, 0, T, d, d, 1, 0, 0, 0, 0, 1, 0, tol);
        test_gemm_bias_case(g, tag, 0, 0, C, d, h, E, 0, 0, 0, 0, 0, 0, tol);
        /* transposes, gaps, padding, misaligned pointers, shared operands */
        test_gemm_bias_case(g, tag, 1, 0, d, h, C, E, 5, 0, 0, 0, 1, 0, tol);
        test_gemm_bias_case(g, tag, 0, 1, C, h, d, E, 0, 3, 0, 0, 2, 0, tol);
        test_gemm_bias_case(g, tag, 1, 1, h, d, C, E, 7, 1, 1, 1, 1, 0, tol);
        test_gemm_bias_case(g, tag, 0, 0, T, d + 1, d, 1, 0, 2, 1, 0, 1, 0, tol);
        test_gemm_bias_case(g, tag, 0, 0, 5, 3, 0, 2, 1, 0, 0, 0, 1, 0, tol); /* K = 0: C = bias */
        /* a residual with gaps, padding, misalignment; without a bias; K = 0 */
        test_gemm_bias_case(g, tag, 1, 1, h, d, C, E, 7, 1, 1, 1, 1, 1, tol);
        test_gemm_bias_case(g, tag, 0, 1, C, h, d, E, 3, 2, 0, 0, 2, 1, tol);
        test_gemm_bias_case(g, tag, 0, 0, T, d + 1, d, 1, 0, 2, 1, 0, 0, 1, tol);
        test_gemm_bias_case(g, tag, 0, 0, 5, 3, 0, 2, 1, 0, 0, 0, 1, 1, tol); /* K = 0: bias + residual */
    }
}

/* The experts' MLP, forward and backward, against the CPU's composition of
 * plain ops (composed_ops.c); in bf16 mode CUDA takes its fused path
 * (cuda_ffn.cu). Outputs are poisoned, accumulated gradients start from
 * random values (dw1 and dw2 are poisoned when accumulate_dw is 0: written
 * over). fwd_bias: b1 and b2 given to the forward; bwd_bias: db1 and db2
 * asked of the backward (the contract lets either be absent without the
 * other). */
static void test_ffn_case(moe_backend *g, const char *tag, moe_act_kind kind, int fwd_bias, int bwd_bias, int batch,
                          int C, int d, int n, int accumulate_dw, double tol) {
    const int hin = kind == MOE_ACT_SWIGLU ? 2 * n : n;
    const size_t nX = (size_t)batch * C * d, nw1 = (size_t)batch * d * hin, nw2 = (size_t)batch * n * d;
    const size_t nb1 = (size_t)batch * hin, nb2 = (size_t)batch * d;
    const size_t nH = (size_t)batch * C * hin, nA = (size_t)batch * C * n;
    float *X = hrand(nX, -1, 1), *w1 = hrand(nw1, -0.1f, 0.1f), *w2 = hrand(nw2, -0.05f, 0.05f);
    float *b1 = hrand(nb1, -0.5f, 0.5f), *b2 = hrand(nb2, -0.5f, 0.5f), *dY = hrand(nX, -1, 1);
    float *dw1_0 = hrand(nw1, -1, 1), *db1_0 = hrand(nb1, -1, 1), *dw2_0 = hrand(nw2, -1, 1);
    float *db2_0 = hrand(nb2, -1, 1);
    float *H = halloc(nH * sizeof(float)), *A = halloc(nA * sizeof(float)), *Y = halloc(nX * sizeof(float));
    float *dA = halloc(nA * sizeof(float)), *dH = halloc(nH * sizeof(float)), *dX = halloc(nX * sizeof(float));
    float *dw1 = hdup(dw1_0, nw1 * sizeof(float)), *db1 = hdup(db1_0, nb1 * sizeof(float));
    float *dw2 = hdup(dw2_0, nw2 * sizeof(float)), *db2 = hdup(db2_0, nb2 * sizeof(float));
    cpu->ffn_fwd(cpu, kind, X, w1, fwd_bias ? b1 : NULL, w2, fwd_bias ? b2 : NULL, H, A, Y, batch, C, d, n);
    cpu->ffn_bwd(cpu, kind, X, w1, w2, H, A, dY, dA, dH, dX, dw1, bwd_bias ? db1 : NULL, dw2,
                 bwd_bias ? db2 : NULL, batch, C, d, n, accumulate_dw);

    float *gX = up(g, X, nX * sizeof(float)), *gw1 = up(g, w1, nw1 * sizeof(float));
    float *gw2 = up(g, w2, nw2 * sizeof(float)), *gb1 = up(g, b1, nb1 * sizeof(float));
    float *gb2 = up(g, b2, nb2 * sizeof(float)), *gdY = up(g, dY, nX * sizeof(float));
    float *got_Y[2], *got_dX[2], *got_dw1[2], *got_db1[2], *got_dw2[2], *got_db2[2];
    char op[160];
    snprintf(op, sizeof op, "%s(%s%s%s%s,batch=%d,C=%d,d=%d,n=%d)", tag,
             kind == MOE_ACT_GELU ? "gelu" : kind == MOE_ACT_SILU ? "silu" : "swiglu", fwd_bias ? ",bias" : "",
             bwd_bias ? ",dbias" : "", accumulate_dw ? "" : ",dw written over", batch, C, d, n);
    for (int r = 0; r < 2; ++r) {
        float *gH = dpoison(g, nH * sizeof(float), POISON_F32), *gA = dpoison(g, nA * sizeof(float), POISON_F32);
        float *gY = dpoison(g, nX * sizeof(float), POISON_F32), *gdX = dpoison(g, nX * sizeof(float), POISON_F32);
        float *gdA = dpoison(g, nA * sizeof(float), POISON_F32), *gdH = dpoison(g, nH * sizeof(float), POISON_F32);
        float *gdw1 = accumulate_dw ? up(g, dw1_0, nw1 * sizeof(float)) : dpoison(g, nw1 * sizeof(float), POISON_F32);
        float *gdw2 = accumulate_dw ? up(g, dw2_0, nw2 * sizeof(float)) : dpoison(g, nw2 * sizeof(float), POISON_F32);
        float *gdb1 = up(g, db1_0, nb1 * sizeof(float)), *gdb2 = up(g, db2_0, nb2 * sizeof(float));
        g->ffn_fwd(g, kind, gX, gw1, fwd_bias ? gb1 : NULL, gw2, fwd_bias ? gb2 : NULL, gH, gA, gY, batch, C, d, n);
        g->ffn_bwd(g, kind, gX, gw1, gw2, gH, gA, gdY, gdA, gdH, gdX, gdw1, bwd_bias ? gdb1 : NULL, gdw2,
                   bwd_bias ? gdb2 : NULL, batch, C, d, n, accumulate_dw);
        if (!gpu_ok(g, op)) return;
        got_Y[r] = down(g, gY, nX * sizeof(float)), got_dX[r] = down(g, gdX, nX * sizeof(float));
        got_dw1[r] = down(g, gdw1, nw1 * sizeof(float)), got_db1[r] = down(g, gdb1, nb1 * sizeof(float));
        got_dw2[r] = down(g, gdw2, nw2 * sizeof(float)), got_db2[r] = down(g, gdb2, nb2 * sizeof(float));
    }
    const struct {
        const char *name;
        float **got;
        const float *want;
        size_t n;
    } outs[] = {{"Y", got_Y, Y, nX},       {"dX", got_dX, dX, nX},     {"dw1", got_dw1, dw1, nw1},
                {"db1", got_db1, db1, nb1}, {"dw2", got_dw2, dw2, nw2}, {"db2", got_db2, db2, nb2}};
    for (size_t i = 0; i < sizeof outs / sizeof outs[0]; ++i) {
        char name[200];
        snprintf(name, sizeof name, "%s.%s", op, outs[i].name);
        check_f32(name, outs[i].got, outs[i].want, outs[i].n, tol);
    }
    free_all(); /* many cases in one test: keep within the buffer slots */
}

static void test_ffn(const cfg *c) {
    const int T = T_of(c), E = c->E, C = (int)ceil(1.25 * T * c->K / E);
    for (int kind = 0; kind < 3; ++kind) {
        const int with_bias = kind != MOE_ACT_SILU;
        test_ffn_case(gpu, "ffn", (moe_act_kind)kind, with_bias, with_bias, E, C, c->d, c->hidden, 1, TOL_MM);
        test_ffn_case(gpu16, "ffn_bf16", (moe_act_kind)kind, with_bias, with_bias, E, C, c->d, c->hidden, 1, TOL_BF16);
    }
    /* GELU in bf16 with the other combinations of biases: the forward's
     * epilogue with and without b1, the backward with and without db1 */
    test_ffn_case(gpu16, "ffn_bf16", MOE_ACT_GELU, 0, 0, E, C, c->d, c->hidden, 1, TOL_BF16);
    test_ffn_case(gpu16, "ffn_bf16", MOE_ACT_GELU, 1, 0, E, C, c->d, c->hidden, 1, TOL_BF16);
    test_ffn_case(gpu16, "ffn_bf16", MOE_ACT_GELU, 0, 1, E, C, c->d, c->hidden, 1, TOL_BF16);
    /* many rows per expert: db2's sums have 130 chunks, so their staged
     * finish takes several rounds, the last a part; db1's have 33 */
    if (c == cfgs_first) test_ffn_case(gpu16, "ffn_bf16", MOE_ACT_GELU, 1, 1, 2, 8300, 32, 64, 1, TOL_BF16);
    /* odd sizes: no vector path, no 16-byte alignment of rows */
    test_ffn_case(gpu16, "ffn_bf16", MOE_ACT_GELU, 1, 1, 3, 37, 19, 23, 1, TOL_BF16);
    test_ffn_case(gpu16, "ffn_bf16", MOE_ACT_SWIGLU, 1, 1, 2, 5, 7, 9, 1, TOL_BF16);
    /* dw1 and dw2 written over (the first backward of a step) */
    test_ffn_case(gpu, "ffn", MOE_ACT_GELU, 1, 1, E, C, c->d, c->hidden, 0, TOL_MM);
    test_ffn_case(gpu16, "ffn_bf16", MOE_ACT_GELU, 1, 1, E, C, c->d, c->hidden, 0, TOL_BF16);
    test_ffn_case(gpu16, "ffn_bf16", MOE_ACT_SWIGLU, 1, 1, 2, 5, 7, 9, 0, TOL_BF16);
}

/* round_weights: the bf16 GEMM paths read the copies it makes of listed
 * weights instead of rounding them, and the results must be the same bits
 * as without copies (ffn_fwd/ffn_bwd, linear_bwd, gemm_bias, gemm with a
 * transposed weight); after the weights change and round_weights runs
 * again, the results follow the new weights (no stale copy). */
static void weight_ops(const float *P, int E, int C, int d, int n, int T, int N, float *const out[13]) {
    /* the parameter buffer: w1 [E,d,n] | w2 [E,n,d] | b1 [E,n] | W [d,N] | one float | W2 [d,37]
     * (W2: an odd width at an odd offset, where the copies take single elements) */
    const float *w1 = P, *w2 = w1 + (size_t)E * d * n, *b1 = w2 + (size_t)E * n * d, *W = b1 + (size_t)E * n;
    const float *W2 = W + (size_t)d * N + 1;
    (void)T;
    float *X = out[0], *H = out[1], *A = out[2], *Y = out[3], *dY = out[4], *dA = out[5], *dH = out[6];
    float *dX = out[7], *grads = out[8], *lin = out[9], *gb = out[10], *gt = out[11];
    float *dw1 = grads, *db1 = dw1 + (size_t)E * d * n, *dw2 = db1 + (size_t)E * n, *db2 = dw2 + (size_t)E * n * d;
    gpu16->ffn_fwd(gpu16, MOE_ACT_GELU, X, w1, b1, w2, NULL, H, A, Y, E, C, d, n);
    gpu16->ffn_bwd(gpu16, MOE_ACT_GELU, X, w1, w2, H, A, dY, dA, dH, dX, dw1, db1, dw2, db2, E, C, d, n, 1);
    /* linear_bwd over rows X [E*C, d] with W [d, N], dY's first E*C*N floats */
    float *ldX = lin, *ldW = ldX + (size_t)E * C * d, *ldb = ldW + (size_t)d * N;
    gpu16->linear_bwd(gpu16, X, W, dY, ldX, ldW, ldb, E * C, d, N);
    gpu16->gemm_bias(gpu16, 0, 0, E * C, N, d, X, d, 0, W, N, 0, b1, 0, NULL, gb, N, 0, 1);
    /* W as [N2, d] read transposed: the LM head's product (N2 = d here: W is [d, N] packed, viewed as N rows of d) */
    gpu16->gemm(gpu16, 0, 1, E * C, N, d, 1.0f, X, d, W, d, 0.0f, gt, N);
    gpu16->gemm(gpu16, 0, 0, E * C, 37, d, 1.0f, X, d, W2, 37, 0.0f, out[12], 37);
}

static void test_weight_copies(const cfg *c) {
    if (c != cfgs_first) return;
    const int E = 4, C = 96, d = 64, n = 128, N = 64;
    const size_t nP = (size_t)E * d * n * 2 + (size_t)E * n + (size_t)d * N + 1 + (size_t)d * 37;
    const size_t sizes[13] = {(size_t)E * C * d, (size_t)E * C * n, (size_t)E * C * n, (size_t)E * C * d,
                              (size_t)E * C * d, (size_t)E * C * n, (size_t)E * C * n, (size_t)E * C * d,
                              (size_t)E * d * n * 2 + (size_t)E * n + (size_t)E * d,
                              (size_t)E * C * d + (size_t)d * N + N, (size_t)E * C * N, (size_t)E * C * N,
                              (size_t)E * C * 37};
    const int64_t w_at = (int64_t)E * d * n * 2 + E * n;
    const moe_weight_view views[6] = {{0, E, d, n, 0},          {(int64_t)E * d * n, E, n, d, 0},
                                      {(int64_t)E * d * n * 2, E, 1, n, 0}, {w_at, 1, d, N, 0},
                                      {w_at, 1, N, d, 0},       {w_at + (int64_t)d * N + 1, 1, d, 37, 0}};
    const int nviews = 6;
    for (int round = 0; round < 2; ++round) { /* round 1: new weights after the copies were made */
        float *Ph = hrand(nP, -0.1f, 0.1f), *ins[13];
        for (int i = 0; i < 13; ++i) ins[i] = hrand(sizes[i], -1, 1);
        float *P = up(gpu16, Ph, nP * sizeof(float));
        float *res[2][13];
        for (int with = 0; with < 2; ++with) {
            if (with && round == 1) {
                /* copies of other values first, then the weights change and the copies are made again */
                float *old = hrand(nP, -0.1f, 0.1f);
                gpu16->from_host(gpu16, P, old, nP * sizeof(float));
                gpu16->round_weights(gpu16, P, views, nviews);
                gpu16->from_host(gpu16, P, Ph, nP * sizeof(float));
            }
            gpu16->round_weights(gpu16, P, views, with ? nviews : 0);
            float *outs[13];
            for (int i = 0; i < 13; ++i) outs[i] = up(gpu16, ins[i], sizes[i] * sizeof(float));
            weight_ops(P, E, C, d, n, 0, N, outs);
            if (!gpu_ok(gpu16, "round_weights")) return;
            for (int i = 0; i < 13; ++i) res[with][i] = down(gpu16, outs[i], sizes[i] * sizeof(float));
        }
        gpu16->round_weights(gpu16, NULL, NULL, 0);
        static const char *names[13] = {"X",     "H",          "A",         "Y",       "dY",     "dA",          "dH",
                                        "dX",    "grads",      "linear_bwd", "gemm_bias", "gemm_tb", "gemm_odd"};
        for (int i = 0; i < 13; ++i) {
            if (i == 0 || i == 4) continue; /* inputs */
            char op[96];
            snprintf(op, sizeof op, "round_weights(%s).%s = without copies", round ? "after a change" : "fresh", names[i]);
            report_bits(op, res[1][i], res[0][i], sizes[i], sizeof(float));
        }
    }
}

/* keep_activations: with the saved activations declared, LayerNorm,
 * attention and dispatch write their bf16 copies, the first GEMM to read an
 * uploaded buffer (x2) makes its copy, and every later GEMM (forward and
 * backward, as A or as B) reads the copies. Every result must be the bits
 * of the same ops without the declaration. Round 1 runs the whole sequence
 * once on other inputs first, then declares again and overwrites the
 * buffers: a copy of the earlier values must not be read. */
enum { ACT_B = 2, ACT_S = 128, ACT_D = 128, ACT_H = 2, ACT_E = 4, ACT_K = 2, ACT_C = 160, ACT_N = 256, ACT_V = 96 };
enum { ACT_T = ACT_B * ACT_S, ACT_NIN = 15, ACT_NOUT = 22 };

static void activation_ops(moe_backend *g, float *const in[ACT_NIN], float *const o[ACT_NOUT], const int32_t *kept,
                           const int32_t *slot) {
    const int T = ACT_T, d = ACT_D, E = ACT_E, C = ACT_C, n = ACT_N, V = ACT_V;
    const float *x = in[0], *gam = in[1], *bet = in[2], *Wqkv = in[3], *bqkv = in[4], *Wo = in[5], *bo = in[6];
    const float *w1 = in[7], *b1 = in[8], *w2 = in[9], *b2 = in[10], *Wlm = in[11], *dq = in[12], *dsmall = in[13];
    const float *dlog = in[14];
    float *y = o[0], *mean = o[1], *rstd = o[2], *qkv = o[3], *att = o[4], *probs = o[5], *po = o[6], *Xe = o[7];
    float *H = o[8], *A = o[9], *Ye = o[10], *logits = o[11], *gx2 = o[12], *dA = o[13], *dH = o[14], *dXe = o[15];
    float *grads = o[16], *lo = o[17], *lq = o[18], *dWlm = o[19], *dWx2 = o[20], *x2 = o[21];
    float *dw1 = grads, *db1 = dw1 + (size_t)E * d * n, *dw2 = db1 + (size_t)E * n, *db2 = dw2 + (size_t)E * n * d;
    g->layernorm_fwd(g, x, gam, bet, y, mean, rstd, T, d, 1e-5f);
    g->gemm_bias(g, 0, 0, T, 3 * d, d, y, d, 0, Wqkv, 3 * d, 0, bqkv, 0, NULL, qkv, 3 * d, 0, 1);
    g->attention_fwd(g, qkv, att, probs, ACT_B, ACT_S, ACT_H, d / ACT_H);
    g->gemm_bias(g, 0, 0, T, d, d, att, d, 0, Wo, d, 0, bo, 0, NULL, po, d, 0, 1);
    g->dispatch(g, y, kept, slot, T, ACT_K, C, E, d, NULL, Xe);
    g->ffn_fwd(g, MOE_ACT_GELU, Xe, w1, b1, w2, b2, H, A, Ye, E, C, d, n);
    g->gemm(g, 0, 1, T, V, d, 1.0f, y, d, Wlm, d, 0.0f, logits, V);
    g->gemm(g, 0, 0, T, 3 * d, d, 1.0f, x2, d, Wqkv, 3 * d, 0.0f, gx2, 3 * d);
    /* the backward's reads: dsmall's first E*C*d floats as dYe, its first T*d as d(att proj) */
    g->ffn_bwd(g, MOE_ACT_GELU, Xe, w1, w2, H, A, dsmall, dA, dH, dXe, dw1, db1, dw2, db2, E, C, d, n, 1);
    g->linear_bwd(g, att, Wo, dsmall, lo, lo + (size_t)T * d, lo + (size_t)T * d + (size_t)d * d, T, d, d);
    g->linear_bwd(g, y, Wqkv, dq, lq, lq + (size_t)T * d, lq + (size_t)T * d + (size_t)d * 3 * d, T, d, 3 * d);
    g->gemm(g, 1, 0, V, d, T, 1.0f, dlog, V, y, d, 1.0f, dWlm, d);
    g->gemm(g, 1, 0, d, 3 * d, T, 1.0f, x2, d, dq, 3 * d, 1.0f, dWx2, 3 * d);
}

static void test_activation_copies(const cfg *c) {
    if (c != cfgs_first) return;
    const int T = ACT_T, d = ACT_D, E = ACT_E, C = ACT_C, n = ACT_N, V = ACT_V, K = ACT_K;
    const size_t in_sizes[ACT_NIN] = {(size_t)T * d, d, d, (size_t)d * 3 * d, 3 * d, (size_t)d * d, d,
                                      (size_t)E * d * n, (size_t)E * n, (size_t)E * n * d, (size_t)E * d,
                                      (size_t)V * d, (size_t)T * 3 * d, (size_t)E * C * d, (size_t)T * V};
    const size_t out_sizes[ACT_NOUT] = {(size_t)T * d, T, T, (size_t)T * 3 * d, (size_t)T * d,
                                        (size_t)ACT_B * ACT_H * ACT_S * ACT_S, (size_t)T * d, (size_t)E * C * d,
                                        (size_t)E * C * n, (size_t)E * C * n, (size_t)E * C * d, (size_t)T * V,
                                        (size_t)T * 3 * d, (size_t)E * C * n, (size_t)E * C * n, (size_t)E * C * d,
                                        (size_t)E * d * n * 2 + (size_t)E * n + (size_t)E * d,
                                        (size_t)T * d + (size_t)d * d + d, (size_t)T * d + (size_t)d * 3 * d + 3 * d,
                                        (size_t)V * d, (size_t)d * 3 * d, (size_t)T * d};
    static const char *names[ACT_NOUT] = {"y",  "mean", "rstd", "qkv", "att",  "probs", "proj",       "Xe",
                                          "H",  "A",    "Ye",   "logits", "gemm(x2)", "dA", "dH", "dXe",
                                          "expert grads", "linear_bwd(att)", "linear_bwd(y)", "dWlm", "dW(x2)", "x2"};
    /* routing with full, partly filled and dropping experts: t's experts (t % 3 + k) % E */
    int32_t kept[ACT_T * ACT_K], slot[ACT_T * ACT_K], count[ACT_E] = {0};
    for (int t = 0; t < T; ++t)
        for (int k = 0; k < K; ++k) {
            const int e = (t % 3 + k) % E, a = t * K + k;
            kept[a] = count[e] < C ? e : -1;
            slot[a] = count[e] < C ? count[e]++ : -1;
        }
    const int32_t *d_kept = up(gpu16, kept, sizeof kept), *d_slot = up(gpu16, slot, sizeof slot);
    for (int round = 0; round < 2; ++round) {
        float *ins[ACT_NIN], *old_ins[ACT_NIN], *res[2][ACT_NOUT];
        for (int i = 0; i < ACT_NIN; ++i) {
            ins[i] = hrand(in_sizes[i], -1, 1);
            old_ins[i] = hrand(in_sizes[i], -1, 1);
        }
        float *x2 = hrand(out_sizes[21], -1, 1), *old_x2 = hrand(out_sizes[21], -1, 1);
        for (int with = 0; with < 2; ++with) {
            float *din[ACT_NIN], *dout[ACT_NOUT];
            for (int i = 0; i < ACT_NIN; ++i) din[i] = up(gpu16, round && with ? old_ins[i] : ins[i], in_sizes[i] * 4);
            for (int i = 0; i < ACT_NOUT; ++i) dout[i] = dpoison(gpu16, out_sizes[i] * 4, POISON_F32);
            for (int i = 16; i <= 20; ++i) gpu16->zero(gpu16, dout[i], out_sizes[i] * 4); /* accumulated into */
            const moe_activation_view views[4] = {{dout[0], T, d}, {dout[4], T, d}, {dout[7], (int64_t)E * C, d},
                                                  {dout[21], T, d}};
            gpu16->keep_activations(gpu16, views, with ? 4 : 0);
            if (round && with) { /* the copies of other values first */
                gpu16->from_host(gpu16, dout[21], old_x2, out_sizes[21] * 4);
                activation_ops(gpu16, din, dout, d_kept, d_slot);
                gpu16->keep_activations(gpu16, views, 4);
                for (int i = 0; i < ACT_NIN; ++i) gpu16->from_host(gpu16, din[i], ins[i], in_sizes[i] * 4);
                for (int i = 0; i < ACT_NOUT; ++i) poison(gpu16, dout[i], out_sizes[i] * 4, POISON_F32);
                for (int i = 16; i <= 20; ++i) gpu16->zero(gpu16, dout[i], out_sizes[i] * 4);
            }
            gpu16->from_host(gpu16, dout[21], x2, out_sizes[21] * 4);
            activation_ops(gpu16, din, dout, d_kept, d_slot);
            if (!gpu_ok(gpu16, "keep_activations")) return;
            for (int i = 0; i < ACT_NOUT; ++i) res[with][i] = down(gpu16, dout[i], out_sizes[i] * 4);
        }
        gpu16->keep_activations(gpu16, NULL, 0);
        for (int i = 0; i < ACT_NOUT - 1; ++i) {
            if (i == 8) continue; /* H: the backend's own (without the copies it also holds X's rounding) */
            char op[96];
            snprintf(op, sizeof op, "keep_activations(%s).%s = without copies", round ? "declared again" : "fresh",
                     names[i]);
            report_bits(op, res[1][i], res[0][i], out_sizes[i], sizeof(float));
        }
    }
}

/* linear_bwd against the CPU's composition: dX poisoned, dW and db
 * accumulating onto random values, db NULL too. */
static void test_linear_bwd_case(moe_backend *g, const char *tag, int T, int K, int N, int with_db, double tol) {
    const size_t nX = (size_t)T * K, nW = (size_t)K * N, nY = (size_t)T * N;
    float *X = hrand(nX, -1, 1), *W = hrand(nW, -0.2f, 0.2f), *dY = hrand(nY, -1, 1);
    float *dW0 = hrand(nW, -1, 1), *db0 = hrand((size_t)N, -1, 1);
    float *want_dX = halloc(nX * sizeof(float)), *want_dW = hdup(dW0, nW * sizeof(float));
    float *want_db = hdup(db0, (size_t)N * sizeof(float));
    cpu->linear_bwd(cpu, X, W, dY, want_dX, want_dW, with_db ? want_db : NULL, T, K, N);
    float *gX = up(g, X, nX * sizeof(float)), *gW = up(g, W, nW * sizeof(float)), *gdY = up(g, dY, nY * sizeof(float));
    float *got_dX[2], *got_dW[2], *got_db[2];
    char op[128];
    snprintf(op, sizeof op, "%s(T=%d,K=%d,N=%d%s)", tag, T, K, N, with_db ? ",db" : "");
    for (int r = 0; r < 2; ++r) {
        float *gdX = dpoison(g, nX * sizeof(float), POISON_F32);
        float *gdW = up(g, dW0, nW * sizeof(float)), *gdb = up(g, db0, (size_t)N * sizeof(float));
        g->linear_bwd(g, gX, gW, gdY, gdX, gdW, with_db ? gdb : NULL, T, K, N);
        if (!gpu_ok(g, op)) return;
        got_dX[r] = down(g, gdX, nX * sizeof(float));
        got_dW[r] = down(g, gdW, nW * sizeof(float));
        got_db[r] = down(g, gdb, (size_t)N * sizeof(float));
    }
    char name[160];
    snprintf(name, sizeof name, "%s.dX", op);
    check_f32(name, got_dX, want_dX, nX, tol);
    snprintf(name, sizeof name, "%s.dW", op);
    check_f32(name, got_dW, want_dW, nW, tol);
    snprintf(name, sizeof name, "%s.db", op); /* fp32 sums either way */
    check_f32(name, got_db, want_db, (size_t)N, TOL_EW);
}

static void test_linear_bwd(const cfg *c) {
    const int T = T_of(c), d = c->d;
    test_linear_bwd_case(gpu, "linear_bwd", T, d, 3 * d, 1, TOL_MM);
    test_linear_bwd_case(gpu16, "linear_bwd_bf16", T, d, 3 * d, 1, TOL_BF16);
    test_linear_bwd_case(gpu16, "linear_bwd_bf16", T, d, d, 0, TOL_BF16);
    test_linear_bwd_case(gpu16, "linear_bwd_bf16", T, d, 3 * d + 1, 1, TOL_BF16); /* no vector path */
    test_linear_bwd_case(gpu16, "linear_bwd_bf16", T, d, 5, 1, TOL_BF16);         /* a side under 16: fp32 */
    /* 71 chunks of rows, the last of 13 rows: db's finish stages its chunks
     * in rounds of 32 (two whole rounds and a part); 132 columns: a second
     * column tile with one thread's columns */
    if (c == cfgs_first) test_linear_bwd_case(gpu16, "linear_bwd_bf16", 70 * 64 + 13, 32, 132, 1, TOL_BF16);
}

/* add_bias and bias_grad over T rows and N columns; N = 40000 (1250 column
 * tiles, more than there are tickets) takes the column sum's second pass. */
static void bias_case(int T, int N) {
    const size_t n = (size_t)T * N;
    float *y0 = hrand(n, -1, 1), *b = hrand((size_t)N, -1, 1), *db0 = hrand((size_t)N, -1, 1);
    float *want_y = hdup(y0, n * sizeof(float)), *want_db = hdup(db0, (size_t)N * sizeof(float));
    cpu->add_bias(cpu, want_y, b, T, N);
    cpu->bias_grad(cpu, y0, want_db, T, N);
    float *d_b = up(gpu, b, (size_t)N * sizeof(float)), *d_dy = up(gpu, y0, n * sizeof(float));
    float *got_y[2], *got_db[2];
    for (int r = 0; r < 2; ++r) {
        float *d_y = up(gpu, y0, n * sizeof(float));
        gpu->add_bias(gpu, d_y, d_b, T, N);
        if (!gpu_ok(gpu, "add_bias")) return;
        got_y[r] = down(gpu, d_y, n * sizeof(float));
        float *d_db = up(gpu, db0, (size_t)N * sizeof(float));
        gpu->bias_grad(gpu, d_dy, d_db, T, N);
        if (!gpu_ok(gpu, "bias_grad")) return;
        got_db[r] = down(gpu, d_db, (size_t)N * sizeof(float));
    }
    char op[64];
    snprintf(op, sizeof op, "add_bias(T=%d,N=%d).y", T, N);
    check_f32(op, got_y, want_y, n, TOL_EW);
    snprintf(op, sizeof op, "bias_grad(T=%d,N=%d).db", T, N);
    check_f32(op, got_db, want_db, (size_t)N, TOL_EW);
}

static void test_bias(const cfg *c) {
    bias_case(T_of(c), 3 * c->d);
    if (c == cfgs_first) bias_case(70, 40000);
}

/* The batched (per-expert) bias ops: E entries of [C, N] at fixed strides,
 * packed (the expert layout) and with gaps between entries; CUDA against the
 * CPU's batched ops, which equal the per-expert loop bit for bit
 * (test_ops_dense). */
static void test_bias_batched_case(const char *tag, int E, int C, int N, long long pad_y, long long pad_b) {
    const long long sy = (long long)C * N + pad_y, sb = N + pad_b;
    const size_t ny = (size_t)E * (size_t)sy, nb = (size_t)E * (size_t)sb;
    float *y0 = hrand(ny, -1, 1), *b = hrand(nb, -1, 1), *db0 = hrand(nb, -1, 1);
    float *want_y = hdup(y0, ny * sizeof(float)), *want_db = hdup(db0, nb * sizeof(float));
    cpu->add_bias_batched(cpu, want_y, b, E, C, N, sy, sb);
    cpu->bias_grad_batched(cpu, y0, want_db, E, C, N, sy, sb);
    float *d_b = up(gpu, b, nb * sizeof(float)), *d_dy = up(gpu, y0, ny * sizeof(float));
    float *got_y[2], *got_db[2];
    for (int r = 0; r < 2; ++r) {
        float *d_y = up(gpu, y0, ny * sizeof(float));
        gpu->add_bias_batched(gpu, d_y, d_b, E, C, N, sy, sb);
        if (!gpu_ok(gpu, "add_bias_batched")) return;
        got_y[r] = down(gpu, d_y, ny * sizeof(float));
        float *d_db = up(gpu, db0, nb * sizeof(float));
        gpu->bias_grad_batched(gpu, d_dy, d_db, E, C, N, sy, sb);
        if (!gpu_ok(gpu, "bias_grad_batched")) return;
        got_db[r] = down(gpu, d_db, nb * sizeof(float));
    }
    char op[96];
    snprintf(op, sizeof op, "add_bias_batched.y(%s)", tag);
    check_f32(op, got_y, want_y, ny, TOL_EW);
    snprintf(op, sizeof op, "bias_grad_batched.db(%s)", tag);
    check_f32(op, got_db, want_db, nb, TOL_EW);
}

static void test_bias_batched(const cfg *c) {
    const int T = T_of(c), E = c->E;
    const int C = (int)ceil(1.25 * T * c->K / E);
    test_bias_batched_case("b1", E, C, c->hidden, 0, 0);
    test_bias_batched_case("b2", E, C, c->d, 0, 0);
    test_bias_batched_case("gaps", E, C, c->d, 13, 5);
}

static void test_vector_ops(const cfg *c) {
    const size_t n = (size_t)T_of(c) * c->d + 3; /* not a multiple of any block */
    float *x = hrand(n, -2, 2), *y0 = hrand(n, -2, 2);
    float *want_axpy = hdup(y0, n * sizeof(float)), *want_scale = hdup(x, n * sizeof(float));
    float *want_mul = halloc(n * sizeof(float));
    cpu->axpy(cpu, -0.37f, x, want_axpy, n);
    cpu->scale(cpu, want_scale, 1.7f, n);
    cpu->mul(cpu, x, y0, want_mul, n);
    const double want_sumsq = cpu->sumsq(cpu, x, n);
    float *d_x = up(gpu, x, n * sizeof(float)), *d_y0 = up(gpu, y0, n * sizeof(float));
    float *got_axpy[2], *got_scale[2], *got_mul[2];
    double got_sumsq[2];
    for (int r = 0; r < 2; ++r) {
        float *d_y = up(gpu, y0, n * sizeof(float));
        gpu->axpy(gpu, -0.37f, d_x, d_y, n);
        float *d_s = up(gpu, x, n * sizeof(float));
        gpu->scale(gpu, d_s, 1.7f, n);
        float *d_m = dpoison(gpu, n * sizeof(float), POISON_F32);
        gpu->mul(gpu, d_x, d_y0, d_m, n);
        got_sumsq[r] = gpu->sumsq(gpu, d_x, n);
        if (!gpu_ok(gpu, "axpy/scale/mul/sumsq")) return;
        got_axpy[r] = down(gpu, d_y, n * sizeof(float));
        got_scale[r] = down(gpu, d_s, n * sizeof(float));
        got_mul[r] = down(gpu, d_m, n * sizeof(float));
    }
    check_f32("axpy.y", got_axpy, want_axpy, n, TOL_EW);
    check_f32("scale.x", got_scale, want_scale, n, TOL_EW);
    check_f32("mul.out", got_mul, want_mul, n, TOL_EW);
    double rel = fabs(got_sumsq[0] - want_sumsq) / fabs(want_sumsq);
    if (rel <= TOL_SUMSQ) {
        pass_line("sumsq", "%.3e", rel);
    } else {
        fail_line("sumsq", "%.3e", rel);
        printf("  n = %zu: expected %.17g got %.17g (tolerance %.0e)\n", n, want_sumsq, got_sumsq[0],
               TOL_SUMSQ);
    }
    report_repeat("sumsq", &got_sumsq[0], &got_sumsq[1], 1, sizeof(double));
}

/* ------------------------------------------------------------------ */
/* Embeddings, norms, activations                                      */
/* ------------------------------------------------------------------ */

/* The embeddings with vocabulary V. The CUDA backward has two paths: for a
 * small V per-id sums in shared memory (warps per block by V), else a sort
 * of the ids on the bits V needs. */
static void embed_case(int B, int S, int d, int V) {
    const int T = B * S;
    const size_t n = (size_t)T * d;
    int32_t *ids = halloc((size_t)T * sizeof *ids);
    /* a small vocabulary: ids repeat, as in a char corpus; id 0 very often */
    for (int i = 0; i < T; ++i)
        ids[i] = (moe_test_next(&rng) % 4 == 0) ? 0 : (int32_t)(moe_test_next(&rng) % (uint64_t)V);
    float *wte = hrand((size_t)V * d, -1, 1), *wpe = hrand((size_t)S * d, -1, 1);
    float *dout = hrand(n, -1, 1), *dwte0 = hrand((size_t)V * d, -1, 1), *dwpe0 = hrand((size_t)S * d, -1, 1);
    for (int with_pos = 0; with_pos < 2; ++with_pos) {
        char fwd_name[64], dwte_name[64], dwpe_name[64];
        snprintf(fwd_name, sizeof fwd_name, "embed_fwd(%s,V=%d).out", with_pos ? "wpe" : "no wpe", V);
        snprintf(dwte_name, sizeof dwte_name, "embed_bwd(%s,V=%d).dwte", with_pos ? "wpe" : "no wpe", V);
        snprintf(dwpe_name, sizeof dwpe_name, "embed_bwd(%s,V=%d).dwpe", with_pos ? "wpe" : "no wpe", V);
        float *want = halloc(n * sizeof(float));
        cpu->embed_fwd(cpu, ids, wte, with_pos ? wpe : NULL, want, B, S, d);
        float *want_dwte = hdup(dwte0, (size_t)V * d * sizeof(float));
        float *want_dwpe = hdup(dwpe0, (size_t)S * d * sizeof(float));
        cpu->embed_bwd(cpu, ids, dout, want_dwte, with_pos ? want_dwpe : NULL, B, S, d, V);

        int32_t *d_ids = up(gpu, ids, (size_t)T * sizeof *ids);
        float *d_wte = up(gpu, wte, (size_t)V * d * sizeof(float)), *d_wpe = up(gpu, wpe, (size_t)S * d * sizeof(float));
        float *d_dout = up(gpu, dout, n * sizeof(float));
        float *got[2], *got_dwte[2], *got_dwpe[2];
        for (int r = 0; r < 2; ++r) {
            float *d_out = dpoison(gpu, n * sizeof(float), POISON_F32);
            gpu->embed_fwd(gpu, d_ids, d_wte, with_pos ? d_wpe : NULL, d_out, B, S, d);
            float *d_dwte = up(gpu, dwte0, (size_t)V * d * sizeof(float));
            float *d_dwpe = up(gpu, dwpe0, (size_t)S * d * sizeof(float));
            gpu->embed_bwd(gpu, d_ids, d_dout, d_dwte, with_pos ? d_dwpe : NULL, B, S, d, V);
            if (!gpu_ok(gpu, "embed_fwd/embed_bwd")) return;
            got[r] = down(gpu, d_out, n * sizeof(float));
            got_dwte[r] = down(gpu, d_dwte, (size_t)V * d * sizeof(float));
            got_dwpe[r] = down(gpu, d_dwpe, (size_t)S * d * sizeof(float));
        }
        check_f32(fwd_name, got, want, n, TOL_EW);
        check_f32(dwte_name, got_dwte, want_dwte, (size_t)V * d, TOL_EW);
        /* without dwpe, dwpe must be left alone (it still holds dwpe0) */
        check_f32(dwpe_name, got_dwpe, want_dwpe, (size_t)S * d, TOL_EW);
    }
}

static void test_embed(const cfg *c) {
    embed_case(c->B, c->S, c->d, c->V);
    if (c != cfgs_first) return;
    embed_case(c->B, c->S, c->d, 50257); /* GPT-2's vocabulary: the sort, 16-bit keys */
    embed_case(8, 64, 48, 2000);         /* past the small path's shared memory: the sort, 11 bits */
    embed_case(40, 7, 72, 300);          /* small path, 2 warps per block; B > 32: two id groups per warp;
                                            a part-filled column tile */
    embed_case(64, 16, 32, 1);           /* one id for every token */
    embed_case(3, 5, 7, 10);             /* an odd width: the forward one float at a time */
}

/* "op(d=N)" into buf */
static const char *ln_name(char *buf, size_t cap, const char *op, int d) {
    snprintf(buf, cap, "%s(d=%d)", op, d);
    return buf;
}

static void layernorm_case(int T, int d) {
    char name[64];
    const size_t n = (size_t)T * d;
    const float eps = 1e-5f;
    float *x = hrand(n, -2, 3), *g = hrand((size_t)d, 0.5f, 1.5f), *b = hrand((size_t)d, -0.5f, 0.5f);
    float *dy = hrand(n, -1, 1), *dx0 = hrand(n, -1, 1), *dg0 = hrand((size_t)d, -1, 1), *db0 = hrand((size_t)d, -1, 1);
    float *want_y = halloc(n * sizeof(float)), *want_mean = halloc((size_t)T * sizeof(float));
    float *want_rstd = halloc((size_t)T * sizeof(float));
    cpu->layernorm_fwd(cpu, x, g, b, want_y, want_mean, want_rstd, T, d, eps);
    float *want_dx = hdup(dx0, n * sizeof(float)), *want_dg = hdup(dg0, (size_t)d * sizeof(float));
    float *want_db = hdup(db0, (size_t)d * sizeof(float));
    cpu->layernorm_bwd(cpu, x, g, want_mean, want_rstd, dy, want_dx, want_dg, want_db, T, d);

    float *d_x = up(gpu, x, n * sizeof(float)), *d_g = up(gpu, g, (size_t)d * sizeof(float));
    float *d_b = up(gpu, b, (size_t)d * sizeof(float)), *d_dy = up(gpu, dy, n * sizeof(float));
    /* the backward gets the CPU's saved statistics, so it is tested alone */
    float *d_mean_in = up(gpu, want_mean, (size_t)T * sizeof(float));
    float *d_rstd_in = up(gpu, want_rstd, (size_t)T * sizeof(float));
    float *got_y[2], *got_mean[2], *got_rstd[2], *got_dx[2], *got_dg[2], *got_db[2];
    for (int r = 0; r < 2; ++r) {
        float *d_y = dpoison(gpu, n * sizeof(float), POISON_F32);
        float *d_mean = dpoison(gpu, (size_t)T * sizeof(float), POISON_F32);
        float *d_rstd = dpoison(gpu, (size_t)T * sizeof(float), POISON_F32);
        gpu->layernorm_fwd(gpu, d_x, d_g, d_b, d_y, d_mean, d_rstd, T, d, eps);
        float *d_dx = up(gpu, dx0, n * sizeof(float)), *d_dg = up(gpu, dg0, (size_t)d * sizeof(float));
        float *d_db = up(gpu, db0, (size_t)d * sizeof(float));
        gpu->layernorm_bwd(gpu, d_x, d_g, d_mean_in, d_rstd_in, d_dy, d_dx, d_dg, d_db, T, d);
        if (!gpu_ok(gpu, "layernorm")) return;
        got_y[r] = down(gpu, d_y, n * sizeof(float));
        got_mean[r] = down(gpu, d_mean, (size_t)T * sizeof(float));
        got_rstd[r] = down(gpu, d_rstd, (size_t)T * sizeof(float));
        got_dx[r] = down(gpu, d_dx, n * sizeof(float));
        got_dg[r] = down(gpu, d_dg, (size_t)d * sizeof(float));
        got_db[r] = down(gpu, d_db, (size_t)d * sizeof(float));
    }
    check_f32(ln_name(name, sizeof name, "layernorm_fwd.y", d), got_y, want_y, n, TOL_EW);
    check_f32(ln_name(name, sizeof name, "layernorm_fwd.mean", d), got_mean, want_mean, (size_t)T, TOL_EW);
    check_f32(ln_name(name, sizeof name, "layernorm_fwd.rstd", d), got_rstd, want_rstd, (size_t)T, TOL_EW);
    check_f32(ln_name(name, sizeof name, "layernorm_bwd.dx", d), got_dx, want_dx, n, TOL_EW);
    check_f32(ln_name(name, sizeof name, "layernorm_bwd.dg", d), got_dg, want_dg, (size_t)d, TOL_EW);
    check_f32(ln_name(name, sizeof name, "layernorm_bwd.db", d), got_db, want_db, (size_t)d, TOL_EW);
}

/* The model's width, and on the first size the widths that pick the other
 * CUDA paths: d % 128 == 0 (registers, 3 float4 per lane), d % 32 == 0 (one
 * fused pass), neither (separate passes; the sizes' own d covers it too).
 * The fused passes add their 32-row chunks' dg, db partials in 32 lanes of
 * chunks: 333 rows leave lanes without a chunk; 8209 rows (257 chunks, the
 * training step's 8192 and one more) and 1100 rows (35 chunks, the other
 * fused kernel) give lanes of unequal length. */
static void test_layernorm(const cfg *c) {
    layernorm_case(T_of(c), c->d);
    if (c != cfgs_first) return;
    const int widths[] = {384, 160, 1000};
    for (size_t i = 0; i < sizeof widths / sizeof widths[0]; ++i) layernorm_case(333, widths[i]);
    layernorm_case(8209, 256);
    layernorm_case(1100, 160);
}

static void test_rmsnorm(const cfg *c) {
    const int T = T_of(c), d = c->d;
    const size_t n = (size_t)T * d;
    const float eps = 1e-6f;
    float *x = hrand(n, -2, 2), *g = hrand((size_t)d, 0.5f, 1.5f);
    float *dy = hrand(n, -1, 1), *dx0 = hrand(n, -1, 1), *dg0 = hrand((size_t)d, -1, 1);
    float *want_y = halloc(n * sizeof(float)), *want_rstd = halloc((size_t)T * sizeof(float));
    cpu->rmsnorm_fwd(cpu, x, g, want_y, want_rstd, T, d, eps);
    float *want_dx = hdup(dx0, n * sizeof(float)), *want_dg = hdup(dg0, (size_t)d * sizeof(float));
    cpu->rmsnorm_bwd(cpu, x, g, want_rstd, dy, want_dx, want_dg, T, d);

    float *d_x = up(gpu, x, n * sizeof(float)), *d_g = up(gpu, g, (size_t)d * sizeof(float));
    float *d_dy = up(gpu, dy, n * sizeof(float));
    float *d_rstd_in = up(gpu, want_rstd, (size_t)T * sizeof(float));
    float *got_y[2], *got_rstd[2], *got_dx[2], *got_dg[2];
    for (int r = 0; r < 2; ++r) {
        float *d_y = dpoison(gpu, n * sizeof(float), POISON_F32);
        float *d_rstd = dpoison(gpu, (size_t)T * sizeof(float), POISON_F32);
        gpu->rmsnorm_fwd(gpu, d_x, d_g, d_y, d_rstd, T, d, eps);
        float *d_dx = up(gpu, dx0, n * sizeof(float)), *d_dg = up(gpu, dg0, (size_t)d * sizeof(float));
        gpu->rmsnorm_bwd(gpu, d_x, d_g, d_rstd_in, d_dy, d_dx, d_dg, T, d);
        if (!gpu_ok(gpu, "rmsnorm")) return;
        got_y[r] = down(gpu, d_y, n * sizeof(float));
        got_rstd[r] = down(gpu, d_rstd, (size_t)T * sizeof(float));
        got_dx[r] = down(gpu, d_dx, n * sizeof(float));
        got_dg[r] = down(gpu, d_dg, (size_t)d * sizeof(float));
    }
    check_f32("rmsnorm_fwd.y", got_y, want_y, n, TOL_EW);
    check_f32("rmsnorm_fwd.rstd", got_rstd, want_rstd, (size_t)T, TOL_EW);
    check_f32("rmsnorm_bwd.dx", got_dx, want_dx, n, TOL_EW);
    check_f32("rmsnorm_bwd.dg", got_dg, want_dg, (size_t)d, TOL_EW);
}

static void test_act(const cfg *c) {
    static const char *names[3] = {"gelu", "silu", "swiglu"};
    const int T = T_of(c), n = c->hidden;
    for (int kind = 0; kind < 3; ++kind) {
        const size_t n_in = (size_t)T * n * (kind == MOE_ACT_SWIGLU ? 2 : 1), n_out = (size_t)T * n;
        float *in = hrand(n_in, -4, 4), *dout = hrand(n_out, -1, 1);
        float *want = halloc(n_out * sizeof(float)), *want_din = halloc(n_in * sizeof(float));
        cpu->act_fwd(cpu, (moe_act_kind)kind, in, want, T, n);
        cpu->act_bwd(cpu, (moe_act_kind)kind, in, dout, want_din, T, n);
        float *d_in = up(gpu, in, n_in * sizeof(float)), *d_dout = up(gpu, dout, n_out * sizeof(float));
        float *got[2], *got_din[2];
        for (int r = 0; r < 2; ++r) {
            float *d_out = dpoison(gpu, n_out * sizeof(float), POISON_F32);
            float *d_din = dpoison(gpu, n_in * sizeof(float), POISON_F32);
            gpu->act_fwd(gpu, (moe_act_kind)kind, d_in, d_out, T, n);
            gpu->act_bwd(gpu, (moe_act_kind)kind, d_in, d_dout, d_din, T, n);
            if (!gpu_ok(gpu, names[kind])) return;
            got[r] = down(gpu, d_out, n_out * sizeof(float));
            got_din[r] = down(gpu, d_din, n_in * sizeof(float));
        }
        char op[64];
        snprintf(op, sizeof op, "act_fwd(%s).out", names[kind]);
        check_f32(op, got, want, n_out, TOL_EW);
        snprintf(op, sizeof op, "act_bwd(%s).din", names[kind]);
        check_f32(op, got_din, want_din, n_in, TOL_EW);
    }
}

/* ------------------------------------------------------------------ */
/* Attention                                                           */
/* ------------------------------------------------------------------ */

static void test_rope(const cfg *c) {
    const int B = c->B, S = c->S, H = c->H, hd = c->d / c->H;
    const size_t n = (size_t)B * S * 3 * H * hd;
    const float theta = 10000.0f;
    float *qkv = hrand(n, -1, 1);
    float *want_f = hdup(qkv, n * sizeof(float)), *want_b = hdup(qkv, n * sizeof(float));
    cpu->rope_fwd(cpu, want_f, B, S, H, hd, theta);
    cpu->rope_bwd(cpu, want_b, B, S, H, hd, theta);
    float *got_f[2], *got_b[2];
    for (int r = 0; r < 2; ++r) {
        float *d_f = up(gpu, qkv, n * sizeof(float)), *d_b = up(gpu, qkv, n * sizeof(float));
        gpu->rope_fwd(gpu, d_f, B, S, H, hd, theta);
        gpu->rope_bwd(gpu, d_b, B, S, H, hd, theta);
        if (!gpu_ok(gpu, "rope")) return;
        got_f[r] = down(gpu, d_f, n * sizeof(float));
        got_b[r] = down(gpu, d_b, n * sizeof(float));
    }
    check_f32("rope_fwd.qkv", got_f, want_f, n, TOL_EW);
    check_f32("rope_bwd.dqkv", got_b, want_b, n, TOL_EW);
}

/* One shape on backend g (gpu: fp32; gpu16: bf16 mode, whose attention
 * runs its six products on tensor cores), outputs named <tag>_fwd.out etc.
 *
 * What probs holds is the backend's own (backend.h). In fp32 mode it is the
 * probabilities, as on the CPU: they are compared, and the backward runs
 * alone on the CPU's. In bf16 mode it is the backend's row statistics:
 * only out and dqkv are compared, and the backward runs on what the GPU's
 * forward left there (poisoned before each forward, so a statistic it
 * failed to write, or a read past them, shows as a NaN in dqkv).
 *
 * bf16 tolerance: only the MMA operands (q, k, v, dout, and the P and dS
 * tiles) are rounded to bf16, each by at most 2^-8 relative, about 2.3e-3
 * rms; a product of two rounded operands summed in fp32 is then off by about
 * 3e-3 norm-wise. A double-precision simulation of exactly this rounding, at
 * S = 65..333 and hd = 33..96 on these inputs, gives out 2.2e-3, probs
 * 6e-4, dqkv 2.5e-3 (the backward on exact probabilities; the ones it
 * recomputes from the forward's statistics carry the probs error too);
 * TOL_BF16 (1e-2) leaves a margin of 3 or more. */
static void attention_case(moe_backend *g, const char *tag, double tol, int B, int S, int H, int hd) {
    const size_t n_qkv = (size_t)B * S * 3 * H * hd, n_out = (size_t)B * S * H * hd;
    const size_t n_p = (size_t)B * H * S * S;
    const int keeps_probs = g != gpu16;
    float *qkv = hrand(n_qkv, -1, 1), *dout = hrand(n_out, -1, 1);
    float *want_out = halloc(n_out * sizeof(float)), *want_p = halloc(n_p * sizeof(float));
    float *want_dqkv = halloc(n_qkv * sizeof(float));
    cpu->attention_fwd(cpu, qkv, want_out, want_p, B, S, H, hd);
    cpu->attention_bwd(cpu, qkv, want_p, dout, want_dqkv, B, S, H, hd);

    float *d_qkv = up(g, qkv, n_qkv * sizeof(float)), *d_dout = up(g, dout, n_out * sizeof(float));
    /* fp32: the backward alone, on the CPU's probs */
    float *d_p_in = keeps_probs ? up(g, want_p, n_p * sizeof(float)) : NULL;
    float *got_out[2], *got_p[2], *got_dqkv[2];
    for (int r = 0; r < 2; ++r) {
        float *d_out = dpoison(g, n_out * sizeof(float), POISON_F32);
        float *d_p = dpoison(g, n_p * sizeof(float), POISON_F32);
        float *d_dqkv = dpoison(g, n_qkv * sizeof(float), POISON_F32);
        g->attention_fwd(g, d_qkv, d_out, d_p, B, S, H, hd);
        g->attention_bwd(g, d_qkv, keeps_probs ? d_p_in : d_p, d_dout, d_dqkv, B, S, H, hd);
        if (!gpu_ok(g, tag)) return;
        got_out[r] = down(g, d_out, n_out * sizeof(float));
        got_p[r] = keeps_probs ? down(g, d_p, n_p * sizeof(float)) : NULL;
        got_dqkv[r] = down(g, d_dqkv, n_qkv * sizeof(float));
    }
    char op[96];
    snprintf(op, sizeof op, "%s_fwd.out", tag);
    check_f32(op, got_out, want_out, n_out, tol);
    if (keeps_probs) {
        snprintf(op, sizeof op, "%s_fwd.probs", tag);
        check_f32(op, got_p, want_p, n_p, tol);
    }
    snprintf(op, sizeof op, "%s_bwd.dqkv", tag);
    check_f32(op, got_dqkv, want_dqkv, n_qkv, tol);
}

static void test_attention(const cfg *c) {
    /* shapes the tiled kernels treat specially: two 64-column halves of a
     * head (hd > 64), partial tiles (S odd, even but not a multiple of 4,
     * a multiple of 4 but not of 16), hd not a multiple of 16 (padded in
     * the bf16 kernels), long rows, and the hd > 128 fallback */
    static const int shapes[][4] = {{2, 512, 2, 128}, {1, 130, 3, 96}, {2, 65, 1, 33}, {1, 100, 2, 16},
                                    {1, 70, 1, 136}};
    const size_t n_extra = c == cfgs_first ? sizeof shapes / sizeof shapes[0] : 0;
    for (size_t k = 0; k <= n_extra; ++k) {
        const int B = k ? shapes[k - 1][0] : c->B, S = k ? shapes[k - 1][1] : c->S;
        const int H = k ? shapes[k - 1][2] : c->H, hd = k ? shapes[k - 1][3] : c->d / c->H;
        attention_case(gpu, "attention", TOL_MM, B, S, H, hd);
        free_all();
        if (need_reset) return;
        attention_case(gpu16, "attention_bf16", TOL_BF16, B, S, H, hd);
        free_all();
        if (need_reset) return;
    }
}

/* ------------------------------------------------------------------ */
/* Dropout, loss, optimizer                                            */
/* ------------------------------------------------------------------ */

static void test_dropout(const cfg *c) {
    const size_t n = (size_t)T_of(c) * c->d + 3; /* a partial Philox block at the end */
    const float ps[2] = {0.1f, 0.0f};
    moe_rng_key key = {moe_test_next(&rng), moe_test_next(&rng) % 100000, (uint32_t)(moe_test_next(&rng) % 8), 2};
    float *x = hrand(n, -1, 1);
    float *d_x = up(gpu, x, n * sizeof(float));
    for (int pi = 0; pi < 2; ++pi) {
        const float p = ps[pi];
        float *want_f = halloc(n * sizeof(float)), *want_b = halloc(n * sizeof(float));
        cpu->dropout_fwd(cpu, x, want_f, n, p, key);
        cpu->dropout_bwd(cpu, x, want_b, n, p, key);
        float *got_f[2], *got_b[2];
        for (int r = 0; r < 2; ++r) {
            float *d_f = dpoison(gpu, n * sizeof(float), POISON_F32);
            float *d_b = dpoison(gpu, n * sizeof(float), POISON_F32);
            gpu->dropout_fwd(gpu, d_x, d_f, n, p, key);
            gpu->dropout_bwd(gpu, d_x, d_b, n, p, key);
            if (!gpu_ok(gpu, "dropout")) return;
            got_f[r] = down(gpu, d_f, n * sizeof(float));
            got_b[r] = down(gpu, d_b, n * sizeof(float));
        }
        /* the same Philox words and one multiply: the masks and values must be exact */
        char op[64];
        snprintf(op, sizeof op, "dropout_fwd(p=%g).y:exact", p);
        report_bits(op, got_f[0], want_f, n, sizeof(float));
        snprintf(op, sizeof op, "dropout_fwd(p=%g).y", p);
        report_repeat(op, got_f[0], got_f[1], n, sizeof(float));
        snprintf(op, sizeof op, "dropout_bwd(p=%g).dx:exact", p);
        report_bits(op, got_b[0], want_b, n, sizeof(float));
        snprintf(op, sizeof op, "dropout_bwd(p=%g).dx", p);
        report_repeat(op, got_b[0], got_b[1], n, sizeof(float));
    }
}

/* Cross-entropy over T rows of V classes: a warp per row up to 2048
 * classes, a block per row beyond. */
static void xent_case(int T, int V) {
    const size_t n = (size_t)T * V;
    const float grad_scale = 1.0f / (float)T;
    float *logits = hrand(n, -4, 4);
    int32_t *targets = halloc((size_t)T * sizeof *targets);
    for (int t = 0; t < T; ++t) {
        targets[t] = (int32_t)(moe_test_next(&rng) % (uint64_t)V);
        if (t % 17 == 5) targets[t] = -1; /* ignored rows */
        /* every 7th row: two equal maxima; the lower index must win */
        if (t % 7 == 3 && V >= 2) {
            int j1 = (int)(moe_test_next(&rng) % (uint64_t)(V - 1));
            int j2 = j1 + 1 + (int)(moe_test_next(&rng) % (uint64_t)(V - 1 - j1));
            logits[(size_t)t * V + j1] = logits[(size_t)t * V + j2] = 5.0f;
            targets[t] = (t % 14 == 3) ? j1 : j2;
        }
    }
    float *want_loss = halloc((size_t)T * sizeof(float)), *want_dl = halloc(n * sizeof(float));
    int32_t *want_ok = halloc((size_t)T * sizeof(int32_t));
    cpu->xent_fwd_bwd(cpu, logits, targets, T, V, want_loss, want_ok, want_dl, grad_scale);

    float *d_logits = up(gpu, logits, n * sizeof(float));
    int32_t *d_targets = up(gpu, targets, (size_t)T * sizeof(int32_t));
    float *got_loss[2], *got_dl[2], *got_loss_nodl[2];
    int32_t *got_ok[2];
    for (int r = 0; r < 2; ++r) {
        float *d_loss = dpoison(gpu, (size_t)T * sizeof(float), POISON_F32);
        int32_t *d_ok = dpoison(gpu, (size_t)T * sizeof(int32_t), POISON_I32);
        float *d_dl = dpoison(gpu, n * sizeof(float), POISON_F32);
        gpu->xent_fwd_bwd(gpu, d_logits, d_targets, T, V, d_loss, d_ok, d_dl, grad_scale);
        float *d_loss2 = dpoison(gpu, (size_t)T * sizeof(float), POISON_F32);
        gpu->xent_fwd_bwd(gpu, d_logits, d_targets, T, V, d_loss2, d_ok, NULL, grad_scale);
        if (!gpu_ok(gpu, "xent_fwd_bwd")) return;
        got_loss[r] = down(gpu, d_loss, (size_t)T * sizeof(float));
        got_ok[r] = down(gpu, d_ok, (size_t)T * sizeof(int32_t));
        got_dl[r] = down(gpu, d_dl, n * sizeof(float));
        got_loss_nodl[r] = down(gpu, d_loss2, (size_t)T * sizeof(float));
    }
    char op[64];
    snprintf(op, sizeof op, "xent(V=%d).losses", V);
    check_f32(op, got_loss, want_loss, (size_t)T, TOL_EW);
    snprintf(op, sizeof op, "xent(V=%d).correct", V);
    check_i32(op, got_ok, want_ok, (size_t)T);
    snprintf(op, sizeof op, "xent(V=%d).dlogits", V);
    check_f32(op, got_dl, want_dl, n, TOL_EW);
    snprintf(op, sizeof op, "xent(V=%d,dlogits=NULL).losses", V);
    check_f32(op, got_loss_nodl, want_loss, (size_t)T, TOL_EW);
}

static void test_xent(const cfg *c) {
    xent_case(T_of(c), c->V);
    if (c == cfgs_first) xent_case(203, 5000); /* a block per row */
}

/* AdamW at an early and a late step, with and without decay, with the
 * clipping factor folded in (norm above clip), a norm below clip, and none;
 * `shift` moves every array off 16-byte alignment (the scalar path). */
static void test_adamw(const cfg *c) {
    const size_t n = (size_t)c->d * c->hidden + 5;
    float *p = hrand(n + 1, -1, 1), *g = hrand(n + 1, -0.1f, 0.1f), *m = hrand(n + 1, -0.01f, 0.01f);
    float *v = hrand(n + 1, 0.0f, 1e-3f);
    uint8_t *decay = halloc(n + 1);
    for (size_t i = 0; i <= n; ++i) decay[i] = (uint8_t)(moe_test_next(&rng) & 1);
    const long long steps[2] = {1, 1000};
    const double clip = 1.5, norms[3] = {0.0, 3.0, 1.0}; /* none, clipped, below clip */
    const char *clip_names[3] = {"no clip", "clipped", "norm < clip"};
    for (int si = 0; si < 2; ++si)
        for (int with_decay = 0; with_decay < 2; ++with_decay)
            for (int ci = 0; ci < 3; ++ci)
                for (int shift = 0; shift < 2; ++shift) {
                    if (shift && (si || ci != 1)) continue; /* the scalar path once per decay mode */
                    const long long t = steps[si];
                    const uint8_t *dec = with_decay ? decay : NULL;
                    const double *norm = ci ? &norms[ci] : NULL;
                    const double cl = ci ? clip : 0.0;
                    float *wp = hdup(p + shift, n * 4), *wm = hdup(m + shift, n * 4), *wv = hdup(v + shift, n * 4);
                    cpu->adamw(cpu, wp, g + shift, wm, wv, dec ? dec + shift : NULL, n, 1e-3f, 0.9f, 0.95f, 1e-8f,
                               0.1f, t, norm, cl);
                    float *d_g = up(gpu, g, (n + 1) * 4);
                    uint8_t *d_dec = with_decay ? up(gpu, decay, n + 1) : NULL;
                    double *d_norm = ci ? up(gpu, &norms[ci], sizeof(double)) : NULL;
                    float *gp[2], *gm[2], *gv[2];
                    for (int r = 0; r < 2; ++r) {
                        float *d_p = up(gpu, p, (n + 1) * 4), *d_m = up(gpu, m, (n + 1) * 4);
                        float *d_v = up(gpu, v, (n + 1) * 4);
                        gpu->adamw(gpu, d_p + shift, d_g + shift, d_m + shift, d_v + shift,
                                   d_dec ? d_dec + shift : NULL, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, t, d_norm, cl);
                        if (!gpu_ok(gpu, "adamw")) return;
                        gp[r] = down(gpu, d_p + shift, n * 4);
                        gm[r] = down(gpu, d_m + shift, n * 4);
                        gv[r] = down(gpu, d_v + shift, n * 4);
                    }
                    float *g_after = down(gpu, d_g + shift, n * 4);
                    char op[96];
                    const char *what = with_decay ? "decay" : "no decay";
                    snprintf(op, sizeof op, "adamw(t=%lld,%s,%s%s).p", t, what, clip_names[ci], shift ? ",unaligned" : "");
                    check_f32(op, gp, wp, n, TOL_EW);
                    snprintf(op, sizeof op, "adamw(t=%lld,%s,%s%s).m", t, what, clip_names[ci], shift ? ",unaligned" : "");
                    check_f32(op, gm, wm, n, TOL_EW);
                    snprintf(op, sizeof op, "adamw(t=%lld,%s,%s%s).v", t, what, clip_names[ci], shift ? ",unaligned" : "");
                    check_f32(op, gv, wv, n, TOL_EW);
                    snprintf(op, sizeof op, "adamw(%s).g untouched", clip_names[ci]);
                    report_bits(op, g_after, g + shift, n, sizeof(float));
                    /* written to follow the CPU operation for operation: report if not bitwise */
                    if (memcmp(gp[0], wp, n * 4) != 0)
                        printf("  note: adamw p is not bitwise equal to the CPU's (within tolerance)\n");
                }
}

/* ------------------------------------------------------------------ */
/* MoE routing core                                                    */
/* ------------------------------------------------------------------ */

/* A routing of T tokens, K choices each: skewed toward experts 0 and 1 so
 * capacity drops happen, some empty (-1) choices, weights on a coarse grid
 * (many ties, including +0.0 and -0.0, which the CPU treats as equal). */
static void make_routing(int T, int K, int E, int32_t *expert, float *weight) {
    for (size_t a = 0; a < (size_t)T * K; ++a) {
        uint64_t r = moe_test_next(&rng) % 100;
        expert[a] = r < 5 ? -1 : (r < 45 ? (int32_t)(r % 2) : (int32_t)(moe_test_next(&rng) % (uint64_t)E));
        int level = (int)(moe_test_next(&rng) % 9); /* 0..8 */
        weight[a] = level == 0 ? 0.0f : (level == 1 ? -0.0f : (float)level / 8.0f);
    }
}

static void capacity_case(int T, int K, int E) {
    const size_t nA = (size_t)T * K;
    int32_t *expert = halloc(nA * sizeof(int32_t));
    float *weight = halloc(nA * sizeof(float));
    make_routing(T, K, E, expert, weight);
    const int Cs[3] = {(int)ceil(1.0 * T * K / E), (int)ceil(0.5 * T * K / E), T * K};
    int32_t *d_expert = up(gpu, expert, nA * sizeof(int32_t));
    float *d_weight = up(gpu, weight, nA * sizeof(float));
    for (int policy = 0; policy < 2; ++policy)
        for (int ci = 0; ci < 3; ++ci) {
            const int C = Cs[ci];
            int32_t *want_kept = halloc(nA * 4), *want_slot = halloc(nA * 4);
            int32_t *want_before = halloc((size_t)E * 4), *want_after = halloc((size_t)E * 4);
            cpu->capacity_assign(cpu, expert, weight, T, K, E, C, policy, want_kept, want_slot, want_before,
                                 want_after);
            int32_t *kept[2], *slot[2], *before[2], *after[2], *h_before[2], *h_after[2];
            for (int r = 0; r < 2; ++r) {
                int32_t *d_kept = dpoison(gpu, nA * 4, POISON_I32), *d_slot = dpoison(gpu, nA * 4, POISON_I32);
                /* the counts are device arrays, as core/model/moe.c passes them */
                int32_t *d_before = dpoison(gpu, (size_t)E * 4, POISON_I32);
                int32_t *d_after = dpoison(gpu, (size_t)E * 4, POISON_I32);
                gpu->capacity_assign(gpu, d_expert, d_weight, T, K, E, C, policy, d_kept, d_slot, d_before,
                                     d_after);
                if (!gpu_ok(gpu, "capacity_assign")) return;
                kept[r] = down(gpu, d_kept, nA * 4);
                slot[r] = down(gpu, d_slot, nA * 4);
                before[r] = down(gpu, d_before, (size_t)E * 4);
                after[r] = down(gpu, d_after, (size_t)E * 4);
                /* host arrays (the earlier contract, still used by bench_routing) */
                h_before[r] = halloc((size_t)E * 4);
                h_after[r] = halloc((size_t)E * 4);
                memset(h_before[r], POISON_I32, (size_t)E * 4);
                memset(h_after[r], POISON_I32, (size_t)E * 4);
                gpu->capacity_assign(gpu, d_expert, d_weight, T, K, E, C, policy, d_kept, d_slot, h_before[r],
                                     h_after[r]);
                if (!gpu_ok(gpu, "capacity_assign(host counts)")) return;
            }
            char op[128];
            const char *pol = policy ? "probs" : "position";
            snprintf(op, sizeof op, "capacity_assign(T=%d,K=%d,E=%d,%s,C=%d).kept", T, K, E, pol, C);
            check_i32(op, kept, want_kept, nA);
            snprintf(op, sizeof op, "capacity_assign(T=%d,K=%d,E=%d,%s,C=%d).slot", T, K, E, pol, C);
            check_i32(op, slot, want_slot, nA);
            snprintf(op, sizeof op, "capacity_assign(T=%d,K=%d,E=%d,%s,C=%d).counts_before", T, K, E, pol, C);
            check_i32(op, before, want_before, (size_t)E);
            snprintf(op, sizeof op, "capacity_assign(T=%d,K=%d,E=%d,%s,C=%d).counts_after", T, K, E, pol, C);
            check_i32(op, after, want_after, (size_t)E);
            snprintf(op, sizeof op, "capacity_assign(T=%d,K=%d,E=%d,%s,C=%d,host counts).counts_before", T, K, E,
                     pol, C);
            check_i32(op, h_before, want_before, (size_t)E);
            snprintf(op, sizeof op, "capacity_assign(T=%d,K=%d,E=%d,%s,C=%d,host counts).counts_after", T, K, E,
                     pol, C);
            check_i32(op, h_after, want_after, (size_t)E);
        }
}

/* The CUDA kernel cuts the priority order into chunks (up to 1022, fewer
 * when E is large) of warp segments; beyond the size's own routing, the
 * first size also checks K = 1 and 4, the expC shape (T = 8192, K = 2: 64
 * chunks), E = 256, counts too large for shared memory (E = 2000), and
 * segments of many steps (T*K = 280000, past the chunk cap). */
static void test_capacity(const cfg *c) {
    capacity_case(T_of(c), c->K, c->E);
    if (c != cfgs_first) return;
    static const int extra[][3] = {
        /* T     K  E */
        {2048, 1, 8},   {2048, 4, 8},  {8192, 2, 8},
        {4096, 2, 256}, {999, 3, 2000}, {40000, 7, 64},
    };
    for (size_t i = 0; i < sizeof extra / sizeof extra[0]; ++i) {
        free_all(); /* each case allocates a few hundred buffers */
        capacity_case(extra[i][0], extra[i][1], extra[i][2]);
    }
}

/* An op that is a fresh backend's first call, before any scratch exists:
 * capacity_assign by position with device counts lays out no scratch at
 * all, and the backend once answered that request with no buffer, which
 * the op took for a failure and returned without writing anything (no
 * error either). The model's first MoE layer made exactly this call. */
static void test_capacity_first_call(void) {
    char err[512];
    moe_backend *shared = gpu;
    gpu = moe_backend_cuda_create(0, MOE_PRECISION_FP32, err, sizeof err);
    if (!gpu) {
        gpu = shared;
        fail_line("capacity_assign(first call of a fresh backend)", "%.0f", 1.0);
        printf("  moe_backend_cuda_create: %s\n", err);
        return;
    }
    capacity_case(1024, 2, 4); /* the quick-start model's layer */
    free_all();                /* the buffers belong to the fresh backend */
    moe_backend_destroy(gpu);
    gpu = shared;
}

/* combine weights, dispatch, combine and their backwards on one routing
 * (kept/slot from the CPU's capacity_assign, so these are tested alone) */
/* dispatch and combine_bwd with fill_counts (capacity_assign's counts_after:
 * each expert's kept slots are 0 .. count-1): the rows past the counts are
 * zeroed in the same launch, and the results must be the CPU's without the
 * hint. C below the load drops assignments, above it leaves rows empty. */
static void test_dispatch_fill_counts(const cfg *c) {
    const int T = T_of(c), K = c->K, E = c->E, d = c->d;
    for (int ci = 0; ci < 2; ++ci) {
        const int C = (int)ceil((ci ? 1.3 : 0.7) * T * K / E);
        const size_t nA = (size_t)T * K, nX = (size_t)T * d, nXe = (size_t)E * C * d;
        int32_t *expert = halloc(nA * 4), *kept = halloc(nA * 4), *slot = halloc(nA * 4);
        int32_t *before = halloc((size_t)E * 4), *after = halloc((size_t)E * 4);
        float *weight = halloc(nA * 4), *cw = halloc(nA * 4);
        make_routing(T, K, E, expert, weight);
        cpu->capacity_assign(cpu, expert, weight, T, K, E, C, 0, kept, slot, before, after);
        cpu->combine_weights(cpu, weight, kept, T, K, 0, cw);
        float *x = hrand(nX, -1, 1), *Ye = hrand(nXe, -1, 1), *dy = hrand(nX, -1, 1);
        float *want_Xe = halloc(nXe * 4), *want_dYe = halloc(nXe * 4), *want_dcw = halloc(nA * 4);
        cpu->dispatch(cpu, x, kept, slot, T, K, C, E, d, NULL, want_Xe);
        cpu->combine_bwd(cpu, Ye, kept, slot, cw, dy, T, K, C, E, d, NULL, want_dYe, want_dcw);
        int32_t *d_kept = up(gpu, kept, nA * 4), *d_slot = up(gpu, slot, nA * 4), *d_after = up(gpu, after, E * 4);
        float *d_x = up(gpu, x, nX * 4), *d_Ye = up(gpu, Ye, nXe * 4), *d_dy = up(gpu, dy, nX * 4);
        float *d_cw = up(gpu, cw, nA * 4);
        float *got_Xe[2], *got_dYe[2], *got_dcw[2];
        for (int r = 0; r < 2; ++r) {
            float *d_Xe = dpoison(gpu, nXe * 4, POISON_F32), *d_dYe = dpoison(gpu, nXe * 4, POISON_F32);
            float *d_dcw = dpoison(gpu, nA * 4, POISON_F32);
            gpu->dispatch(gpu, d_x, d_kept, d_slot, T, K, C, E, d, d_after, d_Xe);
            gpu->combine_bwd(gpu, d_Ye, d_kept, d_slot, d_cw, d_dy, T, K, C, E, d, d_after, d_dYe, d_dcw);
            if (!gpu_ok(gpu, "dispatch/combine_bwd (fill_counts)")) return;
            got_Xe[r] = down(gpu, d_Xe, nXe * 4);
            got_dYe[r] = down(gpu, d_dYe, nXe * 4);
            got_dcw[r] = down(gpu, d_dcw, nA * 4);
        }
        char op[96];
        snprintf(op, sizeof op, "dispatch(fill_counts,C=%d).Xe", C);
        check_f32(op, got_Xe, want_Xe, nXe, TOL_EW);
        snprintf(op, sizeof op, "combine_bwd(fill_counts,C=%d).dYe", C);
        check_f32(op, got_dYe, want_dYe, nXe, TOL_EW);
        snprintf(op, sizeof op, "combine_bwd(fill_counts,C=%d).dcw", C);
        check_f32(op, got_dcw, want_dcw, nA, TOL_MM); /* a dot product over d: see test_dispatch_combine */
    }
}

static void test_dispatch_combine(const cfg *c) {
    const int T = T_of(c), K = c->K, E = c->E, d = c->d;
    const int C = (int)ceil(1.0 * T * K / E);
    const size_t nA = (size_t)T * K, nX = (size_t)T * d, nXe = (size_t)E * C * d;
    int32_t *expert = halloc(nA * 4), *kept = halloc(nA * 4), *slot = halloc(nA * 4);
    int32_t *before = halloc((size_t)E * 4), *after = halloc((size_t)E * 4);
    float *weight = halloc(nA * 4);
    make_routing(T, K, E, expert, weight);
    for (size_t a = 0; a < nA; ++a) weight[a] = fabsf(weight[a]) + 0.01f * (float)(a % 7);
    cpu->capacity_assign(cpu, expert, weight, T, K, E, C, 1, kept, slot, before, after);
    if (T > 1) /* a token with every choice dropped */
        for (int k = 0; k < K; ++k) kept[(size_t)1 * K + k] = slot[(size_t)1 * K + k] = -1;

    float *x = hrand(nX, -1, 1), *Ye = hrand(nXe, -1, 1), *dy = hrand(nX, -1, 1);
    float *dXe = hrand(nXe, -1, 1), *dx0 = hrand(nX, -1, 1), *dcw_in = hrand(nA, -1, 1);
    int32_t *d_kept = up(gpu, kept, nA * 4), *d_slot = up(gpu, slot, nA * 4);
    float *d_weight = up(gpu, weight, nA * 4), *d_x = up(gpu, x, nX * 4), *d_Ye = up(gpu, Ye, nXe * 4);
    float *d_dy = up(gpu, dy, nX * 4), *d_dXe = up(gpu, dXe, nXe * 4), *d_dcw_in = up(gpu, dcw_in, nA * 4);

    for (int renorm = 0; renorm < 2; ++renorm) {
        float *want_cw = halloc(nA * 4), *want_dw = halloc(nA * 4);
        cpu->combine_weights(cpu, weight, kept, T, K, renorm, want_cw);
        cpu->combine_weights_bwd(cpu, weight, kept, T, K, renorm, dcw_in, want_dw);
        float *got_cw[2], *got_dw[2];
        for (int r = 0; r < 2; ++r) {
            float *d_cw = dpoison(gpu, nA * 4, POISON_F32), *d_dw = dpoison(gpu, nA * 4, POISON_F32);
            gpu->combine_weights(gpu, d_weight, d_kept, T, K, renorm, d_cw);
            gpu->combine_weights_bwd(gpu, d_weight, d_kept, T, K, renorm, d_dcw_in, d_dw);
            if (!gpu_ok(gpu, "combine_weights")) return;
            got_cw[r] = down(gpu, d_cw, nA * 4);
            got_dw[r] = down(gpu, d_dw, nA * 4);
        }
        check_f32(renorm ? "combine_weights(renorm).cw" : "combine_weights.cw", got_cw, want_cw, nA, TOL_EW);
        check_f32(renorm ? "combine_weights_bwd(renorm).dweight" : "combine_weights_bwd.dweight", got_dw,
                  want_dw, nA, TOL_EW);
    }

    float *cw = halloc(nA * 4);
    cpu->combine_weights(cpu, weight, kept, T, K, 1, cw);
    float *d_cw = up(gpu, cw, nA * 4);
    float *want_Xe = halloc(nXe * 4), *want_dx = hdup(dx0, nX * 4), *want_y = halloc(nX * 4);
    float *want_dYe = halloc(nXe * 4), *want_dcw = halloc(nA * 4), *want_dxo = halloc(nX * 4);
    cpu->dispatch(cpu, x, kept, slot, T, K, C, E, d, NULL, want_Xe);
    cpu->dispatch_bwd(cpu, dXe, kept, slot, T, K, C, d, 1, want_dx);
    cpu->dispatch_bwd(cpu, dXe, kept, slot, T, K, C, d, 0, want_dxo);
    cpu->combine(cpu, Ye, kept, slot, cw, T, K, C, d, NULL, want_y);
    cpu->combine_bwd(cpu, Ye, kept, slot, cw, dy, T, K, C, E, d, NULL, want_dYe, want_dcw);
    float *got_Xe[2], *got_dx[2], *got_y[2], *got_dYe[2], *got_dcw[2], *got_dxo[2];
    for (int r = 0; r < 2; ++r) {
        float *d_Xe = dpoison(gpu, nXe * 4, POISON_F32), *d_dx = up(gpu, dx0, nX * 4);
        float *d_y = dpoison(gpu, nX * 4, POISON_F32), *d_dYe = dpoison(gpu, nXe * 4, POISON_F32);
        float *d_dcw = dpoison(gpu, nA * 4, POISON_F32), *d_dxo = dpoison(gpu, nX * 4, POISON_F32);
        gpu->dispatch(gpu, d_x, d_kept, d_slot, T, K, C, E, d, NULL, d_Xe);
        gpu->dispatch_bwd(gpu, d_dXe, d_kept, d_slot, T, K, C, d, 1, d_dx);
        gpu->dispatch_bwd(gpu, d_dXe, d_kept, d_slot, T, K, C, d, 0, d_dxo); /* every row written */
        gpu->combine(gpu, d_Ye, d_kept, d_slot, d_cw, T, K, C, d, NULL, d_y);
        gpu->combine_bwd(gpu, d_Ye, d_kept, d_slot, d_cw, d_dy, T, K, C, E, d, NULL, d_dYe, d_dcw);
        if (!gpu_ok(gpu, "dispatch/combine")) return;
        got_Xe[r] = down(gpu, d_Xe, nXe * 4);
        got_dx[r] = down(gpu, d_dx, nX * 4);
        got_dxo[r] = down(gpu, d_dxo, nX * 4);
        got_y[r] = down(gpu, d_y, nX * 4);
        got_dYe[r] = down(gpu, d_dYe, nXe * 4);
        got_dcw[r] = down(gpu, d_dcw, nA * 4);
    }
    check_f32("dispatch.Xe", got_Xe, want_Xe, nXe, TOL_EW);
    check_f32("dispatch_bwd.dx", got_dx, want_dx, nX, TOL_EW);
    check_f32("dispatch_bwd(overwrite).dx", got_dxo, want_dxo, nX, TOL_EW);
    check_f32("combine.y", got_y, want_y, nX, TOL_EW);
    check_f32("combine_bwd.dYe", got_dYe, want_dYe, nXe, TOL_EW);
    /* dcw is a dot product over d, summed in another order than the CPU's:
     * the cancellation of a GEMM entry, so a GEMM's tolerance (with T = 1 and
     * d = 2052, two such sums measured 1.36e-5 against TOL_EW on one seed) */
    check_f32("combine_bwd.dcw", got_dcw, want_dcw, nA, TOL_MM);

    /* with a residual (the model's MoE residual connection), 16-byte
     * aligned and one float off (the scalar path) */
    float *res = hrand(nX + 1, -2, 2);
    float *d_res = up(gpu, res, (nX + 1) * 4);
    for (int mis = 0; mis < 2; ++mis) {
        float *want_yr = halloc(nX * 4), *got_yr[2];
        cpu->combine(cpu, Ye, kept, slot, cw, T, K, C, d, res + mis, want_yr);
        for (int r = 0; r < 2; ++r) {
            float *d_y = dpoison(gpu, nX * 4, POISON_F32);
            gpu->combine(gpu, d_Ye, d_kept, d_slot, d_cw, T, K, C, d, d_res + mis, d_y);
            if (!gpu_ok(gpu, "combine(residual)")) return;
            got_yr[r] = down(gpu, d_y, nX * 4);
        }
        check_f32(mis ? "combine(residual,misaligned).y" : "combine(residual).y", got_yr, want_yr, nX, TOL_EW);
    }
}

/* dispatch, combine and their backwards on a routing with gaps (as a
 * router that owns capacity may leave: kept slots 1, 3, 5, ... of a larger
 * C, so most rows of each expert stay empty and must come out 0), at a d
 * that is not a multiple of 4 (the scalar path) and at a large d */
static void test_dispatch_gaps_case(const cfg *c, int T, int d) {
    const int K = c->K, E = c->E;
    const int C0 = (int)ceil(0.75 * T * K / E);
    const int C = 2 * C0 + 3;
    const size_t nA = (size_t)T * K, nX = (size_t)T * d, nXe = (size_t)E * C * d;
    int32_t *expert = halloc(nA * 4), *kept = halloc(nA * 4), *slot = halloc(nA * 4);
    int32_t *before = halloc((size_t)E * 4), *after = halloc((size_t)E * 4);
    float *weight = halloc(nA * 4);
    make_routing(T, K, E, expert, weight);
    for (size_t a = 0; a < nA; ++a) weight[a] = fabsf(weight[a]) + 0.01f * (float)(a % 7);
    cpu->capacity_assign(cpu, expert, weight, T, K, E, C0, 0, kept, slot, before, after);
    for (size_t a = 0; a < nA; ++a)
        if (kept[a] >= 0) slot[a] = 2 * slot[a] + 1;
    float *cw = halloc(nA * 4);
    cpu->combine_weights(cpu, weight, kept, T, K, 1, cw);
    float *x = hrand(nX, -1, 1), *Ye = hrand(nXe, -1, 1), *dy = hrand(nX, -1, 1);
    float *dXe = hrand(nXe, -1, 1), *dx0 = hrand(nX, -1, 1);
    int32_t *d_kept = up(gpu, kept, nA * 4), *d_slot = up(gpu, slot, nA * 4);
    float *d_x = up(gpu, x, nX * 4), *d_Ye = up(gpu, Ye, nXe * 4), *d_cw = up(gpu, cw, nA * 4);
    float *d_dy = up(gpu, dy, nX * 4), *d_dXe = up(gpu, dXe, nXe * 4);
    float *want_Xe = halloc(nXe * 4), *want_dx = hdup(dx0, nX * 4), *want_y = halloc(nX * 4);
    float *want_dYe = halloc(nXe * 4), *want_dcw = halloc(nA * 4);
    cpu->dispatch(cpu, x, kept, slot, T, K, C, E, d, NULL, want_Xe);
    cpu->dispatch_bwd(cpu, dXe, kept, slot, T, K, C, d, 1, want_dx);
    cpu->combine(cpu, Ye, kept, slot, cw, T, K, C, d, NULL, want_y);
    cpu->combine_bwd(cpu, Ye, kept, slot, cw, dy, T, K, C, E, d, NULL, want_dYe, want_dcw);
    /* the combine with a residual too (x), on the scalar path (d + 1) and
     * at a large d */
    float *want_yr = halloc(nX * 4);
    cpu->combine(cpu, Ye, kept, slot, cw, T, K, C, d, x, want_yr);
    float *got_Xe[2], *got_dx[2], *got_y[2], *got_dYe[2], *got_dcw[2], *got_yr[2];
    for (int r = 0; r < 2; ++r) {
        float *d_Xe = dpoison(gpu, nXe * 4, POISON_F32), *d_dx = up(gpu, dx0, nX * 4);
        float *d_y = dpoison(gpu, nX * 4, POISON_F32), *d_dYe = dpoison(gpu, nXe * 4, POISON_F32);
        float *d_dcw = dpoison(gpu, nA * 4, POISON_F32), *d_yr = dpoison(gpu, nX * 4, POISON_F32);
        gpu->dispatch(gpu, d_x, d_kept, d_slot, T, K, C, E, d, NULL, d_Xe);
        gpu->dispatch_bwd(gpu, d_dXe, d_kept, d_slot, T, K, C, d, 1, d_dx);
        gpu->combine(gpu, d_Ye, d_kept, d_slot, d_cw, T, K, C, d, NULL, d_y);
        gpu->combine(gpu, d_Ye, d_kept, d_slot, d_cw, T, K, C, d, d_x, d_yr);
        gpu->combine_bwd(gpu, d_Ye, d_kept, d_slot, d_cw, d_dy, T, K, C, E, d, NULL, d_dYe, d_dcw);
        if (!gpu_ok(gpu, "dispatch/combine(gaps)")) return;
        got_yr[r] = down(gpu, d_yr, nX * 4);
        got_Xe[r] = down(gpu, d_Xe, nXe * 4);
        got_dx[r] = down(gpu, d_dx, nX * 4);
        got_y[r] = down(gpu, d_y, nX * 4);
        got_dYe[r] = down(gpu, d_dYe, nXe * 4);
        got_dcw[r] = down(gpu, d_dcw, nA * 4);
    }
    char op[96];
    snprintf(op, sizeof op, "dispatch(gaps,d=%d).Xe", d);
    check_f32(op, got_Xe, want_Xe, nXe, TOL_EW);
    snprintf(op, sizeof op, "dispatch_bwd(gaps,d=%d).dx", d);
    check_f32(op, got_dx, want_dx, nX, TOL_EW);
    snprintf(op, sizeof op, "combine(gaps,d=%d).y", d);
    check_f32(op, got_y, want_y, nX, TOL_EW);
    snprintf(op, sizeof op, "combine(gaps,d=%d,residual).y", d);
    check_f32(op, got_yr, want_yr, nX, TOL_EW);
    snprintf(op, sizeof op, "combine_bwd(gaps,d=%d).dYe", d);
    check_f32(op, got_dYe, want_dYe, nXe, TOL_EW);
    snprintf(op, sizeof op, "combine_bwd(gaps,d=%d).dcw", d);
    check_f32(op, got_dcw, want_dcw, nA, TOL_MM); /* a dot product over d: see test_dispatch_combine */
}

static void test_dispatch_gaps(const cfg *c) {
    const int T = T_of(c);
    test_dispatch_gaps_case(c, T, c->d + 1);
    test_dispatch_gaps_case(c, T < 64 ? T : 64, 2052);
}

static void test_aux_losses_case(int T, int E) {
    const size_t n = (size_t)T * E;
    const float alpha = 0.01f, beta = 0.001f;
    float *lb_logits = hrand(n, -3, 3), *logits = hrand(n, -3, 3), *dl0 = hrand(n, -1, 1);
    float *f = hrand((size_t)E, 0.1f, 1.0f); /* host memory, as the contract says */
    float fsum = 0.0f;
    for (int e = 0; e < E; ++e) fsum += f[e];
    for (int e = 0; e < E; ++e) f[e] /= fsum;
    float *want_dlb = halloc(n * 4), *want_dl = hdup(dl0, n * 4);
    double want_lb, want_z;
    cpu->aux_losses(cpu, lb_logits, logits, f, T, E, alpha, beta, want_dlb, want_dl, &want_lb, &want_z);
    float *d_lbl = up(gpu, lb_logits, n * 4), *d_l = up(gpu, logits, n * 4);
    float *got_dlb[2], *got_dl[2];
    double lb[2], z[2];
    for (int r = 0; r < 2; ++r) {
        float *d_dlb = dpoison(gpu, n * 4, POISON_F32), *d_dl = up(gpu, dl0, n * 4);
        lb[r] = z[r] = NAN;
        gpu->aux_losses(gpu, d_lbl, d_l, f, T, E, alpha, beta, d_dlb, d_dl, &lb[r], &z[r]);
        if (!gpu_ok(gpu, "aux_losses")) return;
        got_dlb[r] = down(gpu, d_dlb, n * 4);
        got_dl[r] = down(gpu, d_dl, n * 4);
    }
    char op[64];
    const char *names[4] = {"d_lb", "dlogits", "lb", "z"};
#define AUX_OP(i) (snprintf(op, sizeof op, "aux_losses(E=%d).%s", E, names[i]), op)
    check_f32(AUX_OP(0), got_dlb, want_dlb, n, TOL_EW);
    check_f32(AUX_OP(1), got_dl, want_dl, n, TOL_EW);
    float glb = (float)lb[0], wlb = (float)want_lb, gz = (float)z[0], wz = (float)want_z;
    report_f32(AUX_OP(2), &glb, &wlb, 1, TOL_EW);
    report_f32(AUX_OP(3), &gz, &wz, 1, TOL_EW);
    report_repeat(AUX_OP(2), &lb[0], &lb[1], 1, sizeof(double));
    report_repeat(AUX_OP(3), &z[0], &z[1], 1, sizeof(double));
#undef AUX_OP

    /* d_lb == dlogits: each row gets d_lb, then the z-loss term added. The
     * CPU's result against its two separate outputs (d_lb, and the z term
     * added to zeros), then the GPU against the CPU. */
    float *want_alias = halloc(n * 4), *sep = halloc(n * 4), *zterm = halloc(n * 4), *lb_tmp = halloc(n * 4);
    double alb, az;
    cpu->aux_losses(cpu, lb_logits, logits, f, T, E, alpha, beta, want_alias, want_alias, &alb, &az);
    memset(zterm, 0, n * 4);
    cpu->aux_losses(cpu, lb_logits, logits, f, T, E, alpha, beta, lb_tmp, zterm, &alb, &az);
    for (size_t i = 0; i < n; ++i) sep[i] = want_dlb[i] + zterm[i];
    snprintf(op, sizeof op, "aux_losses(E=%d, d_lb = dlogits) on the CPU = d_lb + dz", E);
    report_f32(op, want_alias, sep, n, TOL_EW);
    float *got_alias[2];
    for (int r = 0; r < 2; ++r) {
        float *d_a = dpoison(gpu, n * 4, POISON_F32);
        gpu->aux_losses(gpu, d_lbl, d_l, f, T, E, alpha, beta, d_a, d_a, &alb, &az);
        if (!gpu_ok(gpu, "aux_losses (aliased)")) return;
        got_alias[r] = down(gpu, d_a, n * 4);
    }
    snprintf(op, sizeof op, "aux_losses(E=%d, d_lb = dlogits).dlogits", E);
    check_f32(op, got_alias, want_alias, n, TOL_EW);
}

/* The row kernel keeps rows of up to 8 and up to 32 experts in registers,
 * wider ones in global memory: one case of each. */
static void test_aux_losses(const cfg *c) {
    test_aux_losses_case(T_of(c), c->E);
    if (c != cfgs_first) return;
    test_aux_losses_case(777, 20);
    test_aux_losses_case(333, 40);
}

/* aux_losses_counts: f from device counts, lb and z to a device buffer. */
static void test_aux_losses_counts(const cfg *c) {
    const int T = T_of(c), E = c->E;
    const size_t n = (size_t)T * E;
    const float alpha = 0.01f, beta = 0.001f;
    float *lb_logits = hrand(n, -3, 3), *logits = hrand(n, -3, 3), *dl0 = hrand(n, -1, 1);
    int32_t *counts = halloc((size_t)E * 4);
    for (int e = 0; e < E; ++e) counts[e] = (int32_t)(moe_test_next(&rng) % (uint64_t)(2 * T + 1));
    if (E > 1) counts[1] = 0; /* an idle expert */
    float *want_dlb = halloc(n * 4), *want_dl = hdup(dl0, n * 4);
    double want[2];
    cpu->aux_losses_counts(cpu, lb_logits, logits, counts, T, E, alpha, beta, want_dlb, want_dl, want);
    float *d_lbl = up(gpu, lb_logits, n * 4), *d_l = up(gpu, logits, n * 4);
    int32_t *d_counts = up(gpu, counts, (size_t)E * 4);
    float *got_dlb[2], *got_dl[2];
    double *got[2];
    for (int r = 0; r < 2; ++r) {
        float *d_dlb = dpoison(gpu, n * 4, POISON_F32), *d_dl = up(gpu, dl0, n * 4);
        double *d_out = dpoison(gpu, 2 * sizeof(double), POISON_F32);
        gpu->aux_losses_counts(gpu, d_lbl, d_l, d_counts, T, E, alpha, beta, d_dlb, d_dl, d_out);
        if (!gpu_ok(gpu, "aux_losses_counts")) return;
        got_dlb[r] = down(gpu, d_dlb, n * 4);
        got_dl[r] = down(gpu, d_dl, n * 4);
        got[r] = down(gpu, d_out, 2 * sizeof(double));
    }
    check_f32("aux_losses_counts.d_lb", got_dlb, want_dlb, n, TOL_EW);
    check_f32("aux_losses_counts.dlogits", got_dl, want_dl, n, TOL_EW);
    float glb = (float)got[0][0], wlb = (float)want[0], gz = (float)got[0][1], wz = (float)want[1];
    report_f32("aux_losses_counts.lb", &glb, &wlb, 1, TOL_EW);
    report_f32("aux_losses_counts.z", &gz, &wz, 1, TOL_EW);
    report_repeat("aux_losses_counts.out", got[0], got[1], 2, sizeof(double));
    /* all counts 0: f = 0, so lb = 0 (z as before) */
    memset(counts, 0, (size_t)E * 4);
    int32_t *d_zero = up(gpu, counts, (size_t)E * 4);
    cpu->aux_losses_counts(cpu, lb_logits, logits, counts, T, E, alpha, beta, want_dlb, want_dl, want);
    double *d_out = dpoison(gpu, 2 * sizeof(double), POISON_F32);
    float *d_dlb = dpoison(gpu, n * 4, POISON_F32), *d_dl = up(gpu, dl0, n * 4);
    gpu->aux_losses_counts(gpu, d_lbl, d_l, d_zero, T, E, alpha, beta, d_dlb, d_dl, d_out);
    if (!gpu_ok(gpu, "aux_losses_counts(no counts)")) return;
    double *g0 = down(gpu, d_out, 2 * sizeof(double));
    float g0lb = (float)g0[0], w0lb = (float)want[0];
    report_f32("aux_losses_counts(counts 0).lb", &g0lb, &w0lb, 1, TOL_EW);
}

/* A valid routing for check_routing: K choices per token, distinct experts
 * per token, weights in (0, 1]; with slots, every (expert, slot) distinct
 * and inside [0, C), C = T (room for every token). */
static void make_valid_routing(int T, int K, int E, int with_slot, int32_t *expert, float *weight, int32_t *slot) {
    int32_t *next = calloc((size_t)E, sizeof *next);
    for (int t = 0; t < T; ++t)
        for (int k = 0; k < K; ++k) {
            size_t a = (size_t)t * K + k;
            int e = (int)((moe_test_next(&rng) % (uint64_t)E + (uint64_t)k) % (uint64_t)E);
            if (moe_test_next(&rng) % 10 == 0 || k >= E) e = -1; /* empty choices */
            expert[a] = e;
            weight[a] = e < 0 ? (moe_test_next(&rng) & 1 ? 0.0f : -1.0f) /* ignored for empty */
                              : 0.125f * (float)(1 + moe_test_next(&rng) % 8);
            if (with_slot) slot[a] = e < 0 ? (int32_t)(moe_test_next(&rng) % 7) - 3 : next[e]++;
        }
    free(next);
}

/* Runs check_routing on both backends and compares the record, and with
 * slots the kept mask and both counts (poisoned on the GPU: every entry
 * must be written). guard: NULL, or guard_n host bytes for a guard zone
 * that should hold 0xA5. fin: NULL, or fin_n host floats for a finite
 * zone, placed fin_shift floats into its device buffer (1: not 16-byte
 * aligned). */
static void check_routing_zones(const char *what, const int32_t *expert, const float *weight, const int32_t *slot,
                                int T, int K, int E, int C, int dense, const int32_t *record0, const uint8_t *guard,
                                size_t guard_n, const float *fin, size_t fin_n, int fin_shift) {
    const size_t nA = (size_t)T * K, nR = MOE_CHECK_RECORD_WORDS, nE = (size_t)(E > 0 ? E : 0);
    int32_t *want_rec = hdup(record0, nR * 4), *want_kept = halloc(nA * 4 + 4);
    int32_t *want_counts = halloc(2 * nE * 4 + 4);
    memset(want_kept, POISON_I32, nA * 4 + 4);
    memset(want_counts, POISON_I32, 2 * nE * 4 + 4);
    moe_guard_zone hz = {guard, guard_n, 0xA5, 16}, dz = hz;
    moe_finite_zone hf = {fin, fin_n, 18}, df = hf;
    cpu->check_routing(cpu, guard ? &hz : NULL, fin ? &hf : NULL, expert, weight, slot, T, K, E, C, dense,
                       slot ? want_kept : NULL, slot ? want_counts : NULL, slot ? want_counts + nE : NULL, want_rec);
    int32_t *d_expert = up(gpu, expert, nA * 4 + 4), *d_slot = slot ? up(gpu, slot, nA * 4 + 4) : NULL;
    float *d_weight = up(gpu, weight, nA * 4 + 4);
    if (guard) dz.p = up(gpu, guard, guard_n + 1);
    if (fin) {
        float *d_fin = dpoison(gpu, (fin_n + (size_t)fin_shift) * 4 + 16, 0); /* zeros past the zone: finite */
        gpu->from_host(gpu, d_fin + fin_shift, fin, fin_n * 4);
        df.v = d_fin + fin_shift;
    }
    int32_t *rec[2], *kept[2], *counts[2];
    for (int r = 0; r < 2; ++r) {
        int32_t *d_rec = up(gpu, record0, nR * 4);
        int32_t *d_kept = dpoison(gpu, nA * 4 + 4, POISON_I32);
        int32_t *d_counts = dpoison(gpu, 2 * nE * 4 + 4, POISON_I32);
        gpu->check_routing(gpu, guard ? &dz : NULL, fin ? &df : NULL, d_expert, d_weight, d_slot, T, K, E, C,
                           dense, slot ? d_kept : NULL, slot ? d_counts : NULL, slot ? d_counts + nE : NULL, d_rec);
        if (!gpu_ok(gpu, "check_routing")) return;
        rec[r] = down(gpu, d_rec, nR * 4);
        kept[r] = down(gpu, d_kept, nA * 4 + 4);
        counts[r] = down(gpu, d_counts, 2 * nE * 4 + 4);
    }
    char op[200];
    snprintf(op, sizeof op, "check_routing(%s).record", what);
    check_i32(op, rec, want_rec, nR);
    if (slot) {
        snprintf(op, sizeof op, "check_routing(%s).kept", what);
        check_i32(op, kept, want_kept, nA);
        snprintf(op, sizeof op, "check_routing(%s).counts", what);
        check_i32(op, counts, want_counts, 2 * nE);
    }
}

static void check_routing_case(const char *what, const int32_t *expert, const float *weight, const int32_t *slot,
                               int T, int K, int E, int C, int dense, const int32_t *record0) {
    check_routing_zones(what, expert, weight, slot, T, K, E, C, dense, record0, NULL, 0, NULL, 0, 0);
}

/* The index of the assignment holding (e, s), or -1. */
static long find_holder(const int32_t *expert, const int32_t *slot, size_t nA, int e, int s) {
    for (size_t a = 0; a < nA; ++a)
        if (expert[a] == e && slot[a] == s) return (long)a;
    return -1;
}

/* Every fault the host must name, alone and two at once (the earlier one
 * in (t, k) order, or the one checked first within an assignment, must be
 * the one recorded), with and without router-owned slots; with slots, the
 * counts, duplicates of three claimants, and gaps with and without the
 * dense-slots check. */
static void test_check_routing(const cfg *c) {
    const int T = T_of(c), K = c->K, E = c->E, C = T;
    const size_t nA = (size_t)T * K;
    int32_t *expert = halloc(nA * 4 + 4), *slot = halloc(nA * 4 + 4);
    float *weight = halloc(nA * 4 + 4);
    int32_t *clear = halloc(MOE_CHECK_RECORD_WORDS * 4), *taken = halloc(MOE_CHECK_RECORD_WORDS * 4);
    memset(clear, 0, MOE_CHECK_RECORD_WORDS * 4);
    for (int i = 0; i < MOE_CHECK_RECORD_WORDS; ++i) taken[i] = 100 + i; /* an earlier error: must stay */
    taken[0] = 16;
    for (int with_slot = 0; with_slot < 2; ++with_slot) {
        int32_t *sl = with_slot ? slot : NULL;
        const char *tag = with_slot ? "owns capacity" : "no slots";
        char what[160];
        make_valid_routing(T, K, E, with_slot, expert, weight, slot);
        for (int dense = 0; dense < 2; ++dense) {
            snprintf(what, sizeof what, "%s, valid, dense check %d", tag, dense);
            check_routing_case(what, expert, weight, sl, T, K, E, C, dense, clear);
        }
        const size_t late = nA - 1, early = nA / 3;
        /* faults: 0 expert = E, 1 expert = -2, 2 weight NaN, 3 weight -0.5,
         * 4 weight +Inf, 5 slot = C, 6 slot = -1, 7 duplicate (expert, slot) */
        for (int fault = 0; fault < 8; ++fault) {
            if (fault >= 5 && !with_slot) break;
            for (int pair = 0; pair < 2; ++pair) {
                make_valid_routing(T, K, E, with_slot, expert, weight, slot);
                size_t at = pair ? early : late;
                if (expert[at] < 0) expert[at] = 0;
                if (weight[at] <= 0.0f) weight[at] = 0.5f;
                switch (fault) {
                case 0: expert[at] = E; break;
                case 1: expert[at] = -2; break;
                case 2: weight[at] = NAN; break;
                case 3: weight[at] = -0.5f; break;
                case 4: weight[at] = INFINITY; break;
                case 5: slot[at] = C; break;
                case 6: slot[at] = -1; break;
                case 7: /* the same (expert, slot) as an earlier assignment */
                    if (at == 0) break;
                    for (size_t b = 0; b < at; ++b)
                        if (expert[b] >= 0) {
                            expert[at] = expert[b];
                            slot[at] = slot[b];
                            break;
                        }
                    break;
                }
                if (pair) { /* a second, later fault of another kind: the first must win */
                    if (fault == 7) {
                        if (expert[late] >= 0 && late != at) weight[late] = -1.0f; /* range errors go first */
                    } else {
                        expert[late] = E + 3;
                        if (late > 0) weight[late - 1] = NAN;
                    }
                }
                /* the dense check must not hide nor replace these (they come first) */
                snprintf(what, sizeof what, "%s, fault %d at [%zu]%s", tag, fault, at, pair ? " + a later one" : "");
                check_routing_case(what, expert, weight, sl, T, K, E, C, with_slot && (fault & 1), clear);
            }
        }
        /* an error already recorded stays (and the counts are still written) */
        make_valid_routing(T, K, E, with_slot, expert, weight, slot);
        expert[0] = -5;
        snprintf(what, sizeof what, "%s, record already set", tag);
        check_routing_case(what, expert, weight, sl, T, K, E, C, with_slot, taken);
    }
    if (nA < 4) return;

    /* Three claimants of one (expert, slot) after a pair on another one:
     * the first one the in-order scan meets taken is recorded. */
    make_valid_routing(T, K, E, 1, expert, weight, slot);
    {
        const size_t spots[5] = {nA - 1, nA / 2, nA / 4, nA / 5, nA / 6}; /* a, b, c share; d, e share */
        int32_t e0 = -1, s0 = -1;
        for (size_t a = 0; a < nA && e0 < 0; ++a)
            if (expert[a] >= 0) e0 = expert[a], s0 = slot[a];
        if (e0 >= 0) {
            const long h0 = find_holder(expert, slot, nA, e0, s0);
            for (int i = 0; i < 3; ++i)
                if ((long)spots[i] != h0) {
                    expert[spots[i]] = e0;
                    slot[spots[i]] = s0;
                    weight[spots[i]] = 0.25f;
                }
            check_routing_case("owns capacity, three claimants", expert, weight, slot, T, K, E, C, 1, clear);
            if (spots[3] != spots[4]) {
                expert[spots[4]] = expert[spots[3]] >= 0 ? expert[spots[3]] : e0;
                slot[spots[4]] = expert[spots[3]] >= 0 ? slot[spots[3]] : s0;
                weight[spots[4]] = 0.25f;
                check_routing_case("owns capacity, three claimants + a pair", expert, weight, slot, T, K, E, C, 1,
                                   clear);
            }
        }
    }

    /* Gaps: one assignment moved to a free slot past its expert's count (a
     * hole where it was); then a second gap in a lower expert and at a
     * higher slot, and in the same expert. The lowest expert wins, and in
     * it the lowest empty slot. Without the dense check, nothing. */
    for (int variant = 0; variant < 4; ++variant) {
        make_valid_routing(T, K, E, 1, expert, weight, slot);
        int32_t *count = calloc((size_t)E, sizeof *count);
        for (size_t a = 0; a < nA; ++a)
            if (expert[a] >= 0) count[expert[a]]++;
        /* the experts with two or more assignments and room for one more slot, highest first */
        int hi = -1, lo = -1;
        for (int e = E - 1; e >= 0; --e)
            if (count[e] >= 2 && count[e] < C) {
                if (hi < 0) hi = e;
                else if (lo < 0) lo = e;
            }
        if (hi < 0) {
            free(count);
            break;
        }
        /* variant 0: hole at slot 0 of hi; 1: hole at its last slot; 2: also a hole
         * at the last slot of lo (lower expert, higher slot); 3: two holes in hi */
        long a0 = find_holder(expert, slot, nA, hi, variant == 1 ? count[hi] - 1 : 0);
        if (a0 >= 0) slot[a0] = count[hi] + (variant == 3 ? 1 : 0);
        if (variant == 2 && lo >= 0) {
            long a1 = find_holder(expert, slot, nA, lo, count[lo] - 1);
            if (a1 >= 0) slot[a1] = count[lo];
        }
        if (variant == 3 && count[hi] >= 3 && count[hi] + 2 < C) {
            long a2 = find_holder(expert, slot, nA, hi, 1);
            if (a2 >= 0) slot[a2] = count[hi] + 2;
        }
        free(count);
        for (int dense = 0; dense < 2; ++dense) {
            char what[96];
            snprintf(what, sizeof what, "owns capacity, gap variant %d, dense check %d", variant, dense);
            check_routing_case(what, expert, weight, slot, T, K, E, C, dense, clear);
        }
        /* a duplicate, and a range error, go before the gap */
        if (variant == 0) {
            long d = find_holder(expert, slot, nA, hi, 1);
            size_t other = d == (long)(nA - 1) ? nA - 2 : nA - 1;
            if (d >= 0) {
                expert[other] = hi;
                slot[other] = 1;
                weight[other] = 0.5f;
                check_routing_case("owns capacity, gap + duplicate", expert, weight, slot, T, K, E, C, 1, clear);
                slot[nA / 2] = C + 2;
                if (expert[nA / 2] < 0) expert[nA / 2] = 0, weight[nA / 2] = 0.5f;
                check_routing_case("owns capacity, gap + duplicate + slot range", expert, weight, slot, T, K, E, C,
                                   1, clear);
            }
        }
    }
}

/* check_routing with slots past the shared-memory sums (E > 2048), with no
 * assignments (counts must still be written, as zeros), and with a guard
 * zone. */
static void test_check_routing_shapes(const cfg *c) {
    int32_t *clear = halloc(MOE_CHECK_RECORD_WORDS * 4);
    memset(clear, 0, MOE_CHECK_RECORD_WORDS * 4);
    {
        const int T = 300, K = 3, E = 2500, C = 7;
        const size_t nA = (size_t)T * K;
        int32_t *expert = halloc(nA * 4 + 4), *slot = halloc(nA * 4 + 4);
        float *weight = halloc(nA * 4 + 4);
        int32_t *next = calloc((size_t)E, sizeof *next);
        for (size_t a = 0; a < nA; ++a) {
            /* few experts, so that they fill several slots; some full ones drop */
            int e = (int)(moe_test_next(&rng) % 40) * 61;
            if (next[e] >= C) e = -1;
            expert[a] = e;
            weight[a] = e < 0 ? 0.0f : 0.5f;
            slot[a] = e < 0 ? -1 : next[e]++;
        }
        free(next);
        check_routing_case("E=2500, valid", expert, weight, slot, T, K, E, C, 1, clear);
        long a0 = find_holder(expert, slot, nA, 61 * 7, 0);
        if (a0 >= 0) {
            long last = -1;
            for (int s = C - 1; s > 0 && last < 0; --s) last = find_holder(expert, slot, nA, 61 * 7, s);
            if (last >= 0) slot[last] = 0; /* a duplicate of slot 0 */
            check_routing_case("E=2500, duplicate", expert, weight, slot, T, K, E, C, 1, clear);
            if (last >= 0) expert[last] = -1, weight[last] = 0.0f, slot[last] = -1; /* now a hole if not the last slot */
            slot[a0] = -1, expert[a0] = -1, weight[a0] = 0.0f;                     /* and a hole at slot 0 */
            check_routing_case("E=2500, gap", expert, weight, slot, T, K, E, C, 1, clear);
            check_routing_case("E=2500, gap unchecked", expert, weight, slot, T, K, E, C, 0, clear);
        }
    }
    {
        int32_t none[1] = {0};
        float w[1] = {0.0f};
        check_routing_case("T=0", none, w, none, 0, 2, 8, 5, 1, clear);
    }
    /* The guard zone goes first: intact, changed (the lowest changed byte is
     * recorded, before any routing failure), with and without slots, and
     * with nothing to route. */
    {
        const int T = T_of(c), K = c->K, E = c->E, C = T;
        const size_t nA = (size_t)T * K, gn = 256;
        int32_t *expert = halloc(nA * 4 + 4), *slot = halloc(nA * 4 + 4);
        float *weight = halloc(nA * 4 + 4);
        uint8_t *guard = halloc(gn + 1);
        for (int with_slot = 0; with_slot < 2; ++with_slot)
            for (int gcase = 0; gcase < 4; ++gcase) {
                make_valid_routing(T, K, E, with_slot, expert, weight, slot);
                memset(guard, 0xA5, gn + 1);
                if (gcase >= 1) expert[nA - 1] = E; /* a routing failure */
                if (gcase >= 2) guard[gn - 1] = 0x00;
                if (gcase == 3) guard[37] = 0x5A, guard[200] = 0x01;
                char what[96];
                snprintf(what, sizeof what, "%s, guard case %d", with_slot ? "owns capacity" : "no slots", gcase);
                check_routing_zones(what, expert, weight, with_slot ? slot : NULL, T, K, E, C, with_slot, clear,
                                    guard, gn, NULL, 0, 0);
            }
        int32_t none[1] = {0};
        float w[1] = {0.0f};
        guard[5] = 0x00;
        check_routing_zones("T=0, guard changed", none, w, none, 0, 2, 8, 5, 1, clear, guard, gn, NULL, 0, 0);
    }
}

/* check_routing's finite zone (the logits, and l' after them) comes after
 * the guard and before the assignments: intact; a NaN late and an Inf
 * earlier (the lowest index is recorded); with a routing failure too, and
 * with a changed guard too; an error already recorded stays. Aligned (read
 * as float4), with a size that leaves a tail, and not aligned; and with
 * nothing to route. */
static void test_check_routing_finite_zone(const cfg *c) {
    const int T = T_of(c), K = c->K, E = c->E, C = T;
    const size_t nA = (size_t)T * K, gn = 256;
    const size_t sizes[3][2] = {{2 * (size_t)T * E, 0}, {(size_t)T * E - (T * E > 3 ? 3 : 0), 0},
                                {(size_t)T * E, 1}}; /* {floats, shift} */
    for (int zi = 0; zi < 3; ++zi) {
        free_all(); /* each size makes a few hundred buffers */
        int32_t *expert = halloc(nA * 4 + 4), *slot = halloc(nA * 4 + 4);
        int32_t *clear = halloc(MOE_CHECK_RECORD_WORDS * 4), *taken = halloc(MOE_CHECK_RECORD_WORDS * 4);
        memset(clear, 0, MOE_CHECK_RECORD_WORDS * 4);
        for (int i = 0; i < MOE_CHECK_RECORD_WORDS; ++i) taken[i] = 100 + i; /* an earlier error: must stay */
        float *weight = halloc(nA * 4 + 4);
        uint8_t *guard = halloc(gn + 1);
        const size_t fn = sizes[zi][0];
        const int shift = (int)sizes[zi][1];
        float *fin = halloc(fn * 4);
        for (int with_slot = 0; with_slot < 2; ++with_slot)
            for (int fcase = 0; fcase < 6; ++fcase) {
                make_valid_routing(T, K, E, with_slot, expert, weight, slot);
                moe_test_fill(&rng, fin, fn, -8, 8);
                memset(guard, 0xA5, gn + 1);
                if (fcase >= 1) fin[fn - 1] = NAN; /* in the tail when there is one */
                if (fcase >= 2 && fn > 2) fin[fn / 2 + 1] = -INFINITY;
                if (fcase >= 3) expert[0] = E; /* a routing failure, at the first assignment */
                if (fcase == 4) guard[99] = 0x00;
                char what[128];
                snprintf(what, sizeof what, "%s, finite zone %zu+%d, case %d", with_slot ? "owns capacity" : "no slots",
                         fn, shift, fcase);
                check_routing_zones(what, expert, weight, with_slot ? slot : NULL, T, K, E, C, with_slot,
                                    fcase == 5 ? taken : clear, guard, gn, fin, fn, shift);
            }
        int32_t none[1] = {0};
        float w[1] = {0.0f};
        check_routing_zones("T=0, finite zone", none, w, none, 0, 2, 8, 5, 1, clear, guard, gn, fin, fn, shift);
    }
}

static void test_check_bytes(const cfg *c) {
    const size_t n = 256 + (size_t)c->d; /* a guard zone and an odd size */
    uint8_t *buf = halloc(n);
    int32_t *clear = halloc(MOE_CHECK_RECORD_WORDS * 4);
    memset(clear, 0, MOE_CHECK_RECORD_WORDS * 4);
    const size_t spots[4][2] = {{n, n}, {n - 1, n}, {7, n - 1}, {0, 200}}; /* {first, second} changed bytes */
    for (int i = 0; i < 4; ++i) {
        memset(buf, 0xA5, n);
        if (spots[i][0] < n) buf[spots[i][0]] = 0x00;
        if (spots[i][1] < n) buf[spots[i][1]] = 0x5A;
        int32_t *want = hdup(clear, MOE_CHECK_RECORD_WORDS * 4);
        cpu->check_bytes(cpu, buf, n, 0xA5, 17, want);
        uint8_t *d_buf = up(gpu, buf, n);
        int32_t *got[2];
        for (int r = 0; r < 2; ++r) {
            int32_t *d_rec = up(gpu, clear, MOE_CHECK_RECORD_WORDS * 4);
            gpu->check_bytes(gpu, d_buf, n, 0xA5, 17, d_rec);
            if (!gpu_ok(gpu, "check_bytes")) return;
            got[r] = down(gpu, d_rec, MOE_CHECK_RECORD_WORDS * 4);
        }
        char op[64];
        snprintf(op, sizeof op, "check_bytes(case %d).record", i);
        check_i32(op, got, want, MOE_CHECK_RECORD_WORDS);
    }
}

/* check_routing's finite zone with nothing to route (its own path on the
 * GPU): clean data, a NaN and an Inf (the first wins), one bad value
 * at the very end, and a record already holding an error. */
static void test_check_finite(const cfg *c) {
    const size_t n = (size_t)T_of(c) * c->E + 3;
    float *v = hrand(n, -5, 5);
    int32_t *clear = halloc(MOE_CHECK_RECORD_WORDS * 4), *taken = halloc(MOE_CHECK_RECORD_WORDS * 4);
    memset(clear, 0, MOE_CHECK_RECORD_WORDS * 4);
    memset(taken, 0, MOE_CHECK_RECORD_WORDS * 4);
    taken[0] = 3, taken[1] = 77;
    const size_t spots[4][2] = {{n, n}, {n / 2, n / 3}, {n - 1, n}, {0, n - 1}};
    for (int i = 0; i < 5; ++i) {
        float *w = hdup(v, n * 4);
        const size_t *sp = spots[i < 4 ? i : 1];
        if (sp[0] < n) w[sp[0]] = NAN;
        if (sp[1] < n) w[sp[1]] = INFINITY;
        const int32_t *start = i < 4 ? clear : taken;
        int32_t *want = hdup(start, MOE_CHECK_RECORD_WORDS * 4);
        const moe_finite_zone hz = {w, n, 21};
        cpu->check_routing(cpu, NULL, &hz, NULL, NULL, NULL, 0, 1, 1, 0, 0, NULL, NULL, NULL, want);
        float *d_w = up(gpu, w, n * 4);
        int32_t *got[2];
        for (int r = 0; r < 2; ++r) {
            int32_t *d_rec = up(gpu, start, MOE_CHECK_RECORD_WORDS * 4);
            const moe_finite_zone dz = {d_w, n, 21};
            gpu->check_routing(gpu, NULL, &dz, NULL, NULL, NULL, 0, 1, 1, 0, 0, NULL, NULL, NULL, d_rec);
            if (!gpu_ok(gpu, "check_routing(finite zone, T=0)")) return;
            got[r] = down(gpu, d_rec, MOE_CHECK_RECORD_WORDS * 4);
        }
        char op[64];
        snprintf(op, sizeof op, "check_routing(finite zone, T=0, case %d).record", i);
        check_i32(op, got, want, MOE_CHECK_RECORD_WORDS);
    }
}

static void test_xent_sums(const cfg *c) {
    const int T = T_of(c);
    float *losses = hrand((size_t)T, 0.0f, 6.0f);
    int32_t *correct = halloc((size_t)T * 4);
    for (int t = 0; t < T; ++t) correct[t] = (int32_t)(moe_test_next(&rng) & 1);
    double want[2];
    cpu->xent_sums(cpu, losses, correct, T, want);
    float *d_losses = up(gpu, losses, (size_t)T * 4);
    int32_t *d_correct = up(gpu, correct, (size_t)T * 4);
    double *got[2];
    for (int r = 0; r < 2; ++r) {
        double *d_out = dpoison(gpu, 2 * sizeof(double), POISON_F32);
        gpu->xent_sums(gpu, d_losses, d_correct, T, d_out);
        if (!gpu_ok(gpu, "xent_sums")) return;
        got[r] = down(gpu, d_out, 2 * sizeof(double));
    }
    double rel = fabs(got[0][0] - want[0]) / fmax(fabs(want[0]), 1e-300);
    if (rel <= TOL_SUMSQ) pass_line("xent_sums.loss_sum", "%.3e", rel);
    else {
        fail_line("xent_sums.loss_sum", "%.3e", rel);
        printf("  expected %.17g got %.17g\n", want[0], got[0][0]);
    }
    if (got[0][1] == want[1]) pass_line("xent_sums.correct:exact", "%.0f", 0.0);
    else {
        fail_line("xent_sums.correct:exact", "%.0f", got[0][1] - want[1]);
        printf("  expected %.17g got %.17g\n", want[1], got[0][1]);
    }
    report_repeat("xent_sums.out", got[0], got[1], 2, sizeof(double));
}

/* sumsq over more elements than the CUDA grid's threads take in one round
 * of their unrolled loop (some 2.2M floats; the vector ops' sizes take the
 * plain loop only), with 16-byte aligned data and, one float on, without. */
static void test_sumsq_large(const cfg *c) {
    if (c != cfgs_first) return;
    const size_t n = ((size_t)1 << 21) + 123457;
    float *x = hrand(n + 1, -3, 3);
    float *d_x = up(gpu, x, (n + 1) * sizeof(float));
    for (int off = 0; off < 2; ++off) {
        const double want = cpu->sumsq(cpu, x + off, n);
        double got[2];
        for (int r = 0; r < 2; ++r) {
            got[r] = gpu->sumsq(gpu, d_x + off, n);
            if (!gpu_ok(gpu, "sumsq")) return;
        }
        char op[64];
        snprintf(op, sizeof op, "sumsq(n=%zu,%s)", n, off ? "unaligned" : "aligned");
        const double rel = fabs(got[0] - want) / fabs(want);
        if (rel <= TOL_SUMSQ) pass_line(op, "%.3e", rel);
        else {
            fail_line(op, "%.3e", rel);
            printf("  expected %.17g got %.17g (tolerance %.0e)\n", want, got[0], TOL_SUMSQ);
        }
        report_repeat(op, &got[0], &got[1], 1, sizeof(double));
    }
}

static void test_clip_grad_norm(const cfg *c) {
    const size_t n = (size_t)c->d * c->hidden + 7;
    float *g = hrand(n, -0.1f, 0.1f);
    const double norm = sqrt(cpu->sumsq(cpu, g, n));
    const double clips[3] = {0.0, 2.0 * norm, 0.25 * norm}; /* off, not reached, clipping */
    float *d_g0 = up(gpu, g, n * 4);
    for (int ci = 0; ci < 3; ++ci) {
        float *want_g = hdup(g, n * 4);
        double want_norm;
        cpu->clip_grad_norm(cpu, want_g, n, clips[ci], &want_norm);
        float *got_g[2];
        double got_norm[2];
        for (int r = 0; r < 2; ++r) {
            float *d_g = dalloc(gpu, n * 4);
            gpu->copy(gpu, d_g, d_g0, n * 4);
            double *d_norm = dpoison(gpu, sizeof(double), POISON_F32);
            gpu->clip_grad_norm(gpu, d_g, n, clips[ci], d_norm);
            if (!gpu_ok(gpu, "clip_grad_norm")) return;
            got_g[r] = down(gpu, d_g, n * 4);
            double *h = down(gpu, d_norm, sizeof(double));
            got_norm[r] = *h;
        }
        char op[64];
        snprintf(op, sizeof op, "clip_grad_norm(clip=%s).g", ci == 0 ? "off" : ci == 1 ? "2 norm" : "norm/4");
        check_f32(op, got_g, want_g, n, TOL_EW);
        if (ci != 2 && memcmp(got_g[0], g, n * 4) != 0) {
            fail_line(op, "%.0f", 1.0);
            printf("  gradients changed although the norm is under the clip\n");
        }
        double rel = fabs(got_norm[0] - want_norm) / want_norm;
        snprintf(op, sizeof op, "clip_grad_norm(clip=%s).norm", ci == 0 ? "off" : ci == 1 ? "2 norm" : "norm/4");
        if (rel <= TOL_SUMSQ) pass_line(op, "%.3e", rel);
        else {
            fail_line(op, "%.3e", rel);
            printf("  expected %.17g got %.17g\n", want_norm, got_norm[0]);
        }
        report_repeat(op, &got_norm[0], &got_norm[1], 1, sizeof(double));
    }
}

/* from_host returns before its copy lands (pinned staging): the source may
 * be overwritten at once, and many small copies in a row (more than the
 * staging holds) must all arrive. */
static void test_from_host_staging(const cfg *c) {
    const size_t chunk = (size_t)(c->d * 32 + 4) * 4; /* ~32 KB: a batch of ids */
    const int copies = 80;                           /* > 2 MiB in all: both halves reused */
    float *src = halloc(chunk), *want = halloc(chunk * copies);
    float **dst = halloc(sizeof(float *) * copies);
    for (int i = 0; i < copies; ++i) {
        moe_test_fill(&rng, src, chunk / 4, -1, 1);
        memcpy(want + (size_t)i * (chunk / 4), src, chunk);
        dst[i] = dalloc(gpu, chunk);
        gpu->from_host(gpu, dst[i], src, chunk);
        memset(src, 0xFF, chunk); /* reuse at once */
    }
    if (!gpu_ok(gpu, "from_host")) return;
    size_t bad = 0;
    for (int i = 0; i < copies; ++i) {
        float *got = down(gpu, dst[i], chunk);
        if (memcmp(got, want + (size_t)i * (chunk / 4), chunk) != 0) ++bad;
    }
    if (!bad) pass_line("from_host(80 staged copies, source reused)", "%.0f", 0.0);
    else {
        fail_line("from_host(80 staged copies, source reused)", "%.0f", (double)bad);
        printf("  %zu of %d copies arrived wrong\n", bad, copies);
    }
}

/* ------------------------------------------------------------------ */
/* Timing ops (benchmarks)                                             */
/* ------------------------------------------------------------------ */

/* Events around a GEMM must give a positive, finite time; the measured GEMM
 * rate must be plausible for a GPU (an H100 gives several hundred TFLOP/s
 * in bf16). Timings are not compared with the CPU. */
static void test_timing(void) {
    const int n = 2048;
    float *a = hrand((size_t)n * n, -1, 1);
    float *d_a = up(gpu, a, (size_t)n * n * 4), *d_c = dalloc(gpu, (size_t)n * n * 4);
    void *ev0 = gpu->event_create(gpu), *ev1 = gpu->event_create(gpu);
    gpu->event_record(gpu, ev0);
    gpu->gemm(gpu, 0, 1, n, n, n, 1.0f, d_a, n, d_a, n, 0.0f, d_c, n);
    gpu->event_record(gpu, ev1);
    float ms = gpu->event_elapsed_ms(gpu, ev0, ev1);
    gpu->event_destroy(gpu, ev0);
    gpu->event_destroy(gpu, ev1);
    double tflops = gpu->measure_gemm_tflops(gpu);
    if (!gpu_ok(gpu, "timing")) return;
    if (ms > 0.0f && ms < 1e4f) {
        pass_line("event_elapsed_ms(2048^3 fp32 gemm)", "%.3f", ms);
    } else {
        fail_line("event_elapsed_ms(2048^3 fp32 gemm)", "%.3f", ms);
        printf("  expected a time in (0, 10000) ms\n");
    }
    if (tflops >= 10.0 && tflops <= 1e4) {
        pass_line("measure_gemm_tflops", "%.1f", tflops);
    } else {
        fail_line("measure_gemm_tflops", "%.1f", tflops);
        printf("  expected a bf16 GEMM rate in [10, 10000] TFLOP/s\n");
    }
}

/* ------------------------------------------------------------------ */
/* Driver                                                              */
/* ------------------------------------------------------------------ */

static int create_gpu(void) {
    char err[512];
    gpu = moe_backend_cuda_create(0, MOE_PRECISION_FP32, err, sizeof err);
    if (!gpu) {
        printf("FAIL moe_backend_cuda_create(fp32): %s\n", err);
        return 0;
    }
    gpu16 = moe_backend_cuda_create(0, MOE_PRECISION_BF16, err, sizeof err);
    if (!gpu16) {
        printf("FAIL moe_backend_cuda_create(bf16): %s\n", err);
        return 0;
    }
    return 1;
}

static void destroy_gpu(void) {
    moe_backend_destroy(gpu);
    moe_backend_destroy(gpu16);
    gpu = gpu16 = NULL;
}

typedef void (*op_test)(const cfg *);

int main(void) {
    if (moe_cuda_device_count() == 0) {
        printf("no CUDA device\n");
        return 77;
    }
    unsigned long long seed;
    const char *env = getenv("MOE_TEST_SEED");
    if (env && *env) {
        seed = strtoull(env, NULL, 0);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        seed = (unsigned long long)ts.tv_sec * 1000000007ULL ^ (unsigned long long)ts.tv_nsec;
    }
    printf("seed %llu (MOE_TEST_SEED=%llu repeats this run)\n", seed, seed);
    rng.s = seed ? seed : 1;
    /* attribute an asynchronous fault to the kernel that caused it */
    setenv("MOE_CUDA_SYNC_CHECK", "1", 0);

    cpu = moe_backend_cpu_create(0);
    if (!cpu || !create_gpu()) return 1;

    static const cfg cfgs[] = {
        /* name    B   S    d    H  E  K  V   hidden */
        {"T2048", 8, 256, 256, 4, 8, 2, 80, 512},
        {"T999", 3, 333, 200, 4, 6, 3, 97, 300},
        {"T1", 1, 1, 40, 2, 4, 2, 5, 24},
    };
    static const op_test tests[] = {
        test_gemm, test_gemm_batched, test_gemm_bias, test_ffn, test_linear_bwd, test_bias, test_bias_batched, test_vector_ops, test_embed,
        test_layernorm, test_rmsnorm, test_act, test_rope, test_attention,
        test_dropout, test_xent, test_adamw, test_capacity, test_dispatch_combine, test_dispatch_fill_counts,
        test_dispatch_gaps, test_aux_losses, test_aux_losses_counts, test_check_routing, test_check_routing_shapes, test_check_routing_finite_zone, test_check_bytes, test_check_finite, test_weight_copies, test_activation_copies,
        test_xent_sums, test_sumsq_large, test_clip_grad_norm, test_from_host_staging,
    };
    cfgs_first = &cfgs[0];
    static const cfg fresh_cfg = {"fresh", 0, 0, 0, 0, 0, 0, 0, 0};
    cur = &fresh_cfg;
    test_capacity_first_call();
    static const cfg timing_cfg = {"timing", 0, 0, 0, 0, 0, 0, 0, 0};
    cur = &timing_cfg;
    test_timing();
    free_all();
    if (need_reset) {
        destroy_gpu();
        need_reset = 0;
        if (!create_gpu()) return 1;
    }
    for (size_t ci = 0; ci < sizeof cfgs / sizeof cfgs[0]; ++ci) {
        cur = &cfgs[ci];
        printf("== %s: B=%d S=%d d=%d H=%d E=%d K=%d V=%d hidden=%d\n", cur->name, cur->B, cur->S, cur->d,
               cur->H, cur->E, cur->K, cur->V, cur->hidden);
        for (size_t ti = 0; ti < sizeof tests / sizeof tests[0]; ++ti) {
            tests[ti](cur);
            free_all();
            /* Every test starts on fresh backends (and after a CUDA error
             * must): an op's first call, before the backend has scratch or
             * tables, is then tested too, and its second call (each test
             * runs the GPU op twice) after them. */
            destroy_gpu();
            need_reset = 0;
            if (!create_gpu()) {
                printf("could not re-create the CUDA backend; stopping\n");
                printf("%d passed, %d failed\n", moe_test_passed_, moe_test_failed_);
                return 1;
            }
        }
    }
    destroy_gpu();
    moe_backend_destroy(cpu);
    printf("%d passed, %d failed\n", moe_test_passed_, moe_test_failed_);
    return moe_test_failed_ ? 1 : 0;
}
