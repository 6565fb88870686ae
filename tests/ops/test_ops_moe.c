/*
 * The MoE routing core of the CPU backend (cpu_moe_ops.c): capacity
 * assignment on cases worked out by hand, combine weights, dispatch and
 * combine against direct references. Their backwards are in test_ops_grad.c.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "test_util.h"

static moe_test_rng rng = {0xC0FFEE1234567ULL};

static int same_i32(const int32_t *a, const int32_t *b, int n) {
    return memcmp(a, b, (size_t)n * sizeof *a) == 0;
}

static void print_i32(const char *name, const int32_t *a, int n) {
    fprintf(stderr, "  %s:", name);
    for (int i = 0; i < n; ++i) fprintf(stderr, " %d", a[i]);
    fputc('\n', stderr);
}

/* Runs capacity_assign with outputs prefilled with garbage (every element
 * must be written) and compares with the expected arrays. */
static void expect_capacity(moe_backend *be, const char *what, const int32_t *expert,
                            const float *weight, int T, int K, int E, int C, int policy,
                            const int32_t *want_kept, const int32_t *want_slot,
                            const int32_t *want_before, const int32_t *want_after) {
    int32_t kept[16], slot[16], before[8], after[8];
    for (int i = 0; i < 16; ++i) kept[i] = slot[i] = 77;
    for (int i = 0; i < 8; ++i) before[i] = after[i] = 77;
    be->capacity_assign(be, expert, weight, T, K, E, C, policy, kept, slot, before, after);
    int ok = same_i32(kept, want_kept, T * K) && same_i32(slot, want_slot, T * K) &&
             same_i32(before, want_before, E) && same_i32(after, want_after, E);
    CHECK_MSG(ok, "capacity_assign: %s", what);
    if (!ok) {
        print_i32("kept", kept, T * K);
        print_i32("slot", slot, T * K);
        print_i32("counts_before", before, E);
        print_i32("counts_after", after, E);
    }
}

static void test_capacity(moe_backend *be) {
    /* T=4, K=1, E=2, C=1. Tokens 0, 1, 3 want expert 0, token 2 expert 1. */
    {
        const int32_t expert[4] = {0, 0, 1, 0};
        const float weight[4] = {0.2f, 0.9f, 0.6f, 0.5f};
        const int32_t before[2] = {3, 1}, after[2] = {1, 1};
        /* "position": token 0 is first in line for expert 0 */
        const int32_t kept_pos[4] = {0, -1, 1, -1}, slot_pos[4] = {0, -1, 0, -1};
        expect_capacity(be, "position policy", expert, weight, 4, 1, 2, 1, 0, kept_pos, slot_pos,
                        before, after);
        /* "probs": token 1 (0.9) outranks token 0 (0.2) and token 3 (0.5) */
        const int32_t kept_prob[4] = {-1, 0, 1, -1}, slot_prob[4] = {-1, 0, 0, -1};
        expect_capacity(be, "probs policy", expert, weight, 4, 1, 2, 1, 1, kept_prob, slot_prob,
                        before, after);
    }
    /* "probs" with a tie: equal weights go to the lower token. T=3, K=1, E=1, C=2:
     * order is token 1 (0.7), token 0 (0.5, lower index), token 2 (0.5). */
    {
        const int32_t expert[3] = {0, 0, 0};
        const float weight[3] = {0.5f, 0.7f, 0.5f};
        const int32_t kept[3] = {0, 0, -1}, slot[3] = {1, 0, -1}, before[1] = {3}, after[1] = {2};
        expect_capacity(be, "probs tie to lower token", expert, weight, 3, 1, 1, 2, 1, kept, slot,
                        before, after);
    }
    /* k-major priority, K=2, E=3, C=2, "position". Choices per token:
     * t0 (0,1), t1 (1,0), t2 (0,2). First choices go first: t0->e0 s0, t1->e1 s0,
     * t2->e0 s1 (e0 now full); then second choices: t0->e1 s1, t1->e0 dropped
     * although t1 precedes t2, t2->e2 s0. */
    {
        const int32_t expert[6] = {0, 1, 1, 0, 0, 2};
        const float weight[6] = {0.6f, 0.4f, 0.7f, 0.3f, 0.5f, 0.5f};
        const int32_t kept[6] = {0, 1, 1, -1, 0, 2}, slot[6] = {0, 1, 0, -1, 1, 0};
        const int32_t before[3] = {3, 2, 1}, after[3] = {2, 2, 1};
        expect_capacity(be, "k-major priority", expert, weight, 3, 2, 3, 2, 0, kept, slot, before,
                        after);
    }
    /* -1 inputs are skipped: not counted, no slot taken. T=3, K=2, E=2.
     * Choices: t0 (0,-1), t1 (-1,1), t2 (1,0). */
    {
        const int32_t expert[6] = {0, -1, -1, 1, 1, 0};
        const float weight[6] = {1.0f, 0.0f, 0.0f, 1.0f, 0.5f, 0.5f};
        const int32_t before[2] = {2, 2};
        /* C=2: everything real fits */
        const int32_t kept2[6] = {0, -1, -1, 1, 1, 0}, slot2[6] = {0, -1, -1, 1, 0, 1};
        const int32_t after2[2] = {2, 2};
        expect_capacity(be, "-1 skipped, C=2", expert, weight, 3, 2, 2, 2, 0, kept2, slot2, before,
                        after2);
        /* C=1: first choices t0->e0, t2->e1 take the only slots */
        const int32_t kept1[6] = {0, -1, -1, -1, 1, -1}, slot1[6] = {0, -1, -1, -1, 0, -1};
        const int32_t after1[2] = {1, 1};
        expect_capacity(be, "-1 skipped, C=1", expert, weight, 3, 2, 2, 1, 0, kept1, slot1, before,
                        after1);
        expect_capacity(be, "-1 skipped, C=1, probs", expert, weight, 3, 2, 2, 1, 1, kept1, slot1,
                        before, after1);
    }
}

