/*
 * expert_choice: Expert Choice routing (Zhou et al. 2022, "Mixture-of-Experts
 * with Expert Choice Routing").
 *
 * Instead of each token picking its experts, each expert picks its tokens:
 *
 *   S[t,:] = softmax(l[t,:])                    token-to-expert affinities
 *   expert e takes the C tokens with the largest S[t,e]   (ties: lower t)
 *   weight of (t, e) = S[t,e]
 *
 * Every expert is filled to exactly C = min(capacity, T): perfect load
 * balance by construction, no dropped assignments and no auxiliary loss
 * needed. A token may be taken by 0 .. E experts, so hard tokens can get more
 * compute and easy ones none. The router owns capacity: it writes the slot of
 * each assignment (the token's rank in its expert's list) and the host skips
 * its own capacity step; those slots are dense (MOE_ROUTER_DENSE_SLOTS).
 *
 * Experts rank tokens by S, not by the raw logits: S puts every token on the
 * same scale (a probability over experts), while l[t,e] carries an arbitrary
 * per-token offset that softmax removes.
 *
 * Output layout (k_out = E): token t lists the experts that took it in
 * ascending expert order, weight S[t,e], slot = rank in e's list; the unused
 * entries are expert -1, weight 0, slot -1.
 *
 * Seed-compatible mode, option max_per_token = K' >= 1 (the seed bench's
 * simplified expert choice): run the same selection, then each token keeps at
 * most K' of the experts that took it, ranked by logit, with weights
 * softmax over the kept logits. A token no expert took falls back to its
 * top-K' experts by logit. Here k_out = K', the weights of a token sum to 1,
 * and the host applies capacity as for token-choice routers.
 */
#include <moe/router.h>

typedef struct ec_state {
    int32_t E, K;
    int32_t max_tokens;
    int32_t max_per_token; /* K' of the seed-compatible mode; 0 = the paper's mode */
} ec_state;

/* The CUDA path (expert_choice.cu): its table, and the workspace it needs. Defined
 * only when the build compiles expert_choice.cu; MOE_ROUTER_IF_CUDA uses them only then. */
extern const moe_router_impl expert_choice_cuda_impl;
size_t expert_choice_cuda_workspace_bytes(const ec_state *s);

/* One token as an expert sees it. */
typedef struct ec_candidate {
    float score;
    int32_t token;
} ec_candidate;

static const moe_option_spec ec_options[] = {
    {"max_per_token", MOE_OPT_INT, "0", NULL, 0.0, 1024.0,
     "0: Expert Choice as in the paper (a token gets 0..E experts, the router owns capacity); "
     "K >= 1: seed-compatible, each token keeps at most K chosen experts ranked by logit, softmax weights"},
};
#define EC_N_OPTIONS ((int)(sizeof ec_options / sizeof ec_options[0]))

static int32_t ec_k_out(const ec_state *s) { return s->max_per_token > 0 ? s->max_per_token : s->E; }

/* Workspace for T tokens, in this order (every piece is 4-byte aligned):
 *   scores S [T,E] float, rank [T,E] int32 (token t's place in expert e's
 *   list, -1 if not taken), candidates [T] (one expert's view while it
 *   sorts), row [E] float (a masked logit row in forward, S[t,:] in backward). */
static size_t ec_workspace_bytes(int32_t T, int32_t E) {
    size_t TE = (size_t)T * (size_t)E;
    return TE * sizeof(float) + TE * sizeof(int32_t) + (size_t)T * sizeof(ec_candidate) + (size_t)E * sizeof(float);
}

static moe_status ec_create(const moe_router_dims *dims, const moe_option *opts, int32_t n_opts, void **state,
                            char *msg, size_t msg_cap) {
    moe_option v[EC_N_OPTIONS];
    moe_status st = moe_options_resolve(ec_options, EC_N_OPTIONS, opts, n_opts, v, msg, msg_cap);
    if (st != MOE_OK) return st;
    if (!dims || !state) return moe_fail(msg, msg_cap, MOE_ERR_INVALID_ARG, "create: dims and state must not be NULL");
    st = moe_router_check_dims(dims, msg, msg_cap);
    if (st != MOE_OK) return st;
    if (dims->max_tokens < 0)
        return moe_fail(msg, msg_cap, MOE_ERR_INVALID_ARG, "max_tokens = %d is negative", dims->max_tokens);
    int32_t kp = (int32_t)moe_option_get(v, EC_N_OPTIONS, "max_per_token")->i;
    if (kp > dims->num_experts)
        return moe_fail(msg, msg_cap, MOE_ERR_OPTION,
                        "option 'max_per_token' = %d exceeds num_experts = %d; set it <= num_experts (or 0)", kp,
                        dims->num_experts);
    ec_state *s = malloc(sizeof *s);
    if (!s) return moe_fail(msg, msg_cap, MOE_ERR_NO_MEMORY, "out of host memory");
    s->E = dims->num_experts;
    s->K = dims->top_k;
    s->max_tokens = dims->max_tokens;
    s->max_per_token = kp;
    *state = s;
    return MOE_OK;
}

