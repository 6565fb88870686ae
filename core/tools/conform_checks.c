/*
 * moe-conform checks. Each group runs in its own process (see moe_conform.c)
 * and reports one row per check: create, options, forward invariants and
 * memory, determinism, the gradient check, bad inputs, and CUDA parity.
 *
 * The contract checked is the one in moe/router.h and docs/plugins.md:
 *   - indices in [-1, E), weights finite and >= 0 (0 where the index is -1),
 *     no expert twice in a token;
 *   - MOE_ROUTER_WEIGHT_SUM_EXACT: each token's weights sum to weight_sum;
 *   - MOE_ROUTER_OWNS_CAPACITY: at most C per expert, slots in [0, C) and
 *     unique per expert, with C = max(1, ceil(CF * T * min(top_k, k_out) / E));
 *     with MOE_ROUTER_DENSE_SLOTS also exactly 0 .. n-1 for an expert's n
 *     assignments (the flag alone, without owning capacity, is an error);
 *   - the same inputs and RNG key give bitwise the same outputs;
 *   - backward matches central finite differences of forward (unless
 *     MOE_ROUTER_NO_GRAD);
 *   - bad inputs are answered with an error and a message, never a crash;
 *   - a plugin with a saved buffer gives the same outputs without one (an
 *     older host);
 *   - nothing is written outside the declared workspace and the outputs, and
 *     nothing that is only to be read is changed.
 */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "tools/conform.h"

/* ------------------------------------------------------------------ */
/* Tallies: the first failure of a check, and how many more             */
/* ------------------------------------------------------------------ */

typedef struct tally {
    int fails;
    long checked;
    char first[768];
} tally;

