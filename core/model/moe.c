/*
 * One MoE feed-forward layer, forward then backward, as in design.md:
 *
 *   x[T,d] --gate--> logits[T,E]
 *          --router plugin--> expert[T,Ko], weight[T,Ko] (+ slot if it owns capacity)
 *          --capacity--> kept[T,Ko], slot[T,Ko]   C = ceil(CF * T * K / E)
 *          --combine weights (renorm_after_drop)--> cw[T,Ko]
 *          --dispatch--> Xe[E,C,d]
 *          --experts--> H = Xe w1 + b1, A = act(H), Ye = A w2 + b2
 *          --combine--> y[t] = sum_k cw[t,k] * Ye[kept[t,k], slot[t,k]]
 *   plus the load-balancing loss alpha * E * sum_e f_e P_e and the z-loss
 *   beta * mean(logsumexp(l)^2), whose gradients reach the gate.
 *
 * Every numerical step is a backend op, so this file is the same for the
 * CPU and CUDA backends. Nothing here waits for the device in a training
 * step: counts, auxiliary losses and the checks of the plugin's output stay
 * in backend memory until the model reads them, once per step. Routing
 * statistics (evaluation) are computed on host copies when asked for.
 */
#include "model/moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MSG_CAP 1024

/* A guard zone after the router's workspace, filled with a pattern and
 * checked after every router call: a plugin writing past the workspace it
 * declared is named instead of silently corrupting memory. */
#define WORKSPACE_GUARD_BYTES 256
#define WORKSPACE_GUARD_BYTE 0xA5

static int gate_hidden(const moe_layer_cfg *c) { return c->gate_hidden > 0 ? c->gate_hidden : c->d_model; }
static int expert_in_width(const moe_layer_cfg *c) { return c->activation == MOE_ACT_SWIGLU ? 2 * c->d_ff : c->d_ff; }

/* C = ceil(CF * T * K / E), at least 1 so every expert can take a token,
 * and at most T: an expert never gets more than one assignment per token,
 * so a larger C would only allocate rows that stay empty. */
static int capacity_for(const moe_layer *L, int T) {
    double c = ceil(L->cfg.capacity_factor * (double)T * L->K_cap / L->cfg.num_experts);
    if (c > (double)T) c = (double)T;
    return c < 1.0 ? 1 : (int)c;
}

static void declare(moe_param_set *ps, const char *layer_prefix, const char *name, int ndim, int64_t a,
                    int64_t b, int64_t c, moe_init_kind init, float v, int decay, float **p, float **g) {
    char full[80];
    int64_t shape[3] = {a, b, c};
    snprintf(full, sizeof full, "%s.%s", layer_prefix, name);
    moe_params_declare(ps, full, ndim, shape, init, v, decay, p, g);
}

