/*
 * noisy_topk: Noisy Top-K gating (Shazeer et al. 2017, "Outrageously Large
 * Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer"), and the
 * fixed-noise variant of the seed bench's routing-noise study.
 *
 * In training the router routes on perturbed logits
 *
 *   l'[t,e] = l[t,e] + sigma[t,e] * n[t,e],      n ~ N(0,1)
 *   sigma   = softplus(x W_noise)    learned = true (the paper)
 *   sigma   = noise_std              learned = false
 *
 * and in evaluation on l' = l. Then softk on l': the top-K experts of l' with
 * weights softmax(l'_selected / temperature). The noise lets experts that are
 * just below the cut receive tokens (and gradient) now and then, which is the
 * paper's remedy for experts that stop being chosen; with learned sigma the
 * model can turn it down where it hurts.
 *
 * The noise n[t,e] is drawn from Philox keyed by the host's (seed, step,
 * layer) at element t*E + e, so backward regenerates exactly the draws of
 * forward, and the CPU and CUDA paths agree. route_logits = l' is written in
 * every call: the host's load-balancing loss uses softmax(l') and hands its
 * gradient back as d_route_logits.
 *
 * Gradient (the routing decision itself is piecewise constant):
 *   dl'     = softk backward of dweight  +  d_route_logits
 *   dlogits = dl'                                   (dl'/dl = 1)
 *   learned, training:  dsigma = dl' n,  dpre = dsigma sigmoid(pre),
 *                       dW_noise += x^T dpre,  dx += dpre W_noise^T
 * with pre = x W_noise, since d softplus(z)/dz = sigmoid(z).
 *
 * With learned noise the plugin declares a saved buffer (moe_router_info.
 * saved_bytes): in training the forward stores sigmoid(pre) and n there, and
 * the backward reads them instead of summing pre over d_model again and
 * drawing n again (the same floats: the stored ones are the ones the
 * forward computed). A host that passes no buffer (an older one) gets the
 * backward that computes them again. Layout for T tokens (noisy_saved_at):
 *   sig      [T,E] float  sigmoid(pre)
 *   noise    [T,E] float  n
 */
#include <moe/router.h>

typedef struct noisy_state {
    int32_t E, K, d_model;
    int learned;
    float noise_std;
    float temperature;
    int32_t max_tokens;  /* bound on T: sizes the CUDA path's scratch and the saved buffer */
} noisy_state;

/* The saved buffer's parts for one call (see the top); all NULL without one. */
typedef struct noisy_saved {
    float *sig, *noise;
} noisy_saved;

noisy_saved noisy_saved_fwd(const noisy_state *s, const moe_router_fwd_args *a);
noisy_saved noisy_saved_bwd(const noisy_state *s, const moe_router_bwd_args *a);

static size_t noisy_saved_bytes(const noisy_state *s) {
    if (!s->learned) return 0;
    return 2 * (size_t)s->max_tokens * (size_t)s->E * sizeof(float);
}

/* The parts of `saved` for T tokens; none when there is no buffer or T is
 * more than it was sized for. */
static noisy_saved noisy_saved_at(const noisy_state *s, void *saved, int32_t T) {
    noisy_saved p = {NULL, NULL};
    if (!saved || !s->learned || T > s->max_tokens) return p;
    p.sig = (float *)saved;
    p.noise = p.sig + (size_t)T * s->E;
    return p;
}

/* `saved` exists in the arguments only when the host is as new as the field. */
noisy_saved noisy_saved_fwd(const noisy_state *s, const moe_router_fwd_args *a) {
    const int has = a->struct_size >= offsetof(moe_router_fwd_args, saved) + sizeof a->saved;
    return noisy_saved_at(s, has ? a->saved : NULL, a->T);
}

noisy_saved noisy_saved_bwd(const noisy_state *s, const moe_router_bwd_args *a) {
    const int has = a->struct_size >= offsetof(moe_router_bwd_args, saved) + sizeof a->saved;
    return noisy_saved_at(s, has ? a->saved : NULL, a->T);
}

/* The CUDA path (noisy_topk.cu): its table, and the workspace it needs. Defined
 * only when the build compiles noisy_topk.cu; MOE_ROUTER_IF_CUDA uses them only then. */
extern const moe_router_impl noisy_topk_cuda_impl;
size_t noisy_topk_cuda_workspace_bytes(const noisy_state *s);

static const moe_option_spec noisy_options[] = {
    {"learned", MOE_OPT_BOOL, "true", NULL, 0.0, 0.0,
     "sigma = softplus(x W_noise) with a trained W_noise (Shazeer et al.); false: sigma = noise_std"},
    {"noise_std", MOE_OPT_FLOAT, "1.0", NULL, 0.0, 100.0, "fixed noise scale sigma when learned = false"},
    {"temperature", MOE_OPT_FLOAT, "1.0", NULL, 1e-3, 1e3,
     "weights = softmax(selected l' / temperature)"},
};
#define NOISY_N_OPTIONS ((int)(sizeof noisy_options / sizeof noisy_options[0]))

