/*
 * Forward ops of the CPU backend against naive references computed here in
 * double precision (or by hand), on random inputs.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "moe/philox.h"
#include "test_util.h"

static moe_test_rng rng = {0x9E3779B97F4A7C15ULL};

static float *randv(size_t n, float lo, float hi) {
    float *x = malloc((n ? n : 1) * sizeof *x);
    moe_test_fill(&rng, x, n, lo, hi);
    return x;
}

/* Largest |got - want| / (1 + |want|) over n elements. */
static double max_err(const float *got, const double *want, size_t n) {
    double e = 0.0;
    for (size_t i = 0; i < n; ++i) {
        double d = fabs((double)got[i] - want[i]) / (1.0 + fabs(want[i]));
        if (!(d <= e)) e = d; /* also catches NaN */
    }
    return e;
}

/* ------------------------------------------------------------------ */

static void test_table_and_memory(moe_backend *be) {
    CHECK(be != NULL);
    CHECK(strcmp(be->name, "cpu") == 0);
    CHECK(be->device == MOE_DEVICE_CPU);
#define CHECK_OP(f) CHECK_MSG(be->f != NULL, "%s is NULL", #f)
    CHECK_OP(alloc); CHECK_OP(free); CHECK_OP(to_host); CHECK_OP(from_host); CHECK_OP(copy);
    CHECK_OP(zero); CHECK_OP(sync); CHECK_OP(gemm); CHECK_OP(gemm_strided_batched); CHECK_OP(gemm_bias);
    CHECK_OP(add_bias); CHECK_OP(bias_grad); CHECK_OP(add_bias_batched);
    CHECK_OP(bias_grad_batched); CHECK_OP(axpy); CHECK_OP(scale); CHECK_OP(sumsq);
    CHECK_OP(embed_fwd); CHECK_OP(embed_bwd); CHECK_OP(layernorm_fwd); CHECK_OP(layernorm_bwd);
    CHECK_OP(rmsnorm_fwd); CHECK_OP(rmsnorm_bwd); CHECK_OP(act_fwd); CHECK_OP(act_bwd);
    CHECK_OP(rope_fwd); CHECK_OP(rope_bwd); CHECK_OP(attention_fwd); CHECK_OP(attention_bwd);
    CHECK_OP(dropout_fwd); CHECK_OP(dropout_bwd); CHECK_OP(xent_fwd_bwd); CHECK_OP(adamw);
    CHECK_OP(capacity_assign); CHECK_OP(combine_weights); CHECK_OP(combine_weights_bwd);
    CHECK_OP(dispatch); CHECK_OP(dispatch_bwd); CHECK_OP(combine); CHECK_OP(combine_bwd);
    CHECK_OP(mul); CHECK_OP(aux_losses); CHECK_OP(check_routing); CHECK_OP(destroy);
#undef CHECK_OP

    /* alloc: 64-byte aligned and zeroed, for sizes that are not multiples of 64 */
    size_t sizes[] = {0, 1, 63, 100, 4097};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; ++s) {
        unsigned char *p = be->alloc(be, sizes[s]);
        CHECK(p != NULL);
        CHECK(((uintptr_t)p % 64) == 0);
        int zero = 1;
        for (size_t i = 0; i < sizes[s]; ++i) zero &= p[i] == 0;
        CHECK_MSG(zero, "alloc(%zu) not zeroed", sizes[s]);
        be->free(be, p);
    }
    be->free(be, NULL);
    /* a freed block handed out again must be cleared too, not only fresh pages */
    for (int round = 0; round < 2; ++round) {
        unsigned char *p = be->alloc(be, 1000);
        int zero = 1;
        for (int i = 0; i < 1000; ++i) zero &= p[i] == 0;
        CHECK_MSG(zero, "alloc after free not zeroed");
        memset(p, 0xAB, 1000);
        be->free(be, p);
    }

    /* from_host -> copy -> to_host round trip, then zero */
    float host[37], back[37];
    moe_test_fill(&rng, host, 37, -1.0f, 1.0f);
    float *a = be->alloc(be, sizeof host), *b = be->alloc(be, sizeof host);
    be->from_host(be, a, host, sizeof host);
    be->copy(be, b, a, sizeof host);
    be->sync(be);
    be->to_host(be, back, b, sizeof host);
    CHECK(memcmp(host, back, sizeof host) == 0);
    be->zero(be, b, 10 * sizeof(float));
    be->to_host(be, back, b, sizeof host);
    int ok = 1;
    for (int i = 0; i < 37; ++i) ok &= back[i] == (i < 10 ? 0.0f : host[i]);
    CHECK_MSG(ok, "zero() cleared the wrong range");
    be->copy(be, b, a, 0); /* zero bytes: a no-op */
    be->free(be, a);
    be->free(be, b);
}

/* ------------------------------------------------------------------ */

/* Element (i,k) of op(X) where X is stored row-major with leading dimension ld. */
static double at(const float *X, int ld, int trans, int i, int k) {
    return trans ? X[(size_t)k * ld + i] : X[(size_t)i * ld + k];
}

/* C = alpha op(A) op(B) + beta C0 in double, into ref[M*N]. */
static void gemm_ref(int ta, int tb, int M, int N, int K, double alpha, const float *A, int lda,
                     const float *B, int ldb, double beta, const float *C0, int ldc, double *ref) {
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            double s = 0.0;
            for (int k = 0; k < K; ++k) s += at(A, lda, ta, i, k) * at(B, ldb, tb, k, j);
            ref[(size_t)i * N + j] = alpha * s + beta * C0[(size_t)i * ldc + j];
        }
}

