/*
 * moe-conform execution layer: reporting, randomness, devices, instances and
 * guarded forward/backward calls. Everything a plugin may write is allocated
 * with a guard zone behind it; everything it must only read is compared with
 * the original after the call.
 */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "tools/conform.h"

/* ------------------------------------------------------------------ */
/* Reporting                                                           */
/* ------------------------------------------------------------------ */

static FILE *cf_out = NULL;

void cf_report_to(FILE *out) { cf_out = out; }

/* Tabs and newlines separate fields and records of the protocol. */
static void cf_clean(char *s) {
    for (; *s; ++s)
        if (*s == '\t' || *s == '\n' || *s == '\r') *s = ' ';
}

void cf_row(const char *check, cf_result r, const char *fmt, ...) {
    char detail[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    cf_clean(detail);
    static const char *names[] = {"PASS", "FAIL", "SKIP"};
    fprintf(cf_out ? cf_out : stdout, "ROW\t%s\t%s\t%s\n", names[r], check, detail);
    fflush(cf_out ? cf_out : stdout);
}

void cf_note(const char *fmt, ...) {
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    cf_clean(what);
    fprintf(cf_out ? cf_out : stdout, "NOTE\t%s\n", what);
    fflush(cf_out ? cf_out : stdout);
}

int cf_skipped(const cf_config *cfg, const char *check) {
    for (int i = 0; i < cfg->n_skip; ++i)
        if (strcmp(cfg->skip[i], check) == 0) return 1;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Randomness (splitmix64)                                             */
/* ------------------------------------------------------------------ */

cf_rng cf_rng_make(uint64_t seed) {
    cf_rng r = {seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull};
    return r;
}

uint64_t cf_rng_next(cf_rng *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

int cf_rng_int(cf_rng *r, int lo, int hi) {
    if (hi <= lo) return lo;
    return lo + (int)(cf_rng_next(r) % (uint64_t)(hi - lo + 1));
}

float cf_rng_uniform(cf_rng *r, float lo, float hi) {
    double u = (double)(cf_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(lo + (hi - lo) * u);
}

float cf_rng_normal(cf_rng *r) {
    double u1 = ((double)(cf_rng_next(r) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (double)(cf_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* ------------------------------------------------------------------ */
/* Devices                                                             */
/* ------------------------------------------------------------------ */

static void *cpu_alloc(size_t bytes) {
    /* 256-byte aligned, as the host promises for the workspace. */
    size_t n = (bytes + 255) / 256 * 256;
    return aligned_alloc(256, n ? n : 256);
}
static void cpu_release(void *p) { free(p); }
static int cpu_copy(void *dst, const void *src, size_t bytes) {
    if (bytes) memcpy(dst, src, bytes);
    return 0;
}
static int cpu_sync(void *stream, char *why, size_t cap) {
    (void)stream;
    (void)why;
    (void)cap;
    return 0;
}

void cf_device_cpu(cf_device *d) {
    memset(d, 0, sizeof *d);
    d->kind = MOE_DEVICE_CPU;
    snprintf(d->name, sizeof d->name, "cpu");
    d->alloc = cpu_alloc;
    d->release = cpu_release;
    d->h2d = cpu_copy;
    d->d2h = cpu_copy;
    d->sync = cpu_sync;
}

int cf_device_cuda(cf_device *d, char *why, size_t cap) {
    memset(d, 0, sizeof *d);
#ifdef MOE_CONFORM_CUDA
    d->kind = MOE_DEVICE_CUDA;
    if (cf_cuda_open(d->name, sizeof d->name, &d->stream, why, cap) != 0) return -1;
    d->alloc = cf_cuda_alloc;
    d->release = cf_cuda_free;
    d->h2d = cf_cuda_h2d;
    d->d2h = cf_cuda_d2h;
    d->sync = cf_cuda_sync;
    return 0;
#else
    snprintf(why, cap,
             "this moe-conform was built without CUDA (configure the project with a CUDA toolkit and "
             "MOE_CUDA=ON or AUTO)");
    return -1;
#endif
}

void cf_device_close(cf_device *d) {
#ifdef MOE_CONFORM_CUDA
    if (d->kind == MOE_DEVICE_CUDA) cf_cuda_close(d->stream);
#endif
    memset(d, 0, sizeof *d);
}

/* ------------------------------------------------------------------ */
/* Instances                                                           */
/* ------------------------------------------------------------------ */

moe_router_dims cf_dims(int E, int K, int d_model, int vocab, int max_tokens, double cf, int layer) {
    moe_router_dims d;
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.num_experts = E;
    d.top_k = K;
    d.d_model = d_model;
    d.vocab_size = vocab;
    d.max_tokens = max_tokens;
    d.layer = layer;
    d.capacity_factor = cf;
    return d;
}

size_t cf_numel(const moe_tensor_spec *s) {
    size_t n = 1;
    for (int i = 0; i < s->ndim && i < MOE_MAX_TENSOR_DIMS; ++i) n *= (size_t)(s->shape[i] > 0 ? s->shape[i] : 0);
    return n;
}

/* What the host does with a spec (its init is its own; ours only has to
 * follow the kind and the scale). */
static void init_tensor(float *p, const moe_tensor_spec *s, size_t n, cf_rng *r) {
    for (size_t i = 0; i < n; ++i) {
        switch (s->init) {
        case MOE_INIT_CONST: p[i] = s->init_value; break;
        case MOE_INIT_NORMAL: p[i] = s->init_value * cf_rng_normal(r); break;
        case MOE_INIT_UNIFORM: p[i] = cf_rng_uniform(r, -s->init_value, s->init_value); break;
        case MOE_INIT_ZEROS:
        default: p[i] = 0.0f; break;
        }
    }
}

/* A tensor spec the host can allocate: 1..4 positive dims, a sane size. */
static int spec_usable(const moe_tensor_spec *s) {
    if (s->ndim < 1 || s->ndim > MOE_MAX_TENSOR_DIMS) return 0;
    double n = 1.0;
    for (int i = 0; i < s->ndim; ++i) {
        if (s->shape[i] < 1) return 0;
        n *= (double)s->shape[i];
    }
    return n <= (double)(1u << 28);
}

int cf_instance_create(cf_instance *in, const cf_config *cfg, const cf_device *dev, moe_router_dims dims,
                       const moe_option *opts, int n_opts, uint64_t seed) {
    memset(in, 0, sizeof *in);
    in->api = cfg->api;
    in->dev = dev;
    in->dims = dims;
    in->impl = dev->kind == MOE_DEVICE_CUDA ? cfg->api->cuda : cfg->api->cpu;
    if (!in->impl || !in->impl->forward) {
        snprintf(in->why, sizeof in->why, "the plugin has no %s table", dev->kind == MOE_DEVICE_CUDA ? "cuda" : "cpu");
        return CF_INST_NO_IMPL;
    }
    moe_status st = cfg->api->create(&in->dims, opts, n_opts, &in->state, in->msg, sizeof in->msg);
    in->create_status = st;
    if (st != MOE_OK) {
        in->state = NULL; /* a refusing create owns nothing we could free */
        snprintf(in->why, sizeof in->why, "create returned status %d: %.400s", (int)st,
                 in->msg[0] ? in->msg : "(no message)");
        return CF_INST_REFUSED;
    }
    in->info.struct_size = sizeof in->info;
    st = cfg->api->query(in->state, &in->info);
    if (st != MOE_OK) {
        snprintf(in->why, sizeof in->why, "query returned status %d", (int)st);
        return CF_INST_QUERY;
    }
    /* As the host: a plugin built before saved_bytes was appended declares none. */
    if (in->info.struct_size < offsetof(moe_router_info, saved_bytes) + sizeof in->info.saved_bytes)
        in->info.saved_bytes = 0;
    const moe_router_info *I = &in->info;
    if (I->k_out < 1 || I->k_out > 4096 || I->n_params < 0 || I->n_params > MOE_MAX_PLUGIN_TENSORS ||
        I->n_buffers < 0 || I->n_buffers > MOE_MAX_PLUGIN_TENSORS || I->workspace_bytes > ((size_t)1 << 32) ||
        I->saved_bytes > ((size_t)1 << 32)) {
        snprintf(in->why, sizeof in->why,
                 "query gave an unusable info: k_out %d (1..4096), %d params, %d buffers (0..%d), "
                 "workspace %zu bytes, saved %zu bytes",
                 I->k_out, I->n_params, I->n_buffers, MOE_MAX_PLUGIN_TENSORS, I->workspace_bytes, I->saved_bytes);
        return CF_INST_INFO;
    }
    cf_rng r = cf_rng_make(seed ^ 0x5EEDull);
    for (int i = 0; i < I->n_params + I->n_buffers; ++i) {
        int is_param = i < I->n_params;
        const moe_tensor_spec *s = is_param ? &I->params[i] : &I->buffers[i - I->n_params];
        if (!spec_usable(s)) {
            snprintf(in->why, sizeof in->why, "%s %d has an unusable shape (ndim %d)", is_param ? "param" : "buffer",
                     is_param ? i : i - I->n_params, s->ndim);
            return CF_INST_INFO;
        }
        size_t n = cf_numel(s);
        float *p = malloc(n * sizeof(float));
        if (!p) {
            snprintf(in->why, sizeof in->why, "out of memory for a %zu-element tensor", n);
            return CF_INST_NO_MEMORY;
        }
        init_tensor(p, s, n, &r);
        if (is_param) {
            in->params[i] = p;
            in->param_n[i] = n;
        } else {
            in->buffers[i - I->n_params] = p;
            in->buffer_n[i - I->n_params] = n;
        }
    }
    return CF_INST_OK;
}

void cf_instance_destroy(cf_instance *in) {
    for (int i = 0; i < MOE_MAX_PLUGIN_TENSORS; ++i) {
        free(in->params[i]);
        free(in->buffers[i]);
    }
    if (in->state) in->api->destroy(in->state);
    memset(in, 0, sizeof *in);
}

int cf_capacity(const cf_instance *in, int T) {
    int K = in->dims.top_k < in->info.k_out ? in->dims.top_k : in->info.k_out;
    double c = ceil(in->dims.capacity_factor * (double)T * K / in->dims.num_experts);
    return c < 1.0 ? 1 : (int)c;
}

/* ------------------------------------------------------------------ */
/* Calls                                                               */
/* ------------------------------------------------------------------ */

static void fill_words(void *p, size_t bytes, uint32_t word) {
    uint32_t *w = p;
    for (size_t i = 0; i < bytes / 4; ++i) w[i] = word;
}

static void *xalloc(size_t bytes) { return malloc(bytes ? bytes : 1); }

int cf_call_alloc(cf_call *c, const cf_instance *in, int T) {
    memset(c, 0, sizeof *c);
    c->T = T;
    size_t nA = (size_t)T * in->info.k_out, nL = (size_t)T * in->dims.num_experts;
    size_t nX = (size_t)T * in->dims.d_model;
    c->expert = xalloc(nA * sizeof(int32_t));
    c->weight = xalloc(nA * sizeof(float));
    c->slot = (in->info.flags & MOE_ROUTER_OWNS_CAPACITY) ? xalloc(nA * sizeof(int32_t)) : NULL;
    c->route_logits = (in->info.flags & MOE_ROUTER_PERTURBS_LOGITS) ? xalloc(nL * sizeof(float)) : NULL;
    c->dweight = calloc(nA ? nA : 1, sizeof(float));
    c->d_route_logits = calloc(nL ? nL : 1, sizeof(float));
    c->dlogits = calloc(nL ? nL : 1, sizeof(float));
    c->dx = calloc(nX ? nX : 1, sizeof(float));
    c->saved = in->info.saved_bytes ? xalloc(in->info.saved_bytes) : NULL;
    int ok = c->expert && c->weight && c->dweight && c->d_route_logits && c->dlogits && c->dx;
    ok = ok && (!in->info.saved_bytes || c->saved);
    ok = ok && (!(in->info.flags & MOE_ROUTER_OWNS_CAPACITY) || c->slot);
    ok = ok && (!(in->info.flags & MOE_ROUTER_PERTURBS_LOGITS) || c->route_logits);
    for (int i = 0; i < in->info.n_params; ++i) {
        c->param_grads[i] = calloc(in->param_n[i], sizeof(float));
        ok = ok && c->param_grads[i];
    }
    for (int i = 0; i < in->info.n_buffers; ++i) {
        c->buffers[i] = malloc(in->buffer_n[i] * sizeof(float));
        if (c->buffers[i]) memcpy(c->buffers[i], in->buffers[i], in->buffer_n[i] * sizeof(float));
        ok = ok && c->buffers[i];
    }
    if (ok) {
        fill_words(c->expert, nA * sizeof(int32_t), (uint32_t)CF_POISON_INDEX);
        fill_words(c->weight, nA * sizeof(float), CF_POISON_BITS);
        if (c->slot) fill_words(c->slot, nA * sizeof(int32_t), (uint32_t)CF_POISON_INDEX);
        if (c->route_logits) fill_words(c->route_logits, nL * sizeof(float), CF_POISON_BITS);
        /* Undefined before the first forward: a backward must read only what its forward wrote. */
        if (c->saved) fill_words(c->saved, in->info.saved_bytes - in->info.saved_bytes % 4, CF_POISON_BITS);
    }
    return ok ? 0 : -1;
}

void cf_call_free(cf_call *c, const cf_instance *in) {
    (void)in;
    free(c->expert);
    free(c->weight);
    free(c->slot);
    free(c->route_logits);
    free(c->dweight);
    free(c->d_route_logits);
    free(c->dlogits);
    free(c->dx);
    free(c->saved);
    for (int i = 0; i < MOE_MAX_PLUGIN_TENSORS; ++i) {
        free(c->param_grads[i]);
        free(c->buffers[i]);
    }
    memset(c, 0, sizeof *c);
}

void cf_call_reset_buffers(cf_call *c, const cf_instance *in, float *const *from) {
    for (int i = 0; i < in->info.n_buffers; ++i)
        memcpy(c->buffers[i], from ? from[i] : in->buffers[i], in->buffer_n[i] * sizeof(float));
}

/* One device array of a call, with its guard zone. */
typedef struct gbuf {
    char name[64];
    int viol;        /* what a guard hit is (CF_VIOL_*) */
    void *p;         /* device memory: n bytes + guard */
    size_t n;
    const void *src; /* host contents it started from, or NULL */
    int readonly;    /* must still equal src after the call */
    void *dst;       /* host array the result goes to, or NULL */
} gbuf;

#define MAX_GBUF 48

typedef struct arena {
    const cf_device *dev;
    gbuf b[MAX_GBUF];
    int n;
    int failed;
    char why[CF_WHY_CAP];
} arena;

/* Allocate n bytes + guard; start from src, or fill with `word`. */
static void *arena_add(arena *a, const char *name, int viol, size_t n, const void *src, uint32_t word,
                       int readonly, void *dst) {
    if (a->failed) return NULL;
    if (a->n == MAX_GBUF) {
        a->failed = 1;
        snprintf(a->why, sizeof a->why, "internal: too many arrays in one call");
        return NULL;
    }
    gbuf *g = &a->b[a->n];
    memset(g, 0, sizeof *g);
    snprintf(g->name, sizeof g->name, "%s", name);
    g->viol = viol;
    g->n = n;
    g->src = src;
    g->readonly = readonly;
    g->dst = dst;
    g->p = a->dev->alloc(n + CF_GUARD_BYTES);
    unsigned char *host = malloc(n + CF_GUARD_BYTES);
    if (!g->p || !host) {
        free(host);
        if (g->p) a->dev->release(g->p);
        a->failed = 1;
        snprintf(a->why, sizeof a->why, "out of %s memory for %s (%zu bytes)", a->dev->name, name, n);
        return NULL;
    }
    if (src) {
        memcpy(host, src, n);
    } else if (viol == CF_VIOL_WORKSPACE) {
        memset(host, (int)(word & 0xFFu), n);
    } else {
        fill_words(host, n - n % 4, word);
        memset(host + n - n % 4, 0, n % 4);
    }
    memset(host + n, CF_GUARD_BYTE, CF_GUARD_BYTES);
    if (a->dev->h2d(g->p, host, n + CF_GUARD_BYTES) != 0) {
        a->failed = 1;
        snprintf(a->why, sizeof a->why, "copy of %s to the %s failed", name, a->dev->name);
    }
    free(host);
    a->n++;
    return g->p;
}

static void violate(cf_call *c, int kind, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void violate(cf_call *c, int kind, const char *fmt, ...) {
    if (c->viol) return;
    c->viol = kind;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->violation, sizeof c->violation, fmt, ap);
    va_end(ap);
}

/* After the call: guards first (the workspace before the rest), then the
 * read-only inputs, then copy the results back. Frees the arena. */
static void arena_finish(arena *a, cf_call *c, const char *call) {
    for (int pass = 0; pass < 2; ++pass)
        for (int i = 0; i < a->n; ++i) {
            gbuf *g = &a->b[i];
            if ((pass == 0) != (g->viol == CF_VIOL_WORKSPACE)) continue;
            unsigned char guard[CF_GUARD_BYTES];
            if (a->dev->d2h(guard, (char *)g->p + g->n, CF_GUARD_BYTES) != 0) {
                violate(c, CF_VIOL_DEVICE, "copy of %s from the %s failed after %s", g->name, a->dev->name, call);
                continue;
            }
            for (int k = 0; k < CF_GUARD_BYTES; ++k)
                if (guard[k] != CF_GUARD_BYTE) {
                    if (g->viol == CF_VIOL_WORKSPACE)
                        violate(c, CF_VIOL_WORKSPACE,
                                "wrote past its workspace in %s: it declared workspace_bytes = %zu and byte %d "
                                "after the end was changed (declare all the scratch you use in query())",
                                call, g->n, k);
                    else
                        violate(c, g->viol, "wrote past %s in %s (%zu bytes; byte %d after the end was changed)",
                                g->name, call, g->n, k);
                    break;
                }
        }
    for (int i = 0; i < a->n; ++i) {
        gbuf *g = &a->b[i];
        if (!g->readonly && !g->dst) continue;
        void *host = malloc(g->n ? g->n : 1);
        if (!host || a->dev->d2h(host, g->p, g->n) != 0) {
            violate(c, CF_VIOL_DEVICE, "copy of %s from the %s failed after %s", g->name, a->dev->name, call);
            free(host);
            continue;
        }
        if (g->readonly && g->src && memcmp(host, g->src, g->n) != 0)
            violate(c, CF_VIOL_INPUT, "modified %s, which %s must only read", g->name, call);
        if (g->dst) memcpy(g->dst, host, g->n);
        free(host);
    }
    for (int i = 0; i < a->n; ++i) a->dev->release(a->b[i].p);
    a->n = 0;
}

static void call_context(const cf_instance *in, cf_call *c, moe_context *ctx, void *workspace) {
    memset(ctx, 0, sizeof *ctx);
    ctx->struct_size = sizeof *ctx;
    ctx->device = in->dev->kind;
    ctx->device_ordinal = 0;
    ctx->stream = in->dev->stream;
    ctx->workspace = workspace;
    ctx->workspace_bytes = in->info.workspace_bytes;
    ctx->rng = c->key;
    ctx->training = c->training;
    ctx->rank = 0;
    ctx->world_size = 1;
    memset(c->msg, 0, sizeof c->msg);
    ctx->msg = c->msg;
    ctx->msg_cap = sizeof c->msg;
}

/* Inputs both calls read: logits, x, token ids, params; buffers (writable
 * in training forward and in backward, read-only in evaluation forward). */
static void add_common(arena *a, const cf_instance *in, cf_call *c, float **params, float **buffers,
                       int buffers_readonly) {
    size_t T = (size_t)c->T, E = (size_t)in->dims.num_experts, d = (size_t)in->dims.d_model;
    char name[64];
    arena_add(a, "the logits", CF_VIOL_OUTPUT, T * E * sizeof(float), c->logits, 0, 1, NULL);
    arena_add(a, "x", CF_VIOL_OUTPUT, T * d * sizeof(float), c->x, 0, 1, NULL);
    arena_add(a, "token_ids", CF_VIOL_OUTPUT, T * sizeof(int32_t), c->ids, 0, 1, NULL);
    for (int i = 0; i < MOE_MAX_PLUGIN_TENSORS; ++i) params[i] = buffers[i] = NULL;
    for (int i = 0; i < in->info.n_params; ++i) {
        snprintf(name, sizeof name, "param '%.32s'", in->info.params[i].name);
        params[i] = arena_add(a, name, CF_VIOL_TENSOR, in->param_n[i] * sizeof(float), in->params[i], 0, 1, NULL);
    }
    for (int i = 0; i < in->info.n_buffers; ++i) {
        snprintf(name, sizeof name, "buffer '%.32s'", in->info.buffers[i].name);
        buffers[i] = arena_add(a, name, CF_VIOL_TENSOR, in->buffer_n[i] * sizeof(float), c->buffers[i], 0,
                               buffers_readonly, c->buffers[i]);
    }
}

static moe_status run_call(arena *a, cf_call *c, const char *call, moe_status st) {
    char why[CF_WHY_CAP];
    if (a->dev->sync(a->dev->stream, why, sizeof why) != 0)
        violate(c, CF_VIOL_DEVICE, "the %s reported an error after %s: %s", a->dev->name, call, why);
    arena_finish(a, c, call);
    c->st = st;
    return st;
}

moe_status cf_forward(const cf_instance *in, cf_call *c) {
    arena a;
    memset(&a, 0, sizeof a);
    a.dev = in->dev;
    c->viol = CF_VIOL_NONE;
    c->violation[0] = '\0';
    size_t T = (size_t)c->T, E = (size_t)in->dims.num_experts, Ko = (size_t)in->info.k_out;
    uint32_t flags = in->info.flags;
    float *params[MOE_MAX_PLUGIN_TENSORS], *buffers[MOE_MAX_PLUGIN_TENSORS];
    void *ws = arena_add(&a, "the workspace", CF_VIOL_WORKSPACE, in->info.workspace_bytes, NULL, c->ws_fill, 0, NULL);
    add_common(&a, in, c, params, buffers, !c->training);
    moe_router_fwd_args f;
    memset(&f, 0, sizeof f);
    f.struct_size = sizeof f;
    f.T = c->T;
    f.E = in->dims.num_experts;
    f.k_out = in->info.k_out;
    f.capacity = c->capacity;
    f.d_model = in->dims.d_model;
    f.logits = a.b[1].p;
    f.x = a.b[2].p;
    f.token_ids = a.b[3].p;
    f.params = params;
    f.buffers = buffers;
    f.expert = arena_add(&a, "expert[T,k_out]", CF_VIOL_OUTPUT, T * Ko * sizeof(int32_t), c->expert, 0, 0, c->expert);
    f.weight = arena_add(&a, "weight[T,k_out]", CF_VIOL_OUTPUT, T * Ko * sizeof(float), c->weight, 0, 0, c->weight);
    if (flags & MOE_ROUTER_OWNS_CAPACITY)
        f.slot = arena_add(&a, "slot[T,k_out]", CF_VIOL_OUTPUT, T * Ko * sizeof(int32_t), c->slot, 0, 0, c->slot);
    if (flags & MOE_ROUTER_PERTURBS_LOGITS)
        f.route_logits = arena_add(&a, "route_logits[T,E]", CF_VIOL_OUTPUT, T * E * sizeof(float), c->route_logits, 0,
                                   0, c->route_logits);
    /* The saved buffer goes from the forward to the backward through c->saved; an
     * older host's arguments end before the field. */
    if (c->older_host)
        f.struct_size = (uint32_t)offsetof(moe_router_fwd_args, saved);
    else if (c->saved)
        f.saved = arena_add(&a, "the saved buffer", CF_VIOL_OUTPUT, in->info.saved_bytes, c->saved, 0, 0, c->saved);
    if (a.failed) {
        violate(c, CF_VIOL_DEVICE, "%s", a.why);
        arena_finish(&a, c, "forward");
        return c->st = MOE_ERR_NO_MEMORY;
    }
    moe_context ctx;
    call_context(in, c, &ctx, ws);
    moe_status st = in->impl->forward(in->state, &ctx, &f);
    return run_call(&a, c, "forward", st);
}

moe_status cf_backward(const cf_instance *in, cf_call *c) {
    arena a;
    memset(&a, 0, sizeof a);
    a.dev = in->dev;
    c->viol = CF_VIOL_NONE;
    c->violation[0] = '\0';
    size_t T = (size_t)c->T, E = (size_t)in->dims.num_experts, Ko = (size_t)in->info.k_out;
    size_t d = (size_t)in->dims.d_model;
    uint32_t flags = in->info.flags;
    float *params[MOE_MAX_PLUGIN_TENSORS], *buffers[MOE_MAX_PLUGIN_TENSORS], *grads[MOE_MAX_PLUGIN_TENSORS];
    void *ws = arena_add(&a, "the workspace", CF_VIOL_WORKSPACE, in->info.workspace_bytes, NULL, c->ws_fill, 0, NULL);
    add_common(&a, in, c, params, buffers, 0);
    moe_router_bwd_args b;
    memset(&b, 0, sizeof b);
    b.struct_size = sizeof b;
    b.T = c->T;
    b.E = in->dims.num_experts;
    b.k_out = in->info.k_out;
    b.capacity = c->capacity;
    b.d_model = in->dims.d_model;
    b.logits = a.b[1].p;
    b.x = a.b[2].p;
    b.token_ids = a.b[3].p;
    b.params = params;
    b.buffers = buffers;
    b.expert = arena_add(&a, "expert (a backward input)", CF_VIOL_OUTPUT, T * Ko * sizeof(int32_t), c->expert, 0, 1,
                         NULL);
    b.weight = arena_add(&a, "weight (a backward input)", CF_VIOL_OUTPUT, T * Ko * sizeof(float), c->weight, 0, 1, NULL);
    if (flags & MOE_ROUTER_OWNS_CAPACITY)
        b.slot = arena_add(&a, "slot (a backward input)", CF_VIOL_OUTPUT, T * Ko * sizeof(int32_t), c->slot, 0, 1, NULL);
    if (flags & MOE_ROUTER_PERTURBS_LOGITS) {
        b.route_logits = arena_add(&a, "route_logits (a backward input)", CF_VIOL_OUTPUT, T * E * sizeof(float),
                                   c->route_logits, 0, 1, NULL);
        b.d_route_logits = arena_add(&a, "d_route_logits", CF_VIOL_OUTPUT, T * E * sizeof(float), c->d_route_logits,
                                     0, 1, NULL);
    }
    b.dweight = arena_add(&a, "dweight", CF_VIOL_OUTPUT, T * Ko * sizeof(float), c->dweight, 0, 1, NULL);
    /* dlogits is overwritten: start it as NaN so an entry left alone shows. */
    b.dlogits = arena_add(&a, "dlogits[T,E]", CF_VIOL_OUTPUT, T * E * sizeof(float), NULL, CF_POISON_BITS, 0, c->dlogits);
    b.dx = arena_add(&a, "dx[T,d_model]", CF_VIOL_OUTPUT, T * d * sizeof(float), c->dx, 0, 0, c->dx);
    for (int i = 0; i < MOE_MAX_PLUGIN_TENSORS; ++i) grads[i] = NULL;
    for (int i = 0; i < in->info.n_params; ++i) {
        char name[64];
        snprintf(name, sizeof name, "the gradient of param '%.32s'", in->info.params[i].name);
        grads[i] = arena_add(&a, name, CF_VIOL_TENSOR, in->param_n[i] * sizeof(float), c->param_grads[i], 0, 0,
                             c->param_grads[i]);
    }
    b.param_grads = grads;
    if (c->older_host)
        b.struct_size = (uint32_t)offsetof(moe_router_bwd_args, saved);
    else if (c->saved)
        b.saved = arena_add(&a, "the saved buffer", CF_VIOL_OUTPUT, in->info.saved_bytes, c->saved, 0, 0, c->saved);
    if (a.failed) {
        violate(c, CF_VIOL_DEVICE, "%s", a.why);
        arena_finish(&a, c, "backward");
        return c->st = MOE_ERR_NO_MEMORY;
    }
    moe_context ctx;
    call_context(in, c, &ctx, ws);
    moe_status st = in->impl->backward(in->state, &ctx, &b);
    return run_call(&a, c, "backward", st);
}
