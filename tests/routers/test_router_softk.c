/*
 * softk router plugin, tested through its ABI (loaded with dlopen).
 *
 * Expected values are worked out by hand in the comments; gradients are
 * checked against hand values and against central finite differences of the
 * forward pass (rh_check_gradients) for both normalizations and several
 * temperatures.
 */
#include "router_harness.h"

static const struct moe_router_plugin_v1 *plugin;

/* An instance with E experts and [moe].top_k = K (a failure ends the program). */
static void make(rh_router *r, int E, int K, const moe_option *opts, int n_opts) {
    rh_create_or_exit(r, plugin, rh_dims(E, K, 4, 0, 64, 1.25), opts, n_opts);
}

/* An instance with the given normalize and temperature. */
static void make_nt(rh_router *r, int E, int K, const char *normalize, double temperature) {
    moe_option o[2] = {rh_opt_str("normalize", normalize), rh_opt_float("temperature", temperature)};
    make(r, E, K, o, 2);
}

/* ---- the table and the info ------------------------------------------------ */

static void test_table(void) {
    rh_check_table(plugin, "softk", 2);
    rh_check_option(plugin, 0, "temperature", MOE_OPT_FLOAT, "1.0", NULL, 1e-3, 1e3);
    rh_check_option(plugin, 1, "normalize", MOE_OPT_STRING, "softmax", "softmax|sum", 0.0, 0.0);
}

static void test_info(void) {
    const char *norms[] = {"softmax", "sum"};
    for (int i = 0; i < 2; ++i) {
        rh_router r;
        make_nt(&r, 8, 3, norms[i], 1.0);
        CHECK(r.info.k_out == 3);
        /* Weights depend on l (no NO_GRAD) and sum to 1 per token. */
        CHECK(r.info.flags == MOE_ROUTER_WEIGHT_SUM_EXACT);
        CHECK(r.info.weight_sum == 1.0f);
        CHECK(r.info.n_params == 0 && r.info.n_buffers == 0);
        rh_destroy(&r);
    }
    rh_router r;
    make(&r, 8, 2, NULL, 0); /* defaults */
    CHECK(r.info.k_out == 2 && r.info.flags == MOE_ROUTER_WEIGHT_SUM_EXACT);
    rh_destroy(&r);
}

/* ---- forward, by hand ------------------------------------------------------- */

