/*
 * top1: Switch routing (Fedus, Zoph and Shazeer 2021, "Switch Transformers").
 *
 * Every token goes to exactly one expert, scaled by the router's confidence:
 *
 *     p      = softmax(l)                over the E experts
 *     e      = argmax_j p_j              ties to the lower index
 *     weight = p_e
 *
 * The scaling is what lets the gate learn from the task loss: with
 * g = dL/dweight,
 *
 *     dL/dl_j = g * dp_e/dl_j = g * p_e * (delta_je - p_j).
 *
 * Option gate = "none" reproduces the seed bench: weight 1 and no gradient to
 * the gate, which then learns from the auxiliary losses alone.
 *
 * k_out is 1 whatever [moe].top_k says: Switch routing is top-1 by definition.
 *
 * The CUDA path (top1.cu) runs the same math, one thread per token.
 */
#include <moe/router.h>

typedef enum top1_gate {
    TOP1_GATE_SOFTMAX, /* weight = p_e, gradient to the gate */
    TOP1_GATE_NONE     /* weight = 1, no gradient (seed bench) */
} top1_gate;

typedef struct top1_state {
    int32_t num_experts; /* E */
    top1_gate gate;
} top1_state;

/* The CUDA path (top1.cu): its table, and the workspace it needs. Defined
 * only when the build compiles top1.cu; MOE_ROUTER_IF_CUDA uses them only then. */
extern const moe_router_impl top1_cuda_impl;
size_t top1_cuda_workspace_bytes(const top1_state *s);

static const moe_option_spec top1_options[] = {
    {"gate", MOE_OPT_STRING, "softmax", "softmax|none", 0.0, 0.0,
     "softmax: weight = softmax(l)[e], gradient flows to the gate (Switch); "
     "none: weight 1, no gradient (seed bench)"},
};
#define TOP1_N_OPTIONS ((int)(sizeof top1_options / sizeof top1_options[0]))

/* ---- instance ----------------------------------------------------------- */

static moe_status top1_create(const moe_router_dims *dims, const moe_option *opts, int32_t n_opts,
                              void **state, char *msg, size_t msg_cap) {
    moe_option resolved[TOP1_N_OPTIONS];
    moe_status st = moe_router_check_create_args(dims, opts, n_opts, state, msg, msg_cap);
    if (st == MOE_OK) st = moe_options_resolve(top1_options, TOP1_N_OPTIONS, opts, n_opts, resolved, msg, msg_cap);
    /* top1 ignores top_k but still refuses a config that no router could serve. */
    if (st == MOE_OK) st = moe_router_check_dims(dims, msg, msg_cap);
    if (st != MOE_OK) return st;

    top1_state *s = malloc(sizeof *s);
    if (!s) return moe_fail(msg, msg_cap, MOE_ERR_NO_MEMORY, "out of memory for the router state");
    s->num_experts = dims->num_experts;
    /* The resolved string may point into the caller's config: keep the enum, not the text. */
    s->gate = strcmp(moe_option_get(resolved, TOP1_N_OPTIONS, "gate")->s, "none") == 0 ? TOP1_GATE_NONE
                                                                                       : TOP1_GATE_SOFTMAX;
    *state = s;
    return MOE_OK;
}

static void top1_destroy(void *state) { free(state); }

/* Scratch for one row of probabilities p[E]; the CPU loop runs one token at a
 * time, so one row serves every token. */
static size_t top1_workspace_bytes(const top1_state *s) {
    return s->gate == TOP1_GATE_SOFTMAX ? (size_t)s->num_experts * sizeof(float) : 0;
}

static moe_status top1_query(const void *state, moe_router_info *info) {
    const top1_state *s = state;
    if (!s || moe_router_info_reset(info) != MOE_OK) return MOE_ERR_INVALID_ARG;
    info->k_out = 1;
    if (s->gate == TOP1_GATE_NONE) {
        info->flags = MOE_ROUTER_NO_GRAD | MOE_ROUTER_WEIGHT_SUM_EXACT;
        info->weight_sum = 1.0f;
    } else {
        /* p_e < 1 varies per token: no exact weight sum to promise. */
        info->flags = 0;
    }
    /* One workspace serves whichever table the host calls: the larger need. */
    info->workspace_bytes =
        moe_router_max_bytes(top1_workspace_bytes(s), MOE_ROUTER_IF_CUDA(top1_cuda_workspace_bytes(s), 0));
    return MOE_OK;
}

