/*
 * topk_hard router plugin, tested through its ABI (loaded with dlopen).
 *
 * Expected values are worked out by hand in the comments. The fixed-weight
 * options have no gradient (backward writes zeros); the straight-through
 * option's backward is deliberately not the gradient of its forward, so it is
 * checked by hand and against finite differences of its surrogate, the
 * softmax over the selected logits, computed here in double precision.
 */
#include "router_harness.h"

static const struct moe_router_plugin_v1 *plugin;

/* An instance with E experts and [moe].top_k = K (a failure ends the program). */
static void make(rh_router *r, int E, int K, const moe_option *opts, int n_opts) {
    rh_create_or_exit(r, plugin, rh_dims(E, K, 4, 0, 64, 1.25), opts, n_opts);
}

/* ---- the table and the info ------------------------------------------------ */

static void test_table(void) {
    rh_check_table(plugin, "topk_hard", 1);
    rh_check_option(plugin, 0, "weight", MOE_OPT_STRING, "uniform", "uniform|st|one", 0.0, 0.0);
}

static void test_info(void) {
    rh_router r;

    make(&r, 8, 3, NULL, 0); /* uniform: 1/K each, sums to 1, no gradient */
    CHECK(r.info.k_out == 3);
    CHECK(r.info.flags == (MOE_ROUTER_NO_GRAD | MOE_ROUTER_WEIGHT_SUM_EXACT));
    CHECK(r.info.weight_sum == 1.0f);
    CHECK(r.info.n_params == 0 && r.info.n_buffers == 0);
    rh_destroy(&r);

    moe_option st = rh_opt_str("weight", "st");
    make(&r, 8, 3, &st, 1); /* straight-through: sums to 1, has a (surrogate) gradient */
    CHECK(r.info.k_out == 3);
    CHECK(r.info.flags == MOE_ROUTER_WEIGHT_SUM_EXACT);
    CHECK(r.info.weight_sum == 1.0f);
    rh_destroy(&r);

    moe_option one = rh_opt_str("weight", "one");
    make(&r, 8, 3, &one, 1); /* seed bench: 1 each, sums to K = 3 */
    CHECK(r.info.k_out == 3);
    CHECK(r.info.flags == (MOE_ROUTER_NO_GRAD | MOE_ROUTER_WEIGHT_SUM_EXACT));
    CHECK(r.info.weight_sum == 3.0f);
    rh_destroy(&r);
}

/* ---- forward, by hand ------------------------------------------------------- */

