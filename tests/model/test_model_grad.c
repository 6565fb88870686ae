/*
 * test_model_grad: the TinyMoE model (core/model/model.c) on the CPU backend.
 *
 *   - d(loss + aux)/d(param) from moe_model_backward against central finite
 *     differences of moe_model_forward (training = 1, the same step so
 *     dropout masks and router keys repeat) for a random sample of about 200
 *     coordinates spread over every tensor of m.params, in the
 *     configurations: learned positions + LayerNorm + tied head; RoPE +
 *     RMSNorm + untied head + SwiGLU experts; each of them with dropout 0.2.
 *     Capacity factor 2 drops nothing, so the objective is smooth except
 *     where a top-k choice flips (such coordinates are detected and skipped).
 *   - A deliberately corrupted analytic value is caught by the comparison.
 *   - Determinism: the same forward twice gives bitwise the same loss and
 *     aux, the same forward + backward twice bitwise the same gradients.
 *   - Evaluation (training = 0): no backward needed, grads untouched,
 *     dropout off (the loss equals a training forward with dropout 0),
 *     repeatable, and a following training step is unaffected.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "model/model.h"
#include "runtime/config.h"
#include "runtime/plugin_loader.h"
#include "test_util.h"

#define V_SIZE 11
#define B_SEQ 2
#define FD_EPS 1e-3f
#define RTOL 2e-2
#define ATOL 2e-4
#define N_SAMPLES 200
#define STEP 3

typedef struct mcase {
    const char *name;
    const char *pos, *norm;
    int tied;
    const char *act, *gate;
    double dropout;
} mcase;

static const mcase cases[] = {
    {"learned+layernorm+tied gelu", "learned", "layernorm", 1, "gelu", "linear", 0.0},
    {"rope+rmsnorm+untied swiglu", "rope", "rmsnorm", 0, "swiglu", "linear", 0.0},
    {"learned+layernorm+tied gelu dropout0.2", "learned", "layernorm", 1, "gelu", "linear", 0.2},
    {"rope+rmsnorm+untied swiglu mlp-gate dropout0.2", "rope", "rmsnorm", 0, "swiglu", "mlp", 0.2},
};

typedef struct mh {
    const mcase *mc;
    moe_backend *be;
    moe_model m;
    int32_t ids[B_SEQ * 5], targets[B_SEQ * 5];
    int T, Ko;
    int32_t *base_route; /* per layer: expert then kept, T*Ko each */
} mh;

static int mh_open(mh *h, const mcase *mc, moe_router_lib *lib, uint64_t seed) {
    char err[1024];
    memset(h, 0, sizeof *h);
    h->mc = mc;
    h->be = moe_backend_cpu_create(1);
    moe_config cfg;
    moe_config_defaults(&cfg);
    cfg.run.seed = (int64_t)seed;
    cfg.model.d_model = 8;
    cfg.model.n_layers = 2;
    cfg.model.n_heads = 2;
    cfg.model.seq_len = 5;
    snprintf(cfg.model.pos, sizeof cfg.model.pos, "%s", mc->pos);
    snprintf(cfg.model.norm, sizeof cfg.model.norm, "%s", mc->norm);
    cfg.model.tie_embeddings = mc->tied;
    cfg.model.dropout = mc->dropout;
    cfg.model.init_std = 0.3;
    cfg.moe.num_experts = 3;
    cfg.moe.top_k = 2;
    cfg.moe.d_ff = 6;
    cfg.moe.capacity_factor = 2.0;
    snprintf(cfg.moe.activation, sizeof cfg.moe.activation, "%s", mc->act);
    snprintf(cfg.moe.gate, sizeof cfg.moe.gate, "%s", mc->gate);
    cfg.moe.aux_loss_weight = 0.1;
    cfg.moe.z_loss_weight = 0.05;
    if (moe_model_create(&h->m, &cfg, h->be, V_SIZE, B_SEQ, lib->api, err, sizeof err) != 0) {
        CHECK_MSG(0, "%s: moe_model_create: %s", mc->name, err);
        return -1;
    }
    /* Move every tensor off its init (gains 1, biases 0) so each gradient
     * term is exercised. */
    moe_test_rng r = {seed * 31u + 7u};
    for (int i = 0; i < h->m.params.n; ++i) {
        const moe_param_entry *e = &h->m.params.entries[i];
        float *v = h->m.params.values + e->offset;
        for (size_t j = 0; j < e->numel; ++j) {
            float u = moe_test_uniform(&r, -1.0f, 1.0f);
            v[j] = e->init == MOE_INIT_CONST ? 1.0f + 0.2f * u : e->init == MOE_INIT_ZEROS ? 0.1f * u : 0.4f * u;
        }
    }
    h->T = B_SEQ * 5;
    for (int t = 0; t < h->T; ++t) {
        h->ids[t] = (int32_t)(moe_test_next(&r) % V_SIZE);
        h->targets[t] = (int32_t)(moe_test_next(&r) % V_SIZE);
    }
    h->targets[3] = -1; /* an ignored target */
    h->Ko = h->m.blocks[0].moe.rinfo.k_out;
    moe_model_set_collect_stats(&h->m, 1); /* gradcheck reads the layers' drop counts */
    h->base_route = calloc((size_t)2 * h->m.n_layers * h->T * h->Ko, sizeof(int32_t));
    return 0;
}

