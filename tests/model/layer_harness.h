/*
 * Shared by the MoE layer tests: one moe_layer built directly on the CPU
 * backend with a router plugin loaded from a file, the probe
 * L = sum(c .* y) + aux (+ the straight-through surrogate), and the
 * finite-difference gradient check of dx and every parameter tensor.
 * See test_moe_layer.c for what is checked and why.
 */
#ifndef MOE_TEST_LAYER_HARNESS_H
#define MOE_TEST_LAYER_HARNESS_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "model/moe.h"
#include "model/params.h"
#include "runtime/plugin_loader.h"
#include "test_util.h"

#define FD_EPS 1e-3f
#define RTOL 2e-2
#define ATOL 1e-4

enum { PROBE_FULL = 0, PROBE_AUX_ONLY = 1, PROBE_ST = 2 };

typedef struct lcase {
    const char *name;
    const char *plugin; /* a built-in name, or a path when it contains '/' */
    moe_option opts[2];
    int n_opts;
    moe_gate_kind gate;
    int gate_hidden;
    moe_act_kind act;
    int expert_bias;
    int policy; /* 0 position, 1 probs */
    int renorm;
    double cf;
    int top_k;
    int T;
    int training;
    float aux_w, z_w;
    int probe;
    int drops; /* 1: some assignment must be dropped; 0: none may be; -1: either */
} lcase;

typedef struct harness {
    const lcase *lc;
    moe_backend *be;
    moe_router_lib lib;
    moe_param_set P, B;
    moe_layer L;
    int ok, T, d, E, dff, Ko, V;
    float *x, *c, *y, *dx;
    int32_t *ids;
    moe_rng_key key;
    double *st_D;
    int32_t *base_route; /* expert, kept, slot of the base point, 3*T*Ko */
} harness;

static const int D_MODEL = 8, N_EXPERTS = 4, D_FF = 6, MAX_T = 12, VOCAB = 16;

/* ------------------------------------------------------------------------ */
/* set-up                                                                    */
/* ------------------------------------------------------------------------ */

static void plugin_path(const char *plugin, char *out, size_t cap) {
    if (strchr(plugin, '/')) snprintf(out, cap, "%s", plugin);
    else snprintf(out, cap, "%s/%s.so", MOE_TEST_PLUGIN_DIR, plugin);
}

