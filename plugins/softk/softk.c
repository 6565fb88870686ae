/*
 * softk: every token goes to the K experts with the largest logits, weighted
 * by how strongly the gate prefers each of them.
 *
 *     idx = top-K of l                  largest first, ties to the lower index
 *
 * normalize = "softmax" (default): softmax over the K selected logits,
 *
 *     w_j = exp(l_idx_j / tau) / sum_i exp(l_idx_i / tau),
 *     dl_idx_j = w_j (g_j - sum_i w_i g_i) / tau,   g = dL/dweight,
 *
 *   and 0 for the experts not selected.
 *
 * normalize = "sum": the probabilities of the full softmax over all E experts,
 * renormalized over the K selected (what the seed bench calls "sum"):
 *
 *     p   = softmax(l / tau)            over E
 *     c_j = max(p_idx_j, 1e-9)          keeps the sum away from 0
 *     w_j = c_j / S,   S = sum_i c_i
 *
 *   Backward, one step at a time:
 *     ratio    dc_j = (g_j - sum_i w_i g_i) / S
 *     clamp    dp_idx_j = dc_j where p_idx_j >= 1e-9, 0 where the floor binds;
 *              dp = 0 for the experts not selected
 *     softmax  dl_m = p_m (dp_m - sum_n p_n dp_n) / tau     for every m in 0..E
 *   Where no selected p is below the floor, the full softmax's denominator
 *   cancels in the ratio and "sum" is the same function as "softmax" (the
 *   terms above then give 0 to the unselected logits). The two differ where
 *   the floor binds: "sum" keeps such an expert at weight 1e-9 / S with no
 *   gradient to its own logit, and the remaining gradient reaches the
 *   unselected logits through the full softmax's denominator.
 *
 * tau (the option temperature) sharpens the weights below 1 and flattens them
 * above 1; it does not change which experts are chosen.
 *
 * The CUDA path (softk.cu) runs the same math, one thread per token.
 */
#include <moe/router.h>

/* Floor of the selected probabilities in normalize = "sum". */
#define SOFTK_SUM_FLOOR 1e-9f

typedef enum softk_normalize {
    SOFTK_SOFTMAX, /* softmax over the K selected logits */
    SOFTK_SUM      /* full softmax, clamped and renormalized over the K selected */
} softk_normalize;

typedef struct softk_state {
    int32_t num_experts; /* E */
    int32_t top_k;       /* K */
    float temperature;   /* tau */
    softk_normalize normalize;
    int32_t max_tokens;  /* bound on T: sizes the CUDA path's per-token scratch */
} softk_state;

/* The CUDA path (softk.cu): its table, and the workspace it needs. Defined
 * only when the build compiles softk.cu; MOE_ROUTER_IF_CUDA uses them only then. */
extern const moe_router_impl softk_cuda_impl;
size_t softk_cuda_workspace_bytes(const softk_state *s);

static const moe_option_spec softk_options[] = {
    {"temperature", MOE_OPT_FLOAT, "1.0", NULL, 1e-3, 1e3,
     "tau: weights come from softmax(l / tau); below 1 sharper, above 1 flatter"},
    {"normalize", MOE_OPT_STRING, "softmax", "softmax|sum", 0.0, 0.0,
     "softmax: softmax over the K selected logits; "
     "sum: softmax over all E, clamped at 1e-9 and divided by its sum over the K selected"},
};
#define SOFTK_N_OPTIONS ((int)(sizeof softk_options / sizeof softk_options[0]))

/* ---- instance ----------------------------------------------------------- */

