/*
 * top1 router plugin, tested through its ABI (loaded with dlopen).
 *
 * Expected values are worked out by hand in the comments; gradients are
 * checked against hand values and against central finite differences of the
 * forward pass (rh_check_gradients).
 */
#include "router_harness.h"

static const struct moe_router_plugin_v1 *plugin;

/* An instance with E experts and [moe].top_k = K (a failure ends the program). */
static void make(rh_router *r, int E, int K, const moe_option *opts, int n_opts) {
    rh_create_or_exit(r, plugin, rh_dims(E, K, 4, 0, 64, 1.25), opts, n_opts);
}

/* ---- the table and the info ------------------------------------------------ */

static void test_table(void) {
    rh_check_table(plugin, "top1", 1);
    rh_check_option(plugin, 0, "gate", MOE_OPT_STRING, "softmax", "softmax|none", 0.0, 0.0);
}

static void test_info(void) {
    rh_router r;

    /* Default gate = softmax: one assignment, weight p_e varies, gradient flows. */
    make(&r, 4, 1, NULL, 0);
    CHECK(r.info.k_out == 1);
    CHECK(r.info.flags == 0);
    CHECK(r.info.n_params == 0 && r.info.n_buffers == 0);
    rh_destroy(&r);

    /* k_out stays 1 whatever [moe].top_k says (here 3 of 4). */
    make(&r, 4, 3, NULL, 0);
    CHECK(r.info.k_out == 1);
    rh_destroy(&r);

    moe_option none = rh_opt_str("gate", "none");
    make(&r, 4, 2, &none, 1);
    CHECK(r.info.k_out == 1);
    CHECK(r.info.flags == (MOE_ROUTER_NO_GRAD | MOE_ROUTER_WEIGHT_SUM_EXACT));
    CHECK(r.info.weight_sum == 1.0f);
    rh_destroy(&r);

    /* The default spelled out gives the default. */
    moe_option soft = rh_opt_str("gate", "softmax");
    make(&r, 4, 1, &soft, 1);
    CHECK(r.info.k_out == 1 && r.info.flags == 0);
    rh_destroy(&r);
}

/* ---- forward, by hand ------------------------------------------------------- */

