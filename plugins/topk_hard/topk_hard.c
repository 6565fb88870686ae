/*
 * topk_hard: every token goes to the K experts with the largest logits, with
 * fixed weights.
 *
 *     idx    = top-K of l            largest first, ties to the lower index
 *     weight = 1/K each              (weight = "uniform", the default)
 *
 * Fixed weights carry no information about l, so the router gets no gradient
 * from the task loss. Two variants:
 *
 *   weight = "st"   straight-through: the forward pass is the uniform one, the
 *                   backward pass pretends the weights were softk's (softmax
 *                   over the K selected logits, temperature 1):
 *                       w_j     = exp(l_idx_j) / sum_i exp(l_idx_i)
 *                       dl_idx_j = w_j (g_j - sum_i w_i g_i),  g = dL/dweight,
 *                   and 0 for the experts not selected. This is deliberately
 *                   not the gradient of the forward pass (which is 0): it
 *                   gives the gate a learning signal while the experts see
 *                   equal weights.
 *   weight = "one"  the seed bench: weight 1 each (so the K outputs add up),
 *                   no gradient.
 *
 * The CUDA path (topk_hard.cu) runs the same math, one thread per token.
 */
#include <moe/router.h>

typedef enum topk_hard_weight {
    TOPK_HARD_UNIFORM, /* 1/K, no gradient */
    TOPK_HARD_ST,      /* 1/K, straight-through softk gradient */
    TOPK_HARD_ONE      /* 1, no gradient (seed bench) */
} topk_hard_weight;

typedef struct topk_hard_state {
    int32_t num_experts; /* E */
    int32_t top_k;       /* K */
    topk_hard_weight weight;
    int32_t max_tokens;  /* bound on T: sizes the CUDA path's per-token scratch */
} topk_hard_state;

/* The CUDA path (topk_hard.cu): its table, and the workspace it needs. Defined
 * only when the build compiles topk_hard.cu; MOE_ROUTER_IF_CUDA uses them only then. */
extern const moe_router_impl topk_hard_cuda_impl;
size_t topk_hard_cuda_workspace_bytes(const topk_hard_state *s);

static const moe_option_spec topk_hard_options[] = {
    {"weight", MOE_OPT_STRING, "uniform", "uniform|st|one", 0.0, 0.0,
     "uniform: 1/K each, no gradient; st: 1/K forward, softk (temperature 1) gradient backward; "
     "one: 1 each, no gradient (seed bench)"},
};
#define TOPK_HARD_N_OPTIONS ((int)(sizeof topk_hard_options / sizeof topk_hard_options[0]))

/* ---- instance ----------------------------------------------------------- */

static moe_status topk_hard_create(const moe_router_dims *dims, const moe_option *opts, int32_t n_opts,
                                   void **state, char *msg, size_t msg_cap) {
    moe_option resolved[TOPK_HARD_N_OPTIONS];
    moe_status st = moe_router_check_create_args(dims, opts, n_opts, state, msg, msg_cap);
    if (st == MOE_OK)
        st = moe_options_resolve(topk_hard_options, TOPK_HARD_N_OPTIONS, opts, n_opts, resolved, msg, msg_cap);
    if (st == MOE_OK) st = moe_router_check_dims(dims, msg, msg_cap);
    if (st != MOE_OK) return st;

    topk_hard_state *s = malloc(sizeof *s);
    if (!s) return moe_fail(msg, msg_cap, MOE_ERR_NO_MEMORY, "out of memory for the router state");
    s->num_experts = dims->num_experts;
    s->top_k = dims->top_k;
    s->max_tokens = dims->max_tokens > 0 ? dims->max_tokens : 0;
    /* The resolved string may point into the caller's config: keep the enum, not the text. */
    const char *w = moe_option_get(resolved, TOPK_HARD_N_OPTIONS, "weight")->s;
    s->weight = strcmp(w, "st") == 0 ? TOPK_HARD_ST : strcmp(w, "one") == 0 ? TOPK_HARD_ONE : TOPK_HARD_UNIFORM;
    *state = s;
    return MOE_OK;
}

static void topk_hard_destroy(void *state) { free(state); }

/* Straight-through backward needs one row of scratch: the softk weights w[K]
 * and the selected indices idx[K]. The CPU loop runs one token at a time. */
static size_t topk_hard_workspace_bytes(const topk_hard_state *s) {
    return s->weight == TOPK_HARD_ST ? (size_t)s->top_k * (sizeof(float) + sizeof(int32_t)) : 0;
}