int moe_layer_create(moe_layer *L, const moe_layer_cfg *cfg, moe_backend *be,
                     const moe_router_plugin_v1_t *router, const moe_option *opts, int n_opts,
                     moe_param_set *params, moe_param_set *buffers, char *err, size_t errcap) {
    memset(L, 0, sizeof *L);
    L->cfg = *cfg;
    L->be = be;
    L->router = router;
    L->msg = calloc(MSG_CAP, 1);
    L->router_impl = be->device == MOE_DEVICE_CUDA ? router->cuda : router->cpu;
    if (!L->router_impl) {
        snprintf(err, errcap, "router '%s' has no %s implementation; choose run.device = \"%s\" or another router",
                 router->name, be->name, be->device == MOE_DEVICE_CUDA ? "cpu" : "cuda");
        return -1;
    }

    moe_router_dims dims;
    memset(&dims, 0, sizeof dims);
    dims.struct_size = sizeof dims;
    dims.num_experts = cfg->num_experts;
    dims.top_k = cfg->top_k;
    dims.d_model = cfg->d_model;
    dims.vocab_size = cfg->vocab_size;
    dims.max_tokens = cfg->max_tokens;
    dims.layer = cfg->layer;
    dims.capacity_factor = cfg->capacity_factor;
    if (router->create(&dims, opts, n_opts, &L->router_state, L->msg, MSG_CAP) != MOE_OK) {
        snprintf(err, errcap, "router '%s' refused its configuration: %s", router->name, L->msg);
        return -1;
    }
    memset(&L->rinfo, 0, sizeof L->rinfo);
    L->rinfo.struct_size = sizeof L->rinfo;
    if (router->query(L->router_state, &L->rinfo) != MOE_OK) {
        snprintf(err, errcap, "router '%s': query failed: %s", router->name, L->msg);
        return -1;
    }
    /* A plugin built before saved_bytes was appended declares no saved buffer. */
    if (L->rinfo.struct_size < offsetof(moe_router_info, saved_bytes) + sizeof L->rinfo.saved_bytes)
        L->rinfo.saved_bytes = 0;
    if (L->rinfo.k_out < 1 || L->rinfo.k_out > 4096 || L->rinfo.n_params < 0 ||
        L->rinfo.n_params > MOE_MAX_PLUGIN_TENSORS || L->rinfo.n_buffers < 0 ||
        L->rinfo.n_buffers > MOE_MAX_PLUGIN_TENSORS) {
        snprintf(err, errcap, "router '%s' reported an invalid info (k_out %d, %d params, %d buffers)",
                 router->name, L->rinfo.k_out, L->rinfo.n_params, L->rinfo.n_buffers);
        return -1;
    }
    /* K in the capacity formula: experts per token. Routers that fill more
     * entries than top_k (expert choice lists up to E) still size capacity
     * by top_k. */
    L->K_cap = L->rinfo.k_out < cfg->top_k ? L->rinfo.k_out : cfg->top_k;

    char prefix[32];
    snprintf(prefix, sizeof prefix, "layer%d.moe", cfg->layer);
    int d = cfg->d_model, E = cfg->num_experts, gh = gate_hidden(cfg), hin = expert_in_width(cfg);
    float s = cfg->init_std;
    switch (cfg->gate) {
    case MOE_GATE_LINEAR:
        declare(params, prefix, "gate.w", 2, d, E, 0, MOE_INIT_NORMAL, s, 1, &L->wg, &L->dwg);
        break;
    case MOE_GATE_MLP:
        declare(params, prefix, "gate.w1", 2, d, gh, 0, MOE_INIT_NORMAL, s, 1, &L->g1, &L->dg1);
        declare(params, prefix, "gate.b1", 1, gh, 0, 0, MOE_INIT_ZEROS, 0, 0, &L->g1b, &L->dg1b);
        declare(params, prefix, "gate.w2", 2, gh, E, 0, MOE_INIT_NORMAL, s, 1, &L->wg, &L->dwg);
        break;
    case MOE_GATE_MLP_HADAMARD:
        declare(params, prefix, "gate.wa", 2, d, gh, 0, MOE_INIT_NORMAL, s, 1, &L->g1, &L->dg1);
        declare(params, prefix, "gate.wb", 2, d, gh, 0, MOE_INIT_NORMAL, s, 1, &L->g2, &L->dg2);
        declare(params, prefix, "gate.wo", 2, gh, E, 0, MOE_INIT_NORMAL, s, 1, &L->wg, &L->dwg);
        break;
    }
    declare(params, prefix, "experts.w1", 3, E, d, hin, MOE_INIT_NORMAL, s, 1, &L->w1, &L->dw1);
    declare(params, prefix, "experts.w2", 3, E, cfg->d_ff, d, MOE_INIT_NORMAL, s, 1, &L->w2, &L->dw2);
    if (cfg->expert_bias) {
        declare(params, prefix, "experts.b1", 2, E, hin, 0, MOE_INIT_ZEROS, 0, 0, &L->b1, &L->db1);
        declare(params, prefix, "experts.b2", 2, E, d, 0, MOE_INIT_ZEROS, 0, 0, &L->b2, &L->db2);
    }
    for (int i = 0; i < L->rinfo.n_params; ++i) {
        const moe_tensor_spec *sp = &L->rinfo.params[i];
        char name[80];
        snprintf(name, sizeof name, "%s.router.%s", prefix, sp->name);
        moe_params_declare(params, name, sp->ndim, sp->shape, sp->init, sp->init_value, sp->weight_decay,
                           &L->router_params[i], &L->router_grads[i]);
    }
    for (int i = 0; i < L->rinfo.n_buffers; ++i) {
        const moe_tensor_spec *sp = &L->rinfo.buffers[i];
        char name[80];
        snprintf(name, sizeof name, "%s.router.%s", prefix, sp->name);
        moe_params_declare(buffers, name, sp->ndim, sp->shape, sp->init, sp->init_value, 0,
                           &L->router_buffers[i], NULL);
    }
    return 0;
}

/* Allocate, and clear *ok on failure so one check covers every buffer. */
static void *alloc_tracked(moe_backend *be, size_t bytes, int *ok) {
    void *p = be->alloc(be, bytes ? bytes : 1);
    if (!p) *ok = 0;
    return p;
}