static void test_forward_hand(void) {
    rh_router r;
    rh_call c;
    const float l[] = {1, 0, 2, -1};

    /* l = [1, 0, 2, -1], K = 2: idx = [2, 0]; softmax over the selected 2 and 1:
     *   w = [e^2, e^1] / (e^2 + e^1) = [e / (1 + e), 1 / (1 + e)]
     *     = [2.718281828 / 3.718281828, 1 / 3.718281828] = [0.731058579, 0.268941421] */
    make(&r, 4, 2, NULL, 0);
    CHECK(rh_route(&r, 1, l, &c) == MOE_OK);
    CHECK(c.expert[0] == 2 && c.expert[1] == 0);
    CHECK_CLOSE(c.weight[0], 0.731058579, 1e-6, 0);
    CHECK_CLOSE(c.weight[1], 0.268941421, 1e-6, 0);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* temperature 0.5 sharpens: the selected logits become 4 and 2,
     *   w = [e^2 / (1 + e^2), 1 / (1 + e^2)] = [7.389056099 / 8.389056099, ...]
     *     = [0.880797078, 0.119202922] */
    make_nt(&r, 4, 2, "softmax", 0.5);
    CHECK(rh_route(&r, 1, l, &c) == MOE_OK);
    CHECK(c.expert[0] == 2 && c.expert[1] == 0); /* the choice does not change */
    CHECK_CLOSE(c.weight[0], 0.880797078, 1e-6, 0);
    CHECK_CLOSE(c.weight[1], 0.119202922, 1e-6, 0);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* temperature 2 flattens: the selected logits become 1 and 0.5,
     *   w = [1 / (1 + e^-0.5), e^-0.5 / (1 + e^-0.5)] = [1 / 1.606530660, ...]
     *     = [0.622459331, 0.377540669]
     * Given as the integer 2, which a number option accepts. */
    moe_option t2 = rh_opt_int("temperature", 2);
    make(&r, 4, 2, &t2, 1);
    CHECK(rh_route(&r, 1, l, &c) == MOE_OK);
    CHECK_CLOSE(c.weight[0], 0.622459331, 1e-6, 0);
    CHECK_CLOSE(c.weight[1], 0.377540669, 1e-6, 0);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* normalize = sum, same row: p = softmax(l) over all four,
     *   Z = e^1 + e^0 + e^2 + e^-1 = 2.718281828 + 1 + 7.389056099 + 0.367879441 = 11.475217368
     *   p_2 = 7.389056099 / 11.475217368 = 0.643914260
     *   p_0 = 2.718281828 / 11.475217368 = 0.236882818
     *   S   = 0.880797078
     *   w   = [0.643914260 / 0.880797078, 0.236882818 / 0.880797078] = [0.731058579, 0.268941421]
     * the softmax-over-selected values again: Z cancels in the ratio. */
    make_nt(&r, 4, 2, "sum", 1.0);
    CHECK(rh_route(&r, 1, l, &c) == MOE_OK);
    CHECK(c.expert[0] == 2 && c.expert[1] == 0);
    CHECK_CLOSE(c.weight[0], 0.731058579, 1e-6, 0);
    CHECK_CLOSE(c.weight[1], 0.268941421, 1e-6, 0);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* Where the floor binds the two differ. l = [0, -30, -40], K = 2: idx = [0, 1].
     *   p_1 = e^-30 / (1 + e^-30 + e^-40) = 9.3576e-14 < 1e-9, so c_1 = 1e-9
     *   p_0 = 1 - 9.4e-14 = 1 in float, S = 1 + 1e-9
     *   sum:     w = [1 / (1 + 1e-9), 1e-9 / (1 + 1e-9)] = [1, 1e-9]
     *   softmax: w_1 = e^-30 / (1 + e^-30) = 9.3576e-14 */
    const float far[] = {0, -30, -40};
    make_nt(&r, 3, 2, "sum", 1.0);
    CHECK(rh_route(&r, 1, far, &c) == MOE_OK);
    CHECK(c.expert[0] == 0 && c.expert[1] == 1);
    CHECK_CLOSE(c.weight[0], 1.0, 1e-6, 0);
    CHECK_CLOSE(c.weight[1], 1e-9, 1e-4, 0);
    rh_free_outputs(&c);
    rh_destroy(&r);
    make_nt(&r, 3, 2, "softmax", 1.0);
    CHECK(rh_route(&r, 1, far, &c) == MOE_OK);
    CHECK_CLOSE(c.weight[1], 9.3576e-14, 1e-3, 0);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

static void test_forward_shapes(void) {
    rh_router r;
    rh_call c;

    /* Ties go to the lower index: [2, 2, 2], K = 2 picks 0 and 1, 1/2 each. */
    const float ties[] = {2, 2, 2};
    make(&r, 3, 2, NULL, 0);
    CHECK(rh_route(&r, 1, ties, &c) == MOE_OK);
    CHECK(c.expert[0] == 0 && c.expert[1] == 1);
    CHECK(c.weight[0] == 0.5f && c.weight[1] == 0.5f);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* K = E: l = [0, ln 2, ln 3] gives every expert, ordered 2, 1, 0, with
     * w = [3, 2, 1] / (1 + 2 + 3) = [1/2, 1/3, 1/6], for both normalizations. */
    const float logs[] = {0.0f, 0.693147181f, 1.098612289f};
    const char *norms[] = {"softmax", "sum"};
    for (int i = 0; i < 2; ++i) {
        make_nt(&r, 3, 3, norms[i], 1.0);
        CHECK(rh_route(&r, 1, logs, &c) == MOE_OK);
        CHECK(c.expert[0] == 2 && c.expert[1] == 1 && c.expert[2] == 0);
        CHECK_CLOSE(c.weight[0], 1.0 / 2.0, 1e-6, 0);
        CHECK_CLOSE(c.weight[1], 1.0 / 3.0, 1e-6, 0);
        CHECK_CLOSE(c.weight[2], 1.0 / 6.0, 1e-6, 0);
        rh_free_outputs(&c);
        rh_destroy(&r);
    }

    /* K = 1: the single weight is exactly 1, and no gradient flows
     * (w (g - w g) = 1 (g - g) = 0). */
    for (int i = 0; i < 2; ++i) {
        const float l[] = {0.3f, -1, 2, 0.5f, 4, 1};
        const float g[] = {0.7f, -2};
        float dl[6] = {7, 7, 7, 7, 7, 7};
        make_nt(&r, 3, 1, norms[i], 0.5);
        CHECK(rh_route(&r, 2, l, &c) == MOE_OK);
        CHECK(c.expert[0] == 2 && c.expert[1] == 1);
        CHECK(c.weight[0] == 1.0f && c.weight[1] == 1.0f);
        CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_OK);
        for (int j = 0; j < 6; ++j) CHECK_MSG(dl[j] == 0.0f, "%s dl[%d] = %g", norms[i], j, dl[j]);
        rh_free_outputs(&c);
        rh_destroy(&r);
    }

    /* Every token to the same experts, and T < E: two tokens, eight experts,
     * both led by 5 then 1, each pair 1 apart: w = [e / (1 + e), 1 / (1 + e)]. */
    const float same[] = {0, 2, 0, 0, 0, 3, 0, 0, -4, -2, -4, -4, -4, -1, -4, -4};
    make(&r, 8, 2, NULL, 0);
    CHECK(rh_route(&r, 2, same, &c) == MOE_OK);
    for (int t = 0; t < 2; ++t) {
        CHECK(c.expert[2 * t] == 5 && c.expert[2 * t + 1] == 1);
        CHECK_CLOSE(c.weight[2 * t], 0.731058579, 1e-6, 0);
        CHECK_CLOSE(c.weight[2 * t + 1], 0.268941421, 1e-6, 0);
    }
    rh_free_outputs(&c);

    /* T = 0 is a valid call that touches nothing, even with NULL pointers. */
    CHECK(rh_forward_raw(&r, 0, 8, 2, NULL, NULL, NULL) == MOE_OK);
    CHECK(rh_backward_raw(&r, 0, 8, 2, NULL, NULL, NULL) == MOE_OK);
    rh_destroy(&r);
}