/* Compare C (leading dimension ldc) with ref[M*N]; the padding columns must equal C0's. */
static void check_gemm_result(const char *what, const float *C, const float *C0, int ldc,
                              const double *ref, int M, int N) {
    double err = 0.0;
    int pad_ok = 1;
    for (int i = 0; i < M; ++i) {
        double e = max_err(C + (size_t)i * ldc, ref + (size_t)i * N, (size_t)N);
        if (e > err) err = e;
        for (int j = N; j < ldc; ++j) pad_ok &= C[(size_t)i * ldc + j] == C0[(size_t)i * ldc + j];
    }
    CHECK_MSG(err < 1e-5, "%s: max error %g", what, err);
    CHECK_MSG(pad_ok, "%s: wrote outside the M x N block", what);
}

static void test_gemm(moe_backend *be) {
    const int M = 13, N = 11, K = 9;
    const float alpha = 1.5f, beta = 0.5f;
    for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb) {
            /* padded leading dimensions, so a mix-up of ld and width shows */
            int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 4;
            float *A = randv((size_t)(ta ? K : M) * lda, -1, 1);
            float *B = randv((size_t)(tb ? N : K) * ldb, -1, 1);
            float *C0 = randv((size_t)M * ldc, -1, 1);
            float *C = malloc((size_t)M * ldc * sizeof *C);
            double *ref = malloc((size_t)M * N * sizeof *ref);
            memcpy(C, C0, (size_t)M * ldc * sizeof *C);
            be->gemm(be, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
            gemm_ref(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C0, ldc, ref);
            char what[32];
            snprintf(what, sizeof what, "gemm ta=%d tb=%d", ta, tb);
            check_gemm_result(what, C, C0, ldc, ref, M, N);
            free(A), free(B), free(C0), free(C), free(ref);
        }
}

static void test_gemm_batched(moe_backend *be) {
    const int M = 6, N = 5, K = 7, batch = 3;
    for (int ta = 0; ta < 2; ++ta) {
        int tb = !ta;
        int lda = (ta ? M : K) + 1, ldb = (tb ? K : N) + 1, ldc = N + 2;
        /* strides larger than one matrix: gaps between the batch entries */
        long long sA = (long long)(ta ? K : M) * lda + 5, sB = (long long)(tb ? N : K) * ldb + 3,
                  sC = (long long)M * ldc + 7;
        float *A = randv((size_t)sA * batch, -1, 1), *B = randv((size_t)sB * batch, -1, 1);
        float *C0 = randv((size_t)sC * batch, -1, 1);
        float *C = malloc((size_t)sC * batch * sizeof *C);
        double *ref = malloc((size_t)M * N * sizeof *ref);
        memcpy(C, C0, (size_t)sC * batch * sizeof *C);
        be->gemm_strided_batched(be, ta, tb, M, N, K, -0.75f, A, lda, sA, B, ldb, sB, 2.0f, C, ldc,
                                 sC, batch);
        for (int i = 0; i < batch; ++i) {
            gemm_ref(ta, tb, M, N, K, -0.75, A + i * sA, lda, B + i * sB, ldb, 2.0, C0 + i * sC,
                     ldc, ref);
            char what[48];
            snprintf(what, sizeof what, "batched ta=%d tb=%d entry %d", ta, tb, i);
            check_gemm_result(what, C + i * sC, C0 + i * sC, ldc, ref, M, N);
            /* the gap after each entry is untouched */
            int gap_ok = 1;
            for (long long j = (long long)M * ldc; j < sC; ++j)
                gap_ok &= C[i * sC + j] == C0[i * sC + j];
            CHECK_MSG(gap_ok, "%s: wrote into the gap between entries", what);
        }
        free(A), free(B), free(C0), free(C), free(ref);
    }
}

/* gemm_bias against a double-precision triple loop (with transposes, gaps
 * between products, padded rows, a bias per product or one for all, none),
 * the gaps and padding of C untouched; and with packed rows bitwise equal to
 * gemm_strided_batched followed by add_bias_batched, as backend.h says.
 * With a residual (laid out as C): the loop's sum plus the residual, and
 * bitwise the result without it followed by the residual's add. */