static void tfail(tally *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tfail(tally *t, const char *fmt, ...) {
    if (t->fails++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(t->first, sizeof t->first, fmt, ap);
        va_end(ap);
    }
}

/* FAIL with the first failure, or PASS with `pass`. */
static void trow(const char *check, const tally *t, const char *pass, ...) __attribute__((format(printf, 3, 4)));
static void trow(const char *check, const tally *t, const char *pass, ...) {
    if (t->fails) {
        if (t->fails > 1)
            cf_row(check, CF_FAIL, "%s (and %d more failure%s)", t->first, t->fails - 1, t->fails > 2 ? "s" : "");
        else
            cf_row(check, CF_FAIL, "%s", t->first);
        return;
    }
    char detail[512];
    va_list ap;
    va_start(ap, pass);
    vsnprintf(detail, sizeof detail, pass, ap);
    va_end(ap);
    cf_row(check, CF_PASS, "%s", detail);
}

static void skip_rows(const char *const *rows, int n, const char *why) {
    for (int i = 0; i < n; ++i) cf_row(rows[i], CF_SKIP, "%s", why);
}

/* ------------------------------------------------------------------ */
/* Devices and shapes                                                  */
/* ------------------------------------------------------------------ */

/* The device the checks run on: CUDA with --device cuda where the plugin
 * has a cuda table and a GPU answers, else the CPU. */
static int pick_device(const cf_config *cfg, cf_device *dev, char *why, size_t cap) {
    why[0] = '\0';
    if (cfg->device == MOE_DEVICE_CUDA) {
        if (!cfg->api->cuda) snprintf(why, cap, "the plugin has no cuda table");
        else if (cf_device_cuda(dev, why, cap) == 0) return 0;
    }
    if (!cfg->api->cpu) {
        if (cfg->device == MOE_DEVICE_CPU)
            snprintf(why, cap, "the plugin has no cpu table; run with --device cuda on a machine with a GPU");
        return -1;
    }
    cf_device_cpu(dev);
    return 0;
}

static int group_device(const cf_config *cfg, cf_device *dev, const char *const *rows, int n) {
    char why[CF_WHY_CAP];
    if (pick_device(cfg, dev, why, sizeof why) == 0) return 0;
    char msg[CF_WHY_CAP + 32];
    snprintf(msg, sizeof msg, "not run: %s", why);
    skip_rows(rows, n, msg);
    return -1;
}

typedef struct shape {
    int T, E, K, d, vocab;
    double cf;
    int max_tokens;
} shape;

static const double cf_factors[] = {0.5, 1.0, 1.25, 2.0};

static shape make_shape(int T, int E, int K, int d, double cf) {
    shape s = {T, E, K, d, 97, cf, T > 0 ? T : 1};
    return s;
}

/* T in 0..Tmax, E in 1..Emax, K in 1..min(E, 8) (or K = E for small E). */
static shape random_shape(cf_rng *r, int Tmax, int Emax) {
    shape s;
    int u = cf_rng_int(r, 0, 99);
    s.T = u < 5 ? 0 : u < 55 ? cf_rng_int(r, 1, Tmax < 32 ? Tmax : 32) : cf_rng_int(r, 1, Tmax);
    s.E = cf_rng_int(r, 0, 1) ? cf_rng_int(r, 1, Emax < 16 ? Emax : 16) : cf_rng_int(r, 1, Emax);
    int kmax = s.E < 8 ? s.E : 8;
    s.K = (s.E <= 8 && cf_rng_int(r, 0, 3) == 0) ? s.E : cf_rng_int(r, 1, kmax);
    s.d = cf_rng_int(r, 1, 16);
    s.vocab = cf_rng_int(r, 1, 1000);
    s.cf = cf_factors[cf_rng_int(r, 0, 3)];
    /* The host creates instances for its largest batch and calls with less. */
    s.max_tokens = (s.T > 0 ? s.T : 1) + (cf_rng_int(r, 0, 2) == 0 ? cf_rng_int(r, 1, 16) : 0);
    return s;
}

/* The fixed shapes, then n random ones (up to 256 tokens and 64 experts) in
 * which an empty call (T = 0) becomes T = t_empty: the shape list of the
 * groups that need tokens in every call. Returns the count. */
static int fixed_then_random(shape *out, const shape *fixed, int n_fixed, cf_rng *r, int n, int t_empty) {
    int ns = 0;
    for (int i = 0; i < n_fixed; ++i) out[ns++] = fixed[i];
    for (int i = 0; i < n; ++i) {
        shape s = random_shape(r, 256, 64);
        if (s.T == 0) s.T = t_empty;
        out[ns++] = s;
    }
    return ns;
}

/* An instance with the user's options. A shape those options refuse with
 * MOE_ERR_OPTION while the router takes it with its defaults (say
 * expert_choice max_per_token = 2 with E = 1) is not applicable: the caller
 * leaves it out instead of failing. */
static int instance_dims(cf_instance *in, const cf_config *cfg, const cf_device *dev, moe_router_dims dims,
                         uint64_t seed) {
    int rc = cf_instance_create(in, cfg, dev, dims, cfg->opts, cfg->n_opts, seed);
    if (rc == CF_INST_REFUSED && cfg->n_opts > 0 && in->create_status == MOE_ERR_OPTION) {
        cf_instance plain;
        int rp = cf_instance_create(&plain, cfg, dev, dims, NULL, 0, seed);
        cf_instance_destroy(&plain);
        if (rp == CF_INST_OK) return CF_INST_NOT_APPLICABLE;
    }
    return rc;
}

static int instance_for(cf_instance *in, const cf_config *cfg, const cf_device *dev, const shape *s, int layer,
                        uint64_t seed) {
    return instance_dims(in, cfg, dev, cf_dims(s->E, s->K, s->d, s->vocab, s->max_tokens, s->cf, layer), seed);
}

static void where_of(char *buf, size_t cap, const shape *s, int training) {
    snprintf(buf, cap, "T=%d E=%d K=%d CF=%g%s", s->T, s->E, s->K, s->cf, training ? " training" : "");
}

/* Logits with ties, flat rows, large and tiny spreads mixed in. */
static void gen_logits(cf_rng *r, float *l, int T, int E, int smooth) {
    for (int t = 0; t < T; ++t) {
        float *row = l + (size_t)t * E;
        int style = smooth ? 0 : cf_rng_int(r, 0, 9);
        float base = cf_rng_uniform(r, -2.0f, 2.0f);
        for (int e = 0; e < E; ++e) {
            switch (style) {
            case 5: row[e] = (float)cf_rng_int(r, -1, 1); break;          /* many ties */
            case 6: row[e] = base; break;                                  /* a flat row */
            case 7: row[e] = cf_rng_uniform(r, -30.0f, 30.0f); break;      /* sharp */
            case 8: row[e] = 1.0f + 1e-6f * (float)cf_rng_int(r, 0, 3); break; /* nearly flat */
            default: row[e] = smooth ? cf_rng_uniform(r, -2.0f, 2.0f) : cf_rng_uniform(r, -4.0f, 4.0f); break;
            }
        }
    }
}

typedef struct inputs {
    float *logits;
    float *x;
    int32_t *ids;
} inputs;

static int gen_inputs(inputs *in, cf_rng *r, const shape *s, int smooth) {
    size_t T = (size_t)s->T;
    in->logits = malloc((T * s->E + 1) * sizeof(float));
    in->x = malloc((T * s->d + 1) * sizeof(float));
    in->ids = malloc((T + 1) * sizeof(int32_t));
    if (!in->logits || !in->x || !in->ids) return -1;
    gen_logits(r, in->logits, s->T, s->E, smooth);
    for (size_t i = 0; i < T * s->d; ++i) in->x[i] = cf_rng_uniform(r, -1.0f, 1.0f);
    for (size_t i = 0; i < T; ++i) in->ids[i] = cf_rng_int(r, 0, s->vocab - 1);
    return 0;
}

static void free_inputs(inputs *in) {
    free(in->logits);
    free(in->x);
    free(in->ids);
    memset(in, 0, sizeof *in);
}

static void bind_inputs(cf_call *c, const inputs *in, int capacity, int training, moe_rng_key key) {
    c->logits = in->logits;
    c->x = in->x;
    c->ids = in->ids;
    c->capacity = capacity;
    c->training = training;
    c->key = key;
}

static moe_rng_key key_for(const cf_config *cfg, uint64_t step, uint32_t layer) {
    moe_rng_key k = {cfg->seed * 1000003ull + 17ull, step, layer, MOE_RNG_STREAM_ROUTER};
    return k;
}

/* dweight for backward: random where the forward assigned, 0 where empty
 * (as the host does); d_route_logits random. */
static void gen_upstream(cf_rng *r, const cf_instance *in, cf_call *c) {
    size_t nA = (size_t)c->T * in->info.k_out, nL = (size_t)c->T * in->dims.num_experts;
    for (size_t i = 0; i < nA; ++i) c->dweight[i] = c->expert[i] >= 0 ? cf_rng_uniform(r, -1.0f, 1.0f) : 0.0f;
    for (size_t i = 0; i < nL; ++i) c->d_route_logits[i] = cf_rng_uniform(r, -1.0f, 1.0f);
}

static int is_poison_f(float v) {
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    return b == CF_POISON_BITS;
}

/* ------------------------------------------------------------------ */
/* Output invariants                                                   */
/* ------------------------------------------------------------------ */

typedef struct inv {
    tally idx, wts, uniq, wsum, cap, rl;
} inv;

/* Check one forward's outputs. with_sum: also the declared weight sums. */
static void validate_forward(const cf_instance *in, const cf_call *c, const char *where, inv *v, int with_sum) {
    const int T = c->T, E = in->dims.num_experts, Ko = in->info.k_out, C = c->capacity;
    const uint32_t flags = in->info.flags;
    const int owns = (flags & MOE_ROUTER_OWNS_CAPACITY) != 0;
    int *stamp = calloc((size_t)E, sizeof(int));
    int *count = calloc((size_t)E, sizeof(int));
    unsigned char *used = owns ? calloc((size_t)E * (size_t)C, 1) : NULL;
    if (!stamp || !count || (owns && !used)) {
        tfail(&v->idx, "%s: out of memory in the checker", where);
        free(stamp);
        free(count);
        free(used);
        return;
    }
    for (int t = 0; t < T; ++t) {
        double sum = 0.0;
        int bad_row = 0;
        for (int k = 0; k < Ko; ++k) {
            size_t a = (size_t)t * Ko + k;
            int e = c->expert[a];
            float w = c->weight[a];
            v->idx.checked++;
            if (e < -1 || e >= E) {
                tfail(&v->idx, "%s: token %d entry %d: expert = %d, outside [-1, %d)%s", where, t, k, e, E,
                      e == CF_POISON_INDEX ? " (never written)" : "");
                bad_row = 1;
                continue;
            }
            if (e == -1) {
                if (w != 0.0f)
                    tfail(&v->wts, "%s: token %d entry %d is empty (expert -1) but its weight is %g; must be 0%s", where,
                          t, k, (double)w, is_poison_f(w) ? " (never written)" : "");
                continue;
            }
            if (!isfinite(w) || w < 0.0f) {
                tfail(&v->wts, "%s: token %d entry %d (expert %d): weight = %g; weights must be finite and >= 0%s",
                      where, t, k, e, (double)w, is_poison_f(w) ? " (never written)" : "");
                bad_row = 1;
            }
            sum += (double)w;
            if (stamp[e] == t + 1)
                tfail(&v->uniq, "%s: token %d has expert %d twice (entries up to %d)", where, t, e, k);
            stamp[e] = t + 1;
            if (owns) {
                int s = c->slot[a];
                if (s < 0 || s >= C) {
                    tfail(&v->cap, "%s: token %d entry %d: slot = %d of expert %d, outside [0, C = %d)", where, t, k, s,
                          e, C);
                } else {
                    if (used[(size_t)e * C + s])
                        tfail(&v->cap, "%s: slot %d of expert %d is given to two tokens (the second is token %d)",
                              where, s, e, t);
                    used[(size_t)e * C + s] = 1;
                }
                if (++count[e] == C + 1)
                    tfail(&v->cap, "%s: expert %d takes more than C = %d tokens", where, e, C);
            }
        }
        if (with_sum && (flags & MOE_ROUTER_WEIGHT_SUM_EXACT) && !bad_row) {
            double ws = in->info.weight_sum;
            v->wsum.checked++;
            if (!(fabs(sum - ws) <= 1e-5 * fmax(1.0, fabs(ws))))
                tfail(&v->wsum,
                      "%s: token %d: weights sum to %.9g, but the router declares MOE_ROUTER_WEIGHT_SUM_EXACT with "
                      "weight_sum = %g (tolerance 1e-5)",
                      where, t, sum, ws);
        }
    }
    if (owns && (flags & MOE_ROUTER_DENSE_SLOTS))
        for (int e = 0; e < E; ++e)
            for (int s = 0; s < count[e] && s < C; ++s)
                if (!used[(size_t)e * C + s]) {
                    tfail(&v->cap,
                          "%s: expert %d has %d tokens but its slot %d is empty; the router declares "
                          "MOE_ROUTER_DENSE_SLOTS (slots exactly 0 .. n-1): it must not set the flag",
                          where, e, count[e], s);
                    break;
                }
    if (c->route_logits)
        for (size_t i = 0; i < (size_t)T * E; ++i)
            if (!isfinite(c->route_logits[i])) {
                tfail(&v->rl, "%s: route_logits[%zu, %zu] = %g%s", where, i / (size_t)E, i % (size_t)E,
                      (double)c->route_logits[i], is_poison_f(c->route_logits[i]) ? " (never written)" : "");
                break;
            }
    free(stamp);
    free(count);
    free(used);
}

/* Memory violations of a call, sorted into the three memory rows. */
typedef struct mem {
    tally ws, out, in;
} mem;

static void record_violation(mem *m, const cf_call *c, const char *where) {
    if (!c->viol) return;
    tally *t = c->viol == CF_VIOL_WORKSPACE ? &m->ws : c->viol == CF_VIOL_INPUT ? &m->in : &m->out;
    tfail(t, "%s (%s)", c->violation, where);
}

static const char *status_name(moe_status st) {
    switch (st) {
    case MOE_OK: return "MOE_OK";
    case MOE_ERR_INVALID_ARG: return "MOE_ERR_INVALID_ARG";
    case MOE_ERR_OPTION: return "MOE_ERR_OPTION";
    case MOE_ERR_UNSUPPORTED: return "MOE_ERR_UNSUPPORTED";
    case MOE_ERR_NO_MEMORY: return "MOE_ERR_NO_MEMORY";
    case MOE_ERR_DEVICE: return "MOE_ERR_DEVICE";
    case MOE_ERR_INTERNAL: return "MOE_ERR_INTERNAL";
    }
    return "an unknown status";
}

/* ------------------------------------------------------------------ */
/* device                                                              */
/* ------------------------------------------------------------------ */

static void group_device_select(const cf_config *cfg) {
    cf_device dev;
    char why[CF_WHY_CAP];
    if (pick_device(cfg, &dev, why, sizeof why) != 0) {
        cf_row("device", CF_FAIL, "%s", why);
        return;
    }
    if (cfg->device == MOE_DEVICE_CUDA && dev.kind != MOE_DEVICE_CUDA)
        cf_row("device", CF_PASS, "checks run on the cpu table; CUDA not used: %s", why);
    else
        cf_row("device", CF_PASS, "checks run on the %s table (%s)", dev.kind == MOE_DEVICE_CUDA ? "cuda" : "cpu",
               dev.name);
    cf_device_close(&dev);
}

/* ------------------------------------------------------------------ */
/* create                                                              */
/* ------------------------------------------------------------------ */

static int name_ok(const char *name, size_t cap) {
    size_t n = 0;
    while (n < cap && name[n]) ++n;
    return n > 0 && n < cap;
}

static void check_specs(const moe_tensor_spec *specs, int n, int params, tally *t, char *list, size_t cap,
                        const moe_router_info *info) {
    for (int i = 0; i < n; ++i) {
        const moe_tensor_spec *s = &specs[i];
        const char *kind = params ? "param" : "buffer";
        const int self = params ? i : info->n_params + i; /* index over params, then buffers */
        if (!name_ok(s->name, MOE_TENSOR_NAME_MAX)) {
            tfail(t, "%s %d: the name is empty or not NUL-terminated within %d bytes", kind, i, MOE_TENSOR_NAME_MAX);
            continue;
        }
        /* Names are unique across params and buffers (the host prefixes both alike). */
        for (int j = 0; j < self; ++j) {
            const moe_tensor_spec *o = j < info->n_params ? &info->params[j] : &info->buffers[j - info->n_params];
            if (name_ok(o->name, MOE_TENSOR_NAME_MAX) && strcmp(o->name, s->name) == 0)
                tfail(t, "%s '%s' is declared twice", kind, s->name);
        }
        if (s->ndim < 1 || s->ndim > MOE_MAX_TENSOR_DIMS) {
            tfail(t, "%s '%s': ndim = %d, outside 1..%d", kind, s->name, s->ndim, MOE_MAX_TENSOR_DIMS);
            continue;
        }
        int shape_ok = 1;
        for (int k = 0; k < s->ndim; ++k)
            if (s->shape[k] < 1) shape_ok = 0;
        if (!shape_ok) tfail(t, "%s '%s': a dimension is < 1", kind, s->name);
        if ((int)s->init < MOE_INIT_ZEROS || (int)s->init > MOE_INIT_UNIFORM)
            tfail(t, "%s '%s': init = %d is not a moe_init_kind", kind, s->name, (int)s->init);
        if (!isfinite(s->init_value) ||
            ((s->init == MOE_INIT_NORMAL || s->init == MOE_INIT_UNIFORM) && s->init_value < 0.0f))
            tfail(t, "%s '%s': init_value = %g is not a valid scale", kind, s->name, (double)s->init_value);
        if (params && s->weight_decay != 0 && s->weight_decay != 1)
            tfail(t, "%s '%s': weight_decay = %d, must be 0 or 1", kind, s->name, s->weight_decay);
        size_t used = strlen(list);
        if (used + 64 < cap) {
            char dims[64] = "";
            for (int k = 0; k < s->ndim && k < MOE_MAX_TENSOR_DIMS; ++k)
                snprintf(dims + strlen(dims), sizeof dims - strlen(dims), "%s%lld", k ? "," : "", (long long)s->shape[k]);
            snprintf(list + used, cap - used, "%s%s %s [%s]", used ? ", " : "", kind, s->name, dims);
        }
    }
}

static void flags_text(uint32_t f, float ws, char *buf, size_t cap) {
    buf[0] = '\0';
    static const struct {
        uint32_t bit;
        const char *name;
    } names[] = {{MOE_ROUTER_OWNS_CAPACITY, "OWNS_CAPACITY"},
                 {MOE_ROUTER_PERTURBS_LOGITS, "PERTURBS_LOGITS"},
                 {MOE_ROUTER_NO_GRAD, "NO_GRAD"},
                 {MOE_ROUTER_WEIGHT_SUM_EXACT, "WEIGHT_SUM_EXACT"},
                 {MOE_ROUTER_IGNORES_LOGITS, "IGNORES_LOGITS"},
                 {MOE_ROUTER_DENSE_SLOTS, "DENSE_SLOTS"}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; ++i)
        if (f & names[i].bit) {
            size_t u = strlen(buf);
            snprintf(buf + u, cap - u, "%s%s", u ? "|" : "", names[i].name);
            if (names[i].bit == MOE_ROUTER_WEIGHT_SUM_EXACT) {
                u = strlen(buf);
                snprintf(buf + u, cap - u, "(%g)", (double)ws);
            }
        }
    if (!buf[0]) snprintf(buf, cap, "none");
}

static void group_create(const cf_config *cfg) {
    static const char *const rows[] = {"create.defaults", "create.info", "create.tensors", "create.k_gt_e"};
    cf_device dev;
    if (group_device(cfg, &dev, rows, 4) != 0) return;

    /* Shapes every router must accept, the options as given. */
    static const int dims[][4] = {{8, 2, 8, 64}, {1, 1, 4, 16}, {4, 4, 3, 1}, {256, 8, 16, 512}};
    tally t_def = {0};
    int n_na = 0;
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; ++i) {
        cf_instance in;
        cf_note("create E=%d K=%d", dims[i][0], dims[i][1]);
        int rc = instance_dims(&in, cfg, &dev, cf_dims(dims[i][0], dims[i][1], dims[i][2], 97, dims[i][3], 1.25, 0), 1);
        if (rc == CF_INST_NOT_APPLICABLE) n_na++;
        else if (rc != CF_INST_OK)
            tfail(&t_def, "E=%d K=%d d_model=%d max_tokens=%d: %s", dims[i][0], dims[i][1], dims[i][2], dims[i][3],
                  in.why);
        cf_instance_destroy(&in);
    }
    trow("create.defaults", &t_def, "create and query succeed for %zu shapes (E=1..256, K=1..8)%s",
         sizeof dims / sizeof dims[0] - (size_t)n_na, n_na ? "; the others are refused by the given options" : "");

    cf_instance in;
    int rc = cf_instance_create(&in, cfg, &dev, cf_dims(8, 2, 8, 97, 64, 1.25, 0), cfg->opts, cfg->n_opts, 1);
    if (rc != CF_INST_OK && rc != CF_INST_INFO) {
        cf_row("create.info", CF_SKIP, "not run: no instance (%s)", in.why);
        cf_row("create.tensors", CF_SKIP, "not run: no instance (%s)", in.why);
    } else {
        tally t_info = {0};
        const moe_router_info *I = &in.info;
        if (rc == CF_INST_INFO) tfail(&t_info, "%s", in.why);
        const uint32_t known = MOE_ROUTER_OWNS_CAPACITY | MOE_ROUTER_PERTURBS_LOGITS | MOE_ROUTER_NO_GRAD |
                               MOE_ROUTER_WEIGHT_SUM_EXACT | MOE_ROUTER_IGNORES_LOGITS | MOE_ROUTER_DENSE_SLOTS;
        if (I->flags & ~known) tfail(&t_info, "flags 0x%x has bits this ABI does not define", (unsigned)(I->flags & ~known));
        if ((I->flags & MOE_ROUTER_DENSE_SLOTS) && !(I->flags & MOE_ROUTER_OWNS_CAPACITY))
            tfail(&t_info, "MOE_ROUTER_DENSE_SLOTS without MOE_ROUTER_OWNS_CAPACITY: the host assigns the slots of a "
                           "router that does not own capacity, so the flag promises nothing");
        if ((I->flags & MOE_ROUTER_WEIGHT_SUM_EXACT) && !(isfinite(I->weight_sum) && I->weight_sum > 0.0f))
            tfail(&t_info, "MOE_ROUTER_WEIGHT_SUM_EXACT with weight_sum = %g; must be finite and > 0",
                  (double)I->weight_sum);
        if (!(I->flags & MOE_ROUTER_NO_GRAD)) {
            if (cfg->api->cpu && !cfg->api->cpu->backward)
                tfail(&t_info, "the cpu table has no backward, but the router does not declare MOE_ROUTER_NO_GRAD");
            if (cfg->api->cuda && !cfg->api->cuda->backward)
                tfail(&t_info, "the cuda table has no backward, but the router does not declare MOE_ROUTER_NO_GRAD");
        }
        if (rc == CF_INST_OK) {
            /* query is a pure function of the instance */
            moe_router_info again;
            memset(&again, 0, sizeof again);
            again.struct_size = sizeof again;
            if (cfg->api->query(in.state, &again) != MOE_OK || again.k_out != I->k_out || again.flags != I->flags ||
                again.workspace_bytes != I->workspace_bytes || again.n_params != I->n_params ||
                again.n_buffers != I->n_buffers)
                tfail(&t_info, "a second query() of the same instance gave a different info");
        }
        char fl[160];
        flags_text(I->flags, I->weight_sum, fl, sizeof fl);
        trow("create.info", &t_info, "k_out %d, flags %s, workspace %zu bytes (E=8, K=2, max_tokens=64)", I->k_out, fl,
             I->workspace_bytes);

        tally t_ten = {0};
        char list[400] = "";
        if (rc == CF_INST_OK || (I->n_params >= 0 && I->n_params <= MOE_MAX_PLUGIN_TENSORS && I->n_buffers >= 0 &&
                                 I->n_buffers <= MOE_MAX_PLUGIN_TENSORS)) {
            check_specs(I->params, I->n_params, 1, &t_ten, list, sizeof list, I);
            check_specs(I->buffers, I->n_buffers, 0, &t_ten, list, sizeof list, I);
        } else {
            tfail(&t_ten, "n_params = %d, n_buffers = %d: each must be in 0..%d", I->n_params, I->n_buffers,
                  MOE_MAX_PLUGIN_TENSORS);
        }
        trow("create.tensors", &t_ten, "%s; allocated exactly per spec, with guards", list[0] ? list : "no params or buffers");
    }
    cf_instance_destroy(&in);

    /* K > E must be refused at create. */
    static const int bad[][2] = {{4, 5}, {1, 2}, {8, 9}};
    tally t_k = {0};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; ++i) {
        moe_router_dims d = cf_dims(bad[i][0], bad[i][1], 8, 97, 64, 1.25, 0);
        void *state = NULL;
        char msg[CF_MSG_CAP] = "";
        cf_note("create with top_k %d > num_experts %d", bad[i][1], bad[i][0]);
        moe_status st = cfg->api->create(&d, cfg->opts, cfg->n_opts, &state, msg, sizeof msg);
        if (st == MOE_OK) {
            tfail(&t_k, "create accepted top_k = %d > num_experts = %d; it must refuse with a message", bad[i][1],
                  bad[i][0]);
            if (state) cfg->api->destroy(state);
        } else if (!msg[0]) {
            tfail(&t_k, "create refused top_k = %d > num_experts = %d with %s but an empty message", bad[i][1],
                  bad[i][0], status_name(st));
        }
    }
    trow("create.k_gt_e", &t_k, "top_k > num_experts refused with a message (3 cases)");
    cf_device_close(&dev);
}