/* softplus(z) = log(1 + e^z) = max(z, 0) + log1p(e^-|z|): the exponent is
 * never positive, so large |z| neither overflows nor loses the small term. */
static float noisy_softplus(float z) { return fmaxf(z, 0.0f) + log1pf(expf(-fabsf(z))); }

/* sigmoid(z) = 1 / (1 + e^-z), evaluated with a non-positive exponent. */
static float noisy_sigmoid(float z) {
    if (z >= 0.0f) return 1.0f / (1.0f + expf(-z));
    float ez = expf(z);
    return ez / (1.0f + ez);
}

/* pre[t,e] = sum_d x[t,d] W_noise[d,e]  (W_noise is [d_model, E], row-major). */
static float noisy_pre(const float *x_t, const float *w_noise, int32_t d_model, int32_t E, int32_t e) {
    float acc = 0.0f;
    for (int32_t d = 0; d < d_model; ++d) acc += x_t[d] * w_noise[(size_t)d * E + e];
    return acc;
}

static moe_status noisy_create(const moe_router_dims *dims, const moe_option *opts, int32_t n_opts, void **state,
                               char *msg, size_t msg_cap) {
    moe_option v[NOISY_N_OPTIONS];
    moe_status st = moe_options_resolve(noisy_options, NOISY_N_OPTIONS, opts, n_opts, v, msg, msg_cap);
    if (st != MOE_OK) return st;
    if (!dims || !state) return moe_fail(msg, msg_cap, MOE_ERR_INVALID_ARG, "create: dims and state must not be NULL");
    st = moe_router_check_dims(dims, msg, msg_cap);
    if (st != MOE_OK) return st;
    int learned = moe_option_get(v, NOISY_N_OPTIONS, "learned")->i != 0;
    if (learned && dims->d_model < 1)
        return moe_fail(msg, msg_cap, MOE_ERR_INVALID_ARG,
                        "d_model = %d; learned noise projects x[T,d_model] (or set [router].learned = false)",
                        dims->d_model);
    noisy_state *s = malloc(sizeof *s);
    if (!s) return moe_fail(msg, msg_cap, MOE_ERR_NO_MEMORY, "out of host memory");
    s->E = dims->num_experts;
    s->K = dims->top_k;
    s->d_model = dims->d_model;
    s->max_tokens = dims->max_tokens > 0 ? dims->max_tokens : 0;
    s->learned = learned;
    s->noise_std = (float)moe_option_get(v, NOISY_N_OPTIONS, "noise_std")->f;
    s->temperature = (float)moe_option_get(v, NOISY_N_OPTIONS, "temperature")->f;
    *state = s;
    return MOE_OK;
}

static void noisy_destroy(void *state) { free(state); }

static moe_status noisy_query(const void *state, moe_router_info *info) {
    const noisy_state *s = state;
    if (!s || !info) return MOE_ERR_INVALID_ARG;
    memset(info, 0, sizeof *info);
    info->struct_size = sizeof *info;
    info->k_out = s->K;
    info->flags = MOE_ROUTER_PERTURBS_LOGITS | MOE_ROUTER_WEIGHT_SUM_EXACT;
    info->weight_sum = 1.0f;
    /* The CPU path needs none; the CUDA path's flags and scratch when it is built. */
    info->workspace_bytes = MOE_ROUTER_IF_CUDA(noisy_topk_cuda_workspace_bytes(s), 0);
    info->saved_bytes = noisy_saved_bytes(s);
    if (s->learned) {
        /* Zero init as in the paper: every sigma starts at softplus(0) = ln 2
         * and training moves it. Decaying W_noise would pull sigma back
         * towards ln 2 for no reason, hence no weight decay. */
        moe_tensor_spec *w = &info->params[0];
        snprintf(w->name, sizeof w->name, "w_noise");
        w->ndim = 2;
        w->shape[0] = s->d_model;
        w->shape[1] = s->E;
        w->init = MOE_INIT_ZEROS;
        w->init_value = 0.0f;
        w->weight_decay = 0;
        info->n_params = 1;
    }
    return MOE_OK;
}

/* Checks shared by forward and backward. Learned sigma in training also
 * reads x and W_noise. */
static moe_status noisy_check_common(const noisy_state *s, const moe_context *ctx, int32_t T, int32_t E,
                                     int32_t k_out, const float *logits, const float *x, float *const *params) {
    moe_status st = moe_router_check_shape(ctx, T, E, k_out, s->E, s->K);
    if (st != MOE_OK || T == 0) return st;
    if (!logits) return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "logits must not be NULL");
    st = moe_router_check_token_logits_cpu(ctx, logits, T, E);
    if (st != MOE_OK) return st;
    if (s->learned && ctx->training && (!x || !params || !params[0]))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "learned noise in training needs x and the w_noise parameter (got NULL)");
    return MOE_OK;
}

/* sigma[t,e] * n[t,e], the perturbation of one logit in training; with a
 * saved buffer (learned noise) also sigmoid(pre) and n into it. */