static void test_gemm_bias(moe_backend *be) {
    const struct { int ta, tb, M, N, K, batch, gap, pad, bias_mode; } cases[] = {
        {0, 0, 9, 7, 5, 3, 0, 0, 1}, {1, 0, 6, 11, 4, 2, 3, 0, 1}, {0, 1, 5, 8, 13, 4, 1, 2, 2},
        {1, 1, 7, 3, 6, 1, 0, 1, 1}, {0, 0, 12, 10, 3, 2, 2, 0, 0}, {0, 0, 4, 5, 0, 2, 1, 0, 1}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ++ci) {
        const int ta = cases[ci].ta, tb = cases[ci].tb, M = cases[ci].M, N = cases[ci].N, K = cases[ci].K;
        const int batch = cases[ci].batch, gap = cases[ci].gap, pad = cases[ci].pad, bm = cases[ci].bias_mode;
        const int a_rows = ta ? K : M, a_cols = ta ? M : K, lda = a_cols + pad;
        const int b_rows = tb ? N : K, b_cols = tb ? K : N, ldb = b_cols + pad, ldc = N + pad;
        const long long sA = (long long)a_rows * lda + gap, sB = (long long)b_rows * ldb + gap;
        const long long sC = (long long)M * ldc + gap, sbias = bm == 1 ? N + gap : 0;
        const size_t nA = (size_t)sA * batch, nB = (size_t)sB * batch, nC = (size_t)sC * batch;
        const size_t nbias = bm == 1 ? (size_t)sbias * batch : (size_t)N;
        float *A = randv(nA, -1, 1), *B = randv(nB, -1, 1), *C0 = randv(nC, -1, 1), *bias = randv(nbias, -1, 1);
        float *C = malloc(nC * sizeof *C);
        double *ref = malloc(nC * sizeof *ref);
        memcpy(C, C0, nC * sizeof *C);
        for (size_t i = 0; i < nC; ++i) ref[i] = C0[i];
        for (int e = 0; e < batch; ++e)
            for (int m = 0; m < M; ++m)
                for (int n = 0; n < N; ++n) {
                    double acc = bm ? bias[e * sbias + n] : 0.0;
                    for (int k = 0; k < K; ++k) {
                        double a = ta ? A[e * sA + (long long)k * lda + m] : A[e * sA + (long long)m * lda + k];
                        double b = tb ? B[e * sB + (long long)n * ldb + k] : B[e * sB + (long long)k * ldb + n];
                        acc += a * b;
                    }
                    ref[e * sC + (long long)m * ldc + n] = acc;
                }
        be->gemm_bias(be, ta, tb, M, N, K, A, lda, sA, B, ldb, sB, bm ? bias : NULL, sbias, NULL, C, ldc, sC,
                      batch);
        CHECK_MSG(max_err(C, ref, nC) < 1e-5, "gemm_bias vs double loop (case %zu): %g", ci, max_err(C, ref, nC));
        {
            float *R = randv(nC, -1, 1), *CR = malloc(nC * sizeof *CR), *CplusR = malloc(nC * sizeof *CplusR);
            double *refR = malloc(nC * sizeof *refR);
            memcpy(CR, C0, nC * sizeof *CR);
            memcpy(CplusR, C, nC * sizeof *CplusR);
            memcpy(refR, ref, nC * sizeof *refR);
            for (int e = 0; e < batch; ++e)
                for (int m = 0; m < M; ++m)
                    for (int n = 0; n < N; ++n) {
                        const long long i = e * sC + (long long)m * ldc + n;
                        refR[i] += R[i];
                        CplusR[i] += R[i];
                    }
            be->gemm_bias(be, ta, tb, M, N, K, A, lda, sA, B, ldb, sB, bm ? bias : NULL, sbias, R, CR, ldc, sC,
                          batch);
            CHECK_MSG(max_err(CR, refR, nC) < 1e-5, "gemm_bias + residual vs double loop (case %zu): %g", ci,
                      max_err(CR, refR, nC));
            CHECK_MSG(memcmp(CR, CplusR, nC * sizeof *CR) == 0,
                      "gemm_bias with a residual != gemm_bias then + residual (case %zu)", ci);
            free(R), free(CR), free(CplusR), free(refR);
        }
        if (pad == 0 && bm) {
            float *C2 = malloc(nC * sizeof *C2);
            memcpy(C2, C0, nC * sizeof *C2);
            be->gemm_strided_batched(be, ta, tb, M, N, K, 1.0f, A, lda, sA, B, ldb, sB, 0.0f, C2, ldc, sC, batch);
            be->add_bias_batched(be, C2, bias, batch, M, N, sC, sbias);
            CHECK_MSG(memcmp(C, C2, nC * sizeof *C) == 0, "gemm_bias != gemm + add_bias_batched (case %zu)", ci);
            free(C2);
        }
        free(A), free(B), free(C0), free(bias), free(C), free(ref);
    }
}

/* The batched bias ops against a loop of add_bias / bias_grad over the
 * entries: bitwise equal, with packed and padded strides (the gap between
 * entries must stay untouched). */
static void test_bias_batched(moe_backend *be) {
    const struct { int batch, T, N, pad_y, pad_b; } cases[] = {
        {1, 5, 7, 0, 0}, {4, 37, 45, 0, 0}, {8, 64, 128, 0, 0}, {3, 19, 33, 11, 5}, {5, 1, 17, 3, 2},
        {6, 130, 20, 0, 0}, {2, 0, 9, 0, 0}, {0, 4, 4, 0, 0}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ++ci) {
        const int batch = cases[ci].batch, T = cases[ci].T, N = cases[ci].N;
        const long long sy = (long long)T * N + cases[ci].pad_y, sb = N + cases[ci].pad_b;
        const size_t ny = (size_t)(batch > 0 ? batch : 1) * (size_t)sy;
        const size_t nb = (size_t)(batch > 0 ? batch : 1) * (size_t)sb;
        float *y0 = randv(ny, -1, 1), *b = randv(nb, -1, 1), *db0 = randv(nb, -1, 1);
        float *y1 = malloc(ny * sizeof *y1), *y2 = malloc(ny * sizeof *y2);
        float *db1 = malloc(nb * sizeof *db1), *db2 = malloc(nb * sizeof *db2);
        memcpy(y1, y0, ny * sizeof *y1), memcpy(y2, y0, ny * sizeof *y2);
        memcpy(db1, db0, nb * sizeof *db1), memcpy(db2, db0, nb * sizeof *db2);
        for (int e = 0; e < batch; ++e) {
            be->add_bias(be, y1 + e * sy, b + e * sb, T, N);
            be->bias_grad(be, y0 + e * sy, db1 + e * sb, T, N);
        }
        be->add_bias_batched(be, y2, b, batch, T, N, sy, sb);
        be->bias_grad_batched(be, y0, db2, batch, T, N, sy, sb);
        CHECK_MSG(memcmp(y1, y2, ny * sizeof *y1) == 0, "add_bias_batched != loop (case %zu)", ci);
        CHECK_MSG(memcmp(db1, db2, nb * sizeof *db1) == 0, "bias_grad_batched != loop (case %zu)", ci);
        free(y0), free(b), free(db0), free(y1), free(y2), free(db1), free(db2);
    }
}