static void test_forward_hand(void) {
    rh_router r;
    rh_call c;
    make(&r, 3, 1, NULL, 0);

    /* Token 0, l = [1, 2, 0]: e = 1.
     *   sum = e^1 + e^2 + e^0 = 2.718281828 + 7.389056099 + 1 = 11.107337927
     *   p_1 = 7.389056099 / 11.107337927 = 0.665240956
     * Token 1, l = [3, 3, 1]: a tie between 0 and 1 goes to 0.
     *   p_0 = e^3 / (2 e^3 + e^1) = 1 / (2 + e^-2) = 1 / 2.135335283 = 0.468310531
     * Token 2, l = [-1, -1, -1]: all tied: e = 0, p_0 = 1/3. */
    const float l[] = {1, 2, 0, 3, 3, 1, -1, -1, -1};
    CHECK(rh_route(&r, 3, l, &c) == MOE_OK);
    CHECK(c.expert[0] == 1);
    CHECK_CLOSE(c.weight[0], 0.665240956, 1e-6, 0);
    CHECK(c.expert[1] == 0);
    CHECK_CLOSE(c.weight[1], 0.468310531, 1e-6, 0);
    CHECK(c.expert[2] == 0);
    CHECK_CLOSE(c.weight[2], 1.0 / 3.0, 1e-6, 0);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* gate = none picks the same experts with weight exactly 1. */
    moe_option none = rh_opt_str("gate", "none");
    make(&r, 3, 1, &none, 1);
    CHECK(rh_route(&r, 3, l, &c) == MOE_OK);
    CHECK(c.expert[0] == 1 && c.expert[1] == 0 && c.expert[2] == 0);
    CHECK(c.weight[0] == 1.0f && c.weight[1] == 1.0f && c.weight[2] == 1.0f);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

static void test_forward_shapes(void) {
    rh_router r;
    rh_call c;

    /* Every token to the same expert: expert 2 leads each row by exactly 1,
     * with the other three at 0 (row 0), 1 (row 1), -2 (row 2), 5 (row 3).
     * p_2 = e^1 / (e^1 + 3 e^0) = 2.718281828 / 5.718281828 = 0.475367
     * whatever the offset, since softmax ignores a shift of the whole row. */
    make(&r, 4, 1, NULL, 0);
    const float same[] = {0, 0, 1, 0, 1, 1, 2, 1, -2, -2, -1, -2, 5, 5, 6, 5};
    CHECK(rh_route(&r, 4, same, &c) == MOE_OK);
    for (int t = 0; t < 4; ++t) {
        CHECK(c.expert[t] == 2);
        CHECK_CLOSE(c.weight[t], 0.475367, 1e-5, 0);
    }
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* T < E: two tokens, eight experts; the maxima sit at 7 and 3.
     * Row 0 = [0, ..., 0, 2]: p_7 = e^2 / (e^2 + 7) = 7.389056 / 14.389056 = 0.513519
     * Row 1 = [0, 0, 0, 4, 0, 0, 0, 0]: p_3 = e^4 / (e^4 + 7) = 54.598150 / 61.598150 = 0.886360 */
    make(&r, 8, 2, NULL, 0);
    const float few[] = {0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 0};
    CHECK(rh_route(&r, 2, few, &c) == MOE_OK);
    CHECK(c.expert[0] == 7 && c.expert[1] == 3);
    CHECK_CLOSE(c.weight[0], 0.513519, 1e-5, 0);
    CHECK_CLOSE(c.weight[1], 0.886360, 1e-5, 0);
    rh_free_outputs(&c);

    /* T = 0 is a valid call that touches nothing, even with NULL pointers. */
    CHECK(rh_forward_raw(&r, 0, 8, 1, NULL, NULL, NULL) == MOE_OK);
    CHECK(rh_backward_raw(&r, 0, 8, 1, NULL, NULL, NULL) == MOE_OK);
    rh_destroy(&r);

    /* A single expert takes everything with weight p = 1. */
    make(&r, 1, 1, NULL, 0);
    const float one[] = {-3, 0.5f};
    CHECK(rh_route(&r, 2, one, &c) == MOE_OK);
    CHECK(c.expert[0] == 0 && c.expert[1] == 0);
    CHECK(c.weight[0] == 1.0f && c.weight[1] == 1.0f);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* ---- backward ------------------------------------------------------------ */

static void test_backward_hand(void) {
    rh_router r;
    rh_call c;
    make(&r, 3, 1, NULL, 0);

    /* l = [1, 2, 0], e = 1, p = [0.244728471, 0.665240956, 0.090030573], g = 1:
     *   dl_0 = -p_1 p_0       = -0.665240956 * 0.244728471 = -0.162803402
     *   dl_1 =  p_1 (1 - p_1) =  0.665240956 * 0.334759044 =  0.222695427
     *   dl_2 = -p_1 p_2       = -0.665240956 * 0.090030573 = -0.059892025
     * (they sum to 0: adding a constant to every logit changes nothing). */
    const float l[] = {1, 2, 0};
    const float g[] = {1};
    float dl[3] = {7, 7, 7}; /* overwritten, not accumulated */
    CHECK(rh_route(&r, 1, l, &c) == MOE_OK);
    CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_OK);
    CHECK_CLOSE(dl[0], -0.162803402, 1e-5, 1e-7);
    CHECK_CLOSE(dl[1], 0.222695427, 1e-5, 1e-7);
    CHECK_CLOSE(dl[2], -0.059892025, 1e-5, 1e-7);
    rh_free_outputs(&c);

    /* g = 0 (a dropped assignment) gives no gradient at all. */
    const float g0[] = {0};
    CHECK(rh_route(&r, 1, l, &c) == MOE_OK);
    CHECK(rh_backward(&r, &c, g0, NULL, dl, NULL) == MOE_OK);
    CHECK(dl[0] == 0.0f && dl[1] == 0.0f && dl[2] == 0.0f);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

static void test_gradients_fd(void) {
    rh_router r;
    rh_call c;
    enum { T = 5, E = 6 };
    float l[T * E];
    rh_gapped_logits(42, T, E, l);
    make(&r, E, 2, NULL, 0);
    memset(&c, 0, sizeof c);
    c.T = T;
    c.logits = l;
    rh_alloc_outputs(&r, &c);
    int skipped = rh_check_gradients(&r, &c, l, NULL, 7, 1e-3f, 1e-2);
    CHECK(skipped == 0);
    rh_free_outputs(&c);
    rh_destroy(&r);

    /* Larger logits, a sharper softmax. */
    for (int i = 0; i < T * E; ++i) l[i] *= 3.0f;
    make(&r, E, 1, NULL, 0);
    memset(&c, 0, sizeof c);
    c.T = T;
    c.logits = l;
    rh_alloc_outputs(&r, &c);
    CHECK(rh_check_gradients(&r, &c, l, NULL, 8, 1e-3f, 1e-2) == 0);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

static void test_no_grad_writes_zeros(void) {
    rh_router r;
    rh_call c;
    moe_option none = rh_opt_str("gate", "none");
    make(&r, 3, 1, &none, 1);
    const float l[] = {1, 2, 0, 0, -1, 4};
    const float g[] = {0.5f, -2.0f};
    float dl[6];
    for (int i = 0; i < 6; ++i) dl[i] = i % 2 ? NAN : 123.0f; /* garbage the host left there */
    CHECK(rh_route(&r, 2, l, &c) == MOE_OK);
    CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_OK);
    for (int i = 0; i < 6; ++i) CHECK(dl[i] == 0.0f);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* ---- bad options, bad dims, bad inputs --------------------------------------- */

static void test_bad_options(void) {
    const moe_router_dims dims = rh_dims(4, 1, 4, 0, 16, 1.0);
    rh_expect_option_error(plugin, dims, rh_opt_float("temperature", 2.0), "temperature", "gate"); /* unknown */
    rh_expect_option_error(plugin, dims, rh_opt_int("gate", 1), "gate", NULL);                   /* wrong type */
    rh_expect_option_error(plugin, dims, rh_opt_str("gate", "sigmoid"), "gate", "sigmoid");      /* bad choice */
    /* top1 ignores top_k but still refuses one no router could serve. */
    rh_check_refuses_bad_dims(plugin, dims);
}

static void test_bad_inputs(void) {
    rh_router r;
    make(&r, 4, 1, NULL, 0);
    rh_check_refuses_nonfinite_logits(&r);

    const float l[8] = {0, 1, 2, 3, 3, 2, 1, 0};
    int32_t expert[2];
    float weight[2];
    rh_check_refuses_missing_args(&r, l);
    CHECK(rh_forward_raw(&r, 2, 5, 1, l, expert, weight) == MOE_ERR_INVALID_ARG); /* E differs from create */
    CHECK_MSG(strstr(r.msg, "E = 5") != NULL, "msg: %s", r.msg);
    CHECK(rh_forward_raw(&r, 2, 4, 2, l, expert, weight) == MOE_ERR_INVALID_ARG); /* k_out is 1 */
    CHECK(rh_forward_raw(&r, 2, 4, 1, l, expert, weight) == MOE_OK); /* and the good call still works */
    CHECK(expert[0] == 3 && expert[1] == 0);
    rh_destroy(&r);
}

static void test_determinism(void) {
    rh_router r;
    enum { T = 64, E = 16 };
    float l[T * E], g[T];
    moe_test_rng rng = {99};
    moe_test_fill(&rng, l, T * E, -4.0f, 4.0f);
    moe_test_fill(&rng, g, T, -1.0f, 1.0f);
    make(&r, E, 2, NULL, 0);
    rh_check_determinism(&r, T, l, g);
    rh_destroy(&r);
}

int main(void) {
    plugin = rh_load("top1");
    test_table();
    test_info();
    test_forward_hand();
    test_forward_shapes();
    test_backward_hand();
    test_gradients_fd();
    test_no_grad_writes_zeros();
    test_bad_options();
    test_bad_inputs();
    test_determinism();
    return moe_test_summary("test_router_top1");
}