/* ------------------------------------------------------------------ */
/* options                                                             */
/* ------------------------------------------------------------------ */

static int parse_full_int(const char *s, long long *out) {
    char *end = NULL;
    if (!s || !*s) return 0;
    *out = strtoll(s, &end, 10);
    return *end == '\0';
}

static int parse_full_double(const char *s, double *out) {
    char *end = NULL;
    if (!s || !*s) return 0;
    *out = strtod(s, &end);
    return *end == '\0' && isfinite(*out);
}

static int choice_in(const char *choices, const char *s) {
    size_t n = strlen(s);
    const char *p = choices;
    while (p && *p) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, s, n) == 0) return 1;
        p = bar ? bar + 1 : NULL;
    }
    return 0;
}

/* The user's options without `key`, plus `extra`. */
static int opts_with(const cf_config *cfg, const char *key, const moe_option *extra, moe_option *out) {
    int n = 0;
    for (int i = 0; i < cfg->n_opts; ++i)
        if (!key || strcmp(cfg->opts[i].key, key) != 0) out[n++] = cfg->opts[i];
    if (extra) out[n++] = *extra;
    return n;
}

/* Create with `opts`; expect MOE_ERR_OPTION and a message naming `key`. */
static void expect_refusal(const cf_config *cfg, const moe_option *opts, int n, const char *key, const char *what,
                           tally *t) {
    moe_router_dims d = cf_dims(8, 2, 8, 97, 64, 1.25, 0);
    void *state = NULL;
    char msg[CF_MSG_CAP] = "";
    cf_note("create with %s", what);
    moe_status st = cfg->api->create(&d, opts, n, &state, msg, sizeof msg);
    t->checked++;
    if (st == MOE_OK) {
        tfail(t, "accepted %s; it must refuse it with MOE_ERR_OPTION and a message", what);
        if (state) cfg->api->destroy(state);
    } else if (st != MOE_ERR_OPTION) {
        tfail(t, "refused %s with %s; options are refused with MOE_ERR_OPTION (message: %s)", what, status_name(st),
              msg[0] ? msg : "none");
    } else if (!msg[0]) {
        tfail(t, "refused %s with MOE_ERR_OPTION but an empty message", what);
    } else if (!strstr(msg, key)) {
        tfail(t, "refused %s, but the message does not name '%s': \"%s\"", what, key, msg);
    }
}

static moe_option opt_of_type(const char *key, moe_opt_type type) {
    moe_option o;
    memset(&o, 0, sizeof o);
    o.key = key;
    o.type = type;
    switch (type) {
    case MOE_OPT_BOOL: o.i = 1; break;
    case MOE_OPT_INT: o.i = 7; o.f = 7.0; break;
    case MOE_OPT_FLOAT: o.f = 0.5; break;
    case MOE_OPT_STRING: o.s = "moe-conform-wrong-type"; break;
    }
    return o;
}

static const char *type_word(moe_opt_type t) {
    switch (t) {
    case MOE_OPT_BOOL: return "bool";
    case MOE_OPT_INT: return "int";
    case MOE_OPT_FLOAT: return "float";
    case MOE_OPT_STRING: return "string";
    }
    return "?";
}

