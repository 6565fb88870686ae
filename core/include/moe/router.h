/*
 * MoE Routing Bench SDK: the router plugin ABI, version 1.
 *
 * This is the one header a router plugin needs. A plugin is a shared library
 * that exports one function per ABI version it implements:
 *
 *     MOE_EXPORT const struct moe_router_plugin_v1 *moe_router_plugin_v1(void);
 *
 * The host looks for the newest version it knows (MOE_ROUTER_ABI_VERSION),
 * then older ones it still supports, and refuses anything else with a message
 * naming the file, the version found and the versions supported.
 *
 * Data flow of one MoE layer (the host's side is core/model/moe.c):
 *
 *   x[T,d] --gate (host)--> logits[T,E] (fp32)
 *          --router.forward--> expert[T,Kout], weight[T,Kout] (+ slot if the
 *                              router owns capacity)
 *          --capacity, dispatch, experts, combine (host)--> y[T,d]
 *
 * Backward: the host computes dweight[t,k] = <dy[t], Y[expert, slot]> for kept
 * assignments (0 for dropped ones) and calls router.backward, which returns
 * dlogits[T,E]. The host adds the load-balancing and z-loss gradients itself.
 *
 * Conventions:
 *   - Row-major, fp32 router math, int32 indices.
 *   - expert == -1 marks an empty or dropped assignment (its weight is 0).
 *   - Ties go to the lower expert index (and the lower token index where
 *     experts choose tokens).
 *   - Same inputs and RNG key give bitwise the same outputs on a device.
 *   - Pointers in the args live in the memory of ctx->device.
 *   - Every call returns a moe_status; on failure write ctx->msg.
 *
 * ABI evolution: see the rules at the top of moe/abi.h. In short, fields may
 * be appended to the END of argument structs within version 1 (check
 * struct_size); any other change is moe_router_plugin_v2.
 */
#ifndef MOE_ROUTER_H
#define MOE_ROUTER_H

#include "abi.h"
#include "philox.h"
#include "router_util.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_ROUTER_ABI_VERSION 1
#define MOE_ROUTER_SYMBOL_V1 "moe_router_plugin_v1"

/* Sizes the host fixes when it creates a router instance (one per layer). */
typedef struct moe_router_dims {
    uint32_t struct_size;
    int32_t num_experts;      /* E */
    int32_t top_k;            /* K from [moe].top_k */
    int32_t d_model;          /* width of x, the gate's input */
    int32_t vocab_size;       /* for routers keyed on token ids */
    int32_t max_tokens;       /* upper bound on T in any call */
    int32_t layer;            /* which MoE layer this instance serves */
    double capacity_factor;   /* CF from [moe] */
} moe_router_dims;

/* Capability and contract flags (moe_router_info.flags). */
enum {
    /* The router assigns slots itself (expert choice): it writes slot[] and
     * guarantees at most `capacity` tokens per expert. The host then skips
     * its own capacity step. */
    MOE_ROUTER_OWNS_CAPACITY = 1u << 0,
    /* In training the router routes on perturbed logits l' (noisy top-k). It
     * writes route_logits[T,E] = l' in forward; the host's load-balancing
     * loss uses softmax(l') and passes its gradient d_route_logits back. */
    MOE_ROUTER_PERTURBS_LOGITS = 1u << 1,
    /* No gradient flows from the routing weights to the logits (fixed
     * weights, hash routing). The host does not call backward; dlogits are 0
     * apart from the auxiliary losses. */
    MOE_ROUTER_NO_GRAD = 1u << 2,
    /* The weights of each token's non-empty assignments sum to weight_sum
     * (before capacity). Checked by moe-conform. */
    MOE_ROUTER_WEIGHT_SUM_EXACT = 1u << 3,
    /* The router ignores the logits (hash routing). */
    MOE_ROUTER_IGNORES_LOGITS = 1u << 4,
    /* With MOE_ROUTER_OWNS_CAPACITY (ignored without): each expert's
     * assignments (expert >= 0) use exactly the slots 0 .. n_e - 1, n_e
     * being the number of assignments to that expert (expert choice, whose
     * slot is the token's rank in the expert's list). The host then knows
     * which expert rows are empty without marking the filled ones. It
     * verifies the promise in every forward and stops with an error naming
     * the router when a slot below n_e is left empty; moe-conform checks it
     * too. A router that may leave gaps must not set it. */
    MOE_ROUTER_DENSE_SLOTS = 1u << 5
};