static void test_combine_weights(moe_backend *be) {
    /* T=3, K=2: token 0 keeps both, token 1 keeps one, token 2 none */
    const float weight[6] = {0.6f, 0.2f, 0.3f, 0.5f, 0.4f, 0.1f};
    const int32_t kept[6] = {1, 0, -1, 2, -1, -1};
    float cw[6];
    be->combine_weights(be, weight, kept, 3, 2, 0, cw);
    const float raw[6] = {0.6f, 0.2f, 0.0f, 0.5f, 0.0f, 0.0f};
    CHECK(memcmp(cw, raw, sizeof cw) == 0);
    be->combine_weights(be, weight, kept, 3, 2, 1, cw);
    const double renorm[6] = {0.75, 0.25, 0.0, 1.0, 0.0, 0.0};
    for (int i = 0; i < 6; ++i) CHECK_CLOSE(cw[i], renorm[i], 1e-6, 0.0);
}

/* Random routing through capacity_assign, for the dispatch/combine checks. */
static void random_routing(moe_backend *be, int T, int K, int E, int C, int32_t *kept,
                           int32_t *slot) {
    int32_t expert[64], before[8], after[8];
    float weight[64];
    for (int t = 0; t < T; ++t)
        for (int k = 0; k < K; ++k) {
            int e = (int)(moe_test_next(&rng) % (uint64_t)(E + 1)) - 1; /* some -1 */
            expert[t * K + k] = e;
            weight[t * K + k] = moe_test_uniform(&rng, 0.0f, 1.0f);
        }
    be->capacity_assign(be, expert, weight, T, K, E, C, 0, kept, slot, before, after);
}