static moe_status softk_create(const moe_router_dims *dims, const moe_option *opts, int32_t n_opts,
                               void **state, char *msg, size_t msg_cap) {
    moe_option resolved[SOFTK_N_OPTIONS];
    moe_status st = moe_router_check_create_args(dims, opts, n_opts, state, msg, msg_cap);
    if (st == MOE_OK) st = moe_options_resolve(softk_options, SOFTK_N_OPTIONS, opts, n_opts, resolved, msg, msg_cap);
    if (st == MOE_OK) st = moe_router_check_dims(dims, msg, msg_cap);
    if (st != MOE_OK) return st;

    softk_state *s = malloc(sizeof *s);
    if (!s) return moe_fail(msg, msg_cap, MOE_ERR_NO_MEMORY, "out of memory for the router state");
    s->num_experts = dims->num_experts;
    s->top_k = dims->top_k;
    s->max_tokens = dims->max_tokens > 0 ? dims->max_tokens : 0;
    s->temperature = (float)moe_option_get(resolved, SOFTK_N_OPTIONS, "temperature")->f;
    /* The resolved string may point into the caller's config: keep the enum, not the text. */
    s->normalize = strcmp(moe_option_get(resolved, SOFTK_N_OPTIONS, "normalize")->s, "sum") == 0 ? SOFTK_SUM
                                                                                                 : SOFTK_SOFTMAX;
    *state = s;
    return MOE_OK;
}

static void softk_destroy(void *state) { free(state); }

/* One row of scratch (the CPU loop runs one token at a time), carved from the
 * host's workspace in this order:
 *     p[E]    full softmax                 "sum" only
 *     w[K]    weights of the selected experts
 *     dp[K]   gradient at the selected p   "sum" only
 *     idx[K]  selected experts
 * "softmax" writes its forward weights straight into the output and needs the
 * scratch only in backward. */
typedef struct softk_scratch {
    float *p;
    float *w;
    float *dp;
    int32_t *idx;
} softk_scratch;

static size_t softk_workspace_bytes(const softk_state *s) {
    size_t E = (size_t)s->num_experts, K = (size_t)s->top_k;
    size_t floats = s->normalize == SOFTK_SUM ? E + 2 * K : K;
    return floats * sizeof(float) + K * sizeof(int32_t);
}

static softk_scratch softk_carve(const softk_state *s, void *workspace) {
    size_t E = (size_t)s->num_experts, K = (size_t)s->top_k;
    int sum = s->normalize == SOFTK_SUM;
    softk_scratch sc;
    sc.p = workspace;
    sc.w = sc.p + (sum ? E : 0);
    sc.dp = sc.w + K;
    sc.idx = (int32_t *)(sc.dp + (sum ? K : 0));
    return sc;
}

static moe_status softk_query(const void *state, moe_router_info *info) {
    const softk_state *s = state;
    if (!s || moe_router_info_reset(info) != MOE_OK) return MOE_ERR_INVALID_ARG;
    info->k_out = s->top_k;
    /* Both normalizations divide by their own sum over the K selected. */
    info->flags = MOE_ROUTER_WEIGHT_SUM_EXACT;
    info->weight_sum = 1.0f;
    /* One workspace serves whichever table the host calls: the larger need. */
    info->workspace_bytes =
        moe_router_max_bytes(softk_workspace_bytes(s), MOE_ROUTER_IF_CUDA(softk_cuda_workspace_bytes(s), 0));
    return MOE_OK;
}

/* ---- input checks --------------------------------------------------------- */

static moe_status softk_check_call(const softk_state *s, const moe_context *ctx, int32_t T, int32_t E,
                                   int32_t k_out) {
    moe_status st = moe_router_check_T_E(ctx, T, E, s->num_experts);
    if (st == MOE_OK) st = moe_router_check_k_out(ctx, k_out, s->top_k);
    if (st == MOE_OK && T > 0) st = moe_router_check_workspace(ctx, softk_workspace_bytes(s));
    return st;
}

/* ---- the two normalizations, one row each ---------------------------------- */

/* normalize = "sum", forward: p = softmax(l / tau), c_j = max(p_idx_j, floor),
 * w_j = c_j / S. Returns S for the backward pass. */
static float softk_sum_weights(const float *l, int32_t E, const int32_t *idx, int32_t K, float tau, float *p,
                               float *w) {
    moe_softmax_row(l, p, E, tau);
    float S = 0.0f;
    for (int32_t j = 0; j < K; ++j) {
        float p_j = p[idx[j]];
        w[j] = p_j >= SOFTK_SUM_FLOOR ? p_j : SOFTK_SUM_FLOOR; /* c_j for now */
        S += w[j];
    }
    for (int32_t j = 0; j < K; ++j) w[j] /= S;
    return S;
}

/* normalize = "sum", backward: the chain rule through ratio, clamp and
 * softmax (see the top of the file). dl is the full row, overwritten. */