static void group_options(const cf_config *cfg) {
    const moe_router_plugin_v1_t *api = cfg->api;
    const int n = api->n_options;
    moe_option opts[CF_MAX_OPTS + 2];

    /* options.spec: the table the host prints and the plugin parses against. */
    tally t_spec = {0};
    for (int j = 0; j < n; ++j) {
        const moe_option_spec *sp = &api->options[j];
        if (!sp->key || !sp->key[0]) {
            tfail(&t_spec, "option %d has no key", j);
            continue;
        }
        for (int k = 0; k < j; ++k)
            if (api->options[k].key && strcmp(api->options[k].key, sp->key) == 0)
                tfail(&t_spec, "option '%s' is declared twice", sp->key);
        const char *dv = sp->default_value;
        long long iv;
        double fv;
        switch (sp->type) {
        case MOE_OPT_BOOL:
            if (!dv || (strcmp(dv, "true") != 0 && strcmp(dv, "false") != 0))
                tfail(&t_spec, "option '%s' (bool): default \"%s\" is not true or false", sp->key, dv ? dv : "(null)");
            break;
        case MOE_OPT_INT:
            if (!parse_full_int(dv, &iv)) tfail(&t_spec, "option '%s' (int): default \"%s\" is not an integer", sp->key, dv ? dv : "(null)");
            else if (sp->min < sp->max && !((double)iv >= sp->min && (double)iv <= sp->max))
                tfail(&t_spec, "option '%s': default %lld is outside its range [%g, %g]", sp->key, iv, sp->min, sp->max);
            break;
        case MOE_OPT_FLOAT:
            if (!parse_full_double(dv, &fv)) tfail(&t_spec, "option '%s' (float): default \"%s\" is not a number", sp->key, dv ? dv : "(null)");
            else if (sp->min < sp->max && !(fv >= sp->min && fv <= sp->max))
                tfail(&t_spec, "option '%s': default %g is outside its range [%g, %g]", sp->key, fv, sp->min, sp->max);
            break;
        case MOE_OPT_STRING:
            if (!dv) tfail(&t_spec, "option '%s' (string) has no default", sp->key);
            else if (sp->choices && !choice_in(sp->choices, dv))
                tfail(&t_spec, "option '%s': default \"%s\" is not one of %s", sp->key, dv, sp->choices);
            break;
        default: tfail(&t_spec, "option '%s' has type %d, not a moe_opt_type", sp->key, (int)sp->type); break;
        }
    }
    trow("options.spec", &t_spec, "%d option%s declared, defaults parse and lie in their ranges", n, n == 1 ? "" : "s");
    if (t_spec.fails) {
        static const char *const rows[] = {"options.defaults", "options.unknown_key", "options.bad_type",
                                           "options.bad_value"};
        skip_rows(rows, 4, "not run: the option table is malformed (see options.spec)");
        return;
    }

    /* options.defaults: every default given explicitly is accepted. */
    tally t_def = {0};
    int m = 0;
    for (int j = 0; j < n && m < CF_MAX_OPTS; ++j) {
        const moe_option_spec *sp = &api->options[j];
        int given = 0;
        for (int i = 0; i < cfg->n_opts; ++i) given |= strcmp(cfg->opts[i].key, sp->key) == 0;
        if (given) continue;
        moe_option o;
        memset(&o, 0, sizeof o);
        o.key = sp->key;
        o.type = sp->type;
        switch (sp->type) {
        case MOE_OPT_BOOL: o.i = strcmp(sp->default_value, "true") == 0; break;
        case MOE_OPT_INT: o.i = strtoll(sp->default_value, NULL, 10); o.f = (double)o.i; break;
        case MOE_OPT_FLOAT: o.f = strtod(sp->default_value, NULL); break;
        case MOE_OPT_STRING: o.s = sp->default_value; break;
        }
        opts[m++] = o;
    }
    for (int i = 0; i < cfg->n_opts && m < CF_MAX_OPTS; ++i) opts[m++] = cfg->opts[i];
    {
        moe_router_dims d = cf_dims(8, 2, 8, 97, 64, 1.25, 0);
        void *state = NULL;
        char msg[CF_MSG_CAP] = "";
        cf_note("create with every option at its default");
        moe_status st = api->create(&d, opts, m, &state, msg, sizeof msg);
        if (st != MOE_OK)
            tfail(&t_def, "create refused the options' own defaults given explicitly: %s: %s", status_name(st),
                  msg[0] ? msg : "(no message)");
        else if (state)
            api->destroy(state);
    }
    trow("options.defaults", &t_def, "every declared default, given explicitly, is accepted");

    /* options.unknown_key */
    tally t_unk = {0};
    moe_option unk = opt_of_type("moe_conform_unknown_option", MOE_OPT_INT);
    int nu = opts_with(cfg, NULL, &unk, opts);
    expect_refusal(cfg, opts, nu, unk.key, "an unknown option 'moe_conform_unknown_option'", &t_unk);
    trow("options.unknown_key", &t_unk, "unknown key refused with MOE_ERR_OPTION and a message naming it");

    if (n == 0) {
        cf_row("options.bad_type", CF_SKIP, "the router declares no options");
        cf_row("options.bad_value", CF_SKIP, "the router declares no options");
        return;
    }

    /* options.bad_type: each option with each type it does not take (an
     * integer where a number is expected is valid). */
    tally t_type = {0};
    for (int j = 0; j < n; ++j) {
        const moe_option_spec *sp = &api->options[j];
        for (int ty = MOE_OPT_BOOL; ty <= MOE_OPT_STRING; ++ty) {
            if (ty == (int)sp->type || (sp->type == MOE_OPT_FLOAT && ty == MOE_OPT_INT)) continue;
            moe_option bad = opt_of_type(sp->key, (moe_opt_type)ty);
            int nb = opts_with(cfg, sp->key, &bad, opts);
            char what[160];
            snprintf(what, sizeof what, "option '%s' (%s) given a %s", sp->key, type_word(sp->type),
                     type_word((moe_opt_type)ty));
            expect_refusal(cfg, opts, nb, sp->key, what, &t_type);
        }
    }
    trow("options.bad_type", &t_type, "%ld wrong-type values refused with MOE_ERR_OPTION naming the key",
         t_type.checked);

    /* options.bad_value: outside the choices or the range. */
    tally t_val = {0};
    for (int j = 0; j < n; ++j) {
        const moe_option_spec *sp = &api->options[j];
        char what[200];
        if (sp->type == MOE_OPT_STRING && sp->choices) {
            moe_option bad = opt_of_type(sp->key, MOE_OPT_STRING);
            bad.s = "moe-conform-not-a-choice";
            int nb = opts_with(cfg, sp->key, &bad, opts);
            snprintf(what, sizeof what, "option '%s' = \"%s\" (not one of %s)", sp->key, bad.s, sp->choices);
            expect_refusal(cfg, opts, nb, sp->key, what, &t_val);
        }
        if ((sp->type == MOE_OPT_INT || sp->type == MOE_OPT_FLOAT) && sp->min < sp->max) {
            double span = fmax(1.0, sp->max - sp->min);
            double vals[2] = {sp->min - span, sp->max + span};
            for (int v = 0; v < 2; ++v) {
                if (!isfinite(vals[v]) || fabs(vals[v]) > 9e15) continue;
                moe_option bad = opt_of_type(sp->key, sp->type);
                if (sp->type == MOE_OPT_INT) {
                    bad.i = (int64_t)floor(vals[v]);
                    bad.f = (double)bad.i;
                } else {
                    bad.f = vals[v];
                }
                int nb = opts_with(cfg, sp->key, &bad, opts);
                snprintf(what, sizeof what, "option '%s' = %g (outside [%g, %g])", sp->key,
                         sp->type == MOE_OPT_INT ? (double)bad.i : bad.f, sp->min, sp->max);
                expect_refusal(cfg, opts, nb, sp->key, what, &t_val);
            }
        }
    }
    if (t_val.checked == 0)
        cf_row("options.bad_value", CF_SKIP, "no option declares choices or a range");
    else
        trow("options.bad_value", &t_val, "%ld out-of-choice or out-of-range values refused with MOE_ERR_OPTION",
             t_val.checked);
}

/* ------------------------------------------------------------------ */
/* forward invariants, memory                                          */
/* ------------------------------------------------------------------ */

static int make_shapes(const cf_config *cfg, shape *out, int cap, int n_random, cf_rng *r) {
    const shape fixed[] = {
        make_shape(0, 1, 1, 4, 1.0),    make_shape(1, 1, 1, 4, 1.0),   make_shape(1, 2, 2, 3, 1.25),
        make_shape(3, 3, 3, 2, 0.5),    make_shape(8, 8, 8, 5, 2.0),   make_shape(17, 5, 5, 8, 1.25),
        make_shape(64, 16, 4, 16, 1.25), make_shape(2, 256, 1, 4, 1.0), make_shape(512, 1, 1, 3, 0.5),
        make_shape(512, 256, 8, 16, 2.0), make_shape(100, 7, 2, 6, 0.5), make_shape(33, 64, 8, 8, 1.0),
    };
    int n = 0;
    int n_fixed = (int)(sizeof fixed / sizeof fixed[0]);
    for (int i = 0; i < n_fixed && n < cap; ++i) {
        if (cfg->quick && (i == 9 || i == 11)) continue; /* the largest ones */
        out[n++] = fixed[i];
    }
    for (int i = 0; i < n_random && n < cap; ++i) out[n++] = random_shape(r, 512, 256);
    return n;
}

static void group_forward(const cf_config *cfg) {
    static const char *const rows[] = {"forward.status",     "forward.indices",      "forward.weights",
                                       "forward.unique",     "forward.weight_sum",   "forward.capacity",
                                       "forward.route_logits", "backward.outputs",   "memory.workspace",
                                       "memory.outputs",     "memory.inputs"};
    cf_device dev;
    if (group_device(cfg, &dev, rows, 11) != 0) return;
    cf_rng r = cf_rng_make(cfg->seed * 31 + 1);
    shape shapes[96];
    int ns = make_shapes(cfg, shapes, 96, cfg->quick ? 14 : 60, &r);

    tally t_status = {0}, t_bwd = {0};
    inv v;
    mem m;
    memset(&v, 0, sizeof v);
    memset(&m, 0, sizeof m);
    uint32_t flags_seen = 0;
    int calls = 0, bwd_calls = 0, instances = 0, n_na = 0;
    for (int i = 0; i < ns; ++i) {
        const shape *s = &shapes[i];
        char where[128];
        where_of(where, sizeof where, s, 0);
        cf_note("forward %s", where);
        cf_instance in;
        int rc = instance_for(&in, cfg, &dev, s, i % 4, cfg->seed + (uint64_t)i);
        if (rc == CF_INST_NOT_APPLICABLE) {
            n_na++;
            cf_instance_destroy(&in);
            continue;
        }
        if (rc != CF_INST_OK) {
            tfail(&t_status, "%s: no instance for a valid shape: %s", where, in.why);
            cf_instance_destroy(&in);
            continue;
        }
        instances++;
        flags_seen |= in.info.flags;
        const int no_grad = (in.info.flags & MOE_ROUTER_NO_GRAD) != 0;
        inputs x;
        if (gen_inputs(&x, &r, s, 0) != 0) {
            tfail(&t_status, "%s: out of memory in the checker", where);
            free_inputs(&x);
            cf_instance_destroy(&in);
            continue;
        }
        const int C = cf_capacity(&in, s->T);
        for (int training = 0; training <= 1; ++training) {
            where_of(where, sizeof where, s, training);
            cf_note("forward %s", where);
            cf_call c;
            if (cf_call_alloc(&c, &in, s->T) != 0) {
                tfail(&t_status, "%s: out of memory in the checker", where);
                cf_call_free(&c, &in);
                continue;
            }
            bind_inputs(&c, &x, C, training, key_for(cfg, (uint64_t)(2 * i + training + 1), (uint32_t)(i % 4)));
            c.ws_fill = (unsigned char)cf_rng_int(&r, 0, 255);
            moe_status st = cf_forward(&in, &c);
            calls++;
            record_violation(&m, &c, where);
            if (st != MOE_OK) {
                tfail(&t_status, "%s: forward returned %s on finite logits: %s", where, status_name(st),
                      c.msg[0] ? c.msg : "(no message)");
            } else {
                validate_forward(&in, &c, where, &v, 1);
                if (training && !no_grad && in.impl->backward) {
                    cf_note("backward %s", where);
                    gen_upstream(&r, &in, &c);
                    memset(c.dx, 0, (size_t)s->T * s->d * sizeof(float));
                    moe_status sb = cf_backward(&in, &c);
                    bwd_calls++;
                    record_violation(&m, &c, where);
                    if (sb != MOE_OK) {
                        tfail(&t_bwd, "%s: backward returned %s: %s", where, status_name(sb),
                              c.msg[0] ? c.msg : "(no message)");
                    } else {
                        size_t nL = (size_t)s->T * s->E, nX = (size_t)s->T * s->d;
                        for (size_t q = 0; q < nL; ++q)
                            if (!isfinite(c.dlogits[q])) {
                                tfail(&t_bwd, "%s: dlogits[%zu, %zu] = %g%s (dlogits is overwritten: write every entry)",
                                      where, q / (size_t)s->E, q % (size_t)s->E, (double)c.dlogits[q],
                                      is_poison_f(c.dlogits[q]) ? ", never written" : "");
                                break;
                            }
                        for (size_t q = 0; q < nX; ++q)
                            if (!isfinite(c.dx[q])) {
                                tfail(&t_bwd, "%s: dx[%zu] = %g", where, q, (double)c.dx[q]);
                                break;
                            }
                        for (int p = 0; p < in.info.n_params; ++p)
                            for (size_t q = 0; q < in.param_n[p]; ++q)
                                if (!isfinite(c.param_grads[p][q])) {
                                    tfail(&t_bwd, "%s: gradient of param '%.32s'[%zu] = %g", where,
                                          in.info.params[p].name, q, (double)c.param_grads[p][q]);
                                    break;
                                }
                    }
                } else if (training && !no_grad && !in.impl->backward) {
                    tfail(&t_bwd, "the %s table has no backward, but the router does not declare MOE_ROUTER_NO_GRAD",
                          dev.name);
                }
            }
            cf_call_free(&c, &in);
        }
        free_inputs(&x);
        cf_instance_destroy(&in);
    }

    char done[160];
    snprintf(done, sizeof done, "%d forward calls over %d shapes (T 0..512, E 1..256, K 1..8)%s", calls, ns - n_na,
             n_na ? "; shapes the given options refuse left out" : "");
    trow("forward.status", &t_status, "%s", done);
    trow("forward.indices", &v.idx, "%ld entries in [-1, E)", v.idx.checked);
    trow("forward.weights", &v.wts, "finite, >= 0, and 0 for empty entries");
    trow("forward.unique", &v.uniq, "no expert twice within a token");
    if (flags_seen & MOE_ROUTER_WEIGHT_SUM_EXACT)
        trow("forward.weight_sum", &v.wsum, "%ld token sums equal the declared weight_sum (1e-5)", v.wsum.checked);
    else
        cf_row("forward.weight_sum", CF_SKIP, "the router does not declare MOE_ROUTER_WEIGHT_SUM_EXACT");
    if (flags_seen & MOE_ROUTER_OWNS_CAPACITY)
        trow("forward.capacity", &v.cap, "<= C per expert, slots in [0, C) and unique per expert%s",
             (flags_seen & MOE_ROUTER_DENSE_SLOTS) ? ", dense (0 .. n-1)" : "");
    else
        cf_row("forward.capacity", CF_SKIP, "the router does not own capacity (the host applies it)");
    if (flags_seen & MOE_ROUTER_PERTURBS_LOGITS)
        trow("forward.route_logits", &v.rl, "route_logits written and finite");
    else
        cf_row("forward.route_logits", CF_SKIP, "the router does not declare MOE_ROUTER_PERTURBS_LOGITS");
    if (instances > 0 && (flags_seen & MOE_ROUTER_NO_GRAD) && !t_bwd.fails)
        cf_row("backward.outputs", CF_SKIP, "the router declares MOE_ROUTER_NO_GRAD (the host never calls backward)");
    else
        trow("backward.outputs", &t_bwd, "%d backward calls: every dlogits entry written, all gradients finite",
             bwd_calls);
    trow("memory.workspace", &m.ws, "the guard after the declared workspace intact after %d calls", calls + bwd_calls);
    trow("memory.outputs", &m.out, "nothing written past the outputs, params, buffers or gradients");
    trow("memory.inputs", &m.in, "logits, x, token ids, params (and buffers in evaluation) left unchanged");
    cf_device_close(&dev);
}

