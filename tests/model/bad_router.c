/*
 * bad_router: a deliberately broken router plugin for test_moe_layer. It has
 * a valid ABI table, so the loader accepts it; its forward then returns
 * assignments the host must refuse with an error naming the router (never
 * an out-of-bounds write in dispatch).
 *
 * Option `mode` picks the fault:
 *   0  expert = E              (one past the last expert)
 *   1  expert = -2             (below the "empty" marker -1)
 *   2  weight = NaN
 *   3  weight = -0.5
 *   4  owns capacity, slot = capacity (one past the last slot)
 *   5  owns capacity, two tokens in slot 0 of expert 0
 *   6  forward returns MOE_ERR_INTERNAL with a message
 *   7  no fault: token t goes to expert t % E with weight 1 (control)
 *   8  declares 16 bytes of workspace and writes the byte after them
 *   9  owns capacity with MOE_ROUTER_DENSE_SLOTS, but expert 0's tokens
 *      take slots 1, 2, ... (slot 0 left empty)
 *  10  no fault: owns capacity with dense slots, token t in slot t / E of
 *      expert t % E (control of 9)
 */
#include <moe/router.h>

typedef struct bad_state {
    int32_t E;
    int mode;
} bad_state;

static const moe_option_spec bad_options[] = {
    {"mode", MOE_OPT_INT, "0", NULL, 0.0, 10.0, "which fault to produce (see bad_router.c)"},
};
#define BAD_N_OPTIONS ((int)(sizeof bad_options / sizeof bad_options[0]))

static int bad_owns_capacity(const bad_state *s) { return s->mode == 4 || s->mode == 5 || s->mode >= 9; }
static int bad_dense_slots(const bad_state *s) { return s->mode >= 9; }

static moe_status bad_create(const moe_router_dims *dims, const moe_option *opts, int32_t n_opts, void **state,
                             char *msg, size_t msg_cap) {
    moe_option v[BAD_N_OPTIONS];
    moe_status st = moe_options_resolve(bad_options, BAD_N_OPTIONS, opts, n_opts, v, msg, msg_cap);
    if (st != MOE_OK) return st;
    bad_state *s = malloc(sizeof *s);
    if (!s) return moe_fail(msg, msg_cap, MOE_ERR_NO_MEMORY, "out of memory");
    s->E = dims->num_experts;
    s->mode = (int)moe_option_get(v, BAD_N_OPTIONS, "mode")->i;
    *state = s;
    return MOE_OK;
}

static void bad_destroy(void *state) { free(state); }

static moe_status bad_query(const void *state, moe_router_info *info) {
    const bad_state *s = state;
    memset(info, 0, sizeof *info);
    info->struct_size = sizeof *info;
    info->k_out = 1;
    info->flags = bad_owns_capacity(s) ? MOE_ROUTER_OWNS_CAPACITY : MOE_ROUTER_NO_GRAD;
    if (bad_dense_slots(s)) info->flags |= MOE_ROUTER_DENSE_SLOTS;
    info->workspace_bytes = s->mode == 8 ? 16 : 0;
    return MOE_OK;
}

static moe_status bad_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const bad_state *s = state;
    for (int32_t t = 0; t < a->T; ++t) {
        a->expert[t] = t % s->E;
        a->weight[t] = 1.0f;
        const int32_t want = t / s->E + (s->mode == 9 && t % s->E == 0); /* mode 9: expert 0 skips slot 0 */
        if (a->slot) a->slot[t] = want < a->capacity ? want : -1;
        if (a->slot && a->slot[t] < 0) {
            a->expert[t] = -1;
            a->weight[t] = 0.0f;
        }
    }
    int last = a->T - 1; /* the fault goes on the last token */
    switch (s->mode) {
    case 0: a->expert[last] = s->E; break;
    case 1: a->expert[last] = -2; break;
    case 2: a->weight[last] = NAN; break;
    case 3: a->weight[last] = -0.5f; break;
    case 4:
        a->expert[last] = 0;
        a->weight[last] = 1.0f;
        a->slot[last] = a->capacity;
        break;
    case 5:
        a->expert[0] = a->expert[last] = 0;
        a->weight[last] = 1.0f;
        a->slot[0] = a->slot[last] = 0;
        break;
    case 6: return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INTERNAL, "deliberate failure for the test");
    case 8: ((unsigned char *)ctx->workspace)[ctx->workspace_bytes] = 0; break;
    default: break;
    }
    return MOE_OK;
}

static moe_status bad_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    (void)state;
    (void)ctx;
    for (size_t i = 0; i < (size_t)a->T * a->E; ++i) a->dlogits[i] = 0.0f;
    return MOE_OK;
}

static const moe_router_impl bad_cpu = {bad_forward, bad_backward};

static const struct moe_router_plugin_v1 bad_plugin = {
    .abi_version = MOE_ROUTER_ABI_VERSION,
    .struct_size = sizeof(struct moe_router_plugin_v1),
    .name = "bad_router",
    .description = "test plugin that returns invalid assignments",
    .options = bad_options,
    .n_options = BAD_N_OPTIONS,
    .create = bad_create,
    .destroy = bad_destroy,
    .query = bad_query,
    .cpu = &bad_cpu,
    .cuda = NULL,
};

MOE_EXPORT const struct moe_router_plugin_v1 *moe_router_plugin_v1(void) { return &bad_plugin; }