/* ---- backward ------------------------------------------------------------ */

static void test_backward_hand(void) {
    rh_router r;
    rh_call c;
    const float l[] = {1, 0, 2, -1};
    const float g[] = {0.5f, -1};
    float dl[4];

    /* temperature 1, idx = [2, 0], w = [0.731058579, 0.268941421], g = [0.5, -1]:
     *   sum_i w_i g_i = 0.365529289 - 0.268941421 = 0.096587868
     *   dl_2 = w_0 (g_0 - 0.096587868) = 0.731058579 *  0.403412132 =  0.294917900
     *   dl_0 = w_1 (g_1 - 0.096587868) = 0.268941421 * -1.096587868 = -0.294917900
     *   dl_1 = dl_3 = 0 (not selected)
     * normalize = sum gives the same: with no clamp it is the same function. */
    const char *norms[] = {"softmax", "sum"};
    for (int i = 0; i < 2; ++i) {
        make_nt(&r, 4, 2, norms[i], 1.0);
        for (int j = 0; j < 4; ++j) dl[j] = 7; /* overwritten, not accumulated */
        CHECK(rh_route(&r, 1, l, &c) == MOE_OK);
        CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_OK);
        CHECK_CLOSE(dl[2], 0.294917900, 1e-5, 1e-7);
        CHECK_CLOSE(dl[0], -0.294917900, 1e-5, 1e-7);
        CHECK_CLOSE(dl[1], 0.0, 0, 1e-7);
        CHECK_CLOSE(dl[3], 0.0, 0, 1e-7);

        /* The host drops the second assignment: marks it -1, dweight 0. The
         * weights still depend on both selected logits, g = [0.5, 0]:
         *   sum_i w_i g_i = 0.731058579 * 0.5 = 0.365529289
         *   dl_2 = 0.731058579 * (0.5 - 0.365529289) =  0.098305967
         *   dl_0 = 0.268941421 * (0   - 0.365529289) = -0.098305967 */
        c.expert[1] = -1;
        CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_OK);
        CHECK_CLOSE(dl[2], 0.098305967, 1e-5, 1e-7);
        CHECK_CLOSE(dl[0], -0.098305967, 1e-5, 1e-7);
        CHECK_CLOSE(dl[1], 0.0, 0, 1e-7);
        CHECK_CLOSE(dl[3], 0.0, 0, 1e-7);
        rh_free_outputs(&c);
        rh_destroy(&r);
    }

    /* temperature 0.5: w = [0.880797078, 0.119202922], g = [0.5, -1]:
     *   sum_i w_i g_i = 0.440398539 - 0.119202922 = 0.321195617
     *   dl_2 = w_0 (g_0 - 0.321195617) / 0.5 = 0.880797078 *  0.178804383 * 2 =  0.314980756
     *   dl_0 = w_1 (g_1 - 0.321195617) / 0.5 = 0.119202922 * -1.321195617 * 2 = -0.314980756 */
    make_nt(&r, 4, 2, "softmax", 0.5);
    CHECK(rh_route(&r, 1, l, &c) == MOE_OK);
    CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_OK);
    CHECK_CLOSE(dl[2], 0.314980756, 1e-5, 1e-7);
    CHECK_CLOSE(dl[0], -0.314980756, 1e-5, 1e-7);
    CHECK(dl[1] == 0.0f && dl[3] == 0.0f);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