/* ------------------------------------------------------------------ */
/* determinism                                                         */
/* ------------------------------------------------------------------ */

/* First difference of two byte arrays as "name[i]", or 0. */
static int first_diff(const void *a, const void *b, size_t n, size_t elem, const char *name, char *out, size_t cap) {
    if (memcmp(a, b, n * elem) == 0) return 0;
    for (size_t i = 0; i < n; ++i)
        if (memcmp((const char *)a + i * elem, (const char *)b + i * elem, elem) != 0) {
            snprintf(out, cap, "%s[%zu]", name, i);
            return 1;
        }
    return 0;
}

static int compare_forward(const cf_instance *in, const cf_call *a, const cf_call *b, char *out, size_t cap) {
    size_t nA = (size_t)a->T * in->info.k_out, nL = (size_t)a->T * in->dims.num_experts;
    if (a->st != b->st) {
        snprintf(out, cap, "status %s vs %s", status_name(a->st), status_name(b->st));
        return 1;
    }
    if (a->st != MOE_OK) return 0;
    if (first_diff(a->expert, b->expert, nA, 4, "expert", out, cap)) return 1;
    if (first_diff(a->weight, b->weight, nA, 4, "weight", out, cap)) return 1;
    if (a->slot && first_diff(a->slot, b->slot, nA, 4, "slot", out, cap)) return 1;
    if (a->route_logits && first_diff(a->route_logits, b->route_logits, nL, 4, "route_logits", out, cap)) return 1;
    for (int i = 0; i < in->info.n_buffers; ++i)
        if (first_diff(a->buffers[i], b->buffers[i], in->buffer_n[i], 4, in->info.buffers[i].name, out, cap)) return 1;
    return 0;
}

static int compare_backward(const cf_instance *in, const cf_call *a, const cf_call *b, char *out, size_t cap) {
    if (a->st != b->st) {
        snprintf(out, cap, "status %s vs %s", status_name(a->st), status_name(b->st));
        return 1;
    }
    if (a->st != MOE_OK) return 0;
    if (first_diff(a->dlogits, b->dlogits, (size_t)a->T * in->dims.num_experts, 4, "dlogits", out, cap)) return 1;
    if (first_diff(a->dx, b->dx, (size_t)a->T * in->dims.d_model, 4, "dx", out, cap)) return 1;
    for (int i = 0; i < in->info.n_params; ++i)
        if (first_diff(a->param_grads[i], b->param_grads[i], in->param_n[i], 4, in->info.params[i].name, out, cap))
            return 1;
    return 0;
}

/* Copy a's upstream gradients and accumulators into b. */
static void copy_upstream(const cf_instance *in, const cf_call *a, cf_call *b) {
    size_t nA = (size_t)a->T * in->info.k_out, nL = (size_t)a->T * in->dims.num_experts;
    memcpy(b->expert, a->expert, nA * 4);
    memcpy(b->weight, a->weight, nA * 4);
    if (a->slot) memcpy(b->slot, a->slot, nA * 4);
    if (a->route_logits) memcpy(b->route_logits, a->route_logits, nL * 4);
    memcpy(b->dweight, a->dweight, nA * 4);
    memcpy(b->d_route_logits, a->d_route_logits, nL * 4);
    memcpy(b->dx, a->dx, (size_t)a->T * in->dims.d_model * 4);
    for (int i = 0; i < in->info.n_params; ++i) memcpy(b->param_grads[i], a->param_grads[i], in->param_n[i] * 4);
    for (int i = 0; i < in->info.n_buffers; ++i) memcpy(b->buffers[i], a->buffers[i], in->buffer_n[i] * 4);
}

static void group_determinism(const cf_config *cfg) {
    static const char *const rows[] = {"determinism.forward", "determinism.backward"};
    cf_device dev;
    if (group_device(cfg, &dev, rows, 2) != 0) return;
    cf_rng r = cf_rng_make(cfg->seed * 37 + 5);
    const shape fixed[] = {make_shape(16, 4, 2, 8, 1.25), make_shape(64, 8, 8, 4, 1.0), make_shape(200, 32, 4, 16, 0.5)};
    shape shapes[24];
    const int ns = fixed_then_random(shapes, fixed, 3, &r, cfg->quick ? 3 : 12, 5);
    tally t_f = {0}, t_b = {0};
    int any_grad = 0, fwd_calls = 0, bwd_calls = 0;
    for (int i = 0; i < ns; ++i) {
        const shape *s = &shapes[i];
        char where[128];
        where_of(where, sizeof where, s, 0);
        cf_note("determinism %s", where);
        cf_instance A, B;
        int ra = instance_for(&A, cfg, &dev, s, 1, cfg->seed + 7);
        int rb = instance_for(&B, cfg, &dev, s, 1, cfg->seed + 7);
        inputs x;
        memset(&x, 0, sizeof x);
        if (ra == CF_INST_NOT_APPLICABLE) {
            cf_instance_destroy(&A);
            cf_instance_destroy(&B);
            continue;
        }
        if (ra != CF_INST_OK || rb != CF_INST_OK || gen_inputs(&x, &r, s, 0) != 0) {
            tfail(&t_f, "%s: no instance: %s", where, ra != CF_INST_OK ? A.why : B.why);
            free_inputs(&x);
            cf_instance_destroy(&A);
            cf_instance_destroy(&B);
            continue;
        }
        const int C = cf_capacity(&A, s->T);
        const int grad = !(A.info.flags & MOE_ROUTER_NO_GRAD) && A.impl->backward;
        any_grad |= grad;
        for (int training = 0; training <= 1; ++training) {
            where_of(where, sizeof where, s, training);
            cf_note("determinism %s", where);
            moe_rng_key key = key_for(cfg, 1000 + (uint64_t)i, 1);
            cf_call c[3];
            int ok = 1;
            for (int k = 0; k < 3; ++k) ok &= cf_call_alloc(&c[k], k == 2 ? &B : &A, s->T) == 0;
            if (ok) {
                /* Same instance twice with a different workspace content, then a fresh instance. */
                static const unsigned char fills[3] = {0x00, 0xFF, 0x3C};
                for (int k = 0; k < 3; ++k) {
                    bind_inputs(&c[k], &x, C, training, key);
                    c[k].ws_fill = fills[k];
                    cf_forward(k == 2 ? &B : &A, &c[k]);
                    fwd_calls++;
                    if (c[k].viol) tfail(&t_f, "%s: %s", where, c[k].violation);
                }
                char diff[128];
                if (compare_forward(&A, &c[0], &c[1], diff, sizeof diff))
                    tfail(&t_f, "%s: two forward calls with the same inputs and RNG key differ at %s (the second "
                                "call found other bytes in the workspace; causes: rand(), state kept between calls, "
                                "workspace read before it is written)",
                          where, diff);
                else if (compare_forward(&A, &c[0], &c[2], diff, sizeof diff))
                    tfail(&t_f, "%s: a second instance with the same inputs and RNG key gives a different %s", where, diff);
                if (training && grad && c[0].st == MOE_OK) {
                    cf_note("determinism backward %s", where);
                    gen_upstream(&r, &A, &c[0]);
                    for (size_t q = 0; q < (size_t)s->T * s->d; ++q) c[0].dx[q] = cf_rng_uniform(&r, -1.0f, 1.0f);
                    for (int k = 1; k < 3; ++k) copy_upstream(&A, &c[0], &c[k]);
                    for (int k = 0; k < 3; ++k) {
                        cf_backward(k == 2 ? &B : &A, &c[k]);
                        bwd_calls++;
                        if (c[k].viol) tfail(&t_b, "%s: %s", where, c[k].violation);
                    }
                    if (compare_backward(&A, &c[0], &c[1], diff, sizeof diff))
                        tfail(&t_b, "%s: two backward calls with the same inputs differ at %s", where, diff);
                    else if (compare_backward(&A, &c[0], &c[2], diff, sizeof diff))
                        tfail(&t_b, "%s: a second instance's backward gives a different %s", where, diff);
                }
            } else {
                tfail(&t_f, "%s: out of memory in the checker", where);
            }
            for (int k = 0; k < 3; ++k) cf_call_free(&c[k], k == 2 ? &B : &A);
        }
        free_inputs(&x);
        cf_instance_destroy(&A);
        cf_instance_destroy(&B);
    }
    trow("determinism.forward", &t_f, "%d calls over %d shapes, evaluation and training: bitwise equal", fwd_calls, ns);
    if (!any_grad && !t_b.fails)
        cf_row("determinism.backward", CF_SKIP, "the router declares MOE_ROUTER_NO_GRAD");
    else
        trow("determinism.backward", &t_b, "%d calls: bitwise equal dlogits, dx and parameter gradients", bwd_calls);
    cf_device_close(&dev);
}