static void test_bias_and_vector_ops(moe_backend *be) {
    const int T = 37, N = 45; /* N not a multiple of the 16-column blocks */
    float *y0 = randv((size_t)T * N, -1, 1), *b = randv(N, -1, 1);
    float *y = malloc((size_t)T * N * sizeof *y);
    double *ref = malloc((size_t)T * N * sizeof *ref);
    memcpy(y, y0, (size_t)T * N * sizeof *y);
    be->add_bias(be, y, b, T, N);
    for (int t = 0; t < T; ++t)
        for (int j = 0; j < N; ++j) ref[(size_t)t * N + j] = (double)y0[(size_t)t * N + j] + b[j];
    CHECK_MSG(max_err(y, ref, (size_t)T * N) < 1e-6, "add_bias");

    /* bias_grad accumulates a column sum onto what db held */
    float *db = randv(N, -1, 1);
    double colsum[45];
    for (int j = 0; j < N; ++j) {
        colsum[j] = db[j];
        for (int t = 0; t < T; ++t) colsum[j] += y0[(size_t)t * N + j];
    }
    be->bias_grad(be, y0, db, T, N);
    CHECK_MSG(max_err(db, colsum, N) < 1e-5, "bias_grad");

    /* axpy, scale */
    size_t n = 1001;
    float *x = randv(n, -2, 2), *z = randv(n, -2, 2);
    double *want = malloc(n * sizeof *want);
    for (size_t i = 0; i < n; ++i) want[i] = (double)z[i] + 0.3 * (double)x[i];
    be->axpy(be, 0.3f, x, z, n);
    CHECK_MSG(max_err(z, want, n) < 1e-6, "axpy");
    for (size_t i = 0; i < n; ++i) want[i] = (double)x[i] * -1.7;
    be->scale(be, x, -1.7f, n);
    CHECK_MSG(max_err(x, want, n) < 1e-6, "scale");
    for (size_t i = 0; i < n; ++i) want[i] = (double)x[i] * z[i];
    float *prod = malloc(n * sizeof *prod);
    be->mul(be, x, z, prod, n);
    CHECK_MSG(max_err(prod, want, n) < 1e-6, "mul");
    free(prod);

    /* sumsq: double accumulation, several sizes including empty */
    size_t sizes[] = {0, 1, 3, 255, 257, 100003};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; ++s) {
        float *v = randv(sizes[s], -3, 3);
        double r = 0.0;
        for (size_t i = 0; i < sizes[s]; ++i) r += (double)v[i] * v[i];
        double got = be->sumsq(be, v, sizes[s]);
        CHECK_MSG(fabs(got - r) <= 1e-12 * (1.0 + r), "sumsq n=%zu: %.17g vs %.17g", sizes[s], got,
                  r);
        free(v);
    }
    free(y0), free(b), free(y), free(ref), free(db), free(x), free(z), free(want);
}

/* ------------------------------------------------------------------ */

static void test_embedding(moe_backend *be) {
    const int V = 7, B = 2, S = 5, d = 20;
    int32_t ids[10] = {3, 0, 6, 3, 3, 1, 1, 5, 2, 0};
    float *wte = randv((size_t)V * d, -1, 1), *wpe = randv((size_t)S * d, -1, 1);
    float *out = malloc((size_t)B * S * d * sizeof *out);
    double *ref = malloc((size_t)B * S * d * sizeof *ref);
    for (int with_pos = 0; with_pos < 2; ++with_pos) {
        be->embed_fwd(be, ids, wte, with_pos ? wpe : NULL, out, B, S, d);
        for (int b = 0; b < B; ++b)
            for (int s = 0; s < S; ++s)
                for (int i = 0; i < d; ++i) {
                    size_t o = ((size_t)b * S + s) * d + i;
                    ref[o] = wte[(size_t)ids[b * S + s] * d + i];
                    if (with_pos) ref[o] += wpe[(size_t)s * d + i];
                }
        CHECK_MSG(max_err(out, ref, (size_t)B * S * d) < 1e-6, "embed_fwd wpe=%d", with_pos);
    }
    free(wte), free(wpe), free(out), free(ref);
}