/* Build the layer for `lc` with d_model d and E experts; 0 ok. */
static int h_open_dims(harness *h, const lcase *lc, int d, int E, uint64_t seed) {
    char err[1024], path[1024];
    memset(h, 0, sizeof *h);
    h->lc = lc;
    h->T = lc->T;
    h->d = d;
    h->E = E;
    h->dff = D_FF;
    h->V = VOCAB;
    h->be = moe_backend_cpu_create(1);
    plugin_path(lc->plugin, path, sizeof path);
    if (moe_router_lib_open_file(&h->lib, path, err, sizeof err) != 0) {
        CHECK_MSG(0, "%s: %s", lc->name, err);
        return -1;
    }
    moe_layer_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.d_model = d;
    cfg.num_experts = E;
    cfg.top_k = lc->top_k;
    cfg.d_ff = D_FF;
    cfg.gate_hidden = lc->gate_hidden;
    cfg.max_tokens = MAX_T;
    cfg.layer = 3;
    cfg.vocab_size = VOCAB;
    cfg.gate = lc->gate;
    cfg.activation = lc->act;
    cfg.expert_bias = lc->expert_bias;
    cfg.drop_policy = lc->policy;
    cfg.renorm_after_drop = lc->renorm;
    cfg.capacity_factor = lc->cf;
    cfg.aux_loss_weight = lc->aux_w;
    cfg.z_loss_weight = lc->z_w;
    cfg.init_std = 0.3f;
    moe_params_init_set(&h->P, 1);
    moe_params_init_set(&h->B, 0);
    if (moe_layer_create(&h->L, &cfg, h->be, h->lib.api, lc->opts, lc->n_opts, &h->P, &h->B, err, sizeof err) != 0) {
        CHECK_MSG(0, "%s: moe_layer_create: %s", lc->name, err);
        return -1;
    }
    if (moe_params_allocate(&h->P, h->be, seed) != 0 || moe_params_allocate(&h->B, h->be, seed + 1) != 0 ||
        moe_layer_alloc(&h->L, err, sizeof err) != 0) {
        CHECK_MSG(0, "%s: allocation failed: %s", lc->name, err);
        return -1;
    }
    h->Ko = h->L.rinfo.k_out;
    h->L.collect_stats = 1; /* the tests check the routing statistics of every forward */
    /* Random values everywhere (biases and w_noise included, which start at
     * zero), so every gradient term is exercised. */
    moe_test_rng r = {seed * 7919u + 17u};
    for (int i = 0; i < h->P.n; ++i) {
        const moe_param_entry *e = &h->P.entries[i];
        moe_test_fill(&r, h->P.values + e->offset, e->numel, -0.5f, 0.5f);
    }
    size_t n = (size_t)MAX_T * d;
    h->x = h->be->alloc(h->be, n * sizeof(float));
    h->c = h->be->alloc(h->be, n * sizeof(float));
    h->y = h->be->alloc(h->be, n * sizeof(float));
    h->dx = h->be->alloc(h->be, n * sizeof(float));
    h->ids = h->be->alloc(h->be, MAX_T * sizeof(int32_t));
    h->st_D = calloc((size_t)MAX_T * h->Ko, sizeof(double));
    h->base_route = calloc((size_t)3 * MAX_T * h->Ko, sizeof(int32_t));
    moe_test_fill(&r, h->x, n, -1.0f, 1.0f);
    if (lc->probe == PROBE_AUX_ONLY) memset(h->c, 0, n * sizeof(float));
    else moe_test_fill(&r, h->c, n, -1.0f, 1.0f);
    for (int t = 0; t < MAX_T; ++t) h->ids[t] = (int32_t)(moe_test_next(&r) % VOCAB);
    moe_rng_key key = {seed, 5, 3, MOE_RNG_STREAM_ROUTER};
    h->key = key;
    h->ok = 1;
    return 0;
}

static int h_open(harness *h, const lcase *lc, uint64_t seed) { return h_open_dims(h, lc, D_MODEL, N_EXPERTS, seed); }

static void h_close(harness *h) {
    if (h->L.be) moe_layer_destroy(&h->L);
    if (h->be) {
        moe_params_free(&h->P, h->be); /* safe on a set never allocated */
        moe_params_free(&h->B, h->be);
        h->be->free(h->be, h->x);
        h->be->free(h->be, h->c);
        h->be->free(h->be, h->y);
        h->be->free(h->be, h->dx);
        h->be->free(h->be, h->ids);
        moe_backend_destroy(h->be);
    }
    moe_router_lib_close(&h->lib);
    free(h->st_D);
    free(h->base_route);
    memset(h, 0, sizeof *h);
}

/* ------------------------------------------------------------------------ */
/* the probe                                                                 */
/* ------------------------------------------------------------------------ */

/* sum over kept (t,k) of D[t,k] * softk weight of the token's selected
 * experts at the current logits (temperature 1). */
static double st_surrogate(const harness *h) {
    const moe_layer *L = &h->L;
    double s = 0.0;
    for (int t = 0; t < h->T; ++t) {
        const float *l = L->logits + (size_t)t * h->E;
        const int32_t *ex = L->expert + (size_t)t * h->Ko;
        double m = -INFINITY, den = 0.0;
        for (int k = 0; k < h->Ko; ++k)
            if (ex[k] >= 0 && l[ex[k]] > m) m = l[ex[k]];
        for (int k = 0; k < h->Ko; ++k)
            if (ex[k] >= 0) den += exp((double)l[ex[k]] - m);
        for (int k = 0; k < h->Ko; ++k)
            if (ex[k] >= 0) s += h->st_D[(size_t)t * h->Ko + k] * exp((double)l[ex[k]] - m) / den;
    }
    return s;
}