static void mh_close(mh *h) {
    if (h->m.be) moe_model_destroy(&h->m);
    if (h->be) moe_backend_destroy(h->be);
    free(h->base_route);
    memset(h, 0, sizeof *h);
}

static int mh_forward(mh *h, int training, double *obj, moe_forward_result *res) {
    char err[1024];
    moe_forward_result out;
    if (moe_model_forward(&h->m, h->ids, h->targets, B_SEQ, training, STEP, &out, err, sizeof err) != 0) {
        CHECK_MSG(0, "%s: forward: %s", h->mc->name, err);
        return -1;
    }
    if (obj) *obj = out.loss + out.aux;
    if (res) *res = out;
    return 0;
}

static void save_route(mh *h, int32_t *out) {
    size_t n = (size_t)h->T * h->Ko;
    for (int l = 0; l < h->m.n_layers; ++l) {
        memcpy(out + (2 * l) * n, h->m.blocks[l].moe.expert, n * sizeof(int32_t));
        memcpy(out + (2 * l + 1) * n, h->m.blocks[l].moe.kept, n * sizeof(int32_t));
    }
}

static int same_route(mh *h) {
    size_t n = (size_t)h->T * h->Ko;
    for (int l = 0; l < h->m.n_layers; ++l)
        if (memcmp(h->base_route + (2 * l) * n, h->m.blocks[l].moe.expert, n * sizeof(int32_t)) != 0 ||
            memcmp(h->base_route + (2 * l + 1) * n, h->m.blocks[l].moe.kept, n * sizeof(int32_t)) != 0)
            return 0;
    return 1;
}

static int analytic(mh *h, float *grads) {
    char err[1024];
    moe_model_zero_grads(&h->m);
    if (mh_forward(h, 1, NULL, NULL) != 0) return -1;
    if (moe_model_backward(&h->m, STEP, err, sizeof err) != 0) {
        CHECK_MSG(0, "%s: backward: %s", h->mc->name, err);
        return -1;
    }
    memcpy(grads, h->m.params.grads, h->m.params.total * sizeof(float));
    return 0;
}

static void gradcheck(mh *h) {
    const char *nm = h->mc->name;
    size_t total = h->m.params.total;
    float *an = malloc(total * sizeof *an);
    if (analytic(h, an) != 0) {
        free(an);
        return;
    }
    for (int l = 0; l < h->m.n_layers; ++l)
        CHECK_MSG(h->m.blocks[l].moe.stats.dropped == 0, "%s: layer %d dropped assignments with CF 2", nm, l);
    double base;
    mh_forward(h, 1, &base, NULL);
    save_route(h, h->base_route);

    size_t used = 0;
    for (int i = 0; i < h->m.params.n; ++i) used += h->m.params.entries[i].numel;
    moe_test_rng r = {4242};
    long long checked = 0, skipped = 0;
    double worst = 0.0;
    int caught = 0, caught_tries = 0;
    for (int i = 0; i < h->m.params.n; ++i) {
        const moe_param_entry *e = &h->m.params.entries[i];
        float *v = h->m.params.values + e->offset;
        const float *g = an + e->offset;
        size_t k = (size_t)lround((double)N_SAMPLES * (double)e->numel / (double)used);
        if (k < 6) k = 6;
        if (k > e->numel) k = e->numel;
        double scale = 0.0;
        for (size_t j = 0; j < e->numel; ++j) scale = fmax(scale, fabs((double)g[j]));
        int bad = 0;
        double big_fd = 0.0, big_an = 0.0;
        for (size_t s = 0; s < k; ++s) {
            /* every coordinate of a small tensor, else k random ones */
            size_t j = k == e->numel ? s : (size_t)(moe_test_next(&r) % e->numel);
            float orig = v[j], hi = orig + FD_EPS, lo = orig - FD_EPS;
            double lp, lm;
            v[j] = hi;
            int rc = mh_forward(h, 1, &lp, NULL);
            int same = rc == 0 && same_route(h);
            v[j] = lo;
            rc |= mh_forward(h, 1, &lm, NULL);
            same = same && rc == 0 && same_route(h);
            v[j] = orig;
            if (rc != 0) break;
            if (!same) {
                skipped++;
                continue;
            }
            checked++;
            double fd = (lp - lm) / ((double)hi - (double)lo);
            scale = fmax(scale, fabs(fd));
            double tol = RTOL * scale + ATOL;
            double diff = fabs(fd - (double)g[j]);
            worst = fmax(worst, diff / tol);
            if (diff > tol) {
                if (bad < 4)
                    fprintf(stderr, "  %s: %s[%zu]: analytic %.6g, finite difference %.6g (tol %.3g)\n", nm, e->name,
                            j, (double)g[j], fd, tol);
                bad++;
            }
            if (fabs((double)g[j]) > big_an) big_an = fabs((double)g[j]), big_fd = fd;
        }
        if (getenv("MOE_TEST_VERBOSE"))
            printf("    %-28s numel %5zu sampled %3zu  max|grad| %.3g\n", e->name, e->numel, k, scale);
        CHECK_MSG(bad == 0, "%s: %d sampled coordinates of %s disagree with finite differences", nm, bad, e->name);
        /* The comparison can fail: the largest sampled analytic value,
         * off by 10% of the tensor's scale, is out of tolerance. */
        if (big_an > 10 * ATOL) {
            caught_tries++;
            double wrong = (big_an + 0.1 * scale) * (big_fd < 0 ? -1.0 : 1.0);
            caught += fabs(big_fd - wrong) > RTOL * scale + ATOL;
        }
    }
    CHECK_MSG(caught_tries > 0 && caught == caught_tries, "%s: %d of %d corrupted gradients went unnoticed", nm,
              caught_tries - caught, caught_tries);
    CHECK_MSG(checked >= N_SAMPLES * 3 / 4, "%s: only %lld coordinates checked (%lld skipped for routing flips)", nm,
              checked, skipped);
    printf("  %-48s %4lld checked, %3lld skipped, worst |fd-an|/tol %.3f\n", nm, checked, skipped, worst);
    (void)base;
    free(an);
}