static void test_norms(moe_backend *be) {
    const int T = 7, d = 37;
    const float eps = 1e-5f;
    float *x = randv((size_t)T * d, -2, 3), *g = randv(d, 0.5f, 1.5f), *b = randv(d, -0.5f, 0.5f);
    for (int t = 0; t < T; ++t) /* rows with different offsets and spreads */
        for (int i = 0; i < d; ++i)
            x[(size_t)t * d + i] = x[(size_t)t * d + i] * (1.0f + t) + 0.5f * t;
    float *y = malloc((size_t)T * d * sizeof *y), mean[7], rstd[7];
    double *ref = malloc((size_t)T * d * sizeof *ref), ref_mean[7], ref_rstd[7];

    be->layernorm_fwd(be, x, g, b, y, mean, rstd, T, d, eps);
    for (int t = 0; t < T; ++t) {
        const float *xr = x + (size_t)t * d;
        double m = 0.0, var = 0.0;
        for (int i = 0; i < d; ++i) m += xr[i];
        m /= d;
        for (int i = 0; i < d; ++i) var += (xr[i] - m) * (xr[i] - m);
        var /= d;
        ref_mean[t] = m;
        ref_rstd[t] = 1.0 / sqrt(var + eps);
        for (int i = 0; i < d; ++i)
            ref[(size_t)t * d + i] = (xr[i] - m) * ref_rstd[t] * g[i] + b[i];
    }
    CHECK_MSG(max_err(y, ref, (size_t)T * d) < 1e-5, "layernorm_fwd y");
    CHECK_MSG(max_err(mean, ref_mean, T) < 1e-6, "layernorm_fwd mean");
    CHECK_MSG(max_err(rstd, ref_rstd, T) < 1e-5, "layernorm_fwd rstd");

    be->rmsnorm_fwd(be, x, g, y, rstd, T, d, eps);
    for (int t = 0; t < T; ++t) {
        const float *xr = x + (size_t)t * d;
        double ms = 0.0;
        for (int i = 0; i < d; ++i) ms += (double)xr[i] * xr[i];
        ref_rstd[t] = 1.0 / sqrt(ms / d + eps);
        for (int i = 0; i < d; ++i) ref[(size_t)t * d + i] = xr[i] * ref_rstd[t] * g[i];
    }
    CHECK_MSG(max_err(y, ref, (size_t)T * d) < 1e-5, "rmsnorm_fwd y");
    CHECK_MSG(max_err(rstd, ref_rstd, T) < 1e-5, "rmsnorm_fwd rstd");
    free(x), free(g), free(b), free(y), free(ref);
}

static double gelu_ref(double x) {
    const double pi = acos(-1.0);
    return 0.5 * x * (1.0 + tanh(sqrt(2.0 / pi) * (x + 0.044715 * x * x * x)));
}
static double silu_ref(double x) { return x / (1.0 + exp(-x)); }

static void test_activations(moe_backend *be) {
    const int T = 5, n = 24;
    float *in = randv((size_t)T * 2 * n, -6, 6);
    float *out = malloc((size_t)T * n * sizeof *out);
    double *ref = malloc((size_t)T * n * sizeof *ref);

    be->act_fwd(be, MOE_ACT_GELU, in, out, T, n);
    for (int i = 0; i < T * n; ++i) ref[i] = gelu_ref(in[i]);
    CHECK_MSG(max_err(out, ref, (size_t)T * n) < 1e-6, "gelu");

    be->act_fwd(be, MOE_ACT_SILU, in, out, T, n);
    for (int i = 0; i < T * n; ++i) ref[i] = silu_ref(in[i]);
    CHECK_MSG(max_err(out, ref, (size_t)T * n) < 1e-6, "silu");

    /* SwiGLU: in row = [gate | up] */
    be->act_fwd(be, MOE_ACT_SWIGLU, in, out, T, n);
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < n; ++i)
            ref[t * n + i] = silu_ref(in[t * 2 * n + i]) * (double)in[t * 2 * n + n + i];
    CHECK_MSG(max_err(out, ref, (size_t)T * n) < 1e-6, "swiglu");
    free(in), free(out), free(ref);
}

/* ------------------------------------------------------------------ */

/* B=1, S=2, H=1, hd=4: token 0 (angle 0) is unchanged; token 1 rotates pair
 * (0,1) by 1 rad and pair (2,3) by 1 * 10000^(-2/4) = 0.01 rad; v untouched. */
static void test_rope_by_hand(moe_backend *be) {
    float qkv[24], orig[24];
    for (int i = 0; i < 24; ++i) qkv[i] = orig[i] = (float)(i < 12 ? 0.1 * (i + 1) : i - 11);
    /* token 1: q = 1 2 3 4, k = 5 6 7 8, v = 9 10 11 12 */
    be->rope_fwd(be, qkv, 1, 2, 1, 4, 10000.0f);
    double c1 = cos(1.0), s1 = sin(1.0), c2 = cos(0.01), s2 = sin(0.01);
    double want[24];
    for (int i = 0; i < 24; ++i) want[i] = orig[i];
    for (int part = 0; part < 2; ++part) { /* q, then k */
        double a = 1 + 4 * part, b = 2 + 4 * part, c = 3 + 4 * part, d = 4 + 4 * part;
        double *w = want + 12 + 4 * part;
        w[0] = a * c1 - b * s1;
        w[1] = a * s1 + b * c1;
        w[2] = c * c2 - d * s2;
        w[3] = c * s2 + d * c2;
    }
    CHECK_MSG(max_err(qkv, want, 24) < 1e-6, "rope_fwd hand case");
    CHECK(memcmp(qkv, orig, 12 * sizeof(float)) == 0);         /* position 0 unchanged */
    CHECK(memcmp(qkv + 20, orig + 20, 4 * sizeof(float)) == 0); /* v unchanged */
    /* the inverse rotation brings it back */
    be->rope_bwd(be, qkv, 1, 2, 1, 4, 10000.0f);
    for (int i = 0; i < 24; ++i) want[i] = orig[i];
    CHECK_MSG(max_err(qkv, want, 24) < 1e-6, "rope_bwd undoes rope_fwd");
}