static int h_forward(harness *h, double *probe, char *err, size_t errcap) {
    double aux = 0.0;
    int rc = moe_layer_forward(&h->L, h->x, h->ids, h->T, h->lc->training, h->key, NULL, h->y, &aux, err, errcap);
    if (rc != 0) return rc;
    double s = aux;
    for (size_t i = 0; i < (size_t)h->T * h->d; ++i) s += (double)h->c[i] * (double)h->y[i];
    if (h->lc->probe == PROBE_ST) s += st_surrogate(h);
    *probe = s;
    return 0;
}

static void save_route(const harness *h, int32_t *out) {
    size_t n = (size_t)h->T * h->Ko;
    memcpy(out, h->L.expert, n * sizeof(int32_t));
    memcpy(out + n, h->L.kept, n * sizeof(int32_t));
    memcpy(out + 2 * n, h->L.slot, n * sizeof(int32_t));
}

static int same_route(const harness *h) {
    size_t n = (size_t)h->T * h->Ko;
    return memcmp(h->base_route, h->L.expert, n * sizeof(int32_t)) == 0 &&
           memcmp(h->base_route + n, h->L.kept, n * sizeof(int32_t)) == 0 &&
           memcmp(h->base_route + 2 * n, h->L.slot, n * sizeof(int32_t)) == 0;
}

/* ------------------------------------------------------------------------ */
/* gradient comparison                                                       */
/* ------------------------------------------------------------------------ */

/* Number of coordinates where |fd - an| > RTOL * scale + ATOL, scale = the
 * largest |an| or |fd| of the tensor. Prints the first few when verbose. */
static int compare_grads(const char *what, const char *tensor, const double *fd, const float *an,
                         const unsigned char *skip, size_t n, int verbose, double *worst) {
    double scale = 0.0;
    for (size_t i = 0; i < n; ++i) {
        if (fabs((double)an[i]) > scale) scale = fabs((double)an[i]);
        if (!skip[i] && fabs(fd[i]) > scale) scale = fabs(fd[i]);
    }
    double tol = RTOL * scale + ATOL;
    int bad = 0;
    for (size_t i = 0; i < n; ++i) {
        if (skip[i]) continue;
        double diff = fabs(fd[i] - (double)an[i]);
        if (worst && diff / tol > *worst) *worst = diff / tol;
        if (diff > tol) {
            if (verbose && bad < 5)
                fprintf(stderr, "  %s: %s[%zu]: analytic %.6g, finite difference %.6g (tol %.3g)\n", what, tensor, i,
                        (double)an[i], fd[i], tol);
            ++bad;
        }
    }
    return bad;
}

typedef struct fd_tally {
    long long checked, skipped;
    double worst; /* largest |fd - an| / tol */
} fd_tally;