/* A plugin that declares a saved buffer (info.saved_bytes) must give the
 * same outputs when the host passes none (a host older than the field):
 * forward then backward with the buffer, as moehost calls them, against the
 * same two calls as an older host, bitwise. A backward that reads what its
 * forward did not write (the buffer starts poisoned) or a fallback that
 * computes something else shows here. */
static void group_saved(const cf_config *cfg) {
    static const char *const rows[] = {"saved.fallback"};
    cf_device dev;
    if (group_device(cfg, &dev, rows, 1) != 0) return;
    cf_rng r = cf_rng_make(cfg->seed * 53 + 9);
    const shape fixed[] = {make_shape(16, 4, 2, 8, 1.25), make_shape(64, 8, 2, 16, 1.0), make_shape(200, 8, 2, 32, 1.25)};
    shape shapes[16];
    const int ns = fixed_then_random(shapes, fixed, 3, &r, cfg->quick ? 2 : 8, 3);
    tally t = {0};
    int declared = 0, calls = 0;
    for (int i = 0; i < ns; ++i) {
        const shape *s = &shapes[i];
        char where[128];
        where_of(where, sizeof where, s, 0);
        cf_note("saved %s", where);
        cf_instance A;
        int ra = instance_for(&A, cfg, &dev, s, 1, cfg->seed + 9);
        inputs x;
        memset(&x, 0, sizeof x);
        if (ra == CF_INST_NOT_APPLICABLE || (ra == CF_INST_OK && A.info.saved_bytes == 0)) {
            cf_instance_destroy(&A);
            continue;
        }
        if (ra != CF_INST_OK || gen_inputs(&x, &r, s, 0) != 0) {
            tfail(&t, "%s: no instance: %s", where, A.why);
            free_inputs(&x);
            cf_instance_destroy(&A);
            continue;
        }
        declared = 1;
        const int C = cf_capacity(&A, s->T);
        const int grad = !(A.info.flags & MOE_ROUTER_NO_GRAD) && A.impl->backward;
        for (int training = 0; training <= 1; ++training) {
            where_of(where, sizeof where, s, training);
            moe_rng_key key = key_for(cfg, 2000 + (uint64_t)i, 1);
            cf_call c[2];
            int ok = cf_call_alloc(&c[0], &A, s->T) == 0;
            ok = cf_call_alloc(&c[1], &A, s->T) == 0 && ok;
            if (!ok) {
                tfail(&t, "%s: out of memory in the checker", where);
            } else {
                c[1].older_host = 1;
                char diff[128];
                for (int k = 0; k < 2; ++k) {
                    bind_inputs(&c[k], &x, C, training, key);
                    cf_forward(&A, &c[k]);
                    calls++;
                    if (c[k].viol) tfail(&t, "%s: forward%s: %s", where, k ? " as an older host" : "", c[k].violation);
                }
                if (compare_forward(&A, &c[0], &c[1], diff, sizeof diff))
                    tfail(&t, "%s: forward with the saved buffer and without it (an older host) differ at %s", where,
                          diff);
                else if (training && grad && c[0].st == MOE_OK) {
                    gen_upstream(&r, &A, &c[0]);
                    for (size_t q = 0; q < (size_t)s->T * s->d; ++q) c[0].dx[q] = cf_rng_uniform(&r, -1.0f, 1.0f);
                    copy_upstream(&A, &c[0], &c[1]);
                    for (int k = 0; k < 2; ++k) {
                        cf_backward(&A, &c[k]);
                        calls++;
                        if (c[k].viol)
                            tfail(&t, "%s: backward%s: %s", where, k ? " as an older host" : "", c[k].violation);
                    }
                    if (compare_backward(&A, &c[0], &c[1], diff, sizeof diff))
                        tfail(&t,
                              "%s: backward after a forward with the saved buffer and without it (an older host) "
                              "differ at %s",
                              where, diff);
                }
            }
            cf_call_free(&c[0], &A);
            cf_call_free(&c[1], &A);
        }
        free_inputs(&x);
        cf_instance_destroy(&A);
    }
    if (!declared && !t.fails)
        cf_row("saved.fallback", CF_SKIP, "the plugin declares no saved buffer (saved_bytes 0)");
    else
        trow("saved.fallback", &t, "%d calls on %s: with the saved buffer and as an older host without it, bitwise equal",
             calls, dev.name);
    cf_device_close(&dev);
}

/* ------------------------------------------------------------------ */
/* gradient check                                                      */
/* ------------------------------------------------------------------ */

typedef struct probe {
    cf_instance *in;
    const shape *s;
    inputs *x;
    int C;
    moe_rng_key key;
    const float *cw, *cr;       /* probe loss weights */
    const int32_t *ref_expert;  /* the reference decisions */
    const int32_t *ref_slot;
    float *const *buffers0;     /* buffer values before the reference forward */
    char err[CF_WHY_CAP];
} probe;

/* L = sum(cw .* weight) + sum(cr .* route_logits) at the current inputs;
 * NAN when a decision differs from the reference; sets err on a failure. */
static double probe_loss(probe *p) {
    cf_call c;
    double L = NAN;
    if (cf_call_alloc(&c, p->in, p->s->T) != 0) {
        snprintf(p->err, sizeof p->err, "out of memory in the checker");
        cf_call_free(&c, p->in);
        return NAN;
    }
    bind_inputs(&c, p->x, p->C, 1, p->key);
    cf_call_reset_buffers(&c, p->in, p->buffers0);
    moe_status st = cf_forward(p->in, &c);
    size_t nA = (size_t)p->s->T * p->in->info.k_out, nL = (size_t)p->s->T * p->s->E;
    if (c.viol) {
        snprintf(p->err, sizeof p->err, "%s", c.violation);
    } else if (st != MOE_OK) {
        snprintf(p->err, sizeof p->err, "forward failed at a perturbed input: %s: %.400s", status_name(st), c.msg);
    } else if (memcmp(c.expert, p->ref_expert, nA * 4) == 0 &&
               (!c.slot || memcmp(c.slot, p->ref_slot, nA * 4) == 0)) {
        L = 0.0;
        for (size_t i = 0; i < nA; ++i) L += (double)p->cw[i] * (double)c.weight[i];
        if (c.route_logits)
            for (size_t i = 0; i < nL; ++i) L += (double)p->cr[i] * (double)c.route_logits[i];
        if (!isfinite(L)) {
            snprintf(p->err, sizeof p->err, "forward's weights%s are not finite", c.route_logits ? " or route_logits" : "");
            L = NAN;
        }
    }
    cf_call_free(&c, p->in);
    return L;
}

/* Central difference in *v; NAN if a decision flipped. */
static double central(probe *p, float *v, float eps) {
    float saved = *v;
    *v = saved + eps;
    double lp = probe_loss(p);
    *v = saved - eps;
    double lm = probe_loss(p);
    *v = saved;
    if (isnan(lp) || isnan(lm)) return NAN;
    return (lp - lm) / ((double)(saved + eps) - (double)(saved - eps));
}

static int grad_close(double a, double n) { return fabs(a - n) <= 2e-3 + 2e-2 * fmax(fabs(a), fabs(n)); }

/* Compare one coordinate; eps 1e-3 first, then 1e-2 and 3e-4 before
 * calling it a mismatch (float rounding and curvature). Returns 1 compared,
 * 0 skipped (decision flipped), -1 mismatch (message in out). */
static int check_coord(probe *p, float *v, double analytic, const char *what, char *out, size_t cap) {
    static const float eps[3] = {1e-3f, 1e-2f, 3e-4f};
    double first = NAN;
    int any = 0;
    for (int k = 0; k < 3; ++k) {
        double num = central(p, v, eps[k]);
        if (p->err[0]) return -2;
        if (isnan(num)) continue;
        any = 1;
        if (isnan(first)) first = num;
        if (grad_close(analytic, num)) return 1;
    }
    if (!any) return 0;
    snprintf(out, cap, "%s: backward gives %.6g, central differences of forward give %.6g", what, analytic, first);
    return -1;
}

