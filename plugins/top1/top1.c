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

#ifdef MOE_PLUGIN_HAS_CUDA
/* The CUDA path (top1.cu): its table, and the workspace it needs. */
extern const moe_router_impl top1_cuda_impl;
size_t top1_cuda_workspace_bytes(const top1_state *s);
#endif

static const moe_option_spec top1_options[] = {
    {"gate", MOE_OPT_STRING, "softmax", "softmax|none", 0.0, 0.0,
     "softmax: weight = softmax(l)[e], gradient flows to the gate (Switch); "
     "none: weight 1, no gradient (seed bench)"},
};
#define TOP1_N_OPTIONS ((int)(sizeof top1_options / sizeof top1_options[0]))

/* ---- instance ----------------------------------------------------------- */

static moe_status top1_create(const moe_router_dims *dims, const moe_option *opts, int32_t n_opts,
                              void **state, char *msg, size_t msg_cap) {
    if (!dims || !state || n_opts < 0 || (n_opts > 0 && !opts))
        return moe_fail(msg, msg_cap, MOE_ERR_INVALID_ARG,
                        "create: dims and state must not be NULL, options must be an array of n_opts >= 0");
    *state = NULL;

    moe_option resolved[TOP1_N_OPTIONS];
    moe_status st = moe_options_resolve(top1_options, TOP1_N_OPTIONS, opts, n_opts, resolved, msg, msg_cap);
    if (st != MOE_OK) return st;

    /* top1 ignores top_k but still refuses a config that no router could serve,
     * so the same [moe] section does not pass here and fail with another router. */
    const int32_t E = dims->num_experts, K = dims->top_k;
    if (E < 1)
        return moe_fail(msg, msg_cap, MOE_ERR_INVALID_ARG,
                        "num_experts = %d; set [moe].num_experts >= 1", (int)E);
    if (K < 1)
        return moe_fail(msg, msg_cap, MOE_ERR_INVALID_ARG, "top_k = %d; set [moe].top_k >= 1", (int)K);
    if (K > E)
        return moe_fail(msg, msg_cap, MOE_ERR_INVALID_ARG,
                        "top_k = %d exceeds num_experts = %d; set [moe].top_k <= num_experts", (int)K, (int)E);

    top1_state *s = malloc(sizeof *s);
    if (!s) return moe_fail(msg, msg_cap, MOE_ERR_NO_MEMORY, "out of memory for the router state");
    s->num_experts = E;
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
    if (!s || !info || info->struct_size < sizeof *info) return MOE_ERR_INVALID_ARG;
    uint32_t host_size = info->struct_size;
    memset(info, 0, sizeof *info);
    info->struct_size = host_size;
    info->k_out = 1;
    if (s->gate == TOP1_GATE_NONE) {
        info->flags = MOE_ROUTER_NO_GRAD | MOE_ROUTER_WEIGHT_SUM_EXACT;
        info->weight_sum = 1.0f;
    } else {
        /* p_e < 1 varies per token: no exact weight sum to promise. */
        info->flags = 0;
    }
    info->workspace_bytes = top1_workspace_bytes(s);
#ifdef MOE_PLUGIN_HAS_CUDA
    /* One workspace serves whichever table the host calls: the larger need. */
    size_t cuda_bytes = top1_cuda_workspace_bytes(s);
    if (cuda_bytes > info->workspace_bytes) info->workspace_bytes = cuda_bytes;
#endif
    return MOE_OK;
}

/* ---- input checks --------------------------------------------------------- */

static moe_status top1_check_call(const top1_state *s, const moe_context *ctx, int32_t T, int32_t E,
                                  int32_t k_out) {
    if (T < 0) return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "T = %d is negative", (int)T);
    if (E != s->num_experts)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "E = %d but this instance was created with num_experts = %d", (int)E,
                        (int)s->num_experts);
    if (k_out != 1)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "k_out = %d but top1 writes exactly 1 assignment per token", (int)k_out);
    size_t need = top1_workspace_bytes(s);
    if (T > 0 && need > 0 && (!ctx->workspace || ctx->workspace_bytes < need))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "workspace of %zu bytes given, query() asked for %zu", ctx->workspace_bytes, need);
    return MOE_OK;
}

/* All logits are checked before any output is written, so a failed call
 * leaves no half-routed batch behind. */
static moe_status top1_check_logits(const moe_context *ctx, const float *logits, int32_t T, int32_t E) {
    for (int32_t t = 0; t < T; ++t)
        for (int32_t j = 0; j < E; ++j) {
            float v = logits[(size_t)t * E + j];
            if (!isfinite(v))
                return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                                "logit[%d,%d] is %s: the gate produced a non-finite value", (int)t, (int)j,
                                isnan(v) ? "NaN" : (v > 0 ? "+Inf" : "-Inf"));
        }
    return MOE_OK;
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
    if (!a->logits || !a->expert || !a->weight)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "forward: logits, expert and weight must not be NULL when T = %d > 0", (int)a->T);
    st = top1_check_logits(ctx, a->logits, a->T, a->E);
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
    if (st != MOE_OK || a->T == 0) return st;
    if (!a->dlogits)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "backward: dlogits must not be NULL when T = %d > 0", (int)a->T);

    const int32_t T = a->T, E = a->E;
    if (s->gate == TOP1_GATE_NONE) {
        /* weight = 1 does not depend on l. dlogits is an output, so it is
         * overwritten with zeros rather than left as the host gave it. */
        memset(a->dlogits, 0, (size_t)T * E * sizeof(float));
        return MOE_OK;
    }

    if (!a->logits || !a->dweight)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "backward: logits and dweight must not be NULL when T = %d > 0", (int)a->T);
    st = top1_check_logits(ctx, a->logits, T, E);
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

static const struct moe_router_plugin_v1 top1_plugin = {
    .abi_version = MOE_ROUTER_ABI_VERSION,
    .struct_size = sizeof(struct moe_router_plugin_v1),
    .name = "top1",
    .description = "Switch routing (Fedus et al. 2021): one expert per token, weight softmax(l)[argmax l]",
    .options = top1_options,
    .n_options = TOP1_N_OPTIONS,
    .create = top1_create,
    .destroy = top1_destroy,
    .query = top1_query,
    .cpu = &top1_cpu,
#ifdef MOE_PLUGIN_HAS_CUDA
    .cuda = &top1_cuda_impl,
#else
    .cuda = NULL,
#endif
};

MOE_EXPORT const struct moe_router_plugin_v1 *moe_router_plugin_v1(void) { return &top1_plugin; }
