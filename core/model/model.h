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

    /* activations */
    int32_t *ids, *targets; /* [T] in backend memory */
    float **x;              /* residual stream x[0..L], each [T,d] */
    float *xf, *nf_mean, *nf_rstd, *logits, *losses;
    int32_t *correct;
    /* backward scratch */
    float *dres, *tmp1, *tmp2, *dqkv, *dlogits;
    int T;                  /* tokens in the last forward */
} moe_model;

typedef struct moe_forward_result {
    double loss;            /* mean cross-entropy over the targets */
    double aux;             /* weighted auxiliary losses summed over layers */
    long long n_targets;
    long long n_correct;
} moe_forward_result;

/* Build the model for `cfg` with vocabulary V; one router instance per
 * layer from `router`. B_max is the largest batch forward will see.
 * 0 ok, -1 + err. */
int moe_model_create(moe_model *m, const moe_config *cfg, moe_backend *be, int V, int B_max,
                     const moe_router_plugin_v1_t *router, char *err, size_t errcap);
void moe_model_destroy(moe_model *m);

/* Forward B sequences of S tokens (ids, targets in host memory). training
 * enables dropout and router noise; step keys the random numbers. */
int moe_model_forward(moe_model *m, const int32_t *ids, const int32_t *targets, int B, int training,
                      uint64_t step, moe_forward_result *out, char *err, size_t errcap);
/* Backward of loss + aux of the last forward; gradients accumulate into
 * m->params.grads (zero them with moe_model_zero_grads). */
int moe_model_backward(moe_model *m, uint64_t step, char *err, size_t errcap);
void moe_model_zero_grads(moe_model *m);

/* Floating-point operations of one training step (forward + backward) on B
 * sequences, counted as implemented: every GEMM at 2*M*N*K (the experts over
 * all E*C capacity slots, used or not), attention over the causal triangle,
 * backward = 2x forward for each GEMM. Elementwise work is not counted. */
double moe_model_train_flops(const moe_model *m, int B);

#endif
