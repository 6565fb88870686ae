/*
 * top1 router plugin, tested through its ABI (loaded with dlopen).
 *
 * Expected values are worked out by hand in the comments; gradients are
 * checked against hand values and against central finite differences of the
 * forward pass (rh_check_gradients).
 */
#include "router_harness.h"

static const struct moe_router_plugin_v1 *plugin;

/* An instance with E experts and [moe].top_k = K; the test cannot go on
 * without one, so a failure here ends the program. */
static void make(rh_router *r, int E, int K, const moe_option *opts, int n_opts) {
    moe_status st = rh_create(r, plugin, rh_dims(E, K, 4, 0, 64, 1.25), opts, n_opts);
    if (st != MOE_OK) {
        fprintf(stderr, "create(E=%d, K=%d) failed (%d): %s\n", E, K, (int)st, r->msg);
        exit(1);
    }
}

/* Forward T tokens; the caller frees c's outputs with rh_free_outputs. */
static moe_status route(rh_router *r, int T, const float *logits, rh_call *c) {
    memset(c, 0, sizeof *c);
    c->T = T;
    c->logits = logits;
    rh_alloc_outputs(r, c);
    return rh_forward(r, c);
}

/* forward through the CPU table with arguments given one by one, so that
 * tests can pass NULL pointers and wrong shapes. */
static moe_status forward_raw(rh_router *r, int T, int E, int k_out, const float *logits, int32_t *expert,
                              float *weight) {
    moe_rng_key key = {0, 0, 0, 0};
    moe_context ctx = rh_context(r, 0, key);
    moe_router_fwd_args a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.T = T;
    a.E = E;
    a.k_out = k_out;
    a.logits = logits;
    a.expert = expert;
    a.weight = weight;
    return r->plugin->cpu->forward(r->state, &ctx, &a);
}

static moe_status backward_raw(rh_router *r, int T, int E, int k_out, const float *logits, const float *dweight,
                               float *dlogits) {
    moe_rng_key key = {0, 0, 0, 0};
    moe_context ctx = rh_context(r, 1, key);
    moe_router_bwd_args a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.T = T;
    a.E = E;
    a.k_out = k_out;
    a.logits = logits;
    a.dweight = dweight;
    a.dlogits = dlogits;
    return r->plugin->cpu->backward(r->state, &ctx, &a);
}

/* Rows that are a shuffled 0, 0.8, 1.6, ... plus noise in [-0.2, 0.2):
 * entries of a row differ by at least 0.4, far more than the finite
 * difference step, so no routing decision flips during a gradient check. */
static void gapped_logits(uint64_t seed, int T, int E, float *l) {
    moe_test_rng rng = {seed};
    for (int t = 0; t < T; ++t) {
        float *row = l + (size_t)t * E;
        for (int j = 0; j < E; ++j) row[j] = 0.8f * (float)j;
        for (int j = E - 1; j > 0; --j) {
            int i = (int)(moe_test_next(&rng) % (uint64_t)(j + 1));
            float tmp = row[i];
            row[i] = row[j];
            row[j] = tmp;
        }
        for (int j = 0; j < E; ++j) row[j] += moe_test_uniform(&rng, -0.2f, 0.2f) - 1.5f;
    }
}

/* ---- the table and the info ------------------------------------------------ */