static void ec_destroy(void *state) { free(state); }

static moe_status ec_query(const void *state, moe_router_info *info) {
    const ec_state *s = state;
    if (!s || !info) return MOE_ERR_INVALID_ARG;
    memset(info, 0, sizeof *info);
    info->struct_size = sizeof *info;
    info->k_out = ec_k_out(s);
    if (s->max_per_token > 0) {
        info->flags = MOE_ROUTER_WEIGHT_SUM_EXACT;
        info->weight_sum = 1.0f;
    } else {
        /* Slot = the token's rank in its expert's list, and every expert
         * takes exactly min(C, T) tokens: its slots are 0 .. n_e - 1. (The
         * seed mode drops some chosen tokens, but there the host assigns
         * the slots.) */
        info->flags = MOE_ROUTER_OWNS_CAPACITY | MOE_ROUTER_DENSE_SLOTS;
    }
    /* One workspace serves whichever table the host calls: the larger need
     * (the CUDA path's, where it is built: expert_choice.cu). */
    info->workspace_bytes = moe_router_max_bytes(ec_workspace_bytes(s->max_tokens, s->E),
                                                 MOE_ROUTER_IF_CUDA(expert_choice_cuda_workspace_bytes(s), 0));
    return MOE_OK;
}

/* Checks shared by forward and backward: shapes, logits, workspace. */
static moe_status ec_check_common(const ec_state *s, const moe_context *ctx, int32_t T, int32_t E, int32_t k_out,
                                  const float *logits) {
    moe_status st = moe_router_check_shape(ctx, T, E, k_out, s->E, ec_k_out(s));
    if (st != MOE_OK || T == 0) return st;
    if (!logits) return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "logits must not be NULL");
    st = moe_router_check_token_logits_cpu(ctx, logits, T, E);
    if (st != MOE_OK) return st;
    /* Said outright: query() reports the CUDA path's larger need where it is
     * built, and that workspace would fit somewhat more than max_tokens here. */
    if (T > s->max_tokens)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "T = %d exceeds max_tokens = %d", T,
                        s->max_tokens);
    return moe_router_check_workspace_for(ctx, ec_workspace_bytes(T, E), T, s->max_tokens);
}

/* Routing order of tokens within one expert: larger score first, ties to the
 * lower token index. A strict total order (tokens are distinct), so qsort's
 * result does not depend on its algorithm. */
static int ec_candidate_cmp(const void *pa, const void *pb) {
    const ec_candidate *a = pa, *b = pb;
    return moe_ranks_before(a->score, a->token, b->score, b->token) ? -1 : 1;
}