static void attention_ref(const float *qkv, double *out, double *probs, int B, int S, int H,
                          int hd) {
    int C = H * hd;
    double *a = malloc((size_t)S * sizeof *a);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int s = 0; s < S; ++s) {
                const float *q = qkv + ((size_t)b * S + s) * 3 * C + h * hd;
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j <= s; ++j) {
                    const float *k = qkv + ((size_t)b * S + j) * 3 * C + C + h * hd;
                    double dot = 0.0;
                    for (int i = 0; i < hd; ++i) dot += (double)q[i] * k[i];
                    a[j] = dot / sqrt((double)hd);
                    if (a[j] > mx) mx = a[j];
                }
                for (int j = 0; j <= s; ++j) sum += exp(a[j] - mx);
                double *p = probs + (((size_t)b * H + h) * S + s) * S;
                for (int j = 0; j < S; ++j) p[j] = j <= s ? exp(a[j] - mx) / sum : 0.0;
                double *o = out + ((size_t)b * S + s) * C + h * hd;
                for (int i = 0; i < hd; ++i) {
                    o[i] = 0.0;
                    for (int j = 0; j <= s; ++j)
                        o[i] += p[j] * qkv[((size_t)b * S + j) * 3 * C + 2 * C + h * hd + i];
                }
            }
    free(a);
}

static void test_attention(moe_backend *be) {
    const int B = 2, S = 6, H = 2, hd = 4, C = H * hd;
    size_t nqkv = (size_t)B * S * 3 * C, nout = (size_t)B * S * C, np = (size_t)B * H * S * S;
    float *qkv = randv(nqkv, -2, 2);
    float *out = malloc(nout * sizeof *out);
    float *probs = randv(np, 5, 6); /* garbage: must be overwritten */
    double *ref_out = malloc(nout * sizeof *ref_out), *ref_p = malloc(np * sizeof *ref_p);
    be->attention_fwd(be, qkv, out, probs, B, S, H, hd);
    attention_ref(qkv, ref_out, ref_p, B, S, H, hd);
    CHECK_MSG(max_err(out, ref_out, nout) < 1e-5, "attention out");
    CHECK_MSG(max_err(probs, ref_p, np) < 1e-6, "attention probs");
    int upper_zero = 1;
    for (int bh = 0; bh < B * H; ++bh)
        for (int s = 0; s < S; ++s)
            for (int j = s + 1; j < S; ++j)
                upper_zero &= probs[((size_t)bh * S + s) * S + j] == 0.0f;
    CHECK_MSG(upper_zero, "probs above the diagonal are not 0");

    /* causality: changing the last token's k and v leaves earlier outputs bit for bit */
    float *out2 = malloc(nout * sizeof *out2);
    for (int b = 0; b < B; ++b)
        for (int i = C; i < 3 * C; ++i) qkv[((size_t)b * S + S - 1) * 3 * C + i] += 1.0f;
    be->attention_fwd(be, qkv, out2, probs, B, S, H, hd);
    int causal = 1;
    for (int b = 0; b < B; ++b)
        causal &= memcmp(out + (size_t)b * S * C, out2 + (size_t)b * S * C,
                         (size_t)(S - 1) * C * sizeof(float)) == 0;
    CHECK_MSG(causal, "an earlier output depends on a later token");
    free(qkv), free(out), free(out2), free(probs), free(ref_out), free(ref_p);
}

/* ------------------------------------------------------------------ */

static void test_xent(moe_backend *be) {
    enum { T = 6, V = 13 };
    float *logits = randv((size_t)T * V, -3, 3);
    int32_t targets[T] = {4, 0, 12, -1, 1, 7};
    /* row 4: a tie for the max at 1 and 5, target 1 -> correct (lower index wins) */
    logits[4 * V + 1] = logits[4 * V + 5] = 9.0f;
    /* row 5: huge logits, only finite with the max subtracted; target is the argmax */
    for (int j = 0; j < V; ++j) logits[5 * V + j] += 1000.0f;
    logits[5 * V + 7] = 1004.0f;
    /* row 0: the target is the argmax; rows 1 and 2: the target is the minimum */
    logits[0 * V + 4] = 5.0f;
    logits[1 * V + 0] = -5.0f;
    logits[2 * V + 12] = -5.0f;
    float losses[T], dl[T * V];
    int32_t correct[T];
    const float scale = 0.25f;
    be->xent_fwd_bwd(be, logits, targets, T, V, losses, correct, dl, scale);
    for (int t = 0; t < T; ++t) {
        const float *l = logits + t * V;
        if (targets[t] < 0) {
            int zero = losses[t] == 0.0f && correct[t] == 0;
            for (int j = 0; j < V; ++j) zero &= dl[t * V + j] == 0.0f;
            CHECK_MSG(zero, "ignored row %d not zero", t);
            continue;
        }
        double mx = l[0], sum = 0.0;
        int argmax = 0;
        for (int j = 1; j < V; ++j)
            if (l[j] > mx) mx = l[j], argmax = j;
        for (int j = 0; j < V; ++j) sum += exp(l[j] - mx);
        double loss = mx + log(sum) - l[targets[t]];
        CHECK_CLOSE(losses[t], loss, 1e-5, 1e-6);
        CHECK_MSG(correct[t] == (argmax == targets[t]), "row %d correct=%d", t, correct[t]);
        double g[V];
        for (int j = 0; j < V; ++j) g[j] = scale * (exp(l[j] - mx) / sum - (j == targets[t]));
        CHECK_MSG(max_err(dl + t * V, g, V) < 1e-6, "dlogits row %d", t);
    }
    CHECK(correct[0] == 1 && correct[4] == 1 && correct[5] == 1);
    CHECK(correct[1] == 0 && correct[2] == 0);
    /* the tie row with the target on the higher index is not correct */
    targets[4] = 5;
    float losses2[T];
    be->xent_fwd_bwd(be, logits, targets, T, V, losses2, correct, NULL, scale); /* no dlogits */
    CHECK(correct[4] == 0);
    CHECK(memcmp(losses, losses2, 4 * sizeof(float)) == 0);
    free(logits);
}

/* ------------------------------------------------------------------ */