static void test_forward_hand(void) {
    rh_router r;
    rh_call c;

    /* l = [0.5, 3, -1, 2, 2.5], K = 2: the two largest are 3 (expert 1) then
     * 2.5 (expert 4), largest first; weight 1/2 each. */
    const float l[] = {0.5f, 3, -1, 2, 2.5f};
    make(&r, 5, 2, NULL, 0);
    CHECK(rh_route(&r, 1, l, &c) == MOE_OK);
    CHECK(c.expert[0] == 1 && c.expert[1] == 4);
    CHECK(c.weight[0] == 0.5f && c.weight[1] == 0.5f);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* weight = "one": same experts, weight 1 each. */
    moe_option one = rh_opt_str("weight", "one");
    make(&r, 5, 2, &one, 1);
    CHECK(rh_route(&r, 1, l, &c) == MOE_OK);
    CHECK(c.expert[0] == 1 && c.expert[1] == 4);
    CHECK(c.weight[0] == 1.0f && c.weight[1] == 1.0f);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* weight = "st": the forward pass is the uniform one. */
    moe_option st = rh_opt_str("weight", "st");
    make(&r, 5, 2, &st, 1);
    CHECK(rh_route(&r, 1, l, &c) == MOE_OK);
    CHECK(c.expert[0] == 1 && c.expert[1] == 4);
    CHECK(c.weight[0] == 0.5f && c.weight[1] == 0.5f);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* Ties go to the lower index.
     *   Row 0 = [1, 1, 1, 1, 1]: all tied, the first K = 3 indices 0, 1, 2.
     *   Row 1 = [0, 2, 2, 1, 2]: three tied at 2, taken in index order 1, 2, 4;
     *   the 1 at index 3 loses. Weight 1/3 each. */
    const float ties[] = {1, 1, 1, 1, 1, 0, 2, 2, 1, 2};
    make(&r, 5, 3, NULL, 0);
    CHECK(rh_route(&r, 2, ties, &c) == MOE_OK);
    CHECK(c.expert[0] == 0 && c.expert[1] == 1 && c.expert[2] == 2);
    CHECK(c.expert[3] == 1 && c.expert[4] == 2 && c.expert[5] == 4);
    for (int i = 0; i < 6; ++i) CHECK(c.weight[i] == 1.0f / 3.0f);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

static void test_forward_shapes(void) {
    rh_router r;
    rh_call c;

    /* K = E: every expert, ordered by logit. l = [0.1, 0.4, 0.3, 0.2] gives
     * 1, 2, 3, 0 with weight 1/4 each. */
    const float all[] = {0.1f, 0.4f, 0.3f, 0.2f};
    make(&r, 4, 4, NULL, 0);
    CHECK(rh_route(&r, 1, all, &c) == MOE_OK);
    CHECK(c.expert[0] == 1 && c.expert[1] == 2 && c.expert[2] == 3 && c.expert[3] == 0);
    for (int i = 0; i < 4; ++i) CHECK(c.weight[i] == 0.25f);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* Every token to the same experts: 3 leads, 0 is second in every row. */
    const float same[] = {5, 0, 0, 6, 0, 1, -1, -1, 2, -1, 0, -5, -5, 0.5f, -5};
    make(&r, 5, 2, NULL, 0);
    CHECK(rh_route(&r, 3, same, &c) == MOE_OK);
    for (int t = 0; t < 3; ++t) CHECK(c.expert[2 * t] == 3 && c.expert[2 * t + 1] == 0);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* T < E: one token, eight experts; the two largest are 7 (at 5) and 2 (at 4). */
    const float few[] = {0, 1, 4, 0, 3, 0, 2, 5};
    make(&r, 8, 2, NULL, 0);
    CHECK(rh_route(&r, 1, few, &c) == MOE_OK);
    CHECK(c.expert[0] == 7 && c.expert[1] == 2);
    rh_free_outputs(&c);

    /* T = 0 is a valid call that touches nothing, even with NULL pointers. */
    CHECK(rh_forward_raw(&r, 0, 8, 2, NULL, NULL, NULL) == MOE_OK);
    CHECK(rh_backward_raw(&r, 0, 8, 2, NULL, NULL, NULL) == MOE_OK);
    rh_destroy(&r);
}

/* ---- backward ------------------------------------------------------------ */

static void test_no_grad_writes_zeros(void) {
    const char *kinds[] = {"uniform", "one"};
    for (int k = 0; k < 2; ++k) {
        rh_router r;
        rh_call c;
        moe_option o = rh_opt_str("weight", kinds[k]);
        make(&r, 4, 2, &o, 1);
        const float l[] = {1, 0, 2, -1, 0, 3, 1, 2};
        const float g[] = {0.5f, -1, 2, 0.25f};
        float dl[8];
        for (int i = 0; i < 8; ++i) dl[i] = i % 2 ? NAN : 123.0f; /* garbage the host left there */
        CHECK(rh_route(&r, 2, l, &c) == MOE_OK);
        CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_OK);
        for (int i = 0; i < 8; ++i) CHECK_MSG(dl[i] == 0.0f, "weight=%s dl[%d] = %g", kinds[k], i, dl[i]);
        rh_free_outputs(&c);
        rh_destroy(&r);
    }
}

static void test_st_backward_hand(void) {
    rh_router r;
    rh_call c;
    moe_option st = rh_opt_str("weight", "st");
    make(&r, 4, 2, &st, 1);

    /* l = [1, 0, 2, -1], K = 2: idx = [2, 0]. Surrogate weights, softmax over
     * the selected logits 2 and 1:
     *   w = [e / (1 + e), 1 / (1 + e)] = [0.731058579, 0.268941421]
     * g = [0.5, -1]:
     *   sum_i w_i g_i = 0.365529289 - 0.268941421 = 0.096587868
     *   dl_2 = w_0 (g_0 - 0.096587868) = 0.731058579 *  0.403412132 =  0.294917900
     *   dl_0 = w_1 (g_1 - 0.096587868) = 0.268941421 * -1.096587868 = -0.294917900
     *   dl_1 = dl_3 = 0 (not selected). */
    const float l[] = {1, 0, 2, -1};
    const float g[] = {0.5f, -1};
    float dl[4] = {7, 7, 7, 7}; /* overwritten, not accumulated */
    CHECK(rh_route(&r, 1, l, &c) == MOE_OK);
    CHECK(c.expert[0] == 2 && c.expert[1] == 0);
    CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_OK);
    CHECK_CLOSE(dl[2], 0.294917900, 1e-5, 1e-7);
    CHECK_CLOSE(dl[0], -0.294917900, 1e-5, 1e-7);
    CHECK(dl[1] == 0.0f && dl[3] == 0.0f);

    /* The host drops the second assignment: it marks it -1 and passes
     * dweight 0 there. The surrogate softmax still runs over both selected
     * logits, g = [0.5, 0]:
     *   sum_i w_i g_i = 0.731058579 * 0.5 = 0.365529289
     *   dl_2 = 0.731058579 * (0.5 - 0.365529289) =  0.098305967
     *   dl_0 = 0.268941421 * (0   - 0.365529289) = -0.098305967 */
    c.expert[1] = -1;
    CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_OK);
    CHECK_CLOSE(dl[2], 0.098305967, 1e-5, 1e-7);
    CHECK_CLOSE(dl[0], -0.098305967, 1e-5, 1e-7);
    CHECK(dl[1] == 0.0f && dl[3] == 0.0f);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* Sum_k g_k softmax(l[idx])_k for one row, in double: the function whose
 * gradient the straight-through backward returns. */