int moe_layer_alloc(moe_layer *L, char *err, size_t errcap) {
    moe_backend *be = L->be;
    const moe_layer_cfg *c = &L->cfg;
    size_t T = (size_t)c->max_tokens, E = (size_t)c->num_experts, d = (size_t)c->d_model;
    size_t Ko = (size_t)L->rinfo.k_out, gh = (size_t)gate_hidden(c), hin = (size_t)expert_in_width(c);
    size_t h = (size_t)c->d_ff;
    L->C_max = capacity_for(L, c->max_tokens);
    /* A router that owns capacity fills at most C per expert, the same bound. */
    size_t rows = E * (size_t)L->C_max;
    size_t f = sizeof(float), i32 = sizeof(int32_t);
    int ok = 1;
    L->gate_a = alloc_tracked(be, T * gh * f, &ok);
    L->gate_b = alloc_tracked(be, T * gh * f, &ok);
    L->gate_h = alloc_tracked(be, T * gh * f, &ok);
    /* l and then l' (a perturbing router's route_logits) for the call's T:
     * the host checks both with one pass after the router's forward. */
    L->logits = alloc_tracked(be, 2 * T * E * f, &ok);
    L->route_logits = L->logits ? L->logits + T * E : NULL;
    L->probs = alloc_tracked(be, T * E * f, &ok);
    L->expert = alloc_tracked(be, T * Ko * i32, &ok);
    L->slot = alloc_tracked(be, T * Ko * i32, &ok);
    L->kept = alloc_tracked(be, T * Ko * i32, &ok);
    L->weight = alloc_tracked(be, T * Ko * f, &ok);
    /* renormalised combine weights and their gradient: without
     * renorm_after_drop the router's own weights and dcw serve
     * (combine_weights_of) */
    L->cw = c->renorm_after_drop ? alloc_tracked(be, T * Ko * f, &ok) : NULL;
    L->Xe = alloc_tracked(be, rows * d * f, &ok);
    L->H = alloc_tracked(be, rows * hin * f, &ok);
    L->A = alloc_tracked(be, rows * h * f, &ok);
    L->Ye = alloc_tracked(be, rows * d * f, &ok);
    L->dlogits = alloc_tracked(be, T * E * f, &ok);
    L->router_dlogits = alloc_tracked(be, T * E * f, &ok);
    L->dweight = c->renorm_after_drop ? alloc_tracked(be, T * Ko * f, &ok) : NULL;
    L->dcw = alloc_tracked(be, T * Ko * f, &ok);
    L->dYe = alloc_tracked(be, rows * d * f, &ok);
    L->dA = alloc_tracked(be, rows * h * f, &ok);
    L->dH = alloc_tracked(be, rows * hin * f, &ok);
    L->dXe = alloc_tracked(be, rows * d * f, &ok);
    L->dgate_h = alloc_tracked(be, T * gh * f, &ok);
    L->dgate_a = alloc_tracked(be, T * gh * f, &ok);
    L->dgate_b = alloc_tracked(be, T * gh * f, &ok);
    L->router_workspace = alloc_tracked(be, L->rinfo.workspace_bytes + WORKSPACE_GUARD_BYTES, &ok);
    if (L->router_workspace) {
        unsigned char guard[WORKSPACE_GUARD_BYTES];
        memset(guard, WORKSPACE_GUARD_BYTE, sizeof guard);
        be->from_host(be, (char *)L->router_workspace + L->rinfo.workspace_bytes, guard, sizeof guard);
    }
    L->router_saved = L->rinfo.saved_bytes ? alloc_tracked(be, L->rinfo.saved_bytes, &ok) : NULL;
    L->counts = alloc_tracked(be, 2 * E * i32, &ok);
    if (!L->scalars || !L->record) {
        L->owns_results = 1;
        L->scalars = alloc_tracked(be, 2 * sizeof(double), &ok);
        L->record = alloc_tracked(be, MOE_CHECK_RECORD_WORDS * i32, &ok);
    }
    L->stats.counts_before = calloc(E, sizeof(int32_t));
    L->stats.counts_after = calloc(E, sizeof(int32_t));
    if (!ok || !L->stats.counts_before || !L->stats.counts_after) {
        snprintf(err, errcap, "out of memory allocating MoE layer %d activations (T=%zu, E=%zu, C=%d)",
                 c->layer, T, E, L->C_max);
        return -1;
    }
    return 0;
}

void moe_layer_destroy(moe_layer *L) {
    moe_backend *be = L->be;
    if (!be) return;
    float *bufs[] = {L->gate_a, L->gate_b, L->gate_h, L->logits, L->probs, L->router_dlogits, L->weight,
                     L->cw, L->Xe, L->H, L->A, L->Ye, L->dlogits, L->dweight, L->dcw, L->dYe, L->dA,
                     L->dH, L->dXe, L->dgate_h, L->dgate_a, L->dgate_b};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; ++i) be->free(be, bufs[i]);
    be->free(be, L->expert);
    be->free(be, L->slot);
    be->free(be, L->kept);
    be->free(be, L->router_workspace);
    if (L->router_saved) be->free(be, L->router_saved);
    be->free(be, L->counts);
    if (L->owns_results) {
        be->free(be, L->scalars);
        be->free(be, L->record);
    }
    if (L->router_state) L->router->destroy(L->router_state);
    free(L->stats.counts_before);
    free(L->stats.counts_after);
    free(L->msg);
    memset(L, 0, sizeof *L);
}

static moe_context router_context(moe_layer *L, int training, moe_rng_key key) {
    moe_context c;
    memset(&c, 0, sizeof c);
    c.struct_size = sizeof c;
    c.device = L->be->device;
    c.device_ordinal = L->be->device_ordinal;
    c.stream = L->be->stream;
    c.workspace = L->router_workspace;
    c.workspace_bytes = L->rinfo.workspace_bytes;
    c.rng = key;
    c.training = training;
    c.world_size = 1;
    c.msg = L->msg;
    c.msg_cap = MSG_CAP;
    /* On CUDA the host checks the plugin's inputs itself, into the layer's
     * record (read once per step), so the plugin's own checks need not wait
     * for the device in every call. Token ids are checked where the model
     * takes them from the host. */
    c.inputs_checked = L->be->device == MOE_DEVICE_CUDA;
    L->msg[0] = '\0';
    return c;
}

