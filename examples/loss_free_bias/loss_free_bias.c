/*
 * loss_free_bias: auxiliary-loss-free load balancing with a per-expert bias
 * buffer (Wang et al. 2024; DeepSeek-V3). The method and the formulas are at
 * the top of loss_free_bias.h; this file holds the options, the instance, and
 * the CPU path. The CUDA path is loss_free_bias.cu, hooked in below when the
 * build compiles it (MOE_PLUGIN_HAS_CUDA).
 *
 *   [router]
 *   plugin = "loss_free_bias"
 *   update_rate = 0.001        # u
 *   score = "sigmoid"          # or "softmax"
 *   normalize = true           # weights divided by their sum over the chosen
 */
#include "loss_free_bias.h"

static const moe_option_spec lfb_options[] = {
    {"update_rate", MOE_OPT_FLOAT, "0.001", NULL, 0.0, 1.0,
     "u: each training step moves every expert's bias by u towards balanced load"},
    {"score", MOE_OPT_STRING, "sigmoid", "sigmoid|softmax",
     0.0, 0.0, "expert affinity s: sigmoid(l) (DeepSeek-V3) or softmax(l) over the experts"},
    {"normalize", MOE_OPT_BOOL, "true", NULL, 0.0, 0.0,
     "true: weights = s / (sum of s over the chosen); false: weights = s"},
};
#define LFB_N_OPTIONS ((int)(sizeof lfb_options / sizeof lfb_options[0]))

static moe_status lfb_create(const moe_router_dims *dims, const moe_option *opts, int32_t n_opts, void **state,
                             char *msg, size_t cap) {
    if (!dims || !state) return moe_fail(msg, cap, MOE_ERR_INVALID_ARG, "create: dims and state must not be NULL");
    moe_option v[LFB_N_OPTIONS];
    moe_status st = moe_options_resolve(lfb_options, LFB_N_OPTIONS, opts, n_opts, v, msg, cap);
    if (st != MOE_OK) return st;
    if (dims->num_experts < 1 || dims->top_k < 1)
        return moe_fail(msg, cap, MOE_ERR_INVALID_ARG, "num_experts = %d, top_k = %d; both must be >= 1",
                        dims->num_experts, dims->top_k);
    st = moe_router_check_dims(dims, msg, cap); /* top_k <= num_experts */
    if (st != MOE_OK) return st;
    lfb_state *s = malloc(sizeof *s);
    if (!s) return moe_fail(msg, cap, MOE_ERR_NO_MEMORY, "out of memory");
    s->E = dims->num_experts;
    s->K = dims->top_k;
    s->update_rate = (float)moe_option_get(v, LFB_N_OPTIONS, "update_rate")->f;
    /* Keep the choice, not the string: it may point into the host's config. */
    s->score = strcmp(moe_option_get(v, LFB_N_OPTIONS, "score")->s, "softmax") == 0 ? LFB_SOFTMAX : LFB_SIGMOID;
    s->normalize = moe_option_get(v, LFB_N_OPTIONS, "normalize")->i != 0;
    *state = s;
    return MOE_OK;
}

static void lfb_destroy(void *state) { free(state); }

static moe_status lfb_query(const void *state, moe_router_info *info) {
    const lfb_state *s = state;
    if (!s || !info) return MOE_ERR_INVALID_ARG;
    memset(info, 0, sizeof *info);
    info->struct_size = sizeof *info;
    info->k_out = s->K;
    info->flags = s->normalize ? MOE_ROUTER_WEIGHT_SUM_EXACT : 0;
    info->weight_sum = 1.0f;
    info->workspace_bytes = LFB_WORKSPACE_BYTES(s->E);
    /* One buffer: the bias b[E], zero at the start, checkpointed by the host. */
    info->n_buffers = 1;
    moe_tensor_spec *b = &info->buffers[0];
    snprintf(b->name, sizeof b->name, "bias");
    b->ndim = 1;
    b->shape[0] = s->E;
    b->init = MOE_INIT_ZEROS;
    return MOE_OK;
}

/* ---- CPU path ---- */

static moe_status lfb_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const lfb_state *s = state;
    moe_status st = lfb_check_call(s, ctx, a->T, a->E, a->k_out, a->buffers);
    if (st != MOE_OK || a->T == 0) return st;
    /* "logit of token t, expert e is nan; routing needs finite logits" */
    st = moe_router_check_token_logits_cpu(ctx, a->logits, a->T, s->E);
    if (st != MOE_OK) return st;
    const int32_t T = a->T, E = s->E, K = s->K;
    float *bias = a->buffers[0];
    for (int32_t t = 0; t < T; ++t)
        lfb_route_row(a->logits + (size_t)t * E, bias, E, K, s->score, s->normalize, a->expert + (size_t)t * K,
                      a->weight + (size_t)t * K);
    if (ctx->training) {
        /* The selection above used the bias as it was; now move it. */
        int32_t *count = ctx->workspace;
        memset(count, 0, (size_t)E * sizeof *count);
        for (size_t i = 0; i < (size_t)T * K; ++i) count[a->expert[i]]++;
        const double mean = (double)T * K / E;
        for (int32_t e = 0; e < E; ++e) bias[e] = lfb_bias_step(bias[e], count[e], mean, s->update_rate);
    }
    return MOE_OK;
}

static moe_status lfb_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const lfb_state *s = state;
    moe_status st = lfb_check_call(s, ctx, a->T, a->E, a->k_out, a->buffers);
    if (st != MOE_OK || a->T == 0) return st;
    st = moe_router_check_token_logits_cpu(ctx, a->logits, a->T, s->E);
    if (st != MOE_OK) return st;
    const int32_t E = s->E, K = s->K;
    /* The experts forward chose (the bias has moved since, so they are read,
     * not recomputed). */
    for (size_t i = 0; i < (size_t)a->T * K; ++i)
        if (a->expert[i] < 0 || a->expert[i] >= E)
            return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                            "backward: expert[%zu] = %d is not an expert this router chose", i, a->expert[i]);
    for (int32_t t = 0; t < a->T; ++t)
        lfb_backward_row(a->logits + (size_t)t * E, a->expert + (size_t)t * K, a->dweight + (size_t)t * K, E, K,
                         s->score, s->normalize, a->dlogits + (size_t)t * E);
    return MOE_OK;
}

static const moe_router_impl lfb_cpu = {lfb_forward, lfb_backward};

/* The CUDA table lives in loss_free_bias.cu, compiled when CUDA is enabled
 * (MOE_ROUTER_CUDA_IMPL names it only then, NULL otherwise). */
extern const moe_router_impl lfb_cuda;

/* The table (MOE_ROUTER_ABI_VERSION, the fields below in order) and the
 * exported moe_router_plugin_v1(). */
MOE_ROUTER_PLUGIN_V1("loss_free_bias",
                     "auxiliary-loss-free balancing (DeepSeek-V3): top-K of score + per-expert bias, weights from the score",
                     lfb_options, lfb_create, lfb_destroy, lfb_query, &lfb_cpu, MOE_ROUTER_CUDA_IMPL(lfb_cuda))