static void test_gradients_fd(void) {
    enum { T = 5, E = 6 };
    const char *norms[] = {"softmax", "sum"};
    const double temps[] = {1.0, 0.5, 2.0};
    for (int n = 0; n < 2; ++n)
        for (int ti = 0; ti < 3; ++ti)
            for (int K = 2; K <= 3; ++K) {
                rh_router r;
                rh_call c;
                float l[T * E];
                rh_gapped_logits(100 + (uint64_t)(10 * n + 3 * ti + K), T, E, l);
                make_nt(&r, E, K, norms[n], temps[ti]);
                memset(&c, 0, sizeof c);
                c.T = T;
                c.logits = l;
                rh_alloc_outputs(&r, &c);
                int skipped = rh_check_gradients(&r, &c, l, NULL, 5 + (uint64_t)K, 1e-3f, 1e-2);
                CHECK_MSG(skipped == 0, "%s tau=%g K=%d: %d coordinates skipped", norms[n], temps[ti], K, skipped);
                rh_free_outputs(&c);
                rh_destroy(&r);
            }
}

/* Unclamped, the two normalizations are one function: same weights, same
 * gradient, and none for the unselected logits in either. */
static void test_sum_matches_softmax(void) {
    enum { T = 16, E = 8, K = 3 };
    float l[T * E], g[T * K], dl_soft[T * E], dl_sum[T * E];
    moe_test_rng rng = {31};
    moe_test_fill(&rng, l, T * E, -3.0f, 3.0f);
    moe_test_fill(&rng, g, T * K, -1.0f, 1.0f);
    rh_router rs, rm;
    rh_call cs, cm;
    make_nt(&rs, E, K, "softmax", 0.7);
    make_nt(&rm, E, K, "sum", 0.7);
    CHECK(rh_route(&rs, T, l, &cs) == MOE_OK);
    CHECK(rh_route(&rm, T, l, &cm) == MOE_OK);
    CHECK(memcmp(cs.expert, cm.expert, sizeof(int32_t) * T * K) == 0);
    for (int i = 0; i < T * K; ++i) CHECK_CLOSE(cm.weight[i], cs.weight[i], 1e-5, 1e-7);
    CHECK(rh_backward(&rs, &cs, g, NULL, dl_soft, NULL) == MOE_OK);
    CHECK(rh_backward(&rm, &cm, g, NULL, dl_sum, NULL) == MOE_OK);
    for (int i = 0; i < T * E; ++i) CHECK_CLOSE(dl_sum[i], dl_soft[i], 1e-4, 1e-6);
    rh_free_outputs(&cs);
    rh_free_outputs(&cm);
    rh_destroy(&rs);
    rh_destroy(&rm);
}

