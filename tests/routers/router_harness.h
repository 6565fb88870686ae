/*
 * Test harness for router plugins: loads a built plugin with dlopen, creates
 * an instance the way the host does (params and buffers allocated and
 * initialised from the plugin's specs), runs forward and backward on the CPU
 * table, and checks backward against central finite differences of forward.
 *
 * Only the SDK header and libc/libdl are used, so the harness tests a plugin
 * exactly through its ABI.
 */
#ifndef MOE_ROUTER_HARNESS_H
#define MOE_ROUTER_HARNESS_H

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/router.h"
#include "test_util.h"

/* Where the built plugins are: $MOE_TEST_PLUGIN_DIR when set (a build
 * copied to another machine), else the build tree this test was built in. */
static inline const char *rh_plugin_dir(void) {
    const char *env = getenv("MOE_TEST_PLUGIN_DIR");
    return env && *env ? env : MOE_TEST_PLUGIN_DIR;
}

/* The plugin `name` from the build tree, or NULL (with the reason on stderr). */
static inline const moe_router_plugin_v1_t *rh_try_load(const char *name) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.so", rh_plugin_dir(), name);
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "cannot load %s: %s\n", path, dlerror());
        return NULL;
    }
    moe_router_plugin_v1_fn fn = (moe_router_plugin_v1_fn)dlsym(h, MOE_ROUTER_SYMBOL_V1);
    if (!fn) {
        fprintf(stderr, "%s exports no %s\n", path, MOE_ROUTER_SYMBOL_V1);
        return NULL;
    }
    const moe_router_plugin_v1_t *p = fn();
    if (!p || p->abi_version != MOE_ROUTER_ABI_VERSION || p->struct_size < sizeof *p || !p->cpu) {
        fprintf(stderr, "%s: bad plugin table\n", path);
        return NULL;
    }
    return p;
}

/* The plugin `name` from the build tree; exits the test on failure. */
static inline const moe_router_plugin_v1_t *rh_load(const char *name) {
    const moe_router_plugin_v1_t *p = rh_try_load(name);
    if (!p) exit(2);
    return p;
}

/* A live instance with host-owned params/buffers. */
typedef struct rh_router {
    const moe_router_plugin_v1_t *plugin;
    void *state;
    moe_router_dims dims;
    moe_router_info info;
    float *params[MOE_MAX_PLUGIN_TENSORS];
    float *param_grads[MOE_MAX_PLUGIN_TENSORS];
    size_t param_size[MOE_MAX_PLUGIN_TENSORS];
    float *buffers[MOE_MAX_PLUGIN_TENSORS];
    void *workspace;
    char msg[1024];
} rh_router;

static inline size_t rh_numel(const moe_tensor_spec *s) {
    size_t n = 1;
    for (int i = 0; i < s->ndim; ++i) n *= (size_t)s->shape[i];
    return n;
}

static inline void rh_init_tensor(float *p, const moe_tensor_spec *s, uint64_t seed) {
    size_t n = rh_numel(s);
    moe_test_rng r = {seed * 0x9E3779B97F4A7C15ULL + 1};
    for (size_t i = 0; i < n; ++i) {
        switch (s->init) {
        case MOE_INIT_ZEROS: p[i] = 0.0f; break;
        case MOE_INIT_CONST: p[i] = s->init_value; break;
        case MOE_INIT_NORMAL: /* test-only: a uniform of the same std is enough here */
            p[i] = s->init_value * 1.7320508f * moe_test_uniform(&r, -1.0f, 1.0f);
            break;
        case MOE_INIT_UNIFORM: p[i] = s->init_value * moe_test_uniform(&r, -1.0f, 1.0f); break;
        }
    }
}

static inline moe_router_dims rh_dims(int E, int K, int d_model, int vocab, int max_tokens, double cf) {
    moe_router_dims d;
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.num_experts = E;
    d.top_k = K;
    d.d_model = d_model;
    d.vocab_size = vocab;
    d.max_tokens = max_tokens;
    d.capacity_factor = cf;
    return d;
}