/* Records (without waiting) whether the guard zone after the workspace was
 * changed (after backward; the forward's check is part of check_routing's). */
static void check_workspace_guard(moe_layer *L, int32_t code) {
    L->be->check_bytes(L->be, (const char *)L->router_workspace + L->rinfo.workspace_bytes, WORKSPACE_GUARD_BYTES,
                       WORKSPACE_GUARD_BYTE, code, L->record);
}

/* ---- gate network: logits = gate(x) ---- */

static void gate_forward(moe_layer *L, const float *x, int T) {
    moe_backend *be = L->be;
    int d = L->cfg.d_model, E = L->cfg.num_experts, gh = gate_hidden(&L->cfg);
    switch (L->cfg.gate) {
    case MOE_GATE_LINEAR:
        be->gemm(be, 0, 0, T, E, d, 1.0f, x, d, L->wg, E, 0.0f, L->logits, E);
        break;
    case MOE_GATE_MLP: /* logits = gelu(x g1 + b) wg */
        be->gemm(be, 0, 0, T, gh, d, 1.0f, x, d, L->g1, gh, 0.0f, L->gate_a, gh);
        be->add_bias(be, L->gate_a, L->g1b, T, gh);
        be->act_fwd(be, MOE_ACT_GELU, L->gate_a, L->gate_h, T, gh);
        be->gemm(be, 0, 0, T, E, gh, 1.0f, L->gate_h, gh, L->wg, E, 0.0f, L->logits, E);
        break;
    case MOE_GATE_MLP_HADAMARD: /* logits = ((x wa) * (x wb)) wo */
        be->gemm(be, 0, 0, T, gh, d, 1.0f, x, d, L->g1, gh, 0.0f, L->gate_a, gh);
        be->gemm(be, 0, 0, T, gh, d, 1.0f, x, d, L->g2, gh, 0.0f, L->gate_b, gh);
        be->mul(be, L->gate_a, L->gate_b, L->gate_h, (size_t)T * gh);
        be->gemm(be, 0, 0, T, E, gh, 1.0f, L->gate_h, gh, L->wg, E, 0.0f, L->logits, E);
        break;
    }
}

/* dx += d gate / dx . dlogits; parameter grads accumulate. */
static void gate_backward(moe_layer *L, const float *x, float *dx, int T) {
    moe_backend *be = L->be;
    int d = L->cfg.d_model, E = L->cfg.num_experts, gh = gate_hidden(&L->cfg);
    switch (L->cfg.gate) {
    case MOE_GATE_LINEAR:
        be->gemm(be, 1, 0, d, E, T, 1.0f, x, d, L->dlogits, E, 1.0f, L->dwg, E);
        be->gemm(be, 0, 1, T, d, E, 1.0f, L->dlogits, E, L->wg, E, 1.0f, dx, d);
        break;
    case MOE_GATE_MLP:
        be->gemm(be, 1, 0, gh, E, T, 1.0f, L->gate_h, gh, L->dlogits, E, 1.0f, L->dwg, E);
        be->gemm(be, 0, 1, T, gh, E, 1.0f, L->dlogits, E, L->wg, E, 0.0f, L->dgate_h, gh);
        be->act_bwd(be, MOE_ACT_GELU, L->gate_a, L->dgate_h, L->dgate_a, T, gh);
        be->bias_grad(be, L->dgate_a, L->dg1b, T, gh);
        be->gemm(be, 1, 0, d, gh, T, 1.0f, x, d, L->dgate_a, gh, 1.0f, L->dg1, gh);
        be->gemm(be, 0, 1, T, d, gh, 1.0f, L->dgate_a, gh, L->g1, gh, 1.0f, dx, d);
        break;
    case MOE_GATE_MLP_HADAMARD:
        be->gemm(be, 1, 0, gh, E, T, 1.0f, L->gate_h, gh, L->dlogits, E, 1.0f, L->dwg, E);
        be->gemm(be, 0, 1, T, gh, E, 1.0f, L->dlogits, E, L->wg, E, 0.0f, L->dgate_h, gh);
        be->mul(be, L->dgate_h, L->gate_b, L->dgate_a, (size_t)T * gh); /* d(a*b)/da = b */
        be->mul(be, L->dgate_h, L->gate_a, L->dgate_b, (size_t)T * gh); /* d(a*b)/db = a */
        be->gemm(be, 1, 0, d, gh, T, 1.0f, x, d, L->dgate_a, gh, 1.0f, L->dg1, gh);
        be->gemm(be, 1, 0, d, gh, T, 1.0f, x, d, L->dgate_b, gh, 1.0f, L->dg2, gh);
        be->gemm(be, 0, 1, T, d, gh, 1.0f, L->dgate_a, gh, L->g1, gh, 1.0f, dx, d);
        be->gemm(be, 0, 1, T, d, gh, 1.0f, L->dgate_b, gh, L->g2, gh, 1.0f, dx, d);
        break;
    }
}

/* ---- checks on what the plugin returned: a broken plugin must give an
 * error, never an out-of-bounds write in dispatch. The backend's
 * check_routing / check_bytes fill L->record; the messages are made here. */

