/*
 * TinyMoE: a decoder-only transformer whose feed-forward blocks are MoE
 * layers. Token embedding (+ learned positions, or RoPE inside attention),
 * pre-norm blocks (LayerNorm or RMSNorm) of causal multi-head attention and
 * MoE feed-forward, a final norm, an LM head (optionally tied to the
 * embedding) and cross-entropy.
 */
#ifndef MOE_MODEL_H
#define MOE_MODEL_H

#include <stdint.h>

#include "backend/backend.h"
#include "model/moe.h"
#include "model/params.h"
#include "runtime/config.h"

typedef struct moe_forward_result {
    double loss;            /* mean cross-entropy over the targets */
    double aux;             /* weighted auxiliary losses summed over layers */
    long long n_targets;
    long long n_correct;
} moe_forward_result;

typedef struct moe_block {
    /* parameters and gradients (into the flat buffers) */
    float *n1g, *dn1g, *n1b, *dn1b;   /* attention norm (b only for LayerNorm) */
    float *wqkv, *dwqkv, *bqkv, *dbqkv; /* [d,3d], [3d] */
    float *wo, *dwo, *bo, *dbo;       /* [d,d], [d] */
    float *n2g, *dn2g, *n2b, *dn2b;   /* MoE norm */
    moe_layer moe;
    /* saved activations, [T,...] */
    float *x_mid;                     /* residual stream after attention */
    float *n1, *n1_mean, *n1_rstd, *qkv, *att, *probs, *n2, *n2_mean, *n2_rstd;
} moe_block;

typedef struct moe_model {
    moe_backend *be;
    int V, d, n_layers, n_heads, S, B_max, T_max;
    int rope, rms, tied;
    float eps, dropout, rope_theta;
    uint64_t seed;

    moe_param_set params;   /* trainable */
    moe_param_set buffers;  /* router state (not trained) */
    float *wte, *dwte;      /* [V,d] */
    float *wpe, *dwpe;      /* [S,d], learned positions only */
    float *nfg, *dnfg, *nfb, *dnfb;
    float *wlm, *dwlm;      /* [V,d]; == wte when tied */
    moe_block *blocks;
    /* The weights the GEMMs read as operands, for the backend's
     * round_weights (called at the start of every forward). */
    moe_weight_view *weight_views;
    int n_weight_views;
    /* The saved activations GEMMs read as operands, declared to the
     * backend's keep_activations at the start of every forward (their
     * shapes depend on the forward's T): 3 per block and the head's. */
    moe_activation_view *activation_views;

    /* activations */
    int32_t *ids, *targets; /* [T] in backend memory */
    float **x;              /* residual stream x[0..L], each [T,d] */
    float *xf, *nf_mean, *nf_rstd, *logits, *losses;
    int32_t *correct;
    /* backward scratch */
    float *dres, *tmp1, *tmp2, *dqkv, *dlogits;
    int T;                  /* tokens in the last forward */
    /* 1 from moe_model_zero_grads to the next backward: the experts'
     * weight gradients were left as they were, for that backward to
     * overwrite (moe_model_zero_grads). */
    int expert_dw_unset;

    /* What the host reads after the device has run, in ONE block of backend
     * memory so a training step reads it in one copy: per forward the
     * cross-entropy sums (xent_sums: loss sum, correct count), the gradient
     * norm (the session's clip_grad_norm writes it), every layer's lb and z
     * (its moe_layer.scalars) and check record (its moe_layer.record). */
    void *results;
    void *results_host;     /* host copy of the block */
    size_t results_bytes;
    double *xent_sums;      /* [2 * (max_pending + 1)]; the last pair serves forwards with out */
    double *grad_norm;      /* [1] */
    int max_pending, n_pending;
    long long *pending_targets;    /* [max_pending] n_targets of each pending forward */
    moe_forward_result *results_out; /* [max_pending] filled by moe_model_collect */
    int n_results;
} moe_model;

/* Build the model for `cfg` with vocabulary V; one router instance per
 * layer from `router`. B_max is the largest batch forward will see.
 * 0 ok, -1 + err. */
int moe_model_create(moe_model *m, const moe_config *cfg, moe_backend *be, int V, int B_max,
                     const moe_router_plugin_v1_t *router, char *err, size_t errcap);
void moe_model_destroy(moe_model *m);

/* Forward B sequences of S tokens (ids, targets in host memory). training
 * enables dropout and router noise; step keys the random numbers.
 * With out: waits, reads the results block in one copy, fills *out and
 * reports the router checks (as moe_model_check): evaluation and tests.
 * Without (out == NULL): nothing waits; the result is kept pending (at most
 * max_pending = train.grad_accum forwards) for moe_model_collect. */
int moe_model_forward(moe_model *m, const int32_t *ids, const int32_t *targets, int B, int training,
                      uint64_t step, moe_forward_result *out, char *err, size_t errcap);
/* The end of a training step: reads the results block in one copy (the one
 * wait of a step), fills m->results_out[0 .. m->n_results) with the pending
 * forwards' results in order (aux: the last forward's), *grad_norm (if not
 * NULL) with what clip_grad_norm wrote to m->grad_norm, and checks every
 * layer's record. 0, or -1 with the first failing layer's message (naming
 * the router, what is wrong and where; the records are then cleared). */
int moe_model_collect(moe_model *m, double *grad_norm, char *err, size_t errcap);
/* The router checks alone (pending results are dropped): one copy. */
int moe_model_check(moe_model *m, char *err, size_t errcap);
/* Routing statistics (moe_layer.stats) on every forward while on (host
 * copies, a wait per layer): for evaluation. Off after creation. */
void moe_model_set_collect_stats(moe_model *m, int on);
/* Backward of loss + aux of the last forward; gradients accumulate into
 * m->params.grads (zero them with moe_model_zero_grads). */
int moe_model_backward(moe_model *m, uint64_t step, char *err, size_t errcap);
/* Sets every gradient to zero as far as a following backward can tell: the
 * experts' weight gradients, most of an MoE model's parameters, are not
 * touched but overwritten by that backward (one pass over them fewer per
 * step). Read the gradients only after a backward. */
void moe_model_zero_grads(moe_model *m);

/* Floating-point operations of one training step (forward + backward) on B
 * sequences, counted as implemented: every GEMM at 2*M*N*K (the experts over
 * all E*C capacity slots, used or not), attention over the causal triangle,
 * backward = 2x forward for each GEMM. Elementwise work is not counted. */
double moe_model_train_flops(const moe_model *m, int B);

#endif