static moe_status ec_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const ec_state *s = state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = ec_check_common(s, ctx, a->T, a->E, a->k_out, a->logits);
    if (st != MOE_OK || a->T == 0) return st;
    const int32_t T = a->T, E = s->E, k_out = ec_k_out(s);
    const int owns_capacity = s->max_per_token == 0;
    if (!a->expert || !a->weight || (owns_capacity && !a->slot))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "forward: expert, weight%s must not be NULL",
                        owns_capacity ? " and slot" : "");
    if (a->capacity < 0)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "capacity = %d is negative", a->capacity);
    const int32_t C = a->capacity < T ? a->capacity : T;

    float *S = ctx->workspace;
    int32_t *rank = (int32_t *)(S + (size_t)T * E);
    ec_candidate *cand = (ec_candidate *)(rank + (size_t)T * E);
    float *row = (float *)(cand + T);

    /* S[t,:] = softmax(l[t,:]) */
    for (int32_t t = 0; t < T; ++t) moe_softmax_row(a->logits + (size_t)t * E, S + (size_t)t * E, E, 1.0f);

    /* Each expert takes its top-C tokens by S[:,e]. */
    for (size_t i = 0; i < (size_t)T * E; ++i) rank[i] = -1;
    for (int32_t e = 0; e < E; ++e) {
        for (int32_t t = 0; t < T; ++t) {
            cand[t].score = S[(size_t)t * E + e];
            cand[t].token = t;
        }
        qsort(cand, (size_t)T, sizeof *cand, ec_candidate_cmp);
        for (int32_t r = 0; r < C; ++r) rank[(size_t)cand[r].token * E + e] = r;
    }

    for (int32_t t = 0; t < T; ++t) {
        const float *l = a->logits + (size_t)t * E;
        const float *St = S + (size_t)t * E;
        const int32_t *rt = rank + (size_t)t * E;
        int32_t *expert = a->expert + (size_t)t * k_out;
        float *weight = a->weight + (size_t)t * k_out;
        int32_t n = 0; /* entries written for this token */

        if (owns_capacity) {
            /* The paper: every expert that took t, ascending, weight S[t,e]. */
            int32_t *slot = a->slot + (size_t)t * k_out;
            for (int32_t e = 0; e < E; ++e) {
                if (rt[e] < 0) continue;
                expert[n] = e;
                weight[n] = St[e];
                slot[n] = rt[e];
                ++n;
            }
            for (int32_t j = n; j < k_out; ++j) slot[j] = -1;
        } else {
            /* Seed mode: keep the K' best-logit experts among those that took
             * t. Hiding the others behind -inf lets moe_topk_row apply the
             * project's order (larger logit, then lower expert) to the rest. */
            int32_t chosen = 0;
            for (int32_t e = 0; e < E; ++e) {
                row[e] = rt[e] >= 0 ? l[e] : -INFINITY;
                chosen += rt[e] >= 0;
            }
            if (chosen > 0) {
                n = chosen < k_out ? chosen : k_out;
                moe_topk_row(row, E, n, expert);
            } else {
                /* No expert wanted t: fall back to its own top-K' so that no
                 * token is silently skipped. */
                n = k_out;
                moe_topk_row(l, E, n, expert);
            }
            moe_softk_weights(l, expert, n, 1.0f, weight);
        }
        for (int32_t j = n; j < k_out; ++j) {
            expert[j] = -1;
            weight[j] = 0.0f;
        }
    }
    return MOE_OK;
}

/* The selection is piecewise constant in the logits; the gradient flows
 * through the weights of the chosen assignments only.
 *   paper mode: weight = S[t,e], so dS[t,e] = dweight for chosen (t,e), 0
 *     otherwise, and through the softmax dl_j = S_j (dS_j - sum_i S_i dS_i);
 *   seed mode: weights = softmax over the kept logits, the softk backward. */
static moe_status ec_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const ec_state *s = state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = ec_check_common(s, ctx, a->T, a->E, a->k_out, a->logits);
    if (st != MOE_OK || a->T == 0) return st;
    const int32_t T = a->T, E = s->E, k_out = ec_k_out(s);
    if (!a->expert || !a->weight || !a->dweight || !a->dlogits)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "backward: expert, weight, dweight and dlogits must not be NULL");
    /* Forward's entries: an expert, or -1 for an empty one. */
    st = moe_router_check_expert_entries_cpu(ctx, a->expert, T, k_out, -1, E);
    if (st != MOE_OK) return st;

    float *S = ctx->workspace; /* one row, S[t,:] */
    for (int32_t t = 0; t < T; ++t) {
        const int32_t *expert = a->expert + (size_t)t * k_out;
        const float *dweight = a->dweight + (size_t)t * k_out;
        float *dl = a->dlogits + (size_t)t * E;
        for (int32_t e = 0; e < E; ++e) dl[e] = 0.0f;

        if (s->max_per_token == 0) {
            /* dl holds dS first, then is turned into dl in place. */
            for (int32_t j = 0; j < k_out; ++j)
                if (expert[j] >= 0) dl[expert[j]] += dweight[j];
            moe_softmax_row(a->logits + (size_t)t * E, S, E, 1.0f);
            float dot = 0.0f; /* sum_i S_i dS_i */
            for (int32_t e = 0; e < E; ++e) dot += S[e] * dl[e];
            for (int32_t e = 0; e < E; ++e) dl[e] = S[e] * (dl[e] - dot);
        } else {
            /* Forward writes the kept experts first, then -1 entries. */
            int32_t n = 0;
            while (n < k_out && expert[n] >= 0) ++n;
            moe_softk_weights_backward(expert, a->weight + (size_t)t * k_out, dweight, n, 1.0f, dl);
        }
    }
    return MOE_OK;
}

static const moe_router_impl ec_cpu = {ec_forward, ec_backward};

MOE_ROUTER_PLUGIN_V1("expert_choice",
                     "Expert Choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax score",
                     ec_options, ec_create, ec_destroy, ec_query, &ec_cpu, MOE_ROUTER_CUDA_IMPL(expert_choice_cuda_impl))
