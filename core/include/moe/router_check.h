/*
 * MoE Routing Bench SDK: the checks every router plugin makes (header-only).
 *
 * A plugin refuses what it cannot serve with MOE_ERR_INVALID_ARG and a
 * message; the host prefixes the plugin's name. These helpers make the
 * checks the built-in routers share, with the messages their tests and
 * moe-conform's users see, so that a plugin's own code is its routing:
 *
 *   create()   moe_router_check_create_args, moe_router_check_dims
 *   query()    moe_router_info_reset
 *   a call     moe_router_check_T_E, moe_router_check_k_out, moe_router_check_shape,
 *              moe_router_check_workspace, moe_router_check_workspace_for,
 *              moe_router_check_fwd_args, moe_router_check_present
 *   values     moe_router_check_logits_cpu, moe_router_check_token_logits_cpu,
 *              moe_router_check_expert_entries_cpu (and the moe_router_fail_*
 *              messages they write, for a CUDA path that finds the bad value
 *              on the device: moe/router_cuda.cuh)
 *   the table  MOE_ROUTER_PLUGIN_V1, MOE_ROUTER_IF_CUDA, MOE_ROUTER_CUDA_IMPL
 *
 * Each check returns MOE_OK or the failing status with the message written
 * (moe_fail), so checks chain:
 *
 *     moe_status st = moe_router_check_T_E(ctx, a->T, a->E, s->num_experts);
 *     if (st == MOE_OK) st = moe_router_check_k_out(ctx, a->k_out, s->top_k);
 *     if (st != MOE_OK || a->T == 0) return st;
 *
 * Everything is static inline host code (C, and C++ under nvcc); <moe/router.h>
 * includes this file.
 */
#ifndef MOE_ROUTER_CHECK_H
#define MOE_ROUTER_CHECK_H

#include "router.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ */
/* create()                                                            */
/* ------------------------------------------------------------------ */

/* The arguments of create() themselves: dims and state not NULL, options an
 * array of n_opts >= 0. On success *state is NULL until the plugin sets it,
 * so a create that fails later leaves no instance behind. */
static inline moe_status moe_router_check_create_args(const moe_router_dims *dims, const moe_option *opts,
                                                      int32_t n_opts, void **state, char *msg, size_t cap) {
    if (!dims || !state || n_opts < 0 || (n_opts > 0 && !opts))
        return moe_fail(msg, cap, MOE_ERR_INVALID_ARG,
                        "create: dims and state must not be NULL, options must be an array of n_opts >= 0");
    *state = NULL;
    return MOE_OK;
}

/* The [moe] shapes no router can serve: num_experts < 1, top_k < 1,
 * top_k > num_experts (a router that ignores top_k still refuses these, so
 * that one config does not pass with it and fail with another router).
 * dims must not be NULL. */
static inline moe_status moe_router_check_dims(const moe_router_dims *dims, char *msg, size_t cap) {
    const int E = (int)dims->num_experts, K = (int)dims->top_k;
    if (E < 1) return moe_fail(msg, cap, MOE_ERR_INVALID_ARG, "num_experts = %d; set [moe].num_experts >= 1", E);
    if (K < 1) return moe_fail(msg, cap, MOE_ERR_INVALID_ARG, "top_k = %d; set [moe].top_k >= 1", K);
    if (K > E)
        return moe_fail(msg, cap, MOE_ERR_INVALID_ARG,
                        "top_k = %d exceeds num_experts = %d; set [moe].top_k <= num_experts", K, E);
    return MOE_OK;
}

/* ------------------------------------------------------------------ */
/* query()                                                             */
/* ------------------------------------------------------------------ */

/* Refuses a NULL info or one smaller than this SDK's moe_router_info, then
 * zeroes it, keeping the host's struct_size. */
static inline moe_status moe_router_info_reset(moe_router_info *info) {
    if (!info || info->struct_size < sizeof *info) return MOE_ERR_INVALID_ARG;
    const uint32_t host_size = info->struct_size;
    memset(info, 0, sizeof *info);
    info->struct_size = host_size;
    return MOE_OK;
}

/* The larger of two workspace needs: query() reports one size, which must
 * serve whichever table (CPU or CUDA) the host calls. */
static inline size_t moe_router_max_bytes(size_t a, size_t b) { return a > b ? a : b; }

/* ------------------------------------------------------------------ */
/* forward() and backward(): shapes, pointers, workspace               */
/* ------------------------------------------------------------------ */

/* T >= 0, and E is the num_experts the instance was created with. */
static inline moe_status moe_router_check_T_E(const moe_context *ctx, int32_t T, int32_t E, int32_t num_experts) {
    if (T < 0) return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "T = %d is negative", (int)T);
    if (E != num_experts)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "E = %d but this instance was created with num_experts = %d", (int)E, (int)num_experts);
    return MOE_OK;
}

