/*
 * The expert_choice router (Zhou et al. 2022) through its ABI: hand-worked
 * selections, ties, capacity and slots on random inputs, the seed-compatible
 * max_per_token mode, gradients by finite differences, and errors.
 */
#include "router_harness.h"

static rh_router make(const struct moe_router_plugin_v1 *p, int E, int K, int max_tokens, int max_per_token) {
    rh_router r;
    moe_option o = rh_opt_int("max_per_token", max_per_token);
    moe_status st = rh_create(&r, p, rh_dims(E, K, 8, 100, max_tokens, 1.25), &o, 1);
    CHECK_MSG(st == MOE_OK, "create E=%d K=%d max_per_token=%d: %s", E, K, max_per_token, r.msg);
    return r;
}

/* Routes T tokens with capacity C; the caller frees the outputs. */
static rh_call route(rh_router *r, int T, int C, const float *logits) {
    rh_call c = {.T = T, .capacity = C, .logits = logits};
    rh_alloc_outputs(r, &c);
    moe_status st = rh_forward(r, &c);
    CHECK_MSG(st == MOE_OK, "forward T=%d C=%d: %s", T, C, r->msg);
    return c;
}

/* softmax in double, the test's own reference */
static void ref_softmax(const float *l, int E, double *p) {
    double m = l[0], s = 0.0;
    for (int e = 1; e < E; ++e) m = l[e] > m ? l[e] : m;
    for (int e = 0; e < E; ++e) s += (p[e] = exp((double)l[e] - m));
    for (int e = 0; e < E; ++e) p[e] /= s;
}

static void check_row(const rh_call *c, int k_out, int t, const int32_t *ex, const float *w, const int32_t *slot) {
    for (int j = 0; j < k_out; ++j) {
        size_t i = (size_t)t * k_out + j;
        CHECK_MSG(c->expert[i] == ex[j], "token %d entry %d: expert %d, expected %d", t, j, c->expert[i], ex[j]);
        CHECK_CLOSE(c->weight[i], w[j], 0.0, 1e-6);
        if (slot) CHECK_MSG(c->slot[i] == slot[j], "token %d entry %d: slot %d, expected %d", t, j, c->slot[i], slot[j]);
    }
}

static void test_table(const struct moe_router_plugin_v1 *p) {
    rh_check_table(p, "expert_choice", 1);
    rh_router r = make(p, 8, 2, 32, 0);
    CHECK(r.info.k_out == 8);
    CHECK(r.info.flags == (MOE_ROUTER_OWNS_CAPACITY | MOE_ROUTER_DENSE_SLOTS));
    CHECK(r.info.workspace_bytes > 0);
    rh_destroy(&r);
    r = make(p, 8, 2, 32, 3);
    CHECK(r.info.k_out == 3);
    CHECK(r.info.flags == MOE_ROUTER_WEIGHT_SUM_EXACT && r.info.weight_sum == 1.0f);
    rh_destroy(&r);
}

/* T = 4 tokens, E = 2 experts; with two experts S[t,0] = 1 / (1 + e^(l1 - l0)):
 *   t0: l = (ln 3, 0)  S = (3/4, 1/4)
 *   t1: l = (0, 0)     S = (1/2, 1/2)
 *   t2: l = (0, ln 4)  S = (1/5, 4/5)
 *   t3: l = (ln 9, 0)  S = (9/10, 1/10)
 * Expert 0 ranks the tokens by S[:,0] = (.75, .5, .2, .9): t3, t0, t1, t2.
 * Expert 1 ranks them by S[:,1] = (.25, .5, .8, .1): t2, t1, t0, t3. */
static const float HAND_LOGITS[4 * 2] = {1.0986123f, 0.0f, 0.0f, 0.0f, 0.0f, 1.3862944f, 2.1972246f, 0.0f};