static void determinism_and_eval(mh *h) {
    const char *nm = h->mc->name;
    size_t total = h->m.params.total;
    moe_forward_result a, b;
    if (mh_forward(h, 1, NULL, &a) != 0 || mh_forward(h, 1, NULL, &b) != 0) return;
    CHECK_MSG(memcmp(&a.loss, &b.loss, sizeof a.loss) == 0 && memcmp(&a.aux, &b.aux, sizeof a.aux) == 0,
              "%s: two forwards gave loss %.17g / %.17g, aux %.17g / %.17g", nm, a.loss, b.loss, a.aux, b.aux);
    CHECK(a.n_targets == h->T - 1 && a.n_correct == b.n_correct);
    CHECK(isfinite(a.loss) && a.loss > 0.0 && a.aux > 0.0);

    float *g1 = malloc(total * sizeof *g1), *g2 = malloc(total * sizeof *g2);
    if (analytic(h, g1) != 0) goto out;

    /* evaluation: no backward follows; grads must stay as they are */
    moe_forward_result e1, e2;
    if (mh_forward(h, 0, NULL, &e1) != 0 || mh_forward(h, 0, NULL, &e2) != 0) goto out;
    CHECK_MSG(memcmp(h->m.params.grads, g1, total * sizeof *g1) == 0, "%s: an evaluation forward changed the grads", nm);
    CHECK_MSG(e1.loss == e2.loss && e1.aux == e2.aux, "%s: evaluation is not repeatable", nm);
    CHECK(e1.n_targets == h->T - 1);
    /* dropout is off in evaluation: the same as training with dropout 0 */
    float p = h->m.dropout;
    h->m.dropout = 0.0f;
    moe_forward_result t0;
    int rc = mh_forward(h, 1, NULL, &t0);
    h->m.dropout = p;
    if (rc != 0) goto out;
    CHECK_MSG(e1.loss == t0.loss && e1.aux == t0.aux, "%s: evaluation loss %.17g, training without dropout %.17g", nm,
              e1.loss, t0.loss);
    if (p > 0.0f) CHECK_MSG(a.loss != e1.loss, "%s: dropout %.1f changed nothing in training", nm, (double)p);

    /* a training step after evaluation repeats bit for bit */
    if (analytic(h, g2) != 0) goto out;
    CHECK_MSG(memcmp(g1, g2, total * sizeof *g1) == 0, "%s: forward + backward twice gave different gradients", nm);
out:
    free(g1);
    free(g2);
}

int main(void) {
    char err[1024];
    moe_router_lib lib;
    if (moe_router_lib_open_file(&lib, MOE_TEST_PLUGIN_DIR "/softk.so", err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    printf("TinyMoE gradient checks (eps %g, tolerance %g * max|grad| + %g):\n", (double)FD_EPS, RTOL, ATOL);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
        mh h;
        if (mh_open(&h, &cases[i], &lib, 100 + i) == 0) {
            determinism_and_eval(&h);
            gradcheck(&h);
        }
        mh_close(&h);
    }
    moe_router_lib_close(&lib);
    return moe_test_summary("test_model_grad");
}
