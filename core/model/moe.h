/*
 * One Mixture-of-Experts feed-forward layer: gate network, router plugin,
 * capacity, dispatch, experts, combine, auxiliary losses; and its backward.
 * The data flow is in moe.c, top to bottom.
 */
#ifndef MOE_MOE_LAYER_H
#define MOE_MOE_LAYER_H

#include <stdint.h>

#include "backend/backend.h"
#include "model/params.h"
#include "moe/router.h"

typedef enum moe_gate_kind { MOE_GATE_LINEAR = 0, MOE_GATE_MLP = 1, MOE_GATE_MLP_HADAMARD = 2 } moe_gate_kind;

/* Shape and behaviour of a MoE layer, fixed at creation. */
typedef struct moe_layer_cfg {
    int d_model, num_experts, top_k, d_ff, gate_hidden, max_tokens, layer, vocab_size;
    moe_gate_kind gate;
    moe_act_kind activation;
    int expert_bias;
    int drop_policy;          /* 0 position, 1 probs */
    int renorm_after_drop;
    double capacity_factor;
    float aux_loss_weight, z_loss_weight;
    float init_std;
} moe_layer_cfg;

/* Routing statistics of the last forward (host memory), filled only by
 * forwards run with collect_stats set: they need host copies of the routing
 * (a wait per layer), which evaluation can afford and training cannot. */
typedef struct moe_layer_stats {
    int T, C, K;              /* tokens, capacity, assignments per token counted for capacity */
    long long assigned;       /* non-empty assignments the router made */
    long long dropped;        /* of those, not kept */
    long long tokens_dropped; /* tokens with no kept assignment */
    double router_entropy;    /* sum over tokens (divide by T) */
    double combine_entropy;   /* sum over tokens with a kept assignment */
    long long combine_tokens;
    double topk_prob;         /* sum over tokens of the routed experts' softmax(l) mass */
    double aux_loss;          /* E * sum_e f_e P_e (unweighted) */
    double z_loss;            /* mean logsumexp(l)^2 (unweighted) */
    int32_t *counts_before;   /* [E] assignments routed to each expert */
    int32_t *counts_after;    /* [E] kept */
} moe_layer_stats;

typedef struct moe_layer {
    moe_layer_cfg cfg;
    moe_backend *be;

    /* the router plugin instance serving this layer */
    const moe_router_plugin_v1_t *router;
    const moe_router_impl *router_impl;
    void *router_state;
    moe_router_info rinfo;
    void *router_workspace;
    void *router_saved;       /* rinfo.saved_bytes kept from a forward to its backward; NULL when 0 */
    int K_cap;                /* K in C = ceil(CF*T*K/E) */

    /* parameters (pointers into the model's flat buffers) and their grads */
    float *wg, *dwg;          /* linear gate [d,E]; mlp: [gh,E] output layer */
    float *g1, *dg1;          /* mlp gates: [d,gh] first layer */
    float *g1b, *dg1b;        /* mlp: [gh] bias */
    float *g2, *dg2;          /* mlp_hadamard: [d,gh] second branch */
    float *w1, *dw1;          /* experts [E,d,h_in], h_in = d_ff or 2*d_ff (swiglu) */
    float *b1, *db1;          /* [E,h_in] */
    float *w2, *dw2;          /* [E,d_ff,d] */
    float *b2, *db2;          /* [E,d] */
    float *router_params[MOE_MAX_PLUGIN_TENSORS], *router_grads[MOE_MAX_PLUGIN_TENSORS];
    float *router_buffers[MOE_MAX_PLUGIN_TENSORS];

    /* saved activations of the last forward (sized for max_tokens) */
    int T, C, C_max;
    int training;             /* the training flag of the last forward */
    const float *x;           /* input [T,d] (owned by the caller) */
    float *gate_a, *gate_b, *gate_h; /* gate hidden activations [T,gh] */
    float *logits, *route_logits;    /* [T,E]; route_logits = logits + T E (one check covers both) */
    int32_t *expert, *slot, *kept;   /* [T,k_out] */
    float *weight, *cw;              /* [T,k_out] */
    float *Xe, *H, *A, *Ye;          /* [E*C, d | h_in | d_ff | d] */
    /* backward scratch */
    float *dlogits, *dweight, *dcw, *dYe, *dA, *dH, *dXe, *dgate_h, *dgate_a, *dgate_b;
    float *probs;                    /* [T,E] d(weighted load-balancing loss)/d(routing logits) */
    float *router_dlogits;           /* [T,E] the plugin's backward output */

    /* Results that stay in backend memory (no wait in a training step):
     * counts[2E] (assignments routed to each expert, then kept), scalars[2]
     * (unweighted lb and z of the last forward) and the check record
     * (MOE_CHECK_RECORD_WORDS, backend.h) of the router's outputs and its
     * workspace guard. The model points scalars and record into one block
     * it reads in a single copy; a layer used alone allocates its own. */
    int32_t *counts;
    double *scalars;
    int32_t *record;
    int owns_results;

    int collect_stats;        /* fill `stats` on each forward (waits) */
    moe_layer_stats stats;
    char *msg;                /* plugin message buffer */
} moe_layer;