/* Create an instance; returns the plugin's status (message in r->msg). */
static inline moe_status rh_create(rh_router *r, const moe_router_plugin_v1_t *p, moe_router_dims dims,
                            const moe_option *opts, int n_opts) {
    memset(r, 0, sizeof *r);
    r->plugin = p;
    r->dims = dims;
    moe_status st = p->create(&dims, opts, n_opts, &r->state, r->msg, sizeof r->msg);
    if (st != MOE_OK) return st;
    r->info.struct_size = sizeof r->info;
    st = p->query(r->state, &r->info);
    if (st != MOE_OK) return st;
    for (int i = 0; i < r->info.n_params; ++i) {
        r->param_size[i] = rh_numel(&r->info.params[i]);
        r->params[i] = calloc(r->param_size[i], sizeof(float));
        r->param_grads[i] = calloc(r->param_size[i], sizeof(float));
        rh_init_tensor(r->params[i], &r->info.params[i], (uint64_t)i + 11);
    }
    for (int i = 0; i < r->info.n_buffers; ++i) {
        r->buffers[i] = calloc(rh_numel(&r->info.buffers[i]), sizeof(float));
        rh_init_tensor(r->buffers[i], &r->info.buffers[i], (uint64_t)i + 101);
    }
    /* Exactly the declared size, so ASan sees a plugin that overruns it. */
    r->workspace = calloc(r->info.workspace_bytes ? r->info.workspace_bytes : 1, 1);
    return MOE_OK;
}

/* Create an instance the test cannot go on without: a failure ends the program. */
static inline void rh_create_or_exit(rh_router *r, const moe_router_plugin_v1_t *p, moe_router_dims dims,
                                     const moe_option *opts, int n_opts) {
    moe_status st = rh_create(r, p, dims, opts, n_opts);
    if (st != MOE_OK) {
        fprintf(stderr, "create(E=%d, K=%d) failed (%d): %s\n", dims.num_experts, dims.top_k, (int)st, r->msg);
        exit(1);
    }
}

static inline void rh_destroy(rh_router *r) {
    for (int i = 0; i < r->info.n_params; ++i) {
        free(r->params[i]);
        free(r->param_grads[i]);
    }
    for (int i = 0; i < r->info.n_buffers; ++i) free(r->buffers[i]);
    free(r->workspace);
    if (r->state) r->plugin->destroy(r->state);
    memset(r, 0, sizeof *r);
}

static inline moe_context rh_context(rh_router *r, int training, moe_rng_key key) {
    moe_context c;
    memset(&c, 0, sizeof c);
    c.struct_size = sizeof c;
    c.device = MOE_DEVICE_CPU;
    c.workspace = r->workspace;
    c.workspace_bytes = r->info.workspace_bytes;
    c.rng = key;
    c.training = training;
    c.world_size = 1;
    c.msg = r->msg;
    c.msg_cap = sizeof r->msg;
    return c;
}

/* Inputs of one routing call; outputs are allocated by rh_alloc_outputs. */
typedef struct rh_call {
    int T;
    int capacity;
    int training;
    moe_rng_key key;
    const float *logits;     /* [T,E] */
    const float *x;          /* [T,d] */
    const int32_t *ids;      /* [T] */
    int32_t *expert;         /* [T,k_out] */
    float *weight;           /* [T,k_out] */
    int32_t *slot;           /* [T,k_out] when OWNS_CAPACITY */
    float *route_logits;     /* [T,E] when PERTURBS_LOGITS */
} rh_call;