/* What an instance tells the host after create(). */
typedef struct moe_router_info {
    uint32_t struct_size;
    int32_t k_out;          /* assignments per token written by forward */
    uint32_t flags;         /* MOE_ROUTER_* */
    float weight_sum;       /* with MOE_ROUTER_WEIGHT_SUM_EXACT */
    size_t workspace_bytes; /* scratch needed for max_tokens tokens */
    int32_t n_params;       /* trainable tensors, optimized by the host */
    moe_tensor_spec params[MOE_MAX_PLUGIN_TENSORS];
    int32_t n_buffers;      /* state tensors (not trained), checkpointed by the host */
    moe_tensor_spec buffers[MOE_MAX_PLUGIN_TENSORS];
    /* Appended within version 1 (a host reads it only when struct_size
     * covers it, else takes 0). Bytes of memory on ctx->device that the host
     * keeps per instance from a forward to the backward that follows it, for
     * values the backward needs that the forward computed (so that the
     * backward need not compute them again); for max_tokens tokens. 0: none.
     * The host owns it, passes it as `saved` to both calls and does not read
     * or write it; its content is undefined before the first forward. In
     * training each forward is followed by its backward before the next
     * forward (with gradient accumulation: each micro-batch's forward, then
     * its backward); an evaluation forward (ctx->training == 0) may come in
     * between only where no backward follows it. */
    size_t saved_bytes;
} moe_router_info;

typedef struct moe_router_fwd_args {
    uint32_t struct_size;
    int32_t T;                  /* tokens in this call, may be 0 */
    int32_t E;                  /* experts */
    int32_t k_out;              /* from info */
    int32_t capacity;           /* C = ceil(CF * T * K / E), for routers that own capacity */
    int32_t d_model;
    const float *logits;        /* [T,E] gate output */
    const float *x;             /* [T,d_model] gate input (learned noise uses it) */
    const int32_t *token_ids;   /* [T] vocabulary ids of the tokens */
    float *const *params;       /* the declared params, in declaration order */
    float *const *buffers;      /* the declared buffers; writable in training */
    int32_t *expert;            /* out [T,k_out], -1 for empty */
    float *weight;              /* out [T,k_out], 0 for empty */
    int32_t *slot;              /* out [T,k_out] with OWNS_CAPACITY, else NULL */
    float *route_logits;        /* out [T,E] with PERTURBS_LOGITS, else NULL */
    /* Appended within version 1: read or write it only when struct_size
     * covers it (an older host passes a smaller struct: then there is no
     * saved buffer, and the backward computes again what it needs). */
    void *saved;                /* info.saved_bytes of the host's memory, NULL when saved_bytes is 0 */
} moe_router_fwd_args;

typedef struct moe_router_bwd_args {
    uint32_t struct_size;
    int32_t T, E, k_out, capacity, d_model;
    const float *logits;          /* as in forward */
    const float *x;
    const int32_t *token_ids;
    float *const *params;
    float *const *buffers;
    const int32_t *expert;        /* forward's outputs */
    const float *weight;
    const int32_t *slot;          /* NULL unless OWNS_CAPACITY */
    const float *route_logits;    /* NULL unless PERTURBS_LOGITS */
    const float *dweight;         /* [T,k_out] dL/dweight; 0 where dropped or empty */
    const float *d_route_logits;  /* [T,E] dL/droute_logits or NULL */
    float *dlogits;               /* out [T,E], overwritten */
    float *dx;                    /* [T,d_model], accumulated into (+=) */
    float *const *param_grads;    /* accumulated into (+=), same order as params */
    /* Appended within version 1 (check struct_size, as in forward): the
     * buffer the forward just filled, or NULL (saved_bytes 0, or an older
     * host: compute again what the forward would have saved). */
    void *saved;
} moe_router_bwd_args;

/* One device's implementation. */
typedef struct moe_router_impl {
    moe_status (*forward)(void *state, const moe_context *ctx, const moe_router_fwd_args *args);
    moe_status (*backward)(void *state, const moe_context *ctx, const moe_router_bwd_args *args);
} moe_router_impl;

/* The table a version-1 plugin returns. The struct tag and the exported
 * function share the name moe_router_plugin_v1 (they live in different C
 * name spaces); the typedef adds the _t suffix so both can be in scope. */
typedef struct moe_router_plugin_v1 {
    uint32_t abi_version;       /* MOE_ROUTER_ABI_VERSION (1) */
    uint32_t struct_size;       /* sizeof(moe_router_plugin_v1) */
    const char *name;           /* selected by [router].plugin */
    const char *description;    /* one line */
    const moe_option_spec *options;
    int32_t n_options;
    /* Parse options (reject unknown keys and bad values with a message in
     * msg), allocate the instance state. Host memory only. */
    moe_status (*create)(const moe_router_dims *dims, const moe_option *opts, int32_t n_opts,
                         void **state, char *msg, size_t msg_cap);
    void (*destroy)(void *state);
    /* Fill info for this instance. */
    moe_status (*query)(const void *state, moe_router_info *info);
    const moe_router_impl *cpu;   /* NULL if absent */
    const moe_router_impl *cuda;  /* NULL if absent */
} moe_router_plugin_v1_t;

/* What the exported symbol is: a plugin defines
 *     MOE_EXPORT const struct moe_router_plugin_v1 *moe_router_plugin_v1(void)
 *     { return &my_table; }                                                  */
typedef const struct moe_router_plugin_v1 *(*moe_router_plugin_v1_fn)(void);

#ifdef __cplusplus
}
#endif

/* The checks every plugin makes, with the messages users see (needs the types above). */
#include "router_check.h"

#endif