static void test_dispatch_combine(moe_backend *be) {
    enum { T = 9, K = 2, E = 3, C = 4, d = 5 };
    int32_t kept[T * K], slot[T * K];
    random_routing(be, T, K, E, C, kept, slot);
    float x[T * d], Xe[E * C * d], Ye[E * C * d], cw[T * K], y[T * d];
    moe_test_fill(&rng, x, T * d, -1, 1);
    moe_test_fill(&rng, Xe, E * C * d, 5, 6); /* garbage: rows nobody uses must become 0 */
    be->dispatch(be, x, kept, slot, T, K, C, E, d, NULL, Xe);
    int used[E * C] = {0}, ok = 1;
    for (int a = 0; a < T * K; ++a) {
        if (kept[a] < 0) continue;
        int row = kept[a] * C + slot[a];
        used[row]++;
        ok &= memcmp(Xe + row * d, x + (a / K) * d, d * sizeof(float)) == 0;
    }
    for (int row = 0; row < E * C; ++row) {
        CHECK_MSG(used[row] <= 1, "row %d used twice", row);
        for (int i = 0; i < d && !used[row]; ++i) ok &= Xe[row * d + i] == 0.0f;
    }
    CHECK_MSG(ok, "dispatch rows differ from the tokens routed there");

    moe_test_fill(&rng, Ye, E * C * d, -1, 1);
    moe_test_fill(&rng, cw, T * K, 0, 1);
    moe_test_fill(&rng, y, T * d, 5, 6); /* overwritten */
    be->combine(be, Ye, kept, slot, cw, T, K, C, d, NULL, y);
    /* with a residual: the sum plus it, and bitwise combine then its add */
    float res[T * d], yr[T * d];
    moe_test_fill(&rng, res, T * d, -1, 1);
    moe_test_fill(&rng, yr, T * d, 5, 6); /* overwritten */
    be->combine(be, Ye, kept, slot, cw, T, K, C, d, res, yr);
    double err = 0.0, err_r = 0.0;
    int same = 1;
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < d; ++i) {
            double want = 0.0;
            for (int k = 0; k < K; ++k) {
                int a = t * K + k;
                if (kept[a] >= 0) want += (double)cw[a] * Ye[(kept[a] * C + slot[a]) * d + i];
            }
            err = fmax(err, fabs(y[t * d + i] - want));
            err_r = fmax(err_r, fabs(yr[t * d + i] - (want + res[t * d + i])));
            same &= yr[t * d + i] == y[t * d + i] + res[t * d + i];
        }
    CHECK_MSG(err < 1e-6, "combine: max error %g", err);
    CHECK_MSG(err_r < 1e-6, "combine with a residual: max error %g", err_r);
    CHECK_MSG(same, "combine with a residual != combine then + residual");
}

/* lb = E sum_e f[e] P[e] with P[e] = mean_t softmax(lb_logits[t])[e];
 * z = mean_t logsumexp(logits[t])^2. Gradients are in test_ops_grad.c. */
static void test_aux_losses_values(moe_backend *be) {
    enum { T = 5, E = 4 };
    float lb_logits[T * E], logits[T * E], d_lb[T * E], dlogits[T * E] = {0};
    moe_test_fill(&rng, lb_logits, T * E, -2, 2);
    moe_test_fill(&rng, logits, T * E, -2, 2);
    const float f[E] = {0.4f, 0.1f, 0.3f, 0.2f};
    double lb = -1.0, z = -1.0;
    be->aux_losses(be, lb_logits, logits, f, T, E, 0.5f, 0.25f, d_lb, dlogits, &lb, &z);
    double P[E] = {0}, want_z = 0.0;
    for (int t = 0; t < T; ++t) {
        double mx = -INFINITY, sum = 0.0, mz = -INFINITY, sz = 0.0;
        for (int e = 0; e < E; ++e) mx = fmax(mx, lb_logits[t * E + e]);
        for (int e = 0; e < E; ++e) sum += exp(lb_logits[t * E + e] - mx);
        for (int e = 0; e < E; ++e) P[e] += exp(lb_logits[t * E + e] - mx) / sum / T;
        for (int e = 0; e < E; ++e) mz = fmax(mz, logits[t * E + e]);
        for (int e = 0; e < E; ++e) sz += exp(logits[t * E + e] - mz);
        double lse = mz + log(sz);
        want_z += lse * lse / T;
    }
    double want_lb = 0.0;
    for (int e = 0; e < E; ++e) want_lb += E * f[e] * P[e];
    CHECK_CLOSE(lb, want_lb, 1e-5, 0.0);
    CHECK_CLOSE(z, want_z, 1e-5, 0.0);
    /* uniform routing probabilities give lb = 1 whatever f is */
    float flat[T * E];
    for (int i = 0; i < T * E; ++i) flat[i] = 0.3f;
    be->aux_losses(be, flat, logits, f, T, E, 0.5f, 0.25f, d_lb, dlogits, &lb, &z);
    CHECK_CLOSE(lb, 1.0, 1e-6, 0.0);
}

int main(void) {
    moe_backend *be = moe_backend_cpu_create(2);
    test_capacity(be);
    test_combine_weights(be);
    test_dispatch_combine(be);
    test_aux_losses_values(be);
    moe_backend_destroy(be);
    return moe_test_summary("test_ops_moe");
}