static void test_dropout(moe_backend *be) {
    const size_t n = 100000;
    const float p = 0.3f;
    moe_rng_key key = {1234, 7, 2, MOE_RNG_STREAM_DROPOUT};
    float *x = randv(n, 0.5f, 1.5f); /* nonzero, so a zero output means dropped */
    float *y = malloc(n * sizeof *y), *y2 = malloc(n * sizeof *y2);
    be->dropout_fwd(be, x, y, n, p, key);
    size_t kept = 0;
    int exact = 1;
    const float scale = 1.0f / (1.0f - p);
    for (size_t i = 0; i < n; ++i) {
        int keep = moe_rng_uniform(key, i) > p; /* the contract, element by element */
        exact &= y[i] == (keep ? x[i] * scale : 0.0f);
        kept += y[i] != 0.0f;
    }
    CHECK_MSG(exact, "dropout_fwd differs from mask[i] = uniform(key,i) > p");
    double mean = (double)n * (1.0 - p), sigma = sqrt((double)n * p * (1.0 - p));
    CHECK_MSG(fabs((double)kept - mean) < 4.0 * sigma, "kept %zu of %zu, expected %.0f", kept, n,
              mean);

    be->dropout_fwd(be, x, y2, n, p, key);
    CHECK_MSG(memcmp(y, y2, n * sizeof *y) == 0, "same key, different mask");
    moe_rng_key other = key;
    other.step += 1;
    be->dropout_fwd(be, x, y2, n, p, other);
    size_t differ = 0;
    for (size_t i = 0; i < n; ++i) differ += (y[i] == 0.0f) != (y2[i] == 0.0f);
    /* independent masks disagree on 2 p (1-p) = 42% of the elements */
    CHECK_MSG(differ > n / 4, "different key: only %zu mask bits differ", differ);

    /* backward regenerates the same mask */
    be->dropout_bwd(be, x, y2, n, p, key);
    CHECK_MSG(memcmp(y, y2, n * sizeof *y) == 0, "dropout_bwd mask differs from forward");

    /* p = 0 copies; odd n exercises the tail of a Philox block */
    be->dropout_fwd(be, x, y, 1001, 0.0f, key);
    CHECK(memcmp(x, y, 1001 * sizeof *x) == 0);
    be->dropout_bwd(be, x, y2, 1001, 0.0f, key);
    CHECK(memcmp(x, y2, 1001 * sizeof *x) == 0);
    free(x), free(y), free(y2);
}

/* ------------------------------------------------------------------ */

/* Two AdamW steps worked out here in double. */
static void test_adamw(moe_backend *be) {
    enum { n = 4 };
    const double lr = 0.01, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
    float p[n] = {0.5f, -1.0f, 2.0f, 0.25f}, m[n] = {0}, v[n] = {0};
    float p_nodecay[n], m2[n] = {0}, v2[n] = {0};
    memcpy(p_nodecay, p, sizeof p);
    const float g[2][n] = {{0.1f, -0.2f, 0.3f, 0.0f}, {-0.05f, 0.4f, 0.0f, 1e-3f}};
    const uint8_t decay[n] = {1, 0, 1, 0};
    double rp[n], rm[n] = {0}, rv[n] = {0}, rq[n];
    for (int i = 0; i < n; ++i) rp[i] = rq[i] = p[i];
    for (int step = 1; step <= 2; ++step) {
        be->adamw(be, p, g[step - 1], m, v, decay, n, (float)lr, (float)b1, (float)b2, (float)eps,
                  (float)wd, step, NULL, 0.0);
        be->adamw(be, p_nodecay, g[step - 1], m2, v2, NULL, n, (float)lr, (float)b1, (float)b2,
                  (float)eps, (float)wd, step, NULL, 0.0);
        double bc1 = 1.0 - pow(b1, step), bc2 = 1.0 - pow(b2, step);
        for (int i = 0; i < n; ++i) {
            double gi = g[step - 1][i];
            rm[i] = b1 * rm[i] + (1.0 - b1) * gi;
            rv[i] = b2 * rv[i] + (1.0 - b2) * gi * gi;
            double upd = (rm[i] / bc1) / (sqrt(rv[i] / bc2) + eps);
            rp[i] -= lr * (upd + wd * decay[i] * rp[i]);
            rq[i] -= lr * upd;
        }
        for (int i = 0; i < n; ++i) {
            CHECK_CLOSE(m[i], rm[i], 1e-6, 1e-9);
            CHECK_CLOSE(v[i], rv[i], 1e-6, 1e-12);
            CHECK_CLOSE(p[i], rp[i], 1e-6, 1e-7);
            CHECK_CLOSE(p_nodecay[i], rq[i], 1e-6, 1e-7);
        }
    }
    /* the decayed elements moved differently from the undecayed run */
    CHECK(p[0] != p_nodecay[0] && p[1] == p_nodecay[1]);
}

/* check_routing's finite zone alone (nothing to route). */
static void check_finite(moe_backend *be, const float *v, size_t n, int32_t code, int32_t *rec) {
    const moe_finite_zone zone = {v, n, code};
    be->check_routing(be, NULL, &zone, NULL, NULL, NULL, 0, 1, 1, 0, 0, NULL, NULL, NULL, rec);
}