static inline void rh_alloc_outputs(const rh_router *r, rh_call *c) {
    size_t n = (size_t)(c->T > 0 ? c->T : 1) * (size_t)r->info.k_out;
    size_t ne = (size_t)(c->T > 0 ? c->T : 1) * (size_t)r->dims.num_experts;
    c->expert = calloc(n, sizeof(int32_t));
    c->weight = calloc(n, sizeof(float));
    c->slot = (r->info.flags & MOE_ROUTER_OWNS_CAPACITY) ? calloc(n, sizeof(int32_t)) : NULL;
    c->route_logits = (r->info.flags & MOE_ROUTER_PERTURBS_LOGITS) ? calloc(ne, sizeof(float)) : NULL;
}

static inline void rh_free_outputs(rh_call *c) {
    free(c->expert);
    free(c->weight);
    free(c->slot);
    free(c->route_logits);
    c->expert = NULL;
    c->weight = NULL;
    c->slot = NULL;
    c->route_logits = NULL;
}

static inline moe_status rh_forward(rh_router *r, rh_call *c) {
    moe_context ctx = rh_context(r, c->training, c->key);
    moe_router_fwd_args a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.T = c->T;
    a.E = r->dims.num_experts;
    a.k_out = r->info.k_out;
    a.capacity = c->capacity;
    a.d_model = r->dims.d_model;
    a.logits = c->logits;
    a.x = c->x;
    a.token_ids = c->ids;
    a.params = r->params;
    a.buffers = r->buffers;
    a.expert = c->expert;
    a.weight = c->weight;
    a.slot = c->slot;
    a.route_logits = c->route_logits;
    return r->plugin->cpu->forward(r->state, &ctx, &a);
}

/* Forward T tokens of logits[T,E] (nothing else: no x, no ids, training 0);
 * the caller frees c's outputs with rh_free_outputs. */
static inline moe_status rh_route(rh_router *r, int T, const float *logits, rh_call *c) {
    memset(c, 0, sizeof *c);
    c->T = T;
    c->logits = logits;
    rh_alloc_outputs(r, c);
    return rh_forward(r, c);
}

/* Forward through the CPU table with the arguments given one by one, so that
 * a test can pass NULL pointers and wrong shapes (evaluation, key 0). */