/* ---- bad options, bad dims, bad inputs --------------------------------------- */

static void test_bad_options(void) {
    rh_router r;
    const moe_router_dims dims = rh_dims(4, 2, 4, 0, 16, 1.0);

    /* unknown: the message names it and the keys softk accepts */
    rh_expect_option_error(plugin, dims, rh_opt_str("gate", "none"), "gate", "temperature");
    rh_expect_option_error(plugin, dims, rh_opt_str("gate", "none"), "normalize", NULL);
    rh_expect_option_error(plugin, dims, rh_opt_str("temperature", "hot"), "temperature", NULL); /* wrong type */
    rh_expect_option_error(plugin, dims, rh_opt_bool("normalize", 1), "normalize", NULL);       /* wrong type */
    rh_expect_option_error(plugin, dims, rh_opt_str("normalize", "l1"), "normalize", "l1");     /* bad choice */

    const double out_of_range[] = {0.0, -1.0, 9e-4, 1001.0, 1e9};
    for (int i = 0; i < 5; ++i)
        rh_expect_option_error(plugin, dims, rh_opt_float("temperature", out_of_range[i]), "temperature", NULL);
    /* The ends of the range are allowed. */
    const double edges[] = {1e-3, 1e3};
    for (int i = 0; i < 2; ++i) {
        moe_option t = rh_opt_float("temperature", edges[i]);
        CHECK(rh_create(&r, plugin, dims, &t, 1) == MOE_OK);
        rh_destroy(&r);
    }

    rh_check_refuses_bad_dims(plugin, dims);
}

static void test_bad_inputs(void) {
    const char *norms[] = {"softmax", "sum"};
    for (int n = 0; n < 2; ++n) {
        rh_router r;
        make_nt(&r, 4, 2, norms[n], 1.0);
        rh_check_refuses_nonfinite_logits(&r);

        const float l[8] = {0, 1, 2, 3, 3, 2, 1, 0};
        int32_t expert[4];
        float weight[4];
        rh_check_refuses_missing_args(&r, l);
        CHECK(rh_forward_raw(&r, 2, 3, 2, l, expert, weight) == MOE_ERR_INVALID_ARG); /* E differs from create */
        CHECK(rh_forward_raw(&r, 2, 4, 1, l, expert, weight) == MOE_ERR_INVALID_ARG); /* k_out differs from K */
        /* and the good call still works: row 0 = [0, 1, 2, 3], row 1 = [3, 2, 1, 0] */
        CHECK(rh_forward_raw(&r, 2, 4, 2, l, expert, weight) == MOE_OK);
        CHECK(expert[0] == 3 && expert[1] == 2 && expert[2] == 0 && expert[3] == 1);
        rh_destroy(&r);
    }
}

static void test_determinism(void) {
    const char *norms[] = {"softmax", "sum"};
    for (int n = 0; n < 2; ++n) {
        rh_router r;
        enum { T = 64, E = 16, K = 4 };
        float l[T * E], g[T * K];
        moe_test_rng rng = {99};
        moe_test_fill(&rng, l, T * E, -4.0f, 4.0f);
        moe_test_fill(&rng, g, T * K, -1.0f, 1.0f);
        make_nt(&r, E, K, norms[n], 0.8);
        rh_check_determinism(&r, T, l, g);
        rh_destroy(&r);
    }
}

int main(void) {
    plugin = rh_load("softk");
    test_table();
    test_info();
    test_forward_hand();
    test_forward_shapes();
    test_backward_hand();
    test_gradients_fd();
    test_sum_matches_softmax();
    test_bad_options();
    test_bad_inputs();
    test_determinism();
    return moe_test_summary("test_router_softk");
}