static void test_hand_more_tokens_than_capacity(const struct moe_router_plugin_v1 *p) {
    rh_router r = make(p, 2, 1, 4, 0);
    /* C = 1: expert 0 takes t3, expert 1 takes t2; t0 and t1 get nothing. */
    rh_call c = route(&r, 4, 1, HAND_LOGITS);
    const int32_t none[2] = {-1, -1}, t2e[2] = {1, -1}, t3e[2] = {0, -1}, s0[2] = {0, -1};
    const float w0[2] = {0, 0}, t2w[2] = {0.8f, 0}, t3w[2] = {0.9f, 0};
    check_row(&c, 2, 0, none, w0, none);
    check_row(&c, 2, 1, none, w0, none);
    check_row(&c, 2, 2, t2e, t2w, s0);
    check_row(&c, 2, 3, t3e, t3w, s0);
    rh_free_outputs(&c);

    /* C = 3: expert 0 takes t3 (slot 0), t0 (slot 1), t1 (slot 2);
     *        expert 1 takes t2 (slot 0), t1 (slot 1), t0 (slot 2).
     * Tokens list their experts in ascending order. */
    c = route(&r, 4, 3, HAND_LOGITS);
    const int32_t both[2] = {0, 1}, t0s[2] = {1, 2}, t1s[2] = {2, 1};
    const float t0w[2] = {0.75f, 0.25f}, t1w[2] = {0.5f, 0.5f};
    check_row(&c, 2, 0, both, t0w, t0s);
    check_row(&c, 2, 1, both, t1w, t1s);
    check_row(&c, 2, 2, t2e, t2w, s0);
    check_row(&c, 2, 3, t3e, t3w, s0);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

static void test_ties(const struct moe_router_plugin_v1 *p) {
    rh_router r = make(p, 2, 1, 3, 0);
    /* All logits 0: S = 1/2 everywhere, every expert sees a three-way tie
     * and takes the lowest tokens. C = 1: both take t0. C = 2: both take t0
     * (slot 0) and t1 (slot 1). */
    const float zeros[3 * 2] = {0};
    const int32_t both[2] = {0, 1}, none[2] = {-1, -1}, s0[2] = {0, 0}, s1[2] = {1, 1};
    const float half[2] = {0.5f, 0.5f}, w0[2] = {0, 0};
    rh_call c = route(&r, 3, 1, zeros);
    check_row(&c, 2, 0, both, half, s0);
    check_row(&c, 2, 1, none, w0, none);
    check_row(&c, 2, 2, none, w0, none);
    rh_free_outputs(&c);
    c = route(&r, 3, 2, zeros);
    check_row(&c, 2, 0, both, half, s0);
    check_row(&c, 2, 1, both, half, s1);
    check_row(&c, 2, 2, none, w0, none);
    rh_free_outputs(&c);

    /* Experts compare S, not logits: t0 = (1, 0) and t1 = (2, 1) have the
     * same S = (e/(1+e), 1/(1+e)) = (.7311, .2689) (bitwise: softmax shifts by
     * the row max), t2 = (0, 0) has S = (.5, .5). C = 1: expert 0 ties t0 and
     * t1 and takes t0, although t1 has the larger logit; expert 1 takes t2. */
    const float shifted[3 * 2] = {1, 0, 2, 1, 0, 0};
    c = route(&r, 3, 1, shifted);
    const int32_t e0[2] = {0, -1}, e1[2] = {1, -1}, s[2] = {0, -1};
    const float w_t0[2] = {0.7310586f, 0}, w_t2[2] = {0.5f, 0};
    check_row(&c, 2, 0, e0, w_t0, s);
    check_row(&c, 2, 1, none, w0, none);
    check_row(&c, 2, 2, e1, w_t2, s);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* T = 2 < E = 4 and C = 5 > T: capacity is clamped to 2, every expert takes
 * both tokens.
 *   t0: l = (ln 4, 0, 0, 0)  S = (4/7, 1/7, 1/7, 1/7)
 *   t1: l = (0, 0, 0, 0)     S = (1/4, 1/4, 1/4, 1/4)
 * Expert 0: 4/7 > 1/4, t0 slot 0, t1 slot 1. Experts 1-3: 1/4 > 1/7, t1 slot 0, t0 slot 1. */
static void test_fewer_tokens_than_experts(const struct moe_router_plugin_v1 *p) {
    rh_router r = make(p, 4, 2, 2, 0);
    const float l[2 * 4] = {1.3862944f, 0, 0, 0, 0, 0, 0, 0};
    rh_call c = route(&r, 2, 5, l);
    const int32_t all[4] = {0, 1, 2, 3}, t0s[4] = {0, 1, 1, 1}, t1s[4] = {1, 0, 0, 0};
    const float t0w[4] = {4.0f / 7, 1.0f / 7, 1.0f / 7, 1.0f / 7}, t1w[4] = {0.25f, 0.25f, 0.25f, 0.25f};
    check_row(&c, 4, 0, all, t0w, t0s);
    check_row(&c, 4, 1, all, t1w, t1s);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* Random logits: each expert takes exactly C tokens (T >= C), slots are a
 * permutation of 0..C-1 ordered by S, the taken tokens are the top-C by S,
 * rows list ascending experts with weight S[t,e] and trailing -1 entries. */
static void test_random_capacity(const struct moe_router_plugin_v1 *p) {
    enum { T = 64, E = 8 };
    const int C = 20; /* ceil(1.25 * 64 * 2 / 8) */
    rh_router r = make(p, E, 2, T, 0);
    float l[T * E];
    moe_test_rng rng = {12345};
    moe_test_fill(&rng, l, T * E, -3.0f, 3.0f);
    rh_call c = route(&r, T, C, l);
    double S[T][E];
    for (int t = 0; t < T; ++t) ref_softmax(l + t * E, E, S[t]);

    int taker[E][T];   /* token at each slot of each expert, -1 if none */
    int taken[T][E];   /* 1 if expert e took token t */
    memset(taker, 0xff, sizeof taker);
    memset(taken, 0, sizeof taken);
    int bad = 0, dup_slot = 0, bad_order = 0, bad_weight = 0, bad_empty = 0;
    for (int t = 0; t < T; ++t) {
        int prev = -1, ended = 0;
        for (int j = 0; j < E; ++j) {
            int e = c.expert[t * E + j], s = c.slot[t * E + j];
            float w = c.weight[t * E + j];
            if (e < 0) {
                ended = 1;
                bad_empty += e != -1 || s != -1 || w != 0.0f;
                continue;
            }
            bad_order += ended || e <= prev || e >= E;
            if (ended || e <= prev || e >= E) continue;
            prev = e;
            bad += s < 0 || s >= C;
            if (s < 0 || s >= C) continue;
            dup_slot += taker[e][s] != -1;
            taker[e][s] = t;
            taken[t][e] = 1;
            bad_weight += fabs(w - S[t][e]) > 1e-6;
        }
    }
    CHECK(bad == 0 && dup_slot == 0 && bad_order == 0 && bad_weight == 0 && bad_empty == 0);
    int short_expert = 0, not_top = 0, slot_order = 0;
    for (int e = 0; e < E; ++e) {
        double min_taken = 2.0, max_left = -1.0;
        for (int s = 0; s < C; ++s) {
            short_expert += taker[e][s] < 0;
            if (s > 0 && taker[e][s] >= 0 && taker[e][s - 1] >= 0)
                slot_order += S[taker[e][s - 1]][e] < S[taker[e][s]][e];
        }
        for (int t = 0; t < T; ++t) {
            if (taken[t][e]) min_taken = fmin(min_taken, S[t][e]);
            else max_left = fmax(max_left, S[t][e]);
        }
        not_top += min_taken < max_left;
    }
    CHECK_MSG(short_expert == 0, "%d slots unfilled", short_expert);
    CHECK(not_top == 0);
    CHECK(slot_order == 0);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* Seed mode on the hand case above (C = 1: expert 0 takes t3, expert 1 takes t2).
 *   K' = 1: t0 falls back to its top logit e0 (ln 3 > 0); t1 to e0 (tie
 *           0 = 0, lower index); t2 keeps e1, t3 keeps e0; weight 1 each.
 *   K' = 2: t0 falls back to (e0, e1) with softmax(ln 3, 0) = (.75, .25);
 *           t1 to (e0, e1) with (.5, .5); t2 and t3 have one kept expert
 *           and a -1/0 entry. */
static void test_seed_hand(const struct moe_router_plugin_v1 *p) {
    rh_router r = make(p, 2, 1, 4, 1);
    rh_call c = route(&r, 4, 1, HAND_LOGITS);
    const int32_t k1[4] = {0, 0, 1, 0};
    const float one[4] = {1, 1, 1, 1};
    for (int t = 0; t < 4; ++t) check_row(&c, 1, t, k1 + t, one + t, NULL);
    rh_free_outputs(&c);
    rh_destroy(&r);

    r = make(p, 2, 1, 4, 2);
    c = route(&r, 4, 1, HAND_LOGITS);
    const int32_t both[2] = {0, 1}, t2e[2] = {1, -1}, t3e[2] = {0, -1};
    const float t0w[2] = {0.75f, 0.25f}, t1w[2] = {0.5f, 0.5f}, solo[2] = {1, 0};
    check_row(&c, 2, 0, both, t0w, NULL);
    check_row(&c, 2, 1, both, t1w, NULL);
    check_row(&c, 2, 2, t2e, solo, NULL);
    check_row(&c, 2, 3, t3e, solo, NULL);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* The kept experts are ranked among those that took the token, not among
     * all experts. E = 3, C = 1:
     *   t0: l = (2, 1, 0)  S = (e^2, e, 1) / 11.107 = (.6652, .2447, .0900)
     *   t1: l = (5, 0, 0)  S = (e^5, 1, 1) / 150.41 = (.98670, .00665, .00665)
     * Expert 0 takes t1 (.9867 > .6652), experts 1 and 2 take t0.
     *   K' = 1: t0 keeps e1 (logit 1 > 0) although its best logit is e0.
     *   K' = 2: t0 keeps (e1, e2), softmax(1, 0) = (e/(e+1), 1/(e+1)) = (.731059, .268941). */
    const float l3[2 * 3] = {2, 1, 0, 5, 0, 0};
    r = make(p, 3, 1, 2, 1);
    c = route(&r, 2, 1, l3);
    CHECK(c.expert[0] == 1 && c.weight[0] == 1.0f);
    CHECK(c.expert[1] == 0 && c.weight[1] == 1.0f);
    rh_free_outputs(&c);
    rh_destroy(&r);
    r = make(p, 3, 1, 2, 2);
    c = route(&r, 2, 1, l3);
    const int32_t t0k[2] = {1, 2}, t1k[2] = {0, -1};
    const float t0kw[2] = {0.7310586f, 0.2689414f};
    check_row(&c, 2, 0, t0k, t0kw, NULL);
    check_row(&c, 2, 1, t1k, solo, NULL);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* Seed mode on random logits against the paper mode's choice on the same
 * logits: each token keeps min(K', n_taken) of its taken experts, the best
 * by logit; a token nobody took gets its top-K' by logit; weights are
 * softmax over the kept logits and sum to 1. C = 8 with 64 tokens and 8
 * experts gives 64 assignments, so some tokens are taken by no expert. */
static void test_seed_random(const struct moe_router_plugin_v1 *p) {
    enum { T = 64, E = 8, KP = 2 };
    const int C = 8;
    float l[T * E];
    moe_test_rng rng = {777};
    moe_test_fill(&rng, l, T * E, -3.0f, 3.0f);
    rh_router paper = make(p, E, 2, T, 0), seed = make(p, E, 2, T, KP);
    rh_call a = route(&paper, T, C, l), b = route(&seed, T, C, l);
    int fallbacks = 0, bad = 0, bad_sum = 0;
    for (int t = 0; t < T; ++t) {
        const float *lt = l + t * E;
        int taken[E] = {0}, n_taken = 0;
        for (int j = 0; j < E; ++j)
            if (a.expert[t * E + j] >= 0) {
                taken[a.expert[t * E + j]] = 1;
                ++n_taken;
            }
        if (n_taken == 0) {
            ++fallbacks;
            for (int e = 0; e < E; ++e) taken[e] = 1;
        }
        int n_keep = n_taken == 0 ? KP : (n_taken < KP ? n_taken : KP);
        /* expected: the n_keep largest logits among the eligible experts */
        int want[KP];
        for (int j = 0; j < n_keep; ++j) {
            int best = -1;
            for (int e = 0; e < E; ++e) {
                int used = 0;
                for (int q = 0; q < j; ++q) used |= want[q] == e;
                if (taken[e] && !used && (best < 0 || lt[e] > lt[best])) best = e;
            }
            want[j] = best;
        }
        double z = 0.0, sum = 0.0;
        for (int j = 0; j < n_keep; ++j) z += exp((double)lt[want[j]]);
        for (int j = 0; j < KP; ++j) {
            int e = b.expert[t * KP + j];
            float w = b.weight[t * KP + j];
            sum += w;
            if (j < n_keep) bad += e != want[j] || fabs(w - exp((double)lt[want[j]]) / z) > 1e-6;
            else bad += e != -1 || w != 0.0f;
        }
        bad_sum += fabs(sum - 1.0) > 1e-6;
    }
    CHECK_MSG(fallbacks > 0, "the case should contain tokens no expert took");
    CHECK(bad == 0);
    CHECK(bad_sum == 0);
    rh_free_outputs(&a);
    rh_free_outputs(&b);
    rh_destroy(&paper);
    rh_destroy(&seed);
}

/* Backward against central differences of the probe loss. Random logits in
 * [-2, 2] separate the scores by far more than eps = 1e-3 except by rare
 * chance, so almost no coordinate flips a decision; skipped ones are counted. */
static void test_gradients(const struct moe_router_plugin_v1 *p, int max_per_token) {
    enum { T = 6, E = 4 };
    rh_router r = make(p, E, 2, T, max_per_token);
    float l[T * E];
    moe_test_rng rng = {99 + (uint64_t)max_per_token};
    moe_test_fill(&rng, l, T * E, -2.0f, 2.0f);
    rh_call c = {.T = T, .capacity = 3, .logits = l};
    rh_alloc_outputs(&r, &c);
    int skipped = rh_check_gradients(&r, &c, l, NULL, 5, 1e-3f, 1e-2);
    CHECK_MSG(skipped <= T * E / 10, "max_per_token=%d: %d of %d coordinates skipped", max_per_token, skipped, T * E);

    /* dlogits is overwritten, not accumulated, and nonzero somewhere. */
    float cw[T * E], dl1[T * E], dl2[T * E];
    moe_test_fill(&rng, cw, T * E, -1.0f, 1.0f);
    for (int i = 0; i < T * E; ++i) dl2[i] = 50.0f;
    CHECK(rh_forward(&r, &c) == MOE_OK);
    CHECK(rh_backward(&r, &c, cw, NULL, dl1, NULL) == MOE_OK);
    CHECK(rh_backward(&r, &c, cw, NULL, dl2, NULL) == MOE_OK);
    CHECK(memcmp(dl1, dl2, sizeof dl1) == 0);
    double norm = 0.0;
    for (int i = 0; i < T * E; ++i) norm += fabs(dl1[i]);
    CHECK(norm > 1e-3);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

static void test_errors(const struct moe_router_plugin_v1 *p) {
    rh_router r;
    const moe_router_dims d = rh_dims(8, 2, 8, 100, 16, 1.25);
    rh_expect_option_error(p, d, rh_opt_int("capacity", 3), "'capacity'", NULL);
    rh_expect_option_error(p, d, rh_opt_float("max_per_token", 1.5), "'max_per_token'", NULL);
    rh_expect_option_error(p, d, rh_opt_str("max_per_token", "two"), "'max_per_token'", NULL);
    rh_expect_option_error(p, d, rh_opt_int("max_per_token", -1), "'max_per_token'", NULL);
    /* in [0, 1024] but more than E = 8 */
    rh_expect_option_error(p, d, rh_opt_int("max_per_token", 9), "'max_per_token'", "num_experts = 8");
    rh_check_refuses_bad_dims(p, d);

    for (int kp = 0; kp <= 2; kp += 2) {
        r = make(p, 4, 2, 4, kp);
        float l[5 * 4] = {0}; /* room for the T = 5 call below */
        l[2 * 4 + 3] = NAN;
        rh_call c = {.T = 4, .capacity = 2, .logits = l};
        rh_alloc_outputs(&r, &c);
        CHECK(rh_forward(&r, &c) == MOE_ERR_INVALID_ARG);
        CHECK_MSG(strstr(r.msg, "token 2") != NULL && strstr(r.msg, "expert 3") != NULL, "%s", r.msg);
        l[2 * 4 + 3] = 0.0f;
        l[1 * 4 + 0] = -INFINITY;
        CHECK(rh_forward(&r, &c) == MOE_ERR_INVALID_ARG);
        CHECK_MSG(strstr(r.msg, "token 1") != NULL && strstr(r.msg, "expert 0") != NULL, "%s", r.msg);
        float cw[16] = {0}, dl[16];
        CHECK(rh_backward(&r, &c, cw, NULL, dl, NULL) == MOE_ERR_INVALID_ARG);
        l[1 * 4 + 0] = 0.0f;
        c.capacity = -1;
        CHECK(rh_forward(&r, &c) == MOE_ERR_INVALID_ARG);
        c.logits = NULL;
        c.capacity = 2;
        CHECK(rh_forward(&r, &c) == MOE_ERR_INVALID_ARG);
        c.T = 5; /* more than max_tokens: the workspace is too small */
        c.logits = l;
        CHECK(rh_forward(&r, &c) == MOE_ERR_INVALID_ARG);
        rh_free_outputs(&c);

        rh_call z = {.T = 0, .capacity = 0, .logits = NULL}; /* T = 0: a valid no-op */
        rh_alloc_outputs(&r, &z);
        CHECK(rh_forward(&r, &z) == MOE_OK);
        float nothing[1];
        CHECK(rh_backward(&r, &z, nothing, NULL, nothing, NULL) == MOE_OK);
        rh_free_outputs(&z);
        rh_destroy(&r);
    }
}

int main(void) {
    const struct moe_router_plugin_v1 *p = rh_load("expert_choice");
    test_table(p);
    test_hand_more_tokens_than_capacity(p);
    test_ties(p);
    test_fewer_tokens_than_experts(p);
    test_random_capacity(p);
    test_seed_hand(p);
    test_seed_random(p);
    test_gradients(p, 0);
    test_gradients(p, 2);
    test_errors(p);
    return moe_test_summary("test_router_expert_choice");
}