/* Check codes of the workspace guard and of the router's inputs the host
 * checks for a CUDA plugin (moe_context.inputs_checked), beside backend.h's
 * MOE_CHECK_*. */
enum {
    MOE_CHECK_GUARD_FORWARD = 16,
    MOE_CHECK_GUARD_BACKWARD = 17,
    MOE_CHECK_LOGIT = 18,      /* a gate logit is not finite */
    /* logits then route_logits (a perturbing router's l'), contiguous, in one
     * check after the plugin's forward: [1] is an index into the two, [4]
     * their count (2 T E; 0 reads as route_logits alone) */
    MOE_CHECK_ROUTE_LOGIT = 19
};

/* Create the router instance and declare the layer's parameters into
 * `params` (and router buffers into `buffers`). 0 ok, -1 + err. */
int moe_layer_create(moe_layer *L, const moe_layer_cfg *cfg, moe_backend *be,
                     const moe_router_plugin_v1_t *router, const moe_option *opts, int n_opts,
                     moe_param_set *params, moe_param_set *buffers, char *err, size_t errcap);
/* Allocate activation memory (after the parameters are allocated). When
 * L->scalars and L->record are set beforehand (the model does), they are
 * used instead of the layer's own. */
int moe_layer_alloc(moe_layer *L, char *err, size_t errcap);
void moe_layer_destroy(moe_layer *L);

/* y[T,d] = MoE(x[T,d]). token_ids feed id-keyed routers. Returns -1 with
 * the plugin's message (prefixed by its name) in err when the plugin's call
 * fails. The checks of what the plugin returned (indices, weights, slots,
 * the workspace guard) go to L->record without waiting; on the CPU, whose
 * memory is the host's, they are also read at once and a failure is
 * returned here (the CPU's capacity loop must not see a bad index). On
 * CUDA the kernels skip bad indices and the caller reports the record
 * (moe_model_check, or moe_layer_check below).
 * residual: when not NULL ([T,d], not overlapping y), y = residual + MoE(x)
 * instead, added by the combine (the residual connection around the layer
 * in the op that writes y; the sum is bitwise y = MoE(x) then y += residual).
 * aux_total: when not NULL, the weighted auxiliary losses are read back
 * (a wait) and added to it; the model passes NULL and reads L->scalars
 * with its other results. */
int moe_layer_forward(moe_layer *L, const float *x, const int32_t *token_ids, int T, int training,
                      moe_rng_key key, const float *residual, float *y, double *aux_total, char *err,
                      size_t errcap);
/* Given dy, write dx (overwrite: the layer's input gradient, no pass to
 * zero it first) and accumulate the parameter gradients (the auxiliary
 * losses' gradients were prepared by the forward), except that the experts'
 * weight gradients dw1, dw2 are overwritten when accumulate_expert_dw is 0
 * (the first backward after the caller zeroed the others). The guard check
 * after the plugin's backward is recorded as in the forward. */
int moe_layer_backward(moe_layer *L, const int32_t *token_ids, const float *dy, float *dx,
                       int accumulate_expert_dw, moe_rng_key key, char *err, size_t errcap);

/* The experts' weight gradients, dw1 and dw2: where they are in the
 * gradients and how many floats each is. */
void moe_layer_expert_weight_grads(const moe_layer *L, float *dw[2], size_t len[2]);

/* The message for a check record of this layer (a host copy of L->record):
 * 0 when it is clear, else -1 with the message naming the router, what is
 * wrong and where. */
int moe_layer_record_message(const moe_layer *L, const int32_t *record, char *err, size_t errcap);
/* Reads L->record (a wait on CUDA): 0, or -1 with its message; a reported
 * record is cleared. */
int moe_layer_check(moe_layer *L, char *err, size_t errcap);
/* The layer's GEMM weights (the experts' w1, w2 and, with biases, b1) as
 * views of `params` (moe_weight_view, backend.h) into out[0..3); returns
 * how many. */
int moe_layer_weight_views(const moe_layer *L, const float *params, moe_weight_view *out);
/* The activation a forward of T tokens saves and the experts' GEMMs read
 * again in the backward (Xe, [E*C, d]), as a view for keep_activations. */
moe_activation_view moe_layer_activation_view(const moe_layer *L, int T);

#endif