static inline moe_status rh_forward_raw(rh_router *r, int T, int E, int k_out, const float *logits, int32_t *expert,
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

/* Backward likewise (training, key 0). */
static inline moe_status rh_backward_raw(rh_router *r, int T, int E, int k_out, const float *logits,
                                         const float *dweight, float *dlogits) {
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

/* Backward of the probe loss L = sum(cw .* weight) + sum(cr .* route_logits).
 * dlogits [T,E] overwritten, dx [T,d] and param_grads zeroed then accumulated. */
static inline moe_status rh_backward(rh_router *r, rh_call *c, const float *cw, const float *cr,
                              float *dlogits, float *dx) {
    moe_context ctx = rh_context(r, c->training, c->key);
    size_t n = (size_t)c->T * r->info.k_out;
    float *dweight = calloc(n ? n : 1, sizeof(float));
    /* The host passes dweight = 0 for empty assignments. */
    for (size_t i = 0; i < n; ++i) dweight[i] = c->expert[i] >= 0 ? cw[i] : 0.0f;
    for (int i = 0; i < r->info.n_params; ++i) memset(r->param_grads[i], 0, r->param_size[i] * sizeof(float));
    if (dx) memset(dx, 0, (size_t)c->T * r->dims.d_model * sizeof(float));
    moe_router_bwd_args a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.T = c->T;
    a.E = r->dims.num_experts;
    a.k_out = r->info.k_out;
    a.capacity = c->capacity;
    a.d_model = r->dims.d_model;
    a.logits = c->logits;
    a.x = c->x;
    a.token_ids = c->ids;
    a.params = r->params;
    a.buffers = r->buffers;
    a.expert = c->expert;
    a.weight = c->weight;
    a.slot = c->slot;
    a.route_logits = c->route_logits;
    a.dweight = dweight;
    a.d_route_logits = c->route_logits ? cr : NULL;
    a.dlogits = dlogits;
    a.dx = dx;
    a.param_grads = r->param_grads;
    moe_status st = r->plugin->cpu->backward(r->state, &ctx, &a);
    free(dweight);
    return st;
}

/* Probe loss of one forward at the current inputs. Returns NAN if the
 * routing decision differs from `ref_expert` (the finite difference would
 * then straddle a discontinuity). */
static inline double rh_probe(rh_router *r, rh_call *c, const float *cw, const float *cr, const int32_t *ref_expert) {
    rh_call d = *c;
    rh_alloc_outputs(r, &d);
    double L = NAN;
    if (rh_forward(r, &d) == MOE_OK) {
        size_t n = (size_t)c->T * r->info.k_out;
        int same = memcmp(d.expert, ref_expert, n * sizeof(int32_t)) == 0;
        if (same) {
            L = 0.0;
            for (size_t i = 0; i < n; ++i) L += (double)cw[i] * d.weight[i];
            if (d.route_logits)
                for (size_t i = 0; i < (size_t)c->T * r->dims.num_experts; ++i) L += (double)cr[i] * d.route_logits[i];
        }
    }
    rh_free_outputs(&d);
    return L;
}

/* Central differences of the probe loss with respect to one float. Returns
 * the numeric derivative, or NAN when a routing decision flipped. */
static inline double rh_fd(rh_router *r, rh_call *c, float *v, float eps, const float *cw, const float *cr,
                    const int32_t *ref_expert) {
    float saved = *v;
    *v = saved + eps;
    double lp = rh_probe(r, c, cw, cr, ref_expert);
    *v = saved - eps;
    double lm = rh_probe(r, c, cw, cr, ref_expert);
    *v = saved;
    return (lp - lm) / (2.0 * eps);
}

/* Check analytic dlogits, dx and param grads against finite differences on
 * every coordinate (the cases are small). Records CHECKs; returns the number
 * of coordinates skipped because a decision flipped. `logits` and `x` in the
 * call must be writable copies (they are perturbed and restored). */
static inline int rh_check_gradients(rh_router *r, rh_call *c, float *logits, float *x, uint64_t seed,
                              float eps, double tol) {
    int T = c->T, E = r->dims.num_experts, d = r->dims.d_model;
    size_t n = (size_t)T * r->info.k_out;
    moe_test_rng rng = {seed};
    float *cw = malloc((n ? n : 1) * sizeof(float));
    float *cr = malloc(((size_t)T * E + 1) * sizeof(float));
    moe_test_fill(&rng, cw, n, -1.0f, 1.0f);
    moe_test_fill(&rng, cr, (size_t)T * E, -1.0f, 1.0f);
    float *dlogits = calloc((size_t)T * E + 1, sizeof(float));
    float *dx = calloc((size_t)T * d + 1, sizeof(float));
    CHECK(rh_forward(r, c) == MOE_OK);
    int32_t *ref = malloc((n ? n : 1) * sizeof(int32_t));
    memcpy(ref, c->expert, n * sizeof(int32_t));
    CHECK(rh_backward(r, c, cw, cr, dlogits, x ? dx : NULL) == MOE_OK);
    int skipped = 0;
    double scale = 1e-3;
    for (size_t i = 0; i < (size_t)T * E; ++i) scale = fmax(scale, fabs(dlogits[i]));
    for (size_t i = 0; i < (size_t)T * E; ++i) {
        double num = rh_fd(r, c, &logits[i], eps, cw, cr, ref);
        if (isnan(num)) { ++skipped; continue; }
        CHECK_MSG(fabs(num - dlogits[i]) <= tol * scale, "%s dlogits[%zu]: analytic %.6g numeric %.6g",
                  r->plugin->name, i, dlogits[i], num);
    }
    if (x) {
        for (size_t i = 0; i < (size_t)T * d; ++i) {
            double num = rh_fd(r, c, &x[i], eps, cw, cr, ref);
            if (isnan(num)) { ++skipped; continue; }
            CHECK_MSG(fabs(num - dx[i]) <= tol * fmax(scale, fabs(num)), "%s dx[%zu]: analytic %.6g numeric %.6g",
                      r->plugin->name, i, dx[i], num);
        }
    }
    for (int p = 0; p < r->info.n_params; ++p) {
        /* Copy the grads: the probes below call forward only, but keep them safe. */
        float *g = malloc(r->param_size[p] * sizeof(float));
        memcpy(g, r->param_grads[p], r->param_size[p] * sizeof(float));
        for (size_t i = 0; i < r->param_size[p]; ++i) {
            double num = rh_fd(r, c, &r->params[p][i], eps, cw, cr, ref);
            if (isnan(num)) { ++skipped; continue; }
            CHECK_MSG(fabs(num - g[i]) <= tol * fmax(scale, fabs(num)), "%s d%s[%zu]: analytic %.6g numeric %.6g",
                      r->plugin->name, r->info.params[p].name, i, g[i], num);
        }
        free(g);
    }
    free(cw);
    free(cr);
    free(dlogits);
    free(dx);
    free(ref);
    return skipped;
}

/* Rows that are a shuffled 0, 0.8, 1.6, ... plus noise in [-0.2, 0.2), less
 * 1.5: entries of a row differ by at least 0.4, far more than a finite
 * difference step, so no routing decision flips during a gradient check. */
static inline void rh_gapped_logits(uint64_t seed, int T, int E, float *l) {
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

/* ---- checks every router's test makes ---------------------------------------- */

/* The table: its name, ABI version and size, a description, the entry
 * points, a CUDA table exactly when the build has CUDA, n_options options. */
static inline void rh_check_table(const moe_router_plugin_v1_t *p, const char *name, int n_options) {
    CHECK_MSG(strcmp(p->name, name) == 0, "table name '%s', expected '%s'", p->name, name);
    CHECK(p->abi_version == MOE_ROUTER_ABI_VERSION);
    CHECK(p->struct_size == sizeof(struct moe_router_plugin_v1));
    CHECK_MSG(p->description && strlen(p->description) > 10, "%s: no description", name);
    CHECK_MSG(p->create && p->destroy && p->query, "%s: create, destroy or query missing", name);
    CHECK_MSG(p->cpu && p->cpu->forward && p->cpu->backward, "%s: the CPU table is incomplete", name);
#ifdef MOE_WITH_CUDA
    CHECK_MSG(p->cuda != NULL && p->cuda->forward && p->cuda->backward, "%s: a CUDA build without a CUDA table", name);
#else
    CHECK_MSG(p->cuda == NULL, "%s: a CUDA table in a build without CUDA", name);
#endif
    CHECK_MSG(p->n_options == n_options, "%s: %d options, expected %d", name, p->n_options, n_options);
}

/* Option spec i: key, type, default, choices (NULL: none), range (min < max:
 * exactly [min, max]; else none), and a help text. */
static inline void rh_check_option(const moe_router_plugin_v1_t *p, int i, const char *key, moe_opt_type type,
                                   const char *default_value, const char *choices, double min, double max) {
    const moe_option_spec *o = &p->options[i];
    CHECK_MSG(strcmp(o->key, key) == 0, "%s option %d: key '%s', expected '%s'", p->name, i, o->key, key);
    CHECK_MSG(o->type == type, "%s option '%s': type %d, expected %d", p->name, key, (int)o->type, (int)type);
    CHECK_MSG(strcmp(o->default_value, default_value) == 0, "%s option '%s': default '%s', expected '%s'", p->name,
              key, o->default_value, default_value);
    if (choices)
        CHECK_MSG(o->choices && strcmp(o->choices, choices) == 0, "%s option '%s': choices '%s', expected '%s'",
                  p->name, key, o->choices ? o->choices : "(none)", choices);
    else
        CHECK_MSG(o->choices == NULL, "%s option '%s': choices '%s', expected none", p->name, key, o->choices);
    if (min < max)
        CHECK_MSG(o->min == min && o->max == max, "%s option '%s': range [%g, %g], expected [%g, %g]", p->name, key,
                  o->min, o->max, min, max);
    else
        CHECK_MSG(!(o->min < o->max), "%s option '%s': a range [%g, %g], expected none", p->name, key, o->min,
                  o->max);
    CHECK_MSG(o->help && strlen(o->help) > 10, "%s option '%s': no help text", p->name, key);
}

/* create() must answer `want` with a message containing `a` and `b` (each
 * may be NULL) and leave no instance. */
static inline void rh_expect_create_error(const moe_router_plugin_v1_t *p, moe_router_dims dims,
                                          const moe_option *opts, int n_opts, moe_status want, const char *a,
                                          const char *b) {
    rh_router r;
    moe_status st = rh_create(&r, p, dims, opts, n_opts);
    CHECK_MSG(st == want, "%s create(E=%d, K=%d%s%s): status %d, expected %d: %s", p->name, dims.num_experts,
              dims.top_k, n_opts ? ", option " : "", n_opts ? opts[0].key : "", (int)st, (int)want, r.msg);
    CHECK_MSG((!a || strstr(r.msg, a)) && (!b || strstr(r.msg, b)), "%s: message '%s' lacks '%s' or '%s'", p->name,
              r.msg, a ? a : "", b ? b : "");
    CHECK_MSG(r.state == NULL, "%s: a refused create left an instance", p->name);
    rh_destroy(&r);
}

/* create() with the one option `opt` must refuse it with MOE_ERR_OPTION and a
 * message containing `a` and `b` (the key, and the value or the keys the
 * router accepts; each may be NULL). */
static inline void rh_expect_option_error(const moe_router_plugin_v1_t *p, moe_router_dims dims, moe_option opt,
                                          const char *a, const char *b) {
    rh_expect_create_error(p, dims, &opt, 1, MOE_ERR_OPTION, a, b);
}

/* The [moe] shapes no router can serve, with the other dims of `base`:
 * top_k = 9 > num_experts = 8, top_k = 0, num_experts = 0. */
static inline void rh_check_refuses_bad_dims(const moe_router_plugin_v1_t *p, moe_router_dims base) {
    moe_router_dims d = base;
    d.num_experts = 8;
    d.top_k = 9;
    rh_expect_create_error(p, d, NULL, 0, MOE_ERR_INVALID_ARG, "top_k = 9", "num_experts = 8");
    d.top_k = 0;
    rh_expect_create_error(p, d, NULL, 0, MOE_ERR_INVALID_ARG, "top_k", NULL);
    d.num_experts = 0;
    d.top_k = 1;
    rh_expect_create_error(p, d, NULL, 0, MOE_ERR_INVALID_ARG, "num_experts", NULL);
}

/* A router that reads the logits refuses non-finite ones in forward and
 * backward, naming the first as logit[t,e] with NaN, +Inf or -Inf. `r` has
 * E = 4; two tokens, rows [0, 1, 2, 3] and [3, 2, 1, 0] with one bad entry. */
static inline void rh_check_refuses_nonfinite_logits(rh_router *r) {
    float l[8] = {0, 1, 2, 3, 3, 2, 1, 0};
    const float g[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    float dl[8];
    rh_call c;
    l[6] = NAN;
    CHECK(rh_route(r, 2, l, &c) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r->msg, "logit[1,2]") && strstr(r->msg, "NaN"), "%s msg: %s", r->plugin->name, r->msg);
    CHECK(rh_backward(r, &c, g, NULL, dl, NULL) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r->msg, "logit[1,2]") != NULL, "%s msg: %s", r->plugin->name, r->msg);
    rh_free_outputs(&c);

    l[6] = 1;
    l[3] = INFINITY;
    CHECK(rh_route(r, 2, l, &c) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r->msg, "logit[0,3]") && strstr(r->msg, "+Inf"), "%s msg: %s", r->plugin->name, r->msg);
    rh_free_outputs(&c);

    l[3] = 3;
    l[4] = -INFINITY;
    CHECK(rh_route(r, 2, l, &c) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r->msg, "logit[1,0]") && strstr(r->msg, "-Inf"), "%s msg: %s", r->plugin->name, r->msg);
    rh_free_outputs(&c);
}