static float noisy_perturbation(const noisy_state *s, const moe_context *ctx, const float *x_t, const float *w_noise,
                                int32_t t, int32_t e, const noisy_saved *saved) {
    const size_t i = (size_t)t * (size_t)s->E + (size_t)e;
    float n = moe_rng_normal(ctx->rng, (uint64_t)i);
    float sigma = s->noise_std;
    if (s->learned) {
        float pre = noisy_pre(x_t, w_noise, s->d_model, s->E, e);
        sigma = noisy_softplus(pre);
        if (saved->sig) {
            saved->sig[i] = noisy_sigmoid(pre);
            saved->noise[i] = n;
        }
    }
    return sigma * n;
}

static moe_status noisy_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const noisy_state *s = state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = noisy_check_common(s, ctx, a->T, a->E, a->k_out, a->logits, a->x, a->params);
    if (st != MOE_OK || a->T == 0) return st;
    if (!a->expert || !a->weight || !a->route_logits)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "forward: expert, weight and route_logits must not be NULL");
    const int32_t E = s->E, K = s->K;
    const float *w_noise = s->learned && ctx->training ? a->params[0] : NULL;
    noisy_saved saved = {NULL, NULL};
    if (w_noise) saved = noisy_saved_fwd(s, a);
    for (int32_t t = 0; t < a->T; ++t) {
        const float *l = a->logits + (size_t)t * E;
        const float *x_t = w_noise ? a->x + (size_t)t * s->d_model : NULL;
        float *lp = a->route_logits + (size_t)t * E; /* l' */
        for (int32_t e = 0; e < E; ++e) {
            /* In evaluation l' is l exactly, not l + 0 * n. */
            lp[e] = ctx->training ? l[e] + noisy_perturbation(s, ctx, x_t, w_noise, t, e, &saved) : l[e];
            if (!isfinite(lp[e]))
                return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                                "perturbed logit of token %d, expert %d is %g; check x and w_noise", t, e,
                                (double)lp[e]);
        }
        int32_t *expert = a->expert + (size_t)t * K;
        moe_topk_row(lp, E, K, expert);
        moe_softk_weights(lp, expert, K, s->temperature, a->weight + (size_t)t * K);
    }
    return MOE_OK;
}

static moe_status noisy_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const noisy_state *s = state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = noisy_check_common(s, ctx, a->T, a->E, a->k_out, a->logits, a->x, a->params);
    if (st != MOE_OK || a->T == 0) return st;
    const int32_t E = s->E, K = s->K, D = s->d_model;
    const int noise_path = s->learned && ctx->training;
    if (!a->expert || !a->weight || !a->dweight || !a->dlogits)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "backward: expert, weight, dweight and dlogits must not be NULL");
    if (noise_path && (!a->dx || !a->param_grads || !a->param_grads[0]))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "backward: learned noise in training needs dx and the w_noise gradient (got NULL)");
    /* Forward fills every entry: an expert, never -1. */
    st = moe_router_check_expert_entries_cpu(ctx, a->expert, a->T, K, 0, E);
    if (st != MOE_OK) return st;
    noisy_saved saved = {NULL, NULL}; /* the forward's sigmoid(pre) and n, if the host kept them */
    if (noise_path) saved = noisy_saved_bwd(s, a);

    for (int32_t t = 0; t < a->T; ++t) {
        /* dl' is built in the dlogits row, which is also the final dlogits. */
        float *dlp = a->dlogits + (size_t)t * E;
        for (int32_t e = 0; e < E; ++e) dlp[e] = a->d_route_logits ? a->d_route_logits[(size_t)t * E + e] : 0.0f;
        moe_softk_weights_backward(a->expert + (size_t)t * K, a->weight + (size_t)t * K, a->dweight + (size_t)t * K,
                                   K, s->temperature, dlp);
        if (!noise_path) continue;

        const float *x_t = a->x + (size_t)t * D;
        const float *W = a->params[0];
        float *dW = a->param_grads[0];
        float *dx_t = a->dx + (size_t)t * D;
        for (int32_t e = 0; e < E; ++e) {
            const size_t i = (size_t)t * (size_t)E + (size_t)e;
            float n = saved.noise ? saved.noise[i] : moe_rng_normal(ctx->rng, (uint64_t)i); /* forward's draw */
            float sig = saved.sig ? saved.sig[i] : noisy_sigmoid(noisy_pre(x_t, W, D, E, e));
            float dsigma = dlp[e] * n;
            float dpre = dsigma * sig;
            for (int32_t d = 0; d < D; ++d) {
                dW[(size_t)d * E + e] += x_t[d] * dpre;
                dx_t[d] += dpre * W[(size_t)d * E + e];
            }
        }
    }
    return MOE_OK;
}

static const moe_router_impl noisy_cpu = {noisy_forward, noisy_backward};

MOE_ROUTER_PLUGIN_V1("noisy_topk",
                     "Noisy Top-K (Shazeer et al. 2017): softk on l + sigma * N(0,1) in training, sigma fixed or learned",
                     noisy_options, noisy_create, noisy_destroy, noisy_query, &noisy_cpu,
                     MOE_ROUTER_CUDA_IMPL(noisy_topk_cuda_impl))