static void softk_sum_backward(const int32_t *idx, int32_t K, int32_t E, float tau, const float *p,
                               const float *w, float S, const float *g, float *dp, float *dl) {
    float wg = 0.0f; /* sum_i w_i g_i */
    for (int32_t j = 0; j < K; ++j) wg += w[j] * g[j];

    float pdp = 0.0f; /* sum_n p_n dp_n, only the selected n have dp_n != 0 */
    for (int32_t j = 0; j < K; ++j) {
        float p_j = p[idx[j]];
        dp[j] = p_j >= SOFTK_SUM_FLOOR ? (g[j] - wg) / S : 0.0f;
        pdp += p_j * dp[j];
    }

    for (int32_t m = 0; m < E; ++m) dl[m] = -p[m] * pdp / tau;
    for (int32_t j = 0; j < K; ++j) dl[idx[j]] += p[idx[j]] * dp[j] / tau;
}

/* ---- CPU path --------------------------------------------------------------- */

static moe_status softk_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const softk_state *s = state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = softk_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st != MOE_OK || a->T == 0) return st;
    st = moe_router_check_fwd_args(ctx, a);
    if (st == MOE_OK) st = moe_router_check_logits_cpu(ctx, a->logits, a->T, a->E);
    if (st != MOE_OK) return st;

    const int32_t T = a->T, E = a->E, K = s->top_k;
    const float tau = s->temperature;
    softk_scratch sc = softk_carve(s, ctx->workspace);
    for (int32_t t = 0; t < T; ++t) {
        const float *l = a->logits + (size_t)t * E;
        int32_t *idx = a->expert + (size_t)t * K;
        float *w = a->weight + (size_t)t * K;
        moe_topk_row(l, E, K, idx);
        if (s->normalize == SOFTK_SOFTMAX)
            moe_softk_weights(l, idx, K, tau, w);
        else
            softk_sum_weights(l, E, idx, K, tau, sc.p, w);
    }
    return MOE_OK;
}

static moe_status softk_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const softk_state *s = state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = softk_check_call(s, ctx, a->T, a->E, a->k_out);
    if (st != MOE_OK || a->T == 0) return st;
    st = moe_router_check_present(ctx, a->T, a->logits && a->dweight && a->dlogits,
                                  "backward: logits, dweight and dlogits");
    if (st == MOE_OK) st = moe_router_check_logits_cpu(ctx, a->logits, a->T, a->E);
    if (st != MOE_OK) return st;

    const int32_t T = a->T, E = a->E, K = s->top_k;
    const float tau = s->temperature;
    softk_scratch sc = softk_carve(s, ctx->workspace);
    /* Selection and weights are recomputed from the logits rather than read
     * from a->expert / a->weight: the host may have marked a dropped
     * assignment -1 or renormalized the kept weights, while the weights'
     * dependence on l is the one forward computed (a dropped assignment
     * simply has dweight 0). */
    for (int32_t t = 0; t < T; ++t) {
        const float *l = a->logits + (size_t)t * E;
        const float *g = a->dweight + (size_t)t * K;
        float *dl = a->dlogits + (size_t)t * E;
        moe_topk_row(l, E, K, sc.idx);
        if (s->normalize == SOFTK_SOFTMAX) {
            moe_softk_weights(l, sc.idx, K, tau, sc.w);
            /* The helper accumulates into the selected entries only. */
            for (int32_t m = 0; m < E; ++m) dl[m] = 0.0f;
            moe_softk_weights_backward(sc.idx, sc.w, g, K, tau, dl);
        } else {
            float S = softk_sum_weights(l, E, sc.idx, K, tau, sc.p, sc.w);
            softk_sum_backward(sc.idx, K, E, tau, sc.p, sc.w, S, g, sc.dp, dl);
        }
    }
    return MOE_OK;
}

static const moe_router_impl softk_cpu = {softk_forward, softk_backward};

MOE_ROUTER_PLUGIN_V1("softk", "top-K experts by logit, weighted by a softmax over the selected logits / temperature",
                     softk_options, softk_create, softk_destroy, softk_query, &softk_cpu,
                     MOE_ROUTER_CUDA_IMPL(softk_cuda_impl))