int moe_layer_record_message(const moe_layer *L, const int32_t *r, char *err, size_t errcap) {
    const char *name = L->router->name;
    switch (r[0]) {
    case 0: return 0;
    case MOE_CHECK_EXPERT:
        snprintf(err, errcap, "router '%s' returned expert[%d,%d] = %d, outside [-1, %d)", name, r[1], r[2], r[3],
                 r[4]);
        break;
    case MOE_CHECK_WEIGHT: {
        float w;
        memcpy(&w, &r[3], sizeof w);
        snprintf(err, errcap, "router '%s' returned weight[%d,%d] = %g; weights must be finite and >= 0", name, r[1],
                 r[2], w);
        break;
    }
    case MOE_CHECK_SLOT:
        snprintf(err, errcap, "router '%s' returned slot[%d,%d] = %d, outside its capacity [0, %d)", name, r[1], r[2],
                 r[3], r[4]);
        break;
    case MOE_CHECK_SLOT_TWICE:
        snprintf(err, errcap, "router '%s' gave two tokens slot %d of expert %d", name, r[3], r[4]);
        break;
    case MOE_CHECK_SLOT_GAP:
        snprintf(err, errcap,
                 "router '%s' (layer %d) declares MOE_ROUTER_DENSE_SLOTS, but expert %d's %d assignments leave its "
                 "slot %d empty (they must fill slots 0 .. %d): a plugin whose slots can have gaps must not set "
                 "MOE_ROUTER_DENSE_SLOTS",
                 name, L->cfg.layer, r[4], r[5], r[3], r[5] - 1);
        break;
    case MOE_CHECK_LOGIT:
    case MOE_CHECK_ROUTE_LOGIT: {
        float v;
        memcpy(&v, &r[3], sizeof v);
        const int E = L->cfg.num_experts;
        /* l and l' checked together: the first half of the r[4] values checked is l. */
        const int32_t n_logits = r[0] == MOE_CHECK_LOGIT ? r[1] + 1 : r[4] / 2;
        const int in_logits = r[1] < n_logits;
        const int32_t i = in_logits ? r[1] : r[1] - n_logits;
        snprintf(err, errcap, "router '%s' (layer %d) forward failed: %s of token %d, expert %d is %g; %s", name,
                 L->cfg.layer, in_logits ? "logit" : "perturbed logit", i / E, i % E, (double)v,
                 in_logits ? "the gate produced a non-finite value (lower train.lr or check the data)"
                           : "the router's perturbation produced a non-finite value");
        break;
    }
    case MOE_CHECK_GUARD_FORWARD:
    case MOE_CHECK_GUARD_BACKWARD:
        snprintf(err, errcap,
                 "router '%s' wrote past its workspace in %s (it declared %zu bytes; byte %d after the end was "
                 "changed): the plugin must declare all the scratch it uses in query()",
                 name, r[0] == MOE_CHECK_GUARD_FORWARD ? "forward" : "backward", L->rinfo.workspace_bytes, r[1]);
        break;
    default:
        snprintf(err, errcap, "router '%s' (layer %d): check record with unknown code %d", name, L->cfg.layer, r[0]);
        break;
    }
    return -1;
}

int moe_layer_check(moe_layer *L, char *err, size_t errcap) {
    int32_t r[MOE_CHECK_RECORD_WORDS];
    L->be->to_host(L->be, r, L->record, sizeof r);
    if (moe_layer_record_message(L, r, err, errcap) == 0) return 0;
    L->be->zero(L->be, L->record, sizeof r);
    return -1;
}

int moe_layer_weight_views(const moe_layer *L, const float *params, moe_weight_view *out) {
    const moe_layer_cfg *c = &L->cfg;
    const int E = c->num_experts, d = c->d_model, hin = expert_in_width(c), n = c->d_ff;
    int k = 0;
    out[k++] = (moe_weight_view){L->w1 - params, E, d, hin, 0};
    out[k++] = (moe_weight_view){L->w2 - params, E, n, d, 0};
    if (c->expert_bias) out[k++] = (moe_weight_view){L->b1 - params, E, 1, hin, 0}; /* the GELU epilogue's bias */
    return k;
}

void moe_layer_expert_weight_grads(const moe_layer *L, float *dw[2], size_t len[2]) {
    const moe_layer_cfg *c = &L->cfg;
    dw[0] = L->dw1;
    dw[1] = L->dw2;
    len[0] = (size_t)c->num_experts * c->d_model * expert_in_width(c);
    len[1] = (size_t)c->num_experts * c->d_ff * c->d_model;
}

moe_activation_view moe_layer_activation_view(const moe_layer *L, int T) {
    const moe_layer_cfg *c = &L->cfg;
    return (moe_activation_view){L->Xe, (int64_t)c->num_experts * capacity_for(L, T), c->d_model};
}

/* On the CPU the record is host memory and every op has finished: report at
 * once, as before, so no bad index reaches the CPU's capacity loop. */
static int check_now(moe_layer *L, char *err, size_t errcap) {
    return L->be->device == MOE_DEVICE_CPU ? moe_layer_check(L, err, errcap) : 0;
}