/* The finite zone records the first non-finite value, and only into a clear record. */
static void test_check_finite(moe_backend *be) {
    float v[8] = {1.0f, -2.0f, 0.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f};
    int32_t rec[MOE_CHECK_RECORD_WORDS] = {0};
    check_finite(be, v, 8, 9, rec);
    CHECK(rec[0] == 0);
    v[5] = NAN;
    v[3] = -INFINITY;
    check_finite(be, v, 8, 9, rec);
    int32_t bits;
    memcpy(&bits, &v[3], sizeof bits);
    CHECK(rec[0] == 9 && rec[1] == 3 && rec[2] == 0 && rec[3] == bits);
    check_finite(be, v + 4, 4, 11, rec); /* the first error stays */
    CHECK(rec[0] == 9 && rec[1] == 3);
    memset(rec, 0, sizeof rec);
    check_finite(be, v + 4, 4, 11, rec);
    CHECK(rec[0] == 11 && rec[1] == 1);
}

/* check_routing's finite zone: checked after the guard zone and before the
 * assignments, recorded as check_finite records it. */
static void test_check_routing_finite_zone(moe_backend *be) {
    float logits[6] = {0.5f, -1.0f, 2.0f, 0.25f, 3.0f, -4.0f};
    const int32_t expert[2] = {0, 1};
    float weight[2] = {0.5f, 0.5f};
    uint8_t guard[4] = {7, 7, 7, 7};
    const moe_guard_zone gz = {guard, 4, 7, 21};
    const moe_finite_zone fz = {logits, 6, 22};
    int32_t rec[MOE_CHECK_RECORD_WORDS] = {0};
    be->check_routing(be, &gz, &fz, expert, weight, NULL, 2, 1, 2, 0, 0, NULL, NULL, NULL, rec);
    CHECK(rec[0] == 0); /* all valid */
    weight[1] = NAN;    /* an assignment's fault alone */
    be->check_routing(be, &gz, &fz, expert, weight, NULL, 2, 1, 2, 0, 0, NULL, NULL, NULL, rec);
    CHECK(rec[0] == MOE_CHECK_WEIGHT && rec[1] == 1);
    memset(rec, 0, sizeof rec);
    logits[4] = INFINITY; /* a non-finite logit goes before it */
    logits[5] = NAN;
    be->check_routing(be, &gz, &fz, expert, weight, NULL, 2, 1, 2, 0, 0, NULL, NULL, NULL, rec);
    int32_t bits;
    memcpy(&bits, &logits[4], sizeof bits);
    CHECK(rec[0] == 22 && rec[1] == 4 && rec[2] == 0 && rec[3] == bits && rec[4] == 6);
    memset(rec, 0, sizeof rec);
    guard[2] = 0; /* and the guard zone before both */
    be->check_routing(be, &gz, &fz, expert, weight, NULL, 2, 1, 2, 0, 0, NULL, NULL, NULL, rec);
    CHECK(rec[0] == 21 && rec[1] == 2);
    memset(rec, 0, sizeof rec);
    be->check_routing(be, NULL, NULL, expert, weight, NULL, 2, 1, 2, 0, 0, NULL, NULL, NULL, rec);
    CHECK(rec[0] == MOE_CHECK_WEIGHT); /* no zones: the assignments alone */
}

/* Clipping folded into AdamW: with a norm above clip, the update is bit for
 * bit clip_grad_norm's scaling followed by an unclipped update, and g stays
 * as it was; with the norm at or below clip (or no norm), nothing is scaled. */
static void test_adamw_clip(moe_backend *be) {
    enum { n = 5 };
    const float g0[n] = {0.3f, -1.7f, 2.5f, 0.0f, 1e-3f};
    const uint8_t decay[n] = {1, 0, 1, 1, 0};
    const double norms[] = {6.0, 1.0, 0.25}; /* clip 1.0: scaled, at the limit, below it */
    for (int ni = 0; ni < 3; ++ni) {
        float pa[n] = {0.5f, -1.0f, 2.0f, 0.25f, 3.0f}, ma[n] = {0.1f, 0, 0, -0.2f, 0}, va[n] = {0.01f, 0, 0, 0.5f, 0};
        float pb[n], mb[n], vb[n], ga[n], gb[n];
        memcpy(pb, pa, sizeof pa), memcpy(mb, ma, sizeof ma), memcpy(vb, va, sizeof va);
        memcpy(ga, g0, sizeof g0), memcpy(gb, g0, sizeof g0);
        const double norm = norms[ni];
        be->adamw(be, pa, ga, ma, va, decay, n, 0.01f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, &norm, 1.0);
        if (norm > 1.0) be->scale(be, gb, (float)(1.0 / norm), n); /* what clip_grad_norm does */
        be->adamw(be, pb, gb, mb, vb, decay, n, 0.01f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, NULL, 0.0);
        CHECK(memcmp(pa, pb, sizeof pa) == 0 && memcmp(ma, mb, sizeof ma) == 0 && memcmp(va, vb, sizeof va) == 0);
        CHECK(memcmp(ga, g0, sizeof g0) == 0);
        /* the clipped run moved p by about 1/norm of the unclipped step's first moment */
        if (ni == 0) CHECK_CLOSE(ma[1], 0.9f * 0.0f + 0.1f * (-1.7f / 6.0f), 1e-6, 1e-9);
    }
}

int main(void) {
    moe_backend *be = moe_backend_cpu_create(2);
    test_table_and_memory(be);
    test_gemm(be);
    test_gemm_batched(be);
    test_gemm_bias(be);
    test_bias_and_vector_ops(be);
    test_bias_batched(be);
    test_embedding(be);
    test_norms(be);
    test_activations(be);
    test_rope_by_hand(be);
    test_attention(be);
    test_xent(be);
    test_dropout(be);
    test_adamw(be);
    test_adamw_clip(be);
    test_check_finite(be);
    test_check_routing_finite_zone(be);
    moe_backend_destroy(be);
    return moe_test_summary("test_ops_dense");
}