static void test_table(void) {
    CHECK(strcmp(plugin->name, "top1") == 0);
    CHECK(plugin->abi_version == MOE_ROUTER_ABI_VERSION);
    CHECK(plugin->struct_size == sizeof(struct moe_router_plugin_v1));
    CHECK(plugin->description && strlen(plugin->description) > 10);
    CHECK(plugin->create && plugin->destroy && plugin->query);
    CHECK(plugin->cpu && plugin->cpu->forward && plugin->cpu->backward);
    /* The CUDA table is there exactly when the build has CUDA. */
#ifdef MOE_WITH_CUDA
    CHECK(plugin->cuda != NULL && plugin->cuda->forward && plugin->cuda->backward);
#else
    CHECK(plugin->cuda == NULL);
#endif

    CHECK(plugin->n_options == 1);
    const moe_option_spec *o = &plugin->options[0];
    CHECK(strcmp(o->key, "gate") == 0);
    CHECK(o->type == MOE_OPT_STRING);
    CHECK(strcmp(o->default_value, "softmax") == 0);
    CHECK(o->choices && strcmp(o->choices, "softmax|none") == 0);
    CHECK(!(o->min < o->max)); /* no numeric range on a string */
    CHECK(o->help && strlen(o->help) > 10);
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
    CHECK(route(&r, 3, l, &c) == MOE_OK);
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
    CHECK(route(&r, 3, l, &c) == MOE_OK);
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
    CHECK(route(&r, 4, same, &c) == MOE_OK);
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
    CHECK(route(&r, 2, few, &c) == MOE_OK);
    CHECK(c.expert[0] == 7 && c.expert[1] == 3);
    CHECK_CLOSE(c.weight[0], 0.513519, 1e-5, 0);
    CHECK_CLOSE(c.weight[1], 0.886360, 1e-5, 0);
    rh_free_outputs(&c);

    /* T = 0 is a valid call that touches nothing, even with NULL pointers. */
    CHECK(forward_raw(&r, 0, 8, 1, NULL, NULL, NULL) == MOE_OK);
    CHECK(backward_raw(&r, 0, 8, 1, NULL, NULL, NULL) == MOE_OK);
    rh_destroy(&r);

    /* A single expert takes everything with weight p = 1. */
    make(&r, 1, 1, NULL, 0);
    const float one[] = {-3, 0.5f};
    CHECK(route(&r, 2, one, &c) == MOE_OK);
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
    CHECK(route(&r, 1, l, &c) == MOE_OK);
    CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_OK);
    CHECK_CLOSE(dl[0], -0.162803402, 1e-5, 1e-7);
    CHECK_CLOSE(dl[1], 0.222695427, 1e-5, 1e-7);
    CHECK_CLOSE(dl[2], -0.059892025, 1e-5, 1e-7);
    rh_free_outputs(&c);

    /* g = 0 (a dropped assignment) gives no gradient at all. */
    const float g0[] = {0};
    CHECK(route(&r, 1, l, &c) == MOE_OK);
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
    gapped_logits(42, T, E, l);
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
    CHECK(route(&r, 2, l, &c) == MOE_OK);
    CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_OK);
    for (int i = 0; i < 6; ++i) CHECK(dl[i] == 0.0f);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* ---- bad options, bad dims, bad inputs --------------------------------------- */

static void test_bad_options(void) {
    rh_router r;

    moe_option unknown = rh_opt_float("temperature", 2.0);
    CHECK(rh_create(&r, plugin, rh_dims(4, 1, 4, 0, 16, 1.0), &unknown, 1) == MOE_ERR_OPTION);
    CHECK_MSG(strstr(r.msg, "temperature") && strstr(r.msg, "gate"), "msg: %s", r.msg);
    CHECK(r.state == NULL);
    rh_destroy(&r);

    moe_option wrong_type = rh_opt_int("gate", 1);
    CHECK(rh_create(&r, plugin, rh_dims(4, 1, 4, 0, 16, 1.0), &wrong_type, 1) == MOE_ERR_OPTION);
    CHECK_MSG(strstr(r.msg, "gate") != NULL, "msg: %s", r.msg);
    rh_destroy(&r);

    moe_option bad_choice = rh_opt_str("gate", "sigmoid");
    CHECK(rh_create(&r, plugin, rh_dims(4, 1, 4, 0, 16, 1.0), &bad_choice, 1) == MOE_ERR_OPTION);
    CHECK_MSG(strstr(r.msg, "gate") && strstr(r.msg, "sigmoid"), "msg: %s", r.msg);
    rh_destroy(&r);

    /* top1 ignores top_k but still refuses one no router could serve. */
    CHECK(rh_create(&r, plugin, rh_dims(8, 9, 4, 0, 16, 1.0), NULL, 0) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r.msg, "top_k = 9") && strstr(r.msg, "num_experts = 8"), "msg: %s", r.msg);
    rh_destroy(&r);

    CHECK(rh_create(&r, plugin, rh_dims(8, 0, 4, 0, 16, 1.0), NULL, 0) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r.msg, "top_k") != NULL, "msg: %s", r.msg);
    rh_destroy(&r);

    CHECK(rh_create(&r, plugin, rh_dims(0, 1, 4, 0, 16, 1.0), NULL, 0) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r.msg, "num_experts") != NULL, "msg: %s", r.msg);
    rh_destroy(&r);
}