/* Finite differences of the probe over the n values at v; compare with an. */
static void check_tensor(harness *h, const char *tensor, float *v, const float *an, size_t n, fd_tally *tally) {
    char err[1024];
    double *fd = calloc(n ? n : 1, sizeof *fd);
    unsigned char *skip = calloc(n ? n : 1, 1);
    int failed = 0;
    for (size_t i = 0; i < n && !failed; ++i) {
        float orig = v[i];
        float hi = orig + FD_EPS, lo = orig - FD_EPS;
        double lp, lm;
        v[i] = hi;
        int rc = h_forward(h, &lp, err, sizeof err);
        int same = rc == 0 && same_route(h);
        v[i] = lo;
        rc |= h_forward(h, &lm, err, sizeof err);
        same = same && rc == 0 && same_route(h);
        v[i] = orig;
        if (rc != 0) {
            CHECK_MSG(0, "%s: forward failed during finite differences: %s", h->lc->name, err);
            failed = 1;
            break;
        }
        if (!same) {
            skip[i] = 1;
            tally->skipped++;
            continue;
        }
        fd[i] = (lp - lm) / ((double)hi - (double)lo);
        tally->checked++;
    }
    if (!failed) {
        int bad = compare_grads(h->lc->name, tensor, fd, an, skip, n, 1, &tally->worst);
        CHECK_MSG(bad == 0, "%s: %d of %zu coordinates of %s disagree with finite differences", h->lc->name, bad, n,
                  tensor);
        /* The comparison must be able to fail: shift the largest checked
         * analytic value by 10% of the tensor's scale. */
        size_t arg = n;
        double big = 0.0;
        for (size_t i = 0; i < n; ++i)
            if (!skip[i] && fabs((double)an[i]) > big) big = fabs((double)an[i]), arg = i;
        if (arg < n && big > 10 * ATOL) {
            float *bad_an = malloc(n * sizeof *bad_an);
            memcpy(bad_an, an, n * sizeof *bad_an);
            bad_an[arg] += (float)(0.1 * big);
            CHECK_MSG(compare_grads(h->lc->name, tensor, fd, bad_an, skip, n, 0, NULL) > 0,
                      "%s: a corrupted gradient of %s went unnoticed", h->lc->name, tensor);
            free(bad_an);
        }
    }
    free(fd);
    free(skip);
}

/* D[t,k] = dL/dweight[t,k] at the base point for the straight-through probe:
 * <c[t], Ye[kept, slot]> for kept assignments (no renorm in those cases). */
static void compute_st_D(harness *h) {
    const moe_layer *L = &h->L;
    for (int t = 0; t < h->T; ++t)
        for (int k = 0; k < h->Ko; ++k) {
            size_t a = (size_t)t * h->Ko + k;
            h->st_D[a] = 0.0;
            if (L->kept[a] < 0) continue;
            const float *row = L->Ye + ((size_t)L->kept[a] * L->C + L->slot[a]) * h->d;
            for (int i = 0; i < h->d; ++i) h->st_D[a] += (double)h->c[(size_t)t * h->d + i] * row[i];
        }
}