/* k_out is the top_k the instance writes per token. */
static inline moe_status moe_router_check_k_out(const moe_context *ctx, int32_t k_out, int32_t top_k) {
    if (k_out != top_k)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "k_out = %d but this instance writes top_k = %d assignments per token", (int)k_out,
                        (int)top_k);
    return MOE_OK;
}

/* T >= 0, and (E, k_out) are the instance's, refused together in one message. */
static inline moe_status moe_router_check_shape(const moe_context *ctx, int32_t T, int32_t E, int32_t k_out,
                                                int32_t num_experts, int32_t want_k_out) {
    if (T < 0) return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "T = %d is negative", (int)T);
    if (E != num_experts || k_out != want_k_out)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "called with E = %d, k_out = %d; this instance has E = %d, k_out = %d", (int)E, (int)k_out,
                        (int)num_experts, (int)want_k_out);
    return MOE_OK;
}

/* A workspace of at least `need` bytes, for a plugin whose need does not
 * depend on T (the size query() reported). */
static inline moe_status moe_router_check_workspace(const moe_context *ctx, size_t need) {
    if (!ctx->workspace || ctx->workspace_bytes < need)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "workspace of %zu bytes given, query() asked for %zu", ctx->workspace_bytes, need);
    return MOE_OK;
}

/* A workspace of at least `need` bytes for this call's T, for a plugin that
 * sized its workspace for max_tokens tokens: the message says which bound the
 * call broke. */
static inline moe_status moe_router_check_workspace_for(const moe_context *ctx, size_t need, int32_t T,
                                                        int32_t max_tokens) {
    if (!ctx->workspace || ctx->workspace_bytes < need)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "workspace of %zu bytes is too small for T = %d (needs %zu; max_tokens = %d)",
                        ctx->workspace ? ctx->workspace_bytes : (size_t)0, (int)T, need, (int)max_tokens);
    return MOE_OK;
}

/* With T > 0, every pointer a call needs is there: `present` is their test
 * (a->logits && a->dweight), `what` names them for the message,
 * "<what> must not be NULL when T = <T> > 0". */
static inline moe_status moe_router_check_present(const moe_context *ctx, int32_t T, int present, const char *what) {
    if (T > 0 && !present)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "%s must not be NULL when T = %d > 0", what,
                        (int)T);
    return MOE_OK;
}

/* Forward's inputs and outputs of a token-choice router: logits, expert and
 * weight (with T > 0). */
static inline moe_status moe_router_check_fwd_args(const moe_context *ctx, const moe_router_fwd_args *a) {
    return moe_router_check_present(ctx, a->T, a->logits && a->expert && a->weight,
                                    "forward: logits, expert and weight");
}

/* ------------------------------------------------------------------ */
/* Values: non-finite logits, expert entries out of range              */
/* ------------------------------------------------------------------ */
/* All of them are checked before any output is written, so a refused call
 * leaves no half-routed batch behind. A CUDA path finds the first bad value
 * on the device (moe/router_cuda.cuh) and writes the same message with the
 * moe_router_fail_* function, so both devices answer alike. */

/* "logit[t,e] is NaN: the gate produced a non-finite value" (or +Inf, -Inf). */
static inline moe_status moe_router_fail_logit(const moe_context *ctx, size_t t, size_t e, float v) {
    return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                    "logit[%d,%d] is %s: the gate produced a non-finite value", (int)t, (int)e,
                    isnan(v) ? "NaN" : (v > 0 ? "+Inf" : "-Inf"));
}

/* "logit of token t, expert e is nan; routing needs finite logits" (the value printed with %g). */
static inline moe_status moe_router_fail_token_logit(const moe_context *ctx, size_t t, size_t e, float v) {
    return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                    "logit of token %d, expert %d is %g; routing needs finite logits", (int)t, (int)e, (double)v);
}

/* Index of the first non-finite value of v[0..n), or n when all are finite. */
static inline size_t moe_first_nonfinite(const float *v, size_t n) {
    size_t i = 0;
    while (i < n && isfinite(v[i])) ++i;
    return i;
}

/* Every logits[T,E] finite, else the first bad one in row-major order is
 * refused with moe_router_fail_logit. */
static inline moe_status moe_router_check_logits_cpu(const moe_context *ctx, const float *logits, int32_t T,
                                                     int32_t E) {
    const size_t n = (size_t)(T > 0 ? T : 0) * (size_t)(E > 0 ? E : 0);
    const size_t i = moe_first_nonfinite(logits, n);
    return i < n ? moe_router_fail_logit(ctx, i / (size_t)E, i % (size_t)E, logits[i]) : MOE_OK;
}

/* The same check, refusing with moe_router_fail_token_logit. */
static inline moe_status moe_router_check_token_logits_cpu(const moe_context *ctx, const float *logits, int32_t T,
                                                           int32_t E) {
    const size_t n = (size_t)(T > 0 ? T : 0) * (size_t)(E > 0 ? E : 0);
    const size_t i = moe_first_nonfinite(logits, n);
    return i < n ? moe_router_fail_token_logit(ctx, i / (size_t)E, i % (size_t)E, logits[i]) : MOE_OK;
}