static moe_status topk_hard_query(const void *state, moe_router_info *info) {
    const topk_hard_state *s = state;
    if (!s || moe_router_info_reset(info) != MOE_OK) return MOE_ERR_INVALID_ARG;
    info->k_out = s->top_k;
    switch (s->weight) {
    case TOPK_HARD_UNIFORM:
        info->flags = MOE_ROUTER_NO_GRAD | MOE_ROUTER_WEIGHT_SUM_EXACT;
        info->weight_sum = 1.0f;
        break;
    case TOPK_HARD_ST:
        info->flags = MOE_ROUTER_WEIGHT_SUM_EXACT;
        info->weight_sum = 1.0f;
        break;
    case TOPK_HARD_ONE:
        info->flags = MOE_ROUTER_NO_GRAD | MOE_ROUTER_WEIGHT_SUM_EXACT;
        info->weight_sum = (float)s->top_k;
        break;
    }
    /* One workspace serves whichever table the host calls: the larger need. */
    info->workspace_bytes = moe_router_max_bytes(topk_hard_workspace_bytes(s),
                                                 MOE_ROUTER_IF_CUDA(topk_hard_cuda_workspace_bytes(s), 0));
    return MOE_OK;
}

/* ---- input checks --------------------------------------------------------- */

static moe_status topk_hard_check_call(const topk_hard_state *s, const moe_context *ctx, int32_t T, int32_t E,
                                       int32_t k_out) {
    moe_status st = moe_router_check_T_E(ctx, T, E, s->num_experts);
    if (st == MOE_OK) st = moe_router_check_k_out(ctx, k_out, s->top_k);
    size_t need = topk_hard_workspace_bytes(s);
    if (st == MOE_OK && T > 0 && need > 0) st = moe_router_check_workspace(ctx, need);
    return st;
}

/* ---- CPU path --------------------------------------------------------------- */

static moe_status topk_hard_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const topk_hard_state *s = state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = topk_hard_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st != MOE_OK || a->T == 0) return st;
    st = moe_router_check_fwd_args(ctx, a);
    if (st == MOE_OK) st = moe_router_check_logits_cpu(ctx, a->logits, a->T, a->E);
    if (st != MOE_OK) return st;

    const int32_t T = a->T, E = a->E, K = s->top_k;
    /* "st" shares the uniform forward pass; only its backward differs. */
    const float w = s->weight == TOPK_HARD_ONE ? 1.0f : 1.0f / (float)K;
    for (int32_t t = 0; t < T; ++t) {
        moe_topk_row(a->logits + (size_t)t * E, E, K, a->expert + (size_t)t * K);
        for (int32_t j = 0; j < K; ++j) a->weight[(size_t)t * K + j] = w;
    }
    return MOE_OK;
}

static moe_status topk_hard_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const topk_hard_state *s = state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = topk_hard_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st == MOE_OK) st = moe_router_check_present(ctx, a->T, a->dlogits != NULL, "backward: dlogits");
    if (st != MOE_OK || a->T == 0) return st;

    const int32_t T = a->T, E = a->E, K = s->top_k;
    /* dlogits is an output: every entry is written, zeros where no gradient flows. */
    memset(a->dlogits, 0, (size_t)T * E * sizeof(float));
    if (s->weight != TOPK_HARD_ST) return MOE_OK;

    st = moe_router_check_present(ctx, T, a->logits && a->dweight, "backward: logits and dweight");
    if (st == MOE_OK) st = moe_router_check_logits_cpu(ctx, a->logits, T, E);
    if (st != MOE_OK) return st;

    /* The selection is recomputed from the logits rather than read from
     * a->expert: the host may have marked a dropped assignment -1 there,
     * while the surrogate softmax still runs over all K selected logits
     * (the dropped one simply has dweight 0). */
    float *w = ctx->workspace;                    /* [K] surrogate softk weights */
    int32_t *idx = (int32_t *)(w + K);            /* [K] selected experts */
    for (int32_t t = 0; t < T; ++t) {
        const float *l = a->logits + (size_t)t * E;
        moe_topk_row(l, E, K, idx);
        moe_softk_weights(l, idx, K, 1.0f, w);
        /* dl_idx_j += w_j (g_j - sum_i w_i g_i); the row was zeroed above. */
        moe_softk_weights_backward(idx, w, a->dweight + (size_t)t * K, K, 1.0f, a->dlogits + (size_t)t * E);
    }
    return MOE_OK;
}

static const moe_router_impl topk_hard_cpu = {topk_hard_forward, topk_hard_backward};

MOE_ROUTER_PLUGIN_V1("topk_hard",
                     "top-K experts by logit with fixed weights 1/K (or 1), optional straight-through gradient",
                     topk_hard_options, topk_hard_create, topk_hard_destroy, topk_hard_query, &topk_hard_cpu,
                     MOE_ROUTER_CUDA_IMPL(topk_hard_cuda_impl))