static void group_gradient(const cf_config *cfg) {
    static const char *const rows[] = {"backward.gradcheck"};
    if (cf_skipped(cfg, "backward.gradcheck")) {
        cf_row("backward.gradcheck", CF_SKIP, "not run (--skip)");
        return;
    }
    cf_device dev;
    if (group_device(cfg, &dev, rows, 1) != 0) return;
    cf_rng r = cf_rng_make(cfg->seed * 41 + 3);
    tally t = {0};
    long compared = 0, skipped = 0;
    int ns = cfg->quick ? 3 : 8, no_grad = 0;
    for (int i = 0; i < ns; ++i) {
        shape s;
        s.E = i == 0 ? 4 : cf_rng_int(&r, 1, 8);
        s.K = i == 0 ? 2 : cf_rng_int(&r, 1, s.E < 4 ? s.E : 4);
        s.T = i == 0 ? 3 : cf_rng_int(&r, 1, 6);
        s.d = cf_rng_int(&r, 1, 4);
        s.vocab = 50;
        s.cf = cf_factors[cf_rng_int(&r, 0, 3)];
        s.max_tokens = s.T;
        char where[128];
        where_of(where, sizeof where, &s, 1);
        cf_note("gradient check %s", where);
        cf_instance in;
        int rc = instance_for(&in, cfg, &dev, &s, 0, cfg->seed + 100 + (uint64_t)i);
        if (rc == CF_INST_NOT_APPLICABLE) {
            cf_instance_destroy(&in);
            continue;
        }
        if (rc != CF_INST_OK) {
            tfail(&t, "%s: no instance: %s", where, in.why);
            cf_instance_destroy(&in);
            continue;
        }
        if (in.info.flags & MOE_ROUTER_NO_GRAD) {
            no_grad = 1;
            cf_instance_destroy(&in);
            break;
        }
        if (!in.impl->backward) {
            tfail(&t, "the %s table has no backward, but the router does not declare MOE_ROUTER_NO_GRAD", dev.name);
            cf_instance_destroy(&in);
            break;
        }
        inputs x;
        if (gen_inputs(&x, &r, &s, 1) != 0) {
            free_inputs(&x);
            cf_instance_destroy(&in);
            continue;
        }
        /* Twice with params: as initialised, and moved away from the init
         * (a zero-initialised projection hides half of its gradient). */
        for (int pass = 0; pass < (in.info.n_params > 0 ? 2 : 1); ++pass) {
            if (pass == 1)
                for (int p = 0; p < in.info.n_params; ++p)
                    for (size_t q = 0; q < in.param_n[p]; ++q) in.params[p][q] += 0.3f * cf_rng_normal(&r);
            cf_call c;
            if (cf_call_alloc(&c, &in, s.T) != 0) {
                cf_call_free(&c, &in);
                continue;
            }
            int C = cf_capacity(&in, s.T);
            moe_rng_key key = key_for(cfg, 77 + (uint64_t)i, 0);
            bind_inputs(&c, &x, C, 1, key);
            float *buffers0[MOE_MAX_PLUGIN_TENSORS] = {0};
            for (int b = 0; b < in.info.n_buffers; ++b) {
                buffers0[b] = malloc(in.buffer_n[b] * sizeof(float));
                memcpy(buffers0[b], c.buffers[b], in.buffer_n[b] * sizeof(float));
            }
            moe_status st = cf_forward(&in, &c);
            size_t nA = (size_t)s.T * in.info.k_out, nL = (size_t)s.T * s.E, nX = (size_t)s.T * s.d;
            float *cw = malloc(nA * sizeof(float) + 4), *cr = malloc(nL * sizeof(float) + 4);
            float *dx0 = malloc(nX * sizeof(float) + 4);
            float *g0[MOE_MAX_PLUGIN_TENSORS] = {0};
            if (st != MOE_OK || c.viol) {
                tfail(&t, "%s: forward failed: %s", where, c.viol ? c.violation : c.msg);
            } else {
                for (size_t q = 0; q < nA; ++q) cw[q] = cf_rng_uniform(&r, -1.0f, 1.0f);
                for (size_t q = 0; q < nL; ++q) cr[q] = cf_rng_uniform(&r, -1.0f, 1.0f);
                for (size_t q = 0; q < nA; ++q) c.dweight[q] = c.expert[q] >= 0 ? cw[q] : 0.0f;
                memcpy(c.d_route_logits, cr, nL * sizeof(float));
                /* dx and param_grads are accumulated into: start them non-zero. */
                for (size_t q = 0; q < nX; ++q) dx0[q] = c.dx[q] = cf_rng_uniform(&r, -1.0f, 1.0f);
                for (int p = 0; p < in.info.n_params; ++p) {
                    g0[p] = malloc(in.param_n[p] * sizeof(float));
                    for (size_t q = 0; q < in.param_n[p]; ++q) g0[p][q] = c.param_grads[p][q] = cf_rng_uniform(&r, -1.0f, 1.0f);
                }
                st = cf_backward(&in, &c);
                if (st != MOE_OK || c.viol) {
                    tfail(&t, "%s: backward failed: %s", where, c.viol ? c.violation : c.msg);
                } else {
                    probe p = {&in, &s, &x, C, key, cw, cr, c.expert, c.slot, buffers0, ""};
                    char what[256], msg[CF_WHY_CAP];
                    int stop = 0;
                    for (size_t q = 0; q < nL && !stop; ++q) {
                        snprintf(what, sizeof what, "%s: dlogits[%zu, %zu]", where, q / (size_t)s.E, q % (size_t)s.E);
                        int rc = check_coord(&p, &x.logits[q], c.dlogits[q], what, msg, sizeof msg);
                        if (rc == -2) { tfail(&t, "%s: %s", where, p.err); stop = 1; }
                        else if (rc == -1) tfail(&t, "%s", msg);
                        else if (rc == 0) skipped++;
                        else compared++;
                    }
                    for (size_t q = 0; q < nX && !stop; ++q) {
                        snprintf(what, sizeof what, "%s: dx[%zu, %zu] (accumulated)", where, q / (size_t)s.d,
                                 q % (size_t)s.d);
                        int rc = check_coord(&p, &x.x[q], (double)c.dx[q] - (double)dx0[q], what, msg, sizeof msg);
                        if (rc == -2) { tfail(&t, "%s: %s", where, p.err); stop = 1; }
                        else if (rc == -1) tfail(&t, "%s", msg);
                        else if (rc == 0) skipped++;
                        else compared++;
                    }
                    for (int pp = 0; pp < in.info.n_params && !stop; ++pp)
                        for (size_t q = 0; q < in.param_n[pp] && !stop; ++q) {
                            snprintf(what, sizeof what, "%s: d %.32s[%zu] (accumulated)", where, in.info.params[pp].name, q);
                            int rc = check_coord(&p, &in.params[pp][q],
                                                 (double)c.param_grads[pp][q] - (double)g0[pp][q], what, msg, sizeof msg);
                            if (rc == -2) { tfail(&t, "%s: %s", where, p.err); stop = 1; }
                            else if (rc == -1) tfail(&t, "%s", msg);
                            else if (rc == 0) skipped++;
                            else compared++;
                        }
                }
            }
            free(cw);
            free(cr);
            free(dx0);
            for (int p = 0; p < MOE_MAX_PLUGIN_TENSORS; ++p) {
                free(g0[p]);
                free(buffers0[p]);
            }
            cf_call_free(&c, &in);
        }
        free_inputs(&x);
        cf_instance_destroy(&in);
    }
    if (no_grad)
        cf_row("backward.gradcheck", CF_SKIP, "the router declares MOE_ROUTER_NO_GRAD: the host never calls backward");
    else if (!t.fails && compared == 0)
        cf_row("backward.gradcheck", CF_SKIP, "every probed coordinate flipped a routing decision (%ld skipped)", skipped);
    else
        trow("backward.gradcheck", &t,
             "%ld coordinates (dlogits, dx, params) match central differences; %ld skipped where a decision flipped",
             compared, skipped);
    cf_device_close(&dev);
}

/* ------------------------------------------------------------------ */
/* bad inputs                                                          */
/* ------------------------------------------------------------------ */

/* Run forward (evaluation and training) and, where it succeeds and the
 * router has a gradient, backward; an error needs a message, a success
 * valid outputs. */
static void bad_case(const cf_config *cfg, cf_instance *in, const shape *s, inputs *x, const char *what, tally *t,
                     int *refused, int *routed, cf_rng *r) {
    const int C = cf_capacity(in, s->T);
    for (int training = 0; training <= 1; ++training) {
        char where[200];
        snprintf(where, sizeof where, "%s, T=%d E=%d K=%d%s", what, s->T, s->E, s->K, training ? " training" : "");
        cf_note("bad input: %s", where);
        cf_call c;
        if (cf_call_alloc(&c, in, s->T) != 0) {
            cf_call_free(&c, in);
            continue;
        }
        bind_inputs(&c, x, C, training, key_for(cfg, 5, 0));
        moe_status st = cf_forward(in, &c);
        if (c.viol) tfail(t, "%s: %s", where, c.violation);
        if (st != MOE_OK) {
            if (!c.msg[0]) tfail(t, "%s: forward returned %s with an empty message", where, status_name(st));
            else ++*refused;
        } else {
            inv v;
            memset(&v, 0, sizeof v);
            validate_forward(in, &c, where, &v, 0);
            const tally *all[] = {&v.idx, &v.wts, &v.uniq, &v.cap};
            for (int k = 0; k < 4; ++k)
                if (all[k]->fails) {
                    tfail(t, "forward returned MOE_OK but: %s", all[k]->first);
                    break;
                }
            ++*routed;
            if (training && !(in->info.flags & MOE_ROUTER_NO_GRAD) && in->impl->backward) {
                cf_note("bad input backward: %s", where);
                gen_upstream(r, in, &c);
                moe_status sb = cf_backward(in, &c);
                if (c.viol) tfail(t, "%s (backward): %s", where, c.violation);
                if (sb != MOE_OK && !c.msg[0])
                    tfail(t, "%s: backward returned %s with an empty message", where, status_name(sb));
            }
        }
        cf_call_free(&c, in);
    }
}