/* "backward: token t, entry j names expert x, outside [lo, E)" for entry
 * i = t*k_out + j holding x. */
static inline moe_status moe_router_fail_expert_entry(const moe_context *ctx, size_t i, int32_t k_out, int32_t x,
                                                      int32_t lo, int32_t E) {
    return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                    "backward: token %d, entry %d names expert %d, outside [%d, %d)", (int)(i / (size_t)k_out),
                    (int)(i % (size_t)k_out), (int)x, (int)lo, (int)E);
}

/* Backward's expert[T,k_out] (forward's output, as the host passes it back)
 * within [lo, E): lo = -1 where forward writes empty entries, 0 where it
 * never does. The first entry outside is refused with
 * moe_router_fail_expert_entry. */
static inline moe_status moe_router_check_expert_entries_cpu(const moe_context *ctx, const int32_t *expert, int32_t T,
                                                             int32_t k_out, int32_t lo, int32_t E) {
    const size_t n = (size_t)(T > 0 ? T : 0) * (size_t)(k_out > 0 ? k_out : 0);
    for (size_t i = 0; i < n; ++i)
        if (expert[i] < lo || expert[i] >= E) return moe_router_fail_expert_entry(ctx, i, k_out, expert[i], lo, E);
    return MOE_OK;
}

#ifdef __cplusplus
}
#endif

/* ------------------------------------------------------------------ */
/* The plugin table                                                    */
/* ------------------------------------------------------------------ */

/* A plugin built by moe_add_router_plugin() with CUDA_SOURCES sees
 * MOE_PLUGIN_HAS_CUDA when the build compiles them. MOE_ROUTER_IF_CUDA(a, b)
 * is `a` then and `b` otherwise, so the C file can name what its .cu file
 * defines without #ifdef blocks (an extern declaration that is never used
 * needs no definition):
 *
 *     extern const moe_router_impl my_cuda_impl;          defined in my.cu
 *     size_t my_cuda_workspace_bytes(const my_state *s);  defined in my.cu
 *     ...
 *     info->workspace_bytes = moe_router_max_bytes(my_workspace_bytes(s),
 *                                                  MOE_ROUTER_IF_CUDA(my_cuda_workspace_bytes(s), 0));
 */
#ifdef MOE_PLUGIN_HAS_CUDA
#define MOE_ROUTER_IF_CUDA(with_cuda, without_cuda) (with_cuda)
#else
#define MOE_ROUTER_IF_CUDA(with_cuda, without_cuda) (without_cuda)
#endif

/* The `cuda` member of the table: &impl when the build compiled the .cu file, else NULL. */
#define MOE_ROUTER_CUDA_IMPL(impl) MOE_ROUTER_IF_CUDA(&(impl), NULL)

/* The version-1 table and the exported entry point of a plugin written in C,
 * the fields in the order of struct moe_router_plugin_v1; `options` must be
 * the array itself (n_options is its length):
 *
 *     MOE_ROUTER_PLUGIN_V1("my_router", "one line for `moehost plugins`", my_options,
 *                          my_create, my_destroy, my_query, &my_cpu, MOE_ROUTER_CUDA_IMPL(my_cuda_impl))
 *
 * expands to
 *
 *     static const struct moe_router_plugin_v1 moe_router_plugin_v1_table = {
 *         .abi_version = MOE_ROUTER_ABI_VERSION, .struct_size = sizeof(struct moe_router_plugin_v1),
 *         .name = "my_router", .description = "...", .options = my_options, .n_options = <length>,
 *         .create = my_create, .destroy = my_destroy, .query = my_query, .cpu = &my_cpu, .cuda = ...,
 *     };
 *     MOE_EXPORT const struct moe_router_plugin_v1 *moe_router_plugin_v1(void) { return &moe_router_plugin_v1_table; }
 */
#define MOE_ROUTER_PLUGIN_V1(name_, description_, options_, create_, destroy_, query_, cpu_, cuda_)            \
    static const struct moe_router_plugin_v1 moe_router_plugin_v1_table = {                                   \
        .abi_version = MOE_ROUTER_ABI_VERSION,                                                                \
        .struct_size = sizeof(struct moe_router_plugin_v1),                                                   \
        .name = (name_),                                                                                      \
        .description = (description_),                                                                        \
        .options = (options_),                                                                                \
        .n_options = (int32_t)(sizeof(options_) / sizeof((options_)[0])),                                     \
        .create = (create_),                                                                                  \
        .destroy = (destroy_),                                                                                \
        .query = (query_),                                                                                    \
        .cpu = (cpu_),                                                                                        \
        .cuda = (cuda_),                                                                                      \
    };                                                                                                        \
    MOE_EXPORT const struct moe_router_plugin_v1 *moe_router_plugin_v1(void) { return &moe_router_plugin_v1_table; }

#endif