/* ---- input checks --------------------------------------------------------- */

static moe_status top1_check_call(const top1_state *s, const moe_context *ctx, int32_t T, int32_t E,
                                  int32_t k_out) {
    moe_status st = moe_router_check_T_E(ctx, T, E, s->num_experts);
    if (st != MOE_OK) return st;
    if (k_out != 1)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "k_out = %d but top1 writes exactly 1 assignment per token", (int)k_out);
    size_t need = top1_workspace_bytes(s);
    return T > 0 && need > 0 ? moe_router_check_workspace(ctx, need) : MOE_OK;
}

/* ---- CPU path --------------------------------------------------------------- */

/* e = argmax_j p_j. Softmax is monotone, so this is argmax_j l_j; ranking the
 * logits themselves keeps two different logits apart even where their
 * probabilities round to the same float, and picks what topk_hard picks at K = 1. */
static int32_t top1_choose(const float *l, int32_t E) {
    int32_t e;
    moe_topk_row(l, E, 1, &e);
    return e;
}

static moe_status top1_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const top1_state *s = state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = top1_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st != MOE_OK || a->T == 0) return st;
    st = moe_router_check_fwd_args(ctx, a);
    if (st == MOE_OK) st = moe_router_check_logits_cpu(ctx, a->logits, a->T, a->E);
    if (st != MOE_OK) return st;

    const int32_t T = a->T, E = a->E;
    float *p = ctx->workspace; /* [E], gate = softmax only */
    for (int32_t t = 0; t < T; ++t) {
        const float *l = a->logits + (size_t)t * E;
        int32_t e = top1_choose(l, E);
        a->expert[t] = e;
        if (s->gate == TOP1_GATE_NONE) {
            a->weight[t] = 1.0f;
        } else {
            moe_softmax_row(l, p, E, 1.0f);
            a->weight[t] = p[e];
        }
    }
    return MOE_OK;
}

static moe_status top1_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const top1_state *s = state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = top1_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st == MOE_OK) st = moe_router_check_present(ctx, a->T, a->dlogits != NULL, "backward: dlogits");
    if (st != MOE_OK || a->T == 0) return st;

    const int32_t T = a->T, E = a->E;
    if (s->gate == TOP1_GATE_NONE) {
        /* weight = 1 does not depend on l. dlogits is an output, so it is
         * overwritten with zeros rather than left as the host gave it. */
        memset(a->dlogits, 0, (size_t)T * E * sizeof(float));
        return MOE_OK;
    }

    st = moe_router_check_present(ctx, T, a->logits && a->dweight, "backward: logits and dweight");
    if (st == MOE_OK) st = moe_router_check_logits_cpu(ctx, a->logits, T, E);
    if (st != MOE_OK) return st;

    /* The choice e is recomputed from the logits rather than read from
     * a->expert: the host may have marked a dropped assignment -1 there, and
     * its dweight is then 0, which the formula below handles by itself. */
    float *p = ctx->workspace; /* [E] */
    for (int32_t t = 0; t < T; ++t) {
        const float *l = a->logits + (size_t)t * E;
        float *dl = a->dlogits + (size_t)t * E;
        int32_t e = top1_choose(l, E);
        moe_softmax_row(l, p, E, 1.0f);
        /* dl_j = g p_e (delta_je - p_j) */
        float g_pe = a->dweight[t] * p[e];
        for (int32_t j = 0; j < E; ++j) dl[j] = -g_pe * p[j];
        dl[e] += g_pe;
    }
    return MOE_OK;
}

static const moe_router_impl top1_cpu = {top1_forward, top1_backward};

MOE_ROUTER_PLUGIN_V1("top1", "Switch routing (Fedus et al. 2021): one expert per token, weight softmax(l)[argmax l]",
                     top1_options, top1_create, top1_destroy, top1_query, &top1_cpu,
                     MOE_ROUTER_CUDA_IMPL(top1_cuda_impl))