static void group_bad_input(const cf_config *cfg) {
    static const char *const rows[] = {"bad_input.nan", "bad_input.inf", "bad_input.extreme", "bad_input.empty"};
    cf_device dev;
    if (group_device(cfg, &dev, rows, 4) != 0) return;
    cf_rng r = cf_rng_make(cfg->seed * 43 + 9);
    const shape shapes[] = {make_shape(5, 6, 2, 4, 1.25), make_shape(3, 1, 1, 2, 1.0), make_shape(4, 8, 8, 3, 0.5)};
    const int ns = (int)(sizeof shapes / sizeof shapes[0]);
    int ignores = 0;
    tally t[3];
    memset(t, 0, sizeof t);
    int refused[3] = {0, 0, 0}, routed[3] = {0, 0, 0};
    for (int i = 0; i < ns; ++i) {
        const shape *s = &shapes[i];
        cf_instance in;
        int rc = instance_for(&in, cfg, &dev, s, 0, cfg->seed);
        if (rc == CF_INST_NOT_APPLICABLE) {
            cf_instance_destroy(&in);
            continue;
        }
        if (rc != CF_INST_OK) {
            for (int k = 0; k < 3; ++k) tfail(&t[k], "T=%d E=%d K=%d: no instance: %s", s->T, s->E, s->K, in.why);
            cf_instance_destroy(&in);
            continue;
        }
        if (in.info.flags & MOE_ROUTER_IGNORES_LOGITS) ignores = 1;
        const float inf = INFINITY, nan = NAN;
        /* kind 0: NaN, 1: Inf, 2: extreme finite values */
        for (int kind = 0; kind < 3; ++kind)
            for (int variant = 0; variant < 4; ++variant) {
                inputs x;
                if (gen_inputs(&x, &r, s, 1) != 0) {
                    free_inputs(&x);
                    continue;
                }
                float *l = x.logits;
                const int E = s->E, T = s->T;
                const char *what = "";
                switch (kind * 4 + variant) {
                case 0: l[E + (E > 2 ? 2 : 0)] = nan; what = "one NaN logit"; break;
                case 1: for (int e = 0; e < E; ++e) l[e] = nan; what = "a row of NaN logits"; break;
                case 2: for (int q = 0; q < T * E; ++q) l[q] = nan; what = "all logits NaN"; break;
                case 3: l[(size_t)(T - 1) * E] = -nan; what = "a negative NaN logit"; break;
                case 4: l[E - 1] = inf; what = "one +Inf logit"; break;
                case 5: l[0] = -inf; what = "one -Inf logit"; break;
                case 6: for (int e = 0; e < E; ++e) l[E + e] = -inf; what = "a row of -Inf logits"; break;
                case 7: for (int e = 0; e < E; ++e) l[e] = (e & 1) ? -inf : inf; what = "+Inf and -Inf in one row"; break;
                case 8: for (int q = 0; q < T * E; ++q) l[q] = (q % 3 ? 1e30f : -1e30f); what = "logits of +-1e30"; break;
                case 9: l[0] = 3.4e38f; l[E * T - 1] = -3.4e38f; what = "logits of +-3.4e38"; break;
                case 10: for (int q = 0; q < T * E; ++q) l[q] = 1e-40f * (float)(q % 5); what = "denormal logits"; break;
                default: for (int e = 0; e < E; ++e) l[e] = 88.0f + (float)e; what = "logits near exp's overflow"; break;
                }
                if (!((in.info.flags & MOE_ROUTER_IGNORES_LOGITS) && kind < 2))
                    bad_case(cfg, &in, s, &x, what, &t[kind], &refused[kind], &routed[kind], &r);
                free_inputs(&x);
            }
        cf_instance_destroy(&in);
    }
    static const char *const names[] = {"NaN", "Inf", "extreme finite"};
    for (int k = 0; k < 3; ++k) {
        if (k < 2 && ignores)
            cf_row(rows[k], CF_SKIP, "the router declares MOE_ROUTER_IGNORES_LOGITS");
        else
            trow(rows[k], &t[k], "%s logits: %d calls refused with a message, %d routed with valid outputs", names[k],
                 refused[k], routed[k]);
    }

    /* T = 0 */
    tally te = {0};
    const shape empty[] = {make_shape(0, 4, 2, 4, 1.25), make_shape(0, 1, 1, 1, 1.0)};
    for (int i = 0; i < 2; ++i) {
        cf_instance in;
        shape s = empty[i];
        int rc = instance_for(&in, cfg, &dev, &s, 0, cfg->seed);
        if (rc == CF_INST_NOT_APPLICABLE) {
            cf_instance_destroy(&in);
            continue;
        }
        if (rc != CF_INST_OK) {
            tfail(&te, "E=%d K=%d: no instance: %s", s.E, s.K, in.why);
            cf_instance_destroy(&in);
            continue;
        }
        inputs x;
        if (gen_inputs(&x, &r, &s, 1) == 0) {
            int a = 0, b = 0;
            bad_case(cfg, &in, &s, &x, "T = 0", &te, &a, &b, &r);
            /* bad_case runs backward only after a successful training forward; T = 0 must allow that too. */
            if (!(in.info.flags & MOE_ROUTER_NO_GRAD) && in.impl->backward) {
                cf_call c;
                if (cf_call_alloc(&c, &in, 0) == 0) {
                    bind_inputs(&c, &x, 1, 1, key_for(cfg, 5, 0));
                    cf_note("backward with T = 0");
                    moe_status sb = cf_backward(&in, &c);
                    if (c.viol) tfail(&te, "T = 0 backward: %s", c.violation);
                    if (sb != MOE_OK && !c.msg[0])
                        tfail(&te, "T = 0: backward returned %s with an empty message", status_name(sb));
                }
                cf_call_free(&c, &in);
            }
        }
        free_inputs(&x);
        cf_instance_destroy(&in);
    }
    trow("bad_input.empty", &te, "T = 0 answered without writing anything (forward and backward)");
    cf_device_close(&dev);
}

/* ------------------------------------------------------------------ */
/* CUDA parity                                                         */
/* ------------------------------------------------------------------ */

static int close_arrays(const float *a, const float *b, size_t n, double tol, const char *name, char *out, size_t cap) {
    for (size_t i = 0; i < n; ++i) {
        double x = a[i], y = b[i];
        if (isnan(x) && isnan(y)) continue;
        if (!(fabs(x - y) <= tol * fmax(1.0, fabs(x)))) {
            snprintf(out, cap, "%s[%zu]: cpu %.9g, cuda %.9g (tolerance %g)", name, i, x, y, tol);
            return 0;
        }
    }
    return 1;
}

static void group_cuda(const cf_config *cfg) {
    if (cfg->device != MOE_DEVICE_CUDA) {
        cf_row("cuda.parity", CF_SKIP, "not requested (--device cuda compares the cuda table with the cpu table)");
        cf_row("cuda.backward", CF_SKIP, "not requested (--device cuda)");
        return;
    }
    cf_device cpu, gpu;
    char why[CF_WHY_CAP];
    if (!cfg->api->cuda) {
        cf_row("cuda.parity", CF_SKIP, "the plugin has no cuda table");
        cf_row("cuda.backward", CF_SKIP, "the plugin has no cuda table");
        return;
    }
    if (!cfg->api->cpu) {
        cf_row("cuda.parity", CF_SKIP, "the plugin has no cpu table to compare with");
        cf_row("cuda.backward", CF_SKIP, "the plugin has no cpu table to compare with");
        return;
    }
    if (cf_device_cuda(&gpu, why, sizeof why) != 0) {
        cf_row("cuda.parity", CF_SKIP, "%s", why);
        cf_row("cuda.backward", CF_SKIP, "%s", why);
        return;
    }
    cf_device_cpu(&cpu);
    cf_rng r = cf_rng_make(cfg->seed * 47 + 11);
    shape shapes[40];
    int ns = make_shapes(cfg, shapes, 40, cfg->quick ? 6 : 24, &r);
    tally tf = {0}, tb = {0};
    int grad = 0, compared = 0;
    for (int i = 0; i < ns; ++i) {
        const shape *s = &shapes[i];
        char where[128];
        where_of(where, sizeof where, s, 0);
        cf_note("cuda parity %s", where);
        cf_instance a, b;
        int ra = instance_for(&a, cfg, &cpu, s, 2, cfg->seed + 3);
        int rb = instance_for(&b, cfg, &gpu, s, 2, cfg->seed + 3);
        inputs x;
        memset(&x, 0, sizeof x);
        if (ra == CF_INST_NOT_APPLICABLE) {
            /* nothing to compare */
        } else if (ra != CF_INST_OK || rb != CF_INST_OK || gen_inputs(&x, &r, s, 0) != 0) {
            tfail(&tf, "%s: no instance: %s", where, ra != CF_INST_OK ? a.why : b.why);
        } else {
            const int C = cf_capacity(&a, s->T);
            const int g = !(a.info.flags & MOE_ROUTER_NO_GRAD) && a.impl->backward && b.impl->backward;
            grad |= g;
            for (int training = 0; training <= 1; ++training) {
                where_of(where, sizeof where, s, training);
                cf_call ca, cb;
                if (cf_call_alloc(&ca, &a, s->T) != 0 || cf_call_alloc(&cb, &b, s->T) != 0) {
                    cf_call_free(&ca, &a);
                    cf_call_free(&cb, &b);
                    continue;
                }
                moe_rng_key key = key_for(cfg, 300 + (uint64_t)i, 2);
                bind_inputs(&ca, &x, C, training, key);
                bind_inputs(&cb, &x, C, training, key);
                cf_forward(&a, &ca);
                cf_note("cuda parity %s (cuda forward)", where);
                cf_forward(&b, &cb);
                compared++;
                size_t nA = (size_t)s->T * a.info.k_out, nL = (size_t)s->T * s->E;
                char diff[256];
                if (cb.viol) tfail(&tf, "%s: cuda: %s", where, cb.violation);
                else if (ca.st != cb.st)
                    tfail(&tf, "%s: cpu returned %s, cuda %s (%s)", where, status_name(ca.st), status_name(cb.st), cb.msg);
                else if (ca.st == MOE_OK) {
                    size_t q = 0;
                    while (q < nA && ca.expert[q] == cb.expert[q]) ++q;
                    if (q < nA)
                        tfail(&tf, "%s: decisions differ: expert[%zu, %zu] is %d on the cpu, %d on cuda", where,
                              q / (size_t)a.info.k_out, q % (size_t)a.info.k_out, ca.expert[q], cb.expert[q]);
                    else if (ca.slot && first_diff(ca.slot, cb.slot, nA, 4, "slot", diff, sizeof diff))
                        tfail(&tf, "%s: slots differ at %s", where, diff);
                    else if (!close_arrays(ca.weight, cb.weight, nA, 1e-5, "weight", diff, sizeof diff))
                        tfail(&tf, "%s: %s", where, diff);
                    else if (ca.route_logits &&
                             !close_arrays(ca.route_logits, cb.route_logits, nL, 1e-5, "route_logits", diff, sizeof diff))
                        tfail(&tf, "%s: %s", where, diff);
                    else
                        for (int k = 0; k < a.info.n_buffers; ++k)
                            if (!close_arrays(ca.buffers[k], cb.buffers[k], a.buffer_n[k], 1e-5, a.info.buffers[k].name,
                                              diff, sizeof diff)) {
                                tfail(&tf, "%s: buffer %s", where, diff);
                                break;
                            }
                    if (training && g && !cb.viol) {
                        cf_note("cuda parity %s (backward)", where);
                        gen_upstream(&r, &a, &ca);
                        for (size_t q = 0; q < (size_t)s->T * s->d; ++q) ca.dx[q] = cf_rng_uniform(&r, -1.0f, 1.0f);
                        copy_upstream(&a, &ca, &cb);
                        cf_backward(&a, &ca);
                        cf_backward(&b, &cb);
                        if (cb.viol) tfail(&tb, "%s: cuda: %s", where, cb.violation);
                        else if (ca.st != cb.st)
                            tfail(&tb, "%s: cpu backward returned %s, cuda %s", where, status_name(ca.st),
                                  status_name(cb.st));
                        else if (ca.st == MOE_OK) {
                            if (!close_arrays(ca.dlogits, cb.dlogits, nL, 1e-4, "dlogits", diff, sizeof diff) ||
                                !close_arrays(ca.dx, cb.dx, (size_t)s->T * s->d, 1e-4, "dx", diff, sizeof diff))
                                tfail(&tb, "%s: %s", where, diff);
                            else
                                for (int k = 0; k < a.info.n_params; ++k)
                                    if (!close_arrays(ca.param_grads[k], cb.param_grads[k], a.param_n[k], 1e-4,
                                                      a.info.params[k].name, diff, sizeof diff)) {
                                        tfail(&tb, "%s: gradient %s", where, diff);
                                        break;
                                    }
                        }
                    }
                }
                cf_call_free(&ca, &a);
                cf_call_free(&cb, &b);
            }
        }
        free_inputs(&x);
        cf_instance_destroy(&a);
        cf_instance_destroy(&b);
    }
    trow("cuda.parity", &tf, "%d calls on %s: identical decisions, weights within 1e-5", compared, gpu.name);
    if (!grad && !tb.fails)
        cf_row("cuda.backward", CF_SKIP, "the router declares MOE_ROUTER_NO_GRAD");
    else
        trow("cuda.backward", &tb, "dlogits, dx and parameter gradients within 1e-4 of the cpu");
    cf_device_close(&gpu);
    cf_device_close(&cpu);
}

/* ------------------------------------------------------------------ */

const cf_group cf_groups[] = {
    {"device", group_device_select},   {"create", group_create},       {"options", group_options},
    {"forward", group_forward},        {"determinism", group_determinism}, {"gradient", group_gradient},
    {"bad_input", group_bad_input},    {"cuda", group_cuda},          {"saved", group_saved},
};
const int cf_n_groups = (int)(sizeof cf_groups / sizeof cf_groups[0]);