/* ---- statistics of this routing step, from host copies ---- */

static void routing_stats(moe_layer *L, const float *logits, const int32_t *expert, const int32_t *kept,
                          const float *cw, int T) {
    moe_layer_stats *s = &L->stats;
    int E = L->cfg.num_experts, Ko = L->rinfo.k_out;
    float *p = malloc((size_t)E * sizeof *p);
    s->T = T;
    s->C = L->C;
    s->K = L->K_cap;
    s->assigned = s->dropped = s->tokens_dropped = s->combine_tokens = 0;
    s->router_entropy = s->combine_entropy = s->topk_prob = 0.0;
    for (int t = 0; t < T; ++t) {
        moe_softmax_row(logits + (size_t)t * E, p, E, 1.0f);
        double H = 0.0, mass = 0.0, wsum = 0.0;
        for (int e = 0; e < E; ++e)
            if (p[e] > 0.0f) H -= (double)p[e] * log((double)p[e]);
        s->router_entropy += H;
        int any_kept = 0;
        for (int k = 0; k < Ko; ++k) {
            size_t a = (size_t)t * Ko + k;
            if (expert[a] < 0) continue;
            s->assigned++;
            mass += p[expert[a]];
            if (kept[a] < 0) s->dropped++;
            else {
                any_kept = 1;
                wsum += cw[a];
            }
        }
        s->topk_prob += mass;
        if (!any_kept) {
            s->tokens_dropped++;
            continue;
        }
        if (wsum > 0.0) {
            double Hc = 0.0;
            for (int k = 0; k < Ko; ++k) {
                size_t a = (size_t)t * Ko + k;
                double q = kept[a] >= 0 ? cw[a] / wsum : 0.0;
                if (q > 0.0) Hc -= q * log(q);
            }
            s->combine_entropy += Hc;
            s->combine_tokens++;
        }
    }
    free(p);
}

/* Whether the router that owns capacity promises dense slots (router.h);
 * check_routing verifies it in every forward. */
static int dense_slots(const moe_layer *L) {
    const uint32_t both = MOE_ROUTER_OWNS_CAPACITY | MOE_ROUTER_DENSE_SLOTS;
    return (L->rinfo.flags & both) == both;
}

/* The kept slots of each expert are 0 .. counts_after[e]-1 when the host's
 * capacity step assigned them (in priority order, the next free slot), or
 * when a router that owns capacity declares MOE_ROUTER_DENSE_SLOTS: the
 * hint dispatch and combine_bwd take (backend.h). Another router that owns
 * capacity chooses its slots freely: no hint. (A router that breaks its
 * promise leaves an empty row that is not zeroed: the step's results are
 * then wrong, but check_routing has recorded the error, which stops the
 * run at the end of the step.) */
static const int32_t *fill_counts(const moe_layer *L) {
    return (L->rinfo.flags & MOE_ROUTER_OWNS_CAPACITY) && !dense_slots(L) ? NULL : L->counts + L->cfg.num_experts;
}

/* The combine weights: renormalised over the kept assignments when
 * [moe].renorm_after_drop asks for it (L->cw), else the router's weights
 * themselves. Every reader of the combine weights (combine, combine_bwd,
 * the statistics) reads only kept assignments', where the two agree, so
 * without renormalisation there is no pass to make them, and in backward
 * combine_bwd's dcw (0 for every assignment not kept) is already the
 * router's dweight. */
static const float *combine_weights_of(const moe_layer *L) {
    return L->cfg.renorm_after_drop ? L->cw : L->weight;
}

/* ================================ forward ================================ */