/* A router that reads the logits refuses, for two tokens of l[2,E], a forward
 * without logits, expert or weight, a backward without dlogits, dweight or
 * logits, and T = -1. */
static inline void rh_check_refuses_missing_args(rh_router *r, const float *l) {
    const int E = r->dims.num_experts, k = r->info.k_out;
    int32_t expert[64];
    float weight[64], dl[64], g[64];
    for (int i = 0; i < 64; ++i) g[i] = 1.0f;
    if (2 * k > 64 || 2 * E > 64) {
        CHECK_MSG(0, "rh_check_refuses_missing_args: E = %d, k_out = %d is too large", E, k);
        return;
    }
    CHECK(rh_forward_raw(r, 2, E, k, NULL, expert, weight) == MOE_ERR_INVALID_ARG);
    CHECK(rh_forward_raw(r, 2, E, k, l, NULL, weight) == MOE_ERR_INVALID_ARG);
    CHECK(rh_forward_raw(r, 2, E, k, l, expert, NULL) == MOE_ERR_INVALID_ARG);
    CHECK(rh_forward_raw(r, -1, E, k, l, expert, weight) == MOE_ERR_INVALID_ARG);
    CHECK(rh_backward_raw(r, 2, E, k, l, g, NULL) == MOE_ERR_INVALID_ARG);
    CHECK(rh_backward_raw(r, 2, E, k, l, NULL, dl) == MOE_ERR_INVALID_ARG);
    CHECK(rh_backward_raw(r, 2, E, k, NULL, g, dl) == MOE_ERR_INVALID_ARG);
}

