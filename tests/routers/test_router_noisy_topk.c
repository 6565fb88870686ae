/*
 * The noisy_topk router (Shazeer et al. 2017) through its ABI: evaluation is
 * plain softk, zero noise is plain softk, the noise is the keyed Philox draw
 * scaled by sigma (fixed or softplus(x W_noise)), outputs are deterministic
 * per key, and backward matches finite differences for logits, x and
 * W_noise.
 */
#include "router_harness.h"

static const moe_rng_key KEY = {.seed = 2024, .step = 17, .layer = 1, .stream = MOE_RNG_STREAM_ROUTER};

static moe_status make(rh_router *r, const struct moe_router_plugin_v1 *p, int E, int K, int d, int max_tokens,
                       const moe_option *opts, int n_opts) {
    moe_status st = rh_create(r, p, rh_dims(E, K, d, 100, max_tokens, 1.25), opts, n_opts);
    CHECK_MSG(st == MOE_OK, "create E=%d K=%d d=%d: %s", E, K, d, r->msg);
    return st;
}

static void test_table(const struct moe_router_plugin_v1 *p) {
    rh_check_table(p, "noisy_topk", 3);
    rh_router r;
    make(&r, p, 8, 2, 16, 32, NULL, 0);
    CHECK(r.info.k_out == 2);
    CHECK(r.info.flags == (MOE_ROUTER_PERTURBS_LOGITS | MOE_ROUTER_WEIGHT_SUM_EXACT));
    CHECK(r.info.weight_sum == 1.0f);
    /* learned = true by default: one zero-initialised [d_model, E] parameter */
    CHECK(r.info.n_params == 1);
    CHECK(strcmp(r.info.params[0].name, "w_noise") == 0);
    CHECK(r.info.params[0].ndim == 2 && r.info.params[0].shape[0] == 16 && r.info.params[0].shape[1] == 8);
    CHECK(r.info.params[0].init == MOE_INIT_ZEROS && r.info.params[0].weight_decay == 0);
    rh_destroy(&r);
    moe_option o = rh_opt_bool("learned", 0);
    make(&r, p, 8, 2, 16, 32, &o, 1);
    CHECK(r.info.n_params == 0);
    rh_destroy(&r);
}

/* Evaluation routes on l itself. T = 2, E = 4, K = 2:
 *   t0: l = (1, 3, 2, 0)        top-2 = (e1, e2); w = softmax(3, 2) = (e/(e+1), 1/(e+1)) = (.7310586, .2689414)
 *   t1: l = (.5, .5, .5, -1)    three-way tie, lower experts: (e0, e1); w = (.5, .5)
 * With temperature 2, t0: w = softmax(3/2, 2/2) = (1/(1+e^-.5), ...) = (.6224593, .3775407). */
static const float HAND[2 * 4] = {1, 3, 2, 0, 0.5f, 0.5f, 0.5f, -1};