static void test_bad_inputs(void) {
    rh_router r;
    rh_call c;
    make(&r, 4, 1, NULL, 0);

    float l[8] = {0, 1, 2, 3, 3, 2, 1, 0};
    l[6] = NAN;
    CHECK(route(&r, 2, l, &c) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r.msg, "logit[1,2]") && strstr(r.msg, "NaN"), "msg: %s", r.msg);
    float dl[8];
    const float g[2] = {1, 1};
    CHECK(rh_backward(&r, &c, g, NULL, dl, NULL) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r.msg, "logit[1,2]") != NULL, "msg: %s", r.msg);
    rh_free_outputs(&c);

    l[6] = 1;
    l[3] = INFINITY;
    CHECK(route(&r, 2, l, &c) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r.msg, "logit[0,3]") && strstr(r.msg, "+Inf"), "msg: %s", r.msg);
    rh_free_outputs(&c);

    l[3] = 3;
    l[4] = -INFINITY;
    CHECK(route(&r, 2, l, &c) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r.msg, "logit[1,0]") && strstr(r.msg, "-Inf"), "msg: %s", r.msg);
    rh_free_outputs(&c);
    l[4] = 3;

    int32_t expert[2];
    float weight[2];
    CHECK(forward_raw(&r, 2, 4, 1, NULL, expert, weight) == MOE_ERR_INVALID_ARG);
    CHECK(forward_raw(&r, 2, 4, 1, l, NULL, weight) == MOE_ERR_INVALID_ARG);
    CHECK(forward_raw(&r, 2, 4, 1, l, expert, NULL) == MOE_ERR_INVALID_ARG);
    CHECK(forward_raw(&r, -1, 4, 1, l, expert, weight) == MOE_ERR_INVALID_ARG);
    CHECK(forward_raw(&r, 2, 5, 1, l, expert, weight) == MOE_ERR_INVALID_ARG); /* E differs from create */
    CHECK_MSG(strstr(r.msg, "E = 5") != NULL, "msg: %s", r.msg);
    CHECK(forward_raw(&r, 2, 4, 2, l, expert, weight) == MOE_ERR_INVALID_ARG); /* k_out is 1 */
    CHECK(backward_raw(&r, 2, 4, 1, l, g, NULL) == MOE_ERR_INVALID_ARG);
    CHECK(backward_raw(&r, 2, 4, 1, l, NULL, dl) == MOE_ERR_INVALID_ARG);
    CHECK(backward_raw(&r, 2, 4, 1, NULL, g, dl) == MOE_ERR_INVALID_ARG);
    CHECK(forward_raw(&r, 2, 4, 1, l, expert, weight) == MOE_OK); /* and the good call still works */
    CHECK(expert[0] == 3 && expert[1] == 0);
    rh_destroy(&r);
}

static void test_determinism(void) {
    rh_router r;
    rh_call a, b;
    enum { T = 64, E = 16 };
    float l[T * E], g[T], dla[T * E], dlb[T * E];
    moe_test_rng rng = {99};
    moe_test_fill(&rng, l, T * E, -4.0f, 4.0f);
    moe_test_fill(&rng, g, T, -1.0f, 1.0f);
    make(&r, E, 2, NULL, 0);
    CHECK(route(&r, T, l, &a) == MOE_OK);
    CHECK(route(&r, T, l, &b) == MOE_OK);
    CHECK(memcmp(a.expert, b.expert, sizeof(int32_t) * T) == 0);
    CHECK(memcmp(a.weight, b.weight, sizeof(float) * T) == 0);
    CHECK(rh_backward(&r, &a, g, NULL, dla, NULL) == MOE_OK);
    CHECK(rh_backward(&r, &b, g, NULL, dlb, NULL) == MOE_OK);
    CHECK(memcmp(dla, dlb, sizeof dla) == 0);
    rh_free_outputs(&a);
    rh_free_outputs(&b);
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