int moe_layer_forward(moe_layer *L, const float *x, const int32_t *token_ids, int T, int training,
                      moe_rng_key key, const float *residual, float *y, double *aux_total, char *err,
                      size_t errcap) {
    moe_backend *be = L->be;
    const moe_layer_cfg *c = &L->cfg;
    int d = c->d_model, E = c->num_experts, Ko = L->rinfo.k_out, h = c->d_ff;
    int owns_capacity = (L->rinfo.flags & MOE_ROUTER_OWNS_CAPACITY) != 0;
    int perturbs = (L->rinfo.flags & MOE_ROUTER_PERTURBS_LOGITS) != 0;
    if (T < 0 || T > c->max_tokens) {
        snprintf(err, errcap, "MoE layer %d: %d tokens outside [0, %d], the size its buffers were made for", c->layer,
                 T, c->max_tokens);
        return -1;
    }
    L->x = x;
    L->T = T;
    L->training = training;
    L->C = capacity_for(L, T);
    int C = L->C;

    /* 1. gate network */
    gate_forward(L, x, T);

    /* 2. router plugin: who goes where, with which weight */
    moe_context ctx = router_context(L, training, key);
    moe_router_fwd_args fa;
    memset(&fa, 0, sizeof fa);
    fa.struct_size = sizeof fa;
    fa.T = T;
    fa.E = E;
    fa.k_out = Ko;
    fa.capacity = C;
    fa.d_model = d;
    fa.logits = L->logits;
    fa.x = x;
    fa.token_ids = token_ids;
    fa.params = L->router_params;
    fa.buffers = L->router_buffers;
    fa.expert = L->expert;
    fa.weight = L->weight;
    fa.slot = owns_capacity ? L->slot : NULL;
    /* l' right after this call's l, so that one check covers both. */
    L->route_logits = L->logits + (size_t)T * E;
    fa.route_logits = perturbs ? L->route_logits : NULL;
    fa.saved = L->router_saved;
    if (L->router_impl->forward(L->router_state, &ctx, &fa) != MOE_OK) {
        snprintf(err, errcap, "router '%s' (layer %d) forward failed: %s", L->router->name, c->layer, L->msg);
        return -1;
    }
    /* Checks of the plugin's output, recorded in L->record, in one op: the
     * guard zone after the workspace first (a plugin that overran its
     * workspace is named for that), then, when the host checks the plugin's
     * inputs (ctx.inputs_checked), the logits l, and l' after them for a
     * router that perturbs (the first bad value is in l if any is, as if l
     * had been checked before the call), then the assignments. For a router
     * that owns capacity this also writes kept = expert where expert and
     * slot are valid (-1 elsewhere), and counts them per expert (for f and
     * the stats; nothing is dropped after the router, so before = after),
     * and verifies dense slots where the router promises them. A plugin
     * given a bad logit has already run on it; the record names the logit,
     * not whatever the plugin made of it, since the logits come first. */
    size_t nA = (size_t)T * Ko;
    int32_t *counts_before = L->counts, *counts_after = L->counts + E;
    const moe_guard_zone guard = {(const char *)L->router_workspace + L->rinfo.workspace_bytes, WORKSPACE_GUARD_BYTES,
                                  WORKSPACE_GUARD_BYTE, MOE_CHECK_GUARD_FORWARD};
    const moe_finite_zone logits_zone = {L->logits, (perturbs ? 2 : 1) * (size_t)T * E,
                                         perturbs ? MOE_CHECK_ROUTE_LOGIT : MOE_CHECK_LOGIT};
    be->check_routing(be, &guard, ctx.inputs_checked ? &logits_zone : NULL, L->expert, L->weight,
                      owns_capacity ? L->slot : NULL, T, Ko, E, C, dense_slots(L), owns_capacity ? L->kept : NULL,
                      owns_capacity ? counts_before : NULL, owns_capacity ? counts_after : NULL, L->record);
    if (check_now(L, err, errcap) != 0) return -1;

    /* 3. capacity: at most C assignments per expert, by priority (a router
     *    that owns capacity chose its slots: kept and the counts are above) */
    if (!owns_capacity) {
        be->capacity_assign(be, L->expert, L->weight, T, Ko, E, C, c->drop_policy, L->kept, L->slot, counts_before,
                            counts_after);
    }

    /* 4. combine weights, renormalised over kept assignments if asked */
    if (c->renorm_after_drop) be->combine_weights(be, L->weight, L->kept, T, Ko, 1, L->cw);

    /* 5. dispatch: Xe[e, slot] = x[t] */
    be->dispatch(be, x, L->kept, L->slot, T, Ko, C, E, d, fill_counts(L), L->Xe);

    /* 6. experts: H = Xe w1 + b1; A = act(H); Ye = A w2 + b2, per expert */
    be->ffn_fwd(be, c->activation, L->Xe, L->w1, c->expert_bias ? L->b1 : NULL, L->w2,
                c->expert_bias ? L->b2 : NULL, L->H, L->A, L->Ye, E, C, d, h);

    /* 7. combine: y[t] = sum_k cw[t,k] Ye[kept, slot] (+ residual[t]) */
    be->combine(be, L->Ye, L->kept, L->slot, combine_weights_of(L), T, Ko, C, d, residual, y);

    /* 8. auxiliary losses, f from the counts on the device; their gradients
     *    are prepared now, the z-loss one into L->dlogits; the load-balancing
     *    one into L->dlogits too when it goes straight to the logits (one
     *    write, no pass to zero them first), else into L->probs, from where
     *    the router chains it through its perturbation. lb and z go to
     *    L->scalars. */
    const int lb_to_logits = !perturbs || (L->rinfo.flags & MOE_ROUTER_NO_GRAD) != 0;
    if (!lb_to_logits) be->zero(be, L->dlogits, (size_t)T * E * sizeof(float));
    be->aux_losses_counts(be, perturbs ? L->route_logits : L->logits, L->logits, counts_before, T, E,
                          c->aux_loss_weight, c->z_loss_weight, lb_to_logits ? L->dlogits : L->probs, L->dlogits,
                          L->scalars);

    if (aux_total || L->collect_stats) {
        double sc[2];
        be->to_host(be, sc, L->scalars, sizeof sc);
        L->stats.aux_loss = sc[0];
        L->stats.z_loss = sc[1];
        if (aux_total) *aux_total += c->aux_loss_weight * L->stats.aux_loss + c->z_loss_weight * L->stats.z_loss;
    }
    if (L->collect_stats) {
        /* Host copies for the statistics (evaluation only). */
        int32_t *h_expert = malloc((nA ? nA : 1) * sizeof(int32_t));
        int32_t *h_kept = malloc((nA ? nA : 1) * sizeof(int32_t));
        float *h_cw = malloc((nA ? nA : 1) * sizeof(float));
        float *h_logits = malloc(((size_t)T * E + 1) * sizeof(float));
        if (!h_expert || !h_kept || !h_cw || !h_logits) {
            free(h_expert);
            free(h_kept);
            free(h_cw);
            free(h_logits);
            snprintf(err, errcap, "MoE layer %d: out of host memory for routing statistics (T=%d)", c->layer, T);
            return -1;
        }
        be->to_host(be, h_expert, L->expert, nA * sizeof(int32_t));
        be->to_host(be, h_kept, L->kept, nA * sizeof(int32_t));
        be->to_host(be, h_cw, combine_weights_of(L), nA * sizeof(float));
        be->to_host(be, h_logits, L->logits, (size_t)T * E * sizeof(float));
        be->to_host(be, L->stats.counts_before, counts_before, (size_t)E * sizeof(int32_t));
        be->to_host(be, L->stats.counts_after, counts_after, (size_t)E * sizeof(int32_t));
        routing_stats(L, h_logits, h_expert, h_kept, h_cw, T);
        free(h_expert);
        free(h_kept);
        free(h_cw);
        free(h_logits);
    }
    return 0;
}

