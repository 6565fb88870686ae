/*
 * Hand-worked cases for the loss_free_bias router, through its ABI exactly
 * as the host uses it: dlopen the built plugin (argv[1]), create, query,
 * forward, backward.
 *
 *   test_loss_free_bias path/to/loss_free_bias.so
 *
 * Numbers below come from sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4,
 * sigmoid(-ln 3) = 1/4, sigmoid(ln 9) = 9/10.
 */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <moe/router.h>

static int failures = 0, checks = 0;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        ++checks;                                                          \
        if (!(cond)) {                                                     \
            ++failures;                                                    \
            fprintf(stderr, "%s:%d: FAILED %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fputc('\n', stderr);                                           \
        }                                                                  \
    } while (0)
#define CLOSE(a, b) (fabs((double)(a) - (double)(b)) <= 1e-6)

static const moe_router_plugin_v1_t *P;

/* One instance with E experts, K per token and the given options. */
typedef struct router {
    void *state;
    moe_router_info info;
    float bias[16];
    int32_t work[64];
    char msg[512];
} router;

static moe_status make(router *r, int E, int K, const moe_option *opts, int n_opts) {
    memset(r, 0, sizeof *r);
    moe_router_dims d;
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.num_experts = E;
    d.top_k = K;
    d.d_model = 4;
    d.vocab_size = 10;
    d.max_tokens = 16;
    d.capacity_factor = 1.0;
    moe_status st = P->create(&d, opts, n_opts, &r->state, r->msg, sizeof r->msg);
    if (st != MOE_OK) return st;
    r->info.struct_size = sizeof r->info;
    return P->query(r->state, &r->info);
}

static moe_context context(router *r, int training) {
    moe_context c;
    memset(&c, 0, sizeof c);
    c.struct_size = sizeof c;
    c.device = MOE_DEVICE_CPU;
    c.workspace = r->work;
    c.workspace_bytes = r->info.workspace_bytes;
    c.training = training;
    c.world_size = 1;
    c.msg = r->msg;
    c.msg_cap = sizeof r->msg;
    return c;
}

static moe_status forward(router *r, int training, const float *logits, int T, int E, int32_t *expert, float *weight) {
    moe_context c = context(r, training);
    float *buffers[1] = {r->bias};
    moe_router_fwd_args a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.T = T;
    a.E = E;
    a.k_out = r->info.k_out;
    a.logits = logits;
    a.buffers = buffers;
    a.expert = expert;
    a.weight = weight;
    return P->cpu->forward(r->state, &c, &a);
}

static moe_status backward(router *r, const float *logits, int T, int E, const int32_t *expert, const float *weight,
                           const float *dweight, float *dlogits) {
    moe_context c = context(r, 1);
    float *buffers[1] = {r->bias};
    moe_router_bwd_args a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.T = T;
    a.E = E;
    a.k_out = r->info.k_out;
    a.logits = logits;
    a.buffers = buffers;
    a.expert = expert;
    a.weight = weight;
    a.dweight = dweight;
    a.dlogits = dlogits;
    return P->cpu->backward(r->state, &c, &a);
}

static void test_info(void) {
    router r;
    CHECK(make(&r, 4, 2, NULL, 0) == MOE_OK, "%s", r.msg);
    CHECK(r.info.k_out == 2, "k_out %d", r.info.k_out);
    CHECK(r.info.flags == MOE_ROUTER_WEIGHT_SUM_EXACT && r.info.weight_sum == 1.0f, "flags %u", r.info.flags);
    CHECK(r.info.n_params == 0 && r.info.n_buffers == 1, "%d params, %d buffers", r.info.n_params, r.info.n_buffers);
    CHECK(strcmp(r.info.buffers[0].name, "bias") == 0 && r.info.buffers[0].ndim == 1 &&
              r.info.buffers[0].shape[0] == 4 && r.info.buffers[0].init == MOE_INIT_ZEROS,
          "the bias buffer is [E] zeros");
    P->destroy(r.state);

    moe_option no_norm = {"normalize", MOE_OPT_BOOL, 0, 0.0, NULL};
    CHECK(make(&r, 4, 2, &no_norm, 1) == MOE_OK, "%s", r.msg);
    CHECK(r.info.flags == 0, "unnormalized weights do not sum to a constant: flags %u", r.info.flags);
    P->destroy(r.state);
}

static void test_refusals(void) {
    router r;
    moe_option unknown = {"update_rat", MOE_OPT_FLOAT, 0, 0.1, NULL};
    CHECK(make(&r, 4, 2, &unknown, 1) == MOE_ERR_OPTION && strstr(r.msg, "update_rat"), "%s", r.msg);
    moe_option too_fast = {"update_rate", MOE_OPT_FLOAT, 0, 2.0, NULL};
    CHECK(make(&r, 4, 2, &too_fast, 1) == MOE_ERR_OPTION && strstr(r.msg, "update_rate"), "%s", r.msg);
    moe_option relu = {"score", MOE_OPT_STRING, 0, 0.0, "relu"};
    CHECK(make(&r, 4, 2, &relu, 1) == MOE_ERR_OPTION && strstr(r.msg, "score"), "%s", r.msg);
    CHECK(make(&r, 4, 5, NULL, 0) == MOE_ERR_INVALID_ARG && r.msg[0], "top_k > num_experts: %s", r.msg);

    CHECK(make(&r, 2, 1, NULL, 0) == MOE_OK, "%s", r.msg);
    float l[2] = {0.0f, NAN};
    int32_t e[1];
    float w[1];
    CHECK(forward(&r, 0, l, 1, 2, e, w) == MOE_ERR_INVALID_ARG && strstr(r.msg, "finite"), "NaN logit: %s", r.msg);
    P->destroy(r.state);
}

/* Three tokens, E = 4, K = 2, zero bias. */
static void test_forward_and_bias_update(void) {
    const float ln3 = logf(3.0f), ln9 = logf(9.0f);
    const float l[3 * 4] = {
        0.0f, ln3,  -ln3, ln9,  /* s = .5 .75 .25 .9 -> experts 3, 1 */
        ln3,  0.0f, ln9,  -ln3, /* s = .75 .5 .9 .25 -> experts 2, 0 */
        0.0f, 0.0f, 0.0f, 0.0f, /* a four-way tie   -> experts 0, 1 */
    };
    const int32_t want_e[6] = {3, 1, 2, 0, 0, 1};
    const float want_w[6] = {0.9f / 1.65f, 0.75f / 1.65f, 0.9f / 1.65f, 0.75f / 1.65f, 0.5f, 0.5f};
    moe_option u = {"update_rate", MOE_OPT_FLOAT, 0, 0.1, NULL};
    router r;
    CHECK(make(&r, 4, 2, &u, 1) == MOE_OK, "%s", r.msg);
    int32_t e[6];
    float w[6];

    /* Evaluation: routes, leaves the bias alone. */
    CHECK(forward(&r, 0, l, 3, 4, e, w) == MOE_OK, "%s", r.msg);
    for (int i = 0; i < 6; ++i) {
        CHECK(e[i] == want_e[i], "entry %d: expert %d, want %d", i, e[i], want_e[i]);
        CHECK(CLOSE(w[i], want_w[i]), "entry %d: weight %.9g, want %.9g", i, (double)w[i], (double)want_w[i]);
    }
    for (int k = 0; k < 4; ++k) CHECK(r.bias[k] == 0.0f, "evaluation changed bias[%d] to %g", k, (double)r.bias[k]);

    /* Training: same routing, then counts 2 2 1 1 against a mean of
     * T K / E = 1.5: the busy experts 0 and 1 drop by u, 2 and 3 rise. */
    CHECK(forward(&r, 1, l, 3, 4, e, w) == MOE_OK, "%s", r.msg);
    CHECK(memcmp(e, want_e, sizeof e) == 0, "training routes like evaluation");
    const float want_b[4] = {-0.1f, -0.1f, 0.1f, 0.1f};
    for (int k = 0; k < 4; ++k)
        CHECK(CLOSE(r.bias[k], want_b[k]), "bias[%d] = %g, want %g", k, (double)r.bias[k], (double)want_b[k]);

    /* The bias steers the selection, not the weights: with b = (.3, 0, 0, 0)
     * token 0 sees .8 .75 .25 .9 and takes experts 3 and 0, weighted by the
     * unbiased scores .9 and .5. */
    r.bias[0] = 0.3f;
    r.bias[1] = r.bias[2] = r.bias[3] = 0.0f;
    CHECK(forward(&r, 0, l, 1, 4, e, w) == MOE_OK, "%s", r.msg);
    CHECK(e[0] == 3 && e[1] == 0, "biased choice: experts %d, %d; want 3, 0", e[0], e[1]);
    CHECK(CLOSE(w[0], 0.9 / 1.4) && CLOSE(w[1], 0.5 / 1.4), "weights %.9g %.9g, want %.9g %.9g", (double)w[0],
          (double)w[1], 0.9 / 1.4, 0.5 / 1.4);
    P->destroy(r.state);
}

static void test_backward(void) {
    router r;
    /* sigmoid, normalized: l = 0 everywhere, experts 0 and 1 at w = .5 each,
     * g = (1, 0): ds = (g - w.g) / S = (.5, -.5), dl = ds * s (1 - s) = ds / 4. */
    CHECK(make(&r, 4, 2, NULL, 0) == MOE_OK, "%s", r.msg);
    const float l0[4] = {0, 0, 0, 0};
    int32_t e[2];
    float w[2], dl[4];
    CHECK(forward(&r, 1, l0, 1, 4, e, w) == MOE_OK, "%s", r.msg);
    const float g[2] = {1.0f, 0.0f};
    CHECK(backward(&r, l0, 1, 4, e, w, g, dl) == MOE_OK, "%s", r.msg);
    const float want[4] = {0.125f, -0.125f, 0.0f, 0.0f};
    for (int k = 0; k < 4; ++k) CHECK(CLOSE(dl[k], want[k]), "dl[%d] = %g, want %g", k, (double)dl[k], (double)want[k]);
    P->destroy(r.state);

    /* softmax, unnormalized, K = 1: l = (0, ln 2, ln 5) gives p = (1, 2, 5) / 8,
     * expert 2 with w = 5/8; g = 1: dl_e = p_e (ds_e - p_2) with ds = (0, 0, 1). */
    moe_option opts[2] = {{"score", MOE_OPT_STRING, 0, 0.0, "softmax"}, {"normalize", MOE_OPT_BOOL, 0, 0.0, NULL}};
    CHECK(make(&r, 3, 1, opts, 2) == MOE_OK, "%s", r.msg);
    const float l1[3] = {0.0f, logf(2.0f), logf(5.0f)};
    CHECK(forward(&r, 1, l1, 1, 3, e, w) == MOE_OK, "%s", r.msg);
    CHECK(e[0] == 2 && CLOSE(w[0], 0.625), "expert %d weight %g; want 2, 0.625", e[0], (double)w[0]);
    const float g1 = 1.0f;
    CHECK(backward(&r, l1, 1, 3, e, w, &g1, dl) == MOE_OK, "%s", r.msg);
    const float want1[3] = {-0.125f * 0.625f, -0.25f * 0.625f, 0.625f * 0.375f};
    for (int k = 0; k < 3; ++k)
        CHECK(CLOSE(dl[k], want1[k]), "dl[%d] = %g, want %g", k, (double)dl[k], (double)want1[k]);
    P->destroy(r.state);
}

/* The gradient against central differences on random logits (bias fixed). */
static void test_gradient(void) {
    router r;
    CHECK(make(&r, 6, 3, NULL, 0) == MOE_OK, "%s", r.msg);
    float l[6];
    unsigned seed = 12345u;
    for (int k = 0; k < 6; ++k) {
        seed = seed * 1103515245u + 12345u;
        l[k] = (float)((seed >> 8) % 4000) / 1000.0f - 2.0f;
    }
    int32_t e[3], e2[3];
    float w[3], w2[3], dl[6];
    const float g[3] = {0.7f, -0.4f, 0.2f};
    CHECK(forward(&r, 0, l, 1, 6, e, w) == MOE_OK, "%s", r.msg);
    CHECK(backward(&r, l, 1, 6, e, w, g, dl) == MOE_OK, "%s", r.msg);
    for (int k = 0; k < 6; ++k) {
        const float eps = 1e-3f, saved = l[k];
        double lp = 0, lm = 0;
        l[k] = saved + eps;
        forward(&r, 0, l, 1, 6, e2, w2);
        for (int j = 0; j < 3; ++j) lp += g[j] * w2[j];
        int same = memcmp(e, e2, sizeof e) == 0;
        l[k] = saved - eps;
        forward(&r, 0, l, 1, 6, e2, w2);
        for (int j = 0; j < 3; ++j) lm += g[j] * w2[j];
        same &= memcmp(e, e2, sizeof e) == 0;
        l[k] = saved;
        if (!same) continue;
        double num = (lp - lm) / (2.0 * eps);
        CHECK(fabs(num - dl[k]) <= 1e-3 + 1e-2 * fabs(num), "dl[%d] = %g, central difference %g", k, (double)dl[k], num);
    }
    P->destroy(r.state);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s path/to/loss_free_bias.so\n", argv[0]);
        return 2;
    }
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    moe_router_plugin_v1_fn fn = h ? (moe_router_plugin_v1_fn)dlsym(h, MOE_ROUTER_SYMBOL_V1) : NULL;
    P = fn ? fn() : NULL;
    if (!P || P->abi_version != MOE_ROUTER_ABI_VERSION || !P->cpu) {
        fprintf(stderr, "cannot load the router from %s: %s\n", argv[1], h ? "bad table" : dlerror());
        return 2;
    }
    test_info();
    test_refusals();
    test_forward_and_bias_update();
    test_backward();
    test_gradient();
    printf("test_loss_free_bias: %d checks, %d failed\n", checks, failures);
    dlclose(h);
    return failures ? 1 : 0;
}