static void test_eval_is_softk(const struct moe_router_plugin_v1 *p) {
    rh_router r;
    make(&r, p, 4, 2, 3, 2, NULL, 0); /* learned, but evaluation needs neither x nor W_noise */
    rh_call c = {.T = 2, .training = 0, .key = KEY, .logits = HAND, .x = NULL};
    rh_alloc_outputs(&r, &c);
    CHECK_MSG(rh_forward(&r, &c) == MOE_OK, "%s", r.msg);
    CHECK(c.expert[0] == 1 && c.expert[1] == 2 && c.expert[2] == 0 && c.expert[3] == 1);
    CHECK_CLOSE(c.weight[0], 0.7310586, 0, 1e-6);
    CHECK_CLOSE(c.weight[1], 0.2689414, 0, 1e-6);
    CHECK_CLOSE(c.weight[2], 0.5, 0, 1e-7);
    CHECK_CLOSE(c.weight[3], 0.5, 0, 1e-7);
    CHECK(memcmp(c.route_logits, HAND, sizeof HAND) == 0);
    rh_free_outputs(&c);
    rh_destroy(&r);

    moe_option o = rh_opt_float("temperature", 2.0);
    make(&r, p, 4, 2, 3, 2, &o, 1);
    rh_alloc_outputs(&r, &c);
    CHECK(rh_forward(&r, &c) == MOE_OK);
    CHECK(c.expert[0] == 1 && c.expert[1] == 2);
    CHECK_CLOSE(c.weight[0], 0.6224593, 0, 1e-6);
    CHECK_CLOSE(c.weight[1], 0.3775407, 0, 1e-6);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* learned = false, noise_std = 0: training routes on l + 0 * n = l, bitwise
 * the evaluation output. */
static void test_zero_noise_is_softk(const struct moe_router_plugin_v1 *p) {
    moe_option o[2] = {rh_opt_bool("learned", 0), rh_opt_float("noise_std", 0.0)};
    rh_router r;
    make(&r, p, 4, 2, 3, 2, o, 2);
    rh_call ev = {.T = 2, .training = 0, .key = KEY, .logits = HAND};
    rh_call tr = ev;
    tr.training = 1;
    rh_alloc_outputs(&r, &ev);
    rh_alloc_outputs(&r, &tr);
    CHECK(rh_forward(&r, &ev) == MOE_OK);
    CHECK(rh_forward(&r, &tr) == MOE_OK);
    CHECK(memcmp(ev.expert, tr.expert, 4 * sizeof(int32_t)) == 0);
    CHECK(memcmp(ev.weight, tr.weight, 4 * sizeof(float)) == 0);
    CHECK(memcmp(tr.route_logits, HAND, sizeof HAND) == 0);
    rh_free_outputs(&ev);
    rh_free_outputs(&tr);
    rh_destroy(&r);
}

/* Same key: bitwise the same outputs. Another step: other noise. */
static void test_determinism(const struct moe_router_plugin_v1 *p) {
    enum { T = 16, E = 8, D = 4 };
    rh_router r;
    make(&r, p, E, 2, D, T, NULL, 0);
    moe_test_rng rng = {31};
    float l[T * E], x[T * D];
    moe_test_fill(&rng, l, T * E, -1.0f, 1.0f);
    moe_test_fill(&rng, x, T * D, -1.0f, 1.0f);
    moe_test_fill(&rng, r.params[0], (size_t)D * E, -0.5f, 0.5f);
    rh_call a = {.T = T, .training = 1, .key = KEY, .logits = l, .x = x}, b = a, n = a;
    n.key.step += 1;
    rh_alloc_outputs(&r, &a);
    rh_alloc_outputs(&r, &b);
    rh_alloc_outputs(&r, &n);
    CHECK(rh_forward(&r, &a) == MOE_OK);
    CHECK(rh_forward(&r, &b) == MOE_OK);
    CHECK(rh_forward(&r, &n) == MOE_OK);
    CHECK(memcmp(a.expert, b.expert, sizeof(int32_t) * T * 2) == 0);
    CHECK(memcmp(a.weight, b.weight, sizeof(float) * T * 2) == 0);
    CHECK(memcmp(a.route_logits, b.route_logits, sizeof(float) * T * E) == 0);
    int same = 0;
    for (int i = 0; i < T * E; ++i) same += a.route_logits[i] == n.route_logits[i];
    CHECK_MSG(same == 0, "%d of %d perturbed logits unchanged by a new step", same, T * E);
    rh_free_outputs(&a);
    rh_free_outputs(&b);
    rh_free_outputs(&n);
    rh_destroy(&r);
}

/* Fixed noise: route_logits - logits = noise_std * n with n the Philox draw
 * at element t*E + e, and n ~ N(0,1) over 40000 draws. The sample mean of
 * N = 40000 standard normals has std 1/sqrt(N) = 0.005, so 0.03 is 6 std;
 * the sample std has std ~ 1/sqrt(2N) = 0.0035, so 0.03 is 8.5 std. */
static void test_noise_statistics(const struct moe_router_plugin_v1 *p) {
    enum { T = 5000, E = 8 };
    moe_option o[2] = {rh_opt_bool("learned", 0), rh_opt_float("noise_std", 0.5)};
    rh_router r;
    make(&r, p, E, 2, 4, T, o, 2);
    float *l = calloc((size_t)T * E, sizeof(float));
    rh_call c = {.T = T, .training = 1, .key = KEY, .logits = l};
    rh_alloc_outputs(&r, &c);
    CHECK(rh_forward(&r, &c) == MOE_OK);
    double s1 = 0.0, s2 = 0.0;
    int not_draw = 0;
    for (int i = 0; i < T * E; ++i) {
        double z = (c.route_logits[i] - l[i]) / 0.5;
        s1 += z;
        s2 += z * z;
        /* 0 + 0.5 n is exact in float */
        not_draw += c.route_logits[i] != 0.5f * moe_rng_normal(KEY, (uint64_t)i);
    }
    double mean = s1 / (T * E), sd = sqrt(s2 / (T * E) - mean * mean);
    CHECK_MSG(fabs(mean) <= 0.03, "mean %.4f", mean);
    CHECK_MSG(fabs(sd - 1.0) <= 0.03, "std %.4f", sd);
    CHECK_MSG(not_draw == 0, "%d perturbations differ from noise_std * moe_rng_normal(key, t*E + e)", not_draw);
    /* weights of each token sum to 1 */
    int bad_sum = 0;
    for (int t = 0; t < T; ++t) bad_sum += fabs(c.weight[2 * t] + c.weight[2 * t + 1] - 1.0) > 1e-6;
    CHECK(bad_sum == 0);
    rh_free_outputs(&c);
    free(l);
    rh_destroy(&r);
}

/* Learned sigma. With W_noise = 0 (its init) sigma = softplus(0) = ln 2
 * whatever x is; with W_noise set, sigma[t,e] = log(1 + exp(sum_d x[t,d] W[d,e])),
 * recomputed here in double. */
static void test_learned_sigma(const struct moe_router_plugin_v1 *p) {
    enum { T = 8, E = 4, D = 3 };
    rh_router r;
    make(&r, p, E, 2, D, T, NULL, 0);
    moe_test_rng rng = {5};
    float l[T * E], x[T * D];
    moe_test_fill(&rng, l, T * E, -2.0f, 2.0f);
    moe_test_fill(&rng, x, T * D, -1.0f, 1.0f);
    rh_call c = {.T = T, .training = 1, .key = KEY, .logits = l, .x = x};
    rh_alloc_outputs(&r, &c);
    CHECK(rh_forward(&r, &c) == MOE_OK);
    const double ln2 = 0.69314718055994531;
    int bad = 0;
    for (int i = 0; i < T * E; ++i)
        bad += fabs((c.route_logits[i] - l[i]) - ln2 * moe_rng_normal(KEY, (uint64_t)i)) > 1e-5;
    CHECK_MSG(bad == 0, "%d perturbations differ from ln 2 * n", bad);

    moe_test_fill(&rng, r.params[0], (size_t)D * E, -2.0f, 2.0f);
    CHECK(rh_forward(&r, &c) == MOE_OK);
    bad = 0;
    for (int t = 0; t < T; ++t)
        for (int e = 0; e < E; ++e) {
            double pre = 0.0;
            for (int d = 0; d < D; ++d) pre += (double)x[t * D + d] * r.params[0][d * E + e];
            double sigma = log(1.0 + exp(pre));
            double want = sigma * moe_rng_normal(KEY, (uint64_t)(t * E + e));
            bad += fabs((c.route_logits[t * E + e] - l[t * E + e]) - want) > 1e-5 * (1.0 + fabs(want));
        }
    CHECK_MSG(bad == 0, "%d perturbations differ from softplus(x W) * n", bad);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* Logits spread over [-3, 3] and W_noise in [-0.5, 0.5] leave gaps between
 * perturbed logits far wider than eps = 1e-3 except by rare chance;
 * coordinates whose decision flips are skipped and counted. */
static void test_gradients(const struct moe_router_plugin_v1 *p, const moe_option *opts, int n_opts, int training,
                           int with_x, uint64_t seed) {
    enum { T = 5, E = 4, D = 3 };
    rh_router r;
    make(&r, p, E, 2, D, T, opts, n_opts);
    moe_test_rng rng = {seed};
    float l[T * E], x[T * D];
    moe_test_fill(&rng, l, T * E, -3.0f, 3.0f);
    moe_test_fill(&rng, x, T * D, -1.0f, 1.0f);
    if (r.info.n_params) moe_test_fill(&rng, r.params[0], (size_t)D * E, -0.5f, 0.5f);
    rh_call c = {.T = T, .training = training, .key = KEY, .logits = l, .x = with_x ? x : NULL};
    rh_alloc_outputs(&r, &c);
    int coords = T * E + (with_x ? T * D : 0) + (r.info.n_params ? D * E : 0);
    int skipped = rh_check_gradients(&r, &c, l, with_x ? x : NULL, seed + 1, 1e-3f, 1e-2);
    CHECK_MSG(skipped <= coords / 10, "%d of %d coordinates skipped", skipped, coords);
    if (r.info.n_params && training) {
        double g = 0.0;
        for (int i = 0; i < D * E; ++i) g += fabs(r.param_grads[0][i]);
        CHECK_MSG(g > 1e-3, "dW_noise is all zero");
    }
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* dx and dW_noise are accumulated into, not overwritten; dlogits is
 * overwritten. Backward is called twice on the same buffers: dlogits stays
 * the same, dx and dW double. */
static void test_accumulation(const struct moe_router_plugin_v1 *p) {
    enum { T = 3, E = 4, D = 2, K = 2 };
    rh_router r;
    make(&r, p, E, K, D, T, NULL, 0);
    moe_test_rng rng = {77};
    float l[T * E], x[T * D], dweight[T * K], drl[T * E];
    moe_test_fill(&rng, l, T * E, -2.0f, 2.0f);
    moe_test_fill(&rng, x, T * D, -1.0f, 1.0f);
    moe_test_fill(&rng, dweight, T * K, -1.0f, 1.0f);
    moe_test_fill(&rng, drl, T * E, -1.0f, 1.0f);
    moe_test_fill(&rng, r.params[0], (size_t)D * E, -0.5f, 0.5f);
    rh_call c = {.T = T, .training = 1, .key = KEY, .logits = l, .x = x};
    rh_alloc_outputs(&r, &c);
    CHECK(rh_forward(&r, &c) == MOE_OK);

    float dl1[T * E], dl2[T * E], dx[T * D] = {0}, dx1[T * D];
    memset(r.param_grads[0], 0, sizeof(float) * D * E);
    moe_context ctx = rh_context(&r, 1, KEY);
    moe_router_bwd_args a = {.struct_size = sizeof a, .T = T, .E = E, .k_out = K, .d_model = D, .logits = l,
                             .x = x, .params = r.params, .expert = c.expert, .weight = c.weight,
                             .route_logits = c.route_logits, .dweight = dweight, .d_route_logits = drl,
                             .dlogits = dl1, .dx = dx, .param_grads = r.param_grads};
    CHECK(p->cpu->backward(r.state, &ctx, &a) == MOE_OK);
    float dW1[D * E];
    memcpy(dW1, r.param_grads[0], sizeof dW1);
    memcpy(dx1, dx, sizeof dx1);
    for (int i = 0; i < T * E; ++i) dl2[i] = 1e6f;
    a.dlogits = dl2;
    CHECK(p->cpu->backward(r.state, &ctx, &a) == MOE_OK);
    CHECK(memcmp(dl1, dl2, sizeof dl1) == 0);
    int bad = 0;
    for (int i = 0; i < T * D; ++i) bad += fabs(dx[i] - 2.0 * dx1[i]) > 1e-6 * (1 + fabs(dx1[i]));
    for (int i = 0; i < D * E; ++i) bad += fabs(r.param_grads[0][i] - 2.0 * dW1[i]) > 1e-6 * (1 + fabs(dW1[i]));
    CHECK(bad == 0);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* The saved buffer (learned noise only): forward then backward with it give
 * bitwise what they give without it (a host older than the field), and the
 * backward does read it (changed between the calls, dx changes). */
static void test_saved(const struct moe_router_plugin_v1 *p) {
    enum { T = 5, E = 4, D = 3, K = 2 };
    rh_router r;
    moe_option fixed = rh_opt_bool("learned", 0);
    make(&r, p, E, K, D, T, &fixed, 1);
    CHECK_MSG(r.info.saved_bytes == 0, "fixed noise declares %zu saved bytes", r.info.saved_bytes);
    rh_destroy(&r);
    make(&r, p, E, K, D, T, NULL, 0);
    CHECK(r.info.saved_bytes >= 2 * (size_t)T * E * sizeof(float));
    moe_test_rng rng = {91};
    float l[T * E], x[T * D], dweight[T * K], drl[T * E];
    moe_test_fill(&rng, l, T * E, -2.0f, 2.0f);
    moe_test_fill(&rng, x, T * D, -1.0f, 1.0f);
    moe_test_fill(&rng, dweight, T * K, -1.0f, 1.0f);
    moe_test_fill(&rng, drl, T * E, -1.0f, 1.0f);
    moe_test_fill(&rng, r.params[0], (size_t)D * E, -0.5f, 0.5f);
    unsigned char *saved = malloc(r.info.saved_bytes);
    CHECK(saved != NULL);
    if (!saved) return;
    /* run 0: an older host; 1: with the buffer; 2: with the buffer changed before the backward */
    float dl[3][T * E], dx[3][T * D], dW[3][D * E], lp[3][T * E];
    int32_t ex[3][T * K];
    for (int run = 0; run < 3; ++run) {
        memset(saved, 0xA5, r.info.saved_bytes);
        float w[T * K];
        moe_context ctx = rh_context(&r, 1, KEY);
        moe_router_fwd_args f = {.struct_size = sizeof f, .T = T, .E = E, .k_out = K, .d_model = D, .logits = l,
                                 .x = x, .params = r.params, .expert = ex[run], .weight = w, .route_logits = lp[run]};
        if (run == 0) f.struct_size = (uint32_t)offsetof(moe_router_fwd_args, saved);
        f.saved = saved; /* past struct_size in run 0: must be ignored */
        CHECK(p->cpu->forward(r.state, &ctx, &f) == MOE_OK);
        if (run == 2) memset(saved + r.info.saved_bytes / 2, 0x3C, r.info.saved_bytes / 2);
        memset(dx[run], 0, sizeof dx[run]);
        memset(r.param_grads[0], 0, sizeof(float) * D * E);
        moe_router_bwd_args a = {.struct_size = sizeof a, .T = T, .E = E, .k_out = K, .d_model = D, .logits = l,
                                 .x = x, .params = r.params, .expert = ex[run], .weight = w,
                                 .route_logits = lp[run], .dweight = dweight, .d_route_logits = drl,
                                 .dlogits = dl[run], .dx = dx[run], .param_grads = r.param_grads};
        if (run == 0) a.struct_size = (uint32_t)offsetof(moe_router_bwd_args, saved);
        a.saved = saved;
        CHECK(p->cpu->backward(r.state, &ctx, &a) == MOE_OK);
        memcpy(dW[run], r.param_grads[0], sizeof dW[run]);
    }
    CHECK(memcmp(ex[0], ex[1], sizeof ex[0]) == 0 && memcmp(lp[0], lp[1], sizeof lp[0]) == 0);
    CHECK_MSG(memcmp(dl[0], dl[1], sizeof dl[0]) == 0 && memcmp(dx[0], dx[1], sizeof dx[0]) == 0 &&
                  memcmp(dW[0], dW[1], sizeof dW[0]) == 0,
              "backward with the saved buffer differs from the one without it");
    CHECK_MSG(memcmp(dx[1], dx[2], sizeof dx[1]) != 0, "the backward does not read the saved buffer");
    free(saved);
    rh_destroy(&r);
}

static void test_errors(const struct moe_router_plugin_v1 *p) {
    rh_router r;
    const moe_router_dims d = rh_dims(8, 2, 4, 100, 8, 1.25);
    rh_expect_option_error(p, d, rh_opt_float("sigma", 1.0), "'sigma'", NULL);
    rh_expect_option_error(p, d, rh_opt_str("learned", "yes"), "'learned'", NULL);
    rh_expect_option_error(p, d, rh_opt_str("noise_std", "1.0"), "'noise_std'", NULL);
    rh_expect_option_error(p, d, rh_opt_float("noise_std", -0.1), "'noise_std'", NULL);
    rh_expect_option_error(p, d, rh_opt_float("temperature", 0.0), "'temperature'", NULL);
    moe_option o = rh_opt_int("noise_std", 2); /* an integer is accepted where a number is expected */
    CHECK(rh_create(&r, p, d, &o, 1) == MOE_OK);
    rh_destroy(&r);
    rh_check_refuses_bad_dims(p, d);
    rh_expect_create_error(p, rh_dims(8, 2, 0, 100, 8, 1.25), NULL, 0, MOE_ERR_INVALID_ARG, NULL, NULL); /* learned, no d */

    enum { T = 3, E = 4, D = 2 };
    make(&r, p, E, 2, D, T, NULL, 0);
    float l[T * E] = {0}, x[T * D] = {0};
    rh_call c = {.T = T, .training = 1, .key = KEY, .logits = l, .x = x};
    rh_alloc_outputs(&r, &c);
    for (int training = 0; training <= 1; ++training) {
        c.training = training;
        l[1 * E + 2] = NAN;
        CHECK(rh_forward(&r, &c) == MOE_ERR_INVALID_ARG);
        CHECK_MSG(strstr(r.msg, "token 1") != NULL && strstr(r.msg, "expert 2") != NULL, "%s", r.msg);
        l[1 * E + 2] = 0.0f;
        l[2 * E + 3] = INFINITY;
        CHECK(rh_forward(&r, &c) == MOE_ERR_INVALID_ARG);
        CHECK_MSG(strstr(r.msg, "token 2") != NULL && strstr(r.msg, "expert 3") != NULL, "%s", r.msg);
        float cw[T * 2] = {0}, cr[T * E] = {0}, dl[T * E], dx[T * D];
        CHECK(rh_backward(&r, &c, cw, cr, dl, dx) == MOE_ERR_INVALID_ARG);
        l[2 * E + 3] = 0.0f;
    }
    c.x = NULL; /* learned noise in training reads x */
    CHECK(rh_forward(&r, &c) == MOE_ERR_INVALID_ARG);
    c.x = x;
    c.logits = NULL;
    CHECK(rh_forward(&r, &c) == MOE_ERR_INVALID_ARG);
    rh_free_outputs(&c);

    rh_call z = {.T = 0, .training = 1, .key = KEY}; /* T = 0: a valid no-op */
    rh_alloc_outputs(&r, &z);
    CHECK(rh_forward(&r, &z) == MOE_OK);
    float nothing[1];
    CHECK(rh_backward(&r, &z, nothing, nothing, nothing, NULL) == MOE_OK);
    rh_free_outputs(&z);
    rh_destroy(&r);
}

int main(void) {
    const struct moe_router_plugin_v1 *p = rh_load("noisy_topk");
    test_table(p);
    test_eval_is_softk(p);
    test_zero_noise_is_softk(p);
    test_determinism(p);
    test_noise_statistics(p);
    test_learned_sigma(p);

    /* learned sigma in training: dlogits, dx and dW_noise */
    test_gradients(p, NULL, 0, 1, 1, 1001);
    /* fixed sigma in training, temperature 0.5: dlogits */
    moe_option fixed[3] = {rh_opt_bool("learned", 0), rh_opt_float("noise_std", 0.7), rh_opt_float("temperature", 0.5)};
    test_gradients(p, fixed, 3, 1, 0, 2002);
    /* evaluation with learned noise: the noise path is off */
    test_gradients(p, NULL, 0, 0, 0, 3003);
    test_accumulation(p);
    test_saved(p);
    test_errors(p);
    return moe_test_summary("test_router_noisy_topk");
}