/* ================================ backward =============================== */

int moe_layer_backward(moe_layer *L, const int32_t *token_ids, const float *dy, float *dx,
                       int accumulate_expert_dw, moe_rng_key key, char *err, size_t errcap) {
    moe_backend *be = L->be;
    const moe_layer_cfg *c = &L->cfg;
    int T = L->T, C = L->C, d = c->d_model, E = c->num_experts, Ko = L->rinfo.k_out, h = c->d_ff;
    int perturbs = (L->rinfo.flags & MOE_ROUTER_PERTURBS_LOGITS) != 0;

    /* 7'. combine: dYe = cw * dy scattered to rows; dcw = <dy, Ye> */
    be->combine_bwd(be, L->Ye, L->kept, L->slot, combine_weights_of(L), dy, T, Ko, C, E, d, fill_counts(L), L->dYe,
                    L->dcw);

    /* 6'. experts: dXe, and the gradients of w1, b1, w2, b2 */
    be->ffn_bwd(be, c->activation, L->Xe, L->w1, L->w2, L->H, L->A, L->dYe, L->dA, L->dH, L->dXe, L->dw1,
                c->expert_bias ? L->db1 : NULL, L->dw2, c->expert_bias ? L->db2 : NULL, E, C, d, h,
                accumulate_expert_dw);

    /* 5'. dispatch: dx[t] = sum of dXe[kept, slot] (the first write of dx) */
    be->dispatch_bwd(be, L->dXe, L->kept, L->slot, T, Ko, C, d, 0, dx);

    /* 4'. combine weights -> router weights (0 for dropped assignments) */
    const float *dweight = L->dcw; /* without renormalisation (combine_weights_of) */
    if (c->renorm_after_drop) {
        be->combine_weights_bwd(be, L->weight, L->kept, T, Ko, 1, L->dcw, L->dweight);
        dweight = L->dweight;
    }

    /* 2'. router plugin: dweight (+ the load-balancing gradient on l' for
     * routers that perturb their logits) -> dlogits of its own, added to the
     * z-loss gradient already in L->dlogits. */
    int no_grad = (L->rinfo.flags & MOE_ROUTER_NO_GRAD) != 0;
    if (!no_grad) {
        /* The backward sees the context the forward saw: a router that draws
         * noise only in training must not invent noise for an eval forward. */
        moe_context ctx = router_context(L, L->training, key);
        moe_router_bwd_args ba;
        memset(&ba, 0, sizeof ba);
        ba.struct_size = sizeof ba;
        ba.T = T;
        ba.E = E;
        ba.k_out = Ko;
        ba.capacity = C;
        ba.d_model = d;
        ba.logits = L->logits;
        ba.x = L->x;
        ba.token_ids = token_ids;
        ba.params = L->router_params;
        ba.buffers = L->router_buffers;
        ba.expert = L->expert;
        ba.weight = L->weight;
        ba.slot = (L->rinfo.flags & MOE_ROUTER_OWNS_CAPACITY) ? L->slot : NULL;
        ba.route_logits = perturbs ? L->route_logits : NULL;
        ba.dweight = dweight;
        ba.d_route_logits = perturbs ? L->probs : NULL;
        ba.dlogits = L->router_dlogits;
        ba.dx = dx;
        ba.param_grads = L->router_grads;
        ba.saved = L->router_saved;
        if (L->router_impl->backward(L->router_state, &ctx, &ba) != MOE_OK) {
            snprintf(err, errcap, "router '%s' (layer %d) backward failed: %s", L->router->name, c->layer, L->msg);
            return -1;
        }
        check_workspace_guard(L, MOE_CHECK_GUARD_BACKWARD);
        if (check_now(L, err, errcap) != 0) return -1;
        be->axpy(be, 1.0f, L->router_dlogits, L->dlogits, (size_t)T * E);
    }

    /* 1'. gate network */
    gate_backward(L, L->x, dx, T);
    return 0;
}