/* Backward once at the base point, then finite differences of every tensor. */
static void gradcheck(harness *h) {
    char err[1024];
    const lcase *lc = h->lc;
    double base;
    if (h_forward(h, &base, err, sizeof err) != 0) {
        CHECK_MSG(0, "%s: forward: %s", lc->name, err);
        return;
    }
    if (lc->probe == PROBE_ST) compute_st_D(h);
    if (h_forward(h, &base, err, sizeof err) != 0) return;
    save_route(h, h->base_route);

    size_t nx = (size_t)h->T * h->d, np = h->P.total;
    h->be->zero(h->be, h->P.grads, np * sizeof(float));
    h->be->zero(h->be, h->dx, nx * sizeof(float));
    if (moe_layer_backward(&h->L, h->ids, h->c, h->dx, 1, h->key, err, sizeof err) != 0) {
        CHECK_MSG(0, "%s: backward: %s", lc->name, err);
        return;
    }
    float *an_p = malloc(np * sizeof(float)), *an_x = malloc(nx * sizeof(float));
    memcpy(an_p, h->P.grads, np * sizeof(float));
    memcpy(an_x, h->dx, nx * sizeof(float));

    /* Parameter gradients accumulate, dx is overwritten: a second forward
     * + backward onto non-zero buffers adds the same amounts to the
     * gradients and writes the same dx. */
    {
        float *pre_p = malloc(np * sizeof(float)), *pre_x = malloc(nx * sizeof(float));
        moe_test_rng r = {99};
        moe_test_fill(&r, pre_p, np, -0.5f, 0.5f);
        moe_test_fill(&r, pre_x, nx, -0.5f, 0.5f);
        memcpy(h->P.grads, pre_p, np * sizeof(float));
        memcpy(h->dx, pre_x, nx * sizeof(float));
        double again;
        int rc = h_forward(h, &again, err, sizeof err);
        CHECK_MSG(rc == 0 && again == base, "%s: a second forward gave %.17g, the first %.17g", lc->name, again, base);
        rc |= moe_layer_backward(&h->L, h->ids, h->c, h->dx, 1, h->key, err, sizeof err);
        int bad = rc != 0;
        for (size_t i = 0; i < np && !bad; ++i)
            if (fabsf(h->P.grads[i] - pre_p[i] - an_p[i]) > 1e-6f * (1.0f + fabsf(an_p[i]))) bad = 1;
        for (size_t i = 0; i < nx && !bad; ++i)
            if (fabsf(h->dx[i] - an_x[i]) > 1e-6f * (1.0f + fabsf(an_x[i]))) bad = 1;
        CHECK_MSG(!bad, "%s: backward does not accumulate into the parameter grads and overwrite dx", lc->name);

        /* accumulate_expert_dw = 0: the experts' dw1 and dw2 are written
         * over, every other gradient still adds */
        memcpy(h->P.grads, pre_p, np * sizeof(float));
        rc = h_forward(h, &again, err, sizeof err);
        rc |= moe_layer_backward(&h->L, h->ids, h->c, h->dx, 0, h->key, err, sizeof err);
        float *dw[2];
        size_t len[2];
        moe_layer_expert_weight_grads(&h->L, dw, len);
        bad = rc != 0;
        for (size_t i = 0; i < np && !bad; ++i) {
            int written_over = 0;
            for (int k = 0; k < 2; ++k)
                if (i >= (size_t)(dw[k] - h->P.grads) && i < (size_t)(dw[k] - h->P.grads) + len[k]) written_over = 1;
            const float want = written_over ? an_p[i] : pre_p[i] + an_p[i];
            if (fabsf(h->P.grads[i] - want) > 1e-6f * (1.0f + fabsf(an_p[i]))) bad = 1;
        }
        CHECK_MSG(!bad, "%s: backward with accumulate_expert_dw = 0 does not write dw1, dw2 over", lc->name);
        free(pre_p);
        free(pre_x);
    }

    fd_tally tally = {0, 0, 0.0};
    for (int i = 0; i < h->P.n; ++i) {
        const moe_param_entry *e = &h->P.entries[i];
        check_tensor(h, e->name, h->P.values + e->offset, an_p + e->offset, e->numel, &tally);
    }
    check_tensor(h, "x", h->x, an_x, nx, &tally);
    long long total = tally.checked + tally.skipped;
    CHECK_MSG(tally.checked > 0 && tally.skipped * 5 <= total,
              "%s: %lld of %lld coordinates skipped for routing flips; the check would say too little", lc->name,
              tally.skipped, total);
    printf("  %-52s %5lld checked, %3lld skipped, worst |fd-an|/tol %.3f\n", lc->name, tally.checked, tally.skipped,
           tally.worst);
    free(an_p);
    free(an_x);
}


#define NOOPT {{0}}, 0
#define OPT_S(k, v) {{k, MOE_OPT_STRING, 0, 0.0, v}}, 1
#define OPT_B(k, v) {{k, MOE_OPT_BOOL, v, 0.0, NULL}}, 1
#define OPT_I(k, v) {{k, MOE_OPT_INT, v, (double)v, NULL}}, 1
#define LIN MOE_GATE_LINEAR
#define MLP MOE_GATE_MLP
#define HAD MOE_GATE_MLP_HADAMARD
#define GELU MOE_ACT_GELU
#define SILU MOE_ACT_SILU
#define SWIGLU MOE_ACT_SWIGLU

#endif