static double surrogate(const float *l, const int32_t *idx, const float *g, int K, int bump, double eps) {
    double z[64], m = -INFINITY, s = 0.0, L = 0.0;
    for (int k = 0; k < K; ++k) {
        z[k] = (double)l[idx[k]] + (idx[k] == bump ? eps : 0.0);
        m = fmax(m, z[k]);
    }
    for (int k = 0; k < K; ++k) s += exp(z[k] - m);
    for (int k = 0; k < K; ++k) L += g[k] * exp(z[k] - m) / s;
    return L;
}

static void test_st_backward_fd(void) {
    enum { T = 5, E = 6 };
    for (int K = 1; K <= 4; K += 3) { /* K = 1 (surrogate weight is 1, no gradient) and K = 4 */
        rh_router r;
        rh_call c;
        moe_option st = rh_opt_str("weight", "st");
        make(&r, E, K, &st, 1);
        float l[T * E], g[T * 4], dl[T * E];
        rh_gapped_logits(1234 + (uint64_t)K, T, E, l);
        moe_test_rng rng = {77};
        moe_test_fill(&rng, g, (size_t)T * K, -1.0f, 1.0f);
        CHECK(rh_route(&r, T, l, &c) == MOE_OK);
        CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_OK);
        const double eps = 1e-4;
        for (int t = 0; t < T; ++t)
            for (int j = 0; j < E; ++j) {
                const float *row = l + (size_t)t * E;
                const int32_t *idx = c.expert + (size_t)t * K;
                const float *gt = g + (size_t)t * K;
                double num = (surrogate(row, idx, gt, K, j, eps) - surrogate(row, idx, gt, K, j, -eps)) / (2 * eps);
                CHECK_MSG(fabs(num - dl[t * E + j]) <= 1e-5 + 1e-4 * fabs(num),
                          "K=%d dl[%d,%d]: analytic %.8g surrogate %.8g", K, t, j, dl[t * E + j], num);
            }
        rh_free_outputs(&c);
        rh_destroy(&r);
    }
}

/* ---- bad options, bad dims, bad inputs --------------------------------------- */

static void test_bad_options(void) {
    const moe_router_dims dims = rh_dims(4, 2, 4, 0, 16, 1.0);
    rh_expect_option_error(plugin, dims, rh_opt_str("gate", "none"), "gate", "weight"); /* unknown */
    rh_expect_option_error(plugin, dims, rh_opt_float("weight", 0.5), "weight", NULL); /* wrong type */
    rh_expect_option_error(plugin, dims, rh_opt_str("weight", "soft"), "weight", "soft"); /* bad choice */
    rh_check_refuses_bad_dims(plugin, dims);
}

static void test_bad_inputs(void) {
    rh_router r;
    moe_option st = rh_opt_str("weight", "st");
    make(&r, 4, 2, &st, 1);
    rh_check_refuses_nonfinite_logits(&r);

    const float l[8] = {0, 1, 2, 3, 3, 2, 1, 0};
    int32_t expert[4];
    float weight[4];
    rh_check_refuses_missing_args(&r, l);
    CHECK(rh_forward_raw(&r, 2, 3, 2, l, expert, weight) == MOE_ERR_INVALID_ARG); /* E differs from create */
    CHECK(rh_forward_raw(&r, 2, 4, 3, l, expert, weight) == MOE_ERR_INVALID_ARG); /* k_out differs from K */
    CHECK_MSG(strstr(r.msg, "k_out = 3") != NULL, "msg: %s", r.msg);
    /* and the good call still works: row 0 = [0, 1, 2, 3], row 1 = [3, 2, 1, 0] */
    CHECK(rh_forward_raw(&r, 2, 4, 2, l, expert, weight) == MOE_OK);
    CHECK(expert[0] == 3 && expert[1] == 2 && expert[2] == 0 && expert[3] == 1);
    rh_destroy(&r);
}

static void test_determinism(void) {
    const char *kinds[] = {"uniform", "st", "one"};
    for (int k = 0; k < 3; ++k) {
        rh_router r;
        enum { T = 64, E = 16, K = 4 };
        float l[T * E], g[T * K];
        moe_test_rng rng = {99};
        moe_test_fill(&rng, l, T * E, -4.0f, 4.0f);
        moe_test_fill(&rng, g, T * K, -1.0f, 1.0f);
        moe_option o = rh_opt_str("weight", kinds[k]);
        make(&r, E, K, &o, 1);
        rh_check_determinism(&r, T, l, g);
        rh_destroy(&r);
    }
}

int main(void) {
    plugin = rh_load("topk_hard");
    test_table();
    test_info();
    test_forward_hand();
    test_forward_shapes();
    test_no_grad_writes_zeros();
    test_st_backward_hand();
    test_st_backward_fd();
    test_bad_options();
    test_bad_inputs();
    test_determinism();
    return moe_test_summary("test_router_topk_hard");
}