/* Two forwards of the same logits[T,E], and two backwards of the same
 * g[T,k_out], are bitwise equal. */
static inline void rh_check_determinism(rh_router *r, int T, const float *l, const float *g) {
    const size_t n = (size_t)T * r->info.k_out, ne = (size_t)T * r->dims.num_experts;
    float *dla = malloc(ne * sizeof(float)), *dlb = malloc(ne * sizeof(float));
    rh_call a, b;
    CHECK(rh_route(r, T, l, &a) == MOE_OK);
    CHECK(rh_route(r, T, l, &b) == MOE_OK);
    CHECK_MSG(memcmp(a.expert, b.expert, sizeof(int32_t) * n) == 0, "%s: experts differ", r->plugin->name);
    CHECK_MSG(memcmp(a.weight, b.weight, sizeof(float) * n) == 0, "%s: weights differ", r->plugin->name);
    CHECK(rh_backward(r, &a, g, NULL, dla, NULL) == MOE_OK);
    CHECK(rh_backward(r, &b, g, NULL, dlb, NULL) == MOE_OK);
    CHECK_MSG(memcmp(dla, dlb, sizeof(float) * ne) == 0, "%s: dlogits differ", r->plugin->name);
    rh_free_outputs(&a);
    rh_free_outputs(&b);
    free(dla);
    free(dlb);
}

/* An option value for tests. */
static inline moe_option rh_opt_str(const char *key, const char *s) {
    moe_option o = {key, MOE_OPT_STRING, 0, 0.0, s};
    return o;
}
static inline moe_option rh_opt_float(const char *key, double f) {
    moe_option o = {key, MOE_OPT_FLOAT, 0, f, NULL};
    return o;
}
static inline moe_option rh_opt_int(const char *key, long long i) {
    moe_option o = {key, MOE_OPT_INT, i, (double)i, NULL};
    return o;
}
static inline moe_option rh_opt_bool(const char *key, int b) {
    moe_option o = {key, MOE_OPT_BOOL, b ? 1 : 0, 0.0, NULL};
    return o;
}

#endif
